//! What the worker does when a frame's fate is known: acknowledged, refused for good
//! (REJECT: the dead-letter tier, the quarantine or a counted drop), or read back from the
//! disk buffer; and what its connections ([`Link`]) and disk buffer ([`Spill`]) may ask of it.

use std::path::Path;
use std::rc::Rc;

use tokio::sync::Notify;

use super::Worker;
use crate::buffer::{DiskBuffer, Spill};
use crate::config::shipper::Tier;
use crate::metrics::ledger::Fate;
use crate::sinks::delivery::{Delivery, Link, Sealed};
use crate::transforms::services::DropReason;

/// Longest receiver reason kept for a refused frame (its log line and `.reason` file).
const REASON_BYTES_MAX: usize = 1024;

impl Worker {
    /// `frame`'s fate is decided for good (acknowledged, or refused and then kept or dropped):
    /// the buffer segment it came from and its sources' marks may move past it.
    fn release(&mut self, frame: &Sealed) {
        if let (Some(ordinal), Some(b)) = (frame.origin, self.buffer.as_mut()) {
            b.acked(ordinal);
        }
        for (source, _) in &frame.marks {
            if let Some(m) = &self.marks[*source] {
                m.borrow_mut().settled(frame.seq);
            }
        }
        self.delivery.wake.notify_waiters();
    }

    /// Gives a refused frame to the quarantine, or drops and counts it when there is none or
    /// it is full.
    fn quarantine_or_drop(&mut self, frame: Rc<Sealed>, receiver: &str, reason: &str) {
        let Some(q) = self.quarantine.clone() else {
            self.log_reject(&frame, receiver, reason, "dropped (no quarantine.directory)");
            self.count_dropped(&frame, DropReason::Rejected);
            return self.release(&frame);
        };
        let mut text = format!("receiver: {receiver}\nreason: {reason}\n");
        text.push_str(&format!("seq: {}\nrecords: {}\n", frame.seq, frame.records));
        for (s, n) in &frame.services {
            text.push_str(&format!("service {}: {n}\n", String::from_utf8_lossy(s)));
        }
        let pushed = q.borrow_mut().push(frame.clone(), text);
        match pushed {
            Ok(()) => {
                let fate = format!("kept in the quarantine ({})", q.borrow().dir().display());
                self.log_reject(&frame, receiver, reason, &fate);
            }
            Err(frame) => {
                self.log_reject(&frame, receiver, reason, "dropped (quarantine full)");
                self.count_dropped(&frame, DropReason::Rejected);
                self.release(&frame);
            }
        }
    }

    /// Logs a refused frame and its fate: every one while they are rare, then the 16th, 32nd,
    /// 64th, ... (a misconfiguration can have every frame refused).
    fn log_reject(&self, frame: &Sealed, receiver: &str, reason: &str, fate: &str) {
        let n = self.counters.frames_rejected;
        if n <= 8 || n.is_power_of_two() {
            tracing::warn!(core = self.index, %receiver, seq = frame.seq, records = frame.records, rejected_so_far = n, "receiver refused a frame for good: {reason}; {fate}");
        }
    }

    /// Settles the frames the quarantine wrote (or failed to) since the last call.
    pub fn settle_quarantined(&mut self) {
        let Some(q) = self.quarantine.clone() else {
            return;
        };
        let (kept, failed) = q.borrow_mut().take_settled();
        for f in &kept {
            self.settle(f, Fate::Quarantined);
            self.release(f);
        }
        for f in &failed {
            self.count_dropped(f, DropReason::Rejected);
            self.release(f);
        }
    }

    /// An evicted segment's file at `path` is deleted (or could not be): counts its records
    /// as dropped, `counts` per service.
    fn count_evicted(&mut self, path: &Path, counts: &[(Rc<[u8]>, u64)]) {
        let now = self.clock.now_ns();
        for (name, n) in counts {
            self.chain.services.dropped(name, *n, DropReason::BufferFull, now);
        }
        if let Some(b) = self.buffer.as_mut() {
            b.counters.segments_dropped += 1;
        }
        let records: u64 = counts.iter().map(|c| c.1).sum();
        tracing::warn!(path = %path.display(), records, "disk buffer full: dropped its oldest segment (when_full = drop_oldest)");
    }
}

