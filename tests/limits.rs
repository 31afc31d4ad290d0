//! Bounded work and memory on hostile images: header fields patched to claim huge L1 and
//! refcount tables, snapshot counts and sizes, extension counts, compressed sizes and a
//! deep backing chain, run through `info`, `map` and `cat` under `prlimit --as=1GiB`.
//! Each run must end cleanly: exit 0 with the right data, or exit 1 with one line naming
//! the field; never a signal, an abort or an allocation failure. A mount under the same
//! limit serves the active disk and the healthy snapshots of an image with a broken one.

mod support;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::images::create_image;
use support::patch::patch;
use support::*;

/// The address-space cap every run gets.
const AS_LIMIT: &str = "--as=1073741824";
const LIMIT: Duration = Duration::from_secs(60);
const CS: u64 = 65536;

/// A 4 MiB image with 64 KiB clusters, data at 0 and snapshots s1 and s2 (which holds
/// the active disk's data).
fn base(dir: &Path, name: &str) -> PathBuf {
    let img = create_image(dir, name, Some(4 * M), "cluster_size=65536", None);
    qemu_io(&img, &["write -q -P 0x5a 0 128k"]);
    qemu_img(dir, &["snapshot", "-c", "s1", img.to_str().unwrap()]);
    qemu_io(&img, &["write -q -P 0x6b 64k 64k"]);
    qemu_img(dir, &["snapshot", "-c", "s2", img.to_str().unwrap()]);
    img
}

fn expected_active() -> Vec<u8> {
    let mut v = vec![0u8; 4 << 20];
    v[..64 << 10].fill(0x5a);
    v[64 << 10..128 << 10].fill(0x6b);
    v
}

/// Runs `qcow2fs args` under the address-space cap and checks it ended cleanly; with exit
/// status 1, stderr must be one line containing `field`. Returns (exit code, stdout).
fn run_capped(dir: &Path, args: &[&str], field: &str) -> (i32, Vec<u8>) {
    let mut all = vec![AS_LIMIT, qcow2fs_bin()];
    all.extend_from_slice(args);
    let r = run_in(dir, "prlimit", &all, LIMIT);
    assert!(!r.timed_out(), "hung: {}", r.describe());
    assert!(r.signal().is_none(), "signal: {}", r.describe());
    for bad in ["panicked", "memory allocation", "abort", "out of memory"] {
        assert!(!r.stderr.contains(bad), "{bad}: {}", r.describe());
    }
    let code = r.code().unwrap();
    match code {
        0 => {}
        1 => {
            assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.describe());
            assert!(
                r.stderr.contains(field),
                "expected {field:?}: {}",
                r.describe()
            );
        }
        _ => panic!("unexpected exit status: {}", r.describe()),
    }
    (code, r.stdout)
}

/// info, map and cat of `img`; cat's output, when it succeeds, must be `expect`.
fn all_commands(img: &Path, field: &str, expect: Option<&[u8]>) -> Vec<i32> {
    let dir = img.parent().unwrap();
    let name = img.to_str().unwrap();
    let mut codes = Vec::new();
    for cmd in ["info", "map"] {
        codes.push(run_capped(dir, &[cmd, name], field).0);
    }
    let (code, out) = run_capped(dir, &["cat", name], field);
    if code == 0
        && let Some(e) = expect
    {
        assert!(out == e, "cat of {name} returned wrong data");
    }
    codes.push(code);
    codes
}

/// Byte offset of the first snapshot entry (s1), from the header.
fn snapshot_entry(img: &Path) -> u64 {
    let h = fs::read(img).unwrap();
    assert_eq!(be32(&h, 60), 2);
    be64(&h, 64)
}

#[test]
fn huge_header_claims_are_refused_or_bounded() {
    let d = tempdir();
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("l1_size", 36, &u32::MAX.to_be_bytes(), "l1_size"),
        ("size", 24, &(1u64 << 62).to_be_bytes(), "size"),
        (
            "refcount_table_clusters",
            56,
            &u32::MAX.to_be_bytes(),
            "refcount_table_clusters",
        ),
        ("nb_snapshots", 60, &u32::MAX.to_be_bytes(), "nb_snapshots"),
        // The most snapshots allowed, but a table that is mostly not there.
        ("nb_snapshots_max", 60, &65536u32.to_be_bytes(), "snapshot"),
        // An L1 table at the top of the address space (found by fuzzing: the end of
        // the table overflowed).
        (
            "l1_table_offset",
            40,
            &(!0xffffu64).to_be_bytes(),
            "l1_table_offset",
        ),
        // The largest L1 allowed, running past the end of the file.
        (
            "l1_size_max",
            36,
            &(4u32 << 20).to_be_bytes(),
            "l1_table_offset",
        ),
    ];
    for (name, off, bytes, field) in cases {
        let img = base(d.path(), &format!("{name}.qcow2"));
        patch(&img, *off, bytes);
        let codes = all_commands(&img, field, Some(&expected_active()));
        assert!(
            codes.iter().all(|&c| c == 1),
            "{name}: expected a refusal, got {codes:?}"
        );
    }
}

