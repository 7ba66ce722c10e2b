use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use crate::pipe::{ids, line};

/// `lines` lines of each writer in `writers`, interleaved, written into the FIFO `pipe`.
fn write_lines(pipe: &Path, writers: &[usize], lines: usize, pause_every: Option<usize>) {
    let mut f = open_writer(pipe);
    for chunk in 0..lines.div_ceil(500) {
        let mut buf = Vec::new();
        for seq in chunk * 500..((chunk + 1) * 500).min(lines) {
            for &w in writers {
                buf.extend_from_slice(line(w, seq).as_bytes());
                buf.push(b'\n');
            }
        }
        f.write_all(&buf).unwrap();
        if pause_every.is_some() {
            // Pacing the writer so that the outage lands mid-stream, not waiting for a state.
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn pipe_source(env: &Env) -> (PathBuf, String) {
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n\
         [batch]\nbatch_events_max = 500\nflush_interval_ms = 10\n"
    );
    (pipe, body)
}

/// Three streams to `[output]` (every stream) and a `[[outputs.file]]` taking `w*` less `w1`:
/// each output holds exactly its streams' lines, once each, and counts them per output.
#[test]
fn each_output_takes_exactly_its_streams() {
    const LINES: usize = 3000;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let some = env.path("some");
    let extra = format!(
        "\n[[outputs.file]]\nname = \"some\"\ndirectory = {some:?}\nfsync = false\n\
         streams = [\"w*\"]\nexclude_streams = [\"w1\"]\n"
    );
    let config = env.receiver_toml(port, rm, "") + &extra;
    let receiver = start_receiver_toml(&env, port, rm, &config);
    let (pipe, body) = pipe_source(&env);
    let mut shipper = start_shipper(&env, port, sm, &body);
    write_lines(&pipe, &[0, 1, 2], LINES, None);
    shipper.wait_alive("every line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= (3 * LINES) as f64
    });
    assert_eq!(per_writer(&env.out(), LINES), [LINES; 3], "every stream once each");
    assert_eq!(per_writer(&some, LINES), [LINES, 0, LINES], "w0 and w2 once each, no w1");
    let at = |name, output| receiver.metric(name, &[("output", output)]);
    // The receiver publishes its counters every 250 ms: wait for the last frames in them.
    wait_for("the receiver's counters published", Duration::from_secs(10), || {
        at("shipper_receiver_output_records_total", "files") >= (3 * LINES) as f64
    });
    assert_eq!(at("shipper_receiver_output_records_total", "files"), (3 * LINES) as f64);
    assert_eq!(at("shipper_receiver_output_records_total", "some"), (2 * LINES) as f64);
    assert_eq!(at("shipper_receiver_output_errors_total", "some"), 0.0);
    assert_eq!(at("shipper_receiver_output_up", "some"), 2.0, "up on both shards");
    // Each output's streams counted once: 3 in `files`, 2 in `some`.
    assert_eq!(receiver.metric("shipper_receiver_streams_open", &[]), 5.0);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// Lines of writers 0, 1 and 2 in the files output `out`, each checked (its stream, its bytes,
/// never twice).
fn per_writer(out: &Path, lines: usize) -> [usize; 3] {
    let mut seen = vec![[0u8; 3]; lines];
    let mut counts = [0; 3];
    for (stream, l) in output_lines(out) {
        let (w, seq) = ids(&l);
        assert_eq!((stream, l.as_slice()), (format!("w{w}"), line(w, seq).as_bytes()));
        seen[seq][w] += 1;
        assert_eq!(seen[seq][w], 1, "line {seq} of w{w} twice in {}", out.display());
        counts[w] += 1;
    }
    counts
}

/// A ClickHouse server of its own, in a scratch directory, on free ports.
struct ClickHouse {
    proc: Proc,
    http: u16,
}

const CLICKHOUSE: &str = "/usr/sbin/clickhouse-server";

impl ClickHouse {
    /// Starts one in `dir` (kept across restarts: its tables stay), or says why it cannot.
    fn start(dir: &Path, http: u16) -> Result<ClickHouse, String> {
        if !Path::new(CLICKHOUSE).exists() {
            return Err(format!("{CLICKHOUSE} missing (cargo xtask setup installs it)"));
        }
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        let users = "<?xml version=\"1.0\"?><yandex><profiles><default/></profiles><users>\
             <default><password></password><networks><ip>127.0.0.1</ip></networks>\
             <profile>default</profile><quota>default</quota></default></users>\
             <quotas><default/></quotas></yandex>\n";
        std::fs::write(dir.join("users.xml"), users).unwrap();
        let config = format!(
            "<?xml version=\"1.0\"?><yandex><logger><level>information</level>\
             <log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog></logger>\
             <http_port>{http}</http_port><tcp_port>{}</tcp_port>\
             <listen_host>127.0.0.1</listen_host><path>{d}/data/</path>\
             <tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\
             <format_schema_path>{d}/format_schemas/</format_schema_path>\
             <users_config>{d}/users.xml</users_config><mark_cache_size>67108864</mark_cache_size>\
             <default_profile>default</default_profile><default_database>default</default_database>\
             </yandex>\n",
            free_port()
        );
        std::fs::write(dir.join("config.xml"), config).unwrap();
        let arg = format!("--config-file={d}/config.xml");
        let log = dir.join(format!("stderr-{}.log", std::process::id()));
        let mut proc = Proc::start_any("clickhouse", CLICKHOUSE, &[&arg], log);
        let mut up = false;
        let answer = |sql: &str| query(http, sql);
        testkit::wait::poll(Duration::from_secs(60), Duration::from_millis(50), || {
            up = answer("SELECT 1").is_some_and(|a| a == "1\n");
            up.then_some(())
        })
        .ok();
        if !up {
            proc.kill();
            let err = std::fs::read_to_string(dir.join("server.err.log")).unwrap_or_default();
            return Err(format!("clickhouse-server did not answer on {http}: {err}"));
        }
        Ok(ClickHouse { proc, http })
    }

    fn query(&self, sql: &str) -> String {
        query(self.http, sql).unwrap_or_else(|| panic!("clickhouse query failed: {sql}"))
    }
}

/// Runs `sql` through ClickHouse's HTTP interface with curl (an independent client); the
/// answer, or `None` when it is not 200.
fn query(http: u16, sql: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--data-binary", sql])
        .arg(format!("http://127.0.0.1:{http}/"))
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

const CREATE_TABLE: &str =
    "CREATE TABLE logs (stream String, record String) ENGINE = MergeTree ORDER BY stream";

/// A receiver without `[output]` (its commit logs in `receiver.state_directory`): a
/// ClickHouse output taking `streams`, and the outputs in `more`.
fn clickhouse_receiver(env: &Env, ports: (u16, u16), http: u16, streams: &str, more: &str) -> Proc {
    let (port, metrics) = ports;
    let state = env.path("state");
    let text = env.receiver_toml(port, metrics, &format!("state_directory = {state:?}"));
    let start = text.find("[output]").unwrap();
    let end = text.find("[metrics]").unwrap();
    let text = format!(
        "{}[[outputs.clickhouse]]\nname = \"ch\"\nurl = \"http://127.0.0.1:{http}\"\n\
         table = \"logs\"\ntimeout_ms = 2000\nstreams = {streams}\n{more}\n{}",
        &text[..start],
        &text[end..]
    );
    start_receiver_toml(env, port, metrics, &text)
}

/// Every row of stream `w{writer}`: each line of that writer exactly once, byte for byte.
fn check_rows(ch: &ClickHouse, writer: usize, lines: usize) -> usize {
    let rows = ch.query(&format!("SELECT record FROM logs WHERE stream = 'w{writer}' FORMAT TSV"));
    let mut seen = vec![0u32; lines];
    for row in rows.lines() {
        let (w, seq) = ids(row.as_bytes());
        assert_eq!((w, row), (writer, line(writer, seq).as_str()));
        seen[seq] += 1;
    }
    assert_eq!(seen.iter().filter(|&&n| n == 0).count(), 0, "w{writer}: lines missing");
    rows.lines().count()
}

/// `cargo xtask setup` installs the server, so a test that cannot start it fails: it never
/// passes without having run.
const NO_CLICKHOUSE: &str =
    "ClickHouse did not start (cargo xtask setup installs clickhouse-server)";

/// Lines from a real shipper arrive in a real ClickHouse with exact counts per stream, and
/// only the streams the output selects.
#[test]
fn clickhouse_gets_exact_counts_per_stream() {
    const LINES: usize = 5000;
    let env = Env::new();
    let ch = match ClickHouse::start(&env.path("clickhouse"), free_port()) {
        Ok(ch) => ch,
        Err(why) => panic!("{NO_CLICKHOUSE}: {why}"),
    };
    ch.query(CREATE_TABLE);
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = clickhouse_receiver(&env, (port, rm), ch.http, "[\"w0\", \"w1\"]", "");
    let (pipe, body) = pipe_source(&env);
    let mut shipper = start_shipper(&env, port, sm, &body);
    write_lines(&pipe, &[0, 1, 2], LINES, None);
    shipper.wait_alive("every line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= (3 * LINES) as f64
    });
    let counts =
        ch.query("SELECT stream, count() FROM logs GROUP BY stream ORDER BY stream FORMAT TSV");
    assert_eq!(counts, format!("w0\t{LINES}\nw1\t{LINES}\n"));
    assert_eq!((check_rows(&ch, 0, LINES), check_rows(&ch, 1, LINES)), (LINES, LINES));
    let at = |name| receiver.metric(name, &[("output", "ch")]);
    wait_for("the receiver's counters published", Duration::from_secs(10), || {
        at("shipper_receiver_output_records_total") >= (2 * LINES) as f64
    });
    assert_eq!(at("shipper_receiver_output_records_total"), (2 * LINES) as f64);
    assert_eq!(at("shipper_receiver_output_errors_total"), 0.0);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// ClickHouse stopped mid-stream: its frames are refused (ERROR) and resent, none acknowledged
/// meanwhile; once it is back, every line is in the table, and a files output beside it,
/// whose part of each refused frame was cut back, holds every line exactly once.
#[test]
fn clickhouse_stopped_mid_stream_loses_nothing() {
    const LINES: usize = 40_000;
    let env = Env::new();
    let (dir, http) = (env.path("clickhouse"), free_port());
    let mut ch = match ClickHouse::start(&dir, http) {
        Ok(ch) => ch,
        Err(why) => panic!("{NO_CLICKHOUSE}: {why}"),
    };
    ch.query(CREATE_TABLE);
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let archive = env.path("archive");
    let files =
        format!("[[outputs.file]]\nname = \"archive\"\ndirectory = {archive:?}\nfsync = false\n");
    let receiver = clickhouse_receiver(&env, (port, rm), http, "[\"*\"]", &files);
    let (pipe, body) = pipe_source(&env);
    let mut shipper = start_shipper(&env, port, sm, &body);
    let writer = std::thread::spawn(move || write_lines(&pipe, &[0], LINES, Some(1)));
    let rows = || query(http, "SELECT count() FROM logs").and_then(|n| n.trim().parse().ok());
    ch.proc.wait_alive("a fifth of the lines inserted", || rows().unwrap_or(0) >= LINES / 5);
    ch.proc.kill();
    let refused = || metric_at(rm, "shipper_receiver_output_errors_total", &[("output", "ch")]);
    wait_for("frames refused while ClickHouse is down", Duration::from_secs(20), || {
        refused() >= 3.0
    });
    let up = metric_at(rm, "shipper_receiver_output_up", &[("output", "ch")]);
    assert!(up < 2.0, "a shard that inserted since is down: {up}");
    let acked = || metric_at(sm, "shipper_records_acked_total", &[]);
    let acked_down = acked();
    assert!(acked_down < LINES as f64, "the outage is mid-stream: {acked_down} acked");
    let ch = ClickHouse::start(&dir, http).expect("clickhouse starts again");
    writer.join().unwrap();
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(120), &mut || {
        acked() >= LINES as f64
    });
    let distinct = ch.query("SELECT count(DISTINCT record) FROM logs");
    assert_eq!(distinct.trim(), LINES.to_string(), "every line in the table");
    let total = check_rows(&ch, 0, LINES);
    assert!(total >= LINES);
    eprintln!("rows {total} for {LINES} lines (duplicates: inserts whose answer was lost)");
    assert_eq!(per_writer(&archive, LINES), [LINES, 0, 0], "the files output: once each");
    let written = |o| metric_at(rm, "shipper_receiver_output_records_total", &[("output", o)]);
    // Counted once committed: a frame cut back after ClickHouse failed is counted at its resend.
    wait_for("the receiver's counters published", Duration::from_secs(10), || {
        written("archive") >= LINES as f64 && written("ch") >= LINES as f64
    });
    assert_eq!((written("archive"), written("ch")), (LINES as f64, LINES as f64));
    assert_eq!(shipper.metric("shipper_lines_dropped_total", &[]), 0.0);
    assert!(receiver.metric("shipper_receiver_write_errors_total", &[]) >= 3.0);
    assert!(shipper.metric("shipper_receiver_frames_resent_total", &[]) >= 1.0, "resent");
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// A ClickHouse that accepts connections and never answers: each insert fails at `timeout_ms`
/// (the shard waits that long, no longer), nothing is acknowledged meanwhile; once a real
/// server listens there, every line arrives.
#[test]
fn a_hung_clickhouse_is_timed_out_and_its_frames_resent() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const LINES: usize = 2000;
    let env = Env::new();
    let http = free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", http)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let hung = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    // Polling the stop flag of this stand-in server, not waiting for a state.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            held.len()
        })
    };
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let receiver = clickhouse_receiver(&env, (port, rm), http, "[\"*\"]", "");
    let text = std::fs::read_to_string(env.path(&format!("receiver-{port}.toml"))).unwrap();
    assert!(text.contains("timeout_ms = 2000"));
    let (pipe, body) = pipe_source(&env);
    let mut shipper = start_shipper(&env, port, sm, &body);
    write_lines(&pipe, &[0], LINES, None);
    let errors = || metric_at(rm, "shipper_receiver_output_errors_total", &[("output", "ch")]);
    wait_for("inserts timed out", Duration::from_secs(30), || errors() >= 2.0);
    assert_eq!(metric_at(sm, "shipper_records_acked_total", &[]), 0.0);
    let log = std::fs::read_to_string(&receiver.log).unwrap();
    assert!(log.contains(" now: ch: answer over timeout_ms; not acknowledged"), "{log}");
    stop.store(true, Ordering::SeqCst);
    assert!(hung.join().unwrap() >= 2, "the receiver connected to the hung server");
    let ch = match ClickHouse::start(&env.path("clickhouse"), http) {
        Ok(ch) => ch,
        Err(why) => panic!("{NO_CLICKHOUSE}: {why}"),
    };
    ch.query(CREATE_TABLE);
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(60), &mut || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= LINES as f64
    });
    let distinct = ch.query("SELECT count(DISTINCT record) FROM logs");
    assert_eq!(distinct.trim(), LINES.to_string());
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// Every file of `dir` (one directory per stream): (stream, file name, its lines), compressed
/// ones decompressed.
fn files_of(dir: &Path) -> Vec<(String, String, Vec<String>)> {
    let mut all = Vec::new();
    for s in std::fs::read_dir(dir).unwrap() {
        let s = s.unwrap();
        let stream = s.file_name().to_string_lossy().into_owned();
        if stream.starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(s.path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(f.path()).unwrap();
            let bytes =
                if name.ends_with(".zst") { zstd::decode_all(&bytes[..]).unwrap() } else { bytes };
            let text = String::from_utf8(bytes).unwrap();
            all.push((stream.clone(), name, text.lines().map(String::from).collect()));
        }
    }
    all.sort();
    all
}

