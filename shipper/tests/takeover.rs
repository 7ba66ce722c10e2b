use std::io::Write;
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::pipe::{arrived, assert_each_once, line};

/// Lines per second of each pipe writer and of the UDP sender.
const PIPE_RATE: u64 = 2000;
const UDP_RATE: u64 = 300;
/// Takeovers in a row.
const TAKEOVERS: usize = 5;

/// A shipper configuration with two pipes, a UDP socket source on `udp`, a TCP one on `tcp`,
/// a unix datagram one at `log.sock`, a disk buffer and a control socket.
fn config(env: &Env, port: u16, sm: u16, (udp, tcp): (u16, u16)) -> std::path::PathBuf {
    let (a, b) = (env.path("a.pipe"), env.path("b.pipe"));
    let unix = env.path("log.sock");
    let (buffer, control) = (env.path("buffer"), env.path("control.sock"));
    let body = format!(
        "[[sources.pipe]]\npath = {a:?}\npipe_bytes = 1048576\n\
         [[sources.pipe]]\npath = {b:?}\npipe_bytes = 1048576\n\
         [[sources.socket]]\nname = \"u\"\ntransport = \"udp\"\naddress = \"127.0.0.1:{udp}\"\n\
         format = \"json\"\n\
         [[sources.socket]]\nname = \"t\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{tcp}\"\n\
         [[sources.socket]]\nname = \"x\"\ntransport = \"unix\"\npath = {unix:?}\n\
         format = \"json\"\n\
         [buffer]\ndirectory = {buffer:?}\n"
    );
    let text = env.shipper_toml(port, sm, &body).replace(
        "shutdown_timeout_ms = 20000\n",
        &format!("shutdown_timeout_ms = 20000\ncontrol_socket = {control:?}\n"),
    );
    env.write("edge.toml", &text)
}

/// Sends `line(writer, 0..)` as datagrams at `per_second` on a connected socket (a port
/// nobody holds would make a later send fail with ECONNREFUSED); panics on any error.
struct UdpSender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<()>,
}

impl UdpSender {
    fn start(port: u16, writer: usize, per_second: u64) -> UdpSender {
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (s, n) = (stop.clone(), sent.clone());
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(("127.0.0.1", port)).unwrap();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut seq = 0usize;
            while !s.load(Relaxed) {
                let due = (started.elapsed().as_micros() as u64 * per_second / 1_000_000) as usize;
                while seq < due {
                    let sent = socket.send(line(writer, seq).as_bytes());
                    sent.unwrap_or_else(|e| panic!("datagram {seq}: {e}"));
                    seq += 1;
                    n.store(seq, Relaxed);
                }
                // Pacing the sender, not waiting for a condition.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        UdpSender { stop, sent, handle }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Relaxed);
        self.handle.join().unwrap();
        self.sent.load(Relaxed)
    }
}

/// Connects to `port` every 2 ms until stopped, panicking if a connection is ever refused
/// (the listener must be open in one process or the other at every moment); returns how many
/// connections were made.
fn connector(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut made = 0;
        while !stop.load(Relaxed) {
            let c = std::net::TcpStream::connect(("127.0.0.1", port));
            c.unwrap_or_else(|e| panic!("connection {made} to the tcp source: {e}"));
            made += 1;
            // Pacing the connections, not waiting for a condition.
            std::thread::sleep(Duration::from_millis(2));
        }
        made
    })
}

/// Starts `shipper run --takeover` and waits for the process it replaces to exit 0 and for
/// itself to be running.
fn take_over(env: &Env, cfg: &std::path::Path, old: &mut Proc, n: usize) -> Proc {
    let log = env.path(&format!("shipper-{n}.log"));
    let args = ["run", "--config", cfg.to_str().unwrap(), "--takeover"];
    let mut new = Proc::start_any(&format!("shipper {n}"), BIN, &args, log);
    new.metrics = old.metrics;
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "replaced shipper exited {status}:\n{}", old.log_text());
    let log = new.log.clone();
    new.wait_alive("the new shipper running", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("shipper running")
    });
    new
}

