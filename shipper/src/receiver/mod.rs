//! `shipper receive`: accepts shippers over mutual TLS, writes their records to its outputs
//! (per-stream files, ClickHouse, Kafka; each taking the streams it selects), and acknowledges
//! each frame once every output that took its records made them durable and the frame is
//! committed.
//!
//! # Design constraints
//! - `receiver.workers` shards own the sender streams hashed to them ([`server::owner`]; a
//!   frame that carries an origin goes to the writer of the shard owning the origin's stream);
//!   each is two threads: one serving its connections on io_uring ([`shard`]), one writing
//!   their frames, a group at a time, to the shard's outputs ([`output`]) and commit log
//!   ([`commit`]) ([`writer`]). The acceptor thread ([`server`]) only handshakes and hands
//!   off.
//! - Descriptors: the soft open-file limit is raised to the hard one at start, and
//!   `connections_max` lowered (one warning) to what that limit leaves after what the receiver
//!   itself may hold ([`descriptors_reserved`]: per shard the open stream files of every files
//!   output, at most its `files_open_max` (or `streams_max` + 2 when fewer), one connection
//!   per ClickHouse output, those of each Kafka output's producer
//!   ([`output::kafka::descriptors`]), + 8; plus 44); the effective figure is
//!   the gauge `shipper_receiver_connections_max`. A limit that leaves no room for one
//!   connection fails start-up, naming the figures.
//! - Memory: the payloads of frames being received, over every connection, stay within
//!   `frames_in_progress_bytes_max` ([`budget`]); a frame without room waits, unread, up to
//!   `frames_in_progress_wait_ms`, then its connection is refused (`reason="memory"`).
//!
//! # Operation
//! 1. Raise the open-file limit and fit `connections_max` to it ([`fit_connections`]).
//! 2. [`commit::recover`] repairs the state directory (`receiver.state_directory`, default
//!    `output.directory`) after any stop, the outputs cutting
//!    back what was not committed ([`output::recover`]), and yields the de-duplication
//!    windows, which are dealt to their owning shards.
//! 3. Shards and the acceptor start; SIGTERM/SIGINT end the process once the listener is
//!    closed (frames in progress are not acknowledged, and so are resent by shippers). No
//!    peer and no accept error ends it ([`accept`]).

pub mod accept;
pub mod budget;
pub mod commit;
pub mod dedup;
pub mod output;
pub mod server;
pub mod shard;
pub mod writer;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;

use self::dedup::{StreamId, Window};
use crate::config::kafka::KafkaSection;
use crate::config::receiver::OutputSection;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::{render, render_limits, ReceiverCounters, ReceiverLimits};
use crate::metrics::{http, scrape, Registry};
use crate::notify::Notifier;
use crate::signals;

/// Runs the receiver until SIGTERM/SIGINT.
pub fn run(config: ReceiverConfig) -> anyhow::Result<()> {
    signals::block_termination()?;
    let open_files = crate::os::raise_open_files_limit()?;
    let config = Arc::new(fit_connections(config, open_files.soft)?);
    let t = &config.tls;
    let tls = Arc::new(crate::tls::server_config(&t.ca, &t.cert, &t.key)?);
    let state = recover(&config)?;
    let shards = config.receiver.workers;
    let windows = deal_windows(state.windows, shards);
    let listener = bind(&config.receiver.listen)
        .with_context(|| format!("receiver.listen {}", config.receiver.listen))?;
    let registry = Registry::<ReceiverCounters>::new(shards + 1);
    let watched = registry.clone();
    let budget = budget::FrameBudget::new(config.receiver.frames_in_progress_bytes_max);
    serve_metrics(&config, &registry, &budget)?;
    let open = Arc::new(AtomicUsize::new(0));
    // Every shard may hand a frame to any writer: one that carries an origin goes to the
    // writer owning the origin's stream.
    let (writers, mut queues): (Vec<_>, Vec<_>) =
        (0..shards).map(|_| std::sync::mpsc::channel()).unzip();
    let mut inboxes = Vec::new();
    for (index, windows) in windows.into_iter().enumerate() {
        let shared = Shared {
            config: &config,
            open: &open,
            budget: &budget,
            registry: &registry,
            writers: &writers,
        };
        let queue = queues.remove(0);
        inboxes.push(start_shard(index, state.gen, windows, queue, shared)?);
    }
    let addr = listener.local_addr()?;
    let connections_max = config.receiver.connections_max;
    std::thread::Builder::new()
        .name("acceptor".into())
        .spawn(move || server::accept(listener, config, tls, inboxes, open, registry))?;
    let (workers, gen) = (shards, state.gen);
    tracing::info!(%addr, workers, connections_max, generation = gen, "receiver listening");
    let notifier = Notifier::from_env();
    notifier.send("READY=1");
    if let Some(interval) = Notifier::watchdog_interval() {
        notifier.watch(interval, watched.progress(interval));
    }
    let sig = signals::wait_termination()?;
    tracing::info!(signal = sig, "receiver stopping");
    notifier.send("STOPPING=1");
    Ok(())
}

