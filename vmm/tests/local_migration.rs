//! Live migration between two micro-VMs in one process, over real KVM: pre-copy rounds from
//! the dirty log while the guest runs, pause, capture, encode/decode the state, restore into a
//! fresh VM, finish there. The result must equal a native run of the same program: stdout,
//! exit status and the file it writes.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::deputy::HostDeputy;
use vmm::vm::{MigState, Options, Outcome, Vm};

const PAGE: usize = 4096;

/// The guest's files are relative to this process's working directory: one run that
/// changes it at a time (tests run in parallel).
static CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn images() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
    let st = std::process::Command::new("make")
        .current_dir(&dir)
        .arg("-s")
        .arg("-C")
        .arg(&dir)
        .status()
        .expect("make");
    assert!(st.success(), "building images failed");
    dir.join("out")
}

fn kvm_or_skip() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("MOSVM_SKIP_KVM").is_some_and(|v| v == "1"),
        "/dev/kvm is not usable: these tests need KVM (set MOSVM_SKIP_KVM=1 to skip them)"
    );
    eprintln!("note: MOSVM_SKIP_KVM=1: skipping KVM test");
    false
}

struct Run {
    stdout: Vec<u8>,
    status: i32,
    file: Vec<u8>,
}

/// The run under mosvm ended as the native one: exit status, stdout, the file it wrote.
fn assert_like_native(what: &str, got: &Run, want: &Run) {
    assert_eq!(got.status, want.status, "{what}: exit status");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        String::from_utf8_lossy(&want.stdout),
        "{what}: stdout"
    );
    assert_eq!(got.file, want.file, "{what}: ticker.out");
}

fn native(prog: &Path, args: &[&str], dir: &Path) -> Run {
    let out = std::process::Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("native run");
    Run {
        stdout: out.stdout,
        status: out.status.code().unwrap_or(-1),
        file: std::fs::read(dir.join("ticker.out")).unwrap_or_default(),
    }
}

/// Run under mosvm in this process, migrating after `after` through `rounds` pre-copy rounds.
fn migrated(
    prog: &Path,
    args: &[&str],
    dir: &Path,
    after: Duration,
    rounds: usize,
    shift_realtime_ns: i64,
) -> (Run, usize) {
    migrated_after_gap(
        prog,
        args,
        dir,
        after,
        rounds,
        shift_realtime_ns,
        Duration::ZERO,
    )
}

