//! The MOSIX information window: a small set of the freshest load entries a node holds about
//! other nodes. Entries arrive in gossip, are merged by freshness, age while held, and expire.

use crate::types::{LoadEntry, NodeId, Time};
use serde::{Deserialize, Serialize};

/// An entry as held by a node: the entry plus the local time it was received.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// The entry as received (its `age_ms` is the age at reception).
    pub entry: LoadEntry,
    /// Local time of reception.
    pub received: Time,
}

impl Held {
    /// Age of the information at `now`, in milliseconds.
    pub fn age_ms(&self, now: Time) -> u64 {
        u64::from(self.entry.age_ms) + now.since(self.received).0 / 1000
    }

    /// The entry with its age brought up to `now`, ready to be forwarded.
    pub fn aged(&self, now: Time) -> LoadEntry {
        let mut e = self.entry;
        e.age_ms = self.age_ms(now).min(u64::from(u32::MAX)) as u32;
        e
    }
}

/// The window of at most `capacity` entries about other nodes, freshest kept.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Window {
    capacity: usize,
    held: Vec<Held>,
}

impl Window {
    /// An empty window that keeps at most `capacity` entries.
    pub fn new(capacity: usize) -> Window {
        Window {
            capacity: capacity.max(1),
            held: Vec::with_capacity(capacity.max(1) + 8),
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The held entries (unordered).
    pub fn iter(&self) -> impl Iterator<Item = &Held> {
        self.held.iter()
    }

    /// The entry about `node`, if held.
    pub fn get(&self, node: NodeId) -> Option<&Held> {
        self.held.iter().find(|h| h.entry.node == node)
    }

    /// Mutable access to the entry about `node` (used to account promised work locally).
    pub fn get_mut(&mut self, node: NodeId) -> Option<&mut Held> {
        self.held.iter_mut().find(|h| h.entry.node == node)
    }

    /// Merge received entries: an entry replaces the held one about the same node only when it
    /// is fresher; entries about `me` are ignored; the freshest `capacity` entries are kept.
    pub fn merge(&mut self, me: NodeId, incoming: &[LoadEntry], now: Time) {
        for e in incoming {
            if e.node == me {
                continue;
            }
            match self.held.iter_mut().find(|h| h.entry.node == e.node) {
                Some(h) => {
                    if u64::from(e.age_ms) < h.age_ms(now) {
                        *h = Held {
                            entry: *e,
                            received: now,
                        };
                    }
                }
                None => self.held.push(Held {
                    entry: *e,
                    received: now,
                }),
            }
        }
        if self.held.len() > self.capacity {
            // Keep the `capacity` freshest (ties by node id): a linear-time selection.
            self.held
                .select_nth_unstable_by_key(self.capacity, |h| (h.age_ms(now), h.entry.node));
            self.held.truncate(self.capacity);
        }
    }

    /// Drop entries older than `max_age`.
    pub fn expire(&mut self, now: Time, max_age: Time) {
        let max_ms = max_age.0 / 1000;
        self.held.retain(|h| h.age_ms(now) <= max_ms);
    }

    /// Forget `node` (it left the cluster or was declared dead).
    pub fn remove(&mut self, node: NodeId) {
        self.held.retain(|h| h.entry.node != node);
    }

    /// Up to `n` freshest entries, aged to `now` (in no particular order).
    pub fn freshest(&self, now: Time, n: usize) -> Vec<LoadEntry> {
        let mut v: Vec<LoadEntry> = self.held.iter().map(|h| h.aged(now)).collect();
        if v.len() > n {
            v.select_nth_unstable_by_key(n, |e| (e.age_ms, e.node));
            v.truncate(n);
        }
        v
    }

    /// Mean age of the held entries at `now`, in seconds (None when empty).
    pub fn mean_age_secs(&self, now: Time) -> Option<f64> {
        if self.held.is_empty() {
            return None;
        }
        let sum: u64 = self.held.iter().map(|h| h.age_ms(now)).sum();
        Some(sum as f64 / self.held.len() as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(node: NodeId, age_ms: u32, load: f32) -> LoadEntry {
        LoadEntry {
            node,
            load,
            cpus: 1.0,
            speed: 1.0,
            free_mem_mb: 100,
            total_mem_mb: 100,
            age_ms,
        }
    }

    #[test]
    fn fresher_entry_replaces_older_and_stale_does_not() {
        let mut w = Window::new(4);
        w.merge(0, &[e(1, 500, 1.0)], Time::ZERO);
        w.merge(0, &[e(1, 900, 2.0)], Time::ZERO);
        assert_eq!(w.get(1).unwrap().entry.load, 1.0);
        w.merge(0, &[e(1, 100, 3.0)], Time::ZERO);
        assert_eq!(w.get(1).unwrap().entry.load, 3.0);
    }

    #[test]
    fn own_entry_ignored_and_capacity_keeps_freshest() {
        let mut w = Window::new(2);
        w.merge(
            9,
            &[e(9, 0, 1.0), e(1, 300, 1.0), e(2, 100, 1.0), e(3, 200, 1.0)],
            Time::ZERO,
        );
        assert_eq!(w.len(), 2);
        assert!(w.get(9).is_none());
        assert!(w.get(1).is_none());
        assert!(w.get(2).is_some() && w.get(3).is_some());
    }

    #[test]
    fn entries_age_and_expire() {
        let mut w = Window::new(4);
        w.merge(0, &[e(1, 1000, 1.0)], Time::ZERO);
        let later = Time::from_secs_f64(2.0);
        assert_eq!(w.get(1).unwrap().age_ms(later), 3000);
        assert_eq!(w.freshest(later, 1)[0].age_ms, 3000);
        w.expire(later, Time::from_secs_f64(2.5));
        assert!(w.is_empty());
    }
}
