//! Persistent dirty bitmaps: kept valid on read-write mounts as QEMU keeps them (the same
//! dirty extents QEMU records for the same writes, zeroing and discards, read back with
//! QEMU's own tools), in use while written and inconsistent after `kill -9`, refused
//! read-write when damaged, `qcow2fs bitmap` against `qemu-img bitmap` (offline and on a
//! mount), the `bitmaps/NAME.raw` views, copy-on-read and snapshots.

mod support;

use serde_json::Value;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use support::images::create_image;
use support::patch::{
    Cluster0, EXT_BITMAPS, bitmap_entry_offset, file_len, hdr, put8, put32, put64, read_be64,
};
use support::*;

/// The disk of the write scenarios, and its bitmaps: (name, granularity, enabled).
const SIZE: u64 = 256 * M;
const BITMAPS: &[(&str, u64, bool)] = &[
    ("g512", 512, true),
    ("g4k", 4 * K, true),
    ("g64k", 64 * K, true),
    ("g1m", M, true),
    ("g64m", 64 * M, true),
    ("off", 64 * K, false),
    ("off512", 512, false),
];

fn show(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `qemu-img bitmap ARGS` on `image`.
fn qemu_bitmap(image: &Path, args: &[&str]) {
    let mut all = vec!["bitmap"];
    all.extend_from_slice(args);
    let img = show(image);
    all.insert(all.len() - 1, &img);
    qemu_img(&image_dir(image), &all);
}

/// An image with data and the bitmaps of [`BITMAPS`], with some writes already recorded.
fn image_with_bitmaps(dir: &Path) -> PathBuf {
    let img = create_image(dir, "disk.qcow2", Some(SIZE), "", None);
    qemu_io(&img, &["write -P 0x11 0 8M", "write -P 0x22 100M 4M"]);
    for &(name, g, enabled) in BITMAPS {
        let g = g.to_string();
        let mut args = vec!["--add", "-g", &g];
        if !enabled {
            args.push("--disable");
        }
        args.push(name);
        qemu_bitmap(&img, &args);
    }
    qemu_io(&img, &["write -P 0x33 32M 192k"]);
    img
}

/// One operation on the disk, done through the mount or by qemu-io.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write(o, l, p) => format!("write -P {p:#x} {o} {l}"),
            Op::Zero(o, l) => format!("write -z {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        }
    }

    fn apply(&self, f: &File) {
        let r = match *self {
            Op::Write(o, l, p) => f.write_all_at(&vec![p; l as usize], o),
            Op::Zero(o, l) => fallocate(
                f,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            ),
            Op::Discard(o, l) => fallocate(
                f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            ),
        };
        r.unwrap_or_else(|e| panic!("{self:?} through the mount: {e}"));
    }
}

/// Random writes, zeroing and discards, 4 KiB-aligned (what the kernel passes on as is).
fn random_ops(name: &str, n: usize, size: u64) -> Vec<Op> {
    let mut rng = Rng::named(name);
    (0..n)
        .map(|_| {
            let off = rng.below(size / (4 * K)) * 4 * K;
            let len = (rng.range(1, 200) * 4 * K).min(size - off);
            match rng.below(10) {
                0..=5 => Op::Write(off, len, rng.range(1, 255) as u8),
                6 | 7 => Op::Zero(off, len),
                _ => Op::Discard(off, len),
            }
        })
        .collect()
}

/// The data extents of a file as (offset, length), walked with SEEK_DATA and SEEK_HOLE.
fn seek_extents(path: &Path) -> Vec<(u64, u64)> {
    data_extents(path)
        .into_iter()
        .map(|(start, end)| (start, end - start))
        .collect()
}

/// `qcow2fs bitmap dump --json TARGET NAME`.
fn dump(dir: &Path, target: &Path, name: &str) -> Vec<(u64, u64)> {
    let v = qcow2fs_json(dir, &["bitmap", "dump", "--json", &show(target), name]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// The bitmaps qemu-img info lists: (name, granularity, flags).
fn qemu_bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = qemu_info_json_shared(image);
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| bitmap_list(a))
        .unwrap_or_default()
}

/// A JSON list of bitmaps (qemu-img info's or `qcow2fs bitmap list`'s) as (name,
/// granularity, flags).
fn bitmap_list(list: &[Value]) -> Vec<(String, u64, Vec<String>)> {
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags,
            )
        })
        .collect()
}

/// The bytes QEMU's `dirty-bytes` counts for bitmap `name` of granularity `g`: its dirty
/// chunks (as QEMU reads the extents) times the granularity.
fn qemu_dirty_bytes(image: &Path, name: &str, g: u64) -> u64 {
    let chunks: u64 = qemu_dirty_extents(image, name)
        .iter()
        .map(|&(o, l)| (o + l).div_ceil(g) - o / g)
        .sum();
    chunks * g
}

/// A copy of `img` named `name` beside it, given `ops` by qemu-io: QEMU's record of them.
fn qemu_copy_with(img: &Path, name: &str, ops: &[Op]) -> PathBuf {
    let copy = image_dir(img).join(name);
    fs::copy(img, &copy).unwrap();
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    qemu_io(&copy, &cmds);
    copy
}

