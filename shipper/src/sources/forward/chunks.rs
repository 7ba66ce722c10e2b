//! Acknowledging chunks: which chunk ids the source has seen (over every worker: a resent
//! chunk may come back on a connection another worker accepted), and when a chunk's records
//! are settled on this worker (the durable-marks seam, [`crate::sources::Marks`]).
//!
//! Each record of a chunk carries as its mark its ordinal in this worker's hand-over order
//! (hex). Frames settle in order ([`Settling`]), so once the settled prefix reaches ordinal
//! `n`, every admitted record up to `n` is settled; a chunk waits for the ordinal of its last
//! admitted record, and a chunk the chain dropped whole (rate limit) is settled at once.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use crate::sources::persist::Settling;
use crate::sources::Marks;

/// Most connections waiting for one chunk's ack (the first copy's and resends'); past it the
/// oldest waiter goes (its client resends again, and is answered then).
const WAITERS_MAX: usize = 8;

/// What a connection's writer task is asked to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// `{"ack": chunk}`.
    Ack(Box<[u8]>),
    /// Nothing of ours: TLS records rustls wants written (a key update).
    Flush,
}

/// Where a chunk's ack goes: a connection's writer task.
pub type Waiter = UnboundedSender<Answer>;

/// What [`Registry::admit`] decided about a chunk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// New: hand over its records; the connection is answered when they settle.
    New,
    /// Seen before: its records are not handed over again; the connection is answered when
    /// the first copy settles (at once if it has).
    Resent,
    /// Every remembered id still waits for its records: try again later.
    Full,
}

enum Entry {
    Pending(Vec<Waiter>),
    Acked,
}

struct Table {
    entries: HashMap<Box<[u8]>, Entry>,
    /// Acknowledged ids, oldest first: the first forgotten when the table is full.
    acked: VecDeque<Box<[u8]>>,
    max: usize,
}

/// The chunk ids of one forward source, shared by its workers. The lock is taken once per
/// chunk (a message with the `chunk` option), never per record, and held for one hash-map
/// operation and at most [`WAITERS_MAX`] channel sends (which never block).
pub struct Registry {
    table: Mutex<Table>,
}

