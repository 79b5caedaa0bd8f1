/* Random system calls with wild arguments: a guest trying to hurt its VMM.
 *
 * sysfuzz SEED COUNT: makes COUNT calls, each a random syscall number with random arguments:
 * small numbers, -1, huge values, pointers into a scratch area (whose words hold more pointers,
 * into it and anywhere), pointers running off its end into unmapped memory, and wild pointers
 * (unmapped, kernel, non-canonical). Each call's number and result are printed, one per line,
 * then "survived COUNT calls".
 *
 * Calls that would end or wreck the caller itself (exit, kill, munmap, rt_sigreturn, ...),
 * block for ever (pause, futex, flock, ...), reach outside the process (ptrace, mount,
 * reboot, setuid, sched_setscheduler, process_vm_writev, ...) or leave objects in the system
 * (SysV IPC, key rings, aio) or lock memory are not drawn; a few are made safe (mmap without MAP_FIXED,
 * zero timeouts, a list of harmless ioctls, copies of at most 1 MiB). No path can name anything outside the current
 * directory: the scratch area never holds '/' or '.' when a call starts. Run it in an empty
 * directory, as root or not. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Numbers older C library headers may lack. */
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif
#ifndef SYS_io_uring_enter
#define SYS_io_uring_enter 426
#endif
#ifndef SYS_io_uring_register
#define SYS_io_uring_register 427
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_fsopen
#define SYS_fsopen 430
#endif
#ifndef SYS_fsconfig
#define SYS_fsconfig 431
#endif
#ifndef SYS_fsmount
#define SYS_fsmount 432
#endif
#ifndef SYS_fspick
#define SYS_fspick 433
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_epoll_pwait2
#define SYS_epoll_pwait2 441
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_quotactl_fd
#define SYS_quotactl_fd 443
#endif
#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_process_mrelease
#define SYS_process_mrelease 448
#endif
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef SYS_set_mempolicy_home_node
#define SYS_set_mempolicy_home_node 450
#endif
#ifndef SYS_map_shadow_stack
#define SYS_map_shadow_stack 453
#endif

#define SCRATCH ((unsigned char *)0x100000000000UL)
#define SCRATCH_LEN (64 * 1024)
#define OUT_FD 900
#define MAX_NR 470

static uint64_t rng;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static const uint64_t wild[] = {
    0xdead0000000UL,        /* unmapped user memory */
    0xffff888000000000UL,   /* kernel */
    0x0000900000000000UL,   /* non-canonical */
    0x1000UL,               /* the first page */
    0x7ffffffff000UL,       /* the top of user space */
    0xfffffffffffff000UL,   /* the last page */
};

