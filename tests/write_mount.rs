//! Read-write mounts (`qcow2fs mount -o rw`) through the kernel, checked against QEMU.
//!
//! - random unaligned writes, hole punching, zero ranges and growing truncates on images of
//!   every kind, with a raw model receiving the same operations; afterwards the image must
//!   pass `qemu-img check` without errors or leaks, `qemu-img convert -O raw` must equal the
//!   model, every snapshot and every backing file must be unchanged;
//! - concurrent writers (overlapping clusters, disjoint bytes) and readers;
//! - an ext4 filesystem made, filled and checked through a loop device on the mount;
//! - `kill -9` of the daemon in the middle of fsync'd writes: no corruption, every fsync'd
//!   block intact, dirty lazy-refcount images repaired by the next read-write mount;
//! - QEMU's image locks in both directions; corrupt, dirty, bitmap and autoclear rules;
//!   file modes, EROFS, refused shrinking and ENOSPC past the end.
//!
//! Every mount is held by a guard ([`rw::RwMount`]) that unmounts on drop, also when a
//! test panics. Expected contents come from the operations the tests performed and from
//! QEMU's renderings, never from qcow2fs.

#[allow(unused_macros)]
mod common;
#[path = "common/rw.rs"]
mod rw;

use rw::*;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Building images with qemu-img and qemu-io
// ---------------------------------------------------------------------------------------

/// `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] NAME SIZE` in `dir`.
fn create(dir: &Path, name: &str, size: u64, opts: &str, backing: Option<(&str, &str)>) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((b, fmt)) = backing {
        args.extend(["-b", b, "-F", fmt]);
    }
    let size = size.to_string();
    args.extend([name, &size]);
    img(dir, &args);
    dir.join(name)
}

/// A raw file `name` of `size` bytes written by qemu-io with a few patterns.
fn create_raw(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    img(dir, &["create", "-q", "-f", "raw", name, &size.to_string()]);
    io_with(
        &p,
        &["-f", "raw"],
        &[
            format!("write -P 0x71 0 {}", size / 2),
            format!("write -P 0x72 {} {}", size / 2 + 4096, size / 4),
        ],
    );
    p
}

fn w(pattern: u8, off: u64, len: u64) -> String {
    format!("write -P {pattern:#x} {off} {len}")
}

/// Data, zero clusters and a tail cluster written by QEMU, spread over the disk.
fn populate(image: &Path, size: u64, cluster: u64) {
    let c = cluster.max(4096);
    io(
        image,
        &[
            w(0x11, 0, size / 4),
            w(0x22, size / 2 + c / 2, (2 * c).min(size / 8)),
            format!("write -z {} {}", size / 4 + c, 2 * c),
            w(0x33, size - c, c),
        ],
    );
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
    io(image, &cmds);
    let map = run_in(
        &dir_of(image),
        "qemu-img",
        &["map", "--output=json", image.to_str().unwrap()],
    )
    .expect_ok();
    assert!(
        map.stdout.contains("\"compressed\": true"),
        "the test image has no compressed clusters: {}",
        map.stdout
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

#[derive(Default)]
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

fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Mount rw, run the random workload, verify through the mount, unmount, then check with
/// QEMU; then a second, shorter round on the image qcow2fs wrote.
fn write_scenario(name: &str, build: impl FnOnce(&Path) -> Built, extra: Extra) {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let b = build(dir);
    let frozen = Frozen::record(
        &b.image,
        &b.backing.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let table_before = header_u32(&b.image, 56);
    let mnt = mountpoint(dir, "mnt");
    let mut options = vec!["rw"];
    options.extend_from_slice(extra.options);
    let mut rng = Rng::new(seed_of(name));
    let mut model = qemu_render(&b.image, None);
    for round in 0..2 {
        let m = RwMount::mount(&b.image, &mnt, &options);
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
        frozen.assert_snapshot_files(&m.mnt);
        model = std::mem::take(&mut disk.model);
        let log = std::mem::take(&mut disk.log);
        drop(disk);
        m.umount();
        assert_check_clean(&b.image);
        let got = qemu_render(&b.image, None);
        assert_model(
            &format!("{name} round {round}: qemu-img convert -O raw after unmount"),
            &model,
            &got,
            |at| history(&log, at),
        );
        assert_eq!(
            info(&b.image, false)["virtual-size"].as_u64(),
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
                info(&b.image, false)["format-specific"]["data"]["data-file-raw"].as_bool(),
                Some(true),
                "{name}: data-file-raw was dropped, the data file no longer a raw image"
            );
            let mut bytes = fs::read(dir.join(data)).unwrap();
            bytes.resize(bytes.len().max(model.len()), 0);
            if let Some(d) = common::first_difference(&model, &bytes[..model.len()]) {
                panic!("{name}: the raw external data file does not hold the disk's bytes: {d}");
            }
        }
        frozen.assert_unchanged();
    }
    if extra.refcount_table_grows {
        let after = header_u32(&b.image, 56);
        assert!(
            after > table_before,
            "test setup: the refcount table did not grow ({table_before} -> {after} clusters)"
        );
    }
    // QEMU can go on writing the image qcow2fs wrote.
    io(&b.image, &[w(0x99, 4096, 8192)]);
    assert_check_clean(&b.image);
}

fn simple(size: u64, opts: &'static str, cluster: u64) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let image = create(dir, "img.qcow2", size, opts, None);
        populate(&image, size, cluster);
        Built {
            image,
            backing: vec![],
            cluster,
        }
    }
}

fn with_snapshots(
    size: u64,
    opts: &'static str,
    cluster: u64,
    n: usize,
) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let image = create(dir, "img.qcow2", size, opts, None);
        populate(&image, size, cluster);
        for i in 0..n {
            img(
                dir,
                &["snapshot", "-c", &format!("s{}", i + 1), "img.qcow2"],
            );
            io(
                &image,
                &[
                    w(0x50 + i as u8, (i as u64 + 1) * size / 8 + 1024, size / 5),
                    format!("write -z {} {}", size / 2 + i as u64 * cluster, cluster),
                ],
            );
        }
        Built {
            image,
            backing: vec![],
            cluster,
        }
    }
}

