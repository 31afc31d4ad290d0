//! Throwaway overlays: a temporary qcow2 image that takes every write to a disk while
//! reads of unwritten ranges go to the disk underneath, which is never modified. Each
//! file of an overlay mount (active disk, snapshot, layer) gets its own.

use super::qcow2::{Qcow2Layer, Shared};
use super::{BlockDev, LayerInfo, Status};
use crate::engine::create::{CreateOptions, create};
use crate::engine::{Image, ImageOptions, View};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where overlays go and whether they outlive the mount.
#[derive(Clone, Debug)]
pub struct OverlayOptions {
    pub dir: PathBuf,
    pub keep: bool,
    pub cache_bytes: u64,
}

/// A disk seen through its own temporary qcow2 overlay.
#[derive(Debug)]
pub struct Overlay {
    layer: Qcow2Layer,
    path: PathBuf,
    keep: bool,
}

impl Overlay {
    /// Creates an overlay file in `opts.dir` for `source`. `name` goes into the file name;
    /// `backing` (a file name and format) is recorded in the header so a kept overlay is
    /// usable on its own where the source is a file.
    pub fn create(
        source: Arc<dyn BlockDev>,
        name: &str,
        backing: Option<(PathBuf, &str)>,
        opts: &OverlayOptions,
    ) -> Result<Overlay> {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = opts.dir.join(format!(
            "qcow2fs-overlay-{}-{}-{safe}.qcow2",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "creating the overlay", e))?;
        let store: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        let result = (|| {
            create(
                &*store,
                &path,
                &CreateOptions {
                    size: source.size(),
                    cluster_bits: 16,
                    backing: backing
                        .map(|(p, f)| (p.as_os_str().as_encoded_bytes().to_vec(), f.to_string())),
                },
            )?;
            let image = Image::open(
                &path,
                store.clone(),
                &ImageOptions {
                    cache_bytes: opts.cache_bytes,
                    writable: true,
                },
            )?;
            let shared = Arc::new(Shared::new(Arc::new(image), None, Some(source)));
            Ok(Qcow2Layer::new(shared, View::Active))
        })();
        match result {
            Ok(layer) => Ok(Overlay {
                layer,
                path,
                keep: opts.keep,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDev for Overlay {
    fn size(&self) -> u64 {
        self.layer.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.layer.read_at(buf, off)
    }

    fn status(&self, off: u64, len: u64, probe_host: bool) -> Result<Status> {
        self.layer.status(off, len, probe_host)
    }

    fn info(&self) -> &LayerInfo {
        self.layer.info()
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        self.layer.backing()
    }

    fn writable(&self) -> bool {
        true
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.layer.write_at(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.layer.write_zeroes(off, len, unmap)
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.layer.resize(size)
    }

    fn flush(&self) -> Result<()> {
        self.layer.flush()
    }

    /// Writes back and, unless the overlay is kept, deletes it; logs its size either way.
    fn close(&self) -> Result<()> {
        let r = self.layer.close();
        let size = std::fs::metadata(&self.path)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        if self.keep {
            log::info!("overlay {} kept ({size} bytes)", self.path.display());
        } else {
            log::info!("overlay {} ({size} bytes) deleted", self.path.display());
            std::fs::remove_file(&self.path)
                .map_err(|e| Error::io(&self.path, "deleting the overlay", e))?;
        }
        r
    }
}
