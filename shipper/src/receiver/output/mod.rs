//! What a receiver shard writes a frame's records to: the [`Output`] seam, and every kind of
//! output behind it ([`files`]: per-stream files; [`clickhouse`]: HTTP inserts into a table;
//! [`kafka`]: records produced to topics). A receiver has one or more outputs (`[output]`,
//! `[[outputs.file]]`, `[[outputs.clickhouse]]`, `[[outputs.kafka]]`), each taking the records
//! of the streams it [selects](Select).
//!
//! # Design constraints
//! - A frame is acknowledged only after every output that took its records made them durable
//!   ([`Output::sync`]) and the shard's commit log recorded the frame
//!   ([`super::commit::CommitLog::commit`]) with the [marks](Mark) the outputs gave for it. A
//!   frame's records go to every output or, as far as the outputs can take them back, to none.
//! - An output is called on its shard's writer thread ([`super::writer`]), where blocking is
//!   allowed and nothing else waits on it but the frames queued for that writer: one frame
//!   at a time, a group of frames between syncs (group commit).
//! - The shard calls an output through `dyn Output` once per frame and step, never per record:
//!   the per-record loop is the output's own.
//! - An output takes the records whose key matches one of its `streams` globs (all when there
//!   are none) and none of its `exclude_streams`; a frame none of whose records it takes
//!   costs it one scan and nothing else (no write, nothing to sync, no marks). The match of
//!   each key is cached, at most [`SELECT_CACHED_KEYS_MAX`] keys per output and shard (the
//!   cache is emptied when full: a cache, nothing is lost).
//! - Every output is named (`name`, unique, at most 64 bytes of `[A-Za-z0-9_-]`): the label
//!   `output` of its metrics, bounded by the configuration.
//! - An output that can take back what it wrote (files: cut back) gets exactly-once: recovery
//!   cuts whatever is not committed. One that cannot (a Kafka topic, a ClickHouse table) has
//!   no marks to cut back to and relies on the de-duplication windows alone: a frame it wrote
//!   whose commit did not happen (a crash, a failed sync of another output) is not
//!   acknowledged, so the shipper resends it and that output gets its records twice.
//! - A commit that fails is cut off the log again, durably, before the outputs take the group
//!   back: a frame cut from an output but named in the log would count as written after a
//!   restart, its resend dropped as a duplicate and the frame lost. A log that cannot be cut
//!   back ends the process (a panic), and recovery repairs it.
//!
//! # Format
//! ```text
//! Mark = (name: &str, end: u64)    what a commit record names for one output's frame
//!   files named `files` (`[output]`): (STREAM/gGEN-cSHARD-INDEX.log, its end after the frame)
//!   files named NAME: ("file:NAME:STREAM/gGEN-cSHARD-INDEX.log", its end)
//!   others: name starts with the output's kind and ':' (a stream file's never holds ':')
//! ```
//!
//! # Operation
//! 1. At start, before any shard runs, [`recover`] hands every kind of output the marks and
//!    intents of the generation that was running, read from the commit logs: each cuts what
//!    it wrote past them, if it can (files: the newest file of each stream back to its
//!    committed end; one announced and never committed removed).
//! 2. Per DATA frame of a group, on its shard's writer: [`Output::write`] on every output
//!    (one that fails has taken its part back; those written before it [undo](Output::undo)
//!    the frame; a file it will cut back is first announced through [`Intents`], appended to
//!    the commit log and made durable at once), and the frame's commit record is staged,
//!    naming every output's [`Output::marks`]. Then, per group: [`Output::sync`] on every
//!    output that took records (one failure [discards](Output::discard) the group in all of
//!    them); then the staged commit records are appended (one fdatasync; a failure discards
//!    the group too, see above); then every output hears the group is
//!    [committed](Output::committed), and every frame is acknowledged.
//! 3. When the commit log is compacted, [`Output::checkpoint`] gives what the snapshot must
//!    keep for recovery to cut nothing committed (files: every live stream's current file and
//!    end); the intents are dropped.
//! 4. While a shard has no frame, about once a second, [`Output::tick`] (files: forget the
//!    streams idle for `streams_idle_s`).

pub mod clickhouse;
pub mod files;
#[cfg(feature = "kafka")]
pub mod kafka;

