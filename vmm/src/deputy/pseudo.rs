//! Calls that are not Linux's (numbers from [`STOP_AT_HOME`] up, which no Linux call has):
//! what a guest away from home asks of its home process itself. They travel as deputy
//! requests and run in [`super::HostDeputy::begin`].

use super::{Reply, Request};
use std::collections::BTreeMap;
use std::sync::{mpsc, Mutex};

/// Not a Linux call (numbers this high are none): a guest away from home takes a job-control
/// stop, `args[0]` the signal (SIGSTOP, or SIGTSTP, SIGTTIN, SIGTTOU at their default action).
/// Its home process stops with that signal, so that its parent sees the stop as natively
/// (wait(2) with WUNTRACED, a shell's job table), and the home node stops the guest's host
/// meanwhile; the call returns once the home process is continued. EINVAL for another
/// signal.
pub const STOP_AT_HOME: u64 = 0x10_0000;

/// [`STOP_AT_HOME`], run at home.
fn stop_at_home(sig: i32) -> Reply {
    if !matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    ) {
        return Reply::err(libc::EINVAL as i64);
    }
    // SAFETY: signal(2), sigset and mask calls on local values; tgkill to this very thread.
    unsafe {
        // The guest takes the signal's default action, so does its home process (as
        // `vm::pause::mirror` has it while the guest is at home). SIGSTOP's cannot change.
        if sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        // SIGCONT too: whatever the guest's action for it, it is taken on this thread as
        // the process goes on, before this call returns (and is forwarded before the reply).
        libc::sigaddset(&mut set, libc::SIGCONT);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, &mut old);
        // Sent to this thread with the signal unblocked, it is taken on the way out of the
        // call: the process stops there until continued.
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            sig,
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    Reply {
        ret: 0,
        outs: vec![],
    }
}

/// Not a Linux call: reserve a thread id at home for a thread the guest starts away from
/// home. A placeholder thread of the home process holds the id (so no other process or thread
/// gets it) until [`RELEASE_TID`]; signals sent to it from outside reach the guest as
/// process-directed ones. Returns the id, or -EAGAIN.
pub const RESERVE_TID: u64 = STOP_AT_HOME + 1;

/// Not a Linux call: a thread of the guest whose id `args[0]` was reserved with
/// [`RESERVE_TID`] has exited: end its placeholder. 0, or -ESRCH for an id not reserved here.
pub const RELEASE_TID: u64 = STOP_AT_HOME + 2;

/// Not a Linux call: a guest away from home forks (fork, vfork, clone without CLONE_THREAD).
/// Its home process forks too: the child's deputy, with the parent's descriptors, cwd,
/// credentials, process group and terminal, whose host pid is the child's pid. The child's
/// deputy then connects to the child's guest host, which waits at the address in the first
/// slot (`In`, UTF-8 `ip:port`) for a connection bearing the token in the second (`In`, 32
/// bytes). Returns the child's pid, or -errno (fork(2)'s EAGAIN, ENOMEM; EINVAL for a malformed
/// request). Served by the home process's link to the guest (`mosvm run`), not by
/// [`super::HostDeputy`], whose process this forks.
pub const FORK_AWAY: u64 = STOP_AT_HOME + 3;

/// Not a Linux call: a guest away from home execs. Would execve(2) get past its checks for the
/// program at the path in the only slot (`In`), relative to the guest's descriptor `args[0]`
/// (or AT_FDCWD), with execveat's `args[1]` flags? 0, or the errno execve(2) gives (ENOENT,
/// EACCES, ENOEXEC, ELOOP, ...), negated.
pub const EXEC_CHECK: u64 = STOP_AT_HOME + 4;

/// Threads of this (home) process holding thread ids for guest threads that run elsewhere,
/// by id: how to end each. One guest per home process, so one registry per process.
static HELD: Mutex<BTreeMap<i64, mpsc::SyncSender<()>>> = Mutex::new(BTreeMap::new());

fn held() -> std::sync::MutexGuard<'static, BTreeMap<i64, mpsc::SyncSender<()>>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// The calling thread, whose kernel thread id is the guest thread id `tid`, holds that id for
/// the guest thread, which runs elsewhere: it takes the guest's signals (they reach the guest
/// as process-directed ones) and waits until [`RELEASE_TID`] (or an execve) ends it.
/// `registered` runs once a release would find it.
pub fn hold_here(tid: i64, registered: impl FnOnce()) {
    let (end_tx, end_rx) = mpsc::sync_channel::<()>(1);
    held().insert(tid, end_tx);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"mosvm-tid".as_ptr()) };
    crate::vm::take_guest_signals_here();
    registered();
    let _ = end_rx.recv();
}

fn reserve() -> i64 {
    let (tid_tx, tid_rx) = mpsc::sync_channel::<i64>(1);
    let spawned = std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            // SAFETY: gettid(2) has no arguments and no memory effects.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            hold_here(tid, || {
                let _ = tid_tx.send(tid);
            });
        });
    if spawned.is_err() {
        return -(libc::EAGAIN as i64);
    }
    tid_rx.recv().unwrap_or(-(libc::EAGAIN as i64))
}

fn release(tid: i64) -> i64 {
    match held().remove(&tid) {
        Some(end) => {
            let _ = end.send(());
            0
        }
        None => -(libc::ESRCH as i64),
    }
}

/// Forget every held id: after a host fork the child has none of the threads (`end_them`
/// false: the parent keeps them), after an execve the guest has none of the threads they
/// stood for (`end_them` true).
pub fn clear_held(end_them: bool) {
    let all = std::mem::take(&mut *held());
    if end_them {
        for end in all.values() {
            let _ = end.send(());
        }
    }
}

/// Run `req` when it is one of these calls.
pub(super) fn call(req: &Request) -> Option<Reply> {
    let ret = match req.nr {
        STOP_AT_HOME => return Some(stop_at_home(req.args[0] as i32)),
        RESERVE_TID => reserve(),
        RELEASE_TID => release(req.args[0] as i64),
        _ => return None,
    };
    Some(Reply { ret, outs: vec![] })
}
