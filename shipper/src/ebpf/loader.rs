//! Loading the embedded object with aya, or adopting what a previous process attached, and
//! the maps' userspace side.
//!
//! The programs are attached through links this module owns (`BPF_RAW_TRACEPOINT_OPEN`, the
//! call aya makes too), so that a takeover can hand the links and the maps to the next
//! process: a program stays attached while any process holds its link.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use shipper_ebpf::{
    ConnectionKey, Count, SockOffsets, SocketDropKey, GLOBAL_SOCK_OFFSETS, MAP_CONNECTION_EVENTS,
    MAP_SOCKET_DROPS, MAP_UNCOUNTED, MAP_WATCHED_CONNECTIONS, MAP_WATCHED_SOCKETS, PROGRAMS,
    PROGRAM_UNIX_REFUSALS,
};

use super::btf::{Blob, BtfError, SYS_FS};
use super::reasons::Reasons;
use super::{Handing, KernelCounters, Sample, Slots, State, Table, WatchError};

/// The object built by build.rs from `shipper-ebpf` (eBPF bytecode, BTF, maps).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shipper-probes"));

/// The maps, in the order their descriptors are handed over.
const MAPS: [&str; super::MAPS_HANDED] = [
    MAP_WATCHED_SOCKETS,
    MAP_WATCHED_CONNECTIONS,
    MAP_SOCKET_DROPS,
    MAP_CONNECTION_EVENTS,
    MAP_UNCOUNTED,
];

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The attached programs (kept attached for the life of the process, or until a takeover's
/// next process holds them) and their maps.
pub struct Kernel {
    /// Names of the programs attached, in attach order.
    pub programs: Vec<String>,
    /// One link per program: closing the last descriptor of a link detaches its program.
    links: Vec<OwnedFd>,
    /// The maps' descriptors, in [`MAPS`] order, for a handover.
    maps: Vec<OwnedFd>,
    /// Set once handed over: the maps are the next process's, this one no longer unwatches.
    handed: AtomicBool,
    /// This kernel's drop-reason names.
    reasons: Reasons,
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

/// The embedded object's identity: a process adopts only programs built from the same bytes.
pub fn object_digest() -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, OBJECT);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

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
        let (offsets, reasons) = read_kernel_btf();
        let mut loader = EbpfLoader::new();
        if let Ok(offsets) = &offsets {
            loader.override_global(GLOBAL_SOCK_OFFSETS, offsets, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| failure("loading the object", &e))?;
        drop(loader);
        let no_btf = |e: &dyn std::fmt::Display| (State::NoBtf, format!("kernel BTF: {e}"));
        let blob = Blob::open(Path::new(SYS_FS)).map_err(|e| no_btf(&e))?;
        let btf = Btf::parse(&blob, Endianness::default()).map_err(|e| no_btf(&e))?;
        let (mut programs, mut links) = (Vec::new(), Vec::new());
        for (name, tracepoint) in PROGRAMS {
            links.push(attach(&mut ebpf, &btf, name, tracepoint)?);
            programs.push(name.to_string());
        }
        // Without the offsets, everything but the unix refusals is still counted.
        match offsets {
            Ok(_) => {
                let (name, tracepoint) = PROGRAM_UNIX_REFUSALS;
                links.push(attach(&mut ebpf, &btf, name, tracepoint)?);
                programs.push(name.to_string());
            }
            Err(e) => tracing::warn!(
                "unix datagram refusals not counted (program {} not attached): {e}",
                PROGRAM_UNIX_REFUSALS.0
            ),
        }
        let mut maps = Vec::new();
        for name in MAPS {
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| (State::LoadFailed, format!("map {name} missing")))?;
            maps.push(map_data(map).map_err(|why| (State::LoadFailed, format!("{name}: {why}")))?);
        }
        // The links hold the programs, and the maps are out: the rest of the object goes.
        drop(ebpf);
        Kernel::with(programs, links, maps, [Slots::default(), Slots::default()], reasons)
    }

    /// Takes over the programs a previous process attached, described by `handing`, with the
    /// descriptors it sent ([`MAPS`], then one link per program). Needs no capability (on
    /// kernels before 6.5 with unprivileged BPF disabled, map access needs CAP_BPF).
    pub fn adopt(handing: &Handing, fds: Vec<OwnedFd>) -> Result<Kernel, Failure> {
        let fail = |why: String| (State::LoadFailed, format!("adopting: {why}"));
        if handing.object != object_digest() {
            return Err(fail("the previous process runs other programs (another build)".into()));
        }
        if handing.programs.len() > super::PROGRAMS_MAX || fds.len() != handing.descriptors() {
            let why = format!("{} descriptors for {:?}", fds.len(), handing.programs);
            return Err(fail(why));
        }
        let mut fds = fds.into_iter();
        let mut maps = Vec::new();
        for (name, fd) in MAPS.iter().zip(fds.by_ref()) {
            maps.push(MapData::from_fd(fd).map_err(|e| fail(format!("map {name}: {e}")))?);
        }
        let links = fds.collect();
        let slots = [&handing.sources, &handing.receivers].map(|n| Slots::from_names(n.clone()));
        let reasons = Reasons::from(handing.reasons.clone());
        Kernel::with(handing.programs.clone(), links, maps, slots, reasons)
    }

    /// The kernel with `links` attached, its `maps` (in [`MAPS`] order), its source and
    /// receiver slots and its drop-reason names.
    fn with(
        programs: Vec<String>,
        links: Vec<OwnedFd>,
        maps: Vec<MapData>,
        [sources, receivers]: [Slots; 2],
        reasons: Reasons,
    ) -> Result<Kernel, Failure> {
        let fail = |e: &dyn std::fmt::Display| (State::LoadFailed, format!("map: {e}"));
        let mut fds = Vec::new();
        for m in &maps {
            fds.push(m.fd().as_fd().try_clone_to_owned().map_err(|e| fail(&e))?);
        }
        let mut maps = maps.into_iter().map(|m| Map::from_map_data(m).map_err(|e| fail(&e)));
        let mut next = || maps.next().expect("one per name in MAPS");
        let watched = Watched {
            sockets: HashMap::try_from(next()?).map_err(|e| fail(&e))?,
            connections: HashMap::try_from(next()?).map_err(|e| fail(&e))?,
            sources,
            receivers,
        };
        let drops = PerCpuHashMap::try_from(next()?).map_err(|e| fail(&e))?;
        let events = PerCpuHashMap::try_from(next()?).map_err(|e| fail(&e))?;
        let uncounted = PerCpuArray::try_from(next()?).map_err(|e| fail(&e))?;
        Ok(Kernel {
            programs,
            links,
            maps: fds,
            handed: AtomicBool::new(false),
            reasons,
            watched: Mutex::new(watched),
            socket_drops: Mutex::new(drops),
            connection_events: Mutex::new(events),
            uncounted: Mutex::new(uncounted),
        })
    }

    /// What a takeover hands the next process, and duplicates of the maps' and links'
    /// descriptors. From here on, this process leaves the watch tables alone.
    pub fn hand_over(&self) -> std::io::Result<(Handing, Vec<OwnedFd>)> {
        let w = self.watched.lock().expect("eBPF watch table poisoned");
        let mut fds = Vec::new();
        for fd in self.maps.iter().chain(&self.links) {
            fds.push(fd.try_clone()?);
        }
        self.handed.store(true, Ordering::Relaxed);
        let handing = Handing {
            object: object_digest(),
            programs: self.programs.clone(),
            sources: w.sources.names().to_vec(),
            receivers: w.receivers.names().to_vec(),
            reasons: self.reasons.names(),
        };
        Ok((handing, fds))
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
        // Handed over: the next process may watch the same socket (handed too) now.
        if self.handed.load(Ordering::Relaxed) {
            return;
        }
        let mut w = self.watched.lock().expect("eBPF watch table poisoned");
        let map = match table {
            Table::Sockets => &mut w.sockets,
            Table::Connections => &mut w.connections,
        };
        // Already evicted (LRU) is fine.
        let _ = map.remove(&cookie);
    }

    /// Reads both counting maps into `out`, drop reasons by name.
    pub fn read(&self, out: &mut KernelCounters) -> Result<(), aya::maps::MapError> {
        let w = self.watched.lock().expect("eBPF watch table poisoned");
        let drops = self.socket_drops.lock().expect("eBPF map poisoned");
        for entry in drops.iter() {
            let (key, counts) = entry?;
            let (item, kind) =
                (w.sources.name(key.slot).to_string(), self.reasons.name(key.reason));
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

/// Loads program `name` of `ebpf` and attaches it to BTF tracepoint `tracepoint`; returns
/// the link, which keeps it attached while open.
fn attach(ebpf: &mut Ebpf, btf: &Btf, name: &str, tracepoint: &str) -> Result<OwnedFd, Failure> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| (State::LoadFailed, format!("program {name} missing")))?
        .try_into()
        .map_err(|e| failure(name, &e))?;
    program.load(tracepoint, btf).map_err(|e| failure(name, &e))?;
    let prog = program.fd().map_err(|e| failure(name, &e))?;
    raw_tracepoint_open(prog.as_fd().as_raw_fd()).map_err(|e| failure(name, &e))
}

