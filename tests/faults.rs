//! Faults and process-level behaviour: a program killed by SIGSEGV, exit codes, signals sent
//! to `mosvm run`, a closed stdout, and bad input (not an ELF, another architecture, a
//! missing interpreter, too little guest memory). Where Linux itself defines the outcome it
//! is taken from the native run; bad input must give a non-zero exit, exactly one line on
//! stderr and no panic.

#[macro_use]
mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    assert_clean_failure, image, is_one_line, mosvm_bin, wait_bounded, write_executable, Case,
    LineReader, VARIANTS,
};

// ---------------------------------------------------------------- signals from the program

fn segfault(variant: &str) {
    require_kvm!();
    let case = Case::image(variant, "segfault")
        .ignore_stderr()
        .expect_status(Some(128 + libc::SIGSEGV));
    let (native, guest) = case.check();
    assert_eq!(
        native.status.signal(),
        Some(libc::SIGSEGV),
        "the native segfault did not die of SIGSEGV: {:?}",
        native.status
    );
    assert_eq!(
        guest.status.signal(),
        Some(libc::SIGSEGV),
        "mosvm should die of SIGSEGV as its program does natively, got {:?}\nstderr: {}",
        guest.status,
        guest.stderr_text()
    );
    assert!(
        is_one_line(&guest.stderr) && !guest.stderr_text().contains("panicked"),
        "mosvm should report the fault in exactly one line on stderr, got:\n{}",
        guest.stderr_text()
    );
}

#[test]
fn segfault_glibc_static() {
    segfault(VARIANTS[0]);
}

#[test]
fn segfault_musl_static() {
    segfault(VARIANTS[1]);
}

#[test]
fn segfault_dynamic() {
    segfault(VARIANTS[2]);
}

#[test]
fn exit_codes() {
    require_kvm!();
    for code in [
        "0", "1", "2", "3", "100", "127", "128", "200", "255", "256", "257", "-1",
    ] {
        let (native, guest) = Case::image("glibc-static", "exit_code")
            .arg(code)
            .expect_status(None)
            .check();
        assert_eq!(
            native.status.code(),
            guest.status.code(),
            "exit_code {code}"
        );
    }
    Case::image("musl-static", "exit_code").check();
}

#[test]
fn closed_stdout_gives_sigpipe() {
    require_kvm!();
    // `yes` writes until its stdout is closed; Linux then kills it with SIGPIPE.
    let run = |under_mosvm: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = if under_mosvm {
            let mut c = Command::new(mosvm_bin());
            c.args(["run", "/bin/busybox"]);
            c
        } else {
            Command::new("/bin/busybox")
        };
        let mut child = cmd
            .arg("yes")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn yes");
        let mut lines = LineReader::new(child.stdout.take().unwrap());
        assert!(
            lines.wait_for(b"y\n", Duration::from_secs(60)),
            "yes printed nothing"
        );
        drop(lines); // closes the read end once the reader thread's read returns
        wait_bounded(&mut child, Duration::from_secs(30))
            .expect("`yes` did not exit within 30 s of its stdout being closed")
    };
    let native = run(false);
    assert_eq!(native.signal(), Some(libc::SIGPIPE), "native: {native:?}");
    let guest = run(true);
    assert_eq!(
        guest.signal(),
        Some(libc::SIGPIPE),
        "mosvm should die of SIGPIPE as its program does natively, got {guest:?}"
    );
}

// ---------------------------------------------------------------- signals sent to mosvm run

