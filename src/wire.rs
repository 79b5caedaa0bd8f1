//! A link's transport: a stream of `migrate` frames straight between the two processes a link
//! joins (a `mosvm run` at home and a guest host, or two guest hosts), over TLS on TCP; or over
//! a local socket pair in tests. Nodes only introduce the two ends to each other, so no node
//! relays a byte. Any thread may send (a frame goes out whole, frames in order); one thread at
//! a time receives.
//!
//! Both ends are blocking threads, so the rustls session sits behind a mutex that neither
//! holds while waiting for the socket: a sender encrypts into the session and writes what the
//! socket takes, and waits for room without the lock; the reader waits for data without it.

use migrate::handshake::{Hello, ServerIdentity};
use migrate::{FrameError, Message};
use rustls::pki_types::ServerName;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Raw TLS bytes taken from the socket per read: large reads keep system calls few.
const READ_CHUNK: usize = 1 << 20;
/// Plaintext handed to the session per write before its records are sent, bytes (below
/// glibc's default trim threshold, 128 KiB, mallopt(3)).
const WRITE_CHUNK: usize = 64 << 10;

/// One end of a link. Clones share it.
#[derive(Clone)]
pub struct Wire(Arc<Inner>);

enum Inner {
    // Only the unit tests join two ends within one process.
    #[cfg_attr(not(test), allow(dead_code))]
    Local {
        sock: UnixStream,
        tx: Mutex<UnixStream>,
        rx: Mutex<UnixStream>,
    },
    Tls {
        sock: TcpStream,
        conn: Box<Mutex<rustls::Connection>>,
        rx: Mutex<RawBuf>,
        /// Held by a sender for a whole frame: the session's lock is let go while a large
        /// frame waits for room in the socket, and no other frame may start in between.
        /// (So a sender may wait for another. No cycle of waits closes as long as, on every
        /// link, one end's reader never sends: a guest host's reader hands what it reads to
        /// other threads, so that end always drains, and whoever waits for room on the other
        /// end gets it. A destination's Pong and home's deputy replies are sent by readers.)
        tx: Mutex<()>,
    },
}

/// TLS records read from the socket and not yet given to rustls.
struct RawBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Wait until `fd` is readable (`POLLIN`) or writable (`POLLOUT`), or until `deadline` (a
/// deadline already past still looks once).
pub(crate) fn wait(fd: RawFd, events: libc::c_short, deadline: Option<Instant>) -> io::Result<()> {
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    0
                } else {
                    (left.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
                }
            }
        };
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r == 0 && ms == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Options for a link's TCP socket: no Nagle delay (one deputy call is one small frame each
/// way), and a peer that vanishes without closing is noticed within about 4 s, whether the
/// link idles (keepalive) or has data outstanding (user timeout).
fn tune(sock: &TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let fd = sock.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| -> io::Result<()> {
        // SAFETY: `v` is a c_int that outlives the call, and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 4000)
}

/// Complete a TLS handshake on a blocking socket within `limit`.
fn handshake(
    sock: &mut TcpStream,
    conn: &mut rustls::Connection,
    limit: Duration,
) -> io::Result<()> {
    sock.set_read_timeout(Some(limit))?;
    sock.set_write_timeout(Some(limit))?;
    let deadline = Instant::now() + limit;
    while conn.is_handshaking() {
        if Instant::now() > deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        conn.complete_io(sock)?;
    }
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    sock.set_nonblocking(true)
}

/// Plaintext from the session, blocking until some arrives.
struct TlsReader<'a> {
    sock: &'a TcpStream,
    conn: &'a Mutex<rustls::Connection>,
    raw: &'a mut RawBuf,
}

impl Read for TlsReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let mut fed = false;
            {
                let mut c = lock(self.conn);
                match c.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let mut src = RawSource {
                    sock: self.sock,
                    raw: self.raw,
                };
                match c.read_tls(&mut src) {
                    // The peer closed the connection without a close_notify.
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {
                        c.process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        fed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Alerts and the like: best effort, the next sender flushes the rest.
                while c.wants_write() {
                    if c.write_tls(&mut &*self.sock).is_err() {
                        break;
                    }
                }
            }
            if !fed {
                wait(self.sock.as_raw_fd(), libc::POLLIN, None)?;
            }
        }
    }
}

