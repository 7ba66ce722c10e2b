//! Socket sources: syslog (RFC 5424 / RFC 3164) and JSON messages over UDP, TCP and a unix
//! datagram socket such as `/dev/log`.
//!
//! # Design constraints
//! - Thread per core: a socket is read only by the worker that owns it, on that worker's
//!   io_uring. UDP and TCP sources bind one socket **per worker** on the same address with
//!   SO_REUSEPORT (unless `worker` pins the source to one): the kernel spreads datagrams and
//!   connections over the workers by a hash of the 4-tuple, so one busy port is read by every
//!   core instead of saturating one, no datagram crosses a thread, and a given sender (one
//!   source port) always lands on the same worker, which keeps its messages in order. Binding on
//!   one worker and handing datagrams to the others would put a cross-thread queue on the
//!   per-record path. A unix datagram socket is a path, which cannot be shared that way: it is
//!   owned by one worker.
//! - Every socket is bound on the main thread before any worker starts, so a taken port or a
//!   bad path fails start-up with its name, and its address is logged (`socket source bound`)
//!   and kept in the source's [`SocketCounters`] (`local`) and the
//!   `shipper_socket_info` metric, where the kernel drop counters find it.
//! - Memory: per datagram socket one buffer of `message_bytes_max + 1` bytes; per TCP
//!   connection one read buffer of [`TCP_READ_BYTES`] plus a carry of at most
//!   `message_bytes_max`; at most `connections_max` connections per listening worker.
//! - Idle peers cannot starve a TCP source: a connection that sends nothing for
//!   `idle_timeout_ms` (default 10 minutes) is closed, and at `connections_max` a new
//!   connection closes the longest-idle one instead of being refused. The table of open
//!   connections is per source and worker ([`run::Connections`], `Rc<RefCell<_>>` shared by
//!   the acceptor and the connection tasks on the worker's thread: no lock); choosing whom to
//!   evict scans it, only when it is full.
//! - A socket source is not durable: like a pipe, it never stops reading (a full outbox drops
//!   the newest batch, counted), so the kernel's receive queue (`receive_buffer_bytes`) only
//!   has to absorb scheduling hiccups.
//!
//! # Format
//! ```text
//! udp, unix: one message per datagram (trailing "\n" / NUL ignored by the syslog parser)
//! tcp:       a stream framed by newline or octet counting (framing.rs, RFC 6587)
//! message:   syslog -> JSON record (transforms/syslog), or a JSON object kept as sent
//! ```
//!
//! # Operation
//! 1. Main thread: bind (SO_REUSEPORT, SO_RCVBUF; unix: remove a stale socket file, bind,
//!    chmod `mode`), log the address and the receive buffer the kernel granted.
//! 2. Worker: a datagram socket is read, once readable, with a non-blocking `read(2)`
//!    (`sources::read_until_stopped`: nothing in flight at a stop, so a takeover can hand it
//!    over) into a buffer one message larger than `message_bytes_max`: a datagram filling it
//!    was longer and is cut and counted. A TCP listener accepts once readable
//!    (`connections::Listener`: nothing in flight at a stop either); each connection is its
//!    own task reading through the ring and framing with [`framing::Framer`]; a malformed
//!    octet count closes its connection (logged with the peer, counted). At `connections_max` the
//!    acceptor evicts the connection that has sent nothing for longest: `shutdown(2)` on its
//!    fd ends the task's pending read, it is counted (`connections_evicted`) and logged at
//!    most once per 10 s per source and worker. A connection silent for `idle_timeout_ms` is
//!    closed by its task (`connections_idle_closed`). A message started and not finished
//!    when a connection closes, for any reason, is lost and counted (`messages_partial`).
//! 3. Every message goes to the worker through [`crate::sources::Intake::record`]: the
//!    transforms parse it (syslog rendered as JSON, or JSON), give it its service and admit
//!    it like a pipe line. On stop, reads end and connections close.

pub mod framing;
pub mod run;

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, Socket, Type};
use thiserror::Error;

