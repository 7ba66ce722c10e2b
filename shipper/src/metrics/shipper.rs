//! The shipper's per-core counters and how they are exposed.

use super::text::{Distribution, Exposition};
use crate::sinks::delivery::health::DestinationCounters;
use crate::sinks::delivery::DeliveryCounters;
use crate::sinks::delivery::SealReason;
use crate::sources::file::FileCounters;
use crate::sources::forward::message::{Cut, Mode};
use crate::sources::forward::{ForwardCounters, Handshake};
use crate::sources::journal::JournalCounters;
use crate::sources::pipe::SourceCounters;
use crate::sources::socket::SocketCounters;
use crate::transforms::enrich::EnrichCounters;
use crate::transforms::parse::Failure;
use crate::transforms::services::{DropReason, ServiceCounters};
use crate::transforms::syslog::Failure as MessageFailure;

/// Everything one worker counts.
#[derive(Clone, Debug)]
pub struct ShipperCounters {
    pub worker: usize,
    pub sources: Vec<SourceCounters>,
    pub journals: Vec<JournalCounters>,
    pub files: Vec<FileCounters>,
    pub sockets: Vec<SocketCounters>,
    pub forwards: Vec<ForwardCounters>,
    /// The services in the table now, `_other` first.
    pub services: Vec<ServiceCounters>,
    /// What forgotten services had counted (not a series: it keeps totals whole).
    pub services_retired: ServiceCounters,
    /// Services forgotten after `services_idle_s` without a record.
    pub services_forgotten: u64,
    pub delivery: DeliveryCounters,
    /// Per source id: where the records it handed over went.
    pub ledger: Vec<super::ledger::SourceLedger>,
    pub frames_acked: u64,
    pub records_acked: u64,
    pub ack_timeouts: u64,
    /// DATA frames a receiver answered with REJECT.
    pub frames_rejected: u64,
    pub quarantine: crate::sinks::quarantine::QuarantineCounters,
    pub outbox_frames: u64,
    pub outbox_bytes: u64,
    pub outbox_records: u64,
    pub inflight_frames: u64,
    pub buffer: crate::buffer::BufferCounters,
    pub buffer_bytes: u64,
    pub buffer_segments: u64,
    /// Read of a frame's first line to its acknowledgement, µs.
    pub latency_us: Distribution,
    pub batch_records: Distribution,
    pub batch_bytes: Distribution,
    /// Batches sealed, by [`SealReason`] (its index in `SealReason::ALL`).
    pub batches_sealed: [u64; SealReason::ALL.len()],
    /// Per `[[transforms.enrich]]`, in config order.
    pub enrich: Vec<EnrichCounters>,
}

impl ShipperCounters {
    pub fn new(worker: usize) -> ShipperCounters {
        ShipperCounters {
            worker,
            sources: Vec::new(),
            journals: Vec::new(),
            files: Vec::new(),
            sockets: Vec::new(),
            forwards: Vec::new(),
            services: Vec::new(),
            services_retired: Default::default(),
            services_forgotten: 0,
            delivery: Default::default(),
            ledger: Vec::new(),
            frames_acked: 0,
            records_acked: 0,
            ack_timeouts: 0,
            frames_rejected: 0,
            quarantine: Default::default(),
            outbox_frames: 0,
            outbox_bytes: 0,
            outbox_records: 0,
            inflight_frames: 0,
            buffer: Default::default(),
            buffer_bytes: 0,
            buffer_segments: 0,
            latency_us: Distribution::new(3_600_000_000),
            batch_records: Distribution::new(10_000_000),
            batch_bytes: Distribution::new(1 << 32),
            batches_sealed: [0; SealReason::ALL.len()],
            enrich: Vec::new(),
        }
    }

    /// Lines dropped on this core, all reasons and services (forgotten ones included).
    pub fn lines_dropped(&self) -> u64 {
        let live: u64 = self.services.iter().flat_map(|s| s.lines_dropped).sum();
        live + self.services_retired.lines_dropped.iter().sum::<u64>()
    }
}

/// A distribution: (name, help, histogram, scale of its values to the unit in the name).
type Summary = (&'static str, &'static str, fn(&ShipperCounters) -> &Distribution, f64);

