//! Names of the kernel's `enum skb_drop_reason` values, which change between kernel versions:
//! read from the kernel's BTF (`/sys/kernel/btf/vmlinux`, readable by every user, where the
//! programs' own types come from too). tracefs, which names them as well, is out of reach of
//! the unit's unprivileged user. Without the enum, reasons are labelled with their number.
//! One reason is the shipper's own, outside the kernel's range: [`UNIX_QUEUE_FULL`].

use std::collections::BTreeMap;

use shipper_ebpf::REASON_UNIX_QUEUE_FULL;

use super::btf::{Btf, SYS_FS};

/// Label of `REASON_UNIX_QUEUE_FULL`: a connected unix datagram sender was refused with
/// `EAGAIN` because the watched socket's receive queue was full (`net.unix.max_dgram_qlen`).
pub const UNIX_QUEUE_FULL: &str = "unix_queue_full";

/// The enum, and the prefix of its values' names.
const ENUM: &str = "skb_drop_reason";
const PREFIX: &str = "SKB_DROP_REASON_";

pub struct Reasons {
    names: BTreeMap<u32, String>,
}

impl From<BTreeMap<u32, String>> for Reasons {
    /// Names by number (those a takeover's previous process read, or none), ours added.
    fn from(mut names: BTreeMap<u32, String>) -> Reasons {
        names.insert(REASON_UNIX_QUEUE_FULL, UNIX_QUEUE_FULL.to_string());
        Reasons { names }
    }
}

impl Reasons {
    /// This kernel's names, from its BTF; without the enum, says so once and keeps numbers.
    pub fn from_btf(btf: &Btf<'_>) -> Reasons {
        let names = names_in(btf);
        if names.is_empty() {
            tracing::warn!(
                "no enum {ENUM} in {SYS_FS}; drop reasons are labelled with their number"
            );
        }
        Reasons::from(names)
    }

    /// Every name, by number (for the next process of a takeover).
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.names.clone()
    }

    /// The lower-case name of `reason` (`socket_rcvbuff`), or its number.
    pub fn name(&self, reason: u32) -> String {
        self.names.get(&reason).cloned().unwrap_or_else(|| reason.to_string())
    }
}

/// `SKB_DROP_REASON_SOCKET_RCVBUFF = 6` as `6 -> "socket_rcvbuff"`; the enum's bookkeeping
/// values (`SKB_DROP_REASON_MAX`, the subsystem mask and shift) are not reasons.
fn names_in(btf: &Btf<'_>) -> BTreeMap<u32, String> {
    let mut names = BTreeMap::new();
    for (value, name) in btf.enumerators(ENUM).unwrap_or_default() {
        let Some(short) = name.strip_prefix(PREFIX) else { continue };
        if short == "MAX" || short.starts_with("SUBSYS_") {
            continue;
        }
        names.entry(value).or_insert_with(|| short.to_ascii_lowercase());
    }
    names
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::btf::Blob;
    use super::*;

    /// The `{ 6, "SOCKET_RCVBUFF" }` pairs of tracefs's `kfree_skb` format (the other place
    /// that names them), lower-cased.
    fn tracefs_names(format: &str) -> BTreeMap<u32, String> {
        let start = format.find("__print_symbolic(REC->reason").expect("the reason's table");
        let mut names = BTreeMap::new();
        for pair in format[start..].split('{').skip(1) {
            let Some((number, rest)) = pair.split_once(',') else { continue };
            let Some(name) = rest.split('"').nth(1) else { continue };
            names.insert(number.trim().parse().unwrap(), name.to_ascii_lowercase());
        }
        names
    }

    /// The running kernel's names from BTF are tracefs's, number for number (tracefs needs
    /// root; without it, or without BTF, the test says it was skipped).
    #[test]
    fn btf_names_every_reason_as_tracefs_does() {
        const FORMAT: &str = "/sys/kernel/tracing/events/skb/kfree_skb/format";
        let (Ok(blob), Ok(format)) =
            (Blob::open(Path::new(SYS_FS)), std::fs::read_to_string(FORMAT))
        else {
            eprintln!("SKIPPED: {SYS_FS} or {FORMAT} not readable (needs root)");
            return;
        };
        let btf = names_in(&Btf::parse(&blob).unwrap());
        let tracefs = tracefs_names(&format);
        assert!(tracefs.len() > 10, "{tracefs:?}");
        for (number, name) in tracefs.iter().filter(|(_, n)| *n != "max") {
            assert_eq!(btf.get(number), Some(name), "reason {number}");
        }
        assert_eq!(btf.get(&6).map(String::as_str), Some("socket_rcvbuff"));
        assert!(!btf.values().any(|n| n == "max"));
    }
}
