//! KVM VM and vCPU setup: the memory slot, descriptor tables, long mode, the syscall MSRs,
//! CPUID, XCR0 and the initial FPU state, so that a program starts in ring 3 exactly as it would
//! on Linux (and glibc/musl pick their usual SSE/AVX code paths).

use crate::memory::{Access, GuestMem, PAGE};
use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_segment, kvm_xcrs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuFd, VmFd};
use std::sync::{Arc, OnceLock};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// The host's KVM handle and supported CPUID, opened once per process.
pub struct Host {
    /// /dev/kvm.
    pub kvm: Kvm,
    /// KVM_GET_SUPPORTED_CPUID, kept between runs (see `cpuid_cache`).
    pub cpuid: CpuId,
}

static HOST: OnceLock<std::result::Result<Host, String>> = OnceLock::new();

/// Open /dev/kvm (once).
pub fn host() -> Result<&'static Host> {
    HOST.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        let cpuid = match crate::cpuid_cache::load() {
            Some(c) => c,
            None => {
                let c = kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
                crate::cpuid_cache::store(&c);
                c
            }
        };
        Ok(Host { kvm, cpuid })
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A VM with one vCPU, held for as long as the value lives (a node holds one). KVM patches
/// its own code (static keys, with a call to every CPU) when the first vCPU of its kind comes
/// and when the last goes; while this one is there, guests on this host start and end
/// without that (about 0.5 ms of each run measured here).
pub fn keeper() -> Result<(VmFd, VcpuFd)> {
    let vm = host()?.kvm.create_vm().context("KVM_CREATE_VM")?;
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    Ok((vm, vcpu))
}

/// Create the VM and attach guest memory to it (its memory slots grow with use).
pub fn create_vm(host: &Host, mem: &mut GuestMem) -> Result<Arc<VmFd>> {
    let vm = Arc::new(host.kvm.create_vm().context("KVM_CREATE_VM")?);
    mem.attach(vm.clone())?;
    Ok(vm)
}

