//! The state one worker owns, and the per-record path through it.
//!
//! # Design constraints
//! - Everything here belongs to one thread (`Rc<RefCell<Core>>` shared by that thread's tasks
//!   only): no lock, no atomic, no allocation per record in the steady state. A `RefCell`
//!   borrow is never held across an `.await`.
//!
//! # Operation
//! For each line: count it, find its key (and cfjs1 format), intern the service, ask its
//! bucket, append it to the batch; a full batch is sealed into a frame and queued in the
//! outbox, or dropped and counted per service if the outbox is full.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::buffer::DiskBuffer;
use crate::config::shipper::{Format, RateLimitSection, ShipperConfig, Tier, WhenFull};
use crate::config::socket::{MessageFormat, Transport};
use crate::metrics::shipper::{
    DropReason, JournalCounters, ServiceCounters, ShipperCounters, SocketCounters, SourceCounters,
};
use crate::sinks::quarantine::Quarantine;
use crate::sinks::receiver::health::{Destinations, Failover, State};
use crate::sinks::receiver::{BatchBuilder, Outbox, Sealed};
use crate::sources::journal::checkpoint::Checkpoint;
use crate::tls::stream::TlsStream;
use crate::transforms::parse::Parser;
use crate::transforms::ratelimit::RateLimiter;
use crate::transforms::services::{bound_key, ServiceTable};
use crate::transforms::syslog;

/// Longest receiver reason kept for a refused frame (its log line and `.reason` file).
const REASON_BYTES_MAX: usize = 1024;

/// What the core knows of one of its sources.
pub struct SourceInfo {
    pub format: Format,
    /// Service id of lines without a key.
    pub service: u32,
}

/// What the core knows of one of its socket sources.
pub struct SocketInfo {
    pub format: MessageFormat,
    /// Service id of messages without APP-NAME / TAG / key, and of those that do not parse.
    pub service: u32,
    pub transport: Transport,
    /// The bound `ip:port` or path, as the kernel reports it (for the eBPF drop counters).
    pub local: String,
}

/// A live connection, so the ticker can close it on an ack or heartbeat timeout.
pub struct ConnHandle {
    pub stream: TlsStream,
    pub destination: usize,
    /// When a heartbeat was sent that has not been answered yet.
    pub heartbeat_sent_ns: Option<u64>,
}

pub struct Core {
    pub id: usize,
    pub config: Arc<ShipperConfig>,
    pub workers: usize,
    clock: Instant,
    pub sources: Vec<SourceInfo>,
    pub sockets: Vec<SocketInfo>,
    parser: Parser,
    /// Scratch for a syslog message rendered as JSON; reused, so it stops growing.
    record: Vec<u8>,
    pub services: ServiceTable,
    pub limiter: RateLimiter,
    batch: BatchBuilder,
    zstd: zstd::bulk::Compressor<'static>,
    pub outbox: Outbox,
    /// Where frames go when the outbox is full, if configured.
    pub buffer: Option<DiskBuffer>,
    /// Where frames a receiver refused for good go, if configured (its writer task shares it).
    pub quarantine: Option<Rc<RefCell<Quarantine>>>,
    /// Health of every receiver as this worker sees it.
    pub dests: Destinations,
    pub counters: ShipperCounters,
    /// Woken when the outbox has something to send or room in its window.
    pub wake: Rc<Notify>,
    pub conns: std::collections::BTreeMap<u64, ConnHandle>,
    /// Checkpoints of this worker's journal sources, by journal index.
    pub journals: Vec<Checkpoint>,
    next_conn: u64,
    pub stopping: bool,
}

