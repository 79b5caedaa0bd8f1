//! Calls that are not Linux's (numbers from [`STOP_AT_HOME`] up, which no Linux call has):
//! what a guest away from home asks of its home process itself. They travel as deputy
//! requests and run in [`super::HostDeputy::begin`].

use super::{Reply, Request};
use std::collections::BTreeMap;
use std::sync::mpsc;

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

/// Placeholder threads holding reserved thread ids, by id.
#[derive(Default)]
pub struct Placeholders {
    held: BTreeMap<i64, mpsc::SyncSender<()>>,
}

impl Placeholders {
    fn reserve(&mut self) -> i64 {
        let (tid_tx, tid_rx) = mpsc::sync_channel::<i64>(1);
        let (end_tx, end_rx) = mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("mosvm-tid".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                crate::vm::take_guest_signals_here();
                // SAFETY: gettid(2) has no arguments and no memory effects.
                let _ = tid_tx.send(unsafe { libc::syscall(libc::SYS_gettid) });
                // Held until released (or the sender is dropped: the deputy is gone).
                let _ = end_rx.recv();
            });
        if spawned.is_err() {
            return -(libc::EAGAIN as i64);
        }
        match tid_rx.recv() {
            Ok(tid) => {
                self.held.insert(tid, end_tx);
                tid
            }
            Err(_) => -(libc::EAGAIN as i64),
        }
    }

    fn release(&mut self, tid: i64) -> i64 {
        match self.held.remove(&tid) {
            Some(end) => {
                let _ = end.send(());
                0
            }
            None => -(libc::ESRCH as i64),
        }
    }

    /// Forget every placeholder: after a host fork the child has none of the threads (the
    /// parent keeps them), after an execve the guest has none of the threads they stood for.
    pub fn clear(&mut self, end_them: bool) {
        if end_them {
            for (_, end) in std::mem::take(&mut self.held) {
                let _ = end.send(());
            }
        } else {
            // The senders are copies of the parent's: dropping them ends nothing there.
            self.held.clear();
        }
    }
}

/// Run `req` when it is one of these calls.
pub(super) fn call(tids: &mut Placeholders, req: &Request) -> Option<Reply> {
    let ret = match req.nr {
        STOP_AT_HOME => return Some(stop_at_home(req.args[0] as i32)),
        RESERVE_TID => tids.reserve(),
        RELEASE_TID => tids.release(req.args[0] as i64),
        _ => return None,
    };
    Some(Reply { ret, outs: vec![] })
}
