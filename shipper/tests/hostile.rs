//! Hostile input and hostile peers (issue 10): after each, the next good line arrives, the
//! processes are alive, and the counter that says what happened is exact.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

// ---------------------------------------------------------------------------------------------
// Receiver: stream names that do not fit a file name; floods of connections; accept errors.
// ---------------------------------------------------------------------------------------------

#[test]
fn receiver_gives_a_key_too_long_for_a_file_name_a_shortened_stream() {
    // Regression: a 255-byte service starting with '.' became a 256-byte directory name
    // (`File name too long`), and the receiver refused that frame, and all behind it, forever.
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let mut receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let mut shipper =
        start_shipper(&env, port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"));
    let long = format!("{{\"service\":\".{}\",\"n\":1}}", "x".repeat(254));
    let normal = "{\"service\":\"web\",\"n\":2}";
    open_writer(&pipe).write_all(format!("{long}\n{normal}\n").as_bytes()).unwrap();
    shipper.wait_alive("both lines acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= 2.0
    });
    // `_`, the first 181 bytes of the key, `~`, FNV-1a 64 of the whole 255-byte key.
    let stream = format!("_.{}~f2c93e215c7f3b39", "x".repeat(181));
    let mut lines = output_lines(&env.out());
    lines.sort();
    let expect = vec![(stream, long.into_bytes()), ("web".to_string(), normal.as_bytes().to_vec())];
    assert_eq!(lines, expect);
    wait_for("the receiver's counters published", Duration::from_secs(10), || {
        metric_at(rm, "shipper_receiver_records_written_total", &[]) >= 2.0
    });
    let m = |name: &str, labels: &[(&str, &str)]| metric_at(rm, name, labels);
    assert_eq!(m("shipper_receiver_records_written_total", &[]), 2.0);
    assert_eq!(m("shipper_receiver_stream_names_shortened_total", &[]), 1.0);
    assert_eq!(m("shipper_receiver_write_errors_total", &[]), 0.0);
    assert_eq!(m("shipper_receiver_connections_refused_total", &[("reason", "frame")]), 0.0);
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
}

/// The open-file limit the flooded receiver runs with, soft and hard.
const FLOOD_NOFILE: u64 = 256;
/// Plain TCP connections of the flood.
const FLOOD_CONNECTIONS: usize = 3000;

#[test]
fn receiver_survives_a_connection_flood_under_a_low_open_file_limit() {
    // Regression: 3,000 plain TCP connections under an open-file limit of 1024 ended
    // `shipper receive` ("acceptor failed: Too many open files").
    let own = shipper::os::raise_open_files_limit().unwrap();
    assert!(
        own.soft >= FLOOD_CONNECTIONS as u64 + 512,
        "this test needs a hard open-file limit of {} (it has {})",
        FLOOD_CONNECTIONS + 512,
        own.hard
    );
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let text = env.receiver_toml(port, rm, "handshake_timeout_ms = 2000");
    let text = text.replace("fsync = false\n", "fsync = false\nstreams_max = 16\n");
    let mut receiver = start_receiver_nofile(&env, rm, &text, FLOOD_NOFILE);
    // 256 less what 2 workers with 16 streams (18 files open at most) may hold themselves.
    let fit = FLOOD_NOFILE - shipper::receiver::descriptors_reserved(2, 18);
    assert_eq!(fit, 160);
    assert_eq!(metric_at(rm, "shipper_receiver_connections_max", &[]), fit as f64);
    assert!(receiver.log_text().contains("receiver.connections_max 4096 lowered to 160"));
    let flood: Vec<TcpStream> = (0..FLOOD_CONNECTIONS)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // Each is closed by the receiver: at once over the limit, else at the handshake timeout.
    let refused = |reason: &str| {
        metric_at(rm, "shipper_receiver_connections_refused_total", &[("reason", reason)])
    };
    receiver.wait_alive("every flood connection closed", || {
        refused("limit") + refused("tls") == FLOOD_CONNECTIONS as f64
    });
    // The first `fit` connections held a slot each until their handshake timed out.
    assert!(refused("tls") >= fit as f64);
    assert_eq!(refused("hello"), 0.0);
    assert_eq!(metric_at(rm, "shipper_receiver_connections_accepted_total", &[]), 0.0);
    // Sized to the limit, the receiver never ran out of descriptors.
    assert_eq!(metric_at(rm, "shipper_receiver_accept_errors_total", &[]), 0.0);
    // The flood is still open on this side; a real shipper gets through.
    let pipe = env.path("app.pipe");
    let mut shipper =
        start_shipper(&env, port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"));
    let lines = ["{\"service\":\"web\",\"n\":1}", "{\"service\":\"web\",\"n\":2}"];
    let expect = |n: usize| -> Vec<(String, Vec<u8>)> {
        lines[..n].iter().map(|l| ("web".to_string(), l.as_bytes().to_vec())).collect()
    };
    open_writer(&pipe).write_all(format!("{}\n", lines[0]).as_bytes()).unwrap();
    shipper.wait_alive("the first line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= 1.0
    });
    assert_eq!(output_lines(&env.out()), expect(1));
    drop(flood);
    open_writer(&pipe).write_all(format!("{}\n", lines[1]).as_bytes()).unwrap();
    shipper.wait_alive("the second line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= 2.0
    });
    assert_eq!(output_lines(&env.out()), expect(2));
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
    assert_eq!(metric_at(rm, "shipper_receiver_accept_errors_total", &[]), 0.0);
}

