//! Named-pipe source: the FIFO applications write their JSON lines into.
//!
//! # Design constraints
//! - A writer must never block because of the shipper: the FIFO exists before writers come
//!   (created here with the configured mode), always has a reader (so `open(O_WRONLY)` never
//!   blocks), and is drained continuously into a buffer of `pipe_bytes` (F_SETPIPE_SZ).
//! - Memory per pipe: one read buffer of `read_bytes` plus a carry of `line_bytes_max`.
//!
//! # Operation
//! The FIFO is created if missing, then opened `O_NOFOLLOW` and checked to be a FIFO on the
//! descriptor, and a new FIFO's mode is set on the descriptor (`fchmod`): a symbolic link
//! planted at the path, or swapped in after the check, is refused and never followed (the
//! shipper often runs as root). It is opened `O_RDWR`: the shipper itself counts as a writer,
//! so the reader never sees EOF when the last application closes it, and as a reader, so
//! writers' opens succeed at once. The worker waits for the FIFO to be readable on its reactor
//! (epoll, beside its io_uring) and reads with a non-blocking `read(2)`: nothing is in flight
//! when the source stops, so a takeover can hand the FIFO and the partial line held
//! ([`Leftover`]) to the next process, which goes on from them (`super::read_until_stopped`
//! says why an io_uring read cannot stop that way).

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use thiserror::Error;
use tokio::sync::watch;

pub use super::lines::Leftover;
use super::lines::LineSplitter;
use super::{Intake, Record, SourceId};
use crate::transforms::parse::Failure;

/// Why a pipe source could not be opened.
#[derive(Debug, Error)]
pub enum PipeError {
    #[error("{path}: exists and is not a FIFO")]
    NotFifo { path: PathBuf },
    #[error("{path}: is a symbolic link; a FIFO path is never followed (create the FIFO there, or point the source at the link's target)")]
    Symlink { path: PathBuf },
    #[error("{path}: cannot create FIFO: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path}: cannot open FIFO: {source}")]
    Open { path: PathBuf, source: io::Error },
}

/// An open FIFO and the buffer size the kernel granted.
pub struct OpenPipe {
    pub file: std::fs::File,
    pub pipe_bytes: usize,
}

/// Creates the FIFO at `path` with `mode` if it is missing, opens it read-write and raises its
/// buffer towards `pipe_bytes` (the kernel may grant less: `/proc/sys/fs/pipe-max-size` caps
/// unprivileged processes; what was granted is returned and logged by the caller).
pub fn open(path: &Path, mode: u32, pipe_bytes: usize) -> Result<OpenPipe, PipeError> {
    let err_path = || path.to_path_buf();
    let mut created = false;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => {}
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(PipeError::Symlink { path: err_path() })
        }
        Ok(_) => return Err(PipeError::NotFifo { path: err_path() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|e| PipeError::Create { path: err_path(), source: e.into() })?;
            // SAFETY: a valid NUL-terminated path. mkfifo never follows a link at `path`.
            if unsafe { libc::mkfifo(c.as_ptr(), mode) } != 0 {
                let source = io::Error::last_os_error();
                if source.kind() != io::ErrorKind::AlreadyExists {
                    return Err(PipeError::Create { path: err_path(), source });
                }
            }
            created = true;
        }
        Err(source) => return Err(PipeError::Open { path: err_path(), source }),
    }
    // O_NOFOLLOW: a link swapped in since the check is refused (ELOOP), never followed.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => PipeError::Symlink { path: err_path() },
            _ => PipeError::Open { path: err_path(), source },
        })?;
    let meta = file.metadata().map_err(|source| PipeError::Open { path: err_path(), source })?;
    if !meta.file_type().is_fifo() {
        return Err(PipeError::NotFifo { path: err_path() });
    }
    if created {
        // mkfifo applies the umask; set exactly the configured bits, on the descriptor.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|source| PipeError::Create { path: err_path(), source })?;
    }
    Ok(raise(file, pipe_bytes))
}

/// Takes a FIFO `file` another process opened for `path` (a takeover): checks that it is a
/// FIFO and raises its buffer towards `pipe_bytes` as [`open`] does.
pub fn adopt(path: &Path, file: std::fs::File, pipe_bytes: usize) -> Result<OpenPipe, PipeError> {
    let err_path = || path.to_path_buf();
    let meta = file.metadata().map_err(|source| PipeError::Open { path: err_path(), source })?;
    if !meta.file_type().is_fifo() {
        return Err(PipeError::NotFifo { path: err_path() });
    }
    Ok(raise(file, pipe_bytes))
}