/// Guards the takeover's promise (issue 14): two pipes written by blocking writers and a UDP
/// port sent to, all at a steady rate, while five shippers in a row take over from each
/// other: every line arrives exactly once, no writer ever gets an error, no connection to a
/// TCP source is ever refused, and the unix socket bound by the first still takes datagrams.
/// Each writer's longest `write()` is printed (not asserted: a perf case is to record it).
#[test]
fn five_takeovers_under_steady_writers_lose_and_duplicate_nothing() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let sockets = (free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let cfg = config(&env, port, sm, sockets);
    let log = env.path("shipper-0.log");
    let mut shipper =
        Proc::start("shipper 0", &["run", "--config", cfg.to_str().unwrap()], sm, log);
    let writers = [
        SteadyWriter::start(&env.path("a.pipe"), 0, PIPE_RATE),
        SteadyWriter::start(&env.path("b.pipe"), 1, PIPE_RATE),
    ];
    let sender = UdpSender::start(sockets.0, 2, UDP_RATE);
    let connecting = Arc::new(AtomicBool::new(false));
    let connections = connector(sockets.1, connecting.clone());
    for n in 1..=TAKEOVERS {
        // Each shipper reads before the next takes over from it.
        shipper.wait_alive("lines read", || {
            metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) >= 200.0
        });
        shipper = take_over(&env, &cfg, &mut shipper, n);
        let said = shipper.log_text();
        assert!(said.contains("takeover: handed over"), "{said}");
    }
    shipper.wait_alive("lines read by the last", || {
        metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) >= 200.0
    });
    let [a, b] = writers;
    let (a, b) = (a.finish(), b.finish());
    let udp_sent = sender.finish();
    connecting.store(true, Relaxed);
    let made = connections.join().expect("no connection to the tcp source refused");
    // The unix datagram socket the first process bound, still at its path.
    let unix = std::os::unix::net::UnixDatagram::unbound().unwrap();
    unix.send_to(line(3, 0).as_bytes(), env.path("log.sock")).unwrap();
    let written = [a.0, b.0, udp_sent, 1];
    eprintln!("tcp connections made during the takeovers: {made}");
    eprintln!("lines written {written:?}; longest write(): pipe a {:?}, pipe b {:?}", a.1, b.1);
    let total: usize = written.iter().sum();
    shipper.wait_alive("every line at the receiver", || output_lines(&env.out()).len() >= total);
    let status = shipper.stop(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}:\n{}", shipper.log_text());
    assert_each_once(&arrived(&env.out(), &written));
    assert_eq!(output_lines(&env.out()).len(), total);
}

