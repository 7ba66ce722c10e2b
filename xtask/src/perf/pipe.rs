//! Pipe cases: the same deterministic lines written into FIFOs by several blocking writers,
//! shipped by the shipper (FIFO → `shipper run` → mutual TLS, acks → `shipper receive`) and by
//! each peer of the case ([`super::peers`]) into a counting sink, one system after another,
//! `runs` times over (interleaved, so that a noisy neighbour hurts all of them alike).
//!
//! A run ends when every line is accounted for (the shipper: acknowledged or counted as
//! dropped; a peer: arrived at the sink), or when nothing arrived for `stall` after the writers
//! finished (a peer that dropped lines: it has no counter to ask).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::http::get;
use shipper::metrics::text::sum;

use super::against::Rev;
use super::peers::{self, Tls};
use super::sink::Sink;
use super::{proc_cpu, proc_hwm_kib, Measure};
use crate::daemon::{free_port, Daemon};
use crate::loadgen::{self, Pace, Shape, Written};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PipeCase {
    #[serde(default)]
    pub kind: Option<String>,
    pub description: String,
    /// `throughput`, `cpu_per_line`, `latency` or `fairness`: what the table leads with and
    /// which run of several is the median one.
    pub optimises: String,
    /// Peers run beside the shipper: `raw`, `syslog-ng`, `rsyslog`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Runs of each system in a full run (`--runs N` overrides; quick runs do one).
    #[serde(default = "one")]
    pub runs: usize,
    pub workload: Workload,
    pub shipper: ShipperSettings,
    #[serde(default)]
    pub cpus: Cpus,
}

fn one() -> usize {
    1
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub lines: usize,
    pub quick_lines: usize,
    /// Line sizes are log-uniform between these (bytes, newline included).
    pub line_bytes_min: usize,
    pub line_bytes_max: usize,
    pub services: usize,
    /// Zipf exponent of the services' shares (0: even).
    #[serde(default)]
    pub skew: f64,
    /// Share of all lines from `svc-00`, the noisy service (0: none).
    #[serde(default)]
    pub noisy_share: f64,
    /// Share of lines in the cfjs1 form.
    #[serde(default)]
    pub cfjs1_share: f64,
    pub pipes: usize,
    #[serde(default = "one")]
    pub writers_per_pipe: usize,
    /// Lines per second over all writers; 0 = as fast as they can.
    #[serde(default)]
    pub rate: u64,
    /// One `write()` per line (otherwise whole lines, up to 64 KiB, or PIPE_BUF when writers
    /// share a pipe).
    #[serde(default)]
    pub write_per_line: bool,
    /// Bytes of whole lines per `write()` of a pipe's only writer (default 64 KiB; writers
    /// sharing a pipe write at most 4 KiB, `PIPE_BUF`, so that lines never interleave).
    #[serde(default)]
    pub write_bytes: Option<usize>,
    #[serde(default = "super::default_seed")]
    pub seed: u64,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ShipperSettings {
    /// Worker threads; `worker_counts` instead runs the shipper once per count
    /// (`[0]` means 1..=cores).
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub worker_counts: Option<Vec<usize>>,
    #[serde(default = "one_u32")]
    pub zstd_level: u32,
    /// Lines per second per service (burst = one second of it), 0 = unlimited; the peers that
    /// can rate-limit by key are given the same limit.
    #[serde(default)]
    pub ratelimit_rate: u64,
    /// `batch.flush_interval_ms` (ms; default the shipper's own, 200).
    #[serde(default)]
    pub flush_interval_ms: Option<u64>,
    /// `batch.idle_seal_delay_ms` (ms; default the shipper's own, 2; not written when not
    /// set, so that a revision without the key can run the case with `--against`).
    #[serde(default)]
    pub idle_seal_delay_ms: Option<u64>,
    /// `shipper.pin_workers` (default the shipper's own, true).
    #[serde(default)]
    pub pin_workers: Option<bool>,
}

impl Workload {
    /// This workload's lines as one application-like writer writes them: one pipe, one
    /// blocking `write()` per line at `lines_per_s`, `lines` lines (`quick_lines` in a quick
    /// run). Its longest `write()` is what a blocking call on the shipper's worker would show.
    pub fn one_paced_writer(&self, lines_per_s: u64, lines: usize, quick_lines: usize) -> Self {
        Workload {
            pipes: 1,
            writers_per_pipe: 1,
            write_per_line: true,
            rate: lines_per_s,
            lines,
            quick_lines,
            ..self.clone()
        }
    }
}

fn one_u32() -> u32 {
    1
}

/// CPU allotment: the CPUs each side may run on (`taskset -c`; empty: all).
#[derive(Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Cpus {
    /// The shipper or the peer (socat, syslog-ng, rsyslog and its bridge).
    #[serde(default)]
    pub shipper: Vec<usize>,
    /// The writer threads.
    #[serde(default)]
    pub loadgen: Vec<usize>,
    /// `shipper receive` or the counting sink.
    #[serde(default)]
    pub receiver: Vec<usize>,
}

