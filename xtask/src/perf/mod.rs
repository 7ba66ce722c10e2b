//! `cargo xtask perf [CASE...] [--quick] [--runs N] [--against REV]`: end-to-end cases from
//! `perf/cases/<case>/case.toml`, each run beside its baseline and peers in the same invocation.
//! A case's `kind` says what it runs: `pipe` ([`pipe`], the default), `journal` ([`journal`]),
//! `journal-checkpoint` ([`journal_checkpoint`]: a pipe writer's longest `write()` while a
//! journal on the same worker checkpoints at full speed), `buffer` ([`buffer`]), `failover`
//! ([`failover`]), `udp` ([`udp`]: the UDP syslog source with and without the eBPF programs),
//! `file-tail` ([`file_tail`]: files followed while written and rotated, beside syslog-ng's and
//! rsyslog's file inputs), `receiver-outputs` ([`receiver_outputs`]: records per receiver
//! CPU-second into each kind of output) or `takeover` ([`takeover`]: blocking pipe writers'
//! longest `write()` while `shipper run --takeover` replaces the shipper, every line checked
//! exactly once).
//!
//! A pipe case declares its workload (lines, size distribution, services and their skew, pipes,
//! writers, rate), the shipper's settings, the CPU allotment (`taskset` lists for the shipper or
//! peer, the load generator and the receiver or sink), what it optimises and its peers. Every
//! system is run `runs` times; the table shows the median run (by the optimised figure) with the
//! spread, and every run is kept in `perf/results/<date>-<case>.json` beside the git revision,
//! the CPU model, the core count and the exact command. A Markdown table is printed and written
//! beside it, and charts are drawn as PNG ([`chart`]): into `docs/perf/` for a full run, into
//! `perf/results/` (ignored by git) for a quick one.
//!
//! Measures per system: wall time (first write to last line delivered), lines/s, MB/s,
//! CPU-seconds of each process (from /proc), lines per CPU-second, peak RSS (VmHWM), read→ack
//! latency quantiles (the shipper's histograms; the worst core), each writer's longest
//! `write()`, lines delivered and dropped, and per-service deliveries when rates are limited.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use against::Rev;

mod against;
mod bpf;
mod buffer;
mod chart;
mod failover;
mod file_tail;
mod journal;
mod journal_checkpoint;
pub mod peers;
mod pipe;
mod receiver_outputs;
mod report;
mod sink;
mod takeover;
mod udp;

/// One run of one system.
#[derive(Serialize, Default, Clone, Debug)]
pub struct Measure {
    pub label: String,
    pub wall_s: f64,
    pub lines_per_s: f64,
    pub mb_per_s: f64,
    /// CPU-seconds of the processes doing the shipping work (see `processes`).
    pub cpu_s: f64,
    pub lines_per_cpu_s: f64,
    pub cpu_s_per_million_lines: f64,
    /// CPU-seconds per process.
    pub processes: BTreeMap<String, f64>,
    /// Sum of the shipping processes' peak RSS.
    pub peak_rss_kib: u64,
    /// `shipper receive` (the peers' counting sink runs inside xtask and is not measured).
    pub receiver_cpu_s: f64,
    /// (quantile, read→ack milliseconds), the shipper only.
    pub latency_ms: Vec<(f64, f64)>,
    /// The longest `write()` of any writer.
    pub write_block_max_ms: f64,
    pub delivered: u64,
    /// Lines written but not delivered (rate limited, or lost).
    pub dropped: u64,
    /// Lines delivered per service index (rate-limited cases).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_service: Vec<u64>,
    /// Where the machine's time went during the run, by group of threads ("shipper
    /// workers", "shipper other", "receiver", "writers"): [seconds on a CPU, seconds runnable
    /// but waiting for one, times run]; "idle": [CPU-seconds no task used, 0, 0]; "window":
    /// [seconds, CPUs, 0].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sched_s: BTreeMap<String, [f64; 3]>,
}

impl Measure {
    /// Rates from the counts; `lines` and `bytes` are what was written.
    fn fill(&mut self, lines: u64, bytes: u64) {
        let wall = self.wall_s.max(1e-9);
        self.lines_per_s = self.delivered as f64 / wall;
        self.mb_per_s = bytes as f64 * (self.delivered as f64 / lines.max(1) as f64) / wall / 1e6;
        if self.cpu_s > 0.0 {
            self.lines_per_cpu_s = self.delivered as f64 / self.cpu_s;
            // Per delivered line, like lines_per_cpu_s: what a line that arrived cost.
            self.cpu_s_per_million_lines = self.cpu_s / (self.delivered.max(1) as f64 / 1e6);
        }
    }

