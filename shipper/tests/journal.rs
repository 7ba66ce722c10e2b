use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testkit::rng::XorShift64;

use crate::harness::*;

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";

fn require_tools() {
    for tool in [JOURNAL_REMOTE, "journalctl"] {
        assert!(
            Path::new(tool).exists() || Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success()),
            "{tool} is missing: run `cargo xtask setup` (it installs Debian's systemd-journal-remote)"
        );
    }
}

/// A deterministic journal export stream (systemd's "Journal Export Format") of `n` entries
/// with every kind of field the oracle must get right.
pub fn export(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15);
    for i in 0..n {
        export_common_fields(&mut out, i, &mut rng);
        export_occasional_fields(&mut out, i, &mut rng);
        out.push(b'\n');
    }
    out
}

/// A text field: `NAME=value\n`.
fn text_field(out: &mut Vec<u8>, name: &str, v: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.push(b'=');
    out.extend_from_slice(v);
    out.push(b'\n');
}

/// A binary field: `NAME\n`, the length as 64-bit little endian, the value, `\n`.
fn binary_field(out: &mut Vec<u8>, name: &str, v: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.extend_from_slice(v);
    out.push(b'\n');
}

/// Entry `i`'s fields that every entry has: timestamps, boot id, identifier, unit, priority
/// and the message (every 7th a binary one of three lines).
fn export_common_fields(out: &mut Vec<u8>, i: usize, rng: &mut XorShift64) {
    let realtime = 1_700_000_000_000_000u64 + i as u64 * 1000;
    text_field(out, "__REALTIME_TIMESTAMP", format!("{realtime}").as_bytes());
    let monotonic = 5_000_000 + i as u64 * 1000;
    text_field(out, "__MONOTONIC_TIMESTAMP", format!("{monotonic}").as_bytes());
    text_field(out, "_BOOT_ID", b"0123456789abcdef0123456789abcdef");
    let ident = ["app", "db", "web", "kernel"][i % 4];
    text_field(out, "SYSLOG_IDENTIFIER", ident.as_bytes());
    text_field(out, "_SYSTEMD_UNIT", format!("{ident}.service").as_bytes());
    text_field(out, "PRIORITY", format!("{}", i % 8).as_bytes());
    if i % 7 == 0 {
        let message = format!("line one of {i}\n\tline two é\nline three");
        binary_field(out, "MESSAGE", message.as_bytes());
    } else {
        let message = format!("request {i} served in {} ms", rng.next() % 1000);
        text_field(out, "MESSAGE", message.as_bytes());
    }
}

/// Entry `i`'s fields that some entries have: empty, binary, Latin-1, control characters,
/// repeated, mid-sized, large and large random values.
fn export_occasional_fields(out: &mut Vec<u8>, i: usize, rng: &mut XorShift64) {
    if i % 5 == 0 {
        text_field(out, "EMPTY", b"");
    }
    if i % 3 == 0 {
        let v: Vec<u8> = (0..(rng.next() % 64) as usize).map(|_| rng.next() as u8).collect();
        binary_field(out, "BLOB", &v);
    }
    if i % 11 == 0 {
        text_field(out, "LATIN1", b"caf\xe9 cr\xe8me");
    }
    if i % 13 == 0 {
        text_field(out, "CONTROL", b"bell\x07 and del\x7f");
    }
    if i % 17 == 0 {
        text_field(out, "TAG", b"first");
        text_field(out, "TAG", format!("second {}", i % 3).as_bytes());
    }
    if i % 10 == 0 {
        // Mid-sized and compressible, unique per entry (DATA objects are de-duplicated).
        let frames: String =
            (0..12).map(|f| format!("  at frame{f} (src/lib.rs:{})\n", i + f)).collect();
        binary_field(out, "TRACE", frames.as_bytes());
    }
    if i % 20_000 == 0 {
        let big: Vec<u8> = (0..100_000).map(|k| b"abcdefghij\n"[(k + i) % 11]).collect();
        binary_field(out, "LARGE", &big);
    }
    if i % 1000 == 0 {
        // Large, but random: stays uncompressed or compresses badly.
        let big: Vec<u8> = (0..70_000).map(|_| b'a' + (rng.next() % 26) as u8).collect();
        text_field(out, "NOISE", &big);
    }
}

/// Writes `export` into a journal file with systemd-journal-remote and `env`.
pub fn make_journal(
    dir: &Path,
    name: &str,
    export: &[u8],
    env: &[(&str, &str)],
    args: &[&str],
) -> PathBuf {
    let path = dir.join(format!("{name}.journal"));
    let mut cmd = Command::new(JOURNAL_REMOTE);
    cmd.arg(format!("--output={}", path.display())).args(args).arg("-");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(export).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "journal-remote: {}", String::from_utf8_lossy(&out.stderr));
    path
}

fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(l)))
        })
        .collect()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `shipper journal cat` equals `journalctl -o json --all`, entry for entry, field for field.
