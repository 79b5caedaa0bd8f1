//! Gossip datagrams as a node receives them: any bytes (refused before or at the MAC), and
//! bodies a peer holding the cluster key could sign, decoded and checked behind the MAC.
//! Run: `cargo fuzz run gossip` in this directory.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/gossip.rs"]
mod gossip;

use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let mut opener = gossip::Opener::new(KEY);
    let _ = opener.open(data, 1_000_000);
    // The same bytes as a signed body: magic, body, MAC.
    let mut signed = gossip::MAGIC.to_vec();
    signed.extend_from_slice(data);
    let tag = blake3::keyed_hash(&KEY, &signed);
    signed.extend_from_slice(tag.as_bytes());
    if let Ok(env) = opener.open(&signed, 1_000_000) {
        std::hint::black_box(env);
    }
});
