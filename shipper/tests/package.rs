//! The Debian package (packaging/debian/) on this machine: built from the test build's binary
//! (the script `cargo xtask package` runs on the release binary), installed, upgraded over
//! itself, removed and purged with dpkg, which runs the maintainer scripts (a scratch root
//! could not: they need adduser, getent and a shell inside it). Files, owners and modes are
//! checked with stat(1) at each step, and the machine is left as it was found. The service is
//! never started: the maintainer scripts only talk to systemd where it runs as PID 1.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

const WHY: &str = "installs, upgrades, removes and purges the .deb with dpkg on this machine";

/// What the package puts on the machine: (path, `stat -c '%a %U:%G %F'`).
const INSTALLED: &[(&str, &str)] = &[
    ("/usr/bin/shipper", "755 root:root regular file"),
    ("/lib/systemd/system/shipper.service", "644 root:root regular file"),
    ("/lib/systemd/system/shipper-receive.service", "644 root:root regular file"),
    ("/etc/shipper", "755 root:root directory"),
    ("/etc/shipper/edge.toml", "644 root:root regular file"),
    ("/etc/shipper/receiver.toml", "644 root:root regular file"),
    ("/usr/share/doc/shipper/copyright", "644 root:root regular file"),
    ("/usr/share/doc/shipper/architecture.md", "644 root:root regular file"),
    ("/usr/share/shipper/grafana/shipper.json", "644 root:root regular file"),
    ("/usr/share/shipper/prometheus/alerts.yml", "644 root:root regular file"),
    ("/var/lib/shipper", "750 shipper:shipper directory"),
    ("/var/lib/shipper-receive", "750 shipper:shipper directory"),
];

/// What stays after `dpkg --remove`: the configuration and the state.
const KEPT_ON_REMOVE: &[&str] = &[
    "/etc/shipper/edge.toml",
    "/etc/shipper/receiver.toml",
    "/var/lib/shipper",
    "/var/lib/shipper-receive",
];

/// What deb-systemd-helper remembers of a unit (removed on purge).
const DSH_STATE: &str = "/var/lib/systemd/deb-systemd-helper-enabled/shipper.service.dsh-also";

