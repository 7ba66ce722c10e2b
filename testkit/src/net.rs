//! Loopback ports for a test's or a perf case's processes.

use std::io;
use std::net::{TcpListener, UdpSocket};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A UDP port on 127.0.0.1 that was free a moment ago (in the calling thread's network
/// namespace).
pub fn free_udp_port() -> io::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_tcp_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = free_udp_port().unwrap();
        UdpSocket::bind(("127.0.0.1", port)).unwrap();
    }
}
