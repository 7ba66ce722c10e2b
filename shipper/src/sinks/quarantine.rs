//! Frames a receiver refused for good (REJECT) and no dead-letter receiver took, kept on the
//! shipper's own disk for an operator to look at, instead of being resent forever (which would
//! block every frame behind them) or lost without a trace.
//!
//! # Design constraints
//! - At most `quarantine.bytes_max / workers` bytes per worker (frame and reason files). A
//!   refused frame that does not fit, or whose files cannot be written, is dropped and counted
//!   (`shipper_lines_dropped_total{reason="rejected"}`), as when no directory is configured.
//! - Files are created, written and fdatasync'd through the worker's io_uring by a task of
//!   their own ([`write_loop`]), never on the per-record path, with `shipper.file_mode` and
//!   `shipper.dir_mode` (0640 and 0750 by default).
//! - Shares nothing with the worker but this struct: the worker queues frames with
//!   [`Quarantine::push`] and collects the written ones with [`Quarantine::take_settled`].
//!
//! # Format
//! ```text
//! DIR/wCORE/UNIXUS-SEQ.frame    the frame exactly as sent (docs/protocol.md: 32-byte header,
//!                               the 18-byte origin when flag bit 2 is set, zstd payload of
//!                               records)
//! DIR/wCORE/UNIXUS-SEQ.reason   text, one `key: value` per line: receiver, reason, records,
//!                               and `service NAME: N` per service in the frame
//! ```
//!
//! # Operation
//! 1. At start, each worker creates its folder and adds up what it already holds.
//! 2. [`Quarantine::push`] queues a refused frame if it fits (else gives it back to be dropped).
//! 3. [`write_loop`] writes the `.reason` file, then the `.frame` file, fdatasyncs both and the
//!    folder, and hands the frame back as settled (its journal checkpoint or buffer segment may
//!    move on). On a failure it removes what it wrote and hands the frame back as failed.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tokio::sync::Notify;

use super::delivery::Sealed;

/// What the quarantine counts (per worker).
#[derive(Clone, Debug, Default)]
pub struct QuarantineCounters {
    pub frames: u64,
    pub records: u64,
    /// Bytes in this worker's folder (a gauge), queued frames included.
    pub bytes: u64,
    pub write_errors: u64,
}

/// A refused frame waiting to be written.
struct Pending {
    frame: Rc<Sealed>,
    /// The `.reason` file's text.
    reason: String,
}

impl Pending {
    /// What it takes in the quarantine: its two files.
    fn bytes(&self) -> u64 {
        (self.frame.wire.len() + self.reason.len()) as u64
    }
}

pub struct Quarantine {
    dir: PathBuf,
    modes: crate::os::Modes,
    bytes_max: u64,
    queue: VecDeque<Pending>,
    /// A frame is being written.
    pub writing: bool,
    /// Written frames, and frames that could not be written, for the worker to settle.
    settled: Vec<Rc<Sealed>>,
    failed: Vec<Rc<Sealed>>,
    pub counters: QuarantineCounters,
    wake: Rc<Notify>,
}

