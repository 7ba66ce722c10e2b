//! Kernel drop accounting: the eBPF programs of `shipper-ebpf`, loaded at start, count what
//! the kernel drops on the shipper's own sockets (datagrams over a full receive queue, ...)
//! and the TCP retransmissions and resets on its connections to receivers (docs/ebpf.md).
//!
//! # Design constraints
//! - Nothing here is on the per-record path. Sources and connections register a socket once
//!   ([`watch_socket`], [`watch_connection`]: one `bpf()` syscall under a mutex, at connection
//!   pace); the kernel counts into per-CPU maps; a thread reads the maps every
//!   `PUBLISH_INTERVAL_MS` for the metrics endpoint.
//! - Bounded: `WATCHED_SOCKETS_MAX` sockets, `WATCHED_CONNECTIONS_MAX` connections (LRU),
//!   [`SLOTS_MAX`] distinct source and receiver labels, `SOCKET_DROPS_MAX` (source, reason)
//!   and `CONNECTION_EVENTS_MAX` (receiver, event) counters (constants in `shipper-ebpf`).
//!   Every receiver slot's every event fits; a drop with a new (source, reason) once
//!   `SOCKET_DROPS` is full is counted in `UNCOUNTED`, exported as
//!   `shipper_kernel_drops_uncounted_total`.
//! - Optional: without the `ebpf` cargo feature, privileges (CAP_BPF and CAP_PERFMON, or
//!   CAP_SYS_ADMIN) or kernel BTF, the shipper runs without, says why once, and exports
//!   `shipper_ebpf_attached{state="<why>"} 0`.
//!
//! # Format
//! Shared with the programs through `shipper_ebpf` (one definition of each key):
//! ```text
//! WATCHED_SOCKETS / WATCHED_CONNECTIONS: socket cookie (SO_COOKIE) u64 -> slot u32
//! SOCKET_DROPS:      { slot: u32, reason: u32 }  -> u64 per CPU
//!                    reason: enum skb_drop_reason, or REASON_UNIX_QUEUE_FULL (ours)
//! CONNECTION_EVENTS: { slot: u32, event: u32 (EVENT_*) }  -> u64 per CPU
//! SOCK_OFFSETS (global): byte offsets of skc_family, skc_cookie, unix_sock.peer (from BTF)
//! ```
//! A slot is the index of a label (source name, receiver address) in [`Slots`].
//!
//! # Operation
//! 1. [`start`] (main thread, before the workers): unless disabled, check capabilities and
//!    `/sys/kernel/btf/vmlinux`, raise RLIMIT_MEMLOCK (a failure is only a warning: BPF
//!    memory is cgroup-accounted on 6.x), find the socket field offsets in the kernel's BTF
//!    (`btf`, on the mapped file), load the embedded object with them, attach its five
//!    `tp_btf` programs (four if the offsets were not found, with a warning), read
//!    drop-reason names from the same BTF, and log the outcome. Any other failure leaves the
//!    shipper running without eBPF, with the reason. Only one parsed copy of the kernel's BTF
//!    exists at a time (about 10 MiB; peak RSS in docs/perf.md). A takeover's new process
//!    adopts the programs the old one [`hand_over`]s instead (same object digest): their
//!    links keep them attached, their maps keep counting, it needs no capability to load.
//! 2. Sources and connections call `watch_*` with their socket; the returned [`Watch`]
//!    unregisters it when dropped. They are no-ops when nothing is attached.
//! 3. [`snapshot`] reads every counter of every CPU, labelled for the metrics.

#[cfg(feature = "ebpf")]
mod btf;
#[cfg(feature = "ebpf")]
mod loader;
#[cfg(feature = "ebpf")]
mod reasons;

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

pub use shipper_ebpf::{EVENT_RESET_RECEIVED, EVENT_RESET_SENT, EVENT_RETRANSMIT};

/// Distinct source labels, and distinct receiver labels, that can be counted.
pub const SLOTS_MAX: usize = 1024;
const _: () = assert!(
    SLOTS_MAX * shipper_ebpf::EVENTS as usize <= shipper_ebpf::CONNECTION_EVENTS_MAX as usize,
    "every event of every receiver slot must fit in CONNECTION_EVENTS"
);

/// Why the programs are or are not attached (label `state` of `shipper_ebpf_attached`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Loaded and attached.
    Attached,
    /// Turned off by `--no-ebpf` or `ebpf.enabled = false`.
    Disabled,
    /// Built without the `ebpf` cargo feature.
    NotBuilt,
    /// Missing CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), or the kernel refused with EPERM.
    NoPermission,
    /// The kernel has no BTF (`/sys/kernel/btf/vmlinux`), which `tp_btf` programs need.
    NoBtf,
    /// Loading or attaching failed otherwise (the log says how).
    LoadFailed,
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Attached => "attached",
            State::Disabled => "disabled",
            State::NotBuilt => "not_built",
            State::NoPermission => "no_permission",
            State::NoBtf => "no_btf",
            State::LoadFailed => "load_failed",
        }
    }
}

