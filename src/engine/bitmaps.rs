//! The persistent dirty bitmaps of an open image, kept valid while it is written, the
//! way QEMU's qcow2 driver keeps them: loaded and checked when the image is opened for
//! writing, marked in use before the first write, every guest write, zeroing and discard
//! recorded in memory in each enabled bitmap, and written back (then no longer in use) at
//! a clean close or when the image becomes read-only again. A bitmap found in use when the
//! image is opened was not closed cleanly: it is inconsistent, and stays as it is (only
//! removing it is allowed). The user operations (add, remove, ...) are in `bitmap_ops`.
//!
//! Rules, in addition to the flush rules (F1-F6, `flush`):
//!
//! - B1. Before the first change to the image (`prepare_for_write`), every consistent
//!   bitmap is marked in use: a new directory saying so is written to newly allocated
//!   clusters and synced, their refcounts are durable (F2), the header names it (F5), and
//!   only then is the old directory freed (F4). From then on until B3 completes, a crash
//!   leaves the bitmaps in use, so QEMU treats them as inconsistent, never as complete.
//! - B2. A write is recorded before its data is written, under the bitmap lock alone; the
//!   bits in memory always cover at least what reached the disk.
//! - B3. Storing: everything is written back first (F1-F4); each bitmap's data clusters and
//!   table go to newly allocated clusters and are synced; a new directory with in_use
//!   cleared follows B1's order (F2, F5); only once the header names it are the old
//!   directory, tables and data clusters freed (F4). A crash before the header write
//!   leaves the old directory (bitmaps in use) and leaked clusters; after it, leaked
//!   clusters at worst.
//! - B4. Lock order: the metadata lock (L1) before the bitmap lock.
//! - B5. Clusters named by a bitmap table are freed only where the record of metadata
//!   clusters (`overlap`) says they hold bitmap data and nothing else; anything else is
//!   left to leak, with a warning, rather than freed on the word of a damaged table.

use super::alloc::Use;
use super::dirty::DirtyBits;
use super::image::{Image, Tables, WriteState};
use super::metaio::MetaIo;
use super::overlap::{MetaKind, MetaMap};
use crate::error::{Error, Result};
use crate::format::bitmap::{
    self, BitmapEntry, FLAG_AUTO, FLAG_IN_USE, TableEntry, check_directory, check_entry,
    decode_table_entry, encode_directory, table_entries,
};
use crate::format::header::{BitmapsExt, autoclear};
use crate::format::units::{HostCluster, HostOffset};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// The most memory all bitmaps of one image may take (QEMU bounds each to 512 MiB).
pub(crate) const MAX_BITMAP_MEMORY: u64 = 1 << 30;

/// One bitmap as the open image knows it.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// Its directory entry: as in the file if `stored`, else the one it will get.
    pub(crate) entry: BitmapEntry,
    /// The bits, once loaded (always for a consistent bitmap of a writable image).
    pub(crate) bits: Option<DirtyBits>,
    /// Records writes (the auto flag).
    pub(crate) enabled: bool,
    /// In use when the image was opened: its content is unknown and never updated.
    pub(crate) inconsistent: bool,
    /// The file's directory lists it.
    pub(crate) stored: bool,
}

/// The bitmaps of one image (under the image's bitmap lock, rule B4).
#[derive(Debug, Default)]
pub(crate) struct BitmapSet {
    pub(crate) list: Vec<Tracked>,
    /// The directory as the file holds it.
    pub(crate) file: Vec<BitmapEntry>,
    /// Why the directory could not be read.
    pub(crate) problem: Option<String>,
    /// Checked and loaded for writing.
    pub(crate) loaded: bool,
    /// The file's directory has in_use set on every consistent bitmap (B1).
    pub(crate) marked: bool,
    /// The bitmaps differ from what the file holds (a user operation).
    pub(crate) changed: bool,
}

