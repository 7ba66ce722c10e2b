use std::io::Write;
use std::time::Duration;

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
        metric(&scrape(sm).unwrap_or_default(), "shipper_records_acked_total", &[])
            == (LINES / 2) as f64
    });
    receiver.signal(libc::SIGSTOP);
    for seq in LINES / 2..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("an ack timeout", || {
        metric(&scrape(sm).unwrap_or_default(), "shipper_ack_timeouts_total", &[]) >= 1.0
    });
    receiver.signal(libc::SIGCONT);
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric(&scrape(sm).unwrap_or_default(), "shipper_records_acked_total", &[]) == LINES as f64
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
        metric(&scrape(sm).unwrap_or_default(), "shipper_receiver_connect_failures_total", &[])
            >= 4.0
    });
    assert_eq!(shipper.metric("shipper_receiver_connects_total", &[]), 0.0);
    assert_eq!(shipper.metric("shipper_frames_sent_total", &[]), 0.0);
    assert!(output_lines(&env.out()).is_empty());
    assert!(shipper.log_text().contains("cannot connect"), "{}", shipper.log_text());
}
