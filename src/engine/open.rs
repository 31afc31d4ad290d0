//! Opening one qcow2 image: header, active L1 table, snapshot table and bitmap
//! directory, with the open-time checks (design.md, "Hostile input"); for a writable
//! image also the refcount table and the record of its metadata clusters, the refcount
//! rebuild of an image left dirty, and the bitmaps checked and loaded (`bitmaps`).

use super::alloc::Allocator;
use super::bitmaps::BitmapSet;
use super::cache::Cache;
use super::encryption::Encryption;
use super::image::{Image, ImageOptions, Meta, Snapshot, SnapshotKey, Tables, WriteState};
use super::metaio::MetaIo;
use super::overlap::{MetaKind, MetaMap};
use crate::error::{Error, Result};
use crate::format::bitmap::{self, BitmapEntry};
use crate::format::entry::{EntryLayout, entry_host};
use crate::format::header::{self, Header, MAX_L1_ENTRIES};
use crate::format::refcount::{RefcountLayout, reftable_block_offset};
use crate::format::snapshot::{self, TableRead};
use crate::format::units::{HostCluster, HostOffset};
use crate::storage::Storage;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

impl Image {
    /// Opens the image stored in `file`; `path` names it in messages.
    pub fn open(path: &Path, file: Arc<dyn Storage>, opts: &ImageOptions) -> Result<Image> {
        let io = MetaIo::new(path, file);
        let in_file = |e: Error| e.in_file(path);
        let file_len = io.len()?;
        let start = io.read("the header", HostOffset(0), 512.min(file_len as usize))?;
        let cluster_bits = header::peek_cluster_bits(&start).map_err(|e| in_file(e.into()))?;
        let c0 = io.read("the header cluster", HostOffset(0), 1 << cluster_bits)?;
        let header = Header::parse_allowing_encryption(&c0).map_err(|e| in_file(e.into()))?;
        let encryption = Encryption::read(&io, &header, file_len)?;
        // A read-write open is refused below, without this warning.
        if header.is_corrupt() && !opts.writable {
            log::warn!(
                "{}: the image is marked corrupt (incompatible bit 1); reading it anyway, read-only",
                path.display()
            );
        }
        let layout = EntryLayout {
            cluster_bits,
            extended_l2: header.extended_l2(),
            zero_flag: header.version >= 3,
            data_file: header.has_data_file(),
        };
        let l1_bytes = header.l1_size as u64 * 8;
        if l1_bytes > 0 && header.l1_table_offset.saturating_add(l1_bytes) > file_len {
            return Err(in_file(Error::corrupt(format!(
                "l1_table_offset at offset 0x28: L1 table at {:#x} ({} entries) runs past the end of the file ({} bytes)",
                header.l1_table_offset, header.l1_size, file_len
            ))));
        }
        let l1 = io.read_words(
            "the L1 table",
            HostOffset(header.l1_table_offset),
            header.l1_size as usize,
        )?;
        let snapshots = read_snapshots(&io, &header, file_len)?;
        let bitmaps = BitmapSet::new(read_bitmaps(&io, &header, file_len).map_err(|e| {
            if !opts.writable {
                log::warn!("{e:#}; ignoring the persistent bitmaps");
            }
            e.report()
        }));
        let tables = (opts.cache_bytes >> cluster_bits).max(4) as usize;
        let t = Tables {
            header,
            l1,
            l1_dirty: false,
            snapshots: snapshots.into(),
        };
        let w = if opts.writable {
            check_writable_open(path, &t.header, &bitmaps)?;
            Some(load_write_state(&io, &t, &bitmaps.file, tables)?)
        } else {
            None
        };
        let dirty = t.header.is_dirty();
        let image = Image {
            io,
            layout,
            meta: RwLock::new(Meta { t, w }),
            l2_cache: Cache::new(tables),
            snapshot_l1s: Mutex::new(HashMap::new()),
            bitmaps: Mutex::new(bitmaps),
            recording: Default::default(),
            preallocated: OnceLock::new(),
            writable: std::sync::atomic::AtomicBool::new(opts.writable),
            corrupt: OnceLock::new(),
            data_store: OnceLock::new(),
            ranges: Default::default(),
            encryption,
        };
        if opts.writable && dirty {
            eprintln!(
                "qcow2fs: {} was not closed cleanly (dirty bit set); rebuilding its refcounts before writing",
                path.display()
            );
            image.rebuild_refcounts()?;
        }
        if opts.writable {
            image.load_bitmaps_for_write()?;
        }
        Ok(image)
    }
}

