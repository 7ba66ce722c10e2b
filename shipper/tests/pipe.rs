use std::io::{BufWriter, Write};
use std::time::Duration;

use crate::harness::*;

pub fn line(writer: usize, seq: usize) -> String {
    format!(
        r#"{{"ts":"2026-11-21T00:00:00Z","level":"info","service":"w{writer}","seq":{seq},"msg":"request served","http":{{"status":200,"path":"/a/b?c={seq}"}}}}"#
    )
}

/// Parses (writer, seq) back out of a line made by [`line`].
pub fn ids(l: &[u8]) -> (usize, usize) {
    let s = std::str::from_utf8(l).unwrap();
    let w = s.split("\"service\":\"w").nth(1).unwrap().split('"').next().unwrap();
    let q = s.split("\"seq\":").nth(1).unwrap().split(',').next().unwrap();
    (w.parse().unwrap(), q.parse().unwrap())
}

/// How many times each line of each writer (`written[w]` lines of writer `w`, made by
/// [`line`]) is among `lines` (as [`output_lines`] gives them); fails on a line changed or
/// never written.
pub fn arrived_among<'a>(
    lines: impl Iterator<Item = &'a (String, Vec<u8>)>,
    written: &[usize],
) -> Vec<Vec<u32>> {
    let mut seen: Vec<Vec<u32>> = written.iter().map(|&n| vec![0u32; n]).collect();
    for (_, l) in lines {
        let (w, seq) = ids(l);
        assert_eq!(l, line(w, seq).as_bytes(), "a line arrived changed");
        let count = seen.get_mut(w).and_then(|s| s.get_mut(seq));
        *count.unwrap_or_else(|| panic!("writer {w} line {seq} was never written")) += 1;
    }
    seen
}

/// [`arrived_among`] the receiver's output under `out`.
pub fn arrived(out: &std::path::Path, written: &[usize]) -> Vec<Vec<u32>> {
    arrived_among(output_lines(out).iter(), written)
}

/// Fails unless every line of every writer arrived exactly once (the first ten that did
/// not, per writer, with their copies).
pub fn assert_each_once(seen: &[Vec<u32>]) {
    for (w, counts) in seen.iter().enumerate() {
        let wrong: Vec<_> = counts.iter().enumerate().filter(|(_, &c)| c != 1).take(10).collect();
        assert!(wrong.is_empty(), "writer {w}: (line, copies) not once: {wrong:?}");
    }
}

#[test]
fn million_lines_from_four_writers_arrive_once_byte_identical() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 250_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let mut pipes = String::new();
    for w in 0..WRITERS {
        let p = env.path(&format!("p{w}.pipe"));
        pipes += &format!("[[sources.pipe]]\npath = {p:?}\nmode = \"0600\"\n");
    }
    let mut shipper = start_shipper(&env, port, sm, &pipes);
    for w in 0..WRITERS {
        let meta = std::fs::metadata(env.path(&format!("p{w}.pipe"))).unwrap();
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        // The buffer was raised to pipe_bytes (default 1 MiB); a writer sees the same pipe.
        let w = open_writer(&env.path(&format!("p{w}.pipe")));
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own.
        assert_eq!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) }, 1 << 20);
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let path = env.path(&format!("p{w}.pipe"));
            std::thread::spawn(move || {
                let mut out = BufWriter::with_capacity(64 << 10, open_writer(&path));
                for seq in 0..PER_WRITER {
                    out.write_all(line(w, seq).as_bytes()).unwrap();
                    out.write_all(b"\n").unwrap();
                }
                out.flush().unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let total = (WRITERS * PER_WRITER) as f64;
    shipper.wait_alive_for("all lines acknowledged", Duration::from_secs(180), &mut || {
        crate::harness::metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) >= total
    });
    let lines = output_lines(&env.out());
    assert_eq!(lines.len(), WRITERS * PER_WRITER, "output line count");
    let mut seen = vec![vec![false; PER_WRITER]; WRITERS];
    for (stream, l) in &lines {
        let (w, seq) = ids(l);
        assert_eq!(stream, &format!("w{w}"), "stream of writer {w}");
        assert_eq!(l.as_slice(), line(w, seq).as_bytes(), "bytes of line {w}/{seq}");
        assert!(!seen[w][seq], "line {w}/{seq} written twice");
        seen[w][seq] = true;
    }
    assert_eq!(shipper.metric("shipper_source_lines_read_total", &[]), total);
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());
}

