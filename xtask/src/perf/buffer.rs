//! The `buffer` case: one pipe workload shipped three ways by the same shipper configuration
//! (the case's `[buffer]`), `runs` times over:
//!
//! 1. **straight**: to a running receiver (the baseline, in the same run);
//! 2. **buffered**: with the receiver down, so that every frame goes into the disk buffer's
//!    segments (done when `shipper_buffer_records_written_total` counts every line);
//! 3. **replay**: the receiver started; done when `shipper_records_acked_total` counts every
//!    line and `shipper_buffer_segments` is 0. Before it starts, the segments are fdatasync'd
//!    and evicted from the page cache (`POSIX_FADV_DONTNEED`), so replay reads the disk.
//!
//! Each phase is complete when the shipper's counters say so (polled with a deadline), but
//! it is timed by files, read every 10 ms: workers publish their counters every 250 ms, files
//! grow as they are written. The straight phase ends at the receiver's last output write, the
//! buffered one at the segments' last growth, and the replay runs from the receiver's first
//! output write to its last (the time from the receiver's start to its first write, mostly the
//! shipper's probe backoff, is reported apart). Measures per phase: wall time, lines/s, MB/s
//! (of the lines as written), the shipper's CPU-seconds and lines per CPU-second, its peak RSS
//! over the phase (VmHWM, reset through `/proc/PID/clear_refs` at the phase's start), the
//! writers' longest `write()`, and for the buffered phase the bytes and segments on disk.
//!
//! Then, apart from the three (its throughput is paced, not measured), a **rotation** phase:
//! one application-like writer, one blocking `write()` per line at `[rotation] lines_per_s`,
//! into the disk buffer with the receiver down, `[rotation] segment_bytes` and
//! `batch_bytes_max` (both small), so that segments rotate many times (each a create, a
//! directory fsync and an fdatasync of the one before). Its longest `write()` is what a
//! blocking call on the worker's thread would show; it goes into the results (`rotation`) and
//! the summary, with the frames and segments written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::text::sum;

use super::pipe::{self, Cpus, Load, Workload};
use super::{proc_cpu, proc_hwm_kib};
use crate::daemon::{free_port, Daemon};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct BufferCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Runs of all three phases in a full run (`--runs N` overrides; quick runs do one).
    pub runs: usize,
    pub workload: Workload,
    pub shipper: Settings,
    /// The `[buffer]` table given to the shipper, as written (keys of docs/config.md).
    pub buffer: toml::Table,
    /// Extra keys of `[receivers]` (e.g. `backoff_ms_max`), as written.
    #[serde(default)]
    pub receivers: toml::Table,
    #[serde(default)]
    pub cpus: Cpus,
    pub rotation: Rotation,
}

/// The rotation phase: one paced writer into a buffer of small segments.
#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// `segment_bytes` of the buffer in this phase (the case's other `[buffer]` keys stay).
    pub segment_bytes: u64,
    /// `[batch] batch_bytes_max` in this phase: small frames, many appends per segment.
    pub batch_bytes_max: u64,
    /// Lines per second of the one writer, one blocking `write()` per line.
    pub lines_per_s: u64,
    /// Lines written in a full run, and in a quick one.
    pub lines: usize,
    pub quick_lines: usize,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub workers: usize,
    pub zstd_level: u32,
    /// `[batch] batch_bytes_max` (bytes); none: the shipper's default.
    #[serde(default)]
    pub batch_bytes_max: Option<u64>,
}

