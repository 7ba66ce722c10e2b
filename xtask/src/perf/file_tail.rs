//! The `file-tail` case: log files followed while an application appends to them, by the
//! shipper's `[[sources.file]]` (mutual TLS to `shipper receive`, acknowledged, positions
//! saved) and by the peers' file inputs ([`super::peers::Tail`]: syslog-ng's `file()` and
//! `wildcard-file()`, rsyslog's `imfile`) into the counting sink.
//!
//! Each `[[scenarios]]` entry is a set of files in a fresh directory, created empty before
//! the system under test starts: one writer thread per file appends its share of the
//! workload's lines (whole lines, up to 64 KiB per `write()`, as fast as it can, or at the
//! workload's rate), and renames the file to `NAME.N` every `rotate_lines` lines, creating a
//! new one at the same path (logrotate's `create`; rotated names are never reused, nothing is
//! deleted). Every system runs every scenario `runs` times, interleaved.
//!
//! A run ends as a pipe case's does: every line acknowledged (the shipper) or arrived at the
//! sink (a peer), or nothing more for a while after the writers finished. Then the shipper's
//! delivery is checked line by line: every written line exactly once in the receiver's files
//! (a multiset of line hashes); a line missing or twice fails the case. The sink counts the
//! peers' lines only (a duplicate hides a loss there).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::text::sum;

use super::peers::{self, Tail, Tls};
use super::pipe::{self, Cpus, Load, System, Workload};
use super::report::{self, thousands, SystemResult};
use super::sink::Sink;
use super::{proc_cpu, proc_hwm_kib, Measure};
use crate::daemon::{free_port, Daemon};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileTailCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Runs in a full run (`--runs N` overrides; quick runs do one).
    pub runs: usize,
    /// Peers run beside the shipper: `syslog-ng`, `rsyslog`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The lines (sizes, services, seed, lines and quick_lines over all files of a scenario,
    /// rate over all writers); `pipes` is ignored: each scenario says how many files.
    pub workload: Workload,
    pub scenarios: Vec<Scenario>,
    pub shipper: Settings,
    #[serde(default)]
    pub cpus: Cpus,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub label: String,
    /// Files written at once, one writer each.
    pub files: usize,
    /// Lines per file between rotations, in a full run and a quick one (0: never rotated).
    #[serde(default)]
    pub rotate_lines: u64,
    #[serde(default)]
    pub quick_rotate_lines: u64,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub zstd_level: u32,
    /// The file source's `poll_interval_ms`; syslog-ng's `follow-freq()` is set to the same.
    pub poll_interval_ms: u64,
}

/// One run of one system on one scenario: the pipe cases' measures, and for the shipper the
/// line-by-line check of what the receiver wrote.
#[derive(Serialize, Clone, Debug, Default)]
struct Outcome {
    measure: Measure,
    /// Written lines not in the receiver's files, and lines there more than once (the shipper).
    missing: u64,
    duplicated: u64,
    /// Rotations the writers made.
    rotations: u64,
}

