//! Length-prefixed frames over any byte stream, and the [`Message`] set they carry.
//!
//! A frame is an 11-byte header followed by a payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `MOSV` |
//! | 4..6 | protocol version, u16 little-endian |
//! | 6 | message kind ([`Kind`]) |
//! | 7..11 | payload length, u32 little-endian, at most [`MAX_PAYLOAD`] |
//!
//! The payload is the bincode 2 encoding (standard configuration, decode limit
//! [`MAX_PAYLOAD`]) of the message's fields; which fields is fixed by the kind. The header layout
//! and the [`Kind::Refuse`] payload (one string) are frozen across protocol versions, so that a
//! peer speaking another version can always read why it was refused.
//!
//! Reading never trusts the peer: a wrong magic, an unknown kind, an oversize length, a payload
//! that does not decode or has trailing bytes are all typed [`FrameError`]s, and the payload
//! buffer grows only as bytes actually arrive.

use std::io::{self, Read, Write};

use bincode::{Decode, Encode};

use crate::handshake::{Hello, Welcome};
use crate::pages::PageBatch;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"MOSV";
/// The protocol version this build speaks. Bump it on any change to a message's layout.
pub const PROTOCOL_VERSION: u16 = 12;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 11;
/// Largest payload accepted or produced (65 MiB).
pub const MAX_PAYLOAD: usize = MAX_DEPUTY_DATA + (1 << 20);
/// Largest data the buffers of one deputy request, or of its reply, carry (64 MiB; the VMM
/// splits longer reads and writes). A payload has room for this and the fields around it.
pub const MAX_DEPUTY_DATA: usize = 64 << 20;

/// The bincode configuration every payload uses.
pub(crate) const fn codec_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_PAYLOAD>,
> {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by peer")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("bad frame magic {0:02x?} (not a mosvm peer)")]
    BadMagic([u8; 4]),
    #[error("peer speaks protocol version {theirs}, this node speaks {ours}{}", refusal_suffix(.refusal))]
    Version {
        ours: u16,
        theirs: u16,
        /// The peer's reason when the foreign-version frame was a refusal.
        refusal: Option<String>,
    },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("malformed {kind:?} payload: {detail}")]
    Malformed { kind: Kind, detail: String },
    #[error("cannot encode {kind:?} message: {detail}")]
    Encode { kind: Kind, detail: String },
}

fn refusal_suffix(r: &Option<String>) -> String {
    match r {
        Some(reason) => format!(" (refused: {reason})"),
        None => String::new(),
    }
}

/// Message kinds as they appear in the header. The values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    /// Frozen: its payload is one string in every protocol version.
    Refuse = 3,
    DeputyRequest = 4,
    DeputyReply = 5,
    MigrateOffer = 6,
    MigrateAccept = 7,
    MigrateRefuse = 8,
    Pages = 9,
    RoundDone = 10,
    State = 11,
    Resumed = 12,
    Abort = 13,
    Signal = 14,
    Exit = 15,
    Ping = 16,
    Pong = 17,
    MigrateTo = 18,
    MigrateBack = 19,
    Moved = 20,
    Cancel = 21,
    Host = 22,
    Hosting = 23,
    Usage = 24,
    Load = 25,
    Say = 26,
    PostcopyState = 27,
    PageRequest = 28,
    PostcopyDone = 29,
}

impl Kind {
    /// The kind for a header byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Welcome,
            3 => Refuse,
            4 => DeputyRequest,
            5 => DeputyReply,
            6 => MigrateOffer,
            7 => MigrateAccept,
            8 => MigrateRefuse,
            9 => Pages,
            10 => RoundDone,
            11 => State,
            12 => Resumed,
            13 => Abort,
            14 => Signal,
            15 => Exit,
            16 => Ping,
            17 => Pong,
            18 => MigrateTo,
            19 => MigrateBack,
            20 => Moved,
            21 => Cancel,
            22 => Host,
            23 => Hosting,
            24 => Usage,
            25 => Load,
            26 => Say,
            27 => PostcopyState,
            28 => PageRequest,
            29 => PostcopyDone,
            _ => return None,
        })
    }
}

/// One memory buffer of a forwarded system call.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Slot {
    /// The argument is not a buffer (or is a null pointer).
    Null,
    /// Input buffer: its bytes travel with the request.
    In(Vec<u8>),
    /// Output buffer of this many bytes: the reply carries what the call wrote.
    Out(u64),
    /// Input and output: bytes travel both ways.
    InOut(Vec<u8>),
    /// Guest memory that could not be read or written: the deputy hands the host call a
    /// pointer that faults, so the kernel answers EFAULT where Linux would (after its
    /// descriptor and flag checks).
    Fault,
}

