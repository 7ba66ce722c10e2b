use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let text = |out: &mut Vec<u8>, name: &str, v: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    };
    let binary = |out: &mut Vec<u8>, name: &str, v: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    };
    for i in 0..n {
        text(
            &mut out,
            "__REALTIME_TIMESTAMP",
            format!("{}", 1_700_000_000_000_000u64 + i as u64 * 1000).as_bytes(),
        );
        text(
            &mut out,
            "__MONOTONIC_TIMESTAMP",
            format!("{}", 5_000_000 + i as u64 * 1000).as_bytes(),
        );
        text(&mut out, "_BOOT_ID", b"0123456789abcdef0123456789abcdef");
        let ident = ["app", "db", "web", "kernel"][i % 4];
        text(&mut out, "SYSLOG_IDENTIFIER", ident.as_bytes());
        text(&mut out, "_SYSTEMD_UNIT", format!("{ident}.service").as_bytes());
        text(&mut out, "PRIORITY", format!("{}", i % 8).as_bytes());
        if i % 7 == 0 {
            binary(
                &mut out,
                "MESSAGE",
                format!("line one of {i}\n\tline two é\nline three").as_bytes(),
            );
        } else {
            text(
                &mut out,
                "MESSAGE",
                format!("request {i} served in {} ms", rnd() % 1000).as_bytes(),
            );
        }
        if i % 5 == 0 {
            text(&mut out, "EMPTY", b"");
        }
        if i % 3 == 0 {
            let v: Vec<u8> = (0..(rnd() % 64) as usize).map(|_| rnd() as u8).collect();
            binary(&mut out, "BLOB", &v);
        }
        if i % 11 == 0 {
            text(&mut out, "LATIN1", b"caf\xe9 cr\xe8me");
        }
        if i % 13 == 0 {
            text(&mut out, "CONTROL", b"bell\x07 and del\x7f");
        }
        if i % 17 == 0 {
            text(&mut out, "TAG", b"first");
            text(&mut out, "TAG", format!("second {}", i % 3).as_bytes());
        }
        if i % 20_000 == 0 {
            let big: Vec<u8> = (0..100_000).map(|k| b"abcdefghij\n"[(k + i) % 11]).collect();
            binary(&mut out, "LARGE", &big);
        }
        if i % 1000 == 0 {
            // Large, but random: stays uncompressed or compresses badly.
            let big: Vec<u8> = (0..70_000).map(|_| b'a' + (rnd() % 26) as u8).collect();
            text(&mut out, "NOISE", &big);
        }
        out.push(b'\n');
    }
    out
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