impl Core {
    pub fn new(id: usize, config: Arc<ShipperConfig>) -> std::io::Result<Core> {
        let b = &config.batch;
        let r = &config.receivers;
        let mut counters = ShipperCounters::new(id);
        let destinations = r.destinations();
        counters.destinations = destinations
            .iter()
            .map(|(_, a)| crate::metrics::shipper::DestinationCounters {
                receiver: a.to_string(),
                ..Default::default()
            })
            .collect();
        counters.services.push(ServiceCounters {
            service: crate::transforms::services::OTHER_NAME.into(),
            ..Default::default()
        });
        let mut core = Core {
            id,
            workers: config.shipper.workers,
            clock: Instant::now(),
            sources: Vec::new(),
            sockets: Vec::new(),
            parser: Parser::default(),
            record: Vec::new(),
            services: ServiceTable::new(config.ratelimit.services_max),
            limiter: RateLimiter::default(),
            batch: BatchBuilder::new(b.batch_bytes_max as usize, b.batch_events_max),
            zstd: compressor(b.zstd_level, b.zstd_hash_log)?,
            outbox: Outbox::new(r.outbox_bytes_max as usize, r.inflight_frames_max),
            buffer: match &config.buffer.directory {
                Some(root) => Some(open_buffer(&config, root, id)?),
                None => None,
            },
            quarantine: match &config.quarantine.directory {
                Some(root) => Some(Rc::new(RefCell::new(open_quarantine(&config, root, id)?))),
                None => None,
            },
            dests: Destinations::new(&destinations),
            counters,
            wake: Rc::new(Notify::new()),
            conns: Default::default(),
            journals: Vec::new(),
            next_conn: 1,
            stopping: false,
            config,
        };
        let (rate, burst) =
            core.config.ratelimit.limit_for(crate::transforms::services::OTHER_NAME);
        core.limiter.add(0, rate, burst, 1.0 / core.workers as f64, 0);
        Ok(core)
    }

    /// Monotonic nanoseconds since the worker started.
    pub fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// Registers a source; returns its index.
    pub fn add_source(&mut self, name: String, format: Format, service: &str) -> usize {
        let service = self.intern(service.as_bytes());
        self.sources.push(SourceInfo { format, service });
        self.counters.sources.push(SourceCounters { source: name, ..Default::default() });
        self.sources.len() - 1
    }

    /// Registers a socket source; returns its socket index.
    pub fn add_socket(&mut self, name: String, info: SocketInfo) -> usize {
        self.counters.sockets.push(SocketCounters {
            source: name,
            transport: info.transport.label(),
            local: info.local.clone(),
            ..Default::default()
        });
        self.sockets.push(info);
        self.sockets.len() - 1
    }

    /// The id of service `name`, creating its bucket and counters on first sight.
    pub fn intern(&mut self, name: &[u8]) -> u32 {
        let now = self.now_ns();
        let rl = &self.config.ratelimit;
        let Core { services, limiter, counters, workers, .. } = self;
        intern(services, limiter, &mut counters.services, rl, *workers, now, name)
    }

    /// Registers a journal source; returns its journal index.
    pub fn add_journal(&mut self, name: String, checkpoint: Checkpoint) -> usize {
        self.counters.journals.push(JournalCounters { source: name, ..Default::default() });
        self.journals.push(checkpoint);
        self.journals.len() - 1
    }

    /// Whether a durable source may read: the outbox has room for two more full batches (the
    /// open one and the next), so nothing it reads can be refused.
    pub fn journal_room(&self) -> bool {
        self.outbox.fits(2 * self.config.batch.batch_bytes_max as usize)
    }

    /// One journal entry, rendered as `record`, for `service`, positioned at `cursor`.
    pub fn on_journal_entry(
        &mut self,
        j: usize,
        record: &[u8],
        service: &[u8],
        cursor: &[u8],
        now_ns: u64,
    ) {
        let jc = &mut self.counters.journals[j];
        jc.entries_read += 1;
        jc.bytes_read += record.len() as u64;
        let service = counted_cut(service, &mut jc.keys_truncated);
        let Core { config, services, limiter, counters, batch, workers, .. } = self;
        let rl = &config.ratelimit;
        let service =
            intern(services, limiter, &mut counters.services, rl, *workers, now_ns, service);
        let key = services.name(service);
        match admit(limiter, &mut counters.services, batch, service, key, record, now_ns) {
            Admitted::Dropped => {}
            Admitted::Batched { full } => {
                self.batch.mark(j, cursor);
                if full {
                    self.seal();
                }
            }
        }
    }

