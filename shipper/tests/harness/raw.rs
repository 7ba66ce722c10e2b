//! A blocking TLS client speaking the shipper protocol by hand, for tests that send what a
//! real shipper never would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use shipper::protocol::{Frame, FrameDecoder, Hello, Kind};

/// A blocking TLS client speaking the protocol by hand.
pub struct RawClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    dec: FrameDecoder,
}

impl RawClient {
    /// Connects to `port` on localhost; reads time out after 10 s.
    pub fn connect(port: u16, config: rustls::ClientConfig) -> RawClient {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        RawClient { tls: rustls::StreamOwned::new(conn, tcp), dec: FrameDecoder::new(1 << 20) }
    }

    /// How long a read waits before it fails with `WouldBlock` (or `TimedOut`).
    pub fn set_read_timeout(&self, limit: Duration) {
        self.tls.sock.set_read_timeout(Some(limit)).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// Sends `bytes` from another thread, so that this one can read while the peer does not
    /// take them: encrypted here, written there. The thread ends when all is written or the
    /// connection fails.
    pub fn send_detached(&mut self, bytes: &[u8]) -> std::thread::JoinHandle<std::io::Result<()>> {
        let mut wire = Vec::with_capacity(bytes.len() + bytes.len() / 64 + 1024);
        let conn = &mut self.tls.conn;
        let mut off = 0;
        while off < bytes.len() {
            // rustls holds a bounded amount of records: take them out as they are made.
            off += conn.writer().write(&bytes[off..]).unwrap();
            while conn.wants_write() {
                conn.write_tls(&mut wire).unwrap();
            }
        }
        let mut sock = self.tls.sock.try_clone().unwrap();
        std::thread::spawn(move || sock.write_all(&wire))
    }

    /// The next frame, or the error that ended the connection.
    pub fn read(&mut self) -> std::io::Result<Option<Frame>> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Ok(Some(f));
            }
            let n = self.tls.read(&mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.dec.push(&buf[..n]);
        }
    }

    pub fn hello(&mut self, run_id: u64) {
        let hello = Hello { run_id, core: 0, name: "raw".into() };
        self.send(&Frame::control(Kind::Hello, 0, &hello.encode())).unwrap();
        assert_eq!(self.read().unwrap().unwrap().header.kind, Kind::Welcome);
    }

    /// Expects a REJECT of frame `seq` with a reason containing `text`; the connection stays.
    pub fn expect_reject(&mut self, seq: u64, text: &str) {
        let f = self.read().unwrap().expect("a REJECT frame");
        assert_eq!((f.header.kind, f.header.seq), (Kind::Reject, seq));
        let msg = String::from_utf8_lossy(&f.payload);
        assert!(msg.contains(text), "REJECT {msg:?} should contain {text:?}");
    }

    /// Expects an ERROR frame containing `text`, then the end of the connection.
    pub fn expect_error(&mut self, text: &str) {
        let f = self.read().unwrap().expect("an ERROR frame");
        assert_eq!(f.header.kind, Kind::Error);
        let msg = String::from_utf8_lossy(&f.payload);
        assert!(msg.contains(text), "ERROR {msg:?} should contain {text:?}");
        assert!(matches!(self.read(), Ok(None) | Err(_)), "connection closed after ERROR");
    }
}
