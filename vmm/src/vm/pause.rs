//! Stopping and waking the vCPU thread from other threads: a pause for the switch-over of a
//! migration, throttling while pre-copy catches up, the kick that interrupts KVM_RUN or a
//! blocking host call, and the signals `mosvm run` itself receives (from other processes, the
//! terminal, its children, its interval timers): each is recorded with its `siginfo_t` and
//! handed to the guest at its next exit (`vm/signal.rs`).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};
use std::time::Instant;

/// Host signals received and not yet taken by the VMM (bit `sig - 1`).
pub(super) static HOST_PENDING: AtomicU64 = AtomicU64::new(0);
/// The `siginfo_t` of the last host signal of each number, as 16 words.
static HOST_INFO: [[AtomicU64; 16]; 65] = [const { [const { AtomicU64::new(0) }; 16] }; 65];
/// The running vCPU's `kvm_run.immediate_exit`, so the handler can kick KVM_RUN.
pub(super) static IMMEDIATE_EXIT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// The thread running the guest (its kernel tid), 0 while none does.
pub(super) static GUEST_TID: AtomicI32 = AtomicI32::new(0);
/// The process has ended while some of its threads may still wait (set once, never cleared).
static ENDING: AtomicBool = AtomicBool::new(false);

/// The guest process has ended: threads still waiting for something outside (a home call
/// across the link) give up, so that the outcome can be reported.
pub(super) fn set_ending() {
    ENDING.store(true, Ordering::SeqCst);
}

/// Whether the guest process has ended (see [`set_ending`]): a call still waiting for home
/// returns at once.
pub fn process_ending() -> bool {
    ENDING.load(Ordering::SeqCst)
}
/// The host threads running the other threads of a multi-threaded guest (kernel tids; 0:
/// a free slot). Lock-free, so a host fork never leaves one held in the child.
static THREAD_TIDS: [AtomicI32; 1024] = [const { AtomicI32::new(0) }; 1024];
/// Threads that have something to take (a signal, an order to end) and are kicked until they
/// come for it (a kick that lands just before a blocking call is lost otherwise).
static WANTED: [AtomicI32; 1024] = [const { AtomicI32::new(0) }; 1024];

