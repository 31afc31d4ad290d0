//! L1 and L2 table entries (standard and extended), and compressed-cluster descriptors:
//! decoding a raw entry into what the guest range it covers reads as (checklist sections
//! 6 to 9), and encoding the entries a writer stores.

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO_FLAG: u64 = 1;
/// Number of subclusters in a cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What the image's header says about how to read entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLayout {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    /// v3 images have the zero flag; in v2 it is corruption.
    pub zero_flag: bool,
    pub data_file: bool,
}

/// What a piece of guest space reads as, according to one L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Not allocated, but a host cluster is reserved for it (extended L2 only).
    UnallocatedAlloc { host: u64 },
    /// Reads as zeros without consulting the backing file.
    ZeroPlain,
    /// Reads as zeros; a host cluster is still allocated and referenced.
    ZeroAlloc { host: u64 },
    /// Data at `host` (+ offset in cluster).
    Normal { host: u64 },
    /// Compressed data: `size` bytes at host byte offset `offset`.
    Compressed(CompressedDesc),
}

impl ClusterKind {
    /// The host cluster this entry references, if any (compressed ranges excluded).
    pub fn host_cluster(self) -> Option<u64> {
        match self {
            ClusterKind::UnallocatedAlloc { host }
            | ClusterKind::ZeroAlloc { host }
            | ClusterKind::Normal { host } => Some(host),
            _ => None,
        }
    }
}

/// Where a compressed cluster's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompressedDesc {
    pub offset: u64,
    pub size: u64,
}

/// Why an entry cannot be used. The engine turns this into an EIO with the entry's
/// location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryError {
    UnalignedOffset(u64),
    ZeroFlagInV2,
    /// Alloc and zero bits both set for some subcluster.
    SubclusterBothBits(u64),
    /// Alloc bits set in an entry without a host cluster.
    AllocBitsWithoutCluster(u64),
    CompressedWithDataFile,
    CompressedOffsetTooLarge(u64),
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryError::UnalignedOffset(o) => {
                write!(f, "host offset {o:#x} is not cluster-aligned")
            }
            EntryError::ZeroFlagInV2 => write!(f, "zero flag set in a version 2 image"),
            EntryError::SubclusterBothBits(b) => write!(
                f,
                "subcluster bitmap {b:#018x} marks a subcluster both allocated and zero"
            ),
            EntryError::AllocBitsWithoutCluster(b) => write!(
                f,
                "subcluster bitmap {b:#018x} marks subclusters allocated but no host cluster is set"
            ),
            EntryError::CompressedWithDataFile => {
                write!(
                    f,
                    "compressed cluster in an image with an external data file"
                )
            }
            EntryError::CompressedOffsetTooLarge(o) => {
                write!(f, "compressed data offset {o:#x} is beyond 2^56")
            }
        }
    }
}

impl EntryLayout {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn l2_entry_size(&self) -> usize {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Number of u64 words in one L2 table.
    pub fn l2_words(&self) -> usize {
        (self.cluster_size() / 8) as usize
    }

