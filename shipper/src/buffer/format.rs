//! The bytes of a disk buffer segment: encoding a record, and scanning a segment's bytes back
//! into records, skipping whatever is damaged (see `docs/buffer.md`).
//!
//! # Format
//! ```text
//! Segment { magic: b"SHPBUF01", records: [Record] }
//! Record  { magic: b"SHBR", body_len: u32, meta_len: u32,
//!           crc32c: u32,                   // over the 12 bytes before it, then the body
//!           body: { meta: Meta, frame: [u8] } }   // frame: a DATA frame exactly as sent
//! Meta    { first_unix_us: u64, services: u16,
//!           [ { name_len: u8, name: [u8; name_len], records: u32 } ] }
//! ```
//! Little endian throughout.

use thiserror::Error;

use crate::protocol::frame::{Header, Kind, HEADER_BYTES};
use crate::protocol::limits::FRAME_BYTES_MAX;

pub const SEGMENT_MAGIC: [u8; 8] = *b"SHPBUF01";
pub const RECORD_MAGIC: [u8; 4] = *b"SHBR";
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest meta: the timestamp, the count, and 255-byte names for a frame's services.
const META_BYTES_MAX: u32 = 64 << 10;
/// Largest record body a scan accepts.
pub const BODY_BYTES_MAX: u32 = FRAME_BYTES_MAX + HEADER_BYTES as u32 + META_BYTES_MAX;

/// Appends the record for `frame` (records per service `services`, first read at
/// `first_unix_us`) to `out`.
pub fn encode(frame: &[u8], first_unix_us: u64, services: &[(&[u8], u32)], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[0; 12]);
    out.extend_from_slice(&first_unix_us.to_le_bytes());
    out.extend_from_slice(&(services.len() as u16).to_le_bytes());
    for (name, n) in services {
        let name = &name[..name.len().min(u8::MAX as usize)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&n.to_le_bytes());
    }
    let meta_len = out.len() - start - RECORD_HEADER_BYTES;
    out.extend_from_slice(frame);
    let body_len = out.len() - start - RECORD_HEADER_BYTES;
    out[start + 4..start + 8].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&(meta_len as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[start..start + 12]),
        &out[start + RECORD_HEADER_BYTES..],
    );
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

/// The length of the record [`encode`] makes for a frame of `frame_bytes` whose services' names
/// are `name_bytes` long.
pub fn record_bytes(frame_bytes: usize, name_bytes: impl Iterator<Item = usize>) -> u64 {
    let meta: usize = 8 + 2 + name_bytes.map(|n| 1 + n.min(u8::MAX as usize) + 4).sum::<usize>();
    (RECORD_HEADER_BYTES + meta + frame_bytes) as u64
}

/// One intact record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// The DATA frame, header included.
    pub frame: &'a [u8],
    pub first_unix_us: u64,
    pub services: ServiceCounts<'a>,
    /// Records in the frame (from its header).
    pub records: u32,
}

/// Why bytes at an offset are not a record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Damage {
    #[error("no record magic")]
    Magic,
    #[error("record of {0} bytes runs past the end of the segment (torn write)")]
    Truncated(u64),
    #[error("record length {0} is out of bounds")]
    Length(u32),
    #[error("record checksum mismatch")]
    Checksum,
    #[error("record metadata is malformed")]
    Meta,
    #[error("the record holds no valid DATA frame: {0}")]
    Frame(String),
}

/// What a scan finds next.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    Record(Record<'a>),
    /// `skipped` bytes from `offset` were not a record (the first problem is `damage`); the
    /// scan goes on at the next record magic after `offset`.
    Damaged {
        offset: usize,
        skipped: usize,
        damage: Damage,
    },
}

