//! The record layout inside a decompressed DATA payload.

use thiserror::Error;

use super::limits::KEY_BYTES_MAX;

/// Bytes of a record's own header: `len: u32` and `key_len: u8`.
pub const RECORD_HEADER_BYTES: usize = 5;

/// Appends records to a payload buffer.
#[derive(Default)]
pub struct RecordWriter;

impl RecordWriter {
    /// Appends one record. `key` is truncated to [`KEY_BYTES_MAX`] by the caller's interning,
    /// so exceeding it here is a broken invariant.
    #[inline]
    pub fn push(out: &mut Vec<u8>, key: &[u8], body: &[u8]) {
        debug_assert!(key.len() <= KEY_BYTES_MAX, "record key longer than {KEY_BYTES_MAX}");
        let len = u32::try_from(body.len()).expect("record bodies are bounded by line_bytes_max");
        out.reserve(RECORD_HEADER_BYTES + key.len() + body.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.push(key.len() as u8);
        out.extend_from_slice(key);
        out.extend_from_slice(body);
    }
}

/// A record payload that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record {index} at offset {offset} runs past the end of the payload")]
    Truncated { index: u32, offset: usize },
    #[error("payload holds more records than the {count} its header declares")]
    TooMany { count: u32 },
    #[error("payload holds {found} records, header declares {count}")]
    CountMismatch { count: u32, found: u32 },
}

/// Iterates `(key, body)` pairs of a payload, checking every length against the payload.
pub struct RecordIter<'a> {
    buf: &'a [u8],
    offset: usize,
    index: u32,
    count: u32,
}

impl<'a> RecordIter<'a> {
    pub fn new(buf: &'a [u8], count: u32) -> RecordIter<'a> {
        RecordIter { buf, offset: 0, index: 0, count }
    }

    /// Checks the whole payload without yielding, so a frame is accepted or refused as a unit.
    pub fn validate(buf: &[u8], count: u32) -> Result<(), RecordError> {
        let mut it = RecordIter::new(buf, count);
        for r in &mut it {
            r?;
        }
        if it.index != count {
            return Err(RecordError::CountMismatch { count, found: it.index });
        }
        Ok(())
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset == self.buf.len() {
            return None;
        }
        if self.index == self.count {
            self.offset = self.buf.len();
            return Some(Err(RecordError::TooMany { count: self.count }));
        }
        let err = RecordError::Truncated { index: self.index, offset: self.offset };
        let rest = &self.buf[self.offset..];
        if rest.len() < RECORD_HEADER_BYTES {
            self.offset = self.buf.len();
            return Some(Err(err));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let key_len = rest[4] as usize;
        let end = RECORD_HEADER_BYTES + key_len + len;
        if rest.len() < end {
            self.offset = self.buf.len();
            return Some(Err(err));
        }
        let key = &rest[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + key_len];
        let body = &rest[RECORD_HEADER_BYTES + key_len..end];
        self.offset += end;
        self.index += 1;
        Some(Ok((key, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let mut buf = Vec::new();
        RecordWriter::push(&mut buf, b"nginx", b"{\"a\":1}");
        RecordWriter::push(&mut buf, b"", b"");
        let got: Vec<_> = RecordIter::new(&buf, 2).map(Result::unwrap).collect();
        assert_eq!(got, vec![(&b"nginx"[..], &b"{\"a\":1}"[..]), (&b""[..], &b""[..])]);
        assert_eq!(RecordIter::validate(&buf, 2), Ok(()));
        assert_eq!(
            RecordIter::validate(&buf, 3),
            Err(RecordError::CountMismatch { count: 3, found: 2 })
        );
        assert_eq!(RecordIter::validate(&buf, 1), Err(RecordError::TooMany { count: 1 }));
        assert_eq!(
            RecordIter::validate(&buf[..buf.len() - 1], 2),
            Err(RecordError::Truncated { index: 1, offset: 17 })
        );
    }
}
