//! Which host clusters hold metadata, so that no write lands on them by mistake: QEMU's
//! overlap checks. A writable image records every metadata cluster it knows of (header,
//! L1 tables, L2 tables of the active disk and of snapshots, refcount table and blocks,
//! snapshot table, bitmap directory, tables and data, the LUKS area of an encrypted
//! image) when it opens, and keeps the record up to date as it allocates and frees them.
//!
//! The record protects against damaged images: an L2 entry that points at metadata, or a
//! metadata cluster whose refcount is 0 (the allocator then skips it instead of handing
//! it out again). A data write onto metadata, or a metadata write onto a cluster that
//! holds something else, is refused and the image is marked corrupt, as QEMU does.

use crate::format::units::{HostCluster, HostOffset};
use std::collections::HashMap;

/// One kind of metadata structure (a bit in a cluster's set of owners).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header = 1 << 0,
    ActiveL1 = 1 << 1,
    ActiveL2 = 1 << 2,
    RefcountTable = 1 << 3,
    RefcountBlock = 1 << 4,
    SnapshotTable = 1 << 5,
    SnapshotL1 = 1 << 6,
    SnapshotL2 = 1 << 7,
    BitmapDirectory = 1 << 8,
    BitmapTable = 1 << 9,
    BitmapData = 1 << 10,
    LuksArea = 1 << 11,
}

const ALL: [MetaKind; 12] = [
    MetaKind::Header,
    MetaKind::ActiveL1,
    MetaKind::ActiveL2,
    MetaKind::RefcountTable,
    MetaKind::RefcountBlock,
    MetaKind::SnapshotTable,
    MetaKind::SnapshotL1,
    MetaKind::SnapshotL2,
    MetaKind::BitmapDirectory,
    MetaKind::BitmapTable,
    MetaKind::BitmapData,
    MetaKind::LuksArea,
];

impl MetaKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "the header",
            MetaKind::ActiveL1 => "the active L1 table",
            MetaKind::ActiveL2 => "an active L2 table",
            MetaKind::RefcountTable => "the refcount table",
            MetaKind::RefcountBlock => "a refcount block",
            MetaKind::SnapshotTable => "the snapshot table",
            MetaKind::SnapshotL1 => "a snapshot's L1 table",
            MetaKind::SnapshotL2 => "a snapshot's L2 table",
            MetaKind::BitmapDirectory => "the bitmap directory",
            MetaKind::BitmapTable => "a bitmap table",
            MetaKind::BitmapData => "bitmap data",
            MetaKind::LuksArea => "the LUKS encryption header and key material",
        }
    }
}

/// Names the kinds in a set, for messages.
fn names(set: u16) -> String {
    ALL.iter()
        .filter(|k| set & **k as u16 != 0)
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// L2 tables may be shared between the active disk and snapshots.
const L2_KINDS: u16 = MetaKind::ActiveL2 as u16 | MetaKind::SnapshotL2 as u16;

/// The metadata clusters of one image (cluster index -> set of kinds).
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    owners: HashMap<u64, u16>,
}

impl MetaMap {
    /// Records `n` clusters from `first` as holding `kind`.
    pub(crate) fn claim(&mut self, first: HostCluster, n: u64, kind: MetaKind) {
        for c in first.0..first.0.saturating_add(n) {
            *self.owners.entry(c).or_default() |= kind as u16;
        }
    }

    /// Records the clusters that `len` bytes at host offset `off` touch.
    pub(crate) fn claim_bytes(
        &mut self,
        off: HostOffset,
        len: u64,
        cluster_bits: u32,
        kind: MetaKind,
    ) {
        let (first, n) = off.clusters_spanned(len, cluster_bits);
        self.claim(first, n, kind);
    }

    /// Forgets that `n` clusters from `first` hold `kind` (they were freed or moved).
    pub(crate) fn release(&mut self, first: HostCluster, n: u64, kind: MetaKind) {
        for c in first.0..first.0.saturating_add(n) {
            if let Some(set) = self.owners.get_mut(&c) {
                *set &= !(kind as u16);
                if *set == 0 {
                    self.owners.remove(&c);
                }
            }
        }
    }

    /// Forgets every claim on cluster `c` (its refcount dropped to 0).
    pub(crate) fn forget(&mut self, c: HostCluster) {
        self.owners.remove(&c.0);
    }

    /// What cluster `c` holds, if it holds metadata.
    pub(crate) fn owner(&self, c: HostCluster) -> Option<String> {
        self.owners.get(&c.0).map(|&set| names(set))
    }

    /// Why guest data must not be written to cluster `c`, if it must not.
    pub(crate) fn data_conflict(&self, c: HostCluster) -> Option<String> {
        self.owner(c)
    }

    /// Why `kind` must not be written to cluster `c` in place, if it must not: the cluster
    /// also holds something else. An L2 table the active disk shares with a snapshot is
    /// never written in place (it is copied first), so a cluster that holds both means the
    /// refcounts or COPIED flags are wrong.
    pub(crate) fn meta_conflict(&self, c: HostCluster, kind: MetaKind) -> Option<String> {
        let set = *self.owners.get(&c.0)?;
        let others = set & !(kind as u16);
        let tolerated = if kind == MetaKind::SnapshotL2 {
            L2_KINDS
        } else {
            0
        };
        (others & !tolerated != 0).then(|| names(others))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_are_found_and_released() {
        let c = HostCluster;
        let mut m = MetaMap::default();
        m.claim(c(0), 1, MetaKind::Header);
        m.claim_bytes(HostOffset(0x30000), 8, 16, MetaKind::ActiveL1);
        m.claim(c(4), 1, MetaKind::ActiveL2);
        m.claim(c(4), 1, MetaKind::SnapshotL2);
        assert_eq!(
            m.data_conflict(c(3)).as_deref(),
            Some("the active L1 table")
        );
        assert!(m.data_conflict(c(5)).is_none());
        assert!(m.meta_conflict(c(3), MetaKind::ActiveL1).is_none());
        assert!(m.meta_conflict(c(3), MetaKind::ActiveL2).is_some());
        // Written in place while a snapshot shares it: refused.
        assert_eq!(
            m.meta_conflict(c(4), MetaKind::ActiveL2).as_deref(),
            Some("a snapshot's L2 table")
        );
        m.release(c(4), 1, MetaKind::SnapshotL2);
        assert!(m.meta_conflict(c(4), MetaKind::ActiveL2).is_none());
        m.forget(c(4));
        assert!(m.owner(c(4)).is_none());
    }
}
