//! The Kafka output: each record it selects produced to the topic its template names, by an
//! idempotent producer with `acks=all` (librdkafka, through the `rdkafka` crate). It cannot
//! take back what it produced, so it has no marks and relies on the de-duplication windows.
//!
//! # Design constraints
//! - Durable means: the broker acknowledged the record with `acks=all` (every in-sync replica
//!   has it; `min.insync.replicas` on the topic says how many that must be). [`Output::sync`]
//!   returns only once every record [`Output::write`] queued since the last sync is
//!   acknowledged, and fails on any delivery error or after `timeout_ms`.
//! - `write` and `sync` block their thread: `write` while the producer's queue
//!   (`queue_bytes_max` per shard and output, and [`QUEUE_RECORDS_MAX`] records) is full, up
//!   to `timeout_ms`; `sync` up to `timeout_ms`. Neither needs an async runtime: librdkafka
//!   runs its own threads (one per broker, and a few of its own) and calls back only from
//!   `sync`'s polls. While the shard itself calls its outputs, a broker that is down holds
//!   that shard's thread up to `timeout_ms` per frame, as ClickHouse's insert does.
//! - The producer is idempotent: librdkafka numbers each partition's batches, and the broker
//!   drops a batch it already has, so retries inside one producer's life (a lost answer, a
//!   reconnect) never duplicate or reorder records. Across producers it does nothing: a frame
//!   not acknowledged is resent to the receiver and produced again by a producer with another
//!   id, its records then twice in the topic. This happens when a sync fails after the broker
//!   took some of its records (a timeout, a broker restarted, another output failing), when
//!   the receiver crashes between a produce and its commit, and when librdkafka meets a fatal
//!   error (the output then creates a new producer, counted).
//! - [`Output::undo`] cannot take records back: a frame undone stays queued and is delivered;
//!   its resend makes duplicates.
//! - A record's topic is the template with `{stream}` replaced by its stream; one that is not
//!   a Kafka topic name (bytes outside `[A-Za-z0-9._-]`, over 249 bytes, `.` or `..`), or a
//!   record over `record_bytes_max`, is counted and its whole frame refused before anything
//!   of it is queued (REJECT): the shipper gives the frame another fate and the rest goes on.
//!   The topics of at most [`SELECT_CACHED_KEYS_MAX`] streams are kept per shard.
//! - Topics must exist, or the brokers must create them (`auto.create.topics.enable`):
//!   records for a topic that does not exist fail at `timeout_ms`, and their frames are
//!   resent until it does.
//!
//! # Format
//! ```text
//! Kafka record: topic   = template, `{stream}` -> STREAM
//!               key     = STREAM (key = "stream") or none (key = "none")
//!               value   = the line, as the application wrote it
//!               timestamp = when produced (CreateTime); no headers
//!   STREAM: the record's key (service or cfjs1 format), `.dead_letter` appended in frames
//!           sent here as a dead-letter destination
//! ```
//!
//! # Operation
//! 1. [`Output::write`] checks every record it selects (topic name, size) and refuses the
//!    frame if one fails; else it creates its producer if it has none, and queues each
//!    record, tagged with the current sync's number.
//! 2. [`Output::sync`] flushes and polls until every record tagged with this sync's number is
//!    acknowledged, one fails, or `timeout_ms` passes; then the number moves on (reports for
//!    earlier numbers are ignored). On failure the records stay with the producer (delivered
//!    late, or given up at `timeout_ms`: their frames are resent either way). A producer
//!    that failed [`STUCK_SYNCS_MAX`] syncs in a row, or met a fatal error, is dropped and
//!    created again at the next write (after a broker restart, librdkafka's idempotence
//!    state was seen waiting for ever on the new broker; a new producer starts clean).
//!
//! # Choice of client (measured on this project's 2-core machine, shared with two builds)
//! - `rdkafka` 0.38 with `rdkafka-sys` 4.9 (librdkafka 2.10.0 built from its bundled source
//!   by cmake): produces with `acks=all`, idempotence and none/gzip/snappy/lz4/zstd to the
//!   test broker (tansu 0.6.0), 200 000 records each. It adds 10 crates; their clean release
//!   build took 180 s of the build's unit time (159 s librdkafka's C), and about 3.0 MB to a
//!   stripped binary. rdkafka-sys 4.10 (librdkafka 2.12.1) does not compile without
//!   libcurl's headers (an `#ifdef` of a feature turned off), hence the pin.
//! - `rskafka` 0.6.0, the maintained pure-Rust client: produces with `acks=all` and
//!   gzip/lz4/zstd to the same broker, adds 34 crates (135 s of unit time, lz4's C among
//!   them), about 2.2 MB stripped; but it has no idempotent producer (its produce requests
//!   carry no producer id), nor batching across partitions or a partitioner of its own: the
//!   issue asks for idempotence, so librdkafka it is.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use super::{
    Intents, Kind, Mark, Output, Records, Select, WriteError, Written, SELECT_CACHED_KEYS_MAX,
};
use crate::config::kafka::{topic_valid, KafkaKey, KafkaSection, STREAM_PLACEHOLDER};
use crate::config::ReceiverConfig;
use crate::metrics::receiver::{KafkaFigures, OutputCounters};
use crate::receiver::commit::LogState;

