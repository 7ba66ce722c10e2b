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

/// What a byte is to [`ascii_string`]: 0 copied as it is, 1 escaped (`"`, `\\`, tab,
/// newline), 2 not on the fast path (any other control character, or not ASCII).
const CLASS: [u8; 256] = {
    let mut t = [2u8; 256];
    let mut b = 0x20;
    while b < 0x7f {
        t[b] = 0;
        b += 1;
    }
    t[b'"' as usize] = 1;
    t[b'\\' as usize] = 1;
    t[b'\t' as usize] = 1;
    t[b'\n' as usize] = 1;
    t
};

/// `0x0101...01` times `n`: `n` in every byte of a word.
const fn every_byte(n: u8) -> u64 {
    u64::from_ne_bytes([n; 8])
}

/// Whether all 8 bytes of `x` are printable ASCII other than `"` and `\\` (class 0 of
/// [`CLASS`]): no byte below 0x20 or above 0x7e, none equal to either (exact, bit tricks from
/// "Bit Twiddling Hacks": `hasless`, `hasmore`, `haszero`).
fn plain_word(x: u64) -> bool {
    let high = every_byte(0x80);
    let below_space = x.wrapping_sub(every_byte(0x20)) & !x & high;
    let above_tilde = (x.wrapping_add(every_byte(1)) | x) & high;
    let zero = |v: u64| v.wrapping_sub(every_byte(1)) & !v & high;
    let quote = zero(x ^ every_byte(b'"'));
    let backslash = zero(x ^ every_byte(b'\\'));
    below_space | above_tilde | quote | backslash == 0
}

/// Appends `v` as a JSON string when it is printable ASCII (tab and newline allowed: nearly
/// every value), escaping as it goes, in one pass; false, with `out` as it was, at the first
/// byte that is not.
fn ascii_string(v: &[u8], out: &mut Vec<u8>) -> bool {
    let mark = out.len();
    out.reserve(v.len() + 2);
    out.push(b'"');
    let (mut i, mut copied) = (0, 0);
    while i < v.len() {
        if i + 8 <= v.len() {
            let word = u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
            if plain_word(word) {
                i += 8;
                continue;
            }
        }
        match CLASS[usize::from(v[i])] {
            0 => {}
            1 => {
                out.extend_from_slice(&v[copied..i]);
                out.extend_from_slice(match v[i] {
                    b'"' => b"\\\"",
                    b'\\' => b"\\\\",
                    b'\n' => b"\\n",
                    _ => b"\\t",
                });
                copied = i + 1;
            }
            _ => {
                out.truncate(mark);
                return false;
            }
        }
        i += 1;
    }
    out.extend_from_slice(&v[copied..]);
    out.push(b'"');
    true
}

/// Appends a printable value that is not all ASCII as a JSON string: control characters
/// other than tab and newline cannot be in it ([`printable`]), so only those two, `"` and
/// `\\` are escaped; every other byte, UTF-8 included, is copied.
fn string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut start = 0;
    let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    while let Some(k) = s[start..].iter().position(|&b| escaped(b)) {
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

/// Every byte's decimal digits followed by a comma, and how many bytes that is (2 to 4).
const BYTE_DECIMAL: [([u8; 4], u8); 256] = {
    let mut t = [([0u8; 4], 0u8); 256];
    let mut b = 0;
    while b < 256 {
        let (h, d, u) = ((b / 100) as u8, (b / 10 % 10) as u8, (b % 10) as u8);
        t[b] = match b {
            0..=9 => ([b'0' + u, b',', 0, 0], 2),
            10..=99 => ([b'0' + d, b'0' + u, b',', 0], 3),
            _ => ([b'0' + h, b'0' + d, b'0' + u, b','], 4),
        };
        b += 1;
    }
    t
};

/// Appends `v` as journalctl's array of byte values, `[104,105]`, a chunk at a time.
fn byte_array(v: &[u8], out: &mut Vec<u8>) {
    out.reserve(v.len() * 4 + 2);
    out.push(b'[');
    let mut buf = [0u8; 4 * 256];
    for chunk in v.chunks(256) {
        let mut n = 0;
        for &b in chunk {
            let (digits, len) = BYTE_DECIMAL[usize::from(b)];
            buf[n..n + 4].copy_from_slice(&digits);
            n += usize::from(len);
        }
        out.extend_from_slice(&buf[..n]);
    }
    if !v.is_empty() {
        out.pop(); // the last comma
    }
    out.push(b']');
}

fn value(v: &[u8], out: &mut Vec<u8>) {
    if ascii_string(v, out) {
        return;
    }
    if printable(v) {
        string(v, out);
    } else {
        byte_array(v, out);
    }
}

/// Appends `,"NAME":` (names are `[A-Z0-9_]`, checked when read: nothing to escape).
fn name(name: &[u8], out: &mut Vec<u8>) {
    debug_assert!(super::reader::field_name_valid(name), "{name:?}");
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name);
    out.extend_from_slice(b"\":");
}

/// A word that two equal names always share: their length and last (up to 7) bytes.
fn name_key(name: &[u8]) -> u64 {
    let tail = &name[name.len().saturating_sub(7)..];
    let mut word = [0u8; 8];
    word[..tail.len()].copy_from_slice(tail);
    u64::from_le_bytes(word) << 8 | name.len() as u64
}

