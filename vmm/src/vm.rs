//! The micro-VM and its run loop: one exit per guest syscall, dispatched through the table to a
//! local handler or to the deputy; guest exceptions end the program as Linux would.

use crate::cpu;
use crate::deputy::{Deputy, Reply, Request, Slot};
use crate::loader::{self, AuxFacts, LoadError};
use crate::memory::{page_up, Fault, GuestMem, PAGE};
use crate::mm::{AddressSpace, VmaKind};
use crate::table::{self, Class, A};
use anyhow::{Context, Result};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

mod exec;
pub(crate) use exec::check_program;
mod futex;
mod mem;
mod net;
mod pause;
mod process;
mod procfs;
mod signal;
mod signalfd;
mod thread;
mod time;
mod timed;
mod timers;
mod travel;

pub use travel::{MigState, Prepared, VmmState};

pub use signal::signal_name;
use signal::{Resume, Signals};

use mem::last_errno;
pub use pause::{
    block_all_signals, block_guest_signals, caught, die_by, host_children_are_the_hosts,
    host_signals_pending, install_kick_handler, install_signal_handlers,
    parent_sigcont_is_the_hosts, process_ending, restore_mask, take_guest_signals_here,
    take_host_signals, take_kicked, PauseHandle,
};
use pause::{GUEST_TID, IMMEDIATE_EXIT, THROTTLE_PERIOD};
use std::time::Instant;
use time::{shift_ts, timespec_bytes};

/// How `mosvm run` was asked to run the program.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guest memory in bytes.
    pub mem: u64,
    /// `--mem` as the user wrote it (for messages).
    pub mem_label: String,
    /// One line per syscall on stderr.
    pub trace: bool,
    /// Never migrate (recorded; the cluster honours it).
    pub lock: bool,
    /// Print run statistics as one JSON line on stderr at exit.
    pub stats: bool,
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// exit/exit_group with this status.
    Exited(i32),
    /// Killed by this signal (a fault, a self-directed kill, or a signal to `mosvm run`).
    Signaled(i32),
}

impl Outcome {
    /// As an exit report travels home: the status 0..=255, or 256 + the signal.
    pub fn to_wire(&self) -> i32 {
        match self {
            Outcome::Exited(c) => *c & 0xff,
            Outcome::Signaled(s) => 256 + s,
        }
    }

    /// Read what [`Outcome::to_wire`] produced.
    pub fn from_wire(w: i32) -> Outcome {
        if (257..=320).contains(&w) {
            Outcome::Signaled(w - 256)
        } else {
            Outcome::Exited(w & 0xff)
        }
    }
}

/// Counters and phase times for `--stats` and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// VM exits handled.
    pub exits: u64,
    /// Syscalls run in the VMM.
    pub local: u64,
    /// Syscalls sent to the deputy.
    pub home: u64,
    /// Microseconds creating the VM, memory and vCPU.
    pub create_us: u64,
    /// Microseconds loading the program.
    pub load_us: u64,
    /// Microseconds running the guest.
    pub run_us: u64,
    /// Guest page faults resolved by mapping a page (demand paging).
    pub page_faults: u64,
}

const EPERM: i64 = 1;
const EINTR: i64 = 4;
const EAGAIN: i64 = 11;
const EFAULT: i64 = 14;
const EINVAL: i64 = 22;
const ENOSYS: i64 = 38;
const EPIPE: i64 = 32;
const ETIMEDOUT: i64 = 110;
const ENODEV: i64 = 19;
const ENOMEM: i64 = 12;
const ESRCH: i64 = 3;
const EBADF: i64 = 9;

enum Step {
    Ret(i64),
    Exit(Outcome),
    /// rt_sigreturn: resume at these user registers.
    Resume(kvm_bindings::kvm_regs),
    /// A thread of several blocks: this runs without the process lock, then the call is
    /// finished (see vm/thread.rs).
    Block(thread::Op),
    /// The calling thread has exited (others go on).
    Gone,
}

/// What prctl(2) sets on a process (PR_SET_PDEATHSIG, PR_SET_DUMPABLE, ...).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Prctl {
    pdeathsig: i32,
    dumpable: bool,
    no_new_privs: bool,
    timerslack_ns: u64,
    child_subreaper: bool,
}

impl Default for Prctl {
    fn default() -> Self {
        Prctl {
            pdeathsig: 0,
            dumpable: true,
            no_new_privs: false,
            timerslack_ns: 50_000,
            child_subreaper: false,
        }
    }
}

/// A program running in its micro-VM.
pub struct Vm {
    /// The vCPU of the thread whose state is in (the only one, unless `mt`).
    vcpu: thread::VcpuSlot,
    /// The current thread's id (the pid for the first thread).
    tid: i64,
    /// The process's threads (see vm/thread.rs).
    th: thread::Threads,
    /// The current thread's own bookkeeping (see vm/thread.rs).
    cur: thread::Current,
    /// The guest's signalfds (see vm/signalfd.rs).
    signalfds: Vec<signalfd::SignalFd>,
    _vm: std::sync::Arc<VmFd>,
    /// The address space (guest memory, page tables, VMAs).
    pub space: AddressSpace,
    deputy: Box<dyn Deputy>,
    opts: Options,
    program: PathBuf,
    pid: i64,
    sig: Signals,
    /// The guest's XSAVE image size in bytes and its XCR0 (signal frames hold the image).
    xstate: (u64, u64),
    rlimits: [[u64; 2]; 16],
    comm: [u8; 16],
    prctl: Prctl,
    /// Where argv, envp and auxv are on the initial stack (/proc/PID/cmdline...).
    stack_layout: loader::StackLayout,
    /// Whether the syscall exit happens at CPL 3 (KVM-PVM): then the VMM performs the return.
    vmm_returns: Option<bool>,
    warned: std::collections::HashSet<u64>,
    /// The address of the last page fault the VMM fixed since the last system call.
    last_fault: Option<u64>,
    /// Since when a call that runs only at home has waited for the process to get there.
    home_wait: Option<Instant>,
    /// The robust futex list head set_robust_list registered (0: none).
    robust_list: u64,
    /// set_tid_address / CLONE_CHILD_CLEARTID: zeroed and woken at exit (0: none).
    clear_child_tid: u64,
    /// This is the child of a fork that has not been reported (see [`Vm::take_forked`]).
    forked: bool,
    /// A vfork child: the pipe end whose closing lets the parent go on.
    vfork_done: Option<i32>,
    /// That child runs on a copy of its parent's memory which natively it would share: the
    /// pages it writes go back through the pipe.
    vfork_shared: bool,
    /// An execve made away from home that completes at home (see `exec.rs`).
    exec_home: Option<exec::ExecHome>,
    /// POSIX timers (timer_create).
    timers: Vec<timers::PosixTimer>,
    /// `program` for other threads (the registration reports a new one after execve).
    program_cell: std::sync::Arc<std::sync::Mutex<String>>,
    /// Guest clocks minus the host's, in ns: CLOCK_MONOTONIC, _RAW and BOOTTIME (non-zero
    /// after a migration, so the guest's never go backwards), CLOCK_REALTIME (wall-clock time
    /// is the home node's wherever the guest runs: non-zero on a node whose clock differs).
    offsets: crate::clock::Offsets,
    /// The guest's clocks as its time page describes them (None: the host TSC cannot carry
    /// them, and the vDSO makes system calls).
    clock: Option<crate::clock::GuestClock>,
    pause: PauseHandle,
    lock: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// System calls so far, readable from other threads: [sent home, served locally].
    calls: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    /// Counters.
    pub stats: Stats,
}

/// A deputy's answer meaning "issue this syscall again" (Linux's internal ERESTARTSYS, which
/// no program ever sees): the call was held back or cancelled because the guest is moving.
pub const ERESTART: i64 = 512;

/// A call's answer meaning "continue it through restart_syscall(2)" (Linux's internal
/// ERESTART_RESTARTBLOCK): a relative sleep stopped for a move resumes toward its original end.
pub(super) const ERESTART_BLOCK: i64 = 516;