/// The largest L1 table the limits allow, present in a (sparse) file: opened and used
/// within the address-space cap.
#[test]
fn largest_allowed_l1_table_fits_the_cap() {
    let d = tempdir();
    let img = base(d.path(), "l1max.qcow2");
    let h = fs::read(&img).unwrap();
    let l1 = be64(&h, 40);
    let first = be64(&h, l1 as usize);
    // A fresh, zeroed 32 MiB L1 table at the end of the file, keeping the one L2 table.
    let new_l1 = fs::metadata(&img).unwrap().len().next_multiple_of(CS);
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(new_l1 + (32 << 20))
        .unwrap();
    patch(&img, new_l1, &first.to_be_bytes());
    patch(&img, 40, &new_l1.to_be_bytes());
    patch(&img, 36, &(4u32 << 20).to_be_bytes());
    let codes = all_commands(&img, "", Some(&expected_active()));
    assert_eq!(codes, vec![0, 0, 0]);
}

#[test]
fn too_many_header_extensions_are_refused() {
    let d = tempdir();
    let img = create_image(d.path(), "ext.qcow2", Some(4 * M), "cluster_size=2M", None);
    let h = fs::read(&img).unwrap();
    let start = be32(&h, 100) as u64;
    // Empty records of an unknown type, filling cluster 0.
    let mut recs = Vec::new();
    for _ in 0..((2 << 20) - start) / 8 - 1 {
        recs.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        recs.extend_from_slice(&0u32.to_be_bytes());
    }
    patch(&img, start, &recs);
    let codes = all_commands(&img, "header extension", None);
    assert!(codes.iter().all(|&c| c == 1), "{codes:?}");
}

/// A compressed cluster whose descriptor claims the largest size, reaching past the end
/// of the file: reads fail with one line naming it, info still works.
#[test]
fn largest_compressed_size_is_bounded() {
    let d = tempdir();
    let raw = d.path().join("data.raw");
    fs::write(&raw, vec![0x42u8; 256 << 10]).unwrap();
    let img = d.path().join("comp.qcow2");
    qemu_img(
        d.path(),
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let h = fs::read(&img).unwrap();
    let l2 = be64(&h, be64(&h, 40) as usize) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&h, l2 as usize);
    assert!(entry & (1 << 62) != 0, "cluster 0 is not compressed");
    // cluster_bits 16: the offset takes 54 bits, the sector count the next 8.
    let off = h.len() as u64 + 512;
    let patched = (1u64 << 62) | (0xffu64 << 54) | off;
    patch(&img, l2, &patched.to_be_bytes());
    let dir = img.parent().unwrap();
    let name = img.to_str().unwrap();
    assert_eq!(run_capped(dir, &["info", name], "").0, 0);
    run_capped(dir, &["map", name], "compressed");
    assert_eq!(run_capped(dir, &["cat", name], "compressed").0, 1);
}

/// A snapshot that claims a disk of nearly 2^64 bytes (fuzzing found the guest offset
/// arithmetic overflowing on it) or an L1 table of 2^32 entries fails on its own: the
/// active disk still reads, `info` lists it, and a mount leaves it out.
#[test]
fn broken_snapshot_sizes_fail_only_that_snapshot() {
    let d = tempdir();
    for (name, field) in [("disk_size", "disk size"), ("l1_size", "L1 table")] {
        let img = base(d.path(), &format!("snap-{name}.qcow2"));
        let e = snapshot_entry(&img);
        match name {
            // The extra data starts at byte 40; its second field is the disk size.
            "disk_size" => patch(&img, e + 48, &(u64::MAX - 511).to_be_bytes()),
            _ => patch(&img, e + 8, &u32::MAX.to_be_bytes()),
        }
        let dir = img.parent().unwrap();
        let path = img.to_str().unwrap();
        assert_eq!(run_capped(dir, &["info", path], "").0, 0);
        let (code, out) = run_capped(dir, &["cat", path], "");
        assert_eq!(code, 0);
        assert!(out == expected_active(), "active disk of {path}");
        let (code, _) = run_capped(dir, &["cat", "--snapshot", "s1", path], field);
        assert_eq!(code, 1, "{name}");

        // The same through a mount made under the cap.
        let mnt = d.path().join(format!("mnt-{name}"));
        fs::create_dir_all(&mnt).unwrap();
        let r = run_in(
            dir,
            "prlimit",
            &[
                AS_LIMIT,
                qcow2fs_bin(),
                "mount",
                path,
                mnt.to_str().unwrap(),
            ],
            LIMIT,
        );
        let m = Mount::adopt(&mnt);
        assert!(r.success(), "{}", r.describe());
        let disk = m.path(&format!("snap-{name}.raw"));
        assert!(fs::read(&disk).unwrap() == expected_active());
        let names: Vec<String> = fs::read_dir(m.path("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["s2.raw".to_string()], "snapshots shown");
        assert!(fs::read(m.path("snapshots/s2.raw")).unwrap() == expected_active());
    }
}

#[test]
fn deep_backing_chain_is_refused() {
    let d = tempdir();
    let dir = d.path();
    create_image(dir, "layer0.qcow2", Some(M), "", None);
    for i in 1..=70 {
        let below = format!("layer{}.qcow2", i - 1);
        create_image(
            dir,
            &format!("layer{i}.qcow2"),
            None,
            "",
            Some((&below, "qcow2")),
        );
    }
    let top = dir.join("layer70.qcow2");
    let codes = all_commands(&top, "backing chain", None);
    assert!(codes.iter().all(|&c| c == 1), "{codes:?}");
}
