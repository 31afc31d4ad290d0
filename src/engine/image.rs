//! One open qcow2 image: its state and the accessors the rest of the crate uses. Where
//! that state comes from is in `open`; how it changes, in `write`, `lifecycle` and
//! `flush`.

use super::alloc::Allocator;
use super::bitmaps::BitmapSet;
use super::cache::{Cache, L2Table};
use super::metaio::MetaIo;
use super::ranges::{RangeGuard, RangeLocks};
use crate::error::{Error, ErrorKind, Result};
use crate::format::entry::EntryLayout;
use crate::format::header::{Header, MAX_L1_ENTRIES};
use crate::format::snapshot::SnapshotEntry;
use crate::format::units::{HostCluster, HostOffset};
use crate::storage::Storage;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

/// Names one internal snapshot for as long as the image is open, whatever happens to
/// the others (their positions in the table change when one is deleted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey(pub(crate) u64);

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

impl SnapshotKey {
    pub(crate) fn fresh() -> SnapshotKey {
        SnapshotKey(NEXT_KEY.fetch_add(1, Ordering::Relaxed))
    }
}

/// Which L1 table a lookup goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    /// The active disk.
    Active,
    /// An internal snapshot's disk.
    Snapshot(SnapshotKey),
    /// The VM state saved with a snapshot, read through its L1 table (see `vmstate`):
    /// byte 0 is the snapshot's VM-state offset, the size its `vm_state_size`.
    VmState(SnapshotKey),
}

/// An internal snapshot.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// A key that stays the same while other snapshots are deleted.
    pub key: SnapshotKey,
    /// The snapshot table's entry.
    pub entry: SnapshotEntry,
    /// The snapshot's own disk size (its extra data, else the image's size), in whole
    /// 512-byte sectors.
    pub disk_size: u64,
}

/// How much metadata an image holds in memory, and how much of it is not on disk yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Bytes the L2 cache may hold.
    pub l2_capacity_bytes: u64,
    /// L2 tables cached, and those changed since they were last written.
    pub l2_tables: u64,
    /// L2 tables changed since they were last written.
    pub l2_dirty: u64,
    /// Refcount blocks cached, and those changed (writable images).
    pub refcount_blocks: u64,
    /// Refcount blocks changed since they were last written.
    pub refcount_dirty: u64,
    /// The L1 table differs from the file.
    pub l1_dirty: bool,
}

/// The metadata every image has, which writes change; lookups hold it shared (rule L1).
pub(crate) struct Tables {
    pub(crate) header: Header,
    pub(crate) l1: Vec<u64>,
    /// The L1 table differs from the file.
    pub(crate) l1_dirty: bool,
    pub(crate) snapshots: Arc<[Snapshot]>,
}

/// What only a writable image has.
pub(crate) struct WriteState {
    pub(crate) alloc: Allocator,
    /// Host clusters whose references were dropped from cached tables; their refcounts
    /// are decremented once those tables are on disk (rule F4).
    pub(crate) deferred: Vec<HostCluster>,
    /// The first-write duties are done.
    pub(crate) prepared: bool,
    /// qcow2fs set the dirty bit (lazy refcounts) and clears it at a clean close.
    pub(crate) we_set_dirty: bool,
}

/// The state under the metadata lock.
pub(crate) struct Meta {
    pub(crate) t: Tables,
    /// `None` for an image opened read-only.
    pub(crate) w: Option<WriteState>,
}

impl Meta {
    /// The tables and the write state of a writable image, or an error for a read-only
    /// one.
    pub(crate) fn writer(&mut self, path: &Path) -> Result<(&mut Tables, &mut WriteState)> {
        match self.w.as_mut() {
            Some(w) => Ok((&mut self.t, w)),
            None => Err(Error::read_only("the image is open read-only").in_file(path)),
        }
    }
}

/// One open qcow2 image.
pub struct Image {
    pub(crate) io: MetaIo,
    pub(crate) layout: EntryLayout,
    pub(crate) meta: RwLock<Meta>,
    pub(crate) l2_cache: Cache<L2Table>,
    pub(crate) snapshot_l1s: Mutex<HashMap<SnapshotKey, Arc<Vec<u64>>>>,
    /// The persistent bitmaps (`bitmaps`; locked after `meta`, rule B4).
    pub(crate) bitmaps: Mutex<BitmapSet>,
    /// Some bitmap records writes (so writes to an image without one take no lock).
    pub(crate) recording: AtomicBool,
    pub(crate) preallocated: OnceLock<bool>,
    /// Open for writing now (a reopen changes it, under the metadata lock).
    pub(crate) writable: AtomicBool,
    /// Why the image was marked corrupt while open: further writes are refused.
    pub(crate) corrupt: OnceLock<String>,
    /// The external data file, flushed before metadata that points into it.
    pub(crate) data_store: OnceLock<(PathBuf, Arc<dyn Storage>)>,
    /// Guest range locks (writable images).
    pub(crate) ranges: RangeLocks,
    /// How the image is encrypted, and its cipher once unlocked.
    pub(crate) encryption: Option<super::encryption::Encryption>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({})", self.io.path().display())
    }
}

impl Image {
    /// The image file's path.
    pub fn path(&self) -> &Path {
        self.io.path()
    }

