//! The `shipper` command.
//!
//! Exit codes: 0 success (and `validate`: the configuration is valid); 1 the configuration is
//! invalid or the command failed; 2 command-line usage error (from clap).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shipper::config::{self, ReceiverConfig, ShipperConfig};

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
    Run {
        /// Shipper configuration (TOML; see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Do not load the eBPF drop-accounting programs (overrides `ebpf.enabled`).
        #[arg(long)]
        no_ebpf: bool,
    },
    /// Accept shippers, write their records to files, and acknowledge them.
    Receive {
        /// Receiver configuration (TOML; see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHIPPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config, no_ebpf } => {
            let mut cfg: ShipperConfig = load(&config)?;
            cfg.ebpf.enabled &= !no_ebpf;
            shipper::runtime::run(cfg)?;
        }
        Command::Receive { config } => {
            let cfg: ReceiverConfig = load(&config)?;
            shipper::receiver::run(cfg)?;
        }
        Command::Validate { config } => return Ok(validate(&config)),
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
) -> anyhow::Result<C> {
    config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))
}

/// A file is a receiver configuration if it has a `[receiver]` table, else a shipper one.
fn validate(path: &std::path::Path) -> ExitCode {
    let is_receiver = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("receiver"));
    let result = if is_receiver {
        config::load::<ReceiverConfig>(path).map(|_| "receiver")
    } else {
        config::load::<ShipperConfig>(path).map(|_| "shipper")
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
