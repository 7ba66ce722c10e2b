//! `cargo xtask <command>`: the project's automation.
//!
//! - `setup`: installs what the build and tests need on a fresh Debian 12 machine
//!   (idempotent; a no-op when everything is present).
//! - `test`: setup, then formatting, lints (functions of at most 70 lines), the layering,
//!   every test, bounded fuzzing and the quick perf suite; the CI command (`.ci/run`).
//! - `demo`: release build (installing nothing), then a receiver and a shipper on loopback
//!   with a throw-away CA, sample logs written into the pipes, live progress, and what arrived.
//! - `package`: the Debian package of the release build, in `target/debian/`
//!   (packaging/debian/, docs/operations.md).
//! - `perf [CASE...] [--quick] [--runs N] [--against REV]`: end-to-end benchmark cases from
//!   `perf/cases/`; `--against` runs another git revision's shipper beside this one's.
//! - `layers [DIR]`: the shipper library's layering (no import of `runtime` from below it,
//!   no circle between its top-level modules), read from `shipper/src` (or `DIR`).

mod daemon;
mod demo;
mod fuzz;
mod layers;
mod loadgen;
mod package;
mod perf;
mod setup;

use std::process::Command;

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("test") => test(),
        Some("demo") => demo::run(),
        Some("package") => package::run(),
        Some("perf") => perf::run(&args[1..]),
        Some("layers") => layers::run(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <setup|test|demo|package|perf [CASE...] [--quick] [--against REV]|layers [DIR]>");
            std::process::exit(2);
        }
    }
}

/// The workspace root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs a command from the workspace root, failing with its name if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    setup::run()?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    // Functions of at most 70 lines (clippy.toml), checked, not hoped for.
    let lines = ["-W", "clippy::too_many_lines"];
    let clippy =
        ["clippy", "--workspace", "--all-targets", "--", lines[0], lines[1], "-D", "warnings"];
    run("cargo", &clippy)?;
    // The build without the eBPF toolchain (`--no-default-features`) must stay clean too.
    let lean = ["clippy", "-p", "shipper", "--lib", "--no-default-features", "--"];
    run("cargo", &[&lean[..], &lines[..], &["-D", "warnings"]].concat())?;
    // No module below `runtime` imports it; the top-level modules import in no circle.
    layers::run(&[])?;
    let mut t = run_counting("cargo", &["test", "--workspace", "--all-targets"])?;
    // Tests that need root are `#[ignore = "needs root: <why>"]` (all in the integration
    // binary): as root they run now, otherwise they are counted as skipped, never as passed.
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut skipped = t.ignored;
    if as_root && t.ignored > 0 {
        let ignored = ["test", "-p", "shipper", "--test", "tests", "--", "--ignored"];
        let r = run_counting("cargo", &ignored)?;
        skipped = t.ignored.saturating_sub(r.passed + r.failed);
        t.passed += r.passed;
        t.failed += r.failed;
    }
    // One closing line for the whole suite (cargo prints one per test binary).
    let summary = |t: &Counts| {
        let why = if as_root { "" } else { " (they need root: run `cargo xtask test` as root)" };
        println!("tests: {} passed, {} failed, {skipped} skipped{why}", t.passed, t.failed);
    };
    if t.failed > 0 {
        summary(&t);
        bail!("{} tests failed", t.failed);
    }
    // The fuzz targets and the benchmark suite run briefly too, so that they cannot rot.
    fuzz::run()?;
    perf::run(&["--quick".to_string()])?;
    summary(&t);
    Ok(())
}

/// What the `test result:` lines of a cargo test command add up to.
#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs a cargo test command, echoing its output, and adds up its `test result:` lines.
fn run_counting(program: &str, args: &[&str]) -> anyhow::Result<Counts> {
    use std::io::{BufRead, BufReader};
    println!("$ {program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let mut t = Counts::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse::<u64>().ok()
                    })
                    .unwrap_or(0)
            };
            t.passed += count("passed");
            t.failed += count("failed");
            t.ignored += count("ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() && t.failed == 0 {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(t)
}
