//! Persistent dirty bitmaps (the bitmaps extension of the qcow2 format; design.md, "Persistent bitmaps"): the bitmap directory, bitmap tables
//! and the layout of bitmap data, decoded and encoded, with the limits QEMU puts on them
//! (`check_entry`, `check_directory`, `check_new`). The bitmaps extension itself (count,
//! directory size and offset) is part of the header (`header::BitmapsExt`).
//!
//! Bitmap data: bit `j` of byte `i` (least significant bit first) of the concatenated data
//! clusters covers the guest range starting at `(8 * i + j) << granularity_bits`. A table
//! entry names one data cluster, or says that its part of the bitmap is all zeros (entry
//! 0) or all ones (entry 1).

use super::error::{FormatError, be16, be32, be64};

/// Entry flag: the bitmap may be stale (a writer had the image open and did not store
/// it).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Entry flag: the bitmap tracks every write to the active disk.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags no version of the format defines.
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limits: granularities from 512 bytes to 2 GiB, names up to 1023 bytes, at most
/// 65535 bitmaps in a directory of at most 64 MiB, tables of at most 2^27 entries and
/// at most 512 MiB of data per bitmap (the memory QEMU spends on one).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// The largest granularity: 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// The longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 1023;
/// The most bitmaps in a directory.
pub const MAX_BITMAPS: u32 = 65535;
/// The largest directory, in bytes.
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// The most entries in one bitmap table.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// The most data bytes of one bitmap.
pub const MAX_DATA_BYTES: u64 = 0x2000_0000;

/// Bits of a table entry that must be zero, the offset bits, and the all-ones flag.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

/// Size of a directory entry's fixed part.
const ENTRY_HEADER: usize = 24;

/// One bitmap-directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Host offset of the bitmap table (0 when the bitmap has none).
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// The entry's flags (`FLAG_IN_USE`, `FLAG_AUTO`).
    pub flags: u32,
    /// The bitmap's type: `TYPE_DIRTY_TRACKING`.
    pub kind: u8,
    /// Bytes of guest space one bit covers, as a power of two.
    pub granularity_bits: u8,
    /// The name (invalid UTF-8 replaced, see `name_is_utf8`).
    pub name: String,
    /// Bytes of extra data after the fixed part (must be 0 to use the bitmap).
    pub extra_data_size: u32,
    /// The stored name is valid UTF-8 (otherwise `name` is not exactly what is stored,
    /// and the entry cannot be written back unchanged).
    pub name_is_utf8: bool,
    /// Where the entry is in the file (for messages).
    pub at: u64,
}

impl BitmapEntry {
    /// A new dirty-tracking bitmap with no table yet.
    pub fn new(name: &str, granularity_bits: u8, flags: u32) -> Self {
        BitmapEntry {
            table_offset: 0,
            table_size: 0,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits,
            name: name.to_string(),
            extra_data_size: 0,
            name_is_utf8: true,
            at: 0,
        }
    }

    /// Whether the in-use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the auto flag is set.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// The granularity in bytes (clamped so that a hostile value cannot overflow).
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }
}

/// Bytes a directory entry with a name of `name_len` bytes takes (no extra data).
pub fn entry_len(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len).next_multiple_of(8)
}

/// Parses a bitmap directory of `nb` entries that must exactly fill `bytes`.
pub fn parse_directory(
    bytes: &[u8],
    nb: u32,
    dir_offset: u64,
) -> Result<Vec<BitmapEntry>, FormatError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for i in 0..nb {
        let at = dir_offset + pos as u64;
        let field = format!("bitmap directory entry {i}");
        if pos + ENTRY_HEADER > bytes.len() {
            return Err(FormatError::invalid(
                field,
                at,
                "runs past the end of the directory",
            ));
        }
        let e = &bytes[pos..];
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        if name_size == 0 || name_size > MAX_NAME_BYTES {
            return Err(FormatError::invalid(
                field,
                at + 18,
                format!("name size {name_size}"),
            ));
        }
        if extra > 64 * 1024 {
            return Err(FormatError::invalid(
                field,
                at + 20,
                format!("extra data size {extra}"),
            ));
        }
        let len = (ENTRY_HEADER + extra + name_size).next_multiple_of(8);
        if pos + len > bytes.len() {
            return Err(FormatError::invalid(
                field,
                at,
                "runs past the end of the directory",
            ));
        }
        let raw = &e[ENTRY_HEADER + extra..ENTRY_HEADER + extra + name_size];
        let name_is_utf8 = std::str::from_utf8(raw).is_ok();
        out.push(BitmapEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name: String::from_utf8_lossy(raw).into_owned(),
            extra_data_size: extra as u32,
            name_is_utf8,
            at,
        });
        pos += len;
    }
    if pos != bytes.len() {
        return Err(FormatError::invalid(
            "bitmap directory",
            dir_offset,
            format!(
                "{nb} entries use {pos} bytes but the directory size is {}",
                bytes.len()
            ),
        ));
    }
    Ok(out)
}

