//! Post-copy between nodes on loopback: a process moved by `mosvm migrate --postcopy` (its
//! memory following after it resumes, fetched when touched), and one that writes faster than
//! the link carries (pre-copy cannot converge: the move turns to post-copy on its own), run
//! as they do natively: same output, exit status and files. Losing either end before the last
//! page has arrived loses the process, with a message and an exit status, never a hang.

#[macro_use]
mod common;

use common::cluster::{
    client, ends_lost, guest_hosts_of, home_and_b, keygen, kill_all, loopback_cluster, proc_info,
    wait_for, wait_registered, Node,
};
use common::{Case, Run};
use std::time::Duration;

/// The ticker (prints steadily, appends to ticker.out, rewrites its buffer of MIB), homed at
/// `home`, with `--stats` (the move's report goes to stderr, which is not compared).
fn ticker(variant: &str, args: [&str; 3], home: &Node) -> Case {
    Case::image(variant, "ticker")
        .args(args)
        .socket(&home.sock)
        .mosvm_flag("--stats")
        .ignore_stderr()
}

/// `mosvm migrate PID b --wait [FLAGS]` from home; fails the test if the move fails.
fn move_to_b(home: &Node, pid: u32, flags: &[&str]) {
    let pid_s = pid.to_string();
    let mut args = vec!["migrate", pid_s.as_str(), "b", "--wait"];
    args.extend_from_slice(flags);
    let m = client(&home.sock, &args);
    assert!(
        m.status.success(),
        "mosvm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&m.stderr)
    );
}

/// The reports of the moves a run made (`mosvm-migration {json}` lines on its stderr).
fn reports(run: &Run) -> Vec<serde_json::Value> {
    run.stderr_text()
        .lines()
        .filter_map(|l| l.strip_prefix("mosvm-migration "))
        .map(|j| serde_json::from_str(j).expect("a move's report is JSON"))
        .collect()
}

/// The one report of a run that moved once, which must have been by post-copy with pages
/// crossing after the guest resumed.
fn post_copy_report(run: &Run) -> serde_json::Value {
    let r = reports(run);
    assert_eq!(r.len(), 1, "one move's report: {}", run.stderr_text());
    let r = r.into_iter().next().unwrap_or_default();
    assert_eq!(r["postcopy"], true, "not a post-copy: {r}");
    assert!(
        r["outstanding_pages"].as_u64().unwrap_or(0) > 0,
        "no page crossed after the guest resumed: {r}"
    );
    r
}

#[test]
fn a_process_moved_by_post_copy_runs_as_natively() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    for (variant, mib) in [("glibc-static", "64"), ("dynamic", "32")] {
        let (_, got) = ticker(variant, ["40", "3000000", mib], &nodes[0]).check_while(|run| {
            wait_registered(&nodes[0].sock, run.pid());
            std::thread::sleep(Duration::from_millis(300));
            move_to_b(&nodes[0], run.pid(), &["--postcopy"]);
            let p = proc_info(&nodes[0].sock, run.pid()).expect("listed at home");
            assert_eq!(p["node"], "b", "{p}");
        });
        let r = post_copy_report(&got);
        // The ticker keeps rewriting its whole buffer: it touched pages before they came.
        assert!(r["faults"].as_u64().unwrap_or(0) > 0, "{variant}: {r}");
    }
}

#[test]
fn a_process_writing_faster_than_the_link_moves_by_post_copy_on_its_own() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    // 3 million random writes per line over 256 MiB: all of it is rewritten every few tens of
    // milliseconds, faster than any link here carries it.
    let (_, got) = ticker("glibc-static", ["40", "3000000", "256"], &nodes[0]).check_while(|run| {
        wait_registered(&nodes[0].sock, run.pid());
        wait_for("the working set", Duration::from_secs(30), || {
            proc_info(&nodes[0].sock, run.pid())
                .is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 250 << 20)
        });
        move_to_b(&nodes[0], run.pid(), &[]);
    });
    let r = post_copy_report(&got);
    assert!(
        r["rounds"].as_u64().unwrap_or(0) >= 1,
        "pre-copy came first: {r}"
    );
    assert_eq!(r["throttle"], 0.0, "the guest was slowed down: {r}");
}

/// A process whose memory is moving (768 MiB, about a second of pushing) when the other end
/// is killed.
fn moving_by_post_copy(nodes: &[Node]) -> common::Running {
    let run = Case::image("glibc-static", "ticker")
        .args(["100000", "3000000", "768"])
        .socket(&nodes[0].sock)
        .spawn_mosvm();
    wait_registered(&nodes[0].sock, run.pid());
    wait_for("the working set", Duration::from_secs(30), || {
        proc_info(&nodes[0].sock, run.pid())
            .is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 760 << 20)
    });
    move_to_b(&nodes[0], run.pid(), &["--postcopy"]);
    run
}

#[test]
fn losing_the_destination_during_post_copy_ends_the_process_with_a_reason() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let run = moving_by_post_copy(&nodes);
    kill_all(&guest_hosts_of(nodes[1].child.id()));
    let got = ends_lost(run, Duration::from_secs(10));
    assert!(
        got.stderr_text().contains("post-copy") && got.stderr_text().contains("cannot continue"),
        "{}",
        got.stderr_text()
    );
}

#[test]
fn losing_home_during_post_copy_ends_the_guest_on_its_host() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let mut run = moving_by_post_copy(&nodes);
    assert_eq!(guest_hosts_of(nodes[1].child.id()).len(), 1);
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    // Its guest host may wait in page faults nothing will answer: it must end all the same.
    wait_for(
        "the guest host on b to end",
        Duration::from_secs(10),
        || guest_hosts_of(nodes[1].child.id()).is_empty(),
    );
    assert!(
        nodes[1].log_text().contains("post-copy"),
        "b's log does not say why: {}",
        nodes[1].log_text()
    );
}

#[test]
fn a_post_copy_starts_from_home_only() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);
    let run = Case::image("glibc-static", "ticker")
        .args(["100000", "3000000", "4"])
        .socket(&nodes[0].sock)
        .spawn_mosvm();
    let pid = run.pid();
    wait_registered(&nodes[0].sock, pid);
    move_to_b(&nodes[0], pid, &["--precopy"]);
    let pid_s = pid.to_string();
    let m = client(
        &nodes[0].sock,
        &["migrate", &pid_s, "a", "--wait", "--postcopy"],
    );
    assert!(!m.status.success());
    let err = String::from_utf8_lossy(&m.stderr);
    assert!(
        err.contains("from home only") && err.contains("without --postcopy"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // It runs on where it was.
    let p = proc_info(&nodes[0].sock, pid).expect("listed at home");
    assert_eq!(p["node"], "b", "{p}");
    drop(run);
}

#[test]
fn memory_given_back_while_its_pages_arrive_reads_as_zeros_when_taken_again() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    // Each round unmaps a chunk (whose pages may still be on their way), maps a fresh one
    // (from the frames just given back: zeros, natively and here) and fills it.
    let (_, got) = Case::image("glibc-static", "churn")
        .args(["3000", "256"])
        .socket(&nodes[0].sock)
        .mosvm_flag("--stats")
        .ignore_stderr()
        .check_while(|run| {
            wait_registered(&nodes[0].sock, run.pid());
            std::thread::sleep(Duration::from_millis(200));
            move_to_b(&nodes[0], run.pid(), &["--postcopy"]);
        });
    post_copy_report(&got);
}
