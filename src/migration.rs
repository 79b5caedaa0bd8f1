//! Live migration over a link: the source side (pre-copy while the guest runs, then the last
//! dirty pages and the vCPU/VMM state while it is paused) and the destination side (receive
//! into a VM prepared when the offer arrives, restore, report). The link is a stream of
//! `migrate` frames straight between the two processes (see [`crate::wire`]); after a first
//! move it also carries the deputy channel, so a migration may share it with deputy calls.

use crate::control::MoveMode;
use crate::wire::Wire;
use anyhow::{bail, Context, Result};
use migrate::frame::{MemRegion, MigrateOffer};
use migrate::frame::{PageSink, Received};
use migrate::handshake::{CpuFeatures, CpuidLeaf};
use migrate::{Decision, Message, PageBatchBuilder, Planner, RoundStats};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use vmm::memory::{MemView, PAGE};

/// The CPU features guests on this host see (ring-3 CPUID is the host's own).
pub fn host_features() -> CpuFeatures {
    let mut raw = Vec::new();
    for (leaf, subleaf) in [
        (1, 0),
        (6, 0),
        (7, 0),
        (7, 1),
        (0xd, 0),
        (0xd, 1),
        (0x8000_0001, 0),
        (0x8000_0007, 0),
        (0x8000_0008, 0),
    ] {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        raw.push(CpuidLeaf {
            leaf,
            subleaf,
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        });
    }
    let xcr0 = vmm::cpu::host().map(vmm::cpu::guest_xcr0).unwrap_or(3);
    CpuFeatures::from_cpuid(&raw, xcr0)
}

/// Statistics of one migration, for `--stats` and benchmarks.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Touched pages sent by the first pass.
    pub first_pages: u64,
    /// Pre-copy rounds (the first pass included).
    pub rounds: u32,
    /// Pages sent in all.
    pub pages: u64,
    /// Bytes written to the link.
    pub bytes: u64,
    /// Pages in the stop-and-copy round.
    pub last_pages: u64,
    /// Guest paused to guest resumed at the destination, ns.
    pub downtime_ns: u64,
    /// Whole migration, ns.
    pub total_ns: u64,
    /// How far the destination's wall clock reads ahead of the source's, ns (from one
    /// Ping/Pong, halving the round trip).
    pub clock_delta_ns: i64,
    /// That round trip, ns.
    pub rtt_ns: u64,
    /// The strongest throttle applied: the share of vCPU time taken away (0: none).
    pub throttle: f64,
    /// The switch-over was by post-copy.
    pub postcopy: bool,
    /// Post-copy: pages that crossed after the guest resumed.
    pub outstanding_pages: u64,
    /// Post-copy: guest accesses that waited for a page (the destination's count).
    pub faults: u64,
    /// Post-copy: guest resumed to last page arrived, ns.
    pub postcopy_ns: u64,
}

/// This host's wall-clock time, ns.
pub fn realtime_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos() as i64
}

/// Who is moving: what the offer tells the destination.
#[derive(Debug, Clone, Copy)]
pub struct Guest<'a> {
    /// Home pid.
    pub pid: u32,
    /// Home node.
    pub home: &'a str,
    /// Program path at home.
    pub program: &'a str,
    /// Guest memory size.
    pub mem_bytes: u64,
}

/// One end of a link as the migration sees it: send a frame (returning its size), receive one.
pub trait Conn {
    /// Send one message; the frame's size in bytes.
    fn send(&mut self, m: &Message) -> Result<u64>;
    /// Receive the next message meant for the migration.
    fn recv(&mut self) -> Result<Message>;
    /// A sender for this link that another thread may use beside this one (post-copy pushes
    /// pages while the switch-over waits for the answer); None where there is none.
    fn sender(&self) -> Option<Wire> {
        None
    }
    /// Like [`Conn::recv`], with a page batch's pages put into `sink`.
    fn recv_into(&mut self, sink: &mut dyn PageSink) -> Result<Received> {
        match self.recv()? {
            Message::Pages(b) => {
                let d = b
                    .decode()
                    .map_err(|e| anyhow::anyhow!("bad page batch: {e}"))?;
                for (gpn, page) in d.iter() {
                    sink.page(gpn)
                        .ok_or_else(|| anyhow::anyhow!("page {gpn:#x} outside guest memory"))?
                        .copy_from_slice(page);
                }
                Ok(Received::Pages(d.len()))
            }
            m => Ok(Received::Message(m)),
        }
    }
}

