//! Frames owned by a worker until a receiver acknowledges them.
//!
//! # Design constraints
//! - At most `bytes_max` bytes of frames held (queued plus in flight), at most
//!   `inflight_frames_max` frames sent and unacknowledged. Sequence numbers are dense: one is taken
//!   only when a frame is accepted, so the receiver's de-duplication window stays contiguous.
//!
//! # Operation
//! `push` queues a sealed frame; `next` hands the lowest queued frame to a connection and
//! records it as in flight on that connection; `ack` releases it; `fail` puts every frame in
//! flight on a failed connection back at the front of the queue, in sequence order.
//!
//! Frames carrying a durable source's entries (journal: they have checkpoint marks) must
//! reach the receiver in order. A receiver writes the frames of one connection in order but
//! those of two connections in any order, so such frames are in flight on one connection at a
//! time: another connection takes the next one only once all of them are acknowledged (or
//! their connection failed and put them back). Other frames go on any connection.
//!
//! A frame a receiver refused for good (REJECT) leaves the window with [`Outbox::reject`].
//! When it is to try the dead-letter tier, it comes back in the *rejected lane*
//! ([`Outbox::push_rejected`]): only dead-letter connections take from it
//! ([`Outbox::next_rejected`]), whatever tier takes the other frames, so a refused frame never
//! waits in front of the frames behind it.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use super::batch::Sealed;

#[derive(Debug)]
pub struct InFlight {
    pub frame: Rc<Sealed>,
    pub conn: u64,
    pub sent_ns: u64,
    /// Taken from the rejected lane (on its way to a dead-letter receiver).
    pub rejected: bool,
    /// Counted in the ordered frames in flight.
    ordered: bool,
}

pub struct Outbox {
    next_seq: u64,
    queue: VecDeque<Rc<Sealed>>,
    /// Frames refused by a receiver, waiting for a dead-letter connection.
    rejected: VecDeque<Rc<Sealed>>,
    inflight: BTreeMap<u64, InFlight>,
    bytes: usize,
    bytes_max: usize,
    inflight_frames_max: usize,
    /// Ordered frames in flight, and the connection carrying them (while there are any).
    ordered: usize,
    ordered_conn: u64,
}

impl Outbox {
    pub fn new(bytes_max: usize, inflight_frames_max: usize) -> Outbox {
        Outbox {
            next_seq: 1,
            queue: VecDeque::new(),
            rejected: VecDeque::new(),
            inflight: BTreeMap::new(),
            bytes: 0,
            bytes_max,
            inflight_frames_max,
            ordered: 0,
            ordered_conn: 0,
        }
    }

