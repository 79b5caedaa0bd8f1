//! Every guest program in `images/`, in every build variant (static glibc, static musl,
//! dynamic glibc; plus static-PIE hello), run natively and under `mosvm run`: stdout,
//! stderr, exit status and the files left behind must be identical.

#[macro_use]
mod common;

use common::{Case, VARIANTS};

/// Standard input for stdin_filter: many lines of varying length, some long, some empty,
/// some bytes outside ASCII, and a last line without a newline.
fn filter_input() -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..3000u32 {
        let len = (i * 37 % 113) as usize;
        for j in 0..len {
            v.push(b" abcdefghijklmnopqrstuvwxyz0123456789\t"[(i as usize + j) % 38]);
        }
        if i % 500 == 7 {
            v.extend(std::iter::repeat_n(b'q', 70_000));
        }
        if i % 97 == 0 {
            v.extend_from_slice("h\u{e9}llo w\u{f6}rld \u{2603}".as_bytes());
        }
        v.push(b'\n');
    }
    v.extend_from_slice(b"no newline at the end");
    v
}

/// Defines one test per build variant for an image; `$setup` turns the default case for
/// that image into the one to run.
macro_rules! image_tests {
    ($name:ident, $setup:expr) => {
        mod $name {
            use super::*;

            fn run(variant: &str) {
                require_kvm!();
                let case = Case::image(variant, stringify!($name));
                let setup: fn(Case) -> Case = $setup;
                setup(case).check();
            }

            #[test]
            fn glibc_static() {
                run(VARIANTS[0]);
            }

            #[test]
            fn musl_static() {
                run(VARIANTS[1]);
            }

            #[test]
            fn dynamic() {
                run(VARIANTS[2]);
            }
        }
    };
}

image_tests!(hello, |c| c);

image_tests!(echo_args, |c| c
    .args([
        "first",
        "with space",
        "",
        "\u{fc}n\u{ef}c\u{f6}d\u{e9}",
        "--flag",
        "-x",
        "a=b"
    ])
    .env("MOSVM_TEST_VAR", "some value")
    .env("EMPTY", "")
    .env("ZZZ_LAST", "=starts with equals"));

image_tests!(files, |c| c);

image_tests!(compute, |c| c.arg("20000000"));

image_tests!(memory, |c| c.arg("128"));

image_tests!(timesleep, |c| c);

// Every clock id through libc (the vDSO) and through the system call, side by side.
// (A child dying of SIGSEGV in the vDSO, as natively, draws mosvm's report on stderr.)
image_tests!(clocks, |c| c.arg("check").ignore_stderr());

image_tests!(stdin_filter, |c| c.stdin(filter_input()));

image_tests!(syscall_loop, |c| c.arg("20000"));

image_tests!(exit_code, |c| c.arg("42").expect_status(Some(42)));

image_tests!(fpu, |c| c);

// Buffers, lengths and nested pointers (iovecs, msghdr with SCM_RIGHTS, pselect6's sigset
// pack, pollfd, socklen_t), good and wild, and a single 200 MiB read and write of a file.
image_tests!(marshal, |c| c.arg("200"));

// Flags, ranges and limits checked and enforced as Linux does (getrandom, msync, mlock,
// sigaltstack, sigprocmask, prctl, RLIMIT_NOFILE on descriptor numbers, dup3's order); a
// blocked signal stays pending until unblocked, then ends the program (SIGUSR1: 138).
image_tests!(checks, |c| c
    .expect_status(Some(128 + libc::SIGUSR1))
    .ignore_stderr());

// The process's own /proc: cmdline and environ from its memory, comm after PR_SET_NAME,
// status/stat/statm/limits/maps, fd/ and fdinfo/N.
image_tests!(procself, |c| c.args(["alpha", "beta", "gamma delta"]));

// File-backed and shared memory: shared mappings are the page cache (coherent with
// read/write/ftruncate, written back by msync and munmap, two mappings see each other),
// private ones copy-on-write (DONTNEED brings the file back), PROT_NONE then mprotect and
// mremap growth show the file, memfd, Linux's errno for what it refuses, /proc/self/maps
// naming the file.
image_tests!(filemap, |c| c);

