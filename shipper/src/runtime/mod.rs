//! `shipper run`: start-up, the per-core workers, the control plane, and shutdown.
//!
//! # Design constraints
//! - `workers` threads, each pinned to one CPU, each owning its pipes, buckets, batch, zstd
//!   context, connections and counters ([`worker::Worker`]). Threads meet only in the control
//!   plane ([`control`]) and the metrics registry, at ~100 ms pace.
//!
//! # Operation
//! 1. Validate TLS material; load the eBPF programs if allowed (`crate::ebpf`; without them
//!    on failure), before any source opens a socket to watch; open (create) every pipe and
//!    bind every socket on the main thread, so a bad path, taken port or certificate fails
//!    start-up with its name, before any worker runs.
//! 2. Spawn the control thread, the metrics endpoint (and the thread copying the kernel's
//!    per-CPU counters for it) and the workers.
//! 3. Wait for SIGTERM/SIGINT (blocked in every thread, taken with `sigwait` by the signals
//!    thread), a worker's exit or a takeover request on the control socket; then tell every
//!    worker to stop and join them; for a takeover, hand the pipes and sockets over
//!    ([`takeover`]). SIGHUP goes to the reload thread ([`reload`]): new rate limits through
//!    the control plane, anything else by a takeover from a new process it starts.
//!
//! With `--takeover`, step 1 takes the pipes and sockets of the running shipper instead of
//! opening and binding them (what it was not handed, it opens as usual).

pub mod control;
pub mod reload;
pub mod takeover;
pub mod worker;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;

use crate::config::shipper::split_host_port;
use crate::config::ShipperConfig;
use crate::ebpf::KernelCounters;
use crate::metrics::shipper::{
    render, render_kernel, render_limits, ShipperCounters, ShipperLimits,
};
use crate::metrics::{http, scrape, Registry, PUBLISH_INTERVAL_MS};
use crate::notify::Notifier;
use crate::signals;
use crate::sinks::delivery::connection::Target;
use crate::sources::pipe::Leftover;
use crate::sources::socket::BoundSocket;
use takeover::{HandingOver, Handover, Kept, Kind};
use worker::start::{
    FileHandle, ForwardHandle, JournalHandle, Leftovers, PipeHandle, SocketHandle, WorkerPlan,
};

/// How `shipper run` was started, beyond its configuration.
pub struct RunOptions {
    /// `--takeover`: take the pipes and sockets of the shipper serving
    /// `shipper.control_socket` instead of opening them ([`takeover`]).
    pub take_over: bool,
    /// `--config`: the file a reload reads again ([`reload`]).
    pub config_path: std::path::PathBuf,
    /// `--no-ebpf`, kept by a reload and passed to the process a reload starts.
    pub no_ebpf: bool,
}

/// The checks stages add to the shipper's configuration, one line per stage that has any.
pub const CHECKS: &[crate::config::Check<ShipperConfig>] = &[crate::sources::journal::check_config];

