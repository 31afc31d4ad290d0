//! Write-back of cached metadata, in the order that keeps the image consistent after a
//! crash at any point. The rules are design.md's flush rules:
//!
//! - F1. Guest data reaches the disk (fsync of the data file and the image) before any
//!   metadata that points at it.
//! - F2. Refcount increments (blocks, then the table) are durable before anything
//!   references the clusters they count.
//! - F3. L2 tables are durable before the L1 table that points at them; a table is
//!   durable before the header names it.
//! - F4. Decrements for references that changed tables dropped are made only once those
//!   tables are durable, and written again.
//! - F5. The header is written and synced on its own, after everything it points to.
//! - F6. A failed metadata write makes every later write and flush fail (`metaio`).
//!
//! A crash between steps leaves leaked clusters at worst, never a reference to a cluster
//! whose refcount is zero. Every ordered write in the engine happens here, or names the
//! rule it follows.

use super::alloc::{TableMove, Use};
use super::image::{Image, Tables, WriteState};
use super::overlap::MetaKind;
use crate::error::{Error, Result};
use crate::format::units::{HostCluster, HostOffset};

/// Deferred frees that make a flush due.
const MAX_DEFERRED: usize = 65536;

impl Image {
    /// Writes cluster 0 from the in-memory header and syncs (rule F5).
    pub(crate) fn write_header(&self, t: &Tables) -> Result<()> {
        let bytes = t
            .header
            .encode()
            .map_err(|e| Error::from(e).in_file(self.path()))?;
        self.io.write("the header", HostOffset(0), &bytes)?;
        self.io.sync()
    }

    /// Points the header at a refcount table that moved (its new table is on disk, rule
    /// F2), then frees the old table (rule F5 before F4).
    pub(crate) fn switch_reftable(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        mv: TableMove,
    ) -> Result<()> {
        t.header.refcount_table_offset = mv.offset.0;
        t.header.refcount_table_clusters = mv.clusters;
        self.write_header(t)?;
        let first = mv.old_offset.cluster(self.layout.cluster_bits);
        for k in 0..mv.old_clusters as u64 {
            w.alloc.release(first + k, &self.io)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters for `purpose`, applying at once a refcount-table
    /// move the allocation caused.
    pub(crate) fn allocate(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        n: u64,
        purpose: Use,
    ) -> Result<HostCluster> {
        let a = w.alloc.alloc(n, purpose, &self.io)?;
        if let Some(mv) = a.moved {
            self.switch_reftable(t, w, mv)?;
        }
        Ok(a.first)
    }

    /// Adds a reference to cluster `c` (a snapshot now shares it), applying a
    /// refcount-table move it caused.
    pub(crate) fn add_reference(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        c: HostCluster,
    ) -> Result<()> {
        if let Some(mv) = w.alloc.increment(c, &self.io)? {
            self.switch_reftable(t, w, mv)?;
        }
        Ok(())
    }

    /// Writes `bytes` of a new structure at `off`, in clusters nothing references yet,
    /// and syncs: it is durable before anything (the header, an L1 entry) points at it
    /// (rules F3 and F5). A failed write (a full disk) is not sticky, the caller frees the
    /// clusters; a failed sync is (rule F6).
    pub(crate) fn write_new_structure(
        &self,
        what: &str,
        off: HostOffset,
        bytes: &[u8],
    ) -> Result<()> {
        self.io.write_fresh(what, off, bytes)?;
        self.io.sync()
    }

    /// Writes a new structure into the `n` clusters from `first` just allocated for it;
    /// if that fails (a full disk), frees them again, so that the image is as before.
    pub(crate) fn write_new_clusters(
        &self,
        w: &mut WriteState,
        what: &str,
        first: HostCluster,
        n: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let written =
            self.io
                .write_unreferenced(what, first.offset(self.layout.cluster_bits), bytes);
        if written.is_err() {
            for k in 0..n {
                w.alloc.release(first + k, &self.io)?;
            }
        }
        written
    }

    /// Refuses to write metadata of `kind` over `[off, off + len)` where that range also
    /// holds other metadata.
    fn check_meta_write(
        &self,
        w: &WriteState,
        off: HostOffset,
        len: u64,
        kind: MetaKind,
    ) -> Result<()> {
        let (first, n) = off.clusters_spanned(len.max(1), self.layout.cluster_bits);
        for k in 0..n {
            if let Some(what) = w.alloc.overlap().meta_conflict(first + k, kind) {
                return Err(Error::corrupt(format!(
                    "writing {} at {off} would overwrite {what}; refusing the write",
                    kind.name()
                ))
                .in_file(self.path()));
            }
        }
        Ok(())
    }

    /// Flushes when the caches hold more dirty metadata than they may.
    pub(crate) fn flush_if_needed(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        if self.l2_cache.over_capacity()
            || w.alloc.over_capacity()
            || w.deferred.len() > MAX_DEFERRED
        {
            self.write_back(t, w)?;
        }
        Ok(())
    }

    /// Makes every write so far durable (fsync semantics).
    pub fn flush(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        let flushed = self.write_back(t, w);
        self.corrupt_if(t, flushed)
    }

    /// Writes every cached change back, in the order of the rules above.
    pub(crate) fn write_back(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        // After a failed write-back the cache no longer says what is on disk, and what
        // was lost cannot be written again: a later fsync must not report success (F6).
        self.io.check()?;
        // F1: guest data.
        if let Some((path, store)) = self.data_store.get() {
            store.flush().map_err(|e| {
                self.io.fail();
                Error::io(path, "flushing the data file", e)
            })?;
        }
        self.io.sync()?;
        // F2: refcount increments.
        w.alloc.write_back(&self.io)?;
        // F3: L2 tables, then the L1 table.
        let dirty = self.l2_cache.select(|t| t.is_dirty());
        for (off, table) in &dirty {
            let off = HostOffset(*off);
            self.check_meta_write(w, off, self.cluster_size(), MetaKind::ActiveL2)?;
            self.io.write("an L2 table", off, &table.to_bytes())?;
            table.mark_clean();
        }
        if !dirty.is_empty() {
            self.io.sync()?;
        }
        if t.l1_dirty {
            let off = HostOffset(t.header.l1_table_offset);
            self.check_meta_write(w, off, t.l1.len() as u64 * 8, MetaKind::ActiveL1)?;
            self.io
                .write("the L1 table", off, &super::metaio::encode_words(&t.l1, 0))?;
            self.io.sync()?;
            t.l1_dirty = false;
        }
        // F4: decrements for the references dropped above.
        if !w.deferred.is_empty() {
            for c in std::mem::take(&mut w.deferred) {
                w.alloc.release(c, &self.io)?;
                if w.alloc.get(c, &self.io)? == 0 {
                    self.l2_cache.remove(c.offset(self.layout.cluster_bits).0);
                }
            }
            w.alloc.write_back(&self.io)?;
        }
        // Tables written back may now be dropped from the cache.
        self.l2_cache.shrink_to_capacity();
        Ok(())
    }
}
