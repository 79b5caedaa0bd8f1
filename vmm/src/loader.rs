//! The ELF program loader: static (ET_EXEC and static-PIE) and dynamic (PT_INTERP) x86-64
//! programs, with argv, envp and a full auxiliary vector on the initial stack, as Linux's
//! `binfmt_elf` lays them out (without address randomisation).

use crate::memory::{page_down, page_up, PAGE};
use crate::mm::{AddressSpace, VmaKind, PIE_BASE, STACK_TOP};
use goblin::elf::{header, program_header, Elf};
use std::path::{Path, PathBuf};

/// What went wrong loading a program: each variant prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: not an ELF executable")]
    NotElf(PathBuf),
    #[error("{0}: is a 32-bit ELF; mosvm runs x86-64 programs only")]
    Elf32(PathBuf),
    #[error("{0}: is an ELF for machine {1}, not x86-64")]
    WrongMachine(PathBuf, String),
    #[error("{0}: is not an executable (ELF type {1})")]
    NotExecutable(PathBuf, String),
    #[error("{0}: malformed ELF: {1}")]
    Malformed(PathBuf, String),
    #[error("{0}: interpreter {1} not found")]
    MissingInterpreter(PathBuf, String),
    #[error("guest memory too small: --mem {0} cannot hold {1}")]
    TooBig(String, String),
}

impl LoadError {
    /// Whether execve(2) would fail with ENOENT (the program or its interpreter is not
    /// there): shells and launchers exit 127 for it, 126 for the rest.
    pub fn not_found(&self) -> bool {
        match self {
            LoadError::MissingInterpreter(..) => true,
            LoadError::Io(_, e) => e.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// Facts for the auxiliary vector that come from the host.
#[derive(Debug, Clone)]
pub struct AuxFacts {
    /// AT_HWCAP.
    pub hwcap: u64,
    /// AT_UID, AT_EUID, AT_GID, AT_EGID.
    pub ids: [u64; 4],
    /// 16 random bytes for AT_RANDOM.
    pub random: [u8; 16],
}

/// Where a loaded program starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Initial instruction pointer (the interpreter's entry for dynamic programs).
    pub rip: u64,
    /// Initial stack pointer (points at argc).
    pub rsp: u64,
    /// The program's own entry point (AT_ENTRY).
    pub entry: u64,
    /// Load bias of the interpreter (AT_BASE), 0 without one.
    pub interp_base: u64,
    /// Where the initial stack holds what /proc/PID/{cmdline,environ,auxv} show.
    pub layout: StackLayout,
}

/// Guest addresses of the argument and environment strings and of the auxiliary vector on
/// the initial stack (Linux's `mm->arg_start`, `arg_end`, `env_start`, `env_end`,
/// `saved_auxv`): ranges `[start, end)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackLayout {
    /// argv strings, NULs included.
    pub args: (u64, u64),
    /// envp strings, NULs included.
    pub env: (u64, u64),
    /// The auxiliary vector, AT_NULL pair included.
    pub auxv: (u64, u64),
}

struct Mapped {
    bias: u64,
    entry: u64,
    phdr: u64,
    phnum: u64,
    end: u64,
    interp: Option<String>,
}

fn machine_name(m: u16) -> String {
    match m {
        header::EM_386 => "i386".into(),
        header::EM_ARM => "arm".into(),
        header::EM_AARCH64 => "aarch64".into(),
        header::EM_RISCV => "riscv".into(),
        header::EM_PPC64 => "ppc64".into(),
        header::EM_S390 => "s390".into(),
        other => format!("{other}"),
    }
}

/// What the loader reads of an ELF file, as Linux's binfmt_elf does: the header, the program
/// headers and the interpreter's path (section headers and symbol tables play no part; a large
/// program's are read by no one).
struct Image<'a> {
    header: header::Header,
    program_headers: Vec<program_header::ProgramHeader>,
    interpreter: Option<&'a str>,
}

