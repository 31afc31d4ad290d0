//! The state of one running mount, shared by the FUSE callbacks and the control channel:
//! the namespace (under its own lock), the gate that makes control operations atomic
//! with respect to guest I/O, attributes, and the notifications that keep the kernel's
//! caches true when files come, go or change under it.
//!
//! The gate (design.md, rule L6): every data operation (read, write, fallocate, truncate,
//! fsync) holds it shared for its whole duration; a control operation that changes what
//! a file shows (a snapshot, a revert, an external snapshot) holds it exclusively, so a
//! request runs wholly before it or wholly after it, against the new metadata. The lock is
//! fair: once a control operation waits, new requests wait behind it.

use super::access;
use super::io::{allocated_bytes, background_priority};
use super::namespace::{FileRole, Namespace, Node, NodeKind, NodeState};
use super::xattr::{self, Answer};
use crate::block::BlockDev;
use fuser::{FileAttr, FileType, INodeNo, Notifier};
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Attribute and entry cache lifetime: files change only through this mount, and the
/// kernel learns of changes from the replies and from notifications.
const TTL: Duration = Duration::from_secs(3600);

/// How long attributes whose st_blocks is still an estimate may be cached.
const ESTIMATE_TTL: Duration = Duration::from_secs(1);
/// How long a getattr waits for st_blocks before answering with an estimate. Lookups do
/// not wait: an open followed by a read (the first read after mounting) needs no
/// st_blocks, and a lookup's estimate is never cached, so `stat` asks with a getattr.
const BLOCKS_WAIT: Duration = Duration::from_millis(5);

/// Ownership, modes and kernel settings for the mount.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
    /// Kernel readahead window in bytes, if set.
    pub readahead: Option<u32>,
    /// The active disk is writable (`-o rw`) when the mount starts.
    pub writable: bool,
    /// Extended attributes are shown (`-o xattrs=on`).
    pub xattrs: bool,
}

/// Files open through the mount, for `qcow2fs status`.
#[derive(Debug, Default)]
pub struct OpenFiles {
    pub total: AtomicU64,
    pub writers: AtomicU64,
}

/// A file of the mount, taken out of the namespace for one operation.
#[derive(Clone)]
pub struct FileRef {
    pub ino: u64,
    pub dev: Arc<dyn BlockDev>,
    pub state: Arc<NodeState>,
}

/// One running mount.
pub struct MountState {
    ns: RwLock<Namespace>,
    pub cfg: FsConfig,
    /// Files may be written (a remount changes it, under the gate).
    writable: std::sync::atomic::AtomicBool,
    pub open_files: OpenFiles,
    gate: RwLock<()>,
    notifier: OnceLock<Notifier>,
}

impl MountState {
    pub fn new(ns: Namespace, cfg: FsConfig) -> Self {
        MountState {
            ns: RwLock::new(ns),
            writable: std::sync::atomic::AtomicBool::new(cfg.writable),
            cfg,
            open_files: OpenFiles::default(),
            gate: RwLock::new(()),
            notifier: OnceLock::new(),
        }
    }

