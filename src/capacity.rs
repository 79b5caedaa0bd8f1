//! What a node has and how busy it is, measured the same way on one machine as on many: a
//! node is its cgroup when it has one (several nodes on one host then differ as real machines
//! would), else the whole machine.
//!
//! - CPU capacity: the cgroup's CPU quota (v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, v2
//!   `cpu.max`, the smallest along the path to the root) capped by the online CPUs, else the
//!   online CPUs (`sched_getaffinity`).
//! - Memory: the cgroup's limit (v1 `memory.limit_in_bytes`, v2 `memory.max`) and its usage
//!   less inactive page cache, else `MemTotal` and `MemTotal - MemAvailable` (proc(5)).
//! - Runnable work: the threads of the cgroup in state R (proc(5) `/proc/TID/stat`), which are
//!   the node's guests' vCPUs plus any other work the node's cgroup runs; without a cgroup,
//!   `procs_running` of `/proc/stat`. The sampling thread itself is not counted.
//!
//! `mosvm node --cpus N --memory SIZE` creates the node's own cgroup (`mosvm-NAME`, v1 or v2)
//! with that quota and limit and moves the node into it; its guest hosts inherit it, and each
//! `mosvm run` that registers is moved into it ([`Cgroup::adopt`]).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// CFS period used for quotas the node sets, µs.
const PERIOD_US: u64 = 100_000;

/// The node's cgroup: the directories of the CPU and memory controllers it is limited by.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cgroup {
    /// Directory with the CPU controller's files (v1 `cpu`, or the v2 cgroup).
    pub cpu: Option<(PathBuf, Version)>,
    /// Directory with the memory controller's files.
    pub memory: Option<(PathBuf, Version)>,
    /// Cgroups [`Cgroup::create`] made, each with the `cgroup.procs` file of the cgroup
    /// this process was in before: [`Cgroup::remove_created`] goes back there and removes them.
    pub created: Vec<(PathBuf, PathBuf)>,
}

/// cgroup hierarchy version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: one hierarchy per controller.
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

/// Where each controller is mounted: (v1 mount of `cpu`, v1 mount of `memory`, v2 mount).
fn mounts() -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    let (mut cpu, mut mem, mut v2) = (None, None, None);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in info.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).unwrap_or_default();
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default();
        let superopts = r.nth(1).unwrap_or_default();
        match fstype {
            "cgroup" => {
                let opts: Vec<&str> = superopts.split(',').collect();
                if opts.contains(&"cpu") && cpu.is_none() {
                    cpu = Some(PathBuf::from(point));
                }
                if opts.contains(&"memory") && mem.is_none() {
                    mem = Some(PathBuf::from(point));
                }
            }
            "cgroup2" => {
                let p = PathBuf::from(point);
                let ctl = std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default();
                if !ctl.is_empty() || v2.is_none() {
                    v2 = Some(p);
                }
            }
            _ => {}
        }
    }
    (cpu, mem, v2)
}

