//! The `failover` case: a primary and a standby receiver, a shipper with both
//! (`standby = [...]`) and steady-rate writers. Per repetition, the primary is SIGSTOPped (a
//! hung process: its kernel still accepts connections and bytes) and the suite measures how long
//! until the standby writes lines; after `outage_ms` the primary gets SIGCONT and the suite
//! measures how long until traffic is back on it. Each `[[settings]]` of the case (its
//! `[receivers]` timeouts) runs on a fresh shipper and receivers; a quick run does the first
//! settings once.
//!
//! Signals, each polled every 10 ms:
//! - the standby's output files (`*.log` under its output directory, outside `.state/`): their
//!   size grows as soon as it writes a frame (no fsync in the suite), so this is the precise
//!   signal;
//! - `shipper_receiver_records_written_total` of the standby receiver and
//!   `shipper_receiver_healthy{receiver=...}` of the shipper: Prometheus counters that workers
//!   publish every 250 ms (`metrics::PUBLISH_INTERVAL_MS`), so times taken from them are late
//!   by up to 250 ms; they are reported beside the file-based times.
//!
//! Measures per repetition: SIGSTOP → the standby's first write (files; metric), SIGSTOP → the
//! primary unhealthy on every worker, SIGCONT → the primary healthy on every worker, SIGCONT →
//! the standby's last write (it stops growing), and over the whole run the writers' longest
//! `write()`, lines written, acknowledged, dropped and written twice (frames in flight to the
//! hung primary are resent to the standby; the primary writes them too once it resumes).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::http::get;
use shipper::metrics::text::sum;

use super::pipe::{self, Cpus};
use crate::daemon::{free_port, Daemon};
use crate::loadgen::{self, Pace, Shape};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FailoverCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Repetitions per settings in a full run (`--runs N` overrides), and in a quick one.
    pub repetitions: usize,
    pub quick_repetitions: usize,
    /// How long the primary stays stopped after the standby took traffic (ms).
    pub outage_ms: u64,
    pub workload: SteadyLoad,
    pub shipper: Settings,
    /// `[receivers]` settings to compare; a quick run uses the first only.
    pub settings: Vec<ReceiverSettings>,
    #[serde(default)]
    pub cpus: Cpus,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SteadyLoad {
    /// Lines per second over all writers, for as long as the case runs.
    pub rate: u64,
    pub pipes: usize,
    pub line_bytes_min: usize,
    pub line_bytes_max: usize,
    pub services: usize,
    #[serde(default)]
    pub skew: f64,
    #[serde(default)]
    pub cfjs1_share: f64,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub workers: usize,
    /// `batch.flush_interval_ms` (ms).
    pub flush_interval_ms: u64,
    /// Workers of each `shipper receive`.
    pub receiver_workers: usize,
}

/// One `[receivers]` configuration: a label and the keys given to the shipper as written
/// (the shipper refuses unknown keys).
#[derive(Deserialize, Serialize, Clone)]
pub struct ReceiverSettings {
    pub label: String,
    #[serde(flatten)]
    pub receivers: toml::Table,
}

/// One SIGSTOP/SIGCONT cycle; times in ms.
#[derive(Serialize, Default, Clone, Debug)]
struct Cycle {
    /// SIGSTOP → the standby's output grew.
    failover_ms: f64,
    /// SIGSTOP → the standby's `shipper_receiver_records_written_total` grew.
    failover_metric_ms: f64,
    /// SIGSTOP → `shipper_receiver_healthy` of the primary 0 on every worker.
    primary_down_ms: f64,
    /// SIGCONT → the primary healthy on every worker.
    primary_healthy_ms: f64,
    /// SIGCONT → the standby's last write (its connections closed after it).
    standby_last_write_ms: f64,
    /// SIGCONT → traffic back: the later of the two above.
    failback_ms: f64,
}