/// A family with one sample per item: (name, type, help, value).
type Series<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

const PER_SOURCE: &[Series<SourceCounters>] = &[
    ("shipper_source_lines_read_total", "counter", "Lines read per source.", |s| s.lines_read),
    ("shipper_source_bytes_read_total", "counter", "Bytes read per source.", |s| s.bytes_read),
    ("shipper_source_lines_truncated_total", "counter", "Lines cut at line_bytes_max.", |s| {
        s.lines_truncated
    }),
    (
        "shipper_source_keys_truncated_total",
        "counter",
        "Keys (service, cfjs1 format) cut to 255 bytes.",
        |s| s.keys_truncated,
    ),
    ("shipper_source_lines_empty_total", "counter", "Empty lines skipped.", |s| s.lines_empty),
    (
        "shipper_source_lines_partial_total",
        "counter",
        "A pipe's partial line (no newline), handed over as it was when the source stopped.",
        |s| s.lines_partial,
    ),
    ("shipper_source_read_errors_total", "counter", "Failed reads of a source.", |s| s.read_errors),
];

const PER_JOURNAL: &[Series<JournalCounters>] = &[
    ("shipper_journal_entries_read_total", "counter", "Journal entries read.", |j| j.entries_read),
    (
        "shipper_journal_bytes_read_total",
        "counter",
        "Bytes of JSON records made from entries.",
        |j| j.bytes_read,
    ),
    (
        "shipper_journal_entries_filtered_total",
        "counter",
        "Entries left out by unit/identifier filters.",
        |j| j.entries_filtered,
    ),
    (
        "shipper_journal_keys_truncated_total",
        "counter",
        "Identifiers (the service) cut to 255 bytes.",
        |j| j.keys_truncated,
    ),
    ("shipper_journal_files_open", "gauge", "Journal files open.", |j| j.files_open),
    ("shipper_journal_corrupt_objects_total", "counter", "Corrupt journal objects skipped.", |j| {
        j.corrupt_objects
    }),
    ("shipper_journal_lag_entries", "gauge", "Entries in the files not read yet.", |j| {
        j.lag_entries
    }),
    (
        "shipper_journal_lag_seconds",
        "gauge",
        "Newest entry's time minus the last read entry's.",
        |j| j.lag_seconds,
    ),
    (
        "shipper_journal_checkpoint_write_errors_total",
        "counter",
        "Checkpoint writes that failed.",
        |j| j.checkpoint_write_errors,
    ),
];

const PER_FILE: &[Series<FileCounters>] = &[
    (
        "shipper_file_lines_partial_total",
        "counter",
        "Last lines without a newline sent after partial_line_ms.",
        |f| f.lines_partial,
    ),
    (
        "shipper_file_lines_joined_total",
        "counter",
        "Lines joined to the record before them (multiline_start).",
        |f| f.lines_joined,
    ),
    (
        "shipper_file_rotations_total",
        "counter",
        "Files that left their path: renamed or deleted.",
        |f| f.rotations,
    ),
    (
        "shipper_file_truncations_total",
        "counter",
        "Files cut below their position or rewritten: read again from the start.",
        |f| f.truncations,
    ),
    ("shipper_file_files_open", "gauge", "Files followed.", |f| f.files_open),
    ("shipper_file_files_unfollowed", "gauge", "Matches left out over files_max.", |f| {
        f.files_unfollowed
    }),
    ("shipper_file_lag_bytes", "gauge", "Bytes in the files not read yet.", |f| f.lag_bytes),
    (
        "shipper_file_positions_write_errors_total",
        "counter",
        "Positions file writes that failed.",
        |f| f.positions_write_errors,
    ),
];

