//! The channel between a guest host and its node. A jailed guest host ([`crate::jail`]) opens
//! no file and no socket of its own: what it needs from this host beyond its link home it asks
//! the node for here.
//!
//! The channel is a `SOCK_SEQPACKET` Unix socket pair (unix(7)). A guest host the node
//! spawned inherits its end at the descriptor [`CHANNEL_ENV`] names; a guest host forked from another brings
//! its own ([`Ask::Hosting`]). Each datagram is one [`Ask`] as JSON.
//!
//! An ask that has an answer carries, as its first descriptor (`SCM_RIGHTS`), one end of a
//! fresh socket pair. The node answers there: one datagram, a [`Reply`] as JSON plus the
//! descriptor asked for. So answers never cross between threads or processes that share a
//! channel.
//!
//! The node never writes on a channel. The guest host's reading end seeing end-of-file means
//! the node is gone, and so is the guest ([`Channel::die_with_node`]).

pub use crate::control::Ask;
use crate::control::{Endpoint, Reply};
use crate::node::Shared;
use anyhow::{Context, Result};
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The environment variable naming the descriptor of a spawned guest host's channel.
pub const CHANNEL_ENV: &str = "MOSVM_CHANNEL";
/// Largest datagram either side sends, bytes.
const MAX_DATAGRAM: usize = 64 * 1024;
/// Most descriptors one datagram carries.
const MAX_FDS: usize = 2;
/// How long an ask may wait for its answer: a link goes through a peer, each of whose steps
/// has [`crate::peers::STEP_LIMIT`], and then a TCP connect.
pub const ASK_LIMIT: Duration = Duration::from_secs(45);

