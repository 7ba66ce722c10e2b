//! Real processes for the integration tests: a PKI, `shipper receive` and `shipper run`
//! started from the built binary, FIFO writers, and polling with deadlines.

#![allow(dead_code)]

pub mod kafka;
mod ledger;
mod raw;
pub use ledger::{exit_ledger, scraped_ledger};
pub use raw::RawClient;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::process::NotReady;

pub const BIN: &str = env!("CARGO_BIN_EXE_shipper");

/// First line of a test marked `#[ignore = "needs root: <why>"]`. `cargo test` skips such a
/// test and says why; `cargo xtask test` runs it when root. Run anyway without root
/// (`--ignored`), it fails with `why`: it never passes without having checked anything.
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "needs root: {why} (run `cargo xtask test` as root: it includes these tests)");
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; panics with `what` on timeout.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let polled = testkit::wait::poll(limit, POLL, || cond().then_some(()));
    polled.unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"));
}

/// How often the harness checks a condition it waits for.
const POLL: Duration = Duration::from_millis(20);

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    testkit::net::free_tcp_port().unwrap()
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub pki: shipper::tls::pki::DevPki,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new().prefix("shipper-test-").tempdir().unwrap();
        let pki =
            shipper::tls::pki::generate(&dir.path().join("pki"), &["localhost".into()]).unwrap();
        Env { dir, pki }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn out(&self) -> PathBuf {
        self.path("out")
    }

    /// A receiver configuration on `port` writing to `out()`.
    pub fn receiver_toml(&self, port: u16, metrics: u16, extra: &str) -> String {
        format!(
            "[receiver]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n{extra}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [output]\ndirectory = {:?}\nfsync = false\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            self.pki.ca,
            self.pki.receiver_cert,
            self.pki.receiver_key,
            self.out()
        )
    }

    /// A shipper configuration sending to `port`; `body` adds sources and sections.
    pub fn shipper_toml(&self, port: u16, metrics: u16, body: &str) -> String {
        format!(
            "[shipper]\nname = \"test\"\nworkers = 2\nshutdown_timeout_ms = 20000\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [receivers]\nprimary = [\"127.0.0.1:{port}\"]\nack_timeout_ms = 3000\n\
             backoff_ms_initial = 20\nbackoff_ms_max = 200\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nserver_name = \"localhost\"\n{body}",
            self.pki.ca, self.pki.shipper_cert, self.pki.shipper_key
        )
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub metrics: u16,
    pub log: PathBuf,
}

impl Proc {
    /// Starts the shipper binary with `args`, and waits for its metrics endpoint.
    pub fn start(name: &str, args: &[&str], metrics: u16, log: PathBuf) -> Proc {
        let mut p = Proc::start_any(name, BIN, args, log);
        p.metrics = metrics;
        p.wait_alive("its metrics endpoint", || scrape(metrics).is_some());
        let mut serving = SERVING.lock().unwrap_or_else(|e| e.into_inner());
        serving.push((metrics, p.name.clone(), p.log.clone()));
        p
    }

    /// Starts any program, its standard error into `log`.
    pub fn start_any(name: &str, program: &str, args: &[&str], log: PathBuf) -> Proc {
        Proc::start_any_env(name, program, args, &[], log)
    }

    /// [`Proc::start_any`] with the environment variables `envs` set too.
    pub fn start_any_env(
        name: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, &std::ffi::OsStr)],
        log: PathBuf,
    ) -> Proc {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .env("SHIPPER_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc { child, name: name.into(), metrics: 0, log }
    }

    /// Waits for `cond`, failing at once (with the log) if the process exits meanwhile.
    pub fn wait_alive(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        self.wait_alive_for(what, Duration::from_secs(20), &mut cond)
    }

    pub fn wait_alive_for(&mut self, what: &str, limit: Duration, cond: &mut dyn FnMut() -> bool) {
        match testkit::process::poll_alive(&mut self.child, limit, POLL, cond) {
            Ok(()) => {}
            Err(NotReady::Exited(status)) => panic!(
                "{} exited ({status}) while waiting for {what}:\n{}",
                self.name,
                self.log_text()
            ),
            Err(NotReady::TimedOut(_)) => panic!(
                "{}: timed out waiting for {what}:\n{}\nnon-zero metrics:\n{}",
                self.name,
                self.log_text(),
                self.nonzero_metrics()
            ),
            Err(e @ NotReady::Wait(_)) => panic!("{}: {e}", self.name),
        }
    }

    /// The process's metric samples that are not zero, for failure messages.
    pub fn nonzero_metrics(&self) -> String {
        let text = if self.metrics == 0 { None } else { scrape(self.metrics) };
        let lines = text.unwrap_or_default();
        let keep = lines.lines().filter(|l| !l.starts_with('#') && !l.ends_with(" 0"));
        keep.collect::<Vec<_>>().join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let _ = testkit::process::signal(&self.child, sig);
    }

    /// SIGTERM, then the exit status within `limit`.
    pub fn stop(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(limit)
    }

    /// The exit status within `limit` (a takeover's old process exits by itself).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        testkit::process::exit_within(&mut self.child, limit, POLL)
            .unwrap_or_else(|e| panic!("{} did not exit ({e}):\n{}", self.name, self.log_text()))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The sum of metric `name` (samples matching `labels`); panics (with the log) when the
    /// scrape fails: a dead endpoint must not read as 0.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&scrape_ok(self.metrics), name, labels)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let mut serving = SERVING.lock().unwrap_or_else(|e| e.into_inner());
        serving.retain(|(port, _, log)| (*port, log) != (self.metrics, &self.log));
    }
}