const PER_SOCKET: &[Series<SocketCounters>] = &[
    ("shipper_socket_messages_received_total", "counter", "Messages received.", |s| {
        s.messages_received
    }),
    ("shipper_socket_bytes_received_total", "counter", "Bytes of messages received.", |s| {
        s.bytes_received
    }),
    ("shipper_socket_messages_empty_total", "counter", "Empty messages skipped.", |s| {
        s.messages_empty
    }),
    (
        "shipper_socket_messages_oversize_total",
        "counter",
        "Messages over message_bytes_max: cut, or skipped when octet-counted.",
        |s| s.messages_oversize,
    ),
    (
        "shipper_socket_keys_truncated_total",
        "counter",
        "APP-NAMEs, TAGs and JSON keys cut to 255 bytes.",
        |s| s.keys_truncated,
    ),
    ("shipper_socket_connections_accepted_total", "counter", "TCP connections accepted.", |s| {
        s.connections_accepted
    }),
    ("shipper_socket_connections_closed_total", "counter", "TCP connections closed.", |s| {
        s.connections_closed
    }),
    (
        "shipper_socket_connections_evicted_total",
        "counter",
        "Longest-idle TCP connections closed to make room for a new one: connections_max open.",
        |s| s.connections_evicted,
    ),
    (
        "shipper_socket_connections_idle_closed_total",
        "counter",
        "TCP connections closed after sending nothing for idle_timeout_ms.",
        |s| s.connections_idle_closed,
    ),
    ("shipper_socket_connections_open", "gauge", "TCP connections open.", |s| s.connections_open),
    (
        "shipper_socket_framing_errors_total",
        "counter",
        "TCP connections closed for a malformed octet count.",
        |s| s.framing_errors,
    ),
    (
        "shipper_socket_messages_partial_total",
        "counter",
        "Partial messages a TCP connection left unfinished when it closed: lost.",
        |s| s.messages_partial,
    ),
    ("shipper_socket_read_errors_total", "counter", "Failed socket reads and accepts.", |s| {
        s.read_errors
    }),
];

const PER_FORWARD: &[Series<ForwardCounters>] = &[
    ("shipper_forward_connections_accepted_total", "counter", "Connections accepted.", |f| {
        f.connections_accepted
    }),
    ("shipper_forward_connections_closed_total", "counter", "Connections closed.", |f| {
        f.connections_closed
    }),
    (
        "shipper_forward_connections_evicted_total",
        "counter",
        "Longest-idle connections closed to make room for a new one: connections_max open.",
        |f| f.connections_evicted,
    ),
    (
        "shipper_forward_connections_idle_closed_total",
        "counter",
        "Connections closed after sending nothing for idle_timeout_ms.",
        |f| f.connections_idle_closed,
    ),
    ("shipper_forward_connections_open", "gauge", "Connections open.", |f| f.connections_open),
    ("shipper_forward_bytes_received_total", "counter", "Bytes of messages handed over.", |f| {
        f.bytes_received
    }),
    ("shipper_forward_records_received_total", "counter", "Records handed over.", |f| {
        f.records_received
    }),
    ("shipper_forward_keys_truncated_total", "counter", "Tags cut to 255 bytes.", |f| {
        f.keys_truncated
    }),
    (
        "shipper_forward_messages_malformed_total",
        "counter",
        "Connections closed for bytes that are not a forward message.",
        |f| f.messages_malformed,
    ),
    (
        "shipper_forward_messages_partial_total",
        "counter",
        "Messages unfinished when their connection closed: not acknowledged.",
        |f| f.messages_partial,
    ),
    ("shipper_forward_chunks_acked_total", "counter", "Acks written to clients.", |f| {
        f.chunks_acked
    }),
    (
        "shipper_forward_chunks_resent_total",
        "counter",
        "Chunks seen again: answered when the first copy settled, not handed over again.",
        |f| f.chunks_resent,
    ),
    (
        "shipper_forward_chunks_forgotten_total",
        "counter",
        "Acknowledged chunk ids forgotten to make room (chunks_max).",
        |f| f.chunks_forgotten,
    ),
    (
        "shipper_forward_chunks_table_full_total",
        "counter",
        "Times a chunk waited: every remembered chunk id was still pending (chunks_max).",
        |f| f.chunks_table_full,
    ),
    ("shipper_forward_read_errors_total", "counter", "Failed reads and accepts.", |f| {
        f.read_errors
    }),
];