/// Applies `ops` to the disk of `m` and syncs it.
fn apply_through(m: &Mount, ops: &[Op]) {
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    for op in ops {
        op.apply(&disk);
    }
    disk.sync_all().unwrap();
}

/// Checks that QEMU accepts every bitmap of `image` (none inconsistent, the format right):
/// `qemu-img bitmap --merge` of each into a scratch bitmap, removed afterwards.
fn assert_qemu_merges_every_bitmap(image: &Path) {
    let names: Vec<String> = qemu_bitmaps(image).into_iter().map(|b| b.0).collect();
    qemu_bitmap(image, &["--add", "scratch"]);
    for n in &names {
        qemu_bitmap(image, &["--merge", n, "scratch"]);
    }
    qemu_bitmap(image, &["--remove", "scratch"]);
}

/// The dirty extents QEMU reads from every bitmap of `image`.
fn qemu_all_extents(image: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    BITMAPS
        .iter()
        .map(|&(n, _, _)| (n.to_string(), qemu_dirty_extents(image, n)))
        .collect()
}

#[test]
fn writes_zeroing_and_discards_are_recorded_as_qemu_records_them() {
    let tmp = tempdir();
    let img = image_with_bitmaps(tmp.path());
    let ops = random_ops("bitmaps-record", 48, SIZE);
    // QEMU's record of the same operations.
    let copy = qemu_copy_with(&img, "qemu.qcow2", &ops);
    let want = qemu_all_extents(&copy);
    assert!(
        want.iter().any(|(n, e)| n == "g4k" && e.len() > 10),
        "the workload dirtied too little to test anything: {want:?}"
    );
    let mnt = mountpoint(tmp.path(), "mnt");
    let m = Mount::new(&img, &mnt, &["rw"]);
    // While written, the bitmaps are in use in the file.
    apply_through(&m, &ops);
    for (name, _, flags) in qemu_bitmaps(&img) {
        assert!(
            flags.contains(&"in-use".to_string()),
            "bitmap {name} is not in use while the mount writes: {flags:?}"
        );
    }
    // The live views and `bitmap dump` show what QEMU recorded.
    for (name, extents) in &want {
        let view = m.path(&format!("bitmaps/{name}.raw"));
        assert_eq!(&seek_extents(&view), extents, "bitmaps/{name}.raw");
        assert_eq!(&dump(tmp.path(), &mnt, name), extents, "dump of {name}");
        let dirty: u64 = extents.iter().map(|e| e.1).sum();
        assert_eq!(
            fs::metadata(&view).unwrap().blocks() * 512,
            dirty,
            "st_blocks of bitmaps/{name}.raw"
        );
    }
    check_view_content(&m, "g64k", &want);
    m.umount();
    // QEMU reads the same bitmaps from both images, none in use.
    assert_eq!(qemu_all_extents(&img), want);
    assert_eq!(qemu_bitmaps(&img), qemu_bitmaps(&copy));
    // (The disks' content may differ: QEMU's discard leaves partial clusters as they
    // were, a punched hole reads as zeros.)
    assert_check_clean(&img);
    assert_qemu_merges_every_bitmap(&img);
    // A read-only mount shows the stored bitmaps.
    let m = Mount::new(&img, &mnt, &[]);
    for (name, extents) in &want {
        assert_eq!(
            &seek_extents(&m.path(&format!("bitmaps/{name}.raw"))),
            extents,
            "bitmaps/{name}.raw, read-only"
        );
    }
    check_view_content(&m, "g512", &want);
    m.umount();
}

/// The view of bitmap `name` reads the disk in its dirty extents and zeros elsewhere
/// (sampled at the edges of each extent).
fn check_view_content(m: &Mount, name: &str, want: &[(String, Vec<(u64, u64)>)]) {
    let extents = &want.iter().find(|(n, _)| n == name).unwrap().1;
    let view = File::open(m.path(&format!("bitmaps/{name}.raw"))).unwrap();
    let disk = File::open(m.disk()).unwrap();
    let mut prev_end = 0;
    for &(off, len) in extents {
        for at in [off, off + len - 512] {
            assert_eq!(
                pread_full(&view, at, 512).unwrap(),
                pread_full(&disk, at, 512).unwrap(),
                "bitmaps/{name}.raw at {at:#x} (dirty)"
            );
        }
        if off > prev_end {
            assert_eq!(
                pread_full(&view, off - 512, 512).unwrap(),
                vec![0u8; 512],
                "bitmaps/{name}.raw at {:#x} (clean)",
                off - 512
            );
        }
        prev_end = off + len;
    }
}

