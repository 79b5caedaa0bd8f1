//! vCPU state capture and restore, in the order KVM needs it (CPUID first, then mp state,
//! registers, system registers, FPU/XSAVE, XCRs, MSRs, pending events), as one serialisable
//! value. The VMM's own state (address space, signals, limits) lives in `vm::VmmState`.

use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// MSRs that make up a user-mode guest's CPU state.
pub const SAVED_MSRS: [u32; 10] = [
    0x10,        // IA32_TSC
    0x277,       // IA32_PAT
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
];

/// Everything KVM holds for one vCPU of a mosvm guest.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX/AVX-512 state.
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// (index, value) of [`SAVED_MSRS`].
    pub msrs: Vec<(u32, u64)>,
    /// Runnable / halted.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupt shadow, NMI state.
    pub events: kvm_vcpu_events,
}

/// Read the vCPU's state. Registers changed through `kvm_run`'s sync area and not yet loaded
/// by a KVM_RUN are applied first, so nothing the VMM wrote is lost.
pub fn capture(vcpu: &mut VcpuFd) -> Result<VcpuState> {
    let pending = vcpu.get_kvm_run().kvm_dirty_regs;
    if pending & kvm_bindings::KVM_SYNC_X86_REGS as u64 != 0 {
        let regs = vcpu.sync_regs_mut().regs;
        vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    }
    vcpu.get_kvm_run().kvm_dirty_regs = 0;
    let mut msrs = Msrs::from_entries(
        &SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    let n = vcpu.get_msrs(&mut msrs).context("KVM_GET_MSRS")?;
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().context("KVM_GET_MP_STATE")?,
        regs: vcpu.get_regs().context("KVM_GET_REGS")?,
        sregs: vcpu.get_sregs().context("KVM_GET_SREGS")?,
        xsave: vcpu.get_xsave().context("KVM_GET_XSAVE")?,
        xcrs: vcpu.get_xcrs().context("KVM_GET_XCRS")?,
        msrs: msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect(),
        events: vcpu.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
    })
}

/// Load a captured state into a freshly created vCPU (whose CPUID is already set).
pub fn restore(vcpu: &mut VcpuFd, st: &VcpuState) -> Result<()> {
    vcpu.set_mp_state(st.mp_state).context("KVM_SET_MP_STATE")?;
    vcpu.set_regs(&st.regs).context("KVM_SET_REGS")?;
    vcpu.set_sregs(&st.sregs).context("KVM_SET_SREGS")?;
    // SAFETY: `st.xsave` is a complete kvm_xsave captured by KVM_GET_XSAVE on a vCPU with the
    // same CPUID; KVM validates its contents.
    unsafe { vcpu.set_xsave(&st.xsave) }.context("KVM_SET_XSAVE")?;
    vcpu.set_xcrs(&st.xcrs).context("KVM_SET_XCRS")?;
    crate::cpu::set_msrs(vcpu, &st.msrs)?;
    vcpu.set_vcpu_events(&st.events)
        .context("KVM_SET_VCPU_EVENTS")?;
    Ok(())
}
