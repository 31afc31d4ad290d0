//! A raw file as a disk: its length rounded up to whole 512-byte sectors is its size (as
//! in QEMU), holes and the rounding tail read as zeros.

use super::{BlockDev, LayerInfo, Status};
use crate::error::{Error, Result};
use crate::storage::{Extent, Storage};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug)]
/// A raw file as a disk. Its size is the file's length rounded up to 512 bytes, as
/// QEMU shows it; the bytes past the end of the file read as zeros.
pub struct RawLayer {
    storage: Arc<dyn Storage>,
    /// The file length when opened.
    file_len: u64,
    size: u64,
    info: LayerInfo,
}

impl RawLayer {
    /// A raw disk over `storage`, the file at `path` (named in messages). Fails when the
    /// file's length cannot be read.
    pub fn new(path: &Path, storage: Arc<dyn Storage>) -> Result<Self> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io(path, "reading the file size", e))?;
        Ok(RawLayer {
            storage,
            file_len,
            size: file_len.next_multiple_of(512),
            info: LayerInfo {
                path: path.to_path_buf(),
                format: "raw",
            },
        })
    }
}

impl BlockDev for RawLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let avail = self.file_len.saturating_sub(off).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        let mut done = 0;
        while done < head.len() {
            let n = self
                .storage
                .read_at(&mut head[done..], off + done as u64)
                .map_err(|e| {
                    Error::io(
                        &self.info.path,
                        format!("reading at {:#x}", off + done as u64),
                        e,
                    )
                })?;
            if n == 0 {
                return Err(Error::io(
                    &self.info.path,
                    format!("reading at {:#x}", off + done as u64),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file is shorter than when it was opened",
                    ),
                ));
            }
            done += n;
        }
        tail.fill(0);
        Ok(())
    }

    fn status(&self, off: u64, len: u64, _probe_host: bool) -> Result<Status> {
        let len = len.min(self.size.saturating_sub(off));
        let ext = self
            .storage
            .extent(off, len)
            .map_err(|e| Error::io(&self.info.path, format!("finding data at {off:#x}"), e))?;
        let (len, data) = match ext {
            Extent::Data(n) => (n, true),
            Extent::Hole(n) => (n, false),
        };
        Ok(Status {
            len,
            depth: 0,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(off),
        })
    }

    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn sources(&self) -> Vec<crate::storage::Access> {
        self.storage.access().into_iter().collect()
    }
}
