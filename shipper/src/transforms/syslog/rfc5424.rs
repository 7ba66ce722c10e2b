//! RFC 5424: the header after the PRI, structured data, and RFC 3339 timestamps.

use super::{header_field, json_escape, json_str, Failure, Message};

/// The UTF-8 byte order mark a MSG may start with (RFC 5424 section 6.4).
const BOM: &str = "\u{feff}";

/// Parses what follows the PRI of an RFC 5424 message.
pub(super) fn parse(pri: u8, rest: &str) -> Result<Message<'_>, Failure> {
    let mut words = Words(rest);
    let version = words.next().ok_or(Failure::BadHeader)?;
    let version_ok = (1..=3).contains(&version.len())
        && !version.starts_with('0')
        && version.bytes().all(|c| c.is_ascii_digit());
    if !version_ok {
        return Err(Failure::BadHeader);
    }
    let timestamp = nil(words.next().ok_or(Failure::BadHeader)?);
    if let Some(t) = timestamp {
        if !rfc3339(t) {
            return Err(Failure::BadTimestamp);
        }
    }
    let mut field = |max| match words.next() {
        Some(w) if header_field(w, max) => Ok(nil(w)),
        _ => Err(Failure::BadHeader),
    };
    let (host, app, procid, msgid) = (field(255)?, field(48)?, field(128)?, field(32)?);
    let rest = words.0;
    let (structured_data, rest) = if let Some(after) = rest.strip_prefix('-') {
        ("", after)
    } else {
        let len = sd_len(rest)?;
        (&rest[..len], &rest[len..])
    };
    let message = match rest.strip_prefix(' ') {
        Some(m) => m.strip_prefix(BOM).unwrap_or(m),
        None if rest.is_empty() => "",
        None => return Err(Failure::BadStructuredData),
    };
    Ok(Message { pri, timestamp, host, app, procid, msgid, structured_data, message })
}

/// Space-separated words, consumed from the front; `.0` is what is left.
struct Words<'a>(&'a str);

impl<'a> Words<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let (word, rest) = self.0.split_once(' ')?;
        self.0 = rest;
        Some(word)
    }
}

fn nil(w: &str) -> Option<&str> {
    (w != "-").then_some(w)
}

/// `YYYY-MM-DDThh:mm:ss[.f{1,9}](Z|+hh:mm|-hh:mm)`, with fields in range. RFC 5424 allows up
/// to 6 fraction digits; 9 are accepted because some senders write nanoseconds.
pub(super) fn rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let num = |at: usize, n: usize| -> Option<u32> {
        let d = b.get(at..at + n)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |v, c| v * 10 + u32::from(c - b'0')))
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    let date_time = num(0, 4).is_some()
        && sep(4, b'-')
        && num(5, 2).is_some_and(|m| (1..=12).contains(&m))
        && sep(7, b'-')
        && num(8, 2).is_some_and(|d| (1..=31).contains(&d))
        && sep(10, b'T')
        && num(11, 2).is_some_and(|h| h <= 23)
        && sep(13, b':')
        && num(14, 2).is_some_and(|m| m <= 59)
        && sep(16, b':')
        && num(17, 2).is_some_and(|s| s <= 60);
    if !date_time {
        return false;
    }
    let mut at = 19;
    if sep(at, b'.') {
        let digits = b[at + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&digits) {
            return false;
        }
        at += 1 + digits;
    }
    match b.get(at) {
        Some(b'Z') => at + 1 == b.len(),
        Some(b'+' | b'-') => {
            at + 6 == b.len()
                && num(at + 1, 2).is_some_and(|h| h <= 23)
                && sep(at + 3, b':')
                && num(at + 4, 2).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

/// An SD-NAME (SD-ID or PARAM-NAME): 1 to 32 printable ASCII bytes other than `=`, SP, `]`, `"`.
fn sd_name(b: &[u8], at: usize) -> Result<usize, Failure> {
    let n = b[at..]
        .iter()
        .take_while(|&&c| (33..=126).contains(&c) && !matches!(c, b'=' | b']' | b'"'))
        .count();
    if (1..=32).contains(&n) {
        Ok(at + n)
    } else {
        Err(Failure::BadStructuredData)
    }
}

/// One piece of structured data, in order.
enum Sd<'a> {
    Element(&'a str),
    /// A parameter's name and its value as written (escapes still in).
    Param(&'a str, &'a str),
}

/// Walks the SD-ELEMENTs at the start of `s`, calling `visit` for each element and parameter;
/// returns the length of the structured data.
fn walk_sd<'a>(s: &'a str, mut visit: impl FnMut(Sd<'a>)) -> Result<usize, Failure> {
    let b = s.as_bytes();
    let mut at = 0;
    while b.get(at) == Some(&b'[') {
        let id_end = sd_name(b, at + 1)?;
        visit(Sd::Element(&s[at + 1..id_end]));
        at = id_end;
        while b.get(at) == Some(&b' ') {
            let name_end = sd_name(b, at + 1)?;
            if b.get(name_end..name_end + 2) != Some(b"=\"") {
                return Err(Failure::BadStructuredData);
            }
            let value_start = name_end + 2;
            let value_end = value_end(b, value_start)?;
            visit(Sd::Param(&s[at + 1..name_end], &s[value_start..value_end]));
            at = value_end + 1;
        }
        if b.get(at) != Some(&b']') {
            return Err(Failure::BadStructuredData);
        }
        at += 1;
    }
    if at == 0 {
        return Err(Failure::BadStructuredData);
    }
    Ok(at)
}

/// The index of the `"` closing a PARAM-VALUE that starts at `at` (`\"`, `\\`, `\]` escaped).
fn value_end(b: &[u8], mut at: usize) -> Result<usize, Failure> {
    loop {
        match b.get(at) {
            None => return Err(Failure::BadStructuredData),
            Some(b'"') => return Ok(at),
            Some(b'\\') => at += 2,
            Some(b']') => return Err(Failure::BadStructuredData),
            Some(_) => at += 1,
        }
    }
}

/// The length of the structured data at the start of `s`.
fn sd_len(s: &str) -> Result<usize, Failure> {
    walk_sd(s, |_| {})
}

/// Appends validated structured data as `{"SD-ID":{"NAME":"VALUE",...},...}`. Values are
/// unescaped (`\"` `\\` `\]`; a backslash before anything else is kept, as RFC 5424 says).
pub(super) fn sd_json(sd: &str, out: &mut Vec<u8>) {
    let mut first_param = true;
    let mut open = false;
    out.push(b'{');
    let walked = walk_sd(sd, |piece| match piece {
        Sd::Element(id) => {
            if open {
                out.extend_from_slice(b"},");
            }
            open = true;
            first_param = true;
            json_str(out, id.as_bytes());
            out.extend_from_slice(b":{");
        }
        Sd::Param(name, value) => {
            if !first_param {
                out.push(b',');
            }
            first_param = false;
            json_str(out, name.as_bytes());
            out.extend_from_slice(b":\"");
            unescape_value(value.as_bytes(), out);
            out.push(b'"');
        }
    });
    debug_assert!(walked.is_ok(), "structured data was validated by parse");
    if open {
        out.push(b'}');
    }
    out.push(b'}');
}

fn unescape_value(v: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'\\' && matches!(v.get(i + 1), Some(b'"' | b'\\' | b']')) {
            json_escape(out, &v[start..i]);
            start = i + 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    json_escape(out, &v[start..]);
}
