//! Deterministic load: structured JSON log lines, like an application's access log (pipe
//! cases), syslog datagrams from a host's daemons (UDP cases), journal export entries, and
//! the writers and the sender that deliver them.

use testkit::rng::XorShift64Star as Rng;

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
    /// Seconds from the writer's start to its last write's return.
    pub secs: f64,
    /// The writing thread's scheduler account at its end (`/proc/thread-self/schedstat`):
    /// seconds on a CPU, seconds runnable but waiting for one, times it was run.
    pub sched_s: [f64; 3],
}

/// Writes `data` (whole lines) into the FIFO at `path` with blocking writes, paced by `pace`.
pub fn write_lines(path: &std::path::Path, data: &[u8], pace: Pace) -> std::io::Result<Written> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut written = write_paced(data, pace, || u64::MAX, |bytes, _| f.write_all(bytes))?;
    written.sched_s = thread_sched_s(std::path::Path::new("/proc/thread-self/schedstat"));
    Ok(written)
}

/// A `schedstat` file: seconds on a CPU, seconds runnable but waiting for one, times run.
pub fn thread_sched_s(path: &std::path::Path) -> [f64; 3] {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let mut f = stat.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0) as f64);
    let mut next = || f.next().unwrap_or(0.0);
    [next() / 1e9, next() / 1e9, next()]
}

/// Appends `data` (whole lines) to the file at `path` (created), paced by `pace`, as an
/// application logging to a file does; after every `rotate_lines` lines (0: never) renames
/// the file to `PATH.N` (N = 1, 2, ...: names never reused, nothing deleted) and creates a
/// new one at `path`, as logrotate's `create` does. A write never spans a rotation.
pub fn append_lines(
    path: &std::path::Path,
    data: &[u8],
    pace: Pace,
    rotate_lines: u64,
) -> std::io::Result<Written> {
    use std::io::Write;
    let open = || std::fs::OpenOptions::new().append(true).create(true).open(path);
    let (mut f, mut in_file, mut rotations) = (open()?, 0u64, 0u64);
    let room = std::cell::Cell::new(if rotate_lines == 0 { u64::MAX } else { rotate_lines });
    write_paced(
        data,
        pace,
        || room.get(),
        |bytes, lines| {
            f.write_all(bytes)?;
            in_file += lines;
            if rotate_lines > 0 && in_file >= rotate_lines {
                rotations += 1;
                let mut to = path.as_os_str().to_owned();
                to.push(format!(".{rotations}"));
                std::fs::rename(path, to)?;
                (f, in_file) = (open()?, 0);
            }
            if rotate_lines > 0 {
                room.set(rotate_lines - in_file);
            }
            Ok(())
        },
    )
}

/// Writes `data` (whole lines) with `write(bytes, lines)`, paced by `pace`, each write at most
/// `room()` lines.
fn write_paced(
    data: &[u8],
    pace: Pace,
    room: impl Fn() -> u64,
    mut write: impl FnMut(&[u8], u64) -> std::io::Result<()>,
) -> std::io::Result<Written> {
    use std::time::{Duration, Instant};
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
        let (end, n) = next_write(data, at, pace, due.min(room()));
        let t = Instant::now();
        write(&data[at..end], n)?;
        w.write_block_max_s = w.write_block_max_s.max(t.elapsed().as_secs_f64());
        w.writes += 1;
        at = end;
        sent_lines += n;
    }
    w.secs = start.elapsed().as_secs_f64();
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
/// identifier, unit, priority, pid, host, transport and a message, on one boot. Of every
/// 1,000 entries, `large_per_mille` carry instead a [`large_message`] (a stack trace with
/// binary bytes, as a crashing service logs).
pub fn journal_export(seed: u64, first: usize, n: usize, large_per_mille: u64, out: &mut Vec<u8>) {
    use std::io::Write;
    const IDENTS: [&str; 6] = ["nginx", "sshd", "cron", "kernel", "haproxy", "systemd"];
    let mut rng = Rng::new(seed ^ first as u64);
    for i in first..first + n {
        let r = rng.next();
        let ident = IDENTS[(r % IDENTS.len() as u64) as usize];
        if (r >> 40) % 1000 < large_per_mille {
            large_entry(i, ident, r, out);
            continue;
        }
        export_header(i, ident, r % 8, r, out);
        let _ = write!(
            out,
            "MESSAGE={} {}/{} {} in {} ms\n\n",
            if r.is_multiple_of(50) { "error" } else { "served" },
            PATHS[(r >> 16) as usize % PATHS.len()],
            i,
            (r >> 24) % 500,
            (r >> 32) % 900,
        );
    }
}