/// Runs the shipper until SIGTERM/SIGINT or a takeover; returns once every worker has flushed
/// or given up (and, for a takeover, the new process holds the pipes and sockets). SIGHUP
/// reloads the configuration ([`reload`]).
pub fn run(config: ShipperConfig, options: RunOptions) -> anyhow::Result<()> {
    signals::block_run_signals()?;
    crate::os::raise_open_files_limit()?;
    // Before anything can replace the binary: a reload starts the one at this path.
    let exe = reload::Exe::resolve().context("resolving /proc/self/exe")?;
    let notifier = Notifier::from_env();
    let config = Arc::new(config);
    let t = &config.tls;
    let tls = Arc::new(crate::tls::client_config(&t.ca, &t.cert, &t.key)?);
    // What the process loaded, for a reload to compare: read with it, not later.
    let tls_files = reload::tls_files(&config);
    let run_id = signals::random_u64();
    let targets = targets(&config, tls, run_id)?;
    let (mut handed, control) = takeover_or_control(&config, options.take_over, &notifier)?;
    // Before any source opens a socket: `ebpf::watch_socket` is a no-op until this ran.
    let ebpf = handed.as_mut().and_then(Handover::take_ebpf);
    let kernel = kernel_counters(config.ebpf.enabled, ebpf)?;
    let mut kept = Kept::default();
    let pipes = open_pipes(&config, &mut handed, &mut kept)?;
    let journals = open_journals(&config)?;
    let files = open_files(&config)?;
    // Held for the life of the run: the kernel's drops on these sockets are counted.
    let mut watches = Vec::new();
    let sockets = bind_sockets(&config, &mut watches, &mut handed, &mut kept)?;
    let forwards = bind_forwards(&config, &mut handed, &mut kept)?;
    drop_capabilities(&kernel)?;
    if kernel.lock().expect("kernel counters poisoned").state == crate::ebpf::State::Attached {
        copy_kernel_counters(kernel.clone())?;
    }
    let registry = Registry::<ShipperCounters>::new(config.shipper.workers);
    let reloads = Arc::new(reload::ReloadCounters::default());
    let endpoint = Endpoint { registry: registry.clone(), kernel, reloads: reloads.clone() };
    serve_metrics(&config, endpoint, &mut handed, &mut kept)?;
    let control = match handed {
        Some(h) => after_takeover(&config, h)?,
        None => control,
    };
    let plans = Plans { pipes, journals, files, sockets, forwards, targets, registry };
    let started = start(&config, plans)?;
    let pending = reload::PendingTakeover::default();
    let reloader = reload::Reloader {
        path: options.config_path,
        no_ebpf: options.no_ebpf,
        exe,
        running: (*config).clone(),
        control: started.control.clone(),
        handing_over: started.handing_over.clone(),
        pending: pending.clone(),
        counters: reloads,
        notifier: notifier.clone(),
        tls_files,
    };
    spawn_listeners(control, &started.exit, reloader)?;
    announce_ready(&notifier, &started.registry, &config, run_id);
    let stopping = Stopping { stop: &started.stop, handing_over: &started.handing_over, pending };
    let ended = supervise(started.events, &stopping, config.shipper.workers, &notifier);
    end(started.handles, ended, &started.leftovers, kept)
}

/// What [`start`] started, for the rest of [`run`].
struct Started {
    handles: Vec<std::thread::JoinHandle<()>>,
    events: mpsc::Receiver<Event>,
    exit: mpsc::Sender<Event>,
    stop: watch::Sender<bool>,
    control: mpsc::Sender<control::ToControl>,
    handing_over: Arc<HandingOver>,
    leftovers: Leftovers,
    registry: Arc<Registry<ShipperCounters>>,
}

