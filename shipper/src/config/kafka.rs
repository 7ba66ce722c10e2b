//! `[[outputs.kafka]]`: the receiver's Kafka output (`receiver/output/kafka.rs`), its keys and
//! their checks, and Kafka's rule for topic names, which the output applies per record.

use serde::Deserialize;

use super::{Problems, Seg};

/// Longest Kafka topic name (Kafka refuses longer ones).
pub const TOPIC_BYTES_MAX: usize = 249;
/// Where a topic template puts the record's stream.
pub const STREAM_PLACEHOLDER: &str = "{stream}";
/// Bootstrap brokers an output may list.
pub const BROKERS_MAX: usize = 64;
/// Bounds of `record_bytes_max`: below this a log line hardly fits; above it Kafka's own
/// default limits (`message.max.bytes`) are far exceeded.
pub const RECORD_BYTES_MIN: u64 = 1024;
pub const RECORD_BYTES_LIMIT: u64 = 64 << 20;

/// A Kafka output: `[[outputs.kafka]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// The output's name, as a files output's. Required.
    pub name: String,
    /// Bootstrap brokers, `HOST:PORT` each (1 to 64); the client learns the others from them.
    /// Required.
    pub brokers: Vec<String>,
    /// The topic of a record: `{stream}` stands for its stream (the record's key, with
    /// `.dead_letter` appended in frames sent here as a dead-letter destination). The result
    /// must be a Kafka topic name: 1 to 249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`; a
    /// frame with a record whose topic is not is refused (REJECT). Default: "{stream}".
    #[serde(default = "default_topic")]
    pub topic: String,
    /// What a record's Kafka key is, which picks its partition. Default: none.
    #[serde(default)]
    pub key: KafkaKey,
    /// How the producer compresses its batches. Default: lz4.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// `sync` fails when the broker has not acknowledged every record written since the last
    /// one within this, in ms; so does `write` when the producer's queue stays full for it.
    /// A record not delivered within it is given up by the producer. Default: 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Bytes the producer of one shard holds unacknowledged (its queue); a write waits for
    /// room, up to `timeout_ms`. Default: 67108864.
    #[serde(default = "default_queue_bytes_max")]
    pub queue_bytes_max: u64,
    /// Largest record (key and value) sent, in bytes; a frame holding a larger one is refused
    /// (REJECT). Keep it at or below the broker's and topics' `max.message.bytes`: a record
    /// the broker refuses is never acknowledged, so its frame is resent again and again.
    /// Default: 1000000.
    #[serde(default = "default_record_bytes_max")]
    pub record_bytes_max: u64,
    /// Globs over record keys this output takes, as a files output's. Default: every stream.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Globs over record keys this output does not take. Default: empty.
    #[serde(default)]
    pub exclude_streams: Vec<String>,
}

/// What a record's Kafka key is.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KafkaKey {
    /// No key: the producer spreads records over the topic's partitions.
    #[default]
    None,
    /// The record's stream: all of a stream's records in one partition, in order.
    Stream,
}

/// Compression of the producer's batches (the broker must support it: zstd needs Kafka 2.1).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KafkaCompression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl KafkaCompression {
    /// The name librdkafka's `compression.codec` takes.
    pub fn codec(self) -> &'static str {
        ["none", "gzip", "snappy", "lz4", "zstd"][self as usize]
    }
}

