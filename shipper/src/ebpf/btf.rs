//! Where a field sits in a kernel struct, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the programs that follow kernel pointers themselves
//! (`sock_send_length`: `unix_sk(sk)->peer`, then the peer's cookie); and the names of an
//! enum's values (the kernel's drop reasons, `reasons`). Struct layouts change
//! with the kernel version and its config, so no offset is compiled in. aya's own `Btf` does
//! not expose members, hence this small reader.
//!
//! # Design constraints
//! - Runs once at start. The file (5 MiB on 6.18) is mapped, not read ([`Blob`]): the kernel
//!   (6.16+) maps its own read-only pages of `/sys/kernel/btf/vmlinux`, which add nothing to
//!   the process's RSS; older kernels refuse, and the file is read into memory instead.
//!   [`Btf`] borrows the bytes and keeps an index of type positions (4 bytes per type, about
//!   130,000 types) until the offsets are found.
//! - Refuses what it cannot read exactly: a member that is a bitfield or not byte-aligned,
//!   an unknown type kind (whose size it cannot skip), a truncated section.
//!
//! # Format
//! As in the kernel's Documentation/bpf/btf.rst (native byte order, all `u32` unless noted):
//! ```text
//! header   { magic: u16 = 0xeb9f, version: u8, flags: u8, hdr_len,
//!            type_off, type_len, str_off, str_len }          offsets from the header's end
//! type     { name_off, info: vlen (bits 0-15) | kind (24-28) | kind_flag (31), size_or_type }
//!          then per kind: INT, VAR, DECL_TAG 4 bytes; ARRAY { type, index_type, nelems };
//!          STRUCT, UNION vlen x member { name_off, type, offset }; ENUM, FUNC_PROTO vlen x 8;
//!          DATASEC, ENUM64 vlen x 12; the others nothing
//! member   offset in bits; with the struct's kind_flag: bitfield size << 24 | bit offset
//! strings  NUL-terminated, name_off indexes them; type ids count from 1 (0 is void)
//! ```
//!
//! # Operation
//! [`Btf::member`] finds a struct by name, then each name of the path in turn, descending
//! into anonymous struct and union members as C does, and through typedefs and qualifiers
//! from one step to the next; the byte offsets add up. [`Btf::enumerators`] lists a 32-bit
//! enum's values with their names.

use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const HEADER_BYTES: usize = 24;
const TYPE_BYTES: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why an offset could not be found. The message names the file and what was looked for.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The file is not BTF this reader understands (bad magic, truncated, unknown kind).
    #[error("not readable as BTF: {0}")]
    Format(String),
    /// No struct of that name (the kernel lacks it, or has it under another name).
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    /// The struct has no such member, or the member cannot be read as a whole value.
    #[error("struct {0}: {1}")]
    Member(String, String),
}

/// A member found: where it starts in the outer struct, and how many bytes it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset_bytes: u32,
    pub size_bytes: u32,
}

/// One type's header, as decoded from the type section.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: u32,
    size_or_type: u32,
    /// Byte position of the kind-specific data that follows the header.
    data: usize,
}

/// The running kernel's BTF.
pub const SYS_FS: &str = "/sys/kernel/btf/vmlinux";

/// The bytes of a BTF file: mapped read-only and private where the kernel allows it, read
/// into memory otherwise. Either way they do not change while the `Blob` lives.
pub enum Blob {
    Mapped { at: std::ptr::NonNull<u8>, len: usize },
    Read(Vec<u8>),
}

impl Blob {
    pub fn open(path: &Path) -> Result<Blob, BtfError> {
        let error = |error| BtfError::Read { path: path.display().to_string(), error };
        let file = std::fs::File::open(path).map_err(error)?;
        let len = file.metadata().map_err(error)?.len() as usize;
        if len > 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: a new private read-only mapping of an open file; nothing else refers
            // to it, and it is unmapped once, in `drop`.
            let at = unsafe {
                let flags = libc::MAP_PRIVATE;
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, file.as_raw_fd(), 0)
            };
            if at != libc::MAP_FAILED {
                if let Some(at) = std::ptr::NonNull::new(at.cast::<u8>()) {
                    return Ok(Blob::Mapped { at, len });
                }
            }
        }
        // Kernels before 6.16 cannot map it (EACCES, ENODEV): read it, a few MiB for a moment.
        std::fs::read(path).map(Blob::Read).map_err(error)
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: `len` bytes mapped readable at `at` until `drop`, never written.
            Blob::Mapped { at, len } => unsafe { std::slice::from_raw_parts(at.as_ptr(), *len) },
            Blob::Read(bytes) => bytes,
        }
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        if let Blob::Mapped { at, len } = self {
            // SAFETY: the mapping made in `open`, unmapped only here; no slice of it outlives
            // `self` (`deref` borrows it).
            unsafe { libc::munmap(at.as_ptr().cast(), *len) };
        }
    }
}

