//! What runs inside a mosvm micro-VM besides the program itself: the ring-0 stub (the syscall
//! entry at MSR_LSTAR and the exception vectors), the hypercall ABI it shares with the VMM, and
//! the guest's fixed virtual layout (where the descriptor tables, the stub and the exception
//! stack live).
//!
//! The stub is a handful of hand-assembled instructions, kept tiny on purpose: on nested KVM
//! (KVM-PVM) guest ring-0 code is emulated one instruction at a time, and there the `syscall`
//! target even runs at CPL 3. Every entry leaves through an `out` to a hypercall port, so each
//! guest syscall costs exactly one VM exit; the VMM does the rest.
//!
//! ABI (shared with `vmm`):
//! - `out %al, $SYSCALL_PORT` at [`SYSCALL_ENTRY`]: a guest `syscall`. The VMM reads rax, rdi,
//!   rsi, rdx, r10, r8, r9 and returns by writing rax. If the vCPU is still at CPL 3 when the
//!   exit happens (KVM-PVM), the VMM also performs the return itself (rip = rcx, rflags = r11);
//!   otherwise (hardware KVM, CPL 0) the stub's `sysretq` that follows does it.
//! - `out %al, $(EXCEPTION_PORT_BASE + v)` at the vector-`v` handler: guest exception `v`,
//!   with the CPU's exception frame on the ring-0 stack at rsp. If the VMM resumes the guest,
//!   the handler drops the error code (where the vector has one) and returns with `iretq`.

#![no_std]

/// Port of the syscall hypercall.
pub const SYSCALL_PORT: u8 = 0x10;
/// Port of the exception hypercall for vector 0; vector `v` uses `EXCEPTION_PORT_BASE + v`.
pub const EXCEPTION_PORT_BASE: u8 = 0x20;
/// Number of exception vectors handled (0..32).
pub const EXCEPTION_VECTORS: usize = 32;

/// Guest virtual base of the stub's area (top of the address space, PML4 slot 511).
pub const KERNEL_BASE: u64 = 0xffff_ff80_0000_0000;
/// The GDT page.
pub const GDT_VA: u64 = KERNEL_BASE;
/// The IDT page.
pub const IDT_VA: u64 = KERNEL_BASE + 0x1000;
/// The TSS page (TSS followed by its I/O permission bitmap).
pub const TSS_VA: u64 = KERNEL_BASE + 0x2000;
/// The stub code page: user-readable, read-only, executable.
pub const STUB_VA: u64 = KERNEL_BASE + 0x3000;
/// Bottom of the ring-0 exception stack.
pub const EXC_STACK_VA: u64 = KERNEL_BASE + 0x4000;
/// Size of the ring-0 exception stack.
pub const EXC_STACK_SIZE: u64 = 0x2000;
/// Number of 4 KiB pages in the stub's area.
pub const KERNEL_PAGES: u64 = 6;
/// The time page's own supervisor mapping: it holds the page's frame for the VMM, whatever
/// the program does with its user mapping (`[vvar]`, see [`vvar`]).
pub const VVAR_KVA: u64 = KERNEL_BASE + 0x8000;

/// The guest's vDSO: an ELF shared object built from `vdso/vdso.c` and `vdso/vdso.lds` at
/// build time, mapped into every program right above its time page and announced with
/// AT_SYSINFO_EHDR (vdso(7)). It exports `__vdso_clock_gettime`, `__vdso_gettimeofday`,
/// `__vdso_time`, `__vdso_clock_getres` and `__vdso_getcpu` at version LINUX_2.6.
pub static VDSO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vdso.so"));