/// Raises the FIFO's buffer towards `pipe_bytes`; what the kernel granted is returned.
fn raise(file: std::fs::File, pipe_bytes: usize) -> OpenPipe {
    let fd = file.as_raw_fd();
    let want = libc::c_int::try_from(pipe_bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a descriptor we own; failure (EPERM above pipe-max-size) leaves the
    // buffer as it was, which F_GETPIPE_SZ then reports.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, want) };
    let granted = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    OpenPipe { file, pipe_bytes: usize::try_from(granted).unwrap_or(0) }
}

/// Counters of one pipe source.
#[derive(Clone, Debug, Default)]
pub struct SourceCounters {
    pub source: String,
    pub lines_read: u64,
    pub bytes_read: u64,
    pub lines_truncated: u64,
    /// Keys (service, cfjs1 `format`) cut to the protocol's 255 bytes.
    pub keys_truncated: u64,
    pub lines_empty: u64,
    /// A pipe's partial line (no newline yet), handed over as it was when the source stopped
    /// (a file source counts its own in `FileCounters::lines_partial`).
    pub lines_partial: u64,
    pub parse_failures: [u64; Failure::ALL.len()],
    pub read_errors: u64,
}

/// A pipe's reading limits (`sources.pipe`).
#[derive(Clone, Copy, Debug)]
pub struct PipeLimits {
    /// Bytes asked of each read.
    pub read_bytes: usize,
    /// Longest line kept whole; longer ones are cut and counted.
    pub line_bytes_max: usize,
}

/// What a takeover means to a pipe source: the partial line the process this one took over
/// left, and whether this process's stop is a takeover's.
pub struct Handover<F: Fn() -> bool> {
    pub left: Leftover,
    pub handing_over: F,
}

/// Reads the FIFO `file` of source `id` until `stop`, handing each line to `intake`, starting
/// with the partial line `handover.left`. At the stop, the partial line held (bytes read
/// without their newline yet) is returned for the next process when `handover.handing_over()`
/// says a takeover stops this one (what the FIFO still holds is the next process's too); else
/// what the FIFO holds is read ([`super::drain`]) and the partial line then held is handed over
/// as a line of its own and counted in `lines_partial`.
pub async fn run<I: Intake>(
    intake: Rc<RefCell<I>>,
    id: SourceId,
    file: std::fs::File,
    limits: PipeLimits,
    counters: Rc<RefCell<SourceCounters>>,
    stop: watch::Receiver<bool>,
    handover: Handover<impl Fn() -> bool>,
) -> Leftover {
    let mut splitter = LineSplitter::resume(limits.line_bytes_max, handover.left);
    intake.borrow_mut().flushes_at_stop();
    let mut on_read = |bytes: &[u8]| {
        let mut intake = intake.borrow_mut();
        let mut sc = counters.borrow_mut();
        let now = intake.now_ns();
        splitter.split(bytes, |line| hand_over(&mut *intake, id, &mut sc, line, now));
        if bytes.len() < limits.read_bytes {
            intake.drained();
        }
    };
    let on_error = |e: &std::io::Error| {
        let mut sc = counters.borrow_mut();
        sc.read_errors += 1;
        tracing::error!(path = %sc.source, "pipe read failed: {e}; retrying in 100 ms");
    };
    // Kept to drain the FIFO at a stop that is not a takeover's (`read_until_stopped` closes
    // its own descriptor).
    let last_look = file.try_clone();
    super::read_until_stopped(file, limits.read_bytes, stop, &mut on_read, on_error).await;
    let handing_over = (handover.handing_over)();
    if !handing_over {
        let drained = last_look.as_ref().map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
        if let Err(e) = drained.and_then(|f| super::drain(f, limits.read_bytes, &mut on_read)) {
            let mut sc = counters.borrow_mut();
            sc.read_errors += 1;
            tracing::error!(path = %sc.source, "pipe: reading what the FIFO held at the stop failed: {e}; those bytes are lost");
        }
    }
    drop((on_read, last_look));
    let mut intake = intake.borrow_mut();
    let left = if handing_over {
        splitter.leftover()
    } else {
        let mut sc = counters.borrow_mut();
        let now = intake.now_ns();
        splitter.flush(|line| {
            sc.lines_partial += 1;
            hand_over(&mut *intake, id, &mut sc, line, now);
            sc.bytes_read -= 1; // counted with a newline it never had
        });
        Leftover::default()
    };
    intake.flushed();
    left
}

/// Counts `line` and hands it to `intake` (an empty line is only counted).
fn hand_over<I: Intake>(
    intake: &mut I,
    id: SourceId,
    sc: &mut SourceCounters,
    line: super::lines::Line<'_>,
    now: u64,
) {
    sc.lines_read += 1;
    sc.bytes_read += line.bytes.len() as u64 + 1;
    sc.lines_truncated += u64::from(line.truncated);
    if line.bytes.is_empty() {
        sc.lines_empty += 1;
        return;
    }
    let outcome = intake.record(id, Record::bare(line.bytes), now);
    sc.keys_truncated += u64::from(outcome.keys_cut);
    if let Some(f) = outcome.failure {
        sc.parse_failures[f as usize] += 1;
    }
}
