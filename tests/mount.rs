//! Real mounts: `qcow2fs mount` on a real mount point (root and /dev/fuse), read through
//! the kernel and compared with QEMU.
//!
//! - every corpus scenario: `NAME.raw`, each `snapshots/*.raw` and `layers/*.raw` equal
//!   QEMU's renderings; names, sizes, st_blocks and mtimes follow `qemu-img info`/`map`;
//! - an ext4 guest loop-mounted from the active disk and from a snapshot;
//! - SEEK_DATA/SEEK_HOLE against `qemu-img map`, and `cp --sparse=always`;
//! - parallel readers (default, `threads=1`, `threads=4`), O_DIRECT, the page cache kept
//!   across opens;
//! - attributes, permissions, options, snapshot naming, error paths, daemon life cycle
//!   and mount(8)/fstab integration.
//!
//! Every mount is held by a [`Mount`] guard (loop mounts by [`LoopMount`]) that unmounts
//! on drop, also when a test panics. The expected values always come from QEMU (or from
//! the files the test wrote), never from qcow2fs itself.

mod common;

use common::images::{Ctx, K, M, Rng, discard, z, zu};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// A fresh directory `mnt` (a mount point) inside `dir`.
fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

/// A file name without its last extension (`disk.qcow2` → `disk`).
fn stem(path: &Path) -> String {
    path.file_stem()
        .unwrap_or_else(|| panic!("{} has no file name", path.display()))
        .to_string_lossy()
        .into_owned()
}

/// The names in directory `dir` (without `.` and `..`).
fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    format!("{} ({e})", std::io::Error::from_raw_os_error(e))
}

/// The text of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "<non-string panic>".into()
    }
}

/// Runs `check(name)` for every name, catching panics, and fails once at the end with the
/// names (and first lines of the messages) of all that failed.
fn run_each<T: AsRef<str>>(what: &str, names: &[T], check: impl Fn(&str)) {
    let mut failures = Vec::new();
    for name in names {
        let name = name.as_ref();
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(name))) {
            failures.push(format!("{name}: {}", panic_text(&*p)));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} failed:\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}

