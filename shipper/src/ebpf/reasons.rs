//! Names of the kernel's `enum skb_drop_reason` values, which change between kernel versions:
//! read from the `skb:kfree_skb` tracepoint's format in tracefs (mounted if absent). Without
//! tracefs, reasons are labelled with their number. One reason is the shipper's own,
//! outside the kernel's range: [`UNIX_QUEUE_FULL`].

use std::collections::BTreeMap;

use shipper_ebpf::REASON_UNIX_QUEUE_FULL;

/// Label of `REASON_UNIX_QUEUE_FULL`: a connected unix datagram sender was refused with
/// `EAGAIN` because the watched socket's receive queue was full (`net.unix.max_dgram_qlen`).
pub const UNIX_QUEUE_FULL: &str = "unix_queue_full";

const TRACEFS: &str = "/sys/kernel/tracing";
const FORMAT: &str = "/sys/kernel/tracing/events/skb/kfree_skb/format";

pub struct Reasons {
    names: BTreeMap<u32, String>,
}

impl Reasons {
    /// Reads this kernel's names; on failure, logs once and keeps numbers.
    pub fn load() -> Reasons {
        if !std::path::Path::new(FORMAT).exists() {
            mount_tracefs();
        }
        let mut names = match std::fs::read_to_string(FORMAT) {
            Ok(text) => parse(&text),
            Err(e) => {
                tracing::warn!("{FORMAT}: {e}; drop reasons are labelled with their number");
                BTreeMap::new()
            }
        };
        names.insert(REASON_UNIX_QUEUE_FULL, UNIX_QUEUE_FULL.to_string());
        Reasons { names }
    }

    /// The lower-case name of `reason` (`socket_rcvbuff`), or its number.
    pub fn name(&self, reason: u32) -> String {
        self.names.get(&reason).cloned().unwrap_or_else(|| reason.to_string())
    }
}

fn mount_tracefs() {
    let cstr = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dir, kind) = (cstr("nodev"), cstr(TRACEFS), cstr("tracefs"));
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dir.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        tracing::warn!("tracefs absent and not mountable at {TRACEFS}: {}", {
            std::io::Error::last_os_error()
        });
    }
}

/// The `{ 6, "SOCKET_RCVBUFF" }` pairs of the format's `__print_symbolic(REC->reason, ...)`.
fn parse(format: &str) -> BTreeMap<u32, String> {
    let mut names = BTreeMap::new();
    let Some(start) = format.find("__print_symbolic(REC->reason") else {
        return names;
    };
    for pair in format[start..].split('{').skip(1) {
        let Some((number, rest)) = pair.split_once(',') else { continue };
        let Some(name) = rest.split('"').nth(1) else { continue };
        if let Ok(n) = number.trim().parse::<u32>() {
            names.insert(n, name.to_ascii_lowercase());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_symbolic_table() {
        let fmt = concat!(
            r#"print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, "#,
            r#"{ 6, "SOCKET_RCVBUFF" }, { 128, "MAX" })"#
        );
        let names = super::parse(fmt);
        assert_eq!(names.get(&6).map(String::as_str), Some("socket_rcvbuff"));
        assert_eq!(names.len(), 3);
    }
}
