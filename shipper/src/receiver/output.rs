//! A receiver worker's output streams: one directory per stream (cfjs1 `format`, or service),
//! newline-delimited records exactly as the application wrote them, rotated by size.
//!
//! # Design constraints
//! - A worker owns its files (`STREAM/gGEN-cCORE-INDEX.log`), so no two threads append to
//!   one file. At most `streams_max` streams per worker; records of further streams go to
//!   `_other`. Records of frames flagged dead-letter go to `STREAM@dead_letter`. Stream names are the key with every byte outside `[A-Za-z0-9._-]` replaced by
//!   `_` (and `.`/`..`/empty names replaced by `_`).
//!
//! # Operation
//! `write_frame` groups a frame's records by stream, appends each group with one write, and
//! on any failure cuts every touched file back to where it was, so a frame is in the output
//! entirely or not at all; then [`super::commit::CommitLog`] records it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::commit::file_name;
use crate::protocol::RecordIter;

pub const OTHER_STREAM: &str = "_other";
pub const OTHER_STREAM_DEAD_LETTER: &str = "_other@dead_letter";
/// Capacity a per-stream grouping buffer keeps between frames.
const GROUP_KEEP_BYTES_MAX: usize = 4 << 20;

struct StreamFile {
    rel: String,
    file: File,
    size: u64,
    index: u64,
}

pub struct Output {
    dir: PathBuf,
    gen: u64,
    core: usize,
    file_bytes_max: u64,
    fsync: bool,
    streams_max: usize,
    streams: HashMap<String, StreamFile>,
    names: HashMap<Vec<u8>, String>,
    names_dead_letter: HashMap<Vec<u8>, String>,
    /// Records written to `_other` because `streams_max` streams were open.
    pub records_folded: u64,
    groups: Vec<(String, Vec<u8>)>,
}

