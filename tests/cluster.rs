//! The cluster on one machine: node services on loopback, each with its own control socket,
//! port and state directory, sharing a cluster key. A running process migrates from its home
//! node to another; what it prints, its exit status and the files it writes must equal a
//! native run. Fault cases: the host of a guest dies, the deputy dies, the destination dies
//! mid-move. Moves refused or failing with a reason are in refusals.rs.

#[macro_use]
mod common;

use common::cluster::{
    client, ends_lost, free_port, guest_hosts_of, home_and_b, keygen, kill_all, loopback_cluster,
    migrate, proc_info, spares_of, tour, wait_for, wait_registered, Node, NodeSpec,
};
use common::{image, Case, Running};
use std::io::Write;
use std::time::{Duration, Instant};

/// The ticker (prints steadily, appends to ticker.out, dirties memory), homed at `home`.
fn ticker(variant: &str, args: [&str; 3], home: &Node) -> Case {
    Case::image(variant, "ticker").args(args).socket(&home.sock)
}

#[test]
fn a_running_process_migrates_to_another_node_and_finishes_there() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    for (variant, mib) in [
        ("glibc-static", "16"),
        ("dynamic", "48"),
        ("musl-static", "4"),
    ] {
        let prog = image(variant, "ticker");
        let mut pid = 0;
        ticker(variant, ["60", "3000000", mib], &nodes[0]).check_while(|run| {
            pid = run.pid();
            wait_registered(&nodes[0].sock, pid);
            std::thread::sleep(Duration::from_millis(300));
            tour(&nodes[0], pid, &["b"], &mut |_| {});
            // Node b lists the guest it hosts for home.
            let hosted = proc_info(&nodes[1].sock, pid).expect("b's ps lists the guest it hosts");
            assert_eq!(hosted["state"], "guest of home");
            assert_eq!(hosted["node"], "b");
            assert_eq!(hosted["program"], prog.display().to_string());
        });
        wait_for("b to forget the guest", Duration::from_secs(5), || {
            proc_info(&nodes[1].sock, pid).is_none()
        });
    }
}

#[test]
fn an_arriving_process_lands_in_the_spare_guest_host_and_a_new_spare_follows() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let b = nodes[1].child.id();
    // b keeps one spare guest host (touching its 32 MiB pool): the guest moved there goes to
    // it, its memory starting with the pool's pages, and its output is native's; b then
    // starts another spare.
    let one_spare = || {
        let s = spares_of(b);
        (s.len() == 1).then(|| s[0])
    };
    let mut spare = 0;
    wait_for("b's spare guest host", Duration::from_secs(20), || {
        one_spare().map(|s| spare = s).is_some()
    });
    ticker("glibc-static", ["40", "3000000", "16"], &nodes[0]).check_while(|run| {
        wait_registered(&nodes[0].sock, run.pid());
        std::thread::sleep(Duration::from_millis(300));
        tour(&nodes[0], run.pid(), &["b"], &mut |_| {});
        assert_eq!(guest_hosts_of(b), vec![spare], "the spare took the guest");
        wait_for("a new spare on b", Duration::from_secs(20), || {
            one_spare().is_some_and(|s| s != spare)
        });
    });
}

