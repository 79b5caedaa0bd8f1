//! Guest physical memory and the guest's page tables.
//!
//! Guest physical memory is one anonymous `MAP_NORESERVE` mapping registered as one KVM memory
//! slot, wrapped in vm-memory with a dirty bitmap so every write the VMM makes into the guest is
//! tracked (KVM's own dirty log does not see them). Host pages are allocated only when touched.
//!
//! Frames are handed out by a bump allocator. The VMM maintains the guest's 4-level page tables
//! itself. A virtual page, once mapped, keeps its frame for the life of the VM: unmapping it only
//! zeroes the frame (host `MADV_DONTNEED`, which also returns the memory to the host). This never
//! changes a present translation, so the guest TLB (or, on shadow-paging KVM, the shadow page
//! tables, which do not see host-side writes to guest page tables) can never hold a stale one.

use std::sync::Arc;

use crate::window::Window;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

/// Page size.
pub const PAGE: u64 = 4096;
const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
/// Software bit (ignored by the MMU): the entry holds a frame. A held entry without `PTE_P` is
/// a page whose VMA is `PROT_NONE` for now: it keeps its contents for a later `mprotect`.
const PTE_HELD: u64 = 1 << 9;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Round down to a page boundary.
pub const fn page_down(x: u64) -> u64 {
    x & !(PAGE - 1)
}

/// Round up to a page boundary (saturating at the top of the address space).
pub const fn page_up(x: u64) -> u64 {
    match x.checked_add(PAGE - 1) {
        Some(v) => v & !(PAGE - 1),
        None => !(PAGE - 1),
    }
}

/// Failure to access guest memory: the address is not mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault(pub u64);

/// Out of guest physical frames (`--mem` exhausted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMem;

/// How a page is mapped for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Ring 3 may read, write and execute.
    User,
    /// Ring 3 may read and execute, not write (the stub page).
    UserReadOnly,
    /// Ring 0 only.
    Supervisor,
    /// Ring 3 with a VMA's `PROT_*` bits: `PROT_NONE` keeps the frame but grants nothing, no
    /// `PROT_WRITE` maps it read-only (x86 pages are readable whenever present).
    Prot(u32),
}

impl Access {
    fn flags(self) -> u64 {
        PTE_HELD
            | match self {
                Access::User => PTE_P | PTE_RW | PTE_US,
                Access::UserReadOnly => PTE_P | PTE_US,
                Access::Supervisor => PTE_P | PTE_RW,
                Access::Prot(0) => 0,
                Access::Prot(p) if p & 2 != 0 => PTE_P | PTE_RW | PTE_US,
                Access::Prot(_) => PTE_P | PTE_US,
            }
    }
}

/// Whether replacing entry `old` by `new` takes a right away from the guest (or moves the page
/// to another frame): such a change must not be made in a page-table page the MMU may have
/// cached, see [`GuestMem::set_entry`].
fn revokes(old: u64, new: u64) -> bool {
    old & PTE_P != 0
        && (new & PTE_P == 0
            || old & PTE_RW & !new != 0
            || old & PTE_US & !new != 0
            || old & ADDR_MASK != new & ADDR_MASK)
}

/// Guest physical memory plus the page tables that map guest virtual addresses onto it.
pub struct GuestMem {
    /// Declared first so the VM is released before the memory it maps.
    vm: Option<Arc<kvm_ioctls::VmFd>>,
    /// Host file mappings the guest sees (made on the first file mapping).
    window: Option<Window>,
    mem: GuestMemoryMmap<AtomicBitmap>,
    host: *mut u8,
    size: u64,
    next_frame: u64,
    pml4: u64,
    /// Bytes covered by KVM memory slots (or to be, once the VM exists). Slots are added as
    /// frames are handed out, so a small program does not pay for registering (and tearing
    /// down) its whole `--mem`.
    registered: u64,
    /// Slot layout and dirty-logging state, shared with a migration running beside the vCPU.
    shared: Arc<std::sync::Mutex<Layout>>,
    /// Data frames given back by `unmap` (and retired page-table frames), zero, to hand out
    /// again as data. Never as page tables: see [`GuestMem::set_entry`].
    free: Vec<u64>,
    /// Free frames no page table has used since the MMU last dropped every cached
    /// translation ([`GuestMem::reset_tables`], or a new VM): they may become page tables.
    clean: Vec<u64>,
    /// Page-table frames made since the guest last ran: no MMU has seen them, so they may be
    /// changed in place in any way.
    fresh: std::collections::HashSet<u64>,
    /// The root moved (`pml4` is a copy): the vCPU must load it before it runs again.
    new_root: bool,
    /// Retired page tables kept while other vCPUs may use them (see `hold_retired`).
    held: Option<Vec<u64>>,
    /// The thread faulting memory in ahead of a migration's pages, and its stop flag.
    populating: std::sync::Mutex<Option<Populating>>,
}

/// A background populate ([`GuestMem::populate_in_background`]): its stop flag and thread.
type Populating = (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
);

/// What a migration thread needs to know about guest memory while the guest runs.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// (base, size) of each KVM memory slot; slot number = index.
    pub slots: Vec<(u64, u64)>,
    /// Bytes of guest physical memory handed out (frames below this may hold data).
    pub used: u64,
    /// Whether KVM dirty logging is on for every slot.
    pub log_dirty: bool,
    /// The guest holds a shared mapping and must stay at home (paper §4.2).
    pub pinned: bool,
}

/// Size of the first memory slot; later slots double the covered size.
const FIRST_SLOT: u64 = 32 << 20;

// SAFETY: `host` points into the mapping owned by `mem`, which lives as long as `self`; all
// access to it goes through `&self`/`&mut self`, so moving a `GuestMem` to another thread is as
// safe as moving the `GuestMemoryMmap` itself.
unsafe impl Send for GuestMem {}

impl GuestMem {
    /// Reserve `size` bytes of guest physical memory (rounded up to a page).
    pub fn new(size: u64) -> anyhow::Result<Self> {
        Self::with_pool(size, None).map(|(m, _)| m)
    }