/// The (writer, seq) of every line in `files`, each checked by `check` (which gives the
/// line the shipper read back out of the line written); panics on a line seen twice.
fn each_once(
    files: &[(String, String, Vec<String>)],
    lines: usize,
    check: impl Fn(&str, &str) -> String,
) -> usize {
    let mut seen = vec![[false; 3]; lines];
    let mut n = 0;
    for (stream, _, ls) in files {
        for l in ls {
            let original = check(stream, l);
            let (w, seq) = ids(original.as_bytes());
            assert_eq!(
                (stream.as_str(), original.as_str()),
                (format!("w{w}").as_str(), line(w, seq).as_str())
            );
            assert!(!seen[seq][w], "line {seq} of w{w} twice");
            seen[seq][w] = true;
            n += 1;
        }
    }
    n
}

/// One receiver writing the same lines as raw, JSON, RFC 5424 and cfjs1 files: each parsed
/// back line by line, every line once; modes as configured; the cfjs1 files rotated by size
/// and compressed to the same lines; a retention limit removing the oldest rotated files
/// first; and rotation by age.
#[test]
fn files_in_each_format_rotate_compress_and_keep_only_the_newest() {
    const LINES: usize = 600;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let dir = |n: &str| env.path(n);
    let output = |name: &str, more: &str| {
        let d = dir(name);
        format!("\n[[outputs.file]]\nname = \"{name}\"\ndirectory = {d:?}\nfsync = false\n{more}")
    };
    let extra = output("json", "format = \"json\"\nfile_mode = \"0600\"\ndir_mode = \"0700\"\n")
        + &output("syslog", "format = \"rfc5424\"\n")
        + &output("cfjs1", "format = \"cfjs1\"\nfile_bytes_max = 4096\ncompress_rotated = true\n")
        + &output("kept", "file_bytes_max = 4096\nretention_bytes_max = 200000\n")
        + &output("aged", "file_age_max_s = 1\n");
    let receiver = start_receiver_toml(&env, port, rm, &(env.receiver_toml(port, rm, "") + &extra));
    let (pipe, body) = pipe_source(&env);
    let mut shipper = start_shipper(&env, port, sm, &body);
    write_lines(&pipe, &[0, 1, 2], LINES / 2, None);
    let acked = |n: usize| metric_at(sm, "shipper_records_acked_total", &[]) >= n as f64;
    shipper.wait_alive("the first half acknowledged", || acked(3 * LINES / 2));
    // Rotation by age: the files of the first half are a second old before the second half.
    let first = std::time::Instant::now();
    wait_for("a second to pass", Duration::from_secs(5), || {
        first.elapsed() >= Duration::from_millis(1100)
    });
    let mut w = open_writer(&pipe);
    for seq in LINES / 2..LINES {
        for writer in 0..3 {
            writeln!(w, "{}", line(writer, seq)).unwrap();
        }
    }
    drop(w);
    shipper.wait_alive("every line acknowledged", || acked(3 * LINES));

    assert_eq!(per_writer(&env.out(), LINES), [LINES; 3], "raw: every line once");
    check_json_and_syslog(&dir("json"), &dir("syslog"), LINES);
    check_cfjs1(&dir("cfjs1"), LINES);
    check_kept(&receiver, &dir("kept"), LINES);
    check_aged(&dir("aged"), LINES);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

fn check_json_and_syslog(json_dir: &Path, syslog_dir: &Path, lines: usize) {
    use std::os::unix::fs::PermissionsExt;
    let json = files_of(json_dir);
    let n = each_once(&json, lines, |stream, l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!((v["host"].as_str(), v["stream"].as_str()), (Some("test"), Some(stream)));
        let t = v["time"].as_str().unwrap();
        assert!(t.len() == 27 && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        v["record"].as_str().unwrap().to_string()
    });
    assert_eq!(n, 3 * lines);
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(json_dir.join("w0")), 0o700);
    assert_eq!(mode(json_dir.join("w0").join(&json[0].1)), 0o600);
    let syslog = files_of(syslog_dir);
    let n = each_once(&syslog, lines, |stream, l| {
        use shipper::transforms::syslog::{parse, Syntax};
        let m = parse(l.as_bytes(), Syntax::Rfc5424).unwrap();
        assert_eq!((m.pri, m.host, m.app), (134, Some("test"), Some(stream)));
        m.message.to_string()
    });
    assert_eq!(n, 3 * lines);
}

