use std::io::Write;
use std::time::{Duration, Instant};

use crate::harness::*;

/// SIGTERM seals the open batch (here far from its flush interval, and not sealed when idle),
/// waits for its ack, exits 0.
#[test]
fn sigterm_flushes_the_open_batch_and_exits_zero() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n[batch]\nflush_interval_ms = 60000\n\
         seal_when_idle = false\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    let mut w = open_writer(&pipe);
    for n in 0..1000 {
        writeln!(w, r#"{{"service":"app","n":{n}}}"#).unwrap();
    }
    shipper.wait_alive("1000 lines read", || {
        metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) == 1000.0
    });
    assert_eq!(output_lines(&env.out()).len(), 0, "nothing flushed before the signal");
    let status = shipper.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", shipper.log_text());
    let lines = output_lines(&env.out());
    assert_eq!(lines.len(), 1000);
    assert!(shipper.log_text().contains("everything acknowledged"), "{}", shipper.log_text());
}

/// With no receiver at all, the pipe is still drained: the writer never blocks, and what does
/// not fit the outbox is dropped and counted per service with reason `outbox_full`.
#[test]
fn no_receiver_never_blocks_the_writer_and_counts_drops() {
    const LINES: usize = 200_000;
    let env = Env::new();
    let (port, sm) = (free_port(), free_port());
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\npipe_bytes = 65536\n[batch]\nbatch_events_max = 1000\n"
    );
    // Nothing listens on `port`; the smallest outbox makes the overflow come early.
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\noutbox_bytes_max = 65536");
    let path = env.write("edge.toml", &cfg);
    let log = env.path("shipper.log");
    let mut shipper = Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, log);
    // One unbuffered write() per line, as an application logging into a FIFO does: the time
    // of each is what the writer would wait on the shipper.
    let mut w = open_writer(&pipe);
    realtime();
    let started = Instant::now();
    let mut longest = Duration::ZERO;
    for n in 0..LINES {
        let line = format!("{{\"service\":\"app\",\"n\":{n},\"pad\":\"{}\"}}\n", ".".repeat(32));
        let t = Instant::now();
        w.write_all(line.as_bytes()).unwrap();
        longest = longest.max(t.elapsed());
    }
    let writing = started.elapsed();
    shipper.wait_alive("every line read", || {
        metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) == LINES as f64
    });
    let text = scrape(sm).unwrap();
    let dropped = metric(
        &text,
        "shipper_lines_dropped_total",
        &[("service", "app"), ("reason", "outbox_full")],
    );
    let held = metric(&text, "shipper_outbox_records", &[]);
    assert!(dropped > 0.0, "the outbox of 64 KiB cannot hold {LINES} lines");
    assert_eq!(
        dropped + held,
        LINES as f64,
        "every line is either held or counted as dropped:\n{text}"
    );
    assert_eq!(metric(&text, "shipper_records_acked_total", &[]), 0.0);
    assert!(writing < Duration::from_secs(30), "writing took {writing:?}");
    eprintln!("longest single write: {longest:?} over {LINES} lines in {writing:?}");
    // A writer the shipper blocked would wait for good; the tight figure (the writer's longest
    // write() at full speed) is the perf suite's to measure, on an idle machine.
    assert!(longest < Duration::from_secs(1), "a write() took {longest:?}");
    shipper.kill();
}
