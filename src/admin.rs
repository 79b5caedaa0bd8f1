//! Administering a node (`mosvm ctl`, after openMosix's mosctl) and what the balancer sees of
//! the processes running on it.
//!
//! Verbs: `stay`/`nostay` (processes running here do not / may leave automatically),
//! `lstay`/`nolstay` (the same for processes whose home is here only), `block`/`noblock`
//! (refuse / accept arriving guests; a node's own processes always come home), `expel` (send
//! every guest away and wait), `bring` (bring this node's processes home and wait), `speed N`
//! (set the relative CPU speed), `status`. Stopping the node (SIGTERM) blocks and expels first.

use crate::balance::Event;
use crate::control::Reply;
use crate::gossip::{self, Body};
use crate::node::{Shared, State};
use balancer::{LoadEntry, NodeId, Pid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long `expel` and `bring` wait for the processes to leave or arrive.
pub const WAIT: Duration = Duration::from_secs(60);
/// How long a stopping node waits for its guests to leave.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

/// `mosvm ctl status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Node name.
    pub name: String,
    /// Automatic policy, as `--policy` names it (mosix, opportunity-cost, off).
    pub policy: String,
    /// What bounds the node's capacity: its cgroup, or the machine.
    pub scope: String,
    /// Administrator's settings.
    pub admin: Admin,
    /// What the node advertises: load, CPU capacity, speed, memory.
    pub own: Option<LoadEntry>,
    /// Runnable threads in the last step.
    pub runnable: f64,
    /// Processes whose home is here: running here, and away.
    pub home_here: usize,
    /// Processes whose home is here running elsewhere.
    pub home_away: usize,
    /// Guests hosted for other nodes.
    pub guests: usize,
    /// Other nodes SWIM lists alive.
    pub nodes_up: usize,
    /// Datagram and migration counters.
    pub counters: Counters,
}

/// A process running on this node, as the balancer is told of it.
pub struct Present {
    /// Cluster-wide id.
    pub pid: Pid,
    /// Its home node.
    pub home: NodeId,
    /// Its home is this node.
    pub own: bool,
    /// Memory in use, MiB.
    pub mem_mb: u32,
    /// Time since it started here or registered.
    pub age: Duration,
    /// CPU seconds of its worker here.
    pub cpu_s: f64,
    /// System calls so far: sent home, served locally.
    pub calls: (u64, u64),
    /// Locked, or must stay at home.
    pub locked: bool,
    /// Moves of it that failed so far.
    pub failures: u32,
    /// Programs it exec'd so far (its statistics start over with each, paper §4.3).
    pub execs: u32,
    /// It came here by migration (a guest, or one of ours back home).
    pub migrated_in: bool,
}

/// The processes running on this node now.
pub fn running_here(st: &State, me: NodeId) -> Vec<Present> {
    let mut v = Vec::new();
    for p in st.procs.values() {
        if p.info.node != st.name {
            continue;
        }
        v.push(Present {
            pid: gossip::cluster_pid(me, p.info.pid),
            home: me,
            own: true,
            mem_mb: (p.info.mem_bytes >> 20).min(u64::from(u32::MAX)) as u32,
            age: p.since.elapsed(),
            cpu_s: crate::node::cpu_seconds(p.info.pid),
            calls: p.calls,
            locked: p.info.locked || p.info.pinned.is_some(),
            failures: p.failures,
            execs: p.execs,
            migrated_in: p.info.migrations > 0,
        });
    }
    for (host_pid, h) in &st.hosted {
        v.push(Present {
            pid: gossip::cluster_pid(gossip::node_id(&h.home), h.pid),
            home: gossip::node_id(&h.home),
            own: false,
            mem_mb: (crate::node::rss_bytes(*host_pid) >> 20) as u32,
            age: h.since.elapsed(),
            cpu_s: crate::node::cpu_seconds(*host_pid),
            calls: h.calls,
            locked: false,
            failures: 0,
            execs: 0,
            migrated_in: true,
        });
    }
    v
}

/// The program a process runs, for log lines.
pub fn program_of(st: &State, own: bool, pid: u32) -> String {
    if own {
        st.procs.get(&pid).map(|p| p.info.program.clone())
    } else {
        st.hosted
            .values()
            .find(|h| h.pid == pid)
            .map(|h| h.program.clone())
    }
    .unwrap_or_default()
}

