//! The forward source: Fluentd's forward protocol v1 over TCP or TLS, so Fluentd and Fluent Bit
//! forwarders can send to the shipper as to an aggregator, acknowledgements included.
//!
//! # Design constraints
//! - Sockets as the TCP socket source's (`sources::socket`): bound on the main thread (a
//!   taken port fails start-up with its name), one listener per worker with SO_REUSEPORT
//!   (or one worker with `worker`); the same connection table ([`crate::sources::connections`]):
//!   at most `connections_max` per listening worker, the longest-idle evicted past it, and
//!   `idle_timeout_ms`.
//! - Memory per connection: a 64 KiB read buffer, the message being received (at most
//!   `message_bytes_max`; the scanner ([`msgpack::Scanner`]) refuses a longer one before
//!   it is all there), decompressed entries (at most `decompressed_bytes_max`) and one
//!   record's JSON (at most `record_bytes_max`), both given back after a message larger than
//!   64 KiB. So a worker holds at most `connections_max` × (`message_bytes_max` +
//!   `decompressed_bytes_max` + `record_bytes_max` + 64 KiB) for this source.
//! - Nothing a peer sends is followed blindly: lengths are checked against the bytes present
//!   before anything is read, nesting is at most [`msgpack::DEPTH_MAX`], a Forward or
//!   PackedForward message holds at most `entries_max` entries, a chunk id at most
//!   [`message::CHUNK_BYTES_MAX`] bytes, and the tag, the records' service and stream key, is
//!   cut to 255 bytes by the transforms like every key (`shipper_forward_keys_truncated_total`).
//!   A message over a limit is refused whole and closes its connection
//!   (`shipper_forward_messages_cut_total{reason}`); bytes that are not a forward message
//!   close it too (`shipper_forward_messages_malformed_total`). Other connections go on.
//! - Records of a message with the `chunk` option are durable: they carry marks, the source
//!   pauses (stops handing over, so stops reading that connection) while the outbox lacks
//!   room, and `{"ack": chunk}` is sent only once every frame holding its records is settled
//!   ([`chunks`]). Records without `chunk` are like a TCP socket source's: no ack; when the
//!   outbox is full their batch goes to the disk buffer or is dropped and counted.
//! - Chunk ids are remembered by one table per source shared by its workers
//!   ([`chunks::Registry`], at most `chunks_max`, a lock taken once per chunk): a chunk
//!   resent while its first copy waits, or after it was acknowledged, is not handed over
//!   again; it is answered when the first copy settles, or at once.
//!
//! # Format
//! ```text
//! Message:                 [tag, time, record, option?]
//! Forward:                 [tag, [[time, record], ...], option?]
//! PackedForward:           [tag, bin|str of concatenated [time, record], option?]
//! CompressedPackedForward: PackedForward with option.compressed = "gzip" (gzip members)
//! time:    integer seconds | EventTime (ext 0: u32 seconds, u32 nanoseconds, big-endian)
//!          | float | [time, metadata] (Fluent Bit's event format 2); 0 or nil: now
//! option:  {"chunk": id, "size": n, "compressed": "gzip"|"text"}  (others ignored)
//! answer:  {"ack": id}                       for a message with a chunk id
//! handshake (shared_key): server ["HELO", {"nonce", "auth": "", "keepalive": true}]
//!          client ["PING", hostname, salt, hex(sha512(salt+hostname+nonce+key)), user, pass]
//!          server ["PONG", ok, reason, self_hostname, hex(sha512(salt+self_hostname+nonce+key))]
//! record:  the record map as one JSON object, plus "time": RFC 3339 UTC
//!          ("2024-01-15T10:00:00Z", ".NNNNNNNNN" for an EventTime) unless it has "time"
//! service and stream: the tag (an empty tag: the source's name)
//! ```
//! User authentication (`<user>` in Fluentd) is not offered: HELO's `auth` is empty and the
//! PING's user name and password are not checked.
//!
//! # Operation
//! 1. Main thread: bind (SO_REUSEPORT), load the TLS certificate and key, make the chunk
//!    table. Worker: accept through the ring; a connection over `connections_max` evicts the
//!    longest-idle one (counted, logged at most once per 10 s).
//! 2. Per connection: the TLS handshake, then with `shared_key` HELO, PING, PONG, all within
//!    `handshake_timeout_ms` (a failure is counted by reason, answered with a PONG saying
//!    why, and closes the connection). Then a reader task and a writer task: the reader's
//!    reads are never cancelled by the writer's answers (an io_uring read cancelled midway
//!    would lose bytes).
//! 3. Reader: each read appends to the connection's carry; the scanner finds each whole
//!    message; the message is checked whole (every entry rendered once), then, for a chunk,
//!    looked up in the chunk table (a resend is answered, not handed over), and its records
//!    handed to the worker through [`crate::sources::Intake::record`], the tag as key. A
//!    connection silent for `idle_timeout_ms` is closed; a message started when a connection
//!    closes is lost for this connection (no ack: its client resends it) and counted.
//! 4. The worker seals records into frames; their fates come back through
//!    [`crate::sources::Marks`]; a chunk whose records are all settled is acknowledged on
//!    every connection waiting for it, by their writer tasks.

