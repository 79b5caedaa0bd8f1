//! A process away from home forks (DESIGN.md, "Process trees"): the child runs where its
//! parent is, in a host fork of the parent's guest host, and its deputy is a host fork of the
//! parent's home process, which mirrors it at home as at-home forks do (descriptors, cwd,
//! credentials, process group, terminal; its host pid is the child's pid; its exit status is
//! the child's). This module is that home side: the child's home process registers with the
//! home node as a process away, connects to the child's guest host and serves its deputy
//! calls, as `mosvm run` serves a process that moved away (paper §3: a migrated process's
//! children are processes of their own, each with its deputy at home).

use crate::link::ForkAway;
use crate::{link, migration, wire};
use std::convert::Infallible;
use std::path::PathBuf;
use vmm::deputy::Deputy;

/// What the child of a fork away from home takes from its parent's home process.
pub(crate) struct Parent {
    /// The home node's control socket.
    pub socket: PathBuf,
    /// The home node's name.
    pub home: String,
    /// The node the parent (and so the child) runs on.
    pub host: String,
    /// The cluster certificate the parent's host proved itself with.
    pub cert: Vec<u8>,
    /// The program, as the node lists it.
    pub program: String,
    /// The parent's descriptors the child must not keep: its link to its host, its
    /// registration with the node.
    pub fds: Vec<std::os::fd::RawFd>,
}

/// In the child of the home process's fork: become the new process's home process. Never
/// returns: the process ends as the guest child does (its status, or death by its signal),
/// or with [`link::LOST_HOST_STATUS`] when the child's host cannot be reached.
pub(crate) fn become_childs_deputy(
    deputy: &mut dyn Deputy,
    f: ForkAway,
    parent: &Parent,
) -> Infallible {
    deputy.forked();
    for &fd in &parent.fds {
        // SAFETY: the child's copies of the parent's link and registration descriptors; the
        // objects that own them are the parent's and are never used or dropped here.
        unsafe { libc::close(fd) };
    }
    let status = match deputy.take() {
        Some(d) => serve_child(d, f, parent).unwrap_or_else(|e| {
            eprintln!("mosvm: the process forked on {}: {e:#}", parent.host);
            link::LOST_HOST_STATUS as i32
        }),
        None => link::LOST_HOST_STATUS as i32,
    };
    match vmm::vm::Outcome::from_wire(status) {
        vmm::vm::Outcome::Signaled(sig) => vmm::vm::die_by(sig),
        vmm::vm::Outcome::Exited(code) => std::process::exit(code),
    }
}

/// Register, connect to the child's guest host, serve it until it ends (and run it here if
/// it comes home): its status.
fn serve_child(mut deputy: Box<dyn Deputy>, f: ForkAway, parent: &Parent) -> anyhow::Result<i32> {
    use anyhow::Context;
    let announce = crate::registration::Announce {
        program: parent.program.clone(),
        locked: false,
        lock: Default::default(),
        program_cell: std::sync::Arc::new(std::sync::Mutex::new(parent.program.clone())),
        current: None,
        away_on: Some(parent.host.clone()),
    };
    // A home node that does not answer now (restarting) is registered with once it does:
    // the child runs meanwhile, as it would natively.
    let reg = crate::registration::register(Some(&parent.socket), announce, Some(&parent.home))
        .context("cannot register with the home node")?;
    let hello = migrate::Hello::new(
        parent.home.as_str(),
        migrate::Purpose::Deputy,
        migration::host_features(),
        Some(f.token),
    );
    let link = wire::connect(f.addr, &parent.cert, hello)
        .with_context(|| format!("connecting to its guest host at {}", f.addr))?;
    match crate::serve_remote(link, &mut deputy, &reg, &parent.host, &parent.cert, None)? {
        Ok(vm) => Ok(crate::run_guest(vm, Some(reg), Some(&parent.socket))?.0),
        Err(status) => Ok(status),
    }
}
