//! Process trees under `mosvm run`, each compared with the same command run natively: shells
//! running pipelines, loops, command substitution and background jobs; Python's subprocess;
//! `make -j2` building a small C project with Debian's gcc; a program that is killed, at
//! home, by another process.

#[macro_use]
mod common;

use common::Case;
use std::time::Duration;

/// A shell script that forks, pipes, substitutes, waits and reports statuses.
const SCRIPT: &str = r#"
set -u
echo "pipeline: $(printf 'b\na\nc\n' | sort | tr a-z A-Z | head -n 2 | wc -l)"
for i in 1 2 3; do echo "line $i"; done | sort -r > lines.txt
cat lines.txt
x=$(echo inner; exit 3); echo "substitution: $x $?"
( exit 9 ); echo "subshell: $?"
sleep 0.1 & bg=$!
echo one > a.txt & echo two > b.txt &
wait; echo "waited: $(cat a.txt b.txt | tr '\n' ' ')"
if [ -n "$bg" ]; then echo "background had a pid"; fi
i=0; while [ $i -lt 20 ]; do i=$((i + 1)); done; echo "loop: $i"
sh -c 'exit 4'; echo "child shell: $?"
sh -c 'kill -TERM $$'; echo "killed child: $?"
echo done | (read v; echo "read: $v")
trap 'echo trapped USR1' USR1; kill -USR1 $$
exit 5
"#;

fn shell(program: &str, first: &[&str]) -> Case {
    let mut args: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    args.extend(["-c".to_string(), SCRIPT.to_string()]);
    Case::new(program)
        .args(args)
        .expect_status(Some(5))
        .timeout(Duration::from_secs(60))
}

#[test]
fn debian_sh_runs_pipelines_and_jobs() {
    require_kvm!();
    shell("/bin/sh", &[]).check();
}

#[test]
fn bash_runs_pipelines_and_jobs() {
    require_kvm!();
    shell("/bin/bash", &[]).check();
}

#[test]
fn busybox_sh_runs_pipelines_and_jobs() {
    require_kvm!();
    shell("/bin/busybox", &["sh"]).check();
}

/// `python3 -c PROG`.
fn python(prog: &str) -> Case {
    Case::new("/usr/bin/python3")
        .args(["-c", prog])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .timeout(Duration::from_secs(60))
}

#[test]
fn python_subprocess() {
    require_kvm!();
    let prog = r#"
import subprocess, os, sys
r = subprocess.run(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True)
print(r.returncode, r.stdout, r.stderr)
print(subprocess.check_output("echo hi | tr a-z A-Z", shell=True))
p = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
out, _ = p.communicate(b"x" * 100000)
print(len(out), p.returncode)
pid = os.fork()
if pid == 0:
    os._exit(7)
print(os.waitpid(pid, 0)[1] >> 8)
"#;
    python(prog).check();
}