pub fn run_case(
    name: &str,
    case: &FileTailCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    println!("\n== {name}: {}", case.description);
    let mut systems = vec![System::Shipper { workers: 1, rev: None }];
    let mut skipped = std::collections::BTreeMap::new();
    for peer in &case.peers {
        match peers::available(peer).and_then(|()| imfile(peer)) {
            Ok(()) => systems.push(System::Peer(peer.clone())),
            Err(why) => {
                println!("   {peer}: skipped ({why})");
                skipped.insert(peer.clone(), why);
            }
        }
    }
    let runs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let dir = super::tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let mut md = String::new();
    let mut all = Vec::new();
    for sc in &case.scenarios {
        let w = Workload { pipes: sc.files, writers_per_pipe: 1, ..case.workload.clone() };
        let load = pipe::load(&w, quick);
        let rotate = if quick { sc.quick_rotate_lines } else { sc.rotate_lines };
        println!(
            "   -- {}: {} lines over {} file(s), rotated every {} lines per file (0: never)",
            sc.label, load.lines, sc.files, rotate
        );
        let env = Env { dir: &dir, case, pki: &pki, load: &load, files: sc.files, rotate, quick };
        let outcomes = run_scenario(&env, &sc.label, &systems, runs)?;
        md += &markdown(name, case, sc, &env, &outcomes, runs);
        all.push((sc.label.clone(), load.lines, outcomes));
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (peer, why) in &skipped {
        md += &format!("\n{peer}: **skipped**: {why}.\n");
    }
    println!("\n{md}");
    finish(name, case, quick, command, &md, &all)
}

/// rsyslog also needs its `imfile` module here.
fn imfile(peer: &str) -> Result<(), String> {
    let so = peers::rsyslog_root().join("usr/lib/x86_64-linux-gnu/rsyslog/imfile.so");
    if peer == "rsyslog" && !so.exists() {
        return Err(format!("{} is missing", so.display()));
    }
    Ok(())
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a FileTailCase,
    pki: &'a shipper::tls::pki::DevPki,
    load: &'a Load,
    files: usize,
    rotate: u64,
    quick: bool,
}

type Outcomes = Vec<(SystemResult, Vec<Outcome>)>;

/// Every system `runs` times on one scenario, interleaved.
fn run_scenario(
    env: &Env,
    scenario: &str,
    systems: &[System],
    runs: usize,
) -> anyhow::Result<Outcomes> {
    let mut all: Vec<Vec<Outcome>> = vec![Vec::new(); systems.len()];
    for r in 0..runs {
        for (i, s) in systems.iter().enumerate() {
            let label = s.label(false);
            let o = run_once(env, s, &format!("{scenario}-{label}"))
                .with_context(|| format!("{scenario}, {label}, run {}", r + 1))?;
            report::print_run(&o.measure, r, runs);
            if o.missing + o.duplicated > 0 {
                println!("   {label}: {} missing, {} twice", o.missing, o.duplicated);
            }
            all[i].push(o);
        }
    }
    let optimises = &env.case.optimises;
    Ok(systems
        .iter()
        .zip(all)
        .map(|(s, o)| {
            let m = o.iter().map(|o| o.measure.clone()).collect();
            (SystemResult::new(s.label(false), s.clone(), m, optimises), o)
        })
        .collect())
}

/// What a started system offers the run: its processes and how far it got.
struct Started {
    shipping: Vec<(String, Daemon)>,
    receiver: Option<(Daemon, PathBuf)>,
    progress: Progress,
}

enum Progress {
    Sink(Sink),
    Shipper { metrics: String },
}

impl Progress {
    /// (lines delivered, lines accounted for: delivered or counted as dropped)
    fn poll(&self) -> (u64, u64) {
        match self {
            Progress::Sink(s) => (s.lines(), s.lines()),
            Progress::Shipper { metrics } => {
                let text = shipper::metrics::http::get(metrics).unwrap_or_default();
                let acked = sum(&text, "shipper_records_acked_total", &[]) as u64;
                let dropped = sum(&text, "shipper_lines_dropped_total", &[]) as u64;
                (acked, acked + dropped)
            }
        }
    }
}

/// The files of a scenario: `logs/big.log` for one, `logs/app-NN.log` for several.
fn paths(logs: &Path, files: usize) -> Vec<PathBuf> {
    if files == 1 {
        return vec![logs.join("big.log")];
    }
    (0..files).map(|i| logs.join(format!("app-{i:02}.log"))).collect()
}

/// Runs `system` once over the scenario's load.
fn run_once(env: &Env, system: &System, label: &str) -> anyhow::Result<Outcome> {
    let dir = env.dir.join(label.replace([' ', '(', ')'], ""));
    let _ = std::fs::remove_dir_all(&dir);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let files = paths(&logs, env.files);
    for f in &files {
        std::fs::File::create(f)?;
    }
    let started = match system {
        System::Shipper { .. } => start_shipper(env, &dir, &files)?,
        System::Peer(p) => start_peer(env, &dir, &logs, &files, p)?,
    };
    let cpu0: Vec<f64> = started.shipping.iter().map(|(_, d)| proc_cpu(d.pid())).collect();
    let rcpu0 = started.receiver.as_ref().map_or(0.0, |(r, _)| proc_cpu(r.pid()));
    let start = Instant::now();
    let writers = spawn_writers(env, &files);
    let (delivered, last_at) = wait(env, &started.progress, label, &writers)?;
    let (block_ms, _) = pipe::join_writers(writers)?;
    let mut m = Measure { label: label.to_string(), ..Measure::default() };
    m.wall_s = last_at.duration_since(start).as_secs_f64();
    for ((name, d), c0) in started.shipping.iter().zip(&cpu0) {
        let cpu = proc_cpu(d.pid()) - c0;
        m.cpu_s += cpu;
        m.processes.insert(name.clone(), cpu);
        m.peak_rss_kib += proc_hwm_kib(d.pid());
    }
    let mut o = Outcome { rotations: rotations(&logs), ..Outcome::default() };
    if let Some((r, out)) = &started.receiver {
        m.receiver_cpu_s = proc_cpu(r.pid()) - rcpu0;
        (o.missing, o.duplicated) = exactly_once(env.load, out)?;
    }
    m.write_block_max_ms = block_ms;
    m.delivered = delivered;
    m.dropped = env.load.lines.saturating_sub(delivered);
    m.fill(env.load.lines, env.load.bytes);
    o.measure = m;
    drop(started);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(o)
}

/// One appending writer thread per file, pinned to the load generator's CPUs.
fn spawn_writers(env: &Env, files: &[PathBuf]) -> pipe::Writers {
    let (pace, rotate) = (env.load.pace, env.rotate);
    env.load
        .writers
        .iter()
        .zip(files)
        .map(|(data, path)| {
            let (path, data, cpus) = (path.clone(), data.clone(), env.case.cpus.loadgen.clone());
            std::thread::spawn(move || {
                super::pin_current_thread(&cpus);
                crate::loadgen::append_lines(&path, &data, pace, rotate)
            })
        })
        .collect()
}

/// Rotated files (`NAME.N`) in `logs`.
fn rotations(logs: &Path) -> u64 {
    let entries = std::fs::read_dir(logs).into_iter().flatten().flatten();
    entries.filter(|e| !e.file_name().to_string_lossy().ends_with(".log")).count() as u64
}

/// Polls until every line is accounted for, or nothing moved for a while after the writers
/// finished; returns the lines delivered and when the last one was.
fn wait(
    env: &Env,
    progress: &Progress,
    label: &str,
    writers: &pipe::Writers,
) -> anyhow::Result<(u64, Instant)> {
    let total = env.load.lines;
    let stall = Duration::from_secs(if env.quick { 2 } else { 5 });
    let deadline = Instant::now() + Duration::from_secs(if env.quick { 60 } else { 900 });
    let (mut last, mut last_at) = (0, Instant::now());
    loop {
        let (delivered, accounted) = progress.poll();
        let now = Instant::now();
        if accounted != last {
            (last, last_at) = (accounted, now);
        }
        let writing = writers.iter().any(|w| !w.is_finished());
        if accounted >= total || (!writing && now.duration_since(last_at) > stall) {
            return Ok((delivered, last_at));
        }
        if now > deadline {
            bail!("{label}: {accounted} of {total} lines after the deadline");
        }
        let poll = if matches!(progress, Progress::Sink(_)) { 5 } else { 50 };
        std::thread::sleep(Duration::from_millis(poll));
    }
}

/// A receiver, and the shipper following `files` (the rotated names too: the documented safe
/// pattern, so that a file rotated before it was first listed is still found).
fn start_shipper(env: &Env, dir: &Path, files: &[PathBuf]) -> anyhow::Result<Started> {
    let (case, pki) = (env.case, env.pki);
    let bin = crate::root().join("target/release/shipper");
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let rworkers = if case.cpus.receiver.is_empty() { 2 } else { case.cpus.receiver.len() };
    let rcfg = pipe::receiver_config(dir, "receiver", pki, rx, rm, rworkers)?;
    let pattern = if files.len() == 1 {
        format!("{:?}", files[0].display().to_string())
    } else {
        format!("{:?}", dir.join("logs/app-*.log*").display().to_string())
    };
    let body = format!(
        "[[sources.file]]\npaths = [{pattern}]\npositions = {:?}\nservice = \"file\"\n\
         poll_interval_ms = {}\n[batch]\nzstd_level = {}\n",
        dir.join("positions").display().to_string(),
        case.shipper.poll_interval_ms,
        case.shipper.zstd_level
    );
    let scfg = dir.join("edge.toml");
    let receivers = format!("primary = [\"127.0.0.1:{rx}\"]\n");
    pipe::shipper_config(&scfg, pki, 1, sm, &[], &body, &receivers)?;
    let (rmetrics, smetrics) = (format!("127.0.0.1:{rm}"), format!("127.0.0.1:{sm}"));
    let rlog = dir.join("receiver.log");
    let receiver = Daemon::start_on(&case.cpus.receiver, &bin, "receive", &rcfg, &rlog, &rmetrics)?;
    let slog = dir.join("shipper.log");
    let ship = Daemon::start_on(&case.cpus.shipper, &bin, "run", &scfg, &slog, &smetrics)?;
    Ok(Started {
        shipping: vec![("shipper".into(), ship)],
        receiver: Some((receiver, dir.join("receiver-out"))),
        progress: Progress::Shipper { metrics: smetrics },
    })
}

/// A peer following `files` (one file, or the live names `app-*.log` in `logs`: the peers
/// follow a renamed file by its descriptor, and would read a rotated name matched again as a
/// new file), into a counting sink over mutual TLS.
fn start_peer(
    env: &Env,
    dir: &Path,
    logs: &Path,
    files: &[PathBuf],
    peer: &str,
) -> anyhow::Result<Started> {
    let tail = if files.len() == 1 {
        Tail::File(&files[0])
    } else {
        Tail::Dir { dir: logs, pattern: "app-*.log" }
    };
    let cfg =
        shipper::tls::server_config(&env.pki.ca, &env.pki.receiver_cert, &env.pki.receiver_key)?;
    let tls = Tls { ca: &env.pki.ca, cert: &env.pki.shipper_cert, key: &env.pki.shipper_key };
    let sink = Sink::start(Some(Arc::new(cfg)), false, env.case.cpus.receiver.clone())?;
    let cpus = &env.case.cpus.shipper;
    let d = match peer {
        "syslog-ng" => {
            let follow_s = env.case.shipper.poll_interval_ms as f64 / 1000.0;
            let mut d = peers::syslog_ng_files(dir, &tail, follow_s, sink.port, &tls, cpus)?;
            peers::wait_ready(&mut d, &dir.join("syslog-ng.log"), || sink.connections() > 0)
                .context("syslog-ng did not connect to the sink")?;
            d
        }
        "rsyslog" => peers::rsyslog_files(dir, &tail, sink.port, &tls, cpus)?,
        other => bail!("unknown peer {other:?} (syslog-ng or rsyslog)"),
    };
    Ok(Started {
        shipping: vec![(peer.to_string(), d)],
        receiver: None,
        progress: Progress::Sink(sink),
    })
}

/// (written lines missing, lines more than once) in the receiver's files under `out`
/// (`STREAM/*.log`, raw: each line as written), compared as multisets of line hashes.
fn exactly_once(load: &Load, out: &Path) -> anyhow::Result<(u64, u64)> {
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let mut count: HashMap<u64, i64> = HashMap::new();
    for data in &load.writers {
        for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            *count.entry(hasher.hash_one(line)).or_default() += 1;
        }
    }
    for stream in std::fs::read_dir(out).with_context(|| format!("{}", out.display()))? {
        let stream = stream?;
        if stream.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(stream.path())? {
            let f = f?.path();
            if f.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let data = std::fs::read(&f)?;
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                *count.entry(hasher.hash_one(line)).or_default() -= 1;
            }
        }
    }
    let missing = count.values().filter(|&&n| n > 0).map(|&n| n as u64).sum();
    let twice = count.values().filter(|&&n| n < 0).map(|&n| n.unsigned_abs()).sum();
    Ok((missing, twice))
}

