//! Process-level plumbing both `shipper run` and `shipper receive` use: signals taken
//! synchronously (SIGTERM and SIGINT; for `shipper run` SIGHUP too, its reload), and a random
//! run id.

use std::io;

/// What `shipper receive` takes: termination.
const TERMINATION: &[i32] = &[libc::SIGTERM, libc::SIGINT];
/// What `shipper run` takes: termination and SIGHUP (reload).
const RUN: &[i32] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn signal_set(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks `signals` in the calling thread and every thread it spawns afterwards (a process it
/// spawns starts with none blocked: `std::process::Command` clears the mask).
fn block(signals: &[i32]) -> io::Result<()> {
    let set = signal_set(signals);
    // SAFETY: valid set, null old-set pointer.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for one of `signals` (blocked); returns its number.
fn wait(signals: &[i32]) -> io::Result<i32> {
    let set = signal_set(signals);
    let mut sig = 0;
    // SAFETY: valid set and output pointer.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it spawns afterwards, so
/// that only [`wait_termination`] receives them.
pub fn block_termination() -> io::Result<()> {
    block(TERMINATION)
}

/// Waits for SIGTERM or SIGINT; returns the signal number.
pub fn wait_termination() -> io::Result<i32> {
    wait(TERMINATION)
}

/// [`block_termination`], and SIGHUP: for `shipper run`, whose [`wait_run_signal`] takes them.
pub fn block_run_signals() -> io::Result<()> {
    block(RUN)
}

/// Waits for SIGTERM, SIGINT or SIGHUP; returns the signal number.
pub fn wait_run_signal() -> io::Result<i32> {
    wait(RUN)
}

/// A random u64 from the kernel (getrandom), for run ids.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, 8, "getrandom failed");
    u64::from_ne_bytes(b)
}
