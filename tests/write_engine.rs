//! The write engine through the library API: random writes, zeroing and discards into
//! images of every kind, checked against a raw model with qemu-img compare, and with
//! `qemu-img check` clean afterwards; snapshots and backing files must not change.
//!
//! And on an in-memory store (images made by qemu-img, loaded into a `MemStorage` that
//! records every write and sync): the allocator hands out only free clusters and refcount
//! blocks count themselves, a write into a cluster a snapshot shares is planned into a
//! new cluster to fill, and a flush writes refcount blocks, then L2 tables, then the L1
//! table, so that a crash after any of its writes leaves no reference to a free cluster.

mod support;

use qcow2fs::block::{BlockDev, OpenOptions, Qcow2Layer, open_chain};
use qcow2fs::engine::{Image, ImageOptions, MapKind, View};
use qcow2fs::storage::{MemStorage, Storage};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
fn corrupt_images_are_refused_read_write_bitmap_images_are_not() {
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
    let chain = open_chain(&img, &opts).unwrap();
    assert_eq!(chain.image().bitmaps()[0].name, "backup-0");
    chain.image().close().unwrap();
    drop(chain);
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

// ---------------------------------------------------------------------------------------
// Allocation, write planning and flush order on an in-memory store
// ---------------------------------------------------------------------------------------

/// One operation that reached a [`Recorder`].
#[derive(Clone, Debug)]
enum StoreOp {
    Write { off: u64, data: Vec<u8> },
    Sync,
    SetLen(u64),
}

/// A memory store that records every write, sync and resize, in order.
#[derive(Debug)]
struct Recorder {
    inner: MemStorage,
    ops: Mutex<Vec<StoreOp>>,
}

impl Recorder {
    fn new(bytes: Vec<u8>) -> Arc<Recorder> {
        Arc::new(Recorder {
            inner: MemStorage::new(bytes),
            ops: Mutex::new(Vec::new()),
        })
    }

    /// The operations recorded since the last call.
    fn take(&self) -> Vec<StoreOp> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }

    fn contents(&self) -> Vec<u8> {
        self.inner.contents()
    }

    /// Writes the store's bytes to `path`, for QEMU to look at.
    fn dump(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.contents()).unwrap();
        path.to_path_buf()
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.ops.lock().unwrap().push(StoreOp::Write {
            off,
            data: buf.to_vec(),
        });
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.ops.lock().unwrap().push(StoreOp::Sync);
        self.inner.flush()
    }

    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.ops.lock().unwrap().push(StoreOp::SetLen(len));
        self.inner.set_len(len)
    }
}

/// The operations as `write OFF+LEN`, `sync`, `set_len LEN`, for messages.
fn show_ops(ops: &[StoreOp]) -> String {
    let shown: Vec<String> = ops
        .iter()
        .map(|op| match op {
            StoreOp::Write { off, data } => format!("write {off:#x}+{}", data.len()),
            StoreOp::Sync => "sync".to_string(),
            StoreOp::SetLen(len) => format!("set_len {len:#x}"),
        })
        .collect();
    shown.join(", ")
}

/// `img` (made by qemu-img) loaded into a recording memory store and opened read-write.
fn open_in_memory(img: &Path) -> (Arc<Recorder>, Arc<Image>) {
    let store = Recorder::new(std::fs::read(img).unwrap());
    let opts = ImageOptions {
        writable: true,
        ..Default::default()
    };
    let image = Image::open(img, store.clone(), &opts)
        .unwrap_or_else(|e| panic!("opening {} in memory: {e}", img.display()));
    (store, Arc::new(image))
}

const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// The tests' own reading of a qcow2 image held in memory (no compressed clusters, no
/// extended L2): refcounts, and how often the metadata references each host cluster.
struct Parsed<'a> {
    b: &'a [u8],
    cs: u64,
}