impl BitmapSet {
    /// The bitmaps of an image whose directory read as `dir`.
    pub(crate) fn new(dir: std::result::Result<Vec<BitmapEntry>, String>) -> Self {
        match dir {
            Ok(file) => BitmapSet {
                list: file
                    .iter()
                    .map(|e| Tracked {
                        entry: e.clone(),
                        bits: None,
                        enabled: e.auto(),
                        inconsistent: e.in_use(),
                        stored: true,
                    })
                    .collect(),
                file,
                ..Default::default()
            },
            Err(problem) => BitmapSet {
                problem: Some(problem),
                ..Default::default()
            },
        }
    }

    pub(crate) fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|t| t.entry.name == name)
    }

    /// Bytes of memory the loaded bits take.
    pub(crate) fn memory(&self) -> u64 {
        self.list
            .iter()
            .filter_map(|t| t.bits.as_ref())
            .map(DirtyBits::memory)
            .sum()
    }

    /// Whether any bitmap records writes.
    pub(crate) fn recording(&self) -> bool {
        self.list
            .iter()
            .any(|t| t.enabled && !t.inconsistent && t.bits.is_some())
    }
}

/// Reads and checks the data of bitmap `e` of a `disk`-byte disk: its table must lie in
/// the file, have exactly the entries the disk needs, and name data clusters inside the
/// file; with `overlap`, no cluster may hold other metadata, and `seen` records the
/// clusters of the bitmaps read so far (no two may share one).
pub(crate) fn read_bits(
    io: &MetaIo,
    e: &BitmapEntry,
    cluster_bits: u32,
    disk: u64,
    overlap: Option<(&MetaMap, &mut HashMap<u64, String>)>,
) -> std::result::Result<DirtyBits, String> {
    let bits = walk_bitmap(io, e, cluster_bits, disk, overlap, true)?;
    Ok(bits.unwrap_or_else(|| DirtyBits::new(disk, e.granularity_bits)))
}

/// Checks where the structures of a bitmap in use lie (its table may be stale and not
/// fit the disk, so neither its size nor its data is checked), as [`read_bits`] does.
pub(crate) fn check_in_use(
    io: &MetaIo,
    e: &BitmapEntry,
    cluster_bits: u32,
    disk: u64,
    overlap: (&MetaMap, &mut HashMap<u64, String>),
) -> std::result::Result<(), String> {
    walk_bitmap(io, e, cluster_bits, disk, Some(overlap), false).map(|_| ())
}

