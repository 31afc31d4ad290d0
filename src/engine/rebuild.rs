//! Rebuilding refcounts from the metadata, for an image left dirty (lazy refcounts and a
//! crash), as `qemu-img check -r all` does: count every reference (the LUKS area of an
//! encrypted image included), write a fresh refcount table and refcount blocks past
//! everything in use, switch the header to them, correct the COPIED flags, then clear
//! the dirty bit.

use super::alloc::Allocator;
use super::image::{Image, Tables, WriteState};
use super::metaio::MetaIo;
use super::open::metadata_map;
use crate::error::{Error, Result};
use crate::format::bitmap;
use crate::format::entry::{COMPRESSED, COPIED, entry_host};
use crate::format::header::{MAX_REFCOUNT_TABLE_BYTES, incompat};
use crate::format::refcount::RefcountLayout;
use crate::format::units::{HostCluster, HostOffset};

/// Reference counts per host cluster.
struct Counts {
    v: Vec<u32>,
    cs: u64,
    limit: u64,
}

impl Counts {
    fn add_cluster(&mut self, c: u64, what: &str, path: &std::path::Path) -> Result<()> {
        if c >= self.limit {
            return Err(Error::corrupt(format!(
                "{what} references host offset {:#x}, far past the end of the file; cannot rebuild refcounts",
                c * self.cs
            ))
            .in_file(path));
        }
        if c as usize >= self.v.len() {
            self.v.resize(c as usize + 1, 0);
        }
        self.v[c as usize] = self.v[c as usize].saturating_add(1);
        Ok(())
    }

    /// +1 on every cluster overlapping `[off, off + len)`.
    fn add_range(&mut self, off: u64, len: u64, what: &str, path: &std::path::Path) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in off / self.cs..=(off + len - 1) / self.cs {
            self.add_cluster(c, what, path)?;
        }
        Ok(())
    }

    fn get(&self, c: u64) -> u32 {
        self.v.get(c as usize).copied().unwrap_or(0)
    }
}

impl Image {
    pub(crate) fn rebuild_refcounts(&self) -> Result<()> {
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        self.rebuild_locked(t, w)
    }

