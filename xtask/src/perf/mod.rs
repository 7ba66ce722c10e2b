//! `cargo xtask perf [CASE...] [--quick]`: end-to-end cases from `perf/cases/<case>/case.toml`,
//! each run beside its baseline in the same invocation, results in `perf/results/`.
//! A case's `kind` says what it runs: `pipe` (below, the default) or `journal` ([`journal`]).
//!
//! A pipe case sends the same deterministic lines (see `loadgen.rs`) through
//! - the baseline: `cat FIFO > /dev/null` (the cost of moving the bytes out of the pipe);
//! - the shipper: FIFO → `shipper run` → mutual TLS → `shipper receive` (fsync off), waiting
//!   until every line is acknowledged;
//!
//! and reports wall time, lines/s, MB/s, CPU-seconds per process (from /proc), lines per
//! shipper CPU-second, peak RSS (VmHWM) and read→ack latency quantiles (shipper histograms).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::http::get;
use shipper::metrics::text::sum;

mod journal;

use crate::daemon::{free_port, Daemon};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    #[allow(dead_code)]
    kind: Option<String>,
    description: String,
    optimises: String,
    lines: usize,
    quick_lines: usize,
    line_bytes: usize,
    services: usize,
    pipes: usize,
    workers: usize,
    zstd_level: u32,
}

#[derive(Serialize, Default, Clone)]
struct Measure {
    wall_s: f64,
    lines_per_s: f64,
    mb_per_s: f64,
    cpu_s: f64,
    lines_per_cpu_s: f64,
    peak_rss_kib: u64,
    receiver_cpu_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    /// Lines the shipper dropped (outbox full: the receiver could not keep up).
    dropped: f64,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut names: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).cloned().collect();
    let cases_dir = crate::root().join("perf/cases");
    if names.is_empty() {
        for e in std::fs::read_dir(&cases_dir)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
    }
    crate::run("cargo", &["build", "--release", "-p", "shipper"])?;
    for name in names {
        let path = cases_dir.join(&name).join("case.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        match table.get("kind").and_then(|k| k.as_str()).unwrap_or("pipe") {
            "pipe" => {
                let case: Case =
                    toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
                run_case(&name, &case, quick)?;
            }
            "journal" => {
                let case = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
                journal::run_case(&name, &case, quick)?;
            }
            other => bail!("{}: unknown kind {other:?} (pipe or journal)", path.display()),
        }
    }
    Ok(())
}

fn run_case(name: &str, case: &Case, quick: bool) -> anyhow::Result<()> {
    let lines = if quick { case.quick_lines } else { case.lines };
    println!("\n== {name}: {} ({lines} lines of ~{} bytes)", case.description, case.line_bytes);
    let per_pipe: Vec<Vec<u8>> = (0..case.pipes)
        .map(|p| {
            let mut buf = Vec::new();
            crate::loadgen::lines(
                0x5eed + p as u64,
                lines / case.pipes,
                case.line_bytes,
                case.services,
                &mut buf,
            );
            buf
        })
        .collect();
    let bytes: usize = per_pipe.iter().map(Vec::len).sum();
    let dir = tempdir()?;
    let baseline = baseline(&dir, &per_pipe)?;
    let shipper = shipper(&dir, case, &per_pipe)?;
    let total = (lines / case.pipes * case.pipes) as f64;
    let fill = |m: &mut Measure| {
        m.lines_per_s = total / m.wall_s;
        m.mb_per_s = bytes as f64 / m.wall_s / 1e6;
        m.lines_per_cpu_s = if m.cpu_s > 0.0 { total / m.cpu_s } else { 0.0 };
    };
    let (mut baseline, mut shipper) = (baseline, shipper);
    fill(&mut baseline);
    fill(&mut shipper);
    println!(
        "   {:<10} {:>9} {:>12} {:>8} {:>9} {:>14} {:>10} {:>9} {:>9}",
        "run", "wall s", "lines/s", "MB/s", "CPU s", "lines/CPU-s", "peak RSS", "p50 ms", "p99 ms"
    );
    for (label, m) in [("cat", &baseline), ("shipper", &shipper)] {
        println!(
            "   {label:<10} {:>9.3} {:>12.0} {:>8.1} {:>9.3} {:>14.0} {:>7} MiB {:>9.2} {:>9.2}",
            m.wall_s,
            m.lines_per_s,
            m.mb_per_s,
            m.cpu_s,
            m.lines_per_cpu_s,
            m.peak_rss_kib / 1024,
            m.latency_p50_ms,
            m.latency_p99_ms
        );
    }
    println!(
        "   receiver CPU s: {:.3}; shipper/cat wall ratio: {:.2}; lines dropped: {}",
        shipper.receiver_cpu_s,
        shipper.wall_s / baseline.wall_s,
        shipper.dropped
    );
    let result = serde_json::json!({
        "case": name,
        "description": case.description,
        "optimises": case.optimises,
        "quick": quick,
        "lines": total,
        "bytes": bytes,
        "workers": case.workers,
        "zstd_level": case.zstd_level,
        "git_revision": git_revision(),
        "cpu_model": cpu_model(),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "command": format!("cargo xtask perf {name}{}", if quick { " --quick" } else { "" }),
        "baseline_cat": baseline,
        "shipper": shipper,
    });
    save(name, quick, &result)
}

/// Writes `perf/results/<date>-<case>[-quick].json`.
pub(crate) fn save(name: &str, quick: bool, result: &serde_json::Value) -> anyhow::Result<()> {
    let out = crate::root().join("perf/results");
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{}-{name}{}.json", today(), if quick { "-quick" } else { "" }));
    std::fs::write(&file, serde_json::to_string_pretty(result)?)?;
    println!("   results: {}", file.display());
    Ok(())
}