#[test]
fn kill9_leaves_the_bitmaps_in_use_and_qemu_calls_them_inconsistent() {
    let tmp = tempdir();
    let img = image_with_bitmaps(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    // A mount that writes nothing leaves the image as it was.
    let before = fs::read(&img).unwrap();
    Mount::new(&img, &mnt, &["rw"]).umount();
    assert!(
        fs::read(&img).unwrap() == before,
        "an idle rw mount changed the image"
    );
    let m = Mount::new(&img, &mnt, &["rw"]);
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    disk.write_all_at(&[5u8; 8192], 64 * M).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    m.kill9();
    for (name, _, flags) in qemu_bitmaps(&img) {
        assert!(
            flags.contains(&"in-use".to_string()),
            "bitmap {name} after kill -9: {flags:?}"
        );
    }
    assert_no_corruption(&img);
    // QEMU refuses the inconsistent bitmaps.
    run_in(
        tmp.path(),
        "qemu-img",
        &["bitmap", "--merge", "g4k", &show(&img), "g64k"],
        process::COMMAND_LIMIT,
    )
    .expect_failure_saying("inconsistent");
    // qcow2fs agrees: no view, no clearing, only removal.
    let m = Mount::new(&img, &mnt, &["rw"]);
    assert!(!m.path("bitmaps").exists(), "views of inconsistent bitmaps");
    qcow2fs_bitmap(tmp.path(), &["--clear", &show(&mnt), "g4k"])
        .expect_failure_saying("inconsistent");
    qcow2fs(tmp.path(), &["bitmap", "--remove", &show(&mnt), "g4k"]);
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    disk.write_all_at(&[6u8; 4096], 65 * M).unwrap();
    drop(disk);
    m.umount();
    let left: Vec<String> = qemu_bitmaps(&img).into_iter().map(|b| b.0).collect();
    assert!(!left.contains(&"g4k".to_string()) && left.len() == BITMAPS.len() - 1);
    for (name, _, flags) in qemu_bitmaps(&img) {
        assert!(flags.contains(&"in-use".to_string()), "{name}: {flags:?}");
    }
    assert_no_corruption(&img);
}

/// Patches that break a bitmap, each with what the refusal must mention.
type Patch = fn(&Path);

fn bad_bitmap_cases() -> Vec<(&'static str, Patch, &'static [&'static str])> {
    fn field(img: &Path, name: &str, at: u64) -> u64 {
        bitmap_entry_offset(img, name) + at
    }
    fn ext_field(img: &Path, at: u64) -> u64 {
        let c0 = Cluster0::load(img);
        c0.ext(EXT_BITMAPS).unwrap().off + 8 + at
    }
    vec![
        (
            "table past the end of the file",
            |img| {
                put64(
                    img,
                    field(img, "b1", 0),
                    file_len(img).next_multiple_of(65536) * 4,
                )
            },
            &["bitmap 'b1'", "past the end"],
        ),
        (
            "table over the L1 table",
            |img| put64(img, field(img, "b1", 0), read_be64(img, hdr::L1_OFFSET)),
            &["bitmap 'b1'", "L1 table"],
        ),
        (
            "in-use bitmap's table over the L1 table",
            |img| {
                put32(img, field(img, "b1", 12), 1 | 2);
                put64(img, field(img, "b1", 0), read_be64(img, hdr::L1_OFFSET));
            },
            &["bitmap 'b1'", "L1 table"],
        ),
        (
            "type 2",
            |img| put8(img, field(img, "b1", 16), 2),
            &["bitmap 'b1'", "type 2"],
        ),
        (
            "granularity 2^32",
            |img| put8(img, field(img, "b1", 17), 32),
            &["bitmap 'b1'", "granularity"],
        ),
        (
            "reserved flag",
            |img| put32(img, field(img, "b1", 12), 2 | 8),
            &["bitmap 'b1'", "reserved flags"],
        ),
        (
            "name used twice",
            |img| support::patch::patch(img, field(img, "b1", 24), b"b0"),
            &["bitmap 'b0'", "twice"],
        ),
        (
            "data cluster over the header",
            |img| {
                let table = read_be64(img, field(img, "b0", 0));
                assert!(table != 0);
                let first = read_be64(img, table);
                assert!(first > 1, "b0 has a data cluster: {first:#x}");
                // Cluster 0 is only allowed as "all zeros"; name the refcount table.
                put64(img, table, read_be64(img, hdr::REFCOUNT_OFFSET));
            },
            &["bitmap 'b0'", "refcount table"],
        ),
        (
            "directory past the end of the file",
            |img| {
                put64(
                    img,
                    ext_field(img, 16),
                    file_len(img).next_multiple_of(65536) * 4,
                )
            },
            &["bitmap directory", "past the end"],
        ),
        (
            "65536 bitmaps",
            |img| put32(img, ext_field(img, 0), 65536),
            &["65536 bitmaps"],
        ),
        (
            "zero bitmaps",
            |img| put32(img, ext_field(img, 0), 0),
            &["0 bitmaps"],
        ),
    ]
}

#[test]
fn bad_bitmaps_refuse_read_write_naming_them_and_mount_read_only() {
    let cases = bad_bitmap_cases();
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    run_each("bad bitmap", &names, |case| {
        let (_, patch, mentions) = cases.iter().find(|c| c.0 == case).unwrap();
        let tmp = tempdir();
        let img = create_image(tmp.path(), "img.qcow2", Some(4 * M), "", None);
        qemu_bitmap(&img, &["--add", "b0"]);
        qemu_bitmap(&img, &["--add", "b1"]);
        qemu_io(&img, &["write -P 0x5a 64k 128k"]);
        let want = qemu_raw(&img);
        patch(&img);
        let before = fs::read(&img).unwrap();
        let mnt = mountpoint(tmp.path(), "mnt");
        let mut all = vec!["img.qcow2"];
        all.extend_from_slice(mentions);
        assert_mount_refused(&img, &mnt, &["rw"], &all);
        let m = Mount::new(&img, &mnt, &[]);
        assert_same_bytes(
            "the disk, read-only",
            &want,
            &read_direct(&m.disk(), 1 << 20),
        );
        m.umount();
        assert!(
            fs::read(&img).unwrap() == before,
            "{case}: the image changed"
        );
    });
}

/// Runs `qcow2fs bitmap ARGS` in `dir`; returns whether it succeeded, and its output.
fn qcow2fs_bitmap(dir: &Path, args: &[&str]) -> Finished {
    let mut all = vec!["bitmap"];
    all.extend_from_slice(args);
    qcow2fs_try(dir, &all)
}

/// The same `bitmap` commands given to qemu-img and to qcow2fs (offline, or on a mount
/// of `ours`), with the same writes between them, leave bitmaps QEMU reads the same.
fn same_as_qemu_img(mounted: bool) {
    let tmp = tempdir();
    let d = tmp.path();
    let theirs = create_image(d, "theirs.qcow2", Some(64 * M), "", None);
    qemu_io(&theirs, &["write -P 1 0 1M"]);
    let ours = d.join("ours.qcow2");
    fs::copy(&theirs, &ours).unwrap();
    let src = create_image(d, "src.qcow2", Some(64 * M), "", None);
    qemu_bitmap(&src, &["--add", "-g", "16k", "ext"]);
    qemu_io(&src, &["write 40M 100k"]);
    let mnt = mountpoint(d, "mnt");
    let m = mounted.then(|| Mount::new(&ours, &mnt, &["rw"]));
    let target = if mounted { show(&mnt) } else { show(&ours) };
    let src_s = show(&src);
    let steps: Vec<Vec<&str>> = vec![
        vec!["--add", "b0"],
        vec!["--add", "-g", "512", "--disable", "b1"],
        vec!["--add", "-g", "1M", "b2"],
    ];
    let writes: &[&[(u64, u64)]] = &[&[(2 * M, 8 * K), (10 * M, 100 * K)], &[(20 * M, 4 * K)]];
    let later: Vec<Vec<&str>> = vec![
        vec!["--merge", "b0", "b1"],
        vec!["--enable", "b1"],
        vec!["--clear", "b0"],
        vec!["--merge", "ext", "-b", &src_s, "b2"],
        vec!["--disable", "--remove", "b0"],
    ];
    let write = |ranges: &[(u64, u64)]| {
        let cmds: Vec<String> = ranges
            .iter()
            .map(|(o, l)| format!("write -P 9 {o} {l}"))
            .collect();
        qemu_io(&theirs, &cmds);
        match &m {
            Some(m) => {
                let f = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
                for &(o, l) in ranges {
                    f.write_all_at(&vec![9u8; l as usize], o).unwrap();
                }
            }
            None => qemu_io(&ours, &cmds),
        }
    };
    let apply = |args: &[&str]| {
        qemu_bitmap(&theirs, args);
        let name = args[args.len() - 1];
        let mut a: Vec<&str> = args[..args.len() - 1].to_vec();
        a.push(&target);
        a.push(name);
        let out = qcow2fs_bitmap(d, &a);
        assert!(out.success(), "qcow2fs bitmap {a:?}: {}", out.describe());
    };
    for s in &steps {
        apply(s);
    }
    write(writes[0]);
    for s in &later {
        apply(s);
    }
    // The subcommand forms do the same as the flags.
    qemu_bitmap(&theirs, &["--add", "-g", "64k", "--disable", "b3"]);
    qemu_bitmap(&theirs, &["--merge", "b2", "b3"]);
    for a in [
        vec!["add", "-g", "64k", "--disable", &target, "b3"],
        vec!["merge", &target, "b3", "b2"],
    ] {
        let out = qcow2fs_bitmap(d, &a);
        assert!(out.success(), "qcow2fs bitmap {a:?}: {}", out.describe());
    }
    write(writes[1]);
    // What both refuse.
    for bad in [
        vec!["--add", "b2"],
        vec!["--remove", "nope"],
        vec!["--add", "-g", "256", "b9"],
        vec!["--add", "-g", "3000", "b9"],
        vec!["--merge", "nope", "b2"],
    ] {
        let mut a = bad.clone();
        let name = a.pop().unwrap();
        a.push(&target);
        a.push(name);
        let out = qcow2fs_bitmap(d, &a);
        assert!(!out.success(), "qcow2fs bitmap {a:?} should fail");
        assert!(out.all_output().lines().count() == 1, "{}", out.describe());
        let mut q = vec!["bitmap"];
        q.extend_from_slice(&bad[..bad.len() - 1]);
        let theirs_s = show(&theirs);
        q.push(&theirs_s);
        q.push(name);
        let qo = run_in(d, "qemu-img", &q, process::COMMAND_LIMIT);
        assert!(!qo.success(), "qemu-img {q:?} should fail too");
    }
    if mounted {
        // Views follow: b0 went, b1 and b2 are shown.
        let views = listing(&mnt.join("bitmaps"));
        assert_eq!(
            views.into_iter().collect::<Vec<_>>(),
            ["b1.raw", "b2.raw", "b3.raw"],
            "bitmaps/ after the changes"
        );
        assert_eq!(
            seek_extents(&mnt.join("bitmaps/b2.raw")),
            qemu_dirty_extents(&theirs, "b2")
        );
    }
    if let Some(m) = m {
        m.umount();
    }
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    for (name, _, _) in qemu_bitmaps(&theirs) {
        assert_eq!(
            qemu_dirty_extents(&ours, &name),
            qemu_dirty_extents(&theirs, &name),
            "bitmap {name}"
        );
        assert_eq!(dump(d, &ours, &name), qemu_dirty_extents(&theirs, &name));
    }
    assert_check_clean(&ours);
    assert_qemu_merges_every_bitmap(&ours);
    // `bitmap list` agrees with qemu-img info.
    let list = qcow2fs_json(d, &["bitmap", "list", "--json", &show(&ours)]);
    assert_eq!(bitmap_list(list.as_array().unwrap()), qemu_bitmaps(&theirs));
    for b in list.as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        let g = b["granularity"].as_u64().unwrap();
        assert_eq!(
            b["dirty-bytes"].as_u64(),
            Some(qemu_dirty_bytes(&theirs, name, g)),
            "{name}"
        );
    }
}

#[test]
fn bitmap_commands_offline_match_qemu_img() {
    same_as_qemu_img(false);
}

#[test]
fn bitmap_commands_on_a_mount_match_qemu_img() {
    same_as_qemu_img(true);
}

#[test]
fn bitmap_changes_are_refused_on_read_only_mounts() {
    let tmp = tempdir();
    let img = create_image(tmp.path(), "img.qcow2", Some(4 * M), "", None);
    qemu_bitmap(&img, &["--add", "b0"]);
    let mnt = mountpoint(tmp.path(), "mnt");
    let before = fs::read(&img).unwrap();
    let m = Mount::new(&img, &mnt, &[]);
    qcow2fs_bitmap(tmp.path(), &["--clear", &show(&mnt), "b0"]).expect_failure_saying("read-only");
    let list = qcow2fs_json(tmp.path(), &["bitmap", "list", "--json", &show(&mnt)]);
    assert_eq!(list[0]["name"], "b0");
    m.umount();
    let m = Mount::new(&img, &mnt, &["bitmaps=off"]);
    assert!(!m.path("bitmaps").exists());
    m.umount();
    assert!(fs::read(&img).unwrap() == before);
}

#[test]
fn copy_on_read_is_not_recorded_and_revert_is_refused_as_in_qemu() {
    let tmp = tempdir();
    let d = tmp.path();
    let base = create_image(d, "base.qcow2", Some(16 * M), "", None);
    qemu_io(&base, &["write -P 0x44 0 4M"]);
    let img = create_image(
        d,
        "top.qcow2",
        Some(16 * M),
        "",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_bitmap(&img, &["--add", "-g", "4k", "b0"]);
    qemu_img(d, &["snapshot", "-c", "s1", "top.qcow2"]);
    let copy = d.join("copy.qcow2");
    fs::copy(&img, &copy).unwrap();
    // QEMU: a copy-on-read of the first 2 MiB, then a write.
    qemu_io_with(&copy, &["-C"], &["read 0 2M", "write -P 7 8M 64k"]);
    let mnt = mountpoint(d, "mnt");
    let m = Mount::new(&img, &mnt, &["rw,copy-on-read"]);
    let disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.disk())
        .unwrap();
    assert_eq!(
        read_direct_at(&disk, 0, 2 * M as usize).unwrap(),
        vec![0x44; 2 * M as usize]
    );
    disk.write_all_at(&[7u8; 64 * K as usize], 8 * M).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    // Revert with bitmaps.
    qcow2fs_try(d, &["snapshot", "revert", &show(&mnt), "s1"]).expect_failure_saying("bitmap");
    let out = run_in(
        d,
        "qemu-img",
        &["snapshot", "-a", "s1", "copy.qcow2"],
        process::COMMAND_LIMIT,
    );
    assert!(!out.success(), "QEMU refuses too: {}", out.describe());
    // Taking a snapshot keeps the bitmaps valid.
    qcow2fs(d, &["snapshot", "create", &show(&mnt), "s2"]);
    qemu_img(d, &["snapshot", "-c", "s2", "copy.qcow2"]);
    m.umount();
    // The copy-on-read did copy (the top image holds the data now).
    let map = qemu_map_json(&img);
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["depth"] == 0 && e["data"] == true && e["start"] == 0),
        "copy-on-read copied nothing: {map}"
    );
    assert_eq!(
        qemu_dirty_extents(&img, "b0"),
        qemu_dirty_extents(&copy, "b0")
    );
    assert_eq!(qemu_dirty_extents(&img, "b0"), vec![(8 * M, 64 * K)]);
    assert_check_clean(&img);
    assert_qemu_merges_every_bitmap(&img);
}

