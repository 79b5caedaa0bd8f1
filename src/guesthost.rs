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
    switch: migration::Switch,
    report: Report,
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("mosvm guest-host: {msg}");
    ExitCode::from(1)
}

/// How this guest host proves itself, and which Hellos it takes.
struct Identity {
    tls: migrate::ClusterTls,
    ours: ServerIdentity,
}

/// What the node handed this guest host.
struct Setup {
    /// Its channel to the node.
    node: Arc<crate::hostchan::Channel>,
    listener: TcpListener,
    token: [u8; 32],
    id: Arc<Identity>,
}

/// A spare guest host's assignment pipe: the descriptor this variable names.
pub(crate) const ASSIGN_ENV: &str = "MOSVM_ASSIGN";
/// A spare guest host's pool of touched memory, bytes.
pub(crate) const POOL_ENV: &str = "MOSVM_POOL";

/// A 256-bit token from its hex form.
fn token_of(hex: &str) -> Option<[u8; 32]> {
    crate::control::unhex(hex.trim()).and_then(|t| <[u8; 32]>::try_from(t).ok())
}

/// The spare's assignment pipe and pool size, when this guest host is a spare.
fn spare_env() -> Option<(std::os::fd::RawFd, u64)> {
    let fd = std::env::var(ASSIGN_ENV).ok()?.parse().ok()?;
    let pool = std::env::var(POOL_ENV).ok()?.parse().ok()?;
    Some((fd, pool))
}

/// A spare: touch a pool of `pool` bytes (a quarter of one CPU at most) while waiting on pipe
/// `fd` for the token of the guest to receive. None when the node closed the pipe without one
/// (it stopped, or retired the spare).
fn await_guest(
    fd: std::os::fd::RawFd,
    pool: u64,
) -> anyhow::Result<Option<([u8; 32], Option<vmm::pool::Pool>)>> {
    use std::io::Read as _;
    use std::os::fd::FromRawFd;
    let filling = vmm::pool::Pool::reserve(pool)
        .ok()
        .map(vmm::pool::Pool::fill_in_background);
    // SAFETY: the node passed this pipe's reading end at `fd` for this process alone.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() <= 64 {
        match pipe.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if line.is_empty() {
        return Ok(None);
    }
    let token = std::str::from_utf8(&line)
        .ok()
        .and_then(token_of)
        .ok_or_else(|| anyhow::anyhow!("the node's assignment is not a 256-bit hex token"))?;
    Ok(Some((token, filling.map(vmm::pool::Filling::finish))))
}

/// Everything but the token (a spare learns it later).
fn setup(spare: bool) -> anyhow::Result<Setup> {
    use anyhow::Context;
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let token = if spare {
        [0; 32]
    } else {
        token_of(&var("MOSVM_TOKEN")?).context("MOSVM_TOKEN is not a 256-bit hex token")?
    };
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
    let node = crate::hostchan::Channel::inherited()?;
    Ok(Setup {
        node,
        listener,
        token,
        id: Arc::new(Identity { tls, ours }),
    })
}

/// Accept on `listener` the first connection whose Hello is for `purpose` with `token`,
/// until `limit`; others are refused and logged.
fn accept(
    listener: &TcpListener,
    token: &[u8; 32],
    id: &Identity,
    purpose: Purpose,
    limit: Duration,
) -> anyhow::Result<(Wire, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "nobody connected within {limit:?}");
        let mut p = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
            continue;
        }
        let (sock, peer) = listener.accept()?;
        let check = |p: Purpose, t: Option<&[u8; 32]>| {
            if p != purpose {
                return Err(format!("this guest host expects {purpose:?}, not {p:?}"));
            }
            match t {
                Some(t) if migrate::tls::tokens_equal(t, token) => Ok(()),
                _ => Err("wrong or missing token".into()),
            }
        };
        match wire::accept(sock, id.tls.endpoint_config(), &id.ours, check) {
            Ok((w, hello)) => return Ok((w, hello.node_name)),
            Err(e) => eprintln!("mosvm guest-host: refused {peer}: {e:#}"),
        }
    }
}

