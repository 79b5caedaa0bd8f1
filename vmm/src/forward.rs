//! The VMM side of a home call: gather every input buffer from guest memory into one
//! [`Request`], hand it to the deputy, and scatter the [`Reply`]'s buffers back, never writing
//! more than the guest asked for nor more than the host wrote. Reads and writes longer than one
//! request carries ([`MAX_XFER`]) are split into several requests, so a single 1 GiB `read`
//! or `write` transfers as much as natively (Linux caps one call at [`MAX_RW_COUNT`]).
//!
//! The deputy does not trust what arrives here (`deputy::marshal` is the choke point); this
//! side only promises to ask for no more than the guest's own arguments describe.

use crate::deputy::marshal::{
    MsgHead, MAX_CONTROL, MAX_RW_COUNT, MAX_SOCKBUF, MAX_XFER, MSG_HEAD, PATH_MAX, SOCKADDR_MAX,
};
use crate::deputy::{fdset_bytes, Deputy, Request, Slot};
use crate::memory::Fault;
use crate::mm::AddressSpace;
use crate::table::{self, A};

const EFAULT: i64 = libc::EFAULT as i64;
const EINVAL: i64 = libc::EINVAL as i64;
const EMSGSIZE: i64 = libc::EMSGSIZE as i64;
const ENAMETOOLONG: i64 = libc::ENAMETOOLONG as i64;
const ENOBUFS: i64 = libc::ENOBUFS as i64;
/// Linux's `UIO_MAXIOV`: most iovecs one call takes.
const UIO_MAXIOV: u64 = 1024;
/// End of the user address space (`TASK_SIZE_MAX` with 4-level paging): `access_ok` fails
/// beyond it, so such a buffer is EFAULT before anything moves.
const TASK_SIZE_MAX: u64 = 0x7fff_ffff_f000;

/// A guest buffer: (guest virtual address, length).
type Seg = (u64, u64);

/// A `recvmsg` in flight: where its outputs go in guest memory.
struct MsgDest {
    hdr: u64,
    name: u64,
    name_cap: usize,
    control: u64,
    control_cap: usize,
    iov: Vec<Seg>,
}

/// Guest memory as a system call sees it: only what the guest's mappings let it read or
/// write (a PROT_NONE or read-only page, or a hole left by munmap, faults as on Linux), with
/// demand-paged pages brought in before they are used.
pub struct Guest<'a> {
    space: Access<'a>,
    /// Bytes that read in place of the guest's at an address (a timeout's time left).
    overlay: Option<(u64, [u8; 16])>,
}