/// Start a long ticker at home and move it to b; returns the running `mosvm run`.
fn remote_ticker(nodes: &[Node]) -> Running {
    let run = ticker("glibc-static", ["100000", "3000000", "4"], &nodes[0]).spawn_mosvm();
    wait_registered(&nodes[0].sock, run.pid());
    // `migrate --wait` returns once the process runs there.
    let pid = run.pid().to_string();
    let m = client(&nodes[0].sock, &["migrate", &pid, "b", "--wait"]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let p = proc_info(&nodes[0].sock, run.pid()).expect("listed at home");
    assert_eq!(
        (p["node"].as_str(), p["migrations"].as_u64()),
        (Some("b"), Some(1))
    );
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
    let (_dir, nodes) = home_and_b();
    let run = remote_ticker(&nodes);
    // While it computes on b, `ps` at home counts the CPU time it uses there.
    let cpu = || {
        proc_info(&nodes[0].sock, run.pid()).expect("listed")["cpu_s"]
            .as_f64()
            .unwrap()
    };
    let before = cpu();
    std::thread::sleep(Duration::from_millis(2500));
    let used = cpu() - before;
    assert!(
        used > 0.15,
        "ps at home shows {used:.2} s of CPU over 2.5 s of computing on b"
    );
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(run.pid() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let got = run.finish();
    assert_eq!(got.shell_status(), 143, "{}", got.stderr_text());
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
    let (_dir, nodes) = home_and_b();
    let mut run = remote_ticker(&nodes);
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    wait_for(
        "the remote guest to be destroyed",
        Duration::from_secs(5),
        || guest_hosts_of(nodes[1].child.id()).is_empty(),
    );
}

#[test]
fn losing_the_host_ends_the_home_process_cleanly() {
    require_kvm!();
    let (_dir, mut nodes) = home_and_b();
    let run = remote_ticker(&nodes);
    // Kill node b and the guest it hosts, as a machine failure would.
    let b = nodes.pop().unwrap();
    let hosted = guest_hosts_of(b.child.id());
    b.crash();
    kill_all(&hosted);
    let got = ends_lost(run, Duration::from_secs(5));
    assert!(
        got.stderr_text()
            .contains("lost the node running the process"),
        "{}",
        got.stderr_text()
    );
}

#[test]
fn a_process_travels_home_a_b_home_and_matches_native() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);
    let home = &nodes[0];

    // A program reading its input from home, as it arrives, on every node it visits.
    let chunks: Vec<String> = (0..4)
        .map(|c| (0..50).map(|i| format!("chunk {c} line {i}\n")).collect())
        .collect();
    Case::image("glibc-static", "stdin_filter")
        .stdin(chunks.concat())
        .stdin_by_hand()
        .socket(&home.sock)
        .check_while(|run| {
            let pid = run.pid();
            let mut input = run.take_stdin();
            wait_registered(&home.sock, pid);
            input.write_all(chunks[0].as_bytes()).unwrap();
            // At every hop it is blocked reading its terminal (at home, or at home through
            // the link): the read is interrupted, the guest moves, and reissues it from the
            // next node.
            std::thread::sleep(Duration::from_millis(300));
            tour(home, pid, &["a", "b", "home"], &mut |hop| {
                input.write_all(chunks[hop + 1].as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
            });
        });

    // A program computing, dirtying memory, printing steadily and writing a file (about 20 s
    // of work alone; the other tests of this file share the machine's two cores with it).
    ticker("dynamic", ["400", "3000000", "32"], home)
        .timeout(Duration::from_secs(180))
        .check_while(|run| {
            wait_registered(&home.sock, run.pid());
            tour(home, run.pid(), &["a", "b", "home"], &mut |_| {});
        });
}

#[test]
fn a_threaded_process_travels_home_a_b_home_and_matches_native() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "a", "b"], &[&key, &key, &key]);
    let home = &nodes[0];
    // Four workers under a mutex and condition variable, a napping thread, one blocked on a
    // pipe and one on standard input (still blocked there, at home, when the process exits):
    // every thread moves, the blocked home calls are interrupted and issued again from the
    // next node, and calls of different threads wait at home side by side.
    for (variant, stops) in [
        ("dynamic", &["a", "b", "home"][..]),
        ("musl-static", &["b"][..]),
    ] {
        Case::image(variant, "mtticker")
            .args(["400", "1500000", "16"])
            .stdin("")
            .stdin_by_hand()
            .socket(&home.sock)
            .timeout(Duration::from_secs(240))
            .check_while(|run| {
                let pid = run.pid();
                // Standard input stays open (never closed by this test): the reader of it is
                // still blocked when the process exits.
                std::mem::forget(run.take_stdin());
                wait_registered(&home.sock, pid);
                std::thread::sleep(Duration::from_millis(500));
                tour(home, pid, stops, &mut |hop| {
                    if stops[hop] != "home" {
                        // Away, home holds the thread ids of the threads that left with
                        // their host threads (no other process gets them meanwhile).
                        let held = threads_named(pid, "mosvm-tid");
                        assert!(held >= 4, "{variant}: {held} thread ids held at home");
                    }
                    std::thread::sleep(Duration::from_millis(300));
                });
            });
    }
}

