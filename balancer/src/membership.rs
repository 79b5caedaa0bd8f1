//! SWIM membership and failure detection, taken from the `foca` crate and wrapped in the same
//! sans-IO shape as the rest of the balancer: bytes and timer firings in, [`MemberEvent`]s out.
//!
//! A node joins with one known address ([`Membership::join`]); foca then probes members,
//! spreads membership updates piggy-backed on its own messages, and declares silent members
//! down. The MOSIX load window ([`crate::window`]) rides on top: it picks its random gossip
//! target among the members SWIM reports alive.

use crate::types::{NodeId, Time};
use foca::{BincodeCodec, Foca, Identity, NoCustomBroadcast, OwnedNotification};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;

/// A member's SWIM identity: the node id plus an incarnation bumped when the node rejoins
/// after being declared down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SwimId {
    /// The node.
    pub node: NodeId,
    /// Bumped on every renewal.
    pub incarnation: u32,
}

impl Identity for SwimId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(SwimId {
            node: self.node,
            incarnation: self.incarnation.wrapping_add(1),
        })
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// A SWIM timer to be handed back through [`crate::Input::SwimTimer`] when it fires.
pub type SwimTimer = foca::Timer<SwimId>;

/// What the membership layer asks of its caller, or tells it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MemberEvent {
    /// Send these SWIM bytes to `to`.
    Send {
        /// Destination node.
        to: NodeId,
        /// Opaque SWIM packet.
        data: Vec<u8>,
    },
    /// Hand `timer` back after `after`.
    Schedule {
        /// Delay.
        after: Time,
        /// The timer.
        timer: SwimTimer,
    },
    /// `node` is alive and a member.
    Up(NodeId),
    /// `node` left or was declared down.
    Down(NodeId),
}

type Codec = BincodeCodec<
    bincode::config::Configuration<
        bincode::config::LittleEndian,
        bincode::config::Fixint,
        bincode::config::NoLimit,
    >,
>;

/// A node's SWIM state (foca), with a seeded random generator so runs are reproducible.
pub struct Membership {
    foca: Foca<SwimId, Codec, ChaCha8Rng, NoCustomBroadcast>,
    rt: foca::AccumulatingRuntime<SwimId>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("members", &self.foca.num_members())
            .finish()
    }
}

impl Membership {
    /// SWIM for node `id` in a cluster of about `cluster_size` nodes (tunes foca's LAN
    /// profile), seeded with `seed`.
    pub fn new(id: NodeId, cluster_size: u32, seed: u64) -> Membership {
        let size = NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut config = foca::Config::new_lan(size);
        // The MOSIX window carries load; SWIM only needs membership, so it may probe less often.
        config.periodic_gossip = None;
        let foca = Foca::new(
            SwimId {
                node: id,
                incarnation: 0,
            },
            config,
            ChaCha8Rng::seed_from_u64(seed),
            BincodeCodec(bincode::config::legacy()),
        );
        Membership {
            foca,
            rt: foca::AccumulatingRuntime::new(),
        }
    }

    /// Join the cluster through one known node.
    pub fn join(&mut self, known: NodeId) -> Vec<MemberEvent> {
        let dst = SwimId {
            node: known,
            incarnation: 0,
        };
        // An error here means `known` is ourselves: nothing to do.
        let _ = self.foca.announce(dst, &mut self.rt);
        self.drain()
    }

    /// Leave the cluster gracefully.
    pub fn leave(&mut self) -> Vec<MemberEvent> {
        let _ = self.foca.leave_cluster(&mut self.rt);
        self.drain()
    }

    /// A SWIM packet arrived. Malformed packets are dropped.
    pub fn handle_data(&mut self, data: &[u8]) -> Vec<MemberEvent> {
        let _ = self.foca.handle_data(data, &mut self.rt);
        self.drain()
    }

    /// A timer scheduled earlier fired.
    pub fn handle_timer(&mut self, timer: SwimTimer) -> Vec<MemberEvent> {
        let _ = self.foca.handle_timer(timer, &mut self.rt);
        self.drain()
    }

