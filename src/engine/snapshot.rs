//! Internal snapshots of a writable image: creating one from the active disk, deleting
//! one, and making the active disk equal to one again (revert), the way QEMU's qcow2
//! driver does, with the same table layout and entry fields as `qemu-img snapshot`.
//!
//! The caller makes sure no guest I/O is in flight (the mount's gate, design.md rule L6):
//! every operation here runs under the exclusive metadata lock and starts by writing
//! everything back. The order of each operation's writes keeps the image consistent after
//! a crash at any point: refcount increments are durable before anything new references
//! the clusters (F2), the snapshot table is durable before the header names it (F5), and
//! decrements follow only once the references they drop are gone from disk (F4). A crash
//! leaks clusters at worst; the snapshot exists whole or not at all.

use super::alloc::Use;
use super::image::{Image, Snapshot, SnapshotKey, Tables, WriteState};
use super::overlap::MetaKind;
use crate::error::{Error, ErrorKind, Result};
use crate::format::entry::{COMPRESSED, COPIED, encode_pointer, entry_host};
use crate::format::snapshot::{SnapshotEntry, encode_table};
use crate::format::units::{HostCluster, HostOffset};

/// Whether a tree's refcounts go up (a new owner) or down (an owner gone).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Up,
    Down,
}

impl Image {
    /// The clusters an L1 table's tree references: its L2 tables, and what their entries
    /// reference. Each L2 table is visited once per appearance in `l1`.
    fn for_each_reference(
        &self,
        l1: &[u64],
        mut f: impl FnMut(HostCluster) -> Result<()>,
    ) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let step = if self.layout.extended_l2 { 2 } else { 1 };
        for &e in l1 {
            let off = entry_host(e);
            if off.0 == 0 {
                continue;
            }
            f(off.cluster(cb))?;
            let table = self.l2_table(off)?;
            for j in (0..table.len()).step_by(step) {
                for c in self.layout.referenced_clusters(table.word(j)) {
                    f(c)?;
                }
            }
        }
        Ok(())
    }

    /// Adds or drops one reference to everything `l1`'s tree references.
    fn change_tree(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        l1: &[u64],
        change: Change,
    ) -> Result<()> {
        self.for_each_reference(l1, |c| match change {
            Change::Up => self.add_reference(t, w, c),
            Change::Down => w.alloc.release(c, &self.io),
        })?;
        // Tables whose cluster became free are dropped from the cache.
        for &e in l1 {
            let off = entry_host(e);
            if off.0 != 0
                && w.alloc
                    .get(off.cluster(self.layout.cluster_bits), &self.io)?
                    == 0
            {
                self.l2_cache.remove(off.0);
            }
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active tables exactly where the refcount is 1 (the
    /// active disk is the only owner), as QEMU does after snapshots change.
    fn recompute_copied(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let step = if self.layout.extended_l2 { 2 } else { 1 };
        for i in 0..t.l1.len() {
            let e = t.l1[i];
            let off = entry_host(e);
            if off.0 == 0 {
                continue;
            }
            let only = w.alloc.get(off.cluster(cb), &self.io)? == 1;
            let want = encode_pointer(off, only);
            if want != e {
                t.l1[i] = want;
                t.l1_dirty = true;
            }
            if !only {
                // A shared table is never changed in place; its entries are shared too.
                continue;
            }
            let table = self.l2_table(off)?;
            for j in (0..table.len()).step_by(step) {
                let entry = table.word(j);
                let host = entry_host(entry);
                let want = if entry & COMPRESSED != 0 || self.layout.data_file {
                    entry
                } else if host.0 != 0 && w.alloc.get(host.cluster(cb), &self.io)? == 1 {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    table.set_word(j, want);
                }
            }
        }
        Ok(())
    }

    /// Writes `entries` as a new snapshot table into newly allocated clusters and syncs;
    /// returns where it is (offset 0 for an empty table, as QEMU writes it).
    fn write_snapshot_table(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        entries: &[SnapshotEntry],
    ) -> Result<HostOffset> {
        let cb = self.layout.cluster_bits;
        let bytes = encode_table(entries);
        if bytes.is_empty() {
            return Ok(HostOffset(0));
        }
        let n = (bytes.len() as u64).div_ceil(self.cluster_size());
        let first = self.allocate(t, w, n, Use::Meta(MetaKind::SnapshotTable))?;
        self.write_new_clusters(w, "the snapshot table", first, n, &bytes)?;
        Ok(first.offset(cb))
    }

    /// Points the header at the snapshot table at `offset` holding `count` entries (its
    /// clusters' refcounts are made durable first, F2; the header on its own, F5), then
    /// frees the old table (F4).
    fn switch_snapshot_table(
        &self,
        t: &mut Tables,
        w: &mut WriteState,
        offset: HostOffset,
        count: usize,
    ) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let old_len: u64 = t
            .snapshots
            .iter()
            .map(|s| s.entry.encoded_len() as u64)
            .sum();
        let old = HostOffset(t.header.snapshots_offset);
        w.alloc.write_back(&self.io)?;
        t.header.snapshots_offset = offset.0;
        t.header.nb_snapshots = count as u32;
        self.write_header(t)?;
        if old.0 != 0 && old_len > 0 {
            let (first, n) = old.clusters_spanned(old_len, cb);
            for k in 0..n {
                w.alloc.release(first + k, &self.io)?;
            }
        }
        Ok(())
    }

    /// Records the metadata clusters again after the snapshots changed.
    fn refresh_overlap(&self, t: &Tables, w: &mut WriteState) -> Result<()> {
        let map = super::open::metadata_map(
            &self.io,
            &t.header,
            &t.l1,
            w.alloc.table(),
            &t.snapshots,
            &self.bitmaps(),
        )?;
        w.alloc.set_overlap(map);
        Ok(())
    }

    /// Runs a snapshot operation under the metadata lock, marking the image corrupt if it
    /// finds corruption.
    fn snapshot_op<T>(
        &self,
        op: impl FnOnce(&Self, &mut Tables, &mut WriteState) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        if t.header.has_data_file() {
            return Err(Error::unsupported(
                "internal snapshots are not supported with an external data file (as in QEMU)",
            )
            .in_file(self.path()));
        }
        let done = (|| {
            self.prepare_for_write(t, w)?;
            self.write_back(t, w)?;
            let r = op(self, t, w)?;
            self.write_back(t, w)?;
            Ok(r)
        })();
        self.corrupt_if(t, done)
    }

    /// Refuses a new owner for `l1`'s tree where a refcount is at its maximum already
    /// (1-bit refcounts cannot count a second owner), before anything changes.
    fn check_headroom(&self, w: &mut WriteState, l1: &[u64]) -> Result<()> {
        let max = w.alloc.max_refcount();
        self.for_each_reference(l1, |c| {
            if w.alloc.get(c, &self.io)? >= max {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "host cluster {} already has the largest refcount this image's {}-bit refcounts hold; it cannot be shared with a snapshot",
                        c.offset(self.layout.cluster_bits),
                        max.count_ones()
                    ),
                )
                .in_file(self.path()));
            }
            Ok(())
        })
    }

    /// Takes an internal snapshot of the active disk named `name`, dated `date` (seconds
    /// and nanoseconds since the epoch), like `qemu-img snapshot -c`: the next numeric
    /// ID, no VM state, the disk size and icount 0 in the extra data.
    ///
    /// The new structures (the snapshot's L1 table, the new snapshot table) are written
    /// first, into clusters past everything in use: if the disk is full, that fails
    /// before anything the image uses has changed.
    pub fn create_snapshot(&self, name: &[u8], date: (u32, u32)) -> Result<Snapshot> {
        self.snapshot_op(|img, t, w| {
            let cb = img.layout.cluster_bits;
            let active = t.l1.clone();
            img.check_headroom(w, &active)?;
            let shared: Vec<u64> = active.iter().map(|e| e & !COPIED).collect();
            // The snapshot's own copy of the L1 table.
            let l1_clusters = (shared.len() as u64 * 8)
                .div_ceil(img.cluster_size())
                .max(1);
            let l1_first = img.allocate(t, w, l1_clusters, Use::Meta(MetaKind::SnapshotL1))?;
            let bytes = super::metaio::encode_words(&shared, (l1_clusters << cb) as usize);
            img.write_new_clusters(w, "a snapshot L1 table", l1_first, l1_clusters, &bytes)?;
            let id = t
                .snapshots
                .iter()
                .filter_map(|s| s.entry.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            let size = t.header.virtual_size();
            let mut extra = vec![0u8; 24];
            extra[8..16].copy_from_slice(&size.to_be_bytes());
            let entry = SnapshotEntry {
                l1_table_offset: l1_first.offset(cb).0,
                l1_size: shared.len() as u32,
                id: id.to_string(),
                name_bytes: name.to_vec(),
                date_sec: date.0,
                date_nsec: date.1,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                disk_size: Some(size),
                icount: Some(0),
                extra,
                vm_state_size_legacy: 0,
            };
            let mut entries: Vec<SnapshotEntry> =
                t.snapshots.iter().map(|s| s.entry.clone()).collect();
            entries.push(entry.clone());
            let table = match img.write_snapshot_table(t, w, &entries) {
                Ok(table) => table,
                Err(e) => {
                    for k in 0..l1_clusters {
                        w.alloc.release(l1_first + k, &img.io)?;
                    }
                    return Err(e);
                }
            };
            // The active tree gets a second owner: its refcounts go up and its COPIED
            // flags go, written in the order F2, F3.
            img.change_tree(t, w, &active, Change::Up)?;
            if t.l1 != shared {
                t.l1 = shared;
                t.l1_dirty = true;
            }
            let step = if img.layout.extended_l2 { 2 } else { 1 };
            for &e in &active {
                let off = entry_host(e);
                if off.0 == 0 {
                    continue;
                }
                let l2 = img.l2_table(off)?;
                for j in (0..l2.len()).step_by(step) {
                    let word = l2.word(j);
                    if word & COPIED != 0 && !img.layout.data_file {
                        l2.set_word(j, word & !COPIED);
                    }
                }
            }
            img.write_back(t, w)?;
            // F5: the header names the table once the snapshot it lists is on disk.
            img.switch_snapshot_table(t, w, table, entries.len())?;
            let snap = Snapshot {
                key: SnapshotKey::fresh(),
                entry,
                disk_size: size,
            };
            let mut list: Vec<Snapshot> = t.snapshots.to_vec();
            list.push(snap.clone());
            t.snapshots = list.into();
            img.refresh_overlap(t, w)?;
            Ok(snap)
        })
    }

    /// The snapshot `key` names, with its position in the table.
    fn find_key(&self, t: &Tables, key: SnapshotKey) -> Result<(usize, Snapshot)> {
        t.snapshots
            .iter()
            .position(|s| s.key == key)
            .map(|i| (i, t.snapshots[i].clone()))
            .ok_or_else(|| {
                Error::new(ErrorKind::NotFound, "the snapshot no longer exists")
                    .in_file(self.path())
            })
    }

    /// Reads and checks the L1 table of snapshot `s`.
    fn read_snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        self.check_snapshot(s)?;
        self.io.read_words(
            "a snapshot L1 table",
            HostOffset(s.entry.l1_table_offset),
            s.entry.l1_size as usize,
        )
    }

    /// Deletes snapshot `key` and frees what only it used, like `qemu-img snapshot -d`:
    /// the table without it comes first, then the refcounts of its tree go down, its L1
    /// table is freed, and the active disk gets its COPIED flags back where it becomes
    /// the only owner.
    pub fn delete_snapshot(&self, key: SnapshotKey) -> Result<()> {
        self.snapshot_op(|img, t, w| {
            let (i, s) = img.find_key(t, key)?;
            let l1 = img.read_snapshot_l1(&s)?;
            let mut entries: Vec<SnapshotEntry> =
                t.snapshots.iter().map(|s| s.entry.clone()).collect();
            entries.remove(i);
            let table = img.write_snapshot_table(t, w, &entries)?;
            img.switch_snapshot_table(t, w, table, entries.len())?;
            let mut list = t.snapshots.to_vec();
            list.remove(i);
            t.snapshots = list.into();
            img.snapshot_l1s.lock().remove(&key);
            // F4: nothing on disk names the snapshot any more.
            img.change_tree(t, w, &l1, Change::Down)?;
            let (first, n) = HostOffset(s.entry.l1_table_offset)
                .clusters_spanned(s.entry.l1_size as u64 * 8, img.layout.cluster_bits);
            for k in 0..n {
                w.alloc.release(first + k, &img.io)?;
            }
            img.recompute_copied(t, w)?;
            img.refresh_overlap(t, w)
        })
    }

    /// Makes the active disk equal to snapshot `key` again (its content and its disk
    /// size), like `qemu-img snapshot -a`: the snapshot's tree gets the active disk as a
    /// new owner, the active L1 table takes the snapshot's entries, and the old active
    /// tree loses its owner.
    pub fn revert_to_snapshot(&self, key: SnapshotKey) -> Result<()> {
        self.check_revert_bitmaps()?;
        self.snapshot_op(|img, t, w| {
            let (_, s) = img.find_key(t, key)?;
            let mut sn_l1 = img.read_snapshot_l1(&s)?;
            img.check_headroom(w, &sn_l1)?;
            img.change_tree(t, w, &sn_l1, Change::Up)?;
            // F2: the new owner is counted before the active L1 table points at the tree.
            w.alloc.write_back(&img.io)?;
            let old_l1 = t.l1.clone();
            for e in sn_l1.iter_mut() {
                *e &= !COPIED;
            }
            if sn_l1.len() > t.l1.len() {
                img.move_l1(t, w, sn_l1, s.disk_size)?;
            } else {
                sn_l1.resize(t.l1.len(), 0);
                t.l1 = sn_l1;
                t.l1_dirty = true;
                img.write_back(t, w)?;
                if t.header.size != s.disk_size {
                    t.header.size = s.disk_size;
                    img.write_header(t)?;
                }
            }
            // F4: the old tree's references are gone from disk.
            img.change_tree(t, w, &old_l1, Change::Down)?;
            img.recompute_copied(t, w)?;
            img.refresh_overlap(t, w)
        })
    }
}
