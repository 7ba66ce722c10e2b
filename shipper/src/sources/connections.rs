//! The open connections of a TCP-based source on one worker (`sources::socket` with tcp,
//! `sources::forward`): who sent what when, and which one to close when `connections_max` are
//! open. Shared by a source's acceptor and its connection tasks on the worker's thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A TCP source's listening socket on its worker. It accepts once readable (the worker's
/// reactor, as `sources::read_until_stopped` reads), with a non-blocking `accept4`, instead of
/// an io_uring accept: tokio-uring does not cancel an operation whose future is dropped, so an
/// accept in flight when the source stops would still take a connection and close it, while
/// a takeover has handed the listener (and the connections queued on it) to the next process.
pub struct Listener(AsyncFd<std::net::TcpListener>);

impl Listener {
    /// Makes `listener` non-blocking (its open file description: shared with its
    /// duplicates) and registers it with the worker's reactor.
    pub fn new(listener: std::net::TcpListener) -> std::io::Result<Listener> {
        listener.set_nonblocking(true)?;
        // SAFETY: the `TcpListener` owns its descriptor until the `AsyncFd` holding it drops.
        let ready = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
        Ok(Listener(ready.map_err(std::io::Error::from)?))
    }
}

/// The next connection on `listener`, or `None` once `stop` is set. A failed accept is
/// handed back for the source to count (and pause after: the error may repeat).
pub async fn accept(
    listener: &Listener,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<std::io::Result<(tokio_uring::net::TcpStream, SocketAddr)>> {
    loop {
        if *stop.borrow() {
            return None;
        }
        // Biased: once stopped, no connection is taken any more.
        let mut guard = tokio::select! {
            biased;
            _ = stop.changed() => return None,
            g = listener.0.readable() => match g {
                Ok(g) => g,
                Err(e) => return Some(Err(e)),
            },
        };
        // `try_io` forgets the readiness when no connection is queued any more. The stream
        // accepted is blocking (accept4 without SOCK_NONBLOCK), as io_uring wants it.
        match guard.try_io(|l| l.get_ref().accept()) {
            Ok(Ok((stream, peer))) => {
                return Some(Ok((tokio_uring::net::TcpStream::from_std(stream), peer)));
            }
            Ok(Err(e)) => return Some(Err(e)),
            Err(_would_block) => {}
        }
    }
}

/// Least time between two eviction warnings of one source on one worker: a flood of new
/// connections evicts at the rate it connects, the log says so once per interval.
const EVICTION_LOG_INTERVAL_NS: u64 = 10_000_000_000;

/// One open connection, as its source's acceptor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    pub fd: RawFd,
    pub peer: SocketAddr,
    /// When it last sent bytes (or was accepted), on the worker's clock.
    pub active_ns: u64,
}

/// The open connections of one TCP source on one worker, shared (`Rc<RefCell<_>>`) by its
/// acceptor and its connection tasks, all on the worker's thread. A connection is in the
/// table from accept until its task removes it or the acceptor evicts it, whichever is first;
/// its fd stays open at least that long (the task removes its entry before it drops the
/// stream), so the acceptor may `shutdown(2)` an fd it finds here.
#[derive(Debug, Default)]
pub struct Connections {
    open: HashMap<u64, Open>,
    next_id: u64,
    /// Evictions not logged yet, and when the last eviction warning was logged.
    evictions_unlogged: u64,
    logged_ns: Option<u64>,
}