/// Put `tid` in a free slot of `set` (if it is not there yet); false when full.
fn slot_add(set: &[AtomicI32], tid: i32) -> bool {
    if set.iter().any(|s| s.load(Ordering::SeqCst) == tid) {
        return true;
    }
    set.iter().any(|s| {
        s.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// Take `tid` out of `set`.
fn slot_remove(set: &[AtomicI32], tid: i32) {
    for s in set {
        let _ = s.compare_exchange(tid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The tids in `set`.
fn slots(set: &[AtomicI32]) -> impl Iterator<Item = i32> + '_ {
    set.iter()
        .map(|s| s.load(Ordering::SeqCst))
        .filter(|&t| t > 0)
}

/// After a host fork, in the child: the parent's threads are not this process's.
pub(super) fn forget_threads() {
    for s in THREAD_TIDS.iter().chain(WANTED.iter()) {
        s.store(0, Ordering::SeqCst);
    }
}

thread_local! {
    /// This thread's vCPU's `kvm_run.immediate_exit` while it runs one (threads of a
    /// multi-threaded guest): a kick makes its next KVM_RUN return at once.
    static OWN_IMMEDIATE_EXIT: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    /// The VMM kicked this thread since [`take_kicked`] last looked (a signal was posted for
    /// its guest thread, or it must stop).
    static KICKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the VMM kicked the calling thread since the last call (and forget it): a thread
/// waiting for a call made on its behalf elsewhere (at home, over the link) has the call
/// interrupted, and the VMM decides, as after any interrupted call, whether a handler runs
/// or the call is made again.
pub fn take_kicked() -> bool {
    KICKED.with(|k| k.replace(false))
}

/// Publish (or, with null, withdraw) the calling thread's vCPU `immediate_exit` byte for the
/// kick handler. Withdraw it before the vCPU is dropped.
pub(super) fn set_own_immediate_exit(p: *mut u8) {
    OWN_IMMEDIATE_EXIT.with(|c| c.set(p));
}

/// A host thread running a guest thread starts (`add`) or ends: host signals for the guest
/// kick it too, so that one that can take them does.
pub(super) fn register_thread(tid: i32, add: bool) {
    if add {
        slot_add(&THREAD_TIDS, tid);
    } else {
        slot_remove(&THREAD_TIDS, tid);
    }
}

/// Kick thread `tid` until it calls [`kicked`].
pub(super) fn want(tid: i32) {
    slot_add(&WANTED, tid);
    kick_tid(tid);
    wake_watchdog();
}

/// The calling thread came for what [`want`] kicked it for.
pub(super) fn kicked(tid: i32) {
    slot_remove(&WANTED, tid);
}

/// Interrupt thread `tid` of this process with the kick signal.
pub(super) fn kick_tid(tid: i32) {
    // SAFETY: tgkill of a thread of this process with the kick signal, whose handler only
    // marks the thread's vCPU to exit: it interrupts KVM_RUN or a blocking call.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, KICK_SIGNAL);
    }
}

fn wake_watchdog() {
    let fd = WATCHDOG.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: a write of a local to the watchdog's non-blocking pipe.
        unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    }
}
/// Write end of the pipe that wakes the signal watchdog (-1 before it starts).
pub(super) static WATCHDOG: AtomicI32 = AtomicI32::new(-1);
/// An eventfd the handler signals: local waits (pause, sigsuspend, sleeps) poll it.
pub(super) static WAKE: AtomicI32 = AtomicI32::new(-1);

/// Whether host signal `sig` is taken for the guest: all but SIGKILL and SIGSTOP (which
/// cannot be) and 33, which the C library under the VMM keeps for itself (set*id across
/// threads); 32 (its thread cancellation, which the VMM never uses) is the guest's, as glibc
/// programs' timers with SIGEV_THREAD signal it. The fault signals (see [`FAULTS`]) and SIGPIPE
/// are the guest's only when another process sends them: the VMM's own faults still kill it,
/// and the guest gets its own SIGPIPE from a write's EPIPE.
pub fn caught(sig: i32) -> bool {
    (1..=64).contains(&sig) && !matches!(sig, libc::SIGKILL | libc::SIGSTOP | 33)
}

/// Signals the CPU raises for a fault.
pub(super) const FAULTS: [i32; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// A guest host: SIGCONT from its parent (the node service, continuing it after a stop at
/// the guest's home) is the host's business, not a signal for the guest.
static PARENT_CONT_IS_OURS: AtomicBool = AtomicBool::new(false);

/// In a guest host: take SIGCONT sent by the parent process as the host's own (the guest's
/// SIGCONT comes from its home over the link).
pub fn parent_sigcont_is_the_hosts() {
    PARENT_CONT_IS_OURS.store(true, Ordering::Relaxed);
}

/// A guest host: its host children are the VMMs of the guest's children forked away from
/// home, whose SIGCHLD the guest gets from home (where their deputies are its deputy's
/// children), not from here.
static CHILDREN_ARE_OURS: AtomicBool = AtomicBool::new(false);

/// In a guest host: SIGCHLD from the host's own children is not the guest's. It is ignored on
/// the host (the kernel reaps them), whatever the guest's SIGCHLD action.
pub fn host_children_are_the_hosts() {
    CHILDREN_ARE_OURS.store(true, Ordering::SeqCst);
    mirror_sigchld(true, 0);
}

pub(super) extern "C" fn on_signal(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    if !(1..=64).contains(&sig) {
        return;
    }
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; getpid is
        // async-signal-safe.
        let (code, pid) = unsafe { ((*info).si_code, (*info).si_pid()) };
        // SAFETY: as above.
        let own = pid == unsafe { libc::getpid() };
        if sig == KICK_SIGNAL && code == libc::SI_TKILL && own {
            // The VMM's own kick: it only interrupts (and makes this thread's next KVM_RUN,
            // if it was about to enter one, return at once).
            KICKED.with(|k| k.set(true));
            let p = OWN_IMMEDIATE_EXIT.with(|c| c.get());
            if !p.is_null() {
                // SAFETY: as in `record`: the byte stays mapped while published.
                unsafe { p.write_volatile(1) };
            }
            return;
        }
        if FAULTS.contains(&sig) && code > 0 {
            // A fault of the VMM itself: die of it (the instruction faults again).
            // SAFETY: signal(2) is async-signal-safe.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
            return;
        }
        if sig == libc::SIGPIPE && code == libc::SI_USER && own {
            return; // a write of the VMM's to a closed pipe: EPIPE says it
        }
        let from_parent = || {
            // SAFETY: getppid(2) is async-signal-safe and has no memory effects.
            pid == unsafe { libc::getppid() }
        };
        if sig == libc::SIGCONT
            && code == libc::SI_USER
            && PARENT_CONT_IS_OURS.load(Ordering::Relaxed)
            && from_parent()
        {
            return; // the node continuing a guest host it stopped: not the guest's signal
        }
    }
    if !info.is_null() {
        // SAFETY: a siginfo_t is 128 bytes, readable for the duration of the handler.
        let words = unsafe { std::slice::from_raw_parts(info as *const u64, 16) };
        for (d, w) in HOST_INFO[sig as usize].iter().zip(words) {
            d.store(*w, Ordering::SeqCst);
        }
    }
    record(sig);
}

/// Mark host signal `sig` pending and wake whoever waits for it.
fn record(sig: i32) {
    HOST_PENDING.fetch_or(1 << (sig - 1), Ordering::SeqCst);
    for fd in [WATCHDOG.load(Ordering::SeqCst), WAKE.load(Ordering::SeqCst)] {
        if fd >= 0 {
            let one = 1u64.to_ne_bytes();
            // SAFETY: write(2) from a local is async-signal-safe; both descriptors are
            // non-blocking and stay open for the life of the process.
            unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
        }
    }
    for p in [
        IMMEDIATE_EXIT.load(Ordering::SeqCst),
        OWN_IMMEDIATE_EXIT.with(|c| c.get()),
    ] {
        if !p.is_null() {
            // SAFETY: `p` points at the immediate_exit byte of a vCPU's kvm_run mapping,
            // which stays mapped while it is published here (withdrawn before the vCPU is
            // dropped); a volatile byte store is async-signal-safe.
            unsafe { p.write_volatile(1) };
        }
    }
}

/// Take the host signals received so far: (number, its `siginfo_t`), lowest first.
pub fn take_host_signals() -> Vec<(i32, [u8; 128])> {
    if HOST_PENDING.load(Ordering::SeqCst) == 0 {
        return Vec::new();
    }
    let bits = HOST_PENDING.swap(0, Ordering::SeqCst);
    (1..=64)
        .filter(|s| bits & 1 << (s - 1) != 0)
        .map(|s| {
            let mut b = [0u8; 128];
            for (i, w) in HOST_INFO[s as usize].iter().enumerate() {
                b[8 * i..8 * i + 8].copy_from_slice(&w.load(Ordering::SeqCst).to_le_bytes());
            }
            (s, b)
        })
        .collect()
}

/// Whether host signals wait to be taken.
pub fn host_signals_pending() -> bool {
    HOST_PENDING.load(Ordering::SeqCst) != 0
}

/// While host signals wait to be taken, interrupt the guest's thread every 20 ms: a signal
/// delivered to another thread, or just before the guest's thread entered a blocking host
/// call (a read of a pipe at home), would otherwise leave that call blocked.
pub(super) fn start_watchdog() {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills the two descriptors it is given.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return;
    }
    // SAFETY: eventfd has no memory arguments.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    WAKE.store(wake, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("mosvm-signals".into())
        .spawn(move || {
            // A clean mask first (a thread starts with its creator's, which may block all),
            // then the guest's signals go to the guest's thread.
            // SAFETY: setting this thread's mask from an empty set touches only local state.
            unsafe {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            }
            block_guest_signals();
            install_kick_handler();
            loop {
                let mut pfd = libc::pollfd {
                    fd: p[0],
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, -1) };
                let mut b = [0u8; 64];
                // SAFETY: a non-blocking read into a local buffer.
                while unsafe { libc::read(p[0], b.as_mut_ptr().cast(), b.len()) } > 0 {}
                loop {
                    let mut tids: Vec<i32> = slots(&WANTED).collect();
                    if host_signals_pending() {
                        tids.push(GUEST_TID.load(Ordering::SeqCst));
                        tids.extend(slots(&THREAD_TIDS));
                    }
                    if tids.is_empty() {
                        break;
                    }
                    for tid in tids.into_iter().filter(|&t| t > 0) {
                        kick_tid(tid);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        });
    if spawned.is_ok() {
        WATCHDOG.store(p[1], Ordering::SeqCst);
    }
}

/// Take every signal [`caught`] for the guest, without SA_RESTART (so a host call blocked on
/// the guest's behalf returns EINTR and the VMM decides, as Linux would, whether the guest's
/// call is restarted). Idempotent.
pub fn install_signal_handlers() {
    static INHERITED: std::sync::Once = std::sync::Once::new();
    INHERITED.call_once(|| {
        // What `mosvm run` inherited is the program's: ignored signals stay ignored across
        // exec, and so does the signal mask (signal(7), execve(2)).
        let mut ign = 0u64;
        for sig in (1..=64).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP) {
            // (Rust itself ignores SIGPIPE before main: what came before is recorded.)
            let ignored = if sig == libc::SIGPIPE {
                crate::startup::sigpipe_was_ignored()
            } else {
                crate::startup::disposition(sig) == Some(libc::SIG_IGN)
            };
            if ignored {
                ign |= 1 << (sig - 1);
            }
        }
        INHERITED_IGN.store(ign, Ordering::SeqCst);
        let mut mask = 0u64;
        // SAFETY: reading this thread's mask into a zeroed sigset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            for sig in 1..=64 {
                if libc::sigismember(&set, sig) == 1 {
                    mask |= 1 << (sig - 1);
                }
            }
        }
        INHERITED_MASK.store(mask, Ordering::SeqCst);
    });
    if WATCHDOG.load(Ordering::SeqCst) < 0 {
        start_watchdog();
    }
    for sig in (1..=64).filter(|&s| caught(s)) {
        if sig == libc::SIGCHLD && CHILDREN_ARE_OURS.load(Ordering::SeqCst) {
            mirror_sigchld(true, 0);
        } else {
            set_handler(sig);
        }
    }
    unblock_guest_signals();
}

/// The guest's mask is the VMM's business: the host lets every signal taken for the guest in
/// on the calling thread.
pub(super) fn unblock_guest_signals() {
    // SAFETY: building a signal set and changing this thread's mask touch only local state.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in (1..=64).filter(|&s| caught(s)) {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    HOST_STOP_MASK.store(0, Ordering::SeqCst);
}

/// Signals `mosvm run` found ignored when it started (bit `sig - 1`).
pub(super) static INHERITED_IGN: AtomicU64 = AtomicU64::new(0);
/// The signal mask `mosvm run` started with.
pub(super) static INHERITED_MASK: AtomicU64 = AtomicU64::new(0);
/// The job-control stop signals the guest's thread blocks, as blocked on the host thread.
static HOST_STOP_MASK: AtomicU64 = AtomicU64::new(0);

/// SIGTSTP, SIGTTIN, SIGTTOU.
const STOP_SIGNALS: [i32; 3] = [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];

/// Make the host act on signal `sig` as the guest's action says where the kernel itself
/// decides: an ignored signal is ignored on the host too (so a background process's terminal
/// calls go through when it ignores SIGTTOU, and nohup's SIGHUP stays away); a job-control
/// stop signal left at its default stops the host process itself (so its parent sees the
/// right stop signal); SIGCHLD's flags hold for the host children. Everything else is taken
/// for the guest.
pub(super) fn mirror(sig: i32, ignored: bool, default: bool, flags: u64) {
    if !caught(sig) || FAULTS.contains(&sig) || sig == libc::SIGPIPE {
        return;
    }
    if sig == KICK_SIGNAL {
        // Kicks must keep working: the VMM drops what the guest ignores.
        set_handler(sig);
        return;
    }
    if sig == libc::SIGCHLD {
        mirror_sigchld(ignored, flags);
        return;
    }
    let dfl = default && STOP_SIGNALS.contains(&sig);
    if ignored || dfl {
        // SAFETY: setting SIG_IGN or SIG_DFL for a signal other than the VMM's own faults.
        unsafe {
            libc::signal(
                sig,
                if ignored {
                    libc::SIG_IGN
                } else {
                    libc::SIG_DFL
                },
            )
        };
    } else {
        set_handler(sig);
    }
}

/// Block on the host thread the job-control stop signals the guest blocks (the kernel checks
/// them when a background process uses its terminal, and stops it for them).
pub(super) fn mirror_stop_mask(guest_mask: u64) {
    let want: u64 = STOP_SIGNALS
        .iter()
        .map(|&s| 1u64 << (s - 1))
        .filter(|b| guest_mask & b != 0)
        .sum();
    // Called after every syscall: a plain load when nothing changed.
    if HOST_STOP_MASK.load(Ordering::Relaxed) == want {
        return;
    }
    HOST_STOP_MASK.store(want, Ordering::SeqCst);
    // SAFETY: building signal sets and changing this thread's mask touch only local state.
    unsafe {
        let (mut block, mut unblock): (libc::sigset_t, libc::sigset_t) =
            (std::mem::zeroed(), std::mem::zeroed());
        libc::sigemptyset(&mut block);
        libc::sigemptyset(&mut unblock);
        for s in STOP_SIGNALS {
            if want & 1 << (s - 1) != 0 {
                libc::sigaddset(&mut block, s);
            } else {
                libc::sigaddset(&mut unblock, s);
            }
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, std::ptr::null_mut());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
    }
}

fn set_handler(sig: i32) {
    if sig == 32 {
        set_handler_raw(sig);
        return;
    }
    // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler and empty mask is a valid
    // argument; the handler only does async-signal-safe stores and writes.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// [`set_handler`] for a signal the C library's `sigaction` refuses (32): the raw call, with
/// the C library's own signal-return trampoline (read back from the kick signal's action,
/// which `sigaction` installed).
fn set_handler_raw(sig: i32) {
    install_kick_handler();
    // SAFETY: reading the kick signal's action into a zeroed sigaction.
    let restorer = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(KICK_SIGNAL, std::ptr::null(), &mut old);
        old.sa_restorer
    };
    let Some(restorer) = restorer else { return };
    const SA_RESTORER: u64 = 0x0400_0000;
    // struct kernel_sigaction: handler, flags, restorer, mask.
    let act: [u64; 4] = [
        on_signal as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize
            as u64,
        libc::SA_SIGINFO as u64 | SA_RESTORER,
        restorer as usize as u64,
        0,
    ];
    // SAFETY: a complete struct kernel_sigaction whose handler only does async-signal-safe
    // work and whose restorer is the C library's rt_sigreturn trampoline.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            act.as_ptr(),
            std::ptr::null_mut::<u64>(),
            8,
        )
    };
}

