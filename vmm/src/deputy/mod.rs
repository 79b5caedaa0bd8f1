//! The deputy: the home side of forwarded syscalls (MOSIX's system context, which never
//! migrates). It holds the guest's descriptor table and runs home-dependent calls against the
//! host with the user's own rights.
//!
//! The interface is one self-contained [`Request`] (every input buffer) in, one [`Reply`] (every
//! output buffer) out, so a network can later sit between the VMM and the deputy without
//! touching syscall code. The argument shapes come from the shared table (`table::spec`).

pub mod marshal;
pub mod pseudo;

pub use pseudo::{EXEC_CHECK, FORK_AWAY, RELEASE_TID, RESERVE_TID, STOP_AT_HOME};

use crate::table;

/// One buffer argument of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// A NULL pointer.
    Null,
    /// Input bytes.
    In(Vec<u8>),
    /// An output buffer of this many bytes.
    Out(usize),
    /// Input bytes that the call may change (they come back in the reply).
    InOut(Vec<u8>),
    /// Guest memory that could not be read or written: the host call gets a pointer into
    /// memory that always faults (`marshal::guard`), so the kernel answers EFAULT at the point
    /// Linux would, after its own descriptor and flag checks.
    Fault,
}

/// A forwarded syscall: number, raw arguments, and one slot per buffer argument, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Syscall number.
    pub nr: u64,
    /// Raw arguments (buffer arguments' values are the guest's pointers, unused at home).
    pub args: [u64; 6],
    /// Buffer arguments, in argument order.
    pub slots: Vec<Slot>,
}

/// The result: the raw return value (negative errno on failure) and one buffer per `Out` or
/// `InOut` slot, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// Return value, or -errno.
    pub ret: i64,
    /// Output buffers.
    pub outs: Vec<Vec<u8>>,
}

impl Reply {
    /// A failed call: -errno and no buffers.
    pub fn err(errno: i64) -> Reply {
        Reply {
            ret: -errno,
            outs: vec![],
        }
    }
}

/// Anything that executes forwarded syscalls.
pub trait Deputy: Send {
    /// Execute one request.
    fn call(&mut self, req: Request) -> Reply;

    /// pread of guest descriptor `fd` at `off` into `dst` (file-backed mmap). The default goes
    /// through [`Deputy::call`]; a deputy in the same process reads straight into `dst`.
    fn pread_into(&mut self, fd: u64, off: u64, dst: &mut [u8]) -> i64 {
        let n = dst.len();
        let r = self.call(Request {
            nr: libc::SYS_pread64 as u64,
            args: [fd, 0, n as u64, off, 0, 0],
            slots: vec![Slot::Out(n)],
        });
        if r.ret > 0 {
            let k = (r.ret as usize)
                .min(n)
                .min(r.outs.first().map_or(0, Vec::len));
            dst[..k].copy_from_slice(&r.outs[0][..k]);
            return k as i64;
        }
        r.ret
    }

    /// The host descriptor behind guest descriptor `fd`, when the deputy runs in this process
    /// (at home): the VMM maps the file itself (see [`crate::window`]). None when away.
    fn local_fd(&self, fd: u64) -> Option<i32> {
        let _ = fd;
        None
    }

    /// Whether the deputy runs in this process (the guest is at home).
    fn is_local(&self) -> bool {
        false
    }

    /// execve(2) succeeded: close the descriptors marked close-on-exec; `exe` is the new
    /// program (/proc/self/exe). Only a deputy at home sees it (exec runs at home).
    fn exec(&mut self, exe: &std::path::Path) {
        let _ = exe;
    }

    /// This deputy is the child's copy after a host fork(2): what it owns with the parent
    /// (temporary directories) stays the parent's.
    fn forked(&mut self) {}

    /// Away from home, the guest forks: have home fork the child's deputy
    /// ([`FORK_AWAY`]) and get ready for it to connect to this host's copy of the guest after
    /// the host fork. `Some(Ok(pid))`: the child's pid; `Some(Err(errno))`: the fork failed
    /// at home; `None`: this deputy cannot (at home, where the VMM and the deputy fork
    /// together).
    fn fork_away(&mut self) -> Option<Result<i64, i64>> {
        None
    }

    /// Hand over everything this deputy holds to a new box, leaving an empty deputy behind
    /// (the child of a fork at home takes the deputy its parent's link served, which it
    /// borrows). None when this deputy cannot be taken.
    fn take(&mut self) -> Option<Box<dyn Deputy>> {
        None
    }

    /// Away from home: ask for the guest to be brought home (a call that can only run there,
    /// such as making a writable shared mapping, waits for it). False when nothing can bring
    /// it (at home, or no node to ask).
    fn request_home(&mut self) -> bool {
        false
    }

    /// Start a request whose host call may block, so that it can run without this deputy
    /// (another thread of the guest uses it meanwhile): `Done` when it ran to the end here,
    /// else the host call to make ([`Pending::run`]) and hand back to [`Deputy::complete`].
    fn begin(&mut self, req: Request) -> Begun {
        Begun::Done(self.call(req))
    }