/// How a [`Guest`] reaches the address space.
enum Access<'a> {
    /// Borrowed for the whole call.
    Borrowed(&'a mut AddressSpace),
    /// Through a lock taken for each access: a home call of one thread of a multi-threaded
    /// guest, which must not hold the process while its host call blocks.
    Locked(&'a dyn SpaceLock),
}

/// The address space of a guest whose other threads run meanwhile.
pub trait SpaceLock {
    /// Run `f` on the address space under the process's lock; false (and `f` not run) when
    /// the process has ended.
    fn with_space(&self, f: &mut dyn FnMut(&mut AddressSpace)) -> bool;
}

impl<'a> Guest<'a> {
    /// The guest's memory through its address space.
    pub fn new(space: &'a mut AddressSpace) -> Self {
        Guest {
            space: Access::Borrowed(space),
            overlay: None,
        }
    }

    /// Read `bytes` in place of the guest's 16 bytes at `va` (a timed call's time left,
    /// vm/timed.rs); the guest's memory is not written.
    pub fn overlay(mut self, overlay: Option<(u64, [u8; 16])>) -> Self {
        self.overlay = overlay;
        self
    }

    /// The guest's memory through a lock taken for each access.
    pub fn locked(space: &'a dyn SpaceLock) -> Self {
        Guest {
            space: Access::Locked(space),
            overlay: None,
        }
    }

    /// Run `f` on the address space; None when the process ended meanwhile.
    fn with<R>(&mut self, f: impl FnOnce(&mut AddressSpace) -> R) -> Option<R> {
        match &mut self.space {
            Access::Borrowed(s) => Some(f(s)),
            Access::Locked(l) => {
                let mut f = Some(f);
                let mut out = None;
                l.with_space(&mut |s| {
                    if let Some(f) = f.take() {
                        out = Some(f(s));
                    }
                });
                out
            }
        }
    }

    /// Check and access `[va, va+len)` in one go (under one lock): `f` runs on the memory
    /// once the call may touch all of it.
    fn access(
        &mut self,
        va: u64,
        len: usize,
        write: bool,
        f: impl FnOnce(&mut crate::memory::GuestMem) -> Result<(), Fault>,
    ) -> Result<(), Fault> {
        self.with(|s| {
            if s.accessible(va, len as u64, write) != len as u64 {
                return Err(Fault(va));
            }
            s.fault_in_range(va, len as u64);
            f(&mut s.mem)
        })
        .unwrap_or(Err(Fault(va)))
    }

    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.access(va, buf.len(), false, |m| m.read(va, buf))?;
        if let Some((at, b)) = self.overlay {
            // The overlay's bytes where they fall inside [va, va + len).
            let end = va.saturating_add(buf.len() as u64);
            for (k, byte) in b.iter().enumerate() {
                let x = at.wrapping_add(k as u64);
                if x >= va && x < end {
                    buf[(x - va) as usize] = *byte;
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, va: u64, buf: &[u8]) -> Result<(), Fault> {
        self.access(va, buf.len(), true, |m| m.write(va, buf))
    }

    /// Whether the call may write all of `[va, va+len)`.
    fn check_range(&mut self, va: u64, len: usize) -> Result<(), Fault> {
        self.access(va, len, true, |m| m.check_range(va, len))
    }

    fn read_u64_va(&mut self, va: u64) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Run home call `nr` (table row `base`) for the guest: -errno or the result.
pub fn home_call(
    mem: &mut Guest<'_>,
    deputy: &mut dyn Deputy,
    nr: u64,
    args: [u64; 6],
    base: &'static [A],
) -> i64 {
    if let Some(x) = Transfer::of(nr) {
        return transfer(mem, deputy, nr, args, x);
    }
    let spec = match table::spec(nr, &args, base) {
        Ok(s) => s,
        Err(e) => return -e,
    };
    let mut slots = Vec::new();
    let mut msg: Option<MsgDest> = None;
    // An argument the VMM already knows is wrong (EINVAL, ENAMETOOLONG...): the host call
    // faults there instead, so the checks Linux makes before it still come first; then the
    // guest gets this errno in place of EFAULT.
    let mut known: Option<i64> = None;
    // For each argument: the bytes the guest's buffer holds when an output comes back for it.
    let mut cap: [Option<u64>; 6] = [None; 6];
    for (i, kind) in spec.iter().enumerate() {
        if !kind.is_slot() {
            continue;
        }
        let slot = if args[i] == 0 {
            Slot::Null
        } else {
            match gather(mem, nr, *kind, args[i], &args, &mut msg) {
                Ok(s) => s,
                // The host call faults in its turn, after the checks Linux makes first.
                Err(EFAULT) => Slot::Fault,
                Err(e) => {
                    known.get_or_insert(e);
                    Slot::Fault
                }
            }
        };
        if kind.is_out() {
            cap[i] = match &slot {
                Slot::Null | Slot::In(_) | Slot::Fault => None,
                Slot::Out(n) => Some(*n as u64),
                Slot::InOut(b) => Some(b.len() as u64),
            };
        }
        slots.push(slot);
    }
    let reply = deputy.call(Request { nr, args, slots });
    let mut ret = match known {
        Some(e) if reply.ret == -EFAULT => -e,
        _ => reply.ret,
    };
    let mut outs = reply.outs.into_iter();
    for (i, kind) in spec.iter().enumerate() {
        let Some(cap) = cap[i] else { continue };
        let Some(buf) = outs.next() else { break };
        if ret < 0 && !matches!(kind, A::SInOut(_)) {
            continue;
        }
        let res = match *kind {
            A::Out(_) => put(mem, args[i], &buf, ret, cap),
            A::OutElems(_, size) => put(mem, args[i], &buf, ret.saturating_mul(size as i64), cap),
            // msgrcv's buffer: the mtype, then `ret` bytes of text.
            A::SOut(_) if nr as i64 == libc::SYS_msgrcv => {
                put(mem, args[i], &buf, ret.saturating_add(8), cap)
            }
            A::MsgOut => match msg.as_ref() {
                Some(d) => scatter_msg(mem, d, &buf),
                None => Ok(()),
            },
            _ => put(mem, args[i], &buf, i64::MAX, cap),
        };
        if let Err(e) = res {
            ret = -e;
        }
    }
    ret
}

/// Write at most `min(got, cap, buf.len())` bytes of `buf` at `va`.
fn put(mem: &mut Guest<'_>, va: u64, buf: &[u8], got: i64, cap: u64) -> Result<(), i64> {
    let n = (got.max(0) as u64).min(cap).min(buf.len() as u64) as usize;
    mem.write(va, &buf[..n]).map_err(|_| EFAULT)
}

/// The length of the prefix of `[va, va+len)` the call may read (`write` false) or write.
fn mapped_prefix(mem: &mut Guest<'_>, va: u64, len: u64, write: bool) -> u64 {
    mem.with(|s| {
        let n = s.accessible(va, len, write);
        s.fault_in_range(va, n);
        // Pages the guest may use but that could not be made present (no memory) end it too.
        let mut done = 0u64;
        while done < n {
            let cur = va + done;
            let step = (4096 - (cur & 4095)).min(n - done);
            if s.mem.check_range(cur, step as usize).is_err() {
                break;
            }
            done += step;
        }
        done
    })
    .unwrap_or(0)
}

fn read_vec(mem: &mut Guest<'_>, va: u64, len: usize) -> Result<Vec<u8>, i64> {
    let mut b = vec![0u8; len];
    mem.read(va, &mut b).map_err(|_| EFAULT)?;
    Ok(b)
}

/// Read a guest iovec array of `cnt` entries with Linux's checks (`import_iovec`): more
/// than UIO_MAXIOV entries is `too_many` (EINVAL, or EMSGSIZE for a msghdr), a negative length
/// EINVAL, a piece reaching past the user address space EFAULT.
fn iovecs(mem: &mut Guest<'_>, ptr: u64, cnt: u64, too_many: i64) -> Result<Vec<Seg>, i64> {
    if cnt > UIO_MAXIOV {
        return Err(too_many);
    }
    if cnt == 0 {
        return Ok(Vec::new());
    }
    let raw = read_vec(mem, ptr, cnt as usize * 16)?;
    let v: Vec<Seg> = raw
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
            )
        })
        .collect();
    if v.iter().any(|&(_, l)| l > i64::MAX as u64) {
        return Err(EINVAL);
    }
    if v.iter().any(|&(b, l)| beyond_user(b, l)) {
        return Err(EFAULT);
    }
    Ok(v)
}

/// Whether `[va, va+len)` reaches past the user address space (`access_ok` fails).
fn beyond_user(va: u64, len: u64) -> bool {
    va.checked_add(len).is_none_or(|end| end > TASK_SIZE_MAX)
}

/// The elements of `size` bytes that length argument `n` asks for, at most a request's
/// worth; a C `int` length counts by its low 32 bits and a negative one asks for nothing (the
/// kernel refuses it).
fn len_arg(nr: u64, args: &[u64; 6], n: u8, size: u16) -> u64 {
    let v = args[n as usize];
    let v = if table::int_len(nr, n) {
        (v as i32).max(0) as u64
    } else {
        v
    };
    v.min((MAX_XFER / size as usize) as u64)
}

/// A path, NUL included, as Linux's `strncpy_from_user` takes it: EFAULT where it runs into
/// unmapped memory, ENAMETOOLONG when PATH_MAX bytes hold no NUL.
fn read_path(mem: &mut Guest<'_>, ptr: u64) -> Result<Vec<u8>, i64> {
    let mut out = Vec::new();
    let mut cur = ptr;
    while out.len() < PATH_MAX {
        let n = ((4096 - (cur & 4095)) as usize).min(PATH_MAX - out.len());
        let piece = read_vec(mem, cur, n)?;
        if let Some(z) = piece.iter().position(|&b| b == 0) {
            out.extend_from_slice(&piece[..=z]);
            return Ok(out);
        }
        out.extend_from_slice(&piece);
        cur = cur.checked_add(n as u64).ok_or(EFAULT)?;
    }
    Err(ENAMETOOLONG)
}

/// Gather one buffer argument.
fn gather(
    mem: &mut Guest<'_>,
    nr: u64,
    kind: A,
    ptr: u64,
    args: &[u64; 6],
    msg: &mut Option<MsgDest>,
) -> Result<Slot, i64> {
    let checked_out = |mem: &mut Guest<'_>, len: usize| -> Result<Slot, i64> {
        mem.check_range(ptr, len).map_err(|_| EFAULT)?;
        Ok(Slot::Out(len))
    };
    Ok(match kind {
        A::Path => Slot::In(read_path(mem, ptr)?),
        A::In(n) => Slot::In(read_vec(mem, ptr, len_arg(nr, args, n, 1) as usize)?),
        A::Out(n) => checked_out(mem, len_arg(nr, args, n, 1) as usize)?,
        A::OutElems(n, size) => {
            checked_out(mem, len_arg(nr, args, n, size) as usize * size as usize)?
        }
        A::InOutElems(n, size) => {
            // poll's nfds and setgroups' size are 32-bit in the kernel.
            let elems = (args[n as usize] as u32 as u64).min((MAX_XFER / size as usize) as u64);
            Slot::InOut(read_vec(mem, ptr, elems as usize * size as usize)?)
        }
        A::SIn(size) => Slot::In(read_vec(mem, ptr, size as usize)?),
        A::SOut(size) => checked_out(mem, size as usize)?,
        A::SInOut(size) => Slot::InOut(read_vec(mem, ptr, size as usize)?),
        A::FdSet(n) => Slot::InOut(read_vec(mem, ptr, fdset_bytes(args[n as usize]))?),
        A::LenOut(n) => {
            let lp = args[n as usize];
            if lp == 0 {
                return Ok(Slot::Null);
            }
            let mut l = [0u8; 4];
            mem.read(lp, &mut l).map_err(|_| EFAULT)?;
            let l = u32::from_le_bytes(l);
            if (l as i32) < 0 {
                return Err(EINVAL);
            }
            checked_out(mem, (l as usize).min(MAX_SOCKBUF))?
        }
        A::SigPack => {
            let ss = mem.read_u64_va(ptr).map_err(|_| EFAULT)?;
            let len = mem.read_u64_va(ptr + 8).map_err(|_| EFAULT)?;
            if ss == 0 {
                Slot::Null
            } else if len != 8 {
                return Err(EINVAL);
            } else {
                Slot::In(read_vec(mem, ss, 8)?)
            }
        }
        A::MsgIn | A::MsgOut => {
            let h = read_vec(mem, ptr, 56)?;
            let u64at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
            let name = u64at(0);
            let name_len = if name == 0 {
                0
            } else {
                let l = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as i32;
                if l < 0 {
                    return Err(EINVAL);
                }
                (l as usize).min(SOCKADDR_MAX)
            };
            let iov = iovecs(mem, u64at(16), u64at(24), EMSGSIZE)?;
            let control = u64at(32);
            let control_len = if control == 0 { 0 } else { u64at(40) };
            // Sending more ancillary data than the kernel takes is ENOBUFS; a receive buffer
            // is only a capacity, of which one request carries at most MAX_CONTROL.
            let control_len = match kind {
                A::MsgIn if control_len > MAX_CONTROL as u64 => return Err(ENOBUFS),
                _ => control_len.min(MAX_CONTROL as u64) as usize,
            };
            let mut data_len = 0u64;
            let mut segs = Vec::new();
            for (b, l) in iov {
                let l = l.min(MAX_XFER as u64 - data_len);
                segs.push((b, l));
                data_len += l;
            }
            let mut head = MsgHead {
                name_len: name_len as u32,
                control_len: control_len as u32,
                flags: 0,
                data_len,
            };
            if kind == A::MsgOut {
                for &(b, l) in &segs {
                    mem.check_range(b, l as usize).map_err(|_| EFAULT)?;
                }
                mem.check_range(name, name_len).map_err(|_| EFAULT)?;
                mem.check_range(control, control_len).map_err(|_| EFAULT)?;
                *msg = Some(MsgDest {
                    hdr: ptr,
                    name,
                    name_cap: name_len,
                    control,
                    control_cap: control_len,
                    iov: segs,
                });
                Slot::InOut(head.to_bytes().to_vec())
            } else {
                let mut body = Vec::with_capacity(MSG_HEAD + name_len + control_len);
                body.extend_from_slice(&[0; MSG_HEAD]);
                body.extend_from_slice(&read_vec(mem, name, name_len)?);
                body.extend_from_slice(&read_vec(mem, control, control_len)?);
                for (b, l) in segs {
                    body.extend_from_slice(&read_vec(mem, b, l as usize)?);
                }
                head.data_len = (body.len() - MSG_HEAD - name_len - control_len) as u64;
                body[..MSG_HEAD].copy_from_slice(&head.to_bytes());
                Slot::In(body)
            }
        }
        A::IovIn(_) | A::IovOut(_) | A::V | A::Fd | A::DirFd => Slot::Null,
    })
}

