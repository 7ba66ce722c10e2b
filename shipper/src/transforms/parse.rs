//! Finds the few fields the pipeline needs in a JSON line, keeping the original bytes.
//!
//! # Design constraints
//! - No document is built and nothing is re-serialised: simd-json builds its tape over a
//!   scratch copy of the line (it unescapes in place), and only the key field and cfjs1's
//!   `format` are copied out. Scratch buffers are reused, so the steady state allocates nothing.
//!
//! # Operation
//! A line that is not valid UTF-8, not valid JSON, or not a JSON object is passed on as text
//! under the source's service and reported as [`Failure`], which the caller counts.

use simd_json::prelude::*;

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
pub struct Parser {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
    tape: Option<simd_json::Tape<'static>>,
    key: Vec<u8>,
    format: Vec<u8>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            scratch: Vec::new(),
            buffers: simd_json::Buffers::new(4096),
            tape: Some(simd_json::Tape::null().reset()),
            key: Vec::new(),
            format: Vec::new(),
        }
    }
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
        self.scratch.clear();
        self.scratch.extend_from_slice(line);
        let mut tape = self.tape.take().expect("tape present").reset();
        let result = simd_json::fill_tape(&mut self.scratch, &mut self.buffers, &mut tape);
        let found = match result {
            Err(e) => Err(match e.error() {
                simd_json::ErrorType::InvalidUtf8 => Failure::Utf8,
                _ if std::str::from_utf8(line).is_err() => Failure::Utf8,
                _ => Failure::Json,
            }),
            Ok(()) => match tape.as_value().as_object() {
                None => Err(Failure::NotObject),
                Some(obj) => {
                    let want_format = format == Format::Cfjs1;
                    let (mut has_key, mut has_format) = (false, false);
                    self.key.clear();
                    self.format.clear();
                    // One pass over the top-level keys, stopping once all wanted are found.
                    for (k, v) in obj.iter() {
                        if !has_key && k == key_field {
                            has_key = copy_str(v, &mut self.key);
                        } else if want_format && !has_format && k == "format" {
                            has_format = copy_str(v, &mut self.format);
                        }
                        if has_key && (has_format || !want_format) {
                            break;
                        }
                    }
                    Ok((has_key, has_format))
                }
            },
        };
        self.tape = Some(tape.reset());
        let (has_key, has_format) = found?;
        if format == Format::Cfjs1 && !has_format {
            return Err(Failure::NoFormat);
        }
        Ok(Fields {
            key: has_key.then_some(&self.key[..]),
            format: (format == Format::Cfjs1).then_some(&self.format[..]),
        })
    }
}

/// Copies `v` into `out` if it is a string.
fn copy_str(v: simd_json::tape::Value<'_, '_>, out: &mut Vec<u8>) -> bool {
    match v.as_str() {
        Some(s) => {
            out.extend_from_slice(s.as_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_key_and_format() {
        let mut p = Parser::default();
        let f = p.extract(br#"{"service":"nginx","msg":"a\"b"}"#, Format::Json, "service");
        assert_eq!(f, Ok(Fields { key: Some(b"nginx"), format: None }));
        let f = p.extract(br#"{"msg":"x"}"#, Format::Json, "service");
        assert_eq!(f, Ok(Fields { key: None, format: None }));
        let f = p.extract(
            br#"{"format":"dns","dns":{"q":"a"},"service":"s\u00e9"}"#,
            Format::Cfjs1,
            "service",
        );
        assert_eq!(f, Ok(Fields { key: Some("sé".as_bytes()), format: Some(b"dns") }));
        let f = p.extract(br#"{"service":7}"#, Format::Json, "service");
        assert_eq!(f, Ok(Fields { key: None, format: None }));
    }

    #[test]
    fn classifies_failures() {
        let mut p = Parser::default();
        assert_eq!(p.extract(b"{\"a\":", Format::Json, "service"), Err(Failure::Json));
        assert_eq!(p.extract(b"{\"a\":\"\xff\"}", Format::Json, "service"), Err(Failure::Utf8));
        assert_eq!(p.extract(b"[1,2]", Format::Json, "service"), Err(Failure::NotObject));
        assert_eq!(p.extract(b"plain text", Format::Json, "service"), Err(Failure::Json));
        assert_eq!(p.extract(br#"{"a":1}"#, Format::Cfjs1, "service"), Err(Failure::NoFormat));
        assert_eq!(
            p.extract(b"\xff anything", Format::Text, "service"),
            Ok(Fields { key: None, format: None })
        );
    }
}