impl Parsed<'_> {
    fn new(b: &[u8]) -> Parsed<'_> {
        let p = Parsed {
            b,
            cs: 1 << be32(b, 20),
        };
        assert_eq!(be32(b, 96), 4, "these tests read 16-bit refcounts only");
        assert_eq!(
            be64(b, 72) & (1 << 4),
            0,
            "these tests read standard L2 only"
        );
        p
    }

    /// The big-endian word at `off` (zeros past the end).
    fn word(&self, off: u64) -> u64 {
        let mut w = [0u8; 8];
        let start = (off as usize).min(self.b.len());
        let end = (off as usize + 8).min(self.b.len());
        w[..end - start].copy_from_slice(&self.b[start..end]);
        u64::from_be_bytes(w)
    }

    fn header(&self, off: u64) -> u64 {
        self.word(off)
    }

    fn header32(&self, off: u64) -> u64 {
        self.word(off) >> 32
    }

    fn reftable(&self) -> (u64, u64) {
        let clusters = self.header32(56);
        (self.header(48), clusters * self.cs / 8)
    }

    /// The offsets of the refcount blocks the refcount table points to.
    fn refcount_blocks(&self) -> Vec<u64> {
        let (table, entries) = self.reftable();
        (0..entries)
            .map(|i| self.word(table + 8 * i) & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect()
    }

    /// The refcount of host cluster `cluster`.
    fn refcount(&self, cluster: u64) -> u64 {
        let per_block = self.cs / 2;
        let (table, entries) = self.reftable();
        let i = cluster / per_block;
        if i >= entries {
            return 0;
        }
        let block = self.word(table + 8 * i) & REFT_OFFSET_MASK;
        if block == 0 {
            return 0;
        }
        self.word(block + 2 * (cluster % per_block)) >> 48
    }

    /// How many references the metadata holds to each host cluster: the header, the L1
    /// tables, the refcount table and blocks, the snapshot table, and through every L1
    /// table its L2 tables, and through every distinct L2 table its data clusters.
    fn references(&self) -> BTreeMap<u64, u64> {
        let cs = self.cs;
        let mut refs: BTreeMap<u64, u64> = BTreeMap::new();
        let span = |refs: &mut BTreeMap<u64, u64>, off: u64, len: u64| {
            for c in off / cs..(off + len.max(1)).div_ceil(cs) {
                *refs.entry(c).or_default() += 1;
            }
        };
        span(&mut refs, 0, cs);
        let (table, entries) = self.reftable();
        span(&mut refs, table, entries * 8);
        for b in self.refcount_blocks() {
            span(&mut refs, b, cs);
        }
        let mut l1s = vec![(self.header(40), self.header32(36))];
        let (nb, mut at) = (self.header32(60), self.header(64));
        let table_start = at;
        for _ in 0..nb {
            l1s.push((self.word(at), self.word(at + 8) >> 32));
            let id_len = self.word(at + 12) >> 48;
            let name_len = (self.word(at + 14) >> 48) & 0xffff;
            let extra = self.word(at + 36) >> 32;
            at += (40 + extra + id_len + name_len).next_multiple_of(8);
        }
        if nb > 0 {
            span(&mut refs, table_start, at - table_start);
        }
        let mut l2s = BTreeSet::new();
        for (i, &(l1, n)) in l1s.iter().enumerate() {
            if i > 0 {
                span(&mut refs, l1, n * 8);
            }
            for e in 0..n {
                let l2 = self.word(l1 + 8 * e) & L2_OFFSET_MASK;
                if l2 != 0 {
                    span(&mut refs, l2, cs);
                    l2s.insert(l2);
                }
            }
        }
        for l2 in l2s {
            for e in 0..cs / 8 {
                let data = self.word(l2 + 8 * e) & L2_OFFSET_MASK;
                if data != 0 {
                    span(&mut refs, data, cs);
                }
            }
        }
        refs
    }

    /// Panics unless every referenced cluster has a refcount of at least one.
    fn assert_no_reference_to_a_free_cluster(&self, what: &str) {
        for (&c, &n) in &self.references() {
            assert!(
                self.refcount(c) > 0,
                "{what}: host cluster {c} ({:#x}) is referenced {n} times but its refcount is 0",
                c * self.cs
            );
        }
    }
}