/// The socket seen through [`RawBuf`]: large reads from the socket, handed out as rustls asks.
struct RawSource<'a> {
    sock: &'a TcpStream,
    raw: &'a mut RawBuf,
}

impl Read for RawSource<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.raw;
        if r.start == r.end {
            if r.buf.len() < READ_CHUNK {
                r.buf.resize(READ_CHUNK, 0);
            }
            let n = (&*self.sock).read(&mut r.buf)?;
            r.start = 0;
            r.end = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(r.end - r.start);
        out[..n].copy_from_slice(&r.buf[r.start..r.start + n]);
        r.start += n;
        Ok(n)
    }
}

/// Plaintext into the session; `flush` writes it all to the socket, waiting for room without
/// holding the session.
struct TlsWriter<'a> {
    sock: &'a TcpStream,
    conn: &'a Mutex<rustls::Connection>,
    guard: Option<MutexGuard<'a, rustls::Connection>>,
}

impl TlsWriter<'_> {
    fn conn(&mut self) -> &mut rustls::Connection {
        let conn = self.conn;
        self.guard.get_or_insert_with(|| lock(conn))
    }
}

impl Write for TlsWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A large write (a page batch) goes out a piece at a time: the session's encrypted
        // records are then written while few and small, and the memory holding them is
        // reused rather than grown for the whole batch and given back to the system after it
        // (the source paid a page fault for every 4 KiB it sent that way).
        let n = buf.len().min(WRITE_CHUNK);
        let n = self.conn().writer().write(&buf[..n])?;
        if n == WRITE_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        loop {
            let sock = self.sock;
            let c = self.conn();
            while c.wants_write() {
                match c.write_tls(&mut &*sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if !c.wants_write() {
                return Ok(());
            }
            self.guard = None;
            wait(sock.as_raw_fd(), libc::POLLOUT, None)?;
        }
    }
}

