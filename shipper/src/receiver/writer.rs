//! A receiver shard's writer: the thread that owns the shard's outputs, its commit log and
//! its de-duplication windows, and makes the frames its connections read durable, a group at
//! a time.
//!
//! # Design constraints
//! - Blocking is this thread's job, never the shard's io_uring thread's: decompression, the
//!   outputs' writes, `fdatasync`, a ClickHouse insert or a Kafka produce waiting for the
//!   broker all happen here. Meanwhile the shard goes on reading frames and answering
//!   heartbeats.
//! - Group commit: the frames queued while a group is being made durable form the next one
//!   (at most [`GROUP_FRAMES_MAX`] frames and [`GROUP_RAW_BYTES_MAX`] decompressed bytes as
//!   their headers declare), over every connection of the shard. Each frame is checked,
//!   decoded and written to the outputs in the order it arrived; then one
//!   [`Output::sync`] per output that took records of the group, then the commit records of
//!   every frame written, appended with one `fdatasync`; then each frame is answered. A lone
//!   frame is a group of one: nothing waits for a group to fill.
//! - One frame at a time, in order, on one thread: a frame already written (its window holds
//!   it) or written earlier in the same group is a duplicate, answered with the group.
//! - A writer sees every frame of the streams its shard owns, from any shard's connections:
//!   a frame that carries an origin (sent again from a shipper's disk buffer) comes to the
//!   writer owning the origin's stream and is de-duplicated and committed there, and its
//!   connection's number comes to the writer owning the connection's stream as a booking (a
//!   commit record without marks), so each window stays whole in one writer.
//! - A frame that can never be written (invalid content, a name an output refuses for good)
//!   is answered REJECT, taken back from the outputs that wrote it, and the group goes on.
//!   A write that fails for now ends the group's writing there: the frames before it are
//!   made durable and acknowledged, it and those after are answered "cannot write now". A
//!   sync that fails takes the whole group back from every output
//!   ([`Output::discard`]), and so does a commit that fails (cut off the log first, see
//!   [`super::output`]): neither is acknowledged, and shippers resend.
//! - Memory: the queued frames' payloads are held within the receiver's frame budget (each
//!   job carries its [`Reservation`]); a group's decompressed payloads are made one frame at
//!   a time (one buffer, at most 4 MiB kept between frames, [`SCRATCH_KEEP_BYTES_MAX`]); an
//!   output may hold what it builds from a whole group (a ClickHouse insert: about the
//!   group's decompressed bytes plus 30 per record, up to 6 times that for control bytes).
//! - Figures: the thread keeps its own counters and copies them, once per group (and once a
//!   second while no frame comes, after its outputs' [tick](Output::tick)), where the shard's
//!   publisher reads them ([`Writer::figures`]): a lock held for a copy, never across a write.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::budget::Reservation;
use super::commit::CommitLog;
use super::dedup::{StreamId, Window};
use super::output::{Output, Records, WriteError, Written};
use super::server::owner;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::{OutputCounters, ReceiverCounters};
use crate::protocol::frame::{FLAG_DEAD_LETTER, FLAG_ORIGIN, FLAG_ZSTD};
use crate::protocol::{Frame, Origin, RecordIter};

/// Frames in one group commit at most.
pub const GROUP_FRAMES_MAX: usize = 256;
/// Decompressed bytes (as the frames' headers declare) in one group at most, unless its
/// first frame alone is larger.
pub const GROUP_RAW_BYTES_MAX: u64 = 32 << 20;
/// How long the writer waits for a frame before it lets its outputs [tick](Output::tick).
const TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Capacity of the decompression buffer kept between frames.
const SCRATCH_KEEP_BYTES_MAX: usize = 4 << 20;

