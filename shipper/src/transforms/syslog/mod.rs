//! Syslog messages (RFC 5424 and RFC 3164) parsed into fields and rendered as one JSON object.
//!
//! # Design constraints
//! - Branch in the parent, loop in the leaf: [`parse`] is a free function over a byte slice
//!   that borrows every field from its input (no allocation), and [`write_json`] appends the
//!   record to a caller-owned buffer that is reused, so the steady state allocates nothing.
//! - Limits are RFC 5424's: HOSTNAME 255 bytes, APP-NAME 48, PROCID 128, MSGID 32, SD-NAME 32.
//!   An RFC 3164 TAG may be up to 255 bytes (daemons exceed the RFC's 32 in practice).
//! - Anything that is not valid syntax is a [`Failure`] (counted by the caller, which passes
//!   the message on as text): nothing here panics on any input (fuzz target `syslog`).
//!
//! # Format
//! ```text
//! RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD
//!           [SP [BOM] MSG]
//!           NILVALUE "-" for any header field and for SD
//!           SD = 1*("[" SD-ID *(SP NAME "=" DQUOTE VALUE DQUOTE) "]")
//! RFC 3164: <PRI>TIMESTAMP SP [HOSTNAME SP] [TAG["[" PID "]"] ":" SP] MSG
//!           TIMESTAMP = "Mmm dd hh:mm:ss" (dd space- or zero-padded, optional ".fff"),
//!           or an RFC 3339 timestamp as some daemons send
//! record:   {"<key_field>":SERVICE,"facility":NAME,"severity":NAME,"timestamp":TEXT,
//!            "host":TEXT,"app":TEXT,"procid":TEXT,"msgid":TEXT,
//!            "structured_data":{"SD-ID":{"NAME":"VALUE",...},...},"message":TEXT}
//! ```
//! Facility and severity are names (`kern` … `local7`, `emerg` … `debug`, as rsyslog's
//! `syslogfacility-text` / `syslogseverity-text` print them). Absent and NILVALUE fields are left
//! out; the timestamp is kept exactly as written (an RFC 3164 one has no year and no zone, and
//! guessing them is left to whoever reads the record); `message` is left out when empty. A
//! PARAM-NAME repeated inside one SD-ELEMENT (RFC 5424 allows it) is written as a repeated key,
//! which JSON readers resolve in their own way (most keep the last).
//!
//! # Operation
//! Trailing `\n`, `\r` and NUL bytes are dropped, then the whole message must be UTF-8. The PRI
//! decides nothing about the format; with [`Syntax::Auto`] a digit after the PRI means RFC 5424
//! (`<PRI>1 `), anything else RFC 3164. A 3164 message's first word after the timestamp is the
//! TAG when it ends in `:` (no HOSTNAME, as `logger` and other `/dev/log` writers send), else
//! the HOSTNAME; a message without a TAG has no `app`.

mod rfc3164;
mod rfc5424;
#[cfg(test)]
mod tests;

use crate::config::socket::MessageFormat;

/// Which syslog syntax to expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    Rfc5424,
    Rfc3164,
    /// RFC 5424 when a version digit follows the PRI, else RFC 3164.
    Auto,
}

/// Why a message could not be parsed (label `reason`). The first three are also the reasons of
/// JSON messages on socket sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not valid UTF-8.
    Utf8 = 0,
    /// Not valid JSON (JSON sources).
    Json = 1,
    /// Valid JSON but not an object (JSON sources).
    NotObject = 2,
    /// Does not start with `<`: no PRI.
    NoPri = 3,
    /// A PRI that is not `<0>` to `<191>`.
    BadPri = 4,
    /// A header field missing, too long, or with bytes outside printable ASCII.
    BadHeader = 5,
    /// A timestamp that is neither RFC 3339 nor `Mmm dd hh:mm:ss`.
    BadTimestamp = 6,
    /// Structured data that is not `[ID NAME="VALUE" ...]...`.
    BadStructuredData = 7,
}

impl From<crate::transforms::parse::Failure> for Failure {
    /// The reason a JSON message on a socket is counted under.
    fn from(f: crate::transforms::parse::Failure) -> Failure {
        use crate::transforms::parse::Failure as F;
        match f {
            F::Utf8 => Failure::Utf8,
            F::NotObject => Failure::NotObject,
            F::Json | F::NoFormat => Failure::Json,
        }
    }
}

/// The syntax a socket source's `format` asks for, or `None` for JSON.
pub fn syntax(format: MessageFormat) -> Option<Syntax> {
    match format {
        MessageFormat::Rfc5424 => Some(Syntax::Rfc5424),
        MessageFormat::Rfc3164 => Some(Syntax::Rfc3164),
        MessageFormat::Auto => Some(Syntax::Auto),
        MessageFormat::Json => None,
    }
}