/// What writing an image needs besides its tables: the refcount table and the
/// allocator over it, with the record of the image's metadata clusters. Allocation
/// starts at the end of the file.
pub(crate) fn load_write_state(
    io: &MetaIo,
    t: &Tables,
    bitmaps: &[BitmapEntry],
    cache_tables: usize,
) -> Result<WriteState> {
    let h = &t.header;
    let cb = h.cluster_bits;
    let reftable = io.read_words(
        "the refcount table",
        HostOffset(h.refcount_table_offset),
        ((h.refcount_table_clusters as u64) << cb) as usize / 8,
    )?;
    let overlap = metadata_map(io, h, &t.l1, &reftable, &t.snapshots, bitmaps)?;
    Ok(WriteState {
        alloc: Allocator::new(
            reftable,
            HostOffset(h.refcount_table_offset),
            h.refcount_table_clusters,
            RefcountLayout {
                order: h.refcount_order,
                cluster_bits: cb,
            },
            (cache_tables / 4).max(16),
            HostCluster(io.len()?.div_ceil(1 << cb)),
            overlap,
        ),
        deferred: Vec::new(),
        prepared: false,
        we_set_dirty: false,
    })
}

/// The rules for opening read-write: no corrupt bit, a bitmap directory that could be
/// read. (The bitmaps themselves are checked and loaded once the write state exists,
/// `load_bitmaps_for_write`.)
pub(crate) fn check_writable_open(path: &Path, header: &Header, bitmaps: &BitmapSet) -> Result<()> {
    if header.is_corrupt() {
        return Err(Error::unsupported(
            "the image is marked corrupt (incompatible bit 1); refusing to open it read-write (repair it with `qemu-img check -r all`, or mount it read-only)",
        )
        .in_file(path));
    }
    if let Some(p) = &bitmaps.problem {
        // Before anything reads the bitmap structures the problem is about.
        return Err(super::bitmaps::refuse_write(path, p));
    }
    Ok(())
}

/// The snapshot table, read in as few requests as the entries' sizes allow.
pub(crate) fn read_snapshots(io: &MetaIo, h: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let off = h.snapshots_offset;
    let avail = file_len.saturating_sub(off).min(snapshot::MAX_TABLE_BYTES);
    let mut want = (h.nb_snapshots as u64 * 48).min(avail).max(4096.min(avail));
    loop {
        let bytes = io.read("the snapshot table", HostOffset(off), want as usize)?;
        match snapshot::parse_table(&bytes, h.nb_snapshots, off)
            .map_err(|e| Error::from(e).in_file(io.path()))?
        {
            TableRead::Entries(entries) => {
                let current = h.virtual_size();
                return Ok(entries
                    .into_iter()
                    .map(|entry| Snapshot {
                        key: SnapshotKey::fresh(),
                        disk_size: entry.disk_size.unwrap_or(current) & !511,
                        entry,
                    })
                    .collect());
            }
            TableRead::NeedBytes(n) => {
                if n as u64 > avail {
                    return Err(Error::corrupt(format!(
                        "snapshots_offset at offset 0x40: the table of {} snapshots at {off:#x} runs past the end of the file ({file_len} bytes)",
                        h.nb_snapshots
                    ))
                    .in_file(io.path()));
                }
                want = (n as u64).max(want * 2).min(avail);
            }
        }
    }
}

fn read_bitmaps(io: &MetaIo, h: &Header, file_len: u64) -> Result<Vec<BitmapEntry>> {
    let Some(ext) = h.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & header::autoclear::BITMAPS == 0 {
        // The bitmaps are all inconsistent; QEMU drops them on a read-write open.
        return Ok(Vec::new());
    }
    // QEMU refuses to open such an image at all; qcow2fs still reads it (the bitmaps are
    // not needed for that) and refuses to write it.
    let bad = |m: String| {
        Err(Error::corrupt(format!(
            "the bitmaps extension at offset {:#x}: {m}",
            ext.ext_offset
        ))
        .in_file(io.path()))
    };
    if ext.nb_bitmaps == 0 {
        return bad("it lists 0 bitmaps".into());
    }
    if ext.nb_bitmaps > bitmap::MAX_BITMAPS {
        return bad(format!(
            "{} bitmaps exceed QEMU's limit of {}",
            ext.nb_bitmaps,
            bitmap::MAX_BITMAPS
        ));
    }
    if ext.directory_size > bitmap::MAX_DIRECTORY_BYTES {
        return bad(format!(
            "the directory size {} exceeds the 64 MiB limit",
            ext.directory_size
        ));
    }
    if ext.directory_offset == 0 || !ext.directory_offset.is_multiple_of(h.cluster_size()) {
        return bad(format!(
            "the directory offset {:#x} is not a cluster-aligned offset",
            ext.directory_offset
        ));
    }
    if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
        return Err(Error::corrupt(format!(
            "bitmap directory at {:#x} ({} bytes) runs past the end of the file",
            ext.directory_offset, ext.directory_size
        ))
        .in_file(io.path()));
    }
    let bytes = io.read(
        "the bitmap directory",
        HostOffset(ext.directory_offset),
        ext.directory_size as usize,
    )?;
    bitmap::parse_directory(&bytes, ext.nb_bitmaps, ext.directory_offset)
        .map_err(|e| Error::from(e).in_file(io.path()))
}