/// Guest memory of a VM prepared to receive a migration, as the place pages land.
struct Landing<'a>(&'a vmm::memory::GuestMem);

impl PageSink for Landing<'_> {
    fn page(&mut self, gpn: u64) -> Option<&mut [u8; PAGE as usize]> {
        // SAFETY: the prepared VM runs nothing until it is restored, and each page reference
        // lives only until its bytes are written.
        unsafe { self.0.page_mut(gpn) }
    }
}

impl Conn for Wire {
    fn send(&mut self, m: &Message) -> Result<u64> {
        Ok(Wire::send(self, m)?)
    }
    fn recv(&mut self) -> Result<Message> {
        Ok(Wire::recv(self)?)
    }
    fn sender(&self) -> Option<Wire> {
        Some(self.clone())
    }
    fn recv_into(&mut self, sink: &mut dyn PageSink) -> Result<Received> {
        Ok(self.reader().recv_into(sink)?)
    }
}

/// A link shared with other traffic (the deputy channel): frames go out through the shared
/// writer; a reader thread routes the migration's incoming messages to `inbox`.
pub struct Routed {
    /// The link, shared with the deputy.
    pub writer: Wire,
    /// Messages for the migration.
    pub inbox: Arc<Mutex<mpsc::Receiver<Message>>>,
}

impl Conn for Routed {
    fn send(&mut self, m: &Message) -> Result<u64> {
        Ok(self.writer.send(m)?)
    }
    fn recv(&mut self) -> Result<Message> {
        let inbox = self
            .inbox
            .lock()
            .map_err(|_| anyhow::anyhow!("inbox poisoned"))?;
        inbox.recv().map_err(|_| anyhow::anyhow!("the link closed"))
    }
}

/// Send the given pages in batches; returns (pages, bytes).
fn send_pages(link: &mut dyn Conn, view: &MemView, gpns: &[u64]) -> Result<(u64, u64)> {
    // lz4 costs more CPU time than it saves on a LAN-speed link; pages go uncompressed (zero
    // pages still travel as bits).
    let mut b = PageBatchBuilder::with_compression(migrate::pages::Compression::Never);
    let mut page = [0u8; PAGE as usize];
    let mut bytes = 0;
    // Each sent batch's buffers serve the next one.
    let mut flush = |b: &mut PageBatchBuilder| -> Result<u64> {
        let m = Message::Pages(b.finish());
        let n = link.send(&m).context("sending pages")?;
        if let Message::Pages(sent) = m {
            b.recycle(sent);
        }
        Ok(n)
    };
    for &gpn in gpns {
        if !view.read_page(gpn, &mut page) {
            continue;
        }
        if b.push(gpn, &page).is_err() {
            bytes += flush(&mut b)?;
            b.push(gpn, &page)
                .map_err(|_| anyhow::anyhow!("page batch refused a page"))?;
        }
    }
    if !b.is_empty() {
        bytes += flush(&mut b)?;
    }
    Ok((gpns.len() as u64, bytes))
}

/// How the switch-over goes, as the source's pre-copy decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// Stop and copy: these pages (dirtied in the last round) and those dirtied since cross
    /// before the guest resumes.
    Copy(Vec<u64>),
    /// Post-copy: the destination lacks these pages (dirtied in the last round, or every
    /// page the guest had touched when a post-copy from the start began) and those dirtied
    /// since.
    Post(Vec<u64>),
}

/// How long a post-copy from the start watches the guest's writes before it pauses it: the
/// pages written in that time cross with the state (up to [`HOT_PAGES`]).
const HOT_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// The most pages that cross with a post-copy's state (1 MiB: about 1 ms at the link speeds
/// measured here, BENCHMARKS.md).
const HOT_PAGES: usize = 32;

/// The source's pre-copy, while the guest runs: offer, first pass of touched pages, rounds from
/// the dirty log until the planner says switch over (`mode`: or post-copy, see [`MoveMode`]).
/// Returns how the switch-over (done once the guest is paused) goes.
/// On failure the guest is left as it was: dirty logging off, full speed.
pub fn precopy(
    link: &mut dyn Conn,
    view: &MemView,
    pause: &vmm::vm::PauseHandle,
    guest: &Guest,
    mode: MoveMode,
    report: &mut Report,
) -> Result<Switch> {
    let r = precopy_rounds(link, view, pause, guest, mode, report);
    pause.throttle(0.0);
    if r.is_err() {
        let _ = view.stop_dirty_log();
    }
    r
}