/// Labels given slots, in slot order: the map values userspace writes are indexes here.
#[derive(Default)]
pub struct Slots {
    names: Vec<String>,
}

impl Slots {
    /// The slot of `name`, given a new one if it has none; `None` when all are taken.
    pub fn intern(&mut self, name: &str) -> Option<u32> {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return Some(i as u32);
        }
        if self.names.len() >= SLOTS_MAX {
            return None;
        }
        self.names.push(name.to_string());
        Some(self.names.len() as u32 - 1)
    }

    pub fn name(&self, slot: u32) -> &str {
        self.names.get(slot as usize).map_or("_unknown", String::as_str)
    }

    /// Slots with `names`, in order (a previous process's, handed over): at most
    /// [`SLOTS_MAX`] are kept.
    pub fn from_names(mut names: Vec<String>) -> Slots {
        names.truncate(SLOTS_MAX);
        Slots { names }
    }

    /// The labels, in slot order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The attached programs as a takeover hands them to the next process; the descriptors go
/// beside it: the maps, then one link per program (`descriptors` in all).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Handing {
    /// SHA-256 of the embedded object, hex: only the same programs are adopted.
    pub object: String,
    /// The programs attached, in attach order.
    pub programs: Vec<String>,
    /// The source labels by slot, and the receiver labels by slot: the counters' keys.
    pub sources: Vec<String>,
    pub receivers: Vec<String>,
    /// The kernel's drop-reason names, as the old process read them.
    pub reasons: std::collections::BTreeMap<u32, String>,
}

impl Handing {
    /// How many descriptors travel with it.
    pub fn descriptors(&self) -> usize {
        MAPS_HANDED + self.programs.len()
    }
}

/// The maps a handover carries.
const MAPS_HANDED: usize = 5;

/// Most programs a handover may name.
pub const PROGRAMS_MAX: usize = 16;

/// One counter of one CPU, labelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub cpu: u32,
    /// Source name (drops) or receiver address (TCP events).
    pub item: String,
    /// Drop reason (lower-case kernel name), or the TCP event.
    pub kind: String,
    pub count: u64,
}

/// What the metrics endpoint shows of the kernel programs.
#[derive(Clone, Debug)]
pub struct KernelCounters {
    pub state: State,
    pub socket_drops: Vec<Sample>,
    pub connection_events: Vec<Sample>,
    /// Per CPU: socket drops not counted because the drop map was full.
    pub uncounted: Vec<u64>,
}

impl KernelCounters {
    pub fn new(state: State) -> KernelCounters {
        KernelCounters {
            state,
            socket_drops: Vec::new(),
            connection_events: Vec::new(),
            uncounted: Vec::new(),
        }
    }
}

/// A watch that can fail: the socket has no cookie, or the labels or map are full.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// `getsockopt(SO_COOKIE)` failed (not a socket?).
    #[error("socket cookie: {0}")]
    Cookie(std::io::Error),
    /// More than SLOTS_MAX distinct labels.
    #[error("more than {SLOTS_MAX} distinct labels watched; {0:?} is not counted")]
    SlotsFull(String),
    /// The kernel refused the map update.
    #[error("watch map update: {0}")]
    Map(String),
}

/// Which table a [`Watch`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Sockets,
    Connections,
}

/// A watched socket; unwatched when dropped (cookies are never reused, so forgetting a
/// `Watch` only keeps a stale entry until the LRU map evicts it).
#[derive(Debug)]
#[cfg_attr(not(feature = "ebpf"), allow(dead_code))]
pub struct Watch {
    table: Table,
    cookie: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        #[cfg(feature = "ebpf")]
        if let Some(k) = KERNEL.get() {
            k.unwatch(self.table, self.cookie);
        }
    }
}

#[cfg(feature = "ebpf")]
static KERNEL: OnceLock<loader::Kernel> = OnceLock::new();
static STATE: OnceLock<State> = OnceLock::new();

/// Loads and attaches the programs unless `enabled` is false, or adopts those a takeover
/// `handed` over when they are the same programs; returns the state, also kept for
/// [`state`]. Call once, before any `watch_*`.
pub fn start(enabled: bool, handed: Option<(Handing, Vec<OwnedFd>)>) -> State {
    let state = if !enabled {
        tracing::info!("eBPF drop accounting off (--no-ebpf or ebpf.enabled = false)");
        State::Disabled
    } else if let Some(state) = handed.and_then(adopt) {
        state
    } else {
        let state = attach();
        // Loading parsed the kernel's BTF (about 10 MiB, twice in turn, by aya); give the
        // freed heap back rather than keep it for the life of the process.
        // SAFETY: malloc_trim only returns free memory of glibc's arenas to the system.
        unsafe { libc::malloc_trim(0) };
        state
    };
    let _ = STATE.set(state);
    state
}

