//! `mosvm guest-host`: runs one guest that arrived from another node, in its own process
//! (spawned by the node service, so a crashing guest takes down neither the node nor other
//! guests). Its stdin is a listening socket: the guest's source connects to it directly, then
//! (when the source was not home) home connects its deputy channel. Both must present the
//! token the node handed out (`MOSVM_TOKEN`); the guest host proves itself with the cluster
//! key (`MOSVM_KEY_DIR`). It touches none of this host's files: every home-dependent syscall
//! goes to the deputy over the link. Home can ask it to move the guest on to another node
//! (`MigrateTo`, straight to that node's guest host) or back home (`MigrateBack`).

use crate::link::{HomeLink, RemoteDeputy, Router};
use crate::migration::{self, Conn, Report, Routed};
use crate::wire::{self, Wire};
use migrate::handshake::ServerIdentity;
use migrate::{Message, Purpose};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the guest host waits for its source to connect.
const SOURCE_LIMIT: Duration = Duration::from_secs(30);

/// A move whose pre-copy is done; the vCPU thread does the switch-over.
struct Job {
    conn: Box<dyn Conn + Send>,
    /// Where the guest goes when moving on to another node (None: back home over the home
    /// link): the node's name and its guest host's endpoint.
    onward: Option<(String, crate::control::Endpoint)>,
    pending: Vec<u64>,
    report: Report,
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("mosvm guest-host: {msg}");
    ExitCode::from(1)
}

/// What the node handed this guest host.
struct Setup {
    listener: TcpListener,
    token: [u8; 32],
    tls: migrate::ClusterTls,
    ours: ServerIdentity,
}

fn setup() -> anyhow::Result<Setup> {
    use anyhow::Context;
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let token = crate::control::unhex(&var("MOSVM_TOKEN")?)
        .and_then(|t| <[u8; 32]>::try_from(t).ok())
        .context("MOSVM_TOKEN is not a 256-bit hex token")?;
    let key_dir = var("MOSVM_KEY_DIR")?;
    let tls = migrate::ClusterTls::load(std::path::Path::new(&key_dir))?;
    let listener = TcpListener::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    listener
        .local_addr()
        .context("stdin is not a listening socket")?;
    let ours = ServerIdentity {
        node_name: var("MOSVM_NODE")?,
        host_cpu: migration::host_features(),
    };
    Ok(Setup {
        listener,
        token,
        tls,
        ours,
    })
}

/// Accept the first connection whose Hello is for `purpose` with our token, until `limit`;
/// others are refused and logged.
fn accept(s: &Setup, purpose: Purpose, limit: Duration) -> anyhow::Result<(Wire, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "nobody connected within {limit:?}");
        let mut p = libc::pollfd {
            fd: s.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
            continue;
        }
        let (sock, peer) = s.listener.accept()?;
        let check = |p: Purpose, t: Option<&[u8; 32]>| {
            if p != purpose {
                return Err(format!("this guest host expects {purpose:?}, not {p:?}"));
            }
            match t {
                Some(t) if migrate::tls::tokens_equal(t, &s.token) => Ok(()),
                _ => Err("wrong or missing token".into()),
            }
        };
        match wire::accept(sock, s.tls.endpoint_config(), &s.ours, check) {
            Ok((w, hello)) => return Ok((w, hello.node_name)),
            Err(e) => eprintln!("mosvm guest-host: refused {peer}: {e:#}"),
        }
    }
}

/// CPU time this process has used, ns.
fn own_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the rusage it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// The node hosting this guest host is gone: so is the guest.
fn die_with_parent() {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes only this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() == 1 {
            libc::_exit(1);
        }
    }
}

