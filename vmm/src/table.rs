//! The syscall table, as data: for every syscall number, its name, whether it runs in the VMM
//! (`Local`), goes to the deputy at home (`Home`, with the marshalling spec of its arguments), or
//! is refused. The VMM and the deputy both read the same spec, so a forwarded call is one
//! self-contained request (every input buffer) and one reply (every output buffer).

/// How one syscall argument is carried between the VMM and the deputy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum A {
    /// A plain value.
    V,
    /// A file descriptor of the guest's (translated by the deputy).
    Fd,
    /// A directory descriptor, or AT_FDCWD.
    DirFd,
    /// A NUL-terminated path (input).
    Path,
    /// Input buffer whose length is argument `n`.
    In(u8),
    /// Output buffer whose length is argument `n`; `ret` bytes come back.
    Out(u8),
    /// Output array of argument `n` elements of `size` bytes; `ret` elements come back.
    OutElems(u8, u16),
    /// In/out array of argument `n` elements of `size` bytes (e.g. `struct pollfd`).
    InOutElems(u8, u16),
    /// Fixed-size input struct.
    SIn(u16),
    /// Fixed-size output struct.
    SOut(u16),
    /// Fixed-size in/out struct.
    SInOut(u16),
    /// iovec array (input data), count in argument `n`.
    IovIn(u8),
    /// iovec array (output data), count in argument `n`; `ret` bytes come back.
    IovOut(u8),
    /// An `fd_set` of argument `n` descriptors (in/out, translated).
    FdSet(u8),
    /// Output buffer whose length is the `socklen_t` pointed to by argument `n`.
    LenOut(u8),
    /// `pselect6`'s sixth argument, `struct { const sigset_t *ss; size_t ss_len; }`: carried
    /// as the sigset's bytes (a NULL pack or a NULL `ss` as a NULL slot).
    SigPack,
    /// `sendmsg`'s `struct msghdr` (name, control and iovec data carried in one slot: see
    /// `deputy::marshal::MsgHead`).
    MsgIn,
    /// `recvmsg`'s `struct msghdr` (capacities in, what was received back).
    MsgOut,
}

impl A {
    /// Whether the argument is carried as a buffer slot.
    pub fn is_slot(self) -> bool {
        !matches!(self, A::V | A::Fd | A::DirFd)
    }

    /// Whether the argument's buffer comes back in the reply.
    pub fn is_out(self) -> bool {
        matches!(
            self,
            A::Out(_)
                | A::OutElems(..)
                | A::SOut(_)
                | A::IovOut(_)
                | A::LenOut(_)
                | A::InOutElems(..)
                | A::SInOut(_)
                | A::FdSet(_)
                | A::MsgOut
        )
    }
}

/// Where a syscall runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// In the VMM, wherever the process is.
    Local,
    /// At home, by the deputy, with this argument spec (the spec may depend on argument values:
    /// see [`spec`]).
    Home(&'static [A]),
    /// Refused with this errno (and a one-time note under `--trace`, or always for the calls
    /// mosvm does not support yet).
    Refused(i64),
}

/// One table row.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Syscall number.
    pub nr: u32,
    /// Name.
    pub name: &'static str,
    /// Class.
    pub class: Class,
}

const ENOSYS: i64 = 38;
const EPERM: i64 = 1;
const EINVAL: i64 = 22;
const ENOSPC: i64 = 28;
const EOPNOTSUPP: i64 = 95;

use Class::*;
use A::*;

macro_rules! table {
    ($($nr:ident $(($num:literal))? => $class:expr),* $(,)?) => {
        /// Every number of the x86-64 system call table, in no particular order.
        pub const TABLE: &[Entry] = &[
            $(Entry { nr: table!(@nr $nr $($num)?), name: strip(stringify!($nr)), class: $class },)*
        ];
    };
    (@nr $nr:ident) => { libc::$nr as u32 };
    // Numbers the libc crate does not name yet.
    (@nr $nr:ident $num:literal) => { $num };
}