/// Iterates the records of a segment's bytes (after its magic). Every step moves forward, so
/// a scan ends after at most one step per byte whatever the bytes are.
pub struct Scan<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Scan<'a> {
    pub fn new(data: &'a [u8]) -> Scan<'a> {
        Scan { data, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Scan<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        if self.pos >= self.data.len() {
            return None;
        }
        let at = self.pos;
        match parse(&self.data[at..]) {
            Ok((record, len)) => {
                self.pos += len;
                Some(Item::Record(record))
            }
            Err(damage) => {
                let next = find_magic(&self.data[at + 1..]).map_or(self.data.len(), |i| at + 1 + i);
                self.pos = next;
                Some(Item::Damaged { offset: at, skipped: next - at, damage })
            }
        }
    }
}

/// Records per service name of a segment's records, fed in pieces of any size (a file read
/// in chunks): the counts a [`Scan`] of the whole gives, while holding at most one record and
/// one piece. Used to count an evicted segment that a previous run wrote.
#[derive(Debug, Default)]
pub struct Tally {
    /// Bytes not scanned yet: a record cut by the end of a piece, or the last bytes of damage
    /// where a record magic may begin.
    held: Vec<u8>,
    /// Records per service name, in the order first seen.
    pub counts: Vec<(Vec<u8>, u64)>,
}

impl Tally {
    /// Counts the whole records in what is held plus `bytes`; `end`: nothing follows.
    pub fn feed(&mut self, bytes: &[u8], end: bool) {
        let Tally { held, counts } = self;
        held.extend_from_slice(bytes);
        let mut scan = Scan::new(held);
        let mut consumed = 0;
        while let Some(item) = scan.next() {
            match item {
                Item::Record(r) => {
                    for (name, n) in r.services {
                        match counts.iter_mut().find(|(s, _)| s == name) {
                            Some((_, total)) => *total += u64::from(n),
                            None => counts.push((name.to_vec(), n.into())),
                        }
                    }
                }
                // The record goes on in the next piece.
                Item::Damaged { offset, damage: Damage::Truncated(_), .. } if !end => {
                    consumed = offset;
                    break;
                }
                // No magic after the damage yet: one may start in the last bytes.
                Item::Damaged { offset, skipped, .. } if !end && offset + skipped == held.len() => {
                    consumed = (held.len() + 1).saturating_sub(RECORD_MAGIC.len()).max(offset + 1);
                    break;
                }
                Item::Damaged { .. } => {}
            }
            consumed = scan.offset();
        }
        held.drain(..consumed);
    }

    /// Bytes held for the next piece.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

fn find_magic(data: &[u8]) -> Option<usize> {
    data.windows(RECORD_MAGIC.len()).position(|w| w == RECORD_MAGIC)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// Parses the record at the start of `data`; returns it and its length.
fn parse(data: &[u8]) -> Result<(Record<'_>, usize), Damage> {
    if data.len() < RECORD_HEADER_BYTES {
        let seen = &data[..data.len().min(RECORD_MAGIC.len())];
        let torn = RECORD_MAGIC.starts_with(seen);
        return Err(if torn {
            Damage::Truncated(RECORD_HEADER_BYTES as u64)
        } else {
            Damage::Magic
        });
    }
    if data[..4] != RECORD_MAGIC {
        return Err(Damage::Magic);
    }
    let (body_len, meta_len) = (u32_at(data, 4), u32_at(data, 8));
    if body_len > BODY_BYTES_MAX || meta_len > body_len.min(META_BYTES_MAX) {
        return Err(Damage::Length(body_len));
    }
    let end = RECORD_HEADER_BYTES + body_len as usize;
    if end > data.len() {
        return Err(Damage::Truncated(end as u64));
    }
    let body = &data[RECORD_HEADER_BYTES..end];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&data[..12]), body);
    if crc != u32_at(data, 12) {
        return Err(Damage::Checksum);
    }
    let (meta, frame) = body.split_at(meta_len as usize);
    let (first_unix_us, services) = parse_meta(meta).ok_or(Damage::Meta)?;
    let records = check_frame(frame)?;
    Ok((Record { frame, first_unix_us, services, records }, end))
}

/// Records per service name, as a record's meta lists them.
pub type ServiceCounts<'a> = Vec<(&'a [u8], u32)>;

fn parse_meta(meta: &[u8]) -> Option<(u64, ServiceCounts<'_>)> {
    let first = u64::from_le_bytes(meta.get(..8)?.try_into().ok()?);
    let n = u16::from_le_bytes(meta.get(8..10)?.try_into().ok()?);
    let mut rest = &meta[10..];
    let mut services = Vec::with_capacity(usize::from(n).min(rest.len() / 5));
    for _ in 0..n {
        let (&len, tail) = rest.split_first()?;
        let name = tail.get(..len as usize)?;
        let count = u32::from_le_bytes(tail.get(len as usize..len as usize + 4)?.try_into().ok()?);
        services.push((name, count));
        rest = &tail[len as usize + 4..];
    }
    rest.is_empty().then_some((first, services))
}