    /// Finish what [`Deputy::begin`] left pending, with its host call's result.
    fn complete(&mut self, p: Box<Pending>, ret: i64) -> Reply {
        let _ = (p, ret);
        Reply::err(libc::EIO as i64)
    }
}

/// What [`Deputy::begin`] made of a request.
pub enum Begun {
    /// The reply.
    Done(Reply),
    /// The host call still to make.
    Pending(Box<Pending>),
    /// The reply is made elsewhere (at home, for a deputy across the link): wait for it,
    /// without the deputy.
    Waiting(Box<dyn FnOnce() -> Reply + Send>),
}

/// A host call prepared by a deputy, owning its buffers: it needs nothing of the deputy.
pub struct Pending {
    call: marshal::Call,
    nr: u64,
    args: [u64; 6],
}

impl Pending {
    /// Make the host call: its return value or -errno.
    pub fn run(&mut self) -> i64 {
        self.call.run()
    }
}

#[derive(Debug, Clone, Copy)]
struct GuestFd {
    host: i32,
    cloexec: bool,
}

/// Descriptors an `fd_set` covers (`FD_SETSIZE`).
pub const MAX_FDS: usize = 1024;

/// Most guest descriptors the table ever holds (Linux's default `fs.nr_open`).
pub const NR_OPEN: u64 = 1 << 20;

/// The deputy running in this process, against this host.
pub struct HostDeputy {
    fds: Vec<Option<GuestFd>>,
    /// The guest's RLIMIT_NOFILE soft limit: guest descriptors are below it (the VMM's own
    /// descriptors do not count).
    nofile: u64,
    /// The program's path, what the guest sees as /proc/self/exe.
    exe: Option<Vec<u8>>,
    /// Directories standing for the guest's /proc/self/fd, by the guest descriptor they were
    /// opened as (removed when it is closed, or with the deputy).
    fd_dirs: Vec<(u64, std::path::PathBuf)>,
}

fn errno() -> i64 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO) as i64
}

const EBADF: i64 = libc::EBADF as i64;
const EINVAL: i64 = libc::EINVAL as i64;
const EMFILE: i64 = libc::EMFILE as i64;
const ENOTTY: i64 = libc::ENOTTY as i64;

/// Bytes of an `fd_set` holding `nfds` descriptors.
pub fn fdset_bytes(nfds: u64) -> usize {
    (nfds.min(MAX_FDS as u64) as usize).div_ceil(64) * 8
}

/// Give this process room for its own descriptors beyond the guest's RLIMIT_NOFILE: the
/// guest's table is bounded by the limit it started with (the deputy enforces it), while the
/// VMM's own descriptors (KVM, links, duplicates of stdio) must not count against it. Raises
/// the soft limit to the hard one, and both by 256 where the host allows it (root).
pub fn raise_own_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the rlimit they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return;
        }
        let more = l.rlim_max.saturating_add(256);
        let up = libc::rlimit {
            rlim_cur: more,
            rlim_max: more,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) != 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

impl HostDeputy {
    /// A deputy whose guest descriptors 0, 1, 2 are this process's stdin, stdout, stderr.
    /// (They are duplicated, so a guest closing its stderr cannot silence the VMM's messages.)
    /// Those that were closed when this process started stay closed for the guest
    /// ([`crate::startup`]).
    pub fn new() -> Self {
        Self::with_stdio([0, 1, 2].map(|fd| {
            if crate::startup::std_fd_was_closed(fd) {
                -1
            } else {
                fd
            }
        }))
    }

