use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// Writes `n` JSON lines of `service`, each with `fill` bytes of padding that zstd cannot
/// shrink much (so that frames fill the outbox and the buffer as their size says).
fn lines(w: &mut impl Write, service: &str, n: usize, fill: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        let pad: String = (0..fill)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b"0123456789abcdef"[(x & 15) as usize])
            })
            .collect();
        writeln!(w, r#"{{"service":"{service}","n":{i},"pad":"{pad}"}}"#).unwrap();
    }
}

/// A shipper reading `pipe` (lines cut at 1 KiB; service `limited` at 1 line/s, burst 5)
/// with a 64 KiB outbox, a 256 KiB disk buffer and a 3 s shutdown deadline.
fn start_with_small_buffer(env: &Env, port: u16, sm: u16, pipe: &Path) -> Proc {
    let buffer = env.path("buffer");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\nworker = 0\nline_bytes_max = 1024\n\
         [ratelimit.services.limited]\nrate = 1\nburst = 5\n\
         [batch]\nflush_interval_ms = 20\nbatch_bytes_max = 16384\n\
         [buffer]\ndirectory = {buffer:?}\nsegment_bytes = 65536\nbytes_max = 262144\n"
    );
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\noutbox_bytes_max = 65536")
        .replace("shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 3000");
    let cfg = env.write("edge.toml", &cfg);
    let log = env.path("shipper.log");
    Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, log)
}

/// Every record a pipe hands over is settled exactly once: delivered (truncated and
/// unparsed lines included), dropped by the rate limit or a full buffer, buffered, or held;
/// the sum holds at rest and at exit, and a partial line at stop is handed over, not lost.
#[test]
fn every_record_of_a_pipe_is_accounted_for_at_rest_and_at_exit() {
    // Regression: a partial line held in the pipe's line splitter at stop vanished without a
    // counter, and no figure said where the records of a source went.
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let mut receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let mut shipper = start_with_small_buffer(&env, port, sm, &pipe);
    let mut w = open_writer(&pipe);
    // Phase 1, receiver up: plain, over-long, unparsable, empty and rate-limited lines.
    lines(&mut w, "app", 100, 10);
    writeln!(w, r#"{{"service":"app","long":"{}"}}"#, "y".repeat(5000)).unwrap();
    for i in 0..3 {
        writeln!(w, "not json {i}").unwrap();
    }
    writeln!(w).unwrap();
    writeln!(w).unwrap();
    lines(&mut w, "limited", 50, 10);
    let read = |name| metric_at(sm, name, &[("source", pipe.to_str().unwrap())]) as u64;
    shipper.wait_alive("every line read and settled", || {
        read("shipper_source_lines_read_total") == 156 && scraped_ledger(sm, &pipe)["held"] == 0
    });
    let at_rest = scraped_ledger(sm, &pipe);
    let ratelimited = metric_at(sm, "shipper_lines_dropped_total", &[("reason", "ratelimit")]);
    assert_eq!(at_rest["handed"], 154, "156 lines read, 2 of them empty");
    assert_eq!(at_rest["ratelimit"], ratelimited as u64);
    assert!((5..50).contains(&at_rest["ratelimit"]), "the limit dropped some, not all");
    let delivered = output_lines(&env.out()).len() as u64;
    assert_eq!(at_rest["delivered"], delivered);
    assert_eq!(at_rest["delivered"] + at_rest["ratelimit"], 154);
    assert_eq!(
        (read("shipper_source_lines_truncated_total"), read("shipper_source_lines_empty_total")),
        (1, 2)
    );
    // The three lines that are not JSON, and the over-long one, cut mid-object.
    assert_eq!(metric_at(sm, "shipper_source_parse_failures_total", &[]), 4.0);
    let status = std::process::Command::new(BIN)
        .args(["status", "--metrics", &format!("127.0.0.1:{sm}")])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{table}");
    let row = table.lines().find(|l| l.contains(pipe.to_str().unwrap())).expect("the pipe's row");
    assert!(row.starts_with("0 ") && row.ends_with(" ok"), "{row}");

    // Phase 2, receiver down: the outbox fills, then the buffer, then drops.
    assert!(receiver.stop(Duration::from_secs(20)).success());
    lines(&mut w, "app", 4000, 200);
    shipper.wait_alive("the buffer full", || {
        read("shipper_source_lines_read_total") == 4156
            && scraped_ledger(sm, &pipe)["buffer_full"] > 0
    });
    // Phase 3: a partial line, then stop with the receiver still down (read before or at the
    // stop, when the FIFO is drained).
    write!(w, "{{\"service\":\"app\",\"tail\":true}}").unwrap();
    w.flush().unwrap();
    let before_stop = scraped_ledger(sm, &pipe);
    assert!(shipper.stop(Duration::from_secs(30)).success());
    let log = shipper.log_text();
    let at_exit = exit_ledger(&log, &pipe);
    assert_eq!(at_exit["handed"], 4154 + 1, "the partial line handed over at stop:\n{log}");
    assert_eq!(at_exit["held"], 0, "{log}");
    let settled: u64 =
        at_exit.iter().filter(|(k, _)| *k != "handed" && *k != "held").map(|(_, n)| n).sum();
    assert_eq!(settled, at_exit["handed"], "{at_exit:?}");
    assert_eq!(at_exit["delivered"], delivered, "nothing delivered while the receiver was down");
    assert_eq!(at_exit["ratelimit"], at_rest["ratelimit"]);
    assert!(at_exit["buffer_full"] >= before_stop["buffer_full"]);
    assert!(at_exit["buffered"] > 0, "{at_exit:?}");
}

/// Without a disk buffer, a receiver that never answers: records are dropped because the
/// outbox is full, and those still in it at the shutdown deadline are dropped for `shutdown`;
/// the two add up to every record handed over.
#[test]
fn without_a_buffer_every_record_is_dropped_for_its_own_reason_and_counted() {
    let env = Env::new();
    let (port, sm) = (free_port(), free_port());
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\nworker = 0\n\
         [batch]\nflush_interval_ms = 20\nbatch_bytes_max = 16384\n"
    );
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\noutbox_bytes_max = 65536")
        .replace("shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 500");
    let cfg = env.write("edge.toml", &cfg);
    let log = env.path("shipper.log");
    let mut shipper = Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, log);
    let mut w = open_writer(&pipe);
    lines(&mut w, "app", 2000, 200);
    let read = || metric_at(sm, "shipper_source_lines_read_total", &[]) as u64;
    shipper.wait_alive("every line read", || read() == 2000);
    let at_rest = scraped_ledger(sm, &pipe);
    assert!(at_rest["outbox_full"] > 0 && at_rest["held"] > 0, "{at_rest:?}");
    assert_eq!(at_rest["outbox_full"] + at_rest["held"], 2000, "{at_rest:?}");
    assert!(shipper.stop(Duration::from_secs(30)).success());
    let log = shipper.log_text();
    let at_exit = exit_ledger(&log, &pipe);
    assert_eq!(at_exit["handed"], 2000);
    assert_eq!(at_exit["held"], 0, "{log}");
    assert_eq!(at_exit["outbox_full"], at_rest["outbox_full"]);
    assert_eq!(at_exit["shutdown"], at_rest["held"], "{at_exit:?}");
}

