//! The receiver's counters, one set per shard and one for the acceptor, and how they are
//! exposed (label `core`: the shard's index, or `acceptor`).

use super::text::{Distribution, Exposition};

/// Why a connection or frame was refused (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// TLS handshake failed (no client certificate, unknown CA, not TLS at all...).
    Tls = 0,
    /// HELLO missing, malformed, or late.
    Hello = 1,
    /// Over `connections_max`.
    Limit = 2,
    /// A frame that is not valid: bad magic, version, checksum, size, or records.
    Frame = 3,
    /// No frame for `idle_timeout_ms`.
    Idle = 4,
    /// No room in `frames_in_progress_bytes_max` for a frame within
    /// `frames_in_progress_wait_ms`.
    Memory = 5,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Tls,
        Refusal::Hello,
        Refusal::Limit,
        Refusal::Frame,
        Refusal::Idle,
        Refusal::Memory,
    ];
    pub fn label(self) -> &'static str {
        ["tls", "hello", "limit", "frame", "idle", "memory"][self as usize]
    }
}

/// Why an `accept()` of the listening socket failed (label `reason`). None ends the acceptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// `EMFILE`: the process's open-file limit.
    FdLimit = 0,
    /// `ENFILE`: the system-wide open-file limit.
    SystemFdLimit = 1,
    /// `ENOBUFS`, `ENOMEM`: kernel memory for the socket.
    Memory = 2,
    /// `ECONNABORTED`, or a network error accept(2) passes on for one connection.
    Aborted = 3,
    /// `EINTR`, `EAGAIN`: the call was interrupted.
    Interrupted = 4,
    /// Anything else.
    Other = 5,
}

impl AcceptError {
    pub const ALL: [AcceptError; 6] = [
        AcceptError::FdLimit,
        AcceptError::SystemFdLimit,
        AcceptError::Memory,
        AcceptError::Aborted,
        AcceptError::Interrupted,
        AcceptError::Other,
    ];
    pub fn label(self) -> &'static str {
        ["fd_limit", "system_fd_limit", "memory", "aborted", "interrupted", "other"][self as usize]
    }
}

#[derive(Clone, Debug)]
pub struct ReceiverCounters {
    /// `0`, `1`, ... for shards, `acceptor` for the accepting thread: the label `core`.
    pub shard: String,
    pub connections_accepted: u64,
    pub connections_refused: [u64; Refusal::ALL.len()],
    /// Failed `accept()` calls (acceptor only).
    pub accept_errors: [u64; AcceptError::ALL.len()],
    pub connections_open: u64,
    pub frames_received: u64,
    /// Frames whose payload had to wait for room in `frames_in_progress_bytes_max` (whether
    /// room came or the connection was refused).
    pub frames_waited: u64,
    /// DATA frames that carried their origin (sent again from a shipper's disk buffer).
    pub frames_origin: u64,
    /// Of those, frames whose origin named a stream past the connection's
    /// `CONNECTION_ORIGIN_STREAMS_MAX`: de-duplicated under the connection's own stream.
    pub frames_origin_ignored: u64,
    pub frames_duplicate: u64,
    pub frames_acked: u64,
    pub records_written: u64,
    pub bytes_written: u64,
    pub write_errors: u64,
    /// DATA frames answered with REJECT: they can never be written (content invalid, a name
    /// no output can take), and the shipper gives them another fate.
    pub frames_rejected: u64,
    pub records_rejected: u64,
    /// One set per output of the shard, in the order the shard writes them.
    pub outputs: Vec<OutputCounters>,
    /// Records of frames a shipper sent here as its dead-letter destination.
    pub records_dead_letter: u64,
    /// Time to write, sync and commit one group of frames, µs.
    pub write_us: Distribution,
    /// Frames written per group commit.
    pub group_frames: Distribution,
    pub frame_records: Distribution,
}