#[test]
fn growing_the_disk_grows_the_bitmaps() {
    let tmp = tempdir();
    let d = tmp.path();
    let img = create_image(d, "img.qcow2", Some(8 * M), "", None);
    qemu_bitmap(&img, &["--add", "-g", "64k", "b0"]);
    let copy = d.join("copy.qcow2");
    fs::copy(&img, &copy).unwrap();
    qemu_io(&copy, &["write 1M 4k", "truncate 24M", "write 20M 4k"]);
    let mnt = mountpoint(d, "mnt");
    let m = Mount::new(&img, &mnt, &["rw"]);
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    disk.write_all_at(&[1u8; 4096], M).unwrap();
    disk.set_len(24 * M).unwrap();
    disk.write_all_at(&[1u8; 4096], 20 * M).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    assert_eq!(
        seek_extents(&m.path("bitmaps/b0.raw")),
        qemu_dirty_extents(&copy, "b0")
    );
    m.umount();
    assert_eq!(
        qemu_dirty_extents(&img, "b0"),
        qemu_dirty_extents(&copy, "b0")
    );
    assert_check_clean(&img);
}

#[test]
fn info_shows_the_bitmaps_with_their_dirty_bytes() {
    let tmp = tempdir();
    let img = image_with_bitmaps(tmp.path());
    let v: Value = qcow2fs_json(tmp.path(), &["info", "--json", &show(&img)]);
    let list = v["dirty-bitmaps"].as_array().expect("dirty-bitmaps");
    assert_eq!(list.len(), BITMAPS.len());
    for (b, &(name, g, enabled)) in list.iter().zip(BITMAPS) {
        assert_eq!(b["name"], name);
        assert_eq!(b["granularity"].as_u64(), Some(g));
        assert_eq!(b["recording"].as_bool(), Some(enabled));
        assert_eq!(
            b["dirty-bytes"].as_u64(),
            Some(qemu_dirty_bytes(&img, name, g)),
            "{name}"
        );
    }
    let text = String::from_utf8(qcow2fs(tmp.path(), &["info", &show(&img)])).unwrap();
    assert!(
        text.contains("g4k (granularity 4096, flags: auto, 196608 dirty bytes)"),
        "{text}"
    );
    // After a crash they are shown inconsistent.
    support::patch::set_bitmap_flags(&img, "g4k", 1);
    let text = String::from_utf8(qcow2fs(tmp.path(), &["info", &show(&img)])).unwrap();
    assert!(
        text.contains("g4k (granularity 4096, flags: in-use, auto, inconsistent)"),
        "{text}"
    );
}