/// One system under test: the shipper with a worker count (this checkout's build, or
/// another revision's: `--against`), or a peer.
#[derive(Clone)]
pub enum System {
    Shipper { workers: usize, rev: Option<Rev> },
    Peer(String),
}

impl System {
    /// `shipper`, `shipper@<rev>`, with ` (<workers>w)` when the case scales the workers; or
    /// the peer's name.
    pub fn label(&self, scaling: bool) -> String {
        match self {
            System::Shipper { workers, rev } => {
                let name =
                    rev.as_ref().map_or("shipper".into(), |r| format!("shipper@{}", r.short));
                if scaling {
                    format!("{name} ({workers}w)")
                } else {
                    name
                }
            }
            System::Peer(p) => p.clone(),
        }
    }
}

/// The lines of every writer, generated once per case, and what they hold.
pub struct Load {
    pub writers: Vec<Arc<Vec<u8>>>,
    pub lines: u64,
    pub bytes: u64,
    /// Lines per service index.
    pub per_service: Vec<u64>,
    pub pace: Pace,
}

pub fn load(w: &Workload, quick: bool) -> Load {
    let shape = Shape {
        seed: w.seed,
        line_bytes_min: w.line_bytes_min,
        line_bytes_max: w.line_bytes_max,
        services_cdf: loadgen::service_weights(w.services, w.skew, w.noisy_share),
        cfjs1_share: w.cfjs1_share,
    };
    let n_writers = w.pipes * w.writers_per_pipe.max(1);
    let lines = if quick { w.quick_lines } else { w.lines } / n_writers;
    let writers: Vec<Arc<Vec<u8>>> = (0..n_writers)
        .map(|i| {
            let mut buf = Vec::new();
            loadgen::lines(&shape, i, lines, &mut buf);
            Arc::new(buf)
        })
        .collect();
    let mut per_service = vec![0; super::sink::SERVICES_MAX];
    for d in &writers {
        super::sink::count_services(d, &mut per_service);
    }
    Load {
        lines: (lines * n_writers) as u64,
        bytes: writers.iter().map(|d| d.len() as u64).sum(),
        writers,
        per_service,
        pace: Pace {
            rate: w.rate as f64 / n_writers as f64,
            write_per_line: w.write_per_line,
            chunk_bytes: if w.writers_per_pipe > 1 {
                4096
            } else {
                w.write_bytes.unwrap_or(64 << 10)
            },
        },
    }
}

/// What a started system offers the run: the FIFOs to write into and how far it got.
struct Started {
    /// Processes doing the shipping work (their CPU is the system's CPU).
    shipping: Vec<(String, Daemon)>,
    /// `shipper receive`, whose CPU is reported apart.
    receiver: Option<Daemon>,
    fifos: Vec<PathBuf>,
    /// Descriptors holding a peer's FIFOs open between writers (kept until the run ends).
    _holds: Vec<std::fs::File>,
    progress: Progress,
}

enum Progress {
    Sink(Sink),
    Shipper { metrics: String },
}

impl Progress {
    /// (lines delivered, lines accounted for: delivered or counted as dropped)
    fn poll(&self) -> (u64, u64, String) {
        match self {
            Progress::Sink(s) => (s.lines(), s.lines(), String::new()),
            Progress::Shipper { metrics } => {
                let text = get(metrics).unwrap_or_default();
                let acked = sum(&text, "shipper_records_acked_total", &[]) as u64;
                let dropped = sum(&text, "shipper_lines_dropped_total", &[]) as u64;
                (acked, acked + dropped, text)
            }
        }
    }
}

