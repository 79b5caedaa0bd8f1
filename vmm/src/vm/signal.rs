//! Guest signals (signal(7)): dispositions, the mask, the pending queue; signals the guest
//! sends itself, its faults, and those `mosvm run` receives from the host (`pause.rs`);
//! delivery to handlers with Linux's x86-64 frames (`crate::sigframe`), `rt_sigreturn`,
//! `rt_sigsuspend`, `pause`, `rt_sigtimedwait`, `rt_sigqueueinfo`, and the interval timers.

use super::pause::{take_host_signals, WAKE};
use super::{Outcome, Step, Vm, EAGAIN, EFAULT, EINTR, EINVAL, EPERM, ERESTART};
use crate::sigframe::{self, AltStack, FrameInput};
use anyhow::{Context, Result};
use kvm_bindings::kvm_regs;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub(super) const SIG_IGN: u64 = 1;
const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTART: u64 = 0x1000_0000;
const SA_NODEFER: u64 = 0x4000_0000;
const SA_RESETHAND: u64 = 0x8000_0000;
const SA_RESTORER: u64 = 0x0400_0000;
/// `si_code` values (siginfo.h).
const SI_USER: i32 = 0;
const SI_KERNEL: i32 = 0x80;
const SI_TKILL: i32 = -6;
/// Selectors Linux's 64-bit user code runs with (`__USER_CS`, `__USER_DS`), as frames show.
const LINUX_USER_CS: u16 = 0x33;
const LINUX_USER_DS: u16 = 0x2b;
/// rflags: trap, direction, resume flags (cleared on handler entry).
const TF_DF_RF: u64 = 0x100 | 0x400 | 0x1_0000;

fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// SIGKILL and SIGSTOP: never blocked, caught or ignored.
const UNBLOCKABLE: u64 = 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);

/// A signal's default action (signal(7)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Default {
    Term,
    Ign,
    Stop,
    Cont,
}

fn default_action(sig: i32) -> Default {
    match sig {
        libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH => Default::Ign,
        libc::SIGCONT => Default::Cont,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => Default::Stop,
        _ => Default::Term,
    }
}

/// Calls never restarted after a handler, whatever SA_RESTART says (signal(7): the waits
/// with timeouts, sleeps, signal waits, poll/select/epoll, SysV IPC).
fn never_restarted(nr: u64) -> bool {
    matches!(
        nr as i64,
        libc::SYS_poll
            | libc::SYS_ppoll
            | libc::SYS_select
            | libc::SYS_pselect6
            | libc::SYS_epoll_wait
            | libc::SYS_epoll_pwait
            | libc::SYS_epoll_pwait2
            | libc::SYS_nanosleep
            | libc::SYS_clock_nanosleep
            | libc::SYS_pause
            | libc::SYS_rt_sigsuspend
            | libc::SYS_rt_sigtimedwait
            | libc::SYS_io_getevents
            | libc::SYS_semop
            | libc::SYS_semtimedop
            | libc::SYS_msgrcv
            | libc::SYS_msgsnd
    )
}

/// How the interrupted user context is reached at this exit, and how the guest resumes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Resume {
    /// The vCPU registers are the user's (KVM-PVM syscall exits, interrupted user code).
    Direct,
    /// The stub's `sysretq` returns: user rip and rflags are in rcx and r11.
    Sysret,
    /// The stub's `iretq` returns through the frame at this guest address (rip, cs, rflags,
    /// rsp, ss); the other registers are the user's.
    Iret(u64),
}

/// The guest's signal state (one thread's mask and alternate stack, the process's actions
/// and pending queue).
pub(super) struct Signals {
    /// `struct kernel_sigaction` per signal: handler, flags, restorer, mask.
    pub(super) actions: [[u8; 32]; 65],
    pub(super) mask: u64,
    /// Pending signals (bit `sig - 1`); their `siginfo_t`s are in `queue`, oldest first
    /// (a standard signal at most once, real-time ones queued).
    pub(super) pending: u64,
    pub(super) queue: VecDeque<[u8; 128]>,
    /// Signals pending for this thread alone (tgkill, its faults, its SIGPIPE), and theirs.
    pub(super) tpending: u64,
    pub(super) tqueue: VecDeque<[u8; 128]>,
    /// Process signals this thread leaves to the first one, which takes those it does not
    /// block (Linux's `complete_signal` prefers the thread group leader).
    pub(super) defer: u64,
    pub(super) alt: AltStack,
    /// rt_sigsuspend's caller mask, restored once a handler has run.
    pub(super) saved_mask: Option<u64>,
    /// The last fault's error code, trap number and address (sigcontext's err, trapno, cr2).
    pub(super) trap: [u64; 3],
}

impl Signals {
    pub(super) fn new() -> Self {
        Signals {
            actions: [[0; 32]; 65],
            mask: 0,
            pending: 0,
            queue: VecDeque::new(),
            tpending: 0,
            tqueue: VecDeque::new(),
            defer: 0,
            alt: AltStack::default(),
            saved_mask: None,
            trap: [0; 3],
        }
    }
    fn word(&self, sig: i32, i: usize) -> u64 {
        u64::from_le_bytes(
            self.actions[sig as usize][8 * i..8 * i + 8]
                .try_into()
                .expect("8 bytes"),
        )
    }
    pub(super) fn handler(&self, sig: usize) -> u64 {
        self.word(sig as i32, 0)
    }
    fn flags(&self, sig: i32) -> u64 {
        self.word(sig, 1)
    }
    /// Whether a signal arriving now would be discarded: its action ignores it and it is not
    /// blocked (a blocked one stays pending: its action may change).
    pub(super) fn ignored(&self, sig: i32) -> bool {
        self.mask & bit(sig) == 0 && self.action_ignores(sig)
    }

