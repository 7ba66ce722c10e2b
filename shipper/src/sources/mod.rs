//! Where records come from. Each source is a task on one worker, given a narrow handle
//! ([`Intake`]) and nothing else of the worker: it hands over whole records (pipe lines,
//! socket messages, journal entries), learns whether to pause, and attaches durable marks
//! to records (a journal cursor) that come back through [`Marks`] once their frame is
//! acknowledged.
//! A source owns its counters; the worker only copies them when it publishes.

pub mod connections;
pub mod file;
pub mod forward;
pub mod journal;
pub mod lines;
pub mod persist;
pub mod pipe;
pub mod socket;

use std::io;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

pub use crate::record::{Outcome, Record, SourceId};

/// The handle a worker gives each of its sources: the one per-record entry point.
pub trait Intake {
    /// Monotonic nanoseconds on the worker's clock.
    fn now_ns(&self) -> u64;
    /// Hands over one record of `source`, read at `now_ns`.
    fn record(&mut self, source: SourceId, record: Record<'_>, now_ns: u64) -> Outcome;
    /// The source handed over everything it had ready (its last read came back short, or it
    /// reached the end of what is written): the worker may seal its batch now instead of
    /// waiting for `flush_interval_ms`.
    fn drained(&mut self);
    /// Whether a durable source must wait before reading more: what it reads now could
    /// find no room. Wait on [`Intake::resumed`] (or a poll interval), then ask again.
    fn paused(&self) -> bool;
    /// Woken whenever room may have come.
    fn resumed(&self) -> Rc<Notify>;
    /// The source holds bytes it hands over when it stops (a partial line): at shutdown the
    /// worker waits for its [`Intake::flushed`] (until the shutdown deadline) before it takes
    /// its last batch.
    fn flushes_at_stop(&mut self);
    /// The source has handed over everything it will.
    fn flushed(&mut self);
}

/// A source's counters, which carry its name: the `source` label of its metrics and ledger.
pub trait Named {
    fn name(&self) -> &str;
}

macro_rules! named_by_source_field {
    ($($counters:ty),*) => {
        $(impl Named for $counters {
            fn name(&self) -> &str {
                &self.source
            }
        })*
    };
}

named_by_source_field!(
    pipe::SourceCounters,
    journal::JournalCounters,
    file::FileCounters,
    socket::SocketCounters,
    forward::ForwardCounters
);

/// A durable source's positions, as the worker settles them: registered with the worker
/// when the source starts, told which frame holds which mark and which frames are done.
pub trait Marks {
    /// Frame `seq` holds the source's records up to `mark`.
    fn sealed(&mut self, seq: u64, mark: String);
    /// Frame `seq`'s fate is settled (acknowledged, or refused and kept or counted).
    fn settled(&mut self, seq: u64);
    /// Makes the latest settled position durable (at shutdown).
    fn sync(&self) -> io::Result<()>;
}

/// Reads `file` (a FIFO or a datagram socket: no position, offset 0 is ignored) into a buffer
/// of `capacity` bytes until `stop`, handing each read's bytes to `on_read`. A failed read
/// goes to `on_error` and is tried again 100 ms later.
pub async fn read_until_stopped(
    file: tokio_uring::fs::File,
    capacity: usize,
    mut stop: watch::Receiver<bool>,
    mut on_read: impl FnMut(&[u8]),
    mut on_error: impl FnMut(&io::Error),
) {
    let mut buf = Vec::with_capacity(capacity);
    loop {
        if *stop.borrow() {
            return;
        }
        buf.clear();
        let (res, b) = tokio::select! {
            r = file.read_at(buf, 0) => r,
            _ = stop.changed() => return,
        };
        buf = b;
        match res {
            Ok(n) => on_read(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                on_error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