fn check_cfjs1(dir: &Path, lines: usize) {
    // Compression is off the write path: wait for the janitors to be done.
    let rotated_logs = || {
        let files = files_of(dir);
        let mut newest = std::collections::HashMap::new();
        for (s, f, _) in &files {
            let shard = f[8..12].to_string();
            let e = newest.entry((s.clone(), shard)).or_insert(f.clone());
            *e = e.clone().max(f.clone());
        }
        files
            .iter()
            .filter(|(s, f, _)| {
                f.ends_with(".log") && newest[&(s.clone(), f[8..12].to_string())] != *f
            })
            .count()
    };
    wait_for("rotated cfjs1 files compressed", Duration::from_secs(20), || rotated_logs() == 0);
    let cfjs1 = files_of(dir);
    for w in 0..3 {
        let stream = format!("w{w}");
        let zst = cfjs1.iter().filter(|(s, f, _)| *s == stream && f.ends_with(".log.zst"));
        assert!(zst.count() >= 1, "{stream}: rotated by size and compressed");
    }
    let n = each_once(&cfjs1, lines, |stream, l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["format"].as_str(), Some(stream));
        assert!(v[stream].is_object(), "the record kept as JSON: {l}");
        let head = format!("{{\"format\":\"{stream}\",\"{stream}\":");
        l.strip_prefix(&head).and_then(|r| r.strip_suffix('}')).unwrap().to_string()
    });
    assert_eq!(n, 3 * lines);
}

