//! Walks one file's entries in order and decodes them into fields.
//!
//! # Operation
//! [`JournalReader::next`] walks the global entry-array chain and decodes the next entry.
//! When a read is not loaded yet it returns the [`Load`] it needs and keeps its place: the
//! chain position only moves past what was read, and a decode interrupted at a field resumes
//! at that field on the next call (with the same `entry`), so no field is decoded twice.

use std::io::Write;

use super::file::{
    JournalError, JournalFile, Load, ObjectType, OBJECT_BYTES_MAX, OBJECT_LZ4, OBJECT_XZ,
    OBJECT_ZSTD,
};

/// Largest decoded entry (all its fields together); fields past it are skipped as corrupt.
pub const ENTRY_BYTES_MAX: u64 = OBJECT_BYTES_MAX;
const _: () = assert!(ENTRY_BYTES_MAX <= u32::MAX as u64, "field offsets are u32");

/// Warnings logged per file before they are only counted.
const WARNINGS_MAX: u64 = 10;

/// One decoded entry. Buffers are reused from entry to entry.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    /// Offset of the ENTRY object in its file.
    pub offset: u64,
    pub seqnum: u64,
    pub realtime: u64,
    pub monotonic: u64,
    pub boot_id: [u8; 16],
    pub xor_hash: u64,
    /// Every field's `NAME=value` payload, back to back.
    pub data: Vec<u8>,
    /// Per field: (start, position of '=', end) in `data`.
    pub fields: Vec<(u32, u32, u32)>,
}

impl Entry {
    /// `(name, value)` of every field, in the entry's order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        (0..self.fields.len()).map(|i| self.field_at(i))
    }

    /// `(name, value)` of the `i`-th field.
    pub fn field_at(&self, i: usize) -> (&[u8], &[u8]) {
        let (s, e, end) = self.fields[i];
        (&self.data[s as usize..e as usize], &self.data[e as usize + 1..end as usize])
    }

    /// Appends a field (for building entries by hand: tests and tools).
    pub fn push_field(&mut self, name: &str, value: &[u8]) {
        let start = self.data.len() as u32;
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(b'=');
        self.data.extend_from_slice(value);
        self.fields.push((start, start + name.len() as u32, self.data.len() as u32));
    }

    /// The first value of field `name`.
    pub fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Where the reader is in the file's global entry-array chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Position {
    /// Offset of the current ENTRY_ARRAY object (0: not started).
    array: u64,
    /// Index of the next item in it.
    index: u64,
    /// Entries returned so far.
    seen: u64,
    /// Offset of the last entry returned; entries only move forward.
    last_entry: u64,
}

pub struct JournalReader {
    pub file: JournalFile,
    pos: Position,
    /// Objects skipped as corrupt (bad offsets, types, sizes, compression, payloads).
    pub corrupt: u64,
    /// The chain is broken beyond repair (it went backwards): nothing more is read.
    pub broken: bool,
    unpacked: Vec<u8>,
    /// DATA offsets of the entry being decoded (reused from entry to entry).
    items: Vec<u64>,
    /// An entry whose decode waits for a read: its offset, and the next of its `items` to
    /// decode (`None`: the ENTRY object itself is not read yet).
    resume: Option<(u64, Option<usize>)>,
}

impl JournalReader {
    pub fn new(file: JournalFile) -> JournalReader {
        JournalReader {
            file,
            pos: Position::default(),
            corrupt: 0,
            broken: false,
            unpacked: Vec::new(),
            items: Vec::new(),
            resume: None,
        }
    }

    /// No decode is waiting for a read.
    pub fn idle(&self) -> bool {
        self.resume.is_none()
    }

    fn warn(&mut self, e: &JournalError) {
        self.corrupt += 1;
        if self.corrupt <= WARNINGS_MAX {
            tracing::warn!("skipping corrupt journal object: {e}");
        } else if self.corrupt == WARNINGS_MAX + 1 {
            tracing::warn!(path = %self.file.path.display(), "more corrupt objects in this file; counting them silently");
        }
    }