/// The Kafka output as [`super::KINDS`] lists it.
pub const KIND: Kind = Kind { recover, open };

/// Records a producer holds unacknowledged (librdkafka's `queue.buffering.max.messages`).
pub const QUEUE_RECORDS_MAX: u64 = 1_000_000;
/// Appended to the stream of records of frames sent here as a dead-letter destination.
pub const DEAD_LETTER_SUFFIX: &[u8] = b".dead_letter";
/// Bytes librdkafka adds to a record's key and value on the wire, at most (its
/// `message.max.bytes` is set this much above `record_bytes_max`).
const RECORD_OVERHEAD_BYTES: u64 = 1024;
/// How long `write` waits for room in a full queue before trying again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(20);
/// Syncs a producer may fail in a row before it is replaced by a new one.
const STUCK_SYNCS_MAX: u32 = 3;
/// How long one flush of `sync` runs before it looks at the deliveries again.
const SYNC_SLICE: Duration = Duration::from_millis(10);

/// Descriptors one shard's producer may hold with `brokers` bootstrap brokers listed: its
/// wake-up pipes, and per broker a socket and a pipe (7 measured with one broker, before the
/// shipper's connections). librdkafka also connects to every broker that leads a partition it
/// writes to: a cluster larger than the list needs more.
pub fn descriptors(brokers: usize) -> usize {
    4 + 3 * (brokers + 1)
}

/// Nothing to cut back: produced records stay ([`Kind::recover`]).
fn recover(_: &ReceiverConfig, _: &LogState) -> io::Result<()> {
    Ok(())
}

/// Shard `shard`'s Kafka outputs ([`Kind::open`]): producers are created at the first write.
fn open(config: &ReceiverConfig, _gen: u64, shard: usize) -> Vec<Box<dyn Output>> {
    let open = |c| Box::new(Kafka::new(c, shard)) as Box<dyn Output>;
    config.outputs.kafka.iter().map(open).collect()
}

/// What the producer reports back, counted for the sync in progress (its number: `epoch`).
/// librdkafka calls it only from the polls of the output's own thread.
struct Tally {
    output: String,
    epoch: AtomicUsize,
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    /// The acknowledged and failed records of the sync in progress, and its first error;
    /// the next sync's number begins.
    fn close(&self) -> (u64, u64, Option<String>) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
        let error = self.first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
        (self.acked.swap(0, Ordering::Relaxed), self.failed.swap(0, Ordering::Relaxed), error)
    }
}

