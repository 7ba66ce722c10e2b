//! One pass over a line checking the JSON grammar (RFC 8259), noting where two top-level
//! string members are. Non-ASCII bytes may only be in strings, where each run of them is
//! checked as UTF-8 ([`Failure::Utf8`]); one anywhere else is a grammar error, which the caller
//! reports as invalid UTF-8 instead when the line is not UTF-8.
//!
//! Containers are tracked iteratively on a byte stack (`{` or `[` per open container), so a
//! deeply nested line costs one byte of stack per level and never recursion.

use super::Failure;

/// The top-level members wanted: the key field, and cfjs1's `format` when asked for.
pub struct Wanted<'w> {
    pub key: &'w [u8],
    pub format: Option<&'w [u8]>,
}

/// Where a string's contents are in the line (quotes excluded), and whether they hold a
/// backslash escape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub escaped: bool,
}

/// The wanted members' string values, when present.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub key: Option<Span>,
    pub format: Option<Span>,
}

pub struct Scan<'l, 's> {
    line: &'l [u8],
    stack: &'s mut Vec<u8>,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

// Positions are passed and returned rather than kept in the struct, so that the hot loops
// keep them in registers.
impl<'l, 's> Scan<'l, 's> {
    pub fn new(line: &'l [u8], stack: &'s mut Vec<u8>) -> Scan<'l, 's> {
        stack.clear();
        Scan { line, stack }
    }

    /// The whole line as one value with whitespace around it: the wanted members if it is an
    /// object, [`Failure::NotObject`] if it is another value, [`Failure::Json`] if it is not
    /// JSON. `name` is scratch for member names holding escapes.
    pub fn object(mut self, wanted: &Wanted, name: &mut Vec<u8>) -> Result<Found, Failure> {
        let at = space(self.line, 0);
        let object = self.line.get(at) == Some(&b'{');
        let (found, at) = if object {
            self.members(at, wanted, name)?
        } else {
            (Found::default(), self.value(at)?)
        };
        if space(self.line, at) != self.line.len() {
            return Err(Failure::Json);
        }
        if object {
            Ok(found)
        } else {
            Err(Failure::NotObject)
        }
    }

    /// The top-level object's members (`at` its `{`), noting the first string value of each
    /// wanted name; returns them and the index after the object.
    fn members(
        &mut self,
        at: usize,
        wanted: &Wanted,
        name: &mut Vec<u8>,
    ) -> Result<(Found, usize), Failure> {
        let line = self.line;
        let mut found = Found::default();
        let mut at = space(line, at + 1);
        if line.get(at) == Some(&b'}') {
            return Ok((found, at + 1));
        }
        loop {
            let (member, after) = member_name(line, at)?;
            at = space(line, after);
            if line.get(at) == Some(&b'"') {
                let (value, after) = string(line, at)?;
                at = after;
                let is = |want: &[u8], name: &mut Vec<u8>| named(line, member, want, name);
                if found.key.is_none() && is(wanted.key, name) {
                    found.key = Some(value);
                } else if let Some(f) = wanted.format.filter(|_| found.format.is_none()) {
                    if is(f, name) {
                        found.format = Some(value);
                    }
                }
            } else {
                at = self.value(at)?;
            }
            at = space(line, at);
            match line.get(at) {
                Some(b',') => at += 1,
                Some(b'}') => return Ok((found, at + 1)),
                _ => return Err(Failure::Json),
            }
        }
    }

