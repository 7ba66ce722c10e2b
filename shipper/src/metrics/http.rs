//! The `/metrics` endpoint: a plain HTTP/1.1 responder on its own threads, off the data path.
//!
//! # Design constraints
//! - At most [`CONNECTIONS_MAX`] connections are served at once, each on its own short-lived
//!   thread of [`THREAD_STACK_BYTES`] stack; a connection past that is closed at once and
//!   counted (`shipper_metrics_connections_refused_total`). So a few slow or stalled clients
//!   cannot stall a scrape, and many cannot pile up threads or memory.
//! - One request per connection, request head at most [`REQUEST_BYTES_MAX`], and one deadline
//!   for the whole request, [`REQUEST_DEADLINE_MS`] from accept to the last byte of the
//!   response: a client that sends a byte a second is closed at the deadline like one that
//!   sends nothing (counted, `shipper_metrics_requests_timed_out_total`).
//! - Plain blocking std I/O: these threads never touch a worker's io_uring.
//!
//! # Operation
//! The `metrics` thread accepts. Under the limit it hands the connection to a new
//! `metrics-conn` thread, which reads the request head (the read timeout set before each read
//! to what is left of the deadline), renders the counters, writes the response (the write
//! timeout likewise) and closes. Its slot is freed before the socket closes, so a client that
//! has read a whole response finds its slot free again. The endpoint's own counters
//! (`shipper_metrics_*`: connections open, refused, timed out) end every response.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::text::Exposition;

/// Longest request head read, in bytes.
pub const REQUEST_BYTES_MAX: usize = 8 << 10;

/// Connections served at once; more are closed at once and counted.
pub const CONNECTIONS_MAX: usize = 32;

/// Time from accept to the last byte of the response, in milliseconds.
pub const REQUEST_DEADLINE_MS: u64 = 5000;

/// Stack of one connection thread: a request head, a rendered exposition (on the heap).
const THREAD_STACK_BYTES: usize = 256 << 10;

/// What the endpoint counts of itself.
#[derive(Default)]
struct Counters {
    /// Connections being served (at most [`CONNECTIONS_MAX`]).
    open: AtomicUsize,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

impl Counters {
    fn render(&self) -> String {
        let mut out = Exposition::default();
        let open = self.open.load(Ordering::Relaxed) as f64;
        out.family(
            "shipper_metrics_connections_open",
            "gauge",
            "Connections to /metrics being served (this one included).",
        )
        .sample("shipper_metrics_connections_open", &[], open);
        let refused = self.refused.load(Ordering::Relaxed) as f64;
        out.family(
            "shipper_metrics_connections_refused_total",
            "counter",
            "Connections to /metrics closed at once: the connection limit was reached.",
        )
        .sample("shipper_metrics_connections_refused_total", &[], refused);
        let timed_out = self.timed_out.load(Ordering::Relaxed) as f64;
        out.family(
            "shipper_metrics_requests_timed_out_total",
            "counter",
            "Connections to /metrics closed at the request deadline.",
        )
        .sample("shipper_metrics_requests_timed_out_total", &[], timed_out);
        out.finish()
    }
}

/// Frees a connection slot when dropped.
struct Slot(Arc<Counters>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds `addr` and serves `render()` at `/metrics` until the process exits. Returns the
/// bound address (useful with port 0).
pub fn serve<F>(addr: &str, render: F) -> io::Result<SocketAddr>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    serve_listener(TcpListener::bind(addr)?, render)
}

/// As [`serve`], on a listener already bound (one a takeover handed over).
pub fn serve_listener<F>(listener: TcpListener, render: F) -> io::Result<SocketAddr>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let local = listener.local_addr()?;
    let render = Arc::new(render);
    let counters = Arc::new(Counters::default());
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => admit(stream, &counters, &render),
                // EMFILE and the like: the next accept may succeed; never spin.
                Err(e) => {
                    tracing::debug!("metrics accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    })?;
    Ok(local)
}

/// Serves `stream` on a thread of its own, or closes it at once when the limit is reached.
fn admit<F>(stream: TcpStream, counters: &Arc<Counters>, render: &Arc<F>)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let deadline = Instant::now() + Duration::from_millis(REQUEST_DEADLINE_MS);
    if counters.open.fetch_add(1, Ordering::Relaxed) >= CONNECTIONS_MAX {
        counters.open.fetch_sub(1, Ordering::Relaxed);
        counters.refused.fetch_add(1, Ordering::Relaxed);
        return; // dropped: closed
    }
    let slot = Slot(counters.clone());
    let (own, render) = (counters.clone(), render.clone());
    let spawned = std::thread::Builder::new()
        .name("metrics-conn".into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || {
            let result = answer(&stream, deadline, &|| render() + &own.render());
            if let Err(e) = result {
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                    own.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!("metrics request failed: {e}");
            }
            // The slot first, then the socket: see the module's Operation.
            drop(slot);
            drop(stream);
        });
    if let Err(e) = spawned {
        // The closure (and with it the slot and the stream) was dropped: counted as refused.
        tracing::warn!("metrics: cannot start a connection thread: {e}");
        counters.refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// What is left until `deadline`, or a timeout error when it has passed.
fn left(deadline: Instant) -> io::Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "request deadline passed"));
    }
    Ok(deadline - now)
}

fn answer(
    mut stream: &TcpStream,
    deadline: Instant,
    render: &dyn Fn() -> String,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > REQUEST_BYTES_MAX {
            let status = "431 Request Header Fields Too Large";
            return respond(stream, deadline, status, "text/plain", "");
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    match (method, path) {
        (b"GET", b"/metrics") => {
            respond(stream, deadline, "200 OK", "text/plain; version=0.0.4", &render())
        }
        (b"GET", _) => respond(stream, deadline, "404 Not Found", "text/plain", "try /metrics\n"),
        _ => respond(stream, deadline, "405 Method Not Allowed", "text/plain", ""),
    }
}

/// Writes the response; the write timeout is what is left of the deadline (a client that
/// reads slowly cannot hold the thread past it: the timeout is set again before each write).
fn respond(
    mut stream: &TcpStream,
    deadline: Instant,
    status: &str,
    ctype: &str,
    body: &str,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    for part in [head.as_bytes(), body.as_bytes()] {
        let mut rest = part;
        while !rest.is_empty() {
            stream.set_write_timeout(Some(left(deadline)?))?;
            match stream.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The longest metrics answer [`fetch`] reads (a shipper with many services and sources
/// stays far under).
const ANSWER_BYTES_MAX: usize = 64 << 20;

/// Fetches `/metrics` from `addr` (`HOST:PORT`) within 5 s (`shipper status`, tests, the demo
/// and the perf suite).
pub fn fetch(addr: &str) -> io::Result<String> {
    let head = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let answer = crate::http::request(addr, &head, &[], Duration::from_secs(5), ANSWER_BYTES_MAX)?;
    if answer.status != 200 {
        let e = format!("{addr}: GET /metrics answered {}", answer.status_line);
        return Err(io::Error::other(e));
    }
    Ok(String::from_utf8_lossy(&answer.body).into_owned())
}

/// [`fetch`], `None` on any failure.
pub fn get(addr: &str) -> Option<String> {
    fetch(addr).ok()
}
