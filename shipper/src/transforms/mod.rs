//! What happens to a line between its source and its batch: field extraction, service
//! interning and rate limiting. All per-core, all allocation-free in the steady state.

pub mod parse;
pub mod ratelimit;
pub mod services;
pub mod syslog;
