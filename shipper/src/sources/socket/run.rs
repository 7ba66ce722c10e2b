//! The tasks that read socket sources inside a worker (see the module docs of `socket`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::watch;

use super::framing::{Framer, Piece};
use super::TCP_READ_BYTES;
use crate::config::socket::Framing;
use crate::runtime::core::Core;

/// Reads datagrams (UDP or unix) from `fd` until stopped; each one is a message.
///
/// `read(2)` on a datagram socket returns one datagram and discards what did not fit, so the
/// buffer is one byte larger than `message_bytes_max`: a read that fills it was longer.
pub async fn read_datagrams(
    core: Rc<RefCell<Core>>,
    s: usize,
    fd: OwnedFd,
    message_bytes_max: usize,
    stop: watch::Receiver<bool>,
) {
    let file = tokio_uring::fs::File::from_std(std::fs::File::from(fd));
    let on_read = |datagram: &[u8]| {
        let mut c = core.borrow_mut();
        let now = c.now_ns();
        let cut = datagram.len() > message_bytes_max;
        c.on_message(s, &datagram[..datagram.len().min(message_bytes_max)], cut, now);
    };
    let on_error = |e: &std::io::Error| {
        let mut c = core.borrow_mut();
        let sc = &mut c.counters.sockets[s];
        sc.read_errors += 1;
        tracing::error!(source = %sc.source, "datagram read failed: {e}; retrying in 100 ms");
    };
    crate::sources::read_until_stopped(file, message_bytes_max + 1, stop, on_read, on_error).await;
}

async fn read_failed(core: &Rc<RefCell<Core>>, s: usize, what: &str, e: &std::io::Error) {
    {
        let mut c = core.borrow_mut();
        let sc = &mut c.counters.sockets[s];
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
}

/// Accepts connections on `listener` until stopped; each is served by its own task.
pub async fn serve_tcp(
    core: Rc<RefCell<Core>>,
    s: usize,
    listener: std::net::TcpListener,
    limits: TcpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    loop {
        if *stop.borrow() {
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                read_failed(&core, s, "accept", &e).await;
                continue;
            }
        };
        let mut c = core.borrow_mut();
        let sc = &mut c.counters.sockets[s];
        if sc.connections_open >= limits.connections_max as u64 {
            sc.connections_refused += 1;
            let source = &sc.source;
            tracing::warn!(%source, %peer, "connections_max connections open: closing the new one");
            continue;
        }
        sc.connections_accepted += 1;
        sc.connections_open += 1;
        drop(c);
        tokio_uring::spawn(serve_connection(core.clone(), s, stream, peer, limits, stop.clone()));
    }
}

/// Reads one connection until EOF, an error, a framing error or stop; then closes it.
async fn serve_connection(
    core: Rc<RefCell<Core>>,
    s: usize,
    stream: tokio_uring::net::TcpStream,
    peer: SocketAddr,
    limits: TcpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let mut framer = Framer::new(limits.framing, limits.message_bytes_max);
    let mut buf = Vec::with_capacity(TCP_READ_BYTES);
    loop {
        if *stop.borrow() {
            break;
        }
        buf.clear();
        let (res, b) = tokio::select! {
            r = stream.read(buf) => r,
            _ = stop.changed() => break,
        };
        buf = b;
        let n = match res {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let mut c = core.borrow_mut();
                let sc = &mut c.counters.sockets[s];
                sc.read_errors += 1;
                tracing::warn!(source = %sc.source, %peer, "connection read failed: {e}");
                break;
            }
        };
        let mut c = core.borrow_mut();
        let now = c.now_ns();
        let framed = framer.push(&buf[..n], |piece| match piece {
            Piece::Message { bytes, cut } => c.on_message(s, bytes, cut, now),
            Piece::Oversize(len) => {
                let sc = &mut c.counters.sockets[s];
                sc.messages_oversize += 1;
                let (source, max) = (&sc.source, limits.message_bytes_max);
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
            let sc = &mut c.counters.sockets[s];
            sc.framing_errors += 1;
            tracing::warn!(source = %sc.source, %peer, "closing connection: {e}");
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let mut c = core.borrow_mut();
    let sc = &mut c.counters.sockets[s];
    sc.connections_open -= 1;
    sc.connections_closed += 1;
}
