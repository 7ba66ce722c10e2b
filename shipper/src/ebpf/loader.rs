//! Loading the embedded object with aya, and the maps' userspace side.

use std::path::Path;
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use shipper_ebpf::{
    ConnectionKey, Count, SockOffsets, SocketDropKey, GLOBAL_SOCK_OFFSETS, MAP_CONNECTION_EVENTS,
    MAP_SOCKET_DROPS, MAP_UNCOUNTED, MAP_WATCHED_CONNECTIONS, MAP_WATCHED_SOCKETS, PROGRAMS,
    PROGRAM_UNIX_REFUSALS,
};

use super::btf::{Blob, BtfError, SYS_FS};
use super::{KernelCounters, Sample, Slots, State, Table, WatchError};

/// The object built by build.rs from `shipper-ebpf` (eBPF bytecode, BTF, maps).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shipper-probes"));

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The loaded programs (kept attached for the life of the process) and their maps.
pub struct Kernel {
    /// Names of the programs attached, in attach order.
    pub programs: Vec<&'static str>,
    _ebpf: Mutex<Ebpf>,
    watched: Mutex<Watched>,
    socket_drops: Mutex<PerCpuHashMap<MapData, SocketDropKey, Count>>,
    connection_events: Mutex<PerCpuHashMap<MapData, ConnectionKey, Count>>,
    uncounted: Mutex<PerCpuArray<MapData, Count>>,
}

struct Watched {
    sockets: HashMap<MapData, u64, u32>,
    connections: HashMap<MapData, u64, u32>,
    sources: Slots,
    receivers: Slots,
}

type Failure = (State, String);

impl Kernel {
    pub fn load() -> Result<Kernel, Failure> {
        check_capabilities()?;
        if !Path::new(SYS_FS).exists() {
            return Err((State::NoBtf, format!("the kernel has no {SYS_FS}")));
        }
        raise_memlock();
        // One copy of the kernel's BTF at a time (peak RSS, docs/perf.md): the offsets come
        // from the mapped file; aya's loader parses its own copy (aya 0.14 has no way around
        // it) and drops it with the loader; the copy for attaching is parsed from the mapped
        // file afterwards.
        let offsets = sock_offsets();
        let mut loader = EbpfLoader::new();
        if let Ok(offsets) = &offsets {
            loader.override_global(GLOBAL_SOCK_OFFSETS, offsets, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| failure("loading the object", &e))?;
        drop(loader);
        let no_btf = |e: &dyn std::fmt::Display| (State::NoBtf, format!("kernel BTF: {e}"));
        let blob = Blob::open(Path::new(SYS_FS)).map_err(|e| no_btf(&e))?;
        let btf = Btf::parse(&blob, Endianness::default()).map_err(|e| no_btf(&e))?;
        let mut programs = Vec::new();
        for (name, tracepoint) in PROGRAMS {
            attach(&mut ebpf, &btf, name, tracepoint)?;
            programs.push(name);
        }
        // Without the offsets, everything but the unix refusals is still counted.
        match offsets {
            Ok(_) => {
                let (name, tracepoint) = PROGRAM_UNIX_REFUSALS;
                attach(&mut ebpf, &btf, name, tracepoint)?;
                programs.push(name);
            }
            Err(e) => tracing::warn!(
                "unix datagram refusals not counted (program {} not attached): {e}",
                PROGRAM_UNIX_REFUSALS.0
            ),
        }
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| (State::LoadFailed, format!("map {name} missing")))
        };
        let (sockets, connections) = (take(MAP_WATCHED_SOCKETS)?, take(MAP_WATCHED_CONNECTIONS)?);
        let (drops, events) = (take(MAP_SOCKET_DROPS)?, take(MAP_CONNECTION_EVENTS)?);
        let uncounted = take(MAP_UNCOUNTED)?;
        let watched = Watched {
            sockets: HashMap::try_from(sockets).map_err(|e| failure("map", &e))?,
            connections: HashMap::try_from(connections).map_err(|e| failure("map", &e))?,
            sources: Slots::default(),
            receivers: Slots::default(),
        };
        Ok(Kernel {
            programs,
            watched: Mutex::new(watched),
            socket_drops: Mutex::new(
                PerCpuHashMap::try_from(drops).map_err(|e| failure("map", &e))?,
            ),
            connection_events: Mutex::new(
                PerCpuHashMap::try_from(events).map_err(|e| failure("map", &e))?,
            ),
            uncounted: Mutex::new(
                PerCpuArray::try_from(uncounted).map_err(|e| failure("map", &e))?,
            ),
            _ebpf: Mutex::new(ebpf),
        })
    }

    pub fn watch(&self, table: Table, cookie: u64, label: &str) -> Result<(), WatchError> {
        let mut w = self.watched.lock().expect("eBPF watch table poisoned");
        let w = &mut *w;
        let (map, slots) = match table {
            Table::Sockets => (&mut w.sockets, &mut w.sources),
            Table::Connections => (&mut w.connections, &mut w.receivers),
        };
        let slot = slots.intern(label).ok_or_else(|| WatchError::SlotsFull(label.into()))?;
        map.insert(cookie, slot, 0).map_err(|e| WatchError::Map(e.to_string()))
    }

    pub fn unwatch(&self, table: Table, cookie: u64) {
        let mut w = self.watched.lock().expect("eBPF watch table poisoned");
        let map = match table {
            Table::Sockets => &mut w.sockets,
            Table::Connections => &mut w.connections,
        };
        // Already evicted (LRU) is fine.
        let _ = map.remove(&cookie);
    }

    /// Reads both counting maps into `out`, naming drop reasons with `reason`.
    pub fn read(
        &self,
        out: &mut KernelCounters,
        reason: impl Fn(u32) -> String,
    ) -> Result<(), aya::maps::MapError> {
        let w = self.watched.lock().expect("eBPF watch table poisoned");
        let drops = self.socket_drops.lock().expect("eBPF map poisoned");
        for entry in drops.iter() {
            let (key, counts) = entry?;
            let (item, kind) = (w.sources.name(key.slot).to_string(), reason(key.reason));
            push(&mut out.socket_drops, &counts, &item, &kind);
        }
        let events = self.connection_events.lock().expect("eBPF map poisoned");
        for entry in events.iter() {
            let (key, counts) = entry?;
            let item = w.receivers.name(key.slot).to_string();
            push(&mut out.connection_events, &counts, &item, super::event_label(key.event));
        }
        let uncounted = self.uncounted.lock().expect("eBPF map poisoned");
        out.uncounted = uncounted.get(&0, 0)?.iter().copied().collect();
        out.socket_drops.sort_by(|a, b| (&a.item, &a.kind, a.cpu).cmp(&(&b.item, &b.kind, b.cpu)));
        out.connection_events
            .sort_by(|a, b| (&a.item, &a.kind, a.cpu).cmp(&(&b.item, &b.kind, b.cpu)));
        Ok(())
    }
}

