//! The median run of each system, the spread over runs, and the Markdown summary of a pipe case.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::pipe::{Load, PipeCase, System};
use super::Measure;

#[derive(Serialize)]
pub struct SystemResult {
    pub label: String,
    #[serde(skip)]
    pub system: System,
    /// The median run by the case's optimised figure (lines/s for `throughput`, read→ack p99
    /// for the shipper in `latency`, lines per CPU-second otherwise).
    pub median: Measure,
    /// (lowest, highest) over the runs.
    pub spread_lines_per_s: (f64, f64),
    pub spread_lines_per_cpu_s: (f64, f64),
    pub runs: Vec<Measure>,
}

impl SystemResult {
    pub fn new(label: String, system: System, runs: Vec<Measure>, optimises: &str) -> Self {
        let key = |m: &Measure| match optimises {
            "throughput" => m.lines_per_s,
            "latency" if !m.latency_ms.is_empty() => -m.latency(0.99).unwrap_or(0.0),
            _ => m.lines_per_cpu_s,
        };
        let mut sorted = runs.clone();
        sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let median = sorted[sorted.len() / 2].clone();
        let range = |f: fn(&Measure) -> f64| {
            runs.iter().map(f).fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)))
        };
        SystemResult {
            label,
            system,
            median,
            spread_lines_per_s: range(|m| m.lines_per_s),
            spread_lines_per_cpu_s: range(|m| m.lines_per_cpu_s),
            runs,
        }
    }

    fn is_shipper(&self) -> bool {
        matches!(self.system, System::Shipper { .. })
    }

    /// Whether this is this checkout's shipper (not another revision's).
    fn is_this_shipper(&self) -> bool {
        matches!(self.system, System::Shipper { rev: None, .. })
    }
}

/// One line per run while the case runs.
pub fn print_run(m: &Measure, run: usize, runs: usize) {
    let p99 = m.latency(0.99).map_or("–".into(), |v| format!("{v:.1} ms"));
    println!(
        "   {:<14} run {}/{}: {:>7.3} s {:>10.0} lines/s {:>7.3} CPU-s {:>10.0} lines/CPU-s \
         {:>4} MiB  p99 {p99}  delivered {}/{}",
        m.label,
        run + 1,
        runs,
        m.wall_s,
        m.lines_per_s,
        m.cpu_s,
        m.lines_per_cpu_s,
        m.peak_rss_kib / 1024,
        m.delivered,
        m.delivered + m.dropped,
    );
}

pub(super) fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn kilo(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else {
        format!("{:.0} k", v / 1e3)
    }
}

/// The Markdown summary: the workload, one row per system, ratios, skipped peers, and the
/// per-service deliveries when rates are limited.
pub fn markdown(
    name: &str,
    case: &PipeCase,
    load: &Load,
    results: &[SystemResult],
    skipped: &BTreeMap<String, String>,
) -> String {
    let mut md = workload(name, case, load, results.first().map_or(0, |r| r.runs.len()));
    let base = results.iter().find(|r| r.is_this_shipper()).map(|r| &r.median);
    let raw = results.iter().find(|r| r.label == "raw").map(|r| r.median.lines_per_s);
    md += "| system | lines/s | MB/s | CPU s | lines per CPU-s (spread) | CPU s per M lines | \
           CPU per line vs shipper | peak RSS | read→ack p50 / p99 / max | writer max block | \
           not delivered |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in results {
        md += &system_row(r, base, raw);
    }
    for r in results.iter().filter(|r| r.is_shipper()) {
        let _ = writeln!(
            md,
            "\n{}: `shipper receive` (decompression, files, acks) used {:.3} CPU-s beside it.",
            r.label, r.median.receiver_cpu_s
        );
        sched_line(&mut md, &r.median);
    }
    for (peer, why) in skipped {
        let _ = writeln!(md, "\n{peer}: **skipped**: {why}.");
    }
    if case.shipper.ratelimit_rate > 0 {
        fairness(&mut md, case, load, results);
    }
    md
}

