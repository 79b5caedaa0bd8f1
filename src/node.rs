//! `mosvm node`: the per-node host service. It owns the local control socket, where every
//! `mosvm run` started on this node registers its process (this node is the process's home),
//! and answers the client commands (`ps`, `lock`, `unlock`, `nodes`, `migrate`). Toward its
//! peers it listens with mutual TLS: a peer asks it to host a guest (it starts a
//! `mosvm guest-host` on a fresh port with a one-time token and says where; the moving process
//! then connects there itself), or asks how it is doing (`Load`).

use crate::control::{Command, ProcInfo, Reply, Request, Update};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// Node settings: flags override the TOML file, whose keys are named as the flags
/// (`key-dir`, `peer`, ...; the older `key_dir`, `state_dir` and `peers` are accepted too).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Node name (default: the host name).
    pub name: Option<String>,
    /// Address peers reach this node on.
    pub listen: Option<SocketAddr>,
    /// Known peers: `ADDR` or `NAME=ADDR`.
    #[serde(default, rename = "peer", alias = "peers")]
    pub peers: Vec<String>,
    /// Directory holding the cluster key (`mosvm keygen`); without it no peer is served.
    #[serde(alias = "key_dir")]
    pub key_dir: Option<PathBuf>,
    /// Control socket path.
    pub socket: Option<PathBuf>,
    /// State directory.
    #[serde(alias = "state_dir")]
    pub state_dir: Option<PathBuf>,
    /// Automatic migration policy: `mosix` (default), `opportunity-cost` or `off`.
    pub policy: Option<String>,
    /// Gossip and decision step, seconds (default 1).
    pub step: Option<f64>,
    /// Relative CPU speed (default: calibrated at start).
    pub speed: Option<f64>,
    /// CPU capacity to give the node's own cgroup, in CPUs (e.g. 0.5).
    pub cpus: Option<f64>,
    /// Memory limit to give the node's own cgroup (`512M`, `2G`).
    pub memory: Option<String>,
    /// Record the balancer's inputs and decisions to this file (replay: `mosvm sim --replay`).
    pub balancer_trace: Option<PathBuf>,
    /// Memory ushering starts when free memory falls below this fraction of the node's
    /// memory (default 0.05).
    pub usher_free: Option<f64>,
    /// Serve Prometheus metrics on this address.
    pub metrics: Option<SocketAddr>,
    /// Memory kept touched for arriving guests (`256M`, `1G`; `0`: none). Default: 256 MiB,
    /// at most a sixteenth of the node's memory.
    pub pool: Option<String>,
}

impl Config {
    /// Read a TOML config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
    }
}

/// A process whose home is this node (its `mosvm run` registered here).
pub(crate) struct Proc {
    pub(crate) info: ProcInfo,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    /// CPU seconds used on other nodes (reported by `mosvm run`).
    pub(crate) remote_cpu_s: f64,
    /// When it registered.
    pub(crate) since: std::time::Instant,
    /// Why the move under way was ordered (manual, load, memory, expel, bring).
    pub(crate) moving_for: Option<String>,
    /// The request whose move is under way (its id).
    pub(crate) moving: Option<u64>,
    /// Who waits for the outcome of which request: the node it then runs on, or why it
    /// failed (`mosvm migrate --wait`).
    pub(crate) waiters: Vec<(u64, tokio::sync::oneshot::Sender<Result<String, String>>)>,
    /// Moves that failed so far.
    pub(crate) failures: u32,
    /// System calls so far: (sent home, served locally).
    pub(crate) calls: (u64, u64),
    /// Programs it exec'd so far.
    pub(crate) execs: u32,
}

/// A guest this node hosts for another node.
pub(crate) struct Hosted {
    /// Its home pid.
    pub(crate) pid: u32,
    /// Its home node's name.
    pub(crate) home: String,
    /// Program path.
    pub(crate) program: String,
    /// When its guest host started.
    pub(crate) since: std::time::Instant,
    /// Its system calls so far: sent home, served here (reported by the guest host).
    pub(crate) calls: (u64, u64),
}

