//! The state one worker thread owns and how its stages meet: sources hand records to it
//! ([`Intake`]), the transform chain decides their service and fate, the batch seals them into
//! frames, and the frames go to the outbox, the disk buffer or a counted drop; connections
//! ([`crate::sinks::delivery::Link`]) and the disk buffer ([`crate::buffer::Spill`]) reach it
//! only through their traits.
//!
//! # Design constraints
//! - Everything here belongs to one thread (`Rc<RefCell<Worker>>` shared by that thread's
//!   tasks only): no lock, no atomic, no allocation per record in the steady state. A
//!   `RefCell` borrow is never held across an `.await`.
//! - Stages do not call back into the worker except through the trait they were given; the
//!   worker is the only place that knows every stage (`start.rs` assembles them).
//!
//! # Operation
//! For each record ([`Intake::record`]): the chain (`crate::transforms`) finds its service
//! and admits or drops it; an admitted record is appended to the batch (with its source's
//! durable mark); a full batch is sealed into a frame and queued in the outbox, or written to
//! the disk buffer, or dropped and counted per service if neither has room
//! ([`Worker::seal`]). Acknowledgements, refusals and health changes come back through
//! `Link` (`frames.rs`); the ticker (`tick.rs`) seals overdue batches, times out
//! connections, publishes counters and runs the shutdown.
//!
//! A batch is also sealed when the worker is idle ([`Worker::seal_if_idle`]: the sources had
//! nothing more ready, no frame is queued or in flight), once its first record is
//! `idle_seal_delay_ms` old. One that goes idle younger arms the worker's one idle-seal timer
//! (`tick.rs`) for the moment it comes of age; then the conditions are checked again, and if
//! they no longer hold the batch waits for the next trigger (full, interval, the
//! acknowledgement that empties the outbox, the next drained source).

mod frames;
pub mod start;
mod tick;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::buffer::DiskBuffer;
use crate::clock::Clock;
use crate::config::shipper::{ShipperConfig, WhenFull};
use crate::metrics::ledger::{Fate, SourceLedger};
use crate::metrics::shipper::ShipperCounters;
use crate::sinks::delivery::{BatchBuilder, Delivery, SealReason, Sealed};
use crate::sinks::quarantine::Quarantine;
use crate::sources::{Intake, Marks, Named, Outcome, Record, SourceId};
use crate::transforms::services::DropReason;
use crate::transforms::{Chain, Decode};

/// The batch of records without a mark.
const VOLATILE: usize = 0;
/// The batch of a durable source's records.
const DURABLE: usize = 1;

/// Copies one source's counters into the counters being published.
type Publisher = Box<dyn Fn(&mut ShipperCounters)>;

pub struct Worker {
    /// This worker's index (the `core` label of its metrics).
    pub index: usize,
    pub config: Arc<ShipperConfig>,
    clock: Clock,
    pub chain: Chain,
    /// The open batches: [`VOLATILE`] for records without a mark (pipes, sockets),
    /// [`DURABLE`] for a durable source's (journal), so that a frame is all one or the other:
    /// at shutdown a durable frame is read again from its marks, a volatile one spilled or
    /// counted, and never a mix whose volatile records nothing would account for.
    batches: [BatchBuilder; 2],
    zstd: zstd::bulk::Compressor<'static>,
    pub delivery: Delivery,
    /// Where frames go when the outbox is full, if configured.
    pub buffer: Option<DiskBuffer>,
    /// Where frames a receiver refused for good go, if configured (its writer task shares it).
    pub quarantine: Option<Rc<RefCell<Quarantine>>>,
    /// The positions of durable sources, by source id.
    marks: Vec<Option<Rc<RefCell<dyn Marks>>>>,
    /// The worker's own counters (acknowledgements, latency, batches, the outbox and buffer
    /// gauges); the sources', the services' and the delivery's are added when published.
    pub counters: ShipperCounters,
    /// One per source, in the order they were registered.
    publishers: Vec<Publisher>,
    /// Per source id: where the records it handed over went.
    pub ledger: Vec<SourceLedger>,
    /// A source said it had nothing more ready ([`Intake::drained`]) and no record came
    /// since.
    drained: bool,
    /// Sources that will hand over what they hold when they stop, and have not yet.
    flushing: usize,
    /// The floor on an idle seal (`idle_seal_delay_ms`), in ns.
    idle_seal_delay_ns: u64,
    /// The moment (worker clock, ns) the idle-seal timer is armed for, if it is.
    idle_seal_at_ns: Option<u64>,
    /// Wakes the idle-seal timer when it is armed for a moment earlier than it sleeps to.
    idle_seal_armed: Rc<Notify>,
}

