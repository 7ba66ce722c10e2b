//! Reading MessagePack from untrusted bytes, bounded: one value at a time from a slice
//! ([`Reader`]), where a TCP stream's message ends ([`Scanner`], resumable), and a value as
//! JSON ([`Reader::json`]).
//!
//! # Design constraints
//! - Nothing is allocated from what the bytes announce: an array of 2^32 items costs nothing
//!   until its items arrive, and every item is at least one byte, so a message's size bounds
//!   its work. Nesting is bounded by [`DEPTH_MAX`] (the scanner keeps an explicit stack; the
//!   JSON writer recurses at most that deep).
//! - The scanner is resumable: a message arriving in many reads is scanned once, not once
//!   per read, so a slow sender costs linear time.
//!
//! # Format
//! MessagePack (msgpack.org spec): a marker byte, then big-endian lengths and payloads. The
//! markers themselves are `rmp::Marker`.
//!
//! # Operation
//! JSON rendering: nil `null`, booleans, integers, floats (NaN and infinities `null`), str and
//! bin as strings (invalid UTF-8 replaced by U+FFFD), arrays, maps (a key that is not a string
//! written as the JSON text of its value, in quotes; a container as a key is refused), an
//! EventTime ext as its RFC 3339 text, any other ext `null`.

use rmp::Marker;
use thiserror::Error;

/// Deepest nesting of arrays and maps read.
pub const DEPTH_MAX: usize = 32;

/// Why bytes are not the MessagePack expected.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("truncated value")]
    Truncated,
    #[error("reserved marker 0xc1")]
    Reserved,
    #[error("nested deeper than {DEPTH_MAX}")]
    TooDeep,
    #[error("an array or map as a map key")]
    ContainerKey,
}

/// One value's head: scalars whole, containers by their length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Item<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
    Ext(i8, &'a [u8]),
}

/// What a value's head needs: its size, or that more bytes are needed.
enum Head {
    /// The head (and a scalar's payload) is `len` bytes.
    Whole(usize),
    /// At least this many bytes are needed from the head's start.
    Need(usize),
}

/// Payload length of marker `m` whose length field is `width` bytes at `buf[1..]`.
fn length(buf: &[u8], width: usize) -> Option<usize> {
    let field = buf.get(1..1 + width)?;
    Some(field.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)))
}

/// The size of the head starting `buf` (a scalar with its payload; a container's marker and
/// length only), or how much is needed.
fn head(buf: &[u8]) -> Result<Head, Malformed> {
    let Some(&first) = buf.first() else { return Ok(Head::Need(1)) };
    // (header bytes, payload bytes or the width of a length field giving them)
    let fixed = |n: usize| Ok(Head::Whole(n));
    let sized = |width: usize, extra: usize| match length(buf, width) {
        Some(len) => Ok(Head::Whole(1 + width + extra + len)),
        None => Ok(Head::Need(1 + width)),
    };
    let head = match Marker::from_u8(first) {
        Marker::Reserved => return Err(Malformed::Reserved),
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
            fixed(1)
        }
        Marker::FixMap(_) | Marker::FixArray(_) => fixed(1),
        Marker::FixStr(n) => fixed(1 + usize::from(n)),
        Marker::U8 | Marker::I8 => fixed(2),
        Marker::U16 | Marker::I16 | Marker::Array16 | Marker::Map16 => fixed(3),
        Marker::U32 | Marker::I32 | Marker::F32 | Marker::Array32 | Marker::Map32 => fixed(5),
        Marker::U64 | Marker::I64 | Marker::F64 => fixed(9),
        Marker::Str8 | Marker::Bin8 => sized(1, 0),
        Marker::Str16 | Marker::Bin16 => sized(2, 0),
        Marker::Str32 | Marker::Bin32 => sized(4, 0),
        Marker::FixExt1 => fixed(3),
        Marker::FixExt2 => fixed(4),
        Marker::FixExt4 => fixed(6),
        Marker::FixExt8 => fixed(10),
        Marker::FixExt16 => fixed(18),
        Marker::Ext8 => sized(1, 1),
        Marker::Ext16 => sized(2, 1),
        Marker::Ext32 => sized(4, 1),
    }?;
    Ok(match head {
        Head::Whole(n) if n > buf.len() => Head::Need(n),
        h => h,
    })
}

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Decodes the head `h` (complete: `head` said so) of `n` bytes.
fn item(h: &[u8]) -> Item<'_> {
    let m = Marker::from_u8(h[0]);
    let tail = |width: usize| &h[1 + width..];
    match m {
        Marker::FixPos(v) => Item::Uint(v.into()),
        Marker::FixNeg(v) => Item::Int(v.into()),
        Marker::Null => Item::Nil,
        Marker::True => Item::Bool(true),
        Marker::False => Item::Bool(false),
        Marker::FixMap(n) => Item::Map(n.into()),
        Marker::FixArray(n) => Item::Array(n.into()),
        Marker::FixStr(_) => Item::Str(&h[1..]),
        Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => Item::Uint(be(&h[1..])),
        Marker::I8 => Item::Int(i64::from(h[1] as i8)),
        Marker::I16 => Item::Int(i64::from(i16::from_be_bytes([h[1], h[2]]))),
        Marker::I32 => Item::Int(i64::from(be(&h[1..]) as u32 as i32)),
        Marker::I64 => Item::Int(be(&h[1..]) as i64),
        Marker::F32 => Item::Float(f64::from(f32::from_bits(be(&h[1..]) as u32))),
        Marker::F64 => Item::Float(f64::from_bits(be(&h[1..]))),
        Marker::Array16 | Marker::Array32 => Item::Array(be(&h[1..]) as u32),
        Marker::Map16 | Marker::Map32 => Item::Map(be(&h[1..]) as u32),
        Marker::Str8 => Item::Str(tail(1)),
        Marker::Str16 => Item::Str(tail(2)),
        Marker::Str32 => Item::Str(tail(4)),
        Marker::Bin8 => Item::Bin(tail(1)),
        Marker::Bin16 => Item::Bin(tail(2)),
        Marker::Bin32 => Item::Bin(tail(4)),
        Marker::FixExt1 | Marker::FixExt2 | Marker::FixExt4 | Marker::FixExt8 => {
            Item::Ext(h[1] as i8, &h[2..])
        }
        Marker::FixExt16 => Item::Ext(h[1] as i8, &h[2..]),
        Marker::Ext8 => Item::Ext(h[2] as i8, &h[3..]),
        Marker::Ext16 => Item::Ext(h[3] as i8, &h[4..]),
        Marker::Ext32 => Item::Ext(h[5] as i8, &h[6..]),
        Marker::Reserved => unreachable!("refused by head()"),
    }
}