/// One settings' repetitions and what the run delivered.
#[derive(Serialize, Clone, Debug)]
struct Outcome {
    label: String,
    receivers: toml::Table,
    cycles: Vec<Cycle>,
    /// (median, max) of each measure over the cycles.
    failover_ms: (f64, f64),
    failover_metric_ms: (f64, f64),
    primary_down_ms: (f64, f64),
    primary_healthy_ms: (f64, f64),
    failback_ms: (f64, f64),
    write_block_max_ms: f64,
    lines_written: u64,
    lines_acked: u64,
    lines_dropped: u64,
    /// Lines the two receivers wrote in all, minus the lines written.
    lines_twice: i64,
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a FailoverCase,
    pki: &'a shipper::tls::pki::DevPki,
}

pub fn run_case(
    name: &str,
    case: &FailoverCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    let reps = if quick { case.quick_repetitions } else { runs.unwrap_or(case.repetitions) };
    let settings = if quick { &case.settings[..1] } else { &case.settings[..] };
    println!(
        "\n== {name}: {} ({} lines/s over {} pipe(s), {reps} repetition(s) per settings)",
        case.description, case.workload.rate, case.workload.pipes
    );
    let dir = super::tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let env = Env { dir: &dir, case, pki: &pki };
    let mut outcomes = Vec::new();
    for s in settings {
        let o = run_settings(&env, s, reps).with_context(|| format!("settings {}", s.label))?;
        outcomes.push(o);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let md = markdown(name, case, &outcomes);
    println!("\n{md}");
    let chart = chart(name, quick, &outcomes)?;
    let run = super::Run {
        name,
        description: &case.description,
        optimises: &case.optimises,
        quick,
        command,
    };
    let fields = serde_json::json!({
        "case_toml": case,
        "settings": outcomes,
        "charts": [chart],
    });
    super::save(&run, fields, Some(&md))?;
    for o in &outcomes {
        if o.lines_acked + o.lines_dropped < o.lines_written {
            bail!(
                "{name} ({}): {} lines written, {} acked",
                o.label,
                o.lines_written,
                o.lines_acked
            );
        }
    }
    Ok(())
}

/// Steady writers, one per pipe, writing one second's worth of lines over and over (paced)
/// until told to stop; each returns its lines written and its longest `write()` (s).
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<std::io::Result<(u64, f64)>>>,
}

impl Writers {
    fn start(load: &SteadyLoad, fifos: &[PathBuf], cpus: &[usize]) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let per_writer = (load.rate / fifos.len().max(1) as u64).max(1);
        let shape = Shape {
            seed: 0xfa11,
            line_bytes_min: load.line_bytes_min,
            line_bytes_max: load.line_bytes_max,
            services_cdf: loadgen::service_weights(load.services, load.skew, 0.0),
            cfjs1_share: load.cfjs1_share,
        };
        let threads = fifos
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let mut data = Vec::new();
                loadgen::lines(&shape, i, per_writer as usize, &mut data);
                let pace =
                    Pace { rate: per_writer as f64, write_per_line: false, chunk_bytes: 64 << 10 };
                let (path, stop, cpus) = (path.clone(), stop.clone(), cpus.to_vec());
                std::thread::spawn(move || {
                    super::pin_current_thread(&cpus);
                    let (mut lines, mut block) = (0, 0.0f64);
                    while !stop.load(Ordering::Relaxed) {
                        let w = loadgen::write_lines(&path, &data, pace)?;
                        block = block.max(w.write_block_max_s);
                        lines += per_writer;
                    }
                    Ok((lines, block))
                })
            })
            .collect();
        Writers { stop, threads }
    }

    /// Stops the writers (each finishes its current second); lines written, longest write (s).
    fn finish(self) -> anyhow::Result<(u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        let (mut lines, mut block) = (0, 0.0f64);
        for t in self.threads {
            let (l, b) = t.join().expect("writer thread")?;
            lines += l;
            block = block.max(b);
        }
        Ok((lines, block))
    }
}

/// The processes and addresses of one settings' run.
struct Rig {
    primary: Daemon,
    _standby: Daemon,
    _shipper: Daemon,
    pm: String,
    spm: String,
    sm: String,
    primary_label: String,
    standby_label: String,
    standby_out: PathBuf,
    workers: f64,
}

