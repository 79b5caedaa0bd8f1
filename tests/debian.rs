//! Real programs that Debian ships and nobody here wrote, run natively and under
//! `mosvm run`: busybox applets (static), coreutils ls and sha256sum, gzip and python3
//! (dynamic). Inputs come on stdin and as files created in the run's directory before
//! both runs, identically.

#[macro_use]
mod common;

use common::Case;

const BUSYBOX: &str = "/bin/busybox";
const PYTHON: &str = "/usr/bin/python3";

/// A few hundred lines of text with words, numbers and repeated keys, for sort/wc/awk...
fn text() -> String {
    let words = [
        "kernel", "deputy", "remote", "migrate", "balance", "memory", "foo", "bar", "node",
        "cluster", "page", "vcpu",
    ];
    let mut s = String::new();
    for i in 0..400u32 {
        let w = words[(i * 7 % 12) as usize];
        let v = words[(i * 5 % 12) as usize];
        s.push_str(&format!(
            "{w} {} {v} foo line{}\n",
            (i * 7919) % 1000,
            i % 13
        ));
    }
    s
}

/// Binary-ish bytes: every byte value, then a longer pseudo-random run.
fn binary() -> Vec<u8> {
    let mut v: Vec<u8> = (0..=255u8).collect();
    let mut x: u32 = 2463534242;
    for _ in 0..5000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    v
}

fn busybox(args: &[&str]) -> Case {
    Case::new(BUSYBOX)
        .args(args)
        .file("input.txt", text())
        .file("data.bin", binary())
        .stdin(text())
}