/// Receive, restore and run the guest; report its exit home.
pub fn main() -> ExitCode {
    die_with_parent();
    vmm::vm::install_signal_handlers();
    // The node stops and continues this process when the guest is stopped at home.
    vmm::vm::parent_sigcont_is_the_hosts();
    let setup = match setup() {
        Ok(s) => s,
        Err(e) => return fail(&format!("{e:#}")),
    };
    let (mut mig, source) = match accept(&setup, Purpose::Migrate, SOURCE_LIMIT) {
        Ok(x) => x,
        Err(e) => return fail(&format!("waiting for the guest: {e:#}")),
    };
    let arrived = migration::receive(&mut mig, None, &mut |m| {
        anyhow::bail!("unexpected {:?} before the guest resumed", m.kind())
    });
    let (prepared, state, offer) = match arrived {
        Ok(x) => x,
        Err(e) => return fail(&format!("receiving the guest failed: {e:#}")),
    };
    // From home, the migration's link becomes the deputy channel; from another node, home
    // connects once that node reports the move.
    let from_home = source == offer.home_node;
    let home_link = if from_home {
        HomeLink::attached(mig.clone())
    } else {
        HomeLink::default()
    };
    let handle: Arc<OnceLock<vmm::vm::PauseHandle>> = Arc::new(OnceLock::new());
    let view_slot: Arc<OnceLock<vmm::memory::MemView>> = Arc::new(OnceLock::new());
    let (mig_tx, mig_rx) = mpsc::channel();
    let inbox = Arc::new(Mutex::new(mig_rx));
    let (job_tx, jobs) = mpsc::channel::<Job>();
    let (h1, h2, h3, h4) = (
        handle.clone(),
        handle.clone(),
        handle.clone(),
        handle.clone(),
    );
    let (v3, hl3, in3) = (view_slot.clone(), home_link.clone(), inbox.clone());
    let (pid, home, mem_bytes) = (offer.pid, offer.home_node.clone(), offer.mem_bytes);
    let program = offer.program.clone();
    let me = setup.ours.node_name.clone();
    // Set while a move this host started is under way.
    let moving = Arc::new(AtomicBool::new(false));
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
            let (Some(pause), Some(view)) = (h3.get(), v3.get()) else {
                return;
            };
            let (pause, view, home_link, inbox) =
                (pause.clone(), view.clone(), hl3.clone(), in3.clone());
            let (tx, home, me) = (job_tx.clone(), home.clone(), me.clone());
            let program = program.clone();
            if mv1.swap(true, Ordering::SeqCst) {
                // One move at a time.
                let reason = "a move is already under way".to_string();
                home_link.tell(&Message::Abort { reason });
                return;
            }
            let mv = mv1.clone();
            std::thread::spawn(move || {
                crate::link::block_host_signals();
                let mut report = Report::default();
                let guest = migration::Guest {
                    pid,
                    home: &home,
                    program: &program,
                    mem_bytes,
                };
                let started = match m {
                    Message::MigrateBack => home_link
                        .get()
                        .ok_or_else(|| anyhow::anyhow!("no link home"))
                        .and_then(|writer| {
                            let mut conn = Routed { writer, inbox };
                            let pending =
                                migration::precopy(&mut conn, &view, &pause, &guest, &mut report)?;
                            Ok(Job {
                                conn: Box::new(conn),
                                onward: None,
                                pending,
                                report,
                            })
                        }),
                    Message::MigrateTo { node } => {
                        let sock = crate::control::socket_path(None);
                        crate::control::endpoint(&sock, pid, &node).and_then(|ep| {
                            let hello = migrate::Hello::new(
                                me.as_str(),
                                Purpose::Migrate,
                                migration::host_features(),
                                Some(ep.token),
                            );
                            let mut l = wire::connect(ep.addr, &ep.cert, hello)?;
                            let pending =
                                migration::precopy(&mut l, &view, &pause, &guest, &mut report)?;
                            Ok(Job {
                                conn: Box::new(l),
                                onward: Some((node, ep)),
                                pending,
                                report,
                            })
                        })
                    }
                    _ => return,
                };
                match started {
                    Ok(job) => {
                        if tx.send(job).is_ok() {
                            pause.request();
                        }
                    }
                    Err(e) => {
                        mv.store(false, Ordering::SeqCst);
                        let reason = format!("{e:#}");
                        home_link.tell(&Message::Abort { reason });
                    }
                }
            });
        }),
        migration: mig_tx,
        must_move: Box::new(move || mv2.load(Ordering::SeqCst)),
        pausing: Box::new(move || h4.get().is_some_and(|h| h.requested())),
    };
    let deputy = RemoteDeputy::start(home_link.clone(), router);
    let mut vm = match vmm::vm::Vm::restore_prepared(prepared, state, Box::new(deputy)) {
        Ok(vm) => vm,
        Err(e) => {
            let reason = format!("restoring the guest failed: {e:#}");
            let _ = mig.send(&Message::Abort {
                reason: reason.clone(),
            });
            return fail(&reason);
        }
    };
    let _ = handle.set(vm.pause_handle());
    let _ = view_slot.set(vm.memory_view());
    if mig.send(&Message::Resumed).is_err() {
        return fail("the link closed before the guest resumed");
    }
    // Tell home now and then what the guest uses here (for `ps` at home), and this node its
    // system calls so far (a line of JSON on stdout, for the node's balancer).
    {
        let (hl, view, calls) = (home_link.clone(), vm.memory_view(), vm.call_counts());
        std::thread::spawn(move || {
            use std::io::Write as _;
            use std::sync::atomic::Ordering::Relaxed;
            crate::link::block_host_signals();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let usage = Message::Usage {
                    cpu_ns: own_cpu_ns(),
                    mem_bytes: view.used(),
                };
                if !hl.tell(&usage) {
                    return;
                }
                let line = crate::control::Update::Calls {
                    home: calls[0].load(Relaxed),
                    local: calls[1].load(Relaxed),
                };
                if let Ok(l) = serde_json::to_string(&line) {
                    // The node may be gone: then nobody reads, and that is fine.
                    let _ = writeln!(std::io::stdout(), "{l}");
                }
            }
        });
    }
    if !from_home {
        // The source is done with us; home connects its deputy channel.
        drop(mig);
        let (hl, pause) = (home_link.clone(), vm.pause_handle());
        std::thread::spawn(move || {
            crate::link::block_host_signals();
            match accept(&setup, Purpose::Deputy, crate::link::ATTACH_LIMIT) {
                Ok((w, _)) => hl.attach(w),
                Err(e) => {
                    eprintln!("mosvm guest-host: home never connected: {e:#}");
                    pause.deliver(libc::SIGKILL);
                }
            }
            // No one else may connect: the listening socket closes here.
            drop(setup);
        });
    } else {
        // Everything came over the one connection: stop listening.
        drop(setup);
    }
    loop {
        match vm.run_or_pause() {
            Ok(Some(out)) => {
                home_link.tell_last(&Message::Exit {
                    status: out.to_wire(),
                });
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("mosvm guest-host: {e:#}");
                home_link.tell_last(&Message::Exit { status: 70 });
                return ExitCode::SUCCESS;
            }
            Ok(None) => {}
        }
        let pause = vm.pause_handle();
        let Ok(mut job) = jobs.recv_timeout(Duration::from_secs(5)) else {
            pause.clear();
            continue;
        };
        let switched = migration::switch_vm(&mut *job.conn, &mut vm, &job.pending, &mut job.report);
        match (switched, job.onward.take()) {
            // Home has its guest back; this host is done.
            (Ok(()), None) => {
                if let Some(w) = home_link.get() {
                    w.close(Duration::from_secs(2));
                }
                return ExitCode::SUCCESS;
            }
            // The guest runs on another node now: home connects there; this host is done.
            (Ok(()), Some((node, ep))) => {
                drop(vm);
                home_link.tell_last(&Message::Moved {
                    node,
                    addr: ep.addr.to_string(),
                    token: ep.token,
                });
                return ExitCode::SUCCESS;
            }
            (Err(e), _) => {
                mv3.store(false, Ordering::SeqCst);
                let reason = format!("{e:#}");
                home_link.tell(&Message::Abort { reason });
                pause.clear();
            }
        }
    }
}