/// Creates the state directory and recovers it and the outputs after any stop
/// ([`commit::recover`]).
fn recover(config: &ReceiverConfig) -> anyhow::Result<commit::LogState> {
    let out = config.state_directory();
    let modes = config.state_modes();
    modes.create_dir_all(out).with_context(|| format!("state directory {}", out.display()))?;
    let ttl_s = config.receiver.dedup_window_ttl_s;
    let outputs = |log: &commit::LogState| output::recover(config, log);
    commit::recover(out, ttl_s, modes, outputs)
        .with_context(|| format!("recovering {}", out.display()))
}

/// Deals the recovered de-duplication windows to the shards that own their streams.
fn deal_windows(
    windows: HashMap<StreamId, Window>,
    shards: usize,
) -> Vec<HashMap<StreamId, Window>> {
    let mut dealt: Vec<HashMap<_, _>> = (0..shards).map(|_| HashMap::new()).collect();
    for (id, w) in windows {
        dealt[server::owner(id, shards)].insert(id, w);
    }
    dealt
}

/// Serves `/metrics` on `metrics.listen`, unless it is empty.
fn serve_metrics(
    config: &ReceiverConfig,
    registry: &Arc<Registry<ReceiverCounters>>,
    budget: &Arc<budget::FrameBudget>,
) -> anyhow::Result<()> {
    if config.metrics.listen.is_empty() {
        return Ok(());
    }
    let (r, b) = (registry.clone(), budget.clone());
    let connections_max = config.receiver.connections_max;
    let addr = http::serve(&config.metrics.listen, move || {
        scrape(&r, |shards, out| {
            render(shards, out);
            let limits = ReceiverLimits {
                connections_max,
                frames_in_progress_bytes_max: b.bytes_max(),
                frames_in_progress_bytes: b.bytes_reserved(),
            };
            render_limits(&limits, out);
        })
    })
    .with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

/// What every shard shares with the others and the acceptor.
#[derive(Clone, Copy)]
struct Shared<'a> {
    config: &'a Arc<ReceiverConfig>,
    /// Connections from accept until served, over every thread.
    open: &'a Arc<AtomicUsize>,
    budget: &'a Arc<budget::FrameBudget>,
    registry: &'a Arc<Registry<ReceiverCounters>>,
    /// Each shard's writer's queue, by index.
    writers: &'a [std::sync::mpsc::Sender<writer::Job>],
}

/// Opens shard `index`'s outputs and commit log, and starts its thread (pinned to a CPU when
/// the CPUs are known); returns its inbox.
fn start_shard(
    index: usize,
    gen: u64,
    windows: HashMap<StreamId, Window>,
    queue: std::sync::mpsc::Receiver<writer::Job>,
    shared: Shared,
) -> anyhow::Result<mpsc::UnboundedSender<server::HandOff>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let config = shared.config.clone();
    let (open, budget) = (shared.open.clone(), shared.budget.clone());
    let registry = shared.registry.clone();
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let cpu = cpus.get(index % cpus.len().max(1)).copied();
    let outputs = output::open(&config, gen, index);
    let (dir, fsync) = (config.state_directory(), config.state_fsync());
    let commits = commit::CommitLog::create(dir, index, fsync, config.state_modes())?;
    let writer = writer::Writer::new(index, outputs, commits, windows, config.clone());
    let writers = shared.writers.to_vec();
    let written = writer.figures();
    std::thread::Builder::new()
        .name(format!("receiver-{index}-writer"))
        .spawn(move || writer.run(queue))?;
    std::thread::Builder::new().name(format!("receiver-{index}")).spawn(move || {
        if let Some(cpu) = cpu {
            core_affinity::set_for_current(cpu);
        }
        let shard = shard::Shard::new(index, config, writers, written);
        tokio_uring::start(async move {
            if index == 0 && crate::fault::injected(crate::fault::Fault::PanicWorkerTask) {
                tokio_uring::spawn(crate::fault::panic_worker_task("receiver worker"));
            }
            shard::serve(Rc::new(RefCell::new(shard)), rx, open, budget, registry).await
        });
    })?;
    Ok(tx)
}

/// How long a bind may wait for the listening address to be let go.
const BIND_WAIT_MS: u64 = 5000;

/// Binds `addr`, waiting up to [`BIND_WAIT_MS`] while it is in use: a receiver restarted at
/// once finds its address still held for a moment by the previous process, whose io_uring
/// (an accept in flight holds the listening socket) is torn down after the process exits.
fn bind(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed().as_millis() < u128::from(BIND_WAIT_MS) =>
            {
                if pause.as_millis() == 10 {
                    tracing::warn!("{addr} in use; waiting up to {BIND_WAIT_MS} ms for it");
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            Ok(l) if pause.as_millis() > 10 => {
                tracing::info!("{addr} bound after {} ms", started.elapsed().as_millis());
                return Ok(l);
            }
            result => return result,
        }
    }
}

/// Stream files a shard may have open at once: `files_open_max`, or one per stream it may
/// have (`streams_max`, plus `_other` and `_other@dead_letter`) when that is fewer.
pub fn files_open_per_shard(streams_max: usize, files_open_max: usize) -> usize {
    files_open_max.min(streams_max + 2)
}

