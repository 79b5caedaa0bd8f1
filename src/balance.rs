//! Automatic resource sharing in the node (paper §2): the node service drives the very
//! `balancer::Node` core the simulator drives. This is its thin async shell: it feeds the
//! core real inputs (authenticated datagrams from the other nodes, this node's measured load
//! and free memory, the processes running here and their statistics, the outcome of the moves
//! it ordered) with a monotonic clock and an OS-seeded random generator, and carries out the
//! core's actions (datagrams sent, processes moved through the existing migration path).
//!
//! Which processes run here: those whose home is this node and that are not away, and the
//! guests this node hosts. A move of a process whose home is here is ordered like
//! `mosvm migrate`; a hosted guest's move is asked of its home node ([`Body::Move`]), which
//! orders it, so that the home node stays the one place that knows where its processes are.

mod contacts;

use crate::admin::Known;
use crate::capacity::{Cgroup, Count};
use crate::gossip::{self, Body, Contact, Envelope, Sealer};
use crate::node::{Shared, State};
use balancer::trace::{Call, Header, Record};
use balancer::{Action, Input, LoadEntry, MigrationReason, NodeId, Pid, PolicyKind, Time};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// How long a hosted guest's move may take before the core is told it failed.
const MOVE_DEADLINE: Duration = Duration::from_secs(60);
/// How often configured peers that are not members are announced to again.
const REANNOUNCE: Duration = Duration::from_secs(2);
/// A node SWIM declared down this long ago is forgotten (`mosvm nodes` stops listing it),
/// unless it is a configured peer.
const FORGET: Duration = Duration::from_secs(60);
/// Load samples per step.
const SAMPLES_PER_STEP: u32 = 5;

/// A request from the node's clients to the balancer.
#[derive(Debug)]
pub enum Event {
    /// A SWIM timer fired.
    SwimTimer(balancer::membership::SwimTimer),
    /// Set the relative speed (`mosvm ctl speed`).
    Speed(f64),
    /// Leave the cluster (SWIM announces it) before the node stops.
    Leave(tokio::sync::oneshot::Sender<()>),
    /// Send a datagram to a node.
    Send {
        /// The node.
        to: NodeId,
        /// What.
        body: Body,
    },
}

/// Settings of the balancer shell.
pub struct Settings {
    /// This node.
    pub me: Contact,
    /// Gossip step.
    pub step: Duration,
    /// Automatic policy.
    pub policy: PolicyKind,
    /// Speed set by the operator (else calibrated).
    pub speed: Option<f64>,
    /// The node's cgroup.
    pub cgroup: Cgroup,
    /// Datagram MAC key.
    pub key: [u8; 32],
    /// Configured peers: (name if given, address).
    pub seeds: Vec<(Option<String>, SocketAddr)>,
    /// Record every call on the core here (`--balancer-trace`), for `mosvm sim --replay`.
    pub trace: Option<std::path::PathBuf>,
    /// Free-memory fraction below which memory ushering starts (else the core's default).
    pub usher_free: Option<f64>,
}

/// Microseconds since `t0`, as the core's time.
fn now_core(t0: Instant) -> Time {
    Time(t0.elapsed().as_micros().min(u128::from(u64::MAX)) as u64)
}

/// Wall-clock ms since the Unix epoch (datagram freshness).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn reason_name(r: MigrationReason) -> &'static str {
    match r {
        MigrationReason::Balance => "load",
        MigrationReason::Usher => "memory",
        MigrationReason::OpportunityCost => "cost",
        MigrationReason::Manual => "manual",
    }
}

fn body_kind(b: &Body) -> &'static str {
    match b {
        Body::Hello { .. } => "hello",
        Body::Gossip { .. } => "gossip",
        Body::Swim(_) => "swim",
        Body::Request { .. } => "request",
        Body::Reply { .. } => "reply",
        Body::Move { .. } => "move",
        Body::MoveFailed { .. } => "move_failed",
        Body::Stopped { .. } => "stopped",
    }
}

