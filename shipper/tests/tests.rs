//! Integration tests: real FIFOs, real TLS, real `shipper run` and `shipper receive` processes.

mod harness;

/// Bad input on either side gets its documented outcome, never a crash or a hang.
mod bad_input;
/// The disk buffer: outages replayed in order, overflow and full disks counted, SIGKILL and
/// damaged segments survived.
mod buffer;
/// The CLI: validate, version, help, configuration errors with file, line and key.
mod cli;
/// Ack timeouts on a hung receiver; the shipper refuses receivers it cannot verify.
mod delivery;
/// eBPF drop accounting against the kernel's counters: UDP drops, retransmits, no privileges.
mod ebpf;
/// Enrichment: static and fetched fields (HTTP, a command) added to JSON records.
mod enrich;
/// Receivers in tiers: a hung primary fails over to the standby and back; dead letter.
mod failover;
/// Log files followed through rotation (rename, copy-and-truncate) and SIGKILL, with positions;
/// over-long and unfinished last lines.
mod file;
/// Fluentd's forward protocol from real clients (fluent-logger, msgpack): every mode, acks
/// only once the receiver wrote the records, resent chunks written once, garbage and bad
/// handshakes closing their connection only.
mod forward;
/// Hostile input and peers: over-long names, floods of connections, exhausted descriptors,
/// idle peers, slow scrapers, panics; the next good record still arrives, and it is counted.
mod hostile;
/// The journal reader against journalctl, on files written by systemd's own tools.
mod journal;
/// The journal source following live files across rotations, and resuming after SIGKILL.
mod journal_follow;
/// The Kafka output against a real broker (tansu), read back by kafka-python: a million lines
/// once each in their streams' topics, a broker killed mid-stream, a topic name refused.
mod kafka;
/// The ledger: every record a source handed over settled once (delivered, dropped by reason,
/// buffered) or held, at rest, at exit and in `shipper status`.
mod ledger;
/// The shipped dashboard and alert rules: every panel's expression returns data from a real
/// Prometheus scraping a real shipper and receiver under load; promtool checks and tests the
/// rules.
mod monitoring;
/// Several receiver outputs, each taking its streams: files, and a real ClickHouse (also
/// stopped mid-stream).
mod outputs;
/// The Debian package installed, upgraded, removed and purged on this machine (root).
mod package;
/// Pipes to receiver: a million lines from four writers arrive byte-identical, once each.
mod pipe;
/// A real Prometheus scrapes both endpoints; promtool lints them.
mod prometheus;
/// One service fed from two cores stays within its global rate; others are unaffected.
mod ratelimit;
/// Frames a receiver refuses for good: dead letter, quarantine or a counted drop, never a
/// resend loop; over-long keys cut at the source.
mod rejected;
/// Reload on SIGHUP: rate limits in place within a rebalance interval, a source added by a
/// self-takeover (exactly once, systemd told RELOADING, MAINPID and READY), bad files and a
/// failing new process leaving the running configuration alone.
mod reload;
/// The receiver killed mid-stream and restarted: nothing lost, nothing duplicated.
mod restart;
/// Under systemd: READY, STOPPING, and a watchdog fed by the workers' progress.
mod service;
/// SIGTERM flushes and exits 0; with no receiver the writer is never blocked.
mod shutdown;
/// Syslog and JSON over UDP, TCP (both framings) and a unix socket arrive once, exactly parsed;
/// bad input is counted and never stops a source.
mod socket;
/// `shipper run --takeover`: five takeovers under steady pipe and UDP writers lose and
/// duplicate nothing, never fail a write or refuse a connection; a half-read line crosses
/// over whole; hostile control-socket peers change nothing.
mod takeover;