/// The checks of [`read_bits`]; with `load`, also the table size and the bits.
fn walk_bitmap(
    io: &MetaIo,
    e: &BitmapEntry,
    cluster_bits: u32,
    disk: u64,
    overlap: Option<(&MetaMap, &mut HashMap<u64, String>)>,
    load: bool,
) -> std::result::Result<Option<DirtyBits>, String> {
    let cs = 1u64 << cluster_bits;
    let file_len = io.len().map_err(|err| err.report())?;
    let why = |m: String| format!("bitmap '{}': {m}", e.name);
    check_entry(e, cluster_bits, disk)?;
    let need = table_entries(disk, e.granularity_bits, cluster_bits);
    if load && e.table_size as u64 != need {
        return Err(why(format!(
            "its table has {} entries, but a {disk}-byte disk at granularity {} needs {need}",
            e.table_size,
            e.granularity()
        )));
    }
    let bytes = e.table_size as u64 * 8;
    if e.table_offset.saturating_add(bytes) > file_len {
        return Err(why(format!(
            "its table at {:#x} ({} entries) runs past the end of the file ({file_len} bytes)",
            e.table_offset, e.table_size
        )));
    }
    let mut overlap = overlap;
    let mut claim = |c: u64, kind: MetaKind, what: &str| -> std::result::Result<(), String> {
        let Some((map, seen)) = overlap.as_mut() else {
            return Ok(());
        };
        if let Some(other) = map.meta_conflict(HostCluster(c), kind) {
            return Err(why(format!(
                "its {what} at {:#x} overlaps {other}",
                c << cluster_bits
            )));
        }
        if let Some(owner) = seen.insert(c, e.name.clone()) {
            return Err(why(format!(
                "its {what} at {:#x} is also used by bitmap '{owner}'",
                c << cluster_bits
            )));
        }
        Ok(())
    };
    let (first, n) = HostOffset(e.table_offset).clusters_spanned(bytes, cluster_bits);
    for k in 0..n {
        claim(first.0 + k, MetaKind::BitmapTable, "table")?;
    }
    let table = io
        .read_words(
            "a bitmap table",
            HostOffset(e.table_offset),
            e.table_size as usize,
        )
        .map_err(|err| why(err.report()))?;
    let mut bits = load.then(|| DirtyBits::new(disk, e.granularity_bits));
    for (i, &word) in table.iter().enumerate() {
        match decode_table_entry(word, cs).map_err(|m| why(format!("{m} (entry {i})")))? {
            TableEntry::Zeros => {}
            TableEntry::Ones => {
                if let Some(b) = bits.as_mut() {
                    b.fill_cluster(i as u64, cs);
                }
            }
            TableEntry::Data(off) => {
                if off.saturating_add(cs) > file_len {
                    return Err(why(format!(
                        "its data cluster at {off:#x} lies past the end of the file ({file_len} bytes)"
                    )));
                }
                claim(off >> cluster_bits, MetaKind::BitmapData, "data cluster")?;
                if let Some(b) = bits.as_mut() {
                    let data = io
                        .read("bitmap data", HostOffset(off), cs as usize)
                        .map_err(|err| why(err.report()))?;
                    b.load_cluster(i as u64, &data);
                }
            }
        }
    }
    Ok(bits)
}

/// The error that refuses to open an image read-write because of its bitmaps.
pub(crate) fn refuse_write(path: &std::path::Path, problem: &str) -> Error {
    let e = Error::unsupported(format!(
        "{problem}; refusing to open the image read-write (it can still be mounted read-only)"
    ));
    if problem.starts_with(&path.display().to_string()) {
        e
    } else {
        e.in_file(path)
    }
}

impl Image {
    /// The bitmap directory as the file holds it.
    pub fn bitmaps(&self) -> Vec<BitmapEntry> {
        self.bitmaps.lock().file.clone()
    }

    /// Why the bitmap directory could not be read, if it could not.
    pub fn bitmap_problem(&self) -> Option<String> {
        self.bitmaps.lock().problem.clone()
    }

    /// Checks every bitmap as QEMU does before it writes an image and loads the bits of
    /// the consistent ones: the directory must be readable and within the limits, each
    /// entry valid, its table and data inside the file and clear of other metadata, all
    /// bits within [`MAX_BITMAP_MEMORY`]. Done when the image is opened for writing (and
    /// by a read-only to read-write reopen, before the first write); the error names the
    /// bitmap and the problem.
    pub(crate) fn load_bitmaps_for_write(&self) -> Result<()> {
        let m = self.meta.read();
        let Some(w) = m.w.as_ref() else {
            return Err(Error::read_only("the image is open read-only").in_file(self.path()));
        };
        self.load_bitmaps_locked(&m.t, w)
    }