    /// The sequence number the next accepted frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether a frame of `bytes` would fit.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.bytes + bytes <= self.bytes_max || self.is_empty()
    }

    /// Queues `frame` (sealed with [`Outbox::next_seq`]); gives it back when there is no room,
    /// unless it carries entries of a durable source, which pauses before the outbox is full
    /// (so such a frame overshoots the bound by at most one batch).
    pub fn push(&mut self, frame: Sealed) -> Result<(), Sealed> {
        assert_eq!(frame.seq, self.next_seq, "frame sealed with a stale sequence number");
        if !self.has_room(frame.wire.len()) && frame.marks.is_empty() {
            return Err(frame);
        }
        self.next_seq += 1;
        self.bytes += frame.wire.len();
        self.queue.push_back(Rc::new(frame));
        Ok(())
    }

    /// The next frame to send on connection `conn`, if any is queued and the in-flight window
    /// has room. Returns the frame and whether it is a resend.
    pub fn next(&mut self, conn: u64, now_ns: u64) -> Option<Rc<Sealed>> {
        if self.inflight.len() >= self.inflight_frames_max {
            return None;
        }
        let front = self.queue.front()?;
        let ordered = !front.marks.is_empty();
        if ordered {
            if self.ordered > 0 && self.ordered_conn != conn {
                return None;
            }
            self.ordered += 1;
            self.ordered_conn = conn;
        }
        let frame = self.queue.pop_front().expect("looked at above");
        let f = InFlight { frame: frame.clone(), conn, sent_ns: now_ns, rejected: false, ordered };
        self.inflight.insert(frame.seq, f);
        Some(frame)
    }

    /// The next frame of the rejected lane for dead-letter connection `conn`, if the in-flight
    /// window has room.
    pub fn next_rejected(&mut self, conn: u64, now_ns: u64) -> Option<Rc<Sealed>> {
        if self.inflight.len() >= self.inflight_frames_max {
            return None;
        }
        let frame = self.rejected.pop_front()?;
        let f = InFlight {
            frame: frame.clone(),
            conn,
            sent_ns: now_ns,
            rejected: true,
            ordered: false,
        };
        self.inflight.insert(frame.seq, f);
        Some(frame)
    }

    /// Frames refused by a receiver wait for a dead-letter connection.
    pub fn has_rejected(&self) -> bool {
        !self.rejected.is_empty()
    }

    /// Releases frame `seq`; `None` if it was not in flight (a late duplicate ack).
    pub fn ack(&mut self, seq: u64) -> Option<InFlight> {
        let done = self.inflight.remove(&seq)?;
        self.bytes -= done.frame.wire.len();
        if done.ordered {
            self.ordered -= 1;
        }
        Some(done)
    }

    /// Frame `seq` was refused for good by the receiver it was sent to: it leaves the outbox
    /// like an acknowledged one (the caller decides its fate). `None` if it was not in flight.
    pub fn reject(&mut self, seq: u64) -> Option<InFlight> {
        self.ack(seq)
    }

    /// Takes back a refused frame into the rejected lane, for a dead-letter connection.
    pub fn push_rejected(&mut self, frame: Rc<Sealed>) {
        self.bytes += frame.wire.len();
        self.rejected.push_back(frame);
    }

    /// Empties the rejected lane (no dead-letter receiver can take it any more).
    pub fn take_rejected(&mut self) -> Vec<Rc<Sealed>> {
        let frames: Vec<_> = self.rejected.drain(..).collect();
        self.bytes -= frames.iter().map(|f| f.wire.len()).sum::<usize>();
        frames
    }

    /// Puts the frames in flight on `conn` back at the front of their queue (the rejected
    /// lane for those taken from it); returns how many.
    pub fn fail(&mut self, conn: u64) -> usize {
        let seqs: Vec<u64> =
            self.inflight.iter().filter(|(_, f)| f.conn == conn).map(|(s, _)| *s).collect();
        for seq in seqs.iter().rev() {
            let f = self.inflight.remove(seq).expect("listed above");
            if f.ordered {
                self.ordered -= 1;
            }
            if f.rejected {
                self.rejected.push_front(f.frame);
            } else {
                self.queue.push_front(f.frame);
            }
        }
        seqs.len()
    }

    /// Connections holding a frame sent before `deadline_ns` and still unacknowledged.
    pub fn overdue(&self, deadline_ns: u64) -> Vec<u64> {
        let mut conns: Vec<u64> =
            self.inflight.values().filter(|f| f.sent_ns < deadline_ns).map(|f| f.conn).collect();
        conns.sort_unstable();
        conns.dedup();
        conns
    }

    /// Frames in flight on connection `conn`.
    pub fn inflight_on(&self, conn: u64) -> usize {
        self.inflight.values().filter(|f| f.conn == conn).count()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty() && self.rejected.is_empty()
    }

    pub fn frames(&self) -> usize {
        self.queue.len() + self.inflight.len() + self.rejected.len()
    }

    /// Records in every frame held.
    pub fn records(&self) -> u64 {
        let queued = self.queue.iter().chain(&self.rejected).map(|f| u64::from(f.records));
        queued.chain(self.inflight.values().map(|f| u64::from(f.frame.records))).sum()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes held plus `more` stay within the bound (a durable source reads only then).
    pub fn fits(&self, more: usize) -> bool {
        self.bytes + more <= self.bytes_max
    }

    /// Everything still held, for counting at shutdown.
    pub fn drain(&mut self) -> Vec<Rc<Sealed>> {
        let mut all: Vec<Rc<Sealed>> = self.inflight.values().map(|f| f.frame.clone()).collect();
        all.extend(self.queue.drain(..));
        all.extend(self.rejected.drain(..));
        self.inflight.clear();
        self.bytes = 0;
        self.ordered = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, bytes: usize) -> Sealed {
        Sealed::for_test(seq, bytes, 1, 0)
    }

    #[test]
    fn window_failures_and_resend_order() {
        let mut o = Outbox::new(1000, 2);
        for s in 1..=3 {
            o.push(frame(s, 100)).unwrap();
        }
        assert_eq!(o.next(7, 0).unwrap().seq, 1);
        assert_eq!(o.next(8, 0).unwrap().seq, 2);
        assert!(o.next(7, 0).is_none(), "window of 2 is full");
        assert_eq!(o.overdue(1), vec![7, 8]);
        assert_eq!(o.fail(7), 1);
        // Frame 1 goes out again before frame 3.
        assert_eq!(o.next(8, 5).unwrap().seq, 1);
        assert!(o.ack(2).is_some());
        assert!(o.ack(2).is_none(), "a duplicate ack releases nothing");
        assert_eq!(o.next(8, 5).unwrap().seq, 3);
        assert_eq!((o.frames(), o.bytes()), (2, 200));
    }

    fn ordered(seq: u64) -> Sealed {
        let mut f = frame(seq, 100);
        f.marks = Box::new([(0, format!("cursor {seq}"))]);
        f
    }

    #[test]
    fn ordered_frames_travel_on_one_connection_at_a_time() {
        let mut o = Outbox::new(10_000, 8);
        o.push(ordered(1)).unwrap();
        o.push(ordered(2)).unwrap();
        o.push(frame(3, 100)).unwrap();
        o.push(ordered(4)).unwrap();
        assert_eq!(o.next(7, 0).unwrap().seq, 1);
        assert!(o.next(8, 0).is_none(), "frame 2 must follow frame 1 on connection 7");
        assert_eq!(o.next(7, 0).unwrap().seq, 2);
        assert!(o.ack(1).is_some());
        assert_eq!(o.next(8, 0).unwrap().seq, 3, "an unordered frame goes anywhere");
        assert!(o.next(8, 0).is_none(), "frame 4 waits for frame 2's ack or failure");
        // Connection 7 fails: frame 2 comes back first and may now go on connection 8.
        assert_eq!(o.fail(7), 1);
        assert_eq!(o.next(8, 0).unwrap().seq, 2);
        assert!(o.next(7, 0).is_none());
        assert_eq!(o.next(8, 0).unwrap().seq, 4);
        assert!(o.ack(2).is_some() && o.ack(4).is_some());
        o.push(ordered(5)).unwrap();
        assert_eq!(o.next(7, 0).unwrap().seq, 5, "with none in flight, any connection");
    }

    #[test]
    fn a_rejected_frame_leaves_the_window_and_waits_only_for_dead_letter_connections() {
        let mut o = Outbox::new(10_000, 8);
        o.push(ordered(1)).unwrap();
        o.push(frame(2, 100)).unwrap();
        assert_eq!(o.next(7, 0).unwrap().seq, 1);
        let refused = o.reject(1).unwrap();
        assert_eq!((o.bytes(), o.frames()), (100, 1));
        o.push_rejected(refused.frame);
        assert!(o.has_rejected());
        assert_eq!(o.next(7, 0).unwrap().seq, 2, "the frame behind it goes on");
        assert_eq!(o.next_rejected(9, 0).unwrap().seq, 1);
        assert!(!o.has_rejected());
        // The dead-letter connection fails: the frame goes back to the rejected lane only.
        assert_eq!(o.fail(9), 1);
        assert!(o.next(7, 0).is_none());
        assert_eq!(o.next_rejected(9, 0).unwrap().seq, 1);
        assert!(o.ack(1).is_some() && o.ack(2).is_some());
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
        // An ordered frame after the rejected one is not held back by it.
        o.push(ordered(3)).unwrap();
        assert_eq!(o.next(8, 0).unwrap().seq, 3);
        o.push(frame(4, 100)).unwrap();
        assert_eq!(o.next(8, 0).unwrap().seq, 4);
        let refused = o.reject(4).unwrap();
        o.push_rejected(refused.frame);
        assert_eq!(o.take_rejected().len(), 1);
        assert_eq!(o.bytes(), 100);
    }

    #[test]
    fn bounded_by_bytes_and_dense_sequence() {
        let mut o = Outbox::new(250, 8);
        o.push(frame(1, 100)).unwrap();
        o.push(frame(2, 100)).unwrap();
        assert!(o.push(frame(3, 100)).is_err());
        assert_eq!(o.next_seq(), 3, "a refused frame takes no sequence number");
        // An empty outbox takes one frame even over the limit, so a huge batch is not stuck.
        let mut o = Outbox::new(10, 8);
        assert!(o.push(frame(1, 100)).is_ok());
        // A frame of a durable source is never refused (its source pauses before this).
        let mut durable = frame(2, 100);
        durable.marks = Box::new([(0, "cursor".into())]);
        assert!(o.push(durable).is_ok());
        assert!(!o.fits(1));
    }
}