/// One phase of one run.
#[derive(Serialize, Default, Clone, Debug)]
struct Phase {
    label: String,
    wall_s: f64,
    /// Lines this phase moved: acknowledged (straight, replay) or appended to the buffer.
    lines: u64,
    lines_per_s: f64,
    /// Megabytes per second of the lines as written (uncompressed).
    mb_per_s: f64,
    cpu_s: f64,
    lines_per_cpu_s: f64,
    peak_rss_kib: u64,
    /// `shipper receive`'s CPU-seconds over the phase (0 while it is down).
    receiver_cpu_s: f64,
    /// The writers' longest `write()` (0 for the replay, which has no writer).
    write_block_max_ms: f64,
    /// Lines counted as dropped by the shipper.
    dropped: u64,
    /// Frames appended to the disk buffer during the phase.
    buffer_frames_written: u64,
    /// Bytes and segment files on disk at the phase's end (the buffered phase).
    disk_bytes: u64,
    segments: u64,
    /// Bytes of DATA frames sent (the straight phase: compare with `disk_bytes`).
    frame_bytes_sent: u64,
    /// Replay: receiver started → its first replayed line written (s), and segments read per
    /// second of replay.
    first_line_s: f64,
    disk_mb_per_s: f64,
}

impl Phase {
    fn rates(&mut self, bytes: u64, lines_written: u64) {
        let wall = self.wall_s.max(1e-9);
        self.lines_per_s = self.lines as f64 / wall;
        self.mb_per_s = bytes as f64 * self.lines as f64 / lines_written.max(1) as f64 / wall / 1e6;
        if self.cpu_s > 0.0 {
            self.lines_per_cpu_s = self.lines as f64 / self.cpu_s;
        }
    }
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a BufferCase,
    pki: &'a shipper::tls::pki::DevPki,
    load: &'a Load,
    deadline: Duration,
    quick: bool,
}

const PHASES: [&str; 3] = ["straight to the receiver", "into the disk buffer", "replay"];
const ROTATION: &str = "rotating segments";

pub fn run_case(
    name: &str,
    case: &BufferCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    let load = pipe::load(&case.workload, quick);
    println!(
        "\n== {name}: {} ({} lines, {:.0} bytes on average, {} pipe(s) x {} writer(s))",
        case.description,
        load.lines,
        load.bytes as f64 / load.lines.max(1) as f64,
        case.workload.pipes,
        case.workload.writers_per_pipe,
    );
    let runs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let dir = super::tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let deadline = Duration::from_secs(if quick { 60 } else { 600 });
    let env = Env { dir: &dir, case, pki: &pki, load: &load, deadline, quick };
    let (all, rotations) = run_all(&env, runs)?;
    let _ = std::fs::remove_dir_all(&dir);
    // The median run of each phase by lines/s, with the spread.
    let medians: Vec<Phase> = all
        .iter()
        .map(|runs| {
            let mut sorted = runs.clone();
            sorted.sort_by(|a, b| a.lines_per_s.total_cmp(&b.lines_per_s));
            sorted[sorted.len() / 2].clone()
        })
        .collect();
    let run = super::Run {
        name,
        description: &case.description,
        optimises: &case.optimises,
        quick,
        command,
    };
    let rotation = save(&run, case, &load, (&medians, &all), &rotations)?;
    for p in medians.iter().chain([&rotation]) {
        if p.lines == 0 {
            bail!("{name}: phase \"{}\" moved no line", p.label);
        }
    }
    Ok(())
}

/// `runs` runs of the three phases and of the rotation, each printed as it ends: each phase's
/// runs, and the rotation's.
fn run_all(env: &Env, runs: usize) -> anyhow::Result<(Vec<Vec<Phase>>, Vec<Phase>)> {
    let mut all: Vec<Vec<Phase>> = vec![Vec::new(); PHASES.len()];
    let mut rotations = Vec::new();
    for r in 0..runs {
        let phases = run_once(env, r).with_context(|| format!("run {}", r + 1))?;
        for (i, p) in phases.into_iter().enumerate() {
            print_phase(&p, r, runs);
            all[i].push(p);
        }
        let dir = env.dir.join(format!("rotation{r}"));
        let p = rotation(env, &dir).with_context(|| format!("run {}: rotation", r + 1))?;
        let _ = std::fs::remove_dir_all(&dir);
        print_phase(&p, r, runs);
        rotations.push(p);
    }
    Ok((all, rotations))
}