/// A process the core was told runs here.
struct Resident {
    /// Lock state last fed to the core.
    locked: bool,
    /// System calls (home, local) at the last report.
    calls: (u64, u64),
    /// Execs at the last report.
    execs: u32,
}

/// A move this node ordered and has not seen through.
struct Inflight {
    to: NodeId,
    since: Instant,
    reason: MigrationReason,
    /// The process's failed moves when this one was ordered.
    failures: u32,
}

/// The shell's state.
struct Shell {
    core: balancer::Node,
    me: Contact,
    shared: Shared,
    udp: Arc<UdpSocket>,
    sealer: Sealer,
    rng: ChaCha8Rng,
    trace: Option<std::io::BufWriter<std::fs::File>>,
    t0: Instant,
    cgroup: Cgroup,
    speed: f64,
    seeds: Vec<(Option<String>, SocketAddr)>,
    /// Nodes SWIM was asked to join through.
    joined: HashSet<NodeId>,
    /// Configured peers found to call themselves otherwise (warned about once each).
    misnamed: HashSet<(String, SocketAddr)>,
    residents: HashMap<Pid, Resident>,
    /// Moves this node ordered and not yet seen through: pid -> (target, since, reason).
    inflight: HashMap<Pid, Inflight>,
    /// The last [`Body::Stopped`] generation taken, per hosted process.
    stop_generations: HashMap<Pid, u64>,
    events: mpsc::UnboundedSender<Event>,
    samples: (f64, u32),
    /// The most recent sub-step sample (reacts at once to processes that left).
    last_sample: f64,
    /// A process arrived or left since the last tick: the step's mean is out of date.
    changed: bool,
    sampler: crate::capacity::Sampler,
    /// When configured peers were last announced to.
    announced: Instant,
    /// Nodes SWIM declared down, and when.
    down_since: HashMap<NodeId, Instant>,
}

