use std::io::Write;
use std::time::Duration;

use testkit::netns::VethNamespace;

use crate::harness::*;
use crate::pipe::{ids, line};

/// A receiver that stops acknowledging (SIGSTOP: it still holds its sockets) is detected by
/// `ack_timeout_ms`, not by TCP; after SIGCONT everything arrives exactly once.
#[test]
fn hung_receiver_is_detected_by_ack_timeout_and_nothing_is_lost() {
    const LINES: usize = 20_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\n[batch]\nflush_interval_ms = 10\n");
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 500\nhandshake_timeout_ms = 300");
    let path = env.write("edge.toml", &cfg);
    let mut shipper =
        Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, env.path("s.log"));
    let mut w = open_writer(&pipe);
    for seq in 0..LINES / 2 {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("the first half acknowledged", || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) == (LINES / 2) as f64
    });
    receiver.signal(libc::SIGSTOP);
    for seq in LINES / 2..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("an ack timeout", || {
        metric(&scrape_ok(sm), "shipper_ack_timeouts_total", &[]) >= 1.0
    });
    receiver.signal(libc::SIGCONT);
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) == LINES as f64
    });
    let mut seen = vec![0u32; LINES];
    for (_, l) in output_lines(&env.out()) {
        let (_, seq) = ids(&l);
        assert_eq!(l, line(0, seq).as_bytes());
        seen[seq] += 1;
    }
    assert!(seen.iter().all(|&n| n == 1), "every line exactly once");
    assert!(shipper.metric("shipper_frames_resent_total", &[]) >= 1.0);
}

/// The shipper verifies the receiver: a certificate from another CA, or for another name, is
/// refused, and nothing is sent.
#[test]
fn shipper_refuses_a_receiver_it_cannot_verify() {
    for case in ["other CA", "wrong name"] {
        let env = Env::new();
        let (port, rm, sm) = (free_port(), free_port(), free_port());
        if case == "other CA" {
            // The receiver presents a certificate signed by a CA the shipper does not trust
            // (and trusts that CA's client certificates, so only the shipper can refuse).
            let other =
                shipper::tls::pki::generate(&env.path("other"), &["localhost".into()]).unwrap();
            let text = env.receiver_toml(port, rm, "");
            let text = text
                .replace(
                    env.pki.receiver_cert.to_str().unwrap(),
                    other.receiver_cert.to_str().unwrap(),
                )
                .replace(
                    env.pki.receiver_key.to_str().unwrap(),
                    other.receiver_key.to_str().unwrap(),
                );
            let cfg = env.write("receiver.toml", &text);
            let _r = Proc::start(
                "receiver",
                &["receive", "--config", cfg.to_str().unwrap()],
                rm,
                env.path("r.log"),
            );
            check_refused(&env, port, sm, "localhost");
        } else {
            let _r = start_receiver(&env, port, rm, "");
            check_refused(&env, port, sm, "receiver.example.net");
        }
    }
}

