//! Accepting shippers and serving their frames.
//!
//! # Design constraints
//! - One acceptor thread takes connections, runs the TLS handshake and reads HELLO within
//!   `handshake_timeout_ms`, then hands the connection to the worker that owns its sender
//!   stream (hash of run id and core), so all frames of one sequence space are written, and
//!   de-duplicated, by one thread without locks. At most `connections_max` connections
//!   (fitted to the open-file limit at start, [`super::fit_connections`]); one over it is
//!   accepted and closed at once.
//! - No accept error ends the acceptor ([`super::accept`]: counted, shortages pause 100 ms).
//!   Refusals and accept errors are logged at most once a second each, with the count left out.
//! - A connection that misses its handshake deadline is shut down, not just dropped: a read
//!   io_uring still owns would keep its descriptor open until the peer acts.
//! - Memory of frames in progress: a connection reads the payload of a frame over
//!   [`FRAME_PAYLOAD_UNRESERVED_BYTES`] (64 KiB) only once it has reserved that many bytes of
//!   the receiver-wide `frames_in_progress_bytes_max` ([`super::budget`]); without room it stops
//!   reading for up to `frames_in_progress_wait_ms`, then is refused. So frames being received
//!   hold at most the budget, plus per connection its 64 KiB allowance, a header and one read
//!   in the decoder, its 64 KiB read buffer and plaintext, and its TLS state; plus per worker,
//!   for the one frame it handles at a time, a copy of the payload (at most `frame_bytes_max`),
//!   the decompressed payload and its records grouped by stream (at most
//!   `frame_raw_bytes_max` each). Between frames a decoder keeps at most 128 KiB, a worker
//!   4 MiB of decompression buffer and 4 MiB of grouping buffers.
//!
//! # Operation (per connection, on its worker)
//! Read frames (each within `idle_timeout_ms`; a frame over 64 KiB only with room reserved for
//! its payload, else ERROR `busy` after `frames_in_progress_wait_ms`, the reservation given
//! back once the frame is handled); for a DATA frame: check flags and sizes,
//! decompress into a buffer of exactly the declared size, validate every record, then either
//! (already written) count a duplicate, or write, commit and mark it; then ACK. HEARTBEATs
//! are echoed. A DATA frame that can never be written (invalid records or zstd, over
//! `frame_raw_bytes_max`, a name the output refuses for good) is answered with REJECT and the
//! connection goes on: the shipper gives that frame another fate. A stream that is not valid
//! frames (bad magic, checksum, size) gets an ERROR naming the problem and is closed; so does a
//! write that fails for now (disk full, I/O error): ERROR "cannot write now", no ACK, and the
//! shipper backs off and resends.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::accept::{self, LogThrottle};
use super::budget::{FrameBudget, Reservation, FRAME_PAYLOAD_UNRESERVED_BYTES};
use super::commit::CommitLog;
use super::dedup::{StreamId, Window};
use super::output::Output;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::{ReceiverCounters, Refusal};
use crate::metrics::{Registry, PUBLISH_INTERVAL_MS};
use crate::protocol::frame::{FLAG_DEAD_LETTER, FLAG_ZSTD};
use crate::protocol::{Frame, FrameDecoder, Hello, Kind, RecordIter};
use crate::tls::stream::{handshake, TlsStream, READ_BYTES};

/// A connection on its way from the acceptor to its worker.
pub struct HandOff {
    pub tcp: std::net::TcpStream,
    pub tls: rustls::Connection,
    pub hello: Hello,
    /// The sender stream, tied to the client certificate ([`super::dedup::sender_run`]).
    pub id: StreamId,
    /// Plaintext received after HELLO.
    pub pending: Vec<u8>,
    pub peer: std::net::SocketAddr,
}