    /// One value of any kind at `at` (whitespace before it skipped here), nested containers
    /// included; the index after it.
    fn value(&mut self, at: usize) -> Result<usize, Failure> {
        let line = self.line;
        let base = self.stack.len();
        let mut at = at;
        loop {
            at = space(line, at);
            at = match line.get(at) {
                Some(&open @ (b'{' | b'[')) => {
                    let inner = space(line, at + 1);
                    let close = if open == b'{' { b'}' } else { b']' };
                    if line.get(inner) == Some(&close) {
                        inner + 1
                    } else {
                        self.stack.push(open);
                        if open == b'{' {
                            at = member_name(line, inner)?.1;
                        } else {
                            at = inner;
                        }
                        continue;
                    }
                }
                Some(b'"') => string(line, at)?.1,
                Some(b'-' | b'0'..=b'9') => number(line, at)?,
                Some(b't') => literal(line, at, b"true")?,
                Some(b'f') => literal(line, at, b"false")?,
                Some(b'n') => literal(line, at, b"null")?,
                _ => return Err(Failure::Json),
            };
            match self.close_to(base, at)? {
                (true, after) => return Ok(after),
                (false, next) => at = next,
            }
        }
    }

    /// After a value ending before `at`: closes containers down to `base` open ones. True and
    /// the index after the value begun at `base` when it is complete; false and the index of
    /// the next element when a `,` asks for one (an object member's name already read).
    fn close_to(&mut self, base: usize, at: usize) -> Result<(bool, usize), Failure> {
        let mut at = at;
        while self.stack.len() > base {
            let open = self.stack[self.stack.len() - 1];
            at = space(self.line, at);
            match (open, self.line.get(at)) {
                (b'{', Some(b',')) => return Ok((false, member_name(self.line, at + 1)?.1)),
                (b'[', Some(b',')) => return Ok((false, at + 1)),
                (b'{', Some(b'}')) | (b'[', Some(b']')) => {
                    self.stack.pop();
                    at += 1;
                }
                _ => return Err(Failure::Json),
            }
        }
        Ok((true, at))
    }
}

/// Whether the member name at `span` of `line` is `want` (unescaped into `scratch` if it
/// must be).
fn named(line: &[u8], span: Span, want: &[u8], scratch: &mut Vec<u8>) -> bool {
    let raw = &line[span.start..span.end];
    if !span.escaped {
        return raw == want;
    }
    scratch.clear();
    unescape(raw, true, scratch);
    scratch[..] == *want
}

/// `"name"` and the `:` after it, whitespace before either: the name's span and the index
/// after the colon.
#[inline]
fn member_name(line: &[u8], at: usize) -> Result<(Span, usize), Failure> {
    let at = space(line, at);
    if line.get(at) != Some(&b'"') {
        return Err(Failure::Json);
    }
    let (span, after) = string(line, at)?;
    let at = space(line, after);
    if line.get(at) != Some(&b':') {
        return Err(Failure::Json);
    }
    Ok((span, at + 1))
}

/// The string whose opening quote is at `at`: its contents' span and the index after its
/// closing quote.
#[inline(always)]
fn string(line: &[u8], at: usize) -> Result<(Span, usize), Failure> {
    let start = at + 1;
    let (mut at, mut escaped) = (start, false);
    loop {
        at = plain_end(line, at);
        match line.get(at) {
            Some(b'"') => return Ok((Span { start, end: at, escaped }, at + 1)),
            Some(b'\\') => {
                escaped = true;
                at += escape_len(&line[at..]).ok_or(Failure::Json)?;
            }
            Some(&c) if c >= 0x80 => at = utf8_end(line, at)?,
            // A control character, or the end of the line.
            _ => return Err(Failure::Json),
        }
    }
}

/// The number at `at`, `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`; the index
/// after it.
fn number(line: &[u8], at: usize) -> Result<usize, Failure> {
    let mut at = at + usize::from(line.get(at) == Some(&b'-'));
    match line.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => at = digits(line, at + 1),
        _ => return Err(Failure::Json),
    }
    if line.get(at) == Some(&b'.') {
        at = digits1(line, at + 1)?;
    }
    if matches!(line.get(at), Some(b'e' | b'E')) {
        at += 1;
        at += usize::from(matches!(line.get(at), Some(b'+' | b'-')));
        at = digits1(line, at)?;
    }
    Ok(at)
}

fn digits(line: &[u8], mut at: usize) -> usize {
    while matches!(line.get(at), Some(b'0'..=b'9')) {
        at += 1;
    }
    at
}