fn default_topic() -> String {
    STREAM_PLACEHOLDER.into()
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_queue_bytes_max() -> u64 {
    64 << 20
}
fn default_record_bytes_max() -> u64 {
    1_000_000
}

/// Whether `name` is a topic name Kafka accepts.
pub fn topic_valid(name: &[u8]) -> bool {
    (1..=TOPIC_BYTES_MAX).contains(&name.len())
        && name != b"."
        && name != b".."
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A `HOST:PORT` broker address.
fn broker_valid(broker: &str) -> bool {
    let Some((host, port)) = broker.rsplit_once(':') else {
        return false;
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host_ok = !host.is_empty() && host.len() <= 255 && !host.contains([',', '/', '@', ' ']);
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Checks one `[[outputs.kafka]]`'s own keys (its name and globs are checked with the others').
pub fn validate(k: &KafkaSection, at: &dyn Fn(&'static str) -> Vec<Seg>, p: &mut Problems) {
    p.check((1..=BROKERS_MAX).contains(&k.brokers.len()), &at("brokers"), || {
        format!("1 to {BROKERS_MAX} brokers, not {}", k.brokers.len())
    });
    for b in &k.brokers {
        p.check(broker_valid(b), &at("brokers"), || format!("{b:?} is not HOST:PORT"));
    }
    // The template with a one-byte stream must be a topic name: then so is it with any stream
    // of the allowed bytes, as long as it stays within the length.
    let sample = k.topic.replace(STREAM_PLACEHOLDER, "s");
    p.check(topic_valid(sample.as_bytes()), &at("topic"), || {
        format!(
            "{:?} is not a Kafka topic name with {STREAM_PLACEHOLDER} replaced: 1 to \
             {TOPIC_BYTES_MAX} bytes of [A-Za-z0-9._-]",
            k.topic
        )
    });
    p.range(k.timeout_ms, 1, 600_000, &at("timeout_ms"));
    p.range(k.queue_bytes_max, 1 << 20, 1 << 31, &at("queue_bytes_max"));
    p.range(k.record_bytes_max, RECORD_BYTES_MIN, RECORD_BYTES_LIMIT, &at("record_bytes_max"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafkas_rule() {
        assert!(topic_valid(b"logs.nginx_access-1"));
        assert!(topic_valid(&[b'a'; TOPIC_BYTES_MAX]));
        assert!(!topic_valid(&[b'a'; TOPIC_BYTES_MAX + 1]));
        for bad in [&b""[..], b".", b"..", b"a b", b"a/b", b"a@b", b"caf\xc3\xa9"] {
            assert!(!topic_valid(bad), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(topic_valid(b"..."), "Kafka forbids only . and .. among the dot names");
    }

    #[test]
    fn brokers_are_host_and_port() {
        assert!(broker_valid("kafka-1.example:9092"));
        assert!(broker_valid("127.0.0.1:9092"));
        assert!(broker_valid("[::1]:9092"));
        for bad in ["kafka", "kafka:", ":9092", "kafka:0", "a,b:1", "k:99999"] {
            assert!(!broker_valid(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::ReceiverConfig;

    fn parse(kafka: &str) -> Result<ReceiverConfig, String> {
        let text = format!(
            "[receiver]\nlisten = \"127.0.0.1:1\"\nstate_directory = \"s\"\n\
             [tls]\nca = \"Cargo.toml\"\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\n\
             [[outputs.kafka]]\nname = \"k\"\n{kafka}"
        );
        crate::config::parse::<ReceiverConfig>(&text, std::path::Path::new("r.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_as_documented() {
        let c = parse("brokers = [\"127.0.0.1:9092\"]\n").unwrap();
        let k = &c.outputs.kafka[0];
        assert_eq!(
            (k.topic.as_str(), k.key, k.compression),
            ("{stream}", super::KafkaKey::None, super::KafkaCompression::Lz4)
        );
        assert_eq!(
            (k.timeout_ms, k.queue_bytes_max, k.record_bytes_max),
            (5000, 64 << 20, 1_000_000)
        );
        assert_eq!(super::KafkaCompression::Zstd.codec(), "zstd");
    }

    #[test]
    fn problems_name_their_key() {
        let e = parse("brokers = [\"kafka\"]\ntopic = \"logs/{stream}\"\ntimeout_ms = 0\n")
            .unwrap_err();
        assert!(
            e.contains("r.toml:10: outputs.kafka[0].brokers: \"kafka\" is not HOST:PORT"),
            "{e}"
        );
        assert!(
            e.contains("outputs.kafka[0].topic: \"logs/{stream}\" is not a Kafka topic"),
            "{e}"
        );
        assert!(e.contains("outputs.kafka[0].timeout_ms: 0 is out of range"), "{e}");
        let e = parse("brokers = []\ncompression = \"brotli\"\n").unwrap_err();
        assert!(e.contains("unknown variant `brotli`"), "{e}");
    }
}