/// Encodes a bitmap directory (entries without extra data, as QEMU writes them).
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| entry_len(e.name.len())).sum());
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + entry_len(e.name.len()), 0);
    }
    out
}

/// What one bitmap-table entry says about its part of the bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// Its part of the bitmap is all zeros (no data cluster).
    Zeros,
    /// Its part of the bitmap is all ones (no data cluster).
    Ones,
    /// The data is in the cluster at this host offset.
    Data(u64),
}

/// Decodes a bitmap-table entry, checking its reserved bits and alignment.
pub fn decode_table_entry(word: u64, cluster_size: u64) -> Result<TableEntry, String> {
    if word & TABLE_RESERVED != 0 {
        return Err(format!("table entry {word:#x} has reserved bits set"));
    }
    let off = word & TABLE_OFFSET_MASK;
    if off == 0 {
        return Ok(if word & TABLE_ALL_ONES != 0 {
            TableEntry::Ones
        } else {
            TableEntry::Zeros
        });
    }
    if word & TABLE_ALL_ONES != 0 {
        return Err(format!(
            "table entry {word:#x} names a data cluster and sets the all-ones bit"
        ));
    }
    if !off.is_multiple_of(cluster_size) {
        return Err(format!(
            "table entry {word:#x}: data offset {off:#x} is not cluster-aligned"
        ));
    }
    Ok(TableEntry::Data(off))
}

/// Encodes a bitmap-table entry.
pub fn encode_table_entry(e: TableEntry) -> u64 {
    match e {
        TableEntry::Zeros => 0,
        TableEntry::Ones => TABLE_ALL_ONES,
        TableEntry::Data(off) => off & TABLE_OFFSET_MASK,
    }
}

/// Bits a bitmap of a `disk_size`-byte disk has.
pub fn bit_count(disk_size: u64, granularity_bits: u8) -> u64 {
    disk_size.div_ceil(1u64 << granularity_bits.min(63))
}

/// Bytes of bitmap data (whole bytes of bits) for a `disk_size`-byte disk.
pub fn data_bytes(disk_size: u64, granularity_bits: u8) -> u64 {
    bit_count(disk_size, granularity_bits).div_ceil(8)
}

/// Entries the bitmap table of such a bitmap has: one per cluster of data.
pub fn table_entries(disk_size: u64, granularity_bits: u8, cluster_bits: u32) -> u64 {
    data_bytes(disk_size, granularity_bits).div_ceil(1 << cluster_bits)
}

