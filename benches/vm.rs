//! `cargo bench --bench vm`: mosvm's micro-VM against the real thing, side by side in one run.
//!
//! Prints ratios (guest vs native, trapped syscall vs bare KVM exit, startup difference) and
//! where the time goes. Numbers go into BENCHMARKS.md; nothing here passes or fails on time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn mosvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mosvm"))
}

fn image(variant: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("images/out")
        .join(variant)
        .join(name)
}

/// Wall seconds of one run, output discarded; panics if it fails (a benchmark of a broken run
/// means nothing).
fn time(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn");
    let e = t.elapsed().as_secs_f64();
    assert!(st.success(), "{cmd:?} failed: {st}");
    e
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Alternate native and guest runs `n` times; medians of each.
fn paired(n: usize, native: &dyn Fn() -> Command, guest: &dyn Fn() -> Command) -> (f64, f64) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    time(&mut native());
    time(&mut guest());
    for _ in 0..n {
        a.push(time(&mut native()));
        b.push(time(&mut guest()));
    }
    (median(a), median(b))
}

/// Run under `mosvm run --stats` and return the stats JSON fields.
fn stats(prog: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(mosvm())
        .arg("run")
        .arg("--stats")
        .arg(prog)
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("spawn");
    assert!(out.status.success(), "{prog:?} failed");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().expect("stats line");
    serde_json::from_str(line).expect("stats JSON")
}

