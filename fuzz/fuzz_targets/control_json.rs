//! The node's control socket: each line a local client or a registered `mosvm run` sends is
//! decoded as the node decodes it (a request, a process's update, a guest host's ask on its
//! channel) and as a client decodes the node's answers and commands; whatever decodes encodes
//! again to the same value.
//! Run: `cargo fuzz run control_json` in this directory.
#![no_main]
#![allow(dead_code)]

/// The one type of the node's admin module the control messages carry.
mod admin {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Status {
        pub node: String,
    }
}

#[path = "../../src/control.rs"]
mod control;

use libfuzzer_sys::fuzz_target;

fn round_trip<T>(line: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = serde_json::from_str::<T>(line) {
        let text = serde_json::to_string(&v).expect("a decoded value encodes");
        let back: T = serde_json::from_str(&text).expect("an encoded value decodes");
        assert_eq!(back, v);
    }
}

fuzz_target!(|data: &[u8]| {
    for line in String::from_utf8_lossy(data).lines() {
        round_trip::<control::Request>(line);
        round_trip::<control::Update>(line);
        round_trip::<control::Command>(line);
        round_trip::<control::Reply>(line);
        round_trip::<control::Ask>(line);
    }
});