/// Write the GDT, IDT, TSS and stub pages and map them, and the time page's frame, at their
/// fixed guest addresses.
pub fn install_stub(mem: &mut GuestMem) -> Result<()> {
    let nomem = || anyhow::anyhow!("guest memory too small for the stub");
    let mut gdt = [0u8; 4096];
    for (i, d) in guest::GDT.iter().enumerate() {
        gdt[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    // 16-byte TSS descriptor at selector 0x30.
    let base = guest::TSS_VA;
    let limit = (guest::TSS_SIZE + guest::IOMAP_SIZE - 1) as u64;
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89u64 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let hi = base >> 32;
    let t = guest::TSS_SEL as usize;
    gdt[t..t + 8].copy_from_slice(&lo.to_le_bytes());
    gdt[t + 8..t + 16].copy_from_slice(&hi.to_le_bytes());

    let mut idt = [0u8; 4096];
    for v in 0..guest::EXCEPTION_VECTORS {
        let h = guest::exception_handler(v);
        let lo = (h & 0xffff)
            | ((guest::KERNEL_CS as u64) << 16)
            | (0x8eu64 << 40)
            | (((h >> 16) & 0xffff) << 48);
        let hi = h >> 32;
        idt[v * 16..v * 16 + 8].copy_from_slice(&lo.to_le_bytes());
        idt[v * 16 + 8..v * 16 + 16].copy_from_slice(&hi.to_le_bytes());
    }
    let pages: [(u64, Access, Option<[u8; 4096]>); 5] = [
        (guest::GDT_VA, Access::Supervisor, Some(gdt)),
        (guest::IDT_VA, Access::Supervisor, Some(idt)),
        (guest::TSS_VA, Access::Supervisor, Some(guest::tss_page())),
        (
            guest::STUB_VA,
            Access::UserReadOnly,
            Some(guest::stub_page()),
        ),
        // The time page's frame (zero: invalid until the VMM first writes it).
        (guest::VVAR_KVA, Access::Supervisor, None),
    ];
    for (va, access, content) in pages {
        let (gpa, _) = mem.map_page(va, access).map_err(|_| nomem())?;
        if let Some(c) = content {
            mem.write_phys(gpa, &c);
        }
    }
    let mut p = guest::EXC_STACK_VA;
    while p < guest::EXC_STACK_VA + guest::EXC_STACK_SIZE {
        mem.map_page(p, Access::Supervisor).map_err(|_| nomem())?;
        p += PAGE;
    }
    Ok(())
}

/// Give vCPU `index` (from 1) of a multi-threaded guest its own TSS and exception stack
/// (supervisor pages mapped on first use): returns the TSS's address, for TR's base, and the
/// top of the stack (its rsp0).
pub fn thread_tss(mem: &mut GuestMem, index: u64) -> Result<(u64, u64)> {
    let nomem = || anyhow::anyhow!("guest memory too small for another thread");
    let tss = guest::THREAD_TSS_VA + index * guest::THREAD_TSS_STRIDE;
    let stack = guest::THREAD_STACK_VA + index * guest::THREAD_STACK_SIZE;
    let top = stack + guest::THREAD_STACK_SIZE;
    for va in [tss, stack] {
        mem.map_page(va & !(PAGE - 1), Access::Supervisor)
            .map_err(|_| nomem())?;
    }
    let mut t = guest::tss_page();
    t[4..12].copy_from_slice(&top.to_le_bytes());
    let len = guest::TSS_SIZE + guest::IOMAP_SIZE;
    let gpa = mem.translate(tss).ok_or_else(nomem)?;
    mem.write_phys(gpa, &t[..len]);
    Ok((tss, top))
}

fn seg(selector: u16, type_: u8, dpl: u8, l: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: if l == 1 { 0 } else { 1 },
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The XCR0 value the guest runs with: every state component KVM supports.
pub fn guest_xcr0(host: &Host) -> u64 {
    host.cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| (e.eax as u64) | ((e.edx as u64) << 32))
        .unwrap_or(0x3)
        & 0xff
        | 0x3
}

/// Bytes of the guest's XSAVE image in standard format for its XCR0 (CPUID leaf 0xd): what
/// a signal frame holds of the FPU/SSE/AVX state (`fpu_user_cfg.max_size` in Linux).
pub fn xstate_size(host: &Host) -> u64 {
    let xcr0 = guest_xcr0(host);
    host.cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function == 0xd && (2..63).contains(&e.index))
        .filter(|e| xcr0 & (1 << e.index) != 0)
        .map(|e| e.ebx as u64 + e.eax as u64)
        .fold(576, u64::max)
}

/// AT_HWCAP: CPUID leaf 1 EDX as the guest's own `cpuid` instruction reports it. Ring-3
/// CPUID is not intercepted on every KVM, so the host's value (not KVM's supported mask) is what
/// the program sees, and what Linux reports natively.
pub fn hwcap() -> u64 {
    std::arch::x86_64::__cpuid(1).edx as u64
}

/// Write (index, value) MSRs to the vCPU; every one must be accepted.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[(u32, u64)]) -> Result<()> {
    let msrs = Msrs::from_entries(
        &entries
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    let n = vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    anyhow::ensure!(
        n == entries.len(),
        "KVM_SET_MSRS set only {n} of {} MSRs",
        entries.len()
    );
    Ok(())
}

/// Create and configure the vCPU to start at `entry` with stack `rsp`, in ring 3.
pub fn create_vcpu(host: &Host, vm: &VmFd, mem: &GuestMem, entry: u64, rsp: u64) -> Result<VcpuFd> {
    create_vcpu_id(host, vm, mem, 0, entry, rsp)
}

/// Like [`create_vcpu`], with KVM vCPU id `id` (the threads of a guest after the first).
pub fn create_vcpu_id(
    host: &Host,
    vm: &VmFd,
    mem: &GuestMem,
    id: u64,
    entry: u64,
    rsp: u64,
) -> Result<VcpuFd> {
    let mut vcpu = vm.create_vcpu(id).context("KVM_CREATE_VCPU")?;
    vcpu.set_cpuid2(&host.cpuid).context("KVM_SET_CPUID2")?;

    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.cr3 = mem.cr3();
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    sregs.gdt.base = guest::GDT_VA;
    sregs.gdt.limit = guest::TSS_SEL + 16 - 1;
    sregs.idt.base = guest::IDT_VA;
    sregs.idt.limit = (guest::EXCEPTION_VECTORS * 16 - 1) as u16;
    sregs.cs = seg(guest::USER_CS, 11, 3, 1, 1);
    let data = seg(guest::USER_SS, 3, 3, 0, 1);
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    let mut null = data;
    null.selector = 0;
    sregs.fs = null;
    sregs.gs = null;
    sregs.tr = kvm_segment {
        base: guest::TSS_VA,
        limit: (guest::TSS_SIZE + guest::IOMAP_SIZE - 1) as u32,
        selector: guest::TSS_SEL,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;

    let entries = [
        (MSR_EFER, sregs.efer),
        (MSR_STAR, guest::STAR),
        (MSR_LSTAR, guest::SYSCALL_ENTRY),
        (MSR_CSTAR, guest::SYSCALL_ENTRY),
        (MSR_SFMASK, guest::SFMASK),
        (MSR_FS_BASE, 0),
        (MSR_KERNEL_GS_BASE, 0),
    ];
    set_msrs(&vcpu, &entries)?;

    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = guest_xcr0(host);
    vcpu.set_xcrs(&xcrs).context("KVM_SET_XCRS")?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;

    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp,
        rflags: 0x202,
        ..regs
    };
    regs.rax = 0;
    regs.rdx = 0;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;

    vcpu.set_sync_valid_reg(SyncReg::Register);
    Ok(vcpu)
}

/// The guest's clock as its vCPU's TSC gives it: KVM's TSC offset (the guest's TSC, read with
/// KVM_GET_MSRS between two readings of the host's, minus theirs; an offset inside that
/// window is taken as none, as on hosts where the guest reads the host's TSC) and its rate
/// (KVM_GET_TSC_KHZ). None when the host TSC cannot carry time (not invariant) or KVM will
/// not say: the guest's clock calls then all make their system call.
pub fn guest_clock(vcpu: &VcpuFd) -> Option<crate::clock::GuestClock> {
    use crate::clock::{host_tsc, tsc_usable, GuestClock};
    if !tsc_usable() {
        return None;
    }
    let khz = u64::from(vcpu.get_tsc_khz().ok()?);
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    let h0 = host_tsc();
    let n = vcpu.get_msrs(&mut m).ok()?;
    let h1 = host_tsc();
    if n != 1 || khz == 0 {
        return None;
    }
    let guest = m.as_slice()[0].data;
    let offset = if (h0..=h1).contains(&guest) {
        0
    } else {
        guest.wrapping_sub(h0 + (h1 - h0) / 2)
    };
    Some(GuestClock::new(offset, khz))
}
