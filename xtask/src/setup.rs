//! Installs what is missing, idempotently: the rustfmt and clippy components, cargo-fuzz
//! (the fuzz targets run on the machine's nightly toolchain), and the Debian packages the
//! tests use (a real Prometheus scrapes the metrics endpoints in the tests). The
//! journal, eBPF and perf capabilities add their packages here.

use std::process::Command;

use anyhow::bail;

/// Debian packages the build and tests need: (command to probe, package).
const PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // Journal files for the journal tests are written by systemd's own tool.
    ("/lib/systemd/systemd-journal-remote", "systemd-journal-remote"),
];

pub fn run() -> anyhow::Result<()> {
    for component in ["rustfmt", "clippy"] {
        let probe = if component == "rustfmt" { "fmt" } else { "clippy" };
        let ok = Command::new("cargo")
            .args([probe, "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            crate::run("rustup", &["component", "add", component])?;
        }
    }
    let fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz {
        crate::run("cargo", &["install", "cargo-fuzz", "--version", "0.13.2", "--locked"])?;
    }
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "--version"]).output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!("the fuzz targets need a nightly toolchain (`rustup toolchain install nightly`)");
    }
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`", missing.join(" "));
    }
    crate::run("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    crate::run("apt-get", &args)
}