/// Parse and check an ELF file's header (x86-64, executable) and its program headers.
fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<Image<'a>, LoadError> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return Err(LoadError::NotElf(path.into()));
    }
    if bytes[4] != 2 {
        return Err(LoadError::Elf32(path.into()));
    }
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    if machine != header::EM_X86_64 {
        return Err(LoadError::WrongMachine(path.into(), machine_name(machine)));
    }
    let bad = |e: goblin::error::Error| LoadError::Malformed(path.into(), e.to_string());
    let h = Elf::parse_header(bytes).map_err(bad)?;
    if h.e_type != header::ET_EXEC && h.e_type != header::ET_DYN {
        return Err(LoadError::NotExecutable(
            path.into(),
            header::et_to_str(h.e_type).into(),
        ));
    }
    let ctx = goblin::container::Ctx::new(
        goblin::container::Container::Big,
        goblin::container::Endian::Little,
    );
    let program_headers =
        program_header::ProgramHeader::parse(bytes, h.e_phoff as usize, h.e_phnum as usize, ctx)
            .map_err(bad)?;
    let interpreter = program_headers
        .iter()
        .rfind(|p| p.p_type == program_header::PT_INTERP && p.p_filesz != 0)
        .and_then(|p| {
            let at = usize::try_from(p.p_offset).ok()?;
            let raw = bytes.get(at..at.checked_add(p.p_filesz as usize - 1)?)?;
            let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            std::str::from_utf8(raw).ok()
        });
    Ok(Image {
        header: h,
        program_headers,
        interpreter,
    })
}

fn prot_of(flags: u32) -> u32 {
    let mut p = 0;
    if flags & program_header::PF_R != 0 {
        p |= 1;
    }
    if flags & program_header::PF_W != 0 {
        p |= 2;
    }
    if flags & program_header::PF_X != 0 {
        p |= 4;
    }
    p
}

/// Map one ELF image. `bias` None means choose (ET_DYN): `Some(b)` forces a base.
fn map_image(
    space: &mut AddressSpace,
    path: &Path,
    bytes: &[u8],
    want_base: Option<u64>,
    mem_label: &str,
) -> Result<Mapped, LoadError> {
    let elf = parse(path, bytes)?;
    let loads: Vec<_> = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == program_header::PT_LOAD && p.p_memsz > 0)
        .collect();
    if loads.is_empty() {
        return Err(LoadError::Malformed(
            path.into(),
            "no loadable segments".into(),
        ));
    }
    let lo = loads
        .iter()
        .map(|p| page_down(p.p_vaddr))
        .min()
        .unwrap_or(0);
    let hi = loads
        .iter()
        .map(|p| p.p_vaddr.checked_add(p.p_memsz).map(page_up))
        .try_fold(0u64, |acc, e| e.map(|e| acc.max(e)))
        .ok_or_else(|| LoadError::Malformed(path.into(), "segment overflows".into()))?;
    let span = hi - lo;
    let bias = if elf.header.e_type == header::ET_EXEC {
        0
    } else {
        match want_base {
            Some(b) => b - lo,
            None => {
                space.find_free(span).ok_or_else(|| {
                    LoadError::TooBig(mem_label.into(), path.display().to_string())
                })? - lo
            }
        }
    };
    let too_big = || LoadError::TooBig(mem_label.into(), path.display().to_string());
    for p in &loads {
        let start = bias + page_down(p.p_vaddr);
        let end = bias + page_up(p.p_vaddr + p.p_memsz);
        space
            .mmap(
                start,
                end - start,
                prot_of(p.p_flags),
                true,
                false,
                VmaKind::Image,
            )
            .map_err(|_| too_big())?;
    }
    for p in &loads {
        let off = p.p_offset as usize;
        let len = p.p_filesz as usize;
        let data = bytes.get(off..off.saturating_add(len)).ok_or_else(|| {
            LoadError::Malformed(path.into(), "segment beyond end of file".into())
        })?;
        space
            .mem
            .write(bias + p.p_vaddr, data)
            .map_err(|_| too_big())?;
    }
    // AT_PHDR: PT_PHDR if present, else the phdrs inside the segment that maps file offset 0.
    let phoff = elf.header.e_phoff;
    let phdr = elf
        .program_headers
        .iter()
        .find(|p| p.p_type == program_header::PT_PHDR)
        .map(|p| p.p_vaddr)
        .or_else(|| {
            loads
                .iter()
                .find(|p| p.p_offset <= phoff && phoff < p.p_offset + p.p_filesz)
                .map(|p| p.p_vaddr + (phoff - p.p_offset))
        })
        .unwrap_or(0);
    Ok(Mapped {
        bias,
        entry: bias + elf.header.e_entry,
        phdr: bias + phdr,
        phnum: elf.header.e_phnum as u64,
        end: bias + hi,
        interp: elf.interpreter.map(str::to_owned),
    })
}

