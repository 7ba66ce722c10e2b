//! Any line from a pipe or socket through the JSON key extraction: it must never panic, a key
//! or cfjs1 format it returns is text found in the line (unescaped), and it agrees with the
//! simd-json extraction it replaced (`parse::tape`) on every line, except where simd-json
//! departs from RFC 8259: numbers beyond 64 bits or f64 and escapes of UTF-16 surrogates are
//! left out, and where simd-json takes text that is not JSON (bytes after a number), the
//! scanner must agree with serde_json on whether the line is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::config::shipper::Format;
use shipper::transforms::parse::tape::TapeParser;
use shipper::transforms::parse::{Failure, Fields, Parser};

fuzz_target!(|data: &[u8]| {
    let (mut parser, mut tape) = (Parser::default(), TapeParser::default());
    let exotic = surrogate_escape(data) || long_number(data);
    for format in [Format::Json, Format::Cfjs1] {
        let found = parser.extract(data, format, "service");
        let reference = tape.extract(data, format, "service");
        if found != reference && !exotic {
            differ(data, &found, &reference);
        }
        if let Ok(fields) = found {
            for value in [fields.key, fields.format].into_iter().flatten() {
                assert!(value.len() <= data.len(), "a value longer than its line");
                assert!(std::str::from_utf8(value).is_ok(), "a value that is not UTF-8");
            }
            if format == Format::Cfjs1 {
                assert!(fields.format.is_some(), "cfjs1 accepted without a format");
            }
        }
    }
});

/// The scanner and simd-json differ on `data`: only on whether it is JSON at all (never on
/// UTF-8, never on the fields of a line both take), and then serde_json says the same as the
/// scanner (unless the line nests deeper than serde_json's recursion limit).
fn differ(data: &[u8], found: &Result<Fields, Failure>, reference: &Result<Fields, Failure>) {
    let json = |r: &Result<Fields, Failure>| !matches!(r, Err(Failure::Json));
    assert!(json(found) != json(reference), "differ other than on JSON: {found:?} {reference:?}");
    let opens = data.iter().filter(|&&c| c == b'[' || c == b'{').count();
    if opens < 100 {
        let serde = serde_json::from_slice::<serde_json::Value>(data).is_ok();
        assert_eq!(json(found), serde, "scanner and serde_json differ: {found:?}");
    }
}

/// A `\u` escape of a UTF-16 surrogate (`\uD800` to `\uDFFF`), which simd-json takes its own
/// ways (a lone high one as U+0000, a lone low one as an error).
fn surrogate_escape(data: &[u8]) -> bool {
    data.windows(4).any(|w| {
        w[0] == b'\\' && w[1] == b'u' && matches!(w[2], b'd' | b'D') && {
            matches!(w[3], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
        }
    })
}

/// A run of 19 digits or more, or an exponent of 3 digits or more: numbers simd-json refuses
/// when they do not fit 64 bits or an f64.
fn long_number(data: &[u8]) -> bool {
    let mut run = 0;
    for (i, &c) in data.iter().enumerate() {
        run = if c.is_ascii_digit() { run + 1 } else { 0 };
        if run >= 19 {
            return true;
        }
        if matches!(c, b'e' | b'E') {
            let rest = &data[i + 1..];
            let rest = rest.strip_prefix(b"+").or(rest.strip_prefix(b"-")).unwrap_or(rest);
            if rest.iter().take_while(|c| c.is_ascii_digit()).count() >= 3 {
                return true;
            }
        }
    }
    false
}
