//! The cluster allocator of a writable image: the refcount table and a cache of refcount
//! blocks, allocation of free clusters, new refcount blocks and refcount-table growth,
//! and the record of which clusters hold metadata (see `overlap`). Everything here runs
//! under the image's exclusive metadata lock (design.md, rule L1).
//!
//! When the refcount table has to grow, the allocator writes the new table and the
//! refcount blocks that describe it (rule F2) and returns a [`TableMove`] that the caller
//! must apply: point the header at the new table (rule F5), then free the old one.

use super::metaio::MetaIo;
use super::overlap::{MetaKind, MetaMap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::MAX_REFCOUNT_TABLE_BYTES;
use crate::format::refcount::{REFTABLE_OFFSET_MASK, RefcountLayout, reftable_block_offset};
use crate::format::units::{HostCluster, HostOffset};
use std::collections::{HashMap, HashSet};

struct RefBlock {
    data: Vec<u8>,
    dirty: bool,
    tick: u64,
}

/// What an allocation is for: guest data, or a metadata structure (recorded so that no
/// write lands on it by mistake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Use {
    Data,
    Meta(MetaKind),
}

/// The refcount table moved (it grew). The new table is on disk; the header must now be
/// pointed at it, and the old table's clusters released.
#[must_use]
#[derive(Debug)]
pub(crate) struct TableMove {
    pub offset: HostOffset,
    pub clusters: u32,
    pub old_offset: HostOffset,
    pub old_clusters: u32,
}

/// A run of newly allocated clusters, and the table move it caused, if any.
#[must_use]
#[derive(Debug)]
pub(crate) struct Allocated {
    pub first: HostCluster,
    pub moved: Option<TableMove>,
}

/// Refcount table, cached refcount blocks and allocation state of a writable image.
pub(crate) struct Allocator {
    table: Vec<u64>,
    table_offset: HostOffset,
    table_clusters: u32,
    table_dirty: bool,
    blocks: HashMap<u64, RefBlock>,
    tick: u64,
    capacity: usize,
    /// Where the next search for free clusters starts.
    free_hint: HostCluster,
    layout: RefcountLayout,
    /// The clusters that hold metadata.
    overlap: MetaMap,
    /// Clusters found free although they hold metadata, already reported.
    skipped: HashSet<u64>,
}

impl Allocator {
    /// The allocator for a refcount table loaded from the file. Allocation starts at
    /// `first_free` (the end of the file when it was opened: in a damaged image a cluster
    /// below it whose refcount is 0 may still be in use, so only clusters this process
    /// freed itself are used again).
    pub(crate) fn new(
        table: Vec<u64>,
        table_offset: HostOffset,
        table_clusters: u32,
        layout: RefcountLayout,
        capacity: usize,
        first_free: HostCluster,
        overlap: MetaMap,
    ) -> Self {
        Allocator {
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            blocks: HashMap::new(),
            tick: 0,
            capacity: capacity.max(4),
            free_hint: HostCluster(first_free.0.max(1)),
            layout,
            overlap,
            skipped: HashSet::new(),
        }
    }

    fn cb(&self) -> u32 {
        self.layout.cluster_bits
    }

    fn cs(&self) -> u64 {
        1 << self.layout.cluster_bits
    }

    fn per_block(&self) -> u64 {
        self.layout.block_entries()
    }

    pub(crate) fn overlap(&self) -> &MetaMap {
        &self.overlap
    }

    pub(crate) fn overlap_mut(&mut self) -> &mut MetaMap {
        &mut self.overlap
    }

    /// The largest refcount the image's refcount width holds.
    pub(crate) fn max_refcount(&self) -> u64 {
        self.layout.max()
    }

    /// Replaces the record of metadata clusters (rebuilt after the snapshots changed).
    pub(crate) fn set_overlap(&mut self, map: MetaMap) {
        self.overlap = map;
    }

    /// The refcount table's entries.
    pub(crate) fn table(&self) -> &[u64] {
        &self.table
    }

    fn missing(&self, ti: u64) -> bool {
        self.table
            .get(ti as usize)
            .is_none_or(|&e| reftable_block_offset(e) == 0)
    }

    fn block_offset(&self, ti: u64) -> HostOffset {
        HostOffset(reftable_block_offset(self.table[ti as usize]))
    }