/// The fields before MESSAGE of entry `i` of [`journal_export`], in the export format.
fn export_header(i: usize, ident: &str, priority: u64, r: u64, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(
        out,
        "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID=0123456789abcdef0123456789abcdef\n\
         SYSLOG_IDENTIFIER={ident}\n_SYSTEMD_UNIT={ident}.service\nPRIORITY={priority}\n_PID={}\n\
         _HOSTNAME=edge-12.ams\n_TRANSPORT=journal\n",
        1_700_000_000_000_000u64 + i as u64 * 10,
        1_000_000 + i as u64 * 10,
        1000 + (r >> 8) % 300,
    );
}

/// Appends entry `i` of [`journal_export`] with a [`large_message`], in the export format's
/// binary field form (name, newline, little-endian 64-bit length, bytes, newline).
fn large_entry(i: usize, ident: &str, r: u64, out: &mut Vec<u8>) {
    export_header(i, ident, 3, r, out);
    out.extend_from_slice(b"MESSAGE\n");
    let message = large_message(i, r);
    out.extend_from_slice(&(message.len() as u64).to_le_bytes());
    out.extend_from_slice(&message);
    out.extend_from_slice(b"\n\n");
}

/// About 2 KiB over 24 lines: a panic and its backtrace, frame addresses differing per entry,
/// one line with bytes that are not UTF-8 and control characters (a dumped buffer).
pub fn large_message(i: usize, r: u64) -> Vec<u8> {
    use std::io::Write;
    let mut m = Vec::with_capacity(2200);
    let _ =
        write!(m, "thread 'worker-{}' panicked at src/handler.rs:{}:9: entry {i}", r % 8, r % 700);
    for frame in 0..22u64 {
        let addr = 0x5555_0000_0000u64 + (r.rotate_left(frame as u32) & 0xff_ffff);
        let _ = write!(
            m,
            "\n  {frame:>2}: 0x{addr:012x} - edge::handler::Service::dispatch_request_{frame}\n             at src/handler.rs:{}",
            (r >> frame) % 900
        );
    }
    m.extend_from_slice(b"\n  buffer: \x00\x01\x1b[31m\xff\xfe\xc3\x28 \t end");
    m
}

/// Syntax of [`syslog_datagrams`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyslogSyntax {
    /// `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG`.
    Rfc5424,
    /// `<PRI>Mmm dd hh:mm:ss HOST TAG[PID]: MSG`, as most daemons still send.
    Rfc3164,
}

/// What a UDP case's datagrams look like (the `[workload]` table of its case.toml sets these).
#[derive(Clone, Debug)]
pub struct SyslogShape {
    pub seed: u64,
    pub syntax: SyslogSyntax,
    /// Cumulative weights over the first apps of [`APPS`] ([`service_weights`]: Zipf).
    pub apps_cdf: Vec<f64>,
}

