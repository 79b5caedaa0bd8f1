//! Socket calls the VMM composes from home calls: sendmmsg and recvmmsg.

use super::{Step, Vm, EINVAL};
use crate::table::A;
use std::time::Instant;

impl Vm {
    /// sendmmsg(2)/recvmmsg(2): one sendmsg/recvmsg home call per `struct mmsghdr` (64
    /// bytes: a msghdr, then `msg_len`, which receives the bytes moved). Returns the number
    /// of messages moved, or the first call's error when none was. recvmmsg's
    /// MSG_WAITFORONE turns on MSG_DONTWAIT after the first message; its timeout is checked
    /// between messages, as Linux does. At most UIO_MAXIOV (1024) messages, as Linux.
    pub(super) fn mmsg(&mut self, nr: u64, a: [u64; 6]) -> Step {
        const MMSGHDR: u64 = 64;
        let send = nr as i64 == libc::SYS_sendmmsg;
        let (fd, vec, vlen, mut flags) = (a[0], a[1], (a[2] as u32).min(1024), a[3] as i32);
        let deadline = if !send && a[4] != 0 {
            match self.read_guest::<16>(a[4]) {
                Ok(b) => {
                    let sec = i64::from_le_bytes(b[..8].try_into().expect("8"));
                    let nsec = i64::from_le_bytes(b[8..].try_into().expect("8"));
                    if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
                        return Step::Ret(-EINVAL);
                    }
                    Some(Instant::now() + std::time::Duration::new(sec as u64, nsec as u32))
                }
                Err(e) => return Step::Ret(-e),
            }
        } else {
            None
        };
        let (one, base): (i64, &'static [A]) = if send {
            (libc::SYS_sendmsg, &[A::Fd, A::MsgIn, A::V])
        } else {
            (libc::SYS_recvmsg, &[A::Fd, A::MsgOut, A::V])
        };
        let mut done = 0u32;
        while done < vlen {
            let hdr = vec.wrapping_add(done as u64 * MMSGHDR);
            let call_flags = flags & !libc::MSG_WAITFORONE;
            let r = match self.forward(one as u64, [fd, hdr, call_flags as u64, 0, 0, 0], base) {
                Step::Ret(r) => r,
                other => return other,
            };
            if r < 0 {
                return Step::Ret(if done > 0 { done as i64 } else { r });
            }
            if let Err(e) = self.write_guest(hdr + 56, &(r as u32).to_le_bytes()) {
                return Step::Ret(if done > 0 { done as i64 } else { -e });
            }
            done += 1;
            if !send && flags & libc::MSG_WAITFORONE != 0 {
                flags |= libc::MSG_DONTWAIT;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        Step::Ret(done as i64)
    }
}