use std::collections::HashMap;
use std::io;

use super::commit::LogState;
use crate::config::ReceiverConfig;
use crate::metrics::receiver::OutputCounters;
use crate::protocol::RecordIter;

/// What a commit record names for an output: how far `name` holds committed data. Marks of
/// one name only grow; recovery gets the largest of each.
pub type Mark<'a> = (&'a str, u64);

/// The records of one DATA frame, validated ([`RecordIter::validate`]), on their way to the
/// outputs.
#[derive(Clone, Copy)]
pub struct Records<'a> {
    /// The decompressed payload: `count` records.
    pub payload: &'a [u8],
    pub count: u32,
    /// Sent here as the shipper's dead-letter destination (`FLAG_DEAD_LETTER`).
    pub dead_letter: bool,
    /// The sending shipper's name, from its HELLO (at most 255 bytes).
    pub sender: &'a str,
}

impl<'a> Records<'a> {
    /// The (key, body) of every record, in order.
    pub fn iter(&self) -> RecordIter<'a> {
        RecordIter::new(self.payload, self.count)
    }
}

/// Why an output did not take a frame.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// It never will, whatever is retried: a name it refuses, content it does not take. The
    /// frame is answered with REJECT and the shipper gives it another fate.
    #[error("the output cannot take it: {0}")]
    Refused(io::Error),
    /// Not now (disk full, I/O error): no ACK, the connection closes, the shipper resends.
    #[error("{0}")]
    Failed(io::Error),
}

/// A place a shard writes frames' records to. One instance per shard, opened at start and
/// then owned by its shard's thread (so `Send`).
pub trait Output: Send {
    /// Its `name` in the configuration: the label `output` of its metrics.
    fn name(&self) -> &str;

    /// Writes every record of `records` that it [selects](Select) (grouped by stream, as the
    /// output names them); returns the records and bytes taken (none: nothing to sync). All
    /// or nothing: on error, what it wrote of the frame is taken back, as far as the output
    /// can ([`Output::undo`]). A file it will cut back to its marks is announced to `intents`
    /// before it is created.
    fn write(
        &mut self,
        records: &Records,
        intents: &mut dyn Intents,
    ) -> Result<Written, WriteError>;

    /// Returns once everything [`Output::write`] wrote since the last sync (a group of
    /// frames) is durable, as the output's config says (files: fdatasync of the files the
    /// group touched, with `fsync` on; ClickHouse: one insert of the group's rows). An error
    /// leaves the group to be [discarded](Output::discard).
    fn sync(&mut self) -> io::Result<()>;

    /// Takes back the frame written last, which will not be committed (another output could
    /// not take it); what the frames before it in the group wrote stays. An output that
    /// cannot take records back does nothing.
    fn undo(&mut self);

    /// Takes back everything written since the last group was [committed](Output::committed)
    /// (a sync failed here or in another output, or the commit failed: the group is not
    /// committed). An output that cannot take records back does nothing: a frame not
    /// acknowledged is resent, and it then holds its records twice.
    fn discard(&mut self);

    /// The group synced last is committed: nothing of it will be taken back.
    fn committed(&mut self);

    /// Adds to `marks` what the commit record of the frame written last must name, for
    /// recovery to cut the output back to it after a crash; nothing for an output that cannot
    /// be cut back.
    fn marks<'a>(&'a self, marks: &mut Vec<Mark<'a>>);

    /// Adds to `marks` what a compacted commit log must keep naming, for recovery to cut back
    /// nothing committed (files: every stream's current file, open or closed, and its end).
    fn checkpoint<'a>(&'a self, marks: &mut Vec<Mark<'a>>);

    /// Copies the output's own figures into its own counters (one set per output and shard,
    /// so that outputs never overwrite each other's gauges).
    fn report(&self, counters: &mut OutputCounters);

    /// Called between groups, about once a second while the shard has no frame to write:
    /// work that waits on the clock alone (files: forget the streams idle for
    /// `streams_idle_s`). Nothing by default.
    fn tick(&mut self) {}
}

/// Where an output announces the files it is about to create, before it creates them: the
/// shard's commit log ([`super::commit::CommitLog`]), which makes the names durable first.
/// Recovery cuts back (or removes) a file the log does not name only when it was announced.
pub trait Intents {
    /// Makes `names` (as the output's marks name them) durable as files about to be created.
    fn intend(&mut self, names: &[&str]) -> io::Result<()>;
}