/// `qemu-img map --output=json -f FORMAT path`.
fn qemu_map_as(path: &Path, format: &str) -> Value {
    let out = qemu_img(
        &image_dir(path),
        &[
            OsStr::new("map"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new(format),
            path.as_os_str(),
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map JSON: {e}\n{out}"))
}

/// (start, length, zero, data) of each `qemu-img map` entry.
fn map_entries(map: &Value) -> Vec<(u64, u64, bool, bool)> {
    map.as_array()
        .unwrap_or_else(|| panic!("map output is not an array: {map}"))
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Bytes `qemu-img map` reports as `"data": true`.
fn map_data_bytes(map: &Value) -> u64 {
    map_entries(map).iter().filter(|e| e.3).map(|e| e.1).sum()
}

/// The metadata of `path` once its st_blocks is counted: until the daemon has counted a
/// file's allocated bytes (in the background, so that a large image's first lookup is not
/// delayed) it reports one block more than the size, for at most a second at a time.
fn counted_metadata(path: &Path) -> fs::Metadata {
    let mut md = fs::metadata(path).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while md.blocks() > md.len().div_ceil(512) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        md = fs::metadata(path).unwrap();
    }
    md
}

/// st_blocks must account for the data bytes QEMU reports, within 512-byte rounding.
fn check_blocks(what: &str, md: &fs::Metadata, map: &Value) {
    let data = map_data_bytes(map);
    let blocks = md.blocks();
    assert!(
        (blocks * 512).abs_diff(data) < 512,
        "{what}: st_blocks is {blocks} ({} bytes) but qemu-img map reports {data} bytes of \
         data (expected st_blocks {} within 512-byte rounding)",
        blocks * 512,
        data.div_ceil(512)
    );
}

fn mtime(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn open_direct(path: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// The whole file read with O_DIRECT in `chunk`-byte aligned reads (a 4 KiB multiple).
fn read_direct(path: &Path, chunk: usize) -> Vec<u8> {
    let f = open_direct(path).unwrap_or_else(|e| panic!("open O_DIRECT {}: {e}", path.display()));
    let mut buf = AlignedBuf::new(chunk);
    let mut out = Vec::new();
    loop {
        let n = f
            .read_at(buf.as_mut(), out.len() as u64)
            .unwrap_or_else(|e| {
                panic!(
                    "O_DIRECT read of {} at {:#x} (+{chunk}): {e}",
                    path.display(),
                    out.len()
                )
            });
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf.as_mut()[..n]);
    }
    out
}

/// Reads `len` bytes at `off` (fewer at the end of the file).
fn pread_full(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// The expected bytes of a read of `len` at `off` from a file holding `data`.
fn slice_at(data: &[u8], off: u64, len: usize) -> &[u8] {
    let start = (off as usize).min(data.len());
    let end = (off as usize).saturating_add(len).min(data.len());
    &data[start..end]
}

// ---------------------------------------------------------------------------------------
// What QEMU says the mount should contain
// ---------------------------------------------------------------------------------------

/// One snapshot as `qemu-img info` lists it, with the file name the layout gives it.
#[derive(Clone, Debug)]
struct SnapFile {
    id: String,
    name: String,
    file: String,
    date: (i64, i64),
}

/// Escapes a snapshot name for a file name: `%` → `%25`, `/` → `%2F`.
fn escape_snapshot_name(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            c => s.push(c),
        }
    }
    s
}

/// `snapshots/` file names per the layout rules, from `qemu-img info --output=json`:
/// SNAPNAME.raw, or SNAPNAME@ID.raw where the name is empty, `.`, `..` or shared.
fn expected_snapshot_files(info: &Value) -> Vec<SnapFile> {
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = snaps
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let files: Vec<SnapFile> = snaps
        .iter()
        .zip(&names)
        .map(|(s, name)| {
            let id = s["id"].as_str().unwrap().to_string();
            let shared = names.iter().filter(|n| *n == name).count() > 1;
            let special = name.is_empty() || name == "." || name == "..";
            let esc = escape_snapshot_name(name);
            let file = if shared || special {
                format!("{esc}@{id}.raw")
            } else {
                format!("{esc}.raw")
            };
            SnapFile {
                id,
                name: name.clone(),
                file,
                date: (
                    s["date-sec"].as_i64().unwrap(),
                    s["date-nsec"].as_i64().unwrap(),
                ),
            }
        })
        .collect();
    let unique: BTreeSet<&str> = files.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(
        unique.len(),
        files.len(),
        "the layout rules give two snapshots the same file name ({files:?}); \
         this test cannot tell which file is which"
    );
    files
}

/// One backing layer as `qemu-img info --backing-chain` lists it.
#[derive(Clone, Debug)]
struct LayerFile {
    file: String,
    path: PathBuf,
    format: String,
}

/// `layers/N-FILENAME.raw` for each backing layer (1 = the direct backing file).
fn expected_layer_files(top: &Path) -> Vec<LayerFile> {
    qemu_backing_chain_json(top)
        .iter()
        .enumerate()
        .skip(1)
        .map(|(n, q)| {
            let path = PathBuf::from(q["filename"].as_str().unwrap());
            LayerFile {
                file: format!("{n}-{}.raw", stem(&path)),
                format: q["format"].as_str().unwrap().to_string(),
                path,
            }
        })
        .collect()
}

/// The root directory's expected entries.
fn expected_root(top: &Path, snapshots: bool, layers: bool) -> BTreeSet<String> {
    let mut root = set([&*format!("{}.raw", stem(top))]);
    if snapshots {
        root.insert("snapshots".into());
    }
    if layers {
        root.insert("layers".into());
    }
    root
}

/// Checks one regular file of the mount: size, content, and optionally st_blocks (against
/// a `qemu-img map`) and mtime.
fn check_file(
    what: &str,
    path: &Path,
    expected: &[u8],
    map: Option<&Value>,
    mtime_expected: Option<(i64, i64)>,
) {
    let md = fs::metadata(path).unwrap_or_else(|e| panic!("{what}: stat {}: {e}", path.display()));
    assert!(
        md.is_file(),
        "{what}: {} is not a regular file",
        path.display()
    );
    assert_eq!(
        md.len(),
        expected.len() as u64,
        "{what}: size of {} (expected QEMU's rendering size)",
        path.display()
    );
    let got = fs::read(path).unwrap_or_else(|e| panic!("{what}: read {}: {e}", path.display()));
    assert_same_bytes(&format!("{what} ({})", path.display()), expected, &got);
    if let Some(map) = map {
        check_blocks(what, &counted_metadata(path), map);
    }
    if let Some(t) = mtime_expected {
        assert_eq!(
            mtime(&md),
            t,
            "{what}: mtime (sec, nsec) of {}",
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Every corpus scenario through the mount
// ---------------------------------------------------------------------------------------

fn check_scenario(name: &str) {
    let (dir, top) = corpus::build(name);
    let mnt = mountpoint(dir.path(), "mnt");
    let info = qemu_info_json(&top);
    let snaps = expected_snapshot_files(&info);
    let layers = expected_layer_files(&top);
    let image_mtime = mtime(&fs::metadata(&top).unwrap());

    let m = Mount::new(&top, &mnt, &[]);
    assert_eq!(
        listing(&m.mountpoint),
        expected_root(&top, !snaps.is_empty(), !layers.is_empty()),
        "root directory"
    );

    // The active disk: buffered, and again with O_DIRECT (which bypasses the page cache).
    let active = m.path(&format!("{}.raw", stem(&top)));
    let expected = qemu_raw(&top);
    assert_eq!(
        expected.len() as u64,
        info["virtual-size"].as_u64().unwrap(),
        "qemu-img convert vs virtual-size"
    );
    check_file(
        "active disk",
        &active,
        &expected,
        Some(&qemu_map_json(&top)),
        Some(image_mtime),
    );
    assert_same_bytes(
        "active disk read with O_DIRECT",
        &expected,
        &read_direct(&active, 3 * 4096),
    );

    if !snaps.is_empty() {
        let want: BTreeSet<String> = snaps.iter().map(|s| s.file.clone()).collect();
        assert_eq!(listing(&m.path("snapshots")), want, "snapshots/ directory");
    }
    for s in &snaps {
        let copy = qemu_snapshot_applied(&top, &s.id);
        let expected = qemu_raw_as(&copy.path, Some("qcow2"));
        check_file(
            &format!("snapshot ID {} name {:?}", s.id, s.name),
            &m.path(&format!("snapshots/{}", s.file)),
            &expected,
            Some(&qemu_map_as(&copy.path, "qcow2")),
            Some(s.date),
        );
    }

    if !layers.is_empty() {
        let want: BTreeSet<String> = layers.iter().map(|l| l.file.clone()).collect();
        assert_eq!(listing(&m.path("layers")), want, "layers/ directory");
    }
    for l in &layers {
        check_file(
            &format!("layer {} ({})", l.file, l.path.display()),
            &m.path(&format!("layers/{}", l.file)),
            &qemu_raw_as(&l.path, Some(&l.format)),
            Some(&qemu_map_as(&l.path, &l.format)),
            None,
        );
    }
}

/// Scenario `i` of the corpus belongs to part `i % PARTS`: a few tests, each mounting its
/// scenarios one after the other, so that two run in parallel.
const PARTS: usize = 4;

fn corpus_part(part: usize) {
    let names: Vec<&str> = corpus::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| i % PARTS == part)
        .map(|(_, s)| s.name)
        .collect();
    run_each(
        &format!("corpus through the mount, part {}/{PARTS}", part + 1),
        &names,
        check_scenario,
    );
}

#[test]
fn corpus_through_mount_part_1() {
    corpus_part(0);
}

#[test]
fn corpus_through_mount_part_2() {
    corpus_part(1);
}

#[test]
fn corpus_through_mount_part_3() {
    corpus_part(2);
}

#[test]
fn corpus_through_mount_part_4() {
    corpus_part(3);
}

// ---------------------------------------------------------------------------------------
// 2. An ext4 guest, loop-mounted from the active disk and from a snapshot
// ---------------------------------------------------------------------------------------

/// Writes a tree of files; returns their relative paths and contents.
fn write_tree(root: &Path, files: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    for (rel, data) in files {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    files
        .iter()
        .map(|(r, d)| (r.to_string(), d.clone()))
        .collect()
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

fn assert_same_tree(
    what: &str,
    expected: &BTreeMap<String, Vec<u8>>,
    got: &BTreeMap<String, Vec<u8>>,
) {
    let e: Vec<&String> = expected.keys().collect();
    let g: Vec<&String> = got.keys().collect();
    assert_eq!(g, e, "{what}: the files in the guest file system");
    for (rel, data) in expected {
        assert_same_bytes(&format!("{what}: {rel}"), data, &got[rel]);
    }
}

#[test]
fn ext4_guest_loop_mounts_from_active_disk_and_snapshot() {
    let dir = common::tempdir();
    let d = dir.path();
    let tool = |program: &str, args: &[&str]| {
        run_in(d, program, args, Duration::from_secs(120)).expect_success();
    };

    // Snapshot state: the first tree. Active state: a second tree, written over it.
    let old = write_tree(
        &d.join("tree1"),
        &[
            ("hello.txt", b"hello from the snapshot\n".to_vec()),
            ("data.bin", random_bytes(1, 700_001)),
            ("sub/deep/note.txt", b"only in the snapshot\n".to_vec()),
            ("sub/same.txt", b"unchanged\n".to_vec()),
        ],
    );
    let new = write_tree(
        &d.join("tree2"),
        &[
            (
                "hello.txt",
                b"hello from the active disk, changed\n".to_vec(),
            ),
            ("data.bin", random_bytes(2, 900_017)),
            ("new.txt", b"only in the active disk\n".to_vec()),
            ("sub/same.txt", b"unchanged\n".to_vec()),
        ],
    );
    tool("mkfs.ext4", &["-q", "-F", "-d", "tree1", "fs1.img", "24M"]);
    tool("mkfs.ext4", &["-q", "-F", "-d", "tree2", "fs2.img", "24M"]);
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "fs1.img",
            "guest.qcow2",
        ],
    );
    tool("qemu-img", &["snapshot", "-c", "before", "guest.qcow2"]);
    // Write the second file system into the active disk of the same image (-n: keep the
    // image and its snapshot).
    tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "fs2.img",
            "guest.qcow2",
        ],
    );
    let top = d.join("guest.qcow2");
    assert_eq!(
        qemu_snapshot_ids(&top),
        ["1"],
        "the snapshot survives convert -n"
    );
    assert_same_bytes(
        "active disk per QEMU",
        &fs::read(d.join("fs2.img")).unwrap(),
        &qemu_raw(&top),
    );

    let m = Mount::new(&top, &mountpoint(d, "mnt"), &[]);
    let active = m.path("guest.raw");
    let snap = m.path("snapshots/before.raw");
    for f in [&active, &snap] {
        let r = run_in(
            d,
            "e2fsck",
            &[OsStr::new("-fn"), f.as_os_str()],
            Duration::from_secs(120),
        );
        assert!(
            r.success(),
            "e2fsck -fn on the mounted file: {}",
            r.describe()
        );
    }
    let a = LoopMount::new(&active, &mountpoint(d, "guest-active"), "");
    let s = LoopMount::new(&snap, &mountpoint(d, "guest-snapshot"), "");
    assert_same_tree("ext4 in guest.raw", &new, &read_tree(&a.mountpoint));
    assert_same_tree(
        "ext4 in snapshots/before.raw",
        &old,
        &read_tree(&s.mountpoint),
    );
}

// ---------------------------------------------------------------------------------------
// 3. SEEK_DATA / SEEK_HOLE
// ---------------------------------------------------------------------------------------

fn lseek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: lseek on an open descriptor; no memory is touched.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

/// The file as (start, end, is_data) runs, walked with SEEK_DATA and SEEK_HOLE from 0.
fn seek_walk(f: &File, size: u64) -> Vec<(u64, u64, bool)> {
    let mut segs = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = match lseek(f, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(libc::ENXIO) => size,
            Err(e) => panic!("SEEK_DATA from {pos:#x}: {}", errno_name(e)),
        };
        assert!(
            (pos..=size).contains(&data),
            "SEEK_DATA from {pos:#x} returned {data:#x} (file size {size:#x})"
        );
        if data > pos {
            segs.push((pos, data, false));
        }
        if data == size {
            break;
        }
        let hole = lseek(f, data, libc::SEEK_HOLE)
            .unwrap_or_else(|e| panic!("SEEK_HOLE from data at {data:#x}: {}", errno_name(e)));
        assert!(
            hole > data && hole <= size,
            "SEEK_HOLE from data at {data:#x} returned {hole:#x} (file size {size:#x})"
        );
        segs.push((data, hole, true));
        pos = hole;
    }
    segs
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// `zero: false`: must be data.
    Data,
    /// `zero: true`: must be a hole (`allocated`: QEMU also says `data: true`, i.e. an
    /// allocated cluster over a hole of the host file, as with preallocation=metadata).
    Hole { allocated: bool },
    /// `zero: true, data: true` in a snapshot's map: QEMU reports such host holes only
    /// when a heuristic over the whole file says so, and the map comes from a copy.
    Either,
}

fn qemu_classes(map: &Value, lenient_host_holes: bool) -> Vec<(u64, u64, Class)> {
    map_entries(map)
        .into_iter()
        .map(|(start, len, zero, data)| {
            let c = match (zero, data) {
                (false, _) => Class::Data,
                (true, true) if lenient_host_holes => Class::Either,
                (true, data) => Class::Hole { allocated: data },
            };
            (start, start + len, c)
        })
        .collect()
}

fn show_segs(segs: &[(u64, u64, bool)]) -> String {
    let v: Vec<String> = segs
        .iter()
        .take(24)
        .map(|(s, e, d)| format!("{}[{s:#x},{e:#x})", if *d { "data" } else { "hole" }))
        .collect();
    let more = if segs.len() > 24 { " ..." } else { "" };
    format!("{}{more}", v.join(" "))
}

/// Checks SEEK_DATA/SEEK_HOLE on `path` against `qemu-img map`: holes exactly where QEMU
/// reports zeros (never over data, which a sparse-aware reader would lose; and every
/// zero range reported as a hole), then that lseek from any offset agrees with the walk.
fn check_seek(what: &str, path: &Path, map: &Value, lenient_host_holes: bool, seed: u64) {
    let f = File::open(path).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let size = f.metadata().unwrap().len();
    let segs = seek_walk(&f, size);
    let classes = qemu_classes(map, lenient_host_holes);
    let covered: u64 = classes.iter().map(|c| c.1 - c.0).sum();
    assert_eq!(covered, size, "{what}: qemu-img map covers the file");

    let mut problems = Vec::new();
    for &(s, e, is_data) in &segs {
        for &(qs, qe, c) in &classes {
            if qs >= e || qe <= s {
                continue;
            }
            let (is, ie) = (s.max(qs), e.min(qe));
            if !is_data && c == Class::Data {
                problems.push(format!(
                    "lseek reports a hole at [{is:#x},{ie:#x}) where qemu-img map has data \
                     (zero: false) — a sparse-aware copy would lose it"
                ));
            }
            if let (true, Class::Hole { allocated }) = (is_data, c) {
                let note = if allocated {
                    " (zero: true, data: true: an allocated cluster over a host-file hole)"
                } else {
                    ""
                };
                problems.push(format!(
                    "lseek reports data at [{is:#x},{ie:#x}) where qemu-img map reports \
                     zeros{note}: a hole per the spec"
                ));
            }
        }
    }

    // From arbitrary offsets: boundaries, their neighbours, the end, random offsets.
    let mut offsets: BTreeSet<u64> = [0, 1, size.saturating_sub(1), size, size + 1, size + 4096]
        .into_iter()
        .collect();
    for &(s, _, _) in &segs {
        offsets.extend([s.saturating_sub(1), s, s + 1]);
    }
    for &(qs, _, _) in &classes {
        offsets.extend([qs.saturating_sub(1), qs, qs + 1]);
    }
    let mut rng = Rng::new(seed);
    for _ in 0..64 {
        offsets.insert(rng.below(size.max(1)));
    }
    let expect = |off: u64, want_data: bool| -> Result<u64, i32> {
        if off >= size {
            return Err(libc::ENXIO);
        }
        match segs.iter().find(|&&(_, e, d)| e > off && d == want_data) {
            Some(&(s, _, _)) => Ok(s.max(off)),
            None if want_data => Err(libc::ENXIO),
            None => Ok(size),
        }
    };
    for &off in &offsets {
        for (whence, name, want_data) in [
            (libc::SEEK_DATA, "SEEK_DATA", true),
            (libc::SEEK_HOLE, "SEEK_HOLE", false),
        ] {
            let got = lseek(&f, off, whence);
            let exp = expect(off, want_data);
            if got != exp {
                let show = |r: Result<u64, i32>| match r {
                    Ok(o) => format!("{o:#x}"),
                    Err(e) => errno_name(e),
                };
                problems.push(format!(
                    "{name} from {off:#x} returned {}, but walking the file from 0 implies {}",
                    show(got),
                    show(exp)
                ));
            }
        }
    }
    if !problems.is_empty() {
        problems.truncate(12);
        panic!(
            "{what}: SEEK_DATA/SEEK_HOLE:\n  {}\n  lseek walk: {}\n  qemu-img map: {:?}",
            problems.join("\n  "),
            show_segs(&segs),
            classes.iter().take(24).collect::<Vec<_>>()
        );
    }
}

/// `cp --sparse=always` of a mounted file must give the same bytes.
fn check_sparse_cp(what: &str, src: &Path, expected: &[u8], tmp: &Path) {
    let dst = tmp.join("sparse-copy.raw");
    let _ = fs::remove_file(&dst);
    let r = run_in(
        tmp,
        "cp",
        &[
            OsStr::new("--sparse=always"),
            src.as_os_str(),
            dst.as_os_str(),
        ],
        Duration::from_secs(60),
    );
    assert!(r.success(), "{what}: {}", r.describe());
    assert_same_bytes(
        &format!("{what}: cp --sparse=always"),
        expected,
        &fs::read(&dst).unwrap(),
    );
    fs::remove_file(&dst).unwrap();
}

const SEEK_SCENARIOS: &[&str] = &[
    "zero_clusters",
    "zero_clusters_small",
    "zero_clusters_over_backing",
    "discards",
    "discards_over_backing",
    "discards_v2_over_backing",
    "prealloc_off",
    "prealloc_metadata",
    "prealloc_falloc",
    "prealloc_full",
    "compressed_write_zlib_64k",
    "compressed_partial_last_cluster_zstd",
    "extended_l2_64k",
    "extended_l2_no_backing",
    "backing_smaller",
    "backing_larger",
    "overlay_grown",
    "overlay_shrunk",
    "backing_raw",
    "backing_raw_unaligned",
    "snapshots_distinct",
    "snapshots_of_overlay",
    "data_file",
    "cluster_bits_9",
    "virtual_size_0",
    "deep_chain",
];

fn check_scenario_seek(name: &str) {
    let (dir, top) = corpus::build(name);
    let m = Mount::new(&top, &mountpoint(dir.path(), "mnt"), &[]);
    let active = m.path(&format!("{}.raw", stem(&top)));
    check_seek("active disk", &active, &qemu_map_json(&top), false, 1);
    check_sparse_cp("active disk", &active, &qemu_raw(&top), dir.path());
    for (i, s) in expected_snapshot_files(&qemu_info_json(&top))
        .iter()
        .enumerate()
    {
        let copy = qemu_snapshot_applied(&top, &s.id);
        let path = m.path(&format!("snapshots/{}", s.file));
        let what = format!("snapshot {}", s.file);
        check_seek(
            &what,
            &path,
            &qemu_map_as(&copy.path, "qcow2"),
            true,
            2 + i as u64,
        );
        check_sparse_cp(
            &what,
            &path,
            &qemu_raw_as(&copy.path, Some("qcow2")),
            dir.path(),
        );
    }
    for (i, l) in expected_layer_files(&top).iter().enumerate() {
        let path = m.path(&format!("layers/{}", l.file));
        let what = format!("layer {}", l.file);
        check_seek(
            &what,
            &path,
            &qemu_map_as(&l.path, &l.format),
            false,
            100 + i as u64,
        );
    }
}

#[test]
fn seek_data_and_seek_hole_follow_qemu_map() {
    run_each("SEEK_DATA/SEEK_HOLE", SEEK_SCENARIOS, check_scenario_seek);
}

// ---------------------------------------------------------------------------------------
// 4. Parallel readers; O_DIRECT; the page cache
// ---------------------------------------------------------------------------------------

/// An overlay of a compressed base with two snapshots, a few MiB each: the files that the
/// parallel readers hammer, with QEMU's renderings.
fn build_parallel_image(dir: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let mut ctx = Ctx::new(dir, "parallel");
    ctx.source("base.raw", 6 * M);
    ctx.convert("base.raw", "base.qcow2", true, "cluster_size=65536");
    let top = ctx.overlay(
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        Some(8 * M + 1536),
        "cluster_size=32768",
    );
    let mut c = ctx.fill(0, 2 * M, 150_000);
    c.extend([
        ctx.w(5 * M + 12_345, M),
        z(6 * M + 512 * K, 256 * K),
        discard(3 * M, M),
    ]);
    ctx.io("top.qcow2", &c);
    ctx.snapshot("top.qcow2", "s1");
    let c = vec![
        ctx.w(100_000, M),
        ctx.wc(7 * M, M),
        zu(M + 256 * K, 256 * K),
        ctx.w(8 * M - 3, 1539),
    ];
    ctx.io("top.qcow2", &c);
    ctx.snapshot("top.qcow2", "s2");
    let c = vec![ctx.w(4 * M + 7, 2 * M), discard(0, 512 * K)];
    ctx.io("top.qcow2", &c);
    let files = vec![
        ("top.raw".to_string(), qemu_raw(&top)),
        ("snapshots/s1.raw".to_string(), qemu_snapshot_raw(&top, "1")),
        ("snapshots/s2.raw".to_string(), qemu_snapshot_raw(&top, "2")),
        (
            "layers/1-base.raw".to_string(),
            qemu_raw_as(&dir.join("base.qcow2"), Some("qcow2")),
        ),
    ];
    (top, files)
}

/// How a parallel reader reads.
#[derive(Clone, Copy, Debug)]
enum ReadMode {
    /// pread on the thread's long-lived descriptor.
    Shared,
    /// pread on a descriptor opened for this read.
    FreshFd,
    /// O_DIRECT, aligned offset, length and buffer.
    Direct,
    /// pread after dropping the file's cached pages (POSIX_FADV_DONTNEED).
    Uncached,
}

/// Reads `len` bytes at `off` of `path` (`shared` is an open descriptor of it) in `mode`.
fn read_in_mode(
    path: &Path,
    shared: &File,
    off: u64,
    len: usize,
    mode: ReadMode,
) -> std::io::Result<Vec<u8>> {
    match mode {
        ReadMode::Shared => pread_full(shared, off, len),
        ReadMode::FreshFd => pread_full(&File::open(path)?, off, len),
        ReadMode::Direct => {
            let f = open_direct(path)?;
            let mut buf = AlignedBuf::new(len);
            let mut got = 0;
            while got < len {
                let n = f.read_at(&mut buf.as_mut()[got..], off + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            Ok(buf.as_mut()[..got].to_vec())
        }
        ReadMode::Uncached => {
            // SAFETY: fadvise on an open descriptor.
            unsafe { libc::posix_fadvise(shared.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            pread_full(shared, off, len)
        }
    }
}

/// One parallel reader: `ops` random reads (file, offset, length, mode) of `files`,
/// each compared with QEMU's bytes; returns the first few mismatches or errors.
fn reader(t: usize, paths: &[PathBuf], files: &[(String, Vec<u8>)], ops: usize) -> Vec<String> {
    let mut rng = Rng::new(0x5eed + t as u64);
    let shared: Vec<File> = paths.iter().map(|p| File::open(p).unwrap()).collect();
    let modes = [
        ReadMode::Shared,
        ReadMode::FreshFd,
        ReadMode::Direct,
        ReadMode::Uncached,
    ];
    let mut errors = Vec::new();
    for op in 0..ops {
        let i = rng.below(files.len() as u64) as usize;
        let (name, data) = (&files[i].0, &files[i].1);
        let mut off = rng.below(data.len() as u64 + 64 * K);
        let mut len = 1 + rng.below(384 * K) as usize;
        let mode = modes[rng.below(4) as usize];
        if let ReadMode::Direct = mode {
            off &= !4095;
            len = len.div_ceil(4096) * 4096;
        }
        let what = format!("thread {t} op {op}: {mode:?} read of {name} at {off:#x} (+{len})");
        match read_in_mode(&paths[i], &shared[i], off, len, mode) {
            Err(e) => errors.push(format!("{what}: {e}")),
            Ok(got) => {
                if let Some(d) = first_difference(slice_at(data, off, len), &got) {
                    errors.push(format!("{what}: {d}"));
                }
            }
        }
        if errors.len() >= 3 {
            break;
        }
    }
    errors
}

/// `threads` parallel [`reader`]s on the files of mount `m`; all their errors.
fn hammer(m: &Mount, files: &[(String, Vec<u8>)], threads: usize, ops: usize) -> Vec<String> {
    let paths: Vec<PathBuf> = files.iter().map(|(rel, _)| m.path(rel)).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let paths = &paths;
                scope.spawn(move || reader(t, paths, files, ops))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

#[test]
fn parallel_readers_with_default_1_and_4_threads() {
    let dir = common::tempdir();
    let (top, files) = build_parallel_image(dir.path());
    let mut failures = Vec::new();
    for opts in [&[][..], &["threads=1"][..], &["threads=4"][..]] {
        let label = if opts.is_empty() { "default" } else { opts[0] };
        let m = Mount::new(&top, &mountpoint(dir.path(), &format!("mnt-{label}")), opts);
        let errors = hammer(&m, &files, 8, 120);
        if !errors.is_empty() {
            failures.push(format!("with -o {label}:\n  {}", errors.join("\n  ")));
        }
        drop(m);
    }
    assert!(
        failures.is_empty(),
        "parallel readers:\n{}",
        failures.join("\n")
    );
}

/// The `wchar` counter of `/proc/PID/io`: bytes the daemon wrote, including every read
/// reply it sent to the kernel.
fn daemon_wchar(pid: i32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).expect("reading /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar in /proc/PID/io")
}

/// How many of the file's pages are in the page cache (mincore on a mapping).
fn resident_pages(f: &File, size: usize) -> (usize, usize) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let pages = size.div_ceil(page);
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; mincore
    // writes one byte per page into a vector of that many bytes.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let mut vec = vec![0u8; pages];
        let r = libc::mincore(p, size, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(p, size);
        assert_eq!(r, 0, "mincore: {err}");
        (vec.iter().filter(|&&b| b & 1 != 0).count(), pages)
    }
}

#[test]
fn o_direct_reads_and_page_cache_kept_across_opens() {
    let (dir, top) = corpus::build("snapshots_distinct");
    let m = Mount::new(&top, &mountpoint(dir.path(), "mnt"), &[]);
    let snaps = expected_snapshot_files(&qemu_info_json(&top));

    // O_DIRECT, in aligned chunks of several sizes.
    let active = qemu_raw(&top);
    for chunk in [4096, 65536, 1 << 20] {
        assert_same_bytes(
            &format!("active disk, O_DIRECT reads of {chunk}"),
            &active,
            &read_direct(&m.path("disk.raw"), chunk),
        );
    }
    for s in &snaps {
        assert_same_bytes(
            &format!("snapshot {}, O_DIRECT reads", s.file),
            &qemu_snapshot_raw(&top, &s.id),
            &read_direct(&m.path(&format!("snapshots/{}", s.file)), 65536),
        );
    }

    // A buffered read, close, reopen: the pages stay cached and the second read does not
    // go to the daemon.
    let s = &snaps[0];
    let path = m.path(&format!("snapshots/{}", s.file));
    let expected = qemu_snapshot_raw(&top, &s.id);
    {
        let f = File::open(&path).unwrap();
        // SAFETY: fadvise on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    assert_same_bytes("first buffered read", &expected, &fs::read(&path).unwrap());
    let before = daemon_wchar(m.daemon_pid());
    let f = File::open(&path).unwrap();
    let (resident, pages) = resident_pages(&f, expected.len());
    assert_eq!(
        resident, pages,
        "after close and reopen, {resident} of {pages} pages of {} are still cached \
         (keep_cache: expected all)",
        s.file
    );
    assert_same_bytes(
        "second buffered read",
        &expected,
        &pread_full(&f, 0, expected.len() + 1).unwrap(),
    );
    drop(f);
    let written = daemon_wchar(m.daemon_pid()) - before;
    assert!(
        written < expected.len() as u64 / 8,
        "the daemon wrote {written} bytes during a re-read of the {}-byte {} after reopen: the \
         read was not served from the page cache",
        expected.len(),
        s.file
    );
}

// ---------------------------------------------------------------------------------------
// 5. Attributes, permissions, options, naming
// ---------------------------------------------------------------------------------------

/// Every entry under `root` (root included, as ""), relative path → metadata.
fn all_entries(root: &Path) -> BTreeMap<String, fs::Metadata> {
    let mut out = BTreeMap::new();
    out.insert(String::new(), fs::metadata(root).unwrap());
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                e.ino(),
                md.ino(),
                "{}: readdir's d_ino differs from stat's st_ino",
                p.display()
            );
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                md,
            );
        }
    }
    out
}

#[test]
fn inode_numbers_are_unique_and_stable_across_remounts() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let mnt = mountpoint(dir.path(), "mnt");
    let inos = |opts: &[&str]| -> BTreeMap<String, u64> {
        let m = Mount::new(&top, &mnt, opts);
        all_entries(&m.mountpoint)
            .into_iter()
            .map(|(p, md)| (p, md.ino()))
            .collect()
    };
    let first = inos(&[]);
    assert!(first.len() >= 6, "entries: {first:?}");
    let distinct: BTreeSet<u64> = first.values().copied().collect();
    assert_eq!(
        distinct.len(),
        first.len(),
        "inode numbers are not unique: {first:?}"
    );
    assert_eq!(inos(&[]), first, "inode numbers after a remount");
    assert_eq!(
        inos(&["threads=1"]),
        first,
        "inode numbers after a remount with threads=1"
    );
}

#[test]
fn sizes_blocks_and_mtimes() {
    let dir = common::tempdir();
    let mut ctx = Ctx::new(dir.path(), "attributes");
    // Sparse: 1 GiB with 64 KiB written; empty; fully written.
    ctx.create("sparse.qcow2", 1 << 30, "");
    let c = vec![ctx.w(512 * M, 64 * K)];
    ctx.io("sparse.qcow2", &c);
    ctx.create("empty.qcow2", 100 * M, "");
    ctx.create("full.qcow2", 4 * M, "");
    let c = ctx.fill(0, 4 * M, 500_000);
    ctx.io("full.qcow2", &c);
    ctx.snapshot("full.qcow2", "snap");
    // A known mtime with nanoseconds for the image file.
    let when = "@1000000000.123456789";
    for img in ["sparse.qcow2", "empty.qcow2", "full.qcow2"] {
        run_in(
            dir.path(),
            "touch",
            &["-m", "-d", when, img],
            Duration::from_secs(10),
        )
        .expect_success();
    }
    for (img, size) in [("sparse", 1u64 << 30), ("empty", 100 * M), ("full", 4 * M)] {
        let image = dir.path().join(format!("{img}.qcow2"));
        let m = Mount::new(&image, &mountpoint(dir.path(), &format!("mnt-{img}")), &[]);
        let md = counted_metadata(&m.path(&format!("{img}.raw")));
        assert_eq!(md.len(), size, "{img}: size");
        assert_eq!(
            mtime(&md),
            (1_000_000_000, 123_456_789),
            "{img}.raw: mtime = the image's"
        );
        check_blocks(&format!("{img}.raw"), &md, &qemu_map_json(&image));
        match img {
            "sparse" => assert!(
                md.blocks() > 0 && md.blocks() * 512 <= 128 * K,
                "sparse: st_blocks {} (64 KiB written of 1 GiB)",
                md.blocks()
            ),
            "empty" => assert_eq!(md.blocks(), 0, "empty: st_blocks"),
            _ => assert!(md.blocks() * 512 >= size, "full: st_blocks {}", md.blocks()),
        }
    }
}

#[test]
fn everything_is_read_only_and_writes_fail_with_erofs() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let m = Mount::new(&top, &mountpoint(dir.path(), "mnt"), &[]);
    for (rel, md) in all_entries(&m.mountpoint) {
        assert_eq!(
            md.mode() & 0o222,
            0,
            "{rel:?}: mode {:o} has write bits",
            md.mode()
        );
        assert!(
            md.is_dir() || md.is_file(),
            "{rel:?}: neither file nor directory"
        );
    }
    assert!(
        mount_info(&m.mountpoint).unwrap().has_option("ro"),
        "mounted ro"
    );
    let file = m.path("top.raw");
    let snap = m.path("snapshots/s1.raw");
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let attempts: Vec<(String, std::io::Result<()>)> = vec![
        (
            "open O_WRONLY".into(),
            fs::OpenOptions::new().write(true).open(&file).map(drop),
        ),
        (
            "open O_RDWR".into(),
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&file)
                .map(drop),
        ),
        (
            "open O_WRONLY|O_TRUNC".into(),
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&snap)
                .map(drop),
        ),
        (
            "open O_APPEND".into(),
            fs::OpenOptions::new().append(true).open(&snap).map(drop),
        ),
        (
            "create a file".into(),
            File::create(m.path("new.raw")).map(drop),
        ),
        (
            "create in snapshots/".into(),
            File::create(m.path("snapshots/new.raw")).map(drop),
        ),
        ("mkdir".into(), fs::create_dir(m.path("newdir"))),
        ("unlink".into(), fs::remove_file(&file)),
        ("rmdir".into(), fs::remove_dir(m.path("layers"))),
        ("rename".into(), fs::rename(&file, m.path("renamed.raw"))),
        (
            "chmod".into(),
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)),
        ),
        (
            "symlink".into(),
            std::os::unix::fs::symlink("top.raw", m.path("link")),
        ),
        ("link".into(), fs::hard_link(&file, m.path("hardlink"))),
        ("truncate".into(), {
            // SAFETY: a valid NUL-terminated path.
            let r = unsafe { libc::truncate(c(&file).as_ptr(), 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
        ("utimes".into(), {
            // SAFETY: a valid path; NULL times means "now".
            let r =
                unsafe { libc::utimensat(libc::AT_FDCWD, c(&file).as_ptr(), std::ptr::null(), 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
    ];
    let wrong: Vec<String> = attempts
        .into_iter()
        .filter_map(|(what, r)| match r {
            Err(e) if errno_of(&e) == libc::EROFS => None,
            Err(e) => Some(format!("{what}: {e} (expected EROFS)")),
            Ok(()) => Some(format!("{what}: succeeded (expected EROFS)")),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "write attempts:\n  {}",
        wrong.join("\n  ")
    );
    assert_same_bytes(
        "active disk after the attempts",
        &qemu_raw(&top),
        &fs::read(&file).unwrap(),
    );
}

#[test]
fn uid_gid_and_umask_options() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let mnt = mountpoint(dir.path(), "mnt");
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // (options, uid, gid, umask): base modes are r--r--r-- for files, r-xr-xr-x for dirs.
    let cases: [(&[&str], u32, u32, u32); 4] = [
        (&[], uid, gid, 0o022),
        (&["uid=1234,gid=4321"], 1234, 4321, 0o022),
        (&["umask=027", "uid=7"], 7, gid, 0o027),
        (&["umask=0"], uid, gid, 0),
    ];
    for (opts, u, g, umask) in cases {
        let m = Mount::new(&top, &mnt, opts);
        for (rel, md) in all_entries(&m.mountpoint) {
            let base = if md.is_dir() { 0o555 } else { 0o444 };
            assert_eq!(
                (md.uid(), md.gid(), md.mode() & 0o7777),
                (u, g, base & !umask),
                "-o {opts:?}: owner, group and mode of {rel:?}"
            );
        }
        assert_same_bytes(
            &format!("-o {opts:?}: content"),
            &qemu_raw(&top),
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
}

/// Reads `path` as user nobody (65534): its bytes, or the error cat printed.
fn read_as_nobody(path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("cat")
        .arg(path)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running cat as nobody");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
fn access_is_limited_to_the_mounting_user_unless_allowed() {
    let (dir, top) = corpus::build("snapshots_distinct");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = mountpoint(dir.path(), "mnt");
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let expected = qemu_raw(&top);
    // (options, nobody may read)
    let cases: [(&[&str], bool); 5] = [
        (&[], false),
        (&["allow_root"], false),
        (&["allow_other"], true),
        (&["allow_other,default_permissions"], true),
        (&["allow_other,default_permissions,umask=077"], false),
    ];
    let mut wrong = Vec::new();
    for (opts, allowed) in cases {
        let m = Mount::new(&top, &mnt, opts);
        let file = m.path("disk.raw");
        match (read_as_nobody(&file), allowed) {
            (Ok(got), true) => {
                if let Some(d) = first_difference(&expected, &got) {
                    wrong.push(format!("-o {opts:?}: nobody read wrong bytes: {d}"));
                }
            }
            (Ok(_), false) => wrong.push(format!(
                "-o {opts:?}: user nobody could read {}",
                file.display()
            )),
            (Err(e), true) => wrong.push(format!("-o {opts:?}: user nobody cannot read: {e}")),
            (Err(e), false) if !e.contains("Permission denied") => wrong.push(format!(
                "-o {opts:?}: nobody got {e:?}, expected Permission denied"
            )),
            (Err(_), false) => {}
        }
        // The mounting user (root) always can.
        match fs::read(&file) {
            Ok(got) => {
                if let Some(d) = first_difference(&expected, &got) {
                    wrong.push(format!("-o {opts:?}: root read wrong bytes: {d}"));
                }
            }
            Err(e) => wrong.push(format!("-o {opts:?}: root cannot read: {e}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "access control:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn snapshots_off_and_layers_off_hide_their_directories() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let mnt = mountpoint(dir.path(), "mnt");
    for (opts, snaps, layers) in [
        (&[][..], true, true),
        (&["snapshots=off"][..], false, true),
        (&["layers=off"][..], true, false),
        (&["snapshots=off,layers=off"][..], false, false),
        (&["snapshots=on", "layers=on"][..], true, true),
    ] {
        let m = Mount::new(&top, &mnt, opts);
        assert_eq!(
            listing(&m.mountpoint),
            expected_root(&top, snaps, layers),
            "-o {opts:?}: root"
        );
        for (name, shown) in [("snapshots", snaps), ("layers", layers)] {
            let r = fs::metadata(m.path(name));
            assert_eq!(r.is_ok(), shown, "-o {opts:?}: stat {name}: {r:?}");
            if let Err(e) = r {
                assert_eq!(errno_of(&e), libc::ENOENT, "-o {opts:?}: stat {name}");
            }
        }
        assert_same_bytes(
            &format!("-o {opts:?}: top.raw"),
            &qemu_raw(&top),
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
}

#[test]
fn snapshot_file_names_follow_the_naming_rules() {
    let dir = common::tempdir();
    let mut ctx = Ctx::new(dir.path(), "names");
    let top = ctx.create("names.qcow2", M, "cluster_size=4096");
    let names = [
        "a/b", "50%", "", ".", "..", "dup", "dup", "1", "%2F", "plain",
    ];
    for (i, name) in names.iter().enumerate() {
        let c = vec![ctx.w(i as u64 * 60_000 + 7, 50_000)];
        ctx.io("names.qcow2", &c);
        ctx.snapshot("names.qcow2", name);
    }
    let c = vec![ctx.w(3, 10_000)];
    ctx.io("names.qcow2", &c);
    let info = qemu_info_json(&top);
    let ids: Vec<&str> = info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"],
        "IDs qemu-img gave"
    );
    let files = expected_snapshot_files(&info);
    // The rules, spelled out for these names (IDs 1 to 10 in order).
    let literal = [
        "a%2Fb.raw",
        "50%25.raw",
        "@3.raw",
        ".@4.raw",
        "..@5.raw",
        "dup@6.raw",
        "dup@7.raw",
        "1.raw",
        "%252F.raw",
        "plain.raw",
    ];
    assert_eq!(
        files.iter().map(|f| f.file.as_str()).collect::<Vec<_>>(),
        literal
    );

    let m = Mount::new(&top, &mountpoint(dir.path(), "mnt"), &[]);
    assert_eq!(
        listing(&m.path("snapshots")),
        literal
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        "snapshots/ directory"
    );
    for f in &files {
        check_file(
            &format!("snapshot ID {} name {:?}", f.id, f.name),
            &m.path(&format!("snapshots/{}", f.file)),
            &qemu_snapshot_raw(&top, &f.id),
            None,
            Some(f.date),
        );
    }
}

#[test]
fn mount_table_shows_type_and_source() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    {
        let m = Mount::new(&top, &mnt, &[]);
        let e = mount_info(&m.mountpoint).unwrap();
        assert_eq!(
            (e.fstype.as_str(), e.source.as_str()),
            ("fuse.qcow2fs", &*top.to_string_lossy()),
            "type and source in /proc/self/mountinfo"
        );
        let proc_mounts = fs::read_to_string("/proc/mounts").unwrap();
        let line = proc_mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(&*m.mountpoint.to_string_lossy()))
            .expect("the mount in /proc/mounts");
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(
            (f[0], f[2]),
            (&*top.to_string_lossy(), "fuse.qcow2fs"),
            "/proc/mounts line {line:?}"
        );
    }
    let m = Mount::new(&top, &mnt, &["fsname=my-disk-image"]);
    let e = mount_info(&m.mountpoint).unwrap();
    assert_eq!(
        (e.fstype.as_str(), e.source.as_str()),
        ("fuse.qcow2fs", "my-disk-image"),
        "with fsname="
    );
}

/// The generic mount(8) options the spec lists (each alone).
const GENERIC_OPTIONS: &[&str] = &[
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "_netdev",
    "auto",
    "noauto",
    "user",
    "users",
    "defaults",
    "nofail",
    "x-systemd.automount",
    "x-foo=bar",
];

#[test]
fn generic_and_tuning_options_are_accepted() {
    let (dir, top) = corpus::build("cluster_bits_9");
    let mnt = mountpoint(dir.path(), "mnt");
    let expected = qemu_raw(&top);
    let mut wrong = Vec::new();
    let mut cases: Vec<Vec<String>> = GENERIC_OPTIONS
        .iter()
        .map(|o| vec![format!("ro,{o}")])
        .collect();
    cases.extend(
        [
            &["nosuid,nodev,noexec,noatime"][..],
            &["cache_size=64k", "threads=2"][..],
            &["cache_size=1M,threads=1"][..],
            &["allow_other", "default_permissions"][..],
        ]
        .iter()
        .map(|c| c.iter().map(|s| s.to_string()).collect()),
    );
    for opts in &cases {
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        match Mount::try_new(&top, &mnt, &opts) {
            Err(e) => wrong.push(format!("-o {opts:?}: {e}")),
            Ok(m) => {
                if let Some(d) = first_difference(&expected, &fs::read(m.path("disk.raw")).unwrap())
                {
                    wrong.push(format!("-o {opts:?}: {d}"));
                }
                let e = mount_info(&m.mountpoint).unwrap();
                if opts[0].starts_with("nosuid") {
                    for flag in ["ro", "nosuid", "nodev", "noexec", "noatime"] {
                        if !e.has_option(flag) {
                            wrong.push(format!("-o {opts:?}: {flag} missing from {e:?}"));
                        }
                    }
                }
            }
        }
    }
    // As with mount(8), a later option overrides an earlier one (fstab lines such as
    // `defaults,noexec,exec` or options appended by scripts).
    for (opts, absent) in [
        ("nosuid,suid", "nosuid"),
        ("noexec,exec", "noexec"),
        ("nodev,dev", "nodev"),
        ("noatime,atime", "noatime"),
    ] {
        match Mount::try_new(&top, &mnt, &[opts]) {
            Err(e) => wrong.push(format!("-o {opts} (the later option should win): {e}")),
            Ok(m) => {
                let e = mount_info(&m.mountpoint).unwrap();
                if e.has_option(absent) {
                    wrong.push(format!("-o {opts}: {absent} still set: {e:?}"));
                }
            }
        }
    }
    // A deep chain through a tiny L2 cache.
    let (dir2, deep) = corpus::build("deep_chain");
    match Mount::try_new(&deep, &mountpoint(dir2.path(), "mnt"), &["cache_size=4k"]) {
        Err(e) => wrong.push(format!("deep_chain, -o cache_size=4k: {e}")),
        Ok(m) => {
            let got = fs::read(m.path(&format!("{}.raw", stem(&deep)))).unwrap();
            if let Some(d) = first_difference(&qemu_raw(&deep), &got) {
                wrong.push(format!("deep_chain, -o cache_size=4k: {d}"));
            }
        }
    }
    assert!(wrong.is_empty(), "options:\n\n{}", wrong.join("\n\n"));
}

// ---------------------------------------------------------------------------------------
// 6. Error paths: exit 1, one line naming the problem, nothing mounted
// ---------------------------------------------------------------------------------------

/// Runs `qcow2fs ARGS` in `dir` and checks that it fails cleanly: exit status 1, exactly
/// one line on stderr mentioning each of `mention` (case-insensitively), no new mount at
/// `mnt` and no process left serving it.
fn assert_mount_fails(what: &str, dir: &Path, args: &[&OsStr], mnt: &Path, mention: &[&str]) {
    let before = mounts_at(mnt).len();
    let daemons_before = daemon_pids(mnt);
    let r = run_in(dir, qcow2fs_bin(), args, MOUNT_TIMEOUT);
    // Clean up anything it did mount (only when nothing was there before).
    let _guard = (before == 0).then(|| Mount::adopt(mnt));
    let mut problems = Vec::new();
    if r.code() != Some(1) {
        problems.push("exit status is not 1".to_string());
    }
    let text = r.stderr.trim_end();
    if text.is_empty() || text.lines().count() != 1 {
        problems.push(format!(
            "stderr has {} lines, expected exactly one",
            text.lines().count()
        ));
    }
    for word in mention {
        if !text.to_lowercase().contains(&word.to_lowercase()) {
            problems.push(format!("stderr does not mention {word:?}"));
        }
    }
    if mounts_at(mnt).len() != before {
        problems.push(format!("something was mounted: {:?}", mount_info(mnt)));
    }
    let new_daemons = || -> Vec<i32> {
        daemon_pids(mnt)
            .into_iter()
            .filter(|p| !daemons_before.contains(p))
            .collect()
    };
    if !wait_until(Duration::from_secs(2), || new_daemons().is_empty()) {
        problems.push(format!(
            "processes left running for the mount point: {:?}",
            new_daemons()
        ));
    }
    assert!(
        problems.is_empty(),
        "{what}: {}\n{}",
        problems.join("; "),
        r.describe()
    );
}

fn mount_args<'a>(opts: &[&'a str], image: &'a Path, mnt: &'a Path) -> Vec<&'a OsStr> {
    let mut args = vec![OsStr::new("mount")];
    for o in opts {
        args.extend([OsStr::new("-o"), OsStr::new(*o)]);
    }
    args.extend([image.as_os_str(), mnt.as_os_str()]);
    args
}

fn image_with_missing_backing(dir: &Path) -> PathBuf {
    let mut ctx = Ctx::new(dir, "missing-backing");
    ctx.create("gone-base.qcow2", M, "");
    let top = ctx.overlay("orphan.qcow2", "gone-base.qcow2", "qcow2", None, "");
    let c = vec![ctx.w(0, 1000)];
    ctx.io("orphan.qcow2", &c);
    fs::remove_file(dir.join("gone-base.qcow2")).unwrap();
    top
}

fn image_with_directory_backing(dir: &Path) -> PathBuf {
    let mut ctx = Ctx::new(dir, "dir-backing");
    ctx.create("dir-base.qcow2", M, "");
    let top = ctx.overlay("dirtop.qcow2", "dir-base.qcow2", "qcow2", None, "");
    let c = vec![ctx.w(0, 1000)];
    ctx.io("dirtop.qcow2", &c);
    fs::remove_file(dir.join("dir-base.qcow2")).unwrap();
    fs::create_dir(dir.join("dir-base.qcow2")).unwrap();
    top
}

#[test]
fn error_missing_image() {
    let dir = common::tempdir();
    let mnt = mountpoint(dir.path(), "mnt");
    let image = dir.path().join("no-such-image.qcow2");
    assert_mount_fails(
        "missing image",
        dir.path(),
        &mount_args(&[], &image, &mnt),
        &mnt,
        &["no-such-image.qcow2"],
    );
}

#[test]
fn error_mount_point_not_a_directory_or_missing() {
    let (dir, top) = corpus::build("zero_clusters");
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    assert_mount_fails(
        "mount point is a file",
        dir.path(),
        &mount_args(&[], &top, &file),
        &file,
        &["plain-file"],
    );
    let missing = dir.path().join("no-such-dir");
    assert_mount_fails(
        "mount point does not exist",
        dir.path(),
        &mount_args(&[], &top, &missing),
        &missing,
        &["no-such-dir"],
    );
}

#[test]
fn error_mount_point_already_mounted() {
    let (dir, top) = corpus::build("zero_clusters");
    let mnt = mountpoint(dir.path(), "busy-mnt");
    let m = Mount::new(&top, &mnt, &[]);
    assert_mount_fails(
        "mount point already mounted",
        dir.path(),
        &mount_args(&[], &top, &mnt),
        &mnt,
        &["busy-mnt"],
    );
    assert!(m.is_mounted(), "the first mount is still there");
    assert_same_bytes(
        "the first mount still works",
        &qemu_raw(&top),
        &fs::read(m.path("disk.raw")).unwrap(),
    );
}

#[test]
fn error_bad_options() {
    let (dir, top) = corpus::build("zero_clusters");
    let mnt = mountpoint(dir.path(), "mnt");
    let d = dir.path();
    for (opts, mention) in [
        (&["bogus"][..], &["bogus"][..]),
        (&["ro,bogus=1"][..], &["bogus"][..]),
        (&["uid=abc"][..], &["uid", "abc"][..]),
        (&["gid=-1"][..], &["gid"][..]),
        (&["umask=9z"][..], &["umask"][..]),
        (&["snapshots=maybe"][..], &["snapshots"][..]),
        (&["threads=lots"][..], &["threads"][..]),
        (&["cache_size=huge"][..], &["cache_size"][..]),
    ] {
        assert_mount_fails(
            &format!("-o {opts:?}"),
            d,
            &mount_args(opts, &top, &mnt),
            &mnt,
            mention,
        );
    }
}

#[test]
fn error_unreadable_backing_file() {
    let dir = common::tempdir();
    let mnt = mountpoint(dir.path(), "mnt");
    let top = image_with_missing_backing(dir.path());
    assert_mount_fails(
        "missing backing file",
        dir.path(),
        &mount_args(&[], &top, &mnt),
        &mnt,
        &["gone-base.qcow2"],
    );
    let top = image_with_directory_backing(dir.path());
    assert_mount_fails(
        "backing file is a directory",
        dir.path(),
        &mount_args(&[], &top, &mnt),
        &mnt,
        &["dir-base.qcow2"],
    );
}

// ---------------------------------------------------------------------------------------
// 7. The daemon: readiness, foreground, umount, signals, log, mount(8)
// ---------------------------------------------------------------------------------------

/// `cmd.output()` with a time limit (the output pipes must be closed by then: a daemon
/// that keeps the caller's stdout/stderr makes `$(qcow2fs mount ...)` hang).
fn output_within(mut cmd: Command, limit: Duration) -> Result<std::process::Output, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(|e| format!("cannot run: {e}")),
        Err(_) => Err(format!("stdout/stderr still open after {limit:?}")),
    }
}

#[test]
fn daemon_mode_returns_with_the_mount_ready() {
    let (dir, top) = corpus::build("snapshots_distinct");
    let expected = qemu_raw(&top);
    let snap = qemu_snapshot_raw(&top, "2");
    // Both spellings: `qcow2fs mount -o OPTS IMAGE DIR` and `qcow2fs IMAGE DIR -o OPTS`.
    for (i, form) in ["subcommand", "helper"].into_iter().enumerate() {
        let mnt = mountpoint(dir.path(), &format!("mnt{i}"));
        let mut cmd = Command::new(qcow2fs_bin());
        cmd.current_dir(dir.path());
        if form == "subcommand" {
            cmd.args(["mount", "-o", "ro,noatime"]).arg(&top).arg(&mnt);
        } else {
            cmd.arg(&top).arg(&mnt).args(["-o", "ro,noatime"]);
        }
        let out = output_within(cmd, MOUNT_TIMEOUT);
        let m = Mount::adopt(&mnt);
        let out = out.unwrap_or_else(|e| panic!("{form} form: {e}"));
        assert!(
            out.status.success(),
            "{form} form: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Immediately usable: no waiting.
        assert!(
            m.is_mounted(),
            "{form} form: not mounted when the command returned"
        );
        assert_same_bytes(
            &format!("{form} form: disk.raw"),
            &expected,
            &fs::read(m.path("disk.raw")).unwrap(),
        );
        assert_same_bytes(
            &format!("{form} form: snapshots/second.raw"),
            &snap,
            &fs::read(m.path("snapshots/second.raw")).unwrap(),
        );
        let pid = m.daemon_pid();
        assert!(
            pid_alive(pid),
            "{form} form: the daemon runs in the background"
        );
    }
}

#[test]
fn foreground_mode_runs_until_qcow2fs_umount() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    let mut m = Mount::try_foreground(&top, &mnt, &[]).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        m.wait_foreground(Duration::ZERO).is_none(),
        "qcow2fs mount -f returned while mounted"
    );
    assert_same_bytes(
        "foreground mount",
        &qemu_raw(&top),
        &fs::read(m.path("top.raw")).unwrap(),
    );
    // `qcow2fs umount` in another thread while this one reaps the foreground process as
    // soon as it exits (as a shell or a service manager would).
    let (d, mp) = (dir.path().to_path_buf(), mnt.clone());
    let umount = std::thread::spawn(move || {
        run_in(
            &d,
            qcow2fs_bin(),
            &[OsStr::new("umount"), mp.as_os_str()],
            MOUNT_TIMEOUT,
        )
    });
    let status = m.wait_foreground(Duration::from_secs(20));
    let r = umount.join().unwrap();
    assert!(r.success(), "{}", r.describe());
    assert!(!m.is_mounted(), "still mounted after qcow2fs umount");
    assert!(
        status.is_some_and(|s| s.success()),
        "qcow2fs mount -f after qcow2fs umount: {status:?}; stderr: {:?}",
        m.foreground_stderr()
    );
}

/// `qcow2fs umount` waits for the process serving the mount to exit; one that has exited
/// but that its parent has not reaped yet (a zombie) has exited.
#[test]
fn qcow2fs_umount_returns_when_the_foreground_process_has_exited_unreaped() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    let mut m = Mount::try_foreground(&top, &mnt, &[]).unwrap_or_else(|e| panic!("{e}"));
    let r = run_in(
        dir.path(),
        qcow2fs_bin(),
        &[OsStr::new("umount"), mnt.as_os_str()],
        Duration::from_secs(15),
    );
    let status = m.wait_foreground(Duration::from_secs(10));
    assert!(
        r.success(),
        "qcow2fs umount while its parent has not reaped the exited `qcow2fs mount -f` \
         ({} once reaped): {}",
        status.map_or("still running".to_string(), |s| s.to_string()),
        r.describe()
    );
    assert!(!m.is_mounted(), "still mounted after qcow2fs umount");
}

#[test]
fn qcow2fs_umount_waits_for_the_daemon() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    let m = Mount::new(&top, &mnt, &[]);
    let pid = m.daemon_pid();
    fs::read(m.path("top.raw")).unwrap();
    run_in(
        dir.path(),
        qcow2fs_bin(),
        &[OsStr::new("umount"), mnt.as_os_str()],
        MOUNT_TIMEOUT,
    )
    .expect_success();
    assert!(!m.is_mounted(), "still mounted after qcow2fs umount");
    assert!(
        !pid_alive(pid),
        "the daemon (pid {pid}) is still running when qcow2fs umount returns"
    );
}

#[test]
fn signals_unmount_cleanly() {
    let (dir, top) = corpus::build("backing_smaller");
    let mut wrong = Vec::new();
    // Foreground: the process is ours, so its exit status is visible.
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mnt = mountpoint(dir.path(), &format!("fg-{name}"));
        let mut m = Mount::try_foreground(&top, &mnt, &[]).unwrap_or_else(|e| panic!("{e}"));
        fs::read(m.path("top.raw")).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(m.daemon_pid(), sig) };
        let status = m.wait_foreground(Duration::from_secs(10));
        if !status.is_some_and(|s| s.success()) {
            wrong.push(format!(
                "-f, {name}: exit {status:?} (expected 0); stderr {:?}",
                m.foreground_stderr()
            ));
        }
        if m.is_mounted() {
            wrong.push(format!(
                "-f, {name}: still mounted after the process exited"
            ));
        }
    }
    // Daemon mode: the mount goes away and the daemon exits.
    let mnt = mountpoint(dir.path(), "daemon-SIGTERM");
    let m = Mount::new(&top, &mnt, &[]);
    let pid = m.daemon_pid();
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !wait_pid_gone(pid, Duration::from_secs(10)) {
        wrong.push("daemon, SIGTERM: still running after 10 s".into());
    }
    if m.is_mounted() {
        wrong.push("daemon, SIGTERM: still mounted after the daemon exited".into());
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn signal_while_a_file_is_open_detaches_and_the_daemon_ends_at_the_last_close() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "busy");
    let mut m = Mount::try_foreground(&top, &mnt, &[]).unwrap_or_else(|e| panic!("{e}"));
    let want = qemu_raw(&top);
    let held = fs::File::open(m.path("top.raw")).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.daemon_pid(), libc::SIGTERM) };
    // The open file keeps the mount busy: after its retries the daemon detaches it.
    assert!(
        wait_until(Duration::from_secs(10), || !m.is_mounted()),
        "still mounted 10 s after SIGTERM; stderr {:?}",
        m.foreground_stderr()
    );
    assert!(
        m.wait_foreground(Duration::ZERO).is_none(),
        "the daemon ended while a file of its detached mount was open"
    );
    // The open file still reads the disk.
    let mut got = vec![0; want.len()];
    held.read_exact_at(&mut got, 0).unwrap();
    assert_same_bytes("read through the detached mount", &want, &got);
    drop(held);
    let status = m.wait_foreground(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after the last close (expected 0); stderr {:?}",
        m.foreground_stderr()
    );
    assert!(
        m.foreground_stderr().contains("detaching"),
        "stderr does not say the mount was detached: {:?}",
        m.foreground_stderr()
    );
}

