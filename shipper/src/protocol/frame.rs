//! Frame header encoding, incremental decoding and validation.

use std::fmt;

use thiserror::Error;

use super::limits::FRAME_BYTES_MAX;

pub const MAGIC: [u8; 4] = *b"SHPR";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 32;
/// Flag: the payload is one zstd frame.
pub const FLAG_ZSTD: u16 = 1 << 0;
/// Flag: the frame went to a dead-letter destination because no primary or standby receiver
/// was healthy; the receiver keeps its records apart so they can be re-mirrored.
pub const FLAG_DEAD_LETTER: u16 = 1 << 1;
/// Flag: the payload opens with the frame's [`Origin`] ([`ORIGIN_BYTES`]), then its records
/// (compressed when [`FLAG_ZSTD`]): the frame was stamped before, by this run of the shipper
/// or an earlier one, and the receiver de-duplicates it under that identity.
pub const FLAG_ORIGIN: u16 = 1 << 2;
/// Bytes of an encoded [`Origin`].
pub const ORIGIN_BYTES: usize = 18;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Shipper → receiver, first frame of a connection: identity.
    Hello = 1,
    /// Receiver → shipper: the HELLO is accepted.
    Welcome = 2,
    /// Shipper → receiver: a batch of records.
    Data = 3,
    /// Receiver → shipper: the DATA frame `seq` is written.
    Ack = 4,
    /// Either way, when idle; the receiver echoes it.
    Heartbeat = 5,
    /// Either way: a fatal protocol error, UTF-8 text payload; the sender closes after it.
    /// From a receiver it also means "cannot write now" (disk full, output down): the shipper
    /// backs off and resends.
    Error = 6,
    /// Receiver → shipper: the DATA frame `seq` will never be written (its content is invalid
    /// or cannot be written anywhere); UTF-8 reason as payload. The connection stays open.
    Reject = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Data,
            4 => Kind::Ack,
            5 => Kind::Heartbeat,
            6 => Kind::Error,
            7 => Kind::Reject,
            _ => return None,
        })
    }
}

/// The fixed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    /// DATA: the frame's sequence number in its (run, core) stream; ACK/HEARTBEAT: echoed.
    pub seq: u64,
    /// DATA: number of records.
    pub count: u32,
    /// Payload length after decompression (equal to `len` when not compressed).
    pub raw_len: u32,
    /// Payload length on the wire.
    pub len: u32,
}

/// Why bytes from a peer are not a valid frame. All of these close the connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?} (not a shipper peer)")]
    Magic([u8; 4]),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("frame checksum mismatch (header says {expected:08x}, computed {actual:08x})")]
    Checksum { expected: u32, actual: u32 },
}