/// A qcow2 image over a qcow2 base that has data almost everywhere.
fn over_backing(size: u64, opts: &'static str, cluster: u64) -> impl FnOnce(&Path) -> Built {
    move |dir: &Path| {
        let base = create(dir, "base.qcow2", size, "", None);
        io(
            &base,
            &[w(0x5b, 0, size - 64 * K), w(0x5c, size - 32 * K, 32 * K)],
        );
        let image = create(dir, "img.qcow2", size, opts, Some(("base.qcow2", "qcow2")));
        populate(&image, size, cluster);
        Built {
            image,
            backing: vec![base],
            cluster,
        }
    }
}

macro_rules! scenario {
    ($name:ident, $build:expr) => {
        scenario!($name, $build, Extra::default());
    };
    ($name:ident, $build:expr, $extra:expr) => {
        #[test]
        fn $name() {
            write_scenario(stringify!($name), $build, $extra);
        }
    };
}

scenario!(
    writes_64k_clusters,
    simple(6 * M, "", 64 * K),
    Extra {
        grow_eighths: &[10, 13],
        ..Default::default()
    }
);
scenario!(
    writes_512_byte_clusters_refcount_table_growth_small_cache,
    simple(4 * M, "cluster_size=512,refcount_bits=64", 512),
    Extra {
        options: &["cache_size=1k"],
        refcount_table_grows: true,
        grow_eighths: &[9],
        ops: Some(60),
        ..Default::default()
    }
);
scenario!(
    writes_512_byte_clusters,
    simple(3 * M, "cluster_size=512", 512)
);
scenario!(
    writes_2m_clusters,
    simple(8 * M, "cluster_size=2M", 2 * M),
    Extra {
        grow_eighths: &[11],
        ..Default::default()
    }
);
scenario!(
    writes_refcount_bits_1,
    simple(4 * M, "refcount_bits=1", 64 * K)
);
scenario!(
    writes_refcount_bits_2_with_snapshot,
    with_snapshots(4 * M, "refcount_bits=2", 64 * K, 1)
);
scenario!(
    writes_refcount_bits_8_with_snapshot,
    with_snapshots(4 * M, "refcount_bits=8", 64 * K, 1)
);
scenario!(
    writes_refcount_bits_64,
    simple(4 * M, "refcount_bits=64", 64 * K)
);
scenario!(
    writes_v2_image,
    simple(4 * M, "compat=0.10", 64 * K),
    Extra {
        grow_eighths: &[12],
        ..Default::default()
    }
);
scenario!(
    writes_v2_image_over_backing,
    over_backing(4 * M, "compat=0.10", 64 * K)
);
scenario!(writes_extended_l2, simple(4 * M, "extended_l2=on", 64 * K));
scenario!(
    writes_extended_l2_over_backing,
    over_backing(4 * M, "extended_l2=on", 64 * K),
    Extra {
        grow_eighths: &[10],
        ..Default::default()
    }
);
scenario!(
    writes_extended_l2_32k_clusters_over_backing,
    over_backing(4 * M, "extended_l2=on,cluster_size=32k", 32 * K)
);
scenario!(
    writes_over_zstd_compressed_clusters,
    |dir: &Path| {
        let image = create(dir, "img.qcow2", 4 * M, "compression_type=zstd", None);
        compressed_clusters(&image, M + 256 * K, 64 * K, 12);
        populate(&image, 4 * M, 64 * K);
        Built {
            image,
            backing: vec![],
            cluster: 64 * K,
        }
    },
    Extra {
        ops: Some(90),
        ..Default::default()
    }
);
scenario!(
    writes_over_zlib_compressed_clusters_with_snapshot,
    |dir: &Path| {
        let image = create(dir, "img.qcow2", 4 * M, "", None);
        compressed_clusters(&image, M + 256 * K, 64 * K, 12);
        compressed_clusters(&image, 3 * M, 64 * K, 4);
        populate(&image, 4 * M, 64 * K);
        img(dir, &["snapshot", "-c", "after-compress", "img.qcow2"]);
        Built {
            image,
            backing: vec![],
            cluster: 64 * K,
        }
    },
    Extra {
        ops: Some(90),
        ..Default::default()
    }
);
scenario!(
    writes_with_two_internal_snapshots,
    with_snapshots(6 * M, "", 64 * K, 2),
    Extra {
        grow_eighths: &[11],
        ..Default::default()
    }
);
scenario!(
    writes_over_backing_chain_qcow2_and_raw,
    |dir: &Path| {
        let base = create_raw(dir, "base.raw", 6 * M);
        let mid = create(dir, "mid.qcow2", 6 * M, "", Some(("base.raw", "raw")));
        io(
            &mid,
            &[
                w(0x61, 512 * K, M),
                w(0x62, 4 * M, 300 * K),
                format!("write -z {} {}", 2 * M, 256 * K),
            ],
        );
        let image = create(dir, "img.qcow2", 6 * M, "", Some(("mid.qcow2", "qcow2")));
        populate(&image, 6 * M, 64 * K);
        Built {
            image,
            backing: vec![base, mid],
            cluster: 64 * K,
        }
    },
    Extra {
        grow_eighths: &[10],
        ..Default::default()
    }
);
scenario!(
    grow_over_larger_backing_file_reads_zeros,
    |dir: &Path| {
        let base = create(dir, "base.qcow2", 8 * M, "", None);
        io(&base, &[w(0x5b, 0, 8 * M)]);
        let image = create(dir, "img.qcow2", 4 * M, "", Some(("base.qcow2", "qcow2")));
        io(&image, &[w(0x21, 100 * K, 200 * K)]);
        Built {
            image,
            backing: vec![base],
            cluster: 64 * K,
        }
    },
    Extra {
        // 4 MiB -> 5 MiB + 512 -> 12 MiB: the base has data up to 8 MiB.
        grow_eighths: &[10, 24],
        ..Default::default()
    }
);
scenario!(
    writes_preallocation_metadata,
    simple(4 * M, "preallocation=metadata", 64 * K)
);
scenario!(
    writes_preallocation_falloc,
    simple(4 * M, "preallocation=falloc", 64 * K)
);
scenario!(
    writes_preallocation_full,
    simple(4 * M, "preallocation=full", 64 * K),
    Extra {
        grow_eighths: &[10],
        ..Default::default()
    }
);
scenario!(
    writes_external_data_file,
    simple(4 * M, "data_file=img.data", 64 * K),
    Extra {
        grow_eighths: &[10],
        ..Default::default()
    }
);
scenario!(
    writes_external_raw_data_file,
    simple(4 * M, "data_file=img.data,data_file_raw=on", 64 * K),
    Extra {
        raw_data_file: Some("img.data"),
        grow_eighths: &[10],
        ..Default::default()
    }
);
scenario!(
    writes_lazy_refcounts,
    with_snapshots(4 * M, "lazy_refcounts=on", 64 * K, 1),
    Extra {
        lazy: true,
        ..Default::default()
    }
);

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
        if let Some(d) = common::first_difference(&local[off as usize..(off + len) as usize], &back)
        {
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
        if let Some(d) = common::first_difference(&initial[off as usize..off as usize + len], &got)
        {
            panic!("reader: region C at {off:#x} (+{len}) changed while others wrote: {d}");
        }
        let mut buf = vec![0u8; rng.range(1, 300 * K) as usize];
        let _ = plain.read_at(&mut buf, rng.below(CONC_SIZE)).unwrap();
        n += 1;
    }
    n
}

