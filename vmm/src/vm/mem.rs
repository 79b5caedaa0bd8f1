//! The memory family of the guest's system calls, run in the VMM: mmap (anonymous, and
//! files through the file window at home), madvise, msync's ranges, SysV shmat/shmdt, and
//! the calls that make the process go home first (paper section 4.2).

use super::{Step, Vm, EFAULT, EINVAL, ENODEV, ENOMEM, ERESTART};
use crate::deputy::Slot;
use crate::memory::{page_up, PAGE};
use crate::mm::VmaKind;
use crate::window::Sharing;
use std::time::Instant;

const EOPNOTSUPP: i64 = libc::EOPNOTSUPP as i64;
const EACCES: i64 = libc::EACCES as i64;

impl Vm {
    /// madvise(2): an unaligned start, an unknown advice or a wrapping range is EINVAL; the
    /// advice applies to the mapped parts and a range with holes is then ENOMEM. MADV_FREE is
    /// for private anonymous memory only, MADV_REMOVE for shared mappings only (EINVAL).
    pub(super) fn madvise(&mut self, addr: u64, len: u64, advice: i32) -> Result<Step, i64> {
        let known = (0..=25).contains(&advice) && !(5..=7).contains(&advice);
        let end = addr.checked_add(page_up(len)).filter(|e| *e >= addr);
        let Some(end) = end.filter(|_| known && addr & (PAGE - 1) == 0) else {
            return Err(EINVAL);
        };
        if end == addr {
            return Ok(Step::Ret(0));
        }
        let parts: Vec<(u64, u64, VmaKind, Option<u64>)> = self
            .space
            .vmas()
            .filter(|(s, v)| *s < end && v.end > addr)
            .map(|(s, v)| {
                let lo = s.max(addr);
                (lo, v.end.min(end), v.kind, v.window_at(s, lo))
            })
            .collect();
        for &(_, _, kind, _) in &parts {
            let shared = matches!(kind, VmaKind::Shared | VmaKind::Shm);
            match advice {
                // Linux: EINVAL without a file, EACCES for a private file mapping.
                libc::MADV_REMOVE if kind == VmaKind::File => return Err(EACCES),
                libc::MADV_REMOVE if !shared => return Err(EINVAL),
                libc::MADV_FREE if kind != VmaKind::Anon && kind != VmaKind::Heap => {
                    return Err(EINVAL)
                }
                // (Linux's time page is a VM_IO mapping: fork advice on it is EINVAL.)
                libc::MADV_DONTFORK | libc::MADV_DOFORK if kind == VmaKind::Vvar => {
                    return Err(EINVAL)
                }
                _ => {}
            }
        }
        for &(s, e, _, window) in &parts {
            match (advice, window) {
                (libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE, Some(w)) => {
                    // The host mapping does what Linux does: a private file page shows the
                    // file again, a shared one stays the file's (MADV_REMOVE punches a hole).
                    let win = self.space.mem.window()?;
                    let a = if advice == libc::MADV_FREE {
                        libc::MADV_DONTNEED
                    } else {
                        advice
                    };
                    win.advise(w, e - s, a)?;
                }
                (libc::MADV_DONTNEED | libc::MADV_FREE, None) => self.space.discard(s, e - s)?,
                _ => {}
            }
        }
        if !self.space.covered(addr, end) {
            return Err(ENOMEM);
        }
        Ok(Step::Ret(0))
    }

    /// ENOMEM unless all of `[addr, addr+len)` is mapped; EINVAL when it wraps.
    pub(super) fn range_mapped(&self, addr: u64, len: u64) -> Result<(), i64> {
        let end = addr.checked_add(page_up(len)).ok_or(EINVAL)?;
        if len != 0 && !self.space.covered(addr, end) {
            return Err(ENOMEM);
        }
        Ok(())
    }

