//! `shipper receive`: accepts shippers over mutual TLS, writes their records to per-stream
//! files, and acknowledges each frame once it is written (and fsync'd) and committed.
//!
//! # Design constraints
//! - `workers` threads each own the sender streams hashed to them ([`server::owner`]), their
//!   output files and their commit log; the acceptor thread only handshakes and hands off.
//!
//! # Operation
//! 1. [`commit::recover`] repairs the output directory after any stop and yields the
//!    de-duplication windows, which are dealt to their owning workers.
//! 2. Workers and the acceptor start; SIGTERM/SIGINT end the process once the listener is
//!    closed (frames in progress are not acknowledged, and so are resent by shippers).

pub mod commit;
pub mod dedup;
pub mod output;
pub mod server;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Context;

use crate::config::ReceiverConfig;
use crate::metrics::receiver::{render, ReceiverCounters};
use crate::metrics::{http, scrape, Registry};
use crate::runtime::signals;

/// Runs the receiver until SIGTERM/SIGINT.
pub fn run(config: ReceiverConfig) -> anyhow::Result<()> {
    signals::block_termination()?;
    let config = Arc::new(config);
    let t = &config.tls;
    let tls = Arc::new(crate::tls::server_config(&t.ca, &t.cert, &t.key)?);
    let out = &config.output.directory;
    std::fs::create_dir_all(out).with_context(|| format!("output.directory {}", out.display()))?;
    let state = commit::recover(out).with_context(|| format!("recovering {}", out.display()))?;
    let workers = config.receiver.workers;
    let mut windows: Vec<HashMap<_, _>> = (0..workers).map(|_| HashMap::new()).collect();
    for (id, w) in state.windows {
        windows[server::owner(id, workers)].insert(id, w);
    }
    let listener = bind(&config.receiver.listen)
        .with_context(|| format!("receiver.listen {}", config.receiver.listen))?;
    let registry = Registry::<ReceiverCounters>::new(workers + 1);
    if !config.metrics.listen.is_empty() {
        let r = registry.clone();
        let addr = http::serve(&config.metrics.listen, move || scrape(&r, render))
            .with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let open = Arc::new(AtomicUsize::new(0));
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let mut inboxes = Vec::new();
    for (core, windows) in windows.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        inboxes.push(tx);
        let (config, open, registry) = (config.clone(), open.clone(), registry.clone());
        let cpu = cpus.get(core % cpus.len().max(1)).copied();
        let o = &config.output;
        let output = output::Output::new(
            &o.directory,
            state.gen,
            core,
            o.file_bytes_max,
            o.fsync,
            o.streams_max,
        );
        let commits = commit::CommitLog::create(&o.directory, core, o.fsync)?;
        std::thread::Builder::new().name(format!("receiver-{core}")).spawn(move || {
            if let Some(cpu) = cpu {
                core_affinity::set_for_current(cpu);
            }
            let worker = server::Worker::new(core, output, commits, windows, config);
            tokio_uring::start(async move {
                if core == 0 && crate::fault::injected(crate::fault::Fault::PanicWorkerTask) {
                    tokio_uring::spawn(crate::fault::panic_worker_task("receiver worker"));
                }
                server::serve_worker(Rc::new(RefCell::new(worker)), rx, open, registry).await
            });
        })?;
    }
    let addr = listener.local_addr()?;
    std::thread::Builder::new().name("acceptor".into()).spawn(move || {
        if let Err(e) = server::accept(listener, config, tls, inboxes, open, registry) {
            tracing::error!("acceptor failed: {e}");
            std::process::exit(1);
        }
    })?;
    tracing::info!(%addr, workers, generation = state.gen, "receiver listening");
    let sig = signals::wait_termination()?;
    tracing::info!(signal = sig, "receiver stopping");
    Ok(())
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
