//! The disk buffer: a per-core, segmented write-ahead log of frames that found the memory
//! outbox full, replayed in order when a receiver takes data again (`docs/buffer.md`).
//!
//! # Design constraints
//! - One directory per worker (`DIR/core-N/`), written and read only by that worker's thread.
//!   At most `bytes_max / workers` bytes of segments plus frames waiting to be written; at
//!   most `outbox_bytes_max` bytes waiting to be written (the disk being slower than the
//!   input is a kind of full). A segment is closed past `segment_bytes`; replay holds at most
//!   one segment's unread bytes in memory.
//! - Frames are stored exactly as they will be sent (compressed, checksummed), each with its
//!   [`Origin`] (the identity it took before it came here, else the next number of the run's
//!   spill stream, [`DiskBuffer::spill_origin`]); only the sequence number is rewritten when a
//!   frame re-enters the outbox, so the receiver's de-duplication stays dense within a run,
//!   and the receiver recognises a frame it wrote before by its origin.
//! - Only non-durable sources (pipes) use it: a journal source pauses instead, its entries
//!   wait in the journal.
//! - Nothing here blocks the worker's thread: the bookkeeping in this file is plain memory
//!   (it queues file work as [`Tidy`] entries, at most one per segment); the tasks in [`io`]
//!   open, create, read, write, fsync and unlink through io_uring; only the cut back after a
//!   failed write goes to a helper thread, through a queue of one ([`cut`]). Listing the
//!   directories when the buffer opens happens once, before the worker reads any source.
//! - Each segment written in this run keeps its records per service id in memory (at most
//!   `services_max + 1` entries), so evicting it needs no read; a previous run's segment is
//!   read in [`io::TALLY_CHUNK_BYTES`] chunks, holding at most a chunk plus one record.
//!
//! # Format
//! See [`format`]: a segment is `b"SHPBUF01"` then records `{magic, len, meta_len, crc32c,
//! meta {first read time, records per service}, frame}`. Segment files are
//! `core-N/SEQUENCE.seg`, SEQUENCE a zero-padded, increasing number.
//!
//! # Operation
//! 1. A sealed frame goes to the outbox while nothing is buffered, the outbox has room and
//!    some receiver may be up; otherwise it is queued here (so frames stay in order; and with
//!    every receiver down, on disk rather than in memory, where a crash would lose them). The
//!    writer task appends it to the newest segment with io_uring, fdatasync'ing at most
//!    `fsync_interval_ms` later.
//! 2. While some receiver is up, the replay task reads the unread part of the oldest segment,
//!    checks every record, and hands frames to the outbox as it has room. Damaged bytes are
//!    skipped to the next record magic, counted and logged with the file and offset; every
//!    step moves forward, so replay cannot loop.
//! 3. A segment is deleted when it is closed, read to its end, and every frame read from it is
//!    acknowledged: forgotten here at once, its file unlinked by the tidy task soon after. A
//!    crash before that replays it again after restart: frames acknowledged just before a
//!    crash are sent twice, and recognised by their origin (never lost).
//! 4. At start, the segments left in the directory (and in those of cores beyond the current
//!    worker count, shared out by `core % workers`) are replayed first.
//! 5. Full: `when_full = drop_newest` drops the frame that does not fit; `drop_oldest` deletes
//!    the oldest segment not being replayed (its bytes leave `bytes_max` at once; the tidy task
//!    unlinks the file, then counts its records). Both count the records per service. A failed
//!    write (disk full, I/O error) drops that frame, counted, and cuts the segment back.

pub mod cut;
pub mod format;
pub mod io;

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tokio::sync::Notify;

use crate::config::shipper::{BufferSection, WhenFull};
use crate::protocol::Origin;
use crate::sinks::delivery::Sealed;
use crate::transforms::services::DropReason;

