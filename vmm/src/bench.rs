//! Reference measurements taken with the same VM setup the real guests use, so benchmarks can
//! put mosvm's costs side by side with the platform's floor in one run.

use crate::cpu;
use crate::memory::{Access, GuestMem};
use anyhow::{bail, Result};
use kvm_ioctls::VcpuExit;
use std::time::Instant;

/// Guest address of the loop's code page.
const CODE_VA: u64 = 0x40_0000;

/// Nanoseconds per bare VM exit round trip: ring-3 guest code doing `out` to the syscall
/// port in a loop, the VMM re-entering at once (no syscall work, no register access).
pub fn bare_exit_ns(n: u64) -> Result<f64> {
    let host = cpu::host()?;
    let mut mem = GuestMem::new(16 << 20)?;
    cpu::install_stub(&mut mem)?;
    let (gpa, _) = mem
        .map_page(CODE_VA, Access::User)
        .map_err(|_| anyhow::anyhow!("no memory"))?;
    // out %al, $SYSCALL_PORT ; jmp back to the out
    mem.write_phys(gpa, &[0xe6, guest::SYSCALL_PORT, 0xeb, 0xfc]);
    let vm = cpu::create_vm(host, &mut mem)?;
    let mut vcpu = cpu::create_vcpu(host, &vm, &mem, CODE_VA, 0)?;
    // Warm up (first exits fault in the code page).
    for _ in 0..100 {
        vcpu.run()?;
    }
    let t = Instant::now();
    for _ in 0..n {
        match vcpu.run()? {
            VcpuExit::IoOut(p, _) if p == guest::SYSCALL_PORT as u16 => {}
            other => bail!("unexpected exit {other:?}"),
        }
    }
    Ok(t.elapsed().as_nanos() as f64 / n as f64)
}
