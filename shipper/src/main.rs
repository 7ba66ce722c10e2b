//! The `shipper` command.
//!
//! Exit codes: 0 success (and `validate`: the configuration is valid); 1 the configuration is
//! invalid or the command failed; 2 command-line usage error (from clap); 3 `status` found a
//! ledger row that does not balance; 101 a thread
//! panicked (a bug): the process ends at once, whichever thread it was, so that a service
//! manager restarts it instead of leaving it half alive (a dead worker's sources unread, a
//! receiver handing connections to a dead worker). Its standard error names the thread.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shipper::config::{self, ReceiverConfig, ShipperConfig};
use shipper::runtime::RunOptions;

#[derive(Parser)]
#[command(
    name = "shipper",
    version,
    about = "Per-core io_uring log shipper with mutual-TLS delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read the configured pipes and ship their lines to the receivers.
    /// SIGHUP reloads the configuration file (docs/operations.md, "Reload").
    Run {
        /// Shipper configuration (TOML; see docs/config.md); read again on SIGHUP.
        #[arg(long, short)]
        config: PathBuf,
        /// Do not load the eBPF drop-accounting programs (overrides `ebpf.enabled`).
        #[arg(long)]
        no_ebpf: bool,
        /// Take over the pipes and sockets of the shipper running on `shipper.control_socket`
        /// (it stops, hands them over and exits 0); exit 1 if none answers or it refuses.
        #[arg(long)]
        takeover: bool,
    },
    /// Accept shippers, write their records to files, and acknowledge them.
    Receive {
        /// Receiver configuration (TOML; see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a running shipper's ledger (per core and source: records handed over, how each
    /// was settled, and those held) from its metrics endpoint; exit 0 when every row
    /// balances, 3 when one does not.
    Status {
        /// The shipper's configuration (its `metrics.listen` is asked).
        #[arg(long, short, required_unless_present = "metrics")]
        config: Option<PathBuf>,
        /// The metrics endpoint, `HOST:PORT` (instead of reading `--config`).
        #[arg(long)]
        metrics: Option<String>,
    },
    /// Check a configuration file and exit 0 if it is valid, 1 if not.
    Validate {
        /// Shipper or receiver configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read journald's files natively.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Write a development CA and certificates (for demos and tests, not production).
    DevCerts {
        /// Directory to write ca.pem, receiver.pem/.key and shipper.pem/.key into.
        #[arg(long)]
        dir: PathBuf,
        /// Names (DNS or IP) the receiver certificate is valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Print the entries of journal files as JSON lines, like `journalctl -o json --all`,
    /// merged in journalctl's order.
    Cat {
        /// Print only the entries after this cursor.
        #[arg(long)]
        since: Option<String>,
        /// Journal files, or directories searched (two levels deep) for *.journal and *.journal~.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Logs go to standard error: text, coloured only when it is a terminal (not in a file or
/// the journal), or one JSON object per line with `SHIPPER_LOG_FORMAT=json`; `SHIPPER_LOG`
/// filters them (`info` by default).
fn init_logging() -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHIPPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match std::env::var("SHIPPER_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().init(),
        Ok("text") | Err(std::env::VarError::NotPresent) => {
            builder.with_ansi(std::io::stderr().is_terminal()).init();
        }
        Ok(other) => {
            let shown: String = other.chars().take(64).collect();
            return Err(format!("SHIPPER_LOG_FORMAT: {shown:?} is neither \"text\" nor \"json\""));
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("SHIPPER_LOG_FORMAT is not UTF-8 (use \"text\" or \"json\")".into());
        }
    }
    Ok(())
}

/// Exit status after a panic in any thread (the status Rust gives a panic in `main`).
const EXIT_PANIC: i32 = 101;

fn main() -> ExitCode {
    install_panic_hook();
    let cli = Cli::parse();
    if let Err(e) = init_logging() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Makes a panic in any thread end the process with [`EXIT_PANIC`], after the default hook's
/// message (`thread '<name>' panicked at <file>:<line>: <message>`). Without it, a panic in a
/// worker thread ends only that thread, and one in a tokio-uring task is caught by the runtime,
/// leaving the rest of the process running without it.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        eprintln!("shipper: thread '{name}' panicked: exiting with status {EXIT_PANIC}");
        // `_exit`, not `std::process::exit`: exit runs atexit handlers and flushes stdio,
        // which can block for ever on a lock another thread held when this one panicked (or
        // that the panicking thread itself holds), and other threads keep running meanwhile.
        // `_exit` ends every thread at once, as SIGKILL would: a stop the shipper and the
        // receiver are built to survive (tests `buffer`, `journal_follow`, `restart`).
        // SAFETY: `_exit` takes a status and never returns.
        unsafe { libc::_exit(EXIT_PANIC) }
    }));
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config, no_ebpf, takeover } => {
            let cfg = shipper::runtime::reload::load(&config, no_ebpf)
                .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
            let options = RunOptions { take_over: takeover, config_path: config, no_ebpf };
            shipper::runtime::run(cfg, options)?;
        }
        Command::Receive { config } => {
            let cfg: ReceiverConfig = load(&config, &[])?;
            shipper::receiver::run(cfg)?;
        }
        Command::Validate { config } => return Ok(validate(&config)),
        Command::Status { config, metrics } => return status(config.as_deref(), metrics),
        Command::Journal { command: JournalCommand::Cat { since, paths } } => {
            return shipper::sources::journal::cat(&paths, since.as_deref());
        }
        Command::DevCerts { dir, names } => {
            let pki = shipper::tls::pki::generate(&dir, &names)?;
            println!(
                "wrote {}, {}, {}",
                pki.ca.display(),
                pki.receiver_cert.display(),
                pki.shipper_cert.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load<C: serde::de::DeserializeOwned + config::Validate>(
    path: &std::path::Path,
    checks: &[config::Check<C>],
) -> anyhow::Result<C> {
    config::load(path, checks).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))
}

/// `shipper status`: the ledger table; exit 3 when a row does not balance.
fn status(config: Option<&std::path::Path>, metrics: Option<String>) -> anyhow::Result<ExitCode> {
    let addr = match (metrics, config) {
        (Some(addr), _) => addr,
        (None, Some(path)) => load::<ShipperConfig>(path, shipper::runtime::CHECKS)?.metrics.listen,
        (None, None) => anyhow::bail!("give --config or --metrics"),
    };
    let text = shipper::metrics::http::fetch(&addr)
        .map_err(|e| anyhow::anyhow!("cannot read the metrics at {addr}: {e}"))?;
    let rows = shipper::metrics::status::ledger(&text);
    print!("{}", shipper::metrics::status::table(&rows));
    Ok(if rows.values().all(|r| r.balances()) { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// A file is a receiver configuration if it has a `[receiver]` table, else a shipper one.
fn validate(path: &std::path::Path) -> ExitCode {
    let is_receiver = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("receiver"));
    let result = if is_receiver {
        config::load::<ReceiverConfig>(path, &[]).map(|_| "receiver")
    } else {
        config::load::<ShipperConfig>(path, shipper::runtime::CHECKS).map(|_| "shipper")
    };
    match result {
        Ok(kind) => {
            println!("{}: valid {kind} configuration", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
