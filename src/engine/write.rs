//! Writing an image (checklist sections 11, 12 and 17): planning where guest writes go
//! (in place, or into newly allocated clusters that copy-on-write from the old content),
//! publishing the new L2 entries once the data is written, zeroing and discarding, and
//! growing the disk.
//!
//! The caller (`block`) follows one protocol per write, holding an exclusive guest range
//! lock on the clusters it touches:
//! 1. [`Image::plan_write`] allocates what is needed and returns one plan per cluster;
//! 2. it fills the plan's `fill` ranges with the old guest content, writes the data, and
//! 3. calls [`Image::publish`], which stores the L2 entries and queues the references the
//!    write dropped; those refcounts are decremented only after a flush made the new
//!    references durable (see `flush`).

use super::cache::L2Table;
use super::image::{Image, Meta};
use super::overlap::MetaKind;
use super::refcount::MetaIo;
use crate::error::{Error, ErrorKind, Result};
use crate::format::entry::{COMPRESSED, COPIED, ClusterKind, OFFSET_MASK, SUBCLUSTERS, ZERO_FLAG};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// How one cluster of a write is carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterWrite {
    /// Guest offset of the cluster.
    pub guest: u64,
    /// Host offset of the cluster the data goes to (in the image or its data file).
    pub host: u64,
    /// The part of the cluster the caller writes: `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// Parts of the cluster to fill with the current guest content first (copy-on-write).
    pub fill: Vec<(u64, u64)>,
    /// New L2 entry (and subcluster bitmap) to store once the data is written.
    pub entry: Option<(u64, u64)>,
    /// Host clusters whose reference the new entry drops.
    pub(crate) release: Vec<u64>,
    pub(crate) allocate: bool,
}

fn touched_mask(s0: u32, s1: u32) -> u32 {
    let hi = if s1 >= 31 {
        u32::MAX
    } else {
        (1u32 << (s1 + 1)) - 1
    };
    hi & !((1u32 << s0) - 1)
}

