//! One worker thread: pinned to a CPU, running its own io_uring loop with the tasks of its
//! pipes, journals and sockets, its connection pool and its ticker.
//!
//! # Design constraints
//! - The ticker runs every `min(flush_interval_ms, 50)` ms: it seals overdue batches, closes
//!   connections whose acks or heartbeats are overdue, and, at the control-plane pace, trades
//!   demand for shares with the control thread and publishes counters.
//!
//! # Operation
//! On stop: pipe readers stop reading, the open batch is sealed, and the worker waits for the
//! outbox to drain or `shutdown_timeout_ms` to pass. With a disk buffer, [`SPILL_MS`] before
//! the deadline the connections close and the frames still unacknowledged in memory are
//! written to the buffer, for the next run to send. What is still unacknowledged at the
//! deadline (not on disk, not a journal's) is counted as dropped (reason `shutdown`) and
//! logged. Last, the worker waits (up to [`TIDY_GRACE_MS`] past the deadline) for the disk
//! buffer's segment deletions and fdatasyncs its newest segment, both through io_uring.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::control::{DemandReport, Shares};
use super::core::{Core, SocketInfo};
use crate::config::shipper::PipeSource;
use crate::config::ShipperConfig;
use crate::metrics::shipper::{DropReason, ShipperCounters};
use crate::metrics::{Registry, PUBLISH_INTERVAL_MS};
use crate::sinks::receiver::connection::{run_slot, Target};
use crate::sources::journal::checkpoint::Checkpoint;
use crate::sources::lines::LineSplitter;
use crate::sources::socket::run::{read_datagrams, serve_tcp, TcpLimits};
use crate::sources::socket::{Bound, BoundSocket};

/// A pipe opened by the main thread, handed to its worker.
pub struct PipeHandle {
    pub file: std::fs::File,
    pub config_index: usize,
}

/// A journal source and its checkpoint, opened by the main thread, handed to its worker.
pub struct JournalHandle {
    pub config_index: usize,
    pub checkpoint: Checkpoint,
}

/// A socket bound by the main thread, handed to its worker.
pub struct SocketHandle {
    pub config_index: usize,
    pub bound: BoundSocket,
}

/// Everything a worker thread starts with.
pub struct WorkerPlan {
    pub core: usize,
    pub cpu: Option<core_affinity::CoreId>,
    pub pipes: Vec<PipeHandle>,
    pub journals: Vec<JournalHandle>,
    pub sockets: Vec<SocketHandle>,
    pub config: Arc<ShipperConfig>,
    pub targets: Vec<Arc<Target>>,
    pub registry: Arc<Registry<ShipperCounters>>,
    pub reports: Sender<DemandReport>,
    pub shares: Receiver<Shares>,
    pub stop: watch::Receiver<bool>,
}

/// Runs the worker on the current thread until it has stopped.
pub fn run(plan: WorkerPlan) -> anyhow::Result<()> {
    if let Some(cpu) = plan.cpu {
        if !core_affinity::set_for_current(cpu) {
            tracing::warn!(core = plan.core, "could not pin worker to CPU {}", cpu.id);
        }
    }
    let ring_entries = 256;
    tokio_uring::builder().entries(ring_entries).start(work(plan))
}

