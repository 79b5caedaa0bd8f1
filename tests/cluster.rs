//! The cluster on one machine: node services on loopback, each with its own control socket,
//! port and state directory, sharing a cluster key. A running process migrates from its home
//! node to another; what it prints, its exit status and the files it writes must equal a
//! native run. Fault cases: the destination refuses, the host of a guest dies, the deputy dies,
//! a peer without the key.

#[macro_use]
mod common;

use common::{image, mosvm_bin};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    child: Child,
    sock: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn keygen(dir: &Path) -> PathBuf {
    let k = dir.join("key");
    let out = Command::new(mosvm_bin())
        .args(["keygen", "--dir"])
        .arg(&k)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    k
}

/// Start nodes `names` with ports `ports`, all peers of each other, sharing `keys[i]`.
fn start_nodes(dir: &Path, names: &[&str], keys: &[&Path]) -> Vec<Node> {
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sock = dir.join(format!("{name}.sock"));
            let mut c = Command::new(mosvm_bin());
            c.args(["node", "--name", name, "--socket"])
                .arg(&sock)
                .args(["--listen", &format!("127.0.0.1:{}", ports[i])])
                .arg("--key-dir")
                .arg(keys[i])
                .arg("--state-dir")
                .arg(dir.join(format!("{name}.state")));
            for (j, other) in names.iter().enumerate() {
                if j != i {
                    c.args(["--peer", &format!("{other}=127.0.0.1:{}", ports[j])]);
                }
            }
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
            let t = Instant::now();
            while !sock.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "node {name} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Node { child, sock }
        })
        .collect()
}