/// A home-dependent system call forwarded to the deputy: one request, one reply.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeputyRequest {
    /// Sequence number, echoed by the reply; strictly increasing on a channel.
    pub seq: u64,
    /// System call number.
    pub nr: u64,
    /// Raw argument registers.
    pub args: [u64; 6],
    /// One slot per argument that names guest memory (by the syscall table's convention).
    pub slots: Vec<Slot>,
}

impl DeputyRequest {
    /// Total bytes the deputy must allocate for output buffers (`Out` and `InOut`).
    pub fn out_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Out(n) => *n,
                Slot::InOut(b) => b.len() as u64,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Number of output buffers the reply must carry.
    pub fn out_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Out(_) | Slot::InOut(_)))
            .count()
    }
}

/// The deputy's answer to one [`DeputyRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeputyReply {
    /// The request's sequence number.
    pub seq: u64,
    /// The system call's return value (negative errno on failure).
    pub ret: i64,
    /// One buffer per `Out`/`InOut` slot of the request, in slot order, each at most the
    /// requested length (the bytes the call produced).
    pub outs: Vec<Vec<u8>>,
}

/// A guest-physical memory region of the migrating micro-VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct MemRegion {
    pub guest_phys: u64,
    pub len: u64,
}

/// The source's proposal to move one process here.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MigrateOffer {
    /// The process's id on its home node.
    pub pid: u32,
    /// Name of the process's home node (where its deputy lives).
    pub home_node: String,
    /// The program (its path at home), for `ps` on the nodes that host it.
    pub program: String,
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// Pages the first pass will send (touched pages).
    pub touched_pages: u64,
    /// Guest page size (4096).
    pub page_size: u32,
    /// Guest memory layout: every region pages may land in.
    pub regions: Vec<MemRegion>,
    /// The token the guest presents to its deputy, carried so the destination can reconnect.
    pub deputy_token: Option<[u8; 32]>,
}

/// Everything that travels between nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refuse {
        reason: String,
    },
    DeputyRequest(DeputyRequest),
    DeputyReply(DeputyReply),
    MigrateOffer(MigrateOffer),
    /// The destination takes the guest; `postcopy`: it can receive it by post-copy (it has a
    /// userfaultfd), so the source may switch over with [`Message::PostcopyState`].
    MigrateAccept {
        postcopy: bool,
    },
    MigrateRefuse {
        reason: String,
    },
    Pages(PageBatch),
    RoundDone {
        round: u32,
        dirty_pages: u64,
    },
    /// The vCPU and VMM state, encoded by the VMM; opaque here.
    State {
        vcpu_and_vmm: Vec<u8>,
    },
    Resumed,
    Abort {
        reason: String,
    },
    Signal {
        sig: i32,
    },
    Exit {
        status: i32,
    },
    Ping {
        t: u64,
    },
    Pong {
        t: u64,
    },
    /// A post-copy switch-over (`migrate::postcopy`): the vCPU and VMM state, and the guest
    /// pages the source still holds (`outstanding`: runs of consecutive page numbers, each
    /// `(first, count)`). The destination resumes the
    /// guest at once; the outstanding pages follow as `Pages`, pushed in the background and
    /// fetched on demand with [`Message::PageRequest`].
    PostcopyState {
        vcpu_and_vmm: Vec<u8>,
        outstanding: Vec<(u64, u64)>,
    },
    /// Post-copy, destination to source: the guest waits for these outstanding pages (the
    /// faulting one first); send them before anything else.
    PageRequest {
        pages: Vec<u64>,
    },
    /// Post-copy, destination to source: every outstanding page has arrived (`faults`: guest
    /// accesses that waited for one); the source may release its copy.
    PostcopyDone {
        faults: u64,
    },
    /// Home asks the node running its guest to move it on to `node` (a name that node knows).
    MigrateTo {
        node: String,
    },
    /// Home asks for its guest back: the guest's host migrates it over this same link.
    MigrateBack,
    /// The guest's host tells home the guest now runs on `node`, whose guest host waits at
    /// `addr` for home's deputy channel (a [`Hello`] for [`crate::Purpose::Deputy`] bearing
    /// `token`).
    Moved {
        node: String,
        addr: String,
        token: [u8; 32],
    },
    /// The guest must move while deputy request `seq` blocks at home: interrupt it (the reply
    /// then says EINTR and the guest reissues the call after the move).
    Cancel {
        seq: u64,
    },
    /// Node to node, after the handshake: start a guest host for process `pid` of `home_node`
    /// running `program`.
    Host {
        pid: u32,
        home_node: String,
        program: String,
    },
    /// The answer to [`Message::Host`]: the guest host listens on `port` (at the address the
    /// request was sent to) and serves only connections whose Hello bears `token`.
    Hosting {
        port: u16,
        token: [u8; 32],
    },
    /// The guest's host tells home what the guest has used there: its process's CPU time
    /// (ns) and the guest memory in use.
    Usage {
        cpu_ns: u64,
        mem_bytes: u64,
    },
    /// The guest's host passes home a message of its VMM's to the user (one line: a fault
    /// that killed the guest, a call it does not support), for home's stderr.
    Say {
        line: String,
    },
    /// A node's answer to a [`crate::Purpose::Control`] connection: its processors, its load
    /// (runnable processes per processor) and its free memory in bytes.
    Load {
        cpus: u32,
        load: f64,
        free_mem: u64,
    },
}

