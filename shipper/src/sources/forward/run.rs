//! The tasks of a forward source inside a worker: the acceptor, and per connection a reader
//! (handshakes, messages, records) and a writer (PONG aside, every answer: acks).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::{watch, Notify};
use tokio_uring::net::TcpStream;

use super::chunks::{Acks, Admission, Answer, Registry, Waiter};
use super::message::{self, Limits, Refused, Scratch};
use super::msgpack::{ScanError, Scanner};
use super::{handshake, ForwardCounters, Handshake, READ_BYTES};
use crate::sources::connections::{Connections, Open};
use crate::sources::{Intake, Record, SourceId};
use crate::tls::stream::{handshake as tls_handshake, TlsStream};

/// Longest PING accepted, in bytes.
const PING_BYTES_MAX: usize = 4096;

/// How long a reader waits before it looks again when it may not hand records over (the
/// outbox is short of room, or every remembered chunk id still waits), unless woken sooner.
const PAUSE_POLL: Duration = Duration::from_millis(50);

/// What one forward source's tasks on one worker read by.
pub struct Settings {
    pub limits: Limits,
    pub message_bytes_max: usize,
    pub connections_max: usize,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub shared_key: Option<Vec<u8>>,
    pub self_hostname: Vec<u8>,
}

/// What every task of one forward source on one worker shares.
pub struct Forward<I> {
    pub intake: Rc<RefCell<I>>,
    pub id: SourceId,
    pub counters: Rc<RefCell<ForwardCounters>>,
    pub acks: Rc<RefCell<Acks>>,
    pub registry: Arc<Registry>,
    pub settings: Rc<Settings>,
}

impl<I> Clone for Forward<I> {
    fn clone(&self) -> Self {
        Forward {
            intake: self.intake.clone(),
            id: self.id,
            counters: self.counters.clone(),
            acks: self.acks.clone(),
            registry: self.registry.clone(),
            settings: self.settings.clone(),
        }
    }
}

