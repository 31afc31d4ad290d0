//! Whether an image looks preallocated, by QEMU's test: more clusters referenced than the
//! file really stores. For such images qemu-img map reports data over host holes as
//! zero, and so does qcow2fs.

use super::image::Image;
use crate::error::{Error, Result};
use crate::format::refcount::{RefcountLayout, reftable_block_offset};
use crate::format::units::HostOffset;

impl Image {
    /// Whether the image looks preallocated; computed once.
    pub fn looks_preallocated(&self) -> bool {
        *self.preallocated.get_or_init(|| {
            self.detect_preallocation().unwrap_or_else(|e| {
                log::debug!("{e:#}");
                false
            })
        })
    }

    fn detect_preallocation(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let file_len = self.io.len()?;
        let real_clusters = self
            .storage()
            .allocated_bytes()
            .map_err(|e| Error::io(self.path(), "inspecting the image file", e))?
            / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(cs);
        let h = self.header();
        let rl = RefcountLayout {
            order: h.refcount_order,
            cluster_bits: self.layout.cluster_bits,
        };
        let per_block = rl.block_entries();
        let table = self.io.read_words(
            "the refcount table",
            HostOffset(h.refcount_table_offset),
            (h.refcount_table_clusters as u64 * cs / 8) as usize,
        )?;
        let mut count = 0;
        for (ti, &entry) in table.iter().enumerate() {
            let first = ti as u64 * per_block;
            if first >= end_cluster {
                break;
            }
            let off = HostOffset(reftable_block_offset(entry));
            if off.0 == 0 {
                continue;
            }
            let block = self.io.read("a refcount block", off, cs as usize)?;
            let n = per_block.min(end_cluster - first) as usize;
            for i in 0..n {
                if rl.get(&block, i) != 0 {
                    count += 1;
                    if count >= threshold {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(count >= threshold)
    }
}