fn concurrency(name: &str, top_opts: &str, mount_opts: &[&str], foreground: bool) {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let base = create(dir, "base.qcow2", CONC_SIZE, "", None);
    io(&base, &[w(0x5b, 0, 3 * M), w(0x5c, 5 * M, 3 * M)]);
    let top = create(
        dir,
        "top.qcow2",
        CONC_SIZE,
        top_opts,
        Some(("base.qcow2", "qcow2")),
    );
    io(
        &top,
        &[
            w(0x21, M, M),
            format!("write -z {} {}", 2 * M + 32 * K, 64 * K),
            w(0x22, 7 * M + 4096, 512 * K),
        ],
    );
    img(dir, &["snapshot", "-c", "snap1", "top.qcow2"]);
    io(
        &top,
        &[w(0x23, 6 * M + 100 * K, 300 * K), w(0x24, 300 * K, 200 * K)],
    );
    let frozen = Frozen::record(&top, &[&base]);
    let initial = Arc::new(qemu_render(&top, None));
    let mnt = mountpoint(dir, "mnt");
    let mut options = vec!["rw"];
    options.extend_from_slice(mount_opts);
    let m = if foreground {
        RwMount::mount_foreground(&top, &mnt, &options)
    } else {
        RwMount::mount(&top, &mnt, &options)
    };
    let path = m.disk();
    let stop = Arc::new(AtomicBool::new(false));
    let seed = seed_of(name);
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
        &read_direct(&path),
        no_history,
    );
    frozen.assert_snapshot_files(&m.mnt);
    m.umount();
    assert_check_clean(&top);
    assert_model(
        &format!("{name}: qemu-img convert after unmount"),
        &model,
        &qemu_render(&top, None),
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
    for (rel, data) in &files {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }
    files
}

fn assert_same_tree(
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
        if let Some(d) = common::first_difference(v, &got[k]) {
            panic!("{what}: file {k}: {d}");
        }
    }
}

fn e2fsck(target: &Path) {
    let out = run_limited(
        Command::new("e2fsck").arg("-fn").arg(target),
        Duration::from_secs(120),
    );
    assert!(
        out.ok(),
        "e2fsck -fn {}: {}",
        target.display(),
        out.describe()
    );
}

#[test]
fn ext4_made_filled_and_checked_through_a_loop_device() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let image = create(dir, "guest.qcow2", 64 * M, "", None);
    let mnt = mountpoint(dir, "mnt");
    let guest = mountpoint(dir, "guest");
    let src = mountpoint(dir, "src");
    let mut rng = Rng::new(seed_of("ext4"));
    let mut files = make_tree(&src, 2500, &mut rng);

    let m = RwMount::mount(&image, &mnt, &["rw"]);
    let lo = LoopDev::attach(&m.disk());
    // mkfs discards the whole device: hole punching through the loop driver.
    run_limited(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0"])
            .arg(&lo.dev),
        Duration::from_secs(120),
    )
    .expect_ok();
    let g = PlainMount::new(&lo.dev, &guest, "discard");
    run_limited(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&guest),
        Duration::from_secs(120),
    )
    .expect_ok();
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
    run_limited(&mut Command::new("sync"), Duration::from_secs(120)).expect_ok();
    assert_same_tree(
        "the guest filesystem while mounted",
        &files,
        &common::read_tree(&guest),
    );
    g.unmount();
    lo.detach();
    e2fsck(&m.disk());
    m.umount();

    assert_check_clean(&image);
    let raw = dir.join("guest.raw");
    fs::write(&raw, qemu_render(&image, None)).unwrap();
    e2fsck(&raw);
    let lo = LoopDev::attach(&raw);
    let g = PlainMount::new(&lo.dev, &guest, "ro,noload");
    assert_same_tree(
        "the guest filesystem in QEMU's rendering",
        &files,
        &common::read_tree(&guest),
    );
    g.unmount();
    lo.detach();
}

// ---------------------------------------------------------------------------------------
// kill -9 in the middle of fsync'd writes
// ---------------------------------------------------------------------------------------

/// Granularity of the crash checks: a sector holds one of the states it went through.
const SECTOR: u64 = 512;

/// One step of the crash workload, logged by the writer before it is issued.
enum Step {
    /// `data` written at `off` (zeros for a punched or zeroed range); `what` names it.
    Data {
        off: u64,
        data: Vec<u8>,
        what: &'static str,
    },
    /// An fsync that returned success: every step logged before it is durable.
    Synced,
}