/// Reads values from a complete buffer, one head at a time.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// The next head; a truncated one is an error (the buffer is all there is).
    pub fn read(&mut self) -> Result<Item<'a>, Malformed> {
        let rest = &self.buf[self.pos..];
        match head(rest)? {
            Head::Whole(n) => {
                self.pos += n;
                Ok(item(&rest[..n]))
            }
            Head::Need(_) => Err(Malformed::Truncated),
        }
    }

    /// Skips one whole value (nested at most `DEPTH_MAX - depth` deeper); returns its bytes.
    pub fn skip(&mut self, depth: usize) -> Result<&'a [u8], Malformed> {
        let start = self.pos;
        self.skip_value(depth)?;
        Ok(&self.buf[start..self.pos])
    }

    fn skip_value(&mut self, depth: usize) -> Result<(), Malformed> {
        let items = match self.read()? {
            Item::Array(n) => u64::from(n),
            Item::Map(n) => 2 * u64::from(n),
            _ => return Ok(()),
        };
        if depth + 1 > DEPTH_MAX {
            return Err(Malformed::TooDeep);
        }
        for _ in 0..items {
            self.skip_value(depth + 1)?;
        }
        Ok(())
    }

    /// Writes the next value as JSON into `out` (see the module docs), at nesting `depth`;
    /// fails on malformed input, or with `Ok(false)` once `out` passes `max` bytes.
    pub fn json(&mut self, depth: usize, out: &mut Vec<u8>, max: usize) -> Result<bool, Malformed> {
        let value = self.read()?;
        match value {
            Item::Array(n) | Item::Map(n) if depth + 1 > DEPTH_MAX && n > 0 => {
                return Err(Malformed::TooDeep)
            }
            Item::Array(n) => {
                out.push(b'[');
                for i in 0..n {
                    if i > 0 {
                        out.push(b',');
                    }
                    if !self.json(depth + 1, out, max)? {
                        return Ok(false);
                    }
                }
                out.push(b']');
            }
            Item::Map(n) => {
                out.push(b'{');
                for i in 0..n {
                    if i > 0 {
                        out.push(b',');
                    }
                    if !self.json_key(out)? || !self.json(depth + 1, out, max)? {
                        return Ok(false);
                    }
                }
                out.push(b'}');
            }
            scalar => scalar_json(scalar, out),
        }
        Ok(out.len() <= max)
    }

    /// Writes a map key and its colon: a string as is, a scalar as its JSON text in quotes.
    pub fn json_key(&mut self, out: &mut Vec<u8>) -> Result<bool, Malformed> {
        match self.read()? {
            Item::Str(s) | Item::Bin(s) => json_string(s, out),
            Item::Array(_) | Item::Map(_) => return Err(Malformed::ContainerKey),
            scalar => {
                let mut text = Vec::new();
                scalar_json(scalar, &mut text);
                json_string(&text, out);
            }
        }
        out.push(b':');
        Ok(true)
    }
}

