//! Copy-on-read: data a read of the active disk gets from the backing chain is also
//! written into the top image, so later reads stop reaching the backing files. With a
//! bottom layer, only data found in layers 1..=bottom is copied (QEMU's `bottom`
//! semantics); deeper data and ranges unallocated down to it are read but not copied.
//! Streaming (`qcow2fs stream`) is the same copy over the whole disk.

use super::qcow2::Qcow2Layer;
use super::{BlockDev, LayerInfo, Status};
use crate::engine::RangeGuard;
use crate::error::Result;
use std::sync::Arc;

impl Qcow2Layer {
    /// Reads `[off, off + buf.len())` and copies into this image what the chain provides
    /// from layers 1..=`bottom` in the clusters the read touches. The clusters are held
    /// exclusively, so a concurrent guest write either happened before (and is not
    /// overwritten: its clusters are no longer unallocated) or waits until after.
    /// Returns the number of bytes copied.
    pub fn read_copying(&self, buf: &mut [u8], off: u64, bottom: u32) -> Result<u64> {
        let size = self.size();
        let image = self.image();
        let cs = image.cluster_size();
        let a = off & !(cs - 1);
        let end = (off + buf.len() as u64).next_multiple_of(cs);
        let b = end.min(size);
        if a >= b {
            return self.read_unlocked(buf, off).map(|_| 0);
        }
        let g = image.lock_range(a, end, true);
        let mut span = vec![0u8; (b - a) as usize];
        self.read_unlocked(&mut span, a)?;
        let copied = self.copy_extents(&g, &span, a, b, bottom)?;
        let start = (off - a) as usize;
        let n = buf.len().min(span.len() - start);
        buf[..n].copy_from_slice(&span[start..start + n]);
        buf[n..].fill(0);
        Ok(copied)
    }

    /// Writes into this image the parts of `[a, b)` (whose current content is `span`)
    /// that come from layers 1..=`bottom`. The caller holds the range exclusively.
    fn copy_extents(
        &self,
        g: &RangeGuard,
        span: &[u8],
        a: u64,
        b: u64,
        bottom: u32,
    ) -> Result<u64> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut x = a;
        while x < b {
            let s: Status = self.status(x, b - x, false)?;
            let len = s.len.max(1).min(b - x);
            // Data found in layers 1..=bottom is copied; so are zeros a layer above the
            // bottom shows because the layer below it is shorter, so the content stays the
            // same when the layers down to the bottom are dropped.
            let copy = (s.present && s.depth >= 1 && s.depth <= bottom)
                || (!s.present && s.depth < bottom && self.backing().is_some());
            if copy {
                match runs.last_mut() {
                    Some((_, end, zero)) if *end == x => {
                        *end = x + len;
                        *zero &= s.zero;
                    }
                    _ => runs.push((x, x + len, s.zero)),
                }
            }
            x += len;
        }
        let mut copied = 0;
        for (s, e, zero) in runs {
            if zero {
                self.zero_unlocked(g, s, e - s, false)?;
            } else {
                self.write_unlocked(g, &span[(s - a) as usize..(e - a) as usize], s)?;
            }
            copied += e - s;
        }
        Ok(copied)
    }

    /// Copies everything the chain provides from layers 1..=`bottom` into this image, a
    /// cluster-aligned chunk at a time; `progress` is told the bytes done so far.
    pub fn stream(&self, bottom: u32, mut progress: impl FnMut(u64, u64)) -> Result<u64> {
        let size = self.size();
        let cs = self.image().cluster_size();
        let chunk = (8u64 << 20).next_multiple_of(cs);
        let mut off = 0;
        let mut copied = 0;
        let mut buf = vec![0u8; chunk as usize];
        while off < size {
            let n = chunk.min(size - off);
            copied += self.read_copying(&mut buf[..n as usize], off, bottom)?;
            off += n;
            progress(off, size);
        }
        self.image().flush()?;
        Ok(copied)
    }
}

/// The active disk of a writable image with copy-on-read.
#[derive(Debug)]
pub struct CopyOnRead {
    inner: Arc<Qcow2Layer>,
    bottom: u32,
}

impl CopyOnRead {
    /// `bottom` is the deepest layer whose data is copied (1 = the backing file).
    pub fn new(inner: Arc<Qcow2Layer>, bottom: u32) -> Self {
        CopyOnRead { inner, bottom }
    }
}

impl BlockDev for CopyOnRead {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        // A mount reopened read-only copies nothing.
        if buf.is_empty() || off >= self.size() || !self.inner.writable() {
            return self.inner.read_at(buf, off);
        }
        // Only ranges that come from the chain need the exclusive path.
        let s = self.inner.status(off, buf.len() as u64, false)?;
        if s.depth == 0 && s.len >= buf.len() as u64 {
            return self.inner.read_at(buf, off);
        }
        self.inner.read_copying(buf, off, self.bottom).map(|_| ())
    }

    fn status(&self, off: u64, len: u64, probe_host: bool) -> Result<Status> {
        self.inner.status(off, len, probe_host)
    }

    fn info(&self) -> &LayerInfo {
        self.inner.info()
    }

    fn data_path(&self) -> &std::path::Path {
        self.inner.data_path()
    }

    fn sources(&self) -> Vec<crate::storage::Access> {
        self.inner.sources()
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        self.inner.backing()
    }

    fn encrypted(&self) -> bool {
        self.inner.encrypted()
    }

    fn writable(&self) -> bool {
        self.inner.writable()
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner.write_at(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(off, len, unmap)
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.inner.resize(size)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}