/// Prints and saves the summary, charts and results (`phases`: the medians and every run);
/// returns the rotation's median run by longest write().
fn save(
    run: &super::Run,
    case: &BufferCase,
    load: &Load,
    phases: (&[Phase], &[Vec<Phase>]),
    rotations: &[Phase],
) -> anyhow::Result<Phase> {
    let (medians, all) = phases;
    // The rotation's median run by longest write(), and the worst.
    let (rotation, worst_ms) = super::median_and_worst(rotations, |p| p.write_block_max_ms)?;
    let mut md = markdown(run.name, case, load, medians, all);
    md += &rotation_markdown(case, &rotation, worst_ms, rotations.len());
    println!("\n{md}");
    let charts = charts(run.name, run.quick, load, medians)?;
    let fields = serde_json::json!({
        "case_toml": case,
        "lines": load.lines,
        "bytes": load.bytes,
        "phases": medians,
        "runs": all,
        "rotation": {
            "segment_bytes": case.rotation.segment_bytes,
            "lines_per_s": case.rotation.lines_per_s,
            "phase": rotation,
            "write_block_max_ms_worst": worst_ms,
            "runs": rotations,
        },
        "charts": charts,
    });
    super::save(run, fields, Some(&md))?;
    Ok(rotation)
}

fn print_phase(p: &Phase, run: usize, runs: usize) {
    println!(
        "   {:<26} run {}/{}: {:>7.3} s {:>10.0} lines/s {:>7.3} CPU-s {:>10.0} lines/CPU-s \
         {:>4} MiB  writer max {:.1} ms{}",
        p.label,
        run + 1,
        runs,
        p.wall_s,
        p.lines_per_s,
        p.cpu_s,
        p.lines_per_cpu_s,
        p.peak_rss_kib / 1024,
        p.write_block_max_ms,
        if p.first_line_s > 0.0 {
            format!("  first line after {:.3} s", p.first_line_s)
        } else {
            String::new()
        },
    );
}

