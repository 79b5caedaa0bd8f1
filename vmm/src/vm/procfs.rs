//! The guest's own `/proc` files: `/proc/self/X`, `/proc/thread-self/X` and `/proc/PID/X`
//! (PID the guest's own) describe the guest, not the VMM that runs it (proc(5)). The VMM
//! builds their contents from what it knows (guest memory for `cmdline` and `environ`, its VMAs
//! for `maps` and the memory figures, the name set by `prctl(PR_SET_NAME)`, its limits, signal
//! state) and, where the home process's own file is right for the rest (`status` fields such as
//! Uid and Groups), patches that one. The guest gets a sealed memfd holding the text, opened
//! through its deputy like any descriptor, so it reads the same wherever the process runs.
//! `/proc/self/fd/`, `fdinfo/N`, `exe`, `cwd` and `root` are the deputy's (`deputy::rewrite_path`);
//! every other `/proc` file is the home host's.

use super::{signal, Vm, EINVAL};
use crate::deputy::Slot;
use crate::mm::VmaKind;

/// A file of the guest's own `/proc/PID/` the VMM writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProcFile {
    Cmdline,
    Comm,
    Environ,
    Auxv,
    Maps,
    Status,
    Stat,
    Statm,
    Limits,
    /// `/proc/meminfo`: the host's, with the memory figures of a machine of `--mem` bytes.
    Meminfo,
}

/// The file `path` names if it is one of the guest's own `/proc` files the VMM writes (opened
/// for reading; a write to `comm` goes to the home process's own file).
pub(super) fn own_file(path: &[u8], pid: i64) -> Option<ProcFile> {
    let p = path.strip_suffix(b"\0").unwrap_or(path);
    if p == b"/proc/meminfo" {
        return Some(ProcFile::Meminfo);
    }
    let rest = p.strip_prefix(b"/proc/")?;
    let (who, mut file) = rest.split_at(rest.iter().position(|&c| c == b'/')?);
    file = &file[1..];
    let pid_s = pid.to_string();
    let mine = who == b"self" || who == b"thread-self" || who == pid_s.as_bytes();
    if !mine {
        return None;
    }
    // /proc/PID/task/TID/X: the one thread is the process.
    if let Some(t) = file.strip_prefix(b"task/") {
        let (tid, f) = t.split_at(t.iter().position(|&c| c == b'/')?);
        if tid != pid_s.as_bytes() {
            return None;
        }
        file = &f[1..];
    }
    Some(match file {
        b"cmdline" => ProcFile::Cmdline,
        b"comm" => ProcFile::Comm,
        b"environ" => ProcFile::Environ,
        b"auxv" => ProcFile::Auxv,
        b"maps" => ProcFile::Maps,
        b"status" => ProcFile::Status,
        b"stat" => ProcFile::Stat,
        b"statm" => ProcFile::Statm,
        b"limits" => ProcFile::Limits,
        _ => return None,
    })
}

/// Resource names and units as /proc/PID/limits prints them, by RLIMIT_* number.
const LIMITS: [(&str, &str); 16] = [
    ("Max cpu time", "seconds"),
    ("Max file size", "bytes"),
    ("Max data size", "bytes"),
    ("Max stack size", "bytes"),
    ("Max core file size", "bytes"),
    ("Max resident set", "bytes"),
    ("Max processes", "processes"),
    ("Max open files", "files"),
    ("Max locked memory", "bytes"),
    ("Max address space", "bytes"),
    ("Max file locks", "locks"),
    ("Max pending signals", "signals"),
    ("Max msgqueue size", "bytes"),
    ("Max nice priority", ""),
    ("Max realtime priority", ""),
    ("Max realtime timeout", "us"),
];

impl Vm {
    /// A call at home whose first output (if any) comes back: (result, bytes).
    fn home(&mut self, nr: i64, args: [u64; 6], slots: Vec<Slot>) -> (i64, Vec<u8>) {
        let r = self.call_deputy(nr, args, slots);
        (r.ret, r.outs.into_iter().next().unwrap_or_default())
    }

