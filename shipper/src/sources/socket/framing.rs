//! Splits a TCP byte stream into messages: newline or octet-counting framing (RFC 6587).
//!
//! # Design constraints
//! - Memory per connection is bounded by `message_bytes_max`: the carry never grows past it.
//!   An octet count above it is refused before anything is buffered (its bytes are skipped),
//!   and a count is at most [`COUNT_DIGITS_MAX`] digits, so no peer can make the shipper
//!   allocate what it announces.
//!
//! # Format
//! ```text
//! newline:        MSG "\n"
//! octet counting: MSG-LEN SP MSG     MSG-LEN = NONZERO-DIGIT *DIGIT, the bytes of MSG
//! auto:           per message, octet counting when its first byte is a digit
//! ```
//!
//! # Operation
//! A message inside one read is handed out as a slice of the read buffer (no copy); only one
//! split across reads is copied into the carry. A newline-framed message longer than the
//! limit is handed out once, cut at the limit, and the rest of it up to its newline is
//! discarded. A malformed count (a non-digit, a leading zero, too many digits) is a
//! [`FrameError`]: the stream cannot be resynchronised, so the caller closes it.

use memchr::memchr;
use thiserror::Error;

use crate::config::socket::Framing;

/// Digits of the largest octet count read (9: under a gigabyte, above any limit).
pub const COUNT_DIGITS_MAX: usize = 9;

/// What [`Framer::push`] hands out.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A message; `cut` when it was longer than the limit and this is its start.
    Message { bytes: &'a [u8], cut: bool },
    /// An octet-counted message announcing this many bytes, over the limit: skipped.
    Oversize(u64),
}

/// The stream is not framed as configured; it cannot be read further.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("malformed octet count (byte {byte:#04x} after {digits} digits)")]
    BadCount { byte: u8, digits: usize },
    #[error("octet count longer than {COUNT_DIGITS_MAX} digits")]
    CountTooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the first byte of a message.
    Start,
    /// Reading an octet count: its value and digits so far.
    Count(u64, usize),
    /// Inside an octet-counted message: bytes left (the first ones are in `carry`).
    Body(usize),
    /// Skipping an oversize octet-counted message: bytes left.
    Skip(u64),
    /// Inside a newline-framed message (its start in `carry`); `discarding` after a cut.
    Line { discarding: bool },
}

pub struct Framer {
    framing: Framing,
    max: usize,
    state: State,
    carry: Vec<u8>,
}

impl Framer {
    pub fn new(framing: Framing, message_bytes_max: usize) -> Framer {
        assert!(message_bytes_max > 0, "message_bytes_max must be positive");
        Framer { framing, max: message_bytes_max, state: State::Start, carry: Vec::new() }
    }

    /// Bytes of a partial message held since the last push.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }

    /// Whether a message was started and not finished: lost if the stream ends now. A message
    /// being skipped (oversize count) or discarded (after a cut) was counted already.
    pub fn holds_partial(&self) -> bool {
        match self.state {
            State::Count(_, digits) => digits > 0,
            State::Body(_) | State::Line { discarding: false } => true,
            State::Start | State::Skip(_) | State::Line { discarding: true } => false,
        }
    }

