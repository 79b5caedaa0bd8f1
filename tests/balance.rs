//! The cluster balancing itself (paper §2): nodes of different CPU capacity (cgroup quotas)
//! gossip over authenticated UDP, and CPU-bound jobs started on one node spread with no
//! manual command; the administrator's `mosvm ctl` verbs; membership as nodes join and die.
//! Every job's output is compared with the same program run natively.
//!
//! The capacity tests give each node a cgroup of its own (`mosvm node --cpus`), which needs
//! root and a cgroup CPU controller (v1 or v2); without them they say so and pass.

#[macro_use]
mod common;

use common::cluster::{client, keygen, ps, wait_for, Node, NodeSpec};
use common::{image, Case, Running};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Iterations of `compute` per job: about 3 s of CPU on this kind of machine.
const WORK: &str = "1650000000";

/// Whether nodes can be given cgroups of their own here.
fn cgroups_usable(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v1 = info.lines().any(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|r| r.starts_with("cgroup ") && r.split(',').any(|o| o == "cpu"))
    });
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"));
    let ok = root && (v1 || v2);
    if !ok {
        eprintln!("{test}: skipped: needs root and a cgroup cpu controller");
    }
    ok
}

/// For a test that gives nodes cgroups: a scratch directory and a unique node-name prefix
/// starting with `tag`, or `None` (the test says why and passes) without root and cgroups.
fn capacity_test(test: &str, tag: &str) -> Option<(tempfile::TempDir, String)> {
    cgroups_usable(test).then(|| (tempfile::tempdir().unwrap(), prefix(tag)))
}

