//! The one choke point between a forwarded request and the host kernel (DESIGN.md, "One choke
//! point between guest memory and the host").
//!
//! A [`Request`] comes from the guest's VMM, in this process or over the network, and nothing
//! in it is trusted: slot kinds may not match the table, buffers may be shorter or longer than
//! the lengths in the arguments, paths may lack their NUL, nested structures may point
//! anywhere. [`Call::prepare`] builds every host syscall only from buffers it owns:
//!
//! - every length argument the kernel reads is set to (at most) the length of the buffer it
//!   describes, and buffers are capped at [`MAX_XFER`] bytes;
//! - fixed-size structs are exactly their size; paths end with a NUL within [`PATH_MAX`];
//! - nested pointers (iovecs, `pselect6`'s `{sigset, size}` pair, `msghdr` with its name,
//!   iovec and control buffers, `socklen_t` lengths) are rebuilt to point into owned buffers;
//! - descriptors inside structs (`pollfd`, `fd_set`, `SCM_RIGHTS`) are translated both ways
//!   through the deputy's table;
//!
//! and [`Call::finish`] returns outputs only up to what the host wrote. [`Call::verify`] checks
//! those invariants on the final host arguments; tests and the fuzz target run it on every
//! request they build.

use super::{fdset_bytes, Reply, Request, Slot, MAX_FDS};
use crate::table::{self, A};

/// Largest buffer one request carries (bytes). Longer reads and writes are split into several
/// requests by the VMM (`forward`), as Linux itself caps one call at [`MAX_RW_COUNT`]. A frame
/// on the link to home has room for this much and the request around it.
pub const MAX_XFER: usize = migrate::frame::MAX_DEPUTY_DATA;
/// Linux's cap on one read/write: `MAX_RW_COUNT` = `INT_MAX & PAGE_MASK` (fs/read_write.c).
pub const MAX_RW_COUNT: u64 = 0x7fff_f000;
/// Longest path, NUL included (`PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// Largest socket address or option buffer carried (bytes).
pub const MAX_SOCKBUF: usize = 1 << 16;
/// Largest ancillary-data (control) buffer of a `sendmsg`/`recvmsg` (bytes).
pub const MAX_CONTROL: usize = 1 << 16;
/// `sizeof(struct sockaddr_storage)`: Linux clamps `msg_namelen` to it.
pub const SOCKADDR_MAX: usize = 128;
/// Bytes of the header of a `msghdr` slot (see [`MsgHead`]).
pub const MSG_HEAD: usize = 24;

const EFAULT: i64 = libc::EFAULT as i64;
const EINVAL: i64 = libc::EINVAL as i64;
const ENAMETOOLONG: i64 = libc::ENAMETOOLONG as i64;
const ENOBUFS: i64 = libc::ENOBUFS as i64;

/// The host descriptor a guest descriptor that is not open becomes: a number no process can
/// have open (`INT_MAX`), so the kernel answers for it as Linux answers for the guest's own
/// (EBADF, after the checks it makes first; ignored as `dirfd` beside an absolute path;
/// POLLNVAL in a `pollfd`). A guest number never reaches the host as it is.
pub const NO_FD: i32 = i32::MAX;

/// Bytes of the guard region (see [`guard`]): at least as long as any length the kernel is
/// given with a pointer into it.
pub const GUARD_LEN: usize = MAX_XFER;

/// The start of a region of this process's address space reserved with no access at all
/// (`PROT_NONE`, never populated): a pointer into it is a valid user address the kernel
/// accepts (`access_ok`) but cannot read or write, so a host call given it fails with EFAULT
/// exactly where it would for the guest's own unmapped memory, after its descriptor and flag
/// checks. Lengths given with it are at most [`GUARD_LEN`], so the kernel cannot reach past it.
pub fn guard() -> u64 {
    static GUARD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *GUARD.get_or_init(|| {
        // SAFETY: a fresh anonymous reservation at an address the kernel picks; it overlaps
        // nothing of ours, and nothing ever reads, writes or unmaps it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUARD_LEN,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "cannot reserve the deputy's guard region"
        );
        p as u64
    })
}

