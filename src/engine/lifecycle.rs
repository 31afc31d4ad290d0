//! The changes to an image as a whole: the duties before its first write, growing the
//! disk, pointing it at another backing file, marking it corrupt, and a clean close.

use super::alloc::Use;
use super::image::{Image, Tables, WriteState};
use super::overlap::MetaKind;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{MAX_L1_ENTRIES, autoclear, incompat};
use crate::format::units::HostOffset;

impl Image {
    /// Refuses writes to an image opened read-only, marked corrupt, or whose metadata
    /// write-back failed.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::read_only("the image is open read-only").in_file(self.path()));
        }
        if let Some(why) = self.corrupt.get() {
            return Err(Error::corrupt(format!(
                "the image was marked corrupt ({why}); refusing further writes (repair it with `qemu-img check -r all`)"
            ))
            .in_file(self.path()));
        }
        self.io.check()
    }

    /// Passes `result` on; when it is a corruption found while changing the image (a
    /// write that would land on metadata, an entry that breaks the format), first marks
    /// the image corrupt as QEMU does: the header's corrupt bit is set, and this and every
    /// later open refuses to write until `qemu-img check -r all` repaired it.
    pub(crate) fn corrupt_if<T>(&self, t: &mut Tables, result: Result<T>) -> Result<T> {
        let Err(e) = result else {
            return result;
        };
        if e.kind() != ErrorKind::Corrupt || self.corrupt.set(e.report()).is_err() {
            return Err(e);
        }
        log::error!("{e:#}; marking the image corrupt");
        t.header.incompatible_features |= incompat::CORRUPT;
        if let Err(w) = self.write_header(t) {
            log::error!("{w:#}");
        }
        Err(e)
    }

    /// Duties before the first change: clear autoclear bits qcow2fs does not maintain,
    /// and with lazy refcounts set (and sync) the dirty bit.
    pub(crate) fn prepare_for_write(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        if w.prepared {
            return Ok(());
        }
        let mut changed = false;
        // Unknown bits and a bitmaps bit without bitmaps. data-file-raw stays: writes to a
        // data file go to the guest offset, and zeroing writes real zeros there.
        let mut keep = autoclear::DATA_FILE_RAW;
        if t.header.bitmaps.is_some() {
            keep |= autoclear::BITMAPS;
        }
        if t.header.autoclear_features & !keep != 0 {
            t.header.autoclear_features &= keep;
            changed = true;
        }
        if t.header.lazy_refcounts() && !t.header.is_dirty() {
            t.header.incompatible_features |= incompat::DIRTY;
            w.we_set_dirty = true;
            changed = true;
        }
        if changed {
            self.write_header(t)?;
        }
        // B1: the bitmaps are marked in use before the first change lands.
        self.mark_bitmaps_in_use(t, w)?;
        w.prepared = true;
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
            .in_file(self.path()));
        }
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        let resized = self.resize_locked(t, w, new_size);
        if resized.is_ok() {
            self.resize_bitmaps(t.header.virtual_size(), true)?;
        }
        self.corrupt_if(t, resized)
    }

    fn resize_locked(&self, t: &mut Tables, w: &mut WriteState, new_size: u64) -> Result<()> {
        let cur = t.header.virtual_size();
        if new_size < cur {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("shrinking the disk from {cur} to {new_size} bytes is not supported"),
            )
            .in_file(self.path()));
        }
        if new_size == cur {
            return Ok(());
        }
        self.resize_bitmaps(new_size, false)?;
        self.prepare_for_write(t, w)?;
        if t.header.data_file_raw()
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
        let needed = t.header.l1_entries_for(new_size);
        if needed > MAX_L1_ENTRIES {
            return Err(Error::invalid(format!(
                "{new_size} bytes need more than the 32 MiB L1 limit"
            ))
            .in_file(self.path()));
        }
        if needed as usize <= t.l1.len() {
            t.header.size = new_size;
            return self.write_header(t);
        }
        // The new L1 table copies entries that must not point at unwritten tables.
        self.write_back(t, w)?;
        let mut l1 = t.l1.clone();
        l1.resize(needed as usize, 0);
        self.move_l1(t, w, l1, new_size)
    }

    /// Puts the active L1 table `l1` in newly allocated clusters (it no longer fits where
    /// the current one is) and points the header at it, with disk size `size`; then frees
    /// the old table. Everything `l1` points to must be on disk already.
    pub(crate) fn move_l1(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        l1: Vec<u64>,
        size: u64,
    ) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let clusters = (l1.len() as u64 * 8).div_ceil(self.cluster_size()).max(1);
        let first = self.allocate(t, w, clusters, Use::Meta(MetaKind::ActiveL1))?;
        // F2: the clusters' refcounts are durable; F3: the table before the header.
        w.alloc.write_back(&self.io)?;
        let bytes = super::metaio::encode_words(&l1, (clusters << cb) as usize);
        self.write_new_clusters(w, "the new L1 table", first, clusters, &bytes)?;
        let old = (
            HostOffset(t.header.l1_table_offset),
            t.header.l1_size as u64,
        );
        t.header.l1_table_offset = first.offset(cb).0;
        t.header.l1_size = l1.len() as u32;
        t.header.size = size;
        self.write_header(t)?;
        t.l1 = l1;
        t.l1_dirty = false;
        // F4: the old table is free once the header no longer names it.
        let (old_first, n) = old.0.clusters_spanned(old.1 * 8, cb);
        for k in 0..n {
            w.alloc.release(old_first + k, &self.io)?;
        }
        w.alloc.write_back(&self.io)
    }

    /// Points the header at another backing file (name and format), or none. Everything
    /// is written back first.
    pub fn set_backing(&self, backing: Option<(Vec<u8>, String)>) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        self.prepare_for_write(t, w)?;
        self.write_back(t, w)?;
        let old = (
            t.header.backing_file.clone(),
            t.header.backing_format.clone(),
        );
        (t.header.backing_file, t.header.backing_format) = match backing {
            Some((name, fmt)) => (Some(name), Some(fmt)),
            None => (None, None),
        };
        if let Err(e) = t.header.encode() {
            (t.header.backing_file, t.header.backing_format) = old;
            return Err(Error::from(e).in_file(self.path()));
        }
        self.write_header(t)
    }

    /// Makes a writable image read-only (a reopen, or the old top of an external
    /// snapshot): everything is written back, the bitmaps stored with in_use cleared and
    /// the dirty bit qcow2fs set cleared, as at a clean close (on failure the image
    /// stays writable); then the write state goes. The file's locks are the caller's
    /// to downgrade afterwards.
    pub fn make_read_only(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        self.io.check()?;
        let mut m = self.meta.write();
        {
            let (t, w) = m.writer(self.path())?;
            self.close_locked(t, w)?;
        }
        m.w = None;
        self.writable
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Makes a read-only image writable (a reopen), once its file has been reopened for
    /// writing and locked: the rules for opening read-write are checked (corrupt bit,
    /// bitmaps), the allocator loaded, refcounts rebuilt if the image was left dirty, and
    /// the first-write duties done at once. On failure the image stays read-only.
    pub fn make_writable(&self) -> Result<()> {
        if self.is_writable() {
            return Ok(());
        }
        let mut m = self.meta.write();
        super::open::check_writable_open(self.path(), &m.t.header, &self.bitmaps.lock())?;
        // The tables are those read at open: QEMU's locks, which a read-only open holds
        // too, kept everyone else from writing the image since.
        let file = self.bitmaps.lock().file.clone();
        let w = super::open::load_write_state(&self.io, &m.t, &file, self.l2_cache.capacity())?;
        m.w = Some(w);
        self.writable
            .store(true, std::sync::atomic::Ordering::Release);
        let prepared = (|| {
            let (t, w) = m.writer(self.path())?;
            if t.header.is_dirty() && !w.we_set_dirty {
                self.rebuild_locked(t, w)?;
            }
            // The bitmaps are checked and loaded, then marked in use (B1), before the
            // switch commits: a bitmap that could not be kept valid refuses it.
            self.load_bitmaps_locked(t, w)?;
            self.prepare_for_write(t, w)
        })();
        if let Err(e) = prepared {
            self.unload_bitmaps();
            m.w = None;
            self.writable
                .store(false, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Writes everything back, stores the bitmaps (clearing in_use) and, where qcow2fs set
    /// the dirty bit, clears it: a clean close.
    pub fn close(&self) -> Result<()> {
        if !self.is_writable() || self.io.has_failed() {
            return Ok(());
        }
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        self.close_locked(t, w)
    }

    /// The clean-close duties: everything written back, the bitmaps stored (B3), then the
    /// dirty bit qcow2fs set cleared (F5).
    fn close_locked(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        self.write_back(t, w)?;
        self.store_bitmaps(t, w)?;
        if w.we_set_dirty {
            t.header.incompatible_features &= !incompat::DIRTY;
            self.write_header(t)?;
            w.we_set_dirty = false;
        }
        Ok(())
    }
}