/// Writes, punches and zero ranges on `path` until an operation fails (the daemon was
/// killed) or `max_ops` are done; about one operation in eight is followed by fsync.
/// Every step is logged before it is issued and every completed fsync after it returns.
/// Returns the error that stopped it.
fn crash_writer(
    path: PathBuf,
    seed: u64,
    cluster: u64,
    log: Arc<Mutex<Vec<Step>>>,
    synced: Arc<AtomicUsize>,
    max_ops: usize,
) -> Option<std::io::Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {} read-write: {e}", path.display()));
    let size = f.metadata().unwrap().len();
    let mut rng = Rng::new(seed);
    for _ in 0..max_ops {
        let (off, len, what) = match rng.below(100) {
            0..45 => {
                let len = rng.range(1, 5) * 4096;
                (rng.below((size - len) / 4096) * 4096, len, "write")
            }
            45..70 => {
                let len = rng.range(1, 5000);
                (rng.below(size - len), len, "write")
            }
            // Across cluster boundaries.
            70..85 => {
                let len = rng.range(cluster, 3 * cluster);
                (rng.below(size - len), len, "write")
            }
            85..93 => {
                let len = rng.range(1, 3 * cluster);
                (rng.below(size - len), len, "punch")
            }
            _ => {
                let len = rng.range(1, 3 * cluster);
                (rng.below(size - len), len, "zero range")
            }
        };
        let data = if what == "write" {
            rng.bytes(len as usize)
        } else {
            vec![0; len as usize]
        };
        log.lock().unwrap().push(Step::Data {
            off,
            data: data.clone(),
            what,
        });
        let r = match what {
            "write" => f.write_all_at(&data, off),
            "punch" => fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ),
            _ => fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len),
        };
        if let Err(e) = r {
            return Some(e);
        }
        if rng.chance(12) {
            if let Err(e) = f.sync_all() {
                return Some(e);
            }
            log.lock().unwrap().push(Step::Synced);
            synced.fetch_add(1, Ordering::SeqCst);
        }
    }
    None
}

/// What a crash may leave: `durable` is the disk after every step before the last
/// completed fsync; `later` the steps after it, each of which may or may not have reached
/// the image.
struct CrashModel {
    durable: Vec<u8>,
    later: Vec<Step>,
    fsyncs: usize,
}

impl CrashModel {
    fn new(before: Vec<u8>, log: Vec<Step>) -> CrashModel {
        let last = log.iter().rposition(|s| matches!(s, Step::Synced));
        let fsyncs = log.iter().filter(|s| matches!(s, Step::Synced)).count();
        let mut durable = before;
        let mut later = Vec::new();
        for (i, s) in log.into_iter().enumerate() {
            if last.is_some_and(|l| i < l) {
                if let Step::Data { off, data, .. } = &s {
                    durable[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                }
            } else if matches!(s, Step::Data { .. }) {
                later.push(s);
            }
        }
        CrashModel {
            durable,
            later,
            fsyncs,
        }
    }

    /// Every sector of `got` must hold a state it went through: a sector no step after the
    /// last fsync touched holds exactly its fsync'd bytes; a touched one its fsync'd bytes
    /// or its bytes after one of the later steps.
    fn assert_consistent(&self, what: &str, got: &[u8]) {
        assert_eq!(
            got.len(),
            self.durable.len(),
            "{what}: the disk size changed"
        );
        let mut states: BTreeMap<u64, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
        let mut cur = self.durable.clone();
        for (k, s) in self.later.iter().enumerate() {
            let Step::Data { off, data, .. } = s else {
                continue;
            };
            cur[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            for sector in off / SECTOR..(off + data.len() as u64).div_ceil(SECTOR) {
                let r = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
                states
                    .entry(sector)
                    .or_default()
                    .push((k + 1, cur[r].to_vec()));
            }
        }
        for sector in 0..got.len() as u64 / SECTOR {
            let r = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
            let want = &self.durable[r.clone()];
            if got[r.clone()] == *want {
                continue;
            }
            let Some(list) = states.get(&sector) else {
                let d = common::first_difference(want, &got[r]).unwrap();
                panic!(
                    "{what}: sector {sector} (byte {:#x}), written and fsync'd before the \
                     kill and not touched after, changed: {d}",
                    sector * SECTOR
                );
            };
            if !list.iter().any(|(_, v)| got[r.clone()] == **v) {
                let steps: Vec<String> = list
                    .iter()
                    .map(|(k, _)| match &self.later[k - 1] {
                        Step::Data { off, data, what } => {
                            format!("#{k} {what} {} at {off:#x}", data.len())
                        }
                        Step::Synced => unreachable!(),
                    })
                    .collect();
                panic!(
                    "{what}: sector {sector} (byte {:#x}) holds neither its fsync'd bytes nor \
                     the bytes of any later step touching it ({}); first difference from the \
                     fsync'd bytes: {}",
                    sector * SECTOR,
                    steps.join(", "),
                    common::first_difference(want, &got[r]).unwrap()
                );
            }
        }
    }
}

/// One crash: mount rw, run [`crash_writer`], SIGKILL the daemon once `fsyncs` fsyncs
/// have returned and a few milliseconds more have passed (the writer still writing),
/// remove the dead mount. Returns the model of what the image may now hold, and the
/// mount's stderr.
fn write_and_kill(
    image: &Path,
    mnt: &Path,
    options: &[&str],
    before: Vec<u8>,
    seed: u64,
    cluster: u64,
) -> (CrashModel, String) {
    let m = RwMount::mount(image, mnt, options);
    let stderr = m.stderr.clone();
    let log = Arc::new(Mutex::new(Vec::new()));
    let synced = Arc::new(AtomicUsize::new(0));
    let mut rng = Rng::new(seed ^ 0xc4a5);
    let fsyncs = rng.range(2, 8) as usize;
    let linger = Duration::from_millis(rng.below(30));
    let writer = {
        let (path, log, synced) = (m.disk(), log.clone(), synced.clone());
        std::thread::spawn(move || crash_writer(path, seed, cluster, log, synced, 20_000))
    };
    let reached = common::wait_until(Duration::from_secs(60), || {
        synced.load(Ordering::SeqCst) >= fsyncs || writer.is_finished()
    });
    std::thread::sleep(linger);
    let running = !writer.is_finished();
    m.kill9();
    let stopped = match writer.join() {
        Ok(e) => e,
        Err(p) => std::panic::resume_unwind(p),
    };
    assert!(
        reached && running,
        "the writer stopped before the kill ({stopped:?}) or made no {fsyncs} fsyncs in 60 s"
    );
    let e = stopped.expect("the writer finished every operation although the daemon was killed");
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::EIO)
        ),
        "after the kill, the writer's operation failed with an unexpected error: {e}"
    );
    let log = std::mem::take(&mut *log.lock().unwrap());
    (CrashModel::new(before, log), stderr)
}

