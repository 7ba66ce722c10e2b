//! Which frames of a sender stream (run id, core) have been written.
//!
//! # Design constraints
//! - Per stream: a watermark below which every sequence number is written, plus the written
//!   numbers above it. The shipper keeps at most `inflight_frames_max` frames unacknowledged,
//!   so the set above the watermark stays that small while this receiver gets every frame.
//!   When frames of the stream also go to other receivers (load balancing, failover), the gaps
//!   they leave never fill: the set is then capped at `INFLIGHT_FRAMES_LIMIT` numbers, and the
//!   lowest are forgotten first. Forgetting can only let a late resend be written twice, never
//!   make a frame count as written when it was not.

use std::collections::BTreeSet;

use crate::protocol::limits::INFLIGHT_FRAMES_LIMIT;

/// (sender run, shipper core): the run is [`sender_run`] of the HELLO's run id and the
/// client certificate, so the streams of one certificate can never be another's.
pub type StreamId = (u64, u16);

/// The run a receiver files a sender's frames under: the first 8 bytes of SHA-256 over the
/// client certificate (DER) and the HELLO's run id. A certificate that claims another
/// shipper's run id gets a stream of its own, so it cannot mark that shipper's sequence
/// numbers as written (which would make the receiver drop its frames as duplicates). Stable
/// across versions: the windows it keys are kept on disk.
pub fn sender_run(certificate: &[u8], run_id: u64) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(certificate);
    ctx.update(&run_id.to_le_bytes());
    let digest = ctx.finish();
    u64::from_le_bytes(digest.as_ref()[..8].try_into().expect("SHA-256 has 32 bytes"))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Every seq below this is written. Sequence numbers start at 1.
    pub below: u64,
    pub above: BTreeSet<u64>,
    /// When a frame of the stream was last written, in seconds since the Unix epoch (0:
    /// unknown). A window not written to for `dedup_window_ttl_s` is forgotten at a start.
    pub written_unix_s: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window { below: 1, above: BTreeSet::new(), written_unix_s: 0 }
    }
}

impl Window {
    pub fn contains(&self, seq: u64) -> bool {
        seq < self.below || self.above.contains(&seq)
    }

    pub fn insert(&mut self, seq: u64) {
        if seq < self.below {
            return;
        }
        if seq > self.below {
            self.above.insert(seq);
            if self.above.len() > INFLIGHT_FRAMES_LIMIT {
                self.above.pop_first();
            }
            return;
        }
        self.below += 1;
        while self.above.remove(&self.below) {
            self.below += 1;
        }
    }

    /// Merges what another record of the same stream says (union of written sets).
    pub fn merge(&mut self, other: &Window) {
        self.written_unix_s = self.written_unix_s.max(other.written_unix_s);
        if other.below > self.below {
            self.below = other.below;
            let below = self.below;
            self.above.retain(|&s| s >= below);
            while self.above.remove(&self.below) {
                self.below += 1;
            }
        }
        for &s in &other.above {
            self.insert(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_id_under_another_certificate_is_another_stream() {
        let (a, b) = (b"certificate A".as_slice(), b"certificate B".as_slice());
        assert_eq!(sender_run(a, 42), sender_run(a, 42));
        assert_ne!(sender_run(a, 42), sender_run(b, 42));
        assert_ne!(sender_run(a, 42), sender_run(a, 43));
        // Pinned: windows on disk are keyed by it, so it must never change.
        // sha256(8 zero bytes) = af5570f5a1810b7a...: its first 8 bytes, little endian.
        assert_eq!(sender_run(b"", 0), 0x7a0b_81a1_f570_55af);
    }

    #[test]
    fn watermark_advances_over_gaps() {
        let mut w = Window::default();
        w.insert(2);
        w.insert(3);
        assert!(!w.contains(1) && w.contains(3));
        w.insert(1);
        assert_eq!((w.below, w.above.len()), (4, 0));
        w.insert(2);
        assert_eq!(w.below, 4);
        let mut o = Window::default();
        o.insert(1);
        o.insert(5);
        let mut m = Window { below: 3, above: [4].into(), written_unix_s: 0 };
        m.merge(&o);
        assert_eq!(m, Window { below: 3, above: [4, 5].into(), written_unix_s: 0 });
        m.merge(&Window { below: 5, above: [7].into(), written_unix_s: 0 });
        assert_eq!(m, Window { below: 6, above: [7].into(), written_unix_s: 0 });
    }

    // Guards against unbounded memory when a stream's frames are spread over receivers.
    #[test]
    fn gaps_that_never_fill_keep_the_window_bounded() {
        let mut w = Window::default();
        for seq in (2..).step_by(2).take(3 * INFLIGHT_FRAMES_LIMIT) {
            w.insert(seq);
        }
        assert_eq!((w.below, w.above.len()), (1, INFLIGHT_FRAMES_LIMIT));
        let newest = 2 * (3 * INFLIGHT_FRAMES_LIMIT as u64);
        assert!(w.contains(newest) && !w.contains(2), "the lowest are forgotten first");
    }
}