    pub fn next_conn_id(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }

    /// The per-record path: one line from source `src`, read at `now_ns`.
    #[inline]
    pub fn on_line(&mut self, src: usize, line: &[u8], truncated: bool, now_ns: u64) {
        let Core { config, parser, services, limiter, counters, batch, workers, .. } = self;
        let sc = &mut counters.sources[src];
        sc.lines_read += 1;
        sc.bytes_read += line.len() as u64 + 1;
        sc.lines_truncated += u64::from(truncated);
        if line.is_empty() {
            sc.lines_empty += 1;
            return;
        }
        let SourceInfo { format, service: default } = self.sources[src];
        let rl = &config.ratelimit;
        let (service, format_key) = match parser.extract(line, format, &rl.key_field) {
            Ok(fields) => {
                let service = match fields.key {
                    Some(k) => {
                        let k = counted_cut(k, &mut sc.keys_truncated);
                        intern(services, limiter, &mut counters.services, rl, *workers, now_ns, k)
                    }
                    None => default,
                };
                (service, fields.format.map(|f| counted_cut(f, &mut sc.keys_truncated)))
            }
            Err(failure) => {
                sc.parse_failures[failure as usize] += 1;
                (default, None)
            }
        };
        let key = format_key.unwrap_or_else(|| services.name(service));
        let admitted = admit(limiter, &mut counters.services, batch, service, key, line, now_ns);
        if let Admitted::Batched { full: true } = admitted {
            self.seal();
        }
    }

    /// The per-record path of socket sources: one message (datagram or TCP frame) from socket
    /// `s`; `oversize` when it was cut at `message_bytes_max`.
    pub fn on_message(&mut self, s: usize, message: &[u8], oversize: bool, now_ns: u64) {
        let Core { config, parser, services, limiter, counters, batch, workers, record, .. } = self;
        let sc = &mut counters.sockets[s];
        sc.messages_received += 1;
        sc.bytes_received += message.len() as u64;
        sc.messages_oversize += u64::from(oversize);
        if message.is_empty() {
            sc.messages_empty += 1;
            return;
        }
        let info = &self.sockets[s];
        let rl = &config.ratelimit;
        let svc = &mut counters.services;
        let cuts = &mut counters.sockets[s].keys_truncated;
        let parsed = match info.format.syntax() {
            None => match parser.extract(message, Format::Json, &rl.key_field) {
                Ok(fields) => Ok(match fields.key {
                    Some(k) => {
                        let k = counted_cut(k, cuts);
                        (intern(services, limiter, svc, rl, *workers, now_ns, k), message)
                    }
                    None => (info.service, message),
                }),
                Err(f) => Err(json_failure(f)),
            },
            Some(syntax) => syslog::parse(message, syntax).map(|m| {
                let service = match m.app {
                    Some(a) => {
                        let a = counted_cut(a.as_bytes(), cuts);
                        intern(services, limiter, svc, rl, *workers, now_ns, a)
                    }
                    None => info.service,
                };
                let name = m.app.map_or(services.name(info.service), str::as_bytes);
                record.clear();
                syslog::write_json(&m, &rl.key_field, name, record);
                (service, &record[..])
            }),
        };
        let (service, body) = parsed.unwrap_or_else(|f| {
            counters.sockets[s].parse_failures[f as usize] += 1;
            (info.service, message)
        });
        let key = services.name(service);
        let admitted = admit(limiter, &mut counters.services, batch, service, key, body, now_ns);
        if let Admitted::Batched { full: true } = admitted {
            self.seal();
        }
    }

