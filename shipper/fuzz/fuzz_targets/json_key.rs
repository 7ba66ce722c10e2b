//! Any line from a pipe or socket through the JSON key extraction: it must never panic, a key
//! or cfjs1 format it returns is text found in the line (unescaped), and it agrees with the
//! simd-json extraction it replaced (`parse::tape`) on every line, except where simd-json
//! departs from RFC 8259 (numbers beyond 64 bits or f64, escapes of UTF-16 surrogates).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::config::shipper::Format;
use shipper::transforms::parse::tape::TapeParser;
use shipper::transforms::parse::Parser;

fuzz_target!(|data: &[u8]| {
    let (mut parser, mut tape) = (Parser::default(), TapeParser::default());
    let exotic = surrogate_escape(data) || long_number(data);
    for format in [Format::Json, Format::Cfjs1] {
        let found = parser.extract(data, format, "service");
        if !exotic {
            assert_eq!(found, tape.extract(data, format, "service"), "scanner and tape differ");
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
