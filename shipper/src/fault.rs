//! Test-only fault injection: `SHIPPER_FAULT_INJECT=<fault>` makes a process fail on purpose at
//! a named point, so the integration tests can check what a real failure does (that a panic
//! ends the process, for one). **For tests only**: nothing sets it in production, and an
//! unknown value is ignored with a warning.
//!
//! # Operation
//! The variable is read once, when a worker starts (never on the data path).

use std::sync::OnceLock;

/// The environment variable naming the fault to inject.
pub const ENV: &str = "SHIPPER_FAULT_INJECT";

/// A failure a test can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `panic-worker-task`: worker 0 of `shipper run` and receiver worker 0 of
    /// `shipper receive` spawn a task that panics once the worker is running.
    PanicWorkerTask,
    /// `stall-worker`: worker 0 of `shipper run` blocks its thread for [`STALL_MS`], a second
    /// after it started (what a stuck worker looks like to the watchdog).
    StallWorker,
    /// `hold-acks`: `shipper receive` writes and commits every DATA frame, but acknowledges
    /// only those that carry an origin (sent again from a shipper's disk buffer): frames
    /// written and never acknowledged, as when acks are lost or the receiver stops after
    /// writing.
    HoldAcks,
    /// `hold-all-acks`: `shipper receive` writes and commits every DATA frame and
    /// acknowledges none.
    HoldAllAcks,
}

/// How long [`Fault::StallWorker`] blocks the worker's thread.
pub const STALL_MS: u64 = 3000;

impl Fault {
    fn parse(value: &str) -> Option<Fault> {
        match value {
            "panic-worker-task" => Some(Fault::PanicWorkerTask),
            "stall-worker" => Some(Fault::StallWorker),
            "hold-acks" => Some(Fault::HoldAcks),
            "hold-all-acks" => Some(Fault::HoldAllAcks),
            _ => None,
        }
    }
}

/// Whether the test running this process asked for `fault`.
pub fn injected(fault: Fault) -> bool {
    static ASKED: OnceLock<Option<Fault>> = OnceLock::new();
    let asked = ASKED.get_or_init(|| {
        let value = std::env::var(ENV).ok()?;
        let parsed = Fault::parse(&value);
        if parsed.is_none() {
            tracing::warn!("{ENV}={value:?} is not a known fault: ignored");
        }
        parsed
    });
    *asked == Some(fault)
}

/// The task [`Fault::PanicWorkerTask`] spawns on a worker's runtime: it lets the worker run
/// its other tasks once, then panics.
pub async fn panic_worker_task(worker: &'static str) {
    tokio::task::yield_now().await;
    panic!("{ENV}=panic-worker-task: {worker} 0 panics on purpose (a test asked for it)");
}

/// The task [`Fault::StallWorker`] spawns on worker 0: a second after start, it blocks the
/// worker's thread for [`STALL_MS`], as a worker stuck in a blocking call would.
pub async fn stall_worker_task() {
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    tracing::warn!("{ENV}=stall-worker: worker 0 blocks its thread for {STALL_MS} ms on purpose");
    std::thread::sleep(std::time::Duration::from_millis(STALL_MS));
}
