//! The journal cursor checkpoint: the cursor of the last entry whose frame, and every frame
//! before it, a receiver acknowledged.
//!
//! # Format
//! One line: the cursor, as journalctl prints it. Written to `PATH.tmp`, then renamed over
//! `PATH`, so a crash leaves the old or the new cursor, never a torn one.
//!
//! # Operation
//! Each sealed frame holding entries of the source registers `(seq, cursor of its last entry)`;
//! acknowledgements may arrive out of order (several connections), so the checkpoint advances
//! only over the acknowledged prefix of that list, and is written each time it advances.
//!
//! The file is not written on the worker's thread (create, write and rename block): the new
//! cursor goes to the process's writer thread (`sources::persist`, shared with the file
//! source's positions), which keeps only the latest cursor per path. At shutdown
//! [`Checkpoint::sync`] waits for a write of its path in progress, and writes and fsyncs the
//! newest cursor itself.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sources::persist::{self, Settling};

pub struct Checkpoint {
    path: Option<PathBuf>,
    /// Mode of the checkpoint file (`shipper.file_mode`).
    mode: u32,
    /// Frames holding this source's entries, in sequence order, with their last cursors.
    pending: Settling<String>,
    /// The cursor last handed to the writer.
    pub cursor: Option<String>,
    /// Writes that failed (the checkpoint lags; data is not lost, it may repeat on restart).
    errors: Arc<AtomicU64>,
}

impl Checkpoint {
    /// Opens the checkpoint at `path` (none: nothing is persisted); returns it with the saved
    /// cursor, if any.
    pub fn open(path: Option<&Path>, mode: u32) -> io::Result<Checkpoint> {
        let cursor = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
            },
            None => None,
        };
        Ok(Checkpoint {
            path: path.map(Path::to_path_buf),
            mode,
            pending: Settling::default(),
            cursor,
            errors: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Frame `seq` holds entries up to `cursor`.
    pub fn sealed(&mut self, seq: u64, cursor: String) {
        self.pending.sealed(seq, cursor);
    }

    /// Frame `seq` was acknowledged; advances and writes the checkpoint if it can.
    pub fn acked(&mut self, seq: u64) {
        let mut advanced = None;
        self.pending.settled(seq, |c| advanced = Some(c));
        if let Some(c) = advanced {
            if let Some(path) = &self.path {
                persist::submit(path, format!("{c}\n").into_bytes(), self.mode, &self.errors);
            }
            self.cursor = Some(c);
        }
    }

    /// Checkpoint writes that failed so far.
    pub fn write_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Frames registered and not yet acknowledged in order.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Makes the newest cursor durable (shutdown; blocks until written).
    pub fn sync(&self) -> io::Result<()> {
        match (&self.path, &self.cursor) {
            (Some(path), Some(c)) => {
                persist::settle(path);
                persist::write(path, format!("{c}\n").as_bytes(), self.mode, true)
            }
            _ => Ok(()),
        }
    }
}

impl crate::sources::Marks for Checkpoint {
    fn sealed(&mut self, seq: u64, mark: String) {
        Checkpoint::sealed(self, seq, mark);
    }

    fn settled(&mut self, seq: u64) {
        self.acked(seq);
    }

    fn sync(&self) -> io::Result<()> {
        Checkpoint::sync(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_over_the_acknowledged_prefix_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let mut c = Checkpoint::open(Some(&path), 0o640).unwrap();
        assert_eq!(c.cursor, None);
        for (seq, cur) in [(3, "a"), (5, "b"), (6, "c")] {
            c.sealed(seq, cur.into());
        }
        c.acked(5);
        assert_eq!(c.cursor, None, "frame 3 is still outstanding");
        c.acked(3);
        assert_eq!(c.cursor.as_deref(), Some("b"));
        c.acked(9);
        c.acked(6);
        assert_eq!((c.cursor.as_deref(), c.pending()), (Some("c"), 0));
        // Written by the writer thread; sync waits for it and writes the newest itself.
        c.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "c\n");
        assert_eq!(Checkpoint::open(Some(&path), 0o640).unwrap().cursor.as_deref(), Some("c"));
        assert_eq!(c.write_errors(), 0);
    }

    #[test]
    fn a_failed_write_is_counted_and_the_worker_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir/cp");
        let mut c = Checkpoint::open(Some(&path), 0o640).unwrap();
        c.sealed(1, "a".into());
        c.acked(1);
        assert_eq!(c.cursor.as_deref(), Some("a"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while c.write_errors() == 0 {
            assert!(std::time::Instant::now() < deadline, "the failed write was not counted");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(c.write_errors(), 1);
        assert!(c.sync().is_err());
    }
}