/// The cgroup path of process `pid` in the hierarchy of `controller` (`""` for v2).
fn path_of(pid: &str, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if controller.is_empty() {
            ctls.is_empty()
        } else {
            ctls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn v2_has(v2: &Path, controller: &str) -> bool {
    std::fs::read_to_string(v2.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == controller)
}

impl Cgroup {
    /// When the node stops: move this process back where it was and remove the cgroups
    /// [`Cgroup::create`] made. One that still holds processes (a home process that outlives
    /// its node) stays, and is named in the returned errors.
    pub fn remove_created(&self) -> Vec<String> {
        let me = std::process::id().to_string();
        let mut errors = Vec::new();
        for (_, origin) in &self.created {
            if let Err(e) = write(origin, &me) {
                errors.push(format!("{e:#}"));
            }
        }
        for (dir, _) in &self.created {
            if let Err(e) = std::fs::remove_dir(dir) {
                errors.push(format!("removing cgroup {}: {e}", dir.display()));
            }
        }
        errors
    }

    /// The cgroup this process runs in. Controllers at the hierarchy's root count as none
    /// (the whole machine).
    pub fn current() -> Cgroup {
        let (cpu, mem, v2) = mounts();
        let pick = |v1: Option<PathBuf>, name: &str| -> Option<(PathBuf, Version)> {
            if let Some(m) = v1 {
                let p = path_of("self", name)?;
                return (p != "/").then(|| (m.join(p.trim_start_matches('/')), Version::V1));
            }
            let m = v2.clone()?;
            if !v2_has(&m, name) {
                return None;
            }
            let p = path_of("self", "")?;
            (p != "/").then(|| (m.join(p.trim_start_matches('/')), Version::V2))
        };
        Cgroup {
            cpu: pick(cpu, "cpu"),
            memory: pick(mem, "memory"),
            created: Vec::new(),
        }
    }

    /// Create the node's own cgroup `mosvm-NAME` with `cpus` CPUs of quota and `memory`
    /// bytes of limit (either may be absent), and move this process into it. v1: under the
    /// node's current cgroup of each controller; v2: under `/mosvm` at the root (cgroup v2
    /// lets controllers be enabled only where no process lives). Errors name the file.
    pub fn create(name: &str, cpus: Option<f64>, memory: Option<u64>) -> Result<Cgroup> {
        let (cpu1, mem1, v2) = mounts();
        let leaf = format!("mosvm-{name}");
        let me = std::process::id().to_string();
        let mut cg = Cgroup::default();
        let needs_v2 = (cpus.is_some() && cpu1.is_none()) || (memory.is_some() && mem1.is_none());
        if needs_v2 {
            let root = v2.context("no cgroup hierarchy offers the cpu and memory controllers")?;
            let parent = root.join("mosvm");
            mkdir(&parent)?;
            let want: Vec<&str> = [
                ("cpu", cpus.is_some() && cpu1.is_none()),
                ("memory", memory.is_some() && mem1.is_none()),
            ]
            .iter()
            .filter(|(_, w)| *w)
            .map(|(c, _)| *c)
            .collect();
            for c in &want {
                anyhow::ensure!(
                    v2_has(&root, c),
                    "cgroup v2 at {} lacks the {c} controller",
                    root.display()
                );
                write(&root.join("cgroup.subtree_control"), &format!("+{c}"))?;
                write(&parent.join("cgroup.subtree_control"), &format!("+{c}"))?;
            }
            let dir = parent.join(&leaf);
            mkdir(&dir)?;
            let origin = root.join(
                path_of("self", "")
                    .unwrap_or_default()
                    .trim_start_matches('/'),
            );
            claim(&dir, name)?;
            cg.created.push((dir.clone(), origin.join("cgroup.procs")));
            if want.contains(&"cpu") {
                cg.cpu = Some((dir.clone(), Version::V2));
            }
            if want.contains(&"memory") {
                cg.memory = Some((dir.clone(), Version::V2));
            }
        }
        if let (Some(_), Some(m)) = (cpus, cpu1) {
            let base = path_of("self", "cpu").unwrap_or_else(|| "/".into());
            let origin = m.join(base.trim_start_matches('/'));
            let dir = origin.join(&leaf);
            mkdir(&dir)?;
            claim(&dir, name)?;
            cg.created.push((dir.clone(), origin.join("cgroup.procs")));
            cg.cpu = Some((dir, Version::V1));
        }
        if let (Some(_), Some(m)) = (memory, mem1) {
            let base = path_of("self", "memory").unwrap_or_else(|| "/".into());
            let origin = m.join(base.trim_start_matches('/'));
            let dir = origin.join(&leaf);
            mkdir(&dir)?;
            claim(&dir, name)?;
            cg.created.push((dir.clone(), origin.join("cgroup.procs")));
            // Charges follow a process that moves in (v1 only; v2 never moves them).
            let _ = write(&dir.join("memory.move_charge_at_immigrate"), "3");
            cg.memory = Some((dir, Version::V1));
        }
        if let (Some(c), Some((dir, v))) = (cpus, &cg.cpu) {
            anyhow::ensure!(
                c.is_finite() && c > 0.0,
                "--cpus {c}: must be a positive number"
            );
            let quota = ((c * PERIOD_US as f64).round() as u64).max(1000);
            match v {
                Version::V1 => {
                    write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Version::V2 => write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?,
            }
        }
        if let (Some(b), Some((dir, v))) = (memory, &cg.memory) {
            match v {
                Version::V1 => write(&dir.join("memory.limit_in_bytes"), &b.to_string())?,
                Version::V2 => write(&dir.join("memory.max"), &b.to_string())?,
            }
        }
        cg.adopt(&me)?;
        Ok(cg)
    }

    /// Move process `pid` (all its threads) into this cgroup.
    pub fn adopt(&self, pid: &str) -> Result<()> {
        for (dir, _) in [&self.cpu, &self.memory].into_iter().flatten() {
            write(&dir.join("cgroup.procs"), pid)?;
        }
        Ok(())
    }

    /// CPU capacity in CPUs: the smallest quota on the path up to the hierarchy's root,
    /// capped by the CPUs this process may run on.
    pub fn cpus(&self) -> f64 {
        let online = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut cap = online;
        if let Some((dir, v)) = &self.cpu {
            let mut d = Some(dir.as_path());
            while let Some(p) = d {
                if let Some(q) = quota_at(p, *v) {
                    cap = cap.min(q);
                }
                d = p.parent().filter(|p| p.join("cgroup.procs").exists());
            }
        }
        cap
    }

    /// Memory (total available to processes, in use), bytes.
    pub fn memory(&self) -> (u64, u64) {
        let mem = meminfo();
        let total_host = mem.0;
        if let Some((dir, v)) = &self.memory {
            let (limit, usage) = match v {
                Version::V1 => (
                    read_u64(&dir.join("memory.limit_in_bytes")),
                    read_u64(&dir.join("memory.usage_in_bytes")),
                ),
                Version::V2 => (
                    read_u64(&dir.join("memory.max")),
                    read_u64(&dir.join("memory.current")),
                ),
            };
            if let (Some(limit), Some(usage)) = (limit, usage) {
                if limit < total_host {
                    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
                    let key = if *v == Version::V1 {
                        "total_inactive_file"
                    } else {
                        "inactive_file"
                    };
                    let inactive = stat
                        .lines()
                        .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    return (limit, usage.saturating_sub(inactive));
                }
            }
        }
        (total_host, total_host.saturating_sub(mem.1))
    }

    /// The threads of this cgroup with their process ids (None: no cgroup, the machine is
    /// the scope).
    fn threads(&self) -> Option<Vec<(u32, String)>> {
        let (dir, _) = self.cpu.as_ref()?;
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let mut out = Vec::new();
        for pid in procs.lines() {
            let Ok(p) = pid.parse::<u32>() else { continue };
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                out.push((p, t.file_name().to_string_lossy().into_owned()));
            }
        }
        Some(out)
    }
}

/// Measures a node's run-queue length as an average over time, from the scheduler's own
/// accounting (`/proc/TID/schedstat`: time on a CPU, and time waiting for one; sched(7)).
///
/// The processes the node runs for its guests count their threads' time on a CPU *plus*
/// their time waiting for one: a vCPU that always wants the CPU counts 1, even in a cgroup its
/// CPU quota holds back. A process being moved counts as one such thread (its pre-copy
/// threads work for the move, not for the process). Everything else in the cgroup (the node
/// service, the deputies of processes that run elsewhere, other programs) counts the CPU time
/// it used: light work that wakes often would otherwise look runnable all the time in a
/// throttled cgroup, as it waits there for the next quota period after each wake-up.
/// Without a cgroup, the machine's `/proc/schedstat` gives the same sums over all CPUs (or,
/// without scheduler statistics, `procs_running`).
#[derive(Debug, Default)]
pub struct Sampler {
    /// Per thread (or per CPU without a cgroup): nanoseconds counted at the last sample.
    prev: std::collections::HashMap<String, u64>,
    at: Option<std::time::Instant>,
}

/// How the threads of one process count (see [`Sampler`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// A guest running here: time on a CPU and waiting for one.
    Runnable,
    /// A process being moved: one thread runnable all the time.
    Moving,
}

impl Sampler {
    /// Mean number of runnable threads since the previous call (0 on the first). `guests`
    /// says how the node's guest processes count; other processes count their CPU time.
    pub fn sample(&mut self, cg: &Cgroup, guests: &std::collections::HashMap<u32, Count>) -> f64 {
        let now = std::time::Instant::now();
        let interval_ns = self
            .at
            .map_or(0, |t| now.duration_since(t).as_nanos() as u64);
        let mut next = std::collections::HashMap::new();
        let mut busy_ns = 0u64;
        let totals: Vec<(String, u64)> = match cg.threads() {
            Some(tids) => {
                let mut seen = std::collections::HashSet::new();
                let mut v = Vec::with_capacity(tids.len());
                for (pid, t) in tids {
                    let how = guests.get(&pid).copied();
                    if how == Some(Count::Moving) {
                        if seen.insert(pid) {
                            busy_ns += interval_ns;
                        }
                        continue;
                    }
                    let Ok(st) = std::fs::read_to_string(format!("/proc/{t}/schedstat")) else {
                        continue;
                    };
                    let mut f = st.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
                    let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
                    // Keyed by how it counts, so a process that changes class starts afresh.
                    let (key, total) = match how {
                        Some(_) => (format!("{t}+"), run + wait),
                        None => (t, run),
                    };
                    v.push((key, total));
                }
                v
            }
            None => {
                let cpus: Vec<(String, u64)> = std::fs::read_to_string("/proc/schedstat")
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("cpu"))
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
                        Some((f[0].to_string(), n(7)? + n(8)?))
                    })
                    .collect();
                if cpus.is_empty() {
                    // No scheduler statistics (CONFIG_SCHEDSTATS off): the instantaneous
                    // count of runnable tasks, less the one reading it.
                    self.at = Some(now);
                    return procs_running().saturating_sub(1) as f64;
                }
                cpus
            }
        };
        for (k, total) in totals {
            // A thread new to the count (just started, a process that just joined the
            // cgroup or changed class) counts at most the whole interval.
            let d = match self.prev.get(&k) {
                Some(&p) => total.saturating_sub(p),
                None => total.min(interval_ns),
            };
            busy_ns += d;
            next.insert(k, total);
        }
        self.prev = next;
        self.at = Some(now);
        if interval_ns == 0 {
            0.0
        } else {
            busy_ns as f64 / interval_ns as f64
        }
    }
}

