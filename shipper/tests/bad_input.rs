use std::io::Write;
use std::time::Duration;

use shipper::protocol::frame::{Header, Kind, FLAG_ZSTD, HEADER_BYTES};
use shipper::protocol::{Frame, Hello, RecordWriter};

use testkit::rng::XorShift64;

use crate::harness::*;

/// Deterministic garbage lines: random bytes, no newline.
fn garbage(n: usize, len: usize) -> Vec<Vec<u8>> {
    let mut rng = XorShift64::new(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    let x = rng.next();
                    match (x >> 24) as u8 {
                        b'\n' => b'.',
                        b => b,
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn pipe_garbage_is_passed_as_text_truncated_and_counted() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let body =
        format!("[[sources.pipe]]\npath = {pipe:?}\nservice = \"junk\"\nline_bytes_max = 1024\n");
    let mut shipper = start_shipper(&env, port, sm, &body);
    let big = format!("{{\"service\":\"big\",\"pad\":\"{}\"}}", "x".repeat(10 << 20));
    let junk = garbage(100, 200);
    let mut expect_junk: Vec<Vec<u8>> = vec![
        big.as_bytes()[..1024].to_vec(),
        b"{\"service\":\"ok\",\"m\":\"\xff\xfe\"}".to_vec(),
        b"{\"service\":\"ok\",\"m\":".to_vec(),
    ];
    expect_junk.extend(junk.iter().cloned());
    let mut input = b"{\"service\":\"ok\",\"n\":1}\n".to_vec();
    for l in &[big.as_bytes().to_vec()][..] {
        input.extend_from_slice(l);
        input.push(b'\n');
    }
    for l in &expect_junk[1..] {
        input.extend_from_slice(l);
        input.push(b'\n');
    }
    input.extend_from_slice(b"\n{\"service\":\"ok\",\"n\":2}\n");
    open_writer(&pipe).write_all(&input).unwrap();
    shipper.wait_alive("all lines acknowledged", || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) >= 105.0
    });
    let lines = output_lines(&env.out());
    let stream = |s: &str| -> Vec<Vec<u8>> {
        lines.iter().filter(|(n, _)| n == s).map(|(_, l)| l.clone()).collect()
    };
    assert_eq!(
        stream("ok"),
        vec![b"{\"service\":\"ok\",\"n\":1}".to_vec(), b"{\"service\":\"ok\",\"n\":2}".to_vec()]
    );
    assert_eq!(stream("junk"), expect_junk);
    let utf8_bad = junk.iter().filter(|l| std::str::from_utf8(l).is_err()).count() as f64;
    let m = |name: &str, labels: &[(&str, &str)]| shipper.metric(name, labels);
    assert_eq!(m("shipper_source_lines_read_total", &[]), 106.0);
    assert_eq!(m("shipper_source_lines_empty_total", &[]), 1.0);
    assert_eq!(m("shipper_source_lines_truncated_total", &[]), 1.0);
    assert_eq!(
        m("shipper_source_parse_failures_total", &[("reason", "invalid_utf8")]),
        1.0 + utf8_bad
    );
    assert_eq!(
        m("shipper_source_parse_failures_total", &[("reason", "invalid_json")]),
        2.0 + 100.0 - utf8_bad
    );
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

fn data_frame(seq: u64, records: &[(&[u8], &[u8])], declared_count: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    for (k, b) in records {
        RecordWriter::push(&mut raw, k, b);
    }
    let z = zstd::bulk::compress(&raw, 1).unwrap();
    let h = Header {
        kind: Kind::Data,
        flags: FLAG_ZSTD,
        seq,
        count: declared_count,
        raw_len: raw.len() as u32,
        len: z.len() as u32,
    };
    h.wire(&z)
}

#[test]
fn receiver_refuses_bad_clients_and_frames_and_keeps_serving() {
    let env = Env::new();
    let (port, rm) = (free_port(), free_port());
    let receiver =
        start_receiver(&env, port, rm, "frame_bytes_max = 65536\nframe_raw_bytes_max = 65536\n");
    let refused = |reason| {
        receiver.metric("shipper_receiver_connections_refused_total", &[("reason", reason)])
    };
    refuse_clients_without_a_trusted_certificate(&env, port);
    // The third: start_receiver's own probe of the port, a TCP connect without TLS.
    wait_for("three TLS refusals counted", Duration::from_secs(5), || refused("tls") == 3.0);

    refuse_bad_frames(&env, port);
    wait_for("frame refusals counted", Duration::from_secs(5), || refused("frame") == 3.0);
    assert_eq!(refused("hello"), 1.0);
    assert_eq!(receiver.metric("shipper_receiver_frames_rejected_total", &[]), 2.0);

    // After all that, a well-behaved client is served, and its frame written exactly once
    // even when sent twice.
    send_one_frame_twice(&env, port);
    let mut lines = output_lines(&env.out());
    lines.sort();
    let expected = [("after", &b"reject"[..]), ("svc", b"{\"ok\":true}")];
    let expected: Vec<(String, Vec<u8>)> =
        expected.iter().map(|(s, l)| (s.to_string(), l.to_vec())).collect();
    assert_eq!(lines, expected);
    wait_for("the duplicate counted", Duration::from_secs(5), || {
        receiver.metric("shipper_receiver_frames_duplicate_total", &[]) == 1.0
    });
}

/// A client config with the test PKI's shipper certificate.
fn good_client(env: &Env) -> rustls::ClientConfig {
    let p = &env.pki;
    shipper::tls::client_config(&p.ca, &p.shipper_cert, &p.shipper_key).unwrap()
}

/// A HELLO from a client without a certificate, then from one with another CA's: both are
/// refused by TLS.
fn refuse_clients_without_a_trusted_certificate(env: &Env, port: u16) {
    use rustls::pki_types::pem::PemObject;
    let p = &env.pki;
    let hello =
        || Frame::control(Kind::Hello, 0, &Hello { run_id: 1, core: 0, name: "x".into() }.encode());
    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&p.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let anonymous =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let mut c = RawClient::connect(port, anonymous);
    let _ = c.send(&hello());
    assert!(c.read().is_err(), "a client without certificate is refused by TLS");
    // A certificate from another CA.
    let other = shipper::tls::pki::generate(&env.path("other-pki"), &["localhost".into()]).unwrap();
    let mut foreign =
        shipper::tls::client_config(&p.ca, &other.shipper_cert, &other.shipper_key).unwrap();
    foreign.alpn_protocols.clear();
    let mut c = RawClient::connect(port, foreign);
    let _ = c.send(&hello());
    assert!(c.read().is_err(), "a certificate from another CA is refused by TLS");
}

/// Bad frames on fresh connections, each refused with its reason: DATA before HELLO, not a
/// frame, oversized, a flipped byte (all ending the connection), a wrong record count and a
/// decompression bomb (both REJECTed, the connection going on).
fn refuse_bad_frames(env: &Env, port: u16) {
    // DATA before HELLO.
    let mut c = RawClient::connect(port, good_client(env));
    c.send(&data_frame(1, &[(b"s", b"x")], 1)).unwrap();
    c.expect_error("expected HELLO");
    // Not a frame at all.
    let mut c = RawClient::connect(port, good_client(env));
    c.hello(2);
    c.send(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    c.expect_error("bad magic");
    // Oversized frame: the header alone is refused, the payload is never read.
    let mut c = RawClient::connect(port, good_client(env));
    c.hello(3);
    let mut h = data_frame(1, &[(b"s", b"x")], 1);
    h[24..28].copy_from_slice(&(100u32 << 20).to_le_bytes());
    c.send(&h[..HEADER_BYTES]).unwrap();
    c.expect_error("exceeds the limit of 65536 bytes");
    // Flipped payload byte.
    let mut c = RawClient::connect(port, good_client(env));
    c.hello(4);
    let mut f = data_frame(1, &[(b"s", b"x")], 1);
    let last = f.len() - 1;
    f[last] ^= 0xff;
    c.send(&f).unwrap();
    c.expect_error("checksum mismatch");
    refuse_unwritable_frames(env, port);
}

/// Frames that can never be written are refused for good (REJECT), and the connection goes
/// on with the next frame.
fn refuse_unwritable_frames(env: &Env, port: u16) {
    // Declared record count does not match the payload.
    let mut c = RawClient::connect(port, good_client(env));
    c.hello(5);
    c.send(&data_frame(1, &[(b"s", b"x")], 2)).unwrap();
    c.expect_reject(1, "header declares 2");
    c.send(&data_frame(2, &[(b"after", b"reject")], 1)).unwrap();
    let ack = c.read().unwrap().unwrap();
    assert_eq!((ack.header.kind, ack.header.seq), (Kind::Ack, 2));
    // A decompression bomb: more than frame_raw_bytes_max once inflated.
    let mut c = RawClient::connect(port, good_client(env));
    c.hello(6);
    let zeros = vec![0u8; 1 << 20];
    let z = zstd::bulk::compress(&zeros, 19).unwrap();
    let hd = Header {
        kind: Kind::Data,
        flags: FLAG_ZSTD,
        seq: 1,
        count: 1,
        raw_len: 60_000,
        len: z.len() as u32,
    };
    let bomb = hd.wire(&z);
    c.send(&bomb).unwrap();
    c.expect_reject(1, "zstd");
}

/// A good client's frame, sent twice: both are acknowledged.
fn send_one_frame_twice(env: &Env, port: u16) {
    let mut c = RawClient::connect(port, good_client(env));
    c.hello(7);
    let f = data_frame(1, &[(b"svc", b"{\"ok\":true}")], 1);
    c.send(&f).unwrap();
    c.send(&f).unwrap();
    for _ in 0..2 {
        let ack = c.read().unwrap().unwrap();
        assert_eq!((ack.header.kind, ack.header.seq), (Kind::Ack, 1));
    }
}

// Regression: the HELLO's run id was not tied to the client certificate, so one certificate
// could mark another host's sequence numbers as written and make the receiver drop its frames
// as duplicates. Now each certificate's streams are its own.
#[test]
fn a_certificate_cannot_mark_another_hosts_frames_as_written() {
    let env = Env::new();
    let (port, rm) = (free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, "");
    let p = &env.pki;
    let mut a = RawClient::connect(
        port,
        shipper::tls::client_config(&p.ca, &p.shipper_cert, &p.shipper_key).unwrap(),
    );
    let other = shipper::tls::client_config(&p.ca, &p.other_shipper_cert, &p.other_shipper_key);
    let mut b = RawClient::connect(port, other.unwrap());
    a.hello(99);
    b.hello(99);
    let exchange = |c: &mut RawClient, seq: u64, line: &[u8]| {
        c.send(&data_frame(seq, &[(b"s", line)], 1)).unwrap();
        let ack = c.read().unwrap().unwrap();
        assert_eq!((ack.header.kind, ack.header.seq), (Kind::Ack, seq));
    };
    exchange(&mut a, 1, b"A1");
    // B claims A's run id and sends the seq A will send next.
    exchange(&mut b, 2, b"B2");
    exchange(&mut a, 2, b"A2");
    let mut lines: Vec<Vec<u8>> = output_lines(&env.out()).into_iter().map(|(_, l)| l).collect();
    lines.sort();
    assert_eq!(lines, vec![b"A1".to_vec(), b"A2".to_vec(), b"B2".to_vec()]);
    wait_for("three frames counted", Duration::from_secs(5), || {
        receiver.metric("shipper_receiver_records_written_total", &[]) == 3.0
    });
    assert_eq!(receiver.metric("shipper_receiver_frames_duplicate_total", &[]), 0.0);
}

/// A DATA frame `seq` carrying `origin` and one record `line` of stream `s`.
fn origin_frame(seq: u64, origin: shipper::protocol::Origin, line: &[u8]) -> Vec<u8> {
    use shipper::protocol::frame::FLAG_ORIGIN;
    let mut raw = Vec::new();
    RecordWriter::push(&mut raw, b"s", line);
    let payload = [&origin.encode()[..], &zstd::bulk::compress(&raw, 1).unwrap()].concat();
    let (raw_len, len) = (raw.len() as u32, payload.len() as u32);
    let flags = FLAG_ZSTD | FLAG_ORIGIN;
    Header { kind: Kind::Data, flags, seq, count: 1, raw_len, len }.wire(&payload)
}

// Guards the origin a frame carries (sent again from a shipper's disk buffer) as the hostile
// input it can be: filed under its run mixed with the sender's certificate, it cannot mark
// another certificate's frames as written; one connection naming more than 64 origin streams
// has the frames of the others de-duplicated under its own stream, counted; a payload too
// short for its origin is refused for good.
#[test]
fn an_origin_is_tied_to_its_certificate_and_bounded_per_connection() {
    use shipper::protocol::Origin;
    let env = Env::new();
    let (port, rm) = (free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, "");
    let p = &env.pki;
    let good = || shipper::tls::client_config(&p.ca, &p.shipper_cert, &p.shipper_key).unwrap();
    let other = shipper::tls::client_config(&p.ca, &p.other_shipper_cert, &p.other_shipper_key);
    let (mut a, mut b) =
        (RawClient::connect(port, good()), RawClient::connect(port, other.unwrap()));
    a.hello(50);
    b.hello(51);
    let exchange = |c: &mut RawClient, frame: &[u8], seq: u64| {
        c.send(frame).unwrap();
        let ack = c.read().unwrap().unwrap();
        assert_eq!((ack.header.kind, ack.header.seq), (Kind::Ack, seq));
    };
    let first = Origin { run_id: 50, core: 0, seq: 1 };
    exchange(&mut a, &data_frame(1, &[(b"s", b"A1")], 1), 1);
    // B names A's frame as its origin: filed under B's certificate, so written.
    exchange(&mut b, &origin_frame(1, first, b"B1"), 1);
    // A sends its frame again, as the next run would: recognised, not written.
    exchange(&mut a, &origin_frame(2, first, b"A1"), 2);
    let mut c = RawClient::connect(port, good());
    c.hello(52);
    for i in 0..65u64 {
        let origin = Origin { run_id: 1000 + i, core: 0, seq: 1 };
        exchange(&mut c, &origin_frame(i + 1, origin, format!("o{i}").as_bytes()), i + 1);
    }
    // The 65th origin stream is past the bound: its frame is filed under the connection's
    // own number, 65, and a resend under that number is a duplicate.
    exchange(&mut c, &origin_frame(65, Origin { run_id: 1064, core: 0, seq: 1 }, b"o64"), 65);
    let short = Header {
        kind: Kind::Data,
        flags: FLAG_ZSTD | shipper::protocol::frame::FLAG_ORIGIN,
        seq: 66,
        count: 1,
        raw_len: 10,
        len: 10,
    };
    c.send(&short.wire(&[0; 10])).unwrap();
    c.expect_reject(66, "shorter than its origin");
    let mut lines: Vec<Vec<u8>> = output_lines(&env.out()).into_iter().map(|(_, l)| l).collect();
    lines.sort();
    let mut expected: Vec<Vec<u8>> = (0..65).map(|i| format!("o{i}").into_bytes()).collect();
    expected.extend([b"A1".to_vec(), b"B1".to_vec()]);
    expected.sort();
    assert_eq!(lines, expected);
    // Written, duplicates, origins, origins ignored, rejected: the shards publish apart.
    let m = |name: &str| receiver.metric(&format!("shipper_receiver_{name}_total"), &[]);
    let figures = || {
        let names = ["records_written", "frames_duplicate", "frames_origin"];
        let more = ["frames_origin_ignored", "frames_rejected"];
        names.iter().chain(&more).map(|n| m(n)).collect::<Vec<_>>()
    };
    let expected = [67.0, 2.0, 68.0, 2.0, 1.0];
    wait_for("every frame counted", Duration::from_secs(5), || figures() == expected);
}
