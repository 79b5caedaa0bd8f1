//! `cargo bench --bench balance`: the cluster balancing itself. Three node services on
//! loopback with cgroup CPU quotas of 0.5, 0.5 and 1.0 CPU (needs root); N CPU-bound jobs
//! (`compute`) started on the first node with no manual command. Prints the makespan divided
//! by the ideal (total CPU work over total capacity) with automatic migration on and off,
//! migrations per job, and gossip messages per node per step. The CPU work of a job comes
//! from calibration runs of one job alone on a 1-CPU node in the same run (the median of
//! three), and again from
//! the run with automatic migration off (every job on the first node's 0.5 CPU: work =
//! makespan x 0.5 / N), which shares the conditions of the run it is compared with; both
//! ratios are printed. Numbers go into BENCHMARKS.md; nothing here passes or fails on time.

#[allow(unused_macros)]
#[path = "../tests/common/mod.rs"]
mod common;

use common::cluster::{client, free_port, keygen, Node, NodeSpec};
use common::{image, mosvm_bin};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Iterations per job: about 4 s of CPU on this kind of machine.
const WORK: &str = "2200000000";
/// Gossip step of the nodes, seconds.
const STEP: f64 = 0.5;

fn cluster(dir: &Path, tag: &str, cpus: &[f64], policy: &str) -> Vec<Node> {
    let key = keygen(dir);
    let names: Vec<String> = (0..cpus.len()).map(|i| format!("bb{tag}{i}")).collect();
    let addrs: Vec<String> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    (0..cpus.len())
        .map(|i| {
            let mut s = NodeSpec::new(dir, &names[i])
                .listen(&addrs[i])
                .key_dir(&key)
                .policy(policy)
                .args(&["--step", &STEP.to_string(), "--cpus", &cpus[i].to_string()]);
            for j in 0..cpus.len() {
                if j != i {
                    s = s.peer(&names[j], &addrs[j]);
                }
            }
            s.start()
        })
        .collect()
}

/// Run `n` jobs with home `home`; returns the makespan, seconds.
fn jobs(home: &Node, n: usize) -> f64 {
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(mosvm_bin())
                .args(["run", "--socket"])
                .arg(&home.sock)
                .arg(image("glibc-static", "compute"))
                .arg(WORK)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t.elapsed().as_secs_f64()
}

fn moves(nodes: &[Node]) -> usize {
    nodes
        .iter()
        .map(|n| n.log_text().matches("automatic migration ").count())
        .sum()
}

/// Gossip messages sent per node per step since the nodes started `up` seconds ago.
fn gossip_rate(nodes: &[Node], up: f64) -> f64 {
    let mut sent = 0.0;
    for n in nodes {
        let out = client(&n.sock, &["ctl", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        sent += v["counters"]["sent"]["gossip"].as_f64().unwrap_or(0.0);
    }
    sent / nodes.len() as f64 / (up / STEP)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("balance bench: needs root (nodes get cgroups of their own)");
        return;
    }
    common::build_images();
    let cpus = [0.5, 0.5, 1.0];
    let capacity: f64 = cpus.iter().sum();
    // Calibration: one job alone on a node of one CPU, in this run; the median of three.
    let dir = tempfile::tempdir().unwrap();
    let one = cluster(dir.path(), "c", &[1.0], "off");
    let mut runs: Vec<f64> = (0..3).map(|_| jobs(&one[0], 1)).collect();
    runs.sort_by(f64::total_cmp);
    let t1 = runs[1];
    drop(one);
    println!(
        "mosvm automatic load balancing: 3 nodes on loopback with cgroup CPU quotas {cpus:?}, N jobs of compute {WORK} started on the first (a 0.5-CPU node); one job alone on 1 CPU takes {t1:.1} s (median of {runs:.1?}); step {STEP} s\n"
    );
    println!(
        "{:>4} {:>9} {:>11} {:>10} {:>11} {:>10} {:>13} {:>10}",
        "jobs",
        "ideal s",
        "auto on s",
        "on/ideal",
        "auto off s",
        "off/ideal",
        "on/ideal(off)",
        "moves/job"
    );
    for n in [6usize, 9, 12] {
        let ideal = n as f64 * t1 / capacity;
        let d = tempfile::tempdir().unwrap();
        let nodes = cluster(d.path(), &format!("on{n}"), &cpus, "mosix");
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let on = jobs(&nodes[0], n);
        let mv = moves(&nodes) as f64 / n as f64;
        let rate = gossip_rate(&nodes, started.elapsed().as_secs_f64());
        drop(nodes);
        let d2 = tempfile::tempdir().unwrap();
        let nodes = cluster(d2.path(), &format!("off{n}"), &cpus, "off");
        let off = jobs(&nodes[0], n);
        drop(nodes);
        // Ideal from the off run: n jobs of work w on 0.5 CPU took `off`.
        let ideal_off = off * cpus[0] / capacity;
        println!(
            "{n:>4} {ideal:>9.1} {on:>11.1} {:>10.2} {off:>11.1} {:>10.2} {:>13.2} {mv:>10.2}   (gossip {rate:.2} per node per step)",
            on / ideal,
            off / ideal,
            on / ideal_off
        );
    }
}
