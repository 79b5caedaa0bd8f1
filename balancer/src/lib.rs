//! MOSIX resource sharing as a sans-IO core: information dissemination, load balancing and
//! memory ushering as plain functions of (state, input, now, rng), plus the simulator.
//!
//! The crate owns the adaptive resource-sharing algorithms of MOSIX (Barak, La'adan, Shiloh,
//! 1999, §2.1–2.2) and nothing else: it opens no socket, reads no clock and uses no global
//! randomness. A [`Node`] is built from a [`Config`]; the caller feeds it [`Input`]s together
//! with the current [`Time`] and a random number generator, and carries out the [`Action`]s it
//! returns (send this gossip window to that node, migrate process P to node N, ...). The same
//! seed and the same inputs always give the same actions, which is what lets the discrete-event
//! simulator in [`sim`] drive the very code the node service runs.
//!
//! Module map:
//! - [`types`]: identifiers, virtual time, the gossip [`LoadEntry`].
//! - [`window`]: the MOSIX information window (merge by freshness, ageing, expiry).
//! - [`load`]: load normalisation and rise-fast/fall-slow smoothing; CPU speed calibration.
//! - [`policy`]: the pairwise MOSIX policy, memory ushering and the opportunity-cost policy.
//! - [`node`]: the per-node state machine ([`Node::handle`]).
//! - [`walk`]: the random cyclic order of a node's gossip targets.
//! - [`membership`]: SWIM membership and failure detection (the `foca` crate) in sans-IO form.
//! - [`sim`]: the discrete-event simulator behind `mosvm sim` ([`sim::cli`]).
//! - [`trace`]: a node service's balancer run recorded, and replayed through the core.

pub mod load;
pub mod membership;
pub mod node;
pub mod params;
pub mod policy;
pub mod sim;
pub mod trace;
pub mod types;
pub mod walk;
pub mod window;

pub use node::{Action, Config, Input, MigrationReason, Node, Params, ProcessInfo};
pub use policy::PolicyKind;
pub use types::{LoadEntry, NodeId, Pid, Time};
