//! One slot of a worker's connection pool to one receiver: connect, handshake, HELLO, then
//! send frames from the outbox and read acknowledgements until the connection fails or its
//! tier is no longer needed; probe again with capped, jittered exponential backoff.
//!
//! # Operation
//! 0. A slot of a standby or dead-letter receiver idles until its tier is wanted
//!    (`health.rs`).
//! 1. Name lookup on the resolver thread (`resolve.rs`) and TCP connect
//!    (`connect_timeout_ms`), TLS 1.3 handshake and HELLO/WELCOME
//!    (`handshake_timeout_ms`); the WELCOME marks the receiver up.
//! 2. A reader task decodes ACK, HEARTBEAT and ERROR frames; the writer (this task) sends
//!    frames as the outbox releases them while its receiver's tier takes frames, and a
//!    HEARTBEAT after `heartbeat_interval_ms` idle. Every write has `write_timeout_ms`. Frames
//!    to a dead-letter receiver get the dead-letter flag on the way out.
//! 3. From connect to close, the socket is watched by the eBPF programs (`crate::ebpf`):
//!    the kernel's retransmissions and resets on it count for this receiver.
//! 4. Any error, EOF, or a close by the worker's ticker (ack or heartbeat overdue: the
//!    receiver is declared down) ends the connection; its in-flight frames go back to the
//!    front of the outbox, to go to another receiver. An ERROR from the receiver ("cannot
//!    write now") declares it down too, so it is probed with backoff; any other lost
//!    connection waits a jittered `backoff_ms_initial` before reconnecting.
//! 5. A REJECT ends nothing: the refused frame leaves the window for its one fate
//!    ([`Link::rejected`]: the dead-letter tier's rejected lane, the quarantine, or a counted
//!    drop). A dead-letter slot connects while refused frames wait, whatever tier is up, and
//!    takes them before anything else.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tokio_uring::net::TcpStream;

use super::batch::Sealed;
use super::health::State;
use super::{ConnHandle, Delivery, Link};
use crate::config::shipper::Tier;
use crate::protocol::frame::FLAG_DEAD_LETTER;
use crate::protocol::{Frame, FrameDecoder, Header, Hello, Kind};
use crate::tls::stream::{handshake, TlsStream, READ_BYTES};

/// Largest frame a receiver may send us (acks and errors are tiny).
const REPLY_BYTES_MAX: u32 = 64 << 10;

/// A receiver to connect to, shared by every worker's slots.
pub struct Target {
    /// Index in `ReceiversSection::destinations`.
    pub destination: usize,
    pub tier: Tier,
    pub address: String,
    pub server_name: ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub run_id: u64,
}

