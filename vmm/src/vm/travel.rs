//! A guest on the move: what travels besides guest memory (vCPU and VMM state), how a paused
//! guest is captured, and how it is recreated at the destination.

use super::*;

/// The VMM's side of a guest: everything besides guest memory and the vCPU.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmmState {
    program: PathBuf,
    mem: u64,
    mem_label: String,
    trace: bool,
    lock: bool,
    stats: bool,
    used: u64,
    pml4: u64,
    /// Frames below `used` that hold nothing (unmapped pages, retired page tables).
    free_frames: Vec<u64>,
    vmas: Vec<(u64, crate::mm::Vma)>,
    brk_start: u64,
    brk: u64,
    /// Where top-down placement starts (fixed at exec by RLIMIT_STACK).
    mmap_base: u64,
    pid: i64,
    sig_actions: Vec<Vec<u8>>,
    /// Signals pending for the process: their `siginfo_t`s, oldest first.
    sig_queue: Vec<Vec<u8>>,
    /// The thread whose vCPU is the VM's first (the process's first thread but after an
    /// execve by another): its own state.
    thread: thread::ThreadMig,
    /// The other threads, each with its vCPU's state.
    threads: Vec<thread::ThreadMig>,
    /// TSS and exception stack tops of vCPUs that exited threads left for new ones.
    spare_tss: Vec<(u64, u64)>,
    /// ITIMER_REAL, _VIRTUAL, _PROF: (interval, value) in µs.
    itimers: Vec<[u64; 2]>,
    /// POSIX timers and what was left of them.
    posix_timers: Vec<timers::PosixTimer>,
    rlimits: Vec<[u64; 2]>,
    comm: Vec<u8>,
    prctl: Prctl,
    stack_layout: loader::StackLayout,
    vmm_returns: Option<bool>,
    /// The guest's CLOCK_MONOTONIC, _RAW and BOOTTIME when it stopped, ns.
    guest_mono_ns: i64,
    guest_raw_ns: i64,
    guest_boot_ns: i64,
    realtime_offset_ns: i64,
    /// The host's CLOCK_REALTIME when the guest stopped, ns, on the destination's clock once
    /// [`MigState::shift_realtime`] has been applied: the destination adds the time since to
    /// the guest's monotonic clocks, which keep running through a move as through any pause.
    captured_real_ns: i64,
    counters: [u64; 4],
    signalfds: Vec<signalfd::SignalFd>,
    /// An execve that completes at home.
    exec_home: Option<exec::ExecHome>,
}

/// A VM and vCPU created ahead of a migrating guest's state (see [`Vm::prepare`]).
pub struct Prepared {
    vcpu: VcpuFd,
    vm: std::sync::Arc<VmFd>,
    mem: GuestMem,
}

impl Prepared {
    /// Guest memory, to receive pages into.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }
}

/// A stopped guest, ready to travel: vCPU state plus VMM state (guest memory goes separately).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MigState {
    /// The vCPU.
    pub vcpu: crate::snapshot::VcpuState,
    /// The VMM.
    pub vmm: VmmState,
}

impl VmmState {
    /// The guest's address space over `mem` (its memory, pages already in): the layout of
    /// guest memory, the areas, the break, where placement starts and how far the stack may
    /// grow. Checked, since it comes from another node: `Err` if it cannot be this guest's.
    /// Takes the areas and the free frames out of the state.
    pub fn address_space(&mut self, mut mem: GuestMem) -> Result<AddressSpace> {
        anyhow::ensure!(
            mem.size() >= self.mem,
            "guest memory smaller than the guest's"
        );
        mem.restore_layout(self.used, self.pml4, std::mem::take(&mut self.free_frames))
            .map_err(|_| anyhow::anyhow!("guest state does not fit its own memory size"))?;
        let mut space = AddressSpace::new(mem);
        space
            .restore(std::mem::take(&mut self.vmas), self.brk_start, self.brk)
            .map_err(|e| anyhow::anyhow!("guest state holds an impossible {e}"))?;
        anyhow::ensure!(
            self.mmap_base.is_multiple_of(crate::memory::PAGE)
                && self.mmap_base <= crate::mm::USER_END,
            "guest state holds an impossible placement base {:#x}",
            self.mmap_base
        );
        space.mmap_base = self.mmap_base;
        if let Some(stack) = self.rlimits.get(libc::RLIMIT_STACK as usize) {
            space.stack_rlimit = stack[0];
        }
        Ok(space)
    }
}

/// The longest a move may have kept the guest stopped for its monotonic clocks to be taken
/// forward by it, ns (a longer gap is a wrong clock estimate).
const MAX_MOVE_GAP_NS: i64 = 60_000_000_000;

/// The most bytes a guest's vCPU and VMM state may take (far above any real one).
const STATE_LIMIT: usize = 64 << 20;

