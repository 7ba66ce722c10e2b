//! The `udp` case kind: the UDP syslog source (`[[sources.socket]] transport = "udp"`) shipping
//! to a real `shipper receive`, once with the shipper's eBPF programs attached and once with
//! `--no-ebpf`, in the same run: `runs` pairs of trials, the two variants of a pair back to
//! back, in the order A B, then B A, and so on (each variant goes first as often as the other,
//! so a drift over the run, such as a neighbour's build starting, cancels in the paired
//! differences instead of favouring whichever variant runs second).
//!
//! **Paced, not flooded.** One sender sends the case's deterministic syslog datagrams
//! ([`crate::loadgen::syslog_datagrams`]) at a fixed rate below what the shipper's one pinned
//! CPU can take, and the case compares the shipper's CPU-seconds per million datagrams. A flood
//! on a 2-core machine would compare something else: the kernel drops whatever the shipper
//! cannot read, so received/s measures how the scheduler shares CPU between the sender, the
//! shipper, the receiver and the neighbours' compilers (which moved wall-clock figures of the
//! other cases up to 8× between runs), and the eBPF program that runs per dropped packet runs
//! in the *sender's* softirq, slowing the sender rather than the shipper. At a fixed rate both
//! variants get the same datagrams at the same pace, nothing needs to be dropped, and CPU per
//! datagram is the figure that stays put (as in `pipe-latency`). Throughput is still measured:
//! datagrams received and delivered per second (both the rate, when the shipper keeps up),
//! datagrams per CPU-second (what one core could take), and drops.
//!
//! Per trial: a fresh receiver and shipper (so the programs are loaded and unloaded with it);
//! before sending, the metrics must show `shipper_ebpf_attached{state="attached"} 1` (or
//! `state="disabled"` with `--no-ebpf`) and the shipper must hold BPF links (or none), else the
//! case fails: a variant that is not what it claims measures nothing. Then the datagrams are
//! sent, and the trial is complete when every datagram is received or dropped by the kernel
//! (the socket's `drops` column in `/proc/net/udp`, which does not depend on the programs; with
//! them, their count must reach the same number) and every received one is acknowledged or
//! counted as dropped by the shipper. It is timed from the first datagram sent to the
//! receiver's last output write (read every 10 ms). The shipper's CPU is read from the
//! scheduler's nanosecond run times (`/proc/PID/task/*/schedstat`), since the 10 ms ticks of
//! `/proc/PID/stat` are too coarse for a 2% question; the tick figure is kept beside it.
//! Tracing BPF links held by *other* processes during a trial (another engineer's shipper
//! tests) are recorded, since their programs run host-wide whatever our variant is.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shipper::metrics::text::sum;

use super::bpf;
use super::pipe::{self, Cpus};
use super::{cpus_busy_s, proc_cpu, proc_cpu_ns, proc_cpu_split, proc_ctx_switches};
use super::{proc_hwm_kib, proc_minor_faults, proc_status_kib, proc_threads_cpu_ns};
use crate::daemon::{free_port, Daemon};
use crate::loadgen::{self, SyslogShape, SyslogSyntax};

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct UdpCase {
    pub kind: String,
    pub description: String,
    pub optimises: String,
    /// Pairs of trials (one trial per variant) in a full run (`--runs N` overrides; quick
    /// runs do one pair).
    pub runs: usize,
    pub workload: UdpWorkload,
    pub shipper: Settings,
    #[serde(default)]
    pub cpus: Cpus,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct UdpWorkload {
    /// Datagrams per trial, in a full and in a quick run.
    pub datagrams: usize,
    pub quick_datagrams: usize,
    /// Datagrams per second from the one sender; 0 = as fast as it can.
    pub rate: u64,
    /// `rfc5424` or `rfc3164`: what the sender sends and the source's `format`.
    pub format: String,
    /// How many apps (APP-NAME / TAG) send: the first of `loadgen::APPS`, at most 16.
    pub apps: usize,
    /// Zipf exponent of the apps' shares (0: even).
    #[serde(default)]
    pub skew: f64,
    #[serde(default = "super::default_seed")]
    pub seed: u64,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub workers: usize,
    pub zstd_level: u32,
    /// The source's `receive_buffer_bytes` (the kernel caps it at net.core.rmem_max).
    pub receive_buffer_bytes: u64,
}

/// The two shippers compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Attached,
    NoEbpf,
}

impl Variant {
    const ALL: [Variant; 2] = [Variant::Attached, Variant::NoEbpf];

    fn label(self) -> &'static str {
        match self {
            Variant::Attached => "eBPF attached",
            Variant::NoEbpf => "--no-ebpf",
        }
    }

    /// The `state` label and value `shipper_ebpf_attached` must show.
    fn expected(self) -> (&'static str, f64) {
        match self {
            Variant::Attached => ("attached", 1.0),
            Variant::NoEbpf => ("disabled", 0.0),
        }
    }

    /// For directory names.
    fn slug(self) -> &'static str {
        match self {
            Variant::Attached => "attached",
            Variant::NoEbpf => "no-ebpf",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Attached => &[],
            Variant::NoEbpf => &["--no-ebpf"],
        }
    }
}

/// The datagrams of a trial, generated once per case: datagram `k` is
/// `data[ends[k - 1]..ends[k]]` (from 0 for the first).
struct Load {
    data: Arc<Vec<u8>>,
    ends: Arc<Vec<usize>>,
    bytes_min: usize,
    bytes_max: usize,
}