/// Starts the enrichments' feeds, the workers and the control thread.
fn start(config: &Arc<ShipperConfig>, plans: Plans) -> anyhow::Result<Started> {
    let (report_tx, report_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (exit_tx, exit_rx) = mpsc::channel::<Event>();
    let registry = plans.registry.clone();
    let feeds = start_feeds(config)?;
    let leftovers = Leftovers::default();
    let handing_over = Arc::new(HandingOver::default());
    let shared = Shared {
        reports: report_tx.clone(),
        stop: stop_rx,
        exit: exit_tx.clone(),
        feeds,
        leftovers: leftovers.clone(),
        handing_over: handing_over.clone(),
    };
    let (handles, share_txs) = spawn_workers(config, plans, &shared)?;
    drop(shared);
    let plane = control::ControlPlane {
        reports: report_rx,
        shares: share_txs,
        interval: std::time::Duration::from_millis(config.ratelimit.rebalance_interval_ms),
    };
    std::thread::Builder::new().name("control".into()).spawn(move || control::run(plane))?;
    Ok(Started {
        handles,
        events: exit_rx,
        exit: exit_tx,
        stop: stop_tx,
        control: report_tx,
        handing_over,
        leftovers,
        registry,
    })
}

/// Waits for the workers, then says why the run ended; after a takeover's stop, hands the
/// pipes and sockets (with the pipes' partial lines) to the new process.
fn end(
    workers: Vec<std::thread::JoinHandle<()>>,
    (failed, handover): (Option<String>, Option<std::os::unix::net::UnixStream>),
    leftovers: &Leftovers,
    kept: Kept,
) -> anyhow::Result<()> {
    for w in workers {
        let _ = w.join();
    }
    if let Some(e) = failed {
        return Err(anyhow::anyhow!("worker failed: {e}"));
    }
    if let Some(stream) = handover {
        let left = std::mem::take(&mut *leftovers.lock().expect("leftovers poisoned"));
        kept.hand_over(stream, left).context("takeover: stopped, but nobody took over")?;
    }
    Ok(())
}

/// Says the shipper runs (logged with its pid, which a reload's new process has anew) and
/// tells systemd it is ready; feeds its watchdog from the workers' progress (published
/// counters) when the unit has one.
fn announce_ready(
    notifier: &Notifier,
    registry: &Arc<Registry<ShipperCounters>>,
    config: &ShipperConfig,
    run_id: u64,
) {
    tracing::info!(
        workers = config.shipper.workers,
        run_id = format!("{run_id:016x}"),
        pid = std::process::id(),
        pipes = config.sources.pipe.len(),
        "shipper running"
    );
    notifier.send("READY=1");
    if let Some(interval) = Notifier::watchdog_interval() {
        notifier.watch(interval, registry.progress(interval));
    }
}

/// Starts the threads that turn signals and takeover requests into [`Event`]s, and the
/// reload thread SIGHUP wakes.
fn spawn_listeners(
    control: Option<std::os::unix::net::UnixListener>,
    exit_tx: &mpsc::Sender<Event>,
    reloader: reload::Reloader,
) -> anyhow::Result<()> {
    if let Some(listener) = control {
        let control_tx = exit_tx.clone();
        std::thread::Builder::new().name("takeover".into()).spawn(move || {
            // After a request the main thread answers, the next peer is served (refused
            // while stopping).
            while let Some(stream) = takeover::serve(&listener) {
                if control_tx.send(Event::Takeover(stream)).is_err() {
                    return;
                }
            }
        })?;
    }
    let (hup_tx, hup_rx) = mpsc::channel();
    reload::spawn(reloader, hup_rx)?;
    let signal_tx = exit_tx.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        while let Ok(sig) = signals::wait_run_signal() {
            if sig == libc::SIGHUP {
                // Gone once a reload's new process took over: this process is ending.
                let _ = hup_tx.send(());
            } else if signal_tx.send(Event::Signal(sig)).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

/// With `take_over`, what the running shipper handed over; else the control socket, bound
/// (refused if a shipper answers there), if the configuration has one.
fn takeover_or_control(
    config: &ShipperConfig,
    take_over: bool,
    notifier: &Notifier,
) -> anyhow::Result<(Option<Handover>, Option<std::os::unix::net::UnixListener>)> {
    let path = config.shipper.control_socket.as_deref();
    Ok(match (take_over, path) {
        (true, path) => (Some(ask_takeover(config, path, notifier)?), None),
        (false, Some(path)) => (None, Some(takeover::listen(path, false)?)),
        (false, None) => (None, None),
    })
}

/// Once every source took what it was handed: closes the rest and replaces the control
/// socket the old process (now exiting) served.
fn after_takeover(
    config: &ShipperConfig,
    handed: Handover,
) -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    handed.close_rest();
    let path = config.shipper.control_socket.as_deref().context("asked through it")?;
    Ok(Some(takeover::listen(path, true)?))
}

/// Asks the shipper on the control socket `path` to hand over, allowing it the time a stop
/// takes (`shutdown_timeout_ms`, then [`takeover::STOP_MARGIN_MS`]). Before it answers
/// ADOPTED, it tells systemd that this process is the service's main process now.
fn ask_takeover(
    config: &ShipperConfig,
    path: Option<&std::path::Path>,
    notifier: &Notifier,
) -> anyhow::Result<Handover> {
    let limit_ms = config.shipper.shutdown_timeout_ms + takeover::STOP_MARGIN_MS;
    let limit = std::time::Duration::from_millis(limit_ms);
    tracing::info!("takeover: asking the running shipper for its pipes and sockets");
    let main_pid = || notifier.main_pid();
    Ok(takeover::request(path, limit, main_pid)?)
}

/// What the metrics endpoint shows: the workers' counters, the kernel's, the reloads'.
struct Endpoint {
    registry: Arc<Registry<ShipperCounters>>,
    kernel: Arc<Mutex<KernelCounters>>,
    reloads: Arc<reload::ReloadCounters>,
}

/// Serves `/metrics` (the workers' counters, the kernel's and the reloads') on its own
/// threads, if `metrics.listen` is set.
fn serve_metrics(
    config: &ShipperConfig,
    endpoint: Endpoint,
    handed: &mut Option<Handover>,
    kept: &mut Kept,
) -> anyhow::Result<()> {
    if config.metrics.listen.is_empty() {
        return Ok(());
    }
    let limits = ShipperLimits {
        workers: config.shipper.workers,
        outbox_bytes_max: config.receivers.outbox_bytes_max,
        buffer_bytes_max: config
            .buffer
            .directory
            .as_ref()
            .map(|_| config.buffer.bytes_max / config.shipper.workers as u64),
    };
    let Endpoint { registry, kernel, reloads } = endpoint;
    let render_all = move || {
        let mut text = scrape(&registry, render);
        let k = kernel.lock().expect("kernel counters poisoned").clone();
        let mut out = crate::metrics::Exposition::default();
        render_kernel(&k, &mut out);
        render_limits(&limits, &mut out);
        reloads.render(&mut out);
        text.push_str(&out.finish());
        text
    };
    let listen = &config.metrics.listen;
    let inherited = handed.as_mut().and_then(|h| h.take_sockets(Kind::Metrics, listen, 1).pop());
    let listener = match inherited {
        Some((fd, _)) => std::net::TcpListener::from(fd),
        None => std::net::TcpListener::bind(listen)
            .with_context(|| format!("metrics.listen {listen}"))?,
    };
    kept.socket(Kind::Metrics, listen, "", &listener)?;
    let addr = http::serve_listener(listener, render_all)
        .with_context(|| format!("metrics.listen {listen}"))?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

/// What the main thread opened for the workers, per worker, and what they share.
struct Plans {
    pipes: Vec<Vec<PipeHandle>>,
    journals: Vec<Vec<JournalHandle>>,
    files: Vec<Vec<FileHandle>>,
    sockets: Vec<Vec<SocketHandle>>,
    forwards: Vec<Vec<ForwardHandle>>,
    targets: Vec<Arc<Target>>,
    registry: Arc<Registry<ShipperCounters>>,
}

/// The channels every worker gets a copy of.
struct Shared {
    reports: mpsc::Sender<control::ToControl>,
    stop: watch::Receiver<bool>,
    exit: mpsc::Sender<Event>,
    /// The values the enrichments fetch, one per `[[transforms.enrich]]` that fetches.
    feeds: Vec<Arc<crate::transforms::enrich::feed::Feed>>,
    /// Where the pipes leave their partial lines when they stop.
    leftovers: Leftovers,
    /// Set before the stop when it is a takeover's.
    handing_over: Arc<HandingOver>,
}

/// Starts the refresher of every enrichment that fetches a value.
fn start_feeds(
    config: &ShipperConfig,
) -> anyhow::Result<Vec<Arc<crate::transforms::enrich::feed::Feed>>> {
    let fetching = config.transforms.enrich.iter().filter(|c| c.fetches());
    Ok(fetching.map(crate::transforms::enrich::feed::start).collect::<std::io::Result<_>>()?)
}

/// Where the control thread sends a worker its shares.
type ShareSender = mpsc::Sender<control::Update>;

/// Starts one thread per worker; returns their handles and the senders of their shares.
fn spawn_workers(
    config: &Arc<ShipperConfig>,
    plans: Plans,
    shared: &Shared,
) -> anyhow::Result<(Vec<std::thread::JoinHandle<()>>, Vec<ShareSender>)> {
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let mut share_txs = Vec::new();
    let mut handles = Vec::new();
    let Plans { pipes, journals, files, sockets, forwards, targets, registry } = plans;
    let per_worker = pipes.into_iter().zip(journals).zip(files).zip(sockets).zip(forwards);
    for (index, ((((pipes, journals), files), sockets), forwards)) in per_worker.enumerate() {
        let (share_tx, share_rx) = mpsc::channel();
        share_txs.push(share_tx);
        let pin = config.shipper.pin_workers && !cpus.is_empty();
        let plan = WorkerPlan {
            index,
            cpu: pin.then(|| cpus[index % cpus.len()]),
            pipes,
            journals,
            files,
            sockets,
            forwards,
            config: config.clone(),
            targets: targets.clone(),
            registry: registry.clone(),
            reports: shared.reports.clone(),
            shares: share_rx,
            stop: shared.stop.clone(),
            feeds: shared.feeds.clone(),
            leftovers: shared.leftovers.clone(),
            handing_over: shared.handing_over.clone(),
        };
        let exit = shared.exit.clone();
        handles.push(std::thread::Builder::new().name(format!("worker-{index}")).spawn(
            move || {
                let result = worker::start::run(plan);
                let error = result.as_ref().err().map(|e| format!("{e:#}"));
                let _ = exit.send(Event::WorkerExit(index, error));
            },
        )?);
    }
    Ok((handles, share_txs))
}

/// Opens (creates) every pipe on the main thread, or takes the one handed over for its path,
/// keeps a duplicate to hand over, and deals them to their workers.
fn open_pipes(
    config: &ShipperConfig,
    handed: &mut Option<Handover>,
    kept: &mut Kept,
) -> anyhow::Result<Vec<Vec<PipeHandle>>> {
    let workers = config.shipper.workers;
    let mut pipes: Vec<Vec<PipeHandle>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, p) in config.sources.pipe.iter().enumerate() {
        let size = p.pipe_bytes as usize;
        let (open, left) = match handed.as_mut().and_then(|h| h.take_pipe(&p.path)) {
            Some((file, left)) => (crate::sources::pipe::adopt(&p.path, file, size)?, left),
            None => {
                (crate::sources::pipe::open(&p.path, p.mode_bits(), size)?, Leftover::default())
            }
        };
        kept.pipe(&p.path, i, &open.file)?;
        if open.pipe_bytes < p.pipe_bytes as usize {
            tracing::warn!(path = %p.path.display(), granted = open.pipe_bytes, asked = p.pipe_bytes, "pipe buffer smaller than pipe_bytes (see /proc/sys/fs/pipe-max-size)");
        }
        let w = p.worker.unwrap_or(i % workers);
        pipes[w].push(PipeHandle { file: open.file, config_index: i, left });
    }
    Ok(pipes)
}

/// Opens every journal source's checkpoint and deals the sources to their workers, after
/// the pipes.
fn open_journals(config: &ShipperConfig) -> anyhow::Result<Vec<Vec<JournalHandle>>> {
    let workers = config.shipper.workers;
    let mut journals: Vec<Vec<JournalHandle>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, j) in config.sources.journal.iter().enumerate() {
        let checkpoint = crate::sources::journal::checkpoint::Checkpoint::open(
            j.checkpoint.as_deref(),
            config.shipper.modes().file,
        )
        .with_context(|| format!("sources.journal[{i}].checkpoint"))?;
        let w = j.worker.unwrap_or((config.sources.pipe.len() + i) % workers);
        journals[w].push(JournalHandle { config_index: i, checkpoint });
    }
    Ok(journals)
}

/// Opens every file source's positions and deals the sources to their workers, after the
/// pipes and journals.
fn open_files(config: &ShipperConfig) -> anyhow::Result<Vec<Vec<FileHandle>>> {
    let workers = config.shipper.workers;
    let mut files: Vec<Vec<FileHandle>> = (0..workers).map(|_| Vec::new()).collect();
    let before = config.sources.pipe.len() + config.sources.journal.len();
    for (i, f) in config.sources.file.iter().enumerate() {
        let mode = config.shipper.modes().file;
        let positions = crate::sources::file::positions::Positions::open(
            f.positions.as_deref(),
            mode,
            f.files_max as usize,
        )
        .with_context(|| format!("sources.file[{i}].positions"))?;
        let w = f.worker.unwrap_or((before + i) % workers);
        files[w].push(FileHandle { config_index: i, positions });
    }
    Ok(files)
}

/// Binds every socket source on the main thread (so a taken port or bad path fails start-up
/// with its name) and deals the sockets to their workers: udp and tcp to every worker
/// (SO_REUSEPORT) unless `worker` is set, unix to one worker, round-robin after the file sources.
fn bind_sockets(
    config: &ShipperConfig,
    watches: &mut Vec<crate::ebpf::Watch>,
    handed: &mut Option<Handover>,
    kept: &mut Kept,
) -> anyhow::Result<Vec<Vec<SocketHandle>>> {
    use crate::config::socket::Transport;
    let workers = config.shipper.workers;
    let mut out: Vec<Vec<SocketHandle>> = (0..workers).map(|_| Vec::new()).collect();
    let src = &config.sources;
    let mut dealt = src.pipe.len() + src.journal.len() + src.file.len();
    for (i, s) in config.sources.socket.iter().enumerate() {
        let owners: Vec<usize> = match (s.worker, s.transport) {
            (Some(w), _) => vec![w],
            (None, Transport::Unix) => {
                dealt += 1;
                vec![(dealt - 1) % workers]
            }
            (None, _) => (0..workers).collect(),
        };
        let bound = bind_or_adopt(s, owners.len(), handed)?;
        for (worker, group) in owners.iter().copied().zip(deal(bound, owners.len())) {
            for b in &group {
                keep_socket(s, b, worker, kept, watches)?;
            }
            out[worker].push(SocketHandle { config_index: i, bound: group });
        }
    }
    Ok(out)
}

/// Keeps a duplicate of socket `b` of source `s` to hand over, says it is bound, and has the
/// kernel's drops on it counted if it is a datagram socket.
fn keep_socket(
    s: &crate::config::socket::SocketSource,
    b: &BoundSocket,
    worker: usize,
    kept: &mut Kept,
    watches: &mut Vec<crate::ebpf::Watch>,
) -> anyhow::Result<()> {
    use crate::config::socket::Transport;
    let kind = match s.transport {
        Transport::Udp => Kind::Udp,
        Transport::Tcp => Kind::Tcp,
        Transport::Unix => Kind::Unix,
    };
    keep_bound(kept, kind, &socket_key(s), b)?;
    // The kernel reports twice what it granted (socket(7)).
    let granted = b.receive_buffer_bytes / 2;
    if (granted as u64) < s.receive_buffer_bytes {
        tracing::warn!(
            source = %s.name,
            granted,
            asked = s.receive_buffer_bytes,
            "socket receive buffer smaller than receive_buffer_bytes \
             (see /proc/sys/net/core/rmem_max)"
        );
    }
    tracing::info!(
        source = %s.name,
        transport = s.transport.label(),
        local = %b.local,
        worker,
        receive_buffer_bytes = granted,
        "socket source bound"
    );
    if let (crate::sources::socket::Bound::Datagram(fd), false) = (&b.socket, b.shared) {
        use std::os::fd::AsFd;
        // A datagram the kernel drops is lost (a stream's is resent): count them.
        match crate::ebpf::watch_socket(fd.as_fd(), &s.name) {
            Ok(w) => watches.extend(w),
            Err(e) => tracing::warn!(source = %s.name, "kernel drops not counted: {e}"),
        }
    }
    Ok(())
}

/// Binds every forward source's port on the main thread (a taken port or unreadable
/// certificate fails start-up with its name), on every worker (SO_REUSEPORT) unless `worker`
/// is set, and makes each source's chunk table, shared by its workers.
fn bind_forwards(
    config: &ShipperConfig,
    handed: &mut Option<Handover>,
    kept: &mut Kept,
) -> anyhow::Result<Vec<Vec<ForwardHandle>>> {
    use crate::config::socket::Transport;
    use crate::sources::socket::{bind_inet, Bound, Inet};
    let workers = config.shipper.workers;
    let mut out: Vec<Vec<ForwardHandle>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, f) in config.sources.forward.iter().enumerate() {
        let tls = match &f.tls {
            Some(t) => Some(Arc::new(
                crate::tls::listener_config(&t.cert, &t.key, t.ca.as_deref())
                    .with_context(|| format!("sources.forward[{i}].tls"))?,
            )),
            None => None,
        };
        let registry = crate::sources::forward::chunks::Registry::new(f.chunks_max as usize);
        let self_hostname =
            f.self_hostname.clone().unwrap_or_else(crate::sources::forward::handshake::hostname);
        let owners: Vec<usize> = f.worker.map_or_else(|| (0..workers).collect(), |w| vec![w]);
        let addr = f.socket_addr().context("validated address")?;
        let inet =
            Inet { name: &f.name, transport: Transport::Tcp, addr, receive_buffer_bytes: 4 << 20 };
        let mut bound = adopt(handed, Kind::Forward, &f.address, owners.len())?;
        if bound.is_empty() {
            bound = bind_inet(&inet, owners.len())?;
        }
        let local = bound.first().expect("at least one listener per owner").local.clone();
        for (worker, group) in owners.iter().copied().zip(deal(bound, owners.len())) {
            let mut listeners = Vec::new();
            for b in group {
                keep_bound(kept, Kind::Forward, &f.address, &b)?;
                tracing::info!(source = %f.name, local = %b.local, worker, "forward source bound");
                let Bound::Listener(l) = b.socket else { unreachable!("tcp binds listeners") };
                listeners.push(l);
            }
            out[worker].push(ForwardHandle {
                config_index: i,
                listeners,
                local: local.clone(),
                tls: tls.clone(),
                registry: registry.clone(),
                self_hostname: self_hostname.clone(),
            });
        }
    }
    Ok(out)
}