static const long denied[] = {
    /* The process ending or wrecking itself. */
    SYS_exit, SYS_exit_group, SYS_rt_sigreturn, SYS_kill, SYS_tkill, SYS_tgkill,
    SYS_rt_sigqueueinfo, SYS_rt_tgsigqueueinfo, SYS_pidfd_send_signal, SYS_munmap,
    SYS_mprotect, SYS_mremap, SYS_brk, SYS_madvise, SYS_rt_sigaction, SYS_arch_prctl,
    SYS_prctl, SYS_seccomp, SYS_personality, SYS_modify_ldt, SYS_set_thread_area,
    SYS_alarm, SYS_setitimer, SYS_timer_create, SYS_timer_settime, SYS_setrlimit,
    SYS_prlimit64, SYS_rseq, SYS_userfaultfd, SYS_pkey_mprotect, SYS_mlockall,
    SYS_remap_file_pages, SYS_shmat, SYS_mlock, SYS_mlock2, SYS_map_shadow_stack, SYS_restart_syscall,
    SYS_fork, SYS_vfork, SYS_clone, SYS_clone3, SYS_execve, SYS_execveat,
    SYS_landlock_restrict_self, SYS_unshare, SYS_setns,
    /* Blocking. */
    SYS_pause, SYS_nanosleep, SYS_clock_nanosleep, SYS_futex, SYS_futex_waitv, SYS_flock,
    SYS_rt_sigsuspend, SYS_rt_sigtimedwait, SYS_splice, SYS_tee, SYS_vmsplice,
    SYS_io_getevents, SYS_io_pgetevents, SYS_epoll_pwait2, SYS_wait4, SYS_waitid,
    454, 455, 456, /* futex_wake, futex_wait, futex_requeue */
    335, 336,      /* uretprobe, uprobe: SIGILL unless called from their trampolines */
    /* Reaching outside the process, or changing the machine. */
    SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_pidfd_getfd, SYS_kcmp,
    SYS_setuid, SYS_setgid, SYS_setreuid, SYS_setregid, SYS_setresuid, SYS_setresgid,
    SYS_setfsuid, SYS_setfsgid, SYS_setgroups, SYS_capset, SYS_setpriority,
    SYS_sched_setparam, SYS_sched_setscheduler, SYS_sched_setaffinity, SYS_sched_setattr,
    SYS_ioprio_set, SYS_mount, SYS_umount2, SYS_pivot_root, SYS_chroot, SYS_swapon,
    SYS_swapoff, SYS_reboot, SYS_kexec_load, SYS_kexec_file_load, SYS_init_module,
    SYS_finit_module, SYS_delete_module, SYS_sethostname, SYS_setdomainname,
    SYS_settimeofday, SYS_clock_settime, SYS_adjtimex, SYS_clock_adjtime, SYS_iopl,
    SYS_ioperm, SYS_acct, SYS_vhangup, SYS_quotactl, SYS_quotactl_fd, SYS_mknod,
    SYS_mknodat, SYS_open_by_handle_at, SYS_fanotify_init, SYS_fanotify_mark, SYS_bpf,
    SYS_perf_event_open, SYS_mbind, SYS_set_mempolicy, SYS_migrate_pages, SYS_move_pages,
    SYS_set_mempolicy_home_node, SYS_process_madvise, SYS_process_mrelease,
    SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick,
    SYS_mount_setattr, SYS_fallocate, SYS_sync, SYS_syncfs, SYS_syslog, SYS_uselib,
    /* Objects that outlive the process. */
    SYS_shmget, SYS_shmctl, SYS_shmdt, SYS_semget, SYS_semop, SYS_semctl, SYS_semtimedop,
    SYS_msgget, SYS_msgsnd, SYS_msgrcv, SYS_msgctl, SYS_mq_open, SYS_mq_unlink,
    SYS_mq_timedsend, SYS_mq_timedreceive, SYS_mq_notify, SYS_mq_getsetattr, SYS_add_key,
    SYS_request_key, SYS_keyctl, SYS_io_setup, SYS_io_destroy, SYS_io_submit,
    SYS_io_cancel, SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
};

static const unsigned long ioctls[] = {
    0x5401, 0x5402, 0x5413, 0x541b, 0x5421, 0x5450, 0x5451, 0x540f, 0x5409, 0x540b,
    0x40049409, 0x8910, 0x8933, 0x80086601, 0x80081272, 0x1268, 0x1234, 0xdeadbeef,
};

static const long fcntls[] = {0, 1, 2, 3, 4, 5, 6, 36, 37, 1030, 1031, 1032, 1034, 9999};

static int is_denied(long nr) {
    for (size_t i = 0; i < sizeof denied / sizeof *denied; i++)
        if (denied[i] == nr) return 1;
    return 0;
}

static void clean_scratch(void) {
    for (size_t i = 0; i < SCRATCH_LEN; i++)
        if (SCRATCH[i] == '/' || SCRATCH[i] == '.') SCRATCH[i] = 'x';
}

static uint64_t ptr(void) {
    switch (next() % 4) {
    case 0: return (uint64_t)(SCRATCH + SCRATCH_LEN - 1 - next() % 64);
    case 1: return wild[next() % (sizeof wild / sizeof *wild)];
    default: return (uint64_t)(SCRATCH + next() % SCRATCH_LEN);
    }
}

static uint64_t arg(void) {
    switch (next() % 10) {
    case 0: case 1: case 2: return next() % 21;
    case 3: return (uint64_t)-1;
    case 4: {
        static const uint64_t big[] = {1UL << 63, 0x7fffffff, 0xffffffff, 1UL << 40,
                                       0x7ffff000, 4096, 65536};
        return next() % 2 ? big[next() % 7] : next();
    }
    case 5: return next() & 0xffffffff;
    default: return ptr();
    }
}