    /// The bytes of guest memory `[start, end)`, as far as they are mapped.
    fn guest_bytes(&self, (start, end): (u64, u64)) -> Vec<u8> {
        let mut b = vec![0u8; end.saturating_sub(start).min(1 << 20) as usize];
        if self.space.mem.read(start, &mut b).is_err() {
            b.clear();
        }
        b
    }

    /// A file of the home process's own /proc, read at home.
    fn home_proc_file(&mut self, name: &str) -> String {
        self.home_file(&format!("/proc/self/{name}"))
    }

    /// A file read at home.
    fn home_file(&mut self, path: &str) -> String {
        let path = format!("{path}\0").into_bytes();
        let (fd, _) = self.home(
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, 1, libc::O_RDONLY as u64, 0, 0, 0],
            vec![Slot::In(path)],
        );
        if fd < 0 {
            return String::new();
        }
        let mut text = Vec::new();
        loop {
            let (n, b) = self.home(
                libc::SYS_read,
                [fd as u64, 1, 65536, 0, 0, 0],
                vec![Slot::Out(65536)],
            );
            if n <= 0 {
                break;
            }
            text.extend_from_slice(&b[..(n as usize).min(b.len())]);
        }
        self.home(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0], vec![]);
        String::from_utf8_lossy(&text).into_owned()
    }

    fn comm_str(&self) -> String {
        let n = self.comm.iter().position(|&c| c == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.comm[..n]).into_owned()
    }

    /// (VmSize, VmRSS) in bytes: the address space the VMAs cover, the guest memory in use
    /// (which holds the VM's own tables too: never more than the areas, as on Linux).
    fn vm_sizes(&self) -> (u64, u64) {
        let size: u64 = self.space.vmas().map(|(s, v)| v.end - s).sum();
        let used = self.space.mem.frames_used() * crate::memory::PAGE;
        (size, used.min(size))
    }

    /// (total, free) guest memory in bytes, as a machine with `--mem` bytes of RAM would report
    /// them (sysinfo(2), /proc/meminfo): free is what the guest has not used yet.
    pub(super) fn guest_ram(&self) -> (u64, u64) {
        let total = self.opts.mem;
        let used = self.space.mem.frames_used() * crate::memory::PAGE;
        (total, total.saturating_sub(used))
    }

    /// The text of a guest /proc file.
    pub(super) fn proc_text(&mut self, f: ProcFile) -> Vec<u8> {
        let (size, rss) = self.vm_sizes();
        match f {
            ProcFile::Cmdline => self.guest_bytes(self.stack_layout.args),
            ProcFile::Environ => self.guest_bytes(self.stack_layout.env),
            ProcFile::Auxv => self.guest_bytes(self.stack_layout.auxv),
            ProcFile::Comm => format!("{}\n", self.comm_str()).into_bytes(),
            ProcFile::Maps => {
                let mut out = String::new();
                for (s, v) in self.space.vmas() {
                    let perm = |bit: u32, c: char| if v.prot & bit != 0 { c } else { '-' };
                    let name = match (v.kind, &v.file) {
                        (VmaKind::Heap, _) => "[heap]".to_string(),
                        (VmaKind::Stack, _) => "[stack]".to_string(),
                        (VmaKind::Vvar, _) => "[vvar]".to_string(),
                        (VmaKind::Vdso, _) => "[vdso]".to_string(),
                        (_, Some(f)) => f.path.clone(),
                        _ => String::new(),
                    };
                    let shared = matches!(v.kind, VmaKind::Shared | VmaKind::Shm);
                    let (off, dev, ino) = v
                        .file
                        .as_ref()
                        .map_or((0, 0, 0), |f| (f.off, f.dev as libc::dev_t, f.ino));
                    let line = format!(
                        "{s:08x}-{:08x} {}{}{}{} {off:08x} {:02x}:{:02x} {ino}",
                        v.end,
                        perm(1, 'r'),
                        perm(2, 'w'),
                        perm(4, 'x'),
                        if shared { 's' } else { 'p' },
                        libc::major(dev),
                        libc::minor(dev),
                    );
                    if name.is_empty() {
                        out.push_str(&format!("{line}\n"));
                    } else {
                        out.push_str(&format!("{line:<73}{name}\n"));
                    }
                }
                out.into_bytes()
            }
            ProcFile::Statm => {
                let pages = |b: u64| b / crate::memory::PAGE;
                let data: u64 = self
                    .space
                    .vmas()
                    .filter(|(_, v)| {
                        matches!(v.kind, VmaKind::Heap | VmaKind::Anon | VmaKind::Stack)
                    })
                    .map(|(s, v)| v.end - s)
                    .sum();
                format!("{} {} 0 0 0 {} 0\n", pages(size), pages(rss), pages(data)).into_bytes()
            }
            ProcFile::Limits => {
                let mut out = format!(
                    "{:<26}{:<21}{:<21}{:<10}\n",
                    "Limit", "Soft Limit", "Hard Limit", "Units"
                );
                for (i, (name, unit)) in LIMITS.iter().enumerate() {
                    let v = |x: u64| {
                        if x == u64::MAX {
                            "unlimited".to_string()
                        } else {
                            x.to_string()
                        }
                    };
                    let [cur, max] = self.rlimits[i];
                    out.push_str(&format!(
                        "{name:<26}{:<21}{:<21}{unit:<10}\n",
                        v(cur),
                        v(max)
                    ));
                }
                out.into_bytes()
            }
            ProcFile::Meminfo => {
                let (total, free) = self.guest_ram();
                let mut out = String::new();
                for line in self.home_file("/proc/meminfo").lines() {
                    let (key, rest) = line.split_once(':').unwrap_or((line, ""));
                    let host_kb = rest.trim().trim_end_matches(" kB").parse::<u64>().ok();
                    let kb = match (key, host_kb) {
                        (_, None) => None,
                        ("MemTotal", _) => Some(total / 1024),
                        ("MemFree" | "MemAvailable", Some(v)) => Some(v.min(free / 1024)),
                        // The guest's files are cached by the home kernel, not in its memory.
                        (
                            "Buffers" | "Cached" | "SReclaimable" | "Active(file)"
                            | "Inactive(file)",
                            _,
                        ) => Some(0),
                        (k, Some(v))
                            if !k.starts_with("Swap")
                                && !k.starts_with("Vmalloc")
                                && !k.starts_with("Commit")
                                && !k.starts_with("Huge")
                                && !k.starts_with("DirectMap")
                                && k != "Hugetlb" =>
                        {
                            // Other memory figures: within what the guest uses.
                            Some(v.min(total.saturating_sub(free) / 1024))
                        }
                        (_, v) => v,
                    };
                    match kb {
                        Some(v) => {
                            let width = rest.len().saturating_sub(3).max(1);
                            out.push_str(&format!("{key}:{v:>width$} kB\n"));
                        }
                        None => out.push_str(&format!("{line}\n")),
                    }
                }
                out.into_bytes()
            }
            ProcFile::Status => {
                let home = self.home_proc_file("status");
                let kb = |b: u64| format!("{:>8} kB", b / 1024);
                let mut out = String::new();
                for line in home.lines() {
                    let key = line.split(':').next().unwrap_or("");
                    let val = match key {
                        "Name" => self.comm_str(),
                        "VmPeak" | "VmSize" => kb(size),
                        "VmHWM" | "VmRSS" | "RssAnon" => kb(rss),
                        "RssFile" | "RssShmem" | "VmLck" | "VmPin" | "VmSwap" => kb(0),
                        "Threads" => self.thread_count().to_string(),
                        "SigBlk" => format!("{:016x}", self.sig.mask),
                        // The guest's own signal state, not the VMM's (proc_pid_status(5)).
                        // Signals queued for the user: the guest's pending ones count too.
                        "SigQ" => {
                            let v = line.split_once(':').map_or("", |x| x.1).trim();
                            let (n, max) = v.split_once('/').unwrap_or(("0", "0"));
                            let n = n.parse::<usize>().unwrap_or(0)
                                + self.sig.queue.len()
                                + self.sig.tqueue.len();
                            format!("{n}/{max}")
                        }
                        // Signals for the thread (tgkill, its faults) and for the process.
                        "SigPnd" => format!("{:016x}", self.sig.tpending),
                        "ShdPnd" => format!("{:016x}", self.sig.pending),
                        "SigIgn" | "SigCgt" => {
                            let want_ign = key == "SigIgn";
                            let bits: u64 = (1..=64)
                                .filter(|&s| {
                                    let h = self.sig.handler(s);
                                    if want_ign {
                                        h == signal::SIG_IGN
                                    } else {
                                        h > signal::SIG_IGN
                                    }
                                })
                                .map(|s| 1u64 << (s - 1))
                                .sum();
                            format!("{bits:016x}")
                        }
                        _ => {
                            out.push_str(line);
                            out.push('\n');
                            continue;
                        }
                    };
                    out.push_str(&format!("{key}:\t{val}\n"));
                }
                out.into_bytes()
            }
            ProcFile::Stat => {
                // The home process's line, with the guest's name, thread count and memory.
                let home = self.home_proc_file("stat");
                let Some(close) = home.rfind(')') else {
                    return home.into_bytes();
                };
                let pid = &home[..home.find(' ').unwrap_or(0)];
                let mut fields: Vec<String> = home[close + 1..]
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                // Fields after the name, counted from 0 = state (proc(5) field 3).
                let mut set = |field: usize, v: String| {
                    if let Some(f) = fields.get_mut(field - 3) {
                        *f = v;
                    }
                };
                set(20, self.thread_count().to_string());
                set(23, size.to_string());
                set(24, (rss / crate::memory::PAGE).to_string());
                format!("{pid} ({}) {}\n", self.comm_str(), fields.join(" ")).into_bytes()
            }
        }
    }

    /// Open a guest /proc file: a sealed memfd at home holding its text. Returns the guest
    /// descriptor or -errno.
    pub(super) fn open_proc(&mut self, f: ProcFile, flags: u64) -> i64 {
        let text = self.proc_text(f);
        let mut mfd = libc::MFD_ALLOW_SEALING as u64;
        if flags & libc::O_CLOEXEC as u64 != 0 {
            mfd |= libc::MFD_CLOEXEC as u64;
        }
        let name = format!("{f:?}\0").to_lowercase().into_bytes();
        let (fd, _) = self.home(
            libc::SYS_memfd_create,
            [1, mfd, 0, 0, 0, 0],
            vec![Slot::In(name)],
        );
        if fd < 0 {
            return fd;
        }
        let g = fd as u64;
        if !text.is_empty() {
            let len = text.len() as u64;
            let (w, _) = self.home(
                libc::SYS_pwrite64,
                [g, 1, len, 0, 0, 0],
                vec![Slot::In(text)],
            );
            if w < 0 {
                self.home(libc::SYS_close, [g, 0, 0, 0, 0, 0], vec![]);
                return -EINVAL;
            }
        }
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        self.home(
            libc::SYS_fcntl,
            [g, libc::F_ADD_SEALS as u64, seals as u64, 0, 0, 0],
            vec![],
        );
        fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_files_are_recognised() {
        assert_eq!(
            own_file(b"/proc/self/cmdline\0", 42),
            Some(ProcFile::Cmdline)
        );
        assert_eq!(own_file(b"/proc/42/status", 42), Some(ProcFile::Status));
        assert_eq!(own_file(b"/proc/42/task/42/comm", 42), Some(ProcFile::Comm));
        assert_eq!(
            own_file(b"/proc/thread-self/maps", 42),
            Some(ProcFile::Maps)
        );
        assert_eq!(own_file(b"/proc/43/status", 42), None);
        assert_eq!(own_file(b"/proc/self/mounts", 42), None);
        assert_eq!(own_file(b"/proc/cpuinfo", 42), None);
        assert_eq!(own_file(b"/proc/meminfo", 42), Some(ProcFile::Meminfo));
        assert_eq!(own_file(b"proc/self/comm", 42), None);
    }
}
