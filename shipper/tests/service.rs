//! Running under systemd: READY, STOPPING and a watchdog fed by the workers' progress, told
//! over a real NOTIFY_SOCKET (a unix datagram socket the test binds, as systemd does).

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// What a service manager hears from one process: each message with when it arrived.
struct Manager {
    socket: UnixDatagram,
    heard: Vec<(Instant, String)>,
}

impl Manager {
    fn bind(env: &Env, name: &str) -> (Manager, std::path::PathBuf) {
        let path = env.path(&format!("{name}.notify"));
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        (Manager { socket, heard: Vec::new() }, path)
    }

    /// Listens until `message` is heard, for at most `limit`.
    fn until(&mut self, message: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.heard.iter().any(|(_, m)| m == message) {
                return;
            }
            let mut buf = [0u8; 256];
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.heard.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into()));
            }
        }
        panic!("no {message} within {limit:?}; heard {:?}", self.said());
    }

    /// Listens for `period`, keeping what is heard.
    fn listen(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            let mut buf = [0u8; 256];
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.heard.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into()));
            }
        }
    }

    /// Listens until `n` watchdog pings were heard, for at most `limit`.
    fn until_pings(&mut self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.pings() < n && Instant::now() < deadline {
            self.listen(Duration::from_millis(50));
        }
        assert!(self.pings() >= n, "{} of {n} pings within {limit:?}", self.pings());
    }

    /// The longest silence between two watchdog pings.
    fn longest_gap(&self) -> Duration {
        let pings: Vec<Instant> =
            self.heard.iter().filter(|(_, m)| m == "WATCHDOG=1").map(|(t, _)| *t).collect();
        pings.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    fn said(&self) -> Vec<&str> {
        self.heard.iter().map(|(_, m)| m.as_str()).collect()
    }

    fn pings(&self) -> usize {
        self.heard.iter().filter(|(_, m)| m == "WATCHDOG=1").count()
    }
}

/// Starts `shipper ARGS` as systemd would with `Type=notify` and `WatchdogSec`.
fn start(
    args: &[&str],
    notify: &std::path::Path,
    fault: Option<&str>,
    log: &std::path::Path,
) -> Child {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "400000")
        .env("SHIPPER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(f) = fault {
        c.env(shipper::fault::ENV, f);
    }
    c.spawn().unwrap()
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

/// Both commands say READY once serving, ping the watchdog while their workers run, and say
/// STOPPING when told to stop.
#[test]
fn both_commands_notify_ready_watchdog_and_stopping() {
    let env = Env::new();
    let configs = [
        ("receive", env.receiver_toml(free_port(), free_port(), "")),
        ("run", env.shipper_toml(free_port(), free_port(), "")),
    ];
    for (command, text) in configs {
        let (mut manager, notify) = Manager::bind(&env, command);
        let cfg = env.write(&format!("{command}.toml"), &text);
        let args = [command, "--config", cfg.to_str().unwrap()];
        let mut child = start(&args, &notify, None, &env.path(&format!("{command}.log")));
        manager.until("READY=1", Duration::from_secs(20));
        assert_eq!(manager.said()[0], "READY=1", "{command}: READY comes first");
        manager.until_pings(3, Duration::from_secs(5));
        assert!(terminate(&mut child).success(), "shipper {command} exits 0");
        manager.until("STOPPING=1", Duration::from_secs(5));
    }
}

/// A worker blocked in a call stops the watchdog's pings (systemd would restart the service);
/// they resume once it moves again.
#[test]
fn a_stuck_worker_stops_the_watchdog_until_it_moves_again() {
    let env = Env::new();
    let (mut manager, notify) = Manager::bind(&env, "stall");
    let cfg = env.write("edge.toml", &env.shipper_toml(free_port(), free_port(), ""));
    let log = env.path("stall.log");
    let args = ["run", "--config", cfg.to_str().unwrap()];
    let mut child = start(&args, &notify, Some("stall-worker"), &log);
    manager.until("READY=1", Duration::from_secs(20));
    // Worker 0 blocks its thread from 1 s after start, for fault::STALL_MS; listen until the
    // watchdog says it moves again, then for one more ping.
    let moved = || std::fs::read_to_string(&log).unwrap().contains("makes progress again");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !moved() && Instant::now() < deadline {
        manager.listen(Duration::from_millis(50));
    }
    assert!(moved(), "{}", std::fs::read_to_string(&log).unwrap());
    manager.until_pings(manager.pings() + 1, Duration::from_secs(5));
    let stall = Duration::from_millis(shipper::fault::STALL_MS);
    assert!(manager.longest_gap() >= stall / 2, "pings went on: {:?}", manager.longest_gap());
    let last = manager.heard.iter().rev().find(|(_, m)| m == "WATCHDOG=1").map(|(t, _)| *t);
    let gap_end = manager.heard.iter().map(|(t, _)| *t).max();
    assert_eq!(last, gap_end, "pings resumed after the stall: {:?}", manager.said());
    assert!(terminate(&mut child).success());
    manager.until("STOPPING=1", Duration::from_secs(5));
    let text = std::fs::read_to_string(&log).unwrap();
    // Regression: checks more frequent than the workers' publishes saw healthy workers stuck.
    assert_eq!(text.matches("a worker made no progress").count(), 1, "{text}");
    assert!(text.contains("every worker makes progress again"), "{text}");
}

/// The systemd units in packaging/ pass `systemd-analyze verify` (with the binary built here).
#[test]
fn the_systemd_units_verify() {
    let env = Env::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/systemd");
    for unit in ["shipper.service", "shipper-receive.service"] {
        let text = std::fs::read_to_string(format!("{dir}/{unit}")).unwrap();
        assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{unit}");
        let path = env.write(unit, &text.replace("/usr/bin/shipper", BIN));
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .expect("systemd-analyze (Debian's systemd package)");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
}