fn ps(sock: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(mosvm_bin())
        .args(["ps", "--json", "--socket"])
        .arg(sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn proc_info(sock: &Path, pid: u32) -> Option<serde_json::Value> {
    ps(sock).into_iter().find(|p| p["pid"] == pid as u64)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn migrate(sock: &Path, pid: u32, to: &str) -> std::process::Output {
    Command::new(mosvm_bin())
        .args(["migrate", &pid.to_string(), to, "--socket"])
        .arg(sock)
        .output()
        .unwrap()
}

struct Outcome {
    stdout: Vec<u8>,
    stderr: String,
    status: Option<i32>,
    file: Vec<u8>,
}

fn native(prog: &Path, args: &[&str], dir: &Path) -> Outcome {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    Outcome {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        status: out.status.code(),
        file: std::fs::read(dir.join("ticker.out")).unwrap_or_default(),
    }
}

fn spawn_run(sock: &Path, prog: &Path, args: &[&str], dir: &Path) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    Command::new(mosvm_bin())
        .arg("run")
        .arg("--socket")
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

fn finish(child: Child, dir: &Path) -> Outcome {
    let out = child.wait_with_output().unwrap();
    Outcome {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        status: out.status.code(),
        file: std::fs::read(dir.join("ticker.out")).unwrap_or_default(),
    }
}

fn assert_same(got: &Outcome, want: &Outcome, what: &str) {
    assert_eq!(
        got.status, want.status,
        "{what}: exit status; mosvm stderr: {}",
        got.stderr
    );
    assert!(
        got.stdout == want.stdout,
        "{what}: stdout differs\n--- native ---\n{}\n--- mosvm ---\n{}\n--- mosvm stderr ---\n{}",
        String::from_utf8_lossy(&want.stdout),
        String::from_utf8_lossy(&got.stdout),
        got.stderr
    );
    assert!(got.file == want.file, "{what}: ticker.out differs");
}

#[test]
fn a_running_process_migrates_to_another_node_and_finishes_there() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = start_nodes(dir.path(), &["home", "b"], &[&key, &key]);
    for (variant, mib) in [
        ("glibc-static", "16"),
        ("dynamic", "48"),
        ("musl-static", "4"),
    ] {
        let prog = image(variant, "ticker");
        let args = ["60", "3000000", mib];
        let want = native(&prog, &args, &dir.path().join(format!("native-{variant}")));
        assert_eq!(want.status, Some(0));
        let wd = dir.path().join(format!("mosvm-{variant}"));
        let run = spawn_run(&nodes[0].sock, &prog, &args, &wd);
        let pid = run.id();
        wait_for("registration", Duration::from_secs(10), || {
            proc_info(&nodes[0].sock, pid).is_some()
        });
        std::thread::sleep(Duration::from_millis(300));
        let m = migrate(&nodes[0].sock, pid, "b");
        assert!(
            m.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        wait_for("the process to run on b", Duration::from_secs(20), || {
            proc_info(&nodes[0].sock, pid).is_some_and(|p| p["node"] == "b" && p["migrations"] == 1)
        });
        // Node b lists the guest it hosts for home.
        let hosted = proc_info(&nodes[1].sock, pid).expect("b's ps lists the guest it hosts");
        assert_eq!(hosted["state"], "guest of home");
        assert_eq!(hosted["node"], "b");
        assert_eq!(hosted["program"], prog.display().to_string());
        let got = finish(run, &wd);
        assert_same(&got, &want, variant);
        assert!(!got.stderr.contains("failed"), "{}", got.stderr);
        wait_for("b to forget the guest", Duration::from_secs(5), || {
            proc_info(&nodes[1].sock, pid).is_none()
        });
    }
}

/// Guest-host processes spawned by the node with pid `node`.
fn guest_hosts_of(node: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if status.contains(&format!("PPid:\t{node}\n"))
            && cmd.windows(10).any(|w| w == b"guest-host")
        {
            v.push(pid);
        }
    }
    v
}

/// Start a long ticker at home and move it to b; returns the running `mosvm run`.
fn remote_ticker(nodes: &[Node], wd: &Path) -> Child {
    let run = spawn_run(
        &nodes[0].sock,
        &image("glibc-static", "ticker"),
        &["100000", "3000000", "4"],
        wd,
    );
    let pid = run.id();
    wait_for("registration", Duration::from_secs(10), || {
        proc_info(&nodes[0].sock, pid).is_some()
    });
    assert!(migrate(&nodes[0].sock, pid, "b").status.success());
    wait_for("the process to run on b", Duration::from_secs(20), || {
        proc_info(&nodes[0].sock, pid).is_some_and(|p| p["node"] == "b")
    });
    assert_eq!(
        guest_hosts_of(nodes[1].child.id()).len(),
        1,
        "one guest host on b"
    );
    run
}

#[test]
fn signals_sent_home_reach_the_remote_guest() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = start_nodes(dir.path(), &["home", "b"], &[&key, &key]);
    let wd = dir.path().join("w");
    let run = remote_ticker(&nodes, &wd);
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let got = finish(run, &wd);
    assert_eq!(got.status, Some(143), "{}", got.stderr);
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_for(
        "the guest host on b to exit",
        Duration::from_secs(5),
        || guest_hosts_of(nodes[1].child.id()).is_empty(),
    );
}

#[test]
fn a_dead_deputy_takes_its_remote_guest_with_it() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = start_nodes(dir.path(), &["home", "b"], &[&key, &key]);
    let wd = dir.path().join("w");
    let mut run = remote_ticker(&nodes, &wd);
    run.kill().unwrap();
    run.wait().unwrap();
    wait_for(
        "the remote guest to be destroyed",
        Duration::from_secs(5),
        || guest_hosts_of(nodes[1].child.id()).is_empty(),
    );
}