fn start_rig(env: &Env, dir: &Path, s: &ReceiverSettings) -> anyhow::Result<(Rig, Vec<PathBuf>)> {
    std::fs::create_dir_all(dir)?;
    let case = env.case;
    let bin = crate::root().join("target/release/shipper");
    let (pp, pm, sp, spm, sm) =
        (free_port()?, free_port()?, free_port()?, free_port()?, free_port()?);
    let rw = case.shipper.receiver_workers;
    let pcfg = pipe::receiver_config(dir, "primary", env.pki, pp, pm, rw)?;
    let scfg = pipe::receiver_config(dir, "standby", env.pki, sp, spm, rw)?;
    let cfg = dir.join("edge.toml");
    let (pm, spm, smetrics) = (addr(pm), addr(spm), addr(sm));
    let rcpus = &case.cpus.receiver;
    let primary = Daemon::start_on(rcpus, &bin, "receive", &pcfg, &dir.join("primary.log"), &pm)?;
    let standby = Daemon::start_on(rcpus, &bin, "receive", &scfg, &dir.join("standby.log"), &spm)?;
    let fifos: Vec<PathBuf> =
        (0..case.workload.pipes).map(|i| dir.join(format!("ship{i}.pipe"))).collect();
    let (pl, sl) = (addr(pp), addr(sp));
    let body = format!("[batch]\nflush_interval_ms = {}\n", case.shipper.flush_interval_ms);
    let receivers =
        format!("primary = [{pl:?}]\nstandby = [{sl:?}]\n{}", toml::to_string(&s.receivers)?);
    pipe::shipper_config(&cfg, env.pki, case.shipper.workers, sm, &fifos, &body, &receivers)?;
    let slog = dir.join("shipper.log");
    let shipper = Daemon::start_on(&case.cpus.shipper, &bin, "run", &cfg, &slog, &smetrics)?;
    let rig = Rig {
        primary,
        _standby: standby,
        _shipper: shipper,
        pm,
        spm,
        sm: smetrics,
        primary_label: pl,
        standby_label: sl,
        standby_out: dir.join("standby-out"),
        workers: case.shipper.workers as f64,
    };
    Ok((rig, fifos))
}

