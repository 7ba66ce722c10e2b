//! A receiver shard's connections: one io_uring thread serving the sender streams (run,
//! core) that [`super::server::owner`] routes to it. It reads their frames, hands DATA frames
//! to the shard's writer thread ([`super::writer`]) and answers each once the writer says
//! what became of it; it never blocks on an output.
//!
//! # Design constraints
//! - Two tasks per connection on the shard's thread: the reader (frames in, jobs to the
//!   writer) and the answerer (ACK, REJECT, ERROR and heartbeat echoes out, batched into one
//!   send per wake), so a connection keeps reading while its frames are written, and
//!   heartbeats are echoed while a group is being made durable.
//! - Per connection at most [`CONNECTION_FRAMES_PENDING_MAX`] frames queued to the writer
//!   and not yet answered; past that the connection is not read (TCP pushes back on the
//!   peer). Every queued frame's payload holds room in the receiver's frame budget
//!   ([`super::budget`]) until it is answered.
//! - Memory per connection: the decoder's buffer (at most one frame plus one read) and the
//!   replies of one wake.
//!
//! # Operation (per connection)
//! Read frames (each within `idle_timeout_ms`; a frame over 64 KiB only with room reserved for
//! its payload, else ERROR `busy` after `frames_in_progress_wait_ms`; a smaller one reserves
//! its room once read, waiting the same way). A DATA frame goes to the writer, which checks,
//! writes and commits it with the others of its group; then ACK, or REJECT for a frame that
//! can never be written (the connection goes on: the shipper gives it another fate), or ERROR
//! "cannot write now" naming the output, after which the connection is closed without ACK and
//! the shipper backs off and resends. HEARTBEATs are echoed. A stream that is not valid
//! frames (bad magic, checksum, size, an unexpected kind) gets an ERROR naming the problem
//! and is closed. Each output's records, bytes, errors, latencies and state are counted apart
//! by the writer (label `output`).

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use super::budget::{FrameBudget, Reservation, FRAME_PAYLOAD_UNRESERVED_BYTES};
use super::dedup::{sender_run, StreamId};
use super::server::{owner, HandOff};
use super::writer::{Job, Verdict};
use crate::config::ReceiverConfig;
use crate::fault::Fault;
use crate::metrics::receiver::{ReceiverCounters, Refusal};
use crate::metrics::{Registry, PUBLISH_INTERVAL_MS};
use crate::protocol::frame::FLAG_ORIGIN;
use crate::protocol::{Frame, FrameDecoder, Kind, Origin};
use crate::tls::stream::{TlsStream, READ_BYTES};

/// DATA frames a connection may have queued to the writer and not yet answered.
pub const CONNECTION_FRAMES_PENDING_MAX: usize = 64;
/// Origin streams (see [`crate::protocol::Origin`]) one connection's frames may name; the
/// frames of any further one are de-duplicated under the connection's own stream and counted
/// (`shipper_receiver_frames_origin_ignored_total`). A shipper names one per earlier run and
/// worker whose frames it replays, so a peer cannot make a writer open windows without bound.
pub const CONNECTION_ORIGIN_STREAMS_MAX: usize = 64;

/// A receiver shard's connection side, owned by its thread.
pub struct Shard {
    /// Which shard: `0..receiver.workers`, what [`super::server::owner`] returns.
    pub index: usize,
    /// Its connections' figures; the writer's are in `written`.
    pub counters: ReceiverCounters,
    pub config: Arc<ReceiverConfig>,
    /// Every shard's writer thread's queue, by shard index: a frame goes to the writer
    /// owning the stream it is de-duplicated under ([`Reader::identity`]).
    writers: Vec<std::sync::mpsc::Sender<Job>>,
    /// The writer's figures ([`super::writer::Writer::figures`]).
    written: Arc<Mutex<ReceiverCounters>>,
}

impl Shard {
    pub fn new(
        index: usize,
        config: Arc<ReceiverConfig>,
        writers: Vec<std::sync::mpsc::Sender<Job>>,
        written: Arc<Mutex<ReceiverCounters>>,
    ) -> Shard {
        let counters = ReceiverCounters::new(index.to_string());
        Shard { index, counters, config, writers, written }
    }

