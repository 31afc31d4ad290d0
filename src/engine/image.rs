//! Opening one qcow2 image: header, active L1 table, snapshot table and bitmap directory,
//! with the open-time checks of checklist section 16.

use super::cache::{Cache, L2Table};
use super::overlap::{MetaKind, MetaMap};
use super::refcount::RefState;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::{self, BitmapEntry};
use crate::format::entry::{EntryLayout, OFFSET_MASK};
use crate::format::header::{self, Header, MAX_L1_ENTRIES};
use crate::format::refcount::RefcountLayout;
use crate::format::snapshot::{self, SnapshotEntry, TableError};
use crate::storage::Storage;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;

/// Bytes of snapshot L1 tables kept cached (a table larger than this is still used, it
/// is just not kept alongside others).
const SNAPSHOT_L1_CACHE_BYTES: usize = 32 << 20;

/// Default size of the L2 cache in bytes.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

/// Settings for opening an image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Bytes of L2 tables to keep cached.
    pub cache_bytes: u64,
    /// Open for writing (the storage must be writable).
    pub writable: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            writable: false,
        }
    }
}

/// How much metadata an image holds in memory, and how much of it is not on disk yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Bytes the L2 cache may hold.
    pub l2_capacity_bytes: u64,
    /// L2 tables cached, and those changed since they were last written.
    pub l2_tables: u64,
    pub l2_dirty: u64,
    /// Refcount blocks cached, and those changed (writable images).
    pub refcount_blocks: u64,
    pub refcount_dirty: u64,
    /// The L1 table differs from the file.
    pub l1_dirty: bool,
}

/// Which L1 table a lookup goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    Active,
    /// Index into [`Image::snapshots`].
    Snapshot(usize),
}

/// An internal snapshot.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub entry: SnapshotEntry,
    /// The snapshot's own disk size (its extra data, else the image's size), in whole
    /// 512-byte sectors.
    pub disk_size: u64,
}

/// The metadata that writes change; lookups hold it shared (rule 1 in `engine`).
pub struct Meta {
    pub header: Header,
    pub l1: Vec<u64>,
    /// The L1 table differs from the file.
    pub(crate) l1_dirty: bool,
    /// Refcount state (writable images only).
    pub(crate) rc: Option<RefState>,
    /// Host clusters whose references were dropped from cached tables; their refcounts
    /// are decremented once those tables are on disk.
    pub(crate) deferred: Vec<u64>,
    /// The first-write duties are done.
    pub(crate) prepared: bool,
    /// qcow2fs set the dirty bit (lazy refcounts) and clears it at a clean close.
    pub(crate) we_set_dirty: bool,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// One open qcow2 image.
pub struct Image {
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) layout: EntryLayout,
    pub(crate) meta: RwLock<Meta>,
    pub(crate) l2_cache: Cache<L2Table>,
    snapshots: Vec<Snapshot>,
    snapshot_l1: Mutex<HashMap<usize, Arc<Vec<u64>>>>,
    bitmaps: Vec<BitmapEntry>,
    bitmap_problem: Option<String>,
    pub(crate) preallocated: std::sync::OnceLock<bool>,
    pub(crate) writable: bool,
    /// A metadata write failed: refuse further writes.
    pub(crate) failed: AtomicBool,
    /// Why the image was marked corrupt while open: further writes are refused.
    pub(crate) corrupt: OnceLock<String>,
    /// The external data file, flushed before metadata that points into it.
    pub(crate) data_store: OnceLock<(PathBuf, Arc<dyn Storage>)>,
    /// Guest range locks (writable images).
    pub ranges: super::ranges::RangeLocks,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({})", self.path.display())
    }
}

fn read_meta(file: &dyn Storage, path: &Path, what: &str, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_or_zeros(&mut buf, off)
        .map_err(|e| Error::io(path, format!("reading {what} at {off:#x}"), e))?;
    Ok(buf)
}

