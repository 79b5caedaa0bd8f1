//! Threads: clone(2) with CLONE_THREAD. Each guest thread is a vCPU of the process's VM, run
//! by a host thread of its own whose kernel tid is the guest thread's tid, so the host's futex
//! (priority inheritance included), tgkill from other processes and the guest agree on it.
//!
//! The process (the [`Vm`]: address space, deputy, signal actions, timers...) is shared. A
//! thread takes the process lock ([`Shared`]) to handle each exit of its vCPU, with its own
//! state swapped in ([`ThreadState`]: vCPU, tid, signal mask, alternate stack, signals pending
//! for it alone, clear_child_tid, robust list), and lets go of the lock while its guest code
//! runs and while a call of its blocks ([`Op`]: the host call of a home call, a futex wait, a
//! sleep or a wait for a signal), so that the other threads go on meanwhile.
//!
//! The first thread is the host's main thread (tid = pid); when the last other thread is gone
//! the process runs single-threaded again, without the lock. A process migrates with all its
//! threads (`travel`); once it has moved, a thread's guest tid and its host thread's differ
//! (`Current::host` holds the latter, for kicks and SIGEV_THREAD_ID timers), and home holds
//! the guest tid meanwhile (`deputy::pseudo`), as it does for a thread started away.
//!
//! Parts: `create` (clone with CLONE_THREAD), `ops` (blocking steps and vCPU exits), `futex` (the host's futex, robust lists),
//! `delegate` (fork and execve by a thread other than the first), `travel` (migration).

use super::pause::{self, KICK_SIGNAL};
use super::{Outcome, Step, Vm, EAGAIN, EINTR, EINVAL};
use crate::sigframe::AltStack;
use anyhow::Result;
use kvm_ioctls::VcpuFd;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod create;
mod delegate;
mod futex;
mod ops;
mod travel;

pub(super) use ops::{Event, Op};

pub use travel::ThreadMig;
use travel::{park, stop_others};

/// Most threads a process may have here (clone fails with EAGAIN beyond, as at
/// RLIMIT_NPROC).
pub(super) const MAX_THREADS: usize = 1024;

const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SYSVSEM: u64 = 0x4_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
const CLONE_DETACHED: u64 = 0x40_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;

/// The vCPU of the thread whose state is in the [`Vm`] (empty while none is: the thread's
/// own host thread holds it while its guest code runs).
#[derive(Default)]
pub(super) struct VcpuSlot(pub(super) Option<VcpuFd>);

impl std::ops::Deref for VcpuSlot {
    type Target = VcpuFd;
    fn deref(&self) -> &VcpuFd {
        self.0.as_ref().expect("a thread's state is in")
    }
}

impl std::ops::DerefMut for VcpuSlot {
    fn deref_mut(&mut self) -> &mut VcpuFd {
        self.0.as_mut().expect("a thread's state is in")
    }
}

/// The process's threads as a whole (the first thread's alone: all empty).
pub(super) struct Threads {
    /// The other threads' states.
    pub(super) others: Vec<ThreadState>,
    /// What the current thread's state displaced while it is in.
    pub(super) parked: ThreadState,
    /// The process lock, once the process has had a second thread.
    pub(super) mt: Option<Arc<Shared>>,
    /// The blocking step of the current thread's call (see `Step::Block`).
    pub(super) block: Option<Op>,
    /// The current thread has exited.
    pub(super) thread_exited: bool,
    /// The first thread has exited (exit(2)) while others go on, with this status.
    pub(super) main_exited: bool,
    pub(super) leader_status: Option<i32>,
    /// vCPUs of exited threads, with their TSS and stack top, for new ones; the next KVM
    /// vCPU id.
    pub(super) spare_vcpus: Vec<(VcpuFd, u64, u64)>,
    pub(super) next_vcpu: u64,
    /// A fork or execve another thread asked the first one to make, and the vCPU state such
    /// a fork starts the child from.
    pub(super) delegated: Option<Delegated>,
    pub(super) fork_snapshot: Option<crate::snapshot::VcpuState>,
    /// The first thread took an execve caller's place after it had exited: it handles that
    /// call before it runs.
    pub(super) resume_syscall: bool,
    /// A priority-inheritance futex op was made: the host kernel knows the guest's tids as
    /// its own threads', so the process stays at home.
    pub(super) pi: bool,
}