    /// The shard's figures: the writer's, with the connections' own.
    fn figures(&self) -> ReceiverCounters {
        let mut c = self.written.lock().expect("writer figures poisoned").clone();
        c.add_connection_figures(&self.counters);
        c
    }
}

/// What a connection's answerer sends.
enum Reply {
    /// What became of DATA frame `seq`.
    Data { seq: u64, verdict: Verdict },
    /// A DATA frame was written, its ACK held back ([`Fault::HoldAcks`]).
    Held,
    /// Echo of a heartbeat.
    Heartbeat(u64),
    /// ERROR with this message, then the connection is shut down.
    Refuse(String),
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
            r.publish(s.index, s.figures());
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

/// Serves one connection: its reader and its answerer, until both are done.
async fn connection(
    shard: &Rc<RefCell<Shard>>,
    h: HandOff,
    budget: &FrameBudget,
) -> io::Result<()> {
    let stream = TlsStream::from_parts(h.tcp, h.tls);
    let (replies, answers) = mpsc::unbounded_channel();
    let pending = Semaphore::new(CONNECTION_FRAMES_PENDING_MAX);
    let peer_closed = Cell::new(false);
    let sender = Arc::from(h.hello.name.as_str());
    let reader = Reader {
        shard,
        stream: &stream,
        id: h.id,
        certificate: h.certificate.clone(),
        origins: RefCell::new(Vec::new()),
        hold_acks: [Fault::HoldAcks, Fault::HoldAllAcks].map(crate::fault::injected),
        sender,
        budget,
        replies,
        pending: &pending,
    };
    let (read, answered) = tokio::join!(
        reader.run(&h.pending, &peer_closed),
        answer(shard, &stream, answers, &pending, &peer_closed)
    );
    // The answerer's error first: after an ERROR it shut the socket down, ending the reader.
    answered.and(read)
}

/// A connection's reading half.
struct Reader<'a> {
    shard: &'a Rc<RefCell<Shard>>,
    stream: &'a TlsStream,
    id: StreamId,
    /// The client certificate (DER), mixed into the run of an origin as into the HELLO's.
    certificate: Arc<[u8]>,
    /// The origin streams its frames named so far: (run id, core) as sent, and the stream
    /// it is filed under; at most [`CONNECTION_ORIGIN_STREAMS_MAX`].
    origins: RefCell<Vec<((u64, u16), StreamId)>>,
    /// Test only ([`crate::fault`]): acknowledge only frames that carry an origin; none.
    hold_acks: [bool; 2],
    /// The shipper's name, from its HELLO.
    sender: Arc<str>,
    budget: &'a FrameBudget,
    /// To the answerer (dropped when the reader ends: the answerer ends once the writer has
    /// answered every frame queued).
    replies: mpsc::UnboundedSender<Reply>,
    /// Room for frames queued and not yet answered.
    pending: &'a Semaphore,
}

