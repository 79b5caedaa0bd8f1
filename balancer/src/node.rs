//! The per-node state machine: [`Node::handle`] turns one [`Input`] at time `now` into a list
//! of [`Action`]s. No I/O, no clock, no global randomness.

use crate::load::{normalised, Smoother};
use crate::membership::{MemberEvent, Membership, SwimTimer};
use crate::policy::{self, PolicyKind};
use crate::types::{LoadEntry, NodeId, Pid, Time};
use crate::window::Window;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub use crate::params::Params;

/// What a node is: its identity, capacity and policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This node's id.
    pub id: NodeId,
    /// CPU capacity in CPUs (a cgroup quota may make it fractional).
    pub cpus: f64,
    /// Relative CPU speed (from [`crate::load::calibration_work`] or the operator).
    pub speed: f64,
    /// Memory available to processes, MiB.
    pub mem_mb: u64,
    /// Which automatic policy runs.
    pub policy: PolicyKind,
    /// Parameters.
    pub params: Params,
    /// Run SWIM (foca) for membership; `None` means the caller reports membership with
    /// [`Input::NodeJoined`] / [`Input::NodeLeft`].
    pub swim: Option<SwimSettings>,
}

/// SWIM settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwimSettings {
    /// Expected cluster size (tunes suspicion timeouts).
    pub cluster_size: u32,
    /// Seed of foca's own random generator.
    pub seed: u64,
}

impl Config {
    /// A node with default parameters and the MOSIX policy, membership reported by the caller.
    pub fn new(id: NodeId, cpus: f64, speed: f64, mem_mb: u64) -> Config {
        Config {
            id,
            cpus: if cpus.is_finite() && cpus > 0.01 {
                cpus
            } else {
                0.01
            },
            speed: if speed.is_finite() && speed > 0.0 {
                speed
            } else {
                1.0
            },
            mem_mb,
            policy: PolicyKind::Mosix,
            params: Params::default(),
            swim: None,
        }
    }
}

/// Why a process is being moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationReason {
    /// Pairwise load balancing.
    Balance,
    /// Memory ushering (free memory below threshold): accepted by a target with room for it
    /// even against load balance.
    Usher,
    /// Opportunity-cost reassignment.
    OpportunityCost,
    /// An explicit request by the user; overrides policy and locks.
    Manual,
}

/// A process as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Cluster-wide process id.
    pub pid: Pid,
    /// Its home node (where its deputy lives).
    pub home: NodeId,
    /// Resident memory, MiB.
    pub mem_mb: u32,
    /// Age of the process when this input was made, milliseconds.
    pub age_ms: u64,
    /// CPU work consumed so far, in seconds on the reference (speed 1.0) CPU.
    pub cpu_work: f64,
    /// Locked against automatic migration (`mosvm lock`).
    pub locked: bool,
    /// Confined to its current node (for example by a CPU feature constraint).
    pub confined: bool,
    /// Decayed count of system calls that had to go home.
    pub home_syscalls: f64,
    /// Decayed count of system calls served where the process runs.
    pub local_syscalls: f64,
    /// It came here by migration (false: it started here). Only an arrival by migration
    /// holds it for [`Params::min_stay_secs`].
    pub migrated_in: bool,
}

impl ProcessInfo {
    /// A fresh, unconstrained process with no statistics.
    pub fn new(pid: Pid, home: NodeId, mem_mb: u32) -> ProcessInfo {
        ProcessInfo {
            pid,
            home,
            mem_mb,
            age_ms: 0,
            cpu_work: 0.0,
            locked: false,
            confined: false,
            home_syscalls: 0.0,
            local_syscalls: 0.0,
            migrated_in: false,
        }
    }

    /// Fraction of the process's system calls that go home (0 when unknown).
    pub fn home_fraction(&self) -> f64 {
        let t = self.home_syscalls + self.local_syscalls;
        if t > 0.0 {
            self.home_syscalls / t
        } else {
            0.0
        }
    }
}