const PER_WORKER: &[Series<ShipperCounters>] = &[
    ("shipper_services", "gauge", "Services in the core's table, _other included.", |c| {
        c.services.len() as u64
    }),
    (
        "shipper_services_forgotten_total",
        "counter",
        "Services forgotten after services_idle_s without a record (their series end).",
        |c| c.services_forgotten,
    ),
    ("shipper_frames_sent_total", "counter", "DATA frames written (resends included).", |c| {
        c.delivery.frames_sent
    }),
    (
        "shipper_frame_bytes_sent_total",
        "counter",
        "Bytes of DATA frames written (before TLS).",
        |c| c.delivery.frame_bytes_sent,
    ),
    ("shipper_frames_acked_total", "counter", "DATA frames acknowledged.", |c| c.frames_acked),
    ("shipper_records_acked_total", "counter", "Records in acknowledged frames.", |c| {
        c.records_acked
    }),
    (
        "shipper_frames_resent_total",
        "counter",
        "Frames requeued after a failure, to resend.",
        |c| c.delivery.frames_resent,
    ),
    (
        "shipper_ack_timeouts_total",
        "counter",
        "Connections closed for a late ack or heartbeat.",
        |c| c.ack_timeouts,
    ),
    (
        "shipper_failovers_total",
        "counter",
        "Times the tier taking frames failed and frames moved to a lower one (or to the buffer).",
        |c| c.delivery.failovers,
    ),
    (
        "shipper_failbacks_total",
        "counter",
        "Times frames moved back to a recovered higher tier.",
        |c| c.delivery.failbacks,
    ),
    (
        "shipper_frames_dead_lettered_total",
        "counter",
        "DATA frames written to dead-letter receivers.",
        |c| c.delivery.frames_dead_lettered,
    ),
    (
        "shipper_frames_rejected_total",
        "counter",
        "DATA frames a receiver refused for good (REJECT): sent to dead letter, kept or dropped.",
        |c| c.frames_rejected,
    ),
    (
        "shipper_quarantine_frames_total",
        "counter",
        "Refused frames written to the quarantine directory.",
        |c| c.quarantine.frames,
    ),
    (
        "shipper_quarantine_records_total",
        "counter",
        "Records in refused frames written to the quarantine directory.",
        |c| c.quarantine.records,
    ),
    ("shipper_quarantine_bytes", "gauge", "Bytes in the quarantine directory.", |c| {
        c.quarantine.bytes
    }),
    (
        "shipper_quarantine_write_errors_total",
        "counter",
        "Refused frames the quarantine could not write (then dropped, reason rejected).",
        |c| c.quarantine.write_errors,
    ),
    ("shipper_outbox_frames", "gauge", "Frames held until acknowledged.", |c| c.outbox_frames),
    ("shipper_outbox_bytes", "gauge", "Bytes held until acknowledged.", |c| c.outbox_bytes),
    ("shipper_outbox_records", "gauge", "Records held until acknowledged.", |c| c.outbox_records),
    ("shipper_inflight_frames", "gauge", "Frames sent, not yet acknowledged.", |c| {
        c.inflight_frames
    }),
    ("shipper_buffer_bytes", "gauge", "Bytes in the disk buffer (segments and queued).", |c| {
        c.buffer_bytes
    }),
    ("shipper_buffer_segments", "gauge", "Segment files in the disk buffer.", |c| {
        c.buffer_segments
    }),
    (
        "shipper_buffer_frames_written_total",
        "counter",
        "Frames appended to the disk buffer.",
        |c| c.buffer.frames_written,
    ),
    (
        "shipper_buffer_records_written_total",
        "counter",
        "Records in frames appended to the disk buffer.",
        |c| c.buffer.records_written,
    ),
    (
        "shipper_buffer_frames_replayed_total",
        "counter",
        "Frames read back from the disk buffer into the outbox.",
        |c| c.buffer.frames_replayed,
    ),
    (
        "shipper_buffer_damaged_total",
        "counter",
        "Damaged spans (bad checksum, torn tail, bad magic) skipped in buffer segments.",
        |c| c.buffer.damaged,
    ),
    (
        "shipper_buffer_damaged_bytes_total",
        "counter",
        "Bytes skipped in damaged spans of buffer segments.",
        |c| c.buffer.records_damaged_bytes,
    ),
    ("shipper_buffer_write_errors_total", "counter", "Failed disk buffer writes and syncs.", |c| {
        c.buffer.write_errors
    }),
    (
        "shipper_buffer_segments_dropped_total",
        "counter",
        "Segments deleted unread to make room (when_full = drop_oldest).",
        |c| c.buffer.segments_dropped,
    ),
];