const fn strip(s: &'static str) -> &'static str {
    // "SYS_read" -> "read"
    let b = s.as_bytes();
    let (_, rest) = b.split_at(4);
    match std::str::from_utf8(rest) {
        Ok(r) => r,
        Err(_) => s,
    }
}

const STAT: u16 = 144;
const STATFS: u16 = 120;

table! {
    // Memory, threads, process lifetime: local.
    SYS_brk => Local, SYS_mmap => Local, SYS_munmap => Local, SYS_mprotect => Local,
    SYS_mremap => Local, SYS_madvise => Local, SYS_msync => Local, SYS_mlock => Local,
    SYS_munlock => Local, SYS_mlockall => Local, SYS_munlockall => Local, SYS_mincore => Local,
    SYS_arch_prctl => Local, SYS_set_tid_address => Local, SYS_set_robust_list => Local,
    SYS_get_robust_list => Local, SYS_rseq => Local, SYS_prlimit64 => Local,
    SYS_getrlimit => Local, SYS_setrlimit => Local, SYS_getrandom => Local,
    SYS_clock_gettime => Local, SYS_clock_getres => Local, SYS_gettimeofday => Local,
    SYS_time => Local, SYS_nanosleep => Local, SYS_clock_nanosleep => Local,
    SYS_restart_syscall => Local,
    SYS_sched_yield => Local, SYS_uname => Local, SYS_exit => Local, SYS_exit_group => Local,
    SYS_rt_sigaction => Local, SYS_rt_sigprocmask => Local, SYS_sigaltstack => Local,
    SYS_rt_sigreturn => Local, SYS_rt_sigpending => Local, SYS_futex => Local, SYS_kill => Local, SYS_tgkill => Local,
    SYS_tkill => Local, SYS_sched_getaffinity => Local, SYS_sched_setaffinity => Local,
    SYS_getcpu => Local, SYS_sysinfo => Local, SYS_getrusage => Local, SYS_times => Local,
    SYS_prctl => Local, SYS_personality => Local, SYS_membarrier => Local, SYS_pause => Local, SYS_alarm => Local,

    // Files and descriptors: home.
    SYS_read => Home(&[Fd, Out(2), V]),
    SYS_write => Home(&[Fd, In(2), V]),
    SYS_pread64 => Home(&[Fd, Out(2), V, V]),
    SYS_pwrite64 => Home(&[Fd, In(2), V, V]),
    SYS_readv => Home(&[Fd, IovOut(2), V]),
    SYS_writev => Home(&[Fd, IovIn(2), V]),
    SYS_preadv => Home(&[Fd, IovOut(2), V, V, V]),
    SYS_pwritev => Home(&[Fd, IovIn(2), V, V, V]),
    SYS_preadv2 => Home(&[Fd, IovOut(2), V, V, V, V]),
    SYS_pwritev2 => Home(&[Fd, IovIn(2), V, V, V, V]),
    SYS_open => Home(&[Path, V, V]),
    SYS_openat => Home(&[DirFd, Path, V, V]),
    SYS_creat => Home(&[Path, V]),
    SYS_close => Home(&[Fd]),
    SYS_close_range => Home(&[V, V, V]),
    SYS_stat => Home(&[Path, SOut(STAT)]),
    SYS_lstat => Home(&[Path, SOut(STAT)]),
    SYS_fstat => Home(&[Fd, SOut(STAT)]),
    SYS_newfstatat => Home(&[DirFd, Path, SOut(STAT), V]),
    SYS_statx => Home(&[DirFd, Path, V, V, SOut(256)]),
    SYS_statfs => Home(&[Path, SOut(STATFS)]),
    SYS_fstatfs => Home(&[Fd, SOut(STATFS)]),
    SYS_lseek => Home(&[Fd, V, V]),
    SYS_getdents64 => Home(&[Fd, Out(2), V]),
    SYS_getdents => Home(&[Fd, Out(2), V]),
    SYS_getcwd => Home(&[Out(1), V]),
    SYS_chdir => Home(&[Path]),
    SYS_fchdir => Home(&[Fd]),
    SYS_mkdir => Home(&[Path, V]),
    SYS_mkdirat => Home(&[DirFd, Path, V]),
    SYS_rmdir => Home(&[Path]),
    SYS_unlink => Home(&[Path]),
    SYS_unlinkat => Home(&[DirFd, Path, V]),
    SYS_rename => Home(&[Path, Path]),
    SYS_renameat => Home(&[DirFd, Path, DirFd, Path]),
    SYS_renameat2 => Home(&[DirFd, Path, DirFd, Path, V]),
    SYS_link => Home(&[Path, Path]),
    SYS_linkat => Home(&[DirFd, Path, DirFd, Path, V]),
    SYS_symlink => Home(&[Path, Path]),
    SYS_symlinkat => Home(&[Path, DirFd, Path]),
    SYS_readlink => Home(&[Path, Out(2), V]),
    SYS_readlinkat => Home(&[DirFd, Path, Out(3), V]),
    SYS_truncate => Home(&[Path, V]),
    SYS_ftruncate => Home(&[Fd, V]),
    SYS_fsync => Home(&[Fd]),
    SYS_fdatasync => Home(&[Fd]),
    SYS_sync => Home(&[]),
    SYS_syncfs => Home(&[Fd]),
    SYS_fallocate => Home(&[Fd, V, V, V]),
    SYS_fadvise64 => Home(&[Fd, V, V, V]),
    SYS_readahead => Home(&[Fd, V, V]),
    SYS_flock => Home(&[Fd, V]),
    SYS_access => Home(&[Path, V]),
    SYS_faccessat => Home(&[DirFd, Path, V]),
    SYS_faccessat2 => Home(&[DirFd, Path, V, V]),
    SYS_chmod => Home(&[Path, V]),
    SYS_fchmod => Home(&[Fd, V]),
    SYS_fchmodat => Home(&[DirFd, Path, V]),
    SYS_chown => Home(&[Path, V, V]),
    SYS_lchown => Home(&[Path, V, V]),
    SYS_fchown => Home(&[Fd, V, V]),
    SYS_fchownat => Home(&[DirFd, Path, V, V, V]),
    SYS_umask => Home(&[V]),
    SYS_utime => Home(&[Path, SIn(16)]),
    SYS_utimes => Home(&[Path, SIn(32)]),
    SYS_utimensat => Home(&[DirFd, Path, SIn(32), V]),
    SYS_mknod => Home(&[Path, V, V]),
    SYS_mknodat => Home(&[DirFd, Path, V, V]),
    SYS_getxattr => Home(&[Path, Path, Out(3), V]),
    SYS_lgetxattr => Home(&[Path, Path, Out(3), V]),
    SYS_fgetxattr => Home(&[Fd, Path, Out(3), V]),
    SYS_listxattr => Home(&[Path, Out(2), V]),
    SYS_llistxattr => Home(&[Path, Out(2), V]),
    SYS_flistxattr => Home(&[Fd, Out(2), V]),
    SYS_setxattr => Home(&[Path, Path, In(3), V, V]),
    SYS_lsetxattr => Home(&[Path, Path, In(3), V, V]),
    SYS_fsetxattr => Home(&[Fd, Path, In(3), V, V]),
    SYS_removexattr => Home(&[Path, Path]),
    SYS_lremovexattr => Home(&[Path, Path]),
    SYS_fremovexattr => Home(&[Fd, Path]),
    SYS_sendfile => Home(&[Fd, Fd, SInOut(8), V]),
    SYS_copy_file_range => Home(&[Fd, SInOut(8), Fd, SInOut(8), V, V]),
    SYS_dup => Home(&[Fd]),
    SYS_dup2 => Home(&[Fd, V]),
    SYS_dup3 => Home(&[Fd, V, V]),
    SYS_fcntl => Home(&[Fd, V, V]),
    SYS_ioctl => Home(&[Fd, V, V]),
    SYS_pipe => Home(&[SOut(8)]),
    SYS_pipe2 => Home(&[SOut(8), V]),
    SYS_poll => Home(&[InOutElems(1, 8), V, V]),
    SYS_ppoll => Home(&[InOutElems(1, 8), V, SInOut(16), SIn(8), V]),
    SYS_select => Home(&[V, FdSet(0), FdSet(0), FdSet(0), SInOut(16)]),
    SYS_pselect6 => Home(&[V, FdSet(0), FdSet(0), FdSet(0), SInOut(16), SigPack]),
    SYS_eventfd2 => Home(&[V, V]),
    SYS_eventfd => Home(&[V]),
    SYS_epoll_create => Home(&[V]),
    SYS_epoll_create1 => Home(&[V]),
    SYS_epoll_ctl => Home(&[Fd, V, Fd, SIn(12)]),
    SYS_epoll_wait => Home(&[Fd, OutElems(2, 12), V, V]),
    SYS_epoll_pwait => Home(&[Fd, OutElems(2, 12), V, V, SIn(8), V]),
    SYS_memfd_create => Home(&[Path, V]),
    SYS_inotify_init => Home(&[]),
    SYS_inotify_init1 => Home(&[V]),
    SYS_inotify_add_watch => Home(&[Fd, Path, V]),
    SYS_inotify_rm_watch => Home(&[Fd, V]),
    SYS_timerfd_create => Home(&[V, V]),
    SYS_timerfd_settime => Home(&[Fd, V, SIn(32), SOut(32)]),
    SYS_timerfd_gettime => Home(&[Fd, SOut(32)]),
    SYS_splice => Home(&[Fd, SInOut(8), Fd, SInOut(8), V, V]),
    SYS_tee => Home(&[Fd, Fd, V, V]),
    SYS_sync_file_range => Home(&[Fd, V, V, V]),

    // Sockets: home.
    SYS_socket => Home(&[V, V, V]),
    SYS_socketpair => Home(&[V, V, V, SOut(8)]),
    SYS_connect => Home(&[Fd, In(2), V]),
    SYS_bind => Home(&[Fd, In(2), V]),
    SYS_listen => Home(&[Fd, V]),
    SYS_accept => Home(&[Fd, LenOut(2), SInOut(4)]),
    SYS_accept4 => Home(&[Fd, LenOut(2), SInOut(4), V]),
    SYS_getsockname => Home(&[Fd, LenOut(2), SInOut(4)]),
    SYS_getpeername => Home(&[Fd, LenOut(2), SInOut(4)]),
    SYS_sendto => Home(&[Fd, In(2), V, V, In(5), V]),
    SYS_recvfrom => Home(&[Fd, Out(2), V, V, LenOut(5), SInOut(4)]),
    SYS_setsockopt => Home(&[Fd, V, V, In(4), V]),
    SYS_getsockopt => Home(&[Fd, V, V, LenOut(4), SInOut(4)]),
    SYS_shutdown => Home(&[Fd, V]),
    SYS_sendmsg => Home(&[Fd, MsgIn, V]),
    SYS_recvmsg => Home(&[Fd, MsgOut, V]),

    // Identity: home (the process "seems to run" there).
    SYS_getpid => Home(&[]), SYS_getppid => Home(&[]), SYS_gettid => Local,
    SYS_getuid => Home(&[]), SYS_geteuid => Home(&[]), SYS_getgid => Home(&[]),
    SYS_getegid => Home(&[]), SYS_getpgrp => Home(&[]), SYS_getpgid => Home(&[V]),
    SYS_getsid => Home(&[V]), SYS_setpgid => Home(&[V, V]), SYS_setsid => Home(&[]),
    SYS_getgroups => Home(&[V, OutElems(0, 4)]),
    SYS_getresuid => Home(&[SOut(4), SOut(4), SOut(4)]),
    SYS_getresgid => Home(&[SOut(4), SOut(4), SOut(4)]),
    // Scheduling priority is the process's own, as `nice mosvm run` set it at home.
    SYS_getpriority => Home(&[V, V]),
    SYS_setpriority => Home(&[V, V, V]),
    SYS_sched_getparam => Home(&[V, SOut(4)]),
    SYS_sched_getscheduler => Home(&[V]),

    // Not supported yet: processes and threads.
    // Processes: fork/clone fork the VMM and its deputy at home (vm/process.rs); children
    // are the VMM's host children, so waiting for them is a home call.
    SYS_fork => Local, SYS_vfork => Local, SYS_clone => Local,
    SYS_clone3 => Local, SYS_execve => Local, SYS_execveat => Local,
    SYS_wait4 => Home(&[V, SOut(4), V, SOut(144)]),
    SYS_waitid => Home(&[V, V, SOut(128), V, SOut(144)]),
    SYS_futex_waitv => Refused(ENOSYS), SYS_futex_wake(454) => Refused(ENOSYS),
    SYS_futex_wait(455) => Refused(ENOSYS), SYS_futex_requeue(456) => Refused(ENOSYS),

    // Credentials and scheduling: home, with Linux's own checks (dropping to the same id works).
    SYS_setuid => Home(&[V]), SYS_setgid => Home(&[V]), SYS_setreuid => Home(&[V, V]),
    SYS_setregid => Home(&[V, V]), SYS_setresuid => Home(&[V, V, V]),
    SYS_setresgid => Home(&[V, V, V]), SYS_setfsuid => Home(&[V]), SYS_setfsgid => Home(&[V]),
    SYS_setgroups => Home(&[V, InOutElems(0, 4)]),
    SYS_capget => Home(&[SInOut(8), SOut(24)]),
    SYS_sched_get_priority_max => Home(&[V]), SYS_sched_get_priority_min => Home(&[V]),
    SYS_sched_rr_get_interval => Home(&[V, SOut(16)]),
    SYS_sched_setparam => Home(&[V, SIn(4)]), SYS_sched_setscheduler => Home(&[V, V, SIn(4)]),
    SYS_ioprio_get => Home(&[V, V]), SYS_ioprio_set => Home(&[V, V, V]),

    // More files and descriptors: home.
    SYS_futimesat => Home(&[DirFd, Path, SIn(32)]),
    SYS_fchmodat2 => Home(&[DirFd, Path, V, V]),
    SYS_openat2 => Home(&[DirFd, Path, In(3), V]),
    SYS_epoll_pwait2 => Home(&[Fd, OutElems(2, 12), V, SIn(16), SIn(8), V]),
    SYS_pidfd_open => Home(&[V, V]),
    SYS_ustat => Home(&[V, SOut(32)]),
    SYS_mlock2 => Local,

    // Signals: delivered by the VMM (vm/signal.rs); interval timers are the VMM process's own.
    // rt_sigqueueinfo to this process is local (see `Vm::forward`), to others the deputy's.
    SYS_getitimer => Local, SYS_setitimer => Local,
    SYS_rt_sigtimedwait => Local, SYS_rt_sigsuspend => Local,
    SYS_rt_sigqueueinfo => Home(&[V, V, SIn(128)]),
    SYS_rt_tgsigqueueinfo => Home(&[V, V, V, SIn(128)]),
    // POSIX timers: host timers of the VMM (vm/timers.rs).
    SYS_timer_create => Local, SYS_timer_settime => Local,
    SYS_timer_gettime => Local, SYS_timer_getoverrun => Local,
    SYS_timer_delete => Local,
    // pidfds are the home host's: signalling through one is its business (a signal to this
    // very process comes back to the VMM as a host signal).
    SYS_pidfd_send_signal => Home(&[Fd, V, SIn(128), V]),
    SYS_signalfd => Local,
    SYS_signalfd4 => Local,
    // Not there yet: SysV IPC, POSIX message queues, asynchronous I/O, io_uring, batched
    // messages, vmsplice, key rings, extended scheduling attributes, statmount/listmount.
    // SysV IPC lives at home: ids are the home host's; shmat maps the segment into the VMM's
    // file window (the VMM and the deputy are one process at home). Struct and array shapes
    // depend on the command and counts: see `spec`.
    SYS_shmget => Home(&[V, V, V]), SYS_shmctl => Home(&[V, V, V]),
    SYS_shmat => Local, SYS_shmdt => Local,
    SYS_semget => Home(&[V, V, V]), SYS_semop => Home(&[V, V, V]),
    SYS_semtimedop => Home(&[V, V, V, SIn(16)]), SYS_semctl => Home(&[V, V, V, V]),
    SYS_msgget => Home(&[V, V]), SYS_msgsnd => Home(&[V, V, V, V]),
    SYS_msgrcv => Home(&[V, V, V, V, V]), SYS_msgctl => Home(&[V, V, V]), SYS_mq_open => Refused(ENOSYS),
    SYS_mq_unlink => Refused(ENOSYS), SYS_mq_timedsend => Refused(ENOSYS),
    SYS_mq_timedreceive => Refused(ENOSYS), SYS_mq_notify => Refused(ENOSYS),
    SYS_mq_getsetattr => Refused(ENOSYS), SYS_io_setup => Refused(ENOSYS),
    SYS_io_destroy => Refused(ENOSYS), SYS_io_getevents => Refused(ENOSYS),
    SYS_io_submit => Refused(ENOSYS), SYS_io_cancel => Refused(ENOSYS),
    SYS_io_pgetevents(333) => Refused(ENOSYS), SYS_io_uring_setup => Refused(ENOSYS),
    SYS_io_uring_enter => Refused(ENOSYS), SYS_io_uring_register => Refused(ENOSYS),
    // One sendmsg/recvmsg home call per message (vm.rs `mmsg`).
    SYS_sendmmsg => Local, SYS_recvmmsg => Local,
    SYS_vmsplice => Refused(ENOSYS), SYS_add_key => Refused(ENOSYS),
    SYS_request_key => Refused(ENOSYS), SYS_keyctl => Refused(ENOSYS),
    SYS_sched_setattr => Refused(ENOSYS), SYS_sched_getattr => Refused(ENOSYS),
    SYS_cachestat(451) => Refused(ENOSYS), SYS_statmount(457) => Refused(ENOSYS),
    SYS_listmount(458) => Refused(ENOSYS), SYS_mseal => Refused(ENOSYS),

    // What Linux itself answers here: a micro-VM has no NUMA nodes (a kernel built without
    // NUMA answers ENOSYS), no secret memory (off unless booted with it), no protection keys
    // (pkey_alloc ENOSPC), no LDT, no shadow stacks, no LSM attributes; calls long gone from
    // Linux answer ENOSYS.
    SYS_mbind => Refused(ENOSYS), SYS_set_mempolicy => Refused(ENOSYS),
    SYS_get_mempolicy => Refused(ENOSYS), SYS_migrate_pages => Refused(ENOSYS),
    SYS_move_pages => Refused(ENOSYS), SYS_set_mempolicy_home_node => Refused(ENOSYS),
    SYS_memfd_secret => Refused(ENOSYS), SYS_pkey_alloc => Refused(ENOSPC),
    SYS_pkey_free => Refused(EINVAL), SYS_pkey_mprotect => Refused(EINVAL),
    SYS_modify_ldt => Refused(ENOSYS), SYS_set_thread_area => Refused(ENOSYS),
    SYS_get_thread_area => Refused(ENOSYS), SYS_map_shadow_stack(453) => Refused(ENOSYS),
    SYS_lsm_get_self_attr(459) => Refused(EOPNOTSUPP),
    SYS_lsm_set_self_attr(460) => Refused(EOPNOTSUPP),
    SYS_lsm_list_modules(461) => Refused(EOPNOTSUPP),
    SYS_uretprobe(335) => Refused(ENOSYS), SYS_uprobe(336) => Refused(ENOSYS),
    SYS_create_module(174) => Refused(ENOSYS), SYS_get_kernel_syms(177) => Refused(ENOSYS),
    SYS_query_module(178) => Refused(ENOSYS), SYS_nfsservctl => Refused(ENOSYS),
    SYS_getpmsg => Refused(ENOSYS), SYS_putpmsg => Refused(ENOSYS),
    SYS_afs_syscall => Refused(ENOSYS), SYS_tuxcall => Refused(ENOSYS),
    SYS_security => Refused(ENOSYS), SYS_vserver => Refused(ENOSYS),
    SYS_epoll_ctl_old => Refused(ENOSYS), SYS_epoll_wait_old => Refused(ENOSYS),
    SYS_uselib => Refused(ENOSYS), SYS__sysctl => Refused(ENOSYS),
    SYS_lookup_dcookie => Refused(ENOSYS), SYS_sysfs => Refused(ENOSYS),
    SYS_remap_file_pages => Refused(ENOSYS),

    // Refused as Linux refuses an unprivileged process (EPERM): they would act on the host
    // the VMM runs on or on other processes, not on the guest: tracing, the kernel log and
    // modules, mounts and namespaces, clocks, host names, swap, reboot, accounting, I/O
    // ports, quotas, BPF, perf, fanotify, capabilities, other processes' memory and
    // descriptors; opening by file handle needs CAP_DAC_READ_SEARCH; seccomp filters would
    // bind the VMM (EINVAL, as a kernel without seccomp); landlock likewise (EOPNOTSUPP).
    SYS_ptrace => Refused(EPERM), SYS_syslog => Refused(EPERM), SYS_vhangup => Refused(EPERM),
    SYS_pivot_root => Refused(EPERM), SYS_adjtimex => Refused(EPERM),
    SYS_chroot => Refused(EPERM), SYS_acct => Refused(EPERM),
    SYS_settimeofday => Refused(EPERM), SYS_clock_settime => Refused(EPERM),
    SYS_clock_adjtime => Refused(EPERM), SYS_mount => Refused(EPERM),
    SYS_umount2 => Refused(EPERM), SYS_swapon => Refused(EPERM), SYS_swapoff => Refused(EPERM),
    SYS_reboot => Refused(EPERM), SYS_sethostname => Refused(EPERM),
    SYS_setdomainname => Refused(EPERM), SYS_iopl => Refused(EPERM),
    SYS_ioperm => Refused(EPERM), SYS_init_module => Refused(EPERM),
    SYS_finit_module => Refused(EPERM), SYS_delete_module => Refused(EPERM),
    SYS_kexec_load => Refused(EPERM), SYS_kexec_file_load => Refused(EPERM),
    SYS_quotactl => Refused(EPERM), SYS_quotactl_fd => Refused(EPERM),
    SYS_bpf => Refused(EPERM), SYS_perf_event_open => Refused(EPERM),
    SYS_fanotify_init => Refused(EPERM), SYS_fanotify_mark => Refused(EPERM),
    SYS_setns => Refused(EPERM), SYS_unshare => Refused(EPERM),
    SYS_open_tree => Refused(EPERM), SYS_move_mount => Refused(EPERM),
    SYS_fsopen => Refused(EPERM), SYS_fsconfig => Refused(EPERM),
    SYS_fsmount => Refused(EPERM), SYS_fspick => Refused(EPERM),
    SYS_mount_setattr => Refused(EPERM), SYS_pidfd_getfd => Refused(EPERM),
    SYS_process_vm_readv => Refused(EPERM), SYS_process_vm_writev => Refused(EPERM),
    SYS_kcmp => Refused(EPERM), SYS_process_madvise => Refused(EPERM),
    SYS_process_mrelease => Refused(EPERM), SYS_capset => Home(&[SIn(8), SIn(24)]),
    SYS_userfaultfd => Refused(EPERM), SYS_name_to_handle_at => Refused(EOPNOTSUPP),
    SYS_open_by_handle_at => Refused(EPERM), SYS_seccomp => Refused(EINVAL),
    SYS_landlock_create_ruleset => Refused(EOPNOTSUPP),
    SYS_landlock_add_rule => Refused(EOPNOTSUPP),
    SYS_landlock_restrict_self => Refused(EOPNOTSUPP),
}

/// Calls the VMM runs itself for the process's own sake but the deputy runs at home when
/// they concern other processes (kill(2) and tgkill(2) of another pid): their shapes there.
pub fn also_home(nr: u64) -> Option<&'static [A]> {
    match nr as i64 {
        libc::SYS_kill | libc::SYS_tkill => Some(&[V, V]),
        libc::SYS_tgkill => Some(&[V, V, V]),
        // Another process's CPU affinity (pid, length, mask out).
        libc::SYS_sched_getaffinity => Some(&[V, V, Out(1)]),
        // The capability options of prctl(2) (integer arguments only): the home process's
        // capabilities are the program's.
        libc::SYS_prctl => Some(&[V, V, V, V, V]),
        _ => None,
    }
}

