//! Valid DATA frames built from arbitrary records (any key bytes and lengths, any bodies)
//! through the receiver's decode, check and write path into a scratch directory: every frame
//! must be written and committed (keys always make valid stream names), never refused and
//! never a panic, and every byte must land in the output.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use shipper::protocol::frame::{Header, Kind, FLAG_ZSTD};
use shipper::protocol::{FrameDecoder, RecordWriter};
use shipper::receiver::writer::{Job, Verdict, Writer};
use shipper::receiver::{commit, output};

/// Records from the input: `[key_len, key..., body_len, body...]`, repeated.
fn records(mut data: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    while let [k, rest @ ..] = data {
        let key = &rest[..usize::from(*k).min(rest.len())];
        let rest = &rest[key.len()..];
        let [b, rest @ ..] = rest else { break };
        let body = &rest[..usize::from(*b).min(rest.len())];
        out.push((key, body));
        data = &rest[body.len()..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let records = records(data);
    if records.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[receiver]\nlisten = \"127.0.0.1:1\"\n[tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n\
         [output]\ndirectory = {:?}\nfsync = false\nstreams_max = 4\n",
        dir.path()
    );
    let config: shipper::config::ReceiverConfig = toml::from_str(&text).unwrap();
    // As `shipper receive` starts: recovery lays out the state directory and the generation.
    let modes = shipper::os::Modes::DEFAULT;
    let recover_outputs = |log: &commit::LogState| output::recover(&config, log);
    let state = commit::recover(dir.path(), 3600, modes, recover_outputs).unwrap();
    let outputs = output::open(&config, state.gen, 0);
    let commits = commit::CommitLog::create(dir.path(), 0, false, modes).unwrap();
    let writer = Writer::new(0, outputs, commits, Default::default(), Arc::new(config));
    let figures = writer.figures();
    let mut raw = Vec::new();
    for (k, b) in &records {
        RecordWriter::push(&mut raw, k, b);
    }
    let z = zstd::bulk::compress(&raw, 1).unwrap();
    let count = records.len() as u32;
    let h = Header { kind: Kind::Data, flags: FLAG_ZSTD, seq: 1, count, raw_len: raw.len() as u32, len: z.len() as u32 };
    // The frame, then the same frame again (a duplicate, not a second copy), through the
    // writer as a shard queues them.
    let verdicts = Arc::new(Mutex::new(Vec::new()));
    let (jobs, queue) = std::sync::mpsc::channel();
    for _ in 0..2 {
        let mut dec = FrameDecoder::new(1 << 24);
        dec.push(&h.wire(&z));
        let frame = dec.next_frame().unwrap().unwrap();
        let v = verdicts.clone();
        let answer = Box::new(move |verdict| v.lock().unwrap().push(verdict));
        let (id, seq, frame) = ((7, 0), frame.header.seq, Some(frame));
        jobs.send(Job { id, seq, sender: "fuzz".into(), frame, room: None, answer }).unwrap();
    }
    drop(jobs);
    writer.run(queue);
    assert_eq!(*verdicts.lock().unwrap(), [Verdict::Ack, Verdict::Ack], "a valid frame was not written");
    let body_bytes: usize = records.iter().map(|(_, b)| b.len() + 1).sum();
    let f = figures.lock().unwrap();
    assert_eq!(f.records_written, u64::from(count));
    assert_eq!(f.bytes_written, body_bytes as u64);
    assert_eq!(f.frames_duplicate, 1);
});
