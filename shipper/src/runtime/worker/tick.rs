//! The worker's ticker: it seals overdue batches, closes connections whose acks or heartbeats
//! are overdue, settles the quarantine's writes, takes what the control thread sent (shares, a
//! reload's rate limits) and, at the control-plane pace, reports its demand and publishes
//! counters; and it runs the shutdown. Beside it, the idle-seal timer ([`idle_seal_timer`]).
//!
//! # Design constraints
//! - The ticker runs every `min(flush_interval_ms, 50)` ms.
//! - One idle-seal timer per worker, whatever the number of batches: one `Sleep`, reset to
//!   the moment armed (tokio's timer wheel: it fires up to 1 ms late, never early).
//!
//! # Operation
//! On stop: sources stop reading (one holding a partial line hands it over first, or keeps
//! it for the next process in a takeover, and the worker waits for that), the open batch is
//! sealed, and the worker waits for the outbox to drain or `shutdown_timeout_ms` to pass (a
//! takeover's stop: at most [`TAKEOVER_STOP_MS`]). With a disk buffer, [`SPILL_MS`] before
//! the deadline the connections close and the frames still unacknowledged in memory are
//! written to the buffer, for the next run to send. What is still unacknowledged at the
//! deadline (not on disk, not a durable source's) is counted as dropped (reason `shutdown`)
//! and logged. Last, the worker waits (up to [`TIDY_GRACE_MS`] past the deadline) for the
//! disk buffer's segment deletions and fdatasyncs its newest segment, both through io_uring,
//! and makes the durable sources' marks durable.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Worker;
use crate::metrics::ledger::Fate;
use crate::metrics::shipper::ShipperCounters;
use crate::metrics::{Registry, PUBLISH_INTERVAL_MS};
use crate::protocol::Origin;
use crate::runtime::control::{DemandReport, ToControl, Update};
use crate::runtime::takeover::HandingOver;
use crate::sinks::delivery::Link;
use crate::transforms::services::DropReason;

/// The worker's side of the control plane: demand out, shares in; and whether a stop is a
/// takeover's.
pub struct Plane {
    pub reports: Sender<ToControl>,
    /// Shares, and a reload's new limits, taken every tick.
    pub shares: Receiver<Update>,
    /// Set before the stop when a takeover stops the worker: the wait for acknowledgements is
    /// then at most [`TAKEOVER_STOP_MS`], since nobody reads the sources meanwhile.
    pub handing_over: Arc<HandingOver>,
}

/// How long a takeover's stop waits for acknowledgements (at most `shutdown_timeout_ms`)
/// before what is left goes to the disk buffer: the pipes' buffers hold what writers write
/// meanwhile, so this is short; with a healthy receiver the acknowledgements take a round trip.
pub const TAKEOVER_STOP_MS: u64 = 2000;

/// The ticker's settings and where it is.
struct Ticker {
    rebalance_ns: u64,
    ack_timeout_ns: u64,
    shutdown_ns: u64,
    last_rebalance_ns: u64,
    last_publish_ns: u64,
    /// Set when the worker was told to stop.
    deadline_ns: Option<u64>,
    spilled: bool,
}