/// Run the balancer shell until the node stops. `rx` carries verified datagrams and
/// [`Event`]s.
pub async fn run(
    shared: Shared,
    udp: Arc<UdpSocket>,
    s: Settings,
    events: mpsc::UnboundedSender<Event>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut datagrams: mpsc::UnboundedReceiver<Envelope>,
) {
    let speed = s.speed.unwrap_or_else(crate::capacity::calibrate);
    let cpus = s.cgroup.cpus();
    let (mem_total, _) = s.cgroup.memory();
    let mut cfg = balancer::Config::new(s.me.id, cpus, speed, mem_total >> 20);
    cfg.policy = s.policy;
    cfg.params.step = Time(s.step.as_micros() as u64);
    // A move shows in the load of both ends only a step or two later.
    cfg.params.min_stay_secs = (4.0 * s.step.as_secs_f64()).max(1.0);
    if let Some(f) = s.usher_free {
        cfg.params.usher_free_frac = f;
    }
    cfg.swim = Some(balancer::node::SwimSettings {
        cluster_size: (s.seeds.len() as u32 + 1).max(3),
        seed: rand::rng().random(),
    });
    let scope = match (&s.cgroup.cpu, &s.cgroup.memory) {
        (None, None) => "machine".to_string(),
        (c, m) => format!(
            "cgroup{}{}",
            c.as_ref()
                .map(|(p, _)| format!(" cpu {}", p.display()))
                .unwrap_or_default(),
            m.as_ref()
                .map(|(p, _)| format!(" memory {}", p.display()))
                .unwrap_or_default()
        ),
    };
    tracing::info!(
        node = s.me.name,
        cpus,
        speed,
        mem_mb = mem_total >> 20,
        policy = ?s.policy,
        scope,
        "balancer up"
    );
    {
        let mut st = shared.lock().expect("state lock");
        st.view.policy = s.policy.flag_name().into();
        st.view.scope = scope;
    }
    let seed: u64 = rand::rng().random();
    let trace = match &s.trace {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => {
                let mut w = std::io::BufWriter::new(f);
                let header = Header {
                    config: cfg.clone(),
                    seed,
                };
                let _ = writeln!(w, "{}", serde_json::to_string(&header).unwrap_or_default());
                Some(w)
            }
            Err(e) => {
                tracing::warn!("cannot write the balancer trace {}: {e}", path.display());
                None
            }
        },
        None => None,
    };
    let mut sh = Shell {
        misnamed: HashSet::new(),
        core: balancer::Node::new(cfg),
        trace,
        sealer: Sealer::new(s.key, s.me.clone(), rand::rng().random()),
        me: s.me,
        shared,
        udp,
        rng: ChaCha8Rng::seed_from_u64(seed),
        t0: Instant::now(),
        cgroup: s.cgroup,
        speed,
        seeds: s.seeds,
        joined: HashSet::new(),
        residents: HashMap::new(),
        inflight: HashMap::new(),
        stop_generations: HashMap::new(),
        events,
        samples: (0.0, 0),
        last_sample: 0.0,
        changed: false,
        sampler: Default::default(),
        announced: Instant::now(),
        down_since: HashMap::new(),
    };
    // Named peers are known already: join SWIM through them.
    let named: Vec<Contact> = sh
        .seeds
        .iter()
        .filter_map(|(n, a)| {
            n.as_ref().map(|n| Contact {
                id: gossip::node_id(n),
                name: n.clone(),
                addr: *a,
            })
        })
        .collect();
    for c in named {
        sh.learn(c).await;
    }
    sh.hello_unknown().await;
    let mut step = tokio::time::interval(sh.step() / SAMPLES_PER_STEP);
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = step.tick() => {
                let guests = sh.guests();
                let r = sh.sampler.sample(&sh.cgroup, &guests);
                sh.samples.0 += r;
                sh.samples.1 += 1;
                sh.last_sample = r;
                n += 1;
                if n.is_multiple_of(SAMPLES_PER_STEP) {
                    sh.tick().await;
                }
            }
            Some(env) = datagrams.recv() => sh.datagram(env).await,
            ev = rx.recv() => match ev {
                Some(Event::SwimTimer(t)) => {
                    let acts = sh.call(Call::Handle(Input::SwimTimer(t)));
                    sh.act(acts).await;
                }
                Some(Event::Speed(v)) => {
                    sh.speed = v;
                    let (total, _) = sh.cgroup.memory();
                    let cpus = sh.cgroup.cpus();
                    sh.call(Call::SetCapacity { cpus, speed: v, mem_mb: total >> 20 });
                    sh.publish();
                }
                Some(Event::Send { to, body }) => sh.send(to, body).await,
                Some(Event::Leave(done)) => {
                    let acts = sh.call(Call::Leave);
                    sh.act(acts).await;
                    let _ = done.send(());
                }
                None => return,
            },
        }
    }
}

impl Shell {
    /// Make one call on the core now, recording it when tracing.
    fn call(&mut self, call: Call) -> Vec<Action> {
        let at = now_core(self.t0);
        let actions = balancer::trace::apply(&mut self.core, &call, at, &mut self.rng);
        if let Some(w) = self.trace.as_mut() {
            let r = Record { at, call, actions };
            let _ = writeln!(w, "{}", serde_json::to_string(&r).unwrap_or_default());
            return r.actions;
        }
        actions
    }

    /// How the node's guest processes count in its load ([`crate::capacity::Sampler`]):
    /// its own processes running here and the guests it hosts are runnable work, those
    /// being moved (by order of this node or of their home) count as one thread each.
    fn guests(&self) -> HashMap<u32, Count> {
        let st = self.shared.lock().expect("state lock");
        let mut v = HashMap::new();
        for p in st.procs.values() {
            if p.info.state == "migrating" {
                v.insert(p.info.pid, Count::Moving);
            } else if p.info.node == st.name {
                v.insert(p.info.pid, Count::Runnable);
            }
        }
        for (host_pid, h) in &st.hosted {
            let pid = gossip::cluster_pid(gossip::node_id(&h.home), h.pid);
            let how = if self.inflight.contains_key(&pid) {
                Count::Moving
            } else {
                Count::Runnable
            };
            v.insert(*host_pid, how);
        }
        v
    }