impl Message {
    /// The header kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Refuse { .. } => Kind::Refuse,
            Message::DeputyRequest(_) => Kind::DeputyRequest,
            Message::DeputyReply(_) => Kind::DeputyReply,
            Message::MigrateOffer(_) => Kind::MigrateOffer,
            Message::MigrateAccept { .. } => Kind::MigrateAccept,
            Message::PostcopyState { .. } => Kind::PostcopyState,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::PostcopyDone { .. } => Kind::PostcopyDone,
            Message::MigrateRefuse { .. } => Kind::MigrateRefuse,
            Message::Pages(_) => Kind::Pages,
            Message::RoundDone { .. } => Kind::RoundDone,
            Message::State { .. } => Kind::State,
            Message::Resumed => Kind::Resumed,
            Message::Abort { .. } => Kind::Abort,
            Message::Signal { .. } => Kind::Signal,
            Message::Exit { .. } => Kind::Exit,
            Message::Ping { .. } => Kind::Ping,
            Message::Pong { .. } => Kind::Pong,
            Message::MigrateTo { .. } => Kind::MigrateTo,
            Message::MigrateBack => Kind::MigrateBack,
            Message::Moved { .. } => Kind::Moved,
            Message::Cancel { .. } => Kind::Cancel,
            Message::Host { .. } => Kind::Host,
            Message::Hosting { .. } => Kind::Hosting,
            Message::Usage { .. } => Kind::Usage,
            Message::Load { .. } => Kind::Load,
            Message::Say { .. } => Kind::Say,
        }
    }
}

fn put<E: Encode>(buf: &mut Vec<u8>, kind: Kind, v: E) -> Result<(), FrameError> {
    bincode::encode_into_std_write(v, buf, codec_config())
        .map(|_| ())
        .map_err(|e| FrameError::Encode {
            kind,
            detail: e.to_string(),
        })
}

fn encode_payload(msg: &Message, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    let k = msg.kind();
    match msg {
        Message::Hello(h) => put(buf, k, h),
        Message::Welcome(w) => put(buf, k, w),
        Message::Refuse { reason }
        | Message::MigrateRefuse { reason }
        | Message::Abort { reason } => put(buf, k, reason),
        Message::DeputyRequest(r) => put(buf, k, r),
        Message::DeputyReply(r) => put(buf, k, r),
        Message::MigrateOffer(o) => put(buf, k, o),
        Message::Resumed | Message::MigrateBack => Ok(()),
        Message::MigrateAccept { postcopy } => put(buf, k, postcopy),
        Message::PostcopyState {
            vcpu_and_vmm,
            outstanding,
        } => put(buf, k, (vcpu_and_vmm, outstanding)),
        Message::PageRequest { pages } => put(buf, k, pages),
        Message::PostcopyDone { faults } => put(buf, k, faults),
        Message::MigrateTo { node } => put(buf, k, node),
        Message::Moved { node, addr, token } => put(buf, k, (node, addr, token)),
        Message::Host {
            pid,
            home_node,
            program,
        } => put(buf, k, (pid, home_node, program)),
        Message::Hosting { port, token } => put(buf, k, (port, token)),
        Message::Usage { cpu_ns, mem_bytes } => put(buf, k, (cpu_ns, mem_bytes)),
        Message::Say { line } => put(buf, k, line),
        Message::Load {
            cpus,
            load,
            free_mem,
        } => put(buf, k, (cpus, load, free_mem)),
        Message::Pages(b) => put(buf, k, b),
        Message::RoundDone { round, dirty_pages } => put(buf, k, (round, dirty_pages)),
        Message::State { vcpu_and_vmm } => put(buf, k, vcpu_and_vmm),
        Message::Signal { sig } => put(buf, k, sig),
        Message::Exit { status } => put(buf, k, status),
        Message::Ping { t } | Message::Pong { t } => put(buf, k, t),
        Message::Cancel { seq } => put(buf, k, seq),
    }
}

fn get<D: Decode<()>>(kind: Kind, payload: &[u8]) -> Result<D, FrameError> {
    let (v, used) = bincode::decode_from_slice::<D, _>(payload, codec_config()).map_err(|e| {
        FrameError::Malformed {
            kind,
            detail: e.to_string(),
        }
    })?;
    if used != payload.len() {
        return Err(FrameError::Malformed {
            kind,
            detail: format!("{} trailing bytes", payload.len() - used),
        });
    }
    Ok(v)
}