const PER_DESTINATION: &[Series<DestinationCounters>] = &[
    ("shipper_receiver_connects_total", "counter", "Connections established.", |d| d.connects),
    ("shipper_receiver_connect_failures_total", "counter", "Failed connection attempts.", |d| {
        d.connect_failures
    }),
    ("shipper_receiver_connections_lost_total", "counter", "Established connections lost.", |d| {
        d.connections_lost
    }),
    ("shipper_receiver_connections_up", "gauge", "Connections established now.", |d| {
        d.connections_up
    }),
    ("shipper_receiver_healthy", "gauge", "1 while the receiver acknowledges in time.", |d| {
        d.healthy
    }),
    ("shipper_receiver_failures_total", "counter", "Times the receiver was declared down.", |d| {
        d.failures
    }),
    (
        "shipper_receiver_frames_resent_total",
        "counter",
        "Frames in flight to the receiver when it failed, sent elsewhere.",
        |d| d.frames_resent,
    ),
    ("shipper_receiver_frames_sent_total", "counter", "DATA frames written to it.", |d| {
        d.frames_sent
    }),
    ("shipper_receiver_unhealthy_seconds_total", "counter", "Time the receiver spent down.", |d| {
        (d.unhealthy_ms + d.unhealthy_ms_open) / 1000
    }),
];

/// Renders one family per series, one sample per (core, item) with `label` naming the item.
fn families<T>(
    out: &mut Exposition,
    workers: &[ShipperCounters],
    series: &[Series<T>],
    items: fn(&ShipperCounters) -> Vec<(&str, &T)>,
    label: &str,
) {
    for (name, kind, help, get) in series {
        out.family(name, kind, help);
        for c in workers {
            let core = c.worker.to_string();
            for (item, t) in items(c) {
                let labels: &[(&str, &str)] = if label.is_empty() {
                    &[("core", &core)]
                } else {
                    &[("core", &core), (label, item)]
                };
                out.sample(name, labels, get(t) as f64);
            }
        }
    }
}

/// Per-reason counts of one item (a source or a service): its label value and its counts.
type Reasons<'a, const N: usize> = Vec<(&'a str, [u64; N])>;

/// Renders a counter family with one sample per (core, item, reason).
fn per_reason<const N: usize>(
    out: &mut Exposition,
    workers: &[ShipperCounters],
    (name, help): (&str, &str),
    (item_label, reasons): (&str, [&str; N]),
    items: fn(&ShipperCounters) -> Reasons<'_, N>,
) {
    out.family(name, "counter", help);
    for c in workers {
        let core = c.worker.to_string();
        for (item, counts) in items(c) {
            for (reason, n) in reasons.iter().zip(counts) {
                out.sample(
                    name,
                    &[("core", &core), (item_label, item), ("reason", reason)],
                    n as f64,
                );
            }
        }
    }
}

/// Per followed file (at most `files_max` per file source): how far it was read and its
/// size at the last listing; their difference is the file's lag.
fn render_followed(workers: &[ShipperCounters], out: &mut Exposition) {
    let families = [
        ("shipper_file_position_bytes", "Bytes of a followed file read (its position in it).", 0),
        ("shipper_file_size_bytes", "Size of a followed file at the last listing.", 1),
    ];
    for (name, help, which) in families {
        out.family(name, "gauge", help);
        for c in workers {
            let core = c.worker.to_string();
            for f in c.files.iter().flat_map(|s| s.followed.iter().map(move |f| (s, f))) {
                let (s, f) = f;
                let labels =
                    [("core", core.as_str()), ("source", s.source.as_str()), ("file", &f.path)];
                let v = if which == 0 { f.read_bytes } else { f.size_bytes };
                out.sample(name, &labels, v as f64);
            }
        }
    }
}

/// `shipper_socket_info`: which core reads which socket, bound where (for the eBPF drop
/// counters, and for people looking for the port).
fn render_socket_info(workers: &[ShipperCounters], out: &mut Exposition) {
    let name = "shipper_socket_info";
    out.family(name, "gauge", "A socket source read by this core: its transport and address.");
    for c in workers {
        let core = c.worker.to_string();
        for s in &c.sockets {
            let labels = [
                ("core", core.as_str()),
                ("source", s.source.as_str()),
                ("transport", s.transport),
                ("local", s.local.as_str()),
            ];
            out.sample(name, &labels, 1.0);
        }
    }
}