/// Runs the ticker until the worker has stopped (see the module docs).
pub async fn run(
    worker: Rc<RefCell<Worker>>,
    stop: watch::Receiver<bool>,
    plane: Plane,
    registry: Arc<Registry<ShipperCounters>>,
) {
    let (tick_ms, mut t) = {
        let w = worker.borrow();
        let cfg = &w.config;
        let ticker = Ticker {
            rebalance_ns: cfg.ratelimit.rebalance_interval_ms * 1_000_000,
            ack_timeout_ns: cfg.receivers.ack_timeout_ms * 1_000_000,
            shutdown_ns: cfg.shipper.shutdown_timeout_ms * 1_000_000,
            last_rebalance_ns: 0,
            last_publish_ns: 0,
            deadline_ns: None,
            spilled: false,
        };
        (cfg.batch.flush_interval_ms.clamp(1, 50), ticker)
    };
    let mut interval = tokio::time::interval(Duration::from_millis(tick_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut w = worker.borrow_mut();
        let now = w.now_ns();
        routine(&mut w, &mut t, &plane, now);
        if now - t.last_publish_ns >= PUBLISH_INTERVAL_MS * 1_000_000 || t.deadline_ns.is_some() {
            t.last_publish_ns = now;
            registry.publish(w.index, w.snapshot());
        }
        if *stop.borrow() && t.deadline_ns.is_none() {
            w.delivery.stopping = true;
            w.seal_all();
            w.delivery.wake.notify_waiters();
            if plane.handing_over.is_takeover() {
                t.shutdown_ns = t.shutdown_ns.min(TAKEOVER_STOP_MS * 1_000_000);
            }
            t.deadline_ns = Some(now + t.shutdown_ns);
            let frames = w.delivery.outbox.frames();
            tracing::info!(core = w.index, frames, "stopping: flushing");
        }
        if t.deadline_ns.is_some() && stopped(&mut w, &mut t, now) {
            break;
        }
    }
    finish_buffer(&worker).await;
    let mut w = worker.borrow_mut();
    for m in w.marks.iter().flatten() {
        if let Err(e) = m.borrow().sync() {
            tracing::error!("durable source's position not synced at shutdown: {e}");
        }
    }
    log_ledger(&w);
    registry.publish(w.index, w.snapshot());
    for h in w.delivery.conns.values() {
        h.stream.shutdown();
    }
}

/// Runs the worker's idle-seal timer until the worker stops: sleeps until the moment
/// [`Worker::arm_idle_seal`] set (woken earlier when armed for an earlier one), disarms, and
/// lets [`Worker::seal_if_idle`] seal what is now old enough if the worker is still idle. At
/// the stop, the ticker seals everything itself.
pub async fn idle_seal_timer(worker: Rc<RefCell<Worker>>) {
    let armed = worker.borrow().idle_seal_armed.clone();
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    loop {
        let (at, now) = {
            let w = worker.borrow();
            if w.delivery.stopping {
                return;
            }
            (w.idle_seal_at_ns, w.now_ns())
        };
        match at {
            None => armed.notified().await,
            Some(at) if at <= now => {
                let mut w = worker.borrow_mut();
                w.idle_seal_at_ns = None;
                w.seal_if_idle();
            }
            Some(at) => {
                let wait = Duration::from_nanos(at - now);
                sleep.as_mut().reset(tokio::time::Instant::now() + wait);
                tokio::select! {
                    () = &mut sleep => {}
                    () = armed.notified() => {}
                }
            }
        }
    }
}

/// Says at exit where every record each source handed over went; a record still held
/// (settled by no path) is an error: it is lost without a counter.
fn log_ledger(w: &Worker) {
    for l in &w.ledger {
        if l.held == 0 {
            tracing::info!(core = w.index, source = %l.source, "ledger at exit: {}", l.summary());
        } else {
            tracing::error!(core = w.index, source = %l.source, "ledger at exit: {}: records held at exit are lost uncounted (a bug)", l.summary());
        }
    }
}

/// Every tick: overdue batches, the quarantine's writes, overdue connections, and the
/// control plane at its pace.
fn routine(w: &mut Worker, t: &mut Ticker, plane: &Plane, now: u64) {
    w.seal_due(now);
    w.settle_quarantined();
    close_overdue(w, now, t.ack_timeout_ns);
    take_updates(w, plane, now);
    if now - t.last_rebalance_ns >= t.rebalance_ns {
        t.last_rebalance_ns = now;
        exchange_demand(w, plane);
        let idle_ns = w.config.ratelimit.services_idle_s.saturating_mul(1_000_000_000);
        let batches = &w.batches;
        w.chain.forget_idle(now, idle_ns, |id| batches.iter().any(|b| b.holds(id)));
    }
}

/// While stopping: whether the worker is done (everything acknowledged or on disk, or the
/// deadline passed); spills to the disk buffer when the deadline is near.
fn stopped(w: &mut Worker, t: &mut Ticker, now: u64) -> bool {
    let deadline = t.deadline_ns.expect("called while stopping");
    // What a source handed over as it stopped (a partial line) goes in the last frames.
    w.seal_all();
    if w.flushing > 0 && now < deadline {
        return false;
    }
    let unwritten =
        w.buffer.as_ref().is_some_and(|b| !b.pending.is_empty() || b.writing || b.tidy_busy())
            || w.quarantine.as_ref().is_some_and(|q| q.borrow().busy());
    if w.delivery.outbox.is_empty() && !unwritten {
        let on_disk = w.buffer.as_ref().map_or(0, |b| b.bytes());
        tracing::info!(
            core = w.index,
            "stopped: everything acknowledged or on disk ({on_disk} bytes buffered)"
        );
        return true;
    }
    if now >= deadline {
        leave(w, false);
        return true;
    }
    let spill_ns = (SPILL_MS * 1_000_000).min(t.shutdown_ns / 4);
    if !t.spilled && w.buffer.is_some() && now + spill_ns >= deadline {
        t.spilled = true;
        for h in w.delivery.conns.values() {
            h.stream.shutdown();
        }
        leave(w, true);
    }
    false
}

/// How long the worker waits past the shutdown deadline for the buffer's file work (deleting
/// replayed and evicted segments, counting an evicted one's records).
pub const TIDY_GRACE_MS: u64 = 5000;

/// At the end: lets the tidy task finish (a replayed segment left behind is sent again by
/// the next run, an evicted one delivered instead of dropped), then fdatasyncs the newest
/// segment, both through the worker's io_uring.
async fn finish_buffer(worker: &Rc<RefCell<Worker>>) {
    if worker.borrow().buffer.is_none() {
        return;
    }
    let wake = worker.borrow().delivery.wake.clone();
    let busy = || worker.borrow().buffer.as_ref().is_some_and(|b| b.tidy_busy());
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
        let w = worker.borrow();
        let b = w.buffer.as_ref().expect("checked above");
        if b.tidy_busy() {
            let left = b.tidy.len() + usize::from(b.tidying);
            tracing::error!(core = w.index, left, "disk buffer: segment deletions not done {TIDY_GRACE_MS} ms after the shutdown deadline: the next run replays those segments");
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
/// there for the next run, and durable frames (a durable source's records only: the worker
/// batches them apart) are read again from their marks; the others
/// go to the disk buffer when `spill` (applying `when_full`), each with its identity as its
/// origin (a receiver that wrote it recognises it when the next run sends it), else, with
/// what still waits to be written to the buffer, are dropped and counted.
fn leave(c: &mut Worker, spill: bool) {
    let (durable, mut left): (Vec<_>, Vec<_>) = c
        .delivery
        .outbox
        .drain()
        .into_iter()
        .filter(|f| f.origin.is_none())
        .partition(|f| !f.marks.is_empty());
    for f in &durable {
        c.settle(f, Fate::Reread);
    }
    if !durable.is_empty() {
        tracing::warn!(
            core = c.index,
            frames = durable.len(),
            "shutting down with journal entries unacknowledged: the next run reads them again from the checkpoint"
        );
    }
    if spill {
        let records: u64 = left.iter().map(|f| u64::from(f.records)).sum();
        let frames = left.len();
        for f in left {
            let mut f = Rc::try_unwrap(f).unwrap_or_else(|f| (*f).clone());
            // Its sequence number is taken (the frame may be written already): it keeps that
            // identity, under which the receiver recognises it when the next run sends it.
            let (run_id, core) = (c.delivery.run_id, c.index as u16);
            Origin { run_id, core, seq: f.seq }.stamp(&mut f.wire);
            c.buffer_push(f);
        }
        if frames > 0 {
            tracing::warn!(
                core = c.index,
                frames,
                records,
                "shutdown deadline near: unacknowledged frames go to the disk buffer for the next run (each keeps its identity: one a receiver wrote already is not written again)"
            );
        }
        return;
    }
    let pending = c.buffer.as_mut().map(|b| std::mem::take(&mut b.pending)).unwrap_or_default();
    left.extend(pending.into_iter().map(|(f, _)| Rc::new(f)));
    // Refused frames not written to the quarantine yet (a durable source's are read again).
    let refused = c.quarantine.as_ref().map(|q| q.borrow_mut().take_queued()).unwrap_or_default();
    let (refused, reread): (Vec<_>, Vec<_>) =
        refused.into_iter().filter(|f| f.origin.is_none()).partition(|f| f.marks.is_empty());
    for f in &reread {
        c.settle(f, Fate::Reread);
    }
    left.extend(refused);
    if left.is_empty() {
        return;
    }
    let records: u64 = left.iter().map(|f| u64::from(f.records)).sum();
    for f in &left {
        c.count_dropped(f, DropReason::Shutdown);
    }
    tracing::error!(
        core = c.index,
        frames = left.len(),
        records,
        "shutdown deadline passed with unacknowledged frames: dropped"
    );
}

/// Closes connections with an ack or heartbeat overdue; their frames are resent elsewhere.
fn close_overdue(c: &mut Worker, now: u64, ack_timeout_ns: u64) {
    let mut overdue = c.delivery.outbox.overdue(now.saturating_sub(ack_timeout_ns));
    for (id, h) in &c.delivery.conns {
        if h.heartbeat_sent_ns.is_some_and(|t| now.saturating_sub(t) > ack_timeout_ns) {
            overdue.push(*id);
        }
    }
    overdue.sort_unstable();
    overdue.dedup();
    for id in overdue {
        if let Some(dest) = c.delivery.conns.get(&id).map(|h| h.destination) {
            c.counters.ack_timeouts += 1;
            let ms = ack_timeout_ns / 1_000_000;
            c.down(dest, &format!("no acknowledgement within ack_timeout_ms ({ms} ms)"));
        }
    }
}

/// Sends the control thread what each service asked of this worker since the last time.
fn exchange_demand(w: &mut Worker, plane: &Plane) {
    let services = &mut w.chain.services;
    let demand = services
        .limiter
        .take_demand()
        .into_iter()
        .map(|(id, n)| (services.table.name(id).into(), n))
        .collect();
    let _ = plane.reports.send(ToControl::Demand(DemandReport { worker: w.index, demand }));
}

/// Takes what the control thread sent: shares, and a reload's new limits (applied at once,
/// so a new limit takes effect within a tick of the reload).
fn take_updates(w: &mut Worker, plane: &Plane, now: u64) {
    let services = &mut w.chain.services;
    while let Ok(update) = plane.shares.try_recv() {
        match update {
            Update::Shares(shares) => {
                for (name, share) in shares {
                    if let Some(id) = services.table.get(&name) {
                        services.limiter.set_share(id, share, now);
                    }
                }
            }
            Update::Limits(limits) => {
                services.set_limits(&limits, now);
                tracing::info!(core = w.index, "rate limits reloaded");
            }
        }
    }
}