impl ReceiverCounters {
    pub fn new(shard: String) -> ReceiverCounters {
        ReceiverCounters {
            shard,
            connections_accepted: 0,
            connections_refused: [0; Refusal::ALL.len()],
            accept_errors: [0; AcceptError::ALL.len()],
            connections_open: 0,
            frames_received: 0,
            frames_waited: 0,
            frames_origin: 0,
            frames_origin_ignored: 0,
            frames_duplicate: 0,
            frames_acked: 0,
            records_written: 0,
            bytes_written: 0,
            write_errors: 0,
            frames_rejected: 0,
            records_rejected: 0,
            outputs: Vec::new(),
            records_dead_letter: 0,
            write_us: Distribution::new(3_600_000_000),
            group_frames: Distribution::new(1_000_000),
            frame_records: Distribution::new(10_000_000),
        }
    }

    /// Takes the figures a shard's connections count (its writer counts the rest).
    pub fn add_connection_figures(&mut self, from: &ReceiverCounters) {
        self.connections_open = from.connections_open;
        self.connections_refused = from.connections_refused;
        self.frames_received = from.frames_received;
        self.frames_waited = from.frames_waited;
        self.frames_origin = from.frames_origin;
        self.frames_origin_ignored = from.frames_origin_ignored;
        self.frames_acked = from.frames_acked;
    }
}

/// One output's counters on one shard (label `output`: its configured name).
#[derive(Clone, Debug)]
pub struct OutputCounters {
    pub name: String,
    /// Records and bytes the output took of frames committed (not of those undone).
    pub records: u64,
    pub bytes: u64,
    /// Frames whose write or sync failed in this output.
    pub errors: u64,
    /// Whether its last write and sync succeeded (true before its first frame).
    pub up: bool,
    /// Time of its `write`, and of its `sync`, per frame it took records of, µs.
    pub write_us: Distribution,
    pub sync_us: Distribution,
    /// What a files output reports of its streams and files (`Output::report`).
    pub files: FileFigures,
    /// What a Kafka output reports (`Output::report`).
    pub kafka: KafkaFigures,
}

impl OutputCounters {
    pub fn new(name: String) -> OutputCounters {
        OutputCounters {
            name,
            records: 0,
            bytes: 0,
            errors: 0,
            up: true,
            write_us: Distribution::new(3_600_000_000),
            sync_us: Distribution::new(3_600_000_000),
            files: FileFigures::default(),
            kafka: KafkaFigures::default(),
        }
    }
}

/// A files output's figures (zero for other kinds).
#[derive(Clone, Debug, Default)]
pub struct FileFigures {
    /// Live streams (written within `streams_idle_s`), each with a current file (open or
    /// closed).
    pub streams_open: u64,
    /// Streams forgotten after `streams_idle_s` without a record.
    pub streams_forgotten: u64,
    /// Stream files open now, at most `files_open_max`.
    pub files_open: u64,
    /// The most stream files open at once since start.
    pub files_open_peak: u64,
    /// Stream files closed to make room for another (the least recently written).
    pub files_closed: u64,
    pub records_folded: u64,
    /// Streams created under a shortened name (`output::files::stream_name`).
    pub stream_names_shortened: u64,
    /// Stream files rotated (by size or age).
    pub rotations: u64,
    /// Rotated files compressed, and removed by retention, by the output's janitors.
    pub files_compressed: u64,
    pub files_removed: u64,
    /// Compressions or removals that failed (tried again at the next pass).
    pub janitor_errors: u64,
    /// Bytes of the rotated files kept (current files not counted).
    pub rotated_bytes: u64,
}

/// A Kafka output's figures (zero for other kinds).
#[derive(Clone, Debug, Default)]
pub struct KafkaFigures {
    /// Records whose topic would not be a Kafka topic name (their frames refused).
    pub records_refused_topic: u64,
    /// Records over `record_bytes_max` (their frames refused).
    pub records_refused_size: u64,
    /// Producers created: the first, and one after each fatal producer error.
    pub producers_created: u64,
}

/// The sum of a files figure over a shard's outputs.
fn files_sum(c: &ReceiverCounters, get: fn(&FileFigures) -> u64) -> u64 {
    c.outputs.iter().map(|o| get(&o.files)).sum()
}

fn family(
    out: &mut Exposition,
    shards: &[ReceiverCounters],
    name: &str,
    kind: &str,
    help: &str,
    get: fn(&ReceiverCounters) -> u64,
) {
    out.family(name, kind, help);
    for c in shards {
        out.sample(name, &[("core", &c.shard)], get(c) as f64);
    }
}

