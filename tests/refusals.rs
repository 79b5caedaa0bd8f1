//! Moves refused or failing, each with its own one-line reason, and the process running on
//! where it was: a locked process, a destination without the cluster key, two moves asked at
//! once, a peer that never answers, a peer under another node's name, a peer speaking another
//! protocol version.

#[macro_use]
mod common;

use common::cluster::{
    client, free_port, keygen, loopback_cluster, migrate, proc_info, wait_for, wait_registered,
    Node, NodeSpec,
};
use common::Case;
use std::time::Duration;

/// The ticker (prints steadily, appends to ticker.out, dirties memory), homed at `home`.
fn ticker(variant: &str, args: [&str; 3], home: &Node) -> Case {
    Case::image(variant, "ticker").args(args).socket(&home.sock)
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
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &other_key]);
    let home = &nodes[0].sock;
    let (_, got) = ticker("glibc-static", ["40", "3000000", "8"], &nodes[0])
        .ignore_stderr()
        .check_while(|run| {
            let pid = run.pid();
            wait_registered(home, pid);
            // Unknown node: refused at once, one line.
            let m = migrate(home, pid, "nowhere");
            assert!(!m.status.success());
            assert!(String::from_utf8_lossy(&m.stderr).contains("unknown node 'nowhere'"));
            // Locked: refused.
            assert!(client(home, &["lock", &pid.to_string()]).status.success());
            let m = migrate(home, pid, "b");
            assert!(!m.status.success());
            assert!(String::from_utf8_lossy(&m.stderr).contains("locked"));
            assert!(client(home, &["unlock", &pid.to_string()]).status.success());
            // A destination without our key: accepted as a request, fails in TLS, process
            // stays; `--wait` says so.
            let m = client(home, &["migrate", &pid.to_string(), "b", "--wait"]);
            let err = String::from_utf8_lossy(&m.stderr);
            assert!(!m.status.success(), "{err}");
            assert!(
                err.contains("to b failed") && err.contains("still runs on home"),
                "{err}"
            );
        });
    // The failure was `mosvm migrate`'s to report: the program's stderr is its own.
    assert!(
        !got.stderr_text().contains("migration to b failed"),
        "{}",
        got.stderr_text()
    );
    let log = nodes[1].log_text();
    assert!(
        log.contains("refused a peer without the cluster key"),
        "{log}"
    );
}

/// Two `mosvm migrate --wait` for one process, 0.2 s apart: each learns its own request's
/// outcome. The move asked first happens and its command says so; the other is refused and
/// its command says why.
#[test]
fn two_waiting_migrate_commands_each_get_their_own_outcome() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b", "c"], &[&key, &key, &key]);
    let home = nodes[0].sock.clone();
    ticker("glibc-static", ["400", "3000000", "256"], &nodes[0])
        .ignore_stderr()
        .check_while(|run| {
            let pid = run.pid();
            wait_registered(&home, pid);
            wait_for("the working set", Duration::from_secs(30), || {
                proc_info(&home, pid)
                    .is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 200 << 20)
            });
            let (h, p) = (home.clone(), pid.to_string());
            let first = std::thread::spawn(move || client(&h, &["migrate", &p, "b", "--wait"]));
            std::thread::sleep(Duration::from_millis(200));
            let second = client(&home, &["migrate", &pid.to_string(), "c", "--wait"]);
            let first = first.join().unwrap();
            // On a loaded machine the second command may reach the node first: whichever
            // came first moves the process, and the other is refused.
            let (won, lost, to) = if first.status.success() {
                (first, second, "b")
            } else {
                (second, first, "c")
            };
            let (e1, e2) = (
                String::from_utf8_lossy(&won.stderr),
                String::from_utf8_lossy(&lost.stderr),
            );
            assert!(won.status.success(), "neither move succeeded: {e1} / {e2}");
            assert!(!lost.status.success(), "both moves succeeded: {e2}");
            assert!(e2.contains("already moving"), "{e2}");
            let p = proc_info(&home, pid).expect("listed");
            assert_eq!(p["node"], to, "{p}");
            assert_eq!(p["state"], "running", "{p}");
            // And home again, for the rest of its run.
            let back = client(&home, &["migrate", &pid.to_string(), "home", "--wait"]);
            assert!(
                back.status.success(),
                "{}",
                String::from_utf8_lossy(&back.stderr)
            );
        });
}

/// A peer that accepts connections and never answers, and a node listed under another
/// node's name: each move fails within the step limit with a one-line reason, nothing else
/// waits for it, and the process runs on at home and ends as natively.
#[test]
fn a_silent_peer_and_a_peer_under_another_name_are_refused() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let b_addr = format!("127.0.0.1:{}", free_port());
    let b = NodeSpec::new(dir.path(), "b")
        .listen(&b_addr)
        .key_dir(&key)
        .start();
    // Accepts TCP connections and holds them without a byte.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let home = NodeSpec::new(dir.path(), "home")
        .listen(&format!("127.0.0.1:{}", free_port()))
        .key_dir(&key)
        .peer("b", &b_addr)
        .peer("n2", &b_addr)
        .peer("silent", &silent_addr)
        .start();
    let sock = home.sock.clone();
    // Runs until the test creates `stop` in its directory.
    Case::new("sh")
        .args(["-c", "while [ ! -e stop ]; do sleep 0.1; done; echo done"])
        .socket(&sock)
        .timeout(Duration::from_secs(120))
        .check_each(|run, under_mosvm| {
            let stop = run.dir().join("stop");
            if !under_mosvm {
                std::fs::write(stop, "").unwrap();
                return;
            }
            let pid = run.pid();
            wait_registered(&sock, pid);
            let t = std::time::Instant::now();
            let m = client(&sock, &["migrate", &pid.to_string(), "silent", "--wait"]);
            let err = String::from_utf8_lossy(&m.stderr);
            assert!(!m.status.success(), "{err}");
            assert!(
                err.contains("no answer within") && err.contains("still runs on home"),
                "{err}"
            );
            assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
            let m = client(&sock, &["migrate", &pid.to_string(), "n2", "--wait"]);
            let err = String::from_utf8_lossy(&m.stderr);
            assert!(!m.status.success(), "{err}");
            assert!(err.contains("is 'b', not 'n2'"), "{err}");
            let p = proc_info(&sock, pid).expect("still listed");
            assert_eq!(p["node"], "home", "{p}");
            assert!(home.log_text().contains("under another node's name"));
            // A node given by its address is the node known there, by name.
            let m = client(&sock, &["migrate", &pid.to_string(), &b_addr, "--wait"]);
            assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
            assert_eq!(proc_info(&sock, pid).expect("listed")["node"], "b");
            let m = client(&sock, &["migrate", &pid.to_string(), &b_addr, "--wait"]);
            let err = String::from_utf8_lossy(&m.stderr);
            assert!(
                !m.status.success() && err.contains("already runs on b"),
                "{err}"
            );
            std::fs::write(stop, "").unwrap();
        });
    drop(b);
}

#[test]
fn a_peer_speaking_another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let port = free_port();
    let node = NodeSpec::new(dir.path(), "n")
        .listen(&format!("127.0.0.1:{port}"))
        .key_dir(&key)
        .start();
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
        node.log_text().contains("refused a peer")
    });
}
