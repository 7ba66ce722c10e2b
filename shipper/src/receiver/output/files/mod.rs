//! The files output: one directory per stream (cfjs1 `format`, or service), one record per
//! line in the output's `format` ([`format`]: raw, JSON, RFC 5424, cfjs1), rotated by size and
//! age, rotated files compressed and removed past the retention limits by a thread of its own
//! ([`janitor`]). It can cut back whatever it wrote, so nothing is written twice.
//!
//! # Design constraints
//! - A shard owns its files (`STREAM/gGEN-cSHARD-INDEX.log`), so no two threads append to
//!   one file. Records of frames flagged dead-letter go to `STREAM@dead_letter`.
//! - At most `streams_max` live streams per shard: a stream is live from its first record
//!   until `streams_idle_s` pass without one; then it is forgotten (its file closed and handed
//!   to the janitor as a rotated one, its place freed), looked for once a second at most, on
//!   a frame or on the writer's idle tick. Records of a stream that is not live go to
//!   `_other` (counted, `records_folded`) only while `streams_max` streams are all live: a
//!   burst of more than `streams_max` streams written within `streams_idle_s` of each other.
//!   `_other` stays for that burst rather than forgetting busy streams to make room: each
//!   stream costs a directory and a file, and a sender inventing keys (request ids as
//!   `service`) would otherwise create them as fast as it sends, each new file with an
//!   fdatasync'd intent; bounded, it creates at most `streams_max` per `streams_idle_s`.
//! - A stream written again after it was forgotten starts a new file, numbered one past the
//!   highest of its (stream, generation, shard) on disk (`.log` or `.log.zst`): never appends
//!   to, nor replaces, its last one, which the janitor may be compressing. Finding it is one
//!   read of the stream's directory, paid only when a stream that is not live is written.
//! - At most `files_open_max` stream files open per shard. Writing to a stream whose file is
//!   closed, with that many open, first closes the least recently written one (fdatasync'd
//!   first when the frame being written touched it); the closed stream's next write opens its
//!   current file again and appends to it: no new file, no new name. Finding the least recent
//!   is a scan over the shard's streams (at most `streams_max` + 2), paid only when a file is
//!   opened, next to the cost of the open(2) itself.
//! - Recovery cuts a stream's newest file back to the end the commit log names, and removes
//!   or cuts one the log does not name only when an intent announced it. So: every file is
//!   announced ([`Intents`], an fdatasync'd record of the commit log) before it is created:
//!   a stream's first, its next at rotation, its first after it was forgotten (one record for
//!   every file a frame creates; rare next to frames). [`Output::checkpoint`] gives commit-log
//!   compaction every live stream's current file and end, open or closed (at most
//!   `streams_max` + 2), and the intents are dropped: a forgotten stream's last file, never
//!   written again and all of it committed, is then named by nothing and left whole.
//! - A stream name is at most [`STREAM_NAME_BYTES_MAX`] (200) bytes, so that with the longest
//!   suffix appended (`@dead_letter`, 12 bytes) it stays under the 255 bytes a file name may
//!   have, with room to spare. It is the key with every byte outside `[A-Za-z0-9._-]` replaced
//!   by `_`, and `_` put before a name that is empty or starts with `.`. A longer name keeps
//!   its first 183 bytes and gets `~` and the 16 hex digits of [`fnv1a64`] of the whole key:
//!   keys that differ only past the cut stay in different streams, and `~` never occurs in
//!   a name that was not shortened, so the two kinds never meet. Each stream created under a
//!   shortened name is counted (`names_shortened`).
//! - Only the newest file of a (stream, shard) can hold uncommitted bytes: files rotate
//!   between groups of frames (a file may pass `file_bytes_max` by what one group wrote to
//!   it), a stream is forgotten only between groups, and a failed write is cut back before the
//!   shard goes on.
//!
//! # Format
//! ```text
//! DIRECTORY/STREAM/gGEN-cSHARD-INDEX.log             records of stream STREAM
//! DIRECTORY/STREAM@dead_letter/gGEN-cSHARD-INDEX.log records of dead-lettered frames
//! STREAM = sanitised key                            when it has at most 200 bytes
//!        | sanitised key[..183] '~' hex16(fnv1a64(key))   otherwise (200 bytes)
//! INDEX  = 0 | previous INDEX + 1 (rotation) | highest on disk + 1 (written again)
//! Mark   = (STREAM/gGEN-cSHARD-INDEX.log, end in bytes)   per file a frame touched
//! Intent = STREAM/gGEN-cSHARD-INDEX.log                   per file a frame creates
//! ```
//!
//! # Operation
//! [`Output::write`] first forgets the idle streams (once a second at most), then groups a
//! frame's records by stream, announces the files the groups will create (one intent record
//! for all of them, before any is created), and appends each group with one write (opening
//! the stream's file first if it was closed, closing the least recently written one if
//! `files_open_max` are open); on any failure it cuts every touched file back to where it was
//! (a file closed meanwhile is opened for the cut alone), so a frame is in the output
//! entirely or not at all. [`Output::marks`] names each touched file and its new end for the
//! frame's commit record; [`Output::undo`] cuts them back to before the frame. Per group,
//! [`Output::sync`] fdatasyncs every file the group touched (with `fsync` on), and
//! [`Output::discard`] cuts each back to its size before the group. [`Output::tick`] forgets
//! idle streams while no frame comes. At start, [`recover`] cuts the newest file of each
//! (stream, shard) of the generation that was running back to its committed end, removing it
//! when nothing in it was committed; one the log neither names nor announced is a forgotten
//! stream's finished file and stays whole (logs without intents, of an older version, name
//! every current file: there a file not named is removed, as it always was).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub mod format;
pub mod janitor;

use super::{Intents, Kind, Mark, Output, Records, Select, WriteError, Written};
use crate::config::receiver::OutputSection;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::OutputCounters;
use crate::receiver::commit::LogState;

/// The files output as [`super::KINDS`] lists it.
pub const KIND: Kind = Kind { recover, open };

pub const OTHER_STREAM: &str = "_other";
pub const OTHER_STREAM_DEAD_LETTER: &str = "_other@dead_letter";
const _: () =
    assert!(OTHER_STREAM_DEAD_LETTER.len() == OTHER_STREAM.len() + DEAD_LETTER_SUFFIX.len());
/// Capacity the per-stream grouping buffers keep between frames, all together.
const GROUP_KEEP_BYTES_MAX: usize = 4 << 20;

struct StreamFile {
    /// Its current file, relative to the output directory.
    rel: String,
    /// What the commit log names it: [`Files::prefix`] and `rel`.
    mark: String,
    /// Open while among the `files_open_max` most recently written; closed otherwise, and
    /// opened again (same name, appending) by the next write.
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    index: u64,
    /// [`Files::clock`] at its last write: the least recent is closed first.
    used: u64,
    /// When it was created, in seconds since the Unix epoch (for `file_age_max_s`).
    created_s: u64,
    /// When the stream was last written, in seconds since the Unix epoch (for
    /// `streams_idle_s`).
    written_s: u64,
    /// Its size before the group of frames being written first touched it, until the group
    /// is committed: such a file is not rotated (it would hold uncommitted bytes).
    group_before: Option<u64>,
    /// Written since its last fdatasync (with `fsync` on).
    unsynced: bool,
}

/// A file the frame written last touched.
struct Touched {
    /// Its [`StreamFile::mark`].
    mark: String,
    /// Its size before the frame, and after.
    before: u64,
    after: u64,
}

