//! `[[sources.forward]]`: Fluentd's forward protocol v1 over TCP or TLS (documented in
//! `docs/config.md`; the source itself in `sources/forward`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::socket::{check_connection_limits, CONNECTIONS_MAX_DEFAULT, IDLE_TIMEOUT_MS_DEFAULT};
use super::{Problems, Seg};

/// Upper bound of `message_bytes_max`, in bytes.
pub const MESSAGE_BYTES_LIMIT: u64 = 64 << 20;
/// Upper bound of `decompressed_bytes_max`, in bytes.
pub const DECOMPRESSED_BYTES_LIMIT: u64 = 256 << 20;
/// Upper bound of `record_bytes_max`, in bytes: a record is one record of a frame.
pub const RECORD_BYTES_LIMIT: u64 = 16 << 20;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardSource {
    /// Name of the source in metrics (`source` label) and logs; unique among forward sources.
    /// Also the service of records whose tag is empty. Required.
    pub name: String,
    /// `ip:port` to listen on. Required (Fluentd's port is 24224).
    pub address: String,
    /// TLS on the listening port. Default: none (plain TCP).
    #[serde(default)]
    pub tls: Option<ForwardTls>,
    /// The key clients prove they know in the HELO/PING/PONG handshake (Fluentd's
    /// `<security> shared_key`). Default: none (no handshake: clients send at once).
    #[serde(default)]
    pub shared_key: Option<String>,
    /// The host name this source gives in PONG (Fluentd's `self_hostname`). Default: the
    /// machine's host name.
    #[serde(default)]
    pub self_hostname: Option<String>,
    /// Longest message (one Message, Forward or PackedForward array as sent), in bytes,
    /// 256 to 67108864. A longer one closes its connection (counted, no ack: the client
    /// resends it elsewhere or gives up). Default: 8388608 (Fluentd's default chunk limit).
    #[serde(default = "default_message_bytes_max")]
    pub message_bytes_max: u64,
    /// Most entries (records) in one Forward or PackedForward message, 1 to 10000000. A
    /// message with more is refused whole (counted, connection closed). Default: 1000000.
    #[serde(default = "default_entries_max")]
    pub entries_max: u64,
    /// Largest decompressed size of a CompressedPackedForward message's entries, in bytes,
    /// 1024 to 268435456. Decompression stops there and the message is refused (a gzip bomb:
    /// counted, connection closed). Default: 67108864.
    #[serde(default = "default_decompressed_bytes_max")]
    pub decompressed_bytes_max: u64,
    /// Largest record once rendered as JSON, in bytes, 64 to 16777216. A message holding a
    /// larger one is refused whole (counted, connection closed). Default: 1048576.
    #[serde(default = "default_record_bytes_max")]
    pub record_bytes_max: u64,
    /// Chunk ids remembered by the source (over every worker) to answer a resent chunk
    /// instead of admitting it twice: those waiting for their frames, and the most recently
    /// acknowledged ones. 16 to 16777216. Past it the oldest acknowledged id is forgotten
    /// (counted); with every remembered id still waiting, reading pauses. Default: 65536.
    #[serde(default = "default_chunks_max")]
    pub chunks_max: u64,
    /// Connections served at once per listening worker, 1 to 65536. A new connection past it
    /// closes the longest-idle one (counted). Default: 256 (as `[[sources.socket]]`).
    #[serde(default)]
    pub connections_max: Option<u64>,
    /// A connection that sends nothing for this long is closed (counted), in milliseconds,
    /// 100 to 86400000. Default: 600000 (10 minutes, as `[[sources.socket]]`; Fluentd and
    /// Fluent Bit keep their connections open between chunks).
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// The TLS handshake and the HELO/PING/PONG handshake must end within this, in
    /// milliseconds, 100 to 600000 (else the connection is closed, counted). Default: 10000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Worker that owns the listening socket. Default: every worker listens on the address
    /// (SO_REUSEPORT), as `[[sources.socket]]` with tcp.
    #[serde(default)]
    pub worker: Option<usize>,
}

/// The TLS of a forward source's port (Fluentd's `<transport tls>`): TLS 1.2 or 1.3.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardTls {
    /// PEM file of the certificate (chain) the source presents. Required.
    pub cert: PathBuf,
    /// PEM file of the private key of `cert`. Required.
    pub key: PathBuf,
    /// PEM file of the CA client certificates must be signed by. Default: none (clients
    /// present no certificate).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_message_bytes_max() -> u64 {
    8 << 20
}
fn default_entries_max() -> u64 {
    1_000_000
}
fn default_decompressed_bytes_max() -> u64 {
    64 << 20
}
fn default_record_bytes_max() -> u64 {
    1 << 20
}
fn default_chunks_max() -> u64 {
    65_536
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}

const K: fn(&'static str) -> Seg = Seg::Key;

impl ForwardSource {
    /// The listening address (validated).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.address.parse().ok()
    }

    pub fn connections_max_or_default(&self) -> usize {
        self.connections_max.unwrap_or(CONNECTIONS_MAX_DEFAULT) as usize
    }

    pub fn idle_timeout_or_default(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.unwrap_or(IDLE_TIMEOUT_MS_DEFAULT))
    }

    pub(crate) fn check(&self, i: usize, all: &[ForwardSource], workers: usize, p: &mut Problems) {
        let at = |k| vec![K("sources"), K("forward"), Seg::Index(i), K(k)];
        p.check(!self.name.is_empty() && self.name.len() <= 255, &at("name"), || {
            "must be 1 to 255 bytes".into()
        });
        p.check(all[..i].iter().all(|o| o.name != self.name), &at("name"), || {
            format!("{:?} is the name of an earlier forward source", self.name)
        });
        p.check(self.socket_addr().is_some(), &at("address"), || {
            format!("{:?} is not an ip:port address", self.address)
        });
        if let Some(tls) = &self.tls {
            let files =
                [("cert", Some(&tls.cert)), ("key", Some(&tls.key)), ("ca", tls.ca.as_ref())];
            for (key, path) in files.into_iter().filter_map(|(k, p)| Some((k, p?))) {
                let at = [K("sources"), K("forward"), Seg::Index(i), K("tls"), K(key)];
                p.check(path.is_file(), &at, || {
                    format!("{} is not a readable file", path.display())
                });
            }
        }
        if let Some(key) = &self.shared_key {
            p.check(!key.is_empty() && key.len() <= 1024, &at("shared_key"), || {
                "must be 1 to 1024 bytes".into()
            });
        }
        if let Some(host) = &self.self_hostname {
            p.check(!host.is_empty() && host.len() <= 255, &at("self_hostname"), || {
                "must be 1 to 255 bytes".into()
            });
        }
        p.range(self.message_bytes_max, 256, MESSAGE_BYTES_LIMIT, &at("message_bytes_max"));
        p.range(self.entries_max, 1, 10_000_000, &at("entries_max"));
        let d = self.decompressed_bytes_max;
        p.range(d, 1024, DECOMPRESSED_BYTES_LIMIT, &at("decompressed_bytes_max"));
        p.range(self.record_bytes_max, 64, RECORD_BYTES_LIMIT, &at("record_bytes_max"));
        p.range(self.chunks_max, 16, 1 << 24, &at("chunks_max"));
        p.range(self.handshake_timeout_ms, 100, 600_000, &at("handshake_timeout_ms"));
        check_connection_limits(self.connections_max, self.idle_timeout_ms, at, p);
        if let Some(w) = self.worker {
            p.check(w < workers, &at("worker"), || {
                format!("{w} is not a worker index (workers = {workers})")
            });
        }
    }
}
