//! Process-wide settings of the operating system that `shipper run` and `shipper receive` both
//! make at start. Below every stage and the runtime: it imports nothing of the shipper.
//!
//! # Design constraints
//! - The soft open-file limit (`RLIMIT_NOFILE`) is raised to the hard one, once, before any
//!   thread starts: a service started with the usual soft limit of 1024 would otherwise run out
//!   of descriptors long before its configured connection and stream limits.

use std::io;

/// The open-file limit of this process, in descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit found at start.
    pub soft_before: u64,
    /// The soft limit now in force (the hard limit, unless raising it failed).
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Why the open-file limit could not be read.
#[derive(Debug, thiserror::Error)]
#[error("getrlimit(RLIMIT_NOFILE): {0}")]
pub struct LimitError(#[source] io::Error);

fn get_nofile() -> Result<libc::rlimit, LimitError> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(LimitError(io::Error::last_os_error()));
    }
    Ok(lim)
}

/// Raises the soft open-file limit to the hard one and logs both figures. A refusal to raise
/// it (a sandbox) is logged and the process goes on with the limit it has.
pub fn raise_open_files_limit() -> Result<OpenFilesLimit, LimitError> {
    let lim = get_nofile()?;
    let (soft_before, hard) = (lim.rlim_cur, lim.rlim_max);
    let mut soft = soft_before;
    if soft < hard {
        let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: plain syscall with a valid struct; it only changes this process's limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            soft = hard;
        } else {
            let e = io::Error::last_os_error();
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
        }
    }
    tracing::info!(soft_before, soft, hard, "open-file limit (RLIMIT_NOFILE)");
    Ok(OpenFilesLimit { soft_before, soft, hard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let lim = raise_open_files_limit().unwrap();
        assert!(lim.soft_before <= lim.soft);
        assert_eq!(lim.soft, lim.hard, "nothing here forbids raising it");
        let now = get_nofile().unwrap();
        assert_eq!((now.rlim_cur, now.rlim_max), (lim.soft, lim.hard));
    }
}