/// Length of the `syscall` instruction (0f 05).
const SYSCALL_INSN_LEN: u64 = 2;

/// Largest `--mem`: guest RAM lies below the file window's guest physical addresses
/// ([`crate::window::WINDOW_BASE`], 1 TiB); half of that keeps the dirty bitmap small.
pub const MAX_MEM: u64 = crate::window::WINDOW_BASE / 2;

/// Read `--mem` style sizes: 1048576, 64K, 512M, 2G.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("bad size '{s}': use a number with K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size '{s}': use a number with K, M, G or T"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Whether this process holds CAP_SYS_RESOURCE in its effective set (what raising a hard
/// limit takes, setrlimit(2)): root without it may not.
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    // struct __user_cap_header_struct (version 3, this process) and two data structs.
    let mut head = [0x2008_0522u32, 0];
    let mut data = [0u32; 6];
    // SAFETY: capget fills the two 12-byte data structs version 3 asks for.
    let r = unsafe { libc::syscall(libc::SYS_capget, head.as_mut_ptr(), data.as_mut_ptr()) };
    r == 0 && data[0] & (1 << CAP_SYS_RESOURCE) != 0
}

fn host_ids() -> [u64; 4] {
    // SAFETY: these calls cannot fail and touch no memory.
    unsafe {
        [
            libc::getuid() as u64,
            libc::geteuid() as u64,
            libc::getgid() as u64,
            libc::getegid() as u64,
        ]
    }
}

/// Why setting up a VM failed: a program problem (126) or a host problem (1).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The program cannot be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// KVM or the host refused.
    #[error("{0:#}")]
    Host(#[from] anyhow::Error),
}