#[test]
fn a_failure_at_any_write_of_the_store_leaves_the_bitmaps_in_use_or_complete() {
    use qcow2fs::block::{BlockDev, Qcow2Layer};
    use qcow2fs::engine::{Image, ImageOptions};
    use qcow2fs::storage::{FaultOp, FaultStorage, FileStorage};
    use std::sync::Arc;
    let tmp = tempdir();
    let d = tmp.path();
    let base = create_image(d, "base.qcow2", Some(64 * M), "", None);
    qemu_bitmap(&base, &["--add", "-g", "4k", "a"]);
    qemu_bitmap(&base, &["--add", "-g", "64k", "--disable", "b"]);
    qemu_bitmap(&base, &["--add", "-g", "512", "c"]);
    qemu_io(&base, &["write -P 1 0 1M"]);
    let writes = [(8 * M, 12 * K), (30 * M, M), (63 * M, 4 * K)];
    let oracle = d.join("oracle.qcow2");
    fs::copy(&base, &oracle).unwrap();
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 2 {o} {l}"))
        .collect();
    qemu_io(&oracle, &cmds);
    let names = ["a", "b", "c"];
    let want: Vec<_> = names
        .iter()
        .map(|n| qemu_dirty_extents(&oracle, n))
        .collect();
    let mut failed_at = 0;
    for n in 0..500 {
        let img = d.join("try.qcow2");
        fs::copy(&base, &img).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let fault = Arc::new(FaultStorage::new(Arc::new(FileStorage::new(file))));
        let opts = ImageOptions {
            writable: true,
            ..Default::default()
        };
        let image = Arc::new(Image::open(&img, fault.clone(), &opts).unwrap());
        let layer = Qcow2Layer::standalone(image.clone()).unwrap();
        for &(o, l) in &writes {
            layer.write_at(&vec![2u8; l as usize], o).unwrap();
        }
        layer.flush().unwrap();
        // The store fails at its n-th write; nothing is written after (rule F6).
        fault.fail_after(FaultOp::Write, n, libc::EIO);
        let closed = image.close();
        drop(layer);
        drop(image);
        assert_no_corruption(&img);
        let flags = qemu_bitmaps(&img);
        let in_use = flags
            .iter()
            .filter(|b| b.2.contains(&"in-use".to_string()))
            .count();
        assert!(
            in_use == 0 || in_use == names.len(),
            "failure at write {n}: some bitmaps in use, some not: {flags:?}"
        );
        if in_use == 0 {
            for (name, want) in names.iter().zip(&want) {
                assert_eq!(&qemu_dirty_extents(&img, name), want, "write {n}: {name}");
            }
        }
        if closed.is_ok() {
            assert_eq!(in_use, 0, "a clean close left the bitmaps in use");
            assert_check_clean(&img);
            failed_at = n;
            break;
        }
    }
    assert!(failed_at > 5, "the store wrote only {failed_at} times");
}

