//! The file window: host file mappings seen by the guest as guest physical memory.
//!
//! A file mapping of the guest (`mmap` of a file, a `memfd`, SysV `shmat`) is made by the VMM
//! at home as the same kind of mapping of the same host file, placed in one large host
//! reservation that is registered once as its own KVM memory slot at [`WINDOW_BASE`]. Guest
//! page tables point into it. The host kernel then gives the guest exactly Linux's semantics:
//! a `MAP_SHARED` page *is* the page-cache page (coherent with `read`/`write`/`ftruncate` and
//! with other processes), a `MAP_PRIVATE` page shows the file until the guest first writes it
//! (copy-on-write), `MADV_DONTNEED` on a private page brings the file's bytes back.
//!
//! Sub-ranges are handed out first-fit and given back when the guest unmaps them (the host
//! range is covered again by an inaccessible placeholder, so KVM's MMU notifier drops every
//! translation of it). No KVM memory slot is added or removed per mapping: removing a slot
//! makes KVM drop every shadow page of the VM.
//!
//! The VMM reads and writes window pages only with `process_vm_readv`/`process_vm_writev` on
//! itself: a page past the end of a truncated file then gives EFAULT instead of SIGBUS.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

/// Guest physical address of the window (1 TiB: far above any `--mem`).
pub const WINDOW_BASE: u64 = 1 << 40;
/// Bytes of guest physical address space the window spans.
pub const WINDOW_SIZE: u64 = 1 << 37;
/// First KVM memory slot of the window (the RAM slots count up from 0). The window is
/// registered in pieces as it is used, each as large as all before it (64 MiB first): a KVM
/// slot's cost (time and the host memory for its page maps) grows with its size.
pub const WINDOW_SLOT: u32 = 400;
const FIRST_PIECE: u64 = 64 << 20;
/// Most ranges in use at once. Each is a host mapping of the VMM's process, and the host
/// limits a process's mappings (`vm.max_map_count`, 65530 by default): the VMM keeps well
/// below it for its own. Beyond it a mapping is refused (ENOMEM; a private file mapping then
/// becomes a private copy).
pub const MAX_RANGES: usize = 16384;

/// What kind of host mapping a window range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `MAP_SHARED` of a file or memfd.
    Shared,
    /// `MAP_PRIVATE` of a file (copy-on-write).
    Private,
    /// A SysV shared memory segment attached with `shmat` (host address = segment).
    SysV,
}

/// The host reservation and which parts of it are in use.
pub struct Window {
    /// Declared first: the VM lets go of the window's slots before the reservation goes.
    vm: Option<std::sync::Arc<kvm_ioctls::VmFd>>,
    /// Bytes from the window's start covered by KVM slots.
    registered: u64,
    host: *mut u8,
    /// Free ranges: offset -> length.
    free: BTreeMap<u64, u64>,
    /// Ranges in use: offset -> (length, sharing).
    used: BTreeMap<u64, (u64, Sharing)>,
}

// SAFETY: `host` is a reservation owned by the window for its whole life; all access goes
// through `&self`/`&mut self`.
unsafe impl Send for Window {}

fn errno() -> i64 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL) as i64
}

