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
//! the process runs single-threaded again, without the lock. Threads stay at home: a process
//! that has more than one does not migrate (yet).

use super::pause::{self, KICK_SIGNAL};
use super::{last_errno, Outcome, Step, Vm, EAGAIN, EFAULT, EINTR, EINVAL, ENOSYS};
use crate::deputy::{Begun, Deputy, Reply, Request};
use crate::mm::AddressSpace;
use crate::sigframe::AltStack;
use crate::table::A;
use anyhow::Result;
use kvm_ioctls::VcpuFd;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// futex(2) operations and flags.
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_REQUEUE: u64 = 3;
const FUTEX_CMP_REQUEUE: u64 = 4;
const FUTEX_WAKE_OP: u64 = 5;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_UNLOCK_PI: u64 = 7;
const FUTEX_TRYLOCK_PI: u64 = 8;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE_BITSET: u64 = 10;
const FUTEX_WAIT_REQUEUE_PI: u64 = 11;
const FUTEX_CMP_REQUEUE_PI: u64 = 12;
const FUTEX_LOCK_PI2: u64 = 13;
const FUTEX_CLOCK_REALTIME: u64 = 256;
const FUTEX_CMD_MASK: u64 = !(128 | 256);
/// Robust futex word bits (futex(2), "Robust futexes").
const FUTEX_WAITERS: u32 = 0x8000_0000;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
/// Most entries of a robust list walked at thread exit (Linux's ROBUST_LIST_LIMIT).
const ROBUST_LIST_LIMIT: usize = 2048;

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

/// A blocking step of a thread's system call, run without the process lock.
pub(super) enum Op {
    /// A home call's gathering, host call and scattering (see `forward`); the guest's mask
    /// is put back to `old_mask` after a pselect6-style call waited under its own.
    Home {
        nr: u64,
        args: [u64; 6],
        base: &'static [A],
        temp_mask: Option<u64>,
        old_mask: u64,
    },
    /// A host futex(2) call on host addresses.
    Futex {
        addr: u64,
        op: u64,
        val: u64,
        timeout: Option<libc::timespec>,
        addr2: u64,
        val3: u64,
    },
    /// Wait until kicked (or `until`, or a slice), then handle the call again: sleeps and
    /// waits for signals, which look again at what they wait for.
    Wait { until: Option<Instant> },
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

/// The address space of a thread's home call, under the process lock.
struct LockedSpace<'a>(&'a Shared);

impl crate::forward::SpaceLock for LockedSpace<'_> {
    fn with_space(&self, f: &mut dyn FnMut(&mut AddressSpace)) -> bool {
        self.0.with(|vm, _| f(&mut vm.space)).is_some()
    }
}

/// The process's deputy for a thread's home call: the host call runs without the lock.
struct LockedDeputy<'a>(&'a Shared);

impl Deputy for LockedDeputy<'_> {
    fn call(&mut self, req: Request) -> Reply {
        let ended = || Reply::err(libc::EINTR as i64);
        match self.0.with(|vm, _| vm.deputy.begin(req)) {
            Some(Begun::Done(r)) => r,
            Some(Begun::Waiting(wait)) => wait(),
            Some(Begun::Pending(mut p)) => {
                let ret = p.run();
                self.0
                    .with(|vm, _| vm.deputy.complete(p, ret))
                    .unwrap_or_else(ended)
            }
            None => ended(),
        }
    }
}

impl Op {
    /// Run the blocking part (no lock held): its result.
    fn run(&self, sh: &Shared) -> i64 {
        match self {
            Op::Home { nr, args, base, .. } => {
                let space = LockedSpace(sh);
                let mut guest = crate::forward::Guest::locked(&space);
                crate::forward::home_call(&mut guest, &mut LockedDeputy(sh), *nr, *args, base)
            }
            Op::Futex {
                addr,
                op,
                val,
                timeout,
                addr2,
                val3,
            } => {
                let ts = timeout
                    .as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec);
                let (w, w2, o, v, v3) = (*addr, *addr2, *op, *val, *val3);
                // `ts` is null or a timespec alive for the call.
                // SAFETY: `w` (and `w2` where used) are host addresses of mapped guest words
                // (`GuestMem::futex_addr`), in mappings as long-lived as the process.
                let r = unsafe { libc::syscall(libc::SYS_futex, w, o, v, ts, w2, v3) };
                if r < 0 {
                    -last_errno()
                } else {
                    r as i64
                }
            }
            Op::Wait { until } => {
                let mut slice = WAIT_SLICE;
                if let Some(u) = until {
                    slice = slice.min(u.saturating_duration_since(Instant::now()));
                }
                let ts = libc::timespec {
                    tv_sec: slice.as_secs() as i64,
                    tv_nsec: slice.subsec_nanos() as i64,
                };
                // SAFETY: ppoll with no descriptors and a valid timeout: a sleep that a kick
                // interrupts.
                unsafe { libc::ppoll(std::ptr::null_mut(), 0, &ts, std::ptr::null()) };
                0
            }
        }
    }
}

