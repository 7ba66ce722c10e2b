//! `shipper run` / `shipper receive` (and the perf suite's peers) started by the demo and the
//! perf suite.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

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
        let deadline = Instant::now() + Duration::from_secs(10);
        while shipper::metrics::http::get(metrics).is_none() {
            if let Some(status) = d.0.try_wait()? {
                bail!("{cmd} exited ({status}); see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("{cmd} did not start; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
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
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        Ok(self.0.wait()?)
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