/// One scenario's Markdown table.
fn markdown(
    name: &str,
    case: &FileTailCase,
    sc: &Scenario,
    env: &Env,
    outcomes: &Outcomes,
    runs: usize,
) -> String {
    let w = &case.workload;
    let mut md = format!(
        "**{name}, {}**: {} lines, {:.0} bytes on average ({}–{}), over {} file(s), {}; \
         {}; shipper `poll_interval_ms = {}` (syslog-ng \
         `follow-freq({})`); CPUs: shipper/peer {:?}, writers {:?}, receiver/sink {:?}; \
         median of {runs} run(s).\n\n",
        sc.label,
        thousands(env.load.lines as f64),
        env.load.bytes as f64 / env.load.lines.max(1) as f64,
        w.line_bytes_min,
        w.line_bytes_max,
        sc.files,
        if w.rate > 0 {
            format!("{} lines/s", thousands(w.rate as f64))
        } else {
            "as fast as possible".into()
        },
        match env.rotate {
            0 => "never rotated".to_string(),
            n => format!("each file rotated every {n} lines"),
        },
        case.shipper.poll_interval_ms,
        case.shipper.poll_interval_ms as f64 / 1000.0,
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
    );
    md += "| system | lines/s | lines per CPU-s (spread) | CPU s | peak RSS | delivered | \
           not delivered | twice | receiver CPU s | rotations |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (r, o) in outcomes {
        let m = &r.median;
        let at = r.runs.iter().position(|x| x.wall_s == m.wall_s).unwrap_or(0);
        let (twice, rotations) = o.get(at).map_or((0, 0), |o| (o.duplicated, o.rotations));
        let shipper = matches!(r.system, System::Shipper { .. });
        md += &format!(
            "| {} | {} | **{}** ({}–{}) | {:.3} | {:.1} MiB | {} | {} | {} | {} | \
             {rotations} |\n",
            r.label,
            thousands(m.lines_per_s),
            thousands(m.lines_per_cpu_s),
            thousands(r.spread_lines_per_cpu_s.0),
            thousands(r.spread_lines_per_cpu_s.1),
            m.cpu_s,
            m.peak_rss_kib as f64 / 1024.0,
            thousands(m.delivered as f64),
            thousands(m.dropped as f64),
            if shipper { thousands(twice as f64) } else { "–".into() },
            if shipper { format!("{:.3}", m.receiver_cpu_s) } else { "–".into() },
        );
    }
    md + "\n"
}