    /// Whether the signal's action is to ignore it: SIG_IGN, or a default action of ignore or
    /// continue.
    pub(super) fn action_ignores(&self, sig: i32) -> bool {
        let h = self.handler(sig as usize);
        h == SIG_IGN || (h == 0 && matches!(default_action(sig), Default::Ign | Default::Cont))
    }

    /// Add a signal to the pending set (Linux's `send_signal`): discarded when ignored, and a
    /// standard signal already pending is not queued twice.
    pub(super) fn post(&mut self, info: [u8; 128]) {
        if self.wanted(&info) {
            enqueue(&mut self.pending, &mut self.queue, info);
        }
    }

    /// Like [`Signals::post`], for the current thread alone (tgkill(2), a fault, SIGPIPE).
    pub(super) fn post_thread(&mut self, info: [u8; 128]) {
        if self.wanted(&info) {
            enqueue(&mut self.tpending, &mut self.tqueue, info);
        }
    }

    /// Whether a signal arriving now is kept (a valid number its action does not discard).
    fn wanted(&self, info: &[u8; 128]) -> bool {
        let sig = i32::from_le_bytes(info[..4].try_into().expect("4"));
        (1..=64).contains(&sig) && !self.ignored(sig)
    }

    /// Signals pending for the current thread: its own and the process's.
    pub(super) fn all_pending(&self) -> u64 {
        self.pending | self.tpending
    }

    /// Take the oldest pending instance of `sig` (signalfd(2) reads it).
    pub(super) fn take(&mut self, sig: i32) -> [u8; 128] {
        self.dequeue(sig)
    }

    /// Take the oldest instance of `sig` from the pending queues (the thread's own first, as
    /// Linux's `dequeue_signal`).
    fn dequeue(&mut self, sig: i32) -> [u8; 128] {
        let signo = |b: &[u8; 128]| i32::from_le_bytes(b[..4].try_into().expect("4"));
        if self.tpending & bit(sig) != 0 {
            if let Some(p) = self.tqueue.iter().position(|b| signo(b) == sig) {
                let info = self.tqueue.remove(p).expect("found");
                if !self.tqueue.iter().any(|b| signo(b) == sig) {
                    self.tpending &= !bit(sig);
                }
                return info;
            }
            self.tpending &= !bit(sig);
        }
        let pos = self.queue.iter().position(|b| signo(b) == sig);
        let info = pos
            .and_then(|p| self.queue.remove(p))
            .unwrap_or_else(|| info_basic(sig, SI_KERNEL));
        if !self.queue.iter().any(|b| signo(b) == sig) {
            self.pending &= !bit(sig);
        }
        info
    }

    /// The lowest pending unblocked signal whose action does something (signals whose
    /// action is to ignore them are dropped on the way).
    fn next(&mut self) -> Option<i32> {
        loop {
            let ready = ((self.pending & !self.defer) | self.tpending) & !self.mask;
            if ready == 0 {
                return None;
            }
            let sig = ready.trailing_zeros() as i32 + 1;
            if self.action_ignores(sig) {
                self.dequeue(sig);
                continue;
            }
            return Some(sig);
        }
    }

    /// execve(2): handlers go back to SIG_DFL (ignored signals stay ignored); the mask and
    /// pending signals stay; no alternate stack.
    pub(super) fn exec(&mut self) {
        for sig in 1..65 {
            if self.handler(sig) != SIG_IGN {
                self.actions[sig] = [0; 32];
                self.mirror(sig as i32);
            }
        }
        self.alt = AltStack::default();
        self.saved_mask = None;
    }

    /// Make the host act on every signal as the guest's actions say where the kernel itself
    /// decides (see `pause::mirror`).
    pub(super) fn mirror_all(&self) {
        for sig in 1..65 {
            self.mirror(sig);
        }
    }

    /// See [`Signals::mirror_all`], for one signal.
    pub(super) fn mirror(&self, sig: i32) {
        let h = self.handler(sig as usize);
        super::pause::mirror(sig, h == SIG_IGN, h == 0, self.flags(sig));
    }

    /// Take the dispositions and mask `mosvm run` inherited (ignored signals stay ignored
    /// across execve, and so does the mask).
    pub(super) fn inherit(&mut self) {
        let ign = super::pause::INHERITED_IGN.load(Ordering::SeqCst);
        for sig in 1..65 {
            if ign & bit(sig) != 0 {
                self.actions[sig as usize] = [0; 32];
                self.actions[sig as usize][..8].copy_from_slice(&SIG_IGN.to_le_bytes());
                self.mirror(sig);
            }
        }
        self.mask = super::pause::INHERITED_MASK.load(Ordering::SeqCst) & !UNBLOCKABLE;
    }

    /// Drop the queued signals `which` picks (a deleted timer's).
    pub(super) fn drop_queued(&mut self, which: impl Fn(&[u8; 128]) -> bool) {
        let signo = |b: &[u8; 128]| i32::from_le_bytes(b[..4].try_into().expect("4"));
        self.queue.retain(|b| !which(b));
        let mut left = 0u64;
        for b in &self.queue {
            left |= bit(signo(b));
        }
        self.pending &= left;
    }

