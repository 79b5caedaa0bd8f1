//! fork(2), vfork(2), and clone(2)/clone3(2) without CLONE_THREAD: the child is a new
//! process at home whose deputy is a host fork of the parent's (DESIGN.md, "Process trees"):
//! at home the VMM and the deputy are one process, so the VMM forks itself. The child
//! inherits descriptors, cwd, credentials, process group and terminal from the host fork, its
//! host pid is its pid, its guest memory is the host's copy-on-write copy of the parent's
//! (nothing is copied byte by byte), and it gets a new VM and vCPU (a KVM VM cannot be used
//! across a host fork) loaded with the parent's registers and rax = 0. Its exit status (or
//! the signal that kills it) is the host process's, so the parent's wait4 sees Linux's.

use super::pause::{GUEST_TID, HOST_PENDING, IMMEDIATE_EXIT, WAKE, WATCHDOG};
use super::{Step, Vm, EINVAL, ENOSYS};
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;

const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_PARENT: u64 = 0x8000;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SYSVSEM: u64 = 0x4_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;
/// A vfork child's record of its program break (a page record's address never is this).
const BRK_RECORD: u64 = u64::MAX;

/// What a new process (not a thread) may ask for here.
const SUPPORTED: u64 = CLONE_PIDFD
    | CLONE_VM
    | CLONE_VFORK
    | CLONE_SYSVSEM
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID
    | CLONE_CHILD_SETTID
    | 0xff;

/// One clone request, from clone(2)'s registers or clone3(2)'s `struct clone_args`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CloneArgs {
    pub flags: u64,
    /// The child's stack pointer (0: the parent's).
    pub stack: u64,
    pub parent_tid: u64,
    pub child_tid: u64,
    pub tls: u64,
    /// Where CLONE_PIDFD's descriptor goes (clone(2): the parent_tid argument).
    pub pidfd: u64,
}

impl CloneArgs {
    /// clone(flags, stack, parent_tid, child_tid, tls) (x86-64 argument order).
    pub(super) fn from_clone(a: [u64; 6]) -> CloneArgs {
        CloneArgs {
            flags: a[0],
            stack: a[1],
            parent_tid: a[2],
            child_tid: a[3],
            tls: a[4],
            pidfd: a[2],
        }
    }
}

impl Vm {
    /// clone3(args, size): `struct clone_args` (flags, pidfd, child_tid, parent_tid,
    /// exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup).
    pub(super) fn clone3(&mut self, a: [u64; 6]) -> Result<Step, i64> {
        if a[1] < 64 || a[1] > 4096 {
            return Err(EINVAL);
        }
        let b = self.read_guest::<88>(a[0]).or_else(|e| {
            // A size-64 struct (the first version) may end at the end of memory.
            if a[1] == 64 {
                let s = self.read_guest::<64>(a[0])?;
                let mut b = [0u8; 88];
                b[..64].copy_from_slice(&s);
                Ok(b)
            } else {
                Err(e)
            }
        })?;
        let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8"));
        let (flags, exit_signal, stack, stack_size) = (w(0), w(4), w(5), w(6));
        if exit_signal > 64 || flags & 0xff != 0 || (stack == 0) != (stack_size == 0) {
            return Err(EINVAL);
        }
        if a[1] >= 80 && w(9) != 0 {
            return Err(ENOSYS); // set_tid: pid namespaces
        }
        self.clone_process(CloneArgs {
            flags: flags | exit_signal,
            stack: if stack != 0 { stack + stack_size } else { 0 },
            parent_tid: w(3),
            child_tid: w(2),
            tls: w(7),
            pidfd: w(1),
        })
    }

    /// fork(2) and vfork(2).
    pub(super) fn fork_call(&mut self, vfork: bool) -> Result<Step, i64> {
        let flags = libc::SIGCHLD as u64 | if vfork { CLONE_VM | CLONE_VFORK } else { 0 };
        self.clone_process(CloneArgs {
            flags,
            ..Default::default()
        })
    }

