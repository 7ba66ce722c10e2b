//! The three tasks of a worker's disk buffer: the writer appends queued frames to segments,
//! the replayer reads them back into the outbox, the tidy task deletes the segments the
//! bookkeeping let go of (counting an evicted one's records). All three run on the worker's
//! io_uring: every open, create, read, write, fsync and unlink is an io_uring operation; only
//! cutting a segment back after a failed write goes to a helper thread ([`super::cut`]).

use std::cell::RefCell;
use std::io;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_uring::fs::File;

use super::cut::Cutter;
use super::format::{self, Item, Tally, SEGMENT_MAGIC};
use super::Tidy;
use super::{ServiceRecords, Spill};
use crate::protocol::frame::{Header, HEADER_BYTES};
use crate::sinks::delivery::{Outbox, Sealed};
use crate::transforms::services::DropReason;

/// Appends queued frames until the worker stops.
pub async fn write_loop<S: Spill>(owner: Rc<RefCell<S>>, mut stop: watch::Receiver<bool>) {
    let id = owner.borrow().worker();
    let cutter = match Cutter::start(id) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(core = id, "disk buffer: cannot start the thread that cuts a failed write back: {e}; such a write leaves its bytes at the segment's end");
            None
        }
    };
    let mut file: Option<(u64, File)> = None;
    let mut dirty: Option<Instant> = None;
    let mut record = Vec::new();
    loop {
        let (frame, wake, fsync_ms) = {
            let mut o = owner.borrow_mut();
            let wake = o.wake();
            let b = o.buffer_mut();
            (b.take_pending(), wake, b.fsync_interval_ms)
        };
        let Some(frame) = frame else {
            let due = dirty.map(|t| t + Duration::from_millis(fsync_ms));
            match due {
                Some(due) if Instant::now() >= due => {
                    sync(&owner, &file).await;
                    dirty = None;
                }
                Some(due) => tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(due.into()) => {}
                },
                None => tokio::select! {
                    _ = wake.notified() => {}
                    _ = stop.changed() => {}
                },
            }
            continue;
        };
        record.clear();
        let names: Vec<(&[u8], u32)> = frame.services.iter().map(|(s, n)| (&s[..], *n)).collect();
        format::encode(&frame.wire, frame.first_unix_us, &names, &mut record);
        let (ordinal, path, offset, new, mode) = {
            let mut o = owner.borrow_mut();
            let b = o.buffer_mut();
            let (ordinal, path, offset, new) = b.write_target();
            (ordinal, path, offset, new, b.modes.file)
        };
        let at = Target { ordinal, path: &path, offset, new, mode };
        let result = append(&mut file, at, record, cutter.as_ref()).await;
        record = result.1;
        let written = result.0.is_ok();
        let at = Written { ordinal, path: &path, new };
        finish_write(&mut *owner.borrow_mut(), &frame, at, result.0, &mut file);
        if written {
            let since = *dirty.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(fsync_ms) {
                sync(&owner, &file).await;
                dirty = None;
            }
        }
    }
}

/// Where a frame was appended: segment `ordinal` at `path` (a new file when `new`).
struct Written<'a> {
    ordinal: u64,
    path: &'a Path,
    new: bool,
}

/// Books the outcome of appending `frame` to segment `ordinal`.
fn finish_write<S: Spill>(
    owner: &mut S,
    frame: &Sealed,
    at: Written<'_>,
    result: io::Result<u64>,
    file: &mut Option<(u64, File)>,
) {
    let Written { ordinal, path, new } = at;
    let b = owner.buffer_mut();
    match result {
        Ok(len) => {
            b.written(ordinal, len, frame.records, &frame.services);
            owner.buffered(frame);
            owner.wake().notify_waiters();
        }
        Err(e) => {
            b.writing = false;
            b.counters.write_errors += 1;
            if new {
                b.abandon(ordinal);
                *file = None;
            }
            let n = b.counters.write_errors;
            if n.is_power_of_two() {
                tracing::error!(path = %path.display(), "disk buffer: cannot write a frame of {} records: {e}; it is dropped (write errors so far: {n})", frame.records);
            }
            owner.dropped(frame, DropReason::BufferError);
        }
    }
}

/// Where a record goes: segment `ordinal` at `path`, at `offset` (a new file when `new`).
struct Target<'a> {
    ordinal: u64,
    path: &'a Path,
    offset: u64,
    new: bool,
    /// Mode of a new segment file (`shipper.file_mode`).
    mode: u32,
}