fn run_settings(env: &Env, s: &ReceiverSettings, reps: usize) -> anyhow::Result<Outcome> {
    let dir = env.dir.join(s.label.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let (rig, fifos) = start_rig(env, &dir, s)?;
    let writers = Writers::start(&env.case.workload, &fifos, &env.case.cpus.loadgen);
    let mut cycles = Vec::new();
    let outcome = (|| {
        for r in 0..reps {
            let c = cycle(env, &rig).with_context(|| format!("repetition {}", r + 1))?;
            println!(
                "   {:<10} {}/{reps}: failover {:>6.0} ms (metric {:>6.0} ms), primary down on \
                 every worker {:>6.0} ms; failback {:>6.0} ms (healthy {:>6.0}, standby's last \
                 write {:>6.0})",
                s.label,
                r + 1,
                c.failover_ms,
                c.failover_metric_ms,
                c.primary_down_ms,
                c.failback_ms,
                c.primary_healthy_ms,
                c.standby_last_write_ms,
            );
            cycles.push(c);
        }
        anyhow::Ok(())
    })();
    let (written, block) = writers.finish()?;
    outcome?;
    let acked = |t: &str| sum(t, "shipper_records_acked_total", &[]);
    let dropped = |t: &str| sum(t, "shipper_lines_dropped_total", &[]);
    let accounted = || {
        let t = get(&rig.sm).unwrap_or_default();
        (acked(&t) + dropped(&t) >= written as f64).then_some(t)
    };
    let text = testkit::wait::poll(Duration::from_secs(60), Duration::from_millis(50), accounted)
        .with_context(|| {
        let t = get(&rig.sm).unwrap_or_default();
        format!("{} of {written} lines acknowledged after 60 s; see {}", acked(&t), dir.display())
    })?;
    // Receivers publish every 250 ms: wait for a publication after the last ack.
    std::thread::sleep(Duration::from_millis(2 * shipper::metrics::PUBLISH_INTERVAL_MS));
    let w = "shipper_receiver_records_written_total";
    let on_receivers = metric(&rig.pm, w) + metric(&rig.spm, w);
    let stat = |f: fn(&Cycle) -> f64| median_max(&cycles.iter().map(f).collect::<Vec<_>>());
    let o = Outcome {
        label: s.label.clone(),
        receivers: s.receivers.clone(),
        failover_ms: stat(|c| c.failover_ms),
        failover_metric_ms: stat(|c| c.failover_metric_ms),
        primary_down_ms: stat(|c| c.primary_down_ms),
        primary_healthy_ms: stat(|c| c.primary_healthy_ms),
        failback_ms: stat(|c| c.failback_ms),
        write_block_max_ms: block * 1e3,
        lines_written: written,
        lines_acked: acked(&text) as u64,
        lines_dropped: dropped(&text) as u64,
        lines_twice: on_receivers as i64 - written as i64,
        cycles,
    };
    drop(rig);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(o)
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn metric(addr: &str, name: &str) -> f64 {
    get(addr).map_or(0.0, |t| sum(&t, name, &[]))
}

fn median_max(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s.get(s.len() / 2).copied().unwrap_or(0.0), s.last().copied().unwrap_or(0.0))
}

/// One SIGSTOP → failover → SIGCONT → failback cycle, from traffic steady on the primary.
fn cycle(env: &Env, rig: &Rig) -> anyhow::Result<Cycle> {
    let case = env.case;
    let rate = case.workload.rate as f64;
    let timeout = |key: &str, default: i64| {
        let s = case.settings.iter().filter_map(|s| s.receivers.get(key)?.as_integer()).max();
        Duration::from_millis(s.unwrap_or(default).max(default) as u64)
    };
    // Deadlines: a detection takes about ack_timeout_ms, a failback up to backoff_ms_max.
    let limit = timeout("ack_timeout_ms", 5000) * 3 + timeout("backoff_ms_max", 5000) * 3;
    let w = "shipper_receiver_records_written_total";
    let primary = [("receiver", rig.primary_label.as_str())];
    let standby = [("receiver", rig.standby_label.as_str())];
    let healthy = |t: &str| sum(t, "shipper_receiver_healthy", &primary);
    let standby_up = |t: &str| sum(t, "shipper_receiver_connections_up", &standby);

    // Steady on the primary: every worker healthy there, the standby let go, lines flowing.
    let p0 = metric(&rig.pm, w);
    poll("steady traffic on the primary", limit, |_| {
        let t = get(&rig.sm)?;
        let ok = healthy(&t) == rig.workers
            && standby_up(&t) == 0.0
            && metric(&rig.pm, w) >= p0 + rate / 2.0;
        ok.then_some(())
    })?;

    let (b0, m0) = (super::files_bytes(&rig.standby_out, "log"), metric(&rig.spm, w));
    rig.primary.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let (mut file_at, mut metric_at, mut down_at) = (None, None, None);
    poll("the standby taking lines", limit, |now| {
        if file_at.is_none() && super::files_bytes(&rig.standby_out, "log") > b0 {
            file_at = Some(now);
        }
        if metric_at.is_none() && metric(&rig.spm, w) > m0 {
            metric_at = Some(now);
        }
        if down_at.is_none() && get(&rig.sm).is_some_and(|t| healthy(&t) == 0.0) {
            down_at = Some(now);
        }
        (file_at.is_some() && metric_at.is_some() && down_at.is_some()).then_some(())
    })?;
    let ms = |a: Option<Instant>, from: Instant| a.map_or(0.0, |a| (a - from).as_secs_f64() * 1e3);
    let mut c = Cycle {
        failover_ms: ms(file_at, t0),
        failover_metric_ms: ms(metric_at, t0),
        primary_down_ms: ms(down_at, t0),
        ..Cycle::default()
    };

    // The outage goes on for outage_ms after the standby took over.
    let resume = file_at.unwrap_or(t0) + Duration::from_millis(case.outage_ms);
    std::thread::sleep(resume.saturating_duration_since(Instant::now()));
    rig.primary.signal(libc::SIGCONT);
    let t1 = Instant::now();
    let (mut healthy_at, mut last_write, mut bytes) =
        (None, t1, super::files_bytes(&rig.standby_out, "log"));
    poll("traffic back on the primary", limit, |now| {
        let b = super::files_bytes(&rig.standby_out, "log");
        if b != bytes {
            (bytes, last_write) = (b, now);
        }
        let t = get(&rig.sm)?;
        if healthy_at.is_none() && healthy(&t) == rig.workers {
            healthy_at = Some(now);
        }
        // Once the standby's connections are closed, it can write nothing more.
        (healthy_at.is_some() && standby_up(&t) == 0.0).then_some(())
    })?;
    // A last look, in case its final write landed between the two checks above.
    if super::files_bytes(&rig.standby_out, "log") != bytes {
        last_write = Instant::now();
    }
    c.primary_healthy_ms = ms(healthy_at, t1);
    c.standby_last_write_ms = ms(Some(last_write), t1);
    c.failback_ms = c.primary_healthy_ms.max(c.standby_last_write_ms);
    Ok(c)
}

/// Calls `f` every 10 ms with the time of the call until it returns `Some`; fails after
/// `limit`, naming `what`.
fn poll<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut(Instant) -> Option<T>,
) -> anyhow::Result<T> {
    let every = Duration::from_millis(10);
    testkit::wait::poll(limit, every, || f(Instant::now())).with_context(|| what.to_string())
}

