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

/// Appends `n` lines (newline-terminated) of about `line_bytes` bytes for `services` services.
pub fn lines(seed: u64, n: usize, line_bytes: usize, services: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let r = rng.next();
        let start = out.len();
        let _ = write!(
            out,
            r#"{{"ts":"2026-11-21T12:{:02}:{:02}.{:06}Z","level":"{}","service":"svc-{:02}","host":"edge-{}.ams","msg":"GET {}/{} {} in {}ms","req":{{"id":"{:016x}","ua":"{}","bytes":{}}}"#,
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 1_000_000,
            if r.is_multiple_of(50) { "error" } else { "info" },
            (r >> 8) as usize % services.max(1),
            r % 300,
            PATHS[(r >> 16) as usize % PATHS.len()],
            i,
            if r.is_multiple_of(50) { 500 } else { 200 },
            (r >> 24) % 900,
            rng.next(),
            AGENTS[(r >> 32) as usize % AGENTS.len()],
            (r >> 40) % 100_000,
        );
        // A 32-hex trace id, then a free-text note padding the line to its target size.
        let _ = write!(out, r#","trace":"{:016x}{:016x}","note":""#, rng.next(), rng.next());
        let used = out.len() - start;
        let mut left = line_bytes.saturating_sub(used + 3);
        while left > 0 {
            let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            let take = word.len().min(left);
            out.extend_from_slice(&word.as_bytes()[..take]);
            left -= take;
        }
        out.extend_from_slice(b"\"}\n");
    }
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
