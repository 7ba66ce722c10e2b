//! The `receiver-outputs` case: what `shipper receive` pays per record for each kind of
//! output. One shipper (a pipe source, the load generator's lines, one writer) ships the same
//! workload to a receiver writing into one output per `[[variants]]` entry: files with
//! `fsync = true` (the default) and `fsync = false`, a ClickHouse table (a real
//! clickhouse-server started once in a scratch directory, the table emptied before each run),
//! and whatever [`Backend`] a variant names. Variants run one after another, `runs` times
//! over (interleaved), side by side in one table.
//!
//! Measures per variant: the receiver's CPU-seconds over the run (first write to last
//! acknowledgement) and records per receiver CPU-second; the ClickHouse server's CPU-seconds
//! over the same window, apart (and records per CPU-second of both together); records/s; the
//! receiver's group commits (`shipper_receiver_group_frames`: frames per group, mean and
//! quantiles); the records the output holds afterwards (lines in the files, `count()` of the
//! table), and the lines the shipper dropped (a pipe source drops when its outbox is full:
//! a receiver slower than the writer shows here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::text::sum;

use super::pipe::{self, Cpus, Load, Workload};
use super::report::thousands;
use super::{proc_cpu, Run};
use crate::daemon::{free_port, Daemon};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutputsCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Runs in a full run (`--runs N` overrides; quick runs do one).
    pub runs: usize,
    pub workload: Workload,
    pub shipper: Settings,
    pub variants: Vec<Variant>,
    #[serde(default)]
    pub cpus: Cpus,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub zstd_level: u32,
    /// The receiver's `workers` (shards).
    pub receiver_workers: usize,
}

/// One output the receiver writes into.
#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub label: String,
    /// `files`, `clickhouse` or `kafka` ([`Backend`]).
    pub output: String,
    /// `files`: the output's `fsync` (default true).
    #[serde(default)]
    pub fsync: Option<bool>,
}

/// What a variant's output needs running beside the receiver: nothing (files), a
/// ClickHouse server, or a Kafka-protocol broker (tansu, memory storage, from `.tools/bin`).
enum Backend {
    None,
    ClickHouse(ClickHouse),
    Kafka(Broker),
}

/// A tansu broker of the case's own on a free port.
struct Broker {
    server: std::process::Child,
    port: u16,
}

impl Broker {
    fn start(dir: &Path) -> Result<Broker, String> {
        let bin = crate::setup::tools_dir().join("bin/tansu");
        if !bin.exists() {
            return Err(format!("{} missing (cargo xtask setup)", bin.display()));
        }
        let port = free_port().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("tansu.log")).map_err(|e| e.to_string())?;
        let url = format!("tcp://127.0.0.1:{port}");
        let server = std::process::Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("tansu did not listen within 20 s".into());
            }
            // Polling the broker's port until it listens, with the deadline above.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Broker { server, port })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Backend {
    /// Starts what `variant` needs under `dir`, or says why it cannot run here.
    fn start(variant: &Variant, dir: &Path) -> Result<Backend, String> {
        match variant.output.as_str() {
            "files" => Ok(Backend::None),
            "clickhouse" => ClickHouse::start(&dir.join("clickhouse")).map(Backend::ClickHouse),
            "kafka" => Broker::start(&dir.join("kafka")).map(Backend::Kafka),
            other => Err(format!("unknown output {other:?} (files, clickhouse, kafka)")),
        }
    }

    /// The receiver's output tables for `variant` writing under `dir`, and the `[receiver]`
    /// keys they need.
    fn output(&self, variant: &Variant, dir: &Path) -> (String, String) {
        match self {
            Backend::None => {
                let fsync = variant.fsync.unwrap_or(true);
                let out = dir.join("out").display().to_string();
                (format!("[output]\ndirectory = {out:?}\nfsync = {fsync}\n"), String::new())
            }
            Backend::ClickHouse(ch) => (
                format!(
                    "[[outputs.clickhouse]]\nname = \"ch\"\nurl = \"http://127.0.0.1:{}\"\n\
                     table = \"logs\"\n",
                    ch.http
                ),
                format!("state_directory = {:?}\n", dir.join("state").display().to_string()),
            ),
            Backend::Kafka(b) => (
                format!(
                    "[[outputs.kafka]]\nname = \"k\"\nbrokers = [\"127.0.0.1:{}\"]\n\
                     topic = \"logs.{{stream}}\"\n",
                    b.port
                ),
                format!("state_directory = {:?}\n", dir.join("state").display().to_string()),
            ),
        }
    }

    /// Empties what a previous run wrote.
    fn reset(&self) -> anyhow::Result<()> {
        if let Backend::ClickHouse(ch) = self {
            ch.query("TRUNCATE TABLE logs")?;
        }
        Ok(())
    }

    /// Records the output holds after a run under `dir` (for Kafka: those the broker
    /// acknowledged, from the receiver's last scrape `metrics`).
    fn records(&self, dir: &Path, metrics: &str) -> anyhow::Result<u64> {
        match self {
            Backend::None => Ok(lines_in(&dir.join("out"))),
            Backend::Kafka(_) => {
                let labels = [("output", "k")];
                Ok(sum(metrics, "shipper_receiver_output_records_total", &labels) as u64)
            }
            Backend::ClickHouse(ch) => {
                let n = ch.query("SELECT count() FROM logs")?;
                n.trim().parse().with_context(|| format!("count() answered {n:?}"))
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Backend::None => None,
            Backend::ClickHouse(ch) => Some(ch.server.pid()),
            Backend::Kafka(b) => Some(b.server.id()),
        }
    }
}