    /// [`Self::load_bitmaps_for_write`] under the caller's metadata lock (rule B4).
    pub(crate) fn load_bitmaps_locked(&self, tables: &Tables, w: &WriteState) -> Result<()> {
        let mut set = self.bitmaps.lock();
        if set.loaded {
            return Ok(());
        }
        if let Some(p) = &set.problem {
            return Err(refuse_write(self.path(), p));
        }
        let cb = self.layout.cluster_bits;
        let disk = tables.header.virtual_size();
        check_directory(&set.file).map_err(|p| refuse_write(self.path(), &p))?;
        if let Some(ext) = tables.header.bitmaps.filter(|_| !set.file.is_empty()) {
            let (first, n) =
                HostOffset(ext.directory_offset).clusters_spanned(ext.directory_size, cb);
            for k in 0..n {
                if let Some(other) = w
                    .alloc
                    .overlap()
                    .meta_conflict(first + k, MetaKind::BitmapDirectory)
                {
                    return Err(refuse_write(
                        self.path(),
                        &format!(
                            "the bitmap directory at {:#x} overlaps {other}",
                            ext.directory_offset
                        ),
                    ));
                }
            }
        }
        let mut seen = HashMap::new();
        let mut memory = 0;
        let mut loaded = Vec::new();
        for e in &set.file {
            if e.in_use() {
                // Kept as it is; its clusters must still be clear of everything else.
                check_in_use(&self.io, e, cb, disk, (w.alloc.overlap(), &mut seen))
                    .map_err(|p| refuse_write(self.path(), &p))?;
                loaded.push(None);
                continue;
            }
            memory += bitmap::data_bytes(disk, e.granularity_bits).next_multiple_of(8);
            if memory > MAX_BITMAP_MEMORY {
                return Err(refuse_write(
                    self.path(),
                    &format!(
                        "bitmap '{}': the bitmaps would take more than {MAX_BITMAP_MEMORY} bytes of memory",
                        e.name
                    ),
                ));
            }
            let bits = read_bits(&self.io, e, cb, disk, Some((w.alloc.overlap(), &mut seen)))
                .map_err(|p| refuse_write(self.path(), &p))?;
            loaded.push(Some(bits));
        }
        for (t, bits) in set.list.iter_mut().zip(loaded) {
            t.bits = bits;
        }
        set.loaded = true;
        self.recording.store(set.recording(), Ordering::Release);
        Ok(())
    }

    /// Forgets the bits loaded for writing: a reopen for writing that failed after
    /// [`Self::load_bitmaps_locked`] leaves the image as read-only as before.
    pub(crate) fn unload_bitmaps(&self) {
        let mut set = self.bitmaps.lock();
        for t in set.list.iter_mut() {
            t.bits = None;
        }
        set.loaded = false;
        self.recording.store(false, Ordering::Release);
    }