#[test]
fn threaded_processes_that_must_stay_home_keep_running_there() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    // The first thread has exited while a worker runs; a thread has waited on a
    // priority-inheritance mutex (the host kernel knows its owner by tid). Each refusal names
    // its reason, and the process finishes at home as natively.
    for (mode, why) in [
        ("leader-exit", "first thread has exited"),
        ("pi", "priority-inheritance futexes"),
    ] {
        Case::image("glibc-static", "stayhome")
            .args([mode, "150"])
            .socket(home)
            .ignore_stderr()
            .check_while(|run| {
                let pid = run.pid();
                wait_registered(home, pid);
                std::thread::sleep(Duration::from_millis(400));
                for _ in 0..2 {
                    let m = client(home, &["migrate", &pid.to_string(), "b", "--wait"]);
                    let err = String::from_utf8_lossy(&m.stderr);
                    assert!(!m.status.success(), "{mode}: {err}");
                    assert!(
                        err.contains(why) && err.contains("still runs on home"),
                        "{mode}: {err}"
                    );
                }
            });
    }
}

#[test]
fn a_thread_ends_the_process_away_while_the_first_waits_in_a_home_call() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    // On b the first thread's read waits at home for input that never comes; the worker's
    // exit(42) must end the process there at once, and `mosvm run` at home with it.
    Case::image("glibc-static", "exitaway")
        .args(["120"])
        .expect_status(Some(42))
        .stdin("")
        .stdin_by_hand()
        .socket(home)
        .timeout(Duration::from_secs(120))
        .check_while(|run| {
            let pid = run.pid();
            // Standard input stays open (never closed by this test).
            std::mem::forget(run.take_stdin());
            wait_registered(home, pid);
            tour(&nodes[0], pid, &["b"], &mut |_| {});
        });
}

/// Move process `pid` (homed at the node behind `home`) to b and back, every 0.2 s, until it
/// ends; returns how many moves it made.
fn back_and_forth(home: &std::path::Path, pid: u32) -> u64 {
    wait_registered(home, pid);
    let (mut to_b, mut moved) = (true, 0);
    while let Some(p) = proc_info(home, pid) {
        moved = moved.max(p["migrations"].as_u64().unwrap_or(0));
        let _ = migrate(home, pid, if to_b { "b" } else { "home" });
        to_b = !to_b;
        std::thread::sleep(Duration::from_millis(200));
    }
    moved
}

#[test]
fn a_sleep_moved_again_and_again_still_ends() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    // Each move stops a relative sleep; it must go on toward its original end (through
    // restart_syscall), not start over: moved back and forth without pause, a 3 s sleep used to
    // never end. The bound below only catches that (it is 20 times the sleep).
    Case::new("/bin/sleep")
        .args(["3"])
        .socket(home)
        .timeout(Duration::from_secs(60))
        .check_while(|run| {
            let moved = back_and_forth(home, run.pid());
            assert!(moved >= 2, "the sleep was moved {moved} times only");
        });
}

#[test]
fn timed_waits_moved_again_and_again_still_end_when_their_timeouts_do() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    // poll, ppoll, select, pselect6, epoll_wait, epoll_pwait2, semtimedop, FUTEX_WAIT and
    // sigtimedwait with 1 s timeouts, moved back and forth all along: each move stops the
    // call, which must go on toward its original end, not start over (it used to: a call
    // moved every 0.2 s never ended; the bound catches that). Output, including what select
    // wrote back, as natively; one thread, and the calls in a second thread.
    for (variant, args) in [
        ("glibc-static", &["1000"][..]),
        ("musl-static", &["1000", "thread"][..]),
    ] {
        let started = Instant::now();
        Case::image(variant, "timedwaits")
            .args(args)
            .socket(home)
            .timeout(Duration::from_secs(90))
            .check_while(|run| {
                let moved = back_and_forth(home, run.pid());
                assert!(moved >= 4, "{variant}: moved {moved} times only");
            });
        eprintln!("{variant} {args:?}: {:?}", started.elapsed());
    }
}

/// The state letter of process `pid` (`R`, `S`, `T`...), from /proc/PID/stat.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The guest hosts a node runs with a guest in them.
fn guest_hosts(node: &Node) -> Vec<u32> {
    guest_hosts_of(node.child.id())
}