#[test]
fn refusals_leave_the_process_running_where_it_was() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_key = keygen(&other_dir);
    // "b" holds a different cluster key: TLS fails, the migration fails, nothing is lost.
    let nodes = start_nodes(dir.path(), &["home", "b"], &[&key, &other_key]);
    let prog = image("glibc-static", "ticker");
    let args = ["40", "3000000", "8"];
    let want = native(&prog, &args, &dir.path().join("native"));
    let wd = dir.path().join("w");
    let run = spawn_run(&nodes[0].sock, &prog, &args, &wd);
    let pid = run.id();
    wait_for("registration", Duration::from_secs(10), || {
        proc_info(&nodes[0].sock, pid).is_some()
    });
    // Unknown node: refused at once, one line.
    let m = migrate(&nodes[0].sock, pid, "nowhere");
    assert!(!m.status.success());
    assert!(String::from_utf8_lossy(&m.stderr).contains("unknown node 'nowhere'"));
    // Locked: refused.
    let l = Command::new(mosvm_bin())
        .args(["lock", &pid.to_string(), "--socket"])
        .arg(&nodes[0].sock)
        .status()
        .unwrap();
    assert!(l.success());
    let m = migrate(&nodes[0].sock, pid, "b");
    assert!(!m.status.success());
    assert!(String::from_utf8_lossy(&m.stderr).contains("locked"));
    let u = Command::new(mosvm_bin())
        .args(["unlock", &pid.to_string(), "--socket"])
        .arg(&nodes[0].sock)
        .status()
        .unwrap();
    assert!(u.success());
    // A destination without our key: accepted as a request, fails in TLS, process stays.
    assert!(migrate(&nodes[0].sock, pid, "b").status.success());
    let got = finish(run, &wd);
    assert_same(&got, &want, "after a refused migration");
    assert!(
        got.stderr.contains("migration to b failed"),
        "{}",
        got.stderr
    );
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(
        log.contains("refused a peer without the cluster key"),
        "{log}"
    );
}

#[test]
fn losing_the_host_ends_the_home_process_cleanly() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let mut nodes = start_nodes(dir.path(), &["home", "b"], &[&key, &key]);
    let wd = dir.path().join("w");
    let run = remote_ticker(&nodes, &wd);
    // Kill node b and the guest it hosts, as a machine failure would.
    let b = nodes.pop().unwrap();
    let hosted = guest_hosts_of(b.child.id());
    drop(b);
    for g in hosted {
        // SAFETY: killing a process this test's node started.
        unsafe { libc::kill(g as i32, libc::SIGKILL) };
    }
    let t = Instant::now();
    let got = finish(run, &wd);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "home noticed only after {:?}",
        t.elapsed()
    );
    assert_eq!(got.status, Some(112), "{}", got.stderr);
    assert!(
        got.stderr.contains("lost the node running the process"),
        "{}",
        got.stderr
    );
}

/// Move a process home → a → b → home, waiting at each hop until `ps` shows it there.
fn round_trip(nodes: &[Node], pid: u32, between: &mut dyn FnMut(usize)) {
    let home = &nodes[0].sock;
    for (hop, (to, shown)) in [("a", "a"), ("b", "b"), ("home", "home")]
        .into_iter()
        .enumerate()
    {
        let m = migrate(home, pid, to);
        assert!(
            m.status.success(),
            "migrate to {to}: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        wait_for(
            &format!("the process to run on {shown}"),
            Duration::from_secs(90),
            || {
                proc_info(home, pid)
                    .is_some_and(|p| p["node"] == shown && p["migrations"] == hop as u64 + 1)
            },
        );
        between(hop);
    }
}