#[test]
fn plain_umount_and_fusermount3_unmount() {
    let (dir, top) = corpus::build("backing_smaller");
    for tool in [&["umount"][..], &["fusermount3", "-u"][..]] {
        let mnt = mountpoint(dir.path(), &format!("mnt-{}", tool[0]));
        let m = Mount::new(&top, &mnt, &[]);
        let pid = m.daemon_pid();
        fs::read(m.path("top.raw")).unwrap();
        let mut args: Vec<&OsStr> = tool[1..].iter().map(OsStr::new).collect();
        args.push(mnt.as_os_str());
        run_in(dir.path(), tool[0], &args, MOUNT_TIMEOUT).expect_success();
        assert!(!m.is_mounted(), "{tool:?}: still mounted");
        assert!(
            wait_pid_gone(pid, Duration::from_secs(10)),
            "{tool:?}: daemon {pid} still running after 10 s"
        );
    }
}

#[test]
fn log_option_gets_a_line_at_mount() {
    let (dir, top) = corpus::build("backing_smaller");
    let mut wrong = Vec::new();
    for fg in [false, true] {
        let mode = if fg { "foreground" } else { "daemon" };
        let log = dir.path().join(format!("{mode}.log"));
        let mnt = mountpoint(dir.path(), &format!("mnt-{mode}"));
        let opt = format!("log={}", log.display());
        let m = if fg {
            Mount::try_foreground(&top, &mnt, &[&opt]).unwrap_or_else(|e| panic!("{e}"))
        } else {
            Mount::new(&top, &mnt, &[&opt])
        };
        let has_line =
            || fs::read_to_string(&log).is_ok_and(|s| s.lines().any(|l| !l.trim().is_empty()));
        if !wait_until(Duration::from_secs(3), has_line) {
            wrong.push(format!(
                "{mode} mode: {} has no line after the mount ({:?})",
                log.display(),
                fs::read_to_string(&log)
            ));
        }
        drop(m);
    }
    assert!(wrong.is_empty(), "-o log=FILE:\n  {}", wrong.join("\n  "));
}