fn status(st: &State) -> Status {
    Status {
        name: st.name.clone(),
        policy: st.view.policy.clone(),
        scope: st.view.scope.clone(),
        admin: st.admin.clone(),
        own: st.view.own,
        runnable: st.view.runnable,
        home_here: st.procs.values().filter(|p| p.info.node == st.name).count(),
        home_away: st.procs.values().filter(|p| p.info.node != st.name).count(),
        guests: st.hosted.len(),
        nodes_up: st.view.known.values().filter(|k| k.up).count(),
        counters: st.view.counters.clone(),
    }
}

/// Carry out `mosvm ctl VERB [VALUE]`.
pub async fn ctl(shared: &Shared, verb: &str, value: Option<f64>) -> Reply {
    let set = |f: &dyn Fn(&mut Admin)| {
        let mut st = shared.lock().expect("state lock");
        f(&mut st.admin);
        tracing::info!(verb, "node setting changed");
        Reply::Ok
    };
    const VERBS: [&str; 10] = [
        "stay", "nostay", "lstay", "nolstay", "block", "noblock", "expel", "bring", "speed",
        "status",
    ];
    if value.is_some() && verb != "speed" && VERBS.contains(&verb) {
        return Reply::Error {
            message: format!("'{verb}' takes no value"),
        };
    }
    match verb {
        "stay" => set(&|a| a.stay = true),
        "nostay" => set(&|a| a.stay = false),
        "lstay" => set(&|a| a.lstay = true),
        "nolstay" => set(&|a| a.lstay = false),
        "block" => set(&|a| a.block = true),
        "noblock" => set(&|a| a.block = false),
        "status" => Reply::Status {
            status: Box::new(status(&shared.lock().expect("state lock"))),
        },
        "speed" => match value {
            Some(v) if v.is_finite() && crate::node::SPEEDS.contains(&v) => {
                let tx = shared.lock().expect("state lock").balancer.clone();
                match tx {
                    Some(tx) if tx.send(Event::Speed(v)).is_ok() => Reply::Ok,
                    _ => Reply::Error {
                        message: "this node runs no balancer (it needs --listen and --key-dir)"
                            .into(),
                    },
                }
            }
            _ => Reply::Error {
                message: "speed needs a number from 0.01 to 1000 (1.0 = the reference CPU)"
                    .into(),
            },
        },
        "expel" => match expel(shared, WAIT).await {
            Ok(n) => {
                tracing::info!(guests = n, "expelled every guest");
                Reply::Ok
            }
            Err(message) => Reply::Error { message },
        },
        "bring" => match bring(shared, WAIT).await {
            Ok(()) => Reply::Ok,
            Err(message) => Reply::Error { message },
        },
        other => Reply::Error {
            message: format!(
                "unknown verb '{other}' (stay, nostay, lstay, nolstay, block, noblock, expel, bring, speed N, status)"
            ),
        },
    }
}

/// Where to send a guest of home `home` away from here: the least loaded node that has the
/// memory, else its home.
/// `sent` counts the guests already sent to each node in this round, so that they spread.
fn expel_target(
    st: &State,
    home: &str,
    mem_mb: u32,
    tries: u32,
    sent: &std::collections::HashMap<String, u32>,
) -> String {
    if tries > 0 {
        return home.to_string();
    }
    let load = |k: &Known, e: &LoadEntry| {
        let extra = f64::from(sent.get(&k.name).copied().unwrap_or(0)) / e.capacity();
        f64::from(e.load) + extra
    };
    st.view
        .known
        .values()
        .filter(|k| k.up)
        .filter_map(|k| k.entry.map(|e| (k, e)))
        .filter(|(_, e)| e.free_mem_mb > mem_mb)
        .min_by(|a, b| load(a.0, &a.1).total_cmp(&load(b.0, &b.1)))
        .map_or_else(|| home.to_string(), |(k, _)| k.name.clone())
}

