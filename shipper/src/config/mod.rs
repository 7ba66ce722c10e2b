//! TOML configuration of both sides, validated with errors that name the file, line and key.
//!
//! # Operation
//! 1. The text is deserialized into the structs of [`shipper`] or [`receiver`]; they use
//!    `deny_unknown_fields`, so typos and wrong types fail here with the span toml reports.
//! 2. `validate` checks values and relations between them and returns every problem as a key
//!    path; [`locate`] maps the path back to a line with `toml_edit`'s spans.
//!
//! Every field's unit and default are in its doc comment and in `docs/config.md`.

pub mod enrich;
pub mod forward;
pub mod kafka;
pub mod receiver;
pub mod shipper;
pub mod socket;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;

pub use receiver::ReceiverConfig;
pub use shipper::ShipperConfig;

/// One problem in a configuration file.
#[derive(Debug, Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted key path (`sources.pipe[0].mode`), when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found in one file.
#[derive(Debug, Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A path into the TOML document: table keys and array indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Name(String),
    Index(usize),
}

/// Collects value problems during validation.
#[derive(Default)]
pub struct Problems(Vec<(Vec<Seg>, String)>);

impl Problems {
    pub fn add(&mut self, path: &[Seg], message: impl Into<String>) {
        self.0.push((path.to_vec(), message.into()));
    }

    pub fn check(&mut self, ok: bool, path: &[Seg], message: impl FnOnce() -> String) {
        if !ok {
            self.add(path, message());
        }
    }

    /// A value that must lie in `min..=max`.
    pub fn range(&mut self, value: u64, min: u64, max: u64, path: &[Seg]) {
        self.check((min..=max).contains(&value), path, || {
            format!("{value} is out of range (allowed: {min} to {max})")
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => push_key(&mut s, k),
            Seg::Name(k) => push_key(&mut s, k),
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn push_key(s: &mut String, k: &str) {
    if !s.is_empty() {
        s.push('.');
    }
    s.push_str(k);
}

/// Finds the line of the deepest item of `path` present in `text` (1-based).
pub fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut span = None;
    for seg in path {
        let next = match seg {
            Seg::Key(k) => item.get(*k),
            Seg::Name(k) => item.get(k.as_str()),
            Seg::Index(i) => item.get(*i),
        };
        match next {
            Some(n) => {
                item = n;
                span = n.span().or(span);
            }
            None => break,
        }
    }
    span.map(|r| line_of(text, r.start))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Implemented by the two top-level configs.
pub trait Validate {
    fn validate(&self, problems: &mut Problems);
}

/// A check a stage adds to its configuration table's validation: the stage knows grammars
/// (a journal cursor, a field name) this module does not.
pub type Check<C> = fn(&C, &mut Problems);

/// Reads, parses and validates the configuration at `file`, running the stages' `checks`
/// after the config's own.
pub fn load<C: DeserializeOwned + Validate>(
    file: &Path,
    checks: &[Check<C>],
) -> Result<C, ConfigErrors> {
    let one = |line, key, message| {
        ConfigErrors(vec![ConfigError { file: file.to_path_buf(), line, key, message }])
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| one(None, None, format!("cannot read configuration: {e}")))?;
    parse_with(&text, file, checks)
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse<C: DeserializeOwned + Validate>(text: &str, file: &Path) -> Result<C, ConfigErrors> {
    parse_with(text, file, &[])
}

/// Parses and validates configuration text, running the stages' `checks` after the
/// config's own; `file` names it in errors.
pub fn parse_with<C: DeserializeOwned + Validate>(
    text: &str,
    file: &Path,
    checks: &[Check<C>],
) -> Result<C, ConfigErrors> {
    let config: C = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let key = e.span().and_then(|s| key_at(text, s.start));
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            line,
            key,
            message: e.message().trim().to_string(),
        }])
    })?;
    let mut problems = Problems::default();
    config.validate(&mut problems);
    for check in checks {
        check(&config, &mut problems);
    }
    if problems.is_empty() {
        return Ok(config);
    }
    Err(ConfigErrors(
        problems
            .0
            .into_iter()
            .map(|(path, message)| ConfigError {
                file: file.to_path_buf(),
                line: locate(text, &path),
                key: Some(path_text(&path)),
                message,
            })
            .collect(),
    ))
}

/// The key written on the line holding `offset` (`key = value` or `[table]`), for errors toml
/// reports with a span only.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?.trim();
    if let Some((k, _)) = line.split_once('=') {
        return Some(k.trim().to_string());
    }
    let t = line.trim_matches(|c| c == '[' || c == ']').trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Parses an octal file mode written as a string (`"0620"`).
pub fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

/// The number of CPUs this process may run on, the default for `workers`.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0620"), Some(0o620));
        assert_eq!(parse_mode("0o644"), Some(0o644));
        assert_eq!(parse_mode("999"), None);
        assert_eq!(parse_mode(""), None);
        assert_eq!(parse_mode("77777"), None);
    }

    #[test]
    fn locate_finds_nested_lines() {
        let text = "a = 1\n[[sources.pipe]]\npath = \"x\"\n[[sources.pipe]]\nmode = \"9\"\n";
        let path = [Seg::Key("sources"), Seg::Key("pipe"), Seg::Index(1), Seg::Key("mode")];
        assert_eq!(locate(text, &path), Some(5));
        assert_eq!(path_text(&path), "sources.pipe[1].mode");
    }
}