/// An event fed to [`Node::handle`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// The periodic step: send one gossip message, expire old state, maybe migrate.
    Tick,
    /// A local measurement: runnable processes (run-queue length) and memory in use, MiB
    /// (may exceed total when overcommitted).
    LoadSample {
        /// Run-queue length: runnable threads, averaged over the sampling interval.
        runnable: f64,
        /// Memory in use, MiB.
        used_mem_mb: u64,
    },
    /// A gossip message: the sender's own entry followed by its window.
    Gossip {
        /// Sender.
        from: NodeId,
        /// Entries: the sender's own first, then its window.
        entries: Vec<LoadEntry>,
    },
    /// A process now runs here (started here, or arrived by migration).
    ProcessStarted(ProcessInfo),
    /// A process that ran here exited.
    ProcessEnded {
        /// The process.
        pid: Pid,
    },
    /// Fresh per-process statistics since the previous report.
    ProcessStats {
        /// The process.
        pid: Pid,
        /// Total CPU work so far (reference seconds).
        cpu_work: f64,
        /// System calls that went home since the last report.
        home_syscalls: u64,
        /// System calls served locally since the last report.
        local_syscalls: u64,
        /// Memory in use now, MiB, when measured (None: unchanged).
        #[serde(default)]
        mem_mb: Option<u32>,
    },
    /// The process called execve: its statistics are cleared.
    ProcessExec {
        /// The process.
        pid: Pid,
    },
    /// Lock or unlock a process against automatic migration.
    SetLock {
        /// The process.
        pid: Pid,
        /// New state.
        locked: bool,
    },
    /// A user asked to move a process: overrides the policy and any lock.
    ManualMigrate {
        /// The process.
        pid: Pid,
        /// Destination.
        to: NodeId,
    },
    /// Another node asks whether it may send us a process.
    MigrationRequest {
        /// Requesting node.
        from: NodeId,
        /// The process.
        pid: Pid,
        /// Its memory, MiB.
        mem_mb: u32,
        /// The CPU rate the process gets at the requester now, in reference CPUs (1.0: a whole
        /// CPU of speed 1.0), counting the processes already leaving there as gone.
        from_rate: f32,
        /// Why.
        reason: MigrationReason,
    },
    /// The answer to our [`Action::SendMigrationRequest`].
    MigrationReply {
        /// The node that answered.
        from: NodeId,
        /// The process.
        pid: Pid,
        /// Whether it will take it.
        accepted: bool,
    },
    /// A migration we started completed: the process now runs on `to`.
    MigrationDone {
        /// The process.
        pid: Pid,
        /// Where it went.
        to: NodeId,
    },
    /// A migration we started failed: the process still runs here.
    MigrationFailed {
        /// The process.
        pid: Pid,
        /// The intended destination.
        to: NodeId,
    },
    /// A node joined (when membership is reported by the caller).
    NodeJoined {
        /// The node.
        node: NodeId,
    },
    /// A node left or died (when membership is reported by the caller).
    NodeLeft {
        /// The node.
        node: NodeId,
    },
    /// A SWIM packet.
    Swim {
        /// Sender.
        from: NodeId,
        /// Packet.
        data: Vec<u8>,
    },
    /// A SWIM timer fired.
    SwimTimer(SwimTimer),
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Send a gossip message (own entry first, then the window) to `to`.
    SendGossip {
        /// Destination.
        to: NodeId,
        /// Entries.
        entries: Vec<LoadEntry>,
    },
    /// Ask `to` whether it will take `pid` (delivered there as [`Input::MigrationRequest`]).
    SendMigrationRequest {
        /// Destination.
        to: NodeId,
        /// The process.
        pid: Pid,
        /// Its memory, MiB.
        mem_mb: u32,
        /// The CPU rate the process gets here now, in reference CPUs (see
        /// [`Input::MigrationRequest`]).
        from_rate: f32,
        /// Why.
        reason: MigrationReason,
    },
    /// Answer a migration request (delivered as [`Input::MigrationReply`]).
    SendMigrationReply {
        /// The requester.
        to: NodeId,
        /// The process.
        pid: Pid,
        /// Whether we take it.
        accepted: bool,
    },
    /// Migrate `pid` to `to` now; report the outcome with [`Input::MigrationDone`] or
    /// [`Input::MigrationFailed`].
    Migrate {
        /// The process.
        pid: Pid,
        /// Destination.
        to: NodeId,
        /// Why.
        reason: MigrationReason,
    },
    /// Send a SWIM packet.
    SendSwim {
        /// Destination.
        to: NodeId,
        /// Packet.
        data: Vec<u8>,
    },
    /// Hand `timer` back as [`Input::SwimTimer`] after `after`.
    ScheduleSwim {
        /// Delay.
        after: Time,
        /// Timer.
        timer: SwimTimer,
    },
    /// SWIM reports `node` alive (informational).
    MemberUp {
        /// The node.
        node: NodeId,
    },
    /// SWIM reports `node` gone (informational).
    MemberDown {
        /// The node.
        node: NodeId,
    },
}

