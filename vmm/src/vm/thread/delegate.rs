//! fork(2) and execve(2) by a thread other than the first: the host fork must happen on the
//! host's first thread, and an execve's caller takes the first thread's place (Linux's
//! `de_thread`).

use super::super::{Step, Vm, EINVAL};
use super::{pause, Delegate, Delegated, Served, ThreadState};
use anyhow::Result as AnyResult;
use std::sync::atomic::Ordering;

impl Vm {
    /// A fork by a thread other than the first: hand it to the first thread and wait for
    /// its result.
    pub(in crate::vm) fn delegate_fork(
        &mut self,
        c: super::super::process::CloneArgs,
    ) -> Result<Step, i64> {
        self.delegate(Delegate::Fork(c))
    }

    /// execve by a thread other than the first, at its point of no return: the first thread
    /// takes its place (this one then ends).
    pub(in crate::vm) fn delegate_exec(&mut self) -> Result<Step, i64> {
        self.delegate(Delegate::Exec)
    }

    pub(super) fn delegate(&mut self, what: Delegate) -> Result<Step, i64> {
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
    pub(super) fn serve_delegated(&mut self) -> Served {
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
                        crate::say!("mosvm: {}: execve: {e:#}", self.program.display());
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
    pub(super) fn take_place(
        &mut self,
        first: ThreadState,
        st: Option<crate::snapshot::VcpuState>,
    ) -> AnyResult<()> {
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
}