    /// A new process: see the module's description. CLONE_VM is honoured only with
    /// CLONE_VFORK (the parent waits until the child execs or exits, so a child that only
    /// does that cannot tell its memory is a copy).
    pub(super) fn clone_process(&mut self, c: CloneArgs) -> Result<Step, i64> {
        let f = c.flags;
        if f & CLONE_THREAD != 0 {
            return self.clone_thread(c);
        }
        // clone(2): CLONE_SIGHAND needs CLONE_VM, CLONE_THREAD needs CLONE_SIGHAND.
        if f & CLONE_SIGHAND != 0 && f & CLONE_VM == 0 {
            return Err(EINVAL);
        }
        // clone(2) passes CLONE_PIDFD's pointer where CLONE_PARENT_SETTID's goes.
        if f & CLONE_PIDFD != 0 && f & CLONE_PARENT_SETTID != 0 && c.pidfd == c.parent_tid {
            return Err(EINVAL);
        }
        let unsupported = f & !SUPPORTED;
        let shared_vm = f & CLONE_VM != 0 && f & CLONE_VFORK == 0;
        if unsupported != 0 || shared_vm {
            if self.warned.insert(0x7000_0002) {
                let what = if shared_vm {
                    "CLONE_VM without CLONE_VFORK".to_string()
                } else {
                    format!(
                        "flags {unsupported:#x}{}",
                        if unsupported & (CLONE_FS | CLONE_FILES | CLONE_PARENT | CLONE_PIDFD) != 0
                        {
                            " (shared fs, files, parent or pidfd)"
                        } else {
                            ""
                        }
                    )
                };
                crate::say!(
                    "mosvm: {}: clone with {what} is not supported yet",
                    self.program.display()
                );
            }
            return Err(ENOSYS);
        }
        if self.th.mt.is_some() && self.tid != self.pid && self.th.fork_snapshot.is_none() {
            // The child's only thread runs on the host's first thread (see vm/thread.rs).
            return self.delegate_fork(c);
        }
        // Away from home the child's deputy is forked at home first, and its pid is the
        // child's (this host's fork below is only the child's VMM).
        let away_pid = if self.deputy.is_local() {
            None
        } else {
            match self.deputy.fork_away() {
                Some(Ok(pid)) => Some(pid),
                Some(Err(e)) => return Err(e),
                None => {
                    self.wait_for_home("fork")?;
                    None
                }
            }
        };
        self.home_wait = None;
        // The parent's state as the child starts from it, taken before the host fork.
        let mut st = match self.th.fork_snapshot.take() {
            Some(st) => st,
            None => {
                if self.th.mt.is_some() {
                    self.load_root_mt();
                } else {
                    self.load_new_root().map_err(|_| EINVAL)?;
                }
                crate::snapshot::capture(&mut self.vcpu).map_err(|_| EINVAL)?
            }
        };
        // The child starts on the newest page tables (another thread may have replaced the
        // root since a delegated fork's state was taken; the old tables are not the child's).
        st.sregs.cr3 = self.space.mem.cr3();
        let layout = self.space.mem.layout();
        let vfork_pipe = if f & CLONE_VFORK != 0 {
            let mut p = [0i32; 2];
            // SAFETY: pipe2 fills the two descriptors it is given.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(super::last_errno());
            }
            Some(p)
        } else {
            None
        };
        // Pages still arriving by post-copy would be missing from the child's copy of the
        // memory (its mapping is not registered): they arrive first.
        crate::postcopy::settle();
        // Signals sent to the child before it has its own plumbing stay pending in the kernel
        // until it has (fork(2) leaves the parent's pending signals behind).
        let old_mask = super::pause::block_all_signals();
        // SAFETY: fork(2) in a process whose other threads hold no lock the child needs: the
        // child touches only its own copy of this thread's state, starts its own helper
        // threads, and re-creates every KVM object before use.
        let pid = unsafe { libc::fork() };
        if pid != 0 {
            super::pause::restore_mask(&old_mask);
        }
        if pid < 0 {
            if let Some(child) = away_pid {
                // The child's deputy at home has no guest to serve: end it, and reap it.
                self.call_deputy(libc::SYS_kill, [child as u64, 9, 0, 0, 0, 0], vec![]);
                self.call_deputy(libc::SYS_wait4, [child as u64, 0, 0, 0, 0, 0], vec![]);
            }
            if let Some(p) = vfork_pipe {
                // SAFETY: both descriptors are ours.
                unsafe {
                    libc::close(p[0]);
                    libc::close(p[1]);
                }
            }
            return Err(super::last_errno());
        }
        if pid > 0 {
            // The guest's pid of the child: its deputy's at home when away.
            let pid = away_pid.map(|p| p as i32).unwrap_or(pid);
            if f & CLONE_PIDFD != 0 {
                // A pidfd of the child, in the guest's table (close-on-exec, as Linux's).
                let fd =
                    self.call_deputy(libc::SYS_pidfd_open, [pid as u64, 0, 0, 0, 0, 0], vec![]);
                if fd.ret >= 0 {
                    let _ = self.write_guest(c.pidfd, &(fd.ret as i32).to_le_bytes());
                }
            }
            if f & CLONE_PARENT_SETTID != 0 {
                let _ = self.write_guest(c.parent_tid, &pid.to_le_bytes());
            }
            if let Some(p) = vfork_pipe {
                // vfork: wait until the child execs or exits (its end closes), taking back
                // the pages it wrote, which natively it shares with us.
                // SAFETY: closing our copy of the write end.
                unsafe { libc::close(p[1]) };
                // SAFETY: the read end is ours; File closes it once.
                let mut pipe = unsafe { std::fs::File::from_raw_fd(p[0]) };
                let mut rec = vec![0u8; 8 + 4096];
                while std::io::Read::read_exact(&mut pipe, &mut rec).is_ok() {
                    let va = u64::from_le_bytes(rec[..8].try_into().expect("8"));
                    if va == BRK_RECORD {
                        // The child moved the break (its malloc grew the heap): so does
                        // the parent, whose heap the child's writes describe.
                        let brk = u64::from_le_bytes(rec[8..16].try_into().expect("8"));
                        self.space.set_brk(brk);
                        continue;
                    }
                    if self.space.accessible(va, 4096, true) == 4096 {
                        let _ = self.write_guest(va, &rec[8..]);
                    }
                }
            }
            return Ok(Step::Ret(pid as i64));
        }
        // The child: what the parent's handler recorded before the fork was the parent's;
        // signals for the child wait in the kernel until its VM is set up and its mask back
        // (a signal handled meanwhile would interrupt the KVM calls that set it up).
        HOST_PENDING.store(0, Ordering::SeqCst);
        if let Some(p) = vfork_pipe {
            // SAFETY: the read end is the parent's business.
            unsafe { libc::close(p[0]) };
            self.vfork_done = Some(p[1]);
        }
        let became = self.become_child(st, layout, &c, away_pid);
        // The plumbing is up: the signals sent to the child meanwhile come in now.
        super::install_signal_handlers();
        self.sig.mirror_all();
        super::pause::restore_mask(&old_mask);
        super::pause::unblock_guest_signals();
        match became {
            Ok(step) => Ok(step),
            Err(e) => {
                crate::say!("mosvm: {}: fork: {e:#}", self.program.display());
                // SAFETY: ending the child process at once; nothing of the parent's is used.
                unsafe { libc::_exit(127) }
            }
        }
    }

    /// In the child of the host fork: a new VM and vCPU over this process's copy of guest
    /// memory, the parent's registers with rax = 0, fresh signal plumbing.
    fn become_child(
        &mut self,
        st: crate::snapshot::VcpuState,
        layout: crate::memory::Layout,
        c: &CloneArgs,
        away_pid: Option<i64>,
    ) -> anyhow::Result<Step> {
        // Host signal plumbing: a watchdog thread of its own (started once the VM is up).
        IMMEDIATE_EXIT.store(std::ptr::null_mut(), Ordering::SeqCst);
        super::pause::forget_threads();
        WATCHDOG.store(-1, Ordering::SeqCst);
        WAKE.store(-1, Ordering::SeqCst);
        let host = crate::cpu::host()?;
        let vm = std::sync::Arc::new(host.kvm.create_vm()?);
        let shares_memory = c.flags & CLONE_VM != 0;
        self.space.mem.forked(layout, vm.clone(), shares_memory)?;
        if shares_memory {
            // Start the log of what this child writes: its parent gets those pages back.
            let _ = self.space.mem.view().take_dirty();
            self.vfork_shared = true;
        }
        let mut vcpu = crate::cpu::create_vcpu(host, &vm, &self.space.mem, 0, 0)?;
        crate::snapshot::restore(&mut vcpu, &st)?;
        // The old VM's objects belong to the parent: dropping our copies only unmaps and
        // closes them here.
        self.vcpu = super::thread::VcpuSlot(Some(vcpu));
        self._vm = vm;
        self.start_clock();
        let ie = &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.store(ie, Ordering::SeqCst);
        self.pause.inner.immediate_exit.store(ie, Ordering::SeqCst);
        // SAFETY: gettid and pthread_self have no preconditions.
        let (tid, me) = unsafe { (libc::syscall(libc::SYS_gettid), libc::pthread_self()) };
        GUEST_TID.store(tid as i32, Ordering::SeqCst);
        self.cur.host = tid as i32;
        self.pause.inner.thread.store(me, Ordering::SeqCst);
        self.pause.clear();
        self.pid = match away_pid {
            // (The parent's link home is not this process's: the embedding program gives
            // the child its own before the guest runs on.)
            Some(pid) => pid,
            None => {
                self.deputy
                    .call(crate::deputy::Request {
                        nr: libc::SYS_getpid as u64,
                        args: [0; 6],
                        slots: vec![],
                    })
                    .ret
            }
        };
        self.deputy.forked();
        // Locks other threads of the parent held at the fork stay held in the child's copy:
        // a cell they share gets a new one.
        self.program_cell =
            std::sync::Arc::new(std::sync::Mutex::new(self.program.display().to_string()));
        self.sig.pending = 0;
        self.sig.queue.clear();
        // Only the forking thread goes on in the child (fork(2)).
        self.th.others.clear();
        self.th.delegated = None;
        self.th.main_exited = false;
        self.th.leader_status = None;
        self.space.mem.hold_retired(false);
        // (The new vCPU keeps this thread's TSS and stack: new threads' ids start after
        // every slot the parent used.)
        self.th.spare_vcpus.clear();
        self.th.mt = None;
        self.tid = self.pid;
        // Timers are not inherited (fork(2)); the host fork made none in the child.
        self.timers.clear();
        self.robust_list = 0;
        self.prctl.pdeathsig = 0;
        self.home_wait = None;
        self.last_fault = None;
        self.stats = super::Stats::default();
        self.forked = true;
        let mut regs = st.regs;
        if c.flags & CLONE_CHILD_SETTID != 0 {
            let _ = self.write_guest(c.child_tid, &(self.pid as i32).to_le_bytes());
        }
        if c.flags & CLONE_PARENT_SETTID != 0 {
            let _ = self.write_guest(c.parent_tid, &(self.pid as i32).to_le_bytes());
        }
        if c.flags & CLONE_CHILD_CLEARTID != 0 {
            self.clear_child_tid = c.child_tid;
        }
        if c.flags & CLONE_SETTLS != 0 {
            crate::cpu::set_msrs(&self.vcpu, &[(0xc000_0100, c.tls)])?;
        }
        // The child returns from the call with 0, on its own stack if it was given one.
        regs.rax = 0;
        regs.rip = regs.rcx;
        regs.rflags = regs.r11;
        if c.stack != 0 {
            regs.rsp = c.stack;
        }
        Ok(Step::Resume(regs))
    }

    /// The child of a fork has run: the embedding program re-registers it (its node knows the
    /// parent only), and away from home gives it its own link home ([`Vm::replace_deputy`]).
    /// True once per fork.
    pub fn take_forked(&mut self) -> bool {
        std::mem::take(&mut self.forked)
    }

    /// Put `deputy` in place of the guest's deputy; returns the one it replaces.
    pub fn replace_deputy(
        &mut self,
        deputy: Box<dyn crate::deputy::Deputy>,
    ) -> Box<dyn crate::deputy::Deputy> {
        std::mem::replace(&mut self.deputy, deputy)
    }

    /// The guest's pid (its home process's).
    pub fn pid(&self) -> i64 {
        self.pid
    }

    /// A vfork child execs or exits: its parent goes on, with the pages the child wrote
    /// (a CLONE_VM child writes the parent's memory natively: glibc's posix_spawn reports a
    /// failed exec so).
    pub(super) fn release_vfork_parent(&mut self) {
        let Some(fd) = self.vfork_done.take() else {
            return;
        };
        if std::mem::take(&mut self.vfork_shared) {
            if let Ok(dirty) = self.space.mem.view().take_dirty() {
                let dirty: std::collections::HashSet<u64> = dirty.into_iter().collect();
                // SAFETY: the write end is ours; File closes it once, below.
                let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
                let mut rec = vec![0u8; 8 + 4096];
                rec[..8].copy_from_slice(&BRK_RECORD.to_le_bytes());
                rec[8..16].copy_from_slice(&self.space.brk.to_le_bytes());
                let _ = std::io::Write::write_all(&mut pipe, &rec);
                rec[8..16].fill(0);
                // Guest RAM the child wrote (the dirty log), and every page of its writable
                // private file mappings (a library's data: host copy-on-write memory in the
                // file window, which the log does not see).
                let mut pages: Vec<u64> = self
                    .space
                    .mem
                    .user_pages()
                    .into_iter()
                    .filter(|(_, gpa)| dirty.contains(&(gpa / 4096)))
                    .map(|(va, _)| va)
                    .collect();
                for (start, v) in self.space.vmas() {
                    if v.window.is_some() && v.kind == crate::mm::VmaKind::File && v.prot & 2 != 0 {
                        pages.extend(
                            (start..v.end)
                                .step_by(4096)
                                .filter(|va| self.space.mem.is_mapped(*va)),
                        );
                    }
                }
                for va in pages {
                    rec[..8].copy_from_slice(&va.to_le_bytes());
                    if self.space.mem.read(va, &mut rec[8..]).is_err() {
                        continue;
                    }
                    if std::io::Write::write_all(&mut pipe, &rec).is_err() {
                        break;
                    }
                }
                return;
            }
        }
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(fd) };
    }
}