/// A pair of connected `SOCK_SEQPACKET` Unix sockets, close-on-exec.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Send `msg` with `fds` as one datagram.
fn send(sock: BorrowedFd, msg: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(msg)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One datagram and the descriptors it carried; None at end-of-file (the other end closed).
type Datagram = Option<(Vec<u8>, Vec<OwnedFd>)>;

/// Receive one datagram. A datagram longer than [`MAX_DATAGRAM`] or with more than
/// [`MAX_FDS`] descriptors is an error (the descriptors it brought are closed).
fn recv(sock: BorrowedFd) -> std::io::Result<Datagram> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = loop {
        match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: SCM_RIGHTS gave this process these descriptors; nothing else owns them.
            fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let (n, cut) = (
        msg.bytes,
        msg.flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
    );
    if cut {
        return Err(std::io::Error::other(
            "a datagram too large for the channel",
        ));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

/// The descriptor [`CHANNEL_ENV`] names, if it names one above the standard three.
pub fn inherited_fd() -> Option<RawFd> {
    std::env::var(CHANNEL_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
}

/// A guest host's end of its channel.
pub struct Channel(OwnedFd);

/// The channel of this process (it changes in a guest host forked from another).
static NODE: Mutex<Option<Arc<Channel>>> = Mutex::new(None);

/// This guest host's channel to its node.
pub fn node() -> Result<Arc<Channel>> {
    NODE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .context("this guest host has no channel to its node")
}

impl Channel {
    /// The channel the node handed this guest host (the descriptor [`CHANNEL_ENV`] names);
    /// it becomes this process's ([`node`]).
    pub fn inherited() -> Result<Arc<Channel>> {
        let fd = inherited_fd().with_context(|| format!("{CHANNEL_ENV} names no descriptor"))?;
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        anyhow::ensure!(
            open,
            "descriptor {fd} (the channel to the node) is not open"
        );
        // SAFETY: descriptor `fd` is open and, by the node's contract, this process's
        // channel, owned by nothing else here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ty = socket::getsockopt(&fd, socket::sockopt::SockType);
        anyhow::ensure!(
            matches!(ty, Ok(SockType::SeqPacket)),
            "descriptor {} is not the node's channel (a SOCK_SEQPACKET socket)",
            fd.as_raw_fd()
        );
        // Not inherited by anything this process might start.
        // SAFETY: F_SETFD on a descriptor this process owns.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Channel(fd).install())
    }

    /// Make this the process's channel ([`node`]); the one it replaces closes here once no
    /// one holds it.
    fn install(self) -> Arc<Channel> {
        let c = Arc::new(self);
        *NODE.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        c
    }

    /// Say `ask`, which has no answer.
    pub fn tell(&self, ask: &Ask) -> Result<()> {
        send(self.0.as_fd(), &serde_json::to_vec(ask)?, &[]).context("telling the node")
    }

    /// Ask, handing over `fds` too; the answer and the descriptor that came with it. An
    /// answer that is [`Reply::Error`] is an error.
    pub fn ask(&self, ask: &Ask, fds: &[BorrowedFd]) -> Result<(Reply, Option<OwnedFd>)> {
        let (mine, theirs) = pair()?;
        let mut all = vec![theirs.as_raw_fd()];
        all.extend(fds.iter().map(|f| f.as_raw_fd()));
        send(self.0.as_fd(), &serde_json::to_vec(ask)?, &all).context("asking the node")?;
        drop(theirs);
        crate::wire::wait(
            mine.as_raw_fd(),
            libc::POLLIN,
            Some(Instant::now() + ASK_LIMIT),
        )
        .with_context(|| format!("the node did not answer within {ASK_LIMIT:?}"))?;
        let (bytes, mut got) =
            recv(mine.as_fd())?.context("the node closed the channel without answering")?;
        match serde_json::from_slice(&bytes).context("the node's answer")? {
            Reply::Error { message } => anyhow::bail!("{message}"),
            r => Ok((r, got.pop())),
        }
    }

    /// The node's half of what [`Ask::Link`] describes: an endpoint on node `to` for process
    /// `pid`, and a TCP connection to it.
    pub fn link(&self, pid: u32, to: &str) -> Result<(Endpoint, TcpStream)> {
        let ask = Ask::Link {
            pid,
            to: to.to_string(),
        };
        match self.ask(&ask, &[])? {
            (Reply::Endpoint { addr, token, cert }, Some(fd)) => {
                Ok((Endpoint::from_reply(&addr, &token, &cert)?, fd.into()))
            }
            (other, _) => anyhow::bail!("unexpected answer to a link: {other:?}"),
        }
    }

    /// A TCP socket listening on `ip`, one of this node's addresses.
    pub fn listen(&self, ip: IpAddr) -> Result<TcpListener> {
        match self.ask(&Ask::Listen { ip }, &[])? {
            (Reply::Ok, Some(fd)) => Ok(fd.into()),
            (other, _) => anyhow::bail!("unexpected answer to a listen: {other:?}"),
        }
    }

    /// In a guest host forked from another: register with the node as the host of process
    /// `pid` of `home`, over a channel of its own, which becomes this process's ([`node`]).
    pub fn hosting(&self, pid: u32, home: &str, program: &str) -> Result<Arc<Channel>> {
        let (mine, theirs) = pair()?;
        let ask = Ask::Hosting {
            pid,
            home: home.to_string(),
            program: program.to_string(),
        };
        match self.ask(&ask, &[theirs.as_fd()])? {
            (Reply::Ok, _) => Ok(Channel(mine).install()),
            (other, _) => anyhow::bail!("unexpected answer to hosting: {other:?}"),
        }
    }

    /// In a process forked from a guest host: close this process's copy of the channel,
    /// which the parent's threads holding it (not in this process) would never release.
    pub fn close_in_fork(self: Arc<Self>) {
        // SAFETY: this process's copy of the descriptor; every object owning it belongs to
        // threads of the parent and is never dropped here (forgotten below).
        unsafe { libc::close(self.0.as_raw_fd()) };
        std::mem::forget(self);
    }

    /// The node is gone when its end of this channel closes: so is this process (a guest
    /// nobody can serve any more; its home sees the link lost).
    pub fn die_with_node(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::spawn(move || {
            crate::link::block_host_signals();
            // The node never writes here: anything but a datagram is the end.
            while let Ok(Some(_)) = recv(me.0.as_fd()) {}
            // SAFETY: kill(2) of this very process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        });
    }
}

/// The node's side: serve the channel of guest host `host_pid` on a thread of its own until
/// it closes. `forked`: a guest host the node did not spawn (it registered with
/// [`Ask::Hosting`]), which the node forgets when its channel closes; one it spawned is
/// forgotten when it exits.
pub(crate) fn serve(
    shared: Shared,
    rt: tokio::runtime::Handle,
    chan: OwnedFd,
    host_pid: u32,
    forked: bool,
) {
    std::thread::spawn(move || {
        loop {
            let (bytes, mut fds) = match recv(chan.as_fd()) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(host_pid, "guest host channel: {e}");
                    break;
                }
            };
            let ask: Ask = match serde_json::from_slice(&bytes) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(host_pid, "guest host sent a bad ask: {e}");
                    continue;
                }
            };
            if let Ask::Calls { home, local } = ask {
                if let Some(h) = shared.lock().expect("state lock").hosted.get_mut(&host_pid) {
                    h.calls = (home, local);
                }
                continue;
            }
            if fds.is_empty() {
                tracing::warn!(host_pid, "guest host asked without a place to answer");
                continue;
            }
            let answer_to = fds.remove(0);
            let (reply, fd) = match answer(&shared, &rt, host_pid, ask, fds) {
                Ok(x) => x,
                Err(e) => (
                    Reply::Error {
                        message: format!("{e:#}"),
                    },
                    None,
                ),
            };
            let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
            if let Ok(b) = serde_json::to_vec(&reply) {
                // The asker may be gone: then nobody reads, and that is fine.
                let _ = send(answer_to.as_fd(), &b, &raw);
            }
        }
        if forked {
            shared.lock().expect("state lock").hosted.remove(&host_pid);
            tracing::info!(host_pid, "guest host ended");
        }
    });
}

/// The node's answer to `ask` from guest host `host_pid`, which brought `fds` besides the
/// place to answer.
fn answer(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    host_pid: u32,
    ask: Ask,
    fds: Vec<OwnedFd>,
) -> Result<(Reply, Option<OwnedFd>)> {
    let guest = shared
        .lock()
        .expect("state lock")
        .hosted
        .get(&host_pid)
        .map(|h| h.pid);
    match ask {
        Ask::Calls { .. } => Ok((Reply::Ok, None)),
        Ask::Link { pid, to } => {
            // A guest host moves its own guest, no other.
            anyhow::ensure!(
                guest == Some(pid),
                "guest host {host_pid} does not run process {pid}"
            );
            let reply = rt.block_on(crate::peers::link(shared, pid, &to))?;
            let Reply::Endpoint { addr, token, cert } = &reply else {
                anyhow::bail!("no endpoint on {to}");
            };
            let ep = Endpoint::from_reply(addr, token, cert)?;
            let sock = TcpStream::connect_timeout(&ep.addr, crate::wire::HANDSHAKE_LIMIT)
                .with_context(|| format!("connecting to {}", ep.addr))?;
            Ok((reply, Some(sock.into())))
        }
        Ask::Listen { ip } => {
            anyhow::ensure!(guest.is_some(), "guest host {host_pid} runs no guest here");
            let l = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}"))?;
            Ok((Reply::Ok, Some(l.into())))
        }
        Ask::Hosting { pid, home, program } => {
            anyhow::ensure!(guest.is_some(), "guest host {host_pid} runs no guest here");
            let chan = fds
                .into_iter()
                .next()
                .context("hosting without a channel")?;
            // The new guest host is whoever made its channel (SO_PEERCRED of a socket pair).
            let cred = socket::getsockopt(&chan, socket::sockopt::PeerCredentials)
                .context("the new channel's owner")?;
            let child = u32::try_from(cred.pid()).context("the new channel's owner")?;
            shared.lock().expect("state lock").hosted.insert(
                child,
                crate::node::Hosted {
                    pid,
                    home,
                    program,
                    since: Instant::now(),
                    calls: (0, 0),
                },
            );
            tracing::info!(pid, host_pid = child, "hosting a guest forked here");
            serve(shared.clone(), rt.clone(), chan, child, true);
            Ok((Reply::Ok, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_carry_descriptors_and_end_of_file_is_seen() {
        let (a, b) = pair().unwrap();
        let (x, y) = pair().unwrap();
        send(a.as_fd(), b"hello", &[x.as_raw_fd()]).unwrap();
        let (bytes, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(bytes, b"hello");
        assert_eq!(fds.len(), 1);
        // The descriptor that arrived is a working end of the pair.
        send(fds[0].as_fd(), b"through", &[]).unwrap();
        assert_eq!(recv(y.as_fd()).unwrap().unwrap().0, b"through");
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, b) = pair().unwrap();
        let (x, y) = pair().unwrap();
        let fds = [x.as_raw_fd(), y.as_raw_fd(), x.as_raw_fd()];
        send(a.as_fd(), b"{}", &fds).unwrap();
        assert!(recv(b.as_fd()).is_err());
    }
}
