//! Takeover: `shipper run --takeover` replaces a running shipper without a gap. The running
//! one hands its FIFOs and listening sockets (and what was read of a line not yet finished)
//! to the new one over a unix control socket, with SCM_RIGHTS.
//!
//! # Design constraints
//! - A writer never sees the FIFO without a reader: the descriptors are open in one process
//!   or the other at every moment (the old one exits only after the new one says it holds
//!   them), so `write(2)` never fails with EPIPE and `open(2)` never blocks; while nobody
//!   reads, the pipe's buffer (`pipe_bytes`) and a socket's receive queue keep what comes.
//! - One reader at a time: the old process stops reading before it hands over, and a stopped
//!   source has no read in flight (`sources::read_until_stopped`), so no byte is read twice
//!   or by nobody. The partial line a pipe held travels with its FIFO and is finished by the
//!   new process: lines are counted read once, by the process that completes them.
//! - The control socket is mode 0600 and serves only its own user (SO_PEERCRED); a request is
//!   one line of at most [`wire::REQUEST_BYTES_MAX`] bytes, read within
//!   [`REQUEST_TIMEOUT_MS`]: a peer that sends garbage or nothing is answered, closed and
//!   logged (with a running count, at most once a second), and holds the control thread at
//!   most that long. It never reaches the workers.
//!
//! # Format
//! The bytes on the socket are in [`wire`]. The description, JSON:
//! ```text
//! Description { version: 1,
//!   pipes:   [{ path, carry: [u8], discarding }]   descriptor i is pipes[i]
//!   sockets: [{ kind: udp|tcp|unix|forward|metrics, key, local }]
//!                                                  descriptor pipes.len() + j is sockets[j]
//!   ebpf:    { object, programs, sources, receivers, reasons } or absent
//!                                                  then 5 maps and one link per program
//! }
//! ```
//! `key` is what the configuration names (a socket source's `address` or `path`, a forward
//! source's `address`, `metrics.listen`); a udp or tcp source has one socket per worker.
//! `ebpf` is `crate::ebpf::Handing` (the attached programs, adopted by the new process when
//! they are the same; absent from a process without them, or one older than the field).
//!
//! # Operation
//! 1. New process: configuration and TLS material loaded; it connects to
//!    `shipper.control_socket` and sends the request.
//! 2. Old process (control thread): checks the peer, reads the request, passes the connection
//!    to the main thread, stops accepting. The main thread stops the workers as SIGTERM does
//!    (sources stop reading, batches sealed, acknowledgements awaited up to
//!    `worker::tick::TAKEOVER_STOP_MS`, what is left written to the disk buffer, marks synced),
//!    collects the pipes' partial lines, sends the description and its duplicates of the
//!    descriptors (the attached eBPF programs' last: from then on the old process leaves
//!    their maps alone).
//! 3. New process: tells systemd (if `NOTIFY_SOCKET` is set) that it is the service's main
//!    process now (`MAINPID=`), answers ADOPTED, takes each descriptor whose source its
//!    configuration still has (matched by path or address), closes (and logs) the others;
//!    adopts the eBPF programs (or, when none came or they differ, loads its own: only then
//!    does the load fall in the gap);
//!    opens and binds what it was not handed as a normal start does, then opens the disk buffer (replaying
//!    what the old one left) and starts its workers. The old process exits 0 on ADOPTED.
//! 4. Failure: no shipper on the socket, a refusal, a broken or late answer: the new process
//!    says why and exits 1; it never starts without the handover (the paths and ports are
//!    held by the old process, which, if the new one went away before its request, runs on
//!    untouched). If the new process goes away after the request, the old one has stopped:
//!    it logs that nobody adopted the descriptors and exits 1 (a crash's loss: the pipes'
//!    buffers are gone with the last descriptor).

pub mod wire;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sources::pipe::Leftover;

/// How long the control thread waits for a peer's request.
pub const REQUEST_TIMEOUT_MS: u64 = 2000;

/// How long, past `shutdown_timeout_ms`, the new process waits for the old one to stop and
/// hand over: the disk buffer's tidying after the deadline (5 s) and a margin.
pub const STOP_MARGIN_MS: u64 = 15_000;

/// How long the old process waits for ADOPTED after sending the descriptors.
pub const ADOPT_TIMEOUT_MS: u64 = 10_000;