#[test]
fn job_control_stops_a_process_away_as_at_home() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    // stopcont works until told it has moved, stops itself with raise(SIGTSTP), is continued,
    // then is stopped with SIGSTOP and continued from outside; a SIGCONT handler counts the
    // continues. Away from home, each stop must stop its home process (where a shell sees
    // it) and the guest host running it, and each continue must reach the guest exactly once.
    let stopped = |pid: u32| {
        wait_for("the process to stop", Duration::from_secs(20), || {
            proc_state(pid) == Some('T')
        })
    };
    let host_is = |want_stopped: bool| {
        wait_for("the guest host to follow", Duration::from_secs(10), || {
            let hs = guest_hosts(&nodes[1]);
            !hs.is_empty()
                && hs
                    .iter()
                    .all(|&h| (proc_state(h) == Some('T')) == want_stopped)
        })
    };
    let signal = |pid: u32, sig: i32| {
        // SAFETY: signalling a process of the test's.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    };
    // At home first (the stop signal at its default action stops `mosvm run` itself; it
    // used to spin in its own handler), then away.
    for away in [false, true] {
        Case::image("glibc-static", "stopcont")
            .own_process_group()
            .socket(home)
            .timeout(Duration::from_secs(90))
            .check_each(|run, under_mosvm| {
                let pid = run.pid();
                let away = away && under_mosvm;
                if away {
                    wait_registered(home, pid);
                    let out = migrate(home, pid, "b");
                    assert!(out.status.success(), "migrate: {out:?}");
                    wait_for("the move to b", Duration::from_secs(20), || {
                        proc_info(home, pid).is_some_and(|p| p["node"] == "b")
                    });
                    assert!(!guest_hosts(&nodes[1]).is_empty(), "no guest host on b");
                }
                std::fs::write(run.dir().join("moved"), b"").unwrap();
                stopped(pid);
                if away {
                    host_is(true);
                }
                signal(pid, libc::SIGCONT);
                if away {
                    host_is(false);
                }
                std::thread::sleep(Duration::from_millis(300));
                signal(pid, libc::SIGSTOP);
                stopped(pid);
                if away {
                    host_is(true);
                    let h = guest_hosts(&nodes[1])[0];
                    let ticks = |p: u32| {
                        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
                        let f: Vec<String> = s
                            .rsplit_once(')')
                            .unwrap()
                            .1
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect();
                        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
                    };
                    let before = ticks(h);
                    std::thread::sleep(Duration::from_millis(500));
                    assert_eq!(ticks(h), before, "the stopped guest host still ran");
                    // b lists the guest as stopped too.
                    let hosted = proc_info(&nodes[1].sock, pid).expect("b lists the guest");
                    assert_eq!(hosted["state"], "guest of home, stopped", "{hosted}");
                }
                if under_mosvm {
                    // A stopped process cannot move (its home side cannot take part): the
                    // move is refused at once, and the process stays where it is.
                    let out = migrate(home, pid, if away { "home" } else { "b" });
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(!out.status.success() && err.contains("stopped"), "{err}");
                }
                signal(pid, libc::SIGCONT);
                std::fs::write(run.dir().join("done"), b"").unwrap();
            });
    }
}

/// How many threads of process `pid` are named `comm`.
fn threads_named(pid: u32, comm: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == comm)
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn threads_started_away_from_home_run_there_and_travel_home() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    // latethreads starts four threads once it has moved to b: they start there (they used to
    // bring the process home first), each with a thread id its home holds for it (a
    // placeholder thread of the home `mosvm run`, four of them while they live), distinct and
    // reachable by tgkill; then the process moves home with them and finishes as natively.
    for variant in ["glibc-static", "musl-static"] {
        Case::image(variant, "latethreads")
            .socket(home)
            .timeout(Duration::from_secs(120))
            .check_each(|run, under_mosvm| {
                let pid = run.pid();
                if under_mosvm {
                    wait_registered(home, pid);
                    let out = migrate(home, pid, "b");
                    assert!(out.status.success(), "migrate: {out:?}");
                    wait_for("the move to b", Duration::from_secs(20), || {
                        proc_info(home, pid).is_some_and(|p| p["node"] == "b")
                    });
                }
                std::fs::write(run.dir().join("moved"), b"").unwrap();
                if under_mosvm {
                    wait_for(
                        "four thread ids held at home",
                        Duration::from_secs(20),
                        || threads_named(pid, "mosvm-tid") == 4,
                    );
                    let p = proc_info(home, pid).unwrap();
                    assert_eq!(p["node"], "b", "the threads brought it home: {p}");
                    let out = migrate(home, pid, "home");
                    assert!(out.status.success(), "migrate home: {out:?}");
                    wait_for("the move home", Duration::from_secs(20), || {
                        proc_info(home, pid).is_some_and(|p| p["node"] == "home")
                    });
                }
                std::fs::write(run.dir().join("done"), b"").unwrap();
            });
    }
}

