//! Tunable parameters of the per-node state machine ([`crate::Node`]).

use crate::types::Time;
use serde::{Deserialize, Serialize};

/// Tunable parameters of dissemination and the policies. [`Params::default`] holds the values
/// the simulator was tuned with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Gossip and decision period.
    pub step: Time,
    /// Window size `w`: entries held about other nodes and sent with each gossip message
    /// (besides the sender's own entry).
    pub window: usize,
    /// Entries older than this are dropped.
    pub expire: Time,
    /// Load smoothing weight for rising samples.
    pub smooth_rise: f64,
    /// Load smoothing weight for falling samples.
    pub smooth_fall: f64,
    /// Fixed cost of a migration, seconds (freeze, VM set-up, handshake).
    pub migration_fixed_secs: f64,
    /// Bandwidth available to a migration, MiB/s (the variable cost is memory / bandwidth).
    pub migration_mb_per_sec: f64,
    /// A move must raise the process's expected CPU rate by at least this fraction.
    pub min_rate_gain: f64,
    /// The expected time saved must exceed this many times the migration cost.
    pub cost_factor: f64,
    /// Processes younger than this (seconds of age) are not moved automatically.
    pub min_age_secs: f64,
    /// A process that arrived less than this many seconds ago is not moved on automatically
    /// (a real move takes time to show in the load of both ends).
    pub min_stay_secs: f64,
    /// Memory ushering starts when free memory falls below this fraction of total.
    pub usher_free_frac: f64,
    /// How long a target holds a promise, and a source waits for a reply.
    pub promise_ttl: Time,
    /// After a refusal, do not ask the same target again for this long.
    pub refuse_backoff: Time,
    /// Expected slowdown of a process running away from home, per unit of the fraction of its
    /// system calls that go home: rate away = rate / (1 + io_penalty × home_fraction).
    pub io_penalty: f64,
    /// Half-life of per-process statistics, seconds.
    pub stats_half_life_secs: f64,
    /// A target refuses balancing requests that would leave it no less loaded than the
    /// requester, counting work already promised (the anti-herding rule). Off only to measure
    /// the herd it prevents.
    pub refuse_when_busy: bool,
    /// A node leaves a target to a more starved node (whose processes run slower than its own
    /// and whom the target would also help) for this many steps before it sends there
    /// itself: the newly idle node then receives the work that gains most from it, not
    /// whichever sender heard of it first. 0 turns the rule off.
    pub defer_steps: u32,
    /// At most this many migration requests per step (each to the best target given the
    /// earlier ones; targets refuse once promised enough work).
    pub max_requests_per_step: usize,
    /// Opportunity cost: normalised load at which CPU utilisation counts as 1.
    pub oc_full_load: f64,
    /// Opportunity cost: a move must save at least this fraction of the marginal cost here.
    pub oc_margin: f64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            step: Time::from_millis(1000),
            window: 8,
            expire: Time::from_secs_f64(30.0),
            smooth_rise: 0.8,
            smooth_fall: 0.25,
            migration_fixed_secs: 0.2,
            migration_mb_per_sec: 100.0,
            min_rate_gain: 0.3,
            cost_factor: 2.0,
            min_age_secs: 1.0,
            min_stay_secs: 0.0,
            usher_free_frac: 0.05,
            promise_ttl: Time::from_secs_f64(5.0),
            refuse_backoff: Time::from_secs_f64(5.0),
            io_penalty: 4.0,
            stats_half_life_secs: 30.0,
            refuse_when_busy: true,
            defer_steps: 2,
            max_requests_per_step: 4,
            oc_full_load: 2.0,
            oc_margin: 0.1,
        }
    }
}
