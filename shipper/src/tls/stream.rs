//! rustls driven over an io_uring TCP socket.
//!
//! # Operation
//! rustls is sans-I/O: it turns plaintext into TLS records in memory and back. This module
//! owns the only loop that moves those records over the socket: [`handshake`] until the
//! connection is established, then [`TlsStream::send`] (encrypt, one owned-buffer write) and
//! [`TlsStream::recv`] (one owned-buffer read, decrypt into the caller's sink). Buffers go to
//! the kernel and come back with the result, as io_uring requires.
//!
//! Only one task may call `send` at a time, or TLS records would interleave on the socket;
//! `recv` may run concurrently in another task (reads and writes are independent). When
//! reading makes rustls want to write (a TLS 1.3 key update), [`TlsStream::recv`] reports it
//! and the writer's next `send` flushes it.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::Duration;

use rustls::Connection;
use tokio_uring::net::TcpStream;

/// Bytes asked of one socket read.
pub const READ_BYTES: usize = 64 << 10;

/// A TLS connection over an io_uring socket, cheap to clone into a reader and a writer task.
#[derive(Clone)]
pub struct TlsStream {
    tcp: Rc<TcpStream>,
    conn: Rc<RefCell<Connection>>,
}

impl TlsStream {
    /// The DER bytes of the peer's leaf certificate, once the handshake is done.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let conn = self.conn.borrow();
        conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec())
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs the TLS handshake to completion within `timeout`.
pub async fn handshake(
    tcp: TcpStream,
    mut conn: Connection,
    timeout: Duration,
) -> io::Result<TlsStream> {
    let run = async {
        let mut buf = vec![0u8; READ_BYTES];
        while conn.is_handshaking() {
            flush(&tcp, &mut conn).await?;
            if !conn.is_handshaking() {
                break;
            }
            if conn.wants_read() {
                let (res, b) = tcp.read(buf).await;
                buf = b;
                let n = res?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ));
                }
                conn.read_tls(&mut &buf[..n])?;
                if let Err(e) = conn.process_new_packets() {
                    // Send the alert that says why before giving up.
                    let _ = flush(&tcp, &mut conn).await;
                    return Err(tls_err(e));
                }
            }
        }
        flush(&tcp, &mut conn).await?;
        Ok(())
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => Ok(TlsStream { tcp: Rc::new(tcp), conn: Rc::new(RefCell::new(conn)) }),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // The read or write in flight keeps the socket open until it completes (io_uring
            // owns it meanwhile), which an idle peer may never let happen: shutting the
            // socket down completes it now, and the descriptor is closed.
            let _ = tcp.shutdown(std::net::Shutdown::Both);
            Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))
        }
    }
}

async fn flush(tcp: &TcpStream, conn: &mut Connection) -> io::Result<()> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    if !out.is_empty() {
        let (res, _) = tcp.write_all(out).await;
        res?;
    }
    Ok(())
}

impl TlsStream {
    /// Encrypts `plaintext` and writes it (plus any TLS records rustls has pending).
    pub async fn send(&self, plaintext: &[u8]) -> io::Result<()> {
        let out = {
            let mut conn = self.conn.borrow_mut();
            let mut out = Vec::with_capacity(plaintext.len() + plaintext.len() / 64 + 64);
            let mut off = 0;
            loop {
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                if off == plaintext.len() {
                    break;
                }
                let n = conn.writer().write(&plaintext[off..])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS writer full"));
                }
                off += n;
            }
            out
        };
        if out.is_empty() {
            return Ok(());
        }
        let (res, _) = self.tcp.write_all(out).await;
        res
    }

    /// Reads once from the socket and appends the decrypted bytes to `sink`, reusing `buf`.
    /// Returns the buffer, and `Ok(false)` when the peer closed the connection.
    pub async fn recv(&self, buf: Vec<u8>, sink: &mut Vec<u8>) -> (io::Result<bool>, Vec<u8>) {
        // Plaintext that arrived with the last handshake flight, or before a hand-off, is
        // already decrypted inside rustls: hand it out before waiting on the socket.
        if let Err(e) = self.buffered(sink) {
            return (Err(e), buf);
        }
        if !sink.is_empty() {
            return (Ok(true), buf);
        }
        let (res, buf) = self.tcp.read(buf).await;
        let n = match res {
            Ok(0) => return (Ok(false), buf),
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        (self.absorb(&buf[..n], sink), buf)
    }

    fn buffered(&self, sink: &mut Vec<u8>) -> io::Result<()> {
        let mut conn = self.conn.borrow_mut();
        let mut chunk = [0u8; 4096];
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => sink.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn absorb(&self, mut bytes: &[u8], sink: &mut Vec<u8>) -> io::Result<bool> {
        let mut conn = self.conn.borrow_mut();
        while !bytes.is_empty() {
            conn.read_tls(&mut bytes)?;
            let state = conn.process_new_packets().map_err(tls_err)?;
            let want = state.plaintext_bytes_to_read();
            if want > 0 {
                let start = sink.len();
                sink.resize(start + want, 0);
                conn.reader().read_exact(&mut sink[start..])?;
            }
            if state.peer_has_closed() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// rustls has records to write (e.g. after a key update); the writer should `send(&[])`.
    pub fn wants_write(&self) -> bool {
        self.conn.borrow().wants_write()
    }

    /// Shuts the socket down both ways, waking a reader blocked on it.
    pub fn shutdown(&self) {
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }

    /// Takes the connection apart for a hand-off to another thread's ring: a duplicate of
    /// the socket and the rustls state. Fails if another clone of this stream is alive.
    pub fn into_parts(self) -> io::Result<(std::net::TcpStream, Connection)> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: dup returns a new descriptor that we own; the original closes with `tcp`.
        let fd = unsafe { libc::dup(self.tcp.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let tcp = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let conn = Rc::try_unwrap(self.conn)
            .map_err(|_| io::Error::other("TLS stream still shared"))?
            .into_inner();
        Ok((tcp, conn))
    }

    /// Rebuilds a stream from hand-off parts on the receiving thread's ring.
    pub fn from_parts(tcp: std::net::TcpStream, conn: Connection) -> TlsStream {
        TlsStream { tcp: Rc::new(TcpStream::from_std(tcp)), conn: Rc::new(RefCell::new(conn)) }
    }
}
