//! The node's local control protocol: JSON lines over a Unix socket. `mosvm run` registers
//! its process here (and keeps the connection as the process's command channel); the client
//! commands (`ps`, `lock`, `unlock`, `nodes`) send one request and read one reply.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Where the control socket is when neither `--socket` nor `MOSVM_SOCKET` says.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("mosvm.sock"),
        _ => PathBuf::from("/run/mosvm/mosvm.sock"),
    }
}

/// The socket a client should use: the flag, else `MOSVM_SOCKET`, else the default.
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(env_socket)
        .unwrap_or_else(default_socket)
}

/// `MOSVM_SOCKET`, unless unset or empty.
pub fn env_socket() -> Option<PathBuf> {
    std::env::var_os("MOSVM_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A request to the node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A `mosvm run` announcing its process; the connection then carries [`Command`]s to it
    /// and [`Update`]s from it.
    Register {
        /// Home pid (the `mosvm run` process).
        pid: u32,
        /// Program path.
        program: String,
        /// Never migrate.
        locked: bool,
        /// The node it already runs on, when that is not this one (a child forked away from
        /// home).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        away_on: Option<String>,
    },
    /// Every process whose home is this node, plus guests hosted here.
    Ps,
    /// Pin a process to where it is.
    Lock { pid: u32 },
    /// Let a process migrate again.
    Unlock { pid: u32 },
    /// This node's view of the cluster.
    Nodes,
    /// Move process `pid` to node `to` (a peer's name or address). With `wait`, the answer
    /// comes when this move is over: [`Reply::Moved`] or the reason it failed.
    Migrate {
        pid: u32,
        to: String,
        #[serde(default)]
        wait: bool,
        /// How the move switches over.
        #[serde(default)]
        mode: MoveMode,
    },
    /// From the process migrating `pid` (its `mosvm run`, or the guest host running it): have
    /// node `to` start a guest host for it, and answer where that host waits
    /// ([`Reply::Endpoint`]). The two processes then connect directly.
    Link { pid: u32, to: String },
    /// Administer the node (`mosvm ctl VERB [VALUE]`): stay, nostay, lstay, nolstay, block,
    /// noblock, expel, bring, speed, status.
    Ctl {
        verb: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<f64>,
    },
}

/// What a guest host asks its node over its channel (hostchan.rs): one JSON datagram each.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum Ask {
    /// System calls so far: sent home, and served here (no answer).
    Calls { home: u64, local: u64 },
    /// Have node `to` start a guest host for process `pid` (this guest host's guest) and
    /// connect to it: a [`Reply::Endpoint`] and the connected TCP socket.
    Link { pid: u32, to: String },
    /// A TCP socket listening on `ip` (one of this node's addresses) at a port the kernel
    /// picks: [`Reply::Ok`] and the socket.
    Listen { ip: std::net::IpAddr },
    /// A guest host forked from this one, running process `pid` of node `home`: its own
    /// channel comes as the second descriptor, and the node forgets the guest when that
    /// channel closes. [`Reply::Ok`].
    Hosting {
        pid: u32,
        home: String,
        program: String,
    },
}

/// A process as `mosvm ps` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcInfo {
    /// Home pid.
    pub pid: u32,
    /// Program path.
    pub program: String,
    /// Node it runs on.
    pub node: String,
    /// running / migrating / exited.
    pub state: String,
    /// CPU seconds so far.
    pub cpu_s: f64,
    /// Guest memory in use, bytes.
    pub mem_bytes: u64,
    /// Migrations so far.
    pub migrations: u32,
    /// Locked to its node.
    pub locked: bool,
    /// Why the process cannot leave its home node now (it holds a shared mapping:
    /// paper section 4.2), if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Why the last requested migration failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why it last moved: manual, load, memory, cost, expel or bring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_by: Option<String>,
}

/// A node as `mosvm nodes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// Peer address.
    pub addr: String,
    /// CPU capacity in CPUs (its cgroup quota, or its online CPUs).
    pub cpus: f64,
    /// Relative CPU speed (1.0 = the reference CPU).
    pub speed: f64,
    /// Load: runnable threads per unit of capacity (CPUs x speed), smoothed.
    pub load: f64,
    /// Free memory, bytes.
    pub free_mem: u64,
    /// Memory available to processes, bytes.
    pub total_mem: u64,
    /// Age of this information, seconds (0 for this node; None: never heard from).
    pub age_s: Option<f64>,
    /// Membership (SWIM) lists it alive.
    pub up: bool,
}