/// `items` dealt in turn to `owners` hands (more items than owners: a takeover onto fewer
/// workers, whose owners then read two or more).
fn deal<T>(items: Vec<T>, owners: usize) -> Vec<Vec<T>> {
    let mut hands: Vec<Vec<T>> = (0..owners).map(|_| Vec::new()).collect();
    for (n, item) in items.into_iter().enumerate() {
        hands[n % owners].push(item);
    }
    hands
}

/// What the configuration calls a socket source's socket: its address, or its path.
fn socket_key(s: &crate::config::socket::SocketSource) -> String {
    match (&s.address, &s.path) {
        (Some(a), _) => a.clone(),
        (None, Some(p)) => p.display().to_string(),
        (None, None) => String::new(),
    }
}

/// Binds `count` sockets for socket source `s`, after taking those handed over for it.
fn bind_or_adopt(
    s: &crate::config::socket::SocketSource,
    count: usize,
    handed: &mut Option<Handover>,
) -> anyhow::Result<Vec<BoundSocket>> {
    use crate::config::socket::Transport;
    let kind = match s.transport {
        Transport::Udp => Kind::Udp,
        Transport::Tcp => Kind::Tcp,
        Transport::Unix => Kind::Unix,
    };
    let bound = adopt(handed, kind, &socket_key(s), count)?;
    if !bound.is_empty() {
        return Ok(bound);
    }
    Ok(crate::sources::socket::bind(s, count)?)
}