macro_rules! busybox_test {
    ($name:ident, [$($arg:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            require_kvm!();
            busybox(&[$($arg),*]).check();
        }
    };
}

busybox_test!(
    busybox_sha256sum_file,
    ["sha256sum", "input.txt", "data.bin"]
);
busybox_test!(busybox_sha256sum_stdin, ["sha256sum"]);
busybox_test!(busybox_md5sum, ["md5sum", "input.txt", "-"]);
busybox_test!(busybox_sort_stdin, ["sort"]);
busybox_test!(
    busybox_sort_numeric_file,
    ["sort", "-k2,2n", "-k1,1r", "input.txt"]
);
busybox_test!(busybox_wc_stdin, ["wc"]);
busybox_test!(
    busybox_wc_files,
    ["wc", "-l", "-c", "input.txt", "data.bin"]
);
busybox_test!(busybox_od, ["od", "-A", "x", "-t", "x1", "data.bin"]);
busybox_test!(busybox_od_chars, ["od", "-A", "d", "-c", "input.txt"]);
busybox_test!(busybox_cat, ["cat", "input.txt", "-", "data.bin"]);
busybox_test!(busybox_head, ["head", "-n", "7", "input.txt"]);
busybox_test!(busybox_tr, ["tr", "a-z", "A-Z"]);
busybox_test!(busybox_sed, ["sed", "-e", "s/foo/BAR/g", "-e", "/line3$/d"]);
busybox_test!(
    busybox_sed_in_place,
    ["sed", "-i", "s/kernel/KERNEL/", "input.txt"]
);
busybox_test!(
    busybox_awk,
    [
        "awk",
        "{ s += $2; n[$1]++ } END { for (k in n) c++; printf \"%d %d %d\\n\", NR, s, c }"
    ]
);

#[test]
fn busybox_large_stdin_and_file() {
    require_kvm!();
    // Several MiB through stdin and through a file: many large forwarded reads.
    let big: Vec<u8> = binary().repeat(1600);
    Case::new(BUSYBOX)
        .args(["md5sum", "-", "big.bin"])
        .file("big.bin", big.clone())
        .stdin(big)
        .check();
}

#[test]
fn busybox_file_operations() {
    require_kvm!();
    // Each applet is its own run; together they leave a small tree behind.
    for args in [
        &["mkdir", "-p", "a/b/c"][..],
        &["cp", "input.txt", "copy.txt"][..],
        &["mv", "data.bin", "moved.bin"][..],
        &["ln", "-s", "input.txt", "link"][..],
        &["rm", "-r", "sub"][..],
        &["touch", "-d", "2001-09-09 01:46:40", "new-file"][..],
        &["ls", "-1a", "sub"][..],
        &["stat", "-c", "%n %s %F %a", "input.txt", "sub", "sub/x"][..],
        &["find", ".", "-type", "f"][..],
        &["readlink", "sub/link-to-x"][..],
    ] {
        busybox(args)
            .file("sub/x", "x\n")
            .symlink("sub/link-to-x", "x")
            .check();
    }
}

#[test]
fn busybox_exit_status_nonzero() {
    require_kvm!();
    // grep exits 1 when nothing matches; cat of a missing file prints an error and exits 1.
    busybox(&["grep", "no such word", "input.txt"])
        .expect_status(Some(1))
        .check();
    busybox(&["cat", "missing-file"])
        .expect_status(Some(1))
        .check();
}

#[test]
fn ls_long_listing() {
    require_kvm!();
    let (native, _) = Case::new("/bin/ls")
        .args(["-la", "--time-style=+", "data"])
        .file("data/one.txt", "one\n")
        .file("data/two.txt", "two two\n")
        .file_mode("data/script.sh", "#!/bin/sh\necho hi\n", 0o755)
        .file_mode("data/private", "p", 0o600)
        .dir("data/subdir")
        .symlink("data/link", "one.txt")
        .check();
    assert!(native.stdout_text().contains("one.txt"));
}

#[test]
fn ls_one_per_line() {
    require_kvm!();
    Case::new("/bin/ls")
        .args(["-1RF"])
        .file("b", "")
        .file("a/c", "")
        .dir("d/e")
        .check();
}

#[test]
fn coreutils_sha256sum() {
    require_kvm!();
    Case::new("/usr/bin/sha256sum")
        .args(["input.txt", "data.bin", "-"])
        .file("input.txt", text())
        .file("data.bin", binary())
        .stdin(binary())
        .check();
}

#[test]
fn gzip_to_stdout() {
    require_kvm!();
    let (native, _) = Case::new("/bin/gzip")
        .args(["-c", "input.txt"])
        .file("input.txt", text().repeat(20))
        .check();
    assert!(native.stdout.starts_with(&[0x1f, 0x8b]), "not gzip output");
}

#[test]
fn gzip_in_place() {
    require_kvm!();
    let (native, _) = Case::new("/bin/gzip")
        .args(["-9", "input.txt", "data.bin"])
        .file("input.txt", text().repeat(20))
        .file("data.bin", binary())
        .check();
    assert!(native.tree.keys().any(|p| p.ends_with("input.txt.gz")));
}

#[test]
fn gunzip_round_trip() {
    require_kvm!();
    Case::new("/bin/gzip")
        .args(["-d", "-c"])
        .stdin(gzip_native(&text()))
        .check();
}

/// Compresses `text` with the system gzip, natively, for a decompression input.
fn gzip_native(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("/bin/gzip")
        .args(["-c", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run gzip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("gzip output");
    assert!(out.status.success());
    out.stdout
}

/// A small tree of inputs for the archivers and tree walkers.
fn with_tree(case: Case) -> Case {
    case.file("data/a.txt", text())
        .file("data/b/c.bin", binary())
        .file_mode("data/b/run.sh", "#!/bin/sh\n", 0o755)
        .file("data/empty", "")
        .symlink("data/link", "a.txt")
        .dir("data/d/e")
}

#[test]
fn tar_create() {
    require_kvm!();
    let (native, _) = with_tree(Case::new("/bin/tar"))
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@1000000000",
            "-cvf",
            "out.tar",
            "data",
        ])
        .check();
    assert!(native.tree.keys().any(|p| p.ends_with("out.tar")));
}

#[test]
fn tar_extract() {
    require_kvm!();
    // The archive is made natively, once; both runs extract it.
    let src = tempfile::tempdir().unwrap();
    let archive = src.path().join("in.tar");
    let prepared = with_tree(Case::new("/bin/true")).prepare_dir();
    let ok = std::process::Command::new("/bin/tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(prepared.path())
        .arg("data")
        .status()
        .expect("run tar");
    assert!(ok.success());
    Case::new("/bin/tar")
        .args(["-xvf", "in.tar"])
        .file("in.tar", std::fs::read(&archive).unwrap())
        .check();
}

#[test]
fn find_printf() {
    require_kvm!();
    with_tree(Case::new("/usr/bin/find"))
        .args(["data", "-printf", "%p %y %s %m\\n"])
        .check();
}

#[test]
fn diff_unified() {
    require_kvm!();
    // diff exits 1 when the files differ.
    with_tree(Case::new("/usr/bin/diff"))
        .args(["-u", "data/a.txt", "other.txt"])
        .file("other.txt", text().replace("foo", "fo0"))
        .expect_status(Some(1))
        .check();
}

#[test]
fn coreutils_sort_and_cp() {
    require_kvm!();
    Case::new("/usr/bin/sort")
        .args(["--parallel=1", "-k3,3", "-k2,2n", "-o", "sorted.txt", "-"])
        .stdin(text())
        .check();
    with_tree(Case::new("/usr/bin/cp"))
        .args(["-a", "data", "copy"])
        .check();
}

#[test]
fn perl_program() {
    require_kvm!();
    Case::new("/usr/bin/perl")
        .args([
            "-e",
            r#"my %h; while (<STDIN>) { my @f = split; $h{$f[0]} += $f[1]; }
               printf "%-10s %6d\n", $_, $h{$_} for sort keys %h;
               open(my $o, '>', 'perl-out.txt') or die; print $o join(',', map { $_ * 2 } 1..20), "\n"; close $o;
               printf "%.6f %s\n", atan2(1, 1) * 4, scalar reverse 'mosvm';"#,
        ])
        .env("PERL_HASH_SEED", "0")
        .stdin(text())
        .check();
}

const PY_PROGRAM: &str = r#"
import json, os, hashlib
d = {"alpha": 1, "beta": 2.5, "gamma": [1, 2, 3]}
d["delta"] = sum(i * i for i in range(10000))
print(2 ** 100, 7 / 3, 10 // 3, -7 % 3, round(2.675, 2), 1e308 * 10)
print("{:>8}|{:<6}|{:^7}|{:08.3f}|{!r}".format("right", "left", "mid", 3.14159, "q"))
print(f"{d['delta']:,} {len(d)} {sorted(d)}")
print(json.dumps(d, sort_keys=True))
with open("out.txt", "w") as f:
    for k, v in d.items():
        f.write(f"{k}={v}\n")
with open("out.txt") as f:
    print(f.read().upper(), end="")
os.mkdir("sub")
os.rename("out.txt", "sub/renamed.txt")
print(sorted(os.listdir(".")), os.path.getsize("sub/renamed.txt"))
print(hashlib.sha256(open("sub/renamed.txt", "rb").read()).hexdigest())
import sys; print(sys.argv, sys.stdin.read().count("\n"))
"#;

#[test]
fn python_program() {
    require_kvm!();
    Case::new(PYTHON)
        .args(["-c", PY_PROGRAM, "arg1", "arg two"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(text())
        .check();
}

#[test]
fn python_json_tool() {
    require_kvm!();
    Case::new(PYTHON)
        .args(["-m", "json.tool", "--sort-keys", "in.json", "out.json"])
        .file(
            "in.json",
            r#"{"z": [1, 2.5, null, true], "a": {"nested": "\u00e9t\u00e9"}}"#,
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .check();
}

#[test]
fn python_pass() {
    require_kvm!();
    Case::new(PYTHON)
        .args(["-c", "pass"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .check();
}

#[test]
fn python_exception_exit_status() {
    require_kvm!();
    // An uncaught exception: traceback on stderr, exit status 1.
    Case::new(PYTHON)
        .args(["-c", "print('before'); import sys; sys.stdout.flush(); 1/0"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .expect_status(Some(1))
        .check();
}

const PY_MMAP: &str = r#"
import mmap, os
with open("m.bin", "w+b") as f:
    f.write(b"x" * 8192)
    f.flush()
    m = mmap.mmap(f.fileno(), 8192)
    m[0:5] = b"hello"
    m.flush()
    print(open("m.bin", "rb").read(6))
    f.seek(8000); f.write(b"via write"); f.flush()
    print(m[8000:8009], m.find(b"via"))
    m.resize(12288)
    m[12000:12004] = b"tail"
    print(os.path.getsize("m.bin"), open("m.bin", "rb").read()[12000:12004])
    ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cp = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cp[0:5] = b"COPY!"
    print(ro[0:5], cp[0:5], open("m.bin", "rb").read(5))
    try:
        ro[0:1] = b"z"
    except TypeError as e:
        print("read-only:", e)
    m.close(); ro.close(); cp.close()
anon = mmap.mmap(-1, 1 << 20)
anon.write(b"anonymous")
print(anon[:9], len(anon))
"#;

/// Python's mmap module over a file: shared stores reach the file, write() is seen through
/// the mapping, resize, ACCESS_READ and ACCESS_COPY, and an anonymous map.
#[test]
fn python_mmap_module() {
    require_kvm!();
    Case::new(PYTHON)
        .args(["-c", PY_MMAP])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .check();
}

const PY_WAL: &str = r#"
import sqlite3
a = sqlite3.connect("w.db")
print(a.execute("pragma journal_mode=wal").fetchone())
a.execute("create table t(k integer primary key, v text)")
a.commit()
b = sqlite3.connect("w.db")
for i in range(300):
    a.execute("insert into t(v) values (?)", ("row%d" % i,))
    if i % 50 == 49:
        a.commit()
        print("reader sees", b.execute("select count(*) from t").fetchone()[0])
b.execute("begin")
print("snapshot", b.execute("select count(*) from t").fetchone()[0])
a.execute("insert into t(v) values ('late')"); a.commit()
print("snapshot still", b.execute("select count(*) from t").fetchone()[0])
b.execute("commit")
print("after", b.execute("select count(*) from t").fetchone()[0])
print(a.execute("pragma wal_checkpoint(truncate)").fetchone())
b.close(); a.close()
"#;

/// SQLite in WAL mode (its -shm file is a writable shared mapping): a second connection
/// reads while the first writes, keeps its snapshot inside a transaction, and the database
/// left behind is byte-identical to native.
#[test]
fn python_sqlite_wal_two_connections() {
    require_kvm!();
    Case::new(PYTHON)
        .args(["-c", PY_WAL])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .check();
}

/// The sqlite3 shell under mosvm writes a WAL-mode database while a native sqlite3 reads it
/// over and over: both share the -shm index through the host's page cache, every count the
/// reader sees is a committed one, and it never sees a damaged database.
#[test]
fn sqlite3_wal_writer_beside_a_native_reader() {
    require_kvm!();
    let sqlite = "/usr/bin/sqlite3";
    assert!(
        std::path::Path::new(sqlite).exists(),
        "{sqlite} is missing (apt-get install sqlite3; .ci/run installs it)"
    );
    let mut script =
        String::from("pragma journal_mode=wal;\ncreate table t(k integer primary key, v text);\n");
    for batch in 0..200 {
        script += "begin;\n";
        for i in 0..50 {
            script += &format!("insert into t(v) values ('b{batch} r{i}');\n");
        }
        script += "commit;\n";
    }
    script += "select count(*) from t;\n";
    Case::new(sqlite)
        .arg("w.db")
        .stdin(script)
        .check_while(|run| {
            let db = run.dir().join("w.db");
            let t = std::time::Instant::now();
            let mut seen = Vec::new();
            while matches!(run.child.try_wait(), Ok(None))
                && t.elapsed() < std::time::Duration::from_secs(60)
            {
                if db.exists() {
                    let out = std::process::Command::new(sqlite)
                        .arg(&db)
                        .arg("select count(*) from t;")
                        .output()
                        .expect("run sqlite3");
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        !err.contains("malformed") && !err.contains("disk I/O"),
                        "the native reader saw: {err}"
                    );
                    if let Ok(n) = String::from_utf8_lossy(&out.stdout).trim().parse::<u64>() {
                        assert_eq!(n % 50, 0, "a count inside a transaction: {n}");
                        seen.push(n);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(
                seen.windows(2).all(|w| w[0] <= w[1]),
                "counts went backwards: {seen:?}"
            );
            eprintln!("the native reader saw {} counts: {seen:?}", seen.len());
        });
}