/// Calls that are refused because mosvm does not run them yet (said on stderr once, always).
pub fn unsupported_note(nr: u32) -> Option<&'static str> {
    match nr as i64 {
        libc::SYS_vmsplice => Some("vmsplice is not supported yet"),
        libc::SYS_mq_open => Some("POSIX message queues are not supported yet"),
        _ => None,
    }
}

/// Highest syscall number the dense lookup table covers.
pub const MAX_NR: usize = 512;

/// Dense lookup by number.
pub fn lookup(nr: u64) -> Option<&'static Entry> {
    static DENSE: std::sync::OnceLock<Vec<Option<&'static Entry>>> = std::sync::OnceLock::new();
    let d = DENSE.get_or_init(|| {
        let mut v = vec![None; MAX_NR];
        for e in TABLE {
            v[e.nr as usize] = Some(e);
        }
        v
    });
    d.get(nr as usize).copied().flatten()
}

/// Name of a syscall number (for traces).
pub fn name(nr: u64) -> String {
    lookup(nr)
        .map(|e| e.name.to_string())
        .unwrap_or_else(|| format!("syscall_{nr}"))
}

/// ioctl requests the deputy forwards, with the shape of their third argument (from
/// ioctl_tty(2), ioctl_fs(2), ioctl_ficlone(2), netdevice(7), sd(4), random(4)). Requests are
/// known by number, never guessed from their `_IOC` bits: a request whose struct holds
/// pointers (SIOCGIFCONF, FS_IOC_FIEMAP, ...) would let the host kernel read or write the
/// VMM's memory where the guest's was meant. Every size is what the kernel copies.
const IOCTLS: &[(u32, A)] = &[
    // Terminals (ioctl_tty(2)).
    (0x5401, SOut(36)),      // TCGETS
    (0x5402, SIn(36)),       // TCSETS
    (0x5403, SIn(36)),       // TCSETSW
    (0x5404, SIn(36)),       // TCSETSF
    (0x5405, SOut(18)),      // TCGETA
    (0x5406, SIn(18)),       // TCSETA
    (0x5407, SIn(18)),       // TCSETAW
    (0x5408, SIn(18)),       // TCSETAF
    (0x5409, V),             // TCSBRK
    (0x540a, V),             // TCXONC
    (0x540b, V),             // TCFLSH
    (0x540c, V),             // TIOCEXCL
    (0x540d, V),             // TIOCNXCL
    (0x540e, V),             // TIOCSCTTY
    (0x540f, SOut(4)),       // TIOCGPGRP
    (0x5410, SIn(4)),        // TIOCSPGRP
    (0x5411, SOut(4)),       // TIOCOUTQ, SIOCOUTQ
    (0x5412, SIn(1)),        // TIOCSTI
    (0x5413, SOut(8)),       // TIOCGWINSZ
    (0x5414, SIn(8)),        // TIOCSWINSZ
    (0x5415, SOut(4)),       // TIOCMGET
    (0x5416, SIn(4)),        // TIOCMBIS
    (0x5417, SIn(4)),        // TIOCMBIC
    (0x5418, SIn(4)),        // TIOCMSET
    (0x5419, SOut(4)),       // TIOCGSOFTCAR
    (0x541a, SIn(4)),        // TIOCSSOFTCAR
    (0x541b, SOut(4)),       // FIONREAD, TIOCINQ, SIOCINQ
    (0x541d, V),             // TIOCCONS
    (0x5421, SIn(4)),        // FIONBIO
    (0x5422, V),             // TIOCNOTTY
    (0x5423, SIn(4)),        // TIOCSETD
    (0x5424, SOut(4)),       // TIOCGETD
    (0x5425, V),             // TCSBRKP
    (0x5429, SOut(4)),       // TIOCGSID
    (0x802c_542a, SOut(44)), // TCGETS2
    (0x402c_542b, SIn(44)),  // TCSETS2
    (0x402c_542c, SIn(44)),  // TCSETSW2
    (0x402c_542d, SIn(44)),  // TCSETSF2
    (0x8004_5430, SOut(4)),  // TIOCGPTN
    (0x4004_5431, SIn(4)),   // TIOCSPTLCK
    (0x5437, V),             // TIOCVHANGUP
    (0x8004_5438, SOut(4)),  // TIOCGPKT
    (0x8004_5439, SOut(4)),  // TIOCGPTLCK
    (0x8004_5440, SOut(4)),  // TIOCGEXCL
    (0x5450, V),             // FIONCLEX
    (0x5451, V),             // FIOCLEX
    (0x5452, SIn(4)),        // FIOASYNC
    (0x5459, SOut(4)),       // TIOCSERGETLSR
    (0x5460, SOut(8)),       // FIOQSIZE
    // Files (ioctl_fs(2), ioctl_ficlone(2), ioctl_iflags(2)).
    (0x0001, SInOut(4)),      // FIBMAP
    (0x0002, SOut(4)),        // FIGETBSZ
    (0x8008_6601, SOut(4)),   // FS_IOC_GETFLAGS (the kernel copies an int)
    (0x4008_6602, SIn(4)),    // FS_IOC_SETFLAGS
    (0x8008_7601, SOut(4)),   // FS_IOC_GETVERSION
    (0x4008_7602, SIn(4)),    // FS_IOC_SETVERSION
    (0x801c_581f, SOut(28)),  // FS_IOC_FSGETXATTR
    (0x401c_5820, SIn(28)),   // FS_IOC_FSSETXATTR
    (0x8100_9431, SOut(256)), // FS_IOC_GETFSLABEL
    (0x4004_9409, Fd),        // FICLONE: the source descriptor, by value
    // Block devices (sd(4)).
    (0x125e, SOut(4)),      // BLKROGET
    (0x1260, SOut(8)),      // BLKGETSIZE
    (0x1261, V),            // BLKFLSBUF
    (0x1268, SOut(4)),      // BLKSSZGET
    (0x1278, SOut(4)),      // BLKIOMIN
    (0x1279, SOut(4)),      // BLKIOOPT
    (0x127b, SOut(4)),      // BLKPBSZGET
    (0x127c, SOut(4)),      // BLKDISCARDZEROES
    (0x8008_1272, SOut(8)), // BLKGETSIZE64
    // random(4).
    (0x8004_5200, SOut(4)), // RNDGETENTCNT
    // Sockets (netdevice(7), socket(7)): struct ifreq is 40 bytes.
    (0x8905, SOut(4)),    // SIOCATMARK
    (0x8906, SOut(16)),   // SIOCGSTAMP
    (0x8907, SOut(16)),   // SIOCGSTAMPNS
    (0x8910, SInOut(40)), // SIOCGIFNAME
    (0x8913, SInOut(40)), // SIOCGIFFLAGS
    (0x8915, SInOut(40)), // SIOCGIFADDR
    (0x8917, SInOut(40)), // SIOCGIFDSTADDR
    (0x8919, SInOut(40)), // SIOCGIFBRDADDR
    (0x891b, SInOut(40)), // SIOCGIFNETMASK
    (0x891d, SInOut(40)), // SIOCGIFMETRIC
    (0x8921, SInOut(40)), // SIOCGIFMTU
    (0x8927, SInOut(40)), // SIOCGIFHWADDR
    (0x8933, SInOut(40)), // SIOCGIFINDEX
    (0x8942, SInOut(40)), // SIOCGIFTXQLEN
    (0x894b, SOut(4)),    // SIOCOUTQNSD
];

