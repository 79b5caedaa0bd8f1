//! Touched memory kept ready for an arriving guest.
//!
//! A migration's destination writes every page it receives into memory it has never touched.
//! Where the first touch of a page is dear (under nested virtualisation the outer hypervisor
//! backs each page then: 0.5 GB/s measured here, against 27 GB/s for memory already touched),
//! that first touch, not the link, bounds the migration. A [`Pool`] is private anonymous
//! memory, huge-page advised, touched in advance (`MADV_POPULATE_WRITE`, madvise(2)) by a
//! spare guest host while it waits for a guest, with at most a quarter of one CPU. When the guest arrives its memory is made
//! ([`crate::memory::GuestMem::with_pool`]) by moving the pool's page tables to the start of
//! the guest's mapping (`mremap(2)` with `MREMAP_FIXED`): no byte is copied, and the pages
//! stay private anonymous memory, so a later host fork shares them copy-on-write exactly as it
//! shares memory the guest touched itself.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Alignment of the pool, bytes: one huge page, so moving it moves whole page-middle entries.
const HUGE: usize = 2 << 20;

/// Private anonymous memory of which the first [`Pool::ready`] bytes are touched (and zero).
pub struct Pool {
    base: *mut u8,
    cap: usize,
    ready: usize,
    /// Bytes from `base` moved away into a guest's memory (no longer ours to unmap).
    taken: usize,
}

// SAFETY: the pool owns its mapping; nothing else refers to it, so it may move between
// threads like a Vec.
unsafe impl Send for Pool {}

impl Pool {
    /// Reserve `cap` bytes (rounded up to 2 MiB, 2 MiB aligned), none of them touched yet.
    /// Errors: mmap(2)'s (ENOMEM).
    pub fn reserve(cap: u64) -> std::io::Result<Pool> {
        let cap = (cap as usize).div_ceil(HUGE) * HUGE;
        let len = cap + HUGE;
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = p as usize;
        let base = start.div_ceil(HUGE) * HUGE;
        // SAFETY: the head and tail trimmed off lie inside the mapping just made and are not
        // used; [base, base+cap) stays mapped.
        unsafe {
            if base > start {
                libc::munmap(p, base - start);
            }
            let end = start + len;
            if end > base + cap {
                libc::munmap((base + cap) as *mut libc::c_void, end - (base + cap));
            }
            libc::madvise(base as *mut libc::c_void, cap, libc::MADV_HUGEPAGE);
        }
        Ok(Pool {
            base: base as *mut u8,
            cap,
            ready: 0,
            taken: 0,
        })
    }

    /// Bytes reserved.
    pub fn capacity(&self) -> u64 {
        self.cap as u64
    }

    /// Bytes touched, from the start.
    pub fn ready(&self) -> u64 {
        self.ready as u64
    }

    /// Fill the pool on a thread of its own, in 2 MiB steps, each followed by a rest three
    /// times as long: filling takes at most a quarter of one CPU from the guests running here.
    /// [`Filling::finish`] takes the part touched so far without waiting for that thread.
    ///
    /// (Not at idle priority: a step holds the process's mmap lock, and a thread at
    /// `SCHED_IDLE` on a busy host can be left off the CPU holding it for seconds, stalling
    /// the guest that took the pool.)
    pub fn fill_in_background(self) -> Filling {
        let shared = Arc::new(Shared {
            base: self.base as usize,
            cap: self.cap,
            ready: AtomicUsize::new(self.ready),
            claimed: AtomicUsize::new(self.ready),
            stop: AtomicBool::new(false),
        });
        // The mapping now belongs to `shared`.
        std::mem::forget(self);
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut ready = s.ready.load(Ordering::Acquire);
            while ready < s.cap && !s.stop.load(Ordering::Acquire) {
                let n = HUGE.min(s.cap - ready);
                let t = std::time::Instant::now();
                // SAFETY: [base+ready, base+ready+n) lies in the part of the mapping `s`
                // owns (everything at or above what `finish` claimed, which is at most
                // `ready`); populating faults pages in without changing them (zero).
                let r = unsafe {
                    libc::madvise(
                        (s.base + ready) as *mut libc::c_void,
                        n,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if r != 0 {
                    break;
                }
                ready += n;
                s.ready.store(ready, Ordering::Release);
                std::thread::sleep(t.elapsed() * 3);
            }
        });
        Filling { shared }
    }

    /// Move the touched part, up to `len` bytes, to `dst` (the start of a mapping of at
    /// least `len` bytes this process owns, which it replaces); returns the bytes moved (0 when
    /// nothing was). The pages keep their contents (zero) and stay private anonymous memory.
    ///
    /// # Safety
    /// `dst..dst+len` must be a writable private mapping whose current contents nobody needs
    /// and to which no reference is live.
    pub unsafe fn move_to(&mut self, dst: *mut u8, len: u64) -> u64 {
        let n = (self.ready - self.taken).min(len as usize) / 4096 * 4096;
        if n == 0 {
            return 0;
        }
        // SAFETY: the source lies in the pool's touched, not yet taken part; the caller
        // vouches for the destination range.
        let r = unsafe {
            libc::mremap(
                self.base.add(self.taken) as *mut libc::c_void,
                n,
                n,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            )
        };
        if r == libc::MAP_FAILED {
            return 0;
        }
        self.taken += n;
        n as u64
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.taken < self.cap {
            // SAFETY: the part not moved away is still this pool's own mapping.
            unsafe {
                libc::munmap(
                    self.base.add(self.taken) as *mut libc::c_void,
                    self.cap - self.taken,
                );
            }
        }
    }
}

