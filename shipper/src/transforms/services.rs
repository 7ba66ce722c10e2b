//! Per-core interning of service names into dense ids, so that buckets and counters are
//! vectors indexed by id instead of maps keyed by strings.
//!
//! # Design constraints
//! - At most `services_max` names per worker (config); names beyond that share id
//!   [`OTHER`] ("_other"), so a hostile writer inventing keys cannot grow memory or metric
//!   cardinality. The id is a bucket and a label only: a record is routed by its own key.
//!   Names are cut to [`KEY_BYTES_MAX`] (255) bytes, the protocol's key limit, at a UTF-8
//!   character boundary ([`bound_key`]); the sources count every cut.
//! - A name not seen for `services_idle_s` is forgotten ([`Services::forget_idle`]): its id,
//!   bucket and counters are freed for the next new name, so one burst of invented keys fills
//!   the table for a while, not for the life of the process. Its counts are added to the
//!   worker's retired totals first, so totals over all services never go down. A source's
//!   default service is never forgotten. Frames name their services (a shared name, not an
//!   id), so a frame still held when its service is forgotten counts its fate under the
//!   right name.
//!
//! # Operation
//! Every admitted or dropped record stamps its id's last use with the read batch's clock.
//! Once per rebalance interval the worker asks for idle ids to be forgotten, naming the ids
//! its open batches still count (those wait for their batch to be sealed).

use std::collections::HashMap;
use std::rc::Rc;

use super::ratelimit::RateLimiter;
use crate::config::shipper::RateLimitSection;
use crate::protocol::limits::KEY_BYTES_MAX;

/// Id of the shared bucket for names past the table's capacity.
pub const OTHER: u32 = 0;
pub const OTHER_NAME: &str = "_other";

/// A service's name as frames hold it: shared with the table, alive while a frame names it.
pub type ServiceName = Rc<[u8]>;

/// Last use of an id that is never forgotten (`_other`, a source's default service).
const PINNED: u64 = u64::MAX;

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
    /// Per service id: lines admitted and dropped by reason (a free id's are zero).
    pub counters: Vec<ServiceCounters>,
    /// What the forgotten services had counted, so totals never go down.
    pub retired: ServiceCounters,
    /// Services forgotten after `services_idle_s` without a record.
    pub forgotten: u64,
    /// Per service id: monotonic ns of its last record ([`PINNED`]: never forgotten).
    last_ns: Vec<u64>,
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
            retired: ServiceCounters::default(),
            forgotten: 0,
            last_ns: Vec::new(),
            config: config.clone(),
            share: 1.0 / workers as f64,
        };
        s.added(OTHER, 0);
        s.last_ns[OTHER as usize] = PINNED;
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

    /// The id of a source's default service `name`, which is never forgotten.
    pub fn pin(&mut self, name: &[u8], now_ns: u64) -> u32 {
        let id = self.intern(name, now_ns);
        self.last_ns[id as usize] = PINNED;
        id
    }

    /// The rate-limit stage: one token from `id`'s bucket, counted as admitted or dropped.
    #[inline]
    pub fn admit(&mut self, id: u32, now_ns: u64) -> bool {
        let last = &mut self.last_ns[id as usize];
        if *last != PINNED {
            *last = now_ns;
        }
        let counters = &mut self.counters[id as usize];
        if !self.limiter.admit(id, now_ns) {
            counters.lines_dropped[DropReason::RateLimit as usize] += 1;
            return false;
        }
        counters.lines_admitted += 1;
        true
    }

    /// Counts `n` records of service `name` (held by a frame) as dropped for `reason`: under
    /// its id, taken again if it was forgotten meanwhile (or `_other` if the table is full).
    pub fn dropped(&mut self, name: &[u8], n: u64, reason: DropReason, now_ns: u64) {
        let id = self.intern(name, now_ns);
        self.counters[id as usize].lines_dropped[reason as usize] += n;
    }

    /// Forgets every service without a record for `idle_ns` (0: never) that `in_use` does
    /// not claim; returns the ids freed.
    pub fn forget_idle(
        &mut self,
        now_ns: u64,
        idle_ns: u64,
        in_use: impl Fn(u32) -> bool,
    ) -> Vec<u32> {
        if idle_ns == 0 {
            return Vec::new();
        }
        let idle = |&(id, &last): &(usize, &u64)| {
            last != PINNED && now_ns.saturating_sub(last) >= idle_ns && !in_use(id as u32)
        };
        let ids: Vec<u32> =
            self.last_ns.iter().enumerate().filter(idle).map(|(id, _)| id as u32).collect();
        for &id in &ids {
            let c = std::mem::take(&mut self.counters[id as usize]);
            self.retired.lines_admitted += c.lines_admitted;
            for (r, n) in self.retired.lines_dropped.iter_mut().zip(c.lines_dropped) {
                *r += n;
            }
            self.last_ns[id as usize] = PINNED;
            self.table.remove(id);
            self.forgotten += 1;
        }
        ids
    }

    /// Applies a reload's `[ratelimit]`: every service in the table takes its new rate and
    /// burst (its share stays), and services met later take theirs from `config`.
    #[cold]
    pub fn set_limits(&mut self, config: &RateLimitSection, now_ns: u64) {
        self.config = config.clone();
        for id in 0..self.counters.len() as u32 {
            if self.table.is_live(id) {
                let (rate, burst) = self.config.limit_for(&self.counters[id as usize].service);
                self.limiter.set_limit(id, rate, burst, now_ns);
            }
        }
    }

    /// The counters of the services in the table now (free ids left out).
    pub fn live_counters(&self) -> Vec<ServiceCounters> {
        let live = |id: &usize| self.table.is_live(*id as u32);
        (0..self.counters.len()).filter(live).map(|id| self.counters[id].clone()).collect()
    }

    #[cold]
    fn added(&mut self, id: u32, now_ns: u64) {
        let name = String::from_utf8_lossy(self.table.name(id)).into_owned();
        let (rate, burst) = self.config.limit_for(&name);
        self.limiter.add(id, rate, burst, self.share, now_ns);
        let counters = ServiceCounters { service: name, ..Default::default() };
        let i = id as usize;
        if i == self.counters.len() {
            self.counters.push(counters);
            self.last_ns.push(now_ns);
        } else {
            self.counters[i] = counters;
            self.last_ns[i] = now_ns;
        }
        debug_assert_eq!(self.counters.len(), self.table.slots(), "one counter set per id");
    }
}

