//! A `mosvm run` process and its home node: the registration (the node's commands to the
//! process, the process's reports to the node) and the moves it starts from home.

use crate::{control, link, migration, wire};
use std::path::{Path, PathBuf};

/// A migration whose pre-copy is done and whose guest must now pause for the switch-over.
pub(crate) struct SwitchJob {
    pub(crate) link: wire::Wire,
    /// The cluster certificate the destination proved itself with.
    pub(crate) cert: Vec<u8>,
    /// How the switch-over goes (and the pages it still has to send).
    pub(crate) switch: migration::Switch,
    pub(crate) to: String,
    pub(crate) report: migration::Report,
}

/// What the vCPU thread shares with the registration thread.
pub(crate) struct Registration {
    pub(crate) jobs: std::sync::mpsc::Receiver<SwitchJob>,
    pub(crate) updates: std::sync::Arc<std::sync::Mutex<std::os::unix::net::UnixStream>>,
    /// The link to the node running the guest, while it runs elsewhere: the node's `migrate`
    /// commands then go there.
    pub(crate) remote: RemoteSlot,
    /// This process's home node.
    pub(crate) home: String,
    /// Handles on the VM running here now (it changes when the guest comes home).
    pub(crate) current: Current,
    /// Set while a migration started here is under way.
    pub(crate) busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// CPU time the guest used on hosts it has left, ns.
    pub(crate) remote_cpu_ns: std::sync::atomic::AtomicU64,
    /// The node's control socket.
    pub(crate) socket: PathBuf,
    /// The descriptors of the connection to the node (a forked child closes its copies).
    pub(crate) fds: [std::os::fd::RawFd; 2],
    /// The program's path as it changes (execve).
    pub(crate) program: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Registration {
    /// In the child of a host fork: the parent's registration is not the child's. Its
    /// connection's copies close (the node sees the parent end when it does); nothing else
    /// of it is touched (its threads are not in this process).
    pub(crate) fn abandon(self) {
        MOVE_UNDER_WAY.store(0, std::sync::atomic::Ordering::SeqCst);
        for fd in self.fds {
            // SAFETY: the child's copies of the registration's descriptors, which nothing in
            // the child uses (the registration is forgotten, never dropped).
            unsafe { libc::close(fd) };
        }
        std::mem::forget(self);
    }
}

/// What a process tells its node as it registers.
pub(crate) struct Announce {
    pub(crate) program: String,
    pub(crate) locked: bool,
    /// The guest's lock flag (the node's lock and unlock set it).
    pub(crate) lock: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The program's path as it changes (execve).
    pub(crate) program_cell: std::sync::Arc<std::sync::Mutex<String>>,
    /// The guest running here, if it is here.
    pub(crate) current: Option<CurrentVm>,
    /// The node it runs on, if it is not here.
    pub(crate) away_on: Option<String>,
}

impl Announce {
    pub(crate) fn of(vm: &vmm::vm::Vm) -> Announce {
        Announce {
            program: vm.program().display().to_string(),
            locked: vm.locked(),
            lock: vm.lock_flag(),
            program_cell: vm.program_cell(),
            current: Some(current_of(vm)),
            away_on: None,
        }
    }
}

pub(crate) fn current_of(vm: &vmm::vm::Vm) -> CurrentVm {
    (vm.memory_view(), vm.pause_handle(), vm.call_counts())
}

/// What the registration thread reads of the guest running here: its memory, its pause
/// handle and its system-call counts.
pub(crate) type CurrentVm = (
    vmm::memory::MemView,
    vmm::vm::PauseHandle,
    std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
);

/// The guest running here, while it is here.
pub(crate) type Current = std::sync::Arc<std::sync::Mutex<Option<CurrentVm>>>;

pub(crate) type RemoteSlot = std::sync::Arc<std::sync::Mutex<Option<wire::Wire>>>;

/// The node's request whose move is under way (its id, never 0), until its outcome is sent;
/// 0 when none is.
static MOVE_UNDER_WAY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A move the node asked for (request `id`) is under way from now on.
fn move_accepted(id: u64) {
    MOVE_UNDER_WAY.store(id, std::sync::atomic::Ordering::SeqCst);
}

/// The node the process runs on as its node was last told (`Update::Moved`); None before
/// any move (where it registered).
static RUNS_ON: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Tell the node `u`. The outcome of a move (`Moved`, `MigrationFailed`) without an id is that
/// of the request under way, if any: it carries that request's id, so that the node answers
/// the one who asked (and no other).
pub(crate) fn send_update(
    w: &std::sync::Mutex<std::os::unix::net::UnixStream>,
    u: &control::Update,
) {
    use std::io::Write;
    let mut u = u.clone();
    if let control::Update::Moved { node, .. } = &u {
        *RUNS_ON.lock().unwrap_or_else(|p| p.into_inner()) = Some(node.clone());
    }
    if let control::Update::Moved { id, .. } | control::Update::MigrationFailed { id, .. } = &mut u
    {
        if id.is_none() {
            *id = Some(MOVE_UNDER_WAY.swap(0, std::sync::atomic::Ordering::SeqCst))
                .filter(|&i| i != 0);
        }
    }
    let mut line = serde_json::to_string(&u).unwrap_or_default();
    line.push('\n');
    if let Ok(mut w) = w.lock() {
        let _ = w.write_all(line.as_bytes());
    }
}

/// Ask the home node for a guest host on `to`, connect to it, then pre-copy the running guest.
pub(crate) fn start_migration(
    socket: &Path,
    to: String,
    view: vmm::memory::MemView,
    pause: vmm::vm::PauseHandle,
    home: String,
    program: String,
    mode: control::MoveMode,
) -> anyhow::Result<SwitchJob> {
    let ep = control::endpoint(socket, std::process::id(), &to)?;
    let hello = migrate::Hello::new(
        home.as_str(),
        migrate::Purpose::Migrate,
        migration::host_features(),
        Some(ep.token),
    );
    let mut link = wire::connect(ep.addr, &ep.cert, hello)?;
    let mut report = migration::Report::default();
    let mem = view.size();
    let switch = migration::precopy(
        &mut link,
        &view,
        &pause,
        &migration::Guest {
            pid: std::process::id(),
            home: &home,
            program: &program,
            mem_bytes: mem,
        },
        mode,
        &mut report,
    )?;
    Ok(SwitchJob {
        link,
        cert: ep.cert,
        switch,
        to,
        report,
    })
}

/// Register with the home node when one is reachable; run standalone otherwise. A thread
/// keeps the registration (the node sees the process end when it closes), reports guest
/// memory, and applies the node's commands: lock/unlock, and migrate (pre-copy runs on that
/// thread; the switch-over is handed to the vCPU thread through `jobs`).
///
/// `later_as`: when no node answers now, register once one does, as a process of home node
/// `later_as` (a child forked away from home while its node restarts); None: run standalone.
pub(crate) fn register(
    socket: Option<&Path>,
    a: Announce,
    later_as: Option<&str>,
) -> Option<Registration> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let path = control::socket_path(socket);
    let (stream, later) = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => (s, None),
        Err(_) => {
            // A connection already closed: the registration thread registers again (here,
            // for the first time) once a node serves the socket.
            let (s, _closed) = std::os::unix::net::UnixStream::pair().ok()?;
            (s, Some(later_as?.to_string()))
        }
    };
    *RUNS_ON.lock().unwrap_or_else(|p| p.into_inner()) = a.away_on.clone();
    let req = control::Request::Register {
        pid: std::process::id(),
        program: a.program.clone(),
        locked: a.locked,
        away_on: a.away_on,
    };
    let current: Current = std::sync::Arc::new(std::sync::Mutex::new(a.current));
    let now = current.clone();
    let lock = a.lock;
    let prog = a.program;
    let mut w = stream.try_clone().ok()?;
    let fds = [stream.as_raw_fd(), w.as_raw_fd()];
    let mut r = std::io::BufReader::new(stream);
    let home = match later {
        Some(home) => home,
        None => {
            let mut line = serde_json::to_string(&req).ok()?;
            line.push('\n');
            w.write_all(line.as_bytes()).ok()?;
            let mut answer = String::new();
            r.read_line(&mut answer).ok()?;
            match serde_json::from_str::<control::Reply>(&answer).ok()? {
                control::Reply::Registered { node } => node,
                _ => return None,
            }
        }
    };
    let updates = std::sync::Arc::new(std::sync::Mutex::new(w));
    let (tx, jobs) = std::sync::mpsc::channel();
    let remote: RemoteSlot = Default::default();
    // A migration is under way from here (one at a time).
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy_r = busy.clone();
    let (remote_r, home_r) = (remote.clone(), home.clone());
    let upd = updates.clone();
    let program = a.program_cell;
    let program_r = program.clone();
    let socket_path = path.clone();
    // What the node was told: the program may change (execve) before this thread starts.
    let mut shown = prog.clone();
    std::thread::spawn(move || {
        link::block_host_signals();
        let _ = r
            .get_ref()
            .set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let mut pinned: Option<String> = None;
        loop {
            let mut l = String::new();
            match r.read_line(&mut l) {
                Ok(0) => {
                    // The node went away (stopped, or restarting): the process goes on, and
                    // registers again once a node serves the socket.
                    let program = program.lock().map(|p| p.clone()).unwrap_or_default();
                    let locked = lock.load(std::sync::atomic::Ordering::SeqCst);
                    let home = home.clone();
                    let again = || reregister(&path, fds, &home, &program, locked);
                    while !again() {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                    let _ = r
                        .get_ref()
                        .set_read_timeout(Some(std::time::Duration::from_secs(1)));
                    // What the node knew of the process before is told again.
                    shown = program;
                    pinned = None;
                    continue;
                }
                Ok(_) => match serde_json::from_str(&l) {
                    Ok(control::Command::SetLocked { locked }) => {
                        lock.store(locked, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(control::Command::Migrate { to, id, mode })
                        if remote.lock().map(|r| r.is_some()).unwrap_or(false) =>
                    {
                        if mode == control::MoveMode::Postcopy {
                            // Its host would need its node to create the userfaultfd and keep
                            // a copy of the memory it sends: only home does that.
                            send_update(
                                &upd,
                                &control::Update::MigrationFailed {
                                    reason: "a post-copy move starts from home only, and \
                                             this process runs on another node: move it \
                                             without --postcopy"
                                        .to_string(),
                                    id: Some(id),
                                },
                            );
                            continue;
                        }
                        move_accepted(id);
                        // The guest runs elsewhere: ask its host to move it (home = back here).
                        let msg = if to == "home" || to == home {
                            migrate::Message::MigrateBack
                        } else {
                            migrate::Message::MigrateTo { node: to }
                        };
                        if let Some(w) = remote.lock().ok().and_then(|r| r.clone()) {
                            let _ = w.send(&msg);
                        }
                    }
                    Ok(control::Command::Migrate { to, id, mode }) => {
                        // A refusal is this request's outcome alone: the move under way, if
                        // any, goes on.
                        let refuse = |reason: String| {
                            send_update(
                                &upd,
                                &control::Update::MigrationFailed {
                                    reason,
                                    id: Some(id),
                                },
                            )
                        };
                        if busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            refuse("a migration is already under way".to_string());
                            continue;
                        }
                        let Some((view, pause, _)) = now.lock().ok().and_then(|c| c.clone()) else {
                            busy.store(false, std::sync::atomic::Ordering::SeqCst);
                            refuse("the process is not ready to move yet".to_string());
                            continue;
                        };
                        if let Some(why) = view.pinned() {
                            // The node had not heard yet: refuse here, without a word on the
                            // program's own stderr.
                            busy.store(false, std::sync::atomic::Ordering::SeqCst);
                            refuse(format!("the process stays at home: {why}"));
                            continue;
                        }
                        move_accepted(id);
                        let busy = busy.clone();
                        let program = prog.clone();
                        let (view, pause, home, path, tx, upd) = (
                            view,
                            pause,
                            home.clone(),
                            path.clone(),
                            tx.clone(),
                            upd.clone(),
                        );
                        std::thread::spawn(move || {
                            link::block_host_signals();
                            match start_migration(
                                &path,
                                to.clone(),
                                view.clone(),
                                pause.clone(),
                                home,
                                program,
                                mode,
                            ) {
                                Ok(job) => {
                                    if tx.send(job).is_ok() {
                                        pause.request();
                                    }
                                }
                                Err(e) => {
                                    // The node and `mosvm migrate` report it; the
                                    // program's own stderr stays as it is natively.
                                    busy.store(false, std::sync::atomic::Ordering::SeqCst);
                                    send_update(
                                        &upd,
                                        &control::Update::MigrationFailed {
                                            reason: format!("{e:#}"),
                                            id: None,
                                        },
                                    );
                                }
                            }
                        });
                    }
                    Err(_) => {}
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            let prog = program.lock().map(|p| p.clone()).unwrap_or_default();
            if prog != shown {
                send_update(
                    &upd,
                    &control::Update::Program {
                        program: prog.clone(),
                    },
                );
                shown = prog;
            }
            if let Some(c) = now.lock().ok().as_ref().and_then(|c| c.as_ref()) {
                send_update(&upd, &control::Update::Memory { bytes: c.0.used() });
                let n = |i: usize| c.2[i].load(std::sync::atomic::Ordering::Relaxed);
                send_update(
                    &upd,
                    &control::Update::Calls {
                        home: n(0),
                        local: n(1),
                    },
                );
                let why = c.0.pinned().map(str::to_string);
                if why != pinned {
                    send_update(
                        &upd,
                        &control::Update::Pinned {
                            reason: why.clone(),
                        },
                    );
                    pinned = why;
                }
            }
        }
    });
    Some(Registration {
        jobs,
        updates,
        remote: remote_r,
        home: home_r,
        current,
        busy: busy_r,
        remote_cpu_ns: Default::default(),
        socket: socket_path,
        fds,
        program: program_r,
    })
}

/// Register process again with the node at `path` (a node that restarted), over a new
/// connection put in place of the old one's descriptors `fds` (so the guest's descriptor
/// numbers, and what a forked child closes, stay as they were). True once the node took it.
fn reregister(
    path: &Path,
    fds: [std::os::fd::RawFd; 2],
    home: &str,
    program: &str,
    locked: bool,
) -> bool {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let Ok(stream) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    for fd in fds {
        // SAFETY: `fd` is one of the registration's own descriptors (its connection, closed
        // by the node): dup2 replaces it with the new connection in one step.
        if unsafe { libc::dup2(stream.as_raw_fd(), fd) } < 0 {
            return false;
        }
    }
    let away_on = RUNS_ON
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(|n| n != home);
    let req = control::Request::Register {
        pid: std::process::id(),
        program: program.to_string(),
        locked,
        away_on,
    };
    let Ok(mut line) = serde_json::to_string(&req) else {
        return false;
    };
    line.push('\n');
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if (&stream).write_all(line.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let mut r = std::io::BufReader::new(&stream);
    if r.read_line(&mut answer).is_err() {
        return false;
    }
    matches!(
        serde_json::from_str::<control::Reply>(&answer),
        Ok(control::Reply::Registered { .. })
    )
}