/// Sets the soft open-file limit of process `pid`, keeping its hard limit; returns the old soft.
fn set_soft_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit reads and writes the structs we pass.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// The descriptor number process `pid` would get next: the lowest one not open.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !open.contains(fd)).expect("some descriptor is free")
}

#[test]
fn receiver_pauses_on_accept_errors_and_goes_on_accepting() {
    // Regression: one failed accept ended the acceptor, and with it `shipper receive`.
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let mut receiver = start_receiver(&env, port, rm, "");
    let refused = |labels: &[(&str, &str)]| {
        metric_at(rm, "shipper_receiver_connections_refused_total", labels)
    };
    // The harness's probe of the port, closed without TLS.
    receiver.wait_alive("the port probe refused", || refused(&[]) == 1.0);
    // Not one descriptor more: every accept fails with EMFILE until the limit is restored.
    // Nothing scrapes meanwhile: the metrics endpoint could not accept either.
    let pid = receiver.child.id();
    let soft = set_soft_nofile(pid, lowest_free_fd(pid));
    let waiting: Vec<TcpStream> =
        (0..5).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let log = receiver.log.clone();
    receiver.wait_alive("an accept failed for want of descriptors", || {
        std::fs::read_to_string(&log).unwrap().contains("accept failed (fd_limit)")
    });
    set_soft_nofile(pid, soft);
    drop(waiting);
    receiver.wait_alive("the waiting connections accepted, then refused", || refused(&[]) == 6.0);
    assert_eq!(refused(&[("reason", "tls")]), 6.0);
    let errors =
        |labels: &[(&str, &str)]| metric_at(rm, "shipper_receiver_accept_errors_total", labels);
    // How many accepts failed depends on how long the limit was low: one per 100 ms pause.
    assert!(errors(&[("reason", "fd_limit")]) >= 1.0);
    assert_eq!(errors(&[]), errors(&[("reason", "fd_limit")]));
    let (_shipper, line) = one_line_acknowledged(&env, port, sm);
    assert_eq!(output_lines(&env.out()), vec![("web".to_string(), line.as_bytes().to_vec())]);
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
}

/// Starts a shipper with one pipe, writes one line into it and waits until it is
/// acknowledged; returns the shipper and the line.
fn one_line_acknowledged(env: &Env, port: u16, sm: u16) -> (Proc, &'static str) {
    let pipe = env.path("app.pipe");
    let mut shipper = start_shipper(env, port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"));
    let line = "{\"service\":\"web\",\"n\":1}";
    open_writer(&pipe).write_all(format!("{line}\n").as_bytes()).unwrap();
    shipper.wait_alive("the line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) >= 1.0
    });
    (shipper, line)
}

const LIMIT: Duration = Duration::from_secs(30);