impl MigState {
    /// Encode with bincode.
    pub fn encode(&self) -> Result<Vec<u8>> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .context("encoding guest state")
    }

    /// Decode what [`MigState::encode`] produced.
    pub fn decode(bytes: &[u8]) -> Result<MigState> {
        // No length inside may claim more than the bytes that came (a bound on allocation).
        let limited = bincode::config::standard().with_limit::<{ STATE_LIMIT }>();
        anyhow::ensure!(
            bytes.len() <= STATE_LIMIT,
            "guest state of {} bytes",
            bytes.len()
        );
        let (s, n) =
            bincode::serde::decode_from_slice(bytes, limited).context("decoding guest state")?;
        anyhow::ensure!(n == bytes.len(), "trailing bytes after guest state");
        Ok(s)
    }

    /// The destination's wall clock reads `delta_ns` ahead of this host's: keep the guest on
    /// home's wall-clock time there.
    pub fn shift_realtime(&mut self, delta_ns: i64) {
        self.vmm.realtime_offset_ns -= delta_ns;
        self.vmm.captured_real_ns += delta_ns;
    }

    /// Bytes of guest physical memory the guest had handed out.
    pub fn mem_used(&self) -> u64 {
        self.vmm.used
    }
}

impl Vm {
    /// Capture a paused guest: its vCPU and VMM state (guest memory is read separately,
    /// through [`Vm::memory_view`]). The deputy is handed back for the guest's next home.
    pub fn capture(&mut self) -> Result<MigState> {
        let (threads, spare_tss) = if self.th.mt.is_some() {
            self.others_mig()
                .map_err(|e| anyhow::anyhow!("the process stays here: {e}"))?
        } else {
            (Vec::new(), Vec::new())
        };
        anyhow::ensure!(
            !self.space.holds_shared(),
            "the process holds a shared mapping and stays at home (paper section 4.2)"
        );
        // File pages come along as private copies (the file stays at home).
        self.space
            .materialize()
            .map_err(|e| anyhow::anyhow!("copying file mappings: errno {e}"))?;
        self.load_new_root()?;
        let vcpu = crate::snapshot::capture(&mut self.vcpu)?;
        // Signals the host gave `mosvm run` until now travel in the pending queue.
        self.take_host();
        let vmm = VmmState {
            program: self.program.clone(),
            mem: self.opts.mem,
            mem_label: self.opts.mem_label.clone(),
            trace: self.opts.trace,
            lock: self.locked(),
            stats: self.opts.stats,
            used: self.space.mem.used(),
            pml4: self.space.mem.cr3(),
            free_frames: self.space.mem.free_list(),
            vmas: self.space.vmas().map(|(s, v)| (s, v.clone())).collect(),
            brk_start: self.space.brk_start,
            brk: self.space.brk,
            mmap_base: self.space.mmap_base,
            pid: self.pid,
            sig_actions: self.sig.actions.iter().map(|a| a.to_vec()).collect(),
            sig_queue: self.sig.queue.iter().map(|b| b.to_vec()).collect(),
            thread: self.current_mig(),
            threads,
            spare_tss,
            itimers: signal::itimers_now(),
            posix_timers: self.timers_now(),
            rlimits: self.rlimits.to_vec(),
            comm: self.comm.to_vec(),
            prctl: self.prctl.clone(),
            stack_layout: self.stack_layout,
            vmm_returns: self.vmm_returns,
            // (As the guest last saw them: its time page's line, else the host's clock.)
            guest_mono_ns: self.guest_now(libc::CLOCK_MONOTONIC),
            guest_raw_ns: self.guest_now(libc::CLOCK_MONOTONIC_RAW),
            guest_boot_ns: self.guest_now(libc::CLOCK_BOOTTIME),
            realtime_offset_ns: self.offsets.realtime,
            captured_real_ns: time::host_now(libc::CLOCK_REALTIME) as i64,
            counters: [
                self.stats.exits,
                self.stats.local,
                self.stats.home,
                self.stats.page_faults,
            ],
            signalfds: self.signalfds.clone(),
            exec_home: self.exec_home.clone(),
        };
        Ok(MigState { vcpu, vmm })
    }

    /// Give up the VM (after it has moved away) and keep its deputy. The interval timers
    /// went with the guest: they stop here.
    pub fn into_deputy(mut self) -> Box<dyn Deputy> {
        self.end_threads();
        signal::set_itimers(&[[0, 0]; 3]);
        self.drop_host_timers();
        self.deputy
    }

    /// Guest memory as a migration thread sees it.
    pub fn memory_view(&self) -> crate::memory::MemView {
        self.space.mem.view()
    }

    /// Recreate a captured guest: a new VM with the same memory layout and vCPU state. Its
    /// pages must be written (`space.mem.write_page`) before it runs.
    pub fn restore(st: MigState, deputy: Box<dyn Deputy>) -> Result<Vm> {
        let mem = GuestMem::new(st.vmm.mem)?;
        Self::restore_into(mem, st, deputy)
    }

    /// Like [`Vm::restore`], into guest memory that already holds the pages (received while
    /// the source still ran).
    pub fn restore_into(mem: GuestMem, st: MigState, deputy: Box<dyn Deputy>) -> Result<Vm> {
        Self::restore_prepared(Self::prepare(mem)?, st, deputy)
    }