/// Fields whose names [`names_may_repeat`] compares; an entry with more takes the slow path.
const KEYED_FIELDS_MAX: usize = 64;

/// Whether two fields of `entry` might have the same name (no two keys equal: surely not).
fn names_may_repeat(entry: &Entry) -> bool {
    let n = entry.fields.len();
    if n > KEYED_FIELDS_MAX {
        return true;
    }
    let mut keys = [0u64; KEYED_FIELDS_MAX];
    for (i, key) in keys[..n].iter_mut().enumerate() {
        *key = name_key(entry.field_at(i).0);
    }
    (1..n).any(|j| keys[..j].contains(&keys[j]))
}

/// Appends `entry` as a JSON object (no newline) to `out`; returns where in `out` its cursor
/// is (plain ASCII, written unescaped), so callers need not format it again.
pub fn render(seqnum_id: &[u8; 16], entry: &Entry, out: &mut Vec<u8>) -> Range<usize> {
    out.extend_from_slice(b"{\"__CURSOR\":\"");
    let cursor_start = out.len();
    let boot = cursor::format(seqnum_id, entry, out);
    let cursor = cursor_start..out.len();
    out.extend_from_slice(b"\",\"__REALTIME_TIMESTAMP\":\"");
    decimal(entry.realtime, out);
    out.extend_from_slice(b"\",\"__MONOTONIC_TIMESTAMP\":\"");
    decimal(entry.monotonic, out);
    out.extend_from_slice(b"\",\"_BOOT_ID\":\"");
    out.extend_from_within(boot);
    out.push(b'"');
    if names_may_repeat(entry) {
        fields_repeating(entry, out);
    } else {
        for (n, v) in entry.fields() {
            if n != b"_BOOT_ID" {
                name(n, out);
                value(v, out);
            }
        }
    }
    out.push(b'}');
    cursor
}

/// The fields of `entry` when a name may repeat: the first time a name is met, all its
/// values, as an array when there are several.
fn fields_repeating(entry: &Entry, out: &mut Vec<u8>) {
    let n = entry.fields.len();
    let name_at = |k: usize| entry.field_at(k).0;
    for i in 0..n {
        let (field, v) = entry.field_at(i);
        if field == b"_BOOT_ID" || (0..i).any(|k| name_at(k) == field) {
            continue;
        }
        name(field, out);
        if !(i + 1..n).any(|k| name_at(k) == field) {
            value(v, out);
            continue;
        }
        out.push(b'[');
        for (j, k) in (i..n).filter(|&k| name_at(k) == field).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            value(entry.field_at(k).1, out);
        }
        out.push(b']');
    }
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
            ("UTF", "é \"x\"\tend".as_bytes()),
        ]);
        let mut out = Vec::new();
        render(&[0x22; 16], &e, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["MESSAGE"], "a \"q\"\n\tb");
        assert_eq!(v["BIN"], serde_json::json!([120, 0, 121]));
        assert_eq!(v["EMPTY"], "");
        assert_eq!(v["TAG"], serde_json::json!(["one", [255]]));
        assert_eq!(v["UTF"], "é \"x\"\tend");
        assert_eq!(v["__REALTIME_TIMESTAMP"], "10");
        assert_eq!(v["_BOOT_ID"], "11111111111111111111111111111111");
        assert_eq!(v.as_object().unwrap().len(), 9);
        assert!(!printable("\u{85}".as_bytes()) && printable("é\t\n".as_bytes()));
    }

    /// What journalctl prints for `v`, written the plain way: a string with every control
    /// character, `"` and `\\` escaped, or an array of byte values.
    fn reference(v: &[u8]) -> Vec<u8> {
        if !printable(v) {
            let bytes: Vec<String> = v.iter().map(u8::to_string).collect();
            return format!("[{}]", bytes.join(",")).into_bytes();
        }
        let mut out = Vec::new();
        string(v, &mut out);
        out
    }

    #[test]
    fn every_byte_in_every_place_of_a_word_renders_as_the_plain_way_does() {
        for b in 0..=255u8 {
            for at in 0..19 {
                let mut v = b"0123456789abcdefghi".to_vec();
                v[at] = b;
                let mut out = b"x".to_vec();
                value(&v, &mut out);
                assert_eq!(out[1..], reference(&v), "byte {b:#x} at {at}");
            }
            let word = u64::from_le_bytes([b, b'a', b'b', b'c', b'd', b'e', b'f', b'g']);
            assert_eq!(plain_word(word), CLASS[usize::from(b)] == 0, "byte {b:#x}");
        }
    }

    #[test]
    fn long_values_render_as_the_plain_way_does() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [0, 1, 7, 8, 9, 255, 256, 257, 2048] {
            for bias in [0u8, 0x20, 0x60] {
                let v: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = (x & 0xff) as u8;
                        // Mostly printable ASCII, with a rare byte of anything.
                        if x % 61 == 0 {
                            b
                        } else {
                            bias.max(0x20) + b % 0x5f
                        }
                    })
                    .collect();
                let mut out = Vec::new();
                value(&v, &mut out);
                assert_eq!(out, reference(&v), "len {len}");
            }
        }
    }
}