impl Reader<'_> {
    /// Reads frames until the peer closes (`peer_closed` set), the connection is refused, or
    /// the answerer ends it.
    async fn run(self, first: &[u8], peer_closed: &Cell<bool>) -> io::Result<()> {
        let (frame_bytes_max, idle_timeout) = {
            let r = &self.shard.borrow().config.receiver;
            (r.frame_bytes_max, Duration::from_millis(r.idle_timeout_ms))
        };
        let mut dec = FrameDecoder::new(frame_bytes_max);
        dec.push(first);
        let mut buf = Vec::with_capacity(READ_BYTES);
        let mut plain = Vec::new();
        // The room reserved for the frame being read, when its payload is over the allowance.
        let mut room: Option<Reservation> = None;
        loop {
            loop {
                let f = match dec.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(self.refuse(Refusal::Frame, e.to_string())),
                };
                self.frame(f, room.take()).await?;
            }
            if peer_closed.get() {
                // What it sent before is queued: the answerer answers it.
                return Ok(());
            }
            let awaited = dec.payload_awaited().filter(|&n| n > FRAME_PAYLOAD_UNRESERVED_BYTES);
            if let (Some(len), None) = (awaited, &room) {
                room = Some(self.make_room(len).await?);
            }
            let read = tokio::time::timeout(idle_timeout, self.stream.recv(buf, &mut plain)).await;
            let Ok((res, b)) = read else {
                let e = "no frame within idle_timeout_ms".to_string();
                return Err(self.refuse(Refusal::Idle, e));
            };
            buf = b;
            peer_closed.set(!res?);
            dec.push(&plain);
            plain.clear();
        }
    }

    /// Handles one frame: a DATA frame is queued to the writer (with `room`, or room reserved
    /// now), a heartbeat echoed; anything else ends the connection.
    async fn frame(&self, f: Frame, room: Option<Reservation>) -> io::Result<()> {
        let h = f.header;
        match h.kind {
            Kind::Data => {
                let room = match room {
                    Some(room) => Some(room),
                    None if f.payload.is_empty() => None,
                    None => Some(self.make_room(f.payload.len() as u32).await?),
                };
                let Ok(slot) = self.pending.acquire().await else {
                    return Err(io::Error::other("closed while frames were being written"));
                };
                slot.forget();
                let replies = self.replies.clone();
                let [new, all] = self.hold_acks;
                let hold = all || (new && h.flags & FLAG_ORIGIN == 0);
                let answer = Box::new(move |verdict| {
                    let reply = match verdict {
                        Verdict::Ack if hold => Reply::Held,
                        verdict => Reply::Data { seq: h.seq, verdict },
                    };
                    let _ = replies.send(reply);
                });
                let mut shard = self.shard.borrow_mut();
                shard.counters.frames_received += 1;
                let (id, seq, writer) = self.identity(&f, &mut shard);
                let sender = self.sender.clone();
                if (id, seq) != (self.id, h.seq) {
                    // The connection's own number for it is booked, so that its stream's
                    // window stays contiguous (nothing else is ever sent under it).
                    let (id, seq, sender) = (self.id, h.seq, sender.clone());
                    let book = Job { id, seq, sender, frame: None, room: None, answer: noop() };
                    queue(&shard.writers[shard.index], book);
                }
                let job = Job { id, seq, sender, frame: Some(f), room, answer };
                queue(&shard.writers[writer], job);
            }
            Kind::Heartbeat => {
                let _ = self.replies.send(Reply::Heartbeat(h.seq));
            }
            k => return Err(self.refuse(Refusal::Frame, format!("unexpected {k:?} frame"))),
        }
        Ok(())
    }

    /// The stream and sequence number DATA frame `f` is de-duplicated under, and the shard
    /// whose writer owns that stream: the frame's origin when it carries one (its run mixed
    /// with this connection's certificate, as the HELLO's run is), else the connection's own.
    /// An origin past [`CONNECTION_ORIGIN_STREAMS_MAX`], or one that names sequence number
    /// 0 (never given), is ignored and counted.
    fn identity(&self, f: &Frame, shard: &mut Shard) -> (StreamId, u64, usize) {
        let own = (self.id, f.header.seq, shard.index);
        if f.header.flags & FLAG_ORIGIN == 0 {
            return own;
        }
        // A payload too short for its origin is refused by the writer.
        let Some((origin, _)) = Origin::split(&f.payload) else {
            return own;
        };
        shard.counters.frames_origin += 1;
        let mut origins = self.origins.borrow_mut();
        let key = (origin.run_id, origin.core);
        let known = origins.iter().find(|(k, _)| *k == key).map(|&(_, id)| id);
        let id = known.or_else(|| {
            (origins.len() < CONNECTION_ORIGIN_STREAMS_MAX).then(|| {
                let id = (sender_run(&self.certificate, origin.run_id), origin.core);
                origins.push((key, id));
                id
            })
        });
        match id {
            Some(id) if origin.seq > 0 => (id, origin.seq, owner(id, shard.writers.len())),
            _ => {
                shard.counters.frames_origin_ignored += 1;
                own
            }
        }
    }

    /// Reserves room for the `len` payload bytes of a frame: at once when there is, else
    /// waiting in line, the connection not read meanwhile (TCP pushes back on the peer), up
    /// to `frames_in_progress_wait_ms`. Still without room, the connection is refused: the
    /// shipper backs off and resends.
    async fn make_room(&self, len: u32) -> io::Result<Reservation> {
        if let Ok(room) = self.budget.try_reserve(len) {
            return Ok(room);
        }
        self.shard.borrow_mut().counters.frames_waited += 1;
        let wait_ms = self.shard.borrow().config.receiver.frames_in_progress_wait_ms;
        match self.budget.reserve(len, Duration::from_millis(wait_ms)).await {
            Ok(room) => Ok(room),
            Err(_) => {
                let bytes_max = self.budget.bytes_max();
                let e = format!(
                    "busy: no room for a frame of {len} payload bytes within \
                     frames_in_progress_wait_ms {wait_ms} (frames_in_progress_bytes_max \
                     {bytes_max} in use by other frames); try again later"
                );
                Err(self.refuse(Refusal::Memory, e))
            }
        }
    }

    /// Counts a refused connection and has the answerer tell the peer why (ERROR) and shut
    /// the socket down; the error to end the connection with.
    fn refuse(&self, reason: Refusal, message: String) -> io::Error {
        self.shard.borrow_mut().counters.connections_refused[reason as usize] += 1;
        let _ = self.replies.send(Reply::Refuse(message.clone()));
        io::Error::new(io::ErrorKind::InvalidData, message)
    }
}