/// A shard's stream files.
pub struct Files {
    name: String,
    /// Before a file's name in its marks: "" for the output named `files` (as before several
    /// outputs), `file:NAME:` for the others.
    prefix: String,
    select: Select,
    dir: PathBuf,
    gen: u64,
    shard: usize,
    file_bytes_max: u64,
    fsync: bool,
    streams_max: usize,
    /// A stream not written for this long is forgotten (`streams_idle_s`; 0: never).
    streams_idle_s: u64,
    /// [`Files::now_s`] when the streams were last looked at for idle ones.
    swept_s: u64,
    files_open_max: usize,
    /// Modes of the stream files and directories created (`output.file_mode`, `dir_mode`).
    modes: crate::os::Modes,
    /// Every live stream of this shard (written within `streams_idle_s`) and its current
    /// file, open or closed.
    streams: HashMap<String, StreamFile>,
    names: HashMap<Vec<u8>, String>,
    names_dead_letter: HashMap<Vec<u8>, String>,
    /// Stream files open now, at most `files_open_max`.
    files_open: usize,
    /// Counts appends; orders the streams by their last write.
    clock: u64,
    /// Records written to `_other` because `streams_max` streams were live.
    pub records_folded: u64,
    /// Streams created under a shortened name (a key too long for a file name).
    pub names_shortened: u64,
    /// Files closed to make room for another (the least recently written first).
    pub files_closed: u64,
    /// The most stream files open at once.
    pub files_open_peak: usize,
    /// Files rotated (by size or age).
    pub rotations: u64,
    /// Streams forgotten after `streams_idle_s` without a record.
    pub streams_forgotten: u64,
    groups: Vec<(String, Vec<u8>)>,
    /// The files the frame being written creates, announced: (stream, index).
    created: Vec<(String, u64)>,
    /// The files the frame written last touched, until the next frame.
    touched: Vec<Touched>,
    /// The streams the group being written touched (each with its `group_before`).
    group: Vec<String>,
    /// How records are written (`format`).
    format: format::LineFormat,
    /// A file is rotated at its next write once this old (`file_age_max_s`; 0: never).
    file_age_max_s: u64,
    /// Seconds since the Unix epoch, as of the frame being written.
    now_s: u64,
    /// Compresses and removes rotated files, when the config asks for either.
    janitor: Option<janitor::Janitor>,
}

/// The longest stream name, in bytes: 255 (`NAME_MAX`) less the `@dead_letter` suffix (12)
/// leaves 243; 200 keeps room for a suffix added later (a rotation or compression mark).
pub const STREAM_NAME_BYTES_MAX: usize = 200;
/// What marks a shortened name; never produced by sanitising, so never in a name kept whole.
const SHORTENED_MARK: char = '~';
/// Bytes of a shortened name kept from the sanitised key: the rest is the mark and 16 digits.
const SHORTENED_PREFIX_BYTES: usize = STREAM_NAME_BYTES_MAX - 1 - 16;
const DEAD_LETTER_SUFFIX: &str = "@dead_letter";
const _: () = assert!(STREAM_NAME_BYTES_MAX + DEAD_LETTER_SUFFIX.len() <= 255);

/// FNV-1a, 64 bits, of `bytes`. Stable across versions and machines (it names directories on
/// disk: changing it would split every shortened stream in two); not a defence against
/// chosen collisions, which cost a hostile sender nothing but sharing a stream with itself.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Maps a record key to a safe directory name of at most [`STREAM_NAME_BYTES_MAX`] bytes;
/// the flag says whether it had to be shortened.
pub fn stream_name(key: &[u8]) -> (String, bool) {
    let mut s = String::with_capacity(key.len() + 1);
    if key.first().is_none_or(|&b| b == b'.') {
        s.push('_');
    }
    s.extend(key.iter().map(|&b| match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => b as char,
        _ => '_',
    }));
    if s.len() <= STREAM_NAME_BYTES_MAX {
        return (s, false);
    }
    // Every byte is ASCII, so any cut is a character boundary.
    s.truncate(SHORTENED_PREFIX_BYTES);
    s.push(SHORTENED_MARK);
    s.push_str(&format!("{:016x}", fnv1a64(key)));
    debug_assert_eq!(s.len(), STREAM_NAME_BYTES_MAX, "shortened stream name");
    (s, true)
}

/// Opens shard `shard`'s files outputs ([`Kind::open`]).
fn open(config: &ReceiverConfig, gen: u64, shard: usize) -> Vec<Box<dyn Output>> {
    let workers = config.receiver.workers;
    let open = |o| {
        let files = Files::new(o, gen, shard).with_janitor(o, workers);
        Box::new(files.expect("a thread for the janitor")) as Box<dyn Output>
    };
    config.file_outputs().map(open).collect()
}

/// The prefix of the marks of the files output named `name`.
pub fn mark_prefix(name: &str) -> String {
    if name == "files" {
        String::new()
    } else {
        format!("file:{name}:")
    }
}

/// Cuts the files of the generation the logs name of every files output back to their
/// committed ends ([`Kind::recover`]), each output reading the marks and intents with its
/// prefix.
fn recover(config: &ReceiverConfig, log: &LogState) -> io::Result<()> {
    for o in config.file_outputs() {
        let modes = o.modes();
        modes.create_dir_all(&o.directory)?;
        let prefix = mark_prefix(&o.name);
        let strip = |m: &String| Some(m.strip_prefix(prefix.as_str())?.to_string());
        let ends: HashMap<String, u64> =
            log.marks.iter().filter_map(|(m, &end)| Some((strip(m)?, end))).collect();
        let announced: Option<HashSet<String>> =
            log.intents().map(|i| i.iter().filter_map(strip).collect());
        cut_uncommitted(&o.directory, log.gen, &ends, announced.as_ref())?;
    }
    Ok(())
}

/// Name of an output file, relative to the output directory.
pub fn file_name(stream: &str, gen: u64, shard: usize, index: u64) -> String {
    format!("{stream}/g{gen:06}-c{shard:03}-{index:06}.log")
}

/// Parses `gGEN-cSHARD-INDEX.log`.
fn parse_file_name(name: &str) -> Option<(u64, usize, u64)> {
    let rest = name.strip_prefix('g')?.strip_suffix(".log")?;
    let mut parts = rest.split('-');
    let gen = parts.next()?.parse().ok()?;
    let shard = parts.next()?.strip_prefix('c')?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((gen, shard, index))
}

/// Cuts the newest file of each (stream, shard) of generation `gen` in `out` back to its
/// committed end in `ends`, removing it when that is 0. One that `ends` does not name is
/// removed when `announced` names it (created, never committed) or is `None` (logs of format
/// 1, which name every stream's current file); else it is the last file of a stream forgotten
/// before the log was compacted, finished and all of it committed, and stays whole.
pub fn cut_uncommitted(
    out: &Path,
    gen: u64,
    ends: &HashMap<String, u64>,
    announced: Option<&HashSet<String>>,
) -> io::Result<()> {
    for ((stream, _), (_, name)) in newest_files(out, gen)? {
        let rel = format!("{stream}/{name}");
        let path = out.join(&rel);
        let end = match ends.get(&rel) {
            Some(&end) => end,
            None if announced.is_some_and(|a| !a.contains(&rel)) => continue,
            None => 0,
        };
        let len = fs::metadata(&path)?.len();
        if end == 0 {
            tracing::info!(file = %rel, bytes = len, "removing output file with no committed frame");
            fs::remove_file(&path)?;
        } else if len > end {
            tracing::info!(file = %rel, cut = len - end, "cutting uncommitted tail");
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(end)?;
            f.sync_all()?;
        }
    }
    Ok(())
}