/// Send every guest hosted here to another node (or home) through its home node, and wait
/// until none is left or `limit` passes. Returns how many left.
pub async fn expel(shared: &Shared, limit: Duration) -> Result<usize, String> {
    let start = Instant::now();
    let mut asked: std::collections::HashMap<u32, (Instant, u32)> = Default::default();
    let mut sent: std::collections::HashMap<String, u32> = Default::default();
    loop {
        let (guests, tx) = {
            let st = shared.lock().expect("state lock");
            let g: Vec<(u32, u32, String, u32)> = st
                .hosted
                .iter()
                .map(|(hp, h)| {
                    let mem = (crate::node::rss_bytes(*hp) >> 20) as u32;
                    (*hp, h.pid, h.home.clone(), mem)
                })
                .collect();
            (g, st.balancer.clone())
        };
        if guests.is_empty() {
            return Ok(asked.len());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{} guest(s) still here after {} s",
                guests.len(),
                limit.as_secs()
            ));
        }
        let Some(tx) = tx else {
            return Err("this node runs no balancer to reach the guests' home nodes".into());
        };
        for (hp, pid, home, mem) in guests {
            let e = asked
                .entry(hp)
                .or_insert((start - Duration::from_secs(60), 0));
            if e.0.elapsed() < Duration::from_secs(5) {
                continue;
            }
            let to = expel_target(&shared.lock().expect("state lock"), &home, mem, e.1, &sent);
            *sent.entry(to.clone()).or_default() += 1;
            *e = (Instant::now(), e.1 + 1);
            tracing::info!(pid, home, to, "expelling a guest");
            let body = Body::Move {
                pid: gossip::cluster_pid(gossip::node_id(&home), pid),
                to,
                reason: "expel".into(),
            };
            let _ = tx.send(Event::Send {
                to: gossip::node_id(&home),
                body,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Bring every process whose home is here back home, and wait until they are or `limit`
/// passes.
pub async fn bring(shared: &Shared, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    {
        let mut st = shared.lock().expect("state lock");
        let away: Vec<u32> = st
            .procs
            .values()
            .filter(|p| p.info.node != st.name)
            .map(|p| p.info.pid)
            .collect();
        for pid in away {
            if let Err(e) = order_move(&mut st, pid, "home", "bring") {
                tracing::info!(pid, "not brought home: {e}");
            }
        }
    }
    loop {
        let away = {
            let st = shared.lock().expect("state lock");
            st.procs.values().filter(|p| p.info.node != st.name).count()
        };
        if away == 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{away} process(es) still away after {} s",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Before the node stops: refuse new guests, send the ones here away (at most
/// [`STOP_WAIT`]), and leave the cluster.
pub async fn shut_down(shared: &Shared) {
    let tx = {
        let mut st = shared.lock().expect("state lock");
        st.admin.block = true;
        st.balancer.clone()
    };
    tracing::info!("stopping: sending the guests away");
    match expel(shared, STOP_WAIT).await {
        Ok(n) => tracing::info!(guests = n, "every guest left"),
        Err(e) => tracing::warn!("stopping anyway: {e}"),
    }
    if let Some(tx) = tx {
        let (done, wait) = tokio::sync::oneshot::channel();
        if tx.send(Event::Leave(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
    }
}

/// What an administrator set on this node (`mosvm ctl`, openMosix's mosctl).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Admin {
    /// No process running here leaves automatically (`stay`).
    pub stay: bool,
    /// No process whose home is here leaves automatically; guests may move on (`lstay`).
    pub lstay: bool,
    /// No guest arrives, automatically or by hand; a node's own processes still come home
    /// (`block`).
    pub block: bool,
}

/// Counters kept for `mosvm ctl status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Datagrams sent, by kind.
    pub sent: BTreeMap<String, u64>,
    /// Datagrams accepted, by kind.
    pub received: BTreeMap<String, u64>,
    /// Datagrams dropped, by reason (bad_mac, replay, stale, malformed, no_address).
    pub rejected: BTreeMap<String, u64>,
    /// Moves ordered by this node's balancer: "reason outcome" -> count.
    pub migrations: BTreeMap<String, u64>,
}

/// One node as this node knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Known {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: String,
    /// What it last said of itself (CPU capacity, speed, load, memory), if anything.
    pub entry: Option<LoadEntry>,
    /// SWIM lists it as alive.
    pub up: bool,
}

/// What the balancer shell last published for the node's clients.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// This node's own entry (load, capacity, speed, free memory).
    pub own: Option<LoadEntry>,
    /// Runnable threads measured in the last step (mean of the samples).
    pub runnable: f64,
    /// The other nodes, by id.
    pub known: BTreeMap<NodeId, Known>,
    /// Policy name.
    pub policy: String,
    /// How the node's capacity is bounded ("cgroup v1 ..." or "machine").
    pub scope: String,
    /// Counters.
    pub counters: Counters,
}

/// The nodes as this node knows them: itself first, then the others by name, with what
/// each last gossiped about itself.
pub(crate) fn nodes_view(st: &State) -> Vec<crate::control::NodeInfo> {
    let info = |name: &str, addr: String, e: Option<&balancer::LoadEntry>, up: bool| {
        crate::control::NodeInfo {
            name: name.to_string(),
            addr,
            cpus: e.map_or(0.0, |e| f64::from(e.cpus)),
            speed: e.map_or(0.0, |e| f64::from(e.speed)),
            load: e.map_or(0.0, |e| f64::from(e.load)),
            free_mem: e.map_or(0, |e| u64::from(e.free_mem_mb) << 20),
            total_mem: e.map_or(0, |e| u64::from(e.total_mem_mb) << 20),
            age_s: e.map(|e| f64::from(e.age_ms) / 1000.0),
            up,
        }
    };
    let addr = st.listen.map(|a| a.to_string()).unwrap_or_default();
    // Without a balancer (no --listen/--key-dir) the node still knows what it has.
    let (total, used) = st.cgroup.memory();
    let used = used.saturating_sub(crate::hosting::pool_held());
    let alone = LoadEntry {
        node: 0,
        load: 0.0,
        cpus: st.cgroup.cpus() as f32,
        speed: 1.0,
        free_mem_mb: (total.saturating_sub(used) >> 20) as u32,
        total_mem_mb: (total >> 20) as u32,
        age_ms: 0,
    };
    let own = st.view.own.unwrap_or(alone);
    let mut v = vec![info(&st.name, addr, Some(&own), true)];
    let mut others: Vec<crate::control::NodeInfo> = st
        .view
        .known
        .values()
        .map(|k| info(&k.name, k.addr.clone(), k.entry.as_ref(), k.up))
        .collect();
    // Configured peers not heard from yet.
    for (n, a) in &st.peers {
        if Some(*a) == st.listen {
            continue;
        }
        let a = a.to_string();
        if !others.iter().any(|o| o.addr == a) {
            others.push(info(n.as_deref().unwrap_or_default(), a, None, false));
        }
    }
    others.sort_by(|x, y| x.name.cmp(&y.name).then(x.addr.cmp(&y.addr)));
    v.extend(others);
    v
}

/// Order process `pid` (whose home is this node) to move to node `to` (a name or address,
/// `home` or this node's name to come home), for reason `why` (manual, load, memory, expel,
/// bring). Refused with a one-line reason when the process is unknown, already there, locked,
/// must stay home (a shared mapping, paper §4.2) or already moving.
pub(crate) fn order_move(st: &mut State, pid: u32, to: &str, why: &str) -> Result<u64, String> {
    order_move_as(st, pid, to, why, crate::control::MoveMode::Auto)
}

/// [`order_move`], switching over as `mode` says.
pub(crate) fn order_move_as(
    st: &mut State,
    pid: u32,
    to: &str,
    why: &str,
    mode: crate::control::MoveMode,
) -> Result<u64, String> {
    let node = st.name.clone();
    // A node given by address is the node known at that address, by its name: so `ps` names
    // it, the name check holds, and "already runs there" is seen.
    let named = crate::node::name_at(st, to);
    let to = named.as_deref().unwrap_or(to);
    let resolved = if to == "home" || to == node {
        Ok(st.listen.unwrap_or(([0, 0, 0, 0], 0).into()))
    } else {
        crate::node::resolve(st, to)
    };
    let has_tls = st.tls.is_some();
    let Some(p) = st.procs.get_mut(&pid) else {
        return Err(format!("no process with home pid {pid} on node {node}"));
    };
    resolved?;
    if !has_tls {
        return Err(format!(
            "node {node} has no cluster key (start it with --key-dir)"
        ));
    }
    if p.info.node == to || ((to == "home" || to == node) && p.info.node == node) {
        return Err(format!("process {pid} already runs on {}", p.info.node));
    }
    if p.info.locked {
        return Err(format!("process {pid} is locked to node {}", p.info.node));
    }
    if let Some(why) = &p.info.pinned {
        return Err(format!("process {pid} stays at home: {why}"));
    }
    if p.info.state == "migrating" {
        return Err(format!(
            "process {pid} is already moving (one move at a time); it runs on {}",
            p.info.node
        ));
    }
    if crate::stops::is_stopped(pid) {
        // Its home side cannot take part in a move until it is continued.
        return Err(format!(
            "process {pid} is stopped (continue it with SIGCONT first); it stays on {}",
            p.info.node
        ));
    }
    st.moves_ordered += 1;
    let id = st.moves_ordered;
    let Some(p) = st.procs.get_mut(&pid) else {
        return Err(format!("no process with home pid {pid} on node {node}"));
    };
    p.info.state = "migrating".into();
    p.moving_for = Some(why.to_string());
    p.moving = Some(id);
    let to = if to == node {
        "home".to_string()
    } else {
        to.to_string()
    };
    let _ = p
        .commands
        .send(crate::control::Command::Migrate { to, id, mode });
    Ok(id)
}
