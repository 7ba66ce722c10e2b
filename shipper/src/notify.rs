//! systemd's service notification protocol (sd_notify(3)), spoken without libsystemd: both
//! commands tell their service manager when they are ready, when they stop, and, while every
//! worker makes progress, that they are alive (the watchdog).
//!
//! # Design constraints
//! - Outside systemd (`NOTIFY_SOCKET` unset) everything here is a no-op. A message that cannot
//!   be sent is logged once and never ends the process.
//! - The watchdog is pinged from the workers' progress, not from a timer alone: a thread wakes
//!   every half `WATCHDOG_USEC` and pings only if every worker published its counters within
//!   the last `WATCHDOG_USEC` (they do every 250 ms from their ticker; the window is at least
//!   two of those). A worker stuck in a loop or a
//!   blocking call stops the pings, and systemd restarts the service.
//!
//! # Format
//! ```text
//! NOTIFY_SOCKET = /path/of/a/unix/datagram/socket | @abstract-name
//! datagram      = "READY=1" | "STOPPING=1" | "WATCHDOG=1" | "STATUS=" text
//!               | "RELOADING=1\nMONOTONIC_USEC=" µs of CLOCK_MONOTONIC     (a reload begins)
//!               | "MAINPID=" pid            (a takeover's new process is the main one now)
//! WATCHDOG_USEC = microseconds; WATCHDOG_PID, when set, must be this process's id
//! ```

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where notifications go, if a service manager asked for them.
#[derive(Clone)]
pub struct Notifier {
    target: Option<Arc<(UnixDatagram, SocketAddr)>>,
    /// Set once a failed send was logged.
    failed: Arc<AtomicBool>,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for (none when unset or unusable, said once).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let connected = address(&path).and_then(|a| Ok((UnixDatagram::unbound()?, a)));
            connected
                .map_err(|e| tracing::warn!(?path, "NOTIFY_SOCKET unusable, not notifying: {e}"))
                .ok()
        });
        Notifier { target: target.map(Arc::new), failed: Arc::new(AtomicBool::new(false)) }
    }

    /// Tells the manager a reload begins (`Type=notify-reload`'s message, which plain
    /// `Type=notify` takes too): it waits for the next READY=1.
    pub fn reloading(&self) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let us = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={us}"));
    }

    /// Tells the manager this process is the service's main one now (a takeover's new
    /// process, before the old one exits).
    pub fn main_pid(&self) {
        self.send(&format!("MAINPID={}", std::process::id()));
    }

    /// Sends one notification (`READY=1`, `STOPPING=1`, ...).
    pub fn send(&self, state: &str) {
        let Some(target) = &self.target else { return };
        let (socket, address) = &**target;
        if let Err(e) = socket.send_to_addr(state.as_bytes(), address) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!("cannot notify the service manager ({state}): {e}");
            }
        }
    }

    /// How often the service manager wants to hear from us, when it does.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        let for_us =
            std::env::var("WATCHDOG_PID").map_or(true, |pid| pid.parse() == Ok(std::process::id()));
        (usec > 0 && for_us).then(|| Duration::from_micros(usec))
    }

    /// Starts the watchdog thread: every half `interval` it calls `progress`, and pings only
    /// when it says every worker moved lately.
    pub fn watch(&self, interval: Duration, mut progress: impl FnMut() -> bool + Send + 'static) {
        let notifier = self.clone();
        let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
            let mut stalled = false;
            loop {
                std::thread::sleep(interval / 2);
                if progress() {
                    if stalled {
                        tracing::info!("every worker makes progress again: watchdog pinged");
                    }
                    stalled = false;
                    notifier.send("WATCHDOG=1");
                } else if !stalled {
                    stalled = true;
                    tracing::error!("a worker made no progress for {} ms: the watchdog is not pinged (the service manager restarts us)", interval.as_millis());
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the watchdog thread: {e}; the watchdog is not pinged");
        }
    }
}

/// The address `NOTIFY_SOCKET` names: a path, or an abstract name after `@`.
fn address(value: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    match value.as_bytes() {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        path => SocketAddr::from_pathname(std::path::Path::new(std::ffi::OsStr::from_bytes(path))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Arc::new((
                UnixDatagram::unbound().unwrap(),
                address(path.as_os_str()).unwrap(),
            ))),
            failed: Arc::new(AtomicBool::new(false)),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let name = format!("@shipper-notify-test-{}", std::process::id());
        let abstract_addr = address(std::ffi::OsStr::new(&name)).unwrap();
        let listener = UnixDatagram::bind_addr(&abstract_addr).unwrap();
        let n = Notifier {
            target: Some(Arc::new((UnixDatagram::unbound().unwrap(), abstract_addr))),
            failed: Arc::new(AtomicBool::new(false)),
        };
        n.send("STOPPING=1");
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }
}