/// A process resident on this node, as tracked by the balancer.
#[derive(Clone, Debug, PartialEq)]
pub struct Resident {
    /// What we know of it.
    pub info: ProcessInfo,
    /// Local time of the last update of `info.age_ms` and the statistics.
    pub updated: Time,
    /// A migration request is outstanding: (target, deadline).
    pub pending: Option<(NodeId, Time)>,
    /// Why the outstanding request was made (the move it leads to is for that reason).
    pub pending_reason: MigrationReason,
    /// A migration is in progress.
    pub migrating: bool,
    /// Local time it arrived here by migration (`None`: it started here).
    pub arrived: Option<Time>,
}

impl Resident {
    /// Age at `now`, seconds.
    pub fn age_secs(&self, now: Time) -> f64 {
        self.info.age_ms as f64 / 1000.0 + now.since(self.updated).as_secs_f64()
    }

    /// True when automatic policy may move it.
    pub fn movable(&self) -> bool {
        !self.info.locked && !self.info.confined && self.pending.is_none() && !self.migrating
    }
}

/// One node's balancer state.
#[derive(Debug)]
pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) window: Window,
    pub(crate) smoother: Smoother,
    pub(crate) runnable: f64,
    pub(crate) used_mem_mb: u64,
    pub(crate) sampled: bool,
    pub(crate) procs: BTreeMap<Pid, Resident>,
    pub(crate) peers: Arc<Vec<NodeId>>,
    /// Promises made to requesters: pid -> (mem, expiry).
    pub(crate) promises: BTreeMap<Pid, (u32, Time)>,
    /// Targets that refused us recently: node -> until.
    pub(crate) refused: BTreeMap<NodeId, Time>,
    /// Where the gossip target walk stands.
    pub(crate) walk: crate::walk::PeerWalk,
    /// Targets left to a more starved node: node -> since when.
    pub(crate) deferring: BTreeMap<NodeId, Time>,
    pub(crate) swim: Option<Membership>,
}

impl Node {
    /// A node from its configuration.
    pub fn new(cfg: Config) -> Node {
        let swim = cfg
            .swim
            .as_ref()
            .map(|s| Membership::new(cfg.id, s.cluster_size, s.seed));
        Node {
            window: Window::new(cfg.params.window),
            smoother: Smoother::new(cfg.params.smooth_rise, cfg.params.smooth_fall),
            runnable: 0.0,
            used_mem_mb: 0,
            sampled: false,
            procs: BTreeMap::new(),
            peers: Arc::new(Vec::new()),
            promises: BTreeMap::new(),
            refused: BTreeMap::new(),
            deferring: BTreeMap::new(),
            walk: Default::default(),
            swim,
            cfg,
        }
    }