/// Renders every shard's counters, and the acceptor's.
pub fn render(shards: &[ReceiverCounters], out: &mut Exposition) {
    out.family("shipper_receiver_build_info", "gauge", "Version of the running receiver.").sample(
        "shipper_receiver_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    render_connections(shards, out);
    render_frames(shards, out);
    render_streams(shards, out);
    render_rotation(shards, out);
    render_summaries(shards, out);
    render_outputs(shards, out);
    render_kafka(shards, out);
}

/// One output's figure, per shard and output.
fn per_output(
    out: &mut Exposition,
    shards: &[ReceiverCounters],
    (name, kind, help): (&str, &str, &str),
    get: fn(&OutputCounters) -> u64,
) {
    out.family(name, kind, help);
    for c in shards {
        for o in &c.outputs {
            out.sample(name, &[("core", &c.shard), ("output", &o.name)], get(o) as f64);
        }
    }
}

/// Every output's records, bytes, errors, state and latencies (label `output`).
fn render_outputs(shards: &[ReceiverCounters], out: &mut Exposition) {
    let records = "shipper_receiver_output_records_total";
    per_output(
        out,
        shards,
        (records, "counter", "Records an output took, of frames committed."),
        |o| o.records,
    );
    let bytes = "shipper_receiver_output_bytes_total";
    per_output(
        out,
        shards,
        (bytes, "counter", "Bytes an output took, of frames committed."),
        |o| o.bytes,
    );
    let help = "Frames an output failed to write or make durable (not acknowledged).";
    let errors = "shipper_receiver_output_errors_total";
    per_output(out, shards, (errors, "counter", help), |o| o.errors);
    let help = "1 when an output's last write and sync succeeded, else 0.";
    per_output(out, shards, ("shipper_receiver_output_up", "gauge", help), |o| o.up.into());
    for (name, help, get) in [
        (
            "shipper_receiver_output_write_latency_seconds",
            "Time of an output's write of one frame.",
            (|o| &o.write_us) as fn(&OutputCounters) -> &Distribution,
        ),
        (
            "shipper_receiver_output_sync_latency_seconds",
            "Time of an output's sync (durability) of one group of frames.",
            |o| &o.sync_us,
        ),
    ] {
        out.family(name, "summary", help);
        for c in shards {
            for o in &c.outputs {
                out.summary(name, &[("core", &c.shard), ("output", &o.name)], get(o), 1e-6);
            }
        }
    }
}

/// The Kafka outputs' own figures (label `output`; only Kafka outputs are listed).
fn render_kafka(shards: &[ReceiverCounters], out: &mut Exposition) {
    let name = "shipper_receiver_kafka_records_refused_total";
    let help = "Records a Kafka output refused, their frames answered REJECT, per reason.";
    out.family(name, "counter", help);
    let kafka = |c: &'_ ReceiverCounters| {
        let ids = c.outputs.iter().filter(|o| o.kafka.producers_created > 0);
        ids.map(|o| (o.name.clone(), o.kafka.clone())).collect::<Vec<_>>()
    };
    for c in shards {
        for (output, k) in kafka(c) {
            for (reason, n) in
                [("topic", k.records_refused_topic), ("size", k.records_refused_size)]
            {
                let labels = [("core", c.shard.as_str()), ("output", &output), ("reason", reason)];
                out.sample(name, &labels, n as f64);
            }
        }
    }
    let name = "shipper_receiver_kafka_producers_created_total";
    let help = "Kafka producers a Kafka output created: its first, and one per fatal error.";
    out.family(name, "counter", help);
    for c in shards {
        for (output, k) in kafka(c) {
            let labels = [("core", c.shard.as_str()), ("output", &output)];
            out.sample(name, &labels, k.producers_created as f64);
        }
    }
}