/// What the buffer's tasks ([`io`]) need from the worker that owns the buffer: the buffer,
/// the names of service ids, and where frames go once read back. Nothing else of the worker.
pub trait Spill {
    /// The owning worker's index (for logs).
    fn worker(&self) -> usize;
    fn buffer(&self) -> &DiskBuffer;
    fn buffer_mut(&mut self) -> &mut DiskBuffer;
    /// Monotonic nanoseconds on the worker's clock.
    fn now_ns(&self) -> u64;
    /// Woken when frames wait to be written, room comes in the outbox, or a receiver's
    /// health changes; the buffer's tasks wake it after each step.
    fn wake(&self) -> Rc<Notify>;
    /// Every record of `frame` is lost for `reason`.
    fn dropped(&mut self, frame: &Sealed, reason: DropReason);
    /// `frame` is written to a segment: the buffer's from now on.
    fn buffered(&mut self, frame: &Sealed);
    /// Whether to read frames back now: a receiver takes data and the worker is not stopping.
    fn replay_wanted(&self) -> bool;
    /// Moves frames read back into the outbox while it has room ([`io::feed_outbox`]).
    fn feed(&mut self);
    /// The evicted segment at `path` is deleted (or could not be): `counts` records per
    /// service are dropped.
    fn evicted(&mut self, path: &Path, counts: &[(Rc<[u8]>, u64)]);
}

/// A segment file and how far it has been written, read and acknowledged.
#[derive(Debug)]
pub struct Segment {
    /// Position in this worker's replay order, unique for the worker's lifetime.
    pub ordinal: u64,
    pub path: PathBuf,
    /// Bytes of whole records written (the magic included).
    pub size: u64,
    /// Bytes already read back.
    pub read: u64,
    /// Frames read back and not yet acknowledged.
    pub unacked: u64,
    /// No more records will be appended.
    pub closed: bool,
    /// Records per service appended in this run; `None` for a segment a previous run left
    /// (its file must be read to count them).
    pub services: Option<ServiceRecords>,
}

/// Records per service name, one entry per service, in the order first written.
pub type ServiceRecords = Vec<(Rc<[u8]>, u64)>;

/// File work the buffer's bookkeeping decided and the tidy task does on the worker's io_uring
/// ([`io::tidy_loop`]): the bookkeeping runs in plain functions that must not block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tidy {
    /// A segment replayed and acknowledged: delete its file.
    Delete(PathBuf),
    /// A segment dropped to make room (`drop_oldest`): delete its file and count its records
    /// as dropped per service (reading the file in chunks when `services` is `None`).
    Evict { path: PathBuf, services: Option<ServiceRecords> },
}

impl Segment {
    fn drained(&self) -> bool {
        self.closed && self.read >= self.size && self.unacked == 0
    }
}

/// Counters of the disk buffer, copied into the worker's metrics.
#[derive(Clone, Debug, Default)]
pub struct BufferCounters {
    pub frames_written: u64,
    pub records_written: u64,
    pub frames_replayed: u64,
    pub records_damaged_bytes: u64,
    pub damaged: u64,
    pub write_errors: u64,
    pub segments_dropped: u64,
}

/// One worker's disk buffer.
pub struct DiskBuffer {
    pub dir: PathBuf,
    pub segments: VecDeque<Segment>,
    /// Frames waiting for the writer, with the size of their record on disk.
    pub pending: VecDeque<(Sealed, u64)>,
    pending_bytes: u64,
    pending_bytes_max: u64,
    /// Frames read back, waiting for room in the outbox.
    pub loaded: VecDeque<Sealed>,
    bytes_max: u64,
    pub segment_bytes: u64,
    pub fsync_interval_ms: u64,
    pub when_full: WhenFull,
    next_file: u64,
    next_ordinal: u64,
    /// The last number given in this run's spill stream ([`DiskBuffer::spill_origin`]).
    spilled: u64,
    /// The writer has taken a frame and not finished writing it.
    pub writing: bool,
    /// File work for the tidy task, oldest first: at most one entry per segment.
    pub tidy: VecDeque<Tidy>,
    /// The tidy task has taken an entry and not finished it.
    pub tidying: bool,
    /// Wakes the tidy task (a permit is kept when it is busy, so no entry waits unseen).
    pub tidy_wake: Rc<Notify>,
    pub counters: BufferCounters,
    /// Modes of the segment files and directories created (`shipper.file_mode`, `dir_mode`).
    pub modes: crate::os::Modes,
}

impl DiskBuffer {
    /// The identity a frame that goes to the buffer without having taken a sequence number
    /// (outbox full, receivers down) keeps from then on: the next number of the run's spill
    /// stream, `(!run_id, core)` (every bit of the run id flipped: a stream no HELLO names),
    /// numbered in the order such frames are written. Sent from the buffer under any later
    /// sequence number, by this run or another, it is recognised by a receiver that wrote it.
    pub fn spill_origin(&mut self, run_id: u64, core: usize) -> Origin {
        self.spilled += 1;
        Origin { run_id: !run_id, core: core as u16, seq: self.spilled }
    }

