//! The journal source in a worker: follows a directory (or files) of journal files and feeds
//! their entries, as JSON records, into the worker's pipeline.
//!
//! # Design constraints
//! - Follow by polling every `poll_interval_ms`: each open file's header (one `pread`) says
//!   whether entries were added; the directory listing says whether a file appeared. journald
//!   writes through mmap, which inotify does not report reliably, and a poll bounds the work
//!   whatever the write rate. Files are told apart by the 128-bit file id in their header, so
//!   a file archived under a new name (rotation) is not opened twice, an archived file read to
//!   its end is never opened again, and one deleted while open (vacuum) is read to its end
//!   through the descriptor held.
//! - Durable: the source reads only while the outbox has room for two full batches, so its
//!   entries are never dropped for lack of room; it pauses, and its data waits on disk.
//! - Every read of a file's objects and header goes through the worker's io_uring (a
//!   duplicate descriptor per open file), so a slow disk makes this source wait, not the
//!   worker's other sources. Opening a file (and a `stat` when a read meets the end of the
//!   file) are the only synchronous calls.
//!
//! # Operation
//! Start after the checkpoint's cursor (or at `since`); read up to [`ROUND`] entries, loading
//! what the decoder asks for, then update the lag gauges and yield to the worker's other
//! tasks; at the end of every file, refresh headers, look for new files, close archived files
//! read to their end, and sleep one poll.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::watch;

use super::checkpoint::Checkpoint;
use super::cursor::Cursor;
use super::file::{JournalFile, Load, HEADER_READ_BYTES, STATE_ARCHIVED};
use super::merge::Merge;
use super::{files, json, JournalCounters, JournalReader};
use crate::config::shipper::{JournalSource, Since};
use crate::sources::{Intake, Record, SourceId};

/// Entries read before yielding to the worker's other tasks.
pub const ROUND: usize = 512;

struct Follow {
    cfg: Rc<JournalSource>,
    merge: Merge,
    /// The files open, by file id, with an io_uring handle on each.
    open: HashMap<[u8; 16], tokio_uring::fs::File>,
    /// File ids of archived files read to their end (pruned when they leave the directory).
    done: HashSet<[u8; 16]>,
    /// File ids of the files seen (open or done), by identity on disk, so that a poll does not
    /// open every file again to read its id.
    known: HashMap<Identity, [u8; 16]>,
    /// Corrupt objects counted in files since closed.
    closed_corrupt: u64,
}

/// A file on disk: device, inode and birth time (an inode number is reused once a deleted
/// file is gone, its birth time is not).
type Identity = (u64, u64, std::time::SystemTime);

fn identity(path: &std::path::Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.created().ok()?))
}

impl Follow {
    fn paths(&self) -> Vec<PathBuf> {
        if !self.cfg.files.is_empty() {
            return self.cfg.files.clone();
        }
        let dir = self.cfg.directory_or_default();
        files(&dir).unwrap_or_else(|e| {
            tracing::warn!(dir = %dir.display(), "cannot list journal directory: {e}");
            Vec::new()
        })
    }

    /// Opens files not open yet (skipping what they hold if `skip_existing`); returns how
    /// many were added.
    async fn scan(&mut self, skip_existing: bool) -> usize {
        let mut added = 0;
        let mut present = HashSet::new();
        for p in self.paths() {
            let on_disk = identity(&p);
            if let Some(id) = on_disk.and_then(|k| self.known.get(&k)) {
                present.insert(*id);
                continue;
            }
            let f = match JournalFile::open(&p) {
                Ok(f) => f,
                // A file being created may not have its header yet: retried next poll.
                Err(e) => {
                    tracing::debug!("journal file not opened (yet): {e}");
                    continue;
                }
            };
            let id = f.header.file_id;
            present.insert(id);
            if let Some(k) = on_disk {
                self.known.insert(k, id);
            }
            if self.open.contains_key(&id) || self.done.contains(&id) {
                continue;
            }
            let handle = match f.std().try_clone() {
                Ok(dup) => tokio_uring::fs::File::from_std(dup),
                Err(e) => {
                    tracing::warn!(file = %p.display(), "journal file not opened: {e}");
                    continue;
                }
            };
            let mut r = JournalReader::new(f);
            if skip_existing {
                while let Err(l) = r.skip_to_end() {
                    r.file.land(l, load(&handle, l).await);
                }
            }
            tracing::info!(file = %p.display(), "journal file opened");
            self.open.insert(id, handle);
            self.merge.add(r);
            added += 1;
        }
        self.done.retain(|id| present.contains(id));
        self.known.retain(|_, id| present.contains(id));
        added
    }

