//! Differential test harness: run a program natively and under `mosvm run`, each in a fresh
//! empty temporary directory with the same argv, environment and stdin, and compare what a
//! user would see: stdout, stderr, exit status and the files left behind.
//!
//! - [`Case`] describes one run (program, args, stdin, files to create first, extra env,
//!   `mosvm run` flags); [`Case::check`] runs it both ways and panics with a readable diff when
//!   the two differ.
//! - [`Case::run_native`] / [`Case::run_mosvm`] run one side only, for tests that need their
//!   own assertions (faults, bad input).
//! - [`image`] gives the path of a guest program built from `images/` (building them once
//!   per test process, serialised across processes by a lock file).
//! - [`Case::spawn_mosvm`] starts the `mosvm run` side and hands back a [`Running`] program,
//!   and [`Case::check_while`] does the whole comparison with something done to the program
//!   while it runs (migrating it): the multi-node tests' way of comparing with native.
//! - [`kvm_ready`] tells whether the KVM tests can run; without KVM it panics, unless
//!   `MOSVM_SKIP_KVM=1`, in which case it prints a note and the test returns early.
//! - The `mosvm` binary is the one Cargo built for these tests, or `MOSVM_BIN` if set.
//! - [`cluster`]: node services (on loopback or each in a network namespace of its own) and
//!   the client commands that drive them, for the multi-node tests and benchmarks.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod cluster;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// The variants every image is built in (directories under `images/out`).
pub const VARIANTS: [&str; 3] = ["glibc-static", "musl-static", "dynamic"];

/// How long one run may take before it is killed and the test fails. Generous (the longest
/// case takes about a second natively, and the machine is small and shared): this only
/// catches hangs, it is not a performance check.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How much less CPU than it asks for this process gets now, as a factor ≥ 1 (at most 8): a
/// busy loop of about 30 ms is timed in wall-clock and in thread CPU time, once per test
/// process. On a quiet machine the two agree (1); with the cores shared by twice as many
/// busy processes the wall clock runs about twice as far. Deadlines in tests are scaled by it
/// ([`scaled`]), so a loaded machine gets more time, measured rather than guessed.
pub fn slowness() -> f64 {
    static S: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *S.get_or_init(|| {
        let cpu = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime fills the timespec it is given.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        };
        let (wall0, cpu0) = (Instant::now(), cpu());
        let mut x = 1u64;
        while cpu() - cpu0 < Duration::from_millis(30) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let ratio = wall0.elapsed().as_secs_f64() / (cpu() - cpu0).as_secs_f64();
        let s = ratio.clamp(1.0, 8.0);
        if s > 1.2 {
            eprintln!("tests: this machine is loaded; deadlines scaled by {s:.1}");
        }
        s
    })
}

/// `d` scaled by [`slowness`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(slowness())
}

/// Modification time given to every file a case creates before its runs, so that programs
/// that record it (gzip, ls) see the same value in both runs.
pub const FIXED_MTIME: u64 = 1_000_000_000;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `mosvm` binary under test: `MOSVM_BIN` if set, else the one Cargo built.
pub fn mosvm_bin() -> PathBuf {
    match std::env::var_os("MOSVM_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_mosvm")),
    }
}

/// Whether the tests that need KVM may run. Panics with a clear message when `/dev/kvm`
/// cannot be opened, unless `MOSVM_SKIP_KVM=1`, in which case it prints a note and returns
/// false (the caller then returns early).
pub fn kvm_ready(test: &str) -> bool {
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))
    });
    match state {
        Ok(()) => true,
        Err(why) if std::env::var("MOSVM_SKIP_KVM").as_deref() == Ok("1") => {
            // Written straight to stderr (not eprintln!, which the test harness captures),
            // once per test binary.
            static NOTE: Once = Once::new();
            NOTE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "note: MOSVM_SKIP_KVM=1 and {why}: skipping the KVM tests of this binary \
                     (first: {test})"
                );
            });
            false
        }
        Err(why) => panic!(
            "KVM is not usable: {why}. mosvm runs every program in a KVM micro-VM, so this \
             test cannot run. Enable KVM (load kvm_intel/kvm_amd, make /dev/kvm accessible) \
             or set MOSVM_SKIP_KVM=1 to skip the KVM tests explicitly."
        ),
    }
}

