//! Any line from a pipe or socket through the JSON key extraction: it must never panic, and a
//! key or cfjs1 format it returns is text found in the line (unescaped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::config::shipper::Format;
use shipper::transforms::parse::Parser;

fuzz_target!(|data: &[u8]| {
    let mut parser = Parser::default();
    for format in [Format::Json, Format::Cfjs1] {
        if let Ok(fields) = parser.extract(data, format, "service") {
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
