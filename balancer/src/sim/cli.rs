//! `mosvm sim`: command-line flags and entry point.

use super::engine::{simulate, RunStats, SimConfig, SimPolicy};
use super::report;
use super::workload::{generate, ScenarioSpec, WorkloadKind};
use crate::node::Params;
use crate::types::Time;
use anyhow::{bail, ensure, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Membership in the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SwimMode {
    /// SWIM up to 1024 nodes, the membership oracle above.
    Auto,
    /// Always run SWIM (foca) inside every node.
    On,
    /// Membership oracle: nodes learn joins and leaves instantly.
    Off,
}

/// Flags of `mosvm sim`.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of nodes (a join workload adds nodes/32 idle nodes, at least one, later).
    #[arg(long, default_value_t = 64)]
    pub nodes: u32,
    /// Simulated seconds of arrivals (processes still running then are drained).
    #[arg(long, default_value_t = 3600.0, conflicts_with = "hours")]
    pub duration: f64,
    /// Simulated hours of arrivals (alternative to --duration).
    #[arg(long)]
    pub hours: Option<f64>,
    /// Seed: same seed, same workload and same decisions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Workloads to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![WorkloadKind::Pareto, WorkloadKind::Exp])]
    pub workload: Vec<WorkloadKind>,
    /// Policies to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = SimPolicy::ALL.to_vec())]
    pub policy: Vec<SimPolicy>,
    /// Offered load: CPU demand / total capacity.
    #[arg(long, default_value_t = 0.7)]
    pub load: f64,
    /// Mean CPU work per process, seconds on a speed-1.0 CPU.
    #[arg(long, default_value_t = 10.0)]
    pub mean_work: f64,
    /// Bounded-Pareto max/min lifetime ratio.
    #[arg(long, default_value_t = 1000.0)]
    pub pareto_ratio: f64,
    /// Fraction of processes whose system calls mostly go home.
    #[arg(long, default_value_t = 0.2)]
    pub home_bound: f64,
    /// Spread arrivals uniformly over nodes (small nodes get overloaded) instead of in
    /// proportion to capacity (every node offered the same load).
    #[arg(long)]
    pub uniform_arrivals: bool,
    /// Largest CPU count of a node: CPUs are drawn from 1, 2, 4, 8 up to this (1 gives a
    /// cluster of uniprocessor workstations, as in MOSIX's day).
    #[arg(long, default_value_t = 8)]
    pub max_cpus: u32,
    /// Gossip window size w.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Gossip/decision step, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub step: f64,
    /// One-way network latency, milliseconds.
    #[arg(long, default_value_t = 1.0)]
    pub latency_ms: f64,
    /// Fixed migration cost, seconds.
    #[arg(long, default_value_t = 0.2)]
    pub migration_fixed: f64,
    /// Migration bandwidth, MiB/s.
    #[arg(long, default_value_t = 100.0)]
    pub migration_mbps: f64,
    /// Targets accept every balancing request that fits in memory (turns off the
    /// anti-herding refusal, to measure the herd it prevents).
    #[arg(long)]
    pub no_refusal: bool,
    /// A balancing move must raise the process's CPU rate by at least this fraction.
    #[arg(long, default_value_t = 0.3)]
    pub min_rate_gain: f64,
    /// The expected time saved must exceed this many times the migration cost.
    #[arg(long, default_value_t = 2.0)]
    pub cost_factor: f64,
    /// Processes younger than this many seconds are not moved automatically.
    #[arg(long, default_value_t = 1.0)]
    pub min_age: f64,
    /// At most this many migration requests per node per step.
    #[arg(long, default_value_t = 4)]
    pub max_requests: usize,
    /// Steps a node leaves an idle target to a more starved node before sending there
    /// itself (0: off).
    #[arg(long, default_value_t = 2)]
    pub defer_steps: u32,
    /// Membership: SWIM (foca) in every node, or an oracle.
    #[arg(long, value_enum, default_value_t = SwimMode::Auto)]
    pub swim: SwimMode,
    /// Per-process statistics period, seconds (0: only at start and on arrival).
    #[arg(long, default_value_t = 5.0)]
    pub stats_every: f64,
    /// Longest drain after arrivals stop, seconds (default: twice the duration).
    #[arg(long)]
    pub drain: Option<f64>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Instead of simulating, replay a trace a node recorded (`mosvm node --balancer-trace`)
    /// through the core, and report whether every decision comes out the same (exit 1 if not).
    #[arg(long)]
    pub replay: Option<std::path::PathBuf>,
    /// Also run the sweeps and write SVG plots into DIR.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
    /// Offered loads for the slowdown-vs-load plot.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.3, 0.5, 0.7, 0.85, 0.95])]
    pub sweep_loads: Vec<f64>,
    /// Cluster sizes for the messages/information-age plot.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4, 16, 64, 256, 1024, 4096, 10000])]
    pub sweep_nodes: Vec<u32>,
    /// Window sizes for the information-age-vs-window table (on min(largest swept size, 1024)
    /// nodes).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2, 4, 8, 16, 32])]
    pub sweep_windows: Vec<usize>,
    /// Simulated seconds of each cluster-size sweep run.
    #[arg(long, default_value_t = 300.0)]
    pub sweep_duration: f64,
}

