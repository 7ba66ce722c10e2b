use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use shipper::protocol::{FrameDecoder, RecordIter};

use crate::harness::*;

/// The receiver's `[receiver]` lines that make it refuse any frame over 16 KiB decompressed.
const SMALL_FRAMES: &str = "frame_raw_bytes_max = 16384";

/// A JSON line of `len` bytes for service `service`.
fn json_line(service: &str, n: usize, len: usize) -> String {
    let head = format!("{{\"service\":\"{service}\",\"n\":{n},\"pad\":\"");
    format!("{head}{}\"}}", "x".repeat(len.saturating_sub(head.len() + 2)))
}

/// A shipper reading `app.pipe` in batches of at most 8 KiB (so a 20 KB line is a frame of its
/// own), with `receivers` lines added to `[receivers]` and `extra` sections.
fn start(env: &Env, port: u16, metrics: u16, receivers: &str, extra: &str) -> Proc {
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n\
         [batch]\nbatch_bytes_max = 8192\nflush_interval_ms = 20\n{extra}"
    );
    let cfg = env.shipper_toml(port, metrics, &body).replace(
        "ack_timeout_ms = 3000",
        &format!("ack_timeout_ms = 3000\nconnections = 1\n{receivers}"),
    );
    let path = env.write("edge.toml", &cfg);
    Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], metrics, env.path("s.log"))
}

/// Writes the refused 20 KB line, then `small` ordinary lines behind it.
fn write_big_then_small(env: &Env, small: usize) -> (String, Vec<String>) {
    let mut w = open_writer(&env.path("app.pipe"));
    let big = json_line("big", 0, 20_000);
    writeln!(w, "{big}").unwrap();
    let lines: Vec<String> = (1..=small).map(|n| json_line("app", n, 100)).collect();
    for l in &lines {
        writeln!(w, "{l}").unwrap();
    }
    (big, lines)
}

/// The lines of stream `stream` under `out`, as text.
fn stream(out: &Path, stream: &str) -> Vec<String> {
    let lines = output_lines(out).into_iter().filter(|(s, _)| s == stream);
    lines.map(|(_, l)| String::from_utf8(l).unwrap()).collect()
}

/// The records of a frame file written by the quarantine: (key, body) pairs.
fn frame_records(path: &Path) -> Vec<(String, String)> {
    let mut dec = FrameDecoder::new(64 << 20);
    dec.push(&std::fs::read(path).unwrap());
    let f = dec.next_frame().unwrap().expect("one whole frame");
    let raw = zstd::bulk::decompress(&f.payload, f.header.raw_len as usize).unwrap();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    let records = RecordIter::new(&raw, f.header.count).map(Result::unwrap);
    records.map(|(k, b)| (text(k), text(b))).collect()
}

// Regression: a frame the receiver could never take was resent forever (a reconnect every few
// hundred ms) and every frame behind it waited. Now: REJECT, kept in the quarantine, next ones flow.
#[test]
fn a_refused_frame_goes_to_the_quarantine_and_the_frames_behind_it_flow() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, SMALL_FRAMES);
    let qdir = env.path("quarantine");
    let extra = format!("[quarantine]\ndirectory = {qdir:?}\n");
    let mut shipper = start(&env, port, sm, "", &extra);
    let (big, small) = write_big_then_small(&env, 50);
    shipper.wait_alive("the 50 lines behind the refused one", || {
        receiver.metric("shipper_receiver_records_written_total", &[]) == 50.0
    });
    shipper.wait_alive("the refused frame written to the quarantine", || {
        metric_at(sm, "shipper_quarantine_frames_total", &[]) == 1.0
    });
    assert_eq!(stream(&env.out(), "app"), small);
    assert_eq!(receiver.metric("shipper_receiver_frames_rejected_total", &[]), 1.0);
    assert_eq!(receiver.metric("shipper_receiver_records_rejected_total", &[]), 1.0);
    assert_eq!(receiver.metric("shipper_receiver_write_errors_total", &[]), 0.0);
    let m = |name: &str, labels: &[(&str, &str)]| shipper.metric(name, labels);
    assert_eq!(m("shipper_frames_rejected_total", &[]), 1.0);
    assert_eq!(m("shipper_quarantine_records_total", &[]), 1.0);
    assert_eq!(m("shipper_lines_dropped_total", &[]), 0.0);
    assert_eq!(m("shipper_receiver_failures_total", &[]), 0.0, "a REJECT is not a failure");
    let mut files: Vec<_> = std::fs::read_dir(qdir.join("w0"))
        .into_iter()
        .chain(std::fs::read_dir(qdir.join("w1")))
        .flatten()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files[0].extension().unwrap() == "frame" && files[1].extension().unwrap() == "reason");
    assert_eq!(frame_records(&files[0]), vec![("big".to_string(), big)]);
    let reason = std::fs::read_to_string(&files[1]).unwrap();
    assert!(reason.contains("frame_raw_bytes_max 16384"), "{reason}");
    assert!(reason.contains("records: 1\n") && reason.contains("service big: 1\n"), "{reason}");
    let ledger = settled_ledger(&mut shipper, sm, &env.path("app.pipe"));
    assert_eq!(ledger["handed"], 51, "{ledger:?}");
    assert_eq!((ledger["delivered"], ledger["quarantined"]), (50, 1), "{ledger:?}");
    let stopped = shipper.stop(std::time::Duration::from_secs(20));
    assert!(stopped.success(), "{}", shipper.log_text());
}