/// Writes a scalar (not an array or map) as JSON.
fn scalar_json(value: Item<'_>, out: &mut Vec<u8>) {
    use std::io::Write as _;
    match value {
        Item::Nil => out.extend_from_slice(b"null"),
        Item::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Item::Uint(v) => {
            let _ = write!(out, "{v}");
        }
        Item::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Item::Float(v) if v.is_finite() => {
            let _ = write!(out, "{v:?}");
        }
        Item::Float(_) => out.extend_from_slice(b"null"),
        Item::Str(s) | Item::Bin(s) => json_string(s, out),
        Item::Ext(kind, data) => match super::message::event_time(kind, data) {
            Some((secs, nanos)) => {
                out.push(b'"');
                super::message::rfc3339(secs, Some(nanos), out);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        },
        Item::Array(_) | Item::Map(_) => unreachable!("containers are written by json()"),
    }
}

/// Writes `s` as a JSON string: escaped, invalid UTF-8 replaced by U+FFFD.
pub fn json_string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for chunk in s.utf8_chunks() {
        escape(chunk.valid(), out);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

fn escape(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => &[],
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        } else {
            out.extend_from_slice(esc);
        }
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

/// Why a stream cannot be read further.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ScanError {
    #[error("{0}")]
    Malformed(Malformed),
    #[error("message longer than {max} bytes")]
    TooLong { max: usize },
}

/// Finds where one top-level value ends in a stream's bytes, across reads.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Bytes of the current value scanned so far (whole items only).
    pos: usize,
    /// Items still to come in each open array or map, outermost first.
    open: Vec<u64>,
}

impl Scanner {
    /// Scans `buf` (the value's bytes from its start: what an earlier call saw and what came
    /// since). `Ok(Some(len))`: a value ends at `len` (the scanner is ready for the next one,
    /// which starts at `buf[len]`); `Ok(None)`: more bytes are needed; an error when the bytes
    /// are malformed, or the value would pass `max` bytes.
    pub fn scan(&mut self, buf: &[u8], max: usize) -> Result<Option<usize>, ScanError> {
        while self.pos < buf.len() {
            let n = match head(&buf[self.pos..]).map_err(ScanError::Malformed)? {
                Head::Whole(n) => n,
                Head::Need(n) if self.pos + n > max => return Err(ScanError::TooLong { max }),
                Head::Need(_) => return Ok(None),
            };
            if self.pos + n > max {
                return Err(ScanError::TooLong { max });
            }
            let items = match item(&buf[self.pos..self.pos + n]) {
                Item::Array(k) => u64::from(k),
                Item::Map(k) => 2 * u64::from(k),
                _ => 0,
            };
            self.pos += n;
            if items > 0 {
                if self.open.len() == DEPTH_MAX {
                    return Err(ScanError::Malformed(Malformed::TooDeep));
                }
                self.open.push(items);
                continue;
            }
            // A whole value: it completes the containers it closes.
            loop {
                let Some(left) = self.open.last_mut() else {
                    let len = std::mem::take(&mut self.pos);
                    return Ok(Some(len));
                };
                *left -= 1;
                if *left > 0 {
                    break;
                }
                self.open.pop();
            }
        }
        Ok(None)
    }

