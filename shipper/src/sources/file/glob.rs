//! Path patterns of a file source: `*` (any run of bytes) and `?` (one byte) within one path
//! component, matched against directory listings. No `**`, no classes: they are refused when
//! the configuration is loaded.
//!
//! # Design constraints
//! - Bounded: at most `max` paths are kept per pattern and level; matches past it are only
//!   counted (the caller reports them as files left out).
//! - Names starting with `.` match only a component starting with `.` (as shells do).

use std::path::{Path, PathBuf};

use crate::glob::matches;

/// Paths matching the absolute `pattern`, sorted, at most `max` of them, into `out`; returns
/// how many more matched (or could not be listed for the limit).
pub fn expand(pattern: &str, max: usize, out: &mut Vec<PathBuf>) -> usize {
    let mut level = vec![PathBuf::from("/")];
    let mut over = 0;
    for part in pattern.split('/').filter(|c| !c.is_empty()) {
        if !part.contains(['*', '?']) {
            level.iter_mut().for_each(|p| p.push(part));
            continue;
        }
        let mut next = Vec::new();
        for dir in &level {
            over += list(dir, part.as_bytes(), max, &mut next);
        }
        next.sort();
        over += next.len().saturating_sub(max);
        next.truncate(max);
        level = next;
    }
    let room = max.saturating_sub(out.len());
    over += level.len().saturating_sub(room);
    out.extend(level.into_iter().take(room));
    over
}

/// Entries of `dir` whose names match `part`, at most `max`; returns how many more matched.
fn list(dir: &Path, part: &[u8], max: usize, out: &mut Vec<PathBuf>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut kept = 0;
    let mut over = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.as_encoded_bytes();
        if name.first() == Some(&b'.') && part.first() != Some(&b'.') {
            continue;
        }
        if !matches(part, name) {
            continue;
        }
        if kept < max {
            out.push(e.path());
            kept += 1;
        } else {
            over += 1;
        }
    }
    over
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_sorted_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.log", "a.log", "c.txt", ".hidden.log"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let pattern = format!("{}/*.log", dir.path().display());
        let mut out = Vec::new();
        assert_eq!(expand(&pattern, 10, &mut out), 0);
        let names: Vec<_> = out.iter().map(|p| p.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, ["a.log", "b.log"]);
        out.clear();
        assert_eq!(expand(&pattern, 1, &mut out), 1, "one match left out and counted");
        assert_eq!(out.len(), 1);
    }
}
