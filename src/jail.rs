//! The guest host's jail: least privilege for the process that runs another node's guest.
//! A guest that took over its guest host still cannot read this node's files, reach its
//! network beyond the link, or act as anyone but a user of its own.
//!
//! [`enter`] takes these steps, in this order, once the guest host holds everything it
//! needs (/dev/kvm, the cluster key, its listening socket, its channel to the node:
//! hostchan.rs), while it is still single-threaded:
//!
//! 1. **An empty root.** A mount namespace of its own (mount_namespaces(7)) whose root is an
//!    empty, read-only tmpfs (pivot_root(2)); the host's tree is detached. Started as root it
//!    unshares `CLONE_NEWNS`. Otherwise it tries a user namespace with it (user_namespaces(7)),
//!    and goes on without when the host forbids both.
//! 2. **A user of its own.** Started as root (and in the host's user namespace): no
//!    supplementary groups, user and group [`JAIL_ID_BASE`] + its pid (so no two guest
//!    hosts, and no other process on the host, share an identity), and an empty capability
//!    bounding set. Where that fails it goes on as it is, and says so. In every case its
//!    capabilities are dropped (in a user namespace of its own, those it has there). The
//!    parent-death signal is armed again (a change of credentials clears it).
//! 3. **System-call filters.** `PR_SET_NO_NEW_PRIVS` and seccomp filters (seccompiler)
//!    allowing only what a guest host does: memory, threads and signals, time, I/O on the
//!    descriptors it holds, KVM's ioctls and userfaultfd's (on the one made before). Everything else fails with EPERM, logged by the
//!    kernel (an audit record, `type=1326`): among them `socket` (but for Unix socket pairs),
//!    `connect`, `bind`, `execve`, `ptrace`, `mount`, new namespaces, and executable memory.
//!    Opening a file by path fails with ENOENT, unlogged, as it would in the empty root (and
//!    relative to a directory descriptor, which the empty root does not stop). `clone3`
//!    fails with ENOSYS, so that the C library falls back to `clone`, whose flags the filter
//!    can see.

use anyhow::{Context, Result};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule,
};
use std::collections::BTreeMap;

/// A root-started guest host runs as user and group `JAIL_ID_BASE + pid` (pids stay below
/// 2^22, `PID_MAX_LIMIT`): ids no account on the host has.
pub const JAIL_ID_BASE: u32 = 0x6d00_0000;

/// What [`enter`] could do on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jail {
    /// The process's root is an empty tmpfs in a mount namespace of its own.
    pub empty_root: bool,
    /// The user and group it runs as, when it changed them (started as root).
    pub user: Option<u32>,
}

/// Jail this process (see the module's documentation). Only the system-call filter is
/// required: without it the guest host refuses to run.
pub fn enter() -> Result<Jail> {
    // Namespaces, credentials and filters are per thread: one that already ran would stay
    // outside.
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count());
    anyhow::ensure!(
        matches!(threads, Ok(1) | Err(_)),
        "the jail must be entered before any other thread starts ({threads:?} threads)"
    );
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let (empty_root, user_ns) = match empty_root(root) {
        Ok(user_ns) => (true, user_ns),
        Err(e) => {
            eprintln!("mosvm guest-host: jailed without an empty root: {e:#}");
            (false, false)
        }
    };
    // In a user namespace of its own no other id is mapped: it stays who it is there.
    let user = if root && !user_ns {
        match become_own_user() {
            Ok(id) => Some(id),
            Err(e) => {
                eprintln!("mosvm guest-host: jailed without a user of its own: {e:#}");
                None
            }
        }
    } else {
        None
    };
    drop_capabilities().context("dropping capabilities")?;
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes only this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() == 1 {
            libc::_exit(1);
        }
    }
    filter().context("installing the system-call filter")?;
    Ok(Jail { empty_root, user })
}

/// Close every descriptor of this process but those in `keep` (close_range(2)): what the
/// process that started it held open (a file, the node's log, a pipe) must not pass into the
/// jail, where the empty root would not stop reads and writes through it.
pub fn close_descriptors_but(keep: &[i32]) {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&f| u32::try_from(f).ok()).collect();
    keep.sort_unstable();
    let mut from = 0u32;
    for k in keep.into_iter().chain([u32::MAX]) {
        if k > from {
            // SAFETY: closing descriptors nothing in this process uses (it has just started;
            // what it uses is in `keep`).
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
        }
        from = k.saturating_add(1);
    }
}

