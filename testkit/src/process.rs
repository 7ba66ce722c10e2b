//! A child process that must stay alive while a condition is awaited, signalled and stopped
//! within a deadline.

use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Why waiting on a child ended without what was awaited.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The child exited first.
    #[error("exited ({0})")]
    Exited(ExitStatus),
    /// The limit passed with the child still running.
    #[error("not within {0:?}")]
    TimedOut(Duration),
    /// Asking for the child's status failed.
    #[error("cannot wait for the child: {0}")]
    Wait(#[from] io::Error),
}

/// Checks `cond` every `every` until it holds; fails as soon as `child` exits, or once
/// `limit` has passed.
pub fn poll_alive(
    child: &mut Child,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if let Some(status) = child.try_wait()? {
            return Err(NotReady::Exited(status));
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut(limit));
        }
        std::thread::sleep(every);
    }
    Ok(())
}

/// The exit status of `child`, polled every `every`; fails once `limit` has passed.
pub fn exit_within(
    child: &mut Child,
    limit: Duration,
    every: Duration,
) -> Result<ExitStatus, NotReady> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut(limit));
        }
        std::thread::sleep(every);
    }
}

/// Sends signal `sig` to `child` (which the caller has not yet reaped).
pub fn signal(child: &Child, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory preconditions; the pid is our own unreaped child's.
    match unsafe { libc::kill(child.id() as i32, sig) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const EVERY: Duration = Duration::from_millis(5);

    #[test]
    fn an_exiting_child_ends_the_wait_with_its_status() {
        let mut child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let e = poll_alive(&mut child, Duration::from_secs(10), EVERY, || false).unwrap_err();
        assert!(matches!(e, NotReady::Exited(s) if s.code() == Some(3)), "{e}");
    }

    #[test]
    fn a_signalled_child_exits_within_the_limit() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let limit = Duration::from_millis(20);
        assert!(matches!(
            poll_alive(&mut child, limit, EVERY, || false),
            Err(NotReady::TimedOut(_))
        ));
        signal(&child, libc::SIGTERM).unwrap();
        let status = exit_within(&mut child, Duration::from_secs(10), EVERY).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}
