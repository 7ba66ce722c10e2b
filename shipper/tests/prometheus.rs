use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// The body of `GET path` from 127.0.0.1:`port`, if it answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of a PromQL instant query returning one sample, if any.
fn query(port: u16, promql: &str) -> Option<f64> {
    let q: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(port, &format!("/api/v1/query?query={q}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Fails, saying how to install it, when `tool` is not on PATH.
pub fn require(tool: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{tool} is not installed: run `cargo xtask setup` (it installs Debian's prometheus package)"
    );
}

/// A real Prometheus scrapes both endpoints; the values it stores are the values served, and
/// promtool finds nothing to object to in either exposition.
#[test]
fn prometheus_scrapes_shipper_and_receiver() {
    require("prometheus");
    require("promtool");
    let env = Env::new();
    let (port, rm, sm, pm) = (free_port(), free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let mut shipper =
        start_shipper(&env, port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"));
    let mut w = open_writer(&pipe);
    for n in 0..5000 {
        writeln!(w, r#"{{"service":"web","n":{n}}}"#).unwrap();
    }
    shipper.wait_alive("5000 lines acknowledged", || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) == 5000.0
    });
    for (name, port) in [("shipper", sm), ("receiver", rm)] {
        let (ok, said) = promtool_check(&scrape(port).unwrap());
        assert!(ok, "promtool on the {name}: {said}");
    }
    let cfg = env.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n\
             - job_name: shipper\n  static_configs:\n  - targets: ['127.0.0.1:{sm}']\n\
             - job_name: receiver\n  static_configs:\n  - targets: ['127.0.0.1:{rm}']\n"
        ),
    );
    let log = env.path("prometheus.log");
    let mut prom = Proc::start_any(
        "prometheus",
        "prometheus",
        &[
            &format!("--config.file={}", cfg.display()),
            &format!("--storage.tsdb.path={}", env.path("tsdb").display()),
            &format!("--web.listen-address=127.0.0.1:{pm}"),
        ],
        log,
    );
    prom.wait_alive_for("Prometheus to store both series", Duration::from_secs(60), &mut || {
        query(pm, r#"sum(shipper_records_acked_total{job="shipper"})"#) == Some(5000.0)
            && query(pm, r#"sum(shipper_receiver_records_written_total{job="receiver"})"#)
                == Some(5000.0)
    });
    assert_eq!(query(pm, r#"count(up{job=~"shipper|receiver"} == 1)"#), Some(2.0));
    assert_eq!(
        query(pm, r#"sum(shipper_lines_admitted_total{job="shipper",service="web"})"#),
        Some(5000.0)
    );
    assert_eq!(query(pm, r#"count(count by (core) (shipper_frames_sent_total))"#), Some(2.0));
}
