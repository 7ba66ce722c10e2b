//! How a files output writes each record as one line (`format`).
//!
//! # Format
//! ```text
//! raw      RECORD
//! json     {"time":"TIME","host":"SENDER","stream":"KEY","record":"RECORD"}
//! rfc5424  <134>1 TIME SENDER APP - - - RECORD
//! cfjs1    {"format":"KEY","KEY":RECORD}        RECORD as it is when it is JSON on one line,
//!                                               else as a JSON string
//! TIME     when the receiver wrote the frame, UTC, RFC 3339 with microseconds:
//!          2026-12-01T01:50:00.123456Z
//! SENDER   the shipper's name from its HELLO; in rfc5424 cut to 255 bytes of printable
//!          ASCII (others become `_`), `-` when empty
//! APP      KEY cut to 48 bytes of printable ASCII (others become `_`), `-` when empty
//! ```
//! Each line ends with `\n`. JSON strings keep the record's bytes (escaping `"`, `\` and
//! control bytes only). `<134>` is facility local0, severity informational.

use crate::config::receiver::FileFormat;
use crate::receiver::output::clickhouse::push_json_string;

/// Writes records as lines in one format, with the time and sender of the frame being written.
pub struct LineFormat {
    format: FileFormat,
    /// TIME of the frame being written.
    time: String,
    /// SENDER as rfc5424 writes it.
    host: String,
}

impl LineFormat {
    pub fn new(format: FileFormat) -> LineFormat {
        LineFormat { format, time: String::new(), host: String::new() }
    }

    /// Starts a frame of `sender`, written at `unix_us`.
    pub fn frame(&mut self, sender: &str, unix_us: u64) {
        if self.format == FileFormat::Raw || self.format == FileFormat::Cfjs1 {
            return;
        }
        self.time.clear();
        rfc3339_us(unix_us, &mut self.time);
        self.host.clear();
        if self.format == FileFormat::Rfc5424 {
            printable(sender.as_bytes(), 255, &mut self.host);
        } else {
            self.host.push_str(sender);
        }
    }

    /// Appends `record` of stream `key` as one line to `out`.
    pub fn line(&self, key: &[u8], record: &[u8], out: &mut Vec<u8>) {
        match self.format {
            FileFormat::Raw => out.extend_from_slice(record),
            FileFormat::Json => {
                out.extend_from_slice(b"{\"time\":\"");
                out.extend_from_slice(self.time.as_bytes());
                out.extend_from_slice(b"\",\"host\":");
                push_json_string(out, self.host.as_bytes());
                out.extend_from_slice(b",\"stream\":");
                push_json_string(out, key);
                out.extend_from_slice(b",\"record\":");
                push_json_string(out, record);
                out.push(b'}');
            }
            FileFormat::Rfc5424 => {
                out.extend_from_slice(b"<134>1 ");
                out.extend_from_slice(self.time.as_bytes());
                out.push(b' ');
                out.extend_from_slice(self.host.as_bytes());
                out.push(b' ');
                let mut app = String::new();
                printable(key, 48, &mut app);
                out.extend_from_slice(app.as_bytes());
                out.extend_from_slice(b" - - - ");
                out.extend_from_slice(record);
            }
            FileFormat::Cfjs1 => {
                out.extend_from_slice(b"{\"format\":");
                push_json_string(out, key);
                out.push(b',');
                push_json_string(out, key);
                out.push(b':');
                if is_json_line(record) {
                    out.extend_from_slice(record);
                } else {
                    push_json_string(out, record);
                }
                out.push(b'}');
            }
        }
        out.push(b'\n');
    }
}

/// Whether `record` is one JSON value on one line.
fn is_json_line(record: &[u8]) -> bool {
    !record.contains(&b'\n') && serde_json::from_slice::<serde::de::IgnoredAny>(record).is_ok()
}

/// `bytes` cut to `max` bytes of printable ASCII (`!` to `~`; others become `_`), `-` when
/// empty, appended to `out`.
fn printable(bytes: &[u8], max: usize, out: &mut String) {
    if bytes.is_empty() {
        out.push('-');
        return;
    }
    out.extend(bytes.iter().take(max).map(|&b| if b.is_ascii_graphic() { b as char } else { '_' }));
}

/// Appends `unix_us` as UTC `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`.
pub fn rfc3339_us(unix_us: u64, out: &mut String) {
    let (secs, us) = (unix_us / 1_000_000, unix_us % 1_000_000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    out.push_str(&format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{us:06}Z"));
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01: days are counted
/// in 400-year eras of 146097 days, years starting in March so that the leap day ends one.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of the era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of the era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year, from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..11
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = era * 400 + yoe + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let at = |us| {
            let mut s = String::new();
            rfc3339_us(us, &mut s);
            s
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day of a century year) 12:34:56.789012
        assert_eq!(at(951_827_696_789_012), "2000-02-29T12:34:56.789012Z");
        assert_eq!(at(1_796_083_200_000_001), "2026-12-01T00:00:00.000001Z");
        assert_eq!(at(4_107_542_399_000_000), "2100-02-28T23:59:59.000000Z");
    }

    #[test]
    fn each_format_writes_one_line() {
        let line = |format, key: &[u8], record: &[u8]| {
            let mut f = LineFormat::new(format);
            f.frame("edge 1", 0);
            let mut out = Vec::new();
            f.line(key, record, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(line(FileFormat::Raw, b"k", b"a \"b\""), "a \"b\"\n");
        assert_eq!(
            line(FileFormat::Json, b"k", b"a \"b\""),
            "{\"time\":\"1970-01-01T00:00:00.000000Z\",\"host\":\"edge 1\",\"stream\":\"k\",\
             \"record\":\"a \\\"b\\\"\"}\n"
        );
        assert_eq!(
            line(FileFormat::Rfc5424, b"my app", b"hello"),
            "<134>1 1970-01-01T00:00:00.000000Z edge_1 my_app - - - hello\n"
        );
        assert_eq!(
            line(FileFormat::Rfc5424, b"", b"x"),
            "<134>1 1970-01-01T00:00:00.000000Z edge_1 - - - - x\n"
        );
        let app = "a".repeat(60);
        assert!(line(FileFormat::Rfc5424, app.as_bytes(), b"x")
            .contains(&format!(" {} - - - x", &app[..48])));
        assert_eq!(
            line(FileFormat::Cfjs1, b"http", b"{\"n\":1}"),
            "{\"format\":\"http\",\"http\":{\"n\":1}}\n"
        );
        assert_eq!(
            line(FileFormat::Cfjs1, b"http", b"not json"),
            "{\"format\":\"http\",\"http\":\"not json\"}\n"
        );
    }
}
