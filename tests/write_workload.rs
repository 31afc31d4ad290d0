//! Read-write mounts (`qcow2fs mount -o rw`) under load, checked against QEMU:
//!
//! - random unaligned writes, hole punching, zero ranges and growing truncates on images of
//!   every kind, with a raw model receiving the same operations; afterwards the image must
//!   pass `qemu-img check` without errors or leaks, `qemu-img convert -O raw` must equal the
//!   model, every snapshot and every backing file must be unchanged;
//! - concurrent writers (overlapping clusters, disjoint bytes) and readers;
//! - an ext4 filesystem made, filled and checked through a loop device on the mount.
//!
//! Every mount is held by a `Mount` guard that unmounts on drop, also when a test panics.
//! Expected contents come from the operations the tests performed and from QEMU's
//! renderings, never from qcow2fs.

mod support;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::images::{create_base, create_image, create_over_base, populate, wp, z};
use support::patch::{hdr, read_be32};
use support::*;

// ---------------------------------------------------------------------------------------
// Building images with qemu-img and qemu-io
// ---------------------------------------------------------------------------------------

/// A raw file `name` of `size` bytes written by qemu-io with a few patterns.
fn create_raw(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    qemu_img(dir, &["create", "-q", "-f", "raw", name, &size.to_string()]);
    qemu_io_with(
        &p,
        &["-f", "raw"],
        &[
            format!("write -P 0x71 0 {}", size / 2),
            format!("write -P 0x72 {} {}", size / 2 + 4096, size / 4),
        ],
    );
    p
}

/// Compressed clusters (QEMU compresses only into unallocated clusters).
fn compressed_clusters(image: &Path, start: u64, cluster: u64, n: u64) {
    let cmds: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "write -c -P {:#x} {} {}",
                0x40 + i,
                start + i * cluster,
                cluster
            )
        })
        .collect();
    qemu_io(image, &cmds);
    let map = qemu_map_json(image);
    assert!(
        map.as_array()
            .is_some_and(|a| a.iter().any(|e| e["compressed"] == true)),
        "the test image has no compressed clusters: {map}"
    );
}

// ---------------------------------------------------------------------------------------
// The random workload
// ---------------------------------------------------------------------------------------

struct Workload {
    ops: usize,
    cluster: u64,
    /// Sizes to grow the disk to (with ftruncate), at evenly spaced points.
    grow_to: Vec<u64>,
}

