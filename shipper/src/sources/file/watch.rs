//! Change detection by inotify: a watch on each directory that holds a followed file or a
//! path's literal parent, so that a write, a new file or a rename wakes the source at once
//! instead of at its next poll. The poll stays, for what inotify does not see (NFS, a
//! directory not watched yet, watches exhausted).
//!
//! # Design constraints
//! - Events are read through the worker's io_uring, by a task of their own; their content is
//!   not looked at: any event means "look now" (a wake stored when nobody waits, so none is
//!   lost while the source reads).
//! - At most `files_max` + the number of `paths` directories watched per source. A watch the
//!   kernel refuses (`fs.inotify.max_user_watches`) is counted, logged once, and the source
//!   goes on polling.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tokio::sync::{watch, Notify};

/// Events asked of the kernel for each watched directory.
const EVENTS: u32 = libc::IN_MODIFY
    | libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_CLOSE_WRITE;

/// A source's inotify instance and the directories it watches.
pub struct Watcher {
    fd: i32,
    dirs: HashSet<PathBuf>,
    dirs_max: usize,
    /// Woken by every batch of events.
    pub wake: Rc<Notify>,
    /// Watches the kernel refused.
    pub refused: u64,
}

impl Watcher {
    /// A new inotify instance whose events wake [`Watcher::wake`] until `stop`; `None` (and
    /// a warning) when the kernel gives none: the source polls.
    pub fn start(dirs_max: usize, stop: watch::Receiver<bool>) -> Option<Watcher> {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("inotify unavailable ({e}): file sources poll only");
            return None;
        }
        // SAFETY: fd is ours; dup returns a new descriptor or -1.
        let copy = unsafe { libc::dup(fd) };
        if copy < 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("inotify unavailable (dup: {e}): file sources poll only");
            // SAFETY: fd is ours and not used after this.
            unsafe { libc::close(fd) };
            return None;
        }
        // SAFETY: copy is a new descriptor that we own; the reading task owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(copy) };
        let wake = Rc::new(Notify::new());
        let woken = wake.clone();
        tokio_uring::spawn(async move {
            let file = std::fs::File::from(owned);
            let on_read = |_: &[u8]| woken.notify_one();
            let on_error = |e: &std::io::Error| tracing::warn!("inotify read failed: {e}");
            crate::sources::read_until_stopped(file, 4096, stop, on_read, on_error).await;
        });
        Some(Watcher { fd, dirs: HashSet::new(), dirs_max, wake, refused: 0 })
    }

    /// Watches `dir` (once; quietly nothing when it does not exist yet).
    pub fn watch(&mut self, dir: &Path) {
        if self.dirs.contains(dir) || self.dirs.len() >= self.dirs_max {
            return;
        }
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return };
        // SAFETY: fd is our inotify descriptor; c is a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd, c.as_ptr(), EVENTS) };
        if wd < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return;
            }
            self.refused += 1;
            if self.refused == 1 {
                tracing::warn!(dir = %dir.display(), "inotify watch refused ({e}): polling it");
            }
            return;
        }
        self.dirs.insert(dir.to_path_buf());
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // SAFETY: fd is ours and closed once; the reading task holds its own duplicate.
        unsafe { libc::close(self.fd) };
    }
}