impl ClientContext for Tally {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let output = self.output.as_str();
        match level {
            RDKafkaLogLevel::Debug => tracing::debug!(output, facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Notice => {
                tracing::info!(output, facility, "librdkafka: {message}")
            }
            _ => tracing::warn!(output, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(output = self.output.as_str(), "kafka: {error}: {reason}");
    }
}

impl ProducerContext for Tally {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, epoch: usize) {
        if epoch != self.epoch.load(Ordering::Relaxed) {
            return; // a record of a sync that already failed
        }
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| e.to_string());
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// One shard's Kafka output.
pub struct Kafka {
    name: String,
    /// The producer's settings, kept to create it again after a fatal error.
    client: ClientConfig,
    producer: Option<BaseProducer<Tally>>,
    /// The template split at each `{stream}`.
    topic_parts: Vec<String>,
    key: KafkaKey,
    timeout: Duration,
    record_bytes_max: u64,
    select: Select,
    /// Each stream's topic, `None` when it is not a topic name; `[1]` for dead-letter frames.
    topics: [HashMap<Vec<u8>, Option<String>>; 2],
    /// Records queued since the last sync.
    queued: u64,
    /// Records queued since the last sync by a producer dropped after a fatal error.
    lost: u64,
    /// Syncs failed in a row by the current producer.
    failed_syncs: u32,
    figures: KafkaFigures,
}

impl Kafka {
    pub fn new(c: &KafkaSection, shard: usize) -> Kafka {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", c.brokers.join(","))
            .set("client.id", format!("shipper-receive-{}-{shard}", c.name))
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.codec", c.compression.codec())
            .set("message.timeout.ms", c.timeout_ms.to_string())
            .set("queue.buffering.max.kbytes", (c.queue_bytes_max >> 10).to_string())
            .set("queue.buffering.max.messages", QUEUE_RECORDS_MAX.to_string())
            .set("message.max.bytes", (c.record_bytes_max + RECORD_OVERHEAD_BYTES).to_string())
            .set("linger.ms", "5");
        Kafka {
            name: c.name.clone(),
            client,
            producer: None,
            topic_parts: c.topic.split(STREAM_PLACEHOLDER).map(str::to_string).collect(),
            key: c.key,
            timeout: Duration::from_millis(c.timeout_ms),
            record_bytes_max: c.record_bytes_max,
            select: Select::new(&c.streams, &c.exclude_streams),
            topics: [HashMap::new(), HashMap::new()],
            queued: 0,
            lost: 0,
            failed_syncs: 0,
            figures: KafkaFigures::default(),
        }
    }

    /// The producer, created if there is none (first write, or after a fatal error).
    fn producer(&mut self) -> io::Result<&BaseProducer<Tally>> {
        if let Some((code, why)) = self.producer.as_ref().and_then(|p| p.client().fatal_error()) {
            tracing::warn!(output = self.name.as_str(), "kafka producer dropped: {code}: {why}");
            self.producer = None;
            // What it held unacknowledged is gone with it: the next sync must fail.
            self.lost += std::mem::take(&mut self.queued);
        }
        if self.producer.is_none() {
            let tally = Tally {
                output: self.name.clone(),
                epoch: AtomicUsize::new(0),
                acked: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                first_error: Mutex::new(None),
            };
            let producer = self.client.create_with_context(tally).map_err(|e| {
                io::Error::other(format!("kafka {}: cannot create the producer: {e}", self.name))
            })?;
            self.producer = Some(producer);
            self.figures.producers_created += 1;
        }
        Ok(self.producer.as_ref().expect("just set"))
    }

    /// Checks every record of `records` the output takes; `Ok(n)` when all can be produced.
    fn check(&mut self, records: &Records) -> Result<u64, WriteError> {
        let (mut taken, mut bad_topic, mut too_large) = (0u64, 0u64, 0u64);
        let mut first_bad: Option<String> = None;
        for rec in records.iter() {
            let (key, body) = rec
                .map_err(|e| WriteError::Refused(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if !self.select.takes(key) {
                continue;
            }
            taken += 1;
            if topic(&mut self.topics, &self.topic_parts, key, records.dead_letter).is_none() {
                bad_topic += 1;
                first_bad.get_or_insert_with(|| bad_topic_reason(key, records.dead_letter));
            } else if record_bytes(self.key, key, records.dead_letter, body) > self.record_bytes_max
            {
                too_large += 1;
                let max = self.record_bytes_max;
                first_bad.get_or_insert_with(|| format!("a record over {max} bytes"));
            }
        }
        self.figures.records_refused_topic += bad_topic;
        self.figures.records_refused_size += too_large;
        let Some(why) = first_bad else {
            return Ok(taken);
        };
        let refused = bad_topic + too_large;
        let text = format!("kafka {}: {refused} records refused, the first: {why}", self.name);
        Err(WriteError::Refused(io::Error::new(io::ErrorKind::InvalidData, text)))
    }

    /// Queues every record of `records` the output takes (all checked), waiting for room up to
    /// `timeout_ms`; returns the bytes queued (keys and values).
    fn produce(&mut self, records: &Records) -> Result<u64, WriteError> {
        let deadline = Instant::now() + self.timeout;
        let dead_letter = records.dead_letter;
        let failed = |e: io::Error| WriteError::Failed(e);
        self.producer().map_err(failed)?;
        let producer = self.producer.as_ref().expect("created above");
        let epoch = producer.context().epoch.load(Ordering::Relaxed);
        let mut bytes = 0;
        let mut stream = Vec::new();
        for rec in records.iter() {
            let (key, body) = rec.expect("validated by check");
            if !self.select.takes(key) {
                continue;
            }
            let topic = topic(&mut self.topics, &self.topic_parts, key, dead_letter);
            let topic = topic.expect("checked");
            stream.clear();
            stream.extend_from_slice(key);
            if dead_letter {
                stream.extend_from_slice(DEAD_LETTER_SUFFIX);
            }
            bytes += record_bytes(self.key, key, dead_letter, body);
            let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, epoch);
            record = record.payload(body);
            if self.key == KafkaKey::Stream {
                record = record.key(&stream[..]);
            }
            queue(producer, record, deadline).map_err(|e| {
                failed(io::Error::new(e.kind(), format!("kafka {}: {e}", self.name)))
            })?;
            self.queued += 1;
        }
        Ok(bytes)
    }
}

/// Queues `record`, waiting (polling the producer) while its queue is full, up to `deadline`.
fn queue(
    producer: &BaseProducer<Tally>,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
    deadline: Instant,
) -> io::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if Instant::now() >= deadline {
                    let why = "the producer's queue stayed full for timeout_ms";
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                producer.poll(QUEUE_FULL_WAIT);
                record = back;
            }
            Err((e, _)) => return Err(io::Error::other(format!("cannot queue a record: {e}"))),
        }
    }
}