    /// Number of members foca considers active.
    pub fn num_members(&self) -> usize {
        self.foca.num_members()
    }

    fn drain(&mut self) -> Vec<MemberEvent> {
        let mut out = Vec::new();
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => out.push(MemberEvent::Up(id.node)),
                OwnedNotification::MemberDown(id) => out.push(MemberEvent::Down(id.node)),
                _ => {}
            }
        }
        while let Some((to, data)) = self.rt.to_send() {
            out.push(MemberEvent::Send {
                to: to.node,
                data: data.to_vec(),
            });
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            out.push(MemberEvent::Schedule {
                after: Time(after.as_micros().min(u128::from(u64::MAX)) as u64),
                timer,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

    /// Drive a few foca instances over a perfect in-memory network in virtual time.
    fn run(n: u32, kill: Option<(NodeId, Time)>, until: Time) -> Vec<BTreeSet<NodeId>> {
        let mut ms: Vec<Membership> = (0..n)
            .map(|i| Membership::new(i, n, 7 + u64::from(i)))
            .collect();
        let mut views: Vec<BTreeSet<NodeId>> = vec![BTreeSet::new(); n as usize];
        let mut q: BinaryHeap<Reverse<(Time, u64, u32)>> = BinaryHeap::new();
        let mut payloads: BTreeMap<u64, (NodeId, Result<Vec<u8>, SwimTimer>)> = BTreeMap::new();
        let mut seq = 0u64;
        let mut dead = BTreeSet::new();
        let mut push = |evs: Vec<MemberEvent>,
                        me: NodeId,
                        now: Time,
                        q: &mut BinaryHeap<_>,
                        payloads: &mut BTreeMap<_, _>,
                        views: &mut Vec<BTreeSet<NodeId>>| {
            for e in evs {
                match e {
                    MemberEvent::Up(x) => {
                        views[me as usize].insert(x);
                    }
                    MemberEvent::Down(x) => {
                        views[me as usize].remove(&x);
                    }
                    MemberEvent::Send { to, data } => {
                        seq += 1;
                        payloads.insert(seq, (to, Ok(data)));
                        q.push(Reverse((now.plus(Time(1000)), seq, to)));
                    }
                    MemberEvent::Schedule { after, timer } => {
                        seq += 1;
                        payloads.insert(seq, (me, Err(timer)));
                        q.push(Reverse((now.plus(after), seq, me)));
                    }
                }
            }
        };
        for i in 1..n {
            let evs = ms[i as usize].join(0);
            push(evs, i, Time::ZERO, &mut q, &mut payloads, &mut views);
        }
        while let Some(Reverse((t, s, _))) = q.pop() {
            if t > until {
                break;
            }
            if let Some((k, kt)) = kill {
                if t >= kt {
                    dead.insert(k);
                }
            }
            let (dst, p) = payloads.remove(&s).unwrap();
            if dead.contains(&dst) {
                continue;
            }
            let evs = match p {
                Ok(data) => ms[dst as usize].handle_data(&data),
                Err(timer) => ms[dst as usize].handle_timer(timer),
            };
            push(evs, dst, t, &mut q, &mut payloads, &mut views);
        }
        views
    }

    #[test]
    fn nodes_join_through_one_address() {
        let views = run(5, None, Time::from_secs_f64(20.0));
        for (i, v) in views.iter().enumerate() {
            let expect: BTreeSet<NodeId> = (0..5).filter(|&x| x != i as u32).collect();
            assert_eq!(v, &expect, "node {i}");
        }
    }

    #[test]
    fn dead_node_is_detected() {
        let views = run(
            5,
            Some((3, Time::from_secs_f64(20.0))),
            Time::from_secs_f64(80.0),
        );
        for (i, v) in views.iter().enumerate() {
            if i != 3 {
                assert!(!v.contains(&3), "node {i} still lists the dead node");
                assert_eq!(v.len(), 3, "node {i}");
            }
        }
    }
}
