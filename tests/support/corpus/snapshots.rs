//! Internal snapshots: content, IDs and names, disk sizes, VM state, overlays, v2,
//! extended L2, narrow refcounts.

use super::extended_l2::subcluster_ops;
use crate::support::images::*;
use crate::support::patch;
use std::path::PathBuf;

/// Three snapshots with distinct content: overwrites, zero writes, discards and
/// compressed writes between them.
pub(super) fn snapshots_distinct(ctx: &mut Ctx) -> PathBuf {
    let cs = 64 * K;
    let img = ctx.create("disk.qcow2", 2 * M + 1536, "");
    let c = ctx.fill(0, M, 77_000);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "first");
    let c = vec![
        ctx.w(1000, 5000),
        z(2 * cs, cs),
        discard(4 * cs, 2 * cs),
        ctx.wc(20 * cs, cs),
    ];
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "second");
    let c = vec![
        ctx.w(3000, 5000),
        ctx.w(2 * cs + 100, 100),
        ctx.w(20 * cs + 50, 50),
        zu(8 * cs, cs),
        ctx.w(2 * M, 1536),
    ];
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "third");
    let c = vec![ctx.w(0, 100), discard(0, M)];
    ctx.io("disk.qcow2", &c);
    img
}

/// ID gaps (ID 2 deleted), duplicate names ("dup" twice) and names equal to other
/// snapshots' IDs ("1" is ID 4's name, "3" is ID 5's).
pub(super) fn snapshots_id_gap_dup_names(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", M, "cluster_size=4096");
    for (i, name) in ["dup", "mid", "dup", "1", "3"].into_iter().enumerate() {
        let c = vec![ctx.w(i as u64 * 150_000 + 4321, 200_000)];
        ctx.io("disk.qcow2", &c);
        ctx.snapshot("disk.qcow2", name);
    }
    ctx.delete_snapshot("disk.qcow2", "mid"); // ID 2
    let c = vec![ctx.w(0, 3000)];
    ctx.io("disk.qcow2", &c);
    img
}

/// A snapshot taken at 64 KiB, then the disk grown to 1 MiB: the snapshot's disk_size
/// differs from the current size and (512-byte clusters) its L1 table is much shorter.
pub(super) fn snapshot_disk_size_grown(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", 64 * K, "cluster_size=512");
    let c = ctx.fill(0, 64 * K, 5000);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "small");
    ctx.resize("disk.qcow2", M + 512);
    let c = vec![ctx.w(60 * K, 10 * K), ctx.w(M - 100, 612)];
    ctx.io("disk.qcow2", &c);
    img
}

/// A snapshot taken at 2 MiB + 512, then the disk shrunk: the snapshot is larger than
/// the current disk.
pub(super) fn snapshot_disk_size_shrunk(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", 2 * M + 512, "cluster_size=16384");
    let c = ctx.fill(0, 2 * M + 512, 50_000);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "big");
    ctx.resize("disk.qcow2", M / 2 + 1024);
    let c = vec![ctx.w(1000, 1000)];
    ctx.io("disk.qcow2", &c);
    img
}

/// VM-state data saved with a snapshot (written with `write -b`, then the snapshot's
/// vm_state_size set, as savevm would) and VM-state data in the active L1 afterwards.
pub(super) fn snapshot_vmstate(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", M + 512, "cluster_size=4096");
    let mut c = ctx.fill(0, M / 2, 40_000);
    c.push(ctx.wb(0, 100_352));
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "with-state");
    patch::set_snapshot_vm_state_size(&img, 0, 100_352);
    let c = vec![ctx.w(500, 500), ctx.wb(0, 200_192), ctx.w(M, 512)];
    ctx.io("disk.qcow2", &c);
    img
}

/// Snapshots of an overlay read through the current backing file, which is changed
/// (rebase -u) after the first snapshot.
pub(super) fn snapshots_of_overlay(ctx: &mut Ctx) -> PathBuf {
    ctx.create("base1.qcow2", 2 * M, "");
    let c = ctx.fill(0, 2 * M, 200_000);
    ctx.io("base1.qcow2", &c);
    ctx.create("base2.qcow2", 2 * M, "cluster_size=4096");
    let c = ctx.fill(0, 2 * M, 210_000);
    ctx.io("base2.qcow2", &c);
    let img = ctx.overlay("top.qcow2", "base1.qcow2", "qcow2", None, "");
    let c = vec![ctx.w(10_000, 100_000)];
    ctx.io("top.qcow2", &c);
    ctx.snapshot("top.qcow2", "s1");
    ctx.img(&[
        "rebase",
        "-u",
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    let c = vec![ctx.w(50_000, 100_000), z(M, 64 * K)];
    ctx.io("top.qcow2", &c);
    ctx.snapshot("top.qcow2", "s2");
    let c = vec![discard(0, 2 * M)];
    ctx.io("top.qcow2", &c);
    img
}

/// Snapshots in a compat=0.10 image.
pub(super) fn snapshots_v2(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", M + 1536, "compat=0.10,cluster_size=8192");
    let c = ctx.fill(0, M, 90_000);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "a");
    let c = vec![
        ctx.w(100, 20_000),
        z(64 * K, 64 * K),
        discard(256 * K, 64 * K),
    ];
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "b");
    let c = vec![ctx.w(200, 100), ctx.w(M, 1536)];
    ctx.io("disk.qcow2", &c);
    img
}

/// Snapshots with extended L2: subcluster writes before and after.
pub(super) fn snapshots_extended_l2(ctx: &mut Ctx) -> PathBuf {
    let cs = 32 * K;
    let img = ctx.create(
        "disk.qcow2",
        6 * cs + 512,
        "extended_l2=on,cluster_size=32768",
    );
    let c = subcluster_ops(ctx, cs);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "x");
    let sc = cs / 32;
    let c = vec![
        ctx.w(5 * sc + 10, 10),
        z(cs + 8 * sc, 2 * sc),
        ctx.w(2 * cs + 4 * sc, sc),
        discard(0, cs),
    ];
    ctx.io("disk.qcow2", &c);
    img
}

/// refcount_bits=2 with one snapshot (the most it can hold while staying revertible).
pub(super) fn snapshot_refcount_bits_2(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", M, "refcount_bits=2,cluster_size=4096");
    let c = ctx.fill(0, M / 2, 30_000);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "only");
    let c = vec![ctx.w(5000, 10_000), ctx.w(M / 2, 4096)];
    ctx.io("disk.qcow2", &c);
    img
}

/// The snapshot table is the last thing in the file (the snapshot was the last
/// operation): QEMU does not pad the last entry to 8 bytes, so the file ends inside it.
pub(super) fn snapshot_table_at_eof(ctx: &mut Ctx) -> PathBuf {
    let img = ctx.create("disk.qcow2", M + 512, "cluster_size=16384");
    let c = ctx.fill(0, M / 2, 60_000);
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "a");
    let c = vec![ctx.w(1000, 30_000)];
    ctx.io("disk.qcow2", &c);
    ctx.snapshot("disk.qcow2", "last");
    img
}
