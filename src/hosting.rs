//! Hosting guests for other nodes: a `mosvm guest-host` process per arriving guest, started
//! from the node's own executable.

use crate::node::{Hosted, Shared};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// This node's own executable, opened when the node starts.
static OWN_EXE: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// A path that executes the very binary this node runs, even after it was replaced on disk
/// (an upgrade): the descriptor opened at start, through `/proc/self/fd` (the child resolves
/// it before its exec closes it).
pub(crate) fn own_exe() -> Result<PathBuf> {
    use std::os::fd::AsRawFd;
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
    let mut child = tokio::process::Command::new(own_exe()?)
        .arg0("mosvm")
        .arg("guest-host")
        .env("MOSVM_SOCKET", socket)
        .env("MOSVM_KEY_DIR", key_dir)
        .env("MOSVM_NODE", name)
        .env("MOSVM_TOKEN", crate::control::hex(&token))
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(l)))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the guest host")?;
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
    // The guest host reports its system calls once a second (a JSON line).
    if let Some(out) = child.stdout.take() {
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(crate::control::Update::Calls { home, local }) = serde_json::from_str(&l)
                {
                    if let Some(h) = shared.lock().expect("state lock").hosted.get_mut(&host_pid) {
                        h.calls = (home, local);
                    }
                }
            }
        });
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let r = child.wait().await;
        tracing::info!(host_pid, ?r, "guest host ended");
        shared.lock().expect("state lock").hosted.remove(&host_pid);
    });
    Ok((port, token))
}
