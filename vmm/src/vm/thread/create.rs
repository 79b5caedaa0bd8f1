//! clone(2) with CLONE_THREAD: a new thread of the process, with a vCPU and a host thread of
//! its own.

use super::*;

impl Vm {
    /// clone(2) with CLONE_THREAD: a new vCPU starting from this one's registers at this
    /// exit (rax 0, the new stack and TLS), on a host thread of its own. Returns its tid.
    pub(in crate::vm) fn clone_thread(
        &mut self,
        c: crate::vm::process::CloneArgs,
    ) -> Result<Step, i64> {
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
                crate::say!(
                    "mosvm: {}: threads with flags {:#x} (their own descriptor table or \
                     filesystem context) are not supported",
                    self.program.display(),
                    f
                );
            }
            return Err(EINVAL);
        }
        if self.th.others.len() + 1 >= MAX_THREADS {
            return Err(EAGAIN);
        }
        // Away from home the new thread's id is one its home holds for it (a thread id is the
        // home kernel's to give out); at home it is its host thread's.
        let reserved = if self.deputy.is_local() {
            None
        } else {
            let r = self.call_deputy(crate::deputy::RESERVE_TID as i64, [0; 6], vec![]);
            if r.ret <= 0 {
                // Interrupted by a move (or a signal): clone is issued again where the
                // process resumes, as Linux restarts it.
                let moving = r.ret == -EINTR || r.ret == -crate::vm::ERESTART;
                return Err(if moving || self.pause.requested() {
                    crate::vm::ERESTART
                } else {
                    EAGAIN
                });
            }
            Some(r.ret)
        };
        let release = |vm: &mut Vm| {
            if let Some(t) = reserved {
                let r = [t as u64, 0, 0, 0, 0, 0];
                let _ = vm.call_deputy(crate::deputy::RELEASE_TID as i64, r, vec![]);
            }
        };
        if self.th.mt.is_none() {
            if self.load_new_root().is_err() {
                release(self);
                return Err(EINVAL);
            }
            self.cur.cr3_loaded = self.space.mem.cr3();
            self.space.mem.hold_retired(true);
        }
        let (vcpu, tss, exc_top) = match self.thread_vcpu(&c) {
            Ok(v) => v,
            Err(e) => {
                release(self);
                return Err(e);
            }
        };
        let sh = self
            .th
            .mt
            .get_or_insert_with(|| Shared::new(self.pause.clone()))
            .clone();
        let Some((host, go)) = spawn_thread(sh, reserved, vcpu) else {
            release(self);
            return Err(EAGAIN);
        };
        let tid = reserved.unwrap_or(host);
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
                host: host as i32,
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
    fn thread_vcpu(
        &mut self,
        c: &crate::vm::process::CloneArgs,
    ) -> Result<(VcpuFd, u64, u64), i64> {
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
        c: &crate::vm::process::CloneArgs,
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
}
