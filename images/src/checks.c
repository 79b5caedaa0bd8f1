/* What Linux checks and enforces in calls a VMM answers itself or through its descriptor
 * table: flags and ranges with their errno, SIGKILL/SIGSTOP never masked, RLIMIT_NOFILE
 * bounding descriptor numbers (lowered and raised), prctl options, and the kernel's order
 * of checks (a bad flag before a bad descriptor). Every result is printed, to be compared
 * with the same program run natively. It ends by unblocking a pending SIGUSR1, which kills
 * it (exit status 138). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *en(int e) {
    switch (e) {
    case EPERM: return "EPERM"; case ENOENT: return "ENOENT"; case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN"; case ENOMEM: return "ENOMEM"; case EACCES: return "EACCES";
    case EFAULT: return "EFAULT"; case EEXIST: return "EEXIST"; case EINVAL: return "EINVAL";
    case EMFILE: return "EMFILE"; case ENOSYS: return "ENOSYS"; case ESRCH: return "ESRCH";
    default: return "other";
    }
}

static void show(const char *what, long r) {
    if (r < 0) printf("%-40s -> -1 %s\n", what, en(errno));
    else printf("%-40s -> %ld\n", what, r);
}

int main(void) {
    /* Signal masks. */
    sigset_t all, got;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    sigprocmask(SIG_SETMASK, NULL, &got);
    printf("mask after SETMASK(all): KILL=%d STOP=%d USR1=%d\n", sigismember(&got, SIGKILL),
           sigismember(&got, SIGSTOP), sigismember(&got, SIGUSR1));
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    show("rt_sigprocmask(how 99)", syscall(SYS_rt_sigprocmask, 99, &all, NULL, 8));
    show("rt_sigprocmask(size 4)", syscall(SYS_rt_sigprocmask, SIG_BLOCK, &all, NULL, 4));

    /* getrandom flags. */
    char rb[16];
    show("getrandom(0)", getrandom(rb, 16, 0));
    show("getrandom(NONBLOCK)", getrandom(rb, 16, GRND_NONBLOCK));
    show("getrandom(INSECURE|RANDOM)", syscall(SYS_getrandom, rb, 16, 6));
    show("getrandom(bit 0x80)", syscall(SYS_getrandom, rb, 16, 0x80));
    show("getrandom(bad flag, bad buffer)", syscall(SYS_getrandom, (void *)8, 16, 0x80));

    /* Memory ranges. */
    char *m = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(m + 4096, 4096);
    show("msync(mapped)", msync(m, 4096, MS_SYNC));
    show("msync(unaligned)", msync(m + 1, 4096, MS_SYNC));
    show("msync(SYNC|ASYNC)", msync(m, 4096, MS_SYNC | MS_ASYNC));
    show("msync(bad flag)", msync(m, 4096, 0x100));
    show("msync(over a hole)", msync(m, 3 * 4096, MS_SYNC));
    show("mlock(mapped)", mlock(m, 100));
    show("mlock(over a hole)", mlock(m, 3 * 4096));
    show("munlock(over a hole)", munlock(m + 100, 2 * 4096));
    show("mlockall(0)", syscall(SYS_mlockall, 0));
    show("set_robust_list(len 24)", syscall(SYS_set_robust_list, m, 24));
    show("set_robust_list(len 16)", syscall(SYS_set_robust_list, m, 16));
    struct rusage ru;
    show("getrusage(SELF)", getrusage(RUSAGE_SELF, &ru));
    show("getrusage(7)", syscall(SYS_getrusage, 7, &ru));
    show("getrusage(7, bad buffer)", syscall(SYS_getrusage, 7, (void *)8));
    stack_t ss = {.ss_sp = m, .ss_size = 100, .ss_flags = 0}, old;
    show("sigaltstack(size 100)", sigaltstack(&ss, &old));
    ss.ss_flags = 0x40;
    ss.ss_size = 4096 * 4;
    show("sigaltstack(bad flags, bad old)", syscall(SYS_sigaltstack, &ss, (void *)8));
    ss.ss_flags = SS_DISABLE;
    show("sigaltstack(SS_DISABLE)", sigaltstack(&ss, NULL));

    /* A 64 TiB PROT_NONE reservation, as allocators and C libraries probe: answered at once
     * (its cost is what is mapped in it, not its size), a piece made usable, all unmapped. */
    size_t huge = (size_t)1 << 46;
    char *r = mmap(NULL, huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    printf("reserve 64 TiB -> %s\n", r == MAP_FAILED ? en(errno) : "ok");
    if (r != MAP_FAILED) {
        show("mprotect(1 MiB inside, RW)", mprotect(r + (huge >> 1), 1 << 20, PROT_READ | PROT_WRITE));
        r[(huge >> 1) + 4096] = 42;
        printf("byte written and read back: %d\n", r[(huge >> 1) + 4096]);
        show("munmap(64 TiB)", munmap(r, huge));
    }

    /* The descriptor table: the kernel's order of checks. */
    show("dup3(bad flags, bad fd)", dup3(77, 5, 0x1234));
    show("dup3(fd, same fd)", dup3(1, 1, 0));
    show("dup2(bad fd, 5)", dup2(77, 5));
    show("F_DUPFD(bad fd, -1)", fcntl(77, F_DUPFD, -1));
    show("close_range(5, 3)", syscall(SYS_close_range, 5, 3, 0));
    show("close_range(bad flags)", syscall(SYS_close_range, 3, 10, 0x40));

    /* RLIMIT_NOFILE bounds descriptor numbers, lowered and raised. */
    for (int fd = 3; fd < 64; fd++) close(fd);
    struct rlimit orig, lim;
    getrlimit(RLIMIT_NOFILE, &orig);
    lim.rlim_cur = 8;
    lim.rlim_max = orig.rlim_max;
    show("setrlimit(NOFILE 8)", setrlimit(RLIMIT_NOFILE, &lim));
    int n = 0, fd;
    while ((fd = open(".", O_RDONLY)) >= 0 && n < 100) n++;
    printf("opened %d more descriptors, then %s\n", n, fd < 0 ? en(errno) : "no failure");
    show("dup2(0, 8)", dup2(0, 8));
    show("F_DUPFD(0, 20)", fcntl(0, F_DUPFD, 20));
    show("getdtablesize", getdtablesize());
    for (int i = 3; i < 8; i++) close(i);
    if (orig.rlim_max >= 4096) {
        lim.rlim_cur = 4096;
        show("setrlimit(NOFILE 4096)", setrlimit(RLIMIT_NOFILE, &lim));
        show("dup2(0, 2000)", dup2(0, 2000));
        show("F_DUPFD(0, 3000)", fcntl(0, F_DUPFD, 3000));
        show("dup2(0, 4096)", dup2(0, 4096));
        close(2000);
        close(3000);
    }
    setrlimit(RLIMIT_NOFILE, &orig);

    /* Credentials: dropping to the ids one already has succeeds. */
    show("setuid(getuid())", setuid(getuid()));
    show("setgid(getgid())", setgid(getgid()));
    show("setresuid(-1, -1, -1)", setresuid(-1, -1, -1));
    show("setreuid(-1, geteuid())", setreuid(-1, geteuid()));
    gid_t groups[256];
    int ng = getgroups(256, groups);
    show("setgroups(the same)", setgroups(ng, groups));
    show("setgroups(-1)", syscall(SYS_setgroups, -1, groups));

    /* prctl. */
    int sig = -1;
    show("PR_SET_PDEATHSIG(SIGTERM)", prctl(PR_SET_PDEATHSIG, SIGTERM));
    show("PR_GET_PDEATHSIG", prctl(PR_GET_PDEATHSIG, &sig));
    printf("pdeathsig = %d\n", sig);
    show("PR_SET_PDEATHSIG(99)", prctl(PR_SET_PDEATHSIG, 99));
    show("PR_GET_DUMPABLE", prctl(PR_GET_DUMPABLE));
    show("PR_SET_DUMPABLE(0)", prctl(PR_SET_DUMPABLE, 0));
    show("PR_GET_DUMPABLE", prctl(PR_GET_DUMPABLE));
    show("PR_SET_DUMPABLE(5)", prctl(PR_SET_DUMPABLE, 5));
    show("PR_GET_NO_NEW_PRIVS", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    show("PR_SET_NO_NEW_PRIVS(1, 1)", prctl(PR_SET_NO_NEW_PRIVS, 1, 1, 0, 0));
    show("PR_SET_NO_NEW_PRIVS(1)", prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    show("PR_GET_NO_NEW_PRIVS", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    show("PR_GET_KEEPCAPS", prctl(PR_GET_KEEPCAPS));
    show("PR_GET_TIMERSLACK", prctl(PR_GET_TIMERSLACK));
    show("PR_SET_TIMERSLACK(1000)", prctl(PR_SET_TIMERSLACK, 1000));
    show("PR_GET_TIMERSLACK", prctl(PR_GET_TIMERSLACK));
    show("PR_GET_SECCOMP", prctl(PR_GET_SECCOMP));
    show("PR_CAPBSET_READ(0)", prctl(PR_CAPBSET_READ, 0));
    show("PR_CAPBSET_READ(999)", prctl(PR_CAPBSET_READ, 999));
    char name[17] = {0};
    show("PR_SET_NAME", prctl(PR_SET_NAME, "a-rather-long-process-name"));
    show("PR_GET_NAME", prctl(PR_GET_NAME, name));
    printf("name = %s\n", name);
    show("prctl(9999)", prctl(9999, 0, 0, 0, 0));

    /* Blocked signals wait; an ignored pending signal is discarded; an unblocked one acts. */
    sigset_t set, pend;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    show("kill(self, SIGUSR1) while blocked", kill(getpid(), SIGUSR1));
    show("raise(SIGTERM) while blocked", raise(SIGTERM));
    sigemptyset(&pend);
    show("sigpending", sigpending(&pend));
    printf("pending: USR1=%d TERM=%d\n", sigismember(&pend, SIGUSR1), sigismember(&pend, SIGTERM));
    signal(SIGTERM, SIG_IGN);
    sigemptyset(&pend);
    sigpending(&pend);
    printf("after SIG_IGN of TERM: USR1=%d TERM=%d\n", sigismember(&pend, SIGUSR1),
           sigismember(&pend, SIGTERM));
    show("rt_sigpending(size 16)", syscall(SYS_rt_sigpending, &pend, 16));
    fflush(stdout);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    printf("still running after unblocking a pending SIGUSR1\n");
    return 0;
}
