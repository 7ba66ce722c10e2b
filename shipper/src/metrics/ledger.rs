//! The ledger: where every record a source handed over went, per core and source.
//!
//! # Design constraints
//! - Exact, not sampled: every path that settles a record of this run counts it under exactly
//!   one [`Fate`], and a record not settled yet is `held` (in an open batch, the outbox, in
//!   flight, waiting for the disk buffer's writer or the quarantine's). So at any moment
//!   `handed = Σ fates + held`, and at rest `held = 0`.
//! - A record's ledger ends where another's begins: `buffered` records are the disk buffer's
//!   from then on (its own counters say what was replayed, evicted or left on disk), and
//!   `reread` records are a durable source's to read again from its position in the next run.
//!   What a source read and never handed over (empty lines, refused messages) is in the
//!   source's own counters.
//!
//! # Format
//! ```text
//! shipper_source_records_handed_total{core,source}        records handed to the pipeline
//! shipper_source_records_settled_total{core,source,fate}  records settled, by fate
//! shipper_source_records_held{core,source}                records not settled yet
//! ```

use super::text::Exposition;
use crate::transforms::services::DropReason;

/// How a record handed over by a source was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// In a frame a receiver acknowledged.
    Delivered,
    /// Dropped, for a [`DropReason`].
    Dropped(DropReason),
    /// In a frame a receiver refused, kept in the quarantine.
    Quarantined,
    /// Written to the disk buffer (the buffer's from then on).
    Buffered,
    /// A durable source's, unacknowledged at shutdown: read again by the next run.
    Reread,
}

impl Fate {
    /// Every fate, in the order of [`SourceLedger::settled`].
    pub const ALL: [Fate; 10] = [
        Fate::Delivered,
        Fate::Dropped(DropReason::RateLimit),
        Fate::Dropped(DropReason::OutboxFull),
        Fate::Dropped(DropReason::Shutdown),
        Fate::Dropped(DropReason::BufferFull),
        Fate::Dropped(DropReason::BufferError),
        Fate::Dropped(DropReason::Rejected),
        Fate::Quarantined,
        Fate::Buffered,
        Fate::Reread,
    ];

    /// The `fate` label: `delivered`, a drop reason's label, `quarantined`, `buffered`,
    /// `reread`.
    pub fn label(self) -> &'static str {
        match self {
            Fate::Delivered => "delivered",
            Fate::Dropped(reason) => reason.label(),
            Fate::Quarantined => "quarantined",
            Fate::Buffered => "buffered",
            Fate::Reread => "reread",
        }
    }

    fn index(self) -> usize {
        match self {
            Fate::Delivered => 0,
            Fate::Dropped(reason) => 1 + reason as usize,
            Fate::Quarantined => 7,
            Fate::Buffered => 8,
            Fate::Reread => 9,
        }
    }
}

const _: () = assert!(DropReason::ALL.len() == 6, "Fate::index places the drop reasons at 1..=6");

/// One source's ledger on one core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceLedger {
    /// The `source` label (a path or listen address).
    pub source: String,
    /// Records handed to the pipeline.
    pub handed: u64,
    /// Records settled, per [`Fate`] (indexed as [`Fate::ALL`]).
    pub settled: [u64; Fate::ALL.len()],
    /// Records handed over and not settled yet.
    pub held: u64,
}

impl SourceLedger {
    pub fn new(source: &str) -> SourceLedger {
        SourceLedger { source: source.to_string(), ..Default::default() }
    }

    /// A record handed over and kept (batched): held until settled.
    #[inline]
    pub fn kept(&mut self) {
        self.handed += 1;
        self.held += 1;
    }

    /// A record handed over and dropped at once (rate limit).
    #[inline]
    pub fn dropped_at_once(&mut self, reason: DropReason) {
        self.handed += 1;
        self.settled[Fate::Dropped(reason).index()] += 1;
    }

    /// `n` held records settled as `fate`.
    pub fn settle(&mut self, n: u64, fate: Fate) {
        debug_assert!(self.held >= n, "{}: settling {n} of {} held", self.source, self.held);
        self.held = self.held.saturating_sub(n);
        self.settled[fate.index()] += n;
    }

    /// Records settled as `fate`.
    pub fn count(&self, fate: Fate) -> u64 {
        self.settled[fate.index()]
    }

    /// Whether `handed = Σ settled + held`.
    pub fn balances(&self) -> bool {
        self.handed == self.settled.iter().sum::<u64>() + self.held
    }

    /// One line for the log: `handed N = delivered N + ... + held N` (fates that are 0 left
    /// out).
    pub fn summary(&self) -> String {
        let mut s = format!("handed {} =", self.handed);
        for fate in Fate::ALL {
            let n = self.count(fate);
            if n > 0 {
                s.push_str(&format!(" {} {n} +", fate.label()));
            }
        }
        s.push_str(&format!(" held {}", self.held));
        s
    }
}

/// Renders every core's ledger: (core label, its sources' ledgers).
pub fn render(cores: &[(String, &[SourceLedger])], out: &mut Exposition) {
    let handed = "shipper_source_records_handed_total";
    out.family(handed, "counter", "Records a source handed to the pipeline.");
    for (core, ledgers) in cores {
        for l in *ledgers {
            out.sample(handed, &[("core", core), ("source", &l.source)], l.handed as f64);
        }
    }
    let settled = "shipper_source_records_settled_total";
    out.family(settled, "counter", "Records settled, by fate (handed = settled + held).");
    for (core, ledgers) in cores {
        for l in *ledgers {
            for fate in Fate::ALL {
                let labels =
                    [("core", core.as_str()), ("source", &l.source), ("fate", fate.label())];
                out.sample(settled, &labels, l.count(fate) as f64);
            }
        }
    }
    let held = "shipper_source_records_held";
    out.family(held, "gauge", "Records handed over and not settled yet.");
    for (core, ledgers) in cores {
        for l in *ledgers {
            out.sample(held, &[("core", core), ("source", &l.source)], l.held as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fate_has_its_own_slot_and_label() {
        let mut seen = std::collections::HashSet::new();
        for (i, fate) in Fate::ALL.into_iter().enumerate() {
            assert_eq!(fate.index(), i);
            assert!(seen.insert(fate.label()), "{} twice", fate.label());
        }
    }

    #[test]
    fn handed_equals_settled_plus_held() {
        let mut l = SourceLedger::new("/run/app.pipe");
        for _ in 0..5 {
            l.kept();
        }
        l.dropped_at_once(DropReason::RateLimit);
        l.settle(3, Fate::Delivered);
        assert!(l.balances());
        assert_eq!((l.handed, l.held, l.count(Fate::Delivered)), (6, 2, 3));
        assert_eq!(l.summary(), "handed 6 = delivered 3 + ratelimit 1 + held 2");
        l.settle(2, Fate::Buffered);
        assert!(l.balances() && l.held == 0);
    }
}
