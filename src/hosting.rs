//! Hosting guests for other nodes: a `mosvm guest-host` process per arriving guest, started
//! from the node's own executable.

use crate::node::{Hosted, Shared};
use anyhow::{Context, Result};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// This node's own executable, opened when the node starts.
static OWN_EXE: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// A path that executes the very binary this node runs, even after it was replaced on disk
/// (an upgrade): the descriptor opened at start, through `/proc/self/fd` (the child resolves
/// it before its exec closes it).
pub(crate) fn own_exe() -> Result<PathBuf> {
    let f = match OWN_EXE.get() {
        Some(f) => f,
        None => {
            let f = std::fs::File::open("/proc/self/exe").context("opening /proc/self/exe")?;
            OWN_EXE.get_or_init(|| f)
        }
    };
    Ok(PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())))
}

/// The spare guest host's pool size, bytes (0: no spare).
static POOL_HELD: AtomicU64 = AtomicU64::new(0);
/// The spare guest host's pid (0: none).
static SPARE_PID: AtomicU32 = AtomicU32::new(0);

/// Bytes of touched memory held ready for arriving guests, which the node counts as free:
/// what the spare holds (its resident memory), up to its pool's size.
pub(crate) fn pool_held() -> u64 {
    match SPARE_PID.load(Ordering::Relaxed) {
        0 => 0,
        pid => crate::node::rss_bytes(pid).min(POOL_HELD.load(Ordering::Relaxed)),
    }
}

/// Forget the spare in the memory figures.
fn no_spare() {
    SPARE_PID.store(0, Ordering::Relaxed);
    POOL_HELD.store(0, Ordering::Relaxed);
}

/// How long after a spare is taken the next one starts, so that touching its pool does not
/// compete with the arrival that took the last one.
const RESPARE_DELAY: Duration = Duration::from_secs(1);

/// A guest host started before any guest needs it: it has loaded the cluster key, opened
/// `/dev/kvm` and is touching a pool of memory ([`vmm::pool`]) with a quarter of one CPU at
/// most, and waits for the token of the guest it is to receive on its assignment pipe.
pub(crate) struct Spare {
    host_pid: u32,
    port: u16,
    assign: std::fs::File,
    alive: Arc<AtomicBool>,
}

impl Spare {
    /// Hand the spare its guest's token: Some((port, guest-host pid)), or None if the spare
    /// is gone.
    fn assign(mut self, token: &[u8; 32]) -> Option<(u16, u32)> {
        use std::io::Write as _;
        if !self.alive.load(Ordering::SeqCst) {
            return None;
        }
        // A stopped spare would not answer its guest's source: start a fresh guest host.
        if matches!(proc_state(self.host_pid), Some('T' | 't')) {
            // SAFETY: kill(2) of this node's own child, which it has not reaped yet.
            unsafe { libc::kill(self.host_pid as i32, libc::SIGKILL) };
            return None;
        }
        let line = format!("{}\n", crate::control::hex(token));
        self.assign.write_all(line.as_bytes()).ok()?;
        Some((self.port, self.host_pid))
    }
}

/// The state letter of process `pid` (proc(5), /proc/PID/stat), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A guest host started: its port, pid, and whether it still runs.
struct Started {
    port: u16,
    host_pid: u32,
    alive: Arc<AtomicBool>,
}

/// Start a guest host for process `pid` of node `home`: a `mosvm guest-host` process whose
/// stdin is a fresh listening socket on this node's address, serving only connections whose
/// Hello bears a fresh token. The node's spare guest host takes the guest when there is one
/// (and a new spare is started a moment later). Returns the port and the token; `ps` lists
/// the guest while the process lives.
pub(crate) fn start_guest_host(
    shared: &Shared,
    pid: u32,
    home: &str,
    program: &str,
) -> Result<(u16, [u8; 32])> {
    let token = migrate::tls::new_token()?;
    let spare = shared.lock().expect("state lock").spare.take();
    // The next spare (none is started when the node keeps none, or one is still there).
    respare_later(shared.clone());
    let assigned = spare.and_then(|s| {
        no_spare();
        let alive = s.alive.clone();
        s.assign(&token)
            .map(|(port, host_pid)| (port, host_pid, alive))
    });
    let (port, host_pid, alive) = match assigned {
        Some(a) => a,
        None => {
            let s = spawn(shared, Some(&token), 0)?;
            (s.port, s.host_pid, s.alive)
        }
    };
    let mut st = shared.lock().expect("state lock");
    // (A guest host that already ended is not listed.)
    if alive.load(Ordering::SeqCst) {
        st.hosted.insert(
            host_pid,
            Hosted {
                pid,
                home: home.to_string(),
                program: program.to_string(),
                since: std::time::Instant::now(),
                calls: (0, 0),
            },
        );
    }
    Ok((port, token))
}

