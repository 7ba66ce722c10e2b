use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::kafka::{consume, Broker};
use crate::harness::*;
use crate::pipe::{ids, line};

/// A receiver with the files output `[output]` (unless `files` is false: then its commit logs
/// in `state/`) and one `[[outputs.kafka]]` named `kafka` on `broker`, with `keys` added.
fn kafka_receiver(env: &Env, ports: (u16, u16), files: bool, broker: &str, keys: &str) -> Proc {
    let (port, metrics) = ports;
    let state = env.path("state");
    let extra = if files { String::new() } else { format!("state_directory = {state:?}") };
    let mut text = env.receiver_toml(port, metrics, &extra);
    if !files {
        let (start, end) = (text.find("[output]").unwrap(), text.find("[metrics]").unwrap());
        text.replace_range(start..end, "");
    }
    let kafka = format!("[[outputs.kafka]]\nname = \"kafka\"\nbrokers = [{broker:?}]\n{keys}\n");
    let at = text.find("[metrics]").unwrap();
    text.insert_str(at, &kafka);
    start_receiver_toml(env, port, metrics, &text)
}

/// A shipper reading `app.pipe` in frames of at most 500 lines, with a disk buffer (lines wait
/// there while no receiver acknowledges) and `extra` sections.
fn kafka_shipper(env: &Env, port: u16, metrics: u16, extra: &str) -> (Proc, std::path::PathBuf) {
    let pipe = env.path("app.pipe");
    let buffer = env.path("buffer");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n\
         [batch]\nbatch_events_max = 500\nflush_interval_ms = 10\n\
         [buffer]\ndirectory = {buffer:?}\n{extra}"
    );
    (start_shipper(env, port, metrics, &body), pipe)
}

/// Writes lines `from..to` of each writer of `writers` into `pipe`, interleaved, in chunks of
/// 500; with `pace`, a pause after each chunk.
fn write_lines(pipe: &Path, writers: &[usize], from: usize, to: usize, pace: Option<Duration>) {
    let mut f = open_writer(pipe);
    let mut seq = from;
    while seq < to {
        let mut buf = Vec::new();
        for s in seq..(seq + 500).min(to) {
            for &w in writers {
                buf.extend_from_slice(line(w, s).as_bytes());
                buf.push(b'\n');
            }
        }
        f.write_all(&buf).unwrap();
        seq = (seq + 500).min(to);
        if let Some(pause) = pace {
            // Pacing the writer so that an outage lands mid-stream, not waiting for a state.
            std::thread::sleep(pause);
        }
    }
}

/// How many times each line of writer `w` (up to `lines`) is among `records`, each checked:
/// its topic `logs.wW`, its key (`wW` or `-`), its bytes.
fn copies(records: &[(String, String, String)], w: usize, lines: usize, key: bool) -> Vec<u32> {
    let mut seen = vec![0u32; lines];
    let expected_key = if key { format!("w{w}") } else { "-".into() };
    for (topic, k, value) in records.iter().filter(|r| r.0 == format!("logs.w{w}")) {
        let (writer, seq) = ids(value.as_bytes());
        assert_eq!((writer, topic, k, value), (w, topic, &expected_key, &line(w, seq)));
        seen[seq] += 1;
    }
    seen
}

/// How many of `copies` are 0, 1 and more.
fn tally(copies: &[u32]) -> [usize; 3] {
    let mut t = [0; 3];
    copies.iter().for_each(|&n| t[(n as usize).min(2)] += 1);
    t
}

/// The receiver's counters are published every 250 ms: waits until `name` of output `kafka`
/// reaches `value`, then returns it.
fn kafka_metric(rm: u16, name: &str, value: f64) -> f64 {
    let at = || metric_at(rm, name, &[("output", "kafka")]);
    wait_for(&format!("{name} published"), Duration::from_secs(10), || at() >= value);
    at()
}