/// With nothing in flight, a line is sealed once its pipe has nothing more ready (and the
/// default `idle_seal_delay_ms`, 2 ms, has passed), not when `flush_interval_ms` (here a
/// minute) runs out; with `seal_when_idle = false` it waits (here until the shipper stops).
#[test]
fn a_lone_line_is_sealed_once_its_pipe_is_drained_not_at_the_flush_interval() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let body = |pipe: &str, idle: bool| idle_body(&env, pipe, &format!("seal_when_idle = {idle}"));
    let mut shipper = start_shipper(&env, port, sm, &body("idle.pipe", true));
    let mut w = open_writer(&env.path("idle.pipe"));
    for i in 0..3 {
        writeln!(w, "line {i}").unwrap();
        shipper
            .wait_alive("the line acknowledged", || shipper_records_acked(sm) == f64::from(i + 1));
    }
    assert_eq!(sealed_by_reason(&scrape_ok(sm)), [0.0, 0.0, 3.0, 0.0]);
    drop(w);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());

    let mut shipper = start_shipper(&env, port, sm, &body("waits.pipe", false));
    let mut w = open_writer(&env.path("waits.pipe"));
    writeln!(w, "line 3").unwrap();
    shipper.wait_alive("the line read", || {
        crate::harness::metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) == 1.0
    });
    let text = scrape_ok(sm);
    assert_eq!(crate::harness::metric(&text, "shipper_source_lines_read_total", &[]), 1.0);
    assert_eq!(crate::harness::metric(&text, "shipper_batches_sealed_total", &[]), 0.0);
    assert_eq!(crate::harness::metric(&text, "shipper_records_acked_total", &[]), 0.0);
    drop(w);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());
    let mut lines: Vec<_> = output_lines(&env.out()).into_iter().map(|(_, l)| l).collect();
    lines.sort();
    assert_eq!(lines, ["line 0", "line 1", "line 2", "line 3"].map(|l| l.as_bytes().to_vec()));
}

fn shipper_records_acked(metrics: u16) -> f64 {
    metric_at(metrics, "shipper_records_acked_total", &[])
}

/// A pipe `pipe` whose batches only an idle seal seals (`flush_interval_ms` a minute), with
/// `batch` (a `[batch]` key) besides.
fn idle_body(env: &Env, pipe: &str, batch: &str) -> String {
    let p = env.path(pipe);
    format!(
        "[[sources.pipe]]\npath = {p:?}\nservice = \"app\"\n\
         [batch]\nflush_interval_ms = 60000\n{batch}\n"
    )
}

/// [`idle_body`] with `idle_seal_delay_ms = delay_ms`.
fn idle_floor_body(env: &Env, pipe: &str, delay_ms: u64) -> String {
    idle_body(env, pipe, &format!("idle_seal_delay_ms = {delay_ms}"))
}

/// `shipper_batches_sealed_total` by reason: full, interval, idle, shutdown.
fn sealed_by_reason(text: &str) -> [f64; 4] {
    ["full", "interval", "idle", "shutdown"]
        .map(|r| crate::harness::metric(text, "shipper_batches_sealed_total", &[("reason", r)]))
}

/// `shipper_read_to_ack_latency_seconds`: (count, exact sum, max), in seconds.
fn read_to_ack(text: &str) -> (f64, f64, f64) {
    let name = "shipper_read_to_ack_latency_seconds";
    let m = |n: &str, l: &[(&str, &str)]| crate::harness::metric(text, n, l);
    (
        m(&format!("{name}_count"), &[]),
        m(&format!("{name}_sum"), &[]),
        m(name, &[("quantile", "1")]),
    )
}

