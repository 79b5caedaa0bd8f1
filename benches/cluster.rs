//! `cargo bench --bench cluster`: live migration between two node services on loopback, side
//! by side with raw loopback TCP measured in the same run. Prints total time, downtime
//! (guest paused to guest running at the destination), bytes sent per touched byte, and
//! throughput as a ratio of raw TCP; then one forwarded syscall at home vs from the remote
//! node. Numbers go into BENCHMARKS.md; nothing here passes or fails on time.

// The tests' support code: images, the mosvm binary, node services and their clients.
#[allow(unused_macros)]
#[path = "../tests/common/mod.rs"]
mod common;

use common::cluster::{client, keygen, loopback_cluster_with, spares_of};
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

/// Loopback TCP throughput, bytes/s, into 1 GiB of freshly mapped memory (each byte lands on
/// a page the receiver touches for the first time, as a migration's destination does).
fn raw_tcp_fresh() -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let total = 1usize << 30;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // calloc maps fresh zero pages: the first write to each page faults it in.
        let mut dst = vec![0u8; total];
        let mut got = 0;
        while got < total {
            let end = (got + (1 << 20)).min(total);
            let n = s.read(&mut dst[got..end]).unwrap();
            assert!(n > 0);
            got += n;
        }
        dst[total / 2]
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..total >> 20 {
        s.write_all(&buf).unwrap();
    }
    assert_eq!(reader.join().unwrap(), 7);
    total as f64 / t.elapsed().as_secs_f64()
}

/// The median of three runs of `f`.
fn median3(f: fn() -> f64) -> f64 {
    let mut v = [f(), f(), f()];
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[1]
}

/// Median round trip of a 64-byte message between two threads over loopback TCP, ns.
fn tcp_rtt() -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = 5000;
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 64];
        for _ in 0..n {
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        }
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = [1u8; 64];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
        v.push(t.elapsed().as_nanos() as f64);
    }
    echo.join().unwrap();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[n / 2]
}

/// Moves `pid` (homed at the node behind `sock`) to node b.
fn to_b(sock: &Path, pid: u32) {
    to_b_as(sock, pid, None);
}

/// Moves `pid` to node b, with `mode` (`--precopy`, `--postcopy`) when given.
fn to_b_as(sock: &Path, pid: u32, mode: Option<&str>) {
    let pid_s = pid.to_string();
    let mut args = vec!["migrate", pid_s.as_str(), "b"];
    args.extend(mode);
    let out = client(sock, &args);
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
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Let a moved process run to its end (its output read through `out`): its migration report.
fn finish(mut run: Child, mut out: BufReader<std::process::ChildStdout>) -> serde_json::Value {
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(run.wait().unwrap().success(), "{err}");
    report_of(&err)
}

fn report_of(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("mosvm-migration "))
        .unwrap_or_else(|| panic!("no migration report in: {stderr}"));
    serde_json::from_str(line).unwrap()
}

/// `procbench MODE N go`'s time per operation, ns: natively, under mosvm at home, and under
/// mosvm moved to node b before it starts (its children are forked there).
fn tree_op(sock: &Path, dir: &Path, mode: &str, n: u32) -> [f64; 3] {
    let prog = image("glibc-static", "procbench");
    let args: Vec<String> = vec![mode.into(), n.to_string(), "go".into()];
    let ns_of = |out: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix("ns_per_op "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("procbench {mode}: no time in {out:?}"))
    };
    let go = dir.join("go");
    std::fs::write(&go, b"").unwrap();
    let native = Command::new(&prog)
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(native.status.success(), "native procbench {mode}");
    let home = Command::new(mosvm_bin())
        .args(["run", "--socket"])
        .arg(sock)
        .arg(&prog)
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(home.status.success(), "procbench {mode} at home");
    std::fs::remove_file(&go).unwrap();
    let mut run = spawn(sock, &prog, &args, dir);
    common::cluster::wait_registered(sock, run.id());
    to_b(sock, run.id());
    common::cluster::wait_for("the move to b", Duration::from_secs(30), || {
        common::cluster::proc_info(sock, run.id()).is_some_and(|p| p["node"] == "b")
    });
    std::fs::write(&go, b"").unwrap();
    let mut away = String::new();
    run.stdout
        .take()
        .unwrap()
        .read_to_string(&mut away)
        .unwrap();
    assert!(run.wait().unwrap().success(), "procbench {mode} away");
    std::fs::remove_file(&go).unwrap();
    [
        ns_of(&String::from_utf8_lossy(&native.stdout)),
        ns_of(&String::from_utf8_lossy(&home.stdout)),
        ns_of(&away),
    ]
}

/// Wait (up to a minute) until node `node`'s spare guest host holds `bytes` of touched memory
/// (its resident size), so each row's guest arrives into a full pool.
fn wait_spare_filled(node: u32, bytes: u64) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let rss = spares_of(node).first().map_or(0, |&p| mosvm_rss(p));
        if rss >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("   (the spare's pool was not full after a minute)");
}