/// The time page (`[vvar]`) the vDSO reads, one page below the vDSO image: byte offsets of
/// its little-endian fields (the C side is `struct vvar` in `vdso/vdso.c`). The VMM writes it
/// as a seqcount: `SEQ` odd while a write is under way.
pub mod vvar {
    /// u32: the sequence count.
    pub const SEQ: usize = 0;
    /// u32: flags ([`VALID`]).
    pub const FLAGS: usize = 4;
    /// u64: the guest TSC the bases below are taken at.
    pub const TSC_BASE: usize = 8;
    /// u64: guest CLOCK_MONOTONIC at `TSC_BASE`, ns.
    pub const MONO_NS: usize = 16;
    /// u64: CLOCK_MONOTONIC ns per TSC tick, 32.32 fixed point.
    pub const MONO_MULT: usize = 24;
    /// u64: guest CLOCK_MONOTONIC_RAW at `TSC_BASE`, ns.
    pub const RAW_NS: usize = 32;
    /// u64: CLOCK_MONOTONIC_RAW ns per TSC tick, 32.32 fixed point.
    pub const RAW_MULT: usize = 40;
    /// i64: CLOCK_REALTIME minus CLOCK_MONOTONIC, ns.
    pub const REALTIME_OFF: usize = 48;
    /// i64: CLOCK_BOOTTIME minus CLOCK_MONOTONIC, ns.
    pub const BOOTTIME_OFF: usize = 56;
    /// i64: CLOCK_TAI minus CLOCK_REALTIME, ns.
    pub const TAI_OFF: usize = 64;
    /// u64: resolution of CLOCK_REALTIME_COARSE and CLOCK_MONOTONIC_COARSE, ns.
    pub const COARSE_RES_NS: usize = 72;
    /// u32: what getcpu(2) reports as the CPU.
    pub const CPU: usize = 80;
    /// u32: what getcpu(2) reports as the NUMA node.
    pub const NODE: usize = 84;
    /// `FLAGS` bit: the clock fields hold; clear, every call goes to the system call.
    pub const VALID: u32 = 1;
}

/// Kernel code segment selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_SS: u16 = 0x10;
/// User data segment selector (RPL 3), as `sysretq` computes it from STAR.
pub const USER_SS: u16 = 0x23;
/// User 64-bit code segment selector (RPL 3), as `sysretq` computes it from STAR.
pub const USER_CS: u16 = 0x2b;
/// Task-state segment selector.
pub const TSS_SEL: u16 = 0x30;

/// GDT entries: null, kernel code, kernel data, user code32 (unused), user data, user code64,
/// then the 16-byte TSS descriptor, whose base and limit the VMM fills in.
pub const GDT: [u64; 6] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: kernel code, 64-bit, DPL 0, accessed
    0x00cf_9300_0000_ffff, // 0x10: kernel data, DPL 0, accessed
    0x00cf_fb00_0000_ffff, // 0x18: user code 32-bit (STAR base), DPL 3
    0x00cf_f300_0000_ffff, // 0x20: user data, DPL 3, accessed
    0x00af_fb00_0000_ffff, // 0x28: user code, 64-bit, DPL 3, accessed
];

/// MSR_STAR: sysret base 0x18 (user SS 0x23, CS 0x2b), syscall CS 0x08.
pub const STAR: u64 = (0x18u64 << 48) | (0x08u64 << 32);
/// MSR_SFMASK: clear TF, IF, DF, IOPL, NT, AC on `syscall`.
pub const SFMASK: u64 = 0x47700;

/// Offset of the syscall entry in the stub page.
pub const SYSCALL_ENTRY_OFFSET: u64 = 0;
/// Guest virtual address of the syscall entry (MSR_LSTAR).
pub const SYSCALL_ENTRY: u64 = STUB_VA + SYSCALL_ENTRY_OFFSET;
/// Offset of the first exception handler in the stub page.
pub const EXCEPTION_OFFSET: u64 = 0x100;
/// Bytes between consecutive exception handlers.
pub const EXCEPTION_STRIDE: u64 = 16;

/// Whether the CPU pushes an error code for exception vector `v`.
pub const fn has_error_code(v: usize) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// Guest virtual address of the handler for exception vector `v`.
pub const fn exception_handler(v: usize) -> u64 {
    STUB_VA + EXCEPTION_OFFSET + v as u64 * EXCEPTION_STRIDE
}

const OUT_AL_IMM8: u8 = 0xe6;
const SYSRETQ: [u8; 3] = [0x48, 0x0f, 0x07];
const ADD_RSP_8: [u8; 4] = [0x48, 0x83, 0xc4, 0x08];
const IRETQ: [u8; 2] = [0x48, 0xcf];
const UD2: [u8; 2] = [0x0f, 0x0b];

/// The stub page's contents: syscall entry at offset 0, exception handlers from
/// [`EXCEPTION_OFFSET`], `ud2` everywhere else.
pub const fn stub_page() -> [u8; 4096] {
    let mut p = [0u8; 4096];
    // ud2 filler: a stray jump into the page faults instead of running anything.
    let mut i = 0;
    while i + 1 < 4096 {
        p[i] = UD2[0];
        p[i + 1] = UD2[1];
        i += 2;
    }
    p[0] = OUT_AL_IMM8;
    p[1] = SYSCALL_PORT;
    p[2] = SYSRETQ[0];
    p[3] = SYSRETQ[1];
    p[4] = SYSRETQ[2];
    let mut v = 0;
    while v < EXCEPTION_VECTORS {
        let mut o = (EXCEPTION_OFFSET + v as u64 * EXCEPTION_STRIDE) as usize;
        p[o] = OUT_AL_IMM8;
        p[o + 1] = EXCEPTION_PORT_BASE + v as u8;
        o += 2;
        if has_error_code(v) {
            let mut k = 0;
            while k < 4 {
                p[o + k] = ADD_RSP_8[k];
                k += 1;
            }
            o += 4;
        }
        p[o] = IRETQ[0];
        p[o + 1] = IRETQ[1];
        v += 1;
    }
    p
}

