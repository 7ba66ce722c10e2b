//! What the acceptor does when `accept()` fails, and how often it says so.
//!
//! # Design constraints
//! - No accept error ends the acceptor: each is counted (`AcceptError`, a bounded label set)
//!   and accepting goes on.
//! - A shortage (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) or an unknown error pauses accepting
//!   for [`ACCEPT_PAUSE_MS`] (100 ms): retrying at once would spin on the same error, while a
//!   pause lets connections close and memory come back; waiting connections sit in the
//!   listen backlog meanwhile.
//! - An error of one connection or one call (`ECONNABORTED`, the network errors accept(2)
//!   passes on, `EINTR`, `EAGAIN`) is retried at once: pausing there would let any peer that
//!   resets its connections slow down every other client's accept.
//! - A repeated log line is written at most once per [`LOG_INTERVAL_MS`] (1 s), with the count
//!   of those left out since the last one.

use std::io;
use std::time::{Duration, Instant};

use crate::metrics::receiver::AcceptError;

/// How long accepting pauses after a shortage of descriptors or memory, in ms.
pub const ACCEPT_PAUSE_MS: u64 = 100;
/// A repeated log line is written at most this often, in ms.
pub const LOG_INTERVAL_MS: u64 = 1000;

/// The reason label of a failed `accept()`.
pub fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EMFILE) => AcceptError::FdLimit,
        Some(libc::ENFILE) => AcceptError::SystemFdLimit,
        Some(libc::ENOBUFS | libc::ENOMEM) => AcceptError::Memory,
        // accept(2), "Error handling": these belong to the pending connection, retry.
        Some(
            libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => AcceptError::Aborted,
        Some(libc::EINTR | libc::EAGAIN) => AcceptError::Interrupted,
        _ => AcceptError::Other,
    }
}

/// How long to wait before the next `accept()` after an error of kind `reason`.
pub fn pause(reason: AcceptError) -> Duration {
    match reason {
        AcceptError::Aborted | AcceptError::Interrupted => Duration::ZERO,
        AcceptError::FdLimit
        | AcceptError::SystemFdLimit
        | AcceptError::Memory
        | AcceptError::Other => Duration::from_millis(ACCEPT_PAUSE_MS),
    }
}

/// Lets a repeated log line through at most once per [`LOG_INTERVAL_MS`].
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
    left_out: u64,
}

impl LogThrottle {
    /// `Some(n)` when the line may be logged now, `n` being how many were left out since the
    /// last one; `None` when it is left out (and counted for the next).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let due = self.last.is_none_or(|t| {
            now.saturating_duration_since(t) >= Duration::from_millis(LOG_INTERVAL_MS)
        });
        if !due {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_classified_and_paused_on_shortage_only() {
        let cases = [
            (libc::EMFILE, AcceptError::FdLimit, ACCEPT_PAUSE_MS),
            (libc::ENFILE, AcceptError::SystemFdLimit, ACCEPT_PAUSE_MS),
            (libc::ENOBUFS, AcceptError::Memory, ACCEPT_PAUSE_MS),
            (libc::ENOMEM, AcceptError::Memory, ACCEPT_PAUSE_MS),
            (libc::ECONNABORTED, AcceptError::Aborted, 0),
            (libc::EPROTO, AcceptError::Aborted, 0),
            (libc::ENETUNREACH, AcceptError::Aborted, 0),
            (libc::EINTR, AcceptError::Interrupted, 0),
            (libc::EAGAIN, AcceptError::Interrupted, 0),
            (libc::EBADF, AcceptError::Other, ACCEPT_PAUSE_MS),
            (libc::EINVAL, AcceptError::Other, ACCEPT_PAUSE_MS),
        ];
        for (errno, reason, pause_ms) in cases {
            let got = classify(&io::Error::from_raw_os_error(errno));
            assert_eq!(got, reason, "errno {errno}");
            assert_eq!(pause(got), Duration::from_millis(pause_ms), "errno {errno}");
        }
        let not_os = io::Error::other("no errno");
        assert_eq!(classify(&not_os), AcceptError::Other);
        let labels: Vec<&str> = AcceptError::ALL.iter().map(|r| r.label()).collect();
        let expect = ["fd_limit", "system_fd_limit", "memory", "aborted", "interrupted", "other"];
        assert_eq!(labels, expect);
    }

    #[test]
    fn a_repeated_line_is_logged_once_a_second_with_the_count_left_out() {
        let mut t = LogThrottle::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(t.admit(t0), Some(0));
        assert_eq!(t.admit(ms(1)), None);
        assert_eq!(t.admit(ms(999)), None);
        assert_eq!(t.admit(ms(1000)), Some(2));
        assert_eq!(t.admit(ms(1500)), None);
        assert_eq!(t.admit(ms(5000)), Some(1));
        assert_eq!(t.admit(ms(6000)), Some(0));
    }
}
