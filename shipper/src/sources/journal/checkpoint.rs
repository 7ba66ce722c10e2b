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

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    path: Option<PathBuf>,
    /// Frames holding this source's entries, in sequence order: (seq, cursor, acknowledged).
    pending: VecDeque<(u64, String, bool)>,
    /// The cursor last written.
    pub cursor: Option<String>,
    /// Writes that failed (the checkpoint lags; data is not lost, it may repeat on restart).
    pub write_errors: u64,
}

impl Checkpoint {
    /// Opens the checkpoint at `path` (none: nothing is persisted); returns it with the saved
    /// cursor, if any.
    pub fn open(path: Option<&Path>) -> io::Result<Checkpoint> {
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
            pending: VecDeque::new(),
            cursor,
            write_errors: 0,
        })
    }

    /// Frame `seq` holds entries up to `cursor`.
    pub fn sealed(&mut self, seq: u64, cursor: String) {
        debug_assert!(self.pending.back().is_none_or(|b| b.0 < seq), "frames register in order");
        self.pending.push_back((seq, cursor, false));
    }

    /// Frame `seq` was acknowledged; advances and writes the checkpoint if it can.
    pub fn acked(&mut self, seq: u64) {
        let Some(slot) = self.pending.iter_mut().find(|p| p.0 == seq) else { return };
        slot.2 = true;
        let mut advanced = None;
        while self.pending.front().is_some_and(|p| p.2) {
            advanced = self.pending.pop_front().map(|p| p.1);
        }
        if let Some(c) = advanced {
            if let Err(e) = self.write(&c, false) {
                self.write_errors += 1;
                tracing::error!("journal checkpoint not written: {e}");
            }
            self.cursor = Some(c);
        }
    }

    /// Frames registered and not yet acknowledged in order.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes `cursor` (and fsyncs it when `sync`, as at shutdown).
    fn write(&self, cursor: &str, sync: bool) -> io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(cursor.as_bytes())?;
        f.write_all(b"\n")?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }

    /// Makes the last written cursor durable (shutdown).
    pub fn sync(&self) -> io::Result<()> {
        match &self.cursor {
            Some(c) => self.write(c, true),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_over_the_acknowledged_prefix_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let mut c = Checkpoint::open(Some(&path)).unwrap();
        assert_eq!(c.cursor, None);
        for (seq, cur) in [(3, "a"), (5, "b"), (6, "c")] {
            c.sealed(seq, cur.into());
        }
        c.acked(5);
        assert_eq!(c.cursor, None, "frame 3 is still outstanding");
        c.acked(3);
        assert_eq!(c.cursor.as_deref(), Some("b"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\n");
        c.acked(9);
        c.acked(6);
        assert_eq!((c.cursor.as_deref(), c.pending()), (Some("c"), 0));
        assert_eq!(Checkpoint::open(Some(&path)).unwrap().cursor.as_deref(), Some("c"));
    }
}