    /// Entries (clusters) per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size() as u64
    }

    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS as u64
        } else {
            self.cluster_size()
        }
    }

    /// The L2 table offset an L1 entry points to; 0 means unallocated.
    pub fn l1_l2_offset(&self, entry: u64) -> Result<u64, EntryError> {
        let off = entry & OFFSET_MASK;
        if off & (self.cluster_size() - 1) != 0 {
            return Err(EntryError::UnalignedOffset(off));
        }
        Ok(off)
    }

    /// Decodes a compressed entry's descriptor.
    pub fn compressed_desc(&self, entry: u64) -> Result<CompressedDesc, EntryError> {
        let shift = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        if offset >= 1 << 56 {
            return Err(EntryError::CompressedOffsetTooLarge(offset));
        }
        let count_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let sectors = ((entry >> shift) & count_mask) + 1;
        Ok(CompressedDesc {
            offset,
            size: sectors * 512 - (offset & 511),
        })
    }

    /// Encodes a compressed entry for `size` bytes of compressed data at `offset`.
    pub fn encode_compressed(&self, offset: u64, size: u64) -> u64 {
        let shift = 62 - (self.cluster_bits - 8);
        let sectors = (offset + size - 1) / 512 - offset / 512;
        COMPRESSED | (sectors << shift) | offset
    }

    /// Classifies the part of a cluster from subcluster `sc` onwards. Returns the kind and
    /// the number of subclusters (from `sc`) that share it; for standard entries this is
    /// the rest of the cluster. `bitmap` is ignored without extended L2.
    pub fn classify(
        &self,
        entry: u64,
        bitmap: u64,
        sc: u32,
    ) -> Result<(ClusterKind, u32), EntryError> {
        let rest = SUBCLUSTERS - sc;
        if entry & COMPRESSED != 0 {
            if self.data_file {
                return Err(EntryError::CompressedWithDataFile);
            }
            return Ok((ClusterKind::Compressed(self.compressed_desc(entry)?), rest));
        }
        let host = entry & OFFSET_MASK;
        // With an external data file, COPIED and offset 0 is a real cluster at offset 0.
        let allocated = host != 0 || (self.data_file && entry & COPIED != 0);
        if allocated && host & (self.cluster_size() - 1) != 0 {
            return Err(EntryError::UnalignedOffset(host));
        }
        if !self.extended_l2 {
            if entry & ZERO_FLAG != 0 {
                if !self.zero_flag {
                    return Err(EntryError::ZeroFlagInV2);
                }
                let kind = if host != 0 {
                    ClusterKind::ZeroAlloc { host }
                } else {
                    ClusterKind::ZeroPlain
                };
                return Ok((kind, rest));
            }
            let kind = if allocated {
                ClusterKind::Normal { host }
            } else {
                ClusterKind::Unallocated
            };
            return Ok((kind, rest));
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(EntryError::SubclusterBothBits(bitmap));
        }
        if !allocated && alloc != 0 {
            return Err(EntryError::AllocBitsWithoutCluster(bitmap));
        }
        let state = |i: u32| ((alloc >> i) & 1, (zero >> i) & 1);
        let first = state(sc);
        let mut n = 1;
        while sc + n < SUBCLUSTERS && state(sc + n) == first {
            n += 1;
        }
        let kind = match (allocated, first) {
            (true, (1, _)) => ClusterKind::Normal { host },
            (true, (0, 1)) => ClusterKind::ZeroAlloc { host },
            (true, _) => ClusterKind::UnallocatedAlloc { host },
            (false, (_, 1)) => ClusterKind::ZeroPlain,
            (false, _) => ClusterKind::Unallocated,
        };
        Ok((kind, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std64() -> EntryLayout {
        EntryLayout {
            cluster_bits: 16,
            extended_l2: false,
            zero_flag: true,
            data_file: false,
        }
    }

    #[test]
    fn standard_entries() {
        let l = std64();
        assert_eq!(l.classify(0, 0, 0).unwrap(), (ClusterKind::Unallocated, 32));
        assert_eq!(l.classify(1, 0, 0).unwrap().0, ClusterKind::ZeroPlain);
        assert_eq!(
            l.classify(0x50000 | 1, 0, 0).unwrap().0,
            ClusterKind::ZeroAlloc { host: 0x50000 }
        );
        assert_eq!(
            l.classify(COPIED | 0x50000, 0, 0).unwrap().0,
            ClusterKind::Normal { host: 0x50000 }
        );
        assert_eq!(
            l.classify(0x50200, 0, 0),
            Err(EntryError::UnalignedOffset(0x50200))
        );
        // COPIED with offset 0 and no data file: unallocated.
        assert_eq!(
            l.classify(COPIED, 0, 0).unwrap().0,
            ClusterKind::Unallocated
        );
        let v2 = EntryLayout {
            zero_flag: false,
            ..l
        };
        assert_eq!(v2.classify(1, 0, 0), Err(EntryError::ZeroFlagInV2));
        let df = EntryLayout {
            data_file: true,
            ..l
        };
        assert_eq!(
            df.classify(COPIED, 0, 0).unwrap().0,
            ClusterKind::Normal { host: 0 }
        );
    }

    #[test]
    fn extended_entries() {
        let l = EntryLayout {
            extended_l2: true,
            ..std64()
        };
        let host = 0x70000;
        // subclusters 0-1 allocated, 2 zero, rest unallocated
        let bm = 0b11u64 | (1u64 << 34);
        assert_eq!(
            l.classify(host, bm, 0).unwrap(),
            (ClusterKind::Normal { host }, 2)
        );
        assert_eq!(
            l.classify(host, bm, 2).unwrap(),
            (ClusterKind::ZeroAlloc { host }, 1)
        );
        assert_eq!(
            l.classify(host, bm, 3).unwrap(),
            (ClusterKind::UnallocatedAlloc { host }, 29)
        );
        assert!(matches!(
            l.classify(host, 1 | (1 << 32), 0),
            Err(EntryError::SubclusterBothBits(_))
        ));
        assert!(matches!(
            l.classify(0, 1, 0),
            Err(EntryError::AllocBitsWithoutCluster(_))
        ));
        assert_eq!(
            l.classify(0, 0xffff_ffff_0000_0000, 5).unwrap(),
            (ClusterKind::ZeroPlain, 27)
        );
    }

    #[test]
    fn compressed_descriptor_roundtrip() {
        for cb in 9..=21u32 {
            let l = EntryLayout {
                cluster_bits: cb,
                ..std64()
            };
            for (off, size) in [
                (0x1234u64, 100u64),
                (0x20000, 512),
                (0x1ff, 2),
                (0x30001, (1 << cb) - 1),
            ] {
                let e = l.encode_compressed(off, size);
                let d = l.compressed_desc(e).unwrap();
                assert_eq!(d.offset, off);
                assert!(
                    d.size >= size && d.size < size + 512,
                    "cb {cb} off {off:#x}"
                );
                assert_eq!((d.offset + d.size) % 512, 0);
            }
        }
    }
}
