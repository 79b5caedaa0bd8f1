//! Seeded clusters and workloads. The whole job list is generated up front from the seed, so
//! every policy sees exactly the same arrivals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A node's hardware.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// CPUs.
    pub cpus: u32,
    /// Relative speed.
    pub speed: f64,
    /// Memory for processes, MiB.
    pub mem_mb: u64,
    /// When it joins (0 for the initial nodes), seconds.
    pub joins_at: f64,
}

impl NodeSpec {
    /// CPUs × speed.
    pub fn capacity(&self) -> f64 {
        f64::from(self.cpus) * self.speed
    }
}

/// One process to run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Arrival time, seconds.
    pub arrival: f64,
    /// Home node (where it is started).
    pub home: u32,
    /// CPU work, seconds on the reference CPU.
    pub work: f64,
    /// Memory, MiB.
    pub mem_mb: u32,
    /// Fraction of its system calls that must go home.
    pub home_fraction: f64,
}

/// The workload families of the issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Poisson arrivals, bounded-Pareto lifetimes (α = 1).
    Pareto,
    /// Poisson arrivals, exponential lifetimes of the same mean (the control).
    Exp,
    /// Pareto background plus bursts of many processes on one node.
    Hotspot,
    /// An overloaded cluster that idle nodes join a third of the way through.
    Join,
    /// Memory-hungry processes that thrash when a node's memory is overcommitted.
    Memory,
}

impl WorkloadKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Pareto => "pareto",
            WorkloadKind::Exp => "exp",
            WorkloadKind::Hotspot => "hotspot",
            WorkloadKind::Join => "join",
            WorkloadKind::Memory => "memory",
        }
    }
}

/// Parameters of a generated scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioSpec {
    /// Workload family.
    pub kind: WorkloadKind,
    /// Initial nodes.
    pub nodes: u32,
    /// Arrivals stop after this many seconds.
    pub duration: f64,
    /// Offered load: mean CPU demand per second / total capacity of the initial nodes.
    pub load: f64,
    /// Mean CPU work per process, reference seconds.
    pub mean_work: f64,
    /// Bounded-Pareto max/min ratio.
    pub pareto_ratio: f64,
    /// Fraction of processes whose system calls mostly go home.
    pub home_bound: f64,
    /// Arrivals uniform over nodes (small nodes overloaded) instead of proportional to
    /// capacity (every node offered the same load).
    pub uniform_arrivals: bool,
    /// Largest CPU count drawn for a node (from 1, 2, 4, 8).
    pub max_cpus: u32,
    /// Seed.
    pub seed: u64,
}

/// A generated scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// All nodes, initial ones first, then joiners.
    pub nodes: Vec<NodeSpec>,
    /// Jobs sorted by arrival.
    pub jobs: Vec<Job>,
}

/// Bounded Pareto with shape 1 on [k, k·ratio] with the given mean: returns k.
pub fn bounded_pareto_min(mean: f64, ratio: f64) -> f64 {
    mean * (ratio - 1.0) / (ratio * ratio.ln())
}

/// Draw from a bounded Pareto (shape `alpha`) on [k, p] by inverting its CDF.
pub fn bounded_pareto(rng: &mut impl Rng, alpha: f64, k: f64, p: f64) -> f64 {
    let u: f64 = rng.random();
    let r = (k / p).powf(alpha);
    k / (1.0 - u * (1.0 - r)).powf(1.0 / alpha)
}

fn exp(rng: &mut impl Rng, mean: f64) -> f64 {
    let u: f64 = rng.random();
    -mean * (1.0 - u).ln()
}

fn node_spec(rng: &mut impl Rng, memory_tight: bool, max_cpus: u32) -> NodeSpec {
    let choices: Vec<u32> = [1, 2, 4, 8]
        .into_iter()
        .filter(|&c| c <= max_cpus.max(1))
        .collect();
    let cpus = choices[rng.random_range(0..choices.len())];
    let speed = 0.5 + 1.5 * rng.random::<f64>();
    let mem_mb = if memory_tight {
        [2048, 4096, 8192][rng.random_range(0..3)]
    } else {
        [4096, 8192, 16384, 32768][rng.random_range(0..4)]
    };
    NodeSpec {
        cpus,
        speed,
        mem_mb,
        joins_at: 0.0,
    }
}