#[test]
fn small_clusters_many_bitmaps_and_multi_cluster_tables() {
    // 512-byte clusters: the 512-byte granularity bitmap of a 256 MiB disk has 64 KiB of
    // data in 128 clusters and a table of 2 clusters; 40 bitmaps make a directory of 3.
    let tmp = tempdir();
    let d = tmp.path();
    let img = create_image(d, "small.qcow2", Some(SIZE), "cluster_size=512", None);
    qemu_bitmap(&img, &["--add", "-g", "512", "fine"]);
    let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        let g = (4096u64 << (i % 6)).to_string();
        let mut args = vec!["--add", "-g", &g];
        if i % 3 == 0 {
            args.push("--disable");
        }
        args.push(n);
        qemu_bitmap(&img, &args);
    }
    let (_, dir_size, nb) = support::patch::bitmap_directory(&img);
    assert!(nb == 41 && dir_size > 1024, "directory of {dir_size} bytes");
    let ops = random_ops("bitmaps-small-clusters", 24, SIZE);
    let copy = qemu_copy_with(&img, "copy.qcow2", &ops);
    let mnt = mountpoint(d, "mnt");
    let m = Mount::new(&img, &mnt, &["rw"]);
    apply_through(&m, &ops);
    m.umount();
    assert_eq!(qemu_bitmaps(&img), qemu_bitmaps(&copy));
    for n in ["fine", "n0", "n1", "n5", "n39"] {
        assert_eq!(
            qemu_dirty_extents(&img, n),
            qemu_dirty_extents(&copy, n),
            "bitmap {n}"
        );
    }
    assert_check_clean(&img);
    assert_qemu_merges_every_bitmap(&img);
}

