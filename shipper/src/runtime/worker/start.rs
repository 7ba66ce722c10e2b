//! One worker thread: pinned to a CPU, running its own io_uring loop. This is where the
//! stages are assembled: each source is registered with the worker (its decode stage, its
//! counters, its marks if durable) and spawned as a task given the worker as its
//! [`crate::sources::Intake`]; the disk buffer's tasks get it as their
//! [`crate::buffer::Spill`], each connection slot as its [`crate::sinks::delivery::Link`];
//! then the ticker (`tick.rs`) runs until the worker stops.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::Worker;
use crate::config::ShipperConfig;
use crate::metrics::shipper::ShipperCounters;
use crate::metrics::Registry;
use crate::runtime::control::{ToControl, Update};
use crate::runtime::takeover::HandingOver;
use crate::sinks::delivery::connection::{run_slot, Target};
use crate::sources::connections::Connections;
use crate::sources::file::positions::Positions;
use crate::sources::file::source::Files;
use crate::sources::file::FileCounters;
use crate::sources::forward::chunks::{Acks, Registry as Chunks};
use crate::sources::forward::run::{Forward, Settings};
use crate::sources::forward::ForwardCounters;
use crate::sources::journal::checkpoint::Checkpoint;
use crate::sources::journal::source::Journal;
use crate::sources::journal::JournalCounters;
use crate::sources::pipe::SourceCounters;
use crate::sources::pipe::{Handover, Leftover, PipeLimits};
use crate::sources::socket::run::{read_datagrams, serve_tcp, Socket, TcpLimits};
use crate::sources::socket::{Bound, BoundSocket, SocketCounters};
use crate::transforms::Decode;

/// A pipe opened by the main thread, handed to its worker.
pub struct PipeHandle {
    pub file: std::fs::File,
    pub config_index: usize,
    /// The partial line the process this one took over held (empty otherwise).
    pub left: Leftover,
}

/// Where pipe sources leave the partial line they held when they stopped (by
/// `sources.pipe` index), for a takeover to carry on; written once per pipe, at the stop.
pub type Leftovers = Arc<Mutex<Vec<(usize, Leftover)>>>;

/// A journal source and its checkpoint, opened by the main thread, handed to its worker.
pub struct JournalHandle {
    pub config_index: usize,
    pub checkpoint: Checkpoint,
}

/// A file source and its positions, opened by the main thread, handed to its worker.
pub struct FileHandle {
    pub config_index: usize,
    pub positions: Positions,
}

/// A socket source's sockets on one worker, bound by the main thread (more than one after a
/// takeover onto fewer workers: each socket the old process read is read on), handed to its
/// worker.
pub struct SocketHandle {
    pub config_index: usize,
    /// Never empty; all bound to the same address.
    pub bound: Vec<BoundSocket>,
}

/// A forward source's listeners on one worker (more than one after a takeover onto fewer
/// workers), bound by the main thread, with what its workers share.
pub struct ForwardHandle {
    pub config_index: usize,
    /// Never empty; all bound to `local`.
    pub listeners: Vec<std::net::TcpListener>,
    pub local: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The source's chunk ids, shared by its workers.
    pub registry: Arc<Chunks>,
    /// The host name PONG gives.
    pub self_hostname: String,
}

/// Everything a worker thread starts with.
pub struct WorkerPlan {
    pub index: usize,
    pub cpu: Option<core_affinity::CoreId>,
    pub pipes: Vec<PipeHandle>,
    pub journals: Vec<JournalHandle>,
    pub files: Vec<FileHandle>,
    pub sockets: Vec<SocketHandle>,
    pub forwards: Vec<ForwardHandle>,
    pub config: Arc<ShipperConfig>,
    pub targets: Vec<Arc<Target>>,
    pub registry: Arc<Registry<ShipperCounters>>,
    pub reports: Sender<ToControl>,
    pub shares: Receiver<Update>,
    pub stop: watch::Receiver<bool>,
    /// The enrichments' fetched values.
    pub feeds: Vec<Arc<crate::transforms::enrich::feed::Feed>>,
    /// Where the pipes' partial lines go at the stop.
    pub leftovers: Leftovers,
    /// Set before the stop when it is a takeover's.
    pub handing_over: Arc<HandingOver>,
}

/// Runs the worker on the current thread until it has stopped.
pub fn run(plan: WorkerPlan) -> anyhow::Result<()> {
    if let Some(cpu) = plan.cpu {
        if !core_affinity::set_for_current(cpu) {
            tracing::warn!(core = plan.index, "could not pin worker to CPU {}", cpu.id);
        }
    }
    let ring_entries = 256;
    tokio_uring::builder().entries(ring_entries).start(work(plan))
}