/// Random operations on `disk` (and its model): unaligned writes, writes crossing
/// cluster boundaries, writes over 1 MiB, hole punching, zero ranges, O_DIRECT read-back
/// checks, fsync, close and reopen, and growing truncates.
fn random_workload(disk: &mut Disk, rng: &mut Rng, w: &Workload) {
    let cs = w.cluster;
    let mut grow = w.grow_to.iter();
    let every = if w.grow_to.is_empty() {
        usize::MAX
    } else {
        w.ops / (w.grow_to.len() + 1)
    };
    for i in 0..w.ops {
        if i > 0
            && i % every == 0
            && let Some(&to) = grow.next()
        {
            disk.grow(to);
        }
        let size = disk.size();
        match rng.below(100) {
            // Small unaligned write.
            0..28 => {
                let off = rng.below(size);
                let len = rng.range(1, 4097).min(size - off);
                let data = rng.bytes(len as usize);
                disk.write(off, &data);
            }
            // Crossing a cluster boundary.
            28..48 => {
                let clusters = size / cs;
                if clusters < 2 {
                    continue;
                }
                let b = rng.range(1, clusters) * cs;
                let before = rng.range(1, cs.min(9000) + 1);
                let after = rng.range(1, cs.min(9000) + 1);
                let off = b - before;
                let len = (before + after).min(size - off);
                let data = rng.bytes(len as usize);
                disk.write(off, &data);
            }
            // Medium.
            48..60 => {
                let off = rng.below(size);
                let len = rng.range(4 * K, 384 * K).min(size - off);
                let data = rng.bytes(len as usize);
                disk.write(off, &data);
            }
            // Over 1 MiB.
            60..65 => {
                let len = rng.range(M + 1, 5 * M / 2).min(size);
                let off = rng.below(size - len + 1);
                let data = rng.bytes(len as usize);
                disk.write(off, &data);
            }
            // Punch a hole (sometimes running past the end of the disk).
            65..75 => {
                let off = rng.below(size);
                let len = rng.range(1, 3 * cs.max(64 * K));
                disk.punch(off, len);
            }
            // Zero a range.
            75..85 => {
                let off = rng.below(size);
                let len = rng.range(1, 3 * cs.max(64 * K)).min(size - off);
                let keep = rng.chance(50);
                disk.zero(off, len, keep);
            }
            // Read back from the daemon.
            85..91 => {
                let off = rng.below(size);
                let len = rng.range(1, 512 * K).min(size - off);
                disk.verify_range_direct(off, len);
            }
            91..94 => disk.fsync(),
            94..96 => disk.reopen(),
            // The last bytes of the disk, and the first.
            _ => {
                let len = rng.range(1, 70 * K).min(size);
                let data = rng.bytes(len as usize);
                if rng.chance(50) {
                    disk.write(size - len, &data);
                } else {
                    disk.write(0, &data);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Write scenarios
// ---------------------------------------------------------------------------------------

/// An image built for a write scenario.
struct Built {
    image: PathBuf,
    /// Files that must never change (backing files).
    backing: Vec<PathBuf>,
    cluster: u64,
}

struct Extra {
    /// Mount options besides `rw`.
    options: &'static [&'static str],
    /// Growing truncates as fractions of the size: new size = size * num / 8, rounded to 512.
    grow_eighths: &'static [u64],
    /// The refcount table must have grown (header field refcount_table_clusters).
    refcount_table_grows: bool,
    /// lazy_refcounts: the dirty bit is set while mounted and clear afterwards.
    lazy: bool,
    /// External data file with data_file_raw: it must hold the disk's bytes.
    raw_data_file: Option<&'static str>,
    ops: Option<usize>,
}

/// No extras: 70 operations, no growth.
const NONE: Extra = Extra {
    options: &[],
    grow_eighths: &[],
    refcount_table_grows: false,
    lazy: false,
    raw_data_file: None,
    ops: None,
};

/// Growing truncates at `eighths` of the size.
const fn grow(eighths: &'static [u64]) -> Extra {
    Extra {
        grow_eighths: eighths,
        ..NONE
    }
}

/// Mount rw, run the random workload, verify through the mount, unmount, then check with
/// QEMU; then a second, shorter round on the image qcow2fs wrote.
fn write_scenario(name: &str, build: impl FnOnce(&Path) -> Built, extra: Extra) {
    let tmp = tempdir();
    let dir = tmp.path();
    let b = build(dir);
    let frozen = Frozen::record(
        &b.image,
        &b.backing.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let table_before = read_be32(&b.image, hdr::REFCOUNT_CLUSTERS);
    let mnt = mountpoint(dir, "mnt");
    let mut options = vec!["rw"];
    options.extend_from_slice(extra.options);
    let mut rng = Rng::new(fnv(name));
    let mut model = qemu_raw(&b.image);
    for round in 0..2 {
        let m = Mount::new(&b.image, &mnt, &options);
        let mut disk = Disk::open(&m.disk(), model);
        let size = disk.size();
        let grow_to: Vec<u64> = if round == 0 {
            extra
                .grow_eighths
                .iter()
                .map(|&e| (size * e / 8).next_multiple_of(512))
                .collect()
        } else {
            Vec::new()
        };
        let ops = extra.ops.unwrap_or(70) / (round + 1);
        random_workload(
            &mut disk,
            &mut rng,
            &Workload {
                ops,
                cluster: b.cluster,
                grow_to,
            },
        );
        disk.verify_through_mount();
        if extra.lazy {
            assert!(
                dirty_flag(&b.image),
                "{name}: lazy_refcounts image written while mounted rw, but QEMU sees no dirty flag"
            );
        }
        frozen.assert_snapshot_files(&m.mountpoint);
        model = std::mem::take(&mut disk.model);
        let log = std::mem::take(&mut disk.log);
        drop(disk);
        m.umount();
        assert_check_clean(&b.image);
        let got = qemu_raw(&b.image);
        assert_model(
            &format!("{name} round {round}: qemu-img convert -O raw after unmount"),
            &model,
            &got,
            |at| history(&log, at),
        );
        assert_eq!(
            qemu_info_json(&b.image)["virtual-size"].as_u64(),
            Some(model.len() as u64),
            "{name}: virtual size after unmount"
        );
        if extra.lazy {
            assert!(
                !dirty_flag(&b.image),
                "{name}: the dirty flag is still set after unmount"
            );
        }
        if let Some(data) = extra.raw_data_file {
            assert_eq!(
                qemu_info_json(&b.image)["format-specific"]["data"]["data-file-raw"].as_bool(),
                Some(true),
                "{name}: data-file-raw was dropped, the data file no longer a raw image"
            );
            let mut bytes = fs::read(dir.join(data)).unwrap();
            bytes.resize(bytes.len().max(model.len()), 0);
            if let Some(d) = first_difference(&model, &bytes[..model.len()]) {
                panic!("{name}: the raw external data file does not hold the disk's bytes: {d}");
            }
        }
        frozen.assert_unchanged();
    }
    if extra.refcount_table_grows {
        let after = read_be32(&b.image, hdr::REFCOUNT_CLUSTERS);
        assert!(
            after > table_before,
            "test setup: the refcount table did not grow ({table_before} -> {after} clusters)"
        );
    }
    // QEMU can go on writing the image qcow2fs wrote.
    qemu_io(&b.image, &[wp(0x99, 4096, 8192)]);
    assert_check_clean(&b.image);
}

/// One image with data written by QEMU.
fn simple(size: u64, opts: &'static str, cluster: u64) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let image = create_image(dir, "img.qcow2", Some(size), opts, None);
        populate(&image, size, cluster);
        Built {
            image,
            backing: vec![],
            cluster,
        }
    }
}

/// [`simple`], then `n` internal snapshots, each followed by more writes.
fn with_snapshots(
    size: u64,
    opts: &'static str,
    cluster: u64,
    n: usize,
) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let built = simple(size, opts, cluster)(dir);
        for i in 0..n {
            qemu_img(
                dir,
                &["snapshot", "-c", &format!("s{}", i + 1), "img.qcow2"],
            );
            qemu_io(
                &built.image,
                &[
                    wp(0x50 + i as u8, (i as u64 + 1) * size / 8 + 1024, size / 5),
                    z(size / 2 + i as u64 * cluster, cluster),
                ],
            );
        }
        built
    }
}

/// A qcow2 image over a qcow2 base that has data almost everywhere.
fn over_backing(size: u64, opts: &'static str, cluster: u64) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let base = create_base(
            dir,
            size,
            &[wp(0x5b, 0, size - 64 * K), wp(0x5c, size - 32 * K, 32 * K)],
        );
        let image = create_over_base(dir, "img.qcow2", size, opts);
        populate(&image, size, cluster);
        Built {
            image,
            backing: vec![base],
            cluster,
        }
    }
}