pub(crate) struct State {
    pub(crate) name: String,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) peers: Vec<(Option<String>, SocketAddr)>,
    pub(crate) procs: HashMap<u32, Proc>,
    /// Moves ordered so far (each request's id is the count at its order, from 1).
    pub(crate) moves_ordered: u64,
    pub(crate) tls: Option<migrate::ClusterTls>,
    pub(crate) socket: PathBuf,
    /// Guests hosted here for other nodes, by guest-host pid.
    pub(crate) hosted: HashMap<u32, Hosted>,
    /// The cluster key's directory, for guest hosts.
    pub(crate) key_dir: Option<PathBuf>,
    /// Every node heard of (configured, or met through gossip), by id.
    pub(crate) directory: HashMap<balancer::NodeId, crate::gossip::Contact>,
    /// What the administrator set (`mosvm ctl`).
    pub(crate) admin: crate::admin::Admin,
    /// What the balancer last published.
    pub(crate) view: crate::admin::View,
    /// The node's cgroup, which registered processes join.
    pub(crate) cgroup: crate::capacity::Cgroup,
    /// Events for the balancer (none when it does not run).
    pub(crate) balancer: Option<mpsc::UnboundedSender<crate::balance::Event>>,
    /// Bytes of touched memory a spare guest host keeps for arrivals (0: no spare).
    pub(crate) pool: u64,
    /// The guest host the next arriving guest goes to.
    pub(crate) spare: Option<crate::hosting::Spare>,
}

/// Resident memory of a process, bytes (from /proc).
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024
}

/// Parse `ADDR` or `NAME=ADDR`; ADDR is `IP:PORT` or `HOST:PORT` (resolved now, IPv4 first).
pub fn parse_peer(s: &str) -> Result<(Option<String>, SocketAddr)> {
    let (name, addr) = match s.split_once('=') {
        Some((n, a)) => (Some(n.trim().to_string()), a.trim()),
        None => (None, s.trim()),
    };
    let addr =
        host_addr(addr).map_err(|e| anyhow::anyhow!("peer '{s}': {e} (use ADDR or NAME=ADDR)"))?;
    Ok((name, addr))
}

/// `IP:PORT`, or `HOST:PORT` resolved (its first IPv4 address, else its first address).
pub fn host_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    let all: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("'{s}' is not HOST:PORT or IP:PORT ({e})"))?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("'{s}' has no address"))
}

/// What a node made at start and removes again if it does not come up: its state directory
/// (when it made it) and its control socket.
struct StartGuard {
    made: Vec<PathBuf>,
    up: bool,
}

