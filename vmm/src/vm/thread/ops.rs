//! A thread's blocking steps ([`Op`]), run without the process lock, and the exits of its
//! vCPU ([`Event`]), read before the lock is taken.

use super::super::last_errno;
use super::{Shared, WAIT_SLICE};
use crate::deputy::{Begun, Deputy, Reply, Request};
use crate::mm::AddressSpace;
use crate::table::A;
use std::time::Instant;

/// A blocking step of a thread's system call, run without the process lock.
pub(in crate::vm) enum Op {
    /// A home call's gathering, host call and scattering (see `forward`); the guest's mask
    /// is put back to `old_mask` after a pselect6-style call waited under its own.
    Home {
        nr: u64,
        args: [u64; 6],
        base: &'static [A],
        temp_mask: Option<u64>,
        old_mask: u64,
        /// The call's timeout as it reads (vm/timed.rs).
        overlay: Option<(u64, [u8; 16])>,
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
    /// Sit out this long outside guest code (a throttled share of a slice), then run on.
    Sleep(std::time::Duration),
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
    pub(super) fn run(&self, sh: &Shared) -> i64 {
        match self {
            Op::Home {
                nr,
                args,
                base,
                overlay,
                ..
            } => {
                let space = LockedSpace(sh);
                let mut guest = crate::forward::Guest::locked(&space).overlay(*overlay);
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
            Op::Sleep(d) => {
                let ts = libc::timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: d.subsec_nanos() as i64,
                };
                // SAFETY: as for `Wait`: a sleep a kick interrupts.
                unsafe { libc::ppoll(std::ptr::null_mut(), 0, &ts, std::ptr::null()) };
                0
            }
        }
    }
}

/// One exit of a vCPU, taken from KVM_RUN's result before the lock is taken.
pub(in crate::vm) enum Event {
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
    pub(in crate::vm) fn of(
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