// ---- Idle TCP peers at a syslog TCP source (issue 10, "a TCP source can't be starved") ----

/// A shipper with one TCP syslog source `t` on worker 0, with `extra` keys; its port.
fn tcp_shipper(env: &Env, receiver_port: u16, sm: u16, extra: &str) -> (Proc, u16) {
    let tcp = free_port();
    let body = format!(
        "[[sources.socket]]\nname = \"t\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{tcp}\"\n\
         format = \"rfc3164\"\nframing = \"newline\"\nworker = 0\n{extra}\n"
    );
    (start_shipper(env, receiver_port, sm, &body), tcp)
}

/// A metric of source `t` at the shipper's endpoint `sm` (a failed scrape fails the test).
fn tcp_metric(sm: u16, name: &str) -> f64 {
    metric_at(sm, name, &[("source", "t")])
}

/// An RFC 3164 message from `app`, and the record the shipper makes of it.
fn tcp_message(app: &str, msg: &str) -> (String, String) {
    let input = format!("<13>Jan  5 03:04:05 {app}: {msg}");
    let head = format!(r#"{{"service":"{app}","facility":"user","severity":"notice","#);
    let record =
        format!(r#"{head}"timestamp":"Jan  5 03:04:05","app":"{app}","message":"{msg}"}}"#);
    (input, record)
}

/// Output lines of stream `app`, sorted (frames on different connections to the receiver may
/// be written in any order).
fn tcp_stream_lines(env: &Env, app: &str) -> Vec<String> {
    let lines = output_lines(&env.out()).into_iter().filter(|(s, _)| s == app);
    let mut out: Vec<String> = lines.map(|(_, l)| String::from_utf8(l).unwrap()).collect();
    out.sort();
    out
}

/// What data from the shipper on a syslog client's connection would be.
const SYSLOG_PEER: &str = "the shipper sent data on a syslog connection";
/// What data from the metrics endpoint to a client that sent no request would be.
const SCRAPER: &str = "the endpoint answered an incomplete request";

/// Whether the peer closed `c` (EOF or reset) within `limit` (false: still open); data from it
/// fails the test (`what` says what it would have been).
fn closed_within(c: &mut TcpStream, limit: Duration, what: &str) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    match c.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(n) => panic!("{what} ({n} bytes)"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("read failed: {e}"),
    }
}

#[test]
fn idle_tcp_peers_at_connections_max_make_room_for_a_real_sender() {
    // Regression: 300 idle connections locked every other sender out of a syslog TCP source.
    const MAX: usize = 16;
    const IDLE: usize = 40;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let extra = format!("connections_max = {MAX}");
    let (mut shipper, tcp) = tcp_shipper(&env, port, sm, &extra);
    let pid = shipper.child.id();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let fds_before = fds();
    let mut idle: Vec<TcpStream> = Vec::new();
    for i in 0..IDLE {
        idle.push(TcpStream::connect(("127.0.0.1", tcp)).unwrap());
        // One at a time: accepted in this order, so the oldest are the idlest.
        let want = (i + 1) as f64;
        shipper.wait_alive("the idle connection accepted", || {
            tcp_metric(sm, "shipper_socket_connections_accepted_total") == want
        });
    }
    let (input, record) = tcp_message("hostile", "after forty idle peers");
    let mut sender = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    sender.write_all(format!("{input}\n").as_bytes()).unwrap();
    shipper.wait_alive("the message at the receiver", || {
        !tcp_stream_lines(&env, "hostile").is_empty()
    });
    assert_eq!(tcp_stream_lines(&env, "hostile"), [record]);
    // Counters are published every 250 ms: the message may arrive before they are.
    let evicted = IDLE + 1 - MAX;
    shipper.wait_alive("the evictions counted", || {
        tcp_metric(sm, "shipper_socket_connections_accepted_total") == (IDLE + 1) as f64
    });
    assert_eq!(tcp_metric(sm, "shipper_socket_connections_evicted_total"), evicted as f64);
    assert_eq!(tcp_metric(sm, "shipper_socket_connections_open"), MAX as f64);
    assert_eq!(tcp_metric(sm, "shipper_socket_connections_idle_closed_total"), 0.0);
    // The evicted ones are the oldest, and were told (EOF); the others are still served.
    for (i, c) in idle.iter_mut().enumerate() {
        let limit = if i < evicted { LIMIT } else { Duration::from_millis(50) };
        assert_eq!(closed_within(c, limit, SYSLOG_PEER), i < evicted, "idle connection {i}");
    }
    assert!(
        !closed_within(
            &mut sender,
            Duration::from_millis(50),
            "the shipper sent data on a syslog connection"
        ),
        "the sender is open"
    );
    // An evicted connection's task ended and closed its socket: no descriptor leaks.
    wait_for("the shipper to hold exactly connections_max sockets more", LIMIT, || {
        fds() == fds_before + MAX
    });
    assert!(shipper.log_text().contains("closed the longest-idle one to make room"));
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

#[test]
fn a_silent_tcp_peer_is_closed_after_idle_timeout_ms_and_a_talking_one_is_not() {
    // Regression: a TCP source had no idle timeout; a silent peer held its slot for ever.
    const IDLE_MS: u64 = 500;
    const MESSAGES: usize = 40;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let (mut shipper, tcp) = tcp_shipper(&env, port, sm, &format!("idle_timeout_ms = {IDLE_MS}"));
    let mut silent = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    let mut talker = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    let started = Instant::now();
    let mut want = Vec::new();
    // Ten messages per idle timeout for four timeouts: never idle that long.
    for i in 0..MESSAGES {
        let (input, record) = tcp_message("talker", &format!("message {i}"));
        talker.write_all(format!("{input}\n").as_bytes()).unwrap();
        want.push(record);
        // Pacing the sender, not waiting for a condition.
        std::thread::sleep(Duration::from_millis(IDLE_MS / 10));
    }
    // The silent one was closed by now (its EOF is waiting), the talking one was not.
    assert!(
        closed_within(
            &mut silent,
            Duration::from_secs(5),
            "the shipper sent data on a syslog connection"
        ),
        "the silent peer closed"
    );
    assert!(started.elapsed() >= Duration::from_millis(IDLE_MS), "not before the timeout");
    assert!(
        !closed_within(
            &mut talker,
            Duration::from_millis(50),
            "the shipper sent data on a syslog connection"
        ),
        "the talker is open"
    );
    // Counters are published every 250 ms: the EOF may come before they are.
    shipper.wait_alive("the silent peer counted", || {
        tcp_metric(sm, "shipper_socket_connections_closed_total") == 1.0
    });
    assert_eq!(tcp_metric(sm, "shipper_socket_connections_idle_closed_total"), 1.0);
    assert_eq!(tcp_metric(sm, "shipper_socket_connections_open"), 1.0);
    // A partial message left when a connection ends is counted, not silently dropped.
    talker.write_all(b"<13>Jan  5 03:04:05 talker: never finished").unwrap();
    drop(talker);
    shipper.wait_alive("the talker's connection closed", || {
        tcp_metric(sm, "shipper_socket_connections_closed_total") == 2.0
    });
    assert_eq!(tcp_metric(sm, "shipper_socket_messages_partial_total"), 1.0);
    assert_eq!(tcp_metric(sm, "shipper_socket_connections_idle_closed_total"), 1.0);
    shipper.wait_alive("every message at the receiver", || {
        tcp_stream_lines(&env, "talker").len() >= MESSAGES
    });
    want.sort();
    assert_eq!(tcp_stream_lines(&env, "talker"), want, "once each");
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

// ---- A panic ends the process (issue 10, "a panic ends the process") ----

/// How long a process may take to start, panic and exit.
const PANIC_EXIT_LIMIT: Duration = Duration::from_secs(20);

/// Starts `shipper <args>` with the test-only fault `panic-worker-task`; waits for it to exit.
/// Returns its exit code and standard error.
fn panic_run(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let log = env.path(&format!("panic-{}.log", args[0]));
    let envs = [(shipper::fault::ENV, std::ffi::OsStr::new("panic-worker-task"))];
    let mut shipper = Proc::start_any_env("shipper", BIN, args, &envs, log);
    let status = shipper.wait_exit(PANIC_EXIT_LIMIT);
    (status.code(), shipper.log_text())
}

#[test]
fn a_panic_in_a_shipper_worker_task_ends_the_process_with_101() {
    // Regression: a panic in a worker left `shipper run` half alive (that core's sources unread).
    let env = Env::new();
    let cfg = env.write("edge.toml", &env.shipper_toml(free_port(), free_port(), ""));
    let (code, stderr) = panic_run(&env, &["run", "--no-ebpf", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(101), "{stderr}");
    // The default hook's message (newer Rust adds the thread's id after its name).
    assert!(stderr.contains("thread 'worker-0'") && stderr.contains("panicked at"), "{stderr}");
    assert!(stderr.contains("worker 0 panics on purpose"), "the panic message: {stderr}");
    assert!(
        stderr.contains("shipper: thread 'worker-0' panicked: exiting with status 101"),
        "{stderr}"
    );
}

#[test]
fn a_panic_in_a_receiver_worker_task_ends_the_process_with_101() {
    // Regression: a panicked receiver worker kept being handed connections by the acceptor.
    let env = Env::new();
    let cfg = env.write("receiver.toml", &env.receiver_toml(free_port(), free_port(), ""));
    let (code, stderr) = panic_run(&env, &["receive", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(101), "{stderr}");
    // The default hook's message (newer Rust adds the thread's id after its name).
    assert!(stderr.contains("thread 'receiver-0'") && stderr.contains("panicked at"), "{stderr}");
    assert!(stderr.contains("receiver worker 0 panics on purpose"), "the panic message: {stderr}");
    assert!(
        stderr.contains("shipper: thread 'receiver-0' panicked: exiting with status 101"),
        "{stderr}"
    );
}

// ---- Slow clients at the metrics endpoint (issue 10, "the metrics endpoint") ----

/// A metric of the endpoint on `port` itself (`shipper_metrics_*`).
fn metrics_own(port: u16, name: &str) -> f64 {
    metric_at(port, name, &[])
}

/// Writes `GET /metrics ...` one byte per 500 ms to each of `clients` until every one of them
/// fails (closed by the server) or `stop` is set.
fn metrics_drip(clients: Vec<TcpStream>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let request = b"GET /metrics HTTP/1.1\r\nHost: slow\r\n\r\n";
        let mut live: Vec<(TcpStream, usize)> = clients.into_iter().map(|c| (c, 0)).collect();
        while !live.is_empty() && !stop.load(Ordering::Relaxed) {
            live.retain_mut(|(c, sent)| {
                let byte = &request[*sent % request.len()..][..1];
                *sent += 1;
                c.write_all(byte).is_ok()
            });
            // Pacing the slow clients, not waiting for a condition.
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

#[test]
fn slow_metrics_clients_do_not_stall_a_scrape_and_are_closed_at_the_deadline() {
    // Regression: /metrics served one request at a time, so one slow client stalled scrapes.
    use shipper::metrics::http::{CONNECTIONS_MAX, REQUEST_DEADLINE_MS};
    const SLOW: usize = 20;
    let deadline = Duration::from_millis(REQUEST_DEADLINE_MS);
    let env = Env::new();
    let sm = free_port();
    let cfg = env.shipper_toml(free_port(), sm, "");
    let cfg = env.write("edge.toml", &cfg);
    let log = env.path("shipper.log");
    let args = ["run", "--no-ebpf", "--config", cfg.to_str().unwrap()];
    let mut shipper = Proc::start("shipper", &args, sm, log);
    // Half send nothing, half send the request a byte every 500 ms (it would take 19 s).
    let mut slow: Vec<(TcpStream, Instant)> = Vec::new();
    for _ in 0..SLOW {
        slow.push((TcpStream::connect(("127.0.0.1", sm)).unwrap(), Instant::now()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drip: Vec<TcpStream> =
        slow[SLOW / 2..].iter().map(|(c, _)| c.try_clone().unwrap()).collect();
    let dripper = metrics_drip(drip, stop.clone());
    let started = Instant::now();
    let text = scrape(sm).expect("a scrape while 20 clients are slow");
    assert!(started.elapsed() < Duration::from_secs(2), "scraped in {:?}", started.elapsed());
    let own = |name| metric(&text, name, &[]);
    assert_eq!(own("shipper_metrics_connections_open"), (SLOW + 1) as f64, "the slow ones held");
    assert_eq!(own("shipper_metrics_connections_refused_total"), 0.0);
    assert!(metric(&text, "shipper_build_info", &[]) == 1.0, "a whole exposition:\n{text}");
    // Up to the limit with more silent ones; one more is closed at once.
    for _ in SLOW..CONNECTIONS_MAX {
        slow.push((TcpStream::connect(("127.0.0.1", sm)).unwrap(), Instant::now()));
    }
    let mut over = TcpStream::connect(("127.0.0.1", sm)).unwrap();
    let connected = Instant::now();
    assert!(closed_within(&mut over, deadline, SCRAPER), "the connection over the limit closed");
    assert!(connected.elapsed() < deadline / 2, "closed at once, not at the deadline");
    // Each slow one is closed by the server at its deadline, not before.
    for (i, (c, connected)) in slow.iter_mut().enumerate() {
        assert!(closed_within(c, deadline * 2, SCRAPER), "slow client {i} closed");
        let after = connected.elapsed();
        assert!(after >= deadline, "slow client {i} closed after {after:?}, before the deadline");
    }
    stop.store(true, Ordering::Relaxed);
    dripper.join().unwrap();
    assert_eq!(metrics_own(sm, "shipper_metrics_connections_refused_total"), 1.0);
    assert_eq!(metrics_own(sm, "shipper_metrics_requests_timed_out_total"), CONNECTIONS_MAX as f64);
    assert_eq!(metrics_own(sm, "shipper_metrics_connections_open"), 1.0);
    assert!(shipper.stop(LIMIT).success(), "{}", shipper.log_text());
}

// ---------------------------------------------------------------------------------------------
// Receiver: memory of frames in progress over all connections; open stream files.
// ---------------------------------------------------------------------------------------------

/// Raw clients that each send the header and half the payload of one large frame.
const HALF_FRAME_CLIENTS: usize = 50;
/// The payload of their frame: one record, uncompressed.
const HALF_FRAME_PAYLOAD_BYTES: usize = 2 << 20;
/// `frames_in_progress_bytes_max` of the receiver they meet: room for 8 such frames.
const HALF_FRAME_BUDGET_BYTES: usize = 16 << 20;
/// Clients whose frame gets room: the budget holds exactly this many payloads.
const HALF_FRAME_HOLDERS: usize = HALF_FRAME_BUDGET_BYTES / HALF_FRAME_PAYLOAD_BYTES;
const _: () = assert!(HALF_FRAME_BUDGET_BYTES % HALF_FRAME_PAYLOAD_BYTES == 0);

/// The peak resident memory of process `pid` (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A DATA frame (seq 1) of one uncompressed record whose payload is exactly `bytes` long.
fn frame_of_payload(bytes: usize) -> Vec<u8> {
    use shipper::protocol::frame::{Header, Kind};
    let key = b"big";
    let mut payload = Vec::new();
    let body = vec![b'x'; bytes - 4 - 1 - key.len()];
    shipper::protocol::RecordWriter::push(&mut payload, key, &body);
    assert_eq!(payload.len(), bytes);
    let len = bytes as u32;
    Header { kind: Kind::Data, flags: 0, seq: 1, count: 1, raw_len: len, len }.wire(&payload)
}

#[test]
fn receiver_holds_frames_in_progress_within_its_budget() {
    // Regression: each connection buffered its frame in progress on its own, up to
    // frame_bytes_max, so peers each sending part of a large frame made the receiver hold all
    // those parts at once (1000 half frames of 16 MiB: 8 GB).
    use shipper::protocol::frame::HEADER_BYTES;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let extra = format!(
        "idle_timeout_ms = 60000\nframe_bytes_max = {}\nframes_in_progress_bytes_max = {}\n\
         frames_in_progress_wait_ms = 1000",
        4 << 20,
        HALF_FRAME_BUDGET_BYTES
    );
    let mut receiver = start_receiver(&env, port, rm, &extra);
    let pid = receiver.child.id();
    let rss_before = peak_rss_kib(pid);
    let wire = frame_of_payload(HALF_FRAME_PAYLOAD_BYTES);
    let half = HEADER_BYTES + HALF_FRAME_PAYLOAD_BYTES / 2;
    let clients = send_half_frames(&env, port, &wire[..half]);
    let refused: Vec<&String> = clients.iter().filter_map(|(_, e)| e.as_ref()).collect();
    assert_eq!(refused.len(), HALF_FRAME_CLIENTS - HALF_FRAME_HOLDERS);
    for e in &refused {
        assert!(e.starts_with("busy: no room for a frame of 2097152 payload bytes"), "{e}");
    }
    check_frames_in_progress_bounded(&mut receiver, rss_before);
    // A frame with room completes: acknowledged, and its room given back.
    let holders: Vec<RawClient> =
        clients.into_iter().filter(|(_, e)| e.is_none()).map(|(c, _)| c).collect();
    complete_one_and_give_all_back(&mut receiver, holders, &wire[half..]);
    let (_shipper, line) = one_line_acknowledged(&env, port, sm);
    let mut lines = output_lines(&env.out());
    lines.sort();
    let big = (b"x".repeat(HALF_FRAME_PAYLOAD_BYTES - 8)).to_vec();
    assert_eq!(lines, vec![("big".to_string(), big), ("web".to_string(), line.into())]);
    let waited = metric_at(rm, "shipper_receiver_frames_waited_total", &[]);
    assert_eq!(waited, (HALF_FRAME_CLIENTS - HALF_FRAME_HOLDERS) as f64);
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
}

/// [`HALF_FRAME_CLIENTS`] clients at once, each: HELLO, `first_half` of its frame, then a
/// read. Those without room get an ERROR once frames_in_progress_wait_ms has passed (its
/// text returned); those with room get nothing.
fn send_half_frames(env: &Env, port: u16, first_half: &[u8]) -> Vec<(RawClient, Option<String>)> {
    use shipper::protocol::frame::Kind;
    let p = &env.pki;
    let config = || shipper::tls::client_config(&p.ca, &p.shipper_cert, &p.shipper_key).unwrap();
    std::thread::scope(|s| {
        let run = |i: usize| {
            let config = config();
            move || {
                let mut c = RawClient::connect(port, config);
                c.hello(1000 + i as u64);
                c.set_read_timeout(Duration::from_secs(6));
                let writer = c.send_detached(first_half);
                let error = match c.read() {
                    Ok(Some(f)) if f.header.kind == Kind::Error => {
                        Some(String::from_utf8_lossy(&f.payload).into_owned())
                    }
                    Ok(other) => panic!("client {i}: expected ERROR or nothing, got {other:?}"),
                    Err(_) => {
                        // Nothing came (the read timed out): the frame has room, so the
                        // receiver read all of the half sent.
                        writer.join().unwrap().unwrap();
                        None
                    }
                };
                (c, error)
            }
        };
        let threads: Vec<_> = (0..HALF_FRAME_CLIENTS).map(|i| s.spawn(run(i))).collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// The receiver's counters and its peak RSS (grown from `rss_before` KiB) after the half
/// frames: the refusals counted, the budget held, the memory bounded.
fn check_frames_in_progress_bounded(receiver: &mut Proc, rss_before: u64) {
    let rm = receiver.metrics;
    let m = |name: &str, labels: &[(&str, &str)]| metric_at(rm, name, labels);
    let refused_memory = (HALF_FRAME_CLIENTS - HALF_FRAME_HOLDERS) as f64;
    receiver.wait_alive("the refusals published", || {
        m("shipper_receiver_connections_refused_total", &[("reason", "memory")]) == refused_memory
    });
    // Every frame past the 8th waited, and none of them got room.
    assert_eq!(m("shipper_receiver_frames_waited_total", &[]), refused_memory);
    let in_progress = (8 * HALF_FRAME_PAYLOAD_BYTES) as f64;
    assert_eq!(m("shipper_receiver_frames_in_progress_bytes", &[]), in_progress);
    assert_eq!(
        m("shipper_receiver_frames_in_progress_bytes_max", &[]),
        HALF_FRAME_BUDGET_BYTES as f64
    );
    // Held at most: the budget (16 MiB, of which 8 MiB were sent) and, per connection, 64 KiB
    // of payload read without room, the frame header, a 64 KiB read buffer, 64 KiB of
    // plaintext and its TLS state: under 256 KiB each, 12.5 MiB for 50. Without the budget the
    // 50 half frames alone were 50 MiB.
    let grown_kib = peak_rss_kib(receiver.child.id()) - rss_before;
    let bound_kib = (HALF_FRAME_BUDGET_BYTES >> 10) + HALF_FRAME_CLIENTS * 256;
    eprintln!("receiver peak RSS grew by {grown_kib} KiB (bound {bound_kib} KiB)");
    assert!(grown_kib < bound_kib as u64, "peak RSS grew by {grown_kib} KiB");
}

/// The first holder sends `second_half` of its frame: acknowledged, and its room given back;
/// then all holders close, and every reservation is given back.
fn complete_one_and_give_all_back(
    receiver: &mut Proc,
    mut holders: Vec<RawClient>,
    second_half: &[u8],
) {
    use shipper::protocol::frame::Kind;
    let rm = receiver.metrics;
    let in_progress = || metric_at(rm, "shipper_receiver_frames_in_progress_bytes", &[]);
    holders[0].send(second_half).unwrap();
    let ack = holders[0].read().unwrap().unwrap();
    assert_eq!((ack.header.kind, ack.header.seq), (Kind::Ack, 1));
    receiver.wait_alive("the acknowledged frame's room given back", || {
        in_progress() == (7 * HALF_FRAME_PAYLOAD_BYTES) as f64
    });
    drop(holders);
    receiver.wait_alive("every reservation given back", || in_progress() == 0.0);
}

#[test]
fn receiver_keeps_at_most_files_open_max_stream_files_open() {
    // Regression: every stream's file stayed open (up to streams_max per worker), so the
    // descriptors a receiver needed grew with the streams its senders named.
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let text = env.receiver_toml(port, rm, "");
    let text = text.replace("fsync = false\n", "fsync = false\nfiles_open_max = 2\n");
    let mut receiver = start_receiver_toml(&env, port, rm, &text);
    let pipe = env.path("app.pipe");
    let mut shipper =
        start_shipper(&env, port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"));
    let mut writer = open_writer(&pipe);
    let (streams, rounds) = (5, 4);
    let line = |n: usize| format!("{{\"service\":\"s{}\",\"n\":{n}}}", n % streams);
    // One line at a time, each acknowledged before the next: one frame each, to the five
    // streams in turn, so every write after the second finds its file closed.
    for n in 0..streams * rounds {
        writer.write_all(format!("{}\n", line(n)).as_bytes()).unwrap();
        shipper.wait_alive("the line acknowledged", || {
            metric_at(sm, "shipper_records_acked_total", &[]) == (n + 1) as f64
        });
        let open = metric_at(rm, "shipper_receiver_files_open", &[]);
        assert!(open <= 2.0, "{open} files open after line {n}");
    }
    for s in 0..streams {
        let dir = env.out().join(format!("s{s}"));
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|f| f.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "one file for stream s{s}: {files:?}");
        let expect: String = (0..rounds).map(|r| line(r * streams + s) + "\n").collect();
        assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), expect, "stream s{s}");
    }
    let m = |name: &str| metric_at(rm, name, &[]);
    receiver.wait_alive("the receiver's counters published", || {
        m("shipper_receiver_records_written_total") == (streams * rounds) as f64
    });
    assert_eq!(m("shipper_receiver_files_open"), 2.0);
    assert_eq!(m("shipper_receiver_files_open_peak"), 2.0);
    // 20 opens, the first two with room.
    assert_eq!(m("shipper_receiver_files_closed_total"), (streams * rounds - 2) as f64);
    assert_eq!(m("shipper_receiver_streams_open"), streams as f64);
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
}
