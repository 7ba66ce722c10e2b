//! The receiver's commit log: which frames are written, and the marks up to which each output
//! holds committed data. It is what makes "acknowledged once written" and "written exactly
//! once" survive a crash of the receiver; it knows outputs only by their marks
//! ([`super::output::Mark`]) and the names they announce ([`super::output::Intents`]).
//!
//! # Design constraints
//! - A frame is acknowledged only after its commit record is appended (and fdatasync'd when
//!   `fsync` is on), naming the marks every output gave for it. Each shard appends to its own
//!   log; a log over [`LOG_BYTES_MAX`] is compacted into a snapshot of that shard's windows
//!   and what its outputs' [`super::output::Output::checkpoint`] must keep (the files output:
//!   the end of each live stream's current file, open or closed: at most `streams_max` + 2).
//! - An output that is about to create a file it may have to cut back (the files output: a
//!   stream's first file, its next at rotation, or the first after it was forgotten) first
//!   announces its name in an `Intent` record, appended and fdatasync'd (with `fsync`) before
//!   the file exists. Recovery removes or cuts a file the log does not name only when an
//!   intent announced it: any other is a finished file, all of it committed (a stream
//!   forgotten before the last compaction). Intents are rare (one per file created) and are
//!   dropped at compaction.
//! - Marks are handed back at recovery, before the logs naming them are let go, to each output
//!   to cut back what it wrote uncommitted ([`super::output::recover`]).
//! - Compatibility: every log this version writes starts with `Version` ([`LOG_FORMAT`] 2).
//!   A log without one (format 1, before intents) is recovered as it always was: a file it
//!   does not name holds nothing committed. An older receiver reads a `Version` record as a
//!   torn tail: it must not be started over logs of this one.
//!
//! # Format
//! ```text
//! .state/base          Gen { gen } then Window records: the state at the last start
//! .state/core-N.log    Version, then records appended by shard N during generation `gen`
//! Record  { len: u32, crc32c: u32 (of kind and body), kind: u8, body: [u8; len] }
//! Commit  (1) { run_id: u64, core: u16, seq: u64, files: u16, [path_len: u16, path, end: u64] }
//! Window  (2) { run_id: u64, core: u16, below: u64, above: u32, [seq: u64] }   (read only)
//! Gen     (3) { gen: u64 }
//! FileEnd (4) { path_len: u16, path, end: u64 }
//! WindowAt(5) { Window's fields, written_unix_s: u64 }
//! Version (6) { format: u32 }                           first record of a log of format 2
//! Intent  (7) { files: u16 (<= 1024), [path_len: u16, path] }   files about to be created
//! ```
//! (`run_id`, `core`) is the sender stream ([`StreamId`]: `core` is the sender's worker
//! index from HELLO, or from a frame's origin). A shard logs only streams it owns (a frame
//! with an origin is committed by the writer owning the origin's stream); a `Commit` with no
//! files books the number a connection gave such a frame. Each (`path`, `end`) is a mark; the
//! files output's paths are relative to the output directory: `STREAM/gGEN-cSHARD-INDEX.log`.
//! Marks of a name only grow, except that an `Intent` naming it starts it over (a new file
//! under a name retention freed).
//!
//! # Operation (recovery, before any shard starts)
//! 1. Read `base` and every shard log; a record that is truncated or fails its checksum ends
//!    that log (a torn tail), and is logged.
//! 2. Hand the generation that was running, the largest mark of each name and the intents
//!    to the outputs, which cut back what they wrote past them (the files output: the newest
//!    file of each (stream, shard) back to its last committed end, removed when nothing in it
//!    was committed; one neither named nor announced is left whole, in logs of format 2).
//! 3. Forget the windows of streams not written to for `dedup_window_ttl_s` (runs that ended:
//!    their shippers will never send those sequence numbers again, except from a disk buffer
//!    older than that, which could then be written twice). A window written in the generation
//!    being recovered, or read from a `Window` record of an older version, counts as written
//!    now.
//! 4. Write a new `base` (generation + 1, merged windows) atomically, then remove the logs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::dedup::{StreamId, Window};
use super::output::Mark;

/// A shard's log larger than this is compacted.
pub const LOG_BYTES_MAX: u64 = 64 << 20;
/// Capacity of the staging buffer kept between groups.
const STAGED_KEEP_BYTES_MAX: usize = 1 << 20;

const COMMIT: u8 = 1;
const WINDOW: u8 = 2;
const GEN: u8 = 3;
const FILE_END: u8 = 4;
const WINDOW_AT: u8 = 5;
const VERSION: u8 = 6;
const INTENT: u8 = 7;