    /// The next entry's offset, or `None` at the current end of the file.
    fn next_offset(&mut self) -> Result<Option<u64>, JournalError> {
        let compact = self.file.header.compact();
        let item_bytes = if compact { 4 } else { 8 };
        loop {
            if self.pos.seen >= self.file.header.n_entries {
                return Ok(None);
            }
            if self.pos.array == 0 {
                let first = self.file.header.entry_array_offset;
                if first == 0 {
                    return Ok(None);
                }
                self.pos.array = first;
                self.pos.index = 0;
            }
            let array = self.pos.array;
            let (_, size) = self.file.object_header(array, ObjectType::EntryArray)?;
            let items = size.saturating_sub(24) / item_bytes;
            if self.pos.index < items {
                let at = array + 24 + self.pos.index * item_bytes;
                let b = self.file.read(at, item_bytes)?;
                let offset = if compact {
                    u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes")))
                } else {
                    u64::from_le_bytes(b.try_into().expect("8 bytes"))
                };
                if offset == 0 {
                    // Unused tail of the last array: nothing more yet.
                    return Ok(None);
                }
                self.pos.index += 1;
                return Ok(Some(offset));
            }
            let b = self.file.read(array + 16, 8)?;
            let next = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            if next == 0 {
                return Ok(None);
            }
            if next <= array {
                self.broken = true;
                return Err(self
                    .file
                    .error(array, format!("entry array chain goes back to offset {next}")));
            }
            self.pos.array = next;
            self.pos.index = 0;
        }
    }

    /// Moves past every entry now in the file without decoding them (for `since = "now"`).
    pub fn skip_to_end(&mut self) -> Result<(), Load> {
        loop {
            match self.next_offset() {
                Ok(Some(offset)) => {
                    self.pos.seen += 1;
                    self.pos.last_entry = self.pos.last_entry.max(offset);
                }
                Ok(None) => return Ok(()),
                Err(JournalError::NeedsRead(load)) => return Err(load),
                Err(e) => {
                    self.broken = true;
                    self.warn(&e);
                    return Ok(());
                }
            }
        }
    }

    /// Entries the header counts that this reader has not returned yet.
    pub fn behind(&self) -> u64 {
        self.file.header.n_entries.saturating_sub(self.pos.seen)
    }

    /// Decodes the next entry into `entry`: `Ok(false)` at the current end of the file,
    /// `Err(load)` when `load` must be loaded first (then call again with the same `entry`).
    pub fn next(&mut self, entry: &mut Entry) -> Result<bool, Load> {
        loop {
            let (offset, from) = match self.resume.take() {
                Some(resume) => resume,
                None => {
                    if self.broken {
                        return Ok(false);
                    }
                    let offset = match self.next_offset() {
                        Ok(Some(o)) => o,
                        Ok(None) => return Ok(false),
                        Err(JournalError::NeedsRead(load)) => return Err(load),
                        Err(e) => {
                            // A chain we cannot follow ends this file; what came before stands.
                            self.broken = true;
                            self.warn(&e);
                            return Ok(false);
                        }
                    };
                    self.pos.seen += 1;
                    if offset <= self.pos.last_entry {
                        let e = self.file.error(offset, "entry array points backwards");
                        self.warn(&e);
                        continue;
                    }
                    self.pos.last_entry = offset;
                    (offset, None)
                }
            };
            match self.decode(offset, from, entry) {
                Ok(()) => return Ok(true),
                Err(JournalError::NeedsRead(load)) => return Err(load),
                Err(e) => self.warn(&e),
            }
        }
    }

    /// Like [`JournalReader::next`], loading with `pread`.
    pub fn next_blocking(&mut self, entry: &mut Entry) -> bool {
        loop {
            match self.next(entry) {
                Ok(more) => return more,
                Err(load) => self.file.load_blocking(load),
            }
        }
    }