/// Returns early from a test when KVM tests are being skipped (see [`kvm_ready`]).
/// Test files declare `#[macro_use] mod common;` to use it.
macro_rules! require_kvm {
    () => {
        if !$crate::common::kvm_ready(module_path!()) {
            return;
        }
    };
}

/// Builds the guest programs (`make -C images`) once per test process; concurrent test
/// processes are serialised by an flock on a lock file in Cargo's target tmp dir.
pub fn build_images() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let lock_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mosvm-images.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap_or_else(|e| panic!("cannot open lock file {}: {e}", lock_path.display()));
        // SAFETY: flock on a file descriptor we own for the whole call; no memory involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
        let images = repo_root().join("images");
        let out = Command::new("make")
            .arg("-C")
            .arg(&images)
            .arg("-j2")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run make (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "`make -C {}` failed ({}); the images need gcc, musl-gcc (musl-tools) and make.\n\
             --- stdout ---\n{}\n--- stderr ---\n{}",
            images.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        drop(lock); // closing the descriptor releases the lock
    });
}

/// Path of a built guest program: `images/out/VARIANT/NAME`.
pub fn image(variant: &str, name: &str) -> PathBuf {
    build_images();
    let p = repo_root().join("images/out").join(variant).join(name);
    assert!(p.is_file(), "image {} was not built", p.display());
    p
}

/// Status as a shell reports it: the exit code, or 128+N for death by signal N.
pub fn shell_status(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => panic!("exit status with neither code nor signal: {status:?}"),
    }
}

/// One entry of a directory snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File { mode: u32, contents: Vec<u8> },
    Dir { mode: u32 },
    Symlink { target: PathBuf },
    Other { kind: String },
}

/// Every entry under a directory, by relative path (the directory itself excluded).
pub type Tree = BTreeMap<PathBuf, Entry>;

pub fn snapshot(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.expect("read_dir entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.mode() & 0o7777;
            let ft = meta.file_type();
            let entry = if ft.is_symlink() {
                Entry::Symlink {
                    target: fs::read_link(&path).expect("readlink"),
                }
            } else if ft.is_dir() {
                walk(root, &path, out);
                Entry::Dir { mode }
            } else if ft.is_file() {
                Entry::File {
                    mode,
                    contents: fs::read(&path)
                        .unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
                }
            } else {
                Entry::Other {
                    kind: format!("{ft:?}"),
                }
            };
            out.insert(rel, entry);
        }
    }
    let mut tree = Tree::new();
    walk(root, root, &mut tree);
    tree
}

/// What one run produced.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Files left in the run's directory (inputs included).
    pub tree: Tree,
}

