//! `cargo xtask package`: the Debian package, `target/debian/shipper_<version>-1_<arch>.deb`.
//!
//! The release binary (with the eBPF programs) goes through `packaging/debian/build-deb`,
//! which lays out a staging tree as the installed system and runs `dpkg-deb --build`: every
//! file, mode and maintainer script is in the repository, read as it is installed, with no
//! packaging tool of its own to install and keep in step (cargo-deb would generate the
//! maintainer scripts and pick the binary by profile). The package test
//! (`shipper/tests/package.rs`) runs the same script on the test build's binary, so the test
//! suite needs no release build.

pub fn run() -> anyhow::Result<()> {
    crate::setup::toolchain()?;
    crate::setup::install(crate::setup::PACKAGING_PACKAGES)?;
    crate::run("cargo", &["build", "--release", "-p", "shipper"])?;
    let root = crate::root();
    let binary = root.join("target/release/shipper");
    // Debian revision 1 of the workspace's version (the crate versions are the workspace's).
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let out = root.join("target/debian");
    let (script, binary, out) = (
        root.join("packaging/debian/build-deb").display().to_string(),
        binary.display().to_string(),
        out.display().to_string(),
    );
    crate::run("sh", &[&script, &binary, &version, &out])
}