/// The TSSs of a multi-threaded guest's other vCPUs: vCPU `i` (from 1) has its own at
/// `THREAD_TSS_VA + i * THREAD_TSS_STRIDE` (its exceptions need a stack of their own).
pub const THREAD_TSS_VA: u64 = KERNEL_BASE + 0x10_0000;
/// Bytes between two vCPUs' TSSs (a TSS with its I/O bitmap fits).
pub const THREAD_TSS_STRIDE: u64 = 256;
/// vCPU `i`'s exception stack ends at `THREAD_STACK_VA + (i + 1) * THREAD_STACK_SIZE`.
pub const THREAD_STACK_VA: u64 = KERNEL_BASE + 0x20_0000;
/// Bytes of exception stack per extra vCPU (an exception frame and nothing more).
pub const THREAD_STACK_SIZE: u64 = 1024;

/// Size of the TSS proper (before the I/O bitmap).
pub const TSS_SIZE: usize = 104;
/// Bytes of I/O bitmap: covers ports 0..=255, plus the terminating 0xff byte.
pub const IOMAP_SIZE: usize = 33;

/// The TSS page's contents: rsp0 at the top of the exception stack and an I/O bitmap that grants
/// ring 3 only the syscall port (needed where the LSTAR target runs at CPL 3).
pub const fn tss_page() -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let rsp0 = EXC_STACK_VA + EXC_STACK_SIZE;
    let mut k = 0;
    while k < 8 {
        p[4 + k] = (rsp0 >> (8 * k)) as u8;
        k += 1;
    }
    // I/O map base (offset 102, 16 bits).
    p[102] = TSS_SIZE as u8;
    p[103] = 0;
    let mut i = 0;
    while i < IOMAP_SIZE {
        p[TSS_SIZE + i] = 0xff;
        i += 1;
    }
    let port = SYSCALL_PORT as usize;
    p[TSS_SIZE + port / 8] &= !(1u8 << (port % 8));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_entry_is_out_then_sysret() {
        let p = stub_page();
        assert_eq!(&p[0..5], &[0xe6, SYSCALL_PORT, 0x48, 0x0f, 0x07]);
    }

    #[test]
    fn handlers_fit_their_stride_and_pop_error_codes() {
        let p = stub_page();
        for v in 0..EXCEPTION_VECTORS {
            let o = (EXCEPTION_OFFSET + v as u64 * EXCEPTION_STRIDE) as usize;
            assert_eq!(p[o], 0xe6);
            assert_eq!(p[o + 1], EXCEPTION_PORT_BASE + v as u8);
            let tail = if has_error_code(v) {
                &p[o + 2..o + 8]
            } else {
                &p[o + 2..o + 4]
            };
            let want: &[u8] = if has_error_code(v) {
                &[0x48, 0x83, 0xc4, 0x08, 0x48, 0xcf]
            } else {
                &[0x48, 0xcf]
            };
            assert_eq!(tail, want, "vector {v}");
        }
        let last = exception_handler(EXCEPTION_VECTORS) - STUB_VA;
        assert!(last <= 4096);
    }

    #[test]
    fn tss_grants_only_the_syscall_port() {
        let t = tss_page();
        let bitmap = &t[TSS_SIZE..TSS_SIZE + IOMAP_SIZE];
        for port in 0..256usize {
            let denied = bitmap[port / 8] & (1 << (port % 8)) != 0;
            assert_eq!(denied, port != SYSCALL_PORT as usize, "port {port}");
        }
        assert_eq!(bitmap[32], 0xff);
        let rsp0 = u64::from_le_bytes(t[4..12].try_into().unwrap());
        assert_eq!(rsp0, EXC_STACK_VA + EXC_STACK_SIZE);
    }

    #[test]
    fn selectors_match_star() {
        let base = (STAR >> 48) as u16;
        assert_eq!((base + 16) | 3, USER_CS);
        assert_eq!((base + 8) | 3, USER_SS);
        assert_eq!((STAR >> 32) as u16, KERNEL_CS);
    }
}