/// Every socket handed over for a `kind` source named `key` (more than `count` when the new
/// configuration has fewer workers: each is read on, so that what its queue holds is not
/// lost); when fewer than `count` came (more workers), the others share them: a socket bound
/// alone has no SO_REUSEPORT, so no new one could join its port.
fn adopt(
    handed: &mut Option<Handover>,
    kind: Kind,
    key: &str,
    count: usize,
) -> anyhow::Result<Vec<BoundSocket>> {
    let Some(h) = handed.as_mut() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (fd, local) in h.take_sockets(kind, key, usize::MAX) {
        out.push(
            crate::sources::socket::adopt(fd, local)
                .with_context(|| format!("takeover: the socket handed for {key}"))?,
        );
        tracing::info!(source = key, "takeover: socket taken over");
    }
    let handed = out.len();
    if handed > 0 {
        for i in handed..count {
            out.push(out[i % handed].try_clone().context("takeover: sharing a handed socket")?);
        }
    }
    Ok(out)
}

/// Keeps a duplicate of `b` to hand over (once per socket: not for a shared descriptor).
fn keep_bound(kept: &mut Kept, kind: Kind, key: &str, b: &BoundSocket) -> std::io::Result<()> {
    use crate::sources::socket::Bound;
    if b.shared {
        return Ok(());
    }
    match &b.socket {
        Bound::Datagram(fd) => kept.socket(kind, key, &b.local, fd),
        Bound::Listener(l) => kept.socket(kind, key, &b.local, l),
    }
}

