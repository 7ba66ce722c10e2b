//! Waiting for a condition with a deadline, never sleeping and hoping.

use std::time::{Duration, Instant};

/// The condition did not hold within the limit.
#[derive(Debug, thiserror::Error)]
#[error("not within {0:?}")]
pub struct TimedOut(pub Duration);

/// Calls `f` every `every` until it returns `Some` (its value), or fails once `limit` has
/// passed since the call.
pub fn poll<T>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut(limit));
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_and_times_out_when_none_comes() {
        let mut calls = 0;
        let v = poll(Duration::from_secs(5), Duration::ZERO, || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(v.unwrap(), 3);
        let limit = Duration::from_millis(30);
        let started = Instant::now();
        let e = poll(limit, Duration::from_millis(5), || None::<()>).unwrap_err();
        assert!(started.elapsed() >= limit);
        assert_eq!(e.to_string(), "not within 30ms");
    }
}