fn check_refused(env: &Env, port: u16, sm: u16, server_name: &str) {
    let pipe = env.path("app.pipe");
    let cfg = env
        .shipper_toml(port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"))
        .replace("server_name = \"localhost\"", &format!("server_name = \"{server_name}\""));
    let path = env.write("edge.toml", &cfg);
    let mut shipper =
        Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, env.path("s.log"));
    writeln!(open_writer(&pipe), r#"{{"service":"a"}}"#).unwrap();
    shipper.wait_alive("failed connection attempts", || {
        metric(&scrape_ok(sm), "shipper_receiver_connect_failures_total", &[]) >= 4.0
    });
    assert_eq!(shipper.metric("shipper_receiver_connects_total", &[]), 0.0);
    assert_eq!(shipper.metric("shipper_frames_sent_total", &[]), 0.0);
    assert!(output_lines(&env.out()).is_empty());
    assert!(shipper.log_text().contains("cannot connect"), "{}", shipper.log_text());
}

/// Drops every packet in and out of the namespace's side of the veth (an nftables table
/// inside the namespace): no RST, no ICMP, just silence. (This kernel has no netem.)
fn partition(ns: &VethNamespace, on: bool) {
    if !on {
        return ns.exec(&["nft", "delete", "table", "inet", "partition"]);
    }
    let dev = &ns.ns_if;
    let rules = format!(
        "table inet partition {{\n\
         chain input {{ type filter hook input priority 0; iifname \"{dev}\" drop; }}\n\
         chain output {{ type filter hook output priority 0; oifname \"{dev}\" drop; }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("{}.nft", ns.name));
    std::fs::write(&file, rules).unwrap();
    ns.exec(&["nft", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(file);
}

const NS_PEER_IP: &str = VethNamespace::PEER_IP;

/// A silent partition of 60 s between the shipper and its receiver (packets dropped both ways,
/// no RST): the receiver is declared down by its missing acks, the lines wait in the disk
/// buffer, and after the partition heals every line arrives exactly once. The application's
/// blocking writes never stall.
#[test]
#[ignore = "needs root: partitions a network namespace (ip netns, nft)"]
fn a_silent_partition_of_a_minute_loses_nothing() {
    require_root("partitions a network namespace (ip netns, nft)");
    let env = Env::new();
    let ns = VethNamespace::create();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let rx = env.receiver_toml(port, rm, "").replace("127.0.0.1:", &format!("{NS_PEER_IP}:"));
    let rx = env.write("receiver.toml", &rx);
    let args = ["netns", "exec", &ns.name, BIN, "receive", "--config", rx.to_str().unwrap()];
    let _receiver = Proc::start_any("receiver", "ip", &args, env.path("r.log"));
    wait_for("the receiver in the namespace", Duration::from_secs(10), || {
        std::net::TcpStream::connect((NS_PEER_IP, port)).is_ok()
    });
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n[batch]\nflush_interval_ms = 20\n\
         [buffer]\ndirectory = {:?}\nsegment_bytes = 65536\n",
        env.path("buffer")
    );
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("127.0.0.1:", &format!("{NS_PEER_IP}:"))
        .replace(&format!("{NS_PEER_IP}:{sm}"), &format!("127.0.0.1:{sm}"))
        .replace(
            "ack_timeout_ms = 3000",
            "ack_timeout_ms = 1000\nheartbeat_interval_ms = 200\nconnect_timeout_ms = 500\n\
             handshake_timeout_ms = 500",
        );
    let cfg = env.write("edge.toml", &cfg);
    let mut shipper =
        Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], sm, env.path("s.log"));
    let writer = SteadyWriter::start(&pipe, 0, 2000);
    shipper.wait_alive("lines acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= 2000.0
    });

    partition(&ns, true);
    shipper.wait_alive("the receiver declared down", || {
        metric_at(sm, "shipper_receiver_failures_total", &[]) >= 1.0
    });
    // The fault lasts a minute; the shipper must stay up throughout.
    let heal = std::time::Instant::now() + Duration::from_secs(60);
    shipper.wait_alive_for("the end of the partition", Duration::from_secs(70), &mut || {
        std::time::Instant::now() >= heal
    });
    assert!(metric_at(sm, "shipper_buffer_records_written_total", &[]) > 0.0);
    partition(&ns, false);

    let resume = writer.written();
    shipper.wait_alive("1000 more lines written", || writer.written() >= resume + 1000);
    let (lines, longest) = writer.finish();
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric_at(sm, "shipper_records_acked_total", &[]) == lines as f64
    });
    let seen = copies(&[&env.out()], 0, lines);
    assert!(seen.iter().all(|&n| n == 1), "every line exactly once");
    eprintln!("{lines} lines across a 60 s partition; longest write() {longest:?}");
    assert!(longest < Duration::from_millis(10), "a write() blocked for {longest:?}");
}