/// The worker that owns sender stream `id`.
pub fn owner(id: StreamId, workers: usize) -> usize {
    let h = id.0 ^ (u64::from(id.1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 32) as usize % workers
}

/// What the acceptor's tasks share, on the acceptor's thread.
struct Acceptor {
    config: Arc<ReceiverConfig>,
    tls: Arc<rustls::ServerConfig>,
    workers: Vec<mpsc::UnboundedSender<HandOff>>,
    /// Connections from accept until served, over every thread.
    open: Arc<AtomicUsize>,
    counters: RefCell<ReceiverCounters>,
    /// Refusals are logged at a bounded rate: a flood must not become one of log lines.
    refusal_log: RefCell<LogThrottle>,
}

/// Runs the acceptor on the current thread until the process exits: no accept error ends it
/// (see [`super::accept`]).
pub fn accept(
    listener: std::net::TcpListener,
    config: Arc<ReceiverConfig>,
    tls: Arc<rustls::ServerConfig>,
    workers: Vec<mpsc::UnboundedSender<HandOff>>,
    open: Arc<AtomicUsize>,
    registry: Arc<Registry<ReceiverCounters>>,
) {
    tokio_uring::start(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        let slot = workers.len();
        let a = Rc::new(Acceptor {
            config,
            tls,
            workers,
            open,
            counters: RefCell::new(ReceiverCounters::new("acceptor".into())),
            refusal_log: RefCell::default(),
        });
        let shared = a.clone();
        tokio_uring::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
                registry.publish(slot, shared.counters.borrow().clone());
            }
        });
        let mut error_log = LogThrottle::default();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e, &a.counters, &mut error_log).await;
                    continue;
                }
            };
            let max = a.config.receiver.connections_max;
            if a.open.load(Ordering::Relaxed) >= max {
                let e = format!("connections_max {max} reached");
                refused(&a, peer, Refusal::Limit, &e);
                continue;
            }
            // Counted from accept, so connections still in their handshake count too.
            a.open.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
            tokio_uring::spawn(hand_off(tcp, peer, a.clone()));
        }
    })
}

/// Greets an accepted connection and hands it to the worker that owns its sender stream.
async fn hand_off(tcp: tokio_uring::net::TcpStream, peer: std::net::SocketAddr, a: Rc<Acceptor>) {
    match greet(tcp, &a.config, a.tls.clone()).await {
        Ok((stream, hello, pending)) => {
            // Mutual TLS: the handshake required a certificate chaining to the CA.
            let certificate = stream.peer_certificate().unwrap_or_default();
            let id = (super::dedup::sender_run(&certificate, hello.run_id), hello.core);
            let w = owner(id, a.workers.len());
            match stream.into_parts() {
                Ok((tcp, tls)) => {
                    a.counters.borrow_mut().connections_accepted += 1;
                    let _ = a.workers[w].send(HandOff { tcp, tls, hello, id, pending, peer });
                }
                Err(e) => {
                    a.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::error!(%peer, "hand-off failed: {e}");
                }
            }
        }
        Err((reason, e)) => {
            a.open.fetch_sub(1, Ordering::Relaxed);
            refused(&a, peer, reason, &e);
        }
    }
}

/// Counts a refused connection; logs it at most once a second, with the count left out.
fn refused(a: &Acceptor, peer: std::net::SocketAddr, reason: Refusal, e: &str) {
    a.counters.borrow_mut().connections_refused[reason as usize] += 1;
    if let Some(left_out) = a.refusal_log.borrow_mut().admit(Instant::now()) {
        tracing::warn!(%peer, "refused: {e} ({left_out} more refused since the last report)");
    }
}

/// Counts a failed `accept()`, logs it at a bounded rate, and pauses as its kind asks.
async fn accept_failed(e: &io::Error, counters: &RefCell<ReceiverCounters>, log: &mut LogThrottle) {
    let reason = accept::classify(e);
    counters.borrow_mut().accept_errors[reason as usize] += 1;
    let pause = accept::pause(reason);
    if let Some(left_out) = log.admit(Instant::now()) {
        let (r, ms) = (reason.label(), pause.as_millis());
        tracing::warn!(
            "accept failed ({r}): {e}; pausing {ms} ms \
             ({left_out} more accept errors since the last report)"
        );
    }
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
}

