use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::rng::XorShift64;

use crate::harness::*;
use crate::pipe::line;

const ON_DISK: &str = "shipper_buffer_records_written_total";
const ACKED: &str = "shipper_records_acked_total";

/// One worker (so order is checkable), one connection, small frames and segments, a disk
/// buffer under `buffer`; `extra` adds to `[buffer]`.
fn config(env: &Env, port: u16, metrics: u16, buffer: &Path, extra: &str) -> PathBuf {
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n\
         [batch]\nflush_interval_ms = 20\nbatch_bytes_max = 16384\n\
         [buffer]\ndirectory = {buffer:?}\nsegment_bytes = 65536\n{extra}\n"
    );
    let cfg = env
        .shipper_toml(port, metrics, &body)
        .replace("workers = 2", "workers = 1")
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\nconnections = 1");
    env.write("edge.toml", &cfg)
}

fn run(env: &Env, cfg: &Path, metrics: u16) -> Proc {
    let log = env.path(&format!("shipper-{}.log", free_port()));
    let mut p = Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], metrics, log);
    p.wait_alive("the receiver seen down", || {
        metric_at(metrics, "shipper_receiver_failures_total", &[]) >= 1.0
    });
    p
}

/// How many times each line of writer 0 was delivered, each at most once.
fn seen_once(out: &Path, written: usize) -> Vec<u32> {
    let seen = copies(&[out], 0, written);
    assert!(seen.iter().all(|&n| n <= 1), "a line was delivered twice");
    seen
}

/// How many lines of writer 0 were delivered (each at most once).
fn delivered(out: &Path, written: usize) -> usize {
    seen_once(out, written).iter().filter(|&&n| n == 1).count()
}

/// [`delivered`], where what arrived must be a prefix of what was written (the buffer keeps
/// order and a crash loses only a tail).
fn delivered_prefix(out: &Path, written: usize) -> usize {
    let seen = seen_once(out, written);
    let k = seen.iter().take_while(|&&n| n == 1).count();
    assert!(seen[k..].iter().all(|&n| n == 0), "lines missing in the middle (first gap at {k})");
    k
}

/// Output lines of writer 0 are in the order written.
fn assert_in_order(out: &Path) {
    let seqs: Vec<usize> = output_lines(out).iter().map(|(_, l)| crate::pipe::ids(l).1).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "lines out of order");
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("core-0"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    v.sort();
    v
}

fn dropped(metrics: u16, reason: &str) -> f64 {
    metric_at(metrics, "shipper_lines_dropped_total", &[("reason", reason)])
}

/// Every receiver down: frames go to the disk buffer; when the receiver comes up they are
/// replayed in order, each line once, and the segments are deleted. The application's
/// blocking writes never stall meanwhile.
#[test]
fn an_outage_is_buffered_on_disk_and_replayed_in_order() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let mut shipper = run(&env, &config(&env, port, sm, &dir, ""), sm);
    let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 20_000);
    shipper.wait_alive("40000 lines written", || writer.written() >= 40_000);
    let (lines, longest) = writer.finish();
    shipper.wait_alive("every line on disk", || metric_at(sm, ON_DISK, &[]) == lines as f64);
    assert!(segments(&dir).len() >= 3, "several segments: {:?}", segments(&dir));

    let _receiver = start_receiver(&env, port, rm, "");
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric_at(sm, ACKED, &[]) == lines as f64
    });
    assert_eq!(delivered_prefix(&env.out(), lines), lines);
    assert_in_order(&env.out());
    shipper.wait_alive("the replayed segments deleted", || segments(&dir).is_empty());
    assert_eq!(shipper.metric("shipper_buffer_damaged_total", &[]), 0.0);
    eprintln!("{lines} lines; longest write() {longest:?}");
    assert!(longest < Duration::from_millis(10), "a write() blocked for {longest:?}");
}