impl Load {
    fn count(&self) -> u64 {
        self.ends.len() as u64
    }

    fn bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

fn load(w: &UdpWorkload, quick: bool) -> anyhow::Result<Load> {
    let syntax = match w.format.as_str() {
        "rfc5424" => SyslogSyntax::Rfc5424,
        "rfc3164" => SyslogSyntax::Rfc3164,
        other => bail!("workload.format {other:?}: rfc5424 or rfc3164"),
    };
    if w.apps == 0 || w.apps > loadgen::APPS.len() {
        bail!("workload.apps {}: 1 to {}", w.apps, loadgen::APPS.len());
    }
    let shape = SyslogShape {
        seed: w.seed,
        syntax,
        apps_cdf: loadgen::service_weights(w.apps, w.skew, 0.0),
    };
    let n = if quick { w.quick_datagrams } else { w.datagrams };
    let (mut data, mut ends) = (Vec::new(), Vec::with_capacity(n));
    loadgen::syslog_datagrams(&shape, n, &mut data, &mut ends);
    let sizes = ends.iter().scan(0, |from, &end| Some(end - std::mem::replace(from, end)));
    let (bytes_min, bytes_max) = sizes.fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    Ok(Load { data: Arc::new(data), ends: Arc::new(ends), bytes_min, bytes_max })
}

/// One trial: one variant, one repetition.
#[derive(Serialize, Default, Clone, Debug)]
struct Trial {
    label: String,
    /// Pair number (from 1) and place in the run (from 1).
    pair: usize,
    order: usize,
    /// `state` of `shipper_ebpf_attached`, and the BPF links the shipper held.
    ebpf_state: String,
    bpf_links: Vec<String>,
    sent: u64,
    /// The sender's first to last datagram (s), its rate, and the most datagrams it was
    /// behind its schedule at any moment, as time at the case's rate (ms).
    send_s: f64,
    sent_per_s: f64,
    sender_behind_max_ms: f64,
    /// Datagrams the source read (`shipper_socket_messages_received_total`), and per second
    /// from the first datagram sent until the socket's receive queue was empty after the last
    /// (`received_s`; a flood leaves a full queue behind the sender).
    received: u64,
    received_s: f64,
    received_per_s: f64,
    /// Records acknowledged by the receiver, per second from the first datagram sent to the
    /// receiver's last output write (`wall_s`).
    acked: u64,
    wall_s: f64,
    delivered_per_s: f64,
    /// Datagrams the kernel dropped on the source's socket (`/proc/net/udp`), and what the
    /// eBPF programs counted of them (attached only).
    kernel_drops: u64,
    kernel_drops_counted: u64,
    /// Records the shipper dropped (`shipper_lines_dropped_total`), and messages that did
    /// not parse as syslog (passed on as text).
    shipper_dropped: u64,
    parse_failures: u64,
    /// The shipper's CPU-seconds over the trial (scheduler run time), per million datagrams
    /// received, datagrams per CPU-second, and the same CPU from /proc ticks.
    cpu_s: f64,
    cpu_s_per_million: f64,
    datagrams_per_cpu_s: f64,
    cpu_s_ticks: f64,
    /// The shipper's CPU-seconds by thread name (`worker-0`, `ebpf`: the map reader, ...).
    thread_cpu_s: BTreeMap<String, f64>,
    /// The shipper's user and system CPU-seconds (ticks).
    cpu_user_s: f64,
    cpu_system_s: f64,
    /// The shipper's minor page faults over the trial, per million datagrams received.
    minor_faults_per_million: f64,
    /// The shipper's voluntary context switches (sleeps: each a wakeup to read) and
    /// involuntary ones (preempted), per datagram received.
    sleeps_per_datagram: f64,
    preemptions_per_datagram: f64,
    /// CPU-seconds that everything else ran on the shipper's CPUs during the trial (the
    /// neighbours' load the shipper competed with; 10 ms ticks), per second of the trial.
    others_on_shipper_cpus: f64,
    /// The sender thread's CPU-seconds per million datagrams sent (on loopback this holds the
    /// kernel's UDP receive path and its drops, where the kfree_skb program runs).
    sender_cpu_s_per_million: f64,
    /// The shipper's peak RSS (VmHWM) and its RSS at the end of the trial (VmRSS).
    peak_rss_kib: u64,
    rss_kib: u64,
    receiver_cpu_s: f64,
    /// How often the shipper's programs ran during the trial and for how long, by tracepoint
    /// (runs, ns; the kernel's BPF statistics, on for the whole case), and in all per datagram.
    program_runs: BTreeMap<String, (u64, u64)>,
    program_ns_per_datagram: f64,
    /// Seconds waited before the trial for other processes' tracing BPF programs to go, and
    /// those seen anyway at its start or end (`comm[pid]: tracepoint, ...`).
    quiet_wait_s: f64,
    foreign_links: Vec<String>,
}

struct Env<'a> {
    dir: &'a Path,
    case: &'a UdpCase,
    pki: &'a shipper::tls::pki::DevPki,
    load: &'a Load,
    deadline: Duration,
    /// How long a trial waits for other processes' tracing programs to go.
    quiet_wait: Duration,
}

const SOURCE: &str = "syslog-udp";
const RECEIVED: &str = "shipper_socket_messages_received_total";
const ACKED: &str = "shipper_records_acked_total";
const DROPPED: &str = "shipper_lines_dropped_total";
const COUNTED: &str = "shipper_kernel_datagrams_dropped_total";

