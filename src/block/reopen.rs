//! Changing an open chain's mode while it is in use: reopening its top image read-write
//! or read-only, and putting a new image on top of it (an external snapshot). Each is
//! all-or-nothing: a step that fails undoes the steps before it.
//!
//! Reopen read-write, in QEMU's order: the image file and its data file are opened again
//! for writing and get the writer's locks (backing files stay read-only), then the engine
//! checks the open-for-write rules and does the first-write duties. Reopen read-only:
//! the engine writes everything back and clears what it set, then the locks become a
//! reader's. The caller (the mount) makes sure no request is in flight.

use super::qcow2::{Qcow2Layer, Shared};
use super::{BlockDev, Chain};
use crate::engine::create::{CreateOptions, create};
use crate::engine::{Image, ImageOptions, View};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage, lock};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// The files the top image writes: the image and its external data file.
fn top_files(chain: &Chain) -> Vec<(PathBuf, Arc<dyn Storage>)> {
    let image = chain.image();
    let mut files = vec![(image.path().to_path_buf(), image.storage().clone())];
    if let Some((p, s)) = &chain.top.shared.data_file {
        files.push((p.clone(), s.clone()));
    }
    files
}

/// Reopens the top image of `chain` for writing. With `force_share` no locks are taken
/// (as at open).
pub fn reopen_writable(chain: &Chain, force_share: bool) -> Result<()> {
    let image = chain.image();
    if image.is_writable() {
        return Ok(());
    }
    let files = top_files(chain);
    let mut swapped: Vec<(&FileStorage, File, &Path)> = Vec::new();
    let undo = |swapped: Vec<(&FileStorage, File, &Path)>| {
        for (fs, old, path) in swapped.into_iter().rev() {
            drop(fs.replace(old));
            if !force_share && let Err(e) = lock::lock_reader(&fs.file(), path) {
                log::error!("{e:#}");
            }
        }
    };
    for (path, store) in &files {
        let Some(fs) = store.as_file() else {
            undo(swapped);
            return Err(
                Error::unsupported("this image cannot be reopened for writing").in_file(path),
            );
        };
        let new = match fs.reopen(true) {
            Ok(f) => f,
            Err(e) => {
                undo(swapped);
                return Err(Error::io(path, "reopening for writing", e));
            }
        };
        if !force_share && let Err(e) = lock::upgrade_to_writer(&fs.file(), &new, path) {
            undo(swapped);
            return Err(e);
        }
        swapped.push((fs, fs.replace(new), path));
    }
    if let Some((p, s)) = &chain.top.shared.data_file {
        image.set_data_store(p.clone(), s.clone());
    }
    if let Err(e) = image.make_writable() {
        undo(swapped);
        return Err(e);
    }
    // The old descriptors go, and with them what they still locked.
    drop(swapped);
    Ok(())
}

/// Makes the top image of `chain` read-only again: written back, then the writer's
/// locks become a reader's.
pub fn reopen_read_only(chain: &Chain, force_share: bool) -> Result<()> {
    let image = chain.image();
    if !image.is_writable() {
        return Ok(());
    }
    image.make_read_only()?;
    if !force_share {
        for (path, store) in top_files(chain) {
            if let Some(fs) = store.as_file() {
                lock::downgrade_to_reader(&fs.file(), &path)?;
            }
        }
    }
    Ok(())
}

/// `target` relative to directory `from` where both are absolute ("../x.qcow2"), else
/// `target` as it is.
fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let (t, f): (Vec<Component>, Vec<Component>) =
        (target.components().collect(), from.components().collect());
    if !target.is_absolute() || !from.is_absolute() {
        return target.to_path_buf();
    }
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Puts a new image, created at `new_path`, on top of `chain` (an external snapshot):
/// the new image names the current top image as its backing file (relative to its own
/// folder where possible, with the format recorded) and takes every write from now on;
/// the current top image is written back and reopened read-only (write lock released,
/// read lock kept, so QEMU may read but not write it) and becomes layer 1. Returns the
/// new chain. If anything fails, the new file is removed and the chain is as it was.
pub fn external_snapshot(chain: &Chain, new_path: &Path, force_share: bool) -> Result<Chain> {
    let old = chain.image();
    if !old.is_writable() {
        return Err(Error::read_only("the image is open read-only").in_file(old.path()));
    }
    let old_abs = old
        .path()
        .canonicalize()
        .map_err(|e| Error::io(old.path(), "resolving the image's path", e))?;
    let new_dir = new_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .map_err(|e| Error::io(new_path, "resolving the new image's folder", e))?;
    let backing_name = relative_to(&old_abs, &new_dir);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(new_path)
        .map_err(|e| Error::io(new_path, "creating the new image", e))?;
    let built = (|| {
        if !force_share {
            lock::lock_writer(&file, new_path)?;
        }
        let store: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        create(
            &*store,
            new_path,
            &CreateOptions {
                size: chain.top.size(),
                cluster_bits: 16,
                backing: Some((backing_name.as_os_str().as_bytes().to_vec(), "qcow2".into())),
            },
        )?;
        let image = Image::open(
            new_path,
            store,
            &ImageOptions {
                writable: true,
                ..Default::default()
            },
        )?;
        reopen_read_only(chain, force_share)?;
        let below: Arc<dyn BlockDev> = chain.top.clone();
        let shared = Arc::new(Shared::new(Arc::new(image), None, Some(below.clone())));
        let mut layers = vec![below];
        layers.extend(chain.layers.iter().cloned());
        Ok(Chain {
            top: Arc::new(Qcow2Layer::new(shared, View::Active)),
            layers,
        })
    })();
    if built.is_err() {
        let _ = std::fs::remove_file(new_path);
        if !old.is_writable()
            && let Err(e) = reopen_writable(chain, force_share)
        {
            log::error!("{e:#}");
        }
    }
    built
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names() {
        let r = |t, f| relative_to(Path::new(t), Path::new(f));
        assert_eq!(r("/a/b/x.qcow2", "/a/b"), PathBuf::from("x.qcow2"));
        assert_eq!(r("/a/b/x.qcow2", "/a/c"), PathBuf::from("../b/x.qcow2"));
        assert_eq!(r("/x.qcow2", "/a/c"), PathBuf::from("../../x.qcow2"));
    }
}