pub(crate) fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("shipper-perf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn mkfifo(path: &Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!("mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes each buffer into its FIFO from its own thread (blocking writes, 64 KiB at a time).
fn write_all(
    paths: &[PathBuf],
    data: &[Vec<u8>],
) -> Vec<std::thread::JoinHandle<std::io::Result<()>>> {
    paths
        .iter()
        .cloned()
        .zip(data.iter().cloned())
        .map(|(p, d)| {
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
                for chunk in d.chunks(64 << 10) {
                    f.write_all(chunk)?;
                }
                Ok(())
            })
        })
        .collect()
}

/// `cat FIFO > /dev/null` for each pipe; CPU from wait4's rusage, peak RSS from /proc while
/// an extra descriptor keeps the FIFO open (so `cat` has not exited yet when it is read).
fn baseline(dir: &Path, data: &[Vec<u8>]) -> anyhow::Result<Measure> {
    use std::os::fd::AsRawFd;
    let paths: Vec<PathBuf> = (0..data.len()).map(|i| dir.join(format!("base{i}.pipe"))).collect();
    let mut cats = Vec::new();
    let mut holds = Vec::new();
    for p in &paths {
        mkfifo(p)?;
        cats.push(Command::new("cat").arg(p).stdout(Stdio::null()).spawn()?);
        holds.push(std::fs::OpenOptions::new().read(true).write(true).open(p)?);
    }
    let start = Instant::now();
    for w in write_all(&paths, data) {
        w.join().expect("writer")?;
    }
    let drained = |f: &std::fs::File| {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
        n == 0
    };
    while !holds.iter().all(drained) {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut m = Measure { wall_s: start.elapsed().as_secs_f64(), ..Measure::default() };
    m.peak_rss_kib = cats.iter().map(|c| proc_hwm_kib(c.id())).max().unwrap_or(0);
    drop(holds);
    for c in cats {
        m.cpu_s += wait_rusage(c)?.0;
    }
    Ok(m)
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
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn proc_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

fn shipper(dir: &Path, case: &Case, data: &[Vec<u8>]) -> anyhow::Result<Measure> {
    let bin = crate::root().join("target/release/shipper");
    let pki = shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into()])?;
    let (rx, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let rcfg = dir.join("receiver.toml");
    std::fs::write(&rcfg, format!(
        "[receiver]\nlisten = \"127.0.0.1:{rx}\"\nworkers = {w}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[output]\ndirectory = {:?}\nfsync = false\n[metrics]\nlisten = \"127.0.0.1:{rm}\"\n",
        pki.ca, pki.receiver_cert, pki.receiver_key, dir.join("out"), w = case.workers
    ))?;
    let paths: Vec<PathBuf> = (0..data.len()).map(|i| dir.join(format!("ship{i}.pipe"))).collect();
    let pipes: String = paths.iter().map(|p| format!("[[sources.pipe]]\npath = {p:?}\n")).collect();
    let scfg = dir.join("edge.toml");
    std::fs::write(&scfg, format!(
        "[shipper]\nworkers = {}\n[metrics]\nlisten = \"127.0.0.1:{sm}\"\n{pipes}[batch]\nzstd_level = {}\n[receivers]\nprimary = [\"127.0.0.1:{rx}\"]\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nserver_name = \"localhost\"\n",
        case.workers, case.zstd_level, pki.ca, pki.shipper_cert, pki.shipper_key
    ))?;
    let rmetrics = format!("127.0.0.1:{rm}");
    let smetrics = format!("127.0.0.1:{sm}");
    let receiver = Daemon::start(&bin, "receive", &rcfg, &dir.join("receiver.log"), &rmetrics)?;
    let ship = Daemon::start(&bin, "run", &scfg, &dir.join("shipper.log"), &smetrics)?;
    let (spid, rpid) = (ship.0.id(), receiver.0.id());
    let (cpu0, rcpu0) = (proc_cpu(spid), proc_cpu(rpid));
    let total =
        data.iter().map(|d| d.iter().filter(|&&b| b == b'\n').count()).sum::<usize>() as f64;
    let start = Instant::now();
    let writers = write_all(&paths, data);
    let deadline = start + Duration::from_secs(600);
    let text = loop {
        let text = get(&smetrics).unwrap_or_default();
        let acked = sum(&text, "shipper_records_acked_total", &[]);
        if acked + sum(&text, "shipper_lines_dropped_total", &[]) >= total {
            break text;
        }
        if Instant::now() > deadline {
            bail!("not every line acknowledged after 10 minutes; see {}", dir.display());
        }
        // Scrapes cost the shipper CPU; 50 ms keeps them under 0.1% of a run.
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall_s = start.elapsed().as_secs_f64();
    for w in writers {
        w.join().expect("writer")?;
    }
    let q = |q: &str| {
        sum(&text, "shipper_read_to_ack_latency_seconds", &[("quantile", q)])
            / case.workers.max(1) as f64
            * 1e3
    };
    let m = Measure {
        wall_s,
        cpu_s: proc_cpu(spid) - cpu0,
        peak_rss_kib: proc_hwm_kib(spid),
        receiver_cpu_s: proc_cpu(rpid) - rcpu0,
        latency_p50_ms: q("0.5"),
        latency_p99_ms: q("0.99"),
        dropped: sum(&text, "shipper_lines_dropped_total", &[]),
        ..Measure::default()
    };
    drop(ship);
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir.join("out"));
    Ok(m)
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
