//! What the repository ships for monitoring. The Grafana dashboard
//! (packaging/grafana/shipper.json) against a real Prometheus scraping a real shipper and
//! receiver under load: every expression of every panel returns data, so none names a metric
//! or a label that does not exist. The kernel panels (eBPF) need drops and retransmits the
//! test makes in a network namespace, as root: their test is `#[ignore = "needs root: ..."]`,
//! counted as skipped otherwise. The alert rules (packaging/prometheus/alerts.yml) pass
//! `promtool check rules` and their unit tests (`promtool test rules`), one or more per alert.

use std::io::Write;
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use crate::prometheus::{http_get, require};

/// What Grafana's variables stand for here: every instance, and a rate window of several
/// scrapes (the scrape interval is 1 s).
const VARIABLES: &[(&str, &str)] =
    &[("$__rate_interval", "10s"), ("$instance", ".+"), ("$receiver", ".+")];

/// (panel title, expression) of every target of every panel, variables substituted.
fn expressions() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/grafana/shipper.json");
    let text = std::fs::read_to_string(path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let mut expr = target["expr"].as_str().unwrap().to_string();
            for (variable, value) in VARIABLES {
                expr = expr.replace(variable, value);
            }
            assert!(!expr.contains('$'), "{title}: a variable the test does not know: {expr}");
            all.push((title.to_string(), expr));
        }
    }
    assert!(all.len() >= 20, "{} expressions in {path}", all.len());
    all
}

/// Whether an expression reads what only the eBPF programs produce.
fn is_kernel(expr: &str) -> bool {
    expr.contains("shipper_kernel_") || expr.contains("shipper_ebpf_")
}

