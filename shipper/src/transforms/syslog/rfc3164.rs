//! RFC 3164 (BSD syslog) and the variants real senders use: no HOSTNAME (`/dev/log` writers
//! like `logger`), zero-padded days, milliseconds, RFC 3339 timestamps.

use super::{header_field, rfc5424::rfc3339, Failure, Message};

const MONTHS: [&str; 12] =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Longest TAG name kept as `app`; a longer first word is content, not a TAG.
const TAG_BYTES_MAX: usize = 255;

/// Parses what follows the PRI of an RFC 3164 message.
pub(super) fn parse(pri: u8, rest: &str) -> Result<Message<'_>, Failure> {
    let ts_len = timestamp_len(rest).ok_or(Failure::BadTimestamp)?;
    let timestamp = Some(&rest[..ts_len]);
    // Cisco IOS puts a colon after its timestamp.
    let rest = &rest[ts_len..];
    let rest = rest.strip_prefix(':').unwrap_or(rest);
    let rest = match rest.strip_prefix(' ') {
        Some(r) => r,
        None if rest.is_empty() => "",
        None => return Err(Failure::BadTimestamp),
    };
    let mut m = Message { pri, timestamp, ..Message::default() };
    let (first, after_first) = rest.split_once(' ').unwrap_or((rest, ""));
    if let Some((app, procid)) = tag(first) {
        (m.app, m.procid, m.message) = (Some(app), procid, after_first);
        return Ok(m);
    }
    if !header_field(first, 255) {
        // No HOSTNAME and no TAG: it is all content.
        m.message = rest;
        return Ok(m);
    }
    m.host = Some(first);
    let (second, after_second) = after_first.split_once(' ').unwrap_or((after_first, ""));
    match tag(second) {
        Some((app, procid)) => (m.app, m.procid, m.message) = (Some(app), procid, after_second),
        None => m.message = after_first,
    }
    Ok(m)
}

/// The length of the timestamp at the start of `s`: `Mmm dd hh:mm:ss[.fff]` or RFC 3339.
fn timestamp_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first().is_some_and(u8::is_ascii_digit) {
        let end = s.find(' ').unwrap_or(s.len());
        return rfc3339(&s[..end]).then_some(end);
    }
    let month = MONTHS.iter().any(|m| s.starts_with(m));
    let two = |at: usize, max: u32, space_ok: bool| -> bool {
        let (Some(&hi), Some(&lo)) = (b.get(at), b.get(at + 1)) else {
            return false;
        };
        let hi_ok = hi.is_ascii_digit() || (space_ok && hi == b' ');
        let value = u32::from(hi.saturating_sub(b'0')) * 10 + u32::from(lo.wrapping_sub(b'0'));
        hi_ok && lo.is_ascii_digit() && (hi == b' ' || value <= max)
    };
    let ok = month
        && b.get(3) == Some(&b' ')
        && two(4, 31, true)
        && b[4..6] != *b" 0"
        && b.get(6) == Some(&b' ')
        && two(7, 23, false)
        && b.get(9) == Some(&b':')
        && two(10, 59, false)
        && b.get(12) == Some(&b':')
        && two(13, 60, false);
    if !ok {
        return None;
    }
    if b.get(15) == Some(&b'.') {
        let digits = b[16..].iter().take_while(|c| c.is_ascii_digit()).count();
        return (1..=9).contains(&digits).then_some(16 + digits);
    }
    Some(15)
}

/// A TAG word: `name:` or `name[pid]:`. Returns the name and the pid.
fn tag(word: &str) -> Option<(&str, Option<&str>)> {
    let word = word.strip_suffix(':')?;
    let (name, procid) = match word.strip_suffix(']') {
        Some(w) => {
            let (name, pid) = w.split_once('[')?;
            (name, Some(pid).filter(|p| header_field(p, 128)))
        }
        None => (word, None),
    };
    let ok = header_field(name, TAG_BYTES_MAX) && !name.contains(['[', ']', ':']);
    ok.then_some((name, procid))
}
