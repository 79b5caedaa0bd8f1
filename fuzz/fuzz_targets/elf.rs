//! Programs as `mosvm run` and execve load them: mutated ELF files (seeded with the project's
//! own images) are checked and loaded into a real (small) guest memory with its page tables;
//! a bad file is refused with an error, never a panic or a write outside guest memory.
//! Run: `cargo fuzz run elf` in this directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use vmm::loader::{self, AuxFacts};
use vmm::memory::GuestMem;
use vmm::mm::AddressSpace;

fuzz_target!(|data: &[u8]| {
    let Ok(mut f) = tempfile::NamedTempFile::new() else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    let path = f.path().to_path_buf();
    if loader::check(&path).is_err() {
        return;
    }
    let Ok(mem) = GuestMem::new(32 << 20) else {
        return;
    };
    let mut space = AddressSpace::new(mem);
    let facts = AuxFacts {
        hwcap: 0,
        ids: [0; 4],
        random: [1; 16],
    };
    let argv = vec![b"prog".to_vec(), b"arg".to_vec()];
    let envp = vec![b"A=b".to_vec()];
    let _ = loader::load(&mut space, &path, &argv, &envp, b"prog", &facts, "32M");
});