impl Worker {
    pub fn new(
        index: usize,
        config: Arc<ShipperConfig>,
        feeds: &[Arc<crate::transforms::enrich::feed::Feed>],
    ) -> std::io::Result<Worker> {
        let b = &config.batch;
        let clock = Clock::start();
        Ok(Worker {
            index,
            clock,
            chain: Chain::new(
                &config.ratelimit,
                crate::transforms::enrich::Enrich::new(&config.transforms.enrich, feeds),
                config.shipper.workers,
            ),
            batches: [0, 1]
                .map(|_| BatchBuilder::new(b.batch_bytes_max as usize, b.batch_events_max)),
            zstd: compressor(b.zstd_level, b.zstd_hash_log)?,
            delivery: Delivery::new(index, config.clone(), clock),
            buffer: match &config.buffer.directory {
                Some(root) => Some(open_buffer(&config, root, index)?),
                None => None,
            },
            quarantine: match &config.quarantine.directory {
                Some(root) => Some(Rc::new(RefCell::new(open_quarantine(&config, root, index)?))),
                None => None,
            },
            marks: Vec::new(),
            counters: ShipperCounters::new(index),
            publishers: Vec::new(),
            ledger: Vec::new(),
            drained: false,
            flushing: 0,
            idle_seal_delay_ns: b.idle_seal_delay_ms().saturating_mul(1_000_000),
            idle_seal_at_ns: None,
            idle_seal_armed: Rc::new(Notify::new()),
            config,
        })
    }