    /// Opens worker `core`'s buffer under `config.directory`, adopting the directories of
    /// cores beyond `workers` (a restart with fewer workers).
    pub fn open(
        config: &BufferSection,
        root: &Path,
        core: usize,
        workers: usize,
        pending_bytes_max: u64,
        modes: crate::os::Modes,
    ) -> std::io::Result<DiskBuffer> {
        let dir = root.join(format!("core-{core}"));
        modes.create_dir_all(&dir)?;
        let mut dirs = adopted(root, core, workers)?;
        dirs.push(dir.clone());
        let mut buffer = DiskBuffer {
            dir: dir.clone(),
            modes,
            segments: VecDeque::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_bytes_max,
            loaded: VecDeque::new(),
            bytes_max: config.bytes_max / workers as u64,
            segment_bytes: config.segment_bytes,
            fsync_interval_ms: config.fsync_interval_ms,
            when_full: config.when_full,
            next_file: 1,
            next_ordinal: 1,
            spilled: 0,
            writing: false,
            tidy: VecDeque::new(),
            tidying: false,
            tidy_wake: Rc::new(Notify::new()),
            counters: BufferCounters::default(),
        };
        for d in dirs {
            for (number, path) in segment_files(&d)? {
                if d == dir {
                    buffer.next_file = buffer.next_file.max(number + 1);
                }
                let size = fs::metadata(&path)?.len();
                let ordinal = buffer.take_ordinal();
                buffer.segments.push_back(Segment {
                    ordinal,
                    path,
                    size,
                    read: 0,
                    unacked: 0,
                    closed: true,
                    services: None,
                });
            }
        }
        Ok(buffer)
    }

    fn take_ordinal(&mut self) -> u64 {
        self.next_ordinal += 1;
        self.next_ordinal - 1
    }