/// 4 MiB, 64 KiB clusters created with `opts`: compressed clusters at `runs` (start,
/// count), then QEMU's usual data; with `snapshot`, an internal snapshot.
fn over_compressed(
    opts: &'static str,
    runs: &'static [(u64, u64)],
    snapshot: bool,
) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let image = create_image(dir, "img.qcow2", Some(4 * M), opts, None);
        for &(start, n) in runs {
            compressed_clusters(&image, start, 64 * K, n);
        }
        populate(&image, 4 * M, 64 * K);
        if snapshot {
            qemu_img(dir, &["snapshot", "-c", "after-compress", "img.qcow2"]);
        }
        Built {
            image,
            backing: vec![],
            cluster: 64 * K,
        }
    }
}

/// A qcow2 image over a qcow2 middle layer over a raw base.
fn over_qcow2_and_raw(dir: &Path) -> Built {
    let base = create_raw(dir, "base.raw", 6 * M);
    let mid = create_image(dir, "mid.qcow2", Some(6 * M), "", Some(("base.raw", "raw")));
    qemu_io(
        &mid,
        &[
            wp(0x61, 512 * K, M),
            wp(0x62, 4 * M, 300 * K),
            z(2 * M, 256 * K),
        ],
    );
    let image = create_image(
        dir,
        "img.qcow2",
        Some(6 * M),
        "",
        Some(("mid.qcow2", "qcow2")),
    );
    populate(&image, 6 * M, 64 * K);
    Built {
        image,
        backing: vec![base, mid],
        cluster: 64 * K,
    }
}