/// Connections accepted, refused, open, and failed accepts.
fn render_connections(shards: &[ReceiverCounters], out: &mut Exposition) {
    family(
        out,
        shards,
        "shipper_receiver_connections_accepted_total",
        "counter",
        "Connections that completed TLS and HELLO.",
        |c| c.connections_accepted,
    );
    let name = "shipper_receiver_connections_refused_total";
    out.family(name, "counter", "Connections closed by the receiver, per reason.");
    for c in shards {
        for r in Refusal::ALL {
            out.sample(
                name,
                &[("core", &c.shard), ("reason", r.label())],
                c.connections_refused[r as usize] as f64,
            );
        }
    }
    let name = "shipper_receiver_accept_errors_total";
    out.family(name, "counter", "Failed accepts of the listening socket, per reason.");
    for c in shards {
        for r in AcceptError::ALL {
            out.sample(
                name,
                &[("core", &c.shard), ("reason", r.label())],
                c.accept_errors[r as usize] as f64,
            );
        }
    }
    family(
        out,
        shards,
        "shipper_receiver_connections_open",
        "gauge",
        "Connections being served.",
        |c| c.connections_open,
    );
}

/// DATA frames and their records: received, waited, duplicate, acknowledged, written, refused.
/// A counter family of every shard: (name, help, the shard's value).
type Family = (&'static str, &'static str, fn(&ReceiverCounters) -> u64);

const FRAMES: &[Family] = &[
    (
        "shipper_receiver_frames_received_total",
        "DATA frames received (duplicates included).",
        |c| c.frames_received,
    ),
    (
        "shipper_receiver_frames_waited_total",
        "Frames whose payload waited for room in receiver.frames_in_progress_bytes_max.",
        |c| c.frames_waited,
    ),
    (
        "shipper_receiver_frames_origin_total",
        "DATA frames that carried the identity they were first sent with (replayed from a \
         shipper's disk buffer), de-duplicated under it.",
        |c| c.frames_origin,
    ),
    (
        "shipper_receiver_frames_origin_ignored_total",
        "DATA frames whose origin named more streams than a connection may: de-duplicated \
         under the connection's own stream instead.",
        |c| c.frames_origin_ignored,
    ),
    (
        "shipper_receiver_frames_duplicate_total",
        "DATA frames already written, acknowledged again and not written.",
        |c| c.frames_duplicate,
    ),
    ("shipper_receiver_frames_acked_total", "ACKs sent.", |c| c.frames_acked),
    ("shipper_receiver_records_written_total", "Records written to output streams.", |c| {
        c.records_written
    }),
    (
        "shipper_receiver_bytes_written_total",
        "Bytes written to the outputs, added over every output.",
        |c| c.bytes_written,
    ),
    (
        "shipper_receiver_write_errors_total",
        "Frames that could not be written now (not acknowledged; the shipper resends).",
        |c| c.write_errors,
    ),
    (
        "shipper_receiver_frames_rejected_total",
        "DATA frames answered with REJECT: never writable here, given another fate by the \
         shipper.",
        |c| c.frames_rejected,
    ),
    ("shipper_receiver_records_rejected_total", "Records in frames answered with REJECT.", |c| {
        c.records_rejected
    }),
];

/// The [`FRAMES`] families.
fn render_frames(shards: &[ReceiverCounters], out: &mut Exposition) {
    for &(name, help, get) in FRAMES {
        family(out, shards, name, "counter", help, get);
    }
}

/// The files output: its streams and files.
fn render_streams(shards: &[ReceiverCounters], out: &mut Exposition) {
    family(
        out,
        shards,
        "shipper_receiver_streams_open",
        "gauge",
        "Live output streams (written within output.streams_idle_s), each with a current \
         file, open or closed (at most output.streams_max + 2 per worker).",
        |c| files_sum(c, |f| f.streams_open),
    );
    family(
        out,
        shards,
        "shipper_receiver_streams_forgotten_total",
        "counter",
        "Output streams forgotten after output.streams_idle_s without a record: their files \
         closed and handed over as rotated, their places freed.",
        |c| files_sum(c, |f| f.streams_forgotten),
    );
    family(
        out,
        shards,
        "shipper_receiver_files_open",
        "gauge",
        "Output stream files open (at most output.files_open_max per worker).",
        |c| files_sum(c, |f| f.files_open),
    );
    family(
        out,
        shards,
        "shipper_receiver_files_open_peak",
        "gauge",
        "The most output stream files open at once since start.",
        |c| files_sum(c, |f| f.files_open_peak),
    );
    family(
        out,
        shards,
        "shipper_receiver_files_closed_total",
        "counter",
        "Output stream files closed to make room for another (least recently written first).",
        |c| files_sum(c, |f| f.files_closed),
    );
    family(
        out,
        shards,
        "shipper_receiver_records_folded_total",
        "counter",
        "Records written to the _other stream because output.streams_max streams were live \
         (each written within output.streams_idle_s).",
        |c| files_sum(c, |f| f.records_folded),
    );
    family(
        out,
        shards,
        "shipper_receiver_stream_names_shortened_total",
        "counter",
        "Streams created under a shortened name: a key too long for a file name.",
        |c| files_sum(c, |f| f.stream_names_shortened),
    );
    family(
        out,
        shards,
        "shipper_receiver_records_dead_letter_total",
        "counter",
        "Records written to STREAM@dead_letter: sent here because the shipper's primary and standby receivers were down.",
        |c| c.records_dead_letter,
    );
}

