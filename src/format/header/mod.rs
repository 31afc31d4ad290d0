//! The qcow2 header in cluster 0: fixed fields, feature bits, header extensions and the
//! backing file name. `Header::parse` validates everything a strict reader checks at
//! open (design.md, "Hostile input"); `Header::encode` writes cluster 0
//! back in QEMU's order, keeping unknown fields and extensions.

mod extensions;
mod validate;

use super::error::{FormatError, be32, be64};

/// The magic that opens every qcow2 image: `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header, in bytes.
pub const V2_HEADER_LEN: usize = 72;
/// The shortest version 3 header, in bytes.
pub const V3_MIN_HEADER_LEN: usize = 104;
/// QEMU writes this header length for every v3 image it creates.
pub const V3_HEADER_LEN: usize = 112;

/// The smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// The largest cluster: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on an L1 table: 32 MiB.
pub const MAX_L1_ENTRIES: u64 = 4 * 1024 * 1024;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The longest backing file name, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// More header extensions than this in one cluster is not something any writer produces.
pub const MAX_EXTENSIONS: usize = 1024;

/// Header extension types.
pub mod ext {
    /// Ends the list of extensions.
    pub const END: u32 = 0;
    /// The backing file's format name.
    pub const BACKING_FORMAT: u32 = 0xE279_2ACA;
    /// Names of the feature bits.
    pub const FEATURE_TABLE: u32 = 0x6803_F857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption: where the LUKS header is.
    pub const FDE: u32 = 0x0537_BE77;
    /// The external data file's name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits: a reader that does not know one must refuse the image.
pub mod incompat {
    /// The image was not closed cleanly; refcounts may be stale (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt; it may only be read.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data is in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is valid (zstd).
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are extended, with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every incompatible bit qcow2fs knows.
    pub const KNOWN: u64 = 0x1f;
}

/// Compatible feature bits: a reader may ignore them.
pub mod compat {
    /// Refcounts may be updated lazily; the dirty bit then says they need a repair.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits: a writer that does not know one clears it.
pub mod autoclear {
    /// The bitmaps extension is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image on its own.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every autoclear bit qcow2fs knows.
    pub const KNOWN: u64 = 0x3;
}

/// How compressed clusters are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// deflate, which qemu-img calls `zlib` (the default).
    Deflate,
    /// zstd.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The encryption method named by the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptMethod {
    /// Not encrypted.
    None,
    /// QEMU's legacy AES-CBC method.
    Aes,
    /// LUKS, its header in the image (the full disk encryption extension).
    Luks,
}

/// One entry of the feature-name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// The bit number.
    pub bit: u8,
    /// The feature's name.
    pub name: String,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Where the extension record is in cluster 0 (for messages).
    pub ext_offset: u64,
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the directory, in bytes.
    pub directory_size: u64,
    /// Host offset of the directory.
    pub directory_offset: u64,
}

/// An extension qcow2fs does not interpret, kept so a rewrite of cluster 0 preserves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownExtension {
    /// The extension's type.
    pub kind: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// A validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version: 2 or 3.
    pub version: u32,
    /// Cluster size as a power of two.
    pub cluster_bits: u32,
    /// The size field as stored; see [`Header::virtual_size`].
    pub size: u64,
    /// The encryption method.
    pub crypt_method: CryptMethod,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table takes.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (`incompat`).
    pub incompatible_features: u64,
    /// Compatible feature bits (`compat`).
    pub compatible_features: u64,
    /// Autoclear feature bits (`autoclear`).
    pub autoclear_features: u64,
    /// Refcount width as a power of two, in bits (4 is 16-bit refcounts).
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// How compressed clusters are encoded.
    pub compression_type: CompressionType,
    /// Header bytes past offset 104 up to `header_length` (compression type, padding and
    /// fields newer than this implementation), kept verbatim.
    pub tail: Vec<u8>,
    /// The backing file name as stored (not necessarily UTF-8).
    pub backing_file: Option<Vec<u8>>,
    /// The backing file's format, from its extension.
    pub backing_format: Option<String>,
    /// The external data file's name as stored.
    pub data_file: Option<Vec<u8>>,
    /// The feature-name table.
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full-disk-encryption header pointer: (offset, length).
    pub fde: Option<(u64, u64)>,
    /// Extensions qcow2fs does not interpret, in order.
    pub unknown_extensions: Vec<UnknownExtension>,
}