impl Connections {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Adds a connection; returns its id.
    pub fn insert(&mut self, open: Open) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(id, open);
        id
    }

    /// Records that connection `id` sent bytes; false when it was evicted meanwhile.
    pub fn touch(&mut self, id: u64, now_ns: u64) -> bool {
        self.open.get_mut(&id).map(|o| o.active_ns = now_ns).is_some()
    }

    /// Removes connection `id`; false when it was evicted (and counted) already.
    pub fn remove(&mut self, id: u64) -> bool {
        self.open.remove(&id).is_some()
    }

    /// Removes and returns the connection that has sent nothing for the longest (the oldest
    /// on a tie). A scan of at most `connections_max` entries, only when the table is full.
    pub fn evict_idlest(&mut self) -> Option<Open> {
        let (&id, _) = self.open.iter().min_by_key(|(&id, o)| (o.active_ns, id))?;
        self.evictions_unlogged += 1;
        self.open.remove(&id)
    }

    /// Evictions to report now (at most once per [`EVICTION_LOG_INTERVAL_NS`]), or `None`.
    pub fn evictions_to_log(&mut self, now_ns: u64) -> Option<u64> {
        let due = self.logged_ns.is_none_or(|t| now_ns >= t + EVICTION_LOG_INTERVAL_NS);
        if !due || self.evictions_unlogged == 0 {
            return None;
        }
        self.logged_ns = Some(now_ns);
        Some(std::mem::take(&mut self.evictions_unlogged))
    }
}

/// A connection the acceptor closed to make room.
#[derive(Debug, PartialEq, Eq)]
pub struct Evicted {
    pub open: Open,
    /// Evictions to report now, this one included ([`Connections::evictions_to_log`]).
    pub to_log: Option<u64>,
}

impl Connections {
    /// Closes the connection that has sent nothing for the longest (the table is full):
    /// `shutdown(2)` on its fd ends its task's pending io_uring read (it returns 0) and tells
    /// the peer; the task then finds itself gone ([`Connections::touch`]) and closes the fd.
    pub fn evict(&mut self, now_ns: u64) -> Option<Evicted> {
        let open = self.evict_idlest()?;
        // SAFETY: `open.fd` is open: its task removes its entry before it drops (closes) the
        // stream, and the entry was still here.
        unsafe { libc::shutdown(open.fd, libc::SHUT_RDWR) };
        Some(Evicted { open, to_log: self.evictions_to_log(now_ns) })
    }

    /// Closes the longest-idle connection to make room (the table holds `max`), logging it
    /// at a bounded rate under `source`'s name; whether one was closed (for the caller's
    /// counters).
    pub fn make_room(&mut self, now_ns: u64, max: usize, source: &str) -> bool {
        let Some(evicted) = self.evict(now_ns) else { return false };
        if let Some(n) = evicted.to_log {
            let idle_ms = now_ns.saturating_sub(evicted.open.active_ns) / 1_000_000;
            let peer = evicted.open.peer;
            // `n`: how many since the last such message (this one included).
            tracing::warn!(
                %source,
                %peer,
                idle_ms,
                evicted = n,
                max,
                "connections_max connections open: closed the longest-idle one to make room"
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(active_ns: u64) -> Open {
        Open { fd: -1, peer: "127.0.0.1:9".parse().unwrap(), active_ns }
    }

    #[test]
    fn the_longest_idle_connection_is_evicted_and_its_task_finds_out() {
        let mut t = Connections::default();
        let a = t.insert(open(5));
        let b = t.insert(open(1));
        let c = t.insert(open(1));
        assert!(t.touch(b, 9), "b sent bytes: now the most recent");
        // c and a are older than b; c is the idlest.
        assert_eq!(t.evict_idlest(), Some(open(1)));
        assert!(!t.touch(c, 10), "c was evicted");
        assert!(!t.remove(c), "its task must not count it again");
        assert_eq!(t.evict_idlest(), Some(open(5)));
        assert!(!t.remove(a));
        assert!(t.remove(b));
        assert_eq!((t.len(), t.evict_idlest()), (0, None));
    }

    #[test]
    fn evictions_are_logged_at_most_once_per_interval() {
        let mut t = Connections::default();
        assert_eq!(t.evictions_to_log(0), None, "nothing to log");
        for _ in 0..3 {
            t.insert(open(0));
            t.evict_idlest();
        }
        assert_eq!(t.evictions_to_log(1), Some(3));
        t.insert(open(0));
        t.evict_idlest();
        assert_eq!(t.evictions_to_log(2), None, "too soon");
        assert_eq!(t.evictions_to_log(1 + EVICTION_LOG_INTERVAL_NS), Some(1));
    }
}