async fn work(plan: WorkerPlan) -> anyhow::Result<()> {
    let core = Rc::new(RefCell::new(Core::new(plan.core, plan.config.clone())?));
    for pipe in plan.pipes {
        let cfg = &plan.config.sources.pipe[pipe.config_index];
        let name = cfg.path.display().to_string();
        let src = core.borrow_mut().add_source(name, cfg.format, &cfg.service_name());
        tokio_uring::spawn(read_pipe(
            core.clone(),
            src,
            pipe.file,
            cfg_limits(cfg),
            plan.stop.clone(),
        ));
    }
    for handle in plan.journals {
        let cfg = Rc::new(plan.config.sources.journal[handle.config_index].clone());
        let j = core.borrow_mut().add_journal(cfg.name(), handle.checkpoint);
        tokio_uring::spawn(crate::sources::journal::source::run(
            core.clone(),
            j,
            cfg,
            plan.stop.clone(),
        ));
    }
    if let Some(q) = core.borrow().quarantine.clone() {
        tokio_uring::spawn(crate::sinks::quarantine::write_loop(q));
    }
    if core.borrow().buffer.is_some() {
        tokio_uring::spawn(crate::buffer::io::write_loop(core.clone(), plan.stop.clone()));
        tokio_uring::spawn(crate::buffer::io::replay_loop(core.clone(), plan.stop.clone()));
        tokio_uring::spawn(crate::buffer::io::tidy_loop(core.clone()));
    }
    for handle in plan.sockets {
        start_socket(&core, handle, &plan.config, &plan.stop);
    }
    for target in &plan.targets {
        for _ in 0..plan.config.receivers.connections {
            tokio_uring::spawn(run_slot(core.clone(), target.clone(), plan.stop.clone()));
        }
    }
    if plan.core == 0 && crate::fault::injected(crate::fault::Fault::PanicWorkerTask) {
        tokio_uring::spawn(crate::fault::panic_worker_task("worker"));
    }
    tick(core, plan.stop, plan.reports, plan.shares, plan.registry).await;
    Ok(())
}

/// Registers a socket source with the core and spawns its reading task.
fn start_socket(
    core: &Rc<RefCell<Core>>,
    handle: SocketHandle,
    config: &ShipperConfig,
    stop: &watch::Receiver<bool>,
) {
    let cfg = &config.sources.socket[handle.config_index];
    let local = handle.bound.local;
    let s = {
        let mut c = core.borrow_mut();
        let service = c.intern(cfg.service_name().as_bytes());
        let transport = cfg.transport.label();
        tracing::info!(core = c.id, source = %cfg.name, transport, %local, "socket source reading");
        let info = SocketInfo { format: cfg.format, service, transport: cfg.transport, local };
        c.add_socket(cfg.name.clone(), info)
    };
    let max = cfg.message_bytes_max as usize;
    match handle.bound.socket {
        Bound::Datagram(fd) => {
            tokio_uring::spawn(read_datagrams(core.clone(), s, fd, max, stop.clone()));
        }
        Bound::Listener(listener) => {
            let limits = TcpLimits {
                framing: cfg.framing_or_default(),
                message_bytes_max: max,
                connections_max: cfg.connections_max_or_default(),
                idle_timeout: cfg.idle_timeout_or_default(),
            };
            tokio_uring::spawn(serve_tcp(core.clone(), s, listener, limits, stop.clone()));
        }
    }
}

fn cfg_limits(cfg: &PipeSource) -> (usize, usize) {
    (cfg.read_bytes as usize, cfg.line_bytes_max as usize)
}

async fn read_pipe(
    core: Rc<RefCell<Core>>,
    src: usize,
    file: std::fs::File,
    (read_bytes, line_max): (usize, usize),
    stop: watch::Receiver<bool>,
) {
    let file = tokio_uring::fs::File::from_std(file);
    let mut splitter = LineSplitter::new(line_max);
    let on_read = |bytes: &[u8]| {
        let mut c = core.borrow_mut();
        let now = c.now_ns();
        splitter.split(bytes, |line| c.on_line(src, line.bytes, line.truncated, now));
    };
    let on_error = |e: &std::io::Error| {
        let mut c = core.borrow_mut();
        let sc = &mut c.counters.sources[src];
        sc.read_errors += 1;
        tracing::error!(path = %sc.source, "pipe read failed: {e}; retrying in 100 ms");
    };
    crate::sources::read_until_stopped(file, read_bytes, stop, on_read, on_error).await;
}

