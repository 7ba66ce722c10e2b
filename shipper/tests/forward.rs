use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

const LIMIT: Duration = Duration::from_secs(30);

/// The tests' Python (`cargo xtask setup` makes the venv and installs the PYPI packages).
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/python");
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/forward_client.py");

/// One connection of `forward_client.py`, driven one JSON command at a time.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn start() -> Client {
        assert!(
            std::path::Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run `cargo xtask setup` (it installs fluent-logger and msgpack)"
        );
        let mut child = Command::new(PYTHON)
            .arg(CLIENT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PYTHON}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Client { child, stdin, stdout }
    }

    /// Sends `command`, returns the client's answer (it fails the test on a client error).
    fn call(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("client answered {line:?} to {command}: {e}"));
        assert!(answer.get("error").is_none(), "client failed {command}: {answer}");
        answer
    }

    fn connect(port: u16) -> Client {
        let mut c = Client::start();
        assert_eq!(c.call(json!({"cmd": "connect", "port": port})), json!({"ok": true}));
        c
    }

    /// Sends `entries` (`[secs, nanos or null, record]`) in `mode`, with `chunk` if given.
    fn send(&mut self, mode: &str, tag: &str, entries: &[Value], chunk: Option<&str>) {
        let cmd =
            json!({"cmd": "send", "mode": mode, "tag": tag, "entries": entries, "chunk": chunk});
        assert_eq!(self.call(cmd), json!({"ok": true}));
    }

    /// The next answer within `secs`: the acknowledged chunk id, or `None` on timeout.
    fn ack(&mut self, secs: f64) -> Option<String> {
        let got = self.call(json!({"cmd": "ack", "timeout": secs}));
        if got.get("timeout").is_some() {
            return None;
        }
        Some(got["ack"].as_str().unwrap_or_else(|| panic!("not an ack: {got}")).to_string())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` entries `[secs, nanos, {"i": k, "mode": mode}]` at 1700000000 s (+k ns).
fn entries(mode: &str, n: usize) -> Vec<Value> {
    (0..n).map(|k| json!([1_700_000_000u64, k, {"i": k, "mode": mode}])).collect()
}

/// The records the shipper makes of [`entries`].
fn records(mode: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|k| format!(r#"{{"i":{k},"mode":"{mode}","time":"2023-11-14T22:13:20.{k:09}Z"}}"#))
        .collect()
}

/// Output lines of stream `name`, sorted.
fn stream(env: &Env, name: &str) -> Vec<String> {
    let lines = output_lines(&env.out());
    let of = lines.into_iter().filter(|(s, _)| s == name);
    let mut out: Vec<String> = of.map(|(_, l)| String::from_utf8_lossy(&l).into_owned()).collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn forward_toml(name: &str, port: u16, extra: &str) -> String {
    format!("[[sources.forward]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n{extra}\n")
}

fn wait_listening(shipper: &mut Proc, port: u16) {
    shipper.wait_alive("the forward port", || TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// Waits until metric `name` (samples matching `labels`) is `value` (counters are published
/// every 250 ms); an exact assertion of it follows.
fn wait_metric(shipper: &mut Proc, name: &str, labels: &[(&str, &str)], value: f64) {
    let sm = shipper.metrics;
    let what = format!("{name}{labels:?} = {value}");
    shipper.wait_alive(&what, || metric(&scrape_ok(sm), name, labels) == value);
}

/// Waits until `n` records were acknowledged, then requires exactly `n` lines at the receiver.
fn wait_lines(shipper: &mut Proc, env: &Env, n: usize) {
    let sm = shipper.metrics;
    shipper.wait_alive("records acknowledged", || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) >= n as f64
    });
    assert_eq!(output_lines(&env.out()).len(), n, "no record arrives twice");
}

#[test]
fn each_mode_arrives_exactly_with_its_tag_and_time() {
    let env = Env::new();
    let (port, rm, sm, fwd) = (free_port(), free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let mut shipper = start_shipper(&env, port, sm, &forward_toml("fwd", fwd, ""));
    wait_listening(&mut shipper, fwd);
    // Message mode from fluent-logger: integer seconds and an EventTime.
    let mut logger = Client::start();
    let logged = [
        json!([1_700_000_000u64, null, {"msg": "one"}]),
        json!([1_700_000_000u64, 5, {"msg": "two"}]),
    ];
    let sent = logger.call(
        json!({"cmd": "logger", "port": fwd, "tag": "app", "label": "web", "entries": logged}),
    );
    assert_eq!(sent, json!({"sent": [true, true]}));
    let mut c = Client::connect(fwd);
    for (mode, tag) in [("forward", "fwd.a"), ("packed", "fwd.b"), ("compressed", "fwd.c")] {
        c.send(mode, tag, &entries(mode, 3), Some(&format!("chunk-{mode}")));
        assert_eq!(c.ack(20.0), Some(format!("chunk-{mode}")), "{mode}: acknowledged");
    }
    wait_lines(&mut shipper, &env, 11);
    let want_logged = [
        r#"{"msg":"one","time":"2023-11-14T22:13:20Z"}"#,
        r#"{"msg":"two","time":"2023-11-14T22:13:20.000000005Z"}"#,
    ];
    assert_eq!(stream(&env, "app.web"), sorted(want_logged.map(String::from).to_vec()));
    for (mode, tag) in [("forward", "fwd.a"), ("packed", "fwd.b"), ("compressed", "fwd.c")] {
        assert_eq!(stream(&env, tag), records(mode, 3), "{mode}");
    }
    wait_metric(&mut shipper, "shipper_forward_chunks_acked_total", &[], 3.0);
    let m = |name: &str, labels: &[(&str, &str)]| shipper.metric(name, labels);
    let modes = [("message", 2.0), ("forward", 1.0), ("packed_forward", 1.0)];
    for (mode, n) in modes.into_iter().chain([("compressed_packed_forward", 1.0)]) {
        assert_eq!(m("shipper_forward_messages_received_total", &[("mode", mode)]), n, "{mode}");
    }
    assert_eq!(m("shipper_forward_records_received_total", &[("source", "fwd")]), 11.0);
    assert_eq!(m("shipper_forward_chunks_acked_total", &[]), 3.0);
    assert_eq!(m("shipper_forward_messages_malformed_total", &[]), 0.0);
    assert_eq!(m("shipper_forward_chunks_resent_total", &[]), 0.0);
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

#[test]
fn acks_wait_for_the_receiver_and_a_resent_chunk_is_written_once() {
    let env = Env::new();
    let (port, rm, sm, fwd) = (free_port(), free_port(), free_port(), free_port());
    // No receiver yet: the records wait in the shipper, unacknowledged.
    let mut shipper = start_shipper(&env, port, sm, &forward_toml("fwd", fwd, ""));
    wait_listening(&mut shipper, fwd);
    let batch = entries("forward", 5);
    let mut first = Client::connect(fwd);
    first.send("forward", "late", &batch, Some("c1"));
    assert_eq!(first.ack(2.0), None, "no ack while no receiver has the records");
    // The client gives up waiting and resends on a new connection (maybe another worker).
    let mut again = Client::connect(fwd);
    again.send("forward", "late", &batch, Some("c1"));
    wait_metric(&mut shipper, "shipper_forward_chunks_resent_total", &[], 1.0);
    assert_eq!(again.ack(1.0), None);
    let _receiver = start_receiver(&env, port, rm, "");
    for c in [&mut first, &mut again] {
        assert_eq!(c.ack(20.0).as_deref(), Some("c1"));
        // Acknowledged only after the receiver wrote them.
        assert_eq!(stream(&env, "late"), records("forward", 5));
    }
    // A resend after the ack is answered at once and written nowhere.
    let mut third = Client::connect(fwd);
    third.send("forward", "late", &batch, Some("c1"));
    assert_eq!(third.ack(10.0).as_deref(), Some("c1"));
    wait_lines(&mut shipper, &env, 5);
    wait_metric(&mut shipper, "shipper_forward_chunks_acked_total", &[], 3.0);
    wait_metric(&mut shipper, "shipper_forward_chunks_resent_total", &[], 2.0);
    assert_eq!(shipper.metric("shipper_forward_records_received_total", &[]), 5.0);
    assert_eq!(shipper.metric("shipper_forward_chunks_resent_total", &[]), 2.0);
    assert_eq!(shipper.metric("shipper_forward_chunks_acked_total", &[]), 3.0);
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

#[test]
fn garbage_closes_its_connection_only_and_handshakes_are_checked() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let (open, keyed, tls) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let tls_table = format!(
        "[sources.forward.tls]\ncert = {:?}\nkey = {:?}\n",
        env.pki.receiver_cert, env.pki.receiver_key
    );
    let body = forward_toml("open", open, "")
        + &forward_toml("keyed", keyed, "shared_key = \"s3cret\"\nself_hostname = \"agg\"")
        + &forward_toml("tls", tls, &tls_table);
    let mut shipper = start_shipper(&env, port, sm, &body);
    for p in [open, keyed, tls] {
        wait_listening(&mut shipper, p);
    }
    let mut good = Client::connect(open);
    good.send("forward", "ok", &entries("forward", 1), Some("a1"));
    assert_eq!(good.ack(20.0).as_deref(), Some("a1"));
    // A reserved marker inside an otherwise plausible message.
    let mut bad = Client::connect(open);
    assert_eq!(bad.call(json!({"cmd": "raw", "hex": "93a374616cc1"}))["ok"], true);
    assert_eq!(bad.call(json!({"cmd": "wait_closed", "timeout": 10}))["closed"], true);
    good.send("packed", "ok", &entries("packed", 1), Some("a2"));
    assert_eq!(good.ack(20.0).as_deref(), Some("a2"), "the other connection goes on");
    // The shared key: the right one gets a PONG proving the server knows it too.
    let mut keyed_ok = Client::start();
    let pong = keyed_ok.call(json!({"cmd": "connect", "port": keyed, "shared_key": "s3cret"}));
    assert_eq!(pong, json!({"ok": true, "reason": "", "server": "agg", "proven": true}));
    keyed_ok.send("message", "keyed", &entries("message", 1), Some("k1"));
    assert_eq!(keyed_ok.ack(20.0).as_deref(), Some("k1"));
    let mut keyed_bad = Client::start();
    let pong = keyed_bad.call(json!({"cmd": "connect", "port": keyed, "shared_key": "guess"}));
    assert_eq!(
        pong,
        json!({"ok": false, "reason": "shared_key mismatch", "server": "", "proven": false})
    );
    assert_eq!(keyed_bad.call(json!({"cmd": "wait_closed", "timeout": 10}))["closed"], true);
    // TLS: a client trusting the CA is served; plain TCP on the TLS port is refused.
    let mut over_tls = Client::start();
    let ca = env.pki.ca.to_str().unwrap();
    assert_eq!(
        over_tls.call(json!({"cmd": "connect", "port": tls, "tls_ca": ca})),
        json!({"ok": true})
    );
    over_tls.send("compressed", "secure", &entries("compressed", 2), Some("t1"));
    assert_eq!(over_tls.ack(20.0).as_deref(), Some("t1"));
    let mut plain = Client::connect(tls);
    plain.send("forward", "secure", &entries("forward", 1), None);
    assert_eq!(plain.call(json!({"cmd": "wait_closed", "timeout": 10}))["closed"], true);
    wait_lines(&mut shipper, &env, 5);
    assert_eq!(stream(&env, "ok"), sorted([records("forward", 1), records("packed", 1)].concat()));
    assert_eq!(stream(&env, "keyed"), records("message", 1));
    assert_eq!(stream(&env, "secure"), records("compressed", 2));
    let failed = "shipper_forward_handshakes_failed_total";
    wait_metric(&mut shipper, failed, &[], 2.0);
    wait_metric(&mut shipper, "shipper_forward_chunks_acked_total", &[], 4.0);
    let m = |name: &str, labels: &[(&str, &str)]| shipper.metric(name, labels);
    assert_eq!(m("shipper_forward_messages_malformed_total", &[("source", "open")]), 1.0);
    assert_eq!(m("shipper_forward_messages_malformed_total", &[]), 1.0);
    assert_eq!(m(failed, &[("source", "keyed"), ("reason", "shared_key")]), 1.0);
    assert_eq!(m(failed, &[("source", "tls"), ("reason", "tls")]), 1.0);
    assert_eq!(m(failed, &[]), 2.0);
    assert_eq!(m("shipper_forward_chunks_acked_total", &[]), 4.0);
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

#[test]
fn a_chunk_whose_records_the_rate_limit_dropped_is_still_acknowledged() {
    let env = Env::new();
    let (port, rm, sm, fwd) = (free_port(), free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let limited = "[ratelimit.services.limited]\nrate = 1\nburst = 1\n";
    let mut shipper = start_shipper(&env, port, sm, &(forward_toml("fwd", fwd, "") + limited));
    wait_listening(&mut shipper, fwd);
    let mut c = Client::connect(fwd);
    // Most of these records are dropped, the last one surely: nothing holds it, no wait.
    c.send("forward", "limited", &entries("forward", 20), Some("r1"));
    assert_eq!(c.ack(20.0).as_deref(), Some("r1"));
    let dropped =
        ("shipper_lines_dropped_total", [("service", "limited"), ("reason", "ratelimit")]);
    let sm = shipper.metrics;
    shipper.wait_alive("every record admitted or dropped", || {
        let text = scrape_ok(sm);
        let written = stream(&env, "limited").len() as f64;
        metric(&text, dropped.0, &dropped.1) + written == 20.0
    });
    assert!(shipper.metric(dropped.0, &dropped.1) >= 18.0, "the rate limit dropped most");
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}
