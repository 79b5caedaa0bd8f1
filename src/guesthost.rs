//! `mosvm guest-host`: runs one guest that arrived from another node, in its own process
//! (spawned by the node service, so a crashing guest takes down neither the node nor other
//! guests). Its stdin is the link to the guest's home; it touches none of this host's files:
//! every home-dependent syscall goes to the deputy over the link.

use crate::link::RemoteDeputy;
use crate::migration;
use migrate::{write_message, Message};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

/// Receive, restore and run the guest; report its exit home.
pub fn main() -> ExitCode {
    vmm::vm::install_signal_handlers();
    let link: OwnedFd = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("mosvm guest-host: no link on stdin: {e}");
            return ExitCode::from(2);
        }
    };
    let mut link = UnixStream::from(link);
    let (prepared, state) = match migration::receive(&mut link) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mosvm guest-host: receiving the guest failed: {e:#}");
            return ExitCode::from(1);
        }
    };
    let handle: Arc<OnceLock<vmm::vm::PauseHandle>> = Arc::new(OnceLock::new());
    let (h1, h2) = (handle.clone(), handle.clone());
    let started = RemoteDeputy::start(
        match link.try_clone() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mosvm guest-host: {e}");
                return ExitCode::from(1);
            }
        },
        move |sig| {
            if let Some(h) = h1.get() {
                h.deliver(sig);
            }
        },
        // The deputy is gone: nobody can serve this guest any more. Destroy it.
        move || {
            if let Some(h) = h2.get() {
                h.deliver(libc::SIGKILL);
            }
        },
    );
    let (deputy, writer) = match started {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mosvm guest-host: {e}");
            return ExitCode::from(1);
        }
    };
    let mut vm = match vmm::vm::Vm::restore_prepared(prepared, state, Box::new(deputy)) {
        Ok(vm) => vm,
        Err(e) => {
            let reason = format!("restoring the guest failed: {e:#}");
            if let Ok(mut w) = writer.lock() {
                let _ = write_message(
                    &mut *w,
                    &Message::Abort {
                        reason: reason.clone(),
                    },
                );
            }
            eprintln!("mosvm guest-host: {reason}");
            return ExitCode::from(1);
        }
    };
    let _ = handle.set(vm.pause_handle());
    if let Ok(mut w) = writer.lock() {
        if write_message(&mut *w, &Message::Resumed).is_err() {
            eprintln!("mosvm guest-host: the link closed before the guest resumed");
            return ExitCode::from(1);
        }
    }
    let status = match vm.run() {
        Ok(o) => o.code(),
        Err(e) => {
            eprintln!("mosvm guest-host: {e:#}");
            70
        }
    };
    if let Ok(mut w) = writer.lock() {
        let _ = write_message(&mut *w, &Message::Exit { status });
    }
    ExitCode::SUCCESS
}