/// The three phases of one run, each from a fresh shipper, receiver and buffer directory
/// except that the replay continues the buffered phase's shipper.
fn run_once(env: &Env, run: usize) -> anyhow::Result<Vec<Phase>> {
    let dir = env.dir.join(format!("run{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    let straight = straight(env, &dir.join("straight"))?;
    let (buffered, replay) = outage(env, &dir.join("outage"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![straight, buffered, replay])
}

/// A shipper and a receiver's config in `dir` (the receiver not started); returns the paths,
/// the receiver's metrics address, the shipper's metrics address and the FIFOs.
struct Setup {
    rcfg: PathBuf,
    scfg: PathBuf,
    rmetrics: String,
    smetrics: String,
    fifos: Vec<PathBuf>,
    buffer: PathBuf,
    /// The receiver's output directory.
    out: PathBuf,
}

fn setup(env: &Env, dir: &Path) -> anyhow::Result<Setup> {
    std::fs::create_dir_all(dir)?;
    let case = env.case;
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let rworkers = if case.cpus.receiver.is_empty() { 2 } else { case.cpus.receiver.len() };
    let rcfg = pipe::receiver_config(dir, "receiver", env.pki, rx, rm, rworkers)?;
    let fifos: Vec<PathBuf> =
        (0..case.workload.pipes).map(|i| dir.join(format!("ship{i}.pipe"))).collect();
    let buffer = dir.join("buffer");
    let mut table = case.buffer.clone();
    table.insert("directory".into(), buffer.display().to_string().into());
    let batch_max =
        case.shipper.batch_bytes_max.map_or(String::new(), |b| format!("batch_bytes_max = {b}\n"));
    let body = format!(
        "[batch]\nzstd_level = {}\n{batch_max}[buffer]\n{}",
        case.shipper.zstd_level,
        toml::to_string(&table)?
    );
    let receivers =
        format!("primary = [\"127.0.0.1:{rx}\"]\n{}", toml::to_string(&case.receivers)?);
    let scfg = dir.join("edge.toml");
    pipe::shipper_config(&scfg, env.pki, case.shipper.workers, sm, &fifos, &body, &receivers)?;
    Ok(Setup {
        rcfg,
        scfg,
        rmetrics: format!("127.0.0.1:{rm}"),
        smetrics: format!("127.0.0.1:{sm}"),
        fifos,
        buffer,
        out: dir.join("receiver-out"),
    })
}

fn start(env: &Env, dir: &Path, s: &Setup, receiver: bool) -> anyhow::Result<Daemon> {
    let bin = crate::root().join("target/release/shipper");
    let (cpus, log) = if receiver {
        (&env.case.cpus.receiver, dir.join("receiver.log"))
    } else {
        (&env.case.cpus.shipper, dir.join("shipper.log"))
    };
    let (cmd, cfg, metrics) =
        if receiver { ("receive", &s.rcfg, &s.rmetrics) } else { ("run", &s.scfg, &s.smetrics) };
    Daemon::start_on(cpus, &bin, cmd, cfg, &log, metrics)
}

/// Phase 1: straight to a running receiver. It ends when the receiver's output stops
/// growing (read every 10 ms), once the shipper counts every line acknowledged or dropped.
fn straight(env: &Env, dir: &Path) -> anyhow::Result<Phase> {
    let s = setup(env, dir)?;
    let receiver = start(env, dir, &s, true)?;
    let ship = start(env, dir, &s, false)?;
    let (c0, r0) = (proc_cpu(ship.pid()), proc_cpu(receiver.pid()));
    let total = env.load.lines as f64;
    let t0 = Instant::now();
    let writers = pipe::spawn_load_writers(env.load, &s.fifos, &env.case.cpus.loadgen);
    let out = || super::files_bytes(&s.out, "log");
    let end = until("every line acknowledged or dropped", &s.smetrics, env, (out, 0), |t| {
        sum(t, ACKED, &[]) + sum(t, DROPPED, &[]) >= total
    })?;
    let wall_s = (end.last.unwrap_or(end.at) - t0).as_secs_f64();
    let mut p = Phase { label: PHASES[0].into(), wall_s, ..Phase::default() };
    p.write_block_max_ms = pipe::join_writers(writers)?.0;
    p.cpu_s = proc_cpu(ship.pid()) - c0;
    p.receiver_cpu_s = proc_cpu(receiver.pid()) - r0;
    p.peak_rss_kib = proc_hwm_kib(ship.pid());
    let text = &end.text;
    p.lines = sum(text, ACKED, &[]) as u64;
    p.dropped = sum(text, DROPPED, &[]) as u64;
    p.buffer_frames_written = sum(text, "shipper_buffer_frames_written_total", &[]) as u64;
    p.frame_bytes_sent = sum(text, "shipper_frame_bytes_sent_total", &[]) as u64;
    p.rates(env.load.bytes, env.load.lines);
    Ok(p)
}

const ACKED: &str = "shipper_records_acked_total";
const DROPPED: &str = "shipper_lines_dropped_total";
const ON_DISK: &str = "shipper_buffer_records_written_total";

/// Phases 2 and 3: the receiver down while the lines are written, then started.
fn outage(env: &Env, dir: &Path) -> anyhow::Result<(Phase, Phase)> {
    let s = setup(env, dir)?;
    let ship = start(env, dir, &s, false)?;
    // As the buffer's tests do: write once the shipper has seen the receiver down.
    let nothing = || 0;
    until("the receiver seen down", &s.smetrics, env, (nothing, 0), |t| {
        sum(t, "shipper_receiver_failures_total", &[]) >= 1.0
    })?;
    let b = buffered(env, &s, &ship)?;
    evict(&segment_files(&s.buffer))?;
    let r = replay(env, dir, &s, &ship, &b)?;
    Ok((b, r))
}

/// Phase 2: every frame into the buffer. It ends when the segments stop growing, once the
/// shipper counts every line appended or dropped.
fn buffered(env: &Env, s: &Setup, ship: &Daemon) -> anyhow::Result<Phase> {
    let total = env.load.lines as f64;
    reset_hwm(ship.pid());
    let c0 = proc_cpu(ship.pid());
    let segments = || super::files_bytes(&s.buffer, "seg");
    let from = segments();
    let t0 = Instant::now();
    let writers = pipe::spawn_load_writers(env.load, &s.fifos, &env.case.cpus.loadgen);
    let end =
        until("every line in the buffer or dropped", &s.smetrics, env, (segments, from), |t| {
            sum(t, ON_DISK, &[]) + sum(t, DROPPED, &[]) >= total
        })?;
    let wall_s = (end.last.unwrap_or(end.at) - t0).as_secs_f64();
    let mut b = Phase { label: PHASES[1].into(), wall_s, ..Phase::default() };
    b.write_block_max_ms = pipe::join_writers(writers)?.0;
    b.cpu_s = proc_cpu(ship.pid()) - c0;
    b.peak_rss_kib = proc_hwm_kib(ship.pid());
    b.lines = sum(&end.text, ON_DISK, &[]) as u64;
    b.dropped = sum(&end.text, DROPPED, &[]) as u64;
    b.buffer_frames_written = sum(&end.text, "shipper_buffer_frames_written_total", &[]) as u64;
    let files = segment_files(&s.buffer);
    b.segments = files.len() as u64;
    b.disk_bytes = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    b.rates(env.load.bytes, env.load.lines);
    Ok(b)
}

/// Phase 3: the receiver started. Its output's first growth marks the first replayed frame
/// written; the phase ends at its last growth, once the shipper counts every buffered line
/// acknowledged and no segment is left.
fn replay(env: &Env, dir: &Path, s: &Setup, ship: &Daemon, b: &Phase) -> anyhow::Result<Phase> {
    reset_hwm(ship.pid());
    let c0 = proc_cpu(ship.pid());
    let t0 = Instant::now();
    let receiver = start(env, dir, s, true)?;
    let out = || super::files_bytes(&s.out, "log");
    let what = "every buffered line acknowledged and no segment left";
    let end = until(what, &s.smetrics, env, (out, 0), |t| {
        sum(t, ACKED, &[]) >= b.lines as f64
            && t.contains("shipper_buffer_segments")
            && sum(t, "shipper_buffer_segments", &[]) == 0.0
    })?;
    let (first, last) = (end.first.unwrap_or(end.at), end.last.unwrap_or(end.at));
    let mut r = Phase {
        label: PHASES[2].into(),
        wall_s: (last - first).as_secs_f64(),
        first_line_s: (first - t0).as_secs_f64(),
        ..Phase::default()
    };
    r.cpu_s = proc_cpu(ship.pid()) - c0;
    r.receiver_cpu_s = proc_cpu(receiver.pid());
    r.peak_rss_kib = proc_hwm_kib(ship.pid());
    r.lines = sum(&end.text, ACKED, &[]) as u64;
    r.dropped = (sum(&end.text, DROPPED, &[]) as u64).saturating_sub(b.dropped);
    r.rates(env.load.bytes, env.load.lines);
    r.disk_mb_per_s = b.disk_bytes as f64 / r.wall_s.max(1e-9) / 1e6;
    Ok(r)
}

/// The rotation phase (see the module docs): the case's workload as one writer, one `write()`
/// per line at `[rotation] lines_per_s`, into a buffer of `[rotation] segment_bytes`, the
/// receiver down. Measured as the buffered phase is; the segments are never deleted (no
/// receiver), so `segments` counts every rotation.
fn rotation(env: &Env, dir: &Path) -> anyhow::Result<Phase> {
    let r = &env.case.rotation;
    let mut case = env.case.clone();
    let segment_bytes = i64::try_from(r.segment_bytes).context("rotation.segment_bytes")?;
    case.buffer.insert("segment_bytes".into(), segment_bytes.into());
    case.shipper.batch_bytes_max = Some(r.batch_bytes_max);
    case.workload = case.workload.one_paced_writer(r.lines_per_s, r.lines, r.quick_lines);
    let load = pipe::load(&case.workload, env.quick);
    let env = Env { case: &case, load: &load, ..*env };
    let s = setup(&env, dir)?;
    let ship = start(&env, dir, &s, false)?;
    let nothing = || 0;
    until("the receiver seen down", &s.smetrics, &env, (nothing, 0), |t| {
        sum(t, "shipper_receiver_failures_total", &[]) >= 1.0
    })?;
    let mut p = buffered(&env, &s, &ship)?;
    p.label = ROTATION.into();
    Ok(p)
}

/// The rotation phase's line of the summary.
fn rotation_markdown(case: &BufferCase, p: &Phase, worst_ms: f64, runs: usize) -> String {
    let r = &case.rotation;
    format!(
        "\nRotation: one writer, one blocking `write()` per line at {} lines/s, into the disk \
         buffer (receiver down) with `segment_bytes = {}` and `batch_bytes_max = {}`: {} lines \
         in {} frames into {} segments ({:.1} MB on disk) in {:.3} s, shipper {:.3} CPU-s. \
         **Longest `write()` {:.2} ms** (median of {runs} run(s); worst {:.2} ms): a blocking \
         call on the worker's thread while segments rotate would show here.\n",
        thousands(r.lines_per_s as f64),
        r.segment_bytes,
        r.batch_bytes_max,
        thousands(p.lines as f64),
        thousands(p.buffer_frames_written as f64),
        p.segments,
        p.disk_bytes as f64 / 1e6,
        p.wall_s,
        p.cpu_s,
        p.write_block_max_ms,
        worst_ms,
    )
}

/// [`super::until`] with this case's deadline.
fn until(
    what: &str,
    addr: &str,
    env: &Env,
    watch: (impl Fn() -> u64, u64),
    done: impl FnMut(&str) -> bool,
) -> anyhow::Result<super::End> {
    super::until(what, addr, (env.deadline, env.dir), watch, done)
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS, so that the next read covers
/// what happened since (`/proc/PID/clear_refs`, value 5; see proc(5)).
fn reset_hwm(pid: u32) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        println!("   note: cannot reset the peak RSS of {pid} ({e}): it covers the whole process");
    }
}

/// The segment files of every worker under `dir` (`core-N/*.seg`).
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for core in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(core.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == "seg") {
                files.push(f.path());
            }
        }
    }
    files.sort();
    files
}

