//! Wire formats and protocols between mosvm nodes: framing, the versioned handshake, the
//! pre-copy engine over dirty bitmaps, vCPU/VMM state encoding and remote deputy calls.
//!
//! Nothing lives here yet: the single-node micro-VM (`vmm`) comes first; the cluster issue
//! fills this crate in.