/// Decodes a payload of a known kind (the header has been checked).
pub fn decode_payload(kind: Kind, payload: &[u8]) -> Result<Message, FrameError> {
    let k = kind;
    Ok(match kind {
        Kind::Hello => Message::Hello(get(k, payload)?),
        Kind::Welcome => Message::Welcome(get(k, payload)?),
        Kind::Refuse => Message::Refuse {
            reason: get(k, payload)?,
        },
        Kind::DeputyRequest => {
            let r: DeputyRequest = get(k, payload)?;
            if r.out_bytes() > MAX_DEPUTY_DATA as u64 {
                return Err(FrameError::Malformed {
                    kind,
                    detail: format!(
                        "output buffers of {} bytes exceed the maximum of {MAX_DEPUTY_DATA}",
                        r.out_bytes()
                    ),
                });
            }
            Message::DeputyRequest(r)
        }
        Kind::DeputyReply => Message::DeputyReply(get(k, payload)?),
        Kind::MigrateOffer => Message::MigrateOffer(get(k, payload)?),
        Kind::MigrateAccept => Message::MigrateAccept {
            postcopy: get(k, payload)?,
        },
        Kind::PostcopyState => {
            let (vcpu_and_vmm, outstanding) = get(k, payload)?;
            Message::PostcopyState {
                vcpu_and_vmm,
                outstanding,
            }
        }
        Kind::PageRequest => Message::PageRequest {
            pages: get(k, payload)?,
        },
        Kind::PostcopyDone => Message::PostcopyDone {
            faults: get(k, payload)?,
        },
        Kind::MigrateRefuse => Message::MigrateRefuse {
            reason: get(k, payload)?,
        },
        Kind::Pages => Message::Pages(get(k, payload)?),
        Kind::RoundDone => {
            let (round, dirty_pages) = get(k, payload)?;
            Message::RoundDone { round, dirty_pages }
        }
        Kind::State => Message::State {
            vcpu_and_vmm: get(k, payload)?,
        },
        Kind::Resumed => {
            get::<()>(k, payload)?;
            Message::Resumed
        }
        Kind::Abort => Message::Abort {
            reason: get(k, payload)?,
        },
        Kind::Signal => Message::Signal {
            sig: get(k, payload)?,
        },
        Kind::Exit => Message::Exit {
            status: get(k, payload)?,
        },
        Kind::Ping => Message::Ping {
            t: get(k, payload)?,
        },
        Kind::Pong => Message::Pong {
            t: get(k, payload)?,
        },
        Kind::MigrateTo => Message::MigrateTo {
            node: get(k, payload)?,
        },
        Kind::MigrateBack => {
            get::<()>(k, payload)?;
            Message::MigrateBack
        }
        Kind::Moved => {
            let (node, addr, token) = get(k, payload)?;
            Message::Moved { node, addr, token }
        }
        Kind::Host => {
            let (pid, home_node, program) = get(k, payload)?;
            Message::Host {
                pid,
                home_node,
                program,
            }
        }
        Kind::Hosting => {
            let (port, token) = get(k, payload)?;
            Message::Hosting { port, token }
        }
        Kind::Usage => {
            let (cpu_ns, mem_bytes) = get(k, payload)?;
            Message::Usage { cpu_ns, mem_bytes }
        }
        Kind::Say => Message::Say {
            line: get(k, payload)?,
        },
        Kind::Load => {
            let (cpus, load, free_mem) = get(k, payload)?;
            Message::Load {
                cpus,
                load,
                free_mem,
            }
        }
        Kind::Cancel => Message::Cancel {
            seq: get(k, payload)?,
        },
    })
}

/// Appends the whole frame (header and payload) for `msg` to `out`.
pub fn encode_frame_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_frame_versioned(msg, PROTOCOL_VERSION, out)
}

pub(crate) fn encode_frame_versioned(
    msg: &Message,
    version: u16,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.push(msg.kind() as u8);
    out.extend_from_slice(&[0; 4]);
    encode_payload(msg, out).inspect_err(|_| out.truncate(start))?;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_PAYLOAD,
        });
    }
    out[start + 7..start + HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Encodes `msg` as one frame.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut v = Vec::new();
    encode_frame_into(msg, &mut v)?;
    Ok(v)
}

/// Writes `msg` as one frame (a single `write_all`) and flushes.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), FrameError> {
    write_message_with(w, msg, &mut Vec::new())
}