/// Every metadata cluster of an image, for the overlap checks of a writable image: the
/// header, the active L1 table and its L2 tables, the refcount table and blocks, the
/// snapshot table with each snapshot's L1 table and L2 tables, the bitmaps, and the
/// LUKS area of an encrypted image. A
/// snapshot whose L1 table lies outside the file is left out with a warning (as the
/// mount leaves it out).
pub(crate) fn metadata_map(
    io: &MetaIo,
    header: &Header,
    l1: &[u64],
    reftable: &[u64],
    snapshots: &[Snapshot],
    bitmaps: &[BitmapEntry],
) -> Result<MetaMap> {
    let cb = header.cluster_bits;
    let mut map = MetaMap::default();
    let claim_l2s = |map: &mut MetaMap, l1: &[u64], kind| {
        for &e in l1 {
            let off = entry_host(e);
            if off.0 != 0 {
                map.claim(off.cluster(cb), 1, kind);
            }
        }
    };
    map.claim(HostCluster(0), 1, MetaKind::Header);
    if let Some((offset, length)) = header.fde {
        // Checked at open to lie inside the file.
        map.claim_bytes(HostOffset(offset), length, cb, MetaKind::LuksArea);
    }
    map.claim_bytes(
        HostOffset(header.l1_table_offset),
        header.l1_size as u64 * 8,
        cb,
        MetaKind::ActiveL1,
    );
    claim_l2s(&mut map, l1, MetaKind::ActiveL2);
    map.claim_bytes(
        HostOffset(header.refcount_table_offset),
        (header.refcount_table_clusters as u64) << cb,
        cb,
        MetaKind::RefcountTable,
    );
    for &e in reftable {
        let off = HostOffset(reftable_block_offset(e));
        if off.0 != 0 {
            map.claim(off.cluster(cb), 1, MetaKind::RefcountBlock);
        }
    }
    if !snapshots.is_empty() {
        let table_len: u64 = snapshots.iter().map(|s| s.entry.encoded_len() as u64).sum();
        map.claim_bytes(
            HostOffset(header.snapshots_offset),
            table_len,
            cb,
            MetaKind::SnapshotTable,
        );
    }
    let file_len = io.len()?;
    for s in snapshots {
        let e = &s.entry;
        let bytes = e.l1_size as u64 * 8;
        if bytes > MAX_L1_ENTRIES * 8 || e.l1_table_offset.saturating_add(bytes) > file_len {
            log::warn!(
                "{}: the L1 table of snapshot {} lies outside the file; its clusters are not protected from writes",
                io.path().display(),
                e.id
            );
            continue;
        }
        let off = HostOffset(e.l1_table_offset);
        map.claim_bytes(off, bytes, cb, MetaKind::SnapshotL1);
        let snap_l1 = io.read_words("a snapshot L1 table", off, e.l1_size as usize)?;
        claim_l2s(&mut map, &snap_l1, MetaKind::SnapshotL2);
    }
    if let Some(ext) = header
        .bitmaps
        .filter(|_| header.autoclear_features & header::autoclear::BITMAPS != 0)
    {
        map.claim_bytes(
            HostOffset(ext.directory_offset),
            ext.directory_size,
            cb,
            MetaKind::BitmapDirectory,
        );
        for b in bitmaps {
            let bytes = b.table_size as u64 * 8;
            if b.table_offset.saturating_add(bytes) > file_len {
                continue;
            }
            let off = HostOffset(b.table_offset);
            map.claim_bytes(off, bytes, cb, MetaKind::BitmapTable);
            for w in io.read_words("a bitmap table", off, b.table_size as usize)? {
                let data = entry_host(w);
                if data.0 != 0 {
                    map.claim(data.cluster(cb), 1, MetaKind::BitmapData);
                }
            }
        }
    }
    Ok(map)
}
