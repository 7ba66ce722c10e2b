//! File source: log files followed by path or glob, with positions saved over acknowledged
//! lines, through rotation (rename, copy-and-truncate), deletion and restarts.
//!
//! # Design constraints
//! - Durable, like the journal source: it reads only while its worker's outbox has room for
//!   two full batches (it pauses, its data waits on disk, nothing is dropped for room), and a
//!   file's position moves only over lines whose frames, and every earlier frame of the
//!   source, were settled ([`positions`]).
//! - Bounded: at most `files_max` files followed (more matches counted), one read buffer of
//!   [`source::READ_BYTES`] per source, a partial line of at most `line_bytes_max` per file.
//! - Every read of a file goes through the worker's io_uring (the chunk at the position, the
//!   first 256 bytes for its fingerprint); listing the paths, `stat` of each path and
//!   opening a new file are the only synchronous calls, once per poll, as the journal's.
//! - Change detection by inotify ([`watch`]: the directories of the paths and of the files
//!   followed), and by polling every `poll_interval_ms` besides: a poll bounds the work
//!   whatever the write rate, and catches what inotify misses (NFS, files replaced behind a
//!   link, watches exhausted).
//! - Known limits: a file renamed to a name `paths` does not match is read to its end only
//!   while the shipper runs (after a crash its unread tail is not found again: list rotated
//!   names in `paths`, `app.log*`, to be safe); with copy-and-truncate, lines written between
//!   the copy and the truncation are lost (logrotate's own window), and a copy whose name
//!   matches `paths` is a new file, read again in full.
//!
//! # Format
//! The positions file: [`positions`]. A record's mark: `HANDED FILE OFFSET` (hex).
//!
//! # Operation
//! [`source::run`] lists the paths (`glob`), opens each new file at its saved position (found
//! by device, inode and fingerprint, [`identity`]) or at `since`, reads every file in turn
//! and hands each line over (`sources::lines` cuts lines over `line_bytes_max`; with
//! `multiline_start`, [`multiline`] joins them into records first), and checks
//! each file at every poll for rotation and truncation.

pub mod glob;
pub mod identity;
pub mod multiline;
pub mod positions;
pub mod source;
pub mod watch;

use crate::sources::pipe::SourceCounters;

/// Counters of one file source.
#[derive(Clone, Debug, Default)]
pub struct FileCounters {
    pub source: String,
    /// Lines read, bytes read, lines cut, empty lines, keys cut, parse failures, read errors:
    /// published with the pipes' (`shipper_source_*`), under this source's name.
    pub lines: SourceCounters,
    /// Last lines without a newline handed over after `partial_line_ms`.
    pub lines_partial: u64,
    /// Lines joined to the record before them (`multiline_start`): a source's lines read
    /// (`shipper_source_lines_read_total`) count records, these count the lines in them past
    /// the first.
    pub lines_joined: u64,
    /// Files that left the path they were followed at (renamed, within `paths` or out of
    /// them, or deleted): rotations by rename, as logrotate's `create` does.
    pub rotations: u64,
    /// Files cut shorter than their position, or rewritten from their start: read again.
    pub truncations: u64,
    pub files_open: u64,
    /// Matches left out at the last listing (over `files_max`).
    pub files_unfollowed: u64,
    /// Bytes in the files followed not read yet (sizes at the last listing).
    pub lag_bytes: u64,
    pub positions_write_errors: u64,
    /// Each file followed, as of the last listing (at most `files_max`).
    pub followed: Vec<Followed>,
}

/// One followed file as published: its path, how far it was read, and its size.
#[derive(Clone, Debug, Default)]
pub struct Followed {
    pub path: String,
    pub read_bytes: u64,
    pub size_bytes: u64,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::shipper::ShipperConfig;

    /// The file source's table is checked with the line of each key at fault.
    #[test]
    fn bad_keys_are_refused_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "").unwrap();
        let text = format!(
            "[receivers]\nprimary = [\"127.0.0.1:1\"]\n\n[tls]\nca = {pem:?}\ncert = {pem:?}\n\
             key = {pem:?}\n\n[[sources.file]]\npaths = [\"var/log/*.log\"]\n\
             positions = \"/p\"\npoll_interval_ms = 5\nfiles_max = 0\n\n\
             [[sources.file]]\npaths = [\"/var/**/x.log\"]\npositions = \"/p\"\n"
        );
        let e = crate::config::parse::<ShipperConfig>(&text, Path::new("edge.toml")).unwrap_err();
        let got: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "edge.toml:10: sources.file[0].paths: \"var/log/*.log\" is not absolute",
                "edge.toml:12: sources.file[0].poll_interval_ms: 5 is out of range (allowed: \
                 10 to 60000)",
                "edge.toml:13: sources.file[0].files_max: 0 is out of range (allowed: 1 to \
                 65536)",
                "edge.toml:16: sources.file[1].paths: \"/var/**/x.log\": `**` is not supported \
                 (`*` matches within one component)",
                "edge.toml:17: sources.file[1].positions: /p is the positions file of an \
                 earlier file source",
            ]
        );
        let fine = "[[sources.file]]\npaths = [\"/var/log/app.log\"]\n";
        let cfg: crate::config::shipper::FileSource =
            toml::from_str(fine.trim_start_matches("[[sources.file]]\n")).unwrap();
        assert_eq!(
            (cfg.service_name(), cfg.files_max, cfg.partial_line_ms),
            ("app".into(), 1024, 1000)
        );
    }
}