impl Image {
    /// Opens the image stored in `file`; `path` names it in messages.
    pub fn open(path: &Path, file: Arc<dyn Storage>, opts: &ImageOptions) -> Result<Image> {
        let in_file = |e: Error| e.in_file(path);
        let file_len = file
            .len()
            .map_err(|e| Error::io(path, "reading the file size", e))?;
        let start = read_meta(&*file, path, "the header", 0, 512.min(file_len as usize))?;
        let cluster_bits = header::peek_cluster_bits(&start).map_err(|e| in_file(e.into()))?;
        let cs = 1u64 << cluster_bits;
        let c0 = read_meta(&*file, path, "the header cluster", 0, cs as usize)?;
        let header = Header::parse(&c0).map_err(|e| in_file(e.into()))?;
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
        let raw = read_meta(
            &*file,
            path,
            "the L1 table",
            header.l1_table_offset,
            l1_bytes as usize,
        )?;
        let l1 = decode_words(&raw);
        let snapshots = Self::read_snapshots(&*file, path, &header, file_len)?;
        let (bitmaps, bitmap_problem) = match Self::read_bitmaps(&*file, path, &header, file_len) {
            Ok(b) => (b, None),
            Err(e) => {
                log::warn!("{e}; ignoring the persistent bitmaps");
                (Vec::new(), Some(e.to_string()))
            }
        };
        let tables = (opts.cache_bytes / cs).max(4) as usize;
        let rc = if opts.writable {
            Self::check_writable_open(path, &header, &bitmaps)?;
            let table_bytes = read_meta(
                &*file,
                path,
                "the refcount table",
                header.refcount_table_offset,
                (header.refcount_table_clusters as u64 * cs) as usize,
            )?;
            let table = decode_words(&table_bytes);
            let overlap = metadata_map(&*file, path, &header, &l1, &table, &snapshots, &bitmaps)?;
            Some(RefState::new(
                table,
                header.refcount_table_offset,
                header.refcount_table_clusters,
                RefcountLayout {
                    order: header.refcount_order,
                    cluster_bits,
                },
                (tables / 4).max(16),
                file_len.div_ceil(cs),
                overlap,
            ))
        } else {
            None
        };
        let dirty = header.is_dirty();
        let image = Image {
            path: path.to_path_buf(),
            file,
            layout,
            meta: RwLock::new(Meta {
                header,
                l1,
                l1_dirty: false,
                rc,
                deferred: Vec::new(),
                prepared: false,
                we_set_dirty: false,
            }),
            l2_cache: Cache::new(tables),
            snapshots,
            snapshot_l1: Mutex::new(HashMap::new()),
            bitmaps,
            bitmap_problem,
            preallocated: std::sync::OnceLock::new(),
            writable: opts.writable,
            failed: AtomicBool::new(false),
            corrupt: OnceLock::new(),
            data_store: OnceLock::new(),
            ranges: Default::default(),
        };
        if opts.writable && dirty {
            eprintln!(
                "qcow2fs: {} was not closed cleanly (dirty bit set); rebuilding its refcounts before writing",
                path.display()
            );
            image.rebuild_refcounts()?;
        }
        Ok(image)
    }

    /// The rules for opening read-write: no corrupt bit, no persistent bitmaps that
    /// writes would leave stale.
    fn check_writable_open(path: &Path, header: &Header, bitmaps: &[BitmapEntry]) -> Result<()> {
        if header.is_corrupt() {
            return Err(Error::unsupported(
                "the image is marked corrupt (incompatible bit 1); refusing to open it read-write (repair it with `qemu-img check -r all`, or mount it read-only)",
            )
            .in_file(path));
        }
        if !bitmaps.is_empty() {
            let names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
            return Err(Error::unsupported(format!(
                "the image has persistent dirty bitmaps ({}), which writes would leave stale; refusing to open it read-write (remove them with `qemu-img bitmap --remove`, or mount read-only)",
                names.join(", ")
            ))
            .in_file(path));
        }
        Ok(())
    }

