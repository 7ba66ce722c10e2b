//! One forward-protocol message, complete: its mode, tag, option and entries, each entry
//! rendered as one JSON record. See the module docs of `forward` for the format.

use std::io::Read;

use thiserror::Error;

use super::msgpack::{json_string, Item, Malformed, Reader};

/// Longest chunk id accepted (Fluentd's are 24 bytes: base64 of 16).
pub const CHUNK_BYTES_MAX: usize = 128;

/// The four ways entries travel (the `mode` label of the metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Message,
    Forward,
    PackedForward,
    CompressedPackedForward,
}

impl Mode {
    pub const ALL: [Mode; 4] =
        [Mode::Message, Mode::Forward, Mode::PackedForward, Mode::CompressedPackedForward];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Message => "message",
            Mode::Forward => "forward",
            Mode::PackedForward => "packed_forward",
            Mode::CompressedPackedForward => "compressed_packed_forward",
        }
    }
}

/// A message the source refuses: its connection is closed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Refused {
    #[error("malformed: {0}")]
    Malformed(#[from] Malformed),
    #[error("not a forward message: {0}")]
    Shape(&'static str),
    #[error("{0} over its limit")]
    Cut(Cut),
}

/// Limits a message passed (the `reason` label of `shipper_forward_messages_cut_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Longer than `message_bytes_max`.
    Message,
    /// More than `entries_max` entries.
    Entries,
    /// Entries that decompress past `decompressed_bytes_max`.
    Decompressed,
    /// A record whose JSON passes `record_bytes_max`.
    Record,
}

impl Cut {
    pub const ALL: [Cut; 4] = [Cut::Message, Cut::Entries, Cut::Decompressed, Cut::Record];

    pub fn label(self) -> &'static str {
        match self {
            Cut::Message => "message",
            Cut::Entries => "entries",
            Cut::Decompressed => "decompressed",
            Cut::Record => "record",
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Bounds on what one message may make the source do.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub entries_max: usize,
    pub decompressed_bytes_max: usize,
    pub record_bytes_max: usize,
}

/// Where a message's entries are.
#[derive(Clone, Copy, Debug)]
enum Entries<'a> {
    /// Message mode: one time and record, at the reader's position.
    One(Reader<'a>),
    /// Forward mode: `n` `[time, record]` arrays at the reader's position.
    Array(Reader<'a>, u32),
    /// PackedForward: concatenated `[time, record]` arrays (compressed or not).
    Packed(&'a [u8]),
}

/// A message whose shape was read: what the connection needs before the entries.
#[derive(Debug)]
pub struct Message<'a> {
    pub mode: Mode,
    pub tag: &'a [u8],
    /// The `chunk` option: the client wants `{"ack": chunk}` once the records are safe.
    pub chunk: Option<&'a [u8]>,
    entries: Entries<'a>,
}

/// Reads a complete message's shape: `[tag, time, record, option?]`,
/// `[tag, [[time, record], ...], option?]` or `[tag, packed entries, option?]`.
pub fn parse(bytes: &[u8]) -> Result<Message<'_>, Refused> {
    let mut r = Reader::new(bytes);
    let Item::Array(len @ 2..=4) = r.read()? else {
        return Err(Refused::Shape("not an array of 2 to 4 items"));
    };
    let tag = match r.read()? {
        Item::Str(t) | Item::Bin(t) => t,
        _ => return Err(Refused::Shape("the tag is not a string")),
    };
    let second = r;
    let (mode, entries, rest) = match r.read()? {
        Item::Array(n) if len <= 3 => (Mode::Forward, Entries::Array(r, n), len - 2),
        Item::Str(p) | Item::Bin(p) if len <= 3 => {
            (Mode::PackedForward, Entries::Packed(p), len - 2)
        }
        Item::Uint(_) | Item::Int(_) | Item::Float(_) | Item::Ext(..) if len >= 3 => {
            (Mode::Message, Entries::One(second), len - 3)
        }
        _ => {
            return Err(Refused::Shape("the second item is not a time, entries or packed entries"))
        }
    };
    r = second;
    r.skip(1)?;
    if mode == Mode::Message {
        r.skip(1)?;
    }
    let option = if rest == 1 { options(&mut r)? } else { Options::default() };
    if !r.is_empty() {
        return Err(Refused::Shape("bytes after the message"));
    }
    let mode = match (mode, option.gzip) {
        (Mode::PackedForward, true) => Mode::CompressedPackedForward,
        (_, true) => return Err(Refused::Shape("compressed is only for packed entries")),
        (m, false) => m,
    };
    Ok(Message { mode, tag, chunk: option.chunk, entries })
}

#[derive(Default)]
struct Options<'a> {
    chunk: Option<&'a [u8]>,
    gzip: bool,
}

