//! The mount's directory tree as plain data: which files exist, their names, inode numbers
//! and the disks behind them. Built once at mount time; the FUSE callbacks only look
//! things up here.
//!
//! Layout for an image `NAME.qcow2`:
//! - `NAME.raw`: the active disk;
//! - `snapshots/SNAPNAME.raw`: one file per internal snapshot (`SNAPNAME@ID.raw` where the
//!   name is empty, `.`, `..` or shared);
//! - `layers/N-FILENAME.raw`: backing layer N, seen through its own chain.

use crate::block::{BlockDev, Chain};
use crate::engine::{Snapshot, SnapshotKey};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ROOT_INO: u64 = 1;

/// What kind of disk a file shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRole {
    Active,
    Snapshot(SnapshotKey),
    Layer(usize),
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

#[derive(Debug)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: OsString,
    pub kind: NodeKind,
    pub mtime: SystemTime,
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
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            snapshots: true,
            layers: true,
        }
    }
}

/// The whole tree; inode `n` is `nodes[n - 1]`.
#[derive(Debug)]
pub struct Namespace {
    nodes: Vec<Node>,
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

fn raw_name(stem: &[u8]) -> OsString {
    let mut v = stem.to_vec();
    v.extend_from_slice(b".raw");
    OsString::from_vec(v)
}

fn file_mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH)
}

impl Namespace {
    /// Builds the tree for `chain`, the image opened from `image_path`. Snapshots whose
    /// L1 table is broken are left out (with a warning): they fail alone.
    pub fn build(chain: &Chain, image_path: &Path, opts: LayoutOptions) -> Namespace {
        Self::build_with(chain, image_path, opts, &mut |_, _, dev| Ok(dev))
            .expect("the identity wrapper cannot fail")
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
        ns.push(
            ROOT_INO,
            OsString::new(),
            NodeKind::Dir {
                children: Vec::new(),
            },
            image_mtime,
        );
        let mut active = stem(image_path);
        active.push(".raw");
        let dev = wrap(
            FileRole::Active,
            &active.to_string_lossy(),
            chain.top.clone(),
        )?;
        ns.push(
            ROOT_INO,
            active,
            NodeKind::File {
                dev,
                role: FileRole::Active,
            },
            image_mtime,
        );
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
            let pairs: Vec<(String, Vec<u8>)> = usable
                .iter()
                .map(|s| (s.entry.id.clone(), s.entry.name_bytes.clone()))
                .collect();
            let stems = snapshot_file_stems(&pairs);
            if !usable.is_empty() {
                let dir = ns.push(
                    ROOT_INO,
                    "snapshots".into(),
                    NodeKind::Dir {
                        children: Vec::new(),
                    },
                    image_mtime,
                );
                for (s, stem) in usable.into_iter().zip(stems) {
                    let e = &s.entry;
                    let mtime =
                        UNIX_EPOCH + Duration::new(e.date_sec as u64, e.date_nsec.min(999_999_999));
                    let name = raw_name(&stem);
                    let role = FileRole::Snapshot(s.key);
                    let dev = wrap(role, &name.to_string_lossy(), chain.snapshot(s.key))?;
                    ns.push(dir, name, NodeKind::File { dev, role }, mtime);
                }
            }
        }
        if opts.layers && !chain.layers.is_empty() {
            let dir = ns.push(
                ROOT_INO,
                "layers".into(),
                NodeKind::Dir {
                    children: Vec::new(),
                },
                image_mtime,
            );
            for (i, layer) in chain.layers.iter().enumerate() {
                let path = &layer.info().path;
                let mut name = format!("{}-", i + 1).into_bytes();
                name.extend_from_slice(stem(path).as_bytes());
                let name = raw_name(&name);
                let dev = wrap(
                    FileRole::Layer(i + 1),
                    &name.to_string_lossy(),
                    layer.clone(),
                )?;
                ns.push(
                    dir,
                    name,
                    NodeKind::File {
                        dev,
                        role: FileRole::Layer(i + 1),
                    },
                    file_mtime(path),
                );
            }
        }
        Ok(ns)
    }

    fn push(&mut self, parent: u64, name: OsString, kind: NodeKind, mtime: SystemTime) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        if ino != ROOT_INO {
            if let NodeKind::Dir { children } = &mut self.nodes[(parent - 1) as usize].kind {
                children.push(ino);
            }
            self.index.insert((parent, name.clone()), ino);
        }
        self.nodes.push(Node {
            ino,
            parent,
            name,
            kind,
            mtime,
        });
        ino
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<&Node> {
        let &ino = self.index.get(&(parent, name.to_os_string()))?;
        self.node(ino)
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
            let n = &self.nodes[(c - 1) as usize];
            out.push((c, n.is_dir(), n.name.clone()));
        }
        Some(out)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
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
}