    /// Refreshes every header; closes archived files read to their end.
    async fn refresh(&mut self) {
        for r in &mut self.merge.readers {
            let Some(handle) = self.open.get(&r.file.header.file_id) else { continue };
            let (read, head) = handle.read_at(vec![0u8; HEADER_READ_BYTES], 0).await;
            let refreshed = match (read, handle.statx().await) {
                (Ok(n), Ok(st)) => r.file.refresh(&head[..n], st.stx_size).map(|_| ()),
                (Err(source), _) | (_, Err(source)) => {
                    Err(super::JournalError::Io { path: r.file.path.clone(), source })
                }
            };
            if let Err(e) = refreshed {
                tracing::warn!("journal file not refreshed: {e}");
            }
        }
        let (open, done_ids, closed) = (&mut self.open, &mut self.done, &mut self.closed_corrupt);
        self.merge.close_if(|r| {
            let done = (r.file.header.state == STATE_ARCHIVED && r.behind() == 0) || r.broken;
            if done {
                tracing::info!(file = %r.file.path.display(), "journal file read to its end; closed");
                open.remove(&r.file.header.file_id);
                done_ids.insert(r.file.header.file_id);
                *closed += r.corrupt;
            }
            done
        });
    }

    /// Gives the reader `i` the bytes of `l` it asked for, read through io_uring.
    async fn load(&mut self, i: usize, l: Load) {
        let file = &mut self.merge.readers[i].file;
        let bytes = match self.open.get(&file.header.file_id) {
            Some(handle) => load(handle, l).await,
            None => Err(io::Error::other("no io_uring handle on this file")),
        };
        file.land(l, bytes);
    }
}

/// Reads `l` through io_uring.
async fn load(handle: &tokio_uring::fs::File, l: Load) -> io::Result<Vec<u8>> {
    let (read, buf) = handle.read_exact_at(vec![0u8; l.len as usize], l.offset).await;
    read.map(|()| buf)
}

/// What a journal source's task is given: its worker's intake and its id there, its
/// checkpoint (the worker settles it as frames are acknowledged) and its counters.
pub struct Journal<I> {
    pub intake: Rc<RefCell<I>>,
    pub id: SourceId,
    pub checkpoint: Rc<RefCell<Checkpoint>>,
    pub counters: Rc<RefCell<JournalCounters>>,
}