/// Runs one pool slot until the worker stops and its outbox is empty.
pub async fn run_slot<L: Link + 'static>(
    link: Rc<RefCell<L>>,
    target: Arc<Target>,
    mut stop: watch::Receiver<bool>,
) {
    let d = target.destination;
    loop {
        if done(link.borrow().delivery()) {
            return;
        }
        if !needed(link.borrow().delivery(), target.tier) {
            // Idle until every receiver of the tiers above is down (or the worker stops).
            let wake = link.borrow().delivery().wake.clone();
            tokio::select! {
                _ = wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let mut failed = true;
        match connect(&link, &target).await {
            Ok((stream, dec, _watch)) => {
                // `_watch` counts this connection's retransmits and resets until it ends.
                link.borrow_mut().up(d);
                if let Err(failure) = serve(&link, &target, stream, dec).await {
                    let mut l = link.borrow_mut();
                    let others_up = l.delivery().conns.values().any(|h| h.destination == d);
                    if failure.receiver_at_fault || !others_up {
                        l.down(d, &failure.reason);
                    } else {
                        tracing::warn!(receiver = %target.address, "connection ended: {}", failure.reason);
                    }
                } else {
                    failed = false;
                }
            }
            Err(e) => {
                let mut l = link.borrow_mut();
                l.delivery_mut().counters.destinations[d].connect_failures += 1;
                l.down(d, &format!("cannot connect: {e}"));
            }
        }
        let delay = {
            let l = link.borrow();
            let c = l.delivery();
            let r = &c.config.receivers;
            if c.dests.list[d].state == State::Down {
                let delay = c.dests.probe_delay_ms(d, r.backoff_ms_initial, r.backoff_ms_max);
                Some(jitter(delay, c))
            } else {
                // A lost connection to a receiver still up: no reconnect storm either.
                failed.then(|| jitter(r.backoff_ms_initial, c))
            }
        };
        if let Some(delay) = delay {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Whether connections to receivers of `tier` are needed now: the tiers above are down, or
/// (dead-letter) frames refused by a receiver wait for the dead-letter tier.
fn needed(c: &Delivery, tier: Tier) -> bool {
    c.dests.wanted(tier) || (tier == Tier::DeadLetter && c.outbox.has_rejected())
}

/// The next frame for connection `id` to receiver `d` of `tier`: a dead-letter connection
/// takes refused frames first, whatever tier takes the others.
fn next_frame(c: &mut Delivery, tier: Tier, d: usize, id: u64) -> Option<Rc<Sealed>> {
    let now = c.clock.now_ns();
    if tier == Tier::DeadLetter && c.dests.list[d].state == State::Up {
        if let Some(f) = c.outbox.next_rejected(id, now) {
            return Some(f);
        }
    }
    if c.dests.may_send(d) {
        c.outbox.next(id, now)
    } else {
        None
    }
}

/// The worker is stopping and has nothing left to deliver.
fn done(c: &Delivery) -> bool {
    c.stopping && c.outbox.is_empty()
}

/// A delay in [d/2, d], so that workers do not reconnect in lockstep.
fn jitter(d: u64, c: &Delivery) -> u64 {
    let noise = c.clock.now_ns() ^ (c.worker as u64).wrapping_mul(0x9e37_79b9);
    d / 2 + noise % (d / 2 + 1)
}

async fn connect<L: Link>(
    link: &Rc<RefCell<L>>,
    target: &Target,
) -> io::Result<(TlsStream, FrameDecoder, Option<crate::ebpf::Watch>)> {
    let (connect_ms, handshake_ms, worker, name) = {
        let l = link.borrow();
        let c = l.delivery();
        let r = &c.config.receivers;
        (r.connect_timeout_ms, r.handshake_timeout_ms, c.worker, c.config.shipper.name.clone())
    };
    let tcp = tokio::time::timeout(Duration::from_millis(connect_ms), async {
        TcpStream::connect(super::resolve::resolve(&target.address).await?).await
    })
    .await
    .map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, "name lookup and TCP connect timed out")
    })??;
    tcp.set_nodelay(true)?;
    // SAFETY: `tcp` owns the descriptor and outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&tcp)) };
    let watch = crate::ebpf::watch_connection(fd, &target.address).unwrap_or_else(|e| {
        tracing::warn!(receiver = %target.address, "retransmits not counted: {e}");
        None
    });
    let conn = rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone())
        .map_err(io::Error::other)?;
    let timeout = Duration::from_millis(handshake_ms);
    let stream = handshake(tcp, conn.into(), timeout).await?;
    let hello = Hello { run_id: target.run_id, core: worker as u16, name };
    stream.send(&Frame::control(Kind::Hello, 0, &hello.encode())).await?;
    let mut dec = FrameDecoder::new(REPLY_BYTES_MAX);
    let welcome = tokio::time::timeout(timeout, async {
        let mut buf = Vec::with_capacity(READ_BYTES);
        let mut plain = Vec::new();
        loop {
            let (res, b) = stream.recv(buf, &mut plain).await;
            buf = b;
            let open = res?;
            dec.push(&plain);
            plain.clear();
            if let Some(f) = dec.next_frame().map_err(invalid)? {
                return match f.header.kind {
                    Kind::Welcome => Ok(()),
                    Kind::Error => Err(refused(&f.payload)),
                    k => Err(invalid(format!("expected WELCOME, got {k:?}"))),
                };
            }
            if !open {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "receiver closed before WELCOME",
                ));
            }
        }
    });
    let welcomed = welcome
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no WELCOME in time")));
    if let Err(e) = welcomed {
        // A read still in the ring would hold the socket open until the receiver acts.
        stream.shutdown();
        return Err(e);
    }
    Ok((stream, dec, watch))
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn refused(payload: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("receiver refused: {}", String::from_utf8_lossy(payload)),
    )
}

/// Why an established connection ended.
struct Failure {
    reason: String,
    /// The receiver itself failed to keep up (a write timed out), not just this connection.
    receiver_at_fault: bool,
}

/// Runs an established connection until it fails (returns why) or is no longer needed.
async fn serve<L: Link + 'static>(
    link: &Rc<RefCell<L>>,
    target: &Target,
    stream: TlsStream,
    dec: FrameDecoder,
) -> Result<(), Failure> {
    let d = target.destination;
    let id = {
        let mut l = link.borrow_mut();
        let c = l.delivery_mut();
        let id = c.next_conn_id();
        c.conns.insert(
            id,
            ConnHandle { stream: stream.clone(), destination: d, heartbeat_sent_ns: None },
        );
        let dc = &mut c.counters.destinations[d];
        dc.connects += 1;
        dc.connections_up += 1;
        id
    };
    let mut reader = tokio_uring::spawn(read_replies(link.clone(), stream.clone(), dec, id, d));
    let result = write_frames(link, target, &stream, id, &mut reader).await;
    stream.shutdown();
    reader.abort();
    let mut l = link.borrow_mut();
    let c = l.delivery_mut();
    c.conns.remove(&id);
    let requeued = c.outbox.fail(id);
    c.counters.frames_resent += requeued as u64;
    if requeued > 0 {
        c.wake.notify_waiters();
    }
    let dc = &mut c.counters.destinations[d];
    dc.connections_up -= 1;
    dc.frames_resent += requeued as u64;
    result.map_err(|e| {
        dc.connections_lost += 1;
        Failure {
            reason: format!("{e} ({requeued} unacknowledged frames requeued)"),
            // A late write, or an ERROR from the receiver ("cannot write now"): back off.
            receiver_at_fault: matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::ConnectionRefused
            ),
        }
    })
}