/// `bpf(BPF_RAW_TRACEPOINT_OPEN)` for a `tp_btf` program (its tracepoint is in the program,
/// so no name): the link's descriptor.
fn raw_tracepoint_open(prog_fd: i32) -> std::io::Result<OwnedFd> {
    /// `union bpf_attr`'s `raw_tracepoint` member as every kernel since 4.17 reads it.
    #[repr(C)]
    struct RawTracepoint {
        name: u64,
        prog_fd: u32,
        pad: u32,
    }
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    let attr = RawTracepoint { name: 0, prog_fd: prog_fd as u32, pad: 0 };
    let size = std::mem::size_of::<RawTracepoint>() as libc::c_long;
    // SAFETY: bpf(2) reads `size` bytes of `attr`, which lives across the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_RAW_TRACEPOINT_OPEN, &attr, size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The data of one of the object's maps (each of a kind the object uses).
fn map_data(map: Map) -> Result<MapData, String> {
    match map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::Array(d) => Ok(d),
        other => Err(format!("unexpected kind of map {other:?}")),
    }
}

/// From one parse of the running kernel's BTF: the offsets `sock_send_length` needs, and the
/// drop-reason names (empty when the BTF cannot be read; the offsets say why).
fn read_kernel_btf() -> (Result<SockOffsets, BtfError>, Reasons) {
    let blob = match Blob::open(Path::new(SYS_FS)) {
        Ok(blob) => blob,
        Err(e) => return (Err(e), Reasons::from(BTreeMap::new())),
    };
    match super::btf::Btf::parse(&blob) {
        Ok(btf) => (sock_offsets(&btf), Reasons::from_btf(&btf)),
        Err(e) => (Err(e), Reasons::from(BTreeMap::new())),
    }
}

