//! The jailed guest host: the process that runs a guest for another node holds least
//! privilege (src/jail.rs), and the guest still behaves as it does natively. What the jail
//! refuses (files, sockets, programs) is checked on the jail itself in src/jail.rs's tests;
//! here, that a guest host running a real guest is in it.

#[macro_use]
mod common;

use common::cluster::{guest_hosts_of, keygen, loopback_cluster, tour, wait_registered};
use common::Case;

/// A field of /proc/PID/status, as the kernel prints it.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Whether this process may make a mount namespace of its own (root with CAP_SYS_ADMIN):
/// then so may the node, and its guest hosts get an empty root and a user of their own.
fn may_unshare_mounts() -> bool {
    // SAFETY: fork, then unshare and _exit in the child only.
    unsafe {
        if libc::geteuid() != 0 {
            return false;
        }
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit((libc::unshare(libc::CLONE_NEWNS) != 0) as i32);
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0
    }
}

#[test]
fn a_guest_host_is_jailed_and_its_guest_runs_as_natively() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &key]);
    // Forks (each `sleep` starts on b, in a fork of the guest host), files through the deputy,
    // and programs run after the moves.
    let script = "for i in $(seq 1 40); do echo line $i; sleep 0.1; done; \
                  echo written > out.txt; cat out.txt /etc/hostname; ls -d /etc /proc/self";
    Case::new("/bin/sh")
        .args(["-c", script])
        .socket(&nodes[0].sock)
        .check_while(|run| {
            let pid = run.pid();
            wait_registered(&nodes[0].sock, pid);
            tour(&nodes[0], pid, &["b"], &mut |_| {});
            let hosts = guest_hosts_of(nodes[1].child.id());
            assert_eq!(hosts.len(), 1, "one guest host on b");
            let gh = hosts[0];
            // The system-call filters: three of them (the allow-list, clone3's and the
            // opens'), with no new privileges, and no capabilities.
            assert_eq!(status_field(gh, "Seccomp"), "2", "guest host {gh}");
            assert_eq!(status_field(gh, "Seccomp_filters"), "3");
            assert_eq!(status_field(gh, "NoNewPrivs"), "1");
            assert_eq!(status_field(gh, "CapEff"), "0000000000000000");
            assert_eq!(status_field(gh, "CapPrm"), "0000000000000000");
            assert_eq!(status_field(gh, "CapBnd"), "0000000000000000");
            if may_unshare_mounts() {
                // A user and group of its own, no others.
                let id = 0x6d00_0000 + gh;
                let ids = format!("{id}\t{id}\t{id}\t{id}");
                assert_eq!(status_field(gh, "Uid"), ids);
                assert_eq!(status_field(gh, "Gid"), ids);
                assert_eq!(status_field(gh, "Groups"), "");
                // An empty root in a mount namespace of its own.
                let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
                assert_ne!(ns(&gh.to_string()), ns("self"));
                let root = std::fs::read_dir(format!("/proc/{gh}/root")).unwrap();
                assert_eq!(root.count(), 0, "guest host {gh}'s root is not empty");
            }
            // It holds nothing of the host's but what it needs: no file the node had open
            // (not even the node's log: its stderr is a pipe), only sockets, pipes, KVM's
            // objects, /dev/kvm, /dev/null and guest memory.
            for e in std::fs::read_dir(format!("/proc/{gh}/fd"))
                .unwrap()
                .flatten()
            {
                let to = std::fs::read_link(e.path()).unwrap_or_default();
                let to = to.to_string_lossy();
                let held = [
                    "socket:",
                    "pipe:",
                    "anon_inode:",
                    "/dev/kvm",
                    "/dev/null",
                    "/memfd:",
                ];
                assert!(
                    held.iter().any(|h| to.starts_with(h)),
                    "guest host {gh} holds descriptor {:?} -> {to}",
                    e.file_name()
                );
            }
            // The guest goes on behind the jail.
            tour(&nodes[0], pid, &["home"], &mut |_| {});
        });
}
