//! The link between a process's home and the node running it (MOSIX's link layer): one plain
//! stream of `migrate` frames, which the node services carry over mutual TLS. After a
//! migration it carries the deputy channel (one `DeputyRequest`, one `DeputyReply`, in order),
//! signals from home to the guest, and the guest's exit status back home.

use migrate::frame::{DeputyReply, DeputyRequest, Slot as WireSlot};
use migrate::{read_message, write_message, Message};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use vmm::deputy::{Deputy, Reply, Request, Slot};

/// Exit status of `mosvm run` when the node hosting its process is lost.
pub const LOST_HOST_STATUS: u8 = 112;

/// Keep SIGINT, SIGTERM, SIGHUP and SIGQUIT for the vCPU thread: helper threads block them,
/// so the kernel delivers them where they interrupt KVM_RUN.
pub fn block_host_signals() {
    // SAFETY: building a signal set and changing this thread's mask touch only local state.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// A deputy request as it travels.
pub fn to_wire(seq: u64, r: Request) -> DeputyRequest {
    DeputyRequest {
        seq,
        nr: r.nr,
        args: r.args,
        slots: r
            .slots
            .into_iter()
            .map(|s| match s {
                Slot::Null => WireSlot::Null,
                Slot::In(b) => WireSlot::In(b),
                Slot::Out(n) => WireSlot::Out(n as u64),
                Slot::InOut(b) => WireSlot::InOut(b),
            })
            .collect(),
    }
}

/// A travelling deputy request as the deputy takes it.
pub fn from_wire(r: DeputyRequest) -> Request {
    Request {
        nr: r.nr,
        args: r.args,
        slots: r
            .slots
            .into_iter()
            .map(|s| match s {
                WireSlot::Null => Slot::Null,
                WireSlot::In(b) => Slot::In(b),
                // A request names its own output sizes; the VMM side caps them (64 MiB).
                WireSlot::Out(n) => Slot::Out(n.min(64 << 20) as usize),
                WireSlot::InOut(b) => Slot::InOut(b),
            })
            .collect(),
    }
}

/// The guest side of the deputy channel: a remote VMM's deputy calls go home over the link.
pub struct RemoteDeputy {
    seq: u64,
    writer: Arc<Mutex<UnixStream>>,
    replies: mpsc::Receiver<DeputyReply>,
}

impl RemoteDeputy {
    /// Start reading the link: replies go to the deputy, `Signal`s to `on_signal`, and a lost
    /// link to `on_lost` (the guest must then be destroyed: its deputy is gone).
    pub fn start(
        link: UnixStream,
        on_signal: impl Fn(i32) + Send + 'static,
        on_lost: impl Fn() + Send + 'static,
    ) -> std::io::Result<(RemoteDeputy, Arc<Mutex<UnixStream>>)> {
        let writer = Arc::new(Mutex::new(link.try_clone()?));
        let (tx, rx) = mpsc::channel();
        let mut reader = link;
        std::thread::spawn(move || {
            block_host_signals();
            loop {
                match read_message(&mut reader) {
                    Ok(Message::DeputyReply(r)) => {
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                    Ok(Message::Signal { sig }) => on_signal(sig),
                    Ok(_) => {}
                    Err(_) => {
                        on_lost();
                        return;
                    }
                }
            }
        });
        Ok((
            RemoteDeputy {
                seq: 0,
                writer: writer.clone(),
                replies: rx,
            },
            writer,
        ))
    }
}

const EIO: i64 = libc::EIO as i64;

impl Deputy for RemoteDeputy {
    fn call(&mut self, req: Request) -> Reply {
        self.seq += 1;
        let seq = self.seq;
        let sent = match self.writer.lock() {
            Ok(mut w) => write_message(&mut *w, &Message::DeputyRequest(to_wire(seq, req))).is_ok(),
            Err(_) => false,
        };
        if !sent {
            return Reply {
                ret: -EIO,
                outs: vec![],
            };
        }
        match self.replies.recv() {
            Ok(r) if r.seq == seq => Reply {
                ret: r.ret,
                outs: r.outs,
            },
            _ => Reply {
                ret: -EIO,
                outs: vec![],
            },
        }
    }
}

/// Home side: serve the remote guest's deputy calls until it exits. Signals `mosvm run`
/// receives meanwhile are sent to the guest. Returns the guest's exit status, or None when
/// the link was lost.
pub fn serve_home(link: UnixStream, deputy: &mut dyn Deputy) -> Option<i32> {
    let writer = Arc::new(Mutex::new(link.try_clone().ok()?));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (writer, done) = (writer.clone(), done.clone());
        std::thread::spawn(move || {
            block_host_signals();
            let mut sent = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(sig) = vmm::vm::pending_signal() {
                    if sig != sent {
                        sent = sig;
                        if let Ok(mut w) = writer.lock() {
                            let _ = write_message(&mut *w, &Message::Signal { sig });
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
    }
    let mut reader = link;
    let status = loop {
        match read_message(&mut reader) {
            Ok(Message::DeputyRequest(r)) => {
                let seq = r.seq;
                let reply = deputy.call(from_wire(r));
                let msg = Message::DeputyReply(DeputyReply {
                    seq,
                    ret: reply.ret,
                    outs: reply.outs,
                });
                let ok = writer
                    .lock()
                    .map(|mut w| write_message(&mut *w, &msg).is_ok())
                    .unwrap_or(false);
                if !ok {
                    break None;
                }
            }
            Ok(Message::Exit { status }) => break Some(status),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_survive_the_wire() {
        let r = Request {
            nr: 1,
            args: [1, 2, 3, 4, 5, 6],
            slots: vec![
                Slot::Null,
                Slot::In(b"abc".to_vec()),
                Slot::Out(7),
                Slot::InOut(vec![9]),
            ],
        };
        assert_eq!(from_wire(to_wire(5, r.clone())), r);
    }

    /// A remote deputy and a home server over a real socket pair: a write goes home and its
    /// result comes back; the guest's exit status reaches home.
    #[test]
    fn deputy_calls_cross_the_link() {
        let (guest_end, home_end) = UnixStream::pair().unwrap();
        let (pr, pw) = {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe() returns.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let home = std::thread::spawn(move || {
            let mut d = vmm::deputy::HostDeputy::with_stdio([0, pw, 2]);
            serve_home(home_end, &mut d)
        });
        let (mut rd, writer) = RemoteDeputy::start(guest_end, |_| {}, || {}).unwrap();
        let r = rd.call(Request {
            nr: libc::SYS_write as u64,
            args: [1, 0, 5, 0, 0, 0],
            slots: vec![Slot::In(b"hello".to_vec())],
        });
        assert_eq!(r.ret, 5);
        let mut buf = [0u8; 5];
        // SAFETY: reading into a local buffer from our own pipe.
        assert_eq!(
            unsafe { libc::read(pr, buf.as_mut_ptr() as *mut libc::c_void, 5) },
            5
        );
        assert_eq!(&buf, b"hello");
        let bad = rd.call(Request {
            nr: libc::SYS_close as u64,
            args: [77, 0, 0, 0, 0, 0],
            slots: vec![],
        });
        assert_eq!(bad.ret, -(libc::EBADF as i64));
        write_message(&mut *writer.lock().unwrap(), &Message::Exit { status: 3 }).unwrap();
        assert_eq!(home.join().unwrap(), Some(3));
        // SAFETY: closing our own pipe descriptors.
        unsafe {
            libc::close(pr);
            libc::close(pw);
        }
    }
}