/// Writes the segments' pages back and drops them from the page cache, so that replay reads
/// the disk (only these files: the other engineers' caches are left alone).
fn evict(files: &[PathBuf]) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    for f in files {
        let file = std::fs::File::open(f).with_context(|| format!("{}", f.display()))?;
        file.sync_data().with_context(|| format!("fdatasync {}", f.display()))?;
        // SAFETY: an advisory call on our own descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    Ok(())
}

fn thousands(v: f64) -> String {
    super::report::thousands(v)
}

fn markdown(name: &str, case: &BufferCase, load: &Load, m: &[Phase], all: &[Vec<Phase>]) -> String {
    let mut md = workload(name, case, load, all[0].len());
    md += "| phase | lines/s (spread) | MB/s | CPU s | lines per CPU-s | CPU per line vs \
           straight | peak RSS | writer max block | on disk | not delivered |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    let base = m[0].lines_per_cpu_s.max(1e-9);
    for (p, runs) in m.iter().zip(all) {
        md += &phase_row(p, runs, load, base);
    }
    let r = &m[2];
    md += &format!(
        "\nReplay: the receiver started → its first replayed line written {:.3} s (the shipper's probe \
         backoff, `[receivers]` {}); first → last line written {:.3} s (then every line \
         acknowledged and no segment left), reading {:.1} MB/s of segments. `shipper receive` used {:.3} CPU-s \
         straight and {:.3} CPU-s for the replay. Frames through the buffer in the straight \
         phase: {}.\n",
        r.first_line_s,
        inline(&case.receivers),
        r.wall_s,
        r.disk_mb_per_s,
        m[0].receiver_cpu_s,
        r.receiver_cpu_s,
        m[0].buffer_frames_written,
    );
    md
}

