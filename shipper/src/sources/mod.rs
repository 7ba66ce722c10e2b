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
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
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

/// Reads `file` (a FIFO, a datagram socket, an inotify descriptor: a read returns what is
/// there, never blocks once the descriptor is made non-blocking here) into a buffer of
/// `capacity` bytes until `stop`, handing each read's bytes to `on_read`. A failed read goes to
/// `on_error` and is tried again 100 ms later.
///
/// It waits for readiness on the worker's reactor (epoll, through tokio's driver, which also
/// watches the io_uring) and then reads with a non-blocking `read(2)`, instead of parking an
/// io_uring read: tokio-uring does not cancel a read whose future is dropped, so a read parked
/// when `stop` comes would still take the next bytes written and nobody would see them. Here
/// nothing is in flight once this returns, which is what lets a takeover hand the descriptor
/// to the next process without losing or splitting a line (`runtime::takeover`).
pub async fn read_until_stopped(
    file: std::fs::File,
    capacity: usize,
    mut stop: watch::Receiver<bool>,
    mut on_read: impl FnMut(&[u8]),
    mut on_error: impl FnMut(&io::Error),
) {
    let register = |file| {
        // SAFETY: a `File` owns its descriptor: it stays open, the same, until the `AsyncFd`
        // holding the `File` is dropped.
        unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }
            .map_err(io::Error::from)
    };
    let ready = match set_nonblocking(&file).and_then(|()| register(file)) {
        Ok(r) => r,
        Err(e) => {
            on_error(&e);
            return;
        }
    };
    let mut buf = vec![0u8; capacity];
    loop {
        if *stop.borrow() {
            return;
        }
        // Biased: once stopped, never one more read (the worker has sealed what was read).
        let mut guard = tokio::select! {
            biased;
            _ = stop.changed() => return,
            g = ready.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    on_error(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // `try_io` forgets the readiness when the read would block (all was read).
        match guard.try_io(|f| read_once(f.get_ref(), &mut buf)) {
            Ok(Ok(n)) => on_read(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                on_error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_would_block) => {}
        }
    }
}

/// One `read(2)` into `buf`.
fn read_once(file: &std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; the descriptor is open while `file` is.
    let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Sets O_NONBLOCK on `file`'s open file description (shared with its duplicates).
pub fn set_nonblocking(file: &impl AsRawFd) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller holds open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