pub struct Env<'a> {
    pub dir: &'a Path,
    pub case: &'a PipeCase,
    pub pki: &'a shipper::tls::pki::DevPki,
    pub load: &'a Load,
    pub quick: bool,
}

/// Runs `system` once over the case's load.
pub fn run_once(env: &Env, system: &System, label: &str) -> anyhow::Result<Measure> {
    let dir = env.dir.join(label.replace([' ', '(', ')'], ""));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let started = match system {
        System::Shipper { workers, rev } => start_shipper(env, &dir, *workers, rev.as_ref())?,
        System::Peer(p) => start_peer(env, &dir, p)?,
    };
    let cpu0: Vec<f64> = started.shipping.iter().map(|(_, d)| proc_cpu(d.pid())).collect();
    let rcpu0 = started.receiver.as_ref().map_or(0.0, |r| proc_cpu(r.pid()));
    let sched0 = Sched::now(&started);
    let start = Instant::now();
    let writers = spawn_writers(env, &started.fifos);
    let (delivered, accounted_at, text) = wait(env, &started, start, label, &writers)?;
    let wall_s = accounted_at.duration_since(start).as_secs_f64();
    let sched = Sched::now(&started).since(&sched0);
    let mut written = Vec::new();
    for w in writers {
        written.push(w.join().expect("writer thread")?);
    }
    let mut m = Measure { label: label.to_string(), wall_s, ..Measure::default() };
    m.sched_s = sched.account(&written);
    for ((name, d), c0) in started.shipping.iter().zip(&cpu0) {
        let cpu = proc_cpu(d.pid()) - c0;
        m.cpu_s += cpu;
        m.processes.insert(name.clone(), cpu);
        m.peak_rss_kib += proc_hwm_kib(d.pid());
    }
    if let Some(r) = &started.receiver {
        m.receiver_cpu_s = proc_cpu(r.pid()) - rcpu0;
    }
    m.write_block_max_ms = written.iter().map(|w| w.write_block_max_s).fold(0.0, f64::max) * 1e3;
    m.delivered = delivered;
    m.dropped = env.load.lines.saturating_sub(delivered);
    match &started.progress {
        Progress::Sink(s) => m.per_service = s.per_service(),
        Progress::Shipper { .. } => shipper_extras(&text, &mut m),
    }
    m.fill(env.load.lines, env.load.bytes);
    drop(started);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(m)
}

/// The scheduler's account of the shipper's and the receiver's threads, and of every CPU.
#[derive(Default)]
struct Sched {
    groups: BTreeMap<String, [f64; 3]>,
    idle_s: f64,
    at: Option<Instant>,
    span_s: f64,
}

impl Sched {
    fn now(s: &Started) -> Sched {
        let mut groups = BTreeMap::new();
        let mut add = |name: &str, v: [f64; 3]| {
            let e: &mut [f64; 3] = groups.entry(name.to_string()).or_default();
            (0..3).for_each(|i| e[i] += v[i]);
        };
        if matches!(s.progress, Progress::Shipper { .. }) {
            for (_, d) in &s.shipping {
                for (worker, v) in super::proc_sched_s(d.pid(), "worker-") {
                    add(if worker { "shipper workers" } else { "shipper other" }, v);
                }
            }
        }
        if let Some(r) = &s.receiver {
            for v in super::proc_sched_s(r.pid(), "").into_values() {
                add("receiver", v);
            }
        }
        let cpus: Vec<usize> = (0..super::online_cpus()).collect();
        Sched { groups, idle_s: super::cpus_idle_s(&cpus), at: Some(Instant::now()), span_s: 0.0 }
    }

    fn since(mut self, before: &Sched) -> Sched {
        for (k, v) in &mut self.groups {
            let b = before.groups.get(k).copied().unwrap_or_default();
            (0..3).for_each(|i| v[i] -= b[i]);
        }
        self.idle_s -= before.idle_s;
        if let (Some(a), Some(b)) = (self.at, before.at) {
            self.span_s = a.duration_since(b).as_secs_f64();
        }
        self
    }

