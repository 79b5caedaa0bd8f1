//! `mosvm node` and its local clients: registration of `mosvm run`, `ps`, `lock`/`unlock`,
//! `nodes`, and clean failures (unknown pid, no node, a second node on the same socket).

#[macro_use]
mod common;

use common::{image, mosvm_bin};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(sock: &Path, name: &str) -> Node {
    let child = Command::new(mosvm_bin())
        .args(["node", "--name", name, "--socket"])
        .arg(sock)
        .arg("--state-dir")
        .arg(sock.with_extension("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "node did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Node { child }
}

fn client(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(mosvm_bin())
        .args(args)
        .arg("--socket")
        .arg(sock)
        .output()
        .expect("client")
}

fn ps_json(sock: &Path) -> Vec<serde_json::Value> {
    let out = client(sock, &["ps", "--json"]);
    assert!(
        out.status.success(),
        "ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ps --json output")
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_registers_and_ps_lock_unlock_see_it() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let _node = start_node(&sock, "alpha");
    let ticker = image("glibc-static", "ticker");
    let mut run = Command::new(mosvm_bin())
        .arg("run")
        .arg("--socket")
        .arg(&sock)
        .arg(&ticker)
        .args(["400", "3000000", "4"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = run.id() as u64;
    wait_for(
        || ps_json(&sock).iter().any(|p| p["pid"] == pid),
        "the process to register",
    );
    let p = ps_json(&sock)
        .into_iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert_eq!(p["node"], "alpha");
    assert_eq!(p["program"], ticker.display().to_string());
    assert_eq!(p["locked"], false);
    assert!(client(&sock, &["lock", &pid.to_string()]).status.success());
    assert_eq!(
        ps_json(&sock)
            .into_iter()
            .find(|p| p["pid"] == pid)
            .unwrap()["locked"],
        true
    );
    assert!(client(&sock, &["unlock", &pid.to_string()])
        .status
        .success());
    assert_eq!(
        ps_json(&sock)
            .into_iter()
            .find(|p| p["pid"] == pid)
            .unwrap()["locked"],
        false
    );
    // Guest memory is reported (the ticker holds a 4 MiB buffer).
    wait_for(
        || {
            ps_json(&sock)
                .into_iter()
                .find(|p| p["pid"] == pid)
                .is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 4 << 20)
        },
        "guest memory to be reported",
    );
    let plain = client(&sock, &["ps"]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("alpha"));
    run.kill().unwrap();
    run.wait().unwrap();
    wait_for(
        || !ps_json(&sock).iter().any(|p| p["pid"] == pid),
        "the process to leave ps",
    );
}

#[test]
fn run_without_a_node_is_standalone_and_clients_fail_cleanly() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = Command::new(mosvm_bin())
        .arg("run")
        .arg("--socket")
        .arg(&sock)
        .arg(image("musl-static", "hello"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.is_empty());
    for args in [&["ps"][..], &["nodes"], &["lock", "1"]] {
        let o = client(&sock, args);
        assert!(!o.status.success(), "{args:?} succeeded without a node");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("cannot reach the mosvm node"), "{err}");
    }
}

#[test]
fn unknown_pid_and_second_node_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let _node = start_node(&sock, "beta");
    let o = client(&sock, &["lock", "4000000"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("no process with home pid 4000000 on node beta"));
    let second = Command::new(mosvm_bin())
        .args(["node", "--name", "gamma", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    let nodes = client(&sock, &["nodes", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(v[0]["name"], "beta");
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let _node = start_node(&sock, "delta");
    wait_for(
        || client(&sock, &["nodes"]).status.success(),
        "the node to answer",
    );
}

#[test]
fn nodes_lists_self_and_configured_peers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let child = Command::new(mosvm_bin())
        .args([
            "node",
            "--name",
            "eps",
            "--peer",
            "zeta=127.0.0.1:9",
            "--socket",
        ])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _node = Node { child };
    wait_for(|| sock.exists(), "the node's socket");
    let out = client(&sock, &["nodes", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["name"], "eps");
    assert!(v[0]["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(v[1]["name"], "zeta");
    assert_eq!(v[1]["addr"], "127.0.0.1:9");
    assert!(v[1]["age_s"].is_null());
    let text = client(&sock, &["nodes"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("never"));
    // A malformed peer is refused before the node starts.
    let bad = Command::new(mosvm_bin())
        .args(["node", "--peer", "zeta=nowhere", "--socket"])
        .arg(dir.path().join("x.sock"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
}

#[test]
fn mon_shows_the_node_and_its_processes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let _node = start_node(&sock, "omega");
    let mut run = Command::new(mosvm_bin())
        .arg("run")
        .arg("--socket")
        .arg(&sock)
        .arg(image("glibc-static", "ticker"))
        .args(["400", "3000000", "4"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = run.id() as u64;
    wait_for(
        || ps_json(&sock).iter().any(|p| p["pid"] == pid),
        "the process to register",
    );
    let out = client(&sock, &["mon", "--count", "2", "--interval", "0.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.matches("omega").count() >= 4,
        "node and process rows, twice: {text}"
    );
    assert_eq!(text.matches(&pid.to_string()).count(), 2, "{text}");
    run.kill().unwrap();
    run.wait().unwrap();
    let none = client(&dir.path().join("none.sock"), &["mon", "--count", "1"]);
    assert!(!none.status.success());
}