/// One run of one variant.
#[derive(Serialize, Clone, Debug, Default)]
struct Trial {
    wall_s: f64,
    records: u64,
    records_per_s: f64,
    receiver_cpu_s: f64,
    records_per_receiver_cpu_s: f64,
    /// The output's server (ClickHouse), over the same window; 0 without one.
    server_cpu_s: f64,
    records_per_cpu_s_with_server: f64,
    shipper_cpu_s: f64,
    /// Lines the shipper dropped (outbox full).
    dropped: u64,
    /// Records the output holds afterwards.
    in_output: u64,
    /// Group commits and frames per group (mean, p50, p99, max).
    groups: u64,
    group_frames_mean: f64,
    group_frames_p50: f64,
    group_frames_p99: f64,
    group_frames_max: f64,
}

pub fn run_case(
    name: &str,
    case: &OutputsCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    let load = pipe::load(&case.workload, quick);
    println!(
        "\n== {name}: {} ({} lines, {:.0} bytes on average)",
        case.description,
        load.lines,
        load.bytes as f64 / load.lines.max(1) as f64
    );
    let dir = super::tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let mut backends = Vec::new();
    let mut skipped = Vec::new();
    for v in &case.variants {
        match Backend::start(v, &dir) {
            Ok(b) => backends.push((v, b)),
            Err(why) => {
                println!("   {}: skipped ({why})", v.label);
                skipped.push((v.label.clone(), why));
            }
        }
    }
    let runs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let env = Env { dir: &dir, case, pki: &pki, load: &load, quick };
    let mut all: Vec<Vec<Trial>> = vec![Vec::new(); backends.len()];
    for r in 0..runs {
        for (i, (v, b)) in backends.iter().enumerate() {
            let t = run_once(&env, v, b).with_context(|| format!("{}, run {}", v.label, r + 1))?;
            print_trial(&v.label, &t, r, runs);
            all[i].push(t);
        }
    }
    drop(backends);
    let _ = std::fs::remove_dir_all(&dir);
    let labels: Vec<String> = case
        .variants
        .iter()
        .filter(|v| !skipped.iter().any(|(l, _)| l == &v.label))
        .map(|v| v.label.clone())
        .collect();
    let medians: Vec<Trial> = all.iter().map(|t| median(t)).collect();
    let md = markdown(name, case, &load, &labels, &medians, &skipped, runs);
    println!("\n{md}");
    let charts = charts(name, quick, &load, &labels, &medians)?;
    let run =
        Run { name, description: &case.description, optimises: &case.optimises, quick, command };
    let variants: Vec<serde_json::Value> = labels
        .iter()
        .zip(medians.iter().zip(&all))
        .map(|(l, (m, runs))| serde_json::json!({ "label": l, "median": m, "runs": runs }))
        .collect();
    let fields = serde_json::json!({
        "case_toml": case, "lines": load.lines, "bytes": load.bytes,
        "variants": variants, "skipped": skipped, "charts": charts,
    });
    super::save(&run, fields, Some(&md))?;
    for (l, m) in labels.iter().zip(&medians) {
        if m.records == 0 {
            bail!("{name}: {l} acknowledged no record");
        }
    }
    Ok(())
}

