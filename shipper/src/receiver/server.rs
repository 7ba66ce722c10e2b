//! Accepting shippers and handing each connection to the shard that owns its sender stream.
//!
//! # Design constraints
//! - One acceptor thread takes connections, runs the TLS handshake and reads HELLO within
//!   `handshake_timeout_ms`, then hands the connection to the shard ([`super::shard`]) that
//!   owns its sender stream ([`owner`]: a hash of run id and the sender's worker index), so
//!   all frames of one sequence space are written, and de-duplicated, by one thread without
//!   locks. At most `connections_max` connections (fitted to the open-file limit at start,
//!   [`super::fit_connections`]); one over it is accepted and closed at once.
//! - No accept error ends the acceptor ([`super::accept`]: counted, shortages pause 100 ms).
//!   Refusals and accept errors are logged at most once a second each, with the count left out.
//! - A connection that misses its handshake deadline is shut down, not just dropped: a read
//!   io_uring still owns would keep its descriptor open until the peer acts.
//! - Memory of frames in progress: a connection reads the payload of a frame over
//!   [`FRAME_PAYLOAD_UNRESERVED_BYTES`] (64 KiB) only once it has reserved that many bytes of
//!   the receiver-wide `frames_in_progress_bytes_max` ([`super::budget`]); without room it stops
//!   reading for up to `frames_in_progress_wait_ms`, then is refused. So frames being received
//!   hold at most the budget, plus per connection its 64 KiB allowance, a header and one read
//!   in the decoder, its 64 KiB read buffer and plaintext, and its TLS state; plus per shard
//!   the frame it handles ([`super::shard`]). Between frames a decoder keeps at most 128 KiB.
//!
//! # Operation (per connection, on the acceptor)
//! Accept (or count and close one over `connections_max`); TLS handshake and HELLO within
//! `handshake_timeout_ms` (else ERROR, shut down, counted); WELCOME; frames that came behind
//! HELLO are passed on with the connection to its shard's inbox.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::accept::{self, LogThrottle};
#[cfg(doc)]
use super::budget::FRAME_PAYLOAD_UNRESERVED_BYTES;
use super::dedup::StreamId;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::{ReceiverCounters, Refusal};
use crate::metrics::{Registry, PUBLISH_INTERVAL_MS};
use crate::protocol::{Frame, FrameDecoder, Hello, Kind};
use crate::tls::stream::{handshake, TlsStream, READ_BYTES};

/// A connection on its way from the acceptor to its shard.
pub struct HandOff {
    pub tcp: std::net::TcpStream,
    pub tls: rustls::Connection,
    pub hello: Hello,
    /// The sender stream, tied to the client certificate ([`super::dedup::sender_run`]).
    pub id: StreamId,
    /// The client certificate (DER): frames that carry an origin are filed under the
    /// origin's run mixed with it, as the HELLO's run is.
    pub certificate: Arc<[u8]>,
    /// Plaintext received after HELLO.
    pub pending: Vec<u8>,
    pub peer: std::net::SocketAddr,
}

/// The shard, of `shards`, that owns sender stream `id`.
pub fn owner(id: StreamId, shards: usize) -> usize {
    let h = id.0 ^ (u64::from(id.1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 32) as usize % shards
}

/// What the acceptor's tasks share, on the acceptor's thread.
struct Acceptor {
    config: Arc<ReceiverConfig>,
    tls: Arc<rustls::ServerConfig>,
    /// Each shard's inbox, by index.
    shards: Vec<mpsc::UnboundedSender<HandOff>>,
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
    shards: Vec<mpsc::UnboundedSender<HandOff>>,
    open: Arc<AtomicUsize>,
    registry: Arc<Registry<ReceiverCounters>>,
) {
    tokio_uring::start(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        let slot = shards.len();
        let a = Rc::new(Acceptor {
            config,
            tls,
            shards,
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
            let connections_max = a.config.receiver.connections_max;
            if a.open.load(Ordering::Relaxed) >= connections_max {
                let e = format!("connections_max {connections_max} reached");
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

/// Greets an accepted connection and hands it to the shard that owns its sender stream.
async fn hand_off(tcp: tokio_uring::net::TcpStream, peer: std::net::SocketAddr, a: Rc<Acceptor>) {
    match greet(tcp, &a.config, a.tls.clone()).await {
        Ok((stream, hello, pending)) => {
            // Mutual TLS: the handshake required a certificate chaining to the CA.
            let certificate = stream.peer_certificate().unwrap_or_default();
            let id = (super::dedup::sender_run(&certificate, hello.run_id), hello.core);
            let shard = owner(id, a.shards.len());
            match stream.into_parts() {
                Ok((tcp, tls)) => {
                    a.counters.borrow_mut().connections_accepted += 1;
                    let certificate = Arc::from(certificate);
                    let h = HandOff { tcp, tls, hello, id, certificate, pending, peer };
                    let _ = a.shards[shard].send(h);
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
        // Frames pipelined behind HELLO: re-encode for the shard's decoder.
        pending.extend_from_slice(&f.header.wire(&f.payload));
    }
    Ok((stream, hello, pending))
}
