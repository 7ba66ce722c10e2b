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
    /// The files output of earlier versions: one `[[outputs.file]]` (named `files` unless it
    /// says otherwise), whose directory also holds the commit logs.
    #[serde(default)]
    pub output: Option<OutputSection>,
    /// Further outputs, each of its kind: `[[outputs.file]]`, `[[outputs.clickhouse]]`,
    /// `[[outputs.kafka]]`.
    #[serde(default)]
    pub outputs: OutputsSection,
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
    /// Directory of the commit logs and de-duplication windows (in `.state/` inside it).
    /// Default: `output.directory`; required without `[output]`.
    #[serde(default)]
    pub state_directory: Option<PathBuf>,
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

/// The outputs besides `[output]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    /// Per-stream files (`receiver/output/files.rs`), as `[output]`.
    #[serde(default)]
    pub file: Vec<OutputSection>,
    /// HTTP inserts into a ClickHouse table (`receiver/output/clickhouse.rs`).
    #[serde(default)]
    pub clickhouse: Vec<ClickhouseSection>,
    /// Records produced to Kafka topics (`receiver/output/kafka.rs`).
    #[serde(default)]
    pub kafka: Vec<super::kafka::KafkaSection>,
}

/// A files output: `[output]` or one `[[outputs.file]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// The output's name: the label `output` of its metrics, and the prefix of its marks in
    /// the commit log (never rename a files output whose directory holds data of the last
    /// run: recovery would find no mark for its newest files and remove them). At most 64
    /// bytes of `[A-Za-z0-9_-]`, unique among the outputs. Default: "files".
    #[serde(default = "default_files_name")]
    pub name: String,
    /// Globs over record keys (`*`: any run, `?`: one byte): the streams this output takes.
    /// Default: empty, every stream.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Globs over record keys this output does not take, even when `streams` matches.
    /// Default: empty.
    #[serde(default)]
    pub exclude_streams: Vec<String>,
    /// Directory of the output streams (one sub-directory per stream); for `[output]` also
    /// of the commit logs, unless `receiver.state_directory` is set.
    pub directory: PathBuf,
    /// A stream file is rotated once it reaches this size, in bytes. Default: 134217728.
    #[serde(default = "default_file_bytes_max")]
    pub file_bytes_max: u64,
    /// fdatasync output and commit log before acknowledging a frame. Default: true.
    #[serde(default = "default_fsync")]
    pub fsync: bool,
    /// Streams a shard keeps live at once (each with a current file, open or closed);
    /// records of a further stream go to `_other` while this many streams were all written
    /// within `streams_idle_s`. Default: 1024.
    #[serde(default = "default_streams_max")]
    pub streams_max: usize,
    /// A stream with no record for this long, in seconds, is forgotten: its file closed and
    /// handed to the janitor as a rotated one, its place freed for another stream; written
    /// again, it starts a new file. 0: never forgotten. Default: 300.
    #[serde(default = "default_streams_idle_s")]
    pub streams_idle_s: u64,
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
    /// How each record is written: `raw` (its bytes and a newline), `json` (one object per
    /// line: time written, sender, stream, record as a string), `rfc5424` (a syslog line),
    /// `cfjs1` (`{"format": STREAM, STREAM: record}`). Default: "raw".
    #[serde(default)]
    pub format: FileFormat,
    /// A stream's file is rotated at its next write once it is this old, in seconds; 0:
    /// never by age. Default: 0.
    #[serde(default)]
    pub file_age_max_s: u64,
    /// Rotated files are compressed with zstd (`NAME.log.zst`) by a thread of their own, off
    /// the write path. Default: false.
    #[serde(default)]
    pub compress_rotated: bool,
    /// Rotated files (compressed or not) of a shard are removed, oldest first, while they
    /// hold more than this many bytes over all streams; 0: no limit. Each shard keeps
    /// `retention_bytes_max / receiver.workers`. Default: 0.
    #[serde(default)]
    pub retention_bytes_max: u64,
    /// Rotated files last written longer ago than this are removed, in seconds; 0: kept.
    /// Default: 0.
    #[serde(default)]
    pub retention_age_s: u64,
}

/// How a files output writes each record (`format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    #[default]
    Raw,
    Json,
    Rfc5424,
    Cfjs1,
}

impl OutputSection {
    /// `file_mode` and `dir_mode`, validated.
    pub fn modes(&self) -> crate::os::Modes {
        let mode = |s: &str| super::parse_mode(s).expect("validated");
        crate::os::Modes { file: mode(&self.file_mode), dir: mode(&self.dir_mode) }
    }
}

fn default_files_name() -> String {
    "files".into()
}