/// One exit of a vCPU, taken from KVM_RUN's result before the lock is taken.
pub(super) enum Event {
    Syscall,
    Exception(usize),
    Port(u16),
    /// KVM_RUN was interrupted (a kick).
    Kicked,
    /// The host could not supply a page (a file page past the end of its file).
    Sigbus,
    /// The guest cannot go on (triple fault, failed entry...).
    Bad(String),
    Error(String),
}

impl Event {
    pub(super) fn of(
        run: std::result::Result<kvm_ioctls::VcpuExit<'_>, kvm_ioctls::Error>,
    ) -> Event {
        use kvm_ioctls::VcpuExit;
        match run {
            Ok(VcpuExit::IoOut(port, _)) if port == guest::SYSCALL_PORT as u16 => Event::Syscall,
            Ok(VcpuExit::IoOut(port, _))
                if (guest::EXCEPTION_PORT_BASE as u16
                    ..guest::EXCEPTION_PORT_BASE as u16 + guest::EXCEPTION_VECTORS as u16)
                    .contains(&port) =>
            {
                Event::Exception((port - guest::EXCEPTION_PORT_BASE as u16) as usize)
            }
            Ok(VcpuExit::IoOut(port, _)) => Event::Port(port),
            Ok(VcpuExit::Shutdown) => Event::Bad("triple fault (shutdown)".to_string()),
            Ok(VcpuExit::Hlt) => Event::Bad("guest halted".to_string()),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Event::Bad(format!("VM entry failed ({reason:#x})"))
            }
            Ok(VcpuExit::InternalError) => Event::Bad("KVM internal error".to_string()),
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => Event::Bad(
                format!("access to unbacked guest physical address {addr:#x}"),
            ),
            Ok(other) => Event::Bad(format!("unexpected VM exit {other:?}")),
            Err(e) if e.errno() == libc::EFAULT => Event::Sigbus,
            Err(e) if e.errno() == libc::EINTR => Event::Kicked,
            Err(e) => Event::Error(format!("KVM_RUN: {e}")),
        }
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