/// The summary's first paragraph: the case, its workload, shipper settings and CPUs.
fn workload(name: &str, case: &BufferCase, load: &Load, runs: usize) -> String {
    let w = &case.workload;
    format!(
        "**{name}** ({}): {} lines, {:.0} bytes on average ({}–{}), {} pipe(s) × {} writer(s), \
         as fast as possible; shipper {} worker(s), zstd level {}, `[buffer]` {}; CPUs: shipper \
         {:?}, load generator {:?}, receiver {:?}; median of {runs} run(s) by lines/s.\n\n",
        case.description,
        thousands(load.lines as f64),
        load.bytes as f64 / load.lines.max(1) as f64,
        w.line_bytes_min,
        w.line_bytes_max,
        w.pipes,
        w.writers_per_pipe,
        case.shipper.workers,
        case.shipper.zstd_level,
        inline(&case.buffer),
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
    )
}

/// Phase `p`'s row (its median run), the spread over its `runs`, its CPU per line against
/// `base` (the straight phase's lines per CPU-s).
fn phase_row(p: &Phase, runs: &[Phase], load: &Load, base: f64) -> String {
    let (lo, hi) = runs
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(r.lines_per_s), hi.max(r.lines_per_s)));
    let disk = if p.disk_bytes > 0 {
        format!(
            "{:.1} MB in {} segments ({:.1}× smaller)",
            p.disk_bytes as f64 / 1e6,
            p.segments,
            load.bytes as f64 / p.disk_bytes as f64
        )
    } else if p.frame_bytes_sent > 0 {
        format!("– ({:.1} MB of frames sent)", p.frame_bytes_sent as f64 / 1e6)
    } else {
        "–".into()
    };
    let block = if p.write_block_max_ms > 0.0 {
        format!("{:.1} ms", p.write_block_max_ms)
    } else {
        "–".into()
    };
    format!(
        "| {} | **{}** ({}–{}) | {:.1} | {:.3} | {} | {:.2}× | {:.1} MiB | {block} | {disk} | \
         {} |\n",
        p.label,
        thousands(p.lines_per_s),
        thousands(lo),
        thousands(hi),
        p.mb_per_s,
        p.cpu_s,
        thousands(p.lines_per_cpu_s),
        base / p.lines_per_cpu_s.max(1e-9),
        p.peak_rss_kib as f64 / 1024.0,
        thousands(p.dropped as f64),
    )
}

