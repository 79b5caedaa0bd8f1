//! The versioned handshake that opens every node-to-node connection.
//!
//! The client sends [`Message::Hello`] (protocol version, node name, [`Purpose`], the CPU
//! features its guest may use, and for the deputy channel the process's token); the server
//! answers [`Message::Welcome`] or [`Message::Refuse`] with a reason. The decision is a pure
//! function ([`answer`]); [`client_handshake`] and [`server_handshake`] are thin drivers over
//! any `Read + Write` stream (a TLS stream from [`crate::tls`] in production).
//!
//! CPU features are compared only for [`Purpose::Migrate`]: a guest may land on a node only if
//! every feature its CPUID showed is offered there ([`cpu_compatible`]).

use std::io::{Read, Write};

use bincode::{Decode, Encode};

use crate::frame::{read_message, write_message, FrameError, Kind, Message, PROTOCOL_VERSION};

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Purpose {
    /// A live migration: this node will receive a guest.
    Migrate,
    /// A remote guest's deputy channel to its home node.
    Deputy,
    /// Node-service control traffic (signals, exits, pings).
    Control,
}

/// One CPUID leaf's feature bits (the registers hold masks of feature flags only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct CpuidLeaf {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The CPU features a guest may rely on, or a host offers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct CpuFeatures {
    /// Feature-flag leaves; identification fields (family, APIC id, limits) must be zero.
    pub leaves: Vec<CpuidLeaf>,
    /// XCR0: the XSAVE state components enabled.
    pub xcr0: u64,
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The CPUID registers that hold feature flags: (leaf, subleaf, register).
pub const FEATURE_REGISTERS: &[(u32, u32, Reg)] = &[
    (0x1, 0, Reg::Ecx),
    (0x1, 0, Reg::Edx),
    (0x7, 0, Reg::Ebx),
    (0x7, 0, Reg::Ecx),
    (0x7, 0, Reg::Edx),
    (0x7, 1, Reg::Eax),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
];

impl CpuidLeaf {
    fn get(&self, r: Reg) -> u32 {
        match r {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }
    fn set(&mut self, r: Reg, v: u32) {
        match r {
            Reg::Eax => self.eax = v,
            Reg::Ebx => self.ebx = v,
            Reg::Ecx => self.ecx = v,
            Reg::Edx => self.edx = v,
        }
    }
}

impl CpuFeatures {
    /// Keeps only the feature-flag registers ([`FEATURE_REGISTERS`]) of raw CPUID output.
    pub fn from_cpuid(raw: &[CpuidLeaf], xcr0: u64) -> CpuFeatures {
        let mut leaves: Vec<CpuidLeaf> = Vec::new();
        for &(leaf, subleaf, reg) in FEATURE_REGISTERS {
            let Some(src) = raw.iter().find(|l| l.leaf == leaf && l.subleaf == subleaf) else {
                continue;
            };
            let idx = match leaves
                .iter()
                .position(|l| l.leaf == leaf && l.subleaf == subleaf)
            {
                Some(i) => i,
                None => {
                    leaves.push(CpuidLeaf {
                        leaf,
                        subleaf,
                        eax: 0,
                        ebx: 0,
                        ecx: 0,
                        edx: 0,
                    });
                    leaves.len() - 1
                }
            };
            leaves[idx].set(reg, src.get(reg));
        }
        CpuFeatures { leaves, xcr0 }
    }

