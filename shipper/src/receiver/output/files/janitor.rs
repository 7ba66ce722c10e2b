//! A files output's janitor: one thread per shard and files output that compresses rotated
//! files with zstd and removes them past the retention limits, off the write path.
//!
//! # Design constraints
//! - It touches only files that will never be written or cut back again: those its shard
//!   rotated away from (their stream has a newer file), the last files of streams its shard
//!   forgot (`streams_idle_s`: written again, such a stream starts a new file), and those of
//!   earlier generations (recovery cut them before any shard started). A live stream's
//!   current file is never touched, so recovery, which cuts the newest file of each stream,
//!   never meets one with uncommitted bytes compressed or removed.
//! - Compression: `NAME.log` is streamed through zstd (level 3) into `NAME.log.zst.tmp`,
//!   fdatasync'd, renamed to `NAME.log.zst`, the directory fsync'd, and only then `NAME.log`
//!   removed. A crash leaves `NAME.log` whole; a `.tmp` is removed at the next start (by its
//!   own shard's janitor only: another's may be compressing already), and a `NAME.log` beside
//!   a `NAME.log.zst` too (the rename made the compressed copy complete).
//! - Retention: the rotated files it knows of its shard, compressed or not, oldest first
//!   (earlier generations, then in the order they were rotated), are removed while they hold
//!   more than `retention_bytes_max / receiver.workers` bytes, or were last written longer
//!   ago than `retention_age_s`. Current files do not count towards the bytes.
//! - A failure (disk full, I/O error) is counted and logged (the 1st, 2nd, 4th, ... time);
//!   the file stays as it was and is tried again at the next pass, once a second.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::parse_file_name;

/// How often the janitor looks at its files when nothing is handed to it.
const PASS_INTERVAL: Duration = Duration::from_secs(1);
/// zstd level of compressed rotated files.
const ZSTD_LEVEL: i32 = 3;
pub(super) const COMPRESSED_SUFFIX: &str = ".zst";
/// What a compression of `NAME.log` writes to before it is complete: `NAME.log.zst.tmp`.
const TMP_SUFFIX: &str = ".zst.tmp";

/// What the janitor of one shard's files output does, as its config says.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The output directory.
    pub dir: PathBuf,
    /// Files of this shard (and of shards past `workers` that map to it) are its own.
    pub shard: usize,
    pub workers: usize,
    /// The generation running: its files come to the janitor only when rotated.
    pub gen: u64,
    pub compress: bool,
    /// Bytes of rotated files kept by this shard; 0: no limit.
    pub bytes_max: u64,
    /// Seconds a rotated file is kept after its last write; 0: for ever.
    pub age_max_s: u64,
}

impl Policy {
    /// Whether there is anything for a janitor to do.
    pub fn needed(&self) -> bool {
        self.compress || self.bytes_max > 0 || self.age_max_s > 0
    }
}

/// What the janitor did, read by the shard's files output when it reports.
#[derive(Debug, Default)]
pub struct Figures {
    pub compressed: AtomicU64,
    pub removed: AtomicU64,
    pub errors: AtomicU64,
    /// Bytes of the rotated files it keeps now.
    pub bytes_kept: AtomicU64,
}

/// The handle a files output keeps: where it hands rotated files.
pub struct Janitor {
    rotated: Sender<PathBuf>,
    pub figures: Arc<Figures>,
}

