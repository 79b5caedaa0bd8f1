//! The destination of a post-copy migration: guest memory whose outstanding pages are still at
//! the source (see `migrate::postcopy`). The whole guest mapping is registered with a
//! userfaultfd (userfaultfd(2), missing-page mode, through the `userfaultfd` crate), so any
//! access to a page that is not there yet, by the guest (through KVM) or by the VMM itself,
//! waits in the kernel. [`Faults::serve`] answers those faults on a thread of its own: a zero
//! page is filled at once (`UFFDIO_ZEROPAGE`), an outstanding one is asked for, and the access
//! waits until [`Faults::place`] puts the page in (`UFFDIO_COPY`, which wakes it).
//!
//! Creating a userfaultfd that sees KVM's (kernel-mode) accesses needs privilege where
//! `vm.unprivileged_userfaultfd` is 0: create it ([`open`]) before dropping privileges.
//!
//! While a post-copy is in flight in this process, a host fork waits for it to complete
//! ([`settle`]): a forked child's copy of the memory is not registered, and its outstanding
//! pages would read as zeros there.

use crate::memory::{GuestMem, PAGE};
use migrate::postcopy::{Arrivals, FaultAction};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use userfaultfd::{Event, Uffd, UffdBuilder};

/// A userfaultfd, made while the process may still make one (see the module's documentation).
pub struct Userfault(Uffd);

/// Create a userfaultfd for a later [`Faults::register`]. Errors: userfaultfd(2)'s (EPERM
/// without CAP_SYS_PTRACE where `vm.unprivileged_userfaultfd` is 0, ENOSYS without it).
pub fn open() -> anyhow::Result<Userfault> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map(Userfault)
        .map_err(|e| anyhow::anyhow!("userfaultfd: {e}"))
}

/// The post-copy in flight in this process, if any.
static IN_FLIGHT: Mutex<Option<Arc<Faults>>> = Mutex::new(None);