    /// Take into the guest's table, under the same numbers, the descriptors above 2 this
    /// process inherited (those not marked close-on-exec: every descriptor the VMM opens
    /// itself is): a program started with `7<file`, or a bash process substitution's
    /// `/dev/fd/63`, finds them as natively. Call before the VMM opens anything it would not
    /// mark so.
    pub fn inheriting(mut self) -> Self {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return self;
        };
        let mut fds: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        fds.sort_unstable();
        for fd in fds {
            // SAFETY: F_GETFD on a descriptor number touches no memory.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 || flags & libc::FD_CLOEXEC != 0 || fd as u64 >= self.nofile {
                continue;
            }
            // SAFETY: duplicating (close-on-exec, above 2) then closing the inherited
            // descriptor, which nothing else in this process uses.
            let host = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if host < 0 {
                continue;
            }
            // SAFETY: as above.
            unsafe { libc::close(fd) };
            let g = fd as usize;
            if self.fds.len() <= g {
                self.fds.resize(g + 1, None);
            }
            self.fds[g] = Some(GuestFd {
                host,
                cloexec: false,
            });
        }
        self
    }

    /// A deputy whose guest descriptors 0, 1, 2 are duplicates of these host descriptors.
    pub fn with_stdio(stdio: [i32; 3]) -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 1024,
            rlim_max: 1024,
        };
        // SAFETY: getrlimit fills in the rlimit it is given.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        let mut d = HostDeputy {
            fds: vec![None; 3],
            fd_dirs: Vec::new(),
            nofile: lim.rlim_cur.min(NR_OPEN),
            exe: None,
        };
        for (g, fd) in stdio.into_iter().enumerate() {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor number only creates a new descriptor or
            // fails; it touches no memory.
            let host = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if host >= 0 {
                d.fds[g] = Some(GuestFd {
                    host,
                    cloexec: false,
                });
            }
        }
        d
    }

    /// Make /proc/self/exe name `exe` (the guest program, not the VMM).
    pub fn with_exe(mut self, exe: &std::path::Path) -> Self {
        let abs = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
        self.exe = Some(abs.into_os_string().into_encoded_bytes());
        self
    }

    /// Paths that name the caller's own descriptors or executable mean the guest's, not the
    /// VMM's: /proc/self/fd/N, /proc/self/fdinfo/N, /dev/fd/N, /dev/std{in,out,err},
    /// /proc/self/exe.
    fn rewrite_path(&self, path: &[u8]) -> Option<Vec<u8>> {
        let p = path.strip_suffix(b"\0").unwrap_or(path);
        let pid = std::process::id().to_string();
        let own_proc = [
            b"/proc/self/".to_vec(),
            b"/proc/thread-self/".to_vec(),
            [b"/proc/".as_slice(), pid.as_bytes(), b"/"].concat(),
        ];
        let mut rest: Option<&[u8]> = None;
        let mut dir = "fd";
        for prefix in &own_proc {
            if let Some(r) = p.strip_prefix(prefix.as_slice()) {
                if r == b"exe" {
                    let mut e = self.exe.clone()?;
                    e.push(0);
                    return Some(e);
                }
                rest = r.strip_prefix(b"fd/");
                if let Some(i) = r.strip_prefix(b"fdinfo/") {
                    (rest, dir) = (Some(i), "fdinfo");
                }
            }
        }
        let (num, tail): (&[u8], &[u8]) = match (rest, p) {
            (Some(r), _) => {
                let end = r.iter().position(|&c| c == b'/').unwrap_or(r.len());
                (&r[..end], &r[end..])
            }
            (None, b"/dev/stdin") => (b"0", b""),
            (None, b"/dev/stdout") => (b"1", b""),
            (None, b"/dev/stderr") => (b"2", b""),
            (None, _) => {
                let r = p.strip_prefix(b"/dev/fd/")?;
                let end = r.iter().position(|&c| c == b'/').unwrap_or(r.len());
                (&r[..end], &r[end..])
            }
        };
        let guest: u64 = std::str::from_utf8(num).ok()?.parse().ok()?;
        // An unknown descriptor maps to a number no process has, so the lookup fails (ENOENT).
        let host = self.host_fd(guest).unwrap_or(i32::MAX);
        let mut out = format!("/proc/self/{dir}/{host}").into_bytes();
        out.extend_from_slice(tail);
        out.push(0);
        Some(out)
    }

    /// readlink of /proc/self/exe answers with the guest program's path.
    fn readlink_exe(&self, req: &Request) -> Option<Reply> {
        let (path_slot, size) = match req.nr as i64 {
            libc::SYS_readlink => (req.slots.first()?, req.args[2]),
            libc::SYS_readlinkat => (req.slots.first()?, req.args[3]),
            _ => return None,
        };
        let Slot::In(p) = path_slot else { return None };
        let p = p.strip_suffix(b"\0").unwrap_or(p);
        let pid = format!("/proc/{}/exe", std::process::id());
        if p != b"/proc/self/exe" && p != b"/proc/thread-self/exe" && p != pid.as_bytes() {
            return None;
        }
        let exe = self.exe.as_ref()?;
        let n = exe.len().min(size as usize);
        Some(Reply {
            ret: n as i64,
            outs: vec![exe[..n].to_vec()],
        })
    }

    fn host_fd(&self, guest: u64) -> Result<i32, i64> {
        let g = guest as i32;
        if g < 0 {
            return Err(EBADF);
        }
        self.fds
            .get(g as usize)
            .copied()
            .flatten()
            .map(|f| f.host)
            .ok_or(EBADF)
    }

    /// Install a host descriptor at the lowest free guest number >= `min`.
    fn install(&mut self, host: i32, min: usize, cloexec: bool) -> i64 {
        let slot =
            (min..self.nofile as usize).find(|&i| self.fds.get(i).is_none_or(|f| f.is_none()));
        match slot {
            Some(i) => {
                if self.fds.len() <= i {
                    self.fds.resize(i + 1, None);
                }
                self.fds[i] = Some(GuestFd { host, cloexec });
                i as i64
            }
            None => {
                close_host(host);
                -EMFILE
            }
        }
    }

    fn install_at(&mut self, host: i32, at: usize, cloexec: bool) {
        if self.fds.len() <= at {
            self.fds.resize(at + 1, None);
        }
        if let Some(old) = self.fds[at].take() {
            close_host(old.host);
        }
        self.fds[at] = Some(GuestFd { host, cloexec });
    }

    fn close(&mut self, guest: u64) -> i64 {
        match self
            .fds
            .get_mut(guest as i32 as usize)
            .and_then(Option::take)
        {
            Some(f) => {
                close_host(f.host);
                if let Some(i) = self.fd_dirs.iter().position(|(g, _)| *g == guest) {
                    let _ = std::fs::remove_dir_all(self.fd_dirs.swap_remove(i).1);
                }
                0
            }
            None => -EBADF,
        }
    }

    /// An open of the guest's own descriptor directory (/proc/self/fd, /dev/fd): a directory
    /// of symbolic links named by the guest's descriptor numbers, each pointing where the
    /// descriptor does, the new descriptor itself included, as Linux lists it.
    fn open_fd_dir(&mut self, req: &Request) -> Option<i64> {
        let (path, flags) = match req.nr as i64 {
            libc::SYS_open => (req.slots.first()?, req.args[1]),
            libc::SYS_openat => (req.slots.first()?, req.args[2]),
            _ => return None,
        };
        let Slot::In(p) = path else { return None };
        let p = p.strip_suffix(b"\0").unwrap_or(p);
        let p = p.strip_suffix(b"/").unwrap_or(p);
        let pid = format!("/proc/{}/fd", std::process::id());
        let names: [&[u8]; 4] = [
            b"/proc/self/fd",
            b"/proc/thread-self/fd",
            b"/dev/fd",
            pid.as_bytes(),
        ];
        if !names.contains(&p) || flags & libc::O_ACCMODE as u64 != libc::O_RDONLY as u64 {
            return None;
        }
        let own =
            (0..self.nofile as usize).find(|&i| self.fds.get(i).is_none_or(|f| f.is_none()))?;
        let dir = std::env::temp_dir().join(format!(
            "mosvm-fd-{}-{own}-{}",
            std::process::id(),
            self.fd_dirs.len()
        ));
        if std::fs::create_dir(&dir).is_err() {
            return Some(-(libc::EACCES as i64));
        }
        for (g, f) in self.fds.iter().enumerate() {
            if let Some(f) = f {
                let target = std::fs::read_link(format!("/proc/self/fd/{}", f.host))
                    .unwrap_or_else(|_| "anon_inode:[unknown]".into());
                let _ = std::os::unix::fs::symlink(target, dir.join(g.to_string()));
            }
        }
        let _ = std::os::unix::fs::symlink(&pid, dir.join(own.to_string()));
        let file = match std::fs::File::open(&dir) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Some(-(e.raw_os_error().unwrap_or(libc::EIO) as i64));
            }
        };
        let host = std::os::fd::IntoRawFd::into_raw_fd(file);
        let g = self.install(host, own, flags & libc::O_CLOEXEC as u64 != 0);
        self.fd_dirs.push((g as u64, dir));
        Some(g)
    }

    fn dup_host(host: i32) -> Result<i32, i64> {
        // SAFETY: duplicating a descriptor touches no memory.
        let h = unsafe { libc::fcntl(host, libc::F_DUPFD_CLOEXEC, 3) };
        if h < 0 {
            Err(errno())
        } else {
            Ok(h)
        }
    }

    /// Calls that act on the descriptor table itself.
    fn fd_call(&mut self, req: &Request) -> Option<i64> {
        let a = &req.args;
        let r = match req.nr as i64 {
            libc::SYS_close => self.close(a[0]),
            libc::SYS_close_range => {
                // close_range(2): unknown flags or first > last are EINVAL.
                let known = (libc::CLOSE_RANGE_CLOEXEC | libc::CLOSE_RANGE_UNSHARE) as u64;
                if a[2] & !known != 0 || a[0] as u32 > a[1] as u32 {
                    return Some(-EINVAL);
                }
                let (first, last) = (a[0] as u32 as usize, a[1] as u32 as usize);
                for g in first..=last.min(self.fds.len().saturating_sub(1)) {
                    if a[2] & libc::CLOSE_RANGE_CLOEXEC as u64 != 0 {
                        if let Some(f) = self.fds[g].as_mut() {
                            f.cloexec = true;
                        }
                    } else {
                        self.close(g as u64);
                    }
                }
                0
            }
            libc::SYS_dup => match self.host_fd(a[0]).and_then(Self::dup_host) {
                Ok(h) => self.install(h, 0, false),
                Err(e) => -e,
            },
            libc::SYS_dup2 | libc::SYS_dup3 => {
                // dup2(2), in the kernel's order: dup3's flags and equal descriptors, then
                // the new number's range, then the old descriptor.
                let is3 = req.nr as i64 == libc::SYS_dup3;
                let new = a[1] as i32;
                if is3 && (a[2] & !(libc::O_CLOEXEC as u64) != 0 || a[0] as i32 == new) {
                    return Some(-EINVAL);
                }
                if new < 0 || new as u64 >= self.nofile {
                    return Some(-EBADF);
                }
                let old = match self.host_fd(a[0]) {
                    Ok(h) => h,
                    Err(e) => return Some(-e),
                };
                if a[0] as i32 == new {
                    return Some(new as i64);
                }
                match Self::dup_host(old) {
                    Ok(h) => {
                        let cloexec = is3 && a[2] & libc::O_CLOEXEC as u64 != 0;
                        self.install_at(h, new as usize, cloexec);
                        new as i64
                    }
                    Err(e) => -e,
                }
            }
            libc::SYS_fcntl => {
                let g = a[0] as i32;
                match a[1] as i32 {
                    libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
                        let min = a[2] as i32;
                        if let Err(e) = self.host_fd(a[0]) {
                            return Some(-e);
                        }
                        if min < 0 || min as u64 >= self.nofile {
                            return Some(-EINVAL);
                        }
                        match self.host_fd(a[0]).and_then(Self::dup_host) {
                            Ok(h) => {
                                self.install(h, min as usize, a[1] as i32 == libc::F_DUPFD_CLOEXEC)
                            }
                            Err(e) => -e,
                        }
                    }
                    libc::F_GETFD => match self.fds.get(g as usize).copied().flatten() {
                        Some(f) => f.cloexec as i64,
                        None => -EBADF,
                    },
                    libc::F_SETFD => match self.fds.get_mut(g as usize).and_then(|f| f.as_mut()) {
                        Some(f) => {
                            f.cloexec = a[2] & libc::FD_CLOEXEC as u64 != 0;
                            0
                        }
                        None => -EBADF,
                    },
                    _ => return None,
                }
            }
            libc::SYS_ioctl if matches!(a[1] & 0xffff_ffff, 0x5450 | 0x5451) => {
                match self
                    .fds
                    .get_mut(a[0] as i32 as usize)
                    .and_then(|f| f.as_mut())
                {
                    Some(f) => {
                        f.cloexec = a[1] & 0xffff_ffff == 0x5451;
                        0
                    }
                    None => -EBADF,
                }
            }
            libc::SYS_gettid => std::process::id() as i64,
            // The VMM tells its deputy the guest's new RLIMIT_NOFILE soft limit (prlimit is
            // the VMM's; only the bound on the descriptor table lives here).
            libc::SYS_prlimit64 if a[1] == libc::RLIMIT_NOFILE as u64 => {
                self.nofile = a[2].min(NR_OPEN);
                0
            }
            _ => return None,
        };
        Some(r)
    }

    /// Run a request whose arguments follow the table spec, through the marshalling choke
    /// point (`marshal`): the host call sees only buffers built here. This first half builds
    /// the host call; [`HostDeputy::finish`] takes its result (in between it needs nothing
    /// of the deputy, so another thread may use the deputy while it blocks).
    fn prepare(&mut self, req: Request) -> Result<Pending, Reply> {
        let base = match table::lookup(req.nr).map(|e| e.class) {
            Some(table::Class::Home(s)) => s,
            _ => match table::also_home(req.nr) {
                Some(s) => s,
                None => return Err(Reply::err(libc::ENOSYS as i64)),
            },
        };
        let nr = req.nr;
        let args = req.args;
        match marshal::Call::prepare(req, base, self) {
            Ok(call) => Ok(Pending { call, nr, args }),
            Err(e) => Err(Reply::err(e)),
        }
    }

    /// The second half of [`HostDeputy::prepare`]: the reply, with new descriptors installed
    /// in the guest's table.
    fn finish(&mut self, p: Pending, ret: i64) -> Reply {
        let Pending { call, nr, args } = p;
        let mut reply = call.finish(ret, self);
        if reply.ret >= 0 {
            if table::returns_fd(nr) {
                let host = reply.ret as i32;
                let by_path = matches!(
                    nr as i64,
                    libc::SYS_open | libc::SYS_openat | libc::SYS_openat2 | libc::SYS_creat
                );
                if by_path && self.reaches_vmm(host) {
                    close_host(host);
                    return Reply::err(libc::EACCES as i64);
                }
                let cloexec = self.new_fd_cloexec(&nr, &args);
                reply.ret = self.install(host, 0, cloexec);
            } else if matches!(
                nr as i64,
                libc::SYS_pipe | libc::SYS_pipe2 | libc::SYS_socketpair
            ) {
                if let Some(buf) = reply.outs.first_mut().filter(|b| b.len() >= 8) {
                    let cloexec = match nr as i64 {
                        libc::SYS_pipe2 => args[1] & libc::O_CLOEXEC as u64 != 0,
                        libc::SYS_socketpair => args[1] & libc::SOCK_CLOEXEC as u64 != 0,
                        _ => false,
                    };
                    let h0 = i32::from_le_bytes(buf[0..4].try_into().expect("int[2]"));
                    let h1 = i32::from_le_bytes(buf[4..8].try_into().expect("int[2]"));
                    let g0 = self.install(h0, 0, cloexec);
                    let g1 = self.install(h1, 0, cloexec);
                    if g0 < 0 || g1 < 0 {
                        reply.ret = -EMFILE;
                    } else {
                        buf[0..4].copy_from_slice(&(g0 as i32).to_le_bytes());
                        buf[4..8].copy_from_slice(&(g1 as i32).to_le_bytes());
                    }
                }
            }
        }
        reply
    }

    /// Whether host descriptor `h`, just opened for the guest, reaches into this process (the
    /// VMM) rather than into a file: this process's memory (`/proc/PID/mem`, `pagemap`,
    /// `map_files/` of itself or any of its threads, however the path got there), or through
    /// a `/proc/PID/fd/N` magic link one of the VMM's own pipes, sockets or anonymous inodes
    /// (anything without a path that is not one of the guest's own descriptors). Such an open
    /// is refused with EACCES, as Linux refuses a process that may not trace its target.
    fn reaches_vmm(&self, h: i32) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{h}")) else {
            return false;
        };
        let t = target.as_os_str().as_bytes();
        if let Some(rest) = t.strip_prefix(b"/proc/") {
            let end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
            let Some(n) = std::str::from_utf8(&rest[..end])
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                return false;
            };
            let own = n == std::process::id()
                || std::path::Path::new(&format!("/proc/self/task/{n}")).exists();
            let mut tail = rest.get(end + 1..).unwrap_or(b"");
            if let Some(t) = tail.strip_prefix(b"task/") {
                tail = t
                    .iter()
                    .position(|&c| c == b'/')
                    .map_or(b"", |i| &t[i + 1..]);
            }
            return own && (tail == b"mem" || tail == b"pagemap" || tail.starts_with(b"map_files"));
        }
        if t.starts_with(b"/") {
            return false;
        }
        let id = |fd: i32| {
            // SAFETY: fstat fills the stat buffer it is given.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `st` is a valid stat buffer.
            (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
        };
        let Some(me) = id(h) else { return true };
        !self.fds.iter().flatten().any(|f| id(f.host) == Some(me))
    }

    fn new_fd_cloexec(&self, nr: &u64, a: &[u64; 6]) -> bool {
        let flag = |v: u64, bit: i32| v & bit as u64 != 0;
        match *nr as i64 {
            libc::SYS_open => flag(a[1], libc::O_CLOEXEC),
            libc::SYS_openat => flag(a[2], libc::O_CLOEXEC),
            libc::SYS_socket => flag(a[1], libc::SOCK_CLOEXEC),
            libc::SYS_accept4 => flag(a[3], libc::SOCK_CLOEXEC),
            libc::SYS_eventfd2 => flag(a[1], libc::EFD_CLOEXEC),
            libc::SYS_epoll_create1 => flag(a[0], libc::EPOLL_CLOEXEC),
            libc::SYS_memfd_create => flag(a[1], libc::MFD_CLOEXEC as i32),
            libc::SYS_inotify_init1 => flag(a[0], libc::IN_CLOEXEC),
            libc::SYS_timerfd_create => flag(a[1], libc::TFD_CLOEXEC),
            _ => false,
        }
    }
}