/// TLS handshake and HELLO. Returns the stream, the HELLO and bytes that followed it.
async fn greet(
    tcp: tokio_uring::net::TcpStream,
    config: &ReceiverConfig,
    tls: Arc<rustls::ServerConfig>,
) -> Result<(TlsStream, Hello, Vec<u8>), (Refusal, String)> {
    let timeout = Duration::from_millis(config.receiver.handshake_timeout_ms);
    let deadline = Instant::now() + timeout;
    let conn = rustls::ServerConnection::new(tls).map_err(|e| (Refusal::Tls, e.to_string()))?;
    let stream = handshake(tcp, conn.into(), timeout)
        .await
        .map_err(|e| (Refusal::Tls, format!("TLS handshake failed: {e}")))?;
    let mut dec = FrameDecoder::new(1024);
    let hello = tokio::time::timeout_at(deadline.into(), async {
        let mut buf = Vec::with_capacity(READ_BYTES);
        let mut plain = Vec::new();
        loop {
            let (res, b) = stream.recv(buf, &mut plain).await;
            buf = b;
            let open = res.map_err(|e| e.to_string())?;
            dec.push(&plain);
            plain.clear();
            match dec.next_frame() {
                Ok(Some(f)) if f.header.kind == Kind::Hello => {
                    return Hello::decode(&f.payload).map_err(|e| e.to_string())
                }
                Ok(Some(f)) => return Err(format!("expected HELLO, got {:?}", f.header.kind)),
                Ok(None) if !open => return Err("closed before HELLO".into()),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no HELLO within handshake_timeout_ms".to_string());
    let hello = match hello.and_then(|h| h) {
        Ok(h) => h,
        Err(e) => {
            let _ = stream.send(&Frame::control(Kind::Error, 0, e.as_bytes())).await;
            // A read cut short by the deadline holds the socket open until it completes.
            stream.shutdown();
            return Err((Refusal::Hello, e));
        }
    };
    stream
        .send(&Frame::control(Kind::Welcome, 0, &[]))
        .await
        .map_err(|e| (Refusal::Hello, e.to_string()))?;
    let mut pending = Vec::new();
    while let Ok(Some(f)) = dec.next_frame() {
        // Frames pipelined behind HELLO: re-encode for the worker's decoder.
        pending.extend_from_slice(&f.header.wire(&f.payload));
    }
    Ok((stream, hello, pending))
}

/// Capacity of the decompression buffer a worker keeps between frames.
const SCRATCH_KEEP_BYTES_MAX: usize = 4 << 20;

/// A receiver worker's state, owned by its thread.
pub struct Worker {
    pub core: usize,
    pub output: Output,
    pub commits: CommitLog,
    pub windows: HashMap<StreamId, Window>,
    pub counters: ReceiverCounters,
    pub config: Arc<ReceiverConfig>,
    scratch: Vec<u8>,
}

impl Worker {
    pub fn new(
        core: usize,
        output: Output,
        commits: CommitLog,
        windows: HashMap<StreamId, Window>,
        config: Arc<ReceiverConfig>,
    ) -> Worker {
        let counters = ReceiverCounters::new(core.to_string());
        Worker { core, output, commits, windows, counters, config, scratch: Vec::new() }
    }

    /// Handles one DATA frame; `Ok(())` means it may be acknowledged.
    pub fn data(&mut self, id: StreamId, f: &Frame) -> Result<(), FrameFault> {
        self.counters.frames_received += 1;
        if self.windows.get(&id).is_some_and(|w| w.contains(f.header.seq)) {
            self.counters.frames_duplicate += 1;
            return Ok(());
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.decode_and_write(id, f, &mut scratch);
        // Kept for the next frame, but not a large frame's worth of it.
        if scratch.capacity() <= SCRATCH_KEEP_BYTES_MAX {
            self.scratch = scratch;
        }
        result
    }

    fn decode_and_write(
        &mut self,
        id: StreamId,
        f: &Frame,
        scratch: &mut Vec<u8>,
    ) -> Result<(), FrameFault> {
        let h = f.header;
        let invalid = |what: String| FrameFault::Refused(format!("frame {}: {what}", h.seq));
        let raw_max = self.config.receiver.frame_raw_bytes_max;
        if h.raw_len > raw_max {
            return Err(invalid(format!(
                "{} decompressed bytes is over frame_raw_bytes_max {raw_max}",
                h.raw_len
            )));
        }
        let dead_letter = h.flags & FLAG_DEAD_LETTER != 0;
        let payload: &[u8] = match h.flags & !FLAG_DEAD_LETTER {
            FLAG_ZSTD => {
                scratch.clear();
                scratch.reserve(h.raw_len as usize);
                zstd::bulk::Decompressor::new()
                    .and_then(|mut d| d.decompress_to_buffer(&f.payload, scratch))
                    .map_err(|e| invalid(format!("zstd: {e}")))?;
                if scratch.len() != h.raw_len as usize {
                    return Err(invalid(format!(
                        "decompressed to {} bytes, header says {}",
                        scratch.len(),
                        h.raw_len
                    )));
                }
                scratch
            }
            0 => &f.payload,
            other => return Err(invalid(format!("unknown flags {other:#x}"))),
        };
        RecordIter::validate(payload, h.count).map_err(|e| invalid(e.to_string()))?;
        let started = Instant::now();
        self.write(id, h.seq, payload, h.count, dead_letter)?;
        self.counters.write_us.record(started.elapsed().as_micros() as u64);
        self.counters.frame_records.record(h.count.into());
        Ok(())
    }

    fn write(
        &mut self,
        id: StreamId,
        seq: u64,
        payload: &[u8],
        count: u32,
        dead_letter: bool,
    ) -> Result<(), FrameFault> {
        let (touched, bytes) =
            self.output.write_frame(payload, count, dead_letter).map_err(|e| {
                if never_writable(&e) {
                    FrameFault::Refused(format!("frame {seq}: the output cannot take it: {e}"))
                } else {
                    FrameFault::Write(e)
                }
            })?;
        if dead_letter {
            self.counters.records_dead_letter += u64::from(count);
        }
        let files: Vec<(&str, u64)> = touched.iter().map(|(p, e)| (p.as_str(), *e)).collect();
        self.commits.commit(id, seq, &files).map_err(FrameFault::Write)?;
        let window = self.windows.entry(id).or_default();
        window.insert(seq);
        window.written_unix_s = super::commit::unix_s();
        self.counters.records_written += u64::from(count);
        self.counters.bytes_written += bytes;
        self.counters.streams_open = self.output.streams_open() as u64;
        self.counters.files_open = self.output.files_open() as u64;
        self.counters.files_open_peak = self.output.files_open_peak as u64;
        self.counters.files_closed = self.output.files_closed;
        self.counters.records_folded = self.output.records_folded;
        self.counters.stream_names_shortened = self.output.names_shortened;
        if self.commits.needs_compaction() {
            let core = self.core;
            let workers = self.config.receiver.workers;
            let mine = self.windows.iter().filter(|(id, _)| owner(**id, workers) == core);
            self.commits.compact(mine, &self.output.current_files()).map_err(FrameFault::Write)?;
        }
        Ok(())
    }

    /// Books a frame answered with REJECT, and logs it: every one while they are rare, then
    /// the 2nd, 4th, 8th, ... (a misconfigured shipper could have every frame refused).
    fn rejected(&mut self, id: StreamId, h: &crate::protocol::Header, reason: &str) {
        self.counters.frames_rejected += 1;
        self.counters.records_rejected += u64::from(h.count);
        let n = self.counters.frames_rejected;
        if n <= 8 || n.is_power_of_two() {
            let (seq, records) = (h.seq, h.count);
            tracing::warn!(
                sender = format!("{:016x}/{}", id.0, id.1),
                seq,
                records,
                rejected_so_far = n,
                "frame refused for good (REJECT): {reason}"
            );
        }
    }
}

/// Why a DATA frame was not written.
#[derive(Debug, thiserror::Error)]
pub enum FrameFault {
    /// The frame can never be written: its content is invalid, or the output can never take
    /// it. Answered with REJECT (the shipper gives it another fate); the connection goes on.
    #[error("refused for good: {0}")]
    Refused(String),
    /// We could not write now (disk full, I/O error): answered with ERROR and the connection
    /// closed without ACK; the shipper backs off and resends.
    #[error("cannot write now: {0}")]
    Write(io::Error),
}

/// Whether an output error says the frame can never be written, whatever is retried: a name
/// the filesystem refuses, or content that is not what the output takes. Everything else
/// (ENOSPC, EIO, EDQUOT, ...) may pass, and is answered as "try again later".
fn never_writable(e: &io::Error) -> bool {
    let refused = [libc::ENAMETOOLONG, libc::EINVAL, libc::EILSEQ, libc::ENOTDIR, libc::EISDIR];
    e.kind() == io::ErrorKind::InvalidData || e.raw_os_error().is_some_and(|n| refused.contains(&n))
}

/// Serves connections handed to worker `core` until the process exits.
pub async fn serve_worker(
    worker: Rc<RefCell<Worker>>,
    mut inbox: mpsc::UnboundedReceiver<HandOff>,
    open: Arc<AtomicUsize>,
    budget: Arc<FrameBudget>,
    registry: Arc<Registry<ReceiverCounters>>,
) {
    let (w, r) = (worker.clone(), registry.clone());
    tokio_uring::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
            let w = w.borrow();
            r.publish(w.core, w.counters.clone());
        }
    });
    while let Some(h) = inbox.recv().await {
        let worker = worker.clone();
        let open = open.clone();
        let budget = budget.clone();
        tokio_uring::spawn(async move {
            let peer = h.peer;
            let name = h.hello.name.clone();
            worker.borrow_mut().counters.connections_open += 1;
            if let Err(e) = connection(&worker, h, &budget).await {
                tracing::warn!(%peer, shipper = %name, "connection closed: {e}");
            }
            worker.borrow_mut().counters.connections_open -= 1;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connection(
    worker: &Rc<RefCell<Worker>>,
    h: HandOff,
    budget: &FrameBudget,
) -> io::Result<()> {
    let stream = TlsStream::from_parts(h.tcp, h.tls);
    let id = h.id;
    let (frame_max, idle) = {
        let r = &worker.borrow().config.receiver;
        (r.frame_bytes_max, Duration::from_millis(r.idle_timeout_ms))
    };
    let mut dec = FrameDecoder::new(frame_max);
    dec.push(&h.pending);
    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut plain = Vec::new();
    let mut replies = Vec::new();
    let mut open = true;
    // Frames taken out of the decoder so far; the room reserved for the frame being read, and
    // how many had been taken out when it was reserved.
    let mut decoded = 0u64;
    let mut room: Option<(Reservation, u64)> = None;
    loop {
        loop {
            let f = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(refuse(worker, &stream, Refusal::Frame, e.to_string()).await),
            };
            decoded += 1;
            frame(worker, &stream, id, f, &mut replies).await?;
        }
        // The frame the room was for is handled (and out of the decoder): give it back before
        // anything is awaited, and so that asking again for the next frame queues behind those
        // already waiting.
        if room.as_ref().is_some_and(|(_, at)| *at != decoded) {
            room = None;
        }
        if !replies.is_empty() {
            let sent = stream.send(&replies).await;
            replies.clear();
            if open {
                sent?;
            }
        }
        if !open {
            // The peer closed; what it sent before is written and would have been acked.
            return Ok(());
        }
        let awaited = dec.payload_awaited().filter(|&n| n > FRAME_PAYLOAD_UNRESERVED_BYTES);
        if let (Some(len), None) = (awaited, &room) {
            room = Some((make_room(worker, &stream, budget, len).await?, decoded));
        }
        let read = tokio::time::timeout(idle, stream.recv(buf, &mut plain)).await;
        let Ok((res, b)) = read else {
            let e = "no frame within idle_timeout_ms".to_string();
            return Err(refuse(worker, &stream, Refusal::Idle, e).await);
        };
        buf = b;
        open = res?;
        dec.push(&plain);
        plain.clear();
    }
}

/// Handles one frame, adding its reply to `replies`. An error ends the connection, the peer
/// told why when it can be.
async fn frame(
    worker: &Rc<RefCell<Worker>>,
    stream: &TlsStream,
    id: StreamId,
    f: Frame,
    replies: &mut Vec<u8>,
) -> io::Result<()> {
    let h = f.header;
    match h.kind {
        Kind::Data => {
            let result = worker.borrow_mut().data(id, &f);
            // Written or refused: its payload is let go before anything is awaited.
            drop(f);
            match result {
                Ok(()) => {
                    replies.extend(Frame::control(Kind::Ack, h.seq, &[]));
                    worker.borrow_mut().counters.frames_acked += 1;
                }
                Err(FrameFault::Refused(e)) => {
                    worker.borrow_mut().rejected(id, &h, &e);
                    replies.extend(Frame::control(Kind::Reject, h.seq, e.as_bytes()));
                }
                Err(FrameFault::Write(e)) => {
                    worker.borrow_mut().counters.write_errors += 1;
                    let (seq, run, core) = (h.seq, id.0, id.1);
                    let text = format!("cannot write frame {seq} now: {e}");
                    tracing::error!("{text} (from {run:016x}/{core}); not acknowledged");
                    replies.extend(Frame::control(Kind::Error, 0, text.as_bytes()));
                    let _ = stream.send(replies).await;
                    return Err(e);
                }
            }
        }
        Kind::Heartbeat => replies.extend(Frame::control(Kind::Heartbeat, h.seq, &[])),
        k => {
            let e = format!("unexpected {k:?} frame");
            return Err(refuse(worker, stream, Refusal::Frame, e).await);
        }
    }
    Ok(())
}

/// Reserves room for the `len` payload bytes of the frame whose header just came, before any
/// more of it is read: at once when there is, else waiting in line, the connection not read
/// meanwhile (TCP pushes back on the peer), up to `frames_in_progress_wait_ms`. Still without
/// room, the connection is refused: the shipper backs off and resends.
async fn make_room(
    worker: &Rc<RefCell<Worker>>,
    stream: &TlsStream,
    budget: &FrameBudget,
    len: u32,
) -> io::Result<Reservation> {
    if let Ok(room) = budget.try_reserve(len) {
        return Ok(room);
    }
    worker.borrow_mut().counters.frames_waited += 1;
    let wait_ms = worker.borrow().config.receiver.frames_in_progress_wait_ms;
    match budget.reserve(len, Duration::from_millis(wait_ms)).await {
        Ok(room) => Ok(room),
        Err(_) => {
            let max = budget.bytes_max();
            let e = format!(
                "busy: no room for a frame of {len} payload bytes within \
                 frames_in_progress_wait_ms {wait_ms} (frames_in_progress_bytes_max {max} in \
                 use by other frames); try again later"
            );
            Err(refuse(worker, stream, Refusal::Memory, e).await)
        }
    }
}

/// Counts a refused connection, tells the peer why (ERROR), and shuts the socket down; the
/// error to end the connection with.
async fn refuse(
    worker: &Rc<RefCell<Worker>>,
    stream: &TlsStream,
    reason: Refusal,
    message: String,
) -> io::Error {
    worker.borrow_mut().counters.connections_refused[reason as usize] += 1;
    let _ = stream.send(&Frame::control(Kind::Error, 0, message.as_bytes())).await;
    // A read still in the ring (after an idle timeout) would hold the socket open until the
    // peer acts: shut it down so the descriptor goes now.
    stream.shutdown();
    io::Error::new(io::ErrorKind::InvalidData, message)
}
