//! Node services for the multi-node tests and the cluster benchmark, and the client commands
//! that drive them.
//!
//! - [`keygen`] makes a cluster key; [`NodeSpec`] starts one `mosvm node` (on loopback, or
//!   inside a network namespace through `ip netns exec`), with its control socket, state
//!   directory and log under one test directory.
//! - [`loopback_cluster`] starts nodes on 127.0.0.1, each a peer of every other;
//!   [`Hosts::start_cluster`] starts one node per host of a [`Hosts`] topology.
//! - [`Hosts`]: network namespaces joined by a bridge, each a host with its own address, so
//!   nodes talk over a real (virtual) link. Needs root and iproute2; `MOSVM_SKIP_NETNS=1`
//!   skips the tests that use it, and nothing else does.
//! - [`ps`], [`proc_info`], [`migrate`], [`client`] run the client commands against a node's
//!   socket; [`wait_for`], [`wait_registered`] and [`tour`] wait on what they show.

use super::mosvm_bin;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a node may take to create its control socket.
const NODE_START: Duration = Duration::from_secs(10);

/// How long one hop of a [`tour`] may take: generous, the machine is small and shared.
const HOP_LIMIT: Duration = Duration::from_secs(90);

/// The port every node of a [`Hosts`] topology listens on (each host has its own address).
const HOSTS_PORT: u16 = 7420;

/// Makes a cluster key in `dir/key` and returns that directory.
pub fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    let out = Command::new(mosvm_bin())
        .args(["keygen", "--dir"])
        .arg(&key)
        .output()
        .expect("run mosvm keygen");
    assert!(
        out.status.success(),
        "mosvm keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    key
}

/// A TCP port free on 127.0.0.1 (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// One `mosvm node` to start: its name, and where its socket (`DIR/NAME.sock`), state
/// (`DIR/NAME.state`) and log (`DIR/NAME.log`, the node's stderr) go.
#[derive(Clone)]
pub struct NodeSpec {
    name: String,
    dir: PathBuf,
    listen: Option<String>,
    peers: Vec<String>,
    key_dir: Option<PathBuf>,
    netns: Option<String>,
    policy: String,
    extra: Vec<String>,
}

