//! The guest's vDSO: its clock calls are answered in the guest from the time page, without a
//! VM exit, and agree with the system call and with the native run, wherever the process
//! runs. (`images.rs` runs `clocks check`, the differential test of every clock id.)

#[macro_use]
mod common;

use common::cluster::{keygen, loopback_cluster, tour, wait_registered};
use common::Case;
use std::time::Duration;

/// 100,000 rounds of clock_gettime (three clocks), gettimeofday, time and sched_getcpu:
/// 600,000 calls that would each be an exit without the vDSO.
#[test]
fn clock_calls_make_no_vm_exit() {
    require_kvm!();
    for variant in common::VARIANTS {
        let (_, guest) = Case::image(variant, "clocks")
            .args(["count", "100000"])
            .mosvm_flag("--stats")
            .ignore_stderr()
            .check();
        let err = guest.stderr_text();
        let line = err
            .lines()
            .find(|l| l.starts_with("{\"exits\":"))
            .unwrap_or_else(|| panic!("{variant}: no --stats line in {err}"));
        let stats: serde_json::Value = serde_json::from_str(line).unwrap();
        let exits = stats["exits"].as_u64().unwrap();
        assert!(
            exits < 1000,
            "{variant}: {exits} exits for 600000 clock calls"
        );
    }
}

/// A process reading its clocks in a tight loop (through the vDSO, with a system call now and
/// then) is moved home -> a -> b -> home: CLOCK_MONOTONIC never goes back, across the moves
/// and between the two paths, and the wall clock keeps pace; the output equals the native run.
#[test]
fn clocks_read_in_a_loop_stay_monotonic_across_moves() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);
    let home = &nodes[0];
    for variant in ["dynamic", "musl-static"] {
        Case::image(variant, "clocks")
            .args(["travel", "12"])
            .socket(&home.sock)
            .timeout(Duration::from_secs(120))
            .check_while(|run| {
                wait_registered(&home.sock, run.pid());
                tour(home, run.pid(), &["a", "b", "home"], &mut |_| {
                    std::thread::sleep(Duration::from_millis(500));
                });
            });
    }
}