    /// Drop pending instances of a signal (its action became "ignore").
    pub(super) fn discard(&mut self, sig: i32) {
        while self.all_pending() & bit(sig) != 0 {
            self.dequeue(sig);
        }
    }
}

/// Queue `info` in a pending set and its queue: a standard signal already pending is not
/// queued twice, real-time ones are.
pub(super) fn enqueue(pending: &mut u64, queue: &mut VecDeque<[u8; 128]>, info: [u8; 128]) {
    let sig = i32::from_le_bytes(info[..4].try_into().expect("4"));
    if sig < 32 && *pending & bit(sig) != 0 {
        return;
    }
    *pending |= bit(sig);
    queue.push_back(info);
}

/// A `siginfo_t` with only signo and code.
fn info_basic(sig: i32, code: i32) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[..4].copy_from_slice(&sig.to_le_bytes());
    b[8..12].copy_from_slice(&code.to_le_bytes());
    b
}

/// A `siginfo_t` for a signal sent by process `pid` of user `uid` (kill(2), tgkill(2)).
fn info_sender(sig: i32, code: i32, pid: i64, uid: u32) -> [u8; 128] {
    let mut b = info_basic(sig, code);
    b[16..20].copy_from_slice(&(pid as i32).to_le_bytes());
    b[20..24].copy_from_slice(&uid.to_le_bytes());
    b
}

/// A `siginfo_t` for a fault at `addr`.
fn info_fault(sig: i32, code: i32, addr: u64) -> [u8; 128] {
    let mut b = info_basic(sig, code);
    b[16..24].copy_from_slice(&addr.to_le_bytes());
    b
}

fn own_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// How long a local wait sleeps between looks at a pause request.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Why a wait for a signal ended.
pub(super) enum Woken {
    /// A signal the caller waits for is pending.
    Signal,
    /// The deadline passed.
    Timeout,
    /// The guest is about to be paused (to move): the call is restarted after.
    Pause,
    /// Nothing yet, and the process has other threads: wait without its lock (see
    /// [`Vm::redo`]) and handle the call again.
    Later,
}

impl Vm {
    /// Take the signals the host gave `mosvm run` into the guest's pending set.
    pub(super) fn take_host(&mut self) {
        for (sig, mut info) in take_host_signals() {
            info[..4].copy_from_slice(&sig.to_le_bytes());
            let code = i32::from_le_bytes(info[8..12].try_into().expect("4"));
            if code == super::timers::SI_TIMER {
                let host = i32::from_le_bytes(info[16..20].try_into().expect("4"));
                if let Some(g) = self.guest_timer_id(host) {
                    info[16..20].copy_from_slice(&g.to_le_bytes());
                }
                // A SIGEV_THREAD_ID timer's signal is for its thread alone.
                if let Some(tid) = self.timer_thread(host) {
                    if self.post_to_thread(tid, info) {
                        continue;
                    }
                }
            }
            self.sig.post(info);
        }
        if self.th.mt.is_some() {
            self.notify_threads();
        }
    }

    /// Whether a signal would be delivered (or end the guest) at the next return to it.
    pub(super) fn signal_ready(&mut self) -> bool {
        self.take_host();
        self.sig.next().is_some()
    }

    /// kill(2), tkill(2), tgkill(2): to this process, queued here; to others (or process
    /// groups), sent by the deputy from home.
    pub(super) fn kill(&mut self, pid: i64, sig: i32, code: i32) -> Result<Step, i64> {
        if code == SI_TKILL && self.has_thread(pid) {
            // tkill(2) to a thread of this process.
            if !(0..=64).contains(&sig) {
                return Err(EINVAL);
            }
            if sig != 0 {
                self.post_to_thread(pid, info_sender(sig, code, self.pid, own_uid()));
            }
            return Ok(Step::Ret(0));
        }
        if pid != self.pid {
            let nr = if code == SI_TKILL {
                libc::SYS_tkill
            } else {
                libc::SYS_kill
            };
            let r = self.call_deputy(nr, [pid as u64, sig as u64, 0, 0, 0, 0], vec![]);
            return Ok(Step::Ret(r.ret));
        }
        if !(0..=64).contains(&sig) {
            return Err(EINVAL);
        }
        if sig != 0 {
            self.sig.post(info_sender(sig, code, self.pid, own_uid()));
            if self.th.mt.is_some() {
                self.notify_threads();
            }
        }
        Ok(Step::Ret(0))
    }

    /// kill(2) with SI_USER, tgkill(2) with SI_TKILL.
    pub(super) fn kill_call(&mut self, nr: i64, a: [u64; 6]) -> Result<Step, i64> {
        match nr {
            libc::SYS_kill => self.kill(a[0] as i32 as i64, a[1] as i32, SI_USER),
            libc::SYS_tkill => self.kill(a[0] as i32 as i64, a[1] as i32, SI_TKILL),
            _ => {
                // tgkill(tgid, tid, sig): a thread of this process, or of another.
                let (tgid, tid) = (a[0] as i32 as i64, a[1] as i32 as i64);
                if tgid <= 0 || tid <= 0 {
                    return Err(EINVAL);
                }
                if tgid == self.pid && !self.has_thread(tid) {
                    return Err(super::ESRCH);
                }
                if tgid != self.pid {
                    let r = self.call_deputy(libc::SYS_tgkill, a, vec![]);
                    return Ok(Step::Ret(r.ret));
                }
                self.kill(tid, a[2] as i32, SI_TKILL)
            }
        }
    }

