//! The wire protocol between `shipper run` and `shipper receive` (specified in
//! `docs/protocol.md`).
//!
//! # Design constraints
//! - Every message is one frame: a fixed 32-byte header and a payload of at most
//!   [`limits::FRAME_BYTES_MAX`]; the receiver enforces its own, smaller, configured bound.
//! - A DATA payload is one zstd frame whose decompressed size is declared in the header and is
//!   checked before decompression, so a hostile peer cannot make either side allocate unboundedly.
//!
//! # Format
//! ```text
//! Header { magic: b"SHPR", version: u8 = 1, kind: u8, flags: u16,
//!          seq: u64, count: u32, raw_len: u32, len: u32, crc32c: u32 }   // little endian
//! Record { len: u32, key_len: u8, key: [u8; key_len], body: [u8; len] }  // DATA, decompressed
//! Origin { run_id: u64, core: u16, seq: u64 }   // opens a DATA payload with FLAG_ORIGIN
//! ```
//!
//! # Operation
//! The shipper opens with HELLO (its name, run id and core), the receiver answers WELCOME or
//! ERROR. The shipper then streams DATA frames with increasing `seq`; the receiver answers each
//! with an ACK carrying the same `seq` once the records are written (and fsync'd). HEARTBEATs
//! flow when there is nothing else to send and are echoed, so silence means a dead peer.
//! A frame sent again from the shipper's disk buffer carries the identity it was first
//! stamped with ([`Origin`]), under which the receiver de-duplicates it.

pub mod frame;
pub mod hello;
pub mod records;

pub use frame::{Frame, FrameDecoder, FrameError, Header, Kind, Origin};
pub use hello::Hello;
pub use records::{RecordError, RecordIter, RecordWriter};

/// Protocol limits shared by both sides.
pub mod limits {
    /// Largest payload any frame may carry on the wire (the receiver's `frame_bytes_max` can
    /// only lower it).
    pub const FRAME_BYTES_MAX: u32 = 64 << 20;
    /// Longest stream key (cfjs1 `format` or service) a record may carry.
    pub const KEY_BYTES_MAX: usize = u8::MAX as usize;
    /// Most frames a shipper core keeps sent and unacknowledged (`inflight_frames_max` upper
    /// bound), and the most written sequence numbers above a gap a receiver remembers per
    /// stream for de-duplication (gaps are normal when frames go to several receivers).
    pub const INFLIGHT_FRAMES_LIMIT: usize = 4096;
    /// Longest shipper name in HELLO.
    pub const NAME_BYTES_MAX: usize = 255;
}