    /// Decodes the entry at `offset`, from its `from`-th field (`None`: from the ENTRY object).
    /// On a [`JournalError::NeedsRead`] the place to resume is kept.
    fn decode(
        &mut self,
        offset: u64,
        from: Option<usize>,
        entry: &mut Entry,
    ) -> Result<(), JournalError> {
        let first = match from {
            Some(k) => k,
            None => match self.entry_object(offset, entry) {
                Ok(()) => 0,
                Err(e) => {
                    if matches!(e, JournalError::NeedsRead(_)) {
                        self.resume = Some((offset, None));
                    }
                    return Err(e);
                }
            },
        };
        for k in first..self.items.len() {
            match self.field(self.items[k], entry) {
                Ok(()) => {}
                Err(JournalError::NeedsRead(load)) => {
                    self.resume = Some((offset, Some(k)));
                    return Err(JournalError::NeedsRead(load));
                }
                Err(e) => self.warn(&e),
            }
        }
        Ok(())
    }

    /// Reads the ENTRY object at `offset` into `entry`'s fixed part and `self.items`.
    fn entry_object(&mut self, offset: u64, entry: &mut Entry) -> Result<(), JournalError> {
        let compact = self.file.header.compact();
        let (_, bytes) = self.file.object(offset, ObjectType::Entry)?;
        if bytes.len() < 64 {
            return Err(self.file.error(offset, "ENTRY object shorter than its fixed part"));
        }
        let le = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        entry.offset = offset;
        entry.seqnum = le(16);
        entry.realtime = le(24);
        entry.monotonic = le(32);
        entry.boot_id = bytes[40..56].try_into().expect("16 bytes");
        entry.xor_hash = le(56);
        let item_bytes = if compact { 4 } else { 16 };
        self.items.clear();
        self.items.extend(bytes[64..].chunks_exact(item_bytes).map(|c| {
            if compact {
                u64::from(u32::from_le_bytes(c[..4].try_into().expect("4")))
            } else {
                u64::from_le_bytes(c[..8].try_into().expect("8"))
            }
        }));
        entry.data.clear();
        entry.fields.clear();
        Ok(())
    }

    /// Appends the DATA object at `offset` to `entry`.
    fn field(&mut self, offset: u64, entry: &mut Entry) -> Result<(), JournalError> {
        let payload_at = if self.file.header.compact() { 72 } else { 64 };
        let start = entry.data.len();
        let JournalReader { file, unpacked, .. } = self;
        let (flags, bytes) = file.object(offset, ObjectType::Data)?;
        if bytes.len() < payload_at {
            return Err(file.error(offset, "DATA object shorter than its fixed part"));
        }
        let compression = flags & (OBJECT_XZ | OBJECT_LZ4 | OBJECT_ZSTD);
        let payload = if compression == 0 {
            Ok(&bytes[payload_at..])
        } else {
            decompress(compression, &bytes[payload_at..], unpacked).map(|()| &unpacked[..])
        };
        let payload = match payload {
            Ok(p) => p,
            Err(what) => return Err(file.error(offset, what)),
        };
        if (start + payload.len()) as u64 > ENTRY_BYTES_MAX {
            return Err(file.error(offset, format!("entry over {ENTRY_BYTES_MAX} bytes")));
        }
        let Some(eq) = name_end(payload) else {
            let head = payload[..payload.len().min(FIELD_NAME_BYTES_MAX + 1)].escape_ascii();
            let why = format!("DATA payload has no valid field name and '=': {head}");
            return Err(file.error(offset, why));
        };
        entry.data.extend_from_slice(payload);
        let end = entry.data.len();
        entry.fields.push((start as u32, (start + eq) as u32, end as u32));
        Ok(())
    }
}

/// The longest field name journald writes.
const FIELD_NAME_BYTES_MAX: usize = 64;

/// journald's rule for field names: 1 to [`FIELD_NAME_BYTES_MAX`] of `A-Z`, `0-9` and `_`,
/// not starting with a digit. A name breaking it can only come from corruption.
pub fn field_name_valid(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= FIELD_NAME_BYTES_MAX
        && !name[0].is_ascii_digit()
        && name.iter().all(|&b| NAME_BYTE[usize::from(b)])
}

/// The bytes [`field_name_valid`] allows in a name.
const NAME_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_uppercase() || (b as u8).is_ascii_digit() || b == b'_' as usize;
        b += 1;
    }
    t
};