    /// Like [`GuestMem::new`], the first bytes being the touched part of `pool` (moved into
    /// place, see [`crate::pool`]); returns the memory and how many bytes the pool gave.
    pub fn with_pool(size: u64, pool: Option<crate::pool::Pool>) -> anyhow::Result<(Self, u64)> {
        let size = page_up(size);
        anyhow::ensure!(
            size >= 64 * PAGE,
            "guest memory of {size} bytes is too small"
        );
        let region = MmapRegion::<AtomicBitmap>::build(
            None,
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| anyhow::anyhow!("cannot reserve {size} bytes of guest memory: {e}"))?;
        let region = GuestRegionMmap::with_arc(Arc::new(region), GuestAddress(0))
            .ok_or_else(|| anyhow::anyhow!("guest memory region overflows"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| anyhow::anyhow!("guest memory: {e}"))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| anyhow::anyhow!("guest memory: {e}"))?;
        // Transparent huge pages behind guest memory: frames are handed out densely from the
        // bottom, and a 2 MiB page costs the host about what 100 of its 4 KiB pages do
        // (a first touch is ~2 µs a page under nested virtualisation, ~0.4 µs a page in a
        // huge one). Starting, loading and a migration's arrival all touch memory first.
        // (Advice only: where the host has THP off or no huge page free, 4 KiB pages serve.)
        // SAFETY: advice on the mapping this GuestMem owns; contents are unchanged.
        unsafe {
            libc::madvise(
                host as *mut libc::c_void,
                size as usize,
                libc::MADV_HUGEPAGE,
            );
        }
        let pooled = match pool {
            // SAFETY: the mapping was just made, holds nothing and nothing refers into it
            // (no frame handed out, no VM attached).
            Some(mut p) => unsafe { p.move_to(host, size) },
            None => 0,
        };
        let mut g = GuestMem {
            mem,
            host,
            size,
            next_frame: PAGE,
            pml4: 0,
            registered: 0,
            shared: Default::default(),
            vm: None,
            window: None,
            free: Vec::new(),
            clean: Vec::new(),
            fresh: Default::default(),
            new_root: false,
            held: None,
            populating: Default::default(),
        };
        g.pml4 = g
            .alloc_table()
            .map_err(|_| anyhow::anyhow!("guest memory too small"))?;
        Ok((g, pooled))
    }

    /// Fault in guest memory from byte `from` up to byte `to` on a helper thread
    /// (MADV_POPULATE_WRITE) and return at once: a migration's pages then land in memory that
    /// is already there, while they are still on the way. The contents do not change.
    pub fn populate_in_background(&self, from: u64, to: u64) {
        let len = page_up(to.min(self.size)) as usize;
        let from = page_down(from) as usize;
        if from >= len {
            return;
        }
        let host = self.host as usize;
        let keep = self.mem.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let t = std::thread::spawn(move || {
            let _alive = keep;
            let step = 16usize << 20;
            let mut off = from;
            while off < len && !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let n = step.min(len - off);
                // SAFETY: [host+off, host+off+n) lies inside the guest mapping, which `_alive`
                // keeps mapped; populating faults pages in without changing what they hold.
                let r = unsafe {
                    libc::madvise(
                        (host + off) as *mut libc::c_void,
                        n,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if r != 0 {
                    return;
                }
                off += n;
            }
        });
        self.stop_populating();
        *self.populating.lock().unwrap_or_else(|p| p.into_inner()) = Some((stop, t));
    }

    /// Stop a background populate and wait for its thread (at most one 16 MiB step): from
    /// then on nothing but the guest and the VMM touches guest memory.
    pub fn stop_populating(&self) {
        let p = self
            .populating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((stop, t)) = p {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = t.join();
        }
    }

    /// Give back the host pages behind guest pages `gpns` (MADV_DONTNEED, in runs of
    /// consecutive pages): their next access finds them missing (zero, or a userfaultfd
    /// fault where one is registered). Numbers past the memory are errors.
    pub fn discard_pages(&self, gpns: &[u64]) -> anyhow::Result<()> {
        let mut list = gpns.to_vec();
        list.sort_unstable();
        list.dedup();
        let pages = self.size / PAGE;
        if let Some(&last) = list.last() {
            anyhow::ensure!(last < pages, "page {last:#x} is past guest memory");
        }
        let mut i = 0;
        while i < list.len() {
            let mut j = i + 1;
            while j < list.len() && list[j] == list[j - 1] + 1 {
                j += 1;
            }
            let (start, n) = (list[i], (j - i) as u64);
            // SAFETY: pages [start, start+n) lie inside the guest mapping this GuestMem owns
            // (checked above); their contents are given up on purpose, and whoever reads them
            // next sees them as the kernel supplies them.
            let r = unsafe {
                libc::madvise(
                    self.host.add((start * PAGE) as usize) as *mut libc::c_void,
                    (n * PAGE) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            anyhow::ensure!(
                r == 0,
                "discarding guest pages: {}",
                std::io::Error::last_os_error()
            );
            i = j;
        }
        Ok(())
    }

    /// The vm-memory view (for KVM registration and bulk access).
    pub fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.mem
    }

    /// Host address of guest physical address 0.
    pub fn host_base(&self) -> *mut u8 {
        self.host
    }

    /// Bytes of guest physical memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest physical address of the top-level page table (CR3).
    pub fn cr3(&self) -> u64 {
        self.pml4
    }

    /// Bytes of guest physical memory handed out so far.
    pub fn used(&self) -> u64 {
        self.next_frame
    }

    /// Frames still available.
    pub fn free_frames(&self) -> u64 {
        (self.size - self.next_frame) / PAGE + (self.free.len() + self.clean.len()) as u64
    }

    /// The frames below `used` that hold nothing and wait to be handed out again (a migration
    /// carries them so the destination reuses them too).
    pub fn free_list(&self) -> Vec<u64> {
        [&self.free[..], &self.clean[..]].concat()
    }

    /// Mark a guest physical range dirty in the VMM's own bitmap.
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        if let Some(r) = self.mem.find_region(GuestAddress(gpa)) {
            r.bitmap().mark_dirty(gpa as usize, len as usize);
        }
    }

    /// Attach the VM: register every slot so far, and later ones as they are added.
    pub fn attach(&mut self, vm: Arc<kvm_ioctls::VmFd>) -> anyhow::Result<()> {
        let layout = self.layout();
        for (i, &(base, size)) in layout.slots.iter().enumerate() {
            self.register(&vm, i as u32, base, size, layout.log_dirty)?;
        }
        if let Some(w) = &mut self.window {
            w.attach(vm.clone())
                .map_err(|e| anyhow::anyhow!("registering the file window: errno {e}"))?;
        }
        self.vm = Some(vm);
        Ok(())
    }

    /// In the child of a host fork(2): this memory is the child's copy-on-write copy of the
    /// parent's; move it to the child's own VM. `layout` was read before the fork (a lock the
    /// parent's threads held then would never be released here). The new VM's MMU has cached
    /// nothing, so every free frame may become a page table.
    /// With `log`, the new VM logs the guest's writes from the start (a vfork child's
    /// writes go back to its parent, see [`GuestMem::user_pages`]).
    pub fn forked(
        &mut self,
        mut layout: Layout,
        vm: Arc<kvm_ioctls::VmFd>,
        log: bool,
    ) -> anyhow::Result<()> {
        layout.log_dirty = log;
        self.shared = Arc::new(std::sync::Mutex::new(layout));
        let mut clean = std::mem::take(&mut self.free);
        clean.append(&mut self.clean);
        self.clean = clean;
        self.fresh.clear();
        self.vm = None;
        self.attach(vm)
    }

    /// Every page of guest RAM mapped at a user address: (virtual address, guest physical
    /// address), from the page tables.
    pub fn user_pages(&self) -> Vec<(u64, u64)> {
        let mut leaves = Vec::new();
        let mut tables = Vec::new();
        self.collect(self.pml4, 3, 0, &mut leaves, &mut tables);
        leaves
            .into_iter()
            .filter(|(va, pte)| *va < 1 << 47 && pte & PTE_P != 0 && pte & ADDR_MASK < self.size)
            .map(|(va, pte)| (va, pte & ADDR_MASK))
            .collect()
    }

    /// The file window, reserved and registered with KVM on first use.
    pub fn window(&mut self) -> Result<&mut Window, i64> {
        if self.window.is_none() {
            let mut w = Window::new()?;
            if let Some(vm) = &self.vm {
                w.attach(vm.clone())?;
            }
            self.window = Some(w);
        }
        Ok(self.window.as_mut().expect("just made"))
    }

    /// Record whether the guest holds a shared mapping (see [`Layout::pinned`]).
    pub fn set_pinned(&self, pinned: bool) {
        if let Ok(mut l) = self.shared.lock() {
            l.pinned = pinned;
        }
    }

    /// The file window if one exists.
    pub fn window_ref(&self) -> Option<&Window> {
        self.window.as_ref()
    }

    /// Point the page at `va` at window memory `gpa` with the rights of `access` (its frame,
    /// if it had one, is released first).
    pub fn map_at(&mut self, va: u64, gpa: u64, access: Access) -> Result<(), NoMem> {
        if self.is_mapped(va) {
            self.unmap(va, va + PAGE)?;
        }
        let at = self.leaf(va, true)?.ok_or(NoMem)?;
        self.write_u64(at, gpa | access.flags());
        Ok(())
    }

    /// Copy guest physical memory (RAM or window) into `buf`; false on a fault.
    fn copy_from(&self, gpa: u64, buf: &mut [u8]) -> bool {
        if gpa < self.size {
            copy_out(&self.mem, gpa, buf)
        } else {
            self.window.as_ref().is_some_and(|w| w.read(gpa, buf))
        }
    }

    /// Copy `buf` into guest physical memory (RAM, marked dirty, or window); false on a fault.
    fn copy_to(&self, gpa: u64, buf: &[u8]) -> bool {
        if gpa < self.size {
            copy_in(&self.mem, gpa, buf)
        } else {
            self.window.as_ref().is_some_and(|w| w.write(gpa, buf))
        }
    }

    /// A snapshot of the slot layout.
    pub fn layout(&self) -> Layout {
        self.shared.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn register(
        &self,
        vm: &kvm_ioctls::VmFd,
        slot: u32,
        base: u64,
        size: u64,
        log_dirty: bool,
    ) -> anyhow::Result<()> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: self.host as u64 + base,
        };
        // SAFETY: the region lies inside the guest memory mapping owned by `self`, which
        // outlives the VM: `Vm` drops its vCPU and VM before its address space.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| anyhow::anyhow!("KVM_SET_USER_MEMORY_REGION: {e}"))
    }