    pub fn latency(&self, q: f64) -> Option<f64> {
        self.latency_ms.iter().find(|(k, _)| *k == q).map(|(_, v)| *v)
    }
}

/// What `cargo xtask perf` was asked for.
struct Options {
    names: Vec<String>,
    quick: bool,
    runs: Option<usize>,
    /// `--against REV`: the revision whose shipper runs beside this checkout's.
    against: Option<String>,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options { names: Vec::new(), quick: false, runs: None, against: None };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--runs" => {
                let n = it.next().context("--runs needs a number")?;
                o.runs = Some(n.parse::<usize>().with_context(|| format!("--runs {n}"))?.max(1));
            }
            "--against" => {
                o.against = Some(it.next().context("--against needs a revision")?.clone())
            }
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            name => o.names.push(name.to_string()),
        }
    }
    Ok(o)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut o = options(args)?;
    let cases_dir = crate::root().join("perf/cases");
    if o.names.is_empty() {
        for e in std::fs::read_dir(&cases_dir)? {
            o.names.push(e?.file_name().to_string_lossy().into_owned());
        }
        o.names.sort();
    }
    for (peer, why) in crate::setup::peers() {
        println!("perf peer {peer} will be skipped: {why}");
    }
    crate::run("cargo", &["build", "--release", "-p", "shipper"])?;
    let against = o.against.as_deref().map(against::build).transpose()?;
    let mut failed = Vec::new();
    for name in &o.names {
        if let Err(e) = run_case(&cases_dir, name, &o, against.as_ref()) {
            eprintln!(
                "
!! case {name} FAILED: {e:#}"
            );
            failed.push(name.clone());
        }
    }
    if !failed.is_empty() {
        bail!("perf cases failed: {}", failed.join(", "));
    }
    Ok(())
}

fn run_case(dir: &Path, name: &str, o: &Options, against: Option<&Rev>) -> anyhow::Result<()> {
    let (quick, runs) = (o.quick, o.runs);
    let path = dir.join(name).join("case.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let command = format!(
        "cargo xtask perf {name}{}{}{}",
        if quick { " --quick" } else { "" },
        runs.map_or(String::new(), |n| format!(" --runs {n}")),
        o.against.as_ref().map_or(String::new(), |r| format!(" --against {r}"))
    );
    let kind = table.get("kind").and_then(|k| k.as_str()).unwrap_or("pipe");
    if against.is_some() && kind != "pipe" {
        bail!("--against runs pipe cases only; {name} is a {kind} case");
    }
    match kind {
        "pipe" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            run_pipe_case(name, &case, (quick, runs, against), &command)
        }
        "journal" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            journal::run_case(name, &case, quick, &command)
        }
        "journal-checkpoint" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            journal_checkpoint::run_case(name, &case, quick, runs, &command)
        }
        "buffer" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            buffer::run_case(name, &case, quick, runs, &command)
        }
        "failover" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            failover::run_case(name, &case, quick, runs, &command)
        }
        "udp" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            udp::run_case(name, &case, quick, runs, &command)
        }
        "file-tail" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            file_tail::run_case(name, &case, quick, runs, &command)
        }
        "receiver-outputs" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            receiver_outputs::run_case(name, &case, quick, runs, &command)
        }
        "takeover" => {
            let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            takeover::run_case(name, &case, quick, runs, &command)
        }
        other => bail!(
            "{}: unknown kind {other:?} (pipe, journal, journal-checkpoint, buffer, failover, \
             udp, file-tail, receiver-outputs, takeover)",
            path.display()
        ),
    }
}

/// The systems a pipe case runs, in the order of each run: this checkout's shipper at each
/// worker count (each followed by `against`'s at the same count), then the peers that can do
/// the case's work; and the peers skipped, with why.
fn systems(
    case: &pipe::PipeCase,
    against: Option<&Rev>,
) -> (Vec<pipe::System>, BTreeMap<String, String>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let counts: Vec<usize> = match &case.shipper.worker_counts {
        Some(c) if c == &[0] => (1..=cores).collect(),
        Some(c) => c.clone(),
        None => vec![case.shipper.workers.unwrap_or(cores)],
    };
    let mut systems = Vec::new();
    for workers in counts {
        systems.push(pipe::System::Shipper { workers, rev: None });
        if let Some(rev) = against {
            systems.push(pipe::System::Shipper { workers, rev: Some(rev.clone()) });
        }
    }
    let mut skipped = BTreeMap::new();
    for peer in &case.peers {
        match skip_reason(case, peer) {
            Some(why) => {
                println!("   {peer}: skipped ({why})");
                skipped.insert(peer.clone(), why);
            }
            None => systems.push(pipe::System::Peer(peer.clone())),
        }
    }
    (systems, skipped)
}