/// Writes `record` at its target (creating the segment's file when new), and cuts the file
/// back on failure. Returns the bytes appended.
async fn append(
    file: &mut Option<(u64, File)>,
    to: Target<'_>,
    mut record: Vec<u8>,
    cutter: Option<&Cutter>,
) -> (io::Result<u64>, Vec<u8>) {
    let mut at = to.offset;
    if to.new {
        if let Some((_, old)) = file.take() {
            // The closed segment's last records reach the disk before the next one starts.
            let synced = old.sync_data().await;
            let _ = old.close().await;
            if let Err(e) = synced {
                return (Err(e), record);
            }
        }
        match create(to.path, to.mode).await {
            Ok(f) => *file = Some((to.ordinal, f)),
            Err(e) => return (Err(e), record),
        }
        at = SEGMENT_MAGIC.len() as u64;
    } else if file.as_ref().is_none_or(|(o, _)| *o != to.ordinal) {
        if let Some((_, old)) = file.take() {
            let _ = old.close().await;
        }
        match tokio_uring::fs::OpenOptions::new().write(true).open(to.path).await {
            Ok(f) => *file = Some((to.ordinal, f)),
            Err(e) => return (Err(e), record),
        }
    }
    let f = &file.as_ref().expect("opened above").1;
    let len = record.len() as u64;
    let (res, buf) = f.write_all_at(record, at).await;
    record = buf;
    if let Err(e) = res {
        let cut = match cutter {
            Some(c) => c.cut(f, at).await,
            None => Err(io::Error::other("no cutting thread")),
        };
        if let Err(cut) = cut {
            tracing::error!(path = %to.path.display(), "disk buffer: cannot cut a failed write back: {cut}");
        }
        return (Err(e), record);
    }
    (Ok(len), record)
}

/// Creates a segment file with its magic, and makes its directory entry durable.
async fn create(path: &Path, mode: u32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = tokio_uring::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(mode);
    let f = options.open(path).await?;
    let (res, _) = f.write_all_at(SEGMENT_MAGIC.to_vec(), 0).await;
    if let Err(e) = res {
        let _ = f.close().await;
        let _ = tokio_uring::fs::remove_file(path).await;
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        let d = File::open(dir).await?;
        let synced = d.sync_all().await;
        let _ = d.close().await;
        synced?;
    }
    Ok(f)
}

async fn sync<S: Spill>(owner: &Rc<RefCell<S>>, file: &Option<(u64, File)>) {
    if let Some((_, f)) = file {
        if let Err(e) = f.sync_data().await {
            let mut o = owner.borrow_mut();
            let b = o.buffer_mut();
            b.counters.write_errors += 1;
            tracing::error!(dir = %b.dir.display(), "disk buffer: fdatasync failed: {e}");
        }
    }
}