    /// Bytes held: segments on disk plus frames waiting to be written.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum::<u64>() + self.pending_bytes
    }

    /// Nothing is buffered: a new frame may go straight to the outbox.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
            && self.loaded.is_empty()
            && !self.writing
            && self.segments.iter().all(|s| s.read >= s.size)
    }

    /// Queues `frame`, whose record takes `record_bytes` ([`format::record_bytes`]), for the
    /// writer; gives it back when that would pass `bytes_max` or the write queue's bound.
    pub fn push(&mut self, frame: Sealed, record_bytes: u64) -> Result<(), Sealed> {
        if self.bytes() + record_bytes > self.bytes_max
            || self.pending_bytes + record_bytes > self.pending_bytes_max
        {
            return Err(frame);
        }
        self.pending_bytes += record_bytes;
        self.pending.push_back((frame, record_bytes));
        Ok(())
    }

    /// The writer takes the next frame.
    pub fn take_pending(&mut self) -> Option<Sealed> {
        let (f, record_bytes) = self.pending.pop_front()?;
        self.pending_bytes -= record_bytes;
        self.writing = true;
        Some(f)
    }

    /// The segment to append `len` bytes to: the newest if open and not full, else a new one
    /// (whose file the writer must create). Returns (ordinal, path, offset, is_new).
    pub fn write_target(&mut self) -> (u64, PathBuf, u64, bool) {
        if let Some(s) = self.segments.back_mut().filter(|s| !s.closed) {
            if s.size < self.segment_bytes {
                return (s.ordinal, s.path.clone(), s.size, false);
            }
            s.closed = true;
        }
        let path = self.dir.join(format!("{:020}.seg", self.next_file));
        self.next_file += 1;
        let ordinal = self.take_ordinal();
        let magic = format::SEGMENT_MAGIC.len() as u64;
        self.segments.push_back(Segment {
            ordinal,
            path: path.clone(),
            size: magic,
            read: magic,
            unacked: 0,
            closed: false,
            services: Some(Vec::new()),
        });
        (ordinal, path, 0, true)
    }

    /// A new segment file could not be created: forget it.
    pub fn abandon(&mut self, ordinal: u64) {
        self.segments.retain(|s| s.ordinal != ordinal);
    }

    /// `len` bytes holding `records` records, `services` of them per service, were
    /// appended to segment `ordinal`.
    pub fn written(&mut self, ordinal: u64, len: u64, records: u32, services: &[(Rc<[u8]>, u32)]) {
        self.writing = false;
        if let Some(s) = self.segments.iter_mut().find(|s| s.ordinal == ordinal) {
            s.size += len;
            self.counters.frames_written += 1;
            self.counters.records_written += u64::from(records);
            let counts = s.services.get_or_insert_with(Vec::new);
            for (service, n) in services {
                match counts.iter_mut().find(|(name, _)| name == service) {
                    Some((_, total)) => *total += u64::from(*n),
                    None => counts.push((service.clone(), u64::from(*n))),
                }
            }
        }
    }

    /// The oldest segment with unread bytes: (ordinal, path, from, to).
    pub fn next_unread(&self) -> Option<(u64, PathBuf, u64, u64)> {
        let s = self.segments.iter().find(|s| s.read < s.size)?;
        Some((s.ordinal, s.path.clone(), s.read, s.size))
    }

    /// Bytes `from..to` of segment `ordinal` were read; `frames` of them are now loaded.
    pub fn read_done(&mut self, ordinal: u64, to: u64, frames: u64) {
        if let Some(s) = self.segments.iter_mut().find(|s| s.ordinal == ordinal) {
            s.read = to;
            s.unacked += frames;
            // Everything written is read back and nothing waits: close it so it can go.
            if !s.closed && self.pending.is_empty() && !self.writing {
                s.closed = true;
            }
        }
        self.collect();
    }

    /// A frame read from segment `ordinal` is acknowledged (or given up).
    pub fn acked(&mut self, ordinal: u64) {
        if let Some(s) = self.segments.iter_mut().find(|s| s.ordinal == ordinal) {
            s.unacked = s.unacked.saturating_sub(1);
        }
        self.collect();
    }

    /// Forgets every drained segment, queueing its file's deletion for the tidy task.
    fn collect(&mut self) {
        while let Some(i) = self.segments.iter().position(Segment::drained) {
            let s = self.segments.remove(i).expect("found above");
            self.tidy.push_back(Tidy::Delete(s.path));
            self.tidy_wake.notify_one();
        }
    }

    /// For `drop_oldest`: forgets the oldest closed segment nothing has been read from yet,
    /// queueing its deletion and the count of its records for the tidy task. False if there
    /// is none.
    pub fn evict_oldest(&mut self) -> bool {
        let magic = format::SEGMENT_MAGIC.len() as u64;
        let evictable = |s: &Segment| s.closed && s.read <= magic && s.unacked == 0;
        let Some(i) = self.segments.iter().position(evictable) else {
            return false;
        };
        let s = self.segments.remove(i).expect("found above");
        self.tidy.push_back(Tidy::Evict { path: s.path, services: s.services });
        self.tidy_wake.notify_one();
        true
    }

    /// File work is queued or under way.
    pub fn tidy_busy(&self) -> bool {
        self.tidying || !self.tidy.is_empty()
    }
}

