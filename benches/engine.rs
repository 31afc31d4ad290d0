//! Micro-benchmarks of the engine, named after the scenarios they time: decoding an L2
//! table, classifying its entries, mapping a 1 MiB range with the L2 table cached and
//! after an L2 miss, reading 1 MiB (plain, compressed, through an 8-deep chain, from a
//! snapshot) and 4 KiB at random through the library, and decompressing one deflate and
//! one zstd cluster. Images are made with qemu-img and qemu-io in a temporary directory.
//!
//! `cargo bench --bench engine`; the FUSE-level comparison with QEMU is `benches/run.sh`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use qcow2fs::block::{BlockDev, Chain, OpenOptions, open_chain};
use qcow2fs::engine::cache::L2Table;
use qcow2fs::engine::{ImageOptions, View};
use qcow2fs::format::compressed::decompress;
use qcow2fs::format::entry::{COMPRESSED, COPIED, EntryLayout, ZERO_FLAG};
use qcow2fs::format::header::CompressionType;
use qcow2fs::format::units::HostOffset;
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const CLUSTER: usize = 64 << 10;
const MIB: usize = 1 << 20;
/// Size of the benchmark images.
const DISK: u64 = 64 << 20;
/// The image for L2 misses: this many L2 tables, one every `WIDE_STRIDE` bytes.
const WIDE_TABLES: u64 = 8;
const WIDE_STRIDE: u64 = 512 << 20;

/// Pseudo-random bytes of which about half compress away (runs of one byte), like disk
/// contents: the same seed gives the same data.
fn disk_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x & 1 == 0 {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(&[(x >> 8) as u8; 8]);
        }
    }
    out.truncate(len);
    out
}

fn run(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is qemu-utils installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `qemu-img` with whitespace-separated arguments.
fn qemu_img(dir: &Path, args: &str) {
    run(
        dir,
        "qemu-img",
        &args.split_whitespace().collect::<Vec<_>>(),
    );
}

/// The benchmark images: a plain image, its zlib and zstd compressed copies, an 8-deep
/// chain whose layer i holds the i-th eighth of the disk, and an image with a snapshot
/// of that data and other active data.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn make() -> Images {
        let dir = tempfile::Builder::new()
            .prefix("qcow2fs-bench-")
            .tempdir()
            .expect("creating a temporary directory");
        let d = dir.path();
        std::fs::write(d.join("data.raw"), disk_data(DISK as usize, 7)).unwrap();
        qemu_img(d, "convert -f raw -O qcow2 data.raw plain.qcow2");
        qemu_img(d, "convert -c -f raw -O qcow2 data.raw zlib.qcow2");
        qemu_img(
            d,
            "convert -c -f raw -O qcow2 -o compression_type=zstd data.raw zstd.qcow2",
        );
        let slice = DISK / 8;
        for i in 0..8u64 {
            if i == 0 {
                qemu_img(d, &format!("create -q -f qcow2 chain0.qcow2 {DISK}"));
            } else {
                let below = i - 1;
                qemu_img(
                    d,
                    &format!("create -q -f qcow2 -b chain{below}.qcow2 -F qcow2 chain{i}.qcow2"),
                );
            }
            let write = format!("write -P {} {} {slice}", 0x11 * (i + 1), i * slice);
            run(d, "qemu-io", &["-c", &write, &format!("chain{i}.qcow2")]);
        }
        qemu_img(d, "convert -f raw -O qcow2 data.raw snap.qcow2");
        qemu_img(d, "snapshot -c base snap.qcow2");
        let overwrite = format!("write -P 0x33 0 {}", DISK / 2);
        run(d, "qemu-io", &["-c", &overwrite, "snap.qcow2"]);
        // Eight L2 tables (one per 512 MiB), 64 KiB of data in each.
        qemu_img(d, "create -q -f qcow2 wide.qcow2 4G");
        let mut args = Vec::new();
        for t in 0..WIDE_TABLES {
            args.push("-c".to_string());
            args.push(format!("write -P 0x5a {} 64k", t * WIDE_STRIDE));
        }
        args.push("wide.qcow2".to_string());
        run(
            d,
            "qemu-io",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        std::fs::remove_file(d.join("data.raw")).unwrap();
        Images { dir }
    }

    fn open(&self, name: &str, cache_bytes: u64) -> Chain {
        let opts = OpenOptions {
            image: ImageOptions {
                cache_bytes,
                ..ImageOptions::default()
            },
            ..OpenOptions::default()
        };
        let path = self.dir.path().join(name);
        open_chain(&path, &opts).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    }
}

