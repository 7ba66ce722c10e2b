//! `[[sources.socket]]`: syslog and JSON lines over UDP, TCP and a unix datagram socket
//! (documented in `docs/config.md`; the sockets themselves in `sources/socket`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{parse_mode, Problems, Seg};

/// Largest message a socket source accepts (`message_bytes_max` upper bound), in bytes.
pub const MESSAGE_BYTES_LIMIT: u64 = 16 << 20;

/// Default `idle_timeout_ms` of a TCP source (10 minutes).
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 600_000;

/// Default `connections_max` of a TCP source.
pub const CONNECTIONS_MAX_DEFAULT: u64 = 256;

/// Checks the connection limits every TCP-based source shares (`sources.socket` with
/// `transport = "tcp"`, `sources.forward`): `connections_max` and `idle_timeout_ms`, where
/// `at` names a key of the source's table.
pub(crate) fn check_connection_limits(
    connections_max: Option<u64>,
    idle_timeout_ms: Option<u64>,
    at: impl Fn(&'static str) -> Vec<Seg>,
    p: &mut Problems,
) {
    if let Some(n) = connections_max {
        p.range(n, 1, 65_536, &at("connections_max"));
    }
    if let Some(ms) = idle_timeout_ms {
        p.range(ms, 100, 86_400_000, &at("idle_timeout_ms"));
    }
}

/// How the bytes reach the shipper.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    /// A unix datagram socket bound at `path` (like `/dev/log`).
    Unix,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
        }
    }
}

/// What one message is.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    Rfc5424,
    Rfc3164,
    /// RFC 5424 or RFC 3164, decided per message.
    #[default]
    Auto,
    /// One JSON object, kept as sent (as pipe sources' `json`).
    Json,
}

/// How messages are delimited in a TCP stream (RFC 6587).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// Each message ends with `\n`.
    Newline,
    /// Each message is preceded by its length in bytes and a space: `11 <13>1 - - x`.
    OctetCounting,
    /// Per message: octet counting when it starts with a digit, else newline.
    #[default]
    Auto,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketSource {
    /// Name of the source in metrics (`source` label) and logs; unique among socket sources.
    pub name: String,
    /// udp | tcp | unix.
    pub transport: Transport,
    /// `ip:port` to bind, for udp and tcp.
    #[serde(default)]
    pub address: Option<String>,
    /// Path of the unix datagram socket; a stale socket file there is replaced.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Permission bits of the unix socket file, octal string. Default: "0666" (anyone may log,
    /// as with /dev/log).
    #[serde(default)]
    pub mode: Option<String>,
    /// rfc5424 | rfc3164 | auto | json. Default: auto.
    #[serde(default)]
    pub format: MessageFormat,
    /// newline | octet_counting | auto, for tcp. Default: auto.
    #[serde(default)]
    pub framing: Option<Framing>,
    /// Socket receive buffer (SO_RCVBUF), in bytes. Default: 4194304. The kernel caps it at
    /// net.core.rmem_max; a warning says what was granted.
    #[serde(default = "default_receive_buffer_bytes")]
    pub receive_buffer_bytes: u64,
    /// Longest message, in bytes. Longer datagrams and newline-framed messages are cut to it and
    /// counted; an octet count above it is refused and its bytes skipped. Default: 65536.
    #[serde(default = "default_message_bytes_max")]
    pub message_bytes_max: u64,
    /// Service of messages without APP-NAME / TAG (and of JSON without the key field, and of
    /// what does not parse). Default: the source's `name`.
    #[serde(default)]
    pub service: Option<String>,
    /// TCP connections served at once per worker that listens. A new connection past it closes
    /// the longest-idle one (counted), so idle peers cannot lock other senders out.
    /// Default: 256.
    #[serde(default)]
    pub connections_max: Option<u64>,
    /// A TCP connection that sends nothing for this long is closed (counted), in milliseconds,
    /// 100 to 86400000. Default: 600000 (10 minutes: syslog senders such as rsyslog keep one
    /// connection open and may be quiet for minutes; each close can cost the message a
    /// sender writes before it notices, so the timeout is long and eviction at
    /// `connections_max` is what keeps room for new senders).
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// Worker that owns the socket. Default: udp and tcp bind on every worker with
    /// SO_REUSEPORT; unix is dealt round-robin after the pipes and journals.
    #[serde(default)]
    pub worker: Option<usize>,
}