/// Checks that `frame` is one whole DATA frame with a valid checksum; returns its records.
fn check_frame(frame: &[u8]) -> Result<u32, Damage> {
    let bad = |why: String| Damage::Frame(why);
    let head: &[u8; HEADER_BYTES] =
        frame.get(..HEADER_BYTES).and_then(|h| h.try_into().ok()).ok_or(bad("too short".into()))?;
    let (header, crc) = Header::decode(head, FRAME_BYTES_MAX).map_err(|e| bad(e.to_string()))?;
    if header.kind != Kind::Data || header.len as usize != frame.len() - HEADER_BYTES {
        return Err(bad(format!("{:?} frame of {} payload bytes", header.kind, header.len)));
    }
    let actual = crc32c::crc32c_append(crc32c::crc32c(&frame[..28]), &frame[HEADER_BYTES..]);
    if actual != crc {
        return Err(bad("frame checksum mismatch".into()));
    }
    Ok(header.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(records: u32, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            kind: Kind::Data,
            flags: 0,
            seq: 1,
            count: records,
            raw_len: payload.len() as u32,
            len: payload.len() as u32,
        };
        h.wire(payload)
    }

    fn segment(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            encode(f, i as u64, &[(b"web", 2), (b"db", i as u32)], &mut out);
        }
        out
    }

    fn records(data: &[u8]) -> (Vec<u64>, Vec<(usize, usize)>) {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for item in Scan::new(data) {
            match item {
                Item::Record(r) => ok.push(r.first_unix_us),
                Item::Damaged { offset, skipped, .. } => bad.push((offset, skipped)),
            }
        }
        (ok, bad)
    }

    #[test]
    fn round_trip() {
        let frames = [frame(3, b"abc"), frame(1, b"")];
        let data = segment(&frames);
        let got: Vec<_> = Scan::new(&data).collect();
        let Item::Record(r) = &got[1] else { panic!("{got:?}") };
        assert_eq!((r.frame, r.records, r.first_unix_us), (&frames[1][..], 1, 1));
        assert_eq!(r.services, vec![(&b"web"[..], 2), (&b"db"[..], 1)]);
        assert_eq!(got.len(), 2);
        let mut one = Vec::new();
        encode(&frames[1], 1, &[(b"web", 2), (b"db", 1)], &mut one);
        assert_eq!(record_bytes(frames[1].len(), [3, 2].into_iter()), one.len() as u64);
    }

    // Guards replay keeping identity: a frame stored with its origin reads back with it, and
    // keeps it when replay gives it the next sequence number of another run.
    #[test]
    fn a_frame_keeps_its_origin_through_a_segment_and_a_restamp() {
        use crate::protocol::Origin;
        let origin = Origin { run_id: 0xfeed, core: 2, seq: 17 };
        let (mut plain, mut kept) = (frame(1, b"a"), frame(1, b"b"));
        origin.stamp(&mut kept);
        let data = segment(&[plain.clone(), kept]);
        let got: Vec<_> = Scan::new(&data).collect();
        let [Item::Record(a), Item::Record(b)] = &got[..] else { panic!("{got:?}") };
        assert_eq!((Origin::of(a.frame), Origin::of(b.frame)), (None, Some(origin)));
        let mut replayed = b.frame.to_vec();
        let flags = u16::from_le_bytes([replayed[6], replayed[7]]);
        Header::restamp(&mut replayed, 3, flags);
        assert_eq!(check_frame(&replayed), Ok(1), "still a whole DATA frame");
        assert_eq!(Origin::of(&replayed), Some(origin));
        // A frame of an earlier version's segment (no origin) is sent as it is.
        Header::restamp(&mut plain, 4, 0);
        assert_eq!(Origin::of(&plain), None);
    }

    // Guards the skip-and-go-on promise: a flipped byte costs exactly the record it is in.
    #[test]
    fn a_flipped_byte_skips_only_its_record() {
        let frames: Vec<_> = (0..4).map(|i| frame(i, &[i as u8; 300])).collect();
        let clean = segment(&frames);
        let second = clean.len() / 4;
        for at in [second + 2, second + 5, second + 13, second + 40, second + 200] {
            let mut data = clean.clone();
            data[at] ^= 0x20;
            let (ok, bad) = records(&data);
            assert_eq!(ok, vec![0, 2, 3], "flip at {at}");
            assert_eq!(bad, vec![(second, second)], "flip at {at}");
        }
    }

    #[test]
    fn a_torn_tail_is_reported_as_truncated() {
        let data = segment(&[frame(1, b"x"), frame(2, b"yy")]);
        for cut in 1..data.len() / 2 {
            let torn = &data[..data.len() - cut];
            let items: Vec<_> = Scan::new(torn).collect();
            assert!(matches!(items[0], Item::Record(_)), "cut {cut}");
            match &items[1..] {
                [Item::Damaged { damage: Damage::Truncated(_) | Damage::Magic, .. }] => {}
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    // Regression: a few bytes of garbage shorter than a magic indexed past their end.
    #[test]
    fn a_few_bytes_of_anything_are_damage_not_a_panic() {
        for tail in [&b"x"[..], b"xy", b"SH", b"xyz", b"SHBR", b"SHBRxxxxxxx"] {
            let items: Vec<_> = Scan::new(tail).collect();
            assert_eq!(items.len(), 1, "{tail:?}");
            assert!(matches!(items[0], Item::Damaged { offset: 0, .. }), "{tail:?}");
        }
    }

    /// Records per service of `data`, by one scan of the whole.
    fn scanned(data: &[u8]) -> Vec<(Vec<u8>, u64)> {
        let mut counts: Vec<(Vec<u8>, u64)> = Vec::new();
        for item in Scan::new(data) {
            let Item::Record(r) = item else { continue };
            for (name, n) in r.services {
                match counts.iter_mut().find(|(s, _)| s == name) {
                    Some((_, total)) => *total += u64::from(n),
                    None => counts.push((name.to_vec(), n.into())),
                }
            }
        }
        counts
    }

    // Guards counting an evicted segment of a previous run chunk by chunk: the counts are those
    // of a scan of the whole segment, whatever the chunk size and the damage, and what is held
    // between chunks stays under one record plus one chunk.
    #[test]
    fn a_tally_fed_in_pieces_counts_what_a_whole_scan_counts() {
        let frames: Vec<_> = (0..6).map(|i| frame(i, &[i as u8; 50])).collect();
        let clean = segment(&frames);
        let record = clean.len() / frames.len();
        let mut flipped = clean.clone();
        flipped[record + record / 2] ^= 1;
        let torn = clean[..clean.len() - 7].to_vec();
        let mut garbage = b"xxSHB".to_vec();
        garbage.extend_from_slice(&clean);
        garbage.extend_from_slice(b"SHB");
        let expected: [(&[u8], u64); 2] = [(b"web", 12), (b"db", 15)];
        assert_eq!(scanned(&clean), expected.map(|(s, n)| (s.to_vec(), n)));
        assert_eq!(scanned(&flipped), [(b"web".to_vec(), 10), (b"db".to_vec(), 14)]);
        for data in [clean, flipped, torn, garbage] {
            let whole = scanned(&data);
            for piece in [1, 2, 3, 4, 5, 17, 100, record, data.len()] {
                let mut t = Tally::default();
                for chunk in data.chunks(piece) {
                    t.feed(chunk, false);
                    assert!(t.held() < record + piece, "held {} of pieces of {piece}", t.held());
                }
                t.feed(&[], true);
                assert_eq!(t.counts, whole, "pieces of {piece}");
                assert_eq!(t.held(), 0, "pieces of {piece}");
            }
        }
    }

    #[test]
    fn garbage_ends_without_a_record_and_without_looping() {
        let mut data = vec![0u8; 10_000];
        data.extend_from_slice(&RECORD_MAGIC);
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        let (ok, bad) = records(&data);
        assert!(ok.is_empty());
        assert_eq!(bad, vec![(0, 10_000), (10_000, 8)]);
    }
}
