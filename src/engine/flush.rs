//! Write-back of cached metadata, in the order that keeps the image consistent after a
//! crash at any point (checklist section 17):
//!
//! 1. guest data reaches the disk (fsync of the image and data file);
//! 2. refcount blocks, then the refcount table: every increment is durable before
//!    anything references the new clusters;
//! 3. L2 tables, then the L1 table;
//! 4. only now the decrements for references the new tables dropped, written again.
//!
//! A crash between steps leaves leaked clusters at worst, never a reference to a
//! cluster whose refcount is zero. The header changes (first write, refcount table moved,
//! disk grown, clean close) are written and synced on their own, after what they point to.

use super::image::{Image, Meta};
use super::overlap::MetaKind;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{autoclear, incompat};

impl Image {
    /// Writes cluster 0 from the in-memory header and syncs.
    pub(crate) fn write_header(&self, m: &Meta) -> Result<()> {
        let bytes = m
            .header
            .encode()
            .map_err(|e| Error::from(e).in_file(&self.path))?;
        let io = self.io();
        io.write("the header", 0, &bytes)?;
        io.sync()
    }

    /// Passes `result` on; when it is a corruption found while changing the image (a
    /// write that would land on metadata, an entry that breaks the format), first marks
    /// the image corrupt as QEMU does: the header's corrupt bit is set, and this and every
    /// later open refuses to write until `qemu-img check -r all` repaired it.
    pub(crate) fn corrupt_if<T>(&self, m: &mut Meta, result: Result<T>) -> Result<T> {
        let Err(e) = result else {
            return result;
        };
        if e.kind() != ErrorKind::Corrupt || self.corrupt.set(e.message().to_string()).is_err() {
            return Err(e);
        }
        log::error!("{e}; marking the image corrupt");
        m.header.incompatible_features |= incompat::CORRUPT;
        if let Err(w) = self.write_header(m) {
            log::error!("{w}");
        }
        Err(e)
    }

    /// Duties before the first change: clear autoclear bits qcow2fs does not maintain,
    /// and with lazy refcounts set (and sync) the dirty bit.
    pub(crate) fn prepare_for_write(&self, m: &mut Meta) -> Result<()> {
        if m.prepared {
            return Ok(());
        }
        let mut changed = false;
        // Unknown bits and a bitmaps bit without bitmaps. data-file-raw stays: writes to a
        // data file go to the guest offset, and zeroing writes real zeros there.
        let mut keep = autoclear::DATA_FILE_RAW;
        if m.header.bitmaps.is_some() {
            keep |= autoclear::BITMAPS;
        }
        if m.header.autoclear_features & !keep != 0 {
            m.header.autoclear_features &= keep;
            changed = true;
        }
        if m.header.lazy_refcounts() && !m.header.is_dirty() {
            m.header.incompatible_features |= incompat::DIRTY;
            m.we_set_dirty = true;
            changed = true;
        }
        if changed {
            self.write_header(m)?;
        }
        m.prepared = true;
        Ok(())
    }

    /// After the refcount table moved: point the header at the new table, then free the
    /// old one.
    pub(crate) fn switch_reftable_if_moved(&self, m: &mut Meta) -> Result<()> {
        let rs = m.rc.as_mut().expect("refcount state");
        if !rs.header_stale {
            return Ok(());
        }
        m.header.refcount_table_offset = rs.table_offset;
        m.header.refcount_table_clusters = rs.table_clusters;
        rs.header_stale = false;
        let old = std::mem::take(&mut rs.old_tables);
        self.write_header(m)?;
        let cs = self.cluster_size();
        let io = self.io();
        let rs = m.rc.as_mut().expect("refcount state");
        for (off, n) in old {
            for k in 0..n as u64 {
                rs.release(off / cs + k, &io)?;
            }
        }
        Ok(())
    }