/// Reads the cluster size from the first bytes of an image, so the caller knows how much
/// of cluster 0 to read before calling [`Header::parse`].
pub fn peek_cluster_bits(bytes: &[u8]) -> Result<u32, FormatError> {
    if bytes.len() < V2_HEADER_LEN {
        return Err(FormatError::invalid(
            "header",
            0,
            format!(
                "file is {} bytes, too short for a qcow2 header",
                bytes.len()
            ),
        ));
    }
    check_magic_version(bytes)?;
    let cluster_bits = be32(bytes, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(FormatError::invalid(
            "cluster_bits",
            20,
            format!("{cluster_bits} is outside the supported range 9..21"),
        ));
    }
    Ok(cluster_bits)
}

fn check_magic_version(bytes: &[u8]) -> Result<(), FormatError> {
    let magic = be32(bytes, 0);
    if magic != MAGIC {
        return Err(FormatError::invalid(
            "magic",
            0,
            // The bytes themselves are not shown: the file may be a secret (a backing
            // file name can point anywhere).
            "not a qcow2 image (the file does not start with the qcow2 magic QFI\\xfb)",
        ));
    }
    let version = be32(bytes, 4);
    if version == 1 {
        return Err(FormatError::unsupported(
            "version",
            4,
            "version 1 is the legacy qcow format, not qcow2",
        ));
    }
    if version != 2 && version != 3 {
        return Err(FormatError::invalid(
            "version",
            4,
            format!("{version} is not a qcow2 version (2 or 3)"),
        ));
    }
    Ok(())
}

impl Header {
    /// A version 3 header as QEMU writes a new image's, before its tables are placed:
    /// 16-bit refcounts, deflate, a 112-byte header, no L1 or refcount table, no
    /// snapshots, no features and no extensions. `size` is the size field in bytes.
    pub fn new_v3(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: 3,
            cluster_bits,
            size,
            crypt_method: CryptMethod::None,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: CompressionType::Deflate,
            // The compression type byte (0: deflate) and padding.
            tail: vec![0; V3_HEADER_LEN - V3_MIN_HEADER_LEN],
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            fde: None,
            unknown_extensions: Vec::new(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The guest disk size: QEMU counts whole 512-byte sectors.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// Whether L2 entries are extended.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Whether guest data is in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the external data file is a valid raw image on its own.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Whether refcounts may be updated lazily.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Bytes of guest space one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        (self.cluster_size() / entry) << self.cluster_bits
    }

    /// Number of L1 entries a disk of `size` bytes needs.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Where the header-extension area ends (exclusive).
    fn extension_end(cs: u64, backing_offset: u64) -> u64 {
        if backing_offset != 0 {
            backing_offset.min(cs)
        } else {
            cs
        }
    }

    /// Parses and validates cluster 0, and refuses encrypted images. `bytes` holds the
    /// start of the file: at least the whole first cluster, zero-filled where the file is
    /// shorter.
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        let h = Self::parse_allowing_encryption(bytes)?;
        if h.crypt_method != CryptMethod::None {
            let what = match h.crypt_method {
                CryptMethod::Aes => "legacy AES",
                _ => "LUKS",
            };
            return Err(FormatError::unsupported(
                "crypt_method",
                32,
                format!("image is encrypted ({what}); encryption is not supported yet"),
            ));
        }
        Ok(h)
    }

    /// [`Header::parse`] for a reader that can decrypt: encrypted images pass, with the
    /// LUKS area (`fde`) checked to be cluster-aligned and not empty, as QEMU checks it.
    pub fn parse_allowing_encryption(bytes: &[u8]) -> Result<Header, FormatError> {
        let cluster_bits = peek_cluster_bits(bytes)?;
        let cs = 1u64 << cluster_bits;
        if (bytes.len() as u64) < cs {
            return Err(FormatError::invalid(
                "header",
                0,
                format!(
                    "need the whole first cluster ({cs} bytes), got {}",
                    bytes.len()
                ),
            ));
        }
        let version = be32(bytes, 4);
        let backing_file_offset = be64(bytes, 8);
        let backing_file_size = be32(bytes, 16);
        let size = be64(bytes, 24);
        let crypt = be32(bytes, 32);
        let l1_size = be32(bytes, 36);
        let l1_table_offset = be64(bytes, 40);
        let refcount_table_offset = be64(bytes, 48);
        let refcount_table_clusters = be32(bytes, 56);
        let nb_snapshots = be32(bytes, 60);
        let snapshots_offset = be64(bytes, 64);

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            let header_length = be32(bytes, 100);
            if (header_length as usize) < V3_MIN_HEADER_LEN {
                return Err(FormatError::invalid(
                    "header_length",
                    100,
                    format!("{header_length} is shorter than the 104 bytes of a v3 header"),
                ));
            }
            if header_length as u64 > cs {
                return Err(FormatError::invalid(
                    "header_length",
                    100,
                    format!("{header_length} is larger than the cluster size {cs}"),
                ));
            }
            if !header_length.is_multiple_of(8) {
                return Err(FormatError::invalid(
                    "header_length",
                    100,
                    format!("{header_length} is not a multiple of 8"),
                ));
            }
            (
                be64(bytes, 72),
                be64(bytes, 80),
                be64(bytes, 88),
                be32(bytes, 96),
                header_length,
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN as u32)
        };

