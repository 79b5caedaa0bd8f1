//! The event loop: hosts run processes by processor sharing in virtual time; the balancer
//! cores ([`crate::Node`]) get the same inputs the node service would give them.

use super::workload::{Scenario, ScenarioSpec};
use crate::membership::SwimTimer;
use crate::node::{
    Action, Config, Input, MigrationReason, Node, Params, ProcessInfo, SwimSettings,
};
use crate::policy::{rate_with, PolicyKind};
use crate::types::{gossip_message_bytes, NodeId, Time};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

/// The policies compared by the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum SimPolicy {
    /// Every process runs where it started.
    None,
    /// Each process starts on a uniformly random node, never moves.
    Random,
    /// Processes are placed round-robin over the nodes (PVM-like), never move.
    RoundRobin,
    /// mosvm: MOSIX pairwise load balancing and memory ushering, driven by gossip.
    Mosvm,
    /// The opportunity-cost policy, driven by the same gossip.
    OppCost,
    /// Omniscient reference: exact global state, best node at arrival and free, instant
    /// rebalancing every step.
    Omniscient,
}

impl SimPolicy {
    /// All policies, in report order.
    pub const ALL: [SimPolicy; 6] = [
        SimPolicy::None,
        SimPolicy::Random,
        SimPolicy::RoundRobin,
        SimPolicy::Mosvm,
        SimPolicy::OppCost,
        SimPolicy::Omniscient,
    ];

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::None => "none",
            SimPolicy::Random => "random",
            SimPolicy::RoundRobin => "round-robin",
            SimPolicy::Mosvm => "mosvm",
            SimPolicy::OppCost => "opp-cost",
            SimPolicy::Omniscient => "omniscient",
        }
    }

    fn core_policy(self) -> Option<PolicyKind> {
        match self {
            SimPolicy::Mosvm => Some(PolicyKind::Mosix),
            SimPolicy::OppCost => Some(PolicyKind::OpportunityCost),
            _ => None,
        }
    }
}

/// Everything a run needs besides the scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimConfig {
    /// The scenario parameters (reported back).
    pub spec: ScenarioSpec,
    /// Policy.
    pub policy: SimPolicy,
    /// Balancer parameters (also the migration cost model).
    pub params: Params,
    /// Run SWIM (foca) for membership instead of the membership oracle.
    pub swim: bool,
    /// One-way network latency, seconds.
    pub latency: f64,
    /// Per-process statistics are reported this often, seconds (0: only at start).
    pub stats_every: f64,
    /// At most this long after arrivals stop, seconds, to let processes finish.
    pub drain: f64,
    /// Migrations landing on a node within this many seconds of it becoming idle form a herd.
    pub herd_window: f64,
    /// Metrics sampling period, seconds.
    pub sample_every: f64,
    /// Thrashing: rate divided by 1 + thrash × (memory demand / memory − 1) when overcommitted.
    pub thrash: f64,
    /// Check process conservation after every event (slow; for tests).
    pub check_invariants: bool,
}

/// The results of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunStats {
    /// Policy name.
    pub policy: String,
    /// Workload name.
    pub workload: String,
    /// Initial nodes.
    pub nodes: u32,
    /// SWIM (foca) ran inside every node (otherwise the membership oracle).
    pub swim: bool,
    /// Offered load.
    pub load: f64,
    /// Processes that arrived.
    pub processes: u64,
    /// Processes still unfinished at the end of the drain.
    pub unfinished: u64,
    /// Mean slowdown (response time / run time alone on the home node); unfinished processes
    /// count with the slowdown reached at the end (a lower bound).
    pub mean_slowdown: f64,
    /// Median slowdown.
    pub p50_slowdown: f64,
    /// 99th percentile slowdown.
    pub p99_slowdown: f64,
    /// Mean slowdown of processes with work > 10 × mean (the long tail).
    pub mean_slowdown_long: f64,
    /// Migrations per process.
    pub migrations_per_process: f64,
    /// Migrations of home-bound processes (home fraction ≥ 0.5) per such process.
    pub home_bound_migrations_per_process: f64,
    /// Gossip messages per node per step.
    pub gossip_msgs_per_node_step: f64,
    /// Largest number of gossip messages one node sent in one step.
    pub gossip_max_per_step: u32,
    /// Gossip bytes per node per second.
    pub gossip_bytes_per_node_sec: f64,
    /// Migration negotiation messages per node per second.
    pub control_msgs_per_node_sec: f64,
    /// SWIM messages per node per second.
    pub swim_msgs_per_node_sec: f64,
    /// Mean age of window entries, seconds.
    pub info_age_secs: f64,
    /// Analytic model of the same, seconds.
    pub info_age_model_secs: f64,
    /// Mean fraction of CPUs idle while processes wait in a run queue elsewhere.
    pub load_imbalance: f64,
    /// Idle episodes that received at least one migration within the herd window.
    pub herd_events: u64,
    /// Mean herd size over those episodes.
    pub herd_mean: f64,
    /// Largest herd.
    pub herd_max: u32,
    /// Migrations landing on joining nodes within the herd window of joining (max over them).
    pub join_herd_max: u32,
    /// CPUs of the joiner that took the largest herd.
    pub join_herd_cpus: u32,
    /// Processes that completed.
    pub completed: u64,
    /// Events after which a conservation check failed (only with `check_invariants`).
    pub invariant_violations: u64,
    /// Simulated seconds.
    pub sim_secs: f64,
    /// Events processed.
    pub events: u64,
}