/// mount(8): `mount -t fuse.qcow2fs` (through /sbin/mount.fuse3, which runs `qcow2fs` from
/// /bin/sh), `mount -t qcow2fs` (through a /sbin/mount.qcow2fs symlink to the binary) and
/// fstab lines (`mount -T FILE DIR`), each checked, read and unmounted with umount(8).
#[test]
fn mount8_and_fstab_integration() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let expected = qemu_raw(&top);
    let bin = canonical_or_same(Path::new(qcow2fs_bin()));
    // mount(8) starts helpers without PATH, so /bin/sh (run by mount.fuse3) looks in its
    // default path: the binary must be there as `qcow2fs`.
    let _in_path = TempSymlink::new(Path::new("/usr/local/sbin/qcow2fs"), &bin)
        .unwrap_or_else(|e| panic!("cannot put qcow2fs where mount.fuse3's shell finds it: {e}"));
    let _helper = TempSymlink::new(Path::new("/sbin/mount.qcow2fs"), &bin)
        .unwrap_or_else(|e| panic!("cannot install the mount helper: {e}"));
    let path_env = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let fstab = dir.path().join("fstab");
    let top_s = top.to_string_lossy().into_owned();

    // (label, mount arguments (DIR appended unless the fstab form), uid expected)
    let cases: Vec<(&str, Vec<String>, Option<u32>)> = vec![
        (
            "mount -t fuse.qcow2fs IMAGE DIR",
            vec!["-t".into(), "fuse.qcow2fs".into(), top_s.clone()],
            None,
        ),
        (
            "mount -t fuse.qcow2fs -o ro,nosuid,uid=1234 IMAGE DIR",
            vec![
                "-t".into(),
                "fuse.qcow2fs".into(),
                "-o".into(),
                "ro,nosuid,uid=1234".into(),
                top_s.clone(),
            ],
            Some(1234),
        ),
        (
            "mount -t qcow2fs IMAGE DIR",
            vec!["-t".into(), "qcow2fs".into(), top_s.clone()],
            None,
        ),
        (
            "mount -t qcow2fs -o ro,uid=99 IMAGE DIR",
            vec![
                "-t".into(),
                "qcow2fs".into(),
                "-o".into(),
                "ro,uid=99".into(),
                top_s.clone(),
            ],
            Some(99),
        ),
        ("fstab fuse.qcow2fs", vec![], Some(4321)),
        ("fstab qcow2fs", vec![], Some(77)),
    ];
    let mut wrong = Vec::new();
    for (i, (label, args, uid)) in cases.into_iter().enumerate() {
        let mnt = mountpoint(dir.path(), &format!("m8-{i}"));
        let mut cmd = Command::new("mount");
        cmd.env("PATH", &path_env).current_dir(dir.path());
        if label.starts_with("fstab") {
            let (ty, opts) = if label.ends_with("fuse.qcow2fs") {
                (
                    "fuse.qcow2fs",
                    "ro,noauto,nofail,_netdev,x-systemd.automount,uid=4321",
                )
            } else {
                ("qcow2fs", "defaults,ro,noatime,uid=77")
            };
            fs::write(
                &fstab,
                format!("# test fstab\n{top_s} {} {ty} {opts} 0 0\n", mnt.display()),
            )
            .unwrap();
            cmd.arg("-T").arg(&fstab).arg(&mnt);
        } else {
            cmd.args(&args).arg(&mnt);
        }
        let r = run_timeout(&mut cmd, MOUNT_TIMEOUT);
        let m = Mount::adopt(&mnt);
        let result = (|| -> Result<(), String> {
            if !r.success() {
                return Err(r.describe());
            }
            let e = mount_info(&mnt).ok_or("nothing mounted")?;
            if e.fstype != "fuse.qcow2fs" || e.source != top_s {
                return Err(format!("mount table entry {e:?}"));
            }
            let got = fs::read(m.path("top.raw")).map_err(|e| format!("read: {e}"))?;
            if let Some(d) = first_difference(&expected, &got) {
                return Err(format!("content: {d}"));
            }
            if let Some(u) = uid {
                let have = fs::metadata(m.path("top.raw")).unwrap().uid();
                if have != u {
                    return Err(format!("uid {have}, expected {u}"));
                }
            }
            let pid = m.daemon.ok_or("no qcow2fs process serves the mount")?;
            let u = run_in(dir.path(), "umount", &[&mnt], MOUNT_TIMEOUT);
            if !u.success() || m.is_mounted() {
                return Err(format!("umount: {}", u.describe()));
            }
            if !wait_pid_gone(pid, Duration::from_secs(10)) {
                return Err(format!("daemon {pid} still running after umount"));
            }
            Ok(())
        })();
        if let Err(e) = result {
            wrong.push(format!("{label}: {e}"));
        }
        drop(m);
    }
    assert!(
        wrong.is_empty(),
        "mount(8) integration:\n\n{}",
        wrong.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// 7. Readahead and the backing-file policy options
// ---------------------------------------------------------------------------------------

/// The kernel readahead window of the mount at `mnt`, from its backing device info.
fn bdi_read_ahead_kb(mnt: &Path) -> Option<u32> {
    let dev = fs::metadata(mnt).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn readahead_option_sets_the_kernel_window() {
    let (dir, top) = corpus::build("cluster_bits_9");
    let mnt = mountpoint(dir.path(), "mnt");
    let expected = qemu_raw(&top);
    let default_kb = {
        let m = Mount::new(&top, &mnt, &[]);
        let kb = bdi_read_ahead_kb(&m.mountpoint).expect("the mount has a bdi entry");
        drop(m);
        kb
    };
    let want = if default_kb == 2048 { 4096 } else { 2048 };
    let m = Mount::new(&top, &mnt, &[&format!("readahead={want}")]);
    let mut seen = None;
    wait_until(Duration::from_secs(5), || {
        seen = bdi_read_ahead_kb(&m.mountpoint);
        seen == Some(want)
    });
    assert_eq!(
        seen,
        Some(want),
        "readahead={want}: the kernel window (default {default_kb} KiB) was not set"
    );
    assert_same_bytes(
        "disk.raw with a larger readahead",
        &expected,
        &fs::read(m.path("disk.raw")).unwrap(),
    );
    drop(m);
    for bad in ["readahead=0", "readahead=lots", "readahead=1000000"] {
        assert_mount_fails(
            bad,
            dir.path(),
            &mount_args(&[bad], &top, &mnt),
            &mnt,
            &["readahead"],
        );
    }
}

/// A top image over a base in `base-dir/`, each with its own data.
fn two_layers(dir: &Path) -> PathBuf {
    let mut ctx = Ctx::new(dir, "policy");
    ctx.mkdir("base-dir");
    ctx.create("base-dir/base.qcow2", 2 * M, "");
    let c = vec![ctx.w(0, 2 * M)];
    ctx.io("base-dir/base.qcow2", &c);
    let top = ctx.overlay("top.qcow2", "base-dir/base.qcow2", "qcow2", None, "");
    let c = vec![
        ctx.w(64 * K, 100 * K),
        ctx.w(M + 3000, 5000),
        z(1536 * K, 64 * K),
    ];
    ctx.io("top.qcow2", &c);
    top
}

#[test]
fn backing_deny_shows_the_top_layer_alone() {
    let dir = common::tempdir();
    let top = two_layers(dir.path());
    // QEMU's rendering of the top image with its backing link cut.
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        absolute(&top).display()
    );
    let alone = dir.path().join("alone.raw");
    qemu_img(
        dir.path(),
        &["convert", "-O", "raw", &spec, alone.to_str().unwrap()],
    );
    let expected = fs::read(&alone).unwrap();
    let whole = qemu_raw(&top);
    assert_ne!(
        expected, whole,
        "test setup: the base must show through the top"
    );
    let mnt = mountpoint(dir.path(), "mnt");
    {
        let m = Mount::new(&top, &mnt, &["backing=deny"]);
        assert_same_bytes(
            "top.raw with backing=deny",
            &expected,
            &fs::read(m.path("top.raw")).unwrap(),
        );
        assert!(
            !m.path("layers").exists(),
            "backing=deny still shows layers/: {:?}",
            listing(&m.mountpoint)
        );
    }
    {
        let m = Mount::new(&top, &mnt, &["backing=follow"]);
        assert_same_bytes(
            "top.raw with backing=follow",
            &whole,
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
    assert_mount_fails(
        "backing=maybe",
        dir.path(),
        &mount_args(&["backing=maybe"], &top, &mnt),
        &mnt,
        &["backing"],
    );
}

#[test]
fn backing_dir_allows_only_files_under_it() {
    let dir = common::tempdir();
    let top = two_layers(dir.path());
    let mnt = mountpoint(dir.path(), "mnt");
    let base_dir = dir.path().join("base-dir");
    {
        let opt = format!("backing_dir={}", base_dir.display());
        let m = Mount::new(&top, &mnt, &[&opt]);
        assert_same_bytes(
            "top.raw with its base under backing_dir",
            &qemu_raw(&top),
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let opt = format!("backing_dir={}", elsewhere.display());
    assert_mount_fails(
        "a base outside backing_dir",
        dir.path(),
        &mount_args(&[&opt], &top, &mnt),
        &mnt,
        &["base.qcow2", "backing_dir"],
    );
    // A symlink under backing_dir that leads outside it does not count as under it.
    let mut ctx = Ctx::new(dir.path(), "policy-link");
    ctx.create("elsewhere/real.qcow2", M, "");
    let c = vec![ctx.w(0, M)];
    ctx.io("elsewhere/real.qcow2", &c);
    let jail = dir.path().join("jail");
    fs::create_dir(&jail).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("real.qcow2"), jail.join("link.qcow2")).unwrap();
    let linked = ctx.overlay("jail/top2.qcow2", "link.qcow2", "qcow2", None, "");
    let opt = format!("backing_dir={}", jail.display());
    assert_mount_fails(
        "a symlink leading outside backing_dir",
        dir.path(),
        &mount_args(&[&opt], &linked, &mnt),
        &mnt,
        &["link.qcow2", "backing_dir"],
    );
}
