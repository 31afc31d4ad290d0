//! Refcount widths and table growth, external data files, lazy refcounts, bitmaps.

use crate::support::images::*;
use crate::support::patch;
use std::path::PathBuf;

fn refcount_bits(ctx: &mut Ctx, bits: u32) -> PathBuf {
    let img = ctx.create(
        "disk.qcow2",
        2 * M + 512,
        &format!("refcount_bits={bits},cluster_size=4096"),
    );
    let mut c = ctx.fill(0, M, 60_001);
    c.extend([
        z(4096, 8192),
        discard(40_960, 8192),
        ctx.wc(M + 4096, 4096),
        ctx.w(2 * M - 100, 612),
    ]);
    ctx.io("disk.qcow2", &c);
    img
}

pub(super) fn refcount_bits_1(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 1)
}
pub(super) fn refcount_bits_2(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 2)
}
pub(super) fn refcount_bits_4(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 4)
}
pub(super) fn refcount_bits_8(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 8)
}
pub(super) fn refcount_bits_16(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 16)
}
pub(super) fn refcount_bits_32(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 32)
}
pub(super) fn refcount_bits_64(ctx: &mut Ctx) -> PathBuf {
    refcount_bits(ctx, 64)
}

/// 512-byte clusters with 64-bit refcounts: a refblock covers 32 KiB and one table
/// cluster 2 MiB of host file, so writing 3 MiB makes the refcount table grow.
pub(super) fn refcount_table_growth(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", 4 * M, "refcount_bits=64,cluster_size=512");
    let c = ctx.fill(0, 3 * M, 64 * K + 3);
    ctx.io("disk.qcow2", &c);
    img
}

fn data_file_ops(ctx: &mut Ctx, cs: u64, size: u64) -> Vec<String> {
    vec![
        ctx.w(0, 3000),
        ctx.w(2 * cs + 100, cs),
        ctx.w(5 * cs, 2 * cs),
        z(5 * cs, cs),
        zu(6 * cs, cs),
        z(8 * cs + 512, 512),
        ctx.w(12 * cs, 3 * cs),
        discard(12 * cs, cs),
        ctx.w(size - 777, 777),
    ]
}

/// An external data file (not raw), named relatively. Garbage is then written straight
/// into the data file where the metadata says unallocated or zero: it must not show.
pub(super) fn data_file(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let img = data_file_disk(ctx, "data_file=disk.data");
    let garbage = vec![0xeeu8; cs as usize];
    for at in [10 * cs, 5 * cs, 6 * cs, 12 * cs, 20 * cs + 100] {
        ctx.poke("disk.data", at, &garbage);
    }
    img
}

/// data_file_raw=on: the data file is itself the disk.
pub(super) fn data_file_raw(ctx: &mut Ctx) -> PathBuf {
    data_file_disk(ctx, "data_file=disk.data,data_file_raw=on")
}

/// `disk.qcow2` of 2 MiB + 1536 bytes with an external data file (`opts`), given
/// [`data_file_ops`].
fn data_file_disk(ctx: &mut Ctx, opts: &str) -> PathBuf {
    let size = 2 * M + 1536;
    let img = ctx.create("disk.qcow2", size, opts);
    let c = data_file_ops(ctx, 64 * K, size);
    ctx.io("disk.qcow2", &c);
    img
}

/// An external data file in an overlay: unallocated clusters read the backing file.
pub(super) fn data_file_with_backing(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let size = 2 * M + 1536;
    ctx.filled_base(size, "cluster_size=4096", 100_000);
    let img = ctx.top_over_base(None, "data_file=top.data");
    let c = data_file_ops(ctx, cs, size);
    ctx.io("top.qcow2", &c);
    let garbage = vec![0xeeu8; 1000];
    ctx.poke("top.data", 10 * cs + 5, &garbage);
    img
}

fn lazy_ops(ctx: &mut Ctx) -> Vec<String> {
    let mut c = ctx.fill(0, M, 44_444);
    c.extend([
        z(64 * K, 64 * K),
        discard(3 * 64 * K, 64 * K),
        ctx.w(M + 5, 100),
    ]);
    c
}

/// lazy_refcounts=on, closed cleanly.
pub(super) fn lazy_refcounts_clean(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", 2 * M, "lazy_refcounts=on");
    let c = lazy_ops(ctx);
    ctx.io("disk.qcow2", &c);
    img
}

/// lazy_refcounts=on and qemu-io killed after writing: the dirty bit stays set and the
/// refcounts are stale, which must not matter for reading.
pub(super) fn lazy_refcounts_dirty(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", 2 * M, "lazy_refcounts=on");
    let c = lazy_ops(ctx);
    ctx.io_crash("disk.qcow2", &c);
    img
}

fn with_bitmaps(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", 2 * M + 512, "cluster_size=16384");
    ctx.img(&["bitmap", "--add", "disk.qcow2", "b0"]);
    ctx.img(&["bitmap", "--add", "-g", "4096", "disk.qcow2", "fine"]);
    ctx.img(&["bitmap", "--add", "--disable", "disk.qcow2", "off"]);
    let c = vec![ctx.w(1000, 100_000), ctx.w(M + 3, 5), z(M / 2, 64 * K)];
    ctx.io("disk.qcow2", &c);
    img
}

/// Persistent dirty bitmaps (enabled, fine-grained, disabled): reads ignore them.
pub(super) fn bitmaps(ctx: &mut Ctx) -> PathBuf {
    with_bitmaps(ctx)
}

/// The same with one bitmap left in_use, as after a crash.
pub(super) fn bitmaps_in_use(ctx: &mut Ctx) -> PathBuf {
    let img = with_bitmaps(ctx);
    patch::set_bitmap_flags(&img, "fine", 1);
    img
}
