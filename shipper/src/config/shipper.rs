//! `shipper run` configuration (`examples/edge.toml`, documented in `docs/config.md`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{online_cpus, parse_mode, Problems, Seg, Validate};
use crate::protocol::limits::INFLIGHT_FRAMES_LIMIT;

/// Largest line a pipe source accepts before truncating (`line_bytes_max` upper bound).
pub const LINE_BYTES_LIMIT: u64 = 16 << 20;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShipperConfig {
    #[serde(default)]
    pub shipper: ShipperSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub sources: Sources,
    #[serde(default)]
    pub ratelimit: RateLimitSection,
    #[serde(default)]
    pub transforms: super::enrich::TransformsSection,
    #[serde(default)]
    pub batch: BatchSection,
    pub receivers: ReceiversSection,
    #[serde(default)]
    pub buffer: BufferSection,
    #[serde(default)]
    pub quarantine: QuarantineSection,
    pub tls: ClientTlsSection,
    #[serde(default)]
    pub ebpf: EbpfSection,
}

/// Kernel drop accounting (docs/ebpf.md).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfSection {
    /// Load the eBPF programs at start (when built with them and privileged enough).
    /// `--no-ebpf` overrides it. Default: true.
    pub enabled: bool,
}

impl Default for EbpfSection {
    fn default() -> Self {
        EbpfSection { enabled: true }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShipperSection {
    /// Name sent to receivers in HELLO and shown in their logs. Default: the host name.
    pub name: String,
    /// Worker threads, one io_uring loop each. Default: the number of online CPUs.
    pub workers: usize,
    /// Pin worker N to the N-th CPU of the process's affinity set. Default: true.
    pub pin_workers: bool,
    /// How long SIGTERM waits for outstanding acknowledgements, in ms. Default: 10000.
    pub shutdown_timeout_ms: u64,
    /// Mode of the files the shipper creates (disk buffer segments, quarantined frames,
    /// journal checkpoints), octal, masked by the umask. Default: "0640".
    pub file_mode: String,
    /// Mode of the directories it creates, octal, masked by the umask. Default: "0750".
    pub dir_mode: String,
    /// Path of the unix control socket (mode 0600, this user only) through which a
    /// `shipper run --takeover` takes over the pipes and sockets of the running shipper
    /// (docs/architecture.md, "Takeover"), at most 107 bytes. Default: none (no control
    /// socket, no takeover); under the packaged unit, "/run/shipper/control.sock".
    pub control_socket: Option<std::path::PathBuf>,
}

impl ShipperSection {
    /// `file_mode` and `dir_mode`, validated.
    pub fn modes(&self) -> crate::os::Modes {
        let mode = |s: &str| parse_mode(s).expect("validated");
        crate::os::Modes { file: mode(&self.file_mode), dir: mode(&self.dir_mode) }
    }
}

impl Default for ShipperSection {
    fn default() -> Self {
        ShipperSection {
            name: hostname(),
            workers: online_cpus(),
            pin_workers: true,
            shutdown_timeout_ms: 10_000,
            file_mode: "0640".into(),
            dir_mode: "0750".into(),
            control_socket: None,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "shipper".to_string())
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Address of the Prometheus `/metrics` endpoint; empty disables it.
    /// Default: "127.0.0.1:9180" for the shipper, "127.0.0.1:9181" for the receiver.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { listen: "127.0.0.1:9180".into() }
    }
}

impl MetricsSection {
    pub(crate) fn check(&self, path: &[Seg], p: &mut Problems) {
        p.check(self.listen.is_empty() || self.listen.parse::<SocketAddr>().is_ok(), path, || {
            format!("{:?} is not an address:port", self.listen)
        });
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    #[serde(default)]
    pub pipe: Vec<PipeSource>,
    #[serde(default)]
    pub journal: Vec<JournalSource>,
    #[serde(default)]
    pub socket: Vec<super::socket::SocketSource>,
    #[serde(default)]
    pub file: Vec<FileSource>,
    #[serde(default)]
    pub forward: Vec<super::forward::ForwardSource>,
}

/// Where a journal source starts when it has no checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Since {
    /// The oldest entry still on disk.
    #[default]
    Oldest,
    /// Only entries written after the shipper started.
    Now,
    /// The entries after this cursor.
    Cursor(String),
}

impl<'de> Deserialize<'de> for Since {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "oldest" => Since::Oldest,
            "now" => Since::Now,
            _ => Since::Cursor(s),
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JournalSource {
    /// Directory of journal files (searched two levels deep). Default: /var/log/journal if it
    /// exists, else /run/log/journal.
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// Explicit journal files instead of a directory.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// "oldest", "now", or a cursor; used only when there is no checkpoint. Default: "oldest".
    #[serde(default)]
    pub since: Since,
    /// Only entries whose _SYSTEMD_UNIT is one of these (empty: all).
    #[serde(default)]
    pub units: Vec<String>,
    /// Never entries whose _SYSTEMD_UNIT is one of these.
    #[serde(default)]
    pub exclude_units: Vec<String>,
    /// Only entries whose SYSLOG_IDENTIFIER is one of these (empty: all).
    #[serde(default)]
    pub identifiers: Vec<String>,
    /// Never entries whose SYSLOG_IDENTIFIER is one of these.
    #[serde(default)]
    pub exclude_identifiers: Vec<String>,
    /// Field whose value is the record's service. Default: "SYSLOG_IDENTIFIER", falling back
    /// to _SYSTEMD_UNIT, then to "journal".
    #[serde(default = "default_service_field")]
    pub service_field: String,
    /// How often files are checked for new entries and new files, in ms. Default: 250.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// File holding the cursor of the last acknowledged entry. Default: none (no checkpoint:
    /// every start begins at `since`).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Worker that owns this source. Default: dealt round-robin after the pipes.
    #[serde(default)]
    pub worker: Option<usize>,
}

fn default_service_field() -> String {
    "SYSLOG_IDENTIFIER".into()
}
fn default_poll_interval_ms() -> u64 {
    250
}

impl JournalSource {
    /// The directory searched when no files are given.
    pub fn directory_or_default(&self) -> PathBuf {
        self.directory.clone().unwrap_or_else(|| {
            let var = PathBuf::from("/var/log/journal");
            if var.is_dir() {
                var
            } else {
                PathBuf::from("/run/log/journal")
            }
        })
    }

    /// A name for metrics and logs.
    pub fn name(&self) -> String {
        match self.files.as_slice() {
            [] => format!("journal:{}", self.directory_or_default().display()),
            [one] => format!("journal:{}", one.display()),
            [first, ..] => format!("journal:{}+{}", first.display(), self.files.len() - 1),
        }
    }

    fn check(&self, i: usize, workers: usize, p: &mut Problems) {
        let at = |k| [K("sources"), K("journal"), Seg::Index(i), K(k)];
        p.check(self.directory.is_none() || self.files.is_empty(), &at("files"), || {
            "give either directory or files, not both".into()
        });
        p.range(self.poll_interval_ms, 10, 60_000, &at("poll_interval_ms"));
        // `service_field` and a `since` cursor are checked by the journal source itself
        // (`sources::journal::check_config`), which knows the journal's grammar.
        if let Some(w) = self.worker {
            p.check(w < workers, &at("worker"), || {
                format!("{w} is not a worker index (workers = {workers})")
            });
        }
    }
}

/// Where a file source starts reading a file it has no saved position for.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileSince {
    /// At its first byte.
    #[default]
    Oldest,
    /// At its end when the source starts (files appearing later are read from their start).
    Now,
}

/// A file source (`sources/file/`): log files followed by path or glob, with positions.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// Absolute paths of the files to follow; `*` and `?` match within one path component
    /// (no `**`). Listed again every `poll_interval_ms`. Required.
    pub paths: Vec<String>,
    /// File holding each followed file's position (the end of its last acknowledged line).
    /// Default: none (nothing persisted: every start begins at `since`).
    #[serde(default)]
    pub positions: Option<PathBuf>,
    /// "oldest" or "now": where a file without a saved position starts. Default: "oldest".
    #[serde(default)]
    pub since: FileSince,
    /// Service for lines that carry no key field, and for text lines. Default: the file stem
    /// of the first path if it has no wildcard, else "file".
    #[serde(default)]
    pub service: Option<String>,
    /// json | cfjs1 | text, as for pipes. Default: json.
    #[serde(default)]
    pub format: Format,
    /// Longest line kept, in bytes; longer lines are cut and counted. Default: 65536.
    #[serde(default = "default_line_bytes_max")]
    pub line_bytes_max: u64,
    /// How often paths are listed again and files checked for growth, rotation and
    /// truncation, in ms. Default: 250.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How long a last line without its newline stays unfinished before it is sent as it
    /// is, in ms. Default: 1000.
    #[serde(default = "default_partial_line_ms")]
    pub partial_line_ms: u64,
    /// Most files followed at once by this source; more matches are left out and counted.
    /// Default: 1024.
    #[serde(default = "default_files_max")]
    pub files_max: u64,
    /// A regular expression (the `regex` crate's syntax, at most 1024 bytes): a line that
    /// matches it starts a record, and the lines after it that do not are joined to it with
    /// `\n` (stack traces). Default: none, every line a record.
    #[serde(default)]
    pub multiline_start: Option<String>,
    /// Worker that owns this source. Default: dealt round-robin after pipes and journals.
    #[serde(default)]
    pub worker: Option<usize>,
}

fn default_partial_line_ms() -> u64 {
    1000
}
fn default_files_max() -> u64 {
    1024
}

impl FileSource {
    /// A name for metrics and logs: `file:` and the first path (and how many more).
    pub fn name(&self) -> String {
        match self.paths.as_slice() {
            [] => "file:".into(),
            [one] => format!("file:{one}"),
            [first, ..] => format!("file:{first}+{}", self.paths.len() - 1),
        }
    }