/// A buffer too small for the outage: exactly the overflow is dropped and counted (reason
/// `buffer_full`), and everything else arrives.
#[test]
fn a_buffer_too_small_drops_exactly_the_overflow() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let mut shipper = run(&env, &config(&env, port, sm, &dir, "bytes_max = 131072"), sm);
    let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 20_000);
    shipper.wait_alive("30000 lines written", || writer.written() >= 30_000);
    let (lines, longest) = writer.finish();
    shipper.wait_alive("every line on disk or dropped", || {
        metric_at(sm, ON_DISK, &[]) + dropped(sm, "buffer_full") == lines as f64
    });
    let lost = dropped(sm, "buffer_full") as usize;
    assert!(lost > 0 && lost < lines, "{lost} dropped");
    let _receiver = start_receiver(&env, port, rm, "");
    shipper
        .wait_alive("the rest acknowledged", || metric_at(sm, ACKED, &[]) == (lines - lost) as f64);
    assert_eq!(delivered(&env.out(), lines), lines - lost);
    assert!(longest < Duration::from_millis(10), "a write() blocked for {longest:?}");
}

// Guards the drop_oldest count off the worker's thread: an evicted segment's records per
// service come from the counts kept as it was written (no whole-segment read), its file is
// deleted through io_uring, and the drops are exact.
/// `when_full = drop_oldest` with a buffer too small for the outage: whole segments are
/// dropped and their records counted (`buffer_full`), and everything else arrives once.
#[test]
fn drop_oldest_counts_exactly_the_records_of_the_segments_it_drops() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let extra = "bytes_max = 131072\nwhen_full = \"drop_oldest\"";
    let mut shipper = run(&env, &config(&env, port, sm, &dir, extra), sm);
    let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 20_000);
    shipper.wait_alive("30000 lines written", || writer.written() >= 30_000);
    let (lines, longest) = writer.finish();
    // Every line sealed: segments are evicted only when a sealed frame does not fit, so none
    // is evicted once replay starts.
    shipper.wait_alive("every line sealed", || {
        metric_at(sm, "shipper_batch_records_sum", &[]) == lines as f64
    });
    assert!(metric_at(sm, "shipper_buffer_segments_dropped_total", &[]) >= 1.0);
    let _receiver = start_receiver(&env, port, rm, "");
    shipper.wait_alive_for(
        "every line acknowledged or dropped",
        Duration::from_secs(60),
        &mut || metric_at(sm, ACKED, &[]) + dropped(sm, "buffer_full") == lines as f64,
    );
    let lost = dropped(sm, "buffer_full") as usize;
    assert!(lost > 0 && lost < lines, "{lost} dropped");
    assert_eq!(delivered(&env.out(), lines), lines - lost);
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), lost as f64);
    shipper.wait_alive("the replayed segments deleted", || segments(&dir).is_empty());
    assert!(longest < Duration::from_millis(10), "a write() blocked for {longest:?}");
}

/// SIGTERM while the only receiver holds every frame unacknowledged (it is stopped, and
/// `ack_timeout_ms` is long, so it is never declared down): shortly before the shutdown
/// deadline the frames go to the disk buffer, and the next run delivers each line once.
#[test]
fn frames_unacknowledged_at_shutdown_go_to_the_buffer_for_the_next_run() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let cfg = config(&env, port, sm, &dir, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 60000")
        .replace("shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 2000");
    std::fs::write(&cfg, text).unwrap();
    let receiver = start_receiver(&env, port, rm, "");
    let start = |log: &str| {
        Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, env.path(log))
    };
    let mut shipper = start("first.log");
    shipper.wait_alive("the receiver up", || metric_at(sm, "shipper_receiver_healthy", &[]) == 1.0);
    receiver.signal(libc::SIGSTOP);
    let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 10_000);
    shipper.wait_alive("5000 lines written", || writer.written() >= 5_000);
    let (lines, _) = writer.finish();
    shipper.wait_alive("every line in memory, unacknowledged", || {
        metric_at(sm, "shipper_outbox_records", &[]) == lines as f64
    });
    assert_eq!(metric_at(sm, ON_DISK, &[]), 0.0, "nothing on disk before the shutdown");
    assert!(shipper.stop(Duration::from_secs(20)).success());
    let log = shipper.log_text();
    assert!(log.contains("go to the disk buffer for the next run"), "{log}");
    assert!(!log.contains("dropped"), "{log}");
    assert!(!segments(&dir).is_empty());
    // The stopped receiver never wrote anything; a new one takes its place at once (it waits
    // for the address, which the killed one's io_uring may hold for a moment).
    let mut receiver = receiver;
    receiver.kill();
    let _receiver = start_receiver(&env, port, rm, "");
    let mut shipper = start("second.log");
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric_at(sm, ACKED, &[]) == lines as f64
    });
    assert_eq!(delivered_prefix(&env.out(), lines), lines);
    assert_in_order(&env.out());
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
}