use crate::config::socket::{SocketSource, Transport};
use crate::transforms::syslog::Failure as MessageFailure;

/// Bytes asked of one TCP read.
pub const TCP_READ_BYTES: usize = 64 << 10;

/// Pending connections the kernel queues for a TCP listener.
const LISTEN_BACKLOG: i32 = 1024;

/// Why a socket source could not be set up.
#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket source {name:?}: cannot bind {transport} {local}: {source}")]
    Bind { name: String, transport: &'static str, local: String, source: io::Error },
    #[error("socket source {name:?}: {path} exists and is not a socket")]
    NotSocket { name: String, path: PathBuf },
}

/// A bound socket, handed to the worker that reads it.
pub enum Bound {
    /// A UDP or unix datagram socket.
    Datagram(std::os::fd::OwnedFd),
    Listener(std::net::TcpListener),
}

/// One socket of a source: what it is bound to and what the kernel granted.
pub struct BoundSocket {
    pub socket: Bound,
    /// `ip:port` or path.
    pub local: String,
    /// SO_RCVBUF as the kernel reports it (twice what was granted, see socket(7)).
    pub receive_buffer_bytes: usize,
    /// A second descriptor of a socket another `BoundSocket` holds ([`BoundSocket::try_clone`]):
    /// not handed over again or watched twice.
    pub shared: bool,
}

impl BoundSocket {
    /// Another descriptor of the same socket (two workers reading one socket).
    pub fn try_clone(&self) -> io::Result<BoundSocket> {
        let socket = match &self.socket {
            Bound::Datagram(fd) => Bound::Datagram(fd.try_clone()?),
            Bound::Listener(l) => Bound::Listener(l.try_clone()?),
        };
        let (local, receive_buffer_bytes) = (self.local.clone(), self.receive_buffer_bytes);
        Ok(BoundSocket { socket, local, receive_buffer_bytes, shared: true })
    }
}

/// Binds `count` sockets for `cfg` (more than one only for udp and tcp, with SO_REUSEPORT).
pub fn bind(cfg: &SocketSource, count: usize) -> Result<Vec<BoundSocket>, SocketError> {
    match cfg.transport {
        Transport::Unix => {
            let path = cfg.path.as_deref().expect("validated: unix has a path");
            Ok(vec![bind_unix(cfg, path)?])
        }
        Transport::Udp | Transport::Tcp => {
            let addr = cfg.socket_addr().expect("validated: udp and tcp have an address");
            let receive_buffer_bytes = cfg.receive_buffer_bytes;
            let inet =
                Inet { name: &cfg.name, transport: cfg.transport, addr, receive_buffer_bytes };
            bind_inet(&inet, count)
        }
    }
}

/// What to bind for one inet source (a socket source, or a forward source's TCP port).
pub struct Inet<'a> {
    /// The source's name, for errors.
    pub name: &'a str,
    /// Udp or Tcp.
    pub transport: Transport,
    pub addr: SocketAddr,
    /// SO_RCVBUF asked for, in bytes.
    pub receive_buffer_bytes: u64,
}

/// Binds `count` sockets on `inet.addr`, with SO_REUSEPORT when more than one; with port 0
/// the others join the port the kernel chose for the first. A TCP socket listens.
pub fn bind_inet(inet: &Inet<'_>, count: usize) -> Result<Vec<BoundSocket>, SocketError> {
    let mut addr = inet.addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let s = bind_one(inet, addr, count > 1)?;
        addr = s.local.parse().expect("a formatted SocketAddr");
        out.push(s);
    }
    Ok(out)
}

