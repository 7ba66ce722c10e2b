//! One slot of a worker's connection pool to one receiver: connect, handshake, HELLO, then
//! send frames from the outbox and read acknowledgements until the connection fails;
//! reconnect with capped, jittered exponential backoff.
//!
//! # Operation
//! 1. TCP connect (`connect_timeout_ms`), TLS 1.3 handshake and HELLO/WELCOME
//!    (`handshake_timeout_ms`).
//! 2. A reader task decodes ACK, HEARTBEAT and ERROR frames; the writer (this task) sends
//!    frames as the outbox releases them, and a HEARTBEAT after `heartbeat_interval_ms` idle.
//! 3. From connect to close, the socket is watched by the eBPF programs (`crate::ebpf`):
//!    the kernel's retransmissions and resets on it count for this receiver.
//! 4. Any error, EOF, or a close by the worker's ticker (ack or heartbeat overdue) ends the
//!    connection; its in-flight frames go back to the front of the outbox.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tokio_uring::net::TcpStream;

use crate::protocol::{Frame, FrameDecoder, Hello, Kind};
use crate::runtime::core::{ConnHandle, Core};
use crate::tls::stream::{handshake, TlsStream, READ_BYTES};

/// Largest frame a receiver may send us (acks and errors are tiny).
const REPLY_BYTES_MAX: u32 = 64 << 10;

/// A receiver to connect to, shared by every worker's slots.
pub struct Target {
    pub destination: usize,
    pub address: String,
    pub server_name: ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub run_id: u64,
}

/// Runs one pool slot until the worker stops and its outbox is empty.
pub async fn run_slot(
    core: Rc<RefCell<Core>>,
    target: Arc<Target>,
    mut stop: watch::Receiver<bool>,
) {
    let (initial, max) = {
        let r = &core.borrow().config.receivers;
        (r.backoff_initial_ms, r.backoff_max_ms)
    };
    let mut backoff = initial;
    let mut failures = 0u64;
    loop {
        if done(&core) {
            return;
        }
        match connect(&core, &target).await {
            Ok((stream, dec, _watch)) => {
                // `_watch` counts this connection's retransmits and resets until it ends.
                if failures > 0 {
                    tracing::info!(receiver = %target.address, "connected after {failures} failed attempts");
                }
                backoff = initial;
                failures = 0;
                let reason = serve(&core, &target, stream, dec).await;
                tracing::warn!(receiver = %target.address, "connection ended: {reason}");
            }
            Err(e) => {
                failures += 1;
                core.borrow_mut().counters.destinations[target.destination].connect_failures += 1;
                if failures == 1 {
                    tracing::warn!(receiver = %target.address, "cannot connect: {e}");
                } else {
                    tracing::debug!(receiver = %target.address, "cannot connect (attempt {failures}): {e}");
                }
                let delay = jitter(backoff, &core);
                backoff = (backoff * 2).min(max);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// The worker is stopping and has nothing left to deliver.
fn done(core: &Rc<RefCell<Core>>) -> bool {
    let c = core.borrow();
    c.stopping && c.outbox.is_empty()
}

/// A delay in [d/2, d], so that workers do not reconnect in lockstep.
fn jitter(d: u64, core: &Rc<RefCell<Core>>) -> u64 {
    let noise = core.borrow().now_ns() ^ (core.borrow().id as u64).wrapping_mul(0x9e37_79b9);
    d / 2 + noise % (d / 2 + 1)
}

fn resolve(address: &str) -> io::Result<SocketAddr> {
    address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{address} resolves to nothing"))
    })
}

async fn connect(
    core: &Rc<RefCell<Core>>,
    target: &Target,
) -> io::Result<(TlsStream, FrameDecoder, Option<crate::ebpf::Watch>)> {
    let (connect_ms, handshake_ms) = {
        let r = &core.borrow().config.receivers;
        (r.connect_timeout_ms, r.handshake_timeout_ms)
    };
    let addr = resolve(&target.address)?;
    let tcp = tokio::time::timeout(Duration::from_millis(connect_ms), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
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
    let hello = Hello {
        run_id: target.run_id,
        core: core.borrow().id as u16,
        name: core.borrow().config.shipper.name.clone(),
    };
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
    welcome.await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no WELCOME in time"))??;
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

/// Runs an established connection until it fails; returns why.
async fn serve(
    core: &Rc<RefCell<Core>>,
    target: &Target,
    stream: TlsStream,
    dec: FrameDecoder,
) -> String {
    let id = {
        let mut c = core.borrow_mut();
        let id = c.next_conn_id();
        c.conns.insert(
            id,
            ConnHandle {
                stream: stream.clone(),
                destination: target.destination,
                heartbeat_sent_ns: None,
            },
        );
        let d = &mut c.counters.destinations[target.destination];
        d.connects += 1;
        d.connections_up += 1;
        id
    };
    let mut reader = tokio_uring::spawn(read_replies(core.clone(), stream.clone(), dec, id));
    let result = write_frames(core, &stream, id, &mut reader).await;
    stream.shutdown();
    reader.abort();
    let mut c = core.borrow_mut();
    c.conns.remove(&id);
    let requeued = c.outbox.fail(id);
    c.counters.frames_resent += requeued as u64;
    let d = &mut c.counters.destinations[target.destination];
    d.connections_up -= 1;
    match result {
        Ok(()) => "worker stopped".into(),
        Err(e) => {
            d.connections_lost += 1;
            if requeued > 0 {
                c.wake.notify_waiters();
            }
            format!("{e} ({requeued} unacknowledged frames requeued)")
        }
    }
}

async fn write_frames(
    core: &Rc<RefCell<Core>>,
    stream: &TlsStream,
    id: u64,
    reader: &mut tokio::task::JoinHandle<io::Result<()>>,
) -> io::Result<()> {
    let heartbeat = Duration::from_millis(core.borrow().config.receivers.heartbeat_interval_ms);
    loop {
        let (frame, wake) = {
            let mut c = core.borrow_mut();
            let now = c.now_ns();
            (c.outbox.next(id, now), c.wake.clone())
        };
        if let Some(f) = frame {
            stream.send(&f.wire).await?;
            let mut c = core.borrow_mut();
            c.counters.frames_sent += 1;
            c.counters.frame_bytes_sent += f.wire.len() as u64;
            continue;
        }
        if done(core) {
            return Ok(());
        }
        if stream.wants_write() {
            stream.send(&[]).await?;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(heartbeat) => send_heartbeat(core, stream, id).await?,
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

async fn send_heartbeat(core: &Rc<RefCell<Core>>, stream: &TlsStream, id: u64) -> io::Result<()> {
    let now = {
        let mut c = core.borrow_mut();
        let now = c.now_ns();
        if let Some(h) = c.conns.get_mut(&id) {
            h.heartbeat_sent_ns.get_or_insert(now);
        }
        now
    };
    stream.send(&Frame::control(Kind::Heartbeat, now, &[])).await
}

async fn read_replies(
    core: Rc<RefCell<Core>>,
    stream: TlsStream,
    mut dec: FrameDecoder,
    id: u64,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut plain = Vec::new();
    let mut open = true;
    loop {
        while let Some(f) = dec.next_frame().map_err(invalid)? {
            let mut c = core.borrow_mut();
            let now = c.now_ns();
            match f.header.kind {
                Kind::Ack => c.on_ack(f.header.seq, now),
                Kind::Heartbeat => {}
                Kind::Error => return Err(refused(&f.payload)),
                k => return Err(invalid(format!("unexpected {k:?} frame from receiver"))),
            }
            if let Some(h) = c.conns.get_mut(&id) {
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
