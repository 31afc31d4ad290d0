//! Geometry (every cluster size, v2, empty disks), zero clusters, discards and
//! preallocation modes.

use crate::support::images::*;
use std::path::PathBuf;

/// Every cluster size with an unaligned virtual size (given unaligned to qemu-img, which
/// rounds it up to 512) and a partial last cluster where the size allows one. 512 B and
/// 1 KiB clusters get multi-cluster L1 tables, with writes straddling L1-cluster
/// boundaries. Even cluster_bits compress the partial last cluster.
fn cluster_bits(ctx: &mut Ctx, cb: u32) -> PathBuf {
    let cs = 1u64 << cb;
    let asked = match cb {
        9 => 5 * M + 3 * 512 - 100, // L1: 160 entries, 3 clusters
        10 => 17 * M + 512 - 100,   // L1: 136 entries, 2 clusters
        _ => 5 * cs + cs / 3 - 100,
    };
    let size = asked.next_multiple_of(512);
    let img = ctx.create("disk.qcow2", asked, &format!("cluster_size={cs}"));
    let mut c = vec![
        ctx.w(0, 777),                  // partial first cluster
        ctx.w(cs - 100, 300),           // straddles clusters 0 and 1
        ctx.wc(2 * cs, cs),             // a compressed cluster
        ctx.w(3 * cs + 7, cs / 2 + 3),  // unaligned inside cluster 3
        z(3 * cs + cs / 4 + 5, cs / 8), // a partial zero write over it
    ];
    match cb {
        9 => {
            // L1 clusters end at 2 MiB and 4 MiB of guest space.
            c.push(ctx.w(2 * M - 333, 1000));
            c.push(ctx.w(4 * M - 5000, 9000));
            c.push(ctx.w(3 * M + 1234, 40 * K));
        }
        10 => {
            c.push(ctx.w(16 * M - 700, 2000));
            c.push(ctx.w(9 * M + 17, 3 * K));
        }
        _ => {}
    }
    let last = size / cs * cs;
    if cb.is_multiple_of(2) && last < size {
        c.push(ctx.wc(last, size - last)); // compressed partial last cluster
    } else {
        c.push(ctx.w(size - 1000, 1000));
    }
    ctx.io("disk.qcow2", &c);
    img
}

pub(super) fn cluster_bits_9(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 9)
}
pub(super) fn cluster_bits_10(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 10)
}
pub(super) fn cluster_bits_11(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 11)
}
pub(super) fn cluster_bits_12(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 12)
}
pub(super) fn cluster_bits_13(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 13)
}
pub(super) fn cluster_bits_14(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 14)
}
pub(super) fn cluster_bits_15(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 15)
}
pub(super) fn cluster_bits_16(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 16)
}
pub(super) fn cluster_bits_17(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 17)
}
pub(super) fn cluster_bits_18(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 18)
}
pub(super) fn cluster_bits_19(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 19)
}
pub(super) fn cluster_bits_20(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 20)
}
pub(super) fn cluster_bits_21(ctx: &mut Ctx) -> PathBuf {
    cluster_bits(ctx, 21)
}

/// compat=0.10: no zero flag (zero writes store zeros or deallocate), discards
/// deallocate, compressed clusters, refcount order 4 implied.
pub(super) fn compat_v2(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let img = ctx.create("disk.qcow2", 3 * M + 1234, "compat=0.10");
    let mut c = ctx.fill(0, 8 * cs, 50_001);
    c.extend([
        z(cs, cs),
        zu(2 * cs, cs),
        z(3 * cs + 999, 5000),
        discard(4 * cs, cs),
        discard(5 * cs + 512, 4096),
        ctx.wc(10 * cs, cs),
        ctx.wc(11 * cs, cs),
        ctx.w(11 * cs + 100, 200),
        ctx.w(3 * M - 3000, 3000 + 1234),
    ]);
    ctx.io("disk.qcow2", &c);
    img
}

/// An empty disk.
pub(super) fn virtual_size_0(ctx: &mut Ctx) -> PathBuf {
    ctx.create("disk.qcow2", 0, "")
}

/// An empty overlay over a backing file with data.
pub(super) fn virtual_size_0_overlay(ctx: &mut Ctx) -> PathBuf {
    ctx.filled_base(M, "", 100_000);
    ctx.top_over_base(Some(0), "")
}

/// Zero writes of every kind on a disk with `cs`-byte clusters: on allocated clusters
/// (ZERO_ALLOC keeps the offset, -u unmaps), on unallocated ones, partial, unaligned, and
/// data written back into a zero cluster afterwards.
fn zero_ops(ctx: &mut Ctx, cs: u64) -> Vec<String> {
    vec![
        z(0, cs),                    // allocated -> ZERO_ALLOC
        zu(cs, cs),                  // allocated -> ZERO_PLAIN
        z(2 * cs + 1000, 300),       // partial, unaligned, in an allocated cluster
        zu(3 * cs + cs / 8, cs / 2), // partial unmap
        z(8 * cs, cs),               // unallocated cluster
        zu(9 * cs, 2 * cs),          // unallocated, unmap
        z(4 * cs, 2 * cs + 700),     // two whole clusters and a bit of the next
        ctx.w(5 * cs + 10, 20),      // data back into a zero cluster
        ctx.w(cs / 2, 33),           // data into the ZERO_ALLOC cluster
    ]
}

