//! The write engine through the library API: random writes, zeroing and discards into
//! images of every kind, checked against a raw model with qemu-img compare, and with
//! `qemu-img check` clean afterwards; snapshots and backing files must not change.

mod support;

use qcow2fs::block::{BlockDev, OpenOptions, open_chain};
use qcow2fs::engine::ImageOptions;
use std::path::{Path, PathBuf};
use support::images::create_image;
use support::patch::{patch, put8};
use support::*;

fn open_rw_small_cache(image: &Path) -> qcow2fs::block::Chain {
    open_with(
        image,
        ImageOptions {
            writable: true,
            cache_bytes: 256 << 10,
        },
    )
}

struct Case {
    name: &'static str,
    create: &'static str,
    size: u64,
    snapshot: bool,
    backing: bool,
    compressed: bool,
}

fn build(dir: &Path, c: &Case) -> PathBuf {
    if c.backing {
        let base = create_image(dir, "base.qcow2", Some(c.size), "", None);
        qemu_io(&base, &[format!("write -P 0x5b 0 {}", c.size)]);
    }
    let backing = c.backing.then_some(("base.qcow2", "qcow2"));
    let img = create_image(dir, "img.qcow2", Some(c.size), c.create, backing);
    if c.compressed {
        // QEMU compresses only into unallocated clusters: do it first.
        qemu_io(
            &img,
            &[format!("write -c -P 0x33 {} {}", 1u64 << 20, 1u64 << 16)],
        );
    }
    let cs_third = c.size / 3;
    qemu_io(
        &img,
        &[
            format!("write -P 0x11 4096 {cs_third}"),
            format!("write -P 0x22 {} 70000", c.size / 2),
        ],
    );
    if c.snapshot {
        qemu_img(dir, &["snapshot", "-c", "before", img.to_str().unwrap()]);
        qemu_io(&img, &[format!("write -P 0x44 {} 10000", c.size / 4)]);
    }
    img
}