/// Why a case's peer cannot do the case's work, if it cannot.
fn skip_reason(case: &pipe::PipeCase, peer: &str) -> Option<String> {
    if let Err(why) = peers::available(peer) {
        return Some(why);
    }
    if case.shipper.ratelimit_rate > 0 && peer == "rsyslog" {
        return Some(
            "rsyslog 8.2302 has no per-key rate limit (its ratelimit object is 8.2602+)".into(),
        );
    }
    if case.shipper.ratelimit_rate > 0 && peer == "raw" {
        return Some("a raw copy cannot rate-limit".into());
    }
    None
}

/// Runs a pipe case: every system `runs` times, interleaved run by run (`(quick, runs,
/// against)`: `against` adds another revision's shipper beside each of this checkout's).
fn run_pipe_case(
    name: &str,
    case: &pipe::PipeCase,
    (quick, runs, against): (bool, Option<usize>, Option<&Rev>),
    command: &str,
) -> anyhow::Result<()> {
    let w = &case.workload;
    let load = pipe::load(w, quick);
    println!(
        "\n== {name}: {} ({} lines, {:.0} bytes on average, {} pipes x {} writers, {})",
        case.description,
        load.lines,
        load.bytes as f64 / load.lines.max(1) as f64,
        w.pipes,
        w.writers_per_pipe,
        if w.rate > 0 { format!("{} lines/s", w.rate) } else { "as fast as possible".into() }
    );
    let scaling = case.shipper.worker_counts.is_some();
    let (systems, skipped) = systems(case, against);
    let runs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let dir = tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let env = pipe::Env { dir: &dir, case, pki: &pki, load: &load, quick };
    let mut all: Vec<Vec<Measure>> = vec![Vec::new(); systems.len()];
    for r in 0..runs {
        for (i, s) in systems.iter().enumerate() {
            let label = s.label(scaling);
            let m = pipe::run_once(&env, s, &label)
                .with_context(|| format!("{label}, run {}", r + 1))?;
            report::print_run(&m, r, runs);
            all[i].push(m);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let results: Vec<report::SystemResult> = systems
        .iter()
        .zip(all)
        .map(|(s, runs)| {
            report::SystemResult::new(s.label(scaling), s.clone(), runs, &case.optimises)
        })
        .collect();
    let md = report::markdown(name, case, &load, &results, &skipped);
    println!("\n{md}");
    let charts = chart::draw(name, quick, case, &load, &results)?;
    let run =
        Run { name, description: &case.description, optimises: &case.optimises, quick, command };
    let fields = serde_json::json!({
        "case_toml": case,
        "lines": load.lines,
        "bytes": load.bytes,
        "offered_per_service": load.per_service,
        "systems": results,
        "skipped": skipped,
        "charts": charts,
    });
    save(&run, fields, Some(&md))?;
    check(name, &results)
}

/// A run fails loudly when a system delivered nothing (or errored above): the suite must not
/// rot into reporting zeros. Undelivered lines are a result, reported, not a failure.
fn check(name: &str, results: &[report::SystemResult]) -> anyhow::Result<()> {
    for r in results {
        let m = &r.median;
        if m.delivered == 0 {
            bail!("{name}: {} delivered no line", r.label);
        }
        if m.dropped > 0 {
            println!("   note: {} did not deliver {} lines (see the table)", r.label, m.dropped);
        }
    }
    Ok(())
}

/// `perf/results/<date>-<case>[-quick].<ext>`.
fn results_path(name: &str, quick: bool, ext: &str) -> PathBuf {
    let out = crate::root().join("perf/results");
    let _ = std::fs::create_dir_all(&out);
    out.join(format!("{}-{name}{}.{ext}", today(), if quick { "-quick" } else { "" }))
}

/// Pins the calling thread to `cpus` (nothing when empty).
pub(crate) fn pin_current_thread(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The calling thread's CPU affinity, given back when dropped ([`pin_current_thread_for`]).
pub(crate) struct Affinity(libc::cpu_set_t);

impl Drop for Affinity {
    fn drop(&mut self) {
        // SAFETY: restores the set read by pin_current_thread_for on this same thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// Pins the calling thread to `cpus` until the returned guard is dropped (processes it
/// starts meanwhile inherit the pinning unless they are given CPUs of their own).
pub(crate) fn pin_current_thread_for(cpus: &[usize]) -> Affinity {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity(0) fills it for the calling thread.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) };
    pin_current_thread(cpus);
    Affinity(old)
}

/// Creates a FIFO and holds it open (read-write, so neither side blocks or sees EOF between
/// writers), with the same 1 MiB pipe buffer the shipper asks for its own FIFOs.
pub(crate) fn fifo_held(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!("mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    // SAFETY: F_SETPIPE_SZ on our own descriptor.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok(f)
}

/// Bytes of the files named `*.<ext>` one level below `dir`, outside directories whose name
/// starts with a dot: a receiver's output (`STREAM/*.log`, not `.state/`) or a disk buffer's
/// segments (`core-N/*.seg`). Files grow as soon as they are written, unlike the counters
/// that workers publish every 250 ms, so the suite times phase ends with them.
pub(crate) fn files_bytes(dir: &Path, ext: &str) -> u64 {
    let mut total = 0;
    for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if sub.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == ext) {
                total += f.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

/// The end of a phase: when the watched bytes first and last changed, when the metrics
/// said done, and that scrape.
pub(crate) struct End {
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    pub at: Instant,
    pub text: String,
}

/// Polls until a scrape of the metrics at `addr` (every 50 ms) satisfies `done`, meanwhile
/// reading `watch.0()` every 10 ms and noting when it first moved from `watch.1` and when it
/// last changed. Counters are published every 250 ms, files grow as they are written: the
/// files time the phase, the counters say it is complete. Fails after `limit.0`, naming the
/// directory `limit.1` to look into.
pub(crate) fn until(
    what: &str,
    addr: &str,
    limit: (Duration, &Path),
    watch: (impl Fn() -> u64, u64),
    mut done: impl FnMut(&str) -> bool,
) -> anyhow::Result<End> {
    let deadline = Instant::now() + limit.0;
    let (mut bytes, mut first, mut last) = (watch.1, None, None);
    for i in 0u64.. {
        let now = Instant::now();
        let b = (watch.0)();
        if b != bytes {
            bytes = b;
            first = first.or(Some(now));
            last = Some(now);
        }
        if i % 5 == 0 {
            if let Some(text) = shipper::metrics::http::get(addr) {
                if done(&text) {
                    return Ok(End { first, last, at: now, text });
                }
            }
        }
        if now > deadline {
            bail!("{what}: not after {:?}; see {}", limit.0, limit.1.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    unreachable!("the loop above returns or fails")
}

/// What every case's results begin with: the case, its goal, the command that ran it, and the
/// machine and revision it ran on.
pub(crate) struct Run<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub optimises: &'a str,
    pub quick: bool,
    pub command: &'a str,
}

/// Writes `perf/results/<date>-<case>[-quick].json` (`run`'s fields, then the case's own
/// `fields`, a JSON object) and, when given, the Markdown summary `md` beside it.
pub(crate) fn save(run: &Run, fields: serde_json::Value, md: Option<&str>) -> anyhow::Result<()> {
    let mut result = serde_json::json!({
        "case": run.name,
        "description": run.description,
        "optimises": run.optimises,
        "quick": run.quick,
        "git_revision": git_revision(),
        "cpu_model": cpu_model(),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "command": run.command,
    });
    let (Some(all), serde_json::Value::Object(more)) = (result.as_object_mut(), fields) else {
        bail!("{}: results fields must be a JSON object", run.name);
    };
    all.extend(more);
    let file = results_path(run.name, run.quick, "json");
    std::fs::write(&file, serde_json::to_string_pretty(&result)?)?;
    println!("   results: {}", file.display());
    if let Some(md) = md {
        let path = results_path(run.name, run.quick, "md");
        std::fs::write(&path, md)?;
        println!("   summary: {}", path.display());
    }
    Ok(())
}

pub(crate) fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("shipper-perf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits for `child`; returns its CPU-seconds and peak RSS in KiB (which, for a child forked
/// from this process, includes what it inherited before exec: keep this process small first).
pub(crate) fn wait_rusage(child: Child) -> anyhow::Result<(f64, u64)> {
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4 for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) } < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64))
}

/// utime + stime of a live process, in seconds.
pub(crate) fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU-seconds of each live thread of a process so far, summed by thread name (`comm`), from
/// the scheduler's run times as [`proc_cpu_ns`].
pub(crate) fn proc_threads_cpu_ns(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let [on_cpu_s, ..] = crate::loadgen::thread_sched_s(&t.path().join("schedstat"));
        *by_name.entry(comm.trim().to_string()).or_insert(0.0) += on_cpu_s;
    }
    by_name
}

/// Context switches of a process so far, summed over its live threads: (voluntary, i.e.
/// sleeps, involuntary, i.e. preempted), from `/proc/PID/task/*/status`.
pub(crate) fn proc_ctx_switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
        };
        total.0 += field("voluntary_ctxt_switches:");
        total.1 += field("nonvoluntary_ctxt_switches:");
    }
    total
}

