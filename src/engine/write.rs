//! Planning writes to the active disk: where guest writes go (in place, or into newly
//! allocated clusters that copy-on-write from the old content), publishing the new L2
//! entries once the data is written, and zeroing and discarding.
//!
//! The caller (`block`) follows one protocol per write, holding an exclusive guest range
//! lock on the clusters it touches (rule L5), which every step takes as a parameter:
//! 1. [`Image::plan_write`] allocates what is needed and returns one plan per cluster;
//! 2. it fills the plan's `fill` ranges with the old guest content, writes the data, and
//! 3. calls [`Image::publish`], which stores the L2 entries and queues the references the
//!    write dropped; those refcounts are decremented only after a flush made the new
//!    references durable (rule F4).

use super::alloc::Use;
use super::cache::L2Table;
use super::image::{Image, Tables, WriteState};
use super::overlap::MetaKind;
use super::ranges::RangeGuard;
use crate::error::{Error, ErrorKind, Result};
use crate::format::entry::{
    COMPRESSED, COPIED, ClusterKind, EntryError, SubclusterBitmap, encode_pointer,
    encode_zero_keeping, entry_host,
};
use crate::format::units::{GuestOffset, HostCluster, HostOffset};
use std::sync::Arc;

/// How one cluster of a write is carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterWrite {
    /// Guest offset of the cluster.
    pub guest: GuestOffset,
    /// Host offset of the cluster the data goes to (in the image or its data file).
    pub host: HostOffset,
    /// The part of the cluster the caller writes: `[start, end)`.
    pub start: u64,
    /// End of the part the caller writes (exclusive), in bytes from the cluster's start.
    pub end: u64,
    /// Parts of the cluster to fill with the current guest content first (copy-on-write).
    pub fill: Vec<(u64, u64)>,
    /// New L2 entry (and subcluster bitmap) to store once the data is written.
    pub entry: Option<(u64, u64)>,
    /// Host clusters whose reference the new entry drops.
    pub(crate) release: Vec<HostCluster>,
    pub(crate) allocate: bool,
}

/// The pieces of a guest range, one per cluster: (cluster offset, start, end) with
/// `[start, end)` relative to the cluster.
fn clusters(
    off: u64,
    len: u64,
    cluster_bits: u32,
) -> impl Iterator<Item = (GuestOffset, u64, u64)> {
    let cs = 1u64 << cluster_bits;
    let end = off + len;
    let mut cur = off;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let guest = GuestOffset(cur).cluster_start(cluster_bits);
        let stop = (guest.0 + cs).min(end);
        let piece = (guest, cur - guest.0, stop - guest.0);
        cur = stop;
        Some(piece)
    })
}

