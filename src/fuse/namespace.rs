//! The mount's directory tree as plain data: which files exist, their names, inode numbers
//! and the disks behind them. Built at mount time; files come and go when snapshots are
//! taken or deleted through the control channel (inode numbers are never used twice in
//! one mount). The FUSE callbacks only look things up here, under the mount's namespace
//! lock, and do their I/O after letting it go.
//!
//! Layout for an image `NAME.qcow2`:
//! - `NAME.raw`: the active disk;
//! - `snapshots/SNAPNAME.raw`: one file per internal snapshot (`SNAPNAME@ID.raw` where the
//!   name is empty, `.`, `..` or shared);
//! - for a snapshot with VM state, next to its disk (same stem): `SNAPNAME.vmstate`, the
//!   migration stream; `SNAPNAME.mem`, the guest-physical memory rebuilt from it (when
//!   the machine's memory layout is known); `SNAPNAME.ram/BLOCK.raw`, each RAM block
//!   alone, its name escaped as snapshot names are. A VM state that cannot be used is
//!   left out with the reason in the log; the disk file stays. Snapshots taken while
//!   mounted have no VM state;
//! - `layers/N-FILENAME.raw`: backing layer N, seen through its own chain;
//! - `bitmaps/BITMAPNAME.raw`: the active disk where persistent bitmap BITMAPNAME has it
//!   dirty, holes elsewhere (the name escaped like a snapshot's; inconsistent bitmaps are
//!   left out).

use super::xattr::{self, Fixed};
use crate::block::{BlockDev, Chain};
use crate::engine::{Snapshot, SnapshotKey};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ROOT_INO: u64 = 1;

/// What kind of disk a file shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRole {
    Active,
    Snapshot(SnapshotKey),
    Layer(usize),
    /// A persistent bitmap's view of the active disk (read-only).
    Bitmap,
    /// A snapshot's VM-state stream (`NAME.vmstate`).
    VmState(SnapshotKey),
    /// The guest-physical memory rebuilt from it (`NAME.mem`).
    Memory(SnapshotKey),
    /// One RAM block of it (`NAME.ram/BLOCK.raw`), by its place in the stream's list.
    RamBlock(SnapshotKey, usize),
}

impl FileRole {
    /// The snapshot a file belongs to, if any.
    pub fn snapshot(self) -> Option<SnapshotKey> {
        match self {
            FileRole::Snapshot(k)
            | FileRole::VmState(k)
            | FileRole::Memory(k)
            | FileRole::RamBlock(k, _) => Some(k),
            FileRole::Active | FileRole::Layer(_) | FileRole::Bitmap => None,
        }
    }
}

#[derive(Debug)]
pub enum NodeKind {
    Dir {
        children: Vec<u64>,
    },
    File {
        dev: Arc<dyn BlockDev>,
        role: FileRole,
    },
}

/// A file's allocated bytes (for st_blocks): known, or being counted by a background
/// thread (counting reads every L2 table, seconds on a large image, which must not delay
/// the first lookup or read).
#[derive(Debug, Default)]
pub struct BlocksSlot {
    pub state: Mutex<Blocks>,
    pub done: Condvar,
}

#[derive(Debug, Default)]
pub struct Blocks {
    pub bytes: Option<u64>,
    /// Bumped by every change to the file; a count started before it is dropped.
    pub generation: u64,
    pub computing: bool,
}

/// What the mount tracks per file while it runs.
#[derive(Debug, Default)]
pub struct NodeState {
    pub blocks: Arc<BlocksSlot>,
    /// The time of the last change through the mount.
    pub changed: Mutex<Option<SystemTime>>,
    /// Open file handles.
    pub open: AtomicU64,
}

#[derive(Debug)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: OsString,
    pub kind: NodeKind,
    pub mtime: SystemTime,
    pub state: Arc<NodeState>,
    /// Extended attributes fixed when the file was made (`xattr`).
    pub xattrs: Fixed,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// Chooses the disk a file shows: `(role, file name, plain disk) -> disk`.
pub type Wrap<'a> =
    dyn FnMut(FileRole, &str, Arc<dyn BlockDev>) -> crate::Result<Arc<dyn BlockDev>> + 'a;

/// Which directories to show.
#[derive(Clone, Copy, Debug)]
pub struct LayoutOptions {
    pub snapshots: bool,
    pub layers: bool,
    pub bitmaps: bool,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            snapshots: true,
            layers: true,
            bitmaps: true,
        }
    }
}

