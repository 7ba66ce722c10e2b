//! `--against REV`: the shipper of another git revision, built once and run beside the
//! current build in the same invocation.
//!
//! Operation: REV is resolved to a commit; its release binary is
//! `target/against/<commit>/target/release/shipper`, reused when it is there. Otherwise the
//! commit is checked out in a git worktree (`target/against/<commit>/src`), built there with
//! `cargo build --release -p shipper` into its own `CARGO_TARGET_DIR`
//! (`target/against/<commit>/target`, seeded from this checkout's `target/release` so that
//! only what differs is compiled), and the worktree is removed again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// A shipper binary of another revision.
#[derive(Clone, Debug)]
pub struct Rev {
    /// The abbreviated commit id, for labels (`shipper@<short>`).
    pub short: String,
    pub bin: PathBuf,
}

/// The release shipper of revision `rev` (built when not built yet).
pub fn build(rev: &str) -> anyhow::Result<Rev> {
    let root = crate::root();
    let commit = git(&root, &["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("--against {rev}: not a commit of this repository"))?;
    let short = git(&root, &["rev-parse", "--short", &commit])?;
    let base = root.join("target/against").join(&commit);
    let target = base.join("target");
    let bin = target.join("release/shipper");
    if bin.is_file() {
        println!("--against {rev}: reusing {}", bin.display());
        return Ok(Rev { short, bin });
    }
    let src = base.join("src");
    if !src.join("Cargo.toml").is_file() {
        let _ = std::fs::remove_dir_all(&src);
        let _ = git(&root, &["worktree", "prune"]);
        git(&root, &["worktree", "add", "--detach", &src.to_string_lossy(), &commit])?;
    }
    seed(&root.join("target/release"), &target.join("release"))?;
    println!("--against {rev}: building {short} in {}", src.display());
    // The eBPF toolchain of this checkout (`cargo xtask setup`): the worktree has no .tools.
    let path = format!(
        "{}:{}",
        root.join(".tools/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "shipper"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", path)
        .status()
        .context("starting cargo")?;
    if !status.success() {
        bail!("--against {rev}: building {short} failed ({status}); see above");
    }
    if !bin.is_file() {
        bail!("--against {rev}: the build made no {}", bin.display());
    }
    git(&root, &["worktree", "remove", "--force", &src.to_string_lossy()])?;
    Ok(Rev { short, bin })
}

/// Copies `from` (this checkout's release build) to `to` unless `to` exists, so that the
/// other revision's build compiles only what differs.
fn seed(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() || !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(to.parent().expect("target/against/<commit>/target"))?;
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().context("starting cp")?;
    if !status.success() {
        bail!("copying {} to {} failed ({status})", from.display(), to.display());
    }
    Ok(())
}

/// Runs `git ARGS` in `dir`; its standard output, trimmed.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git").args(args).current_dir(dir).output().context("starting git")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