/// A pool being filled on its own thread.
pub struct Filling {
    shared: Arc<Shared>,
}

/// The mapping while a thread fills it: what `finish` has not claimed is unmapped when both
/// sides are done with it.
struct Shared {
    base: usize,
    cap: usize,
    /// Bytes touched from the start, in whole steps.
    ready: AtomicUsize,
    /// Bytes from the start handed to a [`Pool`] by [`Filling::finish`].
    claimed: AtomicUsize,
    stop: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let claimed = self.claimed.load(Ordering::Acquire);
        if claimed < self.cap {
            // SAFETY: the part nobody claimed is this mapping's alone, and no thread uses it
            // any more (both holders are gone).
            unsafe {
                libc::munmap(
                    (self.base + claimed) as *mut libc::c_void,
                    self.cap - claimed,
                );
            }
        }
    }
}

impl Filling {
    /// Bytes touched so far, from the start.
    pub fn ready(&self) -> u64 {
        self.shared.ready.load(Ordering::Acquire) as u64
    }

    /// Stop filling and return, at once, a pool of the part touched so far (the filling
    /// thread gives the rest back to the system when it next runs).
    pub fn finish(self) -> Pool {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        let ready = s.ready.load(Ordering::Acquire);
        s.claimed.store(ready, Ordering::Release);
        Pool {
            base: s.base as *mut u8,
            cap: ready,
            ready,
            taken: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(p: *const u8, len: usize) -> usize {
        let mut v = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `v` has one byte per page of the range.
        let r = unsafe { libc::mincore(p as *mut libc::c_void, len, v.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v.iter().filter(|b| *b & 1 != 0).count()
    }

    #[test]
    fn a_filled_pool_moves_into_place_touched_and_zero() {
        let pool = Pool::reserve(5 << 20).unwrap();
        assert_eq!(pool.capacity(), 6 << 20);
        assert_eq!(pool.base as usize % HUGE, 0);
        let f = pool.fill_in_background();
        let t = std::time::Instant::now();
        while f.ready() < 6 << 20 {
            assert!(t.elapsed().as_secs() < 20, "the pool never filled");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut pool = f.finish();
        assert_eq!(pool.ready(), 6 << 20);
        // A destination holding stale data: after the move it reads as the pool (zero).
        let len = 8usize << 20;
        // SAFETY: a fresh private mapping of our own for the test.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let at = at as *mut u8;
        // SAFETY: `at` is our fresh mapping of `len` bytes.
        unsafe { std::ptr::write_bytes(at, 0xaa, len) };
        // SAFETY: the whole mapping is ours and nothing refers into it.
        let moved = unsafe { pool.move_to(at, 7 << 20) };
        assert_eq!(moved, 6 << 20, "only what is touched moves");
        // SAFETY: reading our own mapping.
        let s = unsafe { std::slice::from_raw_parts(at, len) };
        assert!(s[..6 << 20].iter().all(|&b| b == 0));
        assert!(
            s[6 << 20..].iter().all(|&b| b == 0xaa),
            "the rest is untouched"
        );
        assert_eq!(resident(at, 6 << 20), (6 << 20) / 4096);
        // Nothing is left to move; dropping the pool leaves the moved pages alone.
        // SAFETY: as above.
        assert_eq!(unsafe { pool.move_to(at, 1 << 20) }, 0);
        drop(pool);
        assert!(s[..6 << 20].iter().all(|&b| b == 0));
        // SAFETY: unmapping the test's own mapping after its last use.
        unsafe { libc::munmap(at as *mut libc::c_void, len) };
    }

    #[test]
    fn filling_stops_when_asked() {
        let pool = Pool::reserve(64 << 20).unwrap();
        let f = pool.fill_in_background();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut pool = f.finish();
        let ready = pool.ready();
        assert!(ready <= 64 << 20);
        assert_eq!(ready % HUGE as u64, 0);
        // What was claimed is touched and moves; nothing past it does.
        // SAFETY: a fresh private mapping of our own for the test.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                128 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        // SAFETY: the mapping is ours and nothing refers into it.
        assert_eq!(unsafe { pool.move_to(at as *mut u8, 128 << 20) }, ready);
        assert_eq!(
            resident(at as *const u8, ready as usize),
            ready as usize / 4096
        );
        // SAFETY: unmapping the test's own mapping.
        unsafe { libc::munmap(at, 128 << 20) };
    }
}
