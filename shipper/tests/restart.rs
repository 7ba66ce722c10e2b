use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use crate::pipe::{ids, line};

/// Frames the dead receiver wrote but never acknowledged are resent, and either cut from its
/// output at recovery (not committed) or recognised as duplicates (committed).
#[test]
fn receiver_killed_mid_stream_loses_and_duplicates_nothing() {
    const LINES: usize = 120_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    // With fsync on, as in production: acks wait for the output and the commit log on disk.
    let config = env.receiver_toml(port, rm, "").replace("fsync = false", "fsync = true");
    let mut receiver = start_receiver_toml(&env, port, rm, &config);
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n[batch]\nbatch_events_max = 500\nflush_interval_ms = 10\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut f = open_writer(&pipe);
            // Steady, paced writing so the kill lands mid-stream.
            for chunk in 0..LINES / 1000 {
                let mut buf = Vec::new();
                for seq in chunk * 1000..(chunk + 1) * 1000 {
                    buf.extend_from_slice(line(0, seq).as_bytes());
                    buf.push(b'\n');
                }
                f.write_all(&buf).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    receiver
        .wait_alive("a third of the lines written", || receiver_written(rm) >= (LINES / 3) as f64);
    receiver.signal(libc::SIGKILL);
    let _ = receiver.child.wait();
    // The receiver restarts only once the shipper has seen it go (and kept reading meanwhile).
    shipper.wait_alive("the shipper to see the receiver gone", || {
        metric(&scrape_ok(sm), "shipper_receiver_connections_lost_total", &[]) >= 1.0
    });
    let _receiver = start_receiver_toml(&env, port, rm, &config);
    writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(120), &mut || {
        metric(&scrape_ok(sm), "shipper_records_acked_total", &[]) >= LINES as f64
    });
    let lines = output_lines(&env.out());
    let mut seen = vec![0u32; LINES];
    for (_, l) in &lines {
        let (_, seq) = ids(l);
        assert_eq!(l.as_slice(), line(0, seq).as_bytes());
        seen[seq] += 1;
    }
    let missing = seen.iter().filter(|&&n| n == 0).count();
    let doubled = seen.iter().filter(|&&n| n > 1).count();
    assert_eq!((missing, doubled), (0, 0), "lines missing / written more than once");
    assert_eq!(lines.len(), LINES);
    assert!(shipper.metric("shipper_receiver_connections_lost_total", &[]) >= 1.0);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

fn receiver_written(port: u16) -> f64 {
    metric(&scrape_ok(port), "shipper_receiver_records_written_total", &[])
}
