//! The extraction the shipper did before [`super::Parser`]: simd-json builds a tape of the
//! whole line over a scratch copy (it unescapes in place), and the key field and cfjs1's
//! `format` are looked up among the top-level pairs. Kept as the reference the `json_key`
//! fuzz target compares the scanner with, and as the baseline of the `extract` benchmark.

use simd_json::prelude::*;

use super::{Failure, Fields};
use crate::config::shipper::Format;

/// simd-json's state, reused between lines.
pub struct TapeParser {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
    tape: Option<simd_json::Tape<'static>>,
    key: Vec<u8>,
    format: Vec<u8>,
}

impl Default for TapeParser {
    fn default() -> Self {
        TapeParser {
            scratch: Vec::new(),
            buffers: simd_json::Buffers::new(4096),
            tape: Some(simd_json::Tape::null().reset()),
            key: Vec::new(),
            format: Vec::new(),
        }
    }
}

impl TapeParser {
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
