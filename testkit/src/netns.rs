//! Network namespaces for tests that need the kernel's network counters to themselves, or a
//! link they can cut. Root only. Failures panic with what failed: these are test fixtures.

use std::process::Command;

/// Runs `f` on a thread of its own in a new network namespace with `lo` up; the processes it
/// starts inherit the namespace. Panics of `f` are re-raised.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread (network namespace is per task).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        ip(&["link", "set", "lo", "up"]);
        f()
    });
    thread.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `ip ARGS` (in the calling thread's namespace), panicking with its output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) not installed");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `args[0] args[1..]`, panicking when it fails.
fn sh(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed: {status}");
}

/// A named network namespace joined to this one by a veth pair (this side
/// [`VethNamespace::HOST_IP`], the namespace's [`VethNamespace::PEER_IP`], both /24), torn
/// down when dropped. Named after the process id: one per test process at a time.
pub struct VethNamespace {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
}

impl VethNamespace {
    pub const HOST_IP: &'static str = "10.231.0.1";
    pub const PEER_IP: &'static str = "10.231.0.2";

    /// Creates the namespace, the veth pair and their addresses, first removing what a killed
    /// run left (it holds the same addresses, and the host would route to it).
    pub fn create() -> VethNamespace {
        remove_stale();
        let id = std::process::id() % 100_000;
        let n = VethNamespace {
            name: format!("shipper-test-{id}"),
            host_if: format!("shp{id}h"),
            ns_if: format!("shp{id}n"),
        };
        sh(&["ip", "netns", "add", &n.name]);
        sh(&["ip", "link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if]);
        sh(&["ip", "link", "set", &n.ns_if, "netns", &n.name]);
        sh(&["ip", "addr", "add", &format!("{}/24", Self::HOST_IP), "dev", &n.host_if]);
        sh(&["ip", "link", "set", &n.host_if, "up"]);
        let addr = format!("{}/24", Self::PEER_IP);
        n.exec(&["ip", "addr", "add", &addr, "dev", &n.ns_if]);
        n.exec(&["ip", "link", "set", &n.ns_if, "up"]);
        n.exec(&["ip", "link", "set", "lo", "up"]);
        n
    }

    /// Runs `args` inside the namespace (`ip netns exec`), panicking when it fails.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }
}

/// Deletes the `shipper-test-PID` namespaces, and their host-side links, whose process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix("shipper-test-") else { continue };
        if pid.parse::<u32>().is_err() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = Command::new("ip").args(["link", "del", &format!("shp{pid}h")]).status();
    }
}

impl Drop for VethNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
    }
}