/// Why a takeover failed.
#[derive(Debug, Error)]
pub enum TakeoverError {
    /// `shipper.control_socket` is not set: the running shipper has no control socket.
    #[error(
        "shipper.control_socket is not set: takeover needs the running shipper's control socket"
    )]
    NoSocket,
    /// Nothing answers on the control socket.
    #[error("{path}: no shipper answers on the control socket: {source}")]
    NotRunning { path: PathBuf, source: std::io::Error },
    /// The running shipper refused.
    #[error("the running shipper refused the takeover: {0}")]
    Refused(String),
    /// The answer was not a handover.
    #[error("broken handover: {0}")]
    Protocol(String),
    #[error("handover failed: {0}")]
    Io(std::io::Error),
    /// A shipper already answers on the path a normal start would bind.
    #[error("{path}: a shipper runs with this control socket; stop it, or use --takeover")]
    Running { path: PathBuf },
    #[error("{path}: cannot serve the control socket: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// What a descriptor is, besides a pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Udp,
    Tcp,
    Unix,
    Forward,
    Metrics,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Description {
    version: u32,
    pipes: Vec<PipeEntry>,
    sockets: Vec<SocketEntry>,
    /// The attached eBPF programs (absent from a process that had none, or an older one).
    #[serde(default)]
    ebpf: Option<crate::ebpf::Handing>,
}