    /// Tells the engine which store holds guest data, so flushes sync it first.
    pub fn set_data_store(&self, path: PathBuf, store: Arc<dyn Storage>) {
        let _ = self.data_store.set((path, store));
    }

    fn read_snapshots(
        file: &dyn Storage,
        path: &Path,
        h: &Header,
        file_len: u64,
    ) -> Result<Vec<Snapshot>> {
        if h.nb_snapshots == 0 {
            return Ok(Vec::new());
        }
        let off = h.snapshots_offset;
        let avail = file_len.saturating_sub(off).min(snapshot::MAX_TABLE_BYTES);
        let mut want = (h.nb_snapshots as u64 * 48).min(avail).max(4096.min(avail));
        loop {
            let bytes = read_meta(file, path, "the snapshot table", off, want as usize)?;
            match snapshot::parse_table(&bytes, h.nb_snapshots, off) {
                Ok(entries) => {
                    let current = h.virtual_size();
                    return Ok(entries
                        .into_iter()
                        .map(|entry| Snapshot {
                            disk_size: entry.disk_size.unwrap_or(current) & !511,
                            entry,
                        })
                        .collect());
                }
                Err(TableError::Invalid(e)) => return Err(Error::from(e).in_file(path)),
                Err(TableError::NeedMore(n)) => {
                    if n as u64 > avail {
                        return Err(Error::corrupt(format!(
                            "snapshots_offset at offset 0x40: the table of {} snapshots at {off:#x} runs past the end of the file ({file_len} bytes)",
                            h.nb_snapshots
                        ))
                        .in_file(path));
                    }
                    want = (n as u64).max(want * 2).min(avail);
                }
            }
        }
    }

