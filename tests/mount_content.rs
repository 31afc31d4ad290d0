//! Reading through a real mount (`qcow2fs mount`, root and /dev/fuse), compared with QEMU:
//!
//! - every corpus scenario: `NAME.raw`, each `snapshots/*.raw` and `layers/*.raw` equal
//!   QEMU's renderings; names, sizes, st_blocks and mtimes follow `qemu-img info`/`map`;
//! - an ext4 guest loop-mounted from the active disk and from a snapshot;
//! - SEEK_DATA/SEEK_HOLE against `qemu-img map`, and `cp --sparse=always`;
//! - parallel readers (default, `threads=1`, `threads=4`), O_DIRECT, the page cache kept
//!   across opens.
//!
//! Every mount is held by a `Mount` guard (loop mounts by a `LoopMount`) that unmounts on
//! drop, also when a test panics. The expected values always come from QEMU (or from the
//! files the test wrote), never from qcow2fs itself.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::corpus;
use support::images::{Ctx, discard, z, zu};
use support::*;

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
    let bitmaps = expected_bitmap_files(&info);
    let mut root = expected_root(&top, !snaps.is_empty(), !layers.is_empty());
    if !bitmaps.is_empty() {
        root.insert("bitmaps".into());
        assert_eq!(listing(&m.path("bitmaps")), bitmaps, "bitmaps/");
    }
    assert_eq!(listing(&m.mountpoint), root, "root directory");

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
        // The corpus writes patterns into the VM-state area, never a migration stream:
        // the stream is shown, nothing rebuilt from it.
        let want: BTreeSet<String> = snaps
            .iter()
            .flat_map(|s| [Some(s.file.clone()), s.vmstate_file()])
            .flatten()
            .collect();
        assert_eq!(listing(&m.path("snapshots")), want, "snapshots/ directory");
    }
    for s in &snaps {
        let Some(file) = s.vmstate_file() else {
            continue;
        };
        assert_same_bytes(
            &format!("VM state of snapshot ID {}", s.id),
            &qemu_vmstate(&top, &s.id, s.vm_state_size),
            &fs::read(m.path(&format!("snapshots/{file}"))).unwrap(),
        );
    }
    for s in &snaps {
        let copy = qemu_snapshot_applied(&top, &s.id);
        let expected = qemu_raw_as(&copy.path, Some("qcow2"));
        check_file(
            &format!("snapshot ID {} name {:?}", s.id, s.name),
            &m.path(&format!("snapshots/{}", s.file)),
            &expected,
            Some(&qemu_map_json_as(&copy.path, "qcow2")),
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
            Some(&qemu_map_json_as(&l.path, &l.format)),
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
    let dir = tempdir();
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
    let a = LoopMount::new(&active, &mountpoint(d, "guest-active"), true, "");
    let s = LoopMount::new(&snap, &mountpoint(d, "guest-snapshot"), true, "");
    assert_same_tree("ext4 in guest.raw", &new, &read_tree(a.dir()));
    assert_same_tree("ext4 in snapshots/before.raw", &old, &read_tree(s.dir()));
}

// ---------------------------------------------------------------------------------------
// 3. SEEK_DATA / SEEK_HOLE
// ---------------------------------------------------------------------------------------

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
            &qemu_map_json_as(&copy.path, "qcow2"),
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
            &qemu_map_json_as(&l.path, &l.format),
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
    let top = ctx.top_over_base(Some(8 * M + 1536), "cluster_size=32768");
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
        ReadMode::Direct => read_direct_at(&open_direct(path)?, off, len),
        ReadMode::Uncached => {
            drop_cached_pages(shared);
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
    let dir = tempdir();
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
        drop_cached_pages(&f);
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