/// Accept home's deputy channel on `listener` (another thread), and attach it to
/// `home_link`; the guest is destroyed if home does not connect in time.
fn await_home(
    listener: TcpListener,
    token: [u8; 32],
    id: Arc<Identity>,
    home_link: HomeLink,
    pause: vmm::vm::PauseHandle,
) {
    std::thread::spawn(move || {
        crate::link::block_host_signals();
        match accept(
            &listener,
            &token,
            &id,
            Purpose::Deputy,
            crate::link::ATTACH_LIMIT,
        ) {
            Ok((w, _)) => home_link.attach(w),
            Err(e) => {
                eprintln!("mosvm guest-host: home never connected: {e:#}");
                pause.deliver(libc::SIGKILL);
            }
        }
        // No one else may connect: the listening socket closes here.
    });
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

/// Who the guest is, as the moves this host starts describe it.
#[derive(Clone)]
struct GuestInfo {
    pid: u32,
    home: String,
    program: String,
    mem_bytes: u64,
    /// This node's name.
    me: String,
}

/// A guest's plumbing on this host: its link home and what the link's reader acts on.
struct Plumbing {
    home_link: HomeLink,
    /// Moves whose pre-copy is done.
    jobs: mpsc::Receiver<Job>,
    /// Set while a move this host started is under way.
    moving: Arc<AtomicBool>,
    handle: Arc<OnceLock<vmm::vm::PauseHandle>>,
    view_slot: Arc<OnceLock<vmm::memory::MemView>>,
    /// The guest's memory while its pages arrive by post-copy.
    postcopy: Arc<OnceLock<Arc<vmm::postcopy::Faults>>>,
    /// Home has been told the post-copy is complete.
    told_done: Arc<AtomicBool>,
}

/// Whether a post-copy into this host is under way (some of the guest's pages are still at
/// home).
fn arriving(pc: &OnceLock<Arc<vmm::postcopy::Faults>>) -> bool {
    pc.get().is_some_and(|f| !f.complete())
}

/// Tell home, once (`told`), that every page of the post-copy into `f` has arrived.
fn tell_done(f: &vmm::postcopy::Faults, told: &AtomicBool, home: &HomeLink) {
    if !told.swap(true, Ordering::SeqCst) {
        home.tell(&Message::PostcopyDone { faults: f.faults() });
    }
}

/// The guest cannot go on here (its pages cannot all arrive): end this guest host now. Its
/// threads may wait in page faults nothing will answer, so nothing waits for them.
fn lost_during_postcopy(why: &str) -> ! {
    eprintln!("mosvm guest-host: {why} while the guest's memory was still arriving (post-copy); the guest is lost");
    // SAFETY: _exit ends the process at once; nothing of it is used after.
    unsafe { libc::_exit(1) }
}

impl Plumbing {
    /// The plumbing for guest `g` over `home_link`, and the deputy its VM calls home through.
    /// `postcopy`: the guest arrived by post-copy into these faults: the pages that follow
    /// are put in (from the first one the link's reader sees).
    fn new(
        g: &GuestInfo,
        home_link: HomeLink,
        arriving_into: Option<Arc<vmm::postcopy::Faults>>,
    ) -> (Plumbing, RemoteDeputy) {
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
        let postcopy: Arc<OnceLock<Arc<vmm::postcopy::Faults>>> = Arc::new(OnceLock::new());
        if let Some(f) = arriving_into {
            // Its faults ask home for the pages they need.
            let home = home_link.clone();
            f.serve(move |pages| {
                home.tell(&Message::PageRequest { pages });
            });
            let _ = postcopy.set(f);
        }
        let told_done = Arc::new(AtomicBool::new(false));
        let (pc1, pc2, pc3) = (postcopy.clone(), postcopy.clone(), postcopy.clone());
        let (hl4, told) = (home_link.clone(), told_done.clone());
        let g = g.clone();
        let moving = Arc::new(AtomicBool::new(false));
        let (mv1, mv2) = (moving.clone(), moving.clone());
        // Start a move (one at a time): home's command, or the guest's own need to be home
        // (`quiet`: a move already under way is no failure to tell home of).
        let start = Arc::new(move |m: Message, quiet: bool| {
            let (Some(pause), Some(view)) = (h3.get(), v3.get()) else {
                return;
            };
            let (pause, view, home_link, inbox) =
                (pause.clone(), view.clone(), hl3.clone(), in3.clone());
            let (tx, g) = (job_tx.clone(), g.clone());
            if mv1.swap(true, Ordering::SeqCst) {
                if !quiet {
                    // Refused, not aborted: the move under way may be the one home receives.
                    let reason = "a move is already under way".to_string();
                    home_link.tell(&Message::MigrateRefuse { reason });
                }
                return;
            }
            let mv = mv1.clone();
            let pc = pc1.clone();
            std::thread::spawn(move || {
                crate::link::block_host_signals();
                // A guest whose pages are still arriving has not all of itself to send: it
                // moves on once they are here (home keeps pushing them meanwhile).
                while arriving(&pc) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut report = Report::default();
                let guest = migration::Guest {
                    pid: g.pid,
                    home: &g.home,
                    program: &g.program,
                    mem_bytes: g.mem_bytes,
                };
                // (Post-copy would need this host to keep serving pages after the guest left,
                // and the destination a userfaultfd: moves from here are pre-copy only.)
                let precopy = |conn: &mut dyn Conn, report: &mut Report| {
                    let mode = crate::control::MoveMode::Precopy;
                    migration::precopy(conn, &view, &pause, &guest, mode, report)
                };
                let started = match m {
                    Message::MigrateBack => home_link
                        .get()
                        .ok_or_else(|| anyhow::anyhow!("no link home"))
                        .and_then(|writer| {
                            let mut conn = Routed { writer, inbox };
                            let switch = precopy(&mut conn, &mut report)?;
                            Ok(Job {
                                conn: Box::new(conn),
                                onward: None,
                                switch,
                                report,
                            })
                        }),
                    Message::MigrateTo { node } => {
                        // The node connects: a jailed guest host makes no socket of its own.
                        let linked = crate::hostchan::node().and_then(|c| c.link(g.pid, &node));
                        linked.and_then(|(ep, sock)| {
                            let hello = migrate::Hello::new(
                                g.me.as_str(),
                                Purpose::Migrate,
                                migration::host_features(),
                                Some(ep.token),
                            );
                            let mut l = wire::connect_over(sock, &ep.cert, hello)?;
                            let switch = precopy(&mut l, &mut report)?;
                            Ok(Job {
                                conn: Box::new(l),
                                onward: Some((node, ep)),
                                switch,
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
        });
        let router = Router {
            on_signal: Box::new(move |sig| {
                if let Some(h) = h1.get() {
                    h.deliver(sig);
                }
            }),
            // The deputy is gone: nobody can serve this guest any more. Destroy it.
            on_lost: Box::new(move || {
                if arriving(&pc2) {
                    lost_during_postcopy("the link home was lost");
                }
                if let Some(h) = h2.get() {
                    h.deliver(libc::SIGKILL);
                }
            }),
            on_command: Box::new({
                let start = start.clone();
                move |m| start(m, false)
            }),
            on_want_home: Box::new(move || start(Message::MigrateBack, true)),
            migration: mig_tx,
            must_move: Box::new(move || mv2.load(Ordering::SeqCst)),
            pausing: Box::new(move || h4.get().is_some_and(|h| h.requested())),
            on_pages: Box::new(move |batch| {
                let Some(f) = pc3.get() else {
                    eprintln!("mosvm guest-host: guest pages came with no post-copy under way");
                    return;
                };
                match migration::place_pages(f, &batch) {
                    Ok(true) => tell_done(f, &told, &hl4),
                    Ok(false) => {}
                    Err(e) => lost_during_postcopy(&format!("{e:#}")),
                }
            }),
        };
        let deputy = RemoteDeputy::start(home_link.clone(), router);
        let p = Plumbing {
            home_link,
            jobs,
            moving,
            handle,
            view_slot,
            postcopy,
            told_done,
        };
        (p, deputy)
    }

    /// Tell home the post-copy is complete if it is (and it was not told).
    fn tell_if_complete(&self) {
        if let Some(f) = self.postcopy.get().filter(|f| f.complete()) {
            tell_done(f, &self.told_done, &self.home_link);
        }
    }

    /// The guest's VM is up: its commands and signals can reach it.
    fn attach(&self, vm: &vmm::vm::Vm) {
        let _ = self.handle.set(vm.pause_handle());
        let _ = self.view_slot.set(vm.memory_view());
    }

    /// Tell home now and then what the guest uses here (for `ps` at home), and this node its
    /// system calls so far (over `node`, for the node's balancer).
    fn report_usage(&self, vm: &vmm::vm::Vm, node: Arc<crate::hostchan::Channel>) {
        let (hl, view, calls) = (self.home_link.clone(), vm.memory_view(), vm.call_counts());
        std::thread::spawn(move || {
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
                let ask = crate::hostchan::Ask::Calls {
                    home: calls[0].load(Relaxed),
                    local: calls[1].load(Relaxed),
                };
                // The node may be gone: then this process soon is too.
                let _ = node.tell(&ask);
            }
        });
    }
}

/// In the host fork of a guest that forked away from home: the child's plumbing. Its link
/// home is its own deputy's (forked at home, [`vmm::deputy::FORK_AWAY`]), which connects to
/// the socket the parent had the node bind for it; this node learns of it over a channel of
/// its own (the node did not start this process), whose closing also ends the guest if the
/// node goes.
fn forked_child(
    vm: &mut vmm::vm::Vm,
    parent: &Plumbing,
    g: &GuestInfo,
    id: &Arc<Identity>,
) -> anyhow::Result<(Plumbing, GuestInfo)> {
    use anyhow::Context;
    if let Some(w) = parent.home_link.get() {
        // SAFETY: this process's copy of the parent's link home, which nothing here uses
        // (the objects owning it are the parent's, never dropped here).
        unsafe { libc::close(w.raw_fd()) };
    }
    let (listener, token) = crate::link::FORKED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("the child's socket for home is missing")?;
    let g = GuestInfo {
        pid: vm.pid() as u32,
        ..g.clone()
    };
    let home_link = HomeLink::default();
    let (p, deputy) = Plumbing::new(&g, home_link.clone(), None);
    say_home(&home_link);
    // The parent's deputy reads the parent's link with threads this process does not have.
    std::mem::forget(vm.replace_deputy(Box::new(deputy)));
    p.attach(vm);
    // The parent's channel becomes the parent's alone once this one has its own.
    let program = vm.program().display().to_string();
    let parents = crate::hostchan::node()?;
    let node = parents
        .hosting(g.pid, &g.home, &program)
        .context("this node refused the guest")?;
    parents.close_in_fork();
    // The node is gone: so is this process, as a guest host the node started dies with it
    // (its home sees the link lost, not the guest killed).
    node.die_with_node();
    let pause = vm.pause_handle();
    p.report_usage(vm, node);
    await_home(listener, token, id.clone(), home_link, pause);
    Ok((p, g))
}

/// The guest's link home as its VMM's messages take it (it changes in a forked child).
static SAY_HOME: Mutex<Option<HomeLink>> = Mutex::new(None);

/// The VMM's messages to the user go to the guest's home, whose stderr is the user's; here
/// (this node's log) only when home cannot be told.
fn say_home(link: &HomeLink) {
    *SAY_HOME.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
    vmm::say_to(|line| {
        let link = SAY_HOME.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let said = link.is_some_and(|l| {
            let m = Message::Say {
                line: line.to_string(),
            };
            l.tell(&m)
        });
        if !said {
            eprintln!("{line}");
        }
    });
}

/// Receive, restore and run the guest; report its exit home.
pub fn main() -> ExitCode {
    die_with_parent();
    // `ps` and the kernel's audit records name it (its exec path is /proc/self/fd/N).
    // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"mosvm-guesthost".as_ptr()) };
    // Nothing the node held open passes into the jail: only the listening socket (stdin),
    // stdout (/dev/null), stderr (a pipe to the node's log) and the channel stay.
    let mut keep = vec![0, 1, 2];
    keep.extend(crate::hostchan::inherited_fd());
    let spare = spare_env();
    keep.extend(spare.map(|(fd, _)| fd));
    crate::jail::close_descriptors_but(&keep);
    // A userfaultfd (for a guest that arrives by post-copy) can be made only now, before
    // the jail; without one (an unprivileged node) guests arrive by pre-copy.
    let uffd = vmm::postcopy::open().ok();
    let mut setup = match setup(spare.is_some()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("{e:#}")),
    };
    // /dev/kvm is opened before the jail closes every way to it; the jail comes before any
    // other thread starts (each thread is jailed as it was when it started).
    if let Err(e) = vmm::cpu::host() {
        return fail(&format!("{e:#}"));
    }
    if let Err(e) = crate::jail::enter() {
        return fail(&format!("cannot jail this guest host: {e:#}"));
    }
    // A spare waits here, jailed, its pool filling, until the node gives it a guest.
    let pool = match spare.map(|(fd, pool)| await_guest(fd, pool)) {
        None => None,
        Some(Ok(Some((token, pool)))) => {
            setup.token = token;
            pool
        }
        Some(Ok(None)) => return ExitCode::SUCCESS,
        Some(Err(e)) => return fail(&format!("{e:#}")),
    };
    vmm::vm::install_signal_handlers();
    // The node stops and continues this process when the guest is stopped at home.
    vmm::vm::parent_sigcont_is_the_hosts();
    // This host's children are the guest's children's VMMs.
    vmm::vm::host_children_are_the_hosts();
    setup.node.die_with_node();
    let id = setup.id.clone();
    let accepted = accept(
        &setup.listener,
        &setup.token,
        &id,
        Purpose::Migrate,
        SOURCE_LIMIT,
    );
    let (mut mig, source) = match accepted {
        Ok(x) => x,
        Err(e) => return fail(&format!("waiting for the guest: {e:#}")),
    };
    let arrived = migration::receive(&mut mig, None, pool, uffd, &mut |m| {
        anyhow::bail!("unexpected {:?} before the guest resumed", m.kind())
    });
    let migration::Arrived {
        prepared,
        state,
        offer,
        postcopy,
    } = match arrived {
        Ok(x) => x,
        Err(e) => return fail(&format!("receiving the guest failed: {e:#}")),
    };
    if postcopy.is_some() && source != offer.home_node {
        // Only home stays to push the rest: this source would not.
        let reason = "a post-copy comes from home only".to_string();
        let _ = mig.send(&Message::Abort {
            reason: reason.clone(),
        });
        return fail(&reason);
    }
    // From home, the migration's link becomes the deputy channel; from another node, home
    // connects once that node reports the move.
    let from_home = source == offer.home_node;
    let home_link = if from_home {
        HomeLink::attached(mig.clone())
    } else {
        HomeLink::default()
    };
    let mut g = GuestInfo {
        pid: offer.pid,
        home: offer.home_node.clone(),
        program: offer.program.clone(),
        mem_bytes: offer.mem_bytes,
        me: id.ours.node_name.clone(),
    };
    let (mut plumbing, deputy) = Plumbing::new(&g, home_link.clone(), postcopy);
    say_home(&home_link);
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
    plumbing.attach(&vm);
    if mig.send(&Message::Resumed).is_err() {
        return fail("the link closed before the guest resumed");
    }
    plumbing.tell_if_complete();
    plumbing.report_usage(&vm, setup.node.clone());
    if !from_home {
        // The source is done with us; home connects its deputy channel.
        drop(mig);
        let Setup {
            listener, token, ..
        } = setup;
        await_home(listener, token, id.clone(), home_link, vm.pause_handle());
    } else {
        // Everything came over the one connection: stop listening.
        drop(setup);
    }
    loop {
        match vm.run_or_pause() {
            Ok(Some(out)) => {
                // `--stats`: the run's line reaches the user's stderr at home, as it would
                // had the process ended there.
                if vm.wants_stats() {
                    vmm::say(&vm.stats_json());
                }
                plumbing.home_link.tell_last(&Message::Exit {
                    status: out.to_wire(),
                });
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("mosvm guest-host: {e:#}");
                plumbing.home_link.tell_last(&Message::Exit { status: 70 });
                return ExitCode::SUCCESS;
            }
            Ok(None) => {}
        }
        if vm.take_forked() {
            match forked_child(&mut vm, &plumbing, &g, &id) {
                Ok((p, child)) => {
                    // The parent's plumbing belongs to threads this process does not have.
                    std::mem::forget(std::mem::replace(&mut plumbing, p));
                    g = child;
                    continue;
                }
                Err(e) => {
                    // Its deputy at home finds no one to serve and ends as a lost process.
                    return fail(&format!("the guest's forked child: {e:#}"));
                }
            }
        }
        let pause = vm.pause_handle();
        let Ok(mut job) = plumbing.jobs.recv_timeout(Duration::from_secs(5)) else {
            pause.clear();
            continue;
        };
        let switched =
            migration::switch_vm(&mut *job.conn, &mut vm, &job.switch, &mut job.report).map(|_| ());
        if switched.is_ok() && vm.wants_stats() {
            // `--stats`: each move's report, as home prints those of moves it makes.
            let json = serde_json::to_string(&job.report).unwrap_or_default();
            vmm::say(&format!("mosvm-migration {json}"));
        }
        match (switched, job.onward.take()) {
            // Home has its guest back; this host is done.
            (Ok(()), None) => {
                if let Some(w) = plumbing.home_link.get() {
                    w.close(Duration::from_secs(2));
                }
                return ExitCode::SUCCESS;
            }
            // The guest runs on another node now: home connects there; this host is done.
            (Ok(()), Some((node, ep))) => {
                drop(vm);
                plumbing.home_link.tell_last(&Message::Moved {
                    node,
                    addr: ep.addr.to_string(),
                    token: ep.token,
                });
                return ExitCode::SUCCESS;
            }
            (Err(e), _) => {
                plumbing.moving.store(false, Ordering::SeqCst);
                let reason = format!("{e:#}");
                plumbing.home_link.tell(&Message::Abort { reason });
                pause.clear();
            }
        }
    }
}