fn check_kept(receiver: &Proc, dir: &Path, lines: usize) {
    // Retention: what is left of each (stream, shard) is its newest files, in a row.
    wait_for("retention applied", Duration::from_secs(20), || {
        receiver.metric("shipper_receiver_files_removed_total", &[]) > 0.0
    });
    let kept = files_of(dir);
    let mut by: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    for (s, f, _) in &kept {
        by.entry((s.clone(), f[8..12].to_string())).or_default().push(f[13..19].parse().unwrap());
    }
    for (key, indexes) in &by {
        let newest = *indexes.iter().max().unwrap();
        let want: Vec<u64> = (newest + 1 - indexes.len() as u64..=newest).collect();
        assert_eq!(indexes, &want, "{key:?} keeps its newest files in a row");
    }
    assert!(kept.iter().map(|(_, _, l)| l.len()).sum::<usize>() < 3 * lines, "some removed");
}

fn check_aged(dir: &Path, lines: usize) {
    // Rotation by age: lines of the first half only in each stream's first file.
    for (stream, f, ls) in files_of(dir) {
        let second_half = ls.iter().filter(|l| ids(l.as_bytes()).1 >= lines / 2).count();
        if f.ends_with("-000000.log") {
            assert_eq!(second_half, 0, "{stream}/{f} holds only the first half");
        } else {
            assert_eq!(second_half, ls.len(), "{stream}/{f} holds only the second half");
        }
    }
}