/// Loads the eBPF programs, or adopts those a takeover `handed` over (or not, and why).
fn kernel_counters(
    enabled: bool,
    handed: Option<(crate::ebpf::Handing, Vec<std::os::fd::OwnedFd>)>,
) -> anyhow::Result<Arc<Mutex<KernelCounters>>> {
    let state = crate::ebpf::start(enabled, handed);
    Ok(Arc::new(Mutex::new(KernelCounters::new(state))))
}

/// Copies the kernel's per-CPU counters for the metrics endpoint, on a thread of its own.
fn copy_kernel_counters(shared: Arc<Mutex<KernelCounters>>) -> anyhow::Result<()> {
    std::thread::Builder::new().name("ebpf".into()).spawn(move || loop {
        let snapshot = crate::ebpf::snapshot();
        *shared.lock().expect("kernel counters poisoned") = snapshot;
        std::thread::sleep(std::time::Duration::from_millis(PUBLISH_INTERVAL_MS));
    })?;
    Ok(())
}

/// Once the privileged start-up is done (eBPF loaded, FIFOs created, sockets bound), keeps
/// only `CAP_BPF`, and only while the programs are attached: it registers each new receiver
/// connection in the programs' maps (kernels before 6.5 check it on every bpf() call when
/// unprivileged BPF is disabled). Runs on the main thread before any thread that lives on is
/// spawned, so every thread inherits it.
fn drop_capabilities(kernel: &Mutex<KernelCounters>) -> anyhow::Result<()> {
    let attached =
        kernel.lock().expect("kernel counters poisoned").state == crate::ebpf::State::Attached;
    let keep = if attached { 1 << crate::os::CAP_BPF } else { 0 };
    let kept = crate::os::keep_only_capabilities(keep).context("dropping capabilities")?;
    tracing::info!(effective = format!("{kept:#x}"), "capabilities after start-up");
    Ok(())
}

