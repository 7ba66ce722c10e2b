//! Per-core interning of service names into dense ids, so that buckets and counters are
//! vectors indexed by id instead of maps keyed by strings.
//!
//! # Design constraints
//! - At most `services_max` names per core (config); names beyond that share id
//!   [`OTHER`] ("_other"), so a hostile writer inventing keys cannot grow memory or metric
//!   cardinality. Names are cut to [`KEY_BYTES_MAX`] (255) bytes, the protocol's key limit,
//!   at a UTF-8 character boundary ([`bound_key`]); the sources count every cut.

use std::collections::HashMap;

use crate::protocol::limits::KEY_BYTES_MAX;

/// Id of the shared bucket for names past the table's capacity.
pub const OTHER: u32 = 0;
pub const OTHER_NAME: &str = "_other";

/// `name` cut to [`KEY_BYTES_MAX`] bytes, never inside a UTF-8 character, and whether it was
/// cut. Every key that comes from outside (a JSON key field, a cfjs1 `format`, a syslog
/// APP-NAME or TAG, a journal identifier) passes here before it names a stream.
#[inline]
pub fn bound_key(name: &[u8]) -> (&[u8], bool) {
    if name.len() <= KEY_BYTES_MAX {
        return (name, false);
    }
    let mut end = KEY_BYTES_MAX;
    // A continuation byte (0b10xx_xxxx) would leave half a character behind.
    while end > 0 && name[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    (&name[..end], true)
}

pub struct ServiceTable {
    ids: HashMap<Box<[u8]>, u32>,
    names: Vec<Box<[u8]>>,
    max: usize,
}

impl ServiceTable {
    pub fn new(services_max: usize) -> ServiceTable {
        ServiceTable {
            ids: HashMap::new(),
            names: vec![OTHER_NAME.as_bytes().into()],
            max: services_max,
        }
    }

    /// The id of `name`, adding it if there is room. Returns `(id, added)`.
    #[inline]
    pub fn intern(&mut self, name: &[u8]) -> (u32, bool) {
        let name = bound_key(name).0;
        if let Some(&id) = self.ids.get(name) {
            return (id, false);
        }
        if self.ids.len() >= self.max {
            return (OTHER, false);
        }
        let id = u32::try_from(self.names.len()).expect("bounded by services_max");
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        (id, true)
    }

    /// The id of `name` if it is interned.
    pub fn get(&self, name: &[u8]) -> Option<u32> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, id: u32) -> &[u8] {
        &self.names[id as usize]
    }

    /// Number of ids in use, [`OTHER`] included.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_up_to_capacity() {
        let mut t = ServiceTable::new(2);
        assert_eq!(t.intern(b"a"), (1, true));
        assert_eq!(t.intern(b"b"), (2, true));
        assert_eq!(t.intern(b"a"), (1, false));
        assert_eq!(t.intern(b"c"), (OTHER, false));
        assert_eq!(t.name(2), b"b");
        assert_eq!(t.len(), 3);
        let long = [b'x'; 300];
        let mut t = ServiceTable::new(4);
        let (id, _) = t.intern(&long);
        assert_eq!(t.name(id).len(), 255);
    }

    #[test]
    fn keys_are_cut_at_a_character_boundary() {
        assert_eq!(bound_key(b"nginx"), (&b"nginx"[..], false));
        let exact = [b'a'; KEY_BYTES_MAX];
        assert_eq!(bound_key(&exact), (&exact[..], false));
        // 254 ASCII bytes then a 3-byte character straddling the limit: cut before it.
        let mut key = vec![b'a'; 254];
        key.extend_from_slice("€€".as_bytes());
        let (cut, was_cut) = bound_key(&key);
        assert!(was_cut);
        assert_eq!(cut, &key[..254]);
        assert!(std::str::from_utf8(cut).is_ok());
        let dots = [b'.'; 300];
        assert_eq!(bound_key(&dots), (&dots[..KEY_BYTES_MAX], true));
    }
}