impl Link for Worker {
    fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    fn delivery_mut(&mut self) -> &mut Delivery {
        &mut self.delivery
    }

    fn acked(&mut self, seq: u64, now_ns: u64) {
        if let Some(done) = self.delivery.outbox.ack(seq) {
            self.counters.frames_acked += 1;
            self.counters.records_acked += u64::from(done.frame.records);
            let us = now_ns.saturating_sub(done.frame.first_ns) / 1000;
            self.counters.latency_us.record(us);
            self.settle(&done.frame, Fate::Delivered);
            self.release(&done.frame);
            self.seal_if_idle();
        }
    }

    /// It never goes back to the queue: it goes to the dead-letter tier if one may take it
    /// and it was not refused there already, else to the quarantine, else it is dropped and
    /// counted.
    fn rejected(&mut self, seq: u64, reason: &[u8], dest: usize) {
        let Some(done) = self.delivery.outbox.reject(seq) else {
            return;
        };
        self.counters.frames_rejected += 1;
        let reason = String::from_utf8_lossy(&reason[..reason.len().min(REASON_BYTES_MAX)]);
        let d = &self.delivery.dests.list[dest];
        let (tier, receiver) = (d.tier, d.address.clone());
        if tier != Tier::DeadLetter && self.delivery.dests.dead_letter_available() {
            self.log_reject(&done.frame, &receiver, &reason, "sent to the dead-letter tier");
            self.delivery.outbox.push_rejected(done.frame);
            self.delivery.wake.notify_waiters();
            return;
        }
        self.quarantine_or_drop(done.frame, &receiver, &reason);
    }

    fn up(&mut self, dest: usize) {
        let change = self.delivery.up(dest);
        self.delivery.failed_over(change, "a receiver recovered");
    }

    /// Refused frames waiting for the dead-letter tier go to the quarantine once it is down.
    fn down(&mut self, dest: usize, reason: &str) {
        let change = self.delivery.down(dest, reason);
        let d = &mut self.delivery;
        if d.outbox.has_rejected() && !d.dests.dead_letter_available() {
            let address = d.dests.list[dest].address.clone();
            let why = format!("refused earlier, and the dead-letter tier is down too ({reason})");
            for frame in d.outbox.take_rejected() {
                self.quarantine_or_drop(frame, &address, &why);
            }
        }
        self.delivery.failed_over(change, reason);
    }
}

impl Spill for Worker {
    fn worker(&self) -> usize {
        self.index
    }

    fn buffer(&self) -> &DiskBuffer {
        self.buffer.as_ref().expect("buffer tasks run only with a buffer")
    }

    fn buffer_mut(&mut self) -> &mut DiskBuffer {
        self.buffer.as_mut().expect("buffer tasks run only with a buffer")
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn wake(&self) -> Rc<Notify> {
        self.delivery.wake.clone()
    }

    fn dropped(&mut self, frame: &Sealed, reason: DropReason) {
        self.count_dropped(frame, reason);
    }

    fn buffered(&mut self, frame: &Sealed) {
        self.settle(frame, Fate::Buffered);
    }

    fn replay_wanted(&self) -> bool {
        !self.delivery.stopping && self.delivery.dests.active().is_some()
    }

    fn feed(&mut self) {
        let Some(b) = self.buffer.as_mut() else { return };
        if crate::buffer::io::feed_outbox(b, &mut self.delivery.outbox) > 0 {
            self.delivery.wake.notify_waiters();
        }
    }

    fn evicted(&mut self, path: &Path, counts: &[(Rc<[u8]>, u64)]) {
        self.count_evicted(path, counts);
    }
}