impl Window {
    /// Reserve the host address space (nothing is committed).
    pub fn new() -> Result<Window, i64> {
        // SAFETY: a fresh anonymous reservation; nothing else refers to the range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                WINDOW_SIZE as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(libc::ENOMEM as i64);
        }
        Ok(Window {
            vm: None,
            registered: 0,
            host: p as *mut u8,
            free: BTreeMap::from([(0, WINDOW_SIZE)]),
            used: BTreeMap::new(),
        })
    }

    /// Register the window with `vm`: what is in use now, and later pieces as they are
    /// needed. Errors: the KVM ioctl's.
    pub fn attach(&mut self, vm: std::sync::Arc<kvm_ioctls::VmFd>) -> Result<(), i64> {
        let upto = self.registered;
        self.registered = 0;
        self.vm = Some(vm);
        self.cover(upto)
    }

    /// Make sure KVM slots cover the window up to `end` bytes.
    fn cover(&mut self, end: u64) -> Result<(), i64> {
        while self.registered < end {
            let size = self
                .registered
                .max(FIRST_PIECE)
                .min(WINDOW_SIZE - self.registered);
            let piece = (self.registered.max(FIRST_PIECE / 2) / (FIRST_PIECE / 2)).ilog2();
            if let Some(vm) = &self.vm {
                let region = kvm_bindings::kvm_userspace_memory_region {
                    slot: WINDOW_SLOT + piece,
                    flags: 0,
                    guest_phys_addr: WINDOW_BASE + self.registered,
                    memory_size: size,
                    userspace_addr: self.host as u64 + self.registered,
                };
                // SAFETY: the range lies inside the reservation this window owns, which lives
                // until after the VM has let go of it (field order above); what is mapped in
                // it changes under KVM's MMU notifier, as for any host memory.
                unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.errno() as i64)?;
            }
            self.registered += size;
        }
        Ok(())
    }

    /// Whether a guest physical address lies in the window.
    pub fn contains(gpa: u64) -> bool {
        (WINDOW_BASE..WINDOW_BASE + WINDOW_SIZE).contains(&gpa)
    }

    fn take(&mut self, len: u64) -> Option<u64> {
        if self.used.len() >= MAX_RANGES {
            return None;
        }
        let (&off, &n) = self.free.iter().find(|(_, n)| **n >= len)?;
        if self.cover(off + len).is_err() {
            return None;
        }
        self.free.remove(&off);
        if n > len {
            self.free.insert(off + len, n - len);
        }
        Some(off)
    }

    fn give_back(&mut self, mut off: u64, mut len: u64) {
        if let Some((&s, &n)) = self.free.range(..off).next_back() {
            if s + n == off {
                self.free.remove(&s);
                off = s;
                len += n;
            }
        }
        if let Some(n) = self.free.remove(&(off + len)) {
            len += n;
        }
        self.free.insert(off, len);
    }

    fn at(&self, off: u64) -> *mut libc::c_void {
        // SAFETY: callers pass offsets below WINDOW_SIZE (ranges from `take`), so the
        // result stays inside the reservation.
        unsafe { self.host.add(off as usize) as *mut libc::c_void }
    }

    /// Cover `[off, off+len)` with the inaccessible placeholder again.
    fn placeholder(&self, off: u64, len: u64) {
        // SAFETY: the range lies inside the reservation this window owns; MAP_FIXED replaces
        // only our own mapping there, which no Rust reference points into.
        unsafe {
            libc::mmap(
                self.at(off),
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            );
        }
    }

    /// Map `len` bytes (page multiple) of host file `fd` from `off` into the window, with
    /// host protection `prot` (`PROT_READ`/`PROT_WRITE`). Returns the guest physical address.
    /// Errors are the host `mmap`'s errno (EACCES for a writable shared mapping of a file
    /// not open for writing, ENODEV for a file that cannot be mapped, ...), or ENOMEM when
    /// the window is full.
    pub fn map_file(
        &mut self,
        len: u64,
        fd: RawFd,
        off: u64,
        sharing: Sharing,
        prot: i32,
    ) -> Result<u64, i64> {
        let w = self.take(len).ok_or(libc::ENOMEM as i64)?;
        let flags = match sharing {
            Sharing::Private => libc::MAP_PRIVATE,
            _ => libc::MAP_SHARED,
        };
        // SAFETY: MAP_FIXED into a free part of our reservation (nothing refers to it); the
        // host kernel checks `fd`, `off` and `prot` and returns an error for bad ones.
        let p = unsafe {
            libc::mmap(
                self.at(w),
                len as usize,
                prot,
                flags | libc::MAP_FIXED,
                fd,
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = errno();
            self.placeholder(w, len);
            self.give_back(w, len);
            return Err(e);
        }
        self.used.insert(w, (len, sharing));
        Ok(WINDOW_BASE + w)
    }

    /// Attach SysV segment `id` (host `shmat` with `SHM_REMAP`) at a free window range of
    /// `len` bytes. Returns the guest physical address.
    pub fn attach_shm(&mut self, id: i32, len: u64, readonly: bool) -> Result<u64, i64> {
        let w = self.take(len).ok_or(libc::ENOMEM as i64)?;
        let flags = libc::SHM_REMAP | if readonly { libc::SHM_RDONLY } else { 0 };
        // SAFETY: attaching over a free part of our own reservation (SHM_REMAP replaces the
        // placeholder); the kernel checks the id and the caller's permissions.
        let p = unsafe { libc::shmat(id, self.at(w), flags) };
        if p as isize == -1 {
            let e = errno();
            self.give_back(w, len);
            return Err(e);
        }
        self.used.insert(w, (len, Sharing::SysV));
        Ok(WINDOW_BASE + w)
    }

    /// The host address of window memory at guest physical `gpa`, for host calls that take
    /// an address in a shared mapping (a futex there is the same futex for every process
    /// mapping the file). The host kernel checks the address when it uses it.
    pub fn host_addr(&self, gpa: u64) -> Option<u64> {
        Self::contains(gpa).then(|| self.at(gpa - WINDOW_BASE) as u64)
    }

    /// What the range starting at guest physical `gpa` holds.
    fn sharing(&self, gpa: u64) -> Option<Sharing> {
        let off = gpa.checked_sub(WINDOW_BASE)?;
        let (s, (n, k)) = self.used.range(..=off).next_back()?;
        (off < s + n).then_some(*k)
    }

    /// Give back `[gpa, gpa+len)` (page aligned, part of what was mapped): the host mapping
    /// goes (a SysV attachment is detached), the placeholder comes back.
    pub fn release(&mut self, gpa: u64, len: u64) {
        let Some(off) = gpa.checked_sub(WINDOW_BASE) else {
            return;
        };
        let hit: Vec<(u64, u64, Sharing)> = self
            .used
            .range(..off + len)
            .rev()
            .take_while(|(s, (n, _))| *s + *n > off)
            .map(|(s, (n, k))| (*s, *n, *k))
            .collect();
        for (s, n, k) in hit {
            self.used.remove(&s);
            let (lo, hi) = (s.max(off), (s + n).min(off + len));
            // Replacing a SysV attachment's pages detaches them (the host's shm_nattch
            // counts mappings, as for a process that munmaps part of a segment).
            self.placeholder(lo, hi - lo);
            self.give_back(lo, hi - lo);
            if s < lo {
                self.used.insert(s, (lo - s, k));
            }
            if hi < s + n {
                self.used.insert(hi, (s + n - hi, k));
            }
        }
    }

    /// The range in use that holds guest physical `gpa`: (its start, its length).
    pub fn extent(&self, gpa: u64) -> Option<(u64, u64)> {
        let off = gpa.checked_sub(WINDOW_BASE)?;
        let (s, (n, _)) = self.used.range(..=off).next_back()?;
        (off < s + n).then_some((WINDOW_BASE + s, *n))
    }

    /// Host `mprotect` of a window range (the guest's `mprotect` of a shared mapping: EACCES
    /// when write is asked of a file not open for writing).
    pub fn protect(&self, gpa: u64, len: u64, prot: i32) -> Result<(), i64> {
        let off = gpa - WINDOW_BASE;
        // SAFETY: changes protection of a range of our own reservation only.
        if unsafe { libc::mprotect(self.at(off), len as usize, prot) } != 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Host `madvise` of a window range (MADV_DONTNEED on a private file mapping brings the
    /// file's bytes back).
    pub fn advise(&self, gpa: u64, len: u64, advice: i32) -> Result<(), i64> {
        let off = gpa - WINDOW_BASE;
        // SAFETY: advice on a range of our own reservation; no Rust reference points into it.
        if unsafe { libc::madvise(self.at(off), len as usize, advice) } != 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Host `msync` of a window range.
    pub fn sync(&self, gpa: u64, len: u64, flags: i32) -> Result<(), i64> {
        let off = gpa - WINDOW_BASE;
        // SAFETY: msync of a range of our own reservation.
        if unsafe { libc::msync(self.at(off), len as usize, flags) } != 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Move `[gpa, gpa+old_len)` to a new range of `new_len` bytes with host `mremap` (a
    /// private mapping keeps its written pages, the grown tail shows the file). Returns the
    /// new guest physical address.
    pub fn grow(&mut self, gpa: u64, old_len: u64, new_len: u64) -> Result<u64, i64> {
        let off = gpa - WINDOW_BASE;
        let kind = self.sharing(gpa).ok_or(libc::EFAULT as i64)?;
        if kind == Sharing::SysV {
            return Err(libc::EINVAL as i64);
        }
        let w = self.take(new_len).ok_or(libc::ENOMEM as i64)?;
        // SAFETY: moves our own mapping at `off` onto a free part of our reservation
        // (MREMAP_FIXED replaces the placeholder there); nothing refers to either range.
        let p = unsafe {
            libc::mremap(
                self.at(off),
                old_len as usize,
                new_len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                self.at(w),
            )
        };
        if p == libc::MAP_FAILED {
            let e = errno();
            self.give_back(w, new_len);
            return Err(e);
        }
        self.used.insert(w, (new_len, kind));
        // The old range is now a hole in the reservation: placeholder and free list again.
        self.release(gpa, old_len);
        Ok(WINDOW_BASE + w)
    }

    /// Copy window memory at guest physical `gpa` into `buf`: false if a page is beyond the
    /// end of its file or not mapped (the caller reports EFAULT).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: self.at(gpa - WINDOW_BASE),
            iov_len: buf.len(),
        };
        // SAFETY: both iovecs describe memory of this process; the kernel copies with fault
        // handling (EFAULT, never SIGBUS) and writes only into `buf`.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == buf.len() as isize
    }

    /// Copy `buf` into window memory at guest physical `gpa`: false on a fault.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        let local = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: self.at(gpa - WINDOW_BASE),
            iov_len: buf.len(),
        };
        // SAFETY: both iovecs describe memory of this process; the kernel reads only `buf`
        // and writes only the window range, with fault handling.
        let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == buf.len() as isize
    }

    /// Whether any range is in use.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // The VM (the last reference to it is usually this one) lets go of the slots first.
        drop(self.vm.take());
        // SAFETY: the reservation is ours and nothing refers to it once the window (and the
        // VM, dropped before guest memory) is gone; unmapping it also detaches SysV segments.
        unsafe { libc::munmap(self.host as *mut libc::c_void, WINDOW_SIZE as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn shared_window_is_the_file_and_faults_past_its_end() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[b'a'; 8192]).unwrap();
        let mut w = Window::new().unwrap();
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let g = w
            .map_file(8192, f.as_raw_fd(), 0, Sharing::Shared, prot)
            .unwrap();
        assert!(w.write(g + 10, b"hello"));
        let mut b = [0u8; 5];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut b, 10).unwrap();
        assert_eq!(&b, b"hello", "a store through the window is the file");
        f.set_len(4096).unwrap();
        let mut c = [0u8; 4];
        assert!(
            !w.read(g + 5000, &mut c),
            "past the end is a fault, not SIGBUS"
        );
        w.release(g, 8192);
        assert!(w.is_empty());
        assert!(!w.read(g, &mut c), "a released range is inaccessible");
        let g2 = w
            .map_file(4096, f.as_raw_fd(), 0, Sharing::Private, prot)
            .unwrap();
        assert_eq!(g2, g, "first fit reuses the range");
        assert!(w.write(g2 + 10, b"PRIV!"));
        f.read_exact_at(&mut b, 10).unwrap();
        assert_eq!(&b, b"hello", "a private store stays private");
        w.advise(g2, 4096, libc::MADV_DONTNEED).unwrap();
        assert!(w.read(g2 + 10, &mut b));
        assert_eq!(&b, b"hello", "DONTNEED brings the file back");
    }
}
