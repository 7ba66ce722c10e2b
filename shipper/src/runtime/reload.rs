//! Reload: SIGHUP (the unit's `ExecReload`) makes `shipper run` read its `--config` file
//! again and move to it without losing a line: rate limits in place, everything else by
//! taking itself over with its own binary.
//!
//! # Design constraints
//! - Runs on a thread of its own ("reload"), never on a worker's io_uring thread: reading
//!   and checking the file, spawning and watching the new process all block.
//! - One reload at a time; SIGHUPs that come during one are answered by one more reload
//!   after it.
//! - An invalid file changes nothing: every problem is logged as ERROR in the form `shipper
//!   validate` prints (`FILE:LINE: key: why`), the running configuration stays.
//! - A new process that fails before it asked to take over (exit, or no request within
//!   [`SPAWN_TIMEOUT_MS`]) leaves this one running as it was; one that fails after it asked
//!   is a failed takeover (`super::takeover`).
//!
//! # Format
//! ```text
//! shipper_config_reloads_total{result="applied"}    new rate limits, in place
//!                             {result="unchanged"}  nothing to do
//!                             {result="refused"}    the file is invalid
//!                             {result="takeover"}   a new process asked to take over
//!                             {result="failed"}     no new process took over; this one runs on
//! systemd (NOTIFY_SOCKET): this process  "RELOADING=1\nMONOTONIC_USEC=<µs>" at the start,
//!                                        "READY=1" when it runs on (every result but takeover)
//!                          the new one   "MAINPID=<pid>" before ADOPTED, "READY=1" once running
//! ```
//!
//! # Operation
//! 1. RELOADING=1; load the file with the checks `shipper validate` runs (`--no-ebpf` kept).
//! 2. Compare with the running configuration ([`ShipperConfig::differing_sections`]), the
//!    TLS files' contents and the binary: the path this process started from, resolved at
//!    start-up, against the image it runs (a package upgrade replaces the file at that path).
//!    Only `[ratelimit]`'s `rate`, `burst` or `services` differ: they go to the control
//!    thread, which hands them to every worker ([`super::control`]). Nothing differs:
//!    nothing is done. Then READY=1.
//! 3. Anything else: with `shipper.control_socket` set, and what the new process could only
//!    fail on after it took over checked first (new ports free, new FIFOs' directories
//!    there: else the reload fails, nothing stopped), the pipes the new file drops are
//!    marked (their partial line is shipped at the stop, not handed over), and `EXE run
//!    --config F --takeover` is spawned. Once it asks on the control socket (matched by its
//!    pid), the main thread stops the workers and hands over as for any takeover; the new
//!    process sends MAINPID= before ADOPTED (systemd follows it) and READY=1 once it runs,
//!    and this one exits 0. If it exits first or does not ask in time, it is killed and
//!    reaped, the marks are cleared, the failure is logged and counted, READY=1.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ConfigErrors, ShipperConfig};
use crate::metrics::Exposition;
use crate::notify::Notifier;

use super::control::ToControl;
use super::takeover::HandingOver;

/// How long the new process of a self-takeover has to ask on the control socket (its start:
/// configuration, TLS material, eBPF programs) before it is killed and the reload failed.
pub const SPAWN_TIMEOUT_MS: u64 = 30_000;

/// How often the reload thread looks at the new process while it waits for it.
const WATCH_INTERVAL_MS: u64 = 20;

/// Reloads by result (see the module docs).
#[derive(Default)]
pub struct ReloadCounters {
    applied: AtomicU64,
    unchanged: AtomicU64,
    refused: AtomicU64,
    takeover: AtomicU64,
    failed: AtomicU64,
}

impl ReloadCounters {
    /// Writes `shipper_config_reloads_total`.
    pub fn render(&self, out: &mut Exposition) {
        let name = "shipper_config_reloads_total";
        out.family(name, "counter", "Reloads (SIGHUP) of the configuration, by result.");
        for (result, n) in [
            ("applied", &self.applied),
            ("unchanged", &self.unchanged),
            ("refused", &self.refused),
            ("takeover", &self.takeover),
            ("failed", &self.failed),
        ] {
            out.sample(name, &[("result", result)], n.load(Ordering::Relaxed) as f64);
        }
    }
}

/// The binary this process started from: the path, resolved at start-up, and the identity
/// (device, inode) of the image running.
#[derive(Clone, Debug)]
pub struct Exe {
    pub path: PathBuf,
    running: (u64, u64),
}

