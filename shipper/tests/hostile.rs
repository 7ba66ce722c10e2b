//! Hostile input and hostile peers (issue 10): after each, the next good line arrives, the
//! processes are alive, and the counter that says what happened is exact.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;

/// A metric of the endpoint on `port`; the scrape must succeed (a dead endpoint is no zero).
fn metric_of(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = scrape(port).unwrap_or_else(|| panic!("no metrics at port {port}"));
    metric(&text, name, labels)
}

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
        metric_of(sm, "shipper_records_acked_total", &[]) >= 2.0
    });
    // `_`, the first 181 bytes of the key, `~`, FNV-1a 64 of the whole 255-byte key.
    let stream = format!("_.{}~f2c93e215c7f3b39", "x".repeat(181));
    let mut lines = output_lines(&env.out());
    lines.sort();
    let expect = vec![(stream, long.into_bytes()), ("web".to_string(), normal.as_bytes().to_vec())];
    assert_eq!(lines, expect);
    wait_for("the receiver's counters published", Duration::from_secs(10), || {
        metric_of(rm, "shipper_receiver_records_written_total", &[]) >= 2.0
    });
    let m = |name: &str, labels: &[(&str, &str)]| metric_of(rm, name, labels);
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
    assert_eq!(metric_of(rm, "shipper_receiver_connections_max", &[]), fit as f64);
    assert!(receiver.log_text().contains("receiver.connections_max 4096 lowered to 160"));
    let flood: Vec<TcpStream> = (0..FLOOD_CONNECTIONS)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // Each is closed by the receiver: at once over the limit, else at the handshake timeout.
    let refused = |reason: &str| {
        metric_of(rm, "shipper_receiver_connections_refused_total", &[("reason", reason)])
    };
    receiver.wait_alive("every flood connection closed", || {
        refused("limit") + refused("tls") == FLOOD_CONNECTIONS as f64
    });
    // The first `fit` connections held a slot each until their handshake timed out.
    assert!(refused("tls") >= fit as f64);
    assert_eq!(refused("hello"), 0.0);
    assert_eq!(metric_of(rm, "shipper_receiver_connections_accepted_total", &[]), 0.0);
    // Sized to the limit, the receiver never ran out of descriptors.
    assert_eq!(metric_of(rm, "shipper_receiver_accept_errors_total", &[]), 0.0);
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
        metric_of(sm, "shipper_records_acked_total", &[]) >= 1.0
    });
    assert_eq!(output_lines(&env.out()), expect(1));
    drop(flood);
    open_writer(&pipe).write_all(format!("{}\n", lines[1]).as_bytes()).unwrap();
    shipper.wait_alive("the second line acknowledged", || {
        metric_of(sm, "shipper_records_acked_total", &[]) >= 2.0
    });
    assert_eq!(output_lines(&env.out()), expect(2));
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
    assert_eq!(metric_of(rm, "shipper_receiver_accept_errors_total", &[]), 0.0);
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
        metric_of(rm, "shipper_receiver_connections_refused_total", labels)
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
        |labels: &[(&str, &str)]| metric_of(rm, "shipper_receiver_accept_errors_total", labels);
    // How many accepts failed depends on how long the limit was low: one per 100 ms pause.
    assert!(errors(&[("reason", "fd_limit")]) >= 1.0);
    assert_eq!(errors(&[]), errors(&[("reason", "fd_limit")]));
    let pipe = env.path("app.pipe");
    let mut shipper =
        start_shipper(&env, port, sm, &format!("[[sources.pipe]]\npath = {pipe:?}\n"));
    let line = "{\"service\":\"web\",\"n\":1}";
    open_writer(&pipe).write_all(format!("{line}\n").as_bytes()).unwrap();
    shipper.wait_alive("the line acknowledged", || {
        metric_of(sm, "shipper_records_acked_total", &[]) >= 1.0
    });
    assert_eq!(output_lines(&env.out()), vec![("web".to_string(), line.as_bytes().to_vec())]);
    assert!(receiver.child.try_wait().unwrap().is_none(), "the receiver is alive");
}