/// [`migrated`], with the guest kept stopped for `gap` between its capture and its restore
/// (a slow transfer).
fn migrated_after_gap(
    prog: &Path,
    args: &[&str],
    dir: &Path,
    after: Duration,
    rounds: usize,
    shift_realtime_ns: i64,
    gap: Duration,
) -> (Run, usize) {
    let _cwd = CWD.lock().unwrap_or_else(|p| p.into_inner());
    std::env::set_current_dir(dir).unwrap();
    let (mut vm, out, stdout_path) = start(prog, args, dir);
    let pause = vm.pause_handle();
    let view = vm.memory_view();
    let precopy = std::thread::spawn(move || {
        std::thread::sleep(after);
        view.start_dirty_log().unwrap();
        let mut pages: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut buf = [0u8; PAGE];
        let mut copy = |gpns: Vec<u64>, pages: &mut HashMap<u64, Vec<u8>>| {
            for gpn in gpns {
                assert!(view.read_page(gpn, &mut buf));
                pages.insert(gpn, buf.to_vec());
            }
        };
        let first = view.resident_pages();
        let mut sizes = vec![first.len()];
        copy(first, &mut pages);
        for _ in 0..rounds {
            pause.kick();
            std::thread::sleep(Duration::from_millis(1));
            let d = view.take_dirty().unwrap();
            sizes.push(d.len());
            copy(d, &mut pages);
        }
        eprintln!("pre-copy pages per round: {sizes:?}");
        pause.request();
        (pages, view)
    });
    let first = vm.run_or_pause().unwrap();
    let (mut pages, view) = precopy.join().unwrap();
    assert!(
        first.is_none(),
        "the program finished before it could be migrated: {first:?}"
    );
    // As the switch-over does: capture first (file pages become private copies then), then
    // the last dirty pages.
    let mut state = vm.capture().unwrap();
    let last = view.take_dirty().unwrap();
    let last_round = last.len();
    let mut buf = [0u8; PAGE];
    for gpn in last {
        assert!(view.read_page(gpn, &mut buf));
        pages.insert(gpn, buf.to_vec());
    }
    // Nothing lost: what was sent (pages not sent are zero) equals the stopped source's memory.
    let zero = [0u8; PAGE];
    for gpn in 0..view.used() / PAGE as u64 {
        assert!(view.read_page(gpn, &mut buf));
        let sent = pages.get(&gpn).map_or(&zero[..], |p| p.as_slice());
        assert!(
            sent == &buf[..],
            "page {gpn:#x} changed after it was last sent: the dirty log missed it"
        );
    }
    state.shift_realtime(shift_realtime_ns);
    std::thread::sleep(gap);
    let deputy = vm.into_deputy();
    let state = MigState::decode(&state.encode().unwrap()).unwrap();
    let dst = Vm::restore(state, deputy).unwrap();
    for (gpn, data) in &pages {
        dst.space
            .mem
            .write_page(*gpn, data.as_slice().try_into().unwrap())
            .unwrap();
    }
    let run = finish(dst, out, &stdout_path, dir);
    (run, last_round)
}