/// Zero clusters with and without offsets on a standalone v3 image.
pub(super) fn zero_clusters(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let img = ctx.create("disk.qcow2", 16 * cs + 3 * 512, "");
    let mut c = ctx.fill(0, 8 * cs, 70_000);
    c.extend(zero_ops(ctx, cs));
    ctx.io("disk.qcow2", &c);
    img
}

/// The same with 512-byte clusters, where "partial" means sub-sector.
pub(super) fn zero_clusters_small(ctx: &mut Ctx) -> PathBuf {
    let cs = 512;
    let img = ctx.create("disk.qcow2", 40 * cs, "cluster_size=512");
    let mut c = ctx.fill(0, 8 * cs, 1111);
    c.extend(zero_ops(ctx, cs));
    ctx.io("disk.qcow2", &c);
    img
}

/// Zero clusters in an overlay hide the backing file's data, with or without an offset.
pub(super) fn zero_clusters_over_backing(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let size = 16 * cs + 3 * 512;
    ctx.filled_base(size, "cluster_size=32768", 60_000);
    let img = ctx.top_over_base(None, "");
    let mut c = ctx.fill(0, 4 * cs, 45_000);
    c.extend(zero_ops(ctx, cs));
    ctx.io("top.qcow2", &c);
    img
}

fn discard_ops(ctx: &mut Ctx, cs: u64) -> Vec<String> {
    vec![
        discard(0, cs),                   // a whole allocated cluster
        discard(cs + 512, 1024),          // partial: ignored
        discard(2 * cs, 2 * cs + 4096),   // two clusters and part of a third
        discard(7 * cs - 512, cs + 1024), // unaligned on both ends
        discard(12 * cs, 2 * cs),         // unallocated clusters
        ctx.w(2 * cs + 333, 444),         // data back into a discarded cluster
    ]
}

/// Full and partial discards on a standalone v3 image.
pub(super) fn discards(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let img = ctx.create("disk.qcow2", 16 * cs + 5 * 512, "");
    let mut c = ctx.fill(0, 10 * cs, 80_000);
    c.extend(discard_ops(ctx, cs));
    ctx.io("disk.qcow2", &c);
    img
}

/// Discards in a v3 overlay leave zero clusters that hide the backing file.
pub(super) fn discards_over_backing(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let size = 16 * cs + 5 * 512;
    ctx.filled_base(size, "cluster_size=4096", 90_000);
    let img = ctx.top_over_base(None, "");
    let mut c = ctx.fill(0, 10 * cs, 80_000);
    c.extend(discard_ops(ctx, cs));
    ctx.io("top.qcow2", &c);
    img
}

/// Discards in a v2 overlay deallocate and re-expose the backing file.
pub(super) fn discards_v2_over_backing(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let size = 16 * cs + 5 * 512;
    ctx.filled_base(size, "compat=0.10,cluster_size=16384", 90_000);
    let img = ctx.top_over_base(None, "compat=0.10");
    let mut c = ctx.fill(0, 10 * cs, 80_000);
    c.extend(discard_ops(ctx, cs));
    c.extend([z(14 * cs, cs), zu(15 * cs, cs)]);
    ctx.io("top.qcow2", &c);
    img
}

/// A preallocated image with partial writes, zero writes and discards on top.
fn prealloc(ctx: &mut Ctx, mode: &str, cs: u64) -> PathBuf {
    let size = 24 * cs + 3 * 512 + 100;
    let img = ctx.create(
        "disk.qcow2",
        size,
        &format!("preallocation={mode},cluster_size={cs}"),
    );
    let size = size.next_multiple_of(512);
    let c = vec![
        ctx.w(100, 5000),
        ctx.w(cs * 2 - 7, cs + 14),
        ctx.w(5 * cs + cs / 3, cs / 3),
        z(6 * cs, cs),
        zu(7 * cs, cs),
        z(8 * cs + 512, 1024),
        discard(9 * cs, 2 * cs),
        discard(11 * cs + 512, 512),
        ctx.w(20 * cs, 2 * cs),
        discard(20 * cs, cs),
        ctx.w(size - 4000, 4000),
    ];
    ctx.io("disk.qcow2", &c);
    img
}

pub(super) fn prealloc_off(ctx: &mut Ctx) -> PathBuf {
    prealloc(ctx, "off", 65536)
}
pub(super) fn prealloc_metadata(ctx: &mut Ctx) -> PathBuf {
    prealloc(ctx, "metadata", 4096)
}
pub(super) fn prealloc_falloc(ctx: &mut Ctx) -> PathBuf {
    prealloc(ctx, "falloc", 65536)
}
pub(super) fn prealloc_full(ctx: &mut Ctx) -> PathBuf {
    prealloc(ctx, "full", 16384)
}
