//! Bounded, checked access to one journal file: header, objects, block cache.
//!
//! # Operation
//! Decoding never waits on the disk itself. A read the block cache cannot serve fails with
//! [`JournalError::NeedsRead`] naming the bytes wanted; whoever drives the reader loads them
//! (through io_uring in the source's worker, [`JournalFile::load_blocking`] in the command
//! line tools), hands them over with [`JournalFile::land`], and calls the reader again, which
//! resumes where it stopped (see `reader.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub const SIGNATURE: &[u8; 8] = b"LPKSHHRH";
/// Largest object accepted (journald's own limit for a field is far below this).
pub const OBJECT_BYTES_MAX: u64 = 256 << 20;
/// Smallest header any journald version wrote (systemd 187 and later).
const HEADER_BYTES_MIN: u64 = 208;
const OBJECT_HEADER_BYTES: u64 = 16;

pub const INCOMPAT_XZ: u32 = 1;
pub const INCOMPAT_LZ4: u32 = 2;
pub const INCOMPAT_KEYED_HASH: u32 = 4;
pub const INCOMPAT_ZSTD: u32 = 8;
pub const INCOMPAT_COMPACT: u32 = 16;
const INCOMPAT_KNOWN: u32 = 31;

pub const OBJECT_XZ: u8 = 1;
pub const OBJECT_LZ4: u8 = 2;
pub const OBJECT_ZSTD: u8 = 4;

/// Object types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectType {
    Data = 1,
    Field = 2,
    Entry = 3,
    DataHashTable = 4,
    FieldHashTable = 5,
    EntryArray = 6,
    Tag = 7,
}

/// What can be wrong with a journal file, always with the file and offset.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a journal file (signature {found:02x?})")]
    Signature { path: PathBuf, found: [u8; 8] },
    #[error("{path}: unsupported incompatible flags {flags:#x}")]
    Incompatible { path: PathBuf, flags: u32 },
    #[error("{path}: header: {what}")]
    Header { path: PathBuf, what: String },
    #[error("{path}: object at offset {offset}: {what}")]
    Object { path: PathBuf, offset: u64, what: String },
    /// Not an error: decoding needs these bytes loaded first (see the module's Operation).
    #[error("{} bytes at offset {} are not loaded yet", .0.len, .0.offset)]
    NeedsRead(Load),
}

/// Bytes of a journal file to load before decoding can go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub offset: u64,
    pub len: u64,
}

/// The fields of the header the reader uses.
#[derive(Clone, Debug)]
pub struct Header {
    pub incompatible_flags: u32,
    pub state: u8,
    pub file_id: [u8; 16],
    pub machine_id: [u8; 16],
    pub seqnum_id: [u8; 16],
    pub header_size: u64,
    pub arena_size: u64,
    pub tail_object_offset: u64,
    pub n_entries: u64,
    pub tail_entry_seqnum: u64,
    pub head_entry_seqnum: u64,
    pub entry_array_offset: u64,
    pub head_entry_realtime: u64,
    pub tail_entry_realtime: u64,
}

/// Header state of a file journald has finished with.
pub const STATE_ARCHIVED: u8 = 2;

