//! The daemon's side of the control channel: what a running mount answers (`status`) and
//! the operations that change the mounted image while it is in use (snapshots; the
//! bitmap operations are in `bitmap`).
//!
//! Every operation that changes what a file shows holds the mount's I/O gate exclusively
//! (design.md, rule L6): guest requests in flight finish first, new ones wait, and each
//! runs wholly before or wholly after it, planned against the metadata it finds. The
//! kernel's caches are told of the change after the gate is released.

use crate::block::{BlockDev, Chain};
use crate::engine::{Image, Snapshot};
use crate::error::{Error, ErrorKind, Result};
use crate::fuse::MountState;
use crate::fuse::namespace::{FileRole, ROOT_INO, escape_name, raw_name, snapshot_file_stems};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// How a mount serves its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    ReadOnly,
    ReadWrite,
    /// Throwaway overlays: always writable, never writes the image.
    Overlay,
}

/// What the daemon of one mount knows about itself, to answer control requests.
pub struct Daemon {
    /// The chain the active disk shows (an external snapshot replaces it).
    pub chain: RwLock<Chain>,
    /// The image as mounted (absolute), and the engine's image it was opened as.
    pub image: PathBuf,
    pub first_image: Arc<Image>,
    pub mountpoint: PathBuf,
    pub mode: Mutex<Mode>,
    /// Copy-on-read, and the deepest layer it copies from, while read-write.
    pub copy_on_read: Mutex<Option<u32>>,
    pub force_share: bool,
    /// The mount shows `snapshots/` and `layers/`.
    pub show_snapshots: bool,
    pub show_layers: bool,
    /// The mount shows `bitmaps/`.
    pub show_bitmaps: bool,
    pub mount: Arc<MountState>,
}

/// The longest snapshot name accepted (the file name adds `.raw`).
const MAX_NAME: usize = 250;

/// Checks a new snapshot's name against the image's snapshots and the mount's file
/// names: a name must be non-empty, free of `/` and NUL, not `.` or `..`, unique, not
/// another snapshot's ID (QEMU looks snapshots up by ID first), and its file name must
/// not collide with another's after escaping.
pub fn check_new_name(snapshots: &[Snapshot], name: &[u8]) -> Result<()> {
    let shown = String::from_utf8_lossy(name);
    let refuse = |why: String| Err(Error::new(ErrorKind::InvalidInput, why));
    if name.is_empty() {
        return refuse("a snapshot needs a name".into());
    }
    if name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
        return refuse(format!(
            "'{shown}' cannot name a snapshot: names hold no '/' or NUL and are not . or .."
        ));
    }
    if name.len() > MAX_NAME {
        return refuse(format!("a snapshot name is at most {MAX_NAME} bytes"));
    }
    if let Some(s) = snapshots.iter().find(|s| s.entry.name_bytes == name) {
        return refuse(format!(
            "a snapshot named '{shown}' exists already (ID {})",
            s.entry.id
        ));
    }
    if let Some(s) = snapshots.iter().find(|s| s.entry.id.as_bytes() == name) {
        return refuse(format!(
            "'{shown}' is the ID of snapshot '{}'; a name must not be another snapshot's ID",
            s.entry.name()
        ));
    }
    // The file names the mount would show with the new snapshot: the others' must not
    // change, and the new one must be the escaped name.
    let mut pairs: Vec<(String, Vec<u8>)> = snapshots
        .iter()
        .map(|s| (s.entry.id.clone(), s.entry.name_bytes.clone()))
        .collect();
    let before = snapshot_file_stems(&pairs);
    pairs.push(("\0new".into(), name.to_vec()));
    let after = snapshot_file_stems(&pairs);
    if after[..before.len()] != before[..] || after.last() != Some(&escape_name(name)) {
        return refuse(format!(
            "the file name of a snapshot named '{shown}' would collide with another snapshot's in the mount"
        ));
    }
    Ok(())
}

/// The snapshot `spec` names, as QEMU finds it: by ID first, then by name.
fn find(image: &Image, spec: &str) -> Result<Snapshot> {
    image.find_snapshot(spec).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no snapshot with ID or name '{spec}'"),
        )
        .in_file(image.path())
    })
}

