//! Renders an entry as one JSON object, as `journalctl -o json --all` does (systemd 252):
//! `__CURSOR`, `__REALTIME_TIMESTAMP` and `__MONOTONIC_TIMESTAMP` (decimal strings),
//! `_BOOT_ID` (from the entry header; a `_BOOT_ID` field is not repeated), then every field.
//! A value that is valid UTF-8 without control characters (tab and newline allowed) is a
//! string; any other value is an array of its bytes. A field present several times becomes
//! an array of its values, in the entry's order.

use std::io::Write;

use super::cursor;
use super::reader::Entry;

/// Whether journalctl prints `v` as a string (systemd's `utf8_is_printable`).
pub fn printable(v: &[u8]) -> bool {
    match std::str::from_utf8(v) {
        Ok(s) => s
            .chars()
            .all(|c| !(c < ' ' && c != '\t' && c != '\n' || ('\u{7f}'..='\u{9f}').contains(&c))),
        Err(_) => false,
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&s[start..i]);
                let _ = write!(out, "\\u{b:04x}");
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
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
        let _ = write!(out, "{b}");
    }
    out.push(b']');
}

/// Appends `entry` as a JSON object (no newline) to `out`.
pub fn render(seqnum_id: &[u8; 16], entry: &Entry, out: &mut Vec<u8>) {
    let mut head = String::with_capacity(160);
    cursor::format(seqnum_id, entry, &mut head);
    out.extend_from_slice(b"{\"__CURSOR\":");
    string(head.as_bytes(), out);
    let _ = write!(
        out,
        ",\"__REALTIME_TIMESTAMP\":\"{}\",\"__MONOTONIC_TIMESTAMP\":\"{}\",\"_BOOT_ID\":\"",
        entry.realtime, entry.monotonic
    );
    head.clear();
    cursor::hex(&entry.boot_id, &mut head);
    out.extend_from_slice(head.as_bytes());
    out.push(b'"');
    let fields: Vec<(&[u8], &[u8])> = entry.fields().collect();
    for (i, (name, v)) in fields.iter().enumerate() {
        if *name == b"_BOOT_ID" || fields[..i].iter().any(|(n, _)| n == name) {
            continue;
        }
        out.push(b',');
        string(name, out);
        out.push(b':');
        let repeats = fields[i + 1..].iter().any(|(n, _)| n == name);
        if !repeats {
            value(v, out);
            continue;
        }
        out.push(b'[');
        for (j, (_, w)) in fields[i..].iter().filter(|(n, _)| n == name).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            value(w, out);
        }
        out.push(b']');
    }
    out.push(b'}');
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
            let s = e.data.len() as u32;
            e.data.extend_from_slice(n.as_bytes());
            e.data.push(b'=');
            e.data.extend_from_slice(v);
            e.fields.push((s, s + n.len() as u32, e.data.len() as u32));
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
