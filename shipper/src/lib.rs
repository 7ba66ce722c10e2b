//! `shipper`: a per-core log shipper. Applications write JSON lines into named pipes; each
//! worker thread reads its pipes through io_uring, finds the fields it needs, rate-limits per
//! service, batches and zstd-compresses records into frames, and sends them over mutual TLS
//! to `shipper receive`, which writes them out and acknowledges them.
//!
//! The modules follow the data path: [`sources`] → [`transforms`] → [`sinks`] (over
//! [`protocol`] and [`tls`], spilling to the disk [`buffer`]) → [`receiver`]; [`runtime`] owns
//! the per-core workers, [`metrics`] what they count, [`ebpf`] what the kernel drops, [`os`]
//! the process's limits. `docs/` has the architecture, protocol and configuration.

pub mod buffer;
pub mod clock;
pub mod config;
pub mod ebpf;
pub mod fault;
pub mod glob;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod os;
pub mod protocol;
pub mod receiver;
pub mod record;
pub mod runtime;
pub mod signals;
pub mod sinks;
pub mod sources;
pub mod tls;
pub mod transforms;
