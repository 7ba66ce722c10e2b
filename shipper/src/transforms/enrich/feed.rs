//! The value an enrichment fetches, kept fresh by a thread of its own: an HTTP GET or a
//! command's standard output, every `interval_ms`, off the data path.
//!
//! # Design constraints
//! - One thread per enrichment that fetches, for the whole process; workers never wait on
//!   it. It publishes each new value by swapping an `Arc` under a mutex and bumping a
//!   version; a worker compares the version (a relaxed atomic load, read-shared) and takes
//!   the new `Arc` only when it changed.
//! - What is fetched is bounded (`bytes_max`, `timeout_ms`). An answer that fails, is too
//!   large, is not JSON, or (with `lookup`) is not an object is refused: the last good value
//!   stays, the failure is counted and logged (the 1st, 2nd, 4th, 8th, ... time).
//! - A command runs without a shell, its standard input empty and its standard error
//!   discarded; one that outlives `timeout_ms` is killed.
//!
//! # Format
//! ```text
//! Value::One(JSON)                 without lookup: the whole value, as compact JSON
//! Value::ByKey { key -> JSON }     lookup = "service": each member of the fetched object
//! ```

use std::collections::HashMap;
use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::enrich::{EnrichSection, Lookup};

/// A fetched value, ready to be written into records.
#[derive(Debug, Default)]
pub enum Value {
    /// Nothing fetched yet.
    #[default]
    None,
    /// The whole value, compact JSON.
    One(Box<[u8]>),
    /// Per key (a service), compact JSON; shared with the workers' caches.
    ByKey(HashMap<Box<[u8]>, Arc<[u8]>>),
}

/// What the refresher did, for the metrics.
#[derive(Debug, Default)]
pub struct Figures {
    pub refreshes: AtomicU64,
    pub failures: AtomicU64,
    /// Bytes of the last value fetched and kept.
    pub bytes: AtomicU64,
    /// When it was fetched, seconds since the Unix epoch (0: never).
    pub refreshed_unix_s: AtomicU64,
}

/// The current value of one enrichment, shared by the workers and its refresher.
#[derive(Debug, Default)]
pub struct Feed {
    /// Bumped with every new value.
    version: AtomicU64,
    value: Mutex<Arc<Value>>,
    pub figures: Figures,
}

impl Feed {
    /// The version of the current value: compare before taking it.
    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current value and its version.
    pub fn current(&self) -> (u64, Arc<Value>) {
        let value = self.value.lock().expect("feed poisoned").clone();
        (self.version(), value)
    }

    /// A feed holding the value of `json` that nothing refreshes (benchmarks, tests).
    pub fn fixed(json: &[u8], lookup: Option<Lookup>) -> io::Result<Arc<Feed>> {
        let feed = Arc::new(Feed::default());
        feed.publish(parse(json, lookup)?, json.len());
        Ok(feed)
    }

    fn publish(&self, value: Value, bytes: usize) {
        *self.value.lock().expect("feed poisoned") = Arc::new(value);
        self.version.fetch_add(1, Ordering::Release);
        let f = &self.figures;
        f.refreshes.fetch_add(1, Ordering::Relaxed);
        f.bytes.store(bytes as u64, Ordering::Relaxed);
        f.refreshed_unix_s.store(crate::clock::unix_us() / 1_000_000, Ordering::Relaxed);
    }
}

/// Starts the refresher of `config` (which fetches), fetching at once, then every
/// `interval_ms`; returns the feed the workers read.
pub fn start(config: &EnrichSection) -> io::Result<Arc<Feed>> {
    let feed = Arc::new(Feed::default());
    let (shared, name) = (feed.clone(), format!("enrich-{}", config.name));
    let source = Source::of(config);
    let (interval, lookup) = (Duration::from_millis(config.interval_ms), config.lookup);
    let transform = config.name.clone();
    std::thread::Builder::new().name(name).spawn(move || loop {
        match source.fetch().and_then(|bytes| parse(&bytes, lookup).map(|v| (v, bytes.len()))) {
            Ok((value, bytes)) => shared.publish(value, bytes),
            Err(e) => {
                let n = shared.figures.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    let kept = if shared.version() > 0 {
                        "the last good value stays"
                    } else {
                        "no value yet"
                    };
                    tracing::warn!(
                        transform,
                        failures = n,
                        "enrichment fetch refused: {e}; {kept}"
                    );
                }
            }
        }
        std::thread::sleep(interval);
    })?;
    Ok(feed)
}