impl Header {
    pub fn compact(&self) -> bool {
        self.incompatible_flags & INCOMPAT_COMPACT != 0
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A read cache of fixed-size blocks, bounded in count, evicting the least recently used.
pub struct BlockCache {
    /// (block index, last use, bytes).
    blocks: Vec<(u64, u64, Box<[u8]>)>,
    tick: u64,
    max: usize,
    /// Slot of the last block used: most reads fall in the same block as the one before.
    last: usize,
}

/// Bytes of the header read to parse it (the largest header any journald writes fits).
pub const HEADER_READ_BYTES: usize = 272;

/// Bytes per cached block.
pub const BLOCK_BYTES: u64 = 64 << 10;

impl BlockCache {
    pub fn new(max_blocks: usize) -> BlockCache {
        BlockCache { blocks: Vec::new(), tick: 0, max: max_blocks.max(2), last: 0 }
    }

    /// The slot holding block `index` with at least `len` bytes, if cached.
    fn find(&mut self, index: u64, len: u64) -> Option<usize> {
        self.tick += 1;
        let fits = |b: &(u64, u64, Box<[u8]>)| b.0 == index && b.2.len() as u64 >= len;
        let cached = match self.blocks.get(self.last) {
            Some(b) if fits(b) => Some(self.last),
            _ => self.blocks.iter().position(fits),
        };
        if let Some(i) = cached {
            self.blocks[i].1 = self.tick;
            self.last = i;
        }
        cached
    }

    /// Caches `data` as block `index`, evicting the least recently used; returns its slot.
    fn insert(&mut self, index: u64, data: Box<[u8]>) -> usize {
        let slot = if self.blocks.len() < self.max {
            self.blocks.push((index, self.tick, data));
            self.blocks.len() - 1
        } else {
            let lru = (0..self.blocks.len()).min_by_key(|&i| self.blocks[i].1).expect("not empty");
            self.blocks[lru] = (index, self.tick, data);
            lru
        };
        self.last = slot;
        slot
    }

    /// Forgets blocks reaching past `size` (the file shrank).
    pub fn drop_beyond(&mut self, size: u64) {
        self.blocks.retain(|b| b.0 * BLOCK_BYTES + b.2.len() as u64 <= size);
    }

    /// Forgets blocks cached shorter than a full block (the file's tail, before it grew).
    pub fn drop_short(&mut self) {
        self.blocks.retain(|b| b.2.len() as u64 == BLOCK_BYTES);
    }

    /// Forgets every block (after the file grew or was replaced).
    pub fn clear(&mut self) {
        self.blocks.clear();
    }
}

/// One open journal file.
pub struct JournalFile {
    pub path: PathBuf,
    file: File,
    /// File size when last checked; no read goes past it.
    pub size: u64,
    pub header: Header,
    cache: BlockCache,
    /// Bytes of a read spanning blocks, and where they are from.
    scratch: Vec<u8>,
    scratch_at: Option<Load>,
    /// The last load handed over, not yet taken by the read that asked for it.
    landed: Option<(Load, std::io::Result<Vec<u8>>)>,
}

impl JournalFile {
    pub fn open(path: &Path) -> Result<JournalFile, JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let size = meta.len();
        let mut head = [0u8; HEADER_READ_BYTES];
        let n = read_up_to(&file, &mut head, 0).map_err(io)?;
        let header = parse_header(path, &head[..n], size)?;
        Ok(JournalFile {
            path: path.to_path_buf(),
            file,
            size,
            header,
            cache: BlockCache::new(64),
            scratch: Vec::new(),
            scratch_at: None,
            landed: None,
        })
    }

    /// The open file (for another handle on it: `try_clone`).
    pub fn std(&self) -> &File {
        &self.file
    }

    /// Takes a fresh copy of the header (its first [`HEADER_READ_BYTES`] bytes, or all of a
    /// shorter file) and the file's size: the file may have grown. Returns true if it changed.
    pub fn refresh(&mut self, head: &[u8], size: u64) -> Result<bool, JournalError> {
        let header = parse_header(&self.path, head, size)?;
        let changed = size != self.size || header.n_entries != self.header.n_entries;
        if changed {
            // The last block may have been cached short, or rewritten (hash chains, arrays).
            self.cache.clear();
            self.scratch_at = None;
        }
        self.size = size;
        self.header = header;
        Ok(changed)
    }

    /// Hands over the bytes (or the failure) of `load`, asked for by a [`NeedsRead`].
    ///
    /// [`NeedsRead`]: JournalError::NeedsRead
    pub fn land(&mut self, load: Load, bytes: std::io::Result<Vec<u8>>) {
        self.landed = Some((load, bytes));
    }

    /// Loads `load` with `pread` (for tools that read files one after the other).
    pub fn load_blocking(&mut self, load: Load) {
        let mut buf = vec![0u8; load.len as usize];
        let result = self.file.read_exact_at(&mut buf, load.offset).map(|()| buf);
        self.land(load, result);
    }

    pub fn error(&self, offset: u64, what: impl Into<String>) -> JournalError {
        JournalError::Object { path: self.path.clone(), offset, what: what.into() }
    }

    /// Reads `len` bytes at `offset`, checked against the file size. The size changes under a
    /// reader of a live file: it grows as journald writes, and shrinks when journald trims the
    /// preallocated tail as it archives the file; a read that meets either looks again once.
    pub fn read(&mut self, offset: u64, len: u64) -> Result<&[u8], JournalError> {
        if let Some(start) = self.in_last_block(offset, len) {
            return Ok(&self.cache.blocks[self.cache.last].2[start..start + len as usize]);
        }
        let past_end = offset.checked_add(len).is_none_or(|e| e > self.size);
        let fresh = if past_end { self.restat()? } else { false };
        let block = match self.read_once(offset, len) {
            Err(JournalError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof
                    && !fresh
                    && self.restat()? =>
            {
                self.read_once(offset, len)?
            }
            result => result?,
        };
        Ok(match block {
            Some(i) => {
                let start = (offset % BLOCK_BYTES) as usize;
                &self.cache.blocks[i].2[start..start + len as usize]
            }
            None => &self.scratch[..len as usize],
        })
    }

    /// Where `len` bytes at `offset` start in the block used last, when they lie in it and in
    /// the file (most reads do: an object's header, then the object): [`JournalFile::read`]'s
    /// fast path, with no search and no bookkeeping. A block cached short (the file's tail)
    /// is dropped whenever the size changes, so what it holds is the file as it is now.
    fn in_last_block(&self, offset: u64, len: u64) -> Option<usize> {
        let (index, _, data) = self.cache.blocks.get(self.cache.last)?;
        let start = offset.checked_sub(index * BLOCK_BYTES)?;
        let end = start.checked_add(len)?;
        let inside = len > 0 && end <= data.len() as u64 && offset + len <= self.size;
        inside.then_some(start as usize)
    }

    /// Re-reads the file size; drops cached blocks it no longer matches. True if it changed.
    fn restat(&mut self) -> Result<bool, JournalError> {
        let size = self
            .file
            .metadata()
            .map_err(|source| JournalError::Io { path: self.path.clone(), source })?
            .len();
        if size == self.size {
            return Ok(false);
        }
        self.size = size;
        self.cache.drop_short();
        self.cache.drop_beyond(size);
        self.scratch_at = None;
        Ok(true)
    }

    /// Finds `len` bytes at `offset`: in a cached block (its slot is returned) when they lie in
    /// one block, else in the scratch buffer; loaded first if they were handed over.
    fn read_once(&mut self, offset: u64, len: u64) -> Result<Option<usize>, JournalError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return Err(self.error(
                offset,
                format!("{len} bytes run past the end of the file ({})", self.size),
            ));
        };
        let (first, last) = (offset / BLOCK_BYTES, (end.max(1) - 1) / BLOCK_BYTES);
        if first == last && len > 0 {
            let block_len = BLOCK_BYTES.min(self.size - first * BLOCK_BYTES);
            if let Some(slot) = self.cache.find(first, block_len) {
                return Ok(Some(slot));
            }
            let data = self.take_landed(Load { offset: first * BLOCK_BYTES, len: block_len })?;
            return Ok(Some(self.cache.insert(first, data.into_boxed_slice())));
        }
        let want = Load { offset, len };
        if self.scratch_at != Some(want) {
            self.scratch = self.take_landed(want)?;
            self.scratch_at = Some(want);
        }
        Ok(None)
    }