/// Renders every core's counters.
pub fn render(workers: &[ShipperCounters], out: &mut Exposition) {
    out.family("shipper_build_info", "gauge", "Version of the running shipper.").sample(
        "shipper_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    families(
        out,
        workers,
        PER_SOURCE,
        |c| c.sources.iter().map(|s| (s.source.as_str(), s)).collect(),
        "source",
    );
    families(
        out,
        workers,
        PER_JOURNAL,
        |c| c.journals.iter().map(|j| (j.source.as_str(), j)).collect(),
        "source",
    );
    families(
        out,
        workers,
        PER_FILE,
        |c| c.files.iter().map(|f| (f.source.as_str(), f)).collect(),
        "source",
    );
    families(
        out,
        workers,
        PER_SOCKET,
        |c| c.sockets.iter().map(|s| (s.source.as_str(), s)).collect(),
        "source",
    );
    render_socket_info(workers, out);
    families(
        out,
        workers,
        PER_FORWARD,
        |c| c.forwards.iter().map(|f| (f.source.as_str(), f)).collect(),
        "source",
    );
    render_forward_reasons(workers, out);
    render_followed(workers, out);
    families(out, workers, PER_WORKER, |c| vec![("", c)], "");
    families(
        out,
        workers,
        PER_DESTINATION,
        |c| c.delivery.destinations.iter().map(|d| (d.receiver.as_str(), d)).collect(),
        "receiver",
    );
    render_reasons(workers, out);
    render_services(workers, out);
    let ledgers: Vec<(String, &[super::ledger::SourceLedger])> =
        workers.iter().map(|c| (c.worker.to_string(), &c.ledger[..])).collect();
    super::ledger::render(&ledgers, out);
    render_summaries(workers, out);
    render_enrich(workers, out);
}

/// The families with a `reason` label: parse failures per source, drops per service.
fn render_reasons(workers: &[ShipperCounters], out: &mut Exposition) {
    per_reason(
        out,
        workers,
        ("shipper_source_parse_failures_total", "Lines passed on as text: did not parse."),
        ("source", Failure::ALL.map(Failure::label)),
        |c| c.sources.iter().map(|s| (s.source.as_str(), s.parse_failures)).collect(),
    );
    per_reason(
        out,
        workers,
        ("shipper_socket_parse_failures_total", "Messages passed on as text: did not parse."),
        ("source", MessageFailure::ALL.map(MessageFailure::label)),
        |c| c.sockets.iter().map(|s| (s.source.as_str(), s.parse_failures)).collect(),
    );
    per_reason(
        out,
        workers,
        ("shipper_lines_dropped_total", "Lines dropped, per service and reason."),
        ("service", DropReason::ALL.map(DropReason::label)),
        |c| c.services.iter().map(|s| (s.service.as_str(), s.lines_dropped)).collect(),
    );
}

/// A forward family with a second label: (name, help, label, its values, the counts by value).
type ForwardFamily<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], fn(&ForwardCounters) -> &[u64]);

/// The forward sources' families with a second label: messages by mode, refusals and
/// failed handshakes by reason.
fn render_forward_reasons(workers: &[ShipperCounters], out: &mut Exposition) {
    let families: [ForwardFamily<'_>; 3] = [
        (
            "shipper_forward_messages_received_total",
            "Messages handed over, by mode.",
            "mode",
            &Mode::ALL.map(Mode::label),
            |f| &f.messages,
        ),
        (
            "shipper_forward_messages_cut_total",
            "Messages refused whole over a limit (their connections closed), by limit.",
            "reason",
            &Cut::ALL.map(Cut::label),
            |f| &f.messages_cut,
        ),
        (
            "shipper_forward_handshakes_failed_total",
            "Connections closed for a failed TLS or shared-key handshake, by reason.",
            "reason",
            &Handshake::ALL.map(Handshake::label),
            |f| &f.handshakes_failed,
        ),
    ];
    for (name, help, label, values, counts) in families {
        out.family(name, "counter", help);
        for c in workers {
            let core = c.worker.to_string();
            for f in &c.forwards {
                for (value, n) in values.iter().zip(counts(f)) {
                    let labels =
                        [("core", core.as_str()), ("source", f.source.as_str()), (label, value)];
                    out.sample(name, &labels, *n as f64);
                }
            }
        }
    }
}

