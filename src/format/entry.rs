//! L1 and L2 table entries (standard and extended), and compressed-cluster descriptors:
//! decoding a raw entry into what the guest range it covers reads as, and encoding the
//! entries a writer stores (the encoders sit next to the decoders).

use super::units::{HostCluster, HostOffset};

/// The host offset bits of an L1 or standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero.
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// The entry's refcount is exactly one: the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// The L2 entry reads as zeros (version 3).
pub const ZERO_FLAG: u64 = 1;
/// Number of subclusters in a cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What the image's header says about how to read entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLayout {
    /// Cluster size as a power of two.
    pub cluster_bits: u32,
    /// L2 entries are extended (128 bits, with subclusters).
    pub extended_l2: bool,
    /// v3 images have the zero flag; in v2 it is corruption.
    pub zero_flag: bool,
    /// Data lives in an external data file.
    pub data_file: bool,
}

/// What a piece of guest space reads as, according to one L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Not allocated, but a host cluster is reserved for it (extended L2 only).
    UnallocatedAlloc {
        /// The reserved host cluster.
        host: HostOffset,
    },
    /// Reads as zeros without consulting the backing file.
    ZeroPlain,
    /// Reads as zeros; a host cluster is still allocated and referenced.
    ZeroAlloc {
        /// The allocated host cluster.
        host: HostOffset,
    },
    /// Data at `host` (+ offset in cluster).
    Normal {
        /// The host cluster.
        host: HostOffset,
    },
    /// Compressed data: `size` bytes at host byte offset `offset`.
    Compressed(CompressedDesc),
}

impl ClusterKind {
    /// The host cluster this entry references, if any (compressed ranges excluded).
    pub fn host_cluster(self) -> Option<HostOffset> {
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
    /// Host byte offset of the compressed data (not cluster-aligned).
    pub offset: HostOffset,
    /// Bytes to read from there: up to the end of the last 512-byte sector the entry names.
    pub size: u64,
}

/// The host offset an L1 or (standard) L2 entry points at; 0 means none.
pub fn entry_host(entry: u64) -> HostOffset {
    HostOffset(entry & OFFSET_MASK)
}

/// An L1 entry pointing at the L2 table at `l2`, or an L2 entry pointing at the data
/// cluster at `host`; `copied` when this is the cluster's only reference (refcount 1).
pub fn encode_pointer(host: HostOffset, copied: bool) -> u64 {
    (host.0 & OFFSET_MASK) | if copied { COPIED } else { 0 }
}

/// A standard L2 entry that reads as zeros and keeps the allocation of `entry`
/// (version 3 only).
pub fn encode_zero_keeping(entry: u64) -> u64 {
    (entry & (OFFSET_MASK | COPIED)) | ZERO_FLAG
}

/// The subcluster bitmap of an extended L2 entry: which of the 32 subclusters are
/// allocated, and which read as zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubclusterBitmap {
    /// Bit `i`: subcluster `i` is allocated.
    pub alloc: u32,
    /// Bit `i`: subcluster `i` reads as zeros.
    pub zero: u32,
}

impl SubclusterBitmap {
    /// The bitmap from the second word of an extended L2 entry.
    pub fn decode(word: u64) -> Self {
        SubclusterBitmap {
            alloc: word as u32,
            zero: (word >> 32) as u32,
        }
    }

    /// The second word of an extended L2 entry.
    pub fn encode(self) -> u64 {
        self.alloc as u64 | ((self.zero as u64) << 32)
    }

    /// Every subcluster reads as zeros, none allocated.
    pub const ALL_ZERO: SubclusterBitmap = SubclusterBitmap {
        alloc: 0,
        zero: u32::MAX,
    };

    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap {
        alloc: u32::MAX,
        zero: 0,
    };

    /// The mask of subclusters `first..=last`.
    pub fn range(first: u32, last: u32) -> u32 {
        let hi = if last >= 31 {
            u32::MAX
        } else {
            (1u32 << (last + 1)) - 1
        };
        hi & !((1u32 << first) - 1)
    }
}

/// Why an entry cannot be used. The engine turns this into an EIO with the entry's
/// location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// The host offset is not cluster-aligned.
    UnalignedOffset(u64),
    /// The zero flag is set in a version 2 image.
    ZeroFlagInV2,
    /// Alloc and zero bits both set for some subcluster.
    SubclusterBothBits(u64),
    /// Alloc bits set in an entry without a host cluster.
    AllocBitsWithoutCluster(u64),
    /// A compressed cluster in an image whose data is in an external file.
    CompressedWithDataFile,
    /// The compressed data's offset is beyond 2^56.
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

impl std::error::Error for EntryError {}