impl Image {
    pub(crate) fn io(&self) -> MetaIo<'_> {
        MetaIo {
            file: &*self.file,
            path: &self.path,
            failed: &self.failed,
        }
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("the image is open read-only").in_file(&self.path));
        }
        if let Some(why) = self.corrupt.get() {
            return Err(Error::corrupt(format!(
                "the image was marked corrupt ({why}); refusing further writes (repair it with `qemu-img check -r all`)"
            ))
            .in_file(&self.path));
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier metadata write failed; refusing further writes",
            )
            .in_file(&self.path));
        }
        Ok(())
    }

    /// Host clusters a compressed range overlaps.
    fn compressed_clusters(&self, offset: u64, size: u64) -> Vec<u64> {
        let cs = self.cluster_size();
        let first = (offset & !511) / cs;
        let last = (offset + size - 1) / cs;
        (first..=last).map(|c| c * cs).collect()
    }

    /// What an entry references, to release when it is replaced.
    fn references(&self, entry: u64) -> Vec<u64> {
        if self.layout.data_file {
            return Vec::new();
        }
        if entry & COMPRESSED != 0 {
            return match self.layout.compressed_desc(entry) {
                Ok(d) => self.compressed_clusters(d.offset, d.size),
                Err(_) => Vec::new(),
            };
        }
        match entry & OFFSET_MASK {
            0 => Vec::new(),
            h => vec![h],
        }
    }

    /// The L2 table for L1 index `l1i`, allocating a new table or copying a shared one.
    fn l2_for_write(&self, m: &mut Meta, l1i: usize) -> Result<Arc<L2Table>> {
        let cs = self.cluster_size();
        let e = m.l1[l1i];
        let off = self
            .layout
            .l1_l2_offset(e)
            .map_err(|err| Error::corrupt(format!("L1 entry {l1i}: {err}")).in_file(&self.path))?;
        if off != 0 && e & COPIED != 0 {
            let rs = m.rc.as_ref().expect("writable image has refcount state");
            if let Some(what) = rs.overlap.meta_conflict(off / cs, MetaKind::ActiveL2) {
                return Err(Error::corrupt(format!(
                    "L1 entry {l1i}: the L2 table at {off:#x} is marked as used only by the active disk, but the cluster also holds {what}; refusing to change it"
                ))
                .in_file(&self.path));
            }
            return self.l2_table(off);
        }
        let words = self.layout.l2_words();
        let table = if off == 0 {
            L2Table::zeroed(words)
        } else {
            let old = self.l2_table(off)?;
            let t = L2Table::zeroed(words);
            for i in 0..words {
                t.set_word(i, old.word(i));
            }
            t
        };
        table.mark_dirty();
        let io = self.io();
        let rs = m.rc.as_mut().expect("writable image has refcount state");
        let c = rs.alloc(1, &io)?;
        rs.overlap.claim(c, 1, MetaKind::ActiveL2);
        if off != 0 {
            // The old table stays with the snapshots that share it.
            rs.overlap.release(off / cs, 1, MetaKind::ActiveL2);
        }
        let new_off = c * cs;
        self.l2_cache.remove(new_off);
        let table = self
            .l2_cache
            .insert(new_off, Arc::new(table), |t| !t.is_dirty());
        m.l1[l1i] = new_off | COPIED;
        m.l1_dirty = true;
        if off != 0 {
            m.deferred.push(off);
        }
        Ok(table)
    }

    /// Plans a write of `[off, off + len)` to the active disk (see the module comment).
    pub fn plan_write(&self, off: u64, len: u64) -> Result<Vec<ClusterWrite>> {
        self.check_writable()?;
        if let Some(plans) = self.plan_in_place(off, len)? {
            return Ok(plans);
        }
        let mut m = self.meta.write();
        let planned = self.plan_locked(&mut m, off, len);
        self.corrupt_if(&mut m, planned)
    }

    /// Refuses a plan whose data would land on metadata (an L2 entry of a damaged image
    /// pointing at it).
    fn check_targets(&self, m: &Meta, plans: &[ClusterWrite]) -> Result<()> {
        if self.layout.data_file {
            return Ok(());
        }
        let Some(rs) = m.rc.as_ref() else {
            return Ok(());
        };
        let cs = self.cluster_size();
        for p in plans {
            if let Some(what) = rs.overlap.data_conflict(p.host / cs) {
                return Err(Error::corrupt(format!(
                    "guest data for offset {:#x} would be written to host offset {:#x}, which holds {what}; refusing the write",
                    p.guest, p.host
                ))
                .in_file(&self.path));
            }
        }
        Ok(())
    }

    /// The fast path: every cluster can be overwritten where it is (no metadata change).
    fn plan_in_place(&self, off: u64, len: u64) -> Result<Option<Vec<ClusterWrite>>> {
        let m = self.meta.read();
        if !m.prepared {
            return Ok(None);
        }
        let mut plans = Vec::new();
        for (guest, start, end) in self.clusters(off, len) {
            let Some((entry, bitmap)) = self.current_entry(&m, guest)? else {
                return Ok(None);
            };
            match self.plan_cluster(guest, start, end, entry, bitmap)? {
                p if p.entry.is_none() && !p.allocate => plans.push(p),
                _ => return Ok(None),
            }
        }
        if self.check_targets(&m, &plans).is_err() {
            // Take the slow path, which reports it and marks the image corrupt.
            return Ok(None);
        }
        Ok(Some(plans))
    }

    /// Splits a guest range into (cluster offset, start, end) pieces.
    fn clusters(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let cs = self.cluster_size();
        let end = off + len;
        let mut cur = off;
        std::iter::from_fn(move || {
            if cur >= end {
                return None;
            }
            let guest = cur & !(cs - 1);
            let stop = (guest + cs).min(end);
            let piece = (guest, cur - guest, stop - guest);
            cur = stop;
            Some(piece)
        })
    }

    /// The L2 entry (and bitmap) for a guest cluster, if its table exists.
    fn current_entry(&self, m: &Meta, guest: u64) -> Result<Option<(u64, u64)>> {
        let cluster = guest >> self.layout.cluster_bits;
        let l1i = (cluster / self.layout.l2_entries()) as usize;
        let Some(&e) = m.l1.get(l1i) else {
            return Ok(None);
        };
        let off = e & OFFSET_MASK;
        if off == 0 || e & COPIED == 0 {
            return Ok(None);
        }
        let t = self.l2_table(off)?;
        let i = (cluster % self.layout.l2_entries()) as usize;
        Ok(Some(if self.layout.extended_l2 {
            (t.word(2 * i), t.word(2 * i + 1))
        } else {
            (t.word(i), 0)
        }))
    }

    /// Decides how one cluster is written, given its current entry.
    fn plan_cluster(
        &self,
        guest: u64,
        start: u64,
        end: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<ClusterWrite> {
        let cs = self.cluster_size();
        let layout = self.layout;
        let corrupt = |err: crate::format::entry::EntryError| {
            Error::corrupt(format!("L2 entry for guest offset {guest:#x}: {err}"))
                .in_file(&self.path)
        };
        let mut plan = ClusterWrite {
            guest,
            host: 0,
            start,
            end,
            fill: Vec::new(),
            entry: None,
            release: Vec::new(),
            allocate: false,
        };
        let complement = |plan: &mut ClusterWrite| {
            if start > 0 {
                plan.fill.push((0, start));
            }
            if end < cs {
                plan.fill.push((end, cs));
            }
        };
        if !layout.extended_l2 {
            let (kind, _) = layout.classify(entry, 0, 0).map_err(corrupt)?;
            if let ClusterKind::Normal { host } = kind
                && entry & COPIED != 0
            {
                plan.host = host;
                return Ok(plan);
            }
            complement(&mut plan);
            plan.release = self.references(entry);
            plan.allocate = true;
            return Ok(plan);
        }
        // Extended L2: work per subcluster.
        layout.classify(entry, bitmap, 0).map_err(corrupt)?;
        let scs = layout.subcluster_size();
        let (s0, s1) = ((start / scs) as u32, ((end - 1) / scs) as u32);
        let touched = touched_mask(s0, s1);
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        let new_bitmap = |alloc: u32| (alloc | touched) as u64 | (((zero & !touched) as u64) << 32);
        // Parts of the touched subclusters the write leaves, where they were not allocated.
        let edges = |plan: &mut ClusterWrite, need: u32| {
            if need & (1 << s0) != 0 && start > s0 as u64 * scs {
                plan.fill.push((s0 as u64 * scs, start));
            }
            if need & (1 << s1) != 0 && end < (s1 as u64 + 1) * scs {
                let from = if s0 == s1 { end.max(start) } else { end };
                plan.fill.push((from, (s1 as u64 + 1) * scs));
            }
        };
        if entry & COMPRESSED != 0 {
            complement(&mut plan);
            plan.release = self.references(entry);
            plan.allocate = true;
            plan.entry = Some((0, (1u64 << SUBCLUSTERS) - 1));
            return Ok(plan);
        }
        let host = entry & OFFSET_MASK;
        let allocated = host != 0 || (layout.data_file && entry & COPIED != 0);
        if allocated && entry & COPIED != 0 {
            plan.host = host;
            let need = touched & !alloc;
            if need != 0 {
                edges(&mut plan, need);
                plan.entry = Some((entry, new_bitmap(alloc)));
            }
            return Ok(plan);
        }
        if allocated {
            // Shared with a snapshot: copy the whole cluster.
            complement(&mut plan);
            plan.release = self.references(entry);
            plan.entry = Some((0, new_bitmap(alloc)));
        } else {
            edges(&mut plan, touched);
            plan.entry = Some((0, new_bitmap(0)));
        }
        plan.allocate = true;
        Ok(plan)
    }

    fn plan_locked(&self, m: &mut Meta, off: u64, len: u64) -> Result<Vec<ClusterWrite>> {
        self.prepare_for_write(m)?;
        let cs = self.cluster_size();
        let l2_entries = self.layout.l2_entries();
        let mut plans = Vec::new();
        for (guest, start, end) in self.clusters(off, len) {
            let cluster = guest / cs;
            let l1i = (cluster / l2_entries) as usize;
            let t = self.l2_for_write(m, l1i)?;
            let i = (cluster % l2_entries) as usize;
            let (entry, bitmap) = if self.layout.extended_l2 {
                (t.word(2 * i), t.word(2 * i + 1))
            } else {
                (t.word(i), 0)
            };
            plans.push(self.plan_cluster(guest, start, end, entry, bitmap)?);
        }
        // Give clusters that need one a new host cluster, contiguous where the guest
        // clusters are.
        let mut i = 0;
        while i < plans.len() {
            if !plans[i].allocate {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < plans.len() && plans[j].allocate && plans[j].guest == plans[j - 1].guest + cs
            {
                j += 1;
            }
            let first = if self.layout.data_file {
                plans[i].guest / cs
            } else {
                let io = self.io();
                m.rc.as_mut()
                    .expect("refcount state")
                    .alloc((j - i) as u64, &io)?
            };
            for (k, p) in plans[i..j].iter_mut().enumerate() {
                p.host = (first + k as u64) * cs;
                let bitmap = p.entry.map_or(0, |(_, b)| b);
                p.entry = Some((p.host | COPIED, bitmap));
            }
            i = j;
        }
        self.switch_reftable_if_moved(m)?;
        self.check_targets(m, &plans)?;
        Ok(plans)
    }

    /// Stores the L2 entries of a finished write and queues the references it dropped.
    pub fn publish(&self, plans: &[ClusterWrite]) -> Result<()> {
        if plans.iter().all(|p| p.entry.is_none()) {
            return Ok(());
        }
        let mut m = self.meta.write();
        let published = self.publish_locked(&mut m, plans);
        self.corrupt_if(&mut m, published)
    }

    fn publish_locked(&self, m: &mut Meta, plans: &[ClusterWrite]) -> Result<()> {
        for p in plans {
            let Some((word, bitmap)) = p.entry else {
                continue;
            };
            self.store_entry(m, p.guest, word, bitmap)?;
            m.deferred.extend(&p.release);
        }
        self.flush_if_needed(m)
    }

    /// Writes an entry into the (already writable) L2 table of a guest cluster.
    fn store_entry(&self, m: &mut Meta, guest: u64, word: u64, bitmap: u64) -> Result<()> {
        let cluster = guest >> self.layout.cluster_bits;
        let l2_entries = self.layout.l2_entries();
        let l1i = (cluster / l2_entries) as usize;
        let t = self.l2_for_write(m, l1i)?;
        let i = (cluster % l2_entries) as usize;
        if self.layout.extended_l2 {
            t.set_word(2 * i, word);
            t.set_word(2 * i + 1, bitmap);
        } else {
            t.set_word(i, word);
        }
        Ok(())
    }

    /// Turns whole clusters (whole subclusters with extended L2) of `[off, off + len)` into
    /// zeros in the metadata, freeing their data when `unmap`. Returns the pieces the
    /// caller must still write zeros to (partial clusters, or v2 images over a backing
    /// file, which have no zero flag).
    pub fn zero_range(
        &self,
        off: u64,
        len: u64,
        unmap: bool,
        has_backing: bool,
    ) -> Result<Vec<(u64, u64)>> {
        self.check_writable()?;
        let mut m = self.meta.write();
        let zeroed = self.zero_locked(&mut m, off, len, unmap, has_backing);
        self.corrupt_if(&mut m, zeroed)
    }

    fn zero_locked(
        &self,
        m: &mut Meta,
        off: u64,
        len: u64,
        unmap: bool,
        has_backing: bool,
    ) -> Result<Vec<(u64, u64)>> {
        if m.header.data_file_raw() {
            // The data file must stay a valid raw image of the disk: write real zeros.
            return Ok(vec![(off, len)]);
        }
        self.prepare_for_write(m)?;
        let cs = self.cluster_size();
        let l2_entries = self.layout.l2_entries();
        let v3 = m.header.version >= 3;
        let mut rest = Vec::new();
        for (guest, start, end) in self.clusters(off, len) {
            let cluster = guest / cs;
            let l1i = (cluster / l2_entries) as usize;
            if !v3 && has_backing {
                rest.push((guest + start, end - start));
                continue;
            }
            if self.layout.extended_l2 {
                let scs = self.layout.subcluster_size();
                let s0 = start.div_ceil(scs);
                let s1 = end / scs;
                if start % scs != 0 {
                    rest.push((guest + start, (s0 * scs).min(end) - start));
                }
                if s1 > s0 {
                    let t = self.l2_for_write(m, l1i)?;
                    let i = (cluster % l2_entries) as usize;
                    let (entry, bitmap) = (t.word(2 * i), t.word(2 * i + 1));
                    let mask = touched_mask(s0 as u32, s1 as u32 - 1);
                    let whole = mask == u32::MAX;
                    if entry & COMPRESSED != 0 && !whole {
                        // Part of a compressed cluster: rewritten through the write path.
                        rest.push((guest + s0 * scs, (s1 - s0) * scs));
                    } else if whole && (unmap || entry & COPIED == 0 || entry & COMPRESSED != 0) {
                        m.deferred.extend(self.references(entry));
                        t.set_word(2 * i, 0);
                        t.set_word(2 * i + 1, (u32::MAX as u64) << 32);
                    } else {
                        let alloc = bitmap as u32 & !mask;
                        let zero = (bitmap >> 32) as u32 | mask;
                        t.set_word(2 * i + 1, alloc as u64 | ((zero as u64) << 32));
                    }
                }
                if end % scs != 0 && s1 >= s0 {
                    rest.push((guest + (s1 * scs).max(start), end - (s1 * scs).max(start)));
                }
                continue;
            }
            if start != 0 || end != cs {
                rest.push((guest + start, end - start));
                continue;
            }
            let t = self.l2_for_write(m, l1i)?;
            let i = (cluster % l2_entries) as usize;
            let entry = t.word(i);
            let keep = v3
                && !unmap
                && entry & COPIED != 0
                && entry & COMPRESSED == 0
                && entry & OFFSET_MASK != 0;
            let word = if keep {
                (entry & (OFFSET_MASK | COPIED)) | ZERO_FLAG
            } else {
                m.deferred.extend(self.references(entry));
                // v2 has no zero flag (and no backing file here): unallocated reads zeros.
                if v3 && (has_backing || entry != 0) {
                    ZERO_FLAG
                } else {
                    0
                }
            };
            t.set_word(i, word);
        }
        self.flush_if_needed(m)?;
        Ok(rest)
    }
}