/// The format of the logs this version writes, in the `Version` record each starts with: 2
/// has intents. A log without that record is of format 1 (written before intents): a file it
/// does not name may hold uncommitted data.
pub const LOG_FORMAT: u32 = 2;

/// `written_unix_s` of a window that a commit record of the logs being recovered wrote to.
const WRITTEN_IN_THE_LOGS: u64 = u64::MAX;

pub fn state_dir(out: &Path) -> PathBuf {
    out.join(".state")
}

fn log_path(out: &Path, shard: usize) -> PathBuf {
    state_dir(out).join(format!("core-{shard}.log"))
}

struct Enc(Vec<u8>);

impl Enc {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn path(&mut self, p: &str) -> &mut Self {
        self.u16(p.len() as u16);
        self.0.extend_from_slice(p.as_bytes());
        self
    }
}

fn record(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), body);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
}

fn window_record(id: StreamId, w: &Window, out: &mut Vec<u8>) {
    let mut e = Enc(Vec::new());
    e.u64(id.0).u16(id.1).u64(w.below).u32(w.above.len() as u32);
    for &s in &w.above {
        e.u64(s);
    }
    e.u64(w.written_unix_s);
    record(WINDOW_AT, &e.0, out);
}

fn version_record(out: &mut Vec<u8>) {
    record(VERSION, &LOG_FORMAT.to_le_bytes(), out);
}

fn file_end_record(path: &str, end: u64, out: &mut Vec<u8>) {
    let mut e = Enc(Vec::new());
    e.path(path).u64(end);
    record(FILE_END, &e.0, out);
}