/// Zeroed memory aligned to a page, for O_DIRECT transfers.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised (zeroed) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The descriptor table a call is translated through.
pub trait FdMap {
    /// The host descriptor behind guest descriptor `guest`, or EBADF (positive errno).
    fn host_fd(&self, guest: u64) -> Result<i32, i64>;
    /// A path that means something else for the guest than for this process (its own
    /// `/proc/self/fd/N`, say), rewritten, NUL included; None to keep it.
    fn rewrite_path(&self, _path: &[u8]) -> Option<Vec<u8>> {
        None
    }
    /// Take ownership of a new host descriptor at the lowest free guest number: the guest
    /// number, or -errno (the host descriptor is closed then).
    fn install(&mut self, host: i32, cloexec: bool) -> i64;
}

/// The fixed part of a `msghdr` slot, little-endian: `name_len: u32, control_len: u32,
/// flags: u32, pad: u32, data_len: u64`, followed (for `sendmsg`, and in `recvmsg`'s reply) by
/// the name, control and data bytes. In a `recvmsg` request the lengths are the capacities and
/// no bytes follow; in its reply they are what the host wrote (`name_len` and `control_len` as
/// the kernel set `msg_namelen` and `msg_controllen`, `flags` its `msg_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsgHead {
    /// Socket address bytes.
    pub name_len: u32,
    /// Ancillary data bytes.
    pub control_len: u32,
    /// `msg_flags`.
    pub flags: u32,
    /// Data bytes (the iovecs' total).
    pub data_len: u64,
}