    /// This node's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Change what this node offers (CPU capacity in CPUs, relative speed, memory MiB): the
    /// operator set a new speed (`mosvm ctl speed`), or the node's cgroup limits changed.
    /// Values that make no sense are ignored.
    pub fn set_capacity(&mut self, cpus: f64, speed: f64, mem_mb: u64) {
        if cpus.is_finite() && cpus > 0.0 {
            self.cfg.cpus = cpus.max(0.01);
        }
        if speed.is_finite() && speed > 0.0 {
            self.cfg.speed = speed;
        }
        self.cfg.mem_mb = mem_mb;
    }

    /// The information window.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// Processes resident here.
    pub fn processes(&self) -> impl Iterator<Item = &Resident> {
        self.procs.values()
    }

    /// Known peers (alive members other than this node).
    pub fn peers(&self) -> &[NodeId] {
        &self.peers
    }

    /// Run-queue length: the latest sample, or the number of resident processes before any.
    pub fn runnable(&self) -> f64 {
        if self.sampled {
            self.runnable
        } else {
            self.procs.values().filter(|p| !p.migrating).count() as f64
        }
    }

    /// Memory in use, MiB.
    pub fn used_mem_mb(&self) -> u64 {
        if self.sampled {
            self.used_mem_mb
        } else {
            self.procs.values().map(|p| u64::from(p.info.mem_mb)).sum()
        }
    }

    /// Processes (count, memory MiB) that are on their way out: a request is outstanding or a
    /// migration is in progress.
    pub fn leaving(&self) -> (f64, u64) {
        let mut n = 0.0;
        let mut mem = 0;
        for p in self.procs.values() {
            if p.pending.is_some() || p.migrating {
                n += 1.0;
                mem += u64::from(p.info.mem_mb);
            }
        }
        (n, mem)
    }

    /// Run-queue length once the leaving processes are gone.
    pub fn runnable_after_leaving(&self) -> f64 {
        (self.runnable() - self.leaving().0).max(0.0)
    }

    /// Memory in use once the leaving processes are gone, MiB.
    pub fn used_mem_after_leaving(&self) -> u64 {
        self.used_mem_mb().saturating_sub(self.leaving().1)
    }

    /// Free memory, MiB, after what we promised to requesters.
    pub fn free_mem_mb(&self) -> u64 {
        let promised: u64 = self.promises.values().map(|(m, _)| u64::from(*m)).sum();
        self.cfg
            .mem_mb
            .saturating_sub(self.used_mem_mb())
            .saturating_sub(promised)
    }

    /// Instantaneous normalised load (runnable / capacity).
    pub fn load_now(&self) -> f64 {
        normalised(self.runnable(), self.cfg.cpus, self.cfg.speed)
    }

    /// The entry this node advertises at `now`.
    pub fn own_entry(&self) -> LoadEntry {
        LoadEntry {
            node: self.cfg.id,
            load: self.smoother.value as f32,
            cpus: self.cfg.cpus as f32,
            speed: self.cfg.speed as f32,
            free_mem_mb: self.free_mem_mb().min(u64::from(u32::MAX)) as u32,
            total_mem_mb: self.cfg.mem_mb.min(u64::from(u32::MAX)) as u32,
            age_ms: 0,
        }
    }

    /// Start: with SWIM, join the cluster through `known` (if any).
    pub fn start(&mut self, known: Option<NodeId>) -> Vec<Action> {
        let mut out = Vec::new();
        if let (Some(m), Some(k)) = (self.swim.as_mut(), known) {
            if k != self.cfg.id {
                let evs = m.join(k);
                self.apply_member_events(evs, &mut out);
            }
        }
        out
    }

    /// Leave the cluster gracefully (SWIM announces it).
    pub fn leave(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(m) = self.swim.as_mut() {
            let evs = m.leave();
            self.apply_member_events(evs, &mut out);
        }
        out
    }