fn precopy_rounds(
    link: &mut dyn Conn,
    view: &MemView,
    pause: &vmm::vm::PauseHandle,
    guest: &Guest,
    mode: MoveMode,
    report: &mut Report,
) -> Result<Switch> {
    let Guest {
        pid,
        home,
        program,
        mem_bytes,
    } = *guest;
    let t0 = Instant::now();
    view.start_dirty_log()?;
    let first = view.resident_pages();
    report.first_pages = first.len() as u64;
    let offer = MigrateOffer {
        pid,
        home_node: home.to_string(),
        program: program.to_string(),
        mem_bytes,
        // (A post-copy from the start has no first pass: nothing to fault in ahead.)
        touched_pages: if mode == MoveMode::Postcopy {
            0
        } else {
            first.len() as u64
        },
        page_size: PAGE as u32,
        regions: vec![MemRegion {
            guest_phys: 0,
            len: mem_bytes,
        }],
        deputy_token: None,
    };
    link.send(&Message::MigrateOffer(offer))
        .context("sending the offer")?;
    // Post-copy needs a destination that can take it, and a link that can carry pages beside
    // the answer the switch-over waits for.
    let postcopy_ok = match link
        .recv()
        .context("waiting for the destination's answer")?
    {
        Message::MigrateAccept { postcopy } => postcopy && link.sender().is_some(),
        Message::MigrateRefuse { reason } => bail!("destination refused: {reason}"),
        Message::Abort { reason } => bail!("destination aborted: {reason}"),
        other => bail!("unexpected answer to the offer: {:?}", other.kind()),
    };
    if mode == MoveMode::Postcopy && !postcopy_ok {
        bail!("the destination cannot receive by post-copy (it has no userfaultfd)");
    }
    // Estimate the destination's clock against ours, so the guest keeps home's wall clock:
    // from the quickest of a few Ping/Pong exchanges (a slow one was delayed on one leg, and
    // half its round trip is no longer the one-way time).
    let mut samples = Vec::with_capacity(CLOCK_PINGS);
    for _ in 0..CLOCK_PINGS {
        let t_send = realtime_ns();
        let t = Instant::now();
        link.send(&Message::Ping { t: t_send as u64 })?;
        match link.recv().context("waiting for the destination's clock")? {
            Message::Pong { t: theirs } => {
                samples.push(ClockSample {
                    sent: t_send,
                    rtt: t.elapsed().as_nanos() as i64,
                    theirs: theirs as i64,
                });
            }
            other => bail!("expected the destination's clock, got {:?}", other.kind()),
        }
    }
    let (delta, rtt) = clock_delta(&samples).expect("CLOCK_PINGS > 0");
    report.rtt_ns = rtt as u64;
    report.clock_delta_ns = delta;
    if mode == MoveMode::Postcopy {
        // The pages the guest writes now are those it needs first where it lands (and those
        // it touches for the first time are in the dirty log too).
        std::thread::sleep(HOT_WINDOW);
        report.first_pages = 0;
        report.total_ns = t0.elapsed().as_nanos() as u64;
        return Ok(Switch::Post(first));
    }
    // Aiming for the planner's 2 ms of downtime (a guest that dirties memory faster than the
    // link drains it is throttled until it fits).
    let mut planner = Planner::new(migrate::precopy::Config::default());
    // The state is a few KiB; its fixed cost (capture, one round trip, restore) is what an
    // idle guest's downtime measures: 0.4-0.6 ms on loopback (BENCHMARKS.md).
    planner.set_state_cost(16 << 10, 500_000);
    let mut todo = first;
    loop {
        let t = Instant::now();
        let (pages, bytes) = send_pages(link, view, &todo)?;
        report.rounds += 1;
        report.pages += pages;
        report.bytes += bytes;
        // Wait until the destination has taken in the whole round: pages still queued in
        // the sockets would otherwise be drained during the downtime, and the planner would
        // see the speed of filling buffers rather than of the link.
        sync(link).context("waiting for the destination to take the round")?;
        pause.kick();
        todo = view.take_dirty()?;
        let dirty_pages = todo.len() as u64;
        link.send(&Message::RoundDone {
            round: report.rounds,
            dirty_pages,
        })?;
        let d = planner.round_finished(RoundStats {
            pages_sent: pages,
            bytes_sent: bytes,
            elapsed_ns: t.elapsed().as_nanos() as u64,
            dirtied_pages: dirty_pages,
        });
        match d {
            Decision::NextRound => continue,
            Decision::Throttle(_) if mode == MoveMode::Auto && postcopy_ok => {
                // The guest writes faster than the link drains: rather than slow it down,
                // move it now and send what it wrote after it.
                report.total_ns = t0.elapsed().as_nanos() as u64;
                return Ok(Switch::Post(todo));
            }
            Decision::Throttle(f) => {
                // The guest writes faster than the link drains: slow it down.
                pause.throttle(f);
                report.throttle = f;
                continue;
            }
            Decision::SwitchOver(_) => break,
        }
    }
    report.total_ns = t0.elapsed().as_nanos() as u64;
    Ok(Switch::Copy(todo))
}

