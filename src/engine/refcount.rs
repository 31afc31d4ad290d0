//! Refcounts (checklist section 11): reading them, and for writable images the refcount
//! state: a cache of refcount blocks, cluster allocation, new refblocks and refcount-table
//! growth. Everything that changes refcounts runs under the exclusive metadata lock.

use super::image::{Image, decode_words};
use super::overlap::{MetaKind, MetaMap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::MAX_REFCOUNT_TABLE_BYTES;
use crate::format::refcount::{REFTABLE_OFFSET_MASK, RefcountLayout, reftable_block_offset};
use crate::storage::Storage;
use std::collections::HashMap;
use std::path::Path;

/// The file a refcount state reads and writes, for I/O and messages.
pub(crate) struct MetaIo<'a> {
    pub file: &'a dyn Storage,
    pub path: &'a Path,
    /// Set when a metadata write or sync fails: the image then refuses further writes,
    /// because what is cached may no longer match what is on disk.
    pub failed: &'a std::sync::atomic::AtomicBool,
}

impl MetaIo<'_> {
    pub(crate) fn read(&self, what: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_or_zeros(&mut buf, off)
            .map_err(|e| Error::io(self.path, format!("reading {what} at {off:#x}"), e))?;
        Ok(buf)
    }

    pub(crate) fn write(&self, what: &str, off: u64, data: &[u8]) -> Result<()> {
        self.file.write_at(data, off).map_err(|e| {
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
            Error::io(self.path, format!("writing {what} at {off:#x}"), e)
        })
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file.flush().map_err(|e| {
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
            Error::io(self.path, "flushing the image file", e)
        })
    }
}

struct RefBlock {
    data: Vec<u8>,
    dirty: bool,
    tick: u64,
}

/// Refcount table and cached refcount blocks of a writable image.
pub(crate) struct RefState {
    pub(crate) table: Vec<u64>,
    /// The table's place in the file (clusters), as the header says.
    pub(crate) table_offset: u64,
    pub(crate) table_clusters: u32,
    pub(crate) table_dirty: bool,
    blocks: HashMap<u64, RefBlock>,
    tick: u64,
    capacity: usize,
    /// Where the next search for free clusters starts (a cluster index).
    pub(crate) free_hint: u64,
    pub(crate) layout: RefcountLayout,
    cs: u64,
    /// The table moved (it grew): the header must be switched to `table_offset`, then the
    /// old tables listed here freed.
    pub(crate) header_stale: bool,
    pub(crate) old_tables: Vec<(u64, u32)>,
    /// The clusters that hold metadata (see `overlap`).
    pub(crate) overlap: MetaMap,
    /// Clusters the allocator found free although they hold metadata, already reported.
    skipped: std::collections::HashSet<u64>,
}

impl RefState {
    /// The state of a table loaded from the file. Allocation starts at cluster
    /// `first_free` (the end of the file when it was opened: a cluster below it whose
    /// refcount is 0 may still be in use in a damaged image, so only clusters this
    /// process freed itself are used again).
    pub(crate) fn new(
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u32,
        layout: RefcountLayout,
        capacity: usize,
        first_free: u64,
        overlap: MetaMap,
    ) -> Self {
        RefState {
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            blocks: HashMap::new(),
            tick: 0,
            capacity: capacity.max(4),
            free_hint: first_free.max(1),
            cs: 1 << layout.cluster_bits,
            layout,
            header_stale: false,
            old_tables: Vec::new(),
            overlap,
            skipped: Default::default(),
        }
    }

    fn per_block(&self) -> u64 {
        self.layout.block_entries()
    }

    fn missing(&self, ti: u64) -> bool {
        self.table
            .get(ti as usize)
            .is_none_or(|&e| reftable_block_offset(e) == 0)
    }

    fn load(&mut self, ti: u64, io: &MetaIo) -> Result<&mut RefBlock> {
        self.tick += 1;
        let tick = self.tick;
        if !self.blocks.contains_key(&ti) {
            let off = reftable_block_offset(self.table[ti as usize]);
            if !off.is_multiple_of(self.cs) {
                return Err(Error::corrupt(format!(
                    "refcount table entry {ti}: refcount block offset {off:#x} is not cluster-aligned"
                ))
                .in_file(io.path));
            }
            let data = io.read("a refcount block", off, self.cs as usize)?;
            self.evict_clean();
            self.blocks.insert(
                ti,
                RefBlock {
                    data,
                    dirty: false,
                    tick,
                },
            );
        }
        let b = self.blocks.get_mut(&ti).expect("just inserted");
        b.tick = tick;
        Ok(b)
    }

