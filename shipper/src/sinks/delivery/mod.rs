//! Delivery to receivers (`shipper receive`): batch builder, outbox of unacknowledged frames,
//! each receiver's health, and the pool of TLS connections of one worker. The connections
//! know the worker only as a [`Link`]: they take frames from the [`Delivery`] state and report
//! acknowledgements, refusals and health through it.
//!
//! # Design constraints
//! - Per worker: one batch of at most `batch_bytes_max` / `batch_events_max`; an outbox of at
//!   most `outbox_bytes_max` compressed bytes (queued plus in flight); at most
//!   `inflight_frames_max` frames sent and unacknowledged; `connections` per receiver.
//!
//! # Operation
//! A sealed batch becomes one zstd-compressed DATA frame with the worker's next sequence
//! number and enters the outbox (or, if the outbox is full, is dropped and counted per
//! service). Connection tasks take frames from the outbox, send them, and the matching ACK
//! releases them. A failed connection or an ack missing `ack_timeout_ms` puts that
//! connection's frames back at the front of the queue, to be resent on another connection.

pub mod batch;
pub mod connection;
pub mod health;
pub mod outbox;
pub mod resolve;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::Notify;

pub use batch::{BatchBuilder, SealReason, Sealed};
pub use outbox::Outbox;

use crate::clock::Clock;
use crate::config::shipper::{ShipperConfig, Tier};
use crate::tls::stream::TlsStream;
use health::{DestinationCounters, Destinations, Failover, State};

/// Counters of a worker's delivery to receivers.
#[derive(Clone, Debug, Default)]
pub struct DeliveryCounters {
    /// Times frames moved to a lower tier (or nowhere) because the tier taking them failed.
    pub failovers: u64,
    /// Times frames moved back to a higher tier that recovered.
    pub failbacks: u64,
    pub frames_sent: u64,
    pub frame_bytes_sent: u64,
    /// Frames that were in flight on a connection that failed, requeued.
    pub frames_resent: u64,
    pub frames_dead_lettered: u64,
    pub destinations: Vec<DestinationCounters>,
}

/// A live connection, so the ticker can close it on an ack or heartbeat timeout.
pub struct ConnHandle {
    pub stream: TlsStream,
    pub destination: usize,
    /// When a heartbeat was sent that has not been answered yet.
    pub heartbeat_sent_ns: Option<u64>,
}

/// What a worker's connections share: the outbox, each receiver's health, the open
/// connections and their counters. The worker owns it; connections reach it through
/// [`Link`].
pub struct Delivery {
    /// The worker's index (HELLO's `core`).
    pub worker: usize,
    /// This process's run id (HELLO's `run_id`): with `worker` and a frame's `seq`, the
    /// identity a frame keeps when it goes to the disk buffer ([`crate::protocol::Origin`]).
    pub run_id: u64,
    pub config: Arc<ShipperConfig>,
    pub clock: Clock,
    pub outbox: Outbox,
    /// Health of every receiver as this worker sees it.
    pub dests: Destinations,
    pub conns: BTreeMap<u64, ConnHandle>,
    next_conn: u64,
    /// Woken when the outbox has something to send or room in its window.
    pub wake: Rc<Notify>,
    pub counters: DeliveryCounters,
    /// The worker stops: connections end once the outbox is empty.
    pub stopping: bool,
}

impl Delivery {
    pub fn new(worker: usize, config: Arc<ShipperConfig>, clock: Clock) -> Delivery {
        let r = &config.receivers;
        let destinations = r.destinations();
        let counters = DeliveryCounters {
            destinations: destinations
                .iter()
                .map(|(_, a)| DestinationCounters { receiver: a.to_string(), ..Default::default() })
                .collect(),
            ..Default::default()
        };
        Delivery {
            worker,
            run_id: 0,
            clock,
            outbox: Outbox::new(r.outbox_bytes_max as usize, r.inflight_frames_max),
            dests: Destinations::new(&destinations),
            conns: BTreeMap::new(),
            next_conn: 1,
            wake: Rc::new(Notify::new()),
            counters,
            stopping: false,
            config,
        }
    }

