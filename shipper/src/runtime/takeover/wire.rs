//! The takeover's bytes on the control socket, and descriptors passed with SCM_RIGHTS.
//!
//! # Format
//! ```text
//! new -> old:  "TAKEOVER 1\n"                        (REQUEST, at most REQUEST_BYTES_MAX)
//! old -> new:  'E' reason "\n"                                  refused
//!            | 'D' u32 LE length, JSON Description (<= DESCRIPTION_BYTES_MAX)
//!              then 'F' + up to FDS_PER_MESSAGE descriptors (SCM_RIGHTS), repeated until
//!              every descriptor the description numbers has come
//! new -> old:  "ADOPTED\n"                                      the new process holds them
//! ```

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::TakeoverError;

/// What a new process asks.
pub const REQUEST: &[u8] = b"TAKEOVER 1\n";
/// Longest request line read from a peer.
pub const REQUEST_BYTES_MAX: usize = 64;
/// What the new process answers once it holds the descriptors.
pub const ADOPTED: &[u8] = b"ADOPTED\n";
/// Largest description (the pipes' partial lines are most of it: at most `line_bytes_max`
/// each).
pub const DESCRIPTION_BYTES_MAX: usize = 64 << 20;
/// Descriptors per `sendmsg` (the kernel's SCM_MAX_FD is 253).
pub const FDS_PER_MESSAGE: usize = 250;
/// Most descriptors one handover carries.
pub const FDS_MAX: usize = 65_536;

/// Reads one line of at most `max` bytes (the `\n` included); `None` when the peer sent more
/// without a newline, or closed first.
pub fn read_line(stream: &mut UnixStream, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::with_capacity(max);
    let mut byte = [0u8; 1];
    while line.len() < max {
        if stream.read(&mut byte)? == 0 {
            return Ok(None);
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(Some(line));
        }
    }
    Ok(None)
}

/// Sends the refusal `reason` (one line).
pub fn refuse(stream: &mut UnixStream, reason: &str) -> io::Result<()> {
    let mut msg = Vec::with_capacity(reason.len() + 2);
    msg.push(b'E');
    msg.extend(reason.bytes().filter(|&b| b != b'\n'));
    msg.push(b'\n');
    stream.write_all(&msg)
}

/// Sends the description, then `fds` in batches.
pub fn send(stream: &mut UnixStream, description: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let len = u32::try_from(description.len()).map_err(io::Error::other)?;
    let mut head = vec![b'D'];
    head.extend_from_slice(&len.to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(description)?;
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        send_fds(stream, batch)?;
    }
    Ok(())
}

/// Receives a description and the `count(description)` descriptors that follow it.
pub fn receive(
    stream: &mut UnixStream,
    count: impl Fn(&[u8]) -> Result<usize, TakeoverError>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), TakeoverError> {
    let mut tag = [0u8; 1];
    stream.read_exact(&mut tag).map_err(TakeoverError::Io)?;
    if tag[0] == b'E' {
        let line = read_line(stream, 4096).map_err(TakeoverError::Io)?.unwrap_or_default();
        let reason = String::from_utf8_lossy(&line).trim_end().to_string();
        return Err(TakeoverError::Refused(reason));
    }
    if tag[0] != b'D' {
        return Err(TakeoverError::Protocol(format!("unexpected first byte {:#04x}", tag[0])));
    }
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(TakeoverError::Io)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > DESCRIPTION_BYTES_MAX {
        let why = format!("description of {len} bytes (at most {DESCRIPTION_BYTES_MAX})");
        return Err(TakeoverError::Protocol(why));
    }
    let mut description = vec![0u8; len];
    stream.read_exact(&mut description).map_err(TakeoverError::Io)?;
    let want = count(&description)?;
    if want > FDS_MAX {
        return Err(TakeoverError::Protocol(format!("{want} descriptors (at most {FDS_MAX})")));
    }
    let mut fds = Vec::with_capacity(want);
    while fds.len() < want {
        let got = receive_fds(stream, &mut fds).map_err(TakeoverError::Io)?;
        if got == 0 {
            let why = format!("{} of {want} descriptors came", fds.len());
            return Err(TakeoverError::Protocol(why));
        }
    }
    Ok((description, fds))
}

/// One `sendmsg` of the byte 'F' with `fds` attached.
fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE computes a size; no memory is touched.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut byte = [b'F'];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the sendmsg call, and
    // the control buffer is CMSG_SPACE(bytes) long, room for one header and `fds`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        if libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One `recvmsg` of the byte 'F' and the descriptors attached (close-on-exec), appended to
/// `out`; returns how many came (0 when the peer closed).
fn receive_fds(stream: &UnixStream, out: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let most = std::mem::size_of::<RawFd>() * FDS_PER_MESSAGE;
    // SAFETY: CMSG_SPACE computes a size.
    let space = unsafe { libc::CMSG_SPACE(most as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: as in `send_fds`; the kernel writes at most `space` bytes of control data, and
    // each descriptor read from it is new in this process and owned from here on.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let before = out.len();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("descriptors cut off (MSG_CTRUNC)"));
        }
        if n == 0 && out.len() == before {
            return Ok(0);
        }
        Ok(out.len() - before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A description and more descriptors than one message carries arrive whole and usable.
    #[test]
    fn description_and_descriptors_arrive() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> =
            (0..FDS_PER_MESSAGE + 3).map(|_| tempfile::tempfile().unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let sender = std::thread::spawn(move || send(&mut a, b"{\"x\":1}", &raw).unwrap());
        let (desc, fds) = receive(&mut b, |_| Ok(FDS_PER_MESSAGE + 3)).unwrap();
        sender.join().unwrap();
        assert_eq!(desc, b"{\"x\":1}");
        assert_eq!(fds.len(), FDS_PER_MESSAGE + 3);
        let mut f = std::fs::File::from(fds.into_iter().last().unwrap());
        f.write_all(b"ok").unwrap();
        drop(files);
    }

    /// A refusal comes back as its reason.
    #[test]
    fn refusal_is_its_reason() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        refuse(&mut a, "busy").unwrap();
        let err = receive(&mut b, |_| Ok(0)).unwrap_err();
        assert!(matches!(err, TakeoverError::Refused(ref r) if r == "busy"), "{err}");
    }
}
