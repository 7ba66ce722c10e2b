//! Types shared between the kernel-side programs (`src/main.rs`: drop accounting on the
//! shipper's sockets and connections) and userspace (`shipper/src/ebpf/`). `no_std`,
//! `#[repr(C)]`, plain old data: the same bytes are written by the BPF programs into the maps
//! and read by userspace.
//!
//! # Format
//! ```text
//! WATCHED_SOCKETS      LRU hash  cookie: u64 -> slot: u32     filled by userspace
//! WATCHED_CONNECTIONS  LRU hash  cookie: u64 -> slot: u32     filled by userspace
//! SOCKET_DROPS         per-CPU hash  SocketDropKey -> u64     counted by `kfree_skb`
//! CONNECTION_EVENTS    per-CPU hash  ConnectionKey -> u64     counted by the tcp programs
//! ```
//! A cookie is the kernel's socket cookie (`getsockopt(SO_COOKIE)`, `bpf_get_socket_cookie`):
//! unique per socket for the kernel's lifetime, in every network namespace. A slot is a small
//! number userspace gives each source or destination; it maps slots back to label values.

#![no_std]

/// Key of [`MAP_SOCKET_DROPS`]: packets the kernel dropped on a watched socket, per reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketDropKey {
    /// The source's slot (the value of its cookie in [`MAP_WATCHED_SOCKETS`]).
    pub slot: u32,
    /// The kernel's `enum skb_drop_reason` (names in tracefs `skb/kfree_skb/format`).
    pub reason: u32,
}

/// Key of [`MAP_CONNECTION_EVENTS`]: TCP events on a watched connection, per destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    /// The destination's slot (the value of its cookie in [`MAP_WATCHED_CONNECTIONS`]).
    pub slot: u32,
    /// One of the `EVENT_*` constants.
    pub event: u32,
}

/// A segment retransmitted (`tcp:tcp_retransmit_skb`).
pub const EVENT_RETRANSMIT: u32 = 0;
/// A reset sent on the connection (`tcp:tcp_send_reset`).
pub const EVENT_RESET_SENT: u32 = 1;
/// A reset received on the connection (`tcp:tcp_receive_reset`).
pub const EVENT_RESET_RECEIVED: u32 = 2;
/// Number of `EVENT_*` values.
pub const EVENTS: u32 = 3;

/// Value of the counting maps: one counter per CPU, read per CPU by userspace.
pub type Count = u64;

/// Map names, as the programs declare them and userspace looks them up.
pub const MAP_WATCHED_SOCKETS: &str = "WATCHED_SOCKETS";
pub const MAP_WATCHED_CONNECTIONS: &str = "WATCHED_CONNECTIONS";
pub const MAP_SOCKET_DROPS: &str = "SOCKET_DROPS";
pub const MAP_CONNECTION_EVENTS: &str = "CONNECTION_EVENTS";

/// Program names (the functions in `src/main.rs`) and the BTF tracepoints they attach to.
pub const PROGRAMS: [(&str, &str); 4] = [
    ("kfree_skb", "kfree_skb"),
    ("tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("tcp_send_reset", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp_receive_reset"),
];

/// Sockets watched at once (sources: one socket per source and worker).
pub const WATCHED_SOCKETS_MAX: u32 = 1024;
/// Connections watched at once (receivers x workers x `connections`); LRU beyond that.
pub const WATCHED_CONNECTIONS_MAX: u32 = 4096;
/// Distinct (source slot, reason) pairs counted.
pub const SOCKET_DROPS_MAX: u32 = 4096;
/// Distinct (destination slot, event) pairs counted.
pub const CONNECTION_EVENTS_MAX: u32 = 1024;

const _: () = assert!(core::mem::size_of::<SocketDropKey>() == 8);
const _: () = assert!(core::mem::size_of::<ConnectionKey>() == 8);
const _: () = assert!(CONNECTION_EVENTS_MAX >= EVENTS);

// SAFETY: both keys are #[repr(C)] structs of two u32, with no padding and no invalid values.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketDropKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnectionKey {}
