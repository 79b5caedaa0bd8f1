//! The guest's address space: Linux-like virtual memory areas (VMAs), placement of new mappings
//! (top-down below `mmap_base`, as Linux does without randomisation), the program break, and
//! mmap/munmap/mprotect/mremap/madvise of anonymous memory and of file-window areas (file
//! mappings at home, see `window`).
//!
//! Pages of an accessible anonymous VMA of at most [`EAGER_MAX`] are mapped eagerly (their
//! host memory is still only allocated when touched); larger anonymous areas, file-window
//! pages and the stack below its top are mapped on first touch, so untouched memory (thread
//! stacks, reservations) does not count against the guest's memory. The page tables carry each VMA's protection, so the guest's own accesses are checked
//! as on Linux (see `memory` for how rights are taken away safely).

use crate::memory::{page_down, page_up, Access, GuestMem, NoMem, PAGE};
use std::collections::BTreeMap;

/// Lowest address a mapping is placed at: the host's `vm.mmap_min_addr`, but at least 64 KiB
/// (the floor Linux's security modules keep, `CONFIG_LSM_MMAP_MIN_ADDR`). Below it a hint is
/// not taken and MAP_FIXED is EPERM, unless the process may (CAP_SYS_RAWIO: root here).
pub fn mmap_min() -> u64 {
    static MIN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(0x10000, |v| page_up(v.max(0x10000)))
    })
}

/// Top of the user stack (as Linux's TASK_SIZE on x86-64 with 4-level paging).
pub const STACK_TOP: u64 = 0x7fff_ffff_f000;
/// Anonymous mappings larger than this (thread stacks, big arrays, reservations) get their
/// pages when first touched, as on Linux, so that untouched memory does not count against
/// `--mem`; smaller ones are mapped at once (a fault costs a VM exit).
pub const EAGER_MAX: u64 = 1 << 20;

/// Linux's default RLIMIT_STACK (the stack area grows down on faults beneath it up to the
/// limit: [`AddressSpace::fault_in`]).
pub const STACK_SIZE: u64 = 8 << 20;
/// Linux's `stack_guard_gap` (256 pages): a stack never grows closer than this to the area
/// below it.
pub const STACK_GUARD_GAP: u64 = 256 * PAGE;
/// Bytes at the top of the stack mapped up front.
pub const STACK_EAGER: u64 = 128 << 10;
/// Top-down placement starts here (below the stack and its guard gap) under the default
/// RLIMIT_STACK; see [`mmap_base`].
pub const MMAP_BASE: u64 = 0x7fff_f7ff_f000;

/// Where top-down placement starts for a program started with RLIMIT_STACK `stack_rlimit`
/// (bytes): below the stack's room, at least 128 MiB and at most 5/6 of the address space
/// (Linux's `mmap_base()`, arch/x86/mm/mmap.c, without randomisation; an unlimited stack takes
/// the most room instead of Linux's bottom-up legacy layout).
pub fn mmap_base(stack_rlimit: u64) -> u64 {
    let gap = page_up(stack_rlimit.min(USER_END).saturating_add(STACK_GUARD_GAP))
        .clamp(128 << 20, USER_END / 6 * 5);
    page_down(STACK_TOP - gap)
}
/// Base for position-independent executables (Linux's ELF_ET_DYN_BASE without randomisation).
pub const PIE_BASE: u64 = 0x5555_5555_4000;
/// Highest user address + 1.
pub const USER_END: u64 = 0x7fff_ffff_f000;

/// Most areas a process may have (Linux's default `vm.max_map_count`): mmap beyond it is
/// ENOMEM.
pub const MAX_MAP_COUNT: usize = 65530;

/// Linux errno values used here.
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const ENOMEM: i64 = 12;
    pub const EACCES: i64 = 13;
    pub const EINVAL: i64 = 22;
    pub const EEXIST: i64 = 17;
    pub const EFAULT: i64 = 14;
}

/// One virtual memory area.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Vma {
    /// End (exclusive).
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    /// What the area is.
    pub kind: VmaKind,
    /// For a file mapping made at home: the guest physical address, in the file window
    /// ([`crate::window`]), of the area's first page; its pages follow in order.
    pub window: Option<u64>,
    /// For a file mapping: the file, and its offset at the area's first page.
    pub file: Option<Box<MapFile>>,
}

/// The file behind a file mapping, as `/proc/PID/maps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFile {
    /// Path at mapping time (`/proc/self/fd/N` at home).
    pub path: String,
    /// Offset in bytes of the area's first page.
    pub off: u64,
    /// Device (`st_dev`) and inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// The descriptor it was mapped from was open for writing (a shared mapping of it can be
    /// made writable with mprotect).
    #[serde(default)]
    pub writable: bool,
}

impl Vma {
    /// An anonymous-style area (no file, no window).
    pub fn new(end: u64, prot: u32, kind: VmaKind) -> Vma {
        Vma {
            end,
            prot,
            kind,
            window: None,
            file: None,
        }
    }

    /// The part of this area (which starts at `start`) from `at` to `end`.
    fn tail(&self, start: u64, at: u64, end: u64) -> Vma {
        let d = at - start;
        Vma {
            end,
            prot: self.prot,
            kind: self.kind,
            window: self.window.map(|w| w + d),
            file: self.file.as_ref().map(|f| {
                Box::new(MapFile {
                    off: f.off + d,
                    ..(**f).clone()
                })
            }),
        }
    }

    /// Guest physical address of `va` in the file window, for an area starting at `start`.
    pub fn window_at(&self, start: u64, va: u64) -> Option<u64> {
        self.window.map(|w| w + (va - start))
    }
}

/// The origin of a VMA (for `ps`/maps-style reporting and brk bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmaKind {
    /// An ELF segment.
    Image,
    /// The program break area.
    Heap,
    /// The main stack.
    Stack,
    /// An anonymous mmap.
    Anon,
    /// A private file mapping (`MAP_PRIVATE` of a file).
    File,
    /// A shared file mapping (`MAP_SHARED` of a file or memfd).
    Shared,
    /// A SysV shared memory segment (`shmat`).
    Shm,
    /// The time page the vDSO reads (`[vvar]`): the frame behind it is the VMM's
    /// ([`guest::VVAR_KVA`]); the guest may read it, not write, move or discard it.
    Vvar,
    /// The vDSO image (`[vdso]`).
    Vdso,
}