impl Vm {
    /// Create the VM, load `program` with `argv` and `envp`, and get ready to run.
    pub fn new(
        program: PathBuf,
        argv: Vec<Vec<u8>>,
        envp: Vec<Vec<u8>>,
        deputy: Box<dyn Deputy>,
        opts: Options,
    ) -> std::result::Result<Vm, SetupError> {
        let t0 = Instant::now();
        let host = cpu::host()?;
        if opts.mem < 64 * crate::memory::PAGE {
            return Err(
                LoadError::TooBig(opts.mem_label.clone(), "the VM's own tables".into()).into(),
            );
        }
        // The host may refuse the reservation (RLIMIT_DATA or RLIMIT_AS below --mem, or no
        // address space left): that is the host's answer, not a size too small.
        let mut mem = GuestMem::new(opts.mem).map_err(|e| {
            anyhow::anyhow!(
                "{e:#} for --mem {} (RLIMIT_DATA and RLIMIT_AS must allow it)",
                opts.mem_label
            )
        })?;
        cpu::install_stub(&mut mem)
            .map_err(|_| LoadError::TooBig(opts.mem_label.clone(), "the VM's own tables".into()))?;
        let vm = cpu::create_vm(host, &mut mem)?;
        let create_us = t0.elapsed().as_micros() as u64;

        let t1 = Instant::now();
        let mut rlimits = [[u64::MAX; 2]; 16];
        for (r, lim) in rlimits.iter_mut().enumerate() {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `l` is a valid rlimit to fill in.
            if unsafe { libc::getrlimit(r as _, &mut l) } == 0 {
                *lim = [l.rlim_cur, l.rlim_max];
            }
        }
        let mut space = AddressSpace::new(mem);
        space.stack_rlimit = rlimits[libc::RLIMIT_STACK as usize][0];
        let mut random = [0u8; 16];
        getrandom(&mut random);
        let facts = AuxFacts {
            hwcap: cpu::hwcap(),
            ids: host_ids(),
            random,
        };
        let execfn = program.as_os_str().as_encoded_bytes().to_vec();
        let started = loader::load(
            &mut space,
            &program,
            &argv,
            &envp,
            &execfn,
            &facts,
            &opts.mem_label,
        )?;
        let load_us = t1.elapsed().as_micros() as u64;

        let t2 = Instant::now();
        let vcpu = cpu::create_vcpu(host, &vm, &space.mem, started.rip, started.rsp)?;
        let create_us = create_us + t2.elapsed().as_micros() as u64;

        let mut comm = [0u8; 16];
        let base = program
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        let n = base.len().min(15);
        comm[..n].copy_from_slice(&base[..n]);

        let opts_lock = opts.lock;
        let mut vm = Vm {
            vcpu: thread::VcpuSlot(Some(vcpu)),
            tid: 0,
            th: Default::default(),
            cur: Default::default(),
            signalfds: Vec::new(),
            _vm: vm,
            space,
            deputy,
            opts,
            program,
            pid: 0,
            sig: Signals::new(),
            xstate: (cpu::xstate_size(host), cpu::guest_xcr0(host)),
            rlimits,
            comm,
            prctl: Prctl::default(),
            stack_layout: started.layout,
            vmm_returns: None,
            warned: Default::default(),
            last_fault: None,
            home_wait: None,
            robust_list: 0,
            clear_child_tid: 0,
            forked: false,
            vfork_done: None,
            vfork_shared: false,
            exec_home: None,
            program_cell: Default::default(),
            timers: Vec::new(),
            offsets: Default::default(),
            clock: None,
            pause: PauseHandle::default(),
            lock: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(opts_lock)),
            calls: Default::default(),
            stats: Stats {
                create_us,
                load_us,
                ..Default::default()
            },
        };
        *vm.program_cell.lock().expect("new") = vm.program.display().to_string();
        vm.sig.inherit();
        // The host follows the guest's actions from the start (a stop signal at its default
        // stops `mosvm run` itself): not only after a fork or a move.
        vm.sig.mirror_all();
        vm.show_comm();
        vm.pid = vm
            .deputy
            .call(Request {
                nr: libc::SYS_getpid as u64,
                args: [0; 6],
                slots: vec![],
            })
            .ret;
        vm.tid = vm.pid;
        vm.start_clock();
        Ok(vm)
    }

    /// Run until the guest exits or dies.
    pub fn run(&mut self) -> Result<Outcome> {
        loop {
            if let Some(out) = self.run_or_pause()? {
                return Ok(out);
            }
        }
    }

    /// The handle that pauses this guest from another thread.
    pub fn pause_handle(&self) -> PauseHandle {
        self.pause.clone()
    }

    /// Run until the guest exits or dies (`Some`), or a pause was requested (`None`): the
    /// guest is then stopped between two instructions (or two syscalls) and can be captured.
    pub fn run_or_pause(&mut self) -> Result<Option<Outcome>> {
        let t = Instant::now();
        self.renew_clock();
        install_kick_handler();
        // (No vCPU when the first thread has exited while others run.)
        let ie = match self.vcpu.0.as_mut() {
            Some(v) => &mut v.get_kvm_run().immediate_exit as *mut u8,
            None => std::ptr::null_mut(),
        };
        IMMEDIATE_EXIT.store(ie, Ordering::SeqCst);
        let p = self.pause.inner.clone();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        p.thread.store(me as u64, Ordering::SeqCst);
        p.immediate_exit.store(ie, Ordering::SeqCst);
        p.running.store(true, Ordering::SeqCst);
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        GUEST_TID.store(tid as i32, Ordering::SeqCst);
        // The first thread's state is in: this host thread runs it.
        self.cur.host = tid as i32;
        let out = loop {
            let r = if self.th.mt.is_some() {
                self.run_threads()
            } else {
                self.run_loop()
            };
            // Threads started or ended, or the main thread exited while others go on: run
            // on (unless a pause or a new process's registration is due).
            match r {
                Ok(None) if !self.forked && !self.pause.requested() => continue,
                r => break r,
            }
        };
        GUEST_TID.store(0, Ordering::SeqCst);
        p.running.store(false, Ordering::SeqCst);
        p.immediate_exit
            .store(std::ptr::null_mut(), Ordering::SeqCst);
        IMMEDIATE_EXIT.store(std::ptr::null_mut(), Ordering::SeqCst);
        if let Some(v) = self.vcpu.0.as_mut() {
            v.set_kvm_immediate_exit(0);
        }
        self.stats.run_us += t.elapsed().as_micros() as u64;
        out
    }

    fn run_loop(&mut self) -> Result<Option<Outcome>> {
        loop {
            if self.pause.requested() {
                return Ok(None);
            }
            if self.exec_home.is_some() {
                if let Some(step) = self.exec_arrived() {
                    let nr = libc::SYS_execve as u64;
                    if let Some(out) = self.complete(nr, [0; 6], step)? {
                        return Ok(Some(out));
                    }
                }
                continue;
            }
            self.load_new_root()?;
            self.pause.inner.in_guest.store(true, Ordering::SeqCst);
            let ev = thread::Event::of(self.vcpu.run());
            self.pause.inner.in_guest.store(false, Ordering::SeqCst);
            if let Some(out) = self.handle_event(ev)? {
                return Ok(Some(out));
            }
            if self.forked || self.th.mt.is_some() {
                // A new process (its embedder registers it before it goes on), or a second
                // thread (the threads take over).
                return Ok(None);
            }
        }
    }

    /// Handle one exit of the current thread's vCPU: Some when the process is done.
    fn handle_event(&mut self, ev: thread::Event) -> Result<Option<Outcome>> {
        use thread::Event;
        let msg = match ev {
            Event::Syscall => {
                self.stats.exits += 1;
                self.last_fault = None;
                self.refresh_clock(false);
                return self.syscall();
            }
            Event::Exception(v) => {
                self.stats.exits += 1;
                self.refresh_clock(false);
                return self.exception(v);
            }
            Event::Port(port) => {
                return Err(anyhow::anyhow!("guest wrote to unknown port {port:#x}"));
            }
            Event::Sigbus => {
                // The host could not supply a page: a file page past the end of its file
                // (Linux's SIGBUS for such an access).
                crate::say!(
                    "mosvm: {} killed by SIGBUS: access past the end of a mapped file",
                    self.program.display()
                );
                return Ok(Some(Outcome::Signaled(libc::SIGBUS)));
            }
            Event::Kicked => {
                // A kick: a signal for the guest, a pause, or throttling (sit out the
                // throttled share of a slice). A signal handler may have set
                // immediate_exit: clear it (a pause request is seen at the loop's top).
                self.vcpu.set_kvm_immediate_exit(0);
                if let Some(out) = self.interrupt()? {
                    return Ok(Some(out));
                }
                let pm = self.pause.inner.throttle.load(Ordering::SeqCst);
                if pm > 0 && !self.pause.requested() {
                    let share = THROTTLE_PERIOD * pm / 1000;
                    if self.th.mt.is_none() {
                        std::thread::sleep(share);
                    } else {
                        // A thread sits its share out without the process lock.
                        self.th.block = Some(thread::Op::Sleep(share));
                    }
                }
                return Ok(None);
            }
            Event::Error(e) => return Err(anyhow::anyhow!(e)),
            Event::Bad(msg) => msg,
        };
        self.stats.exits += 1;
        let regs = self.vcpu.get_regs().ok();
        crate::say!(
            "mosvm: {}: {msg} at rip {:#x}",
            self.program.display(),
            regs.map(|r| r.rip).unwrap_or(0)
        );
        Ok(Some(Outcome::Signaled(libc::SIGSEGV)))
    }

    /// Before the vCPU runs (or is captured): page-table changes that took rights away live
    /// in a copied path (see `GuestMem::take_new_root`), whose root the vCPU must load.
    fn load_new_root(&mut self) -> Result<()> {
        if let Some(cr3) = self.space.mem.take_new_root() {
            let mut s = self.vcpu.get_sregs().context("KVM_GET_SREGS")?;
            s.cr3 = cr3;
            self.vcpu.set_sregs(&s).context("KVM_SET_SREGS")?;
        }
        Ok(())
    }

    /// A guest exception: demand paging resumes the guest (None); anything else ends it as
    /// Linux would.
    fn exception(&mut self, v: usize) -> Result<Option<Outcome>> {
        if v == 14 {
            let cr2 = self.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
            let rsp = self.vcpu.sync_regs_mut().regs.rsp;
            let err = self.space.mem.read_u64_va(rsp).unwrap_or(0);
            // A fault the VMM fixes must not come straight back: if it does, the page tables
            // and what the MMU sees disagree, and the guest would loop for ever.
            let again = self.last_fault == Some(cr2);
            if !again && self.space.fault_in(cr2, err & 2 != 0) {
                self.stats.page_faults += 1;
                self.last_fault = Some(cr2);
                // The handler pops the error code and returns with iretq.
                return Ok(None);
            }
            if !again
                && cr2 < guest::KERNEL_BASE
                && self.space.accessible(cr2, 1, err & 2 != 0) == 1
                && self.space.mem.free_frames() == 0
            {
                // The access was allowed but no guest memory is left for the page: what a
                // memory cgroup's OOM killer does to a process over its limit.
                crate::say!(
                    "mosvm: {} killed: out of guest memory (--mem {})",
                    self.program.display(),
                    self.opts.mem_label
                );
                return Ok(Some(Outcome::Signaled(libc::SIGKILL)));
            }
        }
        let rsp = self.vcpu.sync_regs_mut().regs.rsp;
        let frame = if guest::has_error_code(v) {
            rsp + 8
        } else {
            rsp
        };
        let err = if guest::has_error_code(v) {
            self.space.mem.read_u64_va(rsp).unwrap_or(0)
        } else {
            0
        };
        let rip = self.space.mem.read_u64_va(frame).unwrap_or(0);
        let cr2 = if v == 14 || v == 17 {
            self.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0)
        } else {
            0
        };
        let mxcsr = if v == 19 {
            self.vcpu.get_xsave().map(|x| x.region[6]).unwrap_or(0)
        } else {
            0
        };
        let mapped = self.space.vma_at(cr2).is_some();
        let (sig, code, addr) = signal::fault_signal(v, rip, cr2, mapped, mxcsr);
        let trap = [err, v as u64, cr2];
        if let Some(out) = self.fault_to_handler(sig, code, addr, trap, Resume::Iret(frame))? {
            return Ok(out);
        }
        let what = match v {
            0 => "divide error".to_string(),
            1 | 3 => "breakpoint".to_string(),
            6 => "invalid opcode".to_string(),
            13 => format!("general protection fault (error {err:#x})"),
            14 => format!("page fault at {cr2:#x}"),
            16 | 19 => "floating-point exception".to_string(),
            17 => "alignment check".to_string(),
            12 | 11 => "stack fault".to_string(),
            _ => format!("exception {v}"),
        };
        let name = signal_name(sig);
        crate::say!(
            "mosvm: {} killed by {name}: {what}, rip {rip:#x}",
            self.program.display()
        );
        Ok(Some(Outcome::Signaled(sig)))
    }

    /// KVM_RUN came back interrupted: deliver signals that arrived meanwhile, when the vCPU
    /// stopped in the program's own code (in the stub, the next exit delivers them).
    fn interrupt(&mut self) -> Result<Option<Outcome>> {
        if !host_signals_pending() && self.sig.all_pending() & !self.sig.mask == 0 {
            return Ok(None);
        }
        let rip = self.vcpu.sync_regs_mut().regs.rip;
        if rip >= guest::KERNEL_BASE {
            // Inside the stub (about to exit or return): come back shortly.
            let p = self.pause.clone();
            let tid = (self.th.mt.is_some()).then_some(self.cur.host);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(1));
                match tid {
                    Some(t) => pause::kick_tid(t),
                    None => p.kick(),
                }
            });
            return Ok(None);
        }
        self.deliver_signals(Resume::Direct)
    }

    /// Handle one syscall exit. Returns the outcome when the guest is done.
    fn syscall(&mut self) -> Result<Option<Outcome>> {
        if self.vmm_returns.is_none() {
            let s = self.vcpu.get_sregs().context("KVM_GET_SREGS")?;
            self.vmm_returns = Some(s.cs.selector & 3 == 3);
        }
        let r = &self.vcpu.sync_regs_mut().regs;
        let nr = r.rax;
        let a = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
        let a = self.timed_start(nr, a);
        let t = if self.opts.trace {
            Some(Instant::now())
        } else {
            None
        };
        let entry = table::lookup(nr);
        let (step, where_) = match entry.map(|e| e.class) {
            Some(Class::Local) => {
                self.stats.local += 1;
                self.calls[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (self.local(nr, a), "local")
            }
            Some(Class::Home(spec)) => {
                self.stats.home += 1;
                self.calls[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (self.forward(nr, a, spec), "home")
            }
            Some(Class::Refused(e)) => {
                if let Some(note) = table::unsupported_note(nr as u32) {
                    if self.warned.insert(nr) {
                        crate::say!("mosvm: {}: {note}", self.program.display());
                    }
                }
                (Step::Ret(-e), "refused")
            }
            None => {
                if self.opts.trace && self.warned.insert(nr) {
                    eprintln!("[mosvm] unknown syscall {nr}: returning ENOSYS");
                }
                (Step::Ret(-ENOSYS), "unknown")
            }
        };
        if let Some(t) = t {
            let res = match &step {
                Step::Ret(v) => format!("{v}"),
                Step::Exit(o) => format!("{o:?}"),
                Step::Resume(r) => format!("resume at {:#x}", r.rip),
                Step::Block(_) => "(blocks)".to_string(),
                Step::Gone => "(thread gone)".to_string(),
            };
            eprintln!(
                "[mosvm] {}({:#x}, {:#x}, {:#x}, {:#x}) = {res} {where_} {:.1}us",
                table::name(nr),
                a[0],
                a[1],
                a[2],
                a[3],
                t.elapsed().as_secs_f64() * 1e6
            );
        }
        self.complete(nr, a, step)
    }

    /// Finish system call `nr(a)` with what its handler made of it.
    fn complete(&mut self, nr: u64, a: [u64; 6], step: Step) -> Result<Option<Outcome>> {
        if !matches!(step, Step::Block(_)) {
            if !matches!(step, Step::Ret(v) if v == -ERESTART_BLOCK) {
                self.cur.restart = None;
            }
            self.cur.redo_until = None;
            self.cur.redo_mask = None;
            self.cur.sigwait_set = 0;
            self.sync_signalfds();
        }
        match step {
            Step::Block(op) => {
                self.th.block = Some(op);
                Ok(None)
            }
            Step::Gone => {
                self.timed_end(false);
                Ok(None)
            }
            Step::Exit(o) => Ok(Some(o)),
            Step::Resume(regs) => {
                self.timed_end(false);
                let how = self.resume_at(regs);
                self.deliver_signals(how)
            }
            Step::Ret(v) => {
                let vmm_returns = self.vmm_returns == Some(true);
                // A call interrupted because the guest is about to move: undo it, so the guest
                // issues it again wherever it resumes (as Linux restarts a syscall). A call a
                // signal interrupted is restarted unless a handler runs that asks otherwise
                // (SA_RESTART, signal(7)).
                let block = v == -ERESTART_BLOCK;
                let restart = v == -ERESTART
                    || block
                    || (v == -EINTR
                        && nr != libc::SYS_restart_syscall as u64
                        && self.interrupted(nr, &a).is_none_or(|again| again));
                self.timed_end(restart && !block);
                let quick = !restart
                    && self.sig.all_pending() & !self.sig.mask == 0
                    && !host_signals_pending();
                let regs = &mut self.vcpu.sync_regs_mut().regs;
                if restart {
                    regs.rax = if block {
                        libc::SYS_restart_syscall as u64
                    } else {
                        nr
                    };
                    regs.rcx = regs.rcx.wrapping_sub(SYSCALL_INSN_LEN);
                } else {
                    regs.rax = v as u64;
                }
                if vmm_returns {
                    regs.rip = regs.rcx;
                    regs.rflags = regs.r11;
                }
                self.vcpu.set_sync_dirty_reg(SyncReg::Register);
                pause::mirror_stop_mask(self.sig.mask);
                if quick {
                    return Ok(None);
                }
                self.deliver_signals(if vmm_returns {
                    Resume::Direct
                } else {
                    Resume::Sysret
                })
            }
        }
    }

    fn call_deputy(&mut self, nr: i64, args: [u64; 6], slots: Vec<Slot>) -> Reply {
        self.deputy.call(Request {
            nr: nr as u64,
            args,
            slots,
        })
    }

    /// A home call: gathered from guest memory, run by the deputy, scattered back
    /// (`forward`).
    fn forward(&mut self, nr: u64, mut args: [u64; 6], base: &'static [A]) -> Step {
        if self.is_signalfd(args[0]) {
            match nr as i64 {
                libc::SYS_read => {
                    return self
                        .signalfd_read(args[0], args[1], args[2])
                        .unwrap_or_else(|e| Step::Ret(-e))
                }
                libc::SYS_close => self.signalfd_closed(args[0]),
                _ => {}
            }
        }
        match nr as i64 {
            libc::SYS_rt_sigqueueinfo | libc::SYS_rt_tgsigqueueinfo
                if args[0] as i32 as i64 == self.pid =>
            {
                return self
                    .sigqueue(nr as i64, args)
                    .unwrap_or_else(|e| Step::Ret(-e));
            }
            libc::SYS_msgrcv if (args[2] as i64) < 0 => return Step::Ret(-EINVAL),
            libc::SYS_msgrcv => args[2] = args[2].min(table::IPC_MSG_MAX),
            libc::SYS_semctl if matches!(args[2] as i32, libc::GETALL | libc::SETALL) => {
                // The array holds as many values as the set has (see `table::ipc_ctl_arg`).
                let r = self.call_deputy(
                    libc::SYS_semctl,
                    [args[0], 0, libc::IPC_STAT as u64, 1, 0, 0],
                    vec![Slot::Out(104)],
                );
                if r.ret < 0 {
                    return Step::Ret(r.ret);
                }
                let ds = r.outs.first().filter(|b| b.len() >= 88);
                args[4] = ds.map_or(0, |b| u64::from_le_bytes(b[80..88].try_into().expect("8")));
            }
            _ => {}
        }
        // The guest's own /proc files describe the guest (vm/procfs.rs).
        let (path, flags) = match nr as i64 {
            libc::SYS_open => (args[0], args[1]),
            libc::SYS_openat => (args[1], args[2]),
            _ => (0, 0),
        };
        if path != 0 && flags & libc::O_ACCMODE as u64 == libc::O_RDONLY as u64 {
            if let Ok(p) = self.space.mem.read_cstr(path, 64) {
                if let Some(f) = procfs::own_file(&p, self.pid) {
                    return Step::Ret(self.open_proc(f, flags));
                }
            }
        }
        // pselect6, ppoll, epoll_pwait(2): the guest's mask is the call's own while it waits,
        // and a handler that interrupts it runs under that mask (as for sigsuspend).
        let temp_mask = match self.call_sigmask(nr, &args) {
            Ok(m) => m,
            Err(e) => return Step::Ret(-e),
        };
        let old_mask = self.sig.mask;
        if let Some(m) = temp_mask {
            self.sig.mask = m;
            if self.signal_ready() {
                self.sig.saved_mask = Some(old_mask);
                return Step::Ret(-EINTR);
            }
        }
        if self.th.mt.is_some() {
            // Another thread may go on while this one's host call blocks.
            return Step::Block(thread::Op::Home {
                nr,
                args,
                base,
                temp_mask,
                old_mask,
                overlay: self.cur.overlay,
            });
        }
        let mut guest = crate::forward::Guest::new(&mut self.space).overlay(self.cur.overlay);
        let ret = crate::forward::home_call(&mut guest, &mut *self.deputy, nr, args, base);
        self.forward_done(nr, ret, temp_mask, old_mask)
    }

    /// The end of a home call `nr` that returned `ret`: the guest's mask back after a call
    /// that waited under its own, SIGPIPE after EPIPE.
    fn forward_done(&mut self, nr: u64, ret: i64, temp_mask: Option<u64>, old_mask: u64) -> Step {
        if temp_mask.is_some() {
            if ret == -EINTR && self.signal_ready() {
                self.sig.saved_mask = Some(old_mask);
            } else {
                self.sig.mask = old_mask;
            }
        }
        if ret == -EPIPE
            && matches!(
                nr as i64,
                libc::SYS_write
                    | libc::SYS_writev
                    | libc::SYS_pwrite64
                    | libc::SYS_pwritev
                    | libc::SYS_pwritev2
                    | libc::SYS_sendto
                    | libc::SYS_sendmsg
            )
        {
            self.raise_sigpipe();
        }
        Step::Ret(ret)
    }

    /// Copy to the guest as the kernel's `copy_to_user` would: EFAULT unless its mappings let
    /// it be written (demand-paged pages are brought in first).
    fn write_guest(&mut self, va: u64, bytes: &[u8]) -> Result<(), i64> {
        let n = bytes.len() as u64;
        if self.space.accessible(va, n, true) != n {
            return Err(EFAULT);
        }
        self.space.fault_in_range(va, n);
        self.space.mem.write(va, bytes).map_err(|_: Fault| EFAULT)
    }

    /// Copy from the guest as `copy_from_user` would: EFAULT unless it may be read.
    fn read_guest<const N: usize>(&mut self, va: u64) -> Result<[u8; N], i64> {
        let mut b = [0u8; N];
        if self.space.accessible(va, N as u64, false) != N as u64 {
            return Err(EFAULT);
        }
        self.space.fault_in_range(va, N as u64);
        self.space.mem.read(va, &mut b).map_err(|_| EFAULT)?;
        Ok(b)
    }

    fn local(&mut self, nr: u64, a: [u64; 6]) -> Step {
        match self.local_inner(nr, a) {
            Ok(v) => v,
            Err(e) => Step::Ret(-e),
        }
    }

    fn local_inner(&mut self, nr: u64, a: [u64; 6]) -> Result<Step, i64> {
        let ok = |v: i64| Ok(Step::Ret(v));
        match nr as i64 {
            libc::SYS_brk => ok(self.space.set_brk(a[0]) as i64),
            libc::SYS_mmap => self.mmap(a).map(|v| Step::Ret(v as i64)),
            libc::SYS_munmap => self.space.munmap(a[0], a[1]).map(|_| Step::Ret(0)),
            libc::SYS_shmat => self
                .shmat(a[0] as i32, a[1], a[2] as i32)
                .map(|v| Step::Ret(v as i64)),
            libc::SYS_shmdt => self.shmdt(a[0]).map(|_| Step::Ret(0)),
            libc::SYS_sendmmsg | libc::SYS_recvmmsg => Ok(self.mmsg(nr, a)),
            libc::SYS_mprotect => {
                // mprotect(2): PROT_READ/WRITE/EXEC, PROT_SEM (no effect on x86), and
                // PROT_GROWSDOWN, which extends the change down to the start of a stack area
                // (EINVAL elsewhere); x86 has no PROT_GROWSUP areas.
                const PROT_SEM: u64 = 8;
                const GROWSDOWN: u64 = 0x0100_0000;
                let (mut addr, mut len, prot) = (a[0], a[1], a[2]);
                if prot & !(7 | PROT_SEM | GROWSDOWN) != 0 {
                    return Err(EINVAL);
                }
                if prot & GROWSDOWN != 0 {
                    match self.space.vma_at(addr) {
                        Some((s, v)) if v.kind == VmaKind::Stack => {
                            len = len.saturating_add(addr - s);
                            addr = s;
                        }
                        _ => return Err(EINVAL),
                    }
                }
                self.space
                    .mprotect(addr, len, prot as u32 & 7)
                    .map(|_| Step::Ret(0))
            }
            libc::SYS_mremap => {
                const MAYMOVE: u64 = 1;
                const FIXED: u64 = 2;
                if a[3] & !(MAYMOVE | FIXED) != 0 {
                    return Err(EINVAL);
                }
                let fixed = (a[3] & FIXED != 0).then_some(a[4]);
                self.space
                    .mremap(a[0], a[1], a[2], a[3] & MAYMOVE != 0, fixed)
                    .map(|v| Step::Ret(v as i64))
            }
            libc::SYS_madvise => self.madvise(a[0], a[1], a[2] as i32),
            libc::SYS_msync => {
                // msync(2): an unaligned start, unknown flags or MS_SYNC with MS_ASYNC are
                // EINVAL; a range with unmapped parts ENOMEM.
                let flags = a[2] as i32;
                let known = libc::MS_ASYNC | libc::MS_INVALIDATE | libc::MS_SYNC;
                if a[0] & (PAGE - 1) != 0
                    || flags & !known != 0
                    || flags & libc::MS_ASYNC != 0 && flags & libc::MS_SYNC != 0
                {
                    return Err(EINVAL);
                }
                self.range_mapped(a[0], a[1])?;
                // Shared file pages are the host's: write them back as asked.
                let end = a[0] + page_up(a[1]);
                let parts: Vec<(u64, u64)> = self
                    .space
                    .vmas()
                    .filter(|(s, v)| *s < end && v.end > a[0] && v.kind == VmaKind::Shared)
                    .filter_map(|(s, v)| {
                        let lo = s.max(a[0]);
                        v.window_at(s, lo).map(|w| (w, v.end.min(end) - lo))
                    })
                    .collect();
                for (w, n) in parts {
                    self.space.mem.window()?.sync(w, n, flags)?;
                }
                ok(0)
            }
            libc::SYS_mlock2 if a[2] & !(libc::MLOCK_ONFAULT as u64) != 0 => Err(EINVAL),
            libc::SYS_mlock | libc::SYS_munlock | libc::SYS_mlock2 => {
                self.range_mapped(a[0] & !(PAGE - 1), a[1] + (a[0] & (PAGE - 1)))?;
                ok(0)
            }
            libc::SYS_mlockall => {
                let known = libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT;
                if a[0] as i32 & !known != 0
                    || a[0] as i32 & (libc::MCL_CURRENT | libc::MCL_FUTURE) == 0
                {
                    return Err(EINVAL);
                }
                ok(0)
            }
            libc::SYS_munlockall => ok(0),
            libc::SYS_mincore => {
                if a[0] & (PAGE - 1) != 0 {
                    return Err(EINVAL);
                }
                if a[0]
                    .checked_add(a[1])
                    .is_none_or(|e| e > crate::mm::USER_END)
                {
                    return Err(ENOMEM);
                }
                let n = crate::memory::page_up(a[1]) / PAGE;
                let mut v = Vec::with_capacity(n.min(1 << 20) as usize);
                for i in 0..n.min(1 << 20) {
                    let p = a[0] + i * PAGE;
                    // Linux: ENOMEM when part of the range is not mapped at all.
                    if self.space.vma_at(p).is_none() {
                        return Err(ENOMEM);
                    }
                    v.push(self.space.mem.is_mapped(p) as u8);
                }
                self.write_guest(a[2], &v)?;
                ok(0)
            }
            libc::SYS_arch_prctl => self.arch_prctl(a[0], a[1]),
            libc::SYS_set_tid_address => {
                self.clear_child_tid = a[0];
                ok(self.tid)
            }
            libc::SYS_gettid => ok(self.tid),
            // set_robust_list(2): the head must be `struct robust_list_head` (24 bytes).
            libc::SYS_set_robust_list if a[1] != 24 => Err(EINVAL),
            libc::SYS_set_robust_list => {
                self.robust_list = a[0];
                ok(0)
            }
            // get_robust_list(2): this thread's head (pid 0 or its own); another process's
            // is not the guest's to read.
            libc::SYS_get_robust_list if a[0] != 0 && !self.has_thread(a[0] as i32 as i64) => {
                // Another process's: not the guest's to read (ESRCH when there is none).
                // SAFETY: kill with signal 0 only checks that the target exists.
                let exists = unsafe { libc::kill(a[0] as i32, 0) } == 0 || last_errno() == EPERM;
                Err(if exists && a[0] as i32 > 0 {
                    EPERM
                } else {
                    ESRCH
                })
            }
            libc::SYS_get_robust_list => {
                let head = if a[0] == 0 || a[0] as i32 as i64 == self.tid {
                    self.robust_list
                } else {
                    self.thread_robust_list(a[0] as i32 as i64)
                };
                self.write_guest(a[1], &head.to_le_bytes())?;
                self.write_guest(a[2], &24u64.to_le_bytes())?;
                ok(0)
            }
            libc::SYS_rseq | libc::SYS_membarrier => Err(ENOSYS),
            libc::SYS_prlimit64 => self.prlimit(a[0], a[1], a[2], a[3]),
            libc::SYS_getrlimit => self.prlimit(0, a[0], 0, a[1]),
            libc::SYS_setrlimit => self.prlimit(0, a[0], a[1], 0),
            libc::SYS_getrandom => {
                // getrandom(2): only GRND_NONBLOCK, GRND_RANDOM and GRND_INSECURE, and not the
                // last two together.
                let flags = a[2] as u32;
                if flags & !7 != 0 || flags & 6 == 6 {
                    return Err(EINVAL);
                }
                // Into as much of the buffer as the guest may write, pages not yet touched
                // included (they are faulted in, as copy_to_user does); a fault part way ends
                // the call with what was copied, and EFAULT only when nothing was.
                let want = a[1].min(crate::deputy::marshal::MAX_RW_COUNT);
                let n = self.space.accessible(a[0], want, true);
                let mut b = vec![0u8; (n as usize).min(1 << 20)];
                let mut done = 0u64;
                while done < n {
                    let k = (n - done).min(b.len() as u64) as usize;
                    getrandom(&mut b[..k]);
                    if self.write_guest(a[0] + done, &b[..k]).is_err() {
                        break;
                    }
                    done += k as u64;
                }
                if done == 0 && want > 0 {
                    return Err(EFAULT);
                }
                ok(done as i64)
            }
            libc::SYS_clock_gettime | libc::SYS_clock_getres => {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let gettime = nr as i64 == libc::SYS_clock_gettime;
                // The clocks the time page describes read as the vDSO reads them.
                if let Some(ns) = self.guest_time(a[0] as i32).filter(|_| gettime) {
                    ts = time::ns_timespec(ns);
                } else {
                    // The system call itself, not libc's (the host's vDSO answers some
                    // clock ids the call refuses).
                    let call = if gettime {
                        libc::SYS_clock_gettime
                    } else {
                        libc::SYS_clock_getres
                    };
                    // SAFETY: `ts` is a valid timespec to fill in.
                    let r = unsafe {
                        libc::syscall(
                            call,
                            a[0] as libc::clockid_t,
                            &mut ts as *mut libc::timespec,
                        )
                    };
                    if r != 0 {
                        return Err(EINVAL);
                    }
                    if gettime {
                        shift_ts(&mut ts, self.clock_offset(a[0] as i32));
                    }
                }
                if a[1] != 0 {
                    self.write_guest(a[1], &timespec_bytes(&ts))?;
                }
                ok(0)
            }
            libc::SYS_gettimeofday => {
                let ts = self.guest_realtime();
                if a[0] != 0 {
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&ts.tv_sec.to_le_bytes());
                    b[8..].copy_from_slice(&(ts.tv_nsec / 1000).to_le_bytes());
                    self.write_guest(a[0], &b)?;
                }
                if a[1] != 0 {
                    self.write_guest(a[1], &[0u8; 8])?;
                }
                ok(0)
            }
            libc::SYS_time => {
                let ts = self.guest_realtime();
                if a[0] != 0 {
                    self.write_guest(a[0], &ts.tv_sec.to_le_bytes())?;
                }
                ok(ts.tv_sec)
            }
            libc::SYS_nanosleep => self.sleep(libc::CLOCK_MONOTONIC, 0, a[0], a[1]),
            libc::SYS_clock_nanosleep => self.sleep(a[0] as i32, a[1] as i32, a[2], a[3]),
            libc::SYS_restart_syscall => self.restart_syscall(),
            libc::SYS_sched_yield => ok(0),
            libc::SYS_pause => self.pause_call(),
            libc::SYS_execve | libc::SYS_execveat => self.execve(nr as i64, a),
            libc::SYS_rt_sigsuspend => self.sigsuspend(a[0], a[1]),
            libc::SYS_signalfd | libc::SYS_signalfd4 => self.signalfd(nr as i64, a),
            libc::SYS_rt_sigtimedwait => self.sigtimedwait(a),
            libc::SYS_alarm | libc::SYS_getitimer | libc::SYS_setitimer => {
                self.itimer(nr as i64, a)
            }
            libc::SYS_timer_create
            | libc::SYS_timer_settime
            | libc::SYS_timer_gettime
            | libc::SYS_timer_getoverrun
            | libc::SYS_timer_delete => self.posix_timer(nr as i64, a),
            libc::SYS_uname => {
                // SAFETY: utsname is plain data; uname fills it in.
                let mut u: libc::utsname = unsafe { std::mem::zeroed() };
                // SAFETY: `u` is a valid utsname.
                unsafe { libc::uname(&mut u) };
                // SAFETY: utsname is 6 arrays of 65 c_char: viewing it as bytes is sound.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        &u as *const _ as *const u8,
                        std::mem::size_of::<libc::utsname>(),
                    )
                };
                self.write_guest(a[0], bytes)?;
                ok(0)
            }
            libc::SYS_exit if !self.th.others.is_empty() => {
                // One thread ends; the others go on (the process's status is its first
                // thread's, when that one ends this way).
                if self.tid == self.pid {
                    self.th.leader_status = Some(a[0] as i32 & 0xff);
                }
                self.exit_thread();
                Ok(Step::Gone)
            }
            libc::SYS_exit | libc::SYS_exit_group => {
                self.release_vfork_parent();
                let code = match (nr as i64, self.th.leader_status) {
                    (libc::SYS_exit, Some(c)) => c,
                    _ => a[0] as i32 & 0xff,
                };
                Ok(Step::Exit(Outcome::Exited(code)))
            }
            libc::SYS_fork => self.fork_call(false),
            libc::SYS_vfork => self.fork_call(true),
            libc::SYS_clone => self.clone_process(process::CloneArgs::from_clone(a)),
            libc::SYS_clone3 => self.clone3(a),
            libc::SYS_rt_sigaction => {
                let sig = a[0] as usize;
                if !(1..=64).contains(&sig) || a[3] != 8 {
                    return Err(EINVAL);
                }
                if a[1] != 0 && (sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize) {
                    return Err(EINVAL);
                }
                let old = self.sig.actions[sig];
                if a[1] != 0 {
                    let mut act = self.read_guest::<32>(a[1])?;
                    // SIGKILL and SIGSTOP are never in a handler's mask (sigaction(2)).
                    let m = u64::from_le_bytes(act[24..32].try_into().expect("8"))
                        & !(1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1));
                    act[24..32].copy_from_slice(&m.to_le_bytes());
                    self.sig.actions[sig] = act;
                    // Where the kernel decides by the action (ignored signals, job-control
                    // stops, SIGCHLD's flags for the VMM's host children), the host follows.
                    self.sig.mirror(sig as i32);
                    // A pending signal whose action is now to ignore it is discarded, blocked
                    // or not (sigaction(2)).
                    if self.sig.action_ignores(sig as i32) {
                        self.sig.discard(sig as i32);
                    }
                }
                if a[2] != 0 {
                    self.write_guest(a[2], &old)?;
                }
                ok(0)
            }
            libc::SYS_rt_sigprocmask => {
                if a[3] != 8 {
                    return Err(EINVAL);
                }
                let old = self.sig.mask;
                if a[1] != 0 {
                    let set = u64::from_le_bytes(self.read_guest::<8>(a[1])?);
                    // SIGKILL and SIGSTOP can never be blocked (sigprocmask(2)).
                    let never = 1u64 << (libc::SIGKILL - 1) | 1u64 << (libc::SIGSTOP - 1);
                    self.sig.mask = match a[0] as i32 {
                        libc::SIG_BLOCK => old | set,
                        libc::SIG_UNBLOCK => old & !set,
                        libc::SIG_SETMASK => set,
                        _ => return Err(EINVAL),
                    } & !never;
                }
                if a[2] != 0 {
                    self.write_guest(a[2], &old.to_le_bytes())?;
                }
                // Pending signals just unblocked arrive as the call returns.
                ok(0)
            }
            libc::SYS_rt_sigpending => {
                if a[1] > 8 {
                    return Err(EINVAL);
                }
                let set = (self.sig.all_pending() & self.sig.mask).to_le_bytes();
                self.write_guest(a[0], &set[..a[1] as usize])?;
                ok(0)
            }
            libc::SYS_sigaltstack => self.sigaltstack(a[0], a[1]),
            libc::SYS_rt_sigreturn => match self.sigreturn() {
                Ok(step) => Ok(step),
                Err(e) => {
                    crate::say!("mosvm: rt_sigreturn: {e:#}");
                    Ok(Step::Exit(Outcome::Signaled(libc::SIGSEGV)))
                }
            },
            libc::SYS_futex if self.th.mt.is_some() => self.futex_mt(a),
            libc::SYS_futex => self.futex(a),
            libc::SYS_kill | libc::SYS_tgkill | libc::SYS_tkill => self.kill_call(nr as i64, a),
            libc::SYS_sched_getaffinity => {
                if (a[0] as i32) < 0 {
                    return Err(EINVAL);
                }
                let n = (a[1] as usize).min(1024);
                let pid = a[0] as i32 as i64;
                if pid != 0 && pid != self.pid && !self.has_thread(pid) {
                    // Another process's: its home knows it (pids are home's).
                    let r = self.call_deputy(
                        libc::SYS_sched_getaffinity,
                        [pid as u64, n as u64, 0, 0, 0, 0],
                        vec![crate::deputy::Slot::Out(n)],
                    );
                    if r.ret < 0 {
                        return Err(-r.ret);
                    }
                    let b = r.outs.into_iter().next().unwrap_or_default();
                    self.write_guest(a[2], &b[..(r.ret as usize).min(b.len())])?;
                    return ok(r.ret);
                }
                let mut b = vec![0u8; n];
                // SAFETY: `b` has `n` bytes for the kernel to fill.
                let r = unsafe { libc::syscall(libc::SYS_sched_getaffinity, 0, n, b.as_mut_ptr()) };
                if r < 0 {
                    return Err(EINVAL);
                }
                self.write_guest(a[2], &b[..r as usize])?;
                ok(r as i64)
            }
            libc::SYS_sched_setaffinity => ok(0),
            libc::SYS_getcpu => {
                for p in [a[0], a[1]] {
                    if p != 0 {
                        self.write_guest(p, &0u32.to_le_bytes())?;
                    }
                }
                ok(0)
            }
            libc::SYS_sysinfo => {
                // The host's figures, with the RAM of a machine of `--mem` bytes.
                let (total, free) = self.guest_ram();
                self.host_struct(a[0], 112, |p| {
                    // SAFETY: `p` points at a buffer of sizeof(struct sysinfo) bytes, which
                    // sysinfo fills in and the rest reads and writes.
                    unsafe {
                        let s = p as *mut libc::sysinfo;
                        if libc::sysinfo(s) != 0 {
                            return -1;
                        }
                        let unit = u64::from((*s).mem_unit.max(1));
                        let total = total / unit;
                        (*s).totalram = total;
                        (*s).freeram = (*s).freeram.min(free / unit);
                        (*s).sharedram = (*s).sharedram.min(total);
                        (*s).bufferram = 0;
                        0
                    }
                })
            }
            libc::SYS_getrusage
                if ![
                    libc::RUSAGE_SELF,
                    libc::RUSAGE_CHILDREN,
                    libc::RUSAGE_THREAD,
                ]
                .contains(&(a[0] as i32)) =>
            {
                Err(EINVAL)
            }
            libc::SYS_getrusage => self.host_struct(a[1], 144, |p| {
                // SAFETY: `p` points at a buffer of sizeof(struct rusage) bytes.
                unsafe { libc::getrusage(libc::RUSAGE_SELF, p as *mut libc::rusage) as i64 }
            }),
            libc::SYS_times => {
                let mut b = [0u8; 32];
                // SAFETY: `b` is large enough for struct tms.
                let r = unsafe { libc::times(b.as_mut_ptr() as *mut libc::tms) } as i64;
                if a[0] != 0 {
                    self.write_guest(a[0], &b)?;
                }
                ok(r)
            }
            libc::SYS_prctl => self.prctl(a),
            libc::SYS_personality => ok(0),

            _ => Err(ENOSYS),
        }
    }

    /// prctl(2): the options programs use, on this process's own state; others EINVAL.
    fn prctl(&mut self, a: [u64; 6]) -> Result<Step, i64> {
        let ok = |v: i64| Ok(Step::Ret(v));
        let p = &mut self.prctl;
        let flag = |v: u64| if v <= 1 { Ok(v == 1) } else { Err(EINVAL) };
        match a[0] as i32 {
            libc::PR_SET_PDEATHSIG => {
                if a[1] > 64 {
                    return Err(EINVAL);
                }
                p.pdeathsig = a[1] as i32;
                // The parent is the VMM's host parent: the host sends the signal, which
                // reaches the guest like any other.
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, a[1] as libc::c_ulong) };
                ok(0)
            }
            libc::PR_GET_PDEATHSIG => {
                let v = p.pdeathsig;
                self.write_guest(a[1], &v.to_le_bytes())?;
                ok(0)
            }
            libc::PR_GET_DUMPABLE => ok(p.dumpable as i64),
            libc::PR_SET_DUMPABLE => {
                p.dumpable = flag(a[1])?;
                ok(0)
            }
            libc::PR_GET_NO_NEW_PRIVS if a[1..5] == [0; 4] => ok(p.no_new_privs as i64),
            libc::PR_SET_NO_NEW_PRIVS if a[1] == 1 && a[2..5] == [0; 3] => {
                p.no_new_privs = true;
                ok(0)
            }
            libc::PR_GET_TIMERSLACK => ok(p.timerslack_ns as i64),
            libc::PR_SET_TIMERSLACK => {
                p.timerslack_ns = if a[1] == 0 { 50_000 } else { a[1] };
                ok(0)
            }
            libc::PR_GET_CHILD_SUBREAPER => {
                let v = p.child_subreaper as i32;
                self.write_guest(a[1], &v.to_le_bytes())?;
                ok(0)
            }
            libc::PR_SET_CHILD_SUBREAPER => {
                p.child_subreaper = a[1] != 0;
                // Orphaned descendants are host processes: the host reparents them.
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, (a[1] != 0) as libc::c_ulong) };
                ok(0)
            }
            libc::PR_GET_SECCOMP | libc::PR_GET_THP_DISABLE => ok(0),
            // Capabilities are the home process's, as capget(2) and capset(2) are: the
            // bounding set, securebits and the ambient set are asked of (or changed) there.
            libc::PR_CAPBSET_READ
            | libc::PR_CAPBSET_DROP
            | libc::PR_GET_KEEPCAPS
            | libc::PR_SET_KEEPCAPS
            | libc::PR_GET_SECUREBITS
            | libc::PR_SET_SECUREBITS
            | libc::PR_CAP_AMBIENT => {
                let r = self.call_deputy(libc::SYS_prctl, a, vec![]);
                if r.ret < 0 {
                    Err(-r.ret)
                } else {
                    ok(r.ret)
                }
            }
            _ => match a[0] as i32 {
                libc::PR_SET_NAME => {
                    let s = self.space.mem.read_cstr(a[1], 4096).map_err(|_| EFAULT)?;
                    let n = s.len().min(15);
                    self.comm = [0; 16];
                    self.comm[..n].copy_from_slice(&s[..n]);
                    self.show_comm();
                    ok(0)
                }
                libc::PR_GET_NAME => {
                    self.write_guest(a[1], &self.comm.clone())?;
                    ok(0)
                }
                _ => Err(EINVAL),
            },
        }
    }

    fn host_struct(
        &mut self,
        va: u64,
        size: usize,
        f: impl FnOnce(*mut u8) -> i64,
    ) -> Result<Step, i64> {
        let mut b = vec![0u8; size];
        if f(b.as_mut_ptr()) != 0 {
            return Err(EINVAL);
        }
        self.write_guest(va, &b)?;
        Ok(Step::Ret(0))
    }

    fn arch_prctl(&mut self, code: u64, addr: u64) -> Result<Step, i64> {
        const SET_GS: u64 = 0x1001;
        const SET_FS: u64 = 0x1002;
        const GET_FS: u64 = 0x1003;
        const GET_GS: u64 = 0x1004;
        match code {
            SET_FS | SET_GS => {
                if addr >= crate::mm::USER_END {
                    return Err(EPERM);
                }
                let mut s = self.vcpu.get_sregs().map_err(|_| EINVAL)?;
                if code == SET_FS {
                    s.fs.base = addr;
                } else {
                    s.gs.base = addr;
                }
                self.vcpu.set_sregs(&s).map_err(|_| EINVAL)?;
                Ok(Step::Ret(0))
            }
            GET_FS | GET_GS => {
                let s = self.vcpu.get_sregs().map_err(|_| EINVAL)?;
                let v = if code == GET_FS { s.fs.base } else { s.gs.base };
                self.write_guest(addr, &v.to_le_bytes())?;
                Ok(Step::Ret(0))
            }
            _ => Err(EINVAL),
        }
    }

    fn prlimit(&mut self, pid: u64, res: u64, new: u64, old: u64) -> Result<Step, i64> {
        if pid != 0 && pid as i64 != self.pid {
            return Err(EPERM);
        }
        let r = res as usize;
        if r >= self.rlimits.len() {
            return Err(EINVAL);
        }
        let prev = self.rlimits[r];
        if new != 0 {
            let b = self.read_guest::<16>(new)?;
            let cur = u64::from_le_bytes(b[..8].try_into().expect("8"));
            let max = u64::from_le_bytes(b[8..].try_into().expect("8"));
            if cur > max {
                return Err(EINVAL);
            }
            // setrlimit(2): raising a hard limit takes CAP_SYS_RESOURCE; RLIMIT_NOFILE stays
            // within fs.nr_open.
            let privileged = has_sys_resource();
            if max > prev[1] && !privileged && !host_enforced(r) {
                return Err(EPERM);
            }
            if r == libc::RLIMIT_NOFILE as usize && max > nr_open() {
                return Err(EPERM);
            }
            if r == libc::RLIMIT_NOFILE as usize {
                // The deputy's descriptor table is what this limit bounds (EPERM above
                // fs.nr_open or when raising the hard limit unprivileged, as the host says).
                let got = self.deputy.call(Request {
                    nr: libc::SYS_prlimit64 as u64,
                    args: [0, r as u64, cur, max, 0, 0],
                    slots: vec![],
                });
                if got.ret < 0 {
                    return Err(-got.ret);
                }
            } else if host_enforced(r) {
                // The host enforces it on the VMM as it would on the program (SIGXFSZ and
                // EFBIG past RLIMIT_FSIZE, SIGXCPU/SIGKILL past RLIMIT_CPU, EAGAIN from fork
                // past RLIMIT_NPROC); its checks give Linux's errno.
                set_host_rlimit(r, [cur, max])?;
            }
            self.rlimits[r] = [cur, max];
            if r == libc::RLIMIT_STACK as usize {
                // How far the stack may grow from now on (its area's placement stays).
                self.space.stack_rlimit = cur;
            }
        }
        if old != 0 {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&prev[0].to_le_bytes());
            b[8..].copy_from_slice(&prev[1].to_le_bytes());
            self.write_guest(old, &b)?;
        }
        Ok(Step::Ret(0))
    }

    /// One line of JSON with the run's counters and phase times.
    pub fn stats_json(&self) -> String {
        let s = &self.stats;
        format!(
            "{{\"exits\":{},\"page_faults\":{},\"local\":{},\"home\":{},\"create_us\":{},\"load_us\":{},\"run_us\":{},\"guest_mem_used\":{}}}",
            s.exits, s.page_faults, s.local, s.home, s.create_us, s.load_us, s.run_us, self.space.mem.used()
        )
    }

    /// Whether the process is locked to its node (`--lock`, or `mosvm lock`).
    pub fn locked(&self) -> bool {
        self.lock.load(Ordering::SeqCst)
    }

    /// The shared lock flag, for the thread that applies the node's `lock`/`unlock`.
    pub fn lock_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.lock.clone()
    }

    /// The process's system-call counts, [sent home, served locally], kept current while it
    /// runs (for the node's per-process statistics, paper §4.3).
    pub fn call_counts(&self) -> std::sync::Arc<[std::sync::atomic::AtomicU64; 2]> {
        self.calls.clone()
    }

    /// The program's path.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// The program's path as other threads see it (it changes at execve).
    pub fn program_cell(&self) -> std::sync::Arc<std::sync::Mutex<String>> {
        self.program_cell.clone()
    }

    /// Keep the program's path in `cell` from now on (a process that came home keeps the cell
    /// its home's registration watches).
    pub fn share_program_cell(&mut self, cell: std::sync::Arc<std::sync::Mutex<String>>) {
        if let Ok(mut p) = cell.lock() {
            *p = self.program.display().to_string();
        }
        self.program_cell = cell;
    }

    /// Whether `--stats` was given.
    pub fn wants_stats(&self) -> bool {
        self.opts.stats
    }
}

