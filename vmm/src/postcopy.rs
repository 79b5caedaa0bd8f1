//! The destination of a post-copy migration: guest memory whose outstanding pages are still at
//! the source (see `migrate::postcopy`). The whole guest mapping is registered with a
//! userfaultfd (userfaultfd(2), missing-page mode, through the `userfaultfd` crate), so any
//! access to a page that is not there yet, by the guest (through KVM) or by the VMM itself,
//! waits in the kernel. [`Faults::serve`] answers those faults on a thread of its own: a zero
//! page is filled at once (`UFFDIO_ZEROPAGE`), an outstanding one is asked for, and the access
//! waits until [`Faults::place`] puts the page in (`UFFDIO_COPY`, which wakes it).
//!
//! Creating a userfaultfd that sees KVM's (kernel-mode) accesses needs privilege where
//! `vm.unprivileged_userfaultfd` is 0: create it before dropping privileges.

use crate::memory::{GuestMem, PAGE};
use migrate::postcopy::{Arrivals, FaultAction};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use userfaultfd::{Event, Uffd, UffdBuilder};

/// Guest memory served by userfaultfd while its outstanding pages arrive.
pub struct Faults {
    uffd: Uffd,
    base: usize,
    len: usize,
    arrivals: Mutex<Arrivals>,
    /// Faults answered, for statistics.
    faults: AtomicU64,
    stop: AtomicBool,
}

// SAFETY: `base` is an address, not a reference; every access to guest memory through it goes
// through the userfaultfd ioctls, which the kernel serialises with the faults.
unsafe impl Send for Faults {}
// SAFETY: as above; the mutable state is behind a mutex or atomic.
unsafe impl Sync for Faults {}

impl Faults {
    /// Register all of `mem` for missing-page faults, `outstanding` being the guest pages the
    /// source still holds. Pages already present (written before this call) never fault.
    /// Errors: userfaultfd(2)'s (EPERM without privilege), a page number past the memory.
    pub fn register(mem: &GuestMem, outstanding: &[u64]) -> anyhow::Result<Arc<Faults>> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| anyhow::anyhow!("userfaultfd: {e}"))?;
        let base = mem.host_base() as usize;
        let len = mem.size() as usize;
        uffd.register(base as *mut libc::c_void, len)
            .map_err(|e| anyhow::anyhow!("registering guest memory with userfaultfd: {e}"))?;
        let arrivals = Arrivals::new(len as u64 / PAGE, outstanding)?;
        Ok(Arc::new(Faults {
            uffd,
            base,
            len,
            arrivals: Mutex::new(arrivals),
            faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }))
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
                if me.arrivals().complete() {
                    let _ = me.uffd.unregister(me.base as *mut libc::c_void, me.len);
                    return;
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
        match unsafe {
            self.uffd.copy(
                data.as_ptr() as *const libc::c_void,
                dst,
                PAGE as usize,
                true,
            )
        } {
            Ok(_) => Ok(true),
            // Present already (written before the registration): what is there stays.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => Ok(false),
            Err(e) => Err(anyhow::anyhow!("placing page {gpn:#x}: {e}")),
        }
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