/// The run with the median records per receiver CPU-second.
fn median(trials: &[Trial]) -> Trial {
    let mut sorted = trials.to_vec();
    sorted.sort_by(|a, b| a.records_per_receiver_cpu_s.total_cmp(&b.records_per_receiver_cpu_s));
    sorted[sorted.len() / 2].clone()
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a OutputsCase,
    pki: &'a shipper::tls::pki::DevPki,
    load: &'a Load,
    quick: bool,
}

/// Runs the shipper into a fresh receiver writing into `variant`'s output, once.
fn run_once(env: &Env, variant: &Variant, backend: &Backend) -> anyhow::Result<Trial> {
    let (case, pki) = (env.case, env.pki);
    let dir = env.dir.join(variant.label.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    backend.reset()?;
    let bin = crate::root().join("target/release/shipper");
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let (output, receiver_keys) = backend.output(variant, &dir);
    let rcfg = dir.join("receiver.toml");
    let text = format!(
        "[receiver]\nlisten = \"127.0.0.1:{rx}\"\nworkers = {}\n{receiver_keys}\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         {output}[metrics]\nlisten = \"127.0.0.1:{rm}\"\n",
        case.shipper.receiver_workers, pki.ca, pki.receiver_cert, pki.receiver_key
    );
    std::fs::write(&rcfg, text)?;
    let fifos = vec![dir.join("ship.pipe")];
    let body = format!("[batch]\nzstd_level = {}\n", case.shipper.zstd_level);
    let scfg = dir.join("edge.toml");
    let receivers = format!("primary = [\"127.0.0.1:{rx}\"]\n");
    pipe::shipper_config(&scfg, pki, 1, sm, &fifos, &body, &receivers)?;
    let (rmetrics, smetrics) = (format!("127.0.0.1:{rm}"), format!("127.0.0.1:{sm}"));
    let rlog = dir.join("receiver.log");
    let receiver = Daemon::start_on(&case.cpus.receiver, &bin, "receive", &rcfg, &rlog, &rmetrics)?;
    let slog = dir.join("shipper.log");
    let ship = Daemon::start_on(&case.cpus.shipper, &bin, "run", &scfg, &slog, &smetrics)?;
    let cpu0 =
        (proc_cpu(receiver.pid()), backend.pid().map_or(0.0, proc_cpu), proc_cpu(ship.pid()));
    let start = Instant::now();
    let writers = pipe::spawn_load_writers(env.load, &fifos, &case.cpus.loadgen);
    let (acked, dropped, last_at) = wait(env, &smetrics, &variant.label, &dir)?;
    pipe::join_writers(writers)?;
    let mut t = Trial {
        wall_s: last_at.duration_since(start).as_secs_f64(),
        records: acked,
        dropped,
        receiver_cpu_s: proc_cpu(receiver.pid()) - cpu0.0,
        server_cpu_s: backend.pid().map_or(0.0, proc_cpu) - cpu0.1,
        shipper_cpu_s: proc_cpu(ship.pid()) - cpu0.2,
        ..Trial::default()
    };
    // The receiver publishes its figures every 250 ms: scrape once they count every record
    // acknowledged (or after 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let m = shipper::metrics::http::get(&rmetrics).unwrap_or_default();
        let written = sum(&m, "shipper_receiver_records_written_total", &[]);
        if written >= acked as f64 || Instant::now() > deadline {
            break m;
        }
        // Polling the receiver's metrics until they count what was acknowledged (deadline).
        std::thread::sleep(Duration::from_millis(50));
    };
    groups(&metrics, &mut t);
    drop(ship);
    drop(receiver);
    t.in_output = backend.records(&dir, &metrics)?;
    t.records_per_s = t.records as f64 / t.wall_s.max(1e-9);
    t.records_per_receiver_cpu_s = t.records as f64 / t.receiver_cpu_s.max(1e-9);
    t.records_per_cpu_s_with_server =
        t.records as f64 / (t.receiver_cpu_s + t.server_cpu_s).max(1e-9);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(t)
}

