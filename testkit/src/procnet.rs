//! The kernel's table of IPv4 UDP sockets, `/proc/net/udp` (or a thread's own namespace's,
//! `/proc/thread-self/net/udp`).
//!
//! Format (one header line, then one line per socket; `proc_udp.c`'s `udp4_format_sock`):
//! ```text
//! sl: local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
//!     ref pointer drops
//! 12: 0100007F:9C40 00000000:0000 07 00000000:00000F00 00:00000000 00000000 0 0 45678
//!     2 0000000000000000 17
//! ```
//! Addresses are the in-memory `__be32` printed as a host-order hexadecimal integer, ports and
//! queue sizes hexadecimal, `drops` decimal.

use std::net::Ipv4Addr;

/// One socket of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpRow {
    pub local_ip: Ipv4Addr,
    pub local_port: u16,
    /// Bytes waiting in the receive queue.
    pub rx_queue_bytes: u64,
    /// Datagrams the kernel dropped on this socket.
    pub drops: u64,
}

/// The sockets of table `text`; lines that do not parse (the header among them) are skipped.
pub fn parse_udp(text: &str) -> Vec<UdpRow> {
    text.lines().filter_map(parse_row).collect()
}

fn parse_row(line: &str) -> Option<UdpRow> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 13 {
        return None;
    }
    let (ip, port) = f[1].split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let (_, rx) = f[4].split_once(':')?;
    Some(UdpRow {
        local_ip: Ipv4Addr::from(ip.to_ne_bytes()),
        local_port: u16::from_str_radix(port, 16).ok()?,
        rx_queue_bytes: u64::from_str_radix(rx, 16).ok()?,
        drops: f[f.len() - 1].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three sockets as a little-endian kernel prints them.
    const SAMPLE: &str = concat!(
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  ",
        "timeout inode ref pointer drops             \n",
        "  331: 0100007F:9C40 00000000:0000 07 00000000:00000F00 00:00000000 00000000     0  ",
        "      0 45678 2 0000000000000000 17\n",
        "  331: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0  ",
        "      0 45679 2 0000000000000000 3\n",
        " 1024: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0  ",
        "      0 1234 2 0000000000000000 0\n",
    );

    #[test]
    fn every_socket_with_address_queue_and_drops() {
        let rows = parse_udp(SAMPLE);
        let lo = Ipv4Addr::LOCALHOST;
        let row = |local_ip, local_port, rx_queue_bytes, drops| UdpRow {
            local_ip,
            local_port,
            rx_queue_bytes,
            drops,
        };
        assert_eq!(
            rows,
            [row(lo, 40000, 0xF00, 17), row(lo, 40000, 0, 3), row(Ipv4Addr::UNSPECIFIED, 68, 0, 0),]
        );
    }

    #[test]
    fn the_header_and_damaged_lines_are_skipped() {
        let text = "   sl  local_address rem_address\n  1: zz:9C40 x x x x x x x x x x 1\n\n";
        assert_eq!(parse_udp(text), []);
    }
}
