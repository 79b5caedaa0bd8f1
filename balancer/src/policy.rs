//! The decision rules: pairwise MOSIX load balancing, memory ushering, and the
//! opportunity-cost policy of Amir, Averbuch, Barak, Borgstrom and Keren.
//!
//! Every rule is a pure function of a node's state; [`decide`] returns at most one move per
//! step, which the node then negotiates with the target (the target may refuse).

use crate::node::{MigrationReason, Node, Resident};
use crate::types::{LoadEntry, NodeId, Pid, Time};
use serde::{Deserialize, Serialize};

/// Which automatic policy a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyKind {
    /// No automatic migration (dissemination still runs; manual requests still work).
    None,
    /// MOSIX: pairwise load balancing by expected completion time, plus memory ushering.
    Mosix,
    /// Opportunity cost: each resource costs exponentially in its utilisation; a process moves
    /// where the marginal cost rises least.
    OpportunityCost,
}

impl PolicyKind {
    /// Every policy, in the order `mosvm node --policy` lists them.
    pub const ALL: [PolicyKind; 3] = [
        PolicyKind::Mosix,
        PolicyKind::OpportunityCost,
        PolicyKind::None,
    ];

    /// The name `mosvm node --policy` and `mosvm ctl status` give it.
    pub fn flag_name(self) -> &'static str {
        match self {
            PolicyKind::Mosix => "mosix",
            PolicyKind::OpportunityCost => "opportunity-cost",
            PolicyKind::None => "off",
        }
    }

    /// The policy of a [`PolicyKind::flag_name`].
    pub fn from_flag_name(name: &str) -> Option<PolicyKind> {
        PolicyKind::ALL.into_iter().find(|p| p.flag_name() == name)
    }
}

/// A move chosen by the policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The process.
    pub pid: Pid,
    /// The target.
    pub to: NodeId,
    /// Its memory, MiB.
    pub mem_mb: u32,
    /// Why.
    pub reason: MigrationReason,
}

/// Expected CPU rate (reference-seconds of work per second) of one more process on a node
/// with `runnable` processes already, `cpus` CPUs of relative speed `speed`.
pub fn rate_with(runnable: f64, cpus: f64, speed: f64) -> f64 {
    speed * (cpus / runnable.max(1.0)).min(1.0)
}

/// Multiplier on a process's rate when it runs on `node`: processes whose system calls
/// mostly go home run slower away from home.
pub fn io_factor(r: &Resident, node: NodeId, io_penalty: f64) -> f64 {
    if node == r.info.home {
        1.0
    } else {
        1.0 / (1.0 + io_penalty * r.info.home_fraction())
    }
}

/// Cost in seconds of moving a process of `mem_mb`: fixed + memory / bandwidth.
pub fn migration_cost_secs(node: &Node, mem_mb: u32) -> f64 {
    let p = &node.cfg.params;
    p.migration_fixed_secs + f64::from(mem_mb) / p.migration_mb_per_sec.max(1e-6)
}

/// Expected remaining CPU work of a process: by Harchol-Balter and Downey, a process that has
/// used `t` seconds of CPU is expected to use about `t` more.
pub fn expected_remaining_work(r: &Resident, now: Time, rate_here: f64) -> f64 {
    if r.info.cpu_work > 0.0 {
        r.info.cpu_work
    } else {
        r.age_secs(now) * rate_here
    }
}

pub(crate) fn candidates<'a>(
    node: &'a Node,
    now: Time,
) -> impl Iterator<Item = &'a LoadEntry> + 'a {
    let max_ms = node.cfg.params.expire.0 / 1000;
    node.window
        .iter()
        .filter(move |h| {
            h.entry.node != node.cfg.id
                && h.age_ms(now) <= max_ms
                && !node.refused.contains_key(&h.entry.node)
        })
        .map(|h| &h.entry)
}

fn movable<'a>(node: &'a Node, now: Time) -> impl Iterator<Item = &'a Resident> + 'a {
    let min_age = node.cfg.params.min_age_secs;
    let min_stay = node.cfg.params.min_stay_secs;
    node.procs.values().filter(move |r| {
        r.movable()
            && r.age_secs(now) >= min_age
            && r.arrived
                .is_none_or(|a| now.since(a).as_secs_f64() >= min_stay)
    })
}