    /// Feed one input at time `now`; returns the actions to carry out, in order.
    pub fn handle(&mut self, input: Input, now: Time, rng: &mut impl Rng) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick => self.tick(now, rng, &mut out),
            Input::LoadSample {
                runnable,
                used_mem_mb,
            } => {
                self.sampled = true;
                self.runnable = if runnable.is_finite() {
                    runnable.max(0.0)
                } else {
                    0.0
                };
                self.used_mem_mb = used_mem_mb;
                self.smoother.sample(self.load_now());
            }
            Input::Gossip { entries, .. } => self.window.merge(self.cfg.id, &entries, now),
            Input::ProcessStarted(info) => {
                self.promises.remove(&info.pid);
                let arrived = info.migrated_in.then_some(now);
                self.procs.insert(
                    info.pid,
                    Resident {
                        info,
                        updated: now,
                        pending: None,
                        pending_reason: MigrationReason::Balance,
                        arrived,
                        migrating: false,
                    },
                );
            }
            Input::ProcessEnded { pid } => self.departed(pid),
            Input::ProcessStats {
                pid,
                cpu_work,
                home_syscalls,
                local_syscalls,
                mem_mb,
            } => {
                let half = self.cfg.params.stats_half_life_secs;
                if let Some(p) = self.procs.get_mut(&pid) {
                    let dt = now.since(p.updated).as_secs_f64();
                    let decay = if half > 0.0 {
                        0.5f64.powf(dt / half)
                    } else {
                        0.0
                    };
                    p.info.age_ms += now.since(p.updated).0 / 1000;
                    p.updated = now;
                    p.info.cpu_work = cpu_work.max(0.0);
                    if let Some(m) = mem_mb {
                        p.info.mem_mb = m;
                    }
                    p.info.home_syscalls = p.info.home_syscalls * decay + home_syscalls as f64;
                    p.info.local_syscalls = p.info.local_syscalls * decay + local_syscalls as f64;
                }
            }
            Input::ProcessExec { pid } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.info.home_syscalls = 0.0;
                    p.info.local_syscalls = 0.0;
                    p.info.cpu_work = 0.0;
                    p.info.age_ms = 0;
                    p.updated = now;
                }
            }
            Input::SetLock { pid, locked } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.info.locked = locked;
                }
            }
            Input::ManualMigrate { pid, to } => {
                if to != self.cfg.id {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        if !p.migrating {
                            p.migrating = true;
                            p.pending = None;
                            out.push(Action::Migrate {
                                pid,
                                to,
                                reason: MigrationReason::Manual,
                            });
                        }
                    }
                }
            }
            Input::MigrationRequest {
                from,
                pid,
                mem_mb,
                from_rate,
                reason,
            } => {
                // A request claiming to come from ourselves is malformed: ignore it.
                if from != self.cfg.id {
                    let accepted = self.would_accept(mem_mb, from_rate, reason);
                    if accepted {
                        self.promises
                            .insert(pid, (mem_mb, now.plus(self.cfg.params.promise_ttl)));
                    }
                    out.push(Action::SendMigrationReply {
                        to: from,
                        pid,
                        accepted,
                    });
                }
            }
            Input::MigrationReply {
                from,
                pid,
                accepted,
            } => {
                let mut go = None;
                if let Some(p) = self.procs.get_mut(&pid) {
                    if let Some((target, _)) = p.pending {
                        if target == from {
                            p.pending = None;
                            if accepted && !p.migrating && !p.info.locked && !p.info.confined {
                                p.migrating = true;
                                go = Some((target, p.pending_reason));
                            }
                        }
                    }
                }
                match go {
                    Some((to, reason)) => out.push(Action::Migrate { pid, to, reason }),
                    None if !accepted => {
                        self.refused
                            .insert(from, now.plus(self.cfg.params.refuse_backoff));
                    }
                    None => {}
                }
            }
            Input::MigrationDone { pid, .. } => self.departed(pid),
            Input::MigrationFailed { pid, to } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.migrating = false;
                }
                // The process stays here; that target is avoided for a while.
                self.refused
                    .insert(to, now.plus(self.cfg.params.refuse_backoff));
            }
            Input::NodeJoined { node } => self.add_peer(node),
            Input::NodeLeft { node } => self.remove_peer(node),
            Input::Swim { data, .. } => {
                if let Some(m) = self.swim.as_mut() {
                    let evs = m.handle_data(&data);
                    self.apply_member_events(evs, &mut out);
                }
            }
            Input::SwimTimer(t) => {
                if let Some(m) = self.swim.as_mut() {
                    let evs = m.handle_timer(t);
                    self.apply_member_events(evs, &mut out);
                }
            }
        }
        out
    }

    /// A process that ran here ended or left. It stops counting at once: the load drops by
    /// one process now instead of at the smoother's slow fall. The smoother damps noise in
    /// the samples; a departure is a known fact, and a target still checks its own load and
    /// promises before it accepts work ([`Node::would_accept`]), so a node that just emptied
    /// does not draw a herd.
    fn departed(&mut self, pid: Pid) {
        if self.procs.remove(&pid).is_none() {
            return;
        }
        if self.sampled {
            self.runnable = (self.runnable - 1.0).max(0.0);
        }
        let one = normalised(1.0, self.cfg.cpus, self.cfg.speed);
        self.smoother.value = (self.smoother.value - one).max(0.0);
    }

    /// True when free memory (counting processes already leaving as gone) is below the
    /// ushering threshold.
    pub fn under_memory_pressure(&self) -> bool {
        let total = self.cfg.mem_mb as f64;
        (total - self.used_mem_after_leaving() as f64) < total * self.cfg.params.usher_free_frac
    }

    /// Whether we would take a process of `mem_mb` that runs at `from_rate` reference CPUs
    /// where it is. Memory must fit (after earlier promises); for load balancing, the process
    /// must still run clearly faster here (by [`Params::min_rate_gain`], the requester's own
    /// rule) counting what runs here now, every process promised, and it. The requester
    /// decided on gossip that may be seconds old; this check on fresh numbers is what stops a
    /// herd of nodes from all sending work to a node that just became idle, and a move that
    /// would only swap the imbalance.
    pub fn would_accept(&self, mem_mb: u32, from_rate: f32, reason: MigrationReason) -> bool {
        if reason == MigrationReason::Manual {
            return true;
        }
        let free = self.free_mem_mb() as f64;
        let reserve = self.cfg.mem_mb as f64 * self.cfg.params.usher_free_frac;
        if free < f64::from(mem_mb) + reserve {
            return false;
        }
        if reason == MigrationReason::Usher || !self.cfg.params.refuse_when_busy {
            return true;
        }
        let here = policy::rate_with(
            self.runnable() + self.promises.len() as f64 + 1.0,
            self.cfg.cpus,
            self.cfg.speed,
        );
        here > f64::from(from_rate) * (1.0 + self.cfg.params.min_rate_gain)
    }

    /// Replace the peer list by one shared with other nodes (a static configuration, or the
    /// simulator's membership oracle): avoids one copy of a large membership per node.
    /// Entries equal to this node's id are never chosen as gossip targets.
    pub fn set_shared_peers(&mut self, peers: Arc<Vec<NodeId>>) {
        self.peers = peers;
    }

    fn add_peer(&mut self, node: NodeId) {
        if node != self.cfg.id && !self.peers.contains(&node) {
            Arc::make_mut(&mut self.peers).push(node);
        }
    }

    fn remove_peer(&mut self, node: NodeId) {
        if let Some(i) = self.peers.iter().position(|&p| p == node) {
            Arc::make_mut(&mut self.peers).swap_remove(i);
        }
        self.window.remove(node);
    }

    fn apply_member_events(&mut self, evs: Vec<MemberEvent>, out: &mut Vec<Action>) {
        for e in evs {
            match e {
                MemberEvent::Send { to, data } => out.push(Action::SendSwim { to, data }),
                MemberEvent::Schedule { after, timer } => {
                    out.push(Action::ScheduleSwim { after, timer })
                }
                MemberEvent::Up(node) => {
                    self.add_peer(node);
                    out.push(Action::MemberUp { node });
                }
                MemberEvent::Down(node) => {
                    self.remove_peer(node);
                    out.push(Action::MemberDown { node });
                }
            }
        }
    }

    /// The next gossip target: the peers in a random cyclic order ([`PeerWalk`]), so that
    /// each hears from this node once every `peers` steps instead of after a run of bad luck.
    fn random_peer(&mut self, rng: &mut impl Rng) -> Option<NodeId> {
        let n = self.peers.len();
        if n == 0 || (n == 1 && self.peers[0] == self.cfg.id) {
            return None;
        }
        // A shared list may include this node: step past it.
        for _ in 0..2 {
            let to = self.peers[self.walk.next(n, rng)];
            if to != self.cfg.id {
                return Some(to);
            }
        }
        self.peers.iter().copied().find(|&p| p != self.cfg.id)
    }

    /// Which targets this node leaves to a more starved node this step
    /// ([`Params::defer_steps`](crate::Params::defer_steps)): a target is deferred from the
    /// step a rival for it appears until the rival is gone.
    fn update_deferrals(&mut self, now: Time) {
        if self.cfg.params.defer_steps == 0 || self.cfg.policy != PolicyKind::Mosix {
            self.deferring.clear();
            return;
        }
        // Targets that would make this node's processes clearly faster, each with a more
        // starved node it would also help.
        let helpful: BTreeMap<NodeId, Option<NodeId>> = policy::candidates(self, now)
            .filter(|t| policy::helps(self, t))
            .map(|t| (t.node, policy::starved_rival(self, t, now)))
            .collect();
        let rivals: std::collections::BTreeSet<NodeId> =
            helpful.values().flatten().copied().collect();
        // Enough targets for every rival and this node: nobody needs to wait.
        if rivals.len() < helpful.len() {
            self.deferring.clear();
            return;
        }
        self.deferring
            .retain(|n, _| helpful.get(n).is_some_and(|r| r.is_some()));
        for (n, rival) in helpful {
            if rival.is_some() {
                self.deferring.entry(n).or_insert(now);
            }
        }
    }

    fn tick(&mut self, now: Time, rng: &mut impl Rng, out: &mut Vec<Action>) {
        let p = &self.cfg.params;
        self.window.expire(now, p.expire);
        self.promises.retain(|_, (_, until)| *until > now);
        self.refused.retain(|_, until| *until > now);
        for r in self.procs.values_mut() {
            if let Some((_, deadline)) = r.pending {
                if deadline <= now {
                    r.pending = None;
                }
            }
        }
        if !self.sampled {
            let x = self.load_now();
            self.smoother.sample(x);
        }
        // Dissemination: exactly one message, to one random peer.
        if let Some(to) = self.random_peer(rng) {
            let mut entries = Vec::with_capacity(self.cfg.params.window + 1);
            entries.push(self.own_entry());
            entries.extend(self.window.freshest(now, self.cfg.params.window));
            out.push(Action::SendGossip { to, entries });
        }
        self.update_deferrals(now);
        // Policy: a few requests per step at most; each sees the earlier ones.
        for _ in 0..self.cfg.params.max_requests_per_step {
            let Some(d) = policy::decide(self, now) else {
                break;
            };
            let ttl = self.cfg.params.promise_ttl;
            let from_rate = policy::rate_with(
                self.runnable_after_leaving().max(1.0),
                self.cfg.cpus,
                self.cfg.speed,
            ) as f32;
            if let Some(r) = self.procs.get_mut(&d.pid) {
                r.pending = Some((d.to, now.plus(ttl)));
                r.pending_reason = d.reason;
            }
            // Account the promised work locally so the next decision sees it.
            if let Some(h) = self.window.get_mut(d.to) {
                let cap = h.entry.capacity();
                h.entry.load += (1.0 / cap) as f32;
                h.entry.free_mem_mb = h.entry.free_mem_mb.saturating_sub(d.mem_mb);
            }
            out.push(Action::SendMigrationRequest {
                to: d.to,
                pid: d.pid,
                mem_mb: d.mem_mb,
                from_rate,
                reason: d.reason,
            });
        }
    }
}