#[test]
fn the_destination_dying_mid_migration_leaves_the_process_at_home() {
    require_kvm!();
    let (_dir, mut nodes) = home_and_b();
    let home = nodes[0].sock.clone();
    let mut pid = 0;
    // A big working set keeps the pre-copy busy long enough to kill the destination in it.
    let (_, got) = ticker("glibc-static", ["60", "3000000", "768"], &nodes[0])
        .ignore_stderr()
        .check_while(|run| {
            pid = run.pid();
            wait_registered(&home, pid);
            wait_for("the working set", Duration::from_secs(30), || {
                proc_info(&home, pid)
                    .is_some_and(|p| p["mem_bytes"].as_u64().unwrap_or(0) > 700 << 20)
            });
            // (Pre-copy only: once a post-copy has begun, losing the destination loses the
            // process, tests/postcopy.rs.)
            let pid_s = pid.to_string();
            let m = client(&home, &["migrate", &pid_s, "b", "--precopy"]);
            assert!(m.status.success());
            wait_for("the guest host on b", Duration::from_secs(10), || {
                !guest_hosts_of(nodes[1].child.id()).is_empty()
            });
            let b = nodes.pop().unwrap();
            let hosted = guest_hosts_of(b.child.id());
            b.crash();
            kill_all(&hosted);
        });
    assert!(
        !got.stderr_text().contains("migration to b failed"),
        "{}",
        got.stderr_text()
    );
    assert_eq!(proc_info(&home, pid), None, "the process ended at home");
}

/// `mosvm nodes` shows what the peers gossip of themselves: a live peer shows its CPU
/// capacity and a fresh age; a peer that is down stays "never heard from".
#[test]
fn nodes_shows_what_live_peers_say_of_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let home = NodeSpec::new(dir.path(), "home")
        .listen(&format!("127.0.0.1:{}", free_port()))
        .key_dir(&key);
    let b_addr = format!("127.0.0.1:{}", free_port());
    let down = format!("127.0.0.1:{}", free_port());
    let b = NodeSpec::new(dir.path(), "b")
        .listen(&b_addr)
        .key_dir(&key)
        .start();
    let home = home.peer("b", &b_addr).peer("gone", &down).start();
    // What b says of itself arrives by gossip within a few steps.
    let nodes = || -> Vec<serde_json::Value> {
        let out = client(&home.sock, &["nodes", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    wait_for("b's gossip", Duration::from_secs(20), || {
        nodes()
            .iter()
            .any(|x| x["name"] == "b" && x["age_s"].is_number())
    });
    let v = nodes();
    let by = |n: &str| v.iter().find(|x| x["name"] == n).cloned().unwrap();
    let (pb, pg) = (by("b"), by("gone"));
    assert!(pb["cpus"].as_f64().unwrap() >= 0.5, "{pb}");
    assert!(pb["free_mem"].as_u64().unwrap() > 0, "{pb}");
    assert!(pb["age_s"].as_f64().unwrap() < 5.0, "{pb}");
    assert!(pg["age_s"].is_null(), "{pg}");
    assert_eq!(pg["cpus"].as_f64(), Some(0.0), "{pg}");
    drop(b);
}

#[test]
fn a_writable_shared_mapping_keeps_the_process_home_until_it_goes() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0];
    Case::image("glibc-static", "sharedwait")
        .stdin("unmap\nfinish\n")
        .stdin_by_hand()
        .socket(&home.sock)
        .check_while(|run| {
            let pid = run.pid();
            let mut input = run.take_stdin();
            wait_registered(&home.sock, pid);
            let pinned = |want: bool| {
                wait_for(
                    &format!("process {pid} pinned: {want}"),
                    Duration::from_secs(10),
                    || proc_info(&home.sock, pid).is_some_and(|p| p["pinned"].is_string() == want),
                )
            };
            pinned(true);
            let listed = client(&home.sock, &["ps"]);
            let line = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .find(|l| l.contains(&pid.to_string()))
                .map(str::to_string)
                .unwrap_or_default();
            assert!(line.contains(" home "), "ps shows the constraint: {line}");
            // Paper section 4.2: a process with writable shared memory stays at home.
            let m = migrate(&home.sock, pid, "b");
            assert!(
                !m.status.success(),
                "migration of a pinned process succeeded"
            );
            let err = String::from_utf8_lossy(&m.stderr);
            assert!(
                err.contains("stays at home") && err.contains("shared mapping"),
                "{err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
            // Once the mapping is gone it may move, and finishes identical to native.
            input.write_all(b"unmap\n").unwrap();
            pinned(false);
            tour(home, pid, &["b"], &mut |_| {});
            input.write_all(b"finish\n").unwrap();
        });
}

#[test]
fn a_process_away_comes_home_for_a_writable_shared_mapping() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0];
    Case::image("glibc-static", "latershared")
        .stdin("go\n")
        .stdin_by_hand()
        .socket(&home.sock)
        .check_while(|run| {
            let pid = run.pid();
            let mut input = run.take_stdin();
            wait_registered(&home.sock, pid);
            tour(home, pid, &["b"], &mut |_| {});
            // Now it asks for a writable shared mapping and a SysV segment: it is brought
            // home for them, and finishes there.
            input.write_all(b"go\n").unwrap();
            wait_for(
                &format!("process {pid} back home"),
                Duration::from_secs(20),
                || {
                    proc_info(&home.sock, pid)
                        .is_none_or(|p| p["node"] == home.name.as_str() && p["migrations"] == 2)
                },
            );
        });
}