impl Wire {
    /// Both ends of a link within one machine (tests).
    #[cfg(test)]
    pub fn pair() -> io::Result<(Wire, Wire)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Wire::local(a)?, Wire::local(b)?))
    }

    #[cfg(test)]
    fn local(sock: UnixStream) -> io::Result<Wire> {
        Ok(Wire(Arc::new(Inner::Local {
            tx: Mutex::new(sock.try_clone()?),
            rx: Mutex::new(sock.try_clone()?),
            sock,
        })))
    }

    fn tls(sock: TcpStream, mut conn: rustls::Connection) -> Wire {
        conn.set_buffer_limit(None);
        Wire(Arc::new(Inner::Tls {
            sock,
            conn: Box::new(Mutex::new(conn)),
            rx: Mutex::new(RawBuf {
                buf: Vec::new(),
                start: 0,
                end: 0,
            }),
            tx: Mutex::new(()),
        }))
    }

    /// Send one frame; its size in bytes.
    pub fn send(&self, m: &Message) -> Result<u64, FrameError> {
        let mut scratch = Vec::new();
        match &*self.0 {
            Inner::Local { tx, .. } => {
                migrate::frame::write_message_with(&mut *lock(tx), m, &mut scratch)?
            }
            Inner::Tls { sock, conn, tx, .. } => {
                let _frame = lock(tx);
                let mut w = TlsWriter {
                    sock,
                    conn,
                    guard: None,
                };
                migrate::frame::write_message_with(&mut w, m, &mut scratch)?
            }
        }
        // A page batch's payload is written straight from the batch, not through `scratch`.
        let payload = match m {
            Message::Pages(b) => b.payload.len(),
            _ => 0,
        };
        Ok((scratch.len() + payload) as u64)
    }

    /// Receive the next frame, waiting as long as it takes.
    pub fn recv(&self) -> Result<Message, FrameError> {
        self.reader().recv()
    }

    /// Receive the next frame, or fail with a timeout if none starts within `limit`.
    pub fn recv_timeout(&self, limit: Duration) -> Result<Message, FrameError> {
        self.reader()
            .recv_within(limit)?
            .ok_or_else(|| FrameError::Io(io::ErrorKind::TimedOut.into()))
    }

    /// The right to read, held by one thread at a time: a thread waiting for an answer holds
    /// it and reads the answer itself (no hand-off to another thread on the way).
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            rx: match &*self.0 {
                Inner::Local { rx, .. } => Rx::Local(lock(rx)),
                Inner::Tls { sock, conn, rx, .. } => Rx::Tls(sock, conn, lock(rx)),
            },
        }
    }

    /// The right to read if no other thread holds it.
    pub fn try_reader(&self) -> Option<Reader<'_>> {
        let rx = match &*self.0 {
            Inner::Local { rx, .. } => Rx::Local(try_lock(rx)?),
            Inner::Tls { sock, conn, rx, .. } => Rx::Tls(sock, conn, try_lock(rx)?),
        };
        Some(Reader { rx })
    }

    /// Wait up to `limit` for the socket to become readable, without taking the right to
    /// read (data another reader already buffered is not seen: check with a [`Reader`]).
    pub fn wait_readable(&self, limit: Duration) -> bool {
        let fd = match &*self.0 {
            Inner::Local { sock, .. } => sock.as_raw_fd(),
            Inner::Tls { sock, .. } => sock.as_raw_fd(),
        };
        // An error (the peer gone) counts as readable: the read then reports it.
        !matches!(
            wait(fd, libc::POLLIN, Some(Instant::now() + limit)),
            Err(e) if e.kind() == io::ErrorKind::TimedOut
        )
    }

    /// Close this end without losing what it sent: say so (TLS close_notify, then FIN), then
    /// read and drop what the peer still sends until it closes too, or for `limit`. Closing a
    /// socket with unread data resets the connection, which can destroy the last message
    /// sent before the peer has read it.
    pub fn close(&self, limit: Duration) {
        match &*self.0 {
            Inner::Local { sock, .. } => {
                let _ = sock.shutdown(std::net::Shutdown::Write);
            }
            Inner::Tls { sock, conn, tx, .. } => {
                // After a frame being sent, if it ends within `limit` (a sender stuck on a
                // peer that reads nothing more must not hold the close up).
                let until = Instant::now() + limit;
                let _frame = loop {
                    match try_lock(tx) {
                        Some(g) => break Some(g),
                        None if Instant::now() >= until => break None,
                        None => std::thread::sleep(Duration::from_millis(1)),
                    }
                };
                lock(conn).send_close_notify();
                let mut w = TlsWriter {
                    sock,
                    conn,
                    guard: None,
                };
                let _ = w.flush();
                let _ = sock.shutdown(std::net::Shutdown::Write);
            }
        }
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.reader().recv_within(left) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// The socket's descriptor. A forked child that never uses this end closes its copy of
    /// it by number (closing says nothing to the peer; the parent's end stays as it is).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &*self.0 {
            Inner::Local { sock, .. } => sock.as_raw_fd(),
            Inner::Tls { sock, .. } => sock.as_raw_fd(),
        }
    }

    /// This end's TCP address (None for a local pair).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &*self.0 {
            Inner::Local { .. } => None,
            Inner::Tls { sock, .. } => sock.local_addr().ok(),
        }
    }

    /// Close both directions: a thread blocked in [`Wire::recv`] returns.
    pub fn shutdown(&self) {
        let _ = match &*self.0 {
            Inner::Local { sock, .. } => sock.shutdown(std::net::Shutdown::Both),
            Inner::Tls { sock, .. } => sock.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// The right to read a [`Wire`] (see [`Wire::reader`]).
pub struct Reader<'a> {
    rx: Rx<'a>,
}

enum Rx<'a> {
    Local(MutexGuard<'a, UnixStream>),
    Tls(
        &'a TcpStream,
        &'a Mutex<rustls::Connection>,
        MutexGuard<'a, RawBuf>,
    ),
}

impl Reader<'_> {
    /// Run `f` on the byte stream (blocking reads).
    fn stream<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Read) -> Result<T, FrameError>,
    ) -> Result<T, FrameError> {
        match &mut self.rx {
            Rx::Local(s) => {
                s.set_read_timeout(None)?;
                f(&mut **s)
            }
            Rx::Tls(sock, conn, raw) => f(&mut TlsReader {
                sock,
                conn,
                raw: &mut *raw,
            }),
        }
    }

    /// Receive the next frame, waiting as long as it takes.
    pub fn recv(&mut self) -> Result<Message, FrameError> {
        self.stream(|r| migrate::read_message(r))
    }

    /// Receive the next frame, a page batch's pages going straight into `sink`.
    pub fn recv_into(
        &mut self,
        sink: &mut dyn migrate::frame::PageSink,
    ) -> Result<migrate::frame::Received, FrameError> {
        let mut scratch = Vec::new();
        self.stream(|r| migrate::frame::read_message_into(r, sink, &mut scratch))
    }

    /// Receive the next frame if one starts within `limit` (frames travel whole, so once one
    /// starts the rest follows); `None` if none does. `Duration::ZERO` takes only what has
    /// already arrived.
    pub fn recv_within(&mut self, limit: Duration) -> Result<Option<Message>, FrameError> {
        if self.ready(Instant::now() + limit)? {
            Ok(Some(self.recv()?))
        } else {
            Ok(None)
        }
    }

    /// Whether bytes of a frame are here, or arrive before `deadline`.
    fn ready(&mut self, deadline: Instant) -> io::Result<bool> {
        let fd = match &mut self.rx {
            Rx::Local(s) => s.as_raw_fd(),
            Rx::Tls(sock, conn, raw) => {
                let plain = lock(conn)
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                    .plaintext_bytes_to_read();
                if plain > 0 || raw.start < raw.end {
                    return Ok(true);
                }
                sock.as_raw_fd()
            }
        };
        match wait(fd, libc::POLLIN, Some(deadline)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// How long connecting, the TLS handshake and the Hello exchange may take.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Connect to a process endpoint at `addr`: TLS, accepting only a server holding the cluster
/// key (`cert`), then `hello` (with the endpoint's token), which it must welcome.
pub fn connect(addr: SocketAddr, cert: &[u8], hello: Hello) -> anyhow::Result<Wire> {
    use anyhow::Context;
    let sock = TcpStream::connect_timeout(&addr, HANDSHAKE_LIMIT)
        .with_context(|| format!("connecting to {addr}"))?;
    connect_over(sock, cert, hello)
}

/// [`connect`] over `sock`, a TCP connection already made to the endpoint (by the node, for
/// a jailed guest host: hostchan.rs).
pub fn connect_over(mut sock: TcpStream, cert: &[u8], hello: Hello) -> anyhow::Result<Wire> {
    use anyhow::Context;
    let addr = sock.peer_addr().context("the endpoint's connection")?;
    let cfg = migrate::tls::endpoint_client_config(cert.to_vec().into())?;
    tune(&sock)?;
    let name = ServerName::try_from(migrate::tls::CLUSTER_NAME)?;
    let mut conn = rustls::Connection::Client(rustls::ClientConnection::new(cfg, name)?);
    handshake(&mut sock, &mut conn, HANDSHAKE_LIMIT).with_context(|| format!("TLS with {addr}"))?;
    let w = Wire::tls(sock, conn);
    w.send(&Message::Hello(hello))?;
    match w.recv_timeout(HANDSHAKE_LIMIT) {
        Ok(Message::Welcome(_)) => Ok(w),
        Ok(Message::Refuse { reason }) => anyhow::bail!("{addr} refused: {reason}"),
        Ok(other) => anyhow::bail!("{addr} answered {:?}", other.kind()),
        Err(e) => anyhow::bail!("{addr}: {e}"),
    }
}

/// Accept one connection on an endpoint: TLS with the cluster key, then a Hello that `check`
/// approves (the token). Refused peers get the reason and an error naming them.
pub fn accept(
    sock: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    ours: &ServerIdentity,
    check: impl FnOnce(migrate::Purpose, Option<&[u8; 32]>) -> Result<(), String>,
) -> anyhow::Result<(Wire, Hello)> {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut sock = sock;
    sock.set_nonblocking(false)?;
    tune(&sock)?;
    let mut conn = rustls::Connection::Server(rustls::ServerConnection::new(cfg)?);
    if let Err(e) = handshake(&mut sock, &mut conn, HANDSHAKE_LIMIT) {
        anyhow::bail!("TLS handshake with {peer} failed: {e}");
    }
    let w = Wire::tls(sock, conn);
    let first = w.recv_timeout(HANDSHAKE_LIMIT);
    let (reply, hello) = migrate::handshake::answer(first.as_ref().cloned(), ours, check);
    let _ = w.send(&reply);
    match hello {
        Some(h) => Ok((w, h)),
        None => anyhow::bail!("refused {peer}: {reply:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate::handshake::Purpose;
    use std::net::TcpListener;

    fn identity() -> ServerIdentity {
        ServerIdentity {
            node_name: "b".into(),
            host_cpu: crate::migration::host_features(),
        }
    }

    /// A fresh cluster key (in the returned directory) and a listener on loopback.
    fn endpoint() -> (tempfile::TempDir, migrate::ClusterTls, TcpListener) {
        let dir = tempfile::tempdir().unwrap();
        migrate::keygen(dir.path()).unwrap();
        let tls = migrate::ClusterTls::load(dir.path()).unwrap();
        (dir, tls, TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// Frames cross a TLS link both ways, large ones included, while another thread sends;
    /// a wrong token is refused.
    #[test]
    fn frames_cross_a_tls_link_and_tokens_are_checked() {
        let (_dir, tls, l) = endpoint();
        let addr = l.local_addr().unwrap();
        let token = [5u8; 32];
        let cfg = tls.endpoint_config();
        let server = std::thread::spawn(move || {
            let mut out = vec![];
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                let r = accept(s, cfg.clone(), &identity(), |_, t| match t {
                    Some(t) if migrate::tls::tokens_equal(t, &token) => Ok(()),
                    _ => Err("bad token".into()),
                });
                let Ok((w, _)) = r else {
                    out.push(None);
                    continue;
                };
                // Echo until the client closes.
                let mut n = 0;
                while let Ok(m) = w.recv() {
                    w.send(&m).unwrap();
                    n += 1;
                }
                out.push(Some(n));
            }
            out
        });
        let cert = tls.cert().to_vec();
        let hello = |t| Hello::new("a", Purpose::Deputy, crate::migration::host_features(), t);
        let bad = connect(addr, &cert, hello(Some([6u8; 32])));
        assert!(bad.is_err_and(|e| e.to_string().contains("bad token")));
        let w = connect(addr, &cert, hello(Some(token))).unwrap();
        let big = Message::State {
            vcpu_and_vmm: (0..3_000_000u32).map(|i| (i * 7) as u8).collect(),
        };
        let w2 = w.clone();
        let other = std::thread::spawn(move || {
            for t in 0..100 {
                w2.send(&Message::Ping { t }).unwrap();
            }
        });
        w.send(&big).unwrap();
        other.join().unwrap();
        let mut pings = 0;
        let mut bigs = 0;
        for _ in 0..101 {
            match w.recv().unwrap() {
                Message::Ping { t } => {
                    assert_eq!(t, pings);
                    pings += 1;
                }
                m => {
                    assert_eq!(m, big);
                    bigs += 1;
                }
            }
        }
        assert_eq!((pings, bigs), (100, 1));
        w.shutdown();
        assert_eq!(server.join().unwrap(), vec![None, Some(101)]);
    }

    /// Large frames wait for room in the socket a piece at a time, letting go of the session
    /// meanwhile; frames another thread sends all the while still arrive whole and in order.
    #[test]
    fn frames_sent_while_a_large_one_waits_for_room_arrive_whole() {
        let (_dir, tls, l) = endpoint();
        let addr = l.local_addr().unwrap();
        let cfg = tls.endpoint_config();
        let big = Message::State {
            vcpu_and_vmm: (0..8_000_000u32).map(|i| (i * 13) as u8).collect(),
        };
        let want = big.clone();
        // A slow reader, so the sender's socket fills and large frames wait mid-way.
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let (w, _) = accept(s, cfg, &identity(), |_, _| Ok(())).unwrap();
            let (mut pings, mut bigs) = (0u64, 0);
            loop {
                match w.recv() {
                    Ok(Message::Ping { t }) => {
                        assert_eq!(t, pings, "pings out of order");
                        pings += 1;
                    }
                    Ok(Message::Pong { .. }) => return (pings, bigs),
                    Ok(m) => {
                        assert_eq!(m, want, "a large frame arrived changed");
                        bigs += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("the stream broke: {e}"),
                }
            }
        });
        let hello = Hello::new(
            "a",
            Purpose::Deputy,
            crate::migration::host_features(),
            Some([1; 32]),
        );
        let w = connect(addr, tls.cert(), hello).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w2, d2) = (w.clone(), done.clone());
        let pinger = std::thread::spawn(move || {
            let mut t = 0;
            while !d2.load(std::sync::atomic::Ordering::SeqCst) {
                w2.send(&Message::Ping { t }).unwrap();
                t += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            t
        });
        for _ in 0..4 {
            w.send(&big).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = pinger.join().unwrap();
        w.send(&Message::Pong { t: 0 }).unwrap();
        assert_eq!(server.join().unwrap(), (sent, 4));
        assert!(sent > 0);
    }
}
