//! The `takeover` case: the longest blocking `write()` of applications writing into the
//! shipper's pipes while `shipper run --takeover` replaces the running shipper, again and
//! again (issue 14: "its longest write() goes into the perf suite").
//!
//! One `shipper run` (release build, `[shipper] workers`, a disk buffer, a control socket) reads
//! `pipes` FIFOs; one writer thread per FIFO writes `{"service":"w<i>","seq":<n>,...}` lines,
//! one blocking `write()` per line, paced at `lines_per_s` and timed (SCHED_FIFO where
//! allowed, so that the figure is the pipe's, not the scheduler's); a `shipper receive` writes
//! what arrives. After `interval_ms`, `takeovers` times over, a new `shipper run --config F
//! --takeover` is started and the one it replaces must exit 0; `interval_ms` after the last
//! the writers stop. Then, per run (a fresh receiver and shipper each time):
//!
//! - **the longest `write()`** over all writers (the results keep the median run's, the worst
//!   and every run's), and each takeover's handover time (the new process's start to the old
//!   one's exit);
//! - **every line exactly once**: the receiver's files are read back, every `(writer, seq)`
//!   must be there once; a line missing or doubled fails the case.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::pipe::{self, Cpus};
use crate::daemon::{free_port, Daemon};
use testkit::process::poll_alive;

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TakeoverCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Runs in a full run (`--runs N` overrides; quick runs do one).
    pub runs: usize,
    /// Takeovers per run, full and quick.
    pub takeovers: usize,
    pub quick_takeovers: usize,
    /// Time before the first takeover, between two and after the last (ms), full and quick.
    pub interval_ms: u64,
    pub quick_interval_ms: u64,
    /// FIFOs, one paced writer each, and each writer's lines per second.
    pub pipes: usize,
    pub lines_per_s: u64,
    /// Padding bytes in each line.
    pub pad_bytes: usize,
    pub shipper: Settings,
    #[serde(default)]
    pub cpus: Cpus,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[shipper] workers`.
    pub workers: usize,
}

/// One run.
#[derive(Serialize, Default, Clone, Debug)]
struct Trial {
    takeovers: usize,
    /// Each takeover: the new process's start to the old one's exit (ms).
    handover_ms: Vec<f64>,
    lines_written: u64,
    /// Lines at the receiver, and how many of the written were missing or doubled there.
    lines_delivered: u64,
    missing: u64,
    doubled: u64,
    /// The longest `write()` of all writers, and of each.
    write_block_max_ms: f64,
    writers_max_ms: Vec<f64>,
    wall_s: f64,
}

pub fn run_case(
    name: &str,
    case: &TakeoverCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    let takeovers = if quick { case.quick_takeovers } else { case.takeovers };
    println!(
        "\n== {name}: {} ({takeovers} takeovers; {} writers at {} lines/s)",
        case.description, case.pipes, case.lines_per_s
    );
    let runs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let dir = super::tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let mut trials = Vec::new();
    for r in 0..runs {
        let env = Env { dir: &dir.join(format!("run{r}")), case, pki: &pki, quick };
        let t = run_once(&env, takeovers).with_context(|| format!("run {}", r + 1))?;
        print_trial(&t, r, runs);
        trials.push(t);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (median, worst_ms) = super::median_and_worst(&trials, |t| t.write_block_max_ms)?;
    let md = markdown(name, case, &median, worst_ms, &trials);
    println!("\n{md}");
    let run = super::Run {
        name,
        description: &case.description,
        optimises: &case.optimises,
        quick,
        command,
    };
    let fields = serde_json::json!({
        "case_toml": case,
        "median": median,
        "write_block_max_ms_worst": worst_ms,
        "runs": trials,
    });
    super::save(&run, fields, Some(&md))?;
    if let Some(t) = trials.iter().find(|t| t.missing > 0 || t.doubled > 0) {
        bail!(
            "{name}: lines not delivered exactly once: {} missing, {} doubled",
            t.missing,
            t.doubled
        );
    }
    Ok(())
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a TakeoverCase,
    pki: &'a shipper::tls::pki::DevPki,
    quick: bool,
}

/// One run: a fresh receiver and shipper, the writers, the takeovers, the check.
fn run_once(env: &Env, takeovers: usize) -> anyhow::Result<Trial> {
    let (dir, case) = (env.dir, env.case);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let rworkers = case.cpus.receiver.len().max(1);
    let rcfg = pipe::receiver_config(dir, "receiver", env.pki, rx, rm, rworkers)?;
    let fifos: Vec<PathBuf> = (0..case.pipes).map(|i| dir.join(format!("w{i}.pipe"))).collect();
    let scfg = shipper_config(env, &fifos, rx, sm)?;
    let bin = crate::root().join("target/release/shipper");
    let rmetrics = format!("127.0.0.1:{rm}");
    let rlog = dir.join("receiver.log");
    let _receiver =
        Daemon::start_on(&case.cpus.receiver, &bin, "receive", &rcfg, &rlog, &rmetrics)?;
    let smetrics = format!("127.0.0.1:{sm}");
    let slog = dir.join("shipper-0.log");
    let mut ship = Daemon::start_on(&case.cpus.shipper, &bin, "run", &scfg, &slog, &smetrics)?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        fifos.iter().enumerate().map(|(i, f)| spawn_writer(env, f, i, &stop)).collect();
    let ms = if env.quick { case.quick_interval_ms } else { case.interval_ms };
    let interval = Duration::from_millis(ms);
    let mut handover_ms = Vec::new();
    for n in 1..=takeovers {
        // The pace of the case, not a wait for a condition.
        std::thread::sleep(interval);
        let (next, took) = take_over(env, &bin, &scfg, &mut ship, n)?;
        ship = next;
        handover_ms.push(took.as_secs_f64() * 1e3);
    }
    std::thread::sleep(interval);
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for w in writers {
        written.push(w.join().expect("writer thread")?);
    }
    let counts: Vec<u64> = written.iter().map(|w| w.0).collect();
    let out = dir.join("receiver-out");
    let seen = delivered(&out, &counts, env.quick)?;
    drop(ship);
    let maxes: Vec<f64> = written.iter().map(|w| w.1.as_secs_f64() * 1e3).collect();
    let t = Trial {
        takeovers,
        handover_ms,
        lines_written: counts.iter().sum(),
        lines_delivered: seen.iter().flatten().map(|&c| u64::from(c)).sum(),
        missing: seen.iter().flatten().filter(|&&c| c == 0).count() as u64,
        doubled: seen.iter().flatten().filter(|&&c| c > 1).count() as u64,
        write_block_max_ms: maxes.iter().copied().fold(0.0, f64::max),
        writers_max_ms: maxes,
        wall_s: t0.elapsed().as_secs_f64(),
    };
    let _ = std::fs::remove_dir_all(dir);
    Ok(t)
}

/// Writes the shipper's configuration: the FIFOs, a disk buffer (what is unacknowledged at a
/// takeover goes there, for the next process to send) and the control socket.
fn shipper_config(env: &Env, fifos: &[PathBuf], rx: u16, sm: u16) -> anyhow::Result<PathBuf> {
    let (dir, workers) = (env.dir, env.case.shipper.workers);
    let scfg = dir.join("edge.toml");
    let body = format!("[buffer]\ndirectory = {:?}\n", dir.join("buffer"));
    let receivers = format!("primary = [\"127.0.0.1:{rx}\"]\n");
    pipe::shipper_config(&scfg, env.pki, workers, sm, fifos, &body, &receivers)?;
    let control = format!("control_socket = {:?}\n", dir.join("control.sock"));
    pipe::add_shipper_keys(&scfg, &control)?;
    Ok(scfg)
}

/// Starts `shipper run --takeover` and waits for `old` to exit 0 and the new one to run;
/// returns it and the time from its start to the old one's exit.
fn take_over(
    env: &Env,
    bin: &Path,
    cfg: &Path,
    old: &mut Daemon,
    n: usize,
) -> anyhow::Result<(Daemon, Duration)> {
    let log = env.dir.join(format!("shipper-{n}.log"));
    let args = ["run", "--config", &cfg.to_string_lossy(), "--takeover"];
    let started = Instant::now();
    let mut next = Daemon::spawn(&env.case.cpus.shipper, &bin.to_string_lossy(), &args, &log)?;
    let limit = Duration::from_secs(60);
    // The new process must live while the old one exits (a new one that died fails at once).
    let mut status = None;
    poll_alive(&mut next.0, limit, Duration::from_millis(1), || {
        status = old.0.try_wait().ok().flatten();
        status.is_some()
    })
    .with_context(|| format!("takeover {n}: the new shipper, until the old one exited"))?;
    let took = started.elapsed();
    let status = status.expect("polled until it exited");
    if !status.success() {
        bail!("takeover {n}: the old shipper exited {status}; see {}", env.dir.display());
    }
    let running = || std::fs::read_to_string(&log).unwrap_or_default().contains("shipper running");
    poll_alive(&mut next.0, limit, Duration::from_millis(10), running)
        .with_context(|| format!("takeover {n}: the new shipper running; see {}", log.display()))?;
    Ok((next, took))
}

/// Writer `i`: one blocking `write()` per line into `fifo` at the case's rate until `stop`;
/// returns the lines written and the longest `write()`.
fn spawn_writer(
    env: &Env,
    fifo: &Path,
    i: usize,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<(u64, Duration)>> {
    let (fifo, stop) = (fifo.to_path_buf(), stop.clone());
    let (rate, pad, cpus) =
        (env.case.lines_per_s, env.case.pad_bytes, env.case.cpus.loadgen.clone());
    std::thread::spawn(move || {
        super::pin_current_thread(&cpus);
        realtime();
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifo)?;
        let padding = "x".repeat(pad);
        let (started, mut longest, mut seq) = (Instant::now(), Duration::ZERO, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let due = started.elapsed().as_micros() as u64 * rate / 1_000_000;
            while seq < due {
                let line =
                    format!("{{\"service\":\"w{i}\",\"seq\":{seq},\"pad\":\"{padding}\"}}\n");
                let t = Instant::now();
                file.write_all(line.as_bytes())
                    .with_context(|| format!("writer {i} line {seq}"))?;
                longest = longest.max(t.elapsed());
                seq += 1;
            }
            // Pacing the writer.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok((seq, longest))
    })
}

/// SCHED_FIFO for the calling thread where allowed (root), so that a timed `write()` measures
/// the pipe and not the other processes on its CPU.
fn realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        println!("   writer without SCHED_FIFO: {}", std::io::Error::last_os_error());
    }
}

/// Reads the receiver's files under `out` until every written line is there (or nothing
/// new came for 5 s); per writer, how many times each line arrived.
fn delivered(out: &Path, written: &[u64], quick: bool) -> anyhow::Result<Vec<Vec<u32>>> {
    let total: u64 = written.iter().sum();
    let deadline = Instant::now() + Duration::from_secs(if quick { 60 } else { 300 });
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let seen = count_lines(out, written)?;
        let n: u64 = seen.iter().flatten().map(|&c| u64::from(c)).sum();
        if n != last {
            (last, moved) = (n, Instant::now());
        }
        let stalled = moved.elapsed() > Duration::from_secs(5);
        if n >= total || stalled || Instant::now() > deadline {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per writer, how many times each of its lines is in the receiver's files under `out`.
fn count_lines(out: &Path, written: &[u64]) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut seen: Vec<Vec<u32>> = written.iter().map(|&n| vec![0; n as usize]).collect();
    for stream in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = stream.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !stream.path().is_dir() {
            continue;
        }
        // Only the receiver's open and rotated `.log` files, and in each only whole lines: it
        // may be writing the last one as this reads.
        let logs = std::fs::read_dir(stream.path())?.flatten();
        for f in logs.filter(|f| f.path().extension().is_some_and(|e| e == "log")) {
            let text = std::fs::read(f.path())?;
            let whole = text.split_inclusive(|&b| b == b'\n').filter(|l| l.ends_with(b"\n"));
            for line in whole.map(|l| &l[..l.len() - 1]).filter(|l| !l.is_empty()) {
                let (w, seq) = ids(line).with_context(|| format!("{}", f.path().display()))?;
                match seen.get_mut(w).and_then(|s| s.get_mut(seq)) {
                    Some(c) => *c += 1,
                    None => bail!("a line nobody wrote: writer {w} seq {seq}"),
                }
            }
        }
    }
    Ok(seen)
}

/// `(writer, seq)` of a line the writers made.
fn ids(line: &[u8]) -> anyhow::Result<(usize, usize)> {
    let s = std::str::from_utf8(line)?;
    let field = |key: &str, end: char| -> Option<usize> {
        s.split(key).nth(1)?.split(end).next()?.parse().ok()
    };
    let w = field("\"service\":\"w", '"');
    let seq = field("\"seq\":", ',');
    w.zip(seq).with_context(|| format!("not a writer's line: {s:.80}"))
}

fn print_trial(t: &Trial, run: usize, runs: usize) {
    println!(
        "   run {}/{}: {} takeovers (handover {:?} ms), {} lines written, {} delivered \
         ({} missing, {} doubled), longest write() {:.3} ms",
        run + 1,
        runs,
        t.takeovers,
        t.handover_ms.iter().map(|ms| ms.round() as u64).collect::<Vec<_>>(),
        t.lines_written,
        t.lines_delivered,
        t.missing,
        t.doubled,
        t.write_block_max_ms,
    );
}

fn markdown(name: &str, case: &TakeoverCase, m: &Trial, worst_ms: f64, all: &[Trial]) -> String {
    use std::fmt::Write;
    let th = super::report::thousands;
    let mut md = format!(
        "**{name}** ({}): {} writers, each one blocking `write()` per line at {} lines/s into \
         its own pipe, while `shipper run --takeover` replaces the shipper ({} worker(s), disk \
         buffer) {} times; CPUs: shipper {:?}, writers {:?}, receiver {:?}.\n\n\
         **Longest `write()` {:.3} ms** (median of {} run(s); worst {:.3} ms). Every line is \
         checked at the receiver: missing or doubled lines fail the case. Handover: the new \
         process's start (its TLS and eBPF loading included) to the old one's exit.\n\n",
        case.description,
        case.pipes,
        th(case.lines_per_s as f64),
        case.shipper.workers,
        m.takeovers,
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
        m.write_block_max_ms,
        all.len(),
        worst_ms,
    );
    md += "| run | takeovers | longest write() | lines written | delivered | missing | doubled \
           | longest handover |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (i, t) in all.iter().enumerate() {
        let handover = t.handover_ms.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} ms | {} | {} | {} | {} | {:.0} ms |",
            i + 1,
            t.takeovers,
            t.write_block_max_ms,
            th(t.lines_written as f64),
            th(t.lines_delivered as f64),
            t.missing,
            t.doubled,
            handover,
        );
    }
    md
}
