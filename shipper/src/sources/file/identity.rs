//! How a file source knows a file: its device and inode, and a fingerprint of its first bytes,
//! so that a new file given an old file's inode (the old one deleted and its inode reused) is
//! told apart from the old one, and a file rewritten from its start (copy-and-truncate, then
//! written again past the old position before the next poll) is seen as new content.
//!
//! # Format
//! `Fingerprint { len: u16 (≤ 256), hash: u64 }`: FNV-1a 64 of the file's first `len` bytes,
//! `len` = min(size, 256) when taken. A file shorter than 256 bytes has a fingerprint over
//! fewer bytes, which grows (and is checked on the way) as the file does.

/// Bytes of a file's start its fingerprint covers, at most.
pub const FINGERPRINT_BYTES: usize = 256;

/// FNV-1a 64 of a file's first `len` bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u16,
    pub hash: u64,
}

impl Fingerprint {
    /// The fingerprint of a file whose first bytes are `head` (more than 256 are ignored).
    pub fn of(head: &[u8]) -> Fingerprint {
        let b = &head[..head.len().min(FINGERPRINT_BYTES)];
        Fingerprint { len: b.len() as u16, hash: fnv1a(b) }
    }

    /// Whether a file whose first bytes are now `head` is still the file this fingerprint
    /// was taken of: it has at least as many bytes, and the same ones.
    pub fn matches(&self, head: &[u8]) -> bool {
        let len = usize::from(self.len);
        head.len() >= len && fnv1a(&head[..len]) == self.hash
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_growing_file_matches_a_rewritten_one_does_not() {
        let short = Fingerprint::of(b"first line\n");
        assert_eq!(short.len, 11);
        assert!(short.matches(b"first line\nsecond line\n"), "grown: still the same file");
        assert!(!short.matches(b"other line\n"), "same length, other bytes: another file");
        assert!(!short.matches(b"first"), "shorter than fingerprinted: truncated");
        let empty = Fingerprint::of(b"");
        assert!(empty.matches(b"anything"), "an empty file's fingerprint says nothing yet");
        let long = vec![b'x'; 1000];
        let full = Fingerprint::of(&long);
        assert_eq!(full.len as usize, FINGERPRINT_BYTES);
        let mut changed_late = long.clone();
        changed_late[900] = b'y';
        assert!(full.matches(&changed_late), "only the first 256 bytes count");
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c, "FNV-1a 64 test vector");
    }
}