impl Janitor {
    /// Starts the janitor thread of `policy`.
    pub fn start(policy: Policy) -> io::Result<Janitor> {
        let (rotated, queue) = channel::<PathBuf>();
        let figures = Arc::new(Figures::default());
        let mut work =
            Work { policy, figures: figures.clone(), kept: Vec::new(), todo: Vec::new() };
        let name = format!("janitor-{}", work.policy.shard);
        std::thread::Builder::new().name(name).spawn(move || {
            work.scan();
            loop {
                match queue.recv_timeout(PASS_INTERVAL) {
                    Ok(path) => work.todo.push(path),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                work.todo.extend(queue.try_iter());
                work.pass();
            }
        })?;
        Ok(Janitor { rotated, figures })
    }

    /// Hands over a file its shard rotated away from, or the last file of a stream it forgot.
    pub fn rotated(&self, path: PathBuf) {
        // The thread ends only with the process (or by a panic, which ends the process).
        let _ = self.rotated.send(path);
    }
}

/// A rotated file kept.
struct Kept {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

struct Work {
    policy: Policy,
    figures: Arc<Figures>,
    /// Rotated files kept, oldest first.
    kept: Vec<Kept>,
    /// Rotated files not compressed yet (or whose compression failed), oldest first.
    todo: Vec<PathBuf>,
}

impl Work {
    /// Finds this shard's files of earlier generations, repairing what a crash during a
    /// compression left.
    fn scan(&mut self) {
        let mut found = Vec::new();
        let Ok(streams) = fs::read_dir(&self.policy.dir) else { return };
        for stream in streams.flatten() {
            let name = stream.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !stream.path().is_dir() {
                continue;
            }
            let Ok(files) = fs::read_dir(stream.path()) else { continue };
            for f in files.flatten() {
                let path = f.path();
                let file = f.file_name().to_string_lossy().into_owned();
                let tmp = file.strip_suffix(TMP_SUFFIX);
                let base = tmp.or(file.strip_suffix(COMPRESSED_SUFFIX)).unwrap_or(&file);
                let Some((gen, shard, index)) = parse_file_name(base) else { continue };
                if shard % self.policy.workers != self.policy.shard {
                    // Another shard's, even a temporary file: its janitor may be writing it.
                    continue;
                }
                if tmp.is_some() {
                    // Left by a crash: this janitor has not compressed anything yet.
                    let _ = fs::remove_file(&path);
                    continue;
                }
                if gen >= self.policy.gen {
                    continue;
                }
                if !file.ends_with(COMPRESSED_SUFFIX) && compressed(&path).exists() {
                    // The compressed copy is complete: the crash came before the removal.
                    let _ = fs::remove_file(&path);
                    continue;
                }
                let modified = f.metadata().and_then(|m| m.modified());
                let modified = modified.unwrap_or(SystemTime::UNIX_EPOCH);
                found.push(((gen, modified, name.clone(), shard, index), path));
            }
        }
        found.sort();
        for (_, path) in found {
            self.todo.push(path);
        }
        self.pass();
    }

    /// Compresses what waits for it, then applies the retention limits.
    fn pass(&mut self) {
        let todo = std::mem::take(&mut self.todo);
        let mut failed = Vec::new();
        for path in todo {
            let done = match self.policy.compress && !is_compressed(&path) {
                true => compress(&path).map(|()| compressed(&path)),
                false => Ok(path.clone()),
            };
            match done.and_then(|p| Ok((fs::metadata(&p)?, p))) {
                Ok((meta, p)) => {
                    if p != path {
                        self.figures.compressed.fetch_add(1, Ordering::Relaxed);
                    }
                    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    self.kept.push(Kept { path: p, bytes: meta.len(), modified });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.failed(&path, "compress", &e);
                    failed.push(path);
                }
            }
        }
        self.todo = failed;
        self.retain();
        let bytes: u64 = self.kept.iter().map(|k| k.bytes).sum();
        self.figures.bytes_kept.store(bytes, Ordering::Relaxed);
    }

    /// Removes the oldest rotated files while over the bytes or past the age.
    fn retain(&mut self) {
        let p = &self.policy;
        let mut bytes: u64 = self.kept.iter().map(|k| k.bytes).sum();
        let now = SystemTime::now();
        let old = |k: &Kept| {
            p.age_max_s > 0
                && now.duration_since(k.modified).is_ok_and(|a| a.as_secs() >= p.age_max_s)
        };
        let mut removed = 0;
        for k in &self.kept {
            if !((p.bytes_max > 0 && bytes > p.bytes_max) || old(k)) {
                break;
            }
            match fs::remove_file(&k.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.failed(&k.path, "remove", &e);
                    break;
                }
            }
            bytes -= k.bytes;
            removed += 1;
        }
        self.kept.drain(..removed);
        self.figures.removed.fetch_add(removed as u64, Ordering::Relaxed);
    }

    fn failed(&self, path: &Path, what: &str, e: &io::Error) {
        let n = self.figures.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            let path = path.display();
            tracing::error!(%path, errors = n, "output janitor cannot {what} a rotated file: {e}");
        }
    }
}

fn is_compressed(path: &Path) -> bool {
    path.to_string_lossy().ends_with(COMPRESSED_SUFFIX)
}