/// The pid in the last "shipper running" line of `log` (a reload's new process writes its
/// log where the old one did).
pub fn running_pid(log: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(log).ok()?;
    let last = text.lines().rfind(|l| l.contains("shipper running"))?;
    let pid = last.split("pid=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?;
    pid.parse().ok()
}

/// A process this test did not spawn (a reload's new process, whose parent exited): stopped
/// with SIGTERM by [`Adopted::stop`], killed when dropped.
pub struct Adopted(pub u32);

impl Adopted {
    /// Whether it has exited (gone, or a zombie nobody reaped yet).
    pub fn gone(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.0)) {
            Err(_) => true,
            Ok(stat) => stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')),
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid this test watches.
        unsafe { libc::kill(self.0 as i32, sig) };
    }

    /// SIGTERM, and waits up to 30 s for it to exit.
    pub fn stop(&self) {
        self.signal(libc::SIGTERM);
        wait_for("the new shipper to exit", Duration::from_secs(30), || self.gone());
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if !self.gone() {
            self.signal(libc::SIGKILL);
        }
    }
}

/// The processes of running tests that serve metrics: port, name, log. A failed scrape names
/// the process and shows its log.
static SERVING: std::sync::Mutex<Vec<(u16, String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

pub fn start_receiver(env: &Env, port: u16, metrics: u16, extra: &str) -> Proc {
    start_receiver_toml(env, port, metrics, &env.receiver_toml(port, metrics, extra))
}

/// Starts a receiver from configuration `text` (which must listen on `port`).
pub fn start_receiver_toml(env: &Env, port: u16, metrics: u16, text: &str) -> Proc {
    let cfg = env.write(&format!("receiver-{port}.toml"), text);
    let log = unique(env.path("receiver"));
    let p = Proc::start("receiver", &["receive", "--config", cfg.to_str().unwrap()], metrics, log);
    wait_for("receiver port", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

pub fn start_shipper(env: &Env, port: u16, metrics: u16, body: &str) -> Proc {
    let cfg = env.write("edge.toml", &env.shipper_toml(port, metrics, body));
    let log = unique(env.path("shipper"));
    Proc::start("shipper", &["run", "--config", cfg.to_str().unwrap()], metrics, log)
}

fn unique(p: PathBuf) -> PathBuf {
    (0..)
        .map(|n| p.with_extension(format!("{n}.log")))
        .find(|c| !c.exists())
        .expect("some name is free")
}

/// GET /metrics, or `None` if nothing answers.
pub fn scrape(port: u16) -> Option<String> {
    shipper::metrics::http::get(&format!("127.0.0.1:{port}"))
}

/// GET /metrics; panics when nothing answers, naming the process serving `port` (the last
/// one started there) with its log.
pub fn scrape_ok(port: u16) -> String {
    scrape(port).unwrap_or_else(|| {
        let serving = SERVING.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match serving.iter().rev().find(|(p, _, _)| *p == port) {
            Some((_, name, log)) => panic!(
                "scraping {name}'s metrics at 127.0.0.1:{port} failed; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
            None => panic!("scraping 127.0.0.1:{port} failed (no process of this test serves it)"),
        }
    })
}

pub use shipper::metrics::text::sum as metric;

/// Every output line of every stream file, with its stream name.
pub fn output_lines(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut lines = Vec::new();
    let Ok(streams) = std::fs::read_dir(out) else {
        return lines;
    };
    for s in streams.flatten() {
        let stream = s.file_name().to_string_lossy().into_owned();
        if stream.starts_with('.') {
            continue;
        }
        let mut files: Vec<_> =
            std::fs::read_dir(s.path()).unwrap().flatten().map(|f| f.path()).collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            if body.is_empty() {
                continue;
            }
            lines.extend(body.split(|&b| b == b'\n').map(|l| (stream.clone(), l.to_vec())));
        }
    }
    lines
}

/// Opens a FIFO for writing (blocking, as nginx does).
pub fn open_writer(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().write(true).open(path).unwrap()
}

/// A writer like a real application: one blocking `write()` per line into a FIFO, at a steady
/// rate, timing every write; the longest is the figure the issue bounds (< 10 ms). It runs as a
/// real-time thread where it may, as a latency-sensitive application would.
pub struct SteadyWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    handle: std::thread::JoinHandle<Duration>,
}

impl SteadyWriter {
    /// Writes `crate::pipe::line(writer, 0..)` into `path` at `per_second` lines.
    pub fn start(path: &Path, writer: usize, per_second: u64) -> SteadyWriter {
        use std::io::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut file = open_writer(path);
        let (s, n) = (stop.clone(), written.clone());
        let handle = std::thread::spawn(move || {
            realtime();
            let started = Instant::now();
            let mut longest = Duration::ZERO;
            let mut seq = 0usize;
            while !s.load(Relaxed) {
                let due = (started.elapsed().as_micros() as u64 * per_second / 1_000_000) as usize;
                while seq < due {
                    let line = format!("{}\n", crate::pipe::line(writer, seq));
                    let t = Instant::now();
                    file.write_all(line.as_bytes()).unwrap();
                    longest = longest.max(t.elapsed());
                    seq += 1;
                    n.store(seq, Relaxed);
                }
                // Pacing the writer, not waiting for a condition.
                std::thread::sleep(Duration::from_millis(1));
            }
            longest
        });
        SteadyWriter { stop, written, handle }
    }

    pub fn written(&self) -> usize {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops writing; returns the lines written and the longest single `write()`.
    pub fn finish(self) -> (usize, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Counted after the thread ends: it may finish a round of writes after `stop`.
        let longest = self.handle.join().unwrap();
        (self.written.load(std::sync::atomic::Ordering::Relaxed), longest)
    }
}

/// Makes the calling thread SCHED_FIFO (when allowed: root), so that what a timed `write()`
/// measures is the pipe, not other tests competing for the two CPUs.
pub fn realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        eprintln!("writer runs without SCHED_FIFO: {}", std::io::Error::last_os_error());
    }
}

/// Starts a receiver on `port` writing into `out` instead of `env.out()`.
pub fn start_receiver_into(env: &Env, port: u16, metrics: u16, out: &Path) -> Proc {
    let text = env.receiver_toml(port, metrics, "");
    let text = text.replace(&format!("{:?}", env.out()), &format!("{out:?}"));
    start_receiver_toml(env, port, metrics, &text)
}

/// How many times each line of writer `writer` (up to `lines`) appears in `outputs`.
pub fn copies(outputs: &[&Path], writer: usize, lines: usize) -> Vec<u32> {
    let mut seen = vec![0u32; lines];
    for out in outputs {
        for (_, l) in output_lines(out) {
            let (w, seq) = crate::pipe::ids(&l);
            assert_eq!((w, l.as_slice()), (writer, crate::pipe::line(w, seq).as_bytes()));
            seen[seq] += 1;
        }
    }
    seen
}

/// The sum of metric `name` (samples matching `labels`) at the endpoint on `port`; panics
/// (naming the process, with its log) when it does not answer.
pub fn metric_at(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&scrape_ok(port), name, labels)
}

/// `promtool check metrics` on `text`: whether it passed, and what it said (stdout and stderr).
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask setup)");
    lint.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said.into_owned())
}

/// Starts a receiver from configuration `text` with its open-file limit, soft and hard, set
/// to `nofile` before it runs.
pub fn start_receiver_nofile(env: &Env, metrics: u16, text: &str, nofile: u64) -> Proc {
    use std::os::unix::process::CommandExt;
    let cfg = env.write(&format!("receiver-nofile-{metrics}.toml"), text);
    let log = unique(env.path("receiver"));
    let mut cmd = Command::new(BIN);
    cmd.args(["receive", "--config", cfg.to_str().unwrap()]);
    let limit = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
    // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    let err = std::fs::File::create(&log).unwrap();
    cmd.env("SHIPPER_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start the receiver: {e}"));
    let mut p = Proc { child, name: "receiver".into(), metrics, log };
    // The port is bound before the metrics endpoint starts: no probe connection to count.
    p.wait_alive("its metrics endpoint", || scrape(metrics).is_some());
    p
}
