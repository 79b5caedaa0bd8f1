//! `mosvm guest-host`: runs one guest that arrived from another node, in its own process
//! (spawned by the node service, so a crashing guest takes down neither the node nor other
//! guests). Its stdin is the link to the guest's home; it touches none of this host's files:
//! every home-dependent syscall goes to the deputy over the link. Home can ask it to move the
//! guest on to another node (`MigrateTo`) or back home (`MigrateBack`).

use crate::link::{RemoteDeputy, Router};
use crate::migration::{self, Conn, Report, Routed};
use migrate::{read_message, write_message, Message};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

/// A move whose pre-copy is done; the vCPU thread does the switch-over.
struct Job {
    conn: Box<dyn Conn + Send>,
    /// The new link, when moving on to another node (None: back home over the home link).
    onward: Option<(UnixStream, String)>,
    pending: Vec<u64>,
    report: Report,
}

/// Send one message home over the shared link writer (best effort: a lost link is noticed by
/// the reader).
fn tell(writer: &Mutex<UnixStream>, m: &Message) -> bool {
    writer
        .lock()
        .map(|mut w| write_message(&mut *w, m).is_ok())
        .unwrap_or(false)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("mosvm guest-host: {msg}");
    ExitCode::from(1)
}

/// Ask this node for a link to `to` (the same request `mosvm run` makes at home).
fn link_to(to: &str, pid: u32) -> anyhow::Result<UnixStream> {
    use std::io::{Read, Write};
    let sock = crate::control::socket_path(None);
    let mut s = UnixStream::connect(&sock)?;
    let mut line = serde_json::to_string(&crate::control::Request::Link { pid, to: to.into() })?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        answer.push(b[0]);
    }
    match serde_json::from_slice::<crate::control::Reply>(&answer)? {
        crate::control::Reply::Ok => Ok(s),
        crate::control::Reply::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// Receive, restore and run the guest; report its exit home.
pub fn main() -> ExitCode {
    vmm::vm::install_signal_handlers();
    let link: OwnedFd = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => return fail(&format!("no link on stdin: {e}")),
    };
    let mut link = UnixStream::from(link);
    let arrived = migration::receive(&mut link, None, &mut |m| {
        anyhow::bail!("unexpected {:?} before the guest resumed", m.kind())
    });
    let (prepared, state, offer) = match arrived {
        Ok(x) => x,
        Err(e) => return fail(&format!("receiving the guest failed: {e:#}")),
    };
    let handle: Arc<OnceLock<vmm::vm::PauseHandle>> = Arc::new(OnceLock::new());
    let view_slot: Arc<OnceLock<vmm::memory::MemView>> = Arc::new(OnceLock::new());
    let (mig_tx, mig_rx) = mpsc::channel();
    let inbox = Arc::new(Mutex::new(mig_rx));
    let forward = Arc::new(Mutex::new(None));
    let (job_tx, jobs) = mpsc::channel::<Job>();
    let writer_slot: Arc<OnceLock<Arc<Mutex<UnixStream>>>> = Arc::new(OnceLock::new());
    let (h1, h2, h3, h4) = (
        handle.clone(),
        handle.clone(),
        handle.clone(),
        handle.clone(),
    );
    let (v3, w3, in3) = (view_slot.clone(), writer_slot.clone(), inbox.clone());
    let (pid, home, mem_bytes) = (offer.pid, offer.home_node.clone(), offer.mem_bytes);
    let program = offer.program.clone();
    // Set while a move this host started is under way.
    let moving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mv1, mv2, mv3) = (moving.clone(), moving.clone(), moving.clone());
    let router = Router {
        on_signal: Box::new(move |sig| {
            if let Some(h) = h1.get() {
                h.deliver(sig);
            }
        }),
        // The deputy is gone: nobody can serve this guest any more. Destroy it.
        on_lost: Box::new(move || {
            if let Some(h) = h2.get() {
                h.deliver(libc::SIGKILL);
            }
        }),
        on_command: Box::new(move |m| {
            let (Some(pause), Some(view), Some(writer)) = (h3.get(), v3.get(), w3.get()) else {
                return;
            };
            let (pause, view, writer, inbox) =
                (pause.clone(), view.clone(), writer.clone(), in3.clone());
            let (tx, home) = (job_tx.clone(), home.clone());
            let program = program.clone();
            if mv1.swap(true, std::sync::atomic::Ordering::SeqCst) {
                // One move at a time.
                let reason = "a move is already under way".to_string();
                tell(&writer, &Message::Abort { reason });
                return;
            }
            let mv = mv1.clone();
            std::thread::spawn(move || {
                crate::link::block_host_signals();
                let mut report = Report::default();
                let kick = || pause.kick();
                let guest = migration::Guest {
                    pid,
                    home: &home,
                    program: &program,
                    mem_bytes,
                };
                let started = match m {
                    Message::MigrateBack => {
                        let mut conn = Routed {
                            writer: writer.clone(),
                            inbox,
                        };
                        migration::precopy(&mut conn, &view, &kick, &guest, &mut report).map(
                            |pending| Job {
                                conn: Box::new(conn),
                                onward: None,
                                pending,
                                report,
                            },
                        )
                    }
                    Message::MigrateTo { node } => link_to(&node, pid).and_then(|mut l| {
                        let pending =
                            migration::precopy(&mut l, &view, &kick, &guest, &mut report)?;
                        let relay = l.try_clone()?;
                        Ok(Job {
                            conn: Box::new(l),
                            onward: Some((relay, node)),
                            pending,
                            report,
                        })
                    }),
                    _ => return,
                };
                match started {
                    Ok(job) => {
                        if tx.send(job).is_ok() {
                            pause.request();
                        }
                    }
                    Err(e) => {
                        mv.store(false, std::sync::atomic::Ordering::SeqCst);
                        let _ = view.stop_dirty_log();
                        let reason = format!("{e:#}");
                        tell(&writer, &Message::Abort { reason });
                    }
                }
            });
        }),
        migration: mig_tx,
        forward: forward.clone(),
        must_move: Box::new(move || mv2.load(std::sync::atomic::Ordering::SeqCst)),
        pausing: Box::new(move || h4.get().is_some_and(|h| h.requested())),
    };
    let reader = match link.try_clone() {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    let (deputy, writer) = match RemoteDeputy::start(reader, router) {
        Ok(x) => x,
        Err(e) => return fail(&e.to_string()),
    };
    let _ = writer_slot.set(writer.clone());
    let mut vm = match vmm::vm::Vm::restore_prepared(prepared, state, Box::new(deputy)) {
        Ok(vm) => vm,
        Err(e) => {
            let reason = format!("restoring the guest failed: {e:#}");
            tell(
                &writer,
                &Message::Abort {
                    reason: reason.clone(),
                },
            );
            return fail(&reason);
        }
    };
    let _ = handle.set(vm.pause_handle());
    let _ = view_slot.set(vm.memory_view());
    if !tell(&writer, &Message::Resumed) {
        return fail("the link closed before the guest resumed");
    }
    loop {
        match vm.run_or_pause() {
            Ok(Some(out)) => {
                tell(&writer, &Message::Exit { status: out.code() });
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("mosvm guest-host: {e:#}");
                tell(&writer, &Message::Exit { status: 70 });
                return ExitCode::SUCCESS;
            }
            Ok(None) => {}
        }
        let pause = vm.pause_handle();
        let Ok(mut job) = jobs.recv_timeout(Duration::from_secs(5)) else {
            pause.clear();
            continue;
        };
        let view = vm.memory_view();
        let delta = job.report.clock_delta_ns;
        let state = vm.capture().and_then(|mut s| {
            s.shift_realtime(delta);
            s.encode()
        });
        let switched = state.and_then(|s| {
            migration::switch_over(&mut *job.conn, &view, &job.pending, &s, &mut job.report)
        });
        match (switched, job.onward.take()) {
            // Home has its guest back; this host is done.
            (Ok(()), None) => return ExitCode::SUCCESS,
            // The guest runs on another node now: relay between it and home until either ends.
            (Ok(()), Some((mut next, node))) => {
                drop(vm);
                tell(&writer, &Message::Moved { node });
                if let Ok(mut f) = forward.lock() {
                    *f = next.try_clone().ok();
                }
                while let Ok(m) = read_message(&mut next) {
                    let ok = tell(&writer, &m);
                    if !ok {
                        break;
                    }
                }
                return ExitCode::SUCCESS;
            }
            (Err(e), _) => {
                mv3.store(false, std::sync::atomic::Ordering::SeqCst);
                let _ = view.stop_dirty_log();
                let reason = format!("{e:#}");
                tell(&writer, &Message::Abort { reason });
                pause.clear();
            }
        }
    }
}
