//! Any bytes in a disk buffer segment (bit rot, torn writes, a foreign file): the scan must
//! never panic, must move forward at every step and end at the end of the bytes, and must
//! only return records that hold a whole DATA frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::buffer::format::{Item, Scan};
use shipper::protocol::frame::HEADER_BYTES;

fuzz_target!(|data: &[u8]| {
    let mut scan = Scan::new(data);
    let mut at = 0;
    while let Some(item) = scan.next() {
        assert!(scan.offset() > at, "a step that does not move forward");
        at = scan.offset();
        if let Item::Record(r) = item {
            assert!(r.frame.len() >= HEADER_BYTES, "a record without a whole frame");
        }
    }
    assert_eq!(at, data.len(), "the scan stopped before the end");
});
