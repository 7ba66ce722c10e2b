//! Receiver names resolved off the worker threads.
//!
//! # Design constraints
//! - `getaddrinfo` blocks (a slow or dead DNS server holds it for seconds), so a worker's
//!   io_uring thread never calls it. One resolver thread per process serves every worker
//!   through a queue of at most [`RESOLVE_QUEUE_MAX`] requests; when that is full the connect
//!   attempt fails at once ("resolver busy") and is retried with the receiver's backoff.
//! - An address written as `ip:port` is parsed in place: no thread, no DNS.
//!
//! # Operation
//! [`resolve`] parses or queues the name; the resolver thread answers each request through a
//! oneshot channel, which the connecting task awaits on its own ring.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;

use tokio::sync::oneshot;

/// Requests waiting for the resolver thread, all workers together.
pub const RESOLVE_QUEUE_MAX: usize = 64;

type Request = (String, oneshot::Sender<io::Result<SocketAddr>>);

/// The first address `address` (`host:port`) resolves to.
pub async fn resolve(address: &str) -> io::Result<SocketAddr> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (tx, rx) = oneshot::channel();
    match resolver()?.try_send((address.to_string(), tx)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            let e = format!("resolver busy ({RESOLVE_QUEUE_MAX} names waiting)");
            return Err(io::Error::new(io::ErrorKind::WouldBlock, e));
        }
        Err(TrySendError::Disconnected(_)) => return Err(io::Error::other("resolver ended")),
    }
    rx.await.map_err(|_| io::Error::other("resolver ended"))?
}

/// The resolver thread's queue, starting the thread on first use.
fn resolver() -> io::Result<&'static SyncSender<Request>> {
    static QUEUE: OnceLock<SyncSender<Request>> = OnceLock::new();
    if let Some(q) = QUEUE.get() {
        return Ok(q);
    }
    let (tx, rx) = sync_channel::<Request>(RESOLVE_QUEUE_MAX);
    // Two workers racing here start two threads; the loser's ends when its queue is dropped.
    std::thread::Builder::new().name("resolver".into()).spawn(move || {
        for (name, reply) in rx {
            let _ = reply.send(lookup(&name));
        }
    })?;
    Ok(QUEUE.get_or_init(|| tx))
}

fn lookup(address: &str) -> io::Result<SocketAddr> {
    address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{address} resolves to nothing"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_skip_the_resolver_and_names_go_through_it() {
        tokio_uring::start(async {
            let a = resolve("127.0.0.1:7400").await.unwrap();
            assert_eq!(a, "127.0.0.1:7400".parse().unwrap());
            let b = resolve("localhost:7401").await.unwrap();
            assert_eq!(b.port(), 7401);
            assert!(b.ip().is_loopback(), "{b}");
            let e = resolve("no-port-here").await.unwrap_err();
            assert!(e.to_string().contains("invalid socket address"), "{e}");
        });
    }
}
