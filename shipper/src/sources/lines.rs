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

    /// Bytes of a partial line held since the last read.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }

    /// Splits `chunk` into lines (without their `\n`), calling `emit` for each one completed.
    pub fn split(&mut self, chunk: &[u8], mut emit: impl FnMut(Line<'_>)) {
        let mut rest = chunk;
        while let Some(i) = memchr(b'\n', rest) {
            self.finish(&rest[..i], &mut emit);
            rest = &rest[i + 1..];
        }
        self.hold(rest, &mut emit);
    }

    fn finish(&mut self, piece: &[u8], emit: &mut impl FnMut(Line<'_>)) {
        if self.discarding {
            self.discarding = false;
            return;
        }
        if self.carry.is_empty() {
            let truncated = piece.len() > self.max;
            emit(Line { bytes: &piece[..piece.len().min(self.max)], truncated });
            return;
        }
        let room = self.max - self.carry.len();
        let truncated = piece.len() > room;
        self.carry.extend_from_slice(&piece[..piece.len().min(room)]);
        emit(Line { bytes: &self.carry, truncated });
        self.carry.clear();
    }

    fn hold(&mut self, tail: &[u8], emit: &mut impl FnMut(Line<'_>)) {
        if self.discarding || tail.is_empty() {
            return;
        }
        let room = self.max - self.carry.len();
        if tail.len() <= room {
            self.carry.extend_from_slice(tail);
            return;
        }
        self.carry.extend_from_slice(&tail[..room]);
        emit(Line { bytes: &self.carry, truncated: true });
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
}