    /// The namespace, for looking things up.
    pub fn ns(&self) -> RwLockReadGuard<'_, Namespace> {
        self.ns.read()
    }

    /// The namespace, for changing it (control operations, under the gate).
    pub fn ns_mut(&self) -> parking_lot::RwLockWriteGuard<'_, Namespace> {
        self.ns.write()
    }

    /// Held shared by every data operation.
    pub fn io_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read()
    }

    /// Held exclusively by a control operation: waits for the requests in flight and
    /// holds back new ones.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write()
    }

    /// Where kernel notifications go, once the session exists.
    pub fn set_notifier(&self, n: Notifier) {
        let _ = self.notifier.set(n);
    }

    /// Tells the kernel that `name` in directory `parent` changed (a new file, or one
    /// gone): no stale or negative entry survives in its cache. Never call it while
    /// holding the gate: the kernel may wait on a request that waits on the gate.
    pub fn invalidate_entry(&self, parent: u64, name: &OsStr) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_entry(INodeNo(parent), name)
        {
            log::debug!("invalidating the entry {name:?}: {e}");
        }
    }

    /// Tells the kernel that file `ino`'s content and attributes changed: its cached
    /// pages are dropped. Never call it while holding the gate (see above).
    pub fn invalidate_file(&self, ino: u64) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_inode(INodeNo(ino), 0, 0)
        {
            log::debug!("invalidating inode {ino}: {e}");
        }
    }

    /// Whether a file accepts writes.
    pub fn is_writable(&self, dev: &dyn BlockDev) -> bool {
        self.writable.load(Ordering::Acquire) && dev.writable()
    }

    /// Lets files be written, or not (a remount, holding the gate).
    pub fn set_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::Release);
    }

    /// The file `ino`, or ENOENT/EISDIR.
    pub fn file(&self, ino: u64) -> Result<FileRef, fuser::Errno> {
        let ns = self.ns.read();
        let node = ns.node(ino).ok_or(fuser::Errno::ENOENT)?;
        match &node.kind {
            NodeKind::File { dev, .. } => Ok(FileRef {
                ino,
                dev: dev.clone(),
                state: node.state.clone(),
            }),
            NodeKind::Dir { .. } => Err(fuser::Errno::EISDIR),
        }
    }

    /// The file `ino` for a change, with the I/O gate held: EROFS when the mount or the
    /// file is read-only.
    pub fn writable_file(
        &self,
        ino: u64,
    ) -> Result<(FileRef, RwLockReadGuard<'_, ()>), fuser::Errno> {
        let f = self.file(ino)?;
        let io = self.io_gate();
        if !self.is_writable(&*f.dev) {
            return Err(fuser::Errno::EROFS);
        }
        Ok((f, io))
    }

    /// Records a change to a file: new mtime, st_blocks to be counted again.
    pub fn touched(&self, state: &NodeState) {
        let mut b = state.blocks.state.lock();
        b.bytes = None;
        b.generation += 1;
        *state.changed.lock() = Some(SystemTime::now());
    }

    /// Writes everything back and closes the writable disks cleanly (at unmount).
    pub fn close_all(&self) {
        let devs: Vec<Arc<dyn BlockDev>> = self
            .ns
            .read()
            .nodes()
            .filter_map(|n| match &n.kind {
                NodeKind::File { dev, .. } if self.is_writable(&**dev) => Some(dev.clone()),
                _ => None,
            })
            .collect();
        for dev in devs {
            match dev.close() {
                Ok(()) => log::info!("{}: written back and closed", dev.info().path.display()),
                Err(e) => log::error!("closing {}: {e:#}", dev.info().path.display()),
            }
        }
    }

    /// A file's allocated bytes and whether that is exact: the count if it is known or
    /// arrives within `wait`, otherwise an overestimate (the file size plus one
    /// block, so that no tool takes the file for one big hole) while the count goes on in
    /// the background.
    fn allocated(&self, state: &NodeState, dev: &Arc<dyn BlockDev>, wait: Duration) -> (u64, bool) {
        if dev.volatile() {
            // Counted each time (a bitmap's dirty extents, from memory).
            return (allocated_bytes(&**dev).unwrap_or_else(|_| dev.size()), true);
        }
        let slot = &state.blocks;
        let mut b = slot.state.lock();
        if let Some(v) = b.bytes {
            return (v, true);
        }
        if !b.computing && !dev.map_ready() {
            // Counting would build the disk's map: wait until a reader has.
            return (dev.size() + 512, false);
        }
        if !b.computing {
            b.computing = true;
            let generation = b.generation;
            let (slot, dev) = (slot.clone(), dev.clone());
            std::thread::spawn(move || {
                background_priority();
                let v = allocated_bytes(&*dev).unwrap_or_else(|e| {
                    log::warn!("{e:#}");
                    dev.size()
                });
                let mut b = slot.state.lock();
                b.computing = false;
                if b.generation == generation {
                    b.bytes = Some(v);
                }
                slot.done.notify_all();
            });
        }
        let deadline = Instant::now() + wait;
        while b.bytes.is_none() && b.computing {
            if slot.done.wait_until(&mut b, deadline).timed_out() {
                break;
            }
        }
        match b.bytes {
            Some(v) => (v, true),
            // One block more than the file can hold: never a count, so it can be told apart.
            None => (dev.size() + 512, false),
        }
    }

    /// The most a directory may grant: listing it is reading the active disk's image.
    fn dir_ceiling(&self, ns: &Namespace) -> u32 {
        let sources = ns
            .find_role(FileRole::Active)
            .and_then(|n| match &n.kind {
                NodeKind::File { dev, .. } => Some(dev.sources()),
                NodeKind::Dir { .. } => None,
            })
            .unwrap_or_default();
        access::dir_ceiling(self.cfg.uid, self.cfg.gid, &sources)
    }

    /// The attributes of node `ino`, and how long the kernel may cache them. For a
    /// lookup (`lookup` true) st_blocks is not waited for, and an estimate is not to be
    /// cached.
    pub fn attr(&self, ino: u64, lookup: bool) -> Option<(FileAttr, Duration)> {
        let ns = self.ns.read();
        let node = ns.node(ino)?;
        match &node.kind {
            NodeKind::Dir { children } => {
                let subdirs = children
                    .iter()
                    .filter(|&&c| ns.node(c).is_some_and(Node::is_dir))
                    .count() as u32;
                let perm = 0o555 & self.dir_ceiling(&ns);
                Some(self.finish(node, FileType::Directory, 0, perm, 2 + subdirs, 0, TTL))
            }
            NodeKind::File { dev, .. } => {
                let (dev, state, mtime) = (dev.clone(), node.state.clone(), node.mtime);
                drop(ns);
                let wait = if lookup { Duration::ZERO } else { BLOCKS_WAIT };
                let (blocks, exact) = self.allocated(&state, &dev, wait);
                let ttl = match (exact, lookup) {
                    _ if dev.volatile() => Duration::ZERO,
                    (true, _) => TTL,
                    (false, true) => Duration::ZERO,
                    (false, false) => ESTIMATE_TTL,
                };
                let perm = self.file_perm(&*dev);
                let changed = state.changed.lock().unwrap_or(mtime);
                let mut attr = self.attr_fields(
                    ino,
                    FileType::RegularFile,
                    dev.size(),
                    perm,
                    1,
                    blocks.div_ceil(512),
                    changed,
                );
                attr.crtime = mtime;
                Some((attr, ttl))
            }
        }
    }

    /// The permission bits of a file showing `dev`, before the umask.
    fn file_perm(&self, dev: &dyn BlockDev) -> u32 {
        let base = if self.is_writable(dev) { 0o644 } else { 0o444 };
        base & access::ceiling(self.cfg.uid, self.cfg.gid, &dev.sources())
    }

    /// The answer to getxattr (`name` given) or listxattr on node `ino` for a caller
    /// `uid`:`gid`, with a buffer of `size` bytes (0 asks for the size).
    pub fn xattr(&self, ino: u64, uid: u32, gid: u32, name: Option<&[u8]>, size: u32) -> Answer {
        let ns = self.ns.read();
        let Some(node) = ns.node(ino) else {
            return Answer::Error(libc::ENOENT);
        };
        let attrs = match &node.kind {
            NodeKind::File { dev, .. } if self.cfg.xattrs => {
                let perm = self.file_perm(&**dev) & !self.cfg.umask;
                if !xattr::readable(uid, gid, self.cfg.uid, self.cfg.gid, perm) {
                    return Answer::Error(libc::EACCES);
                }
                xattr::attributes(node, &node.xattrs)
            }
            _ => Vec::new(),
        };
        match name {
            Some(n) => xattr::get(&attrs, n, size),
            None => xattr::list(&attrs, size),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        node: &Node,
        kind: FileType,
        size: u64,
        perm: u32,
        nlink: u32,
        blocks: u64,
        ttl: Duration,
    ) -> (FileAttr, Duration) {
        let changed = node.state.changed.lock().unwrap_or(node.mtime);
        let mut attr = self.attr_fields(node.ino, kind, size, perm, nlink, blocks, changed);
        attr.crtime = node.mtime;
        (attr, ttl)
    }

    #[allow(clippy::too_many_arguments)]
    fn attr_fields(
        &self,
        ino: u64,
        kind: FileType,
        size: u64,
        perm: u32,
        nlink: u32,
        blocks: u64,
        time: SystemTime,
    ) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: (perm & !self.cfg.umask) as u16,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: 65536,
            flags: 0,
        }
    }

    /// Counts an open file.
    pub fn opened(&self, state: &NodeState, writer: bool) {
        state.open.fetch_add(1, Ordering::Relaxed);
        self.open_files.total.fetch_add(1, Ordering::Relaxed);
        if writer {
            self.open_files.writers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a closed file.
    pub fn released(&self, state: &NodeState, writer: bool) {
        state.open.fetch_sub(1, Ordering::Relaxed);
        self.open_files.total.fetch_sub(1, Ordering::Relaxed);
        if writer {
            self.open_files.writers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