/// Now, as a snapshot's date: seconds and nanoseconds (whole microseconds, as QEMU).
pub fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

/// A snapshot as the control channel and `qcow2fs snapshot` show it.
pub fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "id": s.entry.id,
        "name": s.entry.name(),
        "date-sec": s.entry.date_sec,
        "date-nsec": s.entry.date_nsec,
        "vm-state-size": s.entry.vm_state_size,
        "disk-size": s.disk_size,
    })
}

impl Daemon {
    pub(super) fn image(&self) -> Arc<Image> {
        self.chain.read().image().clone()
    }

    /// The mode as users see it.
    fn mode_name(&self) -> &'static str {
        match (*self.mode.lock(), self.copy_on_read.lock().is_some()) {
            (Mode::ReadOnly, _) => "ro",
            (Mode::ReadWrite, false) => "rw",
            (Mode::ReadWrite, true) => "rw,copy-on-read",
            (Mode::Overlay, _) => "overlay",
        }
    }

    fn layer_json(depth: usize, dev: &dyn BlockDev) -> Value {
        json!({"depth": depth, "path": dev.info().path, "format": dev.info().format})
    }

    /// The answer to `{"op": "status"}`.
    pub fn status(&self) -> Value {
        let chain = self.chain.read();
        let image = chain.image();
        let mut layers = vec![Self::layer_json(0, &*chain.top)];
        layers.extend(
            chain
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| Self::layer_json(i + 1, &**l)),
        );
        let snapshots: Vec<Value> = image.snapshots().iter().map(snapshot_json).collect();
        let locks = if self.force_share {
            "none (force_share)"
        } else if image.is_writable() {
            "write on the image (and its data file), read on the backing files"
        } else {
            "read on the image and its backing files"
        };
        json!({
            "pid": std::process::id(),
            "image": if Arc::ptr_eq(chain.image(), &self.first_image) {
                self.image.clone()
            } else {
                chain.image().path().to_path_buf()
            },
            "mountpoint": self.mountpoint,
            "mode": self.mode_name(),
            "layers": layers,
            "snapshots": snapshots,
            "open-files": self.mount.open_files.total.load(Relaxed),
            "open-for-writing": self.mount.open_files.writers.load(Relaxed),
            "cache": image.cache_stats(),
            "locks": locks,
            "remote": crate::storage::remote::stats(),
        })
    }

    /// Answers one control request.
    pub fn handle(&self, req: &Value) -> std::result::Result<Value, String> {
        let s = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or_default();
        let done = match req.get("op").and_then(Value::as_str) {
            Some("status") => Ok(self.status()),
            Some("snapshot-list") => Ok(json!({
                "snapshots": self.image().snapshots().iter().map(snapshot_json).collect::<Vec<_>>()
            })),
            Some("snapshot-create") => self.create(s("name").as_bytes()),
            Some("snapshot-create-external") => self.create_external(Path::new(s("path"))),
            Some("remount") => {
                self.remount(req.get("rw").and_then(Value::as_bool).unwrap_or(false))
            }
            Some("snapshot-delete") => self.delete(s("snapshot")),
            Some("snapshot-revert") => self.revert(
                s("snapshot"),
                req.get("force").and_then(Value::as_bool).unwrap_or(false),
            ),
            Some(op) if op.starts_with("bitmap-") => return super::bitmap::serve(self, op, req),
            Some(op) => return Err(format!("unknown request '{op}'")),
            None => return Err("the request names no op".into()),
        };
        done.map_err(|e| e.report())
    }

    /// Refuses to change a mount that is not read-write.
    pub(super) fn check_rw(&self, what: &str) -> Result<()> {
        match *self.mode.lock() {
            Mode::ReadWrite => Ok(()),
            Mode::Overlay => Err(Error::read_only(format!(
                "{what}: this mount leaves the image untouched (-o overlay); use qcow2fs snapshot on the image after unmounting, or mount it -o rw"
            ))),
            Mode::ReadOnly => Err(Error::read_only(format!(
                "{what}: the mount is read-only; remount it read-write (qcow2fs remount -o rw MNT, or mount -o remount,rw MNT)"
            ))),
        }
        .map_err(|e| e.in_file(&self.mountpoint))
    }

    fn create(&self, name: &[u8]) -> Result<Value> {
        self.check_rw("cannot take a snapshot")?;
        let image = self.image();
        let gate = self.mount.exclusive();
        check_new_name(&image.snapshots(), name).map_err(|e| e.in_file(image.path()))?;
        let chain = self.chain.read();
        let snap = image.create_snapshot(name, now())?;
        let mut added = None;
        if self.show_snapshots {
            let mut ns = self.mount.ns_mut();
            let (dir, made) = ns.snapshots_dir(std::time::SystemTime::now());
            let file = raw_name(&escape_name(name));
            ns.add_snapshot(dir, &snap, file.clone(), chain.snapshot(snap.key));
            added = Some(if made {
                (ROOT_INO, "snapshots".into())
            } else {
                (dir, file)
            });
        }
        drop(chain);
        drop(gate);
        if let Some((parent, entry)) = added {
            let entry: std::ffi::OsString = entry;
            self.mount.invalidate_entry(parent, &entry);
        }
        log::info!("snapshot {} ({}) taken", snap.entry.id, snap.entry.name());
        Ok(json!({"snapshot": snapshot_json(&snap)}))
    }

    fn delete(&self, spec: &str) -> Result<Value> {
        self.check_rw("cannot delete a snapshot")?;
        let image = self.image();
        let gate = self.mount.exclusive();
        let snap = find(&image, spec)?;
        let removed = {
            let mut ns = self.mount.ns_mut();
            let files = ns.snapshot_files(snap.key);
            for (ino, _, _) in &files {
                let open = ns.node(*ino).map_or(0, |n| n.state.open.load(Relaxed));
                if open > 0 {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "{} is open ({open} handle(s)): close it, detach its loop device and unmount what is mounted from it first",
                            ns.path_of(*ino).to_string_lossy()
                        ),
                    )
                    .in_file(&self.mountpoint));
                }
            }
            image.delete_snapshot(snap.key)?;
            for (ino, _, _) in &files {
                ns.remove(*ino);
            }
            files
        };
        drop(gate);
        for (_, parent, name) in removed {
            self.mount.invalidate_entry(parent, &name);
        }
        log::info!("snapshot {} ({}) deleted", snap.entry.id, snap.entry.name());
        Ok(json!({"snapshot": snapshot_json(&snap)}))
    }

    fn revert(&self, spec: &str, force: bool) -> Result<Value> {
        self.check_rw("cannot revert to a snapshot")?;
        let image = self.image();
        let active = self.mount.ns().find_role(FileRole::Active).map(|n| n.ino);
        let active_path = active.map(|ino| self.mountpoint.join(self.mount.ns().path_of(ino)));
        let mounted = match (&active_path, force) {
            (Some(p), false) => super::guest::mounted_from(p).into_iter().next(),
            _ => None,
        };
        if let (Some((dev, mnt)), Some(p)) = (mounted, &active_path) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{} is mounted on {} from {}: reverting under a mounted filesystem would corrupt it; unmount it first, or use --force",
                    dev,
                    mnt.display(),
                    p.display()
                ),
            )
            .in_file(&self.mountpoint));
        }
        let gate = self.mount.exclusive();
        let snap = find(&image, spec)?;
        image.revert_to_snapshot(snap.key)?;
        if let Some(ino) = active
            && let Ok(f) = self.mount.file(ino)
        {
            self.mount.touched(&f.state);
        }
        drop(gate);
        if let Some(ino) = active {
            self.mount.invalidate_file(ino);
        }
        log::info!(
            "active disk reverted to snapshot {} ({})",
            snap.entry.id,
            snap.entry.name()
        );
        Ok(json!({"snapshot": snapshot_json(&snap)}))
    }
}

