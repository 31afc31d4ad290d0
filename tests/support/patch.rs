//! The tests' own minimal reader and patcher of qcow2 files: header fields at their
//! fixed offsets, the geometry and table positions of a (still valid) image, cluster 0
//! split into header, extensions and backing name, snapshot-table entries, and patches
//! for the states QEMU's tools will not create on purpose (a missing backing-format
//! extension, a snapshot's VM-state size, an in-use bitmap, every malformed field).
//!
//! It parses only what it needs, without the code under test.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_FDE: u32 = 0x0537_BE77;

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;

/// `len` bytes of file `p` at `off` (zeros past its end).
pub fn read_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
    let mut b = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut b[done..], off + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    b
}

/// The big-endian 32-bit field at `off` of file `p`.
pub fn read_be32(p: &Path, off: u64) -> u32 {
    u32::from_be_bytes(read_bytes(p, off, 4).try_into().unwrap())
}

/// The big-endian 64-bit field at `off` of file `p`.
pub fn read_be64(p: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_bytes(p, off, 8).try_into().unwrap())
}

/// Overwrites bytes of file `p` at `off` (not through QEMU).
pub fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("opening {} for writing: {e}", p.display()));
    f.write_all_at(bytes, off).unwrap();
}

pub fn put8(p: &Path, off: u64, v: u8) {
    patch(p, off, &[v]);
}

pub fn put32(p: &Path, off: u64, v: u32) {
    patch(p, off, &v.to_be_bytes());
}

pub fn put64(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_be_bytes());
}

pub fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// A cluster-aligned offset well past the end of the file.
pub fn past_eof(p: &Path, cs: u64) -> u64 {
    file_len(p).next_multiple_of(cs) + 16 * cs
}

/// Sets incompatible-feature bit `bit` in the header.
pub fn set_incompat_bit(p: &Path, bit: u32) {
    let v = read_be64(p, hdr::INCOMPAT);
    put64(p, hdr::INCOMPAT, v | (1u64 << bit));
}

/// Header fields at their fixed offsets.
pub mod hdr {
    pub const VERSION: u64 = 4;
    pub const BACKING_OFFSET: u64 = 8;
    pub const BACKING_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_OFFSET: u64 = 40;
    pub const REFCOUNT_OFFSET: u64 = 48;
    pub const REFCOUNT_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPAT: u64 = 72;
    pub const AUTOCLEAR: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// The geometry of a (still valid) image, read straight from its header.
#[derive(Clone, Debug)]
pub struct Geo {
    pub version: u32,
    pub cluster_bits: u32,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_offset: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub extended: bool,
    pub header_length: u64,
}

impl Geo {
    pub fn read(p: &Path) -> Geo {
        let version = read_be32(p, hdr::VERSION);
        let incompat = if version >= 3 {
            read_be64(p, hdr::INCOMPAT)
        } else {
            0
        };
        Geo {
            version,
            cluster_bits: read_be32(p, hdr::CLUSTER_BITS),
            l1_size: read_be32(p, hdr::L1_SIZE),
            l1_offset: read_be64(p, hdr::L1_OFFSET),
            refcount_offset: read_be64(p, hdr::REFCOUNT_OFFSET),
            nb_snapshots: read_be32(p, hdr::NB_SNAPSHOTS),
            snapshots_offset: read_be64(p, hdr::SNAPSHOTS_OFFSET),
            extended: incompat & (1 << 4) != 0,
            header_length: if version >= 3 {
                read_be32(p, hdr::HEADER_LENGTH) as u64
            } else {
                72
            },
        }
    }

    pub fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn l2_entry_size(&self) -> u64 {
        if self.extended { 16 } else { 8 }
    }

    pub fn l2_entries(&self) -> u64 {
        self.cs() / self.l2_entry_size()
    }

    /// File offset of the entry for `guest` in the L1 table at `l1_offset`.
    pub fn l1_entry_at(&self, l1_offset: u64, guest: u64) -> u64 {
        l1_offset + 8 * ((guest >> self.cluster_bits) / self.l2_entries())
    }