/// The policy's choice for this step, if any.
pub fn decide(node: &Node, now: Time) -> Option<Decision> {
    match node.cfg.policy {
        PolicyKind::None => None,
        PolicyKind::Mosix => {
            if node.under_memory_pressure() {
                usher(node, now).or_else(|| balance(node, now))
            } else {
                balance(node, now)
            }
        }
        PolicyKind::OpportunityCost => {
            if node.under_memory_pressure() {
                usher(node, now).or_else(|| opportunity_cost_choice(node, now))
            } else {
                opportunity_cost_choice(node, now)
            }
        }
    }
}

/// Pairwise load balancing: move the process and target with the largest expected saving of
/// completion time, provided the target's rate is clearly better and the saving exceeds the
/// cost of the move by `cost_factor`.
pub fn balance(node: &Node, now: Time) -> Option<Decision> {
    let p = &node.cfg.params;
    let mut best: Option<(f64, Decision)> = None;
    for t in candidates(node, now) {
        let (base_here, base_there) = base_rates(node, t);
        if base_there <= base_here * (1.0 + p.min_rate_gain) || deferred(node, t.node, now) {
            continue;
        }
        let room = f64::from(t.free_mem_mb) - f64::from(t.total_mem_mb) * p.usher_free_frac;
        for r in movable(node, now) {
            if f64::from(r.info.mem_mb) > room {
                continue;
            }
            let here = base_here * io_factor(r, node.cfg.id, p.io_penalty);
            let there = base_there * io_factor(r, t.node, p.io_penalty);
            if there <= here * (1.0 + p.min_rate_gain) {
                continue;
            }
            let work = expected_remaining_work(r, now, here);
            let cost = migration_cost_secs(node, r.info.mem_mb);
            let gain = work / here - (work / there + cost);
            if gain > p.cost_factor * cost && best.is_none_or(|(g, _)| gain > g) {
                best = Some((
                    gain,
                    Decision {
                        pid: r.info.pid,
                        to: t.node,
                        mem_mb: r.info.mem_mb,
                        reason: MigrationReason::Balance,
                    },
                ));
            }
        }
    }
    best.map(|(_, d)| d)
}

/// True when one more process on `t` would run clearly (`min_rate_gain`) faster than
/// `node`'s processes do once its outstanding moves are done (the first test of [`balance`]).
pub fn helps(node: &Node, t: &LoadEntry) -> bool {
    let (here, there) = base_rates(node, t);
    there > here * (1.0 + node.cfg.params.min_rate_gain)
}

/// The CPU rate a process gets on `node` once its outstanding moves are done, and the rate
/// one more process would get on `t` (before the home-calls factor).
fn base_rates(node: &Node, t: &LoadEntry) -> (f64, f64) {
    let here = rate_with(
        node.runnable_after_leaving().max(1.0),
        node.cfg.cpus,
        node.cfg.speed,
    );
    let there = rate_with(t.runnable() + 1.0, f64::from(t.cpus), f64::from(t.speed));
    (here, there)
}

/// True while `node` leaves target `to` to a more starved node ([`starved_rival`]), for at
/// most `defer_steps` steps.
fn deferred(node: &Node, to: NodeId, now: Time) -> bool {
    let p = &node.cfg.params;
    let limit = Time(p.step.0.saturating_mul(u64::from(p.defer_steps)));
    node.deferring
        .get(&to)
        .is_some_and(|since| now.since(*since) < limit)
}

/// How much slower a rival's processes must run than ours for [`starved_rival`] to count it:
/// a margin above the noise of gossiped loads, so two nodes never defer to each other.
pub const RIVAL_MARGIN: f64 = 0.1;

/// Another node that target `t` would help more than it helps `node`: its processes run
/// clearly ([`RIVAL_MARGIN`]) slower than `node`'s would once its outstanding moves are done,
/// and one more process on `t` would run clearly (`min_rate_gain`) faster than they do. Only entries younger than two
/// steps count. MOSIX's pairwise rule lets whichever sender hears of an idle node first fill
/// it; when a slower node also knows of it, waiting for that node finishes the jobs sooner.
pub fn starved_rival(node: &Node, t: &LoadEntry, now: Time) -> Option<NodeId> {
    let p = &node.cfg.params;
    let (here, there) = base_rates(node, t);
    let fresh = 2 * p.step.0 / 1000;
    node.window
        .iter()
        .filter(|h| h.entry.node != node.cfg.id && h.entry.node != t.node)
        .filter(|h| h.age_ms(now) <= fresh)
        .map(|h| &h.entry)
        .find(|r| {
            let rate = rate_with(r.runnable().max(1.0), f64::from(r.cpus), f64::from(r.speed));
            rate * (1.0 + RIVAL_MARGIN) < here && there > rate * (1.0 + p.min_rate_gain)
        })
        .map(|r| r.node)
}

