//! Loopback ports for a test's or a perf case's processes.
//!
//! # Design constraints
//! - A port handed out must not be handed out again by this process, and must not be taken
//!   meanwhile by the kernel for an outgoing connection (a receiver's, a shipper's): ports are
//!   taken in turn from below the kernel's ephemeral range (`ip_local_port_range`), never from
//!   it. A port the kernel gives for `bind(0)` comes from that range, where any connection may
//!   take it between the test's check and its process's bind: that raced once tests ran
//!   seventy processes at once.
//! - Processes running side by side start at different places of the range (by process id),
//!   and a port is handed out only if binding it (TCP and UDP) works now.

use std::io;
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out.
const PORT_LOW: u16 = 10_000;

/// A TCP port on 127.0.0.1, free now, never handed out before by this process.
pub fn free_tcp_port() -> io::Result<u16> {
    next_port(|p| TcpListener::bind(("127.0.0.1", p)).is_ok() && udp_free(p))
}

/// A UDP port on 127.0.0.1, free now (in the calling thread's network namespace), never
/// handed out before by this process.
pub fn free_udp_port() -> io::Result<u16> {
    next_port(udp_free)
}

fn udp_free(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// The next port of this process's turn that `free` accepts.
fn next_port(free: impl Fn(u16) -> bool) -> io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let high = ephemeral_low().saturating_sub(1).max(PORT_LOW + 1000);
    let span = u32::from(high - PORT_LOW);
    let start = std::process::id().wrapping_mul(7919) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORT_LOW + n as u16;
        if free(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no free port below the ephemeral range"))
}

/// The low end of the kernel's ephemeral port range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ports come from below the ephemeral range, in turn and never twice, and one taken (by a
    /// TCP listener or a UDP socket) is skipped. Binding a handed port again afterwards is not
    /// checked: that races with every other process choosing ports on the machine (it failed
    /// once in CI, right after the integration tests), while the check that it is free is the
    /// bind inside `free_tcp_port` itself.
    #[test]
    fn ports_are_free_below_the_ephemeral_range_never_twice_and_taken_ones_skipped() {
        let range = PORT_LOW..ephemeral_low();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let port = free_tcp_port().unwrap();
            assert!(range.contains(&port), "{port}");
            assert!(seen.insert(port), "{port} handed out twice");
        }
        let span = ephemeral_low().saturating_sub(1).max(PORT_LOW + 1000) - PORT_LOW;
        let after = |p: u16| PORT_LOW + (p - PORT_LOW + 1) % span;
        // Held by this test (or already by someone else: skipped all the same).
        let last = free_tcp_port().unwrap();
        let _tcp = TcpListener::bind(("127.0.0.1", after(last))).ok();
        let next = free_tcp_port().unwrap();
        assert_ne!(next, after(last), "a port with a TCP listener on it");
        let _udp = UdpSocket::bind(("127.0.0.1", after(next))).ok();
        let then = free_tcp_port().unwrap();
        assert_ne!(then, after(next), "a port with a UDP socket on it");
        let udp = free_udp_port().unwrap();
        assert!(range.contains(&udp) && !seen.contains(&udp) && udp != then, "{udp}");
    }
}