    pub fn next_conn_id(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }

    /// Receiver `dest` welcomed a connection; returns the change of tier, if any.
    pub fn up(&mut self, dest: usize) -> Option<Failover> {
        let now = self.clock.now_ns();
        let (since, was) = (self.dests.list[dest].since_ns, self.dests.list[dest].state);
        let change = self.dests.up(dest, now);
        if was == State::Down {
            let down_ms = now.saturating_sub(since) / 1_000_000;
            self.counters.destinations[dest].unhealthy_ms += down_ms;
            let address = &self.dests.list[dest].address;
            tracing::info!(core = self.worker, receiver = %address, "receiver is healthy again after {down_ms} ms");
        }
        change
    }

    /// Receiver `dest` failed for `reason`: every connection to it is closed (their frames
    /// go back to the queue) and frames go elsewhere until a probe succeeds. Returns the
    /// change of tier, if any.
    pub fn down(&mut self, dest: usize, reason: &str) -> Option<Failover> {
        let now = self.clock.now_ns();
        let was = self.dests.list[dest].state;
        let change = self.dests.down(dest, now);
        if was != State::Down {
            self.counters.destinations[dest].failures += 1;
            let d = &self.dests.list[dest];
            tracing::warn!(core = self.worker, receiver = %d.address, tier = d.tier.label(), "receiver is down: {reason}");
        }
        for h in self.conns.values().filter(|h| h.destination == dest) {
            h.stream.shutdown();
        }
        change
    }

    /// Logs and counts a change of the tier taking frames, and wakes the connections.
    pub fn failed_over(&mut self, change: Option<Failover>, why: &str) {
        let Some(Failover { from, to }) = change else {
            return;
        };
        let label =
            |t: Option<Tier>| t.map_or("none (frames wait in the outbox and buffer)", Tier::label);
        let (from_label, to_label, core) = (label(from), label(to), self.worker);
        match (from, to) {
            (Some(f), Some(t)) if t < f => {
                self.counters.failbacks += 1;
                tracing::info!(core, "frames return from {from_label} to {to_label}: {why}");
            }
            (Some(_), _) => {
                self.counters.failovers += 1;
                tracing::warn!(core, "failover from {from_label} to {to_label}: {why}");
            }
            (None, _) => tracing::info!(core, "frames go to {to_label}: {why}"),
        }
        self.wake.notify_waiters();
    }

    /// Copies the delivery's gauges into its counters before they are published.
    pub fn refresh_gauges(&mut self) {
        let now = self.clock.now_ns();
        for (d, c) in self.dests.list.iter().zip(&mut self.counters.destinations) {
            c.healthy = u64::from(d.state == State::Up);
            // Shown as closed periods plus the running one; `up` closes it.
            let down = d.state == State::Down;
            c.unhealthy_ms_open = if down { now.saturating_sub(d.since_ns) / 1_000_000 } else { 0 };
        }
    }
}

/// What a worker's connections need from the worker beyond [`Delivery`]: the fate of a
/// frame once a receiver answered, and what follows a receiver's change of health (a
/// refused frame waiting for the dead-letter tier may have to go to the quarantine).
pub trait Link {
    fn delivery(&self) -> &Delivery;
    fn delivery_mut(&mut self) -> &mut Delivery;
    /// Frame `seq` was acknowledged at `now_ns`.
    fn acked(&mut self, seq: u64, now_ns: u64);
    /// Receiver `dest` refused frame `seq` for good (REJECT) for `reason`.
    fn rejected(&mut self, seq: u64, reason: &[u8], dest: usize);
    /// Receiver `dest` welcomed a connection.
    fn up(&mut self, dest: usize);
    /// Receiver `dest` failed for `reason`.
    fn down(&mut self, dest: usize, reason: &str);
}