fn bind_one(inet: &Inet<'_>, addr: SocketAddr, reuse: bool) -> Result<BoundSocket, SocketError> {
    let err = |source| SocketError::Bind {
        name: inet.name.to_string(),
        transport: inet.transport.label(),
        local: addr.to_string(),
        source,
    };
    let tcp = inet.transport == Transport::Tcp;
    let ty = if tcp { Type::STREAM } else { Type::DGRAM };
    let socket = Socket::new(Domain::for_address(addr), ty, None).map_err(err)?;
    if reuse {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if tcp {
        socket.set_reuse_address(true).map_err(err)?;
    }
    let _ = socket.set_recv_buffer_size(inet.receive_buffer_bytes as usize);
    socket.bind(&addr.into()).map_err(err)?;
    if tcp {
        socket.listen(LISTEN_BACKLOG).map_err(err)?;
    }
    let local = socket.local_addr().map_err(err)?.as_socket().map_or(addr, |a| a);
    let receive_buffer_bytes = socket.recv_buffer_size().map_err(err)?;
    let socket = if tcp { Bound::Listener(socket.into()) } else { Bound::Datagram(socket.into()) };
    Ok(BoundSocket { socket, local: local.to_string(), receive_buffer_bytes, shared: false })
}

/// A socket another process bound at `local` (a takeover): a datagram socket or a listener,
/// as its type says.
pub fn adopt(fd: std::os::fd::OwnedFd, local: String) -> io::Result<BoundSocket> {
    let socket = Socket::from(fd);
    let receive_buffer_bytes = socket.recv_buffer_size()?;
    let socket = match socket.r#type()? {
        Type::STREAM => Bound::Listener(socket.into()),
        Type::DGRAM => Bound::Datagram(socket.into()),
        other => return Err(io::Error::other(format!("handed socket of type {other:?}"))),
    };
    Ok(BoundSocket { socket, local, receive_buffer_bytes, shared: false })
}

/// `chmod` that refuses (EOPNOTSUPP / ELOOP) to act through a symbolic link at `path`.
fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path; AT_FDCWD resolves it like chmod(2) would.
    let rc = unsafe { libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bind_unix(cfg: &SocketSource, path: &Path) -> Result<BoundSocket, SocketError> {
    let err = |source| SocketError::Bind {
        name: cfg.name.clone(),
        transport: "unix",
        local: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        // A socket file outlives the process that bound it: a stale one is replaced.
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => return Err(SocketError::NotSocket { name: cfg.name.clone(), path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let socket = Socket::new(Domain::UNIX, Type::DGRAM, None).map_err(err)?;
    let _ = socket.set_recv_buffer_size(cfg.receive_buffer_bytes as usize);
    socket.bind(&socket2::SockAddr::unix(path).map_err(err)?).map_err(err)?;
    // bind applies the umask; set exactly the configured bits, without following a link
    // swapped in at the path since the bind (the shipper often runs as root).
    chmod_nofollow(path, cfg.mode_bits()).map_err(err)?;
    let receive_buffer_bytes = socket.recv_buffer_size().map_err(err)?;
    Ok(BoundSocket {
        socket: Bound::Datagram(socket.into()),
        local: path.display().to_string(),
        receive_buffer_bytes,
        shared: false,
    })
}

/// Counters of one socket source on one core.
#[derive(Clone, Debug, Default)]
pub struct SocketCounters {
    pub source: String,
    /// udp | tcp | unix (label `transport` of `shipper_socket_info`).
    pub transport: &'static str,
    /// The bound address or path (label `local` of `shipper_socket_info`).
    pub local: String,
    pub messages_received: u64,
    pub bytes_received: u64,
    pub messages_empty: u64,
    /// Datagrams and newline-framed messages cut at message_bytes_max, and octet-counted
    /// messages refused for announcing more.
    pub messages_oversize: u64,
    /// APP-NAMEs, TAGs and JSON keys cut to the protocol's 255 bytes.
    pub keys_truncated: u64,
    pub parse_failures: [u64; MessageFailure::ALL.len()],
    pub connections_accepted: u64,
    pub connections_closed: u64,
    /// Longest-idle connections closed to make room: connections_max were open.
    pub connections_evicted: u64,
    /// Connections closed after sending nothing for idle_timeout_ms.
    pub connections_idle_closed: u64,
    pub connections_open: u64,
    /// TCP streams closed for a malformed octet count.
    pub framing_errors: u64,
    /// Partial messages (started, not complete) held when their TCP connection closed: lost.
    pub messages_partial: u64,
    pub read_errors: u64,
}
