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
/// watches the io_uring), and only then reads, through the io_uring, on a duplicate of the
/// descriptor. Waiting for readiness can be given up at `stop` at no cost; a parked io_uring
/// read cannot (tokio-uring does not cancel a read whose future is dropped: it would still
/// take the next bytes written and nobody would see them). So a read goes through the ring
/// only when FIONREAD says bytes are there (and only this task reads): it completes at once
/// and is always awaited to its end (readiness can be stale; with nothing there, or an empty
/// datagram, a non-blocking `read(2)` finds out instead of a ring read parking): nothing is
/// in flight once this returns, which is what lets a takeover hand the descriptor to the next
/// process without losing or splitting a line (`runtime::takeover`). Reading through the ring,
/// not with `read(2)` in a loop, makes every read one turn of the worker's event loop, in
/// turn with the connections' sends: a writer that keeps the pipe full cannot keep the worker
/// reading while the outbox overflows (measured: `pipe-throughput` delivered 11% of its lines
/// with `read(2)` in a loop, all of them this way).
pub async fn read_until_stopped(
    file: std::fs::File,
    capacity: usize,
    mut stop: watch::Receiver<bool>,
    mut on_read: impl FnMut(&[u8]),
    mut on_error: impl FnMut(&io::Error),
) {
    let register = |file: &std::fs::File| {
        let watch = file.try_clone()?;
        // SAFETY: a `File` owns its descriptor: it stays open, the same, until the `AsyncFd`
        // holding the `File` is dropped.
        unsafe { AsyncFd::register_with_interest(watch, Interest::READABLE) }
            .map_err(io::Error::from)
    };
    let ready = match set_nonblocking(&file).and_then(|()| register(&file)) {
        Ok(r) => r,
        Err(e) => {
            on_error(&e);
            return;
        }
    };
    let file = tokio_uring::fs::File::from_std(file);
    let mut buf = Vec::with_capacity(capacity);
    loop {
        if *stop.borrow() {
            break;
        }
        // Biased: once stopped, never one more read (the worker has sealed what was read).
        let mut guard = tokio::select! {
            biased;
            _ = stop.changed() => break,
            g = ready.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    on_error(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Through the ring only when bytes are there (only this task reads), so the read
        // completes at once; otherwise (nothing, or an empty datagram) with `read(2)`.
        let res = match bytes_ready(&file) {
            Ok(0) => {
                buf.resize(capacity, 0);
                read_once(file.as_raw_fd(), &mut buf).inspect(|&n| buf.truncate(n))
            }
            Ok(_) => {
                buf.clear();
                let (res, b) = file.read_at(buf, 0).await;
                buf = b;
                res
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(n) => on_read(&buf[..n]),
            // All was read: wait for the next readiness.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                on_error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = file.close().await;
}

/// Reads, with non-blocking `read(2)`s into a buffer of `capacity` bytes, what `file` (a FIFO)
/// holds at the call, handing it to `on_read`: at a stop, what writers wrote before it
/// (at most the pipe's size), instead of leaving it in the kernel for a next reader that may
/// never come. An error ends it and is returned (what was left unread is lost with the FIFO):
/// this is a last look, not a read loop.
pub fn drain(
    file: &std::fs::File,
    capacity: usize,
    mut on_read: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut left = bytes_ready(file)?;
    let mut buf = vec![0u8; capacity.min(left)];
    while left > 0 {
        match read_once(file.as_raw_fd(), &mut buf)? {
            0 => break,
            n => {
                on_read(&buf[..n]);
                left = left.saturating_sub(n);
            }
        }
    }
    Ok(())
}

/// Bytes ready to read on `file` (FIONREAD: a pipe's content, a datagram socket's next
/// datagram, an inotify descriptor's events).
fn bytes_ready(file: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// One non-blocking `read(2)` of `fd` into `buf`.
fn read_once(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; the caller keeps `fd` open.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
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