/// The pipe's ledger once nothing is held any more (acknowledgements and the quarantine's
/// writes settle after the counts the tests wait for).
fn settled_ledger(shipper: &mut Proc, sm: u16, pipe: &Path) -> BTreeMap<String, u64> {
    shipper.wait_alive("every record of the pipe settled", || {
        scraped_ledger(sm, pipe).get("held") == Some(&0)
    });
    scraped_ledger(sm, pipe)
}

/// With a dead-letter receiver configured, a frame the primary refuses goes there (flagged
/// dead letter) while the primary keeps taking every other frame.
#[test]
fn a_refused_frame_goes_to_the_dead_letter_tier_while_the_primary_takes_the_rest() {
    let env = Env::new();
    let (port, rm, dp, dm, sm) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, SMALL_FRAMES);
    let dout = env.path("dead");
    let dead = start_receiver_into(&env, dp, dm, &dout);
    let tiers = format!("dead_letter = [\"127.0.0.1:{dp}\"]");
    let mut shipper = start(&env, port, sm, &tiers, "");
    let (big, small) = write_big_then_small(&env, 50);
    shipper.wait_alive("the refused line at the dead-letter receiver", || {
        dead.metric("shipper_receiver_records_dead_letter_total", &[]) == 1.0
    });
    shipper.wait_alive("the 50 lines at the primary", || {
        receiver.metric("shipper_receiver_records_written_total", &[]) == 50.0
    });
    assert_eq!(stream(&dout, "big@dead_letter"), vec![big]);
    assert_eq!(stream(&env.out(), "app"), small);
    assert_eq!(dead.metric("shipper_receiver_records_written_total", &[]), 1.0);
    shipper.wait_alive("the shipper's counters published", || {
        metric_at(sm, "shipper_frames_dead_lettered_total", &[]) == 1.0
    });
    assert_eq!(shipper.metric("shipper_frames_rejected_total", &[]), 1.0);
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    assert_eq!(shipper.metric("shipper_failovers_total", &[]), 0.0, "the primary stayed up");
    let ledger = settled_ledger(&mut shipper, sm, &env.path("app.pipe"));
    assert_eq!((ledger["handed"], ledger["delivered"]), (51, 51), "{ledger:?}");
}

/// Without a dead-letter receiver or a quarantine, a refused frame is dropped, counted per
/// service with reason `rejected`, and the frames behind it flow.
#[test]
fn a_refused_frame_with_nowhere_to_go_is_dropped_and_counted() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, SMALL_FRAMES);
    let mut shipper = start(&env, port, sm, "", "");
    let (_, small) = write_big_then_small(&env, 50);
    shipper.wait_alive("the 50 lines behind the refused one", || {
        receiver.metric("shipper_receiver_records_written_total", &[]) == 50.0
    });
    shipper.wait_alive("the refused line counted", || {
        metric_at(sm, "shipper_lines_dropped_total", &[("reason", "rejected")]) == 1.0
    });
    assert_eq!(stream(&env.out(), "app"), small);
    let dropped = [("reason", "rejected"), ("service", "big")];
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &dropped), 1.0);
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 1.0);
    assert!(shipper.log_text().contains("dropped (no quarantine.directory)"));
    let ledger = settled_ledger(&mut shipper, sm, &env.path("app.pipe"));
    assert_eq!(ledger["handed"], 51, "{ledger:?}");
    assert_eq!((ledger["delivered"], ledger["rejected"]), (50, 1), "{ledger:?}");
}

// Regression: a cfjs1 `format` of 300 bytes was written with its length in one byte, a corrupt
// record the receiver refused forever. Now it is cut to 255 bytes at the source, counted.
#[test]
fn an_over_long_cfjs1_format_is_cut_at_the_source_and_counted() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("cdn.pipe");
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\nformat = \"cfjs1\"\n");
    let shipper = start_shipper(&env, port, sm, &body);
    let long = "f".repeat(300);
    let first = format!("{{\"format\":\"{long}\",\"{long}\":{{\"n\":1}}}}");
    let second = "{\"format\":\"http\",\"http\":{\"n\":2}}".to_string();
    let mut w = open_writer(&pipe);
    writeln!(w, "{first}\n{second}").unwrap();
    wait_for("both lines written", std::time::Duration::from_secs(20), || {
        receiver.metric("shipper_receiver_records_written_total", &[]) == 2.0
    });
    let lines = output_lines(&env.out());
    let long_stream: Vec<&(String, Vec<u8>)> = lines.iter().filter(|(s, _)| s != "http").collect();
    assert_eq!(long_stream.len(), 1, "{lines:?}");
    let (name, line) = long_stream[0];
    assert!(name.starts_with(&"f".repeat(100)) && name.len() <= 255, "{name}");
    assert_eq!(line, first.as_bytes());
    assert_eq!(stream(&env.out(), "http"), vec![second]);
    // Counters are published every 250 ms: the lines may arrive before they are.
    wait_for("the cut counted", std::time::Duration::from_secs(5), || {
        shipper.metric("shipper_source_keys_truncated_total", &[]) == 1.0
    });
    assert_eq!(receiver.metric("shipper_receiver_frames_rejected_total", &[]), 0.0);
}