fn run_case(c: &Case, seed: u64) {
    let dir = tempdir();
    let img = build(dir.path(), c);
    let snaps_before: Vec<(String, Vec<u8>)> = qemu_snapshot_ids(&img)
        .into_iter()
        .map(|id| {
            let raw = qemu_snapshot_raw(&img, &id);
            (id, raw)
        })
        .collect();
    let base_before = c
        .backing
        .then(|| std::fs::read(dir.path().join("base.qcow2")).unwrap());
    let mut model = qemu_raw(&img);
    {
        let chain = open_rw_small_cache(&img);
        let dev = &chain.top;
        let size = dev.size();
        let mut rng = Rng::new(seed);
        for step in 0..120 {
            let op = rng.below(10);
            let off = rng.below(size);
            let big = rng.below(4) == 0;
            let len = (1 + rng.below(if big { 300_000 } else { 9000 })).min(size - off);
            match op {
                0 => {
                    dev.write_zeroes(off, len, false)
                        .unwrap_or_else(|e| panic!("{}: step {step}: zero: {e}", c.name));
                    model[off as usize..(off + len) as usize].fill(0);
                }
                1 => {
                    dev.write_zeroes(off, len, true)
                        .unwrap_or_else(|e| panic!("{}: step {step}: discard: {e}", c.name));
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (step as u8) ^ 0xa5).collect();
                    dev.write_at(&data, off)
                        .unwrap_or_else(|e| panic!("{}: step {step}: write: {e}", c.name));
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            if step % 40 == 39 {
                dev.flush().unwrap();
            }
            if step % 17 == 0 {
                // Reads through the engine see the writes at once.
                let mut got = vec![0u8; len as usize];
                dev.read_at(&mut got, off).unwrap();
                assert_same_bytes(
                    &format!("{}: read back at step {step}", c.name),
                    &model[off as usize..(off + len) as usize],
                    &got,
                );
            }
        }
        dev.close().unwrap();
    }
    assert_check_clean(&img);
    assert_same_bytes(
        &format!("{}: qemu-img convert after writes", c.name),
        &model,
        &qemu_raw(&img),
    );
    for (id, before) in snaps_before {
        assert_same_bytes(
            &format!("{}: snapshot {id} after writes", c.name),
            &before,
            &qemu_snapshot_raw(&img, &id),
        );
    }
    if let Some(before) = base_before {
        assert!(
            std::fs::read(dir.path().join("base.qcow2")).unwrap() == before,
            "{}: the backing file changed",
            c.name
        );
    }
}

macro_rules! cases {
    ($($name:ident: $create:expr, $size:expr, $snap:expr, $backing:expr, $comp:expr;)*) => {
        $(
            #[test]
            fn $name() {
                let c = Case { name: stringify!($name), create: $create, size: $size, snapshot: $snap, backing: $backing, compressed: $comp };
                run_case(&c, 0x9e3779b97f4a7c15 ^ stringify!($name).len() as u64);
            }
        )*
    };
}

cases! {
    plain_64k: "", 4 << 20, false, false, false;
    snapshot_64k: "", 4 << 20, true, false, false;
    backing_64k: "", 4 << 20, false, true, false;
    compressed_snapshot_64k: "", 4 << 20, true, false, true;
    clusters_512: "cluster_size=512", 2 << 20, true, false, false;
    clusters_512_refcount64: "cluster_size=512,refcount_bits=64", 3 << 20, false, false, false;
    clusters_4k_refcount2: "cluster_size=4096,refcount_bits=2", 2 << 20, true, false, false;
    clusters_2m: "cluster_size=2M", 8 << 20, true, true, false;
    refcount_1: "refcount_bits=1", 4 << 20, false, true, false;
    refcount_4: "refcount_bits=4", 4 << 20, true, false, false;
    refcount_8: "refcount_bits=8", 4 << 20, true, false, false;
    refcount_32: "refcount_bits=32", 4 << 20, true, false, true;
    v2: "compat=0.10", 4 << 20, true, false, false;
    v2_backing: "compat=0.10", 4 << 20, false, true, false;
    extended_l2: "extended_l2=on", 4 << 20, true, false, false;
    extended_l2_backing: "extended_l2=on,cluster_size=128k", 4 << 20, false, true, false;
    extended_l2_compressed: "extended_l2=on", 4 << 20, false, false, true;
    lazy_refcounts: "lazy_refcounts=on", 4 << 20, true, false, false;
    zstd_compressed: "compression_type=zstd", 4 << 20, true, true, true;
    prealloc_metadata: "preallocation=metadata", 4 << 20, false, false, false;
    data_file: "data_file=img.data", 4 << 20, false, false, false;
}

#[test]
fn grow_then_write_past_the_old_end() {
    let dir = tempdir();
    let img = create_image(dir.path(), "g.qcow2", Some(M), "cluster_size=512", None);
    qemu_io(&img, &["write -P 7 0 1M"]);
    {
        let chain = open_rw_small_cache(&img);
        // 1 MiB -> 40 MiB needs a larger L1 table with 512-byte clusters.
        chain.top.resize(40 << 20).unwrap();
        chain.top.write_at(&[9u8; 5000], (40 << 20) - 5000).unwrap();
        assert!(
            chain.top.resize(1 << 20).is_err(),
            "shrinking must be refused"
        );
        chain.top.close().unwrap();
    }
    assert_check_clean(&img);
    let raw = qemu_raw(&img);
    assert_eq!(raw.len(), 40 << 20);
    assert!(raw[..1 << 20].iter().all(|&b| b == 7));
    assert!(raw[1 << 20..(40 << 20) - 5000].iter().all(|&b| b == 0));
    assert!(raw[(40 << 20) - 5000..].iter().all(|&b| b == 9));
}

#[test]
fn grow_over_a_larger_backing_file_reads_zeros() {
    let dir = tempdir();
    let base = create_image(dir.path(), "base.qcow2", Some(8 * M), "", None);
    qemu_io(&base, &["write -P 0x66 0 8M"]);
    let img = create_image(
        dir.path(),
        "top.qcow2",
        Some(1000 * K),
        "",
        Some(("base.qcow2", "qcow2")),
    );
    {
        let chain = open_rw_small_cache(&img);
        chain.top.resize(6 << 20).unwrap();
        chain.top.close().unwrap();
    }
    assert_check_clean(&img);
    let raw = qemu_raw(&img);
    assert!(raw[..1000 << 10].iter().all(|&b| b == 0x66));
    assert!(
        raw[1000 << 10..].iter().all(|&b| b == 0),
        "the grown range must not show the backing file"
    );
}

#[test]
fn dirty_lazy_refcount_image_is_rebuilt_before_writing() {
    let dir = tempdir();
    let img = create_image(
        dir.path(),
        "dirty.qcow2",
        Some(8 * M),
        "lazy_refcounts=on,cluster_size=4096",
        None,
    );
    qemu_io(&img, &["write -P 1 0 1M"]);
    qemu_img(dir.path(), &["snapshot", "-c", "s", img.to_str().unwrap()]);
    qemu_io_crash(&img, &["write -P 2 512k 2M", "write -P 3 6M 100k", "abort"]);
    let info = qemu_info_json(&img);
    assert_eq!(
        info["dirty-flag"], true,
        "the crash should leave the image dirty"
    );
    let mut model = qemu_raw(&img);
    let snap = qemu_snapshot_raw(&img, "1");
    {
        let chain = open_rw_small_cache(&img);
        let data = vec![0x77u8; 300_000];
        chain.top.write_at(&data, 5 << 20).unwrap();
        model[5 << 20..(5 << 20) + 300_000].copy_from_slice(&data);
        chain.top.close().unwrap();
    }
    assert_check_clean(&img);
    assert_eq!(qemu_info_json(&img)["dirty-flag"], false);
    assert_same_bytes("rebuilt image", &model, &qemu_raw(&img));
    assert_same_bytes(
        "snapshot of the rebuilt image",
        &snap,
        &qemu_snapshot_raw(&img, "1"),
    );
}

#[test]
fn corrupt_or_bitmap_images_are_refused_read_write() {
    let dir = tempdir();
    let img = create_image(dir.path(), "bm.qcow2", Some(M), "", None);
    qemu_img(
        dir.path(),
        &["bitmap", "--add", img.to_str().unwrap(), "backup-0"],
    );
    let opts = OpenOptions {
        image: ImageOptions {
            writable: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = open_chain(&img, &opts).unwrap_err().to_string();
    assert!(e.contains("backup-0") && e.contains("bitmap"), "{e}");
    // Read-only is fine.
    open_chain(&img, &OpenOptions::default()).unwrap();
    let img2 = create_image(dir.path(), "corrupt.qcow2", Some(M), "", None);
    put8(&img2, 79, 2);
    let e = open_chain(&img2, &opts).unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
    open_chain(&img2, &OpenOptions::default()).unwrap();
}

#[test]
fn unknown_autoclear_bits_are_cleared_and_extensions_kept() {
    let dir = tempdir();
    let img = create_image(dir.path(), "ac.qcow2", Some(M), "", None);
    // Autoclear bit 7 (unknown) and an unknown header extension before the end marker.
    let mut c0 = std::fs::read(&img).unwrap()[..65536].to_vec();
    c0[95] |= 0x80;
    let hl = u32::from_be_bytes(c0[100..104].try_into().unwrap()) as usize;
    // Find the end marker and put an unknown extension there.
    let mut off = hl;
    while u32::from_be_bytes(c0[off..off + 4].try_into().unwrap()) != 0 {
        let len = u32::from_be_bytes(c0[off + 4..off + 8].try_into().unwrap()) as usize;
        off += 8 + len.next_multiple_of(8);
    }
    c0[off..off + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    c0[off + 4..off + 8].copy_from_slice(&5u32.to_be_bytes());
    c0[off + 8..off + 13].copy_from_slice(b"hello");
    patch(&img, 0, &c0);
    {
        let chain = open_rw_small_cache(&img);
        chain.top.write_at(&[1u8; 4096], 0).unwrap();
        chain.top.close().unwrap();
    }
    assert_check_clean(&img);
    let c0 = std::fs::read(&img).unwrap();
    assert_eq!(
        c0[95] & 0x80,
        0,
        "the unknown autoclear bit must be cleared before writing"
    );
    let hay = &c0[..65536];
    assert!(
        hay.windows(5).any(|w| w == b"hello"),
        "the unknown extension must be kept"
    );
}