/// Group commits from the receiver's last scrape: how many, and frames per group (the
/// largest quantile over its shards).
fn groups(text: &str, t: &mut Trial) {
    const NAME: &str = "shipper_receiver_group_frames";
    let count = sum(text, &format!("{NAME}_count"), &[]);
    t.groups = count as u64;
    t.group_frames_mean = sum(text, &format!("{NAME}_sum"), &[]) / count.max(1.0);
    let q = |q: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{NAME}{{")))
            .filter(|l| l.contains(&format!("quantile=\"{q}\"")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold(0.0, f64::max)
    };
    (t.group_frames_p50, t.group_frames_p99, t.group_frames_max) = (q("0.5"), q("0.99"), q("1"));
}

/// Polls the shipper until every line is acknowledged or counted as dropped; returns those
/// counts and when they last changed.
fn wait(env: &Env, metrics: &str, label: &str, dir: &Path) -> anyhow::Result<(u64, u64, Instant)> {
    let deadline = Instant::now() + Duration::from_secs(if env.quick { 60 } else { 900 });
    let (mut last, mut last_at) = (0, Instant::now());
    loop {
        let text = shipper::metrics::http::get(metrics).unwrap_or_default();
        let acked = sum(&text, "shipper_records_acked_total", &[]) as u64;
        let dropped = sum(&text, "shipper_lines_dropped_total", &[]) as u64;
        let now = Instant::now();
        if acked + dropped != last {
            (last, last_at) = (acked + dropped, now);
        }
        if last >= env.load.lines {
            return Ok((acked, dropped, last_at));
        }
        if now > deadline {
            bail!(
                "{label}: {last} of {} lines after the deadline; see {}",
                env.load.lines,
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines in the files of `out` (`STREAM/*.log`).
fn lines_in(out: &Path) -> u64 {
    let mut n = 0;
    for stream in std::fs::read_dir(out).into_iter().flatten().flatten() {
        if stream.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(stream.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == "log") {
                let data = std::fs::read(f.path()).unwrap_or_default();
                n += memchr::memchr_iter(b'\n', &data).count() as u64;
            }
        }
    }
    n
}

fn print_trial(label: &str, t: &Trial, run: usize, runs: usize) {
    println!(
        "   {label:<18} run {}/{runs}: {:>7.3} s {:>10.0} records/s  receiver {:>6.3} CPU-s \
         ({:>9.0} records/CPU-s)  server {:.3} CPU-s  {:.1} frames/group  in output {}",
        run + 1,
        t.wall_s,
        t.records_per_s,
        t.receiver_cpu_s,
        t.records_per_receiver_cpu_s,
        t.server_cpu_s,
        t.group_frames_mean,
        t.in_output
    );
}

fn markdown(
    name: &str,
    case: &OutputsCase,
    load: &Load,
    labels: &[String],
    medians: &[Trial],
    skipped: &[(String, String)],
    runs: usize,
) -> String {
    let mut md = format!(
        "**{name}** ({}): {} lines, {:.0} bytes on average, one pipe, one writer, as fast as \
         possible; receiver `workers = {}`; CPUs: shipper {:?}, writer {:?}, receiver {:?}, \
         output servers unpinned; median of {runs} run(s) by records per receiver CPU-second.\n\n",
        case.description,
        thousands(load.lines as f64),
        load.bytes as f64 / load.lines.max(1) as f64,
        case.shipper.receiver_workers,
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
    );
    md +=
        "| output | records/s | receiver CPU s | **records per receiver CPU-s** | server CPU s | \
           records per CPU-s, receiver + server | frames per group: mean / p50 / p99 / max | \
           groups | in output | dropped by the shipper |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (l, t) in labels.iter().zip(medians) {
        let server =
            if t.server_cpu_s > 0.0 { format!("{:.3}", t.server_cpu_s) } else { "–".into() };
        md += &format!(
            "| {l} | {} | {:.3} | **{}** | {server} | {} | {:.1} / {:.0} / {:.0} / {:.0} | {} | \
             {} | {} |\n",
            thousands(t.records_per_s),
            t.receiver_cpu_s,
            thousands(t.records_per_receiver_cpu_s),
            thousands(t.records_per_cpu_s_with_server),
            t.group_frames_mean,
            t.group_frames_p50,
            t.group_frames_p99,
            t.group_frames_max,
            thousands(t.groups as f64),
            thousands(t.in_output as f64),
            thousands(t.dropped as f64),
        );
    }
    for (l, why) in skipped {
        md += &format!("\n{l}: **skipped**: {why}.\n");
    }
    md
}

fn charts(
    name: &str,
    quick: bool,
    load: &Load,
    labels: &[String],
    medians: &[Trial],
) -> anyhow::Result<Vec<String>> {
    super::chart::register_font()?;
    let root = crate::root();
    let dir = if quick { root.join("perf/results") } else { root.join("docs/perf") };
    std::fs::create_dir_all(&dir)?;
    let path: PathBuf = dir.join(format!("{name}-cpu{}.png", if quick { "-quick" } else { "" }));
    let v: Vec<f64> = medians.iter().map(|t| t.records_per_receiver_cpu_s).collect();
    let title = format!("{name}: records per receiver CPU-second ({} lines)", load.lines);
    let colors = [super::chart::BLUE, super::chart::ORANGE];
    super::chart::bars_with(&path, &title, "records per receiver CPU-second", labels, &v, &colors)?;
    println!("   chart: {}", path.display());
    Ok(vec![path.strip_prefix(&root).unwrap_or(&path).display().to_string()])
}

/// A ClickHouse server of this case's own, in a scratch directory, on free ports (as
/// shipper/tests/outputs.rs starts one), with the table the output expects.
struct ClickHouse {
    server: Daemon,
    http: u16,
}

const CLICKHOUSE: &str = "/usr/sbin/clickhouse-server";

impl ClickHouse {
    fn start(dir: &Path) -> Result<ClickHouse, String> {
        if !Path::new(CLICKHOUSE).exists() {
            return Err(format!("{CLICKHOUSE} is missing (cargo xtask setup installs it)"));
        }
        let (http, tcp) =
            (free_port().map_err(|e| e.to_string())?, free_port().map_err(|e| e.to_string())?);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let d = dir.display();
        let users = "<?xml version=\"1.0\"?><yandex><profiles><default/></profiles><users>\
             <default><password></password><networks><ip>127.0.0.1</ip></networks>\
             <profile>default</profile><quota>default</quota></default></users>\
             <quotas><default/></quotas></yandex>\n";
        let config = format!(
            "<?xml version=\"1.0\"?><yandex><logger><level>warning</level>\
             <log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog></logger>\
             <http_port>{http}</http_port><tcp_port>{tcp}</tcp_port>\
             <listen_host>127.0.0.1</listen_host><path>{d}/data/</path>\
             <tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\
             <format_schema_path>{d}/format_schemas/</format_schema_path>\
             <users_config>{d}/users.xml</users_config><mark_cache_size>67108864</mark_cache_size>\
             <default_profile>default</default_profile><default_database>default</default_database>\
             </yandex>\n"
        );
        let write = |f: &str, s: &str| std::fs::write(dir.join(f), s).map_err(|e| e.to_string());
        write("users.xml", users)?;
        write("config.xml", &config)?;
        let arg = format!("--config-file={d}/config.xml");
        let mut server = Daemon::spawn(&[], CLICKHOUSE, &[&arg], &dir.join("stderr.log"))
            .map_err(|e| format!("{e:#}"))?;
        let ch = |server| ClickHouse { server, http };
        let up = || query(http, "SELECT 1").is_ok_and(|a| a == "1\n");
        let poll = Duration::from_millis(50);
        match testkit::process::poll_alive(&mut server.0, Duration::from_secs(60), poll, up) {
            Ok(()) => {}
            Err(e) => {
                let err = std::fs::read_to_string(dir.join("server.err.log")).unwrap_or_default();
                return Err(format!("clickhouse-server did not answer on {http} ({e:?}): {err}"));
            }
        }
        let ch = ch(server);
        ch.query(
            "CREATE TABLE logs (stream String, record String) ENGINE = MergeTree ORDER BY stream",
        )
        .map_err(|e| format!("{e:#}"))?;
        Ok(ch)
    }

    fn query(&self, sql: &str) -> anyhow::Result<String> {
        query(self.http, sql)
    }
}

/// Runs `sql` through ClickHouse's HTTP interface with curl; its answer.
fn query(http: u16, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "30", "--data-binary", sql])
        .arg(format!("http://127.0.0.1:{http}/"))
        .output()
        .context("curl")?;
    if !out.status.success() {
        bail!("ClickHouse refused {sql:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