/// Lines admitted per service.
fn render_services(workers: &[ShipperCounters], out: &mut Exposition) {
    let core_names: Vec<String> = workers.iter().map(|c| c.worker.to_string()).collect();
    let name = "shipper_lines_admitted_total";
    out.family(name, "counter", "Lines admitted by the rate limiter, per service.");
    for (c, core) in workers.iter().zip(&core_names) {
        for s in &c.services {
            out.sample(name, &[("core", core), ("service", &s.service)], s.lines_admitted as f64);
        }
    }
}

/// Per enrichment: records it added fields to, per core; and its refresher's figures (the
/// process's, as the first worker saw them).
fn render_enrich(workers: &[ShipperCounters], out: &mut Exposition) {
    let name = "shipper_enrich_records_total";
    out.family(name, "counter", "Records an enrichment added fields to.");
    for c in workers {
        let core = c.worker.to_string();
        for e in &c.enrich {
            out.sample(name, &[("core", &core), ("transform", &e.transform)], e.records as f64);
        }
    }
    let Some(first) = workers.first() else { return };
    type Get = fn(&EnrichCounters) -> u64;
    let families: [(&str, &str, &str, Get); 4] = [
        ("shipper_enrich_refreshes_total", "counter", "Values fetched and kept.", |e| e.refreshes),
        (
            "shipper_enrich_refresh_failures_total",
            "counter",
            "Fetches refused (failed, over bytes_max, not JSON): the last good value stays.",
            |e| e.refresh_failures,
        ),
        ("shipper_enrich_value_bytes", "gauge", "Bytes of the value kept.", |e| e.value_bytes),
        (
            "shipper_enrich_refreshed_timestamp_seconds",
            "gauge",
            "When the value kept was fetched (0: never).",
            |e| e.refreshed_unix_s,
        ),
    ];
    for (name, kind, help, get) in families {
        out.family(name, kind, help);
        for e in &first.enrich {
            out.sample(name, &[("transform", &e.transform)], get(e) as f64);
        }
    }
}

/// The latency and batch-size summaries per core.
fn render_summaries(workers: &[ShipperCounters], out: &mut Exposition) {
    let core_names: Vec<String> = workers.iter().map(|c| c.worker.to_string()).collect();
    let summaries: [Summary; 3] = [
        (
            "shipper_read_to_ack_latency_seconds",
            "From reading a frame's first line to its ack.",
            |c| &c.latency_us,
            1e-6,
        ),
        ("shipper_batch_records", "Records per sealed batch.", |c| &c.batch_records, 1.0),
        ("shipper_batch_bytes", "Uncompressed bytes per sealed batch.", |c| &c.batch_bytes, 1.0),
    ];
    for (name, help, hist, scale) in summaries {
        out.family(name, "summary", help);
        for (c, core) in workers.iter().zip(&core_names) {
            out.summary(name, &[("core", core)], hist(c), scale);
        }
    }
    let name = "shipper_batches_sealed_total";
    out.family(name, "counter", "Batches sealed into frames, per reason.");
    for (c, core) in workers.iter().zip(&core_names) {
        for (reason, n) in SealReason::ALL.iter().zip(c.batches_sealed) {
            out.sample(name, &[("core", core), ("reason", reason.label())], n as f64);
        }
    }
}

/// A kernel family: (name, help, which samples, `kind` label, event filter).
type KernelFamily = (&'static str, &'static str, bool, &'static str, Option<&'static str>);

