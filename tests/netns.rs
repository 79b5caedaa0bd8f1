//! Nodes as separate hosts: each node service runs in its own network namespace, with its own
//! address, the namespaces joined by a bridge (see `common::cluster::Hosts`). Processes move
//! between them across that link and must give what the same program gives natively.
//! Needs root and iproute2; set MOSVM_SKIP_NETNS=1 to skip explicitly.

#[macro_use]
mod common;

use common::cluster::{keygen, tour, wait_registered, Hosts};
use common::Case;
use std::time::{Duration, Instant};

/// Three hosts, one node each (home, a, b), one cluster key. Each program starts at home and,
/// while it runs, moves home → a → b → home, `ps` at home showing it on each in turn; its
/// stdout, stderr, exit status and files must equal a native run's: no byte lost or doubled.
#[test]
fn programs_travel_home_a_b_home_across_three_hosts_and_match_native() {
    require_kvm!();
    let Some(hosts) = Hosts::new(3) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = hosts.start_cluster(dir.path(), &["home", "a", "b"], &key);
    let home = &nodes[0];
    // Each runs about 3.5 s natively, well beyond its three moves and the pauses between
    // them (a move takes 0.1-0.2 s on an idle machine).
    let cases = [
        // Pure computation, no syscall until it prints its results at the end.
        Case::image("glibc-static", "compute").arg("2000000000"),
        // A file written steadily (ticker.out, a line every 25 ms) while 16 MiB are dirtied.
        Case::image("musl-static", "ticker").args(["150", "3000000", "16"]),
        // A program printing steadily: a short line every millisecond.
        Case::image("dynamic", "ticker").args(["3600", "300000", "8"]),
    ];
    for case in cases {
        // The process runs on its home host: its links go straight to the other hosts.
        let case = case.socket(&home.sock).in_netns(&hosts.netns[0]);
        let t = Instant::now();
        let mut arrivals = Vec::new();
        case.check_while(|run| {
            wait_registered(&home.sock, run.pid());
            tour(home, run.pid(), &["a", "b", "home"], &mut |_| {
                arrivals.push(t.elapsed());
                // It works a while on every node it visits.
                std::thread::sleep(Duration::from_millis(400));
            });
        });
        // Shown with a failure of a later case, or with --nocapture.
        eprintln!(
            "{}: on a, b, home at {arrivals:.2?}; done in {:.2?}",
            case.describe(),
            t.elapsed()
        );
    }
    for far in &nodes[1..] {
        let log = far.log_text();
        assert!(
            log.contains("receiving a guest"),
            "no guest reached {} across the link: {log}",
            far.name
        );
    }
    drop(nodes);
    drop(hosts);
}
