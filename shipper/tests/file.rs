use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

/// Line `i` of a test log: JSON of a fixed length, so that an offset names a line, with
/// bytes that compress as poorly as real logs' (a frame's size is its compressed size).
fn line(i: usize) -> String {
    let mut x = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{{\"service\":\"app\",\"seq\":\"{i:08}\",\"pad\":\"{:016x}\"}}", x ^ (x >> 31))
}

/// Bytes of one line of [`line`] with its newline.
const LINE_BYTES: u64 = 60;

#[test]
fn lines_have_a_fixed_length() {
    assert_eq!(line(0).len() as u64 + 1, LINE_BYTES);
    assert_eq!(line(12_345_678).len() as u64 + 1, LINE_BYTES);
}

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
    // Per file: the live file, read to its end (the orphans are closed by now, or soon).
    let file = [("file", log.to_str().unwrap())];
    shipper.wait_alive("the live file's gauges", || {
        let text = scrape_ok(sm);
        let (read, size) = (
            metric(&text, "shipper_file_position_bytes", &file),
            metric(&text, "shipper_file_size_bytes", &file),
        );
        read == size && read == ((N - 17_500) as u64 * LINE_BYTES) as f64
    });
    let (lint_ok, said) = promtool_check(&scrape_ok(sm));
    assert!(lint_ok, "promtool check metrics, with a file source's families: {said}");
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// SIGKILL while a writer appends, then a restart: the first run delivered a prefix of the
/// file, and the second resumes exactly at the position saved at the kill, so every line
/// arrives, and the only repeats are the lines from that position to the end of what the
/// receiver had (acknowledged, or written and not acknowledged, but not saved yet).
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
    // The receiver writes each run's frames into the files of the shard that owns that run,
    // in order. When both runs have the same shard, the second run's lines follow the
    // first's in one file: the order steps back once, to the saved position, where the lines
    // written but not acknowledged before the kill come again.
    let mut seen = vec![0u32; N];
    for (k, lines) in seqs_per_file(&env).iter().enumerate() {
        let back: Vec<usize> = lines.windows(2).filter(|w| w[0] >= w[1]).map(|w| w[1]).collect();
        assert!(back.is_empty() || back == [b], "receiver file {k}: lines in order per run");
        lines.iter().for_each(|&i| seen[i] += 1);
    }
    let a = b + seen.iter().filter(|&&n| n == 2).count();
    let want: Vec<u32> = (0..N).map(|i| if (b..a).contains(&i) { 2 } else { 1 }).collect();
    let first = seen.iter().zip(&want).position(|(s, w)| s != w);
    assert!(
        first.is_none(),
        "saved at line {b}: lines {b}..{a} twice, the rest once; first wrong: {first:?}"
    );
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

/// With no receiver the source fills its outbox and pauses (nothing dropped, the rest waits
/// on disk); its file is deleted meanwhile; once a receiver appears every line arrives once,
/// in order, the rest read through the descriptor the source holds, and the file is closed.
#[test]
fn paused_without_a_receiver_and_a_deleted_file_read_to_its_end() {
    const N: usize = 60_000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let log = env.path("app.log");
    let mut f = append(&log);
    let all: String = (0..N).map(|i| line(i) + "\n").collect();
    f.write_all(all.as_bytes()).unwrap();
    let body = body(&[&log], &env.path("positions"), "")
        .replace("[batch]\n", "[batch]\nbatch_bytes_max = 65536\n");
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("ack_timeout_ms = 3000", "ack_timeout_ms = 3000\noutbox_bytes_max = 262144");
    let path = env.write("edge.toml", &cfg);
    let mut shipper =
        Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, env.path("s.log"));
    shipper.wait_alive("the outbox to fill", || {
        let text = scrape_ok(sm);
        metric(&text, "shipper_outbox_records", &[]) > 0.0
            && metric(&text, "shipper_file_files_open", &[]) == 1.0
    });
    let read = metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]);
    assert!(read < N as f64, "paused before the end ({read} of {N})");
    std::fs::remove_file(&log).unwrap();
    drop(f);
    let _receiver = start_receiver(&env, port, rm, "");
    let text = lines_read(&mut shipper, sm, N);
    assert_eq!(metric(&text, "shipper_lines_dropped_total", &[]), 0.0);
    assert_eq!(metric(&text, "shipper_file_rotations_total", &[]), 1.0, "the deletion");
    shipper.wait_alive_for("every line at the receiver", Duration::from_secs(60), &mut || {
        output_lines(&env.out()).len() >= N
    });
    let want: Vec<String> = (0..N).map(line).collect();
    assert!(received(&env) == want, "every line once, in order");
    shipper.wait_alive("the deleted file closed", || {
        metric(&scrape_ok(sm), "shipper_file_files_open", &[]) == 0.0
    });
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// A path that is a symbolic link is followed to its file; pointing the link at another file
/// is a rotation: the first file is read to its end, then the second from its start.
#[test]
fn a_symlink_is_followed_and_retargeting_it_is_a_rotation() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let (a, b, link) = (env.path("a.log"), env.path("b.log"), env.path("current.log"));
    let mut fa = append(&a);
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let mut shipper = start_shipper(&env, port, sm, &body(&[&link], &env.path("positions"), ""));
    for i in 0..100 {
        writeln!(fa, "{}", line(i)).unwrap();
    }
    shipper.wait_alive("the first file's lines", || output_lines(&env.out()).len() >= 100);
    let mut fb = append(&b);
    for i in 100..200 {
        writeln!(fb, "{}", line(i)).unwrap();
    }
    let tmp = env.path("current.tmp");
    std::os::unix::fs::symlink(&b, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let text = lines_read(&mut shipper, sm, 200);
    assert_eq!(metric(&text, "shipper_file_rotations_total", &[]), 1.0);
    shipper.wait_alive("every line at the receiver", || output_lines(&env.out()).len() >= 200);
    assert!(received(&env) == (0..200).map(line).collect::<Vec<_>>(), "once each, in order");
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// The seq of every line in each of the receiver's files of stream `app`, file by file.
fn seqs_per_file(env: &Env) -> Vec<Vec<usize>> {
    let index = |l: &[u8]| -> usize {
        let s = std::str::from_utf8(l).unwrap();
        s.split("\"seq\":\"").nth(1).unwrap()[..8].parse().unwrap()
    };
    let mut out = Vec::new();
    for file in std::fs::read_dir(env.out().join("app")).unwrap().flatten() {
        let bytes = std::fs::read(file.path()).unwrap();
        out.push(bytes.split(|&c| c == b'\n').filter(|l| !l.is_empty()).map(index).collect());
    }
    out
}

/// A file whose inode holds new content while the shipper is stopped (deleted and replaced by
/// a file the file system gives the same inode, as ext4 does at once; here rewritten in place,
/// so that the case happens on every file system) is told apart by its fingerprint: the new
/// content is read from its start, not from the old one's saved position.
#[test]
fn a_new_file_at_an_old_inode_is_read_from_its_start() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let (log, positions) = (env.path("app.log"), env.path("positions"));
    let mut f = append(&log);
    (0..100).for_each(|i| writeln!(f, "{}", line(i)).unwrap());
    drop(f);
    let body = body(&[&log], &positions, "");
    let mut shipper = start_shipper(&env, port, sm, &body);
    shipper
        .wait_alive("the first file saved", || saved_offset(&positions) == Some(100 * LINE_BYTES));
    assert!(shipper.stop(Duration::from_secs(20)).success());
    use std::os::unix::fs::MetadataExt;
    let old_inode = std::fs::metadata(&log).unwrap().ino();
    // New content at the same inode, whatever the file system does with deleted inodes: the
    // file rewritten in place (what a deleted file and a new one given its inode look like).
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&log).unwrap();
    assert_eq!(std::fs::metadata(&log).unwrap().ino(), old_inode);
    (1000..1150).for_each(|i| writeln!(f, "{}", line(i)).unwrap());
    let mut shipper = start_shipper(&env, port, sm, &body);
    shipper.wait_alive("the new file saved", || saved_offset(&positions) == Some(150 * LINE_BYTES));
    let files = seqs_per_file(&env);
    assert!(files.iter().all(|f| f.windows(2).all(|w| w[0] < w[1])), "in order per file");
    let mut all: Vec<usize> = files.concat();
    all.sort_unstable();
    let want: Vec<usize> = (0..100).chain(1000..1150).collect();
    assert!(all == want, "each line of both files once ({} received)", all.len());
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// With the rotated names in `paths` (`app.log*`), a renamed file is followed under its new
/// name, never read again; the one its rename replaced is read to its end: every line once,
/// in order.
#[test]
fn rotated_names_in_paths_are_followed_not_read_again() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let dir = env.path("logs");
    std::fs::create_dir(&dir).unwrap();
    let (log, old) = (dir.join("app.log"), dir.join("app.log.1"));
    let pattern = dir.join("app.log*");
    let mut shipper = start_shipper(&env, port, sm, &body(&[&pattern], &env.path("positions"), ""));
    let mut f = append(&log);
    for i in 0..3000 {
        if i == 1000 || i == 2000 {
            std::fs::rename(&log, &old).unwrap();
            f = append(&log);
        }
        writeln!(f, "{}", line(i)).unwrap();
        if i % 50 == 49 {
            // Pacing the writer (10,000 lines a second), not waiting for a condition.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let text = lines_read(&mut shipper, sm, 3000);
    // Renamed twice (the first file, then the second), and the first replaced (deleted).
    assert_eq!(metric(&text, "shipper_file_rotations_total", &[]), 3.0);
    shipper.wait_alive("every line at the receiver", || output_lines(&env.out()).len() >= 3000);
    assert!(received(&env) == (0..3000).map(line).collect::<Vec<_>>(), "once each, in order");
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// `since = "now"` skips what the files hold when the source starts; what is written after
/// arrives, and a file appearing later is read from its start.
#[test]
fn since_now_skips_what_is_there_at_start() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let dir = env.path("logs");
    std::fs::create_dir(&dir).unwrap();
    let (log, later) = (dir.join("a.log"), dir.join("b.log"));
    let mut f = append(&log);
    (0..100).for_each(|i| writeln!(f, "{}", line(i)).unwrap());
    let pattern = dir.join("*.log");
    let body = body(&[&pattern], &env.path("positions"), "since = \"now\"\n");
    let mut shipper = start_shipper(&env, port, sm, &body);
    shipper.wait_alive("the file followed", || {
        metric(&scrape_ok(sm), "shipper_file_files_open", &[]) == 1.0
    });
    (100..150).for_each(|i| writeln!(f, "{}", line(i)).unwrap());
    shipper.wait_alive("50 lines at the receiver", || output_lines(&env.out()).len() >= 50);
    let mut g = append(&later);
    (150..170).for_each(|i| writeln!(g, "{}", line(i)).unwrap());
    lines_read(&mut shipper, sm, 70);
    shipper.wait_alive("70 lines at the receiver", || output_lines(&env.out()).len() >= 70);
    assert!(received(&env) == (100..170).map(line).collect::<Vec<_>>());
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// `multiline_start`: a stack trace is one record under the line that starts it, lines
/// before the first start are a record of their own, a record over `line_bytes_max` loses
/// the lines past it (counted as cut), and the last record goes after the idle time. Read
/// back from a JSON files output, where a record's newlines are escaped.
#[test]
fn stack_traces_are_joined_under_the_line_that_starts_them() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let json = env.path("json");
    let extra =
        format!("\n[[outputs.file]]\nname = \"j\"\ndirectory = {json:?}\nformat = \"json\"\n");
    let _receiver =
        start_receiver_toml(&env, port, rm, &(env.receiver_toml(port, rm, "") + &extra));
    let log: PathBuf = env.path("app.log");
    let mut f = append(&log);
    let extra = "format = \"text\"\nline_bytes_max = 128\npartial_line_ms = 200\n\
                 multiline_start = '^\\d{4}-\\d{2}-\\d{2} '\n";
    let mut shipper = start_shipper(&env, port, sm, &body(&[&log], &env.path("positions"), extra));
    let frames: Vec<String> = (0..8).map(|i| format!("\tat frame{i}(Source.java:{i})")).collect();
    writeln!(f, "  orphan continuation\n2026-12-01 boom\n{}\n{}", frames[0], frames[1]).unwrap();
    writeln!(f, "2026-12-01 fine\n2026-12-01 long\n{}", frames.join("\n")).unwrap();
    let records = || -> Vec<String> {
        output_lines(&json)
            .iter()
            .map(|(_, l)| {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                v["record"].as_str().unwrap().to_string()
            })
            .collect()
    };
    shipper.wait_alive("four records at the receiver", || records().len() >= 4);
    let mut long = "2026-12-01 long".to_string();
    for fr in &frames {
        if long.len() + 1 + fr.len() <= 128 {
            long = format!("{long}\n{fr}");
        }
    }
    assert!(long.len() < "2026-12-01 long".len() + 8 * 25, "the long record was cut");
    let boom = format!("2026-12-01 boom\n{}\n{}", frames[0], frames[1]);
    let want = ["  orphan continuation", boom.as_str(), "2026-12-01 fine", long.as_str()];
    assert_eq!(records(), want);
    let text = lines_read(&mut shipper, sm, 4);
    assert_eq!(metric(&text, "shipper_file_lines_joined_total", &[]), 10.0);
    assert_eq!(metric(&text, "shipper_source_lines_truncated_total", &[]), 1.0);
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// A binary file: pieces between newline bytes are records, those over `line_bytes_max` cut
/// and counted; every byte otherwise arrives as it was.
#[test]
fn a_binary_file_is_read_as_cut_text_and_counted() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let log: PathBuf = env.path("blob.log");
    let mut bytes = vec![0u8; 64 << 10];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 56) as u8;
    }
    bytes.push(b'\n');
    std::fs::write(&log, &bytes).unwrap();
    let extra = "format = \"text\"\nservice = \"blob\"\nline_bytes_max = 256\n";
    let mut shipper = start_shipper(&env, port, sm, &body(&[&log], &env.path("positions"), extra));
    let pieces: Vec<&[u8]> = bytes[..bytes.len() - 1].split(|&b| b == b'\n').collect();
    let kept: Vec<Vec<u8>> =
        pieces.iter().filter(|p| !p.is_empty()).map(|p| p[..p.len().min(256)].to_vec()).collect();
    let cut = pieces.iter().filter(|p| p.len() > 256).count();
    assert!(cut > 0, "the random file has pieces over 256 bytes");
    shipper
        .wait_alive("every piece at the receiver", || output_lines(&env.out()).len() >= kept.len());
    let got: Vec<Vec<u8>> = output_lines(&env.out()).into_iter().map(|(_, l)| l).collect();
    assert_eq!(got, kept);
    let text = lines_read(&mut shipper, sm, pieces.len());
    assert_eq!(metric(&text, "shipper_source_lines_truncated_total", &[]), cut as f64);
    assert_eq!(
        metric(&text, "shipper_source_lines_empty_total", &[]),
        (pieces.len() - kept.len()) as f64
    );
    assert!(shipper.stop(Duration::from_secs(20)).success());
}

/// inotify: with a poll once a minute, lines appended and a new file matching the glob are
/// read at once, woken by the directory's events.
#[test]
fn inotify_wakes_the_source_between_polls() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let dir = env.path("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = append(&dir.join("a.log"));
    writeln!(a, "{}", line(0)).unwrap();
    let glob = dir.join("*.log");
    let body = body(&[&glob], &env.path("positions"), "")
        .replace("poll_interval_ms = 20", "poll_interval_ms = 60000");
    let mut shipper = start_shipper(&env, port, sm, &body);
    // The first listing (at start) finds a.log; from here on only events can wake the source
    // within the minute.
    shipper.wait_alive("the first line", || received(&env).len() == 1);
    writeln!(a, "{}", line(1)).unwrap();
    shipper.wait_alive("the appended line", || received(&env).len() == 2);
    let mut b = append(&dir.join("b.log"));
    writeln!(b, "{}", line(2)).unwrap();
    shipper.wait_alive("the new file's line", || received(&env).len() == 3);
    let mut got = received(&env);
    got.sort();
    assert_eq!(got, [line(0), line(1), line(2)]);
    assert!(shipper.stop(Duration::from_secs(20)).success());
}