    /// Drops the least recently used clean blocks while over capacity.
    fn evict_clean(&mut self) {
        while self.blocks.len() >= self.capacity {
            let victim = self
                .blocks
                .iter()
                .filter(|(_, b)| !b.dirty)
                .min_by_key(|(_, b)| b.tick)
                .map(|(&k, _)| k);
            match victim {
                Some(k) => {
                    self.blocks.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Refcount blocks cached, and how many of them are dirty.
    pub(crate) fn cached(&self) -> (u64, u64) {
        let dirty = self.blocks.values().filter(|b| b.dirty).count();
        (self.blocks.len() as u64, dirty as u64)
    }

    /// Whether dirty blocks keep the cache over its capacity (a flush is due).
    pub(crate) fn over_capacity(&self) -> bool {
        self.blocks.len() > self.capacity
    }

    /// The refcount of host cluster `c`.
    pub(crate) fn get(&mut self, c: u64, io: &MetaIo) -> Result<u64> {
        let pb = self.per_block();
        let ti = c / pb;
        if self.missing(ti) {
            return Ok(0);
        }
        let layout = self.layout;
        let b = self.load(ti, io)?;
        Ok(layout.get(&b.data, (c % pb) as usize))
    }

    /// Sets the refcount of `c`, whose refcount block must exist.
    fn set_existing(&mut self, c: u64, v: u64, io: &MetaIo) -> Result<()> {
        let pb = self.per_block();
        let layout = self.layout;
        let block = reftable_block_offset(self.table[(c / pb) as usize]) / self.cs;
        if let Some(what) = self.overlap.meta_conflict(block, MetaKind::RefcountBlock) {
            return Err(Error::corrupt(format!(
                "the refcount block at {:#x} overlaps {what}; refusing to write it",
                block * self.cs
            ))
            .in_file(io.path));
        }
        let b = self.load(c / pb, io)?;
        layout.set(&mut b.data, (c % pb) as usize, v);
        b.dirty = true;
        Ok(())
    }

    /// Adds `delta` to the refcount of `c`, creating its refcount block when needed.
    pub(crate) fn adjust(&mut self, c: u64, delta: i64, io: &MetaIo) -> Result<()> {
        while self.missing(c / self.per_block()) {
            if delta < 0 {
                return Err(Error::corrupt(format!(
                    "refcount of host cluster {:#x} would drop below zero",
                    c * self.cs
                ))
                .in_file(io.path));
            }
            self.create_block(c / self.per_block(), &[], io)?;
        }
        let old = self.get(c, io)?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= self.layout.max())
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NoSpace,
                        format!(
                            "refcount of host cluster {:#x} would exceed its {}-bit maximum",
                            c * self.cs,
                            self.layout.bits()
                        ),
                    )
                    .in_file(io.path)
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(format!(
                    "refcount of host cluster {:#x} would drop below zero",
                    c * self.cs
                ))
                .in_file(io.path)
            })?
        };
        self.set_existing(c, new, io)?;
        if new == 0 {
            self.overlap.forget(c);
            if c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    /// Drops one reference to `c`. A refcount that is already 0 (a damaged image) is left
    /// as it is, with a warning, as QEMU does: the cluster leaks instead of the write
    /// that dropped the reference failing.
    pub(crate) fn release(&mut self, c: u64, io: &MetaIo) -> Result<()> {
        if !self.missing(c / self.per_block()) && self.get(c, io)? > 0 {
            return self.adjust(c, -1, io);
        }
        log::warn!(
            "{}: the refcount of host cluster {:#x} is already 0 where a reference to it was dropped; leaving it (`qemu-img check -r all` repairs it)",
            io.path.display(),
            c * self.cs
        );
        Ok(())
    }

    /// Finds `n` contiguous clusters with refcount 0, starting at the free hint.
    fn find_free(&mut self, n: u64, avoid: &[(u64, u64)], io: &MetaIo) -> Result<u64> {
        let mut c = self.free_hint.max(1);
        let mut run = 0;
        let limit = (1u64 << 56) / self.cs;
        while c < limit {
            let taken = avoid.iter().any(|&(s, len)| c >= s && c < s + len);
            if !taken && self.get(c, io)? == 0 && !self.holds_metadata(c, io) {
                run += 1;
                if run == n {
                    return Ok(c + 1 - n);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        Err(Error::new(ErrorKind::NoSpace, "no free host clusters below 2^56").in_file(io.path))
    }

    /// Whether free cluster `c` holds metadata nonetheless (its refcount is damaged): it
    /// is skipped, and reported once.
    fn holds_metadata(&mut self, c: u64, io: &MetaIo) -> bool {
        let Some(what) = self.overlap.owner(c) else {
            return false;
        };
        if self.skipped.insert(c) {
            log::warn!(
                "{}: host cluster {:#x} holds {what} but its refcount is 0; not allocating it (`qemu-img check -r all` repairs the refcount)",
                io.path.display(),
                c * self.cs
            );
        }
        true
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) and returns the first index.
    pub(crate) fn alloc(&mut self, n: u64, io: &MetaIo) -> Result<u64> {
        loop {
            let start = self.find_free(n, &[], io)?;
            let pb = self.per_block();
            let mut created = false;
            for ti in start / pb..=(start + n - 1) / pb {
                if self.missing(ti) {
                    self.create_block(ti, &[(start, n)], io)?;
                    created = true;
                }
            }
            if created {
                // New refcount blocks may sit where the run was: look again.
                continue;
            }
            for c in start..start + n {
                self.set_existing(c, 1, io)?;
            }
            self.free_hint = start + n;
            return Ok(start);
        }
    }

    /// Creates the refcount block for table index `ti`, placed in a free cluster outside
    /// `avoid`. A block that lands in its own range describes itself.
    fn create_block(&mut self, ti: u64, avoid: &[(u64, u64)], io: &MetaIo) -> Result<()> {
        if ti >= self.table.len() as u64 {
            return self.grow_table(ti + 1, io);
        }
        let pb = self.per_block();
        loop {
            let b = self.find_free(1, avoid, io)?;
            let tb = b / pb;
            if tb == ti {
                let mut data = vec![0u8; self.cs as usize];
                self.layout.set(&mut data, (b % pb) as usize, 1);
                self.insert_block(ti, data, true);
            } else if self.missing(tb) {
                self.create_block(tb, avoid, io)?;
                continue;
            } else {
                self.set_existing(b, 1, io)?;
                self.insert_block(ti, vec![0u8; self.cs as usize], true);
            }
            self.table[ti as usize] = b * self.cs;
            self.table_dirty = true;
            self.overlap.claim(b, 1, MetaKind::RefcountBlock);
            return Ok(());
        }
    }

    fn insert_block(&mut self, ti: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.evict_clean();
        self.blocks.insert(
            ti,
            RefBlock {
                data,
                dirty,
                tick: self.tick,
            },
        );
    }

    /// Writes dirty refcount blocks, then the table if it changed, and syncs.
    pub(crate) fn write_back(&mut self, io: &MetaIo) -> Result<()> {
        let mut wrote = false;
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&k, _)| k)
            .collect();
        dirty.sort_unstable();
        for ti in dirty {
            let off = reftable_block_offset(self.table[ti as usize]);
            let b = self.blocks.get_mut(&ti).expect("dirty block is cached");
            io.write("a refcount block", off, &b.data)?;
            b.dirty = false;
            wrote = true;
        }
        if wrote {
            io.sync()?;
        }
        if self.table_dirty {
            let mut bytes = Vec::with_capacity(self.table.len() * 8);
            for e in &self.table {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            io.write("the refcount table", self.table_offset, &bytes)?;
            io.sync()?;
            self.table_dirty = false;
        }
        self.evict_clean();
        Ok(())
    }

    /// Grows the refcount table to at least `min_entries`: a new table and the refcount
    /// blocks that describe it are written past everything in use and synced; then the
    /// caller switches the header to them and frees the old table (`header_stale`).
    fn grow_table(&mut self, min_entries: u64, io: &MetaIo) -> Result<()> {
        // The new table must never point at a refcount block that is not on disk.
        self.write_back(io)?;
        let pb = self.per_block();
        let cs = self.cs;
        let per_cluster = cs / 8;
        let coverage_end = self.table.len() as u64 * pb;
        let file_end = io
            .file
            .len()
            .map_err(|e| Error::io(io.path, "reading the file size", e))?
            .div_ceil(cs);
        let p = file_end.max(coverage_end).max(1);
        let mut entries = min_entries
            .max(self.table.len() as u64 * 2)
            .next_multiple_of(per_cluster);
        let (nblocks, table_clusters) = loop {
            let table_clusters = entries / per_cluster;
            let mut nblocks = 0;
            loop {
                let k = nblocks + table_clusters;
                let need = (p + k - 1) / pb - p / pb + 1;
                if need == nblocks {
                    break;
                }
                nblocks = need;
            }
            let max_ti = (p + nblocks + table_clusters - 1) / pb;
            if entries > max_ti {
                break (nblocks, table_clusters);
            }
            entries = (max_ti + 1).next_multiple_of(per_cluster);
        };
        if entries * 8 > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the refcount table would grow past its 8 MiB limit",
            )
            .in_file(io.path));
        }
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        let first_ti = p / pb;
        let end = p + nblocks + table_clusters;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for j in 0..nblocks {
            let ti = first_ti + j;
            table[ti as usize] = (p + j) * cs;
            new_blocks.push((ti, vec![0u8; cs as usize]));
        }
        for c in p..end {
            let (_, data) = &mut new_blocks[(c / pb - first_ti) as usize];
            self.layout.set(data, (c % pb) as usize, 1);
        }
        for (j, (_, data)) in new_blocks.iter().enumerate() {
            io.write("a new refcount block", (p + j as u64) * cs, data)?;
        }
        let table_offset = (p + nblocks) * cs;
        let mut bytes = Vec::with_capacity(table.len() * 8);
        for e in &table {
            bytes.extend_from_slice(&(e & REFTABLE_OFFSET_MASK).to_be_bytes());
        }
        io.write("the new refcount table", table_offset, &bytes)?;
        io.sync()?;
        for (ti, data) in new_blocks {
            self.insert_block(ti, data, false);
        }
        self.overlap.claim(p, nblocks, MetaKind::RefcountBlock);
        self.overlap
            .claim(p + nblocks, table_clusters, MetaKind::RefcountTable);
        self.old_tables
            .push((self.table_offset, self.table_clusters));
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters as u32;
        self.table_dirty = false;
        self.header_stale = true;
        Ok(())
    }
}