    /// Seals the current batch (if any) into the outbox; when the outbox is full (or frames
    /// already wait in the disk buffer, which keeps them in order) into the disk buffer; when
    /// that is full too, or there is none, drops and counts it.
    pub fn seal(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let seq = self.outbox.next_seq();
        let mut frame = match self.batch.seal(&mut self.zstd, seq) {
            Ok(f) => f,
            Err(e) => panic!("zstd failed on an in-memory batch: {e}"),
        };
        let age_us = self.now_ns().saturating_sub(frame.first_ns) / 1000;
        frame.first_unix_us = crate::buffer::io::unix_us().saturating_sub(age_us);
        self.counters.batch_records.record(frame.records.into());
        self.counters.batch_bytes.record(frame.raw_bytes.into());
        // With every receiver down, frames go to disk rather than wait in memory, where a
        // crash would lose them.
        let to_disk = self.buffer.as_ref().is_some_and(|b| !b.is_empty() || self.dests.all_down());
        let durable = !frame.marks.is_empty();
        if durable || (!to_disk && self.outbox.has_room(frame.wire.len())) {
            for (j, cursor) in &frame.marks {
                self.journals[*j].sealed(frame.seq, cursor.clone());
            }
            match self.outbox.push(frame) {
                Ok(()) => self.wake.notify_waiters(),
                Err(frame) => self.count_dropped(&frame, DropReason::OutboxFull),
            }
            return;
        }
        if self.buffer.is_none() {
            return self.count_dropped(&frame, DropReason::OutboxFull);
        }
        self.buffer_push(frame);
    }

    /// Queues `frame` for the disk buffer, applying `when_full` when it does not fit.
    pub fn buffer_push(&mut self, frame: Sealed) {
        let names = frame.services.iter().map(|&(s, _)| self.services.name(s).len());
        let record_bytes = crate::buffer::format::record_bytes(frame.wire.len(), names);
        let b = self.buffer.as_mut().expect("checked by the caller");
        let frame = match b.push(frame, record_bytes) {
            Ok(()) => return self.wake.notify_waiters(),
            Err(frame) => frame,
        };
        // The evicted segment's records are counted when the tidy task has deleted its file.
        if b.when_full == WhenFull::DropOldest && b.evict_oldest() {
            return self.buffer_push(frame);
        }
        self.count_dropped(&frame, DropReason::BufferFull);
    }

    /// An evicted segment's file at `path` is deleted (or could not be): counts its records
    /// as dropped, `counts` per service id.
    pub fn count_evicted(&mut self, path: &std::path::Path, counts: &[(u32, u64)]) {
        for &(id, n) in counts {
            self.counters.services[id as usize].lines_dropped[DropReason::BufferFull as usize] += n;
        }
        if let Some(b) = self.buffer.as_mut() {
            b.counters.segments_dropped += 1;
        }
        let records: u64 = counts.iter().map(|c| c.1).sum();
        tracing::warn!(path = %path.display(), records, "disk buffer full: dropped its oldest segment (when_full = drop_oldest)");
    }

    /// Counts every record of `frame` as dropped for `reason`.
    pub fn count_dropped(&mut self, frame: &Sealed, reason: DropReason) {
        for &(service, n) in &frame.services {
            self.counters.services[service as usize].lines_dropped[reason as usize] += u64::from(n);
        }
    }

    /// The batch's first record is older than the flush interval.
    pub fn batch_due(&self, now_ns: u64) -> bool {
        let interval = self.config.batch.flush_interval_ms * 1_000_000;
        !self.batch.is_empty() && now_ns.saturating_sub(self.batch.first_ns()) >= interval
    }

