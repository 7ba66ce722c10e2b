//! Health of each destination, judged by acknowledgements rather than by TCP, and which tier
//! takes frames.
//!
//! # Design constraints
//! - Per worker, no sharing: each worker judges the receivers by its own connections, so one
//!   worker's failover never waits for another's.
//! - A receiver is `Up` from its WELCOME (an answer from the receiving process, not the
//!   kernel's accept) until a frame or heartbeat goes unanswered for `ack_timeout_ms`, a write
//!   misses `write_timeout_ms`, or its last connection fails. Probes of a `Down` receiver back
//!   off exponentially (jittered, capped at `backoff_ms_max`), and the backoff only resets
//!   when an acknowledgement arrives: a receiver that welcomes connections but never acks
//!   (a hung disk, a half-open path) is probed ever more slowly, not hammered.
//!
//! # Operation
//! Frames go to the lowest tier with an `Up` receiver, spread over that tier's receivers.
//! A tier is *wanted* (its connection slots connect) when every receiver of the tiers above
//! it is known `Down`: primaries always, standbys while no primary may be up, dead-letter
//! receivers while neither may. When a higher tier comes back, the lower tier's connections
//! take no new frames and close once their frames in flight are acknowledged.

use crate::config::shipper::Tier;

/// What a worker knows of one receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not tried yet.
    Unknown,
    Up,
    Down,
}

#[derive(Debug)]
pub struct Destination {
    pub address: String,
    pub tier: Tier,
    pub state: State,
    /// When `state` began, monotonic ns.
    pub since_ns: u64,
    /// Failed probes or lost connections since the last acknowledgement.
    pub failures: u32,
}

/// A change of the tier that takes frames, for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Failover {
    pub from: Option<Tier>,
    pub to: Option<Tier>,
}

#[derive(Debug)]
pub struct Destinations {
    pub list: Vec<Destination>,
}

impl Destinations {
    pub fn new(destinations: &[(Tier, &str)]) -> Destinations {
        let list = destinations
            .iter()
            .map(|&(tier, address)| Destination {
                address: address.to_string(),
                tier,
                state: State::Unknown,
                since_ns: 0,
                failures: 0,
            })
            .collect();
        Destinations { list }
    }

    /// The tier frames go to now: the lowest with a receiver up.
    pub fn active(&self) -> Option<Tier> {
        self.list.iter().filter(|d| d.state == State::Up).map(|d| d.tier).min()
    }

    /// Whether receivers of `tier` should be connected.
    pub fn wanted(&self, tier: Tier) -> bool {
        self.list.iter().filter(|d| d.tier < tier).all(|d| d.state == State::Down)
    }

    /// Some dead-letter receiver may take a refused frame: one is configured and not known
    /// to be down.
    pub fn dead_letter_available(&self) -> bool {
        self.list.iter().any(|d| d.tier == Tier::DeadLetter && d.state != State::Down)
    }

    /// Every receiver has been tried and is down: nothing can take data now.
    pub fn all_down(&self) -> bool {
        self.list.iter().all(|d| d.state == State::Down)
    }

    /// Whether receiver `dest` takes new frames now.
    pub fn may_send(&self, dest: usize) -> bool {
        let d = &self.list[dest];
        d.state == State::Up && self.active() == Some(d.tier)
    }

    /// Receiver `dest` welcomed a connection; returns the failover this causes, if any.
    pub fn up(&mut self, dest: usize, now_ns: u64) -> Option<Failover> {
        self.set(dest, State::Up, now_ns)
    }

    /// Receiver `dest` failed; returns the failover this causes, if any.
    pub fn down(&mut self, dest: usize, now_ns: u64) -> Option<Failover> {
        let d = &mut self.list[dest];
        d.failures = d.failures.saturating_add(1);
        self.set(dest, State::Down, now_ns)
    }