impl Default for Threads {
    fn default() -> Self {
        Threads {
            others: Vec::new(),
            parked: ThreadState::default(),
            mt: None,
            block: None,
            thread_exited: false,
            main_exited: false,
            leader_status: None,
            spare_vcpus: Vec::new(),
            next_vcpu: 1,
            delegated: None,
            fork_snapshot: None,
            resume_syscall: false,
            pi: false,
        }
    }
}

/// A thread's own bookkeeping, kept in the [`Vm`] for the thread whose state is in.
pub(super) struct Current {
    /// Where a wait that is handled again (a thread's sleep or signal wait) ends, and the
    /// mask rt_sigsuspend replaced meanwhile.
    pub(super) redo_until: Option<Instant>,
    pub(super) redo_mask: Option<u64>,
    /// The signals a wait of the thread (sigtimedwait, a signalfd read) waits for.
    pub(super) sigwait_set: u64,
    /// The page-table root the thread's vCPU has loaded (threads only).
    pub(super) cr3_loaded: u64,
    /// The thread's vCPU's TSS and exception stack top.
    pub(super) tss: u64,
    pub(super) exc_top: u64,
    /// The kernel tid of the host thread running the thread (its guest tid at home until
    /// the process first moves; kicks go to it).
    pub(super) host: i32,
    /// A relative sleep a move stopped, which restart_syscall(2) goes on with.
    pub(super) restart: Option<super::time::SleepRestart>,
    /// A timed call a move stopped, which goes on toward its end when issued again, and
    /// the end of the running one (vm/timed.rs).
    pub(super) timed: Option<super::timed::TimedRestart>,
    pub(super) timed_now: Option<super::timed::TimedRestart>,
    /// The running call's timeout structure as it reads (its address and the time left).
    pub(super) overlay: Option<(u64, [u8; 16])>,
}

impl Default for Current {
    fn default() -> Self {
        Current {
            redo_until: None,
            redo_mask: None,
            sigwait_set: 0,
            cr3_loaded: 0,
            tss: guest::TSS_VA,
            exc_top: guest::EXC_STACK_VA + guest::EXC_STACK_SIZE,
            host: 0,
            restart: None,
            timed: None,
            timed_now: None,
            overlay: None,
        }
    }
}

/// What belongs to one thread of a process, while another thread's is in the [`Vm`].
#[derive(Default)]
pub(super) struct ThreadState {
    pub(super) tid: i64,
    mask: u64,
    saved_mask: Option<u64>,
    alt: AltStack,
    trap: [u64; 3],
    tpending: u64,
    tqueue: VecDeque<[u8; 128]>,
    clear_child_tid: u64,
    robust_list: u64,
    last_fault: Option<u64>,
    home_wait: Option<Instant>,
    cur: Current,
    /// Told to end (another thread called execve).
    zap: bool,
    /// Its vCPU may be running guest code (it is not blocked in an [`Op`]).
    in_guest: bool,
    /// Its vCPU's state, taken when it stopped for a migration (see [`Vm::stop_threads`]).
    snap: Option<crate::snapshot::VcpuState>,
}

/// A fork(2) (or clone without CLONE_THREAD) by a thread other than the first: the host fork
/// must happen on the host's first thread, the only one a host child has that can carry on as
/// the new process (its embedder's code runs there). The thread waits for the result.
pub(super) struct Delegated {
    tid: i64,
    st: Option<crate::snapshot::VcpuState>,
    what: Delegate,
    result: Option<std::result::Result<i64, i64>>,
}

/// What a thread asks the first thread to do for it.
#[derive(Clone, Copy)]
enum Delegate {
    Fork(super::process::CloneArgs),
    /// execve(2) at its point of no return: the first thread takes the caller's place (its
    /// state, with the pid as tid, as Linux's `de_thread`) and goes on with the call.
    Exec,
}

/// What [`Vm::serve_delegated`] did.
#[derive(PartialEq)]
enum Served {
    Nothing,
    /// This is the child of the fork.
    Child,
    /// The first thread took an execve caller's place: the call is handled next.
    Exec,
}

/// How long a thread waiting for a signal sleeps between looks.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How long the main thread waits for the others to stop for a migration before it gives
/// the migration up (a thread in a host call that no signal interrupts).
const STOP_LIMIT: Duration = Duration::from_secs(3);

/// The process lock and what the threads share besides the [`Vm`].
pub(super) struct Shared {
    vm: AtomicPtr<Vm>,
    book: Mutex<Book>,
    cv: Condvar,
    pause: super::PauseHandle,
}

