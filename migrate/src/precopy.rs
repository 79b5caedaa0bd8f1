//! The pre-copy planner: a sans-IO state machine that decides, after each round, whether to
//! send the dirty set again, throttle the guest, or switch over.
//!
//! The caller (the source VMM's migration loop) sends the first pass of touched pages, then
//! after every round reports what it measured ([`RoundStats`]: pages and bytes sent, elapsed
//! time, pages the guest dirtied meanwhile). The planner keeps an EWMA of the link bandwidth
//! and answers with a [`Decision`]:
//!
//! - [`Decision::SwitchOver`] when the remaining dirty pages plus the vCPU/VMM state fit the
//!   downtime budget at the measured bandwidth, or forced after `max_rounds`, or when the
//!   guest keeps out-running the link even at the strongest throttle;
//! - [`Decision::Throttle`] when the guest dirtied at least as much as the round drained: the
//!   VMM should take that fraction of vCPU time away, then send the dirty set again;
//! - [`Decision::NextRound`] otherwise.
//!
//! Time is an input (nanoseconds measured by the caller), so runs are exactly reproducible.

use crate::pages::PAGE_SIZE;

/// Bytes a dirty page is assumed to cost on the wire at switch-over: uncompressed, non-zero,
/// plus its page number. Pessimistic on purpose: the downtime budget is a promise.
pub const WIRE_PAGE_BYTES: u64 = PAGE_SIZE as u64 + 8;

/// Planner settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Longest acceptable pause of the guest, in nanoseconds (default 2 ms: a further round
    /// costs little more than one round trip on a LAN).
    pub downtime_budget_ns: u64,
    /// Rounds after which switch-over is forced (default 30; the first pass is round 1).
    pub max_rounds: u32,
    /// The fraction by which a round must shrink the dirty set to count as progress: a round
    /// progressed when `dirtied <= (1 - min_progress) * sent` (default 0.1).
    pub min_progress: f64,
    /// Weight of the newest bandwidth sample in the EWMA (default 0.5).
    pub ewma_alpha: f64,
    /// The dirtied/sent ratio a throttle aims for (default 0.5: each round halves the set).
    pub throttle_target: f64,
    /// Smallest throttle increase (default 0.2).
    pub throttle_step: f64,
    /// Strongest throttle: the fraction of vCPU time taken away (default 0.99).
    pub max_throttle: f64,
    /// Rounds without progress at the strongest throttle before switch-over is forced
    /// (default 2).
    pub stall_rounds: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            downtime_budget_ns: 2_000_000,
            max_rounds: 30,
            min_progress: 0.1,
            ewma_alpha: 0.5,
            throttle_target: 0.5,
            throttle_step: 0.2,
            max_throttle: 0.99,
            stall_rounds: 2,
        }
    }
}

/// What the caller measured during one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundStats {
    /// Pages sent this round (zero pages included).
    pub pages_sent: u64,
    /// Bytes written to the link this round (frames, after compression).
    pub bytes_sent: u64,
    /// Wall time the round took, in nanoseconds.
    pub elapsed_ns: u64,
    /// Pages the guest dirtied during the round (KVM dirty log OR the VMM's own writes): the
    /// next round's set.
    pub dirtied_pages: u64,
}

/// Why the planner switched over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SwitchReason {
    /// The estimated downtime fits the budget.
    Converged { estimated_downtime_ns: u64 },
    /// Nothing is dirty; more rounds cannot shorten the pause.
    Drained { estimated_downtime_ns: Option<u64> },
    /// `max_rounds` reached.
    MaxRounds { estimated_downtime_ns: Option<u64> },
    /// The guest out-ran the link for `stall_rounds` rounds at the strongest throttle.
    NoProgress { estimated_downtime_ns: Option<u64> },
}

/// The planner's answer after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Send the dirty set again.
    NextRound,
    /// Slow the vCPU by this fraction of its time (0..1), then send the dirty set again.
    Throttle(f64),
    /// Pause the guest, send the last dirty pages and the vCPU/VMM state.
    SwitchOver(SwitchReason),
}