#[test]
fn a_process_travels_home_a_b_home_and_matches_native() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = start_nodes(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);

    // A program reading its input from home, as it arrives, on every node it visits.
    let prog = image("glibc-static", "stdin_filter");
    let chunks: Vec<String> = (0..4)
        .map(|c| (0..50).map(|i| format!("chunk {c} line {i}\n")).collect())
        .collect();
    let nd = dir.path().join("native-stdin");
    std::fs::create_dir_all(&nd).unwrap();
    let mut native_child = Command::new(&prog)
        .current_dir(&nd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut i = native_child.stdin.take().unwrap();
        for c in &chunks {
            i.write_all(c.as_bytes()).unwrap();
        }
    }
    let want = native_child.wait_with_output().unwrap();
    let wd = dir.path().join("mosvm-stdin");
    std::fs::create_dir_all(&wd).unwrap();
    let mut run = Command::new(mosvm_bin())
        .arg("run")
        .arg("--socket")
        .arg(&nodes[0].sock)
        .arg(&prog)
        .current_dir(&wd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = run.id();
    let mut input = run.stdin.take().unwrap();
    wait_for("registration", Duration::from_secs(10), || {
        proc_info(&nodes[0].sock, pid).is_some()
    });
    {
        use std::io::Write;
        input.write_all(chunks[0].as_bytes()).unwrap();
        // At every hop it is blocked reading its terminal (at home, or at home through the
        // link): the read is interrupted, the guest moves, and reissues it from the next node.
        std::thread::sleep(Duration::from_millis(300));
        round_trip(&nodes, pid, &mut |hop| {
            input.write_all(chunks[hop + 1].as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
    }
    drop(input);
    let out = run.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        want.status.code(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == want.stdout,
        "stdout differs after home → a → b → home while blocked on input: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A program computing, dirtying memory, printing steadily and writing a file.
    let prog = image("dynamic", "ticker");
    let args = ["400", "3000000", "32"];
    let want = native(&prog, &args, &dir.path().join("native-ticker"));
    let wd = dir.path().join("mosvm-ticker");
    let run = spawn_run(&nodes[0].sock, &prog, &args, &wd);
    let pid = run.id();
    wait_for("registration", Duration::from_secs(10), || {
        proc_info(&nodes[0].sock, pid).is_some()
    });
    round_trip(&nodes, pid, &mut |_| {});
    let got = finish(run, &wd);
    assert_same(&got, &want, "ticker after home → a → b → home");
}

#[test]
fn a_peer_speaking_another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let port = free_port();
    let sock = dir.path().join("n.sock");
    let log = std::fs::File::create(dir.path().join("n.log")).unwrap();
    let child = Command::new(mosvm_bin())
        .args([
            "node",
            "--name",
            "n",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--key-dir",
        ])
        .arg(&key)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _node = Node {
        child,
        sock: sock.clone(),
    };
    wait_for("the node", Duration::from_secs(10), || sock.exists());
    let tls = migrate::ClusterTls::load(&key).unwrap();
    let mut s = migrate::tls::connect(("127.0.0.1", port), &tls).unwrap();
    let mut hello = migrate::Hello::new(
        "old-peer",
        migrate::Purpose::Migrate,
        migrate::handshake::CpuFeatures::default(),
        None,
    );
    hello.protocol_version = migrate::PROTOCOL_VERSION + 7;
    match migrate::handshake::client_handshake(&mut s, &hello) {
        Err(e) => assert!(e.to_string().contains("version"), "{e}"),
        Ok(w) => panic!("a wrong-version peer was welcomed: {w:?}"),
    }
    wait_for("the refusal to be logged", Duration::from_secs(5), || {
        std::fs::read_to_string(dir.path().join("n.log"))
            .unwrap_or_default()
            .contains("refused a peer")
    });
}

#[test]
fn the_destination_dying_mid_migration_leaves_the_process_at_home() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let mut nodes = start_nodes(dir.path(), &["home", "b"], &[&key, &key]);
    let prog = image("glibc-static", "ticker");
    // A big working set keeps the pre-copy busy long enough to kill the destination in it.
    let args = ["60", "3000000", "768"];
    let want = native(&prog, &args, &dir.path().join("native"));
    let wd = dir.path().join("w");
    let run = spawn_run(&nodes[0].sock, &prog, &args, &wd);
    let pid = run.id();
    wait_for("registration", Duration::from_secs(10), || {
        proc_info(&nodes[0].sock, pid).is_some()
    });
    wait_for("the working set", Duration::from_secs(30), || {
        proc_info(&nodes[0].sock, pid)
            .is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 700 << 20)
    });
    assert!(migrate(&nodes[0].sock, pid, "b").status.success());
    wait_for("the guest host on b", Duration::from_secs(10), || {
        !guest_hosts_of(nodes[1].child.id()).is_empty()
    });
    let b = nodes.pop().unwrap();
    let hosted = guest_hosts_of(b.child.id());
    drop(b);
    for g in hosted {
        // SAFETY: killing a process this test's node started.
        unsafe { libc::kill(g as i32, libc::SIGKILL) };
    }
    let got = finish(run, &wd);
    assert_same(&got, &want, "after the destination died mid-migration");
    assert!(
        got.stderr.contains("migration to b failed"),
        "{}",
        got.stderr
    );
    assert_eq!(
        proc_info(&nodes[0].sock, pid),
        None,
        "the process ended at home"
    );
}