#[derive(Clone, Debug)]
enum Ev {
    Arrival(u32),
    Finish { host: u32, gen: u64 },
    Tick(u32),
    Msg { to: u32, input: Input },
    SwimTimer { host: u32, timer: SwimTimer },
    MigArrive { pid: u32, to: u32, from: u32 },
    Join(u32),
    Sample,
    Rebalance,
}

/// A queue entry: small, so the heap moves little; the event itself waits in a slab.
struct Item {
    t: u64,
    seq: u64,
    slot: u32,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        self.t == o.t && self.seq == o.seq
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

#[derive(Clone, Copy)]
struct Fin(f64, u32, u32);
impl PartialEq for Fin {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Fin {}
impl PartialOrd for Fin {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Fin {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0)
            .then(o.1.cmp(&self.1))
            .then(o.2.cmp(&self.2))
    }
}

const NOWHERE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Proc {
    node: u32,
    target: f64,
    mult: f64,
    seq: u32,
    migrations: u16,
    done: bool,
}

struct Host {
    cpus: u32,
    speed: f64,
    mem: u64,
    alive: bool,
    v: f64,
    last: f64,
    n: u32,
    mem_used: u64,
    gen: u64,
    heap: BinaryHeap<Fin>,
    residents: Vec<u32>,
    idle_since: f64,
    herd: u32,
    joined_at: Option<f64>,
    join_herd: u32,
    ticks: u64,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    sc: &'a Scenario,
    now: f64,
    seq: u64,
    q: BinaryHeap<Item>,
    slab: Vec<Option<Ev>>,
    free_slots: Vec<u32>,
    hosts: Vec<Host>,
    cores: Vec<Option<Node>>,
    procs: Vec<Proc>,
    slot: Vec<u32>,
    rng: ChaCha8Rng,
    place_rng: ChaCha8Rng,
    rr: usize,
    peers: Arc<Vec<NodeId>>,
    st: RunStats,
    slowdowns: Vec<f64>,
    long_slowdowns: Vec<f64>,
    herds: Vec<u32>,
    age_sum: f64,
    age_samples: u64,
    imb_sum: f64,
    imb_samples: u64,
    gossip_msgs: u64,
    gossip_bytes: u64,
    control_msgs: u64,
    swim_msgs: u64,
    node_secs: f64,
    home_bound_moves: u64,
    home_bound_procs: u64,
    arrived: u64,
    in_transit: u64,
}

impl<'a> Sim<'a> {
    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(ev);
                i
            }
            None => {
                self.slab.push(Some(ev));
                (self.slab.len() - 1) as u32
            }
        };
        self.q.push(Item {
            t: Time::from_secs_f64(t).0,
            seq: self.seq,
            slot,
        });
    }

    fn rate(&self, h: u32) -> f64 {
        let host = &self.hosts[h as usize];
        let mut r = rate_with(f64::from(host.n), f64::from(host.cpus), host.speed);
        if host.mem_used > host.mem {
            let over = host.mem_used as f64 / host.mem.max(1) as f64 - 1.0;
            r /= 1.0 + self.cfg.thrash * over;
        }
        r
    }

    fn advance(&mut self, h: u32) {
        let r = self.rate(h);
        let now = self.now;
        let host = &mut self.hosts[h as usize];
        if host.n > 0 {
            host.v += r * (now - host.last);
        }
        host.last = now;
    }

    fn reschedule(&mut self, h: u32) {
        let r = self.rate(h);
        let host = &mut self.hosts[h as usize];
        host.gen += 1;
        while let Some(&Fin(_, pid, seq)) = host.heap.peek() {
            let p = &self.procs[pid as usize];
            if p.node == h && p.seq == seq && !p.done {
                break;
            }
            host.heap.pop();
        }
        if let Some(&Fin(target, _, _)) = host.heap.peek() {
            let dt = ((target - host.v) / r).max(1e-6);
            let gen = host.gen;
            let t = self.now + dt;
            self.at(t, Ev::Finish { host: h, gen });
        }
    }

    fn mult(&self, pid: u32, h: u32) -> f64 {
        let job = &self.sc.jobs[pid as usize];
        if job.home == h {
            1.0
        } else {
            1.0 / (1.0 + self.cfg.params.io_penalty * job.home_fraction)
        }
    }

    /// Put `pid` with `remaining` work on host `h`.
    fn place(&mut self, pid: u32, h: u32, remaining: f64) {
        self.advance(h);
        let mult = self.mult(pid, h);
        let host = &mut self.hosts[h as usize];
        let target = host.v + remaining / mult;
        host.n += 1;
        host.mem_used += u64::from(self.sc.jobs[pid as usize].mem_mb);
        self.slot[pid as usize] = host.residents.len() as u32;
        host.residents.push(pid);
        let p = &mut self.procs[pid as usize];
        p.node = h;
        p.target = target;
        p.mult = mult;
        p.seq += 1;
        let seq = p.seq;
        host.heap.push(Fin(target, pid, seq));
        self.reschedule(h);
    }

    /// Take `pid` off its host; returns its remaining work.
    fn unplace(&mut self, pid: u32) -> f64 {
        let h = self.procs[pid as usize].node;
        self.advance(h);
        let now = self.now;
        let p = self.procs[pid as usize];
        let host = &mut self.hosts[h as usize];
        let remaining = ((p.target - host.v) * p.mult).max(0.0);
        host.n -= 1;
        host.mem_used -= u64::from(self.sc.jobs[pid as usize].mem_mb);
        let i = self.slot[pid as usize] as usize;
        host.residents.swap_remove(i);
        if let Some(&moved) = host.residents.get(i) {
            self.slot[moved as usize] = i as u32;
        }
        if host.n == 0 {
            if host.herd > 0 {
                self.herds.push(host.herd);
            }
            host.herd = 0;
            host.idle_since = now;
        }
        self.procs[pid as usize].node = NOWHERE;
        self.reschedule(h);
        remaining
    }

    fn info(&self, pid: u32, remaining: f64) -> ProcessInfo {
        let job = &self.sc.jobs[pid as usize];
        let mut info = ProcessInfo::new(u64::from(pid), job.home, job.mem_mb);
        info.age_ms = ((self.now - job.arrival) * 1000.0) as u64;
        info.cpu_work = (job.work - remaining).max(0.0);
        info.home_syscalls = 100.0 * job.home_fraction;
        info.local_syscalls = 100.0 * (1.0 - job.home_fraction);
        info
    }

    fn feed(&mut self, h: u32, input: Input) {
        let now = Time::from_secs_f64(self.now);
        let acts = match self.cores[h as usize].as_mut() {
            Some(core) => core.handle(input, now, &mut self.rng),
            None => return,
        };
        self.apply(h, acts);
    }

    fn send(&mut self, to: u32, input: Input) {
        let t = self.now + self.cfg.latency;
        self.at(t, Ev::Msg { to, input });
    }

    fn apply(&mut self, h: u32, acts: Vec<Action>) {
        let mut sent = 0u32;
        for a in acts {
            match a {
                Action::SendGossip { to, entries } => {
                    sent += 1;
                    self.gossip_msgs += 1;
                    self.gossip_bytes += gossip_message_bytes(entries.len()) as u64;
                    self.send(to, Input::Gossip { from: h, entries });
                }
                Action::SendMigrationRequest {
                    to,
                    pid,
                    mem_mb,
                    from_rate,
                    reason,
                } => {
                    self.control_msgs += 1;
                    let input = Input::MigrationRequest {
                        from: h,
                        pid,
                        mem_mb,
                        from_rate,
                        reason,
                    };
                    self.send(to, input);
                }
                Action::SendMigrationReply { to, pid, accepted } => {
                    self.control_msgs += 1;
                    let input = Input::MigrationReply {
                        from: h,
                        pid,
                        accepted,
                    };
                    self.send(to, input);
                }
                Action::Migrate { pid, to, .. } => self.start_migration(pid as u32, h, to),
                Action::SendSwim { to, data } => {
                    self.swim_msgs += 1;
                    self.send(to, Input::Swim { from: h, data });
                }
                Action::ScheduleSwim { after, timer } => {
                    let t = self.now + after.as_secs_f64();
                    self.at(t, Ev::SwimTimer { host: h, timer });
                }
                Action::MemberUp { .. } | Action::MemberDown { .. } => {}
            }
        }
        if sent > self.st.gossip_max_per_step {
            self.st.gossip_max_per_step = sent;
        }
    }

    fn start_migration(&mut self, pid: u32, from: u32, to: u32) {
        let p = self.procs[pid as usize];
        if p.done || p.node != from || to == from || to as usize >= self.hosts.len() {
            self.feed(
                from,
                Input::MigrationFailed {
                    pid: u64::from(pid),
                    to,
                },
            );
            return;
        }
        let mem = self.sc.jobs[pid as usize].mem_mb;
        let remaining = self.unplace(pid);
        let cost = self.cfg.params.migration_fixed_secs
            + f64::from(mem) / self.cfg.params.migration_mb_per_sec.max(1e-6);
        self.procs[pid as usize].migrations += 1;
        self.in_transit += 1;
        // Park the remaining work in `target` while in transit.
        self.procs[pid as usize].target = remaining;
        self.feed(
            from,
            Input::MigrationDone {
                pid: u64::from(pid),
                to,
            },
        );
        let t = self.now + cost;
        self.at(t, Ev::MigArrive { pid, to, from });
    }

    fn arrive(&mut self, pid: u32, to: u32, from: u32) {
        self.in_transit -= 1;
        let remaining = self.procs[pid as usize].target;
        let dest = if self.hosts[to as usize].alive {
            to
        } else {
            from
        };
        let now = self.now;
        let host = &mut self.hosts[dest as usize];
        if now - host.idle_since <= self.cfg.herd_window {
            host.herd += 1;
        }
        if let Some(j) = host.joined_at {
            if now - j <= self.cfg.herd_window {
                host.join_herd += 1;
            }
        }
        self.place(pid, dest, remaining);
        let mut info = self.info(pid, remaining);
        info.migrated_in = true;
        self.feed(dest, Input::ProcessStarted(info));
    }

    fn finish(&mut self, h: u32, gen: u64) {
        if self.hosts[h as usize].gen != gen {
            return;
        }
        self.advance(h);
        // Anything due within a microsecond of work is done (times are kept in microseconds).
        let eps = self.rate(h) * 2e-6 + 1e-9;
        let mut ended = Vec::new();
        loop {
            let host = &mut self.hosts[h as usize];
            match host.heap.peek() {
                Some(&Fin(target, pid, seq)) => {
                    let p = &self.procs[pid as usize];
                    if p.node != h || p.seq != seq || p.done {
                        host.heap.pop();
                        continue;
                    }
                    if target <= host.v + eps {
                        host.heap.pop();
                        ended.push(pid);
                    } else {
                        break;
                    }
                }
                None => break,
            }
        }
        for pid in ended {
            self.unplace(pid);
            let job = self.sc.jobs[pid as usize];
            let p = &mut self.procs[pid as usize];
            p.done = true;
            let alone = job.work / self.sc.nodes[job.home as usize].speed;
            let s = (self.now - job.arrival) / alone.max(1e-9);
            self.slowdowns.push(s);
            if job.work > 10.0 * self.cfg.spec.mean_work {
                self.long_slowdowns.push(s);
            }
            self.feed(
                h,
                Input::ProcessEnded {
                    pid: u64::from(pid),
                },
            );
        }
        self.reschedule(h);
    }

    fn tick(&mut self, h: u32) {
        if !self.hosts[h as usize].alive {
            return;
        }
        let step = self.cfg.params.step.as_secs_f64();
        self.hosts[h as usize].ticks += 1;
        self.node_secs += step;
        let host = &self.hosts[h as usize];
        let (n, used) = (host.n, host.mem_used);
        if self.cfg.stats_every > 0.0 {
            let every = (self.cfg.stats_every / step).round().max(1.0) as u64;
            if host.ticks.is_multiple_of(every) {
                self.advance(h);
                let host = &self.hosts[h as usize];
                let v = host.v;
                let stats: Vec<(u32, f64)> = host
                    .residents
                    .iter()
                    .map(|&pid| {
                        let p = &self.procs[pid as usize];
                        (pid, ((p.target - v) * p.mult).max(0.0))
                    })
                    .collect();
                for (pid, remaining) in stats {
                    let job = self.sc.jobs[pid as usize];
                    let calls = 100.0 * self.cfg.stats_every;
                    self.feed(
                        h,
                        Input::ProcessStats {
                            pid: u64::from(pid),
                            cpu_work: (job.work - remaining).max(0.0),
                            home_syscalls: (calls * job.home_fraction) as u64,
                            local_syscalls: (calls * (1.0 - job.home_fraction)) as u64,
                            mem_mb: None,
                        },
                    );
                }
            }
        }
        self.feed(
            h,
            Input::LoadSample {
                runnable: f64::from(n),
                used_mem_mb: used,
            },
        );
        self.feed(h, Input::Tick);
        let t = self.now + step;
        self.at(t, Ev::Tick(h));
    }

    /// Every arrived process is exactly once on a host, in transit, or done; host counters
    /// agree with their resident lists.
    fn conserved(&self) -> bool {
        let mut on_hosts = 0u64;
        for (i, h) in self.hosts.iter().enumerate() {
            if h.residents.len() != h.n as usize {
                return false;
            }
            let mut mem = 0u64;
            for &pid in &h.residents {
                let p = &self.procs[pid as usize];
                if p.node != i as u32 || p.done {
                    return false;
                }
                mem += u64::from(self.sc.jobs[pid as usize].mem_mb);
            }
            if mem != h.mem_used {
                return false;
            }
            on_hosts += h.residents.len() as u64;
        }
        let done = self.procs.iter().filter(|p| p.done).count() as u64;
        on_hosts + self.in_transit + done == self.arrived
    }

    fn arrival(&mut self, j: u32) {
        self.arrived += 1;
        let job = self.sc.jobs[j as usize];
        if job.home_fraction >= 0.5 {
            self.home_bound_procs += 1;
        }
        let h = match self.cfg.policy {
            SimPolicy::Random => self.random_alive(),
            SimPolicy::RoundRobin => {
                let n = self.hosts.len();
                let mut h = self.rr % n;
                while !self.hosts[h].alive {
                    h = (h + 1) % n;
                }
                self.rr = h + 1;
                h as u32
            }
            SimPolicy::Omniscient => self.best_host(j, None).unwrap_or(job.home),
            _ => job.home,
        };
        self.place(j, h, job.work);
        let info = self.info(j, job.work);
        self.feed(h, Input::ProcessStarted(info));
    }

    fn random_alive(&mut self) -> u32 {
        loop {
            let h = self.place_rng.random_range(0..self.hosts.len());
            if self.hosts[h].alive {
                return h as u32;
            }
        }
    }

    /// The host where `pid` would get the best rate now (omniscient), excluding `except`.
    fn best_host(&self, pid: u32, except: Option<u32>) -> Option<u32> {
        let mem = u64::from(self.sc.jobs[pid as usize].mem_mb);
        let mut best: Option<(f64, u32)> = None;
        for (i, h) in self.hosts.iter().enumerate() {
            let i = i as u32;
            if !h.alive || Some(i) == except || h.mem_used + mem > h.mem {
                continue;
            }
            let r = rate_with(f64::from(h.n) + 1.0, f64::from(h.cpus), h.speed) * self.mult(pid, i);
            if best.is_none_or(|(b, _)| r > b) {
                best = Some((r, i));
            }
        }
        best.map(|(_, i)| i)
    }

    fn rebalance(&mut self) {
        // Omniscient: every step, each overloaded host may hand its longest remaining process
        // to the host where it would run fastest, for free and at once.
        let n = self.hosts.len() as u32;
        for h in 0..n {
            let host = &self.hosts[h as usize];
            if !host.alive || host.n <= host.cpus {
                continue;
            }
            self.advance(h);
            let host = &self.hosts[h as usize];
            let v = host.v;
            let Some(&pid) = host.residents.iter().max_by(|&&a, &&b| {
                let ra = (self.procs[a as usize].target - v) * self.procs[a as usize].mult;
                let rb = (self.procs[b as usize].target - v) * self.procs[b as usize].mult;
                ra.total_cmp(&rb).then(a.cmp(&b))
            }) else {
                continue;
            };
            let here = self.rate(h) * self.procs[pid as usize].mult;
            if let Some(t) = self.best_host(pid, Some(h)) {
                let th = &self.hosts[t as usize];
                let there = rate_with(f64::from(th.n) + 1.0, f64::from(th.cpus), th.speed)
                    * self.mult(pid, t);
                if there > here * 1.1 {
                    let remaining = self.unplace(pid);
                    self.procs[pid as usize].migrations += 1;
                    let now = self.now;
                    let th = &mut self.hosts[t as usize];
                    if now - th.idle_since <= self.cfg.herd_window {
                        th.herd += 1;
                    }
                    self.place(pid, t, remaining);
                }
            }
        }
        let t = self.now + self.cfg.params.step.as_secs_f64();
        self.at(t, Ev::Rebalance);
    }

    fn sample(&mut self) {
        let now = Time::from_secs_f64(self.now);
        let stride = (self.cores.len() / 1000).max(1);
        for core in self.cores.iter().step_by(stride).flatten() {
            if let Some(a) = core.window().mean_age_secs(now) {
                self.age_sum += a;
                self.age_samples += 1;
            }
        }
        // Imbalance: CPUs idle while processes queue elsewhere, as a fraction of all CPUs.
        let (mut waiting, mut idle, mut cpus) = (0u64, 0u64, 0u64);
        for h in self.hosts.iter().filter(|h| h.alive) {
            waiting += u64::from(h.n.saturating_sub(h.cpus));
            idle += u64::from(h.cpus.saturating_sub(h.n));
            cpus += u64::from(h.cpus);
        }
        if cpus > 0 {
            self.imb_sum += waiting.min(idle) as f64 / cpus as f64;
            self.imb_samples += 1;
        }
        let t = self.now + self.cfg.sample_every;
        self.at(t, Ev::Sample);
    }

    fn join(&mut self, h: u32) {
        let now = self.now;
        let host = &mut self.hosts[h as usize];
        host.alive = true;
        host.last = now;
        host.idle_since = now;
        host.joined_at = Some(now);
        self.start_core(h);
    }

    fn start_core(&mut self, h: u32) {
        let Some(kind) = self.cfg.policy.core_policy() else {
            return;
        };
        let spec = self.sc.nodes[h as usize];
        let mut cfg = Config::new(h, f64::from(spec.cpus), spec.speed, spec.mem_mb);
        cfg.policy = kind;
        cfg.params = self.cfg.params.clone();
        if self.cfg.swim {
            cfg.swim = Some(SwimSettings {
                cluster_size: self.sc.nodes.len() as u32,
                seed: self.cfg.spec.seed ^ (u64::from(h) << 20),
            });
        }
        let mut node = Node::new(cfg);
        let acts = if self.cfg.swim {
            node.start(if h == 0 { None } else { Some(0) })
        } else {
            let mut v = (*self.peers).clone();
            if !v.contains(&h) {
                v.push(h);
                self.peers = Arc::new(v);
                for c in self.cores.iter_mut().flatten() {
                    c.set_shared_peers(self.peers.clone());
                }
            }
            node.set_shared_peers(self.peers.clone());
            Vec::new()
        };
        self.cores[h as usize] = Some(node);
        self.apply(h, acts);
        // Random phase so nodes do not step in lockstep.
        let phase = self.rng.random::<f64>() * self.cfg.params.step.as_secs_f64();
        let t = self.now + phase;
        self.at(t, Ev::Tick(h));
    }
}