/// A 4 MiB image over an 8 MiB base full of data: growing must read zeros, not the base.
fn over_larger_backing(dir: &Path) -> Built {
    let base = create_base(dir, 8 * M, &[wp(0x5b, 0, 8 * M)]);
    let image = create_over_base(dir, "img.qcow2", 4 * M, "");
    qemu_io(&image, &[wp(0x21, 100 * K, 200 * K)]);
    Built {
        image,
        backing: vec![base],
        cluster: 64 * K,
    }
}

/// One `#[test]` per line: `name: build, extra;`.
macro_rules! write_scenarios {
    ($($name:ident: $build:expr, $extra:expr;)*) => {
        $(
            #[test]
            fn $name() {
                write_scenario(stringify!($name), $build, $extra);
            }
        )*
    };
}

write_scenarios! {
    writes_64k_clusters: simple(6 * M, "", 64 * K), grow(&[10, 13]);
    writes_512_byte_clusters_refcount_table_growth_small_cache:
        simple(4 * M, "cluster_size=512,refcount_bits=64", 512),
        Extra {
            options: &["cache_size=1k"],
            refcount_table_grows: true,
            grow_eighths: &[9],
            ops: Some(60),
            ..NONE
        };
    writes_512_byte_clusters: simple(3 * M, "cluster_size=512", 512), NONE;
    writes_2m_clusters: simple(8 * M, "cluster_size=2M", 2 * M), grow(&[11]);
    writes_refcount_bits_1: simple(4 * M, "refcount_bits=1", 64 * K), NONE;
    writes_refcount_bits_2_with_snapshot: with_snapshots(4 * M, "refcount_bits=2", 64 * K, 1), NONE;
    writes_refcount_bits_8_with_snapshot: with_snapshots(4 * M, "refcount_bits=8", 64 * K, 1), NONE;
    writes_refcount_bits_64: simple(4 * M, "refcount_bits=64", 64 * K), NONE;
    writes_v2_image: simple(4 * M, "compat=0.10", 64 * K), grow(&[12]);
    writes_v2_image_over_backing: over_backing(4 * M, "compat=0.10", 64 * K), NONE;
    writes_extended_l2: simple(4 * M, "extended_l2=on", 64 * K), NONE;
    writes_extended_l2_over_backing: over_backing(4 * M, "extended_l2=on", 64 * K), grow(&[10]);
    writes_extended_l2_32k_clusters_over_backing:
        over_backing(4 * M, "extended_l2=on,cluster_size=32k", 32 * K), NONE;
    writes_over_zstd_compressed_clusters:
        over_compressed("compression_type=zstd", &[(M + 256 * K, 12)], false),
        Extra { ops: Some(90), ..NONE };
    writes_over_zlib_compressed_clusters_with_snapshot:
        over_compressed("", &[(M + 256 * K, 12), (3 * M, 4)], true),
        Extra { ops: Some(90), ..NONE };
    writes_with_two_internal_snapshots: with_snapshots(6 * M, "", 64 * K, 2), grow(&[11]);
    writes_over_backing_chain_qcow2_and_raw: over_qcow2_and_raw, grow(&[10]);
    // 4 MiB -> 5 MiB + 512 -> 12 MiB: the base has data up to 8 MiB.
    grow_over_larger_backing_file_reads_zeros: over_larger_backing, grow(&[10, 24]);
    writes_preallocation_metadata: simple(4 * M, "preallocation=metadata", 64 * K), NONE;
    writes_preallocation_falloc: simple(4 * M, "preallocation=falloc", 64 * K), NONE;
    writes_preallocation_full: simple(4 * M, "preallocation=full", 64 * K), grow(&[10]);
    writes_external_data_file: simple(4 * M, "data_file=img.data", 64 * K), grow(&[10]);
    writes_external_raw_data_file:
        simple(4 * M, "data_file=img.data,data_file_raw=on", 64 * K),
        Extra { raw_data_file: Some("img.data"), ..grow(&[10]) };
    writes_lazy_refcounts:
        with_snapshots(4 * M, "lazy_refcounts=on", 64 * K, 1),
        Extra { lazy: true, ..NONE };
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

const WRITERS: u64 = 8;
/// Region A, [0, 4M): 4 KiB blocks, block b owned by writer b % 8, so every cluster is
/// written by all eight writers at once (disjoint bytes).
const REGION_A: u64 = 4 * M;
/// Region B, [4M, 7M): one contiguous chunk per writer.
const CHUNK_B: u64 = 3 * M / WRITERS;
/// Region C, [7M, 8M): never written; readers check it while the writers run.
const REGION_C: u64 = 7 * M;
const CONC_SIZE: u64 = 8 * M;

/// Which writer owns byte `at` (None: region C).
fn owner(at: u64) -> Option<usize> {
    if at < REGION_A {
        Some(((at / 4096) % WRITERS) as usize)
    } else if at < REGION_C {
        Some(((at - REGION_A) / CHUNK_B) as usize)
    } else {
        None
    }
}

/// One writer: unaligned writes inside its own 4 KiB blocks of region A, and writes,
/// punches and zero ranges in its chunk of region B; each operation is read back at once
/// (the writer is the only one writing those bytes). Returns its view of the disk.
fn writer(path: PathBuf, t: usize, initial: Arc<Vec<u8>>, seed: u64, ops: usize) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut local = (*initial).clone();
    let mut rng = Rng::new(seed);
    let t64 = t as u64;
    for i in 0..ops {
        let (off, len) = if rng.chance(65) {
            let block = rng.below(REGION_A / 4096 / WRITERS) * WRITERS + t64;
            let start = block * 4096;
            let off = start + rng.below(4096);
            let len = rng.range(1, start + 4096 - off + 1);
            let data = rng.bytes(len as usize);
            f.write_all_at(&data, off)
                .unwrap_or_else(|e| panic!("writer {t} op {i}: pwrite {len} at {off:#x}: {e}"));
            local[off as usize..(off + len) as usize].copy_from_slice(&data);
            (off, len)
        } else {
            let cs = REGION_A + t64 * CHUNK_B;
            let ce = cs + CHUNK_B;
            let off = rng.range(cs, ce);
            let len = rng.range(1, (ce - off).min(200 * K) + 1);
            let r = &mut local[off as usize..(off + len) as usize];
            match rng.below(10) {
                0..6 => {
                    let data = rng.bytes(len as usize);
                    f.write_all_at(&data, off).unwrap_or_else(|e| {
                        panic!("writer {t} op {i}: pwrite {len} at {off:#x}: {e}")
                    });
                    r.copy_from_slice(&data);
                }
                6..8 => {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    fallocate(&f, mode, off, len).unwrap_or_else(|e| {
                        panic!("writer {t} op {i}: punch {len} at {off:#x}: {e}")
                    });
                    r.fill(0);
                }
                _ => {
                    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len).unwrap_or_else(|e| {
                        panic!("writer {t} op {i}: zero range {len} at {off:#x}: {e}")
                    });
                    r.fill(0);
                }
            }
            (off, len)
        };
        let mut back = vec![0u8; len as usize];
        f.read_exact_at(&mut back, off).unwrap();
        if let Some(d) = first_difference(&local[off as usize..(off + len) as usize], &back) {
            panic!("writer {t} op {i}: reading back {len} bytes at {off:#x}: {d}");
        }
        if rng.chance(3) {
            f.sync_all()
                .unwrap_or_else(|e| panic!("writer {t} op {i}: fsync: {e}"));
        }
    }
    local
}