/// Checks one directory entry as QEMU does when it loads the directory: the table is
/// cluster-aligned, not empty and within the limits, the granularity and type are
/// supported, no reserved flag is set, no extra data, and (unless the bitmap is in use,
/// whose size may be stale) the table covers the whole disk. The error names the bitmap.
pub fn check_entry(e: &BitmapEntry, cluster_bits: u32, disk_size: u64) -> Result<(), String> {
    let cs = 1u64 << cluster_bits;
    let why = |m: String| Err(format!("bitmap '{}': {m}", e.name));
    if e.kind != TYPE_DIRTY_TRACKING {
        return why(format!(
            "type {} is not supported (only 1, dirty tracking)",
            e.kind
        ));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return why(format!(
            "granularity 2^{} is outside 512 bytes to 2 GiB",
            e.granularity_bits
        ));
    }
    if e.flags & RESERVED_FLAGS != 0 {
        return why(format!("reserved flags {:#x} are set", e.flags));
    }
    if e.extra_data_size != 0 {
        return why(format!(
            "{} bytes of extra data (none is defined)",
            e.extra_data_size
        ));
    }
    if !e.name_is_utf8 {
        return why("the name is not valid UTF-8".into());
    }
    if e.table_offset == 0 || !e.table_offset.is_multiple_of(cs) {
        return why(format!(
            "bitmap table offset {:#x} is not a cluster-aligned offset",
            e.table_offset
        ));
    }
    if e.table_size == 0 || e.table_size > MAX_TABLE_ENTRIES {
        return why(format!(
            "bitmap table size {} is outside 1 to {MAX_TABLE_ENTRIES}",
            e.table_size
        ));
    }
    let data = (e.table_size as u64) << cluster_bits;
    if data > MAX_DATA_BYTES {
        return why(format!(
            "its table describes {data} bytes of data, more than the 512 MiB limit"
        ));
    }
    let covers = (data * 8).saturating_mul(1 << e.granularity_bits);
    if !e.in_use() && covers < disk_size {
        return why(format!(
            "its table of {} entries covers {covers} bytes of the {disk_size}-byte disk",
            e.table_size
        ));
    }
    Ok(())
}

/// Checks the directory as a whole: at most [`MAX_BITMAPS`] entries in at most
/// [`MAX_DIRECTORY_BYTES`], and no name used twice.
pub fn check_directory(entries: &[BitmapEntry]) -> Result<(), String> {
    if entries.len() > MAX_BITMAPS as usize {
        return Err(format!(
            "{} bitmaps, more than the {MAX_BITMAPS} QEMU allows",
            entries.len()
        ));
    }
    let size: u64 = entries.iter().map(|e| entry_len(e.name.len()) as u64).sum();
    if size > MAX_DIRECTORY_BYTES {
        return Err(format!(
            "the bitmap directory would take {size} bytes, more than the 64 MiB limit"
        ));
    }
    let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("bitmap '{}': the name is used twice", w[0]));
    }
    Ok(())
}

