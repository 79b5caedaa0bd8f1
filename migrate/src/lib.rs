//! Wire formats and protocols between mosvm nodes: framing, the versioned handshake, mutual
//! TLS with the cluster key, guest-page batches, and the pre-copy planner that drives a live
//! migration over dirty bitmaps. It depends on no other mosvm crate: the vCPU and VMM state
//! travel as opaque bytes the `vmm` crate encodes itself, and dirty bitmaps stay with the VMM
//! (the planner only sees counts and measured times).
//!
//! # Modules
//!
//! - [`frame`]: 11-byte header (magic, protocol version, kind, length ≤ 64 MiB) + bincode 2
//!   payload; the [`frame::Message`] set; sync read/write over any `Read + Write`.
//! - [`handshake`]: `Hello` → `Welcome` | `Refuse`: protocol version, purpose, CPU features
//!   ([`handshake::cpu_compatible`]), deputy token. Pure decision + thin stream drivers.
//! - [`tls`]: `keygen`, [`tls::ClusterTls`], [`tls::connect`] / [`tls::accept`]: TLS 1.3 with a
//!   client certificate required on both ends, chaining to the cluster certificate.
//! - [`pages`]: [`pages::PageBatch`] (≤ 256 pages, zero pages as bits, lz4 when it pays).
//! - [`precopy`]: [`precopy::Planner`], the sans-IO round/throttle/switch-over decisions.
//! - [`postcopy`]: [`postcopy::Pusher`] and [`postcopy::Arrivals`], the sans-IO bookkeeping of
//!   pages that cross after the guest resumed (the source's push order, the destination's
//!   faults); not used by the migration yet.
//!
//! Every connection is `tls::connect`/`tls::accept` then the handshake; a peer without the
//! cluster key never reaches the handshake, a peer of another protocol version gets a
//! `Refuse` naming both versions (the header and `Refuse` layouts are frozen), and the caller
//! gets a typed error to log.
//!
//! # One migration (source → destination, `Purpose::Migrate`)
//!
//! ```text
//! src: Hello{Migrate, cpu features}      dst: Welcome | Refuse{reason}
//! src: MigrateOffer{pid, memory layout…} dst: MigrateAccept{postcopy} | MigrateRefuse{reason}
//! src: Pages* RoundDone{1, dirty}        first pass: touched pages, zero pages as bits
//! src: Pages* RoundDone{n, dirty}        pre-copy rounds while the planner says NextRound or
//!                                        Throttle (KVM dirty log OR the VMM's write bitmap)
//! src: (pause) Pages* State{vcpu_and_vmm} on SwitchOver: last dirty pages, then the state
//! dst: Resumed                           the guest runs at the destination; only now does the
//!                                        source release its copy
//! either side: Abort{reason}             at any point; the source then resumes locally
//! ```
//!
//! A post-copy switch-over (when the destination said `postcopy`) replaces the last two lines:
//!
//! ```text
//! src: (pause) Pages* PostcopyState{vcpu_and_vmm, outstanding}
//!                                        the pages the guest wrote last, then the state and
//!                                        the pages still to come
//! dst: PageRequest{pages}*  src: Pages*  the guest runs at the destination (before Resumed
//!                                        too: restoring it may touch memory); its faults on
//!                                        outstanding pages ask for them; the source pushes
//!                                        the rest in page order, each page once
//! dst: Resumed ... PostcopyDone{faults}  every outstanding page arrived; the source lets go.
//!                                        A link lost before this loses the process.
//! ```
//!
//! # The deputy channel (remote VMM → home node, `Purpose::Deputy`, with the process's token)
//!
//! Strictly one `DeputyRequest{seq, nr, args, slots}` then one `DeputyReply{seq, ret, outs}`
//! per forwarded system call, in order: the request carries every input buffer, the reply
//! every output buffer (one per `Out`/`InOut` slot). `Signal`, `Exit` and `Ping`/`Pong` are
//! control messages the node service sends on its own connections.
//!
//! After a first move the link between home and the guest's host carries, besides the deputy
//! channel: `Signal` (home → guest), `Exit` (guest → home), `MigrateTo{node}` (home asks the
//! host to move the guest on), `Moved{node}` (the host reports where it went), `MigrateBack`
//! (home asks for the guest back: the host migrates it over this same link, deputy calls
//! continuing in between the pages), and `Abort{reason}` (a move the host tried failed).

pub mod frame;
pub mod handshake;
pub mod pages;
pub mod postcopy;
pub mod precopy;
pub mod tls;

pub use frame::{read_message, write_message, FrameError, Message, PROTOCOL_VERSION};
pub use handshake::{cpu_compatible, HandshakeError, Hello, Purpose, Welcome};
pub use pages::{PageBatch, PageBatchBuilder, PAGE_SIZE};
pub use precopy::{Decision, Planner, RoundStats};
pub use tls::{accept, connect, keygen, ClusterTls, TlsError};