    pub(super) fn mmap(&mut self, a: [u64; 6]) -> Result<u64, i64> {
        let (addr, len, prot, flags, fd, off) =
            (a[0], a[1], a[2] as u32 & 7, a[3] as i32, a[4] as i32, a[5]);
        let anon = flags & libc::MAP_ANONYMOUS != 0;
        // mmap(2): the mapping type is MAP_SHARED, MAP_PRIVATE or MAP_SHARED_VALIDATE (which
        // refuses flags it does not know, and MAP_SYNC outside DAX files, with EOPNOTSUPP).
        let shared = match flags & 0x0f {
            libc::MAP_PRIVATE => false,
            libc::MAP_SHARED => true,
            libc::MAP_SHARED_VALIDATE => {
                let known = 0x0f
                    | libc::MAP_FIXED
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_32BIT
                    | libc::MAP_GROWSDOWN
                    | libc::MAP_DENYWRITE
                    | libc::MAP_EXECUTABLE
                    | libc::MAP_LOCKED
                    | libc::MAP_NORESERVE
                    | libc::MAP_POPULATE
                    | libc::MAP_NONBLOCK
                    | libc::MAP_STACK
                    | libc::MAP_HUGETLB
                    | libc::MAP_FIXED_NOREPLACE
                    | (0x3f << 26);
                if flags & !known != 0 {
                    return Err(EOPNOTSUPP);
                }
                true
            }
            _ => return Err(EINVAL),
        };
        if off & (PAGE - 1) != 0 || len == 0 {
            return Err(EINVAL);
        }
        if flags & libc::MAP_GROWSDOWN != 0 && !anon {
            // Only anonymous memory grows down (a file mapping with it is EINVAL).
            return Err(EINVAL);
        }
        if flags & libc::MAP_HUGETLB != 0 {
            // No huge pages are set aside for guests (as on a host with vm.nr_hugepages = 0).
            return Err(ENOMEM);
        }
        // MAP_32BIT (without a fixed address): the first free range from 1 GiB below 2 GiB.
        let addr = if flags & libc::MAP_32BIT != 0
            && flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) == 0
        {
            self.space
                .find_free_in(page_up(len), 0x4000_0000, 0x8000_0000)
                .ok_or(ENOMEM)?
        } else {
            addr
        };
        let fixed = flags & libc::MAP_FIXED != 0;
        let noreplace = flags & libc::MAP_FIXED_NOREPLACE != 0;
        let kind = if anon { VmaKind::Anon } else { VmaKind::File };
        if !anon {
            // Check the descriptor before changing the address space.
            let r = self.call_deputy(
                libc::SYS_fstat,
                [fd as u64, 0, 0, 0, 0, 0],
                vec![Slot::Out(144)],
            );
            if r.ret < 0 {
                return Err(-r.ret);
            }
            let stat = r.outs.into_iter().next();
            let local = self.deputy.local_fd(fd as u64);
            let file = map_file_info(local, off, stat.as_deref());
            if let Some(host) = local {
                match self.mmap_file(
                    addr,
                    len,
                    prot,
                    shared,
                    fixed,
                    noreplace,
                    host,
                    off,
                    file.clone(),
                ) {
                    // The file window is full: a private mapping can still be a private copy.
                    Err(ENOMEM) if !shared => {}
                    r => return r,
                }
            }
            if shared {
                // Away from home the file is not here to share pages with: the call waits
                // until the process is home again (paper section 4.2).
                self.wait_for_home("a shared file mapping")?;
            }
            let start = self.space.pick(addr, len, fixed, noreplace)?;
            self.space
                .insert_file(start, page_up(len), prot, kind, file)?;
            self.read_file_into(start, len, prot, fd, off)?;
            return Ok(start);
        }
        if shared {
            return self.mmap_shared_anon(addr, len, prot, fixed, noreplace);
        }
        self.space.mmap(addr, len, prot, fixed, noreplace, kind)
    }

    /// MAP_SHARED|MAP_ANONYMOUS: memory a process shares with the children it forks, so it
    /// lives in the file window as a host shared mapping of an unnamed file (as Linux backs it
    /// with one on its shmem filesystem, "/dev/zero (deleted)"). Made at home only, like any
    /// shared mapping (paper section 4.2).
    fn mmap_shared_anon(
        &mut self,
        addr: u64,
        len: u64,
        prot: u32,
        fixed: bool,
        noreplace: bool,
    ) -> Result<u64, i64> {
        if !self.deputy.is_local() {
            self.wait_for_home("a shared anonymous mapping")?;
        }
        let size = page_up(len);
        // SAFETY: memfd_create with a constant name and flags has no memory effects.
        let fd = unsafe { libc::memfd_create(c"dev/zero".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(last_errno());
        }
        let mut st = [0u8; 144];
        // SAFETY: `fd` is ours; `st` is a writable stat buffer of its size.
        let ok = unsafe {
            libc::ftruncate(fd, size as libc::off_t) == 0
                && libc::fstat(fd, st.as_mut_ptr().cast()) == 0
        };
        let r = if ok {
            let mut file = map_file_info(None, 0, Some(&st));
            file.path = "/dev/zero (deleted)".into();
            self.mmap_file(addr, len, prot, true, fixed, noreplace, fd, 0, file)
        } else {
            Err(last_errno())
        };
        // SAFETY: the mapping keeps the file; our descriptor is not needed any more.
        unsafe { libc::close(fd) };
        r
    }

    /// Fill a new private file mapping with the file's bytes through the deputy (away from
    /// home, or when the file window is full); past the file's end pages stay zero.
    fn read_file_into(
        &mut self,
        start: u64,
        len: u64,
        prot: u32,
        fd: i32,
        off: u64,
    ) -> Result<(), i64> {
        if prot == 0 {
            return Ok(());
        }
        let runs = self
            .space
            .mem
            .host_runs_for_write(start, page_up(len) as usize)
            .map_err(|_| EFAULT)?;
        let mut done = 0u64;
        for (ptr, n) in runs {
            // SAFETY: `ptr..ptr+n` is guest memory backing the new mapping (just created,
            // so nothing else refers to it), and the vCPU is stopped in this exit.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
            let mut got = 0usize;
            while got < n {
                let r = self
                    .deputy
                    .pread_into(fd as u64, off + done + got as u64, &mut dst[got..]);
                if r < 0 {
                    let _ = self.space.munmap(start, len);
                    return Err(-r);
                }
                if r == 0 {
                    break;
                }
                got += r as usize;
            }
            done += got as u64;
            if got < n {
                break;
            }
        }
        Ok(())
    }

    /// A file mapping at home: the VMM maps host descriptor `host` the same way into the file
    /// window (see [`crate::window`]), so the guest shares the host's page cache exactly as a
    /// native process would. The host's mmap checks access modes (EACCES) and file types
    /// (ENODEV).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mmap_file(
        &mut self,
        addr: u64,
        len: u64,
        prot: u32,
        shared: bool,
        fixed: bool,
        noreplace: bool,
        host: i32,
        off: u64,
        file: crate::mm::MapFile,
    ) -> Result<u64, i64> {
        let start = self.space.pick(addr, len, fixed, noreplace)?;
        let len = page_up(len);
        let (sharing, host_prot, kind) = if shared {
            (Sharing::Shared, (prot & 3) as i32, VmaKind::Shared)
        } else {
            // Private pages are copy-on-write on the host: writable there whatever the guest
            // may do now, the guest's own page tables enforce its protection.
            (
                Sharing::Private,
                libc::PROT_READ | libc::PROT_WRITE,
                VmaKind::File,
            )
        };
        let gpa = self
            .space
            .mem
            .window()?
            .map_file(len, host, off, sharing, host_prot)?;
        if let Err(e) = self
            .space
            .insert_window(start, len, prot, kind, gpa, Some(file))
        {
            if let Ok(w) = self.space.mem.window() {
                w.release(gpa, len);
            }
            return Err(e);
        }
        Ok(start)
    }

    /// A call that can only run at home, made away from home: ask to be brought home and
    /// have the guest issue the call again (ERESTART) until it is. ENODEV if the process
    /// cannot get home (nothing to ask, or no move home within `HOME_WAIT`).
    pub(super) fn wait_for_home(&mut self, what: &str) -> Result<(), i64> {
        const HOME_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        match self.home_wait {
            None => {
                if !self.deputy.request_home() {
                    return Err(ENODEV);
                }
                if self.opts.trace {
                    eprintln!("[mosvm] {what} needs home: moving the process home first");
                }
                self.home_wait = Some(Instant::now());
            }
            Some(t) if t.elapsed() > HOME_WAIT => {
                self.home_wait = None;
                crate::say!(
                    "mosvm: {}: {what} is made at home only, and the process could not get home",
                    self.program.display()
                );
                return Err(ENODEV);
            }
            Some(_) => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        Err(ERESTART)
    }

    /// shmat(2): attach SysV segment `id` at home, through the file window (the segment's
    /// pages are the host's, shared with every process attached to it). Linux's checks: an
    /// unaligned `addr` without SHM_RND is EINVAL, so is one over a mapping without
    /// SHM_REMAP; the host checks the id and the permissions (EINVAL, EIDRM, EACCES).
    /// Away from home the call waits until the process is home (`wait_for_home`).
    pub(super) fn shmat(&mut self, id: i32, addr: u64, flags: i32) -> Result<u64, i64> {
        const SHMLBA: u64 = PAGE;
        if !self.deputy.is_local() {
            self.wait_for_home("SysV shared memory")?;
        }
        let mut ds: libc::shmid_ds = zeroed_shmid_ds();
        // SAFETY: IPC_STAT writes one `struct shmid_ds` into `ds`.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(last_errno());
        }
        let len = page_up(ds.shm_segsz as u64);
        let addr = if flags & libc::SHM_RND != 0 {
            addr & !(SHMLBA - 1)
        } else if addr & (SHMLBA - 1) != 0 {
            return Err(EINVAL);
        } else {
            addr
        };
        let start = if addr == 0 {
            if flags & libc::SHM_REMAP != 0 {
                // Nothing to replace without an address (Linux: EINVAL).
                return Err(EINVAL);
            }
            self.space.pick(0, len, false, false)?
        } else {
            if flags & libc::SHM_REMAP == 0 && self.space.overlaps(addr, addr.saturating_add(len)) {
                return Err(EINVAL);
            }
            self.space
                .pick(addr, len, true, false)
                .map_err(|_| EINVAL)?
        };
        let readonly = flags & libc::SHM_RDONLY != 0;
        let prot = if readonly { 1 } else { 3 } | if flags & libc::SHM_EXEC != 0 { 4 } else { 0 };
        let gpa = self.space.mem.window()?.attach_shm(id, len, readonly)?;
        let file = crate::mm::MapFile {
            path: format!("/SYSV{:08x} (deleted)", ds.shm_perm.__key as u32),
            off: 0,
            dev: 0,
            ino: id as u64,
            writable: !readonly,
        };
        if let Err(e) = self
            .space
            .insert_window(start, len, prot, VmaKind::Shm, gpa, Some(file))
        {
            if let Ok(w) = self.space.mem.window() {
                w.release(gpa, len);
            }
            return Err(e);
        }
        Ok(start)
    }

    /// shmdt(2): `addr` must be where a segment was attached (EINVAL otherwise); every part
    /// of that attachment goes.
    pub(super) fn shmdt(&mut self, addr: u64) -> Result<(), i64> {
        let (start, v) = self.space.vma_at(addr).ok_or(EINVAL)?;
        if start != addr || v.kind != VmaKind::Shm {
            return Err(EINVAL);
        }
        let gpa = v.window_at(start, addr).ok_or(EINVAL)?;
        let (w0, n) = self
            .space
            .mem
            .window_ref()
            .and_then(|w| w.extent(gpa))
            .ok_or(EINVAL)?;
        let end = addr + (w0 + n - gpa);
        self.space.munmap(addr, end - addr)
    }
}

/// A zeroed `shmid_ds` for IPC_STAT to fill.
fn zeroed_shmid_ds() -> libc::shmid_ds {
    // SAFETY: shmid_ds is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

/// The calling thread's errno.
pub(super) fn last_errno() -> i64 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO) as i64
}

/// What `/proc/PID/maps` shows for a file mapping: the path (at home, through the host
/// descriptor), the offset, and the device and inode from the fstat reply (`stat`).
fn map_file_info(host: Option<i32>, off: u64, stat: Option<&[u8]>) -> crate::mm::MapFile {
    let field = |at: usize| {
        stat.and_then(|b| b.get(at..at + 8))
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8")))
    };
    let path = host
        .and_then(|h| std::fs::read_link(format!("/proc/self/fd/{h}")).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    // SAFETY: F_GETFL has no memory arguments.
    let mode = host.map(|h| unsafe { libc::fcntl(h, libc::F_GETFL) });
    crate::mm::MapFile {
        path,
        off,
        dev: field(0),
        ino: field(8),
        writable: mode.is_none_or(|m| m < 0 || m & libc::O_ACCMODE != libc::O_RDONLY),
    }
}
