//! The tasks that read socket sources inside a worker (see the module docs of `socket`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::watch;

use super::framing::{Framer, Piece};
use super::{SocketCounters, TCP_READ_BYTES};
use crate::config::socket::Framing;
use crate::sources::connections::{Connections, Open};
use crate::sources::{Intake, Record, SourceId};

/// One message of a socket source, for its counters and its worker; `oversize` when it was
/// cut at `message_bytes_max`.
#[inline]
fn message<I: Intake>(
    intake: &mut I,
    sc: &mut SocketCounters,
    id: SourceId,
    bytes: &[u8],
    oversize: bool,
    now_ns: u64,
) {
    sc.messages_received += 1;
    sc.bytes_received += bytes.len() as u64;
    sc.messages_oversize += u64::from(oversize);
    if bytes.is_empty() {
        sc.messages_empty += 1;
        return;
    }
    let outcome = intake.record(id, Record::bare(bytes), now_ns);
    sc.keys_truncated += u64::from(outcome.keys_cut);
    if let Some(f) = outcome.failure {
        sc.parse_failures[f as usize] += 1;
    }
}

/// What every task of one socket source shares: its worker's intake, its id there and its
/// counters.
pub struct Socket<I> {
    pub intake: Rc<RefCell<I>>,
    pub id: SourceId,
    pub counters: Rc<RefCell<SocketCounters>>,
}

impl<I> Clone for Socket<I> {
    fn clone(&self) -> Self {
        Socket { intake: self.intake.clone(), id: self.id, counters: self.counters.clone() }
    }
}

/// Reads datagrams (UDP or unix) from `fd` until stopped; each one is a message.
///
/// `read(2)` on a datagram socket returns one datagram and discards what did not fit, so the
/// buffer is one byte larger than `message_bytes_max`: a read that fills it was longer.
pub async fn read_datagrams<I: Intake>(
    socket: Socket<I>,
    fd: OwnedFd,
    message_bytes_max: usize,
    stop: watch::Receiver<bool>,
) {
    let file = std::fs::File::from(fd);
    let on_read = |datagram: &[u8]| {
        let mut intake = socket.intake.borrow_mut();
        let now = intake.now_ns();
        let cut = datagram.len() > message_bytes_max;
        let bytes = &datagram[..datagram.len().min(message_bytes_max)];
        message(&mut *intake, &mut socket.counters.borrow_mut(), socket.id, bytes, cut, now);
        // One datagram per read: whether more are ready is not known without reading again.
        intake.drained();
    };
    let on_error = |e: &std::io::Error| {
        let mut sc = socket.counters.borrow_mut();
        sc.read_errors += 1;
        tracing::error!(source = %sc.source, "datagram read failed: {e}; retrying in 100 ms");
    };
    crate::sources::read_until_stopped(file, message_bytes_max + 1, stop, on_read, on_error).await;
}

async fn read_failed(counters: &RefCell<SocketCounters>, what: &str, e: &std::io::Error) {
    {
        let mut sc = counters.borrow_mut();
        sc.read_errors += 1;
        tracing::error!(source = %sc.source, "{what} failed: {e}; retrying in 100 ms");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Limits of one TCP source.
#[derive(Clone, Copy)]
pub struct TcpLimits {
    pub framing: Framing,
    pub message_bytes_max: usize,
    pub connections_max: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
}

/// Accepts connections on `listener` until stopped; each is served by its own task. At
/// `connections_max` the longest-idle connection in `conns` is closed to make room for the new
/// one: the table is the source's on this worker, shared by each listener it serves (more
/// than one after a takeover onto fewer workers), so that the limit stays one per worker.
pub async fn serve_tcp<I: Intake + 'static>(
    socket: Socket<I>,
    listener: std::net::TcpListener,
    conns: Rc<RefCell<Connections>>,
    limits: TcpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match crate::sources::connections::Listener::new(listener) {
        Ok(l) => l,
        Err(e) => {
            let sc = socket.counters.borrow();
            tracing::error!(source = %sc.source, "tcp source not accepting: {e}");
            return;
        }
    };
    loop {
        let Some(accepted) = crate::sources::connections::accept(&listener, &mut stop).await else {
            return;
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                read_failed(&socket.counters, "accept", &e).await;
                continue;
            }
        };
        let id = {
            let now = socket.intake.borrow().now_ns();
            let mut sc = socket.counters.borrow_mut();
            let mut table = conns.borrow_mut();
            if table.len() >= limits.connections_max {
                evict(&mut sc, &mut table, limits.connections_max, now);
            }
            sc.connections_accepted += 1;
            sc.connections_open += 1;
            table.insert(Open { fd: stream.as_raw_fd(), peer, active_ns: now })
        };
        let conn = Conn { socket: socket.clone(), conns: conns.clone(), id, peer, limits };
        tokio_uring::spawn(serve_connection(conn, stream, stop.clone()));
    }
}