/// Map a whole file read-only (one copy into the guest instead of two), with a one-line error.
fn read_file(path: &Path) -> Result<memmap2::Mmap, std::io::Error> {
    let f = std::fs::File::open(path)?;
    if f.metadata()?.is_dir() {
        return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
    }
    // SAFETY: the mapping is private and read-only; like every loader, mosvm assumes the
    // program file is not truncated while it is being loaded.
    unsafe { memmap2::Mmap::map(&f) }
}

/// The interpreter and its optional argument from a `#!` line (binfmt_script): the first
/// word after `#!` (spaces and tabs skipped), then the rest of the line, trimmed, as one
/// argument.
pub fn parse_shebang(head: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let rest = head.strip_prefix(b"#!")?;
    let line = match rest.iter().position(|&b| b == b'\n') {
        Some(n) => &rest[..n],
        None => rest,
    };
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !ws(b))?;
    let line = &line[start..];
    let end = line.iter().position(ws).unwrap_or(line.len());
    let interp = line[..end].to_vec();
    let arg = &line[end..];
    let a0 = arg.iter().position(|b| !ws(b));
    let arg = a0.map(|a0| {
        let a = &arg[a0..];
        let z = a.iter().rposition(|b| !ws(b)).map_or(0, |z| z + 1);
        a[..z].to_vec()
    });
    (!interp.is_empty()).then_some((interp, arg.filter(|a| !a.is_empty())))
}

/// The interpreter `interp` a program at `path` names (PT_INTERP), read.
fn read_interp(path: &Path, interp: &str) -> Result<(PathBuf, memmap2::Mmap), LoadError> {
    let ipath = PathBuf::from(interp);
    let ibytes = read_file(&ipath).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LoadError::MissingInterpreter(path.into(), interp.into()),
        _ => LoadError::Io(ipath.clone(), e),
    })?;
    Ok((ipath, ibytes))
}

/// Check that `path` can be loaded (an x86-64 ELF executable whose interpreter, if it names
/// one, is one too) without touching any guest memory: execve(2) fails before its point of no
/// return when this fails.
pub fn check(path: &Path) -> Result<(), LoadError> {
    let bytes = read_file(path).map_err(|e| LoadError::Io(path.into(), e))?;
    let elf = parse(path, &bytes)?;
    if let Some(interp) = elf.interpreter {
        let (ipath, ibytes) = read_interp(path, interp)?;
        parse(&ipath, &ibytes)?;
    }
    Ok(())
}

/// Load `path` (and its interpreter) into `space` and build the initial stack.
pub fn load(
    space: &mut AddressSpace,
    path: &Path,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    execfn: &[u8],
    facts: &AuxFacts,
    mem_label: &str,
) -> Result<Started, LoadError> {
    let bytes = read_file(path).map_err(|e| LoadError::Io(path.into(), e))?;
    // The layout follows RLIMIT_STACK as it is at exec (`space.stack_rlimit`).
    space.mmap_base = crate::mm::mmap_base(space.stack_rlimit);
    // Validate the header before touching guest memory.
    let is_dyn = parse(path, &bytes)?.header.e_type == header::ET_DYN;
    let main = map_image(
        space,
        path,
        &bytes,
        if is_dyn { Some(PIE_BASE) } else { None },
        mem_label,
    )?;
    space.init_brk(main.end);
    let (rip, interp_base) = match &main.interp {
        Some(interp) => {
            let (ipath, ibytes) = read_interp(path, interp)?;
            let im = map_image(space, &ipath, &ibytes, None, mem_label)?;
            (im.entry, im.bias)
        }
        None => (main.entry, 0),
    };
    // As Linux's (arch_setup_additional_pages): the vDSO comes after the interpreter.
    let vdso = space.map_vdso(guest::VDSO);
    let too_big = || LoadError::TooBig(mem_label.into(), "the stack".into());
    // As Linux's (setup_arg_pages): the area holds the arguments and 128 KiB below them, and
    // grows down on faults up to RLIMIT_STACK.
    let stack = crate::mm::STACK_EAGER;
    space
        .mmap(STACK_TOP - stack, stack, 3, true, false, VmaKind::Stack)
        .map_err(|_| too_big())?;
    let (rsp, layout) = build_stack(space, argv, envp, execfn, facts, &main, (interp_base, vdso))
        .ok_or_else(too_big)?;
    space.reserve_stack(rsp.saturating_sub(crate::mm::STACK_EAGER));
    Ok(Started {
        rip,
        rsp,
        entry: main.entry,
        interp_base,
        layout,
    })
}

