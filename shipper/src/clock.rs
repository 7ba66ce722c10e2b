//! Time as the data path reads it: a worker's monotonic clock and wall-clock microseconds.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A worker's monotonic clock: nanoseconds since the worker started. Copies share their start,
/// so every stage of one worker reads the same time line.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock { start: Instant::now() }
    }

    /// Monotonic nanoseconds since [`Clock::start`].
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// Microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
