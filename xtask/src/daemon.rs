//! `shipper run` / `shipper receive` (and the perf suite's peers) started by the demo and the
//! perf suite.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use testkit::process::{poll_alive, NotReady};

/// A started shipper process, killed when dropped (unless stopped first).
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Runs `bin cmd --config cfg`, standard error into `log`, and waits (10 s at most) until
    /// its metrics endpoint `metrics` answers.
    pub fn start(
        bin: &Path,
        cmd: &str,
        cfg: &Path,
        log: &Path,
        metrics: &str,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_on(&[], bin, cmd, cfg, log, metrics)
    }

    /// [`Daemon::start`] on the CPUs `cpus` (`taskset -c`; all CPUs when empty).
    pub fn start_on(
        cpus: &[usize],
        bin: &Path,
        cmd: &str,
        cfg: &Path,
        log: &Path,
        metrics: &str,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_args(cpus, bin, &[cmd, "--config", &cfg.to_string_lossy()], log, metrics)
    }

    /// Runs `bin args` (a command, `--config FILE` and any flags) on the CPUs `cpus` (all
    /// when empty), standard error into `log`, and waits (10 s at most) until its metrics
    /// endpoint `metrics` answers.
    pub fn start_args(
        cpus: &[usize],
        bin: &Path,
        args: &[&str],
        log: &Path,
        metrics: &str,
    ) -> anyhow::Result<Daemon> {
        let cmd = args.first().copied().unwrap_or_default();
        let mut d = Daemon::spawn(cpus, &bin.to_string_lossy(), args, log)?;
        let up = || shipper::metrics::http::get(metrics).is_some();
        match poll_alive(&mut d.0, Duration::from_secs(10), POLL, up) {
            Ok(()) => Ok(d),
            Err(NotReady::Exited(status)) => {
                bail!("{cmd} exited ({status}); see {}", log.display())
            }
            Err(NotReady::TimedOut(_)) => bail!("{cmd} did not start; see {}", log.display()),
            Err(e @ NotReady::Wait(_)) => Err(e.into()),
        }
    }

    /// Runs `program args` on `cpus` (all when empty), standard output and error into `log`.
    pub fn spawn(
        cpus: &[usize],
        program: &str,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Daemon> {
        let mut command = if cpus.is_empty() {
            Command::new(program)
        } else {
            let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
            let mut c = Command::new("taskset");
            c.args(["-c", &list.join(","), program]);
            c
        };
        let out = std::fs::File::create(log)?;
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Daemon(child))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        Ok(self.0.wait()?)
    }

    /// Sends `sig` (a process that has exited already is no error: it is reaped on drop).
    pub fn signal(&self, sig: i32) {
        let _ = testkit::process::signal(&self.0, sig);
    }
}

/// How often a start is checked for.
const POLL: Duration = Duration::from_millis(20);

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(testkit::net::free_tcp_port()?)
}