fn oracle(file: &Path, entries: usize) {
    let ours = json_lines(&run(Command::new(BIN).args(["journal", "cat"]).arg(file)));
    let theirs = json_lines(&run(Command::new("journalctl")
        .arg("--file")
        .arg(file)
        .args(["-o", "json", "--all"])));
    assert_eq!(theirs.len(), entries, "journalctl entry count");
    assert_eq!(ours.len(), theirs.len(), "entry count");
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "entry {i} differs");
    }
}

fn header_flags(file: &Path) -> String {
    let out = run(Command::new("journalctl").arg("--file").arg(file).arg("--header"));
    let text = String::from_utf8_lossy(&out).into_owned();
    text.lines().find(|l| l.starts_with("Incompatible flags:")).unwrap_or_default().to_string()
}

/// A way of writing a journal: name, environment, journal-remote arguments, and the header's
/// incompatible flags it must produce.
type Variant<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

/// Every variant systemd 252 can write here: compact or regular entries, keyed (siphash) or
/// legacy (Jenkins) hash tables, DATA objects zstd-compressed or plain.
#[test]
fn journal_cat_equals_journalctl_in_every_variant() {
    require_tools();
    const N: usize = 100_000;
    let dir = tempfile::Builder::new().prefix("shipper-journal-").tempdir().unwrap();
    let stream = export(N);
    let variants: [Variant; 4] = [
        ("default", &[], &[], "COMPRESSED-ZSTD KEYED-HASH COMPACT"),
        ("regular", &[("SYSTEMD_JOURNAL_COMPACT", "0")], &[], "COMPRESSED-ZSTD KEYED-HASH"),
        ("legacy-hash", &[("SYSTEMD_JOURNAL_KEYED_HASH", "0")], &[], "COMPRESSED-ZSTD COMPACT"),
        (
            "plain",
            &[("SYSTEMD_JOURNAL_COMPACT", "0"), ("SYSTEMD_JOURNAL_KEYED_HASH", "0")],
            &["--compress=no"],
            "Incompatible flags:",
        ),
    ];
    for (name, env, args, flags) in variants {
        let file = make_journal(dir.path(), name, &stream, env, args);
        let header = header_flags(&file);
        assert!(header.trim_end().ends_with(flags), "{name}: {header:?} should end with {flags:?}");
        oracle(&file, N);
    }
}

/// Rewrites every DATA object of an uncompressed journal whose payload shrinks under `kind`
/// (lz4 or xz) in place: the object's payload becomes the compressed bytes, its flags say so,
/// its size field shrinks (readers follow offsets, so the slack after it is never read), and
/// the header gains the matching incompatible flag. systemd 252 on Debian writes only zstd,
/// but journalctl reads lz4 and xz, so it stays the oracle for these files.
fn recompress(file: &Path, kind: &str) -> usize {
    let mut b = std::fs::read(file).unwrap();
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let incompat = u32::from_le_bytes(b[12..16].try_into().unwrap());
    assert_eq!(incompat & (1 | 2 | 8), 0, "start from an uncompressed file");
    let payload_at = if incompat & 16 != 0 { 72 } else { 64 };
    let (header_size, tail) = (le64(&b, 88), le64(&b, 136));
    let mut at = header_size;
    let mut rewritten = 0;
    while at <= tail {
        let (kind_byte, size) = (b[at], le64(&b, at + 8));
        assert!(size >= 16, "object at {at} has size {size}");
        // xz's container costs ~60 bytes, and each object is one run of the xz tool: only
        // the large objects (the 70 KiB and 100 KiB fields) are rewritten as xz.
        let least = if kind == "xz" { 4096 } else { 64 };
        if kind_byte == 1 && size - payload_at > least {
            let payload = b[at + payload_at..at + size].to_vec();
            let (flag, packed) = match kind {
                "lz4" => {
                    let mut p = (payload.len() as u64).to_le_bytes().to_vec();
                    p.extend(lz4_flex::block::compress(&payload));
                    (2u8, p)
                }
                _ => (1u8, xz(&payload)),
            };
            if packed.len() < payload.len() {
                b[at + 1] = flag;
                b[at + 8..at + 16]
                    .copy_from_slice(&((payload_at + packed.len()) as u64).to_le_bytes());
                b[at + payload_at..at + payload_at + packed.len()].copy_from_slice(&packed);
                rewritten += 1;
            }
        }
        at += size.div_ceil(8) * 8;
    }
    let flag: u32 = if kind == "lz4" { 2 } else { 1 };
    b[12..16].copy_from_slice(&(incompat | flag).to_le_bytes());
    std::fs::write(file, b).unwrap();
    rewritten
}