    /// Cover more guest physical memory with a new slot.
    fn grow(&mut self) -> Result<(), NoMem> {
        let add = self
            .registered
            .max(FIRST_SLOT)
            .min(self.size - self.registered);
        if add == 0 {
            return Err(NoMem);
        }
        let mut layout = self.shared.lock().map_err(|_| NoMem)?;
        let (base, slot) = (self.registered, layout.slots.len() as u32);
        if let Some(vm) = &self.vm {
            self.register(vm, slot, base, add, layout.log_dirty)
                .map_err(|_| NoMem)?;
        }
        layout.slots.push((base, add));
        self.registered += add;
        Ok(())
    }

    /// Register memory slots over the whole guest memory now (a migration destination does
    /// this before the guest's state arrives).
    pub fn cover_all(&mut self) -> Result<(), NoMem> {
        while self.registered < self.size {
            self.grow()?;
        }
        Ok(())
    }

    /// A handle for reading memory and the dirty log from another thread while the guest runs.
    pub fn view(&self) -> MemView {
        MemView {
            mem: self.mem.clone(),
            shared: self.shared.clone(),
            vm: self.vm.clone(),
        }
    }

    /// Rebuild the frame layout of a migrated guest: frames below `used` are handed out and
    /// the page tables start at `pml4`; contents arrive separately.
    pub fn restore_layout(&mut self, used: u64, pml4: u64, free: Vec<u64>) -> Result<(), NoMem> {
        if used > self.size || pml4 >= used || free.iter().any(|f| *f >= used || f % PAGE != 0) {
            return Err(NoMem);
        }
        // A new VM's MMU has cached nothing: every free frame may become a page table.
        self.clean = free;
        self.free.clear();
        while self.registered < used {
            self.grow()?;
        }
        self.next_frame = used;
        self.pml4 = pml4;
        if let Ok(mut l) = self.shared.lock() {
            l.used = used;
        }
        Ok(())
    }