/// The quota at one cgroup directory, CPUs (None: unlimited or unreadable).
fn quota_at(dir: &Path, v: Version) -> Option<f64> {
    let (q, p) = match v {
        Version::V1 => (
            std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).ok()?,
            std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?,
        ),
        Version::V2 => {
            let s = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
            let mut f = s.split_whitespace();
            (f.next()?.to_string(), f.next()?.to_string())
        }
    };
    let q: f64 = q.trim().parse().ok()?;
    let p: f64 = p.trim().parse().ok()?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

/// `procs_running` of `/proc/stat`: tasks runnable on the whole machine now.
fn procs_running() -> u32 {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("procs_running")?.trim().parse::<u32>().ok())
        .unwrap_or(1)
}

/// (MemTotal, MemAvailable), bytes.
fn meminfo() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| {
                l.strip_prefix(k)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    (get("MemTotal:"), get("MemAvailable:"))
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A node's cgroup that holds a running `mosvm node` belongs to a live node of the same name:
/// taking it over would change that node's limits. (Other processes, such as the programs
/// of a node that was killed, do not stop a restart.)
fn claim(dir: &Path, name: &str) -> Result<()> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    let node = procs.split_whitespace().find(|pid| {
        *pid != me
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"node".as_slice()))
    });
    if let Some(pid) = node {
        anyhow::bail!(
            "a node named {name} already runs here (pid {pid}, cgroup {})",
            dir.display()
        );
    }
    Ok(())
}

