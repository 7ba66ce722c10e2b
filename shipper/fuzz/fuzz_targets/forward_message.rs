//! Bytes from a forward-protocol client, cut at arbitrary read boundaries: the scanner finds
//! the same message ends whatever the cuts (never past the limit), and every message it finds
//! is parsed and checked without a panic, its records handed over only when the check passed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::sources::forward::message::{parse, Limits, Scratch};
use shipper::sources::forward::msgpack::Scanner;

const MAX: usize = 4096;

/// The message ends in `input`, reading it `step` bytes at a time.
fn ends(input: &[u8], step: usize) -> (Vec<usize>, bool) {
    let mut scanner = Scanner::default();
    let (mut carry, mut base, mut out) = (Vec::new(), 0, Vec::new());
    for chunk in input.chunks(step) {
        carry.extend_from_slice(chunk);
        loop {
            match scanner.scan(&carry[base..], MAX) {
                Ok(Some(len)) => {
                    assert!(len <= MAX, "a message over the limit");
                    base += len;
                    out.push(base);
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let [cuts, input @ ..] = data else { return };
    let whole = ends(input, input.len().max(1));
    assert_eq!(ends(input, usize::from(*cuts % 17) + 1), whole, "cuts change the message ends");
    let limits = Limits { entries_max: 64, decompressed_bytes_max: 1 << 16, record_bytes_max: 512 };
    let mut start = 0;
    for end in whole.0 {
        let Ok(message) = parse(&input[start..end]) else {
            start = end;
            continue;
        };
        let mut scratch = Scratch::default();
        let now = || (1, 2);
        if let Ok(n) = message.check(&limits, &mut scratch, now) {
            let mut handed = 0;
            let again = message.hand(&limits, &mut scratch, now, |r| {
                assert!(r.len() <= limits.record_bytes_max);
                handed += 1;
            });
            assert_eq!((again, handed), (Ok(n), n), "a checked message hands over whole");
        }
        start = end;
    }
});