/// Like [`write_message`], encoding into `buf` (cleared first) so a sender streaming many
/// frames reuses one buffer. A [`Message::Pages`] frame's page payload is written straight
/// from the batch rather than copied into `buf` (the bytes on the wire are the same).
pub fn write_message_with<W: Write + ?Sized>(
    w: &mut W,
    msg: &Message,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    buf.clear();
    if let Message::Pages(batch) = msg {
        // bincode encodes a struct as its fields in order and a Vec<u8> as its length then its
        // bytes: encode all but the payload bytes here, and write those bytes from the batch.
        let k = Kind::Pages;
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        buf.push(k as u8);
        buf.extend_from_slice(&[0; 4]);
        put(
            buf,
            k,
            (
                &batch.gpns,
                &batch.zero_map,
                batch.compressed,
                batch.payload.len() as u64,
            ),
        )?;
        let len = buf.len() - HEADER_LEN + batch.payload.len();
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: MAX_PAYLOAD,
            });
        }
        buf[7..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        w.write_all(buf)?;
        w.write_all(&batch.payload)?;
    } else {
        encode_frame_into(msg, buf)?;
        w.write_all(buf)?;
    }
    w.flush()?;
    Ok(())
}

/// A parsed, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    /// The raw kind byte (checked against [`Kind`] only when the version matches).
    pub kind: u8,
    pub len: u32,
}

/// Parses a header: checks the magic and the length bound (not the version).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    let kind = h[6];
    let len = u32::from_le_bytes([h[7], h[8], h[9], h[10]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max: MAX_PAYLOAD,
        });
    }
    Ok(Header { version, kind, len })
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<bool, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(if got == 0 {
                    FrameError::Closed
                } else {
                    FrameError::Truncated
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads one frame and decodes it.
///
/// A frame of another protocol version is read to its end (so the error is clean) and reported
/// as [`FrameError::Version`], carrying the peer's reason if the frame was a refusal.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, FrameError> {
    read_message_with(r, &mut Vec::new())
}

/// Like [`read_message`], reading the payload into `payload` (cleared first) so a receiver of
/// many frames reuses one buffer.
pub fn read_message_with<R: Read + ?Sized>(
    r: &mut R,
    payload: &mut Vec<u8>,
) -> Result<Message, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    if !read_full(r, &mut h)? {
        return Err(FrameError::Closed);
    }
    read_body(r, parse_header(&h)?, payload)
}

/// The rest of a frame whose header has been read.
fn read_body<R: Read + ?Sized>(
    r: &mut R,
    header: Header,
    payload: &mut Vec<u8>,
) -> Result<Message, FrameError> {
    let kind = Kind::from_u8(header.kind);
    if header.version == PROTOCOL_VERSION && kind.is_none() {
        return Err(FrameError::UnknownKind(header.kind));
    }
    let len = header.len as usize;
    // Grow with the data that arrives, never to the size the peer merely claims.
    payload.clear();
    payload.reserve(len.min(1 << 20));
    r.take(len as u64).read_to_end(payload)?;
    if payload.len() != len {
        return Err(FrameError::Truncated);
    }
    if header.version != PROTOCOL_VERSION {
        let refusal = if header.kind == Kind::Refuse as u8 {
            get::<String>(Kind::Refuse, payload).ok()
        } else {
            None
        };
        return Err(FrameError::Version {
            ours: PROTOCOL_VERSION,
            theirs: header.version,
            refusal,
        });
    }
    match kind {
        Some(kind) => decode_payload(kind, payload),
        None => Err(FrameError::UnknownKind(header.kind)),
    }
}

/// Where [`read_message_into`] puts a page batch's pages as they arrive.
pub trait PageSink {
    /// Where page `gpn`'s bytes go; `None` when it lies outside guest memory.
    fn page(&mut self, gpn: u64) -> Option<&mut [u8; crate::pages::PAGE_SIZE]>;
}

/// What [`read_message_into`] read.
#[derive(Debug)]
pub enum Received {
    /// Any message but a page batch.
    Message(Message),
    /// A page batch, whose pages are already in the sink.
    Pages(usize),
}

/// Like [`read_message_with`], except that a page batch's pages are read straight into
/// `sink` (no intermediate buffer for uncompressed pages); zero pages are zeroed there.
pub fn read_message_into<R: Read + ?Sized>(
    r: &mut R,
    sink: &mut dyn PageSink,
    scratch: &mut Vec<u8>,
) -> Result<Received, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    if !read_full(r, &mut h)? {
        return Err(FrameError::Closed);
    }
    let header = parse_header(&h)?;
    if header.version != PROTOCOL_VERSION || header.kind != Kind::Pages as u8 {
        return read_body(r, header, scratch).map(Received::Message);
    }
    let k = Kind::Pages;
    let bad = |detail: String| FrameError::Malformed { kind: k, detail };
    let mut body = r.take(header.len as u64);
    let (gpns, zero_map, compressed, payload_len): (Vec<u64>, Vec<u8>, bool, u64) =
        bincode::decode_from_std_read(&mut body, codec_config()).map_err(|e| bad(e.to_string()))?;
    if payload_len != body.limit() {
        return Err(bad(format!(
            "payload of {payload_len} bytes in a frame that has {} left",
            body.limit()
        )));
    }
    let mut batch = PageBatch {
        gpns,
        zero_map,
        compressed,
        payload: Vec::new(),
    };
    let expected = batch.check_layout().map_err(|e| bad(e.to_string()))?;
    let outside = |gpn: u64| bad(format!("page {gpn:#x} outside guest memory"));
    if compressed {
        body.read_to_end(&mut batch.payload)?;
        let d = batch.decode_with(scratch).map_err(|e| bad(e.to_string()))?;
        for (gpn, page) in d.iter() {
            sink.page(gpn)
                .ok_or_else(|| outside(gpn))?
                .copy_from_slice(page);
        }
        return Ok(Received::Pages(batch.gpns.len()));
    }
    if payload_len != expected as u64 {
        return Err(bad(format!(
            "payload of {payload_len} bytes for {expected} bytes of pages"
        )));
    }
    for (i, &gpn) in batch.gpns.iter().enumerate() {
        let dst = sink.page(gpn).ok_or_else(|| outside(gpn))?;
        if batch.is_zero(i) {
            dst.fill(0);
        } else if !read_full(&mut body, dst)? {
            return Err(FrameError::Truncated);
        }
    }
    Ok(Received::Pages(batch.gpns.len()))
}