/// Step 1: a mount namespace whose root is an empty read-only tmpfs. True when a user
/// namespace had to come with it.
fn empty_root(root: bool) -> Result<bool> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    let none: Option<&str> = None;
    let own = if root {
        unshare(CloneFlags::CLONE_NEWNS)
    } else {
        Err(nix::errno::Errno::EPERM)
    };
    let user_ns = match own {
        Ok(()) => false,
        Err(_) => {
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
                .context("no mount namespace of its own")?;
            true
        }
    };
    // Nothing done here reaches the host's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .context("making mounts private")?;
    // Any directory will do to stand on: the host's tree goes away below.
    let at = ["/tmp", "/proc", "/"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir() && *d != "/")
        .context("no directory to mount the empty root on")?;
    let hidden = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        hidden,
        Some("size=4k,nr_inodes=1,mode=0555"),
    )
    .context("mounting an empty tmpfs")?;
    nix::unistd::chdir(at)?;
    // pivot_root(2): "pivot_root(".", ".")" stacks the old root on the new one, and the
    // detaching unmount removes it.
    nix::unistd::pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the host's tree")?;
    nix::unistd::chdir("/")?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hidden,
        none,
    )
    .context("making the empty root read-only")?;
    Ok(user_ns)
}

/// Step 2, started as root: user and group [`JAIL_ID_BASE`] + pid, no supplementary groups,
/// no capabilities (none left in the bounding set either).
fn become_own_user() -> Result<u32> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let id = JAIL_ID_BASE + std::process::id();
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; unknown ones are EINVAL.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    setgroups(&[]).context("setgroups")?;
    let (g, u) = (Gid::from_raw(id), Uid::from_raw(id));
    setresgid(g, g, g).context("setresgid")?;
    // From root to another user: the permitted, effective and ambient sets empty
    // (capabilities(7), "Effect of user ID changes on capabilities").
    setresuid(u, u, u).context("setresuid")?;
    drop_capabilities()?;
    Ok(id)
}