pub struct ServiceTable {
    /// Keys come from outside: the hasher is seeded at random per process, so collisions
    /// cannot be planned (and the table is bounded by `services_max`).
    ids: HashMap<ServiceName, u32, foldhash::quality::RandomState>,
    /// Per id its name; a free id's is `None`.
    names: Vec<Option<ServiceName>>,
    /// Ids forgotten, reused before the table grows.
    free: Vec<u32>,
    max: usize,
}

impl ServiceTable {
    pub fn new(services_max: usize) -> ServiceTable {
        ServiceTable {
            ids: HashMap::default(),
            names: vec![Some(OTHER_NAME.as_bytes().into())],
            free: Vec::new(),
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
        let shared: ServiceName = name.into();
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some(shared.clone());
                id
            }
            None => {
                self.names.push(Some(shared.clone()));
                u32::try_from(self.names.len() - 1).expect("bounded by services_max")
            }
        };
        self.ids.insert(shared, id);
        (id, true)
    }

    /// The id of `name` if it is interned.
    pub fn get(&self, name: &[u8]) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The name of id `id` (empty for a free id).
    pub fn name(&self, id: u32) -> &[u8] {
        self.names[id as usize].as_deref().unwrap_or_default()
    }

    /// The name of `id` as a frame holds it.
    pub fn shared(&self, id: u32) -> ServiceName {
        self.names[id as usize].clone().unwrap_or_else(|| Rc::from(&b""[..]))
    }

    fn remove(&mut self, id: u32) {
        if let Some(name) = self.names[id as usize].take() {
            self.ids.remove(&name);
            self.free.push(id);
        }
    }

    fn is_live(&self, id: u32) -> bool {
        self.names[id as usize].is_some()
    }

    /// Ids in use, [`OTHER`] included.
    pub fn len(&self) -> usize {
        self.ids.len() + 1
    }

    /// Ids ever handed out, free ones included (the length of per-id vectors).
    pub fn slots(&self) -> usize {
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

    // Guards forgetting: an idle id is freed and reused, its counts kept in the retired
    // totals; a pinned id, an id a batch still holds and a recent id stay.
    #[test]
    fn idle_services_are_forgotten_and_their_ids_reused() {
        let config = RateLimitSection { services_max: 3, ..Default::default() };
        let mut s = Services::new(&config, 1);
        let app = s.pin(b"app", 0);
        let (a, b) = (s.intern(b"a", 0), s.intern(b"b", 0));
        assert_eq!(s.intern(b"c", 0), OTHER, "full");
        for id in [app, a, b, a] {
            assert!(s.admit(id, 10));
        }
        s.dropped(b"a", 5, DropReason::OutboxFull, 10);
        assert!(s.forget_idle(20, 0, |_| false).is_empty(), "0: never");
        assert!(s.forget_idle(20, 15, |_| false).is_empty(), "not idle yet");
        assert_eq!(s.forget_idle(30, 15, |id| id == b), [a]);
        assert_eq!((s.forgotten, s.table.get(b"a"), s.table.len()), (1, None, 3));
        assert_eq!(s.retired.lines_admitted, 2);
        assert_eq!(s.retired.lines_dropped[DropReason::OutboxFull as usize], 5);
        let live: Vec<String> = s.live_counters().into_iter().map(|c| c.service).collect();
        assert_eq!(live, ["_other", "app", "b"]);
        let c = s.intern(b"c", 40);
        assert_eq!(c, a, "the freed id is reused");
        assert_eq!((s.counters[c as usize].lines_admitted, s.table.name(c)), (0, &b"c"[..]));
        // A frame naming the forgotten service counts it under its name again.
        assert_eq!(s.forget_idle(100, 15, |_| false), [c, b]);
        s.dropped(b"a", 1, DropReason::Shutdown, 100);
        let a = s.table.get(b"a").unwrap();
        assert_eq!(s.counters[a as usize].lines_dropped[DropReason::Shutdown as usize], 1);
        assert_eq!(s.table.get(b"app"), Some(app), "pinned");
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