    fn step(&self) -> Duration {
        Duration::from_micros(self.core.config().params.step.0)
    }

    fn count(map: &mut BTreeMap<String, u64>, k: &str) {
        *map.entry(k.to_string()).or_default() += 1;
    }

    /// Send `body` to `to`'s address.
    async fn send_to(&mut self, addr: SocketAddr, body: Body) {
        let kind = body_kind(&body);
        let d = self.sealer.seal(body, unix_ms());
        if self.udp.send_to(&d, addr).await.is_ok() {
            metrics::counter!("mosvm_datagrams_sent_total", "kind" => kind).increment(1);
            let mut st = self.shared.lock().expect("state lock");
            Self::count(&mut st.view.counters.sent, kind);
        }
    }

    async fn send(&mut self, to: NodeId, body: Body) {
        let addr = self
            .shared
            .lock()
            .expect("state lock")
            .directory
            .get(&to)
            .map(|c| c.addr);
        match addr {
            Some(a) => self.send_to(a, body).await,
            None => {
                let mut st = self.shared.lock().expect("state lock");
                Self::count(&mut st.view.counters.rejected, "no_address");
            }
        }
    }

    async fn datagram(&mut self, env: Envelope) {
        {
            let kind = body_kind(&env.body);
            metrics::counter!("mosvm_datagrams_received_total", "kind" => kind).increment(1);
            let mut st = self.shared.lock().expect("state lock");
            Self::count(&mut st.view.counters.received, kind);
        }
        let from = env.from.id;
        self.learn(env.from.clone()).await;
        let input = match env.body {
            Body::Hello { answer } => {
                if answer {
                    self.send_to(env.from.addr, Body::Hello { answer: false })
                        .await;
                }
                return;
            }
            Body::Gossip { entries, book } => {
                for c in book {
                    if c.id == gossip::node_id(&c.name) {
                        self.learn(c).await;
                    }
                }
                // The sender's own entry must be about the sender.
                if entries.first().is_some_and(|e| e.node != from) {
                    return;
                }
                Input::Gossip { from, entries }
            }
            Body::Swim(data) => Input::Swim { from, data },
            Body::Request {
                pid,
                mem_mb,
                from_rate,
                reason,
            } => {
                let block = self.shared.lock().expect("state lock").admin.block;
                if block {
                    self.send(
                        from,
                        Body::Reply {
                            pid,
                            accepted: false,
                        },
                    )
                    .await;
                    return;
                }
                Input::MigrationRequest {
                    from,
                    pid,
                    mem_mb,
                    from_rate,
                    reason,
                }
            }
            Body::Reply { pid, accepted } => Input::MigrationReply {
                from,
                pid,
                accepted,
            },
            Body::Move { pid, to, reason } => {
                let (home, hp) = gossip::split_pid(pid);
                if home == self.me.id {
                    let r = {
                        let mut st = self.shared.lock().expect("state lock");
                        match st.procs.get(&hp) {
                            Some(p) if p.info.node == env.from.name => {
                                crate::admin::order_move(&mut st, hp, &to, &reason)
                            }
                            _ => Err(format!("process {hp} does not run on {}", env.from.name)),
                        }
                    };
                    match r {
                        Ok(_) => tracing::info!(
                            pid = hp,
                            from = env.from.name,
                            to,
                            reason,
                            "moving a process at its host's request"
                        ),
                        Err(error) => {
                            tracing::info!(pid = hp, to, "not moving: {error}");
                            self.send(env.from.id, Body::MoveFailed { pid, error })
                                .await;
                        }
                    }
                }
                return;
            }
            Body::Stopped {
                pid,
                stopped,
                generation,
            } => {
                self.stopped_at_home(env.from.id, pid, stopped, generation);
                return;
            }
            Body::MoveFailed { pid, error } => {
                // Only the process's home speaks for it.
                if gossip::split_pid(pid).0 == env.from.id {
                    if let Some(m) = self.inflight.remove(&pid) {
                        tracing::info!(
                            pid = gossip::split_pid(pid).1,
                            to = self.name_of(m.to),
                            "automatic migration failed at home: {error}"
                        );
                        let acts = self.outcome(pid, m.to, m.reason, false);
                        self.act(acts).await;
                    }
                }
                return;
            }
        };
        let acts = self.call(Call::Handle(input));
        self.act(acts).await;
    }

