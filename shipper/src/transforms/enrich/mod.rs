//! The enrichment stage (`[[transforms.enrich]]`): fields added to every JSON record, static
//! ones as configured and a fetched value under its `field` ([`feed`]: an HTTP GET or a
//! command, refreshed off the data path), looked up by the record's service when `lookup`
//! says so. Records that are not JSON objects pass unchanged.
//!
//! # Design constraints
//! - Per record, with nothing new fetched: one relaxed version check per enrichment that
//!   fetches, a look-up by service id (cached per worker; a service past `services_max`
//!   looks up by its own key), and one copy of the record with the fields appended into a
//!   buffer the chain keeps. No allocation in the steady state, no lock.
//! - A record is a JSON object when its source's records are JSON (pipes and sockets in a
//!   JSON format that parsed, journal entries) and it starts with `{` and ends with `}`
//!   (trailing whitespace aside). The fields are appended before the closing `}`: a record
//!   that has a field of the same name already then has it twice (readers keep the last).
//! - Records read before an enrichment's first fetch succeeds get its static fields only.
//!
//! # Format
//! ```text
//! {RECORD'S MEMBERS,"k1":v1,...,"FIELD":VALUE}   static fields first, in config order
//! ```

pub mod feed;

use std::sync::Arc;

use crate::config::enrich::EnrichSection;
use crate::transforms::services::OTHER;
use feed::{Feed, Value};

/// One enrichment, as a worker holds it.
struct Stage {
    /// Its static fields, rendered: `"k1":v1,"k2":v2` (empty when none).
    statics: Vec<u8>,
    /// `"FIELD":`, when it fetches.
    field: Vec<u8>,
    feed: Option<Arc<Feed>>,
    /// The version of `value`.
    seen: u64,
    value: Arc<Value>,
    /// Per service id: where its value is in `value` (`None`: not looked up yet), for
    /// `lookup = "service"`.
    by_service: Vec<Option<Option<Arc<[u8]>>>>,
    /// Records it added fields to (this worker's).
    records: u64,
}

/// A worker's enrichments.
#[derive(Default)]
pub struct Enrich {
    stages: Vec<Stage>,
    /// The record with its fields, reused.
    out: Vec<u8>,
}

/// What one enrichment did, for the metrics (feed figures are the process's).
#[derive(Clone, Debug, Default)]
pub struct EnrichCounters {
    pub transform: String,
    /// Records of this worker it added fields to.
    pub records: u64,
    pub refreshes: u64,
    pub refresh_failures: u64,
    pub value_bytes: u64,
    pub refreshed_unix_s: u64,
}

