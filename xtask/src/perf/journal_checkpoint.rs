//! The `journal-checkpoint` case: does a journal checkpointing at full speed block a pipe
//! writer on the same worker? Journal checkpoints are written by one thread per process,
//! never on a worker's io_uring thread; this case is what shows that holds under load.
//!
//! One `shipper run` with one worker (release build) reads a journal of `entries` entries
//! (written beforehand by systemd-journal-remote, as the journal-read case does) from
//! `since = "oldest"` with a `checkpoint`, so the checkpoint advances after every acknowledged
//! frame (`[shipper] batch_bytes_max` keeps frames small, hence many). On the same worker a
//! `[[sources.pipe]]` takes one application-like writer ([`pipe::Workload::one_paced_writer`]:
//! one blocking `write()` per line at `[writer] lines_per_s`), started as soon as the shipper
//! answers; a `shipper receive` acknowledges. Then, `runs` times over (a fresh shipper,
//! receiver and checkpoint each time, the same journal files):
//!
//! - **the writer's longest `write()`**: what a blocking call on the worker's thread would
//!   show (the results keep the median run's, the worst and every run's);
//! - **journal entries per second**: `entries` over the time from the shipper's start to the
//!   last checkpoint write (every entry read, shipped, acknowledged and checkpointed);
//! - **checkpoint writes**: the renames onto the checkpoint file, counted exactly with inotify
//!   (`IN_MOVED_TO`; the writer thread makes one per write, and coalesces cursors that arrive
//!   while it writes, so this is at most the frames acknowledged, which are recorded beside).
//!
//! A run is complete when the shipper counts every entry and line acknowledged or dropped and
//! the checkpoint file holds the last entry's cursor (from `shipper journal cat`). The time
//! the writer wrote while the journal was still being read is recorded too: a writer that ran
//! mostly after the journal was done measured little.

use std::cell::Cell;
use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::text::sum;

use super::pipe::{self, Cpus, Workload};
use super::{proc_cpu, proc_threads_cpu_ns};
use crate::daemon::{free_port, Daemon};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Runs in a full run (`--runs N` overrides; quick runs do one).
    pub runs: usize,
    /// Journal entries read (and checkpointed) in a full run, and in a quick one.
    pub entries: usize,
    pub quick_entries: usize,
    pub shipper: Settings,
    /// The shape of the writer's lines (sizes, services, cfjs1 share, seed); `[writer]` sets
    /// how many and how fast.
    pub workload: Workload,
    pub writer: Writer,
    #[serde(default)]
    pub cpus: Cpus,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub zstd_level: u32,
    /// `[batch] batch_bytes_max` (bytes): small frames, so the checkpoint advances often.
    pub batch_bytes_max: u64,
}

/// The one paced writer into the pipe source.
#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Writer {
    /// Lines per second, one blocking `write()` per line.
    pub lines_per_s: u64,
    /// Lines written in a full run, and in a quick one.
    pub lines: usize,
    pub quick_lines: usize,
}

/// One run.
#[derive(Serialize, Default, Clone, Debug)]
struct Trial {
    /// The shipper's start → the last checkpoint write (s).
    journal_s: f64,
    entries: u64,
    entries_per_s: f64,
    /// Renames onto the checkpoint file (inotify), i.e. checkpoint writes.
    checkpoint_writes: u64,
    /// `shipper_journal_checkpoint_write_errors_total` at the end.
    checkpoint_write_errors: u64,
    /// Frames acknowledged (journal entries and pipe lines together).
    frames_acked: u64,
    /// The writer's lines, its longest `write()`, when it started and stopped writing
    /// (s after the shipper's start), and how long of that the journal was still being read.
    writer_lines: u64,
    write_block_max_ms: f64,
    writer_from_s: f64,
    writer_to_s: f64,
    overlap_s: f64,
    /// Lines and entries the shipper counted as dropped (pipes drop when the outbox is full).
    dropped: u64,
    /// The shipper's CPU-seconds over the run, and its checkpoint thread's.
    cpu_s: f64,
    checkpoint_thread_cpu_s: f64,
}

const ACKED: &str = "shipper_records_acked_total";
const DROPPED: &str = "shipper_lines_dropped_total";

pub fn run_case(
    name: &str,
    case: &CheckpointCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    let entries = if quick { case.quick_entries } else { case.entries };
    let w = &case.writer;
    let shape = case.workload.one_paced_writer(w.lines_per_s, w.lines, w.quick_lines);
    let load = pipe::load(&shape, quick);
    println!(
        "\n== {name}: {} ({entries} entries; one writer, {} lines at {} lines/s)",
        case.description, load.lines, w.lines_per_s
    );
    let runs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let dir = super::tempdir()?;
    let journal = dir.join("j");
    super::journal::write_journal(&journal, entries, 0)?;
    let cursor = last_cursor(&journal)?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let env = Env { dir: &dir, case, pki: &pki, load: &load, journal: &journal, cursor, quick };
    let mut trials = Vec::new();
    for r in 0..runs {
        let t = run_once(&env, entries as u64, r).with_context(|| format!("run {}", r + 1))?;
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
        "entries": entries,
        "writer_lines": load.lines,
        "writer_bytes": load.bytes,
        "median": median,
        "write_block_max_ms_worst": worst_ms,
        "runs": trials,
    });
    super::save(&run, fields, Some(&md))?;
    if median.checkpoint_writes == 0 || median.writer_lines == 0 {
        bail!("{name}: no checkpoint written or no line written");
    }
    Ok(())
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a CheckpointCase,
    pki: &'a shipper::tls::pki::DevPki,
    load: &'a pipe::Load,
    journal: &'a Path,
    /// The last entry's cursor: the checkpoint's final value.
    cursor: String,
    quick: bool,
}

