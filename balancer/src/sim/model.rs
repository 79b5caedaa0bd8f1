//! Analytic (mean-field) model of information age in the MOSIX window.
//!
//! Every step each of `n` nodes sends its own entry (age 0) plus its `w` freshest entries to
//! one random node, so a node receives K ~ Binomial(n−1, 1/(n−1)) messages per step. Let G(a)
//! be the expected number of entries of age ≤ a steps in a window just after a step's merges.
//! The candidates of age ≤ a are the node's own entries of age ≤ a−1 (one step older now) and,
//! from each of the K messages, the sender's own entry plus its entries of age ≤ a−1:
//! C(a) = G(a−1) + K·(1 + G(a−1)), C(0) = K. Candidates name random nodes among the M = n−1
//! others, so they cover D(C) = M·(1 − e^(−C/M)) distinct nodes, and the window keeps the
//! freshest W = min(w, M): G(a) = E_K[min(W, D(C(a)))]. The mean age just after the merges is
//! Σ_a (1 − G(a)/W); averaged over the step between merges it is half a step more.

/// Probabilities of receiving k = 0..kmax messages in a step.
fn arrivals(n: usize, kmax: usize) -> Vec<f64> {
    let m = (n.max(2) - 1) as f64;
    let p = 1.0 / m;
    // Binomial(m, p) by the recurrence P(k+1) = P(k)·(m−k)/(k+1)·p/(1−p).
    let mut out = Vec::with_capacity(kmax + 1);
    if n <= 2 {
        out.push(0.0);
        out.push(1.0);
        return out;
    }
    let mut pk = (1.0 - p).powf(m);
    for k in 0..=kmax {
        out.push(pk);
        let kf = k as f64;
        if kf >= m {
            break;
        }
        pk *= (m - kf) / (kf + 1.0) * p / (1.0 - p);
    }
    out
}

/// Mean age, in steps, of the entries in a window of `w` entries in a cluster of `n` nodes.
pub fn mean_age_steps(n: usize, w: usize) -> f64 {
    if n < 2 || w == 0 {
        return 0.0;
    }
    let m = (n - 1) as f64;
    let cap = (w as f64).min(m);
    let pk = arrivals(n, 30);
    let mut g_prev: Option<f64> = None;
    let mut age = 0.0;
    for _ in 0..10_000 {
        let g = pk
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let k = k as f64;
                // Own entries are distinct already; received ones name random nodes.
                let (own, fresh) = match g_prev {
                    None => (0.0, k),
                    Some(g) => (g, k * (1.0 + g)),
                };
                let d = own + (m - own).max(0.0) * (1.0 - (-fresh / m).exp());
                p * d.min(cap)
            })
            .sum::<f64>();
        age += 1.0 - g / cap;
        if 1.0 - g / cap < 1e-9 {
            break;
        }
        g_prev = Some(g);
    }
    age + 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_probabilities_sum_to_one() {
        for n in [3, 4, 16, 1000] {
            let s: f64 = arrivals(n, 30).iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "n={n} sum={s}");
        }
    }

    #[test]
    fn age_grows_with_window_and_saturates_with_cluster_size() {
        // Larger windows hold older entries; for n >> w the age is set by w alone.
        assert!(mean_age_steps(10_000, 16) > mean_age_steps(10_000, 4));
        let a = mean_age_steps(1_000, 8);
        let b = mean_age_steps(10_000, 8);
        assert!((a - b).abs() < 0.05 * b, "{a} vs {b}");
        // A doubling epidemic: about log2(w) steps plus a small constant.
        let x = mean_age_steps(10_000, 8);
        assert!(x > 2.0 && x < 5.0, "{x}");
    }
}