/// Resident memory of process `pid`, bytes.
fn mosvm_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    // Each node keeps 1 GiB of touched memory for arrivals (`--pool`), enough for the
    // largest row; it is refilled at idle priority between rows.
    let nodes = loopback_cluster_with(dir.path(), &["home", "b"], &[&key, &key], &["--pool", "1G"]);
    let sock = nodes[0].sock.clone();
    println!(
        "mosvm live migration on loopback: two node services (--pool 1G), the process's link straight between source and destination over TLS (one migration per row; references are medians of three)\n"
    );
    println!(
        "{:>10} {:>8} {:>10} {:>9} {:>11} {:>9} {:>11} {:>9} {:>7} {:>9}",
        "switch",
        "working",
        "dirtying",
        "total",
        "downtime",
        "rounds",
        "sent/",
        "MB/s",
        "vs raw",
        "vs TCP to"
    );
    println!(
        "{:>10} {:>8} {:>10} {:>9} {:>11} {:>9} {:>11} {:>9} {:>7} {:>9}",
        "", "set MiB", "MiB/s", "ms", "ms", "", "touched", "", "TCP", "fresh mem"
    );
    // Default switch-over (pre-copy, turning to post-copy when it cannot converge), then
    // pre-copy and post-copy side by side for the guests that dirty fast.
    for (mib, rate, mode) in [
        (16, 0, None),
        (256, 0, None),
        (1024, 0, None),
        (256, 10, None),
        (256, 50, None),
        (256, 200, Some("--precopy")),
        (256, 200, Some("--postcopy")),
        (256, 2000, Some("--precopy")),
        (256, 2000, Some("--postcopy")),
        (256, 2000, None),
    ] {
        // References: medians of three, taken right before this row's migration, once b's
        // spare has refilled its pool.
        wait_spare_filled(nodes[1].child.id(), 1 << 30);
        let raw = median3(raw_tcp);
        let fresh = median3(raw_tcp_fresh);
        let secs = 4 + mib / 128;
        let args = vec![mib.to_string(), rate.to_string(), secs.to_string()];
        let mut run = spawn(&sock, &image("glibc-static", "hog"), &args, dir.path());
        let mut out = BufReader::new(run.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(Duration::from_millis(if rate > 0 { 500 } else { 100 }));
        to_b_as(&sock, run.id(), mode);
        let r = finish(run, out);
        let f = |k: &str| r[k].as_f64().unwrap();
        // A post-copy from the start has no first pass: it sends every touched page once.
        let touched = if f("first_pages") > 0.0 {
            f("first_pages")
        } else {
            f("pages")
        } * 4096.0;
        let bps = f("bytes") / (f("total_ns") / 1e9);
        let switch = match (mode, r["postcopy"].as_bool() == Some(true)) {
            (None, true) => "auto>post",
            (None, false) => "auto",
            (Some(m), _) => m.trim_start_matches('-'),
        };
        println!(
            "{:>10} {:>8} {:>10} {:>9.1} {:>11.2} {:>9} {:>11.3} {:>9.0} {:>7.2} {:>9.2}",
            switch,
            mib,
            rate,
            f("total_ns") / 1e6,
            f("downtime_ns") / 1e6,
            r["rounds"],
            f("bytes") / touched,
            bps / 1e6,
            bps / raw,
            bps / fresh
        );
        eprintln!(
            "   (raw loopback TCP {:.0} MB/s, into fresh memory {:.0} MB/s; throttle {:.2}; post-copy: {} pages after resuming, {} faults, {:.1} ms)",
            raw / 1e6,
            fresh / 1e6,
            f("throttle"),
            r["outstanding_pages"],
            r["faults"],
            f("postcopy_ns") / 1e6
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
    let rtt = tcp_rtt();
    println!("\nforwarded getppid as the program sees it: at home {:.1} us, from the remote node {:.1} us, ratio {:.2}", home / 1e3, remote / 1e3, remote / home);
    println!(
        "loopback TCP round trip {:.1} us: remote - home = {:.2} round trips",
        rtt / 1e3,
        (remote - home) / rtt
    );

    // Process trees away from home: a process moved to b forks there (its children's deputies
    // are forked at home), and a child that execs goes home without its memory.
    println!(
        "\nprocess trees (per operation; natively, under mosvm at home, under mosvm moved to b):"
    );
    for (mode, what, n) in [
        ("fork", "fork + exit + wait", 100),
        ("spawn", "vfork + exec /bin/true + wait", 40),
    ] {
        let [native, home, away] = tree_op(&sock, dir.path(), mode, n);
        println!(
            "  {what}: native {:.0} us, at home {:.0} us ({:.1} x native), away {:.0} us ({:.1} x native, {:.2} x at home)",
            native / 1e3,
            home / 1e3,
            home / native,
            away / 1e3,
            away / native,
            away / home
        );
    }

    // A threaded process (four workers, a napping thread, one blocked on a pipe, one on
    // stdin: seven threads) moved while it works: every thread stops and travels.
    let raw = median3(raw_tcp);
    let args: Vec<String> = ["200", "1500000", "64"].map(String::from).to_vec();
    let mut run = spawn(&sock, &image("glibc-static", "mtticker"), &args, dir.path());
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    to_b(&sock, run.id());
    let r = finish(run, out);
    let f = |k: &str| r[k].as_f64().unwrap();
    let bps = f("bytes") / (f("total_ns") / 1e9);
    println!(
        "\nthreaded process (7 threads, 64 MiB, all working): total {:.1} ms, downtime {:.2} ms, {} rounds, {:.0} MB/s = {:.2} x raw loopback TCP ({:.0} MB/s)",
        f("total_ns") / 1e6,
        f("downtime_ns") / 1e6,
        r["rounds"],
        bps / 1e6,
        bps / raw,
        raw / 1e6
    );
}