/// The topic of `key`'s records, from the cache of its kind (normal or dead-letter frames),
/// worked out once per stream; `None` when it is not a Kafka topic name.
fn topic<'a>(
    topics: &'a mut [HashMap<Vec<u8>, Option<String>>; 2],
    parts: &[String],
    key: &[u8],
    dead_letter: bool,
) -> Option<&'a str> {
    let cache = &mut topics[usize::from(dead_letter)];
    if !cache.contains_key(key) {
        if cache.len() >= SELECT_CACHED_KEYS_MAX {
            cache.clear();
        }
        cache.insert(key.to_vec(), render_topic(parts, key, dead_letter));
    }
    cache.get(key).expect("just inserted").as_deref()
}

/// The template (split at `{stream}`) with `key`'s stream in each gap, if that is a topic name.
fn render_topic(parts: &[String], key: &[u8], dead_letter: bool) -> Option<String> {
    let mut stream = key.to_vec();
    if dead_letter {
        stream.extend_from_slice(DEAD_LETTER_SUFFIX);
    }
    let mut name = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            name.extend_from_slice(&stream);
        }
        name.extend_from_slice(part.as_bytes());
    }
    // Valid names are ASCII, so the conversion cannot fail for them.
    topic_valid(&name).then(|| String::from_utf8(name).expect("ASCII"))
}

/// Why `key`'s topic is refused, with the key cut to 64 bytes.
fn bad_topic_reason(key: &[u8], dead_letter: bool) -> String {
    let shown = String::from_utf8_lossy(&key[..key.len().min(64)]);
    let kind = if dead_letter { " (dead letter)" } else { "" };
    format!("stream {shown:?}{kind} makes no Kafka topic name (1 to 249 bytes of [A-Za-z0-9._-])")
}

/// A record's key and value bytes, as `record_bytes_max` bounds them.
fn record_bytes(key_mode: KafkaKey, key: &[u8], dead_letter: bool, body: &[u8]) -> u64 {
    let key = match key_mode {
        KafkaKey::None => 0,
        KafkaKey::Stream if dead_letter => key.len() + DEAD_LETTER_SUFFIX.len(),
        KafkaKey::Stream => key.len(),
    };
    (key + body.len()) as u64
}

impl Output for Kafka {
    fn name(&self) -> &str {
        &self.name
    }

    /// Checks, then queues the records it selects; all refused if one cannot be produced.
    fn write(&mut self, records: &Records, _: &mut dyn Intents) -> Result<Written, WriteError> {
        let taken = self.check(records)?;
        if taken == 0 {
            return Ok(Written::default());
        }
        let bytes = self.produce(records)?;
        Ok(Written { records: taken, bytes })
    }