impl SimArgs {
    fn duration(&self) -> f64 {
        self.hours.map(|h| h * 3600.0).unwrap_or(self.duration)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let d = self.duration();
        ensure!(
            (2..=1_000_000).contains(&self.nodes),
            "--nodes must be between 2 and 1000000, got {}",
            self.nodes
        );
        ensure!(
            d.is_finite() && d > 0.0 && d <= 1e7,
            "the duration must be between 0 and 1e7 seconds, got {d}"
        );
        ensure!(
            self.load.is_finite() && self.load > 0.0 && self.load <= 5.0,
            "--load must be in (0, 5], got {}",
            self.load
        );
        ensure!(
            self.mean_work.is_finite() && self.mean_work > 0.0 && self.mean_work <= 1e6,
            "--mean-work must be in (0, 1e6], got {}",
            self.mean_work
        );
        ensure!(
            self.pareto_ratio.is_finite() && self.pareto_ratio > 1.0 && self.pareto_ratio <= 1e9,
            "--pareto-ratio must be in (1, 1e9], got {}",
            self.pareto_ratio
        );
        ensure!(
            (0.0..=1.0).contains(&self.home_bound),
            "--home-bound must be in [0, 1], got {}",
            self.home_bound
        );
        ensure!(
            (1..=1024).contains(&self.window),
            "--window must be between 1 and 1024, got {}",
            self.window
        );
        ensure!(
            self.step.is_finite() && self.step >= 0.01 && self.step <= 3600.0,
            "--step must be in [0.01, 3600] seconds, got {}",
            self.step
        );
        ensure!(
            self.latency_ms.is_finite() && (0.0..=10_000.0).contains(&self.latency_ms),
            "--latency-ms must be in [0, 10000], got {}",
            self.latency_ms
        );
        ensure!(
            self.migration_fixed.is_finite() && (0.0..=3600.0).contains(&self.migration_fixed),
            "--migration-fixed must be in [0, 3600], got {}",
            self.migration_fixed
        );
        ensure!(
            self.migration_mbps.is_finite() && self.migration_mbps > 0.0,
            "--migration-mbps must be positive, got {}",
            self.migration_mbps
        );
        ensure!(
            self.stats_every.is_finite() && self.stats_every >= 0.0,
            "--stats-every must be ≥ 0, got {}",
            self.stats_every
        );
        if let Some(dr) = self.drain {
            ensure!(dr.is_finite() && dr >= 0.0, "--drain must be ≥ 0, got {dr}");
        }
        ensure!(
            !self.workload.is_empty(),
            "--workload needs at least one workload"
        );
        ensure!(
            !self.policy.is_empty(),
            "--policy needs at least one policy"
        );
        for &l in &self.sweep_loads {
            ensure!(
                l.is_finite() && l > 0.0 && l <= 5.0,
                "--sweep-loads values must be in (0, 5], got {l}"
            );
        }
        for &n in &self.sweep_nodes {
            ensure!(
                (2..=1_000_000).contains(&n),
                "--sweep-nodes values must be between 2 and 1000000, got {n}"
            );
        }
        ensure!(
            self.sweep_duration.is_finite() && self.sweep_duration > 0.0,
            "--sweep-duration must be positive"
        );
        // Rough memory guard: the job list is held in memory.
        let cap_per_node = 4.0 * 1.25;
        let jobs = self.load * cap_per_node * f64::from(self.nodes) * d / self.mean_work;
        if jobs > 60e6 {
            bail!("this run would generate about {jobs:.0} processes (limit 60 million): lower --nodes, --duration or --load, or raise --mean-work");
        }
        Ok(())
    }