/// The whole address space: VMAs plus the memory and page tables behind them.
pub struct AddressSpace {
    /// Guest memory and page tables.
    pub mem: GuestMem,
    vmas: BTreeMap<u64, Vma>,
    /// Start of the program break area.
    pub brk_start: u64,
    /// Current program break.
    pub brk: u64,
    /// Where top-down placement starts (fixed at exec: [`mmap_base`]).
    pub mmap_base: u64,
    /// The guest's RLIMIT_STACK soft limit (bytes): how far the stack may grow.
    pub stack_rlimit: u64,
}

impl AddressSpace {
    /// An empty address space over `mem`.
    pub fn new(mem: GuestMem) -> Self {
        AddressSpace {
            mem,
            vmas: BTreeMap::new(),
            brk_start: 0,
            brk: 0,
            mmap_base: MMAP_BASE,
            stack_rlimit: STACK_SIZE,
        }
    }

    /// Rebuild the VMA map and program break of a migrated guest. The areas must be what an
    /// address space can hold (page-aligned, in order, not overlapping, below `USER_END`, at
    /// most `MAX_MAP_COUNT`); a state that breaks this is refused (`Err` naming why).
    pub fn restore(
        &mut self,
        vmas: Vec<(u64, Vma)>,
        brk_start: u64,
        brk: u64,
    ) -> Result<(), String> {
        if vmas.len() > MAX_MAP_COUNT {
            return Err(format!("{} areas", vmas.len()));
        }
        let mut prev_end = 0;
        for (start, v) in &vmas {
            let aligned = start.is_multiple_of(PAGE) && v.end.is_multiple_of(PAGE);
            if !aligned || *start < prev_end || v.end <= *start || v.end > USER_END {
                return Err(format!("area {start:#x}-{:#x}", v.end));
            }
            prev_end = v.end;
        }
        if brk < brk_start || brk > USER_END {
            return Err(format!("program break {brk:#x} from {brk_start:#x}"));
        }
        self.vmas = vmas.into_iter().collect();
        self.brk_start = brk_start;
        self.brk = brk;
        Ok(())
    }

    /// All VMAs, in address order.
    pub fn vmas(&self) -> impl Iterator<Item = (u64, &Vma)> {
        self.vmas.iter().map(|(s, v)| (*s, v))
    }

