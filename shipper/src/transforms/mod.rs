//! What happens to a record between its source and its batch: a chain of small stages, each
//! with one per-record method and its own configuration, assembled from the configuration when
//! the worker starts. All per-worker, all allocation-free in the steady state.
//!
//! # Design constraints
//! - The chain is static: [`Chain::run`] calls each stage in order, with no boxing and no
//!   dynamic dispatch per record. A stage that does not apply to a source costs one branch.
//! - A record leaves the chain either admitted (its service id, its stream key and the bytes
//!   to batch) or dropped and counted (rate limit); a stage never blocks and never does I/O.
//!
//! # Operation
//! For each record, in order:
//! 1. **decode** ([`Decode`], per source): find the service key and the stream in the record
//!    (`parse.rs`: the key field, cfjs1's `format`), or render a syslog message as JSON
//!    (`syslog/`), or take the key the source gave (journal). What does not parse is kept as
//!    text under the source's service, and the failure is reported to the source.
//! 2. **services** (`services.rs`): the key cut to the protocol's limit (reported), interned
//!    into a dense id with its bucket and counters (`[ratelimit] services_max`; past it, keys
//!    share `_other`'s bucket and label, but each record keeps its own key as its stream).
//! 3. **rate limit** (`ratelimit.rs`, `[ratelimit]`): one token from the service's bucket, or
//!    the record is dropped and counted (`reason="ratelimit"`).
//! 4. **enrich** (`enrich/`, `[[transforms.enrich]]`): static and fetched fields appended to
//!    JSON object records (looked up by service when configured); others pass unchanged.
//!
//! Adding a stage: its own file here with its config table, one field in [`Chain`], one call
//! in [`Chain::run`] (see docs/architecture.md).

pub mod enrich;
pub mod parse;
pub mod ratelimit;
pub mod services;
pub mod syslog;

use crate::config::shipper::{Format, RateLimitSection};
use crate::config::socket::MessageFormat;
use crate::record::{Outcome, Record, SourceId};
use enrich::Enrich;
use parse::Parser;
use services::{bound_key, Services};

/// How a source's records are decoded (the first stage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decode {
    /// Lines of a pipe: JSON, cfjs1 or text (`sources.pipe.format`).
    Line(Format),
    /// Messages of a socket: syslog rendered as JSON, or JSON (`sources.socket.format`).
    Message(MessageFormat),
    /// Records whose key the source gives (journal entries, rendered as JSON already).
    Given,
}

/// What the chain knows of one source.
struct Input {
    decode: Decode,
    /// Service id of its records without a key, and of those that do not parse.
    service: u32,
}

/// A record the chain admitted: where it goes and what to batch.
pub struct Admitted<'c> {
    /// Its rate-limit bucket and metrics label (`_other` once `services_max` are in use).
    pub service: u32,
    /// The stream key: the record's stream (cfjs1 `format`), else its own key, else its
    /// source's service.
    pub key: &'c [u8],
    pub body: &'c [u8],
}

/// One worker's chain of transforms.
pub struct Chain {
    inputs: Vec<Input>,
    /// `ratelimit.key_field`: the JSON field holding a record's service.
    key_field: String,
    parser: Parser,
    /// A syslog message rendered as JSON; reused, so it stops growing.
    rendered: Vec<u8>,
    pub services: Services,
    pub enrich: Enrich,
}

impl Chain {
    pub fn new(config: &RateLimitSection, enrich: Enrich, workers: usize) -> Chain {
        Chain {
            inputs: Vec::new(),
            key_field: config.key_field.clone(),
            parser: Parser::default(),
            rendered: Vec::new(),
            services: Services::new(config, workers),
            enrich,
        }
    }

    /// Registers a source decoded by `decode`, whose records without a key go to `service`
    /// (or to `_other`, for a source that gives every record's key).
    pub fn add_source(&mut self, decode: Decode, service: Option<&str>, now_ns: u64) -> SourceId {
        let service = service.map_or(services::OTHER, |s| self.services.pin(s.as_bytes(), now_ns));
        self.inputs.push(Input { decode, service });
        SourceId(u32::try_from(self.inputs.len() - 1).expect("sources are few"))
    }

