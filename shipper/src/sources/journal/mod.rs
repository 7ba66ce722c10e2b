//! Journal source: systemd-journald's files read natively, without libsystemd or journalctl.
//!
//! # Design constraints
//! - Every offset read from a file is checked against the file before it is followed; every
//!   object is bounded ([`file::OBJECT_BYTES_MAX`]), decompression is bounded by the same limit,
//!   and entry-array chains must move forward, so a corrupt or hostile file costs at most a
//!   bounded read and a counted skip, never a crash, a loop or an unbounded allocation.
//! - Files are read through a bounded block cache ([`file::BlockCache`]), never mmap'd: a file
//!   truncated under the reader gives an error, not SIGBUS. The decoder never does I/O itself:
//!   a miss returns the bytes it needs, which the source loads through its worker's io_uring
//!   (so a slow disk stalls no other source of the worker) and `shipper journal cat` with
//!   `pread`.
//!
//! # Format
//! See systemd's "Journal File Format". In short: a header (signature `LPKSHHRH`, flags, ids,
//! offsets of the hash tables and of the first entry array), then 8-byte aligned objects
//! `{ type: u8, flags: u8, reserved: [u8; 6], size: u64, payload }`: DATA (one `FIELD=value`,
//! maybe compressed), FIELD, ENTRY (seqnum, realtime, monotonic, boot id, xor hash, items
//! pointing at DATA objects), ENTRY_ARRAY (a chain listing every entry), hash tables and TAGs.
//! "Compact" files (incompatible flag 16) use 32-bit offsets in entries and entry arrays.
//!
//! # Operation
//! [`reader::JournalReader`] walks the global entry-array chain of one file and decodes each
//! entry into fields; [`json`] renders an entry as `journalctl -o json --all` does;
//! [`merge`] interleaves several files in journalctl's order.

pub mod checkpoint;
pub mod cursor;
pub mod file;
pub mod json;
pub mod merge;
pub mod reader;
pub mod source;

pub use file::JournalError;
pub use reader::{Entry, JournalReader};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::shipper::{ShipperConfig, Since};
use crate::config::{Problems, Seg};

/// Journal files under `path` (itself if a file; else `*.journal` and `*.journal~` up to two
/// directory levels down), sorted by name.
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_dir() && depth > 0 {
                walk(&p, depth - 1, out)?;
            } else if name.ends_with(".journal") || name.ends_with(".journal~") {
                out.push(p);
            }
        }
        Ok(())
    }
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    walk(path, 2, &mut out)?;
    out.sort();
    Ok(out)
}

/// `shipper journal cat`: every entry as a JSON line on standard output. Files that cannot
/// be opened are reported and skipped (exit 1); corrupt objects are skipped with a warning,
/// and each file's count of them is printed on standard error at the end.
pub fn cat(paths: &[PathBuf], since: Option<&str>) -> anyhow::Result<ExitCode> {
    let since = match since {
        Some(s) => Some(
            cursor::Cursor::parse(s)
                .ok_or_else(|| anyhow::anyhow!("--since: {s:?} is not a journal cursor"))?,
        ),
        None => None,
    };
    let mut readers = Vec::new();
    let mut failed = false;
    for p in paths {
        for f in files(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))? {
            match file::JournalFile::open(&f) {
                Ok(jf) => readers.push(JournalReader::new(jf)),
                Err(e) => {
                    eprintln!("error: {e}");
                    failed = true;
                }
            }
        }
    }
    let mut merge = merge::Merge::new(readers);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let mut line = Vec::with_capacity(4096);
    while let Some((_, seqnum_id, entry)) = merge.next_blocking() {
        if since.as_ref().is_some_and(|c| c.covers(&seqnum_id, entry)) {
            continue;
        }
        line.clear();
        json::render(&seqnum_id, entry, &mut line);
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e.into());
        }
    }
    out.flush()?;
    for r in merge.readers.iter().filter(|r| r.corrupt > 0) {
        eprintln!("{}: {} corrupt objects skipped", r.file.path.display(), r.corrupt);
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// The journal source's own checks of `sources.journal`: what needs the journal's grammar
/// (a field name, a cursor). Run by the configuration loader beside its own checks.
pub fn check_config(config: &ShipperConfig, p: &mut Problems) {
    for (i, j) in config.sources.journal.iter().enumerate() {
        let at = |k| [Seg::Key("sources"), Seg::Key("journal"), Seg::Index(i), Seg::Key(k)];
        p.check(reader::field_name_valid(j.service_field.as_bytes()), &at("service_field"), || {
            format!("{:?} is not a journal field name (A-Z, 0-9, _)", j.service_field)
        });
        if let Since::Cursor(c) = &j.since {
            p.check(cursor::Cursor::parse(c).is_some(), &at("since"), || {
                format!("{c:?} is neither \"oldest\", \"now\" nor a journal cursor")
            });
        }
    }
}

/// Counters of one journal source.
#[derive(Clone, Debug, Default)]
pub struct JournalCounters {
    pub source: String,
    pub entries_read: u64,
    pub bytes_read: u64,
    pub entries_filtered: u64,
    /// Identifiers (the service) cut to the protocol's 255 bytes.
    pub keys_truncated: u64,
    pub files_open: u64,
    pub corrupt_objects: u64,
    /// Entries in the files not read yet.
    pub lag_entries: u64,
    /// Seconds between the newest entry in the files and the last entry read.
    pub lag_seconds: u64,
    pub checkpoint_write_errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal's own checks run beside the configuration's, with the line of the key.
    #[test]
    fn a_bad_field_name_and_a_bad_cursor_are_refused_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "").unwrap();
        let text = format!(
            "[receivers]\nprimary = [\"127.0.0.1:1\"]\n\n[tls]\nca = {pem:?}\ncert = {pem:?}\n\
             key = {pem:?}\n\n[[sources.journal]]\nservice_field = \"bad-name\"\n\
             since = \"s=12;i=3\"\n"
        );
        let text = text.as_str();
        let file = Path::new("edge.toml");
        let checks: &[crate::config::Check<ShipperConfig>] = &[check_config];
        let e = crate::config::parse_with::<ShipperConfig>(text, file, checks).unwrap_err();
        let got: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "edge.toml:10: sources.journal[0].service_field: \"bad-name\" is not a journal \
                 field name (A-Z, 0-9, _)",
                "edge.toml:11: sources.journal[0].since: \"s=12;i=3\" is neither \"oldest\", \
                 \"now\" nor a journal cursor",
            ]
        );
        let fine = text.replace("bad-name", "MY_FIELD").replace("s=12;i=3", "oldest");
        assert!(crate::config::parse_with::<ShipperConfig>(&fine, file, checks).is_ok());
        assert!(crate::config::parse::<ShipperConfig>(text, file).is_ok(), "without the checks");
    }
}
