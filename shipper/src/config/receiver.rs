//! `shipper receive` configuration (`examples/receiver.toml`, documented in `docs/config.md`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::shipper::MetricsSection;
use super::{online_cpus, Problems, Seg, Validate};
use crate::protocol::limits::FRAME_BYTES_MAX;

/// The largest `frames_in_progress_bytes_max`: the receiver counts it in a tokio semaphore,
/// whose permits are a `usize` less 3 bits.
pub const FRAMES_IN_PROGRESS_BYTES_LIMIT: u64 = 1 << 40;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub receiver: ReceiverSection,
    pub tls: ServerTlsSection,
    pub output: OutputSection,
    #[serde(default = "receiver_metrics")]
    pub metrics: MetricsSection,
}

fn receiver_metrics() -> MetricsSection {
    MetricsSection { listen: "127.0.0.1:9181".into() }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverSection {
    /// Address to accept shippers on.
    pub listen: String,
    /// Receiver shards: threads, each owning the sender streams (run, shipper worker) hashed
    /// to it. Default: online CPUs.
    #[serde(default = "online_cpus")]
    pub workers: usize,
    /// Concurrent connections accepted (TLS handshakes included); more are closed at once and
    /// counted. Lowered at start to what the open-file limit leaves (`receiver::fit_connections`).
    /// Default: 4096.
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    /// TLS handshake plus HELLO must finish within this, in ms. Default: 5000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A connection with no frame (heartbeats included) for this long is closed, in ms.
    /// Default: 30000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A sender stream's de-duplication window not written to for this long is forgotten at
    /// the next start, in seconds (a frame of it resent later could be written twice).
    /// Default: 604800 (7 days).
    #[serde(default = "default_dedup_window_ttl_s")]
    pub dedup_window_ttl_s: u64,
    /// Largest frame payload accepted on the wire, in bytes. Default: 16777216.
    #[serde(default = "default_frame_bytes_max")]
    pub frame_bytes_max: u32,
    /// Largest decompressed DATA payload accepted, in bytes. Default: 67108864.
    #[serde(default = "default_frame_raw_bytes_max")]
    pub frame_raw_bytes_max: u32,
    /// Payload bytes of frames being received, over every connection together: a frame whose
    /// payload is over 64 KiB is read only once this budget has room for it
    /// (`receiver::budget`). At least `frame_bytes_max`, in bytes. Default: 268435456.
    #[serde(default = "default_frames_in_progress_bytes_max")]
    pub frames_in_progress_bytes_max: u64,
    /// How long a frame waits for room in `frames_in_progress_bytes_max` (its connection not
    /// read meanwhile) before the connection is refused with ERROR, in ms. Default: 1000.
    #[serde(default = "default_frames_in_progress_wait_ms")]
    pub frames_in_progress_wait_ms: u64,
}

fn default_connections_max() -> usize {
    4096
}
fn default_handshake_timeout_ms() -> u64 {
    5000
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}
fn default_dedup_window_ttl_s() -> u64 {
    7 * 24 * 3600
}
fn default_frame_bytes_max() -> u32 {
    16 << 20
}
fn default_frame_raw_bytes_max() -> u32 {
    64 << 20
}
fn default_frames_in_progress_bytes_max() -> u64 {
    256 << 20
}
fn default_frames_in_progress_wait_ms() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSection {
    /// PEM file of the CA whose client certificates are accepted.
    pub ca: PathBuf,
    /// PEM file of this receiver's certificate (chain).
    pub cert: PathBuf,
    /// PEM file of the private key of `cert`.
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Directory of the output streams (one sub-directory per stream) and the commit logs.
    pub directory: PathBuf,
    /// A stream file is rotated once it reaches this size, in bytes. Default: 134217728.
    #[serde(default = "default_file_bytes_max")]
    pub file_bytes_max: u64,
    /// fdatasync output and commit log before acknowledging a frame. Default: true.
    #[serde(default = "default_fsync")]
    pub fsync: bool,
    /// Distinct streams a shard keeps open; records of further streams go to `_other`.
    /// Default: 1024.
    #[serde(default = "default_streams_max")]
    pub streams_max: usize,
    /// Mode of the files the receiver creates (stream files, commit logs), octal, masked by
    /// the umask. Default: "0640".
    #[serde(default = "default_file_mode")]
    pub file_mode: String,
    /// Mode of the directories it creates (streams, `.state`), octal. Default: "0750".
    #[serde(default = "default_dir_mode")]
    pub dir_mode: String,
    /// Stream files a shard keeps open at once; writing to one more closes the least
    /// recently written (it is opened again, appending, when next written). Default: 256.
    #[serde(default = "default_files_open_max")]
    pub files_open_max: usize,
}

impl OutputSection {
    /// `file_mode` and `dir_mode`, validated.
    pub fn modes(&self) -> crate::os::Modes {
        let mode = |s: &str| super::parse_mode(s).expect("validated");
        crate::os::Modes { file: mode(&self.file_mode), dir: mode(&self.dir_mode) }
    }
}

fn default_file_mode() -> String {
    "0640".into()
}
fn default_dir_mode() -> String {
    "0750".into()
}

fn default_file_bytes_max() -> u64 {
    128 << 20
}
fn default_fsync() -> bool {
    true
}
fn default_streams_max() -> usize {
    1024
}
fn default_files_open_max() -> usize {
    256
}

const K: fn(&'static str) -> Seg = Seg::Key;

impl Validate for ReceiverConfig {
    fn validate(&self, p: &mut Problems) {
        let r = &self.receiver;
        let at = |k| [K("receiver"), K(k)];
        p.check(r.listen.parse::<SocketAddr>().is_ok(), &at("listen"), || {
            format!("{:?} is not an address:port", r.listen)
        });
        p.range(r.workers as u64, 1, 1024, &at("workers"));
        p.range(r.connections_max as u64, 1, 1 << 20, &at("connections_max"));
        p.range(r.handshake_timeout_ms, 1, 600_000, &at("handshake_timeout_ms"));
        p.range(r.idle_timeout_ms, 1, 3_600_000, &at("idle_timeout_ms"));
        p.range(r.dedup_window_ttl_s, 60, 10 * 365 * 24 * 3600, &at("dedup_window_ttl_s"));
        p.range(r.frame_bytes_max.into(), 1024, FRAME_BYTES_MAX.into(), &at("frame_bytes_max"));
        p.range(r.frame_raw_bytes_max.into(), 1024, 1 << 30, &at("frame_raw_bytes_max"));
        let (budget, frame_max) = (r.frames_in_progress_bytes_max, u64::from(r.frame_bytes_max));
        p.check(
            (frame_max..=FRAMES_IN_PROGRESS_BYTES_LIMIT).contains(&budget),
            &at("frames_in_progress_bytes_max"),
            || {
                format!(
                    "{budget} is out of range (allowed: frame_bytes_max, {frame_max}, so that the \
                     largest frame fits, to {FRAMES_IN_PROGRESS_BYTES_LIMIT})"
                )
            },
        );
        p.range(r.frames_in_progress_wait_ms, 1, 600_000, &at("frames_in_progress_wait_ms"));
        for (key, path) in [("ca", &self.tls.ca), ("cert", &self.tls.cert), ("key", &self.tls.key)]
        {
            p.check(path.is_file(), &[K("tls"), K(key)], || {
                format!("{} is not a readable file", path.display())
            });
        }
        let o = &self.output;
        p.check(!o.directory.as_os_str().is_empty(), &[K("output"), K("directory")], || {
            "must not be empty".into()
        });
        p.range(o.file_bytes_max, 4096, 1 << 40, &[K("output"), K("file_bytes_max")]);
        p.range(o.streams_max as u64, 1, 1 << 20, &[K("output"), K("streams_max")]);
        for (key, mode) in [("file_mode", &o.file_mode), ("dir_mode", &o.dir_mode)] {
            p.check(super::parse_mode(mode).is_some(), &[K("output"), K(key)], || {
                format!("{mode:?} is not an octal file mode like \"0640\"")
            });
        }
        p.range(o.files_open_max as u64, 1, 1 << 20, &[K("output"), K("files_open_max")]);
        self.metrics.check(&[K("metrics"), K("listen")], p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frames_in_progress_budget_must_hold_the_largest_frame() {
        let text = |budget: u64| {
            format!(
                "[receiver]\nlisten = \"127.0.0.1:1\"\nframe_bytes_max = 2097152\n\
                 frames_in_progress_bytes_max = {budget}\nframes_in_progress_wait_ms = 0\n\
                 [tls]\nca = \"/\"\ncert = \"/\"\nkey = \"/\"\n[output]\ndirectory = \"o\"\n\
                 files_open_max = 0\n"
            )
        };
        let file = std::path::Path::new("r.toml");
        let e = crate::config::parse::<ReceiverConfig>(&text(2097151), file).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains(
                "r.toml:4: receiver.frames_in_progress_bytes_max: 2097151 is out of range \
                 (allowed: frame_bytes_max, 2097152, so that the largest frame fits, to \
                 1099511627776)"
            ),
            "{e}"
        );
        assert!(e.contains("r.toml:5: receiver.frames_in_progress_wait_ms: 0 is out of range"));
        assert!(e.contains("r.toml:12: output.files_open_max: 0 is out of range (allowed: 1"));
        let e = crate::config::parse::<ReceiverConfig>(&text(2097152), file).unwrap_err();
        assert!(!e.to_string().contains("frames_in_progress_bytes_max"), "{e}");
    }
}