impl Exe {
    /// Resolves `/proc/self/exe` (call it at start-up, before an upgrade can replace it).
    pub fn resolve() -> std::io::Result<Exe> {
        let link = std::fs::read_link("/proc/self/exe")?;
        // The kernel appends this to the link of an image whose file was replaced.
        let text = link.to_string_lossy();
        let path = match text.strip_suffix(" (deleted)") {
            Some(p) => PathBuf::from(p),
            None => link,
        };
        let m = std::fs::metadata("/proc/self/exe")?;
        Ok(Exe { path, running: (m.dev(), m.ino()) })
    }

    /// Whether the file at the start-up path is no longer the image running (upgraded).
    pub fn replaced(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |m| (m.dev(), m.ino()) != self.running)
    }
}

/// The takeover a reload started: the new process's pid and whether it has asked.
#[derive(Default)]
pub struct Pending {
    child: Option<(u32, bool)>,
}

/// Shared between the reload thread and the main thread, which claims the pending new
/// process when a takeover request comes from its pid.
pub type PendingTakeover = Arc<Mutex<Pending>>;

/// Whether a takeover request from `pid` is the reload's new process; if so it is claimed:
/// the reload thread stops waiting and no longer kills it.
pub fn claim(pending: &PendingTakeover, pid: Option<u32>) -> bool {
    let mut p = pending.lock().expect("pending takeover poisoned");
    match (&mut p.child, pid) {
        (Some((child, asked)), Some(pid)) if *child == pid => {
            *asked = true;
            true
        }
        _ => false,
    }
}

/// What the reload thread needs.
pub struct Reloader {
    pub path: PathBuf,
    pub no_ebpf: bool,
    pub exe: Exe,
    pub running: ShipperConfig,
    pub control: Sender<ToControl>,
    pub handing_over: Arc<HandingOver>,
    pub pending: PendingTakeover,
    pub counters: Arc<ReloadCounters>,
    pub notifier: Notifier,
    /// The TLS files' contents when this process loaded them ([`tls_files`]).
    pub tls_files: TlsFiles,
}

/// The TLS files a configuration names, each with a digest of its contents (`None`:
/// unreadable): enough to notice a renewed file without keeping a private key's bytes.
pub type TlsFiles = Vec<(PathBuf, Option<u64>)>;

/// The result of one reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Applied,
    Unchanged,
    Refused,
    Takeover,
    Failed,
}

/// Loads the configuration at `path` as `shipper run` does (with `--no-ebpf` applied).
pub fn load(path: &Path, no_ebpf: bool) -> Result<ShipperConfig, ConfigErrors> {
    let mut cfg: ShipperConfig = crate::config::load(path, super::CHECKS)?;
    cfg.ebpf.enabled &= !no_ebpf;
    Ok(cfg)
}

