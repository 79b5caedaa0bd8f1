//! Everyday command lines, each started from the same bash command line natively and under
//! `mosvm run`: options after PROGRAM, descriptors the shell opened or closed, limits and
//! priority set before the program starts, `#!` scripts as PROGRAM, direct I/O. Stdout,
//! stderr, exit status and the files left behind must be identical.

#[macro_use]
mod common;

use common::{Case, VARIANTS};

/// Everything after PROGRAM is the program's, even what looks like mosvm's own options
/// (as with `env`, `nice`, `mosrun`).
#[test]
fn options_after_the_program_are_the_programs() {
    require_kvm!();
    Case::new("echo")
        .args([
            "--", "-n", "--stats", "--trace", "--mem", "1M", "-h", "--help", "x",
        ])
        .check();
    Case::new("sort")
        .args(["--stats", "-r", "in.txt"])
        .file("in.txt", "b\na\nc\n")
        .expect_status(Some(2))
        .check();
}

/// `touch -h` changes the link itself: the option reaches touch.
#[test]
fn touch_h_sets_a_links_own_time() {
    require_kvm!();
    Case::new("touch")
        .args(["-h", "-d", "@1234567890", "link"])
        .file("target", "x")
        .symlink("link", "target")
        .launched_by("CMD && stat -c '%n %Y' link && test $(stat -c %Y target) != 1234567890")
        .check();
}

/// SIGPIPE ignored by the shell stays ignored: `yes` then sees EPIPE and says so.
#[test]
fn an_ignored_sigpipe_stays_ignored() {
    require_kvm!();
    Case::new("yes")
        .launched_by("set -o pipefail; trap '' PIPE; CMD | head -n 2")
        .expect_status(Some(1))
        .check();
}

/// Descriptors the shell opened above 2 are the program's, under the same numbers, with
/// their offsets: bash process substitution (`/dev/fd/63`), `7<file` read after the shell
/// consumed its first line, `5>file` written by the program.
#[test]
fn descriptors_the_shell_opened_are_the_programs() {
    require_kvm!();
    Case::new("diff")
        .launched_by("exec CMD <(printf 'a\\nb\\n') <(printf 'a\\nc\\n')")
        .expect_status(Some(1))
        .check();
    Case::new("paste")
        .launched_by("exec CMD <(seq 3) <(seq 4 6)")
        .check();
    Case::new("sh")
        .args(["-c", "echo five >&5; cat <&7; cat /dev/fd/7"])
        .file("in.txt", "first\nsecond\nthird\n")
        .launched_by(
            "exec 7<in.txt; read -r line <&7; echo \"shell read $line\"; exec CMD 5>out.txt",
        )
        .check();
}

/// Standard descriptors the shell closed stay closed: EBADF on them, and the first open gets
/// the lowest free number, as natively.
#[test]
fn closed_standard_descriptors_stay_closed() {
    require_kvm!();
    for variant in VARIANTS {
        for closed in ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"] {
            Case::image(variant, "stdfds")
                .launched_by(&format!("exec CMD {closed}"))
                .check();
        }
    }
    Case::new("cat")
        .launched_by("exec CMD <&-")
        .expect_status(Some(1))
        .check();
    Case::new("echo")
        .arg("hi")
        .launched_by("exec CMD >&-")
        .expect_status(Some(1))
        .check();
}

/// The main thread's stack grows to the RLIMIT_STACK the program was started with, or raised
/// to later; past it the program dies of SIGSEGV. Also after an exec inside the guest.
#[test]
fn the_stack_grows_to_its_limit() {
    require_kvm!();
    for variant in VARIANTS {
        let case = || Case::image(variant, "stackgrow");
        case()
            .arg("300")
            .launched_by("ulimit -s unlimited; exec CMD")
            .check();
        case()
            .args(["48", "64"])
            .launched_by("ulimit -S -s 16384; exec CMD")
            .check();
        case().args(["32", "256"]).check();
        case()
            .arg("4")
            .launched_by("ulimit -s 1024; exec CMD")
            .expect_status(Some(139))
            .ignore_stderr()
            .check();
        // A limit lowered at run time holds.
        case()
            .args(["4", "2"])
            .expect_status(Some(139))
            .ignore_stderr()
            .check();
        // A mapping below the stack stops it: the recursion dies and the file is untouched.
        case()
            .args(["6", "-", "below"])
            .expect_status(Some(139))
            .ignore_stderr()
            .check();
    }
    // Raising a hard limit takes CAP_SYS_RESOURCE, not just euid 0 (EPERM without it).
    Case::new("bash")
        .args([
            "-c",
            "ulimit -s 100000; ulimit -s; ulimit -S -s 2048; ulimit -s; ulimit -H -s 8192",
        ])
        .launched_by("ulimit -s 4096; exec CMD")
        .expect_status(None)
        .check();
    // The limit at the exec inside the guest lays out the new program.
    let prog = common::image(VARIANTS[0], "stackgrow");
    Case::new("sh")
        .args([
            "-c",
            &format!("ulimit -s unlimited; exec {} 200", prog.display()),
        ])
        .check();
}