/// Runs a journal source (configuration `cfg`) on this worker until `stop`.
pub async fn run<I: Intake>(
    journal: Journal<I>,
    cfg: Rc<JournalSource>,
    mut stop: watch::Receiver<bool>,
) {
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let checkpoint = journal.checkpoint.borrow().cursor.clone();
    let mut after: Option<Cursor> = match (&checkpoint, &cfg.since) {
        (Some(c), _) | (None, Since::Cursor(c)) => Cursor::parse(c),
        _ => None,
    };
    let mut follow = Follow {
        cfg: cfg.clone(),
        merge: Merge::new(Vec::new()),
        open: HashMap::new(),
        done: HashSet::new(),
        known: HashMap::new(),
        closed_corrupt: 0,
    };
    follow.scan(checkpoint.is_none() && cfg.since == Since::Now).await;
    let mut line = Vec::with_capacity(4096);
    let mut last_realtime = 0u64;
    loop {
        if *stop.borrow() {
            return;
        }
        if journal.intake.borrow().paused() {
            let wake = journal.intake.borrow().resumed();
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let mut n = 0;
        while n < ROUND {
            if let Some((i, l)) = follow.merge.fill() {
                follow.load(i, l).await;
                continue;
            }
            let Some((_, sid, entry)) = follow.merge.pop() else { break };
            if after.as_ref().is_some_and(|c| c.covers(&sid, entry)) {
                continue;
            }
            after = None;
            n += 1;
            last_realtime = entry.realtime;
            hand_over(&journal, &cfg, &sid, entry, &mut line);
        }
        gauges(&journal, &follow, last_realtime);
        if n > 0 {
            tokio::task::yield_now().await;
            continue;
        }
        journal.intake.borrow_mut().drained();
        follow.refresh().await;
        follow.scan(false).await;
        gauges(&journal, &follow, last_realtime);
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Hands one entry to the worker, rendered as JSON into `line` with its cursor as its mark,
/// or counts it filtered out.
fn hand_over<I: Intake>(
    journal: &Journal<I>,
    cfg: &JournalSource,
    seqnum_id: &[u8; 16],
    entry: &super::Entry,
    line: &mut Vec<u8>,
) {
    let mut jc = journal.counters.borrow_mut();
    if !wanted(cfg, entry) {
        jc.entries_filtered += 1;
        return;
    }
    line.clear();
    let cursor = json::render(seqnum_id, entry, line);
    let service = entry
        .field(cfg.service_field.as_bytes())
        .or_else(|| entry.field(b"_SYSTEMD_UNIT"))
        .unwrap_or(b"journal");
    jc.entries_read += 1;
    jc.bytes_read += line.len() as u64;
    let mut intake = journal.intake.borrow_mut();
    let now = intake.now_ns();
    let mark = Some(&line[cursor]);
    let record = Record { bytes: line, key: Some(service), stream: None, mark };
    let outcome = intake.record(journal.id, record, now);
    jc.keys_truncated += u64::from(outcome.keys_cut);
}

fn wanted(cfg: &JournalSource, entry: &super::Entry) -> bool {
    let check = |field: &[u8], include: &[String], exclude: &[String]| {
        let v = entry.field(field).unwrap_or_default();
        (include.is_empty() || include.iter().any(|u| u.as_bytes() == v))
            && !exclude.iter().any(|u| u.as_bytes() == v)
    };
    check(b"_SYSTEMD_UNIT", &cfg.units, &cfg.exclude_units)
        && check(b"SYSLOG_IDENTIFIER", &cfg.identifiers, &cfg.exclude_identifiers)
}

fn gauges<I>(journal: &Journal<I>, follow: &Follow, last_realtime: u64) {
    let readers = &follow.merge.readers;
    let newest = readers.iter().map(|r| r.file.header.tail_entry_realtime).max().unwrap_or(0);
    let mut jc = journal.counters.borrow_mut();
    jc.files_open = readers.len() as u64;
    jc.corrupt_objects = follow.closed_corrupt + readers.iter().map(|r| r.corrupt).sum::<u64>();
    jc.lag_entries = readers.iter().map(JournalReader::behind).sum();
    jc.lag_seconds = newest.saturating_sub(last_realtime) / 1_000_000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_and_identifier_filters() {
        let text = "files = [\"/x\"]\nunits = [\"a.service\", \"b.service\"]\nexclude_identifiers = [\"noisy\"]\n";
        let cfg: JournalSource = toml::from_str(text).unwrap();
        let entry = |unit: &str, ident: &str| {
            let mut e = super::super::Entry::default();
            e.push_field("_SYSTEMD_UNIT", unit.as_bytes());
            e.push_field("SYSLOG_IDENTIFIER", ident.as_bytes());
            e
        };
        assert!(wanted(&cfg, &entry("a.service", "app")));
        assert!(!wanted(&cfg, &entry("c.service", "app")), "unit not included");
        assert!(!wanted(&cfg, &entry("b.service", "noisy")), "identifier excluded");
        let all: JournalSource = toml::from_str("files = [\"/x\"]").unwrap();
        assert!(wanted(&all, &super::super::Entry::default()), "no filter keeps everything");
    }
}