fn main() {
    let st = Command::new("make")
        .args(["-s", "-C"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("images"))
        .status()
        .expect("make");
    assert!(st.success(), "building images failed");
    println!("mosvm micro-VM benchmarks (medians; ratios taken in this run)\n");

    // 1. Compute loop: guest vs native.
    let compute = image("glibc-static", "compute");
    let iters = "400000000";
    let (n, g) = paired(
        5,
        &|| {
            let mut c = Command::new(&compute);
            c.arg(iters);
            c
        },
        &|| {
            let mut c = Command::new(mosvm());
            c.arg("run").arg(&compute).arg(iters);
            c
        },
    );
    println!("compute loop ({iters} iterations, glibc-static)");
    println!(
        "  native {:.3} s, mosvm {:.3} s, ratio mosvm/native = {:.3}  (target <= 1.02)\n",
        n,
        g,
        g / n
    );

    // 2. One trapped syscall vs one bare KVM exit.
    let sl = image("glibc-static", "syscall_loop");
    let (big, small) = (200_000u64, 1_000u64);
    let mut per_call = Vec::new();
    let mut exits_per_call = 0.0;
    let mut bare = Vec::new();
    for _ in 0..3 {
        let a = stats(&sl, &[&big.to_string()]);
        let b = stats(&sl, &[&small.to_string()]);
        let us = a["run_us"].as_f64().unwrap() - b["run_us"].as_f64().unwrap();
        per_call.push(us * 1000.0 / (big - small) as f64);
        exits_per_call =
            (a["exits"].as_f64().unwrap() - b["exits"].as_f64().unwrap()) / (big - small) as f64;
        bare.push(vmm::bench::bare_exit_ns(big).expect("bare exit loop"));
    }
    let (pc, be) = (median(per_call), median(bare));
    println!("getppid loop: trapped syscall vs bare KVM exit (ring 3 `out` loop, same VM setup)");
    println!(
        "  syscall {:.0} ns, bare exit {:.0} ns, ratio = {:.3} (target <= 1.15); exits per syscall = {:.3}\n",
        pc,
        be,
        pc / be,
        exits_per_call
    );

    // 3. Startup: mosvm run hello vs native exec, on a host without a node and on one with a
    // node (which holds an idle VM: `vmm::cpu::keeper`, held here by the bench itself).
    let hello = image("glibc-static", "hello");
    println!("startup: hello (glibc-static)");
    for with_node in [false, true] {
        let _keeper = with_node.then(|| vmm::cpu::keeper().expect("an idle VM"));
        let (n, g) = paired(41, &|| Command::new(&hello), &|| {
            let mut c = Command::new(mosvm());
            c.arg("run").arg(&hello);
            c
        });
        let mut parts = Vec::new();
        for _ in 0..9 {
            parts.push(stats(&hello, &[]));
        }
        let med = |k: &str| median(parts.iter().map(|p| p[k].as_f64().unwrap()).collect());
        let (c, l, r) = (med("create_us"), med("load_us"), med("run_us"));
        println!(
            "  {}: native {:.2} ms, mosvm {:.2} ms, difference = {:.2} ms (target <= 3 ms)",
            if with_node {
                "with a node on the host"
            } else {
                "no node on the host"
            },
            n * 1e3,
            g * 1e3,
            (g - n) * 1e3
        );
        println!(
            "    breakdown: VM+memory+vCPU creation {:.2} ms, load {:.2} ms, run {:.2} ms, rest (process start, teardown) {:.2} ms",
            c / 1e3,
            l / 1e3,
            r / 1e3,
            g * 1e3 - (c + l + r) / 1e3
        );
    }
    println!();

    // 4. Clock reads: clock_gettime(CLOCK_MONOTONIC) through libc (the vDSO) and as the
    // system call, per call, guest vs native: the difference between a long and a short run.
    let clocks = image("dynamic", "clocks");
    println!("clock_gettime(CLOCK_MONOTONIC) per call (dynamic clocks spin / sysspin)");
    for (mode, big, what, target) in [
        ("spin", 20_000_000u64, "through the vDSO", " (target <= 5)"),
        ("sysspin", 20_000, "as a system call", ""),
    ] {
        let run = |n: u64, guest: bool| {
            let mut c = if guest {
                let mut c = Command::new(mosvm());
                c.arg("run").arg(&clocks);
                c
            } else {
                Command::new(&clocks)
            };
            c.arg(mode).arg(n.to_string());
            c
        };
        let small = big / 100;
        let (nb, gb) = paired(5, &|| run(big, false), &|| run(big, true));
        let (ns, gs) = paired(5, &|| run(small, false), &|| run(small, true));
        let per = |long: f64, short: f64| (long - short) * 1e9 / (big - small) as f64;
        let (n, g) = (per(nb, ns), per(gb, gs));
        println!(
            "  {what}: native {n:.1} ns, mosvm {g:.1} ns, ratio = {:.2}{target}",
            g / n
        );
    }
    println!();

    // 5. Memory-map operations: per operation, guest vs native.
    let mb = image("glibc-static", "mapbench");
    let dir = tempfile::tempdir().expect("tempdir");
    println!("memory maps (glibc-static mapbench), per operation");
    for (mode, n, what) in [
        (
            "flip",
            2000,
            "mprotect RW->R->RW of a touched page (a revoke and a grant)",
        ),
        ("anon", 200, "mmap 1 MiB + touch 256 pages + munmap"),
        (
            "file",
            200,
            "mmap a 1 MiB file shared + read 256 pages + munmap",
        ),
    ] {
        let cmd = |under: bool, count: usize| {
            let mut c = if under {
                let mut c = Command::new(mosvm());
                c.arg("run").arg(&mb);
                c
            } else {
                Command::new(&mb)
            };
            c.args([mode, &count.to_string()]).current_dir(dir.path());
            c
        };
        // The same program doing no operation: what remains is the operations' cost.
        let (n1, g1) = paired(5, &|| cmd(false, n), &|| cmd(true, n));
        let (n0, g0) = paired(5, &|| cmd(false, 0), &|| cmd(true, 0));
        let (per_n, per_g) = ((n1 - n0) / n as f64 * 1e6, (g1 - g0) / n as f64 * 1e6);
        println!(
            "  {what}: native {per_n:.1} us, mosvm {per_g:.1} us, ratio = {:.1}",
            per_g / per_n
        );
    }
    println!();

    // 6. python3 -c pass.
    let py = Path::new("/usr/bin/python3");
    if py.exists() {
        let (n, g) = paired(
            7,
            &|| {
                let mut c = Command::new(py);
                c.args(["-c", "pass"]);
                c
            },
            &|| {
                let mut c = Command::new(mosvm());
                c.arg("run").arg(py).args(["-c", "pass"]);
                c
            },
        );
        let s = stats(py, &["-c", "pass"]);
        println!("python3 -c pass");
        println!(
            "  native {:.1} ms, mosvm {:.1} ms, ratio = {:.2} (target <= 2.5); {} exits ({} local, {} home syscalls), create {:.1} ms, load {:.1} ms, run {:.1} ms",
            n * 1e3,
            g * 1e3,
            g / n,
            s["exits"],
            s["local"],
            s["home"],
            s["create_us"].as_f64().unwrap() / 1e3,
            s["load_us"].as_f64().unwrap() / 1e3,
            s["run_us"].as_f64().unwrap() / 1e3
        );
    }
    println!();
    process_trees();
}

/// Per-operation cost of `procbench MODE N`: the difference between a long and a short run,
/// so process start and teardown cancel out. (native µs, mosvm µs)
fn per_op(mode: &str, big: u64, small: u64) -> (f64, f64) {
    let run = |under: bool, n: u64| {
        move || {
            let mut c = if under {
                let mut c = Command::new(mosvm());
                c.arg("run").arg(image("glibc-static", "procbench"));
                c
            } else {
                Command::new(image("glibc-static", "procbench"))
            };
            c.arg(mode).arg(n.to_string());
            c
        }
    };
    let (nb, gb) = paired(5, &run(false, big), &run(true, big));
    let (ns, gs) = paired(5, &run(false, small), &run(true, small));
    let per = |b: f64, s: f64| (b - s) * 1e6 / (big - small) as f64;
    (per(nb, ns), per(gb, gs))
}

/// Processes, threads and signals: fork + exit + wait, a signal to a handler, thread create +
/// join, a futex ping-pong between two threads, a 3-stage shell pipeline, and a `make -j2`
/// build with gcc, each against the same thing run natively.
fn process_trees() {
    println!("process trees (glibc-static procbench; Debian's sh, make and gcc)");
    let (n, g) = per_op("fork", 300, 30);
    println!(
        "  fork + exit + wait: native {n:.0} us, mosvm {g:.0} us, ratio = {:.1}",
        g / n
    );
    let (n, g) = per_op("signal", 100_000, 1_000);
    println!(
        "  signal to a handler (raise + frame + rt_sigreturn): native {:.2} us, mosvm {:.2} us, ratio = {:.1}",
        n,
        g,
        g / n
    );
    let (n, g) = per_op("thread", 300, 30);
    println!(
        "  thread create + join: native {n:.1} us, mosvm {g:.0} us, ratio = {:.1}",
        g / n
    );
    let (n, g) = per_op("futex", 20_000, 2_000);
    println!(
        "  futex ping-pong between two threads (one round trip): native {n:.2} us, mosvm {g:.2} us, ratio = {:.1}",
        g / n
    );
    let script = "seq 1 200000 | sort -rn | sha256sum";
    let sh = |under: bool| {
        move || {
            let mut c = if under {
                let mut c = Command::new(mosvm());
                c.arg("run").arg("/bin/sh");
                c
            } else {
                Command::new("/bin/sh")
            };
            c.args(["-c", script]);
            c
        }
    };
    let (n, g) = paired(7, &sh(false), &sh(true));
    println!(
        "  sh -c '{script}': native {:.1} ms, mosvm {:.1} ms, ratio = {:.2}",
        n * 1e3,
        g * 1e3,
        g / n
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("Makefile"),
        "prog: main.o f.o g.o\n\t$(CC) -o $@ main.o f.o g.o\n%.o: %.c\n\t$(CC) -O2 -c $<\n",
    )
    .expect("Makefile");
    std::fs::write(
        d.join("main.c"),
        "#include <stdio.h>\nint f(int); int g(int);\nint main(void) { printf(\"%d\\n\", f(1) + g(2)); return 0; }\n",
    )
    .expect("main.c");
    std::fs::write(d.join("f.c"), "int f(int x) { return 2 * x + 1; }\n").expect("f.c");
    std::fs::write(d.join("g.c"), "int g(int x) { return x * x * x; }\n").expect("g.c");
    let mk = |under: bool| {
        let d = d.to_path_buf();
        move || {
            let mut c = if under {
                let mut c = Command::new(mosvm());
                c.arg("run").arg("/usr/bin/make");
                c
            } else {
                Command::new("/usr/bin/make")
            };
            c.args(["-s", "-B", "-j2", "-C"]).arg(&d);
            c
        }
    };
    let (n, g) = paired(5, &mk(false), &mk(true));
    println!(
        "  make -B -j2 (3 C files, gcc -O2): native {:.0} ms, mosvm {:.0} ms, ratio = {:.2}",
        n * 1e3,
        g * 1e3,
        g / n
    );
}