/// Closes the longest-idle connection of `table` (full): counted, logged at a bounded rate.
fn evict(sc: &mut SocketCounters, table: &mut Connections, max: usize, now_ns: u64) {
    if table.make_room(now_ns, max, &sc.source) {
        sc.connections_evicted += 1;
        sc.connections_open -= 1;
        sc.connections_closed += 1;
    }
}

/// What a connection task needs: its source, its source's table and its own place in it.
struct Conn<I> {
    socket: Socket<I>,
    conns: Rc<RefCell<Connections>>,
    id: u64,
    peer: SocketAddr,
    limits: TcpLimits,
}

/// Why a connection ended.
enum End {
    /// EOF, a failed read, or stop (logged and counted where it happened).
    Closed,
    /// A framing error (counted where it happened; what the framer holds is not a message).
    Malformed,
    /// Nothing sent for `idle_timeout`.
    Idle,
    /// Evicted by the acceptor (counted there).
    Evicted,
}

/// Reads one connection until EOF, an error, a framing error, idleness, eviction or stop;
/// then closes it.
async fn serve_connection<I: Intake>(
    conn: Conn<I>,
    stream: tokio_uring::net::TcpStream,
    mut stop: watch::Receiver<bool>,
) {
    let mut framer = Framer::new(conn.limits.framing, conn.limits.message_bytes_max);
    let mut buf = Vec::with_capacity(TCP_READ_BYTES);
    let end = loop {
        if *stop.borrow() {
            break End::Closed;
        }
        buf.clear();
        let (res, b) = tokio::select! {
            r = stream.read(buf) => r,
            _ = tokio::time::sleep(conn.limits.idle_timeout) => break End::Idle,
            _ = stop.changed() => break End::Closed,
        };
        buf = b;
        let n = match res {
            Ok(0) => break End::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let mut sc = conn.socket.counters.borrow_mut();
                sc.read_errors += 1;
                let (source, peer) = (&sc.source, conn.peer);
                tracing::warn!(%source, %peer, "connection read failed: {e}");
                break End::Closed;
            }
        };
        if !conn.frame(&mut framer, &buf[..n]) {
            break End::Malformed;
        }
        let now = conn.socket.intake.borrow().now_ns();
        if !conn.conns.borrow_mut().touch(conn.id, now) {
            break End::Evicted;
        }
    };
    // Out of the table before the stream (and its fd) can close: see `Connections`.
    let listed = conn.conns.borrow_mut().remove(conn.id);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let mut sc = conn.socket.counters.borrow_mut();
    if framer.holds_partial() && !matches!(end, End::Malformed) {
        sc.messages_partial += 1;
    }
    if matches!(end, End::Idle) {
        sc.connections_idle_closed += 1;
    }
    if listed {
        sc.connections_open -= 1;
        sc.connections_closed += 1;
    }
}

impl<I: Intake> Conn<I> {
    /// Frames the bytes of one read; false when the stream is malformed (counted, logged).
    fn frame(&self, framer: &mut Framer, bytes: &[u8]) -> bool {
        let (id, peer, max) = (self.socket.id, self.peer, self.limits.message_bytes_max);
        let mut intake = self.socket.intake.borrow_mut();
        let mut sc = self.socket.counters.borrow_mut();
        let now = intake.now_ns();
        let framed = framer.push(bytes, |piece| match piece {
            Piece::Message { bytes, cut } => message(&mut *intake, &mut sc, id, bytes, cut, now),
            Piece::Oversize(len) => {
                sc.messages_oversize += 1;
                let source = &sc.source;
                tracing::warn!(
                    %source,
                    %peer,
                    len,
                    max,
                    "octet-counted message over message_bytes_max: skipped"
                );
            }
        });
        if let Err(e) = framed {
            sc.framing_errors += 1;
            tracing::warn!(source = %sc.source, %peer, "closing connection: {e}");
            return false;
        }
        intake.drained();
        true
    }
}
