//! `mosvm node` and its local clients: registration of `mosvm run`, `ps`, `lock`/`unlock`,
//! `nodes`, and clean failures (unknown pid, no node, a second node on the same socket).

#[macro_use]
mod common;

use common::cluster::{client, proc_info, wait_for, wait_registered, NodeSpec};
use common::{image, mosvm_bin, Case, Running};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A long-running ticker registered with the node behind `sock` (killed when dropped).
fn registered_ticker(sock: &Path) -> Running {
    let run = Case::image("glibc-static", "ticker")
        .args(["400", "3000000", "4"])
        .socket(sock)
        .spawn_mosvm();
    wait_registered(sock, run.pid());
    run
}

/// Polls `f` for at most 15 s.
fn wait(what: &str, f: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(15), f)
}

#[test]
fn run_registers_and_ps_lock_unlock_see_it() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let node = NodeSpec::new(dir.path(), "alpha").start();
    let sock = node.sock.clone();
    let run = registered_ticker(&sock);
    let pid = run.pid();
    let p = proc_info(&sock, pid).unwrap();
    assert_eq!(p["node"], "alpha");
    assert_eq!(
        p["program"],
        image("glibc-static", "ticker").display().to_string()
    );
    assert_eq!(p["locked"], false);
    assert!(client(&sock, &["lock", &pid.to_string()]).status.success());
    assert_eq!(proc_info(&sock, pid).unwrap()["locked"], true);
    assert!(client(&sock, &["unlock", &pid.to_string()])
        .status
        .success());
    assert_eq!(proc_info(&sock, pid).unwrap()["locked"], false);
    // Guest memory is reported (the ticker holds a 4 MiB buffer).
    wait("guest memory to be reported", || {
        proc_info(&sock, pid).is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 4 << 20)
    });
    let plain = client(&sock, &["ps"]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("alpha"));
    drop(run); // kills it
    wait("the process to leave ps", || {
        proc_info(&sock, pid).is_none()
    });
}

#[test]
fn run_without_a_node_is_standalone_and_clients_fail_cleanly() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    // No node named and none at the default path: the program runs standalone.
    let out = Command::new(mosvm_bin())
        .arg("run")
        .arg(image("musl-static", "hello"))
        .env_remove("MOSVM_SOCKET")
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.is_empty());
    // An empty MOSVM_SOCKET names no node.
    let out = Command::new(mosvm_bin())
        .arg("run")
        .arg(image("musl-static", "hello"))
        .env("MOSVM_SOCKET", "")
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A node named by --socket or MOSVM_SOCKET that is not there (a mistyped path): one line,
    // exit 1, and the program does not run.
    for by_env in [false, true] {
        let mut cmd = Command::new(mosvm_bin());
        cmd.arg("run");
        if by_env {
            cmd.env("MOSVM_SOCKET", &sock);
        } else {
            cmd.arg("--socket").arg(&sock);
        }
        let out = cmd.arg(image("musl-static", "hello")).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(out.stdout.is_empty(), "the program ran");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("no mosvm node at"), "{err}");
    }
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
    let node = NodeSpec::new(dir.path(), "beta").start();
    let sock = node.sock.clone();
    let o = client(&sock, &["lock", "4000000"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("no process with home pid 4000000 on node beta"));
    let gamma_state = dir.path().join("gamma.state");
    let second = Command::new(mosvm_bin())
        .args(["node", "--name", "gamma", "--socket"])
        .arg(&sock)
        .arg("--state-dir")
        .arg(&gamma_state)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    assert!(
        !gamma_state.exists(),
        "a node that did not start left its state directory"
    );
    let nodes = client(&sock, &["nodes", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(v[0]["name"], "beta");
}

#[test]
fn a_process_gone_before_its_registration_is_answered_is_forgotten() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeSpec::new(dir.path(), "epsilon").start();
    // Processes that register and are gone at once, before the node answers (a child
    // killed right after its fork): each goes from `ps`.
    for (i, line) in [
        r#"{"op":"register","pid":3999001,"program":"/bin/a","locked":false}"#,
        r#"{"op":"register","pid":3999002,"program":"/bin/b","locked":false,"away_on":"x"}"#,
    ]
    .iter()
    .enumerate()
    {
        for _ in 0..20 {
            let mut s = std::os::unix::net::UnixStream::connect(&node.sock).unwrap();
            s.write_all(format!("{line}\n").as_bytes()).unwrap();
            drop(s);
        }
        let pid = 3999001 + i as u32;
        wait("the node to forget them", || {
            proc_info(&node.sock, pid).is_none()
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let all = client(&node.sock, &["ps", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&all.stdout).unwrap();
    assert!(v.is_empty(), "left in ps: {v:?}");
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), "delta");
    let sock = spec.sock();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let _node = spec.start();
    wait("the node to answer", || {
        client(&sock, &["nodes"]).status.success()
    });
}

#[test]
fn nodes_lists_self_and_configured_peers() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeSpec::new(dir.path(), "eps")
        .peer("zeta", "127.0.0.1:9")
        .start();
    let sock = node.sock.clone();
    let out = client(&sock, &["nodes", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["name"], "eps");
    assert!(v[0]["cpus"].as_f64().unwrap() >= 0.5, "{v:?}");
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
    let node = NodeSpec::new(dir.path(), "omega").start();
    let sock = node.sock.clone();
    let run = registered_ticker(&sock);
    let pid = run.pid();
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
    drop(run); // kills it
               // No node at all: one line, once.
    let none = client(&dir.path().join("none.sock"), &["mon", "--count", "1"]);
    assert!(!none.status.success());
    assert_eq!(String::from_utf8_lossy(&none.stderr).lines().count(), 1);
    // The node goes away while watched: mon says so and keeps looking.
    let watch = Command::new(mosvm_bin())
        .args(["mon", "--count", "30", "--interval", "0.1", "--socket"])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    node.crash();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("omega") && text.contains("the node is gone"),
        "{text}"
    );
}

/// A node that fails to start (here: --listen without a cluster key, after its socket is
/// bound) removes the socket and the state directory it made; the live node's stay.
#[test]
fn a_node_that_fails_to_start_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, state) = (dir.path().join("n.sock"), dir.path().join("n.state"));
    let out = Command::new(mosvm_bin())
        .args(["node", "--name", "n", "--listen", "127.0.0.1:9", "--socket"])
        .arg(&sock)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("needs the cluster key"), "{err}");
    assert!(!sock.exists(), "socket left behind");
    assert!(!state.exists(), "state directory left behind");
}

/// `--listen` and `--peer` take host names as well as addresses.
#[test]
fn host_names_are_accepted_for_listen_and_peers() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::cluster::keygen(dir.path());
    let (p1, p2) = (common::cluster::free_port(), common::cluster::free_port());
    let node = NodeSpec::new(dir.path(), "h")
        .listen(&format!("localhost:{p1}"))
        .peer("other", &format!("localhost:{p2}"))
        .key_dir(&key)
        .start();
    let nodes = client(&node.sock, &["nodes", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(v[1]["name"], "other", "{v:?}");
    assert_eq!(v[1]["addr"], format!("127.0.0.1:{p2}"), "{v:?}");
    let bad = Command::new(mosvm_bin())
        .args(["node", "--peer", "x=no-such-host.invalid:1", "--socket"])
        .arg(dir.path().join("y.sock"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
}
