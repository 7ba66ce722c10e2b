//! The control plane: the one place where per-core state meets, at ~100 ms pace.
//!
//! # Operation
//! Every `rebalance_interval_ms` each worker reports how many lines of each service it saw;
//! this thread keeps the latest report of each worker, computes every service's shares with
//! [`rebalance`], and sends each worker its shares. Nothing here is on the per-record path.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

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

/// The control plane's ends of the channels, for [`run`].
pub struct ControlPlane {
    pub reports: Receiver<DemandReport>,
    pub shares: Vec<Sender<Shares>>,
    pub interval: Duration,
}

/// Runs until every worker has hung up its report channel.
pub fn run(plane: ControlPlane) {
    let workers = plane.shares.len();
    let mut latest: Vec<HashMap<Name, u64>> = vec![HashMap::new(); workers];
    let mut fresh = false;
    let mut deadline = Instant::now() + plane.interval;
    loop {
        let now = Instant::now();
        if now < deadline {
            match plane.reports.recv_timeout(deadline - now) {
                Ok(r) => {
                    latest[r.worker] = r.demand.into_iter().collect();
                    fresh = true;
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
            let _ = plane.shares[worker].send(shares);
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
