//! The peers a pipe case runs beside the shipper, on the same FIFOs and the same lines:
//!
//! - `raw`: `socat -u PIPE:fifo TCP:sink` per FIFO, plain TCP into the counting sink. The
//!   cost of moving the bytes out of the pipe and onto a socket, nothing else: the floor.
//! - `syslog-ng` (Debian 12: 3.38): `pipe()` sources, `json-parser()`, `rate-limit()` keyed
//!   on the service when the case limits rates, a `network()` destination over mutual TLS 1.3
//!   into the counting sink, flow control on (so it slows its reads instead of dropping).
//! - `rsyslog` (Debian 12: 8.2302, unpacked from its .deb into `target/perf-peers/rsyslog`,
//!   because the package conflicts with syslog-ng's): it has no FIFO input, so one
//!   `socat -u PIPE:fifo TCP:imptcp` per FIFO bridges each pipe to an `imptcp` input (socat's CPU
//!   is counted with rsyslog's); `mmjsonparse` on the raw message, `omfwd` over mutual TLS
//!   (OpenSSL driver) into the counting sink. It has no per-key rate limit in this version.
//!
//! File-tailing cases ([`super::file_tail`]) give the same two their own file inputs:
//! syslog-ng's `file()` (one file) and `wildcard-file()` (a directory and a pattern), and
//! rsyslog's `imfile` (inotify mode), each with the same JSON parsing and TLS output.
//!
//! The peers encrypt like the shipper but neither compress nor wait for acknowledgements, and
//! the sink does less than `shipper receive`: all of that favours them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use testkit::process::{poll_alive, NotReady};

use crate::daemon::Daemon;

/// Where `cargo xtask setup` unpacks rsyslog.
pub fn rsyslog_root() -> PathBuf {
    crate::root().join("target/perf-peers/rsyslog")
}

fn rsyslogd() -> PathBuf {
    rsyslog_root().join("usr/sbin/rsyslogd")
}

fn rsyslog_modules() -> PathBuf {
    rsyslog_root().join("usr/lib/x86_64-linux-gnu/rsyslog")
}

/// Whether `peer` can run here, or why not.
pub fn available(peer: &str) -> Result<(), String> {
    let has = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match peer {
        "raw" if has("socat") => Ok(()),
        "raw" => Err("socat is not installed (cargo xtask setup installs it)".into()),
        "syslog-ng" if has("syslog-ng") => Ok(()),
        "syslog-ng" => Err(crate::setup::peer_reason("syslog-ng")
            .unwrap_or_else(|| "syslog-ng is not installed (cargo xtask setup)".into())),
        "rsyslog" if !has("socat") => Err("rsyslog needs socat as its FIFO bridge".into()),
        "rsyslog" if rsyslogd().exists() && rsyslog_modules().join("lmnsd_ossl.so").exists() => {
            Ok(())
        }
        "rsyslog" => Err(crate::setup::peer_reason("rsyslog").unwrap_or_else(|| {
            format!("{} is missing (cargo xtask setup unpacks it)", rsyslogd().display())
        })),
        other => Err(format!("unknown peer {other:?} (raw, syslog-ng or rsyslog)")),
    }
}

/// TLS files the peers present and trust (the dev PKI of the run).
pub struct Tls<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Starts one `socat` per FIFO into `port` on `cpus`.
pub fn socats(
    dir: &Path,
    fifos: &[PathBuf],
    port: u16,
    cpus: &[usize],
) -> anyhow::Result<Vec<(String, Daemon)>> {
    let mut out = Vec::new();
    for (i, f) in fifos.iter().enumerate() {
        let src = format!("PIPE:{}", f.display());
        let dst = format!("TCP:127.0.0.1:{port}");
        let log = dir.join(format!("socat{i}.log"));
        let d = Daemon::spawn(cpus, "socat", &["-u", "-b", "262144", &src, &dst], &log)?;
        out.push((format!("socat{i}"), d));
    }
    Ok(out)
}

/// Starts syslog-ng in the foreground reading `fifos` and sending to the sink at `port`.
pub fn syslog_ng(
    dir: &Path,
    fifos: &[PathBuf],
    port: u16,
    tls: &Tls,
    rate_limit: u64,
    cpus: &[usize],
) -> anyhow::Result<Daemon> {
    let sources: Vec<String> = fifos
        .iter()
        .map(|f| {
            format!(
                "pipe({:?} flags(no-parse) log-iw-size(100000) log-fetch-limit(1000))",
                f.display()
            )
        })
        .collect();
    start_syslog_ng(dir, &syslog_ng_conf(&sources, port, tls, rate_limit), cpus)
}