pub fn run_case(
    name: &str,
    case: &UdpCase,
    quick: bool,
    runs: Option<usize>,
    command: &str,
) -> anyhow::Result<()> {
    let load = load(&case.workload, quick)?;
    let w = &case.workload;
    println!(
        "\n== {name}: {} ({} {} datagrams per trial, {:.0} bytes on average, {})",
        case.description,
        load.count(),
        w.format,
        load.bytes() as f64 / load.count().max(1) as f64,
        rate_text(w.rate),
    );
    let load_average_before = load_average();
    let pairs = if quick { 1 } else { runs.unwrap_or(case.runs) };
    let dir = super::tempdir()?;
    let pki =
        shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let deadline = Duration::from_secs(if quick { 60 } else { 300 });
    let quiet_wait = Duration::from_secs(if quick { 0 } else { 60 });
    // This thread polls and scrapes during the trials: keep it off the shipper's CPUs.
    let _pinned = super::pin_current_thread_for(&case.cpus.loadgen);
    // The kernel's per-program run counts and times, for every trial of the case alike.
    let stats = bpf::enable_stats();
    if let Err(e) = &stats {
        println!("   note: BPF run-time statistics unavailable ({e}): program runs show as 0");
    }
    let env = Env { dir: &dir, case, pki: &pki, load: &load, deadline, quiet_wait };
    let all = run_pairs(&env, pairs)?;
    drop(stats);
    let _ = std::fs::remove_dir_all(&dir);
    let figure = Figure::of(&case.optimises);
    let medians: Vec<Trial> = all.iter().map(|t| median(t, figure)).collect();
    let diff = Difference::new(&all, &medians, figure);
    let md = markdown(name, quick, case, &load, &medians, &all, &diff);
    println!("\n{md}");
    let charts = charts(name, quick, figure, &medians, &all)?;
    let run = super::Run {
        name,
        description: &case.description,
        optimises: &case.optimises,
        quick,
        command,
    };
    let fields = serde_json::json!({
        "case_toml": case,
        "datagrams": load.count(),
        "bytes": load.bytes(),
        "datagram_bytes_min": load.bytes_min,
        "datagram_bytes_max": load.bytes_max,
        "load_average": [load_average_before, load_average()],
        "variants": medians,
        "difference": diff,
        "runs": all,
        "charts": charts,
    });
    super::save(&run, fields, Some(&md))?;
    for t in &medians {
        if t.received == 0 || t.acked == 0 {
            bail!(
                "{name}: {} received {} and delivered {} datagrams",
                t.label,
                t.received,
                t.acked
            );
        }
    }
    Ok(())
}

/// `pairs` pairs of trials, A B then B A; the trials of each variant, in `Variant::ALL`'s
/// order.
fn run_pairs(env: &Env, pairs: usize) -> anyhow::Result<Vec<Vec<Trial>>> {
    let mut all: Vec<Vec<Trial>> = vec![Vec::new(); Variant::ALL.len()];
    for pair in 0..pairs {
        let first = pair % 2;
        for (k, i) in [first, 1 - first].into_iter().enumerate() {
            let v = Variant::ALL[i];
            let mut t =
                trial(env, v, pair).with_context(|| format!("{}, pair {}", v.label(), pair + 1))?;
            (t.pair, t.order) = (pair + 1, pair * 2 + k + 1);
            print_trial(&t, pairs);
            all[i].push(t);
        }
    }
    Ok(all)
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes): the neighbours' load.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn rate_text(rate: u64) -> String {
    if rate > 0 {
        format!("{} datagrams/s", super::report::thousands(rate as f64))
    } else {
        "as fast as possible".into()
    }
}

/// The median trial by `figure` (the upper one of an even count).
fn median(trials: &[Trial], figure: Figure) -> Trial {
    let mut sorted = trials.to_vec();
    sorted.sort_by(|a, b| figure.value(a).total_cmp(&figure.value(b)));
    sorted[sorted.len() / 2].clone()
}

fn print_trial(t: &Trial, pairs: usize) {
    println!(
        "   {:<14} pair {}/{pairs}: {:>8.0} received/s {:>8.0} delivered/s {:>7.3} CPU-s \
         {:>6.3} CPU-s/M datagrams  {:.2} sleeps/datagram  others on its CPU {:.2}  kernel \
         drops {}  behind {:.1} ms  programs {:.1} ns/datagram{}",
        t.label,
        t.pair,
        t.received_per_s,
        t.delivered_per_s,
        t.cpu_s,
        t.cpu_s_per_million,
        t.sleeps_per_datagram,
        t.others_on_shipper_cpus,
        t.kernel_drops,
        t.sender_behind_max_ms,
        t.program_ns_per_datagram,
        if t.foreign_links.is_empty() {
            String::new()
        } else {
            format!("  (other tracing programs: {})", t.foreign_links.join(", "))
        },
    );
}

/// The shipper's side of one trial, from start to stop.
struct Started {
    receiver: Daemon,
    ship: Daemon,
    smetrics: String,
    udp: u16,
    out: PathBuf,
}