/// The apps of a busy edge host, most frequent first: (APP-NAME or TAG, facility).
pub const APPS: [(&str, u8); 16] = [
    ("nginx", 23),       // local7
    ("app-api", 16),     // local0
    ("haproxy", 18),     // local2
    ("kubelet", 3),      // daemon
    ("sshd", 10),        // authpriv
    ("postgres", 17),    // local1
    ("kernel", 0),       // kern
    ("postfix/smtp", 2), // mail
    ("containerd", 3),   // daemon
    ("systemd", 3),      // daemon
    ("CRON", 9),         // cron
    ("sudo", 10),        // authpriv
    ("app-worker", 16),  // local0
    ("redis-server", 3), // daemon
    ("named", 3),        // daemon
    ("chronyd", 3),      // daemon
];

/// Appends `n` syslog datagrams to `out` and the end offset of each to `ends`: the apps of
/// [`APPS`] drawn from the shape's weights, each with its own kind of message (access logs,
/// logins, queries, firewall drops, mail deliveries, ...) with varying addresses, paths,
/// agents and durations; about 2% at severity `err`. Deterministic from the shape's seed.
pub fn syslog_datagrams(shape: &SyslogShape, n: usize, out: &mut Vec<u8>, ends: &mut Vec<usize>) {
    use std::io::Write;
    let mut rng = Rng::new(shape.seed ^ 0x5359_534c_4f47); // "SYSLOG"
    for i in 0..n {
        let r = rng.next();
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let app = shape.apps_cdf.iter().position(|&c| u < c).unwrap_or(0);
        let (name, facility) = APPS[app % APPS.len()];
        let error = r.is_multiple_of(50);
        let severity = if error {
            3
        } else if r.is_multiple_of(7) {
            5
        } else {
            6
        };
        let pri = facility as u32 * 8 + severity;
        let (mm, ss, us) = (i / 60_000 % 60, i / 1000 % 60, r % 1_000_000);
        let host = (r >> 8) % 24;
        let pid = 1000 + (r >> 12) % 30_000;
        match shape.syntax {
            SyslogSyntax::Rfc5424 => {
                let (msgid, sd) = match app {
                    0 => ("access", String::new()),
                    1 | 12 => (
                        "req",
                        format!(
                            "[req@32473 id=\"{:016x}\" method=\"{}\" status=\"{}\"]",
                            rng.next(),
                            if r.is_multiple_of(5) { "POST" } else { "GET" },
                            if error { 500 } else { 200 }
                        ),
                    ),
                    _ => ("-", String::new()),
                };
                let sd = if sd.is_empty() { "-" } else { &sd };
                let _ = write!(
                    out,
                    "<{pri}>1 2026-11-21T12:{mm:02}:{ss:02}.{us:06}Z edge-{host:02}.ams {name} \
                     {pid} {msgid} {sd} "
                );
            }
            SyslogSyntax::Rfc3164 => {
                let _ = write!(out, "<{pri}>Nov 21 12:{mm:02}:{ss:02} edge-{host:02} {name}");
                if app != 6 {
                    let _ = write!(out, "[{pid}]");
                }
                out.extend_from_slice(b": ");
            }
        }
        syslog_message(app, i, r, error, &mut rng, out);
        ends.push(out.len());
    }
}

/// The MSG part of one datagram of app `app` ([`APPS`]): a service answering requests, or one
/// of the host's own daemons.
fn syslog_message(app: usize, i: usize, r: u64, error: bool, rng: &mut Rng, out: &mut Vec<u8>) {
    match app {
        0 | 1 | 2 | 5 | 12 | 14 => request_message(app, i, r, error, rng, out),
        4 | 6 | 7 | 11 => auth_message(app, r, error, rng, out),
        _ => daemon_message(app, i, r, error, rng, out),
    }
}

/// An IPv4 address drawn from `x`.
fn ip(x: u64) -> String {
    format!("{}.{}.{}.{}", 10 + x % 190, (x >> 8) % 256, (x >> 16) % 256, 1 + (x >> 24) % 254)
}

