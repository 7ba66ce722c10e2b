//! The shipper's per-core counters and how they are exposed.

use hdrhistogram::Histogram;

use super::text::{histogram, Exposition};
use crate::transforms::parse::Failure;

/// Counters of one pipe source.
#[derive(Clone, Debug, Default)]
pub struct SourceCounters {
    pub source: String,
    pub lines_read: u64,
    pub bytes_read: u64,
    pub lines_truncated: u64,
    pub lines_empty: u64,
    pub parse_failures: [u64; Failure::ALL.len()],
    pub read_errors: u64,
}

/// Why a line was dropped (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Over its service's rate limit.
    RateLimit = 0,
    /// Its batch found the outbox full (every receiver too slow or down).
    OutboxFull = 1,
    /// Still unacknowledged when the shutdown deadline passed.
    Shutdown = 2,
}

impl DropReason {
    pub const ALL: [DropReason; 3] =
        [DropReason::RateLimit, DropReason::OutboxFull, DropReason::Shutdown];
    pub fn label(self) -> &'static str {
        ["ratelimit", "outbox_full", "shutdown"][self as usize]
    }
}

/// Counters of one service (rate-limit key).
#[derive(Clone, Debug, Default)]
pub struct ServiceCounters {
    pub service: String,
    pub lines_admitted: u64,
    pub lines_dropped: [u64; DropReason::ALL.len()],
}

/// Counters of one receiver address.
#[derive(Clone, Debug, Default)]
pub struct DestinationCounters {
    pub receiver: String,
    pub connects: u64,
    pub connect_failures: u64,
    pub connections_lost: u64,
    pub connections_up: u64,
}

/// Everything one worker counts.
#[derive(Clone, Debug)]
pub struct ShipperCounters {
    pub core: usize,
    pub sources: Vec<SourceCounters>,
    pub services: Vec<ServiceCounters>,
    pub destinations: Vec<DestinationCounters>,
    pub frames_sent: u64,
    pub frame_bytes_sent: u64,
    pub frames_acked: u64,
    pub records_acked: u64,
    pub frames_resent: u64,
    pub ack_timeouts: u64,
    pub outbox_frames: u64,
    pub outbox_bytes: u64,
    pub inflight_frames: u64,
    /// Read of a frame's first line to its acknowledgement, µs.
    pub latency_us: Histogram<u64>,
    pub batch_records: Histogram<u64>,
    pub batch_bytes: Histogram<u64>,
}

impl ShipperCounters {
    pub fn new(core: usize) -> ShipperCounters {
        ShipperCounters {
            core,
            sources: Vec::new(),
            services: Vec::new(),
            destinations: Vec::new(),
            frames_sent: 0,
            frame_bytes_sent: 0,
            frames_acked: 0,
            records_acked: 0,
            frames_resent: 0,
            ack_timeouts: 0,
            outbox_frames: 0,
            outbox_bytes: 0,
            inflight_frames: 0,
            latency_us: histogram(3_600_000_000),
            batch_records: histogram(10_000_000),
            batch_bytes: histogram(1 << 32),
        }
    }

    /// Lines dropped on this core, all reasons and services.
    pub fn lines_dropped(&self) -> u64 {
        self.services.iter().flat_map(|s| s.lines_dropped).sum()
    }
}

type Get<T> = fn(&T) -> u64;

fn per_core(
    out: &mut Exposition,
    cores: &[ShipperCounters],
    name: &str,
    kind: &str,
    help: &str,
    get: Get<ShipperCounters>,
) {
    out.family(name, kind, help);
    for c in cores {
        out.sample(name, &[("core", &c.core.to_string())], get(c) as f64);
    }
}

fn per_source(
    out: &mut Exposition,
    cores: &[ShipperCounters],
    name: &str,
    help: &str,
    get: Get<SourceCounters>,
) {
    out.family(name, "counter", help);
    for c in cores {
        for s in &c.sources {
            out.sample(
                name,
                &[("core", &c.core.to_string()), ("source", &s.source)],
                get(s) as f64,
            );
        }
    }
}

fn per_destination(
    out: &mut Exposition,
    cores: &[ShipperCounters],
    name: &str,
    kind: &str,
    help: &str,
    get: Get<DestinationCounters>,
) {
    out.family(name, kind, help);
    for c in cores {
        for d in &c.destinations {
            let labels = [("core", c.core.to_string()), ("receiver", d.receiver.clone())];
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            out.sample(name, &labels, get(d) as f64);
        }
    }
}