/// Reads the option map: `chunk`, `compressed` ("gzip" or "text"); `size` and unknown keys
/// are skipped; nil is no option.
fn options<'a>(r: &mut Reader<'a>) -> Result<Options<'a>, Refused> {
    let mut o = Options::default();
    let n = match r.read()? {
        Item::Map(n) => n,
        Item::Nil => return Ok(o),
        _ => return Err(Refused::Shape("the option is not a map")),
    };
    for _ in 0..n {
        let key = match r.read()? {
            Item::Str(k) | Item::Bin(k) => k,
            _ => return Err(Refused::Shape("an option key is not a string")),
        };
        match (key, r.read()?) {
            (b"chunk", Item::Str(c) | Item::Bin(c)) if c.len() <= CHUNK_BYTES_MAX => {
                o.chunk = Some(c)
            }
            (b"chunk", _) => return Err(Refused::Shape("chunk is not a string of 1 to 128 bytes")),
            (b"compressed", Item::Str(b"gzip")) => o.gzip = true,
            (b"compressed", Item::Str(b"text")) => {}
            (b"compressed", _) => return Err(Refused::Shape("compressed is not gzip or text")),
            (_, Item::Array(k)) => skip_items(r, u64::from(k))?,
            (_, Item::Map(k)) => skip_items(r, 2 * u64::from(k))?,
            _ => {}
        }
    }
    Ok(o)
}

fn skip_items(r: &mut Reader<'_>, n: u64) -> Result<(), Malformed> {
    for _ in 0..n {
        r.skip(2)?;
    }
    Ok(())
}

/// Decompresses gzip `data` (one or more members) into `out`, at most `max` bytes.
fn gunzip(data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), Refused> {
    out.clear();
    let mut d = flate2::read::MultiGzDecoder::new(data).take(max as u64 + 1);
    match d.read_to_end(out) {
        Ok(n) if n > max => Err(Refused::Cut(Cut::Decompressed)),
        Ok(_) => Ok(()),
        Err(_) => Err(Refused::Shape("entries are not valid gzip")),
    }
}

impl Message<'_> {
    /// Checks every entry (decompressing packed entries into `scratch`): a message is
    /// handed over whole or refused whole. Returns how many records it holds. `now` gives
    /// the wall clock (seconds, nanoseconds) for a time of 0 (Fluentd's "now").
    pub fn check(
        &self,
        limits: &Limits,
        scratch: &mut Scratch,
        now: impl Fn() -> (u64, u32),
    ) -> Result<usize, Refused> {
        if let Entries::Packed(p) = self.entries {
            if self.mode == Mode::CompressedPackedForward {
                gunzip(p, limits.decompressed_bytes_max, &mut scratch.inflated)?;
            }
        }
        self.walk(limits, scratch, &now, &mut |_| {})
    }

    /// Renders every entry of a message [`Message::check`] passed with the same `scratch`,
    /// calling `each(record)` for each, in order.
    pub fn hand(
        &self,
        limits: &Limits,
        scratch: &mut Scratch,
        now: impl Fn() -> (u64, u32),
        mut each: impl FnMut(&[u8]),
    ) -> Result<usize, Refused> {
        self.walk(limits, scratch, &now, &mut each)
    }

    fn walk(
        &self,
        limits: &Limits,
        scratch: &mut Scratch,
        now: &dyn Fn() -> (u64, u32),
        each: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, Refused> {
        let Scratch { json, inflated } = scratch;
        let packed = match self.entries {
            Entries::Packed(_) if self.mode == Mode::CompressedPackedForward => Some(&inflated[..]),
            Entries::Packed(p) => Some(p),
            _ => None,
        };
        let mut one = |r: &mut Reader<'_>, pair: bool| -> Result<(), Refused> {
            json.clear();
            if pair {
                let Item::Array(2) = r.read()? else {
                    return Err(Refused::Shape("an entry is not [time, record]"));
                };
            }
            entry(r, json, limits.record_bytes_max, now)?;
            each(json);
            Ok(())
        };
        match (self.entries, packed) {
            (Entries::One(mut r), _) => one(&mut r, false).map(|()| 1),
            (Entries::Array(mut r, n), _) => {
                if n as usize > limits.entries_max {
                    return Err(Refused::Cut(Cut::Entries));
                }
                for _ in 0..n {
                    one(&mut r, true)?;
                }
                Ok(n as usize)
            }
            (Entries::Packed(_), Some(bytes)) => {
                let mut r = Reader::new(bytes);
                let mut n = 0;
                while !r.is_empty() {
                    if n == limits.entries_max {
                        return Err(Refused::Cut(Cut::Entries));
                    }
                    one(&mut r, true)?;
                    n += 1;
                }
                Ok(n)
            }
            (Entries::Packed(_), None) => unreachable!("packed entries are passed in"),
        }
    }
}

