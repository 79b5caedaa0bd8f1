//! A node's balancer run as data: what was fed to a [`Node`] and what it answered, so that a
//! run of the real node service can be replayed through the core (`mosvm sim --replay FILE`)
//! and shown to give the very same decisions.
//!
//! A trace is JSON lines: one [`Header`] (the node's [`Config`] and the seed of the random
//! generator the service passed to [`Node::handle`], a [`ChaCha8Rng`]), then one [`Record`]
//! per call. [`replay`] builds a fresh node from the header, makes the same calls at the same
//! times, and reports every call whose actions differ.

use crate::node::{Action, Config, Input, Node};
use crate::types::{NodeId, Time};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The first line of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The node as built.
    pub config: Config,
    /// Seed of the [`ChaCha8Rng`] passed to every call.
    pub seed: u64,
}

/// One call on the node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Call {
    /// [`Node::start`].
    Start {
        /// The node joined through.
        known: Option<NodeId>,
    },
    /// [`Node::leave`].
    Leave,
    /// [`Node::set_capacity`].
    SetCapacity {
        /// CPUs.
        cpus: f64,
        /// Relative speed.
        speed: f64,
        /// Memory, MiB.
        mem_mb: u64,
    },
    /// [`Node::handle`].
    Handle(Input),
}

/// A call, when it was made, and what the node answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The core's time of the call.
    pub at: Time,
    /// The call.
    pub call: Call,
    /// The actions returned.
    pub actions: Vec<Action>,
}

/// Make `call` on `node` at `at` with `rng`; returns the actions.
pub fn apply(node: &mut Node, call: &Call, at: Time, rng: &mut ChaCha8Rng) -> Vec<Action> {
    match call {
        Call::Start { known } => node.start(*known),
        Call::Leave => node.leave(),
        Call::SetCapacity {
            cpus,
            speed,
            mem_mb,
        } => {
            node.set_capacity(*cpus, *speed, *mem_mb);
            Vec::new()
        }
        Call::Handle(input) => node.handle(input.clone(), at, rng),
    }
}

/// The result of a replay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Replay {
    /// Calls replayed.
    pub calls: usize,
    /// Migration decisions (requests and moves) in the trace.
    pub decisions: usize,
    /// Indexes of the records whose actions differ on replay.
    pub mismatches: Vec<usize>,
}

/// Replay `records` through a fresh node built from `header`.
pub fn replay(header: &Header, records: &[Record]) -> Replay {
    let mut node = Node::new(header.config.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(header.seed);
    let mut out = Replay::default();
    for (i, r) in records.iter().enumerate() {
        let got = apply(&mut node, &r.call, r.at, &mut rng);
        out.calls += 1;
        out.decisions += r
            .actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::SendMigrationRequest { .. } | Action::Migrate { .. }
                )
            })
            .count();
        if got != r.actions {
            out.mismatches.push(i);
        }
    }
    out
}

/// Read a trace file: the header line, then the records.
pub fn read(text: &str) -> anyhow::Result<(Header, Vec<Record>)> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or_else(|| anyhow::anyhow!("empty trace"))?;
    let header: Header =
        serde_json::from_str(first).map_err(|e| anyhow::anyhow!("trace header: {e}"))?;
    let records = lines
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| anyhow::anyhow!("trace line {}: {e}", i + 2))
        })
        .collect::<anyhow::Result<Vec<Record>>>()?;
    Ok((header, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoadEntry, ProcessInfo};

    fn scripted() -> (Header, Vec<Record>) {
        let mut cfg = Config::new(1, 1.0, 1.0, 4096);
        cfg.swim = Some(crate::node::SwimSettings {
            cluster_size: 3,
            seed: 5,
        });
        let header = Header {
            config: cfg,
            seed: 9,
        };
        let mut node = Node::new(header.config.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(header.seed);
        let mut calls = vec![(Time::ZERO, Call::Start { known: Some(2) })];
        for pid in 1..=4 {
            let mut p = ProcessInfo::new(pid, 1, 10);
            p.age_ms = 5000;
            calls.push((Time(1000), Call::Handle(Input::ProcessStarted(p))));
        }
        calls.push((Time(2000), Call::Handle(Input::NodeJoined { node: 2 })));
        let e = LoadEntry {
            node: 2,
            load: 0.0,
            cpus: 2.0,
            speed: 1.0,
            free_mem_mb: 4000,
            total_mem_mb: 4096,
            age_ms: 0,
        };
        calls.push((
            Time(3000),
            Call::Handle(Input::Gossip {
                from: 2,
                entries: vec![e],
            }),
        ));
        calls.push((
            Time(4000),
            Call::Handle(Input::LoadSample {
                runnable: 4.0,
                used_mem_mb: 40,
            }),
        ));
        for t in 0..5 {
            calls.push((Time(5_000_000 + t * 1_000_000), Call::Handle(Input::Tick)));
        }
        let records = calls
            .into_iter()
            .map(|(at, call)| {
                let actions = apply(&mut node, &call, at, &mut rng);
                Record { at, call, actions }
            })
            .collect();
        (header, records)
    }

    #[test]
    fn a_replayed_trace_gives_the_same_decisions_and_a_changed_one_does_not() {
        let (header, records) = scripted();
        let text: String = std::iter::once(serde_json::to_string(&header).unwrap())
            .chain(records.iter().map(|r| serde_json::to_string(r).unwrap()))
            .map(|l| l + "\n")
            .collect();
        let (h, rs) = read(&text).unwrap();
        let r = replay(&h, &rs);
        assert!(r.decisions > 0, "the scenario makes no decision");
        assert_eq!(r.mismatches, Vec::<usize>::new());
        // Another seed or another load changes what the core answers.
        let mut other = rs.clone();
        for rec in other.iter_mut() {
            if let Call::Handle(Input::LoadSample { runnable, .. }) = &mut rec.call {
                *runnable = 0.0;
            }
        }
        assert!(!replay(&h, &other).mismatches.is_empty());
    }
}