/// A million lines of two streams (and a third the Kafka output does not take) from a real
/// shipper through a real receiver to the broker: read back by kafka-python, each line is in
/// its stream's topic exactly once, keyed by its stream, and the topics are exactly those.
#[test]
fn a_million_lines_reach_their_streams_topics_exactly_once() {
    const PER_WRITER: usize = 500_000;
    const OTHER: usize = 1000;
    let env = Env::new();
    let broker = Broker::start(&env.path("broker"), free_port());
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let keys = "topic = \"logs.{stream}\"\nkey = \"stream\"\ncompression = \"zstd\"\n\
                streams = [\"w0\", \"w1\"]\n";
    let receiver = kafka_receiver(&env, (port, rm), true, &broker.addr(), keys);
    let (mut shipper, pipe) = kafka_shipper(&env, port, sm, "");
    let started = Instant::now();
    write_lines(&pipe, &[0, 1], 0, PER_WRITER, None);
    write_lines(&pipe, &[2], 0, OTHER, None);
    let all = (2 * PER_WRITER + OTHER) as f64;
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(180), &mut || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= all
    });
    eprintln!("{all} lines acknowledged in {:?}", started.elapsed());
    let got = consume(broker.port, &["logs.w0", "logs.w1"], &env.path("got"), LIMIT);
    eprintln!("read back in {:?}", started.elapsed());
    assert_eq!(got.topics, ["logs.w0", "logs.w1"], "one topic per stream taken, no other");
    for w in [0, 1] {
        let seen = copies(&got.records, w, PER_WRITER, true);
        assert_eq!(tally(&seen), [0, PER_WRITER, 0], "w{w}: every line exactly once");
    }
    assert_eq!(got.records.len(), 2 * PER_WRITER);
    let records = kafka_metric(rm, "shipper_receiver_output_records_total", 1e6);
    assert_eq!(records, (2 * PER_WRITER) as f64);
    assert_eq!(metric_at(rm, "shipper_receiver_output_errors_total", &[]), 0.0);
    assert_eq!(metric_at(rm, "shipper_receiver_output_up", &[("output", "kafka")]), 2.0);
    let refused = "shipper_receiver_kafka_records_refused_total";
    assert_eq!(metric_at(rm, refused, &[]), 0.0);
    let files = metric_at(rm, "shipper_receiver_output_records_total", &[("output", "files")]);
    assert_eq!(files, all, "the files output beside it took every stream");
    assert_eq!(receiver.metric("shipper_receiver_frames_rejected_total", &[]), 0.0);
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// How long the consumer may take to read the topics back.
const LIMIT: Duration = Duration::from_secs(120);

/// The broker killed mid-stream and started again (empty: it keeps records in memory only):
/// while it is down the receiver acknowledges nothing and the shipper's lines wait, none
/// dropped; afterwards every line is in the topic. What the first broker held is read just
/// before it is killed, with the receiver stopped (SIGSTOP) so that it acknowledges nothing in
/// between: every line acknowledged by then must be there (a broker that keeps its records
/// would simply still hold them), and the rest must reach the second broker.
#[test]
fn a_broker_killed_mid_stream_loses_nothing_acknowledged() {
    const LINES: usize = 200_000;
    let env = Env::new();
    let (dir, kport) = (env.path("broker"), free_port());
    let mut broker = Broker::start(&dir, kport);
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let keys = "topic = \"logs.{stream}\"\ntimeout_ms = 2000\n";
    let mut receiver = kafka_receiver(&env, (port, rm), false, &broker.addr(), keys);
    let (mut shipper, pipe) = kafka_shipper(&env, port, sm, "");
    let pace = Some(Duration::from_millis(25));
    let writer = std::thread::spawn(move || write_lines(&pipe, &[0], 0, LINES, pace));
    let produced = || metric_at(rm, "shipper_receiver_output_records_total", &[]);
    receiver.wait_alive("a fifth of the lines produced", || produced() >= (LINES / 5) as f64);
    let errors = || metric_at(rm, "shipper_receiver_output_errors_total", &[]);
    // Syncs may have failed already (the first records of a new topic wait for it to exist).
    let errors_before = errors();
    receiver.signal(libc::SIGSTOP);
    let first = consume(kport, &["logs.w0"], &env.path("first"), LIMIT);
    // Read with the receiver still stopped: every acknowledgement counted was sent before.
    let acked = || metric_at(sm, "shipper_records_acked_total", &[]);
    let acked_before_kill = acked();
    broker.kill();
    receiver.signal(libc::SIGCONT);
    wait_for("syncs failing while the broker is down", Duration::from_secs(30), || {
        errors() >= errors_before + 2.0
    });
    // A frame committed before the stop whose ACK was lost with its connection may be
    // acknowledged again now (a duplicate, not written again): count what the output took.
    let taken_down = produced();
    let more = errors_before + 5.0;
    wait_for("more syncs failing", Duration::from_secs(30), || errors() >= more);
    assert_eq!(produced(), taken_down, "no frame written while the broker is down");
    let acked_down = acked();
    assert!(acked_down < LINES as f64, "the outage is mid-stream: {acked_down} acked");
    let up = metric_at(rm, "shipper_receiver_output_up", &[("output", "kafka")]);
    assert!(up < 2.0, "a shard that synced since is down: {up}");
    let broker = Broker::start(&dir, kport);
    writer.join().unwrap();
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(120), &mut || {
        acked() >= LINES as f64
    });
    let second = consume(kport, &["logs.w0"], &env.path("second"), LIMIT);
    let (a, b) =
        (copies(&first.records, 0, LINES, false), copies(&second.records, 0, LINES, false));
    assert_eq!(tally(&a)[2], 0, "the first broker got each line at most once");
    let held = tally(&a)[1];
    assert!(held as f64 >= acked_before_kill, "{held} held, {acked_before_kill} acknowledged");
    let both: Vec<u32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let [missing, once, more] = tally(&both);
    assert_eq!(missing, 0, "lines lost ({once} once, {more} more than once)");
    eprintln!("{held} lines in the first broker, {more} lines twice (produced, not acknowledged)");
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0, "lines waited");
    assert!(shipper.metric("shipper_receiver_frames_resent_total", &[]) >= 1.0, "resent");
    drop(broker);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// A stream whose topic would not be a Kafka topic name (a space): its frame is refused
