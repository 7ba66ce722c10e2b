//! The ClickHouse output: the records it selects of each group of frames, one HTTP insert
//! per group (`INSERT INTO TABLE FORMAT JSONEachRow`) into a table with a stream column. It
//! cannot take back what it inserted, so it has no marks and relies on the de-duplication
//! windows alone.
//!
//! # Design constraints
//! - The insert is a blocking HTTP/1.1 request made on the shard's writer thread
//!   ([`crate::receiver::writer`]), in [`Output::sync`], bounded by `timeout_ms` in all (name
//!   lookup aside): connect, send and the answer. Meanwhile the shard reads on and answers
//!   heartbeats; frames queue for the next group (within the frame budget). A hung server
//!   holds that shard's acknowledgements for `timeout_ms` per group, so a `timeout_ms` near
//!   the shippers' `ack_timeout_ms` makes them fail over.
//! - One TCP connection per insert (`Connection: close`): no pool to bound, one descriptor
//!   per shard and output while it inserts (`descriptors_reserved`), through
//!   [`crate::http::request`]. An answer over [`RESPONSE_BYTES_MAX`] is an error; its text
//!   goes into the error when it is not 200.
//! - Durable means: ClickHouse answered 200 to the insert, sent with `wait_end_of_query=1` so
//!   that the status is the insert's outcome. The rows are then in the table's parts on that
//!   server: they survive the server's restart; whether they survive its host losing power
//!   depends on ClickHouse's own settings (it does not fsync parts by default), and for a
//!   replicated table on `insert_quorum`. An insert of more than `max_insert_block_size`
//!   rows (1048576 by default) may be split into blocks, of which some may be in the table
//!   when it fails: resent, those rows are there twice.
//! - Duplicates: a frame inserted but whose commit did not happen (the receiver crashed
//!   between the insert and the commit record, or another output failed after it) is not
//!   acknowledged; the shipper resends it and the table gets its records twice. Nothing is
//!   lost: an insert that failed is answered ERROR and resent.
//!
//! # Format
//! ```text
//! CREATE TABLE logs (stream String, record String) ENGINE = MergeTree ORDER BY stream
//! POST /?query=INSERT%20INTO%20TABLE%20FORMAT%20JSONEachRow&wait_end_of_query=1
//! body, per record: {"stream":"KEY","record":"BODY"}\n
//!   KEY: the record's key (service or cfjs1 format), `@dead_letter` appended for frames sent
//!        here as a dead-letter destination; BODY: the line as the application wrote it.
//!   Both escaped as JSON strings: `"` `\` and bytes below 0x20 escaped, all others as they
//!   are (ClickHouse's String holds bytes; no UTF-8 check).
//! ```
//!
//! # Operation
//! [`Output::write`] builds the insert's body of the records the output selects;
//! [`Output::sync`] sends it and returns once ClickHouse answered 200 (any other answer, a
//! refused connection or a timeout is an error: the frame is not acknowledged, the shipper
//! backs off and resends); [`Output::undo`] forgets a body not sent (one sent stays).

use std::io;
use std::time::Duration;

use super::{Intents, Kind, Mark, Output, Records, Select, WriteError, Written};
use crate::config::receiver::ClickhouseSection;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::OutputCounters;
use crate::receiver::commit::LogState;

/// The ClickHouse output as [`super::KINDS`] lists it.
pub const KIND: Kind = Kind { recover, open };

/// Bytes of a ClickHouse answer read; the rest is not.
pub const RESPONSE_BYTES_MAX: usize = 64 << 10;
/// Capacity of the insert body kept between frames.
const BODY_KEEP_BYTES_MAX: usize = 4 << 20;
const DEAD_LETTER_SUFFIX: &[u8] = b"@dead_letter";

/// Nothing to cut back: inserted rows stay ([`Kind::recover`]).
fn recover(_: &ReceiverConfig, _: &LogState) -> io::Result<()> {
    Ok(())
}

/// Shard `shard`'s ClickHouse outputs ([`Kind::open`]): nothing is connected before a frame.
fn open(config: &ReceiverConfig, _gen: u64, _shard: usize) -> Vec<Box<dyn Output>> {
    let open = |c| Box::new(ClickHouse::new(c)) as Box<dyn Output>;
    config.outputs.clickhouse.iter().map(open).collect()
}

