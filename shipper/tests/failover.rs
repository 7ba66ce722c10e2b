use std::io::Write;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::pipe::line;

const WRITTEN: &str = "shipper_receiver_records_written_total";

/// A shipper sending to `primary`, with `tiers` (TOML lines) added to `[receivers]`, reading
/// `app.pipe`, with timeouts short enough for a test.
fn start(env: &Env, primary: u16, metrics: u16, tiers: &str) -> Proc {
    let pipe = env.path("app.pipe");
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\n[batch]\nflush_interval_ms = 20\n");
    let receivers = format!(
        "ack_timeout_ms = 800\nheartbeat_interval_ms = 200\nhandshake_timeout_ms = 300\n\
         connect_timeout_ms = 300\nconnections = 1\n{tiers}"
    );
    let cfg =
        env.shipper_toml(primary, metrics, &body).replace("ack_timeout_ms = 3000", &receivers);
    let path = env.write("edge.toml", &cfg);
    Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], metrics, env.path("s.log"))
}

fn label(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A primary that stops acknowledging under load (SIGSTOP) loses the traffic to the standby
/// within 2 s; after SIGCONT the traffic returns. Every line arrives, at most once per
/// receiver, and the application's blocking writes never stall.
#[test]
fn hung_primary_fails_over_to_the_standby_and_back() {
    let env = Env::new();
    let (pp, pm, sp, spm, sm) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let (pout, sout) = (env.path("primary"), env.path("standby"));
    let primary = start_receiver_into(&env, pp, pm, &pout);
    let standby = start_receiver_into(&env, sp, spm, &sout);
    let mut shipper = start(&env, pp, sm, &format!("standby = [{:?}]", label(sp)));
    let writer = SteadyWriter::start(&env.path("app.pipe"), 0, 4000);
    shipper.wait_alive("the primary taking lines", || primary.metric(WRITTEN, &[]) >= 2000.0);
    assert_eq!(standby.metric(WRITTEN, &[]), 0.0, "a standby is idle while a primary is up");

    primary.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    shipper.wait_alive("the standby taking lines", || standby.metric(WRITTEN, &[]) > 0.0);
    let failover = stopped.elapsed();
    assert!(failover < Duration::from_secs(2), "failover took {failover:?}");
    let on_standby = standby.metric(WRITTEN, &[]);
    shipper.wait_alive("more lines on the standby", || {
        standby.metric(WRITTEN, &[]) >= on_standby + 2000.0
    });

    primary.signal(libc::SIGCONT);
    let healthy = [("receiver", label(pp))];
    let healthy: Vec<(&str, &str)> = healthy.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Generous deadlines from here: the resumed primary first works through the probe
    // connections queued while it was stopped.
    let long = Duration::from_secs(60);
    shipper.wait_alive_for("the primary healthy on both workers", long, &mut || {
        metric_at(sm, "shipper_receiver_healthy", &healthy) == 2.0
    });
    let standby_conns = [("receiver", label(sp))];
    let standby_conns: Vec<(&str, &str)> =
        standby_conns.iter().map(|(k, v)| (*k, v.as_str())).collect();
    shipper.wait_alive_for("the standby connections closed", long, &mut || {
        metric_at(sm, "shipper_receiver_connections_up", &standby_conns) == 0.0
    });
    // Counters and gauges of a core are published together: this is the final count.
    let sent = "shipper_receiver_frames_sent_total";
    let standby_total = metric_at(sm, sent, &standby_conns);
    let resume = writer.written();
    shipper.wait_alive("4000 more lines written", || writer.written() >= resume + 4000);
    let (lines, longest) = writer.finish();
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric_at(sm, "shipper_records_acked_total", &[]) == lines as f64
    });
    assert_eq!(metric_at(sm, sent, &standby_conns), standby_total, "back to the primary");
    assert!(shipper.metric("shipper_failovers_total", &[]) >= 1.0);
    assert!(shipper.metric("shipper_failbacks_total", &[]) >= 1.0);

    // Each receiver writes a line at most once; frames in flight to the hung primary were
    // resent to the standby, so those lines may be in both.
    let both = copies(&[&pout, &sout], 0, lines);
    assert!(both.iter().all(|&n| n >= 1), "every line arrived");
    assert!(copies(&[&pout], 0, lines).iter().all(|&n| n <= 1));
    assert!(copies(&[&sout], 0, lines).iter().all(|&n| n <= 1));
    eprintln!("failover {failover:?}; longest write() {longest:?}; {lines} lines");
    assert!(longest < Duration::from_millis(10), "a write() blocked for {longest:?}");
}

/// With no primary or standby up, frames go to the dead-letter receiver flagged as such: it
/// keeps them apart (`STREAM@dead_letter`). Once a primary answers, frames go back to it.
#[test]
fn dead_letter_takes_frames_only_while_every_other_tier_is_down() {
    const LINES: usize = 5000;
    let env = Env::new();
    let (pp, pm, dp, dm, sm) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let (pout, dout) = (env.path("primary"), env.path("dead"));
    let dead = start_receiver_into(&env, dp, dm, &dout);
    let mut shipper = start(&env, pp, sm, &format!("dead_letter = [{:?}]", label(dp)));
    let mut w = open_writer(&env.path("app.pipe"));
    for seq in 0..LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("the dead-letter receiver taking every line", || {
        dead.metric("shipper_receiver_records_dead_letter_total", &[]) == LINES as f64
    });
    let streams: Vec<String> = output_lines(&dout).into_iter().map(|(s, _)| s).collect();
    assert!(streams.iter().all(|s| s == "w0@dead_letter"), "{:?}", streams.first());
    let acked = dead.metric("shipper_receiver_frames_acked_total", &[]);
    shipper.wait_alive("every frame counted as dead-lettered", || {
        metric_at(sm, "shipper_frames_dead_lettered_total", &[]) == acked
    });

    let primary = start_receiver_into(&env, pp, pm, &pout);
    let dl = [("receiver", label(dp))];
    let dl: Vec<(&str, &str)> = dl.iter().map(|(k, v)| (*k, v.as_str())).collect();
    shipper.wait_alive("the dead-letter connections closed", || {
        metric_at(sm, "shipper_receiver_connections_up", &dl) == 0.0
    });
    for seq in LINES..2 * LINES {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper
        .wait_alive("the primary taking the rest", || primary.metric(WRITTEN, &[]) == LINES as f64);
    assert_eq!(dead.metric(WRITTEN, &[]), LINES as f64);
    let seen = copies(&[&pout, &dout], 0, 2 * LINES);
    assert!(seen.iter().all(|&n| n == 1), "every line exactly once");
}