/// Write a `recvmsg` reply into the guest's `msghdr`, its name, control and iovec buffers.
fn scatter_msg(mem: &mut Guest<'_>, d: &MsgDest, buf: &[u8]) -> Result<(), i64> {
    let Some(head) = MsgHead::parse(buf) else {
        return Ok(());
    };
    let body = &buf[MSG_HEAD..];
    let name_n = (head.name_len as usize).min(d.name_cap).min(body.len());
    let control_n = (head.control_len as usize)
        .min(d.control_cap)
        .min(body.len().saturating_sub(name_n));
    let data = body
        .get(name_n + control_n..)
        .unwrap_or(&[])
        .get(..head.data_len as usize)
        .unwrap_or(&[]);
    let fault = |_| EFAULT;
    if d.name != 0 {
        mem.write(d.name, &body[..name_n]).map_err(fault)?;
        // msg_namelen: the address's real length, as the kernel reports it.
        mem.write(d.hdr + 8, &head.name_len.to_le_bytes())
            .map_err(fault)?;
    }
    if d.control != 0 {
        mem.write(d.control, &body[name_n..name_n + control_n])
            .map_err(fault)?;
    }
    mem.write(d.hdr + 40, &(control_n as u64).to_le_bytes())
        .map_err(fault)?;
    mem.write(d.hdr + 48, &head.flags.to_le_bytes())
        .map_err(fault)?;
    let mut left = data;
    for &(b, l) in &d.iov {
        if left.is_empty() {
            break;
        }
        let k = (l as usize).min(left.len());
        mem.write(b, &left[..k]).map_err(fault)?;
        left = &left[k..];
    }
    Ok(())
}