/// Checks a bitmap about to be added to a directory holding `existing`, as QEMU's
/// `qemu-img bitmap --add` does: a name of 1 to 1023 bytes not in use, a granularity of
/// 512 bytes to 2 GiB, data within the limits, room in the directory.
pub fn check_new(
    existing: &[BitmapEntry],
    name: &str,
    granularity: u64,
    cluster_bits: u32,
    disk_size: u64,
) -> Result<u8, String> {
    let why = |m: String| Err(format!("cannot add bitmap '{name}': {m}"));
    if existing.iter().any(|e| e.name == name) {
        return why("a bitmap of that name exists already".into());
    }
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return why(format!(
            "a name has 1 to {MAX_NAME_BYTES} bytes, not {}",
            name.len()
        ));
    }
    if !granularity.is_power_of_two() || granularity < 512 {
        return why(format!(
            "granularity {granularity} is not a power of 2 of at least 512"
        ));
    }
    let bits = granularity.trailing_zeros() as u8;
    if bits > MAX_GRANULARITY_BITS {
        return why(format!(
            "granularity {granularity} exceeds the maximum of 2147483648 bytes"
        ));
    }
    let data = data_bytes(disk_size, bits);
    if data > MAX_DATA_BYTES || data.div_ceil(1 << cluster_bits) > MAX_TABLE_ENTRIES as u64 {
        return why(format!(
            "{data} bytes of bitmap data would exceed the 512 MiB limit; use a larger granularity"
        ));
    }
    let mut all = existing.to_vec();
    all.push(BitmapEntry::new(name, bits, 0));
    check_directory(&all).map(|_| bits).or_else(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, gbits: u8, table_size: u32) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x30000,
            table_size,
            ..BitmapEntry::new(name, gbits, FLAG_AUTO)
        }
    }

    #[test]
    fn directory_round_trips() {
        let v = vec![entry("b0", 16, 1), entry("a longer name", 9, 3)];
        let bytes = encode_directory(&v);
        assert_eq!(bytes.len(), entry_len(2) + entry_len(13));
        let back = parse_directory(&bytes, 2, 0x1000).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in v.iter().zip(&back) {
            assert_eq!(
                (a.name.as_str(), a.flags, a.table_size),
                (b.name.as_str(), b.flags, b.table_size)
            );
            assert_eq!(
                (a.table_offset, a.granularity_bits, a.kind),
                (b.table_offset, b.granularity_bits, b.kind)
            );
        }
        assert_eq!(back[1].at, 0x1000 + entry_len(2) as u64);
    }

    #[test]
    fn table_entries_decode_and_encode() {
        let cs = 65536;
        assert_eq!(decode_table_entry(0, cs), Ok(TableEntry::Zeros));
        assert_eq!(decode_table_entry(1, cs), Ok(TableEntry::Ones));
        assert_eq!(
            decode_table_entry(0x50000, cs),
            Ok(TableEntry::Data(0x50000))
        );
        assert!(decode_table_entry(0x50001, cs).is_err());
        assert!(decode_table_entry(0x50200, cs).is_err());
        assert!(decode_table_entry(2, cs).is_err());
        assert!(decode_table_entry(1 << 60, cs).is_err());
        for e in [
            TableEntry::Zeros,
            TableEntry::Ones,
            TableEntry::Data(0x70000),
        ] {
            assert_eq!(decode_table_entry(encode_table_entry(e), cs), Ok(e));
        }
    }

    #[test]
    fn sizes_follow_the_granularity() {
        // 1 TiB at 64 KiB: 2^24 bits, 2 MiB of data, 32 clusters of 64 KiB.
        assert_eq!(data_bytes(1 << 40, 16), 2 << 20);
        assert_eq!(table_entries(1 << 40, 16, 16), 32);
        assert_eq!(bit_count(1000, 9), 2);
        assert_eq!(data_bytes(1000, 9), 1);
    }

    #[test]
    fn entries_are_checked_like_qemu() {
        let ok = entry("b", 16, 1);
        assert!(check_entry(&ok, 16, 64 << 20).is_ok());
        let bad = |f: &dyn Fn(&mut BitmapEntry), want: &str| {
            let mut e = ok.clone();
            f(&mut e);
            let err = check_entry(&e, 16, 64 << 20).unwrap_err();
            assert!(err.contains("bitmap 'b'") && err.contains(want), "{err}");
        };
        bad(&|e| e.kind = 2, "type 2");
        bad(&|e| e.granularity_bits = 8, "granularity");
        bad(&|e| e.granularity_bits = 32, "granularity");
        bad(&|e| e.flags |= 4, "reserved flags");
        bad(&|e| e.table_offset = 0x30200, "cluster-aligned");
        bad(&|e| e.table_size = 0, "table size");
        bad(&|e| e.extra_data_size = 8, "extra data");
        // One 64 KiB cluster of bits at 512 bytes covers 256 MiB: not 1 GiB.
        let mut small = entry("b", 9, 1);
        assert!(
            check_entry(&small, 16, 1 << 30)
                .unwrap_err()
                .contains("covers")
        );
        small.flags |= FLAG_IN_USE;
        assert!(check_entry(&small, 16, 1 << 30).is_ok());
        assert!(
            check_directory(&[entry("x", 16, 1), entry("x", 9, 1)])
                .unwrap_err()
                .contains("used twice")
        );
    }

    #[test]
    fn new_bitmaps_are_checked_like_qemu_img() {
        let have = [entry("b0", 16, 1)];
        assert_eq!(check_new(&have, "b1", 65536, 16, 1 << 30), Ok(16));
        assert!(
            check_new(&have, "b0", 65536, 16, 1 << 30)
                .unwrap_err()
                .contains("exists")
        );
        assert!(check_new(&have, "b1", 256, 16, 1 << 30).is_err());
        assert!(check_new(&have, "b1", 3000, 16, 1 << 30).is_err());
        assert!(check_new(&have, "b1", 1 << 32, 16, 1 << 30).is_err());
        assert!(check_new(&have, &"n".repeat(1024), 65536, 16, 1 << 30).is_err());
        // 512-byte granularity on a 4 TiB disk: 1 GiB of bits.
        assert!(
            check_new(&have, "b1", 512, 16, 4 << 40)
                .unwrap_err()
                .contains("512 MiB")
        );
    }
}
