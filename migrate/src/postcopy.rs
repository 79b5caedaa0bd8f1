//! Post-copy bookkeeping, sans-IO: which guest pages still have to cross after the guest has
//! resumed at the destination, in which order the source sends them, and what the
//! destination does when the guest touches one that has not arrived.
//!
//! In post-copy (the paper's "network RAM" future work; QEMU's postcopy-ram) the source
//! pauses the guest, sends its vCPU/VMM state and the pages it needs first, and the guest
//! resumes at the destination at once. The rest of its pages (the *outstanding* ones, each
//! non-zero page the source holds that the destination does not have yet) follow:
//!
//! - the source pushes them in the background, in guest-physical order ([`Pusher`]);
//! - a guest access to one that has not arrived faults at the destination (userfaultfd); the
//!   destination asks for it and for the next outstanding pages after it, which the source
//!   sends before anything else ([`Arrivals::fault`], [`Pusher::request`]);
//! - an access to a page that is not outstanding and never arrived is to a zero page: it is
//!   filled with zeros there, with no message.
//!
//! Every outstanding page is sent exactly once. Time, the link and the fault mechanism are the
//! caller's: these types only decide.

use std::collections::VecDeque;

/// Outstanding pages asked for together with the one a fault needs (the faulting page
/// included): a guest that touches a page usually touches the next ones soon, and one request
/// then saves several fault round trips.
pub const FAULT_WINDOW: usize = 16;

/// What the destination does about a guest access to a page that is not mapped yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// The page is a zero page at the source: fill it with zeros here.
    Zero,
    /// Ask the source for these pages (the faulting one first); the access waits until the
    /// first arrives.
    Request(Vec<u64>),
    /// Already asked for and on its way: wait for it.
    Wait,
    /// It has arrived (the fault was reported before the page was put in place): wake the
    /// waiting access.
    Present,
}

/// A page's state at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not at the source either (a zero page), or arrived: nothing to wait for.
    Settled,
    /// Still at the source, not asked for.
    Outstanding,
    /// Still at the source, asked for.
    Requested,
    /// Given up by the guest (its memory was zeroed here) while outstanding or after it
    /// arrived: a zero page from now on, whatever arrives for it.
    Dropped,
}

/// The destination's view: which outstanding pages have arrived and which were asked for.
#[derive(Debug, Clone)]
pub struct Arrivals {
    slots: Vec<Slot>,
    /// Outstanding or requested pages left.
    left: usize,
    /// Where the next fault window may look from (outstanding pages are sparse).
    outstanding: Vec<u64>,
}

impl Arrivals {
    /// `pages`: the guest's physical pages; `outstanding`: the pages the source still holds
    /// (any order, duplicates allowed; numbers at or past `pages` are errors).
    pub fn new(pages: u64, outstanding: &[u64]) -> Result<Arrivals, OutOfRange> {
        let mut slots = vec![Slot::Settled; pages as usize];
        let mut list = outstanding.to_vec();
        list.sort_unstable();
        list.dedup();
        for &p in &list {
            *slots.get_mut(p as usize).ok_or(OutOfRange(p))? = Slot::Outstanding;
        }
        Ok(Arrivals {
            left: list.len(),
            slots,
            outstanding: list,
        })
    }

    /// Outstanding pages that have not arrived.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// Whether every outstanding page has arrived: post-copy is over.
    pub fn complete(&self) -> bool {
        self.left == 0
    }

    /// The guest touched page `gpn`, which is not mapped here.
    pub fn fault(&mut self, gpn: u64) -> Result<FaultAction, OutOfRange> {
        match *self.slots.get(gpn as usize).ok_or(OutOfRange(gpn))? {
            Slot::Requested => Ok(FaultAction::Wait),
            Slot::Dropped => Ok(FaultAction::Zero),
            Slot::Settled if self.outstanding.binary_search(&gpn).is_ok() => {
                Ok(FaultAction::Present)
            }
            Slot::Settled => Ok(FaultAction::Zero),
            Slot::Outstanding => {
                // This page and the next outstanding ones nobody asked for yet.
                let from = self.outstanding.partition_point(|&p| p < gpn);
                let mut ask = Vec::with_capacity(FAULT_WINDOW);
                for &p in &self.outstanding[from..] {
                    if ask.len() == FAULT_WINDOW {
                        break;
                    }
                    if self.slots[p as usize] == Slot::Outstanding {
                        self.slots[p as usize] = Slot::Requested;
                        ask.push(p);
                    }
                }
                Ok(FaultAction::Request(ask))
            }
        }
    }

    /// Page `gpn` arrived. True if it was outstanding (put it in place); false for a page
    /// that already arrived or was never outstanding (a duplicate: drop it).
    pub fn arrived(&mut self, gpn: u64) -> Result<bool, OutOfRange> {
        let s = self.slots.get_mut(gpn as usize).ok_or(OutOfRange(gpn))?;
        match *s {
            Slot::Outstanding | Slot::Requested => {
                *s = Slot::Settled;
                self.left -= 1;
                Ok(true)
            }
            Slot::Settled | Slot::Dropped => Ok(false),
        }
    }