/// Ping/Pong exchanges taken to estimate the destination's wall clock.
const CLOCK_PINGS: usize = 5;

/// One Ping/Pong: our CLOCK_REALTIME when the Ping left (ns), its round trip (ns), and the
/// destination's CLOCK_REALTIME in the Pong (ns).
#[derive(Clone, Copy, Debug)]
struct ClockSample {
    sent: i64,
    rtt: i64,
    theirs: i64,
}

/// How far the destination's wall clock reads ahead of ours, and the round trip it was taken
/// with, from the exchange with the shortest round trip (NTP's clock filter, RFC 5905 §10,
/// reduced to its first rule): its error is at most half that round trip. None without one.
fn clock_delta(samples: &[ClockSample]) -> Option<(i64, i64)> {
    let s = samples.iter().min_by_key(|s| s.rtt)?;
    Some((s.theirs - (s.sent + s.rtt / 2), s.rtt))
}

/// One Ping/Pong: the destination answers only after everything sent before the Ping.
fn sync(link: &mut dyn Conn) -> Result<()> {
    link.send(&Message::Ping {
        t: realtime_ns() as u64,
    })?;
    match link.recv()? {
        Message::Pong { .. } => Ok(()),
        Message::Abort { reason } => bail!("destination aborted: {reason}"),
        other => bail!("expected Pong, got {:?}", other.kind()),
    }
}

/// The switch-over of a paused `vm`: capture its state (wall clock shifted to keep home's on
/// the destination), then the stop-and-copy round, or the post-copy switch-over (then the
/// push that follows it is returned). On failure dirty logging is stopped and the VM can run
/// on here, unless the error is [`Lost`].
pub fn switch_vm(
    link: &mut dyn Conn,
    vm: &mut vmm::vm::Vm,
    switch: &Switch,
    report: &mut Report,
) -> Result<Option<Push>> {
    let view = vm.memory_view();
    let delta = report.clock_delta_ns;
    let r = vm
        .capture()
        .and_then(|mut s| {
            s.shift_realtime(delta);
            s.encode()
        })
        .and_then(|state| match switch {
            Switch::Copy(pending) => {
                switch_over(link, &view, pending, &state, report).map(|_| None)
            }
            Switch::Post(stale) => {
                switch_over_postcopy(link, &view, stale, &state, report).map(Some)
            }
        });
    if r.is_err() {
        let _ = view.stop_dirty_log();
    }
    r
}

