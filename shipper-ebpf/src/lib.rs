//! Types shared between the kernel-side programs (`src/main.rs`: drop accounting on the
//! shipper's sockets and connections) and userspace (`shipper/src/ebpf/`). `no_std`,
//! `#[repr(C)]`, plain old data: the same bytes are written by the BPF programs into the maps
//! and read by userspace.
//!
//! # Format
//! ```text
//! WATCHED_SOCKETS      LRU hash  cookie: u64 -> slot: u32     filled by userspace
//! WATCHED_CONNECTIONS  LRU hash  cookie: u64 -> slot: u32     filled by userspace
//! SOCKET_DROPS         per-CPU hash  SocketDropKey -> u64     counted by `kfree_skb` and
//!                                                              `sock_send_length`
//! CONNECTION_EVENTS    per-CPU hash  ConnectionKey -> u64     counted by the tcp programs
//! ```
//! A cookie is the kernel's socket cookie (`getsockopt(SO_COOKIE)`, `bpf_get_socket_cookie`):
//! unique per socket for the kernel's lifetime, in every network namespace. A slot is a small
//! number userspace gives each source or destination; it maps slots back to label values.
//!
//! One global, [`SockOffsets`], set by userspace before loading: where `sock_send_length`
//! finds the fields it reads in this kernel's structs (from the kernel's BTF).

#![no_std]

/// Key of [`MAP_SOCKET_DROPS`]: packets the kernel dropped on a watched socket, per reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketDropKey {
    /// The source's slot (the value of its cookie in [`MAP_WATCHED_SOCKETS`]).
    pub slot: u32,
    /// The kernel's `enum skb_drop_reason` (names in tracefs `skb/kfree_skb/format`), or
    /// [`REASON_UNIX_QUEUE_FULL`].
    pub reason: u32,
}

/// Reason of our own, outside the kernel's `enum skb_drop_reason` (whose values are below
/// `SKB_DROP_REASON_MAX`, about 130 in 6.x, or a subsystem's `subsys << 16 | n` with a small
/// `subsys`): a connected unix datagram sender was refused (`EAGAIN`) because the watched
/// socket's receive queue was full. The kernel frees nothing then, so `kfree_skb` never sees
/// it; `sock_send_length` does.
pub const REASON_UNIX_QUEUE_FULL: u32 = u32::MAX;

/// Where the fields `sock_send_length` reads lie in the running kernel's structs, in bytes
/// from the start of the struct. Found by userspace in `/sys/kernel/btf/vmlinux` and set as
/// the programs' global [`GLOBAL_SOCK_OFFSETS`] before loading: struct layouts change with
/// the kernel's version and configuration, so none is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `struct sock`: `__sk_common.skc_family` (u16).
    pub family: u32,
    /// `struct sock`: `__sk_common.skc_cookie` (atomic64_t; set once SO_COOKIE was read).
    pub cookie: u32,
    /// `struct unix_sock`: `peer` (`struct sock *`, the socket a datagram socket is
    /// connected to; `struct sock` is its first member, so the same pointer).
    pub unix_peer: u32,
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
/// Per-CPU array of one counter: socket drops not counted because `SOCKET_DROPS` was full.
pub const MAP_UNCOUNTED: &str = "UNCOUNTED";

/// Name of the [`SockOffsets`] global.
pub const GLOBAL_SOCK_OFFSETS: &str = "SOCK_OFFSETS";

/// Program names (the functions in `src/main.rs`) and the BTF tracepoints they attach to.
pub const PROGRAMS: [(&str, &str); 4] = [
    ("kfree_skb", "kfree_skb"),
    ("tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("tcp_send_reset", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp_receive_reset"),
];
/// The program that counts unix datagram refusals, and its tracepoint: attached only when
/// the offsets it needs were found in the kernel's BTF.
pub const PROGRAM_UNIX_REFUSALS: (&str, &str) = ("sock_send_length", "sock_send_length");

/// `AF_UNIX`, as in `skc_family`.
pub const AF_UNIX: u16 = 1;
/// `EAGAIN`: a nonblocking send refused (`sock_send_length`'s `ret` is `-EAGAIN`).
pub const EAGAIN: i32 = 11;

/// Sockets watched at once (sources: one socket per source and worker).
pub const WATCHED_SOCKETS_MAX: u32 = 1024;
/// Connections watched at once (receivers x workers x `connections`); LRU beyond that.
pub const WATCHED_CONNECTIONS_MAX: u32 = 4096;
/// Distinct (source slot, reason) pairs counted; a drop with a new pair once the map is full
/// is counted in [`MAP_UNCOUNTED`] instead.
pub const SOCKET_DROPS_MAX: u32 = 4096;
/// Distinct (destination slot, event) pairs counted: every event of every slot userspace can
/// hand out (1024) fits, so none is ever lost (asserted in `shipper/src/ebpf/mod.rs`).
pub const CONNECTION_EVENTS_MAX: u32 = 3072;

const _: () = assert!(core::mem::size_of::<SocketDropKey>() == 8);
const _: () = assert!(core::mem::size_of::<ConnectionKey>() == 8);
const _: () = assert!(core::mem::size_of::<SockOffsets>() == 12);
const _: () = assert!(CONNECTION_EVENTS_MAX >= EVENTS);

// SAFETY: both keys are #[repr(C)] structs of two u32, with no padding and no invalid values.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketDropKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnectionKey {}
// SAFETY: a #[repr(C)] struct of three u32, no padding, no invalid values.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockOffsets {}