/// nginx, app-api, haproxy, postgres, app-worker, named.
fn request_message(app: usize, i: usize, r: u64, error: bool, rng: &mut Rng, out: &mut Vec<u8>) {
    use std::io::Write;
    let path = PATHS[(r >> 16) as usize % PATHS.len()];
    let agent = AGENTS[(r >> 32) as usize % AGENTS.len()];
    let (ms, bytes, status) = ((r >> 24) % 900, (r >> 40) % 100_000, if error { 502 } else { 200 });
    let _ = match app {
        0 => write!(
            out,
            "{} - - [21/Nov/2026:12:{:02}:{:02} +0000] \"GET {path}/{i}?page={} HTTP/1.1\" \
             {status} {bytes} \"-\" \"{agent}\" rt=0.{ms:03} upstream=10.0.1.{}:8080",
            ip(rng.next()),
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 20,
            r % 12,
        ),
        1 => write!(
            out,
            "{} {path}/{i} in {ms} ms, {bytes} bytes",
            if error { "failed" } else { "served" }
        ),
        12 => write!(
            out,
            "job {:016x} queue={} attempt={} {} in {ms} ms",
            rng.next(),
            ["mail", "thumbnails", "billing", "export"][r as usize % 4],
            1 + r % 3,
            if error { "failed: upstream timeout" } else { "done" }
        ),
        2 => write!(
            out,
            "{}:{} [21/Nov/2026:12:{:02}:{:02}.{:03}] fe_https~ be_api/api-{} 0/0/1/{ms}/{} \
             {status} {bytes} - - ---- {}/{}/0/0/0 0/0 \"GET {path} HTTP/1.1\"",
            ip(rng.next()),
            1024 + (r >> 4) % 60_000,
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 1000,
            r % 8,
            ms + 1,
            r % 300,
            r % 120,
        ),
        5 => write!(
            out,
            "[{}] LOG:  duration: {ms}.{:03} ms  statement: SELECT id, name, price FROM items \
             WHERE id = {i} AND tenant = {}",
            r % 100_000,
            r % 1000,
            r % 40,
        ),
        _ => write!(
            out,
            "client @0x{:012x} {}#{} (api.example.com): query: api.example.com IN A +E(0) \
             (10.0.0.53)",
            rng.next() & 0xffff_ffff_ffff,
            ip(rng.next()),
            1024 + (r >> 4) % 60_000
        ),
    };
}

/// sshd, the kernel's firewall, postfix, sudo: the host's security and mail logs.
fn auth_message(app: usize, r: u64, error: bool, rng: &mut Rng, out: &mut Vec<u8>) {
    use std::io::Write;
    let ms = (r >> 24) % 900;
    let _ = match app {
        4 if error => write!(
            out,
            "Failed password for invalid user admin from {} port {} ssh2",
            ip(rng.next()),
            1024 + (r >> 4) % 60_000
        ),
        4 => write!(
            out,
            "Accepted publickey for deploy from {} port {} ssh2: ED25519 SHA256:{:016x}{:016x}",
            ip(rng.next()),
            1024 + (r >> 4) % 60_000,
            rng.next(),
            rng.next()
        ),
        6 => write!(
            out,
            "[UFW BLOCK] IN=eth0 OUT= MAC=52:54:00:12:34:56:52:54:00:65:43:21:08:00 SRC={} \
             DST=10.0.0.12 LEN=60 TOS=0x00 PREC=0x00 TTL=52 ID={} DF PROTO=TCP SPT={} DPT=22 \
             WINDOW=64240 RES=0x00 SYN URGP=0",
            ip(rng.next()),
            r % 65_536,
            1024 + (r >> 4) % 60_000,
        ),
        7 => write!(
            out,
            "{:010X}: to=<ops{}@example.com>, relay=mx{}.example.net[{}]:25, delay=0.{ms:03}, \
             delays=0.1/0/0.2/0.1, dsn=2.0.0, status=sent (250 2.0.0 OK)",
            rng.next() & 0xff_ffff_ffff,
            r % 50,
            r % 3,
            ip(rng.next()),
        ),
        _ => write!(
            out,
            "deploy : TTY=pts/{} ; PWD=/home/deploy ; USER=root ; COMMAND=/usr/bin/systemctl \
             restart nginx.service",
            r % 4
        ),
    };
}

