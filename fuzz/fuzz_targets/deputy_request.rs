//! The deputy's request decoding, as a peer can feed it: bytes off the link are decoded as a
//! frame; a `DeputyRequest` goes through the marshalling choke point (`deputy::marshal`),
//! and the host call it builds must touch nothing but its own buffers (`Call::verify`). No
//! system call is made. Run: `cargo +nightly fuzz run deputy_request` in this directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate::frame::{decode_frame, Slot as WireSlot};
use migrate::Message;
use vmm::deputy::marshal::{Call, FixedFds, MAX_XFER};
use vmm::deputy::{Request, Slot};
use vmm::table::{self, Class};

fuzz_target!(|data: &[u8]| {
    let Ok((Message::DeputyRequest(r), used)) = decode_frame(data) else {
        return;
    };
    // What the home side makes of it (src/link.rs, from_wire).
    let req = Request {
        nr: r.nr,
        args: r.args,
        slots: r
            .slots
            .into_iter()
            .map(|s| match s {
                WireSlot::Null => Slot::Null,
                WireSlot::In(b) => Slot::In(b),
                WireSlot::Out(n) => Slot::Out(n.min(MAX_XFER as u64) as usize),
                WireSlot::InOut(b) => Slot::InOut(b),
                WireSlot::Fault => Slot::Fault,
            })
            .collect(),
    };
    let Some(Class::Home(base)) = table::lookup(req.nr).map(|e| e.class) else {
        return;
    };
    let nr = req.nr;
    if let Ok(mut call) = Call::prepare(req, base, &FixedFds) {
        let a = call.host_args();
        if let Err(e) = call.verify(&a) {
            panic!("{} would reach outside its buffers: {e}", table::name(nr));
        }
        // Whatever the host answered, the reply is built without panicking.
        let ret = data
            .get(used..used + 8)
            .map_or(0, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
        let _ = call.finish(ret, &mut FixedFds);
    }
});
