//! signalfd(2): a descriptor from which the guest reads its pending signals of a mask as
//! `struct signalfd_siginfo` records, and which poll/select/epoll report readable while such
//! a signal is pending.
//!
//! The descriptor is a host eventfd in the deputy's table (so it lives at home with the
//! guest's other descriptors, and the host's poll/epoll watch it), whose counter the VMM keeps
//! non-zero exactly while a signal of the mask is pending ([`Vm::sync_signalfds`], after each
//! system call and whenever host signals are taken). Reads are the VMM's: they dequeue signals
//! as delivery would, thread-directed ones first.

use super::{Step, Vm, EAGAIN, EBADF, EINTR, EINVAL};
use crate::deputy::Slot;

/// signalfd4 flags (SFD_CLOEXEC = O_CLOEXEC, SFD_NONBLOCK = O_NONBLOCK).
const SFD_CLOEXEC: u64 = 0o2000000;
const SFD_NONBLOCK: u64 = 0o4000;
/// Size of `struct signalfd_siginfo`.
pub(super) const SIGINFO_SIZE: usize = 128;

/// One signalfd of the guest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct SignalFd {
    /// The guest's descriptor (a host eventfd at home).
    pub fd: u64,
    /// The signals it reads (bit `sig - 1`).
    pub mask: u64,
    /// Whether the eventfd's counter is non-zero now.
    armed: bool,
}

/// The `struct signalfd_siginfo` for a queued `siginfo_t`.
fn record(info: &[u8; 128]) -> [u8; SIGINFO_SIZE] {
    let w32 = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().expect("4"));
    let w64 = |o: usize| u64::from_le_bytes(info[o..o + 8].try_into().expect("8"));
    let (signo, errno, code) = (w32(0), w32(4), w32(8) as i32);
    let mut r = [0u8; SIGINFO_SIZE];
    let mut put32 = |o: usize, v: u32| r[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put32(0, signo);
    put32(4, errno);
    put32(8, code as u32);
    let sig = signo as i32;
    let fault = matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
    ) && code > 0;
    if fault {
        r[72..80].copy_from_slice(&w64(16).to_le_bytes()); // ssi_addr
        return r;
    }
    if code == super::timers::SI_TIMER {
        put32(24, w32(16)); // ssi_tid (timer id)
        put32(32, w32(20)); // ssi_overrun
        put32(44, w32(24)); // ssi_int
        r[48..56].copy_from_slice(&w64(24).to_le_bytes()); // ssi_ptr
        return r;
    }
    put32(12, w32(16)); // ssi_pid
    put32(16, w32(20)); // ssi_uid
    if sig == libc::SIGCHLD && code > 0 {
        put32(40, w32(24)); // ssi_status
        r[56..64].copy_from_slice(&w64(32).to_le_bytes()); // ssi_utime
        r[64..72].copy_from_slice(&w64(40).to_le_bytes()); // ssi_stime
    } else {
        put32(44, w32(24)); // ssi_int
        r[48..56].copy_from_slice(&w64(24).to_le_bytes()); // ssi_ptr
    }
    r
}

impl Vm {
    /// signalfd(fd, mask, size) and signalfd4(fd, mask, size, flags).
    pub(super) fn signalfd(&mut self, nr: i64, a: [u64; 6]) -> Result<Step, i64> {
        let flags = if nr == libc::SYS_signalfd4 { a[3] } else { 0 };
        if flags & !(SFD_CLOEXEC | SFD_NONBLOCK) != 0 || a[2] != 8 {
            return Err(EINVAL);
        }
        let unblockable = 1u64 << (libc::SIGKILL - 1) | 1u64 << (libc::SIGSTOP - 1);
        let mask = u64::from_le_bytes(self.read_guest::<8>(a[1])?) & !unblockable;
        let fd = a[0] as i32;
        if fd != -1 {
            // A new mask for one of ours.
            let Some(s) = self.signalfds.iter_mut().find(|s| s.fd == fd as u64) else {
                return Err(EINVAL);
            };
            s.mask = mask;
            self.sync_signalfds();
            return Ok(Step::Ret(fd as i64));
        }
        // The eventfd carries the guest's flags (fcntl sees them); the VMM only ever reads it
        // when its counter is not zero, so it never blocks on it.
        let mut efd_flags = 0;
        if flags & SFD_NONBLOCK != 0 {
            efd_flags |= libc::EFD_NONBLOCK as u64;
        }
        if flags & SFD_CLOEXEC != 0 {
            efd_flags |= libc::EFD_CLOEXEC as u64;
        }
        let r = self.call_deputy(libc::SYS_eventfd2, [0, efd_flags, 0, 0, 0, 0], vec![]);
        if r.ret < 0 {
            return Ok(Step::Ret(r.ret));
        }
        self.signalfds.retain(|s| s.fd != r.ret as u64);
        self.signalfds.push(SignalFd {
            fd: r.ret as u64,
            mask,
            armed: false,
        });
        self.sync_signalfds();
        Ok(Step::Ret(r.ret))
    }

