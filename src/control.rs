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
        .or_else(|| std::env::var_os("MOSVM_SOCKET").map(PathBuf::from))
        .unwrap_or_else(default_socket)
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
    },
    /// Every process whose home is this node, plus guests hosted here.
    Ps,
    /// Pin a process to where it is.
    Lock { pid: u32 },
    /// Let a process migrate again.
    Unlock { pid: u32 },
    /// This node's view of the cluster.
    Nodes,
    /// Move process `pid` to node `to` (a peer's name or address).
    Migrate { pid: u32, to: String },
    /// From a `mosvm run` migrating its process: connect this stream to node `to` (over the
    /// cluster's TLS, handshake done); after the `Ok` reply the stream carries `migrate` frames.
    Link { pid: u32, to: String },
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
}

/// A node as `mosvm nodes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// Peer address.
    pub addr: String,
    /// Processors.
    pub cpus: u32,
    /// Load (runnable processes per CPU).
    pub load: f64,
    /// Free memory, bytes.
    pub free_mem: u64,
    /// Seconds since this information was fresh (0 for this node; None: never heard from).
    pub age_s: Option<f64>,
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
}

/// A command from the node to a registered `mosvm run`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Lock or unlock the process.
    SetLocked { locked: bool },
    /// Migrate the process to node `to`.
    Migrate { to: String },
}

/// A status update from a registered `mosvm run` to its node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "update", rename_all = "snake_case")]
pub enum Update {
    /// Guest memory in use.
    Memory { bytes: u64 },
    /// The process now runs on `node`.
    Moved { node: String },
    /// A requested migration failed; the process still runs where it was.
    MigrationFailed { reason: String },
}

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
    anyhow::ensure!(
        !answer.is_empty(),
        "the node closed the connection without answering"
    );
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
    fn socket_flag_wins_over_environment() {
        assert_eq!(socket_path(Some(Path::new("/x/s"))), PathBuf::from("/x/s"));
    }
}