impl Header {
    /// Encodes the header for `payload` into `out` (appending 32 bytes).
    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(self.len as usize, payload.len(), "header len must match payload");
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 28]), payload);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// The whole frame on the wire: this header (for `payload`) followed by `payload`.
    pub fn wire(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
        self.encode(payload, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// Rewrites the sequence number and flags of the complete frame `wire` in place, and its
    /// checksum to match.
    pub fn restamp(wire: &mut [u8], seq: u64, flags: u16) {
        assert!(wire.len() >= HEADER_BYTES, "restamping a truncated frame");
        wire[6..8].copy_from_slice(&flags.to_le_bytes());
        wire[8..16].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&wire[..28]), &wire[HEADER_BYTES..]);
        wire[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses a header; `max` is the largest payload the caller accepts.
    pub fn decode(b: &[u8; HEADER_BYTES], max: u32) -> Result<(Header, u32), FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        if b[4] != VERSION {
            return Err(FrameError::Version(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(FrameError::Kind(b[5]))?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let header = Header {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            count: u32_at(16),
            raw_len: u32_at(20),
            len: u32_at(24),
        };
        let max = max.min(FRAME_BYTES_MAX);
        if header.len > max {
            return Err(FrameError::TooLarge { len: header.len.into(), max });
        }
        Ok((header, u32_at(28)))
    }
}

/// The identity a DATA frame was first stamped with: its sender stream (the HELLO's run id
/// and core) and its sequence number there. It travels with the frame through the shipper's
/// disk buffer, so that a frame a receiver wrote but had not acknowledged is recognised when
/// it is sent again by a later run.
///
/// ```text
/// Origin { run_id: u64, core: u16, seq: u64 }   // little endian, 18 bytes
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub run_id: u64,
    pub core: u16,
    pub seq: u64,
}

impl Origin {
    pub fn encode(&self) -> [u8; ORIGIN_BYTES] {
        let mut out = [0; ORIGIN_BYTES];
        out[..8].copy_from_slice(&self.run_id.to_le_bytes());
        out[8..10].copy_from_slice(&self.core.to_le_bytes());
        out[10..].copy_from_slice(&self.seq.to_le_bytes());
        out
    }

    /// The origin a DATA frame's payload opens with when its header has [`FLAG_ORIGIN`], and
    /// the rest of the payload; `None` when the payload is shorter than an origin.
    pub fn split(payload: &[u8]) -> Option<(Origin, &[u8])> {
        let (b, rest) = payload.split_first_chunk::<ORIGIN_BYTES>()?;
        let origin = Origin {
            run_id: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            core: u16::from_le_bytes([b[8], b[9]]),
            seq: u64::from_le_bytes(b[10..].try_into().expect("8 bytes")),
        };
        Some((origin, rest))
    }

    /// The origin carried by the complete DATA frame `wire`, if it has one.
    pub fn of(wire: &[u8]) -> Option<Origin> {
        let flags = u16::from_le_bytes([*wire.get(6)?, *wire.get(7)?]);
        if flags & FLAG_ORIGIN == 0 {
            return None;
        }
        Origin::split(wire.get(HEADER_BYTES..)?).map(|(o, _)| o)
    }

    /// Gives the complete DATA frame `wire` this origin: [`FLAG_ORIGIN`] set, the origin
    /// inserted before the payload, `len` and the checksum to match. A frame that has an
    /// origin already keeps it (its first identity).
    pub fn stamp(self, wire: &mut Vec<u8>) {
        assert!(wire.len() >= HEADER_BYTES, "stamping a truncated frame");
        if Origin::of(wire).is_some() {
            return;
        }
        let flags = u16::from_le_bytes([wire[6], wire[7]]) | FLAG_ORIGIN;
        let len = u32::from_le_bytes(wire[24..28].try_into().expect("4 bytes"));
        let len = len + ORIGIN_BYTES as u32;
        wire[24..28].copy_from_slice(&len.to_le_bytes());
        wire.splice(HEADER_BYTES..HEADER_BYTES, self.encode());
        let seq = u64::from_le_bytes(wire[8..16].try_into().expect("8 bytes"));
        Header::restamp(wire, seq, flags);
    }
}

/// One decoded frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("header", &self.header)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Frame {
    /// Builds a control frame (no records) with `payload`.
    pub fn control(kind: Kind, seq: u64, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("control payloads are small");
        Header { kind, flags: 0, seq, count: 0, raw_len: len, len }.wire(payload)
    }
}

/// Capacity a [`FrameDecoder`] keeps once a larger frame is out: what a read and a small frame
/// need, not what the largest frame seen needed.
pub const DECODER_KEEP_BYTES: usize = 128 << 10;

/// Splits a byte stream into frames, checking each header and checksum.
///
/// Bytes are pushed in as they arrive; the decoder never holds more than one frame plus one
/// push's worth of bytes. Its buffer grows to the frame in progress at once, as soon as the
/// header says its size (not by doubling, which could leave twice that allocated), and gives
/// back what is over [`DECODER_KEEP_BYTES`] once that frame is out.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max: u32,
}

impl FrameDecoder {
    /// `max` is the largest payload accepted.
    pub fn new(max: u32) -> FrameDecoder {
        FrameDecoder { buf: Vec::new(), start: 0, max }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.fit();
        }
        let needed = self.buf.len() + bytes.len();
        if needed > self.buf.capacity() {
            let frame_end = self.start + self.frame_bytes().unwrap_or(0);
            self.buf.reserve_exact(needed.max(frame_end) - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes the decoder has allocated.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The payload length of the frame in progress, once its header is in and until the whole
    /// frame is: what the caller may want room for before it reads the rest.
    pub fn payload_awaited(&self) -> Option<u32> {
        let total = self.frame_bytes()?;
        (self.buffered() < total).then(|| (total - HEADER_BYTES) as u32)
    }

    /// Header and payload bytes of the next frame, once its (valid) header is in.
    fn frame_bytes(&self) -> Option<usize> {
        let head = self.buf.get(self.start..self.start + HEADER_BYTES)?;
        let (header, _) = Header::decode(head.try_into().expect("32 bytes"), self.max).ok()?;
        Some(HEADER_BYTES + header.len as usize)
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.start..];
        // Refuse a stranger (HTTP, TLS to the wrong port...) as soon as its first bytes arrive.
        if avail.len() >= 4 && avail[..4] != MAGIC {
            return Err(FrameError::Magic(avail[..4].try_into().expect("4 bytes")));
        }
        if avail.len() < HEADER_BYTES {
            self.compact();
            return Ok(None);
        }
        let head: &[u8; HEADER_BYTES] = avail[..HEADER_BYTES].try_into().expect("32 bytes");
        let (header, crc) = Header::decode(head, self.max)?;
        let total = HEADER_BYTES + header.len as usize;
        if avail.len() < total {
            self.compact();
            return Ok(None);
        }
        let payload = &avail[HEADER_BYTES..total];
        let actual = crc32c::crc32c_append(crc32c::crc32c(&avail[..28]), payload);
        if actual != crc {
            return Err(FrameError::Checksum { expected: crc, actual });
        }
        let frame = Frame { header, payload: payload.to_vec() };
        self.start += total;
        Ok(Some(frame))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
            self.fit();
        }
    }