/// Starts stdin_filter (natively or under mosvm) with stdin kept open, waits until it has
/// echoed a line (so it is running and blocked in read), sends `sig`, and returns how it
/// ended (bounded wait of 10 s after the signal).
fn signal_blocked_program(under_mosvm: bool, sig: i32) -> std::process::ExitStatus {
    let program = image("glibc-static", "stdin_filter");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = if under_mosvm {
        let mut c = Command::new(mosvm_bin());
        c.arg("run").arg(&program);
        c
    } else {
        Command::new(&program)
    };
    // The signal's action is its default in both runs, whatever this test inherited (a shell
    // without job control starts background commands with SIGINT and SIGQUIT ignored).
    // SAFETY: between fork and exec the closure calls only signal(2), async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::signal(sig, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stdin_filter");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = LineReader::new(child.stdout.take().unwrap());
    let err = LineReader::new(child.stderr.take().unwrap());
    stdin.write_all(b"ready\n").unwrap();
    if !lines.wait_for(b"READY\n", Duration::from_secs(60)) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "stdin_filter ({}) never echoed its first line; stdout so far: {:?}",
            if under_mosvm { "under mosvm" } else { "native" },
            String::from_utf8_lossy(&lines.seen)
        );
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let status = wait_bounded(&mut child, Duration::from_secs(10));
    drop(stdin);
    drop(err);
    status.unwrap_or_else(|| {
        panic!(
            "{} did not exit within 10 s of signal {sig}; killed",
            if under_mosvm {
                "mosvm run"
            } else {
                "the native program"
            }
        )
    })
}

fn signal_test(sig: i32) {
    require_kvm!();
    let native = signal_blocked_program(false, sig);
    assert_eq!(native.signal(), Some(sig), "native: {native:?}");
    let guest = signal_blocked_program(true, sig);
    assert_eq!(
        guest.signal(),
        Some(sig),
        "mosvm run sent signal {sig} should die of it as its program does natively (its \
         parent then sees the same wait status), got {guest:?}"
    );
}

#[test]
fn sigint_kills_as_natively() {
    signal_test(libc::SIGINT);
}

#[test]
fn sigterm_kills_as_natively() {
    signal_test(libc::SIGTERM);
}

#[test]
fn sighup_kills_as_natively() {
    signal_test(libc::SIGHUP);
}

/// Whether process `pid` catches or blocks `sig` (from /proc/PID/status), i.e. whether a
/// signal sent now would reach its own handling rather than kill it outright.
fn handles_signal(pid: u32, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (sig - 1);
    status.lines().any(|l| {
        ["SigCgt:", "SigBlk:"].iter().any(|key| {
            l.strip_prefix(key)
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|mask| mask & bit != 0)
        })
    })
}