    /// rt_sigqueueinfo(2), rt_tgsigqueueinfo(2) to this process: a signal with the caller's
    /// `siginfo_t` (to others the deputy sends it: see `forward`).
    pub(super) fn sigqueue(&mut self, nr: i64, a: [u64; 6]) -> Result<Step, i64> {
        // rt_tgsigqueueinfo names one thread of this process (rt_sigqueueinfo the process).
        let (sig, uinfo, tid) = if nr == libc::SYS_rt_tgsigqueueinfo {
            let tid = a[1] as i32 as i64;
            if !self.has_thread(tid) {
                return Err(super::ESRCH);
            }
            (a[2] as i32, a[3], Some(tid))
        } else {
            (a[1] as i32, a[2], None)
        };
        let mut info = self.read_guest::<128>(uinfo)?;
        if !(1..=64).contains(&sig) {
            return Err(EINVAL);
        }
        info[..4].copy_from_slice(&sig.to_le_bytes());
        match tid {
            Some(t) => {
                self.post_to_thread(t, info);
            }
            None => self.sig.post(info),
        }
        Ok(Step::Ret(0))
    }

    /// Wait (at most until `deadline`) for a signal in `want` to be pending, or for any
    /// signal that would be delivered when `want` is None.
    pub(super) fn wait_signal(&mut self, want: Option<u64>, deadline: Option<Instant>) -> Woken {
        loop {
            self.take_host();
            let hit = match want {
                Some(set) => self.sig.all_pending() & set != 0 || self.sig.next().is_some(),
                None => self.sig.next().is_some(),
            };
            if hit {
                return Woken::Signal;
            }
            if self.pause.requested() {
                return Woken::Pause;
            }
            let mut slice = WAIT_SLICE;
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Woken::Timeout;
                }
                slice = slice.min(d - now);
            }
            if self.th.mt.is_some() {
                // The other threads go on: wait without the process lock, then look again.
                return Woken::Later;
            }
            let fd = WAKE.load(Ordering::SeqCst);
            if fd < 0 {
                std::thread::sleep(slice.min(Duration::from_millis(5)));
                continue;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = slice.as_millis().max(1) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let mut b = [0u8; 8];
            // SAFETY: a non-blocking read of the eventfd's counter into a local.
            unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
        }
    }

    /// pause(2): until a signal is delivered.
    pub(super) fn pause_call(&mut self) -> Result<Step, i64> {
        match self.wait_signal(None, None) {
            Woken::Pause => Err(ERESTART),
            Woken::Later => Ok(self.redo(None)),
            _ => Err(EINTR),
        }
    }

    /// rt_sigsuspend(2): wait with a temporary mask; the caller's mask comes back once the
    /// handler returns.
    pub(super) fn sigsuspend(&mut self, set: u64, size: u64) -> Result<Step, i64> {
        if size != 8 {
            return Err(EINVAL);
        }
        let new = u64::from_le_bytes(self.read_guest::<8>(set)?) & !UNBLOCKABLE;
        let old = self.cur.redo_mask.take().unwrap_or(self.sig.mask);
        self.sig.mask = new;
        match self.wait_signal(None, None) {
            Woken::Pause => {
                self.sig.mask = old;
                Err(ERESTART)
            }
            Woken::Later => {
                // Waits under its own mask (which says which signals reach this thread).
                self.cur.redo_mask = Some(old);
                Ok(self.redo(None))
            }
            _ => {
                self.sig.saved_mask = Some(old);
                Err(EINTR)
            }
        }
    }

    /// rt_sigtimedwait(2): take a signal of `set` (normally blocked) off the pending set.
    pub(super) fn sigtimedwait(&mut self, a: [u64; 6]) -> Result<Step, i64> {
        if a[3] != 8 {
            return Err(EINVAL);
        }
        let set = u64::from_le_bytes(self.read_guest::<8>(a[0])?) & !UNBLOCKABLE;
        let deadline = if a[2] != 0 {
            let ts = self.read_timeout(a[2])?;
            let s = i64::from_le_bytes(ts[..8].try_into().expect("8"));
            let ns = i64::from_le_bytes(ts[8..].try_into().expect("8"));
            if s < 0 || !(0..1_000_000_000).contains(&ns) {
                return Err(EINVAL);
            }
            Some(
                self.cur
                    .redo_until
                    .unwrap_or_else(|| Instant::now() + Duration::new(s as u64, ns as u32)),
            )
        } else {
            None
        };
        // The set's signals count as unblocked while waiting (Linux's real_blocked).
        match self.wait_signal(Some(set), deadline) {
            Woken::Pause => Err(ERESTART),
            Woken::Later => {
                self.cur.redo_until = deadline;
                self.cur.sigwait_set = set;
                Ok(self.redo(deadline))
            }
            Woken::Timeout => Err(EAGAIN),
            Woken::Signal => {
                let mine = self.sig.all_pending() & set;
                if mine == 0 {
                    return Err(EINTR);
                }
                let sig = mine.trailing_zeros() as i32 + 1;
                let info = self.sig.dequeue(sig);
                if a[1] != 0 {
                    self.write_guest(a[1], &info)?;
                }
                Ok(Step::Ret(sig as i64))
            }
        }
    }

    /// The signal mask a pselect6, ppoll, epoll_pwait or epoll_pwait2 call waits under, if
    /// it names one (EFAULT / EINVAL as those calls check it).
    pub(super) fn call_sigmask(&mut self, nr: u64, a: &[u64; 6]) -> Result<Option<u64>, i64> {
        let (ptr, size) = match nr as i64 {
            libc::SYS_pselect6 => {
                if a[5] == 0 {
                    return Ok(None);
                }
                let b = self.read_guest::<16>(a[5])?;
                (
                    u64::from_le_bytes(b[..8].try_into().expect("8")),
                    u64::from_le_bytes(b[8..].try_into().expect("8")),
                )
            }
            libc::SYS_ppoll => (a[3], a[4]),
            libc::SYS_epoll_pwait | libc::SYS_epoll_pwait2 => (a[4], a[5]),
            _ => return Ok(None),
        };
        if ptr == 0 {
            return Ok(None);
        }
        if size != 8 {
            return Err(EINVAL);
        }
        Ok(Some(
            u64::from_le_bytes(self.read_guest::<8>(ptr)?) & !UNBLOCKABLE,
        ))
    }

    /// A write's EPIPE also raises SIGPIPE (pipe(7)).
    pub(super) fn raise_sigpipe(&mut self) {
        self.sig
            .post_thread(info_sender(libc::SIGPIPE, SI_USER, self.pid, own_uid()));
    }

    /// What happens to a call the host interrupted (-EINTR): `Some(restart)` when a handler
    /// will run (restart per SA_RESTART and the call), `None` when no handler runs (the
    /// interruption was the VMM's own: the call is restarted).
    pub(super) fn interrupted(&mut self, nr: u64, a: &[u64; 6]) -> Option<bool> {
        self.take_host();
        let sig = self.sig.next()?;
        let h = self.sig.handler(sig as usize);
        if h == 0 {
            // Default action: the guest stops (the call goes on) or ends.
            return (default_action(sig) == Default::Term).then_some(false);
        }
        Some(
            self.sig.flags(sig) & SA_RESTART != 0
                && !never_restarted(nr)
                && !self.socket_with_timeout(nr, a[0]),
        )
    }

    /// A socket call on a socket with a receive (or send) timeout is never restarted after a
    /// handler (signal(7); Linux's `sock_intr_errno`).
    fn socket_with_timeout(&self, nr: u64, fd: u64) -> bool {
        let opt = match nr as i64 {
            libc::SYS_read
            | libc::SYS_readv
            | libc::SYS_recvfrom
            | libc::SYS_recvmsg
            | libc::SYS_recvmmsg
            | libc::SYS_accept
            | libc::SYS_accept4 => libc::SO_RCVTIMEO,
            libc::SYS_write
            | libc::SYS_writev
            | libc::SYS_sendto
            | libc::SYS_sendmsg
            | libc::SYS_sendmmsg
            | libc::SYS_connect => libc::SO_SNDTIMEO,
            _ => return false,
        };
        let Some(host) = self.deputy.local_fd(fd & 0xffff_ffff) else {
            return false;
        };
        let mut tv = [0i64; 2];
        let mut len = 16u32;
        // SAFETY: `tv` is a 16-byte struct timeval and `len` says so.
        let r = unsafe {
            libc::getsockopt(
                host,
                libc::SOL_SOCKET,
                opt,
                tv.as_mut_ptr().cast(),
                &mut len,
            )
        };
        r == 0 && (tv[0] != 0 || tv[1] != 0)
    }

    /// The user registers at this exit.
    fn user_regs(&mut self, how: Resume) -> kvm_regs {
        let mut r = self.vcpu.sync_regs_mut().regs;
        match how {
            Resume::Direct => {}
            Resume::Sysret => {
                r.rip = r.rcx;
                r.rflags = r.r11;
            }
            Resume::Iret(f) => {
                let m = &self.space.mem;
                r.rip = m.read_u64_va(f).unwrap_or(0);
                r.rflags = m.read_u64_va(f + 16).unwrap_or(0);
                r.rsp = m.read_u64_va(f + 24).unwrap_or(0);
            }
        }
        r
    }

    /// Resume the guest with user registers `u`.
    fn set_user_regs(&mut self, how: Resume, u: kvm_regs) {
        let regs = &mut self.vcpu.sync_regs_mut().regs;
        match how {
            Resume::Direct => *regs = u,
            Resume::Sysret => {
                let (rip, rflags) = (regs.rip, regs.rflags);
                *regs = u;
                regs.rcx = u.rip;
                regs.r11 = u.rflags;
                regs.rip = rip;
                regs.rflags = rflags;
            }
            Resume::Iret(f) => {
                let (rip, rsp, rflags) = (regs.rip, regs.rsp, regs.rflags);
                *regs = u;
                regs.rip = rip;
                regs.rsp = rsp;
                regs.rflags = rflags;
                let m = &self.space.mem;
                let _ = m.write(f, &u.rip.to_le_bytes());
                let _ = m.write(f + 16, &u.rflags.to_le_bytes());
                let _ = m.write(f + 24, &u.rsp.to_le_bytes());
            }
        }
        self.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
    }

    /// Resume at registers restored by rt_sigreturn, wherever the vCPU stopped: directly when
    /// the VMM performs syscall returns (KVM-PVM), else through an `iretq` in the stub so that
    /// rcx and r11 come back too.
    pub(super) fn resume_at(&mut self, u: kvm_regs) -> Resume {
        if self.vmm_returns == Some(true) {
            self.set_user_regs(Resume::Direct, u);
            return Resume::Direct;
        }
        let f = self.cur.exc_top - 40;
        let frame = [
            u.rip,
            guest::USER_CS as u64,
            u.rflags,
            u.rsp,
            guest::USER_SS as u64,
        ];
        for (i, w) in frame.iter().enumerate() {
            let _ = self.space.mem.write(f + 8 * i as u64, &w.to_le_bytes());
        }
        let regs = &mut self.vcpu.sync_regs_mut().regs;
        *regs = u;
        regs.rsp = f;
        // The `iretq` that ends vector 0's handler (after its 2-byte `out`).
        regs.rip = guest::exception_handler(0) + 2;
        regs.rflags = 0x2;
        self.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
        Resume::Iret(f)
    }

    /// Before the guest resumes: deliver every pending unblocked signal (Linux's
    /// `exit_to_user_mode_loop`), nesting frames; a default action that ends the process ends
    /// the guest.
    pub(super) fn deliver_signals(&mut self, how: Resume) -> Result<Option<Outcome>> {
        self.take_host();
        while let Some(sig) = self.sig.next() {
            let info = self.sig.dequeue(sig);
            if self.sig.handler(sig as usize) == 0 {
                match default_action(sig) {
                    Default::Stop if !self.deputy.is_local() => {
                        // Away: the process stops at home, where its parent sees it; the
                        // home node stops this guest host meanwhile. Back when continued.
                        let _ = self.call_deputy(
                            crate::deputy::STOP_AT_HOME as i64,
                            [sig as u64, 0, 0, 0, 0, 0],
                            vec![],
                        );
                        continue;
                    }
                    Default::Stop => {
                        // The whole VMM stops, as the process would, until SIGCONT: the host
                        // takes this stop signal's default action too (`pause::mirror`), so
                        // the parent sees it as the stop signal.
                        super::pause::mirror_stop_mask(self.sig.mask);
                        // SAFETY: signalling this process has no memory effects.
                        unsafe { libc::kill(libc::getpid(), sig) };
                        continue;
                    }
                    Default::Ign | Default::Cont => continue,
                    Default::Term => return Ok(Some(Outcome::Signaled(sig))),
                }
            }
            if let Err(why) = self.setup_frame(sig, info, how)? {
                crate::say!(
                    "mosvm: {} killed by SIGSEGV: cannot deliver {}: {why}",
                    self.program.display(),
                    signal_name(sig)
                );
                return Ok(Some(Outcome::Signaled(libc::SIGSEGV)));
            }
        }
        if let Some(m) = self.sig.saved_mask.take() {
            self.sig.mask = m;
        }
        Ok(None)
    }

    /// Build a handler frame for `sig` on the guest's stack and point the vCPU at the
    /// handler (Linux's `handle_signal` and `setup_rt_frame`). `Ok(Err)` when the frame
    /// cannot be written (Linux then kills with SIGSEGV).
    fn setup_frame(
        &mut self,
        sig: i32,
        info: [u8; 128],
        how: Resume,
    ) -> Result<Result<(), &'static str>> {
        let handler = self.sig.handler(sig as usize);
        let flags = self.sig.flags(sig);
        let restorer = self.sig.word(sig, 2);
        let samask = self.sig.word(sig, 3);
        if flags & SA_RESTORER == 0 {
            return Ok(Err("no SA_RESTORER"));
        }
        if flags & SA_RESETHAND != 0 {
            // SA_RESETHAND: the handler becomes SIG_DFL (the flags stay as they were).
            self.sig.actions[sig as usize][..8].fill(0);
            self.sig.mirror(sig);
        }
        let mut regs = self.user_regs(how);
        let xsize = self.xstate.0;
        let Some(at) = sigframe::place(regs.rsp, flags & SA_ONSTACK != 0, &self.sig.alt, xsize)
        else {
            return Ok(Err("the alternate stack is too small"));
        };
        let xsave = self.vcpu.get_xsave().context("KVM_GET_XSAVE")?;
        // SAFETY: kvm_xsave's region is 1024 plain u32s; viewing it as 4096 bytes is sound.
        let area = unsafe { std::slice::from_raw_parts(xsave.region.as_ptr() as *const u8, 4096) };
        let fp = sigframe::fpstate_image(area, xsize as usize, self.xstate.1);
        let mask = self.sig.saved_mask.take().unwrap_or(self.sig.mask);
        let frame = sigframe::build(
            &regs,
            at.fpstate,
            &FrameInput {
                restorer,
                mask,
                alt: self.sig.alt,
                cs: LINUX_USER_CS,
                ss: LINUX_USER_DS,
                err: self.sig.trap[0],
                trapno: self.sig.trap[1],
                cr2: self.sig.trap[2],
                info,
            },
        );
        if self.write_guest(at.fpstate, &fp).is_err() || self.write_guest(at.frame, &frame).is_err()
        {
            return Ok(Err("its stack cannot be written"));
        }
        if at.entering_altstack && self.sig.alt.flags & sigframe::SS_AUTODISARM != 0 {
            self.sig.alt = AltStack::default();
        }
        self.set_fpu(&init_fpu())?;
        regs.rsp = at.frame;
        regs.rip = handler;
        regs.rdi = sig as u64;
        regs.rsi = at.frame + sigframe::INFO_OFF;
        regs.rdx = at.frame + sigframe::UC_OFF;
        regs.rax = 0;
        regs.rflags &= !TF_DF_RF;
        self.set_user_regs(how, regs);
        let mut blocked = self.sig.mask | samask;
        if flags & SA_NODEFER == 0 {
            blocked |= bit(sig);
        }
        self.sig.mask = blocked & !UNBLOCKABLE;
        Ok(Ok(()))
    }

    pub(super) fn set_fpu(&mut self, area: &[u8]) -> Result<()> {
        let mut x = kvm_bindings::kvm_xsave::default();
        // SAFETY: kvm_xsave's region is 1024 plain u32s; writing it as bytes is sound.
        let dst = unsafe { std::slice::from_raw_parts_mut(x.region.as_mut_ptr() as *mut u8, 4096) };
        let n = area.len().min(4096);
        dst[..n].copy_from_slice(&area[..n]);
        // SAFETY: `x` is a complete standard-format XSAVE image for this vCPU's XCR0 (its
        // header sanitised by the callers); KVM validates it.
        unsafe { self.vcpu.set_xsave(&x) }.context("KVM_SET_XSAVE")
    }

    /// rt_sigreturn(2): back to the context the handler interrupted (registers, FPU state,
    /// mask, alternate stack), from the frame under the stack pointer.
    pub(super) fn sigreturn(&mut self) -> Result<Step> {
        let cur = self.vcpu.sync_regs_mut().regs;
        let frame = cur.rsp.wrapping_sub(8);
        let mut b = vec![0u8; sigframe::FRAME_SIZE as usize];
        if self.space.accessible(frame, b.len() as u64, false) != b.len() as u64
            || self.space.mem.read(frame, &mut b).is_err()
        {
            return Ok(self.bad_frame());
        }
        let r = sigframe::parse(&b, &cur);
        // FPU state: the full image when its magic checks out, else its FXSAVE part.
        let xsize = self.xstate.0 as usize;
        let mut area = init_fpu();
        if r.fpstate != 0 {
            let mut img = vec![0u8; xsize + 4];
            if self.space.accessible(r.fpstate, img.len() as u64, false) != img.len() as u64
                || self.space.mem.read(r.fpstate, &mut img).is_err()
            {
                return Ok(self.bad_frame());
            }
            let n = if sigframe::has_xstate(&img, xsize) {
                xsize
            } else {
                512
            };
            area[..n].copy_from_slice(&img[..n]);
            if n == 512 {
                area[512..520].copy_from_slice(&3u64.to_le_bytes());
            }
            // The header: only components this vCPU has; standard format; reserved zero.
            let bv = u64::from_le_bytes(area[512..520].try_into().expect("8")) & self.xstate.1;
            area[512..576].fill(0);
            area[512..520].copy_from_slice(&bv.to_le_bytes());
            // MXCSR: reserved bits must be 0 (Linux masks with mxcsr_feature_mask).
            let mx = u32::from_le_bytes(area[24..28].try_into().expect("4")) & 0xffff;
            area[24..28].copy_from_slice(&mx.to_le_bytes());
        }
        if self.set_fpu(&area).is_err() {
            return Ok(self.bad_frame());
        }
        self.sig.mask = r.mask & !UNBLOCKABLE;
        // restore_altstack: ignored while on the alternate stack or when invalid.
        if !self.sig.alt.on(r.regs.rsp) {
            let mode = r.alt.flags & !sigframe::SS_AUTODISARM;
            if mode == sigframe::SS_DISABLE {
                self.sig.alt = AltStack {
                    sp: 0,
                    size: 0,
                    flags: r.alt.flags,
                };
            } else if (mode == 0 || mode == sigframe::SS_ONSTACK)
                && r.alt.size >= libc::MINSIGSTKSZ as u64
            {
                self.sig.alt = AltStack {
                    flags: r.alt.flags & !sigframe::SS_ONSTACK,
                    ..r.alt
                };
            }
        }
        Ok(Step::Resume(r.regs))
    }

    fn bad_frame(&mut self) -> Step {
        crate::say!(
            "mosvm: {} killed by SIGSEGV: rt_sigreturn with a bad frame",
            self.program.display()
        );
        Step::Exit(Outcome::Signaled(libc::SIGSEGV))
    }

    /// A fault the guest caught: deliver `sig` to its handler now (Linux's
    /// `force_sig_fault`). False when it has none or blocks it: the fault then ends it.
    pub(super) fn fault_to_handler(
        &mut self,
        sig: i32,
        code: i32,
        addr: u64,
        trap: [u64; 3],
        how: Resume,
    ) -> Result<Option<Option<Outcome>>> {
        let h = self.sig.handler(sig as usize);
        if h <= SIG_IGN || self.sig.mask & bit(sig) != 0 {
            return Ok(None);
        }
        self.sig.trap = trap;
        if let Err(why) = self.setup_frame(sig, info_fault(sig, code, addr), how)? {
            crate::say!(
                "mosvm: {} killed by SIGSEGV: cannot deliver {}: {why}",
                self.program.display(),
                signal_name(sig)
            );
            return Ok(Some(Some(Outcome::Signaled(libc::SIGSEGV))));
        }
        Ok(Some(self.deliver_signals(how)?))
    }

    /// sigaltstack(2).
    pub(super) fn sigaltstack(&mut self, ss: u64, old: u64) -> Result<Step, i64> {
        let sp = self.vcpu.sync_regs_mut().regs.rsp;
        let cur = self.sig.alt;
        let old_bytes = cur.stack_t(cur.state(sp) | (cur.flags & sigframe::SS_AUTODISARM));
        if ss != 0 {
            let b = self.read_guest::<24>(ss)?;
            let new = AltStack::from_stack_t(&b);
            if cur.on(sp) {
                return Err(EPERM);
            }
            let mode = new.flags & !sigframe::SS_AUTODISARM;
            if mode != 0 && mode != sigframe::SS_DISABLE && mode != sigframe::SS_ONSTACK {
                return Err(EINVAL);
            }
            if mode == sigframe::SS_DISABLE {
                self.sig.alt = AltStack {
                    sp: 0,
                    size: 0,
                    flags: new.flags,
                };
            } else {
                if new.size < libc::MINSIGSTKSZ as u64 {
                    return Err(super::ENOMEM);
                }
                self.sig.alt = AltStack {
                    flags: new.flags & !sigframe::SS_ONSTACK,
                    ..new
                };
            }
        }
        if old != 0 {
            self.write_guest(old, &old_bytes).map_err(|_| EFAULT)?;
        }
        Ok(Step::Ret(0))
    }

    /// setitimer(2), getitimer(2), alarm(2): the VMM process's own timers, whose signals
    /// reach the guest like any other (they travel with it: see `capture`).
    pub(super) fn itimer(&mut self, nr: i64, a: [u64; 6]) -> Result<Step, i64> {
        match nr {
            libc::SYS_alarm => {
                // SAFETY: alarm has no memory arguments.
                Ok(Step::Ret(unsafe { libc::alarm(a[0] as u32) } as i64))
            }
            libc::SYS_getitimer => {
                let mut v = [0u8; 32];
                // SAFETY: `v` is 32 writable bytes, a struct itimerval.
                let r = unsafe { libc::syscall(libc::SYS_getitimer, a[0], v.as_mut_ptr()) };
                if r < 0 {
                    return Err(super::last_errno());
                }
                self.write_guest(a[1], &v)?;
                Ok(Step::Ret(0))
            }
            _ => {
                let new = if a[1] != 0 {
                    self.read_guest::<32>(a[1])?
                } else {
                    [0u8; 32]
                };
                let mut old = [0u8; 32];
                // SAFETY: `new` and `old` are 32-byte struct itimervals.
                let r = unsafe {
                    libc::syscall(libc::SYS_setitimer, a[0], new.as_ptr(), old.as_mut_ptr())
                };
                if r < 0 {
                    return Err(super::last_errno());
                }
                if a[2] != 0 {
                    self.write_guest(a[2], &old)?;
                }
                Ok(Step::Ret(0))
            }
        }
    }
}

