//! The control plane: the one place where per-core state meets, at ~100 ms pace.
//!
//! # Operation
//! Every `rebalance_interval_ms` each worker reports how many lines of each service it saw;
//! this thread keeps the latest report of each worker, computes every service's shares with
//! [`rebalance`], and sends each worker its shares. Nothing here is on the per-record path.
//! A reload whose new `[ratelimit]` limits apply live ([`super::reload`]) sends them here;
//! they go to every worker at once, which applies them at its next tick (at most
//! `min(flush_interval_ms, 50)` ms later): well within one rebalance interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::shipper::RateLimitSection;
use crate::transforms::ratelimit::rebalance;

/// A service name as it travels between threads.
pub type Name = std::sync::Arc<[u8]>;

/// One worker's arrivals per service during its last interval.
pub struct DemandReport {
    pub worker: usize,
    pub demand: Vec<(Name, u64)>,
}

/// New shares for one worker.
pub type Shares = Vec<(Name, f64)>;

/// What comes to the control thread: a worker's demand, or a reload's new limits.
pub enum ToControl {
    Demand(DemandReport),
    Limits(Arc<RateLimitSection>),
}

/// What the control thread sends a worker.
pub enum Update {
    Shares(Shares),
    /// A reload's `[ratelimit]`: every service's rate and burst from now on.
    Limits(Arc<RateLimitSection>),
}

/// The control plane's ends of the channels, for [`run`].
pub struct ControlPlane {
    pub reports: Receiver<ToControl>,
    pub shares: Vec<Sender<Update>>,
    pub interval: Duration,
}

/// Runs until every sender of its channel has hung up: the workers, and the reload thread,
/// which holds one for the life of the process (so in practice it ends with the process).
pub fn run(plane: ControlPlane) {
    let workers = plane.shares.len();
    let mut latest: Vec<HashMap<Name, u64>> = vec![HashMap::new(); workers];
    let mut fresh = false;
    let mut deadline = Instant::now() + plane.interval;
    loop {
        let now = Instant::now();
        if now < deadline {
            match plane.reports.recv_timeout(deadline - now) {
                Ok(ToControl::Demand(r)) => {
                    latest[r.worker] = r.demand.into_iter().collect();
                    fresh = true;
                    continue;
                }
                Ok(ToControl::Limits(limits)) => {
                    for worker in &plane.shares {
                        let _ = worker.send(Update::Limits(limits.clone()));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        deadline += plane.interval;
        if !fresh {
            continue;
        }
        fresh = false;
        for (worker, shares) in compute(&latest).into_iter().enumerate() {
            // A worker that has stopped no longer listens; that is not an error.
            let _ = plane.shares[worker].send(Update::Shares(shares));
        }
    }
}

/// Every service's shares from the latest reports, per worker.
pub fn compute(latest: &[HashMap<Name, u64>]) -> Vec<Shares> {
    let mut arrivals: BTreeMap<&Name, Vec<u64>> = BTreeMap::new();
    for (worker, report) in latest.iter().enumerate() {
        for (name, &n) in report {
            arrivals.entry(name).or_insert_with(|| vec![0; latest.len()])[worker] = n;
        }
    }
    let mut out = vec![Vec::new(); latest.len()];
    for (name, a) in arrivals {
        if let Some(shares) = rebalance(&a) {
            for (worker, s) in shares.into_iter().enumerate() {
                out[worker].push((name.clone(), s));
            }
        }
    }
    out
}