fn close_host(h: i32) {
    // SAFETY: closing a descriptor this deputy owns (installed from a host call's result).
    unsafe {
        libc::close(h);
    }
}

impl marshal::FdMap for HostDeputy {
    fn host_fd(&self, guest: u64) -> Result<i32, i64> {
        HostDeputy::host_fd(self, guest)
    }

    fn rewrite_path(&self, path: &[u8]) -> Option<Vec<u8>> {
        HostDeputy::rewrite_path(self, path)
    }

    fn install(&mut self, host: i32, cloexec: bool) -> i64 {
        HostDeputy::install(self, host, 0, cloexec)
    }
}

impl Default for HostDeputy {
    fn default() -> Self {
        Self::new()
    }
}

impl HostDeputy {
    /// [`EXEC_CHECK`]: the program is looked up as the guest's execveat would, from the
    /// guest's descriptor.
    fn exec_check(&self, req: &Request) -> Reply {
        let (dirfd, flags) = (req.args[0] as i32, req.args[1] as i32);
        let [Slot::In(path)] = req.slots.as_slice() else {
            return Reply::err(EINVAL);
        };
        let dir = if dirfd == libc::AT_FDCWD || path.first() == Some(&b'/') {
            libc::AT_FDCWD
        } else {
            match self.host_fd(dirfd as u32 as u64) {
                Ok(h) => h,
                Err(e) => return Reply::err(e),
            }
        };
        match crate::vm::check_program(dir, path, flags) {
            Ok(()) => Reply::default(),
            Err(e) => Reply::err(e),
        }
    }
}