/// One shard's ClickHouse output.
pub struct ClickHouse {
    name: String,
    /// `HOST:PORT`.
    addr: String,
    /// The request line's target: the insert query and its settings.
    target: String,
    /// `Authorization` header line, with its CRLF, or empty.
    auth: String,
    timeout: Duration,
    select: Select,
    /// The insert of the group being written, until sent or discarded.
    body: Vec<u8>,
    /// Where the frame written last starts in `body`.
    frame_start: usize,
}

impl ClickHouse {
    pub fn new(c: &ClickhouseSection) -> ClickHouse {
        let query = format!("INSERT%20INTO%20{}%20FORMAT%20JSONEachRow", c.table);
        let auth = match (&c.user, &c.password) {
            (None, None) => String::new(),
            (user, password) => {
                let user = user.as_deref().unwrap_or("default");
                let secret = format!("{user}:{}", password.as_deref().unwrap_or(""));
                format!("Authorization: Basic {}\r\n", base64(secret.as_bytes()))
            }
        };
        ClickHouse {
            name: c.name.clone(),
            addr: crate::http::host_port(&c.url).expect("validated").to_string(),
            target: format!("/?query={query}&wait_end_of_query=1"),
            auth,
            timeout: Duration::from_millis(c.timeout_ms),
            select: Select::new(&c.streams, &c.exclude_streams),
            body: Vec::new(),
            frame_start: 0,
        }
    }

    /// Sends the insert in `body`; `Ok` once ClickHouse answered 200.
    fn insert(&self) -> io::Result<()> {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
            self.target,
            self.addr,
            self.body.len(),
            self.auth
        );
        let answer =
            crate::http::request(&self.addr, &head, &self.body, self.timeout, RESPONSE_BYTES_MAX)?;
        if answer.status == 200 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&answer.body);
        let cut: String = text.trim().chars().take(300).collect();
        let line = answer.status_line;
        Err(io::Error::other(format!("clickhouse {} answered {line:?}: {cut}", self.addr)))
    }
}

/// Appends `bytes` as a JSON string: `"` `\` and bytes below 0x20 escaped, others as they are.
pub fn push_json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Standard base64 with padding (for HTTP basic authentication).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() { ABC[(n >> (18 - 6 * i)) as usize & 63] } else { b'=' };
            out.push(c as char);
        }
    }
    out
}

impl Output for ClickHouse {
    fn name(&self) -> &str {
        &self.name
    }

    /// Adds the records it selects to the group's insert; never fails.
    fn write(&mut self, records: &Records, _: &mut dyn Intents) -> Result<Written, WriteError> {
        self.frame_start = self.body.len();
        let mut taken = 0;
        for rec in records.iter() {
            let (key, body) = rec
                .map_err(|e| WriteError::Refused(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if !self.select.takes(key) {
                continue;
            }
            taken += 1;
            self.body.extend_from_slice(b"{\"stream\":");
            if records.dead_letter {
                push_json_string(&mut self.body, &[key, DEAD_LETTER_SUFFIX].concat());
            } else {
                push_json_string(&mut self.body, key);
            }
            self.body.extend_from_slice(b",\"record\":");
            push_json_string(&mut self.body, body);
            self.body.extend_from_slice(b"}\n");
        }
        Ok(Written { records: taken, bytes: (self.body.len() - self.frame_start) as u64 })
    }

    /// Sends the group's insert; returns once ClickHouse answered 200.
    fn sync(&mut self) -> io::Result<()> {
        let result = if self.body.is_empty() { Ok(()) } else { self.insert() };
        self.discard();
        result
    }

    /// Drops the frame written last from the insert.
    fn undo(&mut self) {
        self.body.truncate(self.frame_start);
    }

    /// Forgets an insert not sent; rows inserted stay (the resend inserts them again).
    fn discard(&mut self) {
        self.body.clear();
        self.frame_start = 0;
        if self.body.capacity() > BODY_KEEP_BYTES_MAX {
            self.body = Vec::new();
        }
    }

    fn committed(&mut self) {}

    fn marks<'a>(&'a self, _: &mut Vec<Mark<'a>>) {}

    fn checkpoint<'a>(&'a self, _: &mut Vec<Mark<'a>>) {}

    fn report(&self, _: &mut OutputCounters) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_what_json_needs() {
        let mut out = Vec::new();
        push_json_string(&mut out, b"a\"b\\c\nd\x01\xff");
        assert_eq!(out, b"\"a\\\"b\\\\c\\nd\\u0001\xff\"");
    }

    #[test]
    fn base64_is_the_standard_alphabet() {
        assert_eq!(base64(b"default:"), "ZGVmYXVsdDo=");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b""), "");
    }
}
