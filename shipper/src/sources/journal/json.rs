//! Renders an entry as one JSON object, as `journalctl -o json --all` does (systemd 252):
//! `__CURSOR`, `__REALTIME_TIMESTAMP` and `__MONOTONIC_TIMESTAMP` (decimal strings),
//! `_BOOT_ID` (from the entry header; a `_BOOT_ID` field is not repeated), then every field.
//! A value that is valid UTF-8 without control characters (tab and newline allowed) is a
//! string; any other value is an array of its bytes. A field present several times becomes
//! an array of its values, in the entry's order.

use std::ops::Range;

use super::cursor;
use super::reader::Entry;

/// Whether journalctl prints `v` as a string (systemd's `utf8_is_printable`).
pub fn printable(v: &[u8]) -> bool {
    // Fast path: printable ASCII, tab and newline (nearly every value).
    if v.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\t' || b == b'\n') {
        return true;
    }
    match std::str::from_utf8(v) {
        Ok(s) => s
            .chars()
            .all(|c| !(c < ' ' && c != '\t' && c != '\n' || ('\u{7f}'..='\u{9f}').contains(&c))),
        Err(_) => false,
    }
}

/// Bytes that need escaping inside a JSON string: control characters, `"` and `\\`.
const ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut start = 0;
    while let Some(k) = s[start..].iter().position(|&b| ESCAPE[b as usize]) {
        let i = start + k;
        out.extend_from_slice(&s[start..i]);
        match s[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `n` in decimal.
pub fn decimal(mut n: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn value(v: &[u8], out: &mut Vec<u8>) {
    if printable(v) {
        string(v, out);
        return;
    }
    out.push(b'[');
    for (i, b) in v.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        decimal(u64::from(*b), out);
    }
    out.push(b']');
}

/// Appends `entry` as a JSON object (no newline) to `out`; returns where in `out` its cursor
/// is (plain ASCII, written unescaped), so callers need not format it again.
pub fn render(seqnum_id: &[u8; 16], entry: &Entry, out: &mut Vec<u8>) -> Range<usize> {
    out.extend_from_slice(b"{\"__CURSOR\":\"");
    let cursor_start = out.len();
    cursor::format(seqnum_id, entry, out);
    let cursor = cursor_start..out.len();
    out.extend_from_slice(b"\",\"__REALTIME_TIMESTAMP\":\"");
    decimal(entry.realtime, out);
    out.extend_from_slice(b"\",\"__MONOTONIC_TIMESTAMP\":\"");
    decimal(entry.monotonic, out);
    out.extend_from_slice(b"\",\"_BOOT_ID\":\"");
    cursor::hex(&entry.boot_id, out);
    out.push(b'"');
    let n = entry.fields.len();
    let name_at = |k: usize| entry.field_at(k).0;
    for i in 0..n {
        let (name, v) = entry.field_at(i);
        if name == b"_BOOT_ID" || (0..i).any(|k| name_at(k) == name) {
            continue;
        }
        out.push(b',');
        string(name, out);
        out.push(b':');
        if !(i + 1..n).any(|k| name_at(k) == name) {
            value(v, out);
            continue;
        }
        out.push(b'[');
        for (j, k) in (i..n).filter(|&k| name_at(k) == name).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            value(entry.field_at(k).1, out);
        }
        out.push(b']');
    }
    out.push(b'}');
    cursor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &[u8])]) -> Entry {
        let mut e = Entry {
            seqnum: 1,
            realtime: 10,
            monotonic: 5,
            boot_id: [0x11; 16],
            ..Entry::default()
        };
        for (n, v) in fields {
            e.push_field(n, v);
        }
        e
    }

    #[test]
    fn renders_like_journalctl() {
        let e = entry(&[
            ("MESSAGE", b"a \"q\"\n\tb"),
            ("BIN", b"x\x00y"),
            ("EMPTY", b""),
            ("_BOOT_ID", b"11111111111111111111111111111111"),
            ("TAG", b"one"),
            ("TAG", b"\xff"),
        ]);
        let mut out = Vec::new();
        render(&[0x22; 16], &e, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["MESSAGE"], "a \"q\"\n\tb");
        assert_eq!(v["BIN"], serde_json::json!([120, 0, 121]));
        assert_eq!(v["EMPTY"], "");
        assert_eq!(v["TAG"], serde_json::json!(["one", [255]]));
        assert_eq!(v["__REALTIME_TIMESTAMP"], "10");
        assert_eq!(v["_BOOT_ID"], "11111111111111111111111111111111");
        assert_eq!(v.as_object().unwrap().len(), 8);
        assert!(!printable("\u{85}".as_bytes()) && printable("é\t\n".as_bytes()));
    }
}
