//! Metadata I/O of one image file: reads that treat the part past the end of the file as
//! zeros (as QEMU does), writes and syncs that fail sticky. Once a metadata write or sync
//! has failed, what the caches hold may no longer match the file, so the image refuses
//! every later write and flush (design.md, rule F6).

use crate::error::{Error, ErrorKind, Result};
use crate::format::units::HostOffset;
use crate::storage::Storage;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The file an image's metadata lives in.
#[derive(Debug)]
pub(crate) struct MetaIo {
    file: Arc<dyn Storage>,
    path: PathBuf,
    failed: AtomicBool,
}

impl MetaIo {
    pub(crate) fn new(path: &Path, file: Arc<dyn Storage>) -> Self {
        MetaIo {
            file,
            path: path.to_path_buf(),
            failed: AtomicBool::new(false),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The file's length in bytes.
    pub(crate) fn len(&self) -> Result<u64> {
        self.file
            .len()
            .map_err(|e| Error::io(&self.path, "reading the file size", e))
    }

    /// `len` bytes of `what` at `off`; the part past the end of the file reads as zeros.
    pub(crate) fn read(&self, what: &str, off: HostOffset, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_or_zeros(&mut buf, off.0)
            .map_err(|e| Error::io(&self.path, format!("reading {what} at {off}"), e))?;
        Ok(buf)
    }

    /// `n` big-endian 64-bit words of `what` at `off`.
    pub(crate) fn read_words(&self, what: &str, off: HostOffset, n: usize) -> Result<Vec<u64>> {
        Ok(decode_words(&self.read(what, off, n * 8)?))
    }

    pub(crate) fn write(&self, what: &str, off: HostOffset, data: &[u8]) -> Result<()> {
        self.file.write_at(data, off.0).map_err(|e| {
            self.failed.store(true, Ordering::Release);
            Error::io(&self.path, format!("writing {what} at {off}"), e)
        })
    }

    /// Writes `data` into clusters nothing references yet. A failure here is not sticky:
    /// nothing that the image uses has changed, so the caller frees the clusters and
    /// carries on (a full disk fails an operation, not the image).
    pub(crate) fn write_fresh(&self, what: &str, off: HostOffset, data: &[u8]) -> Result<()> {
        self.file
            .write_at(data, off.0)
            .map_err(|e| Error::io(&self.path, format!("writing {what} at {off}"), e))
    }

    /// [`Self::write_fresh`], then a sync, not sticky either.
    pub(crate) fn write_unreferenced(
        &self,
        what: &str,
        off: HostOffset,
        data: &[u8],
    ) -> Result<()> {
        self.write_fresh(what, off, data)?;
        self.file
            .flush()
            .map_err(|e| Error::io(&self.path, format!("writing {what} at {off}"), e))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file.flush().map_err(|e| {
            self.failed.store(true, Ordering::Release);
            Error::io(&self.path, "flushing the image file", e)
        })
    }

    /// Records a failure found elsewhere (the data file could not be flushed).
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Refuses to go on after a failed metadata write (rule F6).
    pub(crate) fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier metadata write failed; refusing further writes and flushes",
            )
            .in_file(&self.path));
        }
        Ok(())
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// Big-endian 64-bit words (L1 tables, refcount tables, bitmap tables).
pub(crate) fn decode_words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

/// The bytes of big-endian 64-bit words, padded with zeros to `len` bytes.
pub(crate) fn encode_words(words: &[u64], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len.max(words.len() * 8));
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.resize(len.max(out.len()), 0);
    out
}