fn start(env: &Env, v: Variant, dir: &Path) -> anyhow::Result<Started> {
    let case = env.case;
    let (rx, rm, sm, udp) = (free_port()?, free_port()?, free_port()?, free_udp_port()?);
    let rworkers = if case.cpus.receiver.is_empty() { 2 } else { case.cpus.receiver.len() };
    let rcfg = pipe::receiver_config(dir, "receiver", env.pki, rx, rm, rworkers)?;
    let s = &case.shipper;
    let body = format!(
        "[[sources.socket]]\nname = \"{SOURCE}\"\ntransport = \"udp\"\n\
         address = \"127.0.0.1:{udp}\"\nformat = \"{}\"\nreceive_buffer_bytes = {}\n\
         [batch]\nzstd_level = {}\n",
        case.workload.format, s.receive_buffer_bytes, s.zstd_level
    );
    let scfg = dir.join("edge.toml");
    let receivers = format!("primary = [\"127.0.0.1:{rx}\"]\n");
    pipe::shipper_config(&scfg, env.pki, s.workers, sm, &[], &body, &receivers)?;
    let bin = crate::root().join("target/release/shipper");
    let (rmetrics, smetrics) = (format!("127.0.0.1:{rm}"), format!("127.0.0.1:{sm}"));
    let rlog = dir.join("receiver.log");
    let receiver = Daemon::start_on(&case.cpus.receiver, &bin, "receive", &rcfg, &rlog, &rmetrics)?;
    let cfg = scfg.to_string_lossy();
    let mut args = vec!["run", "--config", &cfg];
    args.extend(v.flags());
    let slog = dir.join("shipper.log");
    let ship = Daemon::start_args(&case.cpus.shipper, &bin, &args, &slog, &smetrics)?;
    Ok(Started { receiver, ship, smetrics, udp, out: dir.join("receiver-out") })
}