/// A post-copy switch-over whose outcome is unknown (the link failed after the state left):
/// the guest may be running at the destination, so it must not run here too. The process is
/// lost (as in QEMU's post-copy: neither side has all of it).
#[derive(Debug)]
pub struct Lost(pub String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Lost {}

/// The post-copy switch-over, with the guest paused: the pages it wrote last (up to
/// [`HOT_PAGES`]), then the state and the list of pages still to come (those the destination
/// lacks: `stale` and the ones written since). The
/// push starts at once (restoring the guest may touch memory); pages asked for while the
/// destination restores go first. Waits for the guest to resume there.
fn switch_over_postcopy(
    link: &mut dyn Conn,
    view: &MemView,
    stale: &[u64],
    state: &[u8],
    report: &mut Report,
) -> Result<Push> {
    let t = Instant::now();
    // (Both lists are in page order: a merge, not a sort, while the guest waits.)
    let mut hot = view.take_dirty()?;
    let stale = merge_sorted(stale, &hot);
    hot.truncate(HOT_PAGES);
    let outstanding: Vec<u64> = stale
        .into_iter()
        .filter(|p| hot.binary_search(p).is_err())
        .collect();
    let sender = link
        .sender()
        .ok_or_else(|| anyhow::anyhow!("this link cannot carry a post-copy"))?;
    let (pages, bytes) = send_pages(link, view, &hot)?;
    report.last_pages = pages;
    report.pages += pages;
    report.bytes += bytes;
    report.postcopy = true;
    report.outstanding_pages = outstanding.len() as u64;
    link.send(&Message::PostcopyState {
        vcpu_and_vmm: state.to_vec(),
        outstanding: migrate::postcopy::to_runs(&outstanding),
    })
    .context("sending the state")?;
    let push = Push::start(sender, view.clone(), &outstanding);
    loop {
        match link.recv() {
            Ok(Message::Resumed) => break,
            Ok(Message::PageRequest { pages }) => push.request(pages),
            // The destination gave up before it ran the guest: it runs on here.
            Ok(Message::Abort { reason }) => {
                push.stop();
                bail!("destination aborted: {reason}");
            }
            Ok(_) => {}
            Err(e) => {
                push.stop();
                return Err(anyhow::Error::new(Lost(format!(
                    "the link failed during a post-copy switch-over: {e:#}"
                ))));
            }
        }
    }
    report.downtime_ns = t.elapsed().as_nanos() as u64;
    report.total_ns += report.downtime_ns;
    Ok(push)
}

/// The union of two ascending page lists, ascending, without duplicates.
fn merge_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x <= y => {
                i += 1;
                j += usize::from(x == y);
                x
            }
            (_, Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, None) => break,
        };
        if out.last() != Some(&next) {
            out.push(next);
        }
    }
    out
}

/// Pages per batch of a post-copy push (256 KiB): a page asked for waits behind at most one.
const PUSH_BATCH: usize = 64;

/// A post-copy's push at the source (`migrate::postcopy::Pusher` on a thread of its own):
/// the pages the destination asks for first, then the rest in page order, each once; it ends
/// when every page has been sent or the link fails.
pub struct Push {
    requests: mpsc::Sender<Vec<u64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes written to the link so far.
    bytes: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
}

impl Push {
    fn start(link: Wire, view: MemView, outstanding: &[u64]) -> Push {
        use std::sync::atomic::Ordering::Relaxed;
        let (requests, asked) = mpsc::channel::<Vec<u64>>();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut pusher = migrate::postcopy::Pusher::new(outstanding);
        let (stopped, sent) = (stop.clone(), bytes.clone());
        std::thread::spawn(move || {
            crate::link::block_host_signals();
            let mut b = PageBatchBuilder::with_compression(migrate::pages::Compression::Never);
            let mut page = [0u8; PAGE as usize];
            while !pusher.done() && !stopped.load(Relaxed) {
                while let Ok(ask) = asked.try_recv() {
                    pusher.request(&ask);
                }
                for gpn in pusher.next_batch(PUSH_BATCH) {
                    // Every outstanding page crosses, or the destination would wait for it
                    // forever: one that cannot be read here is a zero page.
                    if !view.read_page(gpn, &mut page) {
                        page.fill(0);
                    }
                    if b.push(gpn, &page).is_err() {
                        return;
                    }
                }
                let m = Message::Pages(b.finish());
                match link.send(&m) {
                    Ok(n) => sent.fetch_add(n, Relaxed),
                    // The link is gone: so is the process (the link's reader says so).
                    Err(_) => return,
                };
                if let Message::Pages(batch) = m {
                    b.recycle(batch);
                }
            }
        });
        Push {
            requests,
            stop,
            bytes,
            started: Instant::now(),
        }
    }

    /// The destination asks for `pages`.
    pub fn request(&self, pages: Vec<u64>) {
        let _ = self.requests.send(pages);
    }

    /// Stop pushing (the thread ends after its batch in flight).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The destination has every page (`faults`: accesses that waited): complete `report`.
    pub fn finish(&self, faults: u64, report: &mut Report) {
        let n = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        report.bytes += n;
        report.pages += report.outstanding_pages;
        report.faults = faults;
        report.postcopy_ns = self.started.elapsed().as_nanos() as u64;
        report.total_ns += report.postcopy_ns;
        self.stop();
    }
}