/// The summary's first paragraph: the case, its workload and CPUs, and how many runs.
fn workload(name: &str, case: &PipeCase, load: &Load, runs: usize) -> String {
    let w = &case.workload;
    format!(
        "**{name}** ({}; optimises {}): {} lines, {:.0} bytes on average ({}–{}), {} services{}, \
         {} pipe(s) × {} writer(s){}, {}; CPUs: shipper/peer {:?}, load generator {:?}, \
         receiver/sink {:?}; median of {runs} run(s).\n\n",
        case.description,
        case.optimises,
        thousands(load.lines as f64),
        load.bytes as f64 / load.lines.max(1) as f64,
        w.line_bytes_min,
        w.line_bytes_max,
        w.services,
        if w.noisy_share > 0.0 {
            format!(" (svc-00 noisy: {:.0}% of lines)", w.noisy_share * 100.0)
        } else {
            format!(" (Zipf skew {})", w.skew)
        },
        w.pipes,
        w.writers_per_pipe,
        if w.write_per_line { ", one write() per line" } else { "" },
        if w.rate > 0 {
            format!("{} lines/s", thousands(w.rate as f64))
        } else {
            "as fast as possible".into()
        },
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
    )
}

/// Where the machine's time went in run `m`: per group of threads, on a CPU and runnable
/// but waiting for one (a CPU-bound machine shows waiting; a latency-bound one shows idle).
fn sched_line(md: &mut String, m: &Measure) {
    if m.sched_s.is_empty() {
        return;
    }
    let [span, cpus, _] = m.sched_s.get("window").copied().unwrap_or_default();
    let mut parts = Vec::new();
    for (group, [run, wait, runs]) in
        m.sched_s.iter().filter(|(g, _)| !["idle", "window"].contains(&g.as_str()))
    {
        parts.push(format!("{group} {run:.3} on CPU + {wait:.3} waiting for one ({runs:.0} runs)"));
    }
    let idle = m.sched_s.get("idle").map_or(0.0, |v| v[0]);
    let _ = writeln!(
        md,
        "Time from the writers' start to the last line's count, {span:.3} s × {cpus} CPUs = \
         {:.3} CPU-s (seconds; threads from the scheduler, idle from /proc/stat): {}; \
         CPUs idle {idle:.3}.",
        span * cpus,
        parts.join("; ")
    );
}

/// One system's row of the table, its CPU per line against the shipper's (`base`) and its
/// throughput against `raw`'s.
fn system_row(r: &SystemResult, base: Option<&Measure>, raw: Option<f64>) -> String {
    let m = &r.median;
    let vs = base.map_or("–".into(), |b| {
        format!("{:.2}×", m.cpu_s_per_million_lines / b.cpu_s_per_million_lines.max(1e-12))
    });
    let lat = match (m.latency(0.5), m.latency(0.99), m.latency(1.0)) {
        (Some(a), Some(b), Some(c)) => format!("{a:.1} / {b:.1} / {c:.1} ms"),
        _ => "–".into(),
    };
    let tput = match raw {
        Some(raw) if r.label != "raw" => {
            format!("{} ({:.0}% of raw)", thousands(m.lines_per_s), m.lines_per_s / raw * 100.0)
        }
        _ => thousands(m.lines_per_s),
    };
    format!(
        "| {} | {tput} | {:.1} | {:.3} | **{}** ({}–{}) | {:.2} | {vs} | {:.1} MiB | {lat} | \
         {:.1} ms | {} |\n",
        r.label,
        m.mb_per_s,
        m.cpu_s,
        thousands(m.lines_per_cpu_s),
        kilo(r.spread_lines_per_cpu_s.0),
        kilo(r.spread_lines_per_cpu_s.1),
        m.cpu_s_per_million_lines,
        m.peak_rss_kib as f64 / 1024.0,
        m.write_block_max_ms,
        thousands(m.dropped as f64),
    )
}

/// Per-service deliveries against what the limit allows (`rate × wall + burst`, at most what
/// was offered).
fn fairness(md: &mut String, case: &PipeCase, load: &Load, results: &[SystemResult]) {
    let rate = case.shipper.ratelimit_rate as f64;
    let services = case.workload.services.min(load.per_service.len());
    let _ = write!(
        md,
        "\nPer service, limit {} lines/s each (burst one second): offered",
        thousands(rate)
    );
    for r in results {
        let _ = write!(md, " / {} delivered (of allowed)", r.label);
    }
    md.push_str(".\n\n| service | offered |");
    for r in results {
        let _ = write!(md, " {} |", r.label);
    }
    md.push_str("\n|---|---:|");
    md.push_str(&"---:|".repeat(results.len()));
    md.push('\n');
    for s in 0..services {
        let offered = load.per_service[s] as f64;
        let _ = write!(md, "| svc-{s:02} | {} |", thousands(offered));
        for r in results {
            let m = &r.median;
            let allowed = offered.min(rate * m.wall_s + rate);
            let got = m.per_service.get(s).copied().unwrap_or(0) as f64;
            let _ = write!(md, " {} ({:.0}%) |", thousands(got), got / allowed.max(1.0) * 100.0);
        }
        md.push('\n');
    }
}