/// Memory ushering: free memory is below the threshold, so move a process to a node with room
/// for it, even against load balance. Prefers the smallest process that relieves the pressure
/// on its own (else the largest), and among targets with room, the least loaded.
pub fn usher(node: &Node, now: Time) -> Option<Decision> {
    let p = &node.cfg.params;
    let total = node.cfg.mem_mb as f64;
    let need = node.used_mem_after_leaving() as f64 - total * (1.0 - p.usher_free_frac);
    let mut best: Option<((bool, f64, f64), Decision)> = None;
    for r in movable(node, now) {
        let m = f64::from(r.info.mem_mb);
        if m <= 0.0 {
            continue;
        }
        for t in candidates(node, now) {
            let room = f64::from(t.free_mem_mb) - f64::from(t.total_mem_mb) * p.usher_free_frac;
            if m > room {
                continue;
            }
            let covers = m >= need;
            // Key: covering beats not covering; then smaller (covering) or larger (not) size;
            // then lower target load.
            let size_key = if covers { -m } else { m };
            let key = (covers, size_key, -f64::from(t.load));
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((
                    key,
                    Decision {
                        pid: r.info.pid,
                        to: t.node,
                        mem_mb: r.info.mem_mb,
                        reason: MigrationReason::Usher,
                    },
                ));
            }
        }
    }
    best.map(|(_, d)| d)
}

/// Opportunity cost of a node: Σ over resources of β^utilisation (CPU and memory).
pub fn opportunity_cost(beta: f64, cpu_util: f64, mem_util: f64) -> f64 {
    beta.powf(cpu_util) + beta.powf(mem_util)
}

/// Opportunity-cost reassignment: move the process whose removal here saves more marginal cost
/// than adding it to a target costs there (by at least `oc_margin`), and whose expected
/// remaining work justifies the move.
pub fn opportunity_cost_choice(node: &Node, now: Time) -> Option<Decision> {
    let p = &node.cfg.params;
    let beta = (2.0 * (node.peers.len() as f64 + 1.0)).clamp(4.0, 1024.0);
    let cap = node.cfg.cpus * node.cfg.speed;
    let n = node.runnable_after_leaving().max(1.0);
    let total = (node.cfg.mem_mb as f64).max(1.0);
    let used = node.used_mem_after_leaving() as f64;
    let full = p.oc_full_load.max(1e-3);
    let cost_here = opportunity_cost(beta, n / cap / full, used / total);
    let base_here = rate_with(n, node.cfg.cpus, node.cfg.speed);
    let mut best: Option<(f64, Decision)> = None;
    for t in candidates(node, now) {
        let tcap = t.capacity();
        let tn = t.runnable();
        let ttotal = f64::from(t.total_mem_mb).max(1.0);
        let tused = ttotal - f64::from(t.free_mem_mb);
        let cost_there = opportunity_cost(beta, tn / tcap / full, tused / ttotal);
        let base_there = rate_with(tn + 1.0, f64::from(t.cpus), f64::from(t.speed));
        for r in movable(node, now) {
            let m = f64::from(r.info.mem_mb);
            if m > f64::from(t.free_mem_mb) {
                continue;
            }
            let here_io = io_factor(r, node.cfg.id, p.io_penalty);
            let there_io = io_factor(r, t.node, p.io_penalty);
            let saved =
                cost_here - opportunity_cost(beta, (n - 1.0) / cap / full, (used - m) / total);
            // A process that runs slower there occupies the CPU longer: charge it accordingly.
            let added = opportunity_cost(
                beta,
                (tn + 1.0 / there_io) / tcap / full,
                (tused + m) / ttotal,
            ) - cost_there;
            let net = saved - added;
            if net <= p.oc_margin * saved {
                continue;
            }
            let here = base_here * here_io;
            let there = base_there * there_io;
            let work = expected_remaining_work(r, now, here);
            let cost = migration_cost_secs(node, r.info.mem_mb);
            if work / there.max(1e-9) < p.cost_factor * cost {
                continue;
            }
            let score = net / saved.max(1e-12);
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((
                    score,
                    Decision {
                        pid: r.info.pid,
                        to: t.node,
                        mem_mb: r.info.mem_mb,
                        reason: MigrationReason::OpportunityCost,
                    },
                ));
            }
        }
    }
    best.map(|(_, d)| d)
}