/// Every allocation returns a cluster whose refcount was 0 (data clusters, L2 tables,
/// refcount blocks, a moved refcount table), and every refcount block counts itself: run
/// on 512-byte clusters until the refcount table has to grow.
#[test]
fn allocation_returns_only_free_clusters_and_refcount_blocks_count_themselves() {
    let dir = tempdir();
    let size = 24 * M;
    let img = create_image(
        dir.path(),
        "alloc.qcow2",
        Some(size),
        "cluster_size=512",
        None,
    );
    qemu_io(&img, &["write -P 0x31 0 40k", "write -P 0x32 20M 7k"]);
    let mut model = qemu_raw(&img);
    let (store, image) = open_in_memory(&img);
    let layer = Qcow2Layer::standalone(image.clone()).unwrap();
    let start = store.contents();
    let (blocks_before, table_before) = {
        let p = Parsed::new(&start);
        (p.refcount_blocks().len(), p.header32(56))
    };
    let mut rng = Rng::named("allocation");
    let mut before = start;
    for round in 0..40u64 {
        // Mostly fresh ranges, sometimes over what an earlier round wrote.
        let off = if round % 5 == 4 {
            rng.below(round * 600 * K)
        } else {
            round * 600 * K + rng.below(4 * K)
        };
        let len = (300 * K + rng.below(4 * K)).min(size - off);
        let data = rng.bytes(len as usize);
        layer.write_at(&data, off).unwrap();
        layer.flush().unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        let after = store.contents();
        let (b, a) = (Parsed::new(&before), Parsed::new(&after));
        let old = b.references();
        for (&c, &n) in &a.references() {
            if !old.contains_key(&c) {
                assert_eq!(
                    b.refcount(c),
                    0,
                    "round {round}: host cluster {c} ({:#x}) newly referenced, but its refcount \
                     was {} before the write",
                    c * a.cs,
                    b.refcount(c)
                );
            }
            assert_eq!(
                a.refcount(c),
                n,
                "round {round}: host cluster {c} ({:#x}) is referenced {n} times",
                c * a.cs
            );
        }
        for block in a.refcount_blocks() {
            assert_eq!(
                a.refcount(block / a.cs),
                1,
                "round {round}: the refcount block at {block:#x} does not count itself"
            );
        }
        before = after;
    }
    let p = Parsed::new(&before);
    assert!(
        p.refcount_blocks().len() > blocks_before + 8 && p.header32(56) > table_before,
        "test setup: the writes should have added refcount blocks ({blocks_before} -> {}) and \
         grown the refcount table ({table_before} -> {} clusters)",
        p.refcount_blocks().len(),
        p.header32(56)
    );
    layer.close().unwrap();
    let copy = store.dump(&dir.path().join("after.qcow2"));
    assert_check_clean(&copy);
    assert_same_bytes(
        "qemu-img convert of the written image",
        &model,
        &qemu_raw(&copy),
    );
}