/// Descriptors the receiver holds besides its connections, at most, with `shards` shards of
/// at most `files_open` open stream files each ([`files_open_per_shard`], summed over the files
/// outputs, plus one per ClickHouse output for its HTTP connection): what is left of
/// the open-file limit is for connections. Keep in step with what the code opens.
pub fn descriptors_reserved(shards: usize, files_open: usize) -> u64 {
    let per_shard = files_open as u64 // open stream files; past this the least recent closes
        + 1 // a closed stream file opened to cut back a failed frame
        + 3 // the commit log; while compacting, also its snapshot and the directory synced
        + 4; // its tokio-uring runtime: io_uring, two epolls, an eventfd (as measured)
    shards as u64 * per_shard
        + 4 // the acceptor's tokio-uring runtime
        + 1 // the listening socket
        + 1 // a connection over `connections_max`: accepted, then closed at once
        + 1 // a connection's duplicate, made to hand it to its shard
        + 2 // the metrics endpoint: its listening socket and the scrape being served
        + 3 // standard input, output and error
        + 32 // slack: descriptors inherited (a pipe), opened by libraries, or briefly at start
}

/// The open-file limit leaves no descriptor for a connection.
#[derive(Debug, thiserror::Error)]
#[error(
    "the open-file limit {open_files} leaves no descriptor for connections: the receiver \
     itself may need {reserved} ({workers} receiver.workers with up to {files_open} stream files \
     open each: output.files_open_max, or output.streams_max + 2 when fewer); lower those or \
     raise the hard limit (LimitNOFILE= in a systemd unit)"
)]
pub struct NoRoomForConnections {
    pub open_files: u64,
    pub reserved: u64,
    pub workers: usize,
    pub files_open: usize,
}

/// Lowers `receiver.connections_max` to what an open-file limit of `open_files` leaves after
/// [`descriptors_reserved`], with one warning naming both figures.
pub fn fit_connections(
    mut config: ReceiverConfig,
    open_files: u64,
) -> Result<ReceiverConfig, NoRoomForConnections> {
    let workers = config.receiver.workers;
    let per_output = |o: &OutputSection| files_open_per_shard(o.streams_max, o.files_open_max);
    // A ClickHouse output holds one connection per shard while it inserts.
    #[cfg(feature = "kafka")]
    let kafka = |k: &KafkaSection| output::kafka::descriptors(k.brokers.len());
    // A build without the Kafka output refuses a config that names one.
    #[cfg(not(feature = "kafka"))]
    let kafka = |_: &KafkaSection| 0;
    let files_open = config.file_outputs().map(per_output).sum::<usize>()
        + config.outputs.clickhouse.len()
        + config.outputs.kafka.iter().map(kafka).sum::<usize>();
    let reserved = descriptors_reserved(workers, files_open);
    let fit = open_files.saturating_sub(reserved);
    if fit == 0 {
        return Err(NoRoomForConnections { open_files, reserved, workers, files_open });
    }
    let wanted = config.receiver.connections_max;
    if wanted as u64 > fit {
        tracing::warn!(
            "receiver.connections_max {wanted} lowered to {fit}: the open-file limit is \
             {open_files} and the receiver itself may need {reserved}"
        );
        config.receiver.connections_max = fit as usize;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(connections_max: usize, output: &str) -> ReceiverConfig {
        toml::from_str(&format!(
            "[receiver]\nlisten = \"127.0.0.1:1\"\nworkers = 2\n\
             connections_max = {connections_max}\n\
             [tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n\
             [output]\ndirectory = \"out\"\n{output}\n"
        ))
        .unwrap()
    }

    #[test]
    fn connections_max_is_lowered_to_the_descriptors_left() {
        // Per shard 16 streams + 2 open at most, + 8; 2 shards; 44 for the process.
        assert_eq!(files_open_per_shard(16, 256), 18);
        assert_eq!(descriptors_reserved(2, 18), 2 * 26 + 44);
        let fit = |connections_max, open_files| {
            fit_connections(config(connections_max, "streams_max = 16"), open_files)
                .map(|c| c.receiver.connections_max)
        };
        assert_eq!(fit(4096, 256).unwrap(), 256 - 96);
        assert_eq!(fit(100, 256).unwrap(), 100, "a limit that fits is kept");
        assert_eq!(fit(4096, 97).unwrap(), 1);
        let e = fit(4096, 96).unwrap_err().to_string();
        assert!(e.contains("open-file limit 96 leaves no descriptor"), "{e}");
        assert!(e.contains("may need 96 (2 receiver.workers with up to 18 stream files"), "{e}");
    }

    #[test]
    fn open_stream_files_are_reserved_as_files_open_max_says() {
        // The defaults: 1024 streams, 256 files open, per shard 256 + 8.
        let fit = |output, limit| {
            fit_connections(config(4096, output), limit).map(|c| c.receiver.connections_max)
        };
        assert_eq!(fit("", 1024).unwrap(), 1024 - (2 * 264 + 44));
        assert_eq!(fit("files_open_max = 4", 1024).unwrap(), 1024 - (2 * 12 + 44));
    }
}
