//! The nodes' datagrams: MOSIX's information dissemination (paper §2.1: each node sends its
//! load and a window of what it knows to one random node per step), SWIM membership packets
//! and the migration request/reply of the balancing policy, over UDP on the node's listen port.
//!
//! Sans-IO: [`Sealer::seal`] turns a [`Body`] into bytes and [`Opener::open`] checks bytes
//! back into an [`Envelope`]; the caller supplies the wall-clock time. Every datagram carries
//! a BLAKE3 keyed MAC (key derived from the cluster key, [`derive_key`]) over all its bytes, the
//! sender's boot id and a sequence number. A datagram is rejected ([`Reject`]) when its MAC is
//! wrong (a node without the cluster key), when it was already accepted (a replay: a sliding
//! window of 64 sequence numbers per sender boot, as IPsec's anti-replay window), or when its
//! send time is more than [`MAX_SKEW_MS`] from the receiver's clock (stale).

use balancer::{LoadEntry, MigrationReason, NodeId, Pid};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;

/// First bytes of every datagram (and the format version).
pub const MAGIC: &[u8; 5] = b"MOSG1";
/// Length of the MAC at the end of a datagram, bytes.
pub const TAG_LEN: usize = 32;
/// A datagram sent longer ago (or later) than this by the receiver's clock is stale, ms.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Largest datagram sent or accepted, bytes.
pub const MAX_DATAGRAM: usize = 8192;
/// Most address-book entries carried by one gossip message.
pub const MAX_BOOK: usize = 16;

/// The MAC key for a cluster, derived from the bytes of its private key file.
pub fn derive_key(cluster_key: &[u8]) -> [u8; 32] {
    blake3::derive_key("mosvm 2026 node datagram MAC", cluster_key)
}

/// A node's id: a stable 32-bit hash of its name (FNV-1a), the same on every node.
pub fn node_id(name: &str) -> NodeId {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A cluster-wide process id: the home node's id and the home pid.
pub fn cluster_pid(home: NodeId, pid: u32) -> Pid {
    (u64::from(home) << 32) | u64::from(pid)
}

/// The home node and home pid of a cluster-wide process id.
pub fn split_pid(p: Pid) -> (NodeId, u32) {
    ((p >> 32) as NodeId, p as u32)
}

/// Where a node is: its name and listen address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// Node id ([`node_id`] of the name).
    pub id: NodeId,
    /// Node name.
    pub name: String,
    /// Its listen address (TCP for migrations, UDP for datagrams).
    pub addr: SocketAddr,
}

/// What a datagram says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// "Who are you?": sent to configured addresses until they answer; `answer` asks for a
    /// [`Body::Hello`] back.
    Hello {
        /// Reply with a Hello of your own.
        answer: bool,
    },
    /// Load dissemination: the sender's own entry first, then its window; plus where some of
    /// the nodes it knows are.
    Gossip {
        /// Entries.
        entries: Vec<LoadEntry>,
        /// Address book.
        book: Vec<Contact>,
    },
    /// A SWIM (foca) packet.
    Swim(Vec<u8>),
    /// May I send you this process? (balancer `SendMigrationRequest`)
    Request {
        /// Process.
        pid: Pid,
        /// Its memory, MiB.
        mem_mb: u32,
        /// The CPU rate the process gets at the sender now, reference CPUs.
        from_rate: f32,
        /// Why.
        reason: MigrationReason,
    },
    /// The answer to a [`Body::Request`].
    Reply {
        /// Process.
        pid: Pid,
        /// Taken.
        accepted: bool,
    },
    /// To a process's home node, from the node that hosts it: the balancer there wants it to
    /// move to `to` (a node name, or the home node's own name to come home).
    Move {
        /// Process.
        pid: Pid,
        /// Destination node's name.
        to: String,
        /// Why ("load", "memory", "expel").
        reason: String,
    },
    /// To the node that hosts a process, from the process's home node: the move it asked for
    /// with [`Body::Move`] was refused or failed; the process still runs on the host.
    MoveFailed {
        /// Process.
        pid: Pid,
        /// What went wrong, one line.
        error: String,
    },
    /// To the node that hosts a process, from the process's home node: the process was
    /// stopped at home (SIGSTOP, or a job-control stop signal at its default action: its
    /// home `mosvm run` stopped) or continued. The host stops or continues the guest with it.
    /// Sent again while it holds, so a lost datagram is made good; only a higher
    /// `generation` than the last one taken counts.
    Stopped {
        /// Process.
        pid: Pid,
        /// Stopped (true) or running.
        stopped: bool,
        /// Counts the process's stops and continues at home, from 1.
        generation: u64,
    },
}