    /// The features both sets offer: a cluster-wide baseline is the intersection of all nodes'.
    pub fn intersect(&self, other: &CpuFeatures) -> CpuFeatures {
        let leaves = self
            .leaves
            .iter()
            .filter_map(|a| {
                let b = other
                    .leaves
                    .iter()
                    .find(|b| b.leaf == a.leaf && b.subleaf == a.subleaf)?;
                Some(CpuidLeaf {
                    leaf: a.leaf,
                    subleaf: a.subleaf,
                    eax: a.eax & b.eax,
                    ebx: a.ebx & b.ebx,
                    ecx: a.ecx & b.ecx,
                    edx: a.edx & b.edx,
                })
            })
            .collect();
        CpuFeatures {
            leaves,
            xcr0: self.xcr0 & other.xcr0,
        }
    }
}

/// The conventional name of a CPUID feature bit, where it has one.
pub fn feature_name(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Option<&'static str> {
    use Reg::*;
    Some(match (leaf, subleaf, reg, bit) {
        (1, 0, Ecx, 0) => "sse3",
        (1, 0, Ecx, 1) => "pclmulqdq",
        (1, 0, Ecx, 9) => "ssse3",
        (1, 0, Ecx, 12) => "fma",
        (1, 0, Ecx, 13) => "cx16",
        (1, 0, Ecx, 19) => "sse4.1",
        (1, 0, Ecx, 20) => "sse4.2",
        (1, 0, Ecx, 22) => "movbe",
        (1, 0, Ecx, 23) => "popcnt",
        (1, 0, Ecx, 25) => "aes",
        (1, 0, Ecx, 26) => "xsave",
        (1, 0, Ecx, 27) => "osxsave",
        (1, 0, Ecx, 28) => "avx",
        (1, 0, Ecx, 29) => "f16c",
        (1, 0, Ecx, 30) => "rdrand",
        (1, 0, Edx, 0) => "fpu",
        (1, 0, Edx, 4) => "tsc",
        (1, 0, Edx, 8) => "cx8",
        (1, 0, Edx, 15) => "cmov",
        (1, 0, Edx, 19) => "clflush",
        (1, 0, Edx, 23) => "mmx",
        (1, 0, Edx, 24) => "fxsr",
        (1, 0, Edx, 25) => "sse",
        (1, 0, Edx, 26) => "sse2",
        (7, 0, Ebx, 0) => "fsgsbase",
        (7, 0, Ebx, 3) => "bmi1",
        (7, 0, Ebx, 5) => "avx2",
        (7, 0, Ebx, 8) => "bmi2",
        (7, 0, Ebx, 9) => "erms",
        (7, 0, Ebx, 16) => "avx512f",
        (7, 0, Ebx, 17) => "avx512dq",
        (7, 0, Ebx, 18) => "rdseed",
        (7, 0, Ebx, 19) => "adx",
        (7, 0, Ebx, 21) => "avx512ifma",
        (7, 0, Ebx, 23) => "clflushopt",
        (7, 0, Ebx, 28) => "avx512cd",
        (7, 0, Ebx, 29) => "sha",
        (7, 0, Ebx, 30) => "avx512bw",
        (7, 0, Ebx, 31) => "avx512vl",
        (7, 0, Ecx, 1) => "avx512vbmi",
        (7, 0, Ecx, 6) => "avx512vbmi2",
        (7, 0, Ecx, 8) => "gfni",
        (7, 0, Ecx, 9) => "vaes",
        (7, 0, Ecx, 10) => "vpclmulqdq",
        (7, 0, Ecx, 11) => "avx512vnni",
        (7, 0, Ecx, 12) => "avx512bitalg",
        (7, 0, Ecx, 14) => "avx512vpopcntdq",
        (7, 0, Ecx, 22) => "rdpid",
        (7, 0, Edx, 4) => "fsrm",
        (7, 0, Edx, 8) => "avx512vp2intersect",
        (7, 0, Edx, 14) => "serialize",
        (7, 0, Edx, 22) => "amx-bf16",
        (7, 0, Edx, 24) => "amx-tile",
        (7, 0, Edx, 25) => "amx-int8",
        (7, 1, Eax, 4) => "avx-vnni",
        (7, 1, Eax, 5) => "avx512bf16",
        (0xd, 1, Eax, 0) => "xsaveopt",
        (0xd, 1, Eax, 1) => "xsavec",
        (0xd, 1, Eax, 3) => "xsaves",
        (0x8000_0001, 0, Ecx, 0) => "lahf_lm",
        (0x8000_0001, 0, Ecx, 5) => "lzcnt",
        (0x8000_0001, 0, Ecx, 6) => "sse4a",
        (0x8000_0001, 0, Ecx, 8) => "prefetchw",
        (0x8000_0001, 0, Edx, 11) => "syscall",
        (0x8000_0001, 0, Edx, 20) => "nx",
        (0x8000_0001, 0, Edx, 26) => "pdpe1gb",
        (0x8000_0001, 0, Edx, 27) => "rdtscp",
        (0x8000_0001, 0, Edx, 29) => "lm",
        _ => return None,
    })
}

fn xcr0_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        0 => "x87",
        1 => "sse",
        2 => "avx",
        3 => "bndregs",
        4 => "bndcsr",
        5 => "opmask",
        6 => "zmm_hi256",
        7 => "hi16_zmm",
        9 => "pkru",
        17 => "xtilecfg",
        18 => "xtiledata",
        _ => return None,
    })
}

