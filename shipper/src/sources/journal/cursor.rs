//! journald cursors: `s=SEQNUM_ID;i=SEQNUM;b=BOOT_ID;m=MONOTONIC;t=REALTIME;x=XOR_HASH`
//! (ids as 32 lowercase hex digits, numbers in lowercase hex), as journalctl prints them.

use super::reader::Entry;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `entry`'s cursor to `out`; returns where in `out` its boot id's hex digits are.
pub fn format(seqnum_id: &[u8; 16], entry: &Entry, out: &mut Vec<u8>) -> std::ops::Range<usize> {
    out.extend_from_slice(b"s=");
    hex(seqnum_id, out);
    out.extend_from_slice(b";i=");
    number(entry.seqnum, out);
    out.extend_from_slice(b";b=");
    let boot = out.len()..out.len() + 32;
    hex(&entry.boot_id, out);
    out.extend_from_slice(b";m=");
    number(entry.monotonic, out);
    out.extend_from_slice(b";t=");
    number(entry.realtime, out);
    out.extend_from_slice(b";x=");
    number(entry.xor_hash, out);
    boot
}

/// Appends a 128-bit id as 32 lowercase hex digits.
fn hex(id: &[u8; 16], out: &mut Vec<u8>) {
    let mut digits = [0u8; 32];
    for (pair, b) in digits.chunks_exact_mut(2).zip(id) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
    out.extend_from_slice(&digits);
}

/// Appends `n` in lowercase hex without leading zeros.
fn number(n: u64, out: &mut Vec<u8>) {
    let len = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    let mut digits = [0u8; 16];
    for (i, d) in digits[..len].iter_mut().rev().enumerate() {
        *d = HEX[((n >> (4 * i)) & 15) as usize];
    }
    out.extend_from_slice(&digits[..len]);
}

/// A parsed cursor: what is needed to find the position again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub seqnum_id: [u8; 16],
    pub seqnum: u64,
    pub boot_id: [u8; 16],
    pub monotonic: u64,
    pub realtime: u64,
    pub xor_hash: u64,
}

fn id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Cursor {
    /// Parses a cursor; `None` if any part is missing or malformed.
    pub fn parse(s: &str) -> Option<Cursor> {
        let mut c = Cursor {
            seqnum_id: [0; 16],
            seqnum: 0,
            boot_id: [0; 16],
            monotonic: 0,
            realtime: 0,
            xor_hash: 0,
        };
        let mut seen = 0u8;
        for part in s.split(';') {
            let (k, v) = part.split_once('=')?;
            let num = || u64::from_str_radix(v, 16).ok();
            match k {
                "s" => c.seqnum_id = id(v)?,
                "i" => c.seqnum = num()?,
                "b" => c.boot_id = id(v)?,
                "m" => c.monotonic = num()?,
                "t" => c.realtime = num()?,
                "x" => c.xor_hash = num()?,
                _ => return None,
            }
            seen |= 1 << "sibmtx".find(k)?;
        }
        (seen == 0b11_1111).then_some(c)
    }

    /// Whether `entry` of a file with `seqnum_id` is at or before this cursor.
    pub fn covers(&self, seqnum_id: &[u8; 16], entry: &Entry) -> bool {
        if *seqnum_id == self.seqnum_id {
            return entry.seqnum <= self.seqnum;
        }
        if entry.boot_id == self.boot_id {
            return entry.monotonic <= self.monotonic;
        }
        entry.realtime <= self.realtime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = Entry {
            seqnum: 0x2a,
            realtime: 0x60a2,
            monotonic: 0x3e8,
            boot_id: [0xab; 16],
            xor_hash: 7,
            ..Entry::default()
        };
        let mut s = Vec::new();
        format(&[1; 16], &e, &mut s);
        let s = String::from_utf8(s).unwrap();
        assert_eq!(s, "s=01010101010101010101010101010101;i=2a;b=abababababababababababababababab;m=3e8;t=60a2;x=7");
        let c = Cursor::parse(&s).unwrap();
        assert_eq!((c.seqnum, c.realtime, c.boot_id), (0x2a, 0x60a2, [0xab; 16]));
        assert!(c.covers(&[1; 16], &e));
        assert_eq!(Cursor::parse("s=01;i=2"), None);
        assert_eq!(Cursor::parse(&s.replace("i=2a", "i=zz")), None);
    }
}