/// The newest file (index, name) of each (stream, shard) of generation `gen` in `out`.
fn newest_files(out: &Path, gen: u64) -> io::Result<HashMap<(String, usize), (u64, String)>> {
    let mut newest: HashMap<(String, usize), (u64, String)> = HashMap::new();
    for entry in fs::read_dir(out)? {
        let entry = entry?;
        let stream = entry.file_name().to_string_lossy().into_owned();
        if stream.starts_with('.') || !entry.file_type()?.is_dir() {
            continue;
        }
        for f in fs::read_dir(entry.path())? {
            let name = f?.file_name().to_string_lossy().into_owned();
            let Some((g, shard, index)) = parse_file_name(&name) else {
                continue;
            };
            if g != gen {
                continue;
            }
            let slot = newest.entry((stream.clone(), shard)).or_insert((index, name.clone()));
            if index >= slot.0 {
                *slot = (index, name);
            }
        }
    }
    Ok(newest)
}

/// Whether an error says the frame can never be written, whatever is retried: a name the
/// filesystem refuses, or content that is not what the output takes. Everything else
/// (ENOSPC, EIO, EDQUOT, ...) may pass, and is answered as "try again later".
fn never_writable(e: &io::Error) -> bool {
    let refused = [libc::ENAMETOOLONG, libc::EINVAL, libc::EILSEQ, libc::ENOTDIR, libc::EISDIR];
    e.kind() == io::ErrorKind::InvalidData || e.raw_os_error().is_some_and(|n| refused.contains(&n))
}

impl Output for Files {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(
        &mut self,
        records: &Records,
        intents: &mut dyn Intents,
    ) -> Result<Written, WriteError> {
        self.append_frame(records, intents).map_err(|e| {
            if never_writable(&e) {
                WriteError::Refused(e)
            } else {
                WriteError::Failed(e)
            }
        })
    }

    /// fdatasyncs the files the group touched (with `fsync` on); one closed since was synced
    /// as it closed.
    fn sync(&mut self) -> io::Result<()> {
        for name in &self.group {
            let s = self.streams.get_mut(name).expect("written");
            if s.group_before.is_none() {
                continue;
            }
            if let (true, Some(file)) = (self.fsync, &s.file) {
                file.sync_data()?;
            }
            s.unsynced = false;
        }
        Ok(())
    }

    /// Forgets where the group's files were before it: they are not rotated nor cut back.
    fn committed(&mut self) {
        for name in self.group.drain(..) {
            self.streams.get_mut(&name).expect("written").group_before = None;
        }
    }

    /// Cuts the files the frame touched back to their size before it.
    fn undo(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        self.cut_back(&touched);
        for t in &touched {
            let s = self.streams.values_mut().find(|s| s.mark == t.mark).expect("written");
            if s.group_before == Some(t.before) {
                s.group_before = None;
            }
        }
    }

    /// Cuts every file the group touched back to its size before the group.
    fn discard(&mut self) {
        self.touched.clear();
        let mut back = Vec::new();
        for name in std::mem::take(&mut self.group) {
            let s = self.streams.get_mut(&name).expect("written");
            if let Some(before) = s.group_before.take() {
                back.push(Touched { mark: s.mark.clone(), before, after: s.size });
            }
        }
        self.cut_back(&back);
    }

    fn marks<'a>(&'a self, marks: &mut Vec<Mark<'a>>) {
        marks.extend(self.touched.iter().map(|t| (t.mark.as_str(), t.after)));
    }

    /// The current file of every live stream, open or closed, and its end (at most
    /// `streams_max` + 2): recovery cuts each stream's newest file back to the end the log
    /// names (and removes it when that is 0). A forgotten stream's last file is not named: it
    /// is never written again, and recovery leaves whole a file the log neither names nor
    /// announced.
    fn checkpoint<'a>(&'a self, marks: &mut Vec<Mark<'a>>) {
        marks.extend(self.streams.values().map(|s| (s.mark.as_str(), s.size)));
    }

    /// Forgets the streams idle for `streams_idle_s` while no frame comes.
    fn tick(&mut self) {
        self.now_s = crate::clock::unix_us() / 1_000_000;
        self.forget_idle();
    }

    fn report(&self, counters: &mut OutputCounters) {
        let f = &mut counters.files;
        f.streams_open = self.streams_open() as u64;
        f.files_open = self.files_open() as u64;
        f.files_open_peak = self.files_open_peak as u64;
        f.files_closed = self.files_closed;
        f.records_folded = self.records_folded;
        f.stream_names_shortened = self.names_shortened;
        f.rotations = self.rotations;
        f.streams_forgotten = self.streams_forgotten;
        if let Some(j) = &self.janitor {
            use std::sync::atomic::Ordering::Relaxed;
            f.files_compressed = j.figures.compressed.load(Relaxed);
            f.files_removed = j.figures.removed.load(Relaxed);
            f.janitor_errors = j.figures.errors.load(Relaxed);
            f.rotated_bytes = j.figures.bytes_kept.load(Relaxed);
        }
    }
}

impl Files {
    /// The files of shard `shard` in generation `gen`, as `[output]` (or `[[outputs.file]]`)
    /// says.
    pub fn new(config: &OutputSection, gen: u64, shard: usize) -> Files {
        Files {
            name: config.name.clone(),
            prefix: mark_prefix(&config.name),
            select: Select::new(&config.streams, &config.exclude_streams),
            dir: config.directory.clone(),
            gen,
            shard,
            file_bytes_max: config.file_bytes_max,
            fsync: config.fsync,
            streams_max: config.streams_max,
            streams_idle_s: config.streams_idle_s,
            swept_s: 0,
            files_open_max: config.files_open_max,
            modes: config.modes(),
            streams: HashMap::new(),
            names: HashMap::new(),
            names_dead_letter: HashMap::new(),
            files_open: 0,
            clock: 0,
            records_folded: 0,
            names_shortened: 0,
            files_closed: 0,
            files_open_peak: 0,
            rotations: 0,
            streams_forgotten: 0,
            groups: Vec::new(),
            created: Vec::new(),
            touched: Vec::new(),
            group: Vec::new(),
            format: format::LineFormat::new(config.format),
            file_age_max_s: config.file_age_max_s,
            now_s: 0,
            janitor: None,
        }
    }

    /// Starts the janitor of this shard's files (`compress_rotated`, `retention_*`), if the
    /// config asks for one; `workers` shards share `retention_bytes_max`.
    pub fn with_janitor(mut self, config: &OutputSection, workers: usize) -> io::Result<Files> {
        let policy = janitor::Policy {
            dir: self.dir.clone(),
            shard: self.shard,
            workers,
            gen: self.gen,
            compress: config.compress_rotated,
            bytes_max: config.retention_bytes_max / workers as u64,
            age_max_s: config.retention_age_s,
        };
        if policy.needed() {
            self.janitor = Some(janitor::Janitor::start(policy)?);
        }
        Ok(self)
    }

    /// Live streams of this shard, each with a current file (open or closed).
    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// Stream files open now.
    pub fn files_open(&self) -> usize {
        self.files_open
    }

