//! Threads on the move: for a migration's switch-over every thread stops outside guest code
//! with its vCPU's state taken; each travels with its own signal state, and at the destination
//! gets a vCPU and a host thread again.

use super::super::Vm;
use super::{gettid, pause, spawn_thread, Current, End, Shared, ThreadState, STOP_LIMIT};
use crate::sigframe::AltStack;
use anyhow::Result;
use kvm_ioctls::VcpuFd;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

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
    /// A relative sleep stopped for the move (see restart_syscall(2)).
    restart: Option<super::super::time::SleepRestart>,
    /// A timed call stopped for the move (vm/timed.rs).
    timed: Option<super::super::timed::TimedRestart>,
    vcpu: Option<crate::snapshot::VcpuState>,
}

impl ThreadMig {
    /// The thread's signal mask (guest signal n is bit n-1).
    pub(in crate::vm) fn mask(&self) -> u64 {
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
    pub(super) fn tids_are_hosts(&self) -> bool {
        self.tid as i32 == self.cur.host
            && self.th.others.iter().all(|t| t.tid as i32 == t.cur.host)
    }

    /// The host tid of the thread running guest thread `tid` of this process.
    pub(in crate::vm) fn host_of(&self, tid: i64) -> Option<i32> {
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
    pub(in crate::vm) fn current_mig(&self) -> ThreadMig {
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
            restart: self.cur.restart,
            timed: self.cur.timed,
            vcpu: None,
        }
    }

    /// The other threads as they travel, with the vCPU states they stopped with (see
    /// [`stop_others`]), and the TSS and stack tops of the spare vCPUs. An error says why
    /// the process cannot move with its threads now.
    #[allow(clippy::type_complexity)]
    pub(in crate::vm) fn others_mig(&mut self) -> Result<(Vec<ThreadMig>, Vec<(u64, u64)>)> {
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
                restart: t.cur.restart,
                timed: t.cur.timed,
                vcpu: Some(snap),
            });
        }
        let spare = self.th.spare_vcpus.iter().map(|v| (v.1, v.2)).collect();
        Ok((out, spare))
    }

    /// After a move: the current (first) thread's own state from `main`; a vCPU and a host
    /// thread for each of `others`, which start once the process runs; vCPUs for the spare
    /// TSSes. All load the newest page-table root.
    pub(in crate::vm) fn restore_threads(
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
        self.cur.restart = main.restart;
        self.cur.timed = main.timed;
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

    pub(super) fn restore_others(
        &mut self,
        others: Vec<ThreadMig>,
        spare: Vec<(u64, u64)>,
    ) -> Result<()> {
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
                    restart: t.restart,
                    timed: t.timed,
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
    pub(in crate::vm) fn end_threads(&mut self) {
        if let Some(sh) = self.th.mt.take() {
            let mut b = sh.book();
            b.open = false;
            if b.ended.is_none() {
                b.ended = Some(Err("the process moved to another node".to_string()));
                b.moved = true;
            }
            sh.cv.notify_all();
        }
    }
}

/// On the main thread, asked to pause: have every other thread stop outside guest code with
/// its vCPU's state taken ([`park`]), waiting up to [`STOP_LIMIT`]. Those that did not stop
/// leave no state, and the capture fails.
pub(super) fn stop_others(sh: &Shared, own: i64) {
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
pub(super) fn park(sh: &Shared, tid: i64, vcpu: &mut Option<VcpuFd>) -> Option<End> {
    let mut at_home = false;
    let parked = sh.with(|vm, book| {
        at_home = vm.deputy.is_local();
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
    if b.moved && at_home && tid == gettid() {
        // The thread moved away from home, and this host thread's id is the guest thread's:
        // keep holding it for the guest thread (no other process gets it; signals sent to
        // it reach the guest), until the guest thread exits or the process does.
        drop(b);
        // The kick handler must not reach the vCPU's mapping once it is gone (this thread
        // takes the guest's signals while it holds the id).
        pause::set_own_immediate_exit(std::ptr::null_mut());
        *vcpu = None;
        crate::deputy::pseudo::hold_here(tid, || {});
        return Some(End::Process);
    }
    b.ended.is_some().then_some(End::Process)
}
