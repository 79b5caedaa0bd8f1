//! Tables and SVG plots.

use super::cli::{compare, Comparison, SimArgs};
use super::engine::{RunStats, SimPolicy};
use super::workload::WorkloadKind;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

/// Render one workload's comparison as a text table.
pub fn table(c: &Comparison, nodes: u32, load: f64, duration: f64, seed: u64) -> String {
    let mut s = String::new();
    let procs = c.runs.first().map(|r| r.processes).unwrap_or(0);
    let _ = writeln!(
        s,
        "workload {}: {} nodes, offered load {:.2}, {:.0} s of arrivals, {} processes, seed {}",
        c.workload, nodes, load, duration, procs, seed
    );
    let _ = writeln!(
        s,
        "{:<12} {:>8} {:>8} {:>9} {:>9} {:>8} {:>7} {:>9} {:>11} {:>9} {:>6} {:>10} {:>8} {:>6}",
        "policy",
        "mean sd",
        "p50",
        "p99",
        "tail sd",
        "migr/p",
        "msg/st",
        "B/node/s",
        "age s(mdl)",
        "imbal",
        "herd",
        "vs omni",
        "vs none",
        "wall"
    );
    let omni = c
        .runs
        .iter()
        .find(|r| r.policy == SimPolicy::Omniscient.name())
        .map(|r| r.mean_slowdown);
    let none = c
        .runs
        .iter()
        .find(|r| r.policy == SimPolicy::None.name())
        .map(|r| r.mean_slowdown);
    for (r, w) in c.runs.iter().zip(&c.wall_secs) {
        let age = if r.info_age_model_secs > 0.0 {
            format!("{:.2}({:.2})", r.info_age_secs, r.info_age_model_secs)
        } else {
            "-".to_string()
        };
        let herd = format!("{:.1}/{}", r.herd_mean, r.herd_max);
        let ratio = |b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:.2}x", r.mean_slowdown / b),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            s,
            "{:<12} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8.3} {:>7.3} {:>9.1} {:>11} {:>9.3} {:>6} {:>10} {:>8} {:>5.1}s",
            r.policy,
            r.mean_slowdown,
            r.p50_slowdown,
            r.p99_slowdown,
            r.mean_slowdown_long,
            r.migrations_per_process,
            r.gossip_msgs_per_node_step,
            r.gossip_bytes_per_node_sec,
            age,
            r.load_imbalance,
            herd,
            ratio(omni),
            ratio(none),
            w
        );
    }
    for r in &c.runs {
        if r.unfinished > 0 {
            let _ = writeln!(s, "  note: {} left {} processes unfinished after the drain (counted at their slowdown so far, a lower bound)", r.policy, r.unfinished);
        }
        if r.join_herd_cpus > 0 {
            let _ = writeln!(
                s,
                "  {}: largest herd on a joining node: {} migrations within 5 steps of joining (node has {} CPUs)",
                r.policy, r.join_herd_max, r.join_herd_cpus
            );
        }
    }
    s.push('\n');
    s
}

/// Results of the sweeps behind the plots.
#[derive(Debug, Clone, Serialize)]
pub struct Sweeps {
    /// Offered load → one comparison on the Pareto workload.
    pub by_load: Vec<(f64, Comparison)>,
    /// Cluster size → the mosvm run.
    pub by_size: Vec<(u32, RunStats, f64)>,
    /// Window size → the mosvm run on the largest swept cluster size.
    pub by_window: Vec<(usize, RunStats)>,
}