/// The stop-and-copy round, with the guest paused: the last dirty pages (those left from
/// pre-copy included), then the state; waits for the destination to resume the guest.
pub fn switch_over(
    link: &mut dyn Conn,
    view: &MemView,
    pending: &[u64],
    state: &[u8],
    report: &mut Report,
) -> Result<()> {
    let t = Instant::now();
    let mut last = view.take_dirty()?;
    last.extend_from_slice(pending);
    last.sort_unstable();
    last.dedup();
    let (pages, bytes) = send_pages(link, view, &last)?;
    report.last_pages = pages;
    report.pages += pages;
    report.bytes += bytes;
    link.send(&Message::State {
        vcpu_and_vmm: state.to_vec(),
    })
    .context("sending the state")?;
    match link
        .recv()
        .context("waiting for the guest to resume at the destination")?
    {
        Message::Resumed => {}
        Message::Abort { reason } => bail!("destination aborted: {reason}"),
        other => bail!("unexpected answer to the state: {:?}", other.kind()),
    }
    report.downtime_ns = t.elapsed().as_nanos() as u64;
    report.total_ns += report.downtime_ns;
    Ok(())
}

/// A guest received by [`receive`], ready to restore.
pub struct Arrived {
    pub prepared: vmm::vm::Prepared,
    pub state: vmm::vm::MigState,
    pub offer: MigrateOffer,
    /// After a post-copy switch-over: the guest memory, registered with the userfaultfd,
    /// whose outstanding pages are still to arrive (put them in with `Faults::place`).
    pub postcopy: Option<Arc<vmm::postcopy::Faults>>,
}

/// Destination: receive a guest on `link` (the offer is the first message unless given),
/// prepare its VM (its memory starting with `pool`'s touched pages, when given), and return it
/// with its state once the state arrives. With `uffd` the source may switch over by post-copy
/// (see [`Arrived::postcopy`]). Messages that are not part of the migration (a guest coming
/// home keeps making deputy calls while its pages travel) go to `other`.
pub fn receive(
    link: &mut dyn Conn,
    offer: Option<MigrateOffer>,
    pool: Option<vmm::pool::Pool>,
    uffd: Option<vmm::postcopy::Userfault>,
    other: &mut dyn FnMut(Message) -> Result<()>,
) -> Result<Arrived> {
    let offer = match offer {
        Some(o) => o,
        None => match link.recv().context("waiting for the offer")? {
            Message::MigrateOffer(o) => o,
            other => bail!("expected an offer, got {:?}", other.kind()),
        },
    };
    if offer.page_size as u64 != PAGE {
        let reason = format!("page size {} not supported", offer.page_size);
        let _ = link.send(&Message::MigrateRefuse {
            reason: reason.clone(),
        });
        bail!(reason);
    }
    // A post-copy from the start sends no first pass: its pages would land in the pool only
    // to be discarded (each then faults until it arrives), which costs downtime.
    let pool = pool.filter(|_| offer.touched_pages > 0);
    let mut pooled = 0;
    let prepared = vmm::memory::GuestMem::with_pool(offer.mem_bytes, pool).and_then(|(m, n)| {
        pooled = n;
        vmm::vm::Vm::prepare(m)
    });
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            let reason = format!(
                "cannot host {} bytes of guest memory: {e:#}",
                offer.mem_bytes
            );
            let _ = link.send(&Message::MigrateRefuse {
                reason: reason.clone(),
            });
            bail!(reason);
        }
    };
    // What the pool did not give is faulted in while the pages travel.
    prepared
        .mem()
        .populate_in_background(pooled, offer.touched_pages * PAGE);
    link.send(&Message::MigrateAccept {
        postcopy: uffd.is_some(),
    })?;
    let mut uffd = uffd;
    loop {
        let got = link
            .recv_into(&mut Landing(prepared.mem()))
            .context("receiving the guest")?;
        let m = match got {
            Received::Pages(_) => continue,
            Received::Message(m) => m,
        };
        match m {
            Message::RoundDone { .. } => {}
            Message::Ping { .. } => {
                link.send(&Message::Pong {
                    t: realtime_ns() as u64,
                })?;
            }
            Message::State { vcpu_and_vmm } => {
                let state = vmm::vm::MigState::decode(&vcpu_and_vmm)?;
                return Ok(Arrived {
                    prepared,
                    state,
                    offer,
                    postcopy: None,
                });
            }
            Message::PostcopyState {
                vcpu_and_vmm,
                outstanding,
            } => {
                let pages = prepared.mem().size() / PAGE;
                let faults = migrate::postcopy::from_runs(&outstanding, pages)
                    .ok_or_else(|| anyhow::anyhow!("more outstanding pages than guest memory"))
                    .and_then(|list| {
                        let u = uffd.take().ok_or_else(|| {
                            anyhow::anyhow!("a post-copy this host did not offer")
                        })?;
                        vmm::postcopy::Faults::register(u, prepared.mem(), &list)
                    });
                let ready = faults.and_then(|f| {
                    let state = vmm::vm::MigState::decode(&vcpu_and_vmm)?;
                    Ok((f, state))
                });
                let (faults, state) = match ready {
                    Ok(x) => x,
                    Err(e) => {
                        // Nothing ran here: the guest runs on at the source.
                        let reason = format!("cannot receive by post-copy: {e:#}");
                        let _ = link.send(&Message::Abort {
                            reason: reason.clone(),
                        });
                        bail!(reason);
                    }
                };
                return Ok(Arrived {
                    prepared,
                    state,
                    offer,
                    postcopy: Some(faults),
                });
            }
            Message::Abort { reason } => bail!("source aborted: {reason}"),
            m => other(m)?,
        }
    }
}

