use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Output lines of `stream`, as strings, sorted: delivery keeps records once each, but frames
/// sent over different connections (or from different workers) may be written in any order.
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

/// Waits until the receiver has written `n` lines in all; fails if more arrive.
fn wait_lines(shipper: &mut Proc, env: &Env, n: usize) {
    shipper.wait_alive("records acknowledged", || output_lines(&env.out()).len() >= n);
    let sm = shipper.metrics;
    wait_for("every record acknowledged", LIMIT, || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) >= n as f64
    });
    assert_eq!(output_lines(&env.out()).len(), n, "no record arrives twice");
}

/// The record the shipper makes of `<PRI>1 2024-01-15T10:00:00.5Z HOST APP PROCID - SD MSG`.
fn record5424(pri: u8, app: &str, procid: &str, msg: &str) -> (String, String) {
    let sd = r#"[origin@1 seq="\"q\""]"#;
    let input = format!("<{pri}>1 2024-01-15T10:00:00.5Z edge-1 {app} {procid} - {sd} {msg}");
    let (f, s) = (pri >> 3, pri & 7);
    let f = shipper::transforms::syslog::FACILITIES[f as usize];
    let s = shipper::transforms::syslog::SEVERITIES[s as usize];
    let record = format!(
        r#"{{"service":"{app}","facility":"{f}","severity":"{s}","timestamp":"2024-01-15T10:00:00.5Z","host":"edge-1","app":"{app}","procid":"{procid}","structured_data":{{"origin@1":{{"seq":"\"q\""}}}},"message":"{msg}"}}"#
    );
    (input, record)
}

