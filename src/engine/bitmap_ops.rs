//! What users do with persistent bitmaps, with the checks and messages of `qemu-img
//! bitmap` and QEMU's dirty-bitmap commands: add, remove, clear, enable, disable and merge
//! on a writable image; and what the bitmaps say: a list with dirty bytes, a bitmap's
//! dirty extents, and one extent at a time (the bitmap files of a mount). Bits of a
//! read-only image are read from the file on first use. Also what other changes to the
//! image mean for its bitmaps: a disk that grows, a revert to a snapshot.
//!
//! Changes take effect in memory and reach the file when the bitmaps are stored (rule B3
//! in `bitmaps`), except removal, which rewrites the directory at once, as in QEMU. Every
//! change first marks the bitmaps in use (B1), so a crash before they are stored leaves
//! them inconsistent rather than silently missing the change.

use super::bitmaps::{BitmapSet, MAX_BITMAP_MEMORY, Tracked, read_bits};
use super::dirty::DirtyBits;
use super::image::{Image, Tables, WriteState};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::{self, BitmapEntry, FLAG_AUTO};
use std::sync::atomic::Ordering;

/// One bitmap, for `info`, `bitmap list` and the control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest space one bit covers.
    pub granularity: u64,
    /// The flags of its entry in the file's directory (the ones it will get if it is not
    /// stored yet).
    pub flags: u32,
    /// Records writes (enabled).
    pub recording: bool,
    /// Was in use when the image was opened: its content is unknown.
    pub inconsistent: bool,
    /// The file's directory lists it (a bitmap added while open is stored at close).
    pub stored: bool,
    /// Dirty bytes, counted as QEMU does (dirty chunks times the granularity).
    pub dirty_bytes: Option<u64>,
    /// Why its bits could not be read.
    pub problem: Option<String>,
}

/// QEMU's default granularity: the cluster size, within 4 KiB to 64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

fn not_found(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no bitmap named '{name}'"))
}

/// Refuses to use a bitmap that was in use when the image was opened.
fn usable(t: &Tracked) -> Result<()> {
    if t.inconsistent {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "bitmap '{}' is inconsistent (in use since an unclean close) and cannot be used; remove it (qcow2fs bitmap --remove)",
                t.entry.name
            ),
        ));
    }
    Ok(())
}

fn tracked<'a>(set: &'a mut BitmapSet, name: &str) -> Result<&'a mut Tracked> {
    let i = set.find(name).ok_or_else(|| not_found(name))?;
    Ok(&mut set.list[i])
}

impl Image {
    /// Runs a change to the bitmaps of a writable image under the metadata lock, after
    /// the first-write duties (which mark the bitmaps in use).
    fn bitmap_op<T>(
        &self,
        op: impl FnOnce(&Self, &mut Tables, &mut WriteState, &mut BitmapSet) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        let mut m = self.meta.write();
        let (t, w) = m.writer(self.path())?;
        let done = (|| {
            self.prepare_for_write(t, w)?;
            let mut set = self.bitmaps.lock();
            let r = op(self, t, w, &mut set);
            self.recording.store(set.recording(), Ordering::Release);
            r
        })();
        let path = self.path().to_path_buf();
        self.corrupt_if(t, done).map_err(|e| {
            if e.path().is_none() {
                e.in_file(&path)
            } else {
                e
            }
        })
    }