/// A TOML table on one line: `{ a = 1, b = "x" }`.
fn inline(t: &toml::Table) -> String {
    let kv: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{{ {} }}", kv.join(", "))
}

fn charts(name: &str, quick: bool, load: &Load, m: &[Phase]) -> anyhow::Result<Vec<String>> {
    super::chart::register_font()?;
    let root = crate::root();
    let dir = if quick { root.join("perf/results") } else { root.join("docs/perf") };
    std::fs::create_dir_all(&dir)?;
    let path =
        |kind: &str| dir.join(format!("{name}-{kind}{}.png", if quick { "-quick" } else { "" }));
    let labels: Vec<String> = m.iter().map(|p| p.label.clone()).collect();
    let tput: Vec<f64> = m.iter().map(|p| p.lines_per_s).collect();
    let cpu: Vec<f64> = m.iter().map(|p| p.lines_per_cpu_s).collect();
    let title = format!("{name}: lines/s by phase ({} lines, median run)", load.lines);
    super::chart::bars(&path("throughput"), &title, "lines per second", &labels, &tput)?;
    let title = format!("{name}: lines per CPU-second by phase (higher is better)");
    super::chart::bars(&path("cpu"), &title, "lines per CPU-second", &labels, &cpu)?;
    let out = [path("throughput"), path("cpu")];
    for p in &out {
        println!("   chart: {}", p.display());
    }
    Ok(out.iter().map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).collect())
}
