//! One persistent bitmap's view of the active disk (the mount's `bitmaps/NAME.raw`): the
//! disk's bytes where the bitmap has them dirty, zeros elsewhere. Its status reports the
//! dirty ranges as data and the clean ones as holes that read as zeros, so SEEK_DATA,
//! SEEK_HOLE and st_blocks show exactly what changed since the bitmap was last cleared:
//! an incremental backup is a loop over SEEK_DATA. Read-only; on a writable image it
//! follows the live bitmap, so the mount caches nothing of it (`volatile`).

use super::{BlockDev, LayerInfo, Status};
use crate::engine::Image;
use crate::error::Result;
use std::sync::Arc;

#[derive(Debug)]
/// A persistent bitmap's view of the active disk: its dirty ranges, zeros elsewhere.
pub struct BitmapView {
    disk: Arc<dyn BlockDev>,
    image: Arc<Image>,
    name: String,
    info: LayerInfo,
}

impl BitmapView {
    /// The view of bitmap `name` of `image` over `disk`, the image's active disk.
    pub fn new(disk: Arc<dyn BlockDev>, image: Arc<Image>, name: &str) -> Self {
        BitmapView {
            info: LayerInfo {
                path: image.path().to_path_buf(),
                format: "bitmap",
            },
            disk,
            image,
            name: name.to_string(),
        }
    }

    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl BlockDev for BitmapView {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let size = self.size();
        let mut done = 0usize;
        while done < buf.len() {
            let cur = off + done as u64;
            let rest = (buf.len() - done) as u64;
            let (dirty, n) = if cur < size {
                self.image.bitmap_extent(&self.name, cur, rest)?
            } else {
                (false, rest)
            };
            let n = n.clamp(1, rest) as usize;
            let piece = &mut buf[done..done + n];
            if dirty {
                self.disk.read_at(piece, cur)?;
            } else {
                piece.fill(0);
            }
            done += n;
        }
        Ok(())
    }

    fn status(&self, off: u64, len: u64, _probe_host: bool) -> Result<Status> {
        let (dirty, n) = self.image.bitmap_extent(&self.name, off, len)?;
        Ok(Status {
            len: n.max(1).min(len.max(1)),
            depth: 0,
            present: dirty,
            zero: !dirty,
            data: dirty,
            compressed: false,
            offset: None,
        })
    }

    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn sources(&self) -> Vec<crate::storage::Access> {
        self.disk.sources()
    }

    fn data_bytes(&self) -> Option<Result<u64>> {
        Some(self.image.bitmap_dirty_bytes_in_disk(&self.name))
    }

    fn volatile(&self) -> bool {
        self.image.is_writable()
    }
}
