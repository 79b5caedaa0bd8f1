//! The link between a process's home and the node running it (MOSIX's link layer): one
//! stream of `migrate` frames straight between `mosvm run` and the guest host (a [`Wire`]).
//! After a migration it carries the deputy channel (one `DeputyRequest`, one `DeputyReply`, in order),
//! signals from home to the guest, and the guest's exit status back home.

use crate::wire::Wire;
use migrate::frame::{DeputyReply, DeputyRequest, Slot as WireSlot};
use migrate::Message;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use vmm::deputy::{Deputy, Reply, Request, Slot};

/// Exit status of `mosvm run` when the node hosting its process is lost.
pub const LOST_HOST_STATUS: u8 = 112;

/// Keep the signals meant for the guest for the vCPU thread (or, at home while the guest is
/// away, the thread serving its deputy): helper threads block them, so the kernel delivers
/// them where they interrupt KVM_RUN or a blocking call.
pub fn block_host_signals() {
    vmm::vm::block_guest_signals();
}

/// At home while the guest is away: pass the signals `mosvm run` received on to it.
fn forward_signals(writer: &Wire) {
    for (sig, _) in vmm::vm::take_host_signals() {
        let _ = writer.send(&Message::Signal { sig });
    }
}

/// A deputy request as it travels.
pub fn to_wire(seq: u64, r: Request) -> DeputyRequest {
    DeputyRequest {
        seq,
        nr: r.nr,
        args: r.args,
        slots: r
            .slots
            .into_iter()
            .map(|s| match s {
                Slot::Null => WireSlot::Null,
                Slot::In(b) => WireSlot::In(b),
                Slot::Out(n) => WireSlot::Out(n as u64),
                Slot::InOut(b) => WireSlot::InOut(b),
                Slot::Fault => WireSlot::Fault,
            })
            .collect(),
    }
}

/// A travelling deputy request as the deputy takes it.
pub fn from_wire(r: DeputyRequest) -> Request {
    Request {
        nr: r.nr,
        args: r.args,
        slots: r
            .slots
            .into_iter()
            .map(|s| match s {
                WireSlot::Null => Slot::Null,
                WireSlot::In(b) => Slot::In(b),
                // A request names its own output sizes; the VMM side caps them (64 MiB).
                WireSlot::Out(n) => {
                    Slot::Out(n.min(vmm::deputy::marshal::MAX_XFER as u64) as usize)
                }
                WireSlot::InOut(b) => Slot::InOut(b),
                WireSlot::Fault => Slot::Fault,
            })
            .collect(),
    }
}

/// Where the guest side's reader sends what arrives from home.
pub struct Router {
    /// `Signal{sig}`: deliver to the guest.
    pub on_signal: Box<dyn Fn(i32) + Send + Sync>,
    /// The link to home is gone (the deputy died): the guest must be destroyed.
    pub on_lost: Box<dyn Fn() + Send + Sync>,
    /// `MigrateTo` / `MigrateBack`: home asks this host to move the guest.
    pub on_command: Box<dyn Fn(Message) + Send + Sync>,
    /// The guest itself needs to be home (a call made there only): move it home, unless a
    /// move is under way already (then nothing is said: the guest asks again where it lands).
    pub on_want_home: Box<dyn Fn() + Send + Sync>,
    /// Answers a migration from this host over the home link waits for.
    pub migration: mpsc::Sender<Message>,
    /// Whether the guest is moving: a deputy call still waiting for home is then cancelled,
    /// and no new one starts; both are reissued after the move.
    pub must_move: Box<dyn Fn() -> bool + Send + Sync>,
    /// Whether the guest has been asked to stop for the switch-over.
    pub pausing: Box<dyn Fn() -> bool + Send + Sync>,
    /// `Pages` after a post-copy switch-over: the guest's outstanding pages arriving.
    pub on_pages: Box<dyn Fn(migrate::PageBatch) + Send + Sync>,
}