    /// The groups, the writers (from their own account), the CPUs' idle time and the window
    /// both were taken over (`"window"`: [seconds, CPUs, 0]).
    fn account(mut self, written: &[loadgen::Written]) -> BTreeMap<String, [f64; 3]> {
        if self.groups.is_empty() {
            return self.groups;
        }
        let mut writers = [0.0; 3];
        for w in written {
            (0..3).for_each(|i| writers[i] += w.sched_s[i]);
        }
        self.groups.insert("writers".into(), writers);
        let cpus = super::online_cpus() as f64;
        self.groups.insert("idle".into(), [self.idle_s, 0.0, 0.0]);
        self.groups.insert("window".into(), [self.span_s, cpus, 0.0]);
        self.groups
    }
}

/// Latency quantiles and per-service admitted counts from the shipper's last scrape.
fn shipper_extras(text: &str, m: &mut Measure) {
    // Quantiles are per core: the worst core's is the honest figure for the whole.
    let q = |q: &str| {
        text.lines()
            .filter(|l| l.starts_with("shipper_read_to_ack_latency_seconds{"))
            .filter(|l| l.contains(&format!("quantile=\"{q}\"")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold(0.0, f64::max)
            * 1e3
    };
    m.latency_ms = ["0.5", "0.9", "0.99", "0.999", "1"]
        .iter()
        .map(|s| (s.parse::<f64>().expect("a number"), q(s)))
        .collect();
    m.per_service = (0..super::sink::SERVICES_MAX)
        .map(|i| {
            let svc = format!("svc-{i:02}");
            sum(text, "shipper_lines_admitted_total", &[("service", &svc)]) as u64
        })
        .collect();
}

pub(super) type Writers = Vec<std::thread::JoinHandle<std::io::Result<Written>>>;

fn spawn_writers(env: &Env, fifos: &[PathBuf]) -> Writers {
    spawn_load_writers(env.load, fifos, &env.case.cpus.loadgen)
}

/// One blocking writer thread per writer of `load`, writer `i` into `fifos[i % fifos.len()]`,
/// each pinned to `cpus`.
pub(super) fn spawn_load_writers(load: &Load, fifos: &[PathBuf], cpus: &[usize]) -> Writers {
    load.writers
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let (path, data) = (fifos[i % fifos.len()].clone(), data.clone());
            let (pace, cpus) = (load.pace, cpus.to_vec());
            std::thread::spawn(move || {
                super::pin_current_thread(&cpus);
                loadgen::write_lines(&path, &data, pace)
            })
        })
        .collect()
}

/// Joins the writers; their longest `write()` in ms, and the longest writer's seconds.
pub(super) fn join_writers(writers: Writers) -> anyhow::Result<(f64, f64)> {
    let (mut max, mut secs): (f64, f64) = (0.0, 0.0);
    for w in writers {
        let w = w.join().expect("writer thread")?;
        (max, secs) = (max.max(w.write_block_max_s), secs.max(w.secs));
    }
    Ok((max * 1e3, secs))
}

/// Polls until every line is accounted for, or nothing moved for a while after the writers
/// finished; returns the lines delivered, when the last one was, and the last scrape.
fn wait(
    env: &Env,
    s: &Started,
    start: Instant,
    label: &str,
    writers: &Writers,
) -> anyhow::Result<(u64, Instant, String)> {
    let total = env.load.lines;
    let stall = Duration::from_secs(if env.quick { 2 } else { 5 });
    let deadline = start + Duration::from_secs(if env.quick { 120 } else { 900 });
    let tty = std::io::stdout().is_terminal();
    let (mut last, mut last_at, mut shown) = (0, Instant::now(), Instant::now());
    loop {
        let (delivered, accounted, text) = s.progress.poll();
        let now = Instant::now();
        if accounted != last {
            (last, last_at) = (accounted, now);
        }
        if accounted >= total {
            clear_bar(tty);
            return Ok((delivered, last_at, text));
        }
        let writing = writers.iter().any(|w| !w.is_finished());
        if !writing && now.duration_since(last_at) > stall {
            clear_bar(tty);
            return Ok((delivered, last_at, text));
        }
        if now > deadline {
            bail!(
                "{label}: {accounted} of {total} lines after the deadline; see {}",
                env.dir.display()
            );
        }
        if tty && now.duration_since(shown) > Duration::from_millis(250) {
            shown = now;
            bar(label, accounted, total, start.elapsed().as_secs_f64(), "lines");
        }
        // Scrapes cost the shipper CPU; 50 ms keeps them under 0.1% of a run.
        let poll = if matches!(s.progress, Progress::Sink(_)) { 5 } else { 50 };
        std::thread::sleep(Duration::from_millis(poll));
    }
}