    /// The simulator configuration for one run.
    pub fn config(
        &self,
        kind: WorkloadKind,
        policy: SimPolicy,
        nodes: u32,
        load: f64,
        duration: f64,
    ) -> SimConfig {
        let params = Params {
            step: Time::from_secs_f64(self.step),
            window: self.window,
            migration_fixed_secs: self.migration_fixed,
            migration_mb_per_sec: self.migration_mbps,
            refuse_when_busy: !self.no_refusal,
            min_rate_gain: self.min_rate_gain,
            cost_factor: self.cost_factor,
            min_age_secs: self.min_age,
            max_requests_per_step: self.max_requests,
            defer_steps: self.defer_steps,
            ..Params::default()
        };
        let swim = match self.swim {
            SwimMode::On => true,
            SwimMode::Off => false,
            SwimMode::Auto => nodes <= 1024,
        };
        SimConfig {
            spec: ScenarioSpec {
                kind,
                nodes,
                duration,
                load,
                mean_work: self.mean_work,
                pareto_ratio: self.pareto_ratio,
                home_bound: self.home_bound,
                uniform_arrivals: self.uniform_arrivals,
                max_cpus: self.max_cpus,
                seed: self.seed,
            },
            policy,
            params,
            swim,
            latency: self.latency_ms / 1000.0,
            stats_every: self.stats_every,
            drain: self.drain.unwrap_or(2.0 * duration),
            herd_window: 5.0 * self.step,
            sample_every: 10.0 * self.step,
            thrash: 10.0,
            check_invariants: false,
        }
    }
}

/// One workload's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Workload.
    pub workload: String,
    /// One entry per policy.
    pub runs: Vec<RunStats>,
    /// Wall-clock seconds per run, same order.
    pub wall_secs: Vec<f64>,
}

/// Run every selected policy on one workload (same seed, same jobs).
pub fn compare(
    args: &SimArgs,
    kind: WorkloadKind,
    nodes: u32,
    load: f64,
    duration: f64,
    policies: &[SimPolicy],
) -> Comparison {
    let spec = args
        .config(kind, SimPolicy::None, nodes, load, duration)
        .spec;
    let sc = generate(&spec);
    let mut runs = Vec::new();
    let mut wall_secs = Vec::new();
    for &p in policies {
        let cfg = args.config(kind, p, nodes, load, duration);
        let t0 = Instant::now();
        runs.push(simulate(&cfg, &sc));
        wall_secs.push(t0.elapsed().as_secs_f64());
    }
    Comparison {
        workload: kind.name().to_string(),
        runs,
        wall_secs,
    }
}

/// Run the simulator with `args`, printing a table (or JSON) to stdout.
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.replay {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (header, records) = crate::trace::read(&text)?;
        let r = crate::trace::replay(&header, &records);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "replayed {} calls of node {:08x}: {} migration decisions, {} mismatches",
                r.calls,
                header.config.id,
                r.decisions,
                r.mismatches.len()
            );
        }
        ensure!(
            r.mismatches.is_empty(),
            "the core decided differently at {} call(s), first at line {}",
            r.mismatches.len(),
            r.mismatches[0] + 2
        );
        return Ok(());
    }
    args.validate()?;
    let duration = args.duration();
    let mut results = Vec::new();
    for &kind in &args.workload {
        results.push(compare(
            args,
            kind,
            args.nodes,
            args.load,
            duration,
            &args.policy,
        ));
    }
    let sweeps = match &args.plots {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Some(report::sweeps_and_plots(args, dir)?)
        }
        None => None,
    };
    if args.json {
        let out = serde_json::json!({
            "nodes": args.nodes,
            "duration_secs": duration,
            "seed": args.seed,
            "load": args.load,
            "comparisons": results,
            "sweeps": sweeps,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for c in &results {
            print!(
                "{}",
                report::table(c, args.nodes, args.load, duration, args.seed)
            );
        }
        if let Some(s) = &sweeps {
            print!("{}", report::sweep_tables(s));
        }
    }
    Ok(())
}
