//! `cargo xtask <command>`: the project's automation.
//!
//! - `setup`: installs what the build and tests need on a fresh Debian 12 machine
//!   (idempotent; a no-op when everything is present).
//! - `test`: setup, then formatting, lints, every test, bounded fuzzing and the quick perf
//!   suite; the CI command (`.ci/run`).
//! - `demo`: setup, release build, then a receiver and a shipper on loopback with a
//!   throw-away CA, sample logs written into the pipes, live progress, and what arrived.
//! - `perf [CASE...] [--quick]`: end-to-end benchmark cases from `perf/cases/`.

mod daemon;
mod demo;
mod fuzz;
mod loadgen;
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
        Some("perf") => perf::run(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <setup|test|demo|perf [CASE...] [--quick]>");
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
    run("cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // The build without the eBPF toolchain (`--no-default-features`) must stay clean too.
    let lean =
        ["clippy", "-p", "shipper", "--lib", "--no-default-features", "--", "-D", "warnings"];
    run("cargo", &lean)?;
    let (passed, failed) = run_counting("cargo", &["test", "--workspace", "--all-targets"])?;
    // One closing line for the whole suite (cargo prints one per test binary).
    if failed > 0 {
        println!("tests: {passed} passed, {failed} failed");
        bail!("{failed} tests failed");
    }
    // The fuzz targets and the benchmark suite run briefly too, so that they cannot rot.
    fuzz::run()?;
    perf::run(&["--quick".to_string()])?;
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs a cargo test command, echoing its output, and adds up its `test result:` lines.
fn run_counting(program: &str, args: &[&str]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    println!("$ {program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let (mut passed, mut failed) = (0, 0);
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
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok((passed, failed))
}