/// A ClickHouse output: `[[outputs.clickhouse]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickhouseSection {
    /// The output's name, as a files output's. Required.
    pub name: String,
    /// The server's HTTP interface, `http://HOST:PORT` (no TLS, no path). Required.
    pub url: String,
    /// Table the records are inserted into (`[A-Za-z0-9_.]`, at most 128 bytes), with the
    /// columns `stream String, record String` (docs/config.md has its `CREATE TABLE`).
    /// Required.
    pub table: String,
    /// User for HTTP basic authentication. Default: none (ClickHouse's `default`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password for HTTP basic authentication. Default: none.
    #[serde(default)]
    pub password: Option<String>,
    /// An insert (connect, send, answer) taking longer fails, in ms; the shard waits for it
    /// meanwhile. Default: 5000.
    #[serde(default = "default_clickhouse_timeout_ms")]
    pub timeout_ms: u64,
    /// Globs over record keys this output takes, as a files output's. Default: every stream.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Globs over record keys this output does not take. Default: empty.
    #[serde(default)]
    pub exclude_streams: Vec<String>,
}

fn default_clickhouse_timeout_ms() -> u64 {
    5000
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
fn default_streams_idle_s() -> u64 {
    300
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
        self.validate_outputs(p);
        self.metrics.check(&[K("metrics"), K("listen")], p);
    }
}

/// Output names: the label `output`, bounded.
const OUTPUT_NAME_BYTES_MAX: usize = 64;
/// Globs per `streams` or `exclude_streams`, and bytes per glob.
const GLOBS_MAX: usize = 256;
const GLOB_BYTES_MAX: usize = 1024;

impl ReceiverConfig {
    /// Every files output: `[output]`, then `[[outputs.file]]` in order.
    pub fn file_outputs(&self) -> impl Iterator<Item = &OutputSection> {
        self.output.iter().chain(&self.outputs.file)
    }

    /// Where the commit logs live (`.state/` inside it): `receiver.state_directory`, else
    /// `output.directory` (validation makes sure one is set).
    pub fn state_directory(&self) -> &std::path::Path {
        let from_output = self.output.as_ref().map(|o| o.directory.as_path());
        self.receiver.state_directory.as_deref().or(from_output).expect("validated")
    }

    /// Modes of the commit logs and `.state/`: `[output]`'s, else 0640 and 0750.
    pub fn state_modes(&self) -> crate::os::Modes {
        self.output.as_ref().map_or(crate::os::Modes::DEFAULT, OutputSection::modes)
    }

    /// Whether the commit log is fdatasync'd before an ACK: `output.fsync`, else true.
    pub fn state_fsync(&self) -> bool {
        self.output.as_ref().is_none_or(|o| o.fsync)
    }

    fn validate_outputs(&self, p: &mut Problems) {
        let state = self.receiver.state_directory.is_some() || self.output.is_some();
        p.check(state, &[K("receiver"), K("state_directory")], || {
            "must be set when there is no [output] (it holds the commit logs)".into()
        });
        let count =
            self.file_outputs().count() + self.outputs.clickhouse.len() + self.outputs.kafka.len();
        p.check(count > 0, &[K("outputs")], || "no output: add [output] or [[outputs.*]]".into());
        let mut names: Vec<&str> = Vec::new();
        let mut dirs: Vec<&std::path::Path> = Vec::new();
        for (i, o) in self.file_outputs().enumerate() {
            let at = |k| match (&self.output, i) {
                (Some(_), 0) => vec![K("output"), K(k)],
                (Some(_), i) => vec![K("outputs"), K("file"), Seg::Index(i - 1), K(k)],
                (None, i) => vec![K("outputs"), K("file"), Seg::Index(i), K(k)],
            };
            check_name(&o.name, &mut names, &at("name"), p);
            check_globs(&o.streams, &o.exclude_streams, &at, p);
            validate_files(o, &at, p);
            p.check(!dirs.contains(&o.directory.as_path()), &at("directory"), || {
                format!("{} is another files output's directory", o.directory.display())
            });
            dirs.push(&o.directory);
        }
        for (i, c) in self.outputs.clickhouse.iter().enumerate() {
            let at = |k| vec![K("outputs"), K("clickhouse"), Seg::Index(i), K(k)];
            check_name(&c.name, &mut names, &at("name"), p);
            check_globs(&c.streams, &c.exclude_streams, &at, p);
            let url_ok = crate::http::host_port(&c.url).is_some();
            p.check(url_ok, &at("url"), || {
                format!("{:?} is not http://HOST:PORT (no TLS, no path)", c.url)
            });
            let table_ok = (1..=128).contains(&c.table.len())
                && c.table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
            p.check(table_ok, &at("table"), || {
                format!("{:?} is not 1 to 128 bytes of [A-Za-z0-9_.]", c.table)
            });
            p.range(c.timeout_ms, 1, 600_000, &at("timeout_ms"));
        }
        for (i, k) in self.outputs.kafka.iter().enumerate() {
            let at = |k| vec![K("outputs"), K("kafka"), Seg::Index(i), K(k)];
            check_name(&k.name, &mut names, &at("name"), p);
            check_globs(&k.streams, &k.exclude_streams, &at, p);
            super::kafka::validate(k, &at, p);
            #[cfg(not(feature = "kafka"))]
            p.add(&[K("outputs"), K("kafka"), Seg::Index(i)], "this build has no Kafka output");
        }
    }
}