/// A read or write of user data that may be longer than one request carries.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    write: bool,
    /// The data is an iovec array (count in argument 2).
    iov: bool,
    /// The argument holding the file offset (`pread64`, `preadv`, ...), if any.
    pos: Option<usize>,
}

impl Transfer {
    fn of(nr: u64) -> Option<Transfer> {
        let t = |write, iov, pos| Some(Transfer { write, iov, pos });
        match nr as i64 {
            libc::SYS_read => t(false, false, None),
            libc::SYS_write | libc::SYS_sendto => t(true, false, None),
            libc::SYS_pread64 => t(false, false, Some(3)),
            libc::SYS_pwrite64 => t(true, false, Some(3)),
            libc::SYS_readv => t(false, true, None),
            libc::SYS_writev => t(true, true, None),
            libc::SYS_preadv | libc::SYS_preadv2 => t(false, true, Some(3)),
            libc::SYS_pwritev | libc::SYS_pwritev2 => t(true, true, Some(3)),
            _ => None,
        }
    }
}

/// Take the next at most `max` bytes of `segs` (advancing it).
fn take(segs: &mut Vec<Seg>, max: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut left = max;
    while left > 0 && !segs.is_empty() {
        let (b, l) = segs[0];
        let k = l.min(left);
        if k > 0 {
            out.push((b, k));
        }
        left -= k;
        if k == l {
            segs.remove(0);
        } else {
            segs[0] = (b + k, l - k);
        }
    }
    out
}

