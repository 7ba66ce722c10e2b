use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

/// Line `i` of a test log: JSON of a fixed length, so that an offset names a line.
fn line(i: usize) -> String {
    format!("{{\"service\":\"app\",\"seq\":\"{i:08}\"}}")
}

/// Bytes of one line of [`line`] with its newline.
const LINE_BYTES: u64 = 35;

fn body(paths: &[&Path], positions: &Path, extra: &str) -> String {
    let paths: Vec<String> =
        paths.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    format!(
        "[[sources.file]]\npaths = [{}]\npositions = {positions:?}\npoll_interval_ms = 20\n{extra}\
         [batch]\nbatch_events_max = 500\nflush_interval_ms = 20\n",
        paths.join(", ")
    )
}

/// Opens `path` for appending (created if missing), as a logging application does.
fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()
}

/// The offset saved for the one file in the positions file at `path`, if written.
fn saved_offset(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let entry = text.lines().find(|l| !l.starts_with('#'))?;
    entry.split(' ').nth(4)?.parse().ok()
}

/// The metrics once they count `n` lines read (counters are published every 250 ms).
fn lines_read(shipper: &mut Proc, sm: u16, n: usize) -> String {
    let mut text = String::new();
    shipper.wait_alive("the lines counted", || {
        text = scrape_ok(sm);
        metric(&text, "shipper_source_lines_read_total", &[]) == n as f64
    });
    text
}

fn received(env: &Env) -> Vec<String> {
    output_lines(&env.out()).into_iter().map(|(_, l)| String::from_utf8(l).unwrap()).collect()
}

/// A file rotated by rename (logrotate's `create`) and by copy-and-truncate
/// (`copytruncate`) while a writer appends: every line arrives once, in order.
#[test]
fn rotated_by_rename_and_by_copy_and_truncate_every_line_once_in_order() {
    const N: usize = 20_000;
    const EVERY: usize = 2_500;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let dir = env.path("logs");
    std::fs::create_dir(&dir).unwrap();
    let (log, old) = (dir.join("app.log"), dir.join("app.log.1"));
    let mut f = append(&log);
    let mut shipper = start_shipper(&env, port, sm, &body(&[&log], &env.path("positions"), ""));
    for i in 0..N {
        if i > 0 && i % EVERY == 0 && (i / EVERY) % 2 == 1 {
            std::fs::rename(&log, &old).unwrap();
            f = append(&log);
        } else if i > 0 && i % EVERY == 0 {
            // copytruncate loses what the source has not read when the file is cut (logrotate's
            // window, not the shipper's): the writer waits for the source to have read it all.
            shipper.wait_alive("the source to catch up", || {
                metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) == i as f64
            });
            std::fs::copy(&log, &old).unwrap();
            f.set_len(0).unwrap();
        }
        writeln!(f, "{}", line(i)).unwrap();
        if i % 50 == 49 {
            // Pacing the writer (10,000 lines a second), not waiting for a condition.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    shipper.wait_alive_for("every line at the receiver", Duration::from_secs(60), &mut || {
        output_lines(&env.out()).len() >= N
    });
    let want: Vec<String> = (0..N).map(line).collect();
    let got = received(&env);
    assert!(
        got == want,
        "{} lines received, first difference at {:?}",
        got.len(),
        got.iter().zip(&want).position(|(g, w)| g != w)
    );
    let text = lines_read(&mut shipper, sm, N);
    assert_eq!(metric(&text, "shipper_file_rotations_total", &[]), 4.0, "renames 1, 3, 5, 7");
    assert_eq!(metric(&text, "shipper_file_truncations_total", &[]), 3.0, "copies 2, 4, 6");
    assert_eq!(metric(&text, "shipper_source_lines_read_total", &[]), N as f64);
    assert_eq!(metric(&text, "shipper_lines_dropped_total", &[]), 0.0);
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// SIGKILL while a writer appends, then a restart: the first run delivered a prefix of the
/// file, and the second resumes exactly at the position saved at the kill, so the only
/// repeats are the lines between that position and what the receiver had (acknowledged or
/// in flight, but not yet saved).
#[test]
fn killed_and_restarted_resumes_at_its_saved_position() {
    const N: usize = 30_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let log = env.path("app.log");
    let positions = env.path("positions");
    let mut f = append(&log);
    let body = body(&[&log], &positions, "");
    let mut shipper = start_shipper(&env, port, sm, &body);
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            writeln!(f, "{}", line(i)).unwrap();
            if i % 50 == 49 {
                // Pacing the writer (10,000 lines a second), not waiting for a condition.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    shipper.wait_alive("5000 lines saved", || {
        saved_offset(&positions).is_some_and(|o| o >= 5000 * LINE_BYTES)
    });
    shipper.signal(libc::SIGKILL);
    let _ = shipper.child.wait();
    let saved = saved_offset(&positions).unwrap();
    assert_eq!(saved % LINE_BYTES, 0, "a position is always at the end of a line");
    let b = (saved / LINE_BYTES) as usize;
    let mut shipper = start_shipper(&env, port, sm, &body);
    writer.join().unwrap();
    shipper.wait_alive_for("the last line saved", Duration::from_secs(60), &mut || {
        saved_offset(&positions) == Some(N as u64 * LINE_BYTES)
    });
    let got = received(&env);
    let want: Vec<String> = (0..N).map(line).collect();
    let a = got.len() - (N - b);
    assert!(b <= a, "saved at line {b}, but the receiver had only {a} lines");
    assert!(got[..a] == want[..a], "the first run delivered lines 0..{a} in order");
    assert!(got[a..] == want[b..], "the second run resumed at the saved line {b}");
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// A line over `line_bytes_max` is cut and counted; a last line without its newline is sent
/// as it is after `partial_line_ms`, and what is appended to it later is a line of its own.
#[test]
fn over_long_line_cut_and_partial_last_line_sent_after_idle_time() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let log: PathBuf = env.path("notes.log");
    let mut f = append(&log);
    let extra = "format = \"text\"\nline_bytes_max = 64\npartial_line_ms = 300\n";
    let mut shipper = start_shipper(&env, port, sm, &body(&[&log], &env.path("positions"), extra));
    let long = "x".repeat(200);
    write!(f, "short\n{long}\nafter\nno newline yet").unwrap();
    shipper.wait_alive("four lines at the receiver", || output_lines(&env.out()).len() >= 4);
    writeln!(f, " then more").unwrap();
    shipper.wait_alive("five lines at the receiver", || output_lines(&env.out()).len() >= 5);
    let cut = "x".repeat(64);
    assert_eq!(received(&env), ["short", cut.as_str(), "after", "no newline yet", " then more"]);
    let text = lines_read(&mut shipper, sm, 5);
    assert_eq!(metric(&text, "shipper_source_lines_truncated_total", &[]), 1.0);
    assert_eq!(metric(&text, "shipper_file_lines_partial_total", &[]), 1.0);
    assert!(shipper.stop(Duration::from_secs(20)).success());
}
