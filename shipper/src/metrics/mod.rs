//! Per-core statistics and their Prometheus exposition.
//!
//! # Design constraints
//! - Counters are plain integers owned by their worker: nothing shared is touched per record.
//!   Each worker publishes a copy of its counters into its own slot of a [`Registry`] at the
//!   control-plane pace (every `PUBLISH_INTERVAL_MS`); a scrape renders the latest copies.
//! - Every series has a `core` label; `service` labels are capped by `services_max`.
//!
//! # Format
//! Prometheus text format 0.0.4; hdrhistogram distributions are exposed as summaries
//! (quantiles 0.5, 0.9, 0.99, 0.999 and 1, plus `_sum` and `_count`).

pub mod http;
pub mod ledger;
pub mod receiver;
pub mod shipper;
pub mod status;
pub mod text;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use text::Exposition;

/// How often workers copy their counters into the registry, in ms.
pub const PUBLISH_INTERVAL_MS: u64 = 250;

/// The latest published snapshot of each core, plus process-wide series.
pub struct Registry<T> {
    slots: Vec<Mutex<Option<T>>>,
    /// Publishes per slot so far: a worker's sign of life for the watchdog.
    publishes: Vec<AtomicU64>,
}

impl<T: Clone + Send> Registry<T> {
    pub fn new(cores: usize) -> Arc<Registry<T>> {
        Arc::new(Registry {
            slots: (0..cores).map(|_| Mutex::new(None)).collect(),
            publishes: (0..cores).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Called by worker `core` with a copy of its counters.
    pub fn publish(&self, core: usize, snapshot: T) {
        *self.slots[core].lock().expect("metrics slot poisoned") = Some(snapshot);
        self.publishes[core].fetch_add(1, Ordering::Relaxed);
    }

    /// A check for the watchdog: true when every slot was published within the last `window`
    /// (at least a publish interval: a check more frequent than the publishes must not see a
    /// healthy worker as stuck).
    pub fn progress(
        self: &Arc<Self>,
        window: std::time::Duration,
    ) -> impl FnMut() -> bool + Send + 'static
    where
        T: 'static,
    {
        let registry = self.clone();
        let window = window.max(std::time::Duration::from_millis(2 * PUBLISH_INTERVAL_MS));
        let count = move || -> Vec<u64> {
            registry.publishes.iter().map(|p| p.load(Ordering::Relaxed)).collect()
        };
        let start = std::time::Instant::now();
        let mut seen: Vec<(u64, std::time::Instant)> =
            count().into_iter().map(|c| (c, start)).collect();
        move || {
            let now = std::time::Instant::now();
            for (slot, c) in seen.iter_mut().zip(count()) {
                if c != slot.0 {
                    *slot = (c, now);
                }
            }
            seen.iter().all(|&(_, at)| now.duration_since(at) <= window)
        }
    }

    /// Copies of every published snapshot, in core order.
    pub fn snapshots(&self) -> Vec<T> {
        self.slots.iter().filter_map(|s| s.lock().expect("metrics slot poisoned").clone()).collect()
    }
}

/// Renders all cores' snapshots, family by family, via `render_all`.
pub fn scrape<T, F>(registry: &Registry<T>, render_all: F) -> String
where
    T: Clone + Send,
    F: Fn(&[T], &mut Exposition),
{
    let snaps = registry.snapshots();
    let mut out = Exposition::default();
    render_all(&snaps, &mut out);
    out.finish()
}