/// Where a value comes from.
struct Source {
    url: Option<String>,
    command: Vec<String>,
    timeout: Duration,
    bytes_max: usize,
}

impl Source {
    fn of(c: &EnrichSection) -> Source {
        Source {
            url: c.url.clone(),
            command: c.command.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
            bytes_max: c.bytes_max as usize,
        }
    }

    fn fetch(&self) -> io::Result<Vec<u8>> {
        match &self.url {
            Some(url) => self.get(url),
            None => self.run(),
        }
    }

    fn get(&self, url: &str) -> io::Result<Vec<u8>> {
        let (addr, target) = crate::http::split_url(url).expect("validated");
        let head = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        // The head counts too: allow it 64 KiB on top of the body's limit.
        let answer =
            crate::http::request(addr, &head, &[], self.timeout, self.bytes_max + (64 << 10))?;
        if answer.status != 200 {
            return Err(io::Error::other(format!("{url} answered {:?}", answer.status_line)));
        }
        if answer.body.len() > self.bytes_max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{url}: {} bytes is over bytes_max {}", answer.body.len(), self.bytes_max),
            ));
        }
        Ok(answer.body)
    }

    fn run(&self) -> io::Result<Vec<u8>> {
        let program = &self.command[0];
        let mut child = Command::new(program)
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{program}: {e}")))?;
        let mut out = child.stdout.take().expect("piped");
        let bytes_max = self.bytes_max;
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let read = (&mut out).take(bytes_max as u64 + 1).read_to_end(&mut bytes);
            read.map(|_| bytes)
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{program}: over timeout_ms"),
                ));
            }
            // Polling a child process's exit: std has no wait with a timeout.
            std::thread::sleep(Duration::from_millis(10));
        };
        let bytes = reader.join().expect("reader thread")?;
        if !status.success() {
            return Err(io::Error::other(format!("{program} exited with {status}")));
        }
        if bytes.len() > bytes_max {
            let e = format!("{program}: output over bytes_max {bytes_max}");
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(bytes)
    }
}

/// The value of fetched `bytes`: JSON, and an object when looked up by key.
fn parse(bytes: &[u8], lookup: Option<Lookup>) -> io::Result<Value> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let compact =
        |v: &serde_json::Value| serde_json::to_vec(v).expect("a JSON value").into_boxed_slice();
    match lookup {
        None => Ok(Value::One(compact(&value))),
        Some(Lookup::Service) => {
            let serde_json::Value::Object(members) = &value else {
                return Err(invalid(
                    "lookup = \"service\" needs a JSON object keyed by service".into(),
                ));
            };
            let by_key =
                members.iter().map(|(k, v)| (k.as_bytes().into(), Arc::from(compact(v)))).collect();
            Ok(Value::ByKey(by_key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_whole_or_by_key() {
        let Value::One(v) = parse(b" {\"a\": [1, 2]} ", None).unwrap() else { panic!() };
        assert_eq!(&*v, b"{\"a\":[1,2]}");
        let Value::ByKey(m) =
            parse(b"{\"web\":{\"team\":\"x\"},\"db\":1}", Some(Lookup::Service)).unwrap()
        else {
            panic!()
        };
        assert_eq!(&*m[&b"web"[..]], b"{\"team\":\"x\"}");
        assert_eq!(&*m[&b"db"[..]], b"1");
        let e = parse(b"[1]", Some(Lookup::Service)).unwrap_err().to_string();
        assert!(e.contains("needs a JSON object"), "{e}");
        assert!(parse(b"{\"a\":", None).unwrap_err().to_string().starts_with("not JSON"));
    }
}
