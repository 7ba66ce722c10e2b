//! Bounded fuzzing in the test command: every fuzz target of `shipper/fuzz` runs for a few
//! seconds with cargo-fuzz (libFuzzer, nightly toolchain), from seeds made here: a real journal
//! file written by systemd-journal-remote (trimmed to its used part), a real frame, syslog
//! messages as real senders write them (RFC 5424 with structured data, BSD, octet-counted),
//! a disk buffer segment's records holding a real frame, JSON lines as applications write
//! them, pipe bytes with every kind of line, and records with awkward keys.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// (target, seconds).
const TARGETS: &[(&str, u32)] = &[
    ("journal_file", 20),
    ("frames", 10),
    ("syslog", 10),
    ("buffer_segment", 10),
    ("lines", 5),
    ("json_key", 10),
    ("receiver_write", 10),
];

/// Seeds of the `json_key` target: lines as applications write them, and near misses.
const JSON_SEEDS: &[&str] = &[
    r#"{"service":"nginx","status":200,"req":{"path":"/a\"b","ms":1.5}}"#,
    r#"{"format":"http","http":{"service":"edge","bytes":123}}"#,
    r#"{"service":"caf\u00e9","x":[1,2,{"service":"inner"}]}"#,
    r#"["service","not an object"]"#,
    r#"{"service":"\ud83d\ude00","m":"\ud800"}"#,
    r#"{"serv\u0069ce":"a\/b","n":[-0.5e+3,18446744073709551616,true,null],"o":{}}"#,
    "{\"format\":\"http\",\"http\":{\"bytes\":1\u{0}23}}",
];

/// Seeds of the `syslog` target.
const SYSLOG_SEEDS: &[&str] = &[
    "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\"][x@1 q=\"a\\\"b\\]\"] \u{feff}An application event",
    "<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8\n",
    "<13>Nov 21 07:41:41 pidtag[367]: with pid",
    "45 <13>1 - host app 1 - - octet-counted message\n<13>Jan  5 03:04:05 t: x\n",
];

pub fn run() -> anyhow::Result<()> {
    let fuzz = crate::root().join("shipper/fuzz");
    let corpus = fuzz.join("corpus");
    std::fs::create_dir_all(corpus.join("journal_file"))?;
    std::fs::create_dir_all(corpus.join("frames"))?;
    std::fs::create_dir_all(corpus.join("syslog"))?;
    for (i, seed) in SYSLOG_SEEDS.iter().enumerate() {
        std::fs::write(corpus.join(format!("syslog/seed{i}.txt")), seed)?;
    }
    std::fs::write(corpus.join("journal_file/seed.journal"), journal_seed()?)?;
    let frame = shipper::protocol::Frame::control(shipper::protocol::Kind::Heartbeat, 7, b"");
    std::fs::create_dir_all(corpus.join("buffer_segment"))?;
    let mut payload = Vec::new();
    shipper::protocol::RecordWriter::push(&mut payload, b"web", br#"{"service":"web"}"#);
    let len = payload.len() as u32;
    let header = shipper::protocol::Header {
        kind: shipper::protocol::Kind::Data,
        flags: 0,
        seq: 1,
        count: 1,
        raw_len: len,
        len,
    };
    let data = header.wire(&payload);
    let mut records = Vec::new();
    for first_unix_us in [1, 2] {
        let services: &[(&[u8], u32)] = &[(b"web", 1)];
        shipper::buffer::format::encode(&data, first_unix_us, services, &mut records);
    }
    std::fs::write(corpus.join("buffer_segment/seed.seg"), records)?;
    std::fs::write(corpus.join("frames/seed.frame"), frame)?;
    for target in ["lines", "json_key", "receiver_write"] {
        std::fs::create_dir_all(corpus.join(target))?;
    }
    for (i, seed) in JSON_SEEDS.iter().enumerate() {
        std::fs::write(corpus.join(format!("json_key/seed{i}.json")), seed)?;
    }
    // Line limit 10, chunks of 4: short, exact, over-long and unterminated lines.
    let lines = b"\x09\x03ab\nexactly10!\nmuch longer than ten\n\ntail";
    std::fs::write(corpus.join("lines/seed"), lines)?;
    // Records [key_len, key, body_len, body]: a plain key, a dot key, an empty one, bytes.
    let mut records = Vec::new();
    let seeds: [(&[u8], &[u8]); 4] =
        [(b"web", b"{\"a\":1}"), (b"..", b"x"), (b"", b""), (b"\xff/\x00", b"y")];
    for (key, body) in seeds {
        records.push(key.len() as u8);
        records.extend_from_slice(key);
        records.push(body.len() as u8);
        records.extend_from_slice(body);
    }
    std::fs::write(corpus.join("receiver_write/seed"), records)?;
    for (target, secs) in TARGETS {
        let dir = corpus.join(target);
        let args = [
            "+nightly",
            "fuzz",
            "run",
            target,
            dir.to_str().context("utf-8 path")?,
            "--",
            &format!("-max_total_time={secs}"),
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ];
        println!("$ cargo {}", args.join(" "));
        let status =
            Command::new("cargo").args(args).current_dir(crate::root().join("shipper")).status()?;
        if !status.success() {
            bail!("fuzz target {target} found a failure (see shipper/fuzz/artifacts/{target}/)");
        }
    }
    Ok(())
}

/// A 3-entry journal file from systemd-journal-remote, cut after its last object.
fn journal_seed() -> anyhow::Result<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("shipper-fuzz-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("seed.journal");
    let mut child = Command::new("/lib/systemd/systemd-journal-remote")
        .arg(format!("--output={}", file.display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("systemd-journal-remote")?;
    let mut export = Vec::new();
    for i in 0..3 {
        write!(
            export,
            "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID=0123456789abcdef0123456789abcdef\nMESSAGE=seed {i}\nSYSLOG_IDENTIFIER=fuzz\nBIN\n",
            1_700_000_000_000_000u64 + i,
            1000 + i
        )?;
        export.extend_from_slice(&3u64.to_le_bytes());
        export.extend_from_slice(b"a\x00b\n\n");
    }
    child.stdin.take().context("stdin")?.write_all(&export)?;
    if !child.wait()?.success() {
        bail!("systemd-journal-remote failed to write the seed");
    }
    let b = std::fs::read(&file)?;
    let _ = std::fs::remove_dir_all(&dir);
    let le = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes")) as usize;
    let tail = le(136);
    let end = (tail + le(tail + 8)).div_ceil(8) * 8;
    Ok(b[..end.min(b.len())].to_vec())
}
