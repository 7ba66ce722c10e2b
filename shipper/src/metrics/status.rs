//! `shipper status`: the ledger of a running shipper, read from its metrics endpoint, one row
//! per core and source, with the check `handed = Σ settled + held`.
//!
//! # Operation
//! One `GET /metrics` ([`super::http::fetch`]), then the three
//! ledger families ([`super::ledger`]) are read out of the text: a sample whose name or labels
//! do not parse is skipped. The table goes to standard output; a row that does not balance is
//! marked `MISMATCH` (it would mean a bug: a record settled twice, or by no path).

use std::collections::BTreeMap;

use super::ledger::Fate;

/// One core's ledger of one source, as scraped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub handed: f64,
    /// Per fate label.
    pub settled: BTreeMap<String, f64>,
    pub held: f64,
}

impl Row {
    pub fn balances(&self) -> bool {
        self.handed == self.settled.values().sum::<f64>() + self.held
    }
}

/// The ledger rows in an exposition, by (core, source).
pub fn ledger(text: &str) -> BTreeMap<(u32, String), Row> {
    let mut rows: BTreeMap<(u32, String), Row> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = sample(line) else { continue };
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (Some(core), Some(source)) = (label("core"), label("source")) else { continue };
        let Ok(core) = core.parse() else { continue };
        let fate = label("fate");
        let ours = ["shipper_source_records_handed_total", "shipper_source_records_held"];
        let settled = name == "shipper_source_records_settled_total" && fate.is_some();
        if !settled && !ours.contains(&name) {
            continue;
        }
        let row = rows.entry((core, source)).or_default();
        match (name, fate) {
            ("shipper_source_records_handed_total", _) => row.handed = value,
            ("shipper_source_records_held", _) => row.held = value,
            (_, Some(fate)) => {
                row.settled.insert(fate, value);
            }
            _ => {}
        }
    }
    rows
}

/// A sample's labels: (name, value) pairs, values unescaped.
type Labels = Vec<(String, String)>;

/// `name{k="v",...} value` → (name, labels, value).
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, Vec::new(), value.trim().parse().ok()?));
        }
    };
    let mut labels = Vec::new();
    let mut chars = rest.char_indices();
    loop {
        let (start, c) = chars.next()?;
        if c == '}' {
            let value = rest[start + 1..].trim().parse().ok()?;
            return Some((name, labels, value));
        }
        if c == ',' {
            continue;
        }
        let eq = rest[start..].find("=\"")? + start;
        let key = rest[start..eq].to_string();
        for _ in start..eq + 1 {
            chars.next();
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.push((key, value));
    }
}

/// The table `shipper status` prints.
pub fn table(rows: &BTreeMap<(u32, String), Row>) -> String {
    let mut out = format!("{:<5} {:<40} {:>12} ", "core", "source", "handed");
    for fate in Fate::ALL {
        out.push_str(&format!("{:>12} ", fate.label()));
    }
    out.push_str(&format!("{:>12}  check\n", "held"));
    for ((core, source), row) in rows {
        out.push_str(&format!("{core:<5} {source:<40} {:>12} ", row.handed));
        for fate in Fate::ALL {
            let n = row.settled.get(fate.label()).copied().unwrap_or(0.0);
            out.push_str(&format!("{n:>12} "));
        }
        let check = if row.balances() { "ok" } else { "MISMATCH" };
        out.push_str(&format!("{:>12}  {check}\n", row.held));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ledger::{render, SourceLedger};
    use crate::metrics::Exposition;
    use crate::transforms::services::DropReason;

    // Guards `shipper status` reading what the shipper writes: a source whose name needs
    // escaping, every fate, and the balance check.
    #[test]
    fn reads_back_the_ledger_it_renders() {
        let mut a = SourceLedger::new("/run/a \"quoted\" \\ pipe");
        for _ in 0..10 {
            a.kept();
        }
        a.dropped_at_once(DropReason::RateLimit);
        a.settle(6, Fate::Delivered);
        a.settle(1, Fate::Buffered);
        let b = SourceLedger::new("udp");
        let mut out = Exposition::default();
        render(&[("0".into(), &[a.clone()][..]), ("1".into(), &[b][..])], &mut out);
        let rows = ledger(&out.finish());
        assert_eq!(rows.len(), 2);
        let row = &rows[&(0, a.source.clone())];
        assert_eq!((row.handed, row.held), (11.0, 3.0));
        assert_eq!(row.settled["delivered"], 6.0);
        assert_eq!(row.settled["ratelimit"], 1.0);
        assert_eq!(row.settled.len(), Fate::ALL.len());
        assert!(row.balances());
        let mut broken = row.clone();
        broken.held = 2.0;
        assert!(!broken.balances());
        assert!(table(&rows).contains("ok\n") && !table(&rows).contains("MISMATCH"));
    }
}