        let tail = if version == 3 {
            bytes[V3_MIN_HEADER_LEN..header_length as usize].to_vec()
        } else {
            Vec::new()
        };

        // Extensions come first: the feature-name table names unknown feature bits.
        if backing_file_offset != 0 {
            if backing_file_offset > cs {
                return Err(FormatError::invalid(
                    "backing_file_offset",
                    8,
                    format!("{backing_file_offset:#x} lies outside cluster 0 ({cs} bytes)"),
                ));
            }
            if backing_file_size > MAX_BACKING_NAME {
                return Err(FormatError::invalid(
                    "backing_file_size",
                    16,
                    format!("{backing_file_size} is longer than the 1023-byte limit"),
                ));
            }
            if backing_file_size as u64 > cs - backing_file_offset {
                return Err(FormatError::invalid(
                    "backing_file_size",
                    16,
                    format!(
                        "name of {backing_file_size} bytes at {backing_file_offset:#x} runs past cluster 0"
                    ),
                ));
            }
            if backing_file_offset < header_length as u64 {
                return Err(FormatError::invalid(
                    "backing_file_offset",
                    8,
                    format!("{backing_file_offset:#x} overlaps the {header_length}-byte header"),
                ));
            }
        }
        let ext_end = Self::extension_end(cs, backing_file_offset);
        let mut h = Header {
            version,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            tail,
            ..Header::new_v3(cluster_bits, size)
        };
        h.parse_extensions(bytes, header_length as u64, ext_end)?;
        if backing_file_offset != 0 {
            let start = backing_file_offset as usize;
            let name = bytes[start..start + backing_file_size as usize].to_vec();
            h.backing_file = Some(name);
        }
        h.validate_fields(crypt)?;
        Ok(h)
    }

    /// The name of a feature bit from the image's feature-name table, if it has one.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .rev()
            .find(|f| f.kind == kind && f.bit == bit && !f.name.is_empty())
            .map(|f| f.name.as_str())
    }

    /// Encodes cluster 0 in QEMU's order: header, backing format, data-file name,
    /// encryption pointer, feature table, bitmaps, unknown extensions, end marker, backing
    /// file name. Fails when it does not fit in one cluster.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        let crypt: u32 = match self.crypt_method {
            CryptMethod::None => 0,
            CryptMethod::Aes => 1,
            CryptMethod::Luks => 2,
        };
        b[32..36].copy_from_slice(&crypt.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            b[V3_MIN_HEADER_LEN..].copy_from_slice(&self.tail);
        }
        let push = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            push(&mut b, ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push(&mut b, ext::DATA_FILE, d);
        }
        if let Some((off, len)) = self.fde {
            let mut d = off.to_be_bytes().to_vec();
            d.extend_from_slice(&len.to_be_bytes());
            push(&mut b, ext::FDE, &d);
        }
        if !self.feature_names.is_empty() {
            let mut d = Vec::with_capacity(48 * self.feature_names.len());
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            push(&mut b, ext::FEATURE_TABLE, &d);
        }
        if let Some(bm) = self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&bm.directory_size.to_be_bytes());
            d.extend_from_slice(&bm.directory_offset.to_be_bytes());
            push(&mut b, ext::BITMAPS, &d);
        }
        for u in &self.unknown_extensions {
            push(&mut b, u.kind, &u.data);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name);
        }
        if b.len() > cs {
            return Err(FormatError::invalid(
                "header",
                0,
                format!(
                    "header, extensions and backing name need {} bytes, more than one cluster",
                    b.len()
                ),
            ));
        }
        b.resize(cs, 0);
        Ok(b)
    }
}