/// The type and string sections of one BTF blob, with every type's position indexed.
pub struct Btf<'a> {
    bytes: &'a [u8],
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
    /// Position of type id `i + 1` in `bytes` (the blob is checked to be under 4 GiB).
    index: Vec<u32>,
}

impl<'a> Btf<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let format = |what: &str| BtfError::Format(what.to_string());
        if bytes.len() < HEADER_BYTES || u16::from_ne_bytes([bytes[0], bytes[1]]) != MAGIC {
            return Err(format("no BTF header (magic 0xeb9f, native byte order)"));
        }
        if u32::try_from(bytes.len()).is_err() {
            return Err(format("larger than 4 GiB"));
        }
        let word = |at: usize| u32_at(bytes, at).map(|v| v as usize);
        let hdr_len = word(4).ok_or_else(|| format("header"))?;
        let section = |off: usize, len: usize| -> Result<std::ops::Range<usize>, BtfError> {
            let start = hdr_len + word(off).ok_or_else(|| format("header"))?;
            let end = start + word(len).ok_or_else(|| format("header"))?;
            if hdr_len < HEADER_BYTES || end > bytes.len() {
                return Err(format("a section lies beyond the end of the file"));
            }
            Ok(start..end)
        };
        let (types, strings) = (section(8, 12)?, section(16, 20)?);
        let mut btf = Btf { bytes, types, strings, index: Vec::new() };
        btf.index = btf.index_types()?;
        Ok(btf)
    }

    /// The position of every type, in id order.
    fn index_types(&self) -> Result<Vec<u32>, BtfError> {
        let mut index = Vec::new();
        let mut at = self.types.start;
        while at < self.types.end {
            index.push(at as u32);
            let t = self.type_at(at)?;
            at = t.data + data_bytes(&t)?;
        }
        if at != self.types.end {
            return Err(BtfError::Format("the last type overruns the type section".into()));
        }
        Ok(index)
    }

    fn type_at(&self, at: usize) -> Result<Type, BtfError> {
        let word = |i: usize| {
            u32_at(&self.bytes[..self.types.end], at + 4 * i)
                .ok_or_else(|| BtfError::Format(format!("type at byte {at} is truncated")))
        };
        let info = word(1)?;
        Ok(Type {
            name_off: word(0)?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: info & 0xffff,
            size_or_type: word(2)?,
            data: at + TYPE_BYTES,
        })
    }

    fn type_by_id(&self, id: u32) -> Result<Type, BtfError> {
        let at = (id as usize)
            .checked_sub(1)
            .and_then(|i| self.index.get(i))
            .ok_or_else(|| BtfError::Format(format!("type id {id} out of range")))?;
        self.type_at(*at as usize)
    }

    fn name(&self, name_off: u32) -> &[u8] {
        let strings = &self.bytes[self.strings.clone()];
        let rest = strings.get(name_off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The member at `path` of struct `outer`: `member("sock", &["__sk_common", "skc_family"])`.
    pub fn member(&self, outer: &str, path: &[&str]) -> Result<Member, BtfError> {
        let fail = |why: String| BtfError::Member(outer.to_string(), why);
        let mut id = self.struct_id(outer)?;
        let mut offset_bits = 0u64;
        for name in path {
            let t = self.type_by_id(self.skip_qualifiers(id)?)?;
            let (bits, member_id) = self
                .find_member(&t, name.as_bytes())?
                .ok_or_else(|| fail(format!("no member {name} (path {path:?})")))?;
            offset_bits += bits;
            id = member_id;
        }
        if offset_bits % 8 != 0 {
            return Err(fail(format!("{path:?} is not byte-aligned (bit {offset_bits})")));
        }
        let offset_bytes = u32::try_from(offset_bits / 8).map_err(|e| fail(e.to_string()))?;
        Ok(Member { offset_bytes, size_bytes: self.size(id)? })
    }

    /// The id of the first struct named `name` (vmlinux BTF is deduplicated: one per name).
    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.id_of(KIND_STRUCT, name).ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// The id of the first type of `kind` named `name`.
    fn id_of(&self, kind: u32, name: &str) -> Option<u32> {
        self.index.iter().enumerate().find_map(|(i, &at)| {
            let t = self.type_at(at as usize).ok()?;
            (t.kind == kind && self.name(t.name_off) == name.as_bytes()).then_some(i as u32 + 1)
        })
    }

    /// Every `(value, name)` of the 32-bit enum `name`, in declaration order; `None` when
    /// there is no such enum.
    pub fn enumerators(&self, name: &str) -> Option<Vec<(u32, String)>> {
        let t = self.type_by_id(self.id_of(KIND_ENUM, name)?).ok()?;
        let mut out = Vec::with_capacity(t.vlen as usize);
        for i in 0..t.vlen as usize {
            let at = t.data + 8 * i;
            let (name_off, value) = (u32_at(self.bytes, at)?, u32_at(self.bytes, at + 4)?);
            out.push((value, String::from_utf8_lossy(self.name(name_off)).into_owned()));
        }
        Some(out)
    }

    /// `(bit offset, type id)` of member `name` of struct or union `t`, looking inside its
    /// anonymous struct and union members too.
    fn find_member(&self, t: &Type, name: &[u8]) -> Result<Option<(u64, u32)>, BtfError> {
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return Err(BtfError::Format(format!("kind {} has no members", t.kind)));
        }
        for i in 0..t.vlen as usize {
            let at = t.data + 12 * i;
            let word = |k: usize| u32_at(self.bytes, at + 4 * k).unwrap_or_default();
            let (name_off, type_id, raw) = (word(0), word(1), word(2));
            let (bitfield_bits, bits) =
                if t.kind_flag { (raw >> 24, raw & 0xff_ffff) } else { (0, raw) };
            if name_off == 0 {
                // An anonymous struct or union (or unnamed bitfield padding, skipped).
                let inner = self.type_by_id(self.skip_qualifiers(type_id)?)?;
                if inner.kind != KIND_STRUCT && inner.kind != KIND_UNION {
                    continue;
                }
                if let Some((b, id)) = self.find_member(&inner, name)? {
                    return Ok(Some((u64::from(bits) + b, id)));
                }
            } else if self.name(name_off) == name {
                if bitfield_bits != 0 {
                    return Err(BtfError::Format(format!(
                        "member {} is a bitfield",
                        String::from_utf8_lossy(name)
                    )));
                }
                return Ok(Some((u64::from(bits), type_id)));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn skip_qualifiers(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let t = self.type_by_id(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Format(format!("type {id}: qualifiers nested more than 32 deep")))
    }

    /// The size in bytes of a value of type `id`.
    fn size(&self, id: u32) -> Result<u32, BtfError> {
        let t = self.type_by_id(self.skip_qualifiers(id)?)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Ok(t.size_or_type)
            }
            KIND_PTR => Ok(std::mem::size_of::<usize>() as u32),
            KIND_ARRAY => {
                let (elem, count) = (
                    u32_at(self.bytes, t.data).unwrap_or_default(),
                    u32_at(self.bytes, t.data + 8).unwrap_or_default(),
                );
                Ok(self.size(elem)?.saturating_mul(count))
            }
            kind => Err(BtfError::Format(format!("type {id} of kind {kind} has no size"))),
        }
    }
}

/// Bytes of kind-specific data after the header of `t`.
fn data_bytes(t: &Type) -> Result<usize, BtfError> {
    let vlen = t.vlen as usize;
    Ok(match t.kind {
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        kind => return Err(BtfError::Format(format!("unknown type kind {kind}"))),
    })
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends one type header and returns its id.
    fn push_type(types: &mut Vec<u8>, ids: &mut u32, name_off: u32, info: u32, size: u32) -> u32 {
        for w in [name_off, info, size] {
            types.extend(w.to_ne_bytes());
        }
        *ids += 1;
        *ids
    }

    fn words(types: &mut Vec<u8>, ws: &[u32]) {
        for w in ws {
            types.extend(w.to_ne_bytes());
        }
    }

    /// A blob with, in C:
    /// `struct outer { int a; union { struct { char pad[6]; short b; }; long c; }; int *p; }`,
    /// with `pad` and `b` in a struct whose kind_flag is set, and `typedef struct outer t;`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0p\0pad\0short\0char\0long\0t\0colour\0RED\0BLUE\0";
        let at = |s: &str| {
            let s = format!("\0{s}\0");
            strings.windows(s.len()).position(|w| w == s.as_bytes()).unwrap() as u32 + 1
        };
        let kind = |k: u32, vlen: u32, flag: u32| flag << 31 | k << 24 | vlen;
        let (mut t, mut n) = (Vec::new(), 0);
        let int = push_type(&mut t, &mut n, at("int"), kind(KIND_INT, 0, 0), 4);
        words(&mut t, &[32]);
        let short = push_type(&mut t, &mut n, at("short"), kind(KIND_INT, 0, 0), 2);
        words(&mut t, &[16]);
        let char = push_type(&mut t, &mut n, at("char"), kind(KIND_INT, 0, 0), 1);
        words(&mut t, &[8]);
        let long = push_type(&mut t, &mut n, at("long"), kind(KIND_INT, 0, 0), 8);
        words(&mut t, &[64]);
        let pad = push_type(&mut t, &mut n, 0, kind(KIND_ARRAY, 0, 0), 0);
        words(&mut t, &[char, int, 6]);
        let inner = push_type(&mut t, &mut n, 0, kind(KIND_STRUCT, 2, 1), 8);
        words(&mut t, &[at("pad"), pad, 0, at("b"), short, 48]);
        let union = push_type(&mut t, &mut n, 0, kind(KIND_UNION, 2, 0), 8);
        words(&mut t, &[0, inner, 0, at("c"), long, 0]);
        let ptr = push_type(&mut t, &mut n, 0, kind(KIND_PTR, 0, 0), int);
        let outer = push_type(&mut t, &mut n, at("outer"), kind(KIND_STRUCT, 3, 0), 24);
        words(&mut t, &[at("a"), int, 0, 0, union, 64, at("p"), ptr, 128]);
        push_type(&mut t, &mut n, at("t"), kind(KIND_TYPEDEF, 0, 0), outer);
        push_type(&mut t, &mut n, at("colour"), kind(KIND_ENUM, 2, 0), 4);
        words(&mut t, &[at("RED"), 0, at("BLUE"), 7]);
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_ne_bytes());
        blob.extend([1, 0]);
        let tl = t.len() as u32;
        words(&mut blob, &[HEADER_BYTES as u32, 0, tl, tl, strings.len() as u32]);
        blob.extend(t);
        blob.extend(strings);
        blob
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_structs() {
        let blob = blob();
        let btf = Btf::parse(&blob).unwrap();
        let m = |path: &[&str]| btf.member("outer", path).unwrap();
        assert_eq!(m(&["a"]), Member { offset_bytes: 0, size_bytes: 4 });
        assert_eq!(m(&["b"]), Member { offset_bytes: 8 + 6, size_bytes: 2 });
        assert_eq!(m(&["c"]), Member { offset_bytes: 8, size_bytes: 8 });
        assert_eq!(m(&["pad"]), Member { offset_bytes: 8, size_bytes: 6 });
        assert_eq!(m(&["p"]), Member { offset_bytes: 16, size_bytes: 8 });
        assert!(matches!(btf.member("outer", &["d"]), Err(BtfError::Member(..))));
        assert!(matches!(btf.member("t", &["a"]), Err(BtfError::NoStruct(_))));
        assert!(matches!(Btf::parse(&blob[..HEADER_BYTES + 30]), Err(BtfError::Format(_))));
    }

    #[test]
    fn reads_an_enums_values_and_names() {
        let blob = blob();
        let btf = Btf::parse(&blob).unwrap();
        let colours = btf.enumerators("colour").unwrap();
        assert_eq!(colours, [(0, "RED".to_string()), (7, "BLUE".to_string())]);
        assert_eq!(btf.enumerators("outer"), None, "a struct is not an enum");
        assert_eq!(btf.enumerators("shade"), None);
    }

    /// The mapped file reads as the same bytes as the file read whole (on kernels that
    /// refuse the mapping, both are reads).
    #[test]
    fn a_mapped_blob_holds_the_files_bytes() {
        let Ok(blob) = Blob::open(Path::new(SYS_FS)) else {
            eprintln!("SKIPPED: no readable {SYS_FS}");
            return;
        };
        let mapped = matches!(blob, Blob::Mapped { .. });
        assert!(&blob[..] == std::fs::read(SYS_FS).unwrap().as_slice(), "mapped: {mapped}");
        eprintln!("{SYS_FS}: {} bytes, mapped: {mapped}", blob.len());
    }

    /// The running kernel's BTF, where there is one: the members the programs read exist.
    #[test]
    fn reads_the_running_kernels_socket_members() {
        let Ok(blob) = Blob::open(Path::new(SYS_FS)) else {
            eprintln!("SKIPPED: no readable {SYS_FS}");
            return;
        };
        let btf = Btf::parse(&blob).unwrap();
        let family = btf.member("sock", &["__sk_common", "skc_family"]).unwrap();
        let cookie = btf.member("sock", &["__sk_common", "skc_cookie"]).unwrap();
        let peer = btf.member("unix_sock", &["peer"]).unwrap();
        assert_eq!((family.size_bytes, cookie.size_bytes, peer.size_bytes), (2, 8, 8));
        assert_eq!(btf.member("sock_common", &["skc_family"]).unwrap(), family);
        assert_eq!(btf.member("unix_sock", &["sk"]).unwrap().offset_bytes, 0);
        eprintln!(
            "this kernel: skc_family at {}, skc_cookie at {}, unix_sock.peer at {}",
            family.offset_bytes, cookie.offset_bytes, peer.offset_bytes
        );
    }
}