    /// clone(2) with CLONE_THREAD: a new vCPU starting from this one's registers at this
    /// exit (rax 0, the new stack and TLS), on a host thread of its own. Returns its tid.
    pub(super) fn clone_thread(&mut self, c: super::process::CloneArgs) -> Result<Step, i64> {
        let f = c.flags;
        // clone(2): CLONE_THREAD needs CLONE_SIGHAND, which needs CLONE_VM.
        if f & CLONE_SIGHAND == 0 || f & CLONE_VM == 0 {
            return Err(EINVAL);
        }
        let known = CLONE_VM
            | CLONE_FS
            | CLONE_FILES
            | CLONE_SIGHAND
            | CLONE_THREAD
            | CLONE_SYSVSEM
            | CLONE_SETTLS
            | CLONE_PARENT_SETTID
            | CLONE_CHILD_CLEARTID
            | CLONE_DETACHED
            | CLONE_CHILD_SETTID;
        if f & !known != 0 || f & (CLONE_FS | CLONE_FILES) != CLONE_FS | CLONE_FILES {
            if self.warned.insert(0x7000_0004) {
                eprintln!(
                    "mosvm: {}: threads with flags {:#x} (their own descriptor table or \
                     filesystem context) are not supported",
                    self.program.display(),
                    f
                );
            }
            return Err(EINVAL);
        }
        if !self.deputy.is_local() {
            if self.warned.insert(0x7000_0005) {
                eprintln!(
                    "mosvm: {}: a new thread while away from home waits for the process to \
                     come home",
                    self.program.display()
                );
            }
            self.wait_for_home("threads")?;
        }
        self.home_wait = None;
        if self.th.others.len() + 1 >= MAX_THREADS {
            return Err(EAGAIN);
        }
        if self.th.mt.is_none() {
            self.load_new_root().map_err(|_| EINVAL)?;
            self.cur.cr3_loaded = self.space.mem.cr3();
            self.space.mem.hold_retired(true);
        }
        let (vcpu, tss, exc_top) = self.thread_vcpu(&c)?;
        let sh = self
            .th
            .mt
            .get_or_insert_with(|| Shared::new(self.pause.clone()))
            .clone();
        let Some((tid, go)) = spawn_thread(sh, None, vcpu) else {
            return Err(EAGAIN);
        };
        // The new thread's own state: the creator's mask, no alternate stack (clone(2)), no
        // pending signals.
        self.th.others.push(ThreadState {
            tid,
            mask: self.sig.mask,
            clear_child_tid: if f & CLONE_CHILD_CLEARTID != 0 {
                c.child_tid
            } else {
                0
            },
            cur: Current {
                cr3_loaded: self.cur.cr3_loaded,
                tss,
                exc_top,
                host: tid as i32,
                ..Default::default()
            },
            // Its vCPU runs guest code before it first comes in.
            in_guest: true,
            ..Default::default()
        });
        if f & CLONE_PARENT_SETTID != 0 {
            let _ = self.write_guest(c.parent_tid, &(tid as i32).to_le_bytes());
        }
        if f & CLONE_CHILD_SETTID != 0 {
            let _ = self.write_guest(c.child_tid, &(tid as i32).to_le_bytes());
        }
        let _ = go.send(true);
        Ok(Step::Ret(tid))
    }

    /// The new thread's vCPU (a spare one, or a new one with its own TSS and exception
    /// stack): this one's state at this exit, returning 0 from clone on the new stack (if
    /// given) with the new TLS (CLONE_SETTLS). Returns it with its TSS and stack top.
    fn thread_vcpu(&mut self, c: &super::process::CloneArgs) -> Result<(VcpuFd, u64, u64), i64> {
        let (mut vcpu, tss, top) = match self.th.spare_vcpus.pop() {
            Some(v) => v,
            None => {
                let id = self.th.next_vcpu;
                if id as usize >= MAX_THREADS {
                    return Err(EAGAIN);
                }
                let host = crate::cpu::host().map_err(|_| EAGAIN)?;
                let (tss, top) =
                    crate::cpu::thread_tss(&mut self.space.mem, id).map_err(|_| EAGAIN)?;
                let v = crate::cpu::create_vcpu_id(host, &self._vm, &self.space.mem, id, 0, 0)
                    .map_err(|_| EAGAIN)?;
                self.th.next_vcpu += 1;
                (v, tss, top)
            }
        };
        match self.setup_thread_vcpu(&mut vcpu, tss, c) {
            Ok(()) => Ok((vcpu, tss, top)),
            Err(_) => {
                self.th.spare_vcpus.push((vcpu, tss, top));
                Err(EAGAIN)
            }
        }
    }

    fn setup_thread_vcpu(
        &mut self,
        vcpu: &mut VcpuFd,
        tss: u64,
        c: &super::process::CloneArgs,
    ) -> Result<()> {
        let st = crate::snapshot::capture(&mut self.vcpu)?;
        crate::snapshot::restore(vcpu, &st)?;
        let mut s = vcpu.get_sregs()?;
        s.tr.base = tss;
        if c.flags & CLONE_SETTLS != 0 {
            s.fs.base = c.tls;
        }
        vcpu.set_sregs(&s)?;
        let mut r = vcpu.get_regs()?;
        r.rax = 0;
        if c.stack != 0 {
            r.rsp = c.stack;
        }
        if self.vmm_returns == Some(true) {
            r.rip = r.rcx;
            r.rflags = r.r11;
        }
        vcpu.set_regs(&r)?;
        Ok(())
    }