/// Starts the reload thread; each message on `hups` is a SIGHUP.
pub fn spawn(mut r: Reloader, hups: Receiver<()>) -> std::io::Result<()> {
    std::thread::Builder::new().name("reload".into()).spawn(move || {
        while hups.recv().is_ok() {
            // SIGHUPs that came meanwhile are answered by this reload.
            while hups.try_recv().is_ok() {}
            let outcome = r.reload();
            let counter = match outcome {
                Outcome::Applied => &r.counters.applied,
                Outcome::Unchanged => &r.counters.unchanged,
                Outcome::Refused => &r.counters.refused,
                Outcome::Takeover => &r.counters.takeover,
                Outcome::Failed => &r.counters.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if outcome == Outcome::Takeover {
                // The main thread hands over; this process ends.
                return;
            }
            r.notifier.send("READY=1");
        }
    })?;
    Ok(())
}

impl Reloader {
    /// One reload (module docs, Operation).
    fn reload(&mut self) -> Outcome {
        self.notifier.reloading();
        let file = self.path.display();
        tracing::info!(%file, "reload: reading the configuration again (SIGHUP)");
        let new = match load(&self.path, self.no_ebpf) {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("reload refused, the running configuration stays: {e}");
                }
                return Outcome::Refused;
            }
        };
        let mut why: Vec<String> =
            self.running.differing_sections(&new).iter().map(|s| format!("[{s}]")).collect();
        if tls_files(&new) != self.tls_files {
            why.push("TLS files".into());
        }
        if self.exe.replaced() {
            why.push(format!("{} replaced", self.exe.path.display()));
        }
        if !why.is_empty() {
            return self.take_over(&new, &why.join(", "));
        }
        if !self.running.ratelimit.limits_differ(&new.ratelimit) {
            tracing::info!(%file, "reload: nothing changed");
            return Outcome::Unchanged;
        }
        let limits = Arc::new(new.ratelimit.clone());
        if self.control.send(ToControl::Limits(limits)).is_err() {
            tracing::error!("reload: the control thread is gone (stopping): limits not applied");
            return Outcome::Failed;
        }
        self.running = new;
        tracing::info!(%file, "reload: new rate limits handed to the workers");
        Outcome::Applied
    }

    /// Step 3 of the module docs: spawns the new process and waits for it to ask.
    fn take_over(&mut self, new: &ShipperConfig, why: &str) -> Outcome {
        if self.running.shipper.control_socket.is_none() {
            tracing::error!(
                "reload: {why} changed, which needs a restart, and \
                shipper.control_socket is not set (a reload takes over through it): \
                the running configuration stays"
            );
            return Outcome::Failed;
        }
        if let Err(e) = preflight(&self.running, new) {
            tracing::error!(
                "reload: {why} changed, but the new process would fail after it \
                took over: {e}; the running configuration stays"
            );
            return Outcome::Failed;
        }
        let removed: Vec<usize> = (self.running.sources.pipe.iter().enumerate())
            .filter(|(_, p)| !new.sources.pipe.iter().any(|n| n.path == p.path))
            .map(|(i, _)| i)
            .collect();
        self.handing_over.set_removed_pipes(removed);
        let exe = self.exe.path.display();
        tracing::info!(%exe, "reload: {why} changed: starting a new process to take over");
        let outcome = match self.spawn_child() {
            Ok(child) => self.watch(child),
            Err(e) => {
                tracing::error!("reload: cannot start {exe}: {e}; the running configuration stays");
                Outcome::Failed
            }
        };
        if outcome == Outcome::Failed {
            self.handing_over.set_removed_pipes(Vec::new());
        }
        outcome
    }

    /// `EXE run --config F --takeover [--no-ebpf]`, its standard error this one's. The
    /// watchdog's pid is not passed on: the new process pings for itself once it is the
    /// main process. With the eBPF programs attached, `CAP_BPF` (all this process kept) is
    /// passed on as an ambient capability: the new process adopts the programs, and kernels
    /// before 6.5 with unprivileged BPF disabled want it for every map access.
    fn spawn_child(&self) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.exe.path);
        cmd.arg("run").arg("--config").arg(&self.path).arg("--takeover");
        if self.no_ebpf {
            cmd.arg("--no-ebpf");
        }
        if crate::ebpf::state() == crate::ebpf::State::Attached {
            // SAFETY: between fork and exec the closure makes only raw syscalls, and
            // allocates nothing. A refusal (CAP_BPF not held) leaves the capability out.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    let _ = crate::os::make_ambient(crate::os::CAP_BPF);
                    Ok(())
                });
            }
        }
        cmd.env_remove("WATCHDOG_PID").stdin(Stdio::null());
        let child = cmd.spawn()?;
        self.pending.lock().expect("pending takeover poisoned").child = Some((child.id(), false));
        Ok(child)
    }

    /// Waits until the new process asked (claimed by the main thread), exited, or took too
    /// long (then it is killed); reaps it unless it asked.
    fn watch(&self, mut child: Child) -> Outcome {
        let deadline = Instant::now() + Duration::from_millis(SPAWN_TIMEOUT_MS);
        let pid = child.id();
        let why = loop {
            {
                let mut p = self.pending.lock().expect("pending takeover poisoned");
                if p.child.is_some_and(|(_, asked)| asked) {
                    tracing::info!(pid, "reload: the new process asked to take over");
                    return Outcome::Takeover;
                }
                match child.try_wait() {
                    Ok(Some(status)) => {
                        p.child = None;
                        break format!("it exited ({status}) before asking");
                    }
                    Ok(None) if Instant::now() >= deadline => {
                        p.child = None;
                        let _ = child.kill();
                        let _ = child.wait();
                        break format!("it did not ask within {SPAWN_TIMEOUT_MS} ms: killed");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        p.child = None;
                        break format!("cannot watch it: {e}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(WATCH_INTERVAL_MS));
        };
        tracing::error!(
            pid,
            "reload failed, the running configuration stays: \
             the new process did not take over: {why} (its log is above)"
        );
        Outcome::Failed
    }
}

/// What the new process of a takeover would fail on only after it took the descriptors over
/// (when the old process has stopped: a failed takeover), checked before it is started: each
/// address a new socket or forward source binds, and a new `metrics.listen`, is free (bound
/// and closed again here), and each new FIFO's or unix socket's directory exists.
fn preflight(running: &ShipperConfig, new: &ShipperConfig) -> Result<(), String> {
    use crate::config::socket::Transport;
    let old = &running.sources;
    for s in new.sources.socket.iter().filter(|s| !old.socket.contains(s)) {
        let held =
            old.socket.iter().any(|o| (o.transport, &o.address) == (s.transport, &s.address));
        match (s.transport, s.socket_addr(), &s.path) {
            (Transport::Unix, _, Some(path)) => directory_exists(path),
            (_, Some(addr), _) if !held => free(addr, s.transport == Transport::Udp),
            _ => Ok(()),
        }
        .map_err(|e| format!("sources.socket {:?}: {e}", s.name))?;
    }
    let forwards = new.sources.forward.iter();
    for f in forwards.filter(|f| !old.forward.iter().any(|o| o.address == f.address)) {
        let addr = f.socket_addr().ok_or_else(|| {
            format!("sources.forward {:?}: address {:?} is not ip:port", f.name, f.address)
        })?;
        free(addr, false).map_err(|e| format!("sources.forward {:?}: {e}", f.name))?;
    }
    let listen = &new.metrics.listen;
    if !listen.is_empty() && *listen != running.metrics.listen {
        let addr = listen.parse().map_err(|e| format!("metrics.listen {listen}: {e}"))?;
        free(addr, false).map_err(|e| format!("metrics.listen: {e}"))?;
    }
    for p in new.sources.pipe.iter().filter(|p| !old.pipe.iter().any(|o| o.path == p.path)) {
        directory_exists(&p.path).map_err(|e| format!("sources.pipe {}: {e}", p.path.display()))?;
    }
    Ok(())
}

/// Whether `addr` can be bound now (UDP or TCP).
fn free(addr: std::net::SocketAddr, udp: bool) -> Result<(), String> {
    let bound = if udp {
        std::net::UdpSocket::bind(addr).map(drop)
    } else {
        std::net::TcpListener::bind(addr).map(drop)
    };
    bound.map_err(|e| format!("{addr}: {e}"))
}

/// Whether the directory `path` would be made in exists.
fn directory_exists(path: &Path) -> Result<(), String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match dir.is_dir() {
        true => Ok(()),
        false => Err(format!("{}: no such directory", dir.display())),
    }
}

/// A digest of each TLS file `config` names (`None`: unreadable), so that a reload
/// notices renewed certificates behind unchanged paths. Read when the process loads them.
pub fn tls_files(config: &ShipperConfig) -> TlsFiles {
    let t = &config.tls;
    let mut paths = vec![t.ca.clone(), t.cert.clone(), t.key.clone()];
    for f in config.sources.forward.iter().filter_map(|f| f.tls.as_ref()) {
        paths.extend([f.cert.clone(), f.key.clone()]);
        paths.extend(f.ca.clone());
    }
    let digest = |bytes: Vec<u8>| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    };
    paths.into_iter().map(|p| (p.clone(), std::fs::read(&p).ok().map(digest))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with the TLS files in `dir` and `extra` appended.
    fn config(dir: &Path, extra: &str) -> ShipperConfig {
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let text = format!(
            "[receivers]\nprimary = [\"127.0.0.1:1\"]\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{extra}",
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem")
        );
        crate::config::parse(&text, Path::new("edge.toml")).unwrap()
    }

    /// Rate limits alone differ: no section differs beyond them, and the limits do; any other
    /// key (here the rate limit's key field, and a source) names its section.
    #[test]
    fn only_the_rate_limits_apply_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let old = config(dir.path(), "[ratelimit]\nrate = 10\n");
        let limits =
            config(dir.path(), "[ratelimit]\nrate = 20\n[ratelimit.services.a]\nrate = 1\n");
        assert!(old.differing_sections(&limits).is_empty());
        assert!(old.ratelimit.limits_differ(&limits.ratelimit));
        let same = config(dir.path(), "[ratelimit]\nrate = 10\n");
        assert!(old.differing_sections(&same).is_empty());
        assert!(!old.ratelimit.limits_differ(&same.ratelimit));
        let key = config(dir.path(), "[ratelimit]\nrate = 10\nkey_field = \"app\"\n");
        assert_eq!(old.differing_sections(&key), ["ratelimit"]);
        let pipe = config(dir.path(), "[ratelimit]\nrate = 10\n[[sources.pipe]]\npath = \"/p\"\n");
        assert_eq!(old.differing_sections(&pipe), ["sources"]);
    }

    /// A takeover request is the reload's only from the pid it spawned, and only while it
    /// waits for it.
    #[test]
    fn only_the_spawned_pid_is_claimed() {
        let pending = PendingTakeover::default();
        assert!(!claim(&pending, Some(7)));
        pending.lock().unwrap().child = Some((7, false));
        assert!(!claim(&pending, Some(8)));
        assert!(!claim(&pending, None));
        assert!(claim(&pending, Some(7)));
        assert_eq!(pending.lock().unwrap().child, Some((7, true)));
    }

    /// The running test binary is the file at the path it was started from.
    #[test]
    fn the_running_binary_is_not_replaced() {
        let exe = Exe::resolve().unwrap();
        assert!(exe.path.is_absolute());
        assert!(!exe.replaced());
    }
}
