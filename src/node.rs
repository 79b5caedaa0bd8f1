//! `mosvm node`: the per-node host service. It owns the local control socket, where every
//! `mosvm run` started on this node registers its process (this node is the process's home),
//! and answers the client commands (`ps`, `lock`, `unlock`, `nodes`).

use crate::control::{Command, NodeInfo, ProcInfo, Reply, Request, Update};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// Node settings: flags override the TOML file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name (default: the host name).
    pub name: Option<String>,
    /// Address peers reach this node on.
    pub listen: Option<SocketAddr>,
    /// Known peers.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Control socket path.
    pub socket: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
}

impl Config {
    /// Read a TOML config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
    }
}

struct Proc {
    info: ProcInfo,
    commands: mpsc::UnboundedSender<Command>,
}

struct State {
    name: String,
    listen: Option<SocketAddr>,
    peers: Vec<SocketAddr>,
    procs: HashMap<u32, Proc>,
}

type Shared = Arc<Mutex<State>>;

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

/// CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

fn self_info(st: &State) -> NodeInfo {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let free_mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .unwrap_or(0)
        * 1024;
    NodeInfo {
        name: st.name.clone(),
        addr: st.listen.map(|a| a.to_string()).unwrap_or_default(),
        cpus,
        load: load / cpus as f64,
        free_mem,
        age_s: 0.0,
    }
}

async fn reply(stream: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> Result<()> {
    let mut line = serde_json::to_string(r)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    Ok(())
}

async fn serve_client(stream: UnixStream, shared: Shared) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Some(first) = lines.next_line().await? else {
        return Ok(());
    };
    let req: Request = match serde_json::from_str(&first) {
        Ok(r) => r,
        Err(e) => {
            let message = format!("bad request: {e}");
            return reply(&mut write, &Reply::Error { message }).await;
        }
    };
    match req {
        Request::Register {
            pid,
            program,
            locked,
        } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let name = {
                let mut st = shared.lock().expect("state lock");
                let node = st.name.clone();
                let info = ProcInfo {
                    pid,
                    program: program.clone(),
                    node: node.clone(),
                    state: "running".into(),
                    cpu_s: 0.0,
                    mem_bytes: 0,
                    migrations: 0,
                    locked,
                };
                st.procs.insert(pid, Proc { info, commands: tx });
                node
            };
            tracing::info!(pid, program, locked, "process registered");
            reply(&mut write, &Reply::Registered { node: name }).await?;
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => {
                            if let Ok(Update::Memory { bytes }) = serde_json::from_str::<Update>(&l) {
                                if let Some(p) = shared.lock().expect("state lock").procs.get_mut(&pid) {
                                    p.info.mem_bytes = bytes;
                                }
                            }
                        }
                        _ => break,
                    },
                    cmd = rx.recv() => match cmd {
                        Some(c) => {
                            let mut line = serde_json::to_string(&c)?;
                            line.push('\n');
                            if write.write_all(line.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
            shared.lock().expect("state lock").procs.remove(&pid);
            tracing::info!(pid, "process ended");
            Ok(())
        }
        Request::Ps => {
            let procs = {
                let st = shared.lock().expect("state lock");
                let mut v: Vec<ProcInfo> = st.procs.values().map(|p| p.info.clone()).collect();
                v.sort_by_key(|p| p.pid);
                v
            };
            let procs = procs.into_iter().map(|mut p| {
                p.cpu_s = cpu_seconds(p.pid);
                p
            });
            reply(
                &mut write,
                &Reply::Procs {
                    procs: procs.collect(),
                },
            )
            .await
        }
        Request::Lock { pid } | Request::Unlock { pid } => {
            let locked = matches!(req, Request::Lock { .. });
            let r = {
                let mut st = shared.lock().expect("state lock");
                let node = st.name.clone();
                match st.procs.get_mut(&pid) {
                    Some(p) => {
                        p.info.locked = locked;
                        let _ = p.commands.send(Command::SetLocked { locked });
                        Reply::Ok
                    }
                    None => Reply::Error {
                        message: format!("no process with home pid {pid} on node {node}"),
                    },
                }
            };
            reply(&mut write, &r).await
        }
        Request::Nodes => {
            let nodes = {
                let st = shared.lock().expect("state lock");
                let mut v = vec![self_info(&st)];
                for p in &st.peers {
                    v.push(NodeInfo {
                        name: String::new(),
                        addr: p.to_string(),
                        cpus: 0,
                        load: 0.0,
                        free_mem: 0,
                        age_s: f64::INFINITY,
                    });
                }
                v
            };
            reply(&mut write, &Reply::Nodes { nodes }).await
        }
    }
}

/// Bind the control socket, replacing a stale one but never a live node's.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another mosvm node is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Run the node service until SIGINT or SIGTERM.
pub fn run(cfg: Config) -> Result<()> {
    let name = cfg.name.clone().unwrap_or_else(host_name);
    let socket = crate::control::socket_path(cfg.socket.as_deref());
    let state_dir = cfg
        .state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mosvm-{name}")));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind_socket(&socket)?;
        let shared: Shared = Arc::new(Mutex::new(State {
            name: name.clone(),
            listen: cfg.listen,
            peers: cfg.peers.clone(),
            procs: HashMap::new(),
        }));
        tracing::info!(node = name, socket = %socket.display(), state_dir = %state_dir.display(), "mosvm node up");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                conn = listener.accept() => {
                    let (stream, _) = conn?;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(stream, shared).await {
                            tracing::warn!("control client: {e:#}");
                        }
                    });
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!(node = name, "mosvm node down");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_parses_and_rejects_unknown_keys() {
        let c: Config = toml::from_str(
            "name = \"a\"\nlisten = \"10.0.0.1:7420\"\npeers = [\"10.0.0.2:7420\"]\nsocket = \"/tmp/a.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("a"));
        assert_eq!(c.peers.len(), 1);
        assert!(toml::from_str::<Config>("nmae = \"typo\"").is_err());
    }

    #[test]
    fn cpu_time_of_this_process_is_readable() {
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(std::process::id()) > 0.0);
    }
}
