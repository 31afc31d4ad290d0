//! The internal-snapshot table: variable-length entries, each with
//! its own L1 table, disk size, VM state size and extra data.

use super::error::{FormatError, be16, be32, be64};

/// QEMU's limits.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// The largest snapshot table, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;
const FIXED_LEN: usize = 40;

/// One snapshot-table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// The snapshot's ID string.
    pub id: String,
    /// The name as stored (not necessarily UTF-8).
    pub name_bytes: Vec<u8>,
    /// When the snapshot was taken: seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds within that second.
    pub date_nsec: u32,
    /// The guest's clock at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The VM state size (the 64-bit extra field when present, else the legacy field).
    pub vm_state_size: u64,
    /// The snapshot's own disk size, when the extra data holds it.
    pub disk_size: Option<u64>,
    /// The instruction count (record/replay), when the extra data holds it.
    pub icount: Option<u64>,
    /// The extra data verbatim, so a rewrite keeps fields newer than this code.
    pub extra: Vec<u8>,
    /// The 32-bit legacy VM state field as stored.
    pub vm_state_size_legacy: u32,
}

impl SnapshotEntry {
    /// The name as text (invalid UTF-8 replaced).
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.name_bytes).into_owned()
    }

    /// "snapshot NAME (id ID)" for messages, with control characters escaped so that a
    /// message about a damaged entry stays one line.
    pub fn label(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .flat_map(|c| {
                    let esc: Vec<char> = if c.is_control() {
                        c.escape_default().collect()
                    } else {
                        vec![c]
                    };
                    esc
                })
                .collect()
        };
        format!("snapshot {} (id {})", clean(&self.name()), clean(&self.id))
    }

    /// Encoded length, including the padding to 8 bytes.
    pub fn encoded_len(&self) -> usize {
        (FIXED_LEN + self.extra.len() + self.id.len() + self.name_bytes.len()).next_multiple_of(8)
    }

    /// Encodes the entry; known extra fields are written over the preserved extra bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut extra = self.extra.clone();
        let put = |extra: &mut Vec<u8>, at: usize, v: u64| {
            if extra.len() >= at + 8 {
                extra[at..at + 8].copy_from_slice(&v.to_be_bytes());
            }
        };
        put(&mut extra, 0, self.vm_state_size);
        if let Some(d) = self.disk_size {
            put(&mut extra, 8, d);
        }
        if let Some(i) = self.icount {
            put(&mut extra, 16, i);
        }
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(self.name_bytes.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        let legacy = if self.vm_state_size > u32::MAX as u64 {
            0
        } else {
            self.vm_state_size as u32
        };
        let legacy = if extra.len() >= 8 {
            legacy
        } else {
            self.vm_state_size_legacy
        };
        b.extend_from_slice(&legacy.to_be_bytes());
        b.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&extra);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(&self.name_bytes);
        b.resize(b.len().next_multiple_of(8), 0);
        b
    }
}

/// What parsing a table from the bytes given found: the entries, or that the table is
/// longer than those bytes (parse again with at least this many).
#[derive(Debug, PartialEq, Eq)]
pub enum TableRead {
    /// The whole table.
    Entries(Vec<SnapshotEntry>),
    /// The table needs at least this many bytes.
    NeedBytes(usize),
}

/// Parses `nb` entries from `bytes`, which start at file offset `table_offset`.
pub fn parse_table(bytes: &[u8], nb: u32, table_offset: u64) -> Result<TableRead, FormatError> {
    let mut entries = Vec::with_capacity(nb.min(4096) as usize);
    let mut pos = 0usize;
    for i in 0..nb {
        let at = table_offset + pos as u64;
        let field = |name: &str| format!("snapshot table entry {i} {name}");
        if pos + FIXED_LEN > bytes.len() {
            return Ok(TableRead::NeedBytes(pos + FIXED_LEN));
        }
        let e = &bytes[pos..];
        let id_len = be16(e, 12) as usize;
        let name_len = be16(e, 14) as usize;
        let extra_len = be32(e, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(FormatError::invalid(
                field("extra_data_size"),
                at + 36,
                format!("{extra_len} bytes exceed the limit of {MAX_EXTRA_DATA}"),
            ));
        }
        // The padding after the last entry need not be in the file (QEMU leaves it out).
        let unpadded = FIXED_LEN + extra_len as usize + id_len + name_len;
        let len = unpadded.next_multiple_of(8);
        if (pos + len) as u64 > MAX_TABLE_BYTES {
            return Err(FormatError::invalid(
                field("length"),
                at,
                "the snapshot table grows past the 64 MiB limit",
            ));
        }
        if pos + unpadded > bytes.len() {
            return Ok(TableRead::NeedBytes(pos + unpadded));
        }
        let extra = e[FIXED_LEN..FIXED_LEN + extra_len as usize].to_vec();
        let id_start = FIXED_LEN + extra_len as usize;
        let id = String::from_utf8_lossy(&e[id_start..id_start + id_len]).into_owned();
        let name_bytes = e[id_start + id_len..id_start + id_len + name_len].to_vec();
        let legacy = be32(e, 32);
        let vm_state_size = if extra.len() >= 8 {
            be64(&extra, 0)
        } else {
            legacy as u64
        };
        entries.push(SnapshotEntry {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            id,
            name_bytes,
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size,
            disk_size: (extra.len() >= 16).then(|| be64(&extra, 8)),
            icount: (extra.len() >= 24).then(|| be64(&extra, 16)),
            extra,
            vm_state_size_legacy: legacy,
        });
        pos += len;
    }
    Ok(TableRead::Entries(entries))
}

/// Encodes a whole table.
pub fn encode_table(entries: &[SnapshotEntry]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.encode()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> SnapshotEntry {
        let mut extra = vec![0u8; 24];
        extra[8..16].copy_from_slice(&(1u64 << 20).to_be_bytes());
        SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 1,
            id: id.into(),
            name_bytes: name.as_bytes().to_vec(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: Some(1 << 20),
            icount: Some(0),
            extra,
            vm_state_size_legacy: 0,
        }
    }

    #[test]
    fn roundtrip_and_need_more() {
        let t = vec![sample("1", "first"), sample("12", "")];
        let bytes = encode_table(&t);
        let entries = |r| match r {
            Ok(TableRead::Entries(e)) => e,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(entries(parse_table(&bytes, 2, 0x10000)), t);
        assert_eq!(encode_table(&entries(parse_table(&bytes, 2, 0))), bytes);
        match parse_table(&bytes[..50], 2, 0) {
            Ok(TableRead::NeedBytes(n)) => assert!(n > 50),
            other => panic!("unexpected {other:?}"),
        }
        // The last entry's padding may be missing.
        let unpadded = bytes.len() - 4;
        assert_eq!(entries(parse_table(&bytes[..unpadded], 2, 0)), t);
    }

    #[test]
    fn extra_data_limit() {
        let mut b = encode_table(&[sample("1", "x")]);
        b[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_table(&b, 1, 0).is_err());
    }
}