    /// Whether part of a value was scanned (a message started and not finished).
    pub fn started(&self) -> bool {
        self.pos > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Result<String, Malformed> {
        let mut out = Vec::new();
        let mut r = Reader::new(bytes);
        assert!(r.json(0, &mut out, usize::MAX)?);
        Ok(String::from_utf8(out).unwrap())
    }

    fn nested(depth: usize) -> Vec<u8> {
        let mut v = vec![0x91; depth];
        v.push(0xc0);
        v
    }

    #[test]
    fn values_render_as_json() {
        let mut m = Vec::new();
        rmp::encode::write_map_len(&mut m, 6).unwrap();
        rmp::encode::write_str(&mut m, "s").unwrap();
        rmp::encode::write_str(&mut m, "a\"\\\n\u{1}é").unwrap();
        rmp::encode::write_str(&mut m, "n").unwrap();
        rmp::encode::write_sint(&mut m, -300).unwrap();
        rmp::encode::write_uint(&mut m, 1).unwrap();
        rmp::encode::write_f64(&mut m, 1.5).unwrap();
        rmp::encode::write_str(&mut m, "bin").unwrap();
        rmp::encode::write_bin(&mut m, b"ok\xff").unwrap();
        rmp::encode::write_str(&mut m, "a").unwrap();
        rmp::encode::write_array_len(&mut m, 3).unwrap();
        rmp::encode::write_nil(&mut m).unwrap();
        rmp::encode::write_bool(&mut m, true).unwrap();
        rmp::encode::write_f32(&mut m, f32::NAN).unwrap();
        rmp::encode::write_str(&mut m, "t").unwrap();
        rmp::encode::write_ext_meta(&mut m, 8, 0).unwrap();
        m.extend_from_slice(&[0x65, 0x53, 0xf1, 0x00, 0, 0, 0, 5]);
        let want = concat!(
            r#"{"s":"a\"\\\n\u0001é","n":-300,"1":1.5,"bin":"ok�","a":[null,true,null],"#,
            r#""t":"2023-11-14T22:13:20.000000005Z"}"#
        );
        assert_eq!(json(&m).unwrap(), want);
    }

    #[test]
    fn hostile_values_are_refused_not_followed() {
        // Truncated: a str announcing more than there is, an array missing items.
        assert_eq!(json(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a']), Err(Malformed::Truncated));
        assert_eq!(json(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]), Err(Malformed::Truncated));
        assert_eq!(json(&[0xc1]), Err(Malformed::Reserved));
        assert_eq!(json(&nested(DEPTH_MAX + 1)), Err(Malformed::TooDeep));
        assert!(json(&nested(DEPTH_MAX)).is_ok());
        assert_eq!(json(&[0x81, 0x90, 0xc0]), Err(Malformed::ContainerKey));
        // Over the output limit: stops (false), no error.
        let mut out = Vec::new();
        let big = [&[0xd9, 200][..], &[b'x'; 200]].concat();
        assert_eq!(Reader::new(&big).json(0, &mut out, 100), Ok(false));
        assert_eq!(Reader::new(&nested(DEPTH_MAX + 1)).skip(0), Err(Malformed::TooDeep));
    }

    #[test]
    fn the_scanner_finds_message_ends_across_any_split() {
        let mut two = Vec::new();
        rmp::encode::write_array_len(&mut two, 3).unwrap();
        rmp::encode::write_str(&mut two, "tag").unwrap();
        rmp::encode::write_uint(&mut two, 1_700_000_000).unwrap();
        rmp::encode::write_map_len(&mut two, 1).unwrap();
        rmp::encode::write_str(&mut two, "k").unwrap();
        rmp::encode::write_array_len(&mut two, 0).unwrap();
        let first = two.len();
        two.extend_from_slice(&[0x92, 0xa1, b'x', 0xc0]);
        for cut in 0..=two.len() {
            let mut s = Scanner::default();
            let mut seen = Vec::new();
            let mut buf = two[..cut].to_vec();
            let mut base = 0;
            for more in [&two[cut..], &[][..]] {
                while let Some(len) = s.scan(&buf[base..], 1024).unwrap() {
                    seen.push(base + len);
                    base += len;
                }
                buf.extend_from_slice(more);
            }
            assert_eq!(seen, [first, two.len()], "split at {cut}");
            assert!(!s.started());
        }
    }

    #[test]
    fn the_scanner_refuses_long_deep_and_reserved() {
        let mut s = Scanner::default();
        let long = [0xdb, 0, 0, 1, 0];
        assert_eq!(s.scan(&long, 128), Err(ScanError::TooLong { max: 128 }));
        let mut s = Scanner::default();
        let err = s.scan(&nested(DEPTH_MAX + 1), 1 << 20);
        assert_eq!(err, Err(ScanError::Malformed(Malformed::TooDeep)));
        let mut s = Scanner::default();
        assert_eq!(s.scan(&[0x92, 0xc1], 64), Err(ScanError::Malformed(Malformed::Reserved)));
        // An array of 2^32-1 items announced: nothing allocated, waits for items.
        let mut s = Scanner::default();
        assert_eq!(s.scan(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0], 1 << 20), Ok(None));
        assert!(s.started());
    }
}