/// Checks that every feature `guest` may use is offered by `host`; the error names the first
/// missing one (in the guest's leaf order, registers eax..edx, low bit first, then XCR0).
pub fn cpu_compatible(guest: &CpuFeatures, host: &CpuFeatures) -> Result<(), String> {
    for g in &guest.leaves {
        let h = host
            .leaves
            .iter()
            .find(|h| h.leaf == g.leaf && h.subleaf == g.subleaf);
        for reg in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx] {
            let want = g.get(reg);
            let have = h.map_or(0, |h| h.get(reg));
            let missing = want & !have;
            if missing != 0 {
                let bit = missing.trailing_zeros();
                let name = match feature_name(g.leaf, g.subleaf, reg, bit) {
                    Some(n) => format!("{n} (cpuid {:#x}.{} {reg:?} bit {bit})", g.leaf, g.subleaf),
                    None => format!("cpuid {:#x}.{} {reg:?} bit {bit}", g.leaf, g.subleaf),
                };
                return Err(format!("host CPU lacks {}", name.to_lowercase()));
            }
        }
    }
    let missing = guest.xcr0 & !host.xcr0;
    if missing != 0 {
        let bit = missing.trailing_zeros();
        let name = match xcr0_name(bit) {
            Some(n) => format!("{n} state (xcr0 bit {bit})"),
            None => format!("xcr0 bit {bit}"),
        };
        return Err(format!("host CPU lacks {name}"));
    }
    Ok(())
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    pub protocol_version: u16,
    pub node_name: String,
    pub purpose: Purpose,
    /// For [`Purpose::Migrate`], the features the guest may use; otherwise may be empty.
    pub cpu_features: CpuFeatures,
    /// For [`Purpose::Deputy`], the process's token.
    pub token: Option<[u8; 32]>,
}

impl Hello {
    /// A Hello at this build's protocol version.
    pub fn new(
        node_name: impl Into<String>,
        purpose: Purpose,
        cpu_features: CpuFeatures,
        token: Option<[u8; 32]>,
    ) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node_name: node_name.into(),
            purpose,
            cpu_features,
            token,
        }
    }
}

/// The server's acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    pub protocol_version: u16,
    pub node_name: String,
}

/// What the server knows about itself when answering a Hello.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    pub node_name: String,
    /// The features this host offers guests.
    pub host_cpu: CpuFeatures,
}