/// Intents kept in memory, for tests that write without a commit log.
#[cfg(test)]
impl Intents for Vec<String> {
    fn intend(&mut self, names: &[&str]) -> io::Result<()> {
        self.extend(names.iter().map(|n| n.to_string()));
        Ok(())
    }
}

/// What [`Output::write`] took of a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub records: u64,
    /// As the output counts them (files: bytes appended; ClickHouse: bytes of the insert).
    pub bytes: u64,
}

/// Keys whose match an output keeps (per shard); past this the cache is emptied.
pub const SELECT_CACHED_KEYS_MAX: usize = 4096;

/// Which streams an output takes: keys matching one of `streams` (every key when empty) and
/// none of `exclude_streams`, globs where `*` is any run of bytes and `?` one byte.
pub struct Select {
    streams: Vec<String>,
    exclude: Vec<String>,
    cache: HashMap<Vec<u8>, bool>,
}

impl Select {
    pub fn new(streams: &[String], exclude: &[String]) -> Select {
        Select { streams: streams.to_vec(), exclude: exclude.to_vec(), cache: HashMap::new() }
    }

    /// Whether the output takes records of `key`.
    pub fn takes(&mut self, key: &[u8]) -> bool {
        if self.streams.is_empty() && self.exclude.is_empty() {
            return true;
        }
        if let Some(&taken) = self.cache.get(key) {
            return taken;
        }
        let matches =
            |globs: &[String]| globs.iter().any(|g| crate::glob::matches(g.as_bytes(), key));
        let taken = (self.streams.is_empty() || matches(&self.streams)) && !matches(&self.exclude);
        if self.cache.len() >= SELECT_CACHED_KEYS_MAX {
            self.cache.clear();
        }
        self.cache.insert(key.to_vec(), taken);
        taken
    }
}

/// One kind of output: how it recovers after any stop, and how a shard opens it.
pub struct Kind {
    /// Cuts what the generation the logs name (`log.gen`) wrote past its marks (the largest of
    /// each name in the commit logs), if the output can; removes what holds nothing committed
    /// (a file announced, [`LogState::intents`], and never committed).
    pub recover: fn(&ReceiverConfig, log: &LogState) -> io::Result<()>,
    /// The outputs of this kind the config names, opened for shard `shard` of generation `gen`.
    pub open: fn(&ReceiverConfig, gen: u64, shard: usize) -> Vec<Box<dyn Output>>,
}

/// Every kind of output. Adding one: its file under `output/` and one line here.
#[cfg(feature = "kafka")]
const KINDS: &[Kind] = &[files::KIND, clickhouse::KIND, kafka::KIND];
/// Without the `kafka` feature, a config naming a Kafka output is refused when it is loaded.
#[cfg(not(feature = "kafka"))]
const KINDS: &[Kind] = &[files::KIND, clickhouse::KIND];

/// Recovers every kind of output (Operation, step 1).
pub fn recover(config: &ReceiverConfig, log: &LogState) -> io::Result<()> {
    KINDS.iter().try_for_each(|kind| (kind.recover)(config, log))
}

/// Every output of shard `shard` in generation `gen`, as the config names them.
pub fn open(config: &ReceiverConfig, gen: u64, shard: usize) -> Vec<Box<dyn Output>> {
    KINDS.iter().flat_map(|kind| (kind.open)(config, gen, shard)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_takes_streams_less_the_excluded() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut all = Select::new(&[], &[]);
        assert!(all.takes(b"anything"));
        let mut some = Select::new(&s(&["nginx_*", "app"]), &s(&["nginx_debug"]));
        let taken: Vec<bool> = ["nginx_access", "nginx_debug", "app", "apps"]
            .iter()
            .map(|k| some.takes(k.as_bytes()))
            .collect();
        assert_eq!(taken, [true, false, true, false]);
        assert!(!some.takes(b"nginx_debug"), "the cached answer is the same");
        let mut but = Select::new(&[], &s(&["secret*"]));
        assert_eq!((but.takes(b"secrets"), but.takes(b"web")), (false, true));
    }
}