/* Make the drawn arguments of a few calls safe (see the comment at the top). */
static void tame(long nr, uint64_t *a) {
    static const uint64_t zero_timeout = (uint64_t)(SCRATCH + SCRATCH_LEN - 4096);
    memset((void *)zero_timeout, 0, 16);
    switch (nr) {
    case SYS_mmap:
        a[3] &= ~(uint64_t)(MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_POPULATE | MAP_LOCKED);
        if (a[1] > (1UL << 30)) a[1] = 1UL << 30;
        break;
    case SYS_poll: a[2] = 0; break;
    case SYS_epoll_wait: case SYS_epoll_pwait: a[3] = 0; break;
    case SYS_select: case SYS_pselect6: a[4] = zero_timeout; break;
    case SYS_ppoll: a[2] = zero_timeout; break;
    case SYS_recvmmsg: a[4] = zero_timeout; break;
    case SYS_ioctl: a[1] = ioctls[next() % (sizeof ioctls / sizeof *ioctls)]; break;
    case SYS_fcntl:
        a[1] = fcntls[next() % (sizeof fcntls / sizeof *fcntls)];
        if (a[1] == F_SETFL) a[2] &= ~(uint64_t)O_ASYNC;
        break;
    case SYS_socket: case SYS_socketpair: {
        static const uint64_t dom[] = {AF_UNIX, AF_INET, AF_INET6};
        a[0] = dom[next() % 3];
        a[1] = (next() % 2 ? 1 : 2) | (a[1] & (SOCK_NONBLOCK | SOCK_CLOEXEC));
        a[2] = 0;
        break;
    }
    /* Copies between descriptors stay small (a file made huge and sparse would fill the disk). */
    case SYS_sendfile: if (a[3] > (1 << 20)) a[3] = 1 << 20; break;
    case SYS_copy_file_range: if (a[4] > (1 << 20)) a[4] = 1 << 20; break;
    case SYS_close_range: a[1] = a[1] > 100 ? 100 : a[1]; break;
    case SYS_dup2: case SYS_dup3: if (a[1] == OUT_FD) a[1] = 7; break;
    case SYS_close: if (a[0] == OUT_FD) a[0] = 7; break;
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: sysfuzz SEED COUNT\n");
        return 2;
    }
    rng = strtoull(argv[1], NULL, 0) * 0x9e3779b97f4a7c15UL | 1;
    long count = atol(argv[2]);
    if (dup2(1, OUT_FD) != OUT_FD) return 3;
    /* A write to a pipe or socket nobody reads is EPIPE, not the end of the run. */
    signal(SIGPIPE, SIG_IGN);
    /* Standard descriptors become files of the current directory. */
    int in = open("in", O_RDWR | O_CREAT, 0644), out = open("out", O_RDWR | O_CREAT, 0644);
    dup2(in, 0);
    dup2(out, 1);
    dup2(out, 2);
    syscall(SYS_close_range, 3, OUT_FD - 1, 0);
    if (mmap(SCRATCH, SCRATCH_LEN, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != SCRATCH)
        return 4;
    for (size_t i = 0; i < SCRATCH_LEN; i += 8) {
        uint64_t w = next() % 4 == 0 ? ptr() : next();
        memcpy(SCRATCH + i, &w, 8);
        if (next() % 2 == 0) SCRATCH[i + next() % 8] = 0;
    }
    size_t cap = 64 + (size_t)count * 32, len = 0;
    char *log = malloc(cap);
    if (!log) return 5;
    for (long i = 0; i < count; i++) {
        long nr;
        do nr = (long)(next() % MAX_NR);
        while (is_denied(nr));
        uint64_t a[6];
        for (int k = 0; k < 6; k++) a[k] = arg();
        tame(nr, a);
        clean_scratch();
        long r = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        long e = r == -1 ? -(long)errno : r;
        len += (size_t)snprintf(log + len, cap - len, "%ld %ld\n", nr, e);
        /* Whatever the call made stays harmless: no descriptor blocks, none beyond 20. */
        syscall(SYS_close_range, 21, OUT_FD - 1, 0);
        syscall(SYS_close_range, OUT_FD + 1, ~0U, 0);
        for (int fd = 0; fd <= 20; fd++) syscall(SYS_fcntl, fd, F_SETFL, O_NONBLOCK);
    }
    len += (size_t)snprintf(log + len, cap - len, "survived %ld calls\n", count);
    for (size_t off = 0; off < len;) {
        long w = write(OUT_FD, log + off, len - off);
        if (w <= 0) return 6;
        off += (size_t)w;
    }
    return 0;
}