/// What a file-tailing peer follows: one file, or the files of a directory whose names match
/// a pattern (`*` and `?`).
pub enum Tail<'a> {
    File(&'a Path),
    Dir { dir: &'a Path, pattern: &'a str },
}

/// Starts syslog-ng following `tail` (`file()` or `wildcard-file()`, checked for growth every
/// `follow_s` seconds once at its end; new files in a directory found by inotify) and sending
/// to the sink at `port`.
pub fn syslog_ng_files(
    dir: &Path,
    tail: &Tail,
    follow_s: f64,
    port: u16,
    tls: &Tls,
    cpus: &[usize],
) -> anyhow::Result<Daemon> {
    let common = format!(
        "follow-freq({follow_s}) flags(no-parse) log-iw-size(100000) log-fetch-limit(1000)"
    );
    let source = match tail {
        Tail::File(f) => format!("file({:?} {common})", f.display()),
        Tail::Dir { dir, pattern } => format!(
            "wildcard-file(base-dir({:?}) filename-pattern({pattern:?}) recursive(no) \
             monitor-method(\"inotify\") max-files(1024) {common})",
            dir.display()
        ),
    };
    start_syslog_ng(dir, &syslog_ng_conf(&[source], port, tls, 0), cpus)
}

/// syslog-ng's configuration: `sources` (driver calls), `json-parser()`, `rate-limit()` keyed
/// on the service when `rate_limit` > 0, and a `network()` destination over mutual TLS 1.3
/// into the sink at `port`, flow control on.
fn syslog_ng_conf(sources: &[String], port: u16, tls: &Tls, rate_limit: u64) -> String {
    let mut conf = String::from(
        "@version: 3.38\n\
         options { threaded(yes); stats-freq(0); use-dns(no); use-fqdn(no); \
         keep-hostname(yes); chain-hostnames(no); log-msg-size(65536); };\n",
    );
    for (i, s) in sources.iter().enumerate() {
        conf += &format!("source s{i} {{ {s}; }};\n");
    }
    conf += "parser p_json { json-parser(prefix(\".json.\")); };\n";
    if rate_limit > 0 {
        conf += &format!(
            "filter f_rate {{ rate-limit(template(\"${{.json.service}}\") rate({rate_limit})); }};\n"
        );
    }
    conf += &format!(
        "destination d_sink {{ network(\"127.0.0.1\" port({port}) transport(tls) \
         tls(ca-file({:?}) cert-file({:?}) key-file({:?}) peer-verify(required-trusted)) \
         template(\"${{MSG}}\\n\") log-fifo-size(100000)); }};\n",
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    );
    let sources: String = (0..sources.len()).map(|i| format!("source(s{i}); ")).collect();
    let filter = if rate_limit > 0 { "filter(f_rate); " } else { "" };
    conf += &format!(
        "log {{ {sources}parser(p_json); {filter}destination(d_sink); flags(flow-control); }};\n"
    );
    conf
}

/// Writes `conf` to `dir/syslog-ng.conf` and starts syslog-ng on it in the foreground.
fn start_syslog_ng(dir: &Path, conf: &str, cpus: &[usize]) -> anyhow::Result<Daemon> {
    std::fs::write(dir.join("syslog-ng.conf"), conf)?;
    let p = |name: &str| dir.join(name).display().to_string();
    let args = [
        "-F",
        "--no-caps",
        "-f",
        &p("syslog-ng.conf"),
        "-R",
        &p("syslog-ng.persist"),
        "-p",
        &p("syslog-ng.pid"),
        "-c",
        &p("syslog-ng.ctl"),
    ];
    Daemon::spawn(cpus, "syslog-ng", &args, &dir.join("syslog-ng.log"))
}

/// Starts rsyslogd in the foreground with an imptcp input (returned port) and TLS output to
/// the sink at `port`; waits until the input accepts connections.
pub fn rsyslog(dir: &Path, port: u16, tls: &Tls, cpus: &[usize]) -> anyhow::Result<(Daemon, u16)> {
    let input = crate::daemon::free_port()?;
    let inputs = format!(
        "module(load=\"imptcp\")\n\
         input(type=\"imptcp\" address=\"127.0.0.1\" port=\"{input}\" ruleset=\"ship\")\n"
    );
    let (mut d, log) = start_rsyslog(dir, &inputs, port, tls, cpus)?;
    let open = || std::net::TcpStream::connect(("127.0.0.1", input)).is_ok();
    match poll_alive(&mut d.0, Duration::from_secs(10), POLL, open) {
        Ok(()) => Ok((d, input)),
        Err(NotReady::Exited(status)) => bail!("rsyslogd exited ({status}); see {}", log.display()),
        Err(NotReady::TimedOut(_)) => {
            bail!("rsyslogd did not open its input; see {}", log.display())
        }
        Err(e @ NotReady::Wait(_)) => Err(e.into()),
    }
}