/// The argument shape of an ioctl request, or None when mosvm does not know it (the call then
/// fails with ENOTTY, what Linux answers for a request the file does not support).
pub fn ioctl_arg(req: u64) -> Option<A> {
    let r = req as u32;
    IOCTLS.iter().find(|&&(n, _)| n == r).map(|&(_, a)| a)
}

/// The argument shape of an fcntl command (fcntl(2)), or None for a command mosvm does not
/// know (EINVAL, as Linux answers an unknown command). Known by number, never guessed: a
/// command whose argument is a pointer must not pass the guest's address to the host.
pub fn fcntl_arg(cmd: u64) -> Option<A> {
    Some(match cmd as i32 {
        libc::F_GETLK
        | libc::F_SETLK
        | libc::F_SETLKW
        | libc::F_OFD_GETLK
        | libc::F_OFD_SETLK
        | libc::F_OFD_SETLKW => SInOut(32),
        // F_SETOWN_EX, F_GETOWN_EX: struct f_owner_ex.
        15 => SIn(8),
        16 => SOut(8),
        // F_GET_RW_HINT, F_GET_FILE_RW_HINT: a u64 out; F_SET_RW_HINT, F_SET_FILE_RW_HINT: in.
        1035 | 1037 => SOut(8),
        1036 | 1038 => SIn(8),
        // F_DUPFD_QUERY compares with another descriptor of the caller's.
        1027 => Fd,
        libc::F_DUPFD
        | libc::F_GETFD
        | libc::F_SETFD
        | libc::F_GETFL
        | libc::F_SETFL
        | libc::F_SETOWN
        | libc::F_GETOWN
        | libc::F_SETLEASE
        | libc::F_GETLEASE
        | libc::F_NOTIFY
        | libc::F_DUPFD_CLOEXEC
        | libc::F_SETPIPE_SZ
        | libc::F_GETPIPE_SZ
        | libc::F_ADD_SEALS
        | libc::F_GET_SEALS => V,
        // F_SETSIG, F_GETSIG, F_CREATED_QUERY, F_CANCELLK.
        10 | 11 | 1028 | 1029 => V,
        _ => return None,
    })
}

