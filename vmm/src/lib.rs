//! The mosvm micro-VM: one KVM VM and vCPU running one unmodified Linux x86-64 program in
//! ring 3. This crate owns guest memory and page tables (`memory`), the address space (`mm`),
//! the ELF loader (`loader`), vCPU setup (`cpu`), the syscall table and its local handlers
//! (`syscalls`), the deputy that runs home-dependent calls against the host (`deputy`), and the
//! run loop (`vm`).

pub mod bench;
pub mod cpu;
pub mod deputy;
pub mod forward;
pub mod loader;
pub mod memory;
pub mod mm;
pub mod sigframe;
pub mod snapshot;
pub mod table;
pub mod vm;
pub mod window;