/// The scheduler's account ([`crate::loadgen::thread_sched_s`]) of each live thread of a
/// process so far, summed by whether its name (`comm`) starts with `prefix` (`true`) or not.
pub(crate) fn proc_sched_s(pid: u32, prefix: &str) -> BTreeMap<bool, [f64; 3]> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let s = crate::loadgen::thread_sched_s(&t.path().join("schedstat"));
        let e: &mut [f64; 3] = out.entry(comm.starts_with(prefix)).or_default();
        (0..3).for_each(|i| e[i] += s[i]);
    }
    out
}

/// The median of `runs` by `key` (the upper one of an even count), and the highest `key`;
/// fails on no runs.
pub(crate) fn median_and_worst<T: Clone>(
    runs: &[T],
    key: impl Fn(&T) -> f64,
) -> anyhow::Result<(T, f64)> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let median = sorted.get(sorted.len() / 2).context("no runs")?.clone();
    let worst = sorted.last().map_or(0.0, &key);
    Ok((median, worst))
}

/// CPUs this machine has online (`_SC_NPROCESSORS_ONLN`: every CPU `/proc/stat` counts, not
/// only those the calling thread may run on).
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Idle seconds of `cpus` so far (idle and iowait of `/proc/stat`: measured at each entry to
/// and exit from idle on a tickless kernel, where busy time is only sampled at the ticks).
pub(crate) fn cpus_idle_s(cpus: &[usize]) -> f64 {
    cpus_stat_s(cpus, |v| v[3] + v[4])
}

/// Busy seconds of `cpus` so far (everything but idle and iowait, from `/proc/stat`), all
/// processes and the kernel together.
pub(crate) fn cpus_busy_s(cpus: &[usize]) -> f64 {
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    cpus_stat_s(cpus, |v| v.iter().sum::<u64>() - v[3] - v[4])
}

/// The sum over `cpus` of `pick` applied to each one's first eight `/proc/stat` fields, in
/// seconds.
fn cpus_stat_s(cpus: &[usize], pick: impl Fn(&[u64; 8]) -> u64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut ticks = 0u64;
    for l in stat.lines() {
        let mut f = l.split_whitespace();
        let Some(cpu) = f.next().and_then(|n| n.strip_prefix("cpu")?.parse::<usize>().ok()) else {
            continue;
        };
        if cpus.contains(&cpu) {
            let mut v = [0u64; 8];
            for (slot, x) in v.iter_mut().zip(f) {
                *slot = x.parse().unwrap_or(0);
            }
            ticks += pick(&v);
        }
    }
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (user, system) CPU-seconds of a process so far, 10 ms ticks (`/proc/PID/stat`).
pub(crate) fn proc_cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).unwrap_or(&0.0) / hz, f.get(12).unwrap_or(&0.0) / hz)
}