/// Compares two tokens in time independent of where they differ.
pub fn tokens_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The server's decision on the first frame it read: the reply to send (always
/// [`Message::Welcome`] or [`Message::Refuse`]) and, on acceptance, the client's Hello.
///
/// `check_token` decides whether the client's token entitles it to the purpose; it is called
/// only for a well-formed Hello of our version. [`Purpose::Deputy`] without a token is refused
/// before it is asked.
pub fn answer(
    first: Result<Message, &FrameError>,
    ours: &ServerIdentity,
    check_token: impl FnOnce(Purpose, Option<&[u8; 32]>) -> Result<(), String>,
) -> (Message, Option<Hello>) {
    let refuse = |reason: String| (Message::Refuse { reason }, None);
    let hello = match first {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            return refuse(format!(
                "expected Hello as the first message, got {:?}",
                other.kind()
            ))
        }
        Err(FrameError::Version { theirs, .. }) => {
            return refuse(format!(
            "protocol version mismatch: {} speaks version {PROTOCOL_VERSION}, peer speaks {theirs}",
            ours.node_name
        ))
        }
        Err(e) => return refuse(format!("bad handshake: {e}")),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return refuse(format!(
            "protocol version mismatch: {} speaks version {PROTOCOL_VERSION}, peer announced {}",
            ours.node_name, hello.protocol_version
        ));
    }
    if hello.purpose == Purpose::Migrate {
        if let Err(e) = cpu_compatible(&hello.cpu_features, &ours.host_cpu) {
            return refuse(format!("CPU mismatch: {e}"));
        }
    }
    if hello.purpose == Purpose::Deputy && hello.token.is_none() {
        return refuse("deputy channel requires the process's token".into());
    }
    if let Err(e) = check_token(hello.purpose, hello.token.as_ref()) {
        return refuse(e);
    }
    (
        Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            node_name: ours.node_name.clone(),
        }),
        Some(hello),
    )
}

/// Errors of the handshake, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Frame(FrameError),
    #[error("peer speaks protocol version {theirs}, this node speaks {ours}{}", match .reason { Some(r) => format!(": {r}"), None => String::new() })]
    Version {
        ours: u16,
        theirs: u16,
        reason: Option<String>,
    },
    #[error("refused by peer: {0}")]
    RefusedByPeer(String),
    #[error("refused peer: {0}")]
    RefusedPeer(String),
    #[error("unexpected {0:?} during handshake")]
    Unexpected(Kind),
}

impl From<FrameError> for HandshakeError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Version {
                ours,
                theirs,
                refusal,
            } => HandshakeError::Version {
                ours,
                theirs,
                reason: refusal,
            },
            e => HandshakeError::Frame(e),
        }
    }
}

/// The client's reading of the server's reply.
pub fn client_outcome(reply: Result<Message, FrameError>) -> Result<Welcome, HandshakeError> {
    match reply? {
        Message::Welcome(w) if w.protocol_version == PROTOCOL_VERSION => Ok(w),
        Message::Welcome(w) => Err(HandshakeError::Version {
            ours: PROTOCOL_VERSION,
            theirs: w.protocol_version,
            reason: None,
        }),
        Message::Refuse { reason } => Err(HandshakeError::RefusedByPeer(reason)),
        other => Err(HandshakeError::Unexpected(other.kind())),
    }
}

/// Client side: send `hello`, wait for the answer.
pub fn client_handshake<S: Read + Write + ?Sized>(
    s: &mut S,
    hello: &Hello,
) -> Result<Welcome, HandshakeError> {
    write_message(s, &Message::Hello(hello.clone()))?;
    client_outcome(read_message(s))
}

