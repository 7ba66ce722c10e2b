//! Per-core interning of service names into dense ids, so that buckets and counters are
//! vectors indexed by id instead of maps keyed by strings.
//!
//! # Design constraints
//! - At most `services_max` names per worker (config); names beyond that share id
//!   [`OTHER`] ("_other"), so a hostile writer inventing keys cannot grow memory or metric
//!   cardinality. The id is a bucket and a label only: a record is routed by its own key. Names are cut to [`KEY_BYTES_MAX`] (255) bytes, the protocol's key limit,
//!   at a UTF-8 character boundary ([`bound_key`]); the sources count every cut.

use std::collections::HashMap;

use super::ratelimit::RateLimiter;
use crate::config::shipper::RateLimitSection;
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

/// A worker's services: the table of names, each one's bucket and its counters, all indexed
/// by the dense id.
pub struct Services {
    pub table: ServiceTable,
    pub limiter: RateLimiter,
    /// Per service id: lines admitted and dropped by reason.
    pub counters: Vec<ServiceCounters>,
    /// `[ratelimit]`: each service's rate and burst.
    config: RateLimitSection,
    /// The rate's share a worker starts with, until the control plane says otherwise.
    share: f64,
}

impl Services {
    pub fn new(config: &RateLimitSection, workers: usize) -> Services {
        let mut s = Services {
            table: ServiceTable::new(config.services_max),
            limiter: RateLimiter::default(),
            counters: Vec::new(),
            config: config.clone(),
            share: 1.0 / workers as f64,
        };
        s.added(OTHER, 0);
        s
    }

    /// The id of service `name`, creating its bucket and counters on first sight.
    #[inline]
    pub fn intern(&mut self, name: &[u8], now_ns: u64) -> u32 {
        let (id, added) = self.table.intern(name);
        if added {
            self.added(id, now_ns);
        }
        id
    }

    /// The rate-limit stage: one token from `id`'s bucket, counted as admitted or dropped.
    #[inline]
    pub fn admit(&mut self, id: u32, now_ns: u64) -> bool {
        let counters = &mut self.counters[id as usize];
        if !self.limiter.admit(id, now_ns) {
            counters.lines_dropped[DropReason::RateLimit as usize] += 1;
            return false;
        }
        counters.lines_admitted += 1;
        true
    }

    /// Counts `n` records of service `id` as dropped for `reason`.
    pub fn dropped(&mut self, id: u32, n: u64, reason: DropReason) {
        self.counters[id as usize].lines_dropped[reason as usize] += n;
    }

    #[cold]
    fn added(&mut self, id: u32, now_ns: u64) {
        let name = String::from_utf8_lossy(self.table.name(id)).into_owned();
        let (rate, burst) = self.config.limit_for(&name);
        self.limiter.add(id, rate, burst, self.share, now_ns);
        self.counters.push(ServiceCounters { service: name, ..Default::default() });
        debug_assert_eq!(self.counters.len(), self.table.len(), "one counter set per id");
    }
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

/// Why a line was dropped (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Over its service's rate limit.
    RateLimit = 0,
    /// Its batch found the outbox full (every receiver too slow or down).
    OutboxFull = 1,
    /// Still unacknowledged when the shutdown deadline passed.
    Shutdown = 2,
    /// The outbox and the disk buffer were both full.
    BufferFull = 3,
    /// The disk buffer could not write it (disk full, I/O error).
    BufferError = 4,
    /// A receiver refused its frame for good (REJECT), and neither a dead-letter receiver nor
    /// the quarantine took it (none configured, full, or failed to write).
    Rejected = 5,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::RateLimit,
        DropReason::OutboxFull,
        DropReason::Shutdown,
        DropReason::BufferFull,
        DropReason::BufferError,
        DropReason::Rejected,
    ];
    pub fn label(self) -> &'static str {
        let labels = ["ratelimit", "outbox_full", "shutdown", "buffer_full", "buffer_error"];
        labels.get(self as usize).copied().unwrap_or("rejected")
    }
}

/// Counters of one service (rate-limit key).
#[derive(Clone, Debug, Default)]
pub struct ServiceCounters {
    pub service: String,
    pub lines_admitted: u64,
    pub lines_dropped: [u64; DropReason::ALL.len()],
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