async fn work(plan: WorkerPlan) -> anyhow::Result<()> {
    let worker = Rc::new(RefCell::new(Worker::new(plan.index, plan.config.clone(), &plan.feeds)?));
    // Every target carries the same run id: the process's.
    worker.borrow_mut().delivery.run_id = plan.targets.first().map_or(0, |t| t.run_id);
    let pipes: Vec<_> = plan
        .pipes
        .into_iter()
        .map(|pipe| {
            let takeover = (&plan.leftovers, &plan.handing_over);
            start_pipe(&worker, pipe, &plan.config, &plan.stop, takeover)
        })
        .collect();
    for handle in plan.journals {
        start_journal(&worker, handle, &plan.config, &plan.stop);
    }
    for handle in plan.files {
        start_file(&worker, handle, &plan.config, &plan.stop);
    }
    if let Some(q) = worker.borrow().quarantine.clone() {
        tokio_uring::spawn(crate::sinks::quarantine::write_loop(q));
    }
    if worker.borrow().buffer.is_some() {
        tokio_uring::spawn(crate::buffer::io::write_loop(worker.clone(), plan.stop.clone()));
        tokio_uring::spawn(crate::buffer::io::replay_loop(worker.clone(), plan.stop.clone()));
        tokio_uring::spawn(crate::buffer::io::tidy_loop(worker.clone()));
    }
    for handle in plan.sockets {
        start_socket(&worker, handle, &plan.config, &plan.stop);
    }
    for handle in plan.forwards {
        start_forward(&worker, handle, &plan.config, &plan.stop);
    }
    let b = &plan.config.batch;
    if b.seal_when_idle && b.idle_seal_delay_ms() > 0 {
        tokio_uring::spawn(super::tick::idle_seal_timer(worker.clone()));
    }
    for target in &plan.targets {
        for _ in 0..plan.config.receivers.connections {
            tokio_uring::spawn(run_slot(worker.clone(), target.clone(), plan.stop.clone()));
        }
    }
    if plan.index == 0 && crate::fault::injected(crate::fault::Fault::PanicWorkerTask) {
        tokio_uring::spawn(crate::fault::panic_worker_task("worker"));
    }
    if plan.index == 0 && crate::fault::injected(crate::fault::Fault::StallWorker) {
        tokio_uring::spawn(crate::fault::stall_worker_task());
    }
    let plane = super::tick::Plane {
        reports: plan.reports,
        shares: plan.shares,
        handing_over: plan.handing_over,
    };
    super::tick::run(worker, plan.stop, plane, plan.registry).await;
    // Stopped at the stop, long before: this only makes sure their leftovers are in.
    for p in pipes {
        let _ = p.await;
    }
    Ok(())
}

/// Registers a pipe source with the worker and spawns its reading task, which leaves its
/// partial line in `leftovers` when it stops.
fn start_pipe(
    worker: &Rc<RefCell<Worker>>,
    pipe: PipeHandle,
    config: &ShipperConfig,
    stop: &watch::Receiver<bool>,
    (leftovers, handing_over): (&Leftovers, &Arc<HandingOver>),
) -> tokio::task::JoinHandle<()> {
    let (handing_over, index) = (handing_over.clone(), pipe.config_index);
    let cfg = &config.sources.pipe[index];
    let name = cfg.path.display().to_string();
    let counters = SourceCounters { source: name, ..Default::default() };
    let r = worker.borrow_mut().add_source(
        Decode::Line(cfg.format),
        Some(&cfg.service_name()),
        None,
        counters,
        |out, c| out.sources.push(c.clone()),
    );
    let limits = PipeLimits {
        read_bytes: cfg.read_bytes as usize,
        line_bytes_max: cfg.line_bytes_max as usize,
    };
    let task = crate::sources::pipe::run(
        worker.clone(),
        r.id,
        pipe.file,
        limits,
        r.counters,
        stop.clone(),
        Handover { left: pipe.left, handing_over: move || handing_over.keeps_leftover(index) },
    );
    let leftovers = leftovers.clone();
    tokio_uring::spawn(async move {
        let left = task.await;
        leftovers.lock().expect("leftovers poisoned").push((index, left));
    })
}

/// Registers a journal source with the worker (durable: its checkpoint takes the marks) and
/// spawns its reading task.
fn start_journal(
    worker: &Rc<RefCell<Worker>>,
    handle: JournalHandle,
    config: &ShipperConfig,
    stop: &watch::Receiver<bool>,
) {
    let cfg = Rc::new(config.sources.journal[handle.config_index].clone());
    let checkpoint = Rc::new(RefCell::new(handle.checkpoint));
    let counters = JournalCounters { source: cfg.name(), ..Default::default() };
    let errors = checkpoint.clone();
    let publish = move |out: &mut ShipperCounters, c: &JournalCounters| {
        let checkpoint_write_errors = errors.borrow().write_errors();
        out.journals.push(JournalCounters { checkpoint_write_errors, ..c.clone() });
    };
    // The source gives every entry's service.
    let marks = Some(checkpoint.clone() as Rc<RefCell<dyn crate::sources::Marks>>);
    let r = worker.borrow_mut().add_source(Decode::Given, None, marks, counters, publish);
    let journal = Journal { intake: worker.clone(), id: r.id, checkpoint, counters: r.counters };
    tokio_uring::spawn(crate::sources::journal::source::run(journal, cfg, stop.clone()));
}