/// Whether guest descriptor `fd` is a regular file or block device (a read of it that filled
/// one request's buffer may go on without blocking).
fn is_file(deputy: &mut dyn Deputy, fd: u64) -> bool {
    let r = deputy.call(Request {
        nr: libc::SYS_fstat as u64,
        args: [fd, 0, 0, 0, 0, 0],
        slots: vec![Slot::Out(144)],
    });
    let mode = r
        .outs
        .first()
        .and_then(|b| b.get(24..28))
        .map_or(0, |m| u32::from_le_bytes(m.try_into().expect("4 bytes")));
    r.ret == 0 && matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFBLK)
}

/// A read or write, in requests of at most [`MAX_XFER`] bytes each, as one call would behave
/// natively: the total is capped at [`MAX_RW_COUNT`]; a write goes on while each request is
/// taken whole; a read goes on only on a regular file or block device, while each request is
/// filled. An error after some bytes moved returns the bytes moved, as Linux does.
fn transfer(
    mem: &mut Guest<'_>,
    deputy: &mut dyn Deputy,
    nr: u64,
    args: [u64; 6],
    x: Transfer,
) -> i64 {
    let mut segs = if x.iov {
        // import_iovec takes the count as an unsigned int: higher bits do not count.
        match iovecs(mem, args[1], args[2] as u32 as u64, EINVAL) {
            Ok(v) => v,
            Err(e) => {
                // The descriptor checks come first, as natively: the host call gets an iovec
                // array that faults, and the guest this errno if it gets that far.
                let r = deputy.call(Request {
                    nr,
                    args,
                    slots: vec![Slot::Fault],
                });
                return if r.ret == -EFAULT { -e } else { r.ret };
            }
        }
    } else {
        let (b, l) = (args[1], args[2]);
        if beyond_user(b, l) {
            // access_ok fails natively, after the descriptor and offset checks: the host call
            // faults at the buffer and reports the checks that come first.
            let mut a = args;
            a[2] = 0;
            let r = deputy.call(Request {
                nr,
                args: a,
                slots: vec![Slot::Fault],
            });
            return if r.ret >= 0 || r.ret == -EFAULT {
                -EFAULT
            } else {
                r.ret
            };
        }
        vec![(b, l)]
    };
    let total: u64 = segs.iter().map(|s| s.1).sum::<u64>().min(MAX_RW_COUNT);
    let mut done = 0u64;
    let mut file: Option<bool> = None;
    loop {
        let chunk = take(&mut segs, (total - done).min(MAX_XFER as u64));
        // Only the mapped prefix moves; nothing mapped at all is EFAULT.
        let mut len = 0u64;
        let mut ok = Vec::new();
        for &(b, l) in &chunk {
            // A read fills guest memory (it must be writable); a write takes from it.
            let m = mapped_prefix(mem, b, l, !x.write);
            if m > 0 {
                ok.push((b, m));
            }
            len += m;
            if m < l {
                break;
            }
        }
        let want: u64 = chunk.iter().map(|s| s.1).sum();
        if len == 0 && want > 0 && done > 0 {
            return done as i64;
        }
        let mut a = args;
        // Nothing mapped: the host call gets a pointer that faults (after the descriptor
        // checks, and only if something is to be copied, as natively).
        let fault = len == 0 && want > 0;
        a[2] = match (x.iov, fault) {
            (true, _) => 1,
            (false, true) => want,
            (false, false) => len,
        };
        if let Some(p) = x.pos {
            if !(x.iov && a[p] as i64 == -1) {
                a[p] = args[p].wrapping_add(done);
            }
        }
        let slot = if fault {
            Slot::Fault
        } else if x.write {
            let mut data = Vec::with_capacity(len as usize);
            for &(b, l) in &ok {
                match read_vec(mem, b, l as usize) {
                    Ok(v) => data.extend_from_slice(&v),
                    Err(e) => return if done > 0 { done as i64 } else { -e },
                }
            }
            Slot::In(data)
        } else {
            Slot::Out(len as usize)
        };
        let mut slots = vec![slot];
        // sendto's address.
        if nr as i64 == libc::SYS_sendto && args[4] != 0 {
            let alen = args[5].min(MAX_SOCKBUF as u64) as usize;
            slots.push(read_vec(mem, args[4], alen).map_or(Slot::Fault, Slot::In));
        }
        let r = deputy.call(Request { nr, args: a, slots });
        if r.ret < 0 {
            return if done > 0 { done as i64 } else { r.ret };
        }
        let got = (r.ret as u64).min(len);
        if !x.write {
            let data = r.outs.first().map_or(&[][..], Vec::as_slice);
            let mut left = &data[..(got as usize).min(data.len())];
            for &(b, l) in &ok {
                if left.is_empty() {
                    break;
                }
                let k = (l as usize).min(left.len());
                if mem.write(b, &left[..k]).is_err() {
                    return if done > 0 { done as i64 } else { -EFAULT };
                }
                left = &left[k..];
            }
        }
        done += got;
        if got < want || done >= total {
            return done as i64;
        }
        if !x.write && !*file.get_or_insert_with(|| is_file(deputy, args[0])) {
            return done as i64;
        }
    }
}