/// Runs variant `v` once: starts it, checks it is what it claims, sends, waits until every
/// datagram is accounted for.
fn trial(env: &Env, v: Variant, pair: usize) -> anyhow::Result<Trial> {
    let dir = env.dir.join(format!("pair{pair}-{}", v.slug()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let quiet_wait_s = bpf::wait_quiet(0, env.quiet_wait);
    let s = start(env, v, &dir)?;
    let limit = (env.deadline, dir.as_path());
    let workers = env.case.shipper.workers as f64;
    let ready = super::until("the UDP source bound", &s.smetrics, limit, (|| 0, 0), |t| {
        sum(t, "shipper_socket_info", &[("transport", "udp")]) >= workers
    })?;
    let pid = s.ship.pid();
    let mut t = Trial { label: v.label().into(), quiet_wait_s, ..Trial::default() };
    (t.ebpf_state, t.bpf_links) = check_variant(v, &ready.text, pid)?;
    let mut foreign = bpf::foreign(pid);
    let before = Snapshot::take(&s, &env.case.cpus.shipper);
    let sent = send(env, v, s.udp)?;
    let drained = drained(s.udp, env.deadline, &dir)?;
    let out = || super::files_bytes(&s.out, "log");
    let n = sent.datagrams as f64;
    let attached = v == Variant::Attached;
    let what = "every datagram received or dropped, and acknowledged";
    let end = super::until(what, &s.smetrics, limit, (out, out()), |text| {
        let (received, drops) = (sum(text, RECEIVED, &[]), udp_drops(s.udp) as f64);
        received + drops >= n
            && sum(text, ACKED, &[]) + sum(text, DROPPED, &[]) >= received
            && (!attached || sum(text, COUNTED, &[("source", SOURCE)]) >= drops)
    })?;
    let after = Snapshot::take(&s, &env.case.cpus.shipper);
    t.kernel_drops = udp_drops(s.udp);
    check_variant(v, &end.text, pid).context("at the end of the trial")?;
    foreign.extend(bpf::foreign(pid));
    foreign.sort();
    foreign.dedup();
    t.foreign_links = foreign;
    counts(&mut t, &end.text, &sent, env.case.workload.rate);
    t.received_s = (drained - before.at).as_secs_f64();
    t.received_per_s = t.received as f64 / t.received_s.max(1e-9);
    t.wall_s = (end.last.unwrap_or(end.at) - before.at).as_secs_f64();
    t.delivered_per_s = t.acked as f64 / t.wall_s.max(1e-9);
    costs(&mut t, &before, &after, !env.case.cpus.shipper.is_empty());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(t)
}

/// The counts of a trial from the shipper's last scrape `text` and the sender's report.
fn counts(t: &mut Trial, text: &str, sent: &loadgen::Sent, rate: u64) {
    t.received = sum(text, RECEIVED, &[("source", SOURCE)]) as u64;
    t.acked = sum(text, ACKED, &[]) as u64;
    t.shipper_dropped = sum(text, DROPPED, &[]) as u64;
    t.kernel_drops_counted = sum(text, COUNTED, &[("source", SOURCE)]) as u64;
    t.parse_failures = sum(text, "shipper_socket_parse_failures_total", &[]) as u64;
    t.sent = sent.datagrams;
    t.send_s = sent.send_s;
    t.sent_per_s = sent.datagrams as f64 / sent.send_s.max(1e-9);
    let rate = rate as f64;
    t.sender_behind_max_ms = if rate > 0.0 { sent.behind_max as f64 / rate * 1e3 } else { 0.0 };
    t.sender_cpu_s_per_million = sent.cpu_s / (sent.datagrams.max(1) as f64 / 1e6);
}

/// What the shipper (and beside it the receiver and the shipper's CPUs) had used at one
/// moment: a trial's costs are the difference of two.
struct Snapshot {
    at: Instant,
    pid: u32,
    cpu_s: f64,
    ticks_s: f64,
    user_system_s: (f64, f64),
    faults: u64,
    switches: (u64, u64),
    threads: BTreeMap<String, f64>,
    runs: BTreeMap<String, (u64, u64)>,
    receiver_cpu_s: f64,
    /// Busy time of the shipper's CPUs, everyone's.
    cpus_busy_s: f64,
}

impl Snapshot {
    fn take(s: &Started, cpus: &[usize]) -> Snapshot {
        let pid = s.ship.pid();
        Snapshot {
            at: Instant::now(),
            pid,
            cpu_s: proc_cpu_ns(pid),
            ticks_s: proc_cpu(pid),
            user_system_s: proc_cpu_split(pid),
            faults: proc_minor_faults(pid),
            switches: proc_ctx_switches(pid),
            threads: proc_threads_cpu_ns(pid),
            runs: bpf::runs(pid),
            receiver_cpu_s: proc_cpu(s.receiver.pid()),
            cpus_busy_s: cpus_busy_s(cpus),
        }
    }
}

/// The shipper's costs over a trial, from the snapshots before and after it (`pinned`: the
/// shipper has CPUs of its own, whose other users can be told apart).
fn costs(t: &mut Trial, a: &Snapshot, b: &Snapshot, pinned: bool) {
    let received = t.received.max(1) as f64;
    t.cpu_s = b.cpu_s - a.cpu_s;
    t.cpu_s_ticks = b.ticks_s - a.ticks_s;
    if t.cpu_s > 0.0 {
        t.cpu_s_per_million = t.cpu_s / (received / 1e6);
        t.datagrams_per_cpu_s = t.received as f64 / t.cpu_s;
    }
    t.cpu_user_s = b.user_system_s.0 - a.user_system_s.0;
    t.cpu_system_s = b.user_system_s.1 - a.user_system_s.1;
    t.minor_faults_per_million = (b.faults - a.faults) as f64 / (received / 1e6);
    t.sleeps_per_datagram = b.switches.0.saturating_sub(a.switches.0) as f64 / received;
    t.preemptions_per_datagram = b.switches.1.saturating_sub(a.switches.1) as f64 / received;
    t.thread_cpu_s = b
        .threads
        .iter()
        .map(|(name, cpu)| (name.clone(), cpu - a.threads.get(name).copied().unwrap_or(0.0)))
        .collect();
    t.program_runs = b
        .runs
        .iter()
        .map(|(tp, (n, ns))| {
            let (n0, ns0) = a.runs.get(tp).copied().unwrap_or_default();
            (tp.clone(), (n - n0, ns - ns0))
        })
        .collect();
    let program_ns: u64 = t.program_runs.values().map(|r| r.1).sum();
    t.program_ns_per_datagram = program_ns as f64 / t.sent.max(1) as f64;
    t.receiver_cpu_s = b.receiver_cpu_s - a.receiver_cpu_s;
    t.peak_rss_kib = proc_hwm_kib(b.pid);
    t.rss_kib = proc_status_kib(b.pid, "VmRSS:");
    if pinned {
        let span_s = (b.at - a.at).as_secs_f64().max(1e-9);
        t.others_on_shipper_cpus =
            (b.cpus_busy_s - a.cpus_busy_s - t.cpu_s_ticks).max(0.0) / span_s;
    }
}

/// Sends the case's datagrams to 127.0.0.1:`port` from a thread on the load generator's
/// CPUs, with a progress bar on a terminal.
fn send(env: &Env, v: Variant, port: u16) -> anyhow::Result<loadgen::Sent> {
    let progress = Arc::new(AtomicU64::new(0));
    let (data, ends) = (env.load.data.clone(), env.load.ends.clone());
    let (rate, cpus) = (env.case.workload.rate as f64, env.case.cpus.loadgen.clone());
    let p = progress.clone();
    let sender = std::thread::spawn(move || {
        super::pin_current_thread(&cpus);
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        loadgen::send_datagrams(to, &data, &ends, rate, &p)
    });
    let (tty, t0, total) = (std::io::stdout().is_terminal(), Instant::now(), env.load.count());
    // Noticed within 5 ms of the sender's end: the receive queue is timed from here.
    for i in 0u64.. {
        if sender.is_finished() {
            break;
        }
        if tty && i % 50 == 0 {
            let done = progress.load(Ordering::Relaxed);
            pipe::bar(v.label(), done, total, t0.elapsed().as_secs_f64(), "datagrams");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    pipe::clear_bar(tty);
    sender.join().expect("sender thread").context("sending datagrams")
}

/// Fails unless the metrics `text` and the kernel agree that variant `v` runs: the state of
/// `shipper_ebpf_attached`, and BPF links held by the shipper `pid` (attached: one on
/// `kfree_skb` among them) or none. Returns the state and the links.
fn check_variant(v: Variant, text: &str, pid: u32) -> anyhow::Result<(String, Vec<String>)> {
    let (want, value) = v.expected();
    let label = v.label();
    let Some((state, got)) = ebpf_state(text) else {
        bail!("{label}: no shipper_ebpf_attached in the shipper's metrics");
    };
    if state != want || got != value {
        bail!(
            "{label}: the shipper reports shipper_ebpf_attached{{state=\"{state}\"}} {got}, not \
             state=\"{want}\" {value}: the variant is not what it claims (see its log)"
        );
    }
    let links: Vec<String> = bpf::links(pid).iter().map(bpf::Link::name).collect();
    let drops = links.iter().any(|l| l.ends_with(":kfree_skb"));
    if (v == Variant::Attached && !drops) || (v == Variant::NoEbpf && !links.is_empty()) {
        bail!(
            "{label}: the shipper holds the BPF links {links:?}: the variant is not what it claims"
        );
    }
    Ok((state, links))
}

/// The `state` label and the value of `shipper_ebpf_attached` in exposition `text`.
fn ebpf_state(text: &str) -> Option<(String, f64)> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("shipper_ebpf_attached{state=\"")?;
        let (state, value) = rest.split_once("\"} ")?;
        Some((state.to_string(), value.trim().parse().ok()?))
    })
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(testkit::net::free_udp_port()?)
}

/// Waits until the receive queues of the UDP sockets on 127.0.0.1:`port` are empty (polled
/// every 2 ms), and returns when they were.
fn drained(port: u16, limit: Duration, dir: &Path) -> anyhow::Result<Instant> {
    let every = Duration::from_millis(2);
    let empty = || {
        let now = Instant::now();
        (udp_column(port, true) == 0).then_some(now)
    };
    testkit::wait::poll(limit, every, empty).with_context(|| {
        format!("the UDP receive queue not empty after {limit:?}; see {}", dir.display())
    })
}

/// The kernel's drops on the UDP sockets bound to 127.0.0.1:`port` (the `drops` column of
/// `/proc/net/udp`, summed over the sockets of every worker).
fn udp_drops(port: u16) -> u64 {
    udp_column(port, false)
}

/// A column of `/proc/net/udp` for the sockets bound to 127.0.0.1:`port`, summed: the bytes
/// in their receive queues (`rx_queue`, hexadecimal) or their drops (`drops`, the last).
fn udp_column(port: u16, rx_queue: bool) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let rows = testkit::procnet::parse_udp(&text).into_iter();
    let ours = rows.filter(|r| (r.local_ip, r.local_port) == (Ipv4Addr::LOCALHOST, port));
    ours.map(|r| if rx_queue { r.rx_queue_bytes } else { r.drops }).sum()
}