/// The pre-copy state machine.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: Config,
    round: u32,
    /// Bandwidth estimate in bytes per nanosecond.
    bandwidth: Option<f64>,
    state_bytes: u64,
    state_fixed_ns: u64,
    throttle: f64,
    stalled: u32,
    done: Option<Decision>,
}

impl Planner {
    pub fn new(cfg: Config) -> Planner {
        Planner {
            cfg,
            round: 0,
            bandwidth: None,
            state_bytes: 0,
            state_fixed_ns: 0,
            throttle: 0.0,
            stalled: 0,
            done: None,
        }
    }

    /// Records the cost of the final state transfer: the encoded vCPU/VMM state's size (sent at
    /// the measured bandwidth) and the measured fixed time to capture it and restore it.
    pub fn set_state_cost(&mut self, state_bytes: u64, fixed_ns: u64) {
        self.state_bytes = state_bytes;
        self.state_fixed_ns = fixed_ns;
    }

    /// Rounds reported so far.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// The throttle currently asked for (0 = none).
    pub fn throttle(&self) -> f64 {
        self.throttle
    }

    /// The bandwidth estimate, in bytes per second.
    pub fn bandwidth_bytes_per_sec(&self) -> Option<f64> {
        self.bandwidth.map(|b| b * 1e9)
    }

    /// The pause switch-over would cost now with `dirty_pages` left, in nanoseconds: the pages
    /// at [`WIRE_PAGE_BYTES`] each plus the state, at the estimated bandwidth, plus the state's
    /// fixed cost. `None` before any bandwidth was measured.
    pub fn estimate_downtime_ns(&self, dirty_pages: u64) -> Option<u64> {
        let bw = self.bandwidth?;
        let bytes = dirty_pages.saturating_mul(WIRE_PAGE_BYTES) as f64 + self.state_bytes as f64;
        let ns = (bytes / bw).ceil();
        Some((ns as u64).saturating_add(self.state_fixed_ns))
    }

    /// Feeds one finished round and returns what to do next. After a switch-over every further
    /// call returns that same decision.
    pub fn round_finished(&mut self, s: RoundStats) -> Decision {
        if let Some(d) = self.done {
            return d;
        }
        self.round += 1;
        if s.elapsed_ns > 0 && s.bytes_sent > 0 {
            let sample = s.bytes_sent as f64 / s.elapsed_ns as f64;
            let a = self.cfg.ewma_alpha.clamp(0.0, 1.0);
            self.bandwidth = Some(match self.bandwidth {
                None => sample,
                Some(b) => a * sample + (1.0 - a) * b,
            });
        }
        let est = self.estimate_downtime_ns(s.dirtied_pages);
        if let Some(e) = est {
            if e <= self.cfg.downtime_budget_ns {
                return self.finish(SwitchReason::Converged {
                    estimated_downtime_ns: e,
                });
            }
        }
        if s.dirtied_pages == 0 {
            return self.finish(SwitchReason::Drained {
                estimated_downtime_ns: est,
            });
        }
        if self.round >= self.cfg.max_rounds {
            return self.finish(SwitchReason::MaxRounds {
                estimated_downtime_ns: est,
            });
        }
        let target = (1.0 - self.cfg.min_progress).clamp(0.0, 1.0);
        let progressed = s.pages_sent > 0 && s.dirtied_pages as f64 <= target * s.pages_sent as f64;
        if progressed {
            self.stalled = 0;
            return Decision::NextRound;
        }
        if self.throttle < self.cfg.max_throttle {
            // The guest's dirty rate scales with the vCPU time it gets: choose the speed at
            // which it would dirty `throttle_target` of what the link drains, and at least one
            // step more than now.
            let needed = if s.pages_sent > 0 {
                let ratio = s.dirtied_pages as f64 / s.pages_sent as f64;
                let aim = self.cfg.throttle_target.clamp(0.0, 1.0);
                1.0 - (1.0 - self.throttle) * aim / ratio
            } else {
                0.0
            };
            self.throttle = needed
                .max(self.throttle + self.cfg.throttle_step)
                .min(self.cfg.max_throttle);
            return Decision::Throttle(self.throttle);
        }
        self.stalled += 1;
        if self.stalled >= self.cfg.stall_rounds {
            return self.finish(SwitchReason::NoProgress {
                estimated_downtime_ns: est,
            });
        }
        Decision::NextRound
    }