/// The full spec of a home call, resolving value-dependent shapes (ioctl, fcntl).
pub fn spec(nr: u64, args: &[u64; 6], base: &'static [A]) -> Result<[A; 6], i64> {
    let mut s = [V; 6];
    s[..base.len()].copy_from_slice(base);
    match nr as i64 {
        libc::SYS_ioctl => s[2] = ioctl_arg(args[1]).ok_or(libc::ENOTTY as i64)?,
        libc::SYS_fcntl => s[2] = fcntl_arg(args[1]).ok_or(libc::EINVAL as i64)?,
        libc::SYS_shmctl | libc::SYS_semctl | libc::SYS_msgctl => {
            let at = if nr as i64 == libc::SYS_semctl { 3 } else { 2 };
            s[at] = ipc_ctl_arg(nr, args).ok_or(libc::EINVAL as i64)?;
        }
        libc::SYS_semop | libc::SYS_semtimedop => {
            // struct sembuf is 6 bytes; more than the buffer a request carries is more than
            // SEMOPM allows (E2BIG).
            s[1] = SIn(sized(args[2].checked_mul(6)).ok_or(libc::E2BIG as i64)?);
        }
        // struct msgbuf: a long mtype, then the text. Messages are at most msgmax bytes
        // (8 KiB by default); msgrcv's capacity is clamped by the VMM (`IPC_MSG_MAX`).
        libc::SYS_msgsnd => {
            s[1] = SIn(sized(args[2].checked_add(8)).ok_or(libc::EINVAL as i64)?);
        }
        libc::SYS_msgrcv => {
            s[1] = SOut(sized(args[2].checked_add(8)).ok_or(libc::EINVAL as i64)?);
        }
        _ => {}
    }
    Ok(s)
}

