//! A source's ledger (handed = settled by fate + held) as the tests read it: from the log line
//! each worker writes at exit, and from a scrape, checked to balance.

use std::collections::BTreeMap;
use std::path::Path;

use super::scrape_ok;

/// The ledger of `source` as the shipper logged it at exit: `handed`, each fate, `held`.
pub fn exit_ledger(log: &str, source: &Path) -> BTreeMap<String, u64> {
    let source = source.display().to_string();
    let line = log
        .lines()
        .find(|l| l.contains("ledger at exit:") && l.contains(&source))
        .unwrap_or_else(|| panic!("no ledger at exit for {source} in:\n{log}"));
    let sum = line.split("ledger at exit: ").nth(1).unwrap();
    let mut fields = BTreeMap::new();
    for part in sum.split([' ', '=', '+']).filter(|p| !p.is_empty()).collect::<Vec<_>>().chunks(2) {
        let n = part[1].trim_end_matches(|c: char| !c.is_ascii_digit());
        if let Ok(n) = n.parse() {
            fields.insert(part[0].to_string(), n);
        }
    }
    fields
}

/// The ledger of `source` scraped from `port`: `handed`, every fate, `held`.
pub fn scraped_ledger(port: u16, source: &Path) -> BTreeMap<String, u64> {
    let text = scrape_ok(port);
    let rows = shipper::metrics::status::ledger(&text);
    let source = source.display().to_string();
    let mut fields = BTreeMap::new();
    for ((_, s), row) in rows.into_iter().filter(|((_, s), _)| *s == source) {
        assert!(row.balances(), "{s}: handed = settled + held does not hold: {row:?}");
        *fields.entry("handed".to_string()).or_default() += row.handed as u64;
        *fields.entry("held".to_string()).or_default() += row.held as u64;
        for (fate, n) in row.settled {
            *fields.entry(fate).or_default() += n as u64;
        }
    }
    assert!(fields.contains_key("handed"), "no ledger for {source}");
    fields
}