/// Read this process's three interval timers (ITIMER_REAL, _VIRTUAL, _PROF) as
/// (interval, value) in µs, to carry them to another host.
pub(super) fn itimers_now() -> Vec<[u64; 2]> {
    (0..3)
        .map(|w| {
            let mut v = [0i64; 4];
            // SAFETY: `v` is a 32-byte struct itimerval.
            unsafe { libc::syscall(libc::SYS_getitimer, w, v.as_mut_ptr()) };
            [
                (v[0] * 1_000_000 + v[1]) as u64,
                (v[2] * 1_000_000 + v[3]) as u64,
            ]
        })
        .collect()
}

/// Set this process's interval timers to what [`itimers_now`] read (all zero: stop them).
pub(super) fn set_itimers(t: &[[u64; 2]]) {
    for (w, [iv, val]) in t.iter().enumerate().take(3) {
        let v = [
            (iv / 1_000_000) as i64,
            (iv % 1_000_000) as i64,
            (val / 1_000_000) as i64,
            (val % 1_000_000) as i64,
        ];
        // SAFETY: `v` is a 32-byte struct itimerval; the old value is not wanted.
        unsafe { libc::syscall(libc::SYS_setitimer, w, v.as_ptr(), 0usize) };
    }
}

/// The FPU state a handler starts with (Linux's `init_fpstate`): x87 control word 0x37f,
/// MXCSR 0x1f80, everything else zero, x87 and SSE marked present.
pub(super) fn init_fpu() -> Vec<u8> {
    let mut a = vec![0u8; 4096];
    a[..2].copy_from_slice(&0x37fu16.to_le_bytes());
    a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    a[512..520].copy_from_slice(&3u64.to_le_bytes());
    a
}