impl Drop for HostDeputy {
    fn drop(&mut self) {
        for f in self.fds.drain(..).flatten() {
            close_host(f.host);
        }
        for (_, dir) in self.fd_dirs.drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Deputy for HostDeputy {
    fn forked(&mut self) {
        // The parent removes them; the child's copies of their descriptors stay usable.
        self.fd_dirs.clear();
        pseudo::clear_held(false);
    }

    fn take(&mut self) -> Option<Box<dyn Deputy>> {
        let empty = HostDeputy {
            fds: vec![None; 3],
            fd_dirs: Vec::new(),
            nofile: self.nofile,
            exe: None,
        };
        Some(Box::new(std::mem::replace(self, empty)))
    }

    fn exec(&mut self, exe: &std::path::Path) {
        pseudo::clear_held(true);
        let doomed: Vec<u64> = self
            .fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_some_and(|f| f.cloexec))
            .map(|(i, _)| i as u64)
            .collect();
        for fd in doomed {
            self.close(fd);
        }
        let abs = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
        self.exe = Some(abs.into_os_string().into_encoded_bytes());
    }

    fn local_fd(&self, fd: u64) -> Option<i32> {
        self.host_fd(fd).ok()
    }

    fn is_local(&self) -> bool {
        true
    }

    fn pread_into(&mut self, fd: u64, off: u64, dst: &mut [u8]) -> i64 {
        let host = match self.host_fd(fd) {
            Ok(h) => h,
            Err(e) => return -e,
        };
        // SAFETY: `dst` is a valid, writable buffer of `dst.len()` bytes.
        let r = unsafe {
            libc::pread(
                host,
                dst.as_mut_ptr() as *mut libc::c_void,
                dst.len(),
                off as i64,
            )
        };
        if r < 0 {
            -errno()
        } else {
            r as i64
        }
    }

    fn call(&mut self, req: Request) -> Reply {
        match self.begin(req) {
            Begun::Done(r) => r,
            Begun::Pending(mut p) => {
                let ret = p.run();
                self.finish(*p, ret)
            }
            Begun::Waiting(wait) => wait(),
        }
    }

    fn begin(&mut self, req: Request) -> Begun {
        if let Some(r) = pseudo::call(&req) {
            return Begun::Done(r);
        }
        if req.nr == EXEC_CHECK {
            return Begun::Done(self.exec_check(&req));
        }
        if let Some(ret) = self.fd_call(&req).or_else(|| self.open_fd_dir(&req)) {
            return Begun::Done(Reply { ret, outs: vec![] });
        }
        if let Some(r) = self.readlink_exe(&req) {
            return Begun::Done(r);
        }
        if req.nr as i64 == libc::SYS_ioctl && table::ioctl_arg(req.args[1]).is_none() {
            return Begun::Done(Reply {
                ret: -ENOTTY,
                outs: vec![],
            });
        }
        match self.prepare(req) {
            Ok(p) => Begun::Pending(Box::new(p)),
            Err(r) => Begun::Done(r),
        }
    }

    fn complete(&mut self, p: Box<Pending>, ret: i64) -> Reply {
        self.finish(*p, ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(d: &mut HostDeputy, nr: i64, args: [u64; 6], slots: Vec<Slot>) -> Reply {
        d.call(Request {
            nr: nr as u64,
            args,
            slots,
        })
    }

    #[test]
    fn files_round_trip_through_guest_descriptors() {
        let dir = std::env::temp_dir().join(format!("mosvm-deputy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut path = dir.join("f").into_os_string().into_encoded_bytes();
        path.push(0);
        let mut d = HostDeputy::new();
        let flags = (libc::O_CREAT | libc::O_RDWR | libc::O_TRUNC) as u64;
        let r = call(
            &mut d,
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, 0, flags, 0o644, 0, 0],
            vec![Slot::In(path)],
        );
        assert_eq!(r.ret, 3, "lowest free guest descriptor");
        let w = call(
            &mut d,
            libc::SYS_write,
            [3, 0, 5, 0, 0, 0],
            vec![Slot::In(b"hello".to_vec())],
        );
        assert_eq!(w.ret, 5);
        let p = call(
            &mut d,
            libc::SYS_pread64,
            [3, 0, 10, 1, 0, 0],
            vec![Slot::Out(10)],
        );
        assert_eq!(p.ret, 4);
        assert_eq!(&p.outs[0][..4], b"ello");
        assert_eq!(
            call(&mut d, libc::SYS_dup2, [3, 7, 0, 0, 0, 0], vec![]).ret,
            7
        );
        let st = call(
            &mut d,
            libc::SYS_fstat,
            [7, 0, 0, 0, 0, 0],
            vec![Slot::Out(144)],
        );
        assert_eq!(st.ret, 0);
        let size = i64::from_le_bytes(st.outs[0][48..56].try_into().unwrap());
        assert_eq!(size, 5);
        assert_eq!(
            call(&mut d, libc::SYS_close, [3, 0, 0, 0, 0, 0], vec![]).ret,
            0
        );
        assert_eq!(
            call(&mut d, libc::SYS_close, [3, 0, 0, 0, 0, 0], vec![]).ret,
            -EBADF
        );
        assert_eq!(
            call(
                &mut d,
                libc::SYS_write,
                [99, 0, 1, 0, 0, 0],
                vec![Slot::In(vec![1])]
            )
            .ret,
            -EBADF
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pipes_get_guest_numbers_and_poll_translates() {
        let mut d = HostDeputy::new();
        let r = call(
            &mut d,
            libc::SYS_pipe2,
            [0, 0, 0, 0, 0, 0],
            vec![Slot::Out(8)],
        );
        assert_eq!(r.ret, 0);
        let g0 = i32::from_le_bytes(r.outs[0][0..4].try_into().unwrap());
        let g1 = i32::from_le_bytes(r.outs[0][4..8].try_into().unwrap());
        assert_eq!((g0, g1), (3, 4));
        call(
            &mut d,
            libc::SYS_write,
            [4, 0, 1, 0, 0, 0],
            vec![Slot::In(vec![b'x'])],
        );
        let mut pfd = Vec::new();
        pfd.extend_from_slice(&3i32.to_le_bytes());
        pfd.extend_from_slice(&libc::POLLIN.to_le_bytes());
        pfd.extend_from_slice(&0i16.to_le_bytes());
        let p = call(
            &mut d,
            libc::SYS_poll,
            [0, 1, 0, 0, 0, 0],
            vec![Slot::InOut(pfd)],
        );
        assert_eq!(p.ret, 1);
        assert_eq!(i32::from_le_bytes(p.outs[0][0..4].try_into().unwrap()), 3);
        assert_eq!(
            i16::from_le_bytes(p.outs[0][6..8].try_into().unwrap()),
            libc::POLLIN
        );
        let mut set = vec![0u8; 8];
        set[0] = 1 << 3;
        let s = call(
            &mut d,
            libc::SYS_select,
            [4, 0, 0, 0, 0, 0],
            vec![
                Slot::InOut(set),
                Slot::Null,
                Slot::Null,
                Slot::InOut(vec![0; 16]),
            ],
        );
        assert_eq!(s.ret, 1);
        assert_eq!(s.outs[0][0], 1 << 3);
    }

    #[test]
    fn own_descriptor_paths_mean_the_guests() {
        let d = HostDeputy::new().with_exe(std::path::Path::new("/bin/sh"));
        let h1 = d.host_fd(1).unwrap();
        assert_eq!(
            d.rewrite_path(b"/proc/self/fd/1\0"),
            Some(format!("/proc/self/fd/{h1}\0").into_bytes())
        );
        assert_eq!(
            d.rewrite_path(b"/dev/stdout\0"),
            Some(format!("/proc/self/fd/{h1}\0").into_bytes())
        );
        assert_eq!(
            d.rewrite_path(b"/dev/fd/1/x\0"),
            Some(format!("/proc/self/fd/{h1}/x\0").into_bytes())
        );
        let bad = format!("/proc/self/fd/{}\0", i32::MAX).into_bytes();
        assert_eq!(d.rewrite_path(b"/proc/self/fd/77\0"), Some(bad));
        let exe = d.rewrite_path(b"/proc/self/exe\0").unwrap();
        assert!(exe.ends_with(b"sh\0"));
        let r = d.readlink_exe(&Request {
            nr: libc::SYS_readlink as u64,
            args: [0, 0, 4096, 0, 0, 0],
            slots: vec![Slot::In(b"/proc/self/exe\0".to_vec()), Slot::Out(4096)],
        });
        let want = std::fs::canonicalize("/bin/sh")
            .unwrap()
            .into_os_string()
            .into_encoded_bytes();
        assert_eq!(
            r,
            Some(Reply {
                ret: want.len() as i64,
                outs: vec![want]
            })
        );
        assert_eq!(d.rewrite_path(b"/proc/self/status\0"), None);
        assert_eq!(d.rewrite_path(b"data/a.txt\0"), None);
    }

    #[test]
    fn vmm_descriptors_are_unreachable() {
        let mut d = HostDeputy::new();
        // The deputy's own process has descriptors well above the guest's; a guest number that
        // was never installed is EBADF even if the host number exists.
        assert_eq!(
            call(&mut d, libc::SYS_close, [200, 0, 0, 0, 0, 0], vec![]).ret,
            -EBADF
        );
        assert_eq!(
            call(
                &mut d,
                libc::SYS_fcntl,
                [5, libc::F_GETFL as u64, 0, 0, 0, 0],
                vec![]
            )
            .ret,
            -EBADF
        );
    }
}