/// The figure a case judges the variants by, from its `optimises`: `throughput` (datagrams
/// received per second: a flood) or anything else, CPU per datagram (a fixed rate).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Figure {
    CpuPerDatagram,
    Throughput,
}

impl Figure {
    fn of(optimises: &str) -> Figure {
        if optimises == "throughput" {
            Figure::Throughput
        } else {
            Figure::CpuPerDatagram
        }
    }

    fn name(self) -> &'static str {
        match self {
            Figure::CpuPerDatagram => "the shipper's CPU per datagram",
            Figure::Throughput => "datagrams received per second",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Figure::CpuPerDatagram => "CPU s/M",
            Figure::Throughput => "received/s",
        }
    }

    fn text(self, v: f64) -> String {
        match self {
            Figure::CpuPerDatagram => format!("{v:.3}"),
            Figure::Throughput => super::report::thousands(v),
        }
    }

    fn value(self, t: &Trial) -> f64 {
        match self {
            Figure::CpuPerDatagram => t.cpu_s_per_million,
            Figure::Throughput => t.received_per_s,
        }
    }
}

/// The attached variant against `--no-ebpf`, in percent (positive: attached has more of it:
/// costs more CPU, receives more datagrams per second).
#[derive(Serialize, Default, Debug)]
struct Difference {
    /// The figure judged (`Figure::name`), each pair's two trials against each other (they
    /// ran back to back): the median and the range over the pairs.
    judged: &'static str,
    paired_pct: f64,
    paired_range_pct: (f64, f64),
    /// The spread of each variant's own trials of the judged figure, (highest − lowest) /
    /// median: the noise a difference has to stand out of.
    noise_pct: (f64, f64),
    /// Whether the paired median is under the 2% target, in absolute value.
    under_2_pct: bool,
    /// Median trial against median trial, each figure.
    cpu_per_datagram_pct: f64,
    received_per_s_pct: f64,
    delivered_per_s_pct: f64,
    sender_cpu_per_datagram_pct: f64,
}

impl Difference {
    fn new(all: &[Vec<Trial>], medians: &[Trial], figure: Figure) -> Difference {
        let pct = |a: f64, b: f64| (a / b.max(1e-12) - 1.0) * 100.0;
        let (a, b) = (&medians[0], &medians[1]);
        let mut paired: Vec<f64> = all[0]
            .iter()
            .zip(&all[1])
            .map(|(x, y)| pct(figure.value(x), figure.value(y)))
            .collect();
        paired.sort_by(f64::total_cmp);
        let mid = paired.get(paired.len() / 2).copied().unwrap_or(0.0);
        let range = (paired.first().copied().unwrap_or(0.0), paired.last().copied().unwrap_or(0.0));
        let noise = |trials: &[Trial], m: &Trial| {
            let (lo, hi) = trials
                .iter()
                .map(|t| figure.value(t))
                .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
            (hi - lo) / figure.value(m).max(1e-12) * 100.0
        };
        Difference {
            judged: figure.name(),
            paired_pct: mid,
            paired_range_pct: range,
            noise_pct: (noise(&all[0], a), noise(&all[1], b)),
            under_2_pct: mid.abs() < 2.0,
            cpu_per_datagram_pct: pct(a.cpu_s_per_million, b.cpu_s_per_million),
            received_per_s_pct: pct(a.received_per_s, b.received_per_s),
            delivered_per_s_pct: pct(a.delivered_per_s, b.delivered_per_s),
            sender_cpu_per_datagram_pct: pct(
                a.sender_cpu_s_per_million,
                b.sender_cpu_s_per_million,
            ),
        }
    }
}

