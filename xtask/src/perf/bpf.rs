//! What the kernel says about BPF programs, for the cases that compare a shipper with and
//! without its own: the links a process holds (`/proc/PID/fdinfo` of its `anon_inode:bpf_link`
//! descriptors: link type, tracepoint, program id), other processes' tracing programs, and how
//! often and how long each program ran (`run_cnt`, `run_time_ns` in the fdinfo of its
//! `anon_inode:bpf-prog` descriptor, kept by the kernel while statistics are on).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One BPF link held by a process.
#[derive(Clone, Debug)]
pub struct Link {
    /// `raw_tracepoint`, `tracing`, `perf_event`, `cgroup`, ...
    pub kind: String,
    /// The tracepoint, for tracepoint links (`kfree_skb`).
    pub tracepoint: Option<String>,
    pub prog_id: u64,
}

impl Link {
    /// Whether its program runs on kernel events host-wide (rather than for one cgroup,
    /// device or socket).
    pub fn is_tracing(&self) -> bool {
        matches!(self.kind.as_str(), "tracing" | "raw_tracepoint" | "perf_event")
            || self.kind.contains("kprobe")
    }

    /// `raw_tracepoint:kfree_skb`, or the kind alone.
    pub fn name(&self) -> String {
        self.tracepoint.as_ref().map_or(self.kind.clone(), |tp| format!("{}:{tp}", self.kind))
    }
}

/// The fdinfo text of every descriptor of `pid` that links to `target`
/// (`anon_inode:bpf_link`, `anon_inode:bpf-prog`).
fn fdinfos(pid: u32, target: &str) -> Vec<String> {
    let mut out = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target) {
            let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            out.push(std::fs::read_to_string(info).unwrap_or_default());
        }
    }
    out
}

/// A `name:\tvalue` field of an fdinfo text.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| Some(l.strip_prefix(name)?.trim().to_string()))
}

/// Every BPF link `pid` holds open, sorted by name.
pub fn links(pid: u32) -> Vec<Link> {
    let mut links: Vec<Link> = fdinfos(pid, "anon_inode:bpf_link")
        .iter()
        .map(|text| Link {
            kind: field(text, "link_type:").unwrap_or_else(|| "?".into()),
            tracepoint: field(text, "tp_name:"),
            prog_id: field(text, "prog_id:").and_then(|v| v.parse().ok()).unwrap_or(0),
        })
        .collect();
    links.sort_by_key(Link::name);
    links
}

/// Processes other than `ours` holding tracing links, as `comm[pid]: tracepoint, ...`: their
/// programs run on the whole host whatever `ours` does (on a shared machine, another
/// engineer's shipper tests).
pub fn foreign(ours: u32) -> Vec<String> {
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let tracing: Vec<String> = links(pid)
            .iter()
            .filter(|l| l.is_tracing())
            .map(|l| l.tracepoint.clone().unwrap_or_else(|| l.kind.clone()))
            .collect();
        if pid != ours && !tracing.is_empty() {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("{}[{pid}]: {}", comm.trim(), tracing.join(", ")));
        }
    }
    found.sort();
    found
}

/// Waits up to `limit` until no process but `ours` holds tracing links; returns the seconds
/// waited.
pub fn wait_quiet(ours: u32, limit: Duration) -> f64 {
    let t0 = Instant::now();
    while !foreign(ours).is_empty() && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(500));
    }
    t0.elapsed().as_secs_f64()
}

/// Turns the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`)
/// for as long as the returned descriptor is open. While on, every program run on the host
/// also reads the clock twice, in every variant alike.
pub fn enable_stats() -> std::io::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr, zeroed: enable_stats.type = BPF_STATS_RUN_TIME (0).
    let attr = [0u64; 16];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`, which outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), std::mem::size_of_val(&attr))
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How often each program of `pid` ran and for how long, by the tracepoint its link attaches
/// it to: tracepoint -> (runs, nanoseconds). Zero while statistics are off.
pub fn runs(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut by_prog: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for text in fdinfos(pid, "anon_inode:bpf-prog") {
        let num = |name: &str| field(&text, name).and_then(|v| v.parse::<u64>().ok());
        if let Some(id) = num("prog_id:") {
            by_prog.insert(id, (num("run_cnt:").unwrap_or(0), num("run_time_ns:").unwrap_or(0)));
        }
    }
    links(pid)
        .iter()
        .filter_map(|l| Some((l.tracepoint.clone()?, *by_prog.get(&l.prog_id)?)))
        .collect()
}