/// `NAME.log.zst` of `NAME.log`.
fn compressed(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(COMPRESSED_SUFFIX);
    PathBuf::from(p)
}

/// Compresses `path` into `path.zst` durably, then removes `path`.
fn compress(path: &Path) -> io::Result<()> {
    let done = compressed(path);
    let mut tmp = done.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let meta = fs::metadata(path)?;
        let out = File::create(&tmp)?;
        fs::set_permissions(&tmp, meta.permissions())?;
        let mut z = zstd::stream::Encoder::new(BufWriter::with_capacity(1 << 20, out), ZSTD_LEVEL)?;
        io::copy(&mut input, &mut z)?;
        let mut out = z.finish()?;
        out.flush()?;
        out.get_ref().sync_data()?;
        fs::rename(&tmp, &done)?;
        File::open(path.parent().expect("a stream directory"))?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_leaves_another_shards_files_alone_even_temporary_ones() {
        // Regression: every janitor's start-up scan removed every `.zst.tmp`, also the one
        // another shard's janitor was compressing into, whose rename then failed as "not
        // found" and left its file uncompressed until the next start.
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        fs::create_dir_all(&s).unwrap();
        for name in ["g000004-c000-000000.log.zst.tmp", "g000004-c001-000000.log.zst.tmp"] {
            fs::write(s.join(name), b"torn").unwrap();
        }
        fs::write(s.join("g000004-c001-000000.log"), b"x\n").unwrap();
        let policy = Policy { workers: 2, ..policy(dir.path(), true, 0) };
        let mut w = Work { policy, figures: Arc::default(), kept: Vec::new(), todo: Vec::new() };
        w.scan();
        assert!(!s.join("g000004-c000-000000.log.zst.tmp").exists(), "its own, left by a crash");
        assert!(s.join("g000004-c001-000000.log.zst.tmp").exists());
        assert!(s.join("g000004-c001-000000.log").exists());
        assert_eq!(w.figures.compressed.load(Ordering::Relaxed), 0);
    }

    fn policy(dir: &Path, compress: bool, bytes_max: u64) -> Policy {
        Policy { dir: dir.into(), shard: 0, workers: 1, gen: 5, compress, bytes_max, age_max_s: 0 }
    }

    #[test]
    fn rotated_files_are_compressed_to_the_same_bytes_and_the_oldest_removed_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        fs::create_dir_all(&s).unwrap();
        let body = |i: u64| format!("line {i}\n").repeat(10_000);
        // Two files of an earlier generation, one left half-compressed by a crash, and the
        // current generation's files (never touched unless handed over).
        for i in 0..2 {
            fs::write(s.join(format!("g000004-c000-{i:06}.log")), body(i)).unwrap();
        }
        fs::write(s.join("g000004-c000-000000.log.zst.tmp"), b"torn").unwrap();
        fs::write(s.join("g000005-c000-000000.log"), body(7)).unwrap();
        let mut w = Work {
            policy: policy(dir.path(), true, 0),
            figures: Arc::default(),
            kept: Vec::new(),
            todo: Vec::new(),
        };
        w.scan();
        let mut names: Vec<String> = fs::read_dir(&s)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "g000004-c000-000000.log.zst",
                "g000004-c000-000001.log.zst",
                "g000005-c000-000000.log"
            ]
        );
        for i in 0..2 {
            let z = fs::read(s.join(format!("g000004-c000-{i:06}.log.zst"))).unwrap();
            assert_eq!(zstd::decode_all(&z[..]).unwrap(), body(i).as_bytes());
        }
        assert_eq!(w.figures.compressed.load(Ordering::Relaxed), 2);
        // A limit below both: the oldest goes first, then the next, never the current file.
        let one = fs::metadata(s.join("g000004-c000-000001.log.zst")).unwrap().len();
        w.policy.bytes_max = one;
        w.pass();
        assert!(!s.join("g000004-c000-000000.log.zst").exists());
        assert!(s.join("g000004-c000-000001.log.zst").exists());
        w.policy.bytes_max = 1;
        w.pass();
        assert!(!s.join("g000004-c000-000001.log.zst").exists());
        assert!(s.join("g000005-c000-000000.log").exists());
        assert_eq!(w.figures.removed.load(Ordering::Relaxed), 2);
    }
}
