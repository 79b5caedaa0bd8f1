//! Nodes as separate hosts: each node service runs in its own network namespace (ip netns +
//! veth), with its own address; a process migrates from one to the other across that link.
//! Needs root and iproute2; set MOSVM_SKIP_NETNS=1 to skip explicitly.

#[macro_use]
mod common;

use common::{image, mosvm_bin};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Net {
    names: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair: (net, [addr of first, addr of second]).
fn two_hosts() -> Option<(Net, [String; 2])> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root
        && Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("MOSVM_SKIP_NETNS").is_some_and(|v| v == "1"),
            "ip netns is not usable here (needs root and iproute2); set MOSVM_SKIP_NETNS=1 to skip"
        );
        eprintln!("note: MOSVM_SKIP_NETNS=1: skipping the network-namespace test");
        return None;
    }
    let id = std::process::id();
    let names = vec![format!("mosvm{id}a"), format!("mosvm{id}b")];
    let net = Net {
        names: names.clone(),
    };
    let subnet = format!("10.213.{}", id % 250);
    for n in &names {
        ip(&["netns", "add", n]);
    }
    let (va, vb) = (format!("mv{id}a"), format!("mv{id}b"));
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &va, "netns", &names[0]]);
    ip(&["link", "set", &vb, "netns", &names[1]]);
    let addrs = [format!("{subnet}.1"), format!("{subnet}.2")];
    for (i, (n, v)) in [(&names[0], &va), (&names[1], &vb)].into_iter().enumerate() {
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/24", addrs[i]),
            "dev",
            v,
        ]);
        ip(&["-n", n, "link", "set", v, "up"]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
    }
    Some((net, addrs))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn migration_between_network_namespaces() {
    require_kvm!();
    let Some((net, addrs)) = two_hosts() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    assert!(Command::new(mosvm_bin())
        .args(["keygen", "--dir"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let mut nodes = Vec::new();
    for (i, name) in ["home", "far"].iter().enumerate() {
        let other = ["far", "home"][i];
        let sock = dir.path().join(format!("{name}.sock"));
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.names[i]])
            .arg(mosvm_bin())
            .args([
                "node",
                "--name",
                name,
                "--listen",
                &format!("{}:7420", addrs[i]),
            ])
            .args(["--peer", &format!("{other}={}:7420", addrs[1 - i])])
            .arg("--key-dir")
            .arg(&key)
            .arg("--socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        nodes.push(Proc(child));
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "node {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let home = dir.path().join("home.sock");
    let prog = image("glibc-static", "ticker");
    let args = ["50", "3000000", "16"];
    let nd = dir.path().join("native");
    std::fs::create_dir_all(&nd).unwrap();
    let want = Command::new(&prog)
        .args(args)
        .current_dir(&nd)
        .output()
        .unwrap();
    let wd = dir.path().join("mosvm");
    std::fs::create_dir_all(&wd).unwrap();
    let run = Command::new(mosvm_bin())
        .args(["run", "--socket"])
        .arg(&home)
        .arg(&prog)
        .args(args)
        .current_dir(&wd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid_n = run.id();
    let pid = pid_n.to_string();
    let ps = |sock: &Path| -> Vec<serde_json::Value> {
        let o = Command::new(mosvm_bin())
            .args(["ps", "--json", "--socket"])
            .arg(sock)
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    };
    let t = Instant::now();
    while !ps(&home).iter().any(|p| p["pid"] == pid_n) {
        assert!(t.elapsed() < Duration::from_secs(10), "registration");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = Command::new(mosvm_bin())
        .args(["migrate", &pid, "far", "--socket"])
        .arg(&home)
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let out = run.wait_with_output().unwrap();
    let log = std::fs::read_to_string(dir.path().join("far.log")).unwrap_or_default();
    assert!(
        log.contains("receiving a guest"),
        "the guest never reached the other host: {log}"
    );
    assert_eq!(
        out.status.code(),
        want.status.code(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == want.stdout,
        "stdout differs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(wd.join("ticker.out")).unwrap(),
        std::fs::read(nd.join("ticker.out")).unwrap()
    );
    drop(nodes);
}