/// A reader: O_DIRECT reads of region C (never written) must keep QEMU's content while
/// the writers run; plain reads anywhere add load.
fn reader(path: PathBuf, initial: Arc<Vec<u8>>, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let direct = open_direct(&path).unwrap();
    let plain = File::open(&path).unwrap();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let off = REGION_C + rng.below((CONC_SIZE - REGION_C) / 4096) * 4096;
        let len = (rng.range(1, 65) * 4096).min(CONC_SIZE - off) as usize;
        let got = read_direct_at(&direct, off, len).unwrap();
        if let Some(d) = first_difference(&initial[off as usize..off as usize + len], &got) {
            panic!("reader: region C at {off:#x} (+{len}) changed while others wrote: {d}");
        }
        let mut buf = vec![0u8; rng.range(1, 300 * K) as usize];
        let _ = plain.read_at(&mut buf, rng.below(CONC_SIZE)).unwrap();
        n += 1;
    }
    n
}

fn concurrency(name: &str, top_opts: &str, mount_opts: &[&str], foreground: bool) {
    let tmp = tempdir();
    let dir = tmp.path();
    let base = create_base(
        dir,
        CONC_SIZE,
        &[wp(0x5b, 0, 3 * M), wp(0x5c, 5 * M, 3 * M)],
    );
    let top = create_over_base(dir, "top.qcow2", CONC_SIZE, top_opts);
    qemu_io(
        &top,
        &[
            wp(0x21, M, M),
            format!("write -z {} {}", 2 * M + 32 * K, 64 * K),
            wp(0x22, 7 * M + 4096, 512 * K),
        ],
    );
    qemu_img(dir, &["snapshot", "-c", "snap1", "top.qcow2"]);
    qemu_io(
        &top,
        &[
            wp(0x23, 6 * M + 100 * K, 300 * K),
            wp(0x24, 300 * K, 200 * K),
        ],
    );
    let frozen = Frozen::record(&top, &[&base]);
    let initial = Arc::new(qemu_raw(&top));
    let mnt = mountpoint(dir, "mnt");
    let mut options = vec!["rw"];
    options.extend_from_slice(mount_opts);
    let m = if foreground {
        Mount::foreground(&top, &mnt, &options)
    } else {
        Mount::new(&top, &mnt, &options)
    };
    let path = m.disk();
    let stop = Arc::new(AtomicBool::new(false));
    let seed = fnv(name);
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (p, i, s) = (path.clone(), initial.clone(), stop.clone());
            std::thread::spawn(move || reader(p, i, s, seed ^ (100 + r)))
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS as usize)
        .map(|t| {
            let (p, i) = (path.clone(), initial.clone());
            std::thread::spawn(move || writer(p, t, i, seed ^ t as u64, 300))
        })
        .collect();
    let results: Vec<_> = writers.into_iter().map(|h| h.join()).collect();
    stop.store(true, Ordering::Relaxed);
    let reads: Vec<_> = readers.into_iter().map(|h| h.join()).collect();
    let mut locals = Vec::new();
    for r in results {
        match r {
            Ok(l) => locals.push(l),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    for r in reads {
        match r {
            Ok(n) => assert!(n > 0, "a reader did not get to read"),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    let model: Vec<u8> = (0..CONC_SIZE as usize)
        .map(|i| match owner(i as u64) {
            Some(t) => locals[t][i],
            None => initial[i],
        })
        .collect();
    let no_history = |_| "(concurrent writers: see the writer seeds)".to_string();
    assert_model(
        &format!("{name}: read through the mount"),
        &model,
        &read_cached(&path),
        no_history,
    );
    assert_model(
        &format!("{name}: read through the mount with O_DIRECT"),
        &model,
        &read_direct(&path, 1 << 20),
        no_history,
    );
    frozen.assert_snapshot_files(&m.mountpoint);
    m.umount();
    assert_check_clean(&top);
    assert_model(
        &format!("{name}: qemu-img convert after unmount"),
        &model,
        &qemu_raw(&top),
        no_history,
    );
    frozen.assert_unchanged();
}

#[test]
fn concurrent_writers_and_readers() {
    concurrency("concurrent_default_threads", "", &[], false);
}

#[test]
fn concurrent_writers_and_readers_threads_1_foreground() {
    concurrency("concurrent_threads_1", "", &["threads=1"], true);
}

#[test]
fn concurrent_writers_and_readers_extended_l2() {
    concurrency(
        "concurrent_extended_l2",
        "extended_l2=on,cluster_size=128k",
        &["threads=8", "cache_size=64k"],
        false,
    );
}

// ---------------------------------------------------------------------------------------
// ext4 through a loop device on the mount
// ---------------------------------------------------------------------------------------

/// A tree of `n` small files in 20 directories plus a few large ones; returns the
/// relative paths and contents.
fn make_tree(root: &Path, n: usize, rng: &mut Rng) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..n {
        let rel = format!("d{:02}/f{i:05}", i % 20);
        let len = match i % 10 {
            0 => 0,
            1..5 => rng.range(1, 512),
            _ => rng.range(512, 4000),
        };
        files.insert(rel, rng.bytes(len as usize));
    }
    for i in 0..4 {
        let len = rng.range(400 * K, 1100 * K) as usize;
        files.insert(format!("big/b{i}"), rng.bytes(len));
    }
    write_tree(root, &files);
    files
}

fn e2fsck(target: &Path) {
    let out = run_timeout(
        Command::new("e2fsck").arg("-fn").arg(target),
        Duration::from_secs(120),
    );
    assert!(
        out.success(),
        "e2fsck -fn {}: {}",
        target.display(),
        out.describe()
    );
}

#[test]
fn ext4_made_filled_and_checked_through_a_loop_device() {
    let tmp = tempdir();
    let dir = tmp.path();
    let image = create_image(dir, "guest.qcow2", Some(64 * M), "", None);
    let mnt = mountpoint(dir, "mnt");
    let guest = mountpoint(dir, "guest");
    let src = mountpoint(dir, "src");
    let mut rng = Rng::new(fnv("ext4"));
    let mut files = make_tree(&src, 2500, &mut rng);

    let m = Mount::new(&image, &mnt, &["rw"]);
    let lo = LoopDev::attach(&m.disk());
    // mkfs discards the whole device: hole punching through the loop driver.
    run_timeout(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0"])
            .arg(&lo.dev),
        Duration::from_secs(120),
    )
    .expect_success();
    let g = PlainMount::new(&lo.dev, &guest, "discard");
    run_timeout(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&guest),
        Duration::from_secs(120),
    )
    .expect_success();
    // Deleting with -o discard punches holes again.
    let doomed: Vec<String> = files
        .keys()
        .filter(|k| k.ends_with('3') || k.as_str() == "big/b1")
        .cloned()
        .collect();
    for k in &doomed {
        fs::remove_file(guest.join(k)).unwrap();
        files.remove(k);
    }
    run_timeout(&mut Command::new("sync"), Duration::from_secs(120)).expect_success();
    assert_same_tree(
        "the guest filesystem while mounted",
        &files,
        &read_tree(&guest),
    );
    g.unmount();
    lo.detach();
    e2fsck(&m.disk());
    m.umount();

    assert_check_clean(&image);
    let raw = dir.join("guest.raw");
    fs::write(&raw, qemu_raw(&image)).unwrap();
    e2fsck(&raw);
    let lo = LoopDev::attach(&raw);
    let g = PlainMount::new(&lo.dev, &guest, "ro,noload");
    assert_same_tree(
        "the guest filesystem in QEMU's rendering",
        &files,
        &read_tree(&guest),
    );
    g.unmount();
    lo.detach();
}
