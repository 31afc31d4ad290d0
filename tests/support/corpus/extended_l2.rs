//! Extended L2 entries: subcluster allocation and zero bits, over a backing file or not,
//! preallocated under a backing file.

use crate::support::images::*;
use std::path::PathBuf;

/// Subcluster operations on an extended-L2 image: partial and exact subcluster writes
/// (the rest of such a cluster is allocated-but-unallocated and reads through the backing
/// file or as zeros), zero subclusters in allocated and unallocated clusters, subcluster
/// and whole-cluster discards, a write across a cluster boundary, a partial last cluster.
pub(super) fn subcluster_ops(ctx: &mut Ctx, cs: u64) -> Vec<String> {
    let sc = cs / 32;
    vec![
        // cluster 0
        ctx.w(3 * sc + 100, sc / 2),
        ctx.w(5 * sc, 2 * sc),
        z(10 * sc, 3 * sc),
        ctx.w(31 * sc - 100, 300), // into cluster 1, subcluster 0
        // cluster 1
        ctx.w(cs + 8 * sc, 8 * sc),
        z(cs + 9 * sc, sc),
        zu(cs + 12 * sc, 2 * sc),
        discard(cs + 14 * sc, 2 * sc),
        // cluster 2: zeros in an unallocated cluster, then a little data
        z(2 * cs + 4 * sc, 3 * sc),
        ctx.w(2 * cs + 20 * sc + 7, 100),
        // cluster 3: written, then discarded whole
        ctx.w(3 * cs + sc, 3 * sc),
        discard(3 * cs, cs),
        // partial last cluster
        ctx.w(4 * cs + 2 * sc, 3 * sc + 50),
    ]
}

fn extended_l2(ctx: &mut Ctx, cs: u64) -> PathBuf {
    let size = 4 * cs + 7 * (cs / 32) + 512;
    ctx.create("base.qcow2", size, "cluster_size=65536");
    let piece = (size / 40).max(4000) + 13;
    let c = ctx.fill(0, size, piece);
    ctx.io("base.qcow2", &c);
    let img = ctx.top_over_base(None, &format!("extended_l2=on,cluster_size={cs}"));
    let c = subcluster_ops(ctx, cs);
    ctx.io("top.qcow2", &c);
    img
}

pub(super) fn extended_l2_16k(ctx: &mut Ctx) -> PathBuf {
    extended_l2(ctx, 16 * K)
}
pub(super) fn extended_l2_32k(ctx: &mut Ctx) -> PathBuf {
    extended_l2(ctx, 32 * K)
}
pub(super) fn extended_l2_64k(ctx: &mut Ctx) -> PathBuf {
    extended_l2(ctx, 64 * K)
}
pub(super) fn extended_l2_512k(ctx: &mut Ctx) -> PathBuf {
    extended_l2(ctx, 512 * K)
}
pub(super) fn extended_l2_2m(ctx: &mut Ctx) -> PathBuf {
    extended_l2(ctx, 2 * M)
}

/// Extended L2 without a backing file: unallocated subclusters read as zeros.
pub(super) fn extended_l2_no_backing(ctx: &mut Ctx) -> PathBuf {
    let cs = 32 * K;
    let img = ctx.create(
        "disk.qcow2",
        4 * cs + 7 * (cs / 32) + 512,
        "extended_l2=on,cluster_size=32768",
    );
    let c = subcluster_ops(ctx, cs);
    ctx.io("disk.qcow2", &c);
    img
}

/// preallocation=metadata under a backing file (allowed only with extended L2): every
/// cluster has a host offset but no allocated subcluster, so reads go to the backing file.
pub(super) fn extended_l2_prealloc_metadata_backing(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let size = 12 * cs + 1536;
    ctx.filled_base(size, "cluster_size=8192", 33_333);
    let img = ctx.top_over_base(None, "extended_l2=on,preallocation=metadata");
    let c = subcluster_ops(ctx, cs);
    ctx.io("top.qcow2", &c);
    img
}