/// What the files outputs' rotation and janitors did.
fn render_rotation(shards: &[ReceiverCounters], out: &mut Exposition) {
    family(
        out,
        shards,
        "shipper_receiver_files_rotated_total",
        "counter",
        "Output stream files rotated (file_bytes_max or file_age_max_s).",
        |c| files_sum(c, |f| f.rotations),
    );
    family(
        out,
        shards,
        "shipper_receiver_files_compressed_total",
        "counter",
        "Rotated output files compressed with zstd (compress_rotated).",
        |c| files_sum(c, |f| f.files_compressed),
    );
    family(
        out,
        shards,
        "shipper_receiver_files_removed_total",
        "counter",
        "Rotated output files removed by retention_bytes_max or retention_age_s.",
        |c| files_sum(c, |f| f.files_removed),
    );
    family(
        out,
        shards,
        "shipper_receiver_janitor_errors_total",
        "counter",
        "Compressions or removals of rotated output files that failed (tried again).",
        |c| files_sum(c, |f| f.janitor_errors),
    );
    family(
        out,
        shards,
        "shipper_receiver_rotated_bytes",
        "gauge",
        "Bytes of the rotated output files kept (current files not counted).",
        |c| files_sum(c, |f| f.rotated_bytes),
    );
}

/// Time to write a frame, and records per frame.
fn render_summaries(shards: &[ReceiverCounters], out: &mut Exposition) {
    let name = "shipper_receiver_write_latency_seconds";
    out.family(name, "summary", "Time to write, sync and commit one group of frames.");
    for c in shards {
        out.summary(name, &[("core", &c.shard)], &c.write_us, 1e-6);
    }
    let name = "shipper_receiver_group_frames";
    out.family(name, "summary", "Frames made durable by one group commit.");
    for c in shards {
        out.summary(name, &[("core", &c.shard)], &c.group_frames, 1.0);
    }
    let name = "shipper_receiver_frame_records";
    out.family(name, "summary", "Records per DATA frame.");
    for c in shards {
        out.summary(name, &[("core", &c.shard)], &c.frame_records, 1.0);
    }
}

/// The receiver's process-wide figures: limits fixed at start, and what is taken of them.
pub struct ReceiverLimits {
    pub connections_max: usize,
    pub frames_in_progress_bytes_max: u64,
    /// Bytes reserved now for the payloads of frames in progress, over every connection.
    pub frames_in_progress_bytes: u64,
}

/// Renders the receiver's process-wide figures.
pub fn render_limits(l: &ReceiverLimits, out: &mut Exposition) {
    let name = "shipper_receiver_connections_max";
    let help = "Connections served at once: receiver.connections_max, lowered to fit the \
                open-file limit.";
    out.family(name, "gauge", help).sample(name, &[], l.connections_max as f64);
    let name = "shipper_receiver_frames_in_progress_bytes_max";
    let help = "receiver.frames_in_progress_bytes_max: payload bytes of frames being received, \
                over every connection.";
    out.family(name, "gauge", help).sample(name, &[], l.frames_in_progress_bytes_max as f64);
    let name = "shipper_receiver_frames_in_progress_bytes";
    let help = "Payload bytes reserved now for frames being received, over every connection.";
    out.family(name, "gauge", help).sample(name, &[], l.frames_in_progress_bytes as f64);
}
