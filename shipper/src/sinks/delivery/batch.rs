//! Accumulates records into a payload and seals it into a compressed DATA frame.

use std::io;
use std::rc::Rc;

use crate::protocol::frame::{Header, Kind, FLAG_ZSTD};
use crate::protocol::RecordWriter;

/// Why a batch was sealed: the label `reason` of `shipper_batches_sealed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealReason {
    /// It reached `batch_bytes_max` or `batch_events_max`.
    Full,
    /// Its first record waited `flush_interval_ms`.
    Interval,
    /// Its source had nothing more ready and nothing was in flight (`seal_when_idle`), and
    /// its first record was `idle_seal_delay_ms` old.
    Idle,
    /// The worker was stopping.
    Shutdown,
}

impl SealReason {
    pub const ALL: [SealReason; 4] =
        [SealReason::Full, SealReason::Interval, SealReason::Idle, SealReason::Shutdown];

    pub fn label(self) -> &'static str {
        match self {
            SealReason::Full => "full",
            SealReason::Interval => "interval",
            SealReason::Idle => "idle",
            SealReason::Shutdown => "shutdown",
        }
    }
}

/// A batch turned into a frame, waiting for its sequence number and acknowledgement.
#[derive(Clone, Debug)]
pub struct Sealed {
    /// The complete frame: header and compressed payload.
    pub wire: Vec<u8>,
    pub records: u32,
    pub raw_bytes: u32,
    /// Monotonic ns when the first record of the batch was read.
    pub first_ns: u64,
    /// The same moment as wall-clock µs since the Unix epoch (kept in the disk buffer).
    pub first_unix_us: u64,
    /// Records per service name, for counting drops of the whole frame (a name, not an id:
    /// the id may be forgotten and reused while the frame waits).
    pub services: Box<[(Rc<[u8]>, u32)]>,
    /// Records per source id of this run, for the ledger (empty for a frame read back from
    /// the disk buffer: its records were accounted for when they were written there).
    pub sources: Box<[(u32, u32)]>,
    /// Durable sources in the frame: (source id, the mark of its last record here).
    /// A frame with marks is never dropped: its source pauses instead.
    pub marks: Box<[(usize, String)]>,
    pub seq: u64,
    /// The disk buffer segment it was read back from, if any.
    pub origin: Option<u64>,
}

#[cfg(test)]
impl Sealed {
    /// A frame for tests: `records` records in `bytes` bytes of `fill`, sequence `seq`.
    pub fn for_test(seq: u64, bytes: usize, records: u32, fill: u8) -> Sealed {
        Sealed {
            wire: vec![fill; bytes],
            records,
            raw_bytes: 1,
            first_ns: 0,
            first_unix_us: 0,
            services: Box::default(),
            sources: Box::default(),
            marks: Box::default(),
            seq,
            origin: None,
        }
    }
}

pub struct BatchBuilder {
    payload: Vec<u8>,
    count: u32,
    first_ns: u64,
    services: Vec<(u32, u32)>,
    sources: Vec<(u32, u32)>,
    marks: Vec<(usize, String)>,
    bytes_max: usize,
    events_max: u32,
    compressed: Vec<u8>,
}