/// The image that crash tests write: `size` bytes with data everywhere QEMU put it.
fn crash_image(dir: &Path, size: u64, opts: &str, cluster: u64) -> PathBuf {
    let image = create(dir, "img.qcow2", size, opts, None);
    populate(&image, size, cluster);
    image
}

/// Rounds of write-and-kill on one image; after each kill `qemu-img check` finds no
/// corruption (leaks allowed) and QEMU's rendering holds every fsync'd block. With lazy
/// refcounts the image is dirty after a kill instead, and the next read-write mount
/// rebuilds it (saying so); the last one unmounts cleanly and the check is clean.
fn crash_rounds(name: &str, image: &Path, options: &[&str], cluster: u64, lazy: bool) {
    let dir = dir_of(image);
    let mnt = mountpoint(&dir, "mnt");
    let snapshots: Vec<(String, Vec<u8>)> = snapshot_list(image)
        .into_iter()
        .map(|(_, n)| {
            let data = qemu_render_snapshot_named(image, &n);
            (n, data)
        })
        .collect();
    let mut model = qemu_render(image, None);
    let mut options = options.to_vec();
    options.insert(0, "rw");
    for round in 0..3u64 {
        let seed = seed_of(name) ^ round.wrapping_mul(0x9e37_79b9);
        let (crash, stderr) = write_and_kill(image, &mnt, &options, model, seed, cluster);
        let what = format!(
            "{name} round {round} (seed {seed:#x}, {} fsyncs)",
            crash.fsyncs
        );
        if lazy && round > 0 {
            assert!(
                stderr.contains("rebuilding its refcounts"),
                "{what}: the read-write mount of the dirty image did not say it rebuilt the \
                 refcounts; stderr: {stderr:?}"
            );
        }
        if lazy {
            assert!(
                dirty_flag(image),
                "{what}: a lazy_refcounts image written and killed must be left dirty"
            );
        } else {
            assert_no_corruption(image);
        }
        let got = qemu_render(image, None);
        crash.assert_consistent(&format!("{what}: qemu-img convert after the kill"), &got);
        for (n, data) in &snapshots {
            let now = qemu_render_snapshot_named(image, n);
            if let Some(d) = common::first_difference(data, &now) {
                panic!("{what}: snapshot {n} changed: {d}");
            }
        }
        model = got;
    }
    // A clean mount of the crashed image: it must read what QEMU reads, and leave an
    // image QEMU finds consistent.
    let m = RwMount::mount(image, &mnt, &options);
    if lazy {
        assert!(
            m.stderr.contains("not closed cleanly") && m.stderr.contains("rebuilding"),
            "{name}: mounting the dirty image rw did not report the rebuild: {:?}",
            m.stderr
        );
    }
    let mut disk = Disk::open(&m.disk(), model);
    disk.write(
        cluster / 2,
        &Rng::new(seed_of(name)).bytes(3 * cluster as usize),
    );
    disk.fsync();
    disk.verify_through_mount();
    let model = std::mem::take(&mut disk.model);
    drop(disk);
    m.umount();
    if lazy {
        assert!(
            !dirty_flag(image),
            "{name}: still dirty after a clean unmount"
        );
        assert_check_clean(image);
    } else {
        assert_no_corruption(image);
    }
    assert_model(
        &format!("{name}: qemu-img convert after the last clean unmount"),
        &model,
        &qemu_render(image, None),
        |_| String::new(),
    );
    // QEMU can go on writing it.
    io(image, &[w(0x99, 4096, 8192)]);
    assert_no_corruption(image);
}

#[test]
fn kill9_mid_workload_small_clusters_small_cache() {
    let tmp = common::tempdir();
    // 4 KiB clusters and a cache of four L2 tables for eight: tables are written back
    // (evicted) at random moments of the workload.
    let image = crash_image(tmp.path(), 16 * M, "cluster_size=4k", 4 * K);
    crash_rounds(
        "kill9_small_clusters",
        &image,
        &["cache_size=8k"],
        4 * K,
        false,
    );
}

#[test]
fn kill9_mid_workload_lazy_refcounts_rebuilt_by_next_mount() {
    let tmp = common::tempdir();
    let image = crash_image(tmp.path(), 8 * M, "lazy_refcounts=on", 64 * K);
    crash_rounds("kill9_lazy_refcounts", &image, &[], 64 * K, true);
}

#[test]
fn kill9_mid_workload_internal_snapshot_unchanged() {
    let tmp = common::tempdir();
    let image = crash_image(tmp.path(), 8 * M, "", 64 * K);
    img(tmp.path(), &["snapshot", "-c", "before", "img.qcow2"]);
    io(&image, &[w(0x77, 2 * M + 512, 700 * K)]);
    crash_rounds("kill9_snapshot", &image, &[], 64 * K, false);
}

// ---------------------------------------------------------------------------------------
// QEMU's image locks, both directions
// ---------------------------------------------------------------------------------------

/// `qemu-img ARGS` (run in the image's directory) whatever its status.
fn qemu_img_out(image: &Path, args: &[&str]) -> Out {
    run_in(&dir_of(image), "qemu-img", args)
}