fn default_receive_buffer_bytes() -> u64 {
    4 << 20
}
fn default_message_bytes_max() -> u64 {
    64 << 10
}

const K: fn(&'static str) -> Seg = Seg::Key;

impl SocketSource {
    pub fn service_name(&self) -> String {
        self.service.clone().unwrap_or_else(|| self.name.clone())
    }

    pub fn mode_bits(&self) -> u32 {
        self.mode.as_deref().map_or(0o666, |m| parse_mode(m).expect("validated"))
    }

    pub fn framing_or_default(&self) -> Framing {
        self.framing.unwrap_or_default()
    }

    pub fn connections_max_or_default(&self) -> usize {
        self.connections_max.unwrap_or(CONNECTIONS_MAX_DEFAULT) as usize
    }

    pub fn idle_timeout_or_default(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.idle_timeout_ms.unwrap_or(IDLE_TIMEOUT_MS_DEFAULT))
    }

    /// The bound address, for udp and tcp.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.address.as_deref().and_then(|a| a.parse().ok())
    }

    pub(crate) fn check(&self, i: usize, all: &[SocketSource], workers: usize, p: &mut Problems) {
        let at = |k| [K("sources"), K("socket"), Seg::Index(i), K(k)];
        p.check(!self.name.is_empty() && self.name.len() <= 255, &at("name"), || {
            "must be 1 to 255 bytes".into()
        });
        p.check(all[..i].iter().all(|o| o.name != self.name), &at("name"), || {
            format!("{:?} is the name of an earlier socket source", self.name)
        });
        let t = self.transport.label();
        let unix = self.transport == Transport::Unix;
        match &self.address {
            None => p.check(unix, &at("transport"), || format!("transport {t} needs an address")),
            Some(_) if unix => p.add(&at("address"), "not used with transport unix (give path)"),
            Some(a) => p.check(self.socket_addr().is_some(), &at("address"), || {
                format!("{a:?} is not an ip:port address")
            }),
        }
        match &self.path {
            None => p.check(!unix, &at("transport"), || "transport unix needs a path".into()),
            Some(_) if !unix => p.add(&at("path"), format!("not used with transport {t}")),
            Some(path) => {
                p.check(!path.as_os_str().is_empty(), &at("path"), || "must not be empty".into())
            }
        }
        if let Some(m) = &self.mode {
            p.check(unix, &at("mode"), || format!("not used with transport {t}"));
            p.check(parse_mode(m).is_some(), &at("mode"), || {
                format!("{m:?} is not an octal file mode like \"0666\"")
            });
        }
        let tcp = self.transport == Transport::Tcp;
        if self.framing.is_some() {
            p.check(tcp, &at("framing"), || format!("only for transport tcp, not {t}"));
        }
        if self.connections_max.is_some() {
            p.check(tcp, &at("connections_max"), || format!("only for transport tcp, not {t}"));
        }
        if self.idle_timeout_ms.is_some() {
            p.check(tcp, &at("idle_timeout_ms"), || format!("only for transport tcp, not {t}"));
        }
        check_connection_limits(self.connections_max, self.idle_timeout_ms, |k| at(k).into(), p);
        p.range(self.receive_buffer_bytes, 4096, 1 << 30, &at("receive_buffer_bytes"));
        p.range(self.message_bytes_max, 256, MESSAGE_BYTES_LIMIT, &at("message_bytes_max"));
        let service = self.service_name();
        p.check(!service.is_empty() && service.len() <= 255, &at("service"), || {
            "must be 1 to 255 bytes".into()
        });
        if let Some(w) = self.worker {
            p.check(w < workers, &at("worker"), || {
                format!("{w} is not a worker index (workers = {workers})")
            });
        }
    }
}