/// A one-line progress bar (call it only on a terminal): `done` of `total` `unit`s.
pub(super) fn bar(label: &str, done: u64, total: u64, secs: f64, unit: &str) {
    use std::io::Write;
    let width = 30;
    let filled = (done as f64 / total.max(1) as f64 * width as f64) as usize;
    print!(
        "\r   {label:<14} [{}{}] {:>5.1}% {:>9.0} {unit}/s ",
        "#".repeat(filled.min(width)),
        ".".repeat(width - filled.min(width)),
        done as f64 / total.max(1) as f64 * 100.0,
        done as f64 / secs.max(1e-9)
    );
    let _ = std::io::stdout().flush();
}

pub(super) fn clear_bar(tty: bool) {
    if tty {
        print!("\r{:80}\r", "");
    }
}

/// Starts a receiver and the shipper (this checkout's release build, or `rev`'s) with
/// `workers` workers.
fn start_shipper(
    env: &Env,
    dir: &Path,
    workers: usize,
    rev: Option<&Rev>,
) -> anyhow::Result<Started> {
    let (case, pki) = (env.case, env.pki);
    let bin = rev.map_or_else(|| crate::root().join("target/release/shipper"), |r| r.bin.clone());
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let rworkers = if case.cpus.receiver.is_empty() { 2 } else { case.cpus.receiver.len() };
    let rcfg = receiver_config(dir, "receiver", pki, rx, rm, rworkers)?;
    let fifos: Vec<PathBuf> =
        (0..case.workload.pipes).map(|i| dir.join(format!("ship{i}.pipe"))).collect();
    let rate = case.shipper.ratelimit_rate;
    let limit = if rate > 0 {
        format!("[ratelimit]\nkey_field = \"service\"\nrate = {rate}\nburst = {rate}\n")
    } else {
        String::new()
    };
    let flush = case
        .shipper
        .flush_interval_ms
        .map_or(String::new(), |ms| format!("flush_interval_ms = {ms}\n"));
    let floor = case
        .shipper
        .idle_seal_delay_ms
        .map_or(String::new(), |ms| format!("idle_seal_delay_ms = {ms}\n"));
    let body = format!("{limit}[batch]\nzstd_level = {}\n{flush}{floor}", case.shipper.zstd_level);
    let receivers = format!("primary = [\"127.0.0.1:{rx}\"]\n");
    let scfg = dir.join("edge.toml");
    shipper_config(&scfg, pki, workers, sm, &fifos, &body, &receivers)?;
    let (rmetrics, smetrics) = (format!("127.0.0.1:{rm}"), format!("127.0.0.1:{sm}"));
    if let Some(pin) = case.shipper.pin_workers {
        add_shipper_keys(&scfg, &format!("pin_workers = {pin}\n"))?;
    }
    let rlog = dir.join("receiver.log");
    let receiver = Daemon::start_on(&case.cpus.receiver, &bin, "receive", &rcfg, &rlog, &rmetrics)?;
    let slog = dir.join("shipper.log");
    let ship = Daemon::start_on(&case.cpus.shipper, &bin, "run", &scfg, &slog, &smetrics)?;
    Ok(Started {
        shipping: vec![("shipper".into(), ship)],
        receiver: Some(receiver),
        fifos,
        _holds: Vec::new(),
        progress: Progress::Shipper { metrics: smetrics },
    })
}

/// Writes `dir/<name>.toml` for a `shipper receive` on 127.0.0.1:`port` (metrics on
/// `metrics`) with `workers` workers, writing into `dir/<name>-out` without fsync (the perf
/// suite measures the shipper, not the receiver's disk); returns its path.
pub(super) fn receiver_config(
    dir: &Path,
    name: &str,
    pki: &shipper::tls::pki::DevPki,
    port: u16,
    metrics: u16,
    workers: usize,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    let out = dir.join(format!("{name}-out"));
    std::fs::write(&path, format!(
        "[receiver]\nlisten = \"127.0.0.1:{port}\"\nworkers = {workers}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[output]\ndirectory = {out:?}\nfsync = false\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
        pki.ca, pki.receiver_cert, pki.receiver_key
    ))?;
    Ok(path)
}

