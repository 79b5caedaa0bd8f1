//! Linux x86-64 signal frames, byte for byte: where a frame goes on the stack
//! (`get_sigframe` in arch/x86/kernel/signal.c), what it holds (`struct rt_sigframe`:
//! return address, `struct ucontext` with `struct sigcontext`, then `siginfo_t`; the XSAVE
//! image below it with its software-reserved bytes and trailing magic; uapi
//! `asm/sigcontext.h`), and reading one back for `rt_sigreturn(2)`.
//!
//! Sans-IO: registers and state in, bytes out (and back); the VMM writes them to the guest.

use kvm_bindings::kvm_regs;

/// `sizeof(struct rt_sigframe)` on x86-64: return address 8 + ucontext 304 + siginfo 128.
pub const FRAME_SIZE: u64 = 440;
/// Offset of `uc` in the frame.
pub const UC_OFF: u64 = 8;
/// Offset of `info` in the frame.
pub const INFO_OFF: u64 = 312;
/// Offset of `uc.uc_mcontext` (the sigcontext) in the frame.
const SC_OFF: usize = 48;
/// Offset of `uc.uc_sigmask` in the frame.
const MASK_OFF: usize = 304;
/// Bytes below the stack pointer a signal frame skips (the ABI's red zone).
pub const RED_ZONE: u64 = 128;
/// `FP_XSTATE_MAGIC1`, at offset 464 of the XSAVE image (its software-reserved bytes).
pub const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// `FP_XSTATE_MAGIC2`, right after the XSAVE image.
pub const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `struct _fpx_sw_bytes` in the XSAVE image.
pub const SW_BYTES_OFF: usize = 464;
/// `UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS`.
pub const UC_FLAGS: u64 = 7;
/// `SS_ONSTACK`, `SS_DISABLE`, `SS_AUTODISARM` (sigaltstack(2)).
pub const SS_ONSTACK: i32 = 1;
/// See [`SS_ONSTACK`].
pub const SS_DISABLE: i32 = 2;
/// See [`SS_ONSTACK`].
pub const SS_AUTODISARM: i32 = 1 << 31;

/// The rflags bits a program may change through `rt_sigreturn` (Linux's `FIX_EFLAGS`:
/// AC OF DF TF SF ZF AF PF CF RF).
pub const FIX_EFLAGS: u64 =
    0x4_0000 | 0x800 | 0x400 | 0x100 | 0x80 | 0x40 | 0x10 | 0x4 | 0x1 | 0x1_0000;

/// A thread's alternate signal stack as Linux keeps it (`sas_ss_sp`, `sas_ss_size`,
/// `sas_ss_flags`: the flags last given to sigaltstack(2)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AltStack {
    /// Lowest address of the stack.
    pub sp: u64,
    /// Bytes (0: none).
    pub size: u64,
    /// Flags as set (`SS_DISABLE`, `SS_AUTODISARM`).
    pub flags: i32,
}

impl AltStack {
    /// Linux's `on_sig_stack(sp)`.
    pub fn on(&self, sp: u64) -> bool {
        sp > self.sp && sp - self.sp <= self.size
    }

    /// Linux's `sas_ss_flags(sp)`: `SS_DISABLE` without a stack, `SS_ONSTACK` on it, else 0.
    pub fn state(&self, sp: u64) -> i32 {
        if self.size == 0 {
            SS_DISABLE
        } else if self.on(sp) {
            SS_ONSTACK
        } else {
            0
        }
    }

    /// The `stack_t` bytes (ss_sp, ss_flags, ss_size) with these flags.
    pub fn stack_t(&self, flags: i32) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.sp.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[16..].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Read a `stack_t`.
    pub fn from_stack_t(b: &[u8; 24]) -> AltStack {
        AltStack {
            sp: u64::from_le_bytes(b[..8].try_into().expect("8")),
            flags: i32::from_le_bytes(b[8..12].try_into().expect("4")),
            size: u64::from_le_bytes(b[16..].try_into().expect("8")),
        }
    }
}

/// Where a frame goes: the frame itself and the XSAVE image under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Address of `struct rt_sigframe` (the handler's rsp).
    pub frame: u64,
    /// Address of the XSAVE image (64-byte aligned).
    pub fpstate: u64,
    /// Whether the frame is on the alternate stack and the handler enters it from outside.
    pub entering_altstack: bool,
}