/// Starts rsyslogd following `tail` with `imfile` in inotify mode (a wildcard in the file
/// name for a directory; new files are read from their start) and TLS output to the sink at
/// `port`; waits until it wrote its pid file (it has no port to wait for).
pub fn rsyslog_files(
    dir: &Path,
    tail: &Tail,
    port: u16,
    tls: &Tls,
    cpus: &[usize],
) -> anyhow::Result<Daemon> {
    let file = match tail {
        Tail::File(f) => f.to_path_buf(),
        Tail::Dir { dir, pattern } => dir.join(pattern),
    };
    let inputs = format!(
        "module(load=\"imfile\" mode=\"inotify\")\n\
         input(type=\"imfile\" file={:?} tag=\"app\" addMetadata=\"off\" ruleset=\"ship\")\n",
        file.display().to_string()
    );
    let (mut d, log) = start_rsyslog(dir, &inputs, port, tls, cpus)?;
    let pid = dir.join("rsyslog.pid");
    match poll_alive(&mut d.0, Duration::from_secs(10), POLL, || pid.exists()) {
        Ok(()) => Ok(d),
        Err(NotReady::Exited(status)) => bail!("rsyslogd exited ({status}); see {}", log.display()),
        Err(NotReady::TimedOut(_)) => bail!("rsyslogd did not start; see {}", log.display()),
        Err(e @ NotReady::Wait(_)) => Err(e.into()),
    }
}

/// Starts rsyslogd in the foreground with `inputs` (module loads and inputs into the ruleset
/// `ship`): `mmjsonparse` on the raw message, `omfwd` over mutual TLS (OpenSSL driver) to the
/// sink at `port`. Returns it and its log.
fn start_rsyslog(
    dir: &Path,
    inputs: &str,
    port: u16,
    tls: &Tls,
    cpus: &[usize],
) -> anyhow::Result<(Daemon, PathBuf)> {
    let work = dir.join("rsyslog");
    std::fs::create_dir_all(&work)?;
    let conf = format!(
        "global(workDirectory={work:?} maxMessageSize=\"64k\"\n\
         \x20 defaultNetstreamDriverCAFile={ca:?} defaultNetstreamDriverCertFile={cert:?}\n\
         \x20 defaultNetstreamDriverKeyFile={key:?})\n\
         module(load=\"mmjsonparse\")\n\
         {inputs}\
         template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
         ruleset(name=\"ship\" queue.type=\"LinkedList\" queue.size=\"100000\") {{\n\
         \x20 action(type=\"mmjsonparse\" cookie=\"\" useRawMsg=\"on\")\n\
         \x20 action(type=\"omfwd\" target=\"127.0.0.1\" port=\"{port}\" protocol=\"tcp\" \
         template=\"raw\" StreamDriver=\"ossl\" StreamDriverMode=\"1\" \
         StreamDriverAuthMode=\"x509/certvalid\")\n}}\n",
        work = work.display().to_string(),
        ca = tls.ca.display().to_string(),
        cert = tls.cert.display().to_string(),
        key = tls.key.display().to_string(),
    );
    let cfg = dir.join("rsyslog.conf");
    std::fs::write(&cfg, conf)?;
    let (bin, modules) = (rsyslogd(), rsyslog_modules());
    let args = [
        "-n",
        "-f",
        &cfg.display().to_string(),
        "-i",
        &dir.join("rsyslog.pid").display().to_string(),
        "-M",
        &modules.display().to_string(),
    ]
    .map(|s| s.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.join("rsyslog.log");
    let d = Daemon::spawn(cpus, &bin.display().to_string(), &args, &log)?;
    Ok((d, log))
}

/// Waits (10 s at most) until `ready()`, failing with the log of `d` if it exits first.
pub fn wait_ready(d: &mut Daemon, log: &Path, ready: impl Fn() -> bool) -> anyhow::Result<()> {
    match poll_alive(&mut d.0, Duration::from_secs(10), POLL, ready) {
        Ok(()) => Ok(()),
        Err(NotReady::Exited(status)) => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("exited ({status}): {}", text.trim());
        }
        Err(NotReady::TimedOut(_)) => Err(anyhow::anyhow!("not ready after 10 s"))
            .with_context(|| format!("see {}", log.display())),
        Err(e @ NotReady::Wait(_)) => Err(e.into()),
    }
}

/// How often a peer's start is checked for.
const POLL: Duration = Duration::from_millis(20);
