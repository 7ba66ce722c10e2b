use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// Export-format entries `from..to`, each with four unique fields, so that journal-remote's
/// data hash table fills (and the file rotates) every ~44,000 entries.
fn entries(from: usize, to: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in from..to {
        let _ = write!(
            out,
            "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID=0123456789abcdef0123456789abcdef\n\
             SYSLOG_IDENTIFIER=follow\nMESSAGE=entry {i}\nREQ={i:x}\nA={}\nB={}\n\n",
            1_700_000_000_000_000u64 + i as u64,
            1_000_000 + i as u64,
            i * 3,
            i * 7
        );
    }
    out
}

/// A systemd-journal-remote writing `dir/live.journal` from what is written to the returned
/// stdin, rotating as its files fill.
fn live_journal(dir: &Path) -> (std::process::Child, std::process::ChildStdin) {
    std::fs::create_dir_all(dir).unwrap();
    let mut remote = Command::new("/lib/systemd/systemd-journal-remote")
        .arg(format!("--output={}", dir.join("live.journal").display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-journal-remote (run `cargo xtask setup`)");
    let feed = remote.stdin.take().unwrap();
    (remote, feed)
}

/// Entries `0..n` written into `dir` by a systemd-journal-remote that has exited.
fn write_journal(dir: &Path, n: usize) {
    let (mut remote, mut feed) = live_journal(dir);
    feed.write_all(&entries(0, n)).unwrap();
    drop(feed);
    assert!(remote.wait().unwrap().success());
}

/// How many times each of entries `0..n` is in the receiver's output at `out`.
fn arrivals(out: &Path, n: usize) -> Vec<u32> {
    let mut seen = vec![0u32; n];
    for (_, l) in output_lines(out) {
        seen[index(&l)] += 1;
    }
    seen
}

/// The index in `MESSAGE` of an output record.
fn index(line: &[u8]) -> usize {
    let v: serde_json::Value = serde_json::from_slice(line).unwrap();
    v["MESSAGE"].as_str().unwrap().strip_prefix("entry ").unwrap().parse().unwrap()
}

fn shipper_body(dir: &Path, checkpoint: &Path) -> String {
    format!(
        "[[sources.journal]]\ndirectory = {dir:?}\npoll_interval_ms = 50\ncheckpoint = {checkpoint:?}\n\
         [batch]\nbatch_events_max = 500\nflush_interval_ms = 20\n"
    )
}

/// Entries written while the shipper runs, across journal-remote's rotations, arrive once
/// each and in order, though each worker has four connections to the receiver (journal
/// frames are in flight on one connection at a time).
#[test]
fn follows_live_journal_across_rotations_exactly_once_in_order() {
    const N: usize = 120_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let jdir = env.path("journal");
    let (mut remote, mut feed) = live_journal(&jdir);
    feed.write_all(&entries(0, 1000)).unwrap();
    feed.flush().unwrap();
    let body = shipper_body(&jdir, &env.path("cursor"));
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\nconnections = 4");
    let cfg_path = env.write("edge.toml", &cfg);
    let mut shipper = Proc::start(
        "shipper",
        &["run", "--config", cfg_path.to_str().unwrap()],
        sm,
        env.path("s.log"),
    );
    for chunk in (1000..N).step_by(5000) {
        feed.write_all(&entries(chunk, (chunk + 5000).min(N))).unwrap();
        feed.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(feed);
    assert!(remote.wait().unwrap().success());
    let files = std::fs::read_dir(&jdir).unwrap().count();
    assert!(files >= 3, "journal-remote rotated {} times", files - 1);
    let checkpoint = env.path("cursor");
    shipper.wait_alive_for(
        "the checkpoint at the last entry",
        Duration::from_secs(120),
        &mut || checkpoint_at(&checkpoint, N),
    );
    let lines = output_lines(&env.out());
    let got: Vec<usize> = lines.iter().map(|(_, l)| index(l)).collect();
    if got.len() != N {
        let set: std::collections::HashSet<usize> = got.iter().copied().collect();
        let missing: Vec<usize> = (0..N).filter(|i| !set.contains(i)).collect();
        panic!(
            "{} entries received; missing {} from {:?} to {:?}\n{}\n{}",
            got.len(),
            missing.len(),
            missing.first(),
            missing.last(),
            shipper.nonzero_metrics(),
            shipper.log_text()
        );
    }
    assert!(got.iter().enumerate().all(|(i, &g)| g == i), "entries in order, each once");
    // The gauges are published every 250 ms: the checkpoint can be there before the lag's
    // last figure is.
    shipper.wait_alive("the lag published as 0", || {
        metric(&scrape_ok(sm), "shipper_journal_lag_entries", &[]) == 0.0
    });
    assert_eq!(shipper.metric("shipper_journal_corrupt_objects_total", &[]), 0.0);
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// Entries in the journal file or directory at `path`, as `shipper journal cat` prints them.
fn journal_entries(path: &Path) -> usize {
    let out = Command::new(BIN).args(["journal", "cat"]).arg(path).output().unwrap();
    assert!(out.status.success(), "journal cat {}", path.display());
    out.stdout.iter().filter(|&&b| b == b'\n').count()
}

/// Whether the checkpoint at `path` has reached entry seqnum `n` (the last one).
fn checkpoint_at(path: &Path, n: usize) -> bool {
    std::fs::read_to_string(path).is_ok_and(|c| c.contains(&format!(";i={n:x};")))
}

/// SIGKILL mid-stream, then a restart from the checkpoint: every entry arrives, and the only
/// repeats are entries after the checkpoint written at the kill (frames that were in flight).
#[test]
fn shipper_killed_mid_stream_resumes_from_its_checkpoint() {
    const N: usize = 60_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let jdir = env.path("journal");
    let (mut remote, mut feed) = live_journal(&jdir);
    let checkpoint = env.path("cursor");
    let body = shipper_body(&jdir, &checkpoint);
    let mut shipper = start_shipper(&env, port, sm, &body);
    let half = N / 2;
    feed.write_all(&entries(0, half)).unwrap();
    feed.flush().unwrap();
    shipper.wait_alive("some entries acknowledged", || checkpoint.exists());
    shipper.signal(libc::SIGKILL);
    let _ = shipper.child.wait();
    let saved = std::fs::read_to_string(&checkpoint).unwrap();
    let seqnum = saved.split(";i=").nth(1).unwrap().split(';').next().unwrap();
    let saved_seqnum = u64::from_str_radix(seqnum, 16).unwrap();
    let mut shipper = start_shipper(&env, port, sm, &body);
    feed.write_all(&entries(half, N)).unwrap();
    drop(feed);
    assert!(remote.wait().unwrap().success());
    shipper.wait_alive_for(
        "the checkpoint at the last entry",
        Duration::from_secs(60),
        &mut || checkpoint_at(&checkpoint, N),
    );
    let seen = arrivals(&env.out(), N);
    let missing: Vec<usize> = (0..N).filter(|&i| seen[i] == 0).collect();
    assert!(missing.is_empty(), "{} entries missing, first {:?}", missing.len(), missing.first());
    // Entry i has seqnum i + 1: repeats only after the checkpoint.
    for (i, &n) in seen.iter().enumerate() {
        if n > 1 {
            assert!(
                i as u64 + 1 > saved_seqnum,
                "entry {i} repeated though checkpointed at {saved_seqnum}"
            );
        }
    }
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// With no receiver, a journal source fills its outbox and then pauses (nothing dropped, the
/// rest waits on disk); the archived file it is in the middle of is deleted meanwhile (vacuum);
/// once a receiver appears, every entry arrives exactly once, the vacuumed file's rest read
/// through the descriptor the source holds.
#[test]
fn journal_source_pauses_instead_of_dropping() {
    const N: usize = 60_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let jdir = env.path("journal");
    write_journal(&jdir, N);
    let checkpoint = env.path("cursor");
    let body =
        shipper_body(&jdir, &checkpoint).replace("[batch]\n", "[batch]\nbatch_bytes_max = 65536\n");
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\noutbox_bytes_max = 262144");
    let path = env.write("edge.toml", &cfg);
    let mut shipper =
        Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, env.path("s.log"));
    let read = || metric(&scrape_ok(sm), "shipper_journal_entries_read_total", &[]);
    shipper.wait_alive("the outbox to fill", || {
        metric(&scrape_ok(sm), "shipper_outbox_records", &[]) > 0.0 && read() > 0.0
    });
    // Observe a second of metrics (four publications): the source must stay paused.
    let before = read();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(read(), before, "the source kept reading with a full outbox");
    assert!(before < N as f64, "paused before the end ({before} of {N})");
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    let archived: Vec<_> = std::fs::read_dir(&jdir)
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().contains('@'))
        .collect();
    assert_eq!(archived.len(), 1, "{N} entries rotate once");
    let unread = journal_entries(&archived[0].path()) as f64 - before;
    assert!(unread > 0.0, "the archived file still has unread entries");
    std::fs::remove_file(archived[0].path()).unwrap();
    let _receiver = start_receiver(&env, port, rm, "");
    shipper.wait_alive_for(
        "the checkpoint at the last entry",
        Duration::from_secs(60),
        &mut || checkpoint_at(&checkpoint, N),
    );
    let seen = arrivals(&env.out(), N);
    assert!(seen.iter().all(|&n| n == 1), "every entry exactly once");
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
}

/// `since = "now"` skips what is on disk at start, and archived files deleted under the
/// running source (vacuum) disturb nothing: exactly the entries written after start arrive.
#[test]
fn since_now_and_vacuum() {
    const OLD: usize = 50_000;
    const NEW: usize = 2_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let jdir = env.path("journal");
    let (mut remote, mut feed) = live_journal(&jdir);
    feed.write_all(&entries(0, OLD)).unwrap();
    feed.flush().unwrap();
    // Wait until journal-remote has written every old entry (rotating once on the way).
    wait_for("the old entries on disk", Duration::from_secs(30), || journal_entries(&jdir) == OLD);
    assert!(std::fs::read_dir(&jdir).unwrap().count() >= 2, "the old entries span two files");
    let checkpoint = env.path("cursor");
    let body = shipper_body(&jdir, &checkpoint)
        .replace("poll_interval_ms = 50", "poll_interval_ms = 50\nsince = \"now\"");
    let mut shipper = start_shipper(&env, port, sm, &body);
    shipper.wait_alive("the files opened", || {
        metric(&scrape_ok(sm), "shipper_journal_files_open", &[]) >= 1.0
    });
    // Vacuum: the archived files go away while the shipper runs.
    for f in std::fs::read_dir(&jdir).unwrap().flatten() {
        if f.file_name().to_string_lossy().contains('@') {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    feed.write_all(&entries(OLD, OLD + NEW)).unwrap();
    drop(feed);
    assert!(remote.wait().unwrap().success());
    let _receiver = start_receiver(&env, port, rm, "");
    shipper.wait_alive_for(
        "the checkpoint at the last entry",
        Duration::from_secs(60),
        &mut || checkpoint_at(&checkpoint, OLD + NEW),
    );
    let got: Vec<usize> = output_lines(&env.out()).iter().map(|(_, l)| index(l)).collect();
    let want: Vec<usize> = (OLD..OLD + NEW).collect();
    assert!(
        got == want,
        "expected entries {OLD}..{}, got {} from {:?} to {:?}",
        OLD + NEW,
        got.len(),
        got.first(),
        got.last()
    );
}

/// Journal entries still unacknowledged at the shutdown deadline are not lost, nor counted as
/// dropped: the next run reads them again from the checkpoint, and each arrives once.
#[test]
fn journal_entries_unacknowledged_at_shutdown_are_read_again() {
    const N: usize = 5_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let jdir = env.path("journal");
    write_journal(&jdir, N);
    let checkpoint = env.path("cursor");
    let body = shipper_body(&jdir, &checkpoint);
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 300");
    let path = env.write("edge.toml", &cfg);
    let start = || {
        let log = env.path(&format!("s{}.log", free_port()));
        Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, log)
    };
    // No receiver: the entries read wait in the outbox until the deadline.
    let mut shipper = start();
    shipper.wait_alive("entries in the outbox", || {
        metric(&scrape_ok(sm), "shipper_outbox_records", &[]) > 0.0
    });
    assert!(shipper.stop(Duration::from_secs(20)).success());
    let log = shipper.log_text();
    assert!(log.contains("reads them again from the checkpoint"), "{log}");
    assert!(!log.contains("dropped"), "journal entries counted as dropped:\n{log}");
    assert!(!checkpoint.exists(), "nothing was acknowledged, so no checkpoint");
    let ledger = exit_ledger(&log, &jdir);
    assert!(ledger["handed"] > 0, "{ledger:?}");
    assert_eq!((ledger["reread"], ledger["held"]), (ledger["handed"], 0), "{ledger:?}");
    let _receiver = start_receiver(&env, port, rm, "");
    let mut shipper = start();
    shipper.wait_alive_for(
        "the checkpoint at the last entry",
        Duration::from_secs(60),
        &mut || checkpoint_at(&checkpoint, N),
    );
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    assert!(arrivals(&env.out(), N).iter().all(|&n| n == 1), "every entry exactly once");
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// Pipe lines read beside a journal on one worker and unacknowledged at the shutdown deadline
/// are counted as dropped, every one, while the journal's entries are left to be read again.
#[test]
fn pipe_lines_beside_a_journal_are_counted_when_shutdown_gives_them_up() {
    // Regression: a frame could mix journal entries and pipe lines; at the deadline it was
    // given up as "read again from the checkpoint", and its pipe lines were lost uncounted.
    const N: usize = 2_000;
    const P: usize = 300;
    let env = Env::new();
    let (port, sm) = (free_port(), free_port());
    let jdir = env.path("journal");
    write_journal(&jdir, N);
    let pipe = env.path("app.pipe");
    // One open batch for everything read within 3 s: the entries and the lines meet in it.
    let body = shipper_body(&jdir, &env.path("cursor"))
        .replace("poll_interval_ms = 50\n", "poll_interval_ms = 50\nworker = 0\n")
        .replace("batch_events_max = 500\nflush_interval_ms = 20", "flush_interval_ms = 3000")
        + &format!("[[sources.pipe]]\npath = {pipe:?}\nworker = 0\n");
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 300");
    let path = env.write("edge.toml", &cfg);
    let log = env.path("shipper.log");
    // No receiver: everything read waits in the outbox until the deadline.
    let mut shipper = Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, log);
    shipper.wait_alive("every entry read", || {
        metric(&scrape_ok(sm), "shipper_journal_entries_read_total", &[]) == N as f64
    });
    let mut w = open_writer(&pipe);
    for n in 0..P {
        writeln!(w, r#"{{"service":"app","n":{n}}}"#).unwrap();
    }
    shipper.wait_alive("every entry and line in the outbox", || {
        metric(&scrape_ok(sm), "shipper_outbox_records", &[]) == (N + P) as f64
    });
    assert!(shipper.stop(Duration::from_secs(20)).success());
    let log = without_colours(&shipper.log_text());
    assert!(log.contains("reads them again from the checkpoint"), "{log}");
    let dropped = log
        .lines()
        .find(|l| l.contains("shutdown deadline passed with unacknowledged frames: dropped"))
        .unwrap_or_else(|| panic!("no drop at the deadline:\n{log}"));
    assert!(dropped.contains(&format!("records={P}")), "{dropped}");
    let (lines, entries) = (exit_ledger(&log, &pipe), exit_ledger(&log, &jdir));
    assert_eq!((lines["handed"], lines["shutdown"], lines["held"]), (P as u64, P as u64, 0));
    assert_eq!((entries["handed"], entries["reread"]), (N as u64, N as u64), "{entries:?}");
}

/// `text` without its ANSI colour sequences.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
    }
    out.push_str(rest);
    out
}