/// A checked datagram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Who sent it.
    pub from: Contact,
    /// The sender's boot id (random per start).
    pub boot: u64,
    /// Sequence number within that boot, from 1.
    pub seq: u64,
    /// Sender's wall clock at sending, ms since the Unix epoch.
    pub sent_ms: u64,
    /// Payload.
    pub body: Body,
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not a mosvm datagram, too large, or undecodable after a good MAC.
    Malformed,
    /// The MAC does not match: the sender lacks the cluster key, or bytes changed.
    BadMac,
    /// Already accepted once.
    Replay,
    /// Sent too long ago, or in the future, by the receiver's clock.
    Stale,
}

impl Reject {
    /// A short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadMac => "bad_mac",
            Reject::Replay => "replay",
            Reject::Stale => "stale",
        }
    }
}

/// bincode, never claiming more than a datagram holds: a length prefix in a forged body
/// cannot make the decoder allocate more than [`MAX_DATAGRAM`] bytes.
fn codec() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DATAGRAM>,
> {
    bincode::config::standard().with_limit::<MAX_DATAGRAM>()
}

/// Seals datagrams for one node.
pub struct Sealer {
    key: [u8; 32],
    me: Contact,
    boot: u64,
    seq: u64,
}

impl Sealer {
    /// A sealer for node `me`, this boot `boot` (random).
    pub fn new(key: [u8; 32], me: Contact, boot: u64) -> Sealer {
        Sealer {
            key,
            me,
            boot,
            seq: 0,
        }
    }

    /// The datagram for `body`, sent at `now_ms` (Unix ms).
    pub fn seal(&mut self, body: Body, now_ms: u64) -> Vec<u8> {
        self.seq += 1;
        let env = Envelope {
            from: self.me.clone(),
            boot: self.boot,
            seq: self.seq,
            sent_ms: now_ms,
            body,
        };
        let mut out = MAGIC.to_vec();
        // Encoding plain data into a Vec cannot fail.
        out.extend(bincode::serde::encode_to_vec(&env, codec()).unwrap_or_default());
        let tag = blake3::keyed_hash(&self.key, &out);
        out.extend_from_slice(tag.as_bytes());
        out
    }
}

/// The anti-replay window of one sender boot: the highest sequence number accepted and a
/// bitmap of the 64 below it.
#[derive(Clone, Copy, Debug, Default)]
struct ReplayWindow {
    top: u64,
    bits: u64,
    last_ms: u64,
}

impl ReplayWindow {
    /// Accept `seq` once.
    fn accept(&mut self, seq: u64) -> bool {
        if seq > self.top {
            let shift = seq - self.top;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.top = seq;
            true
        } else {
            let back = self.top - seq;
            if back >= 64 || self.bits & (1 << back) != 0 {
                false
            } else {
                self.bits |= 1 << back;
                true
            }
        }
    }
}

/// Checks datagrams for one node.
pub struct Opener {
    key: [u8; 32],
    seen: HashMap<(NodeId, u64), ReplayWindow>,
}

impl Opener {
    /// An opener with the cluster's MAC key.
    pub fn new(key: [u8; 32]) -> Opener {
        Opener {
            key,
            seen: HashMap::new(),
        }
    }