/// SIGKILL at seeded random moments while the receiver is down: everything that reached the
/// disk buffer is delivered after the restart, once and in order.
#[test]
fn sigkill_loses_nothing_that_reached_the_buffer() {
    for run_no in 0..3u64 {
        let seed = 0x5eed_0000 + run_no;
        let mut rng = XorShift64::new(seed);
        let kill_after = 2_000 + (rng.next() % 12_000) as usize;
        let env = Env::new();
        let (port, rm, sm) = (free_port(), free_port(), free_port());
        let dir = env.path("buffer");
        let cfg = config(&env, port, sm, &dir, "");
        let mut shipper = run(&env, &cfg, sm);
        let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 10_000);
        shipper.wait_alive("the kill moment", || writer.written() >= kill_after);
        let on_disk = metric_at(sm, ON_DISK, &[]) as usize;
        let (lines, longest) = writer.finish();
        shipper.kill();
        assert!(longest < Duration::from_millis(10), "a write() blocked for {longest:?}");

        let _receiver = start_receiver(&env, port, rm, "");
        let mut shipper = Proc::start(
            "shipper",
            &["run", "--config", cfg.to_str().unwrap()],
            sm,
            env.path("restarted.log"),
        );
        shipper.wait_alive("the buffer replayed", || {
            segments(&dir).is_empty() && metric_at(sm, "shipper_outbox_frames", &[]) == 0.0
        });
        let k = delivered_prefix(&env.out(), lines);
        assert!(k >= on_disk, "seed {seed:#x}: {k} delivered, {on_disk} were on disk");
        assert_in_order(&env.out());
        eprintln!("seed {seed:#x}: killed after {lines} lines, {on_disk} on disk, {k} delivered");
    }
}

/// A flipped byte in one segment and a torn tail in another: replay skips exactly the two
/// damaged frames, counts them, and delivers everything else.
#[test]
fn damaged_segments_are_skipped_and_counted_never_looped_on() {
    const LINES: usize = 60_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let cfg = config(&env, port, sm, &dir, "");
    let mut shipper = run(&env, &cfg, sm);
    let mut w = open_writer(&env.path("app.pipe"));
    for seq in 0..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("every line on disk", || metric_at(sm, ON_DISK, &[]) == LINES as f64);
    assert!(shipper.stop(Duration::from_secs(20)).success());
    let segs = segments(&dir);
    assert!(segs.len() >= 3, "{segs:?}");
    let mut second = std::fs::read(&segs[1]).unwrap();
    let middle = second.len() / 2;
    second[middle] ^= 0x01;
    std::fs::write(&segs[1], second).unwrap();
    let last = segs.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(len - 10).unwrap();

    let _receiver = start_receiver(&env, port, rm, "");
    let mut shipper = Proc::start(
        "shipper",
        &["run", "--config", cfg.to_str().unwrap()],
        sm,
        env.path("restarted.log"),
    );
    shipper.wait_alive("the buffer replayed", || {
        segments(&dir).is_empty() && metric_at(sm, "shipper_outbox_frames", &[]) == 0.0
    });
    shipper.wait_alive("both damaged spans counted", || {
        metric_at(sm, "shipper_buffer_damaged_total", &[]) == 2.0
    });
    let seen = copies(&[&env.out()], 0, LINES);
    assert!(seen.iter().all(|&n| n <= 1));
    let gaps = seen.windows(2).filter(|w| w[0] == 1 && w[1] == 0).count();
    assert_eq!(gaps, 2, "exactly two runs of lines missing");
    assert_eq!(seen[LINES - 1], 0, "the torn frame was the last");
    let log = shipper.log_text();
    assert!(log.contains("checksum") && log.contains("torn"), "{log}");
}

