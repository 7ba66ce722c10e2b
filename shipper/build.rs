//! With the `ebpf` feature (on by default), builds the kernel programs (`shipper-ebpf`, binary
//! `shipper-probes`) for bpfel-unknown-none and copies the object to `$OUT_DIR/shipper-probes`,
//! where `src/ebpf/mod.rs` embeds it with `aya::include_bytes_aligned!`.
//!
//! Why not `aya_build::build_ebpf`: it runs `rustup run nightly cargo` whenever rustup is on
//! PATH, and rustup's nightly has no BPF `core` here. The toolchain used instead (docs/ebpf.md,
//! installed by `cargo xtask setup`): Debian's rustc-web/cargo-web 1.96 (`/usr/bin/rustc`,
//! `/usr/bin/cargo`) with the prebuilt `core` for bpfel-unknown-none, and bpf-linker 0.13.0
//! built against LLVM 22 in `<workspace>/.tools/bin` (or on PATH).
//! `RUSTC_BOOTSTRAP=aya_ebpf` lets only aya-ebpf use its one unstable feature.
//!
//! Overrides: `SHIPPER_BPF_CARGO`, `SHIPPER_BPF_RUSTC` (the toolchain), `SHIPPER_BPF_OBJ`
//! (embed this prebuilt object instead of building one).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const OBJECT: &str = "shipper-probes";

fn main() -> ExitCode {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return ExitCode::SUCCESS;
    }
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let root = manifest.parent().ok_or("shipper/ has no parent")?.to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    for p in ["shipper-ebpf/src", "shipper-ebpf/Cargo.toml"] {
        println!("cargo::rerun-if-changed={}", root.join(p).display());
    }
    for v in ["SHIPPER_BPF_CARGO", "SHIPPER_BPF_RUSTC", "SHIPPER_BPF_OBJ"] {
        println!("cargo::rerun-if-env-changed={v}");
    }
    let dst = out_dir.join(OBJECT);
    if let Some(prebuilt) = env::var_os("SHIPPER_BPF_OBJ") {
        std::fs::copy(&prebuilt, &dst).map_err(|e| format!("SHIPPER_BPF_OBJ {prebuilt:?}: {e}"))?;
        return Ok(());
    }
    let cargo = env::var("SHIPPER_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = env::var("SHIPPER_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let tools = root.join(".tools/bin");
    let path = format!("{}:{}", tools.display(), env::var("PATH").unwrap_or_default());
    check_toolchain(&cargo, &rustc, &path)?;
    // bpf_target_arch selects the pt_regs layout in aya-ebpf (only kprobes use it).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| e.to_string())?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    // One target directory for every profile and feature set of the outer build.
    let target_dir = root.join("target/bpf");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args(["build", "--package", "shipper-ebpf", "--bin", OBJECT, "--features", "kernel"])
        .args(["--release", "--target", "bpfel-unknown-none", "--ignore-rust-version"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", &path)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    for k in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(k);
    }
    let status = cmd.status().map_err(|e| format!("cannot start {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("building the eBPF programs failed ({status}): {cmd:?}"));
    }
    let built = target_dir.join("bpfel-unknown-none/release").join(OBJECT);
    let object = std::fs::read(&built).map_err(|e| format!("{}: {e}", built.display()))?;
    // Rewritten only when it changed, so that an unchanged object recompiles nothing.
    if std::fs::read(&dst).ok().as_deref() != Some(&object[..]) {
        std::fs::write(&dst, &object).map_err(|e| format!("{}: {e}", dst.display()))?;
    }
    Ok(())
}

/// Fails with how to install the toolchain when a piece of it is missing.
fn check_toolchain(cargo: &str, rustc: &str, path: &str) -> Result<(), String> {
    let mut missing = Vec::new();
    if !Path::new(cargo).exists() {
        missing.push(format!("{cargo} (Debian package cargo-web)"));
    }
    if !Path::new(rustc).exists() {
        missing.push(format!("{rustc} (Debian package rustc-web)"));
    }
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output();
    let bpf_core = sysroot.ok().map(|o| {
        let root = String::from_utf8_lossy(&o.stdout).trim().to_string();
        Path::new(&root).join("lib/rustlib/bpfel-unknown-none/lib").is_dir()
    });
    if bpf_core != Some(true) {
        missing.push("the BPF core library (Debian package libstd-rust-web-dev-bpf)".into());
    }
    let linker = path.split(':').any(|dir| Path::new(dir).join("bpf-linker").is_file());
    if !linker {
        missing.push("bpf-linker (built into .tools/bin by `cargo xtask setup`)".into());
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the `ebpf` feature (on by default) needs the eBPF toolchain, and this machine lacks: \
         {}.\nInstall it with `cargo xtask setup` (as root; Debian 12), or build without the \
         kernel programs: `cargo build --no-default-features`.",
        missing.join("; ")
    ))
}