impl Router {
    /// Act on one message from home that is not the answer a deputy call waits for.
    fn dispatch(&self, m: Message) {
        match m {
            Message::Signal { sig } => (self.on_signal)(sig),
            Message::Pages(b) => (self.on_pages)(b),
            m @ (Message::MigrateTo { .. } | Message::MigrateBack) => (self.on_command)(m),
            m @ (Message::MigrateAccept { .. }
            | Message::MigrateRefuse { .. }
            | Message::Resumed
            | Message::Pong { .. }
            | Message::Abort { .. }) => {
                let _ = self.migration.send(m);
            }
            // A late answer to a call given up on, and anything else: nothing to do.
            _ => {}
        }
    }
}

/// How long a guest that arrived from another node waits for home to connect its deputy
/// channel before it is destroyed as orphaned.
pub const ATTACH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The guest side's link home, which may be attached after the guest resumes (when it arrived
/// from another node, home connects once that node reports the move).
#[derive(Clone, Default)]
pub struct HomeLink(Arc<(Mutex<Option<Wire>>, std::sync::Condvar)>);

impl HomeLink {
    /// A link home that is already there.
    pub fn attached(w: Wire) -> HomeLink {
        let h = HomeLink::default();
        h.attach(w);
        h
    }

    /// Attach the link home.
    pub fn attach(&self, w: Wire) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        cv.notify_all();
    }

    /// The link home, waiting for it up to [`ATTACH_LIMIT`].
    pub fn get(&self) -> Option<Wire> {
        let (m, cv) = &*self.0;
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, ATTACH_LIMIT, |w| w.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// Send to home (best effort: a lost link is noticed by the reader).
    pub fn tell(&self, m: &Message) -> bool {
        self.get().is_some_and(|w| w.send(m).is_ok())
    }

    /// Send home the last message of this host, and close the link without losing it.
    pub fn tell_last(&self, m: &Message) {
        if let Some(w) = self.get() {
            if w.send(m).is_ok() {
                w.close(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// The guest side of the deputy channel: a remote VMM's deputy calls go home over the link.
/// Calls of different guest threads are in flight together, each with its sequence number;
/// a caller reads the link itself while no other does, and hands the answers it finds for
/// other calls to their callers (`Calls`); between calls a reader thread takes what home
/// sends (signals, commands, a migration's answers).
pub struct RemoteDeputy(Arc<Remote>);

struct Remote {
    seq: std::sync::atomic::AtomicU64,
    home: HomeLink,
    router: Arc<Router>,
    calls: Mutex<Calls>,
    arrived: std::sync::Condvar,
}

/// The calls waiting for home, and the answers read for them by another caller.
#[derive(Default)]
struct Calls {
    waiting: std::collections::HashSet<u64>,
    answers: std::collections::HashMap<u64, DeputyReply>,
}

impl Remote {
    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Act on a message from home: an answer goes to its caller.
    fn take(&self, m: Message) {
        match m {
            Message::DeputyReply(r) => {
                let mut c = self.calls();
                if c.waiting.contains(&r.seq) {
                    c.answers.insert(r.seq, r);
                    self.arrived.notify_all();
                }
            }
            m => self.router.dispatch(m),
        }
    }
}

impl RemoteDeputy {
    /// Start reading the link from home between calls (see [`Router`]).
    pub fn start(home: HomeLink, r: Router) -> RemoteDeputy {
        let remote = Arc::new(Remote {
            seq: Default::default(),
            home,
            router: Arc::new(r),
            calls: Default::default(),
            arrived: Default::default(),
        });
        let rt = remote.clone();
        std::thread::spawn(move || {
            block_host_signals();
            let Some(link) = rt.home.get() else {
                (rt.router.on_lost)();
                return;
            };
            loop {
                // A call in progress reads its own answer (and whatever else arrives): keep
                // out of its way.
                let Some(mut rd) = link.try_reader() else {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    continue;
                };
                match rd.recv_within(std::time::Duration::ZERO) {
                    Ok(Some(m)) => rt.take(m),
                    Ok(None) => {
                        drop(rd);
                        link.wait_readable(std::time::Duration::from_millis(100));
                    }
                    Err(_) => {
                        (rt.router.on_lost)();
                        return;
                    }
                }
            }
        });
        RemoteDeputy(remote)
    }
}

const EIO: i64 = libc::EIO as i64;
const EINTR: i64 = libc::EINTR as i64;

fn eio() -> Reply {
    Reply {
        ret: -EIO,
        outs: vec![],
    }
}

/// Where the child of the guest's latest fork away from home waits for its deputy: the
/// listening socket and the token home was given ([`vmm::deputy::FORK_AWAY`]). The child's
/// copy of the guest host takes it after the host fork; the parent's is dropped at its next
/// fork.
pub static FORKED: Mutex<Option<(std::net::TcpListener, [u8; 32])>> = Mutex::new(None);

/// What a guest that forks away from home tells its home process: where the child's guest
/// host waits, and the token it expects.
pub struct ForkAway {
    pub addr: std::net::SocketAddr,
    pub token: [u8; 32],
}

impl ForkAway {
    /// From a [`vmm::deputy::FORK_AWAY`] request's slots; None when malformed.
    fn from_slots(slots: &[WireSlot]) -> Option<ForkAway> {
        let [WireSlot::In(addr), WireSlot::In(token)] = slots else {
            return None;
        };
        Some(ForkAway {
            addr: std::str::from_utf8(addr).ok()?.parse().ok()?,
            token: token.as_slice().try_into().ok()?,
        })
    }
}

/// What home does in the child of a fork away from home: it is that child's deputy from
/// here on (it never returns: the process ends as the guest child does).
pub type OnFork<'a> = &'a (dyn Fn(&mut dyn Deputy, ForkAway) -> std::convert::Infallible + Sync);

fn errno_of(e: &std::io::Error) -> i64 {
    e.raw_os_error().unwrap_or(libc::EIO) as i64
}

impl Deputy for RemoteDeputy {
    /// Bind the child's listening socket on the address home reached this host at, then have
    /// home fork.
    fn fork_away(&mut self) -> Option<Result<i64, i64>> {
        let ip = self.0.home.get()?.local_addr()?.ip();
        // The previous fork's socket is the child's business.
        drop(FORKED.lock().unwrap_or_else(|p| p.into_inner()).take());
        // The node binds it: a jailed guest host makes no socket of its own (hostchan.rs).
        let listened = crate::hostchan::node().and_then(|c| c.listen(ip));
        let l = match listened {
            Ok(l) => l,
            Err(e) => {
                vmm::say(&format!(
                    "mosvm: fork: no socket for the child's deputy: {e:#}"
                ));
                return Some(Err(libc::EAGAIN as i64));
            }
        };
        let (addr, token) = match (l.local_addr(), migrate::tls::new_token()) {
            (Ok(a), Ok(t)) => (a, t),
            _ => return Some(Err(libc::EAGAIN as i64)),
        };
        let r = self.0.call(Request {
            nr: vmm::deputy::FORK_AWAY,
            args: [0; 6],
            slots: vec![
                Slot::In(addr.to_string().into_bytes()),
                Slot::In(token.to_vec()),
            ],
        });
        if r.ret < 0 {
            return Some(Err(-r.ret));
        }
        *FORKED.lock().unwrap_or_else(|p| p.into_inner()) = Some((l, token));
        Some(Ok(r.ret))
    }

    fn request_home(&mut self) -> bool {
        (self.0.router.on_want_home)();
        true
    }

    fn call(&mut self, req: Request) -> Reply {
        self.0.call(req)
    }

    /// The call waits for home without the deputy: other threads' calls go meanwhile.
    fn begin(&mut self, req: Request) -> vmm::deputy::Begun {
        let remote = self.0.clone();
        vmm::deputy::Begun::Waiting(Box::new(move || remote.call(req)))
    }
}

impl Remote {
    fn call(&self, req: Request) -> Reply {
        if (self.router.must_move)() {
            // The guest is moving: the call is made again once it has.
            return self.restart();
        }
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let Some(link) = self.home.get() else {
            return eio();
        };
        self.calls().waiting.insert(seq);
        let r = self.wait(&link, seq, req);
        let mut c = self.calls();
        c.waiting.remove(&seq);
        c.answers.remove(&seq);
        r
    }

    fn wait(&self, link: &Wire, seq: u64, req: Request) -> Reply {
        if link
            .send(&Message::DeputyRequest(to_wire(seq, req)))
            .is_err()
        {
            return eio();
        }
        let mut cancelled = false;
        // A signal came for the guest while the call waits at home: it is interrupted there
        // and the VMM decides (handler with or without SA_RESTART) as for a local call.
        let mut for_signal = false;
        let mut last_cancel = std::time::Instant::now();
        let mut last_look = std::time::Instant::now();
        loop {
            let answer = self.calls().answers.remove(&seq);
            let answer = match answer {
                Some(r) => Some(r),
                None => match link.try_reader() {
                    Some(mut rd) => match rd.recv_within(std::time::Duration::from_millis(20)) {
                        Ok(Some(Message::DeputyReply(r))) if r.seq == seq => {
                            // Leave nothing that already arrived unread behind us.
                            while let Ok(Some(m)) = rd.recv_within(std::time::Duration::ZERO) {
                                self.take(m);
                            }
                            drop(rd);
                            // Another caller may take the link now.
                            self.arrived.notify_all();
                            Some(r)
                        }
                        Ok(Some(m)) => {
                            self.take(m);
                            None
                        }
                        Ok(None) => None,
                        Err(_) => {
                            drop(rd);
                            self.arrived.notify_all();
                            return eio();
                        }
                    },
                    None => {
                        // Another caller reads the link: it hands our answer over.
                        let c = self.calls();
                        if !c.answers.contains_key(&seq) {
                            let _ = self
                                .arrived
                                .wait_timeout(c, std::time::Duration::from_millis(5));
                        }
                        None
                    }
                },
            };
            if let Some(r) = answer {
                if cancelled && r.ret == -EINTR && !for_signal {
                    return self.restart();
                }
                return Reply {
                    ret: r.ret,
                    outs: r.outs,
                };
            }
            if last_look.elapsed() < std::time::Duration::from_millis(20) {
                continue;
            }
            last_look = std::time::Instant::now();
            if vmm::vm::process_ending() {
                // Another thread ended the process: this call's answer is not wanted.
                let _ = link.send(&Message::Cancel { seq });
                return Reply {
                    ret: -EINTR,
                    outs: vec![],
                };
            }
            // Ask home to interrupt the call, and ask again now and then: a request to
            // interrupt that lands just before the call blocks is lost.
            let again = last_cancel.elapsed() >= std::time::Duration::from_millis(100);
            // (A signal for this guest thread alone comes as the VMM's kick of this thread.)
            let signal = vmm::vm::take_kicked() | vmm::vm::host_signals_pending();
            if signal && !cancelled {
                for_signal = true;
            }
            if ((self.router.must_move)() || signal) && (!cancelled || again) {
                cancelled = true;
                last_cancel = std::time::Instant::now();
                let _ = link.send(&Message::Cancel { seq });
            }
        }
    }

    /// Hold the call until the guest stops for its move (or the move is given up), then have
    /// the VMM reissue it wherever the guest resumes.
    fn restart(&self) -> Reply {
        let t = std::time::Instant::now();
        while (self.router.must_move)()
            && !(self.router.pausing)()
            && t.elapsed() < std::time::Duration::from_secs(30)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Reply {
            ret: -vmm::vm::ERESTART,
            outs: vec![],
        }
    }
}

/// How serving a remote guest from home ended.
pub enum HomeEnd {
    /// The guest exited with this status.
    Exited(i32),
    /// The link to the guest's host was lost.
    Lost,
    /// The guest moved on to `node`, whose guest host waits for home at `addr` with `token`.
    Moved {
        node: String,
        addr: String,
        token: [u8; 32],
    },
    /// The guest is coming home: its host sent this offer; the rest of the link's traffic
    /// arrives on the inbox; calls still made meanwhile are served through `Running` (for
    /// cancels).
    Coming(
        migrate::frame::MigrateOffer,
        Arc<Mutex<mpsc::Receiver<Message>>>,
        Running,
    ),
}

/// The host threads running deputy calls at home for a remote guest, by the call's
/// sequence number (a cancel from the guest interrupts the one running that call).
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<std::collections::HashMap<u64, u64>>>);

impl Running {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Interrupt the host call serving request `seq`, if one runs.
    pub fn cancel(&self, seq: u64) {
        let m = self.map();
        if let Some(&t) = m.get(&seq) {
            // Kicked under the lock: the thread is still registered, so alive.
            vmm::vm::PauseHandle::kick_thread(t);
        }
    }

    /// Interrupt every call running; false when none is.
    fn cancel_all(&self) -> bool {
        let m = self.map();
        for &t in m.values() {
            vmm::vm::PauseHandle::kick_thread(t);
        }
        !m.is_empty()
    }

    /// Serve request `r` on this thread (registered for cancels while it runs); false when
    /// the link is gone.
    pub fn serve(
        &self,
        writer: &Wire,
        deputy: &Mutex<&mut dyn Deputy>,
        r: DeputyRequest,
        on_fork: OnFork,
    ) -> bool {
        let seq = r.seq;
        let lock = || deputy.lock().unwrap_or_else(|p| p.into_inner());
        let begun = if r.nr == vmm::deputy::FORK_AWAY {
            let ret = match ForkAway::from_slots(&r.slots) {
                Some(f) => fork_deputy(&mut **lock(), f, on_fork),
                None => -(libc::EINVAL as i64),
            };
            vmm::deputy::Begun::Done(Reply { ret, outs: vec![] })
        } else {
            lock().begin(from_wire(r))
        };
        let reply = match begun {
            vmm::deputy::Begun::Done(r) => r,
            vmm::deputy::Begun::Pending(mut p) => {
                // SAFETY: pthread_self has no preconditions.
                let me = unsafe { libc::pthread_self() } as u64;
                self.map().insert(seq, me);
                let ret = p.run();
                self.map().remove(&seq);
                lock().complete(p, ret)
            }
            vmm::deputy::Begun::Waiting(wait) => wait(),
        };
        // Signals the home process has received reach the guest before this reply does, as
        // natively a handler runs before the call returns: one that interrupted the call
        // here, the SIGCONT that continued a stopped process (whose calls waited meanwhile,
        // and may answer what the continuer did next).
        forward_signals(writer);
        let msg = Message::DeputyReply(DeputyReply {
            seq,
            ret: reply.ret,
            outs: reply.outs,
        });
        writer.send(&msg).is_ok()
    }
}

/// [`vmm::deputy::FORK_AWAY`] at home: fork this process; the child becomes the new
/// process's deputy (`on_fork`, which never returns). The child's pid, or -errno. The caller
/// holds the deputy's lock, which the child's copy of this thread then holds too.
fn fork_deputy(deputy: &mut dyn Deputy, f: ForkAway, on_fork: OnFork) -> i64 {
    let old = vmm::vm::block_all_signals();
    // SAFETY: fork(2) in a process whose other threads hold no lock the child needs: the
    // child uses only this thread's copy of the deputy (whose lock the caller holds), opens
    // its own connections and starts its own threads.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // Signals the parent received and has not passed on are the parent guest's.
        let _ = vmm::vm::take_host_signals();
        vmm::vm::restore_mask(&old);
        // This thread is the child's only one: it takes the guest's signals.
        vmm::vm::take_guest_signals_here();
        on_fork(deputy, f);
    }
    vmm::vm::restore_mask(&old);
    if pid < 0 {
        -errno_of(&std::io::Error::last_os_error())
    } else {
        pid as i64
    }
}

/// Home side: serve the remote guest's deputy calls until it exits, comes home, or the link
/// is lost or moves on. This thread reads the link and serves the calls; while one of them
/// runs a while (it may block), a helper reads the link meanwhile: a cancel interrupts the
/// call it names, a further call (another guest thread's) runs on a thread of its own,
/// reports are taken at once, and anything else is passed on (the guest's exit, or a lost
/// link, interrupts the calls still running for it). Signals `mosvm run` receives meanwhile are sent to the guest;
/// `on_failed` hears why a move the guest's host tried failed, `on_usage` what the guest has
/// used on its host (CPU ns, memory bytes), `on_postcopy` a post-copy's `PageRequest` and
/// `PostcopyDone`.
pub fn serve_home(
    writer: Wire,
    deputy: &mut dyn Deputy,
    on_failed: &(dyn Fn(String) + Sync),
    on_usage: &(dyn Fn(u64, u64) + Sync),
    on_postcopy: &(dyn Fn(Message) + Sync),
    on_fork: OnFork,
) -> HomeEnd {
    let reader = writer.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (writer, done) = (writer.clone(), done.clone());
        std::thread::spawn(move || {
            block_host_signals();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                forward_signals(&writer);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
    }
    // The request this thread executes (0: none).
    let busy = std::sync::atomic::AtomicU64::new(0);
    let running = Running::default();
    let deputy = Mutex::new(deputy);
    vmm::vm::install_kick_handler();
    let (tx, rx) = mpsc::channel();
    let helper_done = std::sync::atomic::AtomicBool::new(false);
    let end = std::thread::scope(|scope| {
        {
            let (busy, done, running, link, deputy, writer, tx) = (
                &busy,
                &helper_done,
                running.clone(),
                reader.clone(),
                &deputy,
                writer.clone(),
                tx.clone(),
            );
            scope.spawn(move || {
                block_host_signals();
                let tick = std::time::Duration::from_millis(2);
                let mut seen = 0;
                // The guest exited or the link is gone: calls still running are orphans.
                let mut orphans = false;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let now = busy.load(std::sync::atomic::Ordering::SeqCst);
                    if orphans {
                        running.cancel_all();
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        continue;
                    }
                    let m = if now != 0 && now == seen {
                        match link.try_reader() {
                            Some(mut rd) => rd.recv_within(tick),
                            None => {
                                std::thread::sleep(tick);
                                Ok(None)
                            }
                        }
                    } else {
                        seen = now;
                        std::thread::sleep(tick);
                        Ok(None)
                    };
                    match m {
                        Ok(Some(Message::Cancel { seq })) => running.cancel(seq),
                        Ok(Some(Message::DeputyRequest(r))) => {
                            let (running, writer) = (running.clone(), writer.clone());
                            scope.spawn(move || {
                                block_host_signals();
                                running.serve(&writer, deputy, r, on_fork);
                            });
                        }
                        Ok(Some(Message::Abort { reason })) => on_failed(reason),
                        Ok(Some(Message::Usage { cpu_ns, mem_bytes })) => {
                            on_usage(cpu_ns, mem_bytes)
                        }
                        Ok(Some(Message::Say { line })) => eprintln!("{line}"),
                        Ok(Some(
                            m @ (Message::PageRequest { .. } | Message::PostcopyDone { .. }),
                        )) => on_postcopy(m),
                        Ok(Some(m)) => {
                            orphans = matches!(m, Message::Exit { .. });
                            if tx.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => orphans = true,
                    }
                }
            });
        }
        // Set when this thread found the link closed: what the helper read before (it
        // passes it on after letting go of the link) still comes first.
        let mut ended = false;
        let end = loop {
            let m = match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Disconnected) => break Ok(HomeEnd::Lost),
                Err(mpsc::TryRecvError::Empty) if ended => {
                    match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                        Ok(m) => m,
                        Err(_) => break Ok(HomeEnd::Lost),
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    match reader
                        .reader()
                        .recv_within(std::time::Duration::from_millis(50))
                    {
                        Ok(Some(m)) => m,
                        Ok(None) => continue,
                        Err(_) => {
                            ended = true;
                            continue;
                        }
                    }
                }
            };
            match m {
                Message::DeputyRequest(r) => {
                    busy.store(r.seq, std::sync::atomic::Ordering::SeqCst);
                    let ok = running.serve(&writer, &deputy, r, on_fork);
                    busy.store(0, std::sync::atomic::Ordering::SeqCst);
                    if !ok {
                        break Ok(HomeEnd::Lost);
                    }
                }
                Message::Cancel { seq } => running.cancel(seq),
                Message::Exit { status } => break Ok(HomeEnd::Exited(status)),
                Message::MigrateOffer(o) => {
                    // From here on a reader of its own reads everything; the migration
                    // takes it.
                    let (link, calls, tx) = (reader.clone(), running.clone(), tx.clone());
                    std::thread::spawn(move || {
                        block_host_signals();
                        loop {
                            let m = link
                                .reader()
                                .recv_within(std::time::Duration::from_millis(100));
                            match m {
                                Ok(Some(Message::Cancel { seq })) => calls.cancel(seq),
                                Ok(Some(m)) => {
                                    if tx.send(m).is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {}
                                Err(_) => return,
                            }
                        }
                    });
                    break Err(Box::new(o));
                }
                Message::Moved { node, addr, token } => {
                    break Ok(HomeEnd::Moved { node, addr, token })
                }
                // A move that failed, or one refused because another is under way.
                Message::Abort { reason } | Message::MigrateRefuse { reason } => on_failed(reason),
                Message::Usage { cpu_ns, mem_bytes } => on_usage(cpu_ns, mem_bytes),
                // The guest's VMM speaks to its user, whose stderr is this process's.
                Message::Say { line } => eprintln!("{line}"),
                m @ (Message::PageRequest { .. } | Message::PostcopyDone { .. }) => on_postcopy(m),
                _ => {}
            }
        };
        helper_done.store(true, std::sync::atomic::Ordering::SeqCst);
        // Calls still running end (a guest that exited or moved waits for none of them).
        while running.cancel_all() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        end
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    // Coming home: the rest arrives through the reader started for it.
    end.unwrap_or_else(|o| HomeEnd::Coming(*o, Arc::new(Mutex::new(rx)), running))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_survive_the_wire() {
        let r = Request {
            nr: 1,
            args: [1, 2, 3, 4, 5, 6],
            slots: vec![
                Slot::Null,
                Slot::In(b"abc".to_vec()),
                Slot::Out(7),
                Slot::InOut(vec![9]),
            ],
        };
        assert_eq!(from_wire(to_wire(5, r.clone())), r);
    }

    /// A remote deputy and a home server over a real socket pair: a write goes home and its
    /// result comes back; the guest's exit status reaches home.
    #[test]
    fn deputy_calls_cross_the_link() {
        let (guest_end, home_end) = Wire::pair().unwrap();
        let (pr, pw) = {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe() returns.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let home = std::thread::spawn(move || {
            let mut d = vmm::deputy::HostDeputy::with_stdio([0, pw, 2]);
            let no_fork = |_: &mut dyn Deputy, _| -> std::convert::Infallible {
                panic!("nothing forks in this test")
            };
            match serve_home(home_end, &mut d, &|_| {}, &|_, _| {}, &|_| {}, &no_fork) {
                HomeEnd::Exited(s) => Some(s),
                _ => None,
            }
        });
        let (mtx, _mrx) = mpsc::channel();
        let router = Router {
            on_signal: Box::new(|_| {}),
            on_lost: Box::new(|| {}),
            on_command: Box::new(|_| {}),
            on_want_home: Box::new(|| {}),
            migration: mtx,
            must_move: Box::new(|| false),
            pausing: Box::new(|| false),
            on_pages: Box::new(|_| {}),
        };
        let mut rd = RemoteDeputy::start(HomeLink::attached(guest_end.clone()), router);
        let r = rd.call(Request {
            nr: libc::SYS_write as u64,
            args: [1, 0, 5, 0, 0, 0],
            slots: vec![Slot::In(b"hello".to_vec())],
        });
        assert_eq!(r.ret, 5);
        let mut buf = [0u8; 5];
        let dst = buf.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: reading 5 bytes into a local 5-byte buffer from our own pipe.
        let n = unsafe { libc::read(pr, dst, 5) };
        assert_eq!(n, 5);
        assert_eq!(&buf, b"hello");
        let bad = rd.call(Request {
            nr: libc::SYS_close as u64,
            args: [77, 0, 0, 0, 0, 0],
            slots: vec![],
        });
        assert_eq!(bad.ret, -(libc::EBADF as i64));
        // A fork away from home that does not say where the child waits: EINVAL, and home
        // does not fork.
        let fork = rd.call(Request {
            nr: vmm::deputy::FORK_AWAY,
            args: [0; 6],
            slots: vec![Slot::In(b"not an address".to_vec()), Slot::In(vec![0; 32])],
        });
        assert_eq!(fork.ret, -(libc::EINVAL as i64));
        // Over a link that is no TCP connection, the guest's deputy cannot fork away.
        assert!(rd.fork_away().is_none());
        guest_end.send(&Message::Exit { status: 3 }).unwrap();
        assert_eq!(home.join().unwrap(), Some(3));
        // SAFETY: closing our own pipe descriptors.
        unsafe {
            libc::close(pr);
            libc::close(pw);
        }
    }
}