/// `stat -c '%a %U:%G %F' path`, or `None` when it does not exist.
fn stat(path: &str) -> Option<String> {
    let out = Command::new("stat").args(["-c", "%a %U:%G %F", path]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `dpkg-query -W -f FORMAT shipper`, or `None` when dpkg knows no such package.
fn query(format: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f", format, "shipper"]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `getent DATABASE shipper`.
fn getent(database: &str) -> Option<String> {
    let out = Command::new("getent").args([database, "shipper"]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs dpkg with `args`, waiting (up to 10 minutes) while another dpkg or apt holds the lock.
fn dpkg(args: &[&str]) -> String {
    let mut said = String::new();
    let ok = testkit::wait::poll(Duration::from_secs(600), Duration::from_millis(500), || {
        let out = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let locked = said.contains("lock");
        (out.status.success() || !locked).then_some(out.status.success())
    });
    assert!(matches!(ok, Ok(true)), "dpkg {args:?} failed:\n{said}");
    said
}

/// Builds the package of version `version` from the test build's binary, into `dir`.
fn build(dir: &Path, version: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/debian/build-deb");
    let out = Command::new("sh")
        .args([script, BIN, version, dir.to_str().unwrap()])
        .output()
        .expect("sh");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build-deb {version}: {said}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Purges the package and removes the user this test made, even when the test fails.
struct Restore {
    user_existed: bool,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if query("${Status}").is_some() {
            let _ = Command::new("dpkg").args(["--purge", "shipper"]).status();
        }
        if !self.user_existed && getent("passwd").is_some() {
            let _ = Command::new("userdel").arg("shipper").status();
        }
        if !self.user_existed && getent("group").is_some() {
            let _ = Command::new("groupdel").arg("shipper").status();
        }
    }
}

/// Every file of the package with its mode, owner and type; the binary runs; the examples are
/// valid but for the certificates an operator provides; the user is a system account.
fn check_installed(version: &str) {
    assert_eq!(query("${Status} ${Version}").unwrap(), format!("install ok installed {version}"));
    for (path, expected) in INSTALLED {
        assert_eq!(stat(path).as_deref(), Some(*expected), "{path}");
    }
    for unit in ["shipper.service", "shipper-receive.service"] {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/systemd/");
        let text = std::fs::read_to_string(format!("{shipped}{unit}")).unwrap();
        let installed = std::fs::read_to_string(format!("/lib/systemd/system/{unit}")).unwrap();
        assert_eq!(installed, text, "{unit}");
    }
    let conffiles = query("${Conffiles}").unwrap();
    for conffile in ["/etc/shipper/edge.toml", "/etc/shipper/receiver.toml"] {
        assert!(conffiles.contains(&format!(" {conffile} ")), "{conffile}: {conffiles}");
    }
    let depends = query("${Depends}").unwrap();
    assert!(depends.starts_with("libc6 (>= 2.") && depends.ends_with(", adduser"), "{depends}");
    let version = Command::new("/usr/bin/shipper").arg("--version").output().unwrap();
    let expected = format!("shipper {}\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(String::from_utf8_lossy(&version.stdout), expected);
    for example in ["edge", "receiver"] {
        let path = format!("/etc/shipper/{example}.toml");
        let out = Command::new("/usr/bin/shipper").args(["validate", "--config", &path]).output();
        let said = String::from_utf8(out.unwrap().stderr).unwrap();
        let problems: Vec<&str> = said.lines().filter(|l| l.starts_with(&path)).collect();
        assert_eq!(problems.len(), 3, "{said}");
        for p in problems {
            assert!(p.contains(": tls.") && p.ends_with("is not a readable file"), "{said}");
        }
    }
    let user = getent("passwd").expect("postinst made the user shipper");
    let fields: Vec<&str> = user.split(':').collect();
    assert!(fields[2].parse::<u32>().unwrap() < 1000, "a system account: {user}");
    assert_eq!((fields[5], fields[6]), ("/var/lib/shipper", "/usr/sbin/nologin"), "{user}");
    assert!(getent("group").is_some(), "postinst made the group shipper");
    if Path::new("/usr/bin/deb-systemd-helper").exists() {
        assert!(Path::new(DSH_STATE).exists(), "postinst told deb-systemd-helper of the units");
    }
}

/// Guards the package's life cycle: install, upgrade keeping an operator's edit and the state,
/// remove keeping configuration and state, purge leaving nothing but the system account.
#[test]
#[ignore = "needs root: installs, upgrades, removes and purges the .deb with dpkg"]
fn the_package_installs_upgrades_removes_and_purges_cleanly() {
    require_root(WHY);
    assert!(
        query("${Status}").is_none(),
        "a shipper package is on this machine; the test would replace it: purge it first"
    );
    let found: Vec<Option<String>> = INSTALLED.iter().map(|(p, _)| stat(p)).collect();
    assert!(found.iter().all(Option::is_none), "shipper files without the package: {found:?}");
    let _restore = Restore { user_existed: getent("passwd").is_some() };
    let users_before = (getent("passwd"), getent("group"));
    let env = Env::new();
    let (first, second) = (build(env.dir.path(), "0.0.1-1"), build(env.dir.path(), "0.0.2-1"));

    dpkg(&["--install", &first]);
    check_installed("0.0.1-1");
    let uid = getent("passwd").unwrap();
    // An operator's edit, and state the shipper wrote.
    let edited = std::fs::read_to_string("/etc/shipper/edge.toml").unwrap() + "# edited\n";
    std::fs::write("/etc/shipper/edge.toml", &edited).unwrap();
    std::fs::write("/var/lib/shipper/journal.cursor", "s=1\n").unwrap();

    dpkg(&["--install", &second]);
    check_installed("0.0.2-1");
    assert_eq!(std::fs::read_to_string("/etc/shipper/edge.toml").unwrap(), edited);
    assert!(Path::new("/var/lib/shipper/journal.cursor").exists(), "state kept on upgrade");
    assert_eq!(getent("passwd").unwrap(), uid, "the same account after the upgrade");

    dpkg(&["--remove", "shipper"]);
    assert_eq!(query("${Status}").unwrap(), "deinstall ok config-files");
    for (path, expected) in INSTALLED {
        let kept = KEPT_ON_REMOVE.contains(path) || *path == "/etc/shipper";
        let expected = kept.then(|| expected.to_string());
        assert_eq!(stat(path), expected, "{path} after remove");
    }
    assert_eq!(std::fs::read_to_string("/etc/shipper/edge.toml").unwrap(), edited);
    assert!(Path::new("/var/lib/shipper/journal.cursor").exists(), "state kept on remove");

    dpkg(&["--purge", "shipper"]);
    assert_eq!(query("${Status}"), None, "dpkg forgot the package");
    for (path, _) in INSTALLED {
        assert_eq!(stat(path), None, "{path} after purge");
    }
    assert!(!Path::new(DSH_STATE).exists(), "deb-systemd-helper forgot the units");
    // Debian keeps system accounts on purge (postrm says why); the test removes its own.
    assert_eq!(getent("passwd").unwrap(), uid, "the account stays after purge");
    drop(_restore);
    assert_eq!((getent("passwd"), getent("group")), users_before, "accounts as found");
}
