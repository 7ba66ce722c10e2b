//! Deterministic structured JSON log lines, like an application's access log.

/// xorshift64*: fast, deterministic from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const PATHS: [&str; 6] =
    ["/api/v1/items", "/api/v1/users", "/static/app.js", "/", "/health", "/api/v2/search"];
const WORDS: [&str; 12] = [
    "cache ",
    "miss ",
    "upstream ",
    "retry ",
    "tls ",
    "handshake ",
    "ok ",
    "slow ",
    "origin ",
    "pool ",
    "warm ",
    "evicted ",
];
const AGENTS: [&str; 3] = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
    "curl/7.88.1",
    "Go-http-client/2.0",
];

/// Cumulative weights of `services` services: svc-00 takes `noisy_share` of the lines (when
/// it is above 0), the others share the rest with a Zipf skew of exponent `skew` (0: evenly).
pub fn service_weights(services: usize, skew: f64, noisy_share: f64) -> Vec<f64> {
    let n = services.max(1);
    let first = if noisy_share > 0.0 { 1 } else { 0 };
    let zipf: Vec<f64> = (first..n).map(|k| 1.0 / ((k - first + 1) as f64).powf(skew)).collect();
    let zsum: f64 = zipf.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let rest = if first == 1 { 1.0 - noisy_share } else { 1.0 };
    let mut weights = Vec::with_capacity(n);
    if first == 1 {
        weights.push(noisy_share);
    }
    weights.extend(zipf.iter().map(|z| z / zsum * rest));
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w;
            acc
        })
        .collect()
}

/// What a case's lines look like (the `[workload]` table of its case.toml sets these).
#[derive(Clone, Debug)]
pub struct Shape {
    pub seed: u64,
    /// Line sizes are log-uniform between these (bytes, newline included).
    pub line_bytes_min: usize,
    pub line_bytes_max: usize,
    /// Cumulative service weights ([`service_weights`]).
    pub services_cdf: Vec<f64>,
    /// Share of lines in the cfjs1 form (a `format` field naming a nested object).
    pub cfjs1_share: f64,
}

const FORMATS: [&str; 3] = ["cdn_access", "waf_event", "origin_fetch"];

/// Appends `n` newline-terminated JSON lines for writer `writer` (each writer has its own
/// deterministic stream): timestamp, level, service, host, message, a nested request object,
/// a trace id and a free-text note padding the line to a size drawn from the shape; a share of
/// them are cfjs1 records (`"format":"waf_event","waf_event":{...}`).
pub fn lines(shape: &Shape, writer: usize, n: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let mut rng = Rng::new(shape.seed ^ ((writer as u64 + 1) << 32));
    let (lo, hi) = (shape.line_bytes_min.max(1) as f64, shape.line_bytes_max.max(1) as f64);
    for i in 0..n {
        let r = rng.next();
        let unit = |x: u64| (x >> 11) as f64 / (1u64 << 53) as f64;
        let target = (lo * (hi / lo).powf(unit(rng.next()))) as usize;
        let u = unit(rng.next());
        let service = shape.services_cdf.iter().position(|&c| u < c).unwrap_or(0);
        let start = out.len();
        let _ = write!(
            out,
            r#"{{"ts":"2026-11-21T12:{:02}:{:02}.{:06}Z","level":"{}","service":"svc-{service:02}","#,
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 1_000_000,
            if r.is_multiple_of(50) { "error" } else { "info" },
        );
        if unit(rng.next()) < shape.cfjs1_share {
            let f = FORMATS[(r >> 4) as usize % FORMATS.len()];
            let _ = write!(
                out,
                r#""format":"{f}","{f}":{{"colo":"ams{}","seq":{i},"bytes":{},"cache":{{"status":"{}","age":{}}}}}"#,
                r % 9,
                (r >> 40) % 100_000,
                if r.is_multiple_of(3) { "miss" } else { "hit" },
                (r >> 20) % 3600,
            );
        } else {
            let _ = write!(
                out,
                r#""host":"edge-{}.ams","msg":"GET {}/{} {} in {}ms","req":{{"id":"{:016x}","ua":"{}","bytes":{}}}"#,
                r % 300,
                PATHS[(r >> 16) as usize % PATHS.len()],
                i,
                if r.is_multiple_of(50) { 500 } else { 200 },
                (r >> 24) % 900,
                rng.next(),
                AGENTS[(r >> 32) as usize % AGENTS.len()],
                (r >> 40) % 100_000,
            );
        }
        // A 32-hex trace id, then a free-text note padding the line to its target size.
        let _ = write!(out, r#","trace":"{:016x}{:016x}","note":""#, rng.next(), rng.next());
        let used = out.len() - start;
        let mut left = target.saturating_sub(used + 3);
        while left > 0 {
            let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            let take = word.len().min(left);
            out.extend_from_slice(&word.as_bytes()[..take]);
            left -= take;
        }
        out.extend_from_slice(b"\"}\n");
    }
}

/// How one writer writes its lines.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Lines per second for this writer; 0 = as fast as possible.
    pub rate: f64,
    /// One `write()` per line (like an application logging line by line); otherwise whole
    /// lines up to `chunk_bytes` per `write()`.
    pub write_per_line: bool,
    /// At most PIPE_BUF (4096) when writers share a pipe, so that lines never interleave.
    pub chunk_bytes: usize,
}