/// Linux's `get_sigframe`: skip the red zone, switch to the alternate stack when the action
/// asks for it (`SA_ONSTACK`) and the thread is not on it already, then room for the XSAVE
/// image (`xstate_size` + the 4-byte trailing magic, 64-byte aligned) and the frame (16-byte
/// aligned minus 8, as after a call). None when a frame on the alternate stack would not fit
/// in it (Linux then kills the thread with SIGSEGV).
pub fn place(sp: u64, onstack: bool, alt: &AltStack, xstate_size: u64) -> Option<Placement> {
    let mut s = sp.wrapping_sub(RED_ZONE);
    let mut entering = false;
    if onstack && alt.state(s) == 0 {
        s = alt.sp + alt.size;
        entering = true;
    }
    let fpstate = s.wrapping_sub(xstate_size + 4) & !63;
    let frame = (fpstate.wrapping_sub(FRAME_SIZE) & !15).wrapping_sub(8);
    let on_alt = entering || alt.on(sp);
    if on_alt && alt.size != 0 && !alt.on(frame + 1) {
        return None;
    }
    Some(Placement {
        frame,
        fpstate,
        entering_altstack: entering,
    })
}

/// What goes into one frame besides the registers.
#[derive(Debug, Clone)]
pub struct FrameInput {
    /// `sa_restorer`: the handler returns there.
    pub restorer: u64,
    /// The signal mask to restore at `rt_sigreturn`.
    pub mask: u64,
    /// The alternate stack as saved in `uc_stack`.
    pub alt: AltStack,
    /// CS and SS selectors of the interrupted code.
    pub cs: u16,
    /// See `cs`.
    pub ss: u16,
    /// Error code, trap number and CR2 of the thread's last fault (`thread.error_code`,
    /// `trap_nr`, `cr2`).
    pub err: u64,
    /// See `err`.
    pub trapno: u64,
    /// See `err`.
    pub cr2: u64,
    /// The 128-byte `siginfo_t`.
    pub info: [u8; 128],
}

