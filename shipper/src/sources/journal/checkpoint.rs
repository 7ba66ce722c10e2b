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
//! cursor goes to one writer thread per process ([`Writer`]), which keeps only the latest
//! cursor per checkpoint path (so its queue is bounded by the number of journal sources) and
//! writes them in turn. At shutdown [`Checkpoint::sync`] drops the queued cursor of its path,
//! waits for a write of that path in progress, and writes and fsyncs the newest one itself.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

pub struct Checkpoint {
    path: Option<PathBuf>,
    /// Mode of the checkpoint file (`shipper.file_mode`).
    mode: u32,
    /// Frames holding this source's entries, in sequence order: (seq, cursor, acknowledged).
    pending: VecDeque<(u64, String, bool)>,
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
            pending: VecDeque::new(),
            cursor,
            errors: Arc::new(AtomicU64::new(0)),
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
            if let Some(path) = &self.path {
                writer().submit(path, &c, self.mode, &self.errors);
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
                writer().settle(path);
                write(path, c, self.mode, true)
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

/// Writes `cursor` to `path` through `PATH.tmp` (created with `mode`) and a rename (fsynced
/// when `sync`).
fn write(path: &Path, cursor: &str, mode: u32, sync: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(cursor.as_bytes())?;
    f.write_all(b"\n")?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The checkpoint writer thread's state: the newest cursor per path not written yet, and the
/// path being written.
#[derive(Default)]
struct Queue {
    latest: HashMap<PathBuf, (String, u32, Arc<AtomicU64>)>,
    writing: Option<PathBuf>,
}

/// Writes checkpoints for every worker, off their threads.
struct Writer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

/// The process's checkpoint writer, started on first use.
fn writer() -> &'static Writer {
    static WRITER: OnceLock<&'static Writer> = OnceLock::new();
    WRITER.get_or_init(|| {
        let w: &'static Writer =
            Box::leak(Box::new(Writer { queue: Mutex::default(), changed: Condvar::new() }));
        std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || w.run())
            .expect("cannot start the checkpoint writer thread");
        w
    })
}

impl Writer {
    /// Queues `cursor` for `path`, replacing an older one not written yet.
    fn submit(&self, path: &Path, cursor: &str, mode: u32, errors: &Arc<AtomicU64>) {
        let mut q = self.queue.lock().expect("checkpoint queue poisoned");
        q.latest.insert(path.to_path_buf(), (cursor.to_string(), mode, errors.clone()));
        self.changed.notify_all();
    }

    /// Drops the cursor queued for `path` and waits for a write of it in progress.
    fn settle(&self, path: &Path) {
        let mut q = self.queue.lock().expect("checkpoint queue poisoned");
        q.latest.remove(path);
        while q.writing.as_deref() == Some(path) {
            q = self.changed.wait(q).expect("checkpoint queue poisoned");
        }
    }

    fn run(&self) {
        let mut q = self.queue.lock().expect("checkpoint queue poisoned");
        loop {
            let Some(path) = q.latest.keys().next().cloned() else {
                q = self.changed.wait(q).expect("checkpoint queue poisoned");
                continue;
            };
            let (cursor, mode, errors) = q.latest.remove(&path).expect("listed above");
            q.writing = Some(path.clone());
            drop(q);
            if let Err(e) = write(&path, &cursor, mode, false) {
                let n = errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(path = %path.display(), "journal checkpoint not written: {e} (failures so far: {n})");
                }
            }
            q = self.queue.lock().expect("checkpoint queue poisoned");
            q.writing = None;
            self.changed.notify_all();
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