impl Failure {
    pub const ALL: [Failure; 8] = [
        Failure::Utf8,
        Failure::Json,
        Failure::NotObject,
        Failure::NoPri,
        Failure::BadPri,
        Failure::BadHeader,
        Failure::BadTimestamp,
        Failure::BadStructuredData,
    ];

    pub fn label(self) -> &'static str {
        [
            "invalid_utf8",
            "invalid_json",
            "not_object",
            "no_pri",
            "bad_pri",
            "bad_header",
            "bad_timestamp",
            "bad_structured_data",
        ][self as usize]
    }
}

/// Facility names by code (RFC 5424 table 1, rsyslog's spelling).
pub const FACILITIES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];

/// Severity names by code (RFC 5424 table 2, rsyslog's spelling).
pub const SEVERITIES: [&str; 8] =
    ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"];

const _: () = assert!(FACILITIES.len() * SEVERITIES.len() == 192, "PRI covers 0..=191");

/// The fields of one message, borrowed from its bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Message<'a> {
    /// `facility * 8 + severity`, 0 to 191.
    pub pri: u8,
    pub timestamp: Option<&'a str>,
    pub host: Option<&'a str>,
    pub app: Option<&'a str>,
    pub procid: Option<&'a str>,
    pub msgid: Option<&'a str>,
    /// Structured data as written (validated), empty when absent.
    pub structured_data: &'a str,
    pub message: &'a str,
}

/// Parses one syslog message.
pub fn parse(input: &[u8], syntax: Syntax) -> Result<Message<'_>, Failure> {
    let mut end = input.len();
    while end > 0 && matches!(input[end - 1], b'\n' | b'\r' | 0) {
        end -= 1;
    }
    let text = std::str::from_utf8(&input[..end]).map_err(|_| Failure::Utf8)?;
    let (pri, rest) = pri(text)?;
    let modern = match syntax {
        Syntax::Rfc5424 => true,
        Syntax::Rfc3164 => false,
        Syntax::Auto => {
            let b = rest.as_bytes();
            b.first().is_some_and(|c| (b'1'..=b'9').contains(c))
                && b.iter()
                    .take(4)
                    .position(|&c| c == b' ')
                    .is_some_and(|i| b[..i].iter().all(u8::is_ascii_digit) && !is_date_start(b))
        }
    };
    if modern {
        rfc5424::parse(pri, rest)
    } else {
        rfc3164::parse(pri, rest)
    }
}

/// `YYYY-` starts an RFC 3339 timestamp (an RFC 3164 variant), not a version.
fn is_date_start(b: &[u8]) -> bool {
    b.len() > 4 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

/// `<PRI>`: returns the value and what follows.
fn pri(text: &str) -> Result<(u8, &str), Failure> {
    let rest = text.strip_prefix('<').ok_or(Failure::NoPri)?;
    let close = rest.bytes().take(4).position(|c| c == b'>').ok_or(Failure::BadPri)?;
    let digits = &rest[..close];
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Failure::BadPri);
    }
    let value: u16 = digits.parse().map_err(|_| Failure::BadPri)?;
    if value > 191 {
        return Err(Failure::BadPri);
    }
    Ok((value as u8, &rest[close + 1..]))
}

/// Printable US-ASCII (33 to 126), 1 to `max` bytes: the RFC 5424 header field rule.
fn header_field(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|c| (33..=126).contains(&c))
}

/// Appends `m` as one JSON object; `service` goes under `key_field`, first.
pub fn write_json(m: &Message<'_>, key_field: &str, service: &[u8], out: &mut Vec<u8>) {
    out.push(b'{');
    json_str(out, key_field.as_bytes());
    out.push(b':');
    json_str(out, service);
    out.extend_from_slice(b",\"facility\":\"");
    out.extend_from_slice(FACILITIES[usize::from(m.pri >> 3)].as_bytes());
    out.extend_from_slice(b"\",\"severity\":\"");
    out.extend_from_slice(SEVERITIES[usize::from(m.pri & 7)].as_bytes());
    out.push(b'"');
    let fields = [
        ("timestamp", m.timestamp),
        ("host", m.host),
        ("app", m.app),
        ("procid", m.procid),
        ("msgid", m.msgid),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            json_str(out, v.as_bytes());
        }
    }
    if !m.structured_data.is_empty() {
        out.extend_from_slice(b",\"structured_data\":");
        rfc5424::sd_json(m.structured_data, out);
    }
    if !m.message.is_empty() {
        out.extend_from_slice(b",\"message\":");
        json_str(out, m.message.as_bytes());
    }
    out.push(b'}');
}

/// Appends `s` (UTF-8) as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    json_escape(out, s);
    out.push(b'"');
}

/// Appends `s` escaped for the inside of a JSON string: `"`, `\` and control characters.
fn json_escape(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &c) in s.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 15)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
}
