//! Process trees across the cluster: a process away from home forks there. Each child runs on
//! its parent's node from its first instruction (in a host fork of the parent's guest host),
//! with its own deputy forked at home, moves on its own, and ends as natively; a child that
//! execs goes home for it without its memory; children of a shell at home move to different
//! nodes. What the tree prints, its exit status and the files it writes must equal a native
//! run.

#[macro_use]
mod common;

use common::cluster::Node;
use common::cluster::{keygen, loopback_cluster, proc_info, ps, tour, wait_for, wait_registered};
use common::{image, Case, Running};
use std::path::Path;
use std::time::Duration;

/// The processes node `sock` lists whose program is `program` and whose pid is not `but`.
fn others(sock: &Path, program: &str, but: u32) -> Vec<serde_json::Value> {
    ps(sock)
        .into_iter()
        .filter(|p| p["program"].as_str().is_some_and(|s| s.ends_with(program)))
        .filter(|p| p["pid"].as_u64() != Some(but as u64))
        .collect()
}

/// Under mosvm, moves the run's process from `home` to `node`; then, in either run, tells the
/// program it has moved (the file `moved`).
fn moved_to(home: &Node, node: &str, run: &Running, under_mosvm: bool) {
    if under_mosvm {
        wait_registered(&home.sock, run.pid());
        tour(home, run.pid(), &[node], &mut |_| {});
    }
    std::fs::write(run.dir().join("moved"), b"").unwrap();
}

#[test]
fn children_forked_away_from_home_run_there_and_move_on_their_own() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);
    let (home, b) = (&nodes[0], &nodes[2]);
    // forkaway forks three children once it runs on b: they start on b (home lists them there
    // and b hosts them), then one moves to a and one home while they run; each ends in its
    // own way (exit status, its own SIGTERM, the parent's SIGKILL), and the parent's waits,
    // a vfork + exec and a grandchild go as natively.
    for variant in ["glibc-static", "musl-static", "dynamic"] {
        Case::image(variant, "forkaway")
            .socket(&home.sock)
            .timeout(Duration::from_secs(180))
            .check_each(|run, under_mosvm| {
                let pid = run.pid();
                moved_to(home, "b", run, under_mosvm);
                wait_for("three children to start", Duration::from_secs(60), || {
                    (0..3).all(|i| run.dir().join(format!("child{i}.ready")).exists())
                });
                if under_mosvm {
                    let kids = others(&home.sock, "forkaway", pid);
                    assert_eq!(kids.len(), 3, "home lists the children: {kids:?}");
                    for k in &kids {
                        assert_eq!(k["node"], "b", "a child started away from b: {k}");
                        assert_eq!(k["migrations"], 0, "{k}");
                    }
                    let hosted = others(&b.sock, "forkaway", 0);
                    assert_eq!(hosted.len(), 4, "b hosts parent and children: {hosted:?}");
                    let kid = |i: usize| kids[i]["pid"].as_u64().unwrap() as u32;
                    tour(home, kid(0), &["a"], &mut |_| {});
                    tour(home, kid(1), &["home"], &mut |_| {});
                    let p = proc_info(&home.sock, pid).unwrap();
                    assert_eq!(p["node"], "b", "the parent stays where it was: {p}");
                }
                std::fs::write(run.dir().join("checked"), b"").unwrap();
            });
        if let Some(left) = others(&home.sock, "forkaway", 0).first() {
            panic!("a process of the tree outlived it: {left}");
        }
    }
}

#[test]
fn a_shell_moved_away_runs_its_commands_from_there_as_natively() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &key]);
    let home = &nodes[0];
    // Once the shell runs on b, its commands fork there; each exec checks the program at home
    // (a missing or non-executable one fails there with Linux's errno, seen as 127 and 126,
    // the child staying on b) and then completes at home without the shell's memory; at the
    // end the shell execs itself away.
    let script = "while [ ! -e moved ]; do :; done; \
        for i in 1 2 3; do echo \"line $i\" | tr a-z A-Z; done; \
        nosuchcommand 2>/dev/null; echo \"missing: $?\"; \
        ./data.txt 2>/dev/null; echo \"not executable: $?\"; \
        echo \"substituted: $(seq 1 100 | sort -rn | head -n 1)\"; \
        (echo in a subshell; exit 3) & wait $!; echo \"background: $?\"; \
        sh -c 'echo nested > nested.txt'; \
        exec /bin/echo the shell exec\\'d itself";
    Case::new("/bin/sh")
        .args(["-c", script])
        .file("data.txt", b"not a program\n")
        .socket(&home.sock)
        .timeout(Duration::from_secs(120))
        .check_each(|run, under_mosvm| {
            moved_to(home, "b", run, under_mosvm);
        });
}

