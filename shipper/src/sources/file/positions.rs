//! A file source's positions: for each file it follows, the end of the last line whose frame
//! (and every earlier frame of the source) was settled.
//!
//! # Design constraints
//! - A position never moves past a line whose frame is not settled: after a crash a file
//!   resumes at or before the first line not acknowledged, so a line may repeat, never go
//!   missing. Entries are bounded by `files_max` (as many as files followed, plus files read
//!   to their end whose last lines are not settled yet).
//! - The file is rewritten whole (`PATH.tmp` + rename) by the process's writer thread
//!   (`sources::persist`), never on the worker's thread, each time a position advances; at
//!   shutdown [`Positions::sync`] writes and fsyncs it.
//!
//! # Format
//! ```text
//! # shipper file positions v1: device inode fingerprint_bytes fingerprint offset path
//! 2049 1835017 256 9c3b0e5d2f1a6b74 104857 /var/log/app.log
//! ```
//! Numbers in decimal except the fingerprint (16 hex digits, `identity::Fingerprint`); the
//! path (the last one the file was seen at, a newline in it written as `?`) is for people:
//! a file is found again by device, inode and fingerprint.
//!
//! # Operation
//! Each record's mark is `HANDED FILE OFFSET` in hex: the record's number in the source's
//! hand-over order, the source's id of the file (a new id whenever a file is read again from
//! its start), and the offset after the line. A frame registers only its last record's mark
//! ([`crate::sources::Marks`]), so the source also logs, after each read, where it left that
//! file ([`Positions::left`]); when a frame settles, every log entry handed over before its
//! mark applies, then the mark itself.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::identity::Fingerprint;
use crate::sources::persist::{self, Settling};

/// Most entries kept in the log of where the source left each file; past it the oldest go
/// (a position then lags, lines may repeat after a crash: never a loss). Consecutive entries
/// of one file are one entry, so it fills only if the source switches files thousands of
/// times between two settled frames (its records all dropped by the rate limit, say).
pub const LOG_MAX: usize = 4096;

const HEADER: &str =
    "# shipper file positions v1: device inode fingerprint_bytes fingerprint offset path";

/// Why a positions file could not be read.
#[derive(Debug, Error)]
pub enum PositionsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: not a position line (device inode fingerprint_bytes fingerprint offset path)")]
    Line { path: PathBuf, line: usize },
}

/// One file's saved position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub dev: u64,
    pub ino: u64,
    pub fp: Fingerprint,
    pub offset: u64,
    pub path: String,
}

/// Renders `entries` as a positions file.
pub fn render<'a>(entries: impl Iterator<Item = &'a Saved>) -> String {
    let mut out = format!("{HEADER}\n");
    for s in entries {
        let path = s.path.replace('\n', "?");
        let Saved { dev, ino, fp, offset, .. } = s;
        let _ = writeln!(out, "{dev} {ino} {} {:016x} {offset} {path}", fp.len, fp.hash);
    }
    out
}

/// Parses a positions file's text; `Err(line)` names the first bad line (1-based).
pub fn parse(text: &str) -> Result<Vec<Saved>, usize> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let mut f = line.splitn(6, ' ');
        let mut num = |radix| f.next().and_then(|s| u64::from_str_radix(s, radix).ok());
        let (dev, ino, len, hash, offset) = (num(10), num(10), num(10), num(16), num(10));
        let (Some(dev), Some(ino), Some(len), Some(hash), Some(offset)) =
            (dev, ino, len, hash, offset)
        else {
            return Err(i + 1);
        };
        let Ok(len) = u16::try_from(len) else { return Err(i + 1) };
        let path = f.next().unwrap_or_default().to_string();
        out.push(Saved { dev, ino, fp: Fingerprint { len, hash }, offset, path });
    }
    Ok(out)
}

/// A followed file's entry: its position, and where it ends if it was closed.
struct Entry {
    saved: Saved,
    end: Option<u64>,
}

