//! Any bytes from a peer: the frame decoder, HELLO and record parsing must never panic and
//! never buffer more than one frame's bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::protocol::{FrameDecoder, Hello, Kind, RecordIter};

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::new(1 << 16);
    for chunk in data.chunks(7) {
        dec.push(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    if f.header.kind == Kind::Hello {
                        let _ = Hello::decode(&f.payload);
                    }
                    let _ = RecordIter::validate(&f.payload, f.header.count);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.buffered() <= (1 << 16) + 32 + 7, "decoder holds more than one frame");
    }
});