impl BatchBuilder {
    pub fn new(bytes_max: usize, events_max: u32) -> BatchBuilder {
        BatchBuilder {
            payload: Vec::with_capacity(bytes_max + 4096),
            count: 0,
            first_ns: 0,
            services: Vec::new(),
            sources: Vec::new(),
            marks: Vec::new(),
            bytes_max,
            events_max,
            compressed: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Monotonic ns of the first record, when not empty.
    pub fn first_ns(&self) -> u64 {
        self.first_ns
    }

    /// Appends a record of `service` from `source`; returns true when the batch is full and
    /// must be sealed.
    #[inline]
    pub fn push(
        &mut self,
        key: &[u8],
        body: &[u8],
        service: u32,
        source: u32,
        now_ns: u64,
    ) -> bool {
        if self.count == 0 {
            self.first_ns = now_ns;
        }
        RecordWriter::push(&mut self.payload, key, body);
        self.count += 1;
        count(&mut self.services, service);
        count(&mut self.sources, source);
        self.payload.len() >= self.bytes_max || self.count >= self.events_max
    }

    /// Records per source id in the open batch.
    pub fn sources(&self) -> &[(u32, u32)] {
        &self.sources
    }

    /// Whether the batch holds records of service id `service`.
    pub fn holds(&self, service: u32) -> bool {
        self.services.iter().any(|&(s, _)| s == service)
    }

    /// Records that the batch now holds `source`'s entries up to `cursor`.
    pub fn mark(&mut self, source: usize, cursor: &[u8]) {
        let cursor = String::from_utf8_lossy(cursor);
        match self.marks.iter_mut().find(|(s, _)| *s == source) {
            Some((_, c)) => {
                c.clear();
                c.push_str(&cursor);
            }
            None => self.marks.push((source, cursor.into_owned())),
        }
    }

    /// Compresses the batch into a frame and empties the builder; `name` gives each service
    /// id's name.
    pub fn seal(
        &mut self,
        zstd: &mut zstd::bulk::Compressor<'static>,
        seq: u64,
        name: impl Fn(u32) -> Rc<[u8]>,
    ) -> io::Result<Sealed> {
        debug_assert!(self.count > 0, "sealing an empty batch");
        let bound = zstd::zstd_safe::compress_bound(self.payload.len());
        self.compressed.clear();
        self.compressed.reserve(bound);
        zstd.compress_to_buffer(&self.payload, &mut self.compressed)?;
        let raw_len = u32::try_from(self.payload.len()).expect("batch_bytes_max < 4 GiB");
        let len = u32::try_from(self.compressed.len()).expect("bounded by compress_bound");
        let header =
            Header { kind: Kind::Data, flags: FLAG_ZSTD, seq, count: self.count, raw_len, len };
        let wire = header.wire(&self.compressed);
        let sealed = Sealed {
            wire,
            records: self.count,
            raw_bytes: raw_len,
            first_ns: self.first_ns,
            first_unix_us: 0,
            services: self.services.drain(..).map(|(id, n)| (name(id), n)).collect(),
            sources: self.sources.drain(..).collect(),
            marks: self.marks.drain(..).collect(),
            seq,
            origin: None,
        };
        self.payload.clear();
        self.count = 0;
        Ok(sealed)
    }
}

/// One more record of `id` in `counts` (a short list: a batch holds few services and
/// sources).
#[inline]
fn count(counts: &mut Vec<(u32, u32)>, id: u32) {
    match counts.iter_mut().find(|(s, _)| *s == id) {
        Some((_, n)) => *n += 1,
        None => counts.push((id, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameDecoder, RecordIter};

    #[test]
    fn seals_a_decodable_frame() {
        let mut b = BatchBuilder::new(1 << 20, 3);
        assert!(!b.push(b"a", b"{\"x\":1}", 1, 0, 5));
        assert!(!b.push(b"b", b"line two", 2, 0, 6));
        assert!(b.push(b"a", b"three", 1, 4, 7));
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        assert!(b.holds(2) && !b.holds(3));
        let s = b.seal(&mut z, 42, |id| Rc::from(format!("s{id}").as_bytes())).unwrap();
        assert!(b.is_empty() && !b.holds(2));
        assert_eq!((s.records, s.first_ns), (3, 5));
        let named = |n: &str, k| (Rc::from(n.as_bytes()), k);
        assert_eq!(*s.services, [named("s1", 2), named("s2", 1)]);
        assert_eq!(*s.sources, [(0, 2), (4, 1)]);
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&s.wire);
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!(f.header.seq, 42);
        let raw = zstd::bulk::decompress(&f.payload, f.header.raw_len as usize).unwrap();
        let recs: Vec<_> = RecordIter::new(&raw, f.header.count).map(Result::unwrap).collect();
        assert_eq!(recs[1], (&b"b"[..], &b"line two"[..]));
    }
}
