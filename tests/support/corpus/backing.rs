//! Backing chains: sizes that differ between layers, hidden data, raw and un-typed
//! backing files, a deep chain across nested directories.

use crate::support::images::*;
use crate::support::patch;
use std::path::PathBuf;

/// The overlay is larger than its backing file: reads past the backing file's end are
/// zeros, also in clusters straddling it.
pub(super) fn backing_smaller(ctx: &mut Ctx) -> PathBuf {
    let bsize = M + 1536;
    ctx.filled_base(bsize, "", 65_000);
    let img = ctx.top_over_base(Some(3 * M + 512), "cluster_size=4096");
    let c = vec![
        ctx.w(1000, 2000),
        ctx.w(bsize - 700, 1400), // across the backing file's end
        ctx.w(2 * M + 3, 5000),
    ];
    ctx.io("top.qcow2", &c);
    img
}

/// The backing file is larger than the overlay: nothing past the overlay's size shows.
pub(super) fn backing_larger(ctx: &mut Ctx) -> PathBuf {
    let bsize = 4 * M;
    ctx.filled_base(bsize, "", 99_999);
    let tsize = 3 * M / 2 + 512;
    let img = ctx.top_over_base(Some(tsize), "cluster_size=16384");
    let c = vec![ctx.w(5000, 20_000), ctx.w(tsize - 600, 600)];
    ctx.io("top.qcow2", &c);
    img
}

/// The overlay was grown after creation: the new area reads as zeros, not as the
/// backing file's (larger) content.
pub(super) fn overlay_grown(ctx: &mut Ctx) -> PathBuf {
    ctx.filled_base(3 * M, "", 70_000);
    // The overlay starts at 1 MiB: the base's data beyond that must never show.
    let img = ctx.top_over_base(Some(M), "");
    let c = vec![ctx.w(M - 1000, 1000)];
    ctx.io("top.qcow2", &c);
    ctx.resize("top.qcow2", 5 * M / 2 + 512);
    let c = vec![ctx.w(M - 100, 300), ctx.w(2 * M, 4096)];
    ctx.io("top.qcow2", &c);
    img
}

/// The overlay was shrunk: data beyond the new size (its own and the backing file's) is
/// hidden.
pub(super) fn overlay_shrunk(ctx: &mut Ctx) -> PathBuf {
    ctx.filled_base(3 * M, "", 70_000);
    let img = ctx.top_over_base(None, "");
    let c = vec![ctx.w(M / 2, 3000), ctx.w(2 * M, 5000)];
    ctx.io("top.qcow2", &c);
    ctx.resize("top.qcow2", M + 512);
    img
}

/// base (4 MiB, data everywhere, plus VM state) <- mid (1 MiB + 512) <- top (4 MiB): the
/// base's data past 1 MiB + 512 is hidden by the smaller middle layer.
pub(super) fn backing_hidden_by_small_middle(ctx: &mut Ctx) -> PathBuf {
    ctx.create("base.qcow2", 4 * M, "cluster_size=8192");
    let mut c = ctx.fill(0, 4 * M, 123_456);
    c.push(ctx.wb(0, 20_480));
    ctx.io("base.qcow2", &c);
    ctx.overlay("mid.qcow2", "base.qcow2", "qcow2", Some(M + 512), "");
    let c = vec![ctx.w(100_000, 1000), ctx.w(M - 10, 522)];
    ctx.io("mid.qcow2", &c);
    let img = ctx.overlay("top.qcow2", "mid.qcow2", "qcow2", Some(4 * M), "");
    let c = vec![ctx.w(M - 300, 200), ctx.w(3 * M, 1000)];
    ctx.io("top.qcow2", &c);
    img
}

/// VM-state data in the backing file (512-byte clusters, so it sits just past the disk at
/// 128 KiB) and in the overlay: neither may appear in any disk view.
pub(super) fn backing_vmstate_hidden(ctx: &mut Ctx) -> PathBuf {
    ctx.create("base.qcow2", 100 * K, "cluster_size=512");
    let mut c = ctx.fill(0, 100 * K, 7000);
    c.push(ctx.wb(0, 50_176));
    c.push(ctx.wb(70_144, 512));
    ctx.io("base.qcow2", &c);
    let img = ctx.top_over_base(Some(512 * K), "cluster_size=512");
    let c = vec![ctx.w(99 * K, 2 * K), ctx.wb(0, 10_240), ctx.w(300 * K, 512)];
    ctx.io("top.qcow2", &c);
    img
}

/// A raw backing file.
pub(super) fn backing_raw(ctx: &mut Ctx) -> PathBuf {
    ctx.source("base.img", 2 * M + 1536);
    let img = ctx.overlay(
        "top.qcow2",
        "base.img",
        "raw",
        Some(3 * M),
        "cluster_size=32768",
    );
    let c = vec![
        ctx.w(70_000, 100_000),
        z(M, 65536),
        ctx.w(2 * M + 1000, 1000),
    ];
    ctx.io("top.qcow2", &c);
    img
}

/// A raw backing file whose length is not a multiple of 512 (QEMU rounds a raw file's
/// size up to whole sectors).
pub(super) fn backing_raw_unaligned(ctx: &mut Ctx) -> PathBuf {
    ctx.source("base.img", M + 1000);
    let img = ctx.overlay(
        "top.qcow2",
        "base.img",
        "raw",
        Some(2 * M),
        "cluster_size=4096",
    );
    let c = vec![ctx.w(5000, 3000)];
    ctx.io("top.qcow2", &c);
    img
}