/// A DATA frame read by a connection, on its way to the writer owning the stream it is
/// de-duplicated under.
pub struct Job {
    /// The stream and sequence number the frame is de-duplicated and committed under: its
    /// connection's, or its origin's when it carries one (see [`crate::protocol::Origin`]).
    pub id: StreamId,
    pub seq: u64,
    /// The sending shipper's name, from its HELLO.
    pub sender: Arc<str>,
    /// `None`: only book `seq` as written in `id`'s window, with a commit record naming no
    /// marks: the number a connection gave a frame that carries an origin (written under
    /// that), so the connection stream's window stays contiguous.
    pub frame: Option<Frame>,
    /// Room the payload holds in the receiver's frame budget, given back once it is answered.
    pub room: Option<Reservation>,
    /// Called once with what became of the frame (on the writer's thread).
    pub answer: Box<dyn FnOnce(Verdict) + Send>,
}

/// What became of a DATA frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Durable in every output that took its records, and committed (or written before).
    Ack,
    /// It can never be written: REJECT with the reason; the connection goes on.
    Reject(String),
    /// It could not be written now: ERROR with the reason, the connection closes, the
    /// shipper resends.
    Error(String),
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

/// What a frame of the group being written came to, before the group is durable.
enum Step {
    Written,
    /// A booking job's number, staged.
    Booked,
    /// Written before: in a window, or earlier in this group (`in_group`).
    Duplicate {
        in_group: bool,
    },
    Rejected(String),
    Failed(String),
}

/// A shard's writer, owned by its thread.
pub struct Writer {
    index: usize,
    /// Where frames' records go ([`super::output::open`]), in the order they are written.
    outputs: Vec<Box<dyn Output>>,
    /// Whether each output took records since its last sync.
    unsynced: Vec<bool>,
    /// What each output took of the group being written, counted once it is committed.
    taken: Vec<Written>,
    commits: CommitLog,
    windows: HashMap<StreamId, Window>,
    counters: ReceiverCounters,
    /// Where the shard's publisher reads `counters` ([`Writer::figures`]).
    published: Arc<Mutex<ReceiverCounters>>,
    config: Arc<ReceiverConfig>,
    scratch: Vec<u8>,
}

impl Writer {
    pub fn new(
        index: usize,
        outputs: Vec<Box<dyn Output>>,
        commits: CommitLog,
        windows: HashMap<StreamId, Window>,
        config: Arc<ReceiverConfig>,
    ) -> Writer {
        let mut counters = ReceiverCounters::new(index.to_string());
        counters.outputs = outputs.iter().map(|o| OutputCounters::new(o.name().into())).collect();
        let n = outputs.len();
        Writer {
            index,
            outputs,
            unsynced: vec![false; n],
            taken: vec![Written::default(); n],
            commits,
            windows,
            published: Arc::new(Mutex::new(counters.clone())),
            counters,
            config,
            scratch: Vec::new(),
        }
    }

    /// Where the writer's figures are copied after every group.
    pub fn figures(&self) -> Arc<Mutex<ReceiverCounters>> {
        self.published.clone()
    }

