//! The guest state a migration source sends (vCPU and VMM state, bincode): decoded as the
//! destination decodes it, then the part of the restore that needs no KVM: the guest memory
//! layout, the areas and the break over a real (small) guest memory, and what reads them.
//! Run: `cargo fuzz run migstate` in this directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::memory::GuestMem;
use vmm::vm::MigState;

fuzz_target!(|data: &[u8]| {
    let Ok(mut st) = MigState::decode(data) else {
        return;
    };
    let Ok(mem) = GuestMem::new(16 << 20) else {
        return;
    };
    let Ok(mut space) = st.vmm.address_space(mem) else {
        return;
    };
    std::hint::black_box(space.mapped_bytes());
    let areas: Vec<u64> = space.vmas().map(|(s, _)| s).take(64).collect();
    for start in areas {
        std::hint::black_box(space.accessible(start, 1 << 20, true));
        space.fault_in(start, false);
    }
});