/// Empty this process's permitted, effective and inheritable capability sets (capset(2)).
fn drop_capabilities() -> Result<()> {
    // struct __user_cap_header_struct (version 3, this process) and two data structs.
    let head = [0x2008_0522u32, 0];
    let data = [0u32; 6];
    // SAFETY: capset reads the header and the two 12-byte data structs version 3 takes.
    let r = unsafe { libc::syscall(libc::SYS_capset, head.as_ptr(), data.as_ptr()) };
    anyhow::ensure!(r == 0, "capset: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The system calls a jailed guest host makes, with the conditions on their arguments.
fn allowed() -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    use libc::*;
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let always = [
        // Memory (mmap and mprotect below).
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_mincore,
        SYS_mlock,
        SYS_mlock2,
        SYS_munlock,
        SYS_mlockall,
        SYS_munlockall,
        SYS_msync,
        SYS_memfd_create,
        SYS_membarrier,
        // I/O on the descriptors it holds.
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_lseek,
        SYS_close,
        SYS_close_range,
        SYS_dup,
        SYS_dup2,
        SYS_dup3,
        SYS_fcntl,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_poll,
        SYS_ppoll,
        SYS_select,
        SYS_pselect6,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_eventfd2,
        SYS_pipe,
        SYS_pipe2,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        // Sockets it holds (the link, its listening socket, its channel).
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendmmsg,
        SYS_recvmmsg,
        SYS_shutdown,
        SYS_getsockname,
        SYS_getpeername,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_accept,
        SYS_accept4,
        // Threads, processes, identity.
        SYS_exit,
        SYS_exit_group,
        SYS_wait4,
        SYS_waitid,
        SYS_set_robust_list,
        SYS_get_robust_list,
        SYS_rseq,
        SYS_set_tid_address,
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_getpid,
        SYS_gettid,
        SYS_getppid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_getresuid,
        SYS_getresgid,
        SYS_getgroups,
        SYS_capget,
        SYS_prctl,
        SYS_arch_prctl,
        SYS_getrusage,
        SYS_getrlimit,
        SYS_setrlimit,
        SYS_prlimit64,
        SYS_times,
        SYS_uname,
        SYS_sysinfo,
        SYS_getcpu,
        SYS_getrandom,
        // Signals and timers.
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_rt_sigpending,
        SYS_rt_sigtimedwait,
        SYS_rt_sigsuspend,
        SYS_sigaltstack,
        SYS_kill,
        SYS_tgkill,
        SYS_tkill,
        SYS_alarm,
        SYS_setitimer,
        SYS_getitimer,
        SYS_timer_create,
        SYS_timer_settime,
        SYS_timer_gettime,
        SYS_timer_getoverrun,
        SYS_timer_delete,
        SYS_pause,
        SYS_restart_syscall,
        // Time.
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettimeofday,
        SYS_time,
        // clone3's flags are out of the filter's sight: the second filter makes it ENOSYS.
        SYS_clone3,
    ];
    for nr in always {
        m.insert(nr, vec![]);
    }
    let cond = |arg, len, op, v| Cond::new(arg, len, op, v);
    let rule = |c: Vec<Cond>| SeccompRule::new(c);
    // No executable memory: no code but the guest host's own runs here.
    let no_exec = || -> Result<Vec<SeccompRule>> {
        Ok(vec![rule(vec![cond(
            2,
            Len::Qword,
            Op::MaskedEq(PROT_EXEC as u64),
            0,
        )?])?])
    };
    m.insert(SYS_mmap, no_exec()?);
    m.insert(SYS_mprotect, no_exec()?);
    // Threads and forks, never into new namespaces.
    let namespaces = (CLONE_NEWNS
        | CLONE_NEWCGROUP
        | CLONE_NEWUTS
        | CLONE_NEWIPC
        | CLONE_NEWUSER
        | CLONE_NEWPID
        | CLONE_NEWNET) as u64;
    m.insert(
        SYS_clone,
        vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(namespaces),
            0,
        )?])?],
    );
    // Only Unix socket pairs: the channel's answers (hostchan.rs).
    m.insert(
        SYS_socketpair,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, AF_UNIX as u64)?])?],
    );
    // KVM's ioctls (type 0xAE), and the generic descriptor ones.
    let mut ioctls = vec![rule(vec![cond(
        1,
        Len::Dword,
        Op::MaskedEq(0xff00),
        0xae00,
    )?])?];
    // userfaultfd's (type 0xAA), on the descriptor made before the jail: a guest arriving
    // by post-copy (vmm::postcopy). A new userfaultfd cannot be made here.
    ioctls.push(rule(vec![cond(
        1,
        Len::Dword,
        Op::MaskedEq(0xff00),
        0xaa00,
    )?])?);
    for cmd in [FIONBIO, FIONREAD, FIOCLEX, FIONCLEX] {
        ioctls.push(rule(vec![cond(1, Len::Dword, Op::Eq, cmd)?])?);
    }
    m.insert(SYS_ioctl, ioctls);
    // Refused by the third filter, without a log record (below).
    m.insert(SYS_seccomp, vec![]);
    for nr in OPENS {
        m.insert(nr, vec![]);
    }
    Ok(m)
}

/// The calls that open a file by path. In the empty root there is none to open: they fail with
/// ENOENT, as they would there, and unlogged (the C library looks for files of its own, such
/// as /sys/devices/system/cpu/online, and does without).
const OPENS: [i64; 4] = [
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
];