    /// Writes the jobs queued in `jobs`, a group at a time, until every sender is gone.
    pub fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut group = Vec::new();
        let raw_len = |job: &Job| job.frame.as_ref().map_or(0, |f| u64::from(f.header.raw_len));
        loop {
            let first = match jobs.recv_timeout(TICK_INTERVAL) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut raw = raw_len(&first);
            group.push(first);
            while group.len() < GROUP_FRAMES_MAX && raw < GROUP_RAW_BYTES_MAX {
                let Ok(job) = jobs.try_recv() else { break };
                raw += raw_len(&job);
                group.push(job);
            }
            self.write_group(&mut group);
        }
    }

    /// Lets every output do what waits on the clock alone ([`Output::tick`]), then publishes
    /// what they report.
    fn tick(&mut self) {
        for (output, c) in self.outputs.iter_mut().zip(&mut self.counters.outputs) {
            output.tick();
            output.report(c);
        }
        self.publish();
    }

    /// Writes, syncs and commits one group, then answers each of its frames.
    fn write_group(&mut self, group: &mut Vec<Job>) {
        let started = Instant::now();
        let mut steps = Vec::with_capacity(group.len());
        let mut written: HashSet<(StreamId, u64)> = HashSet::new();
        let mut failed: Option<String> = None;
        let mut booked = false;
        for job in group.iter() {
            let step = match &job.frame {
                Some(frame) => self.step(job, frame, &mut written, &mut failed),
                None => self.book(job),
            };
            booked |= matches!(step, Step::Booked);
            steps.push(step);
        }
        let staged = booked || !written.is_empty();
        let durable = if staged { self.make_durable() } else { Ok(()) };
        match &durable {
            Ok(()) => self.committed(group, &steps),
            Err(e) => {
                self.taken.fill(Written::default());
                let frames = written.len();
                self.counters.write_errors += frames as u64;
                tracing::error!("cannot write {frames} frames now: {e}; not acknowledged");
            }
        }
        if !written.is_empty() {
            self.counters.write_us.record(started.elapsed().as_micros() as u64);
            self.counters.group_frames.record(written.len() as u64);
        }
        // Figures first, so that whoever hears an answer finds them counted.
        self.publish();
        for (job, step) in group.drain(..).zip(steps) {
            // What the connection calls it (the origin's number is the writer's business).
            let seq = job.frame.as_ref().map_or(job.seq, |f| f.header.seq);
            let verdict = match (step, &durable) {
                (Step::Rejected(e), _) => Verdict::Reject(e),
                (Step::Failed(e), _) => Verdict::Error(e),
                (Step::Duplicate { in_group: false }, _) => Verdict::Ack,
                (_, Ok(())) => Verdict::Ack,
                (_, Err(e)) => Verdict::Error(format!("cannot write frame {seq} now: {e}")),
            };
            (job.answer)(verdict);
        }
        if durable.is_ok() && self.commits.needs_compaction() {
            if let Err(e) = self.compact() {
                tracing::error!(shard = self.index, "cannot compact the commit log: {e}");
            }
        }
    }

    /// Stages the commit record of a booking job (no marks), unless its number is booked
    /// already.
    fn book(&mut self, job: &Job) -> Step {
        if self.windows.get(&job.id).is_some_and(|w| w.contains(job.seq)) {
            return Step::Duplicate { in_group: false };
        }
        self.commits.stage(job.id, job.seq, &[]);
        Step::Booked
    }

    /// Checks, decodes and writes one frame of a group; stages its commit record.
    fn step(
        &mut self,
        job: &Job,
        frame: &Frame,
        written: &mut HashSet<(StreamId, u64)>,
        failed: &mut Option<String>,
    ) -> Step {
        let h = frame.header;
        if let Some(e) = failed {
            return Step::Failed(format!("cannot write frame {} now: {e}", h.seq));
        }
        if written.contains(&(job.id, job.seq)) {
            self.counters.frames_duplicate += 1;
            return Step::Duplicate { in_group: true };
        }
        if self.windows.get(&job.id).is_some_and(|w| w.contains(job.seq)) {
            self.counters.frames_duplicate += 1;
            return Step::Duplicate { in_group: false };
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.decode_and_write(job, frame, &mut scratch);
        // Kept for the next frame, but not a large frame's worth of it.
        if scratch.capacity() <= SCRATCH_KEEP_BYTES_MAX {
            self.scratch = scratch;
        }
        match result {
            Ok(()) => {
                written.insert((job.id, job.seq));
                Step::Written
            }
            Err(FrameFault::Refused(e)) => {
                self.rejected(job.id, &h, &e);
                Step::Rejected(e)
            }
            Err(FrameFault::Write(e)) => {
                let (run, sender_worker) = (job.id.0, job.id.1);
                tracing::error!(
                    "cannot write frame {} now: {e} (from {run:016x}/{sender_worker}); \
                     not acknowledged",
                    h.seq
                );
                self.counters.write_errors += 1;
                *failed = Some(e.to_string());
                Step::Failed(format!("cannot write frame {} now: {e}", h.seq))
            }
        }
    }

    fn decode_and_write(
        &mut self,
        job: &Job,
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
        let wire: &[u8] = match h.flags & FLAG_ORIGIN {
            0 => &f.payload,
            _ => match Origin::split(&f.payload) {
                Some((_, records)) => records,
                None => return Err(invalid("payload shorter than its origin".into())),
            },
        };
        let payload: &[u8] = match h.flags & !(FLAG_DEAD_LETTER | FLAG_ORIGIN) {
            FLAG_ZSTD => {
                scratch.clear();
                scratch.reserve(h.raw_len as usize);
                zstd::bulk::Decompressor::new()
                    .and_then(|mut d| d.decompress_to_buffer(wire, scratch))
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
            0 => wire,
            other => return Err(invalid(format!("unknown flags {other:#x}"))),
        };
        RecordIter::validate(payload, h.count).map_err(|e| invalid(e.to_string()))?;
        let records = Records { payload, count: h.count, dead_letter, sender: &job.sender };
        self.write(job.id, job.seq, h.seq, &records)?;
        self.counters.frame_records.record(h.count.into());
        Ok(())
    }

    /// Writes a frame's validated records to every output and stages its commit record
    /// (`seq` in stream `id`; `wire_seq` is the connection's number, for messages): it is
    /// acknowledged once its group is durable.
    fn write(
        &mut self,
        id: StreamId,
        seq: u64,
        wire_seq: u64,
        records: &Records,
    ) -> Result<(), FrameFault> {
        let mut taken = Vec::with_capacity(self.outputs.len());
        for i in 0..self.outputs.len() {
            let started = Instant::now();
            let result = self.outputs[i].write(records, &mut self.commits);
            let c = &mut self.counters.outputs[i];
            match result {
                Ok(w) => {
                    if w.records > 0 {
                        c.write_us.record(started.elapsed().as_micros() as u64);
                    }
                    taken.push(w);
                }
                Err(e) => {
                    c.errors += 1;
                    c.up = matches!(e, WriteError::Refused(_));
                    let name = self.outputs[i].name();
                    let fault = match e {
                        WriteError::Refused(_) => {
                            FrameFault::Refused(format!("frame {wire_seq}: {e}"))
                        }
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
        let mut marks = Vec::new();
        for output in &self.outputs {
            output.marks(&mut marks);
        }
        self.commits.stage(id, seq, &marks);
        for (i, w) in taken.into_iter().enumerate() {
            self.unsynced[i] |= w.records > 0;
            self.taken[i].records += w.records;
            self.taken[i].bytes += w.bytes;
        }
        Ok(())
    }

    /// Has every output that took records since its last sync make them durable, then
    /// appends the staged commit records (one `fdatasync`). A failed sync or commit takes the
    /// group back from every output.
    fn make_durable(&mut self) -> io::Result<()> {
        for i in 0..self.outputs.len() {
            if !self.unsynced[i] {
                continue;
            }
            let started = Instant::now();
            let result = self.outputs[i].sync();
            let c = &mut self.counters.outputs[i];
            c.sync_us.record(started.elapsed().as_micros() as u64);
            c.up = result.is_ok();
            if let Err(e) = result {
                c.errors += 1;
                self.outputs.iter_mut().for_each(|o| o.discard());
                self.unsynced.fill(false);
                self.commits.unstage();
                let name = self.outputs[i].name();
                return Err(io::Error::new(e.kind(), format!("{name}: {e}")));
            }
        }
        self.unsynced.fill(false);
        // A failed commit was cut off the log again (see `CommitLog::flush`).
        if let Err(e) = self.commits.flush() {
            self.outputs.iter_mut().for_each(|o| o.discard());
            return Err(io::Error::new(e.kind(), format!("commit log: {e}")));
        }
        self.outputs.iter_mut().for_each(|o| o.committed());
        Ok(())
    }

    /// Books a durable group: its frames join their windows, the outputs' figures grow.
    fn committed(&mut self, group: &[Job], steps: &[Step]) {
        let now = super::commit::unix_s();
        for (job, step) in group.iter().zip(steps) {
            if !matches!(step, Step::Written | Step::Booked) {
                continue;
            }
            let window = self.windows.entry(job.id).or_default();
            window.insert(job.seq);
            window.written_unix_s = now;
            if let Some(f) = &job.frame {
                let h = f.header;
                self.counters.records_written += u64::from(h.count);
                if h.flags & FLAG_DEAD_LETTER != 0 {
                    self.counters.records_dead_letter += u64::from(h.count);
                }
            }
        }
        for ((output, c), taken) in
            self.outputs.iter().zip(&mut self.counters.outputs).zip(&mut self.taken)
        {
            self.counters.bytes_written += taken.bytes;
            c.records += taken.records;
            c.bytes += taken.bytes;
            *taken = Written::default();
            output.report(c);
        }
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

    fn publish(&self) {
        self.published.lock().expect("writer figures poisoned").clone_from(&self.counters);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc::{channel, Receiver, Sender};

    use super::*;
    use crate::protocol::frame::Header;
    use crate::protocol::records::RecordWriter;
    use crate::protocol::Kind;
    use crate::receiver::output::files::{test_config, Files};

    /// What the probe output saw, in order: `write:N` (records), `sync`, `undo`, `discard`,
    /// `committed`.
    type Calls = Arc<Mutex<Vec<String>>>;

    /// An output that records its calls; its syncs wait for a go from the test (`gate`) and
    /// fail while `fail` is set.
    struct Probe {
        calls: Calls,
        started: Sender<()>,
        gate: Receiver<()>,
        fail: Arc<Mutex<bool>>,
    }

    impl Output for Probe {
        fn name(&self) -> &str {
            "probe"
        }
        fn write(&mut self, records: &Records, _: &mut dyn Intents) -> Result<Written, WriteError> {
            self.calls.lock().unwrap().push(format!("write:{}", records.count));
            Ok(Written { records: records.count.into(), bytes: records.payload.len() as u64 })
        }
        fn sync(&mut self) -> io::Result<()> {
            self.started.send(()).unwrap();
            self.gate.recv().unwrap();
            self.calls.lock().unwrap().push("sync".into());
            match *self.fail.lock().unwrap() {
                true => Err(io::Error::other("probe down")),
                false => Ok(()),
            }
        }
        fn undo(&mut self) {
            self.calls.lock().unwrap().push("undo".into());
        }
        fn discard(&mut self) {
            self.calls.lock().unwrap().push("discard".into());
        }
        fn committed(&mut self) {
            self.calls.lock().unwrap().push("committed".into());
        }
        fn marks<'a>(&'a self, _: &mut Vec<Mark<'a>>) {}
        fn checkpoint<'a>(&'a self, _: &mut Vec<Mark<'a>>) {}
        fn report(&self, _: &mut OutputCounters) {}
    }

    use super::super::output::{Intents, Mark};

    struct Rig {
        jobs: Sender<Job>,
        answers: Receiver<(u64, Verdict)>,
        answer_tx: Sender<(u64, Verdict)>,
        started: Receiver<()>,
        gate: Sender<()>,
        calls: Calls,
        fail: Arc<Mutex<bool>>,
        figures: Arc<Mutex<ReceiverCounters>>,
    }

    /// A writer on its own thread with a files output in `dir` (first) and a probe.
    fn rig(dir: &Path) -> Rig {
        let config: ReceiverConfig = toml::from_str(&format!(
            "[receiver]\nlisten = \"127.0.0.1:1\"\nworkers = 1\n\
             [tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n\
             [output]\ndirectory = {:?}\n",
            dir.join("out")
        ))
        .unwrap();
        let files = Files::new(&test_config(&dir.join("out"), 1 << 20, 16), 1, 0);
        let (started_tx, started) = channel();
        let (gate, gate_rx) = channel();
        let calls = Calls::default();
        let fail = Arc::new(Mutex::new(false));
        let probe =
            Probe { calls: calls.clone(), started: started_tx, gate: gate_rx, fail: fail.clone() };
        let modes = crate::os::Modes::DEFAULT;
        std::fs::create_dir_all(super::super::commit::state_dir(dir)).unwrap();
        let commits = CommitLog::create(dir, 0, true, modes).unwrap();
        let outputs: Vec<Box<dyn Output>> = vec![Box::new(files), Box::new(probe)];
        let writer = Writer::new(0, outputs, commits, HashMap::new(), Arc::new(config));
        let figures = writer.figures();
        let (jobs, queue) = channel();
        std::thread::spawn(move || writer.run(queue));
        let (answer_tx, answers) = channel();
        Rig { jobs, answers, answer_tx, started, gate, calls, fail, figures }
    }

    impl Rig {
        /// Queues frame `seq` of stream (1, 0) holding the line `line:SEQ` of stream `s`.
        fn send(&self, seq: u64) {
            let mut payload = Vec::new();
            RecordWriter::push(&mut payload, b"s", format!("line:{seq}").as_bytes());
            let len = payload.len() as u32;
            let header = Header { kind: Kind::Data, flags: 0, seq, count: 1, raw_len: len, len };
            let tx = self.answer_tx.clone();
            let answer = Box::new(move |v| tx.send((seq, v)).unwrap());
            let frame = Some(Frame { header, payload });
            let job = Job { id: (1, 0), seq, sender: "test".into(), frame, room: None, answer };
            self.jobs.send(job).unwrap();
        }

        /// Queues frame `seq` of stream (2, 0) carrying origin `origin` of stream (1, 0) and
        /// the line `line:ORIGIN`, as a shard does: the booking of `seq`, then the frame
        /// filed under its origin.
        fn send_origin(&self, seq: u64, origin: u64) {
            let o = Origin { run_id: 1, core: 0, seq: origin };
            let mut records = Vec::new();
            RecordWriter::push(&mut records, b"s", format!("line:{origin}").as_bytes());
            let raw_len = records.len() as u32;
            let payload = [&o.encode()[..], &records].concat();
            let (kind, flags, len) = (Kind::Data, FLAG_ORIGIN, payload.len() as u32);
            let header = Header { kind, flags, seq, count: 1, raw_len, len };
            let tx = self.answer_tx.clone();
            let answer = Box::new(move |v| tx.send((seq, v)).unwrap());
            let (id, sender) = ((2, 0), Arc::<str>::from("test"));
            let book = Job {
                id,
                seq,
                sender: sender.clone(),
                frame: None,
                room: None,
                answer: Box::new(|_| {}),
            };
            self.jobs.send(book).unwrap();
            let frame = Some(Frame { header, payload });
            let job = Job { id: (1, 0), seq: origin, sender, frame, room: None, answer };
            self.jobs.send(job).unwrap();
        }

        /// Lets the sync in progress finish (after waiting for it to start).
        fn release(&self) {
            self.started.recv().unwrap();
            self.gate.send(()).unwrap();
        }

        fn answers(&self, n: usize) -> Vec<(u64, Verdict)> {
            (0..n).map(|_| self.answers.recv().unwrap()).collect()
        }

        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    fn lines(dir: &Path) -> String {
        let stream = dir.join("out/s");
        let mut text = String::new();
        for f in std::fs::read_dir(stream).unwrap() {
            text += &std::fs::read_to_string(f.unwrap().path()).unwrap();
        }
        text
    }

    #[test]
    fn frames_queued_during_a_sync_are_made_durable_together() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        r.send(1);
        // The first group is frame 1 alone; frames 2..=5 (and duplicates of 1 and 3) queue
        // while its sync waits.
        r.started.recv().unwrap();
        for seq in [2, 3, 1, 4, 3, 5] {
            r.send(seq);
        }
        r.gate.send(()).unwrap();
        assert_eq!(r.answers(1), [(1, Verdict::Ack)]);
        r.release();
        let acks: Vec<_> = [2, 3, 1, 4, 3, 5].iter().map(|&s| (s, Verdict::Ack)).collect();
        assert_eq!(r.answers(6), acks);
        let one = ["write:1", "sync", "committed"];
        let four = ["write:1", "write:1", "write:1", "write:1", "sync", "committed"];
        assert_eq!(r.calls(), [&one[..], &four[..]].concat());
        assert_eq!(lines(dir.path()), "line:1\nline:2\nline:3\nline:4\nline:5\n");
        let f = r.figures.lock().unwrap().clone();
        let groups = (f.group_frames.hist.len(), f.group_frames.sum);
        assert_eq!((groups, f.frames_duplicate, f.records_written), ((2, 5), 2, 5));
        // Every frame committed, one record each: a restart finds them all written.
        drop(r);
        let state =
            super::super::commit::recover(dir.path(), 3600, crate::os::Modes::DEFAULT, |_| Ok(()))
                .unwrap();
        assert!((1..=5).all(|seq| state.windows[&(1, 0)].contains(seq)));
        assert!(!state.windows[&(1, 0)].contains(6));
    }

    #[test]
    fn a_failed_sync_takes_the_group_back_from_every_output() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        *r.fail.lock().unwrap() = true;
        r.send(1);
        r.started.recv().unwrap();
        r.send(2);
        r.gate.send(()).unwrap();
        let e = |seq| Verdict::Error(format!("cannot write frame {seq} now: probe: probe down"));
        assert_eq!(r.answers(1), [(1, e(1))]);
        r.release();
        assert_eq!(r.answers(1), [(2, e(2))]);
        assert_eq!(lines(dir.path()), "", "the files output cut both groups back");
        *r.fail.lock().unwrap() = false;
        r.send(2);
        r.release();
        assert_eq!(r.answers(1), [(2, Verdict::Ack)]);
        assert_eq!(lines(dir.path()), "line:2\n");
        let failed = ["write:1", "sync", "discard"];
        assert_eq!(
            r.calls(),
            [&failed[..], &failed[..], &["write:1", "sync", "committed"]].concat()
        );
        let f = r.figures.lock().unwrap().clone();
        assert_eq!((f.write_errors, f.records_written, f.outputs[1].errors), (2, 1, 2));
    }

    // Guards against a frame replayed from a shipper's disk buffer being written a second
    // time: it is de-duplicated under its origin, not under the number its connection gave.
    #[test]
    fn a_frame_with_an_origin_is_written_once_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        r.send(1);
        r.release();
        r.send(2);
        r.release();
        assert_eq!(r.answers(2), [(1, Verdict::Ack), (2, Verdict::Ack)]);
        // The next run sends frame 2 again (written, its ack lost), then frame 3 (never
        // written), as its own frames 1 and 2, each carrying its origin; then frame 3 again.
        // A duplicate takes nothing to an output: no sync to release.
        r.send_origin(1, 2);
        assert_eq!(r.answers(1), [(1, Verdict::Ack)]);
        r.send_origin(2, 3);
        r.release();
        assert_eq!(r.answers(1), [(2, Verdict::Ack)]);
        r.send_origin(2, 3);
        assert_eq!(r.answers(1), [(2, Verdict::Ack)]);
        assert_eq!(lines(dir.path()), "line:1\nline:2\nline:3\n");
        let f = r.figures.lock().unwrap().clone();
        assert_eq!((f.frames_duplicate, f.records_written), (2, 3));
        drop(r);
        let modes = crate::os::Modes::DEFAULT;
        let state = super::super::commit::recover(dir.path(), 3600, modes, |_| Ok(())).unwrap();
        let origin = &state.windows[&(1, 0)];
        assert_eq!((origin.below, origin.above.len()), (4, 0), "frames 1..=3 of the first run");
        let booked = &state.windows[&(2, 0)];
        assert_eq!((booked.below, booked.above.len()), (3, 0), "the second run's 1 and 2");
    }
}
