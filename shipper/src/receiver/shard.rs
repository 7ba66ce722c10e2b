//! A receiver shard: one thread owning the sender streams (run, core) that [`super::owner`]
//! routes to it, with their de-duplication windows, its outputs and its commit log; it serves
//! the connections of those streams and takes their frames to the outputs.
//!
//! # Design constraints
//! - One frame at a time per shard: its check, write, sync, commit and dedup-mark happen
//!   without an `.await` between them, so no other task of the thread interleaves (a
//!   duplicate could slip in).
//! - Memory: per shard, for the one frame it handles at a time, a copy of the payload (at
//!   most `frame_bytes_max`), the decompressed payload and what its outputs build from the
//!   records, for each output (a files output: its records grouped by stream, at most
//!   `frame_raw_bytes_max`; a ClickHouse output: the insert's body, the records as JSON
//!   strings, at most 6 times `frame_raw_bytes_max` when every byte is a control byte, about
//!   `frame_raw_bytes_max` + 30 bytes per record for text). Between frames a shard keeps at
//!   most 4 MiB of decompression buffer ([`SCRATCH_KEEP_BYTES_MAX`]), and each output 4 MiB.
//!
//! # Operation (per connection, on its shard)
//! Read frames (each within `idle_timeout_ms`; a frame over 64 KiB only with room reserved for
//! its payload, else ERROR `busy` after `frames_in_progress_wait_ms`, the reservation given
//! back once the frame is handled); for a DATA frame: check flags and sizes,
//! decompress into a buffer of exactly the declared size, validate every record, then either
//! (already written) count a duplicate, or write it to every output (each takes the records
//! it selects), have each that took any make them durable, commit and mark it
//! ([`super::output`] has the contract); then ACK. HEARTBEATs are echoed. A DATA
//! frame that can never be written (invalid records or zstd, over `frame_raw_bytes_max`, a
//! name the output refuses for good) is answered with REJECT and the connection goes on: the
//! shipper gives that frame another fate. A stream that is not valid frames (bad magic,
//! checksum, size) gets an ERROR naming the problem and is closed; so does a write that fails
//! for now in any output (disk full, I/O error, ClickHouse down): ERROR "cannot write now"
//! naming the output, no ACK, and the shipper backs off and resends. Each output's records,
//! bytes, errors, latencies and state are counted apart (label `output`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::budget::{FrameBudget, Reservation, FRAME_PAYLOAD_UNRESERVED_BYTES};
use super::commit::CommitLog;
use super::dedup::{StreamId, Window};
use super::output::{Output, Records, WriteError, Written};
use super::server::{owner, HandOff};
use crate::config::ReceiverConfig;
use crate::metrics::receiver::{OutputCounters, ReceiverCounters, Refusal};
use crate::metrics::{Registry, PUBLISH_INTERVAL_MS};
use crate::protocol::frame::{FLAG_DEAD_LETTER, FLAG_ZSTD};
use crate::protocol::{Frame, FrameDecoder, Kind, RecordIter};
use crate::tls::stream::{TlsStream, READ_BYTES};

/// Capacity of the decompression buffer a shard keeps between frames.
const SCRATCH_KEEP_BYTES_MAX: usize = 4 << 20;

/// A receiver shard's state, owned by its thread.
pub struct Shard {
    /// Which shard: `0..receiver.workers`, what [`owner`] returns.
    pub index: usize,
    /// Where frames' records go ([`super::output::open`]), in the order they are written.
    pub outputs: Vec<Box<dyn Output>>,
    /// What each output of `outputs` took of the frame being written.
    taken: Vec<Written>,
    pub commits: CommitLog,
    pub windows: HashMap<StreamId, Window>,
    pub counters: ReceiverCounters,
    pub config: Arc<ReceiverConfig>,
    scratch: Vec<u8>,
}

impl Shard {
    pub fn new(
        index: usize,
        outputs: Vec<Box<dyn Output>>,
        commits: CommitLog,
        windows: HashMap<StreamId, Window>,
        config: Arc<ReceiverConfig>,
    ) -> Shard {
        let mut counters = ReceiverCounters::new(index.to_string());
        counters.outputs = outputs.iter().map(|o| OutputCounters::new(o.name().into())).collect();
        let taken = vec![Written::default(); outputs.len()];
        Shard { index, outputs, taken, commits, windows, counters, config, scratch: Vec::new() }
    }

