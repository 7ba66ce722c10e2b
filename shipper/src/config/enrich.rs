//! `[[transforms.enrich]]`: fields added to every JSON record (docs/config.md).

use serde::Deserialize;

use super::{Problems, Seg};

/// Longest enrichment name (its metrics label).
pub const ENRICH_NAME_BYTES_MAX: usize = 64;
/// Longest field name.
pub const FIELD_BYTES_MAX: usize = 255;
/// Largest `bytes_max`.
pub const FETCH_BYTES_LIMIT: u64 = 64 << 20;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransformsSection {
    #[serde(default)]
    pub enrich: Vec<EnrichSection>,
}

/// One enrichment: static fields, and a JSON value fetched on an interval.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrichSection {
    /// Its name: the label `transform` of its metrics. At most 64 bytes of `[A-Za-z0-9_-]`,
    /// unique. Required.
    pub name: String,
    /// Fields added as they are to every JSON record (a TOML table; its values become JSON).
    /// Default: none.
    #[serde(default)]
    pub fields: toml::Table,
    /// The field the fetched value is added under (at most 255 bytes). Required with `url`
    /// or `command`.
    #[serde(default)]
    pub field: Option<String>,
    /// Fetch the value with an HTTP GET of this `http://HOST:PORT/PATH` (no TLS). Default:
    /// none.
    #[serde(default)]
    pub url: Option<String>,
    /// Or run this program (with its arguments, no shell) and take its standard output.
    /// Default: none.
    #[serde(default)]
    pub command: Vec<String>,
    /// Fetch again this often, in ms. Default: 60000.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A fetch (connect, request, answer; or the command's run) taking longer fails, in ms.
    /// Default: 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A fetched answer longer than this is refused, in bytes. Default: 1048576.
    #[serde(default = "default_bytes_max")]
    pub bytes_max: u64,
    /// `"service"`: the fetched value is an object keyed by service, and each record gets the
    /// value of its own service (nothing when there is none). Default: none, every record
    /// gets the whole value.
    #[serde(default)]
    pub lookup: Option<Lookup>,
}

/// What a fetched value is looked up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lookup {
    Service,
}

fn default_interval_ms() -> u64 {
    60_000
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn default_bytes_max() -> u64 {
    1 << 20
}

impl EnrichSection {
    /// Whether it fetches a value (`url` or `command`).
    pub fn fetches(&self) -> bool {
        self.url.is_some() || !self.command.is_empty()
    }

    pub fn check(&self, i: usize, all: &[EnrichSection], p: &mut Problems) {
        let at = |k| [Seg::Key("transforms"), Seg::Key("enrich"), Seg::Index(i), Seg::Key(k)];
        let name_ok = (1..=ENRICH_NAME_BYTES_MAX).contains(&self.name.len())
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        p.check(name_ok, &at("name"), || {
            format!("{:?} is not 1 to 64 bytes of [A-Za-z0-9_-]", self.name)
        });
        let repeated = all[..i].iter().any(|o| o.name == self.name);
        p.check(!repeated, &at("name"), || format!("{:?} names an earlier enrichment", self.name));
        p.check(self.url.is_none() || self.command.is_empty(), &at("command"), || {
            "give `url` or `command`, not both".into()
        });
        if let Some(url) = &self.url {
            p.check(crate::http::split_url(url).is_some(), &at("url"), || {
                format!("{url:?} is not http://HOST:PORT/PATH")
            });
        }
        match &self.field {
            Some(f) => p.check(!f.is_empty() && f.len() <= FIELD_BYTES_MAX, &at("field"), || {
                "must be 1 to 255 bytes".into()
            }),
            None => p.check(!self.fetches(), &at("field"), || {
                "required with `url` or `command`: the field the value goes under".into()
            }),
        }
        p.check(self.fetches() || !self.fields.is_empty(), &at("fields"), || {
            "give `fields`, or `url` or `command` with `field`".into()
        });
        p.check(self.lookup.is_none() || self.fetches(), &at("lookup"), || {
            "looks up a fetched value: give `url` or `command`".into()
        });
        p.range(self.interval_ms, 100, 86_400_000, &at("interval_ms"));
        p.range(self.timeout_ms, 1, 600_000, &at("timeout_ms"));
        p.range(self.bytes_max, 1, FETCH_BYTES_LIMIT, &at("bytes_max"));
    }
}
