//! Pipe bytes cut at arbitrary read boundaries: the line splitter must hand out exactly the
//! lines a whole-input split gives (each cut to the limit, flagged), whatever the cuts, and
//! never hold more than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shipper::sources::lines::LineSplitter;

fuzz_target!(|data: &[u8]| {
    let [max, cuts, input @ ..] = data else { return };
    let max = usize::from(*max % 64) + 1;
    let mut want: Vec<(Vec<u8>, bool)> = Vec::new();
    let complete = input.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for line in input[..complete].split(|&b| b == b'\n') {
        want.push((line[..line.len().min(max)].to_vec(), line.len() > max));
    }
    // split() of "a\n" yields "a" and "": the last piece is after the final newline.
    want.pop();
    // An over-long partial line at the end has already been handed out, cut.
    let tail = &input[complete..];
    if tail.len() > max {
        want.push((tail[..max].to_vec(), true));
    }
    let mut got: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut splitter = LineSplitter::new(max);
    let step = usize::from(*cuts % 17) + 1;
    for chunk in input.chunks(step) {
        splitter.split(chunk, |l| got.push((l.bytes.to_vec(), l.truncated)));
        assert!(splitter.pending() <= max, "carry over line_bytes_max");
    }
    assert_eq!(got, want);
});