    /// An acknowledgement from `dest`: it is healthy for real, so its backoff starts over.
    pub fn acked(&mut self, dest: usize) {
        self.list[dest].failures = 0;
    }

    /// How long to wait before probing `dest` again, in ms (before jitter).
    pub fn probe_delay_ms(&self, dest: usize, backoff_ms_initial: u64, backoff_ms_max: u64) -> u64 {
        let doublings = self.list[dest].failures.saturating_sub(1).min(32);
        backoff_ms_initial.saturating_mul(1 << doublings).min(backoff_ms_max)
    }

    fn set(&mut self, dest: usize, state: State, now_ns: u64) -> Option<Failover> {
        let from = self.active();
        let d = &mut self.list[dest];
        if d.state != state {
            d.state = state;
            d.since_ns = now_ns;
        }
        let to = self.active();
        (from != to).then_some(Failover { from, to })
    }
}

/// Counters of one receiver address.
#[derive(Clone, Debug, Default)]
pub struct DestinationCounters {
    pub receiver: String,
    pub connects: u64,
    pub connect_failures: u64,
    pub connections_lost: u64,
    pub connections_up: u64,
    /// 1 while the receiver is up (welcomed us and has not missed an ack since).
    pub healthy: u64,
    /// Times the receiver went down (unhealthy) after being up or unknown.
    pub failures: u64,
    /// Frames that were in flight to it when it failed, requeued to go elsewhere.
    pub frames_resent: u64,
    pub frames_sent: u64,
    /// Milliseconds spent down in closed periods.
    pub unhealthy_ms: u64,
    /// Milliseconds of the current down period (0 when up).
    pub unhealthy_ms_open: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Destinations {
        Destinations::new(&[
            (Tier::Primary, "p1:1"),
            (Tier::Primary, "p2:1"),
            (Tier::Standby, "s:1"),
            (Tier::DeadLetter, "d:1"),
        ])
    }

    #[test]
    fn tiers_are_wanted_only_when_every_receiver_above_is_down() {
        let mut d = three();
        assert!(d.wanted(Tier::Primary) && !d.wanted(Tier::Standby), "unknown is not down");
        assert_eq!(d.up(0, 1), Some(Failover { from: None, to: Some(Tier::Primary) }));
        assert_eq!(d.down(1, 2), None, "p1 still takes frames");
        assert!(!d.wanted(Tier::Standby));
        assert_eq!(d.down(0, 3), Some(Failover { from: Some(Tier::Primary), to: None }));
        assert!(d.wanted(Tier::Standby) && !d.wanted(Tier::DeadLetter));
        assert_eq!(d.up(2, 4), Some(Failover { from: None, to: Some(Tier::Standby) }));
        assert!(d.may_send(2) && !d.may_send(3));
        d.down(2, 5);
        assert!(d.wanted(Tier::DeadLetter));
        d.up(3, 6);
        assert!(d.may_send(3));
        // A primary coming back takes the traffic; the lower tiers are no longer wanted.
        assert_eq!(
            d.up(1, 7),
            Some(Failover { from: Some(Tier::DeadLetter), to: Some(Tier::Primary) })
        );
        assert!(d.may_send(1) && !d.may_send(3) && !d.wanted(Tier::DeadLetter));
    }

    #[test]
    fn backoff_grows_per_failure_and_resets_only_on_an_ack() {
        let mut d = three();
        assert_eq!(d.probe_delay_ms(0, 100, 5000), 100);
        for _ in 0..3 {
            d.down(0, 1);
        }
        assert_eq!(d.probe_delay_ms(0, 100, 5000), 400);
        d.up(0, 2);
        assert_eq!(d.probe_delay_ms(0, 100, 5000), 400, "a WELCOME alone proves little");
        for _ in 0..60 {
            d.down(0, 3);
        }
        assert_eq!(d.probe_delay_ms(0, 100, 5000), 5000);
        d.acked(0);
        assert_eq!(d.probe_delay_ms(0, 100, 5000), 100);
    }
}