    /// Page `gpn` of guest memory as a host buffer, for writing a migrated page in place.
    ///
    /// # Safety
    /// Nothing else may access the page while the reference lives: no vCPU runs on this
    /// memory yet (the receiving side of a migration, before restore) and the caller holds
    /// no other reference to it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn page_mut(&self, gpn: u64) -> Option<&mut [u8; PAGE as usize]> {
        if (gpn + 1) * PAGE > self.size {
            return None;
        }
        let s = self
            .mem
            .get_slice(GuestAddress(gpn * PAGE), PAGE as usize)
            .ok()?;
        // Not marked dirty: nothing logs writes before the VM runs (a later migration starts
        // its log afresh).
        let p = s.ptr_guard_mut().as_ptr() as *mut [u8; PAGE as usize];
        // SAFETY: `p` is a page-aligned, page-long range of the live guest mapping (checked
        // by get_slice), exclusive to the caller by this function's contract.
        Some(unsafe { &mut *p })
    }

    /// Write one whole page at a guest physical page number (migration's receive side).
    pub fn write_page(&self, gpn: u64, data: &[u8; PAGE as usize]) -> Result<(), NoMem> {
        if (gpn + 1) * PAGE > self.size {
            return Err(NoMem);
        }
        if copy_in(&self.mem, gpn * PAGE, data) {
            Ok(())
        } else {
            Err(NoMem)
        }
    }

    /// A frame for a page table: always one no page table has ever used, so no MMU holds a
    /// translation cached from it (see [`GuestMem::set_entry`]).
    fn alloc_table(&mut self) -> Result<u64, NoMem> {
        let t = match self.clean.pop() {
            Some(t) => t,
            None => self.bump()?,
        };
        self.fresh.insert(t);
        Ok(t)
    }

    /// A zero frame for data.
    fn alloc_data(&mut self) -> Result<u64, NoMem> {
        match self.free.pop().or_else(|| self.clean.pop()) {
            Some(f) => Ok(f),
            None => self.bump(),
        }
    }

    fn bump(&mut self) -> Result<u64, NoMem> {
        if self.next_frame + PAGE > self.size {
            return Err(NoMem);
        }
        while self.next_frame + PAGE > self.registered {
            self.grow()?;
        }
        let f = self.next_frame;
        self.next_frame += PAGE;
        if let Ok(mut l) = self.shared.lock() {
            l.used = self.next_frame;
        }
        Ok(f)
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_obj::<u64>(GuestAddress(gpa)).unwrap_or(0)
    }

    fn write_u64(&self, gpa: u64, v: u64) {
        // Page-table frames always lie inside guest memory: they come from `bump`.
        let _ = self.mem.write_obj(v, GuestAddress(gpa));
    }

    /// Walk to the leaf entry for `va`, optionally creating missing tables. Returns the guest
    /// physical address of the leaf PTE.
    fn leaf(&mut self, va: u64, create: bool) -> Result<Option<u64>, NoMem> {
        let mut table = self.pml4;
        for level in (1..4).rev() {
            let idx = (va >> (12 + 9 * level)) & 0x1ff;
            let e_addr = table + idx * 8;
            let e = self.read_u64(e_addr);
            if e & PTE_P == 0 {
                if !create {
                    return Ok(None);
                }
                let t = self.alloc_table()?;
                self.write_u64(e_addr, t | PTE_P | PTE_RW | PTE_US);
                table = t;
            } else {
                table = e & ADDR_MASK;
            }
        }
        Ok(Some(table + ((va >> 12) & 0x1ff) * 8))
    }

    /// Frames needed to map `pages` more pages in the worst case (leaf frames plus tables).
    pub fn frames_needed(pages: u64) -> u64 {
        pages + pages.div_ceil(512) + 4
    }

    /// Map the page at `va` if it is not mapped yet. Returns its guest physical address and
    /// whether it was freshly mapped (and so is known to be zero).
    pub fn map_page(&mut self, va: u64, access: Access) -> Result<(u64, bool), NoMem> {
        let pte_addr = self.leaf(va, true)?.ok_or(NoMem)?;
        let pte = self.read_u64(pte_addr);
        if pte & PTE_HELD != 0 {
            return Ok((pte & ADDR_MASK, false));
        }
        let f = self.alloc_data()?;
        // A new entry grants rights where there were none: the MMU caches no translation of
        // an entry that is not present, so it may be written in place.
        self.write_u64(pte_addr, f | access.flags());
        Ok((f, true))
    }

    /// Write the leaf entry of `va`, found at `at` by the caller. Adding rights is done in place: an
    /// MMU re-reads an entry that refused an access before it reports a fault. Taking rights
    /// away is not: KVM's shadow paging (KVM-PVM here) caches translations built from a
    /// page-table page and does not see the VMM write to it, nor does reloading the same CR3
    /// drop them. So the path from the root down to the entry is copied into frames no
    /// page table ever used (and so no cache knows), changed there, and the vCPU loads the new
    /// root before it runs again ([`GuestMem::take_new_root`]). The old tables become free
    /// data frames; a frame that was once a page table is never a page table again.
    fn set_entry(&mut self, va: u64, at: u64, new: u64) -> Result<(), NoMem> {
        let old = self.read_u64(at);
        if old == new {
            return Ok(());
        }
        let at = if revokes(old, new) {
            self.private_path(va)?
        } else {
            at
        };
        self.write_u64(at, new);
        Ok(())
    }

    /// Make every table on the path to `va`'s leaf entry fresh (copying the ones an MMU may
    /// have seen) and return the address of the leaf entry in the fresh leaf table.
    fn private_path(&mut self, va: u64) -> Result<u64, NoMem> {
        // Copies consume frames no page table used before; when those run short while many
        // frames are free (a program that flips protections for ever), start afresh.
        const RESERVE: u64 = 64;
        // (Not while other vCPUs may be using the tables: see `hold_retired`.)
        if self.held.is_none()
            && (self.clean.len() as u64) < 4
            && (self.size - self.next_frame) / PAGE < RESERVE
            && self.free.len() as u64 >= RESERVE / 2
        {
            self.reset_tables()?;
        }
        if !self.fresh.contains(&self.pml4) {
            let copy = self.copy_table(self.pml4)?;
            self.retire(self.pml4);
            self.pml4 = copy;
            self.new_root = true;
        }
        let mut table = self.pml4;
        for level in (1..4).rev() {
            let e_addr = table + ((va >> (12 + 9 * level)) & 0x1ff) * 8;
            let e = self.read_u64(e_addr);
            let child = e & ADDR_MASK;
            table = if e & PTE_P == 0 {
                let t = self.alloc_table()?;
                self.write_u64(e_addr, t | PTE_P | PTE_RW | PTE_US);
                t
            } else if self.fresh.contains(&child) {
                child
            } else {
                let copy = self.copy_table(child)?;
                self.write_u64(e_addr, copy | PTE_P | PTE_RW | PTE_US);
                self.retire(child);
                copy
            };
        }
        Ok(table + ((va >> 12) & 0x1ff) * 8)
    }

    fn copy_table(&mut self, from: u64) -> Result<u64, NoMem> {
        let to = self.alloc_table()?;
        let mut page = [0u8; PAGE as usize];
        copy_out(&self.mem, from, &mut page);
        copy_in(&self.mem, to, &page);
        Ok(to)
    }

    /// Make every free frame usable as a page table again: have KVM drop every translation
    /// it cached from guest page tables (re-registering each RAM slot does that; its dirty
    /// log is kept in the VMM's bitmap first), then rebuild the whole tree from clean frames
    /// with the same entries. The vCPU loads the new root before it runs again.
    fn reset_tables(&mut self) -> Result<(), NoMem> {
        if let Some(vm) = self.vm.clone() {
            let layout = self.layout();
            for (i, &(base, size)) in layout.slots.iter().enumerate() {
                if layout.log_dirty {
                    if let Ok(log) = vm.get_dirty_log(i as u32, size as usize) {
                        for (w, word) in log.iter().enumerate() {
                            let mut word = *word;
                            while word != 0 {
                                let b = word.trailing_zeros() as u64;
                                word &= word - 1;
                                self.mark_dirty(base + (w as u64 * 64 + b) * PAGE, PAGE);
                            }
                        }
                    }
                }
                self.register(&vm, i as u32, base, 0, false)
                    .and_then(|_| self.register(&vm, i as u32, base, size, layout.log_dirty))
                    .map_err(|_| NoMem)?;
            }
        }
        let mut leaves = Vec::new();
        let mut tables = Vec::new();
        self.collect(self.pml4, 3, 0, &mut leaves, &mut tables);
        let mut clean = std::mem::take(&mut self.free);
        for t in tables {
            self.release(t);
            clean.extend(self.free.pop());
        }
        clean.append(&mut self.clean);
        self.clean = clean;
        self.fresh.clear();
        self.pml4 = self.alloc_table()?;
        for (va, pte) in leaves {
            let at = self.leaf(va, true)?.ok_or(NoMem)?;
            self.write_u64(at, pte);
        }
        self.new_root = true;
        Ok(())
    }

    /// Every leaf entry (address, entry) and every table frame under `table` (at `level`,
    /// 3 = PML4) mapping addresses from `base`.
    fn collect(
        &self,
        table: u64,
        level: u32,
        base: u64,
        leaves: &mut Vec<(u64, u64)>,
        tables: &mut Vec<u64>,
    ) {
        tables.push(table);
        for i in 0..512u64 {
            let e = self.read_u64(table + i * 8);
            let mut va = base | (i << (12 + 9 * level));
            if level == 3 && i >= 256 {
                va |= 0xffff_0000_0000_0000;
            }
            if level == 0 {
                if e != 0 {
                    leaves.push((va, e));
                }
            } else if e & PTE_P != 0 {
                self.collect(e & ADDR_MASK, level - 1, va, leaves, tables);
            }
        }
    }

    /// A page-table frame no longer in the tree: zero it and keep it for data.
    fn retire(&mut self, frame: u64) {
        self.fresh.remove(&frame);
        self.release(frame);
    }

    /// Several vCPUs run on this memory (a guest's threads): a retired page table, or a frame
    /// unmapped by one thread, may still be reached by a vCPU that has not loaded the new root
    /// yet, so it is kept as it is (not zeroed, not reused) until
    /// [`GuestMem::release_retired`] (every running vCPU has). `false` releases what was kept.
    pub fn hold_retired(&mut self, on: bool) {
        match (on, self.held.is_some()) {
            (true, false) => self.held = Some(Vec::new()),
            (false, true) => self.release_retired(),
            _ => {}
        }
        if !on {
            self.held = None;
        }
    }

    /// Free the frames kept while [`GuestMem::hold_retired`] held them.
    pub fn release_retired(&mut self) {
        for f in self.held.as_mut().map(std::mem::take).unwrap_or_default() {
            self.zero_frame(f);
            self.free.push(f);
        }
    }

    /// Zero a frame, give its memory back to the host and put it on the free list (or keep it
    /// as it is while other vCPUs may still reach it: see `hold_retired`).
    fn release(&mut self, frame: u64) {
        if let Some(h) = self.held.as_mut() {
            h.push(frame);
            return;
        }
        self.zero_frame(frame);
        self.free.push(frame);
    }

    /// Zero a RAM frame by giving its memory back to the host (recorded as dirty).
    fn zero_frame(&self, frame: u64) {
        self.zero_frames(frame, PAGE);
    }

    /// Zero `len` bytes of RAM frames from `frame` (page aligned) in one host call.
    pub(crate) fn zero_frames(&self, frame: u64, len: u64) {
        debug_assert!(frame + len <= self.size && frame.is_multiple_of(PAGE));
        // SAFETY: as below, the range lies inside the guest mapping.
        let at = unsafe { self.host.add(frame as usize) };
        if crate::postcopy::zero_if_arriving(at, len as usize) {
            // (A page still on its way would otherwise land here later.)
            self.mark_dirty(frame, len);
            return;
        }
        // `[frame, frame + len)` lies below `size` (frames come from `bump`).
        // SAFETY: so the page-aligned host range lies inside the guest mapping we own; its
        // MADV_DONTNEED only replaces contents with zeroes, which no Rust reference observes.
        unsafe {
            libc::madvise(
                self.host.add(frame as usize) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            );
        }
        self.mark_dirty(frame, len);
    }

    /// Called before the vCPU runs: the page-table frames made so far are about to be seen by
    /// the MMU (so they are no longer fresh), and if the root moved, its new address to load
    /// into CR3.
    pub fn take_new_root(&mut self) -> Option<u64> {
        if !self.fresh.is_empty() {
            self.fresh.clear();
        }
        std::mem::take(&mut self.new_root).then_some(self.pml4)
    }

    /// Give the pages of `[va, end)` (page aligned) the rights of `access`, keeping their
    /// frames. O(mapped pages + tables looked at).
    pub fn protect(&mut self, va: u64, end: u64, access: Access) -> Result<(), NoMem> {
        let mut cur = va;
        while let Some(p) = self.next_mapped(cur, end) {
            let at = self.leaf(p, false)?.ok_or(NoMem)?;
            let old = self.read_u64(at);
            self.set_entry(p, at, (old & ADDR_MASK) | access.flags())?;
            cur = p + PAGE;
        }
        Ok(())
    }

    /// Unmap the pages of `[va, end)` (page aligned): their entries go, their frames are
    /// zeroed and go back to the free list (the time page's stays the VMM's: see
    /// [`guest::VVAR_KVA`]). O(mapped pages + tables looked at).
    pub fn unmap(&mut self, va: u64, end: u64) -> Result<(), NoMem> {
        let mut cur = va;
        let vvar = self.translate(guest::VVAR_KVA);
        while let Some(p) = self.next_mapped(cur, end) {
            let at = self.leaf(p, false)?.ok_or(NoMem)?;
            let frame = self.read_u64(at) & ADDR_MASK;
            self.set_entry(p, at, 0)?;
            if frame < self.size && Some(frame) != vvar {
                self.release(frame);
            }
            cur = p + PAGE;
        }
        Ok(())
    }

    /// The host address of the mapped guest word at `va` (guest RAM or a file window page),
    /// where the host's futex(2) can wait and wake on it for the guest: the same address for
    /// every thread of this process, and for a shared mapping the same file page as other
    /// processes'. None when `va` is not mapped.
    pub fn futex_addr(&self, va: u64) -> Option<u64> {
        let gpa = self.translate(va)?;
        if gpa + 4 <= self.size {
            return Some(self.host as u64 + gpa);
        }
        self.window.as_ref()?.host_addr(gpa)
    }

    /// Note in the dirty log that the VMM wrote the guest word at `va` through its host
    /// address (an atomic update of a futex word).
    pub fn mark_dirty_va(&self, va: u64) {
        if let Some(gpa) = self.translate(va).filter(|&g| g < self.size) {
            self.mark_dirty(gpa, 4);
        }
    }

    /// Translate a guest virtual address.
    pub fn translate(&self, va: u64) -> Option<u64> {
        let mut table = self.pml4;
        for level in (0..4).rev() {
            let idx = (va >> (12 + 9 * level)) & 0x1ff;
            let e = self.read_u64(table + idx * 8);
            if e & if level == 0 { PTE_HELD } else { PTE_P } == 0 {
                return None;
            }
            table = e & ADDR_MASK;
        }
        Some(table | (va & (PAGE - 1)))
    }

    /// The first mapped page at or after the page of `va`, below `end`. Unmapped page-table
    /// subtrees are skipped whole (512 GiB, 1 GiB, 2 MiB at a time), so the cost is the
    /// number of table entries looked at, not the size of the range.
    pub fn next_mapped(&self, va: u64, end: u64) -> Option<u64> {
        let mut cur = page_down(va);
        'walk: while cur < end {
            let mut table = self.pml4;
            for level in (0..4).rev() {
                let shift = 12 + 9 * level;
                let e = self.read_u64(table + ((cur >> shift) & 0x1ff) * 8);
                if e & if level == 0 { PTE_HELD } else { PTE_P } == 0 {
                    let span = 1u64 << shift;
                    cur = (cur & !(span - 1)).checked_add(span)?;
                    continue 'walk;
                }
                table = e & ADDR_MASK;
            }
            return Some(cur);
        }
        None
    }

    /// Pages mapped in `[va, end)`.
    pub fn mapped_pages(&self, va: u64, end: u64) -> u64 {
        let (mut n, mut cur) = (0, va);
        while let Some(p) = self.next_mapped(cur, end) {
            n += 1;
            cur = p + PAGE;
        }
        n
    }

    /// Whether the page at `va` is mapped.
    pub fn is_mapped(&self, va: u64) -> bool {
        self.translate(va).is_some()
    }

    /// Visit the guest physical pieces of `[va, va+len)`.
    fn for_each_piece(
        &self,
        va: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), Fault> {
        let mut done = 0usize;
        while done < len {
            let cur = va.checked_add(done as u64).ok_or(Fault(va))?;
            let gpa = self.translate(cur).ok_or(Fault(cur))?;
            let n = ((PAGE - (cur & (PAGE - 1))) as usize).min(len - done);
            f(gpa, done, n);
            done += n;
        }
        Ok(())
    }

    /// Check that the whole range is mapped.
    pub fn check_range(&self, va: u64, len: usize) -> Result<(), Fault> {
        let mut p = page_down(va);
        let end = va.checked_add(len as u64).ok_or(Fault(va))?;
        while p < end {
            let gpa = self.translate(p).ok_or(Fault(p.max(va)))?;
            // A file page past the end of its file is mapped but cannot be touched: find out
            // before a host call consumes data it could not deliver.
            if gpa >= self.size && !self.copy_from(gpa, &mut [0u8; 1]) {
                return Err(Fault(p.max(va)));
            }
            p += PAGE;
        }
        Ok(())
    }

    /// The host memory backing `[va, va+len)`, as runs of contiguous guest physical memory,
    /// marked dirty because the caller is about to write them (e.g. a file read straight into
    /// the guest). Nothing is returned unless the whole range is mapped.
    pub fn host_runs_for_write(&self, va: u64, len: usize) -> Result<Vec<(*mut u8, usize)>, Fault> {
        self.check_range(va, len)?;
        let mut runs: Vec<(u64, usize)> = Vec::new();
        let mut window = false;
        self.for_each_piece(va, len, |gpa, _, n| match runs.last_mut() {
            _ if gpa >= self.size => window = true,
            Some((g, l)) if *g + *l as u64 == gpa => *l += n,
            _ => runs.push((gpa, n)),
        })?;
        if window {
            // Window memory is only ever copied with fault handling (see `window`).
            return Err(Fault(va));
        }
        Ok(runs
            .into_iter()
            .map(|(gpa, n)| {
                self.mark_dirty(gpa, n as u64);
                // SAFETY: `gpa + n` lies inside the guest mapping (every frame comes from
                // `bump`, below `size`), so the offset stays inside it.
                (unsafe { self.host.add(gpa as usize) }, n)
            })
            .collect())
    }

    /// Copy guest virtual memory into `buf`.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.check_range(va, buf.len())?;
        let mut ok = true;
        self.for_each_piece(va, buf.len(), |gpa, off, n| {
            ok &= self.copy_from(gpa, &mut buf[off..off + n]);
        })?;
        if ok {
            Ok(())
        } else {
            Err(Fault(va))
        }
    }

    /// Copy `buf` into guest virtual memory (tracked in the dirty bitmap). Nothing is written
    /// unless the whole range is mapped.
    pub fn write(&self, va: u64, buf: &[u8]) -> Result<(), Fault> {
        self.check_range(va, buf.len())?;
        let mut ok = true;
        self.for_each_piece(va, buf.len(), |gpa, off, n| {
            ok &= self.copy_to(gpa, &buf[off..off + n]);
        })?;
        if ok {
            Ok(())
        } else {
            Err(Fault(va))
        }
    }

    /// Read a guest `u64`.
    pub fn read_u64_va(&self, va: u64) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Read a NUL-terminated string of at most `max` bytes (without the NUL).
    pub fn read_cstr(&self, va: u64, max: usize) -> Result<Vec<u8>, Fault> {
        let mut out = Vec::new();
        let mut cur = va;
        loop {
            let gpa = self.translate(cur).ok_or(Fault(cur))?;
            let n = (PAGE - (cur & (PAGE - 1))) as usize;
            let mut chunk = vec![0u8; n];
            if !self.copy_from(gpa, &mut chunk) {
                return Err(Fault(cur));
            }
            if let Some(z) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
            if out.len() > max {
                return Err(Fault(va));
            }
            cur += n as u64;
        }
    }

    /// Zero `[va, va+len)` where it is mapped. Whole pages go back to the host
    /// (`MADV_DONTNEED`); both are recorded as dirty.
    pub fn zero(&self, va: u64, len: u64) {
        let end = va.saturating_add(len);
        let mut cur = va;
        // Whole RAM frames that follow each other are zeroed in one host call.
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: &mut Option<(u64, u64)>| {
            if let Some((f, n)) = run.take() {
                self.zero_frames(f, n);
            }
        };
        // Only mapped pages are visited: a huge range with little mapped in it (a PROT_NONE
        // reservation of terabytes) costs what is mapped, as on Linux.
        while let Some(p) = self.next_mapped(cur, end) {
            cur = cur.max(p);
            let page_end = page_down(cur) + PAGE;
            let n = page_end.min(end) - cur;
            if let Some(gpa) = self.translate(cur) {
                if gpa >= self.size {
                    let _ = self.copy_to(gpa, &vec![0u8; n as usize]);
                } else if n == PAGE {
                    match run.as_mut() {
                        Some((f, len)) if *f + *len == gpa => *len += PAGE,
                        _ => {
                            flush(&mut run);
                            run = Some((gpa, PAGE));
                        }
                    }
                } else {
                    let _ = self
                        .mem
                        .write_slice(&vec![0u8; n as usize], GuestAddress(gpa));
                }
            }
            cur += n;
        }
        flush(&mut run);
    }

    /// Raw write at a guest physical address (descriptor tables at setup).
    pub fn write_phys(&self, gpa: u64, buf: &[u8]) {
        let _ = self.mem.write_slice(buf, GuestAddress(gpa));
    }

    /// Number of mapped guest pages in use (frames handed out, tables included).
    pub fn frames_used(&self) -> u64 {
        self.next_frame / PAGE
    }

    /// Host-side byte range of the guest memory region (for KVM registration).
    pub fn region_len(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }
}

