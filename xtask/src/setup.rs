//! Installs what is missing, idempotently: the rustfmt and clippy components, cargo-fuzz
//! (the fuzz targets run on the machine's nightly toolchain), the Debian packages the
//! tests use (a real Prometheus scrapes the metrics endpoints in the tests), and the eBPF
//! toolchain (docs/ebpf.md): Debian's rustc-web with its prebuilt `core` for the BPF target,
//! and bpf-linker built against Debian's LLVM 22 into `.tools/` (gitignored), with a copy in
//! `~/.cache/shipper-tools/` so that fresh clones on the same machine (CI) skip the build.
//! When everything is there, it costs a handful of `command -v` and `dpkg -s` probes.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

/// Debian packages the build and tests need: (probe, package). A probe starting with `dpkg:`
/// checks that the package is installed (libraries have no command to look for).
const PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // Journal files for the journal tests are written by systemd's own tool.
    ("/lib/systemd/systemd-journal-remote", "systemd-journal-remote"),
    // The eBPF programs: Debian's rustc 1.96 (LLVM 22) and cargo build them, with the
    // prebuilt `core` for bpfel-unknown-none (no -Z build-std, which needs rust-src).
    ("/usr/bin/rustc", "rustc-web"),
    ("/usr/bin/cargo", "cargo-web"),
    ("dpkg:libstd-rust-web-dev-bpf", "libstd-rust-web-dev-bpf"),
    // bpf-linker links against LLVM 22 (llvm-22-dev to build it, libllvm22 to run it).
    ("dpkg:llvm-22-dev", "llvm-22-dev"),
    // The eBPF tests: capsh/setpriv to drop capabilities, ip for namespaces and routes.
    ("setpriv", "util-linux"),
    ("ip", "iproute2"),
];

/// bpf-linker, pinned: 0.13.0 is the release that links with LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where bpf-linker is installed (`cargo install --root`): `<workspace>/.tools`.
pub fn tools_dir() -> PathBuf {
    crate::root().join(".tools")
}

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
    install_packages()?;
    install_bpf_linker()
}

fn install_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> =
        PACKAGES.iter().filter(|(probe, _)| !present(probe)).map(|(_, pkg)| *pkg).collect();
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

/// Whether a probe of [`PACKAGES`] finds its command or package.
fn present(probe: &str) -> bool {
    let script = match probe.strip_prefix("dpkg:") {
        Some(pkg) => format!("dpkg-query -W -f '${{Status}}' {pkg} | grep -q 'ok installed'"),
        None => format!("command -v {probe}"),
    };
    Command::new("sh").args(["-c", &script]).output().is_ok_and(|o| o.status.success())
}

/// A copy of the built linker kept outside the work tree, so that a fresh clone on the same
/// machine (CI's) copies it instead of building it again: `$HOME/.cache/shipper-tools/`.
fn machine_cache() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(format!(".cache/shipper-tools/bpf-linker-{BPF_LINKER_VERSION}")))
}

/// Whether `linker` runs and is the pinned version.
fn linker_ok(linker: &std::path::Path) -> bool {
    let version = Command::new(linker).arg("--version").output();
    version.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    })
}

/// Puts bpf-linker into `.tools/bin`: nothing to do if it is there, a copy from the machine
/// cache if that has it, else a build against Debian's LLVM 22 (about 90 s on 2 cores).
fn install_bpf_linker() -> anyhow::Result<()> {
    let root = tools_dir();
    let linker = root.join("bin/bpf-linker");
    if linker_ok(&linker) {
        return Ok(());
    }
    let cache = machine_cache();
    if let Some(cached) = cache.as_ref().filter(|c| linker_ok(c)) {
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::copy(cached, &linker)?;
        println!("bpf-linker {BPF_LINKER_VERSION}: copied from {}", cached.display());
        return Ok(());
    }
    let root_arg = root.to_str().expect("workspace path is UTF-8");
    println!("$ cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22) --root {root_arg}");
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
        .args(["--no-default-features", "--features", "llvm-22", "--root", root_arg])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("PATH", path)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .current_dir(crate::root())
        .status()?;
    if !status.success() {
        bail!("building bpf-linker {BPF_LINKER_VERSION} failed ({status})");
    }
    if let Some(cache) = cache {
        // Best effort: a read-only home only costs the next fresh clone a rebuild.
        let copied = cache
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::copy(&linker, &cache));
        if let Err(e) = copied {
            println!("bpf-linker not cached in {}: {e}", cache.display());
        }
    }
    Ok(())
}