    /// The service of lines without a key field.
    pub fn service_name(&self) -> String {
        self.service.clone().unwrap_or_else(|| match self.paths.first() {
            Some(p) if !p.contains(['*', '?']) => std::path::Path::new(p)
                .file_stem()
                .map_or("file".into(), |s| s.to_string_lossy().into_owned()),
            _ => "file".into(),
        })
    }

    fn check(&self, i: usize, all: &[FileSource], workers: usize, p: &mut Problems) {
        let at = |k| [K("sources"), K("file"), Seg::Index(i), K(k)];
        p.check(!self.paths.is_empty(), &at("paths"), || "give at least one path".into());
        for path in &self.paths {
            p.check(path.starts_with('/'), &at("paths"), || format!("{path:?} is not absolute"));
            p.check(!path.contains("**"), &at("paths"), || {
                format!("{path:?}: `**` is not supported (`*` matches within one component)")
            });
        }
        if let Some(pos) = &self.positions {
            let shared = all[..i].iter().any(|o| o.positions.as_ref() == Some(pos));
            p.check(!shared, &at("positions"), || {
                format!("{} is the positions file of an earlier file source", pos.display())
            });
        }
        p.range(self.line_bytes_max, 64, LINE_BYTES_LIMIT, &at("line_bytes_max"));
        if let Some(re) = &self.multiline_start {
            let bad = match regex::bytes::Regex::new(re) {
                _ if re.len() > 1024 => Some("over 1024 bytes".to_string()),
                Ok(_) => None,
                Err(e) => Some(e.to_string().lines().last().unwrap_or("").trim().to_string()),
            };
            p.check(bad.is_none(), &at("multiline_start"), || {
                format!("{re:?} is not a pattern: {}", bad.clone().unwrap_or_default())
            });
        }
        p.range(self.poll_interval_ms, 10, 60_000, &at("poll_interval_ms"));
        p.range(self.partial_line_ms, 10, 3_600_000, &at("partial_line_ms"));
        p.range(self.files_max, 1, 65_536, &at("files_max"));
        if let Some(w) = self.worker {
            p.check(w < workers, &at("worker"), || {
                format!("{w} is not a worker index (workers = {workers})")
            });
        }
        let service = self.service_name();
        p.check(!service.is_empty() && service.len() <= 255, &at("service"), || {
            "must be 1 to 255 bytes".into()
        });
    }
}

/// How the lines of a source are framed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line; the rate-limit key is read from it.
    #[default]
    Json,
    /// JSON with a `format` field naming the log type; output streams follow it.
    Cfjs1,
    /// Opaque text lines under the source's `service`.
    Text,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipeSource {
    /// Path of the FIFO; created if missing.
    pub path: PathBuf,
    /// Permission bits when the FIFO is created, octal string. Default: "0660".
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Service for lines that carry no key field, and for text lines. Default: the file stem.
    #[serde(default)]
    pub service: Option<String>,
    /// json | cfjs1 | text. Default: json.
    #[serde(default)]
    pub format: Format,
    /// Longest line kept, in bytes; longer lines are truncated and counted. Default: 65536.
    #[serde(default = "default_line_bytes_max")]
    pub line_bytes_max: u64,
    /// Pipe buffer size set with F_SETPIPE_SZ, in bytes. Default: 1048576.
    #[serde(default = "default_pipe_bytes")]
    pub pipe_bytes: u64,
    /// Bytes asked of one read. Default: 262144.
    #[serde(default = "default_read_bytes")]
    pub read_bytes: u64,
    /// Worker that owns this pipe. Default: pipes are dealt round-robin.
    #[serde(default)]
    pub worker: Option<usize>,
}

fn default_mode() -> String {
    "0660".into()
}
fn default_line_bytes_max() -> u64 {
    64 << 10
}
fn default_pipe_bytes() -> u64 {
    1 << 20
}
fn default_read_bytes() -> u64 {
    256 << 10
}

impl PipeSource {
    pub fn mode_bits(&self) -> u32 {
        parse_mode(&self.mode).expect("validated")
    }

