//! A blocking HTTP client for the threads that may block (a receiver shard's writer, an
//! enrichment's refresher), never an io_uring thread: one request per connection
//! (`Connection: close`), the whole exchange within one deadline, the answer read up to a
//! size limit.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// An answer as read: its status line's code, the head, and the body.
pub struct Answer {
    pub status: u16,
    /// The status line, e.g. `HTTP/1.1 200 OK`.
    pub status_line: String,
    pub body: Vec<u8>,
}

/// `HOST:PORT` of an `http://HOST:PORT[/]` URL, or `None` when it is not one (no TLS, no
/// path, no user).
pub fn host_port(url: &str) -> Option<&str> {
    let (host_port, _) = split_url(url)?;
    (!url.strip_prefix("http://")?.trim_end_matches('/').contains('/')).then_some(host_port)
}

/// (`HOST:PORT`, `/PATH?QUERY`) of an `http://HOST:PORT/PATH` URL.
pub fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let (host_port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = host_port.rsplit_once(':')?;
    let host_ok = !host.is_empty() && !host.contains(['/', '@', '?', '#']);
    (host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)).then_some((host_port, path))
}

/// Sends `head` (the request line and headers, ending with an empty line) and `body` to
/// `addr`, and reads the answer until the server closes, all within `timeout`; an answer
/// longer than `answer_bytes_max` is an error.
pub fn request(
    addr: &str,
    head: &str,
    body: &[u8],
    timeout: Duration,
    answer_bytes_max: usize,
) -> io::Result<Answer> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(addr, deadline)?;
    stream.set_write_timeout(Some(left(deadline)?))?;
    stream.write_all(head.as_bytes())?;
    stream.set_write_timeout(Some(left(deadline)?))?;
    stream.write_all(body)?;
    let answer = read_answer(&mut stream, deadline, answer_bytes_max)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (&answer[..i], answer[i + 4..].to_vec()),
        None => (&answer[..], Vec::new()),
    };
    let head = String::from_utf8_lossy(head);
    let status_line = head.lines().next().unwrap_or("").to_string();
    let status = match status_line.strip_prefix("HTTP/1.") {
        Some(rest) => rest.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0),
        None => 0,
    };
    if status == 0 {
        let line: String = status_line.chars().take(100).collect();
        return Err(io::Error::other(format!("{addr} did not answer HTTP: {line:?}")));
    }
    Ok(Answer { status, status_line, body })
}

/// Time left before `deadline`, or a timeout error.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "request over timeout_ms"));
    }
    Ok(left)
}

/// Connects to the first address of `addr` that answers before `deadline`.
fn connect(addr: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, left(deadline)?) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = io::Error::new(e.kind(), format!("connecting to {a}: {e}")),
        }
    }
    Err(last)
}

/// Reads the answer until the server closes, failing past `bytes_max`.
fn read_answer(stream: &mut TcpStream, deadline: Instant, bytes_max: usize) -> io::Result<Vec<u8>> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(answer),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "answer over timeout_ms"))
            }
            Err(e) => return Err(e),
        }
        if answer.len() > bytes_max {
            let e = format!("answer over {bytes_max} bytes: refused");
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_target() {
        assert_eq!(split_url("http://h:80/a/b?c=d"), Some(("h:80", "/a/b?c=d")));
        assert_eq!(split_url("http://127.0.0.1:8123"), Some(("127.0.0.1:8123", "/")));
        assert_eq!(split_url("https://h:80/"), None);
        assert_eq!(split_url("http://u@h:80/"), None);
        assert_eq!(split_url("http://h:0/"), None);
        assert_eq!(host_port("http://h:80/"), Some("h:80"));
        assert_eq!(host_port("http://h:80/x"), None);
    }
}