/// Registers a file source with the worker (durable: its positions take the marks) and
/// spawns its reading task.
fn start_file(
    worker: &Rc<RefCell<Worker>>,
    handle: FileHandle,
    config: &ShipperConfig,
    stop: &watch::Receiver<bool>,
) {
    let cfg = Rc::new(config.sources.file[handle.config_index].clone());
    let positions = Rc::new(RefCell::new(handle.positions));
    let name = cfg.name();
    let lines = SourceCounters { source: name.clone(), ..Default::default() };
    let counters = FileCounters { source: name, lines, ..Default::default() };
    let errors = positions.clone();
    let publish = move |out: &mut ShipperCounters, c: &FileCounters| {
        let positions_write_errors = errors.borrow().write_errors();
        out.sources.push(c.lines.clone());
        out.files.push(FileCounters { positions_write_errors, ..c.clone() });
    };
    let marks = Some(positions.clone() as Rc<RefCell<dyn crate::sources::Marks>>);
    let decode = Decode::Line(cfg.format);
    let service = cfg.service_name();
    let r = worker.borrow_mut().add_source(decode, Some(&service), marks, counters, publish);
    let files = Files { intake: worker.clone(), id: r.id, positions, counters: r.counters };
    tokio_uring::spawn(crate::sources::file::source::run(files, cfg, stop.clone()));
}

/// Registers a socket source with the worker and spawns its reading task.
fn start_socket(
    worker: &Rc<RefCell<Worker>>,
    handle: SocketHandle,
    config: &ShipperConfig,
    stop: &watch::Receiver<bool>,
) {
    let cfg = &config.sources.socket[handle.config_index];
    let local = handle.bound.first().expect("a socket source has a socket").local.clone();
    let transport = cfg.transport.label();
    let r = {
        let mut w = worker.borrow_mut();
        tracing::info!(core = w.index, source = %cfg.name, transport, %local, "socket source reading");
        let counters =
            SocketCounters { source: cfg.name.clone(), transport, local, ..Default::default() };
        let decode = Decode::Message(cfg.format);
        w.add_source(decode, Some(&cfg.service_name()), None, counters, |out, c| {
            out.sockets.push(c.clone());
        })
    };
    let socket = Socket { intake: worker.clone(), id: r.id, counters: r.counters };
    let max = cfg.message_bytes_max as usize;
    let limits = TcpLimits {
        framing: cfg.framing_or_default(),
        message_bytes_max: max,
        connections_max: cfg.connections_max_or_default(),
        idle_timeout: cfg.idle_timeout_or_default(),
    };
    let conns = Rc::new(RefCell::new(Connections::default()));
    for bound in handle.bound {
        let (socket, stop) = (socket.clone(), stop.clone());
        match bound.socket {
            Bound::Datagram(fd) => tokio_uring::spawn(read_datagrams(socket, fd, max, stop)),
            Bound::Listener(l) => {
                tokio_uring::spawn(serve_tcp(socket, l, conns.clone(), limits, stop))
            }
        };
    }
}

/// Registers a forward source with the worker (durable for chunks: its acks take the marks)
/// and spawns its acceptor.
fn start_forward(
    worker: &Rc<RefCell<Worker>>,
    handle: ForwardHandle,
    config: &ShipperConfig,
    stop: &watch::Receiver<bool>,
) {
    let cfg = &config.sources.forward[handle.config_index];
    let acks = Rc::new(RefCell::new(Acks::new(handle.registry.clone())));
    let local = handle.local;
    let r = {
        let mut w = worker.borrow_mut();
        tracing::info!(core = w.index, source = %cfg.name, %local, "forward source listening");
        let counters = ForwardCounters { source: cfg.name.clone(), local, ..Default::default() };
        let marks = Some(acks.clone() as Rc<RefCell<dyn crate::sources::Marks>>);
        // The tag is every record's key; an empty tag goes to the source's name.
        w.add_source(Decode::Given, Some(&cfg.name), marks, counters, |out, c| {
            out.forwards.push(c.clone());
        })
    };
    let limits = crate::sources::forward::message::Limits {
        entries_max: cfg.entries_max as usize,
        decompressed_bytes_max: cfg.decompressed_bytes_max as usize,
        record_bytes_max: cfg.record_bytes_max as usize,
    };
    let settings = Settings {
        limits,
        message_bytes_max: cfg.message_bytes_max as usize,
        connections_max: cfg.connections_max_or_default(),
        idle_timeout: cfg.idle_timeout_or_default(),
        handshake_timeout: std::time::Duration::from_millis(cfg.handshake_timeout_ms),
        tls: handle.tls,
        shared_key: cfg.shared_key.as_ref().map(|k| k.as_bytes().to_vec()),
        self_hostname: handle.self_hostname.into_bytes(),
    };
    let source = Forward {
        intake: worker.clone(),
        id: r.id,
        counters: r.counters,
        acks,
        registry: handle.registry,
        settings: Rc::new(settings),
    };
    let conns = Rc::new(RefCell::new(Connections::default()));
    for listener in handle.listeners {
        let serve = crate::sources::forward::run::serve;
        tokio_uring::spawn(serve(source.clone(), listener, conns.clone(), stop.clone()));
    }
}