impl MsgHead {
    /// Encode.
    pub fn to_bytes(self) -> [u8; MSG_HEAD] {
        let mut b = [0u8; MSG_HEAD];
        b[0..4].copy_from_slice(&self.name_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.control_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    /// Decode the first [`MSG_HEAD`] bytes; None when there are fewer.
    pub fn parse(b: &[u8]) -> Option<MsgHead> {
        let u32at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        (b.len() >= MSG_HEAD).then(|| MsgHead {
            name_len: u32at(0),
            control_len: u32at(4),
            flags: u32at(8),
            data_len: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// A `sendmsg`/`recvmsg` call's own buffers and the `msghdr` pointing into them.
struct Msg {
    hdr: Box<libc::msghdr>,
    iov: Box<libc::iovec>,
    name: Vec<u8>,
    control: Vec<u8>,
    data: Vec<u8>,
    recv: bool,
}

/// A descriptor table for tests and fuzzing, where no call is run: guest descriptors 0..16
/// are host descriptors 100..116, others EBADF; an install takes nothing and answers 7.
pub struct FixedFds;

impl FdMap for FixedFds {
    fn host_fd(&self, guest: u64) -> Result<i32, i64> {
        if guest < 16 {
            Ok(100 + guest as i32)
        } else {
            Err(libc::EBADF as i64)
        }
    }

    fn install(&mut self, _host: i32, _cloexec: bool) -> i64 {
        7
    }
}

/// One host syscall built from a request, owning every buffer it points to.
pub struct Call {
    nr: u64,
    /// The guest's arguments as received (descriptors not yet translated).
    guest_args: [u64; 6],
    /// The host arguments, pointers excepted (filled in by [`Call::host_args`]).
    args: [u64; 6],
    spec: [A; 6],
    /// The buffer each pointer argument points to.
    bufs: [Option<Vec<u8>>; 6],
    /// Whether the buffer of an argument goes back in the reply.
    out: [bool; 6],
    /// Arguments whose guest memory faulted: they point into the guard region.
    fault: [bool; 6],
    /// The one iovec of a readv/writev-style call.
    iov: Box<libc::iovec>,
    /// `pselect6`'s `{const sigset_t *ss; size_t ss_len}`.
    pack: Box<[u64; 2]>,
    msg: Option<Msg>,
    /// The guest's descriptor numbers of a `pollfd` array, in order.
    poll_guest: Vec<i32>,
    /// For each `fd_set` argument: (guest, host) pairs of the descriptors in it.
    fdset_maps: Vec<(usize, Vec<(usize, i32)>)>,
}

/// Bytes the kernel reads and writes of an `fd_set` for `nfds` host descriptors (host
/// numbers are not bounded by the guest's table).
fn host_set_bytes(nfds: u64) -> usize {
    (nfds.min(i32::MAX as u64) as usize).div_ceil(64) * 8
}

fn le_i32(b: &[u8]) -> i32 {
    i32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Walk the `cmsghdr`s of a control buffer: (offset of the data, data length, level, type).
fn cmsgs(control: &[u8]) -> Vec<(usize, usize, i32, i32)> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + HDR <= control.len() {
        let len = u64::from_le_bytes(control[off..off + 8].try_into().expect("8 bytes")) as usize;
        if len < HDR || len > control.len() - off {
            break;
        }
        let level = le_i32(&control[off + 8..]);
        let ty = le_i32(&control[off + 12..]);
        out.push((off + HDR, len - HDR, level, ty));
        off += len.div_ceil(8) * 8;
    }
    out
}

impl Call {
    /// Build the host call for `req` (a home call whose table row is `base`), translating
    /// descriptors through `fds`. Err(errno) when the request cannot be run as given.
    pub fn prepare(req: Request, base: &'static [A], fds: &dyn FdMap) -> Result<Call, i64> {
        let spec = table::spec(req.nr, &req.args, base)?;
        let mut c = Call {
            nr: req.nr,
            guest_args: req.args,
            args: req.args,
            spec,
            bufs: Default::default(),
            out: [false; 6],
            fault: [false; 6],
            iov: Box::new(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }),
            pack: Box::new([0, 0]),
            msg: None,
            poll_guest: Vec::new(),
            fdset_maps: Vec::new(),
        };
        // C `int` lengths: their low 32 bits, sign-extended; a negative one is passed on as it
        // is (the kernel refuses it before touching the buffer) and clamps nothing below.
        let mut neg = [false; 6];
        for kind in spec {
            if let A::In(n) | A::Out(n) | A::OutElems(n, _) = kind {
                if table::int_len(req.nr, n) {
                    let v = c.args[n as usize] as i32;
                    c.args[n as usize] = v as i64 as u64;
                    neg[n as usize] = v < 0;
                }
            }
        }
        let mut slots = req.slots.into_iter();
        for (i, &kind) in spec.iter().enumerate() {
            match kind {
                A::V => continue,
                A::Fd => {
                    c.args[i] = fds.host_fd(c.args[i]).unwrap_or(NO_FD) as u64;
                    continue;
                }
                A::DirFd => {
                    if c.args[i] as i32 != libc::AT_FDCWD {
                        c.args[i] = fds.host_fd(c.args[i]).unwrap_or(NO_FD) as u64;
                    }
                    continue;
                }
                _ => {}
            }
            let slot = slots.next().unwrap_or(Slot::Null);
            let data = match slot {
                Slot::Null => {
                    c.args[i] = 0;
                    if matches!(kind, A::IovIn(_) | A::IovOut(_)) {
                        // No iovecs: a zero-length transfer through one empty iovec.
                        c.bufs[i] = Some(Vec::new());
                    }
                    continue;
                }
                Slot::Fault => {
                    c.fault[i] = true;
                    // Whatever length goes with it stays inside the guard region.
                    match kind {
                        A::In(n) | A::Out(n) if !neg[n as usize] => {
                            c.args[n as usize] = c.args[n as usize].min(GUARD_LEN as u64)
                        }
                        A::OutElems(n, size) | A::InOutElems(n, size) if !neg[n as usize] => {
                            let max = (GUARD_LEN / size as usize) as u64;
                            c.args[n as usize] = c.args[n as usize].min(max)
                        }
                        _ => {}
                    }
                    continue;
                }
                Slot::In(b) | Slot::InOut(b) => b,
                Slot::Out(n) => vec![0u8; n.min(MAX_XFER)],
            };
            c.out[i] = kind.is_out();
            let buf = match kind {
                A::Path => {
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    if end >= PATH_MAX {
                        return Err(ENAMETOOLONG);
                    }
                    let mut p = data;
                    p.truncate(end);
                    p.push(0);
                    match fds.rewrite_path(&p) {
                        Some(q) if q.len() <= PATH_MAX && q.ends_with(&[0]) => q,
                        Some(_) => return Err(ENAMETOOLONG),
                        None => p,
                    }
                }
                A::In(n) | A::Out(n) => {
                    let mut b = data;
                    b.truncate(MAX_XFER);
                    let n = n as usize;
                    if !neg[n] {
                        c.args[n] = c.args[n].min(b.len() as u64);
                    }
                    b
                }
                A::OutElems(n, size) | A::InOutElems(n, size) => {
                    let mut b = data;
                    let elems = (b.len().min(MAX_XFER) / size as usize) as u64;
                    let n = n as usize;
                    if matches!(kind, A::InOutElems(..)) {
                        // poll's nfds and setgroups' size are 32-bit in the kernel.
                        c.args[n] = c.args[n] as u32 as u64;
                    }
                    if !neg[n] {
                        c.args[n] = c.args[n].min(elems);
                        b.truncate(c.args[n] as usize * size as usize);
                    }
                    b
                }
                A::SIn(size) | A::SOut(size) | A::SInOut(size) => {
                    let mut b = data;
                    b.resize(size as usize, 0);
                    b
                }
                A::IovIn(_) | A::IovOut(_) => {
                    let mut b = data;
                    b.truncate(MAX_XFER);
                    b
                }
                A::FdSet(_) => data,
                A::LenOut(_) => {
                    let mut b = data;
                    b.truncate(MAX_SOCKBUF);
                    b
                }
                A::SigPack => {
                    let mut b = data;
                    b.truncate(128);
                    b
                }
                A::MsgIn | A::MsgOut => {
                    c.msg = Some(Self::msg(data, kind == A::MsgOut, fds)?);
                    Vec::new()
                }
                A::V | A::Fd | A::DirFd => unreachable!("handled above"),
            };
            c.bufs[i] = Some(buf);
        }
        // Lengths carried by reference: the socklen_t of a LenOut buffer.
        for (i, kind) in spec.iter().enumerate() {
            if let A::LenOut(n) = *kind {
                let cap = match c.fault[i] {
                    true => MAX_SOCKBUF,
                    false => c.bufs[i].as_ref().map_or(0, Vec::len),
                } as u32;
                if c.fault[n as usize] {
                    continue;
                }
                if let Some(l) = c.bufs[n as usize].as_mut().filter(|l| l.len() >= 4) {
                    let v = u32::from_le_bytes(l[..4].try_into().expect("4 bytes"));
                    l[..4].copy_from_slice(&v.min(cap).to_le_bytes());
                } else if !c.fault[i] {
                    c.bufs[i] = None;
                    c.args[i] = 0;
                }
            }
        }
        c.translate_fds(fds)?;
        Ok(c)
    }

    /// Decode a `msghdr` slot and translate the descriptors of its SCM_RIGHTS messages.
    fn msg(data: Vec<u8>, recv: bool, fds: &dyn FdMap) -> Result<Msg, i64> {
        let head = MsgHead::parse(&data).ok_or(EFAULT)?;
        let name_len = (head.name_len as usize).min(SOCKADDR_MAX);
        let control_len = head.control_len as usize;
        if control_len > MAX_CONTROL && !recv {
            return Err(ENOBUFS);
        }
        let control_len = control_len.min(MAX_CONTROL);
        let data_len = (head.data_len as usize).min(MAX_XFER);
        let (name, mut control, data) = if recv {
            (vec![0; name_len], vec![0; control_len], vec![0; data_len])
        } else {
            let body = &data[MSG_HEAD..];
            let name = body.get(..name_len).ok_or(EFAULT)?.to_vec();
            let control = body
                .get(name_len..name_len + control_len)
                .ok_or(EFAULT)?
                .to_vec();
            let rest = &body[name_len + control_len..];
            (name, control, rest[..data_len.min(rest.len())].to_vec())
        };
        if !recv {
            for (off, len, level, ty) in cmsgs(&control) {
                if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                    for k in (off..off + len / 4 * 4).step_by(4) {
                        let g = le_i32(&control[k..]);
                        let h = fds.host_fd(g as u64).unwrap_or(NO_FD);
                        control[k..k + 4].copy_from_slice(&h.to_le_bytes());
                    }
                }
            }
        }
        Ok(Msg {
            // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value.
            hdr: Box::new(unsafe { std::mem::zeroed() }),
            iov: Box::new(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }),
            name,
            control,
            data,
            recv,
        })
    }

    /// Translate the guest descriptors inside `pollfd` arrays and `fd_set`s to host ones.
    fn translate_fds(&mut self, fds: &dyn FdMap) -> Result<(), i64> {
        let is_poll = matches!(self.nr as i64, libc::SYS_poll | libc::SYS_ppoll);
        let mut max_host = -1i32;
        let mut any_set = false;
        for i in 0..6 {
            match self.spec[i] {
                A::InOutElems(..) if is_poll => {
                    let Some(b) = self.bufs[i].as_mut() else {
                        continue;
                    };
                    for e in b.chunks_exact_mut(8) {
                        let g = le_i32(e);
                        self.poll_guest.push(g);
                        if g >= 0 {
                            // An unknown descriptor becomes one no process has, so the kernel
                            // answers POLLNVAL for it; the guest's number comes back as it was.
                            let h = fds.host_fd(g as u64).unwrap_or(NO_FD);
                            e[0..4].copy_from_slice(&h.to_le_bytes());
                        }
                    }
                }
                A::FdSet(n) if self.fault[i] => {
                    // The kernel must reach the faulting set (and fail) as it would natively:
                    // it reads every set up to nfds.
                    any_set = true;
                    let nfds = (self.guest_args[n as usize] as i32).clamp(0, MAX_FDS as i32);
                    max_host = max_host.max(nfds - 1);
                }
                A::FdSet(n) => {
                    any_set = true;
                    let Some(guest) = self.bufs[i].take() else {
                        continue;
                    };
                    let nfds = (self.guest_args[n as usize] as i32).clamp(0, MAX_FDS as i32);
                    let mut map = Vec::new();
                    for g in 0..(nfds as usize).min(guest.len() * 8) {
                        if guest[g / 8] & (1 << (g % 8)) != 0 {
                            let h = fds.host_fd(g as u64)?;
                            map.push((g, h));
                            max_host = max_host.max(h);
                        }
                    }
                    self.fdset_maps.push((i, map));
                }
                _ => {}
            }
        }
        if any_set {
            if (self.guest_args[0] as i32) < 0 {
                return Err(EINVAL);
            }
            let nfds = (max_host + 1) as u64;
            self.args[0] = nfds;
            for (i, map) in &self.fdset_maps {
                let mut host = vec![0u8; host_set_bytes(nfds)];
                for &(_, h) in map {
                    host[h as usize / 8] |= 1 << (h % 8);
                }
                self.bufs[*i] = Some(host);
            }
        }
        Ok(())
    }

    /// The final host arguments: every pointer argument points into this call's own buffers.
    /// The pointers stay valid while `self` lives and is not changed.
    pub fn host_args(&mut self) -> [u64; 6] {
        let mut a = self.args;
        for i in 0..6 {
            if self.fault[i] {
                a[i] = guard();
                if let A::IovIn(n) | A::IovOut(n) = self.spec[i] {
                    a[n as usize] = 1;
                }
                continue;
            }
            match self.spec[i] {
                A::MsgIn | A::MsgOut => {
                    if let Some(m) = self.msg.as_mut() {
                        *m.iov = libc::iovec {
                            iov_base: m.data.as_mut_ptr().cast(),
                            iov_len: m.data.len(),
                        };
                        let h = &mut *m.hdr;
                        h.msg_name = if m.name.is_empty() {
                            std::ptr::null_mut()
                        } else {
                            m.name.as_mut_ptr().cast()
                        };
                        h.msg_namelen = m.name.len() as u32;
                        h.msg_iov = &mut *m.iov;
                        h.msg_iovlen = 1;
                        h.msg_control = if m.control.is_empty() {
                            std::ptr::null_mut()
                        } else {
                            m.control.as_mut_ptr().cast()
                        };
                        h.msg_controllen = m.control.len();
                        h.msg_flags = 0;
                        a[i] = &mut *m.hdr as *mut libc::msghdr as u64;
                    }
                }
                kind if kind.is_slot() => {
                    let Some(b) = self.bufs[i].as_mut() else {
                        a[i] = 0;
                        continue;
                    };
                    match kind {
                        A::IovIn(n) | A::IovOut(n) => {
                            *self.iov = libc::iovec {
                                iov_base: b.as_mut_ptr().cast(),
                                iov_len: b.len(),
                            };
                            a[i] = &*self.iov as *const libc::iovec as u64;
                            a[n as usize] = 1;
                        }
                        A::SigPack => {
                            *self.pack = [b.as_ptr() as u64, b.len() as u64];
                            a[i] = self.pack.as_ptr() as u64;
                        }
                        _ => a[i] = b.as_mut_ptr() as u64,
                    }
                }
                _ => {}
            }
        }
        a
    }

    /// Check that `a` (from [`Call::host_args`]) lets the kernel touch only this call's own
    /// buffers: every pointer is NULL or points at a buffer at least as long as the length the
    /// kernel will take for it. Err names the first argument that breaks this.
    pub fn verify(&self, a: &[u64; 6]) -> Result<(), String> {
        let within =
            |ptr: u64, len: u64, b: &[u8]| ptr == b.as_ptr() as u64 && len <= b.len() as u64;
        // The length the kernel takes from argument `n`: a C `int` length only by its low
        // 32 bits, and nothing at all when negative (it is refused first).
        let len = |n: u8| -> u64 {
            let v = a[n as usize];
            match table::int_len(self.nr, n) {
                true if (v as i32) < 0 => 0,
                true => v as i32 as u64,
                false => v,
            }
        };
        for i in 0..6 {
            let kind = self.spec[i];
            if !kind.is_slot() || a[i] == 0 {
                continue;
            }
            let bad = || Err(format!("{}: argument {i} ({kind:?})", table::name(self.nr)));
            if self.fault[i] {
                // The kernel may take at most GUARD_LEN bytes from the guard region.
                let len = match kind {
                    A::In(n) | A::Out(n) => len(n),
                    A::OutElems(n, size) | A::InOutElems(n, size) => {
                        len(n).saturating_mul(size as u64)
                    }
                    A::SIn(s) | A::SOut(s) | A::SInOut(s) => s as u64,
                    A::IovIn(n) | A::IovOut(n) => 16 * a[n as usize],
                    A::LenOut(n) => self.bufs[n as usize]
                        .as_ref()
                        .filter(|l| l.len() >= 4)
                        .map_or(0, |l| le_i32(l) as u32 as u64),
                    _ => 0,
                };
                if a[i] != guard() || len > GUARD_LEN as u64 {
                    return bad();
                }
                continue;
            }
            if let A::MsgIn | A::MsgOut = kind {
                let Some(m) = self.msg.as_ref() else {
                    return bad();
                };
                let h = &*m.hdr;
                let ok = a[i] == h as *const libc::msghdr as u64
                    && (h.msg_name.is_null()
                        || within(h.msg_name as u64, h.msg_namelen as u64, &m.name))
                    && (h.msg_control.is_null()
                        || within(h.msg_control as u64, h.msg_controllen as u64, &m.control))
                    && h.msg_iovlen == 1
                    && std::ptr::eq(h.msg_iov, &*m.iov)
                    && within(m.iov.iov_base as u64, m.iov.iov_len as u64, &m.data);
                if !ok {
                    return bad();
                }
                continue;
            }
            let Some(b) = self.bufs[i].as_ref() else {
                return bad();
            };
            let ok = match kind {
                A::Path => a[i] == b.as_ptr() as u64 && b.contains(&0),
                A::In(n) | A::Out(n) => within(a[i], len(n), b),
                A::OutElems(n, size) | A::InOutElems(n, size) => {
                    within(a[i], len(n).saturating_mul(size as u64), b)
                }
                A::SIn(size) | A::SOut(size) | A::SInOut(size) => within(a[i], size as u64, b),
                A::IovIn(n) | A::IovOut(n) => {
                    a[i] == &*self.iov as *const libc::iovec as u64
                        && a[n as usize] == 1
                        && within(self.iov.iov_base as u64, self.iov.iov_len as u64, b)
                }
                A::FdSet(_) => within(a[i], host_set_bytes(a[0]) as u64, b),
                // The kernel reads the length first: if that faults it touches nothing more.
                A::LenOut(n) if self.fault[n as usize] => a[n as usize] == guard(),
                A::LenOut(n) => {
                    let l = self.bufs[n as usize].as_ref().filter(|l| l.len() >= 4);
                    let len = l.map_or(u64::MAX, |l| le_i32(l) as u32 as u64);
                    a[n as usize] != 0 && within(a[i], len, b)
                }
                A::SigPack => {
                    a[i] == self.pack.as_ptr() as u64 && within(self.pack[0], self.pack[1], b)
                }
                A::V | A::Fd | A::DirFd | A::MsgIn | A::MsgOut => true,
            };
            if !ok {
                return bad();
            }
        }
        Ok(())
    }

    /// semctl's GETALL and SETALL take as many `unsigned short`s as the set has, whatever the
    /// request says: the set's size (from the host) must fit the array buffer this call owns.
    fn check_sem_array(&self, a: &[u64; 6]) -> Result<(), i64> {
        if self.nr as i64 != libc::SYS_semctl || !matches!(a[2] as i32, libc::GETALL | libc::SETALL)
        {
            return Ok(());
        }
        let Some(buf) = self.bufs[3]
            .as_ref()
            .filter(|_| !self.fault[3] && a[3] != 0)
        else {
            // NULL or the guard region: the kernel faults on it (the guard is far larger than
            // any set).
            return Ok(());
        };
        let mut ds = [0u8; 104];
        let out = ds.as_mut_ptr();
        // SAFETY: IPC_STAT writes one `struct semid_ds` (104 bytes on x86-64) at `out`, into `ds`.
        let r = unsafe { libc::syscall(libc::SYS_semctl, a[0], 0, libc::IPC_STAT, out) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as i64);
        }
        let nsems = u64::from_le_bytes(ds[80..88].try_into().expect("8 bytes"));
        if nsems.saturating_mul(2) > buf.len() as u64 {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// Run the call against the host: the raw return value, or -errno.
    pub fn run(&mut self) -> i64 {
        let mut a = self.host_args();
        if let Some(m) = self.msg.as_ref() {
            if m.recv {
                // Received descriptors are the deputy's own until installed in the guest's
                // table; they never leak into a child the host starts.
                a[2] |= libc::MSG_CMSG_CLOEXEC as u64;
            }
        }
        debug_assert_eq!(self.verify(&a), Ok(()));
        if let Err(e) = self.check_sem_array(&a) {
            return -e;
        }
        let bounce = self.direct_bounce(&mut a);
        let nr = self.nr as libc::c_long;
        // `verify` holds for `a`: every pointer argument points into a buffer this call owns,
        // at least as long as the length the kernel takes for it (the shapes come from the
        // shared table, the lengths were clamped to the buffers), and those buffers live until
        // `self` is dropped, after the call returns; an O_DIRECT transfer points instead into
        // `bounce`, as long as the buffer it stands for, alive until the copy back below.
        // SAFETY: as just said, the kernel only touches buffers this call owns; descriptors
        // are the guest's own, translated through its table.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        if let Some((i, off, b)) = bounce {
            if let Some(dst) = self.bufs[i].as_mut().filter(|_| self.out[i]) {
                let n = dst.len();
                dst.copy_from_slice(&b.as_slice()[off..off + n]);
            }
        }
        if r < 0 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as i64)
        } else {
            r as i64
        }
    }

    /// A read or write on a descriptor opened with O_DIRECT needs its buffer aligned as the
    /// device wants: the data moves through a page-aligned copy placed at the guest buffer's
    /// own offset within its page (so a buffer Linux would refuse is refused here too), and
    /// `a` points there. Returns (argument, offset, copy).
    fn direct_bounce(&mut self, a: &mut [u64; 6]) -> Option<(usize, usize, AlignedBuf)> {
        let transfer = matches!(
            self.nr as i64,
            libc::SYS_read
                | libc::SYS_write
                | libc::SYS_pread64
                | libc::SYS_pwrite64
                | libc::SYS_readv
                | libc::SYS_writev
                | libc::SYS_preadv
                | libc::SYS_pwritev
                | libc::SYS_preadv2
                | libc::SYS_pwritev2
        );
        if !transfer || self.fault[1] {
            return None;
        }
        // SAFETY: F_GETFL on a descriptor number reads its flags and touches no memory.
        let fl = unsafe { libc::fcntl(a[0] as i32, libc::F_GETFL) };
        if fl < 0 || fl & libc::O_DIRECT == 0 {
            return None;
        }
        let src = self.bufs[1].as_ref()?;
        let iov = matches!(self.spec[1], A::IovIn(_) | A::IovOut(_));
        let off = if iov {
            0
        } else {
            (self.guest_args[1] & 4095) as usize
        };
        let n = src.len();
        let mut b = AlignedBuf::new(off + n)?;
        b.as_mut_slice()[off..off + n].copy_from_slice(src);
        let ptr = b.as_mut_slice()[off..].as_mut_ptr();
        if iov {
            self.iov.iov_base = ptr.cast();
        } else {
            a[1] = ptr as u64;
        }
        Some((1, off, b))
    }

    /// The reply for result `ret`: every output buffer in argument order, each only as long as
    /// what the host wrote, with descriptors translated back to the guest's numbers.
    pub fn finish(mut self, ret: i64, fds: &mut dyn FdMap) -> Reply {
        // Descriptors inside outputs go back to the guest's numbers.
        for i in 0..6 {
            match self.spec[i] {
                A::InOutElems(..) if !self.poll_guest.is_empty() => {
                    if let Some(b) = self.bufs[i].as_mut() {
                        for (e, &g) in b.chunks_exact_mut(8).zip(&self.poll_guest) {
                            e[0..4].copy_from_slice(&g.to_le_bytes());
                        }
                    }
                }
                A::FdSet(_) => {
                    let map = self
                        .fdset_maps
                        .iter()
                        .find(|(k, _)| *k == i)
                        .map(|(_, m)| m.as_slice())
                        .unwrap_or(&[]);
                    let host = self.bufs[i].take().unwrap_or_default();
                    let mut guest = vec![0u8; fdset_bytes(self.guest_args[0])];
                    if ret >= 0 {
                        for &(g, h) in map {
                            let h = h as usize;
                            if host.get(h / 8).is_some_and(|b| b & (1 << (h % 8)) != 0) {
                                guest[g / 8] |= 1 << (g % 8);
                            }
                        }
                    }
                    self.bufs[i] = Some(guest);
                }
                _ => {}
            }
        }
        let mut outs = Vec::new();
        for i in 0..6 {
            let kind = self.spec[i];
            if let A::MsgOut = kind {
                if let Some(m) = self.msg.take() {
                    let cloexec = self.guest_args[2] & libc::MSG_CMSG_CLOEXEC as u64 != 0;
                    outs.push(Self::msg_reply(m, ret, cloexec, fds));
                }
                continue;
            }
            if !self.out[i] {
                continue;
            }
            let Some(mut b) = self.bufs[i].take() else {
                continue;
            };
            let written = |n: i64| (n.max(0) as usize).min(b.len());
            let keep = match kind {
                A::Out(_) | A::IovOut(_) => written(ret),
                A::OutElems(_, size) => written(ret.saturating_mul(size as i64)),
                A::LenOut(n) => {
                    let l = self.bufs[n as usize]
                        .as_ref()
                        .map_or(0, |l| le_i32(l) as u32);
                    (l as usize).min(b.len())
                }
                _ => b.len(),
            };
            if ret < 0 && !matches!(kind, A::SInOut(_) | A::LenOut(_)) {
                b.clear();
            } else {
                b.truncate(keep);
            }
            outs.push(b);
        }
        Reply { ret, outs }
    }

    /// recvmsg's reply slot: the header as the kernel left it, then name, control, data;
    /// received descriptors enter the guest's table.
    fn msg_reply(mut m: Msg, r: i64, cloexec: bool, fds: &mut dyn FdMap) -> Vec<u8> {
        let h = *m.hdr;
        if r < 0 {
            return MsgHead::default().to_bytes().to_vec();
        }
        let name_len = (h.msg_namelen as usize).min(m.name.len());
        let control_len = h.msg_controllen.min(m.control.len());
        // MSG_CMSG_CLOEXEC was the deputy's own addition: the guest sees it only if it asked.
        let mut flags = h.msg_flags & !(libc::MSG_CMSG_CLOEXEC * !cloexec as i32);
        for (off, len, level, ty) in cmsgs(&m.control[..control_len]) {
            if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                for k in (off..off + len / 4 * 4).step_by(4) {
                    let host = le_i32(&m.control[k..]);
                    let g = fds.install(host, cloexec);
                    if g < 0 {
                        flags |= libc::MSG_CTRUNC;
                    }
                    let g = if g < 0 { -1 } else { g as i32 };
                    m.control[k..k + 4].copy_from_slice(&g.to_le_bytes());
                }
            }
        }
        let data_len = (r as usize).min(m.data.len());
        let head = MsgHead {
            name_len: h.msg_namelen,
            control_len: control_len as u32,
            flags: flags as u32,
            data_len: data_len as u64,
        };
        let mut out = head.to_bytes().to_vec();
        out.extend_from_slice(&m.name[..name_len]);
        out.extend_from_slice(&m.control[..control_len]);
        out.extend_from_slice(&m.data[..data_len]);
        out
    }
}

#[cfg(test)]
#[path = "marshal_tests.rs"]
mod tests;