/// Where `sock_send_length` finds its fields in the running kernel; each field's size is
/// checked too, since the program reads it as a fixed-size value.
fn sock_offsets(btf: &super::btf::Btf<'_>) -> Result<SockOffsets, BtfError> {
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

/// `(state, message)` for an error: `NoPermission` if EPERM/EACCES is in its chain.
fn failure(what: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut chain = what.to_string();
    let mut denied = false;
    let mut source = Some(e);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A handover is adopted only from the same build, with exactly its descriptors: the
    /// digest is checked before any descriptor is used (these are not even maps).
    #[test]
    fn adopting_refuses_other_programs_and_a_wrong_count_of_descriptors() {
        let files = || (0..6).map(|_| OwnedFd::from(tempfile::tempfile().unwrap())).collect();
        let mut handing = Handing {
            object: "0".repeat(64),
            programs: vec!["kfree_skb".into()],
            ..Handing::default()
        };
        let Err((_, why)) = Kernel::adopt(&handing, files()) else { panic!("adopted") };
        assert!(why.contains("other programs"), "{why}");
        handing.object = object_digest();
        handing.programs.push("tcp_send_reset".into());
        let Err((_, why)) = Kernel::adopt(&handing, files()) else { panic!("adopted") };
        assert!(why.contains("6 descriptors"), "{why}");
        handing.programs.pop();
        let Err((_, why)) = Kernel::adopt(&handing, files()) else { panic!("adopted") };
        assert!(why.contains("map WATCHED_SOCKETS"), "not a map: {why}");
        assert_eq!(object_digest().len(), 64);
    }
}