/// The node's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done.
    Ok,
    /// Registered: the node's name.
    Registered { node: String },
    /// `ps`.
    Procs { procs: Vec<ProcInfo> },
    /// `nodes`.
    Nodes { nodes: Vec<NodeInfo> },
    /// Refused, with a one-line reason.
    Error { message: String },
    /// `mosvm ctl status`.
    Status { status: Box<crate::admin::Status> },
    /// For [`Request::Migrate`] with `wait`: the move is done; the process runs on `node`.
    Moved { node: String },
    /// For [`Request::Link`]: a guest host waits at `addr` for a connection bearing `token`
    /// (hex), and proves itself with the cluster certificate `cert` (hex DER).
    Endpoint {
        addr: String,
        token: String,
        cert: String,
    },
}

/// Where a guest host waits for the process it will run, decoded from [`Reply::Endpoint`].
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: std::net::SocketAddr,
    pub token: [u8; 32],
    pub cert: Vec<u8>,
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex; None when it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Endpoint {
    pub(crate) fn from_reply(addr: &str, token: &str, cert: &str) -> anyhow::Result<Endpoint> {
        let addr = addr
            .parse()
            .map_err(|e| anyhow::anyhow!("bad endpoint address {addr}: {e}"))?;
        let token = unhex(token)
            .and_then(|t| <[u8; 32]>::try_from(t).ok())
            .ok_or_else(|| anyhow::anyhow!("bad endpoint token"))?;
        let cert = unhex(cert).ok_or_else(|| anyhow::anyhow!("bad endpoint certificate"))?;
        Ok(Endpoint { addr, token, cert })
    }
}

/// Ask the node at `socket` for an endpoint on node `to` to move process `pid` to.
pub fn endpoint(socket: &Path, pid: u32, to: &str) -> anyhow::Result<Endpoint> {
    match call(socket, &Request::Link { pid, to: to.into() })? {
        Reply::Endpoint { addr, token, cert } => Endpoint::from_reply(&addr, &token, &cert),
        Reply::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// A command from the node to a registered `mosvm run`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Lock or unlock the process.
    SetLocked { locked: bool },
    /// Migrate the process to node `to`; `id` names this request in the outcome
    /// ([`Update::Moved`], [`Update::MigrationFailed`]).
    Migrate {
        to: String,
        #[serde(default)]
        id: u64,
        /// How the move switches over.
        #[serde(default)]
        mode: MoveMode,
    },
}

/// How a move switches over (`mosvm migrate --precopy | --postcopy`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveMode {
    /// Pre-copy; when it cannot converge (the guest writes faster than the link drains) and
    /// the destination can, post-copy instead of throttling the guest.
    #[default]
    Auto,
    /// Pre-copy only (a guest that writes too fast is throttled until it fits).
    Precopy,
    /// Post-copy from the start: the guest pauses, its state and the pages it wrote last
    /// cross, it resumes at the destination, and the rest follows (`migrate::postcopy`).
    Postcopy,
}

/// A status update from a registered `mosvm run` to its node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "update", rename_all = "snake_case")]
pub enum Update {
    /// Guest memory in use.
    Memory { bytes: u64 },
    /// The process now runs on `node`: the end of move `id` (None: a move no request of the
    /// node's asked for, such as its host's balancer's).
    Moved {
        node: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Move `id` failed, or was refused; the process still runs where it was.
    MigrationFailed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// CPU time the process has used on other nodes so far (seconds), and its memory there.
    Remote { cpu_s: f64, mem_bytes: u64 },
    /// Whether (and why) the process must stay at home now.
    Pinned { reason: Option<String> },
    /// The process exec'd another program.
    Program { program: String },
    /// System calls so far: sent home, and served where the process runs.
    Calls { home: u64, local: u64 },
}

/// Why [`call`] failed when the node closed the connection before it answered (it stopped).
pub const NO_ANSWER: &str = "the node closed the connection without answering";

/// Send one request and read one reply.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the mosvm node at {}: {e} (is `mosvm node` running?)",
            socket.display()
        )
    })?;
    let mut w = stream.try_clone()?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    let mut r = BufReader::new(stream);
    let mut answer = String::new();
    r.read_line(&mut answer)?;
    anyhow::ensure!(!answer.is_empty(), NO_ANSWER);
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_are_json_lines() {
        let r = Request::Lock { pid: 42 };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"lock","pid":42}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let bad = serde_json::from_str::<Request>(r#"{"op":"explode"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn asks_are_json_datagrams() {
        let a = Ask::Link {
            pid: 7,
            to: "n2".into(),
        };
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(s, r#"{"ask":"link","pid":7,"to":"n2"}"#);
        assert_eq!(serde_json::from_str::<Ask>(&s).unwrap(), a);
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&b)).unwrap(), b);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn socket_flag_wins_over_environment() {
        assert_eq!(socket_path(Some(Path::new("/x/s"))), PathBuf::from("/x/s"));
    }
}