/// A qcow2 backing file named without a backing-format extension (the extension is
/// renamed to an unknown type, which both readers skip): QEMU probes it, qcow2fs accepts
/// it because it is qcow2.
pub(super) fn backing_format_absent(ctx: &mut Ctx) -> PathBuf {
    ctx.filled_base(2 * M, "", 300_000);
    let img = ctx.top_over_base(None, "");
    let c = vec![ctx.w(M, 3333)];
    ctx.io("top.qcow2", &c);
    patch::retype_extension(&img, patch::EXT_BACKING_FORMAT, 0x7777_0001);
    img
}

/// Nine layers with mixed cluster sizes, versions, extended L2, zstd, refcount widths, a
/// raw base, sizes growing and shrinking, relative names in nested directories (down and
/// `..` up) and one absolute name:
///
/// ```text
/// a/top.qcow2            cb16 lazy refcounts        -> ../l7.qcow2
/// l7.qcow2               cb17 extended L2, zstd     -> /abs/a/b/e/l6.qcow2
/// a/b/e/l6.qcow2         cb15 refcount_bits=1       -> ../../l5.qcow2
/// a/l5.qcow2             cb12 v2, compressed        -> b/l4.qcow2
/// a/b/l4.qcow2           cb21, 1.5 MiB (hides), only VM state -> c/l3.qcow2
/// a/b/c/l3.qcow2         cb14 extended L2           -> l2.qcow2
/// a/b/c/l2.qcow2         cb16 zstd                  -> d/l1.qcow2
/// a/b/c/d/l1.qcow2       cb9 v2, 2.5 MiB            -> base.img (raw)
/// a/b/c/d/base.img       raw, 3 MiB - 1.5 KiB
/// ```
pub(super) fn deep_chain(ctx: &mut Ctx) -> PathBuf {
    ctx.mkdir("a/b/c/d");
    ctx.mkdir("a/b/e");
    ctx.source("a/b/c/d/base.img", 3 * M - 1536);
    let abs_l6 = ctx.path("a/b/e/l6.qcow2").to_string_lossy().into_owned();
    let layers: [(&str, &str, &str, u64, &str); 8] = [
        (
            "a/b/c/d/l1.qcow2",
            "base.img",
            "raw",
            5 * M / 2,
            "compat=0.10,cluster_size=512",
        ),
        (
            "a/b/c/l2.qcow2",
            "d/l1.qcow2",
            "qcow2",
            3 * M,
            "compression_type=zstd",
        ),
        (
            "a/b/c/l3.qcow2",
            "l2.qcow2",
            "qcow2",
            7 * M / 2,
            "extended_l2=on,cluster_size=16384",
        ),
        (
            "a/b/l4.qcow2",
            "c/l3.qcow2",
            "qcow2",
            3 * M / 2,
            "cluster_size=2097152",
        ),
        (
            "a/l5.qcow2",
            "b/l4.qcow2",
            "qcow2",
            4 * M,
            "compat=0.10,cluster_size=4096",
        ),
        (
            "a/b/e/l6.qcow2",
            "../../l5.qcow2",
            "qcow2",
            4 * M,
            "cluster_size=32768,refcount_bits=1",
        ),
        (
            "l7.qcow2",
            &abs_l6,
            "qcow2",
            9 * M / 2,
            "extended_l2=on,cluster_size=131072,compression_type=zstd",
        ),
        (
            "a/top.qcow2",
            "../l7.qcow2",
            "qcow2",
            9 * M / 2 + 512,
            "lazy_refcounts=on",
        ),
    ];
    // Layer k (1..=8) writes part of its own window [k * 128 KiB, (k+1) * 128 KiB), which
    // no other layer writes, so every layer shows through to the top somewhere (128 KiB is
    // the largest cluster above l4). Above the windows, overlapping stripes from every
    // layer override each other (and past 1.5 MiB, l4 hides everything below it).
    let window = 128 * K;
    let slot = 23 * K + 77;
    let stride = 9 * slot;
    for (k, (rel, backing, fmt, size, opts)) in layers.iter().enumerate() {
        ctx.overlay(rel, backing, fmt, Some(*size), opts);
        let k = k as u64 + 1;
        let mut c = Vec::new();
        if *rel == "a/l5.qcow2" {
            // Compressed clusters first, while they are still unallocated in this layer.
            for i in 0..8 {
                c.push(ctx.wc(k * window + 80 * K + i * 4096, 4096));
            }
        }
        // l4's one 2 MiB cluster would cover its whole disk: it holds only VM state, so
        // the layers below show through it (up to its size).
        if *rel != "a/b/l4.qcow2" {
            c.push(ctx.w(k * window + 1000 + 37 * k, 50_000 + 1111 * k));
            let mut off = 9 * window + k * slot;
            while off + slot < *size {
                c.push(ctx.w(off, slot + slot / 2));
                off += stride;
            }
        }
        match *rel {
            "a/b/c/l2.qcow2" => c.extend([z(M + 60 * K, 64 * K), discard(2 * M, 128 * K)]),
            "a/b/c/l3.qcow2" => c.extend([z(M / 2 + 1024, 3000), zu(3 * M, 32 * K)]),
            "a/b/l4.qcow2" => c.push(ctx.wb(0, 30_208)),
            "a/b/e/l6.qcow2" => c.push(z(3 * M + 32 * K, 64 * K)),
            "a/top.qcow2" => c.push(ctx.w(*size - 1000, 1000)),
            _ => {}
        }
        ctx.io(rel, &c);
    }
    ctx.path("a/top.qcow2")
}