impl Run {
    pub fn shell_status(&self) -> i32 {
        shell_status(self.status)
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Something a case creates in its directory before each run.
#[derive(Clone, Debug)]
enum Setup {
    File { contents: Vec<u8>, mode: u32 },
    Dir,
    Symlink(PathBuf),
}

/// One program invocation, to be run natively and under `mosvm run`.
#[derive(Clone, Debug)]
pub struct Case {
    program: OsString,
    args: Vec<OsString>,
    stdin: Vec<u8>,
    setup: Vec<(PathBuf, Setup)>,
    stdin_by_hand: bool,
    env: BTreeMap<String, String>,
    mosvm_flags: Vec<OsString>,
    timeout: Duration,
    compare_stderr: bool,
    expect_status: Option<i32>,
    netns: Option<String>,
    own_group: bool,
    launcher: Option<String>,
}

impl Case {
    /// A case running `program` (a path, or a bare name looked up on PATH) with no
    /// arguments, empty stdin and the fixed environment: PATH, HOME, LANG=C, TZ=UTC.
    /// By default both runs must exit 0.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let env = [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("HOME", "/nonexistent-home"),
            ("LANG", "C"),
            ("TZ", "UTC"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Case {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            stdin: Vec::new(),
            stdin_by_hand: false,
            setup: Vec::new(),
            env,
            mosvm_flags: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            compare_stderr: true,
            expect_status: Some(0),
            netns: None,
            own_group: false,
            launcher: None,
        }
    }

    /// Start each run in a process group of its own, whose parent (the test) is outside it:
    /// a group that is not orphaned, so that SIGTSTP, SIGTTIN and SIGTTOU stop its processes
    /// (the kernel discards them in an orphaned group, as the test harness's may be).
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// Start the program from a bash command line: `line` with `CMD` where the program and
    /// its arguments go (natively, or `mosvm run ...` with them), so that both runs inherit
    /// the same limits, redirections and descriptors, e.g. `ulimit -s unlimited; exec CMD` or
    /// `exec CMD <(sort a) 7<b <&-`.
    pub fn launched_by(mut self, line: &str) -> Self {
        assert!(line.contains("CMD"), "a launcher line names CMD");
        self.launcher = Some(line.to_string());
        self
    }

    /// A case running a built guest program.
    pub fn image(variant: &str, name: &str) -> Self {
        Case::new(image(variant, name))
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = bytes.into();
        self
    }

    /// The `mosvm run` side's stdin is left open for the test to write, piece by piece, through
    /// [`Running::take_stdin`]; the native run still gets all of [`Case::stdin`] at once.
    pub fn stdin_by_hand(mut self) -> Self {
        self.stdin_by_hand = true;
        self
    }

    /// Creates a file (mode 0644) before each run; parent directories are created as needed.
    pub fn file(self, path: impl AsRef<Path>, contents: impl Into<Vec<u8>>) -> Self {
        self.file_mode(path, contents, 0o644)
    }

    pub fn file_mode(
        mut self,
        path: impl AsRef<Path>,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        self.setup.push((
            path.as_ref().to_owned(),
            Setup::File {
                contents: contents.into(),
                mode,
            },
        ));
        self
    }

    pub fn dir(mut self, path: impl AsRef<Path>) -> Self {
        self.setup.push((path.as_ref().to_owned(), Setup::Dir));
        self
    }

    pub fn symlink(mut self, path: impl AsRef<Path>, target: impl AsRef<Path>) -> Self {
        self.setup.push((
            path.as_ref().to_owned(),
            Setup::Symlink(target.as_ref().to_owned()),
        ));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// A flag for `mosvm run` (placed before PROGRAM); ignored by the native run.
    pub fn mosvm_flag(mut self, flag: impl AsRef<OsStr>) -> Self {
        self.mosvm_flags.push(flag.as_ref().to_owned());
        self
    }

    /// Run `mosvm run` inside network namespace `ns` (the home host's), with the same pid
    /// (`ip netns exec` execs it).
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Registers the `mosvm run` side with the node behind control socket `sock`, which is
    /// then its home node.
    pub fn socket(self, sock: impl AsRef<Path>) -> Self {
        self.mosvm_flag("--socket").mosvm_flag(sock.as_ref())
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Do not require identical stderr (e.g. when mosvm itself reports a fault).
    pub fn ignore_stderr(mut self) -> Self {
        self.compare_stderr = false;
        self
    }

    /// The shell status both runs must have (default 0); `None` accepts any, as long as
    /// both agree.
    pub fn expect_status(mut self, status: Option<i32>) -> Self {
        self.expect_status = status;
        self
    }

    /// One line naming the case, for failure messages.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        s.push_str(&self.program.to_string_lossy());
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                let _ = write!(s, " {a:?}");
            } else {
                let _ = write!(s, " {a}");
            }
        }
        if !self.mosvm_flags.is_empty() {
            let flags: Vec<String> = self.mosvm_flags.iter().map(|f| os(f)).collect();
            let _ = write!(s, " (mosvm flags: {})", flags.join(" "));
        }
        if let Some(line) = &self.launcher {
            s = line.replace("CMD", &s);
        }
        s
    }

    /// Creates a fresh directory holding this case's input files.
    pub fn prepare_dir(&self) -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("mosvm-test-")
            .tempdir()
            .expect("create temp dir");
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(FIXED_MTIME);
        for (rel, what) in &self.setup {
            assert!(
                rel.is_relative(),
                "setup path {} must be relative",
                rel.display()
            );
            let path = dir.path().join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("create parent dirs");
            }
            match what {
                Setup::File { contents, mode } => {
                    let f = fs::File::create(&path).expect("create input file");
                    (&f).write_all(contents).expect("write input file");
                    f.set_permissions(fs::Permissions::from_mode(*mode))
                        .expect("chmod input file");
                    f.set_modified(mtime).expect("set mtime");
                }
                Setup::Dir => fs::create_dir_all(&path).expect("create input dir"),
                Setup::Symlink(target) => {
                    std::os::unix::fs::symlink(target, &path).expect("create symlink")
                }
            }
        }
        dir
    }

    fn command(&self, under_mosvm: bool, cwd: &Path) -> Command {
        let mut cmd = if under_mosvm {
            let mut c = match &self.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(mosvm_bin());
                    c
                }
                None => Command::new(mosvm_bin()),
            };
            c.arg("run").args(&self.mosvm_flags).arg(&self.program);
            c
        } else {
            Command::new(&self.program)
        };
        cmd.args(&self.args);
        if let Some(line) = &self.launcher {
            let inner = cmd;
            cmd = Command::new("bash");
            cmd.arg("-c")
                .arg(line.replace("CMD", "\"$@\""))
                .arg("bash")
                .arg(inner.get_program())
                .args(inner.get_args());
        }
        cmd.env_clear()
            .envs(&self.env)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs natively in a fresh directory; `Err` if the program could not be started.
    pub fn try_run_native(&self) -> std::io::Result<Run> {
        Ok(self.spawn(false)?.finish())
    }

    /// Runs natively in a fresh directory.
    pub fn run_native(&self) -> Run {
        self.try_run_native()
            .unwrap_or_else(|e| panic!("cannot start {} natively: {e}", self.describe()))
    }

    /// Runs under `mosvm run` in a fresh directory.
    pub fn run_mosvm(&self) -> Run {
        self.spawn_mosvm().finish()
    }

    /// Starts the program under `mosvm run` in a fresh directory and returns at once.
    pub fn spawn_mosvm(&self) -> Running {
        self.spawn(true).unwrap_or_else(|e| {
            panic!(
                "cannot start {} (for {}): {e}",
                mosvm_bin().display(),
                self.describe()
            )
        })
    }

    fn spawn(&self, under_mosvm: bool) -> std::io::Result<Running> {
        let dir = self.prepare_dir();
        let started = Instant::now();
        let mut cmd = self.command(under_mosvm, dir.path());
        if self.own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        // A program file this test process just wrote can be held open for writing a moment
        // longer by a child another test thread is forking (until that child's exec closes
        // it): exec then fails with ETXTBSY. Try again.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        let writer = (!(under_mosvm && self.stdin_by_hand)).then(|| {
            let mut input = child.stdin.take();
            let stdin = self.stdin.clone();
            thread::spawn(move || {
                if let Some(pipe) = input.as_mut() {
                    // The program may exit without reading everything: ignore EPIPE.
                    let _ = pipe.write_all(&stdin);
                }
                drop(input);
            })
        });
        let out = Some(spawn_reader(child.stdout.take()));
        let err = Some(spawn_reader(child.stderr.take()));
        Ok(Running {
            child,
            dir,
            writer,
            out,
            err,
            timeout: scaled(self.timeout),
            deadline: started + scaled(self.timeout),
            what: format!(
                "{} {}",
                if under_mosvm { "mosvm run" } else { "native" },
                self.describe()
            ),
        })
    }

    /// Panics with a readable report unless the two runs agree and the native one exited as
    /// expected.
    fn assert_agree(&self, native: &Run, guest: &Run) {
        if let Some(report) = compare(native, guest, self.compare_stderr) {
            panic!(
                "mosvm run differs from the native run of {}\n{report}\n{}",
                self.describe(),
                stderr_report(native, guest)
            );
        }
        if let Some(expected) = self.expect_status {
            assert_eq!(
                native.shell_status(),
                expected,
                "the native run of {} itself exited with {} (expected {expected}): the case \
                 is broken, not mosvm\n{}",
                self.describe(),
                native.shell_status(),
                stderr_report(native, guest)
            );
        }
    }

    /// Like [`Case::check`], with `during` called on the `mosvm run` side while it runs
    /// (to migrate it, say); the comparison is made once both have finished. The native run
    /// goes alongside (started first, in its own directory), which halves the wall time of
    /// the long runs these tests need.
    pub fn check_while(&self, during: impl FnOnce(&mut Running)) -> (Run, Run) {
        let native = self
            .spawn(false)
            .unwrap_or_else(|e| panic!("cannot start {} natively: {e}", self.describe()));
        let mut running = self.spawn_mosvm();
        let during = std::panic::AssertUnwindSafe(|| during(&mut running));
        if let Err(e) = std::panic::catch_unwind(during) {
            self.failed_during(running, e);
        }
        let guest = running.finish();
        let native = native.finish();
        self.assert_agree(&native, &guest);
        (native, guest)
    }

    /// A test's actions on the `mosvm run` side failed (`e`, their panic): say how the
    /// program under mosvm ended, with what it printed on stderr.
    fn failed_during(&self, running: Running, e: Box<dyn std::any::Any + Send>) -> ! {
        let guest = running.finish();
        let why = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("(panic)");
        panic!(
            "{why}\nmosvm run of {} ended with status {}; its stderr:\n{}",
            self.describe(),
            guest.shell_status(),
            guest.stderr_text()
        );
    }

    /// Like [`Case::check_while`], with `during` called on each run in turn, the native one
    /// first (`under_mosvm` false), for what must be done to both alike (signals from
    /// outside, files the program waits for).
    pub fn check_each(&self, during: impl Fn(&mut Running, bool)) -> (Run, Run) {
        let mut native = self
            .spawn(false)
            .unwrap_or_else(|e| panic!("cannot start {} natively: {e}", self.describe()));
        during(&mut native, false);
        let native = native.finish();
        let mut running = self.spawn_mosvm();
        let during = std::panic::AssertUnwindSafe(|| during(&mut running, true));
        if let Err(e) = std::panic::catch_unwind(during) {
            self.failed_during(running, e);
        }
        let guest = running.finish();
        self.assert_agree(&native, &guest);
        (native, guest)
    }

    /// Runs natively and under mosvm and asserts that stdout, stderr (unless ignored), the
    /// exit status and the files left behind are identical, and that the status is the
    /// expected one. Returns both runs for further checks.
    pub fn check(&self) -> (Run, Run) {
        let native = self.run_native();
        let guest = self.run_mosvm();
        self.assert_agree(&native, &guest);
        (native, guest)
    }
}