/// Loads program `name` of `ebpf` and attaches it to BTF tracepoint `tracepoint`.
fn attach(ebpf: &mut Ebpf, btf: &Btf, name: &str, tracepoint: &str) -> Result<(), Failure> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| (State::LoadFailed, format!("program {name} missing")))?
        .try_into()
        .map_err(|e| failure(name, &e))?;
    program.load(tracepoint, btf).map_err(|e| failure(name, &e))?;
    program.attach().map_err(|e| failure(name, &e))?;
    Ok(())
}

/// Where `sock_send_length` finds its fields in the running kernel, from its BTF; each
/// field's size is checked too, since the program reads it as a fixed-size value.
fn sock_offsets() -> Result<SockOffsets, BtfError> {
    let blob = Blob::open(Path::new(SYS_FS))?;
    let btf = super::btf::Btf::parse(&blob)?;
    let member = |outer: &str, path: &[&str], size_bytes: u32| {
        let m = btf.member(outer, path)?;
        if m.size_bytes != size_bytes {
            let why = format!("{path:?} is {} bytes, expected {size_bytes}", m.size_bytes);
            return Err(BtfError::Member(outer.into(), why));
        }
        Ok(m.offset_bytes)
    };
    // `unix_sk(sk)` is a cast: `struct sock sk` must be the first member of `unix_sock`.
    if btf.member("unix_sock", &["sk"])?.offset_bytes != 0 {
        return Err(BtfError::Member("unix_sock".into(), "sk is not its first member".into()));
    }
    Ok(SockOffsets {
        family: member("sock", &["__sk_common", "skc_family"], 2)?,
        cookie: member("sock", &["__sk_common", "skc_cookie"], 8)?,
        unix_peer: member("unix_sock", &["peer"], 8)?,
    })
}

/// One sample per CPU of one key.
fn push(out: &mut Vec<Sample>, counts: &[Count], item: &str, kind: &str) {
    for (cpu, &count) in counts.iter().enumerate() {
        out.push(Sample { cpu: cpu as u32, item: item.into(), kind: kind.into(), count });
    }
}

/// `(state, message)` for an aya error: `NoPermission` if EPERM/EACCES is in its chain.
fn failure(what: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut chain = format!("{what}: {e}");
    let mut denied = false;
    let mut source = e.source();
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            denied |= matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES));
        }
        source = s.source();
    }
    (if denied { State::NoPermission } else { State::LoadFailed }, chain)
}

/// Fails early, with a clear reason, when the process lacks the capabilities to load.
fn check_capabilities() -> Result<(), Failure> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    Err((
        State::NoPermission,
        format!(
            "missing capabilities: needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN \
             (effective set {eff:#x})"
        ),
    ))
}

/// BPF memory is cgroup-accounted on 5.11+; older kernels charge RLIMIT_MEMLOCK. A failure
/// to raise it (no CAP_SYS_RESOURCE) is only worth a warning.
fn raise_memlock() {
    let infinity = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct is passed by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &infinity) } != 0 {
        tracing::warn!(
            "cannot raise RLIMIT_MEMLOCK ({}); fine on kernels that account BPF memory to \
             the cgroup (5.11+)",
            std::io::Error::last_os_error()
        );
    }
}