/// The number of series `promql` returns now, or Prometheus's error.
fn series(port: u16, promql: &str) -> Result<usize, String> {
    let q: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(port, &format!("/api/v1/query?query={q}"))
        .ok_or_else(|| "no answer from Prometheus".to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    match v["data"]["result"].as_array() {
        Some(result) if v["status"] == "success" => Ok(result.len()),
        _ => Err(body),
    }
}

/// Starts Prometheus scraping `targets` (job name, port) every second.
fn prometheus(env: &Env, targets: &[(&str, u16)], port: u16) -> Proc {
    let mut cfg = "global:\n  scrape_interval: 1s\nscrape_configs:\n".to_string();
    for (job, target) in targets {
        cfg +=
            &format!("- job_name: {job}\n  static_configs:\n  - targets: ['127.0.0.1:{target}']\n");
    }
    let cfg = env.write("prometheus.yml", &cfg);
    let args = [
        format!("--config.file={}", cfg.display()),
        format!("--storage.tsdb.path={}", env.path("tsdb").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start_any("prometheus", "prometheus", &args, env.path("prometheus.log"))
}

/// Waits (60 s at most) until every expression returns at least one series; panics naming
/// each panel and expression that returned none, or that Prometheus refused.
fn check(prom: &mut Proc, port: u16, exprs: &[(String, String)]) {
    let mut failing: Vec<String> = Vec::new();
    let mut all_answer = || {
        failing = exprs
            .iter()
            .filter_map(|(title, expr)| match series(port, expr) {
                Ok(0) => Some(format!("panel {title:?}: no data from {expr}")),
                Ok(_) => None,
                Err(e) => Some(format!("panel {title:?}: {expr} failed: {e}")),
            })
            .collect();
        failing.is_empty()
    };
    let polled = testkit::wait::poll(Duration::from_secs(60), Duration::from_millis(500), || {
        prom.child.try_wait().unwrap().map_or(all_answer(), |_| true).then_some(())
    });
    assert!(prom.child.try_wait().unwrap().is_none(), "Prometheus exited:\n{}", prom.log_text());
    assert!(polled.is_ok() && failing.is_empty(), "\n{}", failing.join("\n"));
}

/// Journal entries `0..n` written into `dir` by systemd's own journal-remote.
fn write_journal(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut remote = std::process::Command::new("/lib/systemd/systemd-journal-remote")
        .arg(format!("--output={}", dir.join("remote.journal").display()))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-journal-remote (run `cargo xtask setup`)");
    let mut feed = remote.stdin.take().unwrap();
    for i in 0..n {
        write!(
            feed,
            "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n\
             _BOOT_ID=0123456789abcdef0123456789abcdef\nSYSLOG_IDENTIFIER=dash\n\
             MESSAGE=entry {i}\n\n",
            1_700_000_000_000_000u64 + i as u64,
            1_000_000 + i as u64,
        )
        .unwrap();
    }
    drop(feed);
    assert!(remote.wait().unwrap().success());
}

/// A shipper configuration with every kind of source the dashboard shows, a rate limit the
/// `chatty` service exceeds, and a disk buffer.
fn shipper_body(env: &Env, udp: u16) -> String {
    let (pipe, logs) = (env.path("app.pipe"), env.path("logs"));
    std::fs::create_dir_all(&logs).unwrap();
    write_journal(&env.path("journal"), 100);
    format!(
        "[[sources.pipe]]\npath = {pipe:?}\n\
         [[sources.file]]\npaths = [{:?}]\npositions = {:?}\nservice = \"files\"\n\
         [[sources.journal]]\ndirectory = {:?}\ncheckpoint = {:?}\npoll_interval_ms = 50\n\
         [[sources.socket]]\nname = \"syslog-udp\"\ntransport = \"udp\"\n\
         address = \"127.0.0.1:{udp}\"\nformat = \"rfc3164\"\nworker = 0\n\
         receive_buffer_bytes = 4096\n\
         [ratelimit.services.chatty]\nrate = 100\nburst = 100\n\
         [buffer]\ndirectory = {:?}\n[batch]\nflush_interval_ms = 20\n",
        logs.join("*.log"),
        env.path("positions"),
        env.path("journal"),
        env.path("journal.cursor"),
        env.path("buffer"),
    )
}

/// Writes into every source until `stop`: 2,000 lines/s into the pipe (half of them from the
/// rate-limited `chatty`), 500 into a log file, 500 syslog datagrams.
fn load(env: &Env, udp: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let mut pipe = open_writer(&env.path("app.pipe"));
    let file = env.path("logs/app.log");
    std::thread::spawn(move || {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut n = 0u64;
        while !stop.load(Relaxed) {
            for service in ["web", "chatty"].iter().cycle().take(20) {
                writeln!(pipe, r#"{{"service":"{service}","n":{n}}}"#).unwrap();
                n += 1;
            }
            for _ in 0..5 {
                writeln!(log, "line {n}").unwrap();
                let _ = socket.send_to(
                    format!("<13>Nov 21 07:00:00 edge app: {n}").as_bytes(),
                    ("127.0.0.1", udp),
                );
                n += 1;
            }
            // Pacing the writer, not waiting for a condition.
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Guards the dashboard against metrics and labels that do not exist: every panel but the
/// kernel's shows data from a real shipper and receiver under load.
#[test]
fn every_dashboard_expression_returns_data_under_load() {
    require("prometheus");
    let (all, kernel): (Vec<_>, Vec<_>) =
        expressions().into_iter().partition(|(_, e)| !is_kernel(e));
    assert!(kernel.len() >= 3, "the kernel panels: {kernel:?}");
    let env = Env::new();
    let (port, rm, sm, pm) = (free_port(), free_port(), free_port(), free_port());
    let udp = testkit::net::free_udp_port().unwrap();
    let _receiver = start_receiver(&env, port, rm, "");
    let mut shipper = start_shipper(&env, port, sm, &shipper_body(&env, udp));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = load(&env, udp, stop.clone());
    shipper.wait_alive("lines of every source and rate-limited ones", || {
        let text = scrape_ok(sm);
        metric(&text, "shipper_source_lines_read_total", &[]) > 0.0
            && metric(&text, "shipper_journal_entries_read_total", &[]) == 100.0
            && metric(&text, "shipper_socket_messages_received_total", &[]) > 0.0
            && metric(&text, "shipper_lines_dropped_total", &[("reason", "ratelimit")]) > 0.0
    });
    let mut prom = prometheus(&env, &[("shipper", sm), ("receiver", rm)], pm);
    check(&mut prom, pm, &all);
    stop.store(true, Relaxed);
    writer.join().unwrap();
    eprintln!(
        "{} expressions returned data; the {} of the kernel panels are checked by \
         monitoring::the_kernel_panels_return_data (needs root)",
        all.len(),
        kernel.len()
    );
}

/// The kernel panels (eBPF) show data once the kernel dropped datagrams on a source's socket
/// and retransmitted segments to a receiver, in a network namespace of their own.
#[test]
#[ignore = "needs root: loads eBPF programs, blackholes a route in a new network namespace"]
fn the_kernel_panels_return_data() {
    require_root("loads eBPF programs and blackholes a route in a new network namespace");
    require("prometheus");
    let kernel: Vec<_> = expressions().into_iter().filter(|(_, e)| is_kernel(e)).collect();
    testkit::netns::in_new_netns(move || {
        let env = Env::new();
        let (port, rm, sm, pm) = (free_port(), free_port(), free_port(), free_port());
        let udp = testkit::net::free_udp_port().unwrap();
        // The receiver on 127.0.0.2, so that a rule can discard what it sends (its ACKs).
        let addr = format!("127.0.0.2:{port}");
        let text = env.receiver_toml(port, rm, "").replace(&format!("127.0.0.1:{port}"), &addr);
        let cfg = env.write("receiver.toml", &text);
        let args = ["receive", "--config", cfg.to_str().unwrap()];
        let _receiver = Proc::start("receiver", &args, rm, env.path("receiver.log"));
        wait_for("receiver port", Duration::from_secs(10), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        let body = shipper_body(&env, udp);
        let cfg = env.shipper_toml(port, sm, &body).replace(&format!("127.0.0.1:{port}"), &addr);
        let path = env.write("edge.toml", &cfg);
        let args = ["run", "--config", path.to_str().unwrap()];
        let mut shipper = Proc::start("shipper", &args, sm, env.path("shipper.log"));
        shipper.wait_alive("the eBPF programs attached", || {
            metric(&scrape_ok(sm), "shipper_ebpf_attached", &[("state", "attached")]) == 1.0
        });
        let mut prom = prometheus(&env, &[("shipper", sm), ("receiver", rm)], pm);
        make_kernel_events(&env, &mut shipper, udp, &addr);
        check(&mut prom, pm, &kernel);
    });
}

/// Datagrams flooded into the 4 KiB socket of the UDP source (the kernel drops most), then
/// the receiver's packets discarded until the kernel retransmitted to it.
fn make_kernel_events(env: &Env, shipper: &mut Proc, udp: u16, receiver: &str) {
    let sm = shipper.metrics;
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..20_000 {
        let _ =
            tx.send_to(format!("<13>Nov 21 07:00:00 edge app: {n}").as_bytes(), ("127.0.0.1", udp));
    }
    shipper.wait_alive("kernel drops counted", || {
        metric(&scrape_ok(sm), "shipper_kernel_datagrams_dropped_total", &[]) > 0.0
    });
    use testkit::netns::ip;
    ip(&["rule", "del", "pref", "0"]);
    ip(&["rule", "add", "pref", "100", "lookup", "local"]);
    ip(&["rule", "add", "pref", "10", "from", "127.0.0.2", "blackhole"]);
    let mut w = open_writer(&env.path("app.pipe"));
    for n in 0..2000 {
        writeln!(w, r#"{{"service":"web","n":{n}}}"#).unwrap();
    }
    let retransmits = "shipper_kernel_tcp_retransmits_total";
    shipper.wait_alive("a retransmit to the receiver", || {
        metric(&scrape_ok(sm), retransmits, &[("receiver", receiver)]) > 0.0
    });
    ip(&["rule", "del", "pref", "10"]);
}

/// `promtool` with `args`, from packaging/prometheus: whether it passed, and what it said.
fn promtool(args: &[&str]) -> (bool, String) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/prometheus");
    let out = std::process::Command::new("promtool").args(args).current_dir(dir).output();
    let out = out.expect("promtool (Debian's prometheus package: run `cargo xtask setup`)");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said.into_owned())
}

/// The alert rules are valid, and each alert fires (and stays quiet) as its unit tests say.
#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    require("promtool");
    let (ok, said) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok && said.contains("SUCCESS: 6 rules found"), "{said}");
    let (ok, said) = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(ok && said.contains("SUCCESS"), "{said}");
    // At least one unit test per alert.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/prometheus");
    let rules = std::fs::read_to_string(format!("{dir}/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(format!("{dir}/alerts.test.yml")).unwrap();
    let alerts: Vec<&str> =
        rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in alerts {
        let tested = format!("alertname: {alert}\n");
        assert!(tests.matches(&tested).count() >= 2, "{alert}: a firing and a quiet case");
    }
}
