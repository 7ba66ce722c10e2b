//! Cutting a segment back to its last whole record after a failed write, off the worker's
//! thread: tokio-uring 0.5 has no ftruncate (io_uring gained `IORING_OP_FTRUNCATE` only in
//! Linux 6.9), and `ftruncate(2)` can wait on the disk.
//!
//! # Design constraints
//! - One helper thread per worker with a disk buffer, started with the writer task, ending
//!   when the writer is dropped.
//! - Its queue holds at most [`QUEUE_MAX`] cut: the worker's only writer waits for each cut
//!   before its next write (which goes to the same offset), so a second one is never queued;
//!   were the queue full, the cut fails with an error instead of blocking the worker.
//!
//! # Operation
//! The writer hands over a duplicate of the segment's descriptor (not its path, which could
//! name another file by then) and the length to keep; the helper calls `ftruncate` and sends
//! the outcome back through a oneshot channel the writer awaits on its io_uring loop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use tokio::sync::oneshot;

/// Cuts waiting for the helper thread.
pub const QUEUE_MAX: usize = 1;

struct Job {
    file: OwnedFd,
    len: u64,
    done: oneshot::Sender<io::Result<()>>,
}

/// The writer's handle on its helper thread.
pub struct Cutter {
    jobs: SyncSender<Job>,
}

impl Cutter {
    /// Starts the helper thread of worker `core`.
    pub fn start(core: usize) -> io::Result<Cutter> {
        let (jobs, queue) = sync_channel::<Job>(QUEUE_MAX);
        std::thread::Builder::new()
            .name(format!("shipper-cut-{core}"))
            .stack_size(64 << 10)
            .spawn(move || {
                for job in queue {
                    let file = std::fs::File::from(job.file);
                    let _ = job.done.send(file.set_len(job.len));
                }
            })?;
        Ok(Cutter { jobs })
    }

    /// Cuts the file open as `file` to `len` bytes.
    pub async fn cut(&self, file: &impl AsRawFd, len: u64) -> io::Result<()> {
        // SAFETY: `file` is open for the duration of this call; the duplicate is owned.
        let fd = unsafe { BorrowedFd::borrow_raw(file.as_raw_fd()) }.try_clone_to_owned()?;
        let (done, outcome) = oneshot::channel();
        self.jobs.try_send(Job { file: fd, len, done }).map_err(|e| match e {
            TrySendError::Full(_) => io::Error::other("the cutting thread's queue is full"),
            TrySendError::Disconnected(_) => io::Error::other("the cutting thread has ended"),
        })?;
        outcome.await.map_err(|_| io::Error::other("the cutting thread has ended"))?
    }
}