    fn read_bitmaps(
        file: &dyn Storage,
        path: &Path,
        h: &Header,
        file_len: u64,
    ) -> Result<Vec<BitmapEntry>> {
        let Some(ext) = h.bitmaps else {
            return Ok(Vec::new());
        };
        if h.autoclear_features & header::autoclear::BITMAPS == 0 {
            // The bitmaps are all inconsistent; QEMU drops them on a read-write open.
            return Ok(Vec::new());
        }
        if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
            return Err(Error::corrupt(format!(
                "bitmap directory at {:#x} ({} bytes) runs past the end of the file",
                ext.directory_offset, ext.directory_size
            ))
            .in_file(path));
        }
        let bytes = read_meta(
            file,
            path,
            "the bitmap directory",
            ext.directory_offset,
            ext.directory_size as usize,
        )?;
        bitmap::parse_directory(&bytes, ext.nb_bitmaps, ext.directory_offset)
            .map_err(|e| Error::from(e).in_file(path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the metadata caches hold.
    pub fn cache_stats(&self) -> CacheStats {
        let m = self.meta.read();
        let (refcount_blocks, refcount_dirty) = m.rc.as_ref().map_or((0, 0), |r| r.cached());
        CacheStats {
            l2_capacity_bytes: self.l2_cache.capacity() as u64 * self.cluster_size(),
            l2_tables: self.l2_cache.len() as u64,
            l2_dirty: self.l2_cache.select(|t| t.is_dirty()).len() as u64,
            refcount_blocks,
            refcount_dirty,
            l1_dirty: m.l1_dirty,
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    pub fn layout(&self) -> EntryLayout {
        self.layout
    }

    pub fn cluster_size(&self) -> u64 {
        self.layout.cluster_size()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta.read().header.clone()
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Finds a snapshot as QEMU does: by ID first, then by name.
    pub fn find_snapshot(&self, key: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.entry.id == key)
            .or_else(|| {
                self.snapshots
                    .iter()
                    .position(|s| s.entry.name_bytes == key.as_bytes())
            })
    }

    pub fn bitmaps(&self) -> &[BitmapEntry] {
        &self.bitmaps
    }

    /// Why the bitmap directory could not be read, if it could not.
    pub fn bitmap_problem(&self) -> Option<&str> {
        self.bitmap_problem.as_deref()
    }

    /// The guest size seen through `view`.
    pub fn view_size(&self, view: View) -> u64 {
        match view {
            View::Active => self.meta.read().header.virtual_size(),
            View::Snapshot(i) => self.snapshots[i].disk_size,
        }
    }

    /// A snapshot's L1 table, validated and loaded on first use. A broken entry fails
    /// only its own snapshot.
    /// Checks where a snapshot's L1 table lies (alignment, size limit, inside the file)
    /// without reading it. A broken entry fails only its own snapshot.
    pub fn check_snapshot(&self, i: usize) -> Result<()> {
        let s = self
            .snapshots
            .get(i)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no snapshot #{i}")))?;
        let e = &s.entry;
        let what = format!("snapshot {} (id {})", e.name(), e.id);
        let cs = self.cluster_size();
        if e.l1_table_offset % cs != 0 {
            return Err(Error::corrupt(format!(
                "{what}: L1 table offset {:#x} is not cluster-aligned",
                e.l1_table_offset
            ))
            .in_file(&self.path));
        }
        if e.l1_size as u64 > MAX_L1_ENTRIES {
            return Err(Error::corrupt(format!(
                "{what}: L1 table of {} entries exceeds the 32 MiB limit",
                e.l1_size
            ))
            .in_file(&self.path));
        }
        // The same bound the header puts on the active disk; it also keeps guest offset
        // arithmetic far from overflowing.
        let coverage = self.layout.l2_entries() << self.layout.cluster_bits;
        let needed = s.disk_size.div_ceil(coverage);
        if needed > MAX_L1_ENTRIES {
            return Err(Error::corrupt(format!(
                "{what}: disk size {} needs {needed} L1 entries, more than the 32 MiB L1 limit",
                s.disk_size
            ))
            .in_file(&self.path));
        }
        let bytes = e.l1_size as u64 * 8;
        let file_len = self
            .file
            .len()
            .map_err(|err| Error::io(&self.path, "reading the file size", err))?;
        if bytes > 0
            && (e.l1_table_offset == 0 || e.l1_table_offset.saturating_add(bytes) > file_len)
        {
            return Err(Error::corrupt(format!(
                "{what}: L1 table at {:#x} ({} entries) is outside the file ({file_len} bytes)",
                e.l1_table_offset, e.l1_size
            ))
            .in_file(&self.path));
        }
        Ok(())
    }

    /// A snapshot's L1 table, validated and loaded on first use, and cached within a
    /// bound on the bytes all cached snapshot tables take.
    pub fn snapshot_l1(&self, i: usize) -> Result<Arc<Vec<u64>>> {
        if let Some(l1) = self.snapshot_l1.lock().get(&i) {
            return Ok(l1.clone());
        }
        self.check_snapshot(i)?;
        let e = &self.snapshots[i].entry;
        let raw = read_meta(
            &*self.file,
            &self.path,
            "a snapshot L1 table",
            e.l1_table_offset,
            e.l1_size as usize * 8,
        )?;
        let l1 = Arc::new(decode_words(&raw));
        let mut cache = self.snapshot_l1.lock();
        let mut total: usize = cache.values().map(|t| t.len() * 8).sum();
        while total + l1.len() * 8 > SNAPSHOT_L1_CACHE_BYTES && !cache.is_empty() {
            let k = *cache.keys().next().expect("not empty");
            if let Some(t) = cache.remove(&k) {
                total -= t.len() * 8;
            }
        }
        cache.insert(i, l1.clone());
        Ok(l1)
    }

    /// Loads an L2 table through the cache.
    pub(crate) fn l2_table(&self, off: u64) -> Result<Arc<L2Table>> {
        if let Some(t) = self.l2_cache.get(off) {
            return Ok(t);
        }
        let cs = self.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        let n = self
            .file
            .read_at(&mut buf, off)
            .map_err(|e| Error::io(&self.path, format!("reading the L2 table at {off:#x}"), e))?;
        if n == 0 {
            return Err(Error::corrupt(format!(
                "L2 table at {off:#x} lies past the end of the file"
            ))
            .in_file(&self.path));
        }
        if n < cs {
            // The file ends inside the table: the rest reads as zeros, as in QEMU.
            self.file
                .read_exact_or_zeros(&mut buf[n..], off + n as u64)
                .map_err(|e| {
                    Error::io(&self.path, format!("reading the L2 table at {off:#x}"), e)
                })?;
        }
        let table = Arc::new(L2Table::from_bytes(&buf));
        Ok(self.l2_cache.insert(off, table, |t| !t.is_dirty()))
    }
}

/// Every metadata cluster of an image, for the overlap checks of a writable image: the
/// header, the active L1 table and its L2 tables, the refcount table and blocks, the
/// snapshot table with each snapshot's L1 table and L2 tables, and the bitmaps. A
/// snapshot whose L1 table cannot be read is left out with a warning (as the mount does).
pub(crate) fn metadata_map(
    file: &dyn Storage,
    path: &Path,
    header: &Header,
    l1: &[u64],
    reftable: &[u64],
    snapshots: &[Snapshot],
    bitmaps: &[BitmapEntry],
) -> Result<MetaMap> {
    let cs = 1u64 << header.cluster_bits;
    let mut map = MetaMap::default();
    let l2_offsets = |l1: &[u64]| -> Vec<u64> {
        l1.iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect()
    };
    map.claim(0, 1, MetaKind::Header);
    map.claim_bytes(
        header.l1_table_offset,
        header.l1_size as u64 * 8,
        cs,
        MetaKind::ActiveL1,
    );
    for off in l2_offsets(l1) {
        map.claim(off / cs, 1, MetaKind::ActiveL2);
    }
    map.claim_bytes(
        header.refcount_table_offset,
        header.refcount_table_clusters as u64 * cs,
        cs,
        MetaKind::RefcountTable,
    );
    for &e in reftable {
        let off = crate::format::refcount::reftable_block_offset(e);
        if off != 0 {
            map.claim(off / cs, 1, MetaKind::RefcountBlock);
        }
    }
    if !snapshots.is_empty() {
        let table_len: u64 = snapshots.iter().map(|s| s.entry.encoded_len() as u64).sum();
        map.claim_bytes(
            header.snapshots_offset,
            table_len,
            cs,
            MetaKind::SnapshotTable,
        );
    }
    let file_len = file
        .len()
        .map_err(|e| Error::io(path, "reading the file size", e))?;
    for s in snapshots {
        let e = &s.entry;
        let bytes = e.l1_size as u64 * 8;
        if bytes > (MAX_L1_ENTRIES * 8) || e.l1_table_offset.saturating_add(bytes) > file_len {
            log::warn!(
                "{}: the L1 table of snapshot {} lies outside the file; its clusters are not protected from writes",
                path.display(),
                e.id
            );
            continue;
        }
        map.claim_bytes(e.l1_table_offset, bytes, cs, MetaKind::SnapshotL1);
        let raw = read_meta(
            file,
            path,
            "a snapshot L1 table",
            e.l1_table_offset,
            bytes as usize,
        )?;
        for off in l2_offsets(&decode_words(&raw)) {
            map.claim(off / cs, 1, MetaKind::SnapshotL2);
        }
    }
    if let Some(ext) = header.bitmaps {
        map.claim_bytes(
            ext.directory_offset,
            ext.directory_size,
            cs,
            MetaKind::BitmapDirectory,
        );
        for b in bitmaps {
            let bytes = b.table_size as u64 * 8;
            if b.table_offset.saturating_add(bytes) > file_len {
                continue;
            }
            map.claim_bytes(b.table_offset, bytes, cs, MetaKind::BitmapTable);
            let raw = read_meta(file, path, "a bitmap table", b.table_offset, bytes as usize)?;
            for off in decode_words(&raw).into_iter().map(|w| w & OFFSET_MASK) {
                if off > 1 {
                    map.claim(off / cs, 1, MetaKind::BitmapData);
                }
            }
        }
    }
    Ok(map)
}

pub(crate) fn decode_words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}