    /// The stream of records with `key`; with `streams_max` streams live (none idle for
    /// `streams_idle_s`, see [`Files::forget_idle`]), `_other` (counted).
    /// Dead-lettered records go to `STREAM@dead_letter` (`@` never occurs in a stream name).
    fn stream_for(&mut self, key: &[u8], dead_letter: bool) -> &str {
        let names = if dead_letter { &mut self.names_dead_letter } else { &mut self.names };
        if !names.contains_key(key) {
            if self.names.len() + self.names_dead_letter.len() >= self.streams_max {
                self.records_folded += 1;
                return if dead_letter { OTHER_STREAM_DEAD_LETTER } else { OTHER_STREAM };
            }
            let names = if dead_letter { &mut self.names_dead_letter } else { &mut self.names };
            let (name, shortened) = stream_name(key);
            self.names_shortened += u64::from(shortened);
            names.insert(
                key.to_vec(),
                if dead_letter { format!("{name}{DEAD_LETTER_SUFFIX}") } else { name },
            );
        }
        let names = if dead_letter { &self.names_dead_letter } else { &self.names };
        &names[key]
    }

    /// Writes every record of a validated frame that the output selects, grouped by stream;
    /// returns the records and bytes. On failure, every file it touched is cut back.
    fn append_frame(
        &mut self,
        records: &Records,
        intents: &mut dyn Intents,
    ) -> io::Result<Written> {
        self.touched.clear();
        let now_us = crate::clock::unix_us();
        self.now_s = now_us / 1_000_000;
        // Before routing: a stream forgotten makes room for one of this frame.
        self.forget_idle();
        let mut groups = std::mem::take(&mut self.groups);
        let result = self.group_frame(records, now_us, &mut groups).and_then(|taken| {
            self.announce(&groups, intents)?;
            Ok(Written { records: taken, bytes: self.append_groups(&groups)? })
        });
        // Keep the buffers for the next frame, but not a large frame's worth of them: at most
        // GROUP_KEEP_BYTES_MAX over all the streams, however many there are.
        let mut kept = 0;
        for g in &mut groups {
            if kept + g.1.capacity() > GROUP_KEEP_BYTES_MAX {
                g.1 = Vec::new();
            }
            kept += g.1.capacity();
        }
        self.groups = groups;
        result
    }

    /// Formats the records of a frame that the output selects into `groups`, one per stream;
    /// returns how many it took.
    fn group_frame(
        &mut self,
        records: &Records,
        now_us: u64,
        groups: &mut Vec<(String, Vec<u8>)>,
    ) -> io::Result<u64> {
        for g in groups.iter_mut() {
            g.1.clear();
        }
        let mut taken = 0;
        self.format.frame(records.sender, now_us);
        for rec in records.iter() {
            let (key, body) = rec.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if !self.select.takes(key) {
                continue;
            }
            taken += 1;
            let name = self.stream_for(key, records.dead_letter);
            let slot = match groups.iter().position(|g| g.0 == name) {
                Some(i) => i,
                None => {
                    groups.push((name.to_string(), Vec::new()));
                    groups.len() - 1
                }
            };
            self.format.line(key, body, &mut groups[slot].1);
        }
        Ok(taken)
    }

