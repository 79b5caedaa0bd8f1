//! Live migration over a link: the source side (pre-copy while the guest runs, then the last
//! dirty pages and the vCPU/VMM state while it is paused) and the destination side (receive
//! into fresh guest memory, restore, resume, report). The link is a plain stream of `migrate`
//! frames; node services carry it over mutual TLS.

use anyhow::{bail, Context, Result};
use migrate::frame::{MemRegion, MigrateOffer};
use migrate::handshake::{CpuFeatures, CpuidLeaf};
use migrate::{
    read_message, write_message, Decision, Message, PageBatchBuilder, Planner, RoundStats,
};
use std::io::Write;
use std::os::unix::net::UnixStream;
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

/// Statistics of one migration, for `--stats`-style reports and benchmarks.
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
}

/// Counting writer, so rounds know their bytes.
struct Counted<'a> {
    inner: &'a mut UnixStream,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Send the given pages in batches; returns (pages, bytes).
fn send_pages(link: &mut UnixStream, view: &MemView, gpns: &[u64]) -> Result<(u64, u64)> {
    let mut out = Counted {
        inner: link,
        bytes: 0,
    };
    // lz4 costs more CPU time than it saves on a LAN-speed link; pages go uncompressed (zero
    // pages still travel as bits).
    let mut b = PageBatchBuilder::with_compression(migrate::pages::Compression::Never);
    let mut page = [0u8; PAGE as usize];
    for &gpn in gpns {
        if !view.read_page(gpn, &mut page) {
            continue;
        }
        if b.push(gpn, &page).is_err() {
            write_message(&mut out, &Message::Pages(b.finish())).context("sending pages")?;
            b.push(gpn, &page)
                .map_err(|_| anyhow::anyhow!("page batch refused a page"))?;
        }
    }
    if !b.is_empty() {
        write_message(&mut out, &Message::Pages(b.finish())).context("sending pages")?;
    }
    Ok((gpns.len() as u64, out.bytes))
}

/// The source's pre-copy, while the guest runs: offer, first pass of touched pages, rounds from
/// the dirty log until the planner says switch over. Returns the planner's state for the
/// stop-and-copy round (done by the vCPU thread once the guest is paused).
pub fn precopy(
    link: &mut UnixStream,
    view: &MemView,
    kick: &dyn Fn(),
    pid: u32,
    home: &str,
    mem_bytes: u64,
    report: &mut Report,
) -> Result<Vec<u64>> {
    let t0 = Instant::now();
    view.start_dirty_log()?;
    let first = view.resident_pages();
    report.first_pages = first.len() as u64;
    let offer = MigrateOffer {
        pid,
        home_node: home.to_string(),
        mem_bytes,
        touched_pages: first.len() as u64,
        page_size: PAGE as u32,
        regions: vec![MemRegion {
            guest_phys: 0,
            len: mem_bytes,
        }],
        deputy_token: None,
    };
    write_message(link, &Message::MigrateOffer(offer)).context("sending the offer")?;
    match read_message(link).context("waiting for the destination's answer")? {
        Message::MigrateAccept => {}
        Message::MigrateRefuse { reason } => bail!("destination refused: {reason}"),
        Message::Abort { reason } => bail!("destination aborted: {reason}"),
        other => bail!("unexpected answer to the offer: {:?}", other.kind()),
    }
    let mut planner = Planner::new(migrate::precopy::Config::default());
    // The state is a few KiB; its fixed cost is one round trip.
    planner.set_state_cost(16 << 10, 200_000);
    let mut todo = first;
    loop {
        let t = Instant::now();
        let (pages, bytes) = send_pages(link, view, &todo)?;
        report.rounds += 1;
        report.pages += pages;
        report.bytes += bytes;
        kick();
        todo = view.take_dirty()?;
        write_message(
            link,
            &Message::RoundDone {
                round: report.rounds,
                dirty_pages: todo.len() as u64,
            },
        )?;
        let d = planner.round_finished(RoundStats {
            pages_sent: pages,
            bytes_sent: bytes,
            elapsed_ns: t.elapsed().as_nanos() as u64,
            dirtied_pages: todo.len() as u64,
        });
        match d {
            Decision::NextRound | Decision::Throttle(_) => continue,
            Decision::SwitchOver(_) => break,
        }
    }
    report.total_ns = t0.elapsed().as_nanos() as u64;
    // Dirtied during the last round and not sent yet: the stop-and-copy round sends them.
    Ok(todo)
}

/// The stop-and-copy round, with the guest paused: the last dirty pages, then the state; waits
/// for the destination to resume the guest.
pub fn switch_over(
    link: &mut UnixStream,
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
    write_message(
        link,
        &Message::State {
            vcpu_and_vmm: state.to_vec(),
        },
    )
    .context("sending the state")?;
    match read_message(link).context("waiting for the guest to resume at the destination")? {
        Message::Resumed => {}
        Message::Abort { reason } => bail!("destination aborted: {reason}"),
        other => bail!("unexpected answer to the state: {:?}", other.kind()),
    }
    report.downtime_ns = t.elapsed().as_nanos() as u64;
    report.total_ns += report.downtime_ns;
    Ok(())
}

/// Destination: receive a guest on `link` (the offer is the first message), restore it, tell
/// the source it runs, and return it ready to run.
pub fn receive(link: &mut UnixStream) -> Result<(vmm::vm::Prepared, vmm::vm::MigState)> {
    let offer = match read_message(link).context("waiting for the offer")? {
        Message::MigrateOffer(o) => o,
        other => bail!("expected an offer, got {:?}", other.kind()),
    };
    if offer.page_size as u64 != PAGE {
        let reason = format!("page size {} not supported", offer.page_size);
        let _ = write_message(
            link,
            &Message::MigrateRefuse {
                reason: reason.clone(),
            },
        );
        bail!(reason);
    }
    let prepared = vmm::memory::GuestMem::new(offer.mem_bytes).and_then(vmm::vm::Vm::prepare);
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            let reason = format!(
                "cannot reserve {} bytes of guest memory: {e}",
                offer.mem_bytes
            );
            let _ = write_message(
                link,
                &Message::MigrateRefuse {
                    reason: reason.clone(),
                },
            );
            bail!(reason);
        }
    };
    write_message(link, &Message::MigrateAccept)?;
    loop {
        match read_message(link).context("receiving the guest")? {
            Message::Pages(b) => {
                let d = b
                    .decode()
                    .map_err(|e| anyhow::anyhow!("bad page batch: {e}"))?;
                for (gpn, page) in d.iter() {
                    prepared
                        .mem()
                        .write_page(gpn, page)
                        .map_err(|_| anyhow::anyhow!("page {gpn:#x} outside guest memory"))?;
                }
            }
            Message::RoundDone { .. } => {}
            Message::State { vcpu_and_vmm } => {
                let st = vmm::vm::MigState::decode(&vcpu_and_vmm)?;
                return Ok((prepared, st));
            }
            Message::Abort { reason } => bail!("source aborted: {reason}"),
            other => bail!("unexpected message during migration: {:?}", other.kind()),
        }
    }
}