/// The priority the program was started with is its own.
#[test]
fn niceness_carries_over() {
    require_kvm!();
    Case::new("nice").launched_by("nice -n 7 CMD").check();
    Case::new("sh")
        .args(["-c", "nice; renice -n 3 -p $$ >/dev/null; nice"])
        .launched_by("nice -n 2 CMD")
        .check();
}

/// A `#!` script as PROGRAM starts its interpreter as the kernel does (binfmt_script).
#[test]
fn scripts_run_as_the_program() {
    require_kvm!();
    Case::new("./s.sh")
        .args(["one", "two words"])
        .file_mode(
            "s.sh",
            "#!/bin/sh -e\necho \"$0: $# args: $*\"\nexit 3\n",
            0o755,
        )
        .expect_status(Some(3))
        .check();
    Case::new("./s.py")
        .arg("x")
        .file_mode(
            "s.py",
            "#!/usr/bin/env python3\nimport sys\nprint(sys.argv)\n",
            0o755,
        )
        .check();
}

/// `dd` with O_DIRECT on both sides (the deputy's buffers aligned as the device needs).
#[test]
fn dd_with_direct_io() {
    require_kvm!();
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    Case::new("dd")
        .args([
            "if=in.bin",
            "of=out.bin",
            "bs=64k",
            "iflag=direct",
            "oflag=direct",
            "status=none",
        ])
        .file("in.bin", data)
        .check();
}

/// The program sees the RAM of a machine of `--mem` bytes: sysinfo(2) (glibc's
/// `_PHYS_PAGES`, `_AVPHYS_PAGES`) and `/proc/meminfo` (`free`) report that much, and no more
/// free than that.
#[test]
fn memory_figures_follow_mem() {
    require_kvm!();
    for (flag, bytes) in [("256M", 256u64 << 20), ("1G", 1 << 30)] {
        let run = Case::new("sh")
            .args([
                "-c",
                "getconf _PHYS_PAGES; getconf _AVPHYS_PAGES; getconf PAGESIZE; \
                 free -b | awk '/Mem:/{print $2; print $4}'",
            ])
            .mosvm_flag("--mem")
            .mosvm_flag(flag)
            .run_mosvm();
        assert_eq!(run.shell_status(), 0, "{}", run.stderr_text());
        let v: Vec<u64> = run
            .stdout_text()
            .lines()
            .map(|l| l.trim().parse().expect("a number"))
            .collect();
        let [phys, avail, page, total, free] = v[..] else {
            panic!("unexpected output: {}", run.stdout_text());
        };
        assert_eq!(phys * page, bytes, "sysinfo totalram under --mem {flag}");
        assert_eq!(total, bytes, "MemTotal under --mem {flag}");
        assert!(
            avail * page <= bytes && avail > 0,
            "{avail} pages free of {bytes}"
        );
        assert!(free <= bytes && free > 0, "MemFree {free} of {bytes}");
    }
}

/// CPU affinity asked of the process, of its thread by tid and of its parent, and
/// pthread_getattr_np in a thread (glibc asks the kernel by tid), as natively.
#[test]
fn affinity_of_threads_and_other_processes() {
    require_kvm!();
    for variant in VARIANTS {
        Case::image(variant, "affinity").check();
    }
}

/// Capabilities are the home process's: keeping them across a change of user ids
/// (PR_SET_KEEPCAPS, capset), the bounding set, securebits and the ambient set read as
/// natively, so `setpriv` can drop to another user.
#[test]
fn capabilities_and_dropping_privileges() {
    require_kvm!();
    Case::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "id",
        ])
        .expect_status(None)
        .check();
    Case::new("setpriv")
        .arg("--dump")
        .expect_status(None)
        .check();
}

/// getrandom(2) into memory the program has not touched yet (pages are faulted in as
/// copy_to_user does), into a buffer whose end is unmapped (what fits is copied), and into
/// unmapped memory (EFAULT).
#[test]
fn getrandom_into_fresh_and_partly_mapped_memory() {
    require_kvm!();
    let script = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.getrandom.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
libc.getrandom.restype = ctypes.c_ssize_t
print(len(os.urandom(1 << 20)))
p = libc.mmap(None, 3 << 20, 3, 0x22, -1, 0)
print(libc.getrandom(p, 3 << 20, 0))
libc.munmap(ctypes.c_void_p(p + 8192), ctypes.c_size_t(4096))
print(libc.getrandom(p + 4096, 8192, 0))
print(libc.getrandom(p + 8192, 100, 0), ctypes.get_errno())
"#;
    Case::new("/usr/bin/python3").args(["-c", script]).check();
}