/// Run the load and cluster-size sweeps and write the plots into `dir`.
pub fn sweeps_and_plots(args: &SimArgs, dir: &Path) -> Result<Sweeps> {
    let duration = args.hours.map(|h| h * 3600.0).unwrap_or(args.duration);
    let mut by_load = Vec::new();
    for &l in &args.sweep_loads {
        by_load.push((
            l,
            compare(
                args,
                WorkloadKind::Pareto,
                args.nodes,
                l,
                duration,
                &args.policy,
            ),
        ));
    }
    let mut by_size = Vec::new();
    for &n in &args.sweep_nodes {
        let c = compare(
            args,
            WorkloadKind::Pareto,
            n,
            args.load,
            args.sweep_duration,
            &[SimPolicy::Mosvm],
        );
        by_size.push((n, c.runs[0].clone(), c.wall_secs[0]));
    }
    let mut by_window = Vec::new();
    let wn = args
        .sweep_nodes
        .iter()
        .copied()
        .max()
        .unwrap_or(args.nodes)
        .min(1024);
    for &w in &args.sweep_windows {
        let mut a = args.clone();
        a.window = w;
        let c = compare(
            &a,
            WorkloadKind::Pareto,
            wn,
            args.load,
            args.sweep_duration,
            &[SimPolicy::Mosvm],
        );
        by_window.push((w, c.runs[0].clone()));
    }
    let sw = Sweeps {
        by_load,
        by_size,
        by_window,
    };
    plot_slowdown_vs_load(
        &sw,
        &dir.join("slowdown_vs_load.svg"),
        args.nodes,
        args.max_cpus,
    )?;
    plot_by_size(
        &sw,
        &dir.join("messages_vs_nodes.svg"),
        &dir.join("info_age_vs_nodes.svg"),
    )?;
    Ok(sw)
}