/// A write into a cluster a snapshot shares is planned into a new, free cluster, with the
/// rest of the cluster to fill from the old content; once the caller has done that and
/// published, the active disk uses the new cluster and the snapshot keeps the old one.
#[test]
fn planned_write_into_a_snapshot_shared_cluster_allocates_and_fills() {
    let dir = tempdir();
    let img = create_image(dir.path(), "shared.qcow2", Some(M), "", None);
    qemu_io(&img, &["write -P 0x11 0 192k"]);
    qemu_img(dir.path(), &["snapshot", "-c", "s1", "shared.qcow2"]);
    let original = qemu_raw(&img);
    let (store, image) = open_in_memory(&img);
    let cs = image.cluster_size();
    let host_of = |view: View| match image.map(view, 0, cs).unwrap().kind {
        MapKind::Data { host } => host.0,
        other => panic!("guest cluster 0 in {view:?} is not plain data: {other:?}"),
    };
    let old = host_of(View::Active);
    let start = store.contents();
    let p = Parsed::new(&start);
    assert_eq!(
        p.refcount(old / cs),
        2,
        "test setup: the snapshot shares the cluster"
    );

    let guard = image.lock_range(0, cs, true);
    let plans = image.plan_write(&guard, 100, 50).unwrap();
    assert_eq!(plans.len(), 1, "{plans:?}");
    let plan = &plans[0];
    assert_eq!(
        (plan.guest.0, plan.start, plan.end),
        (0, 100, 150),
        "{plan:?}"
    );
    let new = plan.host.0;
    assert!(
        new != old && new.is_multiple_of(cs),
        "the write must go to a new cluster: {plan:?} (old host {old:#x})"
    );
    assert_eq!(
        p.refcount(new / cs),
        0,
        "the new cluster {new:#x} was not free"
    );
    assert!(
        !p.references().contains_key(&(new / cs)),
        "the new cluster {new:#x} is referenced already"
    );
    let mut pieces: Vec<(u64, u64)> = plan.fill.clone();
    pieces.push((plan.start, plan.end));
    pieces.sort_unstable();
    let tiled = pieces.windows(2).all(|w| w[0].1 == w[1].0);
    assert!(
        tiled && pieces[0].0 == 0 && pieces.last().unwrap().1 == cs,
        "the fill ranges and the write must cover the cluster exactly once: {plan:?}"
    );
    let (word, _) = plan.entry.expect("a new L2 entry to publish");
    assert_eq!(word & L2_OFFSET_MASK, new, "{plan:?}");

    // The caller's half of the protocol: copy the old content, write the data, publish.
    for &(a, b) in &plan.fill {
        let mut buf = vec![0u8; (b - a) as usize];
        store.read_at(&mut buf, old + a).unwrap();
        store.write_at(&buf, new + a).unwrap();
    }
    store.write_at(&[0xee; 50], new + 100).unwrap();
    image.publish(&guard, &plans).unwrap();
    drop(guard);
    image.flush().unwrap();

    assert_eq!(host_of(View::Active), new);
    assert_eq!(host_of(View::Snapshot(image.snapshots()[0].key)), old);
    let after = store.contents();
    let p = Parsed::new(&after);
    assert_eq!(
        (p.refcount(old / cs), p.refcount(new / cs)),
        (1, 1),
        "refcounts of the old and the new cluster after the flush"
    );
    image.close().unwrap();
    let copy = store.dump(&dir.path().join("after.qcow2"));
    assert_check_clean(&copy);
    let mut want = original.clone();
    want[100..150].fill(0xee);
    assert_same_bytes("active disk after the write", &want, &qemu_raw(&copy));
    assert_same_bytes(
        "snapshot s1 after the write",
        &original,
        &qemu_snapshot_raw(&copy, "s1"),
    );
}

/// What a metadata write of a flush updates, by where it lands in the final image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Written {
    Header,
    RefcountTable,
    RefcountBlock,
    L1,
    L2,
    Data,
    Sync,
}