impl Enrich {
    /// The enrichments of `configs`, each fetching one reading its feed in `feeds` (in the
    /// same order, one per config that fetches).
    pub fn new(configs: &[EnrichSection], feeds: &[Arc<Feed>]) -> Enrich {
        let mut feeds = feeds.iter();
        let stages = configs
            .iter()
            .map(|c| {
                let feed = c.fetches().then(|| feeds.next().expect("a feed per fetch").clone());
                let mut field = Vec::new();
                if let Some(f) = &c.field {
                    json_string(f.as_bytes(), &mut field);
                    field.push(b':');
                }
                Stage {
                    statics: render_fields(&c.fields),
                    field,
                    feed,
                    seen: 0,
                    value: Arc::new(Value::None),
                    by_service: Vec::new(),
                    records: 0,
                }
            })
            .collect();
        Enrich { stages, out: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// `body` with every enrichment's fields, or `body` itself when it is not a JSON object.
    /// `service` is the record's service id (`_other` included), `key` its own service key.
    #[inline]
    pub fn apply<'a>(&'a mut self, body: &'a [u8], service: u32, key: &[u8]) -> &'a [u8] {
        let Some(close) = object_end(body) else { return body };
        self.out.clear();
        self.out.extend_from_slice(&body[..close]);
        let mut empty = body[1..close].iter().all(u8::is_ascii_whitespace);
        for stage in &mut self.stages {
            let added = stage.append(&mut self.out, empty, service, key);
            empty &= !added;
            stage.records += u64::from(added);
        }
        self.out.push(b'}');
        &self.out
    }

    /// Service ids forgotten: their cached look-ups go (the ids will name other services).
    pub fn forget(&mut self, services: &[u32]) {
        for stage in &mut self.stages {
            for &id in services {
                if let Some(cached) = stage.by_service.get_mut(id as usize) {
                    *cached = None;
                }
            }
        }
    }

    /// Each enrichment's figures.
    pub fn counters(&self, configs: &[EnrichSection]) -> Vec<EnrichCounters> {
        use std::sync::atomic::Ordering::Relaxed;
        configs
            .iter()
            .zip(&self.stages)
            .map(|(c, s)| {
                let f = s.feed.as_ref().map(|f| &f.figures);
                let get =
                    |a: Option<&std::sync::atomic::AtomicU64>| a.map_or(0, |a| a.load(Relaxed));
                EnrichCounters {
                    transform: c.name.clone(),
                    records: s.records,
                    refreshes: get(f.map(|f| &f.refreshes)),
                    refresh_failures: get(f.map(|f| &f.failures)),
                    value_bytes: get(f.map(|f| &f.bytes)),
                    refreshed_unix_s: get(f.map(|f| &f.refreshed_unix_s)),
                }
            })
            .collect()
    }
}

impl Stage {
    /// Appends this enrichment's fields to `out` (an object's members so far, `empty` when
    /// there are none); whether it added any.
    #[inline]
    fn append(&mut self, out: &mut Vec<u8>, empty: bool, service: u32, key: &[u8]) -> bool {
        if let Some(feed) = &self.feed {
            if feed.version() != self.seen {
                (self.seen, self.value) = feed.current();
                self.by_service.clear();
            }
        }
        let i = service as usize;
        let cached = service != OTHER && matches!(&*self.value, Value::ByKey(_));
        if cached && self.by_service.get(i).is_none_or(Option::is_none) {
            if self.by_service.len() <= i {
                self.by_service.resize(i + 1, None);
            }
            let Value::ByKey(map) = &*self.value else { unreachable!("matched above") };
            self.by_service[i] = Some(map.get(key).cloned());
        }
        let fetched: Option<&[u8]> = match &*self.value {
            Value::None => None,
            Value::One(v) => Some(v),
            Value::ByKey(_) if cached => self.by_service[i].as_ref().and_then(|v| v.as_deref()),
            Value::ByKey(map) => map.get(key).map(|v| &**v),
        };
        if self.statics.is_empty() && fetched.is_none() {
            return false;
        }
        let mut sep = !empty;
        if !self.statics.is_empty() {
            if sep {
                out.push(b',');
            }
            out.extend_from_slice(&self.statics);
            sep = true;
        }
        if let Some(v) = fetched {
            if sep {
                out.push(b',');
            }
            out.extend_from_slice(&self.field);
            out.extend_from_slice(v);
        }
        true
    }
}

/// Where the closing `}` of a JSON object record is, when it looks like one.
#[inline]
fn object_end(body: &[u8]) -> Option<usize> {
    let mut end = body.len();
    while end > 0 && body[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    (end >= 2 && body[0] == b'{' && body[end - 1] == b'}').then_some(end - 1)
}

/// `"k1":v1,"k2":v2` of a TOML table, values as JSON.
fn render_fields(fields: &toml::Table) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        if !out.is_empty() {
            out.push(b',');
        }
        json_string(k.as_bytes(), &mut out);
        out.push(b':');
        out.extend_from_slice(&serde_json::to_vec(&toml_to_json(v)).expect("a JSON value"));
    }
    out
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => J::from(*f),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            J::Object(t.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect())
        }
    }
}

fn json_string(bytes: &[u8], out: &mut Vec<u8>) {
    let s = String::from_utf8_lossy(bytes);
    out.extend_from_slice(&serde_json::to_vec(&*s).expect("a JSON string"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Vec<EnrichSection> {
        #[derive(serde::Deserialize)]
        struct T {
            enrich: Vec<EnrichSection>,
        }
        toml::from_str::<T>(text).unwrap().enrich
    }

    #[test]
    fn static_fields_are_appended_to_json_objects_only() {
        let c = config("[[enrich]]\nname = \"e\"\nfields = { colo = \"fra\", tier = 2 }\n");
        let mut e = Enrich::new(&c, &[]);
        let mut run =
            |body: &str| String::from_utf8(e.apply(body.as_bytes(), 1, b"s").to_vec()).unwrap();
        assert_eq!(run("{\"a\":1}"), "{\"a\":1,\"colo\":\"fra\",\"tier\":2}");
        assert_eq!(run("{ }\n"), "{ \"colo\":\"fra\",\"tier\":2}");
        assert_eq!(run("plain text"), "plain text");
        assert_eq!(run("[1,2]"), "[1,2]");
        assert_eq!(e.counters(&c)[0].records, 2);
    }
}