    /// Handles one DATA frame; `Ok(())` means it may be acknowledged.
    pub fn data(&mut self, id: StreamId, f: &Frame) -> Result<(), FrameFault> {
        self.counters.frames_received += 1;
        if self.windows.get(&id).is_some_and(|w| w.contains(f.header.seq)) {
            self.counters.frames_duplicate += 1;
            return Ok(());
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.decode_and_write(id, f, &mut scratch);
        // Kept for the next frame, but not a large frame's worth of it.
        if scratch.capacity() <= SCRATCH_KEEP_BYTES_MAX {
            self.scratch = scratch;
        }
        result
    }

    fn decode_and_write(
        &mut self,
        id: StreamId,
        f: &Frame,
        scratch: &mut Vec<u8>,
    ) -> Result<(), FrameFault> {
        let h = f.header;
        let invalid = |what: String| FrameFault::Refused(format!("frame {}: {what}", h.seq));
        let raw_bytes_max = self.config.receiver.frame_raw_bytes_max;
        if h.raw_len > raw_bytes_max {
            return Err(invalid(format!(
                "{} decompressed bytes is over frame_raw_bytes_max {raw_bytes_max}",
                h.raw_len
            )));
        }
        let dead_letter = h.flags & FLAG_DEAD_LETTER != 0;
        let payload: &[u8] = match h.flags & !FLAG_DEAD_LETTER {
            FLAG_ZSTD => {
                scratch.clear();
                scratch.reserve(h.raw_len as usize);
                zstd::bulk::Decompressor::new()
                    .and_then(|mut d| d.decompress_to_buffer(&f.payload, scratch))
                    .map_err(|e| invalid(format!("zstd: {e}")))?;
                if scratch.len() != h.raw_len as usize {
                    return Err(invalid(format!(
                        "decompressed to {} bytes, header says {}",
                        scratch.len(),
                        h.raw_len
                    )));
                }
                scratch
            }
            0 => &f.payload,
            other => return Err(invalid(format!("unknown flags {other:#x}"))),
        };
        RecordIter::validate(payload, h.count).map_err(|e| invalid(e.to_string()))?;
        let started = Instant::now();
        self.write(id, h.seq, &Records { payload, count: h.count, dead_letter })?;
        self.counters.write_us.record(started.elapsed().as_micros() as u64);
        self.counters.frame_records.record(h.count.into());
        Ok(())
    }

    /// Writes a frame's validated records to every output, makes them durable, and commits
    /// the frame: then it may be acknowledged.
    fn write(&mut self, id: StreamId, seq: u64, records: &Records) -> Result<(), FrameFault> {
        let bytes = self.write_outputs(seq, records)?;
        if records.dead_letter {
            self.counters.records_dead_letter += u64::from(records.count);
        }
        let mut marks = Vec::new();
        for output in &self.outputs {
            output.marks(&mut marks);
        }
        // A commit that fails takes nothing back: its record may be in the log all the same,
        // and cutting what it names would lose the frame. Resent, it is written again.
        self.commits.commit(id, seq, &marks).map_err(FrameFault::Write)?;
        let window = self.windows.entry(id).or_default();
        window.insert(seq);
        window.written_unix_s = super::commit::unix_s();
        self.counters.records_written += u64::from(records.count);
        self.counters.bytes_written += bytes;
        for ((output, c), taken) in
            self.outputs.iter().zip(&mut self.counters.outputs).zip(&self.taken)
        {
            c.records += taken.records;
            c.bytes += taken.bytes;
            output.report(c);
        }
        if self.commits.needs_compaction() {
            self.compact().map_err(FrameFault::Write)?;
        }
        Ok(())
    }

    /// Writes `records` to every output, then has each that took any make them durable; on a
    /// failure, takes back what the outputs wrote (the failing output counted and marked
    /// down). Returns the bytes written over all outputs.
    fn write_outputs(&mut self, seq: u64, records: &Records) -> Result<u64, FrameFault> {
        let mut bytes = 0;
        for i in 0..self.outputs.len() {
            let started = Instant::now();
            let result = self.outputs[i].write(records);
            let c = &mut self.counters.outputs[i];
            match result {
                Ok(w) => {
                    if w.records > 0 {
                        c.write_us.record(started.elapsed().as_micros() as u64);
                    }
                    bytes += w.bytes;
                    self.taken[i] = w;
                }
                Err(e) => {
                    c.errors += 1;
                    c.up = matches!(e, WriteError::Refused(_));
                    let name = self.outputs[i].name();
                    let fault = match e {
                        WriteError::Refused(_) => FrameFault::Refused(format!("frame {seq}: {e}")),
                        WriteError::Failed(e) => {
                            FrameFault::Write(io::Error::new(e.kind(), format!("{name}: {e}")))
                        }
                    };
                    // The failed output took its own part back.
                    self.outputs[..i].iter_mut().for_each(|o| o.undo());
                    return Err(fault);
                }
            }
        }
        for i in 0..self.outputs.len() {
            if self.taken[i].records == 0 {
                continue;
            }
            let started = Instant::now();
            let result = self.outputs[i].sync();
            let c = &mut self.counters.outputs[i];
            c.sync_us.record(started.elapsed().as_micros() as u64);
            c.up = result.is_ok();
            if let Err(e) = result {
                c.errors += 1;
                self.outputs.iter_mut().for_each(|o| o.undo());
                let name = self.outputs[i].name();
                return Err(FrameFault::Write(io::Error::new(e.kind(), format!("{name}: {e}"))));
            }
        }
        Ok(bytes)
    }

    /// Compacts the commit log into this shard's windows and its outputs' checkpoints.
    fn compact(&mut self) -> io::Result<()> {
        let (index, shards) = (self.index, self.config.receiver.workers);
        let mine = self.windows.iter().filter(|(id, _)| owner(**id, shards) == index);
        let mut marks = Vec::new();
        for output in &self.outputs {
            output.checkpoint(&mut marks);
        }
        self.commits.compact(mine, &marks)
    }

    /// Books a frame answered with REJECT, and logs it: every one while they are rare, then
    /// the 2nd, 4th, 8th, ... (a misconfigured shipper could have every frame refused).
    fn rejected(&mut self, id: StreamId, h: &crate::protocol::Header, reason: &str) {
        self.counters.frames_rejected += 1;
        self.counters.records_rejected += u64::from(h.count);
        let n = self.counters.frames_rejected;
        if n <= 8 || n.is_power_of_two() {
            let (seq, records) = (h.seq, h.count);
            tracing::warn!(
                sender = format!("{:016x}/{}", id.0, id.1),
                seq,
                records,
                rejected_so_far = n,
                "frame refused for good (REJECT): {reason}"
            );
        }
    }
}

/// Why a DATA frame was not written.
#[derive(Debug, thiserror::Error)]
pub enum FrameFault {
    /// The frame can never be written: its content is invalid, or the output can never take
    /// it. Answered with REJECT (the shipper gives it another fate); the connection goes on.
    #[error("refused for good: {0}")]
    Refused(String),
    /// We could not write now (disk full, I/O error): answered with ERROR and the connection
    /// closed without ACK; the shipper backs off and resends.
    #[error("cannot write now: {0}")]
    Write(io::Error),
}

/// Serves the connections handed to `shard` until the process exits.
pub async fn serve(
    shard: Rc<RefCell<Shard>>,
    mut inbox: mpsc::UnboundedReceiver<HandOff>,
    open: Arc<AtomicUsize>,
    budget: Arc<FrameBudget>,
    registry: Arc<Registry<ReceiverCounters>>,
) {
    let (s, r) = (shard.clone(), registry.clone());
    tokio_uring::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
            let s = s.borrow();
            r.publish(s.index, s.counters.clone());
        }
    });
    while let Some(h) = inbox.recv().await {
        let shard = shard.clone();
        let open = open.clone();
        let budget = budget.clone();
        tokio_uring::spawn(async move {
            let peer = h.peer;
            let name = h.hello.name.clone();
            shard.borrow_mut().counters.connections_open += 1;
            if let Err(e) = connection(&shard, h, &budget).await {
                tracing::warn!(%peer, shipper = %name, "connection closed: {e}");
            }
            shard.borrow_mut().counters.connections_open -= 1;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connection(
    shard: &Rc<RefCell<Shard>>,
    h: HandOff,
    budget: &FrameBudget,
) -> io::Result<()> {
    let stream = TlsStream::from_parts(h.tcp, h.tls);
    let id = h.id;
    let (frame_bytes_max, idle_timeout) = {
        let r = &shard.borrow().config.receiver;
        (r.frame_bytes_max, Duration::from_millis(r.idle_timeout_ms))
    };
    let mut dec = FrameDecoder::new(frame_bytes_max);
    dec.push(&h.pending);
    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut plain = Vec::new();
    let mut replies = Vec::new();
    let mut open = true;
    // Frames taken out of the decoder so far; the room reserved for the frame being read, and
    // how many had been taken out when it was reserved.
    let mut decoded = 0u64;
    let mut room: Option<(Reservation, u64)> = None;
    loop {
        loop {
            let f = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(refuse(shard, &stream, Refusal::Frame, e.to_string()).await),
            };
            decoded += 1;
            frame(shard, &stream, id, f, &mut replies).await?;
        }
        // The frame the room was for is handled (and out of the decoder): give it back before
        // anything is awaited, and so that asking again for the next frame queues behind those
        // already waiting.
        if room.as_ref().is_some_and(|(_, at)| *at != decoded) {
            room = None;
        }
        if !replies.is_empty() {
            let sent = stream.send(&replies).await;
            replies.clear();
            if open {
                sent?;
            }
        }
        if !open {
            // The peer closed; what it sent before is written and would have been acked.
            return Ok(());
        }
        let awaited = dec.payload_awaited().filter(|&n| n > FRAME_PAYLOAD_UNRESERVED_BYTES);
        if let (Some(len), None) = (awaited, &room) {
            room = Some((make_room(shard, &stream, budget, len).await?, decoded));
        }
        let read = tokio::time::timeout(idle_timeout, stream.recv(buf, &mut plain)).await;
        let Ok((res, b)) = read else {
            let e = "no frame within idle_timeout_ms".to_string();
            return Err(refuse(shard, &stream, Refusal::Idle, e).await);
        };
        buf = b;
        open = res?;
        dec.push(&plain);
        plain.clear();
    }
}

/// Handles one frame, adding its reply to `replies`. An error ends the connection, the peer
/// told why when it can be.
async fn frame(
    shard: &Rc<RefCell<Shard>>,
    stream: &TlsStream,
    id: StreamId,
    f: Frame,
    replies: &mut Vec<u8>,
) -> io::Result<()> {
    let h = f.header;
    match h.kind {
        Kind::Data => {
            let result = shard.borrow_mut().data(id, &f);
            // Written or refused: its payload is let go before anything is awaited.
            drop(f);
            match result {
                Ok(()) => {
                    replies.extend(Frame::control(Kind::Ack, h.seq, &[]));
                    shard.borrow_mut().counters.frames_acked += 1;
                }
                Err(FrameFault::Refused(e)) => {
                    shard.borrow_mut().rejected(id, &h, &e);
                    replies.extend(Frame::control(Kind::Reject, h.seq, e.as_bytes()));
                }
                Err(FrameFault::Write(e)) => {
                    shard.borrow_mut().counters.write_errors += 1;
                    let (seq, run, sender_worker) = (h.seq, id.0, id.1);
                    let text = format!("cannot write frame {seq} now: {e}");
                    tracing::error!("{text} (from {run:016x}/{sender_worker}); not acknowledged");
                    replies.extend(Frame::control(Kind::Error, 0, text.as_bytes()));
                    let _ = stream.send(replies).await;
                    return Err(e);
                }
            }
        }
        Kind::Heartbeat => replies.extend(Frame::control(Kind::Heartbeat, h.seq, &[])),
        k => {
            let e = format!("unexpected {k:?} frame");
            return Err(refuse(shard, stream, Refusal::Frame, e).await);
        }
    }
    Ok(())
}

/// Reserves room for the `len` payload bytes of the frame whose header just came, before any
/// more of it is read: at once when there is, else waiting in line, the connection not read
/// meanwhile (TCP pushes back on the peer), up to `frames_in_progress_wait_ms`. Still without
/// room, the connection is refused: the shipper backs off and resends.
async fn make_room(
    shard: &Rc<RefCell<Shard>>,
    stream: &TlsStream,
    budget: &FrameBudget,
    len: u32,
) -> io::Result<Reservation> {
    if let Ok(room) = budget.try_reserve(len) {
        return Ok(room);
    }
    shard.borrow_mut().counters.frames_waited += 1;
    let wait_ms = shard.borrow().config.receiver.frames_in_progress_wait_ms;
    match budget.reserve(len, Duration::from_millis(wait_ms)).await {
        Ok(room) => Ok(room),
        Err(_) => {
            let bytes_max = budget.bytes_max();
            let e = format!(
                "busy: no room for a frame of {len} payload bytes within \
                 frames_in_progress_wait_ms {wait_ms} (frames_in_progress_bytes_max \
                 {bytes_max} in use by other frames); try again later"
            );
            Err(refuse(shard, stream, Refusal::Memory, e).await)
        }
    }
}

/// Counts a refused connection, tells the peer why (ERROR), and shuts the socket down; the
/// error to end the connection with.
async fn refuse(
    shard: &Rc<RefCell<Shard>>,
    stream: &TlsStream,
    reason: Refusal,
    message: String,
) -> io::Error {
    shard.borrow_mut().counters.connections_refused[reason as usize] += 1;
    let _ = stream.send(&Frame::control(Kind::Error, 0, message.as_bytes())).await;
    // A read still in the ring (after an idle timeout) would hold the socket open until the
    // peer acts: shut it down so the descriptor goes now.
    stream.shutdown();
    io::Error::new(io::ErrorKind::InvalidData, message)
}