/// Wait until no post-copy is in flight in this process (its pages all arrived, or it was
/// stopped). Returns at once when none is.
pub fn settle() {
    loop {
        let busy = IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|f| !f.complete() && !f.stop.load(Ordering::Relaxed));
        if !busy {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Zero guest memory `[at, at + len)` (host addresses, page aligned) that a post-copy in
/// flight in this process may still fill: its pages become zero pages for good (what arrives
/// for them later is dropped, a fault on them gets a zero page, and an access waiting for one
/// is woken to find it so). False when no registered post-copy covers the range: then the
/// caller zeroes it as usual (MADV_DONTNEED).
pub fn zero_if_arriving(at: *mut u8, len: usize) -> bool {
    let f = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(f) = f else { return false };
    let at = at as usize;
    if at < f.base || at + len > f.base + f.len || !f.registered.load(Ordering::SeqCst) {
        return false;
    }
    let mut arrivals = f.arrivals();
    let first = ((at - f.base) as u64) / PAGE;
    for gpn in first..first + (len as u64).div_ceil(PAGE) {
        let _ = arrivals.dropped(gpn);
    }
    // Under the lock: no page of the range is being put in meanwhile.
    // SAFETY: the range lies inside the registered guest mapping (checked above); its
    // contents are given up on purpose (the caller zeroes it).
    unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    let _ = f.uffd.wake(at as *mut libc::c_void, len);
    true
}

/// Guest memory served by userfaultfd while its outstanding pages arrive.
pub struct Faults {
    uffd: Uffd,
    base: usize,
    len: usize,
    arrivals: Mutex<Arrivals>,
    /// Faults answered, for statistics.
    faults: AtomicU64,
    stop: AtomicBool,
    /// The range is still registered with the userfaultfd.
    registered: AtomicBool,
}

// SAFETY: `base` is an address, not a reference; every access to guest memory through it goes
// through the userfaultfd ioctls, which the kernel serialises with the faults.
unsafe impl Send for Faults {}
// SAFETY: as above; the mutable state is behind a mutex or atomic.
unsafe impl Sync for Faults {}

impl Faults {
    /// Register all of `mem` with `uffd` for missing-page faults, `outstanding` being the
    /// guest pages the source still holds. Whatever `mem` holds for those pages (an older copy
    /// from pre-copy, a pool's zeros) is discarded, so each of them faults until it arrives;
    /// other pages present never fault. A background populate of `mem` is stopped first.
    /// Errors: the registration's (EINVAL where the kernel lacks missing-page mode), a page
    /// number past the memory.
    pub fn register(
        uffd: Userfault,
        mem: &GuestMem,
        outstanding: &[u64],
    ) -> anyhow::Result<Arc<Faults>> {
        let Userfault(uffd) = uffd;
        mem.stop_populating();
        let base = mem.host_base() as usize;
        let arrivals = Arrivals::new(mem.size() / PAGE, outstanding)?;
        // Only up to the last outstanding page: beyond it every page is a zero page, which
        // needs no answer (and registering less costs less, with the guest paused).
        let len = (outstanding.iter().max().map_or(0, |&p| p + 1) * PAGE) as usize;
        if len > 0 {
            uffd.register(base as *mut libc::c_void, len)
                .map_err(|e| anyhow::anyhow!("registering guest memory with userfaultfd: {e}"))?;
            // Registered first: a page discarded now cannot be filled in behind our back.
            mem.discard_pages(outstanding)?;
        }
        let f = Arc::new(Faults {
            uffd,
            base,
            len,
            arrivals: Mutex::new(arrivals),
            faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            registered: AtomicBool::new(len > 0),
        });
        *IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.clone());
        Ok(f)
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, Arrivals> {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer faults on a thread of its own until every outstanding page has arrived (then
    /// the memory is unregistered) or [`Faults::stop`]: zero pages at once, outstanding pages
    /// asked for through `ask` (the faulting page first, see `migrate::postcopy`).
    pub fn serve(
        self: &Arc<Self>,
        mut ask: impl FnMut(Vec<u64>) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            while !me.stop.load(Ordering::Relaxed) {
                {
                    // (Under the lock, so that no zeroing is between its check and here.)
                    let arrivals = me.arrivals();
                    if arrivals.complete() {
                        if me.registered.swap(false, Ordering::SeqCst) {
                            let _ = me.uffd.unregister(me.base as *mut libc::c_void, me.len);
                        }
                        return;
                    }
                }
                let mut p = libc::pollfd {
                    fd: me.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
                    continue;
                }
                let Ok(Some(Event::Pagefault { addr, .. })) = me.uffd.read_event() else {
                    continue;
                };
                me.faults.fetch_add(1, Ordering::Relaxed);
                let at = (addr as usize - me.base) & !(PAGE as usize - 1);
                let gpn = (at as u64) / PAGE;
                let page = (me.base + at) as *mut libc::c_void;
                // The page is put in place under the same lock (`place`), so what this says
                // is still true when it is acted on.
                let mut arrivals = me.arrivals();
                match arrivals.fault(gpn) {
                    Ok(FaultAction::Zero) => {
                        // SAFETY: a page of the registered range; it is missing (or EEXIST,
                        // which only wakes).
                        if unsafe { me.uffd.zeropage(page, PAGE as usize, true) }.is_err() {
                            let _ = me.uffd.wake(page, PAGE as usize);
                        }
                    }
                    Ok(FaultAction::Request(pages)) => {
                        drop(arrivals);
                        ask(pages);
                    }
                    Ok(FaultAction::Present) => {
                        let _ = me.uffd.wake(page, PAGE as usize);
                    }
                    Ok(FaultAction::Wait) | Err(_) => {}
                }
            }
        })
    }

    /// Put arriving page `gpn` in place and wake whatever waits for it. False for a duplicate
    /// or a page that was never outstanding (dropped), or one already there.
    pub fn place(&self, gpn: u64, data: &[u8; PAGE as usize]) -> anyhow::Result<bool> {
        let mut arrivals = self.arrivals();
        if !arrivals.arrived(gpn)? {
            return Ok(false);
        }
        let dst = (self.base + (gpn * PAGE) as usize) as *mut libc::c_void;
        // SAFETY: `dst` is a page of the registered range (`arrived` checked the number) and
        // `data` is one page; UFFDIO_COPY fills it atomically and wakes who waits.
        match unsafe { self.copy_all(data, dst) } {
            Ok(()) => Ok(true),
            // Present already (written before the registration): what is there stays.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => Ok(false),
            Err(e) => Err(anyhow::anyhow!("placing page {gpn:#x}: {e:?}")),
        }
    }

    /// Put arriving pages `first`, `first + 1`, ... (`data`: whole pages, in order) in place
    /// with one UFFDIO_COPY when every one of them is awaited, else one by one as
    /// [`Faults::place`] does. Returns how many were put in.
    pub fn place_run(&self, first: u64, data: &[u8]) -> anyhow::Result<usize> {
        let n = data.len() / PAGE as usize;
        anyhow::ensure!(data.len() == n * PAGE as usize, "a run of whole pages");
        let one_by_one = |placed: &mut usize| -> anyhow::Result<()> {
            for (i, page) in data.as_chunks::<{ PAGE as usize }>().0.iter().enumerate() {
                *placed += usize::from(self.place(first + i as u64, page)?);
            }
            Ok(())
        };
        let mut placed = 0;
        let arrivals = self.arrivals();
        if n < 2 || !(first..first + n as u64).all(|p| arrivals.awaited(p)) {
            drop(arrivals);
            one_by_one(&mut placed)?;
            return Ok(placed);
        }
        let dst = (self.base + (first * PAGE) as usize) as *mut libc::c_void;
        // SAFETY: `dst` starts a run of `n` pages of the registered range (every one awaited,
        // so inside it) and `data` holds `n` pages; UFFDIO_COPY fills them and wakes who waits.
        match unsafe { self.copy_all(data, dst) } {
            Ok(()) => {
                let mut arrivals = arrivals;
                for p in first..first + n as u64 {
                    arrivals.arrived(p)?;
                }
                Ok(n)
            }
            // The run crosses from one mapping to the next (the pool's pages were moved in):
            // one page at a time (those copied already are found there).
            // (ENOENT: no one registered mapping holds the whole range.)
            Err(userfaultfd::Error::CopyFailed(e))
                if matches!(e as i32, libc::ENOENT | libc::EINVAL) =>
            {
                drop(arrivals);
                one_by_one(&mut placed)?;
                Ok(placed)
            }
            Err(e) => Err(anyhow::anyhow!("placing pages {first:#x}+{n}: {e:?}")),
        }
    }

    /// UFFDIO_COPY of `data` to `dst`, waking who waits, going on where the kernel stopped
    /// early (EAGAIN with part copied).
    ///
    /// # Safety
    /// `dst..dst + data.len()` lies in the registered range.
    unsafe fn copy_all(&self, data: &[u8], dst: *mut libc::c_void) -> userfaultfd::Result<()> {
        let mut done = 0;
        // (A bound, should the kernel keep stopping early without progress.)
        for _ in 0..1000 {
            if done >= data.len() {
                return Ok(());
            }
            let (src, to) = (
                data[done..].as_ptr(),
                (dst as usize + done) as *mut libc::c_void,
            );
            // SAFETY: the rest of `data` to the rest of the range the caller vouched for.
            match unsafe { self.uffd.copy(src.cast(), to, data.len() - done, true) } {
                Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
                Err(e) => return Err(e),
            }
        }
        Err(userfaultfd::Error::PartiallyCopied(done))
    }

    /// Whether every outstanding page has arrived.
    pub fn complete(&self) -> bool {
        self.arrivals().complete()
    }

    /// Outstanding pages not arrived yet.
    pub fn remaining(&self) -> usize {
        self.arrivals().remaining()
    }

    /// Faults answered so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Stop serving (the thread ends within 50 ms).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory the VMM zeroes while its pages are still arriving (the guest unmapped
    /// them) stays zero: an outstanding page that arrives later is dropped, and an arrived
    /// one reads as zero, not as what arrived. Needs a userfaultfd (root).
    #[test]
    fn memory_zeroed_during_a_post_copy_stays_zero() {
        let Ok(uffd) = open() else {
            eprintln!("skipped: no userfaultfd here");
            return;
        };
        let mem = GuestMem::new(8 << 20).unwrap();
        let (arrived, never) = (200u64, 201u64);
        let faults = Faults::register(uffd, &mem, &[arrived, never, 202]).unwrap();
        let server = faults.serve(|_| {});
        let old = [0xabu8; PAGE as usize];
        assert!(faults.place(arrived, &old).unwrap());
        mem.zero_frames(arrived * PAGE, 2 * PAGE);
        assert!(
            !faults.place(never, &old).unwrap(),
            "a page given up was put in"
        );
        assert_eq!(faults.remaining(), 1, "page 202 is still to come");
        let view = mem.view();
        let mut buf = [1u8; PAGE as usize];
        for gpn in [arrived, never] {
            assert!(view.read_page(gpn, &mut buf));
            assert!(buf.iter().all(|&b| b == 0), "page {gpn} is not zero");
        }
        assert!(faults.place(202, &old).unwrap());
        assert!(faults.complete());
        faults.stop();
        server.join().unwrap();
    }
    /// A run of arriving pages that crosses from the pool's pages (moved in: a mapping of
    /// their own) into the rest of guest memory goes in whole.
    #[test]
    fn a_run_of_pages_across_the_pools_end_goes_in_whole() {
        let Ok(uffd) = open() else {
            eprintln!("skipped: no userfaultfd here");
            return;
        };
        let f = crate::pool::Pool::reserve(2 << 20)
            .unwrap()
            .fill_in_background();
        while f.ready() < 2 << 20 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (mem, pooled) = GuestMem::with_pool(8 << 20, Some(f.finish())).unwrap();
        assert_eq!(pooled, 2 << 20);
        let first = pooled / PAGE - 3;
        let run: Vec<u64> = (first..first + 6).collect();
        let faults = Faults::register(uffd, &mem, &run).unwrap();
        let data: Vec<u8> = (0..6 * PAGE as usize)
            .map(|i| (i / 4096 + 1) as u8)
            .collect();
        assert_eq!(faults.place_run(first, &data).unwrap(), 6);
        assert!(faults.complete());
        let view = mem.view();
        let mut buf = [0u8; PAGE as usize];
        for (i, gpn) in run.iter().enumerate() {
            assert!(view.read_page(*gpn, &mut buf));
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "page {gpn:#x}");
        }
    }
}