    /// Frame `seq` was acknowledged.
    pub fn on_ack(&mut self, seq: u64, now_ns: u64) {
        if let Some(done) = self.outbox.ack(seq) {
            self.counters.frames_acked += 1;
            self.counters.records_acked += u64::from(done.frame.records);
            let us = now_ns.saturating_sub(done.frame.first_ns) / 1000;
            self.counters.latency_us.record(us);
            self.release(&done.frame);
        }
    }

    /// `frame`'s fate is decided for good (acknowledged, or refused and then kept or dropped):
    /// the buffer segment it came from and its journals' checkpoints may move past it.
    fn release(&mut self, frame: &Sealed) {
        if let (Some(ordinal), Some(b)) = (frame.origin, self.buffer.as_mut()) {
            b.acked(ordinal);
        }
        for (j, _) in &frame.marks {
            self.journals[*j].acked(frame.seq);
            self.counters.journals[*j].checkpoint_write_errors = self.journals[*j].write_errors();
        }
        self.wake.notify_waiters();
    }

    /// Receiver `dest` refused frame `seq` for good (REJECT, with `reason`): it never goes
    /// back to the queue. It goes to the dead-letter tier if one may take it and it was not
    /// refused there already, else to the quarantine, else it is dropped and counted.
    pub fn on_reject(&mut self, seq: u64, reason: &[u8], dest: usize) {
        let Some(done) = self.outbox.reject(seq) else {
            return;
        };
        self.counters.frames_rejected += 1;
        let reason = String::from_utf8_lossy(&reason[..reason.len().min(REASON_BYTES_MAX)]);
        let d = &self.dests.list[dest];
        let (tier, receiver) = (d.tier, d.address.clone());
        if tier != Tier::DeadLetter && self.dests.dead_letter_available() {
            self.log_reject(&done.frame, &receiver, &reason, "sent to the dead-letter tier");
            self.outbox.push_rejected(done.frame);
            self.wake.notify_waiters();
            return;
        }
        self.quarantine_or_drop(done.frame, &receiver, &reason);
    }

    /// Gives a refused frame to the quarantine, or drops and counts it when there is none or
    /// it is full.
    fn quarantine_or_drop(&mut self, frame: Rc<Sealed>, receiver: &str, reason: &str) {
        let Some(q) = self.quarantine.clone() else {
            self.log_reject(&frame, receiver, reason, "dropped (no quarantine.directory)");
            self.count_dropped(&frame, DropReason::Rejected);
            return self.release(&frame);
        };
        let mut text = format!("receiver: {receiver}\nreason: {reason}\n");
        text.push_str(&format!("seq: {}\nrecords: {}\n", frame.seq, frame.records));
        for &(s, n) in &frame.services {
            let name = String::from_utf8_lossy(self.services.name(s));
            text.push_str(&format!("service {name}: {n}\n"));
        }
        let pushed = q.borrow_mut().push(frame.clone(), text);
        match pushed {
            Ok(()) => {
                let fate = format!("kept in the quarantine ({})", q.borrow().dir().display());
                self.log_reject(&frame, receiver, reason, &fate);
            }
            Err(frame) => {
                self.log_reject(&frame, receiver, reason, "dropped (quarantine full)");
                self.count_dropped(&frame, DropReason::Rejected);
                self.release(&frame);
            }
        }
    }

    /// Logs a refused frame and its fate: every one while they are rare, then the 16th, 32nd,
    /// 64th, ... (a misconfiguration can have every frame refused).
    fn log_reject(&self, frame: &Sealed, receiver: &str, reason: &str, fate: &str) {
        let n = self.counters.frames_rejected;
        if n <= 8 || n.is_power_of_two() {
            tracing::warn!(core = self.id, %receiver, seq = frame.seq, records = frame.records, rejected_so_far = n, "receiver refused a frame for good: {reason}; {fate}");
        }
    }

    /// Settles the frames the quarantine wrote (or failed to) since the last call.
    pub fn settle_quarantined(&mut self) {
        let Some(q) = self.quarantine.clone() else {
            return;
        };
        let (kept, failed) = q.borrow_mut().take_settled();
        for f in &kept {
            self.release(f);
        }
        for f in &failed {
            self.count_dropped(f, DropReason::Rejected);
            self.release(f);
        }
    }

