//! execve(2) and execveat(2): the same process (pid, deputy, descriptors without
//! close-on-exec ones, signal mask and pending signals, interval timers) with a new program
//! in a new address space; handlers reset, statistics reset (paper §4.3). `#!` scripts run
//! their interpreter as binfmt_script does. Exec runs at home (the program and its interpreter
//! are files of the home node): a process away has home check the program first (what cannot
//! run fails there with Linux's errno, the process staying where it is), then drops its old
//! program and moves home with next to no memory, where the exec completes ([`ExecHome`]).

use super::{signal, Step, Vm, EFAULT, EINVAL};
use crate::loader::{self, parse_shebang, AuxFacts, LoadError};
use std::path::PathBuf;

/// Longest single argument or environment string (Linux's MAX_ARG_STRLEN, 32 pages).
const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Bytes of `#!` line Linux reads (BINPRM_BUF_SIZE).
const BINPRM_BUF_SIZE: usize = 256;
/// Scripts whose interpreter is a script, at most (Linux: 4 levels, then ELOOP).
const MAX_SCRIPT_DEPTH: usize = 4;

const ENOENT: i64 = libc::ENOENT as i64;
const EACCES: i64 = libc::EACCES as i64;
const ENOEXEC: i64 = libc::ENOEXEC as i64;
const E2BIG: i64 = libc::E2BIG as i64;
const ELOOP: i64 = libc::ELOOP as i64;

fn errno_of(e: &std::io::Error) -> i64 {
    e.raw_os_error().map_or(libc::EIO as i64, |e| e as i64)
}

/// What an exec failure before the point of no return means (Linux's errno).
fn load_errno(e: &LoadError) -> i64 {
    match e {
        LoadError::Io(_, e) => errno_of(e),
        LoadError::MissingInterpreter(..) => ENOENT,
        LoadError::TooBig(..) => super::ENOMEM,
        _ => ENOEXEC,
    }
}

/// An execve past its point of no return, to complete at home: a process away drops its old
/// program where it runs and moves home (with next to no memory) to load the new one there.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct ExecHome {
    /// execveat's `dirfd` (the guest's descriptor, or AT_FDCWD).
    dirfd: i32,
    path: Vec<u8>,
    argv: Vec<Vec<u8>>,
    envp: Vec<Vec<u8>>,
    flags: i32,
}

/// What [`crate::deputy::EXEC_CHECK`] finds at home of the program at `path` (relative to host
/// descriptor `dir`): Ok when execve(2) would get past its checks, else its errno.
pub(crate) fn check_program(dir: i32, path: &[u8], flags: i32) -> Result<(), i64> {
    if path.is_empty() && flags & libc::AT_EMPTY_PATH == 0 {
        return Err(ENOENT);
    }
    let mut argv = vec![Vec::new()];
    let mut filename = path.to_vec();
    open_program(dir, path, flags, &mut argv, &mut filename).map(drop)
}

/// Open the program execve(2) runs for `path` (relative to host descriptor `dir`): a `#!`
/// script's interpreter in its place (its name then in `filename`, and its arguments before
/// `argv`'s), checked as Linux checks it. Linux's errno otherwise.
fn open_program(
    dir: i32,
    path: &[u8],
    flags: i32,
    argv: &mut Vec<Vec<u8>>,
    filename: &mut Vec<u8>,
) -> Result<(ExecFile, PathBuf), i64> {
    let mut file = open_exec(dir, path, flags)?;
    // `#!` scripts: the interpreter runs with the script's name as an argument.
    for depth in 0.. {
        let mut head = [0u8; BINPRM_BUF_SIZE];
        // SAFETY: `head` is a writable local buffer of its length; `file` is open.
        let n = unsafe { libc::pread(file.0, head.as_mut_ptr().cast(), head.len(), 0) };
        let head = &head[..n.max(0) as usize];
        let Some((interp, arg)) = parse_shebang(head) else {
            break;
        };
        if depth >= MAX_SCRIPT_DEPTH {
            return Err(ELOOP);
        }
        let mut new = vec![interp.clone()];
        new.extend(arg);
        new.push(filename.clone());
        new.extend(std::mem::take(argv).into_iter().skip(1));
        *argv = new;
        file = open_exec(libc::AT_FDCWD, &interp, 0)?;
        *filename = interp;
    }
    let exe = PathBuf::from(format!("/proc/self/fd/{}", file.0));
    loader::check(&exe).map_err(|e| load_errno(&e))?;
    Ok((file, exe))
}