/// A unique prefix for node names (their cgroups are named after them).
fn prefix(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// A node `name` on `addr` with automatic migration on (the MOSIX policy unless `policy`
/// names another), a half-second step, a balancer trace in `dir`, `--cpus` when given, and
/// `peers` (`(Some(name), addr)` by name, `(None, addr)` by address only).
fn capacity_node(
    dir: &Path,
    key: &Path,
    name: &str,
    addr: &str,
    cpus: Option<f64>,
    peers: &[(Option<&str>, &str)],
) -> Node {
    capacity_node_with(dir, key, name, addr, cpus, peers, "mosix")
}

fn capacity_node_with(
    dir: &Path,
    key: &Path,
    name: &str,
    addr: &str,
    cpus: Option<f64>,
    peers: &[(Option<&str>, &str)],
    policy: &str,
) -> Node {
    let trace = dir.join(format!("{name}.trace"));
    let mut s = NodeSpec::new(dir, name)
        .listen(addr)
        .key_dir(key)
        .policy(policy)
        .arg("--step")
        .arg("0.5")
        .arg("--balancer-trace")
        .arg(trace.to_str().unwrap());
    if let Some(c) = cpus {
        s = s.arg("--cpus").arg(&c.to_string());
    }
    for &(n, a) in peers {
        s = match n {
            Some(n) => s.peer(n, a),
            None => s.arg("--peer").arg(a),
        };
    }
    s.start()
}

/// Nodes `names` on loopback with the given `--cpus` (None: no cgroup), each knowing every
/// other by name, automatic migration on with a half-second step.
fn capacity_cluster(dir: &Path, names: &[String], cpus: &[Option<f64>]) -> Vec<Node> {
    let key = keygen(dir);
    let addrs: Vec<String> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", common::cluster::free_port()))
        .collect();
    (0..names.len())
        .map(|i| {
            let peers: Vec<(Option<&str>, &str)> = (0..names.len())
                .filter(|&j| j != i)
                .map(|j| (Some(names[j].as_str()), addrs[j].as_str()))
                .collect();
            capacity_node(dir, &key, &names[i], &addrs[i], cpus[i], &peers)
        })
        .collect()
}

/// The native run of `compute work`: stdout.
fn native_compute(work: &str) -> Vec<u8> {
    let out = Command::new(image("glibc-static", "compute"))
        .arg(work)
        .output()
        .expect("run compute natively");
    assert!(out.status.success());
    out.stdout
}

/// Start `n` jobs of `compute work` with node `sock` as their home.
fn start_jobs(sock: &Path, n: usize, work: &str, lock: bool) -> Vec<Running> {
    (0..n)
        .map(|_| {
            let mut c = Case::image("glibc-static", "compute")
                .arg(work)
                .socket(sock)
                .timeout(Duration::from_secs(240));
            if lock {
                c = c.mosvm_flag("--lock");
            }
            c.spawn_mosvm()
        })
        .collect()
}

/// Where each of the home node's processes has been seen running, polled until every job
/// ended (`each` sees every listing of the home's processes); then each job's output is
/// checked against the native run of `compute work`.
fn watch_and_finish(
    home: &Node,
    jobs: Vec<Running>,
    work: &str,
    mut each: impl FnMut(&[serde_json::Value]),
) -> BTreeMap<u32, BTreeSet<String>> {
    let pids: Vec<u32> = jobs.iter().map(|j| j.pid()).collect();
    // Each job has registered (it may have ended already: the home's log says so).
    wait_for("every job to register", Duration::from_secs(30), || {
        let log = home.log_text();
        pids.iter()
            .all(|p| log.contains(&format!("process registered pid={p} ")))
    });
    let mut seen: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let t = Instant::now();
    loop {
        let listed = ps(&home.sock);
        for p in &listed {
            let pid = p["pid"].as_u64().unwrap_or(0) as u32;
            if pids.contains(&pid) {
                seen.entry(pid)
                    .or_default()
                    .insert(p["node"].as_str().unwrap_or("?").to_string());
            }
        }
        each(&listed);
        if !listed
            .iter()
            .any(|p| pids.contains(&(p["pid"].as_u64().unwrap_or(0) as u32)))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "jobs still running after 240 s: {listed:?}\n{}",
            home.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The native run comes last: it would take a CPU from the jobs.
    let expect = native_compute(work);
    for j in jobs {
        let pid = j.pid();
        let out = j.finish();
        assert_eq!(out.shell_status(), 0, "job {pid}: {}", out.stderr_text());
        assert_eq!(
            out.stdout_text(),
            String::from_utf8_lossy(&expect),
            "job {pid} (seen on {:?}) differs from its native run",
            seen.get(&pid)
        );
    }
    seen
}

fn automatic_moves(n: &Node) -> usize {
    n.log_text().matches("automatic migration ").count()
}

#[test]
fn six_cpu_bound_jobs_spread_over_nodes_of_different_capacity() {
    require_kvm!();
    let Some((dir, p)) = capacity_test("six_cpu_bound_jobs_spread", "sp") else {
        return;
    };
    let names: Vec<String> = (1..=3).map(|i| format!("{p}n{i}")).collect();
    let nodes = capacity_cluster(dir.path(), &names, &[Some(0.5), Some(0.5), Some(1.0)]);
    // The nodes report their own capacities, not the machine's.
    wait_for(
        "every node to hear of the others",
        Duration::from_secs(20),
        || {
            let out = client(&nodes[0].sock, &["nodes", "--json"]);
            let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v.len() == 3 && v.iter().all(|n| n["up"] == true && n["age_s"].is_number())
        },
    );
    let out = client(&nodes[0].sock, &["nodes", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let cap: Vec<f64> = v.iter().map(|n| n["cpus"].as_f64().unwrap()).collect();
    assert_eq!(cap, vec![0.5, 0.5, 1.0], "{v:?}");

    let jobs = start_jobs(&nodes[0].sock, 6, WORK, false);
    let seen = watch_and_finish(&nodes[0], jobs, WORK, |_| {});
    let mut ran_on: BTreeMap<String, usize> = BTreeMap::new();
    for nodes_seen in seen.values() {
        for n in nodes_seen {
            *ran_on.entry(n.clone()).or_default() += 1;
        }
    }
    let logs: String = nodes.iter().map(|n| n.log_text()).collect();
    for n in &names {
        assert!(
            ran_on.get(n).copied().unwrap_or(0) > 0,
            "no job ran on {n}: {ran_on:?}\n{logs}"
        );
    }
    let moves: usize = nodes.iter().map(automatic_moves).sum();
    assert!(moves >= 2, "{moves} automatic moves\n{logs}");
    // What the busy node's balancer did is a pure function of what it was fed: replayed
    // through the core by the simulator, every decision comes out the same.
    let trace = dir.path().join(format!("{}.trace", names[0]));
    let out = Command::new(common::mosvm_bin())
        .args(["sim", "--json", "--replay"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["decisions"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["mismatches"].as_array().unwrap().len(), 0, "{r}");
    assert!(
        moves <= 6 * 3,
        "{moves} automatic moves for 6 jobs: the balancer ping-pongs\n{logs}"
    );
}

#[test]
fn a_blocked_node_receives_nothing_expel_empties_a_node_and_locked_jobs_stay() {
    require_kvm!();
    let Some((dir, p)) = capacity_test("a_blocked_node_receives_nothing", "bl") else {
        return;
    };
    let names: Vec<String> = (1..=3).map(|i| format!("{p}n{i}")).collect();
    let nodes = capacity_cluster(dir.path(), &names, &[Some(0.5), Some(1.0), Some(1.0)]);
    assert!(client(&nodes[1].sock, &["ctl", "block"]).status.success());
    let status = client(&nodes[1].sock, &["ctl", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["admin"]["block"], true);
    // A blocked node refuses a manual move too.
    let locked = start_jobs(&nodes[0].sock, 1, WORK, true);
    let mut jobs = start_jobs(&nodes[0].sock, 3, WORK, false);
    let lpid = locked[0].pid();
    common::cluster::wait_registered(&nodes[0].sock, lpid);
    // Wait until n3 hosts guests, then expel them: they go home or elsewhere, but never to
    // the blocked n2, and every job still ends with its native output.
    wait_for("n3 to receive work", Duration::from_secs(60), || {
        ps(&nodes[2].sock).iter().any(|p| {
            p["state"]
                .as_str()
                .is_some_and(|s| s.starts_with("guest of"))
        })
    });
    let expel = client(&nodes[2].sock, &["ctl", "expel"]);
    assert!(
        expel.status.success(),
        "expel: {}\n{}",
        String::from_utf8_lossy(&expel.stderr),
        nodes[2].log_text()
    );
    assert!(
        !ps(&nodes[2].sock).iter().any(|p| p["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("guest of"))),
        "n3 still hosts guests after expel"
    );
    // n3 stays out of it from now on.
    assert!(client(&nodes[2].sock, &["ctl", "block"]).status.success());
    jobs.extend(locked);
    let mut n2_hosted = false;
    let seen = watch_and_finish(&nodes[0], jobs, WORK, |_| {
        n2_hosted |= !ps(&nodes[1].sock).is_empty();
    });
    assert!(
        !n2_hosted,
        "the blocked node hosted a guest\n{}",
        nodes[1].log_text()
    );
    // The locked job may have ended before the watch began: its home's log says whether it
    // ever moved, and the watch, if it saw it, saw it only at home.
    let home_log = nodes[0].log_text();
    assert!(
        !home_log.contains(&format!("process migrated pid={lpid} ")),
        "the locked job moved\n{home_log}"
    );
    if let Some(s) = seen.get(&lpid) {
        assert_eq!(
            s,
            &BTreeSet::from([names[0].clone()]),
            "the locked job moved"
        );
    }
}

/// The text of `http://addr/metrics`.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    text
}

/// The value of the sample named exactly `name` (with its labels) in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Twice the usual job: long enough for a node to join mid-run and then be stopped.
const LONG_WORK: &str = "3300000000";

#[test]
fn a_node_joining_a_busy_cluster_receives_work_and_stopping_it_sends_the_work_on() {
    require_kvm!();
    let Some((dir, p)) = capacity_test("a_node_joining_a_busy_cluster", "lj") else {
        return;
    };
    let key = keygen(dir.path());
    let names: Vec<String> = (1..=3).map(|i| format!("{p}n{i}")).collect();
    let addrs: Vec<String> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", common::cluster::free_port()))
        .collect();
    let node = |i: usize, cpus: f64, peers: &[(Option<&str>, &str)]| {
        capacity_node(dir.path(), &key, &names[i], &addrs[i], Some(cpus), peers)
    };
    let n1 = node(0, 0.5, &[(Some(&names[1]), &addrs[1])]);
    let n2 = node(1, 0.5, &[(Some(&names[0]), &addrs[0])]);
    let jobs = start_jobs(&n1.sock, 4, LONG_WORK, false);
    // The two small nodes share the work for a while before the big one appears, knowing
    // nothing but n1's address.
    std::thread::sleep(Duration::from_secs(4));
    let joined = Instant::now();
    let mut n3 = Some(node(2, 1.0, &[(None, &addrs[0])]));
    let mut stop: Option<(Duration, usize, String)> = None;
    let seen = watch_and_finish(&n1, jobs, LONG_WORK, |listed| {
        let Some(n) = n3.as_mut() else {
            return;
        };
        let here = listed
            .iter()
            .filter(|p| p["node"] == names[2].as_str())
            .count();
        if here == 0 {
            return;
        }
        // The newcomer has work: stop it as systemd would. It sends its guests on and exits.
        let received = joined.elapsed();
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = n.child.try_wait().unwrap() {
                assert!(st.success(), "n3 exited with {st}\n{}", n.log_text());
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(45),
                "n3 still running 45 s after SIGTERM\n{}",
                n.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "n3 received work {received:?} after joining; stopped in {:?}",
            t.elapsed()
        );
        stop = Some((received, here, n.log_text()));
        n3 = None;
    });
    let logs = format!("{}{}", n1.log_text(), n2.log_text());
    let Some((_, hosted, n3_log)) = stop else {
        panic!("the node that joined late never received work: {seen:?}\n{logs}");
    };
    // Every job it hosted left it before it exited (the outputs were checked above), and it
    // said where they went.
    assert!(
        n3_log.contains("expelling a guest") && n3_log.contains("every guest left"),
        "n3 hosted {hosted} jobs and did not send them on\n{n3_log}"
    );
}

#[test]
fn gossip_without_the_cluster_key_is_rejected_and_counted() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&ka).unwrap();
    std::fs::create_dir_all(&kb).unwrap();
    let (ka, kb) = (keygen(&ka), keygen(&kb));
    let p = prefix("gk");
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let (pa, pb) = (
        format!("127.0.0.1:{}", common::cluster::free_port()),
        format!("127.0.0.1:{}", common::cluster::free_port()),
    );
    let metrics = format!("127.0.0.1:{}", common::cluster::free_port());
    let na = NodeSpec::new(dir.path(), &a)
        .listen(&pa)
        .key_dir(&ka)
        .peer(&b, &pb)
        .args(&["--step", "0.2", "--metrics", &metrics])
        .start();
    let nb = NodeSpec::new(dir.path(), &b)
        .listen(&pb)
        .key_dir(&kb)
        .peer(&a, &pa)
        .arg("--step")
        .arg("0.2")
        .start();
    let status = |n: &Node| -> serde_json::Value {
        serde_json::from_slice(&client(&n.sock, &["ctl", "status", "--json"]).stdout).unwrap()
    };
    // b keeps announcing itself to a (a configured peer SWIM does not list); a rejects every
    // datagram. Junk is sent until a counts it (its UDP port opens after its control socket).
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    wait_for("a to reject b's datagrams", Duration::from_secs(15), || {
        sock.send_to(b"hello there", &pa).unwrap();
        let s = status(&na);
        s["counters"]["rejected"]["bad_mac"].as_u64().unwrap_or(0) >= 3
            && s["counters"]["rejected"]["malformed"].as_u64().unwrap_or(0) >= 1
    });
    let s = status(&na);
    assert_eq!(s["nodes_up"], 0, "a lists b as a member: {s}");
    // The Prometheus endpoint counts the same rejections.
    let scrape = scrape(&metrics);
    let bad_mac = metric(
        &scrape,
        "mosvm_datagrams_rejected_total{reason=\"bad_mac\"}",
    );
    assert!(bad_mac.is_some_and(|v| v >= 3.0), "{scrape}");
    assert!(metric(&scrape, "mosvm_capacity_cpus").is_some(), "{scrape}");
    assert!(
        s["counters"]["received"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{s}"
    );
    let out = client(&na.sock, &["nodes", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.iter().skip(1).all(|n| n["age_s"].is_null()), "{v:?}");
    drop(nb);
}

#[test]
fn a_node_joining_by_one_address_learns_the_cluster_and_a_dead_node_drops_out() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let p = prefix("jn");
    let names: Vec<String> = (1..=3).map(|i| format!("{p}n{i}")).collect();
    let addrs: Vec<String> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", common::cluster::free_port()))
        .collect();
    let start = |i: usize, peers: &[usize]| {
        let mut s = NodeSpec::new(dir.path(), &names[i])
            .listen(&addrs[i])
            .key_dir(&key)
            .arg("--step")
            .arg("0.2");
        for &j in peers {
            // By address only: the name arrives with the answer.
            s = s.arg("--peer").arg(&addrs[j]);
        }
        s.start()
    };
    let n1 = start(0, &[]);
    let n2 = start(1, &[0]);
    let n3 = start(2, &[1]);
    let up = |n: &Node| -> BTreeSet<String> {
        let out = client(&n.sock, &["nodes", "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.iter()
            .skip(1)
            .filter(|n| n["up"] == true && n["age_s"].is_number())
            .map(|n| n["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // n1 was told of nobody, n3 only of n2's address: gossip introduces everyone.
    wait_for(
        "n1 and n3 to know each other",
        Duration::from_secs(30),
        || up(&n1).contains(&names[2]) && up(&n3).contains(&names[0]),
    );
    // n3 dies without a word: the others drop it within SWIM's timeout.
    n3.crash();
    let t = Instant::now();
    wait_for(
        "n1 and n2 to drop the dead node",
        Duration::from_secs(60),
        || !up(&n1).contains(&names[2]) && !up(&n2).contains(&names[2]),
    );
    eprintln!("dropped after {:?}", t.elapsed());
    // Nothing hangs: the clients still answer at once.
    let t = Instant::now();
    assert!(client(&n1.sock, &["nodes"]).status.success());
    assert!(client(&n2.sock, &["ctl", "status"]).status.success());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn memory_ushering_moves_a_process_off_a_node_short_of_memory() {
    require_kvm!();
    let Some((dir, p)) = capacity_test("memory_ushering", "us") else {
        return;
    };
    let key = keygen(dir.path());
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let (pa, pb) = (
        format!("127.0.0.1:{}", common::cluster::free_port()),
        format!("127.0.0.1:{}", common::cluster::free_port()),
    );
    // a has 512 MiB and ushers below 30 % free; b has the machine's memory. Both idle CPUs:
    // only memory can make the process move.
    let na = NodeSpec::new(dir.path(), &a)
        .listen(&pa)
        .key_dir(&key)
        .peer(&b, &pb)
        .policy("mosix")
        .args(&["--step", "0.5", "--memory", "512M", "--usher-free", "0.3"])
        .start();
    let _nb = NodeSpec::new(dir.path(), &b)
        .listen(&pb)
        .key_dir(&key)
        .peer(&a, &pa)
        .policy("mosix")
        .args(&["--step", "0.5"])
        .start();
    let args = ["400", "0", "8"];
    let native = Command::new(image("glibc-static", "hog"))
        .args(args)
        .output()
        .unwrap();
    let job = Case::image("glibc-static", "hog")
        .args(args)
        .mosvm_flag("--mem")
        .mosvm_flag("1G")
        .socket(&na.sock)
        .timeout(Duration::from_secs(120))
        .spawn_mosvm();
    let pid = job.pid();
    wait_for(
        "the process to be moved for memory",
        Duration::from_secs(60),
        || {
            common::cluster::proc_info(&na.sock, pid)
                .is_some_and(|p| p["node"] == b.as_str() && p["moved_by"] == "memory")
        },
    );
    let out = job.finish();
    assert_eq!(out.shell_status(), 0, "{}", out.stderr_text());
    assert_eq!(out.stdout_text(), String::from_utf8_lossy(&native.stdout));
}

#[test]
fn a_move_a_host_asks_for_that_the_home_refuses_is_reported_back_at_once() {
    require_kvm!();
    let Some((dir, p)) = capacity_test("a_move_a_host_asks_for", "mf") else {
        return;
    };
    let names: Vec<String> = (1..=3).map(|i| format!("{p}n{i}")).collect();
    // n1 (the home) has the machine; n2 is small, n3 big and idle.
    let nodes = capacity_cluster(dir.path(), &names, &[None, Some(0.5), Some(1.0)]);
    let jobs = start_jobs(&nodes[0].sock, 2, WORK, false);
    let pids: Vec<u32> = jobs.iter().map(|j| j.pid()).collect();
    // Both go to n2 by hand and are locked there: n2's balancer wants to move one on, and
    // the home refuses because it is locked.
    for &pid in &pids {
        common::cluster::wait_registered(&nodes[0].sock, pid);
        let m = common::cluster::migrate(&nodes[0].sock, pid, &names[1]);
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    }
    for &pid in &pids {
        wait_for("the manual move to n2", Duration::from_secs(20), || {
            common::cluster::proc_info(&nodes[0].sock, pid)
                .is_some_and(|p| p["node"] == names[1].as_str() && p["state"] == "running")
        });
        let l = client(&nodes[0].sock, &["lock", &pid.to_string()]);
        assert!(l.status.success(), "{}", String::from_utf8_lossy(&l.stderr));
    }
    let locked = Instant::now();
    wait_for(
        "n2 to hear that its move was refused",
        Duration::from_secs(20),
        || {
            nodes[1]
                .log_text()
                .contains("automatic migration failed at home")
        },
    );
    eprintln!(
        "refusal known at the host {:?} after the lock",
        locked.elapsed()
    );
    assert!(
        nodes[0].log_text().contains("not moving: process"),
        "{}",
        nodes[0].log_text()
    );
    let seen = watch_and_finish(&nodes[0], jobs, WORK, |_| {});
    for pid in pids {
        assert!(
            !seen.get(&pid).is_some_and(|s| s.contains(&names[2])),
            "locked job {pid} moved to n3: {seen:?}"
        );
    }
}

#[test]
fn the_opportunity_cost_policy_spreads_jobs_too() {
    require_kvm!();
    let Some((dir, p)) = capacity_test("the_opportunity_cost_policy", "oc") else {
        return;
    };
    let key = keygen(dir.path());
    let names = [format!("{p}a"), format!("{p}b")];
    let addrs = [
        format!("127.0.0.1:{}", common::cluster::free_port()),
        format!("127.0.0.1:{}", common::cluster::free_port()),
    ];
    let nodes: Vec<Node> = [(0, 1, 0.5), (1, 0, 1.0)]
        .iter()
        .map(|&(i, j, cpus)| {
            capacity_node_with(
                dir.path(),
                &key,
                &names[i],
                &addrs[i],
                Some(cpus),
                &[(Some(&names[j]), &addrs[j])],
                "opportunity-cost",
            )
        })
        .collect();
    let jobs = start_jobs(&nodes[0].sock, 3, WORK, false);
    let seen = watch_and_finish(&nodes[0], jobs, WORK, |_| {});
    let logs: String = nodes.iter().map(|n| n.log_text()).collect();
    assert!(
        seen.values().any(|s| s.contains(&names[1])),
        "no job moved to the idle node: {seen:?}\n{logs}"
    );
    let status = client(&nodes[0].sock, &["ctl", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["policy"], "opportunity-cost", "{st}");
}
