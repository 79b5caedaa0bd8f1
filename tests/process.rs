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