/// Buffers a connection reuses from message to message.
#[derive(Default)]
pub struct Scratch {
    pub json: Vec<u8>,
    pub inflated: Vec<u8>,
}

impl Scratch {
    /// Gives back memory a large message left (kept up to `keep` bytes each).
    pub fn shrink(&mut self, keep: usize) {
        for b in [&mut self.json, &mut self.inflated] {
            if b.capacity() > keep {
                *b = Vec::new();
            }
        }
    }
}

/// Reads `time, record` from `r` and writes the record as JSON into `json`, with the time
/// added as `"time"` when the record has no such key.
fn entry(
    r: &mut Reader<'_>,
    json: &mut Vec<u8>,
    max: usize,
    now: &dyn Fn() -> (u64, u32),
) -> Result<(), Refused> {
    let (secs, nanos) = match time(r)? {
        Some((0, _)) | None => {
            let (s, n) = now();
            (s, Some(n))
        }
        Some(t) => t,
    };
    let Item::Map(n) = r.read()? else {
        return Err(Refused::Shape("a record is not a map"));
    };
    json.push(b'{');
    let mut has_time = false;
    for i in 0..n {
        if i > 0 {
            json.push(b',');
        }
        let key_at = json.len();
        r.json_key(json)?;
        has_time |= &json[key_at..] == b"\"time\":";
        if !r.json(1, json, max)? {
            return Err(Refused::Cut(Cut::Record));
        }
    }
    if !has_time {
        if n > 0 {
            json.push(b',');
        }
        json.extend_from_slice(b"\"time\":\"");
        rfc3339(secs, nanos, json);
        json.push(b'"');
    }
    json.push(b'}');
    if json.len() > max {
        return Err(Refused::Cut(Cut::Record));
    }
    Ok(())
}

/// An entry's time: integer seconds, a float, an EventTime, or `[time, metadata]` (Fluent
/// Bit's event format 2); `None` for nil.
fn time(r: &mut Reader<'_>) -> Result<Option<(u64, Option<u32>)>, Refused> {
    match r.read()? {
        Item::Array(2) => {
            let t = scalar_time(r.read()?)?;
            r.skip(2)?;
            Ok(t)
        }
        item => scalar_time(item),
    }
}

fn scalar_time(item: Item<'_>) -> Result<Option<(u64, Option<u32>)>, Refused> {
    let bad = Refused::Shape("a time is not a non-negative integer, float or EventTime");
    Ok(Some(match item {
        Item::Nil => return Ok(None),
        Item::Uint(s) => (s, None),
        Item::Float(f) if (0.0..1e12).contains(&f) => {
            let nanos = ((f.fract() * 1e9) as u32).min(999_999_999);
            (f.trunc() as u64, Some(nanos))
        }
        Item::Ext(kind, data) => match event_time(kind, data) {
            Some((s, n)) => (s, Some(n)),
            None => return Err(bad),
        },
        _ => return Err(bad),
    }))
}

/// An EventTime (ext type 0: seconds and nanoseconds, 32-bit big-endian each).
pub fn event_time(kind: i8, data: &[u8]) -> Option<(u64, u32)> {
    let d: [u8; 8] = data.try_into().ok().filter(|_| kind == 0)?;
    let secs = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let nanos = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    (nanos < 1_000_000_000).then_some((u64::from(secs), nanos))
}

/// Writes `secs` (Unix seconds, UTC) as RFC 3339: `2024-01-15T10:00:00Z`, with 9 fraction
/// digits when `nanos` is given.
pub fn rfc3339(secs: u64, nanos: Option<u32>, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil(days as i64);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    let _ = write!(out, "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
    if let Some(n) = nanos {
        let _ = write!(out, ".{n:09}");
    }
    out.push(b'Z');
}

/// The proleptic Gregorian date of day `z` since 1970-01-01 (counted in 400-year eras of
/// 146097 days, from a year starting in March so that the leap day comes last).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `{"ack": chunk}`, the answer to a message with the `chunk` option.
pub fn ack(chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len() + 8);
    rmp::encode::write_map_len(&mut out, 1).expect("a Vec grows");
    rmp::encode::write_str(&mut out, "ack").expect("a Vec grows");
    write_str_bytes(&mut out, chunk);
    out
}