async fn tick(
    core: Rc<RefCell<Core>>,
    stop: watch::Receiver<bool>,
    reports: Sender<DemandReport>,
    shares: Receiver<Shares>,
    registry: Arc<Registry<ShipperCounters>>,
) {
    let (tick_ms, rebalance_ms, ack_timeout_ns, shutdown_ms) = {
        let c = core.borrow();
        let cfg = &c.config;
        (
            cfg.batch.flush_interval_ms.clamp(1, 50),
            cfg.ratelimit.rebalance_interval_ms,
            cfg.receivers.ack_timeout_ms * 1_000_000,
            cfg.shipper.shutdown_timeout_ms,
        )
    };
    let mut interval = tokio::time::interval(Duration::from_millis(tick_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_rebalance, mut last_publish) = (0u64, 0u64);
    let mut deadline_ns = None;
    let mut spilled = false;
    loop {
        interval.tick().await;
        let mut c = core.borrow_mut();
        let now = c.now_ns();
        if c.batch_due(now) {
            c.seal();
        }
        c.settle_quarantined();
        close_overdue(&mut c, now, ack_timeout_ns);
        if now - last_rebalance >= rebalance_ms * 1_000_000 {
            last_rebalance = now;
            exchange_demand(&mut c, &reports, &shares, now);
        }
        if now - last_publish >= PUBLISH_INTERVAL_MS * 1_000_000 || deadline_ns.is_some() {
            last_publish = now;
            c.refresh_gauges();
            registry.publish(c.id, c.counters.clone());
        }
        if *stop.borrow() && deadline_ns.is_none() {
            c.stopping = true;
            c.seal();
            c.wake.notify_waiters();
            deadline_ns = Some(now + shutdown_ms * 1_000_000);
            tracing::info!(core = c.id, frames = c.outbox.frames(), "stopping: flushing");
        }
        let Some(deadline) = deadline_ns else {
            continue;
        };
        let unwritten =
            c.buffer.as_ref().is_some_and(|b| !b.pending.is_empty() || b.writing || b.tidy_busy())
                || c.quarantine.as_ref().is_some_and(|q| q.borrow().busy());
        if c.outbox.is_empty() && !unwritten {
            let on_disk = c.buffer.as_ref().map_or(0, |b| b.bytes());
            tracing::info!(
                core = c.id,
                "stopped: everything acknowledged or on disk ({on_disk} bytes buffered)"
            );
            break;
        }
        if now >= deadline {
            leave(&mut c, false);
            break;
        }
        let spill_ns = SPILL_MS.min(shutdown_ms / 4) * 1_000_000;
        if !spilled && c.buffer.is_some() && now + spill_ns >= deadline {
            spilled = true;
            for h in c.conns.values() {
                h.stream.shutdown();
            }
            leave(&mut c, true);
        }
    }
    finish_buffer(&core).await;
    let mut c = core.borrow_mut();
    for cp in &c.journals {
        if let Err(e) = cp.sync() {
            tracing::error!("journal checkpoint not synced at shutdown: {e}");
        }
    }
    c.refresh_gauges();
    registry.publish(c.id, c.counters.clone());
    for h in c.conns.values() {
        h.stream.shutdown();
    }
}

/// How long the worker waits past the shutdown deadline for the buffer's file work (deleting
/// replayed and evicted segments, counting an evicted one's records).
pub const TIDY_GRACE_MS: u64 = 5000;

/// At the end: lets the tidy task finish (a replayed segment left behind is sent again by
/// the next run, an evicted one delivered instead of dropped), then fdatasyncs the newest
/// segment, both through the worker's io_uring.
async fn finish_buffer(core: &Rc<RefCell<Core>>) {
    if core.borrow().buffer.is_none() {
        return;
    }
    let wake = core.borrow().wake.clone();
    let busy = || core.borrow().buffer.as_ref().is_some_and(|b| b.tidy_busy());
    let grace = tokio::time::sleep(Duration::from_millis(TIDY_GRACE_MS));
    tokio::pin!(grace);
    // The tidy task wakes `wake` after each entry.
    while busy() {
        tokio::select! {
            _ = &mut grace => break,
            _ = wake.notified() => {}
        }
    }
    let newest = {
        let c = core.borrow();
        let b = c.buffer.as_ref().expect("checked above");
        if b.tidy_busy() {
            let left = b.tidy.len() + usize::from(b.tidying);
            tracing::error!(core = c.id, left, "disk buffer: segment deletions not done {TIDY_GRACE_MS} ms after the shutdown deadline: the next run replays those segments");
        }
        b.segments.back().map(|s| s.path.clone())
    };
    let Some(path) = newest else {
        return;
    };
    let synced = match tokio_uring::fs::File::open(&path).await {
        Ok(f) => {
            let synced = f.sync_data().await;
            let _ = f.close().await;
            synced
        }
        Err(e) => Err(e),
    };
    if let Err(e) = synced {
        tracing::error!(path = %path.display(), "disk buffer not synced at shutdown: {e}");
    }
}

/// How long before the shutdown deadline (at most a quarter of `shutdown_timeout_ms`) the
/// frames unacknowledged in memory are written to the disk buffer, if there is one.
pub const SPILL_MS: u64 = 1000;

/// At shutdown, what is still unacknowledged: frames read back from the disk buffer stay
/// there for the next run, and journal entries are read again from the checkpoint; the others
/// go to the disk buffer when `spill` (applying `when_full`), else, with what still waits to
/// be written to the buffer, are dropped and counted.
fn leave(c: &mut Core, spill: bool) {
    let (durable, mut left): (Vec<_>, Vec<_>) = c
        .outbox
        .drain()
        .into_iter()
        .filter(|f| f.origin.is_none())
        .partition(|f| !f.marks.is_empty());
    if !durable.is_empty() {
        tracing::warn!(
            core = c.id,
            frames = durable.len(),
            "shutting down with journal entries unacknowledged: the next run reads them again from the checkpoint"
        );
    }
    if spill {
        let records: u64 = left.iter().map(|f| u64::from(f.records)).sum();
        let frames = left.len();
        for f in left {
            c.buffer_push(Rc::try_unwrap(f).unwrap_or_else(|f| (*f).clone()));
        }
        if frames > 0 {
            tracing::warn!(
                core = c.id,
                frames,
                records,
                "shutdown deadline near: unacknowledged frames go to the disk buffer for the next run (any already written by a receiver will arrive twice)"
            );
        }
        return;
    }
    let pending = c.buffer.as_mut().map(|b| std::mem::take(&mut b.pending)).unwrap_or_default();
    left.extend(pending.into_iter().map(|(f, _)| Rc::new(f)));
    // Refused frames not written to the quarantine yet (a journal's are read again).
    let refused = c.quarantine.as_ref().map(|q| q.borrow_mut().take_queued()).unwrap_or_default();
    left.extend(refused.into_iter().filter(|f| f.origin.is_none() && f.marks.is_empty()));
    if left.is_empty() {
        return;
    }
    let records: u64 = left.iter().map(|f| u64::from(f.records)).sum();
    for f in &left {
        c.count_dropped(f, DropReason::Shutdown);
    }
    tracing::error!(
        core = c.id,
        frames = left.len(),
        records,
        "shutdown deadline passed with unacknowledged frames: dropped"
    );
}

/// Closes connections with an ack or heartbeat overdue; their frames are resent elsewhere.
fn close_overdue(c: &mut Core, now: u64, ack_timeout_ns: u64) {
    let mut overdue = c.outbox.overdue(now.saturating_sub(ack_timeout_ns));
    for (id, h) in &c.conns {
        if h.heartbeat_sent_ns.is_some_and(|t| now.saturating_sub(t) > ack_timeout_ns) {
            overdue.push(*id);
        }
    }
    overdue.sort_unstable();
    overdue.dedup();
    for id in overdue {
        if let Some(dest) = c.conns.get(&id).map(|h| h.destination) {
            c.counters.ack_timeouts += 1;
            let ms = ack_timeout_ns / 1_000_000;
            c.dest_down(dest, &format!("no acknowledgement within ack_timeout_ms ({ms} ms)"));
        }
    }
}

fn exchange_demand(
    c: &mut Core,
    reports: &Sender<DemandReport>,
    shares: &Receiver<Shares>,
    now: u64,
) {
    let demand = c
        .limiter
        .take_demand()
        .into_iter()
        .map(|(id, n)| (c.services.name(id).into(), n))
        .collect();
    let _ = reports.send(DemandReport { core: c.id, demand });
    while let Ok(update) = shares.try_recv() {
        for (name, share) in update {
            if let Some(id) = c.services.get(&name) {
                c.limiter.set_share(id, share, now);
            }
        }
    }
}