    /// The service of lines without a key field.
    pub fn service_name(&self) -> String {
        self.service.clone().unwrap_or_else(|| {
            self.path.file_stem().map_or("default".into(), |s| s.to_string_lossy().into_owned())
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Top-level JSON field whose value is the rate-limit key. Default: "service".
    pub key_field: String,
    /// Events per second allowed per key across all workers; 0 means unlimited. Default: 0.
    pub rate: u64,
    /// Events a key may send at once above its rate. Default: equal to `rate`.
    pub burst: Option<u64>,
    /// How often workers' shares of each key's rate follow their demand, in ms. Default: 100.
    pub rebalance_interval_ms: u64,
    /// Distinct keys tracked per worker; further keys share the bucket and metrics label
    /// `_other` (their records still go to their own stream). Default: 1024.
    pub services_max: usize,
    /// Seconds without a record after which a key is forgotten: its bucket, counters and
    /// series go, making room for new keys (0: never). Default: 300.
    pub services_idle_s: u64,
    /// Per-key overrides of `rate` and `burst`.
    pub services: BTreeMap<String, RateOverride>,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        RateLimitSection {
            key_field: "service".into(),
            rate: 0,
            burst: None,
            rebalance_interval_ms: 100,
            services_max: 1024,
            services_idle_s: 300,
            services: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateOverride {
    /// Events per second for this key; 0 means unlimited.
    pub rate: u64,
    /// Burst for this key. Default: its `rate`.
    pub burst: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSection {
    /// A batch is sealed when its records reach this many bytes (uncompressed). Default: 1048576.
    pub batch_bytes_max: u64,
    /// A batch is sealed when it holds this many records. Default: 10000.
    pub batch_events_max: u32,
    /// A non-empty batch is sealed after this long, in ms. Default: 200.
    pub flush_interval_ms: u64,
    /// Seal a batch as soon as its source has nothing more ready and the worker has no frame
    /// queued or in flight, instead of waiting for `flush_interval_ms` (like Nagle's
    /// algorithm: small frames only while nothing is unacknowledged). Default: true.
    pub seal_when_idle: bool,
    /// With `seal_when_idle`, a batch is sealed when idle only once its first record is this
    /// old, in ms (0: at once). A floor trades latency (an idle line waits up to this long) for
    /// CPU (a frame holds what arrives meanwhile, not the little one read took). At most
    /// `flush_interval_ms`. Default: 2, or `flush_interval_ms` if that is smaller
    /// ([`BatchSection::idle_seal_delay_ms`]).
    pub idle_seal_delay_ms: Option<u64>,
    /// zstd compression level (1..=19). Default: 1.
    pub zstd_level: i32,
    /// zstd hash table size as a power of two (6..=26); 0 keeps the level's own. Default: 12.
    pub zstd_hash_log: u32,
}

impl Default for BatchSection {
    fn default() -> Self {
        BatchSection {
            batch_bytes_max: 1 << 20,
            batch_events_max: 10_000,
            flush_interval_ms: 200,
            seal_when_idle: true,
            idle_seal_delay_ms: None,
            zstd_level: 1,
            zstd_hash_log: 12,
        }
    }
}

/// `idle_seal_delay_ms` when not set (ms): frames of about a hundred lines at 50 k lines/s
/// instead of about ten, while read->ack p99 at half the maximum rate stays well under 20 ms
/// on a loaded machine too (5 ms came near it there: frames that take longer to acknowledge
/// than the floor make the next batch wait for them).
pub const IDLE_SEAL_DELAY_MS_DEFAULT: u64 = 2;

impl BatchSection {
    /// The floor on an idle seal, in ms: `idle_seal_delay_ms`, or when not set
    /// [`IDLE_SEAL_DELAY_MS_DEFAULT`] (at most `flush_interval_ms`).
    pub fn idle_seal_delay_ms(&self) -> u64 {
        self.idle_seal_delay_ms
            .unwrap_or_else(|| IDLE_SEAL_DELAY_MS_DEFAULT.min(self.flush_interval_ms))
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReceiversSection {
    /// Receiver addresses (`host:port`); frames are spread across the healthy ones.
    pub primary: Vec<String>,
    /// Receivers used only while no primary is healthy. Default: none.
    #[serde(default)]
    pub standby: Vec<String>,
    /// Receivers (in another place) used only while no primary and no standby is healthy;
    /// frames sent there carry the dead-letter flag. Default: none.
    #[serde(default)]
    pub dead_letter: Vec<String>,
    /// TLS connections per receiver per worker. Default: 2.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// TCP connect timeout, in ms. Default: 2000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// TLS handshake plus HELLO/WELCOME timeout, in ms. Default: 2000.
    #[serde(default = "default_connect_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// One write of a frame to a connection must complete within this, in ms. Default: 2000.
    #[serde(default = "default_connect_timeout_ms")]
    pub write_timeout_ms: u64,
    /// A frame not acknowledged (or a heartbeat not answered) this long after it was sent makes
    /// its receiver unhealthy: every connection to it is closed and its frames are resent
    /// elsewhere, in ms. Default: 5000.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// An idle connection sends a heartbeat this often, in ms. Default: 1000.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Sent but unacknowledged frames per worker. Default: 32.
    #[serde(default = "default_inflight_frames_max")]
    pub inflight_frames_max: usize,
    /// Compressed bytes of frames a worker holds until acknowledged (queued and in flight);
    /// when full, new batches are dropped and counted. Default: 8388608.
    #[serde(default = "default_outbox_bytes_max")]
    pub outbox_bytes_max: u64,
    /// First delay before probing an unhealthy receiver again, doubled (with jitter) per
    /// failed probe until an acknowledgement arrives, in ms. Default: 100.
    #[serde(default = "default_backoff_ms_initial")]
    pub backoff_ms_initial: u64,
    /// Largest delay between probes, in ms. Default: 5000.
    #[serde(default = "default_backoff_ms_max")]
    pub backoff_ms_max: u64,
}

fn default_connections() -> usize {
    2
}
fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_ack_timeout_ms() -> u64 {
    5000
}
fn default_heartbeat_interval_ms() -> u64 {
    1000
}
fn default_inflight_frames_max() -> usize {
    32
}
fn default_outbox_bytes_max() -> u64 {
    8 << 20
}
fn default_backoff_ms_initial() -> u64 {
    100
}
fn default_backoff_ms_max() -> u64 {
    5000
}

/// Which frames a full disk buffer gives up.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// The frame that does not fit.
    #[default]
    DropNewest,
    /// The oldest segment not being replayed yet, to make room.
    DropOldest,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BufferSection {
    /// Directory of the disk buffer (one sub-directory per worker); none disables it, and
    /// frames that find the outbox full are dropped. Default: none.
    pub directory: Option<PathBuf>,
    /// Bytes of frames the disk buffer holds, all workers together (each gets an equal
    /// share). Default: 1073741824.
    pub bytes_max: u64,
    /// A segment file is closed and a new one started past this size, in bytes.
    /// Default: 8388608.
    pub segment_bytes: u64,
    /// Appended frames are fdatasync'd at most this long after being written, in ms; 0 syncs
    /// after every frame. Default: 1000.
    pub fsync_interval_ms: u64,
    /// drop_newest | drop_oldest. Default: drop_newest.
    pub when_full: WhenFull,
}

impl Default for BufferSection {
    fn default() -> Self {
        BufferSection {
            directory: None,
            bytes_max: 1 << 30,
            segment_bytes: 8 << 20,
            fsync_interval_ms: 1000,
            when_full: WhenFull::DropNewest,
        }
    }
}

impl BufferSection {
    fn check(&self, p: &mut Problems) {
        let at = |k| [K("buffer"), K(k)];
        if let Some(d) = &self.directory {
            p.check(!d.as_os_str().is_empty(), &at("directory"), || "must not be empty".into());
        }
        p.range(self.segment_bytes, 64 << 10, 1 << 30, &at("segment_bytes"));
        p.check(self.bytes_max >= 2 * self.segment_bytes, &at("bytes_max"), || {
            format!("{} is below twice segment_bytes ({})", self.bytes_max, self.segment_bytes)
        });
        p.range(self.fsync_interval_ms, 0, 60_000, &at("fsync_interval_ms"));
    }
}

/// Where frames go that a receiver refused for good (REJECT) and no dead-letter receiver took
/// (docs/protocol.md, `sinks/quarantine.rs`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineSection {
    /// Directory of refused frames (one sub-directory per worker); none: a refused frame is
    /// dropped and counted (`shipper_lines_dropped_total{reason="rejected"}`). Default: none.
    pub directory: Option<PathBuf>,
    /// Bytes of refused frames kept, all workers together (each gets an equal share); a
    /// refused frame that does not fit is dropped and counted. Default: 268435456.
    pub bytes_max: u64,
}

impl Default for QuarantineSection {
    fn default() -> Self {
        QuarantineSection { directory: None, bytes_max: 256 << 20 }
    }
}

impl QuarantineSection {
    fn check(&self, p: &mut Problems) {
        let at = |k| [K("quarantine"), K(k)];
        if let Some(d) = &self.directory {
            p.check(!d.as_os_str().is_empty(), &at("directory"), || "must not be empty".into());
        }
        p.range(self.bytes_max, 1 << 20, 1 << 40, &at("bytes_max"));
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSection {
    /// PEM file of the CA that signed the receivers' certificates.
    pub ca: PathBuf,
    /// PEM file of this shipper's client certificate (chain).
    pub cert: PathBuf,
    /// PEM file of the private key of `cert`.
    pub key: PathBuf,
    /// Name the receivers' certificates must carry. Default: the host part of each address.
    #[serde(default)]
    pub server_name: Option<String>,
}

const K: fn(&'static str) -> Seg = Seg::Key;

impl Validate for ShipperConfig {
    fn validate(&self, p: &mut Problems) {
        let s = &self.shipper;
        p.range(s.workers as u64, 1, 1024, &[K("shipper"), K("workers")]);
        p.check(!s.name.is_empty() && s.name.len() <= 255, &[K("shipper"), K("name")], || {
            "must be 1 to 255 bytes".into()
        });
        p.range(s.shutdown_timeout_ms, 0, 3_600_000, &[K("shipper"), K("shutdown_timeout_ms")]);
        for (key, mode) in [("file_mode", &s.file_mode), ("dir_mode", &s.dir_mode)] {
            p.check(parse_mode(mode).is_some(), &[K("shipper"), K(key)], || {
                format!("{mode:?} is not an octal file mode like \"0640\"")
            });
        }
        if let Some(c) = &s.control_socket {
            // sun_path holds 108 bytes with its NUL.
            let len = c.as_os_str().len();
            p.check((1..=107).contains(&len), &[K("shipper"), K("control_socket")], || {
                format!("a unix socket path is 1 to 107 bytes, this one is {len}")
            });
        }
        self.metrics.check(&[K("metrics"), K("listen")], p);
        for (i, pipe) in self.sources.pipe.iter().enumerate() {
            pipe.check(i, s.workers, p);
        }
        for (i, journal) in self.sources.journal.iter().enumerate() {
            journal.check(i, s.workers, p);
        }
        for (i, socket) in self.sources.socket.iter().enumerate() {
            socket.check(i, &self.sources.socket, s.workers, p);
        }
        for (i, file) in self.sources.file.iter().enumerate() {
            file.check(i, &self.sources.file, s.workers, p);
        }
        for (i, forward) in self.sources.forward.iter().enumerate() {
            forward.check(i, &self.sources.forward, s.workers, p);
        }
        self.ratelimit.check(p);
        for (i, e) in self.transforms.enrich.iter().enumerate() {
            e.check(i, &self.transforms.enrich, p);
        }
        let b = &self.batch;
        let at = |k| [K("batch"), K(k)];
        p.range(b.batch_bytes_max, 1024, 32 << 20, &at("batch_bytes_max"));
        p.range(b.batch_events_max.into(), 1, 1_000_000, &at("batch_events_max"));
        p.range(b.flush_interval_ms, 1, 60_000, &at("flush_interval_ms"));
        if let Some(ms) = b.idle_seal_delay_ms {
            p.check(ms <= b.flush_interval_ms, &at("idle_seal_delay_ms"), || {
                format!("{ms} is above flush_interval_ms ({})", b.flush_interval_ms)
            });
        }
        p.range(b.zstd_level as u64, 1, 19, &at("zstd_level"));
        p.check(
            b.zstd_hash_log == 0 || (6..=26).contains(&b.zstd_hash_log),
            &at("zstd_hash_log"),
            || format!("{} is out of range (allowed: 0, or 6 to 26)", b.zstd_hash_log),
        );
        self.receivers.check(p);
        self.buffer.check(p);
        self.quarantine.check(p);
        let t = &self.tls;
        for (key, path) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
            p.check(path.is_file(), &[K("tls"), K(key)], || {
                format!("{} is not a readable file", path.display())
            });
        }
    }
}

impl PipeSource {
    fn check(&self, i: usize, workers: usize, p: &mut Problems) {
        let at = |k| [K("sources"), K("pipe"), Seg::Index(i), K(k)];
        p.check(!self.path.as_os_str().is_empty(), &at("path"), || "must not be empty".into());
        p.check(parse_mode(&self.mode).is_some(), &at("mode"), || {
            format!("{:?} is not an octal file mode like \"0660\"", self.mode)
        });
        p.range(self.line_bytes_max, 64, LINE_BYTES_LIMIT, &at("line_bytes_max"));
        p.range(self.pipe_bytes, 4096, 1 << 30, &at("pipe_bytes"));
        p.range(self.read_bytes, 4096, 16 << 20, &at("read_bytes"));
        if let Some(w) = self.worker {
            p.check(w < workers, &at("worker"), || {
                format!("{w} is not a worker index (workers = {workers})")
            });
        }
        let service = self.service_name();
        p.check(!service.is_empty() && service.len() <= 255, &at("service"), || {
            "must be 1 to 255 bytes".into()
        });
    }
}

impl RateLimitSection {
    fn check(&self, p: &mut Problems) {
        let at = |k| [K("ratelimit"), K(k)];
        p.check(!self.key_field.is_empty(), &at("key_field"), || "must not be empty".into());
        p.range(self.rebalance_interval_ms, 10, 10_000, &at("rebalance_interval_ms"));
        p.range(self.services_max as u64, 1, 1 << 20, &at("services_max"));
        p.range(self.services_idle_s, 0, 30 * 86_400, &at("services_idle_s"));
        if let Some(b) = self.burst {
            p.check(self.rate == 0 || b >= 1, &at("burst"), || "must be at least 1".into());
        }
        for (name, o) in &self.services {
            let path = [K("ratelimit"), K("services"), Seg::Name(name.clone()), K("burst")];
            if let Some(b) = o.burst {
                p.check(o.rate == 0 || b >= 1, &path, || "must be at least 1".into());
            }
        }
    }

    /// `(rate, burst)` for `service`; rate 0 means unlimited.
    pub fn limit_for(&self, service: &str) -> (u64, u64) {
        match self.services.get(service) {
            Some(o) => (o.rate, o.burst.unwrap_or(o.rate)),
            None => (self.rate, self.burst.unwrap_or(self.rate)),
        }
    }

    /// Whether the limits a running shipper applies live (`rate`, `burst`, `services`)
    /// differ between this section and `new`.
    pub fn limits_differ(&self, new: &RateLimitSection) -> bool {
        (self.rate, self.burst, &self.services) != (new.rate, new.burst, &new.services)
    }

    /// Whether the rest of the section (what a running shipper cannot change: the key field,
    /// the rebalance pace, the table's size and idle time) is the same in `new`.
    fn same_beyond_limits(&self, new: &RateLimitSection) -> bool {
        let RateLimitSection {
            key_field,
            rate: _,
            burst: _,
            rebalance_interval_ms,
            services_max,
            services_idle_s,
            services: _,
        } = self;
        (key_field, rebalance_interval_ms, services_max, services_idle_s)
            == (&new.key_field, &new.rebalance_interval_ms, &new.services_max, &new.services_idle_s)
    }
}

impl ShipperConfig {
    /// The sections of `new` that differ from this configuration in what a running shipper
    /// cannot apply live (all but `[ratelimit]`'s limits): empty when a reload to `new` needs
    /// no restart. Every field is named, so that a new section cannot be forgotten here.
    pub fn differing_sections(&self, new: &ShipperConfig) -> Vec<&'static str> {
        let ShipperConfig {
            shipper,
            metrics,
            sources,
            ratelimit,
            transforms,
            batch,
            receivers,
            buffer,
            quarantine,
            tls,
            ebpf,
        } = self;
        let mut out = Vec::new();
        let mut note = |same: bool, name| {
            if !same {
                out.push(name);
            }
        };
        note(*shipper == new.shipper, "shipper");
        note(*metrics == new.metrics, "metrics");
        note(*sources == new.sources, "sources");
        note(ratelimit.same_beyond_limits(&new.ratelimit), "ratelimit");
        note(*transforms == new.transforms, "transforms");
        note(*batch == new.batch, "batch");
        note(*receivers == new.receivers, "receivers");
        note(*buffer == new.buffer, "buffer");
        note(*quarantine == new.quarantine, "quarantine");
        note(*tls == new.tls, "tls");
        note(*ebpf == new.ebpf, "ebpf");
        out
    }
}

impl ReceiversSection {
    fn check(&self, p: &mut Problems) {
        let at = |k| [K("receivers"), K(k)];
        p.check(!self.primary.is_empty(), &at("primary"), || "needs at least one address".into());
        for (tier, addresses) in [
            ("primary", &self.primary),
            ("standby", &self.standby),
            ("dead_letter", &self.dead_letter),
        ] {
            for (i, a) in addresses.iter().enumerate() {
                p.check(
                    split_host_port(a).is_some(),
                    &[K("receivers"), K(tier), Seg::Index(i)],
                    || format!("{a:?} is not host:port"),
                );
            }
        }
        p.range(self.connections as u64, 1, 64, &at("connections"));
        p.range(self.connect_timeout_ms, 1, 600_000, &at("connect_timeout_ms"));
        p.range(self.handshake_timeout_ms, 1, 600_000, &at("handshake_timeout_ms"));
        p.range(self.write_timeout_ms, 1, 600_000, &at("write_timeout_ms"));
        p.range(self.ack_timeout_ms, 1, 3_600_000, &at("ack_timeout_ms"));
        p.range(self.heartbeat_interval_ms, 1, 600_000, &at("heartbeat_interval_ms"));
        p.range(
            self.inflight_frames_max as u64,
            1,
            INFLIGHT_FRAMES_LIMIT as u64,
            &at("inflight_frames_max"),
        );
        p.range(self.outbox_bytes_max, 64 << 10, 16 << 30, &at("outbox_bytes_max"));
        p.range(self.backoff_ms_initial, 1, 600_000, &at("backoff_ms_initial"));
        p.check(self.backoff_ms_max >= self.backoff_ms_initial, &at("backoff_ms_max"), || {
            format!("{} is below backoff_ms_initial", self.backoff_ms_max)
        });
    }
}

impl ReceiversSection {
    /// Every destination with its tier, primaries first; a destination's index here is its
    /// index everywhere (counters, connection slots).
    pub fn destinations(&self) -> Vec<(Tier, &str)> {
        let tiers = [(Tier::Primary, &self.primary), (Tier::Standby, &self.standby)];
        let tiers = tiers.into_iter().chain([(Tier::DeadLetter, &self.dead_letter)]);
        tiers.flat_map(|(t, list)| list.iter().map(move |a| (t, a.as_str()))).collect()
    }
}

/// The tier of a destination: a lower tier is preferred whenever one of its receivers is
/// healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Primary = 0,
    Standby = 1,
    DeadLetter = 2,
}

impl Tier {
    pub fn label(self) -> &'static str {
        ["primary", "standby", "dead_letter"][self as usize]
    }
}

/// Splits `host:port` (`[v6]:port` too) into its parts.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_seal_delay_defaults_to_a_few_ms_at_most_the_flush_interval() {
        let at = |flush_interval_ms, idle_seal_delay_ms| {
            let b = BatchSection { flush_interval_ms, idle_seal_delay_ms, ..Default::default() };
            b.idle_seal_delay_ms()
        };
        assert_eq!(at(200, None), IDLE_SEAL_DELAY_MS_DEFAULT);
        assert_eq!(at(2, None), 2);
        assert_eq!(at(200, Some(0)), 0);
        assert_eq!(at(200, Some(150)), 150);
    }
}
