//! Joining a file's lines into multi-line records (`multiline_start`): a line that matches
//! the start pattern begins a record, the lines after it that do not are appended to it
//! (joined with `\n`), as a stack trace follows the line that logged it.
//!
//! # Design constraints
//! - A record is handed over once the next record starts, or once the file has been idle
//!   `partial_line_ms` (its last record may be complete), or when the file is closed,
//!   truncated or rewritten. Its mark is the end of its last line, so positions never pass
//!   a line still held: after a restart, the lines of a record not handed over are read
//!   again.
//! - A record is at most `line_bytes_max` bytes: lines past that are dropped from it and the
//!   record is handed over marked cut (`lines_truncated`). Lines before the first start line
//!   of a file (read from the middle of a record) make a record of their own.
//! - One pattern match per line (the `regex` crate: linear time in the line's length).

use regex::bytes::Regex;

/// One file's record being joined.
pub struct Joiner {
    start: Regex,
    bytes_max: usize,
    record: Vec<u8>,
    /// Where its last line ends in the file.
    end: u64,
    truncated: bool,
    /// Lines appended to the record after its first.
    joined: u64,
}

impl Joiner {
    pub fn new(start: Regex, bytes_max: usize) -> Joiner {
        Joiner { start, bytes_max, record: Vec::new(), end: 0, truncated: false, joined: 0 }
    }

    /// Bytes of the record held.
    pub fn pending(&self) -> usize {
        self.record.len()
    }

    /// Takes `line` (cut when `truncated`), which ends at `end` in the file; hands over the
    /// record it completes to `emit` (bytes, cut, end, lines joined into it).
    pub fn push(
        &mut self,
        line: &[u8],
        truncated: bool,
        end: u64,
        emit: &mut impl FnMut(&[u8], bool, u64, u64),
    ) {
        if !self.record.is_empty() && !self.start.is_match(line) {
            if self.record.len() + 1 + line.len() <= self.bytes_max {
                self.record.push(b'\n');
                self.record.extend_from_slice(line);
            } else {
                self.truncated = true;
            }
            self.truncated |= truncated;
            self.joined += 1;
            self.end = end;
            return;
        }
        self.flush(emit);
        self.record.extend_from_slice(line);
        (self.end, self.truncated) = (end, truncated);
        if self.record.is_empty() {
            // An empty line between records: handed over as it is (counted as empty).
            emit(&[], false, end, 0);
        }
    }

    /// Hands over the record held, if any.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8], bool, u64, u64)) {
        if self.record.is_empty() {
            return;
        }
        emit(&self.record, self.truncated, self.end, self.joined);
        self.record.clear();
        (self.truncated, self.joined) = (false, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_join_under_the_line_that_starts_them() {
        let mut j = Joiner::new(Regex::new(r"^\d{4}-").unwrap(), 64);
        let mut out = Vec::new();
        let mut emit = |r: &[u8], cut: bool, end: u64, joined: u64| {
            out.push((String::from_utf8(r.to_vec()).unwrap(), cut, end, joined));
        };
        let lines: [&[u8]; 7] = [
            b"  at orphan",
            b"2026-01 boom",
            b"  at a",
            b"  at b",
            b"2026-02 fine",
            b"2026-03 long",
            b"  at xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ];
        for (i, l) in lines.iter().enumerate() {
            j.push(l, false, (i as u64 + 1) * 10, &mut emit);
        }
        assert_eq!(j.pending(), 12);
        j.flush(&mut emit);
        assert_eq!(
            out,
            [
                ("  at orphan".into(), false, 10, 0),
                ("2026-01 boom\n  at a\n  at b".into(), false, 40, 2),
                ("2026-02 fine".into(), false, 50, 0),
                ("2026-03 long".into(), true, 70, 1),
            ]
        );
    }
}