/// Where the `=` after a valid field name ([`field_name_valid`]) is in a DATA payload
/// (`NAME=value`), in one pass over the name.
fn name_end(payload: &[u8]) -> Option<usize> {
    if payload.first()?.is_ascii_digit() {
        return None;
    }
    for (i, &b) in payload.iter().enumerate().take(FIELD_NAME_BYTES_MAX + 1) {
        if b == b'=' {
            return (i > 0).then_some(i);
        }
        if !NAME_BYTE[usize::from(b)] {
            return None;
        }
    }
    None
}

thread_local! {
    /// One zstd context per thread, reused for every field (creating one costs more than
    /// decompressing a typical field).
    static DCTX: std::cell::RefCell<zstd::zstd_safe::DCtx<'static>> =
        std::cell::RefCell::new(zstd::zstd_safe::DCtx::create());
}

/// Decompresses a DATA payload into `out` (reusing its allocation), bounded by
/// [`OBJECT_BYTES_MAX`].
pub fn decompress(kind: u8, src: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    match kind {
        OBJECT_ZSTD => {
            let size = zstd::zstd_safe::get_frame_content_size(src)
                .map_err(|_| "zstd: not a zstd frame".to_string())?;
            match size {
                Some(n) if n <= OBJECT_BYTES_MAX => {
                    out.reserve(n as usize);
                    DCTX.with_borrow_mut(|d| d.decompress(out, src)).map_err(|code| {
                        format!("zstd: {}", zstd::zstd_safe::get_error_name(code))
                    })?;
                    if out.len() as u64 != n {
                        return Err("zstd: size differs from the frame's".into());
                    }
                    Ok(())
                }
                Some(n) => Err(format!("zstd: {n} bytes is over the limit")),
                None => {
                    let mut dec =
                        zstd::stream::read::Decoder::new(src).map_err(|e| format!("zstd: {e}"))?;
                    copy_bounded(&mut dec, out).map_err(|e| format!("zstd: {e}"))
                }
            }
        }
        OBJECT_LZ4 => {
            if src.len() < 8 {
                return Err("lz4: payload shorter than its size prefix".into());
            }
            let n = u64::from_le_bytes(src[..8].try_into().expect("8 bytes"));
            if n > OBJECT_BYTES_MAX {
                return Err(format!("lz4: {n} bytes is over the limit"));
            }
            out.resize(n as usize, 0);
            let got = lz4_flex::block::decompress_into(&src[8..], out)
                .map_err(|e| format!("lz4: {e}"))?;
            if got != out.len() {
                return Err(format!("lz4: decompressed {got} bytes, expected {n}"));
            }
            Ok(())
        }
        OBJECT_XZ => {
            let mut w = Bounded { out, max: OBJECT_BYTES_MAX as usize };
            lzma_rs::xz_decompress(&mut std::io::BufReader::new(src), &mut w)
                .map_err(|e| format!("xz: {e:?}"))
        }
        other => Err(format!("several compression flags at once ({other:#x})")),
    }
}

fn copy_bounded(r: &mut impl std::io::Read, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut w = Bounded { out, max: OBJECT_BYTES_MAX as usize };
    std::io::copy(r, &mut w).map(|_| ())
}

/// A writer that refuses to grow past `max`.
struct Bounded<'a> {
    out: &'a mut Vec<u8>,
    max: usize,
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            return Err(std::io::Error::other("decompressed data over the limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_end_finds_the_equals_sign_after_exactly_the_names_field_name_valid_allows() {
        let long = format!("{}=v", "A".repeat(64));
        let too_long = format!("{}=v", "A".repeat(65));
        let cases: [&[u8]; 12] = [
            b"MESSAGE=hi",
            b"_PID=1",
            b"A=",
            b"A1_=x=y",
            b"=x",
            b"1A=x",
            b"a=x",
            b"MESSAGE",
            b"MES SAGE=x",
            b"",
            long.as_bytes(),
            too_long.as_bytes(),
        ];
        for p in cases {
            let reference =
                p.iter().position(|&b| b == b'=').filter(|&i| field_name_valid(&p[..i]));
            assert_eq!(name_end(p), reference, "{:?}", String::from_utf8_lossy(p));
        }
        assert_eq!(name_end(long.as_bytes()), Some(64));
        assert_eq!(name_end(b"A1_=x=y"), Some(3));
    }
}
