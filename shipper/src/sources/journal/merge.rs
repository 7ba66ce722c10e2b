//! Interleaves the entries of several files in journalctl's order: by sequence number within
//! one sequence-number space, by monotonic time within one boot, else by wall-clock time.

use std::cmp::Ordering;

use super::reader::{Entry, JournalReader};
use super::JournalError;

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

/// A merge over readers, each with its next entry peeked.
pub struct Merge {
    pub readers: Vec<JournalReader>,
    heads: Vec<Option<Entry>>,
    spare: Entry,
}

impl Merge {
    pub fn new(readers: Vec<JournalReader>) -> Merge {
        let heads = readers.iter().map(|_| None).collect();
        Merge { readers, heads, spare: Entry::default() }
    }

    /// Adds a file to the merge.
    pub fn add(&mut self, reader: JournalReader) {
        self.readers.push(reader);
        self.heads.push(None);
    }

    /// Closes the files for which `done` holds and whose next entry is not waiting here.
    pub fn close_if(&mut self, mut done: impl FnMut(&JournalReader) -> bool) {
        let mut i = 0;
        while i < self.readers.len() {
            if self.heads[i].is_none() && done(&self.readers[i]) {
                self.readers.swap_remove(i);
                self.heads.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// The next entry over all files, with the index of its reader and its file's
    /// sequence-number id, or `None` when every file is at its end for now. The entry stays
    /// valid until the next call.
    pub fn next_entry(&mut self) -> Result<Option<Merged<'_>>, JournalError> {
        for (r, head) in self.readers.iter_mut().zip(self.heads.iter_mut()) {
            if head.is_none() {
                let mut e = std::mem::take(&mut self.spare);
                if r.next(&mut e)? {
                    *head = Some(e);
                } else {
                    self.spare = e;
                }
            }
        }
        let mut best: Option<usize> = None;
        for i in 0..self.heads.len() {
            let Some(e) = &self.heads[i] else { continue };
            let better = match best {
                None => true,
                Some(b) => {
                    let be = self.heads[b].as_ref().expect("best has a head");
                    let sa = &self.readers[i].file.header.seqnum_id;
                    let sb = &self.readers[b].file.header.seqnum_id;
                    compare((sa, e), (sb, be)) == Ordering::Less
                }
            };
            if better {
                best = Some(i);
            }
        }
        let Some(i) = best else { return Ok(None) };
        let e = self.heads[i].take().expect("chosen head");
        self.spare = e;
        Ok(Some((i, self.readers[i].file.header.seqnum_id, &self.spare)))
    }
}