impl Vm {
    /// Bytes of guest memory, as copy_from_user would take them.
    fn read_bytes(&mut self, va: u64, n: usize) -> Result<Vec<u8>, i64> {
        let mut b = vec![0u8; n];
        if self.space.accessible(va, n as u64, false) != n as u64 {
            return Err(EFAULT);
        }
        self.space.fault_in_range(va, n as u64);
        self.space.mem.read(va, &mut b).map_err(|_| EFAULT)?;
        Ok(b)
    }

    /// A NUL-terminated string of at most `max` bytes (without the NUL): EFAULT where it
    /// runs into memory it may not read, `too_long` when it is longer.
    fn read_string(&mut self, va: u64, max: usize, too_long: i64) -> Result<Vec<u8>, i64> {
        let mut out = Vec::new();
        let mut cur = va;
        loop {
            let n = (4096 - (cur & 4095)) as usize;
            let piece = self.read_bytes(cur, n)?;
            if let Some(z) = piece.iter().position(|&b| b == 0) {
                out.extend_from_slice(&piece[..z]);
                return if out.len() > max {
                    Err(too_long)
                } else {
                    Ok(out)
                };
            }
            out.extend_from_slice(&piece);
            if out.len() > max {
                return Err(too_long);
            }
            cur = cur.checked_add(n as u64).ok_or(EFAULT)?;
        }
    }

    /// A NULL-terminated array of strings (argv, envp); `total` counts their bytes against
    /// the limit execve(2) sets (a quarter of the stack limit).
    fn read_strings(&mut self, va: u64, total: &mut usize) -> Result<Vec<Vec<u8>>, i64> {
        let mut v = Vec::new();
        if va == 0 {
            return Ok(v);
        }
        // fs/exec.c: a quarter of the stack limit, at most 3/4 of _STK_LIM (8 MiB), at least
        // ARG_MAX (32 pages).
        let limit =
            (self.rlimits[libc::RLIMIT_STACK as usize][0] / 4).clamp(32 * 4096, 6 << 20) as usize;
        for i in 0.. {
            let p = u64::from_le_bytes(self.read_guest::<8>(va + 8 * i)?);
            if p == 0 {
                break;
            }
            let s = self.read_string(p, MAX_ARG_STRLEN - 1, E2BIG)?;
            *total += s.len() + 1 + 8;
            if *total > limit {
                return Err(E2BIG);
            }
            v.push(s);
        }
        Ok(v)
    }

    /// execve(path, argv, envp) and execveat(dirfd, path, argv, envp, flags).
    pub(super) fn execve(&mut self, nr: i64, a: [u64; 6]) -> Result<Step, i64> {
        let (dirfd, path_va, argv_va, envp_va, flags) = if nr == libc::SYS_execveat {
            (a[0] as i32, a[1], a[2], a[3], a[4] as i32)
        } else {
            (libc::AT_FDCWD, a[0], a[1], a[2], 0)
        };
        if flags & !(libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(EINVAL);
        }
        let mut path = self.read_string(path_va, 4095, libc::ENAMETOOLONG as i64)?;
        // The process's own executable is the guest's program, not the VMM (busybox runs
        // its applets so).
        let own = format!("/proc/{}/exe", self.pid).into_bytes();
        if path == b"/proc/self/exe" || path == b"/proc/thread-self/exe" || path == own {
            path = self.program.as_os_str().as_encoded_bytes().to_vec();
        }
        let mut total = 0;
        let argv = self.read_strings(argv_va, &mut total)?;
        let envp = self.read_strings(envp_va, &mut total)?;
        let e = ExecHome {
            dirfd,
            path,
            argv,
            envp,
            flags,
        };
        if !self.deputy.is_local() {
            if self.th.others.is_empty() && self.th.mt.is_none() {
                return self.exec_away(e);
            }
            // Threads end at the exec, which their states must reach home for first.
            self.wait_for_home("execve")?;
        }
        self.home_wait = None;
        self.exec_with(e)
    }