/// Start a spare guest host if this node keeps one (`--pool` above 0, a cluster key), has
/// none, and has free memory for at least twice the pool (a pool must never push the guests
/// here out of memory).
pub(crate) fn ensure_spare(shared: &Shared) {
    let pool = {
        let st = shared.lock().expect("state lock");
        if st.spare.is_some() || st.pool == 0 || st.key_dir.is_none() {
            return;
        }
        let (total, used) = st.cgroup.memory();
        if total.saturating_sub(used) < st.pool.saturating_mul(2) {
            tracing::info!(
                free_mb = total.saturating_sub(used) >> 20,
                pool_mb = st.pool >> 20,
                "no spare guest host for now: too little free memory for its pool"
            );
            return;
        }
        st.pool
    };
    match spawn(shared, None, pool) {
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot start a spare guest host: {e:#}"),
    }
}

fn respare_later(shared: Shared) {
    tokio::spawn(async move {
        tokio::time::sleep(RESPARE_DELAY).await;
        ensure_spare(&shared);
    });
}

/// Spawn a `mosvm guest-host`: for the guest bearing `token`, or (None) as this node's spare
/// with a pool of `pool` bytes, which [`ensure_spare`] records.
fn spawn(shared: &Shared, token: Option<&[u8; 32]>, pool: u64) -> Result<Started> {
    let (listen, key_dir, socket, name) = {
        let st = shared.lock().expect("state lock");
        (
            st.listen,
            st.key_dir.clone(),
            st.socket.clone(),
            st.name.clone(),
        )
    };
    let key_dir = key_dir.context("this node has no cluster key")?;
    let ip = listen.map(|a| a.ip()).unwrap_or([0, 0, 0, 0].into());
    let l = std::net::TcpListener::bind((ip, 0)).context("binding the guest host's port")?;
    let port = l.local_addr()?.port();
    // The guest host's channel to this node (hostchan.rs): the descriptor it inherits, at the
    // same number (MOSVM_CHANNEL).
    let (ours, theirs) = crate::hostchan::pair().context("creating the guest host's channel")?;
    let mut inherit = vec![theirs.as_raw_fd()];
    let mut cmd = tokio::process::Command::new(own_exe()?);
    cmd.arg0("mosvm")
        .arg("guest-host")
        .env("MOSVM_SOCKET", socket)
        .env("MOSVM_KEY_DIR", key_dir)
        .env("MOSVM_NODE", name)
        .env(crate::hostchan::CHANNEL_ENV, theirs.as_raw_fd().to_string());
    // A spare reads its guest's token from a pipe instead.
    let assign = match token {
        Some(t) => {
            cmd.env("MOSVM_TOKEN", crate::control::hex(t));
            None
        }
        None => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .context("creating the spare's assignment pipe")?;
            inherit.push(r.as_raw_fd());
            cmd.env(crate::guesthost::ASSIGN_ENV, r.as_raw_fd().to_string())
                .env(crate::guesthost::POOL_ENV, pool.to_string());
            Some((r, std::fs::File::from(w)))
        }
    };
    cmd.stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(l)))
        .stdout(std::process::Stdio::null())
        // Its messages reach this node's log through a pipe: a guest host that was taken over
        // cannot rewrite or truncate the log itself.
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: between fork and exec the closure calls only fcntl, which is
    // async-signal-safe, on descriptors the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            // Kept open across the exec.
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawning the guest host")?;
    drop(theirs);
    let host_pid = child.id().unwrap_or(0);
    let alive = Arc::new(AtomicBool::new(true));
    if let Some((r, w)) = assign {
        drop(r);
        POOL_HELD.store(pool, Ordering::Relaxed);
        SPARE_PID.store(host_pid, Ordering::Relaxed);
        shared.lock().expect("state lock").spare = Some(Spare {
            host_pid,
            port,
            assign: w,
            alive: alive.clone(),
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay_stderr(err, host_pid));
    }
    let rt = tokio::runtime::Handle::current();
    crate::hostchan::serve(shared.clone(), rt, ours, host_pid, false);
    let shared = shared.clone();
    let flag = alive.clone();
    tokio::spawn(async move {
        let r = child.wait().await;
        tracing::info!(host_pid, ?r, "guest host ended");
        flag.store(false, Ordering::SeqCst);
        let mut st = shared.lock().expect("state lock");
        st.hosted.remove(&host_pid);
        if st.spare.as_ref().is_some_and(|s| s.host_pid == host_pid) {
            // The spare died unused (killed, or it could not start): no new one at once, or
            // a spare that cannot start would be restarted in a loop.
            st.spare = None;
            no_spare();
        }
    });
    Ok(Started {
        port,
        host_pid,
        alive,
    })
}

/// Longest line of a guest host's stderr this node logs as one, bytes.
const MAX_LINE: usize = 4096;

/// Copy guest host `host_pid`'s stderr to this node's, line by line, each line naming the
/// guest host (a line longer than [`MAX_LINE`] is split).
async fn relay_stderr(mut err: tokio::process::ChildStderr, host_pid: u32) {
    use tokio::io::AsyncReadExt as _;
    let emit = |line: &[u8]| eprintln!("[guest host {host_pid}] {}", String::from_utf8_lossy(line));
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; MAX_LINE];
    loop {
        let n = match err.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            emit(&pending[..i]);
            pending.drain(..=i);
        }
        if pending.len() >= MAX_LINE {
            emit(&pending);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        emit(&pending);
    }
}