    /// File offset of the L2 entry for `guest` reached through the L1 table at `l1_offset`.
    pub fn l2_entry_at(&self, p: &Path, l1_offset: u64, guest: u64) -> u64 {
        let l2 = read_be64(p, self.l1_entry_at(l1_offset, guest)) & OFFSET_MASK;
        assert_ne!(l2, 0, "no L2 table for guest offset {guest:#x}");
        l2 + self.l2_entry_size() * ((guest >> self.cluster_bits) % self.l2_entries())
    }

    /// File offset of the active L2 entry for `guest`.
    pub fn l2_entry(&self, p: &Path, guest: u64) -> u64 {
        self.l2_entry_at(p, self.l1_offset, guest)
    }

    /// (offset, length) of the compressed data a compressed L2 entry describes.
    pub fn compressed_range(&self, entry: u64) -> (u64, u64) {
        assert!(
            entry & COMPRESSED != 0,
            "entry {entry:#x} is not compressed"
        );
        let x = 62 - (self.cluster_bits - 8);
        let off = entry & ((1u64 << x) - 1);
        let count = (entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
        (off, (count + 1) * 512 - (off & 511))
    }
}

/// One header-extension record.
#[derive(Clone, Debug)]
pub struct Ext {
    /// File offset of the record (its type field).
    pub off: u64,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// Cluster 0 split into its parts, so extensions and the backing name can be rewritten.
pub struct Cluster0 {
    pub fixed: Vec<u8>,
    pub exts: Vec<Ext>,
    pub backing: Option<Vec<u8>>,
    pub cs: usize,
}

impl Cluster0 {
    pub fn load(p: &Path) -> Cluster0 {
        let g = Geo::read(p);
        let cs = g.cs() as usize;
        let c0 = read_bytes(p, 0, cs);
        let boff = u64::from_be_bytes(c0[8..16].try_into().unwrap()) as usize;
        let bsize = u32::from_be_bytes(c0[16..20].try_into().unwrap()) as usize;
        let end = if boff != 0 { boff } else { cs };
        let mut exts = Vec::new();
        let mut off = g.header_length as usize;
        while off + 8 <= end {
            let kind = u32::from_be_bytes(c0[off..off + 4].try_into().unwrap());
            let len = u32::from_be_bytes(c0[off + 4..off + 8].try_into().unwrap()) as usize;
            if kind == 0 {
                break;
            }
            exts.push(Ext {
                off: off as u64,
                kind,
                data: c0[off + 8..off + 8 + len].to_vec(),
            });
            off += 8 + len.next_multiple_of(8);
        }
        Cluster0 {
            fixed: c0[..g.header_length as usize].to_vec(),
            exts,
            backing: (boff != 0).then(|| c0[boff..boff + bsize].to_vec()),
            cs,
        }
    }

    pub fn ext(&self, kind: u32) -> Option<&Ext> {
        self.exts.iter().find(|e| e.kind == kind)
    }

    pub fn without(mut self, kind: u32) -> Cluster0 {
        self.exts.retain(|e| e.kind != kind);
        self
    }

    pub fn with_ext(mut self, kind: u32, data: &[u8]) -> Cluster0 {
        self.exts.push(Ext {
            off: 0,
            kind,
            data: data.to_vec(),
        });
        self
    }

    pub fn with_backing(mut self, name: Option<&[u8]>) -> Cluster0 {
        self.backing = name.map(<[u8]>::to_vec);
        self
    }