    /// A hosted process was stopped or continued at home ([`Body::Stopped`], from `from`):
    /// stop or continue its guest host, as the kernel would the process (SIGSTOP, SIGCONT;
    /// the guest host takes no SIGCONT from this node for the guest).
    fn stopped_at_home(&mut self, from: NodeId, pid: Pid, stopped: bool, generation: u64) {
        let (home, hp) = gossip::split_pid(pid);
        if home != from {
            return; // only the process's home speaks for it
        }
        let host_pid = {
            let st = self.shared.lock().expect("state lock");
            st.hosted
                .iter()
                .find(|(_, h)| h.pid == hp && gossip::node_id(&h.home) == home)
                .map(|(k, _)| *k)
        };
        let Some(host_pid) = host_pid else {
            self.stop_generations.remove(&pid);
            return;
        };
        let last = self.stop_generations.entry(pid).or_insert(0);
        if generation <= *last {
            return;
        }
        *last = generation;
        let sig = if stopped {
            libc::SIGSTOP
        } else {
            libc::SIGCONT
        };
        tracing::info!(
            pid = hp,
            stopped,
            "process {} at home: {} its guest",
            if stopped { "stopped" } else { "continued" },
            if stopped { "stopping" } else { "continuing" }
        );
        // SAFETY: signalling a child process of ours (its guest host) has no memory effects.
        unsafe { libc::kill(host_pid as i32, sig) };
    }

