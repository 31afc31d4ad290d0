//! Where a snapshot's VM state lives. QEMU's `savevm` writes the migration stream into
//! the image's own guest address space, beyond the end of the disk: from the first L1
//! entry past the disk size (the disk size rounded up to what one L2 table covers), as
//! ordinary (possibly compressed) clusters, and then copies the L1 table into the
//! snapshot. `loadvm` first gives the disk the snapshot's size, so it reads the state at
//! that same offset through the snapshot's L1 table. [`View::VmState`] is that area:
//! `vm_state_size` bytes, mapped through the snapshot's own L1 table, bounded by that
//! table rather than by the disk size.
//!
//! QEMU reads a range past the end of the L1 table as unallocated (zeros, or the backing
//! file). Such a table cannot have held the state when it was saved, so an area that
//! runs past it is refused here as corrupt instead.

use super::image::{Image, Snapshot, SnapshotKey, View};
use crate::error::{Error, ErrorKind, Result};

/// Where one snapshot's VM state lies in its L1 table's guest address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmStateArea {
    /// The guest offset of its first byte (QEMU's VM-state offset for the snapshot's
    /// disk size).
    pub offset: u64,
    /// Its length: the snapshot's `vm_state_size`.
    pub len: u64,
}

impl Image {
    /// Bytes of guest space one L1 entry covers.
    fn l1_coverage(&self) -> u64 {
        self.layout.l2_entries() << self.layout.cluster_bits
    }

    /// The guest offset at which QEMU keeps the VM state of a disk of `disk_size` bytes:
    /// the first L1 entry wholly past the disk. `None` if that does not fit in 64 bits.
    pub fn vm_state_offset(&self, disk_size: u64) -> Option<u64> {
        let coverage = self.l1_coverage();
        disk_size.div_ceil(coverage).checked_mul(coverage)
    }

    /// Where snapshot `s`'s VM state lies, after checking its L1 table's place in the
    /// file and that the whole area lies within that table.
    pub fn vm_state_area(&self, s: &Snapshot) -> Result<VmStateArea> {
        self.check_snapshot(s)?;
        self.area_of(s.disk_size, s.entry.vm_state_size, s.entry.l1_size as u64)
            .map_err(|why| {
                Error::corrupt(format!("{}: {why}", s.entry.label())).in_file(self.path())
            })
    }

    fn area_of(
        &self,
        disk_size: u64,
        len: u64,
        l1_entries: u64,
    ) -> std::result::Result<VmStateArea, String> {
        if len == 0 {
            return Err("it has no VM state".into());
        }
        let coverage = self.l1_coverage();
        let table_end = l1_entries.saturating_mul(coverage);
        let offset = self.vm_state_offset(disk_size).ok_or_else(|| {
            format!("the VM state of a {disk_size}-byte disk lies beyond 64-bit offsets")
        })?;
        match offset.checked_add(len) {
            Some(end) if end <= table_end => Ok(VmStateArea { offset, len }),
            _ => Err(format!(
                "its VM state ({len} bytes at guest offset {offset:#x}) runs past its L1 table \
                 ({l1_entries} entries cover {table_end:#x} bytes)"
            )),
        }
    }

    /// The VM-state area of the snapshot `key` names, as recorded in the snapshot table
    /// (the L1 table itself must be loaded for the size check: `l1_entries`).
    pub(crate) fn vm_state_bounds(
        &self,
        key: SnapshotKey,
        l1_entries: usize,
    ) -> Result<VmStateArea> {
        let found = {
            let m = self.meta.read();
            m.t.snapshots
                .iter()
                .find(|s| s.key == key)
                .map(|s| (s.disk_size, s.entry.vm_state_size))
        };
        let (disk_size, len) = found.ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "the snapshot no longer exists").in_file(self.path())
        })?;
        self.area_of(disk_size, len, l1_entries as u64)
            .map_err(|why| Error::corrupt(why).in_file(self.path()))
    }

    /// Where byte 0 of `view` lies in its L1 table's guest address space: the VM-state
    /// offset for [`View::VmState`], 0 for disks (or a VM state that no longer exists).
    pub fn view_base(&self, view: View) -> u64 {
        match view {
            View::Active | View::Snapshot(_) => 0,
            View::VmState(k) => {
                let m = self.meta.read();
                m.t.snapshots
                    .iter()
                    .find(|s| s.key == k)
                    .and_then(|s| self.vm_state_offset(s.disk_size))
                    .unwrap_or(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ImageOptions;
    use crate::engine::create::{CreateOptions, create};
    use crate::storage::MemStorage;
    use std::path::Path;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    /// An empty image with 64 KiB clusters: one L1 entry covers 512 MiB.
    fn image() -> Image {
        let store = Arc::new(MemStorage::new(Vec::new()));
        let opts = CreateOptions {
            size: 16 * MIB,
            cluster_bits: 16,
            backing: None,
            luks_area: None,
        };
        create(&*store, Path::new("mem"), &opts).unwrap();
        Image::open(Path::new("mem"), store, &ImageOptions::default()).unwrap()
    }

    #[test]
    fn the_state_starts_at_the_first_l1_entry_past_the_disk() {
        let img = image();
        assert_eq!(img.vm_state_offset(0), Some(0));
        assert_eq!(img.vm_state_offset(16 * MIB), Some(512 * MIB));
        assert_eq!(img.vm_state_offset(512 * MIB), Some(512 * MIB));
        assert_eq!(img.vm_state_offset(512 * MIB + 512), Some(1024 * MIB));
        assert_eq!(img.vm_state_offset(!511), None);
    }

    #[test]
    fn the_state_must_lie_within_the_l1_table() {
        let img = image();
        let area = |len, entries| img.area_of(16 * MIB, len, entries);
        assert_eq!(
            area(100, 2),
            Ok(VmStateArea {
                offset: 512 * MIB,
                len: 100
            })
        );
        assert!(area(512 * MIB, 2).is_ok(), "up to the table's end");
        let e = area(512 * MIB + 1, 2).unwrap_err();
        assert!(e.contains("runs past its L1 table"), "{e}");
        assert!(area(100, 1).is_err(), "a table covering only the disk");
        assert!(area(0, 2).unwrap_err().contains("no VM state"));
        assert!(img.area_of(!511, 1, u64::MAX).is_err());
        assert!(img.area_of(16 * MIB, u64::MAX, u64::MAX).is_err());
    }
}