/// Server side: read the Hello, answer it, and return it if accepted. A refused peer (wrong
/// version, not a mosvm peer, CPU mismatch, bad token) is told why before the error returns.
pub fn server_handshake<S: Read + Write + ?Sized>(
    s: &mut S,
    ours: &ServerIdentity,
    check_token: impl FnOnce(Purpose, Option<&[u8; 32]>) -> Result<(), String>,
) -> Result<Hello, HandshakeError> {
    let first = read_message(s);
    if let Err(e @ (FrameError::Io(_) | FrameError::Closed | FrameError::Truncated)) = first {
        return Err(e.into());
    }
    let (reply, hello) = answer(first.as_ref().cloned(), ours, check_token);
    match (reply, hello) {
        (reply @ Message::Welcome(_), Some(hello)) => {
            write_message(s, &reply)?;
            Ok(hello)
        }
        (reply, _) => {
            // Best effort: the refusal is a courtesy, the error below is what counts.
            let _ = write_message(s, &reply);
            match first {
                Err(e) => Err(e.into()),
                Ok(_) => Err(HandshakeError::RefusedPeer(match reply {
                    Message::Refuse { reason } => reason,
                    _ => String::new(),
                })),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame, encode_frame_versioned};
    use std::collections::VecDeque;

    fn leaf(leaf: u32, subleaf: u32, ebx: u32, ecx: u32) -> CpuidLeaf {
        CpuidLeaf {
            leaf,
            subleaf,
            eax: 0,
            ebx,
            ecx,
            edx: 0,
        }
    }

    fn host() -> CpuFeatures {
        CpuFeatures {
            leaves: vec![leaf(1, 0, 0, (1 << 28) | (1 << 20)), leaf(7, 0, 1 << 5, 0)],
            xcr0: 0x7,
        }
    }

    fn ident() -> ServerIdentity {
        ServerIdentity {
            node_name: "dest".into(),
            host_cpu: host(),
        }
    }

    #[test]
    fn subset_is_compatible() {
        let guest = CpuFeatures {
            leaves: vec![leaf(1, 0, 0, 1 << 20)],
            xcr0: 0x3,
        };
        assert_eq!(cpu_compatible(&guest, &host()), Ok(()));
        assert_eq!(cpu_compatible(&host(), &host()), Ok(()));
        assert_eq!(cpu_compatible(&CpuFeatures::default(), &host()), Ok(()));
    }

    #[test]
    fn first_missing_feature_is_named() {
        let guest = CpuFeatures {
            leaves: vec![leaf(7, 0, (1 << 5) | (1 << 16) | (1 << 30), 0)],
            xcr0: 0x7,
        };
        let e = cpu_compatible(&guest, &host()).unwrap_err();
        assert!(e.contains("avx512f"), "{e}");
        assert!(!e.contains("avx512bw"), "{e}");

        // A leaf the host does not report at all.
        let guest = CpuFeatures {
            leaves: vec![leaf(0x8000_0001, 0, 0, 1 << 5)],
            xcr0: 0,
        };
        let e = cpu_compatible(&guest, &host()).unwrap_err();
        assert!(e.contains("lzcnt"), "{e}");

        // An unnamed bit is still located.
        let guest = CpuFeatures {
            leaves: vec![leaf(7, 0, 1 << 1, 0)],
            xcr0: 0,
        };
        let e = cpu_compatible(&guest, &host()).unwrap_err();
        assert!(e.contains("0x7.0 ebx bit 1"), "{e}");

        // XSAVE components.
        let guest = CpuFeatures {
            leaves: vec![],
            xcr0: 0xe7,
        };
        let e = cpu_compatible(&guest, &host()).unwrap_err();
        assert!(e.contains("opmask"), "{e}");
    }

    #[test]
    fn from_cpuid_keeps_only_feature_registers_and_intersect_is_a_baseline() {
        let raw = vec![
            CpuidLeaf {
                leaf: 1,
                subleaf: 0,
                eax: 0x000906ea,  // family/model: not a feature
                ebx: 0x0102_0800, // APIC id: not a feature
                ecx: 0xffff_ffff,
                edx: 0x1,
            },
            CpuidLeaf {
                leaf: 7,
                subleaf: 0,
                eax: 2, // max subleaf: not a feature
                ebx: 0x20,
                ecx: 0,
                edx: 0,
            },
            CpuidLeaf {
                leaf: 0x4000_0000,
                subleaf: 0,
                eax: 9,
                ebx: 9,
                ecx: 9,
                edx: 9,
            },
        ];
        let f = CpuFeatures::from_cpuid(&raw, 0xe7);
        assert_eq!(f.leaves.len(), 2);
        assert_eq!(f.leaves[0].eax, 0);
        assert_eq!(f.leaves[0].ebx, 0);
        assert_eq!(f.leaves[0].ecx, 0xffff_ffff);
        assert_eq!(f.leaves[1].eax, 0);
        assert_eq!(f.leaves[1].ebx, 0x20);
        let base = f.intersect(&host());
        assert_eq!(cpu_compatible(&base, &host()), Ok(()));
        assert_eq!(cpu_compatible(&base, &f), Ok(()));
        assert_eq!(base.xcr0, 0x7);
        assert_eq!(base.leaves[0].ecx, (1 << 28) | (1 << 20));
    }

    fn ok_token(_: Purpose, _: Option<&[u8; 32]>) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn answer_welcomes_a_good_hello() {
        let h = Hello::new("src", Purpose::Migrate, host(), None);
        let (reply, got) = answer(Ok(Message::Hello(h.clone())), &ident(), ok_token);
        assert_eq!(got, Some(h));
        match reply {
            Message::Welcome(w) => {
                assert_eq!(w.node_name, "dest");
                assert_eq!(w.protocol_version, PROTOCOL_VERSION);
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    #[test]
    fn answer_refuses_with_reasons() {
        let id = ident();
        let refused = |r: (Message, Option<Hello>)| match r {
            (Message::Refuse { reason }, None) => reason,
            other => panic!("expected Refuse, got {other:?}"),
        };
        // CPU mismatch for a migration.
        let mut cpu = host();
        cpu.leaves[1].ebx |= 1 << 16;
        let h = Hello::new("src", Purpose::Migrate, cpu.clone(), None);
        assert!(refused(answer(Ok(Message::Hello(h)), &id, ok_token)).contains("avx512f"));
        // The same features do not matter for a control connection.
        let h = Hello::new("src", Purpose::Control, cpu, None);
        assert!(matches!(
            answer(Ok(Message::Hello(h)), &id, ok_token),
            (Message::Welcome(_), Some(_))
        ));
        // Deputy without a token.
        let h = Hello::new("src", Purpose::Deputy, CpuFeatures::default(), None);
        assert!(refused(answer(Ok(Message::Hello(h)), &id, ok_token)).contains("token"));
        // Deputy with the wrong token.
        let good = [7u8; 32];
        let h = Hello::new(
            "src",
            Purpose::Deputy,
            CpuFeatures::default(),
            Some([8; 32]),
        );
        let check = |_: Purpose, t: Option<&[u8; 32]>| match t {
            Some(t) if tokens_equal(t, &good) => Ok(()),
            _ => Err("unknown token".to_string()),
        };
        assert_eq!(
            refused(answer(Ok(Message::Hello(h)), &id, check)),
            "unknown token"
        );
        let h = Hello::new("src", Purpose::Deputy, CpuFeatures::default(), Some(good));
        assert!(matches!(
            answer(Ok(Message::Hello(h)), &id, check),
            (Message::Welcome(_), Some(_))
        ));
        // Wrong version announced inside the Hello.
        let mut h = Hello::new("src", Purpose::Control, CpuFeatures::default(), None);
        h.protocol_version = 99;
        assert!(refused(answer(Ok(Message::Hello(h)), &id, ok_token)).contains("99"));
        // Wrong first message.
        assert!(refused(answer(Ok(Message::Ping { t: 0 }), &id, ok_token)).contains("Ping"));
        // Wrong frame version.
        let e = FrameError::Version {
            ours: PROTOCOL_VERSION,
            theirs: 5,
            refusal: None,
        };
        let r = refused(answer(Err(&e), &id, ok_token));
        assert!(r.contains("version") && r.contains('5'), "{r}");
    }

    #[test]
    fn token_compare() {
        let a = [1u8; 32];
        let mut b = a;
        assert!(tokens_equal(&a, &b));
        b[31] ^= 0x80;
        assert!(!tokens_equal(&a, &b));
    }

    /// An in-memory duplex half: reads from `input`, records writes.
    struct Pipe {
        input: VecDeque<u8>,
        output: Vec<u8>,
    }
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn drivers_agree_over_a_byte_stream() {
        let hello = Hello::new("src", Purpose::Migrate, host(), None);
        let mut server = Pipe {
            input: encode_frame(&Message::Hello(hello.clone())).unwrap().into(),
            output: vec![],
        };
        let got = server_handshake(&mut server, &ident(), ok_token).unwrap();
        assert_eq!(got, hello);
        let mut client = Pipe {
            input: server.output.into(),
            output: vec![],
        };
        let w = client_handshake(&mut client, &hello).unwrap();
        assert_eq!(w.node_name, "dest");
        assert_eq!(
            decode_frame(&client.output).unwrap().0,
            Message::Hello(hello)
        );
    }

    #[test]
    fn other_version_peer_gets_a_refusal_it_can_read() {
        // A client from a future version sends its Hello.
        let mut hello = Hello::new("new", Purpose::Control, CpuFeatures::default(), None);
        hello.protocol_version = PROTOCOL_VERSION + 1;
        let mut wire = Vec::new();
        encode_frame_versioned(&Message::Hello(hello), PROTOCOL_VERSION + 1, &mut wire).unwrap();
        let mut server = Pipe {
            input: wire.into(),
            output: vec![],
        };
        match server_handshake(&mut server, &ident(), ok_token) {
            Err(HandshakeError::Version { theirs, .. }) => assert_eq!(theirs, PROTOCOL_VERSION + 1),
            other => panic!("expected a Version error, got {other:?}"),
        }
        // What it wrote back is a Refuse in the frozen layout, naming both versions.
        let (msg, _) = decode_frame(&server.output).unwrap();
        match msg {
            Message::Refuse { reason } => {
                assert!(reason.contains(&PROTOCOL_VERSION.to_string()), "{reason}");
                assert!(
                    reason.contains(&(PROTOCOL_VERSION + 1).to_string()),
                    "{reason}"
                );
            }
            other => panic!("expected Refuse, got {other:?}"),
        }
        // And a client of our version, refused by a peer of another version, gets a typed
        // error carrying the reason.
        let other = PROTOCOL_VERSION + 1;
        let mut wire = Vec::new();
        let refuse = Message::Refuse {
            reason: format!("speak {other}"),
        };
        encode_frame_versioned(&refuse, other, &mut wire).unwrap();
        let mut client = Pipe {
            input: wire.into(),
            output: vec![],
        };
        let hello = Hello::new("old", Purpose::Control, CpuFeatures::default(), None);
        match client_handshake(&mut client, &hello) {
            Err(HandshakeError::Version {
                theirs,
                reason: Some(r),
                ..
            }) if theirs == other => assert_eq!(r, format!("speak {other}")),
            other => panic!("expected a Version error, got {other:?}"),
        }
    }

    #[test]
    fn garbage_client_is_refused_with_a_frame() {
        let mut server = Pipe {
            input: b"SSH-2.0-OpenSSH_9.6\r\n".to_vec().into(),
            output: vec![],
        };
        assert!(matches!(
            server_handshake(&mut server, &ident(), ok_token),
            Err(HandshakeError::Frame(FrameError::BadMagic(_)))
        ));
        assert!(matches!(
            decode_frame(&server.output).unwrap().0,
            Message::Refuse { .. }
        ));
    }

    #[test]
    fn client_sees_refusal_as_typed_error() {
        let mut client = Pipe {
            input: encode_frame(&Message::Refuse {
                reason: "CPU mismatch: host CPU lacks avx2".into(),
            })
            .unwrap()
            .into(),
            output: vec![],
        };
        let hello = Hello::new("src", Purpose::Migrate, host(), None);
        match client_handshake(&mut client, &hello) {
            Err(HandshakeError::RefusedByPeer(r)) => assert!(r.contains("avx2")),
            other => panic!("expected RefusedByPeer, got {other:?}"),
        }
    }
}
