//! Types shared between the kernel-side programs (to come: drop accounting on the shipper's
//! sockets and connections) and userspace. `no_std`, `#[repr(C)]`, plain old data: the same
//! bytes are written by the BPF program into per-CPU maps and read by userspace.

#![no_std]

/// Key of the per-CPU map counting datagrams the kernel dropped on a shipper socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketDropKey {
    /// Local port of the socket (host byte order); 0 for unix sockets.
    pub port: u16,
    /// The kernel's `skb_drop_reason`.
    pub reason: u16,
    /// Inode of the socket, to attribute unix-socket drops.
    pub inode: u32,
}

/// Key of the per-CPU map counting TCP retransmissions and resets towards a receiver.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionKey {
    /// Remote IPv4 address (network byte order) or the low 32 bits of an IPv6 one.
    pub addr: u32,
    /// Remote port (host byte order).
    pub port: u16,
    /// 1 = retransmission, 2 = reset.
    pub event: u16,
}

/// Value of both maps: one counter per CPU, summed by userspace.
pub type Count = u64;

const _: () = assert!(core::mem::size_of::<SocketDropKey>() == 8);
const _: () = assert!(core::mem::size_of::<ConnectionKey>() == 8);