/// Step 3: no new privileges, and the two filters.
fn filter() -> Result<()> {
    let arch = seccompiler::TargetArch::x86_64;
    let allow = SeccompFilter::new(
        allowed()?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?;
    let only = |nrs: &[i64], errno: i32| {
        SeccompFilter::new(
            nrs.iter().map(|&nr| (nr, vec![])).collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
    };
    let clone3: seccompiler::BpfProgram = only(&[libc::SYS_clone3], libc::ENOSYS)?.try_into()?;
    let opens: seccompiler::BpfProgram = only(&OPENS, libc::ENOENT)?.try_into()?;
    let allow: seccompiler::BpfProgram = allow.try_into()?;
    // This one sets PR_SET_NO_NEW_PRIVS too.
    seccompiler::apply_filter(&clone3)?;
    // The allow-list, with SECCOMP_FILTER_FLAG_LOG: every call it refuses is in the kernel's
    // log (`type=1326` audit records), where an operator sees a guest host trying what it
    // should not.
    let prog = libc::sock_fprog {
        len: u16::try_from(allow.len()).context("the filter is too long")?,
        filter: allow.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `allow`'s instructions, which outlive the call (the kernel
    // copies them).
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_LOG,
            &prog as *const libc::sock_fprog,
        )
    };
    anyhow::ensure!(r == 0, "seccomp: {}", std::io::Error::last_os_error());
    // The newest filter's answer stands among equal actions (seccomp(2)): opens are ENOENT,
    // not the allow-list's logged EPERM. Filters only ever take away: the seccomp(2) the
    // allow-list lets through can add no permission.
    seccompiler::apply_filter(&opens)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Run `f` in a forked child (a fresh single-threaded process, as a guest host is when
    /// it jails itself) and return its exit status.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child runs `f` and leaves with _exit, never returning into the test
        // harness; glibc keeps malloc usable after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(99);
            // SAFETY: leaving the child without running the harness's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn errno_of<T>(r: std::io::Result<T>) -> i32 {
        match r {
            Ok(_) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        }
    }

    #[test]
    fn a_jailed_process_opens_no_file_and_no_socket() {
        let code = in_child(|| {
            // A directory held from before the jail: the empty root does not stop a path
            // relative to it; the filter does.
            let Ok(etc) = std::fs::File::open("/etc") else {
                return 9;
            };
            // One the starter held open: closed before the jail.
            let Ok(held) = std::fs::File::open("/etc/hostname") else {
                return 8;
            };
            close_descriptors_but(&[0, 1, 2, etc.as_raw_fd()]);
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if unsafe { libc::fcntl(held.as_raw_fd(), libc::F_GETFD) } != -1 {
                return 7;
            }
            std::mem::forget(held);
            if let Err(e) = enter() {
                eprintln!("{e:#}");
                return 10;
            }
            // A host file, by path: there is none (the filter answers as the empty root).
            if errno_of(std::fs::File::open("/etc/hostname")) != libc::ENOENT {
                return 11;
            }
            let name = c"hostname";
            // SAFETY: openat with a held directory and a NUL-terminated name.
            let fd = unsafe { libc::openat(etc.as_raw_fd(), name.as_ptr(), libc::O_RDONLY) };
            if fd >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
                return 17;
            }
            // A socket to reach the network: refused.
            if errno_of(std::net::TcpStream::connect("127.0.0.1:22")) != libc::EPERM {
                return 12;
            }
            if errno_of(std::net::UdpSocket::bind("0.0.0.0:0")) != libc::EPERM {
                return 13;
            }
            // Programs: none may be executed.
            let run = std::process::Command::new("/bin/true").status();
            if run.is_ok() {
                return 14;
            }
            // What a guest host does still works: threads, memory, Unix socket pairs.
            let t = std::thread::spawn(|| vec![7u8; 1 << 20].len());
            if t.join().ok() != Some(1 << 20) {
                return 15;
            }
            if crate::hostchan::pair().is_err() {
                return 16;
            }
            0
        });
        assert_eq!(code, 0, "step {code} of the jail check failed");
    }

    #[test]
    fn the_jails_root_is_empty_and_its_user_its_own() {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let code = in_child(move || {
            let Ok(user_ns) = empty_root(root) else {
                // The host allows no mount namespace here (an unprivileged container):
                // nothing to check.
                return 0;
            };
            // The host's files are out of reach by any path.
            if errno_of(std::fs::metadata("/etc/hostname")) != libc::ENOENT {
                return 20;
            }
            if std::fs::read_dir("/").map(|d| d.count()).ok() != Some(0) {
                return 21;
            }
            // Nothing can be written into the empty root.
            if errno_of(std::fs::write("/x", b"x")) != libc::EROFS {
                return 22;
            }
            if root && !user_ns {
                let Ok(id) = become_own_user() else {
                    return 23;
                };
                // SAFETY: getuid and getgid cannot fail.
                if unsafe { (libc::getuid(), libc::getgid()) } != (id, id) {
                    return 24;
                }
                let mut head = [0x2008_0522u32, 0];
                let mut data = [0u32; 6];
                // SAFETY: capget fills the two data structs version 3 asks for.
                unsafe { libc::syscall(libc::SYS_capget, head.as_mut_ptr(), data.as_mut_ptr()) };
                if data != [0; 6] {
                    return 25;
                }
            }
            0
        });
        assert_eq!(code, 0, "step {code} of the jail check failed");
    }
}