/// Decodes one frame from the front of `bytes`; returns the message and the bytes consumed.
pub fn decode_frame(bytes: &[u8]) -> Result<(Message, usize), FrameError> {
    let mut cur = bytes;
    let msg = read_message(&mut cur)?;
    Ok((msg, bytes.len() - cur.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{CpuFeatures, CpuidLeaf, Purpose};
    use crate::pages::PageBatchBuilder;

    struct MapSink(std::collections::BTreeMap<u64, [u8; 4096]>, u64);

    impl PageSink for MapSink {
        fn page(&mut self, gpn: u64) -> Option<&mut [u8; 4096]> {
            (gpn < self.1).then(|| self.0.entry(gpn).or_insert([0xee; 4096]))
        }
    }

    /// Pages read straight into a sink equal the batch decoded the ordinary way, compressed
    /// or not; zero pages overwrite what was there; a page outside memory is refused; other
    /// messages pass through unchanged.
    #[test]
    fn page_batches_read_straight_into_the_sink() {
        for compression in [
            crate::pages::Compression::Never,
            crate::pages::Compression::Auto,
        ] {
            let mut b = PageBatchBuilder::with_compression(compression);
            for gpn in 0..40u64 {
                let mut page = [0u8; 4096];
                if gpn % 3 != 0 {
                    page[(gpn * 97 % 4096) as usize] = gpn as u8 + 1;
                    page[4095] = 7;
                }
                b.push(gpn * 2, &page).unwrap();
            }
            let batch = b.finish();
            let mut wire = Vec::new();
            write_message(&mut wire, &Message::Pages(batch.clone())).unwrap();
            write_message(&mut wire, &Message::Resumed).unwrap();
            let mut sink = MapSink(Default::default(), 1000);
            let mut r = &wire[..];
            let mut scratch = Vec::new();
            let got = read_message_into(&mut r, &mut sink, &mut scratch).unwrap();
            assert!(matches!(got, Received::Pages(40)));
            let want = batch.decode().unwrap();
            assert_eq!(sink.0.len(), 40);
            for (gpn, page) in want.iter() {
                assert_eq!(&sink.0[&gpn], page, "page {gpn}");
            }
            assert!(matches!(
                read_message_into(&mut r, &mut sink, &mut scratch).unwrap(),
                Received::Message(Message::Resumed)
            ));
            let mut small = MapSink(Default::default(), 10);
            let mut r = &wire[..];
            assert!(read_message_into(&mut r, &mut small, &mut scratch).is_err());
        }
    }

    fn samples() -> Vec<Message> {
        let mut b = PageBatchBuilder::new();
        let mut page = [0u8; 4096];
        page[17] = 9;
        b.push(5, &page).unwrap();
        b.push(6, &[0; 4096]).unwrap();
        vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                node_name: "n1".into(),
                purpose: Purpose::Deputy,
                cpu_features: CpuFeatures {
                    leaves: vec![CpuidLeaf {
                        leaf: 7,
                        subleaf: 0,
                        eax: 0,
                        ebx: 1 << 5,
                        ecx: 0,
                        edx: 0,
                    }],
                    xcr0: 7,
                },
                token: Some([3; 32]),
            }),
            Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                node_name: "n2".into(),
            }),
            Message::Refuse {
                reason: "no".into(),
            },
            Message::DeputyRequest(DeputyRequest {
                seq: 9,
                nr: 1,
                args: [1, 2, 3, 4, 5, u64::MAX],
                slots: vec![
                    Slot::Null,
                    Slot::In(b"hello".to_vec()),
                    Slot::Out(64),
                    Slot::InOut(vec![1, 2]),
                    Slot::Fault,
                ],
            }),
            Message::DeputyReply(DeputyReply {
                seq: 9,
                ret: -14,
                outs: vec![vec![7; 10], vec![]],
            }),
            Message::MigrateOffer(MigrateOffer {
                pid: 42,
                home_node: "home".into(),
                program: "p".into(),
                mem_bytes: 1 << 30,
                touched_pages: 1000,
                page_size: 4096,
                regions: vec![MemRegion {
                    guest_phys: 0,
                    len: 1 << 30,
                }],
                deputy_token: None,
            }),
            Message::MigrateAccept { postcopy: true },
            Message::PostcopyState {
                vcpu_and_vmm: vec![4, 5],
                outstanding: vec![(1, 1), (300, 4), (1 << 40, 1)],
            },
            Message::PageRequest {
                pages: vec![7, 8, 9],
            },
            Message::PostcopyDone { faults: 12 },
            Message::MigrateRefuse {
                reason: "full".into(),
            },
            Message::Pages(b.finish()),
            Message::RoundDone {
                round: 3,
                dirty_pages: 77,
            },
            Message::State {
                vcpu_and_vmm: vec![1, 2, 3],
            },
            Message::Resumed,
            Message::Abort {
                reason: "gone".into(),
            },
            Message::Signal { sig: 15 },
            Message::Exit { status: -1 },
            Message::Ping { t: 123 },
            Message::Pong { t: u64::MAX },
            Message::MigrateTo { node: "b".into() },
            Message::MigrateBack,
            Message::Moved {
                node: "c".into(),
                addr: "10.0.0.3:4000".into(),
                token: [7; 32],
            },
            Message::Host {
                pid: 42,
                home_node: "h".into(),
                program: "/bin/true".into(),
            },
            Message::Hosting {
                port: 4001,
                token: [9; 32],
            },
            Message::Usage {
                cpu_ns: 5_000_000_000,
                mem_bytes: 1 << 30,
            },
            Message::Say {
                line: "mosvm: prog killed by SIGSEGV".into(),
            },
            Message::Load {
                cpus: 2,
                load: 0.75,
                free_mem: 3 << 30,
            },
            Message::Cancel { seq: 9 },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_stream() {
        let msgs = samples();
        let mut wire = Vec::new();
        for m in &msgs {
            write_message(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &msgs {
            let got = read_message(&mut r).unwrap();
            assert_eq!(&got, m);
        }
        assert!(matches!(read_message(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn reused_buffers_give_the_same_messages() {
        let msgs = samples();
        let mut wire = Vec::new();
        let mut wbuf = vec![0xee; 3];
        for m in &msgs {
            write_message_with(&mut wire, m, &mut wbuf).unwrap();
        }
        let mut r = &wire[..];
        let mut rbuf = vec![0xee; 100];
        for m in &msgs {
            assert_eq!(&read_message_with(&mut r, &mut rbuf).unwrap(), m);
        }
        assert!(r.is_empty());
        // The page payload written separately gives exactly the bytes of the one-piece encoding.
        let expected: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
        assert_eq!(wire, expected);
    }

    /// A deputy request or reply whose buffers carry the most data the VMM puts in one fits a
    /// frame, with the fields around it.
    #[test]
    fn the_largest_deputy_messages_fit_a_frame() {
        let reply = Message::DeputyReply(DeputyReply {
            seq: u64::MAX,
            ret: i64::MIN,
            outs: vec![vec![0xa5; MAX_DEPUTY_DATA]],
        });
        let request = Message::DeputyRequest(DeputyRequest {
            seq: u64::MAX,
            nr: 1,
            args: [u64::MAX; 6],
            slots: vec![
                Slot::In(vec![0x5a; MAX_DEPUTY_DATA]),
                Slot::Out(u64::MAX >> 40),
            ],
        });
        for m in [reply, request] {
            let mut wire = Vec::new();
            write_message(&mut wire, &m).unwrap();
            assert_eq!(read_message(&mut &wire[..]).unwrap(), m);
        }
    }

    #[test]
    fn kinds_are_distinct_and_parse_back() {
        let msgs = samples();
        let mut seen = std::collections::HashSet::new();
        for m in &msgs {
            let k = m.kind();
            assert!(seen.insert(k as u8), "duplicate kind {k:?}");
            assert_eq!(Kind::from_u8(k as u8), Some(k));
        }
        assert_eq!(seen.len(), 29);
        assert_eq!(Kind::from_u8(0), None);
        assert_eq!(Kind::from_u8(200), None);
    }

    #[test]
    fn header_layout_is_fixed() {
        let f = encode_frame(&Message::Ping { t: 5 }).unwrap();
        assert_eq!(&f[0..4], b"MOSV");
        assert_eq!(u16::from_le_bytes([f[4], f[5]]), PROTOCOL_VERSION);
        assert_eq!(f[6], Kind::Ping as u8);
        let len = u32::from_le_bytes([f[7], f[8], f[9], f[10]]) as usize;
        assert_eq!(len, f.len() - HEADER_LEN);
        let (m, used) = decode_frame(&f).unwrap();
        assert_eq!(m, Message::Ping { t: 5 });
        assert_eq!(used, f.len());
    }

    #[test]
    fn wrong_magic_is_a_typed_error() {
        let mut f = encode_frame(&Message::Resumed).unwrap();
        f[0] = b'X';
        assert!(matches!(
            decode_frame(&f),
            Err(FrameError::BadMagic(m)) if &m == b"XOSV"
        ));
        // An HTTP request is not a frame either.
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1\r\n\r\n"),
            Err(FrameError::BadMagic(_))
        ));
    }

    #[test]
    fn oversize_length_is_refused_without_reading_the_payload() {
        let mut f = encode_frame(&Message::Resumed).unwrap();
        f[7..11].copy_from_slice(&u32::MAX.to_le_bytes());
        match decode_frame(&f) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as u64);
                assert_eq!(max, MAX_PAYLOAD);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn other_version_is_a_typed_error_and_carries_a_refusal() {
        let mut f = Vec::new();
        encode_frame_versioned(&Message::Ping { t: 1 }, PROTOCOL_VERSION + 1, &mut f).unwrap();
        match decode_frame(&f) {
            Err(FrameError::Version {
                ours,
                theirs,
                refusal: None,
            }) => {
                assert_eq!(ours, PROTOCOL_VERSION);
                assert_eq!(theirs, PROTOCOL_VERSION + 1);
            }
            other => panic!("expected Version, got {other:?}"),
        }
        let mut f = Vec::new();
        let other = PROTOCOL_VERSION + 1;
        let refuse = Message::Refuse {
            reason: format!("speak v{other}"),
        };
        encode_frame_versioned(&refuse, other, &mut f).unwrap();
        match decode_frame(&f) {
            Err(FrameError::Version {
                theirs,
                refusal: Some(r),
                ..
            }) if theirs == other => assert_eq!(r, format!("speak v{other}")),
            other => panic!("expected Version with refusal, got {other:?}"),
        }
    }

    #[test]
    fn unknown_kind_and_trailing_bytes_are_rejected() {
        let mut f = encode_frame(&Message::Resumed).unwrap();
        f[6] = 99;
        assert!(matches!(decode_frame(&f), Err(FrameError::UnknownKind(99))));

        // A Ping frame with an extra byte in its payload.
        let mut f = encode_frame(&Message::Ping { t: 1 }).unwrap();
        f.push(0);
        let len = (f.len() - HEADER_LEN) as u32;
        f[7..11].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_frame(&f),
            Err(FrameError::Malformed {
                kind: Kind::Ping,
                ..
            })
        ));
    }

    #[test]
    fn truncated_frames_are_errors_not_hangs() {
        let f = encode_frame(&Message::State {
            vcpu_and_vmm: vec![5; 1000],
        })
        .unwrap();
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 10, f.len() - 1] {
            assert!(
                matches!(decode_frame(&f[..cut]), Err(FrameError::Truncated)),
                "cut at {cut}"
            );
        }
        assert!(matches!(decode_frame(&[]), Err(FrameError::Closed)));
    }

    #[test]
    fn a_payload_claiming_a_huge_vector_fails_cleanly() {
        // State payload whose bincode length prefix claims 2^60 bytes.
        let mut payload = Vec::new();
        bincode::encode_into_std_write(1u64 << 60, &mut payload, codec_config()).unwrap();
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        f.push(Kind::State as u8);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&payload);
        assert!(matches!(
            decode_frame(&f),
            Err(FrameError::Malformed {
                kind: Kind::State,
                ..
            })
        ));
    }

    #[test]
    fn deputy_request_with_huge_output_buffers_is_rejected() {
        let req = Message::DeputyRequest(DeputyRequest {
            seq: 1,
            nr: 0,
            args: [0; 6],
            slots: vec![Slot::Out(u64::MAX / 2), Slot::Out(u64::MAX / 2)],
        });
        let f = encode_frame(&req).unwrap();
        assert!(matches!(
            decode_frame(&f),
            Err(FrameError::Malformed {
                kind: Kind::DeputyRequest,
                ..
            })
        ));
    }

    #[test]
    fn random_garbage_never_panics() {
        // Deterministic xorshift garbage, with a valid header prefix half of the time.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..2000 {
            let n = (next() % 200) as usize;
            let mut buf: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            if i % 2 == 0 && buf.len() >= HEADER_LEN {
                buf[0..4].copy_from_slice(&MAGIC);
                buf[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                buf[6] = (next() % 18) as u8;
                let len = (buf.len() - HEADER_LEN) as u32;
                buf[7..11].copy_from_slice(&len.to_le_bytes());
            }
            let res = decode_frame(&buf);
            if i % 2 == 1 {
                // Without the magic nothing may decode.
                assert!(res.is_err(), "garbage decoded: {res:?}");
            }
        }
    }
}