    /// Writes cluster 0 back in QEMU's layout (header, extensions, end marker, name).
    pub fn store(&self, p: &Path) {
        let mut b = self.fixed.clone();
        for e in &self.exts {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        match &self.backing {
            Some(name) => {
                let off = b.len() as u64;
                b[8..16].copy_from_slice(&off.to_be_bytes());
                b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
                b.extend_from_slice(name);
            }
            None => b[8..20].fill(0),
        }
        assert!(b.len() <= self.cs, "cluster 0 overflows");
        b.resize(self.cs, 0);
        patch(p, 0, &b);
    }
}

/// One snapshot-table entry as stored.
#[derive(Clone, Debug)]
pub struct SnapRec {
    /// File offset of the entry.
    pub off: u64,
    pub l1_offset: u64,
    pub extra_data_size: u64,
    pub name: String,
}

pub fn snapshots(p: &Path) -> Vec<SnapRec> {
    let g = Geo::read(p);
    let mut out = Vec::new();
    let mut off = g.snapshots_offset;
    for _ in 0..g.nb_snapshots {
        let e = read_bytes(p, off, 40);
        let id_len = u16::from_be_bytes([e[12], e[13]]) as u64;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as u64;
        let extra = u32::from_be_bytes(e[36..40].try_into().unwrap()) as u64;
        let name = read_bytes(p, off + 40 + extra + id_len, name_len as usize);
        out.push(SnapRec {
            off,
            l1_offset: u64::from_be_bytes(e[0..8].try_into().unwrap()),
            extra_data_size: extra,
            name: String::from_utf8_lossy(&name).into_owned(),
        });
        off += (40 + extra + id_len + name_len).next_multiple_of(8);
    }
    out
}

pub fn snapshot_named(p: &Path, name: &str) -> SnapRec {
    snapshots(p)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no snapshot {name}"))
}

/// Renames header extension `from` to type `to` (an unknown type, which readers skip).
pub fn retype_extension(path: &Path, from: u32, to: u32) {
    let e = Cluster0::load(path)
        .ext(from)
        .unwrap_or_else(|| panic!("{}: no extension {from:#x}", path.display()))
        .clone();
    put32(path, e.off, to);
}

/// Sets snapshot `index`'s VM-state size (the 32-bit field and the 64-bit extra field).
pub fn set_snapshot_vm_state_size(path: &Path, index: usize, size: u64) {
    let all = snapshots(path);
    let s = all
        .get(index)
        .unwrap_or_else(|| panic!("snapshot index {index} of {}", all.len()));
    put32(path, s.off + 32, size as u32);
    if s.extra_data_size >= 8 {
        put64(path, s.off + 40, size);
    }
}

/// The bitmap directory: (offset, size, number of entries).
pub fn bitmap_directory(path: &Path) -> (u64, u64, usize) {
    let ext = Cluster0::load(path)
        .ext(EXT_BITMAPS)
        .expect("bitmaps extension")
        .clone();
    let field = |at: usize, n: usize| {
        ext.data[at..at + n]
            .iter()
            .fold(0u64, |v, &b| v << 8 | b as u64)
    };
    (field(16, 8), field(8, 8), field(0, 4) as usize)
}

/// Where the directory entry of bitmap `name` is in the file (its fields: table offset
/// +0, table size +8, flags +12, type +16, granularity bits +17, name size +18).
pub fn bitmap_entry_offset(path: &Path, name: &str) -> u64 {
    let (dir_off, dir_size, nb) = bitmap_directory(path);
    let dir = read_bytes(path, dir_off, dir_size as usize);
    let be32 = |at: usize| u32::from_be_bytes(dir[at..at + 4].try_into().unwrap());
    let mut e = 0usize;
    for _ in 0..nb {
        let name_size = u16::from_be_bytes([dir[e + 18], dir[e + 19]]) as usize;
        let extra = be32(e + 20) as usize;
        if &dir[e + 24 + extra..e + 24 + extra + name_size] == name.as_bytes() {
            return dir_off + e as u64;
        }
        e += (24 + extra + name_size).div_ceil(8) * 8;
    }
    panic!("{}: no bitmap named {name}", path.display());
}

/// ORs `flags` into the directory entry of bitmap `name`.
pub fn set_bitmap_flags(path: &Path, name: &str, flags: u32) {
    let at = bitmap_entry_offset(path, name) + 12;
    put32(path, at, read_be32(path, at) | flags);
}