    /// Gives back capacity over [`DECODER_KEEP_BYTES`] that neither the bytes held nor the
    /// frame in progress need (called with `start == 0`).
    fn fit(&mut self) {
        let need = self.buf.len().max(self.frame_bytes().unwrap_or(0)).max(DECODER_KEEP_BYTES);
        if self.buf.capacity() > need {
            self.buf.shrink_to(need);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_frame(seq: u64, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        Header { kind: Kind::Data, flags: 0, seq, count: 1, raw_len: len, len }.wire(payload)
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = data_frame(7, b"hello");
        wire.extend(Frame::control(Kind::Ack, 7, b""));
        let mut dec = FrameDecoder::new(1024);
        let mut frames = Vec::new();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].header.seq, 7);
        assert_eq!(frames[0].payload, b"hello");
        assert_eq!(frames[1].header.kind, Kind::Ack);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn an_origin_is_stamped_once_and_read_back() {
        let mut wire = data_frame(7, b"records");
        assert_eq!(Origin::of(&wire), None);
        let first = Origin { run_id: 0x0102_0304_0506_0708, core: 3, seq: 7 };
        first.stamp(&mut wire);
        // A second stamp (a later spill of the same frame) keeps the first identity.
        Origin { run_id: 9, core: 0, seq: 1 }.stamp(&mut wire);
        assert_eq!(Origin::of(&wire), Some(first));
        let flags = u16::from_le_bytes([wire[6], wire[7]]);
        Header::restamp(&mut wire, 42, flags);
        let mut dec = FrameDecoder::new(1024);
        dec.push(&wire);
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!((f.header.seq, f.header.flags), (42, FLAG_ORIGIN));
        assert_eq!(f.header.len as usize, ORIGIN_BYTES + 7);
        assert_eq!(f.header.raw_len, 7, "raw_len is the records' length alone");
        assert_eq!(Origin::split(&f.payload), Some((first, &b"records"[..])));
        assert_eq!(Origin::split(&f.payload[..ORIGIN_BYTES - 1]), None);
        assert_eq!(Origin::of(&wire[..HEADER_BYTES + 3]), None, "too short for an origin");
    }

    #[test]
    fn rejects_corruption_and_oversize() {
        let mut wire = data_frame(1, b"payload");
        wire[HEADER_BYTES + 2] ^= 0x40;
        let mut dec = FrameDecoder::new(1024);
        dec.push(&wire);
        assert!(matches!(dec.next_frame(), Err(FrameError::Checksum { .. })));

        let mut dec = FrameDecoder::new(4);
        dec.push(&data_frame(1, b"payload"));
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge { len: 7, max: 4 }));

        let mut dec = FrameDecoder::new(1024);
        dec.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n....");
        assert!(matches!(dec.next_frame(), Err(FrameError::Magic(_))));
    }

    /// A DATA frame of `len` payload bytes (not a valid checksum's worth of anything else).
    fn frame_of(len: usize) -> Vec<u8> {
        data_frame(1, &vec![b'x'; len])
    }

    #[test]
    fn the_payload_awaited_is_known_from_the_header_on() {
        let wire = frame_of(1000);
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&wire[..HEADER_BYTES - 1]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.payload_awaited(), None, "no header yet");
        dec.push(&wire[HEADER_BYTES - 1..HEADER_BYTES + 10]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.payload_awaited(), Some(1000));
        dec.push(&wire[HEADER_BYTES + 10..]);
        assert_eq!(dec.payload_awaited(), None, "the whole frame is in");
        assert_eq!(dec.next_frame().unwrap().unwrap().payload.len(), 1000);
        assert_eq!(dec.payload_awaited(), None);
    }

    #[test]
    fn a_large_frame_is_held_once_and_its_capacity_given_back() {
        let big = frame_of(2 << 20);
        let small = frame_of(100);
        let mut dec = FrameDecoder::new(4 << 20);
        // Read 16 KiB at a time, as a socket would hand it out.
        let mut pushes = big.chunks(16 << 10);
        dec.push(pushes.next().unwrap());
        assert_eq!(dec.next_frame(), Ok(None));
        for chunk in pushes {
            dec.push(chunk);
            // Grown to the frame at once: never by doubling past it.
            assert_eq!(dec.capacity(), big.len(), "after {} bytes", dec.buffered());
        }
        dec.push(&small);
        let mut frames = Vec::new();
        while let Some(f) = dec.next_frame().unwrap() {
            frames.push(f.payload.len());
        }
        assert_eq!(frames, [2 << 20, 100]);
        assert!(dec.capacity() <= DECODER_KEEP_BYTES, "{} kept", dec.capacity());
        // The next frame starts in a buffer of the kept size.
        dec.push(&small);
        assert_eq!(dec.next_frame().unwrap().unwrap().payload.len(), 100);
        assert!(dec.capacity() <= DECODER_KEEP_BYTES);
    }
}