/// Families of the eBPF programs' counters (docs/ebpf.md); `core` is the CPU the kernel
/// counted on, `source`/`receiver` the socket's owner. `true`: socket drops, `false`: TCP
/// events; the event filter picks one event per family.
const KERNEL: &[KernelFamily] = &[
    (
        "shipper_kernel_datagrams_dropped_total",
        "Packets the kernel dropped on a source's socket (full receive queue, ...), per reason.",
        true,
        "reason",
        None,
    ),
    (
        "shipper_kernel_tcp_retransmits_total",
        "TCP segments the kernel retransmitted on connections to a receiver.",
        false,
        "",
        Some("retransmit"),
    ),
    (
        "shipper_kernel_tcp_resets_sent_total",
        "TCP resets the kernel sent on connections to a receiver.",
        false,
        "",
        Some("reset_sent"),
    ),
    (
        "shipper_kernel_tcp_resets_received_total",
        "TCP resets received on connections to a receiver.",
        false,
        "",
        Some("reset_received"),
    ),
];

/// Renders whether the eBPF programs are attached and what they counted.
pub fn render_kernel(k: &crate::ebpf::KernelCounters, out: &mut Exposition) {
    let name = "shipper_ebpf_attached";
    let attached = k.state == crate::ebpf::State::Attached;
    out.family(
        name,
        "gauge",
        "1 if the eBPF drop-accounting programs are attached; state says why not.",
    )
    .sample(name, &[("state", k.state.label())], if attached { 1.0 } else { 0.0 });
    for (name, help, drops, kind_label, event) in KERNEL {
        out.family(name, "counter", help);
        let (samples, item_label) =
            if *drops { (&k.socket_drops, "source") } else { (&k.connection_events, "receiver") };
        for s in samples.iter().filter(|s| event.is_none_or(|e| s.kind == e)) {
            let core = s.cpu.to_string();
            let mut labels = vec![("core", core.as_str()), (item_label, s.item.as_str())];
            if !kind_label.is_empty() {
                labels.push((kind_label, s.kind.as_str()));
            }
            out.sample(name, &labels, s.count as f64);
        }
    }
    let name = "shipper_kernel_drops_uncounted_total";
    out.family(
        name,
        "counter",
        "Kernel drops on a source's socket not counted per source and reason: the map was full.",
    );
    for (cpu, &count) in k.uncounted.iter().enumerate() {
        out.sample(name, &[("core", cpu.to_string().as_str())], count as f64);
    }
}

/// What one worker may hold, fixed at start: the denominators of the fill ratios a dashboard
/// and the alerts compute (`shipper_buffer_bytes / shipper_buffer_bytes_max`).
pub struct ShipperLimits {
    pub workers: usize,
    /// `receivers.outbox_bytes_max`: each worker's own.
    pub outbox_bytes_max: u64,
    /// Each worker's share of `buffer.bytes_max`; `None` without a disk buffer.
    pub buffer_bytes_max: Option<u64>,
}

/// Renders the per-worker limits (one sample per core, so that a ratio matches on `core`).
pub fn render_limits(l: &ShipperLimits, out: &mut Exposition) {
    let outbox = ("shipper_outbox_bytes_max", "receivers.outbox_bytes_max of each worker.");
    let buffer = ("shipper_buffer_bytes_max", "Each worker's share of buffer.bytes_max.");
    for ((name, help), value) in [(outbox, Some(l.outbox_bytes_max)), (buffer, l.buffer_bytes_max)]
    {
        out.family(name, "gauge", help);
        for core in (0..l.workers).filter(|_| value.is_some()) {
            out.sample(name, &[("core", &core.to_string())], value.unwrap_or(0) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_one_sample_per_core_and_no_buffer_without_one() {
        let mut out = Exposition::default();
        let l = ShipperLimits { workers: 2, outbox_bytes_max: 8, buffer_bytes_max: Some(512) };
        render_limits(&l, &mut out);
        let text = out.finish();
        for sample in [
            "shipper_outbox_bytes_max{core=\"0\"} 8",
            "shipper_outbox_bytes_max{core=\"1\"} 8",
            "shipper_buffer_bytes_max{core=\"0\"} 512",
            "shipper_buffer_bytes_max{core=\"1\"} 512",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample}: {text}");
        }
        let mut out = Exposition::default();
        render_limits(&ShipperLimits { buffer_bytes_max: None, ..l }, &mut out);
        let text = out.finish();
        assert!(!text.lines().any(|l| l.starts_with("shipper_buffer_bytes_max{")), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("shipper_outbox_bytes_max{")).count(), 2);
    }
}