pub struct Positions {
    path: Option<PathBuf>,
    /// Mode of the positions file (`shipper.file_mode`).
    mode: u32,
    /// Saved positions of files not found again yet (dropped after the first listing).
    unclaimed: Vec<Saved>,
    /// The files followed (and closed ones not settled to their end), by the source's id.
    files: BTreeMap<u32, Entry>,
    /// Where the source left a file after a read: (last record handed, file id, offset).
    log: VecDeque<(u64, u32, u64)>,
    settling: Settling<String>,
    /// Writes that failed (positions lag; lines may repeat after a restart).
    errors: Arc<AtomicU64>,
}

impl Positions {
    /// Opens the positions at `path` (none: nothing is persisted), keeping at most `max`
    /// saved entries.
    pub fn open(path: Option<&Path>, mode: u32, max: usize) -> Result<Positions, PositionsError> {
        let mut unclaimed = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => parse(&text)
                    .map_err(|line| PositionsError::Line { path: p.to_path_buf(), line })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(source) => return Err(PositionsError::Read { path: p.to_path_buf(), source }),
            },
            None => Vec::new(),
        };
        unclaimed.truncate(max);
        Ok(Positions {
            path: path.map(Path::to_path_buf),
            mode,
            unclaimed,
            files: BTreeMap::new(),
            log: VecDeque::new(),
            settling: Settling::default(),
            errors: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The saved position of the file at (`dev`, `ino`) whose first bytes are `head`, if its
    /// fingerprint matches (else it is another file at a reused inode).
    pub fn claim(&mut self, dev: u64, ino: u64, head: &[u8]) -> Option<u64> {
        let i = self.unclaimed.iter().position(|s| (s.dev, s.ino) == (dev, ino))?;
        let s = self.unclaimed.swap_remove(i);
        s.fp.matches(head).then_some(s.offset)
    }

    /// Saved positions not claimed by the first listing are forgotten.
    pub fn forget_unclaimed(&mut self) {
        self.unclaimed.clear();
    }

    /// The source follows a file as `id`, from `saved.offset`.
    pub fn follow(&mut self, id: u32, saved: Saved) {
        self.files.insert(id, Entry { saved, end: None });
    }

    /// File `id`'s fingerprint grew with the file.
    pub fn fingerprint(&mut self, id: u32, fp: Fingerprint) {
        if let Some(e) = self.files.get_mut(&id) {
            e.saved.fp = fp;
        }
    }

    /// File `id` was seen at another path.
    pub fn moved(&mut self, id: u32, path: &Path) {
        if let Some(e) = self.files.get_mut(&id) {
            e.saved.path = path.display().to_string();
        }
    }

    /// File `id`'s content is gone (truncated, rewritten): its marks no longer count.
    pub fn forget(&mut self, id: u32) {
        self.files.remove(&id);
    }

    /// File `id` was closed at `end`: its entry goes once its position reaches it.
    pub fn closed(&mut self, id: u32, end: u64) {
        if let Some(e) = self.files.get_mut(&id) {
            e.end = Some(end);
            if e.saved.offset >= end {
                self.files.remove(&id);
            }
        }
    }

    /// The source left file `id` at `offset`, after the record it handed over as `handed`.
    pub fn left(&mut self, handed: u64, id: u32, offset: u64) {
        // A frame settling between two entries of one file ends with a record of that file,
        // whose own mark says where: only the newer entry is needed.
        if let Some(back) = self.log.back_mut().filter(|b| b.1 == id) {
            *back = (handed, id, offset);
            return;
        }
        if self.log.len() == LOG_MAX {
            self.log.pop_front();
        }
        self.log.push_back((handed, id, offset));
    }

    /// Writes that failed so far.
    pub fn write_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The entries as they would be written now.
    pub fn render(&self) -> String {
        render(self.files.values().map(|e| &e.saved).chain(&self.unclaimed))
    }

    /// Applies a settled record mark; returns whether it parsed.
    fn apply_mark(&mut self, mark: &str) -> bool {
        let mut f = mark.split(' ').map(|s| u64::from_str_radix(s, 16).ok());
        let (Some(Some(handed)), Some(Some(id)), Some(Some(offset))) =
            (f.next(), f.next(), f.next())
        else {
            return false;
        };
        while let Some(&(h, file, off)) = self.log.front() {
            if h > handed {
                break;
            }
            self.log.pop_front();
            self.advance(file, off);
        }
        self.advance(id as u32, offset);
        true
    }

    fn advance(&mut self, id: u32, offset: u64) {
        let Some(e) = self.files.get_mut(&id) else { return };
        e.saved.offset = e.saved.offset.max(offset);
        if e.end.is_some_and(|end| e.saved.offset >= end) {
            self.files.remove(&id);
        }
    }
}

impl crate::sources::Marks for Positions {
    fn sealed(&mut self, seq: u64, mark: String) {
        self.settling.sealed(seq, mark);
    }

    fn settled(&mut self, seq: u64) {
        let mut marks = Vec::new();
        if !self.settling.settled(seq, |m| marks.push(m)) {
            return;
        }
        for m in &marks {
            let parsed = self.apply_mark(m);
            debug_assert!(parsed, "a file source's mark: {m:?}");
        }
        if let Some(path) = &self.path {
            persist::submit(path, self.render().into_bytes(), self.mode, &self.errors);
        }
    }

    fn sync(&self) -> io::Result<()> {
        match &self.path {
            Some(path) => {
                persist::settle(path);
                persist::write(path, self.render().as_bytes(), self.mode, true)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Marks;

    fn saved(ino: u64, offset: u64, path: &str) -> Saved {
        let fp = Fingerprint::of(b"first line\n");
        Saved { dev: 2049, ino, fp, offset, path: path.into() }
    }

    #[test]
    fn the_format_round_trips_and_names_a_bad_line() {
        let entries = [saved(7, 100, "/var/log/a.log"), saved(8, 0, "/var/log/with space\nnl")];
        let text = render(entries.iter());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], HEADER);
        let fp = format!("{:016x}", Fingerprint::of(b"first line\n").hash);
        assert_eq!(lines[1], format!("2049 7 11 {fp} 100 /var/log/a.log"));
        assert_eq!(lines[2], format!("2049 8 11 {fp} 0 /var/log/with space?nl"));
        let back = parse(&text).unwrap();
        assert_eq!(back[0], entries[0]);
        assert_eq!(back[1].path, "/var/log/with space?nl");
        assert_eq!(parse("# header\n1 2 3 ff 5 /x\n1 2 x\n"), Err(3));
    }

    /// Marks settle in frame order; a frame's last mark names one file, and the log says where
    /// the source left the others before it.
    #[test]
    fn positions_move_over_settled_frames_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("positions");
        let mut p = Positions::open(Some(&path), 0o640, 16).unwrap();
        p.follow(1, saved(7, 0, "/a"));
        p.follow(2, saved(8, 0, "/b"));
        // Records 1-3 from file 1 (left at 30), 4-5 from file 2; frames: 10 = 1..4, 11 = 5.
        p.left(3, 1, 30);
        p.sealed(10, "4 2 a".into());
        p.left(5, 2, 20);
        p.sealed(11, "5 2 14".into());
        p.settled(11);
        assert!(p.render().contains(" 0 /a\n"), "frame 10 is outstanding");
        p.settled(10);
        let text = p.render();
        assert!(text.contains(" 30 /a\n") && text.contains(" 20 /b\n"), "{text}");
        p.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let mut again = Positions::open(Some(&path), 0o640, 16).unwrap();
        let head = b"first line\nmore";
        assert_eq!(again.claim(2049, 7, head), Some(30));
        assert_eq!(again.claim(2049, 8, b"other line\n"), None, "a new file at a reused inode");
        p.closed(1, 30);
        assert!(!p.render().contains("/a\n"), "closed and settled to its end: gone");
        for k in 0..2 * LOG_MAX as u64 {
            p.left(100 + k, (k % 2) as u32, k);
        }
        p.left(10_000, 1, 5);
        p.left(10_001, 1, 6);
        assert_eq!(p.log.len(), LOG_MAX, "bounded; one file's consecutive entries are one");
        assert_eq!(p.log.back(), Some(&(10_001, 1, 6)));
    }
}