/// The cursor of the last entry of the journal in `dir`, as `shipper journal cat` prints it
/// (read line by line: the whole output is large).
fn last_cursor(dir: &Path) -> anyhow::Result<String> {
    let bin = crate::root().join("target/release/shipper");
    let mut child = Command::new(&bin)
        .args(["journal", "cat"])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("{} journal cat", bin.display()))?;
    let out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut last = String::new();
    for line in out.lines() {
        last = line?;
    }
    if !child.wait()?.success() {
        bail!("shipper journal cat {} failed", dir.display());
    }
    let v: serde_json::Value = serde_json::from_str(&last).context("journal cat's last line")?;
    let cursor = v.get("__CURSOR").and_then(|c| c.as_str());
    Ok(cursor.context("no __CURSOR in journal cat's last line")?.to_string())
}

/// One run: a fresh receiver, shipper and checkpoint over the same journal files.
fn run_once(env: &Env, entries: u64, run: usize) -> anyhow::Result<Trial> {
    let dir = env.dir.join(format!("run{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    // The checkpoint alone in its directory, which inotify watches.
    std::fs::create_dir_all(dir.join("checkpoint"))?;
    let checkpoint = dir.join("checkpoint/cursor");
    let fifo = dir.join("app.pipe");
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let cpus = &env.case.cpus;
    let rworkers = if cpus.receiver.is_empty() { 2 } else { cpus.receiver.len() };
    let rcfg = pipe::receiver_config(&dir, "receiver", env.pki, rx, rm, rworkers)?;
    let scfg = dir.join("edge.toml");
    let s = &env.case.shipper;
    let body = format!(
        "[[sources.journal]]\ndirectory = {:?}\nsince = \"oldest\"\ncheckpoint = {checkpoint:?}\n\
         [batch]\nzstd_level = {}\nbatch_bytes_max = {}\n",
        env.journal, s.zstd_level, s.batch_bytes_max
    );
    let receivers = format!("primary = [\"127.0.0.1:{rx}\"]\n");
    pipe::shipper_config(&scfg, env.pki, 1, sm, std::slice::from_ref(&fifo), &body, &receivers)?;
    let bin = crate::root().join("target/release/shipper");
    let (rlog, slog) = (dir.join("receiver.log"), dir.join("shipper.log"));
    let rmetrics = format!("127.0.0.1:{rm}");
    let _receiver = Daemon::start_on(&cpus.receiver, &bin, "receive", &rcfg, &rlog, &rmetrics)?;
    let renames = Renames::watch(&checkpoint)?;
    let smetrics = format!("127.0.0.1:{sm}");
    let t0 = Instant::now();
    let ship = Daemon::start_on(&cpus.shipper, &bin, "run", &scfg, &slog, &smetrics)?;
    let writer_from_s = t0.elapsed().as_secs_f64();
    let writers = pipe::spawn_load_writers(env.load, &[fifo], &cpus.loadgen);
    let total = (entries + env.load.lines) as f64;
    let limit = Duration::from_secs(if env.quick { 60 } else { 600 });
    let what = "every entry and line acknowledged or dropped, the checkpoint at the last entry";
    let end = super::until(what, &smetrics, (limit, &dir), (|| renames.poll(), 0), |t| {
        sum(t, ACKED, &[]) + sum(t, DROPPED, &[]) >= total && holds(&checkpoint, &env.cursor)
    })?;
    let (write_block_max_ms, writer_s) = pipe::join_writers(writers)?;
    let checkpoint_writes = renames.poll();
    if renames.lost.get() {
        bail!("inotify lost events on {}: checkpoint writes not counted", checkpoint.display());
    }
    let journal_s = (renames.last.get().unwrap_or(end.at) - t0).as_secs_f64();
    let writer_to_s = writer_from_s + writer_s;
    let text = &end.text;
    let threads = proc_threads_cpu_ns(ship.pid());
    let t = Trial {
        journal_s,
        entries: sum(text, "shipper_journal_entries_read_total", &[]) as u64,
        entries_per_s: entries as f64 / journal_s.max(1e-9),
        checkpoint_writes,
        checkpoint_write_errors: sum(text, "shipper_journal_checkpoint_write_errors_total", &[])
            as u64,
        frames_acked: sum(text, "shipper_frames_acked_total", &[]) as u64,
        writer_lines: env.load.lines,
        write_block_max_ms,
        writer_from_s,
        writer_to_s,
        overlap_s: (journal_s.min(writer_to_s) - writer_from_s).max(0.0),
        dropped: sum(text, DROPPED, &[]) as u64,
        cpu_s: proc_cpu(ship.pid()),
        checkpoint_thread_cpu_s: threads.get("checkpoints").copied().unwrap_or(0.0),
    };
    drop(ship);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(t)
}

/// The checkpoint file holds `cursor`.
fn holds(checkpoint: &Path, cursor: &str) -> bool {
    std::fs::read_to_string(checkpoint).is_ok_and(|c| c.trim() == cursor)
}

/// Counts renames onto one file (inotify `IN_MOVED_TO` of its name in its directory), reading
/// the queued events without blocking each time [`Renames::poll`] is called.
struct Renames {
    fd: OwnedFd,
    name: PathBuf,
    count: Cell<u64>,
    /// When the last rename was seen.
    last: Cell<Option<Instant>>,
    /// The kernel's queue overflowed or a read failed: the count is not exact.
    lost: Cell<bool>,
}

impl Renames {
    fn watch(path: &Path) -> anyhow::Result<Renames> {
        use std::os::unix::ffi::OsStrExt;
        let dir = path.parent().context("the checkpoint's directory")?;
        let name = PathBuf::from(path.file_name().context("the checkpoint's file name")?);
        // SAFETY: a plain system call; the descriptor is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: a valid descriptor and path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MOVED_TO) } < 0 {
            bail!("inotify_add_watch {}: {}", dir.display(), std::io::Error::last_os_error());
        }
        let (count, last, lost) = (Cell::new(0), Cell::new(None), Cell::new(false));
        Ok(Renames { fd, name, count, last, lost })
    }

    /// Reads the events queued so far; the renames counted.
    fn poll(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into our own buffer, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                self.lost.set(self.lost.get() || e.kind() != std::io::ErrorKind::WouldBlock);
            }
            if n <= 0 {
                return self.count.get();
            }
            let mut at = 0;
            while at + HEADER <= n as usize {
                // SAFETY: the kernel wrote a whole event header here.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + HEADER..(at + HEADER + ev.len as usize).min(n as usize)];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                self.lost.set(self.lost.get() || ev.mask & libc::IN_Q_OVERFLOW != 0);
                if ev.mask & libc::IN_MOVED_TO != 0 && name == self.name.as_os_str().as_bytes() {
                    self.count.set(self.count.get() + 1);
                    self.last.set(Some(Instant::now()));
                }
                at += HEADER + ev.len as usize;
            }
        }
    }
}