impl Daemon {
    /// The active disk's file and the disk it shows over chain `chain` (with
    /// copy-on-read while read-write, if the mount copies).
    fn active_dev(&self, chain: &Chain) -> Arc<dyn BlockDev> {
        match *self.copy_on_read.lock() {
            Some(bottom) => Arc::new(crate::block::CopyOnRead::new(chain.top.clone(), bottom)),
            None => chain.top.clone(),
        }
    }

    /// Reopens the image read-write or read-only (`mount -o remount`): all or nothing.
    fn remount(&self, rw: bool) -> Result<Value> {
        let mode = *self.mode.lock();
        match (mode, rw) {
            (Mode::Overlay, _) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "an overlay mount is always writable through its overlays and never writes the image; it cannot be remounted",
                )
                .in_file(&self.mountpoint));
            }
            (Mode::ReadWrite, true) | (Mode::ReadOnly, false) => {
                return Ok(json!({"mode": self.mode_name()}));
            }
            _ => {}
        }
        if rw && self.force_share {
            return Err(Error::invalid(
                "a mount made with force_share cannot be read-write: writing needs the image lock",
            )
            .in_file(&self.mountpoint));
        }
        let gate = self.mount.exclusive();
        let chain = self.chain.read();
        if rw {
            crate::block::reopen::reopen_writable(&chain, self.force_share)?;
            self.mount.set_writable(true);
            *self.mode.lock() = Mode::ReadWrite;
        } else {
            let writers = self.mount.open_files.writers.load(Relaxed);
            if writers > 0 {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "{writers} file(s) of the mount are open for writing; close them first"
                    ),
                )
                .in_file(&self.mountpoint));
            }
            self.mount.set_writable(false);
            if let Err(e) = crate::block::reopen::reopen_read_only(&chain, self.force_share) {
                self.mount.set_writable(true);
                return Err(e);
            }
            *self.mode.lock() = Mode::ReadOnly;
        }
        drop(chain);
        drop(gate);
        let files: Vec<u64> = self.mount.ns().nodes().map(|n| n.ino).collect();
        for ino in files {
            self.mount.invalidate_file(ino);
        }
        log::info!("remounted {}", self.mode_name());
        Ok(json!({"mode": self.mode_name()}))
    }

    /// Puts a new image at `path` on top of the mounted one (an external snapshot): the
    /// active disk shows it from now on, without closing open files; the old image
    /// becomes layer 1, read-only.
    fn create_external(&self, path: &Path) -> Result<Value> {
        self.check_rw("cannot take an external snapshot")?;
        if !path.is_absolute() {
            return Err(Error::invalid("the new image's path must be absolute").in_file(path));
        }
        let gate = self.mount.exclusive();
        let mut chain = self.chain.write();
        let new = crate::block::reopen::external_snapshot(&chain, path, self.force_share)?;
        if let Some(b) = self.copy_on_read.lock().as_mut() {
            *b += 1;
        }
        let mut renamed = Vec::new();
        {
            let mut ns = self.mount.ns_mut();
            if let Some(ino) = ns.find_role(FileRole::Active).map(|n| n.ino) {
                ns.set_dev(ino, self.active_dev(&new));
                renamed.push((
                    ROOT_INO,
                    ns.node(ino).map(|n| n.name.clone()).unwrap_or_default(),
                ));
            }
            if self.show_layers {
                renamed.extend(ns.push_layer(new.layers[0].clone(), std::time::SystemTime::now()));
            }
        }
        *chain = new;
        drop(chain);
        drop(gate);
        for (parent, name) in renamed {
            self.mount.invalidate_entry(parent, &name);
        }
        if let Some(ino) = self.mount.ns().find_role(FileRole::Active).map(|n| n.ino) {
            self.mount.invalidate_file(ino);
        }
        log::info!("writes go to {} from now on", path.display());
        Ok(json!({"image": path}))
    }
}

/// Whether `path` names a qcow2fs mount point (rather than an image file).
pub fn is_mountpoint(path: &Path) -> bool {
    path.is_dir()
        && path
            .canonicalize()
            .ok()
            .and_then(|c| super::mount::mount_at(&c))
            .is_some_and(|m| m.fstype == "fuse.qcow2fs")
}