/// Copy `buf.len()` bytes at `gpa` out of guest memory with one memcpy (vm-memory's
/// `read_slice` copies in volatile 8-byte steps, several times slower for whole pages).
fn copy_out(mem: &GuestMemoryMmap<AtomicBitmap>, gpa: u64, buf: &mut [u8]) -> bool {
    match mem.get_slice(GuestAddress(gpa), buf.len()) {
        Ok(s) => {
            s.copy_to_volatile_slice(vm_memory::VolatileSlice::from(buf));
            true
        }
        Err(_) => false,
    }
}

/// Copy `data` into guest memory at `gpa` with one memcpy, marking it dirty.
fn copy_in(mem: &GuestMemoryMmap<AtomicBitmap>, gpa: u64, data: &[u8]) -> bool {
    let Ok(s) = mem.get_slice(GuestAddress(gpa), data.len()) else {
        return false;
    };
    let g = s.ptr_guard_mut();
    // SAFETY: `s` spans `data.len()` bytes of the live guest mapping at `gpa` (get_slice
    // checked the range), and `data` is host memory outside it.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), g.as_ptr(), data.len()) };
    s.bitmap().mark_dirty(0, data.len());
    true
}

/// Guest memory seen from a migration thread: page reads, resident pages, the dirty log.
#[derive(Clone)]
pub struct MemView {
    mem: GuestMemoryMmap<AtomicBitmap>,
    shared: Arc<std::sync::Mutex<Layout>>,
    vm: Option<Arc<kvm_ioctls::VmFd>>,
}