/// (lowest, highest) of `f` over `trials`.
fn spread(trials: &[Trial], f: fn(&Trial) -> f64) -> (f64, f64) {
    trials.iter().map(f).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

fn markdown(
    name: &str,
    quick: bool,
    case: &UdpCase,
    load: &Load,
    m: &[Trial],
    all: &[Vec<Trial>],
    d: &Difference,
) -> String {
    use std::fmt::Write;
    let th = super::report::thousands;
    let (w, s) = (&case.workload, &case.shipper);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "**{name}** ({}; judged by {}): {} {} datagrams per trial, {:.0} bytes on \
         average ({}–{}), {} apps (Zipf skew {}), one sender at {} (`sendmmsg`, at most {} per \
         call); shipper {} worker(s), zstd level {}, `receive_buffer_bytes = {}`; CPUs: shipper \
         {:?}, sender {:?}, receiver {:?}; {} pair(s) of trials, A B then B A alternately; \
         median trial by that.\n",
        case.description,
        Figure::of(&case.optimises).name(),
        th(load.count() as f64),
        w.format,
        load.bytes() as f64 / load.count().max(1) as f64,
        load.bytes_min,
        load.bytes_max,
        w.apps,
        w.skew,
        rate_text(w.rate),
        loadgen::SEND_BATCH,
        s.workers,
        s.zstd_level,
        s.receive_buffer_bytes,
        case.cpus.shipper,
        case.cpus.loadgen,
        case.cpus.receiver,
        all[0].len(),
    );
    let _ = writeln!(md, "Load average (1, 5, 15 min) at the end: {}.\n", load_average());
    variants_table(&mut md, m, all);
    difference_text(&mut md, quick, m, all, d);
    programs_text(&mut md, &m[0]);
    pairs_table(&mut md, all, Figure::of(&case.optimises));
    foreign_text(&mut md, all);
    md
}

/// What the programs themselves did in the attached variant's median trial, by the kernel's
/// own count.
fn programs_text(md: &mut String, t: &Trial) {
    use std::fmt::Write;
    let (runs, ns): (u64, u64) =
        t.program_runs.values().fold((0, 0), |(r, n), v| (r + v.0, n + v.1));
    let each: Vec<String> = t
        .program_runs
        .iter()
        .map(|(tp, (n, ns))| format!("`{tp}` {n} ({:.3} ms)", *ns as f64 / 1e6))
        .collect();
    let _ = writeln!(
        md,
        "\nThe programs themselves (kernel BPF statistics, median attached trial): {runs} runs, \
         {:.3} ms in all, {:.1} ns per datagram sent, {:.3}% of the shipper's CPU-s: {}. They run \
         in whichever context the event happens in (on loopback, drops in the sender's softirq). \
         The shipper's thread that reads their maps every 250 ms (`ebpf`) used {:.4} CPU-s.",
        ns as f64 / 1e6,
        t.program_ns_per_datagram,
        ns as f64 / 1e9 / t.cpu_s.max(1e-9) * 100.0,
        each.join(", "),
        t.thread_cpu_s.get("ebpf").copied().unwrap_or(0.0),
    );
}

/// One row per variant: its median trial, with the spread over its trials.
fn variants_table(md: &mut String, m: &[Trial], all: &[Vec<Trial>]) {
    use std::fmt::Write;
    let th = super::report::thousands;
    *md += "| variant | `shipper_ebpf_attached` | received/s (spread) | delivered/s | CPU s | \
           CPU s per M datagrams (spread) | datagrams per CPU-s | CPU per datagram vs \
           --no-ebpf | kernel drops (eBPF counted) | shipper drops | sender max behind | sender \
           CPU s per M sent | RSS (peak) |\n";
    *md += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    let base = m[1].cpu_s_per_million.max(1e-12);
    for (t, trials) in m.iter().zip(all) {
        let (rlo, rhi) = spread(trials, |t| t.received_per_s);
        let (clo, chi) = spread(trials, |t| t.cpu_s_per_million);
        let counted = if t.bpf_links.is_empty() {
            " (–)".into()
        } else {
            format!(" ({})", th(t.kernel_drops_counted as f64))
        };
        let _ = writeln!(
            md,
            "| {} | `state=\"{}\"` ({} links) | {} ({}–{}) | {} | {:.3} | **{:.3}** \
             ({:.3}–{:.3}) | {} | {:.3}× | {}{counted} | {} | {:.1} ms | {:.3} | {:.1} ({:.1}) \
             MiB |",
            t.label,
            t.ebpf_state,
            t.bpf_links.len(),
            th(t.received_per_s),
            th(rlo),
            th(rhi),
            th(t.delivered_per_s),
            t.cpu_s,
            t.cpu_s_per_million,
            clo,
            chi,
            th(t.datagrams_per_cpu_s),
            t.cpu_s_per_million / base,
            th(t.kernel_drops as f64),
            th(t.shipper_dropped as f64),
            t.sender_behind_max_ms,
            t.sender_cpu_s_per_million,
            t.rss_kib as f64 / 1024.0,
            t.peak_rss_kib as f64 / 1024.0,
        );
    }
}