impl NodeSpec {
    pub fn new(dir: &Path, name: &str) -> Self {
        NodeSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            listen: None,
            peers: Vec::new(),
            key_dir: None,
            netns: None,
            // Manual moves only unless a test asks for automatic ones: a move the balancer
            // makes by itself would race the moves a test makes by hand.
            policy: "off".into(),
            extra: Vec::new(),
        }
    }

    /// `--policy P` (the default here is `off`).
    pub fn policy(mut self, p: &str) -> Self {
        self.policy = p.to_string();
        self
    }

    /// Any further flag of `mosvm node`.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }

    /// Further flags of `mosvm node`.
    pub fn args(mut self, a: &[&str]) -> Self {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// The control socket the node will serve.
    pub fn sock(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.name))
    }

    /// `--listen ADDR:PORT`.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = Some(addr.to_string());
        self
    }

    /// `--peer NAME=ADDR:PORT`.
    pub fn peer(mut self, name: &str, addr: &str) -> Self {
        self.peers.push(format!("{name}={addr}"));
        self
    }

    /// `--key-dir DIR`.
    pub fn key_dir(mut self, dir: &Path) -> Self {
        self.key_dir = Some(dir.to_path_buf());
        self
    }

    /// Run the node inside network namespace `ns` (`ip netns exec NS mosvm node ...`).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Starts the node and waits until its control socket exists.
    pub fn start(self) -> Node {
        let spec = self.clone();
        let sock = self.sock();
        let log = self.dir.join(format!("{}.log", self.name));
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(mosvm_bin());
                c
            }
            None => Command::new(mosvm_bin()),
        };
        cmd.args(["node", "--name", &self.name, "--socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(self.dir.join(format!("{}.state", self.name)));
        if let Some(addr) = &self.listen {
            cmd.args(["--listen", addr]);
        }
        for p in &self.peers {
            cmd.args(["--peer", p]);
        }
        if let Some(k) = &self.key_dir {
            cmd.arg("--key-dir").arg(k);
        }
        // A small pool of touched memory for arrivals (the default is 256 MiB a node): the
        // guests of the tests arrive partly into it, partly beyond it.
        if !self.extra.iter().any(|a| a == "--pool") {
            cmd.args(["--pool", "32M"]);
        }
        cmd.args(["--policy", &self.policy]).args(&self.extra);
        let log_file =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start node {}: {e}", self.name));
        let mut node = Node {
            name: self.name,
            sock,
            log,
            child,
            spec,
        };
        let t = Instant::now();
        while !node.sock.exists() {
            if let Some(status) = node.child.try_wait().expect("wait for node") {
                panic!(
                    "node {} exited ({status}) before serving its socket:\n{}",
                    node.name,
                    node.log_text()
                );
            }
            assert!(
                t.elapsed() < crate::common::scaled(NODE_START),
                "node {} did not create {} within {NODE_START:?}:\n{}",
                node.name,
                node.sock.display(),
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }
}

/// A running `mosvm node`, killed when dropped.
pub struct Node {
    pub name: String,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub child: Child,
    spec: NodeSpec,
}

impl Node {
    /// Stops the node as an operator would (SIGTERM: it expels its guests first, waited for
    /// up to `limit`) and starts it again with the same settings (its log starts afresh).
    pub fn restart(&mut self, limit: Duration) {
        self.restart_after(Duration::ZERO, limit);
    }

    /// [`Node::restart`], the node staying down for `gap` before it starts again.
    pub fn restart_after(&mut self, gap: Duration, limit: Duration) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            assert!(
                t.elapsed() < limit,
                "node {} still up {limit:?} after SIGTERM:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(gap);
        let fresh = self.spec.clone().start();
        let old = std::mem::replace(self, fresh);
        drop(old); // already exited: its Drop does nothing more
    }

    /// Kills the node at once, as a machine failure would: its guests are not sent away.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the node has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    /// Stops the node as an operator would (SIGTERM: it removes the cgroups it made), and
    /// kills it if it is still up 3 s later.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one node per name, listening on `addrs[i]` (inside namespace `netns[i]` if given),
/// with key `keys[i]` and every other node as a peer.
fn start_mesh(
    dir: &Path,
    names: &[&str],
    keys: &[&Path],
    addrs: &[String],
    netns: &[Option<&str>],
    extra: &[&str],
) -> Vec<Node> {
    assert_eq!(names.len(), keys.len(), "one key directory per node");
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut spec = NodeSpec::new(dir, name).listen(&addrs[i]).key_dir(keys[i]);
            for (j, other) in names.iter().enumerate() {
                if j != i {
                    spec = spec.peer(other, &addrs[j]);
                }
            }
            if let Some(ns) = netns[i] {
                spec = spec.netns(ns);
            }
            spec.args(extra).start()
        })
        .collect()
}

/// Nodes `names` on 127.0.0.1, each on a free port with key `keys[i]` and every other node
/// as a peer; sockets, state and logs under `dir`.
pub fn loopback_cluster(dir: &Path, names: &[&str], keys: &[&Path]) -> Vec<Node> {
    loopback_cluster_with(dir, names, keys, &[])
}

/// [`loopback_cluster`] with `extra` arguments to every `mosvm node`.
#[allow(dead_code)]
pub fn loopback_cluster_with(
    dir: &Path,
    names: &[&str],
    keys: &[&Path],
    extra: &[&str],
) -> Vec<Node> {
    let addrs: Vec<String> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    start_mesh(dir, names, keys, &addrs, &vec![None; names.len()], extra)
}

/// Separate hosts on one machine: one network namespace each, with its own address on one
/// subnet, all joined by a bridge in a further namespace of their own (nothing is added to
/// the machine's own namespace). Names are unique per test process and topology, so tests
/// running in parallel do not clash; everything is deleted on drop.
pub struct Hosts {
    /// The hosts' namespaces.
    pub netns: Vec<String>,
    /// Each host's IPv4 address.
    pub addrs: Vec<String>,
    switch: String,
}

impl Hosts {
    /// `n` hosts, or `None` (after a note on stderr) when network namespaces are not usable
    /// here and `MOSVM_SKIP_NETNS=1`; panics when they are not usable otherwise.
    pub fn new(n: usize) -> Option<Hosts> {
        if !netns_usable() {
            assert!(
                std::env::var_os("MOSVM_SKIP_NETNS").is_some_and(|v| v == "1"),
                "ip netns is not usable here (needs root and iproute2); set \
                 MOSVM_SKIP_NETNS=1 to skip the network-namespace tests"
            );
            let _ = writeln!(
                std::io::stderr(),
                "note: MOSVM_SKIP_NETNS=1: skipping a network-namespace test"
            );
            return None;
        }
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "mosvm{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let hosts = Hosts {
            netns: (0..n).map(|i| format!("{prefix}-h{i}")).collect(),
            addrs: (0..n).map(|i| format!("10.213.0.{}", i + 1)).collect(),
            switch: format!("{prefix}-sw"),
        };
        let sw = hosts.switch.as_str();
        ip(&["netns", "add", sw]);
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", sw, "link", "set", "br0", "up"]);
        for (i, (ns, addr)) in hosts.netns.iter().zip(&hosts.addrs).enumerate() {
            let port = format!("p{i}");
            ip(&["netns", "add", ns]);
            // Created straight into the two namespaces: no name is ever taken in ours.
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                sw,
            ]);
            ip(&["-n", sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", sw, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(hosts)
    }

    /// One node per host, named `names[i]` in `netns[i]` and listening on `addrs[i]`, all
    /// with the key in `key` and each other as peers.
    pub fn start_cluster(&self, dir: &Path, names: &[&str], key: &Path) -> Vec<Node> {
        assert_eq!(names.len(), self.netns.len(), "one node per host");
        let addrs: Vec<String> = self
            .addrs
            .iter()
            .map(|a| format!("{a}:{HOSTS_PORT}"))
            .collect();
        let netns: Vec<Option<&str>> = self.netns.iter().map(|n| Some(n.as_str())).collect();
        start_mesh(dir, names, &vec![key; names.len()], &addrs, &netns, &[])
    }
}

impl Hosts {
    /// Take host `i` off the network without a word: its port on the bridge goes down, so
    /// its packets vanish (no reset, no close), as when a machine dies or is unplugged.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "down"]);
    }

    /// Put host `i` back on the network after [`Hosts::cut`].
    pub fn uncut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "up"]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it (and so their peers).
        for ns in self.netns.iter().chain([&self.switch]) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn netns_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mosvm ARGS --socket SOCK`.
pub fn client(sock: &Path, args: &[&str]) -> Output {
    Command::new(mosvm_bin())
        .args(args)
        .arg("--socket")
        .arg(sock)
        .output()
        .unwrap_or_else(|e| panic!("run mosvm {}: {e}", args.join(" ")))
}

/// `mosvm ps --json` at the node behind `sock`.
pub fn ps(sock: &Path) -> Vec<serde_json::Value> {
    let out = client(sock, &["ps", "--json"]);
    assert!(
        out.status.success(),
        "mosvm ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("mosvm ps --json output")
}

/// The `ps` entry of home pid `pid` at the node behind `sock`.
pub fn proc_info(sock: &Path, pid: u32) -> Option<serde_json::Value> {
    ps(sock).into_iter().find(|p| p["pid"] == pid)
}

/// `mosvm migrate PID TO` at the node behind `sock` (TO: a node's name, or `home`).
pub fn migrate(sock: &Path, pid: u32, to: &str) -> Output {
    client(sock, &["migrate", &pid.to_string(), to])
}

/// Polls `f` every 20 ms until it holds; fails the test after `limit`.
/// The limit is scaled by how loaded the machine is ([`crate::common::scaled`]).
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let limit = crate::common::scaled(limit);
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the node behind `sock` lists home pid `pid`.
pub fn wait_registered(sock: &Path, pid: u32) {
    wait_for(
        &format!("process {pid} to register"),
        Duration::from_secs(10),
        || proc_info(sock, pid).is_some(),
    );
}

/// Moves process `pid`, whose home is `home`, to each of `stops` in turn (a peer's name, or
/// `home`), waiting at every hop until `ps` at home shows it running there with one more
/// migration than before; `between(hop)` is called after each hop. Fails at once if the
/// process leaves `ps` (ends) before its last stop.
pub fn tour(home: &Node, pid: u32, stops: &[&str], between: &mut dyn FnMut(usize)) {
    let moves = |p: &serde_json::Value| p["migrations"].as_u64().expect("migrations in ps");
    let start = proc_info(&home.sock, pid)
        .map(|p| moves(&p))
        .unwrap_or_else(|| panic!("process {pid} is not in {}'s ps", home.name));
    for (hop, to) in stops.iter().enumerate() {
        let shown = if *to == "home" { &home.name } else { *to };
        let m = migrate(&home.sock, pid, to);
        assert!(
            m.status.success(),
            "hop {} of {stops:?}: mosvm migrate {pid} {to}: {}",
            hop + 1,
            String::from_utf8_lossy(&m.stderr)
        );
        let t = Instant::now();
        let mut last = serde_json::Value::Null;
        loop {
            let Some(p) = proc_info(&home.sock, pid) else {
                panic!(
                    "process {pid} ended before it reached {to} (hop {} of {stops:?}): it \
                     needs more work to outlast its moves; last ps entry: {last}",
                    hop + 1
                );
            };
            last = p.clone();
            if p["node"] == shown && moves(&p) == start + hop as u64 + 1 {
                break;
            }
            assert!(
                t.elapsed() < HOP_LIMIT,
                "process {pid} not shown on {shown} after its move there (hop {} of \
                 {stops:?}) within {HOP_LIMIT:?}; last ps entry: {p}",
                hop + 1
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        between(hop);
    }
}

/// Whether process `pid` holds a KVM VM (a spare guest host, waiting for a guest, holds none).
fn holds_vm(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:kvm-vm")
            })
        })
        .unwrap_or(false)
}

/// Nodes home and b on loopback with one key, in a fresh directory that lives as long as the
/// first half of the pair.
pub fn home_and_b() -> (tempfile::TempDir, Vec<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &key]);
    (dir, nodes)
}

/// Kill processes `pids` (guest hosts this test's nodes started) with SIGKILL, as a machine
/// failure would.
pub fn kill_all(pids: &[u32]) {
    for &p in pids {
        // SAFETY: kill(2) of a process this test's node started; it changes nothing here.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

/// Let `run`, whose guest's host was lost, end: within `limit`, with status 112 (the home
/// `mosvm run` saying why on stderr, which the caller checks).
pub fn ends_lost(run: super::Running, limit: Duration) -> super::Run {
    let t = Instant::now();
    let got = run.finish();
    assert!(
        t.elapsed() < limit,
        "home noticed only after {:?}",
        t.elapsed()
    );
    assert_eq!(got.shell_status(), 112, "{}", got.stderr_text());
    got
}

/// Guest-host processes spawned by the node with pid `node` that hold a guest (not the
/// node's spare).
pub fn guest_hosts_of(node: u32) -> Vec<u32> {
    children_running(node, "guest-host")
        .into_iter()
        .filter(|&p| holds_vm(p))
        .collect()
}

/// The node's spare guest hosts: spawned by the node with pid `node`, holding no guest yet.
#[allow(dead_code)]
pub fn spares_of(node: u32) -> Vec<u32> {
    children_running(node, "guest-host")
        .into_iter()
        .filter(|&p| !holds_vm(p))
        .collect()
}

/// Children of process `parent` whose command line holds `word`.
fn children_running(parent: u32, word: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if status.contains(&format!("PPid:\t{parent}\n"))
            && cmd.windows(word.len()).any(|w| w == word.as_bytes())
        {
            v.push(pid);
        }
    }
    v
}