fn put(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// sigcontext register order: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags.
fn gprs(r: &kvm_regs) -> [u64; 18] {
    [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.rflags,
    ]
}

/// The frame's bytes (`FRAME_SIZE`), for interrupted registers `regs` and an XSAVE image at
/// `fpstate` (0: none).
pub fn build(regs: &kvm_regs, fpstate: u64, f: &FrameInput) -> Vec<u8> {
    let mut b = vec![0u8; FRAME_SIZE as usize];
    put(&mut b, 0, f.restorer);
    put(&mut b, 8, if fpstate != 0 { UC_FLAGS } else { 6 });
    // uc_link 0; uc_stack: the stack as set (Linux's __save_altstack).
    b[24..48].copy_from_slice(&f.alt.stack_t(f.alt.flags));
    for (i, v) in gprs(regs).iter().enumerate() {
        put(&mut b, SC_OFF + 8 * i, *v);
    }
    let seg = SC_OFF + 144;
    b[seg..seg + 2].copy_from_slice(&f.cs.to_le_bytes());
    // gs, fs: 0 (64-bit frames do not carry them).
    b[seg + 6..seg + 8].copy_from_slice(&f.ss.to_le_bytes());
    put(&mut b, SC_OFF + 152, f.err);
    put(&mut b, SC_OFF + 160, f.trapno);
    put(&mut b, SC_OFF + 168, f.mask);
    put(&mut b, SC_OFF + 176, f.cr2);
    put(&mut b, SC_OFF + 184, fpstate);
    put(&mut b, MASK_OFF, f.mask);
    b[INFO_OFF as usize..].copy_from_slice(&f.info);
    b
}

/// The XSAVE image as it goes on the stack: the first `xstate_size` bytes of KVM's
/// (standard-format) XSAVE area with the software-reserved bytes filled in, then
/// `FP_XSTATE_MAGIC2`.
pub fn fpstate_image(xsave: &[u8], xstate_size: usize, xfeatures: u64) -> Vec<u8> {
    let n = xstate_size.min(xsave.len());
    let mut b = vec![0u8; xstate_size + 4];
    b[..n].copy_from_slice(&xsave[..n]);
    let sw = SW_BYTES_OFF;
    b[sw..sw + 48].fill(0);
    b[sw..sw + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    b[sw + 4..sw + 8].copy_from_slice(&(xstate_size as u32 + 4).to_le_bytes());
    b[sw + 8..sw + 16].copy_from_slice(&xfeatures.to_le_bytes());
    b[sw + 16..sw + 20].copy_from_slice(&(xstate_size as u32).to_le_bytes());
    b[xstate_size..].copy_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
    b
}

/// What `rt_sigreturn` reads back from a frame.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The registers to resume with (rflags already merged: only `FIX_EFLAGS` bits come
    /// from the frame).
    pub regs: kvm_regs,
    /// The signal mask.
    pub mask: u64,
    /// `uc_stack`.
    pub alt: AltStack,
    /// Where the XSAVE image is (0: none).
    pub fpstate: u64,
}

/// Read a frame's bytes (from `frame` = the rsp at `rt_sigreturn` minus 8), resuming from
/// `cur` (the current registers, whose rflags bits outside `FIX_EFLAGS` are kept).
pub fn parse(b: &[u8], cur: &kvm_regs) -> Restored {
    let g = |i: usize| get(b, SC_OFF + 8 * i);
    let regs = kvm_regs {
        r8: g(0),
        r9: g(1),
        r10: g(2),
        r11: g(3),
        r12: g(4),
        r13: g(5),
        r14: g(6),
        r15: g(7),
        rdi: g(8),
        rsi: g(9),
        rbp: g(10),
        rbx: g(11),
        rdx: g(12),
        rax: g(13),
        rcx: g(14),
        rsp: g(15),
        rip: g(16),
        rflags: (cur.rflags & !FIX_EFLAGS) | (g(17) & FIX_EFLAGS),
    };
    let mut st = [0u8; 24];
    st.copy_from_slice(&b[24..48]);
    Restored {
        regs,
        mask: get(b, MASK_OFF),
        alt: AltStack::from_stack_t(&st),
        fpstate: get(b, SC_OFF + 184),
    }
}

/// Whether an XSAVE image read back from the stack (`xstate_size` + 4 bytes) carries the
/// extended state (Linux's `check_xstate_in_sigframe`); if not, only its first 512 bytes
/// (the FXSAVE part) count.
pub fn has_xstate(img: &[u8], xstate_size: usize) -> bool {
    let sw = SW_BYTES_OFF;
    if img.len() < xstate_size + 4 || xstate_size < 576 {
        return false;
    }
    let u32at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().expect("4"));
    u32at(sw) == FP_XSTATE_MAGIC1
        && u32at(sw + 4) as usize == xstate_size + 4
        && u32at(sw + 16) as usize == xstate_size
        && u32at(xstate_size) == FP_XSTATE_MAGIC2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 0x7fff_0000,
            rbp: 8,
            r8: 9,
            r9: 10,
            r10: 11,
            r11: 12,
            r12: 13,
            r13: 14,
            r14: 15,
            r15: 16,
            rip: 0x40_1000,
            rflags: 0x246,
        }
    }

    #[test]
    fn frames_round_trip() {
        let f = FrameInput {
            restorer: 0x40_2000,
            mask: 0x55,
            alt: AltStack::default(),
            cs: 0x2b,
            ss: 0x23,
            err: 0,
            trapno: 0,
            cr2: 0,
            info: [7; 128],
        };
        let b = build(&regs(), 0x7ffe_f000, &f);
        assert_eq!(b.len() as u64, FRAME_SIZE);
        let mut cur = regs();
        cur.rflags = 0x202;
        let r = parse(&b, &cur);
        let mut want = regs();
        want.rflags = 0x246;
        assert_eq!(r.regs, want);
        assert_eq!(r.mask, 0x55);
        assert_eq!(r.fpstate, 0x7ffe_f000);
        assert_eq!(&b[INFO_OFF as usize..], &[7; 128]);
    }

    #[test]
    fn placement_follows_linux() {
        // As measured natively: frame 16-byte aligned minus 8, XSAVE image 64-aligned above.
        let p = place(0x7fff_1000, false, &AltStack::default(), 832).unwrap();
        assert_eq!(p.frame % 16, 8);
        assert_eq!(p.fpstate % 64, 0);
        assert!(p.fpstate >= p.frame + FRAME_SIZE);
        assert!(p.fpstate + 836 <= 0x7fff_1000 - RED_ZONE);
        // On the alternate stack: top of it.
        let alt = AltStack {
            sp: 0x1000_0000,
            size: 0x4000,
            flags: 0,
        };
        let p = place(0x7fff_1000, true, &alt, 832).unwrap();
        assert!(p.entering_altstack && alt.on(p.frame));
        // Too small for the frame.
        let tiny = AltStack {
            sp: 0x1000_0000,
            size: 0x100,
            flags: 0,
        };
        assert!(place(0x7fff_1000, true, &tiny, 832).is_none());
    }

    #[test]
    fn xstate_magic_is_checked() {
        let img = fpstate_image(&[0u8; 4096], 832, 7);
        assert!(has_xstate(&img, 832));
        let mut bad = img.clone();
        bad[832] ^= 1;
        assert!(!has_xstate(&bad, 832));
    }
}
