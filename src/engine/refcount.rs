//! Reading refcounts: the refcount table and refcount blocks (checklist section 11).

use super::image::{Image, decode_words};
use crate::error::{Error, Result};
use crate::format::refcount::{RefcountLayout, reftable_block_offset};

impl Image {
    pub(crate) fn refcount_layout(&self) -> RefcountLayout {
        RefcountLayout {
            order: self.meta.read().header.refcount_order,
            cluster_bits: self.layout.cluster_bits,
        }
    }

    /// The refcount table as stored.
    pub(crate) fn read_reftable(&self) -> Result<Vec<u64>> {
        let h = &self.meta.read().header;
        let len = h.refcount_table_clusters as u64 * self.cluster_size();
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_or_zeros(&mut buf, h.refcount_table_offset)
            .map_err(|e| Error::io(&self.path, "reading the refcount table", e))?;
        Ok(decode_words(&buf))
    }

    /// Whether the image looks preallocated: QEMU's test (more clusters referenced than
    /// the file really stores), after which qemu-img map reports data over host holes
    /// as zero. Computed once.
    pub fn looks_preallocated(&self) -> bool {
        *self.preallocated.get_or_init(|| {
            self.detect_preallocation().unwrap_or_else(|e| {
                log::debug!("{e}");
                false
            })
        })
    }

    fn detect_preallocation(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let io = |e| Error::io(&self.path, "inspecting the image file", e);
        let file_len = self.file.len().map_err(io)?;
        let real_clusters = self.file.allocated_bytes().map_err(io)? / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(cs);
        let rl = self.refcount_layout();
        let per_block = rl.block_entries();
        let table = self.read_reftable()?;
        let mut count = 0;
        let mut block = vec![0u8; cs as usize];
        for (ti, &entry) in table.iter().enumerate() {
            let first = ti as u64 * per_block;
            if first >= end_cluster {
                break;
            }
            let off = reftable_block_offset(entry);
            if off == 0 {
                continue;
            }
            self.file
                .read_exact_or_zeros(&mut block, off)
                .map_err(|e| {
                    Error::io(
                        &self.path,
                        format!("reading the refcount block at {off:#x}"),
                        e,
                    )
                })?;
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
