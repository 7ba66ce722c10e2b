//! Joins lines split across reads and truncates lines over the limit.
//!
//! # Design constraints
//! - Memory per source is bounded by `line_bytes_max`: the carry buffer never grows past it,
//!   whatever a writer sends without a newline.
//!
//! # Operation
//! Complete lines inside a read are handed out as slices of the read buffer (no copy); only a
//! line split across reads is copied into the carry buffer. A line longer than the limit is
//! handed out once, truncated, as soon as the limit is reached; the rest of it, up to its
//! newline, is discarded.

use memchr::memchr;

/// A line handed out by [`LineSplitter::split`].
pub struct Line<'a> {
    pub bytes: &'a [u8],
    /// The line was longer than the limit and this is its first `line_bytes_max` bytes.
    pub truncated: bool,
    /// Bytes of the chunk consumed through this line: up to and including its `\n`, or the
    /// whole chunk for a line handed out before its end (a truncated prefix, a flush). A source
    /// with positions adds it to the chunk's offset to know where the next line starts.
    pub end: usize,
}

/// A splitter's state between reads: the partial line held, and whether it is inside an
/// over-long line already handed out. A takeover carries it from one process to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leftover {
    pub carry: Vec<u8>,
    pub discarding: bool,
}

pub struct LineSplitter {
    carry: Vec<u8>,
    max: usize,
    /// Inside an over-long line whose prefix was already handed out.
    discarding: bool,
}

impl LineSplitter {
    pub fn new(line_bytes_max: usize) -> LineSplitter {
        assert!(line_bytes_max > 0, "line_bytes_max must be positive");
        LineSplitter { carry: Vec::new(), max: line_bytes_max, discarding: false }
    }

    /// A splitter that goes on from `left` (another splitter's [`LineSplitter::leftover`]);
    /// a carry longer than `line_bytes_max` (a lower limit than its writer's) is cut to it.
    pub fn resume(line_bytes_max: usize, mut left: Leftover) -> LineSplitter {
        let mut s = LineSplitter::new(line_bytes_max);
        left.carry.truncate(line_bytes_max);
        s.carry = left.carry;
        s.discarding = left.discarding;
        s
    }

    /// The state a successor needs to go on where this splitter stopped.
    pub fn leftover(self) -> Leftover {
        Leftover { carry: self.carry, discarding: self.discarding }
    }

    /// Bytes of a partial line held since the last read.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }

    /// Splits `chunk` into lines (without their `\n`), calling `emit` for each one completed.
    pub fn split(&mut self, chunk: &[u8], mut emit: impl FnMut(Line<'_>)) {
        let mut start = 0;
        while let Some(i) = memchr(b'\n', &chunk[start..]) {
            self.finish(&chunk[start..start + i], start + i + 1, &mut emit);
            start += i + 1;
        }
        self.hold(&chunk[start..], chunk.len(), &mut emit);
    }

    /// Hands out the partial line held, if any, as a line of its own (a file whose last line
    /// never got its newline); `end` is 0: the bytes were consumed by earlier chunks.
    pub fn flush(&mut self, mut emit: impl FnMut(Line<'_>)) {
        if !self.carry.is_empty() {
            emit(Line { bytes: &self.carry, truncated: false, end: 0 });
            self.carry.clear();
        }
    }

    fn finish(&mut self, piece: &[u8], end: usize, emit: &mut impl FnMut(Line<'_>)) {
        if self.discarding {
            self.discarding = false;
            return;
        }
        if self.carry.is_empty() {
            let truncated = piece.len() > self.max;
            emit(Line { bytes: &piece[..piece.len().min(self.max)], truncated, end });
            return;
        }
        let room = self.max - self.carry.len();
        let truncated = piece.len() > room;
        self.carry.extend_from_slice(&piece[..piece.len().min(room)]);
        emit(Line { bytes: &self.carry, truncated, end });
        self.carry.clear();
    }

    fn hold(&mut self, tail: &[u8], end: usize, emit: &mut impl FnMut(Line<'_>)) {
        if self.discarding || tail.is_empty() {
            return;
        }
        let room = self.max - self.carry.len();
        if tail.len() <= room {
            self.carry.extend_from_slice(tail);
            return;
        }
        self.carry.extend_from_slice(&tail[..room]);
        emit(Line { bytes: &self.carry, truncated: true, end });
        self.carry.clear();
        self.discarding = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<(String, bool)>, usize) {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.split(c, |l| out.push((String::from_utf8_lossy(l.bytes).into_owned(), l.truncated)));
        }
        (out, s.pending())
    }

    #[test]
    fn joins_across_reads() {
        let (lines, pending) = run(100, &[b"ab", b"c\nde", b"f\n\ng", b"h"]);
        let want = [("abc", false), ("def", false), ("", false)];
        assert_eq!(lines, want.map(|(s, t)| (s.to_string(), t)));
        assert_eq!(pending, 2);
    }

    #[test]
    fn truncates_in_one_read_and_across_reads() {
        let (lines, _) = run(4, &[b"abcdefgh\nxy\n"]);
        assert_eq!(lines, vec![("abcd".into(), true), ("xy".into(), false)]);
        // The prefix is handed out as soon as the limit is hit; the rest is discarded.
        let (lines, pending) = run(4, &[b"ab", b"cdef", b"ghij", b"kl\nok\n"]);
        assert_eq!(lines, vec![("abcd".into(), true), ("ok".into(), false)]);
        assert_eq!(pending, 0);
        // Exactly the limit is not truncated.
        let (lines, _) = run(4, &[b"ab", b"cd\n"]);
        assert_eq!(lines, vec![("abcd".into(), false)]);
    }

    /// A line split across two splitters (a takeover) comes out once, whole, from the second.
    #[test]
    fn resumes_from_a_leftover() {
        let mut a = LineSplitter::new(4);
        let mut out = Vec::new();
        a.split(b"ab\ncd", |l| out.push(l.bytes.to_vec()));
        let mut b = LineSplitter::resume(4, a.leftover());
        b.split(b"\nxyzzy\nq", |l| out.push(l.bytes.to_vec()));
        assert_eq!(out, [b"ab".to_vec(), b"cd".to_vec(), b"xyzz".to_vec()]);
        let left = b.leftover();
        assert_eq!(left, Leftover { carry: b"q".to_vec(), discarding: false });
        let mut c = LineSplitter::new(4);
        c.split(b"abcdef", |_| {});
        assert!(c.leftover().discarding, "inside a cut line");
    }

    /// Where each line ends in its chunk, and a held partial line flushed on its own.
    #[test]
    fn ends_and_flush() {
        let mut s = LineSplitter::new(4);
        let mut ends = Vec::new();
        s.split(b"ab\ncdefgh\nx", |l| ends.push(l.end));
        assert_eq!(ends, [3, 10], "a cut line whose newline is in the chunk ends after it");
        s.split(b"y", |l| ends.push(l.end));
        let mut flushed = Vec::new();
        s.flush(|l| flushed.push((l.bytes.to_vec(), l.end)));
        assert_eq!(flushed, [(b"xy".to_vec(), 0)]);
        assert_eq!(s.pending(), 0);
    }
}