// Auxiliary vector keys.
const AT_NULL: u64 = 0;
const AT_PHDR: u64 = 3;
const AT_PHENT: u64 = 4;
const AT_PHNUM: u64 = 5;
const AT_PAGESZ: u64 = 6;
const AT_BASE: u64 = 7;
const AT_FLAGS: u64 = 8;
const AT_ENTRY: u64 = 9;
const AT_UID: u64 = 11;
const AT_EUID: u64 = 12;
const AT_GID: u64 = 13;
const AT_EGID: u64 = 14;
const AT_PLATFORM: u64 = 15;
const AT_HWCAP: u64 = 16;
const AT_CLKTCK: u64 = 17;
const AT_SECURE: u64 = 23;
const AT_RANDOM: u64 = 25;
const AT_HWCAP2: u64 = 26;
const AT_EXECFN: u64 = 31;
const AT_SYSINFO_EHDR: u64 = 33;
const AT_MINSIGSTKSZ: u64 = 51;

/// AT_MINSIGSTKSZ: the largest signal frame this CPU's state needs. The guest runs with the
/// host's CPU state components, so the host kernel's own value is the guest's.
fn minsigstksz() -> u64 {
    // SAFETY: getauxval reads this process's auxiliary vector; it has no preconditions.
    match unsafe { libc::getauxval(AT_MINSIGSTKSZ) } {
        0 => 2048,
        v => v,
    }
}

