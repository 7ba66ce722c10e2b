//! Per-key token buckets, shared-nothing across cores.
//!
//! # Design constraints
//! - A key (service) may send `rate` events/s plus a `burst`, summed over all workers, as
//!   syslog-ng's `rate-limit()` does for one process. No lock and no shared atomic on the
//!   per-record path: each worker owns a bucket per key holding a *share* of the key's rate and
//!   burst; the shares of one key sum to 1, so the fleet-wide bound `rate·t + burst` holds.
//! - Shares follow demand at a control-plane pace (`rebalance_interval_ms`, ~100 ms): each
//!   worker reports how many lines of each key arrived, and [`rebalance`] gives each worker a
//!   share proportional to its arrivals, with a small floor so a worker seeing a key for the
//!   first time is not starved for a whole interval.
//!
//! # Operation
//! `admit` refills the bucket from the elapsed time (nanoseconds, from a clock read once per
//! read batch) and takes one token. A share change rescales rate and burst; tokens above the
//! new burst are cut, so a change never creates tokens.

/// Fraction of a key's rate every worker keeps, whatever its demand, divided by the worker
/// count (1% of the rate is spread over idle workers in total).
pub const SHARE_FLOOR_TOTAL: f64 = 0.01;

#[derive(Clone, Debug)]
struct Bucket {
    /// Events/s for the whole fleet of workers; 0 means unlimited.
    rate: f64,
    burst: f64,
    share: f64,
    tokens: f64,
    last_ns: u64,
}

impl Bucket {
    /// Credits the time since `last_ns` at the current rate and share, up to the burst.
    #[inline]
    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns) as f64;
        self.last_ns = self.last_ns.max(now_ns);
        self.tokens = (self.tokens + elapsed * self.local_rate_per_ns()).min(self.local_burst());
    }

    fn local_rate_per_ns(&self) -> f64 {
        self.rate * self.share / 1e9
    }

    fn local_burst(&self) -> f64 {
        (self.burst * self.share).max(0.0)
    }
}

/// One worker's buckets, indexed by service id.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Vec<Bucket>,
    demand: Vec<u64>,
}

impl RateLimiter {
    /// Sets up the bucket of `id` (ids are dense, added in order or reused) with `share` of the key's
    /// `rate` (events/s, 0 = unlimited) and `burst`.
    pub fn add(&mut self, id: u32, rate: u64, burst: u64, share: f64, now_ns: u64) {
        let id = id as usize;
        if id >= self.buckets.len() {
            let fill = Bucket { rate: 0.0, burst: 0.0, share, tokens: 0.0, last_ns: now_ns };
            self.buckets.resize(id + 1, fill);
            self.demand.resize(id + 1, 0);
        }
        let mut b =
            Bucket { rate: rate as f64, burst: burst as f64, share, tokens: 0.0, last_ns: now_ns };
        b.tokens = b.local_burst();
        self.buckets[id] = b;
        // A reused id (its service forgotten) starts without the old one's demand.
        self.demand[id] = 0;
    }