    /// Announces to `intents` the files this frame's groups will create (a new stream's
    /// first, a full or old file's next, a forgotten stream's first since), before any is
    /// created; keeps their indexes in `created` for [`Files::append`].
    fn announce(
        &mut self,
        groups: &[(String, Vec<u8>)],
        intents: &mut dyn Intents,
    ) -> io::Result<()> {
        self.created.clear();
        for (name, _) in groups.iter().filter(|g| !g.1.is_empty()) {
            let index = match self.streams.get(name) {
                Some(s) if !self.needs_file(s) => continue,
                Some(s) => s.index + 1,
                None => self.next_index(name)?,
            };
            self.created.push((name.clone(), index));
        }
        if self.created.is_empty() {
            return Ok(());
        }
        let (prefix, gen, shard) = (&self.prefix, self.gen, self.shard);
        let marks: Vec<String> = (self.created.iter())
            .map(|(name, index)| format!("{prefix}{}", file_name(name, gen, shard, *index)))
            .collect();
        intents.intend(&marks.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The index of a new first file of stream `name`: one past the highest of this
    /// generation and shard on disk (`.log` or `.log.zst`), so that a stream written again
    /// after it was forgotten never appends to, nor replaces, a file of before; else 0.
    fn next_index(&self, name: &str) -> io::Result<u64> {
        let entries = match fs::read_dir(self.dir.join(name)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut next = 0;
        for entry in entries {
            let file = entry?.file_name();
            let file = file.to_string_lossy();
            let base = file.strip_suffix(janitor::COMPRESSED_SUFFIX).unwrap_or(&file);
            match parse_file_name(base) {
                Some((g, shard, index)) if (g, shard) == (self.gen, self.shard) => {
                    next = next.max(index + 1);
                }
                _ => {}
            }
        }
        Ok(next)
    }

    /// Forgets the streams not written for `streams_idle_s` (looked for once a second at
    /// most, and only between groups: nothing written is uncommitted): each file is closed
    /// and handed to the janitor as a rotated one, and the stream's place is free for
    /// another. Written again, a stream starts a new file ([`Files::next_index`]): its last
    /// one is never written again, so recovery leaves it whole once no log names it.
    fn forget_idle(&mut self) {
        if self.streams_idle_s == 0 || self.now_s == self.swept_s || !self.group.is_empty() {
            return;
        }
        self.swept_s = self.now_s;
        let (now_s, idle_s) = (self.now_s, self.streams_idle_s);
        let before = self.streams.len();
        let (dir, janitor, files_open) = (&self.dir, &self.janitor, &mut self.files_open);
        self.streams.retain(|_, s| {
            debug_assert!(s.group_before.is_none(), "forgetting in the middle of a group");
            if now_s.saturating_sub(s.written_s) < idle_s {
                return true;
            }
            if s.file.take().is_some() {
                *files_open -= 1;
            }
            if let Some(j) = janitor {
                j.rotated(dir.join(&s.rel));
            }
            false
        });
        let forgotten = before - self.streams.len();
        if forgotten > 0 {
            self.streams_forgotten += forgotten as u64;
            // Keys of the streams forgotten (and of any whose first write failed).
            // And their group buffers: one per stream name ever routed otherwise, without bound
            // once streams are forgotten, each frame's routing scanning them all.
            let streams = &self.streams;
            self.names.retain(|_, name| streams.contains_key(name));
            self.names_dead_letter.retain(|_, name| streams.contains_key(name));
            self.groups.retain(|(name, _)| streams.contains_key(name));
        }
    }

    fn append_groups(&mut self, groups: &[(String, Vec<u8>)]) -> io::Result<u64> {
        let mut bytes = 0;
        for (name, data) in groups.iter().filter(|g| !g.1.is_empty()) {
            match self.append(name, data) {
                Ok(touched) => {
                    self.touched.push(touched);
                    bytes += data.len() as u64;
                }
                Err(e) => {
                    self.undo();
                    return Err(e);
                }
            }
        }
        Ok(bytes)
    }

    /// Appends to stream `name`: starts its next file first if its file is full, opens its
    /// file again if it was closed to make room.
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<Touched> {
        self.clock += 1;
        // `announce` decided which streams start a file; the others go on with theirs.
        match self.created.iter().find(|c| c.0 == name).map(|c| c.1) {
            Some(index) => self.rotate(name, index)?,
            None if self.streams.get(name).is_some_and(|s| s.file.is_none()) => {
                self.reopen(name)?
            }
            None => {}
        }
        let s = self.streams.get_mut(name).expect("opened above");
        s.used = self.clock;
        s.written_s = self.now_s;
        let before = s.size;
        let file = s.file.as_mut().expect("opened above");
        if let Err(e) = file.write_all(data) {
            let _ = file.set_len(before);
            return Err(e);
        }
        if s.group_before.is_none() {
            s.group_before = Some(before);
            self.group.push(name.to_string());
        }
        s.size += data.len() as u64;
        s.unsynced = self.fsync;
        Ok(Touched { mark: s.mark.clone(), before, after: s.size })
    }
    /// Whether stream `s` starts a new file before its next write: its file is due and holds
    /// nothing of the group being written (or it would hold uncommitted bytes when rotated).
    fn needs_file(&self, s: &StreamFile) -> bool {
        s.group_before.is_none() && self.due(s)
    }

    /// Whether stream file `s` is to be rotated before its next write: full, or old.
    fn due(&self, s: &StreamFile) -> bool {
        let age_s = self.now_s.saturating_sub(s.created_s);
        s.size >= self.file_bytes_max || (self.file_age_max_s > 0 && age_s >= self.file_age_max_s)
    }

    /// Starts stream `name`'s file number `index` (announced): its next, or its first for a
    /// stream not live. The full file is closed first: it holds nothing of the group being
    /// written (see `group_before`), and anything before is synced.
    fn rotate(&mut self, name: &str, index: u64) -> io::Result<()> {
        if let Some(s) = self.streams.get_mut(name) {
            if s.file.take().is_some() {
                self.files_open -= 1;
            }
            if let Some(j) = &self.janitor {
                j.rotated(self.dir.join(&s.rel));
            }
            self.rotations += 1;
        }
        let rel = file_name(name, self.gen, self.shard, index);
        let path = self.dir.join(&rel);
        self.modes.create_dir_all(path.parent().expect("stream dir"))?;
        let file = self.open(&path)?;
        let size = file.metadata()?.len();
        let mark = format!("{}{rel}", self.prefix);
        let s = StreamFile {
            rel,
            mark,
            file: Some(file),
            size,
            index,
            used: 0,
            unsynced: false,
            group_before: None,
            created_s: self.now_s,
            written_s: self.now_s,
        };
        self.streams.insert(name.to_string(), s);
        Ok(())
    }

    /// Opens the current file of stream `name` again, to append to it.
    fn reopen(&mut self, name: &str) -> io::Result<()> {
        let path = self.dir.join(&self.streams[name].rel);
        let file = self.open(&path)?;
        let len = file.metadata()?.len();
        let s = self.streams.get_mut(name).expect("a known stream");
        if len != s.size {
            // Not ours to explain (cut or removed by hand): append after what is there.
            let (rel, size) = (&s.rel, s.size);
            tracing::warn!(file = %rel, bytes = len, written = size, "stream file changed while closed");
            s.size = len;
        }
        s.file = Some(file);
        Ok(())
    }

    /// Opens `path` for appending; with `files_open_max` files open, closes the least
    /// recently written one first.
    fn open(&mut self, path: &Path) -> io::Result<File> {
        if self.files_open >= self.files_open_max {
            self.close_least_recent()?;
        }
        let file = self.modes.create_file().append(true).open(path)?;
        self.files_open += 1;
        self.files_open_peak = self.files_open_peak.max(self.files_open);
        Ok(file)
    }

    /// Closes the open file written longest ago, fdatasyncing it first if the frame being
    /// written touched it (its end is still committed by that frame).
    fn close_least_recent(&mut self) -> io::Result<()> {
        let open = self.streams.values_mut().filter(|s| s.file.is_some());
        let Some(s) = open.min_by_key(|s| s.used) else {
            return Ok(());
        };
        if s.unsynced {
            s.file.as_ref().expect("open").sync_data()?;
            s.unsynced = false;
        }
        s.file = None;
        self.files_open -= 1;
        self.files_closed += 1;
        Ok(())
    }

    /// Cuts the files of a frame that will not be committed back to their size before it.
    fn cut_back(&mut self, touched: &[Touched]) {
        for Touched { mark, before, .. } in touched {
            let Some(s) = self.streams.values_mut().find(|s| &s.mark == mark) else {
                continue;
            };
            let rel = &s.rel;
            let cut = match &s.file {
                Some(file) => file.set_len(*before),
                // Closed during this frame to make room: opened for the cut alone.
                None => OpenOptions::new()
                    .write(true)
                    .open(self.dir.join(rel))
                    .and_then(|f| f.set_len(*before)),
            };
            if let Err(e) = cut {
                panic!("cannot cut {rel} back to {before} bytes after a failed write: {e}; refusing to go on with a corrupt output");
            }
            s.size = *before;
        }
    }
}

#[cfg(test)]
impl Files {
    /// Writes a frame as a shard does (write, then sync, undone when the sync fails); returns
    /// the marks its commit record names and the bytes written.
    pub fn write_frame(
        &mut self,
        payload: &[u8],
        count: u32,
        dead_letter: bool,
    ) -> Result<(Vec<(String, u64)>, u64), WriteError> {
        let records = Records { payload, count, dead_letter, sender: "test" };
        let bytes = self.write(&records, &mut Vec::new())?.bytes;
        if let Err(e) = self.sync() {
            self.discard();
            return Err(WriteError::Failed(e));
        }
        self.committed();
        let mut marks = Vec::new();
        self.marks(&mut marks);
        Ok((marks.into_iter().map(|(rel, end)| (rel.to_string(), end)).collect(), bytes))
    }

    /// What [`Output::checkpoint`] gives, owned.
    pub fn current_files(&self) -> Vec<(String, u64)> {
        let mut marks = Vec::new();
        self.checkpoint(&mut marks);
        marks.into_iter().map(|(rel, end)| (rel.to_string(), end)).collect()
    }
}

/// An `[output]` section for tests: no fsync.
#[cfg(test)]
pub fn test_config(dir: &Path, file_bytes_max: u64, streams_max: usize) -> OutputSection {
    OutputSection {
        name: "files".into(),
        streams: Vec::new(),
        exclude_streams: Vec::new(),
        directory: dir.to_path_buf(),
        file_bytes_max,
        fsync: false,
        streams_max,
        files_open_max: 256,
        file_mode: "0640".into(),
        dir_mode: "0750".into(),
        format: Default::default(),
        file_age_max_s: 0,
        streams_idle_s: 0,
        compress_rotated: false,
        retention_bytes_max: 0,
        retention_age_s: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn stream_names_are_safe() {
        let name = |k: &[u8]| stream_name(k).0;
        assert_eq!(name(b"nginx_access"), "nginx_access");
        assert_eq!(name(b"../etc"), "_.._etc");
        assert_eq!(name(b"a/b c"), "a_b_c");
        assert_eq!(name(b""), "_");
        assert_eq!(name(b"."), "_.");
        assert_eq!(name(b".."), "_..");
        assert_eq!(name(".hidden".as_bytes()), "_.hidden");
        assert_eq!(name("é".as_bytes()), "__");
    }

    #[test]
    fn file_names_parse() {
        assert_eq!(parse_file_name("g000002-c001-000003.log"), Some((2, 1, 3)));
        assert_eq!(parse_file_name("g2-c1.log"), None);
    }

    #[test]
    fn fnv1a64_is_the_published_function() {
        // Reference values of FNV-1a 64: the hash names directories, it must never change.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn names_up_to_the_maximum_are_kept_whole() {
        let key = vec![b'k'; STREAM_NAME_BYTES_MAX];
        assert_eq!(stream_name(&key), (String::from_utf8(key.clone()).unwrap(), false));
        // With the `_` a leading dot gets, 199 bytes still fit, 200 do not.
        let mut dotted = vec![b'.'];
        dotted.extend(vec![b'k'; STREAM_NAME_BYTES_MAX - 2]);
        assert_eq!(stream_name(&dotted).0.len(), STREAM_NAME_BYTES_MAX);
        assert!(!stream_name(&dotted).1);
        dotted.push(b'k');
        assert!(stream_name(&dotted).1);
    }

    #[test]
    fn long_names_are_shortened_exactly() {
        // A 255-byte key starting with '.': once refused forever as `File name too long`.
        let mut key = vec![b'.'];
        key.extend(vec![b'x'; 254]);
        let (name, shortened) = stream_name(&key);
        assert!(shortened);
        let expect = format!("_.{}~{:016x}", "x".repeat(181), fnv1a64(&key));
        assert_eq!(name, expect);
        assert_eq!(name.len(), STREAM_NAME_BYTES_MAX);
        assert_eq!(fnv1a64(&key), 0xf2c9_3e21_5c7f_3b39, "stable across versions");
        // Non-ASCII: every byte becomes `_`, the hash is of the original bytes.
        let key = "é".repeat(120).into_bytes();
        let expect = format!("{}~{:016x}", "_".repeat(183), fnv1a64(&key));
        assert_eq!(stream_name(&key), (expect, true));
    }

    #[test]
    fn long_names_differing_only_at_the_end_stay_apart() {
        let a = [vec![b'a'; 250], b"-1".to_vec()].concat();
        let b = [vec![b'a'; 250], b"-2".to_vec()].concat();
        let c = [vec![b'a'; 250], b"/1".to_vec()].concat();
        let names: Vec<String> = [&a, &b, &c].iter().map(|k| stream_name(k).0).collect();
        assert_ne!(names[0], names[1]);
        assert_ne!(names[0], names[2], "sanitised alike, but the hash is of the key");
        assert_eq!(names[0][..183], names[1][..183]);
    }

    #[test]
    fn the_longest_name_makes_a_file_name_with_its_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Files::new(&test_config(dir.path(), 1 << 20, 8), 1, 0);
        let keys: [&[u8]; 3] = [&[b'.'; 255], &[0xff; 255], &[b'z'; 201]];
        let mut payload = Vec::new();
        for key in keys {
            crate::protocol::RecordWriter::push(&mut payload, key, b"x");
        }
        out.write_frame(&payload, 3, false).unwrap();
        out.write_frame(&payload, 3, true).unwrap();
        assert_eq!(out.names_shortened, 6, "three streams, each also as dead letter");
        let mut dirs: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect();
        dirs.sort();
        assert_eq!(dirs.len(), 6);
        for d in &dirs {
            assert!(d.len() <= STREAM_NAME_BYTES_MAX + DEAD_LETTER_SUFFIX.len(), "{d}");
        }
        let longest = dirs.iter().map(String::len).max().unwrap();
        assert_eq!(longest, STREAM_NAME_BYTES_MAX + DEAD_LETTER_SUFFIX.len());
        // The same key again creates nothing new, so counts nothing.
        out.write_frame(&payload, 3, false).unwrap();
        assert_eq!(out.names_shortened, 6);
    }
}

#[cfg(test)]
mod rotation_tests {
    use std::fs;

    use super::*;
    use crate::protocol::RecordWriter;

    #[test]
    fn rotates_between_frames_and_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Files::new(&test_config(dir.path(), 4096, 8), 3, 1);
        let body = [b'x'; 1000];
        for _ in 0..10 {
            let mut payload = Vec::new();
            for _ in 0..3 {
                RecordWriter::push(&mut payload, b"web", &body);
            }
            let (touched, bytes) = out.write_frame(&payload, 3, false).unwrap();
            assert_eq!(bytes, 3003);
            assert_eq!(touched.len(), 1);
        }
        let mut files: Vec<_> = fs::read_dir(dir.path().join("web")).unwrap().flatten().collect();
        files.sort_by_key(|f| f.file_name());
        let names: Vec<String> =
            files.iter().map(|f| f.file_name().into_string().unwrap()).collect();
        // 3003 bytes per frame, rotated once a file reaches 4096: two frames per file.
        assert_eq!(names, (0..5).map(|i| format!("g000003-c001-{i:06}.log")).collect::<Vec<_>>());
        let total: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
        assert_eq!(total, 30 * 1001);
    }

    #[test]
    fn streams_past_the_limit_fold_into_other_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Files::new(&test_config(dir.path(), 1 << 20, 2), 1, 0);
        let mut payload = Vec::new();
        for key in [&b"a"[..], b"b", b"c", b"d", b"a"] {
            RecordWriter::push(&mut payload, key, b"x");
        }
        out.write_frame(&payload, 5, false).unwrap();
        assert_eq!(out.records_folded, 2);
        let lines = |s: &str| {
            let f = dir.path().join(s).join("g000001-c000-000000.log");
            fs::read_to_string(f).unwrap().lines().count()
        };
        assert_eq!((lines("a"), lines("b"), lines(OTHER_STREAM)), (2, 1, 2));
    }
}

#[cfg(test)]
mod files_open_tests {
    use std::fs;