fn print_trial(t: &Trial, run: usize, runs: usize) {
    println!(
        "   run {}/{}: {} entries in {:.3} s ({:.0}/s), {} checkpoint writes ({} frames acked), \
         writer {} lines, longest write() {:.2} ms, {:.2} of its {:.2} s while the journal was \
         read",
        run + 1,
        runs,
        t.entries,
        t.journal_s,
        t.entries_per_s,
        t.checkpoint_writes,
        t.frames_acked,
        t.writer_lines,
        t.write_block_max_ms,
        t.overlap_s,
        t.writer_to_s - t.writer_from_s,
    );
}

fn markdown(name: &str, case: &CheckpointCase, m: &Trial, worst_ms: f64, all: &[Trial]) -> String {
    use std::fmt::Write;
    let th = super::report::thousands;
    let w = &case.writer;
    let mut md = format!(
        "**{name}** ({}): one worker reads {} journal entries from the oldest with a \
         checkpoint (`batch_bytes_max = {}`, so it advances after every acknowledged frame) \
         while one writer writes {} lines into a pipe source on the same worker, one blocking \
         `write()` per line at {} lines/s; CPUs: shipper {:?}, writer {:?}, receiver {:?}.\n\n\
         **Longest `write()` {:.2} ms** (median of {} run(s); worst {:.2} ms): a blocking call \
         on the worker's thread while the journal checkpoints would show here. Checkpoint \
         writes are the renames onto the checkpoint file (inotify): the checkpoint thread \
         keeps only the newest cursor while it writes, so they are fewer than the frames \
         acknowledged (journal entries and pipe lines together). Entries/s: every entry read, \
         shipped, acknowledged and checkpointed, from the shipper's start.\n\n",
        case.description,
        th(m.entries as f64),
        case.shipper.batch_bytes_max,
        th(m.writer_lines as f64),
        th(w.lines_per_s as f64),
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
        m.write_block_max_ms,
        all.len(),
        worst_ms,
    );
    md += "| run | entries/s | checkpoint writes | frames acked | longest write() | writer \
           while the journal was read | not delivered | shipper CPU s | checkpoint thread \
           CPU s |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (i, t) in all.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2} ms | {:.2} of {:.2} s | {} | {:.3} | {:.3} |",
            i + 1,
            th(t.entries_per_s),
            th(t.checkpoint_writes as f64),
            th(t.frames_acked as f64),
            t.write_block_max_ms,
            t.overlap_s,
            t.writer_to_s - t.writer_from_s,
            th(t.dropped as f64),
            t.cpu_s,
            t.checkpoint_thread_cpu_s,
        );
    }
    md
}