/// Minor page faults of a process so far, all its threads (`minflt` of /proc/PID/stat).
pub(crate) fn proc_minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    after.split_whitespace().nth(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// CPU-seconds of a live process from the scheduler's run time of each of its threads
/// (`/proc/PID/task/*/schedstat`, nanoseconds), for differences finer than the 10 ms ticks
/// of [`proc_cpu`]. A thread that exits takes its time with it: use it on processes whose
/// threads live as long as they do (the shipper's workers, metrics and eBPF threads).
pub(crate) fn proc_cpu_ns(pid: u32) -> f64 {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ns as f64 / 1e9
}

pub(crate) fn proc_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A `kB` field of `/proc/PID/status` (`"VmRSS:"`), 0 when absent.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(crate::root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

pub(crate) fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output().ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// The load generators' seed when a case names none.
pub fn default_seed() -> u64 {
    0x5eed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_take_cases_flags_and_a_revision() {
        let args = ["pipe-throughput", "--quick", "--against", "HEAD~1", "--runs", "3"];
        let o = options(&args.map(String::from)).unwrap();
        assert_eq!(o.names, ["pipe-throughput"]);
        assert_eq!((o.quick, o.runs, o.against.as_deref()), (true, Some(3), Some("HEAD~1")));
        let e = options(&["--against".to_string()]).err().unwrap();
        assert_eq!(e.to_string(), "--against needs a revision");
    }
}
