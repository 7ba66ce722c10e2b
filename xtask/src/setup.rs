//! Installs what is missing, idempotently: the rustfmt and clippy components, cargo-fuzz
//! (the fuzz targets run on the machine's nightly toolchain), and the Debian packages the
//! tests use (a real Prometheus scrapes the metrics endpoints in the tests). The
//! journal, eBPF and perf capabilities add their packages here.
//!
//! The perf suite's peers ([`peers`]) are installed on a best-effort basis: one that cannot be
//! installed is reported as skipped, with the reason, by every case that names it.

use std::process::Command;

use anyhow::bail;

/// Debian packages the build and tests need: (command or file to probe, package).
const PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // Journal files for the journal tests are written by systemd's own tool.
    ("/lib/systemd/systemd-journal-remote", "systemd-journal-remote"),
    // The perf suite's charts draw their text with this font (plotters' ab_glyph backend).
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
    // Fault injection in the delivery tests: network namespaces, veth pairs and silent drops.
    ("ip", "iproute2"),
    ("nft", "nftables"),
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
    apt_install(&missing(PACKAGES))?;
    for (peer, why) in peers() {
        println!("perf peer {peer} skipped: {why}");
    }
    Ok(())
}

/// The packages of `packages` whose probe command fails.
fn missing<'a>(packages: &[(&str, &'a str)]) -> Vec<&'a str> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(probe, _)| {
            // A path must exist; a bare name must be a command.
            if probe.starts_with('/') {
                return !std::path::Path::new(probe).exists();
            }
            !Command::new("sh")
                .args(["-c", &format!("command -v {probe}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    missing
}

fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`", missing.join(" "));
    }
    // Other engineers' set-ups may hold the dpkg lock for a while: wait for it.
    crate::run("apt-get", &["-o", "DPkg::Lock::Timeout=600", "update", "-q"])?;
    let mut args = vec!["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q"];
    args.push("--no-install-recommends");
    args.extend(missing);
    crate::run("apt-get", &args)
}

/// Peers of the perf suite from Debian: the raw baseline and rsyslog's FIFO bridge (socat),
/// syslog-ng, and the libraries of the rsyslog binary unpacked below.
const PEER_PACKAGES: &[(&str, &str)] = &[
    ("socat", "socat"),
    ("syslog-ng", "syslog-ng-core"),
    ("/usr/lib/x86_64-linux-gnu/libestr.so.0", "libestr0"),
    ("/usr/lib/x86_64-linux-gnu/libfastjson.so.4", "libfastjson4"),
    ("/usr/lib/x86_64-linux-gnu/liblognorm.so.5", "liblognorm5"),
];

/// Why each peer could not be installed (filled by [`peers`]).
static PEER_REASONS: std::sync::Mutex<Vec<(&str, String)>> = std::sync::Mutex::new(Vec::new());

/// Why `peer` could not be installed, if [`peers`] failed to install it.
pub fn peer_reason(peer: &str) -> Option<String> {
    let reasons = PEER_REASONS.lock().expect("not poisoned");
    reasons.iter().find(|(p, _)| *p == peer).map(|(_, r)| r.clone())
}

/// Installs the perf suite's peers (idempotent); returns the peers that could not be, and why.
pub fn peers() -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    // syslog-ng-core and rsyslog conflict: never let apt remove a host's system rsyslog.
    let system_rsyslog = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "rsyslog"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"));
    let mut wanted: Vec<&str> = missing(PEER_PACKAGES);
    if system_rsyslog && wanted.contains(&"syslog-ng-core") {
        wanted.retain(|p| *p != "syslog-ng-core");
        let why = "the system's rsyslog package conflicts with syslog-ng-core; install it by hand";
        failed.push(("syslog-ng", why.to_string()));
    }
    if let Err(e) = apt_install(&wanted) {
        failed.push(("syslog-ng", format!("{e:#}")));
        failed.push(("raw", format!("{e:#}")));
    }
    if let Err(e) = unpack_rsyslog() {
        failed.push(("rsyslog", format!("{e:#}")));
    }
    *PEER_REASONS.lock().expect("not poisoned") = failed.clone();
    failed
}

/// `apt-get download` rsyslog and its OpenSSL driver, `dpkg-deb -x` them under
/// `target/perf-peers/rsyslog` (rsyslog conflicts with syslog-ng-core, so it is not installed).
fn unpack_rsyslog() -> anyhow::Result<()> {
    let root = crate::perf::peers::rsyslog_root();
    if root.join("usr/sbin/rsyslogd").exists() {
        return Ok(());
    }
    let debs = root.with_file_name("debs");
    std::fs::create_dir_all(&debs)?;
    let status = Command::new("apt-get")
        .args(["download", "rsyslog", "rsyslog-openssl"])
        .current_dir(&debs)
        .status()?;
    if !status.success() {
        bail!("`apt-get download rsyslog rsyslog-openssl` failed ({status})");
    }
    for deb in std::fs::read_dir(&debs)? {
        let deb = deb?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            let (d, r) = (deb.display().to_string(), root.display().to_string());
            crate::run("dpkg-deb", &["-x", &d, &r])?;
        }
    }
    Ok(())
}