#[derive(Default)]
struct Book {
    /// The main thread is in [`Vm::run_threads`]: the Vm may be reached through `vm`.
    open: bool,
    /// The process has ended (the outcome, or the error that ended it): nobody touches the
    /// Vm through `vm` again.
    ended: Option<std::result::Result<Outcome, String>>,
    /// A migration is attempted: the threads stop outside guest code (see [`stop_others`]).
    stop: bool,
    /// The process moved to another node (with `ended`).
    moved: bool,
}

/// How a thread's run ended.
enum End {
    /// The process ended.
    Process,
    /// This thread exited; the others go on.
    Thread,
    /// It is the only thread left (the main one): back to running without the lock.
    Single,
    /// The main thread was asked to pause (a migration is attempted).
    Pause,
    /// The main thread, which had exited, took an execve caller's place.
    Revived,
}

impl Shared {
    fn new(pause: super::PauseHandle) -> Arc<Shared> {
        Arc::new(Shared {
            vm: AtomicPtr::new(std::ptr::null_mut()),
            book: Mutex::new(Book::default()),
            cv: Condvar::new(),
            pause,
        })
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the process under its lock: None once the process has ended.
    fn with<R>(&self, f: impl FnOnce(&mut Vm, &mut Book) -> R) -> Option<R> {
        let mut b = self.book();
        while !b.open && b.ended.is_none() {
            b = self.cv.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        if b.ended.is_some() {
            return None;
        }
        // SAFETY: `vm` was published by the main thread inside `run_threads`, which keeps
        // the Vm alive and touches it only under this lock until it closes the book (under
        // the lock too); we hold the lock, so this is the only reference for its duration.
        let vm = unsafe { &mut *self.vm.load(Ordering::SeqCst) };
        Some(f(vm, &mut b))
    }
}

/// The calling host thread's kernel tid.
fn gettid() -> i64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// A vCPU handed to the host thread that will run it.
struct SendVcpu(VcpuFd);
// SAFETY: a vCPU file descriptor and its kvm_run mapping may be used from any thread; it is
// moved (not shared) to the one thread that runs it.
unsafe impl Send for SendVcpu {}

impl Vm {
    /// Exchange the current thread's state in the Vm with `t`.
    fn exchange(&mut self, t: &mut ThreadState) {
        use std::mem::swap;
        swap(&mut self.tid, &mut t.tid);
        swap(&mut self.sig.mask, &mut t.mask);
        swap(&mut self.sig.saved_mask, &mut t.saved_mask);
        swap(&mut self.sig.alt, &mut t.alt);
        swap(&mut self.sig.trap, &mut t.trap);
        swap(&mut self.sig.tpending, &mut t.tpending);
        swap(&mut self.sig.tqueue, &mut t.tqueue);
        swap(&mut self.clear_child_tid, &mut t.clear_child_tid);
        swap(&mut self.robust_list, &mut t.robust_list);
        swap(&mut self.last_fault, &mut t.last_fault);
        swap(&mut self.home_wait, &mut t.home_wait);
        swap(&mut self.cur, &mut t.cur);
    }

    /// Put thread `tid`'s state (and its vCPU, from its host thread) in. False when the
    /// thread was told to end (it is then gone).
    fn swap_in(&mut self, tid: i64, vcpu: &mut Option<VcpuFd>) -> bool {
        let Some(i) = self.th.others.iter().position(|t| t.tid == tid) else {
            return false;
        };
        let mut t = self.th.others.swap_remove(i);
        pause::kicked(t.cur.host);
        t.snap = None;
        if t.zap {
            return false;
        }
        self.exchange(&mut t);
        self.th.parked = t;
        std::mem::swap(&mut self.vcpu.0, vcpu);
        // Process signals the first thread does not block are its to take.
        self.sig.defer = match self.th.others.iter().find(|t| t.tid == self.pid && !t.zap) {
            Some(first) if self.tid != self.pid => !first.mask,
            _ => 0,
        };
        // Page-table changes other threads made meanwhile.
        self.load_root_mt();
        true
    }

    /// Take the current thread's state out again (its vCPU back to its host thread, to run
    /// guest code when `in_guest`, else blocked in an [`Op`]).
    fn swap_out(&mut self, vcpu: &mut Option<VcpuFd>, in_guest: bool) {
        self.load_root_mt();
        std::mem::swap(&mut self.vcpu.0, vcpu);
        let mut t = std::mem::take(&mut self.th.parked);
        self.exchange(&mut t);
        t.in_guest = in_guest;
        self.th.others.push(t);
    }

    /// The current thread is gone: its state goes, its vCPU waits for the next new thread
    /// (KVM cannot remove a vCPU from a VM, and each one it makes uses up an id).
    fn drop_current(&mut self) {
        if let Some(v) = self.vcpu.0.take() {
            self.th
                .spare_vcpus
                .push((v, self.cur.tss, self.cur.exc_top));
        }
        let mut t = std::mem::take(&mut self.th.parked);
        self.exchange(&mut t);
    }

    /// Load the newest page-table root into the current vCPU if it has an older one; when
    /// a change took rights away (a new root), the other threads are kicked to load it too.
    pub(super) fn load_root_mt(&mut self) {
        let fresh = self.space.mem.take_new_root().is_some();
        let want = self.space.mem.cr3();
        if self.cur.cr3_loaded != want {
            if let Ok(mut s) = self.vcpu.get_sregs() {
                s.cr3 = want;
                if self.vcpu.set_sregs(&s).is_ok() {
                    self.cur.cr3_loaded = want;
                }
            }
        }
        if fresh {
            for t in &self.th.others {
                pause::want(t.cur.host);
            }
        }
        // Retired tables are freed once no running vCPU can still walk them.
        if self
            .th
            .others
            .iter()
            .all(|t| !t.in_guest || t.cur.cr3_loaded == want)
        {
            self.space.mem.release_retired();
        }
    }

    /// Post a signal for thread `tid` of this process (tgkill(2)): false when there is no
    /// such thread.
    pub(super) fn post_to_thread(&mut self, tid: i64, info: [u8; 128]) -> bool {
        if tid == self.tid {
            self.sig.post_thread(info);
            return true;
        }
        let sig = i32::from_le_bytes(info[..4].try_into().expect("4"));
        let ignores = (1..=64).contains(&sig) && self.sig.action_ignores(sig);
        let Some(t) = self.th.others.iter_mut().find(|t| t.tid == tid && !t.zap) else {
            return false;
        };
        if !(1..=64).contains(&sig) || (ignores && t.mask & 1u64 << (sig - 1) == 0) {
            return true;
        }
        super::signal::enqueue(&mut t.tpending, &mut t.tqueue, info);
        pause::want(t.cur.host);
        true
    }

    /// A signal is pending for the process: kick the other threads that could take it.
    pub(super) fn notify_threads(&mut self) {
        let p = self.sig.pending;
        if p == 0 {
            return;
        }
        for t in &self.th.others {
            if p & (!t.mask | t.cur.sigwait_set) != 0 {
                pause::want(t.cur.host);
            }
        }
    }

    /// The robust list head of thread `tid` (another than the current one).
    pub(super) fn thread_robust_list(&self, tid: i64) -> u64 {
        self.th
            .others
            .iter()
            .find(|t| t.tid == tid)
            .map_or(0, |t| t.robust_list)
    }

    /// The process's live threads.
    pub(super) fn thread_count(&self) -> usize {
        // The calling thread's state is in; the others are listed apart.
        1 + self.th.others.iter().filter(|t| !t.zap).count()
    }

    /// Whether `tid` is a thread of this process.
    pub(super) fn has_thread(&self, tid: i64) -> bool {
        tid == self.tid || self.th.others.iter().any(|t| t.tid == tid && !t.zap)
    }

    /// Tell every other thread to end (execve(2) by this one, which waits until they have).
    pub(super) fn zap_threads(&mut self) {
        for t in &mut self.th.others {
            t.zap = true;
            pause::want(t.cur.host);
        }
    }

    /// Wait (without the lock) and handle the current call again.
    pub(super) fn redo(&mut self, until: Option<Instant>) -> Step {
        Step::Block(Op::Wait { until })
    }

    /// After an [`Op`] ran: finish the call it belongs to.
    fn finish_op(&mut self, op: Op, ret: i64) -> Result<Option<Outcome>> {
        let r = &self.vcpu.sync_regs_mut().regs;
        let (nr, a) = (r.rax, [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9]);
        match op {
            Op::Home {
                nr,
                args,
                temp_mask,
                old_mask,
                ..
            } => {
                let step = self.forward_done(nr, ret, temp_mask, old_mask);
                self.complete(nr, args, step)
            }
            // Interrupted by a kick (-EINTR): restarted unless a handler runs.
            Op::Futex { .. } => self.complete(nr, a, Step::Ret(ret)),
            Op::Wait { .. } => self.syscall(),
            // Not a call: the thread runs on.
            Op::Sleep(_) => Ok(None),
        }
    }

    /// Run the process's threads until it ends, a pause is asked for, or only the main
    /// thread is left. The main thread's state is in when called and when this returns.
    pub(super) fn run_threads(&mut self) -> Result<Option<Outcome>> {
        let sh = self.th.mt.clone().expect("threads");
        let main_alive = !self.th.main_exited;
        let tid = self.tid;
        let first = std::mem::take(&mut self.th.resume_syscall).then_some(Event::Syscall);
        let mut vcpu = None;
        if main_alive {
            self.swap_out(&mut vcpu, true);
        }
        // Threads stopped for a migration that did not happen run on.
        for t in &mut self.th.others {
            t.snap = None;
        }
        let p: *mut Vm = self;
        sh.vm.store(p, Ordering::SeqCst);
        {
            let mut b = sh.book();
            b.open = true;
            b.stop = false;
            sh.cv.notify_all();
        }
        let end = if main_alive {
            if let Some(v) = vcpu.as_mut() {
                let ie = &mut v.get_kvm_run().immediate_exit as *mut u8;
                pause::set_own_immediate_exit(ie);
            }
            let e = thread_loop(&sh, tid, &mut vcpu, true, first);
            pause::set_own_immediate_exit(std::ptr::null_mut());
            e
        } else {
            // The main thread exited: wait for the process to end, making the forks the
            // others ask for.
            loop {
                let served = sh.with(|vm, book| {
                    let s = vm.serve_delegated();
                    if s == Served::Exec {
                        // The first thread lives again, with the execve to finish.
                        vm.th.resume_syscall = true;
                    }
                    if s != Served::Nothing {
                        book.open = false;
                    }
                    s
                });
                match served {
                    None => break End::Process,
                    Some(Served::Child) => break End::Single,
                    Some(Served::Exec) => break End::Revived,
                    Some(Served::Nothing) => {}
                }
                let mut b = sh.book();
                if b.ended.is_some() {
                    break End::Process;
                }
                if sh.pause.requested() {
                    // A migration is attempted: the capture says why it cannot be made.
                    b.open = false;
                    break End::Pause;
                }
                let _ = sh.cv.wait_timeout(b, WAIT_SLICE);
            }
        };
        let ended = {
            let mut b = sh.book();
            b.open = false;
            b.ended.clone()
        };
        // From here on nothing reaches the Vm through `p`.
        match end {
            End::Process => match ended {
                Some(Ok(o)) => Ok(Some(o)),
                Some(Err(e)) => Err(anyhow::anyhow!(e)),
                None => Err(anyhow::anyhow!("threads ended without an outcome")),
            },
            End::Thread => {
                // The main thread exited; others remain.
                self.th.main_exited = true;
                Ok(None)
            }
            End::Single => {
                self.th.mt = None;
                self.space.mem.hold_retired(false);
                Ok(None)
            }
            End::Pause | End::Revived => Ok(None),
        }
    }
}

/// Start a host thread for guest thread `tid` (None: a new thread, whose tid is its host
/// thread's) with its vCPU. It reports its host tid, returned here with the sender that lets
/// it go once its state is in place (false: it ends at once). None if no thread could start.
fn spawn_thread(
    sh: Arc<Shared>,
    tid: Option<i64>,
    vcpu: VcpuFd,
) -> Option<(i64, std::sync::mpsc::SyncSender<bool>)> {
    let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel::<i64>(1);
    let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<bool>(1);
    let v = SendVcpu(vcpu);
    std::thread::Builder::new()
        .name("mosvm-thread".into())
        .spawn(move || {
            let v = v;
            let host = gettid();
            let _ = tid_tx.send(host);
            if go_rx.recv() != Ok(true) {
                return;
            }
            thread_main(sh, tid.unwrap_or(host), host as i32, v.0);
        })
        .ok()?;
    let host = tid_rx.recv().ok()?;
    Some((host, go_tx))
}

/// A thread other than the main one (guest tid `tid`, run by host thread `host`): runs until
/// it or the process ends.
fn thread_main(sh: Arc<Shared>, tid: i64, host: i32, vcpu: VcpuFd) {
    pause::unblock_guest_signals();
    pause::register_thread(host, true);
    let mut vcpu = Some(vcpu);
    if let Some(v) = vcpu.as_mut() {
        let ie = &mut v.get_kvm_run().immediate_exit as *mut u8;
        pause::set_own_immediate_exit(ie);
    }
    let end = thread_loop(&sh, tid, &mut vcpu, false, None);
    pause::set_own_immediate_exit(std::ptr::null_mut());
    pause::register_thread(host, false);
    pause::kicked(host);
    if matches!(end, End::Process) {
        // The main thread returns the outcome.
        sh.cv.notify_all();
    }
    drop(vcpu);
}

/// What a thread does after its state went out.
enum Flow {
    Run,
    Block(Op),
    End(End),
}

/// Run one thread's vCPU: exits are handled under the process lock with its state in.
fn thread_loop(
    sh: &Shared,
    tid: i64,
    vcpu: &mut Option<VcpuFd>,
    main: bool,
    mut first: Option<Event>,
) -> End {
    loop {
        if main && sh.pause.requested() {
            stop_others(sh, tid);
            let back = sh.with(|vm, book| {
                book.open = false;
                vm.swap_in(tid, vcpu)
            });
            return match back {
                Some(true) => End::Pause,
                _ => End::Process,
            };
        }
        if !main && sh.book().stop {
            if let Some(end) = park(sh, tid, vcpu) {
                return end;
            }
            continue;
        }
        let ev = match (first.take(), vcpu.as_mut()) {
            (Some(ev), _) => ev,
            (None, Some(v)) => Event::of(v.run()),
            (None, None) => return End::Thread,
        };
        let mut next: std::result::Result<Event, (Op, i64)> = Ok(ev);
        loop {
            let flow = sh.with(|vm, book| {
                if !vm.swap_in(tid, vcpu) {
                    return Flow::End(End::Thread);
                }
                let served = if main {
                    vm.serve_delegated()
                } else {
                    Served::Nothing
                };
                let r = match (served, next) {
                    (Served::Child, _) => {
                        // This is the child of a fork another thread asked for.
                        book.open = false;
                        return Flow::End(End::Single);
                    }
                    (Served::Exec, _) => vm.handle_event(Event::Syscall),
                    (_, Ok(ev)) => vm.handle_event(ev),
                    (_, Err((op, ret))) => vm.finish_op(op, ret),
                };
                let block = vm.th.block.take();
                let end = |vm: &mut Vm, book: &mut Book, r| {
                    book.ended = Some(r);
                    pause::set_ending();
                    for t in &vm.th.others {
                        pause::kick_tid(t.cur.host);
                    }
                    let main_tid = pause::GUEST_TID.load(Ordering::SeqCst);
                    if main_tid > 0 && main_tid != vm.cur.host {
                        pause::kick_tid(main_tid);
                    }
                    Flow::End(End::Process)
                };
                match r {
                    Err(e) => {
                        vm.swap_out(vcpu, false);
                        return end(vm, book, Err(format!("{e:#}")));
                    }
                    Ok(Some(o)) => {
                        vm.swap_out(vcpu, false);
                        return end(vm, book, Ok(o));
                    }
                    Ok(None) => {}
                }
                if std::mem::take(&mut vm.th.thread_exited) {
                    if main {
                        vm.th.main_exited = true;
                    }
                    vm.drop_current();
                    return Flow::End(End::Thread);
                }
                if main && ((vm.th.others.is_empty() && block.is_none()) || vm.forked) {
                    // The last other thread is gone (or this is a new process's only one):
                    // the main thread's state stays in.
                    book.open = false;
                    return Flow::End(End::Single);
                }
                vm.swap_out(vcpu, block.is_none());
                match block {
                    Some(op) => Flow::Block(op),
                    None => Flow::Run,
                }
            });
            match flow {
                None => return End::Process,
                Some(Flow::Run) => break,
                Some(Flow::Block(op)) => {
                    // A home call or futex wait that has not started when the threads are
                    // to stop is interrupted before it starts (and issued again after the
                    // move); a wait is bounded and looks at the pause itself.
                    let stopping = !matches!(op, Op::Wait { .. }) && sh.book().stop;
                    let ret = if stopping { -EINTR } else { op.run(sh) };
                    next = Err((op, ret));
                }
                Some(Flow::End(End::Single)) => {
                    return End::Single;
                }
                Some(Flow::End(e)) => {
                    if matches!(e, End::Process) {
                        sh.cv.notify_all();
                    }
                    return e;
                }
            }
        }
    }
}

/// The kick signal interrupts blocking host calls of the threads: it must never restart
/// them.
const _: () = assert!(KICK_SIGNAL == libc::SIGUSR2);