    use super::*;
    use crate::protocol::RecordWriter;
    use crate::receiver::commit::{self, CommitLog};

    /// One frame of one record per key, each body `key:n`.
    fn frame(keys: &[&str], n: usize) -> (Vec<u8>, u32) {
        let mut payload = Vec::new();
        for k in keys {
            RecordWriter::push(&mut payload, k.as_bytes(), format!("{k}:{n}").as_bytes());
        }
        (payload, keys.len() as u32)
    }

    fn output(dir: &Path, files_open_max: usize, fsync: bool) -> Files {
        let config = OutputSection { files_open_max, fsync, ..test_config(dir, 1 << 20, 16) };
        Files::new(&config, 1, 0)
    }

    /// Recovers `dir` as `shipper receive` does at start.
    fn recover(dir: &Path) -> commit::LogState {
        let cut = |log: &commit::LogState| cut_uncommitted(dir, log.gen, &log.marks, log.intents());
        commit::recover(dir, 3600, crate::os::Modes::DEFAULT, cut).unwrap()
    }

    fn open(out: &Files, stream: &str) -> bool {
        out.streams[stream].file.is_some()
    }

    #[test]
    fn the_least_recently_written_file_is_closed_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = output(dir.path(), 2, false);
        for (i, keys) in [["a"], ["b"], ["a"], ["c"]].iter().enumerate() {
            let (payload, count) = frame(keys, i);
            out.write_frame(&payload, count, false).unwrap();
        }
        // `a` was written after `b`: `b` made room for `c`.
        assert_eq!((open(&out, "a"), open(&out, "b"), open(&out, "c")), (true, false, true));
        assert_eq!((out.files_open(), out.files_closed, out.files_open_peak), (2, 1, 2));
        let (payload, count) = frame(&["b"], 4);
        out.write_frame(&payload, count, false).unwrap();
        assert_eq!((open(&out, "a"), open(&out, "b"), open(&out, "c")), (false, true, true));
        assert_eq!((out.files_open(), out.files_closed, out.files_open_peak), (2, 2, 2));
        assert_eq!(out.streams_open(), 3);
    }