async fn write_frames<L: Link>(
    link: &Rc<RefCell<L>>,
    target: &Target,
    stream: &TlsStream,
    id: u64,
    reader: &mut tokio::task::JoinHandle<io::Result<()>>,
) -> io::Result<()> {
    let (heartbeat, write_timeout) = {
        let l = link.borrow();
        let r = &l.delivery().config.receivers;
        (Duration::from_millis(r.heartbeat_interval_ms), Duration::from_millis(r.write_timeout_ms))
    };
    let d = target.destination;
    loop {
        let (frame, wake) = {
            let mut l = link.borrow_mut();
            let c = l.delivery_mut();
            (next_frame(c, target.tier, d, id), c.wake.clone())
        };
        if let Some(f) = frame {
            let sent = if target.tier == Tier::DeadLetter {
                let mut wire = f.wire.clone();
                let flags = u16::from_le_bytes([wire[6], wire[7]]);
                Header::restamp(&mut wire, f.seq, flags | FLAG_DEAD_LETTER);
                timed(write_timeout, stream.send(&wire)).await
            } else {
                timed(write_timeout, stream.send(&f.wire)).await
            };
            sent?;
            let mut l = link.borrow_mut();
            let c = l.delivery_mut();
            c.counters.frames_sent += 1;
            c.counters.frame_bytes_sent += f.wire.len() as u64;
            c.counters.destinations[d].frames_sent += 1;
            if target.tier == Tier::DeadLetter {
                c.counters.frames_dead_lettered += 1;
            }
            continue;
        }
        {
            let l = link.borrow();
            let c = l.delivery();
            if done(c) {
                return Ok(());
            }
            if !needed(c, target.tier) && c.outbox.inflight_on(id) == 0 {
                tracing::info!(receiver = %target.address, "closing: a higher tier is back, and no refused frame waits");
                return Ok(());
            }
        }
        if stream.wants_write() {
            timed(write_timeout, stream.send(&[])).await?;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(heartbeat) => {
                timed(write_timeout, send_heartbeat(link, stream, id)).await?;
            }
            r = &mut *reader => {
                return Err(match r {
                    Ok(Ok(())) => io::Error::new(io::ErrorKind::UnexpectedEof, "receiver closed the connection"),
                    Ok(Err(e)) => e,
                    Err(e) => io::Error::other(e),
                });
            }
        }
    }
}

/// `op`, failing with `TimedOut` when it takes longer than `limit`.
async fn timed<T>(limit: Duration, op: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, op).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("a write took over write_timeout_ms ({} ms)", limit.as_millis()),
        )
    })?
}

async fn send_heartbeat<L: Link>(
    link: &Rc<RefCell<L>>,
    stream: &TlsStream,
    id: u64,
) -> io::Result<()> {
    let now = {
        let mut l = link.borrow_mut();
        let c = l.delivery_mut();
        let now = c.clock.now_ns();
        if let Some(h) = c.conns.get_mut(&id) {
            h.heartbeat_sent_ns.get_or_insert(now);
        }
        now
    };
    stream.send(&Frame::control(Kind::Heartbeat, now, &[])).await
}

async fn read_replies<L: Link>(
    link: Rc<RefCell<L>>,
    stream: TlsStream,
    mut dec: FrameDecoder,
    id: u64,
    dest: usize,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut plain = Vec::new();
    let mut open = true;
    loop {
        while let Some(f) = dec.next_frame().map_err(invalid)? {
            let mut l = link.borrow_mut();
            let now = l.delivery().clock.now_ns();
            match f.header.kind {
                Kind::Ack => {
                    l.acked(f.header.seq, now);
                    l.delivery_mut().dests.acked(dest);
                }
                Kind::Reject => {
                    l.rejected(f.header.seq, &f.payload, dest);
                    l.delivery_mut().dests.acked(dest);
                }
                Kind::Heartbeat => {}
                Kind::Error => return Err(refused(&f.payload)),
                k => return Err(invalid(format!("unexpected {k:?} frame from receiver"))),
            }
            if let Some(h) = l.delivery_mut().conns.get_mut(&id) {
                h.heartbeat_sent_ns = None;
            }
        }
        if !open {
            return Ok(());
        }
        let (res, b) = stream.recv(buf, &mut plain).await;
        buf = b;
        open = res?;
        dec.push(&plain);
        plain.clear();
    }
}