impl StartGuard {
    /// The node is up: what it made stays.
    fn came_up(&mut self) {
        self.up = true;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.up {
            return;
        }
        for p in &self.made {
            let _ = if p.is_dir() {
                std::fs::remove_dir(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
}

/// The name of the node at address `to` (`IP:PORT` or `HOST:PORT`), when one is known there:
/// this node, a named peer, or one heard of by gossip. None for a name, or an unknown address.
pub(crate) fn name_at(st: &State, to: &str) -> Option<String> {
    if !to.contains(':') {
        return None;
    }
    let addr = host_addr(to).ok()?;
    if st.listen == Some(addr) {
        return Some(st.name.clone());
    }
    st.peers
        .iter()
        .find(|(n, a)| n.is_some() && *a == addr)
        .and_then(|(n, _)| n.clone())
        .or_else(|| {
            st.directory
                .values()
                .find(|c| c.addr == addr)
                .map(|c| c.name.clone())
        })
}

/// Resolve a node named by `mosvm migrate`: a configured peer's name, or an address.
pub(crate) fn resolve(st: &State, to: &str) -> Result<SocketAddr, String> {
    if let Some((_, a)) = st.peers.iter().find(|(n, _)| n.as_deref() == Some(to)) {
        return Ok(*a);
    }
    if let Some(c) = st.directory.values().find(|c| c.name == to) {
        return Ok(c.addr);
    }
    to.parse().map_err(|_| {
        let mut known: Vec<String> = st
            .peers
            .iter()
            .map(|(n, a)| n.clone().unwrap_or_else(|| a.to_string()))
            .chain(st.directory.values().map(|c| c.name.clone()))
            .collect();
        known.sort();
        known.dedup();
        format!("unknown node '{to}' (known: {})", known.join(", "))
    })
}

pub(crate) type Shared = Arc<Mutex<State>>;

/// Tell whoever waits for request `id` of process `p` how it ended.
fn answer(p: &mut Proc, id: u64, outcome: Result<String, String>) {
    if let Some(i) = p.waiters.iter().position(|(w, _)| *w == id) {
        let (_, tx) = p.waiters.swap_remove(i);
        let _ = tx.send(outcome);
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

/// CPU seconds of a process, from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
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

async fn reply(stream: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> Result<()> {
    let mut line = serde_json::to_string(r)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    Ok(())
}

/// Runs its closure on the node's state when dropped: what a client's connection registered
/// is forgotten however the connection's task ends.
struct Forget<F: FnMut(&mut State)>(Shared, F);

impl<F: FnMut(&mut State)> Drop for Forget<F> {
    fn drop(&mut self) {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (self.1)(&mut st);
    }
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
            away_on,
        } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let name = {
                let mut st = shared.lock().expect("state lock");
                let node = st.name.clone();
                let info = ProcInfo {
                    pid,
                    program: program.clone(),
                    node: away_on.unwrap_or_else(|| node.clone()),
                    state: "running".into(),
                    cpu_s: 0.0,
                    mem_bytes: 0,
                    migrations: 0,
                    locked,
                    last_error: None,
                    pinned: None,
                    moved_by: None,
                };
                st.procs.insert(
                    pid,
                    Proc {
                        info,
                        commands: tx,
                        remote_cpu_s: 0.0,
                        since: std::time::Instant::now(),
                        moving_for: None,
                        moving: None,
                        waiters: Vec::new(),
                        failures: 0,
                        calls: (0, 0),
                        execs: 0,
                    },
                );
                // Its CPU and memory count against this node's own capacity.
                if let Err(e) = st.cgroup.adopt(&pid.to_string()) {
                    tracing::warn!(pid, "cannot move the process into the node's cgroup: {e:#}");
                }
                node
            };
            tracing::info!(pid, program, locked, "process registered");
            // However this connection ends (a process that died before the answer reached it
            // included), the node forgets the process.
            let _forget = Forget(shared.clone(), move |st: &mut State| {
                st.procs.remove(&pid);
                tracing::info!(pid, "process ended");
            });
            reply(&mut write, &Reply::Registered { node: name }).await?;
            let mut stops = crate::stops::StopWatch::new();
            let mut look = tokio::time::interval(crate::stops::LOOK_EVERY);
            look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = look.tick() => stops.look(&shared, pid),
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => {
                            let mut st = shared.lock().expect("state lock");
                            let st = &mut *st;
                            let Some(p) = st.procs.get_mut(&pid) else { continue };
                            match serde_json::from_str::<Update>(&l) {
                                Ok(Update::Memory { bytes }) => p.info.mem_bytes = bytes,
                                Ok(Update::Pinned { reason }) => p.info.pinned = reason,
                                Ok(Update::Program { program }) => {
                                    p.info.program = program;
                                    p.execs += 1;
                                }
                                Ok(Update::Remote { cpu_s, mem_bytes }) => {
                                    p.remote_cpu_s = cpu_s;
                                    p.info.mem_bytes = mem_bytes;
                                }
                                Ok(Update::Moved { node, id }) => {
                                    tracing::info!(pid, node, "process migrated");
                                    p.info.node = node.clone();
                                    p.info.migrations += 1;
                                    p.info.last_error = None;
                                    let why = if id.is_none() || id == p.moving {
                                        p.info.state = "running".into();
                                        p.moving = None;
                                        p.moving_for.take()
                                    } else {
                                        None
                                    }
                                    .unwrap_or_else(|| "manual".into());
                                    metrics::counter!("mosvm_migrations_total", "reason" => why.clone(), "outcome" => "done").increment(1);
                                    p.info.moved_by = Some(why);
                                    if let Some(id) = id {
                                        answer(p, id, Ok(node));
                                    }
                                }
                                Ok(Update::MigrationFailed { reason, id })
                                    if id.is_some() && id != p.moving =>
                                {
                                    // A request refused while another move is under way:
                                    // its outcome alone.
                                    tracing::info!(pid, reason, "move request refused");
                                    let why = format!("{reason}; it runs on {}", p.info.node);
                                    answer(p, id.unwrap_or_default(), Err(why));
                                }
                                Ok(Update::MigrationFailed { reason, id }) => {
                                    tracing::warn!(pid, reason, "migration failed");
                                    p.moving = None;
                                    if let Some(id) = id {
                                        let why = format!("{reason}; it still runs on {}", p.info.node);
                                        answer(p, id, Err(why));
                                    }
                                    p.info.state = "running".into();
                                    p.info.last_error = Some(reason);
                                    let why = p.moving_for.take().unwrap_or_else(|| "manual".into());
                                    // A move its host's balancer asked for: tell the host.
                                    if why != "manual" && p.info.node != st.name {
                                        if let Some(tx) = &st.balancer {
                                            let home = crate::gossip::node_id(&st.name);
                                            let _ = tx.send(crate::balance::Event::Send {
                                                to: crate::gossip::node_id(&p.info.node),
                                                body: crate::gossip::Body::MoveFailed {
                                                    pid: crate::gossip::cluster_pid(home, pid),
                                                    error: p.info.last_error.clone().unwrap_or_default(),
                                                },
                                            });
                                        }
                                    }
                                    metrics::counter!("mosvm_migrations_total", "reason" => why, "outcome" => "failed").increment(1);
                                    p.failures += 1;
                                }
                                Ok(Update::Calls { home, local }) => p.calls = (home, local),
                                Err(_) => {}
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
            Ok(())
        }
        Request::Ps => {
            let procs = {
                let st = shared.lock().expect("state lock");
                let mut v: Vec<(u32, ProcInfo)> = st
                    .procs
                    .values()
                    .map(|p| {
                        let mut info = p.info.clone();
                        // Here, cpu_s carries what the process used elsewhere until the
                        // local figure is added below.
                        info.cpu_s = p.remote_cpu_s;
                        (p.info.pid, info)
                    })
                    .collect();
                v.sort_by_key(|(pid, _)| *pid);
                let mut hosted: Vec<(u32, ProcInfo)> = st
                    .hosted
                    .iter()
                    .map(|(host_pid, h)| {
                        let info = ProcInfo {
                            pid: h.pid,
                            program: h.program.clone(),
                            node: st.name.clone(),
                            state: if crate::stops::is_stopped(*host_pid) {
                                format!("guest of {}, stopped", h.home)
                            } else {
                                format!("guest of {}", h.home)
                            },
                            cpu_s: 0.0,
                            mem_bytes: rss_bytes(*host_pid),
                            migrations: 0,
                            locked: false,
                            last_error: None,
                            pinned: None,
                            moved_by: None,
                        };
                        (*host_pid, info)
                    })
                    .collect();
                hosted.sort_by_key(|(_, p)| p.pid);
                v.extend(hosted);
                v
            };
            // CPU time of the process doing the work: `mosvm run` at home (plus what its guest
            // used on other nodes), the guest host here.
            let procs = procs.into_iter().map(|(worker, mut p)| {
                p.cpu_s += cpu_seconds(worker);
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
        Request::Migrate {
            pid,
            to,
            wait,
            mode,
        } => {
            let waiting = {
                let mut st = shared.lock().expect("state lock");
                match crate::admin::order_move_as(&mut st, pid, &to, "manual", mode) {
                    Ok(id) if wait => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        if let Some(p) = st.procs.get_mut(&pid) {
                            p.waiters.push((id, tx));
                        }
                        Ok(Some(rx))
                    }
                    Ok(_) => Ok(None),
                    Err(message) => Err(message),
                }
            };
            let r = match waiting {
                Err(message) => Reply::Error { message },
                Ok(None) => Reply::Ok,
                // This request's own outcome; the process's end drops the sender.
                Ok(Some(rx)) => match rx.await {
                    Ok(Ok(node)) => Reply::Moved { node },
                    Ok(Err(why)) => Reply::Error {
                        message: format!("moving process {pid} to {to} failed: {why}"),
                    },
                    Err(_) => Reply::Error {
                        message: format!("process {pid} ended before the move was done"),
                    },
                },
            };
            reply(&mut write, &r).await
        }
        Request::Link { pid, to } => {
            let r = match crate::peers::link(&shared, pid, &to).await {
                Ok(r) => r,
                Err(e) => Reply::Error {
                    message: format!("{e:#}"),
                },
            };
            reply(&mut write, &r).await
        }
        Request::Nodes => {
            let nodes = crate::admin::nodes_view(&shared.lock().expect("state lock"));
            reply(&mut write, &Reply::Nodes { nodes }).await
        }
        Request::Ctl { verb, value } => {
            let r = crate::admin::ctl(&shared, &verb, value).await;
            reply(&mut write, &r).await
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

/// Relative CPU speeds a node may be given (`--speed`, `mosvm ctl speed`).
pub(crate) const SPEEDS: std::ops::RangeInclusive<f64> = 0.01..=1000.0;

/// A node name: 1 to 64 letters, digits, `.`, `_` and `-` (it names the node's cgroup and
/// state directory, and is how peers and `mosvm migrate` call it).
fn check_name(name: &str) -> Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
        "--name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
    );
    Ok(())
}

/// Run the node service until SIGINT or SIGTERM.
/// Default `--pool`: touched memory kept for arriving guests, bytes.
const DEFAULT_POOL: u64 = 256 << 20;

pub fn run(cfg: Config) -> Result<()> {
    let name = cfg.name.clone().unwrap_or_else(host_name);
    check_name(&name)?;
    // (A node on a host without KVM goes on without it.)
    let _keeper = vmm::cpu::keeper().ok();
    let socket = crate::control::socket_path(cfg.socket.as_deref());
    let state_dir = cfg
        .state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mosvm-{name}")));
    let mut guard = StartGuard {
        made: Vec::new(),
        up: false,
    };
    if !state_dir.exists() {
        guard.made.push(state_dir.clone());
    }
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let name_of = cfg.policy.as_deref().unwrap_or("mosix");
    let Some(policy) = balancer::PolicyKind::from_flag_name(name_of) else {
        anyhow::bail!("--policy {name_of}: use mosix, opportunity-cost or off");
    };
    let step = cfg.step.unwrap_or(1.0);
    anyhow::ensure!(
        step.is_finite() && (0.05..=3600.0).contains(&step),
        "--step {step}: use seconds between 0.05 and 3600"
    );
    if let Some(c) = cfg.cpus {
        anyhow::ensure!(
            c.is_finite() && c > 0.0,
            "--cpus {c}: must be a positive number"
        );
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        anyhow::ensure!(
            c <= online as f64,
            "--cpus {c}: this machine has {online} CPUs"
        );
    }
    if let Some(v) = cfg.usher_free {
        anyhow::ensure!(
            (0.0..1.0).contains(&v),
            "--usher-free {v}: use a fraction of memory between 0 and 1"
        );
    }
    if let Some(v) = cfg.speed {
        anyhow::ensure!(
            v.is_finite() && SPEEDS.contains(&v),
            "--speed {v}: use a relative speed between 0.01 and 1000"
        );
    }
    let memory = match &cfg.memory {
        Some(m) => {
            let b = vmm::vm::parse_size(m).map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
            anyhow::ensure!(
                b >= 64 << 20,
                "--memory {m}: too small for the node and its processes (at least 64M)"
            );
            Some(b)
        }
        None => None,
    };
    // The node's scope: its own cgroup when asked for one, else the one it was started in.
    let cgroup = if cfg.cpus.is_some() || memory.is_some() {
        crate::capacity::Cgroup::create(&name, cfg.cpus, memory)
            .context("giving the node its own cgroup (--cpus/--memory need root and cgroups)")?
    } else {
        crate::capacity::Cgroup::current()
    };
    // Touched memory for arrivals: bounded by the node's memory, cgroup or host.
    let node_mem = cgroup.memory().0;
    let pool = match &cfg.pool {
        Some(p) => {
            let b = vmm::vm::parse_size(p).map_err(|e| anyhow::anyhow!("--pool: {e}"))?;
            anyhow::ensure!(
                b <= node_mem / 2,
                "--pool {p}: more than half of the node's memory ({} MiB)",
                node_mem >> 20
            );
            b
        }
        None => DEFAULT_POOL.min(node_mem / 16),
    };
    crate::hosting::own_exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind_socket(&socket)?;
        guard.made.push(socket.clone());
        if let Some(addr) = cfg.metrics {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .with_context(|| format!("serving metrics on {addr}"))?;
        }
        let peers = cfg.peers.iter().map(|p| parse_peer(p)).collect::<Result<Vec<_>>>()?;
        let tls = match &cfg.key_dir {
            Some(d) => Some(
                migrate::ClusterTls::load(d)
                    .with_context(|| format!("loading the cluster key from {}", d.display()))?,
            ),
            None => None,
        };
        let peer_listener = match (cfg.listen, &tls) {
            (Some(addr), Some(_)) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?,
            ),
            (Some(addr), None) => anyhow::bail!(
                "--listen {addr} needs the cluster key: give --key-dir (see mosvm keygen)"
            ),
            _ => None,
        };
        let shared: Shared = Arc::new(Mutex::new(State {
            name: name.clone(),
            listen: cfg.listen,
            peers,
            procs: HashMap::new(),
            moves_ordered: 0,
            tls,
            socket: socket.clone(),
            hosted: HashMap::new(),
            key_dir: cfg.key_dir.clone(),
            directory: HashMap::new(),
            admin: Default::default(),
            view: Default::default(),
            cgroup: cgroup.clone(),
            balancer: None,
            pool,
            spare: None,
        }));
        // Gossip, membership and automatic migration: over UDP on the listen address, with
        // a MAC key derived from the cluster key.
        if let (Some(addr), Some(dir)) = (cfg.listen, &cfg.key_dir) {
            let key_file = dir.join(migrate::tls::KEY_FILE);
            let key = std::fs::read(&key_file)
                .with_context(|| format!("reading {}", key_file.display()))?;
            let key = crate::gossip::derive_key(&key);
            let udp = Arc::new(
                tokio::net::UdpSocket::bind(addr)
                    .await
                    .with_context(|| format!("listening for datagrams on {addr}"))?,
            );
            let (dtx, drx) = mpsc::unbounded_channel();
            let (etx, erx) = mpsc::unbounded_channel();
            shared.lock().expect("state lock").balancer = Some(etx.clone());
            tokio::spawn(crate::datagrams::receive(udp.clone(), key, shared.clone(), dtx));
            let settings = crate::balance::Settings {
                me: crate::gossip::Contact {
                    id: crate::gossip::node_id(&name),
                    name: name.clone(),
                    addr,
                },
                step: std::time::Duration::from_secs_f64(step),
                policy,
                speed: cfg.speed,
                cgroup,
                key,
                seeds: shared.lock().expect("state lock").peers.clone(),
                trace: cfg.balancer_trace.clone(),
                usher_free: cfg.usher_free,
            };
            tokio::spawn(crate::balance::run(shared.clone(), udp, settings, etx, erx, drx));
        }
        let peer_listener_up = peer_listener.is_some();
        if let Some(pl) = peer_listener {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    match pl.accept().await {
                        Ok((tcp, _)) => {
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                if let Err(e) = crate::peers::serve_peer(tcp, shared).await {
                                    tracing::warn!("peer: {e:#}");
                                }
                            });
                        }
                        Err(e) => tracing::warn!("accept: {e}"),
                    }
                }
            });
        }

        if peer_listener_up {
            crate::hosting::ensure_spare(&shared);
        }
        guard.came_up();
        tracing::info!(node = name, socket = %socket.display(), state_dir = %state_dir.display(), "mosvm node up");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (stopped_tx, mut stopped) = mpsc::unbounded_channel::<()>();
        let mut stopping = false;
        loop {
            let signalled = tokio::select! {
                conn = listener.accept() => {
                    let (stream, _) = conn?;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(stream, shared).await {
                            tracing::warn!("control client: {e:#}");
                        }
                    });
                    false
                }
                _ = tokio::signal::ctrl_c() => true,
                _ = term.recv() => true,
                _ = stopped.recv() => break,
            };
            if signalled && stopping {
                tracing::warn!("stopping now: guests still here are lost");
                break;
            }
            if signalled {
                // Send the guests away (the control socket keeps serving their moves), then stop.
                stopping = true;
                let (shared, tx) = (shared.clone(), stopped_tx.clone());
                tokio::spawn(async move {
                    crate::admin::shut_down(&shared).await;
                    let _ = tx.send(());
                });
            }
        }
        let _ = std::fs::remove_file(&socket);
        let cgroup = shared.lock().expect("state lock").cgroup.clone();
        for e in cgroup.remove_created() {
            tracing::info!("cgroup left behind: {e}");
        }
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
            "name = \"a\"\nlisten = \"10.0.0.1:7420\"\npeers = [\"b=10.0.0.2:7420\"]\nsocket = \"/tmp/a.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("a"));
        assert_eq!(c.peers.len(), 1);
        assert!(toml::from_str::<Config>("nmae = \"typo\"").is_err());
        // The packaged example uses the flags' names for every key.
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/node.toml");
        let p = Config::load(&shipped).unwrap();
        assert_eq!(p.key_dir.as_deref(), Some(Path::new("/etc/mosvm")));
        assert_eq!((p.peers.len(), p.usher_free), (1, Some(0.05)));
        let (n, a) = parse_peer(&c.peers[0]).unwrap();
        assert_eq!((n.as_deref(), a.port()), (Some("b"), 7420));
        assert!(parse_peer("b=nowhere").is_err());
    }

    #[test]
    fn cpu_time_of_this_process_is_readable() {
        // Burn ~200 ms of CPU; /proc accounts it in clock ticks.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(cpu_seconds(std::process::id()) > 0.05);
        assert_eq!(cpu_seconds(u32::MAX), 0.0);
    }
}