    /// exit(2) of one thread while others go on: its robust futexes are released and its
    /// clear_child_tid word zeroed and woken (set_tid_address(2)).
    pub(super) fn exit_thread(&mut self) {
        self.release_robust_list();
        if self.clear_child_tid != 0 {
            if let Some(h) = self.futex_word(self.clear_child_tid) {
                // SAFETY: `h` is the host address of a mapped, aligned guest word.
                let w = unsafe { &*(h as *const std::sync::atomic::AtomicU32) };
                w.store(0, Ordering::SeqCst);
                self.space.mem.mark_dirty_va(self.clear_child_tid);
                // SAFETY: a futex wake on that word (as the kernel does at thread exit).
                unsafe { libc::syscall(libc::SYS_futex, h, FUTEX_WAKE, 1, 0, 0, 0) };
            }
        }
        self.th.thread_exited = true;
    }

    /// The host address of the aligned, mapped guest futex word at `va`.
    fn futex_word(&mut self, va: u64) -> Option<u64> {
        if !va.is_multiple_of(4) || self.space.accessible(va, 4, false) != 4 {
            return None;
        }
        self.space.fault_in_range(va, 4);
        self.space.mem.futex_addr(va)
    }

    /// Walk the exiting thread's robust list (get_robust_list(2)): each futex it holds gets
    /// FUTEX_OWNER_DIED and one waiter woken, as Linux's `exit_robust_list`.
    fn release_robust_list(&mut self) {
        let head = self.robust_list;
        if head == 0 {
            return;
        }
        let read = |vm: &mut Vm, va: u64| vm.read_guest::<8>(va).ok().map(u64::from_le_bytes);
        let (Some(first), Some(offset), Some(pending)) = (
            read(self, head),
            read(self, head + 8),
            read(self, head + 16),
        ) else {
            return;
        };
        let mut entry = first;
        let mut n = 0;
        while entry != head && entry != 0 && n < ROBUST_LIST_LIMIT {
            let next = read(self, entry & !1);
            if entry != pending {
                self.futex_death((entry & !1).wrapping_add(offset));
            }
            let Some(next) = next else { break };
            entry = next;
            n += 1;
        }
        if pending != 0 {
            self.futex_death((pending & !1).wrapping_add(offset));
        }
    }

