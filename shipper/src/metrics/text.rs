//! A small writer for the Prometheus text exposition format.

use std::fmt::Write;

use hdrhistogram::Histogram;

/// Quantiles exposed for every distribution.
pub const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// Escapes a label value (`\`, `"` and newlines).
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Exposition {
    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample with `labels` (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A summary from a distribution, values scaled by `scale` (e.g. µs → s with 1e-6).
    pub fn summary(&mut self, name: &str, labels: &[(&str, &str)], d: &Distribution, scale: f64) {
        let h = &d.hist;
        for q in QUANTILES {
            let qs = q.to_string();
            let mut with_q: Vec<(&str, &str)> = labels.to_vec();
            with_q.push(("quantile", &qs));
            let v = if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 * scale };
            self.sample(name, &with_q, v);
        }
        self.sample(&format!("{name}_sum"), labels, d.sum as f64 * scale);
        self.sample(&format!("{name}_count"), labels, h.len() as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A distribution: an hdrhistogram (2 significant digits, values 1..=`max`) and the exact sum
/// of what was recorded, so a scrape never walks the buckets to add them up.
#[derive(Clone, Debug)]
pub struct Distribution {
    pub hist: Histogram<u64>,
    pub sum: u64,
}

impl Distribution {
    pub fn new(max: u64) -> Distribution {
        let hist = Histogram::new_with_bounds(1, max, 2).expect("valid histogram bounds");
        Distribution { hist, sum: 0 }
    }

    /// Records `v`, clamped into the histogram's range.
    #[inline]
    pub fn record(&mut self, v: u64) {
        let v = v.clamp(1, self.hist.high());
        self.hist.record(v).expect("clamped into range");
        self.sum += v;
    }
}

/// Sum of the samples of `name` in exposition `text` whose labels include all of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n == name && labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))) {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_and_summaries() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "Things.").sample(
            "x_total",
            &[("core", "0"), ("s", "a\"b")],
            3.0,
        );
        let mut h = Distribution::new(1000);
        h.record(10);
        h.record(20);
        e.summary("lat_seconds", &[("core", "1")], &h, 1.0);
        let text = e.finish();
        assert!(
            text.contains("# TYPE x_total counter\nx_total{core=\"0\",s=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds{core=\"1\",quantile=\"1\"} 20\n"), "{text}");
        assert!(text.contains("lat_seconds_count{core=\"1\"} 2\n"), "{text}");
        assert!(text.contains("lat_seconds_sum{core=\"1\"} 30\n"), "{text}");
    }
}