/// Lay out strings, auxv, envp, argv and argc below `STACK_TOP`, with the interpreter's base
/// and the vDSO's address for the auxiliary vector. Returns rsp and where the strings and the
/// auxiliary vector are.
fn build_stack(
    space: &mut AddressSpace,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    execfn: &[u8],
    facts: &AuxFacts,
    main: &Mapped,
    (interp_base, vdso): (u64, Option<u64>),
) -> Option<(u64, StackLayout)> {
    let mut sp = STACK_TOP - 8;
    let mut push_bytes = |space: &mut AddressSpace, data: &[u8], nul: bool| -> Option<u64> {
        let len = data.len() as u64 + nul as u64;
        sp = sp.checked_sub(len)?;
        space.fault_in_range(sp, len);
        space.mem.write(sp, data).ok()?;
        if nul {
            space.mem.write(sp + data.len() as u64, &[0]).ok()?;
        }
        Some(sp)
    };
    let execfn_at = push_bytes(space, execfn, true)?;
    let mut env_at = Vec::with_capacity(envp.len());
    for e in envp.iter().rev() {
        env_at.push(push_bytes(space, e, true)?);
    }
    env_at.reverse();
    let mut arg_at = Vec::with_capacity(argv.len());
    for a in argv.iter().rev() {
        arg_at.push(push_bytes(space, a, true)?);
    }
    arg_at.reverse();
    // The strings lie in order: argv[0].., envp[0].., then the execfn.
    let args_start = arg_at
        .first()
        .or(env_at.first())
        .copied()
        .unwrap_or(execfn_at);
    let env_start = env_at.first().copied().unwrap_or(execfn_at);
    let platform_at = push_bytes(space, b"x86_64", true)?;
    let random_at = push_bytes(space, &facts.random, false)?;
    sp &= !15;

    // AT_SYSINFO_EHDR comes first, as Linux's ARCH_DLINFO puts it.
    let mut auxv: Vec<(u64, u64)> = vdso.map(|at| (AT_SYSINFO_EHDR, at)).into_iter().collect();
    auxv.extend([
        (AT_MINSIGSTKSZ, minsigstksz()),
        (AT_HWCAP, facts.hwcap),
        (AT_PAGESZ, PAGE),
        (AT_CLKTCK, 100),
        (AT_PHDR, main.phdr),
        (AT_PHENT, 56),
        (AT_PHNUM, main.phnum),
        (AT_BASE, interp_base),
        (AT_FLAGS, 0),
        (AT_ENTRY, main.entry),
        (AT_UID, facts.ids[0]),
        (AT_EUID, facts.ids[1]),
        (AT_GID, facts.ids[2]),
        (AT_EGID, facts.ids[3]),
        (AT_SECURE, 0),
        (AT_RANDOM, random_at),
        (AT_HWCAP2, 0),
        (AT_EXECFN, execfn_at),
        (AT_PLATFORM, platform_at),
        (AT_NULL, 0),
    ]);
    let auxv_len = auxv.len() as u64 * 16;
    let mut words: Vec<u64> = Vec::new();
    words.push(argv.len() as u64);
    words.extend(&arg_at);
    words.push(0);
    words.extend(&env_at);
    words.push(0);
    for (k, v) in auxv {
        words.push(k);
        words.push(v);
    }
    let bytes = words.len() as u64 * 8;
    let mut rsp = sp.checked_sub(bytes)?;
    rsp &= !15;
    let raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    space.fault_in_range(rsp, raw.len() as u64);
    space.mem.write(rsp, &raw).ok()?;
    let auxv_at = rsp + (words.len() as u64 * 8 - auxv_len);
    Some((
        rsp,
        StackLayout {
            args: (args_start, env_start),
            env: (env_start, execfn_at),
            auxv: (auxv_at, auxv_at + auxv_len),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMem;

    fn facts() -> AuxFacts {
        AuxFacts {
            hwcap: 0x178bfbff,
            ids: [1, 2, 3, 4],
            random: [7; 16],
        }
    }

    fn space() -> AddressSpace {
        AddressSpace::new(GuestMem::new(256 << 20).unwrap())
    }

    /// The vDSO as glibc, musl and Go look at it: a shared object with no relocations and
    /// no writable data, one read-and-execute segment, and the five calls at LINUX_2.6.
    #[test]
    fn the_vdso_is_a_self_contained_shared_object() {
        let elf = Elf::parse(guest::VDSO).unwrap();
        assert_eq!(elf.header.e_type, header::ET_DYN);
        let loads: Vec<_> = elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == program_header::PT_LOAD)
            .collect();
        assert_eq!(loads.len(), 1);
        assert_eq!(
            loads[0].p_flags,
            program_header::PF_R | program_header::PF_X
        );
        assert_eq!(loads[0].p_vaddr, 0);
        assert!(elf.dynrelas.is_empty() && elf.dynrels.is_empty() && elf.pltrelocs.is_empty());
        for sh in &elf.section_headers {
            let name = elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("");
            assert!(
                !(name.starts_with(".data")
                    || name.starts_with(".bss")
                    || name.starts_with(".got"))
                    || sh.sh_size == 0,
                "writable section {name} of {} bytes",
                sh.sh_size
            );
        }
        let dynamic = elf.dynamic.as_ref().expect("PT_DYNAMIC");
        assert_eq!(elf.soname, Some("linux-vdso.so.1"));
        assert!(dynamic.info.hash.is_some() && dynamic.info.gnu_hash.is_some());
        let names: Vec<&str> = elf
            .dynsyms
            .iter()
            .filter(|s| s.st_value != 0)
            .filter_map(|s| elf.dynstrtab.get_at(s.st_name))
            .collect();
        for want in [
            "__vdso_clock_gettime",
            "__vdso_gettimeofday",
            "__vdso_time",
            "__vdso_clock_getres",
            "__vdso_getcpu",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn the_vdso_is_announced_first_in_the_auxiliary_vector() {
        let mut s = space();
        crate::cpu::install_stub(&mut s.mem).unwrap();
        // (This test program itself: a dynamic executable.)
        let me = std::env::current_exe().unwrap();
        let started = load(&mut s, &me, &[b"t".to_vec()], &[], b"t", &facts(), "256M").unwrap();
        let mut pair = [0u8; 16];
        s.mem.read(started.layout.auxv.0, &mut pair).unwrap();
        let key = u64::from_le_bytes(pair[..8].try_into().unwrap());
        let at = u64::from_le_bytes(pair[8..].try_into().unwrap());
        assert_eq!(key, AT_SYSINFO_EHDR);
        let mut head = [0u8; 4];
        s.mem.read(at, &mut head).unwrap();
        assert_eq!(&head, b"\x7fELF");
    }

    #[test]
    fn rejects_non_elf_and_foreign_elves() {
        let dir = std::env::temp_dir().join(format!("mosvm-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let txt = dir.join("script");
        std::fs::write(&txt, b"#!/bin/sh\necho hi\n").unwrap();
        let mut s = space();
        let e = load(&mut s, &txt, &[], &[], b"x", &facts(), "1G").unwrap_err();
        assert!(matches!(e, LoadError::NotElf(_)), "{e}");
        let mut elf32 = b"\x7fELF\x01\x01\x01".to_vec();
        elf32.resize(64, 0);
        let f = dir.join("elf32");
        std::fs::write(&f, &elf32).unwrap();
        assert!(matches!(
            load(&mut s, &f, &[], &[], b"x", &facts(), "1G"),
            Err(LoadError::Elf32(_))
        ));
        let mut arm = b"\x7fELF\x02\x01\x01".to_vec();
        arm.resize(64, 0);
        arm[18] = 183; // EM_AARCH64
        std::fs::write(&f, &arm).unwrap();
        let e = load(&mut s, &f, &[], &[], b"x", &facts(), "1G").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: is an ELF for machine aarch64, not x86-64", f.display())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The stack layout is read back exactly as a C runtime would read it.
    #[test]
    fn stack_has_argc_argv_envp_auxv() {
        let exe = std::env::current_exe().unwrap();
        let mut s = space();
        let argv = vec![b"prog".to_vec(), b"a b".to_vec()];
        let envp = vec![b"K=V".to_vec()];
        let st = load(&mut s, &exe, &argv, &envp, b"/x/prog", &facts(), "256M").unwrap();
        assert_eq!(st.rsp % 16, 0);
        let rd = |a: u64| s.mem.read_u64_va(a).unwrap();
        assert_eq!(rd(st.rsp), 2);
        assert_eq!(s.mem.read_cstr(rd(st.rsp + 8), 100).unwrap(), b"prog");
        assert_eq!(s.mem.read_cstr(rd(st.rsp + 16), 100).unwrap(), b"a b");
        assert_eq!(rd(st.rsp + 24), 0);
        assert_eq!(s.mem.read_cstr(rd(st.rsp + 32), 100).unwrap(), b"K=V");
        assert_eq!(rd(st.rsp + 40), 0);
        let mut a = st.rsp + 48;
        let mut aux = std::collections::HashMap::new();
        loop {
            let (k, v) = (rd(a), rd(a + 8));
            if k == AT_NULL {
                break;
            }
            aux.insert(k, v);
            a += 16;
        }
        assert_eq!(aux[&AT_PAGESZ], 4096);
        assert_eq!(aux[&AT_UID], 1);
        assert_eq!(aux[&AT_EGID], 4);
        assert_eq!(aux[&AT_ENTRY], st.entry);
        assert_eq!(s.mem.read_cstr(aux[&AT_EXECFN], 100).unwrap(), b"/x/prog");
        let mut r = [0u8; 16];
        s.mem.read(aux[&AT_RANDOM], &mut r).unwrap();
        assert_eq!(r, [7; 16]);
        // The test binary is a dynamic PIE: loaded at the PIE base, with an interpreter.
        assert!(st.entry > PIE_BASE && st.entry < PIE_BASE + (1 << 32));
        assert_ne!(st.interp_base, 0);
        // AT_PHDR points at a real program header table: first entry's type is readable.
        let phdr_type = s.mem.read_u64_va(aux[&AT_PHDR]).unwrap() as u32;
        assert!(phdr_type == program_header::PT_PHDR || phdr_type == program_header::PT_LOAD);
        assert!(aux[&AT_PHNUM] > 2);
    }

    #[test]
    fn shebang_lines_split_as_binfmt_script_does() {
        assert_eq!(
            parse_shebang(b"#!/bin/sh\necho"),
            Some((b"/bin/sh".to_vec(), None))
        );
        assert_eq!(
            parse_shebang(b"#! /usr/bin/env  python3 -u \nx"),
            Some((b"/usr/bin/env".to_vec(), Some(b"python3 -u".to_vec())))
        );
        assert_eq!(parse_shebang(b"#!\n"), None);
        assert_eq!(parse_shebang(b"\x7fELF"), None);
    }
}