fn mkdir(p: &Path) -> Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", p.display())),
    }
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v).with_context(|| format!("writing {v} to {}", p.display()))
}

/// Reference time of [`balancer::load::calibration_work`], seconds: a speed of 1.0 is a CPU
/// that runs it this fast (a 2020s x86-64 server core).
pub const REFERENCE_SECS: f64 = 0.004;

/// This CPU's relative speed: the best of five timed runs of the calibration loop.
/// Timed in this thread's CPU time, not wall time: several nodes calibrating at once on one
/// machine (or a CFS quota throttling the node) would otherwise each measure a slower CPU.
pub fn calibrate() -> f64 {
    let best = (0..5u64)
        .map(|i| {
            let t = thread_cpu_secs();
            std::hint::black_box(balancer::load::calibration_work(std::hint::black_box(
                i + 1,
            )));
            thread_cpu_secs() - t
        })
        .filter(|d| *d > 0.0)
        .fold(f64::INFINITY, f64::min);
    balancer::load::speed_from_calibration(REFERENCE_SECS, best)
}

/// CPU time this thread has used, seconds (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`).
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_machine_without_a_cgroup() {
        let none = Cgroup::default();
        let online = std::thread::available_parallelism().unwrap().get() as f64;
        assert_eq!(none.cpus(), online);
        let (total, used) = none.memory();
        assert!(total > 0 && used <= total);
    }

    #[test]
    fn a_quota_file_reads_as_cpus() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cpu.max"), "50000 100000\n").unwrap();
        assert_eq!(quota_at(d.path(), Version::V2), Some(0.5));
        std::fs::write(d.path().join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(quota_at(d.path(), Version::V2), None);
        std::fs::write(d.path().join("cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(d.path().join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(quota_at(d.path(), Version::V1), None);
        std::fs::write(d.path().join("cpu.cfs_quota_us"), "150000\n").unwrap();
        assert_eq!(quota_at(d.path(), Version::V1), Some(1.5));
    }

    #[test]
    fn a_spinning_guest_counts_one_a_sleeping_one_nothing_and_a_moving_one_one() {
        let mut spin = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let mut sleep = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // A cgroup directory whose process list is one of these.
        let d = tempfile::tempdir().unwrap();
        let cg = Cgroup {
            cpu: Some((d.path().to_path_buf(), Version::V1)),
            ..Cgroup::default()
        };
        let measure = |pid: u32, how: Option<Count>| {
            std::fs::write(d.path().join("cgroup.procs"), format!("{pid}\n")).unwrap();
            let guests = how.map(|h| (pid, h)).into_iter().collect();
            let mut s = Sampler::default();
            s.sample(&cg, &guests);
            std::thread::sleep(std::time::Duration::from_millis(300));
            s.sample(&cg, &guests)
        };
        let spinning = measure(spin.id(), Some(Count::Runnable));
        let sleeping = measure(sleep.id(), Some(Count::Runnable));
        let moving = measure(sleep.id(), Some(Count::Moving));
        let other = measure(spin.id(), None);
        let _ = spin.kill();
        let _ = sleep.kill();
        let _ = (spin.wait(), sleep.wait());
        // Running or waiting for a CPU, the spinning process is runnable all the time, however
        // busy the machine is.
        assert!((0.8..1.2).contains(&spinning), "spinning: {spinning}");
        assert!(sleeping < 0.05, "sleeping: {sleeping}");
        assert!((0.9..1.1).contains(&moving), "moving: {moving}");
        // Work that is not a guest's counts the CPU it got: up to one CPU.
        assert!(other > 0.1 && other < 1.2, "other: {other}");
    }
}