impl Image {
    /// Refuses to plan a change to `[off, off + len)` unless `guard` holds its clusters
    /// exclusively (rule L5).
    fn check_guard(&self, guard: &RangeGuard, off: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let (start, end) = (off & !(cs - 1), (off + len).next_multiple_of(cs));
        if guard.holds_exclusive(&self.ranges, start, end) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "a change to [{start:#x}, {end:#x}) was planned without holding its range lock"
            ),
        )
        .in_file(self.path()))
    }

    /// Plans a write of `[off, off + len)` to the active disk (see the module comment).
    pub fn plan_write(&self, guard: &RangeGuard, off: u64, len: u64) -> Result<Vec<ClusterWrite>> {
        self.check_writable()?;
        self.check_guard(guard, off, len)?;
        if let Some(plans) = self.plan_in_place(off, len)? {
            return Ok(plans);
        }
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        let planned = self.plan_locked(t, w, off, len);
        self.corrupt_if(t, planned)
    }

    /// Refuses a plan whose data would land on metadata (an L2 entry of a damaged image
    /// pointing at it).
    fn check_targets(&self, w: &WriteState, plans: &[ClusterWrite]) -> Result<()> {
        if self.layout.data_file {
            return Ok(());
        }
        for p in plans {
            let c = p.host.cluster(self.layout.cluster_bits);
            if let Some(what) = w.alloc.overlap().data_conflict(c) {
                return Err(Error::corrupt(format!(
                    "guest data for offset {} would be written to host offset {}, which holds {what}; refusing the write",
                    p.guest, p.host
                ))
                .in_file(self.path()));
            }
        }
        Ok(())
    }

    /// The fast path: every cluster can be overwritten where it is (no metadata change).
    fn plan_in_place(&self, off: u64, len: u64) -> Result<Option<Vec<ClusterWrite>>> {
        let m = self.meta.read();
        let Some(w) = m.w.as_ref() else {
            return Ok(None);
        };
        if !w.prepared {
            return Ok(None);
        }
        let mut plans = Vec::new();
        for (guest, start, end) in clusters(off, len, self.layout.cluster_bits) {
            let Some((entry, bitmap)) = self.current_entry(&m.t, guest)? else {
                return Ok(None);
            };
            match self.plan_cluster(guest, start, end, entry, bitmap)? {
                p if p.entry.is_none() && !p.allocate => plans.push(p),
                _ => return Ok(None),
            }
        }
        if self.check_targets(w, &plans).is_err() {
            // The slow path reports it and marks the image corrupt.
            return Ok(None);
        }
        Ok(Some(plans))
    }

    /// The L2 entry (and bitmap) of a guest cluster, if its table is the active disk's own
    /// (COPIED).
    fn current_entry(&self, t: &Tables, guest: GuestOffset) -> Result<Option<(u64, u64)>> {
        let cluster = guest.cluster(self.layout.cluster_bits);
        let l1i = (cluster / self.layout.l2_entries()) as usize;
        let Some(&e) = t.l1.get(l1i) else {
            return Ok(None);
        };
        let off = entry_host(e);
        if off.0 == 0 || e & COPIED == 0 {
            return Ok(None);
        }
        let table = self.l2_table(off)?;
        Ok(Some(self.entry_at(&table, cluster)))
    }

    /// The entry (and bitmap, with extended L2) of guest cluster `cluster` in `table`.
    fn entry_at(&self, table: &L2Table, cluster: u64) -> (u64, u64) {
        let i = (cluster % self.layout.l2_entries()) as usize;
        if self.layout.extended_l2 {
            (table.word(2 * i), table.word(2 * i + 1))
        } else {
            (table.word(i), 0)
        }
    }

    /// Stores an entry (and bitmap) for guest cluster `cluster` in `table`.
    fn set_entry(&self, table: &L2Table, cluster: u64, word: u64, bitmap: u64) {
        let i = (cluster % self.layout.l2_entries()) as usize;
        if self.layout.extended_l2 {
            table.set_word(2 * i, word);
            table.set_word(2 * i + 1, bitmap);
        } else {
            table.set_word(i, word);
        }
    }

    /// The L2 table for L1 index `l1i`, allocating a new table or copying a shared one.
    fn l2_for_write(&self, t: &mut Tables, w: &mut WriteState, l1i: usize) -> Result<Arc<L2Table>> {
        let cb = self.layout.cluster_bits;
        let e = t.l1[l1i];
        let off = self.layout.l1_l2_offset(e).map_err(|err| {
            Error::corrupt(format!("L1 entry {l1i}"))
                .caused_by(err)
                .in_file(self.path())
        })?;
        if off.0 != 0 && e & COPIED != 0 {
            if let Some(what) = w
                .alloc
                .overlap()
                .meta_conflict(off.cluster(cb), MetaKind::ActiveL2)
            {
                return Err(Error::corrupt(format!(
                    "L1 entry {l1i}: the L2 table at {off} is marked as used only by the active disk, but the cluster also holds {what}; refusing to change it"
                ))
                .in_file(self.path()));
            }
            return self.l2_table(off);
        }
        let table = if off.0 == 0 {
            let t = L2Table::zeroed(self.layout.l2_words());
            t.mark_dirty();
            t
        } else {
            self.l2_table(off)?.copy_dirty()
        };
        let c = self.allocate(t, w, 1, Use::Meta(MetaKind::ActiveL2))?;
        if off.0 != 0 {
            // The old table stays with the snapshots that share it.
            w.alloc
                .overlap_mut()
                .release(off.cluster(cb), 1, MetaKind::ActiveL2);
            w.deferred.push(off.cluster(cb));
        }
        let new_off = c.offset(cb);
        self.l2_cache.remove(new_off.0);
        let table = self.l2_cache.insert(new_off.0, Arc::new(table));
        t.l1[l1i] = encode_pointer(new_off, true);
        t.l1_dirty = true;
        Ok(table)
    }

    /// Decides how one cluster is written, given its current entry.
    fn plan_cluster(
        &self,
        guest: GuestOffset,
        start: u64,
        end: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<ClusterWrite> {
        let cs = self.cluster_size();
        let layout = self.layout;
        let corrupt = |err: EntryError| {
            Error::corrupt(format!("L2 entry for guest offset {guest}"))
                .caused_by(err)
                .in_file(self.path())
        };
        let mut plan = ClusterWrite {
            guest,
            host: HostOffset(0),
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
            plan.release = layout.referenced_clusters(entry);
            plan.allocate = true;
            return Ok(plan);
        }
        // Extended L2: work per subcluster.
        layout.classify(entry, bitmap, 0).map_err(corrupt)?;
        let scs = layout.subcluster_size();
        let (s0, s1) = ((start / scs) as u32, ((end - 1) / scs) as u32);
        let touched = SubclusterBitmap::range(s0, s1);
        let old = SubclusterBitmap::decode(bitmap);
        let new_bitmap = |alloc: u32| {
            SubclusterBitmap {
                alloc: alloc | touched,
                zero: old.zero & !touched,
            }
            .encode()
        };
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
            plan.release = layout.referenced_clusters(entry);
            plan.allocate = true;
            plan.entry = Some((0, SubclusterBitmap::ALL_ALLOCATED.encode()));
            return Ok(plan);
        }
        let host = entry_host(entry);
        let allocated = host.0 != 0 || (layout.data_file && entry & COPIED != 0);
        if allocated && entry & COPIED != 0 {
            plan.host = host;
            let need = touched & !old.alloc;
            if need != 0 {
                edges(&mut plan, need);
                plan.entry = Some((entry, new_bitmap(old.alloc)));
            }
            return Ok(plan);
        }
        if allocated {
            // Shared with a snapshot: copy the whole cluster.
            complement(&mut plan);
            plan.release = layout.referenced_clusters(entry);
            plan.entry = Some((0, new_bitmap(old.alloc)));
        } else {
            edges(&mut plan, touched);
            plan.entry = Some((0, new_bitmap(0)));
        }
        plan.allocate = true;
        Ok(plan)
    }

    fn plan_locked(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        off: u64,
        len: u64,
    ) -> Result<Vec<ClusterWrite>> {
        self.prepare_for_write(t, w)?;
        let cb = self.layout.cluster_bits;
        let l2_entries = self.layout.l2_entries();
        let mut plans = Vec::new();
        for (guest, start, end) in clusters(off, len, cb) {
            let cluster = guest.cluster(cb);
            let table = self.l2_for_write(t, w, (cluster / l2_entries) as usize)?;
            let (entry, bitmap) = self.entry_at(&table, cluster);
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
            while j < plans.len()
                && plans[j].allocate
                && plans[j].guest.0 == plans[j - 1].guest.0 + self.cluster_size()
            {
                j += 1;
            }
            let first = if self.layout.data_file {
                HostCluster(plans[i].guest.cluster(cb))
            } else {
                self.allocate(t, w, (j - i) as u64, Use::Data)?
            };
            for (k, p) in plans[i..j].iter_mut().enumerate() {
                p.host = (first + k as u64).offset(cb);
                let bitmap = p.entry.map_or(0, |(_, b)| b);
                p.entry = Some((encode_pointer(p.host, true), bitmap));
            }
            i = j;
        }
        self.check_targets(w, &plans)?;
        Ok(plans)
    }

    /// Stores the L2 entries of a finished write and queues the references it dropped.
    pub fn publish(&self, guard: &RangeGuard, plans: &[ClusterWrite]) -> Result<()> {
        if plans.iter().all(|p| p.entry.is_none()) {
            return Ok(());
        }
        for p in plans {
            self.check_guard(guard, p.guest.0, self.cluster_size())?;
        }
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        let published = self.publish_locked(t, w, plans);
        self.corrupt_if(t, published)
    }

    fn publish_locked(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        plans: &[ClusterWrite],
    ) -> Result<()> {
        let cb = self.layout.cluster_bits;
        for p in plans {
            let Some((word, bitmap)) = p.entry else {
                continue;
            };
            let cluster = p.guest.cluster(cb);
            let table = self.l2_for_write(t, w, (cluster / self.layout.l2_entries()) as usize)?;
            self.set_entry(&table, cluster, word, bitmap);
            w.deferred.extend(&p.release);
        }
        self.flush_if_needed(t, w)
    }

    /// Turns whole clusters (whole subclusters with extended L2) of `[off, off + len)` into
    /// zeros in the metadata, freeing their data when `unmap`. Returns the pieces the
    /// caller must still write zeros to (partial clusters, or v2 images over a backing
    /// file, which have no zero flag).
    pub fn zero_range(
        &self,
        guard: &RangeGuard,
        off: u64,
        len: u64,
        unmap: bool,
        has_backing: bool,
    ) -> Result<Vec<(u64, u64)>> {
        self.check_writable()?;
        self.check_guard(guard, off, len)?;
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        let zeroed = self.zero_locked(t, w, off, len, unmap, has_backing);
        self.corrupt_if(t, zeroed)
    }

    fn zero_locked(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        off: u64,
        len: u64,
        unmap: bool,
        has_backing: bool,
    ) -> Result<Vec<(u64, u64)>> {
        if t.header.data_file_raw() {
            // The data file must stay a valid raw image of the disk: write real zeros.
            return Ok(vec![(off, len)]);
        }
        self.prepare_for_write(t, w)?;
        let cs = self.cluster_size();
        let cb = self.layout.cluster_bits;
        let l2_entries = self.layout.l2_entries();
        let v3 = t.header.version >= 3;
        let mut rest = Vec::new();
        for (guest, start, end) in clusters(off, len, cb) {
            let cluster = guest.cluster(cb);
            let l1i = (cluster / l2_entries) as usize;
            if !v3 && has_backing {
                rest.push((guest.0 + start, end - start));
                continue;
            }
            if self.layout.extended_l2 {
                let scs = self.layout.subcluster_size();
                let s0 = start.div_ceil(scs);
                let s1 = end / scs;
                if start % scs != 0 {
                    rest.push((guest.0 + start, (s0 * scs).min(end) - start));
                }
                if s1 > s0 {
                    let table = self.l2_for_write(t, w, l1i)?;
                    let (entry, bitmap) = self.entry_at(&table, cluster);
                    let mask = SubclusterBitmap::range(s0 as u32, s1 as u32 - 1);
                    let whole = mask == u32::MAX;
                    if entry & COMPRESSED != 0 && !whole {
                        // Part of a compressed cluster: rewritten through the write path.
                        rest.push((guest.0 + s0 * scs, (s1 - s0) * scs));
                    } else if whole && (unmap || entry & COPIED == 0 || entry & COMPRESSED != 0) {
                        w.deferred.extend(self.layout.referenced_clusters(entry));
                        self.set_entry(&table, cluster, 0, SubclusterBitmap::ALL_ZERO.encode());
                    } else {
                        let old = SubclusterBitmap::decode(bitmap);
                        let new = SubclusterBitmap {
                            alloc: old.alloc & !mask,
                            zero: old.zero | mask,
                        };
                        self.set_entry(&table, cluster, entry, new.encode());
                    }
                }
                if end % scs != 0 && s1 >= s0 {
                    let from = (s1 * scs).max(start);
                    rest.push((guest.0 + from, end - from));
                }
                continue;
            }
            if start != 0 || end != cs {
                rest.push((guest.0 + start, end - start));
                continue;
            }
            let table = self.l2_for_write(t, w, l1i)?;
            let (entry, _) = self.entry_at(&table, cluster);
            let keep = v3
                && !unmap
                && entry & COPIED != 0
                && entry & COMPRESSED == 0
                && entry_host(entry).0 != 0;
            let word = if keep {
                encode_zero_keeping(entry)
            } else {
                w.deferred.extend(self.layout.referenced_clusters(entry));
                // v2 has no zero flag (and no backing file here): unallocated reads zeros.
                if v3 && (has_backing || entry != 0) {
                    encode_zero_keeping(0)
                } else {
                    0
                }
            };
            self.set_entry(&table, cluster, word, 0);
        }
        self.flush_if_needed(t, w)?;
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::format::entry::SUBCLUSTERS;

    #[test]
    fn ranges_split_per_cluster() {
        let pieces: Vec<_> = clusters(0x1_8000, 0x2_0000, 16).collect();
        assert_eq!(
            pieces,
            [
                (GuestOffset(0x1_0000), 0x8000, 0x1_0000),
                (GuestOffset(0x2_0000), 0, 0x1_0000),
                (GuestOffset(0x3_0000), 0, 0x8000),
            ]
        );
        assert_eq!(SUBCLUSTERS, 32);
    }
}
