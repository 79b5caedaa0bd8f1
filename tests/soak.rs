//! Soak: many migrations of running processes across three hosts (network namespaces), with
//! faults injected, and nothing lost or doubled: every process's stdout, exit status and files
//! must equal its native run.
//!
//! Four kinds of process run at once, in rounds, each started at home: a compute job (no
//! syscall until its result), a file writer (appends a line every 25 ms while dirtying
//! 16 MiB), a steady printer (a line every millisecond) and a filter blocked on its stdin
//! (fed by the test a little at a time). While they run, one of them at a time is moved to a
//! node it is not on (or home); every fifth move comes with a fault:
//!
//! - the destination frozen (SIGSTOP on its node service) while the move is asked for: the
//!   move fails within the peer deadline and the process stays where it was;
//! - the destination's link cut (`ip link set down`) for 1.5 s during the move: the move
//!   finishes late or fails, and the guests on that host outlive the gap;
//! - a node other than home restarted (SIGTERM: it expels its guests first, then starts
//!   again).
//!
//! A destination killed in the middle of a move is its own test
//! (`the_destination_dying_mid_migration_leaves_the_process_at_home`, tests/cluster.rs).
//!
//! Ignored by default: `MOSVM_SOAK_MOVES=1000 cargo test --release --test soak -- --ignored
//! --nocapture` (the default is 1000 moves); `.ci/run` runs a quick one (40 moves). The counts
//! go to stderr and RELIABILITY.md.

#[macro_use]
mod common;

use common::cluster::{keygen, proc_info, ps, wait_for, wait_registered, Hosts, Node};
use common::{compare, Case, Run, Running};
use std::io::Write;
use std::time::{Duration, Instant};

/// The names of the three nodes, one per host; the first is every process's home.
const NAMES: [&str; 3] = ["home", "a", "b"];

/// Input for the filter: deterministic lines of varying length.
fn filter_input() -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..4000u32 {
        let len = (i * 37 % 97) as usize;
        v.extend((0..len).map(|j| b"abcdefghij klmnopqrst"[(i as usize + j) % 21]));
        v.push(b'\n');
    }
    v
}

/// The four processes of a round: each lasts about 20 s natively.
fn cases(home: &Node, ns: &str) -> Vec<Case> {
    vec![
        Case::image("glibc-static", "compute").arg("6000000000"),
        Case::image("musl-static", "ticker").args(["800", "3000000", "16"]),
        Case::image("dynamic", "ticker").args(["20000", "300000", "8"]),
        Case::image("glibc-static", "stdin_filter").stdin(filter_input()),
    ]
    .into_iter()
    .map(|c| {
        c.socket(&home.sock)
            .in_netns(ns)
            .timeout(Duration::from_secs(900))
    })
    .collect()
}

/// Where process `pid` runs now, as home's `ps` says; None once it has ended.
fn node_of(home: &Node, pid: u32) -> Option<String> {
    proc_info(&home.sock, pid).and_then(|p| p["node"].as_str().map(str::to_string))
}

#[derive(Default, Debug)]
struct Tally {
    moves_asked: u64,
    moves_done: u64,
    faults: [u64; 3],
    processes: u64,
    bytes_compared: u64,
}