#[test]
fn children_of_a_shell_move_to_different_nodes_and_the_pipeline_matches_native() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);
    let ticker = image("glibc-static", "ticker");
    let script = format!(
        // Each ticker runs for seconds: long enough to be seen under its own name (a child's
        // registration reports its program about once a second) and then moved.
        "{t} 200 3000000 8 | tr 0-9 a-j > first.txt; {t} 150 3000000 8 | sha256sum",
        t = ticker.display()
    );
    let find = |program: &str, skip: &[u32]| -> Option<u32> {
        common::cluster::ps(&nodes[0].sock)
            .into_iter()
            .filter(|p| p["program"].as_str().is_some_and(|s| s.ends_with(program)))
            .filter(|p| p["node"] == "home")
            .filter_map(|p| p["pid"].as_u64().map(|x| x as u32))
            .find(|pid| !skip.contains(pid))
    };
    Case::new("/bin/sh")
        .args(["-c", &script])
        .socket(&nodes[0].sock)
        .timeout(Duration::from_secs(180))
        .check_while(|run| {
            let shell = run.pid();
            wait_registered(&nodes[0].sock, shell);
            // The first ticker (a child of the shell) goes to a.
            let mut first = 0;
            wait_for(
                "the first ticker to register",
                Duration::from_secs(20),
                || {
                    first = find("ticker", &[]).unwrap_or(0);
                    first != 0
                },
            );
            std::thread::sleep(Duration::from_millis(300));
            tour(&nodes[0], first, &["a"], &mut |_| {});
            // The second pipeline's ticker goes to b once it has started.
            let mut second = 0;
            wait_for(
                "the second ticker to register",
                Duration::from_secs(120),
                || {
                    second = find("ticker", &[first])
                        .filter(|p| {
                            common::cluster::proc_info(&nodes[0].sock, *p)
                                .is_some_and(|i| i["node"] == "home")
                        })
                        .unwrap_or(0);
                    second != 0
                },
            );
            std::thread::sleep(Duration::from_millis(300));
            tour(&nodes[0], second, &["b"], &mut |_| {});
            assert!(
                common::cluster::proc_info(&nodes[0].sock, shell).is_some(),
                "the shell is listed beside its children"
            );
        });
}

#[test]
fn a_threaded_process_away_takes_signals_and_forks_there() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &key]);
    let home = &nodes[0];
    // threadsig has a second thread when it moves to b; then signals sent to its home pid
    // reach its handler there (home's placeholder of the moved thread takes them, which used
    // to crash the home process), and it forks there.
    for variant in ["glibc-static", "musl-static"] {
        Case::image(variant, "threadsig")
            .socket(&home.sock)
            .timeout(Duration::from_secs(120))
            .check_each(|run, under_mosvm| {
                let pid = run.pid();
                let ready = run.dir().join("ready");
                wait_for("the handler and thread", Duration::from_secs(20), || {
                    ready.exists()
                });
                moved_to(home, "b", run, under_mosvm);
                for n in 1..=3 {
                    // SAFETY: signalling a process of the test's.
                    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
                    let ack = run.dir().join(format!("ack{n}"));
                    wait_for("the handler to run", Duration::from_secs(20), || {
                        ack.exists()
                    });
                }
            });
    }
}

/// An exec away from home that comes while a move home is under way (the user's `migrate`,
/// or the exec's own request first): the process must not be lost between the two (the
/// refusal of the second used to abort the first, and the process ended with 112). The race
/// is swept: the move is ordered at several offsets around the exec.
#[test]
fn an_exec_away_during_a_move_home_completes_at_home() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b"], &[&key, &key]);
    let home = &nodes[0];
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    for offset in [-20i64, -10, 0, 10, 20] {
        let at = now_ms() + 3000;
        Case::image("glibc-static", "execat")
            .args([at.to_string()])
            .socket(&home.sock)
            .expect_status(Some(33))
            .timeout(Duration::from_secs(60))
            .check_while(|run| {
                wait_registered(&home.sock, run.pid());
                tour(home, run.pid(), &["b"], &mut |_| {});
                let wait = at + offset - now_ms();
                if wait > 0 {
                    std::thread::sleep(Duration::from_millis(wait as u64));
                }
                // (Refused when the exec's own move home came first: that is fine.)
                let _ = common::cluster::migrate(&home.sock, run.pid(), "home");
            });
    }
}