    /// The image file.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        self.io.file()
    }

    /// How the image's entries are read (cluster size, extended L2, data file).
    pub fn layout(&self) -> EntryLayout {
        self.layout
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.layout.cluster_size()
    }

    /// Whether the image may be written now (a remount changes it).
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Waits until the guest byte range `[start, end)` can be held (shared, or exclusive
    /// for a write), then holds it until the guard drops: the guest range lock that writes
    /// and reads of a writable image take (rule L5), and that `plan_write` and `publish`
    /// require.
    pub fn lock_range(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        self.ranges.lock(start, end, exclusive)
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta.read().t.header.clone()
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Arc<[Snapshot]> {
        self.meta.read().t.snapshots.clone()
    }

    /// The snapshot `key` names, if it still exists.
    pub fn snapshot(&self, key: SnapshotKey) -> Option<Snapshot> {
        self.meta
            .read()
            .t
            .snapshots
            .iter()
            .find(|s| s.key == key)
            .cloned()
    }

    /// Finds a snapshot as QEMU does: by ID first, then by name.
    pub fn find_snapshot(&self, id_or_name: &str) -> Option<Snapshot> {
        let snaps = self.snapshots();
        snaps
            .iter()
            .find(|s| s.entry.id == id_or_name)
            .or_else(|| {
                snaps
                    .iter()
                    .find(|s| s.entry.name_bytes == id_or_name.as_bytes())
            })
            .cloned()
    }

    /// The guest size seen through `view` (0 for a snapshot that no longer exists).
    pub fn view_size(&self, view: View) -> u64 {
        match view {
            View::Active => self.meta.read().t.header.virtual_size(),
            View::Snapshot(k) => self.snapshot(k).map_or(0, |s| s.disk_size),
            View::VmState(k) => self
                .meta
                .read()
                .t
                .snapshots
                .iter()
                .find(|s| s.key == k)
                .map_or(0, |s| s.entry.vm_state_size),
        }
    }

    /// Tells the engine which store holds guest data, so flushes sync it first.
    pub fn set_data_store(&self, path: PathBuf, store: Arc<dyn Storage>) {
        let _ = self.data_store.set((path, store));
    }

    /// What the metadata caches hold.
    pub fn cache_stats(&self) -> CacheStats {
        let m = self.meta.read();
        let (refcount_blocks, refcount_dirty) = m.w.as_ref().map_or((0, 0), |w| w.alloc.cached());
        CacheStats {
            l2_capacity_bytes: self.l2_cache.capacity() as u64 * self.cluster_size(),
            l2_tables: self.l2_cache.len() as u64,
            l2_dirty: self.l2_cache.select(|t| t.is_dirty()).len() as u64,
            refcount_blocks,
            refcount_dirty,
            l1_dirty: m.t.l1_dirty,
        }
    }

    /// Checks where a snapshot's L1 table lies (alignment, size limit, inside the file)
    /// without reading it. A broken entry fails only its own snapshot.
    pub fn check_snapshot(&self, s: &Snapshot) -> Result<()> {
        let e = &s.entry;
        let what = e.label();
        let off = HostOffset(e.l1_table_offset);
        if !off.is_aligned(self.layout.cluster_bits) {
            return Err(Error::corrupt(format!(
                "{what}: L1 table offset {off} is not cluster-aligned"
            ))
            .in_file(self.path()));
        }
        if e.l1_size as u64 > MAX_L1_ENTRIES {
            return Err(Error::corrupt(format!(
                "{what}: L1 table of {} entries exceeds the 32 MiB limit",
                e.l1_size
            ))
            .in_file(self.path()));
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
            .in_file(self.path()));
        }
        let bytes = e.l1_size as u64 * 8;
        let file_len = self.io.len()?;
        if bytes > 0 && (off.0 == 0 || off.0.saturating_add(bytes) > file_len) {
            return Err(Error::corrupt(format!(
                "{what}: L1 table at {off} ({} entries) is outside the file ({file_len} bytes)",
                e.l1_size
            ))
            .in_file(self.path()));
        }
        Ok(())
    }

    /// A snapshot's L1 table, validated and loaded on first use, and cached within a
    /// bound on the bytes all cached snapshot tables take.
    pub(crate) fn snapshot_l1(&self, key: SnapshotKey) -> Result<Arc<Vec<u64>>> {
        if let Some(l1) = self.snapshot_l1s.lock().get(&key) {
            return Ok(l1.clone());
        }
        let s = self.snapshot(key).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "the snapshot no longer exists").in_file(self.path())
        })?;
        self.check_snapshot(&s)?;
        let l1 = Arc::new(self.io.read_words(
            "a snapshot L1 table",
            HostOffset(s.entry.l1_table_offset),
            s.entry.l1_size as usize,
        )?);
        let mut cache = self.snapshot_l1s.lock();
        let mut total: usize = cache.values().map(|t| t.len() * 8).sum();
        while total + l1.len() * 8 > SNAPSHOT_L1_CACHE_BYTES {
            let Some(&k) = cache.keys().next() else { break };
            if let Some(t) = cache.remove(&k) {
                total -= t.len() * 8;
            }
        }
        cache.insert(key, l1.clone());
        Ok(l1)
    }

    /// Loads an L2 table through the cache.
    pub(crate) fn l2_table(&self, off: HostOffset) -> Result<Arc<L2Table>> {
        if let Some(t) = self.l2_cache.get(off.0) {
            return Ok(t);
        }
        let cs = self.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        let n = self
            .storage()
            .read_at(&mut buf, off.0)
            .map_err(|e| Error::io(self.path(), format!("reading the L2 table at {off}"), e))?;
        if n == 0 {
            return Err(
                Error::corrupt(format!("L2 table at {off} lies past the end of the file"))
                    .in_file(self.path()),
            );
        }
        if n < cs {
            // The file ends inside the table: the rest reads as zeros, as in QEMU.
            buf[n..].copy_from_slice(&self.io.read("the L2 table", off + n as u64, cs - n)?);
        }
        let table = Arc::new(L2Table::from_bytes(&buf));
        Ok(self.l2_cache.insert(off.0, table))
    }
}