/// An L2 table of 8192 standard entries: data, zero, compressed and unallocated clusters.
fn l2_table() -> Vec<u64> {
    let layout = layout();
    (0..(CLUSTER / 8) as u64)
        .map(|i| match i % 4 {
            0 => COPIED | ((i + 16) << 16),
            1 => ZERO_FLAG,
            2 => layout.encode_compressed(HostOffset((i << 16) + 512 * (i % 100)), 3000),
            _ => 0,
        })
        .collect()
}

fn layout() -> EntryLayout {
    EntryLayout {
        cluster_bits: 16,
        extended_l2: false,
        zero_flag: true,
        data_file: false,
    }
}

fn l2_entries(c: &mut Criterion) {
    let table = l2_table();
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    let mut g = c.benchmark_group("l2");
    g.throughput(Throughput::Elements(table.len() as u64));
    g.bench_function("decode_table", |b| {
        b.iter(|| L2Table::from_bytes(black_box(&bytes)))
    });
    let layout = layout();
    g.bench_function("classify_entries", |b| {
        b.iter(|| {
            let mut compressed = 0u32;
            for &e in black_box(&table) {
                let (kind, n) = layout.classify(e, 0, 0).unwrap();
                compressed +=
                    n * matches!(kind, qcow2fs::format::entry::ClusterKind::Compressed(_)) as u32;
            }
            compressed
        })
    });
    assert_eq!(COMPRESSED & table[2], COMPRESSED);
    g.finish();
}

fn mapping(c: &mut Criterion, images: &Images) {
    let mut g = c.benchmark_group("map_1m");
    g.throughput(Throughput::Bytes(MIB as u64));
    let chain = images.open("plain.qcow2", 32 << 20);
    let image = chain.image().clone();
    let map_range = |off: u64| {
        let mut at = off;
        while at < off + MIB as u64 {
            at += image
                .map(View::Active, at, off + MIB as u64 - at)
                .unwrap()
                .len;
        }
        at
    };
    map_range(0);
    g.bench_function("cached", |b| b.iter(|| map_range(black_box(0))));
    // The smallest cache (four tables) and eight tables read in turn: every lookup
    // loads its table from the file.
    let small = images.open("wide.qcow2", CLUSTER as u64);
    let small_image = small.image().clone();
    let mut t = 0;
    g.bench_function("l2_miss", |b| {
        b.iter(|| {
            t = (t + 1) % WIDE_TABLES;
            small_image
                .map(View::Active, t * WIDE_STRIDE, MIB as u64)
                .unwrap()
                .len
        })
    });
    g.finish();
}

fn reads(c: &mut Criterion, images: &Images) {
    let mut g = c.benchmark_group("read_1m");
    g.throughput(Throughput::Bytes(MIB as u64));
    let mut buf = vec![0u8; MIB];
    for name in ["plain", "zlib", "zstd", "chain7", "snapshot"] {
        let (chain, dev): (Chain, std::sync::Arc<dyn BlockDev>);
        if name == "snapshot" {
            chain = images.open("snap.qcow2", 32 << 20);
            dev = chain.snapshot(chain.image().snapshots()[0].key);
        } else {
            chain = images.open(&format!("{name}.qcow2"), 32 << 20);
            dev = chain.top.clone();
        }
        // 1 MiB at a time over the whole disk, so compressed clusters are not cached.
        let mut off = 0u64;
        g.bench_function(if name == "chain7" { "chain8" } else { name }, |b| {
            b.iter(|| {
                dev.read_at(&mut buf, off).unwrap();
                off = (off + MIB as u64) % DISK;
            })
        });
        drop(chain);
    }
    g.finish();

    let mut g = c.benchmark_group("read_4k_random");
    g.throughput(Throughput::Bytes(4096));
    let mut buf = vec![0u8; 4096];
    for name in ["plain", "zlib"] {
        let chain = images.open(&format!("{name}.qcow2"), 32 << 20);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        g.bench_function(name, |b| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (DISK / 4096)) * 4096;
                chain.top.read_at(&mut buf, off).unwrap();
            })
        });
    }
    g.finish();
}

fn decompression(c: &mut Criterion) {
    let data = disk_data(CLUSTER, 11);
    let mut deflate = vec![0u8; 2 * CLUSTER];
    let n = libdeflater::Compressor::new(libdeflater::CompressionLvl::default())
        .deflate_compress(&data, &mut deflate)
        .unwrap();
    deflate.truncate(n);
    let zstd = zstd::bulk::compress(&data, 3).unwrap();
    let mut g = c.benchmark_group("decompress_cluster");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    for (name, kind, input) in [
        ("deflate", CompressionType::Deflate, &deflate),
        ("zstd", CompressionType::Zstd, &zstd),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || vec![0u8; CLUSTER],
                |out| decompress(kind, black_box(input), out).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    l2_entries(c);
    decompression(c);
    let images = Images::make();
    mapping(c, &images);
    reads(c, &images);
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = quick();
    targets = engine
}
criterion_main!(benches);