/// The flush writes every refcount block (and the refcount table) before any L2 table,
/// and the L2 tables before the L1 table, with a sync between the steps; a crash after
/// any of its writes leaves no reference to a cluster whose refcount is 0.
#[test]
fn flush_writes_refcount_blocks_then_l2_tables_then_the_l1_table() {
    let dir = tempdir();
    let img = create_image(dir.path(), "order.qcow2", Some(1 << 30), "", None);
    qemu_io(&img, &["write -P 0x5a 0 64k"]);
    let (store, image) = open_in_memory(&img);
    let layer = Qcow2Layer::standalone(image.clone()).unwrap();
    layer.write_at(&[0x77; 8192], 3 * M).unwrap();
    layer.write_at(&[0x78; 4096], 100 * K).unwrap();
    // Beyond the first L2 table: a new table and an L1 update.
    layer.write_at(&[0x79; 4096], 600 * M).unwrap();
    let before_flush = store.contents();
    store.take();
    layer.flush().unwrap();
    let ops = store.take();

    let after = store.contents();
    let p = Parsed::new(&after);
    let cs = p.cs;
    let (table, entries) = p.reftable();
    let blocks: BTreeSet<u64> = p.refcount_blocks().into_iter().collect();
    let (l1, l1_size) = (p.header(40), p.header32(36));
    let l2s: BTreeSet<u64> = (0..l1_size)
        .map(|i| p.word(l1 + 8 * i) & L2_OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    let kinds: Vec<Written> = ops
        .iter()
        .filter_map(|op| match op {
            StoreOp::Sync => Some(Written::Sync),
            StoreOp::SetLen(_) => None,
            StoreOp::Write { off, .. } => Some(match *off {
                o if o < cs => Written::Header,
                o if (table..table + entries * 8).contains(&o) => Written::RefcountTable,
                o if blocks.contains(&(o & !(cs - 1))) => Written::RefcountBlock,
                o if (l1..l1 + l1_size * 8).contains(&o) => Written::L1,
                o if l2s.contains(&(o & !(cs - 1))) => Written::L2,
                _ => Written::Data,
            }),
        })
        .collect();
    let first = |k: Written| kinds.iter().position(|&x| x == k);
    let (Some(first_rc), Some(first_l2), Some(l1_at)) = (
        first(Written::RefcountBlock),
        first(Written::L2),
        first(Written::L1),
    ) else {
        panic!("test setup: the flush should write refcount blocks, L2 tables and L1: {kinds:?}");
    };
    let is_rc = |k: &Written| matches!(k, Written::RefcountBlock | Written::RefcountTable);
    let synced_between = |a: usize, b: usize| kinds[a..b].contains(&Written::Sync);
    assert!(
        !kinds.contains(&Written::Data),
        "the flush wrote guest data: {kinds:?}"
    );
    assert!(
        synced_between(0, first_rc),
        "guest data must be synced before metadata is written: {kinds:?}"
    );
    let last_rc = (0..first_l2).rev().find(|&i| is_rc(&kinds[i]));
    assert!(
        last_rc.is_some_and(|i| synced_between(i, first_l2)),
        "refcount increments must be written and synced before the first L2 table: {kinds:?}"
    );
    let last_l2 = kinds.iter().rposition(|&k| k == Written::L2).unwrap();
    assert!(
        last_l2 < l1_at && synced_between(last_l2, l1_at),
        "every L2 table must be written and synced before the L1 table: {kinds:?}"
    );
    assert!(
        !kinds[first_l2..l1_at].iter().any(is_rc),
        "a refcount write between the L2 tables and the L1 table: {kinds:?}"
    );
    if let Some(late) = kinds[l1_at..].iter().position(is_rc) {
        assert!(
            synced_between(l1_at, l1_at + late),
            "decrements must wait until the new references are synced: {kinds:?}"
        );
    }

    // A crash after any prefix of the writes.
    let mut state = before_flush;
    Parsed::new(&state).assert_no_reference_to_a_free_cluster("before the flush");
    for (i, op) in ops.iter().enumerate() {
        match op {
            StoreOp::Write { off, data } => {
                let end = *off as usize + data.len();
                if state.len() < end {
                    state.resize(end, 0);
                }
                state[*off as usize..end].copy_from_slice(data);
            }
            StoreOp::SetLen(len) => state.resize(*len as usize, 0),
            StoreOp::Sync => continue,
        }
        Parsed::new(&state).assert_no_reference_to_a_free_cluster(&format!(
            "a crash after operation {i} of {}",
            show_ops(&ops)
        ));
    }
    layer.close().unwrap();
    assert_check_clean(&store.dump(&dir.path().join("after.qcow2")));
}

/// Snapshots created, deleted and reverted to through the library on every cluster
/// layout, with writes in between: QEMU reads every snapshot and the active disk as the
/// model says, and `qemu-img check` finds nothing, after each step.
#[test]
fn snapshots_created_deleted_and_reverted_match_qemu() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=8",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=512,lazy_refcounts=on",
    ] {
        let dir = tempdir();
        let img = create_image(dir.path(), "s.qcow2", Some(8 * M), opts, None);
        qemu_io(&img, &["write -P 0x11 0 3M", "write -c -P 0x12 4M 64k"]);
        let mut model = qemu_raw(&img);
        // Without locks, so that QEMU can check the image while it is open.
        let chain = open_chain(
            &img,
            &OpenOptions {
                image: ImageOptions {
                    writable: true,
                    ..Default::default()
                },
                force_share: true,
                ..Default::default()
            },
        )
        .unwrap();
        let image = chain.image().clone();
        let top = chain.top.clone();
        let write = |model: &mut Vec<u8>, byte: u8, off: usize, len: usize| {
            top.write_at(&vec![byte; len], off as u64).unwrap();
            model[off..off + len].fill(byte);
        };
        let s1 = image.create_snapshot(b"one", (1_700_000_000, 5)).unwrap();
        let at_s1 = model.clone();
        write(&mut model, 0x21, 100_000, 300_000);
        write(&mut model, 0x22, 4 << 20, 5000);
        let s2 = image.create_snapshot(b"two", (1_700_000_001, 6)).unwrap();
        let at_s2 = model.clone();
        write(&mut model, 0x31, 2 << 20, 2 << 20);
        top.write_zeroes(0, 65536, true).unwrap();
        model[..65536].fill(0);
        image.flush().unwrap();
        let check = |what: &str, active: &[u8], snaps: &[(&str, &[u8])]| {
            assert_check_clean(&img);
            assert_same_bytes(
                &format!("{opts}, {what}: active disk"),
                active,
                &qemu_raw(&img),
            );
            for (name, want) in snaps {
                assert_same_bytes(
                    &format!("{opts}, {what}: snapshot {name}"),
                    want,
                    &qemu_snapshot_raw(&img, name),
                );
            }
        };
        check(
            "after two snapshots",
            &model,
            &[("one", &at_s1), ("two", &at_s2)],
        );
        assert_eq!(
            qemu_snapshots(&img),
            [
                ("1".to_string(), "one".to_string()),
                ("2".to_string(), "two".to_string())
            ]
        );
        image.delete_snapshot(s1.key).unwrap();
        check("after deleting one", &model, &[("two", &at_s2)]);
        image.revert_to_snapshot(s2.key).unwrap();
        check("after reverting to two", &at_s2, &[("two", &at_s2)]);
        assert_same_bytes(
            "reverted, through the library",
            &at_s2,
            &read_all(&*chain.top),
        );
        write(&mut model, 0x41, 0, 1000);
        let mut reverted = at_s2.clone();
        top.write_at(&[0x41; 1000], 0).unwrap();
        reverted[..1000].fill(0x41);
        image.delete_snapshot(s2.key).unwrap();
        image.close().unwrap();
        check("after deleting the last one", &reverted, &[]);
        drop(chain);
    }
}

/// With 1-bit refcounts no cluster can have a second owner: taking a snapshot is refused
/// before anything changes, as in QEMU.
#[test]
fn snapshot_refused_when_refcounts_cannot_count_it() {
    let dir = tempdir();
    let img = create_image(dir.path(), "r1.qcow2", Some(4 * M), "refcount_bits=1", None);
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    let before = std::fs::read(&img).unwrap();
    let chain = open_rw(&img);
    let e = chain
        .image()
        .create_snapshot(b"x", (1_700_000_000, 0))
        .unwrap_err();
    assert_eq!(e.kind(), qcow2fs::ErrorKind::NoSpace, "{e:#}");
    chain.image().close().unwrap();
    drop(chain);
    assert_eq!(std::fs::read(&img).unwrap(), before, "the image changed");
}
