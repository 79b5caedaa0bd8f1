//! Identifiers, virtual time and the gossip entry.

use serde::{Deserialize, Serialize};

/// A node of the cluster, unique for the cluster's lifetime.
pub type NodeId = u32;

/// A process, unique across the cluster (the home node allocates it).
pub type Pid = u64;

/// A point in time, in microseconds since an arbitrary origin chosen by the caller.
///
/// The core never reads a clock: the node service passes a monotonic clock reading, the
/// simulator its virtual time.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// Zero.
    pub const ZERO: Time = Time(0);

    /// A time of `s` seconds (negative values clamp to zero).
    pub fn from_secs_f64(s: f64) -> Time {
        Time((s.max(0.0) * 1e6).round() as u64)
    }

    /// A time of `ms` milliseconds.
    pub fn from_millis(ms: u64) -> Time {
        Time(ms * 1000)
    }

    /// This time in seconds.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Time {
        Time(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`.
    pub fn plus(self, d: Time) -> Time {
        Time(self.0.saturating_add(d.0))
    }
}

/// One node's advertised state, as carried in gossip windows.
///
/// Fixed-size on the wire (bincode legacy encoding: 28 bytes). `age_ms` is maintained hop by
/// hop (each holder adds the time it held the entry), so nodes need no synchronised clocks.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadEntry {
    /// Whose state this is.
    pub node: NodeId,
    /// Smoothed load: runnable processes per unit of capacity (CPUs × relative speed).
    pub load: f32,
    /// CPU capacity in CPUs: the online CPUs, or the node's cgroup CPU quota (which may be
    /// fractional, 0.5 for half a CPU).
    pub cpus: f32,
    /// Relative CPU speed (1.0 = reference machine).
    pub speed: f32,
    /// Free memory, MiB.
    pub free_mem_mb: u32,
    /// Total memory available to processes, MiB.
    pub total_mem_mb: u32,
    /// Age of the information when it was sent, milliseconds.
    pub age_ms: u32,
}

impl LoadEntry {
    /// Capacity: CPUs × relative speed.
    pub fn capacity(&self) -> f64 {
        f64::from(self.cpus).max(0.01) * f64::from(self.speed).max(1e-3)
    }

    /// Estimated number of runnable processes (load × capacity).
    pub fn runnable(&self) -> f64 {
        f64::from(self.load).max(0.0) * self.capacity()
    }
}

/// Size in bytes of a gossip message carrying `entries` entries (bincode legacy encoding of
/// the sender id and the entry vector), as the simulator accounts it.
pub fn gossip_message_bytes(entries: usize) -> usize {
    // sender u32 + vec length u64 + entries × 28.
    4 + 8 + entries * 28
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_wire_size_matches_accounting() {
        let e = LoadEntry {
            node: 7,
            load: 1.5,
            cpus: 4.0,
            speed: 1.25,
            free_mem_mb: 1000,
            total_mem_mb: 4096,
            age_ms: 12,
        };
        let msg: (NodeId, Vec<LoadEntry>) = (3, vec![e; 5]);
        let bytes = bincode::serde::encode_to_vec(msg, bincode::config::legacy()).unwrap();
        assert_eq!(bytes.len(), gossip_message_bytes(5));
    }

    #[test]
    fn time_conversions() {
        assert_eq!(Time::from_secs_f64(1.5), Time(1_500_000));
        assert_eq!(Time::from_secs_f64(-3.0), Time::ZERO);
        assert_eq!(Time(5).since(Time(9)), Time::ZERO);
        assert_eq!(Time::from_millis(2).as_secs_f64(), 0.002);
    }
}