/// Writes `s` as a msgpack str (bytes as they came: a chunk id is echoed exactly).
pub fn write_str_bytes(out: &mut Vec<u8>, s: &[u8]) {
    rmp::encode::write_str_len(out, s.len() as u32).expect("a Vec grows");
    out.extend_from_slice(s);
}

/// The tag as JSON, for logs.
pub fn tag_text(tag: &[u8]) -> String {
    let mut out = Vec::new();
    json_string(&tag[..tag.len().min(64)], &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use rmp::encode::*;

    use super::*;

    const LIMITS: Limits =
        Limits { entries_max: 100, decompressed_bytes_max: 1 << 20, record_bytes_max: 4096 };

    fn record(out: &mut Vec<u8>, i: u32) {
        write_map_len(out, 1).unwrap();
        write_str(out, "i").unwrap();
        write_uint(out, i.into()).unwrap();
    }

    fn event_time_bytes(out: &mut Vec<u8>, secs: u32, nanos: u32) {
        write_ext_meta(out, 8, 0).unwrap();
        out.extend_from_slice(&secs.to_be_bytes());
        out.extend_from_slice(&nanos.to_be_bytes());
    }

    fn entries(n: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            write_array_len(&mut out, 2).unwrap();
            event_time_bytes(&mut out, 1_700_000_000, i);
            record(&mut out, i);
        }
        out
    }

    fn run(bytes: &[u8], limits: &Limits) -> Result<(Mode, Vec<String>), Refused> {
        let m = parse(bytes)?;
        let mut got = Vec::new();
        let now = || (1_700_000_001, 7);
        let mut scratch = Scratch::default();
        let n = m.check(limits, &mut scratch, now)?;
        m.hand(limits, &mut scratch, now, |r| got.push(String::from_utf8(r.to_vec()).unwrap()))?;
        assert_eq!(n, got.len());
        Ok((m.mode, got))
    }

    fn with_option(out: &mut Vec<u8>, chunk: &str, gzip: bool) {
        write_map_len(out, 1 + u32::from(gzip)).unwrap();
        write_str(out, "chunk").unwrap();
        write_str(out, chunk).unwrap();
        if gzip {
            write_str(out, "compressed").unwrap();
            write_str(out, "gzip").unwrap();
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn each_mode_gives_its_records_with_their_time() {
        let mut m = Vec::new();
        write_array_len(&mut m, 3).unwrap();
        write_str(&mut m, "app.web").unwrap();
        write_uint(&mut m, 1_700_000_000).unwrap();
        record(&mut m, 9);
        let (mode, got) = run(&m, &LIMITS).unwrap();
        assert_eq!(mode, Mode::Message);
        assert_eq!(got, [r#"{"i":9,"time":"2023-11-14T22:13:20Z"}"#]);

        let mut f = Vec::new();
        write_array_len(&mut f, 3).unwrap();
        write_str(&mut f, "t").unwrap();
        write_array_len(&mut f, 2).unwrap();
        f.extend_from_slice(&entries(2));
        with_option(&mut f, "c1", false);
        let parsed = parse(&f).unwrap();
        assert_eq!((parsed.tag, parsed.chunk), (&b"t"[..], Some(&b"c1"[..])));
        let (mode, got) = run(&f, &LIMITS).unwrap();
        assert_eq!(mode, Mode::Forward);
        assert_eq!(got[1], r#"{"i":1,"time":"2023-11-14T22:13:20.000000001Z"}"#);

        for gz in [false, true] {
            let mut p = Vec::new();
            write_array_len(&mut p, 3).unwrap();
            write_str(&mut p, "t").unwrap();
            let packed = if gz { gzip(&entries(3)) } else { entries(3) };
            write_bin(&mut p, &packed).unwrap();
            with_option(&mut p, "c2", gz);
            let (mode, got) = run(&p, &LIMITS).unwrap();
            let want = if gz { Mode::CompressedPackedForward } else { Mode::PackedForward };
            assert_eq!((mode, got.len()), (want, 3));
            assert_eq!(got[2], r#"{"i":2,"time":"2023-11-14T22:13:20.000000002Z"}"#);
        }
    }

    #[test]
    fn a_record_keeps_its_own_time_and_zero_means_now() {
        let mut m = Vec::new();
        write_array_len(&mut m, 3).unwrap();
        write_str(&mut m, "t").unwrap();
        write_uint(&mut m, 0).unwrap();
        write_map_len(&mut m, 0).unwrap();
        assert_eq!(run(&m, &LIMITS).unwrap().1, [r#"{"time":"2023-11-14T22:13:21.000000007Z"}"#]);
        let mut m = Vec::new();
        write_array_len(&mut m, 3).unwrap();
        write_str(&mut m, "t").unwrap();
        write_uint(&mut m, 5).unwrap();
        write_map_len(&mut m, 1).unwrap();
        write_str(&mut m, "time").unwrap();
        write_str(&mut m, "mine").unwrap();
        assert_eq!(run(&m, &LIMITS).unwrap().1, [r#"{"time":"mine"}"#]);
    }

    #[test]
    fn limits_refuse_the_whole_message() {
        let packed = |n: u32, gz: bool| {
            let mut p = Vec::new();
            write_array_len(&mut p, 2 + u32::from(gz)).unwrap();
            write_str(&mut p, "t").unwrap();
            let e = entries(n);
            write_bin(&mut p, &if gz { gzip(&e) } else { e }).unwrap();
            if gz {
                with_option(&mut p, "c", true);
            }
            p
        };
        let few = Limits { entries_max: 2, ..LIMITS };
        assert_eq!(run(&packed(3, false), &few), Err(Refused::Cut(Cut::Entries)));
        assert!(run(&packed(2, false), &few).is_ok());
        // A gzip bomb: 64 MiB of zeros in about 64 KiB, stopped at the limit.
        let mut bomb = Vec::new();
        write_array_len(&mut bomb, 3).unwrap();
        write_str(&mut bomb, "t").unwrap();
        write_bin(&mut bomb, &gzip(&vec![0u8; 64 << 20])).unwrap();
        with_option(&mut bomb, "c", true);
        assert!(bomb.len() < 128 << 10, "{}", bomb.len());
        assert_eq!(run(&bomb, &LIMITS), Err(Refused::Cut(Cut::Decompressed)));
        let small = Limits { record_bytes_max: 20, ..LIMITS };
        assert_eq!(run(&packed(1, false), &small), Err(Refused::Cut(Cut::Record)));
    }

    #[test]
    fn hostile_messages_are_refused() {
        let refused = |bytes: &[u8]| run(bytes, &LIMITS).unwrap_err();
        assert!(matches!(refused(&[0x93, 0xa1, b't']), Refused::Malformed(Malformed::Truncated)));
        assert!(matches!(refused(&[0x91, 0xa1, b't']), Refused::Shape(_)));
        assert!(matches!(refused(&[0x92, 0x01, 0x90]), Refused::Shape(_)));
        // Packed entries that stop half-way, and entries that are not pairs.
        let mut p = Vec::new();
        write_array_len(&mut p, 2).unwrap();
        write_str(&mut p, "t").unwrap();
        let e = entries(2);
        write_bin(&mut p, &e[..e.len() - 1]).unwrap();
        assert!(matches!(refused(&p), Refused::Malformed(Malformed::Truncated)));
        let mut p = Vec::new();
        write_array_len(&mut p, 2).unwrap();
        write_str(&mut p, "t").unwrap();
        write_bin(&mut p, &[0x91, 0x01]).unwrap();
        assert!(matches!(refused(&p), Refused::Shape(_)));
        // Not gzip, and a chunk id that is too long.
        let mut p = Vec::new();
        write_array_len(&mut p, 3).unwrap();
        write_str(&mut p, "t").unwrap();
        write_bin(&mut p, b"not gzip").unwrap();
        with_option(&mut p, "c", true);
        assert!(matches!(refused(&p), Refused::Shape(_)));
        let mut p = Vec::new();
        write_array_len(&mut p, 3).unwrap();
        write_str(&mut p, "t").unwrap();
        write_array_len(&mut p, 0).unwrap();
        with_option(&mut p, &"x".repeat(CHUNK_BYTES_MAX + 1), false);
        assert!(matches!(refused(&p), Refused::Shape(_)));
    }

    #[test]
    fn dates_are_civil_utc() {
        let text = |secs, nanos| {
            let mut out = Vec::new();
            rfc3339(secs, nanos, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(0, None), "1970-01-01T00:00:00Z");
        assert_eq!(text(951_782_400, Some(5)), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(text(4_107_542_399, None), "2100-02-28T23:59:59Z");
        assert_eq!(text(1_735_689_600, None), "2025-01-01T00:00:00Z");
    }
}