/// Five lines written one at a time, each read (a drained pipe, nothing in flight: an idle
/// moment) before the next: with `idle_seal_delay_ms = 0` each is a frame of its own; with a
/// floor of 5 s they wait in one batch until the first is 5 s old, then the idle-seal timer
/// seals them into one frame, acknowledged no sooner.
#[test]
fn an_idle_batch_waits_for_its_floor_and_takes_every_line_read_meanwhile() {
    const FLOOR_MS: u64 = 5000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let acked = |n: usize| move || shipper_records_acked(sm) == n as f64;
    let read = |n: usize| {
        move || {
            crate::harness::metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[])
                == n as f64
        }
    };
    let mut shipper = start_shipper(&env, port, sm, &idle_floor_body(&env, "zero.pipe", 0));
    let mut w = open_writer(&env.path("zero.pipe"));
    for i in 0..5 {
        writeln!(w, "zero {i}").unwrap();
        shipper.wait_alive("the line acknowledged", acked(i + 1));
    }
    let text = scrape_ok(sm);
    assert_eq!(sealed_by_reason(&text), [0.0, 0.0, 5.0, 0.0]);
    assert_eq!(crate::harness::metric(&text, "shipper_frames_acked_total", &[]), 5.0);
    drop(w);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());

    let mut shipper = start_shipper(&env, port, sm, &idle_floor_body(&env, "floor.pipe", FLOOR_MS));
    let mut w = open_writer(&env.path("floor.pipe"));
    let first = std::time::Instant::now();
    for i in 0..5 {
        writeln!(w, "floor {i}").unwrap();
        shipper.wait_alive("the line read", read(i + 1));
    }
    let text = scrape_ok(sm);
    let early = first.elapsed();
    assert!(early < Duration::from_millis(FLOOR_MS), "five lines took {early:?} to be read");
    assert_eq!(sealed_by_reason(&text), [0.0; 4], "sealed before the floor ({early:?})");
    shipper.wait_alive("the batch acknowledged", acked(5));
    let waited = first.elapsed().as_secs_f64();
    let text = scrape_ok(sm);
    assert_eq!(sealed_by_reason(&text), [0.0, 0.0, 1.0, 0.0]);
    assert_eq!(crate::harness::metric(&text, "shipper_frames_acked_total", &[]), 1.0);
    // Its first line was read after `first` and acknowledged before `waited`.
    let (count, sum, _) = read_to_ack(&text);
    assert_eq!(count, 1.0);
    assert!((FLOOR_MS as f64 / 1000.0..=waited).contains(&sum), "{sum} s, waited {waited} s");
    drop(w);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());
    let mut lines: Vec<_> = output_lines(&env.out()).into_iter().map(|(_, l)| l).collect();
    lines.sort();
    let want: Vec<String> =
        ["floor", "zero"].iter().flat_map(|k| (0..5).map(move |i| format!("{k} {i}"))).collect();
    assert_eq!(lines, want.iter().map(|l| l.as_bytes().to_vec()).collect::<Vec<_>>());
}

/// At a steady slow rate (200 lines/s: with no floor, nearly every line a frame of its own),
/// a 100 ms floor: batches do not overlap in time and each spans at least the floor, so there
/// are at most one per 100 ms of the run; every frame's first line waited at least the floor
/// and at most the floor and a margin (not `flush_interval_ms`, a minute); every line once.
#[test]
fn at_a_steady_slow_rate_the_idle_floor_bounds_frames_and_latency() {
    const FLOOR_MS: u64 = 100;
    const MARGIN_MS: u64 = 900;
    const LINES: usize = 300;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let mut shipper = start_shipper(&env, port, sm, &idle_floor_body(&env, "app.pipe", FLOOR_MS));
    let start = std::time::Instant::now();
    let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 200);
    shipper.wait_alive("the lines written", || writer.written() >= LINES);
    let (written, _) = writer.finish();
    shipper.wait_alive("every line acknowledged", || shipper_records_acked(sm) == written as f64);
    let span_ms = start.elapsed().as_millis() as u64;
    let text = scrape_ok(sm);
    let [full, interval, idle, shutdown] = sealed_by_reason(&text);
    assert_eq!([full, interval, shutdown], [0.0; 3]);
    let most = (span_ms / FLOOR_MS) as f64;
    assert!((1.0..=most).contains(&idle), "{idle} idle seals in {span_ms} ms, {written} lines");
    assert_eq!(crate::harness::metric(&text, "shipper_frames_acked_total", &[]), idle);
    let (count, sum, max) = read_to_ack(&text);
    assert_eq!(count, idle);
    let floor_s = FLOOR_MS as f64 / 1000.0;
    assert!(sum >= count * floor_s, "{count} frames, {sum} s in all: one sealed before the floor");
    let bound = (FLOOR_MS + MARGIN_MS) as f64 / 1000.0;
    assert!(max <= bound, "read->ack max {max} s above the floor and a margin ({bound} s)");
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());
    assert_eq!(copies(&[&env.out()], 0, written), vec![1; written], "each line once");
}