enum Event {
    Signal(i32),
    WorkerExit(usize, Option<String>),
    /// A new process asks to take over, on this connection.
    Takeover(std::os::unix::net::UnixStream),
}

/// How the main thread stops the workers: the stop, whether it is a takeover's, and the
/// takeover a reload started, if any.
struct Stopping<'a> {
    stop: &'a watch::Sender<bool>,
    handing_over: &'a HandingOver,
    pending: reload::PendingTakeover,
}

/// Waits until every worker has exited; returns the first worker error, and the connection
/// of a takeover that stopped them.
fn supervise(
    events: mpsc::Receiver<Event>,
    stopping: &Stopping<'_>,
    workers: usize,
    notifier: &Notifier,
) -> (Option<String>, Option<std::os::unix::net::UnixStream>) {
    let stop = stopping.stop;
    let mut running = workers;
    let mut failed = None;
    let mut handover = None;
    while running > 0 {
        match events.recv() {
            Ok(Event::Signal(sig)) => {
                tracing::info!(
                    signal = sig,
                    "stopping: no more reads, flushing and waiting for acknowledgements"
                );
                notifier.send("STOPPING=1");
                let _ = stop.send(true);
            }
            Ok(Event::Takeover(mut stream)) => {
                if *stop.borrow() {
                    let _ = takeover::wire::refuse(&mut stream, "stopping already");
                    continue;
                }
                let pid = takeover::peer_pid(&stream);
                let by = if reload::claim(&stopping.pending, pid) {
                    "a reload's"
                } else {
                    // Another process than the reload's: the pipes a pending reload removes
                    // are not this takeover's business; every partial line is handed over.
                    stopping.handing_over.set_removed_pipes(Vec::new());
                    "a"
                };
                tracing::info!(
                    ?pid,
                    "takeover asked by {by} new process: stopping the workers to hand over"
                );
                // No STOPPING=1: the service goes on, in the new process (its MAINPID=).
                stopping.handing_over.start();
                let _ = stop.send(true);
                handover = Some(stream);
            }
            Ok(Event::WorkerExit(index, err)) => {
                running -= 1;
                if let Some(e) = err {
                    tracing::error!(core = index, "worker failed: {e}");
                    failed.get_or_insert(e);
                    let _ = stop.send(true);
                }
            }
            Err(_) => break,
        }
    }
    (failed, handover)
}

fn targets(
    config: &ShipperConfig,
    tls: Arc<rustls::ClientConfig>,
    run_id: u64,
) -> anyhow::Result<Vec<Arc<Target>>> {
    let mut out = Vec::new();
    for (i, (tier, address)) in config.receivers.destinations().into_iter().enumerate() {
        let (host, _) = split_host_port(address).context("validated address")?;
        let name = config.tls.server_name.clone().unwrap_or_else(|| host.to_string());
        let server_name =
            rustls::pki_types::ServerName::try_from(name.clone()).with_context(|| {
                format!("tls.server_name: {name:?} is not a DNS name or IP address")
            })?;
        out.push(Arc::new(Target {
            destination: i,
            tier,
            address: address.to_string(),
            server_name,
            tls: tls.clone(),
            run_id,
        }));
    }
    Ok(out)
}