/// kubelet, containerd, systemd, cron, redis, chronyd.
fn daemon_message(app: usize, i: usize, r: u64, error: bool, rng: &mut Rng, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = match app {
        3 => write!(
            out,
            "I1121 12:{:02}:{:02}.{:06} {} kubelet.go:{}] \"SyncLoop (PLEG): event for pod\" \
             pod=\"default/api-{:08x}\" event={{\"ID\":\"{:016x}\",\"Type\":\"ContainerStarted\"}}",
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 1_000_000,
            900 + r % 90,
            2400 + r % 60,
            rng.next() as u32,
            rng.next(),
        ),
        8 => write!(
            out,
            "time=\"2026-11-21T12:{:02}:{:02}.{:09}Z\" level=info msg=\"shim disconnected\" \
             id={:016x}{:016x} namespace=k8s.io",
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 1_000_000_000,
            rng.next(),
            rng.next(),
        ),
        9 => {
            let session = r % 5000;
            write!(out, "Started session-{session}.scope - Session {session} of User deploy.")
        }
        10 => write!(
            out,
            "(root) CMD (/usr/local/bin/backup.sh --target s3://backups/edge-{} --quiet)",
            r % 24
        ),
        13 => write!(
            out,
            "{}:M 21 Nov 2026 12:{:02}:{:02}.{:03} * Background saving started by pid {}",
            r % 100,
            i / 60_000 % 60,
            i / 1000 % 60,
            r % 1000,
            r % 30_000
        ),
        _ => write!(
            out,
            "Selected source 192.0.2.{} (2.debian.pool.ntp.org), offset {}.{:06} seconds",
            r % 254 + 1,
            if error { "-0" } else { "+0" },
            r % 1_000_000
        ),
    };
}

/// Datagrams per `sendmmsg` call of [`send_datagrams`]: at 100 k/s a batch is 0.3 ms of
/// traffic, small beside any receive queue.
pub const SEND_BATCH: usize = 32;

/// What the sender of a UDP case saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub datagrams: u64,
    pub bytes: u64,
    /// First to last `sendmmsg`, in seconds.
    pub send_s: f64,
    /// At a fixed rate: the most datagrams that were due but not yet sent at any moment (a
    /// sender that cannot keep its rate shows here, and the run's rate is then lower).
    pub behind_max: u64,
    pub calls: u64,
    /// CPU-seconds of the sending thread (scheduler run time): its syscalls and, on
    /// loopback, the kernel's receive path (and its drops) run in its softirq.
    pub cpu_s: f64,
}

/// CPU-seconds the calling thread has run (`/proc/thread-self/schedstat`, nanoseconds).
fn thread_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) as f64 / 1e9
}