/// Charts, results, and the check that the shipper delivered every line exactly once and
/// every system delivered something.
fn finish(
    name: &str,
    case: &FileTailCase,
    quick: bool,
    command: &str,
    md: &str,
    all: &[(String, u64, Outcomes)],
) -> anyhow::Result<()> {
    super::chart::register_font()?;
    let root = crate::root();
    let dir = if quick { root.join("perf/results") } else { root.join("docs/perf") };
    std::fs::create_dir_all(&dir)?;
    let mut charts = Vec::new();
    for (label, lines, outcomes) in all {
        let q = if quick { "-quick" } else { "" };
        let path = dir.join(format!("{name}-{label}-cpu{q}.png"));
        let labels: Vec<String> = outcomes.iter().map(|(r, _)| r.label.clone()).collect();
        let v: Vec<f64> = outcomes.iter().map(|(r, _)| r.median.lines_per_cpu_s).collect();
        let title = format!("{name}, {label}: lines per CPU-second ({lines} lines)");
        super::chart::bars(&path, &title, "lines per CPU-second", &labels, &v)?;
        println!("   chart: {}", path.display());
        charts.push(path.strip_prefix(&root).unwrap_or(&path).display().to_string());
    }
    let run = super::Run {
        name,
        description: &case.description,
        optimises: &case.optimises,
        quick,
        command,
    };
    let scenarios: Vec<serde_json::Value> = all
        .iter()
        .map(|(label, lines, outcomes)| {
            let systems: Vec<serde_json::Value> = outcomes
                .iter()
                .map(|(r, o)| serde_json::json!({ "result": r, "runs": o }))
                .collect();
            serde_json::json!({ "scenario": label, "lines": lines, "systems": systems })
        })
        .collect();
    let fields = serde_json::json!({ "case_toml": case, "scenarios": scenarios, "charts": charts });
    super::save(&run, fields, Some(md))?;
    for (label, _, outcomes) in all {
        for (r, o) in outcomes {
            if r.median.delivered == 0 {
                bail!("{name}, {label}: {} delivered no line", r.label);
            }
            let bad = o.iter().find(|o| o.missing + o.duplicated > 0);
            if let (System::Shipper { .. }, Some(o)) = (&r.system, bad) {
                bail!(
                    "{name}, {label}: the shipper did not deliver every line exactly once \
                     ({} missing, {} twice)",
                    o.missing,
                    o.duplicated
                );
            }
        }
    }
    Ok(())
}