/// Adds `lines` (whole `key = value` lines) to the `[shipper]` table [`shipper_config`] wrote
/// at `path` (a TOML table cannot be opened twice); fails if the table is not there.
pub(super) fn add_shipper_keys(path: &Path, lines: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let rest = text.strip_prefix("[shipper]\n").context("a [shipper] table first")?;
    std::fs::write(path, format!("[shipper]\n{lines}{rest}"))?;
    Ok(())
}

/// Writes a `shipper run` config to `path`: `workers` workers, metrics on `metrics`, one pipe
/// source per FIFO, then `body` (whole tables: `[batch]`, `[ratelimit]`, `[buffer]`, ...), then
/// `[receivers]` holding the lines `receivers`, and the shipper's side of the dev PKI.
pub(super) fn shipper_config(
    path: &Path,
    pki: &shipper::tls::pki::DevPki,
    workers: usize,
    metrics: u16,
    fifos: &[PathBuf],
    body: &str,
    receivers: &str,
) -> anyhow::Result<()> {
    let pipes: String = fifos.iter().map(|p| format!("[[sources.pipe]]\npath = {p:?}\n")).collect();
    std::fs::write(path, format!(
        "[shipper]\nworkers = {workers}\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{pipes}{body}[receivers]\n{receivers}[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nserver_name = \"localhost\"\n",
        pki.ca, pki.shipper_cert, pki.shipper_key
    ))?;
    Ok(())
}

fn start_peer(env: &Env, dir: &Path, peer: &str) -> anyhow::Result<Started> {
    let case = env.case;
    let fifos: Vec<PathBuf> =
        (0..case.workload.pipes).map(|i| dir.join(format!("{peer}{i}.pipe"))).collect();
    let mut holds = Vec::new();
    for f in &fifos {
        holds.push(super::fifo_held(f)?);
    }
    let tls_cfg =
        shipper::tls::server_config(&env.pki.ca, &env.pki.receiver_cert, &env.pki.receiver_key)?;
    let tls = Tls { ca: &env.pki.ca, cert: &env.pki.shipper_cert, key: &env.pki.shipper_key };
    let per_service = case.shipper.ratelimit_rate > 0;
    let cpus = &case.cpus.shipper;
    let (sink, shipping) = match peer {
        "raw" => {
            let sink = Sink::start(None, per_service, case.cpus.receiver.clone())?;
            let socats = peers::socats(dir, &fifos, sink.port, cpus)?;
            (sink, socats)
        }
        "syslog-ng" => {
            let sink =
                Sink::start(Some(Arc::new(tls_cfg)), per_service, case.cpus.receiver.clone())?;
            let rate = case.shipper.ratelimit_rate;
            let mut d = peers::syslog_ng(dir, &fifos, sink.port, &tls, rate, cpus)?;
            let log = dir.join("syslog-ng.log");
            peers::wait_ready(&mut d, &log, || sink.connections() > 0)
                .context("syslog-ng did not connect to the sink")?;
            (sink, vec![("syslog-ng".to_string(), d)])
        }
        "rsyslog" => {
            let sink =
                Sink::start(Some(Arc::new(tls_cfg)), per_service, case.cpus.receiver.clone())?;
            let (d, input) = peers::rsyslog(dir, sink.port, &tls, cpus)?;
            let mut shipping = vec![("rsyslogd".to_string(), d)];
            shipping.extend(peers::socats(dir, &fifos, input, cpus)?);
            (sink, shipping)
        }
        other => bail!("unknown peer {other:?}"),
    };
    Ok(Started { shipping, receiver: None, fifos, _holds: holds, progress: Progress::Sink(sink) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_revisions_shipper_is_labelled_with_its_commit() {
        let rev = Rev { short: "abc1234".into(), bin: PathBuf::from("/nowhere/shipper") };
        let at = System::Shipper { workers: 2, rev: Some(rev) };
        assert_eq!(at.label(false), "shipper@abc1234");
        assert_eq!(at.label(true), "shipper@abc1234 (2w)");
        assert_eq!(System::Shipper { workers: 2, rev: None }.label(true), "shipper (2w)");
    }
}