/// `qemu-io [-f qcow2] -c CMD IMAGE` whatever its status.
fn qemu_io_out(image: &Path, extra: &[&str], cmd: &str) -> Out {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-c", cmd, image.to_str().unwrap()]);
    run_in(&dir_of(image), "qemu-io", &args)
}

/// QEMU refused to open the image because of a lock: a failure naming `lock`.
fn assert_lock_refused(out: &Out, lock: &str) {
    assert!(
        !out.ok() && out.all_output().contains(lock),
        "expected QEMU to fail with {lock:?}: {}",
        out.describe()
    );
}

/// qemu-io wrote (it exits 0 even when a command fails, so its output is checked).
fn assert_qemu_io_wrote(out: &Out) {
    assert!(
        out.ok() && out.stdout.contains("wrote") && !out.all_output().contains("lock"),
        "expected qemu-io to write: {}",
        out.describe()
    );
}

fn lock_image(dir: &Path) -> PathBuf {
    let image = create(dir, "img.qcow2", 4 * M, "", None);
    io(&image, &[w(0x3c, 0, 256 * K)]);
    image
}

#[test]
fn qemu_is_locked_out_while_mounted_rw() {
    let tmp = common::tempdir();
    let image = lock_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let before = fs::read(&image).unwrap();
    let m = RwMount::mount(&image, &mnt, &["rw"]);
    let img_s = image.to_str().unwrap();
    assert_lock_refused(
        &qemu_img_out(&image, &["snapshot", "-c", "x", img_s]),
        "Failed to get \"write\" lock",
    );
    assert_lock_refused(
        &qemu_io_out(&image, &[], "write 0 4k"),
        "Failed to get \"write\" lock",
    );
    // Even reading needs QEMU's shared lock against a writer...
    assert_lock_refused(
        &qemu_img_out(&image, &["info", img_s]),
        "Failed to get shared \"write\" lock",
    );
    assert_lock_refused(
        &qemu_io_out(&image, &["-r"], "read 0 4k"),
        "Failed to get shared \"write\" lock",
    );
    // ... unless told to share (-U).
    qemu_img_out(&image, &["info", "-U", img_s]).expect_ok();
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "the image changed although nothing was written"
    );
    m.umount();
    assert!(
        snapshot_list(&image).is_empty(),
        "qemu-img snapshot -c ran against the mount"
    );
    // The locks went with the mount.
    assert_qemu_io_wrote(&qemu_io_out(&image, &[], "write 0 4k"));
    assert_check_clean(&image);
}

#[test]
fn qemu_writes_are_locked_out_while_mounted_read_only_unless_force_share() {
    let tmp = common::tempdir();
    let image = lock_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let img_s = image.to_str().unwrap();
    let m = RwMount::mount(&image, &mnt, &[]);
    assert_lock_refused(
        &qemu_io_out(&image, &[], "write 0 4k"),
        "Failed to get \"write\" lock",
    );
    assert_lock_refused(
        &qemu_img_out(&image, &["snapshot", "-c", "x", img_s]),
        "Failed to get \"write\" lock",
    );
    // Readers share with a reader.
    qemu_img_out(&image, &["info", img_s]).expect_ok();
    let r = qemu_io_out(&image, &["-r"], "read -P 0x3c 0 4k");
    assert!(
        r.ok() && r.stdout.contains("read 4096/4096"),
        "{}",
        r.describe()
    );
    m.umount();
    // force_share takes no lock: QEMU may write (the mount may then read stale data, so
    // only the locks are checked).
    let m = RwMount::mount(&image, &mnt, &["force_share"]);
    assert_qemu_io_wrote(&qemu_io_out(&image, &[], "write -P 0x5d 0 4k"));
    qemu_img_out(&image, &["info", img_s]).expect_ok();
    m.umount();
    assert_check_clean(&image);
}

/// Nothing is mounted at `mnt` and no qcow2fs process serves it.
fn assert_nothing_mounted(mnt: &Path) {
    assert_eq!(mounted(mnt), None, "{} is mounted", mnt.display());
    assert!(
        common::daemon_pids(mnt).is_empty(),
        "a qcow2fs process for {} is still running: {:?}",
        mnt.display(),
        common::daemon_pids(mnt)
    );
}

/// `qcow2fs mount` with `options` must fail with exit 1 and a one-line message
/// mentioning each of `mentions`, leaving nothing mounted.
fn assert_mount_refused(image: &Path, mnt: &Path, options: &[&str], mentions: &[&str]) {
    match RwMount::try_mount(image, mnt, options) {
        Ok(m) => {
            drop(m);
            panic!(
                "qcow2fs mount -o {} {} succeeded; {mentions:?} expected",
                options.join(","),
                image.display()
            );
        }
        Err(out) => {
            assert_one_line_error(&out, mentions);
            assert_nothing_mounted(mnt);
        }
    }
}

#[test]
fn mount_refused_while_qemu_writes_the_image() {
    let tmp = common::tempdir();
    let image = lock_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let qemu = QemuWriter::start(&image);
    assert_mount_refused(
        &image,
        &mnt,
        &["rw"],
        &["img.qcow2", "Failed to get \"write\" lock"],
    );
    assert_mount_refused(
        &image,
        &mnt,
        &[],
        &["img.qcow2", "Failed to get shared \"write\" lock"],
    );
    // Read-write and force_share exclude each other.
    assert_mount_refused(&image, &mnt, &["rw", "force_share"], &["force_share"]);
    // force_share reads without locks.
    let m = RwMount::mount(&image, &mnt, &["force_share"]);
    assert_eq!(
        fs::metadata(m.disk()).unwrap().len(),
        4 * M,
        "size of the disk read with force_share"
    );
    m.umount();
    qemu.stop();
    // With QEMU gone the image mounts read-write.
    let m = RwMount::mount(&image, &mnt, &["rw"]);
    m.umount();
    assert_check_clean(&image);
}

