//! What durable sources share to keep their positions: the in-order settling of frames'
//! marks ([`Settling`]) and the process's writer of position files ([`submit`], [`write`]),
//! used by the journal checkpoint and the file source's positions.
//!
//! # Design constraints
//! - Nothing here blocks a worker: a worker only queues the newest contents of a file
//!   ([`submit`]); one thread per process writes them. Its queue holds one entry per path,
//!   so it is bounded by the number of durable sources.
//! - A file is replaced whole, through `PATH.tmp` and a rename, so a crash leaves the old or
//!   the new contents, never a torn file.
//!
//! # Operation
//! Frames holding a source's records register `(seq, mark)` in order; acknowledgements may
//! arrive out of order (several connections), so a position moves only over the settled
//! prefix. At shutdown a source's `sync` calls [`settle`] (drops the queued contents of its
//! path and waits for a write of it in progress), then writes and fsyncs the newest itself.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Frames holding a source's marks, in sequence order, each with whether it is settled.
#[derive(Debug)]
pub struct Settling<T> {
    pending: VecDeque<(u64, T, bool)>,
}

impl<T> Default for Settling<T> {
    fn default() -> Self {
        Settling { pending: VecDeque::new() }
    }
}

impl<T> Settling<T> {
    /// Frame `seq` holds records up to `mark`.
    pub fn sealed(&mut self, seq: u64, mark: T) {
        debug_assert!(self.pending.back().is_none_or(|b| b.0 < seq), "frames register in order");
        self.pending.push_back((seq, mark, false));
    }

    /// Frame `seq` is settled: hands `each` the marks of the settled prefix, oldest first;
    /// returns whether there were any.
    pub fn settled(&mut self, seq: u64, mut each: impl FnMut(T)) -> bool {
        let Some(slot) = self.pending.iter_mut().find(|p| p.0 == seq) else { return false };
        slot.2 = true;
        let mut advanced = false;
        while self.pending.front().is_some_and(|p| p.2) {
            let (_, mark, _) = self.pending.pop_front().expect("checked above");
            each(mark);
            advanced = true;
        }
        advanced
    }

    /// Frames registered and not yet settled in order.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Writes `contents` to `path` through `PATH.tmp` (created with `mode`) and a rename
/// (fsynced when `sync`).
pub fn write(path: &Path, contents: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Queues `contents` for `path` on the writer thread, replacing older contents not written
/// yet; a failed write is logged and counted in `errors`.
pub fn submit(path: &Path, contents: Vec<u8>, mode: u32, errors: &Arc<AtomicU64>) {
    writer().submit(path, contents, mode, errors);
}

/// Drops the contents queued for `path` and waits for a write of it in progress.
pub fn settle(path: &Path) {
    writer().settle(path);
}

/// The writer thread's state: the newest contents per path not written yet, and the path
/// being written.
#[derive(Default)]
struct Queue {
    latest: HashMap<PathBuf, (Vec<u8>, u32, Arc<AtomicU64>)>,
    writing: Option<PathBuf>,
}

/// Writes position files for every worker, off their threads.
struct Writer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

/// The process's writer, started on first use.
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
    fn submit(&self, path: &Path, contents: Vec<u8>, mode: u32, errors: &Arc<AtomicU64>) {
        let mut q = self.queue.lock().expect("checkpoint queue poisoned");
        q.latest.insert(path.to_path_buf(), (contents, mode, errors.clone()));
        self.changed.notify_all();
    }

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
            let (contents, mode, errors) = q.latest.remove(&path).expect("listed above");
            q.writing = Some(path.clone());
            drop(q);
            if let Err(e) = write(&path, &contents, mode, false) {
                let n = errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(path = %path.display(), "position file not written: {e} (failures so far: {n})");
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
    fn settles_the_prefix_only_oldest_first() {
        let mut s = Settling::default();
        for (seq, m) in [(3, "a"), (5, "b"), (6, "c")] {
            s.sealed(seq, m);
        }
        let mut got = Vec::new();
        assert!(!s.settled(5, |m| got.push(m)), "frame 3 is still outstanding");
        assert!(s.settled(3, |m| got.push(m)));
        assert_eq!(got, ["a", "b"]);
        assert!(!s.settled(9, |m| got.push(m)), "an unknown frame changes nothing");
        assert!(s.settled(6, |m| got.push(m)));
        assert_eq!((got, s.len()), (vec!["a", "b", "c"], 0));
    }
}