/// `busybox sleep 30` (blocked in nanosleep, not in a read) receives SIGTERM.
fn signal_sleeping(under_mosvm: bool, sig: i32) -> std::process::ExitStatus {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = if under_mosvm {
        let mut c = Command::new(mosvm_bin());
        c.args(["run", "/bin/busybox"]);
        c
    } else {
        Command::new("/bin/busybox")
    };
    let mut child = cmd
        .args(["sleep", "30"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn busybox sleep");
    if under_mosvm {
        // Wait (bounded) until mosvm has set up its signal handling, then give the guest a
        // moment to reach its sleep. Natively the signal's default action applies anyway.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !handles_signal(child.id(), sig) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    wait_bounded(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!("busybox sleep 30 did not exit within 10 s of signal {sig} (mosvm: {under_mosvm})")
    })
}

#[test]
fn sigterm_interrupts_sleep() {
    require_kvm!();
    let native = signal_sleeping(false, libc::SIGTERM);
    assert_eq!(native.signal(), Some(libc::SIGTERM), "native: {native:?}");
    let guest = signal_sleeping(true, libc::SIGTERM);
    assert_eq!(
        guest.signal(),
        Some(libc::SIGTERM),
        "mosvm run sent SIGTERM while its program sleeps should die of it, got {guest:?}"
    );
}

// ---------------------------------------------------------------- bad input

/// Runs `mosvm run PROGRAM` on a file written into a fresh directory and asserts a clean,
/// one-line failure. Also checks that Linux itself refuses to exec the file natively, when
/// `native_refuses` is set (so the test cannot pass on a file that is actually fine).
fn refuses(what: &str, name: &str, bytes: &[u8], native_refuses: bool) {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    write_executable(&path, bytes);
    if native_refuses {
        let native = Command::new(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            native.is_err(),
            "Linux ran {what} natively ({native:?}): bad test input"
        );
    }
    let run = Case::new(&path).expect_status(None).run_mosvm();
    assert_clean_failure(what, &run);
}

/// A minimal ELF header (plus one program header) for the given class and machine.
fn elf_header(class64: bool, machine: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF");
    v.push(if class64 { 2 } else { 1 }); // EI_CLASS
    v.push(1); // little endian
    v.push(1); // EV_CURRENT
    v.extend_from_slice(&[0; 9]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&machine.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    if class64 {
        let base: u64 = 0x400000;
        v.extend_from_slice(&(base + 120).to_le_bytes()); // e_entry
        v.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for h in [64u16, 56, 1, 0, 0, 0] {
            v.extend_from_slice(&h.to_le_bytes());
        }
        // PT_LOAD, R+X, whole file at base.
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&5u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        v.extend_from_slice(&base.to_le_bytes());
        v.extend_from_slice(&base.to_le_bytes());
        v.extend_from_slice(&128u64.to_le_bytes());
        v.extend_from_slice(&128u64.to_le_bytes());
        v.extend_from_slice(&0x1000u64.to_le_bytes());
    } else {
        let base: u32 = 0x0804_8000;
        v.extend_from_slice(&(base + 84).to_le_bytes()); // e_entry
        v.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for h in [52u16, 32, 1, 0, 0, 0] {
            v.extend_from_slice(&h.to_le_bytes());
        }
        for w in [1u32, 0, base, base, 96, 96, 5, 0x1000] {
            v.extend_from_slice(&w.to_le_bytes());
        }
    }
    // Code: exit(7) (i386: mov eax,1; mov ebx,7; int 0x80), padded.
    v.extend_from_slice(&[0xb8, 1, 0, 0, 0, 0xbb, 7, 0, 0, 0, 0xcd, 0x80]);
    v.resize(if class64 { 128 } else { 96 }, 0);
    v
}

#[test]
fn not_an_elf() {
    refuses(
        "a text file",
        "not-elf",
        b"this is not a program\njust some text\n",
        true,
    );
}

#[test]
fn empty_file() {
    refuses("an empty file", "empty", b"", true);
}

#[test]
fn elf32_i386() {
    // Linux may run this natively (32-bit emulation); mosvm runs x86-64 programs only.
    refuses("a 32-bit i386 ELF", "elf32", &elf_header(false, 3), false);
}

#[test]
fn elf64_aarch64() {
    refuses(
        "a 64-bit AArch64 ELF",
        "aarch64",
        &elf_header(true, 183),
        true,
    );
}

#[test]
fn truncated_elf() {
    let hello = std::fs::read(image("glibc-static", "hello")).unwrap();
    refuses("a truncated ELF", "truncated", &hello[..200], true);
}

#[test]
fn missing_interpreter() {
    require_kvm!();
    let mut bytes = std::fs::read(image("dynamic", "hello")).unwrap();
    let interp = b"/lib64/ld-linux-x86-64.so.2\0";
    let at = bytes
        .windows(interp.len())
        .position(|w| w == interp)
        .expect("dynamic hello has no /lib64/ld-linux-x86-64.so.2 interpreter string");
    let mut missing = b"/nonexistent/ld-mosvm".to_vec();
    missing.resize(interp.len() - 1, b'x');
    missing.push(0);
    bytes[at..at + interp.len()].copy_from_slice(&missing);
    let missing_path = String::from_utf8_lossy(&missing[..missing.len() - 1]).into_owned();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello-bad-interp");
    write_executable(&path, &bytes);
    let native = Command::new(&path).stdin(Stdio::null()).output();
    assert_eq!(
        native.as_ref().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::NotFound),
        "Linux should refuse a program whose interpreter is missing with ENOENT: {native:?}"
    );
    let run = Case::new(&path).expect_status(Some(127)).run_mosvm();
    assert_clean_failure("a missing interpreter", &run);
    assert!(
        run.stderr_text().contains(&missing_path),
        "the error should name the missing interpreter {missing_path}, got: {}",
        run.stderr_text()
    );
    // A `#!` script whose interpreter is missing: 127, as `env` and `nice` exit.
    let script = dir.path().join("s.sh");
    write_executable(&script, b"#!/nonexistent/interp\necho hi\n");
    let native = Command::new("env").arg(&script).output().unwrap();
    assert_eq!(native.status.code(), Some(127), "env: {native:?}");
    let run = Case::new(&script).expect_status(Some(127)).run_mosvm();
    assert_clean_failure("a script whose interpreter is missing", &run);
}

#[test]
fn missing_program() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does-not-exist");
    assert!(Command::new(&path).status().is_err());
    let run = Case::new(Path::new(&path)).expect_status(None).run_mosvm();
    assert_clean_failure("a missing program", &run);
}