/// An xz stream as journald writes them (no integrity check), from xz-utils.
fn xz(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("xz")
        .args(["--format=xz", "--check=none", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("xz (Debian's xz-utils)");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// lz4 and xz DATA objects, in files rewritten from real ones (see `recompress`).
#[test]
fn journal_cat_equals_journalctl_with_lz4_and_xz_objects() {
    require_tools();
    const N: usize = 100_000;
    let dir = tempfile::Builder::new().prefix("shipper-journal-").tempdir().unwrap();
    let stream = export(N);
    for (kind, flags, least) in
        [("lz4", "COMPRESSED-LZ4", N / 20), ("xz", "COMPRESSED-XZ", N / 1000)]
    {
        let file = make_journal(
            dir.path(),
            kind,
            &stream,
            &[("SYSTEMD_JOURNAL_COMPACT", "0")],
            &["--compress=no"],
        );
        let n = recompress(&file, kind);
        assert!(n >= least, "{kind}: only {n} DATA objects rewritten");
        assert!(header_flags(&file).contains(flags), "{}", header_flags(&file));
        oracle(&file, N);
    }
}

/// Truncation at any point, and flipped bytes anywhere: never a crash or a hang; what is read
/// is a prefix-consistent subset, and corrupt objects are reported with file and offset.
#[test]
fn corrupt_journals_are_skipped_never_fatal() {
    require_tools();
    let dir = tempfile::Builder::new().prefix("shipper-journal-").tempdir().unwrap();
    let good = make_journal(dir.path(), "good", &export(2000), &[], &[]);
    let bytes = std::fs::read(&good).unwrap();
    let reference = json_lines(&run(Command::new(BIN).args(["journal", "cat"]).arg(&good)));
    let used = u64::from_le_bytes(bytes[136..144].try_into().unwrap()) as usize + 4096;
    let cat = |name: &str, data: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        // Output to files, so a full pipe can never be mistaken for a hang.
        let (out, err) = (dir.path().join("out.json"), dir.path().join("err.txt"));
        let mut child = Command::new(BIN)
            .args(["journal", "cat"])
            .arg(&path)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let limit = std::time::Duration::from_secs(20);
        wait_for(&format!("{name}: journal cat to exit"), limit, || {
            child.try_wait().unwrap().is_some()
        });
        let status = child.wait().unwrap();
        let code =
            status.code().unwrap_or_else(|| panic!("{name}: killed by a signal: {status:?}"));
        assert!(code == 0 || code == 1, "{name}: exit {code}");
        (json_lines(&std::fs::read(&out).unwrap()), std::fs::read_to_string(&err).unwrap())
    };
    // Truncated at 40 points: every entry printed is one of the reference entries, in order.
    for k in 1..=40 {
        let cut = used * k / 41;
        let (entries, _) = cat("truncated.journal", &bytes[..cut]);
        let mut i = 0;
        for e in &entries {
            let found = reference[i..].iter().position(|r| r["__CURSOR"] == e["__CURSOR"]);
            let Some(found) = found else { panic!("cut at {cut}: unexpected entry {e}") };
            assert_eq!(e, &reference[i + found], "cut at {cut}: entry differs");
            i += found + 1;
        }
    }
    // 300 runs with 8 flipped bytes each, seeded: never a crash, hang or runaway output.
    let mut rng = XorShift64::new(42);
    for run_no in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..8 {
            let x = rng.next();
            b[(x % used as u64) as usize] ^= 1 << (x >> 61);
        }
        let (entries, _) = cat("flipped.journal", &b);
        assert!(
            entries.len() <= reference.len(),
            "run {run_no} (seed 42): more entries than written"
        );
    }
    // An entry array whose next pointer loops back to itself: reported, then the file ends.
    let mut b = bytes.clone();
    let first_array = u64::from_le_bytes(b[176..184].try_into().unwrap()) as usize;
    let self_ptr = (first_array as u64).to_le_bytes();
    b[first_array + 16..first_array + 24].copy_from_slice(&self_ptr);
    let (entries, err) = cat("loop.journal", &b);
    assert!(entries.len() < reference.len(), "{} of {} entries", entries.len(), reference.len());
    assert!(
        err.contains("entry array chain goes back"),
        "{} entries; stderr: {err}",
        entries.len()
    );
    assert!(err.contains(&format!("offset {first_array}")), "{err}");
    assert!(err.contains("loop.journal: 1 corrupt objects skipped"), "{err}");
}

/// `--since CURSOR` prints exactly the entries after that cursor.
#[test]
fn journal_cat_since_a_cursor_prints_what_follows() {
    require_tools();
    let dir = tempfile::Builder::new().prefix("shipper-journal-").tempdir().unwrap();
    let file = make_journal(dir.path(), "since", &export(3000), &[], &[]);
    let all = json_lines(&run(Command::new(BIN).args(["journal", "cat"]).arg(&file)));
    let cursor = all[1234]["__CURSOR"].as_str().unwrap().to_string();
    let rest =
        json_lines(&run(Command::new(BIN).args(["journal", "cat", "--since", &cursor]).arg(&file)));
    assert_eq!(rest, all[1235..].to_vec());
    let out = Command::new(BIN)
        .args(["journal", "cat", "--since", "s=12;i=3"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a journal cursor"));
}