    /// Returns once the broker acknowledged every record queued since the last sync.
    fn sync(&mut self) -> io::Result<()> {
        let queued = std::mem::take(&mut self.queued);
        let lost = std::mem::take(&mut self.lost);
        if lost > 0 {
            let name = &self.name;
            let text = format!("kafka {name}: {lost} records lost with a failed producer");
            return Err(io::Error::other(text));
        }
        let Some(producer) = self.producer.as_ref() else {
            return Ok(()); // nothing was queued
        };
        let deadline = Instant::now() + self.timeout;
        let tally = producer.context();
        loop {
            let done = tally.acked.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed);
            if done >= queued || tally.failed.load(Ordering::Relaxed) > 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Flushing sends at once (no linger) and runs the delivery reports.
            let _ = producer.flush(left.min(SYNC_SLICE));
        }
        let (acked, failed, first_error) = tally.close();
        if acked == queued && failed == 0 {
            self.failed_syncs = 0;
            return Ok(());
        }
        // Records of this sync still queued are delivered or expire within timeout_ms (their
        // frames are resent: duplicates). A producer that keeps failing is replaced: after a
        // broker restart librdkafka's idempotence state can wait for ever on the new broker.
        self.failed_syncs += 1;
        if self.failed_syncs >= STUCK_SYNCS_MAX {
            self.failed_syncs = 0;
            self.producer = None;
        }
        let missing = queued - acked.min(queued);
        let why = match first_error {
            Some(e) => format!("{failed} failed, the first: {e}"),
            None => "over timeout_ms".to_string(),
        };
        let kind = if failed > 0 { io::ErrorKind::Other } else { io::ErrorKind::TimedOut };
        let name = &self.name;
        let text = format!("kafka {name}: {missing} of {queued} records not acknowledged: {why}");
        Err(io::Error::new(kind, text))
    }

    /// Nothing: produced records cannot be taken back (the resend produces them again).
    fn undo(&mut self) {}

    /// Nothing to take back either: a group not committed is resent and produced again.
    fn discard(&mut self) {}

    fn committed(&mut self) {}

    fn marks<'a>(&'a self, _: &mut Vec<Mark<'a>>) {}

    fn checkpoint<'a>(&'a self, _: &mut Vec<Mark<'a>>) {}

    fn report(&self, counters: &mut OutputCounters) {
        counters.kafka = self.figures.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(template: &str) -> Vec<String> {
        template.split(STREAM_PLACEHOLDER).map(str::to_string).collect()
    }

    #[test]
    fn topics_put_the_stream_in_every_placeholder() {
        let p = parts("logs.{stream}.{stream}");
        assert_eq!(render_topic(&p, b"web", false).as_deref(), Some("logs.web.web"));
        let dead = render_topic(&p, b"web", true);
        assert_eq!(dead.as_deref(), Some("logs.web.dead_letter.web.dead_letter"));
        assert_eq!(render_topic(&parts("all"), b"web", false).as_deref(), Some("all"));
        assert_eq!(render_topic(&parts("{stream}"), b"a b", false), None);
        assert_eq!(render_topic(&parts("{stream}"), b"", false), None);
        assert_eq!(render_topic(&parts("{stream}"), b"..", false), None);
        let long = |n: usize| render_topic(&parts("x{stream}"), &vec![b'a'; n], false);
        assert_eq!(long(248).map(|t| t.len()), Some(249), "249 bytes: the longest name");
        assert_eq!(long(249), None);
    }

    #[test]
    fn the_topic_cache_is_bounded_and_answers_the_same() {
        let p = parts("t-{stream}");
        let mut topics = [HashMap::new(), HashMap::new()];
        for i in 0..SELECT_CACHED_KEYS_MAX + 10 {
            let key = format!("s{i}");
            let expected = format!("t-s{i}");
            assert_eq!(topic(&mut topics, &p, key.as_bytes(), false), Some(expected.as_str()));
        }
        assert!(topics[0].len() <= SELECT_CACHED_KEYS_MAX);
        assert_eq!(topic(&mut topics, &p, b"bad/key", false), None);
        assert_eq!(topic(&mut topics, &p, b"bad/key", false), None);
        assert_eq!(topic(&mut topics, &p, b"s1", true), Some("t-s1.dead_letter"));
    }

    #[test]
    fn record_size_counts_the_key_only_when_it_is_sent() {
        assert_eq!(record_bytes(KafkaKey::None, b"web", true, b"12345"), 5);
        assert_eq!(record_bytes(KafkaKey::Stream, b"web", false, b"12345"), 8);
        assert_eq!(record_bytes(KafkaKey::Stream, b"web", true, b"12345"), 20);
    }
}