/// Post-copy, destination: put the pages of `batch` in place through `faults`; true once
/// every outstanding page has arrived.
pub fn place_pages(faults: &vmm::postcopy::Faults, batch: &migrate::PageBatch) -> Result<bool> {
    let d = batch
        .decode()
        .map_err(|e| anyhow::anyhow!("bad page batch: {e}"))?;
    // Consecutive pages whose bytes lie one after another in the batch go in together.
    let mut run: Option<(u64, *const u8, usize)> = None;
    let flush = |run: Option<(u64, *const u8, usize)>| -> Result<()> {
        if let Some((first, at, n)) = run {
            // SAFETY: `at` starts `n` whole pages that lie one after another in the decoded
            // batch `d`, which outlives this call.
            let bytes = unsafe { std::slice::from_raw_parts(at, n * PAGE as usize) };
            faults.place_run(first, bytes)?;
        }
        Ok(())
    };
    for (gpn, page) in d.iter() {
        run = match run {
            Some((first, at, n))
                if first + n as u64 == gpn
                    && at.wrapping_add(n * PAGE as usize) == page.as_ptr() =>
            {
                Some((first, at, n + 1))
            }
            other => {
                flush(other)?;
                Some((gpn, page.as_ptr(), 1))
            }
        };
    }
    flush(run)?;
    Ok(faults.complete())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination 7 ms ahead, exchanges with a one-way delay of 20 µs each way, one of them
    /// held up 5 ms on its way back: the estimate comes from a quick one, within 1 µs.
    #[test]
    fn page_lists_merge_in_order_without_duplicates() {
        let a = [1, 3, 3, 5, 9];
        let b = [2, 3, 9, 10];
        assert_eq!(merge_sorted(&a, &b), vec![1, 2, 3, 5, 9, 10]);
        assert_eq!(merge_sorted(&[], &b), b.to_vec());
        assert_eq!(merge_sorted(&a[..1], &[]), vec![1]);
    }

    #[test]
    fn the_clock_delta_comes_from_the_quickest_exchange() {
        let ahead = 7_000_000i64;
        let ex = |sent: i64, out: i64, back: i64| ClockSample {
            sent,
            rtt: out + back,
            theirs: sent + out + ahead,
        };
        let samples = [
            ex(1_000_000, 20_000, 5_000_000),
            ex(9_000_000, 20_000, 20_000),
            ex(12_000_000, 21_000, 19_000),
        ];
        let (delta, rtt) = clock_delta(&samples).unwrap();
        assert_eq!(rtt, 40_000);
        assert!((delta - ahead).abs() <= 1_000, "{delta}");
        // The held-up exchange alone would have been 2.5 ms off.
        let (alone, _) = clock_delta(&samples[..1]).unwrap();
        assert!((alone - ahead).abs() > 2_000_000);
        assert_eq!(clock_delta(&[]), None);
    }
}