/// The difference between the variants, against the target and the noise.
fn difference_text(md: &mut String, quick: bool, m: &[Trial], all: &[Vec<Trial>], d: &Difference) {
    use std::fmt::Write;
    let (lo, hi) = d.paired_range_pct;
    let _ = writeln!(
        md,
        "\n**eBPF attached vs --no-ebpf, {}: {:+.2}%** (median over {} pair(s), each pair's \
         trials back to back; {:+.2}% to {:+.2}%). Target, a difference under 2%: **{}**. Noise: \
         each variant's own trials spread over {:.1}% (attached) and {:.1}% (--no-ebpf) of their \
         median. Median trial against median trial: the shipper's CPU per datagram {:+.2}%, \
         received/s {:+.2}%, delivered/s {:+.2}%, the sender's CPU per datagram {:+.2}%.",
        d.judged,
        d.paired_pct,
        all[0].len(),
        lo,
        hi,
        match (quick, d.under_2_pct) {
            (true, _) => "not judged (a quick run: one short pair)",
            (false, true) => "met",
            (false, false) => "not met",
        },
        d.noise_pct.0,
        d.noise_pct.1,
        d.cpu_per_datagram_pct,
        d.received_per_s_pct,
        d.delivered_per_s_pct,
        d.sender_cpu_per_datagram_pct,
    );
    let _ = writeln!(
        md,
        "\nThe shipper's minor page faults per million datagrams (median trials): {:.0} attached, \
         {:.0} with --no-ebpf. Its CPU is the scheduler's run time of its threads; /proc ticks \
         gave {:.2} and {:.2} CPU-s. `shipper receive` used {:.2} and {:.2} CPU-s.",
        m[0].minor_faults_per_million,
        m[1].minor_faults_per_million,
        m[0].cpu_s_ticks,
        m[1].cpu_s_ticks,
        m[0].receiver_cpu_s,
        m[1].receiver_cpu_s,
    );
}

/// Each pair's two trials side by side, in run order.
fn pairs_table(md: &mut String, all: &[Vec<Trial>], figure: Figure) {
    use std::fmt::Write;
    let f = figure.short();
    let _ = writeln!(
        md,
        "\n| pair | order | eBPF attached {f} | --no-ebpf {f} | difference | kernel drops \
         (attached / --no-ebpf) |\n|---:|---|---:|---:|---:|---:|"
    );
    for (a, b) in all[0].iter().zip(&all[1]) {
        let order = if a.order < b.order { "attached first" } else { "--no-ebpf first" };
        let (x, y) = (figure.value(a), figure.value(b));
        let _ = writeln!(
            md,
            "| {} | {order} | {} | {} | {:+.2}% | {} / {} |",
            a.pair,
            figure.text(x),
            figure.text(y),
            (x / y.max(1e-12) - 1.0) * 100.0,
            a.kernel_drops,
            b.kernel_drops,
        );
    }
}

/// Other processes' tracing programs seen during the trials.
fn foreign_text(md: &mut String, all: &[Vec<Trial>]) {
    use std::fmt::Write;
    let foreign: Vec<&Trial> =
        all.iter().flatten().filter(|t| !t.foreign_links.is_empty()).collect();
    let trials = all.iter().map(Vec::len).sum::<usize>();
    if foreign.is_empty() {
        let _ = writeln!(md, "\nNo other process held tracing BPF programs during any trial.");
    } else {
        let mut who: Vec<&str> =
            foreign.iter().flat_map(|t| &t.foreign_links).map(|l| l.as_str()).collect();
        who.sort();
        who.dedup();
        let _ = writeln!(
            md,
            "\n**In {} of {trials} trials other processes held tracing BPF programs**, which run \
             host-wide in both variants (each trial first waited up to {} s for them to go): {}.",
            foreign.len(),
            foreign.iter().map(|t| t.quiet_wait_s).fold(0.0, f64::max).round(),
            who.join("; "),
        );
    }
}

/// Two charts of the judged figure: the median trial of each variant (`<case>-cpu.png` or
/// `<case>-throughput.png`), and every trial in run order (`<case>-trials.png`).
fn charts(
    name: &str,
    quick: bool,
    figure: Figure,
    m: &[Trial],
    all: &[Vec<Trial>],
) -> anyhow::Result<Vec<String>> {
    use super::chart;
    chart::register_font()?;
    let root = crate::root();
    let dir = if quick { root.join("perf/results") } else { root.join("docs/perf") };
    std::fs::create_dir_all(&dir)?;
    let path =
        |kind: &str| dir.join(format!("{name}-{kind}{}.png", if quick { "-quick" } else { "" }));
    let (kind, what, y) = match figure {
        Figure::CpuPerDatagram => (
            "cpu",
            "shipper CPU-seconds per million datagrams",
            "CPU-seconds per million datagrams",
        ),
        Figure::Throughput => {
            ("throughput", "datagrams received per second", "datagrams received per second")
        }
    };
    let colors = [chart::BLUE, chart::ORANGE];
    let labels: Vec<String> = m.iter().map(|t| t.label.clone()).collect();
    let values: Vec<f64> = m.iter().map(|t| figure.value(t)).collect();
    let title = format!("{name}: {what} (median trial)");
    chart::bars_with(&path(kind), &title, y, &labels, &values, &colors)?;
    let mut trials: Vec<&Trial> = all.iter().flatten().collect();
    trials.sort_by_key(|t| t.order);
    let on = |t: &Trial| t.label == Variant::Attached.label();
    let labels: Vec<String> =
        trials.iter().map(|t| format!("{} {}", t.pair, if on(t) { "on" } else { "off" })).collect();
    let values: Vec<f64> = trials.iter().map(|t| figure.value(t)).collect();
    let colors: Vec<_> = trials.iter().map(|t| colors[usize::from(!on(t))]).collect();
    let title = format!("{name}: every trial in run order (blue: eBPF on, orange: --no-ebpf)");
    chart::bars_with(&path("trials"), &title, y, &labels, &values, &colors)?;
    let out = [path(kind), path("trials")];
    for p in &out {
        println!("   chart: {}", p.display());
    }
    Ok(out.iter().map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).collect())
}