/// The line of service `s{service}` in round `round`, number `n`, with its newline.
fn service_line(service: usize, round: usize, n: usize) -> String {
    format!("{{\"service\":\"s{service}\",\"round\":{round},\"n\":{n}}}\n")
}

/// `streams_max = 4` and `streams_idle_s = 1`: eleven services written four at a time, each
/// round once the previous round's streams are forgotten: every line in its own stream's
/// directory, none in `_other`; a service written again after it was forgotten starts its
/// next file, its last one whole and compressed. Then the receiver is killed (-9) while four
/// more services are written, and restarted: every line there exactly once.
#[test]
fn idle_streams_are_forgotten_and_new_streams_get_their_own_directory() {
    // Regression: the receiver never forgot a stream, so past `streams_max` streams per shard
    // every new stream went to `_other` until it restarted (issue 16).
    const EACH: usize = 20;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let config = env.receiver_toml(port, rm, "").replace(
        "fsync = false",
        "fsync = true\nstreams_max = 4\nstreams_idle_s = 1\ncompress_rotated = true",
    );
    let mut receiver = start_receiver_toml(&env, port, rm, &config);
    let pipe = env.path("app.pipe");
    let body =
        format!("[[sources.pipe]]\npath = {pipe:?}\nworker = 0\n[batch]\nflush_interval_ms = 10\n");
    let mut shipper = start_shipper(&env, port, sm, &body);
    let mut w = open_writer(&pipe);
    let rounds: [[usize; 4]; 3] = [[0, 1, 2, 3], [4, 5, 6, 0], [7, 8, 9, 10]];
    for (r, services) in rounds.iter().enumerate() {
        let lines: String =
            (0..EACH).flat_map(|n| services.map(|s| service_line(s, r, n))).collect();
        w.write_all(lines.as_bytes()).unwrap();
        let acked = ((r + 1) * 4 * EACH) as f64;
        shipper.wait_alive("the round acknowledged", || {
            metric_at(sm, "shipper_records_acked_total", &[]) == acked
        });
        let forgotten = ((r + 1) * 4) as f64;
        receiver.wait_alive("the round's four streams forgotten", || {
            metric_at(rm, "shipper_receiver_streams_forgotten_total", &[]) == forgotten
        });
    }
    // Each forgotten stream's file was handed to the janitor: 12 files, s0 two of them.
    receiver.wait_alive("the forgotten streams' files compressed", || {
        metric_at(rm, "shipper_receiver_files_compressed_total", &[]) == 12.0
    });
    assert_eq!(receiver.metric("shipper_receiver_records_folded_total", &[]), 0.0);
    assert_eq!(receiver.metric("shipper_receiver_streams_open", &[]), 0.0);
    let files = files_of(&env.out());
    assert_eq!(each_service_once(&files), 3 * 4 * EACH);
    let s0: Vec<&(String, String, Vec<String>)> = files.iter().filter(|f| f.0 == "s0").collect();
    assert_eq!(s0.len(), 2, "{s0:?}");
    assert_eq!(s0[0].1[..12], s0[1].1[..12], "one generation and shard");
    let (first, second) = (&s0[0].1[12..], &s0[1].1[12..]);
    assert_eq!((first, second), ("-000000.log.zst", "-000001.log.zst"));
    let round = |r| -> Vec<String> {
        (0..EACH).map(|n| service_line(0, r, n).trim_end().to_string()).collect()
    };
    assert_eq!(s0[0].2, round(0), "round 0 whole in file 0");
    assert_eq!(s0[1].2, round(1), "round 1 in file 1");
    let late = kill_mid_stream(&env, port, (&mut receiver, &mut shipper), w, &config);
    // Every stream is forgotten in the end, and every file of the killed run compressed by
    // the restarted one's janitor: read once nothing is left to compress.
    wait_for("every file compressed", Duration::from_secs(30), || {
        let streams = std::fs::read_dir(env.out()).unwrap().flatten();
        let streams = streams.filter(|s| !s.file_name().to_string_lossy().starts_with('.'));
        let mut files = streams.flat_map(|s| std::fs::read_dir(s.path()).unwrap().flatten());
        files.all(|f| f.file_name().to_string_lossy().ends_with(".log.zst"))
    });
    assert_eq!(each_service_once(&files_of(&env.out())), 3 * 4 * EACH + late);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// Writes round 3 (services s11..s14) into `w` and kills the receiver (-9) once its first
/// quarter is written, with the rest held back until then, then starts it again (on `port`,
/// from `config`); returns the lines of the round, once all are acknowledged.
fn kill_mid_stream(
    env: &Env,
    port: u16,
    (receiver, shipper): (&mut Proc, &mut Proc),
    mut w: std::fs::File,
    config: &str,
) -> usize {
    const EACH: usize = 2000;
    let (rm, sm) = (receiver.metrics, shipper.metrics);
    let before = metric_at(sm, "shipper_records_acked_total", &[]);
    let written = metric_at(rm, "shipper_receiver_records_written_total", &[]);
    // The first quarter (EACH / 4 per service), then the rest once the receiver is killed:
    // the kill lands mid-stream whatever the pace.
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        for chunk in 0..EACH / 50 {
            if chunk == EACH / 200 {
                gate.recv().unwrap();
            }
            let lines: String = (chunk * 50..(chunk + 1) * 50)
                .flat_map(|n| (11..15).map(move |s| service_line(s, 3, n)))
                .collect();
            w.write_all(lines.as_bytes()).unwrap();
        }
    });
    receiver.wait_alive("a quarter of round 3 written", || {
        metric_at(rm, "shipper_receiver_records_written_total", &[]) >= written + EACH as f64
    });
    receiver.signal(libc::SIGKILL);
    let _ = receiver.child.wait();
    shipper.wait_alive("the shipper to see the receiver gone", || {
        metric_at(sm, "shipper_receiver_connections_lost_total", &[]) >= 1.0
    });
    go.send(()).unwrap();
    *receiver = start_receiver_toml(env, port, rm, config);
    writer.join().unwrap();
    let all = before + (4 * EACH) as f64;
    shipper.wait_alive_for("every line acknowledged", Duration::from_secs(120), &mut || {
        metric_at(sm, "shipper_records_acked_total", &[]) == all
    });
    4 * EACH
}

/// Checks that every line of `files` is in its service's stream, none in `_other`, and no
/// (service, round, n) there twice; returns how many lines there are.
fn each_service_once(files: &[(String, String, Vec<String>)]) -> usize {
    let mut seen = std::collections::HashSet::new();
    for (stream, f, ls) in files {
        assert_ne!(stream, "_other", "{f}: a line in _other");
        for l in ls {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["service"].as_str(), Some(stream.as_str()), "{stream}/{f}: {l}");
            let key = (stream.clone(), v["round"].as_u64().unwrap(), v["n"].as_u64().unwrap());
            assert!(seen.insert(key), "{stream}/{f}: {l} twice");
        }
    }
    seen.len()
}
