//! Interleaves the entries of several files in journalctl's order: by sequence number within
//! one sequence-number space, by monotonic time within one boot, else by wall-clock time.

use std::cmp::Ordering;

use super::file::Load;
use super::reader::{Entry, JournalReader};

/// journalctl's order between two entries (with their files' sequence-number ids).
pub fn compare(a: (&[u8; 16], &Entry), b: (&[u8; 16], &Entry)) -> Ordering {
    let (sa, ea) = a;
    let (sb, eb) = b;
    if sa == sb && ea.seqnum != eb.seqnum {
        return ea.seqnum.cmp(&eb.seqnum);
    }
    if ea.boot_id == eb.boot_id && ea.monotonic != eb.monotonic {
        return ea.monotonic.cmp(&eb.monotonic);
    }
    ea.realtime.cmp(&eb.realtime).then(ea.xor_hash.cmp(&eb.xor_hash))
}

/// An entry from a [`Merge`]: its reader's index, its file's sequence-number id, the entry.
pub type Merged<'a> = (usize, [u8; 16], &'a Entry);

/// A merge over readers, each with its next entry decoded ahead into a buffer of its own.
pub struct Merge {
    pub readers: Vec<JournalReader>,
    heads: Vec<Entry>,
    /// Whether `heads[i]` holds reader `i`'s next entry.
    ready: Vec<bool>,
}

impl Merge {
    pub fn new(readers: Vec<JournalReader>) -> Merge {
        let heads = readers.iter().map(|_| Entry::default()).collect();
        let ready = readers.iter().map(|_| false).collect();
        Merge { readers, heads, ready }
    }

    /// Adds a file to the merge.
    pub fn add(&mut self, reader: JournalReader) {
        self.readers.push(reader);
        self.heads.push(Entry::default());
        self.ready.push(false);
    }

    /// Closes the files for which `done` holds and whose next entry is not waiting here.
    pub fn close_if(&mut self, mut done: impl FnMut(&JournalReader) -> bool) {
        let mut i = 0;
        while i < self.readers.len() {
            if !self.ready[i] && self.readers[i].idle() && done(&self.readers[i]) {
                self.readers.swap_remove(i);
                self.heads.swap_remove(i);
                self.ready.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Decodes the next entry of every file that has none waiting. `Some((reader, load))`
    /// when `load` of that reader's file must be loaded first; then call again.
    pub fn fill(&mut self) -> Option<(usize, Load)> {
        for i in 0..self.readers.len() {
            if !self.ready[i] {
                match self.readers[i].next(&mut self.heads[i]) {
                    Ok(more) => self.ready[i] = more,
                    Err(load) => return Some((i, load)),
                }
            }
        }
        None
    }

    /// After [`Merge::fill`] returned `None`: the next entry over all files, with the index of
    /// its reader and its file's sequence-number id, or `None` when every file is at its end
    /// for now. The entry stays valid until the next call to `fill`.
    pub fn pop(&mut self) -> Option<Merged<'_>> {
        let mut best: Option<usize> = None;
        for i in (0..self.heads.len()).filter(|&i| self.ready[i]) {
            let better = best.is_none_or(|b| {
                let sa = &self.readers[i].file.header.seqnum_id;
                let sb = &self.readers[b].file.header.seqnum_id;
                compare((sa, &self.heads[i]), (sb, &self.heads[b])) == Ordering::Less
            });
            if better {
                best = Some(i);
            }
        }
        let i = best?;
        self.ready[i] = false;
        Some((i, self.readers[i].file.header.seqnum_id, &self.heads[i]))
    }

    /// [`Merge::fill`] then [`Merge::pop`], loading with `pread` (for tools that read files
    /// one after the other).
    pub fn next_blocking(&mut self) -> Option<Merged<'_>> {
        while let Some((i, load)) = self.fill() {
            self.readers[i].file.load_blocking(load);
        }
        self.pop()
    }
}