impl Registry {
    /// Remembers at most `max` ids, pending and acknowledged.
    pub fn new(max: usize) -> Arc<Registry> {
        assert!(max > 0, "chunks_max is validated to be positive");
        let table = Table { entries: HashMap::new(), acked: VecDeque::new(), max };
        Arc::new(Registry { table: Mutex::new(table) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding it leaves a consistent table (no invariant spans two steps).
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message carries chunk `id` for `waiter`'s connection. Also returns whether an
    /// acknowledged id was forgotten to make room.
    pub fn admit(&self, id: &[u8], waiter: &Waiter) -> (Admission, bool) {
        let mut t = self.lock();
        match t.entries.get_mut(id) {
            Some(Entry::Pending(waiters)) => {
                waiters.retain(|w| !w.is_closed());
                if waiters.len() == WAITERS_MAX {
                    waiters.remove(0);
                }
                waiters.push(waiter.clone());
                return (Admission::Resent, false);
            }
            Some(Entry::Acked) => {
                let _ = waiter.send(Answer::Ack(id.into()));
                return (Admission::Resent, false);
            }
            None => {}
        }
        let mut forgot = false;
        if t.entries.len() >= t.max {
            let Some(old) = t.acked.pop_front() else { return (Admission::Full, false) };
            t.entries.remove(&old);
            forgot = true;
        }
        t.entries.insert(id.into(), Entry::Pending(vec![waiter.clone()]));
        (Admission::New, forgot)
    }

    /// Chunk `id`'s records are settled: every connection waiting for it is answered, and a
    /// resend from now on is answered at once.
    pub fn settle(&self, id: &[u8]) {
        let mut t = self.lock();
        let Some(entry) = t.entries.get_mut(id) else { return };
        if let Entry::Pending(waiters) = std::mem::replace(entry, Entry::Acked) {
            for w in waiters {
                let _ = w.send(Answer::Ack(id.into()));
            }
            t.acked.push_back(id.into());
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One worker's side of a forward source's chunks: its records' ordinals, the frames
/// holding them, and the chunks waiting for them.
pub struct Acks {
    registry: Arc<Registry>,
    /// Ordinal of the last record handed over (the first is 1).
    handed: u64,
    settling: Settling<u64>,
    /// Every admitted record up to this ordinal is settled.
    through: u64,
    /// Chunks handed over, with the ordinal of their last admitted record, in order.
    waiting: VecDeque<(u64, Box<[u8]>)>,
}

impl Acks {
    pub fn new(registry: Arc<Registry>) -> Acks {
        Acks {
            registry,
            handed: 0,
            settling: Settling::default(),
            through: 0,
            waiting: VecDeque::new(),
        }
    }

    /// The next record's ordinal, and its mark (hex) written into `buf`.
    pub fn next<'b>(&mut self, buf: &'b mut [u8; 16]) -> (u64, &'b [u8]) {
        self.handed += 1;
        (self.handed, hex(self.handed, buf))
    }

    /// Chunk `id`'s records are all handed over; the last the chain admitted is
    /// `last_admitted` (none: nothing to wait for).
    pub fn handed(&mut self, id: &[u8], last_admitted: Option<u64>) {
        match last_admitted {
            Some(n) if n > self.through => self.waiting.push_back((n, id.into())),
            _ => self.registry.settle(id),
        }
    }

    /// Chunks handed over and not settled yet.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// `n` in lower-case hex, without leading zeros.
fn hex(mut n: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

impl Marks for Acks {
    fn sealed(&mut self, seq: u64, mark: String) {
        let n = u64::from_str_radix(&mark, 16);
        debug_assert!(n.is_ok(), "a forward source's mark: {mark:?}");
        self.settling.sealed(seq, n.unwrap_or(0));
    }

    fn settled(&mut self, seq: u64) {
        let mut through = self.through;
        if !self.settling.settled(seq, |n| through = through.max(n)) {
            return;
        }
        self.through = through;
        while self.waiting.front().is_some_and(|w| w.0 <= through) {
            let (_, id) = self.waiting.pop_front().expect("checked above");
            self.registry.settle(&id);
        }
    }

    /// Nothing is kept across runs: a chunk not acknowledged is resent by its client.
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;

    fn acks_of(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Answer>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Answer::Ack(id)) = rx.try_recv() {
            out.push(String::from_utf8(id.into()).unwrap());
        }
        out
    }

    #[test]
    fn a_chunk_is_acked_once_its_last_admitted_record_settles_in_frame_order() {
        let registry = Registry::new(16);
        let mut acks = Acks::new(registry.clone());
        let (tx, mut rx) = unbounded_channel();
        let mut buf = [0u8; 16];
        // Chunk a: records 1, 2 (frame 10 holds 1, frame 11 holds 2); chunk b: record 3
        // dropped by the chain; chunk c: record 4 in frame 11.
        for id in ["a", "b", "c"] {
            assert_eq!(registry.admit(id.as_bytes(), &tx), (Admission::New, false));
        }
        assert_eq!(acks.next(&mut buf).1, b"1");
        acks.sealed(10, "1".into());
        acks.next(&mut buf);
        acks.handed(b"a", Some(2));
        acks.next(&mut buf);
        acks.handed(b"b", None);
        assert_eq!(acks_of(&mut rx), ["b"], "nothing of b to wait for");
        assert_eq!(acks.next(&mut buf).1, b"4");
        acks.handed(b"c", Some(4));
        acks.sealed(11, "4".into());
        acks.settled(11);
        assert!(acks_of(&mut rx).is_empty(), "frame 10 is outstanding");
        acks.settled(10);
        assert_eq!(acks_of(&mut rx), ["a", "c"]);
        assert_eq!(acks.waiting(), 0);
    }

    #[test]
    fn resends_wait_for_the_first_copy_and_the_table_is_bounded() {
        let registry = Registry::new(2);
        let (first, mut rx1) = unbounded_channel();
        let (again, mut rx2) = unbounded_channel();
        assert_eq!(registry.admit(b"a", &first), (Admission::New, false));
        assert_eq!(registry.admit(b"a", &again), (Admission::Resent, false));
        assert!(acks_of(&mut rx2).is_empty(), "pending: answered when it settles");
        assert_eq!(registry.admit(b"b", &first), (Admission::New, false));
        assert_eq!(registry.admit(b"c", &first), (Admission::Full, false), "both pending");
        registry.settle(b"a");
        assert_eq!((acks_of(&mut rx1), acks_of(&mut rx2)), (vec!["a".into()], vec!["a".into()]));
        assert_eq!(registry.admit(b"a", &again), (Admission::Resent, false));
        assert_eq!(acks_of(&mut rx2), ["a"], "acked: answered at once");
        assert_eq!(registry.admit(b"c", &first), (Admission::New, true), "a forgotten");
        assert_eq!(registry.len(), 2);
        assert_eq!(registry.admit(b"a", &again), (Admission::Full, false));
    }

    #[test]
    fn marks_are_short_hex() {
        let mut buf = [0u8; 16];
        assert_eq!(hex(0, &mut buf), b"0");
        assert_eq!(hex(0xabc, &mut buf), b"abc");
        assert_eq!(hex(u64::MAX, &mut buf), b"ffffffffffffffff");
    }
}