// ---------------------------------------------------------------------------------------
// Opening and closing: corrupt, bitmaps, autoclear, lazy refcounts
// ---------------------------------------------------------------------------------------

/// Header offsets of the feature fields.
const INCOMPATIBLE_FEATURES: u64 = 72;
const AUTOCLEAR_FEATURES: u64 = 88;
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;

/// The disk read through a read-only mount equals `want` (QEMU's rendering).
fn assert_reads_read_only(image: &Path, mnt: &Path, want: &[u8]) {
    let m = RwMount::mount(image, mnt, &[]);
    assert_model(
        "the disk read through a read-only mount",
        want,
        &read_direct(&m.disk()),
        |_| String::new(),
    );
    m.umount();
}

#[test]
fn corrupt_image_refused_rw_but_mounts_read_only() {
    let tmp = common::tempdir();
    let image = lock_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let want = qemu_render(&image, None);
    let f = header_u64(&image, INCOMPATIBLE_FEATURES);
    set_header_u64(&image, INCOMPATIBLE_FEATURES, f | INCOMPAT_CORRUPT);
    let before = fs::read(&image).unwrap();
    assert_mount_refused(&image, &mnt, &["rw"], &["img.qcow2", "corrupt"]);
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "the refused mount changed the image"
    );
    assert_reads_read_only(&image, &mnt, &want);
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "the read-only mount changed the image"
    );
}

#[test]
fn image_with_a_persistent_bitmap_refused_rw_naming_it() {
    let tmp = common::tempdir();
    let image = lock_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    img(tmp.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
    let want = qemu_render(&image, None);
    let before = fs::read(&image).unwrap();
    assert_mount_refused(&image, &mnt, &["rw"], &["img.qcow2", "bitmap", "b0"]);
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "the refused mount changed the image"
    );
    assert_reads_read_only(&image, &mnt, &want);
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "the read-only mount changed the image"
    );
    // Without the bitmap, the image mounts read-write.
    img(tmp.path(), &["bitmap", "--remove", "img.qcow2", "b0"]);
    RwMount::mount(&image, &mnt, &["rw"]).umount();
    assert_check_clean(&image);
}

#[test]
fn unknown_autoclear_bit_cleared_by_the_first_write() {
    let tmp = common::tempdir();
    let image = lock_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let bit = 1u64 << 5;
    set_header_u64(&image, AUTOCLEAR_FEATURES, bit);
    // A read-write mount that writes nothing changes nothing.
    let before = fs::read(&image).unwrap();
    let initial = qemu_render(&image, None);
    let m = RwMount::mount(&image, &mnt, &["rw"]);
    let disk = Disk::open(&m.disk(), initial.clone());
    disk.verify_through_mount();
    drop(disk);
    m.umount();
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "a read-write mount without writes changed the image"
    );

    let m = RwMount::mount(&image, &mnt, &["rw"]);
    let mut disk = Disk::open(&m.disk(), initial);
    disk.write(3 * M + 17, &Rng::new(5).bytes(10_000));
    disk.fsync();
    assert_eq!(
        header_u64(&image, AUTOCLEAR_FEATURES) & bit,
        0,
        "the unknown autoclear bit is still set after a write"
    );
    let model = std::mem::take(&mut disk.model);
    drop(disk);
    m.umount();
    assert_eq!(header_u64(&image, AUTOCLEAR_FEATURES), 0);
    assert_check_clean(&image);
    assert_model(
        "qemu-img convert after the write",
        &model,
        &qemu_render(&image, None),
        |_| String::new(),
    );
}

#[test]
fn lazy_refcounts_dirty_bit_set_by_a_write_and_cleared_by_unmount() {
    let tmp = common::tempdir();
    let image = create(tmp.path(), "img.qcow2", 4 * M, "lazy_refcounts=on", None);
    io(&image, &[w(0x3c, 0, 256 * K)]);
    let mnt = mountpoint(tmp.path(), "mnt");
    let dirty = || header_u64(&image, INCOMPATIBLE_FEATURES) & INCOMPAT_DIRTY != 0;
    let initial = qemu_render(&image, None);
    let m = RwMount::mount(&image, &mnt, &["rw"]);
    assert!(!dirty(), "the dirty bit is set before anything was written");
    let mut disk = Disk::open(&m.disk(), initial);
    disk.write(M + 100, &Rng::new(6).bytes(200 * K as usize));
    assert!(
        dirty(),
        "a write returned but the dirty bit is not set in the file"
    );
    disk.fsync();
    assert!(dirty(), "fsync cleared the dirty bit while mounted");
    let model = std::mem::take(&mut disk.model);
    drop(disk);
    m.umount();
    assert!(!dirty(), "the dirty bit is still set after a clean unmount");
    assert_check_clean(&image);
    assert_model(
        "qemu-img convert after unmount",
        &model,
        &qemu_render(&image, None),
        |_| String::new(),
    );
}

// ---------------------------------------------------------------------------------------
// File modes and errors
// ---------------------------------------------------------------------------------------

/// The error of `r`, as an errno, or a panic naming `what` when it succeeded.
fn errno_from<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what} succeeded ({v:?}); it should fail"),
        Err(e) => errno_of(&e),
    }
}

fn assert_errno<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>, want: i32) {
    let got = errno_from(what, r);
    assert_eq!(
        got,
        want,
        "{what}: got {}, expected {}",
        errno_name(got),
        errno_name(want)
    );
}

fn open_write(path: &Path, read_too: bool) -> std::io::Result<File> {
    OpenOptions::new().read(read_too).write(true).open(path)
}