    /// The bytes of `want` if they were handed over, else a [`JournalError::NeedsRead`].
    fn take_landed(&mut self, want: Load) -> Result<Vec<u8>, JournalError> {
        match self.landed.take() {
            Some((load, result)) if load == want => {
                result.map_err(|source| JournalError::Io { path: self.path.clone(), source })
            }
            _ => Err(JournalError::NeedsRead(want)),
        }
    }

    /// Checks the object header at `offset` and returns `(type, flags, size)`.
    pub fn object_header(
        &mut self,
        offset: u64,
        want: ObjectType,
    ) -> Result<(u8, u64), JournalError> {
        if offset % 8 != 0 || offset < self.header.header_size {
            return Err(self.error(offset, "offset is not an aligned offset inside the arena"));
        }
        let h = self.read(offset, OBJECT_HEADER_BYTES)?;
        let (kind, flags, size) = (h[0], h[1], le64(h, 8));
        if kind != want as u8 {
            return Err(
                self.error(offset, format!("expected a {want:?} object, found type {kind}"))
            );
        }
        if !(OBJECT_HEADER_BYTES..=OBJECT_BYTES_MAX).contains(&size) {
            return Err(self.error(offset, format!("object size {size} out of bounds")));
        }
        Ok((flags, size))
    }

    /// Reads a whole object of type `want` at `offset`; returns its flags and bytes.
    pub fn object(&mut self, offset: u64, want: ObjectType) -> Result<(u8, &[u8]), JournalError> {
        let (flags, size) = self.object_header(offset, want)?;
        let bytes = self.read(offset, size)?;
        Ok((flags, bytes))
    }
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn parse_header(path: &Path, b: &[u8], size: u64) -> Result<Header, JournalError> {
    let bad = |what: String| JournalError::Header { path: path.to_path_buf(), what };
    if b.len() < HEADER_BYTES_MIN as usize {
        return Err(bad(format!("file of {size} bytes is shorter than a journal header")));
    }
    let sig: [u8; 8] = b[..8].try_into().expect("8 bytes");
    if &sig != SIGNATURE {
        return Err(JournalError::Signature { path: path.to_path_buf(), found: sig });
    }
    let incompatible_flags = le32(b, 12);
    if incompatible_flags & !INCOMPAT_KNOWN != 0 {
        return Err(JournalError::Incompatible {
            path: path.to_path_buf(),
            flags: incompatible_flags,
        });
    }
    let id = |at: usize| -> [u8; 16] { b[at..at + 16].try_into().expect("16 bytes") };
    let h = Header {
        incompatible_flags,
        state: b[16],
        file_id: id(24),
        machine_id: id(40),
        seqnum_id: id(72),
        header_size: le64(b, 88),
        arena_size: le64(b, 96),
        tail_object_offset: le64(b, 136),
        n_entries: le64(b, 152),
        tail_entry_seqnum: le64(b, 160),
        head_entry_seqnum: le64(b, 168),
        entry_array_offset: le64(b, 176),
        head_entry_realtime: le64(b, 184),
        tail_entry_realtime: le64(b, 192),
    };
    if h.header_size < HEADER_BYTES_MIN || h.header_size % 8 != 0 || h.header_size > size {
        return Err(bad(format!("header size {} is not plausible", h.header_size)));
    }
    Ok(h)
}