/// Accepts connections on `listener` until stopped; each is served by its own tasks. At
/// `connections_max` the longest-idle connection in `conns` (the source's on this worker,
/// shared by each listener it serves) is closed to make room for the new one.
pub async fn serve<I: Intake + 'static>(
    source: Forward<I>,
    listener: std::net::TcpListener,
    conns: Rc<RefCell<Connections>>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match crate::sources::connections::Listener::new(listener) {
        Ok(l) => l,
        Err(e) => {
            let name = source.counters.borrow().source.clone();
            tracing::error!(source = %name, "forward source not accepting: {e}");
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
                source.counters.borrow_mut().read_errors += 1;
                let name = source.counters.borrow().source.clone();
                tracing::error!(source = %name, "accept failed: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = admit(&source, &conns, &stream, peer);
        let conn = Conn { source: source.clone(), conns: conns.clone(), id, peer };
        tokio_uring::spawn(serve_connection(conn, stream, stop.clone()));
    }
}

/// Enters a new connection in `conns`, evicting the longest-idle one when full.
fn admit<I: Intake>(
    source: &Forward<I>,
    conns: &RefCell<Connections>,
    stream: &TcpStream,
    peer: SocketAddr,
) -> u64 {
    let now = source.intake.borrow().now_ns();
    let mut fc = source.counters.borrow_mut();
    let mut table = conns.borrow_mut();
    let max = source.settings.connections_max;
    if table.len() >= max && table.make_room(now, max, &fc.source) {
        fc.connections_evicted += 1;
        fc.connections_open -= 1;
        fc.connections_closed += 1;
    }
    fc.connections_accepted += 1;
    fc.connections_open += 1;
    table.insert(Open { fd: stream.as_raw_fd(), peer, active_ns: now })
}

/// A connection's bytes, plain or through TLS.
#[derive(Clone)]
enum Wire {
    Plain(Rc<TcpStream>),
    Tls(TlsStream),
}

impl Wire {
    /// One read, appended to `sink`; `Ok(false)` at the end of the stream.
    async fn recv(&self, buf: Vec<u8>, sink: &mut Vec<u8>) -> (io::Result<bool>, Vec<u8>) {
        match self {
            Wire::Tls(t) => t.recv(buf, sink).await,
            Wire::Plain(t) => {
                let (res, buf) = t.read(buf).await;
                match res {
                    Ok(0) => (Ok(false), buf),
                    Ok(n) => {
                        sink.extend_from_slice(&buf[..n]);
                        (Ok(true), buf)
                    }
                    Err(e) => (Err(e), buf),
                }
            }
        }
    }

    async fn send(&self, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Wire::Tls(t) => t.send(&bytes).await,
            Wire::Plain(t) => t.write_all(bytes).await.0,
        }
    }

    fn wants_write(&self) -> bool {
        matches!(self, Wire::Tls(t) if t.wants_write())
    }

    fn shutdown(&self) {
        match self {
            Wire::Tls(t) => t.shutdown(),
            Wire::Plain(t) => {
                let _ = t.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// One connection: its source, its source's table and its place in it.
struct Conn<I> {
    source: Forward<I>,
    conns: Rc<RefCell<Connections>>,
    id: u64,
    peer: SocketAddr,
}

/// Why a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// EOF, a failed read or write, or stop.
    Closed,
    /// Bytes that are not a forward message, or one over a limit (counted where found).
    Refused,
    /// A handshake failed (counted where it failed).
    Handshake,
    /// Nothing sent for `idle_timeout`.
    Idle,
    /// Evicted by the acceptor (counted there).
    Evicted,
}

/// What a connection reads into: the bytes not consumed yet (a message starts at 0), where
/// the message being scanned ends, and the scratch of its records.
struct Inbound {
    carry: Vec<u8>,
    buf: Vec<u8>,
    scanner: Scanner,
    scratch: Scratch,
}

/// Serves one connection: TLS and shared-key handshakes, then messages until it ends.
async fn serve_connection<I: Intake>(
    conn: Conn<I>,
    stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) {
    let wire = match conn.open(stream).await {
        Ok(w) => w,
        Err(end) => return conn.close(None, end, false),
    };
    let mut inbound = Inbound {
        carry: Vec::new(),
        buf: Vec::with_capacity(READ_BYTES),
        scanner: Scanner::default(),
        scratch: Scratch::default(),
    };
    let mut end = match &conn.source.settings.shared_key {
        Some(key) => conn.handshake(&wire, key, &mut inbound).await.err(),
        None => None,
    };
    let (tx, rx) = unbounded_channel();
    let closed = Rc::new(Notify::new());
    if end.is_none() {
        let writer = write_answers(wire.clone(), rx, closed.clone(), conn.source.counters.clone());
        tokio_uring::spawn(writer);
        end = Some(conn.read(&wire, &tx, &mut inbound, &mut stop).await);
    }
    closed.notify_one();
    let partial = inbound.scanner.started() || !inbound.carry.is_empty();
    conn.close(Some(&wire), end.unwrap_or(End::Closed), partial);
}

impl<I: Intake> Conn<I> {
    fn name(&self) -> String {
        self.source.counters.borrow().source.clone()
    }

    /// Runs the TLS handshake if the source has TLS.
    async fn open(&self, stream: TcpStream) -> Result<Wire, End> {
        let Some(tls) = &self.source.settings.tls else {
            return Ok(Wire::Plain(Rc::new(stream)));
        };
        let server = rustls::ServerConnection::new(tls.clone()).map_err(|e| {
            tracing::error!(source = %self.name(), "TLS state: {e}");
            End::Closed
        })?;
        let timeout = self.source.settings.handshake_timeout;
        match tls_handshake(stream, rustls::Connection::Server(server), timeout).await {
            Ok(t) => Ok(Wire::Tls(t)),
            // A peer that closes during the handshake (a port probe) failed nothing.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(End::Closed),
            Err(e) => {
                let failure = if e.kind() == io::ErrorKind::TimedOut {
                    Handshake::Timeout
                } else {
                    Handshake::Tls
                };
                self.handshake_failed(failure, &e.to_string());
                Err(End::Handshake)
            }
        }
    }

    fn handshake_failed(&self, failure: Handshake, why: &str) {
        let mut fc = self.source.counters.borrow_mut();
        fc.handshakes_failed[failure as usize] += 1;
        let n: u64 = fc.handshakes_failed.iter().sum();
        if n <= 8 || n.is_power_of_two() {
            let (source, peer) = (&fc.source, self.peer);
            tracing::warn!(%source, %peer, failed_so_far = n, "handshake failed: {why}");
        }
    }

    /// HELO, then the client's PING within `handshake_timeout_ms`, answered with PONG.
    async fn handshake(&self, wire: &Wire, key: &[u8], inbound: &mut Inbound) -> Result<(), End> {
        let mut nonce = [0u8; handshake::NONCE_BYTES];
        let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
        random.expect("the system's random source works");
        if wire.send(handshake::helo(&nonce)).await.is_err() {
            return Err(End::Closed);
        }
        let timeout = self.source.settings.handshake_timeout;
        let ping = match tokio::time::timeout(timeout, self.next_message(wire, inbound)).await {
            Ok(Ok(len)) => len,
            // A peer that closes before sending anything (a port probe) failed nothing.
            Ok(Err(End::Closed)) if inbound.carry.is_empty() => return Err(End::Closed),
            Ok(Err(end)) => {
                self.handshake_failed(Handshake::SharedKey, "no PING");
                return Err(end);
            }
            Err(_) => {
                self.handshake_failed(Handshake::Timeout, "no PING in handshake_timeout_ms");
                return Err(End::Handshake);
            }
        };
        let hostname = &self.source.settings.self_hostname;
        let answered = handshake::answer(&inbound.carry[..ping], &nonce, key, hostname);
        inbound.carry.drain(..ping);
        match answered {
            Ok((_client, pong)) => wire.send(pong).await.map_err(|_| End::Closed),
            Err((e, pong)) => {
                self.handshake_failed(Handshake::SharedKey, &e.to_string());
                let _ = wire.send(pong).await;
                Err(End::Handshake)
            }
        }
    }

    /// Reads until a whole message (at most [`PING_BYTES_MAX`]) is at the start of the carry;
    /// returns its length.
    async fn next_message(&self, wire: &Wire, inbound: &mut Inbound) -> Result<usize, End> {
        loop {
            match inbound.scanner.scan(&inbound.carry, PING_BYTES_MAX) {
                Ok(Some(len)) => return Ok(len),
                Ok(None) => {}
                Err(_) => return Err(End::Handshake),
            }
            let buf = std::mem::take(&mut inbound.buf);
            let (res, buf) = wire.recv(buf, &mut inbound.carry).await;
            inbound.buf = buf;
            match res {
                Ok(true) => {}
                Ok(false) | Err(_) => return Err(End::Closed),
            }
        }
    }

    /// Reads messages until the connection ends; returns why.
    async fn read(
        &self,
        wire: &Wire,
        tx: &Waiter,
        inbound: &mut Inbound,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        let idle = self.source.settings.idle_timeout;
        loop {
            if let Err(end) = self.consume(tx, inbound, stop).await {
                return end;
            }
            if *stop.borrow() {
                return End::Closed;
            }
            let buf = std::mem::take(&mut inbound.buf);
            let (res, buf) = tokio::select! {
                r = wire.recv(buf, &mut inbound.carry) => r,
                _ = tokio::time::sleep(idle) => return End::Idle,
                _ = stop.changed() => return End::Closed,
            };
            inbound.buf = buf;
            match res {
                Ok(true) => {}
                Ok(false) => return End::Closed,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let mut fc = self.source.counters.borrow_mut();
                    fc.read_errors += 1;
                    let (source, peer) = (&fc.source, self.peer);
                    tracing::warn!(%source, %peer, "connection read failed: {e}");
                    return End::Closed;
                }
            }
            if wire.wants_write() {
                let _ = tx.send(Answer::Flush);
            }
            let now = self.source.intake.borrow().now_ns();
            if !self.conns.borrow_mut().touch(self.id, now) {
                return End::Evicted;
            }
        }
    }

    /// Hands over every whole message in the carry, waiting while records may not be handed
    /// over; the carry keeps the start of the next message.
    async fn consume(
        &self,
        tx: &Waiter,
        inbound: &mut Inbound,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let max = self.source.settings.message_bytes_max;
        let mut at = 0;
        let result = loop {
            let len = match inbound.scanner.scan(&inbound.carry[at..], max) {
                Ok(Some(len)) => len,
                Ok(None) => break Ok(()),
                Err(e) => break Err(self.refuse_scan(e)),
            };
            let bytes = at..at + len;
            loop {
                match self.message(tx, &inbound.carry[bytes.clone()], &mut inbound.scratch) {
                    Ok(true) => break,
                    Ok(false) => self.pause(stop).await.map_err(|()| End::Closed)?,
                    Err(end) => return Err(end),
                }
            }
            at += len;
        };
        inbound.carry.drain(..at);
        if inbound.carry.capacity() > 2 * READ_BYTES {
            inbound.carry.shrink_to(READ_BYTES);
        }
        inbound.scratch.shrink(READ_BYTES);
        result
    }

    /// Waits until records may be handed over again (or a poll interval); `Err` on stop.
    async fn pause(&self, stop: &mut watch::Receiver<bool>) -> Result<(), ()> {
        let resumed = self.source.intake.borrow().resumed();
        tokio::select! {
            _ = resumed.notified() => Ok(()),
            _ = tokio::time::sleep(PAUSE_POLL) => Ok(()),
            _ = stop.changed() => Err(()),
        }
    }

    fn refuse_scan(&self, e: ScanError) -> End {
        match e {
            ScanError::Malformed(m) => self.refuse(Refused::Malformed(m), None),
            ScanError::TooLong { .. } => self.refuse(Refused::Cut(message::Cut::Message), None),
        }
    }

    /// Counts and logs (the first 8, then every power of two) a refused message.
    fn refuse(&self, why: Refused, tag: Option<&[u8]>) -> End {
        let mut fc = self.source.counters.borrow_mut();
        match why {
            Refused::Cut(cut) => fc.messages_cut[cut as usize] += 1,
            Refused::Malformed(_) | Refused::Shape(_) => fc.messages_malformed += 1,
        }
        let n = fc.messages_malformed + fc.messages_cut.iter().sum::<u64>();
        if n <= 8 || n.is_power_of_two() {
            let (source, peer) = (&fc.source, self.peer);
            let tag = tag.map(message::tag_text).unwrap_or_default();
            tracing::warn!(%source, %peer, %tag, refused_so_far = n, "closing connection: {why}");
        }
        End::Refused
    }

    /// Handles one whole message: `Ok(false)` when it must wait (no room: nothing was done).
    fn message(&self, tx: &Waiter, bytes: &[u8], scratch: &mut Scratch) -> Result<bool, End> {
        let s = &self.source;
        let msg = message::parse(bytes).map_err(|e| self.refuse(e, None))?;
        if msg.chunk.is_some() && s.intake.borrow().paused() {
            return Ok(false);
        }
        let limits = &s.settings.limits;
        msg.check(limits, scratch, wall_clock).map_err(|e| self.refuse(e, Some(msg.tag)))?;
        if let Some(chunk) = msg.chunk {
            let (admission, forgot) = s.registry.admit(chunk, tx);
            let mut fc = s.counters.borrow_mut();
            fc.chunks_forgotten += u64::from(forgot);
            match admission {
                Admission::New => {}
                Admission::Resent => {
                    fc.chunks_resent += 1;
                    return Ok(true);
                }
                Admission::Full => {
                    fc.chunks_table_full += 1;
                    return Ok(false);
                }
            }
        }
        {
            let mut fc = s.counters.borrow_mut();
            fc.messages[msg.mode as usize] += 1;
            fc.bytes_received += bytes.len() as u64;
        }
        let last_admitted = self.hand(&msg, scratch);
        if let Some(chunk) = msg.chunk {
            s.acks.borrow_mut().handed(chunk, last_admitted);
        }
        Ok(true)
    }

    /// Hands a checked message's records to the worker; returns the ordinal of the last one
    /// the chain admitted, for a chunk.
    fn hand(&self, msg: &message::Message<'_>, scratch: &mut Scratch) -> Option<u64> {
        let s = &self.source;
        let key = (!msg.tag.is_empty()).then_some(msg.tag);
        let mut last_admitted = None;
        let mut fc = s.counters.borrow_mut();
        let mut intake = s.intake.borrow_mut();
        let now = intake.now_ns();
        let handed = msg.hand(&s.settings.limits, scratch, wall_clock, |json| {
            let mut buf = [0u8; 16];
            let (ordinal, mark) = match msg.chunk {
                Some(_) => {
                    let (n, mark) = s.acks.borrow_mut().next(&mut buf);
                    (n, Some(mark))
                }
                None => (0, None),
            };
            let record = Record { bytes: json, key, stream: None, mark };
            let outcome = intake.record(s.id, record, now);
            fc.records_received += 1;
            fc.keys_truncated += u64::from(outcome.keys_cut);
            if mark.is_some() && !outcome.dropped {
                last_admitted = Some(ordinal);
            }
        });
        debug_assert!(handed.is_ok(), "a checked message hands over: {handed:?}");
        last_admitted
    }

    /// Closes the connection (if it got that far) and counts how it ended.
    fn close(&self, wire: Option<&Wire>, end: End, partial: bool) {
        // Out of the table before the stream (and its fd) can close: see `Connections`.
        let listed = self.conns.borrow_mut().remove(self.id);
        if let Some(w) = wire {
            w.shutdown();
        }
        let mut fc = self.source.counters.borrow_mut();
        if partial && matches!(end, End::Closed | End::Idle | End::Evicted) {
            fc.messages_partial += 1;
        }
        if end == End::Idle {
            fc.connections_idle_closed += 1;
        }
        if listed {
            fc.connections_open -= 1;
            fc.connections_closed += 1;
        }
    }
}

/// The wall clock as (seconds, nanoseconds) since the Unix epoch.
fn wall_clock() -> (u64, u32) {
    let us = crate::clock::unix_us();
    (us / 1_000_000, (us % 1_000_000) as u32 * 1000)
}

/// Writes the connection's answers (acks, TLS flushes) until it closes.
async fn write_answers(
    wire: Wire,
    mut answers: UnboundedReceiver<Answer>,
    closed: Rc<Notify>,
    counters: Rc<RefCell<ForwardCounters>>,
) {
    loop {
        let answer = tokio::select! {
            a = answers.recv() => a,
            _ = closed.notified() => return,
        };
        let bytes = match answer {
            Some(Answer::Ack(chunk)) => message::ack(&chunk),
            Some(Answer::Flush) => Vec::new(),
            None => return,
        };
        let ack = !bytes.is_empty();
        if wire.send(bytes).await.is_err() {
            // The reader finds out too, and closes the connection.
            return;
        }
        counters.borrow_mut().chunks_acked += u64::from(ack);
    }
}
