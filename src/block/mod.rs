//! The block-layer stack: each layer is a [`BlockDev`] that may wrap another (a qcow2
//! image wraps its backing file). This is the one place guest data is read, following the
//! engine's mappings. A snapshot's VM state and the guest memory rebuilt from it are
//! disks too (`vmstate`).

mod bitmap_view;
mod cor;
mod crypt;
mod keys;
mod open;
mod overlay;
mod qcow2;
mod raw;
pub mod reopen;
mod vmstate;
mod write;

pub use bitmap_view::BitmapView;
pub use cor::CopyOnRead;
pub use keys::{KeySource, Keys, MAX_KEY_FILE_BYTES, parse_depth, read_key_file};
pub use open::{BackingPolicy, Chain, OpenOptions, open_chain};
pub use overlay::{Overlay, OverlayOptions, private_dir};
pub use qcow2::Qcow2Layer;
pub use raw::RawLayer;
pub use vmstate::{VmMemory, VmStateFiles};

use crate::error::Result;
use std::path::Path;

/// Allocation status of an extent, with qemu-img map's meaning for each flag. The
/// default is an empty extent that nothing provides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Length of the extent in bytes.
    pub len: u64,
    /// Index of the layer that decided the status: 0 is the layer asked.
    pub depth: u32,
    /// Allocated in the layer at `depth` (false: nothing in the chain provides it).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by stored data.
    pub data: bool,
    /// Stored compressed (qcow2 only).
    pub compressed: bool,
    /// Where the bytes are in the file of the layer at `depth`, when that is known.
    pub offset: Option<u64>,
}

/// Name and format of a layer, for messages, `info` and `map`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The layer's file, as named by the user or the image that points at it.
    pub path: std::path::PathBuf,
    /// The format name as qemu-img shows it (`qcow2`, `raw`).
    pub format: &'static str,
}

/// A readable disk: a raw file, a qcow2 image (through its backing chain) or a snapshot.
pub trait BlockDev: Send + Sync + std::fmt::Debug {
    /// Guest size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the disk's bytes from `off`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;

    /// Status of the extent that starts at `off` (below `size`), at most `len` bytes.
    /// With `probe_host`, data over a hole of the host file is reported as zero, as
    /// qemu-img map does (one extra system call per extent).
    fn status(&self, off: u64, len: u64, probe_host: bool) -> Result<Status>;

    /// The disk's file and format.
    fn info(&self) -> &LayerInfo;

    /// Whether asking for the status of every extent is cheap now. A disk whose map is
    /// built on first use (the memory rebuilt from a snapshot's VM state) says no until
    /// then, so that listing a directory does not build it: its allocated bytes are
    /// counted once it has been read.
    fn map_ready(&self) -> bool {
        true
    }

    /// The file that holds this layer's data (an external data file, or the image).
    fn data_path(&self) -> &Path {
        &self.info().path
    }

    /// Owner and mode of every file this disk's bytes come from: its own image and data
    /// file and those of its backing chain. What the mount grants on the disk never
    /// exceeds what they allow. (A throwaway overlay's own file is not a source: it
    /// holds only what users of the mount wrote.)
    fn sources(&self) -> Vec<crate::storage::Access> {
        self.backing().map(|b| b.sources()).unwrap_or_default()
    }

    /// The next layer down, if this layer has one.
    fn backing(&self) -> Option<&std::sync::Arc<dyn BlockDev>> {
        None
    }

    /// Whether any file this disk's bytes come from is an encrypted image (its own, or
    /// one of its backing chain).
    fn encrypted(&self) -> bool {
        self.backing().is_some_and(|b| b.encrypted())
    }

    /// Whether writes are accepted.
    fn writable(&self) -> bool {
        false
    }

    /// Writes `buf` at `off`; the range must lie within the disk.
    fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        Err(read_only(self.info()))
    }

    /// Makes `[off, off + len)` read as zeros; with `unmap`, frees the space where the
    /// format allows it.
    fn write_zeroes(&self, _off: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only(self.info()))
    }

    /// Grows the disk to `size` bytes.
    fn resize(&self, _size: u64) -> Result<()> {
        Err(read_only(self.info()))
    }

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Flushes and closes cleanly (end of a mount).
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes of the disk that hold data (not holes), when the disk knows that without
    /// walking its extents.
    fn data_bytes(&self) -> Option<Result<u64>> {
        None
    }

    /// Whether the content can change without a write through this disk (a bitmap's
    /// view of a disk being written): the mount then caches nothing of it.
    fn volatile(&self) -> bool {
        false
    }
}

fn read_only(info: &LayerInfo) -> crate::Error {
    crate::Error::read_only("this disk is read-only").in_file(&info.path)
}

/// The path of a layer for messages.
pub fn layer_path(dev: &dyn BlockDev) -> &Path {
    &dev.info().path
}