    /// Adds an empty bitmap, like `qemu-img bitmap --add [-g GRANULARITY] [--disable]`
    /// (the default granularity is [`default_granularity`]). It reaches the file when the
    /// bitmaps are stored.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.bitmap_op(|img, t, _, set| {
            if t.header.version < 3 {
                return Err(Error::unsupported(format!(
                    "cannot add bitmap '{name}': qcow2 v2 images cannot store bitmaps"
                )));
            }
            let disk = t.header.virtual_size();
            if disk == 0 {
                return Err(Error::invalid(format!(
                    "cannot add bitmap '{name}': the disk is empty"
                )));
            }
            let g = granularity.unwrap_or_else(|| default_granularity(img.cluster_size()));
            let existing: Vec<BitmapEntry> = set.list.iter().map(|t| t.entry.clone()).collect();
            let bits = bitmap::check_new(&existing, name, g, img.layout.cluster_bits, disk)
                .map_err(Error::invalid)?;
            let need = bitmap::data_bytes(disk, bits).next_multiple_of(8);
            if set.memory() + need > MAX_BITMAP_MEMORY {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "cannot add bitmap '{name}': the bitmaps would take more than {MAX_BITMAP_MEMORY} bytes of memory"
                    ),
                ));
            }
            set.list.push(Tracked {
                entry: BitmapEntry::new(name, bits, if enabled { FLAG_AUTO } else { 0 }),
                bits: Some(DirtyBits::new(disk, bits)),
                enabled,
                inconsistent: false,
                stored: false,
            });
            set.changed = true;
            Ok(())
        })
    }

    /// Removes a bitmap, like `qemu-img bitmap --remove` (an inconsistent one too): the
    /// directory without it is written at once, then its clusters are freed.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_op(|img, t, w, set| {
            let i = set.find(name).ok_or_else(|| not_found(name))?;
            if set.list[i].stored {
                let old = set.file.iter().find(|e| e.name == name).cloned();
                let entries: Vec<BitmapEntry> = set
                    .file
                    .iter()
                    .filter(|e| e.name != name)
                    .cloned()
                    .collect();
                img.switch_directory(t, w, set, entries)?;
                if let Some(old) = old {
                    // F4: the directory no longer names its table.
                    img.free_bitmap_clusters(w, &old)?;
                }
                w.alloc.write_back(&img.io)?;
            }
            set.list.remove(i);
            Ok(())
        })
    }

    /// Makes a bitmap all clean, like `qemu-img bitmap --clear`.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_op(|_, _, _, set| {
            let t = tracked(set, name)?;
            usable(t)?;
            if let Some(b) = t.bits.as_mut() {
                b.clear();
            }
            set.changed = true;
            Ok(())
        })
    }

    /// Starts or stops recording writes in a bitmap (`--enable`, `--disable`).
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_op(|_, _, _, set| {
            let t = tracked(set, name)?;
            usable(t)?;
            t.enabled = enabled;
            set.changed = true;
            Ok(())
        })
    }

    /// Marks in bitmap `dest` everything bitmap `src_name` of image `source` (this image
    /// or another of the same disk size) has dirty, like `qemu-img bitmap --merge`.
    pub fn bitmap_merge(&self, dest: &str, source: &Image, src_name: &str) -> Result<()> {
        let src = source.bitmap_bits(src_name)?;
        self.bitmap_op(|_, _, _, set| {
            let t = tracked(set, dest)?;
            usable(t)?;
            let Some(bits) = t.bits.as_mut() else {
                return Err(not_found(dest));
            };
            if bits.size() != src.size() {
                return Err(Error::invalid(format!(
                    "bitmap '{src_name}' covers a {}-byte disk and bitmap '{dest}' a {}-byte one; they cannot be merged",
                    src.size(),
                    bits.size()
                )));
            }
            bits.merge(&src);
            set.changed = true;
            Ok(())
        })
    }

    /// Runs `f` on the bits of bitmap `name`, reading them from the file first if needed.
    fn with_bits<T>(&self, name: &str, f: impl FnOnce(&DirtyBits) -> T) -> Result<T> {
        let disk = self.meta.read().t.header.virtual_size();
        let mut set = self.bitmaps.lock();
        let memory = set.memory();
        let t = tracked(&mut set, name).map_err(|e| e.in_file(self.path()))?;
        usable(t).map_err(|e| e.in_file(self.path()))?;
        if t.bits.is_none() {
            let need = bitmap::data_bytes(disk, t.entry.granularity_bits).next_multiple_of(8);
            if memory + need > MAX_BITMAP_MEMORY {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "bitmap '{name}': the bitmaps would take more than {MAX_BITMAP_MEMORY} bytes of memory"
                    ),
                )
                .in_file(self.path()));
            }
            let bits = read_bits(&self.io, &t.entry, self.layout.cluster_bits, disk, None)
                .map_err(|p| Error::corrupt(p).in_file(self.path()))?;
            t.bits = Some(bits);
        }
        match &t.bits {
            Some(b) => Ok(f(b)),
            None => Err(not_found(name).in_file(self.path())),
        }
    }

    /// A copy of the bits of bitmap `name`.
    pub(crate) fn bitmap_bits(&self, name: &str) -> Result<DirtyBits> {
        self.with_bits(name, DirtyBits::clone)
    }

    /// The dirty extents of bitmap `name` as (offset, length), clipped to the disk.
    pub fn bitmap_dirty_extents(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        self.with_bits(name, DirtyBits::dirty_extents)
    }

    /// The bytes of the disk bitmap `name` has dirty (the dirty bytes without the part
    /// of the last chunk past the end of the disk).
    pub fn bitmap_dirty_bytes_in_disk(&self, name: &str) -> Result<u64> {
        self.with_bits(name, DirtyBits::dirty_bytes_in_disk)
    }

    /// Whether bitmap `name` has the disk at `off` dirty, and for how many bytes from
    /// `off` (at most `len`) that stays so.
    pub fn bitmap_extent(&self, name: &str, off: u64, len: u64) -> Result<(bool, u64)> {
        self.with_bits(name, |b| b.extent(off, len))
    }

    /// The bitmaps a mount shows a file for: the consistent ones whose entry is valid
    /// (the others are left out, with a warning).
    pub fn bitmap_files(&self) -> Vec<String> {
        let disk = self.meta.read().t.header.virtual_size();
        let set = self.bitmaps.lock();
        let mut out = Vec::new();
        for t in &set.list {
            let problem = if t.inconsistent {
                Some(format!(
                    "bitmap '{}' is inconsistent (in use since an unclean close)",
                    t.entry.name
                ))
            } else if out.contains(&t.entry.name) {
                Some(format!("bitmap '{}': the name is used twice", t.entry.name))
            } else if t.stored {
                bitmap::check_entry(&t.entry, self.layout.cluster_bits, disk).err()
            } else {
                None
            };
            match problem {
                Some(p) => log::warn!(
                    "{}: {p}; leaving it out of the mount",
                    self.path().display()
                ),
                None => out.push(t.entry.name.clone()),
            }
        }
        out
    }

    /// Every bitmap, in directory order (those added while open last).
    pub fn bitmap_list(&self) -> Vec<BitmapInfo> {
        let names: Vec<String> = self
            .bitmaps
            .lock()
            .list
            .iter()
            .map(|t| t.entry.name.clone())
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let counted = self.with_bits(&name, DirtyBits::dirty_bytes);
            let set = self.bitmaps.lock();
            let Some(i) = set.find(&name) else { continue };
            let t = &set.list[i];
            let flags = if t.stored {
                set.file
                    .iter()
                    .find(|e| e.name == name)
                    .map_or(t.entry.flags, |e| e.flags)
            } else {
                t.entry.flags
            };
            let (dirty_bytes, problem) = match (t.inconsistent, counted) {
                (true, _) => (None, None),
                (false, Ok(n)) => (Some(n), None),
                (false, Err(e)) => (None, Some(e.report())),
            };
            out.push(BitmapInfo {
                name,
                granularity: t.entry.granularity(),
                flags,
                recording: t.enabled && !t.inconsistent,
                inconsistent: t.inconsistent,
                stored: t.stored,
                dirty_bytes,
                problem,
            });
        }
        out
    }

    /// Follows a disk that grows: refused, as in QEMU, while a bitmap is inconsistent or
    /// would exceed the limits at the new size; otherwise the bits grow (clean) once the
    /// disk did (`grow`).
    pub(crate) fn resize_bitmaps(&self, new_size: u64, grow: bool) -> Result<()> {
        let mut set = self.bitmaps.lock();
        let cb = self.layout.cluster_bits;
        for t in &set.list {
            if t.inconsistent {
                return Err(Error::new(
                    crate::error::ErrorKind::Busy,
                    format!(
                        "bitmap '{}' is inconsistent (in use since an unclean close); remove it before resizing (qcow2fs bitmap --remove)",
                        t.entry.name
                    ),
                )
                .in_file(self.path()));
            }
            let data = bitmap::data_bytes(new_size, t.entry.granularity_bits);
            if data > bitmap::MAX_DATA_BYTES
                || data.div_ceil(1 << cb) > bitmap::MAX_TABLE_ENTRIES as u64
            {
                return Err(Error::invalid(format!(
                    "bitmap '{}' would need {data} bytes at {new_size} bytes, more than the 512 MiB limit",
                    t.entry.name
                ))
                .in_file(self.path()));
            }
        }
        if grow {
            let mut grew = false;
            for t in set.list.iter_mut() {
                if let Some(b) = t.bits.as_mut().filter(|b| b.size() != new_size) {
                    b.resize(new_size);
                    grew = true;
                }
            }
            set.changed |= grew;
        }
        Ok(())
    }

    /// Refuses to make the active disk equal to a snapshot while the image has bitmaps:
    /// QEMU refuses too ("Device has active dirty bitmaps"), since the bitmaps could not
    /// say what the revert changed.
    pub(crate) fn check_revert_bitmaps(&self) -> Result<()> {
        let set = self.bitmaps.lock();
        if set.list.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = set.list.iter().map(|t| t.entry.name.as_str()).collect();
        Err(Error::new(
            crate::error::ErrorKind::Busy,
            format!(
                "the image has persistent dirty bitmaps ({}); reverting to a snapshot is refused while it does, as in QEMU (remove them first)",
                names.join(", ")
            ),
        )
        .in_file(self.path()))
    }
}