    /// Counts the references an L1 table makes (its L2 tables and their data).
    fn count_l1(&self, l1: &[u64], counts: &mut Counts) -> Result<()> {
        let path = self.path();
        for (i, &e) in l1.iter().enumerate() {
            let off = entry_host(e);
            if off.0 == 0 {
                continue;
            }
            counts.add_cluster(off.0 / counts.cs, &format!("L1 entry {i}"), path)?;
            let t = self.l2_table(off)?;
            let step = if self.layout.extended_l2 { 2 } else { 1 };
            for j in (0..t.len()).step_by(step) {
                let entry = t.word(j);
                let what = format!("L2 entry {} of the table at {off}", j / step);
                if entry & COMPRESSED != 0 {
                    let d = self
                        .layout
                        .compressed_desc(entry)
                        .map_err(|err| Error::corrupt(what.clone()).caused_by(err).in_file(path))?;
                    let start = d.offset.0 & !511;
                    counts.add_range(start, d.offset.0 + d.size - start, &what, path)?;
                } else if !self.layout.data_file {
                    let host = entry_host(entry);
                    if host.0 != 0 {
                        counts.add_cluster(host.0 / counts.cs, &what, path)?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn rebuild_locked(&self, t: &mut Tables, w: &mut WriteState) -> Result<()> {
        let io = &self.io;
        let cs = self.cluster_size();
        let path = self.path().to_path_buf();
        let file_len = io.len()?;
        let mut counts = Counts {
            v: Vec::new(),
            cs,
            limit: file_len.div_ceil(cs) + (1 << 20),
        };
        let h = t.header.clone();
        counts.add_cluster(0, "the header", &path)?;
        counts.add_range(
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            "the L1 table",
            &path,
        )?;
        self.count_l1(&t.l1, &mut counts)?;
        if let Some(area) = self.luks_area() {
            // As `qemu-img check` counts it: one reference per cluster of the area.
            counts.add_range(area.offset, area.length, "the LUKS area", &path)?;
        }
        let snapshots = t.snapshots.clone();
        if !snapshots.is_empty() {
            let table_len: u64 = snapshots.iter().map(|s| s.entry.encoded_len() as u64).sum();
            counts.add_range(h.snapshots_offset, table_len, "the snapshot table", &path)?;
            for s in snapshots.iter() {
                let e = &s.entry;
                counts.add_range(
                    e.l1_table_offset,
                    e.l1_size as u64 * 8,
                    "a snapshot L1 table",
                    &path,
                )?;
                self.check_snapshot(s)?;
                let l1 = io.read_words(
                    "a snapshot L1 table",
                    HostOffset(e.l1_table_offset),
                    e.l1_size as usize,
                )?;
                self.count_l1(&l1, &mut counts)?;
            }
        }
        // Bitmaps a program without bitmap support invalidated (autoclear bit clear) are
        // dropped at the first write, as in QEMU: their clusters leak.
        if let Some(ext) = h
            .bitmaps
            .filter(|_| h.autoclear_features & crate::format::header::autoclear::BITMAPS != 0)
        {
            counts.add_range(
                ext.directory_offset,
                ext.directory_size,
                "the bitmap directory",
                &path,
            )?;
            let dir = io.read(
                "the bitmap directory",
                HostOffset(ext.directory_offset),
                ext.directory_size as usize,
            )?;
            let entries = bitmap::parse_directory(&dir, ext.nb_bitmaps, ext.directory_offset)
                .map_err(|e| Error::from(e).in_file(&path))?;
            for b in entries {
                counts.add_range(
                    b.table_offset,
                    b.table_size as u64 * 8,
                    "a bitmap table",
                    &path,
                )?;
                let table = io.read_words(
                    "a bitmap table",
                    HostOffset(b.table_offset),
                    b.table_size as usize,
                )?;
                for word in table {
                    let off = entry_host(word);
                    if off.0 != 0 {
                        counts.add_cluster(off.0 / cs, "bitmap data", &path)?;
                    }
                }
            }
        }
        let layout = RefcountLayout {
            order: h.refcount_order,
            cluster_bits: self.layout.cluster_bits,
        };
        let (table, table_offset, table_clusters) =
            write_structures(io, &mut counts, layout, file_len)?;
        // F5: the header names the new table once it is durable.
        t.header.refcount_table_offset = table_offset;
        t.header.refcount_table_clusters = table_clusters;
        self.write_header(t)?;
        let overlap = metadata_map(io, &t.header, &t.l1, &table, &snapshots, &self.bitmaps())?;
        let end = io.len()?.div_ceil(cs);
        w.alloc = Allocator::new(
            table,
            HostOffset(table_offset),
            table_clusters,
            layout,
            64,
            HostCluster(end),
            overlap,
        );
        // COPIED flags: set exactly where the refcount is 1.
        for i in 0..t.l1.len() {
            let e = t.l1[i];
            let off = entry_host(e);
            if off.0 == 0 {
                continue;
            }
            let want = crate::format::entry::encode_pointer(off, counts.get(off.0 / cs) == 1);
            if want != e {
                t.l1[i] = want;
                t.l1_dirty = true;
            }
            let table = self.l2_table(off)?;
            let step = if self.layout.extended_l2 { 2 } else { 1 };
            for j in (0..table.len()).step_by(step) {
                let entry = table.word(j);
                let host = entry_host(entry);
                let want = if entry & COMPRESSED != 0 {
                    entry & !COPIED
                } else if self.layout.data_file {
                    entry
                } else if host.0 != 0 && counts.get(host.0 / cs) == 1 {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    table.set_word(j, want);
                }
            }
        }
        w.prepared = false;
        self.write_back(t, w)?;
        t.header.incompatible_features &= !incompat::DIRTY;
        self.write_header(t)?;
        log::warn!("{}: refcounts rebuilt", path.display());
        Ok(())
    }
}

/// Writes refcount blocks and a table describing `counts` plus themselves, placed past
/// everything in use; returns the table and where it is.
fn write_structures(
    io: &MetaIo,
    counts: &mut Counts,
    layout: RefcountLayout,
    file_len: u64,
) -> Result<(Vec<u64>, u64, u32)> {
    let cs = counts.cs;
    let pb = layout.block_entries();
    let per_cluster = cs / 8;
    let used_end = counts
        .v
        .iter()
        .rposition(|&c| c != 0)
        .map_or(1, |i| i as u64 + 1);
    let p = file_len.div_ceil(cs).max(used_end);
    // Table indices whose range holds referenced clusters.
    let mut needed: Vec<u64> = (0..p.div_ceil(pb))
        .filter(|&ti| (ti * pb..((ti + 1) * pb).min(p)).any(|c| counts.get(c) != 0))
        .collect();
    let mut new_blocks = 0u64;
    let mut table_clusters = 1u64;
    loop {
        let end = p + new_blocks + table_clusters;
        let mut tis = needed.clone();
        for ti in p / pb..=(end - 1) / pb {
            if !tis.contains(&ti) {
                tis.push(ti);
            }
        }
        let entries = (end - 1) / pb + 1;
        let tc = (entries * 8).div_ceil(cs).max(1);
        if tis.len() as u64 == new_blocks && tc == table_clusters {
            needed = tis;
            break;
        }
        new_blocks = tis.len() as u64;
        table_clusters = tc;
    }
    if table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
        return Err(
            Error::corrupt("the rebuilt refcount table would exceed 8 MiB").in_file(io.path()),
        );
    }
    needed.sort_unstable();
    let table_offset = (p + new_blocks) * cs;
    for c in p..p + new_blocks + table_clusters {
        counts.add_cluster(c, "the new refcount structures", io.path())?;
    }
    let mut table = vec![0u64; (table_clusters * per_cluster) as usize];
    for (k, &ti) in needed.iter().enumerate() {
        let off = (p + k as u64) * cs;
        table[ti as usize] = off;
        let mut data = vec![0u8; cs as usize];
        for i in 0..pb {
            let v = counts.get(ti * pb + i) as u64;
            if v > layout.max() {
                return Err(Error::corrupt(format!(
                    "host cluster {:#x} has {v} references, more than {}-bit refcounts hold",
                    (ti * pb + i) * cs,
                    layout.bits()
                ))
                .in_file(io.path()));
            }
            if v != 0 {
                layout.set(&mut data, i as usize, v);
            }
        }
        io.write("a rebuilt refcount block", HostOffset(off), &data)?;
    }
    io.write(
        "the rebuilt refcount table",
        HostOffset(table_offset),
        &super::metaio::encode_words(&table, 0),
    )?;
    io.sync()?;
    Ok((table, table_offset, table_clusters as u32))
}