/// Renders every core's counters.
pub fn render(cores: &[ShipperCounters], out: &mut Exposition) {
    out.family("shipper_build_info", "gauge", "Version of the running shipper.").sample(
        "shipper_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    per_source(out, cores, "shipper_source_lines_read_total", "Lines read per source.", |s| {
        s.lines_read
    });
    per_source(out, cores, "shipper_source_bytes_read_total", "Bytes read per source.", |s| {
        s.bytes_read
    });
    per_source(
        out,
        cores,
        "shipper_source_lines_truncated_total",
        "Lines cut at line_bytes_max.",
        |s| s.lines_truncated,
    );
    per_source(out, cores, "shipper_source_lines_empty_total", "Empty lines skipped.", |s| {
        s.lines_empty
    });
    per_source(out, cores, "shipper_source_read_errors_total", "Failed reads of a source.", |s| {
        s.read_errors
    });
    let name = "shipper_source_parse_failures_total";
    out.family(name, "counter", "Lines passed on as text because they did not parse.");
    for c in cores {
        for s in &c.sources {
            for f in Failure::ALL {
                let core = c.core.to_string();
                let labels =
                    [("core", core.as_str()), ("source", &s.source), ("reason", f.label())];
                out.sample(name, &labels, s.parse_failures[f as usize] as f64);
            }
        }
    }
    let name = "shipper_lines_admitted_total";
    out.family(name, "counter", "Lines admitted by the rate limiter, per service.");
    for c in cores {
        for s in &c.services {
            out.sample(
                name,
                &[("core", &c.core.to_string()), ("service", &s.service)],
                s.lines_admitted as f64,
            );
        }
    }
    let name = "shipper_lines_dropped_total";
    out.family(name, "counter", "Lines dropped by the shipper, per service and reason.");
    for c in cores {
        for s in &c.services {
            for r in DropReason::ALL {
                let core = c.core.to_string();
                let labels =
                    [("core", core.as_str()), ("service", &s.service), ("reason", r.label())];
                out.sample(name, &labels, s.lines_dropped[r as usize] as f64);
            }
        }
    }
    per_core(
        out,
        cores,
        "shipper_frames_sent_total",
        "counter",
        "DATA frames written to a connection (resends included).",
        |c| c.frames_sent,
    );
    per_core(
        out,
        cores,
        "shipper_frame_bytes_sent_total",
        "counter",
        "Bytes of DATA frames written (compressed, before TLS).",
        |c| c.frame_bytes_sent,
    );
    per_core(
        out,
        cores,
        "shipper_frames_acked_total",
        "counter",
        "DATA frames acknowledged by a receiver.",
        |c| c.frames_acked,
    );
    per_core(
        out,
        cores,
        "shipper_records_acked_total",
        "counter",
        "Records in acknowledged frames.",
        |c| c.records_acked,
    );
    per_core(
        out,
        cores,
        "shipper_frames_resent_total",
        "counter",
        "Frames sent again after a connection failed or an ack timed out.",
        |c| c.frames_resent,
    );
    per_core(
        out,
        cores,
        "shipper_ack_timeouts_total",
        "counter",
        "Connections closed because an ack or heartbeat missed ack_timeout_ms.",
        |c| c.ack_timeouts,
    );
    per_core(
        out,
        cores,
        "shipper_outbox_frames",
        "gauge",
        "Frames held until acknowledged (queued and in flight).",
        |c| c.outbox_frames,
    );
    per_core(out, cores, "shipper_outbox_bytes", "gauge", "Bytes held until acknowledged.", |c| {
        c.outbox_bytes
    });
    per_core(
        out,
        cores,
        "shipper_inflight_frames",
        "gauge",
        "Frames sent and not yet acknowledged.",
        |c| c.inflight_frames,
    );
    per_destination(
        out,
        cores,
        "shipper_receiver_connects_total",
        "counter",
        "Connections established (TLS and HELLO done).",
        |d| d.connects,
    );
    per_destination(
        out,
        cores,
        "shipper_receiver_connect_failures_total",
        "counter",
        "Failed connection attempts.",
        |d| d.connect_failures,
    );
    per_destination(
        out,
        cores,
        "shipper_receiver_connections_lost_total",
        "counter",
        "Established connections that failed.",
        |d| d.connections_lost,
    );
    per_destination(
        out,
        cores,
        "shipper_receiver_connections_up",
        "gauge",
        "Connections currently established.",
        |d| d.connections_up,
    );
    let name = "shipper_read_to_ack_latency_seconds";
    out.family(name, "summary", "Time from reading a frame's first line to its acknowledgement.");
    for c in cores {
        out.summary(name, &[("core", &c.core.to_string())], &c.latency_us, 1e-6);
    }
    let name = "shipper_batch_records";
    out.family(name, "summary", "Records per sealed batch.");
    for c in cores {
        out.summary(name, &[("core", &c.core.to_string())], &c.batch_records, 1.0);
    }
    let name = "shipper_batch_bytes";
    out.family(name, "summary", "Uncompressed bytes per sealed batch.");
    for c in cores {
        out.summary(name, &[("core", &c.core.to_string())], &c.batch_bytes, 1.0);
    }
}