    /// Frames `chunk`, calling `emit` for each message completed or refused.
    pub fn push(
        &mut self,
        mut chunk: &[u8],
        mut emit: impl FnMut(Piece<'_>),
    ) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            let used = match self.state {
                State::Start => {
                    let counted = match self.framing {
                        Framing::Newline => false,
                        Framing::OctetCounting => true,
                        Framing::Auto => chunk[0].is_ascii_digit(),
                    };
                    self.state = if counted {
                        State::Count(0, 0)
                    } else {
                        State::Line { discarding: false }
                    };
                    0
                }
                State::Count(value, digits) => self.count(chunk, value, digits, &mut emit)?,
                State::Body(left) => self.body(chunk, left, &mut emit),
                State::Skip(left) => {
                    let n = (left.min(chunk.len() as u64)) as usize;
                    self.state =
                        if n as u64 == left { State::Start } else { State::Skip(left - n as u64) };
                    n
                }
                State::Line { discarding } => self.line(chunk, discarding, &mut emit),
            };
            chunk = &chunk[used..];
        }
        Ok(())
    }

    /// Reads count digits up to the space; returns the bytes used.
    fn count(
        &mut self,
        chunk: &[u8],
        mut value: u64,
        mut digits: usize,
        emit: &mut impl FnMut(Piece<'_>),
    ) -> Result<usize, FrameError> {
        for (i, &c) in chunk.iter().enumerate() {
            match c {
                b'0'..=b'9' if !(digits == 0 && c == b'0') => {
                    if digits == COUNT_DIGITS_MAX {
                        return Err(FrameError::CountTooLong);
                    }
                    value = value * 10 + u64::from(c - b'0');
                    digits += 1;
                }
                b' ' if digits > 0 => {
                    self.state = if value > self.max as u64 {
                        emit(Piece::Oversize(value));
                        State::Skip(value)
                    } else {
                        State::Body(value as usize)
                    };
                    return Ok(i + 1);
                }
                byte => return Err(FrameError::BadCount { byte, digits }),
            }
        }
        self.state = State::Count(value, digits);
        Ok(chunk.len())
    }

    /// Takes up to `left` body bytes; returns the bytes used.
    fn body(&mut self, chunk: &[u8], left: usize, emit: &mut impl FnMut(Piece<'_>)) -> usize {
        let n = left.min(chunk.len());
        if n < left {
            self.carry.extend_from_slice(&chunk[..n]);
            self.state = State::Body(left - n);
            return n;
        }
        if self.carry.is_empty() {
            emit(Piece::Message { bytes: &chunk[..n], cut: false });
        } else {
            self.carry.extend_from_slice(&chunk[..n]);
            emit(Piece::Message { bytes: &self.carry, cut: false });
            self.carry.clear();
        }
        self.state = State::Start;
        n
    }

    /// Takes bytes of a newline-framed message; returns the bytes used.
    fn line(&mut self, chunk: &[u8], discarding: bool, emit: &mut impl FnMut(Piece<'_>)) -> usize {
        let (piece, used, done) = match memchr(b'\n', chunk) {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        if discarding {
            self.state = if done { State::Start } else { State::Line { discarding: true } };
            return used;
        }
        let room = self.max - self.carry.len();
        let cut = piece.len() > room;
        let take = &piece[..piece.len().min(room)];
        if done && self.carry.is_empty() {
            emit(Piece::Message { bytes: take, cut });
        } else if done || cut {
            self.carry.extend_from_slice(take);
            emit(Piece::Message { bytes: &self.carry, cut });
            self.carry.clear();
        } else {
            self.carry.extend_from_slice(take);
        }
        self.state = match (done, cut) {
            (true, _) => State::Start,
            (false, cut) => State::Line { discarding: cut },
        };
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `chunks`; returns what came out (messages as strings, `!N` for oversize).
    fn run(
        framing: Framing,
        max: usize,
        chunks: &[&[u8]],
    ) -> (Vec<String>, Result<(), FrameError>) {
        let mut f = Framer::new(framing, max);
        let mut out = Vec::new();
        for c in chunks {
            let r = f.push(c, |p| {
                out.push(match p {
                    Piece::Message { bytes, cut } => {
                        format!("{}{}", String::from_utf8_lossy(bytes), if cut { "~" } else { "" })
                    }
                    Piece::Oversize(n) => format!("!{n}"),
                })
            });
            if r.is_err() {
                return (out, r);
            }
            assert!(f.pending() <= max, "carry bounded by the limit");
        }
        (out, Ok(()))
    }

    #[test]
    fn newline_framing_joins_and_cuts() {
        let (m, r) = run(Framing::Newline, 5, &[b"ab", b"c\n1 x\n", b"\nabcdefgh", b"ij\nok\n"]);
        assert_eq!(r, Ok(()));
        assert_eq!(m, ["abc", "1 x", "", "abcde~", "ok"]);
    }

    #[test]
    fn octet_counting_split_anywhere() {
        let msg = b"5 hello11 hello world3 abc";
        // Every split point of the stream gives the same messages.
        for i in 0..msg.len() {
            let (m, r) = run(Framing::OctetCounting, 64, &[&msg[..i], &msg[i..]]);
            assert_eq!(r, Ok(()));
            assert_eq!(m, ["hello", "hello world", "abc"], "split at {i}");
        }
    }

    #[test]
    fn oversize_counts_are_skipped_without_buffering() {
        let (m, r) = run(Framing::OctetCounting, 8, &[b"20 aaaaaaaaaa", b"bbbbbbbbbb2 ok"]);
        assert_eq!(r, Ok(()));
        assert_eq!(m, ["!20", "ok"]);
        let (m, r) = run(Framing::OctetCounting, 8, &[b"999999999 x"]);
        assert_eq!((m, r), (vec!["!999999999".to_string()], Ok(())));
    }

    #[test]
    fn malformed_counts_are_errors() {
        let bad = |input: &[u8]| run(Framing::OctetCounting, 64, &[input]).1;
        assert_eq!(bad(b"<13>hi"), Err(FrameError::BadCount { byte: b'<', digits: 0 }));
        assert_eq!(bad(b"05 hello"), Err(FrameError::BadCount { byte: b'0', digits: 0 }));
        assert_eq!(bad(b"12x"), Err(FrameError::BadCount { byte: b'x', digits: 2 }));
        assert_eq!(bad(b" 5 hello"), Err(FrameError::BadCount { byte: b' ', digits: 0 }));
        assert_eq!(bad(b"1234567890 x"), Err(FrameError::CountTooLong));
    }

    #[test]
    fn a_started_message_is_partial_until_it_ends() {
        let partial = |framing, chunk: &[u8]| {
            let mut f = Framer::new(framing, 8);
            f.push(chunk, |_| {}).unwrap();
            f.holds_partial()
        };
        assert!(!partial(Framing::Newline, b""));
        assert!(!partial(Framing::Newline, b"ab\n"));
        assert!(partial(Framing::Newline, b"ab\nc"));
        // Cut at the limit: handed out already, the rest is discarded.
        assert!(!partial(Framing::Newline, b"0123456789"));
        assert!(partial(Framing::OctetCounting, b"1"));
        assert!(partial(Framing::OctetCounting, b"3 ab"));
        assert!(!partial(Framing::OctetCounting, b"3 abc"));
        // Oversize: counted when refused, skipped.
        assert!(!partial(Framing::OctetCounting, b"20 abc"));
    }

    #[test]
    fn auto_decides_per_message() {
        let (m, r) = run(Framing::Auto, 64, &[b"<13>a\n5 <1>bc<2>d\n3 xyz"]);
        assert_eq!(r, Ok(()));
        assert_eq!(m, ["<13>a", "<1>bc", "<2>d", "xyz"]);
    }
}
