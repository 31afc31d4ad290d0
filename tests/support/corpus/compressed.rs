//! Compressed clusters: zlib and zstd, 512 B to 2 MiB clusters, written with `write -c`
//! and `convert -c`, partial last clusters, copy-on-write, v2, extended L2, snapshots.

use crate::support::images::*;
use std::path::PathBuf;

/// Compressed clusters written with `write -c`: runs of consecutive compressed clusters
/// (packed back to back, crossing sectors and host clusters), normal and unallocated
/// clusters in between, incompressible data (stored uncompressed by QEMU) and a
/// compressed partial last cluster.
fn compressed_write(ctx: &mut Ctx, cb: u32, ctype: &str) -> PathBuf {
    let cs = 1u64 << cb;
    let (n, tail) = match cb {
        9 => (200, 0),
        12 => (60, 1536),
        16 => (12, 9 * 512),
        21 => (3, M + 512),
        _ => unreachable!(),
    };
    let size = n * cs + tail;
    let img = ctx.create(
        "disk.qcow2",
        size,
        &format!("cluster_size={cs},compression_type={ctype}"),
    );
    let mut c = Vec::new();
    for i in 0..n {
        let at = i * cs;
        match i % 6 {
            0..=2 => c.push(ctx.wc(at, cs)),
            3 => c.push(ctx.w(at + cs / 4 + 3, cs / 2)),
            4 => {}
            _ => c.push(ctx.wc_incompressible(at, cs)),
        }
    }
    if tail > 0 {
        c.push(ctx.wc(n * cs, tail));
    }
    ctx.io("disk.qcow2", &c);
    img
}

pub(super) fn compressed_write_zlib_512(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 9, "zlib")
}
pub(super) fn compressed_write_zlib_4k(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 12, "zlib")
}
pub(super) fn compressed_write_zlib_64k(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 16, "zlib")
}
pub(super) fn compressed_write_zlib_2m(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 21, "zlib")
}
pub(super) fn compressed_write_zstd_512(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 9, "zstd")
}
pub(super) fn compressed_write_zstd_4k(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 12, "zstd")
}
pub(super) fn compressed_write_zstd_64k(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 16, "zstd")
}
pub(super) fn compressed_write_zstd_2m(ctx: &mut Ctx) -> PathBuf {
    compressed_write(ctx, 21, "zstd")
}

/// `qemu-img convert -c` of a mixed raw file (text, random, zero and run regions) whose
/// size is not a multiple of 512.
fn compressed_convert(ctx: &mut Ctx, cb: u32, ctype: &str) -> PathBuf {
    let cs = 1u64 << cb;
    let size = match cb {
        9 => 3 * M / 2 + 333,
        12 => 2 * M + 4444,
        16 => 3 * M + 55_555,
        21 => 5 * M + 1000,
        _ => unreachable!(),
    };
    ctx.source("source.img", size);
    ctx.convert(
        "source.img",
        "disk.qcow2",
        true,
        &format!("cluster_size={cs},compression_type={ctype}"),
    )
}

pub(super) fn compressed_convert_zlib_512(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 9, "zlib")
}
pub(super) fn compressed_convert_zlib_4k(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 12, "zlib")
}
pub(super) fn compressed_convert_zlib_64k(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 16, "zlib")
}
pub(super) fn compressed_convert_zlib_2m(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 21, "zlib")
}
pub(super) fn compressed_convert_zstd_512(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 9, "zstd")
}
pub(super) fn compressed_convert_zstd_4k(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 12, "zstd")
}
pub(super) fn compressed_convert_zstd_64k(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 16, "zstd")
}
pub(super) fn compressed_convert_zstd_2m(ctx: &mut Ctx) -> PathBuf {
    compressed_convert(ctx, 21, "zstd")
}

/// A compressed partial last cluster (zero-padded to a whole cluster before compression).
pub(super) fn compressed_partial_last_cluster_zlib(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let size = 3 * cs + 17 * 512;
    let img = ctx.create("disk.qcow2", size, "compression_type=zlib");
    let c = vec![
        ctx.wc(0, cs),
        ctx.w(cs + 5, 1000),
        ctx.wc(2 * cs, cs),
        ctx.wc(3 * cs, 17 * 512),
    ];
    ctx.io("disk.qcow2", &c);
    img
}