/// Sends the datagrams of `data` (datagram `k` ends at `ends[k]`, starts at the previous end)
/// to `to` from one connected UDP socket with `sendmmsg`, at most [`SEND_BATCH`] per call,
/// paced to `rate` datagrams per second (only those due by now; 0: as fast as possible);
/// `progress` counts the datagrams sent.
pub fn send_datagrams(
    to: std::net::SocketAddr,
    data: &[u8],
    ends: &[usize],
    rate: f64,
    progress: &std::sync::atomic::AtomicU64,
) -> std::io::Result<Sent> {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(to)?;
    // SAFETY: plain C structs; every pointer is set below before use.
    let mut iov: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; SEND_BATCH];
    let mut hdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; SEND_BATCH];
    let mut s = Sent::default();
    let (n, start, cpu0) = (ends.len() as u64, Instant::now(), thread_cpu_s());
    while s.datagrams < n {
        let due = if rate > 0.0 {
            let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(n);
            if due <= s.datagrams {
                let next = Duration::from_secs_f64((s.datagrams + 1) as f64 / rate);
                std::thread::sleep(next.saturating_sub(start.elapsed()).min(ms(1)));
                continue;
            }
            s.behind_max = s.behind_max.max(due - s.datagrams);
            due
        } else {
            n
        };
        let k = (due - s.datagrams).min(SEND_BATCH as u64) as usize;
        for j in 0..k {
            let d = s.datagrams as usize + j;
            let from = if d == 0 { 0 } else { ends[d - 1] };
            iov[j] = libc::iovec {
                iov_base: data[from..].as_ptr() as *mut libc::c_void,
                iov_len: ends[d] - from,
            };
            hdr[j].msg_hdr.msg_iov = &mut iov[j];
            hdr[j].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdr[..k]` point at `iov[..k]`, which point into `data`; all outlive the call.
        let rc = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdr.as_mut_ptr(), k as u32, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let sent = rc as usize;
        let first = s.datagrams as usize;
        let from = if first == 0 { 0 } else { ends[first - 1] };
        s.bytes += (ends[first + sent - 1] - from) as u64;
        s.datagrams += sent as u64;
        s.calls += 1;
        progress.store(s.datagrams, std::sync::atomic::Ordering::Relaxed);
    }
    s.send_s = start.elapsed().as_secs_f64();
    s.cpu_s = thread_cpu_s() - cpu0;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shipper::transforms::syslog::{self, Syntax};

    /// Guards the file-tail case's rotating writer: a rotation every 3 lines renames the file
    /// to PATH.1, PATH.2, ... holding exactly 3 lines each, the rest at PATH, none lost.
    #[test]
    fn append_lines_rotates_every_n_lines_under_new_names() {
        let dir = std::env::temp_dir().join(format!("loadgen-append-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.log");
        let data: Vec<u8> = (0..7).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        let pace = Pace { rate: 0.0, write_per_line: false, chunk_bytes: 64 << 10 };
        append_lines(&path, &data, pace, 3).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("app.log.1"), "line 0\nline 1\nline 2\n");
        assert_eq!(read("app.log.2"), "line 3\nline 4\nline 5\n");
        assert_eq!(read("app.log"), "line 6\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guards the UDP case's workload: every datagram is valid syslog of its syntax, with the
    /// app it was drawn for, and the same seed gives the same bytes.
    #[test]
    fn syslog_datagrams_parse_with_their_app_and_are_deterministic() {
        for (syntax, parse_as) in
            [(SyslogSyntax::Rfc5424, Syntax::Rfc5424), (SyslogSyntax::Rfc3164, Syntax::Rfc3164)]
        {
            let shape =
                SyslogShape { seed: 7, syntax, apps_cdf: service_weights(APPS.len(), 1.0, 0.0) };
            let (mut data, mut ends) = (Vec::new(), Vec::new());
            syslog_datagrams(&shape, 5000, &mut data, &mut ends);
            let mut apps = std::collections::BTreeSet::new();
            let mut from = 0;
            for &end in &ends {
                let d = &data[from..end];
                let m = syslog::parse(d, parse_as)
                    .unwrap_or_else(|f| panic!("{f:?}: {}", String::from_utf8_lossy(d)));
                let app = m.app.expect("every datagram names its app");
                assert!(APPS.iter().any(|(a, _)| *a == app), "{app}");
                assert!(!m.message.is_empty(), "{}", String::from_utf8_lossy(d));
                apps.insert(app.to_string());
                from = end;
            }
            assert_eq!(apps.len(), APPS.len(), "every app sends something in 5000 datagrams");
            let (mut again, mut ends2) = (Vec::new(), Vec::new());
            syslog_datagrams(&shape, 5000, &mut again, &mut ends2);
            assert_eq!((data, ends), (again, ends2));
        }
    }
}
