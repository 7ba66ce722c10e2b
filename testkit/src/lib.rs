//! What the integration tests (`shipper/tests`), the perf suite (`xtask`) and the
//! micro-benchmarks (`benches`) would otherwise each write again: free loopback ports, the
//! kernel's `/proc/net/udp` table, seeded xorshift generators, network namespaces, and
//! polling with a deadline (alone or while a child process must stay alive).
//!
//! It does not depend on `shipper`: dev certificates (`shipper::tls::pki::generate`) and
//! metric scrapes (`shipper::metrics::http::get`, `shipper::metrics::text::sum`) are the
//! shipper library's own and are shared from there.

pub mod net;
pub mod netns;
pub mod process;
pub mod procnet;
pub mod rng;
pub mod wait;