/// The disk under the buffer fills up (a 128 KiB tmpfs): writes fail with a clear error, the
/// frames that could not be written are dropped and counted (`buffer_error`), nothing
/// crashes, and what was written arrives.
#[test]
#[ignore = "needs root: mounts a 128 KiB tmpfs to fill the disk"]
fn a_full_disk_drops_and_counts_and_goes_on() {
    require_root("mounts a 128 KiB tmpfs to fill the disk");
    const LINES: usize = 40_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    std::fs::create_dir_all(&dir).unwrap();
    let _mount = Tmpfs::mount(&dir, "128k");
    let mut shipper = run(&env, &config(&env, port, sm, &dir, ""), sm);
    let mut w = open_writer(&env.path("app.pipe"));
    for seq in 0..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("every line on disk or dropped", || {
        metric_at(sm, ON_DISK, &[]) + dropped(sm, "buffer_error") == LINES as f64
    });
    let lost = dropped(sm, "buffer_error") as usize;
    assert!(lost > 0, "the disk filled up");
    assert!(shipper.log_text().contains("No space left on device"), "{}", shipper.log_text());
    // Each failed write was cut back, by the writer's helper thread (buffer/cut.rs).
    assert!(!shipper.log_text().contains("cannot cut"), "{}", shipper.log_text());
    let _receiver = start_receiver(&env, port, rm, "");
    shipper
        .wait_alive("the rest acknowledged", || metric_at(sm, ACKED, &[]) == (LINES - lost) as f64);
    assert_eq!(delivered(&env.out(), LINES), LINES - lost);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

// Guards against a frame the receiver wrote but had not acknowledged being written a second
// time when the next run sends it again from the disk buffer (it keeps its first identity).
/// A receiver that writes every frame and acknowledges none (test fault `hold-acks`; it
/// acknowledges frames that carry an origin): at SIGTERM the shipper writes them to its disk
/// buffer; the next run sends them again and the receiver finds every one written: each line
/// exactly once, every replayed frame a duplicate. With the same receiver process (a shipper
/// restart), and with a receiver restarted meanwhile (its windows recovered from its commit
/// log); the receiver has two shards, so a frame's origin may belong to the other one.
#[test]
fn frames_written_but_unacknowledged_are_not_written_again_after_a_spill() {
    spill_written_frames_then_replay(false);
    spill_written_frames_then_replay(true);
}

/// [`config`] for a receiver that holds its acks: the shipper waits for them (a minute),
/// keeps every frame in flight, and spills at a stop after 2 s.
fn config_holding(env: &Env, port: u16, sm: u16, dir: &Path) -> PathBuf {
    let cfg = config(env, port, sm, dir, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 60000\ninflight_frames_max = 1024")
        .replace("shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 2000");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn spill_written_frames_then_replay(restart_receiver: bool) {
    const LINES: usize = 3000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let cfg = config_holding(&env, port, sm, &dir);
    let mut receiver = start_receiver_holding_acks(&env, port, rm, "hold-acks");
    let start = |log: &str| {
        Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, env.path(log))
    };
    let mut shipper = start("first.log");
    shipper.wait_alive("the receiver up", || metric_at(sm, "shipper_receiver_healthy", &[]) == 1.0);
    let mut w = open_writer(&env.path("app.pipe"));
    for seq in 0..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    drop(w);
    shipper.wait_alive("every line written by the receiver, none acknowledged", || {
        metric_at(rm, "shipper_receiver_records_written_total", &[]) == LINES as f64
            && metric_at(sm, "shipper_outbox_records", &[]) == LINES as f64
    });
    let frames = metric_at(sm, "shipper_outbox_frames", &[]);
    assert!(frames > 1.0, "{frames} frames");
    assert_eq!(metric_at(rm, "shipper_receiver_frames_acked_total", &[]), 0.0);
    assert_eq!(delivered(&env.out(), LINES), LINES);
    assert!(shipper.stop(Duration::from_secs(20)).success());
    let log = shipper.log_text();
    assert!(log.contains("go to the disk buffer for the next run"), "{log}");
    assert!(!segments(&dir).is_empty());
    if restart_receiver {
        receiver.kill();
        receiver = start_receiver(&env, port, rm, "");
    }
    let mut shipper = start("second.log");
    shipper.wait_alive("every replayed line acknowledged", || {
        metric_at(sm, ACKED, &[]) == LINES as f64
    });
    shipper.wait_alive("the replayed segments deleted", || segments(&dir).is_empty());
    let m = |name: &str| receiver.metric(name, &[]);
    assert_eq!(m("shipper_receiver_frames_origin_total"), frames);
    assert_eq!(m("shipper_receiver_frames_duplicate_total"), frames);
    assert_eq!(m("shipper_receiver_frames_origin_ignored_total"), 0.0);
    let written = if restart_receiver { 0.0 } else { LINES as f64 };
    assert_eq!(m("shipper_receiver_records_written_total"), written);
    assert_eq!(delivered(&env.out(), LINES), LINES, "each line exactly once");
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
}

// Guards the identity of frames that went to the buffer without a sequence number (every
// receiver down): sent from it, written and never acknowledged, they stay in their segment at
// SIGTERM, and the next run's resend must be recognised (by their spill-stream origin).
/// The receiver down: frames go to the disk buffer; a receiver that writes and acknowledges
/// nothing (`hold-all-acks`) takes them all; SIGTERM; a normal receiver in its place and the
/// next run: each line exactly once, every replayed frame a duplicate.
#[test]
fn frames_buffered_while_down_written_but_unacknowledged_are_not_written_again() {
    const LINES: usize = 3000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = env.path("buffer");
    let cfg = config_holding(&env, port, sm, &dir);
    let mut shipper = run(&env, &cfg, sm);
    let mut w = open_writer(&env.path("app.pipe"));
    for seq in 0..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    drop(w);
    shipper.wait_alive("every line on disk", || metric_at(sm, ON_DISK, &[]) == LINES as f64);
    let mut receiver = start_receiver_holding_acks(&env, port, rm, "hold-all-acks");
    shipper.wait_alive("every line written by the receiver, none acknowledged", || {
        metric_at(rm, "shipper_receiver_records_written_total", &[]) == LINES as f64
    });
    let frames = metric_at(sm, "shipper_buffer_frames_replayed_total", &[]);
    assert!(frames > 1.0, "{frames} frames");
    assert_eq!(metric_at(sm, ACKED, &[]), 0.0);
    assert!(shipper.stop(Duration::from_secs(20)).success());
    assert!(!segments(&dir).is_empty(), "unacknowledged, they stay in their segments");
    receiver.kill();
    let receiver = start_receiver(&env, port, rm, "");
    let start = |log: &str| {
        Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, env.path(log))
    };
    let mut shipper = start("second.log");
    shipper.wait_alive("every replayed line acknowledged", || {
        metric_at(sm, ACKED, &[]) == LINES as f64
    });
    shipper.wait_alive("the replayed segments deleted", || segments(&dir).is_empty());
    assert_eq!(shipper.metric("shipper_buffer_frames_replayed_total", &[]), frames);
    let m = |name: &str| receiver.metric(name, &[]);
    assert_eq!(m("shipper_receiver_frames_origin_total"), frames);
    assert_eq!(m("shipper_receiver_frames_duplicate_total"), frames);
    assert_eq!(m("shipper_receiver_records_written_total"), 0.0);
    assert_eq!(delivered(&env.out(), LINES), LINES, "each line exactly once");
}

/// A receiver on `port` with the test fault `fault` (`hold-acks`, `hold-all-acks`).
fn start_receiver_holding_acks(env: &Env, port: u16, metrics: u16, fault: &str) -> Proc {
    let cfg = env.write("receiver-holding.toml", &env.receiver_toml(port, metrics, ""));
    let log = env.path("receiver-holding.log");
    let child = std::process::Command::new(BIN)
        .args(["receive", "--config", cfg.to_str().unwrap()])
        .env("SHIPPER_LOG", "info")
        .env(shipper::fault::ENV, fault)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("cannot start the receiver");
    let mut p = Proc { child, name: "receiver".into(), metrics, log };
    p.wait_alive("its metrics endpoint", || scrape(metrics).is_some());
    wait_for("receiver port", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}