/// A shell pipeline homed at one node: every process of it (the shell and the children it
/// forks) is listed with its own pid; two children are moved to two other nodes while the
/// pipeline runs, and what it prints and writes equals a native run.
/// Handlers, an interval timer and a POSIX timer travel with the process: it counts their
/// signals in handlers while it moves home → b → home, and prints what a native run prints.
#[test]
fn timers_and_handlers_travel_with_the_process() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    for variant in ["glibc-static", "musl-static"] {
        Case::image(variant, "sigtravel")
            .args(["400"])
            .socket(&nodes[0].sock)
            .check_while(|run| {
                let pid = run.pid();
                wait_registered(&nodes[0].sock, pid);
                std::thread::sleep(Duration::from_millis(300));
                tour(&nodes[0], pid, &["b", "home"], &mut |_| {});
            });
    }
}

/// A process away dies of a fault: its user sees mosvm's line about it on the stderr of its
/// `mosvm run`, as at home (not in the log of the node it ran on), and its status is the
/// native one.
#[test]
fn a_fault_away_from_home_is_reported_on_the_users_stderr() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let home = &nodes[0].sock;
    let (_, guest) = Case::image("glibc-static", "segfault")
        .args(["moved"])
        .socket(home)
        .ignore_stderr()
        .expect_status(Some(139))
        .check_each(|run, under_mosvm| {
            if under_mosvm {
                let pid = run.pid();
                wait_registered(home, pid);
                tour(&nodes[0], pid, &["b"], &mut |_| {});
            }
            std::fs::write(run.dir().join("moved"), b"").unwrap();
        });
    let err = guest.stderr_text();
    assert!(
        err.contains("killed by SIGSEGV") && err.contains("segfault"),
        "mosvm run's stderr: {err:?}"
    );
}