    async fn act(&mut self, acts: Vec<Action>) {
        let mut todo: std::collections::VecDeque<Action> = acts.into();
        while let Some(a) = todo.pop_front() {
            match a {
                Action::SendGossip { to, entries } => {
                    let book = self.book(&entries);
                    self.send(to, Body::Gossip { entries, book }).await;
                }
                Action::SendSwim { to, data } => self.send(to, Body::Swim(data)).await,
                Action::SendMigrationRequest {
                    to,
                    pid,
                    mem_mb,
                    from_rate,
                    reason,
                } => {
                    self.send(
                        to,
                        Body::Request {
                            pid,
                            mem_mb,
                            from_rate,
                            reason,
                        },
                    )
                    .await
                }
                Action::SendMigrationReply { to, pid, accepted } => {
                    self.send(to, Body::Reply { pid, accepted }).await
                }
                Action::Migrate { pid, to, reason } => {
                    let more = self.migrate(pid, to, reason).await;
                    todo.extend(more);
                }
                Action::ScheduleSwim { after, timer } => {
                    let tx = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_micros(after.0)).await;
                        let _ = tx.send(Event::SwimTimer(timer));
                    });
                }
                Action::MemberUp { node } => {
                    self.down_since.remove(&node);
                    let name = self.name_of(node);
                    tracing::info!(node = name, "node up");
                }
                Action::MemberDown { node } => {
                    self.down_since.insert(node, Instant::now());
                    let name = self.name_of(node);
                    tracing::info!(node = name, "node down");
                }
            }
        }
    }

    fn name_of(&self, node: NodeId) -> String {
        let st = self.shared.lock().expect("state lock");
        st.directory
            .get(&node)
            .map_or_else(|| format!("#{node:08x}"), |c| c.name.clone())
    }

    /// Carry out the core's decision to move `pid` to `to`; returns the core's actions if
    /// the move could not even be ordered.
    async fn migrate(&mut self, pid: Pid, to: NodeId, reason: MigrationReason) -> Vec<Action> {
        let (home, hp) = gossip::split_pid(pid);
        let why = reason_name(reason);
        let target = self.name_of(to);
        let load_here = self.core.load_now();
        let load_there = self
            .core
            .window()
            .get(to)
            .map_or(f32::NAN, |h| h.entry.load);
        let outcome = if home == self.me.id {
            let mut st = self.shared.lock().expect("state lock");
            crate::admin::order_move(&mut st, hp, &target, why).map(|_| ())
        } else {
            let home_name = self.name_of(home);
            let to_name = if to == home {
                home_name.clone()
            } else {
                target.clone()
            };
            self.send(
                home,
                Body::Move {
                    pid,
                    to: to_name,
                    reason: why.into(),
                },
            )
            .await;
            Ok(())
        };
        let program = {
            let st = self.shared.lock().expect("state lock");
            crate::admin::program_of(&st, home == self.me.id, hp)
        };
        match outcome {
            Ok(()) => {
                tracing::info!(
                    pid = hp,
                    program,
                    to = target,
                    reason = why,
                    load_here = format!("{load_here:.2}"),
                    load_there = format!("{load_there:.2}"),
                    "automatic migration"
                );
                let failures = self.failures_of(pid);
                self.inflight.insert(
                    pid,
                    Inflight {
                        to,
                        since: Instant::now(),
                        reason,
                        failures,
                    },
                );
                Vec::new()
            }
            Err(e) => {
                tracing::info!(
                    pid = hp,
                    to = target,
                    reason = why,
                    "automatic migration refused: {e}"
                );
                self.outcome(pid, to, reason, false)
            }
        }
    }

    fn failures_of(&self, pid: Pid) -> u32 {
        let (home, hp) = gossip::split_pid(pid);
        if home != self.me.id {
            return 0;
        }
        let st = self.shared.lock().expect("state lock");
        st.procs.get(&hp).map_or(0, |p| p.failures)
    }

    /// Count a move's outcome and tell the core; returns the core's actions.
    fn outcome(&mut self, pid: Pid, to: NodeId, reason: MigrationReason, ok: bool) -> Vec<Action> {
        {
            let mut st = self.shared.lock().expect("state lock");
            let k = format!(
                "{} {}",
                reason_name(reason),
                if ok { "done" } else { "failed" }
            );
            Self::count(&mut st.view.counters.migrations, &k);
        }
        let input = if ok {
            Input::MigrationDone { pid, to }
        } else {
            Input::MigrationFailed { pid, to }
        };
        self.call(Call::Handle(input))
    }

    /// Bring the core's view of the processes running here up to date.
    async fn reconcile(&mut self) {
        let present = {
            let st = self.shared.lock().expect("state lock");
            crate::admin::running_here(&st, self.me.id)
        };
        let ids: HashSet<Pid> = present.iter().map(|p| p.pid).collect();
        // Gone from here: moved away (by us or by hand), or ended.
        let gone: Vec<Pid> = self
            .residents
            .keys()
            .filter(|p| !ids.contains(p))
            .copied()
            .collect();
        for pid in gone {
            self.changed = true;
            self.residents.remove(&pid);
            match self.inflight.remove(&pid) {
                Some(m) => {
                    let acts = self.outcome(pid, m.to, m.reason, true);
                    self.act(acts).await;
                }
                None => {
                    let acts = self.call(Call::Handle(Input::ProcessEnded { pid }));
                    self.act(acts).await;
                }
            }
        }
        let admin = self.shared.lock().expect("state lock").admin.clone();
        for p in present {
            let locked = p.locked || admin.stay || (admin.lstay && p.own);
            if !self.residents.contains_key(&p.pid) {
                self.changed = true;
                let mut info = balancer::ProcessInfo::new(p.pid, p.home, p.mem_mb);
                info.age_ms = p.age.as_millis() as u64;
                info.locked = locked;
                info.cpu_work = p.cpu_s * self.speed;
                info.migrated_in = p.migrated_in;
                let acts = self.call(Call::Handle(Input::ProcessStarted(info)));
                self.act(acts).await;
                self.residents.insert(
                    p.pid,
                    Resident {
                        locked,
                        calls: p.calls,
                        execs: p.execs,
                    },
                );
                continue;
            }
            let Some(r) = self.residents.get_mut(&p.pid) else {
                continue;
            };
            let relock = r.locked != locked;
            r.locked = locked;
            let (home_syscalls, local_syscalls) = (
                p.calls.0.saturating_sub(r.calls.0),
                p.calls.1.saturating_sub(r.calls.1),
            );
            r.calls = p.calls;
            let mut inputs = Vec::new();
            if r.execs != p.execs {
                r.execs = p.execs;
                inputs.push(Input::ProcessExec { pid: p.pid });
            }
            inputs.push(Input::ProcessStats {
                pid: p.pid,
                cpu_work: p.cpu_s * self.speed,
                home_syscalls,
                local_syscalls,
                mem_mb: Some(p.mem_mb),
            });
            if relock {
                inputs.push(Input::SetLock { pid: p.pid, locked });
            }
            // A move this node ordered that came back here failed.
            let failed = self
                .inflight
                .get(&p.pid)
                .is_some_and(|m| p.failures > m.failures || m.since.elapsed() > MOVE_DEADLINE);
            if failed {
                if let Some(m) = self.inflight.remove(&p.pid) {
                    let acts = self.outcome(p.pid, m.to, m.reason, false);
                    self.act(acts).await;
                }
            }
            for i in inputs {
                let acts = self.call(Call::Handle(i));
                self.act(acts).await;
            }
        }
    }

    async fn tick(&mut self) {
        self.reconcile().await;
        // The step's mean, but no more than its last part shows. When a process arrived or
        // left during the step, only the last part shows what runs now (an arrival counted in
        // the mean only for the part of the step it was here would let a herd in).
        let runnable = if self.samples.1 > 0 && std::mem::take(&mut self.changed) {
            self.last_sample
        } else if self.samples.1 > 0 {
            (self.samples.0 / f64::from(self.samples.1)).min(self.last_sample)
        } else {
            0.0
        };
        self.samples = (0.0, 0);
        let (total, used) = self.cgroup.memory();
        let used = used.saturating_sub(crate::hosting::pool_held());
        let (cpus, speed) = (self.cgroup.cpus(), self.speed);
        self.call(Call::SetCapacity {
            cpus,
            speed,
            mem_mb: total >> 20,
        });
        let sample = Input::LoadSample {
            runnable,
            used_mem_mb: used >> 20,
        };
        let acts = self.call(Call::Handle(sample));
        self.act(acts).await;
        let acts = self.call(Call::Handle(Input::Tick));
        self.act(acts).await;
        self.hello_unknown().await;
        self.reannounce().await;
        if let Some(w) = self.trace.as_mut() {
            let _ = w.flush();
        }
        {
            let mut st = self.shared.lock().expect("state lock");
            st.view.runnable = runnable;
            metrics::gauge!("mosvm_guests_hosted").set(st.hosted.len() as f64);
        }
        let own = self.core.own_entry();
        metrics::gauge!("mosvm_runnable").set(runnable);
        metrics::gauge!("mosvm_load").set(f64::from(own.load));
        metrics::gauge!("mosvm_capacity_cpus").set(f64::from(own.cpus));
        metrics::gauge!("mosvm_speed").set(f64::from(own.speed));
        metrics::gauge!("mosvm_free_memory_bytes").set((u64::from(own.free_mem_mb) << 20) as f64);
        self.publish();
    }

    /// Copy what the clients show into the shared state.
    fn publish(&mut self) {
        let now = now_core(self.t0);
        let mut st = self.shared.lock().expect("state lock");
        let State {
            view, directory, ..
        } = &mut *st;
        view.own = Some(self.core.own_entry());
        let up: HashSet<NodeId> = self.core.peers().iter().copied().collect();
        view.known = directory
            .values()
            .map(|c| {
                let entry = self.core.window().get(c.id).map(|h| h.aged(now));
                (
                    c.id,
                    Known {
                        name: c.name.clone(),
                        addr: c.addr.to_string(),
                        entry,
                        up: up.contains(&c.id),
                    },
                )
            })
            .collect();
    }
}
