//! The counting sink the peers deliver to: a loopback TCP listener, optionally mutual TLS 1.3
//! (the same certificates and rustls settings as `shipper receive`), that counts the lines it
//! receives and, when asked, the lines of each service (`"service":"svc-NN"`).
//!
//! It does less than `shipper receive` (no decompression, no files, no acknowledgements), which
//! favours the peers; docs/perf.md says so beside their figures.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Service indices counted per service (`svc-00` .. `svc-99`).
pub const SERVICES_MAX: usize = 100;

#[derive(Default)]
struct Counts {
    lines: AtomicU64,
    connections: AtomicU64,
    per_service: Mutex<Vec<u64>>,
}

pub struct Sink {
    pub port: u16,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Listens on a free loopback port; connection threads run on `cpus` (all when empty).
    pub fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        per_service: bool,
        cpus: Vec<usize>,
    ) -> anyhow::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(Counts::default());
        *counts.per_service.lock().expect("not poisoned") = vec![0; SERVICES_MAX];
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                c.connections.fetch_add(1, Ordering::Relaxed);
                let (c, tls, cpus) = (c.clone(), tls.clone(), cpus.clone());
                std::thread::spawn(move || {
                    super::pin_current_thread(&cpus);
                    let _ = serve(conn, tls, per_service, &c);
                });
            }
        });
        Ok(Sink { port, counts, stop, acceptor: Some(acceptor) })
    }

    pub fn lines(&self) -> u64 {
        self.counts.lines.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::Relaxed)
    }

    /// Lines received per service index.
    pub fn per_service(&self) -> Vec<u64> {
        self.counts.per_service.lock().expect("not poisoned").clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve(
    tcp: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    per_service: bool,
    counts: &Counts,
) -> anyhow::Result<()> {
    let mut stream: Box<dyn Read> = match tls {
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(cfg)?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
        None => Box::new(tcp),
    };
    let mut buf = vec![0u8; 256 << 10];
    // The unfinished last line of the previous read, kept only when counting per service.
    let mut partial = Vec::new();
    let mut local = vec![0u64; SERVICES_MAX];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = &buf[..n];
        counts.lines.fetch_add(memchr::memchr_iter(b'\n', data).count() as u64, Ordering::Relaxed);
        if per_service {
            partial.extend_from_slice(data);
            let done = memchr::memrchr(b'\n', &partial).map_or(0, |i| i + 1);
            count_services(&partial[..done], &mut local);
            partial.drain(..done);
            let mut total = counts.per_service.lock().expect("not poisoned");
            for (t, l) in total.iter_mut().zip(local.iter_mut()) {
                *t += std::mem::take(l);
            }
        }
    }
    Ok(())
}

/// Adds each line's service index (`"service":"svc-NN"`) to `counts`.
pub fn count_services(lines: &[u8], counts: &mut [u64]) {
    const KEY: &[u8] = br#""service":"svc-"#;
    let finder = memchr::memmem::Finder::new(KEY);
    for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Some(at) = finder.find(line) else { continue };
        let digits = &line[at + KEY.len()..];
        let n = digits
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0usize, |n, &d| n * 10 + (d - b'0') as usize);
        if let Some(c) = counts.get_mut(n) {
            *c += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_services_of_whole_lines() {
        let mut c = vec![0; super::SERVICES_MAX];
        super::count_services(
            b"{\"service\":\"svc-03\"}\n{\"a\":1,\"service\":\"svc-12\"}\nx\n",
            &mut c,
        );
        assert_eq!((c[3], c[12], c.iter().sum::<u64>()), (1, 1, 2));
    }
}
