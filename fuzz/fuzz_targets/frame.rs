//! Frames as a peer can send them (node to node, home to guest host): any bytes are decoded as
//! a frame, read as a stream, answered as a first message (the Hello/Welcome handshake), and
//! page batches are unpacked. Whatever decodes must encode again to what decodes the same.
//! Run: `cargo fuzz run frame` in this directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate::frame::{decode_frame, encode_frame, read_message};
use migrate::handshake::{answer, CpuFeatures, ServerIdentity};
use migrate::Message;

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    let streamed = read_message(&mut cursor);
    let ours = ServerIdentity {
        node_name: "fuzz".into(),
        host_cpu: CpuFeatures::default(),
    };
    let _ = answer(streamed.as_ref().map(|m| m.clone()), &ours, |_, _| Ok(()));
    let Ok((msg, used)) = decode_frame(data) else {
        return;
    };
    assert!(used <= data.len());
    if let Message::Pages(batch) = &msg {
        if let Ok(pages) = batch.decode() {
            for (gpn, page) in pages.iter() {
                std::hint::black_box((gpn, page[0]));
            }
        }
    }
    let again = encode_frame(&msg).expect("a decoded message encodes");
    let (back, n) = decode_frame(&again).expect("an encoded message decodes");
    assert_eq!(n, again.len());
    assert_eq!(format!("{back:?}"), format!("{msg:?}"));
});