/// Queues `job` to a shard's writer.
fn queue(writer: &std::sync::mpsc::Sender<Job>, job: Job) {
    if writer.send(job).is_err() {
        unreachable!("a shard's writer thread ends only by a panic, which ends the process");
    }
}

/// The answer of a job nobody waits for.
fn noop() -> Box<dyn FnOnce(Verdict) + Send> {
    Box::new(|_| {})
}

/// A connection's answering half: sends what its reader and the writer reply, all that is
/// ready in one send, until the reader is done and every queued frame is answered, an ERROR
/// is sent (the socket is then shut down, waking the reader), or a send fails.
async fn answer(
    shard: &Rc<RefCell<Shard>>,
    stream: &TlsStream,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    pending: &Semaphore,
    peer_closed: &Cell<bool>,
) -> io::Result<()> {
    let mut out = Vec::new();
    while let Some(first) = replies.recv().await {
        out.clear();
        let mut end = None;
        let mut next = Some(first);
        while let Some(reply) = next {
            match reply {
                Reply::Data { seq, verdict } => {
                    pending.add_permits(1);
                    match verdict {
                        Verdict::Ack => {
                            out.extend(Frame::control(Kind::Ack, seq, &[]));
                            shard.borrow_mut().counters.frames_acked += 1;
                        }
                        Verdict::Reject(e) => {
                            out.extend(Frame::control(Kind::Reject, seq, e.as_bytes()));
                        }
                        Verdict::Error(e) => end = Some(e),
                    }
                }
                Reply::Held => pending.add_permits(1),
                Reply::Heartbeat(seq) => out.extend(Frame::control(Kind::Heartbeat, seq, &[])),
                Reply::Refuse(e) => end = Some(e),
            }
            if let Some(e) = &end {
                out.extend(Frame::control(Kind::Error, 0, e.as_bytes()));
                break;
            }
            next = replies.try_recv().ok();
        }
        let sent = stream.send(&out).await;
        let failed = match (end, sent) {
            (Some(e), _) => Some(io::Error::new(io::ErrorKind::InvalidData, e)),
            (None, Err(e)) if !peer_closed.get() => Some(e),
            _ => None,
        };
        if let Some(e) = failed {
            // A read still in the ring would hold the socket open until the peer acts: shut
            // it down so the reader ends and the descriptor goes now; a reader waiting for
            // room to queue a frame ends too.
            stream.shutdown();
            pending.close();
            return Err(e);
        }
    }
    Ok(())
}