/// Reads buffered frames back into the outbox, oldest first, as it has room.
pub async fn replay_loop<S: Spill>(owner: Rc<RefCell<S>>, mut stop: watch::Receiver<bool>) {
    loop {
        let (next, wake) = {
            let mut o = owner.borrow_mut();
            o.feed();
            // Read back only while a receiver takes data: frames loaded into memory during an
            // outage would only wait there, where a crash loses them.
            let wanted = o.buffer().loaded.is_empty() && o.replay_wanted();
            let next = wanted.then(|| o.buffer().next_unread()).flatten();
            (next, o.wake())
        };
        let Some((ordinal, path, from, to)) = next else {
            tokio::select! {
                _ = wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let read = read(&path, from, to).await;
        let mut o = owner.borrow_mut();
        let data = read.unwrap_or_else(|e| {
            let b = o.buffer_mut();
            b.counters.damaged += 1;
            b.counters.records_damaged_bytes += to - from;
            tracing::error!(path = %path.display(), "disk buffer: cannot read bytes {from}..{to} of a segment: {e}; skipping them");
            Vec::new()
        });
        let frames = load(&mut *o, ordinal, &path, from, &data);
        o.buffer_mut().read_done(ordinal, to, frames);
    }
}

async fn read(path: &Path, from: u64, to: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path).await?;
    let buf = Vec::with_capacity((to - from) as usize);
    let (res, buf) = f.read_exact_at(buf, from).await;
    let _ = f.close().await;
    res?;
    Ok(buf)
}

/// Checks the records in `data` (bytes of `path` from offset `from`) and queues their frames;
/// returns how many frames were queued.
fn load<S: Spill>(o: &mut S, ordinal: u64, path: &Path, from: u64, data: &[u8]) -> u64 {
    let mut records = data;
    let mut base = from as usize;
    if from == 0 {
        let magic = SEGMENT_MAGIC.len().min(data.len());
        if data[..magic] != SEGMENT_MAGIC {
            let b = o.buffer_mut();
            b.counters.damaged += 1;
            b.counters.records_damaged_bytes += data.len() as u64;
            tracing::error!(path = %path.display(), "disk buffer: not a segment (bad magic); its {} bytes are skipped", data.len());
            return 0;
        }
        records = &data[magic..];
        base = magic;
    }
    let now_us = crate::clock::unix_us();
    let now_ns = o.now_ns();
    let mut frames = 0;
    for item in format::Scan::new(records) {
        match item {
            Item::Record(r) => {
                let services = r.services.iter().map(|&(name, n)| (Rc::from(name), n)).collect();
                let h: &[u8; HEADER_BYTES] = r.frame[..HEADER_BYTES].try_into().expect("checked");
                let raw_len = Header::decode(h, u32::MAX).map_or(0, |(h, _)| h.raw_len);
                let age_ns = now_us.saturating_sub(r.first_unix_us) * 1000;
                o.buffer_mut().loaded.push_back(Sealed {
                    wire: r.frame.to_vec(),
                    records: r.records,
                    raw_bytes: raw_len,
                    first_ns: now_ns.saturating_sub(age_ns),
                    first_unix_us: r.first_unix_us,
                    services,
                    sources: Box::default(),
                    marks: Box::default(),
                    seq: 0,
                    origin: Some(ordinal),
                });
                frames += 1;
            }
            Item::Damaged { offset, skipped, damage } => {
                let b = o.buffer_mut();
                b.counters.damaged += 1;
                b.counters.records_damaged_bytes += skipped as u64;
                let at = base + offset;
                tracing::error!(path = %path.display(), offset = at, "disk buffer: {damage}; skipping {skipped} bytes to the next record");
            }
        }
    }
    frames
}

/// Moves frames read back from `b` into `outbox` while it has room, each with the next
/// sequence number; returns how many moved.
pub fn feed_outbox(b: &mut super::DiskBuffer, outbox: &mut Outbox) -> usize {
    let mut moved = 0;
    while let Some(len) = b.loaded.front().map(|f| f.wire.len()) {
        if !outbox.has_room(len) {
            break;
        }
        let mut f = b.loaded.pop_front().expect("looked at above");
        f.seq = outbox.next_seq();
        let flags = u16::from_le_bytes([f.wire[6], f.wire[7]]);
        Header::restamp(&mut f.wire, f.seq, flags);
        b.counters.frames_replayed += 1;
        outbox.push(f).expect("room checked above");
        moved += 1;
    }
    moved
}

/// Bytes read at a time when counting an evicted segment's records: with the record a chunk
/// may cut, [`Tally`] holds at most this plus one record (`format::BODY_BYTES_MAX`).
pub const TALLY_CHUNK_BYTES: usize = 1 << 20;

/// Does the buffer's file work ([`Tidy`]) in order, on the worker's io_uring, as the
/// bookkeeping queues it. Runs until the worker's runtime ends.
pub async fn tidy_loop<S: Spill>(owner: Rc<RefCell<S>>) {
    loop {
        let (job, wake) = {
            let mut o = owner.borrow_mut();
            let b = o.buffer_mut();
            let job = b.tidy.pop_front();
            b.tidying = job.is_some();
            (job, b.tidy_wake.clone())
        };
        match job {
            None => {
                wake.notified().await;
                continue;
            }
            Some(Tidy::Delete(path)) => {
                if let Err(e) = tokio_uring::fs::remove_file(&path).await {
                    tracing::error!(path = %path.display(), "disk buffer: cannot delete a replayed segment: {e}");
                }
            }
            Some(Tidy::Evict { path, services }) => evict(&owner, &path, services).await,
        }
        let mut o = owner.borrow_mut();
        o.buffer_mut().tidying = false;
        o.wake().notify_waiters();
    }
}

/// Deletes the evicted segment at `path` and counts its records as dropped: `services` when
/// known, else as read from the file.
async fn evict<S: Spill>(owner: &Rc<RefCell<S>>, path: &Path, services: Option<ServiceRecords>) {
    let by_name = match services {
        Some(_) => Vec::new(),
        None => tally(path).await.unwrap_or_else(|e| {
            tracing::error!(path = %path.display(), "disk buffer: cannot read an evicted segment to count its records per service: {e}; counted in shipper_buffer_segments_dropped_total only");
            Vec::new()
        }),
    };
    if let Err(e) = tokio_uring::fs::remove_file(path).await {
        tracing::error!(path = %path.display(), "disk buffer: cannot delete an evicted segment: {e}");
    }
    let counts = services
        .unwrap_or_else(|| by_name.into_iter().map(|(name, n)| (Rc::from(name), n)).collect());
    owner.borrow_mut().evicted(path, &counts);
}

/// Records per service name of the segment at `path`, read in chunks of
/// [`TALLY_CHUNK_BYTES`].
pub async fn tally(path: &Path) -> io::Result<Vec<(Vec<u8>, u64)>> {
    let f = File::open(path).await?;
    let mut t = Tally::default();
    let mut at = SEGMENT_MAGIC.len() as u64;
    let mut buf = Vec::with_capacity(TALLY_CHUNK_BYTES);
    let read = loop {
        buf.clear();
        let (res, b) = f.read_at(buf, at).await;
        buf = b;
        match res {
            Ok(0) => break Ok(()),
            Ok(n) => {
                t.feed(&buf[..n], false);
                at += n as u64;
            }
            Err(e) => break Err(e),
        }
    };
    let _ = f.close().await;
    read?;
    t.feed(&[], true);
    Ok(t.counts)
}