/// What a set of logs says.
#[derive(Default, Debug)]
pub struct LogState {
    pub gen: u64,
    pub windows: HashMap<StreamId, Window>,
    /// The largest mark of each name in the logs since its last intent: for the files
    /// output, the committed end of each file.
    pub marks: HashMap<String, u64>,
    /// The names an output announced before creating them ([`CommitLog::intend`]).
    pub intents: HashSet<String>,
    /// The newest log format read (0: no `Version` record, a log of format 1).
    pub format: u32,
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn path(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

impl LogState {
    /// The intents, when the logs carry them (format 2 on): a file the logs neither name nor
    /// announce is then a finished one, all of it committed. `None` for logs of format 1,
    /// where a file the log does not name may hold uncommitted data.
    pub fn intents(&self) -> Option<&HashSet<String>> {
        (self.format >= 2).then_some(&self.intents)
    }

    /// Applies every valid record of `bytes`; returns the offset where a torn or corrupt tail
    /// starts, if any.
    pub fn apply(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut off = 0;
        while off < bytes.len() {
            let rest = &bytes[off..];
            if rest.len() < 9 {
                return Some(off);
            }
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4")) as usize;
            let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4"));
            if rest.len() < 9 + len {
                return Some(off);
            }
            let (kind, body) = (rest[8], &rest[9..9 + len]);
            if crc32c::crc32c_append(crc32c::crc32c(&[kind]), body) != crc
                || self.one(kind, body).is_none()
            {
                return Some(off);
            }
            off += 9 + len;
        }
        None
    }

    fn one(&mut self, kind: u8, body: &[u8]) -> Option<()> {
        let mut d = Dec(body);
        match kind {
            COMMIT => {
                let id = (d.u64()?, d.u16()?);
                let seq = d.u64()?;
                for _ in 0..d.u16()? {
                    let (path, end) = (d.path()?, d.u64()?);
                    let e = self.marks.entry(path).or_default();
                    *e = (*e).max(end);
                }
                let w = self.windows.entry(id).or_default();
                w.insert(seq);
                w.written_unix_s = WRITTEN_IN_THE_LOGS;
            }
            WINDOW | WINDOW_AT => {
                let id = (d.u64()?, d.u16()?);
                let below = d.u64()?;
                let n = d.u32()? as usize;
                let mut w = Window { below, ..Default::default() };
                for _ in 0..n.min(body.len() / 8) {
                    w.above.insert(d.u64()?);
                }
                if kind == WINDOW_AT {
                    w.written_unix_s = d.u64()?;
                }
                self.windows.entry(id).or_default().merge(&w);
            }
            GEN => self.gen = self.gen.max(d.u64()?),
            FILE_END => {
                let (path, end) = (d.path()?, d.u64()?);
                let e = self.marks.entry(path).or_default();
                *e = (*e).max(end);
            }
            VERSION => self.format = self.format.max(d.u32()?),
            INTENT => {
                for _ in 0..d.u16()? {
                    // A new file under this name: what the log said of an older one with the
                    // same name (removed by retention meanwhile) no longer holds.
                    let path = d.path()?;
                    self.marks.remove(&path);
                    self.intents.insert(path);
                }
            }
            _ => return None,
        }
        d.0.is_empty().then_some(())
    }
}

fn read_log(path: &Path, state: &mut LogState) -> io::Result<()> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    if let Some(off) = state.apply(&bytes) {
        tracing::warn!(path = %path.display(), offset = off, dropped = bytes.len() - off, "commit log ends in a torn or corrupt record; ignoring the rest");
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Forgets the windows not written to for `ttl_s` seconds before `now_s`; returns how many.
/// Windows written by the logs being recovered, or of unknown age, count as written now.
fn expire(windows: &mut HashMap<StreamId, Window>, now_s: u64, ttl_s: u64) -> usize {
    let before = windows.len();
    for w in windows.values_mut() {
        if w.written_unix_s == 0 || w.written_unix_s == WRITTEN_IN_THE_LOGS {
            w.written_unix_s = now_s;
        }
    }
    windows.retain(|_, w| w.written_unix_s.saturating_add(ttl_s) >= now_s);
    before - windows.len()
}

/// Seconds since the Unix epoch.
pub fn unix_s() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Recovers the output directory after any stop, clean or not; returns the new generation
/// and the window of every stream written to in the last `ttl_s` seconds. `recover_outputs`
/// gets what the logs say (the generation that was running, the marks and intents its logs
/// name) before the logs go.
pub fn recover(
    out: &Path,
    ttl_s: u64,
    modes: crate::os::Modes,
    recover_outputs: impl FnOnce(&LogState) -> io::Result<()>,
) -> io::Result<LogState> {
    let state_dir = state_dir(out);
    modes.create_dir_all(&state_dir)?;
    let mut state = LogState::default();
    let base = state_dir.join("base");
    if base.exists() {
        read_log(&base, &mut state)?;
    }
    let mut logs = Vec::new();
    for entry in fs::read_dir(&state_dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("core-") && name.ends_with(".log") {
            read_log(&path, &mut state)?;
            logs.push(path);
        }
    }
    recover_outputs(&state)?;
    let expired = expire(&mut state.windows, unix_s(), ttl_s);
    if expired > 0 {
        tracing::info!(
            expired,
            ttl_s,
            "forgot the de-duplication windows of streams idle for dedup_window_ttl_s"
        );
    }
    state.gen += 1;
    let mut bytes = Vec::new();
    record(GEN, &state.gen.to_le_bytes(), &mut bytes);
    let ordered: BTreeMap<_, _> = state.windows.iter().collect();
    for (id, w) in ordered {
        window_record(*id, w, &mut bytes);
    }
    let tmp = state_dir.join("base.tmp");
    let mut f = modes.create_file().truncate(true).open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, &base)?;
    sync_dir(&state_dir)?;
    for log in logs {
        fs::remove_file(log)?;
    }
    state.marks.clear();
    state.intents.clear();
    Ok(state)
}

/// A shard's append-only commit log.
pub struct CommitLog {
    out: PathBuf,
    shard: usize,
    modes: crate::os::Modes,
    file: File,
    bytes: u64,
    fsync: bool,
    /// Commit records not yet appended ([`CommitLog::stage`]).
    staged: Vec<u8>,
}

impl CommitLog {
    pub fn create(
        out: &Path,
        shard: usize,
        fsync: bool,
        modes: crate::os::Modes,
    ) -> io::Result<CommitLog> {
        let path = log_path(out, shard);
        let file = modes.create_file().append(true).open(&path)?;
        let bytes = file.metadata()?.len();
        let out = out.to_path_buf();
        let mut log = CommitLog { out, shard, modes, file, bytes, fsync, staged: Vec::new() };
        if bytes == 0 {
            // Appended (and fdatasync'd with `fsync`) before any commit counts.
            let mut version = Vec::new();
            version_record(&mut version);
            log.append(&version)?;
        }
        Ok(log)
    }

    /// A log as versions before intents wrote it (format 1: no `Version` record), for tests
    /// of recovery over such a log.
    #[cfg(test)]
    pub fn create_format_1(out: &Path, shard: usize) -> io::Result<CommitLog> {
        let modes = crate::os::Modes::DEFAULT;
        let file = modes.create_file().append(true).open(log_path(out, shard))?;
        let out = out.to_path_buf();
        Ok(CommitLog { out, shard, modes, file, bytes: 0, fsync: false, staged: Vec::new() })
    }

    /// Stages the commit of frame `seq` of `id`, with the `marks` its outputs gave: it is
    /// appended by the next [`CommitLog::flush`].
    pub fn stage(&mut self, id: StreamId, seq: u64, marks: &[Mark]) {
        let mut e = Enc(Vec::with_capacity(32 + marks.len() * 48));
        e.u64(id.0).u16(id.1).u64(seq).u16(marks.len() as u16);
        for (path, end) in marks {
            e.path(path).u64(*end);
        }
        record(COMMIT, &e.0, &mut self.staged);
    }

    /// Forgets the commits staged since the last flush (their frames were taken back).
    pub fn unstage(&mut self) {
        self.staged.clear();
    }

    /// Appends every staged commit, and fdatasyncs the log when `fsync` is on: one write and
    /// one sync for a whole group of frames.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        let result = self.append(&staged);
        self.staged = staged;
        self.staged.clear();
        if self.staged.capacity() > STAGED_KEEP_BYTES_MAX {
            self.staged = Vec::new();
        }
        result
    }

    /// Appends `bytes` (whole records), fdatasync'd when `fsync` is on. A failed append is cut
    /// off the log again (and that made durable), so that the group can be taken back from
    /// the outputs and a torn record never hides the records appended after it; a log that
    /// cannot be cut back is not gone on with (a panic: the process restarts and recovery
    /// repairs the log).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let result = self.file.write_all(bytes);
        let result = result.and_then(|()| if self.fsync { self.file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => self.bytes += bytes.len() as u64,
            Err(_) => {
                if let Err(e) = self.file.set_len(self.bytes).and_then(|()| self.file.sync_data()) {
                    let path = log_path(&self.out, self.shard);
                    panic!("cannot cut {} back to {} bytes after a failed append: {e}; refusing to go on with a torn commit log", path.display(), self.bytes);
                }
            }
        }
        result
    }

    /// Stages and appends the commit of one frame.
    pub fn commit(&mut self, id: StreamId, seq: u64, marks: &[Mark]) -> io::Result<()> {
        self.stage(id, seq, marks);
        self.flush()
    }

    pub fn needs_compaction(&self) -> bool {
        self.bytes > LOG_BYTES_MAX
    }

    /// Replaces the log with a snapshot of `windows` and `marks`, the outputs' checkpoints:
    /// for the files output the current file of every live stream, open or closed, or
    /// recovery would take a file the log announced (or, without intents, any file it does not
    /// name) for one with nothing committed. The intents are dropped: every file they
    /// announced is by now a live stream's current file (named in `marks`) or a finished one.
    pub fn compact<'a>(
        &mut self,
        windows: impl Iterator<Item = (&'a StreamId, &'a Window)>,
        marks: &[(impl AsRef<str>, u64)],
    ) -> io::Result<()> {
        let mut bytes = Vec::new();
        version_record(&mut bytes);
        for (id, w) in windows {
            window_record(*id, w, &mut bytes);
        }
        for (path, end) in marks {
            file_end_record(path.as_ref(), *end, &mut bytes);
        }
        let path = log_path(&self.out, self.shard);
        let tmp = path.with_extension("tmp");
        let mut f = self.modes.create_file().truncate(true).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&state_dir(&self.out))?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.bytes = bytes.len() as u64;
        Ok(())
    }
}