/// Generate the scenario for `spec`.
pub fn generate(spec: &ScenarioSpec) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x6d6f_7376_6d5f_7369);
    let tight = spec.kind == WorkloadKind::Memory;
    let mut nodes: Vec<NodeSpec> = (0..spec.nodes)
        .map(|_| node_spec(&mut rng, tight, spec.max_cpus))
        .collect();
    let capacity: f64 = nodes.iter().map(NodeSpec::capacity).sum();
    if spec.kind == WorkloadKind::Join {
        let joiners = (spec.nodes / 32).max(1);
        for _ in 0..joiners {
            let mut n = node_spec(&mut rng, false, spec.max_cpus);
            n.joins_at = spec.duration / 3.0;
            nodes.push(n);
        }
    }
    let load = if spec.kind == WorkloadKind::Join {
        spec.load.max(0.95)
    } else {
        spec.load
    };
    let k = bounded_pareto_min(spec.mean_work, spec.pareto_ratio);
    let p = k * spec.pareto_ratio;
    let draw_work = |rng: &mut ChaCha8Rng| match spec.kind {
        WorkloadKind::Exp => exp(rng, spec.mean_work),
        _ => bounded_pareto(rng, 1.0, k, p),
    };
    let draw_mem = |rng: &mut ChaCha8Rng| -> u32 {
        if tight && rng.random::<f64>() < 0.10 {
            // Memory-hungry: 256 MiB to 2 GiB.
            256 + rng.random_range(0..1792)
        } else {
            // Log-uniform 8 MiB to 512 MiB.
            (8.0 * 64f64.powf(rng.random::<f64>())) as u32
        }
    };
    // Cumulative capacity of the initial nodes, to pick homes in proportion to capacity.
    let mut cum = Vec::with_capacity(spec.nodes as usize);
    let mut acc = 0.0;
    for n in nodes.iter().take(spec.nodes as usize) {
        acc += n.capacity();
        cum.push(acc);
    }
    let pick_home = |rng: &mut ChaCha8Rng| -> u32 {
        if spec.uniform_arrivals {
            rng.random_range(0..spec.nodes)
        } else {
            let x = rng.random::<f64>() * acc;
            (cum.partition_point(|&c| c <= x) as u32).min(spec.nodes - 1)
        }
    };
    let mut jobs = Vec::new();
    // Hotspots take a third of the offered load as bursts.
    let (poisson_share, burst_share) = if spec.kind == WorkloadKind::Hotspot {
        (2.0 / 3.0, 1.0 / 3.0)
    } else {
        (1.0, 0.0)
    };
    let lambda = poisson_share * load * capacity / spec.mean_work;
    if lambda > 0.0 {
        let mut t = exp(&mut rng, 1.0 / lambda);
        while t < spec.duration {
            let home = pick_home(&mut rng);
            let work = draw_work(&mut rng);
            let mem_mb = draw_mem(&mut rng);
            let home_fraction = if rng.random::<f64>() < spec.home_bound {
                0.5 + 0.5 * rng.random::<f64>()
            } else {
                0.05 * rng.random::<f64>()
            };
            jobs.push(Job {
                arrival: t,
                home,
                work,
                mem_mb,
                home_fraction,
            });
            t += exp(&mut rng, 1.0 / lambda);
        }
    }
    if burst_share > 0.0 {
        // Bursts of 16 processes per CPU of the struck node, spread over the run.
        let burst_work = burst_share * load * capacity * spec.duration;
        let mut done = 0.0;
        while done < burst_work {
            let t = rng.random::<f64>() * spec.duration;
            let home = pick_home(&mut rng);
            let count = 16 * nodes[home as usize].cpus;
            for i in 0..count {
                let work = draw_work(&mut rng);
                done += work;
                jobs.push(Job {
                    arrival: t + f64::from(i) * 1e-3,
                    home,
                    work,
                    mem_mb: draw_mem(&mut rng),
                    home_fraction: 0.05 * rng.random::<f64>(),
                });
            }
        }
    }
    jobs.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Scenario { nodes, jobs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_pareto_has_requested_mean_and_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let k = bounded_pareto_min(10.0, 1000.0);
        let n = 200_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let x = bounded_pareto(&mut rng, 1.0, k, 1000.0 * k);
            assert!(x >= k && x <= 1000.0 * k);
            sum += x;
        }
        let mean = sum / f64::from(n);
        assert!((mean - 10.0).abs() < 0.5, "mean {mean}");
    }

    #[test]
    fn same_seed_same_workload_and_offered_load() {
        let spec = ScenarioSpec {
            kind: WorkloadKind::Exp,
            nodes: 16,
            duration: 2000.0,
            load: 0.5,
            mean_work: 10.0,
            pareto_ratio: 1000.0,
            home_bound: 0.2,
            uniform_arrivals: false,
            max_cpus: 8,
            seed: 3,
        };
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a, b);
        let cap: f64 = a.nodes.iter().map(NodeSpec::capacity).sum();
        let demand: f64 = a.jobs.iter().map(|j| j.work).sum::<f64>() / spec.duration;
        assert!(
            (demand / cap - 0.5).abs() < 0.05,
            "offered {}",
            demand / cap
        );
    }
}
