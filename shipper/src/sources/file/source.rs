//! The file source's task: lists its paths, follows each file through the worker's io_uring,
//! and hands its lines over with their positions as marks.
//!
//! # Operation
//! Each round reads one chunk of up to [`READ_BYTES`] from every file (a file that replaced
//! another at its path waits until that one is read to its end), splits it into lines and
//! hands them over; the round stops as soon as the worker says to pause. When a round reads
//! nothing, or a poll interval has passed, the paths are listed again and every file is
//! checked (`identity`): a file whose path now names another file, or that was deleted, is
//! read to its end through its descriptor and closed; a file shorter than its position, or
//! whose first bytes changed, is read again from its start. A last line without its newline
//! is handed over once it has not grown for `partial_line_ms`. Then, with nothing read, the
//! task sleeps one poll.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::identity::{Fingerprint, FINGERPRINT_BYTES};
use super::multiline::Joiner;
use super::positions::{Positions, Saved};
use super::{glob, FileCounters};
use crate::config::shipper::{FileSince, FileSource};
use crate::sources::lines::{Line, LineSplitter};
use crate::sources::{Intake, Record, SourceId};

/// Bytes asked of one read (one buffer per source).
pub const READ_BYTES: usize = 256 << 10;

/// What a file source's task is given: its worker's intake and its id there, its positions
/// (the worker settles them as frames are acknowledged) and its counters.
pub struct Files<I> {
    pub intake: Rc<RefCell<I>>,
    pub id: SourceId,
    pub positions: Rc<RefCell<Positions>>,
    pub counters: Rc<RefCell<FileCounters>>,
}

/// One file followed.
struct Tail {
    /// The source's id of this content (a new one when the file is read again from 0).
    id: u32,
    /// The path it was last seen at.
    path: PathBuf,
    file: tokio_uring::fs::File,
    dev: u64,
    ino: u64,
    fp: Fingerprint,
    /// The next byte to read.
    offset: u64,
    /// The end of the last line handed over (where its position can reach).
    handed_end: u64,
    /// Its size at the last listing (or what was read, if more).
    size: u64,
    splitter: LineSplitter,
    /// Its lines joined into multi-line records (`multiline_start`).
    joiner: Option<Joiner>,
    /// Since when a partial last line (or a joined record) has waited for more.
    partial_since_ns: Option<u64>,
    /// The listing that found its path naming another file (or nothing).
    gone_at: Option<u64>,
    /// The last read met the end of the file.
    eof: bool,
    /// The file this one replaced at its path, read to its end first.
    after: Option<u32>,
}

impl Tail {
    /// Bytes read but not handed over yet: a partial last line, a record being joined.
    fn held(&self) -> usize {
        self.splitter.pending() + self.joiner.as_ref().map_or(0, Joiner::pending)
    }
}

struct Follow<I> {
    files: Files<I>,
    cfg: Rc<FileSource>,
    tails: Vec<Tail>,
    next_id: u32,
    /// Records handed over so far (the first part of each mark).
    handed: u64,
    listings: u64,
    buf: Vec<u8>,
    mark: Vec<u8>,
    /// `multiline_start`, compiled.
    start: Option<regex::bytes::Regex>,
    /// inotify's watches, when the kernel gives an instance.
    watcher: Option<super::watch::Watcher>,
}

