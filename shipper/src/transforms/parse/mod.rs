//! Finds the few fields the pipeline needs in a JSON line, keeping the original bytes, and
//! checks that the line is a JSON object.
//!
//! # Design constraints
//! - One pass over the line, building nothing: the scanner (`scan.rs`) checks the grammar of
//!   the whole line (RFC 8259) and the UTF-8 of its non-ASCII bytes, and notes where the
//!   top-level key field and cfjs1's `format` are; only those two values are copied out
//!   (unescaped). No copy of the line, no tape.
//! - Bounded by the line: the only state is a stack of the open containers (one byte each),
//!   so nesting depth is bounded by `line_bytes_max` and never by the call stack. Buffers are
//!   reused, so the steady state allocates nothing.
//!
//! # Operation
//! A line that is not valid UTF-8, not valid JSON, or not a JSON object is passed on as text
//! under the source's service and reported as [`Failure`], which the caller counts. The key
//! is the first top-level member named `ratelimit.key_field` whose value is a string (names
//! compared after unescaping); cfjs1's `format` likewise. A `\u` escape of a lone surrogate
//! is valid JSON (RFC 8259 section 8.2 leaves it to the reader) and becomes U+FFFD in a value
//! copied out; numbers are checked against the grammar only (`1e400` is a number). The
//! simd-json tape this replaced differed there, and took some lines that are not JSON (other
//! bytes after a number): those are `invalid_json` now.
//!
//! `tape.rs` keeps the simd-json extraction this replaced, as the fuzz target's reference
//! and the benchmark's baseline.

mod scan;
pub mod tape;

use crate::config::shipper::Format;

/// Why a line could not be parsed as the source's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not valid UTF-8.
    Utf8,
    /// Not valid JSON.
    Json,
    /// Valid JSON but not an object.
    NotObject,
    /// A cfjs1 line without a string `format` field.
    NoFormat,
}

impl Failure {
    pub const ALL: [Failure; 4] =
        [Failure::Utf8, Failure::Json, Failure::NotObject, Failure::NoFormat];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Utf8 => "invalid_utf8",
            Failure::Json => "invalid_json",
            Failure::NotObject => "not_object",
            Failure::NoFormat => "no_format",
        }
    }
}

/// What was found in a line.
#[derive(Debug, PartialEq, Eq)]
pub struct Fields<'p> {
    /// Value of the rate-limit key field, when present and a string.
    pub key: Option<&'p [u8]>,
    /// cfjs1's `format` value.
    pub format: Option<&'p [u8]>,
}

/// Reusable parser state, one per core.
#[derive(Default)]
pub struct Parser {
    /// The scanner's open containers.
    stack: Vec<u8>,
    /// A member name with escapes, unescaped to be compared.
    name: Vec<u8>,
    key: Vec<u8>,
    format: Vec<u8>,
}

impl Parser {
    /// Extracts `key_field` (and `format` for cfjs1) from `line`.
    pub fn extract(
        &mut self,
        line: &[u8],
        format: Format,
        key_field: &str,
    ) -> Result<Fields<'_>, Failure> {
        if format == Format::Text {
            return Ok(Fields { key: None, format: None });
        }
        let cfjs1 = format == Format::Cfjs1;
        let wanted = scan::Wanted { key: key_field.as_bytes(), format: cfjs1.then_some(b"format") };
        let found = match scan::Scan::new(line, &mut self.stack).object(&wanted, &mut self.name) {
            Ok(found) => found,
            // Invalid UTF-8 wins over invalid JSON, wherever each is in the line.
            Err(Failure::Json) if std::str::from_utf8(line).is_err() => return Err(Failure::Utf8),
            Err(e) => return Err(e),
        };
        self.key.clear();
        self.format.clear();
        if let Some(v) = found.key {
            scan::unescape(&line[v.start..v.end], v.escaped, &mut self.key);
        }
        match found.format {
            Some(v) => scan::unescape(&line[v.start..v.end], v.escaped, &mut self.format),
            None if cfjs1 => return Err(Failure::NoFormat),
            None => {}
        }
        Ok(Fields {
            key: found.key.map(|_| &self.key[..]),
            format: cfjs1.then_some(&self.format[..]),
        })
    }
}

#[cfg(test)]
mod tests;