/// A files output's own keys.
fn validate_files(o: &OutputSection, at: &dyn Fn(&'static str) -> Vec<Seg>, p: &mut Problems) {
    p.check(!o.directory.as_os_str().is_empty(), &at("directory"), || "must not be empty".into());
    p.range(o.file_bytes_max, 4096, 1 << 40, &at("file_bytes_max"));
    p.range(o.streams_max as u64, 1, 1 << 20, &at("streams_max"));
    p.range(o.streams_idle_s, 0, 366 * 86_400, &at("streams_idle_s"));
    for (key, mode) in [("file_mode", &o.file_mode), ("dir_mode", &o.dir_mode)] {
        p.check(super::parse_mode(mode).is_some(), &at(key), || {
            format!("{mode:?} is not an octal file mode like \"0640\"")
        });
    }
    p.range(o.files_open_max as u64, 1, 1 << 20, &at("files_open_max"));
    p.range(o.file_age_max_s, 0, 366 * 86_400, &at("file_age_max_s"));
    p.range(o.retention_age_s, 0, 100 * 366 * 86_400, &at("retention_age_s"));
}

/// An output's name: bounded, of safe bytes, unique.
fn check_name<'a>(name: &'a str, names: &mut Vec<&'a str>, at: &[Seg], p: &mut Problems) {
    let ok = (1..=OUTPUT_NAME_BYTES_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    p.check(ok, at, || {
        format!("{name:?} is not 1 to {OUTPUT_NAME_BYTES_MAX} bytes of [A-Za-z0-9_-]")
    });
    p.check(!names.contains(&name), at, || format!("{name:?} names another output too"));
    names.push(name);
}

/// `streams` and `exclude_streams`: bounded in count and length.
fn check_globs(
    streams: &[String],
    exclude: &[String],
    at: &dyn Fn(&'static str) -> Vec<Seg>,
    p: &mut Problems,
) {
    for (key, globs) in [("streams", streams), ("exclude_streams", exclude)] {
        let ok = globs.len() <= GLOBS_MAX && globs.iter().all(|g| g.len() <= GLOB_BYTES_MAX);
        p.check(ok, &at(key), || {
            format!("at most {GLOBS_MAX} globs of at most {GLOB_BYTES_MAX} bytes each")
        });
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

#[cfg(test)]
mod outputs_tests {
    use super::*;

    fn parse(outputs: &str) -> Result<ReceiverConfig, String> {
        let text = format!(
            "[receiver]\nlisten = \"127.0.0.1:1\"\n\
             [tls]\nca = \"Cargo.toml\"\ncert = \"Cargo.toml\"\n\
             key = \"Cargo.toml\"\n\
             {outputs}"
        );
        crate::config::parse::<ReceiverConfig>(&text, std::path::Path::new("r.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn several_outputs_parse_and_output_stays_one_files_output() {
        let c = parse(
            "[output]\ndirectory = \"a\"\n\
             [[outputs.file]]\nname = \"web\"\ndirectory = \"b\"\nstreams = [\"nginx_*\"]\n\
             [[outputs.clickhouse]]\nname = \"ch\"\nurl = \"http://127.0.0.1:8123\"\n\
             table = \"db.logs\"\n",
        )
        .unwrap();
        let names: Vec<&str> = c.file_outputs().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["files", "web"]);
        assert_eq!(c.state_directory(), std::path::Path::new("a"));
        assert_eq!(c.outputs.clickhouse[0].timeout_ms, 5000);
        assert!(c.state_fsync());
    }

    #[test]
    fn output_problems_name_their_key() {
        let e = parse("[[outputs.file]]\ndirectory = \"a\"\n").unwrap_err();
        assert!(
            e.contains("receiver.state_directory: must be set when there is no [output]"),
            "{e}"
        );
        let e = parse(
            "[output]\ndirectory = \"a\"\n[[outputs.file]]\ndirectory = \"a\"\n\
             [[outputs.clickhouse]]\nname = \"c h\"\nurl = \"https://x:1\"\ntable = \"t;\"\n",
        )
        .unwrap_err();
        assert!(e.contains("outputs.file[0].name: \"files\" names another output too"), "{e}");
        assert!(e.contains("outputs.file[0].directory: a is another files output's"), "{e}");
        assert!(e.contains("outputs.clickhouse[0].name: \"c h\" is not 1 to 64 bytes"), "{e}");
        assert!(e.contains("outputs.clickhouse[0].url: \"https://x:1\" is not http://"), "{e}");
        assert!(e.contains("outputs.clickhouse[0].table: \"t;\" is not 1 to 128"), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.contains("no output: add [output] or [[outputs.*]]"), "{e}");
    }

    #[test]
    fn http_urls_are_host_and_port_only() {
        assert_eq!(crate::http::host_port("http://127.0.0.1:8123"), Some("127.0.0.1:8123"));
        assert_eq!(crate::http::host_port("http://ch.example:8123/"), Some("ch.example:8123"));
        assert_eq!(crate::http::host_port("http://ch:8123/db"), None);
        assert_eq!(crate::http::host_port("http://u@ch:8123"), None);
        assert_eq!(crate::http::host_port("http://ch"), None);
        assert_eq!(crate::http::host_port("https://ch:8443"), None);
    }
}