/// Runs a file source (configuration `cfg`) on this worker until `stop`.
pub async fn run<I: Intake>(files: Files<I>, cfg: Rc<FileSource>, mut stop: watch::Receiver<bool>) {
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let start = cfg
        .multiline_start
        .as_deref()
        .map(|re| regex::bytes::Regex::new(re).expect("validated with the configuration"));
    let dirs_max = cfg.files_max as usize + cfg.paths.len();
    let mut f = Follow {
        files,
        cfg,
        tails: Vec::new(),
        next_id: 0,
        handed: 0,
        listings: 0,
        buf: Vec::with_capacity(READ_BYTES),
        mark: Vec::with_capacity(64),
        start,
        watcher: super::watch::Watcher::start(dirs_max, stop.clone()),
    };
    f.scan(true).await;
    f.files.positions.borrow_mut().forget_unclaimed();
    let mut listed = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        if f.files.intake.borrow().paused() {
            let wake = f.files.intake.borrow().resumed();
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let read = f.read_round().await;
        f.partials();
        if read == 0 || listed.elapsed() >= poll {
            let known = f.next_id;
            f.scan(false).await;
            listed = Instant::now();
            if f.next_id != known {
                // New files (or contents): read them now, not at the next event or poll.
                continue;
            }
        }
        f.gauges();
        if read > 0 {
            tokio::task::yield_now().await;
            continue;
        }
        f.files.intake.borrow_mut().drained();
        let wake = f.watcher.as_ref().map(|w| w.wake.clone());
        let changed = async {
            match &wake {
                Some(wake) => wake.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The first bytes of `file` (up to [`FINGERPRINT_BYTES`]), read through io_uring.
async fn head(file: &tokio_uring::fs::File) -> std::io::Result<Vec<u8>> {
    let (res, buf) = file.read_at(Vec::with_capacity(FINGERPRINT_BYTES), 0).await;
    res.map(|_| buf)
}

/// Hands lines over to the worker, counting them; one per source and read.
struct Handing<'a, I> {
    intake: &'a mut I,
    source: SourceId,
    counters: &'a mut FileCounters,
    handed: &'a mut u64,
    mark: &'a mut Vec<u8>,
    now: u64,
}

impl<I: Intake> Handing<'_, I> {
    /// Hands over `line` of file `file`, which ends at `offset` (with `joined` more lines
    /// joined into it); returns its number, or none for an empty line (counted, not handed
    /// over).
    fn line(&mut self, line: Line<'_>, file: u32, offset: u64, joined: u64) -> Option<u64> {
        self.counters.lines_joined += joined;
        let c = &mut self.counters.lines;
        c.lines_read += 1;
        c.lines_truncated += u64::from(line.truncated);
        if line.bytes.is_empty() {
            c.lines_empty += 1;
            return None;
        }
        *self.handed += 1;
        self.mark.clear();
        let _ = write!(self.mark, "{:x} {file:x} {offset:x}", *self.handed);
        let record = Record { bytes: line.bytes, key: None, stream: None, mark: Some(self.mark) };
        let outcome = self.intake.record(self.source, record, self.now);
        c.keys_truncated += u64::from(outcome.keys_cut);
        if let Some(f) = outcome.failure {
            c.parse_failures[f as usize] += 1;
        }
        Some(*self.handed)
    }
}

impl<I: Intake> Follow<I> {
    /// A new file's joiner, when lines are joined (`multiline_start`).
    fn joiner(&self) -> Option<Joiner> {
        let max = self.cfg.line_bytes_max as usize;
        self.start.as_ref().map(|start| Joiner::new(start.clone(), max))
    }

    /// One chunk from every file that may be read; returns the bytes read.
    async fn read_round(&mut self) -> usize {
        let mut total = 0;
        for i in 0..self.tails.len() {
            if self.files.intake.borrow().paused() {
                break;
            }
            let waits = self.tails[i]
                .after
                .is_some_and(|a| self.tails.iter().any(|t| t.id == a && !(t.eof && t.held() == 0)));
            if !waits {
                total += self.read_chunk(i).await;
            }
        }
        total
    }

    /// Reads the next chunk of file `i` and hands its lines over.
    async fn read_chunk(&mut self, i: usize) -> usize {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let t = &self.tails[i];
        let (res, buf) = t.file.read_at(buf, t.offset).await;
        self.buf = buf;
        match &res {
            Ok(0) => self.tails[i].eof = true,
            Ok(n) => self.hand_over(i, *n),
            Err(e) => {
                let t = &mut self.tails[i];
                t.eof = true;
                let mut c = self.files.counters.borrow_mut();
                c.lines.read_errors += 1;
                if c.lines.read_errors.is_power_of_two() {
                    tracing::warn!(file = %t.path.display(), "file read failed: {e} (failures so far: {})", c.lines.read_errors);
                }
            }
        }
        res.unwrap_or(0)
    }

    /// Splits the `n` bytes just read from file `i` into lines and hands them over.
    fn hand_over(&mut self, i: usize, n: usize) {
        let Follow { files, tails, buf, mark, handed, .. } = self;
        let t = &mut tails[i];
        let (base, id) = (t.offset, t.id);
        let mut intake = files.intake.borrow_mut();
        let mut counters = files.counters.borrow_mut();
        let now = intake.now_ns();
        let mut h = Handing {
            intake: &mut *intake,
            source: files.id,
            counters: &mut counters,
            handed,
            mark,
            now,
        };
        let mut last = None;
        let mut take = |bytes: &[u8], truncated: bool, end: u64, joined: u64| {
            if let Some(k) = h.line(Line { bytes, truncated, end: 0 }, id, end, joined) {
                last = Some((k, end));
            }
        };
        let joiner = &mut t.joiner;
        t.splitter.split(&buf[..n], |line| {
            let offset = base + line.end as u64;
            match joiner {
                Some(j) => j.push(line.bytes, line.truncated, offset, &mut take),
                None => take(line.bytes, line.truncated, offset, 0),
            }
        });
        h.counters.lines.bytes_read += n as u64;
        t.offset += n as u64;
        t.size = t.size.max(t.offset);
        (t.eof, t.partial_since_ns) = (false, None);
        if let Some((k, offset)) = last {
            t.handed_end = offset;
            files.positions.borrow_mut().left(k, id, offset);
        }
    }

    /// Hands over the partial last lines that waited `partial_line_ms` for their newline.
    fn partials(&mut self) {
        let now = self.files.intake.borrow().now_ns();
        let wait = self.cfg.partial_line_ms * 1_000_000;
        for i in 0..self.tails.len() {
            let t = &mut self.tails[i];
            if !t.eof || t.held() == 0 {
                continue;
            }
            match t.partial_since_ns {
                None => t.partial_since_ns = Some(now),
                Some(s) if now.saturating_sub(s) >= wait => self.flush(i),
                Some(_) => {}
            }
        }
    }

    /// Hands over file `i`'s partial last line as it is.
    fn flush(&mut self, i: usize) {
        let Follow { files, tails, mark, handed, .. } = self;
        let t = &mut tails[i];
        let (offset, id) = (t.offset, t.id);
        let mut intake = files.intake.borrow_mut();
        let mut counters = files.counters.borrow_mut();
        let now = intake.now_ns();
        let mut h = Handing {
            intake: &mut *intake,
            source: files.id,
            counters: &mut counters,
            handed,
            mark,
            now,
        };
        let mut last = None;
        let partial = t.splitter.pending() > 0;
        let mut take = |bytes: &[u8], truncated: bool, end: u64, joined: u64| {
            if let Some(k) = h.line(Line { bytes, truncated, end: 0 }, id, end, joined) {
                last = Some(k);
            }
        };
        let joiner = &mut t.joiner;
        t.splitter.flush(|line| match joiner {
            Some(j) => j.push(line.bytes, line.truncated, offset, &mut take),
            None => take(line.bytes, line.truncated, offset, 0),
        });
        if let Some(j) = joiner {
            j.flush(&mut take);
        }
        h.counters.lines_partial += u64::from(partial);
        t.partial_since_ns = None;
        if let Some(k) = last {
            t.handed_end = offset;
            files.positions.borrow_mut().left(k, id, offset);
        }
    }

    fn gauges(&self) {
        let mut c = self.files.counters.borrow_mut();
        c.files_open = self.tails.len() as u64;
        c.lag_bytes = self.tails.iter().map(|t| t.size.saturating_sub(t.offset)).sum();
    }
}

impl<I: Intake> Follow<I> {
    /// Lists the paths again: checks the files followed, opens new ones, and retires those
    /// no path names any more. `first`: the listing at start (where `since` applies).
    async fn scan(&mut self, first: bool) {
        self.listings += 1;
        let max = self.cfg.files_max as usize;
        let mut paths = Vec::new();
        let mut over = 0;
        for pattern in &self.cfg.paths {
            over += glob::expand(pattern, max, &mut paths);
            let dir = std::path::Path::new(pattern).parent();
            if let (Some(w), Some(dir)) = (&mut self.watcher, dir) {
                if !dir.to_string_lossy().contains(['*', '?']) {
                    w.watch(dir);
                }
            }
        }
        // Files found (a file named by two paths, a link and its target, is followed once).
        let (mut found, mut seen) = (HashSet::new(), HashSet::new());
        for p in paths {
            if let (Some(w), Some(dir)) = (&mut self.watcher, p.parent()) {
                w.watch(dir);
            }
            let Ok(m) = std::fs::metadata(&p) else { continue };
            if !m.is_file() || !found.insert((m.dev(), m.ino())) {
                continue;
            }
            if let Some(i) = self.tails.iter().position(|t| (t.dev, t.ino) == (m.dev(), m.ino())) {
                // After the check: a file read again from its start has a new id.
                self.check(i, p, m.len()).await;
                seen.insert(self.tails[i].id);
            } else if self.tails.len() < max {
                if let Some(id) = self.open(p, first).await {
                    seen.insert(id);
                }
            } else {
                over += 1;
            }
        }
        self.files.counters.borrow_mut().files_unfollowed = over as u64;
        self.retire(&seen);
        let mut c = self.files.counters.borrow_mut();
        c.followed.clear();
        c.followed.extend(self.tails.iter().map(|t| super::Followed {
            path: t.path.display().to_string(),
            read_bytes: t.offset,
            size_bytes: t.size,
        }));
    }

    /// Checks file `i`, found at `path` with `size` bytes: moved, grown, truncated or
    /// rewritten from its start.
    async fn check(&mut self, i: usize, path: PathBuf, size: u64) {
        let head = head(&self.tails[i].file).await;
        let t = &mut self.tails[i];
        t.gone_at = None;
        t.size = size.max(t.offset);
        if t.path != path {
            tracing::info!(from = %t.path.display(), to = %path.display(), "file renamed; followed under its new name");
            self.files.positions.borrow_mut().moved(t.id, &path);
            self.files.counters.borrow_mut().rotations += 1;
            t.path = path;
        }
        let Ok(head) = head else { return };
        if size < t.offset || !t.fp.matches(&head) {
            return self.restart(i, &head);
        }
        if usize::from(t.fp.len) < head.len() {
            t.fp = Fingerprint::of(&head);
            self.files.positions.borrow_mut().fingerprint(t.id, t.fp);
        }
    }

    /// File `i` was truncated or rewritten: read again from its start, as a new content. A
    /// partial line held from the old content is handed over first, as it is.
    fn restart(&mut self, i: usize, head: &[u8]) {
        if self.tails[i].held() > 0 {
            self.flush(i);
        }
        let id = self.next_id;
        self.next_id += 1;
        let joiner = self.joiner();
        let t = &mut self.tails[i];
        tracing::info!(file = %t.path.display(), position = t.offset, "file truncated or rewritten; reading it again from its start");
        let mut positions = self.files.positions.borrow_mut();
        positions.forget(t.id);
        t.id = id;
        (t.offset, t.handed_end) = (0, 0);
        t.fp = Fingerprint::of(head);
        t.splitter = LineSplitter::new(self.cfg.line_bytes_max as usize);
        t.joiner = joiner;
        (t.partial_since_ns, t.eof) = (None, false);
        let path = t.path.display().to_string();
        positions.follow(id, Saved { dev: t.dev, ino: t.ino, fp: t.fp, offset: 0, path });
        self.files.counters.borrow_mut().truncations += 1;
    }

    /// Opens the file at `path` (not followed yet) at its saved position, or where `since`
    /// says; returns its id.
    async fn open(&mut self, path: PathBuf, first: bool) -> Option<u32> {
        let std = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(file = %path.display(), "file not opened: {e}");
                return None;
            }
        };
        let m = std.metadata().ok()?;
        let file = tokio_uring::fs::File::from_std(std);
        let head = head(&file).await.unwrap_or_default();
        let fp = Fingerprint::of(&head);
        let saved = self.files.positions.borrow_mut().claim(m.dev(), m.ino(), &head);
        let offset = match saved {
            Some(o) if o <= m.len() => o,
            Some(_) => {
                self.files.counters.borrow_mut().truncations += 1;
                0
            }
            None if first && self.cfg.since == FileSince::Now => m.len(),
            None => 0,
        };
        let id = self.next_id;
        self.next_id += 1;
        let after = self.tails.iter().find(|t| t.path == path).map(|t| t.id);
        tracing::info!(file = %path.display(), offset, "file followed");
        let shown = path.display().to_string();
        let saved = Saved { dev: m.dev(), ino: m.ino(), fp, offset, path: shown };
        self.files.positions.borrow_mut().follow(id, saved);
        self.tails.push(Tail {
            id,
            path,
            file,
            dev: m.dev(),
            ino: m.ino(),
            fp,
            offset,
            handed_end: offset,
            size: m.len().max(offset),
            splitter: LineSplitter::new(self.cfg.line_bytes_max as usize),
            joiner: self.joiner(),
            partial_since_ns: None,
            gone_at: None,
            eof: false,
            after,
        });
        Some(id)
    }

    /// Files no path names any more are read to their end, then closed: once a read after
    /// an earlier listing found them gone has met their end.
    fn retire(&mut self, seen: &HashSet<u32>) {
        let listing = self.listings;
        for t in &mut self.tails {
            if !seen.contains(&t.id) && t.gone_at.is_none() {
                tracing::info!(file = %t.path.display(), "file renamed away or deleted; reading it to its end");
                (t.gone_at, t.eof) = (Some(listing), false);
                self.files.counters.borrow_mut().rotations += 1;
            }
        }
        let mut i = 0;
        while i < self.tails.len() {
            let t = &self.tails[i];
            if !(t.eof && t.gone_at.is_some_and(|g| g < listing)) {
                i += 1;
                continue;
            }
            if t.held() > 0 {
                self.flush(i);
            }
            let t = self.tails.remove(i);
            tracing::info!(file = %t.path.display(), end = t.offset, "file read to its end; closed");
            // Its entry goes once its last line handed over is settled.
            self.files.positions.borrow_mut().closed(t.id, t.handed_end);
        }
    }
}