/// `truncate(2)` by path (no descriptor: the mount itself decides).
fn truncate(path: &Path, size: u64) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::truncate(c.as_ptr(), size as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// An image over a backing file, with an internal snapshot: NAME.raw, layers/ and
/// snapshots/ all exist.
fn modes_image(dir: &Path) -> PathBuf {
    let base = create(dir, "base.qcow2", 4 * M, "", None);
    io(&base, &[w(0x5b, 0, 4 * M)]);
    let image = create(dir, "img.qcow2", 4 * M, "", Some(("base.qcow2", "qcow2")));
    io(&image, &[w(0x3c, 0, 256 * K)]);
    img(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    image
}

/// The read-only files of a mount: every snapshot and layer file.
fn read_only_files(mnt: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["snapshots", "layers"] {
        let mut here: Vec<PathBuf> = fs::read_dir(mnt.join(sub))
            .unwrap_or_else(|e| panic!("listing {sub}/: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!here.is_empty(), "{sub}/ is empty");
        files.append(&mut here);
    }
    files
}

#[test]
fn rw_mount_modes_erofs_for_snapshots_and_layers_no_shrinking_enospc_past_the_end() {
    let tmp = common::tempdir();
    let image = modes_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let want = qemu_render(&image, None);
    let frozen = Frozen::record(&image, &[&tmp.path().join("base.qcow2")]);
    let m = RwMount::mount(&image, &mnt, &["rw"]);
    let disk = m.disk();
    let size = want.len() as u64;
    assert_eq!(
        mode_of(&disk) & 0o222,
        0o200,
        "NAME.raw of a rw mount: mode {:o}",
        mode_of(&disk)
    );
    for p in read_only_files(&m.mnt) {
        let name = p.display().to_string();
        assert_eq!(mode_of(&p) & 0o222, 0, "{name}: mode {:o}", mode_of(&p));
        assert_errno(
            &format!("open O_WRONLY {name}"),
            open_write(&p, false),
            libc::EROFS,
        );
        assert_errno(
            &format!("open O_RDWR {name}"),
            open_write(&p, true),
            libc::EROFS,
        );
        assert_errno(
            &format!("truncate {name}"),
            truncate(&p, 8 * M),
            libc::EROFS,
        );
    }

    let f = open_write(&disk, true).unwrap();
    // Shrinking is refused, by path and by descriptor.
    assert_errno(
        "truncate NAME.raw to half its size",
        truncate(&disk, size / 2),
        libc::EINVAL,
    );
    assert_errno(
        "ftruncate NAME.raw 64 KiB smaller",
        f.set_len(size - 64 * K),
        libc::EINVAL,
    );
    // The disk does not grow by writing: ENOSPC at and past the end, a short write across it.
    assert_errno(
        "pwrite at the end of NAME.raw",
        f.write_at(&[0xee; 4096], size),
        libc::ENOSPC,
    );
    assert_errno(
        "pwrite 1 MiB past the end of NAME.raw",
        f.write_at(&[0xee; 4096], size + M),
        libc::ENOSPC,
    );
    let n = f
        .write_at(&[0xee; 4096], size - 1000)
        .expect("pwrite across the end of NAME.raw");
    assert_eq!(n, 1000, "pwrite of 4096 bytes 1000 bytes before the end");
    let mut model = want.clone();
    model[size as usize - 1000..].fill(0xee);
    // Attributes other than the size cannot be changed.
    use std::os::unix::fs::PermissionsExt;
    assert_errno(
        "chmod NAME.raw",
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o600)),
        libc::EPERM,
    );
    // The tree is fixed: nothing can be created, removed or renamed.
    assert_errno(
        "create MNT/new",
        File::create(m.mnt.join("new")),
        libc::EPERM,
    );
    assert_errno("unlink NAME.raw", fs::remove_file(&disk), libc::EPERM);
    assert_errno("mkdir MNT/d", fs::create_dir(m.mnt.join("d")), libc::EPERM);
    assert_errno(
        "rename NAME.raw",
        fs::rename(&disk, m.mnt.join("other.raw")),
        libc::EPERM,
    );
    assert_errno(
        "symlink MNT/l",
        std::os::unix::fs::symlink("x", m.mnt.join("l")),
        libc::EPERM,
    );
    drop(f);
    assert_eq!(fs::metadata(&disk).unwrap().len(), size, "NAME.raw's size");
    frozen.assert_snapshot_files(&m.mnt);
    m.umount();
    assert_check_clean(&image);
    assert_model(
        "qemu-img convert after the refused operations",
        &model,
        &qemu_render(&image, None),
        |_| String::new(),
    );
    frozen.assert_unchanged();
}

#[test]
fn read_only_mount_everything_erofs() {
    let tmp = common::tempdir();
    let image = modes_image(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    let before = fs::read(&image).unwrap();
    let m = RwMount::mount(&image, &mnt, &[]);
    let mut files = read_only_files(&m.mnt);
    files.push(m.disk());
    for p in &files {
        let name = p.display().to_string();
        assert_eq!(mode_of(p) & 0o222, 0, "{name}: mode {:o}", mode_of(p));
        assert_errno(
            &format!("open O_WRONLY {name}"),
            open_write(p, false),
            libc::EROFS,
        );
        assert_errno(
            &format!("open O_RDWR {name}"),
            open_write(p, true),
            libc::EROFS,
        );
        assert_errno(&format!("truncate {name}"), truncate(p, M), libc::EROFS);
        assert_errno(
            &format!("truncate {name} larger"),
            truncate(p, 16 * M),
            libc::EROFS,
        );
    }
    assert_errno(
        "create MNT/new",
        File::create(m.mnt.join("new")),
        libc::EROFS,
    );
    m.umount();
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "a read-only mount changed the image"
    );
}

#[test]
fn kill9_mid_workload_extended_l2_over_backing() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let base = create(dir, "base.qcow2", 8 * M, "", None);
    io(&base, &[w(0x5b, 0, 8 * M - 64 * K)]);
    let base_bytes = fs::read(&base).unwrap();
    let image = create(
        dir,
        "img.qcow2",
        8 * M,
        "extended_l2=on,cluster_size=32k",
        Some(("base.qcow2", "qcow2")),
    );
    populate(&image, 8 * M, 32 * K);
    crash_rounds("kill9_extended_l2", &image, &[], 32 * K, false);
    assert!(
        fs::read(&base).unwrap() == base_bytes,
        "the backing file changed"
    );
}