impl MemView {
    /// Why the guest cannot leave its home node now, if it cannot.
    pub fn pinned(&self) -> Option<&'static str> {
        self.layout()
            .pinned
            .then_some("it holds a shared mapping (paper section 4.2)")
    }

    /// Bytes of guest physical memory handed out so far.
    pub fn used(&self) -> u64 {
        self.shared.lock().map(|l| l.used).unwrap_or(0)
    }

    /// Copy one guest page.
    pub fn read_page(&self, gpn: u64, buf: &mut [u8; PAGE as usize]) -> bool {
        copy_out(&self.mem, gpn * PAGE, buf)
    }

    /// Guest pages whose host memory has ever been touched (the rest are zero): the first
    /// pre-copy pass sends only these.
    pub fn resident_pages(&self) -> Vec<u64> {
        let used = self.used();
        let pages = (used / PAGE) as usize;
        let mut vec = vec![0u8; pages];
        let Ok(host) = self.mem.get_host_address(GuestAddress(0)) else {
            return Vec::new();
        };
        let (start, out) = (host as *mut libc::c_void, vec.as_mut_ptr());
        // SAFETY: `host..host+used` is the start of the guest mapping (used <= size), and
        // `vec` has one byte per page of it, as mincore requires.
        let r = unsafe { libc::mincore(start, used as usize, out) };
        if r != 0 {
            return (0..pages as u64).collect();
        }
        vec.iter()
            .enumerate()
            .filter(|(_, &v)| v & 1 != 0)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// Turn KVM dirty logging on for every slot (and for slots added later), and start the
    /// VMM's own bitmap afresh.
    pub fn start_dirty_log(&self) -> anyhow::Result<()> {
        self.set_dirty_log(true)?;
        for r in self.mem.iter() {
            std::ops::Deref::deref(r).bitmap().reset();
        }
        Ok(())
    }

    /// Turn KVM dirty logging off again (a migration that did not happen).
    pub fn stop_dirty_log(&self) -> anyhow::Result<()> {
        self.set_dirty_log(false)
    }

    fn set_dirty_log(&self, on: bool) -> anyhow::Result<()> {
        let vm = self.vm.as_ref().ok_or_else(|| anyhow::anyhow!("no VM"))?;
        let mut layout = self
            .shared
            .lock()
            .map_err(|_| anyhow::anyhow!("layout lock"))?;
        layout.log_dirty = on;
        let host = self.mem.get_host_address(GuestAddress(0))?;
        for (i, &(base, size)) in layout.slots.iter().enumerate() {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: i as u32,
                flags: if on {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: base,
                memory_size: size,
                userspace_addr: host as u64 + base,
            };
            // SAFETY: same region as registered before, only the flags change.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| anyhow::anyhow!("switching the dirty log: {e}"))?;
        }
        Ok(())
    }

    /// Bytes of guest physical memory (the `--mem` size).
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Pages dirtied since the last call (or since logging started): KVM's dirty log (guest
    /// writes) OR'd with the VMM's own bitmap (its writes into the guest).
    pub fn take_dirty(&self) -> anyhow::Result<Vec<u64>> {
        let vm = self.vm.as_ref().ok_or_else(|| anyhow::anyhow!("no VM"))?;
        let layout = self.layout();
        let mut bits: Vec<u64> = vec![
            0;
            (layout.slots.iter().map(|s| s.0 + s.1).max().unwrap_or(0) / PAGE).div_ceil(64)
                as usize
        ];
        for (i, &(base, size)) in layout.slots.iter().enumerate() {
            let log = vm
                .get_dirty_log(i as u32, size as usize)
                .map_err(|e| anyhow::anyhow!("KVM_GET_DIRTY_LOG: {e}"))?;
            let first = base / PAGE;
            for (w, word) in log.iter().enumerate() {
                let mut word = *word;
                while word != 0 {
                    let b = word.trailing_zeros() as u64;
                    word &= word - 1;
                    let gpn = first + w as u64 * 64 + b;
                    if let Some(slot) = bits.get_mut((gpn / 64) as usize) {
                        *slot |= 1 << (gpn % 64);
                    }
                }
            }
        }
        for r in self.mem.iter() {
            for (w, word) in std::ops::Deref::deref(r)
                .bitmap()
                .get_and_reset()
                .iter()
                .enumerate()
            {
                if let Some(slot) = bits.get_mut(w) {
                    *slot |= *word;
                }
            }
        }
        let used_pages = self.used() / PAGE;
        let mut out = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                let gpn = w as u64 * 64 + b;
                if gpn < used_pages {
                    out.push(gpn);
                }
            }
        }
        Ok(out)
    }

    fn layout(&self) -> Layout {
        self.shared.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_translate_roundtrip() {
        let mut m = GuestMem::new(1 << 22).unwrap();
        let va = 0x7fff_ffff_e000;
        assert!(m.translate(va).is_none());
        let (gpa, fresh) = m.map_page(va, Access::User).unwrap();
        assert!(fresh);
        assert_eq!(m.translate(va + 0x123), Some(gpa + 0x123));
        let (gpa2, fresh2) = m.map_page(va, Access::User).unwrap();
        assert_eq!((gpa2, fresh2), (gpa, false));
        // A neighbouring page in another PML4 slot is still unmapped.
        assert!(m.translate(0x4000_0000).is_none());
    }

    #[test]
    fn read_write_across_pages_and_faults() {
        let mut m = GuestMem::new(1 << 22).unwrap();
        m.map_page(0x10000, Access::User).unwrap();
        m.map_page(0x11000, Access::User).unwrap();
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        m.write(0x10800, &data).unwrap();
        let mut back = vec![0u8; 6000];
        m.read(0x10800, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(m.write(0x11800, &data), Err(Fault(0x12000)));
        assert!(m.read_cstr(0x10800, 10).is_err() || data[..10].contains(&0));
        m.zero(0x10000, 2 * PAGE);
        m.read(0x10800, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn pages_for_the_stub_use_the_expected_bits() {
        let mut m = GuestMem::new(1 << 22).unwrap();
        let (g1, _) = m.map_page(guest::STUB_VA, Access::UserReadOnly).unwrap();
        let pte_addr = m.leaf(guest::STUB_VA, false).unwrap().unwrap();
        assert_eq!(m.read_u64(pte_addr), g1 | PTE_HELD | PTE_P | PTE_US);
    }

    #[test]
    fn endless_protection_flips_reuse_page_table_frames() {
        // 1 MiB of guest memory; every flip to read-only copies up to four tables.
        let mut m = GuestMem::new(1 << 20).unwrap();
        let va = 0x4000_0000;
        m.map_page(va, Access::User).unwrap();
        m.write(va, b"kept").unwrap();
        let far = 0x7fff_0000_0000;
        m.map_page(far, Access::User).unwrap();
        for i in 0..5000 {
            m.protect(va, va + PAGE, Access::Prot(1))
                .unwrap_or_else(|_| panic!("flip {i}: out of frames"));
            m.take_new_root();
            m.protect(va, va + PAGE, Access::Prot(3)).unwrap();
        }
        let mut b = [0u8; 4];
        m.read(va, &mut b).unwrap();
        assert_eq!(&b, b"kept");
        assert!(m.is_mapped(far), "other mappings survive the rebuilds");
        let at = m.leaf(va, false).unwrap().unwrap();
        assert_eq!(m.read_u64(at) & (PTE_P | PTE_RW), PTE_P | PTE_RW);
    }

    #[test]
    fn out_of_frames_is_reported() {
        let mut m = GuestMem::new(64 * PAGE).unwrap();
        let mut n = 0;
        while m.map_page(0x1000_0000 + n * PAGE, Access::User).is_ok() {
            n += 1;
        }
        assert!(n > 50 && n < 64, "mapped {n}");
    }
}