pub mod chunks;
pub mod handshake;
pub mod message;
pub mod msgpack;
pub mod run;

/// Bytes asked of one read.
pub const READ_BYTES: usize = 64 << 10;

/// Why a handshake failed (the `reason` label of `shipper_forward_handshakes_failed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The TLS handshake failed (no TLS, a bad or missing client certificate, ...).
    Tls,
    /// The PING was missing, malformed, or proved another key.
    SharedKey,
    /// Not done within `handshake_timeout_ms`.
    Timeout,
}

impl Handshake {
    pub const ALL: [Handshake; 3] = [Handshake::Tls, Handshake::SharedKey, Handshake::Timeout];

    pub fn label(self) -> &'static str {
        match self {
            Handshake::Tls => "tls",
            Handshake::SharedKey => "shared_key",
            Handshake::Timeout => "timeout",
        }
    }
}

/// Counters of one forward source on one worker.
#[derive(Clone, Debug, Default)]
pub struct ForwardCounters {
    pub source: String,
    /// The address its listener is bound to.
    pub local: String,
    pub connections_accepted: u64,
    pub connections_closed: u64,
    /// Longest-idle connections closed to make room: connections_max were open.
    pub connections_evicted: u64,
    /// Connections closed after sending nothing for idle_timeout_ms.
    pub connections_idle_closed: u64,
    pub connections_open: u64,
    /// By [`Handshake`].
    pub handshakes_failed: [u64; Handshake::ALL.len()],
    /// Messages handed over, by [`message::Mode`] (resent chunks are not: `chunks_resent`).
    pub messages: [u64; message::Mode::ALL.len()],
    /// Bytes of those messages.
    pub bytes_received: u64,
    /// Records handed to the worker.
    pub records_received: u64,
    /// Tags cut to the protocol's 255 bytes.
    pub keys_truncated: u64,
    /// Connections closed for bytes that are not a forward message.
    pub messages_malformed: u64,
    /// Messages refused over a limit (their connections closed), by [`message::Cut`].
    pub messages_cut: [u64; message::Cut::ALL.len()],
    /// Messages started and not finished when their connection closed (not acknowledged).
    pub messages_partial: u64,
    /// `{"ack": chunk}` answers written.
    pub chunks_acked: u64,
    /// Chunks seen again (resent): answered, not handed over again.
    pub chunks_resent: u64,
    /// Acknowledged chunk ids forgotten to make room in the table (chunks_max).
    pub chunks_forgotten: u64,
    /// Times a chunk waited for room in the table: every remembered id was still pending.
    pub chunks_table_full: u64,
    pub read_errors: u64,
}
