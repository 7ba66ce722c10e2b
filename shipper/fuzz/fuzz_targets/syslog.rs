//! Any bytes from a socket: the syslog parser and the TCP framer must never panic, a parsed
//! message must render as UTF-8 JSON, and the framer must never hold more than one message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::config::socket::Framing;
use shipper::sources::socket::framing::{Framer, Piece};
use shipper::transforms::syslog::{parse, write_json, Syntax};

const MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    for syntax in [Syntax::Rfc5424, Syntax::Rfc3164, Syntax::Auto] {
        if let Ok(m) = parse(data, syntax) {
            out.clear();
            write_json(&m, "service", m.app.unwrap_or("fb").as_bytes(), &mut out);
            let text = std::str::from_utf8(&out).expect("records are UTF-8");
            assert!(text.starts_with('{') && text.ends_with('}'));
        }
    }
    for framing in [Framing::Newline, Framing::OctetCounting, Framing::Auto] {
        let mut framer = Framer::new(framing, MAX);
        for chunk in data.chunks(7) {
            let pushed = framer.push(chunk, |p| {
                if let Piece::Message { bytes, .. } = p {
                    assert!(bytes.len() <= MAX, "a message over the limit was handed out");
                    let _ = parse(bytes, Syntax::Auto);
                }
            });
            if pushed.is_err() {
                break;
            }
            assert!(framer.pending() <= MAX, "framer holds more than one message");
        }
    }
});