    /// Forgets the services idle for `idle_ns` that `in_use` does not claim
    /// ([`Services::forget_idle`]), and what the enrichments cached for them.
    pub fn forget_idle(&mut self, now_ns: u64, idle_ns: u64, in_use: impl Fn(u32) -> bool) {
        let freed = self.services.forget_idle(now_ns, idle_ns, in_use);
        if !freed.is_empty() {
            self.enrich.forget(&freed);
        }
    }

    /// The per-record path: decode, services, rate limit. Returns what happened, for the
    /// source's counters, and the record to batch unless it was dropped.
    #[inline]
    pub fn run<'c>(
        &'c mut self,
        source: SourceId,
        record: Record<'c>,
        now_ns: u64,
    ) -> (Outcome, Option<Admitted<'c>>) {
        let Input { decode, service: default } = self.inputs[source.0 as usize];
        let mut outcome = Outcome::default();
        let bare = |body| Decoded { key: None, stream: None, body };
        let decoded = match decode {
            Decode::Given => Decoded { key: record.key, stream: record.stream, body: record.bytes },
            Decode::Line(format) => {
                match self.parser.extract(record.bytes, format, &self.key_field) {
                    Ok(f) => Decoded { key: f.key, stream: f.format, body: record.bytes },
                    Err(failure) => {
                        outcome.failure = Some(failure as u8);
                        bare(record.bytes)
                    }
                }
            }
            Decode::Message(format) => {
                let message = Message { bytes: record.bytes, format, key_field: &self.key_field };
                let default_name = self.services.table.name(default);
                match decode_message(&mut self.parser, &mut self.rendered, message, default_name) {
                    Ok(d) => d,
                    Err(failure) => {
                        outcome.failure = Some(failure as u8);
                        bare(record.bytes)
                    }
                }
            }
        };
        let Decoded { key, stream, body } = decoded;
        // Routing never depends on the table's room: a record whose service shares the
        // `_other` bucket still goes to the stream of its own (bounded) key.
        let (service, own) = match key {
            Some(k) => {
                let (k, cut) = bound_key(k);
                outcome.keys_cut += u8::from(cut);
                (self.services.intern(k, now_ns), Some(k))
            }
            None => (default, None),
        };
        let stream = stream.map(|s| {
            let (s, cut) = bound_key(s);
            outcome.keys_cut += u8::from(cut);
            s
        });
        if !self.services.admit(service, now_ns) {
            outcome.dropped = true;
            return (outcome, None);
        }
        let name = own.unwrap_or_else(|| self.services.table.name(service));
        let key = stream.unwrap_or(name);
        // Records that are JSON objects: their source's format is JSON and they parsed.
        let json = outcome.failure.is_none() && decode != Decode::Line(Format::Text);
        let body = if json && !self.enrich.is_empty() {
            self.enrich.apply(body, service, name)
        } else {
            body
        };
        (outcome, Some(Admitted { service, key, body }))
    }
}

/// A record's key, stream and the bytes to batch, as the decode stage found them.
struct Decoded<'c> {
    key: Option<&'c [u8]>,
    stream: Option<&'c [u8]>,
    body: &'c [u8],
}

/// A socket message and what decoding it needs.
struct Message<'c, 'k> {
    bytes: &'c [u8],
    format: MessageFormat,
    /// `ratelimit.key_field`.
    key_field: &'k str,
}

/// Decodes a socket message: syslog rendered as JSON into `rendered` (its APP-NAME / TAG is
/// the key; without one the record names `default_name`), or JSON as sent.
#[inline]
fn decode_message<'c>(
    parser: &'c mut Parser,
    rendered: &'c mut Vec<u8>,
    message: Message<'c, '_>,
    default_name: &[u8],
) -> Result<Decoded<'c>, syslog::Failure> {
    let Message { bytes: message, format, key_field } = message;
    let Some(syntax) = syslog::syntax(format) else {
        return match parser.extract(message, Format::Json, key_field) {
            Ok(f) => Ok(Decoded { key: f.key, stream: None, body: message }),
            Err(f) => Err(syslog::Failure::from(f)),
        };
    };
    let m = syslog::parse(message, syntax)?;
    let name = m.app.map_or(default_name, str::as_bytes);
    rendered.clear();
    syslog::write_json(&m, key_field, name, rendered);
    Ok(Decoded { key: m.app.map(str::as_bytes), stream: None, body: &rendered[..] })
}