/// The mount's read-only flag as /proc/self/mountinfo shows it ("ro" or "rw").
fn kernel_mode(mnt: &Path) -> String {
    mount_info(mnt)
        .map(|i| i.mount_options.split(',').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// `qcow2fs remount -o MODE MNT` must fail with status 1 saying every one of `words`,
/// and the kernel's flag stay the other mode.
fn remount_refused(dir: &Path, mnt: &Path, mode: &str, words: &[&str]) {
    let r = qcow2fs_try(dir, &["remount", "-o", mode, &show(mnt)]);
    assert!(
        r.code() == Some(1) && words.iter().all(|w| r.all_output().contains(w)),
        "remount -o {mode} should fail saying {words:?}: {}",
        r.describe()
    );
    assert_eq!(kernel_mode(mnt), if mode == "ro" { "rw" } else { "ro" });
}

/// Fills the filesystem holding `dir` with a file until it is full.
fn fill_filesystem(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = File::create(&filler).unwrap();
    let chunk = vec![0x11u8; 64 * K as usize];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// Reopen failures from outside: a full disk while a read-only remount stores the bitmaps
/// fails it and leaves the mount read-write and writing (and once there is room the
/// remount stores them, no longer in use); a read-only filesystem under the image fails
/// a read-write remount and leaves the mount read-only, serving reads.
#[test]
fn remount_failures_on_a_full_disk_and_a_read_only_filesystem_leave_the_mount_as_it_was() {
    let tmp = tempdir();
    let fsdir = mountpoint(tmp.path(), "small");
    let _small = PlainMount::with_type(Some("tmpfs"), "tmpfs", &fsdir, "size=48m");
    let img = create_image(&fsdir, "disk.qcow2", Some(SIZE), "", None);
    qemu_bitmap(&img, &["--add", "-g", "512", "b0"]);
    let mnt = mountpoint(tmp.path(), "mnt");
    let m = Mount::new(&img, &mnt, &["rw"]);
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    // Every 512-byte bit of the first 20 MiB but one sector in each 64 KiB: the bitmap
    // needs data clusters of its own when it is stored.
    let data = vec![0x5au8; 64 * K as usize - 512];
    for k in 0..320u64 {
        disk.write_all_at(&data, k * 64 * K).unwrap();
    }
    disk.sync_all().unwrap();
    drop(disk);
    let filler = fill_filesystem(&fsdir);
    remount_refused(tmp.path(), &mnt, "ro", &["No space left"]);
    // Still writing (in place) and reading.
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    disk.write_all_at(&[0x6b; 4096], 4 * M).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    let reads_back = |m: &Mount| {
        let mut b = [0u8; 4096];
        File::open(m.disk())
            .unwrap()
            .read_exact_at(&mut b, 4 * M)
            .unwrap();
        assert!(
            b.iter().all(|&x| x == 0x6b),
            "the write at 4 MiB reads back"
        );
    };
    reads_back(&m);
    fs::remove_file(&filler).unwrap();
    qcow2fs(tmp.path(), &["remount", "-o", "ro", &show(&mnt)]);
    assert_eq!(kernel_mode(&mnt), "ro");
    let want: Vec<(u64, u64)> = (0..320u64).map(|k| (k * 64 * K, 64 * K - 512)).collect();
    assert_eq!(qemu_dirty_extents(&img, "b0"), want);
    for (name, _, flags) in qemu_bitmaps(&img) {
        assert!(!flags.contains(&"in-use".to_string()), "{name}: {flags:?}");
    }

    m.umount();
    // A read-only filesystem under the image (a read-only bind mount of the same files):
    // read-write is refused, reads go on; once writable, the remount works.
    let view = mountpoint(tmp.path(), "view");
    let ro = PlainMount::new(&show(&fsdir), &view, "bind");
    ro.remount("bind,ro");
    let img = view.join("disk.qcow2");
    let m = Mount::new(&img, &mnt, &[]);
    remount_refused(tmp.path(), &mnt, "rw", &["Read-only file system"]);
    reads_back(&m);
    ro.remount("bind,rw");
    qcow2fs(tmp.path(), &["remount", "-o", "rw", &show(&mnt)]);
    assert_eq!(kernel_mode(&mnt), "rw");
    m.umount();
    assert_check_clean(&img);
    assert_qemu_merges_every_bitmap(&img);
}

/// `qcow2fs remount` of a mount whose image has bitmaps: going read-write checks and loads
/// them and marks them in use before the mount accepts a write, so the writes made after
/// it are recorded as QEMU records them; going read-only stores them (no longer in use)
/// before QEMU may open the image. A bitmap that cannot be kept valid refuses the
/// read-write remount as a whole: the mount stays read-only and the image as it was.
#[test]
fn remount_records_writes_and_stores_the_bitmaps_both_ways() {
    let tmp = tempdir();
    let img = image_with_bitmaps(tmp.path());
    let copy = tmp.path().join("qemu.qcow2");
    fs::copy(&img, &copy).unwrap();
    let ops = random_ops("bitmaps-remount", 24, SIZE);
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    qemu_io(&copy, &cmds);
    let want = qemu_all_extents(&copy);
    let mnt = mountpoint(tmp.path(), "mnt");
    let m = Mount::new(&img, &mnt, &[]);
    qcow2fs(tmp.path(), &["remount", "-o", "rw", &show(&mnt)]);
    for (name, _, flags) in qemu_bitmaps(&img) {
        assert!(
            flags.contains(&"in-use".to_string()),
            "bitmap {name} is not in use after the read-write remount: {flags:?}"
        );
    }
    let disk = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    for op in &ops {
        op.apply(&disk);
    }
    disk.sync_all().unwrap();
    drop(disk);
    qcow2fs(tmp.path(), &["remount", "-o", "ro", &show(&mnt)]);
    // Stored while still mounted: QEMU reads what it recorded, none in use.
    assert_eq!(qemu_all_extents(&img), want);
    assert_eq!(qemu_bitmaps(&img), qemu_bitmaps(&copy));
    for (name, extents) in &want {
        let view = m.path(&format!("bitmaps/{name}.raw"));
        assert_eq!(
            &seek_extents(&view),
            extents,
            "bitmaps/{name}.raw after remount ro"
        );
    }
    m.umount();
    assert_check_clean(&img);
    assert_qemu_merges_every_bitmap(&img);

    // A bitmap QEMU would refuse to write: the remount fails naming it, nothing changes.
    let (case, patch, mentions) = bad_bitmap_cases().into_iter().next().unwrap();
    let img = create_image(tmp.path(), "bad.qcow2", Some(4 * M), "", None);
    qemu_bitmap(&img, &["--add", "b0"]);
    qemu_bitmap(&img, &["--add", "b1"]);
    patch(&img);
    let before = fs::read(&img).unwrap();
    let m = Mount::new(&img, &mnt, &[]);
    remount_refused(tmp.path(), &mnt, "rw", mentions);
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .and_then(|f| f.write_all_at(b"x", 0));
    assert_eq!(
        err.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EROFS)),
        "{case}: the mount is no longer read-only"
    );
    m.umount();
    assert!(
        fs::read(&img).unwrap() == before,
        "{case}: the image changed"
    );
}