/// Maps a record key to a safe directory name.
pub fn stream_name(key: &[u8]) -> String {
    let s: String = key
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => b as char,
            _ => '_',
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

/// What a written frame touched: relative path and new end of each file.
pub type Touched = Vec<(String, u64)>;

impl Output {
    pub fn new(
        dir: &Path,
        gen: u64,
        core: usize,
        file_bytes_max: u64,
        fsync: bool,
        streams_max: usize,
    ) -> Output {
        Output {
            dir: dir.to_path_buf(),
            gen,
            core,
            file_bytes_max,
            fsync,
            streams_max,
            streams: HashMap::new(),
            names: HashMap::new(),
            names_dead_letter: HashMap::new(),
            records_folded: 0,
            groups: Vec::new(),
        }
    }

    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// Ends of the files currently open, for commit-log compaction.
    pub fn open_files(&self) -> Vec<(String, u64)> {
        self.streams.values().map(|s| (s.rel.clone(), s.size)).collect()
    }

    /// The stream of records with `key`; past `streams_max` streams, `_other` (counted).
    /// Dead-lettered records go to `STREAM@dead_letter` (`@` never occurs in a stream name).
    fn stream_for(&mut self, key: &[u8], dead_letter: bool) -> &str {
        let names = if dead_letter { &mut self.names_dead_letter } else { &mut self.names };
        if !names.contains_key(key) {
            if self.names.len() + self.names_dead_letter.len() >= self.streams_max {
                self.records_folded += 1;
                return if dead_letter { OTHER_STREAM_DEAD_LETTER } else { OTHER_STREAM };
            }
            let names = if dead_letter { &mut self.names_dead_letter } else { &mut self.names };
            let name = stream_name(key);
            names.insert(
                key.to_vec(),
                if dead_letter { format!("{name}@dead_letter") } else { name },
            );
        }
        let names = if dead_letter { &self.names_dead_letter } else { &self.names };
        &names[key]
    }

    /// Writes every record of a validated payload; returns the files touched and the bytes.
    pub fn write_frame(
        &mut self,
        payload: &[u8],
        count: u32,
        dead_letter: bool,
    ) -> io::Result<(Touched, u64)> {
        let mut groups = std::mem::take(&mut self.groups);
        for g in &mut groups {
            g.1.clear();
        }
        for rec in RecordIter::new(payload, count) {
            let (key, body) = rec.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let name = self.stream_for(key, dead_letter);
            let slot = match groups.iter().position(|g| g.0 == name) {
                Some(i) => i,
                None => {
                    groups.push((name.to_string(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[slot].1.extend_from_slice(body);
            groups[slot].1.push(b'\n');
        }
        let result = self.append_groups(&groups);
        // Keep the buffers for the next frame, but not a large frame's worth of them.
        for g in &mut groups {
            if g.1.capacity() > GROUP_KEEP_BYTES_MAX {
                g.1 = Vec::new();
            }
        }
        self.groups = groups;
        result
    }

    fn append_groups(&mut self, groups: &[(String, Vec<u8>)]) -> io::Result<(Touched, u64)> {
        let mut touched: Vec<(String, u64, u64)> = Vec::new();
        let mut bytes = 0;
        for (name, data) in groups.iter().filter(|g| !g.1.is_empty()) {
            let res = self.append(name, data);
            match res {
                Ok((rel, before, after)) => {
                    touched.push((rel, before, after));
                    bytes += data.len() as u64;
                }
                Err(e) => {
                    self.undo(&touched);
                    return Err(e);
                }
            }
        }
        if self.fsync {
            for (rel, ..) in &touched {
                let s = self.streams.values().find(|s| &s.rel == rel).expect("open");
                if let Err(e) = s.file.sync_data() {
                    self.undo(&touched);
                    return Err(e);
                }
            }
        }
        Ok((touched.into_iter().map(|(rel, _, after)| (rel, after)).collect(), bytes))
    }

    /// Appends to stream `name`, rotating first if its file is full.
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<(String, u64, u64)> {
        let rotate = self.streams.get(name).is_none_or(|s| s.size >= self.file_bytes_max);
        if rotate {
            let index = self.streams.get(name).map_or(0, |s| s.index + 1);
            let rel = file_name(name, self.gen, self.core, index);
            let path = self.dir.join(&rel);
            fs::create_dir_all(path.parent().expect("stream dir"))?;
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = file.metadata()?.len();
            self.streams.insert(name.to_string(), StreamFile { rel, file, size, index });
        }
        let s = self.streams.get_mut(name).expect("opened above");
        let before = s.size;
        if let Err(e) = s.file.write_all(data) {
            let _ = s.file.set_len(before);
            return Err(e);
        }
        s.size += data.len() as u64;
        Ok((s.rel.clone(), before, s.size))
    }

    /// Cuts files back to their size before a failed frame.
    fn undo(&mut self, touched: &[(String, u64, u64)]) {
        for (rel, before, _) in touched {
            if let Some(s) = self.streams.values_mut().find(|s| &s.rel == rel) {
                if let Err(e) = s.file.set_len(*before) {
                    panic!("cannot cut {rel} back to {before} bytes after a failed write: {e}; refusing to go on with a corrupt output");
                }
                s.size = *before;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_safe() {
        assert_eq!(stream_name(b"nginx_access"), "nginx_access");
        assert_eq!(stream_name(b"../etc"), "_.._etc");
        assert_eq!(stream_name(b"a/b c"), "a_b_c");
        assert_eq!(stream_name(b""), "_");
        assert_eq!(stream_name("é".as_bytes()), "__");
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;
    use crate::protocol::RecordWriter;

    #[test]
    fn rotates_between_frames_and_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Output::new(dir.path(), 3, 1, 4096, false, 8);
        let body = [b'x'; 1000];
        for _ in 0..10 {
            let mut payload = Vec::new();
            for _ in 0..3 {
                RecordWriter::push(&mut payload, b"web", &body);
            }
            let (touched, bytes) = out.write_frame(&payload, 3, false).unwrap();
            assert_eq!(bytes, 3003);
            assert_eq!(touched.len(), 1);
        }
        let mut files: Vec<_> = fs::read_dir(dir.path().join("web")).unwrap().flatten().collect();
        files.sort_by_key(|f| f.file_name());
        let names: Vec<String> =
            files.iter().map(|f| f.file_name().into_string().unwrap()).collect();
        // 3003 bytes per frame, rotated once a file reaches 4096: two frames per file.
        assert_eq!(names, (0..5).map(|i| format!("g000003-c001-{i:06}.log")).collect::<Vec<_>>());
        let total: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
        assert_eq!(total, 30 * 1001);
    }

    #[test]
    fn streams_past_the_limit_fold_into_other_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Output::new(dir.path(), 1, 0, 1 << 20, false, 2);
        let mut payload = Vec::new();
        for key in [&b"a"[..], b"b", b"c", b"d", b"a"] {
            RecordWriter::push(&mut payload, key, b"x");
        }
        out.write_frame(&payload, 5, false).unwrap();
        assert_eq!(out.records_folded, 2);
        let lines = |s: &str| {
            let f = dir.path().join(s).join("g000001-c000-000000.log");
            fs::read_to_string(f).unwrap().lines().count()
        };
        assert_eq!((lines("a"), lines("b"), lines(OTHER_STREAM)), (2, 1, 2));
    }
}