    /// execve of a process away from home: home checks the program; then the old program
    /// goes here (its memory is not worth a move) and the process waits to be home, where
    /// [`Vm::exec_arrived`] completes the call.
    fn exec_away(&mut self, e: ExecHome) -> Result<Step, i64> {
        let r = self.call_deputy(
            crate::deputy::EXEC_CHECK as i64,
            [e.dirfd as u64, e.flags as u64, 0, 0, 0, 0],
            vec![crate::deputy::Slot::In(e.path.clone())],
        );
        if r.ret < 0 {
            return Err(-r.ret);
        }
        if !self.deputy.request_home() {
            return Err(super::ENODEV);
        }
        if self.opts.trace {
            eprintln!("[mosvm] execve needs home: moving the process home without its old program");
        }
        // The point of no return.
        self.drop_program();
        self.exec_home = Some(e);
        self.home_wait = Some(std::time::Instant::now());
        Ok(Step::Gone)
    }

    /// An execve's point of no return: a vfork parent goes on (with what this child wrote),
    /// and the old program's memory goes.
    fn drop_program(&mut self) {
        self.release_vfork_parent();
        let old: Vec<(u64, u64)> = self.space.vmas().map(|(s, v)| (s, v.end)).collect();
        for (s, end) in old {
            let _ = self.space.munmap(s, end - s);
        }
    }

    /// Before the guest runs: an execve that left its old program away from home completes
    /// once the process is home (`Some` step to complete), and waits for that meanwhile
    /// (`None`; asking again now and then). A process that cannot get home within
    /// `HOME_WAIT` is killed (its old program is gone).
    pub(super) fn exec_arrived(&mut self) -> Option<Step> {
        const HOME_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        const ASK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
        if self.deputy.is_local() {
            let e = self.exec_home.take()?;
            self.home_wait = None;
            return Some(self.exec_with(e).unwrap_or_else(|errno| {
                // The program changed at home since it was checked: Linux's fate for an exec
                // failing past its point of no return.
                crate::say!(
                    "mosvm: {}: execve failed at home after its point of no return (errno {errno})",
                    self.program.display()
                );
                Step::Exit(super::Outcome::Signaled(libc::SIGSEGV))
            }));
        }
        // Just arrived (from a move that was under way when the exec came): ask at once.
        let arrived = self.home_wait.is_none();
        let waited = self
            .home_wait
            .get_or_insert_with(std::time::Instant::now)
            .elapsed();
        if waited > HOME_WAIT {
            crate::say!(
                "mosvm: {}: execve is completed at home only, and the process could not get home",
                self.program.display()
            );
            return Some(Step::Exit(super::Outcome::Signaled(libc::SIGKILL)));
        }
        let tick = std::time::Duration::from_millis(5);
        let periodic = waited.as_millis() % ASK_EVERY.as_millis() < tick.as_millis();
        if arrived || (periodic && waited > tick) {
            self.deputy.request_home();
        }
        std::thread::sleep(tick);
        None
    }