    /// Monotonic nanoseconds since the worker started.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Registers a source decoded by `decode` (records without a key go to `service`, or to
    /// `_other`), durable through `marks` if given, counting into `counters`, which `publish`
    /// copies into the worker's counters each time they are published. Returns its id and its
    /// counters, shared with its task.
    pub fn add_source<C: Named + 'static>(
        &mut self,
        decode: Decode,
        service: Option<&str>,
        marks: Option<Rc<RefCell<dyn Marks>>>,
        counters: C,
        publish: impl Fn(&mut ShipperCounters, &C) + 'static,
    ) -> Registered<C> {
        let id = self.chain.add_source(decode, service, self.clock.now_ns());
        self.marks.push(marks);
        debug_assert_eq!(self.marks.len(), id.0 as usize + 1, "one entry per source");
        self.ledger.push(SourceLedger::new(counters.name()));
        let counters = Rc::new(RefCell::new(counters));
        let shared = counters.clone();
        self.publishers.push(Box::new(move |out| publish(out, &shared.borrow())));
        Registered { id, counters }
    }

    /// Seals the batches whose first record is older than the flush interval.
    pub fn seal_due(&mut self, now_ns: u64) {
        let interval = self.config.batch.flush_interval_ms * 1_000_000;
        for kind in [VOLATILE, DURABLE] {
            let b = &self.batches[kind];
            if !b.is_empty() && now_ns.saturating_sub(b.first_ns()) >= interval {
                self.seal(kind, SealReason::Interval);
            }
        }
    }

    /// Seals both open batches (at shutdown).
    pub fn seal_all(&mut self) {
        self.seal(VOLATILE, SealReason::Shutdown);
        self.seal(DURABLE, SealReason::Shutdown);
    }

    /// Seals the open batches now if that costs no throughput (`seal_when_idle`): the
    /// sources had nothing more ready, and no frame is queued or in flight, so a connection
    /// would otherwise sit idle while the records wait for `flush_interval_ms`. While frames
    /// are in flight, records go on filling the batch (as Nagle's algorithm does), and the
    /// acknowledgement that empties the outbox seals it. A batch younger than
    /// `idle_seal_delay_ms` is not sealed: the idle-seal timer is armed for the moment it
    /// comes of age, when this is called again.
    pub fn seal_if_idle(&mut self) {
        if !(self.drained
            && self.config.batch.seal_when_idle
            && self.delivery.outbox.frames() == 0
            && !self.delivery.dests.all_down())
        {
            return;
        }
        let now = self.clock.now_ns();
        let mut due: Option<u64> = None;
        for kind in [VOLATILE, DURABLE] {
            let b = &self.batches[kind];
            if b.is_empty() {
                continue;
            }
            let at = b.first_ns().saturating_add(self.idle_seal_delay_ns);
            if at <= now {
                self.seal(kind, SealReason::Idle);
            } else {
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        }
        if let Some(at) = due {
            self.arm_idle_seal(at);
        }
    }

    /// Arms the idle-seal timer for `at_ns` (worker clock) unless it is armed earlier; one
    /// armed earlier for a batch sealed since finds nothing to seal, or re-arms.
    fn arm_idle_seal(&mut self, at_ns: u64) {
        if self.idle_seal_at_ns.is_none_or(|t| at_ns < t) {
            self.idle_seal_at_ns = Some(at_ns);
            self.idle_seal_armed.notify_one();
        }
    }

    /// Seals batch `kind` (if not empty) into the outbox; when the outbox is full (or frames
    /// already wait in the disk buffer, which keeps them in order) into the disk buffer; when
    /// that is full too, or there is none, drops and counts it. A durable frame always goes
    /// to the outbox: its source paused before it could overfill it.
    fn seal(&mut self, kind: usize, reason: SealReason) {
        let batch = &mut self.batches[kind];
        if batch.is_empty() {
            return;
        }
        self.counters.batches_sealed[reason as usize] += 1;
        let outbox = &mut self.delivery.outbox;
        let table = &self.chain.services.table;
        let mut frame = match batch.seal(&mut self.zstd, outbox.next_seq(), |id| table.shared(id)) {
            Ok(f) => f,
            Err(e) => panic!("zstd failed on an in-memory batch: {e}"),
        };
        let age_us = self.clock.now_ns().saturating_sub(frame.first_ns) / 1000;
        frame.first_unix_us = crate::clock::unix_us().saturating_sub(age_us);
        self.counters.batch_records.record(frame.records.into());
        self.counters.batch_bytes.record(frame.raw_bytes.into());
        // With every receiver down, frames go to disk rather than wait in memory, where a
        // crash would lose them.
        let all_down = self.delivery.dests.all_down();
        let to_disk = self.buffer.as_ref().is_some_and(|b| !b.is_empty() || all_down);
        let durable = !frame.marks.is_empty();
        if durable || (!to_disk && outbox.has_room(frame.wire.len())) {
            for (source, mark) in &frame.marks {
                if let Some(m) = &self.marks[*source] {
                    m.borrow_mut().sealed(frame.seq, mark.clone());
                }
            }
            match outbox.push(frame) {
                Ok(()) => self.delivery.wake.notify_waiters(),
                Err(frame) => self.count_dropped(&frame, DropReason::OutboxFull),
            }
            return;
        }
        let Some(b) = self.buffer.as_mut() else {
            return self.count_dropped(&frame, DropReason::OutboxFull);
        };
        b.spill_origin(self.delivery.run_id, self.index).stamp(&mut frame.wire);
        self.buffer_push(frame);
    }

    /// Queues `frame` for the disk buffer, applying `when_full` when it does not fit.
    pub fn buffer_push(&mut self, frame: Sealed) {
        let names = frame.services.iter().map(|(s, _)| s.len());
        let record_bytes = crate::buffer::format::record_bytes(frame.wire.len(), names);
        let b = self.buffer.as_mut().expect("checked by the caller");
        let frame = match b.push(frame, record_bytes) {
            Ok(()) => return self.delivery.wake.notify_waiters(),
            Err(frame) => frame,
        };
        // The evicted segment's records are counted when the tidy task has deleted its file.
        if b.when_full == WhenFull::DropOldest && b.evict_oldest() {
            return self.buffer_push(frame);
        }
        self.count_dropped(&frame, DropReason::BufferFull);
    }

    /// Counts every record of `frame` as dropped for `reason`.
    pub fn count_dropped(&mut self, frame: &Sealed, reason: DropReason) {
        let now = self.clock.now_ns();
        for (service, n) in &frame.services {
            self.chain.services.dropped(service, u64::from(*n), reason, now);
        }
        self.settle(frame, Fate::Dropped(reason));
    }

    /// Settles `frame`'s records of this run's sources as `fate` in their ledgers.
    pub fn settle(&mut self, frame: &Sealed, fate: Fate) {
        for &(source, n) in &frame.sources {
            self.ledger[source as usize].settle(u64::from(n), fate);
        }
    }

    /// Whether a durable source may read: the outbox has room for two more full batches (the
    /// open one and the next), so nothing it reads can be refused.
    fn durable_room(&self) -> bool {
        self.delivery.outbox.fits(2 * self.config.batch.batch_bytes_max as usize)
    }

    /// Every counter of the worker, gauges refreshed, as published to the metrics registry.
    pub fn snapshot(&mut self) -> ShipperCounters {
        self.refresh_gauges();
        let mut c = self.counters.clone();
        for publish in &self.publishers {
            publish(&mut c);
        }
        c.services = self.chain.services.live_counters();
        c.services_retired = self.chain.services.retired.clone();
        c.services_forgotten = self.chain.services.forgotten;
        c.enrich = self.chain.enrich.counters(&self.config.transforms.enrich);
        c.delivery = self.delivery.counters.clone();
        c.ledger.clone_from(&self.ledger);
        c
    }

    /// Copies gauges into the counters before they are published.
    fn refresh_gauges(&mut self) {
        if let Some(q) = &self.quarantine {
            self.counters.quarantine = q.borrow().counters.clone();
        }
        if let Some(b) = &self.buffer {
            self.counters.buffer = b.counters.clone();
            self.counters.buffer_bytes = b.bytes();
            self.counters.buffer_segments = b.segments.len() as u64;
        }
        self.delivery.refresh_gauges();
        let outbox = &self.delivery.outbox;
        self.counters.outbox_frames = outbox.frames() as u64;
        self.counters.outbox_bytes = outbox.bytes() as u64;
        self.counters.outbox_records = outbox.records();
        self.counters.inflight_frames = outbox.inflight() as u64;
    }
}