/// Python's threads (a work queue, a thread pool), `multiprocessing.Pool(2)` (forks and
/// threads together) and subprocesses started from pool threads (forks by threads other than
/// the first).
#[test]
fn python_threads_and_multiprocessing() {
    require_kvm!();
    let prog = r#"
import threading, queue, subprocess, multiprocessing, concurrent.futures as cf
q = queue.Queue()
def work(n):
    q.put(sum(i * i for i in range(n)))
ts = [threading.Thread(target=work, args=(100000 + i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sorted(q.get() for _ in range(4)))
with cf.ThreadPoolExecutor(4) as ex:
    print(list(ex.map(lambda x: x * x, range(10))))
def sq(x):
    return x * x
with multiprocessing.Pool(2) as p:
    print(p.map(sq, range(10)))
def run(i):
    return subprocess.run(["echo", str(i)], capture_output=True, text=True).stdout.strip()
with cf.ThreadPoolExecutor(3) as ex:
    print(list(ex.map(run, range(6))))
lock = threading.Lock(); cond = threading.Condition(lock); box = []
def producer():
    for i in range(100):
        with cond:
            box.append(i); cond.notify()
t = threading.Thread(target=producer); t.start()
got = 0
while got < 100:
    with cond:
        while not box:
            cond.wait()
        got += len(box); box.clear()
t.join()
print("condition", got)
"#;
    python(prog).check();
}

#[test]
fn make_j2_builds_with_gcc() {
    require_kvm!();
    let makefile = "prog: main.o f.o g.o\n\t$(CC) -o $@ main.o f.o g.o\n\
                    %.o: %.c\n\t$(CC) -O2 -c $<\n\
                    run: prog\n\t./prog > result.txt\n";
    Case::new("/usr/bin/make")
        .args(["-s", "-j2", "run"])
        .file("Makefile", makefile)
        .file(
            "main.c",
            "#include <stdio.h>\nint f(int); int g(int);\n\
             int main(void) { printf(\"%d %d\\n\", f(20), g(3)); return 0; }\n",
        )
        .file("f.c", "int f(int x) { return 2 * x + 1; }\n")
        .file("g.c", "int g(int x) { return x * x * x; }\n")
        .timeout(Duration::from_secs(120))
        .check();
}

/// A program killed by a signal from another process, while it waits in pause(2) under a
/// handler-less disposition, dies of it; with a handler, the handler runs and it goes on.
#[test]
fn signals_from_another_process() {
    require_kvm!();
    let prog = r#"
import signal, os, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
pid = os.fork()
if pid == 0:
    signal.pause()
    print("child got", got, flush=True)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.pause()
    os._exit(0)
time.sleep(0.3)
os.kill(pid, signal.SIGUSR1)
time.sleep(0.3)
os.kill(pid, signal.SIGUSR1)
_, st = os.waitpid(pid, 0)
print("child status", os.WIFSIGNALED(st), os.WTERMSIG(st))
"#;
    python(prog).check();
}

/// Runs `program args` on a new pseudo-terminal as its controlling terminal (a session of
/// its own), types each input after its delay, and returns the transcript (carriage returns
/// and bracketed-paste toggles removed) and the exit status.
fn on_a_terminal(program: &str, args: &[&str], steps: &[(u64, &[u8])]) -> (String, i32) {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors; the name, termios and winsize are not wanted.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env("PS1", "$ ").env("TERM", "dumb");
    // SAFETY: the slave descriptor stays open until the child has its copies.
    unsafe {
        cmd.stdin(std::process::Stdio::from_raw_fd(libc::dup(slave)))
            .stdout(std::process::Stdio::from_raw_fd(libc::dup(slave)))
            .stderr(std::process::Stdio::from_raw_fd(libc::dup(slave)))
            .pre_exec(|| {
                // A session of its own with the terminal as its controlling terminal.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
    }
    let mut child = cmd.spawn().expect("spawn on the terminal");
    // SAFETY: our copy of the slave end is ours to close; the master is ours from now on.
    let mut master = unsafe {
        libc::close(slave);
        std::fs::File::from_raw_fd(master)
    };
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (out, mut m) = (out.clone(), master.try_clone().expect("dup master"));
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = m.read(&mut b) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&b[..n]);
            }
        })
    };
    for (ms, data) in steps {
        std::thread::sleep(Duration::from_millis(*ms));
        let _ = master.write_all(data);
    }
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!(
                "{program} on a terminal did not exit; transcript:\n{}",
                String::from_utf8_lossy(&out.lock().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(200));
    drop(master);
    drop(reader);
    let text = String::from_utf8_lossy(&out.lock().unwrap())
        .replace('\r', "")
        .replace("\x1b[?2004h", "")
        .replace("\x1b[?2004l", "");
    (text, common::shell_status(status))
}

/// Interactive shells with job control on a terminal: a foreground job, one stopped with
/// Ctrl-Z, `jobs`, `fg`, Ctrl-C, and the statuses they leave; the transcript and the exit
/// status must be those of the same shell run natively.
#[test]
fn interactive_shells_with_job_control() {
    require_kvm!();
    let mosvm = env!("CARGO_BIN_EXE_mosvm");
    let steps: &[(u64, &[u8])] = &[
        (800, b"/bin/true; echo st=$?\n"),
        (500, b"sleep 5\n"),
        (700, b"\x1a"),
        (500, b"jobs\n"),
        (500, b"fg\n"),
        (700, b"\x03"),
        (500, b"echo st=$?\n"),
        (500, b"exit 7\n"),
    ];
    for (shell, args) in [
        ("/bin/bash", &["--norc", "-i"][..]),
        ("/bin/sh", &["-i"][..]),
    ] {
        let native = on_a_terminal(shell, args, steps);
        let mut margs = vec!["run", shell];
        margs.extend(args);
        let guest = on_a_terminal(mosvm, &margs, steps);
        assert_eq!(guest, native, "{shell} under mosvm vs natively");
        assert_eq!(native.1, 7, "{shell}: {}", native.0);
    }
}

/// dash runs external commands in vfork children, which write its memory (its heap and the C
/// library's data) before they exec: the shell goes on with what they wrote, as natively.
#[test]
fn dash_vfork_children_share_memory_until_exec() {
    require_kvm!();
    for script in [
        "/bin/true; echo x",
        "for i in $(seq 1 60); do /bin/true; x=\"$x$i\"; done; echo ${#x}",
        "ls /nonexistent 2>/dev/null || echo failed; /bin/echo $((6 * 7))",
    ] {
        Case::new("/bin/sh")
            .args(["-c", script])
            .timeout(Duration::from_secs(60))
            .check();
    }
}