/// The largest message text a forwarded `msgrcv` asks for: a capacity above any message the
/// host allows (`kernel.msgmax`, 8 KiB by default) changes nothing.
pub const IPC_MSG_MAX: u64 = u16::MAX as u64 - 8;

fn sized(n: Option<u64>) -> Option<u16> {
    n.and_then(|n| u16::try_from(n).ok())
}

/// The shape of the `buf`/`arg` argument of `shmctl`, `semctl` and `msgctl` for the command
/// in `args` (shmctl(2), semctl(2), msgctl(2)), or None for a command mosvm does not know
/// (EINVAL, as Linux answers one). `semctl`'s GETALL/SETALL arrays have `args[4]` elements:
/// the VMM puts the set's size there (the kernel ignores that argument) and the deputy
/// checks it against the host's before the call.
pub fn ipc_ctl_arg(nr: u64, args: &[u64; 6]) -> Option<A> {
    let cmd = args[if nr as i64 == libc::SYS_semctl { 2 } else { 1 }] as i32;
    let (stat, info) = match nr as i64 {
        libc::SYS_shmctl => (112, if cmd == libc::IPC_INFO { 72 } else { 48 }),
        libc::SYS_semctl => (104, 40),
        _ => (120, 32),
    };
    Some(match (nr as i64, cmd) {
        (_, libc::IPC_RMID) => V,
        (_, libc::IPC_SET) => SIn(stat),
        (_, libc::IPC_STAT) => SOut(stat),
        (_, libc::IPC_INFO) => SOut(info),
        // SHM_LOCK, SHM_UNLOCK; SHM_STAT, SHM_INFO, SHM_STAT_ANY.
        (libc::SYS_shmctl, 11 | 12) => V,
        (libc::SYS_shmctl, 13 | 15) => SOut(stat),
        (libc::SYS_shmctl, 14) => SOut(info),
        // GETPID, GETVAL, GETNCNT, GETZCNT, SETVAL; GETALL, SETALL; SEM_STAT, SEM_INFO,
        // SEM_STAT_ANY.
        (libc::SYS_semctl, 11 | 12 | 14 | 15 | 16) => V,
        (libc::SYS_semctl, 13) => SOut(sized(args[4].checked_mul(2))?),
        (libc::SYS_semctl, 17) => SIn(sized(args[4].checked_mul(2))?),
        (libc::SYS_semctl, 18 | 20) => SOut(stat),
        (libc::SYS_semctl, 19) => SOut(info),
        // MSG_STAT, MSG_INFO, MSG_STAT_ANY.
        (libc::SYS_msgctl, 11 | 13) => SOut(stat),
        (libc::SYS_msgctl, 12) => SOut(info),
        _ => return None,
    })
}

