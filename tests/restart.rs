//! A node restarted under its running processes (an upgrade, a crash of the service alone):
//! each `mosvm run` registers again with the node that comes back, wherever the process runs
//! then, and can be moved as before; what it prints and writes equals its native run.

#[macro_use]
mod common;

use common::cluster::{client, home_and_b, proc_info, tour, wait_for, wait_registered};
use common::Case;
use std::time::Duration;

#[test]
fn a_restarted_home_node_knows_its_processes_again() {
    require_kvm!();
    let (_dir, mut nodes) = home_and_b();
    let sock = nodes[0].sock.clone();
    Case::image("glibc-static", "ticker")
        .args(["400", "3000000", "4"])
        .socket(&sock)
        .check_while(|run| {
            let pid = run.pid();
            wait_registered(&sock, pid);
            let shown_on = |node: &str| {
                let node = node.to_string();
                let sock = sock.clone();
                move || proc_info(&sock, pid).is_some_and(|p| p["node"] == node.as_str())
            };
            // Restarted while the process runs at home: it is listed there again...
            nodes[0].restart(Duration::from_secs(20));
            wait_for(
                "home to list it again",
                Duration::from_secs(10),
                shown_on("home"),
            );
            // ...and moves as before.
            tour(&nodes[0], pid, &["b"], &mut |_| {});
            // Restarted while it runs on b: listed on b, and brought home from there.
            nodes[0].restart(Duration::from_secs(20));
            wait_for(
                "home to list it on b",
                Duration::from_secs(10),
                shown_on("b"),
            );
            tour(&nodes[0], pid, &["home"], &mut |_| {});
        });
}

/// A process away from home forks while its home node is down: the child runs at once (its
/// deputy registers with the node once it is back), as natively, where a fork needs no node.
#[test]
fn a_fork_away_from_home_while_the_home_node_is_down_runs() {
    require_kvm!();
    let (_dir, mut nodes) = home_and_b();
    let sock = nodes[0].sock.clone();
    let script = "sleep 1.5; /bin/echo forked while home was down; echo status=$?; \
                  for i in $(seq 1 30); do /bin/echo $i; sleep 0.1; done";
    Case::new("/bin/sh")
        .args(["-c", script])
        .socket(&sock)
        .check_while(|run| {
            let pid = run.pid();
            wait_registered(&sock, pid);
            tour(&nodes[0], pid, &["b"], &mut |_| {});
            // Down from before the `sleep` ends until well after the next fork.
            nodes[0].restart_after(Duration::from_secs(3), Duration::from_secs(20));
            wait_for("home to list it on b", Duration::from_secs(10), || {
                proc_info(&sock, pid).is_some_and(|p| p["node"] == "b")
            });
        });
}

/// `mosvm migrate --wait` whose node stops before the move is over says so (the outcome is not
/// known to it), and the process goes on where it was.
#[test]
fn a_waiting_migrate_whose_node_stops_says_so() {
    require_kvm!();
    let (_dir, mut nodes) = home_and_b();
    let sock = nodes[0].sock.clone();
    let b = nodes[1].child.id() as i32;
    Case::image("glibc-static", "ticker")
        .args(["400", "3000000", "4"])
        .socket(&sock)
        .check_while(|run| {
            let pid = run.pid();
            wait_registered(&sock, pid);
            // A destination that does not answer keeps the move under way for a while.
            // SAFETY: kill(2) of a node this test started.
            unsafe { libc::kill(b, libc::SIGSTOP) };
            let s = sock.clone();
            let waiting = std::thread::spawn(move || {
                client(&s, &["migrate", &pid.to_string(), "b", "--wait"])
            });
            std::thread::sleep(Duration::from_millis(500));
            nodes[0].restart(Duration::from_secs(20));
            let m = waiting.join().unwrap();
            // SAFETY: as above.
            unsafe { libc::kill(b, libc::SIGCONT) };
            let err = String::from_utf8_lossy(&m.stderr);
            assert!(!m.status.success());
            assert!(err.contains("stopped before the move"), "{err}");
            wait_for("home to list it again", Duration::from_secs(10), || {
                proc_info(&sock, pid).is_some_and(|p| p["node"] == "home")
            });
        });
}