/// Run one simulation of `sc` under `cfg`.
pub fn simulate(cfg: &SimConfig, sc: &Scenario) -> RunStats {
    let hosts = sc
        .nodes
        .iter()
        .map(|n| Host {
            cpus: n.cpus,
            speed: n.speed,
            mem: n.mem_mb,
            alive: false,
            v: 0.0,
            last: 0.0,
            n: 0,
            mem_used: 0,
            gen: 0,
            heap: BinaryHeap::new(),
            residents: Vec::new(),
            idle_since: f64::NEG_INFINITY,
            herd: 0,
            joined_at: None,
            join_herd: 0,
            ticks: 0,
        })
        .collect();
    let mut sim = Sim {
        cfg,
        sc,
        now: 0.0,
        seq: 0,
        q: BinaryHeap::new(),
        slab: Vec::new(),
        free_slots: Vec::new(),
        hosts,
        cores: (0..sc.nodes.len()).map(|_| None).collect(),
        procs: vec![
            Proc {
                node: NOWHERE,
                target: 0.0,
                mult: 1.0,
                seq: 0,
                migrations: 0,
                done: false,
            };
            sc.jobs.len()
        ],
        slot: vec![0; sc.jobs.len()],
        rng: ChaCha8Rng::seed_from_u64(cfg.spec.seed),
        place_rng: ChaCha8Rng::seed_from_u64(cfg.spec.seed ^ 0x5eed),
        rr: 0,
        peers: Arc::new(Vec::new()),
        st: RunStats::default(),
        slowdowns: Vec::with_capacity(sc.jobs.len()),
        long_slowdowns: Vec::new(),
        herds: Vec::new(),
        age_sum: 0.0,
        age_samples: 0,
        imb_sum: 0.0,
        imb_samples: 0,
        gossip_msgs: 0,
        gossip_bytes: 0,
        control_msgs: 0,
        swim_msgs: 0,
        node_secs: 0.0,
        home_bound_moves: 0,
        home_bound_procs: 0,
        arrived: 0,
        in_transit: 0,
    };
    // Initial nodes are up at time 0 and share one peer list (or join through node 0 by SWIM).
    let initial: Vec<u32> = (0..sc.nodes.len() as u32)
        .filter(|&i| sc.nodes[i as usize].joins_at <= 0.0)
        .collect();
    if !cfg.swim {
        sim.peers = Arc::new(initial.clone());
    }
    for &h in &initial {
        sim.hosts[h as usize].alive = true;
        sim.start_core(h);
    }
    for (i, n) in sc.nodes.iter().enumerate() {
        if n.joins_at > 0.0 {
            sim.at(n.joins_at, Ev::Join(i as u32));
        }
    }
    // Arrivals are sorted: keep only the next one queued.
    if let Some(job) = sc.jobs.first() {
        sim.at(job.arrival, Ev::Arrival(0));
    }
    sim.at(cfg.sample_every, Ev::Sample);
    if cfg.policy == SimPolicy::Omniscient {
        sim.at(cfg.params.step.as_secs_f64(), Ev::Rebalance);
    }
    let end = cfg.spec.duration + cfg.drain.max(0.0);
    let total = sc.jobs.len();
    let mut events = 0u64;
    while let Some(item) = sim.q.pop() {
        let t = item.t as f64 / 1e6;
        if t > end || sim.slowdowns.len() == total && t >= cfg.spec.duration {
            break;
        }
        sim.now = t;
        events += 1;
        let Some(ev) = sim.slab[item.slot as usize].take() else {
            continue;
        };
        sim.free_slots.push(item.slot);
        match ev {
            Ev::Arrival(j) => {
                sim.arrival(j);
                if let Some(next) = sc.jobs.get(j as usize + 1) {
                    sim.at(next.arrival, Ev::Arrival(j + 1));
                }
            }
            Ev::Finish { host, gen } => sim.finish(host, gen),
            Ev::Tick(h) => sim.tick(h),
            Ev::Msg { to, input } => {
                if sim.hosts[to as usize].alive {
                    sim.feed(to, input);
                }
            }
            Ev::SwimTimer { host, timer } => {
                if sim.hosts[host as usize].alive {
                    sim.feed(host, Input::SwimTimer(timer));
                }
            }
            Ev::MigArrive { pid, to, from } => sim.arrive(pid, to, from),
            Ev::Join(h) => sim.join(h),
            Ev::Sample => sim.sample(),
            Ev::Rebalance => sim.rebalance(),
        }
        if cfg.check_invariants && !sim.conserved() {
            sim.st.invariant_violations += 1;
        }
    }
    // Close open herd episodes.
    let mut join_herd_max = 0;
    let mut join_herd_cpus = 0;
    for h in &sim.hosts {
        if h.herd > 0 {
            sim.herds.push(h.herd);
        }
        if h.joined_at.is_some() && h.join_herd >= join_herd_max {
            join_herd_max = h.join_herd;
            join_herd_cpus = h.cpus;
        }
    }
    let mut st = std::mem::take(&mut sim.st);
    st.policy = cfg.policy.name().to_string();
    st.workload = cfg.spec.kind.name().to_string();
    st.nodes = cfg.spec.nodes;
    st.swim = cfg.swim && cfg.policy.core_policy().is_some();
    st.load = cfg.spec.load;
    st.processes = total as u64;
    st.unfinished = sim.procs.iter().filter(|p| !p.done).count() as u64;
    // Unfinished processes count with the slowdown they had reached (a lower bound).
    let end_time = sim.now;
    for (j, p) in sim.procs.iter().enumerate() {
        if !p.done {
            let job = sc.jobs[j];
            let alone = job.work / sc.nodes[job.home as usize].speed;
            sim.slowdowns
                .push((end_time - job.arrival).max(0.0) / alone.max(1e-9));
        }
    }
    let mut s = std::mem::take(&mut sim.slowdowns);
    s.sort_by(f64::total_cmp);
    st.mean_slowdown = mean(&s);
    st.p50_slowdown = quantile(&s, 0.5);
    st.p99_slowdown = quantile(&s, 0.99);
    st.mean_slowdown_long = mean(&sim.long_slowdowns);
    let migrations: u64 = sim.procs.iter().map(|p| u64::from(p.migrations)).sum();
    st.migrations_per_process = migrations as f64 / total.max(1) as f64;
    for (j, p) in sim.procs.iter().enumerate() {
        if sc.jobs[j].home_fraction >= 0.5 {
            sim.home_bound_moves += u64::from(p.migrations);
        }
    }
    st.home_bound_migrations_per_process =
        sim.home_bound_moves as f64 / sim.home_bound_procs.max(1) as f64;
    let ticks: u64 = sim.hosts.iter().map(|h| h.ticks).sum();
    st.gossip_msgs_per_node_step = sim.gossip_msgs as f64 / ticks.max(1) as f64;
    let ns = sim.node_secs.max(1e-9);
    st.gossip_bytes_per_node_sec = sim.gossip_bytes as f64 / ns;
    st.control_msgs_per_node_sec = sim.control_msgs as f64 / ns;
    st.swim_msgs_per_node_sec = sim.swim_msgs as f64 / ns;
    st.info_age_secs = if sim.age_samples > 0 {
        sim.age_sum / sim.age_samples as f64
    } else {
        0.0
    };
    if cfg.policy.core_policy().is_some() {
        st.info_age_model_secs = super::model::mean_age_steps(initial.len(), cfg.params.window)
            * cfg.params.step.as_secs_f64();
    }
    st.load_imbalance = sim.imb_sum / sim.imb_samples.max(1) as f64;
    st.herd_events = sim.herds.len() as u64;
    st.herd_mean = if sim.herds.is_empty() {
        0.0
    } else {
        sim.herds.iter().map(|&h| f64::from(h)).sum::<f64>() / sim.herds.len() as f64
    };
    st.herd_max = sim.herds.iter().copied().max().unwrap_or(0);
    st.join_herd_max = join_herd_max;
    st.join_herd_cpus = join_herd_cpus;
    st.completed = sim.procs.iter().filter(|p| p.done).count() as u64;
    st.sim_secs = sim.now;
    st.events = events;
    let _ = MigrationReason::Balance;
    st
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::workload::{Job, NodeSpec, WorkloadKind};

    fn cfg(policy: SimPolicy, nodes: u32) -> SimConfig {
        SimConfig {
            spec: ScenarioSpec {
                kind: WorkloadKind::Exp,
                nodes,
                duration: 100.0,
                load: 0.5,
                mean_work: 10.0,
                pareto_ratio: 1000.0,
                home_bound: 0.0,
                uniform_arrivals: false,
                max_cpus: 8,
                seed: 1,
            },
            policy,
            params: Params::default(),
            swim: false,
            latency: 0.001,
            stats_every: 5.0,
            drain: 1000.0,
            herd_window: 5.0,
            sample_every: 10.0,
            thrash: 10.0,
            check_invariants: true,
        }
    }

    fn node(cpus: u32, speed: f64) -> NodeSpec {
        NodeSpec {
            cpus,
            speed,
            mem_mb: 4096,
            joins_at: 0.0,
        }
    }

    fn job(arrival: f64, home: u32, work: f64) -> Job {
        Job {
            arrival,
            home,
            work,
            mem_mb: 64,
            home_fraction: 0.0,
        }
    }

    #[test]
    fn staggered_jobs_finish_in_order_of_remaining_work() {
        // One CPU, speed 1: a long job (100) at t=0, a short one (1) at t=1. The short one
        // shares the CPU from 1 s and finishes at 3 s (slowdown 2); the long one at 101 s.
        let sc = Scenario {
            nodes: vec![node(1, 1.0), node(1, 1.0)],
            jobs: vec![job(0.0, 0, 100.0), job(1.0, 0, 1.0)],
        };
        let st = simulate(&cfg(SimPolicy::None, 2), &sc);
        assert_eq!(st.unfinished, 0);
        let expect = (2.0 + 101.0 / 100.0) / 2.0;
        assert!(
            (st.mean_slowdown - expect).abs() < 1e-3,
            "{}",
            st.mean_slowdown
        );
        assert!((st.sim_secs - 101.0).abs() < 1e-3, "{}", st.sim_secs);
    }

    #[test]
    fn processor_sharing_matches_hand_computation() {
        // Two jobs of 10 s on one CPU of speed 2, arriving together: both finish at 10 s,
        // each alone would take 5 s: slowdown 2.
        let sc = Scenario {
            nodes: vec![node(1, 2.0), node(1, 1.0)],
            jobs: vec![job(0.0, 0, 10.0), job(0.0, 0, 10.0)],
        };
        let st = simulate(&cfg(SimPolicy::None, 2), &sc);
        assert_eq!(st.unfinished, 0);
        assert!(
            (st.mean_slowdown - 2.0).abs() < 1e-3,
            "{}",
            st.mean_slowdown
        );
    }

    fn imbalanced(nodes: u32) -> Scenario {
        // Every process starts on node 0 (1 CPU); the other nodes are idle.
        Scenario {
            nodes: (0..nodes).map(|_| node(1, 1.0)).collect(),
            jobs: (0..40).map(|i| job(f64::from(i) * 0.5, 0, 20.0)).collect(),
        }
    }

    #[test]
    fn mosvm_spreads_a_pile_of_work_and_none_does_not() {
        let sc = imbalanced(8);
        let none = simulate(&cfg(SimPolicy::None, 8), &sc);
        let mosvm = simulate(&cfg(SimPolicy::Mosvm, 8), &sc);
        assert_eq!(none.migrations_per_process, 0.0);
        assert!(mosvm.migrations_per_process > 0.0);
        assert!(
            mosvm.mean_slowdown < 0.5 * none.mean_slowdown,
            "mosvm {} none {}",
            mosvm.mean_slowdown,
            none.mean_slowdown
        );
        assert_eq!(mosvm.invariant_violations, 0);
    }

    #[test]
    fn one_gossip_message_per_node_per_step() {
        let sc = imbalanced(16);
        let st = simulate(&cfg(SimPolicy::Mosvm, 16), &sc);
        assert_eq!(st.gossip_max_per_step, 1);
        assert!(
            (st.gossip_msgs_per_node_step - 1.0).abs() < 1e-9,
            "{}",
            st.gossip_msgs_per_node_step
        );
    }

    #[test]
    fn swim_membership_converges_and_carries_the_gossip() {
        let sc = imbalanced(6);
        let mut c = cfg(SimPolicy::Mosvm, 6);
        c.swim = true;
        let st = simulate(&c, &sc);
        assert!(st.swim_msgs_per_node_sec > 0.0);
        // Until SWIM has introduced the peers a node has no one to gossip to; after that,
        // exactly one message per step.
        assert_eq!(st.gossip_max_per_step, 1);
        assert!(
            st.gossip_msgs_per_node_step > 0.9,
            "{}",
            st.gossip_msgs_per_node_step
        );
        assert!(st.migrations_per_process > 0.0);
        assert_eq!(st.unfinished, 0);
    }

    #[test]
    fn same_seed_same_results() {
        let sc = imbalanced(8);
        let a = serde_json::to_string(&simulate(&cfg(SimPolicy::OppCost, 8), &sc)).unwrap();
        let b = serde_json::to_string(&simulate(&cfg(SimPolicy::OppCost, 8), &sc)).unwrap();
        assert_eq!(a, b);
    }
}