#[test]
fn directory_as_program() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    assert!(Command::new(dir.path()).status().is_err());
    let run = Case::new(dir.path()).expect_status(None).run_mosvm();
    assert_clean_failure("a directory", &run);
}

/// A program without execute permission is refused as execve(2) refuses it: EACCES, 126,
/// and nothing runs (a script as well as an ELF).
#[test]
fn a_program_without_execute_permission_is_refused() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    let elf = dir.path().join("hello");
    std::fs::copy(common::image("glibc-static", "hello"), &elf).unwrap();
    for p in [&script, &elf] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let native = Command::new(p).output();
        assert_eq!(
            native.map_err(|e| e.raw_os_error()).err(),
            Some(Some(libc::EACCES)),
            "natively"
        );
        let run = Case::new(p).expect_status(Some(126)).run_mosvm();
        assert_clean_failure("a file without execute permission", &run);
        assert!(run.stdout.is_empty(), "it ran");
        assert!(
            run.stderr_text().contains("Permission denied"),
            "{}",
            run.stderr_text()
        );
    }
}

#[test]
fn too_little_guest_memory() {
    require_kvm!();
    let run = Case::image("glibc-static", "memory")
        .arg("64")
        .mosvm_flag("--mem")
        .mosvm_flag("1M")
        .expect_status(None)
        .run_mosvm();
    assert_clean_failure("--mem 1M with a 64 MiB program", &run);
}

/// Sizes no program can run in, or the layout cannot hold, are refused before anything runs
/// with one line naming the problem: the program never starts (no output of its own).
#[test]
fn guest_memory_sizes_out_of_range_are_refused() {
    require_kvm!();
    for (size, says) in [
        ("1M", "too small"),
        ("0", "too small"),
        ("3M", "too small"),
        ("600G", "at most"),
        ("200T", "at most"),
        ("900T", "at most"),
        ("99999999999T", "too large"),
        ("abc", "bad size"),
    ] {
        let run = Case::image("glibc-static", "hello")
            .mosvm_flag("--mem")
            .mosvm_flag(size)
            .expect_status(None)
            .run_mosvm();
        let what = format!("--mem {size}");
        assert_clean_failure(&what, &run);
        assert!(run.stdout.is_empty(), "{what}: the program ran");
        assert!(
            run.stderr_text().contains(says),
            "{what}: {}",
            run.stderr_text()
        );
    }
}

#[test]
fn enough_guest_memory() {
    require_kvm!();
    // With --mem given and sufficient, the program runs as it does natively.
    Case::image("musl-static", "memory")
        .arg("96")
        .mosvm_flag("--mem")
        .mosvm_flag("512M")
        .check();
}

// ---------------------------------------------------------------- the VMM out of reach

/// A guest cannot open the VMM's memory (/proc/self/mem and pagemap of the process that runs
/// it, by any path) nor reopen the VMM's own pipes through /proc/PID/fd links: natively the
/// same program opens its own memory and finds no pipe but its own.
fn vmm_out_of_reach(variant: &str) {
    require_kvm!();
    let case = Case::image(variant, "reach");
    let native = case.run_native();
    assert!(
        native.stdout_text().contains("/proc/self/mem: opened"),
        "{}",
        native.stdout_text()
    );
    assert!(
        native.stdout_text().contains("foreign pipes reopened: 0"),
        "{}",
        native.stdout_text()
    );
    let guest = case.run_mosvm();
    let out = guest.stdout_text();
    assert_eq!(guest.status.code(), Some(0), "{}", guest.stderr_text());
    for path in [
        "/proc/self/mem",
        "/proc/thread-self/mem",
        "/proc/self/pagemap",
        "memlink",
    ] {
        assert!(
            out.contains(&format!("{path}: Permission denied")),
            "{path} must stay out of the guest's reach:\n{out}"
        );
    }
    assert!(out.contains("foreign pipes reopened: 0"), "{out}");
}

#[test]
fn vmm_out_of_reach_glibc_static() {
    vmm_out_of_reach(VARIANTS[0]);
}

#[test]
fn vmm_out_of_reach_musl_static() {
    vmm_out_of_reach(VARIANTS[1]);
}