impl Quarantine {
    /// Opens worker `core`'s folder under `root`, creating it, and counts what it holds.
    /// Runs once at start.
    pub fn open(
        root: &Path,
        worker: usize,
        bytes_max: u64,
        modes: crate::os::Modes,
    ) -> io::Result<Quarantine> {
        let dir = root.join(format!("w{worker}"));
        modes.create_dir_all(&dir)?;
        let mut bytes = 0;
        for entry in std::fs::read_dir(&dir)? {
            bytes += entry?.metadata()?.len();
        }
        Ok(Quarantine {
            dir,
            modes,
            bytes_max,
            queue: VecDeque::new(),
            writing: false,
            settled: Vec::new(),
            failed: Vec::new(),
            counters: QuarantineCounters { bytes, ..Default::default() },
            wake: Rc::new(Notify::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues a refused frame with the text of its `.reason` file; gives the frame back when
    /// the quarantine has no room for it.
    pub fn push(&mut self, frame: Rc<Sealed>, reason: String) -> Result<(), Rc<Sealed>> {
        let pending = Pending { frame, reason };
        if self.counters.bytes + pending.bytes() > self.bytes_max {
            return Err(pending.frame);
        }
        self.counters.bytes += pending.bytes();
        self.queue.push_back(pending);
        self.wake.notify_one();
        Ok(())
    }

    /// Frames still to be written (or being written).
    pub fn busy(&self) -> bool {
        self.writing || !self.queue.is_empty()
    }

    /// Frames queued but not written yet, for counting at a shutdown deadline.
    pub fn take_queued(&mut self) -> Vec<Rc<Sealed>> {
        let queued: Vec<Pending> = self.queue.drain(..).collect();
        for p in &queued {
            self.counters.bytes -= p.bytes();
        }
        queued.into_iter().map(|p| p.frame).collect()
    }

    /// The frames written since the last call, and those that could not be.
    pub fn take_settled(&mut self) -> (Vec<Rc<Sealed>>, Vec<Rc<Sealed>>) {
        (std::mem::take(&mut self.settled), std::mem::take(&mut self.failed))
    }

    /// The file names of a frame: `UNIXUS-SEQ`, sortable by time.
    fn stem(&self, frame: &Sealed) -> PathBuf {
        let now = crate::clock::unix_us();
        self.dir.join(format!("{now:016}-{:012}", frame.seq))
    }

    fn finish(&mut self, p: Pending, result: io::Result<()>, stem: &Path) {
        self.writing = false;
        match result {
            Ok(()) => {
                self.counters.frames += 1;
                self.counters.records += u64::from(p.frame.records);
                self.settled.push(p.frame);
            }
            Err(e) => {
                self.counters.write_errors += 1;
                self.counters.bytes -= p.bytes();
                let n = self.counters.write_errors;
                if n.is_power_of_two() {
                    tracing::error!(path = %stem.display(), records = p.frame.records, "quarantine: cannot keep a refused frame: {e}; it is dropped (reason rejected; write errors so far: {n})");
                }
                self.failed.push(p.frame);
            }
        }
    }
}

/// Writes queued frames, one at a time, for the life of the worker.
pub async fn write_loop(q: Rc<RefCell<Quarantine>>) {
    let wake = q.borrow().wake.clone();
    loop {
        let next = {
            let mut q = q.borrow_mut();
            let next = q.queue.pop_front();
            q.writing = next.is_some();
            next.map(|p| (q.stem(&p.frame), q.dir.clone(), q.modes.file, p))
        };
        let Some((stem, dir, mode, p)) = next else {
            wake.notified().await;
            continue;
        };
        let frame_path = stem.with_extension("frame");
        let reason_path = stem.with_extension("reason");
        let mut result = write_file(&reason_path, p.reason.clone().into_bytes(), mode).await;
        if result.is_ok() {
            result = write_file(&frame_path, p.frame.wire.clone(), mode).await;
        }
        if result.is_ok() {
            result = sync_dir(&dir).await;
        }
        if result.is_err() {
            for path in [&frame_path, &reason_path] {
                let _ = tokio_uring::fs::remove_file(path).await;
            }
        }
        q.borrow_mut().finish(p, result, &stem);
    }
}

/// Creates `path` (it must not exist), writes `data` and fdatasyncs it, through io_uring.
async fn write_file(path: &Path, data: Vec<u8>, mode: u32) -> io::Result<()> {
    let file = tokio_uring::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .await?;
    let (res, _) = file.write_all_at(data, 0).await;
    let res = match res {
        Ok(()) => file.sync_data().await,
        Err(e) => Err(e),
    };
    let closed = file.close().await;
    res.and(closed)
}

/// fsyncs directory `dir`, so the names of the files just written survive a crash.
async fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = tokio_uring::fs::File::open(dir).await?;
    let res = d.sync_all().await;
    let closed = d.close().await;
    res.and(closed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn frame(seq: u64, bytes: usize) -> Rc<Sealed> {
        Rc::new(Sealed::for_test(seq, bytes, 3, 7))
    }

    #[test]
    fn keeps_frames_within_its_bound_and_writes_them_with_their_reason() {
        let root = tempfile::tempdir().unwrap();
        let modes = crate::os::Modes { file: 0o600, dir: 0o700 };
        let q = Rc::new(RefCell::new(Quarantine::open(root.path(), 1, 1000, modes).unwrap()));
        let dir = q.borrow().dir().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(q.borrow_mut().push(frame(1, 600), "reason: one\n".into()).is_ok());
        let refused = q.borrow_mut().push(frame(2, 600), "reason: two\n".into());
        assert_eq!(refused.unwrap_err().seq, 2, "over bytes_max: given back to be dropped");
        tokio_uring::start(async {
            let task = tokio_uring::spawn(write_loop(q.clone()));
            // A sleep, not a yield: the ring's completions are reaped when the runtime parks.
            while q.borrow().busy() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            task.abort();
        });
        let (settled, failed) = q.borrow_mut().take_settled();
        assert_eq!((settled.len(), failed.len()), (1, 0));
        assert_eq!((q.borrow().counters.frames, q.borrow().counters.records), (1, 3));
        let mut names: Vec<PathBuf> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        assert_eq!(names.len(), 2);
        assert!(names[0].to_string_lossy().ends_with("-000000000001.frame"));
        assert_eq!(std::fs::read(&names[0]).unwrap(), vec![7; 600]);
        assert_eq!(std::fs::read_to_string(&names[1]).unwrap(), "reason: one\n");
        for n in &names {
            let mode = std::fs::metadata(n).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", n.display());
        }
        // A new run counts what is there toward the bound.
        let again = Quarantine::open(root.path(), 1, 1000, modes).unwrap();
        assert_eq!(again.counters.bytes, 612);
    }
}