/// What a fault means to the program (Linux's trap handlers in arch/x86/kernel/traps.c and
/// fault.c): signal, `si_code`, `si_addr`.
pub(super) fn fault_signal(
    vector: usize,
    rip: u64,
    cr2: u64,
    mapped: bool,
    mxcsr: u32,
) -> (i32, i32, u64) {
    match vector {
        0 => (libc::SIGFPE, 1, rip),            // FPE_INTDIV
        1 | 3 => (libc::SIGTRAP, SI_KERNEL, 0), // int3: si_addr 0 (SI_KERNEL)
        6 => (libc::SIGILL, 2, rip),            // ILL_ILLOPN
        13 => (libc::SIGSEGV, SI_KERNEL, 0),
        14 => (libc::SIGSEGV, if mapped { 2 } else { 1 }, cr2), // SEGV_ACCERR / MAPERR
        16 => (libc::SIGFPE, 0, rip),
        19 => {
            // SIMD exception: the first unmasked exception flagged in MXCSR.
            let hit = mxcsr & 0x3f & !(mxcsr >> 7);
            let code = if hit & 1 != 0 {
                7 // FPE_FLTINV
            } else if hit & 4 != 0 {
                3 // FPE_FLTDIV
            } else if hit & 8 != 0 {
                4 // FPE_FLTOVF
            } else if hit & 0x12 != 0 {
                5 // FPE_FLTUND
            } else if hit & 0x20 != 0 {
                6 // FPE_FLTRES
            } else {
                0
            };
            (libc::SIGFPE, code, rip)
        }
        17 => (libc::SIGBUS, 1, cr2), // BUS_ADRALN
        11 | 12 => (libc::SIGBUS, SI_KERNEL, 0),
        _ => (libc::SIGSEGV, SI_KERNEL, 0),
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
