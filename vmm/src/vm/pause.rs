//! Stopping and waking the vCPU thread from other threads: a pause for the switch-over of a
//! migration, throttling while pre-copy catches up, the kick that interrupts KVM_RUN or a
//! blocking host call, and signals sent to `mosvm run` itself (SIGINT, SIGTERM, ...), which
//! end the guest with status 128+N.

use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};
use std::time::Instant;

/// Signal received by `mosvm run` (0 = none); set by the handler.
pub(super) static PENDING: AtomicI32 = AtomicI32::new(0);
/// The running vCPU's `kvm_run.immediate_exit`, so the handler can kick KVM_RUN.
pub(super) static IMMEDIATE_EXIT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// The thread running the guest (its kernel tid), 0 while none does.
pub(super) static GUEST_TID: AtomicI32 = AtomicI32::new(0);
/// Write end of the pipe that wakes the signal watchdog (-1 before it starts).
pub(super) static WATCHDOG: AtomicI32 = AtomicI32::new(-1);

pub(super) extern "C" fn on_signal(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
    let w = WATCHDOG.load(Ordering::SeqCst);
    if w >= 0 {
        // SAFETY: write(2) of one byte from a local is async-signal-safe; the pipe stays open
        // for the life of the process.
        unsafe { libc::write(w, [1u8].as_ptr().cast(), 1) };
    }
    let p = IMMEDIATE_EXIT.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` points at the immediate_exit byte of the vCPU's kvm_run mapping, which
        // stays mapped while it is published here (cleared before the vCPU is dropped); a
        // volatile byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// Once a signal has come, interrupt the guest's thread every 20 ms until the process ends: a
/// signal delivered to another thread, or just before the guest's thread entered a blocking
/// host call (a read of a pipe at home), would otherwise leave that call blocked.
pub(super) fn start_watchdog() {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills the two descriptors it is given.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("mosvm-signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            // SAFETY: a blocking read of one byte into a local buffer.
            while unsafe { libc::read(p[0], b.as_mut_ptr().cast(), 1) } < 0 {}
            install_kick_handler();
            loop {
                let tid = GUEST_TID.load(Ordering::SeqCst);
                if tid > 0 {
                    // SAFETY: tgkill of a thread of this process with the kick signal, whose
                    // handler does nothing: it only interrupts a blocking call.
                    unsafe {
                        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, KICK_SIGNAL);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
    if spawned.is_ok() {
        WATCHDOG.store(p[1], Ordering::SeqCst);
    }
}

/// Make SIGINT, SIGTERM and SIGHUP end the guest (status 128+N) instead of killing the VMM
/// outright, and interrupt blocking host calls (no SA_RESTART).
pub fn install_signal_handlers() {
    if WATCHDOG.load(Ordering::SeqCst) < 0 {
        start_watchdog();
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: a zeroed sigaction with a valid handler and empty mask is a valid argument;
        // the handler only does async-signal-safe atomic stores.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// A signal to `mosvm run` that has not been acted on.
pub fn pending_signal() -> Option<i32> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Stops a running guest at its next exit, from any thread (to capture it for migration).
#[derive(Clone, Default)]
pub struct PauseHandle {
    pub(super) inner: std::sync::Arc<PauseInner>,
}

#[derive(Default)]
pub(super) struct PauseInner {
    pub(super) requested: std::sync::atomic::AtomicBool,
    pub(super) in_guest: std::sync::atomic::AtomicBool,
    /// The run loop is running (on `thread`).
    pub(super) running: std::sync::atomic::AtomicBool,
    pub(super) immediate_exit: AtomicPtr<u8>,
    pub(super) thread: std::sync::atomic::AtomicU64,
    /// The share of vCPU time taken away, per mille (0: none).
    pub(super) throttle: std::sync::atomic::AtomicU32,
}

/// Slice of time a throttled vCPU is stopped in: it is kicked out of the guest once a slice,
/// and sleeps the throttled share of one.
pub(super) const THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub(super) const KICK_SIGNAL: i32 = libc::SIGUSR2;

pub(super) extern "C" fn on_kick(_: libc::c_int) {}

impl PauseHandle {
    /// Ask the guest to stop. A syscall the deputy is running finishes first; guest code is
    /// interrupted at once.
    pub fn request(&self) {
        let i = &self.inner;
        i.requested.store(true, Ordering::SeqCst);
        let p = i.immediate_exit.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` is the running vCPU's kvm_run.immediate_exit, published while the
            // run loop runs and withdrawn before the vCPU can be dropped.
            unsafe { p.write_volatile(1) };
        }
        // Keep kicking until the loop has stopped: a kick also interrupts a syscall blocked
        // on the guest's behalf (which is then restarted after the move), and one sent just
        // before the call blocked would be lost.
        let me = self.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while me.requested()
                && me.inner.running.load(Ordering::SeqCst)
                && t0.elapsed() < std::time::Duration::from_secs(10)
            {
                let t = me.inner.thread.load(Ordering::SeqCst);
                if t != 0 {
                    // SAFETY: `t` is the pthread id of the thread inside the run loop (it
                    // clears `running` before leaving); the kick signal's handler does
                    // nothing, so its only effect is to interrupt KVM_RUN or a blocking call.
                    unsafe { libc::pthread_kill(t as libc::pthread_t, KICK_SIGNAL) };
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
    }

    /// Interrupt a blocking call on `thread` (a pthread id) with the kick signal.
    pub fn kick_thread(thread: u64) {
        install_kick_handler();
        // SAFETY: the caller passes the id of a live thread of this process; the kick
        // signal's handler does nothing, so its only effect is to interrupt a blocking call.
        unsafe { libc::pthread_kill(thread as libc::pthread_t, KICK_SIGNAL) };
    }

    /// Force the vCPU out of guest mode once (it re-enters at once). KVM may buffer a running
    /// vCPU's dirty-page information until its next exit: kick before reading the dirty log.
    pub fn kick(&self) {
        let i = &self.inner;
        if i.in_guest.load(Ordering::SeqCst) {
            let t = i.thread.load(Ordering::SeqCst);
            if t != 0 {
                // SAFETY: as in `request`: the thread is inside the run loop and the kick
                // signal's handler does nothing.
                unsafe { libc::pthread_kill(t as libc::pthread_t, KICK_SIGNAL) };
            }
        }
    }

    /// Deliver a signal to the guest as if `mosvm run` had received it: the run loop ends the
    /// guest with the signal's default action at once.
    pub fn deliver(&self, sig: i32) {
        on_signal(sig);
        self.kick();
    }

    /// Slow the guest: take `fraction` (0 to 0.99) of its vCPU time away, until set back to
    /// 0 (a migration whose link cannot keep up with the guest's writes).
    pub fn throttle(&self, fraction: f64) {
        let pm = (fraction.clamp(0.0, 0.99) * 1000.0) as u32;
        let was = self.inner.throttle.swap(pm, Ordering::SeqCst);
        if pm > 0 && was == 0 {
            let me = self.clone();
            std::thread::spawn(move || {
                while me.inner.throttle.load(Ordering::SeqCst) > 0 {
                    std::thread::sleep(THROTTLE_PERIOD);
                    me.kick();
                }
            });
        }
    }

    /// The throttled share of vCPU time, 0 to 0.99.
    pub fn throttled(&self) -> f64 {
        self.inner.throttle.load(Ordering::SeqCst) as f64 / 1000.0
    }

    /// Whether a pause was requested and not yet cleared.
    pub fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Let the guest run again.
    pub fn clear(&self) {
        self.inner.requested.store(false, Ordering::SeqCst);
    }
}

/// Install the (no-op) handler of the signal that kicks a thread out of KVM_RUN or a
/// blocking call. Idempotent.
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a no-op handler and empty mask is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut());
        }
    });
}