/// At least one digit.
fn digits1(line: &[u8], at: usize) -> Result<usize, Failure> {
    let end = digits(line, at);
    if end == at {
        return Err(Failure::Json);
    }
    Ok(end)
}

fn literal(line: &[u8], at: usize, word: &[u8]) -> Result<usize, Failure> {
    if !line[at..].starts_with(word) {
        return Err(Failure::Json);
    }
    Ok(at + word.len())
}

/// The index of the first byte at or after `at` that is not whitespace.
#[inline]
fn space(line: &[u8], mut at: usize) -> usize {
    // Most lines have no whitespace between tokens: one comparison says so.
    if line.get(at).is_some_and(|&c| c > b' ') {
        return at;
    }
    while matches!(line.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The index of the first `"`, `\`, control character (below 0x20) or non-ASCII byte at or
/// after `at`, or the line's length: eight bytes per step (the lowest flagged byte of a word is
/// exact, since a borrow only runs upwards), then byte by byte.
#[inline]
fn plain_end(line: &[u8], mut at: usize) -> usize {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    while let Some(word) = line.get(at..at + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let hits = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGHS)
            | (x & HIGHS);
        if hits != 0 {
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while let Some(&c) = line.get(at) {
        if c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c) {
            break;
        }
        at += 1;
    }
    at
}

/// The end of the run of non-ASCII bytes at `at` if it is valid UTF-8. Checking each such run
/// of a string checks the whole string, since an ASCII byte is never part of a longer
/// character.
fn utf8_end(line: &[u8], at: usize) -> Result<usize, Failure> {
    let end = line[at..].iter().position(|&c| c < 0x80).map_or(line.len(), |n| at + n);
    match std::str::from_utf8(&line[at..end]) {
        Ok(_) => Ok(end),
        Err(_) => Err(Failure::Utf8),
    }
}

/// The length of the escape at the start of `s` (a backslash), if it is a valid one.
fn escape_len(s: &[u8]) -> Option<usize> {
    match s.get(1)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(2),
        b'u' => s.get(2..6)?.iter().all(u8::is_ascii_hexdigit).then_some(6),
        _ => None,
    }
}

/// Appends the contents of a valid JSON string (quotes excluded) to `out`, unescaped: a
/// surrogate pair becomes its character, a lone surrogate U+FFFD.
pub fn unescape(raw: &[u8], escaped: bool, out: &mut Vec<u8>) {
    if !escaped {
        return out.extend_from_slice(raw);
    }
    let mut at = 0;
    while at < raw.len() {
        let Some(i) = raw[at..].iter().position(|&c| c == b'\\') else {
            out.extend_from_slice(&raw[at..]);
            return;
        };
        out.extend_from_slice(&raw[at..at + i]);
        at += i;
        let simple = match raw[at + 1] {
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'u' => None,
            other => Some(other),
        };
        if let Some(c) = simple {
            out.push(c);
            at += 2;
            continue;
        }
        let (c, used) = code_point(&raw[at..]);
        let mut utf8 = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        at += used;
    }
}

/// The character of the `\uXXXX` escape at the start of `s` (with the low half of a pair
/// after it), and the bytes it used; a lone surrogate is U+FFFD.
fn code_point(s: &[u8]) -> (char, usize) {
    let unit = |at: usize| -> Option<u32> {
        let hex = std::str::from_utf8(s.get(at + 2..at + 6)?).ok()?;
        if s.get(at..at + 2)? != b"\\u" {
            return None;
        }
        u32::from_str_radix(hex, 16).ok()
    };
    let first = unit(0).expect("a scanned escape");
    if let (0xd800..=0xdbff, Some(low @ 0xdc00..=0xdfff)) = (first, unit(6)) {
        let c = 0x10000 + ((first - 0xd800) << 10) + (low - 0xdc00);
        return (char::from_u32(c).expect("a surrogate pair is a character"), 12);
    }
    (char::from_u32(first).unwrap_or(char::REPLACEMENT_CHARACTER), 6)
}