fn markdown(name: &str, case: &FailoverCase, outcomes: &[Outcome]) -> String {
    use std::fmt::Write;
    let w = &case.workload;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "**{name}** ({}): {} lines/s over {} pipe(s) ({}–{} bytes); shipper {} workers, \
         `flush_interval_ms = {}`; receivers {} worker(s) each; the primary stays stopped {} ms \
         after the standby took over; CPUs: shipper {:?}, writers {:?}, receivers {:?}; median \
         / max over {} repetition(s).\n",
        case.description,
        super::report::thousands(w.rate as f64),
        w.pipes,
        w.line_bytes_min,
        w.line_bytes_max,
        case.shipper.workers,
        case.shipper.flush_interval_ms,
        case.shipper.receiver_workers,
        case.outage_ms,
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
        outcomes.first().map_or(0, |o| o.cycles.len()),
    );
    md += "| `[receivers]` | SIGSTOP → standby writes | (from its metric) | primary down on every \
           worker | SIGCONT → primary healthy on every worker | SIGCONT → traffic back | writer \
           max block | lines written / acked / dropped / written twice |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let mm = |(a, b): (f64, f64)| format!("{a:.0} / {b:.0} ms");
    for o in outcomes {
        let kv: Vec<String> = o.receivers.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let _ = writeln!(
            md,
            "| {}: {} | **{}** | {} | {} | {} | **{}** | {:.1} ms | {} / {} / {} / {} |",
            o.label,
            kv.join(", "),
            mm(o.failover_ms),
            mm(o.failover_metric_ms),
            mm(o.primary_down_ms),
            mm(o.primary_healthy_ms),
            mm(o.failback_ms),
            o.write_block_max_ms,
            o.lines_written,
            o.lines_acked,
            o.lines_dropped,
            o.lines_twice,
        );
    }
    md += "\n\"Standby writes\" and \"traffic back\" are read from the standby's output files \
           (10 ms polls); the metric column from `shipper_receiver_records_written_total`, \
           which receivers publish every 250 ms, and the healthy columns from \
           `shipper_receiver_healthy`, which shipper workers publish every 250 ms: those are \
           late by up to 250 ms.\n";
    md
}

fn chart(name: &str, quick: bool, outcomes: &[Outcome]) -> anyhow::Result<String> {
    super::chart::register_font()?;
    let root = crate::root();
    let dir = if quick { root.join("perf/results") } else { root.join("docs/perf") };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}-times{}.png", if quick { "-quick" } else { "" }));
    let mut labels = Vec::new();
    let mut values = Vec::new();
    for o in outcomes {
        labels.push(format!("{}: failover", o.label));
        values.push(o.failover_ms.0);
        labels.push(format!("{}: failback", o.label));
        values.push(o.failback_ms.0);
    }
    let title = format!("{name}: median ms from SIGSTOP to the standby, from SIGCONT back");
    super::chart::bars(&path, &title, "milliseconds", &labels, &values)?;
    println!("   chart: {}", path.display());
    Ok(path.strip_prefix(&root).unwrap_or(&path).display().to_string())
}