// Page protections enforced on the guest's own accesses without faulting: PROT_NONE keeps
// contents, a W^X flip loop, munmap then mmap reads zero, a 1 TiB reservation opened in
// pieces.
image_tests!(protect, |c| c);

// SysV shared memory (two attachments, nattch, shmdt, RMID while attached), semaphores
// (semop, semtimedop, SETVAL, SETALL/GETALL, IPC_STAT), message queues (typed, E2BIG,
// MSG_NOERROR, ENOMSG) and POSIX named semaphores over /dev/shm.
image_tests!(sysvipc, |c| c);

/// Thousands of protection flips in 16 MiB of guest memory: taking rights away copies page
/// tables into fresh frames, and when those run out the tables are rebuilt from free ones
/// (after KVM drops its cached translations); contents and mappings survive.
#[test]
fn protection_flips_outlast_guest_memory() {
    require_kvm!();
    for v in VARIANTS {
        Case::image(v, "protect")
            .mosvm_flag("--mem")
            .mosvm_flag("16M")
            .check();
    }
}

// Priority-inheritance futex operations (LOCK_PI, TRYLOCK_PI, UNLOCK_PI, an owner that died)
// and get_robust_list, in one thread; PI and robust mutexes through the C library.
image_tests!(futexpi, |c| c);

// Signal handlers: frames, masks, sigaltstack, faults recovered with siglongjmp, timers,
// SA_RESTART against EINTR, sigtimedwait, sigqueue, SIGPIPE.
image_tests!(sighandlers, |c| c);
// Threads: mutexes, condition variables, barriers, rwlocks, semaphores, TLS, 64 threads,
// PI and robust mutexes, a thread blocked in a pipe read, signals to a thread and to the
// process, cancellation, fork and posix_spawn from a thread, execve from a thread after the
// first one exited.
image_tests!(threads, |c| c);
// Thread cases found by review: forks by a thread during munmaps, stores into unmapped memory,
// a sigwait thread, process signals taken by the first thread, sem_post from a handler.
image_tests!(threadcases, |c| c);
// signalfd: records, readiness through poll and epoll, SIGCHLD's status, blocking reads.
image_tests!(signalfd, |c| c);

// execve: errno for what cannot run, a `#!` script, descriptors and signal state across
// exec, and a chain on through /bin/sh whose exit status is the process's.
image_tests!(execchain, |c| c.expect_status(Some(42)));

// fork, wait statuses, SIGCHLD and waitid, kill between processes and process groups, exec
// chains through /bin/sh, vfork, posix_spawn, copy-on-write memory, inherited descriptors
// and cwd. (mosvm names a child's fatal fault on stderr, where natively the shell would.)
image_tests!(forkwait, |c| c.ignore_stderr());

/// Accesses Linux refuses kill the process with SIGSEGV (or SIGBUS past the end of a mapped
/// file) at the same point as natively.
#[test]
fn protection_faults_as_natively() {
    require_kvm!();
    for v in VARIANTS {
        for mode in [
            "ro-store",
            "none-read",
            "unmapped-read",
            "guard",
            "file-ro-store",
            "brk-shrunk",
            "hole",
        ] {
            Case::image(v, "protect")
                .arg(mode)
                .expect_status(Some(128 + libc::SIGSEGV))
                .ignore_stderr()
                .check();
        }
        Case::image(v, "filemap")
            .arg("sigbus")
            .expect_status(Some(128 + libc::SIGBUS))
            .ignore_stderr()
            .check();
    }
}

// segfault runs in every variant in tests/faults.rs (mosvm reports the fault on stderr).

#[test]
fn hello_static_pie() {
    require_kvm!();
    Case::image("glibc-static-pie", "hello").check();
}

#[test]
fn stdin_filter_empty_input() {
    require_kvm!();
    Case::image("glibc-static", "stdin_filter").check();
}