impl Image {
    pub(crate) fn refcount_layout(&self) -> RefcountLayout {
        RefcountLayout {
            order: self.meta.read().header.refcount_order,
            cluster_bits: self.layout.cluster_bits,
        }
    }

    /// The refcount table as stored.
    pub(crate) fn read_reftable(&self) -> Result<Vec<u64>> {
        let h = &self.meta.read().header;
        let len = h.refcount_table_clusters as u64 * self.cluster_size();
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_or_zeros(&mut buf, h.refcount_table_offset)
            .map_err(|e| Error::io(&self.path, "reading the refcount table", e))?;
        Ok(decode_words(&buf))
    }

    /// Whether the image looks preallocated: QEMU's test (more clusters referenced than
    /// the file really stores), after which qemu-img map reports data over host holes
    /// as zero. Computed once.
    pub fn looks_preallocated(&self) -> bool {
        *self.preallocated.get_or_init(|| {
            self.detect_preallocation().unwrap_or_else(|e| {
                log::debug!("{e}");
                false
            })
        })
    }

    fn detect_preallocation(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let io = |e| Error::io(&self.path, "inspecting the image file", e);
        let file_len = self.file.len().map_err(io)?;
        let real_clusters = self.file.allocated_bytes().map_err(io)? / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(cs);
        let rl = self.refcount_layout();
        let per_block = rl.block_entries();
        let table = self.read_reftable()?;
        let mut count = 0;
        let mut block = vec![0u8; cs as usize];
        for (ti, &entry) in table.iter().enumerate() {
            let first = ti as u64 * per_block;
            if first >= end_cluster {
                break;
            }
            let off = reftable_block_offset(entry);
            if off == 0 {
                continue;
            }
            self.file
                .read_exact_or_zeros(&mut block, off)
                .map_err(|e| {
                    Error::io(
                        &self.path,
                        format!("reading the refcount block at {off:#x}"),
                        e,
                    )
                })?;
            let n = per_block.min(end_cluster - first) as usize;
            for i in 0..n {
                if rl.get(&block, i) != 0 {
                    count += 1;
                    if count >= threshold {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(count >= threshold)
    }
}
