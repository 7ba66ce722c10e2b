//! The shipper's kernel programs: BTF tracepoints (`tp_btf`) that count, into per-CPU maps,
//! what the kernel drops on the shipper's own sockets and connections. Built for
//! bpfel-unknown-none by shipper/build.rs; loaded by `shipper/src/ebpf/`.
//!
//! Attribution is by socket cookie: userspace puts the cookie of each socket it owns into
//! `WATCHED_*` (cookie -> slot); a program asks the kernel for the cookie of the socket an
//! event happened on and counts only if it is watched. Everything else costs one helper call
//! and one hash lookup, then returns.
//!
//! `sock_send_length` is the exception: it runs on every `sendmsg` of the host, so it returns
//! after one comparison unless the send failed with `EAGAIN`, and it reads the fields it needs
//! itself (`bpf_probe_read_kernel`) at offsets userspace found in the kernel's BTF.

#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::bpf_probe_read_kernel;
use aya_ebpf::helpers::generated::bpf_get_socket_cookie;
use aya_ebpf::macros::{btf_tracepoint, map};
use aya_ebpf::maps::{LruHashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::programs::BtfTracePointContext;
use shipper_ebpf::{
    ConnectionKey, Count, SockOffsets, SocketDropKey, AF_UNIX, CONNECTION_EVENTS_MAX, EAGAIN,
    EVENT_RESET_RECEIVED, EVENT_RESET_SENT, EVENT_RETRANSMIT, REASON_UNIX_QUEUE_FULL,
    SOCKET_DROPS_MAX, WATCHED_CONNECTIONS_MAX, WATCHED_SOCKETS_MAX,
};

#[map]
static WATCHED_SOCKETS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(WATCHED_SOCKETS_MAX, 0);

#[map]
static WATCHED_CONNECTIONS: LruHashMap<u64, u32> =
    LruHashMap::with_max_entries(WATCHED_CONNECTIONS_MAX, 0);

#[map]
static SOCKET_DROPS: PerCpuHashMap<SocketDropKey, Count> =
    PerCpuHashMap::with_max_entries(SOCKET_DROPS_MAX, 0);

#[map]
static CONNECTION_EVENTS: PerCpuHashMap<ConnectionKey, Count> =
    PerCpuHashMap::with_max_entries(CONNECTION_EVENTS_MAX, 0);

/// Socket drops that found `SOCKET_DROPS` full (one counter per CPU).
#[map]
static UNCOUNTED: PerCpuArray<Count> = PerCpuArray::with_max_entries(1, 0);

/// Set by userspace before loading (`GLOBAL_SOCK_OFFSETS`); read-only to the programs.
#[no_mangle]
static SOCK_OFFSETS: SockOffsets = SockOffsets { family: 0, cookie: 0, unix_peer: 0 };

/// Adds one to this CPU's counter of `key`, creating it at 1 if absent. If another CPU
/// created the key between the lookup and the insert, the insert fails and the second
/// lookup finds it. Returns false if the map is full and `key` is not in it.
#[inline(always)]
fn increment<K>(map: &PerCpuHashMap<K, Count>, key: &K) -> bool {
    for _ in 0..2 {
        if let Some(count) = map.get_ptr_mut(key) {
            // SAFETY: a per-CPU value is only written by programs on this CPU, which do
            // not preempt each other's map updates (tracing programs do not nest per CPU).
            unsafe { *count += 1 };
            return true;
        }
        if map.insert(key, 1, u64::from(BPF_NOEXIST)).is_ok() {
            return true;
        }
    }
    false
}

/// Counts a drop on a watched socket, in `UNCOUNTED` if `SOCKET_DROPS` is full.
#[inline(always)]
fn count_drop(key: &SocketDropKey) {
    if !increment(&SOCKET_DROPS, key) {
        if let Some(count) = UNCOUNTED.get_ptr_mut(0) {
            // SAFETY: as in `increment`: this CPU's own slot.
            unsafe { *count += 1 };
        }
    }
}

/// The cookie of `sk` (a `struct sock *` argument of the tracepoint; 0 if it is null).
#[inline(always)]
fn cookie(sk: *mut c_void) -> u64 {
    // SAFETY: the helper accepts a nullable `struct sock_common` BTF pointer, which is what
    // the tracepoints' socket arguments are.
    unsafe { bpf_get_socket_cookie(sk) }
}

/// `skb:kfree_skb(skb, location, reason, rx_sk)`: a packet freed as dropped. Counted when
/// `rx_sk`, the socket that was to receive it, is watched.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(3);
    if sk.is_null() {
        return 0;
    }
    let reason: u32 = ctx.arg(2);
    // SAFETY: the value is copied out at once; a slot is never rewritten while watched.
    if let Some(slot) = unsafe { WATCHED_SOCKETS.get(cookie(sk)) } {
        count_drop(&SocketDropKey { slot: *slot, reason });
    }
    0
}