/// Directories of cores `j >= workers` with `j % workers == core`.
fn adopted(root: &Path, core: usize, workers: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(j) = name.to_str().and_then(|n| n.strip_prefix("core-")?.parse::<usize>().ok())
        else {
            continue;
        };
        if j >= workers && j % workers == core {
            out.push((j, entry.path()));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// `NUMBER.seg` files of `dir`, in number order.
fn segment_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let number = name.to_str().and_then(|n| n.strip_suffix(".seg")?.parse::<u64>().ok());
        if let Some(n) = number {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{Header, Kind};

    /// A buffer in `dir` whose segments close past 1000 bytes.
    fn buffer(dir: &Path) -> DiskBuffer {
        let config =
            BufferSection { segment_bytes: 1000, bytes_max: 1 << 20, ..Default::default() };
        DiskBuffer::open(&config, dir, 0, 1, 1 << 20, crate::os::Modes::DEFAULT).unwrap()
    }

    /// What the writer does for a 400-byte record holding `services` (`s{N}`, records).
    fn write(b: &mut DiskBuffer, services: &[(u32, u32)]) {
        let (ordinal, _, _, _) = b.write_target();
        let records = services.iter().map(|s| s.1).sum();
        let named: Vec<_> = services.iter().map(|&(s, n)| (name(s), n)).collect();
        b.written(ordinal, 400, records, &named);
    }

    fn name(service: u32) -> Rc<[u8]> {
        Rc::from(format!("s{service}").as_bytes())
    }

    fn counts(services: &[(u32, u64)]) -> Option<ServiceRecords> {
        Some(services.iter().map(|&(s, n)| (name(s), n)).collect())
    }

    // Guards the identity of frames that come here without a sequence number: numbered in
    // the run's spill stream, a stream no HELLO names, densely so the receiver's window for
    // it stays contiguous.
    #[test]
    fn frames_without_a_number_are_numbered_in_the_spill_stream() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = buffer(dir.path());
        let run: u64 = 0x0123_4567_89ab_cdef;
        let firsts = [b.spill_origin(run, 3), b.spill_origin(run, 3)];
        let spill = 0xfedc_ba98_7654_3210;
        assert_eq!(firsts, [1, 2].map(|seq| Origin { run_id: spill, core: 3, seq }));
    }

    // Guards exact drop counts per service for `drop_oldest` without reading the evicted
    // segment on the worker's thread: the counts kept as records are written go with it.
    #[test]
    fn an_evicted_segment_carries_its_records_per_service() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("core-0/00000000000000000001.seg");
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, format::SEGMENT_MAGIC).unwrap();
        let mut b = buffer(dir.path());
        for i in 0..7 {
            write(&mut b, &[(0, 2), (1 + i % 2, 3)]);
        }
        // The segment a previous run left, then three records per segment: 1208 bytes each.
        let sizes: Vec<u64> = b.segments.iter().map(|s| s.size).collect();
        assert_eq!(sizes, [8, 1208, 1208, 408]);
        assert!(b.evict_oldest());
        assert!(b.evict_oldest());
        assert!(b.evict_oldest());
        assert!(!b.evict_oldest(), "the open segment stays");
        let second = b.dir.join("00000000000000000002.seg");
        let third = b.dir.join("00000000000000000003.seg");
        let evicted: Vec<Tidy> = b.tidy.drain(..).collect();
        assert_eq!(
            evicted,
            [
                Tidy::Evict { path: old, services: None },
                Tidy::Evict { path: second, services: counts(&[(0, 6), (1, 6), (2, 3)]) },
                Tidy::Evict { path: third, services: counts(&[(0, 6), (2, 6), (1, 3)]) },
            ]
        );
        assert_eq!(b.bytes(), 408);
    }

    // Guards deleting replayed segments off the bookkeeping: a drained segment becomes a
    // deletion for the tidy task, and the file stays until that task deletes it.
    #[test]
    fn a_drained_segment_is_queued_for_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = buffer(dir.path());
        for _ in 0..4 {
            write(&mut b, &[(0, 1)]);
        }
        let (ordinal, path, from, to) = b.next_unread().unwrap();
        assert_eq!((from, to), (8, 1208));
        b.read_done(ordinal, to, 2);
        b.acked(ordinal);
        assert!(b.tidy.is_empty(), "a frame is still unacknowledged");
        b.acked(ordinal);
        assert_eq!(b.tidy.drain(..).collect::<Vec<_>>(), [Tidy::Delete(path)]);
        assert_eq!(b.segments.len(), 1);
    }

    fn frame(records: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let h = Header { kind: Kind::Data, flags: 0, seq: 1, count: records, raw_len: len, len };
        h.wire(payload)
    }

    // Guards counting an evicted segment of a previous run through io_uring in chunks: records
    // cut by chunk boundaries and a torn tail count exactly as a whole read would.
    #[test]
    fn a_segment_is_tallied_in_chunks_through_io_uring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000001.seg");
        let mut data = format::SEGMENT_MAGIC.to_vec();
        for i in 0..25u32 {
            let f = frame(1, &vec![i as u8; 100_000 + i as usize]);
            format::encode(&f, 0, &[(b"web", 7), (b"db", i)], &mut data);
        }
        let torn = data.len();
        format::encode(&frame(1, b"lost"), 0, &[(b"web", 1000)], &mut data);
        data.truncate(torn + 20);
        assert!(data.len() > 2 * io::TALLY_CHUNK_BYTES);
        std::fs::write(&path, &data).unwrap();
        let counts = tokio_uring::start(io::tally(&path)).unwrap();
        assert_eq!(counts, [(b"web".to_vec(), 175), (b"db".to_vec(), 300)]);
    }
}
