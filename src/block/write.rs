//! Writing the active disk of a qcow2 layer: the data half of the engine's write
//! protocol (see `engine::write`). Every entry point takes the guest range lock for the
//! clusters it touches, plans with the engine, copies the old content into the parts of
//! new clusters the write leaves, writes the data (encrypted by `crypt` for an encrypted
//! image, whole sectors), and publishes.

use super::BlockDev;
use super::qcow2::Qcow2Layer;
use crate::engine::{ClusterWrite, RangeGuard, View};
use crate::error::{Error, ErrorKind, Result};

/// Zeros written per request when the format cannot store a zero range.
const ZERO_CHUNK: u64 = 1 << 20;

impl Qcow2Layer {
    fn check_active(&self) -> Result<()> {
        if self.view() != View::Active || !self.image().is_writable() {
            return Err(Error::read_only("this disk is read-only").in_file(self.image().path()));
        }
        Ok(())
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "write of {len} bytes at {off:#x} goes past the end of the {size}-byte disk"
                ),
            )
            .in_file(self.image().path()));
        }
        Ok(())
    }

    /// Cluster-aligned bounds of a range, for the range lock.
    fn lock_bounds(&self, off: u64, len: u64) -> (u64, u64) {
        let cs = self.image().cluster_size();
        (off & !(cs - 1), (off + len).next_multiple_of(cs))
    }

    pub(crate) fn write_locked(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_active()?;
        if buf.is_empty() {
            return Ok(());
        }
        self.check_range(off, buf.len() as u64)?;
        let (s, e) = self.lock_bounds(off, buf.len() as u64);
        let g = self.image().lock_range(s, e, true);
        // A guest write: the enabled bitmaps record it (copy-on-read writes, which change
        // nothing the guest sees, come through `write_unlocked` and are not recorded).
        self.image().record_write(off, buf.len() as u64);
        self.write_unlocked(&g, buf, off)
    }

    /// The write protocol, with the range lock `g` already held.
    pub(crate) fn write_unlocked(&self, g: &RangeGuard, buf: &[u8], off: u64) -> Result<()> {
        if let Some((span, at)) = self.widen_to_sectors(buf, off)? {
            return self.write_unlocked(g, &span, at);
        }
        let image = self.image();
        let plans = image.plan_write(g, off, buf.len() as u64)?;
        let written = self.write_planned(&plans, buf, off);
        // Publish even after a failed data write? No: the entries would point at garbage.
        written?;
        image.publish(g, &plans)
    }

    /// Writes the data (and copy-on-write fill) of planned clusters. Consecutive clusters
    /// with contiguous host offsets and nothing to fill go out as one write.
    fn write_planned(&self, plans: &[ClusterWrite], buf: &[u8], off: u64) -> Result<()> {
        let cs = self.image().cluster_size();
        let mut i = 0;
        while i < plans.len() {
            let p = &plans[i];
            let data_at = (p.guest.0 + p.start - off) as usize;
            if p.fill.is_empty() {
                // Extend the run while the next cluster continues it on the host.
                let mut j = i + 1;
                while j < plans.len()
                    && plans[j].fill.is_empty()
                    && plans[j].start == 0
                    && plans[j - 1].end == cs
                    && plans[j].host == plans[j - 1].host + cs
                {
                    j += 1;
                }
                let last = &plans[j - 1];
                let data_end = (last.guest.0 + last.end - off) as usize;
                self.shared.write_guest(
                    &buf[data_at..data_end],
                    p.host + p.start,
                    p.guest.0 + p.start,
                )?;
                i = j;
                continue;
            }
            // Build the touched span of the cluster: old content where the write leaves
            // it, new data where it goes.
            let lo = p.fill.iter().map(|f| f.0).fold(p.start, u64::min);
            let hi = p.fill.iter().map(|f| f.1).fold(p.end, u64::max);
            let mut span = vec![0u8; (hi - lo) as usize];
            for &(a, b) in &p.fill {
                self.read_unlocked(
                    &mut span[(a - lo) as usize..(b - lo) as usize],
                    p.guest.0 + a,
                )?;
            }
            let n = (p.end - p.start) as usize;
            span[(p.start - lo) as usize..(p.start - lo) as usize + n]
                .copy_from_slice(&buf[data_at..data_at + n]);
            self.shared
                .write_guest_consuming(&mut span, p.host + lo, p.guest.0 + lo)?;
            i += 1;
        }
        Ok(())
    }

    pub(crate) fn zero_locked(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_active()?;
        if len == 0 {
            return Ok(());
        }
        self.check_range(off, len)?;
        let (s, e) = self.lock_bounds(off, len);
        let g = self.image().lock_range(s, e, true);
        self.image().record_write(off, len);
        self.zero_unlocked(&g, off, len, unmap)
    }

    /// Zeroes a range, with the range lock `g` already held.
    pub(crate) fn zero_unlocked(
        &self,
        g: &RangeGuard,
        off: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let has_backing = self.backing().is_some();
        let rest = self.image().zero_range(g, off, len, unmap, has_backing)?;
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        for (o, l) in rest {
            let mut done = 0;
            while done < l {
                let n = (l - done).min(ZERO_CHUNK);
                self.write_unlocked(g, &zeros[..n as usize], o + done)?;
                done += n;
            }
        }
        Ok(())
    }

    /// Grows the disk. Where the backing file is larger than the old size, the new range
    /// is zeroed so it does not show the backing file's data (as QEMU does).
    pub(crate) fn resize_locked(&self, size: u64) -> Result<()> {
        self.check_active()?;
        let old = self.size();
        let image = self.image();
        let (s, _) = self.lock_bounds(old, 0);
        let g = image.lock_range(s, u64::MAX, true);
        image.resize(size)?;
        if let Some(b) = self.backing() {
            let end = b.size().min(self.size());
            if end > old {
                self.zero_unlocked(&g, old, end - old, false)?;
            }
        }
        Ok(())
    }
}
