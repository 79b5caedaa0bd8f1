//! `cargo bench --bench cluster`: live migration between two node services on loopback, side
//! by side with raw loopback TCP measured in the same run. Prints total time, downtime
//! (guest paused to guest running at the destination), bytes sent per touched byte, and
//! throughput as a ratio of raw TCP; then one forwarded syscall at home vs from the remote
//! node. Numbers go into BENCHMARKS.md; nothing here passes or fails on time.

// The tests' support code: images, the mosvm binary, node services and their clients.
#[allow(unused_macros)]
#[path = "../tests/common/mod.rs"]
mod common;

use common::cluster::{keygen, loopback_cluster, migrate};
use common::{image, mosvm_bin};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Raw loopback TCP throughput, bytes/s: 1 GiB in 1 MiB writes.
fn raw_tcp() -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let total = 1u64 << 30;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n as u64;
        }
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..total >> 20 {
        s.write_all(&buf).unwrap();
    }
    reader.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64()
}

/// Moves `pid` (homed at the node behind `sock`) to node b.
fn to_b(sock: &Path, pid: u32) {
    let out = migrate(sock, pid, "b");
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn(sock: &Path, prog: &Path, args: &[String], dir: &Path) -> Child {
    Command::new(mosvm_bin())
        .args(["run", "--stats", "--socket"])
        .arg(sock)
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report_of(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("mosvm-migration "))
        .unwrap_or_else(|| panic!("no migration report in: {stderr}"));
    serde_json::from_str(line).unwrap()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &key]);
    let sock = nodes[0].sock.clone();
    println!(
        "mosvm live migration on loopback: two node services, mutual TLS (medians of 1 run each)\n"
    );
    println!(
        "{:>8} {:>10} {:>9} {:>11} {:>9} {:>11} {:>9} {:>7}",
        "working", "dirtying", "total", "downtime", "rounds", "sent/", "MB/s", "vs raw"
    );
    println!(
        "{:>8} {:>10} {:>9} {:>11} {:>9} {:>11} {:>9} {:>7}",
        "set MiB", "MiB/s", "ms", "ms", "", "touched", "", "TCP"
    );
    for (mib, rate) in [
        (16, 0),
        (256, 0),
        (1024, 0),
        (256, 10),
        (256, 50),
        (256, 200),
    ] {
        let raw = raw_tcp();
        let secs = 4 + mib / 128;
        let args = vec![mib.to_string(), rate.to_string(), secs.to_string()];
        let mut run = spawn(&sock, &image("glibc-static", "hog"), &args, dir.path());
        let mut out = BufReader::new(run.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(Duration::from_millis(if rate > 0 { 500 } else { 100 }));
        to_b(&sock, run.id());
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let mut err = String::new();
        run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(run.wait().unwrap().success(), "{err}");
        let r = report_of(&err);
        let f = |k: &str| r[k].as_f64().unwrap();
        let touched = f("first_pages") * 4096.0;
        let bps = f("bytes") / (f("total_ns") / 1e9);
        println!(
            "{:>8} {:>10} {:>9.1} {:>11.2} {:>9} {:>11.3} {:>9.0} {:>7.2}",
            mib,
            rate,
            f("total_ns") / 1e6,
            f("downtime_ns") / 1e6,
            r["rounds"],
            f("bytes") / touched,
            bps / 1e6,
            bps / raw
        );
    }

    // One forwarded syscall: at home, then from the remote node (same process, same run).
    let mut run = spawn(
        &sock,
        &image("glibc-static", "pingpong"),
        &["60".into(), "2000".into()],
        dir.path(),
    );
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut rounds = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        let ns: f64 = line
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        rounds.push(ns);
        if rounds.len() == 10 {
            to_b(&sock, run.id());
        }
        line.clear();
    }
    run.wait().unwrap();
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let home = med(&rounds[2..10]);
    let remote = med(&rounds[rounds.len() - 20..]);
    println!("\nforwarded getppid as the program sees it: at home {:.1} us, from the remote node {:.1} us, ratio {:.2}", home / 1e3, remote / 1e3, remote / home);
}