    /// Create the VM, its memory slots and its vCPU ahead of the guest's state, so the
    /// switch-over of a migration only has to load registers.
    pub fn prepare(mut mem: GuestMem) -> Result<Prepared> {
        let host = cpu::host()?;
        mem.cover_all()
            .map_err(|_| anyhow::anyhow!("cannot register guest memory"))?;
        let vm = cpu::create_vm(host, &mut mem)?;
        let vcpu = cpu::create_vcpu(host, &vm, &mem, 0, 0)?;
        Ok(Prepared { vcpu, vm, mem })
    }

    /// Finish [`Vm::prepare`] with the guest's state.
    pub fn restore_prepared(p: Prepared, st: MigState, deputy: Box<dyn Deputy>) -> Result<Vm> {
        let Prepared { mut vcpu, vm, mem } = p;
        let mut v = st.vmm;
        let (first, threads, spare) = (
            std::mem::take(&mut v.thread),
            std::mem::take(&mut v.threads),
            std::mem::take(&mut v.spare_tss),
        );
        let posix_timers = std::mem::take(&mut v.posix_timers);
        let space = v.address_space(mem)?;
        crate::snapshot::restore(&mut vcpu, &st.vcpu)?;
        let mut sig = Signals::new();
        for (dst, src) in sig.actions.iter_mut().zip(&v.sig_actions) {
            if src.len() == 32 {
                dst.copy_from_slice(src);
            }
        }
        sig.mask = v.thread.mask();
        for b in &v.sig_queue {
            if let Ok(info) = <[u8; 128]>::try_from(b.as_slice()) {
                let s = i32::from_le_bytes(info[..4].try_into().expect("4"));
                if (1..=64).contains(&s) {
                    sig.pending |= 1 << (s - 1);
                    sig.queue.push_back(info);
                }
            }
        }
        signal::set_itimers(&v.itimers);
        sig.mirror_all();
        let host = cpu::host()?;
        let mut rlimits = [[u64::MAX; 2]; 16];
        for (d, s) in rlimits.iter_mut().zip(&v.rlimits) {
            *d = *s;
        }
        // The limits the host enforces hold on this host too.
        for (r, l) in rlimits.iter().enumerate() {
            if host_enforced(r) {
                let _ = set_host_rlimit(r, *l);
            }
        }
        let mut comm = [0u8; 16];
        let n = v.comm.len().min(16);
        comm[..n].copy_from_slice(&v.comm[..n]);
        let [exits, local, home, page_faults] = v.counters;
        let shown: String;
        let mut vm = Vm {
            vcpu: thread::VcpuSlot(Some(vcpu)),
            tid: v.pid,
            th: Default::default(),
            cur: Default::default(),
            signalfds: Vec::new(),
            _vm: vm,
            space,
            deputy,
            opts: Options {
                mem: v.mem,
                mem_label: v.mem_label,
                trace: v.trace,
                lock: v.lock,
                stats: v.stats,
            },
            program: {
                shown = v.program.display().to_string();
                v.program
            },
            pid: v.pid,
            sig,
            xstate: (cpu::xstate_size(host), cpu::guest_xcr0(host)),
            rlimits,
            comm,
            prctl: v.prctl,
            stack_layout: v.stack_layout,
            vmm_returns: v.vmm_returns,
            warned: Default::default(),
            last_fault: None,
            home_wait: None,
            robust_list: 0,
            clear_child_tid: 0,
            forked: false,
            vfork_done: None,
            vfork_shared: false,
            exec_home: v.exec_home,
            program_cell: std::sync::Arc::new(std::sync::Mutex::new(shown)),
            timers: Vec::new(),
            offsets: {
                // The guest's monotonic clocks went on running while it moved: by the time
                // since it stopped, on the wall clock as the move estimated this host's
                // against the source's (none when that looks wrong: negative, or over a
                // minute).
                let gap = time::host_now(libc::CLOCK_REALTIME) as i64 - v.captured_real_ns;
                let gap = if (0..=MAX_MOVE_GAP_NS).contains(&gap) {
                    gap
                } else {
                    0
                };
                crate::clock::Offsets {
                    mono: v.guest_mono_ns + gap - crate::clock::host_mono(),
                    raw: v.guest_raw_ns + gap - time::host_now(libc::CLOCK_MONOTONIC_RAW) as i64,
                    boot: v.guest_boot_ns + gap - time::host_now(libc::CLOCK_BOOTTIME) as i64,
                    realtime: v.realtime_offset_ns,
                }
            },
            clock: None,
            pause: PauseHandle::default(),
            lock: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(v.lock)),
            calls: std::sync::Arc::new([home.into(), local.into()]),
            stats: Stats {
                exits,
                local,
                home,
                page_faults,
                ..Default::default()
            },
        };
        vm.start_clock();
        vm.restore_threads(first, threads, spare)?;
        vm.timers = timers::recreate(posix_timers, &|t| vm.host_of(t));
        Ok(vm)
    }
}