#[test]
fn echo_args_no_arguments() {
    require_kvm!();
    let (native, _) = Case::image("musl-static", "echo_args").check();
    assert!(native.stdout_text().contains("argc=1\n"));
}

#[test]
fn program_found_on_path() {
    require_kvm!();
    // A bare name is looked up on PATH by both runs; argv[0] stays "busybox".
    Case::new("busybox")
        .args(["echo", "found", "on", "PATH"])
        .check();
}

#[test]
fn relative_program_path() {
    require_kvm!();
    // PROGRAM given relative to the cwd: argv[0] and AT_EXECFN keep it as given.
    let bytes = std::fs::read(common::image("dynamic", "echo_args")).unwrap();
    let (native, _) = Case::new("./echo_args")
        .file_mode("echo_args", bytes, 0o755)
        .arg("x")
        .check();
    assert!(native.stdout_text().contains("argv[0]=[./echo_args]"));
}

#[test]
fn many_arguments_and_large_environment() {
    require_kvm!();
    let args: Vec<String> = (0..2000)
        .map(|i| format!("arg-{i}-{}", "z".repeat(i % 50)))
        .collect();
    let mut case = Case::image("glibc-static", "echo_args").args(&args);
    for i in 0..200 {
        case = case.env(&format!("VAR_{i:03}"), &"v".repeat(i * 3));
    }
    case.env("BIG", &"B".repeat(100_000)).check();
}

#[test]
fn memory_default_size() {
    require_kvm!();
    // The image's default: 256 MiB through malloc, mmap, realloc and calloc.
    Case::image("glibc-static", "memory").check();
}

#[test]
fn trace_flag_keeps_program_output() {
    require_kvm!();
    // --trace may write to stderr; stdout, status and files must not change.
    Case::image("musl-static", "files")
        .mosvm_flag("--trace")
        .ignore_stderr()
        .check();
}

#[test]
fn lock_flag_runs_standalone() {
    require_kvm!();
    Case::image("dynamic", "stdin_filter")
        .mosvm_flag("--lock")
        .stdin("locked to its home node\n")
        .check();
}

/// A POSIX named semaphore shared between the guest and a native process: the guest's
/// sem_wait/sem_timedwait sleep in the host's futex on the shared page, so a native
/// sem_post wakes them, and the guest's sem_post wakes a native waiter. Each pairing must
/// print what a pairing of two native processes prints.
#[test]
fn named_semaphores_work_between_guest_and_native_processes() {
    require_kvm!();
    use std::process::{Command, Stdio};
    // Start the waiter, let it block, run the poster; both outputs and statuses.
    let pair = |mut waiter: Command, mut poster: Command| {
        let w = waiter
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the waiter");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let p = poster
            .stdout(Stdio::piped())
            .output()
            .expect("run the poster");
        let w = w.wait_with_output().expect("waiter");
        (
            String::from_utf8_lossy(&w.stdout).into_owned(),
            w.status.code(),
            String::from_utf8_lossy(&p.stdout).into_owned(),
            p.status.code(),
        )
    };
    for v in VARIANTS {
        let prog = common::image(v, "psem");
        let native = |mode: &str, name: &str| {
            let mut c = Command::new(&prog);
            c.args([mode, name]);
            c
        };
        let guest = |mode: &str, name: &str| {
            let mut c = Command::new(common::mosvm_bin());
            c.arg("run").arg(&prog).args([mode, name]);
            c
        };
        let name = |i: u32| format!("/mosvm-test-psem-{}-{i}", std::process::id());
        let want = pair(native("wait", &name(0)), native("post", &name(0)));
        for (what, waiter, poster) in [
            (
                "guest sem_wait, native post",
                guest("wait", &name(1)),
                native("post", &name(1)),
            ),
            (
                "guest sem_timedwait, native post",
                guest("timed", &name(2)),
                native("post", &name(2)),
            ),
            (
                "native sem_wait, guest post",
                native("wait", &name(3)),
                guest("post", &name(3)),
            ),
        ] {
            assert_eq!(pair(waiter, poster), want, "{v}: {what}");
        }
    }
}
