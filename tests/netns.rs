//! Nodes as separate hosts: each node service runs in its own network namespace, with its own
//! address, the namespaces joined by a bridge (see `common::cluster::Hosts`). Processes move
//! between them across that link and must give what the same program gives natively.
//! Needs root and iproute2; set MOSVM_SKIP_NETNS=1 to skip explicitly.

#[macro_use]
mod common;

use common::cluster::{keygen, proc_info, ps, tour, wait_for, wait_registered, Hosts};
use common::Case;
use common::{image, mosvm_bin};
use std::process::{Command, Stdio};
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

/// A host that drops off the network without closing anything (its packets just vanish):
/// home notices within seconds and `mosvm run` ends with its lost-host status, and the guest
/// there, cut off from its deputy, is destroyed; nothing hangs.
#[test]
fn a_host_that_vanishes_from_the_network_is_noticed_and_nothing_hangs() {
    require_kvm!();
    let Some(hosts) = Hosts::new(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = hosts.start_cluster(dir.path(), &["home", "a"], &key);
    let (home, a) = (&nodes[0], &nodes[1]);
    let wd = dir.path().join("run");
    std::fs::create_dir_all(&wd).unwrap();
    let mut run = Command::new("ip")
        .args(["netns", "exec", &hosts.netns[0]])
        .arg(mosvm_bin())
        .arg("run")
        .arg("--socket")
        .arg(&home.sock)
        .arg(image("glibc-static", "ticker"))
        .args(["100000", "300000", "8"])
        .current_dir(&wd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = run.id();
    wait_registered(&home.sock, pid);
    assert!(tour_to(home, pid, "a"), "the process did not reach a");
    wait_for("a to list its guest", Duration::from_secs(5), || {
        ps(&a.sock).iter().any(|p| p["pid"] == pid)
    });
    std::thread::sleep(Duration::from_millis(300));
    hosts.cut(1);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = run.kill();
            panic!(
                "mosvm run still waits {:?} after its host vanished",
                t.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let noticed = t.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(112), "{err}");
    assert!(err.contains("lost the node running the process"), "{err}");
    eprintln!("home noticed the vanished host after {noticed:.2?}");
    // The guest on the cut-off host loses its deputy too, and is destroyed.
    wait_for(
        "a to destroy the orphaned guest",
        Duration::from_secs(15),
        || !ps(&a.sock).iter().any(|p| p["pid"] == pid),
    );
}

/// Move `pid` to `to` and wait until home shows it there.
fn tour_to(home: &common::cluster::Node, pid: u32, to: &str) -> bool {
    let m = common::cluster::migrate(&home.sock, pid, to);
    if !m.status.success() {
        return false;
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if proc_info(&home.sock, pid).is_some_and(|p| p["node"] == to) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