/// A source registered with its worker: its id there and the counters it owns.
pub struct Registered<C> {
    pub id: SourceId,
    pub counters: Rc<RefCell<C>>,
}

impl Intake for Worker {
    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    #[inline]
    fn record(&mut self, source: SourceId, record: Record<'_>, now_ns: u64) -> Outcome {
        self.drained = false;
        let mark = record.mark;
        let (outcome, admitted) = self.chain.run(source, record, now_ns);
        let ledger = &mut self.ledger[source.0 as usize];
        if outcome.dropped {
            ledger.dropped_at_once(DropReason::RateLimit);
        }
        if let Some(a) = admitted {
            ledger.kept();
            let kind = if mark.is_some() { DURABLE } else { VOLATILE };
            let batch = &mut self.batches[kind];
            let full = batch.push(a.key, a.body, a.service, source.0, now_ns);
            if let Some(m) = mark {
                batch.mark(source.0 as usize, m);
            }
            if full {
                self.seal(kind, SealReason::Full);
            }
        }
        outcome
    }

    fn drained(&mut self) {
        self.drained = true;
        self.seal_if_idle();
    }

    fn paused(&self) -> bool {
        !self.durable_room()
    }

    fn resumed(&self) -> Rc<Notify> {
        self.delivery.wake.clone()
    }

    fn flushes_at_stop(&mut self) {
        self.flushing += 1;
    }

    fn flushed(&mut self) {
        self.flushing -= 1;
    }
}

/// Opens worker `index`'s disk buffer, saying what it found there.
fn open_buffer(
    config: &ShipperConfig,
    root: &std::path::Path,
    index: usize,
) -> std::io::Result<DiskBuffer> {
    let outbox = config.receivers.outbox_bytes_max;
    let (workers, modes) = (config.shipper.workers, config.shipper.modes());
    let b = DiskBuffer::open(&config.buffer, root, index, workers, outbox, modes).map_err(|e| {
        std::io::Error::new(e.kind(), format!("buffer.directory {}: {e}", root.display()))
    })?;
    if !b.segments.is_empty() {
        tracing::info!(core = index, dir = %b.dir.display(), segments = b.segments.len(), bytes = b.bytes(), "disk buffer: replaying what a previous run left");
    }
    Ok(b)
}

/// Opens worker `index`'s quarantine folder, saying what a previous run left there.
fn open_quarantine(
    config: &ShipperConfig,
    root: &std::path::Path,
    index: usize,
) -> std::io::Result<Quarantine> {
    let share = config.quarantine.bytes_max / config.shipper.workers as u64;
    let modes = config.shipper.modes();
    let q = Quarantine::open(root, index, share, modes).map_err(|e| {
        std::io::Error::new(e.kind(), format!("quarantine.directory {}: {e}", root.display()))
    })?;
    if q.counters.bytes > 0 {
        tracing::warn!(core = index, dir = %q.dir().display(), bytes = q.counters.bytes, "quarantine holds frames refused by a receiver in earlier runs");
    }
    Ok(q)
}

/// A zstd context at `level`, with `hash_log` when not 0 (see `docs/perf.md`: a 4K-entry hash
/// table stays in cache and compresses 1 MiB JSON batches ~18% faster at the same ratio).
fn compressor(level: i32, hash_log: u32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::new(level)?;
    if hash_log != 0 {
        z.set_parameter(zstd::zstd_safe::CParameter::HashLog(hash_log))?;
    }
    Ok(z)
}
