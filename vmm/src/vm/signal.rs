//! Guest signals: dispositions, the mask and the pending set (bookkeeping: handlers are not
//! run yet), kill/tgkill, and taking a signal's default action.

use super::{Outcome, Step, Vm, EINVAL};

/// Guest signal dispositions (bookkeeping only: handlers are not yet delivered to).
pub(super) struct Signals {
    pub(super) actions: [[u8; 32]; 65],
    pub(super) mask: u64,
    /// Signals sent while blocked, waiting to be unblocked (bit `sig - 1`).
    pub(super) pending: u64,
    pub(super) altstack: [u8; 24],
}

pub(super) const SIG_IGN: u64 = 1;

impl Signals {
    pub(super) fn new() -> Self {
        let mut altstack = [0u8; 24];
        altstack[8..12].copy_from_slice(&2i32.to_le_bytes()); // SS_DISABLE
        Signals {
            actions: [[0; 32]; 65],
            mask: 0,
            pending: 0,
            altstack,
        }
    }
    pub(super) fn handler(&self, sig: usize) -> u64 {
        u64::from_le_bytes(self.actions[sig][0..8].try_into().expect("8 bytes"))
    }
    /// Whether the signal's default action (or SIG_IGN) ignores it.
    pub(super) fn ignored(&self, sig: i32) -> bool {
        let h = self.handler(sig as usize);
        h == SIG_IGN
            || (h == 0
                && matches!(
                    sig,
                    libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH | libc::SIGCONT
                ))
            || matches!(
                sig,
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
            )
    }
}

impl Vm {
    pub(super) fn kill(&mut self, pid: i64, sig: i32, a: [u64; 6]) -> Result<Step, i64> {
        let own = pid == self.pid || pid == 0;
        if !own {
            // Another process: the deputy sends it, from home.
            let nr = libc::SYS_kill;
            let r = self.call_deputy(nr, [pid as u64, sig as u64, 0, 0, 0, 0], vec![]);
            let _ = a;
            return Ok(Step::Ret(r.ret));
        }
        if !(0..=64).contains(&sig) {
            return Err(EINVAL);
        }
        if sig == 0 || self.sig.ignored(sig) {
            return Ok(Step::Ret(0));
        }
        if self.sig.mask & 1 << (sig - 1) != 0 {
            // Blocked: it waits until unblocked (signal(7)).
            self.sig.pending |= 1 << (sig - 1);
            return Ok(Step::Ret(0));
        }
        Ok(self.take_signal(sig))
    }

    /// A signal reaches the guest: its default action (handlers are not run yet).
    pub(super) fn take_signal(&mut self, sig: i32) -> Step {
        if self.sig.handler(sig as usize) > SIG_IGN && self.warned.insert(1000 + sig as u64) {
            eprintln!(
                "mosvm: {}: signal handlers are not delivered yet; {} takes its default action",
                self.program.display(),
                signal_name(sig)
            );
        }
        Step::Exit(Outcome::Signaled(sig))
    }
}

/// "SIGSEGV" for 11, and so on.
pub fn signal_name(sig: i32) -> String {
    let names = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    names
        .get(sig as usize)
        .filter(|n| !n.is_empty())
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("signal {sig}"))
}
