//! Guest-to-host mapping: where a guest range lives, as one extent at a time.
//! Consecutive clusters that continue the same extent are merged, so a large read of
//! contiguous data is one host read.

use super::image::{Image, View};
use crate::error::{Error, Result};
use crate::format::entry::{ClusterKind, CompressedDesc, SUBCLUSTERS};
use crate::format::units::HostOffset;

/// What an extent of guest space reads as. Host offsets are those of the extent's first
/// byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// Not allocated in this image: the backing file (or zeros) provides it.
    Unallocated {
        /// A host cluster reserved for it (extended L2), if any.
        host: Option<HostOffset>,
    },
    /// Reads as zeros.
    Zero {
        /// The host cluster still allocated for it, if any.
        host: Option<HostOffset>,
    },
    /// Data in the image file or, with an external data file, in that file.
    Data {
        /// Where the data is.
        host: HostOffset,
    },
    /// Part of a compressed cluster: decompress `desc`, then skip `in_cluster` bytes.
    Compressed {
        /// Where the compressed cluster is.
        desc: CompressedDesc,
        /// Bytes of the decompressed cluster before the extent.
        in_cluster: u64,
    },
}

/// One extent of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Length of the extent in bytes.
    pub len: u64,
    /// What it reads as.
    pub kind: MapKind,
}

fn piece(kind: ClusterKind, in_cluster: u64) -> MapKind {
    match kind {
        ClusterKind::Unallocated => MapKind::Unallocated { host: None },
        ClusterKind::UnallocatedAlloc { host } => MapKind::Unallocated {
            host: Some(host + in_cluster),
        },
        ClusterKind::ZeroPlain => MapKind::Zero { host: None },
        ClusterKind::ZeroAlloc { host } => MapKind::Zero {
            host: Some(host + in_cluster),
        },
        ClusterKind::Normal { host } => MapKind::Data {
            host: host + in_cluster,
        },
        ClusterKind::Compressed(desc) => MapKind::Compressed { desc, in_cluster },
    }
}

/// Whether `next`, which starts `delta` bytes after `first`, continues the same extent.
fn continues(first: &MapKind, next: &MapKind, delta: u64) -> bool {
    let host_follows = |a: Option<HostOffset>, b: Option<HostOffset>| match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a + delta == b,
        _ => false,
    };
    match (first, next) {
        (MapKind::Unallocated { host: a }, MapKind::Unallocated { host: b }) => {
            host_follows(*a, *b)
        }
        (MapKind::Zero { host: a }, MapKind::Zero { host: b }) => host_follows(*a, *b),
        (MapKind::Data { host: a }, MapKind::Data { host: b }) => *a + delta == *b,
        _ => false,
    }
}

impl Image {
    /// The extent at guest offset `off` seen through `view`, at most `max_len` bytes and
    /// never past the view's size. `off` must be below the view's size.
    pub fn map(&self, view: View, off: u64, max_len: u64) -> Result<Mapping> {
        match view {
            View::Snapshot(k) => {
                // Snapshot L1 tables never change while they are cached (rule L4).
                let l1 = self.snapshot_l1(k)?;
                return self.map_l1(&l1, self.view_size(view), off, max_len);
            }
            View::VmState(k) => {
                // Guest offsets past the disk, up to the end of the VM state.
                let l1 = self.snapshot_l1(k)?;
                let area = self.vm_state_bounds(k, l1.len())?;
                let guest = area.offset.checked_add(off).filter(|_| off < area.len);
                let Some(guest) = guest else {
                    return Err(Error::new(
                        crate::error::ErrorKind::OutOfRange,
                        format!("offset {off:#x} is past the VM state ({} bytes)", area.len),
                    ));
                };
                return self.map_l1(&l1, area.offset + area.len, guest, max_len);
            }
            View::Active => {}
        }
        let meta = self.meta.read();
        self.map_l1(&meta.t.l1, meta.t.header.virtual_size(), off, max_len)
    }

    /// The extent at `off` through L1 table `l1` of a disk of `size` bytes.
    fn map_l1(&self, l1: &[u64], size: u64, off: u64, max_len: u64) -> Result<Mapping> {
        if off >= size {
            return Err(Error::new(
                crate::error::ErrorKind::OutOfRange,
                format!("guest offset {off:#x} is past the disk size {size}"),
            ));
        }
        let end = off.saturating_add(max_len).min(size);
        let layout = self.layout;
        let cb = layout.cluster_bits;
        let cs = layout.cluster_size();
        let l2_entries = layout.l2_entries();
        let sc_size = layout.subcluster_size();
        let mut cur = off;
        let mut first: Option<MapKind> = None;
        'tables: while cur < end {
            let cluster = cur >> cb;
            let l1i = cluster / l2_entries;
            let l2_off = match l1.get(l1i as usize) {
                None => HostOffset(0),
                Some(&e) => layout.l1_l2_offset(e).map_err(|err| {
                    Error::corrupt(format!("L1 entry {l1i} (guest offset {cur:#x})"))
                        .caused_by(err)
                        .in_file(self.path())
                })?,
            };
            if l2_off.0 == 0 {
                // The whole range of this L1 entry is unallocated: no need to look at it
                // cluster by cluster.
                let next = MapKind::Unallocated { host: None };
                match &first {
                    None => first = Some(next),
                    Some(f) if continues(f, &next, cur - off) => {}
                    Some(_) => break 'tables,
                }
                cur = (((l1i + 1) * l2_entries) << cb).min(end);
                continue;
            }
            let table = self.l2_table(l2_off)?;
            loop {
                let cluster = cur >> cb;
                let l2i = (cluster % l2_entries) as usize;
                let (entry, bitmap) = if layout.extended_l2 {
                    (table.word(2 * l2i), table.word(2 * l2i + 1))
                } else {
                    (table.word(l2i), 0)
                };
                let in_cluster = cur & (cs - 1);
                let sc = if layout.extended_l2 {
                    (in_cluster / sc_size) as u32
                } else {
                    0
                };
                let (kind, n) = layout.classify(entry, bitmap, sc).map_err(|err| {
                    Error::corrupt(format!(
                        "L2 entry {l2i} of the table at {l2_off} (guest offset {cur:#x})"
                    ))
                    .caused_by(err)
                    .in_file(self.path())
                })?;
                let run_end = if layout.extended_l2 && n < SUBCLUSTERS - sc {
                    (cluster << cb) + (sc + n) as u64 * sc_size
                } else {
                    (cluster + 1) << cb
                };
                let next = piece(kind, in_cluster);
                match &first {
                    None => first = Some(next),
                    Some(f) => {
                        if matches!(next, MapKind::Compressed { .. })
                            || !continues(f, &next, cur - off)
                        {
                            break 'tables;
                        }
                    }
                }
                cur = run_end.min(end);
                if matches!(next, MapKind::Compressed { .. }) || cur >= end {
                    break 'tables;
                }
                if (cur >> cb) / l2_entries != l1i {
                    break;
                }
            }
        }
        Ok(Mapping {
            len: cur - off,
            kind: first.unwrap_or(MapKind::Unallocated { host: None }),
        })
    }
}