#[cfg(feature = "ebpf")]
fn attach() -> State {
    match loader::Kernel::load() {
        Ok(kernel) => {
            let programs = format!("tp_btf: {}", kernel.programs.join(", "));
            let _ = KERNEL.set(kernel);
            tracing::info!(programs, "eBPF drop accounting attached");
            State::Attached
        }
        Err((state, why)) => {
            tracing::warn!(
                state = state.label(),
                "eBPF drop accounting not attached, running without it: {why}"
            );
            state
        }
    }
}

/// Takes over a previous process's programs; `None` (said why) when they cannot be adopted.
#[cfg(feature = "ebpf")]
fn adopt((handing, fds): (Handing, Vec<OwnedFd>)) -> Option<State> {
    match loader::Kernel::adopt(&handing, fds) {
        Ok(kernel) => {
            let programs = format!("tp_btf: {}", kernel.programs.join(", "));
            let _ = KERNEL.set(kernel);
            tracing::info!(programs, "eBPF drop accounting adopted from the previous process");
            Some(State::Attached)
        }
        Err((_, why)) => {
            tracing::warn!("eBPF programs handed over but not adopted, loading anew: {why}");
            None
        }
    }
}

#[cfg(not(feature = "ebpf"))]
fn adopt(_: (Handing, Vec<OwnedFd>)) -> Option<State> {
    None
}

/// What a takeover hands the next process of the attached programs, with duplicates of their
/// descriptors; `None` when nothing is attached. From here on this process leaves the
/// programs' watch tables to the next one.
#[cfg(feature = "ebpf")]
pub fn hand_over() -> Option<(Handing, Vec<OwnedFd>)> {
    match KERNEL.get()?.hand_over() {
        Ok(handing) => Some(handing),
        Err(e) => {
            tracing::warn!("takeover: the eBPF programs cannot be handed over: {e}");
            None
        }
    }
}

#[cfg(not(feature = "ebpf"))]
pub fn hand_over() -> Option<(Handing, Vec<OwnedFd>)> {
    None
}

#[cfg(not(feature = "ebpf"))]
fn attach() -> State {
    tracing::warn!(
        "eBPF drop accounting not attached: this shipper was built without the `ebpf` feature"
    );
    State::NotBuilt
}

/// The state [`start`] reached (`Disabled` before it ran).
pub fn state() -> State {
    STATE.get().copied().unwrap_or(State::Disabled)
}

/// The kernel's cookie of socket `fd`.
pub fn cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Counts the kernel's drops on socket `fd` under label `source`, and for a unix datagram
/// socket the datagrams refused to senders connected to it (full queue). Meant for a
/// source's datagram sockets (UDP, unix datagram): what the kernel drops there is lost,
/// whereas a stream socket's drops are retransmitted by the peer. `Ok(None)` when not
/// attached.
pub fn watch_socket(fd: BorrowedFd<'_>, source: &str) -> Result<Option<Watch>, WatchError> {
    watch(Table::Sockets, fd, source)
}

/// Counts TCP retransmissions and resets on connection `fd` under label `receiver`.
/// `Ok(None)` when the programs are not attached.
pub fn watch_connection(fd: BorrowedFd<'_>, receiver: &str) -> Result<Option<Watch>, WatchError> {
    watch(Table::Connections, fd, receiver)
}

#[cfg(feature = "ebpf")]
fn watch(table: Table, fd: BorrowedFd<'_>, label: &str) -> Result<Option<Watch>, WatchError> {
    let Some(k) = KERNEL.get() else {
        return Ok(None);
    };
    let cookie = cookie(fd).map_err(WatchError::Cookie)?;
    k.watch(table, cookie, label)?;
    Ok(Some(Watch { table, cookie }))
}

#[cfg(not(feature = "ebpf"))]
fn watch(_: Table, _: BorrowedFd<'_>, _: &str) -> Result<Option<Watch>, WatchError> {
    Ok(None)
}

/// Every counter of every CPU, labelled; empty when not attached.
#[cfg_attr(not(feature = "ebpf"), allow(unused_mut))]
pub fn snapshot() -> KernelCounters {
    let mut out = KernelCounters::new(state());
    #[cfg(feature = "ebpf")]
    if let Some(k) = KERNEL.get() {
        if let Err(e) = k.read(&mut out) {
            tracing::warn!("reading the eBPF maps failed: {e}");
        }
    }
    out
}

/// The label of TCP event `event` (`EVENT_*`).
pub fn event_label(event: u32) -> &'static str {
    match event {
        EVENT_RETRANSMIT => "retransmit",
        EVENT_RESET_SENT => "reset_sent",
        EVENT_RESET_RECEIVED => "reset_received",
        _ => "unknown",
    }
}