impl EntryLayout {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 when extended.
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

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS as u64
        } else {
            self.cluster_size()
        }
    }

    /// The L2 table offset an L1 entry points to; 0 means unallocated.
    pub fn l1_l2_offset(&self, entry: u64) -> Result<HostOffset, EntryError> {
        let off = entry_host(entry);
        if !off.is_aligned(self.cluster_bits) {
            return Err(EntryError::UnalignedOffset(off.0));
        }
        Ok(off)
    }

    /// The host clusters an L2 entry references (none with an external data file, whose
    /// clusters are not refcounted): what replacing the entry releases.
    pub fn referenced_clusters(&self, entry: u64) -> Vec<HostCluster> {
        if self.data_file {
            return Vec::new();
        }
        if entry & COMPRESSED != 0 {
            return match self.compressed_desc(entry) {
                Ok(d) => {
                    let start = HostOffset(d.offset.0 & !511);
                    let (first, n) =
                        start.clusters_spanned(d.offset.0 + d.size - start.0, self.cluster_bits);
                    (0..n).map(|k| first + k).collect()
                }
                Err(_) => Vec::new(),
            };
        }
        match entry_host(entry) {
            HostOffset(0) => Vec::new(),
            h => vec![h.cluster(self.cluster_bits)],
        }
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
            offset: HostOffset(offset),
            size: sectors * 512 - (offset & 511),
        })
    }

    /// Encodes a compressed entry for `size` bytes of compressed data at `offset`.
    pub fn encode_compressed(&self, offset: HostOffset, size: u64) -> u64 {
        let shift = 62 - (self.cluster_bits - 8);
        let offset = offset.0;
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
        let host = entry_host(entry);
        // With an external data file, COPIED and offset 0 is a real cluster at offset 0.
        let allocated = host.0 != 0 || (self.data_file && entry & COPIED != 0);
        if allocated && !host.is_aligned(self.cluster_bits) {
            return Err(EntryError::UnalignedOffset(host.0));
        }
        if !self.extended_l2 {
            if entry & ZERO_FLAG != 0 {
                if !self.zero_flag {
                    return Err(EntryError::ZeroFlagInV2);
                }
                let kind = if host.0 != 0 {
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
            ClusterKind::ZeroAlloc {
                host: HostOffset(0x50000)
            }
        );
        assert_eq!(
            l.classify(COPIED | 0x50000, 0, 0).unwrap().0,
            ClusterKind::Normal {
                host: HostOffset(0x50000)
            }
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
            ClusterKind::Normal {
                host: HostOffset(0)
            }
        );
    }

    #[test]
    fn extended_entries() {
        let l = EntryLayout {
            extended_l2: true,
            ..std64()
        };
        let host = HostOffset(0x70000);
        // subclusters 0-1 allocated, 2 zero, rest unallocated
        let bm = SubclusterBitmap {
            alloc: 0b11,
            zero: 0b100,
        }
        .encode();
        assert_eq!(bm, 0b11u64 | (1u64 << 34));
        let host_word = encode_pointer(host, false);
        assert_eq!(
            l.classify(host_word, bm, 0).unwrap(),
            (ClusterKind::Normal { host }, 2)
        );
        assert_eq!(
            l.classify(host_word, bm, 2).unwrap(),
            (ClusterKind::ZeroAlloc { host }, 1)
        );
        assert_eq!(
            l.classify(host_word, bm, 3).unwrap(),
            (ClusterKind::UnallocatedAlloc { host }, 29)
        );
        assert_eq!(SubclusterBitmap::range(2, 4), 0b11100);
        assert_eq!(SubclusterBitmap::range(0, 31), u32::MAX);
        assert_eq!(
            SubclusterBitmap::decode(SubclusterBitmap::ALL_ZERO.encode()),
            SubclusterBitmap::ALL_ZERO
        );
        assert!(matches!(
            l.classify(host_word, 1 | (1 << 32), 0),
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
    fn references_and_encoders() {
        let l = std64();
        assert_eq!(
            l.referenced_clusters(encode_pointer(HostOffset(0x50000), true)),
            [HostCluster(5)]
        );
        assert!(l.referenced_clusters(ZERO_FLAG).is_empty());
        let c = l.encode_compressed(HostOffset(0x1ff00), 0x200);
        assert_eq!(l.referenced_clusters(c), [HostCluster(1), HostCluster(2)]);
        let e = encode_pointer(HostOffset(0x50000), true);
        assert_eq!(encode_zero_keeping(e), e | ZERO_FLAG);
        let df = EntryLayout {
            data_file: true,
            ..l
        };
        assert!(df.referenced_clusters(e).is_empty());
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
                let e = l.encode_compressed(HostOffset(off), size);
                let d = l.compressed_desc(e).unwrap();
                assert_eq!(d.offset, HostOffset(off));
                assert!(
                    d.size >= size && d.size < size + 512,
                    "cb {cb} off {off:#x}"
                );
                assert_eq!((d.offset.0 + d.size) % 512, 0);
            }
        }
    }
}