impl Vm {
    /// Other processes see the guest's name as the VMM's (`ps`, `pgrep`, `/proc/PID/comm`).
    fn show_comm(&self) {
        // SAFETY: `comm` is 16 bytes, NUL-terminated (at most 15 bytes of name).
        unsafe { libc::prctl(libc::PR_SET_NAME, self.comm.as_ptr()) };
    }
}

/// fs.nr_open: the most descriptors RLIMIT_NOFILE may allow.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(crate::deputy::NR_OPEN)
}

/// Limits the host enforces on the VMM process as Linux would on the program itself.
fn host_enforced(r: usize) -> bool {
    [
        libc::RLIMIT_FSIZE,
        libc::RLIMIT_CPU,
        libc::RLIMIT_NPROC,
        libc::RLIMIT_LOCKS,
        libc::RLIMIT_SIGPENDING,
        libc::RLIMIT_MSGQUEUE,
        libc::RLIMIT_NICE,
        libc::RLIMIT_RTPRIO,
        libc::RLIMIT_RTTIME,
    ]
    .iter()
    .any(|&x| x as usize == r)
}

/// setrlimit(2) of the VMM process itself. Errors: the host's errno.
fn set_host_rlimit(r: usize, [cur, max]: [u64; 2]) -> Result<(), i64> {
    let l = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `l` is a valid rlimit; the resource number was checked by the caller.
    if unsafe { libc::setrlimit(r as _, &l) } != 0 {
        return Err(last_errno());
    }
    Ok(())
}

fn getrandom(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                0,
            )
        };
        if r <= 0 {
            break;
        }
        done += r as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn outcomes_travel_as_wire_statuses() {
        assert_eq!(Outcome::Exited(3).to_wire(), 3);
        assert_eq!(Outcome::Signaled(11).to_wire(), 267);
        assert_eq!(Outcome::from_wire(267), Outcome::Signaled(11));
        assert_eq!(Outcome::from_wire(3), Outcome::Exited(3));
        assert_eq!(signal_name(15), "SIGTERM");
    }
}