/// Whether length argument `n` of `nr` is a C `int` in the kernel (readlink's `bufsiz`,
/// setsockopt's `optlen`, getgroups' `size`, epoll_wait's `maxevents`, a socket address's
/// length): only its low 32 bits count, and a negative value is refused (EINVAL) before the
/// kernel touches the buffer it describes.
pub fn int_len(nr: u64, n: u8) -> bool {
    matches!(
        (nr as i64, n),
        (libc::SYS_readlink, 2)
            | (libc::SYS_readlinkat, 3)
            | (libc::SYS_setsockopt, 4)
            | (libc::SYS_getgroups, 0)
            | (libc::SYS_epoll_wait, 2)
            | (libc::SYS_epoll_pwait, 2)
            | (libc::SYS_connect, 2)
            | (libc::SYS_bind, 2)
            | (libc::SYS_sendto, 5)
    )
}

/// Whether a successful result of `nr` is a new file descriptor.
pub fn returns_fd(nr: u64) -> bool {
    matches!(
        nr as i64,
        libc::SYS_open
            | libc::SYS_openat
            | libc::SYS_creat
            | libc::SYS_socket
            | libc::SYS_accept
            | libc::SYS_accept4
            | libc::SYS_eventfd
            | libc::SYS_eventfd2
            | libc::SYS_epoll_create
            | libc::SYS_epoll_create1
            | libc::SYS_memfd_create
            | libc::SYS_inotify_init
            | libc::SYS_inotify_init1
            | libc::SYS_timerfd_create
            | libc::SYS_openat2
            | libc::SYS_pidfd_open
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_names_match_libc() {
        let mut seen = std::collections::HashSet::new();
        for e in TABLE {
            assert!(seen.insert(e.nr), "{} listed twice", e.name);
            assert!((e.nr as usize) < MAX_NR);
        }
        assert_eq!(lookup(0).unwrap().name, "read");
        assert_eq!(lookup(39).unwrap().name, "getpid");
        assert_eq!(lookup(231).unwrap().name, "exit_group");
        assert!(lookup(9999).is_none());
    }

    #[test]
    fn every_size_argument_names_a_value_argument() {
        for e in TABLE {
            if let Home(spec) = e.class {
                assert!(spec.len() <= 6, "{}", e.name);
                for a in spec {
                    let idx = match *a {
                        In(n)
                        | Out(n)
                        | OutElems(n, _)
                        | InOutElems(n, _)
                        | IovIn(n)
                        | IovOut(n)
                        | FdSet(n) => Some(n),
                        LenOut(n) => {
                            assert_eq!(spec[n as usize], SInOut(4), "{}", e.name);
                            None
                        }
                        _ => None,
                    };
                    if let Some(n) = idx {
                        assert_eq!(spec[n as usize], V, "{}: size arg {n}", e.name);
                    }
                }
            }
        }
    }

    /// The whole x86-64 table (0..=336 and 424..=462, as of Linux 6.14) is classified.
    #[test]
    fn every_number_is_classified() {
        let missing: Vec<u32> = (0..=336u32)
            .chain(424..=462)
            .filter(|&n| lookup(n as u64).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "syscall numbers with no row: {missing:?}"
        );
        for e in TABLE {
            if let Refused(errno) = e.class {
                assert!((1..=133).contains(&errno), "{}: errno {errno}", e.name);
            }
        }
    }

    #[test]
    fn the_split_follows_the_design() {
        let class = |n: i64| lookup(n as u64).unwrap().class;
        for n in [
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_clock_gettime,
            libc::SYS_exit_group,
        ] {
            assert_eq!(class(n), Local);
        }
        for n in [
            libc::SYS_openat,
            libc::SYS_write,
            libc::SYS_getpid,
            libc::SYS_socket,
        ] {
            assert!(matches!(class(n), Home(_)));
        }
        assert_eq!(class(libc::SYS_signalfd4), Local);
    }

    #[test]
    fn fcntl_shapes_are_known_not_guessed() {
        assert_eq!(fcntl_arg(libc::F_GETLK as u64), Some(SInOut(32)));
        assert_eq!(fcntl_arg(1035), Some(SOut(8)));
        assert_eq!(fcntl_arg(1036), Some(SIn(8)));
        assert_eq!(fcntl_arg(libc::F_SETFL as u64), Some(V));
        let semctl = libc::SYS_semctl as u64;
        assert_eq!(
            ipc_ctl_arg(semctl, &[0, 0, libc::GETALL as u64, 0, 5, 0]),
            Some(SOut(10))
        );
        assert_eq!(ipc_ctl_arg(semctl, &[0, 0, 999, 0, 0, 0]), None);
        assert_eq!(
            ipc_ctl_arg(libc::SYS_shmctl as u64, &[0, 14, 0, 0, 0, 0]),
            Some(SOut(48))
        );
        assert_eq!(
            spec(libc::SYS_semop as u64, &[0, 1, 20_000, 0, 0, 0], &[V, V, V]),
            Err(libc::E2BIG as i64)
        );
        assert_eq!(fcntl_arg(9999), None);
    }

    #[test]
    fn ioctl_shapes() {
        assert_eq!(ioctl_arg(0x5401), Some(SOut(36)));
        assert_eq!(ioctl_arg(0x5413), Some(SOut(8)));
        assert_eq!(ioctl_arg(0x8004_5430), Some(SOut(4)));
        assert_eq!(ioctl_arg(0x4004_9409), Some(Fd));
        assert_eq!(ioctl_arg(0x5409), Some(V));
        assert_eq!(ioctl_arg(0x1234), None);
        // A request with pointers inside its struct (SIOCGIFCONF) is not guessed from its bits.
        assert_eq!(ioctl_arg(0x8912), None);
        assert_eq!(ioctl_arg(0xc010_660b), None);
        let args = [0, 0x1234, 0, 0, 0, 0];
        assert_eq!(
            spec(libc::SYS_ioctl as u64, &args, &[Fd, V, V]),
            Err(libc::ENOTTY as i64)
        );
    }
}