    /// Records a guest write, zeroing or discard of `[off, off + len)` in every enabled
    /// bitmap (rule B2).
    pub fn record_write(&self, off: u64, len: u64) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut set = self.bitmaps.lock();
        for t in set.list.iter_mut() {
            if let (true, false, Some(bits)) = (t.enabled, t.inconsistent, t.bits.as_mut()) {
                bits.set_range(off, len);
            }
        }
    }

    /// Marks every consistent bitmap in use before the first change (rule B1); called by
    /// `prepare_for_write`. An image whose bitmaps a program without bitmap support
    /// invalidated (the autoclear bit is clear) loses its bitmaps extension, as in QEMU.
    pub(crate) fn mark_bitmaps_in_use(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        let mut set = self.bitmaps.lock();
        if set.marked {
            return Ok(());
        }
        if t.header.bitmaps.is_some() && t.header.autoclear_features & autoclear::BITMAPS == 0 {
            t.header.bitmaps = None;
            self.write_header(t)?;
        }
        if !set.file.is_empty() {
            if !set.loaded {
                return Err(Error::read_only(
                    "the image's bitmaps were not checked for writing; refusing to write",
                )
                .in_file(self.path()));
            }
            let mut entries = set.file.clone();
            let mut changed = false;
            for e in entries.iter_mut().filter(|e| !e.in_use()) {
                e.flags |= FLAG_IN_USE;
                changed = true;
            }
            if changed {
                self.switch_directory(t, w, &mut set, entries)?;
            }
        }
        set.marked = true;
        Ok(())
    }

    /// Writes `entries` as the new bitmap directory (or removes the extension when there
    /// are none) in the order of rule B1, then frees the old directory.
    pub(crate) fn switch_directory(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        set: &mut BitmapSet,
        entries: Vec<BitmapEntry>,
    ) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let old_ext = t.header.bitmaps;
        let old_autoclear = t.header.autoclear_features;
        let mut new_dir = None;
        let written = (|| {
            if entries.is_empty() {
                t.header.bitmaps = None;
                t.header.autoclear_features &= !autoclear::BITMAPS;
            } else {
                let bytes = encode_directory(&entries);
                let n = (bytes.len() as u64).div_ceil(self.cluster_size());
                let first = self.allocate(t, w, n, Use::Meta(MetaKind::BitmapDirectory))?;
                new_dir = Some((first, n));
                self.write_new_structure("the bitmap directory", first.offset(cb), &bytes)?;
                t.header.bitmaps = Some(BitmapsExt {
                    ext_offset: old_ext.map_or(0, |e| e.ext_offset),
                    nb_bitmaps: entries.len() as u32,
                    directory_size: bytes.len() as u64,
                    directory_offset: first.offset(cb).0,
                });
                t.header.autoclear_features |= autoclear::BITMAPS;
            }
            // F2: the new clusters are counted before the header names them; F5.
            w.alloc.write_back(&self.io)?;
            self.write_header(t)
        })();
        if let Err(e) = written {
            t.header.bitmaps = old_ext;
            t.header.autoclear_features = old_autoclear;
            if let Some((first, n)) = new_dir {
                self.release_run(w, first, n);
            }
            return Err(e);
        }
        set.file = entries;
        // F4: the old directory is free once the header no longer names it.
        if let Some(old) = old_ext {
            let (first, n) =
                HostOffset(old.directory_offset).clusters_spanned(old.directory_size, cb);
            for k in 0..n {
                w.alloc.release(first + k, &self.io)?;
            }
        }
        Ok(())
    }

    /// Gives back clusters allocated for a structure that was never named (after a
    /// failure); errors are ignored: at worst the clusters leak.
    fn release_run(&self, w: &mut WriteState, first: HostCluster, n: u64) {
        for k in 0..n {
            let _ = w.alloc.release(first + k, &self.io);
        }
    }

    /// Frees the table and data clusters of a bitmap the directory no longer names (rule
    /// B5 decides which clusters may go).
    pub(crate) fn free_bitmap_clusters(&self, w: &mut WriteState, e: &BitmapEntry) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let cs = self.cluster_size();
        let bytes = e.table_size as u64 * 8;
        if e.table_offset == 0 || e.table_offset.saturating_add(bytes) > self.io.len()? {
            return Ok(());
        }
        let table = self.io.read_words(
            "a bitmap table",
            HostOffset(e.table_offset),
            e.table_size as usize,
        )?;
        let free = |c: HostCluster, kind: MetaKind, w: &mut WriteState| -> Result<()> {
            let only_this = w.alloc.overlap().owner(c).is_some()
                && w.alloc.overlap().meta_conflict(c, kind).is_none();
            if only_this {
                w.alloc.release(c, &self.io)?;
            } else {
                log::warn!(
                    "{}: bitmap '{}' names host cluster {} as its {}, which the image does not record as such; leaving it allocated",
                    self.path().display(),
                    e.name,
                    c.offset(cb),
                    kind.name()
                );
            }
            Ok(())
        };
        for word in table {
            if let Ok(TableEntry::Data(off)) = decode_table_entry(word, cs) {
                free(HostOffset(off).cluster(cb), MetaKind::BitmapData, w)?;
            }
        }
        let (first, n) = HostOffset(e.table_offset).clusters_spanned(bytes, cb);
        for k in 0..n {
            free(first + k, MetaKind::BitmapTable, w)?;
        }
        Ok(())
    }

    /// Writes the bits of one bitmap into newly allocated data clusters (none for a part
    /// that is all clean or all dirty) and a new table; returns the table's offset and
    /// size. Every cluster allocated is added to `allocated`.
    fn write_bitmap_data(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        bits: &DirtyBits,
        allocated: &mut Vec<(HostCluster, u64)>,
    ) -> Result<(u64, u32)> {
        use super::dirty::Chunk;
        let cb = self.layout.cluster_bits;
        let cs = self.cluster_size();
        let n = table_entries(bits.size(), bits.granularity_bits(), cb);
        let mut table = Vec::with_capacity(n as usize);
        for i in 0..n {
            table.push(match bits.chunk(i, cs) {
                Chunk::Clean => bitmap::encode_table_entry(TableEntry::Zeros),
                Chunk::Dirty => bitmap::encode_table_entry(TableEntry::Ones),
                Chunk::Mixed => {
                    let c = self.allocate(t, w, 1, Use::Meta(MetaKind::BitmapData))?;
                    allocated.push((c, 1));
                    // New clusters: a full disk fails the store, not the image.
                    self.io
                        .write_fresh("bitmap data", c.offset(cb), &bits.cluster_data(i, cs))?;
                    bitmap::encode_table_entry(TableEntry::Data(c.offset(cb).0))
                }
            });
        }
        let clusters = (n * 8).div_ceil(cs).max(1);
        let first = self.allocate(t, w, clusters, Use::Meta(MetaKind::BitmapTable))?;
        allocated.push((first, clusters));
        let bytes = super::metaio::encode_words(&table, (clusters * cs) as usize);
        self.io
            .write_fresh("a bitmap table", first.offset(cb), &bytes)?;
        Ok((first.offset(cb).0, n as u32))
    }

    /// Writes every consistent bitmap back and clears in_use (rule B3): at a clean close
    /// and when the image becomes read-only again. Nothing is written when no bitmap
    /// was marked in use or changed. Afterwards the next change marks them again.
    pub(crate) fn store_bitmaps(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        let mut set = self.bitmaps.lock();
        let nothing = set.list.is_empty() && set.file.is_empty();
        if !set.loaded || nothing || (!set.marked && !set.changed) {
            set.marked = false;
            set.changed = false;
            return Ok(());
        }
        self.write_back(t, w)?;
        let disk = t.header.virtual_size();
        let mut allocated = Vec::new();
        let mut entries = Vec::with_capacity(set.list.len());
        let written = (|| {
            for tr in set.list.iter_mut() {
                if tr.inconsistent {
                    entries.push(tr.entry.clone());
                    continue;
                }
                let Some(bits) = tr.bits.as_mut() else {
                    entries.push(tr.entry.clone());
                    continue;
                };
                bits.resize(disk);
                let (offset, size) = self.write_bitmap_data(t, w, bits, &mut allocated)?;
                let mut e = tr.entry.clone();
                e.table_offset = offset;
                e.table_size = size;
                e.flags = if tr.enabled { FLAG_AUTO } else { 0 };
                entries.push(e);
            }
            // The data and tables are durable before a directory names them.
            self.io.sync()
        })();
        if let Err(e) = written {
            for (c, n) in allocated {
                self.release_run(w, c, n);
            }
            return Err(e);
        }
        let old = set.file.clone();
        if let Err(e) = self.switch_directory(t, w, &mut set, entries.clone()) {
            for (c, n) in allocated {
                self.release_run(w, c, n);
            }
            return Err(e);
        }
        // F4: the old tables and data of the bitmaps written anew, and of removed ones.
        for e in &old {
            let kept = entries
                .iter()
                .any(|n| n.name == e.name && n.table_offset == e.table_offset);
            if !kept {
                self.free_bitmap_clusters(w, e)?;
            }
        }
        w.alloc.write_back(&self.io)?;
        for (tr, e) in set.list.iter_mut().zip(entries) {
            tr.entry = e;
            tr.stored = true;
        }
        set.marked = false;
        set.changed = false;
        w.prepared = false;
        Ok(())
    }
}