/// `sock:sock_send_length(sk, ret, flags)`: a `sendmsg` returned `ret` on `sk`, the sender's
/// socket. A unix datagram socket connected to a watched socket whose receive queue is full
/// gets `-EAGAIN` (nonblocking, or its send timeout ran out); the datagram is refused, not
/// dropped, so only here is it seen with the receiving socket at hand: `unix_sk(sk)->peer`.
/// Counted under that socket's slot as [`REASON_UNIX_QUEUE_FULL`].
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> u32 {
    let ret: i32 = ctx.arg(1);
    if ret != -EAGAIN {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    if let Some(cookie) = unix_peer_cookie(sk) {
        // SAFETY: as in `kfree_skb`.
        if let Some(slot) = unsafe { WATCHED_SOCKETS.get(cookie) } {
            let key = SocketDropKey { slot: *slot, reason: REASON_UNIX_QUEUE_FULL };
            count_drop(&key);
        }
    }
    0
}

/// The cookie of the socket `sk` is connected to, if `sk` is a unix socket with a peer whose
/// cookie was ever asked for (a watched socket's was: userspace read SO_COOKIE).
#[inline(always)]
fn unix_peer_cookie(sk: *const u8) -> Option<u64> {
    // SAFETY: a read-only global, written by the loader before the program runs.
    let at = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    // SAFETY: bpf_probe_read_kernel copies from any kernel address, failing (not faulting)
    // where nothing is mapped; `sk` is the tracepoint's socket, the offsets are from BTF.
    let family: u16 = unsafe { bpf_probe_read_kernel(sk.add(at.family as usize).cast()) }.ok()?;
    if family != AF_UNIX {
        return None;
    }
    // SAFETY: as above; `sk` is a `struct unix_sock`, its family says so.
    let peer: *const u8 =
        unsafe { bpf_probe_read_kernel(sk.add(at.unix_peer as usize).cast()) }.ok()?;
    if peer.is_null() {
        return None;
    }
    // SAFETY: as above; `peer` is a `struct sock *` (null checked).
    let cookie: u64 = unsafe { bpf_probe_read_kernel(peer.add(at.cookie as usize).cast()) }.ok()?;
    (cookie != 0).then_some(cookie)
}

/// Counts `event` if the tracepoint's first argument is a watched connection's socket.
#[inline(always)]
fn connection_event(ctx: &BtfTracePointContext, event: u32) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    // SAFETY: as in `kfree_skb`.
    if let Some(slot) = unsafe { WATCHED_CONNECTIONS.get(cookie(sk)) } {
        // Cannot fail: every slot's every event fits (CONNECTION_EVENTS_MAX).
        increment(&CONNECTION_EVENTS, &ConnectionKey { slot: *slot, event });
    }
    0
}

/// `tcp:tcp_retransmit_skb(sk, skb, err)`: a retransmission attempt. Since 6.x it also fires
/// for attempts that sent nothing (`err` != 0: still queued, out of memory, no route); only
/// the ones that went out are counted, as the kernel's `RetransSegs` does.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> u32 {
    let err: i32 = ctx.arg(2);
    if err != 0 {
        return 0;
    }
    connection_event(&ctx, EVENT_RETRANSMIT)
}

/// `tcp:tcp_send_reset(sk, skb, reason)`: a reset sent (sk is null for no-socket resets).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    connection_event(&ctx, EVENT_RESET_SENT)
}

/// `tcp:tcp_receive_reset(sk)`: a reset received.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> u32 {
    connection_event(&ctx, EVENT_RESET_RECEIVED)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The helpers used (socket cookie) are GPL-only.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
