//! Files and directories the tests make and compare: temporary directories, paths made
//! absolute or resolved, mount points, trees of files written and read back, and sparse
//! copies that keep an image's holes where they are.

use super::bytes::first_difference;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh temporary directory for one test, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qcow2fs-test-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// `path` made absolute against the current directory (no symlink resolution, so the
/// names QEMU prints stay comparable with ours).
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap().join(path)
    }
}

/// The directory qemu tools and qcow2fs run in for `image`: the image's own directory
/// (QEMU resolves a relative external data-file name against the working directory).
pub fn image_dir(image: &Path) -> PathBuf {
    absolute(image)
        .parent()
        .expect("image path has a parent")
        .to_path_buf()
}

/// `path` with symlinks resolved when it exists (mount tables hold resolved paths).
pub fn canonical_or_same(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| absolute(path))
}

/// A fresh directory `name` inside `dir` (a mount point).
pub fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    p
}

/// A file name without its last extension (`disk.qcow2` → `disk`).
pub fn stem(path: &Path) -> String {
    path.file_stem()
        .unwrap_or_else(|| panic!("{} has no file name", path.display()))
        .to_string_lossy()
        .into_owned()
}

/// The names in directory `dir` (without `.` and `..`).
pub fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Writes `files` (relative path → content) under `root`, making directories as needed.
pub fn write_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (rel, data) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }
}

/// All regular files under `root` (without lost+found), relative path → content.
pub fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Panics unless `got` holds the same files with the same bytes as `expected`, naming
/// the missing and unexpected files or the first differing byte.
pub fn assert_same_tree(
    what: &str,
    expected: &BTreeMap<String, Vec<u8>>,
    got: &BTreeMap<String, Vec<u8>>,
) {
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing files {missing:?}, unexpected files {extra:?}"
    );
    for (k, v) in expected {
        if let Some(d) = first_difference(v, &got[k]) {
            panic!("{what}: file {k}: {d}");
        }
    }
}

/// Copies `src` to `dst` keeping its holes exactly where they are (SEEK_DATA/SEEK_HOLE),
/// so that `qemu-img map` of the copy sees the same data/hole layout as the original.
pub fn sparse_copy(src: &Path, dst: &Path) {
    let s = File::open(src).unwrap_or_else(|e| panic!("opening {}: {e}", src.display()));
    let d = File::create(dst).unwrap_or_else(|e| panic!("creating {}: {e}", dst.display()));
    let len = s.metadata().unwrap().len();
    d.set_len(len).unwrap();
    let fd = s.as_raw_fd();
    let mut pos: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, (hole as u64).min(len));
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], at).unwrap();
            d.write_all_at(&buf[..n], at).unwrap();
            at += n as u64;
        }
        pos = end;
    }
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A copy of `image` in its own directory (so relative backing names still resolve),
/// removed when dropped.
pub struct SiblingCopy {
    pub path: PathBuf,
}

impl SiblingCopy {
    pub fn new(image: &Path, tag: &str) -> SiblingCopy {
        let image = absolute(image);
        let name = format!(
            ".{}-{tag}-{}-{}.qcow2",
            image.file_name().unwrap().to_string_lossy(),
            std::process::id(),
            unique()
        );
        let path = image_dir(&image).join(name);
        sparse_copy(&image, &path);
        SiblingCopy { path }
    }
}

impl Drop for SiblingCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
/// A symlink made for the duration of a test (e.g. `/sbin/mount.qcow2fs` to the binary
/// under test), removed on drop if it still points where it was made to point.
pub struct TempSymlink {
    pub link: PathBuf,
    target: PathBuf,
}

impl TempSymlink {
    /// Creates `link` → `target`; fails if `link` already exists (nothing is replaced).
    pub fn new(link: &Path, target: &Path) -> Result<TempSymlink, String> {
        std::os::unix::fs::symlink(target, link).map_err(|e| {
            format!(
                "cannot create the symlink {} -> {}: {e}",
                link.display(),
                target.display()
            )
        })?;
        Ok(TempSymlink {
            link: link.to_path_buf(),
            target: target.to_path_buf(),
        })
    }
}

impl Drop for TempSymlink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.link);
        }
    }
}
