//! KVM_GET_SUPPORTED_CPUID's answer kept between runs: the ioctl runs the CPUID instruction
//! some eighty times, and under nested virtualisation each one exits to the outer hypervisor
//! (about 5 µs here, 0.45 ms a run: the largest single cost of starting a guest).
//!
//! The answer depends on the CPU, the kernel and KVM's module parameters. It is kept per user
//! (in `$XDG_RUNTIME_DIR/mosvm/`, else `/tmp/mosvm-UID/`, a directory of the user's own that
//! nobody else may write) and only for the boot it was read in (`/proc/sys/kernel/random/
//! boot_id`) and the running kernel (`osrelease`). Reloading the KVM module with other
//! parameters within one boot is not seen: delete the file then. Anything unexpected (a file of
//! another owner or writable by others, a different boot, a short or long file) means asking
//! KVM again; a failure to store is silent.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

/// The file's first line: format, boot, kernel.
fn key() -> Option<Vec<u8>> {
    let boot = std::fs::read("/proc/sys/kernel/random/boot_id").ok()?;
    let release = std::fs::read("/proc/sys/kernel/osrelease").ok()?;
    let mut k = b"mosvm-cpuid 2 ".to_vec();
    k.extend(boot.trim_ascii());
    k.push(b' ');
    k.extend(release.trim_ascii());
    k.push(b'\n');
    Some(k)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The user's own directory for the file (made 0700 if missing); None when it is not theirs
/// alone.
fn dir() -> Option<PathBuf> {
    // (A relative XDG_RUNTIME_DIR is ignored, as the XDG base directory specification says.)
    let d = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(x) if x.is_absolute() => x.join("mosvm"),
        _ => std::env::temp_dir().join(format!("mosvm-{}", euid())),
    };
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&d);
    let m = std::fs::symlink_metadata(&d).ok()?;
    (m.is_dir() && m.uid() == euid() && m.mode() & 0o022 == 0).then_some(d)
}

const ENTRY: usize = std::mem::size_of::<kvm_cpuid_entry2>();

/// A checksum of the entries, so that a file damaged after its header is not taken for KVM's
/// answer (SipHash with fixed keys: a Rust release that changes it only costs one ioctl).
fn sum(body: &[u8]) -> [u8; 8] {
    use std::hash::Hasher;
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    h.write(body);
    h.finish().to_le_bytes()
}

/// The entries, then their checksum.
fn encode(c: &CpuId) -> Vec<u8> {
    let mut out = encode_entries(c);
    let s = sum(&out);
    out.extend(s);
    out
}

fn encode_entries(c: &CpuId) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.as_slice().len() * ENTRY + 8);
    for e in c.as_slice() {
        for w in [
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx, 0, 0, 0,
        ] {
            out.extend(w.to_le_bytes());
        }
    }
    out
}

/// What [`encode`] wrote, if its checksum holds.
fn decode(b: &[u8]) -> Option<CpuId> {
    let (b, s) = b.split_at_checked(b.len().checked_sub(8)?)?;
    if sum(b) != s {
        return None;
    }
    if b.is_empty() || !b.len().is_multiple_of(ENTRY) || b.len() / ENTRY > KVM_MAX_CPUID_ENTRIES {
        return None;
    }
    let entries: Vec<kvm_cpuid_entry2> = b
        .chunks_exact(ENTRY)
        .map(|c| {
            let w = |i: usize| u32::from_le_bytes(c[i * 4..i * 4 + 4].try_into().expect("4"));
            kvm_cpuid_entry2 {
                function: w(0),
                index: w(1),
                flags: w(2),
                eax: w(3),
                ebx: w(4),
                ecx: w(5),
                edx: w(6),
                ..Default::default()
            }
        })
        .collect();
    CpuId::from_entries(&entries).ok()
}

/// The kept answer, if it is there and still holds.
pub fn load() -> Option<CpuId> {
    let key = key()?;
    let path = dir()?.join("cpuid");
    // (O_NONBLOCK: a FIFO put there must not hold the start up; only a regular file counts.)
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.uid() != euid() || m.mode() & 0o022 != 0 || m.len() > 64 * 1024 {
        return None;
    }
    let mut b = Vec::new();
    f.read_to_end(&mut b).ok()?;
    decode(b.strip_prefix(key.as_slice())?)
}

/// Keep `c` for the next runs (best effort: written aside, then renamed into place).
pub fn store(c: &CpuId) {
    let (Some(key), Some(d)) = (key(), dir()) else {
        return;
    };
    let tmp = d.join(format!("cpuid.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&key)?;
            f.write_all(&encode(c))
        });
    if written.is_err() || std::fs::rename(&tmp, d.join("cpuid")).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_the_file_format() {
        let e = kvm_cpuid_entry2 {
            function: 0xd,
            index: 1,
            flags: 1,
            eax: 2,
            ebx: 3,
            ecx: 4,
            edx: 5,
            ..Default::default()
        };
        let c = CpuId::from_entries(&[e, kvm_cpuid_entry2::default()]).unwrap();
        let back = decode(&encode(&c)).unwrap();
        assert_eq!(back.as_slice(), c.as_slice());
        assert!(decode(&encode(&c)[1..]).is_none());
        assert!(decode(&[]).is_none());
        // Damage anywhere (a bit of an entry, the sum, zeroes of the right length) is seen.
        let good = encode(&c);
        for at in [0, 13, ENTRY + 3, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(decode(&bad).is_none(), "flip at {at}");
        }
        assert!(decode(&vec![0; good.len()]).is_none());
    }
}