/// The text of `[name]` in examples/edge.toml, from its header to the next one.
fn example_section(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/edge.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let header = format!("[{name}]\n");
    let start = text.find(&header).unwrap_or_else(|| panic!("no [{name}] in {path}"));
    let rest = &text[start + header.len()..];
    let end = rest.find("\n[").map_or(rest.len(), |i| i + 1);
    format!("{header}{}", &rest[..end])
}

/// Stops and continues `pid` until dropped: it runs `on` of every `on + off`, as a receiver
/// that cannot keep up does.
struct Throttle(std::sync::Arc<std::sync::atomic::AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Throttle {
    fn start(pid: u32, on: Duration, off: Duration) -> Throttle {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        // SAFETY: kill(2) has no memory preconditions.
        let signal = move |sig| unsafe { libc::kill(pid as i32, sig) };
        let handle = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                signal(libc::SIGSTOP);
                std::thread::sleep(off); // the duty cycle itself, not a wait for a condition
                signal(libc::SIGCONT);
                std::thread::sleep(on);
            }
        });
        Throttle(stop, Some(handle))
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            h.join().unwrap();
        }
    }
}

/// Issue 15: a shipper that outruns its receiver, with the example configuration's batch,
/// receivers and buffer settings, drops nothing while its disk buffer has room: what does not
/// fit the outbox goes to disk and follows, and every line arrives once.
#[test]
fn outrunning_the_receiver_with_the_example_settings_drops_nothing() {
    const LINES: usize = 200_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let buffer = example_section("buffer")
        .replace("\"/var/lib/shipper/buffer\"", &format!("{:?}", env.path("buffer")));
    assert!(buffer.contains("shipper-test-"), "the example's buffer directory moved: {buffer}");
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\n{}{buffer}", example_section("batch"));
    let receivers = "connections = 2\nack_timeout_ms = 5000";
    let example = example_section("receivers");
    assert!(example.contains(receivers), "the example's [receivers] changed: {example}");
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("workers = 2", "workers = 1")
        .replace("ack_timeout_ms = 3000", receivers);
    let cfg = env.write("edge.toml", &cfg);
    let log = env.path("shipper.log");
    let mut shipper = Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, log);
    // Stopped 1.2 s at a time (under `write_timeout_ms` 2 s and `ack_timeout_ms` 5 s: never
    // declared down), the receiver takes less than the writer writes: the outbox (8 MiB) fills.
    let throttle = Throttle::start(receiver.child.id(), ms(150), ms(1200));
    lines(&mut open_writer(&pipe), "app", LINES, 300);
    let acked = || metric_at(sm, "shipper_records_acked_total", &[]) as usize;
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(120), &mut || {
        acked() == LINES
    });
    drop(throttle);
    let ledger = scraped_ledger(sm, &pipe);
    assert_eq!(metric_at(sm, "shipper_lines_dropped_total", &[]), 0.0, "{ledger:?}");
    assert!(ledger["buffered"] > 0, "the receiver was not outrun: {ledger:?}");
    let failures = metric_at(sm, "shipper_receiver_failures_total", &[]);
    assert_eq!(failures, 0.0, "slow, never down: no failover, no outage");
    assert_eq!(ledger["delivered"] + ledger["buffered"], LINES as u64, "{ledger:?}");
    let mut seen = vec![0u32; LINES];
    for (_, line) in output_lines(&env.out()) {
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        seen[v["n"].as_u64().unwrap() as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n == 1), "every line exactly once");
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