/// The same made by `convert -c` from a raw file ending mid-sector, zstd, 8 KiB clusters.
pub(super) fn compressed_partial_last_cluster_zstd(ctx: &mut Ctx) -> PathBuf {
    ctx.source("source.img", 37 * 8192 + 3 * 512 + 200);
    ctx.convert(
        "source.img",
        "disk.qcow2",
        true,
        "cluster_size=8192,compression_type=zstd",
    )
}

/// Copy-on-write of compressed clusters: partial writes inside one and across two,
/// a partial zero write, a full discard and a full unmapping zero write.
fn compressed_cow(ctx: &mut Ctx, cb: u32, ctype: &str) -> PathBuf {
    let cs = 1u64 << cb;
    let tail = if cs > 512 { cs / 2 } else { 0 };
    let size = 8 * cs + tail;
    let img = ctx.create(
        "disk.qcow2",
        size,
        &format!("cluster_size={cs},compression_type={ctype}"),
    );
    let mut c = Vec::new();
    for i in 0..8 {
        c.push(ctx.wc(i * cs, cs));
    }
    if tail > 0 {
        c.push(ctx.wc(8 * cs, tail));
    }
    c.extend([
        ctx.w(cs / 2 + 3, (cs / 4).min(1000)), // inside cluster 0
        ctx.w(2 * cs - cs / 4, cs / 2),        // across clusters 1 and 2
        z(3 * cs + cs / 4, cs / 4),            // partial zero write
        discard(4 * cs, cs),
        zu(5 * cs, cs),
        z(6 * cs, cs),
    ]);
    if tail > 0 {
        c.push(ctx.w(8 * cs + 7, 100)); // into the compressed partial last cluster
    }
    ctx.io("disk.qcow2", &c);
    img
}

pub(super) fn compressed_cow_zlib_64k(ctx: &mut Ctx) -> PathBuf {
    compressed_cow(ctx, 16, "zlib")
}
pub(super) fn compressed_cow_zstd_512(ctx: &mut Ctx) -> PathBuf {
    compressed_cow(ctx, 9, "zstd")
}

/// Compressed clusters in a compat=0.10 image: convert -c, then write -c and COW.
pub(super) fn compressed_v2(ctx: &mut Ctx) -> PathBuf {
    ctx.source("source.img", 700 * K + 100);
    let img = ctx.convert(
        "source.img",
        "disk.qcow2",
        true,
        "compat=0.10,cluster_size=4096",
    );
    ctx.resize("disk.qcow2", 900 * K);
    let c = vec![
        ctx.wc(800 * K, 4096),
        ctx.wc(804 * K, 4096),
        ctx.w(806 * K + 1, 50),
        ctx.w(10 * K + 3, 3000),
        ctx.wc(896 * K, 4096),
    ];
    ctx.io("disk.qcow2", &c);
    img
}

/// Compressed clusters with extended L2 entries, in an overlay: partial writes over
/// compressed clusters, subcluster writes next to them, the rest from the backing file.
pub(super) fn compressed_extended_l2(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let sc = cs / 32;
    let size = 10 * cs + 5 * 512;
    ctx.filled_base(size, "", 77_777);
    let img = ctx.top_over_base(None, "extended_l2=on,compression_type=zstd");
    let mut c = Vec::new();
    for i in 0..6 {
        c.push(ctx.wc(i * cs, cs));
    }
    c.extend([
        ctx.w(cs + 3 * sc + 5, 100),
        ctx.w(2 * cs - sc, 2 * sc),
        z(3 * cs + 4 * sc, 2 * sc),
        discard(4 * cs, cs),
        ctx.w(7 * cs + 3 * sc, sc),
        z(8 * cs + sc, sc / 2),
        ctx.wc(10 * cs, 5 * 512),
    ]);
    ctx.io("top.qcow2", &c);
    img
}

/// Compressed clusters shared by the active image and two snapshots.
pub(super) fn compressed_shared_by_snapshots(ctx: &mut Ctx) -> PathBuf {
    ctx.source("source.img", M + 5000);
    let img = ctx.convert(
        "source.img",
        "disk.qcow2",
        true,
        "cluster_size=16384,compression_type=zlib",
    );
    let cs = 16 * K;
    ctx.snapshot("disk.qcow2", "s1");
    let c = vec![
        ctx.w(cs + 100, 200),
        ctx.w(5 * cs - 10, 20),
        z(7 * cs, cs),
        discard(9 * cs, cs),
    ];
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "s2");
    let c = vec![
        ctx.w(12 * cs + 1, 3 * cs),
        discard(20 * cs, 4 * cs),
        ctx.w(cs + 150, 10),
    ];
    ctx.io("disk.qcow2", &c);
    img
}
