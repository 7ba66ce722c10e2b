//! Process-wide settings of the operating system that `shipper run` and `shipper receive` both
//! make at start. Below every stage and the runtime: it imports nothing of the shipper.
//!
//! # Design constraints
//! - The soft open-file limit (`RLIMIT_NOFILE`) is raised to the hard one, once, before any
//!   thread starts: a service started with the usual soft limit of 1024 would otherwise run out
//!   of descriptors long before its configured connection and stream limits.
//! - Capabilities are per thread: [`keep_only_capabilities`] runs on the main thread once the
//!   privileged start-up is done (eBPF loaded, FIFOs created, sockets bound) and before any
//!   thread that lives on is spawned, so every later thread inherits the reduced sets.

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

/// Modes of the files and directories a process creates (`file_mode`, `dir_mode` in its
/// configuration), masked by its umask like any `open(2)` or `mkdir(2)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modes {
    pub file: u32,
    pub dir: u32,
}

impl Modes {
    /// Readable by the owner's group, by nobody else: logs are not for every local user.
    pub const DEFAULT: Modes = Modes { file: 0o640, dir: 0o750 };

    /// Creates `dir` and its missing parents with the directory mode.
    pub fn create_dir_all(self, dir: &std::path::Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(self.dir).create(dir)
    }

    /// Options that create a file with the file mode (and open it for writing).
    pub fn create_file(self) -> std::fs::OpenOptions {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).mode(self.file);
        o
    }
}

/// `CAP_BPF` (linux/capability.h).
pub const CAP_BPF: u32 = 39;

/// Bit mask of capabilities: bit `n` is capability `n`.
pub type CapabilityMask = u64;

/// The calling thread's effective capabilities, as `/proc/thread-self/status` says.
pub fn effective_capabilities() -> io::Result<CapabilityMask> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or("0");
    u64::from_str_radix(hex.trim(), 16).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Drops every capability but those in `keep` from the calling thread's bounding, ambient,
/// inheritable, permitted and effective sets (they cannot come back, not even through
/// `execve`). Keeps only what the thread has now. Without capabilities it does nothing.
pub fn keep_only_capabilities(keep: CapabilityMask) -> io::Result<CapabilityMask> {
    let have = effective_capabilities()?;
    if have == 0 {
        return Ok(0);
    }
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in (0..=last).filter(|c| keep & (1 << c) == 0) {
        // SAFETY: plain prctl; EINVAL for a capability this kernel lacks is harmless.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
    }
    // SAFETY: plain prctl without pointers.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    let kept = have & keep;
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let low = CapData { effective: kept as u32, permitted: kept as u32, inheritable: 0 };
    let high =
        CapData { effective: (kept >> 32) as u32, permitted: (kept >> 32) as u32, inheritable: 0 };
    let data = [low, high];
    // SAFETY: capset with a version 3 header and the two data words it reads.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(kept)
}

/// Makes capability `cap` ambient in the calling thread, so that a program it executes (not
/// set-uid, without file capabilities) starts with it: `cap` goes into the inheritable set,
/// then into the ambient one. It grants nothing the thread does not hold: without `cap` in
/// its permitted set the kernel refuses, and that error is returned. Only raw syscalls and
/// no allocation: callable between `fork` and `exec` (`Command::pre_exec`).
pub fn make_ambient(cap: u32) -> io::Result<()> {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let zero = || CapData { effective: 0, permitted: 0, inheritable: 0 };
    let mut data = [zero(), zero()];
    // SAFETY: capget with a version 3 header and room for the two data words it writes.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    data[(cap / 32) as usize].inheritable |= 1 << (cap % 32);
    // SAFETY: capset with a version 3 header and the two data words it reads.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
    // SAFETY: plain prctl without pointers.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, libc::c_ulong::from(cap), 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
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