/// Text tables of the sweeps.
pub fn sweep_tables(sw: &Sweeps) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "mean slowdown vs offered load (pareto)");
    if let Some((_, c)) = sw.by_load.first() {
        let _ = write!(s, "{:<6}", "load");
        for r in &c.runs {
            let _ = write!(s, " {:>12}", r.policy);
        }
        s.push('\n');
    }
    for (l, c) in &sw.by_load {
        let _ = write!(s, "{:<6.2}", l);
        for r in &c.runs {
            let _ = write!(s, " {:>12.2}", r.mean_slowdown);
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\nmosvm dissemination vs cluster size (pareto)");
    let _ = writeln!(
        s,
        "{:>7} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9} {:>8}",
        "nodes",
        "msg/node/st",
        "max/st",
        "B/node/s",
        "swim/n/s",
        "age s",
        "model s",
        "age/mdl",
        "wall s"
    );
    let _ = writeln!(
        s,
        "(swim/n/s is '-' where the membership oracle replaced SWIM)"
    );
    for (n, r, w) in &sw.by_size {
        let swim = if r.swim {
            format!("{:.2}", r.swim_msgs_per_node_sec)
        } else {
            "-".to_string()
        };
        let _ = writeln!(
            s,
            "{:>7} {:>10.3} {:>9} {:>10.1} {:>9} {:>9.2} {:>8.2} {:>9.3} {:>8.1}",
            n,
            r.gossip_msgs_per_node_step,
            r.gossip_max_per_step,
            r.gossip_bytes_per_node_sec,
            swim,
            r.info_age_secs,
            r.info_age_model_secs,
            r.info_age_secs / r.info_age_model_secs.max(1e-9),
            w
        );
    }
    if let Some((_, r)) = sw.by_window.first() {
        let _ = writeln!(
            s,
            "\nmosvm information age vs window size ({} nodes)",
            r.nodes
        );
        let _ = writeln!(
            s,
            "{:>7} {:>10} {:>9} {:>8} {:>9}",
            "window", "B/node/s", "age s", "model s", "age/mdl"
        );
        for (w, r) in &sw.by_window {
            let _ = writeln!(
                s,
                "{:>7} {:>10.1} {:>9.2} {:>8.2} {:>9.3}",
                w,
                r.gossip_bytes_per_node_sec,
                r.info_age_secs,
                r.info_age_model_secs,
                r.info_age_secs / r.info_age_model_secs.max(1e-9)
            );
        }
    }
    s
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// A plotted series: label, colour, value of a run.
type Series = (&'static str, RGBColor, fn(&RunStats) -> f64);

const COLORS: [RGBColor; 6] = [
    RGBColor(0x44, 0x44, 0x44),
    RGBColor(0x99, 0x66, 0x00),
    RGBColor(0x00, 0x88, 0x88),
    RGBColor(0xcc, 0x22, 0x22),
    RGBColor(0x22, 0x55, 0xcc),
    RGBColor(0x22, 0x99, 0x22),
];

fn plot_slowdown_vs_load(sw: &Sweeps, path: &Path, nodes: u32, max_cpus: u32) -> Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let xs: Vec<f64> = sw.by_load.iter().map(|(l, _)| *l).collect();
    let xmin = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let xmax = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ymax = sw
        .by_load
        .iter()
        .flat_map(|(_, c)| c.runs.iter().map(|r| r.mean_slowdown))
        .fold(1.0, f64::max);
    let ymin = sw
        .by_load
        .iter()
        .flat_map(|(_, c)| c.runs.iter().map(|r| r.mean_slowdown))
        .filter(|v| *v > 0.0)
        .fold(1.0, f64::min)
        * 0.9;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Mean slowdown vs offered load ({nodes} nodes of {}, Pareto lifetimes)",
                if max_cpus == 1 {
                    "1 CPU".to_string()
                } else {
                    format!("1-{max_cpus} CPUs")
                }
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(xmin..xmax.max(xmin + 0.01), (ymin..ymax * 1.2).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered load")
        .y_desc("mean slowdown (log)")
        .draw()
        .map_err(err)?;
    let npol = sw.by_load.first().map(|(_, c)| c.runs.len()).unwrap_or(0);
    for i in 0..npol {
        let name = sw.by_load[0].1.runs[i].policy.clone();
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = sw
            .by_load
            .iter()
            .map(|(l, c)| (*l, c.runs[i].mean_slowdown))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn plot_by_size(sw: &Sweeps, msgs: &Path, age: &Path) -> Result<()> {
    let xs: Vec<f64> = sw.by_size.iter().map(|(n, _, _)| f64::from(*n)).collect();
    if xs.is_empty() {
        return Ok(());
    }
    let xmin = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let xmax = xs
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(xmin * 2.0);
    {
        let root = SVGBackend::new(msgs, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let ymax = sw
            .by_size
            .iter()
            .map(|(_, r, _)| r.gossip_msgs_per_node_step.max(r.swim_msgs_per_node_sec))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Messages per node per step vs cluster size (mosvm)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..ymax * 1.3)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("nodes (log)")
            .y_desc("messages per node per step")
            .draw()
            .map_err(err)?;
        let series: [Series; 3] = [
            ("load gossip", COLORS[3], |r| r.gossip_msgs_per_node_step),
            ("SWIM (foca), where run", COLORS[4], |r| {
                r.swim_msgs_per_node_sec
            }),
            ("migration negotiation", COLORS[1], |r| {
                r.control_msgs_per_node_sec
            }),
        ];
        for (name, color, f) in series {
            // SWIM traffic exists only where SWIM ran (not under the membership oracle).
            let pts: Vec<(f64, f64)> = sw
                .by_size
                .iter()
                .filter(|(_, r, _)| r.swim || !name.starts_with("SWIM"))
                .map(|(n, r, _)| (f64::from(*n), f(r)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    {
        let root = SVGBackend::new(age, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let ymax = sw
            .by_size
            .iter()
            .map(|(_, r, _)| r.info_age_secs.max(r.info_age_model_secs))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Information age in the window vs cluster size",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..ymax * 1.3)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("nodes (log)")
            .y_desc("mean age of window entries, s")
            .draw()
            .map_err(err)?;
        let series: [Series; 2] = [
            ("simulated", COLORS[3], |r| r.info_age_secs),
            ("analytic model", COLORS[0], |r| r.info_age_model_secs),
        ];
        for (name, color, f) in series {
            let pts: Vec<(f64, f64)> = sw
                .by_size
                .iter()
                .map(|(n, r, _)| (f64::from(*n), f(r)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(())
}