    #[test]
    fn a_closed_stream_is_opened_again_and_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = output(dir.path(), 1, true);
        for n in 0..3 {
            for key in ["a", "b"] {
                let (payload, count) = frame(&[key], n);
                out.write_frame(&payload, count, false).unwrap();
            }
        }
        // Three streams in one frame with room for one file: each closed (and synced) in turn.
        let (payload, count) = frame(&["a", "b", "c"], 3);
        let (touched, _) = out.write_frame(&payload, count, false).unwrap();
        assert_eq!(touched.len(), 3);
        assert_eq!((out.files_open(), out.files_open_peak, out.files_closed), (1, 1, 8));
        for key in ["a", "b", "c"] {
            let files: Vec<String> = fs::read_dir(dir.path().join(key))
                .unwrap()
                .map(|f| f.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(files, ["g000001-c000-000000.log"], "one file per stream");
            let text = fs::read_to_string(dir.path().join(key).join(&files[0])).unwrap();
            let first = if key == "c" { 3 } else { 0 };
            let expect: String = (first..4).map(|n| format!("{key}:{n}\n")).collect();
            assert_eq!(text, expect);
        }
        let mut ends = out.current_files();
        ends.sort();
        let end = |n: u64| n * 4;
        assert_eq!(
            ends,
            [
                ("a/g000001-c000-000000.log".to_string(), end(4)),
                ("b/g000001-c000-000000.log".to_string(), end(4)),
                ("c/g000001-c000-000000.log".to_string(), end(1)),
            ]
        );
    }

    #[test]
    fn compaction_keeps_the_committed_end_of_a_closed_file() {
        // Regression guard: a compacted log that named only open files made recovery remove
        // the newest file of every closed stream, acknowledged records and all.
        let dir = tempfile::tempdir().unwrap();
        let gen = recover(dir.path()).gen;
        assert_eq!(gen, 1);
        let mut out = output(dir.path(), 1, false);
        let mut log = CommitLog::create(dir.path(), 0, false, crate::os::Modes::DEFAULT).unwrap();
        for (seq, key) in [(1, "a"), (2, "b")] {
            let (payload, count) = frame(&[key], seq as usize);
            let (touched, _) = out.write_frame(&payload, count, false).unwrap();
            let files: Vec<(&str, u64)> = touched.iter().map(|(p, e)| (p.as_str(), *e)).collect();
            log.commit((7, 0), seq, &files).unwrap();
        }
        assert!(!open(&out, "a"), "closed to make room for b");
        let windows = HashMap::from([((7u64, 0u16), crate::receiver::dedup::Window::default())]);
        log.compact(windows.iter(), &out.current_files()).unwrap();
        // A frame written to `b` but never committed: the crash comes before its commit.
        let (payload, count) = frame(&["b"], 3);
        out.write_frame(&payload, count, false).unwrap();
        drop((out, log));
        recover(dir.path());
        let read = |key: &str| {
            fs::read_to_string(dir.path().join(key).join("g000001-c000-000000.log")).unwrap()
        };
        assert_eq!(read("a"), "a:1\n", "the closed stream's committed file is kept");
        assert_eq!(read("b"), "b:2\n", "the uncommitted frame is cut");
    }
}

#[cfg(test)]
mod several_outputs_tests {
    use std::fs;

    use super::*;
    use crate::protocol::RecordWriter;

    /// Commits what `out` wrote last: its marks, the largest of each name, as recovery reads.
    fn commit(out: &dyn Output, marks: &mut HashMap<String, u64>) {
        let mut m = Vec::new();
        out.marks(&mut m);
        for (name, end) in m {
            let e = marks.entry(name.to_string()).or_default();
            *e = (*e).max(end);
        }
    }

    #[test]
    fn two_files_outputs_recover_each_to_its_own_marks() {
        // Regression guard: two files outputs write the same names (STREAM/gGEN-cSHARD-INDEX);
        // unprefixed, their marks would mix in the commit log and recovery would cut one
        // output to the other's end.
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[receiver]\nlisten = \"127.0.0.1:1\"\n[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"c\"\n\
             [output]\ndirectory = {:?}\nfsync = false\n\
             [[outputs.file]]\nname = \"b\"\ndirectory = {:?}\nfsync = false\n",
            dir.path().join("a"),
            dir.path().join("b"),
        );
        let config: ReceiverConfig = toml::from_str(&text).unwrap();
        let mut outs = open(&config, 1, 0);
        let mut payload = Vec::new();
        RecordWriter::push(&mut payload, b"x", b"x:1");
        let records = Records { payload: &payload, count: 1, dead_letter: false, sender: "t" };
        let mut marks = HashMap::new();
        for out in &mut outs {
            let written = out.write(&records, &mut Vec::new()).unwrap();
            assert_eq!(written, Written { records: 1, bytes: 4 });
            out.sync().unwrap();
            commit(out.as_ref(), &mut marks);
        }
        // A frame to `files` alone, never committed; one to `b` alone, committed.
        outs[0].write(&records, &mut Vec::new()).unwrap();
        outs[1].write(&records, &mut Vec::new()).unwrap();
        commit(outs[1].as_ref(), &mut marks);
        let mut names: Vec<(&str, u64)> = marks.iter().map(|(n, e)| (n.as_str(), *e)).collect();
        names.sort();
        let rel = "x/g000001-c000-000000.log";
        assert_eq!(names, [("file:b:x/g000001-c000-000000.log", 8), (rel, 4)]);
        drop(outs);
        let log = LogState { gen: 1, marks, ..Default::default() };
        recover(&config, &log).unwrap();
        let read = |o: &str| fs::read_to_string(dir.path().join(o).join(rel)).unwrap();
        assert_eq!((read("a"), read("b")), ("x:1\n".to_string(), "x:1\nx:1\n".to_string()));
    }
}

#[cfg(test)]
mod forget_tests {
    use std::fs;

    use super::*;
    use crate::protocol::RecordWriter;
    use crate::receiver::commit::{self, CommitLog};

    /// One frame of one record per key, each body `key:n`.
    fn frame(keys: &[&str], n: u64) -> (Vec<u8>, u32) {
        let mut payload = Vec::new();
        for k in keys {
            RecordWriter::push(&mut payload, k.as_bytes(), format!("{k}:{n}").as_bytes());
        }
        (payload, keys.len() as u32)
    }

    /// The files output of generation `gen`, shard 0, forgetting streams idle for a minute.
    fn output(dir: &Path, gen: u64, streams_max: usize, file_bytes_max: u64) -> Files {
        let config =
            OutputSection { streams_idle_s: 60, ..test_config(dir, file_bytes_max, streams_max) };
        Files::new(&config, gen, 0)
    }

    /// Writes frame `seq` as a writer does: its new files announced to `log`, the frame
    /// synced, then committed (unless `commit` is false: the crash comes first).
    fn write(out: &mut Files, log: &mut CommitLog, seq: u64, keys: &[&str], commit: bool) {
        let (payload, count) = frame(keys, seq);
        let records = Records { payload: &payload, count, dead_letter: false, sender: "t" };
        out.write(&records, log).unwrap();
        out.sync().unwrap();
        if commit {
            let mut marks = Vec::new();
            out.marks(&mut marks);
            log.commit((7, 0), seq, &marks).unwrap();
            out.committed();
        }
    }

    /// Makes `streams` idle past `streams_idle_s` (last written in 1970) and lets the output
    /// forget them.
    fn forget(out: &mut Files, streams: &[&str]) {
        for s in streams {
            out.streams.get_mut(*s).unwrap().written_s = 0;
        }
        out.swept_s = 0;
        out.tick();
    }

