//! Any bytes as a journal file: opening, walking every entry, decoding and rendering it must
//! end (no hang), never panic, and never allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::sources::journal::file::JournalFile;
use shipper::sources::journal::{json, Entry, JournalReader};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("shipper-fuzz-{}.journal", std::process::id()));
    std::fs::write(&path, data).expect("temp file");
    let Ok(file) = JournalFile::open(&path) else { return };
    let seqnum_id = file.header.seqnum_id;
    let mut reader = JournalReader::new(file);
    let mut entry = Entry::default();
    let mut out = Vec::new();
    // Entries only move forward, so this loop is bounded by the file; the cap is a backstop.
    for _ in 0..100_000 {
        if !reader.next_blocking(&mut entry) {
            break;
        }
        out.clear();
        json::render(&seqnum_id, &entry, &mut out);
    }
});
