//! The sink to receivers: batch builder, outbox of unacknowledged frames, and the pool of
//! TLS connections of one worker.
//!
//! # Design constraints
//! - Per worker: one batch of at most `batch_bytes_max` / `batch_events_max`; an outbox of at
//!   most `outbox_bytes_max` compressed bytes (queued plus in flight); at most
//!   `inflight_frames_max` frames sent and unacknowledged; `connections` per receiver.
//!
//! # Operation
//! A sealed batch becomes one zstd-compressed DATA frame with the worker's next sequence
//! number and enters the outbox (or, if the outbox is full, is dropped and counted per
//! service). Connection tasks take frames from the outbox, send them, and the matching ACK
//! releases them. A failed connection or an ack missing `ack_timeout_ms` puts that
//! connection's frames back at the front of the queue, to be resent on another connection.

pub mod batch;
pub mod connection;
pub mod health;
pub mod outbox;
pub mod resolve;

pub use batch::{BatchBuilder, Sealed};
pub use outbox::Outbox;