impl Description {
    /// How many descriptors follow it; a count past the limits is refused.
    fn descriptors(&self) -> Result<usize, TakeoverError> {
        let programs = self.ebpf.as_ref().map_or(0, |e| e.programs.len());
        if programs > crate::ebpf::PROGRAMS_MAX {
            let most = crate::ebpf::PROGRAMS_MAX;
            return Err(TakeoverError::Protocol(format!(
                "{programs} eBPF programs (at most {most})"
            )));
        }
        let ebpf = self.ebpf.as_ref().map_or(0, crate::ebpf::Handing::descriptors);
        Ok(self.pipes.len() + self.sockets.len() + ebpf)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PipeEntry {
    path: PathBuf,
    carry: Vec<u8>,
    discarding: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct SocketEntry {
    kind: Kind,
    key: String,
    local: String,
}

/// Whether the stop under way is a takeover's, and which pipes (by `sources.pipe` index) the
/// next process no longer reads (a reload's self-takeover knows; an operator's takeover does
/// not): those finish their partial line as a normal stop does, so what this process read
/// of a removed FIFO is shipped, not handed to a process that closes it.
#[derive(Default)]
pub struct HandingOver {
    takeover: AtomicBool,
    removed_pipes: Mutex<Vec<usize>>,
}

impl HandingOver {
    /// Says that the coming stop is a takeover's.
    pub fn start(&self) {
        self.takeover.store(true, Ordering::Relaxed);
    }

    /// Whether the stop is a takeover's.
    pub fn is_takeover(&self) -> bool {
        self.takeover.load(Ordering::Relaxed)
    }

    /// Sets the pipes the next process's configuration no longer has.
    pub fn set_removed_pipes(&self, pipes: Vec<usize>) {
        *self.removed_pipes.lock().expect("removed pipes poisoned") = pipes;
    }

    /// Whether pipe `index` keeps its partial line for the next process at the stop.
    pub fn keeps_leftover(&self, index: usize) -> bool {
        self.is_takeover()
            && !self.removed_pipes.lock().expect("removed pipes poisoned").contains(&index)
    }
}

/// The old process's duplicates of what it opened, kept to hand over.
#[derive(Default)]
pub struct Kept {
    pipes: Vec<(PathBuf, usize, OwnedFd)>,
    sockets: Vec<(SocketEntry, OwnedFd)>,
}

impl Kept {
    /// Keeps a duplicate of the FIFO of `sources.pipe[index]` at `path`.
    pub fn pipe(&mut self, path: &Path, index: usize, fd: impl AsFd) -> std::io::Result<()> {
        let dup = fd.as_fd().try_clone_to_owned()?;
        self.pipes.push((path.to_path_buf(), index, dup));
        Ok(())
    }

    /// Keeps a duplicate of a socket of kind `kind` that the configuration names `key`.
    pub fn socket(
        &mut self,
        kind: Kind,
        key: &str,
        local: &str,
        fd: impl AsFd,
    ) -> std::io::Result<()> {
        let dup = fd.as_fd().try_clone_to_owned()?;
        let entry = SocketEntry { kind, key: key.to_string(), local: local.to_string() };
        self.sockets.push((entry, dup));
        Ok(())
    }

    /// Sends everything kept on `stream`, with the pipes' partial lines from `leftovers`
    /// (by `sources.pipe` index), and waits for ADOPTED.
    pub fn hand_over(
        self,
        mut stream: UnixStream,
        mut leftovers: Vec<(usize, Leftover)>,
    ) -> Result<(), TakeoverError> {
        let mut d = Description { version: 1, ..Default::default() };
        let mut fds = Vec::new();
        for (path, index, fd) in &self.pipes {
            let at = leftovers.iter().position(|(i, _)| i == index);
            let left = at.map(|at| leftovers.swap_remove(at).1).unwrap_or_default();
            let entry =
                PipeEntry { path: path.clone(), carry: left.carry, discarding: left.discarding };
            d.pipes.push(entry);
            fds.push(fd.as_raw_fd());
        }
        for (entry, fd) in &self.sockets {
            d.sockets.push(SocketEntry {
                kind: entry.kind,
                key: entry.key.clone(),
                local: entry.local.clone(),
            });
            fds.push(fd.as_raw_fd());
        }
        // Held until sent: the programs stay attached through the handover.
        let ebpf = crate::ebpf::hand_over();
        if let Some((handing, ebpf_fds)) = &ebpf {
            d.ebpf = Some(handing.clone());
            fds.extend(ebpf_fds.iter().map(AsRawFd::as_raw_fd));
        }
        let text = serde_json::to_vec(&d).map_err(|e| TakeoverError::Protocol(e.to_string()))?;
        let timeout = Some(Duration::from_millis(ADOPT_TIMEOUT_MS));
        stream.set_write_timeout(timeout).map_err(TakeoverError::Io)?;
        stream.set_read_timeout(timeout).map_err(TakeoverError::Io)?;
        wire::send(&mut stream, &text, &fds).map_err(TakeoverError::Io)?;
        let answer =
            wire::read_line(&mut stream, wire::ADOPTED.len()).map_err(TakeoverError::Io)?;
        if answer.as_deref() != Some(wire::ADOPTED) {
            return Err(TakeoverError::Protocol("no ADOPTED from the new process".into()));
        }
        tracing::info!(
            pipes = d.pipes.len(),
            sockets = d.sockets.len(),
            ebpf = d.ebpf.is_some(),
            "takeover: the new process holds the pipes and sockets; exiting"
        );
        Ok(())
    }
}

/// What the new process was handed, taken source by source.
#[derive(Default)]
pub struct Handover {
    pipes: Vec<(PipeEntry, Option<OwnedFd>)>,
    sockets: Vec<(SocketEntry, Option<OwnedFd>)>,
    ebpf: Option<(crate::ebpf::Handing, Vec<OwnedFd>)>,
}

impl Handover {
    /// The eBPF programs the old process had attached, with their maps' and links'
    /// descriptors (`crate::ebpf::start` adopts them).
    pub fn take_ebpf(&mut self) -> Option<(crate::ebpf::Handing, Vec<OwnedFd>)> {
        self.ebpf.take()
    }

    /// The FIFO handed for `path`, and the partial line that goes first.
    pub fn take_pipe(&mut self, path: &Path) -> Option<(std::fs::File, Leftover)> {
        let (entry, fd) = self.pipes.iter_mut().find(|(e, fd)| e.path == path && fd.is_some())?;
        let left =
            Leftover { carry: std::mem::take(&mut entry.carry), discarding: entry.discarding };
        Some((std::fs::File::from(fd.take()?), left))
    }

    /// Up to `count` sockets handed for a `kind` source the configuration names `key`, with
    /// the addresses they are bound to.
    pub fn take_sockets(&mut self, kind: Kind, key: &str, count: usize) -> Vec<(OwnedFd, String)> {
        let mut out = Vec::new();
        for (entry, fd) in &mut self.sockets {
            if out.len() < count && entry.kind == kind && entry.key == key {
                if let Some(fd) = fd.take() {
                    out.push((fd, entry.local.clone()));
                }
            }
        }
        out
    }

    /// Closes what no source took, saying so.
    pub fn close_rest(self) {
        for (e, fd) in self.pipes {
            if fd.is_some() {
                let path = e.path.display();
                tracing::warn!(%path, "takeover: a FIFO no pipe source reads any more: closed");
            }
        }
        for (e, fd) in self.sockets {
            if fd.is_some() {
                let (kind, key, local) = (e.kind, &e.key, &e.local);
                tracing::warn!(
                    ?kind,
                    key,
                    local,
                    "takeover: a socket no source uses any more: closed"
                );
            }
        }
    }
}

/// Asks the shipper serving `path` for its pipes and sockets, waiting up to `limit` for it
/// to stop and send them; calls `adopting` once they are here, then answers ADOPTED.
pub fn request(
    path: Option<&Path>,
    limit: Duration,
    adopting: impl FnOnce(),
) -> Result<Handover, TakeoverError> {
    let path = path.ok_or(TakeoverError::NoSocket)?;
    let mut stream = UnixStream::connect(path)
        .map_err(|source| TakeoverError::NotRunning { path: path.to_path_buf(), source })?;
    stream.set_read_timeout(Some(limit)).map_err(TakeoverError::Io)?;
    stream.set_write_timeout(Some(limit)).map_err(TakeoverError::Io)?;
    stream.write_all(wire::REQUEST).map_err(TakeoverError::Io)?;
    let count = |text: &[u8]| -> Result<usize, TakeoverError> {
        let d: Description = serde_json::from_slice(text)
            .map_err(|e| TakeoverError::Protocol(format!("description: {e}")))?;
        if d.version != 1 {
            return Err(TakeoverError::Protocol(format!("description version {}", d.version)));
        }
        d.descriptors()
    };
    let (text, fds) = wire::receive(&mut stream, count)?;
    let d: Description = serde_json::from_slice(&text).expect("parsed by `count`");
    adopting();
    stream.write_all(wire::ADOPTED).map_err(TakeoverError::Io)?;
    let mut fds = fds.into_iter().map(Some);
    let mut h = Handover::default();
    for e in d.pipes {
        h.pipes.push((e, fds.next().flatten()));
    }
    for e in d.sockets {
        h.sockets.push((e, fds.next().flatten()));
    }
    h.ebpf = d.ebpf.map(|e| (e, fds.flatten().collect()));
    let ebpf = h.ebpf.is_some();
    tracing::info!(pipes = h.pipes.len(), sockets = h.sockets.len(), ebpf, "takeover: handed over");
    Ok(h)
}

/// Binds the control socket at `path` (mode 0600). A socket file nobody answers on is stale
/// and replaced; one a shipper answers on is refused (unless `replacing`: the new process of
/// a takeover replaces the path the old one, now done, still has).
pub fn listen(path: &Path, replacing: bool) -> Result<UnixListener, TakeoverError> {
    let bind_err = |source| TakeoverError::Bind { path: path.to_path_buf(), source };
    if !replacing && UnixStream::connect(path).is_ok() {
        return Err(TakeoverError::Running { path: path.to_path_buf() });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => {
            let e = std::io::Error::other("exists and is not a socket");
            return Err(bind_err(e));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves the control socket on the current thread until a valid request came; returns its
/// connection (the caller hands over on it). Other peers are answered, closed and logged.
pub fn serve(listener: &UnixListener) -> Option<UnixStream> {
    let mut refused = Refusals::default();
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("control socket accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match check(&mut stream) {
            Ok(()) => return Some(stream),
            Err(why) => {
                let _ = wire::refuse(&mut stream, why);
                refused.note(why);
            }
        }
    }
    None
}

/// Whether a peer may take over: same user, the request line within the time limit.
fn check(stream: &mut UnixStream) -> Result<(), &'static str> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if peer_uid(stream) != Some(me) {
        return Err("not the shipper's user");
    }
    let limit = Some(Duration::from_millis(REQUEST_TIMEOUT_MS));
    if stream.set_read_timeout(limit).is_err() || stream.set_write_timeout(limit).is_err() {
        return Err("socket error");
    }
    match wire::read_line(stream, wire::REQUEST_BYTES_MAX) {
        Ok(Some(line)) if line == wire::REQUEST => Ok(()),
        Ok(_) => Err("not a takeover request"),
        Err(_) => Err("no request in time"),
    }
}

/// The uid of the peer of `stream` (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    peer(stream).map(|c| c.uid)
}

/// The process id of the peer of `stream` (SO_PEERCRED), as it was when it connected.
pub fn peer_pid(stream: &UnixStream) -> Option<u32> {
    peer(stream).and_then(|c| u32::try_from(c.pid).ok())
}

/// The credentials of the peer of `stream` (SO_PEERCRED).
fn peer(stream: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a ucred and `len` its size, as SO_PEERCRED wants.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred)
}

/// Peers refused, logged at most once a second with the running count.
#[derive(Default)]
struct Refusals {
    total: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, why: &str) {
        self.total += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.logged = Some(Instant::now());
            tracing::warn!(total = self.total, "control socket: peer refused: {why}");
        }
    }
}