/// Names at most this many files in one `Intent` record (its count is a u16).
const INTENT_FILES_MAX: usize = 1024;
const _: () = assert!(INTENT_FILES_MAX <= u16::MAX as usize);

impl super::output::Intents for CommitLog {
    /// Appends `Intent` records naming `names` (fdatasync'd with `fsync`): the caller creates
    /// the files only once this returned `Ok`.
    fn intend(&mut self, names: &[&str]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for chunk in names.chunks(INTENT_FILES_MAX) {
            let mut e = Enc(Vec::with_capacity(2 + chunk.len() * 48));
            e.u16(chunk.len() as u16);
            for name in chunk {
                e.path(name);
            }
            record(INTENT, &e.0, &mut bytes);
        }
        // Named, and without the errno: a failing state directory is a reason to try the
        // frame again, never to refuse it for good (`files::never_writable` reads errnos).
        self.append(&bytes).map_err(|e| {
            let log = log_path(&self.out, self.shard);
            io::Error::other(format!("commit log {}: announcing {names:?}: {e}", log.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_and_corrupt_tails_end_the_log() {
        let mut bytes = Vec::new();
        let mut e = Enc(Vec::new());
        e.u64(7).u16(1).u64(1).u16(1).path("s/g000001-c000-000000.log").u64(100);
        record(COMMIT, &e.0, &mut bytes);
        let good = bytes.len();
        record(COMMIT, &e.0, &mut bytes);
        let mut s = LogState::default();
        assert_eq!(s.apply(&bytes[..bytes.len() - 3]), Some(good));
        assert!(s.windows[&(7, 1)].contains(1));
        assert_eq!(s.marks["s/g000001-c000-000000.log"], 100);
        bytes[good + 12] ^= 1;
        let mut s = LogState::default();
        assert_eq!(s.apply(&bytes), Some(good));
    }

    #[test]
    fn an_intent_starts_its_name_over_and_only_logs_of_format_2_have_intents() {
        use crate::receiver::output::Intents;
        let dir = tempfile::tempdir().unwrap();
        let modes = crate::os::Modes::DEFAULT;
        fs::create_dir_all(state_dir(dir.path())).unwrap();
        let mut log = CommitLog::create(dir.path(), 0, true, modes).unwrap();
        let (f, g) = ("s/g000001-c000-000000.log", "t/g000001-c000-000000.log");
        log.commit((7, 0), 1, &[(f, 100)]).unwrap();
        // Retention removed `f`; its stream, written again, makes a new file of that name.
        log.intend(&[f, g]).unwrap();
        log.commit((7, 0), 2, &[(f, 10)]).unwrap();
        let bytes = fs::read(log_path(dir.path(), 0)).unwrap();
        let mut s = LogState::default();
        assert_eq!(s.apply(&bytes), None);
        assert_eq!(s.marks, HashMap::from([(f.to_string(), 10)]), "100 was the old file's");
        let announced = HashSet::from([f.to_string(), g.to_string()]);
        assert_eq!((s.format, s.intents()), (LOG_FORMAT, Some(&announced)));
        // A log of format 1 (no `Version` record): no intents, whatever it holds.
        let mut old = CommitLog::create_format_1(dir.path(), 1).unwrap();
        old.commit((7, 1), 1, &[(f, 5)]).unwrap();
        let mut s = LogState::default();
        assert_eq!(s.apply(&fs::read(log_path(dir.path(), 1)).unwrap()), None);
        assert_eq!((s.format, s.intents()), (0, None));
        // A compacted log keeps its format and drops its intents.
        log.compact(std::iter::empty(), &[(g, 3)]).unwrap();
        let mut s = LogState::default();
        assert_eq!(s.apply(&fs::read(log_path(dir.path(), 0)).unwrap()), None);
        assert_eq!(s.intents(), Some(&HashSet::new()));
        assert_eq!(s.marks, HashMap::from([(g.to_string(), 3)]));
    }

    // Regression: the windows of runs that ended stayed in .state/base forever.
    #[test]
    fn windows_idle_past_the_ttl_are_forgotten_at_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_s();
        let mut bytes = Vec::new();
        record(GEN, &1u64.to_le_bytes(), &mut bytes);
        let at = |t: u64| Window { below: 5, written_unix_s: t, ..Default::default() };
        window_record((1, 0), &at(now - 1000), &mut bytes);
        window_record((2, 0), &at(now - 10), &mut bytes);
        // A `Window` record of an older version carries no time: it counts as written now.
        let mut e = Enc(Vec::new());
        e.u64(3).u16(0).u64(9).u32(0);
        record(WINDOW, &e.0, &mut bytes);
        fs::create_dir_all(state_dir(dir.path())).unwrap();
        fs::write(state_dir(dir.path()).join("base"), &bytes).unwrap();
        // Stream 1 was also written in the generation being recovered.
        let modes = crate::os::Modes::DEFAULT;
        let mut log = CommitLog::create(dir.path(), 0, false, modes).unwrap();
        log.commit((4, 0), 1, &[]).unwrap();
        let state = recover(dir.path(), 100, modes, |_| Ok(())).unwrap();
        let mut ids: Vec<_> = state.windows.keys().copied().collect();
        ids.sort();
        assert_eq!(ids, vec![(2, 0), (3, 0), (4, 0)], "stream 1 idle 1000 s > 100 s");
        assert_eq!(state.windows[&(2, 0)].written_unix_s, now - 10);
        assert!(state.windows[&(3, 0)].written_unix_s >= now);
        assert!(state.windows[&(4, 0)].contains(1));
        // The new base keeps the times: a second recovery agrees.
        let again = recover(dir.path(), 100, modes, |_| Ok(())).unwrap();
        assert_eq!(again.windows[&(2, 0)].written_unix_s, now - 10);
        assert_eq!(again.gen, state.gen + 1);
    }
}