/// What one writer saw: its longest `write()` (a blocked writer is what the shipper must
/// never cause) and when it finished.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    pub write_block_max_s: f64,
    pub writes: u64,
}

/// Writes `data` (whole lines) into the FIFO at `path` with blocking writes, paced by `pace`.
pub fn write_lines(path: &std::path::Path, data: &[u8], pace: Pace) -> std::io::Result<Written> {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut w = Written::default();
    let start = Instant::now();
    let (mut at, mut sent_lines) = (0, 0u64);
    while at < data.len() {
        // The end of the next write: one line, or as many whole lines as fit in a chunk, and
        // at a fixed rate never more than the lines that are due by now.
        let due = if pace.rate > 0.0 {
            let due = (start.elapsed().as_secs_f64() * pace.rate) as u64 + 1;
            if due <= sent_lines {
                let next = Duration::from_secs_f64((sent_lines + 1) as f64 / pace.rate);
                std::thread::sleep(next.saturating_sub(start.elapsed()).min(ms(1)));
                continue;
            }
            due - sent_lines
        } else {
            u64::MAX
        };
        let (end, n) = next_write(data, at, pace, due);
        let t = Instant::now();
        f.write_all(&data[at..end])?;
        w.write_block_max_s = w.write_block_max_s.max(t.elapsed().as_secs_f64());
        w.writes += 1;
        at = end;
        sent_lines += n;
    }
    Ok(w)
}

fn ms(n: u64) -> std::time::Duration {
    std::time::Duration::from_millis(n)
}

/// End of the next write starting at `at`, and how many lines it holds (at most `due`).
fn next_write(data: &[u8], at: usize, pace: Pace, due: u64) -> (usize, u64) {
    let mut end = at;
    let mut n = 0;
    while end < data.len() && n < due {
        let nl = memchr::memchr(b'\n', &data[end..]).map_or(data.len(), |i| end + i + 1);
        if n > 0 && nl - at > pace.chunk_bytes {
            break;
        }
        end = nl;
        n += 1;
        if pace.write_per_line {
            break;
        }
    }
    (end, n)
}

/// Appends entries `first..first + n` in systemd's journal export format, like a busy edge server's journal:
/// identifier, unit, priority, pid, host, transport and a message, on one boot.
pub fn journal_export(seed: u64, first: usize, n: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    const IDENTS: [&str; 6] = ["nginx", "sshd", "cron", "kernel", "haproxy", "systemd"];
    let mut rng = Rng::new(seed ^ first as u64);
    for i in first..first + n {
        let r = rng.next();
        let ident = IDENTS[(r % IDENTS.len() as u64) as usize];
        let _ = write!(
            out,
            "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID=0123456789abcdef0123456789abcdef\n\
             SYSLOG_IDENTIFIER={ident}\n_SYSTEMD_UNIT={ident}.service\nPRIORITY={}\n_PID={}\n\
             _HOSTNAME=edge-12.ams\n_TRANSPORT=journal\nMESSAGE={} {}/{} {} in {} ms\n\n",
            1_700_000_000_000_000u64 + i as u64 * 10,
            1_000_000 + i as u64 * 10,
            r % 8,
            1000 + (r >> 8) % 300,
            if r.is_multiple_of(50) { "error" } else { "served" },
            PATHS[(r >> 16) as usize % PATHS.len()],
            i,
            (r >> 24) % 500,
            (r >> 32) % 900,
        );
    }
}