    /// Receiver `dest` welcomed a connection.
    pub fn dest_up(&mut self, dest: usize) {
        let now = self.now_ns();
        let (since, was) = (self.dests.list[dest].since_ns, self.dests.list[dest].state);
        let change = self.dests.up(dest, now);
        let d = &mut self.counters.destinations[dest];
        if was == State::Down {
            d.unhealthy_ms += now.saturating_sub(since) / 1_000_000;
            let address = &self.dests.list[dest].address;
            tracing::info!(core = self.id, receiver = %address, "receiver is healthy again after {} ms", now.saturating_sub(since) / 1_000_000);
        }
        self.on_failover(change, "a receiver recovered");
    }

    /// Receiver `dest` failed for `reason`: every connection to it is closed (their frames
    /// go back to the queue) and frames go elsewhere until a probe succeeds.
    pub fn dest_down(&mut self, dest: usize, reason: &str) {
        let now = self.now_ns();
        let was = self.dests.list[dest].state;
        let change = self.dests.down(dest, now);
        if was != State::Down {
            self.counters.destinations[dest].failures += 1;
            let d = &self.dests.list[dest];
            tracing::warn!(core = self.id, receiver = %d.address, tier = d.tier.label(), "receiver is down: {reason}");
        }
        for h in self.conns.values().filter(|h| h.destination == dest) {
            h.stream.shutdown();
        }
        if self.outbox.has_rejected() && !self.dests.dead_letter_available() {
            let address = self.dests.list[dest].address.clone();
            let why = format!("refused earlier, and the dead-letter tier is down too ({reason})");
            for frame in self.outbox.take_rejected() {
                self.quarantine_or_drop(frame, &address, &why);
            }
        }
        self.on_failover(change, reason);
    }

    fn on_failover(&mut self, change: Option<Failover>, why: &str) {
        let Some(Failover { from, to }) = change else {
            return;
        };
        let label =
            |t: Option<Tier>| t.map_or("none (frames wait in the outbox and buffer)", Tier::label);
        let (from_label, to_label) = (label(from), label(to));
        match (from, to) {
            (Some(f), Some(t)) if t < f => {
                self.counters.failbacks += 1;
                tracing::info!(
                    core = self.id,
                    "frames return from {from_label} to {to_label}: {why}"
                );
            }
            (Some(_), _) => {
                self.counters.failovers += 1;
                tracing::warn!(core = self.id, "failover from {from_label} to {to_label}: {why}");
            }
            (None, _) => tracing::info!(core = self.id, "frames go to {to_label}: {why}"),
        }
        self.wake.notify_waiters();
    }

    /// Copies gauges into the counters before they are published.
    pub fn refresh_gauges(&mut self) {
        if let Some(q) = &self.quarantine {
            self.counters.quarantine = q.borrow().counters.clone();
        }
        if let Some(b) = &self.buffer {
            self.counters.buffer = b.counters.clone();
            self.counters.buffer_bytes = b.bytes();
            self.counters.buffer_segments = b.segments.len() as u64;
        }
        let now = self.now_ns();
        for (d, c) in self.dests.list.iter().zip(&mut self.counters.destinations) {
            c.healthy = u64::from(d.state == State::Up);
            if d.state == State::Down {
                // Shown as closed periods plus the running one; dest_up closes it.
                c.unhealthy_ms_open = now.saturating_sub(d.since_ns) / 1_000_000;
            } else {
                c.unhealthy_ms_open = 0;
            }
        }
        self.counters.outbox_frames = self.outbox.frames() as u64;
        self.counters.outbox_bytes = self.outbox.bytes() as u64;
        self.counters.outbox_records = self.outbox.records();
        self.counters.inflight_frames = self.outbox.inflight() as u64;
    }
}

