//! Throwaway overlays: a temporary qcow2 image that takes every write to a disk while
//! reads of unwritten ranges go to the disk underneath, which is never modified. Each
//! file of an overlay mount (active disk, snapshot, layer) gets its own.
//!
//! Over an encrypted disk the overlay is a LUKS-encrypted qcow2 image whose master key is
//! random and held only by this process (its key slot is sealed with a passphrase that
//! is thrown away), so what users write, which may be decrypted evidence, never reaches
//! the disk in plaintext. Such overlays cannot be kept (`keep` is refused): nothing could
//! open them once the process ends.

use super::qcow2::{Qcow2Layer, Shared};
use super::{BlockDev, LayerInfo, Status};
use crate::crypto::{Crypto, LuksParams, MasterKey, create_luks_area};
use crate::engine::create::{CreateOptions, create};
use crate::engine::{Image, ImageOptions, View};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where overlays go and whether they outlive the mount.
#[derive(Clone, Debug)]
pub struct OverlayOptions {
    /// A directory only the mounting user may enter ([`private_dir`] makes one).
    pub dir: PathBuf,
    /// Keep the overlays as files in `dir`; otherwise they have no name at all and vanish
    /// with the last descriptor, even when the daemon is killed.
    pub keep: bool,
    /// L2 cache size of each overlay image, in bytes.
    pub cache_bytes: u64,
}

/// Makes (or reuses) `parent/qcow2fs-overlays-UID`, a directory only its owner can
/// enter, where this user's overlays go: the overlays hold copies of evidence, which
/// other users must not read even where the image is readable to them through the
/// mount. A directory of that name that is not this user's own, or that others can
/// enter, is refused.
pub fn private_dir(parent: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = parent.join(format!("qcow2fs-overlays-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(&dir, "creating the overlay directory", e)),
    }
    let md = std::fs::symlink_metadata(&dir)
        .map_err(|e| Error::io(&dir, "inspecting the overlay directory", e))?;
    if !md.is_dir() || md.uid() != uid || md.mode() & 0o077 != 0 {
        return Err(Error::unsupported(format!(
            "the overlay directory is not a directory that only user {uid} may enter (mode {:o}, owner {}); remove it or choose another overlay=DIR",
            md.mode() & 0o7777,
            md.uid()
        ))
        .in_file(&dir));
    }
    Ok(dir)
}

/// A file with no name in `dir` (O_TMPFILE), readable only by its owner; where the
/// filesystem cannot make one, a file created and unlinked at once.
fn anonymous_file(dir: &Path) -> Result<File> {
    let tmp = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match tmp {
        Ok(f) => return Ok(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)
            ) => {}
        Err(e) => return Err(Error::io(dir, "creating an overlay", e)),
    }
    let path = dir.join(format!(
        ".qcow2fs-overlay-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, "creating an overlay", e))?;
    std::fs::remove_file(&path).map_err(|e| Error::io(&path, "unlinking the overlay", e))?;
    Ok(f)
}

/// A LUKS area (aes-256-xts-plain64) for an overlay and its cipher: the master key is
/// random and its one key slot is sealed with a random passphrase that is dropped at
/// once, so only the returned cipher (in this process's memory) can read the overlay.
fn sealed_luks() -> Result<(Vec<u8>, Arc<Crypto>)> {
    let params = LuksParams::default();
    let key = MasterKey::random(params.spec.master_key_len())?;
    let mut passphrase = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut passphrase[..]).map_err(|e| {
        Error::new(
            crate::ErrorKind::Io,
            format!("reading the system's random source for an overlay key: {e}"),
        )
    })?;
    let (header, area) = create_luks_area(&params, &key, &passphrase[..], 0)?;
    let crypto = Crypto::luks(&header, &key)?;
    Ok((area, Arc::new(crypto)))
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
        let encrypted = source.encrypted();
        if encrypted && opts.keep {
            return Err(Error::unsupported(format!(
                "{name} comes from an encrypted image: keep_overlay is refused, a kept overlay would keep its writes in a file no key can open once the mount ends (without keep_overlay the overlay is encrypted with a key that exists only in the daemon, and discarded at unmount)"
            )));
        }
        // Over encrypted evidence the overlay is encrypted too, with a random key that
        // only this process holds: no plaintext of the evidence reaches the disk.
        let sealed = if encrypted {
            Some(sealed_luks()?)
        } else {
            None
        };
        let (file, path, named) = if opts.keep {
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
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(&path, "creating the overlay", e))?;
            (file, path, true)
        } else {
            (anonymous_file(&opts.dir)?, opts.dir.clone(), false)
        };
        let store: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        let result = (|| {
            create(
                &*store,
                &path,
                &CreateOptions {
                    size: source.size(),
                    cluster_bits: 16,
                    backing: backing
                        .filter(|_| named)
                        .map(|(p, f)| (p.as_os_str().as_encoded_bytes().to_vec(), f.to_string())),
                    luks_area: sealed.as_ref().map(|(area, _)| area.clone()),
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
            if let Some((_, crypto)) = &sealed {
                image.set_crypto(crypto.clone())?;
            }
            let shared = Arc::new(Shared::new(Arc::new(image), None, Some(source)));
            Ok(Qcow2Layer::new(shared, View::Active))
        })();
        match result {
            Ok(layer) => Ok(Overlay {
                layer,
                path,
                keep: named,
            }),
            Err(e) => {
                if named {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e)
            }
        }
    }

    /// The overlay's file (it has no name in the directory unless `keep` was set).
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

    fn encrypted(&self) -> bool {
        self.layer.encrypted()
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

    /// Writes back a kept overlay; an unnamed one goes with its last descriptor. Logs
    /// its size either way.
    fn close(&self) -> Result<()> {
        let size = self.layer.image().storage().allocated_bytes().unwrap_or(0);
        if self.keep {
            let r = self.layer.close();
            log::info!("overlay {} kept ({size} bytes)", self.path.display());
            r
        } else {
            log::info!(
                "overlay in {} ({size} bytes) discarded",
                self.path.display()
            );
            Ok(())
        }
    }
}
