//! Journal-read cases: the same journal files read to JSON lines by `shipper journal cat`,
//! `journalctl -o json --all` and `journalctl -o export`, one after another, each on one core.
//! Files are written by systemd-journal-remote from a deterministic export stream.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalCase {
    #[allow(dead_code)]
    kind: String,
    description: String,
    optimises: String,
    entries: usize,
    quick_entries: usize,
    /// Entries of every 1,000 with a ~2 KiB multi-line message holding bytes that are not
    /// UTF-8 (`loadgen::large_message`); 0 by default.
    #[serde(default)]
    large_per_mille: u64,
}

#[derive(Serialize, Default, Clone)]
struct Reader {
    wall_s: f64,
    cpu_s: f64,
    entries_per_s: f64,
    entries_per_cpu_s: f64,
    peak_rss_kib: u64,
}

pub fn run_case(name: &str, case: &JournalCase, quick: bool, command: &str) -> anyhow::Result<()> {
    let entries = if quick { case.quick_entries } else { case.entries };
    println!("\n== {name}: {} ({entries} entries)", case.description);
    let dir = super::tempdir()?;
    write_journal(&dir.join("j"), entries, case.large_per_mille)?;
    let files = format!("{}/*.journal", dir.join("j").display());
    let bin = crate::root().join("target/release/shipper");
    let runs: [(&str, Vec<String>); 3] = [
        (
            "shipper",
            vec![
                bin.display().to_string(),
                "journal".into(),
                "cat".into(),
                dir.join("j").display().to_string(),
            ],
        ),
        (
            "journalctl-json",
            vec![
                "journalctl".into(),
                "--file".into(),
                files.clone(),
                "-o".into(),
                "json".into(),
                "--all".into(),
            ],
        ),
        (
            "journalctl-export",
            vec!["journalctl".into(), "--file".into(), files, "-o".into(), "export".into()],
        ),
    ];
    let mut results = Vec::new();
    println!(
        "   {:<18} {:>8} {:>8} {:>14} {:>18} {:>10}",
        "reader", "wall s", "CPU s", "entries/s", "entries/CPU-s", "peak RSS"
    );
    for (label, argv) in &runs {
        let r = measure(argv, entries)?;
        println!(
            "   {label:<18} {:>8.3} {:>8.3} {:>14.0} {:>18.0} {:>6} MiB",
            r.wall_s,
            r.cpu_s,
            r.entries_per_s,
            r.entries_per_cpu_s,
            r.peak_rss_kib / 1024
        );
        results.push((label.to_string(), r));
    }
    let ratio = results[0].1.entries_per_cpu_s / results[1].1.entries_per_cpu_s.max(1.0);
    println!("   shipper vs journalctl -o json, per CPU-second: {ratio:.1}x");
    let _ = std::fs::remove_dir_all(&dir);
    super::chart::register_font()?;
    let root = crate::root();
    let chart = if quick {
        root.join(format!("perf/results/{name}-cpu-quick.png"))
    } else {
        root.join(format!("docs/perf/{name}-cpu.png"))
    };
    std::fs::create_dir_all(chart.parent().expect("a directory"))?;
    let labels: Vec<String> = results.iter().map(|(l, _)| l.clone()).collect();
    let values: Vec<f64> = results.iter().map(|(_, r)| r.entries_per_cpu_s).collect();
    let title = format!("{name}: entries per CPU-second ({entries} entries)");
    super::chart::bars(&chart, &title, "entries per CPU-second", &labels, &values)?;
    println!("   chart: {}", chart.display());
    let run = super::Run {
        name,
        description: &case.description,
        optimises: &case.optimises,
        quick,
        command,
    };
    let fields = serde_json::json!({
        "entries": entries,
        "readers": results.iter().map(|(l, r)| (l.clone(), serde_json::to_value(r).expect("plain data"))).collect::<serde_json::Map<_, _>>(),
        "shipper_vs_journalctl_json": ratio,
    });
    super::save(&run, fields, None)
}

/// Writes `entries` entries with systemd-journal-remote into `dir` (it rotates by itself),
/// `large_per_mille` of every 1,000 with a large multi-line message.
pub(super) fn write_journal(
    dir: &Path,
    entries: usize,
    large_per_mille: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut child = Command::new("/lib/systemd/systemd-journal-remote")
        .arg(format!("--output={}", dir.join("perf.journal").display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("systemd-journal-remote (cargo xtask setup installs it)")?;
    // Streamed in chunks, so this process stays small: the readers measured next are forked
    // from it, and a child's peak RSS counts what it inherited before exec.
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut chunk = Vec::new();
    for start in (0..entries).step_by(10_000) {
        chunk.clear();
        let n = (entries - start).min(10_000);
        crate::loadgen::journal_export(0x10c, start, n, large_per_mille, &mut chunk);
        stdin.write_all(&chunk)?;
    }
    drop(stdin);
    if !child.wait()?.success() {
        bail!("systemd-journal-remote failed");
    }
    Ok(())
}

/// Runs `argv` with output to /dev/null; counts its lines through a pipe would cost CPU here,
/// so the entry count is the one written.
fn measure(argv: &[String], entries: usize) -> anyhow::Result<Reader> {
    let start = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let (cpu_s, peak_rss_kib) = super::wait_rusage(child)?;
    let wall_s = start.elapsed().as_secs_f64();
    Ok(Reader {
        wall_s,
        cpu_s,
        entries_per_s: entries as f64 / wall_s,
        entries_per_cpu_s: entries as f64 / cpu_s.max(1e-9),
        peak_rss_kib,
    })
}