    /// Whether page `gpn` is still to arrive (outstanding, asked for or not).
    pub fn awaited(&self, gpn: u64) -> bool {
        matches!(
            self.slots.get(gpn as usize),
            Some(Slot::Outstanding | Slot::Requested)
        )
    }

    /// The destination zeroed page `gpn` (the guest gave its memory up): what arrives for
    /// it later is dropped, and a fault on it is a zero page. A page that was still to come
    /// no longer counts as outstanding.
    pub fn dropped(&mut self, gpn: u64) -> Result<(), OutOfRange> {
        let s = self.slots.get_mut(gpn as usize).ok_or(OutOfRange(gpn))?;
        match *s {
            Slot::Outstanding | Slot::Requested => {
                *s = Slot::Dropped;
                self.left -= 1;
            }
            // Arrived, or never outstanding: zero from now on either way (a fault on an
            // arrived page would otherwise find it "present").
            Slot::Settled => {
                if self.outstanding.binary_search(&gpn).is_ok() {
                    *s = Slot::Dropped;
                }
            }
            Slot::Dropped => {}
        }
        Ok(())
    }
}

/// Sorted, distinct page numbers as runs of consecutive pages, each `(first, count)`: how a
/// post-copy's outstanding list travels (a guest's touched memory is mostly contiguous).
pub fn to_runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in sorted {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// The page numbers of `runs` (see [`to_runs`]); None when they would exceed `max` pages (a
/// peer's runs are not trusted to be small).
pub fn from_runs(runs: &[(u64, u64)], max: u64) -> Option<Vec<u64>> {
    let total = runs
        .iter()
        .try_fold(0u64, |t, &(_, n)| t.checked_add(n))
        .filter(|&t| t <= max)?;
    let mut out = Vec::with_capacity(total as usize);
    for &(first, n) in runs {
        out.extend(first..first.checked_add(n)?);
    }
    Some(out)
}

/// A page number past the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page {0:#x} is outside guest memory")]
pub struct OutOfRange(pub u64);

/// The source's side: the outstanding pages, pushed in order, those the destination asks for
/// first.
#[derive(Debug, Clone)]
pub struct Pusher {
    /// Outstanding pages in order; `sent[i]` for `order[i]`.
    order: Vec<u64>,
    sent: Vec<bool>,
    /// The next index of `order` the background push looks at.
    cursor: usize,
    /// Indices of `order` asked for, oldest first.
    asked: VecDeque<usize>,
    left: usize,
}

impl Pusher {
    /// The pages still to send (any order, duplicates allowed).
    pub fn new(outstanding: &[u64]) -> Pusher {
        let mut order = outstanding.to_vec();
        order.sort_unstable();
        order.dedup();
        Pusher {
            sent: vec![false; order.len()],
            left: order.len(),
            order,
            cursor: 0,
            asked: VecDeque::new(),
        }
    }

    /// The destination asked for `pages`: they go before the background push. Pages already
    /// sent, or never outstanding, are ignored (a request can cross the push in flight).
    pub fn request(&mut self, pages: &[u64]) {
        for p in pages {
            if let Ok(i) = self.order.binary_search(p) {
                if !self.sent[i] {
                    self.asked.push_back(i);
                }
            }
        }
    }

    /// The next pages to send, at most `max`: asked-for ones first, in the order asked, then
    /// the background push in page order. Each page is returned once in all. Empty when
    /// everything is sent.
    pub fn next_batch(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max.min(self.left));
        while out.len() < max {
            let i = match self.asked.pop_front() {
                Some(i) => i,
                None => {
                    while self.cursor < self.order.len() && self.sent[self.cursor] {
                        self.cursor += 1;
                    }
                    if self.cursor == self.order.len() {
                        break;
                    }
                    self.cursor
                }
            };
            if self.sent[i] {
                continue;
            }
            self.sent[i] = true;
            self.left -= 1;
            out.push(self.order[i]);
        }
        out
    }

    /// Pages not sent yet.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// Whether every outstanding page has been sent.
    pub fn done(&self) -> bool {
        self.left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any set of pages travels as runs and comes back the same; a limit below its size
        /// refuses it.
        #[test]
        fn page_lists_survive_their_runs(mut pages in proptest::collection::vec(0u64..5000, 0..400)) {
            pages.sort_unstable();
            pages.dedup();
            let runs = to_runs(&pages);
            prop_assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "runs touch: {runs:?}");
            prop_assert_eq!(from_runs(&runs, pages.len() as u64), Some(pages.clone()));
            if !pages.is_empty() {
                prop_assert_eq!(from_runs(&runs, pages.len() as u64 - 1), None);
            }
        }
    }

    #[test]
    fn runs_a_peer_sends_are_bounded() {
        assert_eq!(from_runs(&[(0, u64::MAX), (5, 2)], u64::MAX), None);
        assert_eq!(from_runs(&[(u64::MAX, 2)], 10), None);
        assert_eq!(to_runs(&[3, 4, 5, 9]), vec![(3, 3), (9, 1)]);
    }

    #[test]
    fn a_fault_asks_for_the_page_and_the_next_outstanding_ones() {
        // Outstanding: 10, 12, 14, ... 98 (every even page from 10), in 128 pages.
        let out: Vec<u64> = (5..50).map(|i| i * 2).collect();
        let mut a = Arrivals::new(128, &out).unwrap();
        assert_eq!(a.remaining(), 45);
        // A page the source never had is zero here.
        assert_eq!(a.fault(11).unwrap(), FaultAction::Zero);
        assert_eq!(a.fault(3).unwrap(), FaultAction::Zero);
        let FaultAction::Request(ask) = a.fault(20).unwrap() else {
            panic!("no request")
        };
        assert_eq!(ask, (10..26).map(|i| i * 2).collect::<Vec<u64>>());
        assert_eq!(a.fault(20).unwrap(), FaultAction::Wait);
        assert_eq!(a.fault(22).unwrap(), FaultAction::Wait);
        // A fault just before the window asks only for what nobody asked for yet.
        let FaultAction::Request(ask) = a.fault(18).unwrap() else {
            panic!("no request")
        };
        assert_eq!(ask[0], 18);
        assert!(ask[1..].iter().all(|&p| p >= 52), "{ask:?}");
        // Arrival settles a page; a fault reported late finds it present.
        assert!(a.arrived(20).unwrap());
        assert!(!a.arrived(20).unwrap(), "a duplicate");
        assert_eq!(a.fault(20).unwrap(), FaultAction::Present);
        assert!(!a.arrived(11).unwrap(), "never outstanding");
        assert_eq!(a.remaining(), 44);
        // Pages the destination zeroed: no longer awaited, zero when touched, dropped when
        // they arrive; an arrived one is zero too.
        a.dropped(98).unwrap();
        assert_eq!(a.remaining(), 43);
        assert_eq!(a.fault(98).unwrap(), FaultAction::Zero);
        assert!(!a.arrived(98).unwrap());
        a.dropped(20).unwrap();
        assert_eq!(a.fault(20).unwrap(), FaultAction::Zero);
        a.dropped(11).unwrap();
        assert_eq!(a.fault(11).unwrap(), FaultAction::Zero);
        assert_eq!(a.remaining(), 43);
        a.dropped(98).unwrap();
        assert_eq!(a.remaining(), 43);
        assert_eq!(a.fault(128), Err(OutOfRange(128)));
        assert_eq!(Arrivals::new(8, &[8]).err(), Some(OutOfRange(8)));
    }

    #[test]
    fn requests_jump_the_background_push_and_nothing_goes_twice() {
        let mut p = Pusher::new(&[5, 1, 3, 9, 7, 3]);
        assert_eq!(p.remaining(), 5);
        assert_eq!(p.next_batch(2), vec![1, 3]);
        p.request(&[9, 3, 4, 9]);
        // 9 asked (3 already sent, 4 never outstanding); then the push goes on: 5, 7.
        assert_eq!(p.next_batch(10), vec![9, 5, 7]);
        assert!(p.done());
        assert!(p.next_batch(4).is_empty());
    }

    proptest! {
        /// Whatever the guest touches and whenever pages arrive, every outstanding page is
        /// sent once and arrives once, nothing else is asked for, and the run completes.
        #[test]
        fn every_outstanding_page_crosses_exactly_once(
            pages in 1u64..300,
            picks in proptest::collection::vec(any::<u16>(), 0..200),
            touches in proptest::collection::vec((any::<u16>(), 1usize..8), 0..100),
        ) {
            let out: Vec<u64> = picks.iter().map(|&x| u64::from(x) % pages).collect();
            let mut dst = Arrivals::new(pages, &out).unwrap();
            let mut src = Pusher::new(&out);
            let total = dst.remaining();
            let mut crossed = std::collections::HashSet::new();
            let mut touches = touches.into_iter();
            loop {
                // The guest touches a page, then a few pages cross.
                let batch = match touches.next() {
                    Some((t, n)) => {
                        let gpn = u64::from(t) % pages;
                        match dst.fault(gpn).unwrap() {
                            FaultAction::Request(ask) => {
                                prop_assert!(!ask.is_empty() && ask[0] == gpn);
                                prop_assert!(ask.iter().all(|p| out.contains(p)));
                                src.request(&ask);
                            }
                            FaultAction::Zero => prop_assert!(!out.contains(&gpn)),
                            FaultAction::Wait | FaultAction::Present => {
                                prop_assert!(out.contains(&gpn))
                            }
                        }
                        src.next_batch(n)
                    }
                    None => src.next_batch(64),
                };
                if batch.is_empty() {
                    break;
                }
                for p in batch {
                    prop_assert!(crossed.insert(p), "page {} sent twice", p);
                    prop_assert!(dst.arrived(p).unwrap());
                }
            }
            prop_assert_eq!(crossed.len(), total);
            prop_assert!(dst.complete() && src.done());
        }
    }
}