/// A VM for `prog` with `args`, its stdout going to a file beside `dir` (returned with its
/// path; `dir` is the working directory).
fn start(prog: &Path, args: &[&str], dir: &Path) -> (Vm, std::fs::File, PathBuf) {
    let stdout_path = dir.join("../stdout");
    let out = std::fs::File::create(&stdout_path).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let deputy = HostDeputy::with_stdio([null.as_raw_fd(), out.as_raw_fd(), 2]).with_exe(prog);
    let mut argv = vec![prog.as_os_str().as_encoded_bytes().to_vec()];
    argv.extend(args.iter().map(|a| a.as_bytes().to_vec()));
    let opts = Options {
        mem: 1 << 30,
        mem_label: "1G".into(),
        trace: false,
        lock: false,
        stats: false,
    };
    let vm = Vm::new(
        prog.to_path_buf(),
        argv,
        vec![b"LANG=C".to_vec()],
        Box::new(deputy),
        opts,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (vm, out, stdout_path)
}

/// Run the restored `dst` to its end: its stdout, status and file.
fn finish(mut dst: Vm, out: std::fs::File, stdout_path: &Path, dir: &Path) -> Run {
    let outcome = dst.run().unwrap();
    drop(dst);
    drop(out);
    let status = match outcome {
        Outcome::Exited(c) => c,
        Outcome::Signaled(s) => 128 + s,
    };
    Run {
        stdout: std::fs::read(stdout_path).unwrap(),
        status,
        file: std::fs::read(dir.join("ticker.out")).unwrap_or_default(),
    }
}

/// Run under mosvm in this process and move it after `after` by post-copy: the guest is
/// paused at once, only its state crosses before it resumes, and its pages follow, pushed
/// in order, 16 at a time with a pause after each batch, a page the guest touches before it
/// arrives being fetched on demand through userfaultfd. Returns the run and the faults
/// answered.
fn migrated_post_copy(prog: &Path, args: &[&str], dir: &Path, after: Duration) -> (Run, u64) {
    let _cwd = CWD.lock().unwrap_or_else(|p| p.into_inner());
    std::env::set_current_dir(dir).unwrap();
    let (mut vm, out, stdout_path) = start(prog, args, dir);
    let pause = vm.pause_handle();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        pause.request();
    });
    assert!(
        vm.run_or_pause().unwrap().is_none(),
        "finished before the move"
    );
    let view = vm.memory_view();
    let state = vm.capture().unwrap();
    // The source's pages: everything the guest touched.
    let mut pages: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut buf = [0u8; PAGE];
    for gpn in view.resident_pages() {
        assert!(view.read_page(gpn, &mut buf));
        if buf.iter().any(|&b| b != 0) {
            pages.insert(gpn, buf.to_vec());
        }
    }
    let deputy = vm.into_deputy();
    let state = MigState::decode(&state.encode().unwrap()).unwrap();
    let dst = Vm::restore(state, deputy).unwrap();
    let outstanding: Vec<u64> = pages.keys().copied().collect();
    let faults = vmm::postcopy::Faults::register(
        vmm::postcopy::open().unwrap(),
        &dst.space.mem,
        &outstanding,
    )
    .unwrap();
    let (ask_tx, ask_rx) = std::sync::mpsc::channel::<Vec<u64>>();
    let server = faults.serve(move |p| {
        let _ = ask_tx.send(p);
    });
    let f = faults.clone();
    let source = std::thread::spawn(move || {
        let mut push = migrate::postcopy::Pusher::new(&outstanding);
        while !push.done() {
            while let Ok(ask) = ask_rx.try_recv() {
                push.request(&ask);
            }
            for gpn in push.next_batch(16) {
                let placed = f
                    .place(gpn, pages[&gpn].as_slice().try_into().unwrap())
                    .unwrap();
                assert!(placed, "page {gpn:#x} was there before it arrived");
            }
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    let run = finish(dst, out, &stdout_path, dir);
    source.join().unwrap();
    assert!(
        faults.complete(),
        "{} pages never arrived",
        faults.remaining()
    );
    let n = faults.faults();
    faults.stop();
    server.join().unwrap();
    (run, n)
}

/// A program moved by post-copy (its pages arriving after it resumed, some on demand) runs
/// as natively: a ticker with a 32 MiB working set it keeps rewriting, and hog (64 MiB,
/// idle, checksummed at the end).
#[test]
fn a_process_moved_by_post_copy_runs_like_native() {
    if !kvm_or_skip() {
        return;
    }
    let vm_ok = userfaultfd::UffdBuilder::new()
        .user_mode_only(false)
        .create();
    if let Err(e) = vm_ok {
        panic!("userfaultfd is not usable here (post-copy needs it, as root): {e}");
    }
    for (image, args, after) in [
        ("glibc-static/ticker", &["30", "3000000", "32"][..], 400),
        ("glibc-static/hog", &["64", "0", "1"][..], 600),
    ] {
        let prog = images().join(image);
        let tmp = tempfile::tempdir().unwrap();
        let md = tmp.path().join("mosvm");
        std::fs::create_dir_all(&md).unwrap();
        let want = native(&prog, args, tmp.path());
        let (got, faults) = migrated_post_copy(&prog, args, &md, Duration::from_millis(after));
        eprintln!("{image}: {faults} faults answered");
        assert!(faults > 0, "{image}: the guest never waited for a page");
        assert_like_native(image, &got, &want);
    }
}

#[test]
fn a_running_guest_moves_to_a_new_vm_and_finishes_there() {
    if !kvm_or_skip() {
        return;
    }
    let out = images();
    let cases: [(&str, &[&str], u64, usize); 4] = [
        ("glibc-static/ticker", &["30", "3000000", "16"], 300, 3),
        ("dynamic/ticker", &["30", "3000000", "64"], 500, 5),
        ("musl-static/ticker", &["30", "3000000", "8"], 150, 0),
        ("glibc-static/ticker", &["20", "300000", "1"], 1, 1),
    ];
    for (image, args, after_ms, rounds) in cases {
        let prog = out.join(image);
        let tmp = tempfile::tempdir().unwrap();
        let (nd, md) = (tmp.path().join("native"), tmp.path().join("mosvm"));
        std::fs::create_dir_all(&nd).unwrap();
        std::fs::create_dir_all(&md).unwrap();
        let want = native(&prog, args, &nd);
        assert_eq!(want.status, 0, "{image} failed natively");
        let (got, last_round) =
            migrated(&prog, args, &md, Duration::from_millis(after_ms), rounds, 0);
        eprintln!("{image}: migrated after {after_ms} ms, {rounds} rounds, {last_round} pages in the stop-and-copy round");
        assert_like_native(image, &got, &want);
    }
}

/// The guest keeps its home's wall clock on a host whose clock differs: a destination whose
/// clock reads an hour behind (the offset a real move estimates with one Ping/Pong) still
/// shows the guest home's time, through time(), clock_gettime(CLOCK_REALTIME) and
/// gettimeofday() alike; before the move it read this host's clock.
#[test]
fn the_wall_clock_stays_home_s_across_a_move_to_a_host_with_another_clock() {
    if !kvm_or_skip() {
        return;
    }
    let prog = images().join("glibc-static/wallclock");
    let tmp = tempfile::tempdir().unwrap();
    let md = tmp.path().join("mosvm");
    std::fs::create_dir_all(&md).unwrap();
    let hour: i64 = 3600;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let start = now();
    // The destination's clock reads `delta` ahead of home's; here it is this same clock,
    // so home's time there is this clock plus an hour.
    let delta = -hour * 1_000_000_000;
    let (got, _) = migrated(
        &prog,
        &["30", "40"],
        &md,
        Duration::from_millis(400),
        1,
        delta,
    );
    let end = now();
    assert_eq!(got.status, 0);
    let lines: Vec<[i64; 3]> = String::from_utf8_lossy(&got.stdout)
        .lines()
        .map(|l| {
            let v: Vec<i64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            [v[0], v[1], v[2]]
        })
        .collect();
    assert_eq!(lines.len(), 30, "{lines:?}");
    let (mut before, mut after) = (0, 0);
    for l in &lines {
        // The three calls agree (within a tick, across a second boundary).
        assert!(
            l.iter().max().unwrap() - l.iter().min().unwrap() <= 1,
            "{l:?}"
        );
        if (start - 1..=end + 1).contains(&l[1]) {
            before += 1;
        } else {
            assert!(
                (start + hour - 1..=end + hour + 1).contains(&l[1]),
                "neither this host's time nor home's: {l:?} (started at {start})"
            );
            after += 1;
        }
    }
    assert!(before > 0 && after > 0, "before {before}, after {after}");
    // Once moved, it never reads this host's clock again.
    let first_after = lines.iter().position(|l| l[1] > end + 1).unwrap();
    assert!(lines[first_after..].iter().all(|l| l[1] > end + 1));
}

/// CPU time thread `t` (a pthread id) has used, seconds.
fn thread_cpu_s(t: libc::pthread_t) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a live thread of this process (the test's own, running the guest), and
    // both out-parameters are valid locals.
    unsafe {
        assert_eq!(libc::pthread_getcpuclockid(t, &mut clock), 0);
        assert_eq!(libc::clock_gettime(clock, &mut ts), 0);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A throttled guest gets only its share of the CPU: a computing guest throttled by 0.9 uses
/// a small part of one CPU (unthrottled it would use all of it), and runs at full speed again
/// once the throttle is lifted.
#[test]
fn a_throttled_guest_gets_only_its_share_of_the_cpu() {
    if !kvm_or_skip() {
        return;
    }
    let prog = images().join("glibc-static/compute");
    let null = std::fs::File::open("/dev/null").unwrap();
    let deputy = HostDeputy::with_stdio([null.as_raw_fd(), null.as_raw_fd(), 2]);
    let opts = Options {
        mem: 1 << 28,
        mem_label: "256M".into(),
        trace: false,
        lock: false,
        stats: false,
    };
    let argv = vec![b"compute".to_vec(), b"100000000000".to_vec()];
    let mut vm = Vm::new(prog, argv, vec![], Box::new(deputy), opts).unwrap();
    let pause = vm.pause_handle();
    // The guest runs on this thread: its CPU time is the guest's.
    // SAFETY: pthread_self has no preconditions.
    let vcpu = unsafe { libc::pthread_self() } as u64;
    let watcher = std::thread::spawn(move || {
        let vcpu = vcpu as libc::pthread_t;
        let share = |p: &vmm::vm::PauseHandle, f: f64| {
            p.throttle(f);
            std::thread::sleep(Duration::from_millis(200));
            let (c, t) = (thread_cpu_s(vcpu), std::time::Instant::now());
            std::thread::sleep(Duration::from_millis(1000));
            (thread_cpu_s(vcpu) - c) / t.elapsed().as_secs_f64()
        };
        let throttled = share(&pause, 0.9);
        let free = share(&pause, 0.0);
        pause.request();
        (throttled, free)
    });
    let out = vm.run_or_pause().unwrap();
    assert!(out.is_none(), "the guest ended early: {out:?}");
    let (throttled, free) = watcher.join().unwrap();
    eprintln!("CPU share: throttled by 0.9 {throttled:.2}, unthrottled {free:.2}");
    assert!(
        throttled < 0.4,
        "throttled by 0.9, the guest still used {throttled:.2} of a CPU"
    );
    assert!(
        free > throttled,
        "unthrottled {free:.2} vs throttled {throttled:.2}"
    );
}

/// Run `image` (in `images/out`) with `args` natively and moved once (after `after`, the
/// destination's wall clock said to read `shift_realtime_ns` ahead, the guest kept stopped
/// for `gap`): exit status and stdout must agree.
fn moves_like_native(
    image: &str,
    args: &[&str],
    after: Duration,
    shift_realtime_ns: i64,
    gap: Duration,
) {
    let prog = images().join(image);
    let tmp = tempfile::tempdir().unwrap();
    let md = tmp.path().join("mosvm");
    std::fs::create_dir_all(&md).unwrap();
    let want = native(&prog, args, tmp.path());
    let (got, _) = migrated_after_gap(&prog, args, &md, after, 1, shift_realtime_ns, gap);
    assert_eq!(got.status, want.status, "{image}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        String::from_utf8_lossy(&want.stdout),
        "{image}"
    );
}

/// A relative sleep measures an interval, whatever the wall clock does (clock_nanosleep(2)):
/// glibc's and musl's nanosleep() are relative CLOCK_REALTIME sleeps, and a move that takes
/// the guest's wall clock 30 ms forward (an estimate of home's clock that was off) must not
/// end the sleep under way early. Each sleep is measured on CLOCK_MONOTONIC by the program.
#[test]
fn a_relative_wall_clock_sleep_is_not_cut_short_by_a_move() {
    if !kvm_or_skip() {
        return;
    }
    for image in ["glibc-static/clocks", "musl-static/clocks"] {
        let after = Duration::from_millis(310);
        moves_like_native(
            image,
            &["sleeps", "40", "25"],
            after,
            -30_000_000,
            Duration::ZERO,
        );
    }
}

/// The guest's monotonic clock keeps running while the guest moves, as through any pause
/// (natively a stopped process's clock does not stop): a move that keeps it stopped for 3 s
/// leaves its CLOCK_MONOTONIC in step with its wall clock (`clocks travel` checks the two
/// agree within 2 s; a clock stopped for the move would be 3 s behind).
#[test]
fn the_monotonic_clock_runs_on_through_a_slow_move() {
    if !kvm_or_skip() {
        return;
    }
    let (after, gap) = (Duration::from_millis(500), Duration::from_secs(3));
    moves_like_native("glibc-static/clocks", &["travel", "3"], after, 0, gap);
}