    /// Recovers `dir` as `shipper receive` does at start; returns the new generation.
    fn recover(dir: &Path) -> u64 {
        let cut = |log: &commit::LogState| cut_uncommitted(dir, log.gen, &log.marks, log.intents());
        commit::recover(dir, 3600, crate::os::Modes::DEFAULT, cut).unwrap().gen
    }

    fn read(dir: &Path, rel: &str) -> String {
        fs::read_to_string(dir.join(rel)).unwrap_or_else(|e| format!("{rel}: {e}"))
    }

    fn names(dir: &Path, stream: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(stream))
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_forgotten_streams_place_goes_to_a_new_stream() {
        // Regression: the stream map never forgot a stream, so past `streams_max` every new
        // stream was written to `_other` until the receiver restarted.
        let dir = tempfile::tempdir().unwrap();
        let gen = recover(dir.path());
        let mut out = output(dir.path(), gen, 2, 1 << 20);
        let mut log = CommitLog::create(dir.path(), 0, false, crate::os::Modes::DEFAULT).unwrap();
        write(&mut out, &mut log, 1, &["a", "b", "c"], true);
        assert_eq!((out.records_folded, out.streams_open()), (1, 3), "a, b and _other");
        forget(&mut out, &["a", "b", OTHER_STREAM]);
        assert_eq!((out.streams_forgotten, out.streams_open(), out.files_open()), (3, 0, 0));
        write(&mut out, &mut log, 2, &["c", "d"], true);
        assert_eq!((out.records_folded, out.streams_open()), (1, 2));
        assert_eq!(read(dir.path(), "c/g000001-c000-000000.log"), "c:2\n");
        assert_eq!(read(dir.path(), "_other/g000001-c000-000000.log"), "c:1\n");
        // A stream written within `streams_idle_s` is not forgotten: `c` and `d` were just now.
        out.swept_s = 0;
        out.tick();
        assert_eq!(out.streams_forgotten, 3);
    }

    #[test]
    fn a_stream_written_again_starts_the_file_after_its_last_compressed_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let gen = recover(dir.path());
        let mut out = output(dir.path(), gen, 4, 1 << 20);
        let mut log = CommitLog::create(dir.path(), 0, false, crate::os::Modes::DEFAULT).unwrap();
        write(&mut out, &mut log, 1, &["a"], true);
        forget(&mut out, &["a"]);
        write(&mut out, &mut log, 2, &["a"], true);
        assert_eq!(names(dir.path(), "a"), ["g000001-c000-000000.log", "g000001-c000-000001.log"]);
        assert_eq!(read(dir.path(), "a/g000001-c000-000000.log"), "a:1\n", "never appended to");
        // The janitor compressed file 1 meanwhile (a file of another shard does not count).
        forget(&mut out, &["a"]);
        let a = dir.path().join("a");
        fs::rename(a.join("g000001-c000-000001.log"), a.join("g000001-c000-000001.log.zst"))
            .unwrap();
        fs::write(a.join("g000001-c001-000007.log"), "").unwrap();
        write(&mut out, &mut log, 3, &["a"], true);
        assert_eq!(read(dir.path(), "a/g000001-c000-000002.log"), "a:3\n");
        assert_eq!(out.streams_forgotten, 2);
    }

    #[test]
    fn a_forgotten_streams_committed_file_stays_whole_across_compaction_and_a_crash() {
        // Regression guard: a checkpoint of live streams alone left a forgotten stream's last
        // file unnamed, and recovery removed what the log did not name: acknowledged lines.
        let dir = tempfile::tempdir().unwrap();
        let gen = recover(dir.path());
        let mut out = output(dir.path(), gen, 4, 1 << 20);
        let mut log = CommitLog::create(dir.path(), 0, true, crate::os::Modes::DEFAULT).unwrap();
        write(&mut out, &mut log, 1, &["a", "b"], true);
        write(&mut out, &mut log, 2, &["a"], true);
        forget(&mut out, &["a"]);
        log.compact(std::iter::empty(), &out.current_files()).unwrap();
        assert_eq!(out.current_files(), [("b/g000001-c000-000000.log".to_string(), 4)]);
        // Then `b` takes a frame that is written but never committed: the crash.
        write(&mut out, &mut log, 3, &["b"], false);
        drop((out, log));
        recover(dir.path());
        assert_eq!(read(dir.path(), "a/g000001-c000-000000.log"), "a:1\na:2\n", "kept whole");
        assert_eq!(read(dir.path(), "b/g000001-c000-000000.log"), "b:1\n", "cut back");
    }

    #[test]
    fn a_file_announced_and_never_committed_is_removed_and_one_committed_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let gen = recover(dir.path());
        // 4096 bytes a file: one frame of 1024 records of `a` fills one.
        let mut out = output(dir.path(), gen, 4, 4096);
        let mut log = CommitLog::create(dir.path(), 0, true, crate::os::Modes::DEFAULT).unwrap();
        let many = vec!["a"; 1024];
        write(&mut out, &mut log, 1, &many, true);
        write(&mut out, &mut log, 2, &["b"], true);
        log.compact(std::iter::empty(), &out.current_files()).unwrap();
        forget(&mut out, &["b"]);
        // Uncommitted: `a` rotates to file 1, `b` returns to file 1, `c` is new; `d` is
        // committed once, then has a frame more.
        write(&mut out, &mut log, 3, &["d"], true);
        write(&mut out, &mut log, 4, &["a", "b", "c", "d"], false);
        assert_eq!(names(dir.path(), "a"), ["g000001-c000-000000.log", "g000001-c000-000001.log"]);
        drop((out, log));
        recover(dir.path());
        assert_eq!(names(dir.path(), "a"), ["g000001-c000-000000.log"]);
        assert_eq!(read(dir.path(), "a/g000001-c000-000000.log"), "a:1\n".repeat(1024));
        assert_eq!(names(dir.path(), "b"), ["g000001-c000-000000.log"]);
        assert_eq!(read(dir.path(), "b/g000001-c000-000000.log"), "b:2\n");
        assert_eq!(names(dir.path(), "c"), Vec::<String>::new());
        assert_eq!(read(dir.path(), "d/g000001-c000-000000.log"), "d:3\n");
    }

    #[test]
    fn a_log_without_intents_is_recovered_as_before() {
        // A receiver upgraded over the logs of a version before intents: such a log names
        // every stream's current file, so a newest file it does not name was never committed.
        let dir = tempfile::tempdir().unwrap();
        let gen = recover(dir.path());
        let mut out = output(dir.path(), gen, 4, 1 << 20);
        let mut log = CommitLog::create_format_1(dir.path(), 0).unwrap();
        let mut none = Vec::new();
        for (seq, keys, commit) in [(1, &["a", "b"][..], true), (2, &["a", "c"], false)] {
            let (payload, count) = frame(keys, seq);
            let records = Records { payload: &payload, count, dead_letter: false, sender: "t" };
            out.write(&records, &mut none).unwrap();
            let mut marks = Vec::new();
            out.marks(&mut marks);
            if commit {
                log.commit((7, 0), seq, &marks).unwrap();
            }
        }
        drop((out, log));
        recover(dir.path());
        assert_eq!(read(dir.path(), "a/g000001-c000-000000.log"), "a:1\n", "cut back");
        assert_eq!(read(dir.path(), "b/g000001-c000-000000.log"), "b:1\n");
        assert_eq!(names(dir.path(), "c"), Vec::<String>::new(), "not named: removed");
    }
}