    /// One robust futex of an exiting thread (Linux's `handle_futex_death`).
    fn futex_death(&mut self, va: u64) {
        let Some(h) = self.futex_word(va) else { return };
        // SAFETY: `h` is the host address of a mapped, aligned guest word.
        let w = unsafe { &*(h as *const std::sync::atomic::AtomicU32) };
        let mut cur = w.load(Ordering::SeqCst);
        loop {
            if cur & FUTEX_TID_MASK != self.tid as u32 {
                return;
            }
            let new = (cur & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
            match w.compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        self.space.mem.mark_dirty_va(va);
        if cur & FUTEX_WAITERS != 0 {
            // SAFETY: a shared futex wake on that word, as the kernel's.
            unsafe { libc::syscall(libc::SYS_futex, h, FUTEX_WAKE, 1, 0, 0, 0) };
        }
    }

    /// futex(2) for a process with several threads: the host's futex on the host addresses
    /// of the guest's words, so waiters and wakers on any vCPU (and, for shared mappings, in
    /// other processes) meet. Waits run without the process lock.
    pub(super) fn futex_mt(&mut self, a: [u64; 6]) -> Result<Step, i64> {
        let op = a[1];
        let cmd = op & FUTEX_CMD_MASK;
        if !a[0].is_multiple_of(4) {
            return Err(EINVAL);
        }
        let addr = self.futex_word(a[0]).ok_or(EFAULT)?;
        let two = matches!(
            cmd,
            FUTEX_REQUEUE
                | FUTEX_CMP_REQUEUE
                | FUTEX_WAKE_OP
                | FUTEX_WAIT_REQUEUE_PI
                | FUTEX_CMP_REQUEUE_PI
        );
        let addr2 = if two {
            if !a[4].is_multiple_of(4) {
                return Err(EINVAL);
            }
            self.futex_word(a[4]).ok_or(EFAULT)?
        } else {
            0
        };
        if matches!(
            cmd,
            FUTEX_LOCK_PI
                | FUTEX_LOCK_PI2
                | FUTEX_UNLOCK_PI
                | FUTEX_TRYLOCK_PI
                | FUTEX_WAIT_REQUEUE_PI
                | FUTEX_CMP_REQUEUE_PI
        ) {
            // The host's priority inheritance knows owners by host tid: right only while
            // every thread's guest tid is its host thread's (the process never moved).
            if !self.tids_are_hosts() {
                if self.warned.insert(0x7000_0006) {
                    eprintln!(
                        "mosvm: {}: priority-inheritance futexes after a migration are not \
                         supported",
                        self.program.display()
                    );
                }
                return Err(ENOSYS);
            }
            self.th.pi = true;
        }
        let host = |addr: u64, val: u64, t: u64| {
            // SAFETY: host addresses of mapped guest words; `t` is the guest's count (val2)
            // for the requeue and wake-op operations, never a pointer here.
            let r = unsafe { libc::syscall(libc::SYS_futex, addr, op, val, t, addr2, a[5]) };
            if r < 0 {
                Err(last_errno())
            } else {
                Ok(Step::Ret(r as i64))
            }
        };
        match cmd {
            FUTEX_WAKE_OP => {
                // The host kernel writes the second word: dirty for a migration's copy.
                let r = host(addr, a[2], a[3]);
                self.space.mem.mark_dirty_va(a[4]);
                r
            }
            FUTEX_WAKE | FUTEX_WAKE_BITSET | FUTEX_REQUEUE | FUTEX_CMP_REQUEUE
            | FUTEX_CMP_REQUEUE_PI => host(addr, a[2], a[3]),
            FUTEX_UNLOCK_PI | FUTEX_TRYLOCK_PI => host(addr, a[2], 0),
            FUTEX_WAIT
            | FUTEX_WAIT_BITSET
            | FUTEX_LOCK_PI
            | FUTEX_LOCK_PI2
            | FUTEX_WAIT_REQUEUE_PI => {
                let timeout = if a[3] != 0 {
                    let b = self.read_guest::<16>(a[3])?;
                    let mut ts = libc::timespec {
                        tv_sec: i64::from_le_bytes(b[..8].try_into().expect("8")),
                        tv_nsec: i64::from_le_bytes(b[8..].try_into().expect("8")),
                    };
                    // Absolute timeouts are on the guest's clock: CLOCK_REALTIME for
                    // LOCK_PI, else as FUTEX_CLOCK_REALTIME says.
                    let absolute = cmd != FUTEX_WAIT;
                    if absolute && ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
                        let clock = if cmd == FUTEX_LOCK_PI || op & FUTEX_CLOCK_REALTIME != 0 {
                            libc::CLOCK_REALTIME
                        } else {
                            libc::CLOCK_MONOTONIC
                        };
                        super::shift_ts(&mut ts, -self.clock_offset(clock));
                    }
                    Some(ts)
                } else {
                    None
                };
                Ok(Step::Block(Op::Futex {
                    addr,
                    op,
                    val: a[2],
                    timeout,
                    addr2,
                    val3: a[5],
                }))
            }
            _ => Err(ENOSYS),
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

    /// A fork by a thread other than the first: hand it to the first thread and wait for
    /// its result.
    pub(super) fn delegate_fork(&mut self, c: super::process::CloneArgs) -> Result<Step, i64> {
        self.delegate(Delegate::Fork(c))
    }

    /// execve by a thread other than the first, at its point of no return: the first thread
    /// takes its place (this one then ends).
    pub(super) fn delegate_exec(&mut self) -> Result<Step, i64> {
        self.delegate(Delegate::Exec)
    }

    fn delegate(&mut self, what: Delegate) -> Result<Step, i64> {
        match &self.th.delegated {
            Some(d) if d.tid == self.tid => {
                if let Some(r) = d.result {
                    self.th.delegated = None;
                    return r.map(Step::Ret);
                }
                return Ok(self.redo(None));
            }
            // Another thread's fork is under way.
            Some(_) => return Ok(self.redo(None)),
            None => {}
        }
        let st = crate::snapshot::capture(&mut self.vcpu).map_err(|_| EINVAL)?;
        self.th.delegated = Some(Delegated {
            tid: self.tid,
            st: Some(st),
            what,
            result: None,
        });
        pause::want(pause::GUEST_TID.load(Ordering::SeqCst));
        if let Some(sh) = &self.th.mt {
            sh.cv.notify_all();
        }
        Ok(self.redo(None))
    }

    /// On the first thread: do what another thread asked for ([`Vm::delegate`]).
    fn serve_delegated(&mut self) -> Served {
        let Some(d) = self
            .th
            .delegated
            .as_mut()
            .filter(|d| d.result.is_none() && d.st.is_some())
        else {
            return Served::Nothing;
        };
        let (tid, st, what) = (d.tid, d.st.take(), d.what);
        let Some(i) = self.th.others.iter().position(|t| t.tid == tid) else {
            self.th.delegated = None;
            return Served::Nothing;
        };
        let mut t = self.th.others.swap_remove(i);
        self.exchange(&mut t);
        let c = match what {
            Delegate::Fork(c) => c,
            Delegate::Exec => {
                self.th.delegated = None;
                return match self.take_place(t, st) {
                    Ok(()) => Served::Exec,
                    Err(e) => {
                        eprintln!("mosvm: {}: execve: {e:#}", self.program.display());
                        Served::Nothing
                    }
                };
            }
        };
        self.th.fork_snapshot = st;
        let r = self.clone_process(c);
        self.th.fork_snapshot = None;
        if self.forked {
            // The child: the asking thread's state is its only thread's; its call returns.
            drop(t);
            if let Ok(step) = r {
                let _ = self.complete(0, [0; 6], step);
            }
            return Served::Child;
        }
        self.exchange(&mut t);
        let host = t.cur.host;
        self.th.others.push(t);
        let r = r.map(|s| match s {
            Step::Ret(v) => v,
            _ => 0,
        });
        if let Some(d) = self.th.delegated.as_mut() {
            d.result = Some(r);
        }
        pause::want(host);
        Served::Nothing
    }

    /// The first thread's host thread takes the place of the thread whose state is in (an
    /// execve caller): its vCPU gets that thread's registers, the state keeps the first
    /// thread's vCPU's TSS and the pid as tid; the first thread's own state (`first`) goes.
    fn take_place(
        &mut self,
        first: ThreadState,
        st: Option<crate::snapshot::VcpuState>,
    ) -> Result<()> {
        let st = st.ok_or_else(|| anyhow::anyhow!("no state to take over"))?;
        if self.vcpu.0.is_none() {
            // The first thread had exited: a spare vCPU carries on.
            let (v, tss, top) = self
                .th
                .spare_vcpus
                .pop()
                .ok_or_else(|| anyhow::anyhow!("no vCPU left"))?;
            self.vcpu.0 = Some(v);
            self.cur.tss = tss;
            self.cur.exc_top = top;
        } else {
            self.cur.tss = first.cur.tss;
            self.cur.exc_top = first.cur.exc_top;
        }
        crate::snapshot::restore(&mut self.vcpu, &st)?;
        let mut s = self.vcpu.get_sregs()?;
        s.tr.base = self.cur.tss;
        self.vcpu.set_sregs(&s)?;
        self.vcpu.sync_regs_mut().regs = st.regs;
        self.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
        self.tid = self.pid;
        self.th.main_exited = false;
        Ok(())
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
                let b = sh.book();
                if b.ended.is_some() {
                    break End::Process;
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

/// One thread of a process as it travels (in the VMM state): its own signal state, futex
/// bookkeeping and TSS, and for all but the current one its vCPU's state.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub struct ThreadMig {
    tid: i64,
    mask: u64,
    saved_mask: Option<u64>,
    alt: AltStack,
    trap: [u64; 3],
    /// Signals sent to it alone (`siginfo_t`s, oldest first).
    queue: Vec<Vec<u8>>,
    clear_child_tid: u64,
    robust_list: u64,
    tss: u64,
    exc_top: u64,
    vcpu: Option<crate::snapshot::VcpuState>,
}

impl ThreadMig {
    /// The thread's signal mask (guest signal n is bit n-1).
    pub(super) fn mask(&self) -> u64 {
        self.mask
    }
}

/// The pending bits and queue of travelled `siginfo_t`s.
fn queue_in(q: &[Vec<u8>]) -> (u64, VecDeque<[u8; 128]>) {
    let mut pending = 0u64;
    let mut queue = VecDeque::new();
    for b in q {
        if let Ok(info) = <[u8; 128]>::try_from(b.as_slice()) {
            let s = i32::from_le_bytes(info[..4].try_into().expect("4"));
            if (1..=64).contains(&s) {
                pending |= 1 << (s - 1);
                queue.push_back(info);
            }
        }
    }
    (pending, queue)
}

impl Vm {
    /// Whether every thread's guest tid is its host thread's.
    fn tids_are_hosts(&self) -> bool {
        self.tid as i32 == self.cur.host
            && self.th.others.iter().all(|t| t.tid as i32 == t.cur.host)
    }

    /// The host tid of the thread running guest thread `tid` of this process.
    pub(super) fn host_of(&self, tid: i64) -> Option<i32> {
        if tid == self.tid {
            return Some(self.cur.host);
        }
        self.th
            .others
            .iter()
            .find(|t| t.tid == tid && !t.zap)
            .map(|t| t.cur.host)
    }

    /// The current thread as it travels (its vCPU apart).
    pub(super) fn current_mig(&self) -> ThreadMig {
        ThreadMig {
            tid: self.tid,
            mask: self.sig.mask,
            saved_mask: self.sig.saved_mask,
            alt: self.sig.alt,
            trap: self.sig.trap,
            queue: self.sig.tqueue.iter().map(|b| b.to_vec()).collect(),
            clear_child_tid: self.clear_child_tid,
            robust_list: self.robust_list,
            tss: self.cur.tss,
            exc_top: self.cur.exc_top,
            vcpu: None,
        }
    }

    /// The other threads as they travel, with the vCPU states they stopped with (see
    /// [`stop_others`]), and the TSS and stack tops of the spare vCPUs. An error says why
    /// the process cannot move with its threads now.
    #[allow(clippy::type_complexity)]
    pub(super) fn others_mig(&mut self) -> Result<(Vec<ThreadMig>, Vec<(u64, u64)>)> {
        anyhow::ensure!(
            !self.th.main_exited,
            "its first thread has exited while others run"
        );
        anyhow::ensure!(
            !self.th.pi,
            "it uses priority-inheritance futexes, which the host kernel keeps"
        );
        anyhow::ensure!(
            self.th.delegated.is_none() && self.th.others.iter().all(|t| !t.zap),
            "one of its threads is forking or executing a program"
        );
        let mut out = Vec::with_capacity(self.th.others.len());
        for t in &mut self.th.others {
            let Some(snap) = t.snap.take() else {
                anyhow::bail!("its thread {} did not stop for the move", t.tid);
            };
            out.push(ThreadMig {
                tid: t.tid,
                mask: t.mask,
                saved_mask: t.saved_mask,
                alt: t.alt,
                trap: t.trap,
                queue: t.tqueue.iter().map(|b| b.to_vec()).collect(),
                clear_child_tid: t.clear_child_tid,
                robust_list: t.robust_list,
                tss: t.cur.tss,
                exc_top: t.cur.exc_top,
                vcpu: Some(snap),
            });
        }
        let spare = self.th.spare_vcpus.iter().map(|v| (v.1, v.2)).collect();
        Ok((out, spare))
    }

    /// After a move: the current (first) thread's own state from `main`; a vCPU and a host
    /// thread for each of `others`, which start once the process runs; vCPUs for the spare
    /// TSSes. All load the newest page-table root.
    pub(super) fn restore_threads(
        &mut self,
        main: ThreadMig,
        others: Vec<ThreadMig>,
        spare: Vec<(u64, u64)>,
    ) -> Result<()> {
        self.tid = main.tid;
        self.sig.mask = main.mask;
        self.sig.saved_mask = main.saved_mask;
        self.sig.alt = main.alt;
        self.sig.trap = main.trap;
        (self.sig.tpending, self.sig.tqueue) = queue_in(&main.queue);
        self.clear_child_tid = main.clear_child_tid;
        self.robust_list = main.robust_list;
        if main.tss != 0 {
            self.cur.tss = main.tss;
            self.cur.exc_top = main.exc_top;
        }
        self.cur.host = gettid() as i32;
        if others.is_empty() {
            return Ok(());
        }
        let r = self.restore_others(others, spare);
        if r.is_err() {
            // Threads already started end with the VM.
            self.end_threads();
        }
        r
    }

    fn restore_others(&mut self, others: Vec<ThreadMig>, spare: Vec<(u64, u64)>) -> Result<()> {
        let cr3 = self.space.mem.cr3();
        let host = crate::cpu::host()?;
        self.space.mem.hold_retired(true);
        let mut s = self.vcpu.get_sregs()?;
        s.cr3 = cr3;
        self.vcpu.set_sregs(&s)?;
        self.cur.cr3_loaded = cr3;
        let sh = Shared::new(self.pause.clone());
        self.th.mt = Some(sh.clone());
        let new_vcpu = |vm: &mut Vm| {
            let id = vm.th.next_vcpu;
            vm.th.next_vcpu += 1;
            crate::cpu::create_vcpu_id(host, &vm._vm, &vm.space.mem, id, 0, 0)
        };
        for (tss, top) in spare {
            let v = new_vcpu(self)?;
            self.th.spare_vcpus.push((v, tss, top));
        }
        for t in others {
            let mut v = new_vcpu(self)?;
            let st = t
                .vcpu
                .ok_or_else(|| anyhow::anyhow!("thread {} came without its vCPU", t.tid))?;
            crate::snapshot::restore(&mut v, &st)?;
            let mut s = v.get_sregs()?;
            s.cr3 = cr3;
            v.set_sregs(&s)?;
            let (hosted, go) = spawn_thread(sh.clone(), Some(t.tid), v)
                .ok_or_else(|| anyhow::anyhow!("cannot start a host thread"))?;
            let (tpending, tqueue) = queue_in(&t.queue);
            self.th.others.push(ThreadState {
                tid: t.tid,
                mask: t.mask,
                saved_mask: t.saved_mask,
                alt: t.alt,
                trap: t.trap,
                tpending,
                tqueue,
                clear_child_tid: t.clear_child_tid,
                robust_list: t.robust_list,
                cur: Current {
                    cr3_loaded: cr3,
                    tss: t.tss,
                    exc_top: t.exc_top,
                    host: hosted as i32,
                    ..Default::default()
                },
                in_guest: true,
                ..Default::default()
            });
            let _ = go.send(true);
        }
        Ok(())
    }

    /// The process left this host (or its VM is given up): the other threads, stopped for
    /// the move, end here.
    pub(super) fn end_threads(&mut self) {
        if let Some(sh) = self.th.mt.take() {
            let mut b = sh.book();
            b.open = false;
            if b.ended.is_none() {
                b.ended = Some(Err("the process moved to another node".to_string()));
            }
            sh.cv.notify_all();
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

/// On the main thread, asked to pause: have every other thread stop outside guest code with
/// its vCPU's state taken ([`park`]), waiting up to [`STOP_LIMIT`]. Those that did not stop
/// leave no state, and the capture fails.
fn stop_others(sh: &Shared, own: i64) {
    let t0 = Instant::now();
    loop {
        let all = sh.with(|vm, book| {
            book.stop = true;
            if vm.th.delegated.is_some() {
                // A fork or execve of another thread waits for this one: no migration now.
                return true;
            }
            let mut all = true;
            for t in &vm.th.others {
                if t.tid != own && t.snap.is_none() && !t.zap {
                    pause::want(t.cur.host);
                    all = false;
                }
            }
            all
        });
        if all != Some(false) || t0.elapsed() > STOP_LIMIT || !sh.pause.requested() {
            return;
        }
        let b = sh.book();
        let _ = sh.cv.wait_timeout(b, Duration::from_millis(10));
    }
}

/// A thread other than the main one stops for a migration: its vCPU's state is taken while
/// its state is in, then it waits until the main thread runs the threads again (None: go on)
/// or the process ends here (it moved away, or ended).
fn park(sh: &Shared, tid: i64, vcpu: &mut Option<VcpuFd>) -> Option<End> {
    let parked = sh.with(|vm, book| {
        if !book.stop {
            // The pause was given up meanwhile.
            return true;
        }
        if !vm.swap_in(tid, vcpu) {
            return false;
        }
        let snap = crate::snapshot::capture(&mut vm.vcpu).ok();
        vm.swap_out(vcpu, false);
        if let Some(t) = vm.th.others.last_mut() {
            t.snap = snap;
        }
        true
    });
    match parked {
        None => return Some(End::Process),
        Some(false) => return Some(End::Thread),
        Some(true) => {}
    }
    sh.cv.notify_all();
    let mut b = sh.book();
    while b.stop && b.ended.is_none() {
        b = sh.cv.wait(b).unwrap_or_else(|e| e.into_inner());
    }
    b.ended.is_some().then_some(End::Process)
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