/// The whole tree; inode `n` is `nodes[n - 1]` (`None` once removed).
#[derive(Debug)]
pub struct Namespace {
    nodes: Vec<Option<Node>>,
    index: HashMap<(u64, OsString), u64>,
}

/// A file name's stem: the name without its last extension.
pub fn stem(path: &Path) -> OsString {
    path.file_stem()
        .map(|s| s.to_os_string())
        .unwrap_or_else(|| OsString::from("disk"))
}

/// Escapes `%` and `/` (and NUL, which no file name may hold) as `%XX`.
pub fn escape_name(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for &b in name {
        match b {
            b'%' | b'/' | 0 => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

/// File names (without `.raw`) for snapshots given as (id, name) pairs, following the
/// layout rules: the escaped name, or `NAME@ID` where the name is empty, `.`, `..` or
/// shared with another snapshot.
pub fn snapshot_file_stems(snaps: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut count: HashMap<&[u8], usize> = HashMap::new();
    for (_, name) in snaps {
        *count.entry(name.as_slice()).or_default() += 1;
    }
    let with_id = |id: &str, esc: &[u8]| {
        let mut v = esc.to_vec();
        v.push(b'@');
        v.extend_from_slice(id.as_bytes());
        v
    };
    let mut stems: Vec<Vec<u8>> = snaps
        .iter()
        .map(|(id, name)| {
            let esc = escape_name(name);
            let special = name.is_empty() || name == b"." || name == b"..";
            if special || count[name.as_slice()] > 1 {
                with_id(id, &esc)
            } else {
                esc
            }
        })
        .collect();
    // A plain name may still collide with a NAME@ID form; give those their ID too.
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for s in &stems {
        *seen.entry(s.clone()).or_default() += 1;
    }
    for (i, (id, name)) in snaps.iter().enumerate() {
        if seen[&stems[i]] > 1 && stems[i] == escape_name(name) {
            stems[i] = with_id(id, &escape_name(name));
        }
    }
    stems
}

/// `STEM.raw`.
pub fn raw_name(stem: &[u8]) -> OsString {
    with_extension(stem, "raw")
}

/// `STEM.EXT`.
pub fn with_extension(stem: &[u8], ext: &str) -> OsString {
    let mut v = stem.to_vec();
    v.push(b'.');
    v.extend_from_slice(ext.as_bytes());
    OsString::from_vec(v)
}

/// The file-name stems of `snapshots` in the mount (without `.raw`), by key.
pub fn snapshot_file_stems_of(snapshots: &[&Snapshot]) -> Vec<(SnapshotKey, Vec<u8>)> {
    let pairs: Vec<(String, Vec<u8>)> = snapshots
        .iter()
        .map(|s| (s.entry.id.clone(), s.entry.name_bytes.clone()))
        .collect();
    snapshots
        .iter()
        .zip(snapshot_file_stems(&pairs))
        .map(|(s, stem)| (s.key, stem))
        .collect()
}

/// The modification time a snapshot file shows: the snapshot's date.
pub fn snapshot_mtime(s: &Snapshot) -> SystemTime {
    UNIX_EPOCH + Duration::new(s.entry.date_sec as u64, s.entry.date_nsec.min(999_999_999))
}

/// The name of layer `depth` (1 = the direct backing file) whose file is `path`.
pub fn layer_name(depth: usize, path: &Path) -> OsString {
    let mut name = format!("{depth}-").into_bytes();
    name.extend_from_slice(stem(path).as_bytes());
    raw_name(&name)
}

fn file_mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH)
}

pub(super) fn dir() -> NodeKind {
    NodeKind::Dir {
        children: Vec::new(),
    }
}

impl Namespace {
    /// Builds the tree for `chain`, the image opened from `image_path`. Snapshots whose
    /// L1 table is broken are left out (with a warning): they fail alone.
    pub fn build(
        chain: &Chain,
        image_path: &Path,
        opts: LayoutOptions,
    ) -> crate::Result<Namespace> {
        Self::build_with(chain, image_path, opts, &mut |_, _, dev| Ok(dev))
    }

    /// Like [`Namespace::build`], with `wrap` choosing the disk each file shows (a
    /// copy-on-read filter or a throwaway overlay over the plain one), given the file's
    /// role and name.
    pub fn build_with(
        chain: &Chain,
        image_path: &Path,
        opts: LayoutOptions,
        wrap: &mut Wrap,
    ) -> crate::Result<Namespace> {
        let mut ns = Namespace {
            nodes: Vec::new(),
            index: HashMap::new(),
        };
        let image_mtime = file_mtime(image_path);
        ns.add(ROOT_INO, OsString::new(), dir(), image_mtime);
        let mut active = stem(image_path);
        active.push(".raw");
        let role = FileRole::Active;
        let dev = wrap(role, &active.to_string_lossy(), chain.top.clone())?;
        ns.add(ROOT_INO, active, NodeKind::File { dev, role }, image_mtime);
        let image = chain.image();
        let snapshots = image.snapshots();
        if opts.snapshots && !snapshots.is_empty() {
            let usable: Vec<&Snapshot> = snapshots
                .iter()
                .filter(|s| match image.check_snapshot(s) {
                    Ok(_) => true,
                    Err(e) => {
                        log::warn!("{e:#}; leaving this snapshot out of the mount");
                        false
                    }
                })
                .collect();
            if !usable.is_empty() {
                let dir = ns.add(ROOT_INO, "snapshots".into(), dir(), image_mtime);
                for ((key, stem), s) in snapshot_file_stems_of(&usable).into_iter().zip(&usable) {
                    let role = FileRole::Snapshot(key);
                    let name = raw_name(&stem);
                    let dev = wrap(role, &name.to_string_lossy(), chain.snapshot(key))?;
                    ns.add_snapshot(dir, s, name, dev);
                    if s.entry.vm_state_size > 0 {
                        super::vmfiles::add_vm_state(&mut ns, dir, s, &stem, &chain.top);
                    }
                }
            }
        }
        if opts.layers && !chain.layers.is_empty() {
            let dir = ns.add(ROOT_INO, "layers".into(), dir(), image_mtime);
            for (i, layer) in chain.layers.iter().enumerate() {
                let path = &layer.info().path;
                let name = layer_name(i + 1, path);
                let role = FileRole::Layer(i + 1);
                let dev = wrap(role, &name.to_string_lossy(), layer.clone())?;
                ns.add(dir, name, NodeKind::File { dev, role }, file_mtime(path));
            }
        }
        if opts.bitmaps {
            for name in image.bitmap_files() {
                let (dir, _) = ns.bitmaps_dir(image_mtime);
                ns.add_bitmap(dir, chain, &name, image_mtime);
            }
        }
        Ok(ns)
    }

    /// Adds a node named `name` under directory `parent`; returns its inode number.
    pub fn add(&mut self, parent: u64, name: OsString, kind: NodeKind, mtime: SystemTime) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        if ino != ROOT_INO {
            if let Some(Some(Node {
                kind: NodeKind::Dir { children },
                ..
            })) = self.nodes.get_mut((parent - 1) as usize)
            {
                children.push(ino);
            }
            self.index.insert((parent, name.clone()), ino);
        }
        self.nodes.push(Some(Node {
            ino,
            parent,
            name,
            kind,
            mtime,
            state: Arc::default(),
            xattrs: Fixed::new(),
        }));
        ino
    }

    /// Adds file `name` to directory `parent`, with its fixed extended attributes.
    pub(super) fn add_file(
        &mut self,
        parent: u64,
        name: OsString,
        file: (Arc<dyn BlockDev>, FileRole),
        mtime: SystemTime,
        xattrs: Fixed,
    ) -> u64 {
        let (dev, role) = file;
        let ino = self.add(parent, name, NodeKind::File { dev, role }, mtime);
        if let Some(Some(n)) = self.nodes.get_mut((ino - 1) as usize) {
            n.xattrs = xattrs;
        }
        ino
    }

    /// Removes node `ino` (a file, or an empty directory) and returns it.
    pub fn remove(&mut self, ino: u64) -> Option<Node> {
        let node = self.nodes.get_mut((ino - 1) as usize)?.take()?;
        self.index.remove(&(node.parent, node.name.clone()));
        if let Some(Some(Node {
            kind: NodeKind::Dir { children },
            ..
        })) = self.nodes.get_mut((node.parent - 1) as usize)
        {
            children.retain(|&c| c != ino);
        }
        Some(node)
    }

    /// Gives node `ino` a new name in the same directory.
    pub fn rename(&mut self, ino: u64, name: OsString) {
        let Some(Some(node)) = self.nodes.get_mut((ino - 1) as usize) else {
            return;
        };
        self.index.remove(&(node.parent, node.name.clone()));
        self.index.insert((node.parent, name.clone()), ino);
        node.name = name;
    }

    /// Shows disk `dev` in file `ino` from now on (the active disk after an external
    /// snapshot).
    pub fn set_dev(&mut self, ino: u64, new: Arc<dyn BlockDev>) {
        if let Some(Some(Node {
            kind: NodeKind::File { dev, .. },
            ..
        })) = self.nodes.get_mut((ino - 1) as usize)
        {
            *dev = new;
        }
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1)
            .and_then(|i| self.nodes.get(i as usize))
            .and_then(Option::as_ref)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<&Node> {
        let &ino = self.index.get(&(parent, name.to_os_string()))?;
        self.node(ino)
    }

    /// The `snapshots` directory, made (under the root) if the mount has none yet;
    /// whether it was made.
    pub fn snapshots_dir(&mut self, mtime: SystemTime) -> (u64, bool) {
        self.top_dir("snapshots", mtime)
    }

    /// The directory `name` under the root, made if the mount has none yet; whether it
    /// was made.
    fn top_dir(&mut self, name: &str, mtime: SystemTime) -> (u64, bool) {
        match self.lookup(ROOT_INO, OsStr::new(name)) {
            Some(n) => (n.ino, false),
            None => (self.add(ROOT_INO, name.into(), dir(), mtime), true),
        }
    }

    /// Adds the disk file of snapshot `s`, named `name`, showing `dev`, to directory
    /// `dir`. Its VM state, if it has one, is added by `vmfiles::add_vm_state` (a
    /// snapshot taken while mounted has none).
    pub fn add_snapshot(
        &mut self,
        dir: u64,
        s: &Snapshot,
        name: OsString,
        dev: Arc<dyn BlockDev>,
    ) -> u64 {
        let role = FileRole::Snapshot(s.key);
        let attrs = xattr::snapshot_attrs(s);
        self.add_file(dir, name, (dev, role), snapshot_mtime(s), attrs)
    }

    /// The `bitmaps` directory, made (under the root) if the mount has none yet; whether
    /// it was made.
    pub fn bitmaps_dir(&mut self, mtime: SystemTime) -> (u64, bool) {
        self.top_dir("bitmaps", mtime)
    }

    /// Adds the file of bitmap `name` of `chain`'s image to directory `dir`; returns its
    /// inode number and file name.
    pub fn add_bitmap(
        &mut self,
        dir: u64,
        chain: &Chain,
        name: &str,
        mtime: SystemTime,
    ) -> (u64, OsString) {
        let file = raw_name(&escape_name(name.as_bytes()));
        let dev = Arc::new(crate::block::BitmapView::new(
            chain.top.clone(),
            chain.image().clone(),
            name,
        ));
        let kind = NodeKind::File {
            dev,
            role: FileRole::Bitmap,
        };
        (self.add(dir, file.clone(), kind, mtime), file)
    }

    /// The file of bitmap `name`, as (inode, directory, name), if the mount shows one.
    pub fn bitmap_file(&self, name: &str) -> Option<(u64, u64, OsString)> {
        let dir = self.lookup(ROOT_INO, OsStr::new("bitmaps"))?.ino;
        let file = raw_name(&escape_name(name.as_bytes()));
        let n = self.lookup(dir, &file)?;
        Some((n.ino, dir, file))
    }

    /// The files that belong to snapshot `key` (its disk and VM-state files), then the
    /// directories that hold only such files, as (inode, directory, name): removing them
    /// in this order leaves no empty directory of the snapshot behind.
    pub fn snapshot_files(&self, key: SnapshotKey) -> Vec<(u64, u64, OsString)> {
        let mut files: Vec<(u64, u64, OsString)> = self
            .nodes()
            .filter(
                |n| matches!(n.kind, NodeKind::File { role, .. } if role.snapshot() == Some(key)),
            )
            .map(|n| (n.ino, n.parent, n.name.clone()))
            .collect();
        let mut dirs: Vec<u64> = self
            .nodes()
            .filter(|n| {
                matches!(n.kind, NodeKind::File { role: FileRole::RamBlock(k, _), .. } if k == key)
            })
            .map(|n| n.parent)
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        for d in dirs {
            let Some(n) = self.node(d) else { continue };
            let NodeKind::Dir { children } = &n.kind else {
                continue;
            };
            if children.iter().all(|c| files.iter().any(|f| f.0 == *c)) {
                files.push((d, n.parent, n.name.clone()));
            }
        }
        files
    }

    /// Puts `dev` in front of the backing layers (an external snapshot made the image it
    /// shows layer 1): the other layers' files are renamed (their depth grows by one).
    /// Returns every (directory, name) that appeared or went, for the kernel's cache.
    pub fn push_layer(
        &mut self,
        dev: Arc<dyn BlockDev>,
        mtime: SystemTime,
    ) -> Vec<(u64, OsString)> {
        let mut changed = Vec::new();
        let dir = match self.lookup(ROOT_INO, OsStr::new("layers")) {
            Some(n) => n.ino,
            None => {
                changed.push((ROOT_INO, OsString::from("layers")));
                self.add(ROOT_INO, "layers".into(), dir(), mtime)
            }
        };
        let layers: Vec<(u64, usize, std::path::PathBuf)> = self
            .nodes()
            .filter_map(|n| match &n.kind {
                NodeKind::File {
                    role: FileRole::Layer(d),
                    dev,
                } => Some((n.ino, *d, dev.info().path.clone())),
                _ => None,
            })
            .collect();
        // Deepest first, so that no new name is taken while renaming.
        let mut layers = layers;
        layers.sort_by_key(|l| std::cmp::Reverse(l.1));
        for (ino, depth, path) in layers {
            let new = layer_name(depth + 1, &path);
            if let Some(n) = self.node(ino) {
                changed.push((dir, n.name.clone()));
            }
            self.rename(ino, new.clone());
            if let Some(Some(Node {
                kind: NodeKind::File { role, .. },
                ..
            })) = self.nodes.get_mut((ino - 1) as usize)
            {
                *role = FileRole::Layer(depth + 1);
            }
            changed.push((dir, new));
        }
        let name = layer_name(1, &dev.info().path);
        changed.push((dir, name.clone()));
        self.add(
            dir,
            name,
            NodeKind::File {
                dev,
                role: FileRole::Layer(1),
            },
            mtime,
        );
        changed
    }

    /// The file showing `role`, if there is one.
    pub fn find_role(&self, role: FileRole) -> Option<&Node> {
        self.nodes()
            .find(|n| matches!(n.kind, NodeKind::File { role: r, .. } if r == role))
    }

    /// Directory entries of `ino` including `.` and `..`, as (ino, is_dir, name).
    pub fn entries(&self, ino: u64) -> Option<Vec<(u64, bool, OsString)>> {
        let node = self.node(ino)?;
        let NodeKind::Dir { children } = &node.kind else {
            return None;
        };
        let mut out = vec![
            (ino, true, OsString::from(".")),
            (node.parent, true, OsString::from("..")),
        ];
        for &c in children {
            if let Some(n) = self.node(c) {
                out.push((c, n.is_dir(), n.name.clone()));
            }
        }
        Some(out)
    }

    /// The nodes that exist.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }

    /// The number of nodes that exist.
    pub fn len(&self) -> usize {
        self.nodes().count()
    }

    /// The full path of `ino` relative to the mount point.
    pub fn path_of(&self, ino: u64) -> OsString {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let Some(n) = self.node(cur) else { break };
            parts.push(n.name.clone());
            cur = n.parent;
        }
        parts.reverse();
        let mut out = OsString::new();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out.push("/");
            }
            out.push(p);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stems(v: &[(&str, &str)]) -> Vec<String> {
        let pairs: Vec<(String, Vec<u8>)> = v
            .iter()
            .map(|(i, n)| (i.to_string(), n.as_bytes().to_vec()))
            .collect();
        snapshot_file_stems(&pairs)
            .into_iter()
            .map(|s| String::from_utf8(s).unwrap())
            .collect()
    }

    #[test]
    fn snapshot_names_follow_the_layout_rules() {
        assert_eq!(
            stems(&[
                ("1", "clean"),
                ("2", "a/b%c"),
                ("3", ""),
                ("4", "."),
                ("5", "..")
            ]),
            ["clean", "a%2Fb%25c", "@3", ".@4", "..@5"]
        );
        assert_eq!(
            stems(&[("1", "dup"), ("2", "dup"), ("3", "1")]),
            ["dup@1", "dup@2", "1"]
        );
        // A unique name that looks like another snapshot's NAME@ID form.
        assert_eq!(
            stems(&[("1", "x"), ("2", "x"), ("3", "x@1")]),
            ["x@1", "x@2", "x@1@3"]
        );
    }

    #[test]
    fn stems_drop_the_last_extension() {
        assert_eq!(stem(Path::new("/a/disk.qcow2")), "disk");
        assert_eq!(stem(Path::new("disk")), "disk");
        assert_eq!(stem(Path::new("x.tar.qcow2")), "x.tar");
    }

    /// A disk of no bytes, for files whose content does not matter.
    #[derive(Debug)]
    struct NoDisk(crate::block::LayerInfo);

    impl BlockDev for NoDisk {
        fn size(&self) -> u64 {
            0
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> crate::Result<()> {
            Ok(())
        }
        fn status(&self, _: u64, len: u64, _: bool) -> crate::Result<crate::block::Status> {
            Ok(crate::block::Status {
                len,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            })
        }
        fn info(&self) -> &crate::block::LayerInfo {
            &self.0
        }
    }

    #[test]
    fn a_snapshots_files_are_its_disk_its_vm_state_and_their_folder_last() {
        let mut ns = Namespace {
            nodes: Vec::new(),
            index: HashMap::new(),
        };
        let disk = || -> Arc<dyn BlockDev> {
            Arc::new(NoDisk(crate::block::LayerInfo {
                path: "x".into(),
                format: "qcow2",
            }))
        };
        let (a, b) = (SnapshotKey(1), SnapshotKey(2));
        ns.add(ROOT_INO, OsString::new(), dir(), UNIX_EPOCH);
        let d = ns.add(ROOT_INO, "snapshots".into(), dir(), UNIX_EPOCH);
        let file = |ns: &mut Namespace, parent, name: &str, role| {
            ns.add_file(
                parent,
                name.into(),
                (disk(), role),
                UNIX_EPOCH,
                Fixed::new(),
            )
        };
        file(&mut ns, d, "a.raw", FileRole::Snapshot(a));
        file(&mut ns, d, "a.vmstate", FileRole::VmState(a));
        let ram = ns.add(d, "a.ram".into(), dir(), UNIX_EPOCH);
        file(&mut ns, ram, "pc.ram.raw", FileRole::RamBlock(a, 0));
        file(&mut ns, ram, "pc.bios.raw", FileRole::RamBlock(a, 1));
        file(&mut ns, d, "a.mem", FileRole::Memory(a));
        file(&mut ns, d, "b.raw", FileRole::Snapshot(b));
        let names = |k| -> Vec<String> {
            ns.snapshot_files(k)
                .iter()
                .map(|f| ns.path_of(f.0).to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(a),
            [
                "snapshots/a.raw",
                "snapshots/a.vmstate",
                "snapshots/a.ram/pc.ram.raw",
                "snapshots/a.ram/pc.bios.raw",
                "snapshots/a.mem",
                "snapshots/a.ram",
            ]
        );
        assert_eq!(names(b), ["snapshots/b.raw"]);
        for (ino, _, _) in ns.snapshot_files(a) {
            ns.remove(ino);
        }
        let left: Vec<OsString> = ns.entries(d).unwrap().into_iter().map(|e| e.2).collect();
        assert_eq!(left, [".", "..", "b.raw"]);
    }

    #[test]
    fn nodes_come_and_go() {
        let mut ns = Namespace {
            nodes: Vec::new(),
            index: HashMap::new(),
        };
        ns.add(ROOT_INO, OsString::new(), dir(), UNIX_EPOCH);
        let d = ns.add(ROOT_INO, "snapshots".into(), dir(), UNIX_EPOCH);
        let a = ns.add(d, "a.raw".into(), dir(), UNIX_EPOCH);
        let b = ns.add(d, "b.raw".into(), dir(), UNIX_EPOCH);
        assert_eq!(ns.entries(d).unwrap().len(), 4);
        assert!(ns.remove(a).is_some());
        assert!(ns.node(a).is_none() && ns.lookup(d, OsStr::new("a.raw")).is_none());
        assert_eq!(ns.entries(d).unwrap().len(), 3);
        ns.rename(b, "c.raw".into());
        assert_eq!(ns.lookup(d, OsStr::new("c.raw")).map(|n| n.ino), Some(b));
        // Numbers are never used twice.
        let c = ns.add(d, "a.raw".into(), dir(), UNIX_EPOCH);
        assert!(c > b);
        assert_eq!(ns.path_of(c), "snapshots/a.raw");
    }
}