/// Mirror the guest's SIGCHLD action on the host, where its children are: ignored (children
/// are reaped at once), SA_NOCLDWAIT, SA_NOCLDSTOP; otherwise taken for the guest.
pub(super) fn mirror_sigchld(ignored: bool, flags: u64) {
    let ignored = ignored || CHILDREN_ARE_OURS.load(Ordering::SeqCst);
    // SAFETY: a zeroed sigaction with SIG_IGN or the guest-signal handler and an empty mask is
    // a valid argument.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        libc::sigemptyset(&mut sa.sa_mask);
        if ignored {
            sa.sa_sigaction = libc::SIG_IGN;
        } else {
            sa.sa_sigaction = on_signal
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            sa.sa_flags =
                libc::SA_SIGINFO | (flags as i32 & (libc::SA_NOCLDWAIT | libc::SA_NOCLDSTOP));
        }
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
    }
}

/// Block every signal this thread may block; returns the mask to give back to
/// [`restore_mask`].
pub fn block_all_signals() -> libc::sigset_t {
    // SAFETY: filling signal sets and changing this thread's mask touch only local state.
    unsafe {
        let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
            (std::mem::zeroed(), std::mem::zeroed());
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

/// Give this thread back the mask [`block_all_signals`] returned.
pub fn restore_mask(old: &libc::sigset_t) {
    // SAFETY: `old` is a signal set pthread_sigmask filled in.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// Take the guest's signals on this thread too (what [`block_guest_signals`] blocks): a
/// thread at home standing for a guest thread away takes the signals sent to it.
pub fn take_guest_signals_here() {
    guest_signals_mask(libc::SIG_UNBLOCK);
}

/// Block or unblock (`how`) in the calling thread the signals taken for the guest, kicks and
/// the VMM's own faults aside.
fn guest_signals_mask(how: libc::c_int) {
    // SAFETY: building a signal set and changing this thread's mask touch only local state.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in (1..=64).filter(|&s| caught(s) && s != KICK_SIGNAL && !FAULTS.contains(&s)) {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Block every signal taken for the guest in the calling thread, so that they reach the
/// thread running the guest (where they interrupt KVM_RUN or a blocking call).
pub fn block_guest_signals() {
    guest_signals_mask(libc::SIG_BLOCK);
}

/// End `mosvm run` the way the guest ended: killed by `sig` (without a core file: the VMM's
/// memory is not the guest's), so its parent sees the same wait status as natively.
pub fn die_by(sig: i32) -> ! {
    // SAFETY: resetting a disposition, unblocking one signal, setting RLIMIT_CORE and
    // signalling this process touch only local state.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
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

    /// Deliver a signal to the guest as if `mosvm run` had received it from another process
    /// (a signal sent to the process at home, passed on by the link). SIGKILL ends it at once.
    pub fn deliver(&self, sig: i32) {
        if !(1..=64).contains(&sig) {
            return;
        }
        let mut info = [0u64; 16];
        info[0] = sig as u64; // si_signo; si_errno 0, si_code SI_USER, si_pid 0
        for (d, w) in HOST_INFO[sig as usize].iter().zip(info) {
            d.store(w, Ordering::SeqCst);
        }
        record(sig);
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
                    // The other threads of a multi-threaded guest too.
                    for t in slots(&THREAD_TIDS) {
                        kick_tid(t);
                    }
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

/// Install the handler of the signal that kicks a thread out of KVM_RUN or a blocking call
/// (it ignores the VMM's own kicks and records anyone else's signal). Idempotent.
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        set_handler(KICK_SIGNAL);
    });
}
