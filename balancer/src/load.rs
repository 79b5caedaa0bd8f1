//! Load: run-queue length normalised by CPU count and relative speed, smoothed so that the
//! advertised value rises fast and falls slowly, and the CPU speed calibration loop.

use serde::{Deserialize, Serialize};

/// Normalised load of `runnable` processes on `cpus` CPUs of relative speed `speed`.
pub fn normalised(runnable: f64, cpus: f64, speed: f64) -> f64 {
    runnable.max(0.0) / (cpus.max(0.01) * speed.max(1e-3))
}

/// Rise-fast/fall-slow exponential smoothing of a load signal (damps oscillation: a node that
/// just shed work keeps looking busy for a few samples, so others do not rush to it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Smoother {
    /// Weight of a new sample that is above the current value (close to 1: rise fast).
    pub rise: f64,
    /// Weight of a new sample that is below the current value (small: fall slowly).
    pub fall: f64,
    /// Current smoothed value.
    pub value: f64,
}

impl Smoother {
    /// A smoother starting at zero.
    pub fn new(rise: f64, fall: f64) -> Smoother {
        Smoother {
            rise: rise.clamp(0.0, 1.0),
            fall: fall.clamp(0.0, 1.0),
            value: 0.0,
        }
    }

    /// Feed one sample; returns the new smoothed value.
    pub fn sample(&mut self, x: f64) -> f64 {
        let w = if x > self.value { self.rise } else { self.fall };
        self.value += w * (x - self.value);
        self.value
    }
}

/// Work units done by the calibration loop per call of [`calibration_work`].
pub const CALIBRATION_UNITS: u64 = 2_000_000;

/// The fixed integer workload whose run time measures a node's relative CPU speed. The node
/// service times it at start (this crate reads no clock) and passes
/// `reference_seconds / measured_seconds` as [`crate::Config::speed`], unless the operator
/// overrides the speed.
pub fn calibration_work(seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut acc = 0u64;
    for i in 0..CALIBRATION_UNITS {
        // xorshift64: a data-dependent chain the optimiser cannot fold away.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x ^ i);
    }
    acc
}

/// Relative speed from a measured calibration time, given the reference machine's time.
/// Returns 1.0 for nonsensical measurements.
pub fn speed_from_calibration(reference_secs: f64, measured_secs: f64) -> f64 {
    if reference_secs > 0.0 && measured_secs > 0.0 && measured_secs.is_finite() {
        (reference_secs / measured_secs).clamp(0.05, 20.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_fast_falls_slowly() {
        let mut s = Smoother::new(0.8, 0.2);
        let up = s.sample(10.0);
        assert!((up - 8.0).abs() < 1e-9);
        let down = s.sample(0.0);
        assert!((down - 6.4).abs() < 1e-9);
    }

    #[test]
    fn normalisation_by_cpus_and_speed() {
        assert_eq!(normalised(4.0, 2.0, 2.0), 1.0);
        assert_eq!(normalised(1.0, 0.5, 1.0), 2.0);
    }

    #[test]
    fn calibration_speed() {
        assert_eq!(speed_from_calibration(1.0, 0.5), 2.0);
        assert_eq!(speed_from_calibration(1.0, 0.0), 1.0);
        assert_ne!(calibration_work(1), calibration_work(2));
    }
}