    /// execve at home, from its checked arguments.
    fn exec_with(&mut self, e: ExecHome) -> Result<Step, i64> {
        let ExecHome {
            dirfd,
            path,
            mut argv,
            envp,
            flags,
        } = e;
        // The file, as the user's own open of it at home would find it.
        let host_dir = if dirfd == libc::AT_FDCWD || path.first() == Some(&b'/') {
            libc::AT_FDCWD
        } else {
            self.deputy
                .local_fd(dirfd as u32 as u64)
                .ok_or(libc::EBADF as i64)?
        };
        if path.is_empty() && flags & libc::AT_EMPTY_PATH == 0 {
            return Err(ENOENT);
        }
        let mut filename = if path.is_empty() {
            format!("/dev/fd/{dirfd}").into_bytes()
        } else {
            path.clone()
        };
        if argv.is_empty() {
            // Linux supplies an empty argv[0] (since 5.18).
            argv.push(Vec::new());
        }
        let (file, exe) = open_program(host_dir, &path, flags, &mut argv, &mut filename)?;
        let real = std::fs::read_link(&exe).unwrap_or_else(|_| exe.clone());

        if !self.th.others.is_empty() {
            // execve(2) ends the other threads first (and waits until they are gone).
            if self.tid != self.pid {
                // The first thread's host thread carries on (see vm/thread.rs).
                return self.delegate_exec();
            }
            self.zap_threads();
            return Ok(self.redo(None));
        }
        // The point of no return: the old program goes.
        self.drop_program();
        let mut random = [0u8; 16];
        super::getrandom(&mut random);
        let facts = AuxFacts {
            hwcap: crate::cpu::hwcap(),
            ids: super::host_ids(),
            random,
        };
        let started = loader::load(
            &mut self.space,
            &exe,
            &argv,
            &envp,
            &filename,
            &facts,
            &self.opts.mem_label,
        );
        drop(file);
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                crate::say!("mosvm: execve of {}: {e}", real.display());
                return Ok(Step::Exit(super::Outcome::Signaled(libc::SIGSEGV)));
            }
        };
        self.deputy.exec(&real);
        self.drop_host_timers();
        self.clear_child_tid = 0;
        self.program = real;
        if let Ok(mut p) = self.program_cell.lock() {
            *p = self.program.display().to_string();
        }
        let base = filename.rsplit(|&b| b == b'/').next().unwrap_or(&filename);
        self.comm = [0; 16];
        let n = base.len().min(15);
        self.comm[..n].copy_from_slice(&base[..n]);
        self.show_comm();
        self.stack_layout = started.layout;
        self.robust_list = 0;
        self.last_fault = None;
        self.sig.exec();
        self.stats = super::Stats::default();
        // A new thread state: registers zero but for the entry and stack; no TLS base;
        // the FPU as at boot.
        crate::cpu::set_msrs(&self.vcpu, &[(0xc000_0100, 0), (0xc000_0101, 0)])
            .map_err(|_| EFAULT)?;
        self.set_fpu(&signal::init_fpu()).map_err(|_| EFAULT)?;
        let regs = kvm_bindings::kvm_regs {
            rip: started.rip,
            rsp: started.rsp,
            rflags: 0x202,
            ..Default::default()
        };
        Ok(Step::Resume(regs))
    }
}

/// An open host descriptor of the file to execute, closed when dropped.
struct ExecFile(i32);

impl Drop for ExecFile {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Open `path` (relative to host descriptor `dir`) for execution as execve(2) checks it:
/// it must exist (ENOENT), be a regular file and executable by the user (EACCES).
fn open_exec(dir: i32, path: &[u8], flags: i32) -> Result<ExecFile, i64> {
    let c = std::ffi::CString::new(path.to_vec()).map_err(|_| ENOENT)?;
    let mut oflags = libc::O_RDONLY | libc::O_CLOEXEC;
    if flags & libc::AT_SYMLINK_NOFOLLOW != 0 {
        oflags |= libc::O_NOFOLLOW;
    }
    let fd = if path.is_empty() {
        // AT_EMPTY_PATH: the descriptor itself (fexecve).
        let p = std::ffi::CString::new(format!("/proc/self/fd/{dir}")).map_err(|_| ENOENT)?;
        // SAFETY: `p` is a valid C string.
        unsafe { libc::open(p.as_ptr(), oflags) }
    } else {
        // SAFETY: `c` is a valid C string; `dir` is a host directory descriptor or AT_FDCWD.
        unsafe { libc::openat(dir, c.as_ptr(), oflags) }
    };
    if fd < 0 {
        return Err(super::last_errno());
    }
    let f = ExecFile(fd);
    // SAFETY: `st` is a valid stat buffer for fstat to fill in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `f.0` is open and `st` is writable.
    if unsafe { libc::fstat(f.0, &mut st) } != 0 {
        return Err(super::last_errno());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(EACCES);
    }
    // SAFETY: an empty path with AT_EMPTY_PATH names the open descriptor itself.
    let ok = unsafe {
        libc::faccessat(
            f.0,
            c"".as_ptr(),
            libc::X_OK,
            libc::AT_EACCESS | libc::AT_EMPTY_PATH,
        )
    };
    if ok != 0 {
        return Err(EACCES);
    }
    Ok(f)
}