    /// Whether `[start, end)` overlaps any VMA.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.vmas
            .range(..end)
            .next_back()
            .is_some_and(|(_, v)| v.end > start)
    }

    /// Remove `[start, end)` from the VMA map, splitting areas that straddle its edges.
    /// Returns the pieces removed (clipped to the range).
    fn carve(&mut self, start: u64, end: u64) -> Vec<(u64, Vma)> {
        let hit: Vec<u64> = self
            .vmas
            .range(..end)
            .rev()
            .take_while(|(_, v)| v.end > start)
            .map(|(s, _)| *s)
            .collect();
        let mut removed = Vec::new();
        for s in hit {
            let v = self.vmas.remove(&s).expect("present");
            if s < start {
                self.vmas.insert(s, v.tail(s, s, start));
            }
            if v.end > end {
                self.vmas.insert(end, v.tail(s, end, v.end));
            }
            let lo = s.max(start);
            removed.push((lo, v.tail(s, lo, v.end.min(end))));
        }
        removed
    }

    /// Unmap `[start, end)` for good: areas, pages, and the file-window ranges behind them.
    fn remove(&mut self, start: u64, end: u64) -> Result<(), i64> {
        let removed = self.carve(start, end);
        self.mem.unmap(start, end).map_err(|_| errno::ENOMEM)?;
        let mut shared = false;
        for (s, v) in removed {
            shared |= matches!(v.kind, VmaKind::Shared | VmaKind::Shm);
            if let Some(w) = v.window {
                if let Ok(win) = self.mem.window() {
                    win.release(w, v.end - s);
                }
            }
        }
        if shared {
            self.note_sharing();
        }
        Ok(())
    }

    /// Whether the process holds a shared mapping that can be written (a file's, a memfd's,
    /// a SysV segment's): the paper's §4.2 keeps a process with writable shared memory at home.
    /// A read-only shared mapping of a file opened read-only (glibc maps its gconv cache so in
    /// nearly every program) can never be written by the process: it travels as a private
    /// copy, which no longer follows later changes to the file.
    pub fn holds_shared(&self) -> bool {
        self.vmas.values().any(|v| match v.kind {
            VmaKind::Shm => true,
            VmaKind::Shared => v.prot & 2 != 0 || v.file.as_ref().is_none_or(|f| f.writable),
            _ => false,
        })
    }

    /// Publish [`AddressSpace::holds_shared`] to migration threads.
    fn note_sharing(&mut self) {
        let pinned = self.holds_shared();
        self.mem.set_pinned(pinned);
    }

    /// Map (or re-zero) the pages of `[start, end)`, which must be page aligned, with the
    /// rights of `prot`.
    fn populate(&mut self, start: u64, end: u64, prot: u32) -> Result<(), NoMem> {
        let pages = (end - start) / PAGE;
        if GuestMem::frames_needed(pages) > self.mem.free_frames() {
            // Count what is already mapped before refusing.
            let missing = pages - self.mem.mapped_pages(start, end);
            if GuestMem::frames_needed(missing) > self.mem.free_frames() {
                return Err(NoMem);
            }
        }
        let mut p = start;
        let mut stale = false;
        while p < end {
            let (_, fresh) = self.mem.map_page(p, Access::Prot(prot))?;
            if !fresh {
                self.mem.zero(p, PAGE);
                stale = true;
            }
            p += PAGE;
        }
        if stale {
            self.mem.protect(start, end, Access::Prot(prot))?;
        }
        Ok(())
    }

    /// Map the time page and the vDSO `image` above it (`[vvar]`, then `[vdso]`, as Linux
    /// lays them out), top-down below `mmap_base`: the vDSO's address, for AT_SYSINFO_EHDR.
    /// None when this memory has no time page (see [`guest::VVAR_KVA`]) or no room.
    pub fn map_vdso(&mut self, image: &[u8]) -> Option<u64> {
        let frame = self.mem.translate(guest::VVAR_KVA)?;
        let pages = page_up(image.len() as u64);
        let at = self.find_free(PAGE + pages)?;
        self.insert(at + PAGE, pages, 5, VmaKind::Vdso).ok()?;
        self.mem.write(at + PAGE, image).ok()?;
        self.mem.map_at(at, frame, Access::Prot(1)).ok()?;
        self.vmas.insert(at, Vma::new(at + PAGE, 1, VmaKind::Vvar));
        Some(at + PAGE)
    }

    /// Whether an area of `kind` lies in `[start, end)`.
    fn touches(&self, start: u64, end: u64, kind: VmaKind) -> bool {
        self.vmas
            .range(..end)
            .rev()
            .take_while(|(_, v)| v.end > start)
            .any(|(_, v)| v.kind == kind)
    }

    /// Find a free range of `len` bytes in `[lo, hi)`, bottom-up (Linux's MAP_32BIT search,
    /// from 1 GiB to 2 GiB).
    pub fn find_free_in(&self, len: u64, lo: u64, hi: u64) -> Option<u64> {
        let mut at = lo;
        for (s, v) in self.vmas.range(..hi) {
            if v.end <= at {
                continue;
            }
            if *s >= at.checked_add(len)? {
                break;
            }
            at = v.end;
        }
        (at.checked_add(len)? <= hi).then_some(at)
    }

    /// Find a free range of `len` bytes, top-down below `mmap_base`.
    pub fn find_free(&self, len: u64) -> Option<u64> {
        let mut top = self.mmap_base;
        for (s, v) in self.vmas.range(..self.mmap_base).rev() {
            if v.end <= top && top - v.end >= len {
                return Some(top - len);
            }
            top = top.min(*s);
        }
        if top >= mmap_min() + len {
            Some(top - len)
        } else {
            None
        }
    }

    /// Create a mapping of `[addr, addr+len)` (page aligned, already carved free) with fresh
    /// zero contents.
    pub fn insert(&mut self, addr: u64, len: u64, prot: u32, kind: VmaKind) -> Result<(), i64> {
        let end = addr + len;
        if prot != 0 && kind == VmaKind::Anon && len > EAGER_MAX && len > self.mem.size() {
            // More than all of guest memory: refused, as Linux's heuristic overcommit refuses
            // what could never fit.
            return Err(errno::ENOMEM);
        }
        self.remove(addr, end)?;
        if prot != 0 && !(kind == VmaKind::Anon && len > EAGER_MAX) {
            // The stack is populated near its top only; deeper pages fault in on first use.
            let from = if kind == VmaKind::Stack {
                end.saturating_sub(STACK_EAGER).max(addr)
            } else {
                addr
            };
            self.populate(from, end, prot).map_err(|_| errno::ENOMEM)?;
        }
        self.put(addr, Vma::new(end, prot, kind));
        Ok(())
    }

    /// Like [`AddressSpace::insert`], for a private copy of a file's pages: the area keeps
    /// its file (for `/proc/PID/maps`) and so never merges with its neighbours, as Linux's
    /// areas of different files or offsets do not.
    pub fn insert_file(
        &mut self,
        addr: u64,
        len: u64,
        prot: u32,
        kind: VmaKind,
        file: MapFile,
    ) -> Result<(), i64> {
        self.insert(addr, len, prot, kind)?;
        // `insert` may have merged the new area into a neighbour: split it back out.
        self.carve(addr, addr + len);
        self.vmas.insert(
            addr,
            Vma {
                file: Some(Box::new(file)),
                ..Vma::new(addr + len, prot, kind)
            },
        );
        Ok(())
    }

    /// Place a file mapping of `[addr, addr+len)` (page aligned, from [`AddressSpace::pick`])
    /// whose pages are the file window's from `gpa` on. Pages are mapped on first touch.
    pub fn insert_window(
        &mut self,
        addr: u64,
        len: u64,
        prot: u32,
        kind: VmaKind,
        gpa: u64,
        file: Option<MapFile>,
    ) -> Result<(), i64> {
        self.remove(addr, addr + len)?;
        self.vmas.insert(
            addr,
            Vma {
                end: addr + len,
                prot,
                kind,
                window: Some(gpa),
                file: file.map(Box::new),
            },
        );
        if matches!(kind, VmaKind::Shared | VmaKind::Shm) {
            self.note_sharing();
        }
        Ok(())
    }

    /// Insert a VMA, merging it with neighbours of the same protection and kind (areas with
    /// a file or window never merge).
    fn put(&mut self, mut start: u64, mut vma: Vma) {
        let plain = |v: &Vma| v.window.is_none() && v.file.is_none();
        if !plain(&vma) {
            self.vmas.insert(start, vma);
            return;
        }
        if let Some((s, prev)) = self.vmas.range(..start).next_back() {
            if prev.end == start && prev.prot == vma.prot && prev.kind == vma.kind && plain(prev) {
                start = *s;
            }
        }
        if let Some(next) = self.vmas.get(&vma.end) {
            if next.prot == vma.prot && next.kind == vma.kind && plain(next) {
                let next = self.vmas.remove(&vma.end).expect("present");
                vma.end = next.end;
            }
        }
        self.vmas.insert(start, vma);
    }

    /// mmap of anonymous (or to-be-filled file) memory. `fixed` = MAP_FIXED, `noreplace` =
    /// MAP_FIXED_NOREPLACE. Returns the address.
    pub fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: u32,
        fixed: bool,
        noreplace: bool,
        kind: VmaKind,
    ) -> Result<u64, i64> {
        let start = self.pick(addr, len, fixed, noreplace)?;
        self.insert(start, page_up(len), prot, kind)?;
        Ok(start)
    }

    /// Where `mmap(addr, len, ..., flags)` places a new mapping (Linux's checks and errno:
    /// EINVAL, ENOMEM, EEXIST for MAP_FIXED_NOREPLACE over a mapping). Nothing changes.
    pub fn pick(&self, addr: u64, len: u64, fixed: bool, noreplace: bool) -> Result<u64, i64> {
        if len == 0 {
            return Err(errno::EINVAL);
        }
        let len = page_up(len);
        if len > USER_END || self.vmas.len() >= MAX_MAP_COUNT {
            return Err(errno::ENOMEM);
        }
        let start = if fixed || noreplace {
            if addr & (PAGE - 1) != 0 {
                return Err(errno::EINVAL);
            }
            if addr.checked_add(len).is_none_or(|e| e > USER_END) {
                return Err(errno::ENOMEM);
            }
            // SAFETY: geteuid has no preconditions.
            if addr < mmap_min() && unsafe { libc::geteuid() } != 0 {
                // Only a process with CAP_SYS_RAWIO (root here) may map that low.
                return Err(errno::EPERM);
            }
            if noreplace && self.overlaps(addr, addr + len) {
                return Err(errno::EEXIST);
            }
            addr
        } else {
            let hint = page_down(addr);
            if hint >= mmap_min()
                && hint.checked_add(len).is_some_and(|e| e <= USER_END)
                && !self.overlaps(hint, hint + len)
            {
                hint
            } else {
                self.find_free(len).ok_or(errno::ENOMEM)?
            }
        };
        Ok(start)
    }

    /// munmap: forget `[addr, addr+len)`; its pages go and later accesses fault.
    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<(), i64> {
        if addr & (PAGE - 1) != 0 || len == 0 || addr > USER_END || len > USER_END - addr {
            return Err(errno::EINVAL);
        }
        let end = addr.checked_add(page_up(len)).ok_or(errno::EINVAL)?;
        self.remove(addr, end)
    }

    /// mprotect: record the new protection; make pages accessible where needed.
    pub fn mprotect(&mut self, addr: u64, len: u64, prot: u32) -> Result<(), i64> {
        if addr & (PAGE - 1) != 0 {
            return Err(errno::EINVAL);
        }
        let end = addr.checked_add(page_up(len)).ok_or(errno::ENOMEM)?;
        if prot & 6 != 0 && self.touches(addr, end, VmaKind::Vvar) {
            // The time page may never be written or run (Linux: the mapping lacks
            // VM_MAYWRITE and VM_MAYEXEC).
            return Err(errno::EACCES);
        }
        if prot != 5 && self.touches(addr, end, VmaKind::Vdso) {
            // The vDSO keeps its read-and-execute protection (Linux answers EINVAL for any
            // other on its own).
            return Err(errno::EINVAL);
        }
        // Linux changes the areas up to the first hole, then answers ENOMEM.
        let mut cur = addr;
        for (s, v) in self.vmas.range(..end) {
            if v.end <= cur {
                continue;
            }
            if *s > cur {
                break;
            }
            cur = v.end;
        }
        if cur < end {
            if cur > addr {
                self.mprotect(addr, cur - addr, prot)?;
            }
            return Err(errno::ENOMEM);
        }
        let parts = self.carve(addr, end);
        // Shared mappings carry their protection to the host mapping first: the host refuses
        // PROT_WRITE on a file not open for writing (EACCES), and then nothing changes.
        let mut done: Vec<(u64, u64, u32)> = Vec::new();
        for (s, v) in &parts {
            if let (Some(w), VmaKind::Shared | VmaKind::Shm) = (v.window, v.kind) {
                let host = (prot & 3) as i32;
                let r = match self.mem.window() {
                    Ok(win) => win.protect(w, v.end - s, host),
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    if let Ok(win) = self.mem.window() {
                        for (w, n, p) in done {
                            let _ = win.protect(w, n, (p & 3) as i32);
                        }
                    }
                    for (s, v) in parts {
                        self.vmas.insert(s, v);
                    }
                    return Err(e);
                }
                done.push((w, v.end - s, v.prot));
            }
        }
        let mut rest = parts.into_iter();
        while let Some((s, v)) = rest.next() {
            // Out of guest memory part-way: what is done stays done (as with Linux's ENOMEM
            // from mprotect), every area not reached keeps its old protection.
            let lazy = v.kind == VmaKind::Anon && v.end - s > EAGER_MAX;
            if let Err(e) = self.reprotect(s, v.end, v.prot, prot, v.window.is_some() || lazy) {
                self.vmas.insert(s, v);
                for (s, v) in rest {
                    self.vmas.insert(s, v);
                }
                return Err(e);
            }
            let shared = matches!(v.kind, VmaKind::Shared | VmaKind::Shm);
            self.put(s, Vma { prot, ..v });
            if shared {
                self.note_sharing();
            }
        }
        Ok(())
    }

    /// Give the pages of `[start, end)`, whose area had protection `old`, protection `prot`
    /// (`on_touch`: pages not mapped yet stay so, and are mapped when first touched).
    fn reprotect(
        &mut self,
        start: u64,
        end: u64,
        old: u32,
        prot: u32,
        on_touch: bool,
    ) -> Result<(), i64> {
        if prot != 0 && old == 0 && !on_touch {
            // Newly accessible: map what is missing, keep what is there.
            let mut p = start;
            while p < end {
                self.mem
                    .map_page(p, Access::Prot(prot))
                    .map_err(|_| errno::ENOMEM)?;
                p += PAGE;
            }
        }
        // The pages themselves enforce the new protection against the guest.
        self.mem
            .protect(start, end, Access::Prot(prot))
            .map_err(|_| errno::ENOMEM)
    }

    /// Whether every byte of `[start, end)` lies in some VMA (Linux's ENOMEM test for msync,
    /// mlock, madvise...). O(VMAs in the range).
    pub fn covered(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for (s, v) in self.vmas.range(..end) {
            if v.end <= at {
                continue;
            }
            if *s > at {
                return false;
            }
            at = v.end;
            if at >= end {
                return true;
            }
        }
        at >= end
    }

    /// How many bytes from `va` (at most `len`) the guest's mappings let a system call read
    /// (any access at all: x86 pages are readable when mapped) or write (PROT_WRITE), as
    /// Linux's `copy_from_user`/`copy_to_user` would before faulting. O(VMAs in the range).
    pub fn accessible(&self, va: u64, len: u64, write: bool) -> u64 {
        let end = va.saturating_add(len);
        let mut at = va;
        while at < end {
            match self.vma_at(at) {
                Some((_, v)) if v.prot != 0 && (!write || v.prot & 2 != 0) => at = v.end,
                // The kernel's own accesses grow the stack as the guest's do.
                None => match self.stack_growth(at) {
                    Some(stack) => at = stack,
                    None => break,
                },
                _ => break,
            }
        }
        at.min(end) - va
    }

    /// The start of the stack area that may grow down to cover `addr`, which no area covers
    /// (Linux's `expand_stack` checks, mm/mmap.c): the next area above is the stack, it would
    /// then span at most RLIMIT_STACK, and the guard gap stays free above the accessible area
    /// below.
    fn stack_growth(&self, addr: u64) -> Option<u64> {
        let page = page_down(addr);
        let (&start, v) = self.vmas.range(addr..).next()?;
        if v.kind != VmaKind::Stack || v.end - page > self.stack_rlimit || page < mmap_min() {
            return None;
        }
        if let Some((_, below)) = self.vmas.range(..addr).next_back() {
            if below.prot != 0 && page - below.end < STACK_GUARD_GAP {
                return None;
            }
        }
        Some(start)
    }

    /// Extend the stack area down to `addr` without bringing in pages, if it may (the room
    /// below the arguments at exec).
    pub fn reserve_stack(&mut self, addr: u64) {
        if self.vma_at(addr).is_none() {
            self.grow_stack(addr);
        }
    }

    /// Grow the stack area down to cover `addr` if it may ([`AddressSpace::stack_growth`]).
    fn grow_stack(&mut self, addr: u64) -> bool {
        let Some(start) = self.stack_growth(addr) else {
            return false;
        };
        let v = self.vmas.remove(&start).expect("the stack area");
        self.vmas.insert(page_down(addr), v);
        true
    }

    /// The VMA containing `addr`.
    pub fn vma_at(&self, addr: u64) -> Option<(u64, &Vma)> {
        self.vmas
            .range(..=addr)
            .next_back()
            .filter(|(_, v)| v.end > addr)
            .map(|(s, v)| (*s, v))
    }

    /// mremap. `may_move` = MREMAP_MAYMOVE; `fixed` = MREMAP_FIXED with `new_addr`.
    pub fn mremap(
        &mut self,
        old: u64,
        old_len: u64,
        new_len: u64,
        may_move: bool,
        fixed: Option<u64>,
    ) -> Result<u64, i64> {
        if old & (PAGE - 1) != 0 || new_len == 0 {
            return Err(errno::EINVAL);
        }
        let mut old_len = page_up(old_len);
        let new_len = page_up(new_len);
        if self.touches(old, old.saturating_add(old_len.max(PAGE)), VmaKind::Vvar) {
            // The time page stays where the vDSO finds it (Linux: EFAULT, as for its own).
            return Err(errno::EFAULT);
        }
        if let Some(a) = fixed {
            // The new range may not overlap the old one (Linux: EINVAL).
            let (a_end, o_end) = (a.saturating_add(new_len), old.saturating_add(old_len));
            if a & (PAGE - 1) != 0 || (a < o_end && old < a_end) {
                return Err(errno::EINVAL);
            }
            if new_len < old_len {
                // A shrinking move drops the tail first, whatever lies there.
                self.munmap(old + new_len, old_len - new_len)?;
                old_len = new_len;
            }
        } else if new_len <= old_len {
            // Shrinking in place unmaps the tail, whatever lies there.
            if new_len < old_len {
                self.munmap(old + new_len, old_len - new_len)?;
            }
            return Ok(old);
        }
        let (vs, v) = self.vma_at(old).ok_or(errno::EFAULT)?;
        let v = v.clone();
        if old_len == 0 || v.end < old + old_len {
            return Err(errno::EFAULT);
        }
        if v.window.is_some() {
            return self.mremap_window(vs, &v, old, old_len, new_len, may_move, fixed);
        }
        if fixed.is_none() {
            let grow_end = old.checked_add(new_len).ok_or(errno::ENOMEM)?;
            if v.end == old + old_len
                && grow_end <= USER_END
                && !self.overlaps(old + old_len, grow_end)
            {
                self.carve(old + old_len, grow_end);
                self.insert(old + old_len, grow_end - old - old_len, v.prot, v.kind)?;
                return Ok(old);
            }
            if !may_move {
                return Err(errno::ENOMEM);
            }
        }
        let dest = match fixed {
            Some(a) => {
                if a & (PAGE - 1) != 0 {
                    return Err(errno::EINVAL);
                }
                self.mmap(a, new_len, v.prot, true, false, v.kind)?
            }
            None => self.mmap(0, new_len, v.prot, false, false, v.kind)?,
        };
        // Copy the contents (a mapped page keeps its frame, so pages are copied, not moved):
        // the pages mapped in the old area that hold anything (pages never touched, or zero,
        // read as zero in the new one anyway).
        let n = old_len.min(new_len);
        let mut page = vec![0u8; PAGE as usize];
        let mut at = old;
        while let Some(p) = self.mem.next_mapped(at, old + n) {
            let o = p - old;
            let k = PAGE.min(n - o) as usize;
            if self.mem.read(p, &mut page[..k]).is_ok() && page[..k].iter().any(|&b| b != 0) {
                if !self.mem.is_mapped(dest + o) {
                    self.fault_in(dest + o, true);
                }
                let _ = self.mem.write(dest + o, &page[..k]);
            }
            at = p + PAGE;
        }
        self.munmap(old, old_len)?;
        Ok(dest)
    }

    /// mremap of a file-window area that grows or moves: the host moves the mapping within the window
    /// (written private pages stay, the new tail shows the file), and the guest range stays
    /// or moves as for any mapping.
    #[allow(clippy::too_many_arguments)]
    fn mremap_window(
        &mut self,
        vs: u64,
        v: &Vma,
        old: u64,
        old_len: u64,
        new_len: u64,
        may_move: bool,
        fixed: Option<u64>,
    ) -> Result<u64, i64> {
        let grow_end = old.checked_add(new_len).ok_or(errno::ENOMEM)?;
        let in_place = fixed.is_none()
            && v.end == old + old_len
            && grow_end <= USER_END
            && !self.overlaps(old + old_len, grow_end);
        if !in_place && !may_move {
            return Err(errno::ENOMEM);
        }
        let dest = match fixed {
            Some(a) => self.pick(a, new_len, true, false)?,
            None if in_place => old,
            None => self.find_free(new_len).ok_or(errno::ENOMEM)?,
        };
        let gpa_old = v.window_at(vs, old).ok_or(errno::EFAULT)?;
        let gpa = self.mem.window()?.grow(gpa_old, old_len, new_len)?;
        // The window range behind the old pages is gone: drop the area and its pages.
        self.carve(old, old + old_len);
        self.mem
            .unmap(old, old + old_len)
            .map_err(|_| errno::ENOMEM)?;
        let piece = v.tail(vs, old, old + old_len);
        self.insert_window(dest, new_len, v.prot, v.kind, gpa, piece.file.map(|f| *f))?;
        Ok(dest)
    }

    /// Turn every file-window area into private memory with the same contents (before the
    /// process leaves home, where the files are): a private file mapping keeps what the guest
    /// sees, a read-only shared one becomes a private snapshot. Pages past the end of their
    /// file read as zero. Errors: ENOMEM when guest memory is short.
    pub fn materialize(&mut self) -> Result<(), i64> {
        let parts: Vec<(u64, Vma)> = self
            .vmas
            .iter()
            .filter(|(_, v)| v.window.is_some())
            .map(|(s, v)| (*s, v.clone()))
            .collect();
        let mut page = vec![0u8; PAGE as usize];
        for (s, v) in parts {
            let w = v.window.expect("filtered");
            let mut p = s;
            while p < v.end {
                page.fill(0);
                if let Some(win) = self.mem.window_ref() {
                    let _ = win.read(w + (p - s), &mut page);
                }
                self.mem.unmap(p, p + PAGE).map_err(|_| errno::ENOMEM)?;
                self.mem
                    .map_page(p, Access::Prot(v.prot))
                    .map_err(|_| errno::ENOMEM)?;
                if page.iter().any(|b| *b != 0) {
                    let _ = self.mem.write(p, &page);
                }
                p += PAGE;
            }
            self.mem.window()?.release(w, v.end - s);
            let kind = if v.kind == VmaKind::Shm || v.kind == VmaKind::Shared {
                VmaKind::File
            } else {
                v.kind
            };
            self.vmas.insert(
                s,
                Vma {
                    window: None,
                    kind,
                    ..v
                },
            );
        }
        Ok(())
    }

    /// Set up the program break right after the loaded image.
    pub fn init_brk(&mut self, at: u64) {
        self.brk_start = page_up(at);
        self.brk = self.brk_start;
    }

    /// brk: returns the new break (the old one when the request cannot be met).
    pub fn set_brk(&mut self, want: u64) -> u64 {
        if want < self.brk_start {
            return self.brk;
        }
        let old_end = page_up(self.brk);
        let new_end = page_up(want);
        if new_end > old_end {
            if self.overlaps(old_end, new_end) || new_end > self.mmap_base {
                return self.brk;
            }
            if self.populate(old_end, new_end, 3).is_err() {
                return self.brk;
            }
            // Extend (or create) the heap VMA.
            let start = match self.vmas.range(..old_end).next_back() {
                Some((s, v)) if v.end == old_end && v.kind == VmaKind::Heap => *s,
                _ => old_end,
            };
            self.vmas.insert(start, Vma::new(new_end, 3, VmaKind::Heap));
        } else if new_end < old_end {
            if self.remove(new_end, old_end).is_err() {
                return self.brk;
            }
            if new_end > self.brk_start {
                if let Some((s, _)) = self.vmas.range(..new_end).next_back() {
                    let s = *s;
                    self.vmas.insert(s, Vma::new(new_end, 3, VmaKind::Heap));
                }
            }
        }
        // Bytes between a lowered break and the end of its page stay as they were, as on
        // Linux (only whole pages go).
        self.brk = want;
        want
    }

    /// madvise(MADV_DONTNEED/MADV_FREE...): zero the range where mapped.
    pub fn discard(&mut self, addr: u64, len: u64) -> Result<(), i64> {
        if addr & (PAGE - 1) != 0
            || self.touches(addr, addr.saturating_add(page_up(len)), VmaKind::Vvar)
        {
            // (Linux refuses to discard a VM_PFNMAP area such as the time page: EINVAL.)
            return Err(errno::EINVAL);
        }
        self.mem.zero(addr, page_up(len));
        Ok(())
    }

    /// A guest page fault at `addr` (`write`: the access was a store): map the page if an
    /// accessible VMA covers it and it is not mapped yet (demand paging), or give it the
    /// rights its VMA grants if it has fewer. Returns whether the guest may retry the access;
    /// false is Linux's SIGSEGV (no VMA, or one whose protection forbids the access).
    pub fn fault_in(&mut self, addr: u64, write: bool) -> bool {
        let page = page_down(addr);
        if self.vma_at(addr).is_none() && !self.grow_stack(addr) {
            return false;
        }
        let Some((start, v)) = self.vma_at(addr) else {
            return false;
        };
        let (start, end, prot, window) = (start, v.end, v.prot, v.window);
        if prot == 0 || write && prot & 2 == 0 {
            return false;
        }
        if v.kind == VmaKind::Vvar && !self.mem.is_mapped(page) {
            return self
                .mem
                .translate(guest::VVAR_KVA)
                .is_some_and(|f| self.mem.map_at(page, f, Access::Prot(prot)).is_ok());
        }
        if self.mem.is_mapped(page) {
            return self
                .mem
                .protect(page, page + PAGE, Access::Prot(prot))
                .is_ok();
        }
        // Map the aligned 64 KiB block around the fault (256 KiB in a large anonymous area,
        // which is mapped as it is touched) within the VMA: a fault costs a VM exit, and
        // neighbouring pages are usually next.
        let block = if window.is_none() && end - start > EAGER_MAX {
            64 * PAGE
        } else {
            16 * PAGE
        };
        let (lo, hi) = (
            (addr & !(block - 1)).max(start),
            ((addr & !(block - 1)) + block).min(end),
        );
        let mut p = lo;
        while p < hi {
            let r = match window {
                Some(w) => self.mem.map_at(p, w + (p - start), Access::Prot(prot)),
                None => self.mem.map_page(p, Access::Prot(prot)).map(|_| ()),
            };
            if r.is_err() {
                return self.mem.is_mapped(page);
            }
            p += PAGE;
        }
        true
    }

    /// Demand-map every page of `[addr, addr+len)` that an accessible VMA covers.
    pub fn fault_in_range(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.saturating_add(len);
        let mut p = page_down(addr);
        while p < end {
            if !self.mem.is_mapped(p) {
                self.fault_in(p, false);
            }
            match p.checked_add(PAGE) {
                Some(next) => p = next,
                None => break,
            }
        }
    }

    /// Bytes of address space covered by accessible VMAs.
    pub fn mapped_bytes(&self) -> u64 {
        self.vmas
            .iter()
            .filter(|(_, v)| v.prot != 0)
            .map(|(s, v)| v.end - s)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> AddressSpace {
        AddressSpace::new(GuestMem::new(64 << 20).unwrap())
    }

    #[test]
    fn the_time_page_is_mapped_read_only_and_stays_the_vmms() {
        let mut a = space();
        assert_eq!(a.map_vdso(guest::VDSO), None, "no time page frame yet");
        crate::cpu::install_stub(&mut a.mem).unwrap();
        let frame = a.mem.translate(guest::VVAR_KVA).unwrap();
        let vdso = a.map_vdso(guest::VDSO).unwrap();
        let vvar = vdso - PAGE;
        assert_eq!(a.vma_at(vvar).unwrap().1.kind, VmaKind::Vvar);
        assert_eq!(a.vma_at(vdso).unwrap().1.kind, VmaKind::Vdso);
        assert_eq!(a.vma_at(vdso).unwrap().1.prot, 5);
        assert_eq!(a.mem.translate(vvar), Some(frame));
        let mut head = [0u8; 4];
        a.mem.read(vdso, &mut head).unwrap();
        assert_eq!(&head, b"\x7fELF");
        // Never writable, never moved, never discarded.
        assert_eq!(a.mprotect(vvar, PAGE, 3), Err(errno::EACCES));
        assert_eq!(
            a.mremap(vvar, PAGE, 2 * PAGE, true, None),
            Err(errno::EFAULT)
        );
        assert_eq!(a.mprotect(vdso, PAGE, 3), Err(errno::EINVAL));
        assert_eq!(a.mprotect(vdso, PAGE, 1), Err(errno::EINVAL));
        assert_eq!(a.mprotect(vdso, PAGE, 5), Ok(()));
        assert_eq!(a.discard(vvar, PAGE), Err(errno::EINVAL));
        assert_eq!(a.mprotect(vvar, PAGE, 0), Ok(()));
        assert!(!a.fault_in(vvar, false));
        assert_eq!(a.mprotect(vvar, PAGE, 1), Ok(()));
        assert!(a.fault_in(vvar, false));
        assert_eq!(a.mem.translate(vvar), Some(frame));
        // Unmapped by the program, the frame stays the VMM's: no later mapping gets it.
        a.munmap(vvar, PAGE).unwrap();
        assert_eq!(a.mem.translate(guest::VVAR_KVA), Some(frame));
        assert!(!a.mem.free_list().contains(&frame));
        let x = a
            .mmap(0, 64 * PAGE, 3, false, false, VmaKind::Anon)
            .unwrap();
        for p in (x..x + 64 * PAGE).step_by(PAGE as usize) {
            assert_ne!(a.mem.translate(p), Some(frame));
        }
    }

    #[test]
    fn top_down_placement_and_reuse() {
        let mut a = space();
        let x = a.mmap(0, 3 * PAGE, 3, false, false, VmaKind::Anon).unwrap();
        assert_eq!(x, MMAP_BASE - 3 * PAGE);
        let y = a.mmap(0, PAGE, 3, false, false, VmaKind::Anon).unwrap();
        assert_eq!(y, x - PAGE);
        a.munmap(x, 3 * PAGE).unwrap();
        let z = a.mmap(0, 2 * PAGE, 3, false, false, VmaKind::Anon).unwrap();
        assert_eq!(z, MMAP_BASE - 2 * PAGE);
    }

    #[test]
    fn unmapped_memory_comes_back_zeroed() {
        let mut a = space();
        let x = a.mmap(0, 2 * PAGE, 3, false, false, VmaKind::Anon).unwrap();
        a.mem.write(x + 100, b"hello").unwrap();
        a.munmap(x, 2 * PAGE).unwrap();
        let y = a.mmap(x, 2 * PAGE, 3, true, false, VmaKind::Anon).unwrap();
        assert_eq!(y, x);
        let mut b = [1u8; 5];
        a.mem.read(x + 100, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn fixed_noreplace_refuses_overlap() {
        let mut a = space();
        let x = a.mmap(0, PAGE, 3, false, false, VmaKind::Anon).unwrap();
        assert_eq!(
            a.mmap(x, PAGE, 3, false, true, VmaKind::Anon),
            Err(errno::EEXIST)
        );
    }

    #[test]
    fn carve_splits_areas() {
        let mut a = space();
        let x = a.mmap(0, 4 * PAGE, 3, false, false, VmaKind::Anon).unwrap();
        a.munmap(x + PAGE, PAGE).unwrap();
        let v: Vec<(u64, u64)> = a.vmas().map(|(s, v)| (s, v.end)).collect();
        assert_eq!(v, vec![(x, x + PAGE), (x + 2 * PAGE, x + 4 * PAGE)]);
        a.mprotect(x + 2 * PAGE, PAGE, 1).unwrap();
        assert_eq!(a.vmas().count(), 3);
        a.mprotect(x + 2 * PAGE, PAGE, 3).unwrap();
        assert_eq!(a.vmas().count(), 2, "equal neighbours merge again");
        assert_eq!(a.mprotect(x + PAGE, PAGE, 1), Err(errno::ENOMEM));
    }

    #[test]
    fn prot_none_stays_unmapped_until_opened() {
        let mut a = space();
        let x = a.mmap(0, 2 * PAGE, 0, false, false, VmaKind::Anon).unwrap();
        assert!(!a.mem.is_mapped(x));
        a.mprotect(x, PAGE, 3).unwrap();
        assert!(a.mem.is_mapped(x));
        assert!(!a.mem.is_mapped(x + PAGE));
    }

    #[test]
    fn stack_faults_in_below_its_eager_top() {
        let mut a = space();
        let base = STACK_TOP - STACK_SIZE;
        a.mmap(base, STACK_SIZE, 3, true, false, VmaKind::Stack)
            .unwrap();
        assert!(a.mem.is_mapped(STACK_TOP - PAGE));
        assert!(!a.mem.is_mapped(base));
        assert!(a.fault_in(base + 5, true));
        assert!(a.mem.is_mapped(base));
        // Outside any VMA: not a demand fault.
        assert!(!a.fault_in(base - PAGE, false));
    }

    #[test]
    fn stack_grows_down_to_its_limit_and_the_guard_gap() {
        let mut a = space();
        a.stack_rlimit = 64 << 20;
        let base = STACK_TOP - STACK_SIZE;
        a.mmap(base, STACK_SIZE, 3, true, false, VmaKind::Stack)
            .unwrap();
        // A system call's access below the stack counts as the stack's, as the kernel's does.
        assert_eq!(a.accessible(base - 3 * PAGE, PAGE, true), PAGE);
        assert!(a.fault_in(base - 3 * PAGE + 8, true));
        assert_eq!(
            a.vma_at(base - 3 * PAGE).map(|(s, _)| s),
            Some(base - 3 * PAGE)
        );
        assert!(a.mem.is_mapped(base - 3 * PAGE));
        // Past RLIMIT_STACK: SIGSEGV.
        assert!(!a.fault_in(STACK_TOP - (64 << 20) - PAGE, true));
        assert!(a.fault_in(STACK_TOP - (64 << 20), true));
        // Never within the guard gap of an area below.
        let below = STACK_TOP - (100 << 20);
        a.stack_rlimit = 200 << 20;
        a.mmap(below, PAGE, 3, true, false, VmaKind::Anon).unwrap();
        assert!(!a.fault_in(below + PAGE + STACK_GUARD_GAP - PAGE, true));
        assert!(a.fault_in(below + PAGE + STACK_GUARD_GAP, true));
        assert_eq!(a.accessible(below + PAGE + 8, 8, false), 0);
    }

    #[test]
    fn mmap_base_follows_the_stack_limit() {
        assert_eq!(mmap_base(8 << 20), MMAP_BASE);
        assert_eq!(mmap_base(512 << 20), STACK_TOP - (513 << 20));
        assert_eq!(mmap_base(u64::MAX), page_down(STACK_TOP - USER_END / 6 * 5));
    }

    #[test]
    fn protection_is_enforced_by_the_pages() {
        let mut a = space();
        let x = a.mmap(0, 2 * PAGE, 3, false, false, VmaKind::Anon).unwrap();
        a.mem.write(x, b"kept").unwrap();
        a.mem.take_new_root();
        let root = a.mem.cr3();
        a.mprotect(x, PAGE, 1).unwrap();
        // Taking the write right away copies the path: the vCPU must load a new root.
        let new_root = a.mem.take_new_root().expect("a new root");
        assert_ne!(new_root, root);
        assert_eq!(a.mem.take_new_root(), None);
        assert!(
            !a.fault_in(x, true),
            "a store to a read-only page is SIGSEGV"
        );
        assert!(a.fault_in(x, false));
        assert!(a.fault_in(x + PAGE, true));
        a.mprotect(x, PAGE, 0).unwrap();
        assert!(!a.fault_in(x, false), "PROT_NONE refuses reads");
        a.mprotect(x, PAGE, 3).unwrap();
        let mut b = [0u8; 4];
        a.mem.read(x, &mut b).unwrap();
        assert_eq!(&b, b"kept", "PROT_NONE keeps the contents");
        // Adding rights is done in place.
        assert!(a.mem.take_new_root().is_some());
        a.mprotect(x, PAGE, 1).unwrap();
        a.mem.take_new_root();
        a.mprotect(x, PAGE, 3).unwrap();
        assert_eq!(a.mem.take_new_root(), None);
    }

    #[test]
    fn unmapped_frames_are_reused_and_faults_follow() {
        let mut a = space();
        let x = a.mmap(0, 8 * PAGE, 3, false, false, VmaKind::Anon).unwrap();
        a.mem.write(x, b"old").unwrap();
        let used = a.mem.used();
        for _ in 0..100 {
            a.munmap(x, 8 * PAGE).unwrap();
            assert!(!a.mem.is_mapped(x));
            assert!(!a.fault_in(x, false), "an unmapped page faults");
            a.mem.take_new_root();
            assert_eq!(a.mmap(x, 8 * PAGE, 3, true, false, VmaKind::Anon), Ok(x));
        }
        let mut b = [9u8; 3];
        a.mem.read(x, &mut b).unwrap();
        assert_eq!(b, [0; 3], "a new mapping reads as zero");
        // Each round copies at most four tables; the data frames come back every time.
        assert!(
            a.mem.used() <= used + 100 * 4 * PAGE,
            "{}",
            a.mem.used() - used
        );
        assert!(a.mem.free_list().len() >= 300);
    }

    #[test]
    fn brk_grows_and_shrinks() {
        let mut a = space();
        a.init_brk(0x60_0123);
        let b0 = a.set_brk(0);
        assert_eq!(b0, 0x60_1000);
        assert_eq!(a.set_brk(b0 + 10 * PAGE + 5), b0 + 10 * PAGE + 5);
        a.mem.write(b0 + 5 * PAGE, b"x").unwrap();
        assert_eq!(a.set_brk(b0 + PAGE), b0 + PAGE);
        assert_eq!(a.set_brk(b0 + 6 * PAGE), b0 + 6 * PAGE);
        let mut c = [9u8];
        a.mem.read(b0 + 5 * PAGE, &mut c).unwrap();
        assert_eq!(c, [0]);
    }

    #[test]
    fn mremap_grows_in_place_or_moves_with_contents() {
        let mut a = space();
        let x = a.mmap(0, PAGE, 3, false, false, VmaKind::Anon).unwrap();
        a.mem.write(x, b"abc").unwrap();
        // Top-down: the space above x is the mmap base, so growth must move.
        let y = a.mremap(x, PAGE, 4 * PAGE, true, None).unwrap();
        let mut b = [0u8; 3];
        a.mem.read(y, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        // The space above y is free again once x is gone: growth in place succeeds.
        assert!(!a.overlaps(y + 4 * PAGE, y + 8 * PAGE));
        assert_eq!(a.mremap(y, 4 * PAGE, 8 * PAGE, false, None), Ok(y));
        // Now blocked from above by a new mapping: without MAYMOVE it must fail.
        a.mmap(y + 8 * PAGE, PAGE, 3, true, false, VmaKind::Anon)
            .unwrap();
        assert_eq!(
            a.mremap(y, 8 * PAGE, 12 * PAGE, false, None),
            Err(errno::ENOMEM)
        );
    }

    #[test]
    fn exhaustion_is_enomem() {
        let mut a = space();
        assert_eq!(
            a.mmap(0, 128 << 20, 3, false, false, VmaKind::Anon),
            Err(errno::ENOMEM)
        );
        assert!(a.mmap(0, 16 << 20, 3, false, false, VmaKind::Anon).is_ok());
    }
}