    /// Refuses to write metadata of `kind` over `[off, off + len)` where that range also
    /// holds other metadata.
    fn check_meta_write(&self, m: &Meta, off: u64, len: u64, kind: MetaKind) -> Result<()> {
        let Some(rs) = m.rc.as_ref() else {
            return Ok(());
        };
        let cs = self.cluster_size();
        for c in off / cs..(off + len.max(1)).div_ceil(cs) {
            if let Some(what) = rs.overlap.meta_conflict(c, kind) {
                return Err(Error::corrupt(format!(
                    "writing {} at {off:#x} would overwrite {what}; refusing the write",
                    kind.name()
                ))
                .in_file(&self.path));
            }
        }
        Ok(())
    }

    /// Flushes when the caches hold more dirty metadata than they may.
    pub(crate) fn flush_if_needed(&self, m: &mut Meta) -> Result<()> {
        let rc_full = m.rc.as_ref().is_some_and(|r| r.over_capacity());
        if self.l2_cache.over_capacity() || rc_full || m.deferred.len() > 65536 {
            self.flush_locked(m)?;
        }
        Ok(())
    }

    /// Makes every write so far durable (fsync semantics).
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.meta.write();
        let flushed = self.flush_locked(&mut m);
        self.corrupt_if(&mut m, flushed)
    }

    pub(crate) fn flush_locked(&self, m: &mut Meta) -> Result<()> {
        // After a failed write-back the cache no longer says what is on disk, and what
        // was lost cannot be written again: a later fsync must not report success.
        if self.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier metadata write failed; the image cannot be flushed",
            )
            .in_file(&self.path));
        }
        let io = self.io();
        // 1. Guest data.
        if let Some((path, store)) = self.data_store.get() {
            store.flush().map_err(|e| {
                self.failed
                    .store(true, std::sync::atomic::Ordering::Release);
                Error::io(path, "flushing the data file", e)
            })?;
        }
        io.sync()?;
        // 2. Refcount increments.
        if let Some(rs) = m.rc.as_mut() {
            rs.write_back(&io)?;
        }
        self.switch_reftable_if_moved(m)?;
        // 3. L2 tables, then the L1 table.
        let dirty = self.l2_cache.select(|t| t.is_dirty());
        let cs = self.cluster_size();
        for (off, t) in &dirty {
            self.check_meta_write(m, *off, cs, MetaKind::ActiveL2)?;
            io.write("an L2 table", *off, &t.to_bytes())?;
            t.mark_clean();
        }
        if !dirty.is_empty() {
            io.sync()?;
        }
        if m.l1_dirty {
            let l1_bytes = m.l1.len() as u64 * 8;
            self.check_meta_write(m, m.header.l1_table_offset, l1_bytes, MetaKind::ActiveL1)?;
            let mut bytes = Vec::with_capacity(m.l1.len() * 8);
            for e in &m.l1 {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            io.write("the L1 table", m.header.l1_table_offset, &bytes)?;
            io.sync()?;
            m.l1_dirty = false;
        }
        // 4. Decrements for the references dropped above.
        if !m.deferred.is_empty() {
            let cs = self.cluster_size();
            let deferred = std::mem::take(&mut m.deferred);
            let rs = m.rc.as_mut().expect("refcount state");
            for host in deferred {
                rs.release(host / cs, &io)?;
                if rs.get(host / cs, &io)? == 0 {
                    self.l2_cache.remove(host);
                }
            }
            rs.write_back(&io)?;
        }
        // Tables written back may now be dropped from the cache.
        self.l2_cache.shrink_to_capacity(|t| !t.is_dirty());
        Ok(())
    }

    /// Grows the disk to `new_size` bytes, a whole number of 512-byte sectors (a qcow2
    /// disk's size is; QEMU refuses other sizes too). Shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "the new size {new_size} is not a multiple of 512 bytes (a qcow2 disk is made of 512-byte sectors)"
            ))
            .in_file(&self.path));
        }
        let mut m = self.meta.write();
        let resized = self.resize_locked(&mut m, new_size);
        self.corrupt_if(&mut m, resized)
    }

    fn resize_locked(&self, m: &mut Meta, new_size: u64) -> Result<()> {
        let cur = m.header.virtual_size();
        if new_size < cur {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("shrinking the disk from {cur} to {new_size} bytes is not supported"),
            )
            .in_file(&self.path));
        }
        if new_size == cur {
            return Ok(());
        }
        self.prepare_for_write(m)?;
        if m.header.data_file_raw()
            && let Some((path, store)) = self.data_store.get()
        {
            // A raw data file stays a raw image of the whole disk.
            let len = store
                .len()
                .map_err(|e| Error::io(path, "reading the data file's size", e))?;
            if len < new_size {
                store.set_len(new_size).map_err(|e| {
                    Error::io(
                        path,
                        format!("growing the data file to {new_size} bytes"),
                        e,
                    )
                })?;
            }
        }
        let needed = m.header.l1_entries_for(new_size);
        if needed > crate::format::header::MAX_L1_ENTRIES {
            return Err(Error::invalid(format!(
                "{new_size} bytes need more than the 32 MiB L1 limit"
            ))
            .in_file(&self.path));
        }
        if needed as usize > m.l1.len() {
            // The new L1 table copies entries that must not point at unwritten tables.
            self.flush_locked(m)?;
            let cs = self.cluster_size();
            let clusters = (needed * 8).div_ceil(cs);
            let io = self.io();
            let rs = m.rc.as_mut().expect("refcount state");
            let first = rs.alloc(clusters, &io)?;
            rs.overlap.claim(first, clusters, MetaKind::ActiveL1);
            self.switch_reftable_if_moved(m)?;
            let mut l1 = m.l1.clone();
            l1.resize(needed as usize, 0);
            let mut bytes = Vec::with_capacity((clusters * cs) as usize);
            for e in &l1 {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            bytes.resize((clusters * cs) as usize, 0);
            // The clusters must be durable (refcounts) before the header names them.
            m.rc.as_mut().expect("refcount state").write_back(&io)?;
            io.write("the new L1 table", first * cs, &bytes)?;
            io.sync()?;
            let old = (m.header.l1_table_offset, m.header.l1_size as u64);
            m.header.l1_table_offset = first * cs;
            m.header.l1_size = needed as u32;
            m.header.size = new_size;
            self.write_header(m)?;
            m.l1 = l1;
            let rs = m.rc.as_mut().expect("refcount state");
            for k in 0..(old.1 * 8).div_ceil(cs) {
                rs.release(old.0 / cs + k, &io)?;
            }
            rs.write_back(&io)?;
        } else {
            m.header.size = new_size;
            self.write_header(m)?;
        }
        Ok(())
    }

    /// Points the header at another backing file (name and format), or none. Everything
    /// is written back first.
    pub fn set_backing(&self, backing: Option<(Vec<u8>, String)>) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("the image is open read-only").in_file(&self.path));
        }
        let mut m = self.meta.write();
        self.prepare_for_write(&mut m)?;
        self.flush_locked(&mut m)?;
        let old = (
            m.header.backing_file.clone(),
            m.header.backing_format.clone(),
        );
        match backing {
            Some((name, fmt)) => {
                m.header.backing_file = Some(name);
                m.header.backing_format = Some(fmt);
            }
            None => {
                m.header.backing_file = None;
                m.header.backing_format = None;
            }
        }
        if let Err(e) = m.header.encode() {
            (m.header.backing_file, m.header.backing_format) = old;
            return Err(Error::from(e).in_file(&self.path));
        }
        self.write_header(&m)
    }

    /// Writes everything back and, where qcow2fs set the dirty bit, clears it: a clean
    /// close.
    pub fn close(&self) -> Result<()> {
        if !self.writable || self.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.meta.write();
        self.flush_locked(&mut m)?;
        if m.we_set_dirty {
            m.header.incompatible_features &= !incompat::DIRTY;
            self.write_header(&m)?;
            m.we_set_dirty = false;
        }
        Ok(())
    }
}
