//! Hosting guests for other nodes: a `mosvm guest-host` process per arriving guest, started
//! from the node's own executable.

use crate::node::{Hosted, Shared};
use anyhow::{Context, Result};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

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

/// Start a guest host for process `pid` of node `home`: a `mosvm guest-host` process whose
/// stdin is a fresh listening socket on this node's address, serving only connections whose
/// Hello bears a fresh token. Returns the port and the token; `ps` lists the guest while the
/// process lives.
pub(crate) fn start_guest_host(
    shared: &Shared,
    pid: u32,
    home: &str,
    program: &str,
) -> Result<(u16, [u8; 32])> {
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
    let token = migrate::tls::new_token()?;
    // The guest host's channel to this node (hostchan.rs): the descriptor it inherits, at the
    // same number (MOSVM_CHANNEL).
    let (ours, theirs) = crate::hostchan::pair().context("creating the guest host's channel")?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = tokio::process::Command::new(own_exe()?);
    cmd.arg0("mosvm")
        .arg("guest-host")
        .env("MOSVM_SOCKET", socket)
        .env("MOSVM_KEY_DIR", key_dir)
        .env("MOSVM_NODE", name)
        .env("MOSVM_TOKEN", crate::control::hex(&token))
        .env(crate::hostchan::CHANNEL_ENV, theirs_fd.to_string())
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(l)))
        .stdout(std::process::Stdio::null())
        // Its messages reach this node's log through a pipe: a guest host that was taken over
        // cannot rewrite or truncate the log itself.
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: between fork and exec the closure calls only fcntl, which is
    // async-signal-safe, on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            // Kept open across the exec.
            if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawning the guest host")?;
    drop(theirs);
    let host_pid = child.id().unwrap_or(0);
    shared.lock().expect("state lock").hosted.insert(
        host_pid,
        Hosted {
            pid,
            home: home.to_string(),
            program: program.to_string(),
            since: std::time::Instant::now(),
            calls: (0, 0),
        },
    );
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay_stderr(err, host_pid));
    }
    let rt = tokio::runtime::Handle::current();
    crate::hostchan::serve(shared.clone(), rt, ours, host_pid, false);
    let shared = shared.clone();
    tokio::spawn(async move {
        let r = child.wait().await;
        tracing::info!(host_pid, ?r, "guest host ended");
        shared.lock().expect("state lock").hosted.remove(&host_pid);
    });
    Ok((port, token))
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