#[test]
#[ignore]
fn soak_moves_processes_through_faults_and_loses_nothing() {
    require_kvm!();
    let target: u64 = std::env::var("MOSVM_SOAK_MOVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let Some(hosts) = Hosts::new(3) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let mut nodes = hosts.start_cluster(dir.path(), &NAMES, &key);
    // The native runs, once: every round's processes must match them.
    let natives: Vec<Run> = cases(&nodes[0], &hosts.netns[0])
        .iter()
        .map(|c| c.run_native())
        .collect();
    let mut tally = Tally::default();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let t0 = Instant::now();
    while tally.moves_asked < target {
        let round = cases(&nodes[0], &hosts.netns[0]);
        let mut running: Vec<Running> = round
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c = if i == 3 {
                    c.clone().stdin_by_hand()
                } else {
                    c.clone()
                };
                c.spawn_mosvm()
            })
            .collect();
        let pids: Vec<u32> = running.iter().map(|r| r.pid()).collect();
        for &pid in &pids {
            wait_registered(&nodes[0].sock, pid);
        }
        // The filter's input, a little at a time: it spends most of the round blocked.
        let mut stdin = Some(running[3].take_stdin());
        let input = filter_input();
        let mut fed = 0usize;
        loop {
            if let Some(w) = stdin.as_mut() {
                let n = (input.len() / 60).max(1).min(input.len() - fed);
                w.write_all(&input[fed..fed + n]).unwrap();
                fed += n;
                if fed == input.len() {
                    stdin = None;
                }
            }
            let alive: Vec<(u32, String)> = pids
                .iter()
                .filter_map(|&p| node_of(&nodes[0], p).map(|n| (p, n)))
                .collect();
            if alive.is_empty() || tally.moves_asked >= target {
                break;
            }
            let (pid, at) = &alive[next(alive.len() as u64) as usize];
            let others: Vec<&str> = NAMES.iter().copied().filter(|n| n != at).collect();
            let to = others[next(others.len() as u64) as usize];
            let to_arg = if to == "home" { "home" } else { to };
            let ti = NAMES.iter().position(|n| *n == to).unwrap();
            tally.moves_asked += 1;
            let before =
                proc_info(&nodes[0].sock, *pid).map(|p| p["migrations"].as_u64().unwrap_or(0));
            let wait_move = |sock: &std::path::Path| {
                common::cluster::client(sock, &["migrate", &pid.to_string(), to_arg, "--wait"])
            };
            match tally.moves_asked % 5 {
                0 if ti != 0 => {
                    let kind = (tally.moves_asked / 5 % 3) as usize;
                    tally.faults[kind] += 1;
                    match kind {
                        0 => {
                            // The destination's node service frozen while it is asked.
                            let node_pid = nodes[ti].child.id() as i32;
                            // SAFETY: signalling our own child process.
                            unsafe { libc::kill(node_pid, libc::SIGSTOP) };
                            let out = wait_move(&nodes[0].sock);
                            // SAFETY: as above.
                            unsafe { libc::kill(node_pid, libc::SIGCONT) };
                            assert!(!out.status.success(), "a move to a frozen node succeeded");
                        }
                        1 => {
                            // The destination's link cut for 1.5 s during the move.
                            let sock = nodes[0].sock.clone();
                            let (p, dest) = (pid.to_string(), to_arg.to_string());
                            let mover = std::thread::spawn(move || {
                                common::cluster::client(&sock, &["migrate", &p, &dest, "--wait"])
                            });
                            std::thread::sleep(Duration::from_millis(100));
                            hosts.cut(ti);
                            std::thread::sleep(Duration::from_millis(1500));
                            hosts.uncut(ti);
                            let _ = mover.join();
                        }
                        _ => {
                            // A node other than home restarted: its guests leave first.
                            nodes[ti].restart(Duration::from_secs(120));
                        }
                    }
                }
                _ => {
                    let _ = wait_move(&nodes[0].sock);
                }
            }
            let after =
                proc_info(&nodes[0].sock, *pid).map(|p| p["migrations"].as_u64().unwrap_or(0));
            if let (Some(b), Some(a)) = (before, after) {
                tally.moves_done += a.saturating_sub(b);
            }
            // Nobody lost: every process still listed runs, none is "lost".
            for p in ps(&nodes[0].sock) {
                assert_ne!(p["state"], "lost", "{p}");
            }
        }
        // The rest of the filter's input, then its end.
        if let Some(mut w) = stdin.take() {
            w.write_all(&input[fed..]).unwrap();
        }
        for (run, native) in running.into_iter().zip(&natives) {
            let got = run.finish();
            if let Some(report) = compare(native, &got, false) {
                panic!(
                    "after {} moves ({tally:?}), a process differs from its native run:\n{report}\n\
                     --- mosvm stderr ---\n{}",
                    tally.moves_asked,
                    got.stderr_text()
                );
            }
            tally.processes += 1;
            let files: usize = got
                .tree
                .values()
                .map(|e| match e {
                    common::Entry::File { contents, .. } => contents.len(),
                    _ => 0,
                })
                .sum();
            tally.bytes_compared += (got.stdout.len() + files) as u64;
        }
        eprintln!("soak: {:.0} s, {tally:?}", t0.elapsed().as_secs_f64());
    }
    wait_for(
        "the nodes to forget the processes",
        Duration::from_secs(10),
        || ps(&nodes[0].sock).is_empty(),
    );
    eprintln!(
        "soak done: {} moves asked, {} done, faults (frozen, cut, restarted) {:?}, {} processes, \
         {} bytes compared, in {:.0} s",
        tally.moves_asked,
        tally.moves_done,
        tally.faults,
        tally.processes,
        tally.bytes_compared,
        t0.elapsed().as_secs_f64()
    );
}