    /// Check `data`, received at `now_ms` (Unix ms).
    pub fn open(&mut self, data: &[u8], now_ms: u64) -> Result<Envelope, Reject> {
        if data.len() > MAX_DATAGRAM
            || data.len() < MAGIC.len() + TAG_LEN
            || !data.starts_with(MAGIC)
        {
            return Err(Reject::Malformed);
        }
        let (signed, tag) = data.split_at(data.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| Reject::Malformed)?;
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.key, signed) != blake3::Hash::from_bytes(tag) {
            return Err(Reject::BadMac);
        }
        let (env, used): (Envelope, usize) =
            bincode::serde::decode_from_slice(&signed[MAGIC.len()..], codec())
                .map_err(|_| Reject::Malformed)?;
        if used != signed.len() - MAGIC.len() || env.from.id != node_id(&env.from.name) {
            return Err(Reject::Malformed);
        }
        if env.sent_ms.abs_diff(now_ms) > MAX_SKEW_MS {
            return Err(Reject::Stale);
        }
        // Forget boots not heard from for longer than a datagram can stay fresh.
        if self.seen.len() > 4096 {
            self.seen
                .retain(|_, w| now_ms.saturating_sub(w.last_ms) <= 2 * MAX_SKEW_MS);
        }
        let w = self.seen.entry((env.from.id, env.boot)).or_default();
        if !w.accept(env.seq) {
            return Err(Reject::Replay);
        }
        w.last_ms = now_ms;
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(name: &str) -> Contact {
        Contact {
            id: node_id(name),
            name: name.into(),
            addr: "127.0.0.1:7421".parse().unwrap(),
        }
    }

    #[test]
    fn a_sealed_datagram_opens_once() {
        let key = derive_key(b"cluster key bytes");
        let mut s = Sealer::new(key, contact("n1"), 9);
        let mut o = Opener::new(key);
        let d = s.seal(Body::Hello { answer: true }, 1_000_000);
        let env = o.open(&d, 1_000_500).unwrap();
        assert_eq!(env.from.name, "n1");
        assert_eq!(env.body, Body::Hello { answer: true });
        assert_eq!(o.open(&d, 1_000_600), Err(Reject::Replay));
    }

    #[test]
    fn wrong_key_tampering_and_staleness_are_rejected() {
        let mut s = Sealer::new(derive_key(b"other"), contact("n1"), 1);
        let mut o = Opener::new(derive_key(b"ours"));
        let d = s.seal(Body::Swim(vec![1, 2, 3]), 5_000_000);
        assert_eq!(o.open(&d, 5_000_000), Err(Reject::BadMac));

        let key = derive_key(b"ours");
        let mut s = Sealer::new(key, contact("n1"), 1);
        let mut d = s.seal(Body::Swim(vec![1, 2, 3]), 5_000_000);
        let n = d.len();
        d[n - TAG_LEN - 1] ^= 1;
        assert_eq!(o.open(&d, 5_000_000), Err(Reject::BadMac));
        let d = s.seal(Body::Swim(vec![]), 5_000_000);
        assert_eq!(o.open(&d, 5_000_000 + MAX_SKEW_MS + 1), Err(Reject::Stale));
        assert_eq!(o.open(b"junk", 0), Err(Reject::Malformed));
    }

    #[test]
    fn reordered_datagrams_within_the_window_are_accepted_once() {
        let key = derive_key(b"k");
        let mut s = Sealer::new(key, contact("n2"), 3);
        let mut o = Opener::new(key);
        let ds: Vec<Vec<u8>> = (0..70)
            .map(|_| s.seal(Body::Hello { answer: false }, 0))
            .collect();
        assert!(o.open(&ds[69], 0).is_ok());
        assert!(o.open(&ds[10], 0).is_ok(), "59 behind: inside the window");
        assert_eq!(o.open(&ds[10], 0), Err(Reject::Replay));
        assert_eq!(o.open(&ds[2], 0), Err(Reject::Replay), "67 behind: outside");
        // A new boot of the same node starts its own window.
        let mut s2 = Sealer::new(key, contact("n2"), 4);
        assert!(o
            .open(&s2.seal(Body::Hello { answer: false }, 0), 0)
            .is_ok());
    }

    #[test]
    fn ids_and_pids() {
        assert_eq!(node_id("n1"), node_id("n1"));
        assert_ne!(node_id("n1"), node_id("n2"));
        let p = cluster_pid(node_id("n3"), 4242);
        assert_eq!(split_pid(p), (node_id("n3"), 4242));
    }
}