    fn load(&mut self, ti: u64, io: &MetaIo) -> Result<&mut RefBlock> {
        self.tick += 1;
        let tick = self.tick;
        if !self.blocks.contains_key(&ti) {
            let off = self.block_offset(ti);
            if !off.is_aligned(self.cb()) {
                return Err(Error::corrupt(format!(
                    "refcount table entry {ti}: refcount block offset {off} is not cluster-aligned"
                ))
                .in_file(io.path()));
            }
            let data = io.read("a refcount block", off, self.cs() as usize)?;
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
        let b = self
            .blocks
            .get_mut(&ti)
            .ok_or_else(|| Error::new(ErrorKind::Io, "refcount block cache"))?;
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

    /// The refcount of cluster `c`.
    pub(crate) fn get(&mut self, c: HostCluster, io: &MetaIo) -> Result<u64> {
        let pb = self.per_block();
        if self.missing(c.0 / pb) {
            return Ok(0);
        }
        let layout = self.layout;
        let b = self.load(c.0 / pb, io)?;
        Ok(layout.get(&b.data, (c.0 % pb) as usize))
    }

    /// Sets the refcount of `c`, whose refcount block must exist.
    fn set_existing(&mut self, c: HostCluster, v: u64, io: &MetaIo) -> Result<()> {
        let pb = self.per_block();
        let layout = self.layout;
        let block = self.block_offset(c.0 / pb);
        if let Some(what) = self
            .overlap
            .meta_conflict(block.cluster(self.cb()), MetaKind::RefcountBlock)
        {
            return Err(Error::corrupt(format!(
                "the refcount block at {block} overlaps {what}; refusing to write it"
            ))
            .in_file(io.path()));
        }
        let b = self.load(c.0 / pb, io)?;
        layout.set(&mut b.data, (c.0 % pb) as usize, v);
        b.dirty = true;
        if v == 0 {
            self.overlap.forget(c);
            if c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    /// Adds a reference to `c`, creating its refcount block when needed.
    pub(crate) fn increment(&mut self, c: HostCluster, io: &MetaIo) -> Result<Option<TableMove>> {
        let mut moved = None;
        while self.missing(c.0 / self.per_block()) {
            let m = self.create_block(c.0 / self.per_block(), &[], io)?;
            moved = moved.or(m);
        }
        let old = self.get(c, io)?;
        let new = old.checked_add(1).filter(|&v| v <= self.layout.max());
        let Some(new) = new else {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "refcount of host cluster {} would exceed its {}-bit maximum",
                    c.offset(self.cb()),
                    self.layout.bits()
                ),
            )
            .in_file(io.path()));
        };
        self.set_existing(c, new, io)?;
        Ok(moved)
    }

    /// Drops one reference to `c`. A refcount that is already 0 (a damaged image) is left
    /// as it is, with a warning, as QEMU does: the cluster leaks instead of the write that
    /// dropped the reference failing.
    pub(crate) fn release(&mut self, c: HostCluster, io: &MetaIo) -> Result<()> {
        let old = self.get(c, io)?;
        if old == 0 {
            log::warn!(
                "{}: the refcount of host cluster {} is already 0 where a reference to it was dropped; leaving it (`qemu-img check -r all` repairs it)",
                io.path().display(),
                c.offset(self.cb())
            );
            return Ok(());
        }
        self.set_existing(c, old - 1, io)
    }

    /// Whether free cluster `c` holds metadata nonetheless (its refcount is damaged): it
    /// is skipped, and reported once.
    fn holds_metadata(&mut self, c: HostCluster, io: &MetaIo) -> bool {
        let Some(what) = self.overlap.owner(c) else {
            return false;
        };
        if self.skipped.insert(c.0) {
            log::warn!(
                "{}: host cluster {} holds {what} but its refcount is 0; not allocating it (`qemu-img check -r all` repairs the refcount)",
                io.path().display(),
                c.offset(self.cb())
            );
        }
        true
    }

    /// Finds `n` contiguous free clusters, starting at the free hint.
    fn find_free(&mut self, n: u64, avoid: &[(u64, u64)], io: &MetaIo) -> Result<HostCluster> {
        let mut c = self.free_hint.0.max(1);
        let mut run = 0;
        let limit = (1u64 << 56) / self.cs();
        while c < limit {
            let taken = avoid.iter().any(|&(s, len)| c >= s && c < s + len);
            if !taken
                && self.get(HostCluster(c), io)? == 0
                && !self.holds_metadata(HostCluster(c), io)
            {
                run += 1;
                if run == n {
                    return Ok(HostCluster(c + 1 - n));
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        Err(Error::new(ErrorKind::NoSpace, "no free host clusters below 2^56").in_file(io.path()))
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) for `purpose`.
    pub(crate) fn alloc(&mut self, n: u64, purpose: Use, io: &MetaIo) -> Result<Allocated> {
        let mut moved = None;
        loop {
            let start = self.find_free(n, &[], io)?;
            let pb = self.per_block();
            let mut created = false;
            for ti in start.0 / pb..=(start.0 + n - 1) / pb {
                if self.missing(ti) {
                    let m = self.create_block(ti, &[(start.0, n)], io)?;
                    moved = moved.or(m);
                    created = true;
                }
            }
            if created {
                // New refcount blocks may sit where the run was: look again.
                continue;
            }
            for k in 0..n {
                self.set_existing(start + k, 1, io)?;
            }
            self.free_hint = start + n;
            if let Use::Meta(kind) = purpose {
                self.overlap.claim(start, n, kind);
            }
            return Ok(Allocated {
                first: start,
                moved,
            });
        }
    }

    /// Creates the refcount block for table index `ti`, placed in a free cluster outside
    /// `avoid`. A block that lands in its own range describes itself.
    fn create_block(
        &mut self,
        ti: u64,
        avoid: &[(u64, u64)],
        io: &MetaIo,
    ) -> Result<Option<TableMove>> {
        if ti >= self.table.len() as u64 {
            return self.grow_table(ti + 1, io).map(Some);
        }
        let pb = self.per_block();
        let mut moved = None;
        loop {
            let b = self.find_free(1, avoid, io)?;
            let tb = b.0 / pb;
            if tb == ti {
                let mut data = vec![0u8; self.cs() as usize];
                self.layout.set(&mut data, (b.0 % pb) as usize, 1);
                self.insert_block(ti, data, true);
            } else if self.missing(tb) {
                let m = self.create_block(tb, avoid, io)?;
                moved = moved.or(m);
                continue;
            } else {
                self.set_existing(b, 1, io)?;
                self.insert_block(ti, vec![0u8; self.cs() as usize], true);
            }
            self.table[ti as usize] = b.offset(self.cb()).0;
            self.table_dirty = true;
            self.overlap.claim(b, 1, MetaKind::RefcountBlock);
            return Ok(moved);
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

    /// Writes dirty refcount blocks, then the table if it changed, syncing after each
    /// (rule F2: increments are durable before anything references the clusters).
    pub(crate) fn write_back(&mut self, io: &MetaIo) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&k, _)| k)
            .collect();
        dirty.sort_unstable();
        let wrote = !dirty.is_empty();
        for ti in dirty {
            let off = self.block_offset(ti);
            if let Some(b) = self.blocks.get_mut(&ti) {
                io.write("a refcount block", off, &b.data)?;
                b.dirty = false;
            }
        }
        if wrote {
            io.sync()?;
        }
        if self.table_dirty {
            let bytes = super::metaio::encode_words(&self.table, 0);
            io.write("the refcount table", self.table_offset, &bytes)?;
            io.sync()?;
            self.table_dirty = false;
        }
        self.evict_clean();
        Ok(())
    }

    /// Grows the refcount table to at least `min_entries`: a new table and the refcount
    /// blocks that describe it are written past everything in use and synced (rule F2);
    /// the caller then applies the returned move.
    fn grow_table(&mut self, min_entries: u64, io: &MetaIo) -> Result<TableMove> {
        // The new table must never point at a refcount block that is not on disk.
        self.write_back(io)?;
        let pb = self.per_block();
        let cs = self.cs();
        let per_cluster = cs / 8;
        let coverage_end = self.table.len() as u64 * pb;
        let file_end = io.len()?.div_ceil(cs);
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
            .in_file(io.path()));
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
            io.write(
                "a new refcount block",
                HostOffset((p + j as u64) * cs),
                data,
            )?;
        }
        let table_offset = HostOffset((p + nblocks) * cs);
        let masked: Vec<u64> = table.iter().map(|e| e & REFTABLE_OFFSET_MASK).collect();
        io.write(
            "the new refcount table",
            table_offset,
            &super::metaio::encode_words(&masked, 0),
        )?;
        io.sync()?;
        for (ti, data) in new_blocks {
            self.insert_block(ti, data, false);
        }
        self.overlap
            .claim(HostCluster(p), nblocks, MetaKind::RefcountBlock);
        self.overlap.claim(
            HostCluster(p + nblocks),
            table_clusters,
            MetaKind::RefcountTable,
        );
        let moved = TableMove {
            offset: table_offset,
            clusters: table_clusters as u32,
            old_offset: self.table_offset,
            old_clusters: self.table_clusters,
        };
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters as u32;
        self.table_dirty = false;
        Ok(moved)
    }
}