    /// Whether guest descriptor `fd` is a signalfd.
    pub(super) fn is_signalfd(&self, fd: u64) -> bool {
        !self.signalfds.is_empty() && self.signalfds.iter().any(|s| s.fd == fd)
    }

    /// read(2) of a signalfd: as many pending signals of its mask as fit, oldest first;
    /// EAGAIN (O_NONBLOCK) or a wait when there are none.
    pub(super) fn signalfd_read(&mut self, fd: u64, buf: u64, len: u64) -> Result<Step, i64> {
        let s = self
            .signalfds
            .iter()
            .find(|s| s.fd == fd)
            .cloned()
            .ok_or(EBADF)?;
        let room = (len / SIGINFO_SIZE as u64) as usize;
        if room == 0 {
            return Err(EINVAL);
        }
        // The descriptor's own O_NONBLOCK (fcntl may have changed it).
        let fl = self.call_deputy(
            libc::SYS_fcntl,
            [fd, libc::F_GETFL as u64, 0, 0, 0, 0],
            vec![],
        );
        let nonblock = fl.ret >= 0 && fl.ret & libc::O_NONBLOCK as i64 != 0;
        self.take_host();
        let mut out = Vec::new();
        while out.len() < room * SIGINFO_SIZE {
            let ready = self.sig.all_pending() & s.mask;
            if ready == 0 {
                break;
            }
            let sig = ready.trailing_zeros() as i32 + 1;
            let info = self.sig.take(sig);
            out.extend_from_slice(&record(&info));
        }
        if out.is_empty() {
            if nonblock {
                return Err(EAGAIN);
            }
            return match self.wait_signal(Some(s.mask), None) {
                super::signal::Woken::Later => {
                    self.cur.sigwait_set = s.mask;
                    Ok(self.redo(None))
                }
                super::signal::Woken::Pause => Err(super::ERESTART),
                // A signal of the mask: read again; another one: a handler runs (EINTR,
                // restarted as SA_RESTART says).
                _ if self.sig.all_pending() & s.mask != 0 => self.signalfd_read(fd, buf, len),
                _ => Err(EINTR),
            };
        }
        self.write_guest(buf, &out)?;
        self.sync_signalfds();
        Ok(Step::Ret(out.len() as i64))
    }

    /// close(2) of a signalfd: forget it (the deputy closes the descriptor).
    pub(super) fn signalfd_closed(&mut self, fd: u64) {
        self.signalfds.retain(|s| s.fd != fd);
    }

    /// Keep every signalfd's eventfd readable exactly while a signal of its mask is pending.
    pub(super) fn sync_signalfds(&mut self) {
        if self.signalfds.is_empty() {
            return;
        }
        self.take_host();
        let pending = self.sig.all_pending();
        for i in 0..self.signalfds.len() {
            let s = &self.signalfds[i];
            let want = pending & s.mask != 0;
            if want == s.armed {
                continue;
            }
            let fd = s.fd;
            let r = if want {
                self.call_deputy(
                    libc::SYS_write,
                    [fd, 0, 8, 0, 0, 0],
                    vec![Slot::In(1u64.to_le_bytes().to_vec())],
                )
            } else {
                self.call_deputy(libc::SYS_read, [fd, 0, 8, 0, 0, 0], vec![Slot::Out(8)])
            };
            if r.ret >= 0 || r.ret == -EAGAIN {
                self.signalfds[i].armed = want;
            }
        }
    }
}