/// A signal sent to the process at home while it runs on b reaches its handler there, with
/// the sender's `si_code`; the same as when it is sent to the native program.
#[test]
fn a_signal_sent_home_reaches_the_handler_of_the_remote_guest() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let case = Case::image("glibc-static", "sigtravel")
        .args(["50", "usr1"])
        .socket(&nodes[0].sock);
    let signal = |pid: u32| {
        // SAFETY: sending a signal to our own child.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    };
    let native = {
        let child = std::process::Command::new(image("glibc-static", "sigtravel"))
            .args(["50", "usr1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the native program");
        std::thread::sleep(Duration::from_millis(1500));
        signal(child.id());
        let out = child.wait_with_output().expect("native run");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let run = case.spawn_mosvm();
    let pid = run.pid();
    wait_registered(&nodes[0].sock, pid);
    tour(&nodes[0], pid, &["b"], &mut |_| {});
    std::thread::sleep(Duration::from_millis(800));
    signal(pid);
    let got = run.finish();
    assert_eq!(got.shell_status(), 0, "{}", got.stderr_text());
    assert_eq!(got.stdout_text(), native, "{}", got.stderr_text());
}

/// A read of stdin that waits at home for a process running on b is interrupted by a signal
/// sent home: with SA_RESTART the read goes on and gets the data written later, without it
/// fails with EINTR; both as natively.
#[test]
fn a_signal_interrupts_a_remote_process_blocked_in_a_read_at_home() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    // Signal, wait, then write a line: the same for both runs.
    let drive = |pid: u32, stdin: &mut std::process::ChildStdin| {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: sending a signal to our own child.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        std::thread::sleep(Duration::from_millis(500));
        let _ = stdin.write_all(b"late data\n");
    };
    for mode in ["restart", "eintr"] {
        let prog = image("glibc-static", "sigread");
        let mut child = std::process::Command::new(&prog)
            .arg(mode)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the native program");
        let mut stdin = child.stdin.take().expect("stdin");
        drive(child.id(), &mut stdin);
        drop(stdin);
        let native = child.wait_with_output().expect("native run");
        let native = String::from_utf8_lossy(&native.stdout).into_owned();

        let mut run = Case::image("glibc-static", "sigread")
            .arg(mode)
            .stdin_by_hand()
            .socket(&nodes[0].sock)
            .spawn_mosvm();
        let pid = run.pid();
        wait_registered(&nodes[0].sock, pid);
        tour(&nodes[0], pid, &["b"], &mut |_| {});
        let mut stdin = run.take_stdin();
        drive(pid, &mut stdin);
        drop(stdin);
        let got = run.finish();
        assert_eq!(got.shell_status(), 0, "{mode}: {}", got.stderr_text());
        assert_eq!(got.stdout_text(), native, "{mode}: {}", got.stderr_text());
    }
}

/// Reads and writes of 64 MiB and more from a process away from home: the largest request
/// and reply (64 MiB of data each) fit the link's frames, and longer ones are split, with
/// the same results as natively.
#[test]
fn reads_and_writes_of_64_mib_and_more_away_from_home_behave_as_natively() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    let script = "import hashlib, os, sys, time\n\
        sys.stdin.readline()\n\
        fd = os.open('big.bin', os.O_RDWR | os.O_CREAT, 0o644)\n\
        for n in (64 << 20, (64 << 20) + 4096, (64 << 20) - 4096):\n\
        \x20   data = bytes([n % 251]) * n\n\
        \x20   os.lseek(fd, 0, 0)\n\
        \x20   print('wrote', os.write(fd, data))\n\
        \x20   os.lseek(fd, 0, 0)\n\
        \x20   back = os.read(fd, n)\n\
        \x20   print('read', len(back), hashlib.sha256(back).hexdigest()[:16], back == data)\n";
    Case::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin("go\n")
        .stdin_by_hand()
        .socket(&nodes[0].sock)
        .timeout(Duration::from_secs(120))
        .check_while(|run| {
            let pid = run.pid();
            let mut input = run.take_stdin();
            wait_registered(&nodes[0].sock, pid);
            tour(&nodes[0], pid, &["b"], &mut |_| {});
            input.write_all(b"go\n").unwrap();
        });
}

/// A signal aimed at one thread of a process away from home (pthread_kill, pthread_cancel)
/// interrupts that thread's call waiting at home (a read of an empty pipe), as natively.
#[test]
fn a_signal_for_one_thread_interrupts_its_call_waiting_at_home() {
    require_kvm!();
    let (_dir, nodes) = home_and_b();
    for variant in ["glibc-static", "dynamic"] {
        Case::image(variant, "threadintr")
            .socket(&nodes[0].sock)
            .timeout(Duration::from_secs(60))
            .check_each(|run, under_mosvm| {
                if under_mosvm {
                    wait_registered(&nodes[0].sock, run.pid());
                    tour(&nodes[0], run.pid(), &["b"], &mut |_| {});
                }
                std::fs::write(run.dir().join("go"), b"").unwrap();
            });
    }
}