/// A program started by a [`Case`], still running in its own fresh directory. Its stdout and
/// stderr are collected on threads from the start, so a program that prints steadily never
/// blocks on a full pipe however long the test takes to finish it. Killed if dropped
/// unfinished (a test failing half-way leaves nothing running).
pub struct Running {
    pub child: Child,
    dir: tempfile::TempDir,
    writer: Option<thread::JoinHandle<()>>,
    out: Option<thread::JoinHandle<Vec<u8>>>,
    err: Option<thread::JoinHandle<Vec<u8>>>,
    /// The case's timeout, counted from the start.
    timeout: Duration,
    deadline: Instant,
    what: String,
}

impl Running {
    /// The pid of `mosvm run` (the process's home pid), or of the native program.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its stdin, for a case made with [`Case::stdin_by_hand`].
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.child
            .stdin
            .take()
            .expect("stdin is written by hand only for a case made with stdin_by_hand()")
    }

    /// Waits for it to exit (killing it, and failing the test, once the case's timeout has
    /// passed since it started) and returns what it printed, its status and its files.
    pub fn finish(mut self) -> Run {
        // No more input: a program still reading its stdin sees the end of it.
        drop(self.child.stdin.take());
        let status = loop {
            match self.child.try_wait().expect("wait for child") {
                Some(status) => break Some(status),
                None if Instant::now() >= self.deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
                None => thread::sleep(Duration::from_millis(5)),
            }
        };
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        // Readers end when every holder of the pipes' write ends has exited.
        let join = |reader: Option<thread::JoinHandle<Vec<u8>>>| {
            reader.map_or_else(Vec::new, |r| r.join().expect("output reader"))
        };
        let stdout = join(self.out.take());
        let stderr = join(self.err.take());
        let Some(status) = status else {
            panic!(
                "{} did not finish within {:?}; killed.\n--- stdout so far ---\n{}\n\
                 --- stderr so far ---\n{}",
                self.what,
                self.timeout,
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        };
        let tree = snapshot(self.dir.path());
        Run {
            status,
            stdout,
            stderr,
            tree,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Reads from a child's stdout on a thread, line by line, so a test can wait (with a bound)
/// for a line the program prints when it is ready.
pub struct LineReader {
    rx: mpsc::Receiver<Vec<u8>>,
    pub seen: Vec<u8>,
}

impl LineReader {
    pub fn new<R: Read + Send + 'static>(pipe: R) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut pipe = std::io::BufReader::new(pipe);
            loop {
                let mut line = Vec::new();
                match std::io::BufRead::read_until(&mut pipe, b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        LineReader {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits until a line equal to `want` arrives; false on EOF or timeout.
    pub fn wait_for(&mut self, want: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.extend_from_slice(&line);
                    if line == want {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }
}

/// Waits at most `timeout` for a child to exit; kills it and returns `None` on timeout.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Describes the first difference between the two runs, or `None` if they agree.
pub fn compare(native: &Run, guest: &Run, compare_stderr: bool) -> Option<String> {
    let mut report = String::new();
    if shell_status(native.status) != shell_status(guest.status) {
        let _ = writeln!(
            report,
            "exit status: native {} ({:?}), mosvm {} ({:?})",
            native.shell_status(),
            native.status,
            guest.shell_status(),
            guest.status
        );
    }
    if let Some(d) = diff_bytes("stdout", &native.stdout, &guest.stdout) {
        report.push_str(&d);
    }
    if compare_stderr {
        if let Some(d) = diff_bytes("stderr", &native.stderr, &guest.stderr) {
            report.push_str(&d);
        }
    }
    if let Some(d) = diff_trees(&native.tree, &guest.tree) {
        report.push_str(&d);
    }
    (!report.is_empty()).then_some(report)
}

/// Both stderrs, for failure messages.
pub fn stderr_report(native: &Run, guest: &Run) -> String {
    format!(
        "--- native stderr ---\n{}\n--- mosvm stderr ---\n{}",
        clip(&native.stderr),
        clip(&guest.stderr)
    )
}

fn clip(bytes: &[u8]) -> String {
    const MAX: usize = 4000;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{text}... ({} bytes in all)", bytes.len())
    } else {
        text
    }
}

/// Describes where two byte strings first differ, by line, or `None` if equal.
pub fn diff_bytes(what: &str, native: &[u8], guest: &[u8]) -> Option<String> {
    if native == guest {
        return None;
    }
    let a: Vec<&[u8]> = native.split_inclusive(|&b| b == b'\n').collect();
    let b: Vec<&[u8]> = guest.split_inclusive(|&b| b == b'\n').collect();
    let first = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let show = |lines: &[&[u8]], i: usize| -> String {
        lines
            .get(i)
            .map(|l| format!("{:?}", String::from_utf8_lossy(l)))
            .unwrap_or_else(|| "<end of output>".to_string())
    };
    let mut s = format!(
        "{what} differs ({} bytes, {} lines natively; {} bytes, {} lines under mosvm); \
         first difference at line {}:\n",
        native.len(),
        a.len(),
        guest.len(),
        b.len(),
        first + 1
    );
    if first > 0 {
        let _ = writeln!(s, "    both  : {}", show(&a, first - 1));
    }
    let _ = writeln!(s, "    native: {}", show(&a, first));
    let _ = writeln!(s, "    mosvm : {}", show(&b, first));
    Some(s)
}

/// Describes how two directory snapshots differ, or `None` if equal.
pub fn diff_trees(native: &Tree, guest: &Tree) -> Option<String> {
    if native == guest {
        return None;
    }
    let mut s = String::from("files left behind differ:\n");
    for (path, n) in native {
        match guest.get(path) {
            None => {
                let _ = writeln!(s, "    only natively: {} ({})", path.display(), kind(n));
            }
            Some(g) if g != n => {
                let _ = writeln!(s, "    {}: {}", path.display(), entry_diff(n, g));
            }
            Some(_) => {}
        }
    }
    for (path, g) in guest {
        if !native.contains_key(path) {
            let _ = writeln!(s, "    only under mosvm: {} ({})", path.display(), kind(g));
        }
    }
    Some(s)
}

fn kind(e: &Entry) -> String {
    match e {
        Entry::File { mode, contents } => format!("file {mode:o}, {} bytes", contents.len()),
        Entry::Dir { mode } => format!("dir {mode:o}"),
        Entry::Symlink { target } => format!("symlink -> {}", target.display()),
        Entry::Other { kind } => kind.clone(),
    }
}

fn entry_diff(n: &Entry, g: &Entry) -> String {
    match (n, g) {
        (
            Entry::File {
                mode: nm,
                contents: nc,
            },
            Entry::File {
                mode: gm,
                contents: gc,
            },
        ) if nm == gm => {
            let at = nc
                .iter()
                .zip(gc)
                .position(|(x, y)| x != y)
                .unwrap_or(nc.len().min(gc.len()));
            let mut s = format!(
                "contents differ: {} bytes natively, {} under mosvm, first at byte {at}",
                nc.len(),
                gc.len()
            );
            if let Some(d) = diff_bytes("contents", nc, gc) {
                if nc.is_ascii() && gc.is_ascii() {
                    s.push('\n');
                    s.push_str(d.trim_end());
                }
            }
            s
        }
        _ => format!("native {}, mosvm {}", kind(n), kind(g)),
    }
}

/// Whether `stderr` is exactly one non-empty line ending in a newline.
pub fn is_one_line(stderr: &[u8]) -> bool {
    stderr.len() > 1
        && stderr.ends_with(b"\n")
        && stderr.iter().filter(|&&b| b == b'\n').count() == 1
}

/// Asserts the contract for bad input: a non-zero exit (not death by a signal), exactly one
/// line on stderr, no panic.
pub fn assert_clean_failure(what: &str, run: &Run) {
    let err = run.stderr_text();
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "mosvm panicked on {what}:\n{err}"
    );
    assert!(
        matches!(run.status.code(), Some(c) if c != 0),
        "mosvm on {what} should exit with a non-zero code, got {:?}\nstdout: {}\nstderr: {err}",
        run.status,
        run.stdout_text()
    );
    assert!(
        is_one_line(&run.stderr),
        "mosvm on {what} should print exactly one line on stderr, got {} bytes:\n{err}",
        run.stderr.len()
    );
}

/// Writes `bytes` as an executable file (mode 0755) at `path`.
pub fn write_executable(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod 755");
}

/// Lossless text of an `OsStr`, for messages.
pub fn os(s: &OsStr) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}