/// What the rate limiter made of a record.
enum Admitted {
    Dropped,
    /// In the batch; `full` when the batch must be sealed now.
    Batched {
        full: bool,
    },
}

/// The tail of every source's per-record path: the service's bucket, then the batch.
#[inline]
fn admit(
    limiter: &mut RateLimiter,
    counters: &mut [ServiceCounters],
    batch: &mut BatchBuilder,
    service: u32,
    key: &[u8],
    record: &[u8],
    now_ns: u64,
) -> Admitted {
    let svc = &mut counters[service as usize];
    if !limiter.admit(service, now_ns) {
        svc.lines_dropped[DropReason::RateLimit as usize] += 1;
        return Admitted::Dropped;
    }
    svc.lines_admitted += 1;
    Admitted::Batched { full: batch.push(key, record, service, now_ns) }
}

/// `key` cut to the protocol's key limit, counting the cut in `cuts`.
#[inline]
fn counted_cut<'k>(key: &'k [u8], cuts: &mut u64) -> &'k [u8] {
    let (key, cut) = bound_key(key);
    *cuts += u64::from(cut);
    key
}

/// The reason a JSON message on a socket is counted under.
fn json_failure(f: crate::transforms::parse::Failure) -> syslog::Failure {
    use crate::transforms::parse::Failure as F;
    match f {
        F::Utf8 => syslog::Failure::Utf8,
        F::NotObject => syslog::Failure::NotObject,
        F::Json | F::NoFormat => syslog::Failure::Json,
    }
}

/// Interns `name`, creating its bucket (with an even share until the control plane says
/// otherwise) and its counters on first sight.
fn intern(
    services: &mut ServiceTable,
    limiter: &mut RateLimiter,
    counters: &mut Vec<ServiceCounters>,
    rl: &RateLimitSection,
    workers: usize,
    now_ns: u64,
    name: &[u8],
) -> u32 {
    let (id, added) = services.intern(name);
    if added {
        let name = String::from_utf8_lossy(services.name(id)).into_owned();
        let (rate, burst) = rl.limit_for(&name);
        limiter.add(id, rate, burst, 1.0 / workers as f64, now_ns);
        counters.push(ServiceCounters { service: name, ..Default::default() });
        debug_assert_eq!(counters.len(), services.len(), "one counter set per service id");
    }
    id
}

/// Opens worker `core`'s disk buffer, saying what it found there.
fn open_buffer(
    config: &ShipperConfig,
    root: &std::path::Path,
    core: usize,
) -> std::io::Result<DiskBuffer> {
    let outbox = config.receivers.outbox_bytes_max;
    let (workers, modes) = (config.shipper.workers, config.shipper.modes());
    let b = DiskBuffer::open(&config.buffer, root, core, workers, outbox, modes).map_err(|e| {
        std::io::Error::new(e.kind(), format!("buffer.directory {}: {e}", root.display()))
    })?;
    if !b.segments.is_empty() {
        tracing::info!(core, dir = %b.dir.display(), segments = b.segments.len(), bytes = b.bytes(), "disk buffer: replaying what a previous run left");
    }
    Ok(b)
}

/// Opens worker `core`'s quarantine folder, saying what a previous run left there.
fn open_quarantine(
    config: &ShipperConfig,
    root: &std::path::Path,
    core: usize,
) -> std::io::Result<Quarantine> {
    let share = config.quarantine.bytes_max / config.shipper.workers as u64;
    let modes = config.shipper.modes();
    let q = Quarantine::open(root, core, share, modes).map_err(|e| {
        std::io::Error::new(e.kind(), format!("quarantine.directory {}: {e}", root.display()))
    })?;
    if q.counters.bytes > 0 {
        tracing::warn!(core, dir = %q.dir().display(), bytes = q.counters.bytes, "quarantine holds frames refused by a receiver in earlier runs");
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
