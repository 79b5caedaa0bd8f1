//! Analytic (mean-field) model of information age in the MOSIX window.
//!
//! Each of `n` nodes, at its own phase, sends its own entry (age 0) plus its `w` freshest
//! entries to one random node once per step, so messages reach a node about as a Poisson
//! process of rate 1 per step, each carrying the sender's window at a random moment. Time is
//! measured in steps. Let G(a) be the expected number of entries of age ≤ a in a window at a
//! random instant. The entries of age ≤ a held now are exactly those received in the last `a`
//! steps that were at most `a − s` old when received `s` steps ago: from each such message, the
//! sender's own entry and about G(a − s) of its window. With N ~ Poisson(λa) messages at
//! uniform times, that is C = N·(1 + Ḡ(a)) candidates, Ḡ(a) = (1/a)∫₀ᵃ G. Candidates name
//! random nodes among the M = n − 1 others, so they cover D(C) = M·(1 − (1 − 1/M)^C) distinct
//! nodes, and the window keeps the freshest W = min(w, M):
//!
//! G(a) = E_N[min(W, D(N·(1 + Ḡ(a))))],   mean age = ∫₀^∞ (1 − G(a)/W) da.
//!
//! For n ≫ w this is an epidemic that doubles about once per step, so the age grows like
//! log₂ w and does not depend on n: the property that lets the scheme scale. λ = −M·ln(1 − 1/M)
//! (→ 1 for large n) makes the chance that a given peer has not written to us in `a` steps
//! exact, which matters in small clusters.

/// Mean age, in steps, of the entries in a window of `w` entries in a cluster of `n` nodes.
pub fn mean_age_steps(n: usize, w: usize) -> f64 {
    if n < 2 || w == 0 {
        return 0.0;
    }
    let m = (n - 1) as f64;
    let cap = (w as f64).min(m);
    // Rate of the Poisson stand-in for message arrivals, chosen so that the chance a given
    // sender has not written to us in `a` steps is exact: e^(−λa/M) = (1 − 1/M)^a. It tends
    // to 1 for large n and corrects the small clusters, where each peer writes to us often.
    let lambda = if m > 1.0 {
        -m * (1.0 - 1.0 / m).ln()
    } else {
        1.0
    };
    // A candidate names a given other node with probability 1/M.
    let keep = 1.0 - 1.0 / m;
    let da = 0.005;
    let mut integral = 0.0; // ∫₀ᵃ G
    let mut age = 0.0;
    let mut a: f64 = 0.0;
    while a < 500.0 {
        let gbar = if a > 0.0 { integral / a } else { 0.0 };
        // E over N ~ Poisson(λa).
        let la = lambda * a;
        let nmax = (la + 12.0 * la.sqrt() + 20.0) as usize;
        let mut p = (-la).exp();
        let mut g = 0.0;
        for k in 0..=nmax {
            if k > 0 {
                p *= la / k as f64;
            }
            let c = k as f64 * (1.0 + gbar);
            g += p * (m * (1.0 - keep.powf(c))).min(cap);
        }
        let missing = 1.0 - g / cap;
        age += missing * da;
        integral += g * da;
        a += da;
        if missing < 1e-7 {
            break;
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_age_is_at_most_one_step() {
        // One peer, which sends its own fresh entry every step: the true age is uniform on
        // [0, 1), mean 0.5; the Poisson stand-in (rate 1) gives mean 1.
        let a = mean_age_steps(2, 8);
        assert!((0.5..=1.01).contains(&a), "{a}");
    }

    #[test]
    fn age_grows_with_window_and_saturates_with_cluster_size() {
        assert!(mean_age_steps(10_000, 16) > mean_age_steps(10_000, 4));
        let a = mean_age_steps(1_000, 8);
        let b = mean_age_steps(10_000, 8);
        assert!((a - b).abs() < 0.05 * b, "{a} vs {b}");
        let x = mean_age_steps(10_000, 8);
        assert!(x > 1.0 && x < 5.0, "{x}");
    }
}