/// (REJECT) before anything of it is produced, counted, and kept in the shipper's quarantine;
/// the files output beside it took nothing of it back; the lines behind it flow.
#[test]
fn a_frame_with_an_invalid_topic_is_refused_and_the_rest_goes_on() {
    const BAD: usize = 20;
    const GOOD: usize = 1000;
    let env = Env::new();
    let broker = Broker::start(&env.path("broker"), free_port());
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver =
        kafka_receiver(&env, (port, rm), true, &broker.addr(), "topic = \"logs.{stream}\"");
    let qdir = env.path("quarantine");
    let (mut shipper, pipe) =
        kafka_shipper(&env, port, sm, &format!("[quarantine]\ndirectory = {qdir:?}\n"));
    let mut f = open_writer(&pipe);
    for n in 0..BAD {
        writeln!(f, "{{\"service\":\"bad key\",\"n\":{n}}}").unwrap();
    }
    shipper.wait_alive("the refused lines in the quarantine", || {
        metric_at(sm, "shipper_quarantine_records_total", &[]) >= BAD as f64
    });
    write_lines(&pipe, &[0], 0, GOOD, None);
    shipper.wait_alive("the lines behind acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= GOOD as f64
    });
    assert_eq!(metric_at(sm, "shipper_quarantine_records_total", &[]), BAD as f64);
    let got = consume(broker.port, &["logs.w0"], &env.path("got"), LIMIT);
    assert_eq!(got.topics, ["logs.w0"]);
    assert_eq!(tally(&copies(&got.records, 0, GOOD, false)), [0, GOOD, 0]);
    let refused = "shipper_receiver_kafka_records_refused_total";
    let at = |reason| metric_at(rm, refused, &[("output", "kafka"), ("reason", reason)]);
    wait_for("the refusals published", Duration::from_secs(10), || at("topic") >= BAD as f64);
    assert_eq!((at("topic"), at("size")), (BAD as f64, 0.0));
    assert_eq!(receiver.metric("shipper_receiver_records_rejected_total", &[]), BAD as f64);
    let streams: Vec<String> = output_lines(&env.out()).into_iter().map(|(s, _)| s).collect();
    assert!(streams.iter().all(|s| s == "w0"), "the files output cut the refused frame back");
    assert_eq!((streams.len(), got.records.len()), (GOOD, GOOD));
    assert!(shipper.stop(Duration::from_secs(30)).success());
}