    /// Takes one token from `id`'s bucket; `false` means the line is over the limit.
    #[inline]
    pub fn admit(&mut self, id: u32, now_ns: u64) -> bool {
        let id = id as usize;
        debug_assert!(id < self.buckets.len(), "service id {id} has no bucket");
        self.demand[id] += 1;
        let b = &mut self.buckets[id];
        if b.rate == 0.0 {
            return true;
        }
        b.refill(now_ns);
        // The epsilon absorbs float rounding of many small refills (0.1 + 0.1 + ... < 1.0).
        if b.tokens >= 1.0 - 1e-9 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Arrivals per id since the last call, for the control plane (ids with none left out).
    pub fn take_demand(&mut self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for (id, d) in self.demand.iter_mut().enumerate() {
            if *d > 0 {
                out.push((id as u32, std::mem::take(d)));
            }
        }
        out
    }

    /// Applies a new share for `id` from the control plane.
    pub fn set_share(&mut self, id: u32, share: f64, now_ns: u64) {
        let Some(b) = self.buckets.get_mut(id as usize) else {
            return;
        };
        if b.rate == 0.0 {
            b.share = share;
            return;
        }
        // Credit the time so far at the old share, then switch.
        b.refill(now_ns);
        b.share = share;
        b.tokens = b.tokens.min(b.local_burst());
    }

    /// Applies a new `rate` (events/s, 0 = unlimited) and `burst` to `id`'s bucket, from a
    /// reload: the time so far is credited at the old rate, tokens above the new burst are
    /// cut, and a bucket that was unlimited starts full. The share stays.
    #[cold]
    pub fn set_limit(&mut self, id: u32, rate: u64, burst: u64, now_ns: u64) {
        let Some(b) = self.buckets.get_mut(id as usize) else {
            return;
        };
        let was_unlimited = b.rate == 0.0;
        if was_unlimited {
            b.last_ns = b.last_ns.max(now_ns);
        } else {
            b.refill(now_ns);
        }
        (b.rate, b.burst) = (rate as f64, burst as f64);
        b.tokens = if was_unlimited { b.local_burst() } else { b.tokens.min(b.local_burst()) };
    }

    pub fn share(&self, id: u32) -> f64 {
        self.buckets[id as usize].share
    }
}

/// Computes each worker's share of one key from the arrivals each saw in the last interval.
/// Returns `None` when no worker saw the key (shares stay as they are).
pub fn rebalance(arrivals: &[u64]) -> Option<Vec<f64>> {
    let n = arrivals.len();
    let total: u64 = arrivals.iter().sum();
    if total == 0 || n == 0 {
        return None;
    }
    let floor = SHARE_FLOOR_TOTAL / n as f64;
    let spread = 1.0 - SHARE_FLOOR_TOTAL;
    Some(arrivals.iter().map(|&a| floor + spread * a as f64 / total as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn admits_burst_then_rate() {
        let mut l = RateLimiter::default();
        l.add(0, 100, 10, 1.0, 0);
        let first: usize = (0..50).filter(|_| l.admit(0, 0)).count();
        assert_eq!(first, 10);
        // One second later: 100 more tokens, capped at the burst of 10.
        let later: usize = (0..50).filter(|_| l.admit(0, SEC)).count();
        assert_eq!(later, 10);
        // Steady arrivals at 1000/s for 1 s admit 100 (the rate).
        let mut admitted = 0;
        for i in 1..=1000 {
            admitted += usize::from(l.admit(0, SEC + i * SEC / 1000));
        }
        assert_eq!(admitted, 100);
    }

    #[test]
    fn unlimited_and_demand() {
        let mut l = RateLimiter::default();
        l.add(0, 0, 0, 1.0, 0);
        assert!((0..1000).all(|_| l.admit(0, 0)));
        assert_eq!(l.take_demand(), vec![(0, 1000)]);
        assert_eq!(l.take_demand(), vec![]);
    }

    #[test]
    fn shares_follow_demand_and_never_create_tokens() {
        let s = rebalance(&[300, 100]).unwrap();
        assert!((s[0] - (0.005 + 0.99 * 0.75)).abs() < 1e-12);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(rebalance(&[0, 0]), None);

        let mut l = RateLimiter::default();
        l.add(0, 1000, 1000, 0.5, 0);
        l.set_share(0, 0.1, 0);
        // Burst share is now 100: no more than that at once.
        assert_eq!((0..1000).filter(|_| l.admit(0, 0)).count(), 100);
    }

    /// A reload's new limit: the time before it is credited under the old limit, the new rate
    /// applies from then on, and an unlimited bucket that becomes limited starts with its
    /// burst.
    #[test]
    fn a_new_limit_applies_from_its_time() {
        let mut l = RateLimiter::default();
        l.add(0, 100, 10, 1.0, 0);
        assert_eq!((0..50).filter(|_| l.admit(0, 0)).count(), 10);
        // Half a second at 100/s earns 50 tokens, capped at the burst then in force (10).
        l.set_limit(0, 1000, 20, SEC / 2);
        assert_eq!((0..50).filter(|_| l.admit(0, SEC / 2)).count(), 10);
        // 10 ms at the new rate: 10 tokens.
        assert_eq!((0..50).filter(|_| l.admit(0, SEC / 2 + SEC / 100)).count(), 10);
        l.set_limit(0, 0, 0, SEC);
        assert!((0..1000).all(|_| l.admit(0, SEC)));
        l.set_limit(0, 5, 5, SEC);
        assert_eq!((0..50).filter(|_| l.admit(0, SEC)).count(), 5);
    }

    /// Two simulated workers with skewed arrivals, rebalanced every 100 ms, admit
    /// rate·t + burst in total within 5%.
    #[test]
    fn shared_nothing_total_tracks_global_rate() {
        let (rate, burst) = (1000u64, 200u64);
        let mut workers = [RateLimiter::default(), RateLimiter::default()];
        for c in &mut workers {
            c.add(0, rate, burst, 0.5, 0);
        }
        let mut admitted = 0u64;
        let step = SEC / 10_000; // 10k arrivals/s in total, 3:1 between the workers
        let t_end = 10 * SEC;
        let mut now = 0;
        while now < t_end {
            let w = usize::from(now / step % 4 == 0);
            admitted += u64::from(workers[w].admit(0, now));
            now += step;
            if now % (SEC / 10) == 0 {
                let d: Vec<u64> = workers
                    .iter_mut()
                    .map(|c| c.take_demand().first().map_or(0, |x| x.1))
                    .collect();
                for (c, s) in workers.iter_mut().zip(rebalance(&d).unwrap()) {
                    c.set_share(0, s, now);
                }
            }
        }
        let expected = (rate * 10 + burst) as f64;
        let err = (admitted as f64 - expected).abs() / expected;
        assert!(err < 0.05, "admitted {admitted}, expected {expected}, error {err:.3}");
    }
}