    fn finish(&mut self, r: SwitchReason) -> Decision {
        let d = Decision::SwitchOver(r);
        self.done = Some(d);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 byte per ns = 1 GB/s.
    fn round(pages: u64, dirtied: u64) -> RoundStats {
        RoundStats {
            pages_sent: pages,
            bytes_sent: pages * WIRE_PAGE_BYTES,
            elapsed_ns: pages * WIRE_PAGE_BYTES,
            dirtied_pages: dirtied,
        }
    }

    #[test]
    fn idle_guest_switches_over_after_the_first_pass() {
        let mut p = Planner::new(Config::default());
        p.set_state_cost(64 << 10, 200_000);
        match p.round_finished(round(100_000, 3)) {
            Decision::SwitchOver(SwitchReason::Converged {
                estimated_downtime_ns,
            }) => assert_eq!(
                estimated_downtime_ns,
                3 * WIRE_PAGE_BYTES + (64 << 10) + 200_000
            ),
            d => panic!("expected switch-over, got {d:?}"),
        }
        assert_eq!(p.round(), 1);
        // Further events do not reopen the decision.
        assert!(matches!(
            p.round_finished(round(1, 1_000_000)),
            Decision::SwitchOver(SwitchReason::Converged { .. })
        ));
    }

    #[test]
    fn lightly_dirtying_guest_switches_over_in_round_two() {
        let mut p = Planner::new(Config::default());
        // 5000 dirty pages = 20.5 ms at 1 GB/s: over budget, but progress.
        assert_eq!(p.round_finished(round(200_000, 5000)), Decision::NextRound);
        assert!(matches!(
            p.round_finished(round(5000, 40)),
            Decision::SwitchOver(SwitchReason::Converged { .. })
        ));
        assert_eq!(p.round(), 2);
        assert_eq!(p.throttle(), 0.0);
    }

    #[test]
    fn downtime_estimate_matches_the_arithmetic() {
        let mut p = Planner::new(Config::default());
        assert_eq!(p.estimate_downtime_ns(10), None);
        // 100 MB/s: 1e8 bytes/s = 0.1 bytes/ns.
        p.round_finished(RoundStats {
            pages_sent: 1000,
            bytes_sent: 100_000_000,
            elapsed_ns: 1_000_000_000,
            dirtied_pages: 900_000,
        });
        assert_eq!(p.bandwidth_bytes_per_sec(), Some(1e8));
        p.set_state_cost(50_000, 300_000);
        // 1000 pages * 4104 B + 50 kB = 4_154_000 B at 0.1 B/ns = 41.54 ms, plus 0.3 ms.
        assert_eq!(p.estimate_downtime_ns(1000), Some(41_540_000 + 300_000));
        // A second round at 300 MB/s: EWMA(0.5) = 200 MB/s halves the transfer part.
        p.round_finished(RoundStats {
            pages_sent: 1000,
            bytes_sent: 300_000_000,
            elapsed_ns: 1_000_000_000,
            dirtied_pages: 900_000,
        });
        assert_eq!(p.bandwidth_bytes_per_sec(), Some(2e8));
        assert_eq!(p.estimate_downtime_ns(1000), Some(20_770_000 + 300_000));
    }

    #[test]
    fn state_cost_counts_against_the_budget() {
        let mut p = Planner::new(Config::default());
        let budget = Config::default().downtime_budget_ns;
        p.set_state_cost(0, budget - 1_000);
        // 1 dirty page = 4104 ns: budget - 1000 + 4104 > budget.
        assert_eq!(p.round_finished(round(10_000, 1)), Decision::NextRound);
        assert!(matches!(
            p.round_finished(round(1, 0)),
            Decision::SwitchOver(SwitchReason::Converged { .. })
        ));
    }

    #[test]
    fn nothing_dirty_but_a_slow_state_switches_over_at_once() {
        let mut p = Planner::new(Config::default());
        p.set_state_cost(0, 50_000_000);
        assert!(matches!(
            p.round_finished(round(10_000, 0)),
            Decision::SwitchOver(SwitchReason::Drained {
                estimated_downtime_ns: Some(50_000_000)
            })
        ));
    }

    /// A guest dirtying `rate` pages per ns of full-speed vCPU time, over a working set.
    fn simulate(p: &mut Planner, rate: f64, working_set: u64, first: u64) -> Vec<Decision> {
        let mut to_send = first;
        let mut out = vec![];
        for _ in 0..100 {
            let elapsed = to_send * WIRE_PAGE_BYTES; // 1 B/ns link
            let dirtied = ((rate * (1.0 - p.throttle()) * elapsed as f64) as u64).min(working_set);
            let d = p.round_finished(RoundStats {
                pages_sent: to_send,
                bytes_sent: to_send * WIRE_PAGE_BYTES,
                elapsed_ns: elapsed,
                dirtied_pages: dirtied,
            });
            out.push(d);
            if matches!(d, Decision::SwitchOver(_)) {
                return out;
            }
            to_send = dirtied;
        }
        panic!("planner never switched over: {out:?}");
    }

    #[test]
    fn a_guest_faster_than_the_link_is_throttled_then_forced() {
        let mut p = Planner::new(Config::default());
        // The link drains 1/4104 pages per ns; the guest dirties 1000 times that.
        let rate = 1000.0 / WIRE_PAGE_BYTES as f64;
        let ds = simulate(&mut p, rate, 50_000, 50_000);
        let throttles: Vec<f64> = ds
            .iter()
            .filter_map(|d| match d {
                Decision::Throttle(f) => Some(*f),
                _ => None,
            })
            .collect();
        assert!(!throttles.is_empty(), "{ds:?}");
        assert!(throttles.windows(2).all(|w| w[1] > w[0]), "{throttles:?}");
        assert_eq!(*throttles.last().unwrap(), 0.99);
        assert!(matches!(
            ds.last(),
            Some(Decision::SwitchOver(SwitchReason::NoProgress { .. }))
        ));
        assert!(p.round() < 30, "forced by stalling, not by the round limit");
    }

    #[test]
    fn a_moderately_fast_guest_converges_once_throttled() {
        let mut p = Planner::new(Config::default());
        // Twice the link's drain rate over a large working set: throttled to a quarter speed
        // (it then dirties half of what the link drains).
        let rate = 2.0 / WIRE_PAGE_BYTES as f64;
        let ds = simulate(&mut p, rate, 10_000_000, 250_000);
        assert!(
            matches!(ds[0], Decision::Throttle(f) if (f - 0.75).abs() < 1e-9),
            "{ds:?}"
        );
        assert_eq!(
            ds.iter()
                .filter(|d| matches!(d, Decision::Throttle(_)))
                .count(),
            1
        );
        assert!(matches!(
            ds.last(),
            Some(Decision::SwitchOver(SwitchReason::Converged { .. }))
        ));
        assert!(p.throttle() < 0.99);
    }

    #[test]
    fn slow_progress_is_forced_at_max_rounds() {
        let cfg = Config {
            max_rounds: 30,
            ..Config::default()
        };
        let mut p = Planner::new(cfg);
        let mut pages = 10_000_000u64;
        let mut last = Decision::NextRound;
        for _ in 0..30 {
            let dirtied = pages * 85 / 100;
            last = p.round_finished(round(pages, dirtied));
            if matches!(last, Decision::SwitchOver(_)) {
                break;
            }
            assert_eq!(last, Decision::NextRound);
            pages = dirtied;
        }
        assert_eq!(p.round(), 30);
        assert!(matches!(
            last,
            Decision::SwitchOver(SwitchReason::MaxRounds {
                estimated_downtime_ns: Some(ns)
            }) if ns > 10_000_000
        ));
    }

    #[test]
    fn no_bandwidth_sample_means_no_estimate_and_another_round() {
        let mut p = Planner::new(Config::default());
        let d = p.round_finished(RoundStats {
            pages_sent: 10,
            bytes_sent: 0,
            elapsed_ns: 0,
            dirtied_pages: 5,
        });
        assert_eq!(d, Decision::NextRound);
        assert_eq!(p.bandwidth_bytes_per_sec(), None);
    }
}