#[test]
fn udp_datagrams_from_four_senders_arrive_once_with_exact_fields() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 500;
    let env = Env::new();
    let (port, rm, sm, udp) = (free_port(), free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let body = format!(
        "[[sources.socket]]\nname = \"syslog-udp\"\ntransport = \"udp\"\n\
         address = \"127.0.0.1:{udp}\"\nformat = \"rfc5424\"\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    // Bound on both workers (SO_REUSEPORT), on the configured address.
    let local = format!("127.0.0.1:{udp}");
    let info = |core: &str| {
        metric(
            &scrape_ok(sm),
            "shipper_socket_info",
            &[("core", core), ("transport", "udp"), ("local", &local)],
        )
    };
    shipper.wait_alive("the socket on both workers", || (info("0"), info("1")) == (1.0, 1.0));
    let senders: Vec<UdpSocket> =
        (0..SENDERS).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let mut want = vec![Vec::new(); SENDERS];
    // In rounds no larger than the default receive queue, each waited for: nothing is dropped
    // even on a loaded machine, so every datagram can be required.
    for round in 0..PER_SENDER / 50 {
        for (k, sender) in senders.iter().enumerate() {
            for i in round * 50..(round + 1) * 50 {
                let (input, record) = record5424(134, &format!("app{k}"), &i.to_string(), "hi");
                sender.send_to(input.as_bytes(), ("127.0.0.1", udp)).unwrap();
                want[k].push(record);
            }
        }
        let sent = ((round + 1) * 50 * SENDERS) as f64;
        shipper.wait_alive("datagrams received", || {
            metric(&scrape_ok(sm), "shipper_socket_messages_received_total", &[]) >= sent
        });
    }
    wait_lines(&mut shipper, &env, SENDERS * PER_SENDER);
    for (k, records) in want.into_iter().enumerate() {
        assert_eq!(stream(&env, &format!("app{k}")), sorted(records), "records of sender {k}");
    }
    let m = |name: &str| shipper.metric(name, &[("source", "syslog-udp")]);
    assert_eq!(m("shipper_socket_messages_received_total"), (SENDERS * PER_SENDER) as f64);
    assert_eq!(m("shipper_socket_parse_failures_total"), 0.0);
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

#[test]
fn tcp_newline_octet_counting_and_auto_framing_with_split_writes() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let ports = [free_port(), free_port(), free_port()];
    let _receiver = start_receiver(&env, port, rm, "");
    let mut body = String::new();
    for (name, p) in ["newline", "octet_counting", "auto"].iter().zip(ports) {
        body += &format!(
            "[[sources.socket]]\nname = \"tcp-{name}\"\ntransport = \"tcp\"\n\
             address = \"127.0.0.1:{p}\"\nframing = \"{name}\"\n"
        );
    }
    let mut shipper = start_shipper(&env, port, sm, &body);
    let (nl, want_nl) = newline_split_across_writes(&mut shipper, ports[0]);
    let (oc, want_oc) = octet_counted_split_across_writes(&mut shipper, ports[1]);
    let (au, want_auto) = both_framings_and_logger(ports[2]);
    wait_lines(&mut shipper, &env, 7);
    assert_eq!(stream(&env, "nl"), sorted(want_nl));
    assert_eq!(stream(&env, "oc"), sorted(want_oc));
    assert_eq!(stream(&env, "auto"), sorted(want_auto));
    let logged = stream(&env, "loggertcp");
    assert_eq!(logged.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&logged[0]).unwrap();
    assert_eq!(v["app"], "loggertcp");
    assert_eq!(v["msgid"], "M1");
    assert_eq!(v["message"], "from logger");
    assert_eq!((v["facility"].as_str(), v["severity"].as_str()), (Some("user"), Some("notice")));
    assert_eq!(v["structured_data"]["timeQuality"]["tzKnown"], "1");
    drop((nl, oc, au));
    wait_for("connections closed", LIMIT, || {
        let text = scrape_ok(sm);
        metric(&text, "shipper_socket_connections_closed_total", &[]) == 4.0
    });
    assert_eq!(shipper.metric("shipper_socket_connections_accepted_total", &[]), 4.0);
    assert_eq!(shipper.metric("shipper_socket_connections_open", &[]), 0.0);
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

/// Waits until socket source `source` of `shipper` has received `n` messages.
fn wait_received(shipper: &mut Proc, what: &str, source: &str, n: f64) {
    let sm = shipper.metrics;
    shipper.wait_alive(what, || {
        let labels = [("source", source)];
        metric(&scrape_ok(sm), "shipper_socket_messages_received_total", &labels) == n
    });
}

/// Two newline-framed messages to `port`, the second split across two writes (the first
/// received in between); the connection and the records expected.
fn newline_split_across_writes(shipper: &mut Proc, port: u16) -> (TcpStream, Vec<String>) {
    let (a, ra) = record5424(14, "nl", "1", "first");
    let (b, rb) = record5424(14, "nl", "2", "second, split across writes");
    let mut nl = TcpStream::connect(("127.0.0.1", port)).unwrap();
    nl.set_nodelay(true).unwrap();
    nl.write_all(format!("{a}\n{}", &b[..20]).as_bytes()).unwrap();
    wait_received(shipper, "the first newline-framed message", "tcp-newline", 1.0);
    nl.write_all(format!("{}\n", &b[20..]).as_bytes()).unwrap();
    (nl, vec![ra, rb])
}

/// Two octet-counted messages to `port`, the second split across two writes; the connection
/// and the records expected.
fn octet_counted_split_across_writes(shipper: &mut Proc, port: u16) -> (TcpStream, Vec<String>) {
    let (c, rc) = record5424(14, "oc", "1", "line\nbreak kept");
    let (d, rd) = record5424(14, "oc", "2", "split");
    let mut oc = TcpStream::connect(("127.0.0.1", port)).unwrap();
    oc.set_nodelay(true).unwrap();
    let framed = format!("{} {c}{} {d}", c.len(), d.len());
    let cut = framed.len() - 7;
    oc.write_all(&framed.as_bytes()[..cut]).unwrap();
    wait_received(shipper, "the first octet-counted message", "tcp-octet_counting", 1.0);
    oc.write_all(&framed.as_bytes()[cut..]).unwrap();
    // The newline inside an octet-counted message is part of it.
    (oc, vec![rc.replace("line\nbreak", "line\\nbreak"), rd])
}

/// Auto framing on `port`: both framings on one connection, and util-linux logger with
/// --octet-count; the connection and the records expected (logger's aside).
fn both_framings_and_logger(port: u16) -> (TcpStream, Vec<String>) {
    let (e, re) = record5424(14, "auto", "1", "nl");
    let (f, rf) = record5424(14, "auto", "2", "oc");
    let mut au = TcpStream::connect(("127.0.0.1", port)).unwrap();
    au.write_all(format!("{e}\n{} {f}", f.len()).as_bytes()).unwrap();
    let status = Command::new("logger")
        .args(["-T", "-n", "127.0.0.1", "-P", &port.to_string(), "--octet-count"])
        .args(["--rfc5424", "-t", "loggertcp", "--msgid", "M1", "from logger"])
        .status()
        .unwrap();
    assert!(status.success());
    (au, vec![re, rf])
}

#[test]
fn unix_datagram_socket_replaces_a_stale_file_and_takes_logger_messages() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let path = env.path("log.sock");
    // A socket file left behind by an earlier process.
    drop(UnixDatagram::bind(&path).unwrap());
    let body = format!(
        "[[sources.socket]]\nname = \"devlog\"\ntransport = \"unix\"\npath = {path:?}\n\
         mode = \"0620\"\nservice = \"local\"\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o620);
    let client = UnixDatagram::unbound().unwrap();
    const N: usize = 300;
    for i in 0..N {
        let m = format!("<30>Jan  5 03:04:05 cron[{i}]: job {i}");
        client.send_to(m.as_bytes(), &path).unwrap();
        if i % 50 == 49 {
            shipper.wait_alive("datagrams received", || {
                let text = scrape_ok(sm);
                metric(&text, "shipper_socket_messages_received_total", &[]) >= (i + 1) as f64
            });
        }
    }
    // A message without TAG goes under the source's service.
    client.send_to(b"<13>Jan  5 03:04:05 just words", &path).unwrap();
    let status = Command::new("logger")
        .args(["-u", path.to_str().unwrap(), "-t", "viaLogger", "-i", "hello \"quoted\""])
        .status()
        .unwrap();
    assert!(status.success());
    wait_lines(&mut shipper, &env, N + 2);
    let want: Vec<String> = (0..N)
        .map(|i| {
            format!(
                r#"{{"service":"cron","facility":"daemon","severity":"info","timestamp":"Jan  5 03:04:05","app":"cron","procid":"{i}","message":"job {i}"}}"#
            )
        })
        .collect();
    assert_eq!(stream(&env, "cron"), sorted(want));
    assert_eq!(
        stream(&env, "local"),
        [
            r#"{"service":"local","facility":"user","severity":"notice","timestamp":"Jan  5 03:04:05","host":"just","message":"words"}"#
        ]
    );
    let logged = stream(&env, "viaLogger");
    let v: serde_json::Value = serde_json::from_str(&logged[0]).unwrap();
    assert_eq!(
        (v["app"].as_str(), v["message"].as_str()),
        (Some("viaLogger"), Some("hello \"quoted\""))
    );
    assert!(v["procid"].as_str().unwrap().parse::<u32>().is_ok(), "{v}");
    assert!(v.get("host").is_none(), "logger sends no hostname to a local socket: {v}");
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

#[test]
fn bad_socket_input_is_counted_and_never_stops_a_source() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let (udp, tcp, json) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let body = format!(
        "[[sources.socket]]\nname = \"u\"\ntransport = \"udp\"\naddress = \"127.0.0.1:{udp}\"\n\
         message_bytes_max = 256\nservice = \"junk\"\nworker = 0\n\
         [[sources.socket]]\nname = \"t\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{tcp}\"\n\
         message_bytes_max = 256\nframing = \"octet_counting\"\nconnections_max = 2\nworker = 1\n\
         service = \"junk\"\n\
         [[sources.socket]]\nname = \"j\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{json}\"\n\
         format = \"json\"\nframing = \"newline\"\nservice = \"junkjson\"\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    let datagrams = send_bad_datagrams(udp);
    let _open = send_bad_streams(sm, tcp, json);
    // 6 datagrams less the empty one, 1 from tcp, 4 json lines.
    wait_lines(&mut shipper, &env, 5 + 1 + 4);
    check_bad_input_outputs(&env, &datagrams[1]);
    check_bad_input_counted(&shipper);
    assert!(shipper.log_text().contains("octet-counted message over message_bytes_max"));
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

/// Six datagrams to `udp`: garbage, invalid UTF-8, a bad PRI, an empty one, an oversize one,
/// and a good one after them; returns them.
fn send_bad_datagrams(udp: u16) -> Vec<Vec<u8>> {
    let udp_out = UdpSocket::bind("127.0.0.1:0").unwrap();
    let big = format!("<13>Jan  5 03:04:05 big: {}", "x".repeat(400));
    let datagrams: Vec<Vec<u8>> = vec![
        b"plain garbage".to_vec(),
        b"<13>Jan  5 03:04:05 t: \xff\xfe".to_vec(),
        b"<999>1 - - - - - -".to_vec(),
        b"".to_vec(),
        big.clone().into_bytes(),
        b"<13>Jan  5 03:04:05 good: after the junk".to_vec(),
    ];
    for d in &datagrams {
        udp_out.send_to(d, ("127.0.0.1", udp)).unwrap();
    }
    datagrams
}

/// Bad streams to the octet-counted source on `tcp` and the JSON one on `json`, and
/// connections past connections_max; returns the connections still open.
fn send_bad_streams(sm: u16, tcp: u16, json: u16) -> Vec<TcpStream> {
    let counter = |name: &str| metric(&scrape_ok(sm), name, &[("source", "t")]);
    // TCP: an oversize count is skipped (the stream stays in sync), garbage closes the stream.
    let mut t1 = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    let ok = "<13>Jan  5 03:04:05 good: tcp after oversize";
    t1.write_all(format!("1000 {}{} {ok}", "y".repeat(1000), ok.len()).as_bytes()).unwrap();
    let mut t2 = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    t2.write_all(b"not a count").unwrap();
    let text = b"{\"service\":\"svc\",\"n\":1}\n[1]\n{\"a\":\n\xff\n";
    let mut j = TcpStream::connect(("127.0.0.1", json)).unwrap();
    j.write_all(text).unwrap();
    wait_for("the garbage connection closed", LIMIT, || {
        counter("shipper_socket_framing_errors_total") == 1.0
    });
    wait_for("the message after the oversize one", LIMIT, || {
        counter("shipper_socket_messages_received_total") == 1.0
    });
    // Past connections_max (2 on the one worker: t1 and a third one held open), a new
    // connection evicts the longest-idle one (t1: it sent its bytes before t3 connected).
    let t3 = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    wait_for("two connections open", LIMIT, || counter("shipper_socket_connections_open") == 2.0);
    let t4 = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    wait_for("a connection evicted", LIMIT, || {
        counter("shipper_socket_connections_evicted_total") == 1.0
    });
    vec![t1, t2, j, t3, t4]
}

/// What arrived of the bad input: the junk as sent (`not_utf8` kept byte for byte), the
/// oversize message cut, the good ones after the junk.
fn check_bad_input_outputs(env: &Env, not_utf8: &[u8]) {
    let junk = stream(env, "junk");
    assert_eq!(
        junk,
        ["<13>Jan  5 03:04:05 t: \u{fffd}\u{fffd}", "<999>1 - - - - - -", "plain garbage"]
    );
    let raw = output_lines(&env.out());
    assert!(raw.contains(&("junk".into(), not_utf8.to_vec())), "non-UTF-8 kept as sent");
    let cut = format!(
        r#"{{"service":"big","facility":"user","severity":"notice","timestamp":"Jan  5 03:04:05","app":"big","message":"{}"}}"#,
        "x".repeat(256 - "<13>Jan  5 03:04:05 big: ".len())
    );
    assert_eq!(stream(env, "big"), [cut]);
    assert_eq!(
        stream(env, "good"),
        [
            r#"{"service":"good","facility":"user","severity":"notice","timestamp":"Jan  5 03:04:05","app":"good","message":"after the junk"}"#,
            r#"{"service":"good","facility":"user","severity":"notice","timestamp":"Jan  5 03:04:05","app":"good","message":"tcp after oversize"}"#,
        ]
    );
    assert_eq!(stream(env, "svc"), [r#"{"service":"svc","n":1}"#]);
    assert_eq!(stream(env, "junkjson").len(), 3);
}

/// Each bad input counted once, by source and reason.
fn check_bad_input_counted(shipper: &Proc) {
    let m = |name: &str, labels: &[(&str, &str)]| shipper.metric(name, labels);
    let reason =
        |source, r| m("shipper_socket_parse_failures_total", &[("source", source), ("reason", r)]);
    assert_eq!(reason("u", "no_pri"), 1.0);
    assert_eq!(reason("u", "invalid_utf8"), 1.0);
    assert_eq!(reason("u", "bad_pri"), 1.0);
    assert_eq!(reason("j", "not_object"), 1.0);
    assert_eq!(reason("j", "invalid_json"), 1.0);
    assert_eq!(reason("j", "invalid_utf8"), 1.0);
    assert_eq!(m("shipper_socket_messages_empty_total", &[("source", "u")]), 1.0);
    assert_eq!(m("shipper_socket_messages_oversize_total", &[("source", "u")]), 1.0);
    assert_eq!(m("shipper_socket_messages_oversize_total", &[("source", "t")]), 1.0);
    assert_eq!(m("shipper_socket_messages_received_total", &[("source", "u")]), 6.0);
}