/// Hostile peers on the control socket (garbage, silence, a wrong request) are answered and
/// closed, and a new process that fails before asking leaves the shipper alone: it keeps
/// reading and delivering, and a real takeover still works after, carrying the half line the
/// old process had read to the new one, which completes it once.
#[test]
fn garbage_and_silent_control_peers_do_not_hurt_the_shipper() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let sockets = (free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let cfg = config(&env, port, sm, sockets);
    let log = env.path("shipper-0.log");
    let mut shipper =
        Proc::start("shipper 0", &["run", "--config", cfg.to_str().unwrap()], sm, log);
    let control = env.path("control.sock");
    let mode = std::fs::metadata(&control).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    // Silent: connects and says nothing; held open past the request timeout.
    let silent = UnixStream::connect(&control).unwrap();
    let mut garbage = UnixStream::connect(&control).unwrap();
    garbage.write_all(&[0xff; 4096]).unwrap_or(());
    let mut wrong = UnixStream::connect(&control).unwrap();
    wrong.write_all(b"TAKEOVER 2\n").unwrap();
    let mut w = open_writer(&env.path("a.pipe"));
    for seq in 0..98 {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    // One write(), read whole by one read: line 98 and the first half of line 99, which the
    // takeover must carry to the next process.
    let split = line(0, 99);
    let (head, tail) = split.split_at(split.len() / 2);
    w.write_all(format!("{}\n{head}", line(0, 98)).as_bytes()).unwrap();
    shipper.wait_alive("99 lines at the receiver", || output_lines(&env.out()).len() == 99);
    // Counted once published: the half line is not a line read yet.
    shipper.wait_alive("99 lines read", || {
        metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) == 99.0
    });
    // Every hostile peer was answered with a refusal and closed.
    for mut peer in [silent, garbage, wrong] {
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut peer, &mut answer);
        assert_eq!(answer.first(), Some(&b'E'), "{}", String::from_utf8_lossy(&answer));
    }
    assert!(shipper.log_text().contains("control socket: peer refused"), "{}", shipper.log_text());
    // A new process that fails before it asks (its certificate is missing) leaves the
    // running one alone.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let cert = format!("{:?}", env.pki.shipper_cert);
    assert!(text.contains(&cert));
    let broken = env.write("broken.toml", &text.replace(&cert, "\"/nonexistent/shipper.pem\""));
    let out = std::process::Command::new(BIN)
        .args(["run", "--config", broken.to_str().unwrap(), "--takeover"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(shipper.child.try_wait().unwrap().is_none(), "the running shipper was touched");
    let mut next = take_over(&env, &cfg, &mut shipper, 1);
    writeln!(w, "{tail}").unwrap();
    for seq in 100..200 {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    next.wait_alive("200 lines at the receiver", || output_lines(&env.out()).len() == 200);
    let seen = arrived(&env.out(), &[200, 0, 0, 0]);
    assert!(seen[0].iter().all(|&c| c == 1), "{:?}", seen[0]);
}

/// Without a running shipper, `--takeover` says why and exits 1, touching nothing.
#[test]
fn takeover_with_nobody_to_take_over_from_exits_one() {
    let env = Env::new();
    let (port, sm, sockets) = (free_port(), free_port(), (free_port(), free_port()));
    let cfg = config(&env, port, sm, sockets);
    let out = std::process::Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap(), "--takeover"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("no shipper answers on the control socket"), "{said}");
    assert!(!env.path("a.pipe").exists(), "no FIFO created");
}

/// With the receiver down, the old process's unacknowledged lines are durable in the disk
/// buffer when it hands over (within its short stop), and the new process replays them: once
/// each when the receiver is back.
#[test]
fn lines_unacknowledged_at_a_takeover_go_through_the_disk_buffer_once() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let sockets = (free_port(), free_port());
    let mut receiver = start_receiver(&env, port, rm, "");
    let cfg = config(&env, port, sm, sockets);
    let log = env.path("shipper-0.log");
    let mut shipper =
        Proc::start("shipper 0", &["run", "--config", cfg.to_str().unwrap()], sm, log);
    let mut w = open_writer(&env.path("a.pipe"));
    for seq in 0..100 {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("100 lines at the receiver", || output_lines(&env.out()).len() == 100);
    let status = receiver.stop(Duration::from_secs(10));
    assert!(status.success(), "receiver exited {status}");
    for seq in 100..200 {
        writeln!(w, "{}", line(0, seq)).unwrap();
    }
    shipper.wait_alive("200 lines read", || {
        metric(&scrape_ok(sm), "shipper_source_lines_read_total", &[]) == 200.0
    });
    let mut next = take_over(&env, &cfg, &mut shipper, 1);
    let said = shipper.log_text();
    // With no receiver the frames went to the buffer at once; the stop found them there.
    assert!(said.contains("everything acknowledged or on disk"), "{said}");
    assert!(!said.contains("dropped"), "{said}");
    let _receiver = start_receiver(&env, port, rm, "");
    next.wait_alive("200 lines at the receiver", || output_lines(&env.out()).len() >= 200);
    let status = next.stop(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}:\n{}", next.log_text());
    let seen = arrived(&env.out(), &[200, 0, 0, 0]);
    assert!(seen[0].iter().all(|&c| c == 1), "{:?}", seen[0]);
}

/// Regressions: a takeover onto a configuration with more workers failed (a socket the old
/// process bound alone has no SO_REUSEPORT, so the new process's extra workers could not bind
/// its port, and the new process exited after the old one had stopped); one onto fewer workers
/// closed the sockets it had no worker for, losing the datagrams queued in them. Now extra
/// workers share the handed sockets, and fewer workers read them all. From 2 workers to 1, 2
/// and 1 again, with four UDP senders (spread over the sockets of the port by their addresses)
/// and TCP connections going on: every datagram arrives once, no connection is refused, and
/// the forward source's port still listens at the end.
#[test]
fn takeovers_onto_more_and_fewer_workers_keep_every_socket() {
    const SENDERS: usize = 4;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let (udp, tcp, forward) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let control = env.path("control.sock");
    let config = |workers: usize| {
        let body = format!(
            "[[sources.socket]]\nname = \"u\"\ntransport = \"udp\"\n\
             address = \"127.0.0.1:{udp}\"\nformat = \"json\"\n\
             [[sources.socket]]\nname = \"t\"\ntransport = \"tcp\"\n\
             address = \"127.0.0.1:{tcp}\"\n\
             [[sources.forward]]\nname = \"f\"\naddress = \"127.0.0.1:{forward}\"\n"
        );
        let text = env.shipper_toml(port, sm, &body).replace(
            "workers = 2\nshutdown_timeout_ms = 20000\n",
            &format!(
                "workers = {workers}\nshutdown_timeout_ms = 20000\ncontrol_socket = {control:?}\n"
            ),
        );
        env.write(&format!("edge-{workers}.toml"), &text)
    };
    let (one, two) = (config(1), config(2));
    let log = env.path("shipper-0.log");
    let mut shipper =
        Proc::start("shipper 0", &["run", "--config", two.to_str().unwrap()], sm, log);
    let senders: Vec<UdpSender> =
        (0..SENDERS).map(|w| UdpSender::start(udp, w, UDP_RATE)).collect();
    let connecting = Arc::new(AtomicBool::new(false));
    let connections = connector(tcp, connecting.clone());
    for (n, (cfg, workers)) in [(&one, 1), (&two, 2), (&one, 1)].into_iter().enumerate() {
        shipper.wait_alive("datagrams read", || {
            metric(&scrape_ok(sm), "shipper_socket_messages_received_total", &[]) >= 50.0
        });
        shipper = take_over(&env, cfg, &mut shipper, n + 1);
        let said = shipper.log_text();
        assert!(said.contains(&format!("workers={workers}")), "{said}");
        assert!(!said.contains("no source uses any more"), "a handed socket closed:\n{said}");
    }
    let sent: Vec<usize> = senders.into_iter().map(UdpSender::finish).collect();
    connecting.store(true, Relaxed);
    let made = connections.join().expect("no connection to the tcp source refused");
    assert!(made > 0);
    std::net::TcpStream::connect(("127.0.0.1", forward)).expect("the forward port listens");
    let total: usize = sent.iter().sum();
    shipper
        .wait_alive("every datagram at the receiver", || output_lines(&env.out()).len() >= total);
    let status = shipper.stop(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}:\n{}", shipper.log_text());
    assert_each_once(&arrived(&env.out(), &sent));
}
