//! Copy-on-read, streaming and throwaway overlays, checked against QEMU: the top image's
//! `qemu-img map` after copy-on-read, `qemu-img convert`/`compare`/`check` after
//! streaming, and an evidence image that stays bit-for-bit the same under an overlay.

mod support;

use qcow2fs::block::{BlockDev, CopyOnRead};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use support::images::create_image;
use support::*;

/// base.raw (data at 0..1M) <- mid.qcow2 (data at 1M..2M) <- top.qcow2 (data at 2M..2.5M),
/// each 4 MiB; returns the top image.
fn chain3(dir: &Path) -> PathBuf {
    qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_io_with(
        &dir.join("base.raw"),
        &["-f", "raw"],
        &["write -P 0x61 0 1M"],
    );
    let mid = create_image(dir, "mid.qcow2", None, "", Some(("base.raw", "raw")));
    qemu_io(&mid, &["write -P 0x62 1M 1M"]);
    let top = create_image(dir, "top.qcow2", None, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x63 2M 512k"]);
    top
}

/// [`chain3`] in a fresh temporary directory, with QEMU's rendering of the top image.
fn chain3_in_tempdir() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempdir();
    let top = chain3(dir.path());
    let before = qemu_raw(&top);
    (dir, top, before)
}

/// After copy-on-read: the image checks clean and still reads `before`; returns the
/// ranges it now holds itself.
fn checked_after_copy_on_read(top: &Path, before: &[u8]) -> Vec<(u64, u64)> {
    assert_check_clean(top);
    assert_same_bytes("content after copy-on-read", before, &qemu_raw(top));
    depth0_ranges(top)
}

/// Ranges of the top image's own map (depth 0, present) as (start, length).
fn depth0_ranges(image: &Path) -> Vec<(u64, u64)> {
    qemu_map_json(image)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn covered(ranges: &[(u64, u64)], off: u64, len: u64) -> bool {
    (off..off + len)
        .step_by(4096)
        .all(|x| ranges.iter().any(|&(s, l)| x >= s && x < s + l))
}

#[test]
fn copy_on_read_copies_what_reads_get_from_the_chain() {
    let (_dir, top, before) = chain3_in_tempdir();
    {
        let chain = open_rw(&top);
        let cor = CopyOnRead::new(chain.top.clone(), 2);
        // Read 100 KiB from the raw base and 100 KiB from mid.
        let mut buf = vec![0u8; 100 << 10];
        cor.read_at(&mut buf, 300 << 10).unwrap();
        assert_eq!(&buf[..], &before[300 << 10..400 << 10]);
        cor.read_at(&mut buf, (1 << 20) + 4096).unwrap();
        assert_eq!(
            &buf[..],
            &before[(1 << 20) + 4096..(1 << 20) + 4096 + (100 << 10)]
        );
        cor.close().unwrap();
    }
    let own = checked_after_copy_on_read(&top, &before);
    assert!(
        covered(&own, 300 << 10, 100 << 10),
        "base data read is not at depth 0: {own:?}"
    );
    assert!(
        covered(&own, (1 << 20) + 4096, 100 << 10),
        "mid data read is not at depth 0: {own:?}"
    );
    assert!(
        !covered(&own, 3 << 20, 4096),
        "unread data was copied: {own:?}"
    );
}

#[test]
fn cor_bottom_limits_the_copy_to_the_named_layers() {
    let (_dir, top, before) = chain3_in_tempdir();
    {
        let chain = open_rw(&top);
        // Bottom 1 = mid.qcow2: data from the raw base (depth 2) is read, not copied.
        let cor = CopyOnRead::new(chain.top.clone(), 1);
        let mut buf = vec![0u8; 2 << 20];
        cor.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &before[..2 << 20]);
        cor.close().unwrap();
    }
    let own = checked_after_copy_on_read(&top, &before);
    assert!(
        covered(&own, 1 << 20, 1 << 20),
        "mid's data was not copied: {own:?}"
    );
    assert!(
        !covered(&own, 0, 4096),
        "base data was copied although it is below the bottom: {own:?}"
    );
}

#[test]
fn a_read_racing_a_write_on_one_cluster_keeps_the_write() {
    let dir = tempdir();
    let top = chain3(dir.path());
    let chain = open_rw(&top);
    let cor = Arc::new(CopyOnRead::new(chain.top.clone(), 2));
    // 256 places in the first 16 clusters of the raw base's data; each gets a write racing
    // copy-on-reads of its cluster.
    let clusters: Vec<u64> = (0..256)
        .map(|i| (i % 16) * 65536 + (i / 16) * 4096 + (i % 3) * 512)
        .collect();
    let writer = {
        let top = chain.top.clone();
        let clusters = clusters.clone();
        std::thread::spawn(move || {
            for (i, &c) in clusters.iter().enumerate() {
                top.write_at(&[0xee ^ i as u8; 512], c).unwrap();
            }
        })
    };
    let reader = {
        let cor = cor.clone();
        let clusters = clusters.clone();
        std::thread::spawn(move || {
            for _ in 0..4 {
                for &c in clusters.iter() {
                    let mut b = vec![0u8; 65536];
                    cor.read_at(&mut b, c & !65535).unwrap();
                }
            }
        })
    };
    writer.join().unwrap();
    reader.join().unwrap();
    cor.close().unwrap();
    // Release the image (and its lock) before QEMU looks at it.
    drop(cor);
    drop(chain);
    assert_check_clean(&top);
    let raw = qemu_raw(&top);
    for (i, &c) in clusters.iter().enumerate() {
        assert!(
            raw[c as usize..c as usize + 512]
                .iter()
                .all(|&b| b == 0xee ^ i as u8),
            "the write at {c:#x} was lost to a racing copy-on-read"
        );
    }
}

fn stream(image: &Path, args: &[&str]) -> Finished {
    let mut all = vec![OsStr::new("stream")];
    all.extend(args.iter().map(OsStr::new));
    all.push(image.as_os_str());
    run(&image_dir(image), qcow2fs_bin(), &all)
}

#[test]
fn stream_equals_the_chain_with_and_without_dropping_the_backing_file() {
    for (args, expect_backing) in [
        (vec![], Some("mid.qcow2")),
        (vec!["--drop-backing"], None),
        (vec!["--bottom", "1", "--drop-backing"], Some("base.raw")),
        (vec!["--bottom", "mid.qcow2"], Some("mid.qcow2")),
    ] {
        let dir = tempdir();
        let top = chain3(dir.path());
        let before = qemu_raw(&top);
        let out = stream(&top, &args);
        let text = out.stdout_text();
        assert!(
            text.contains("\"event\": \"done\""),
            "no machine-readable progress: {text}"
        );
        assert_check_clean(&top);
        assert_same_bytes(&format!("stream {args:?}"), &before, &qemu_raw(&top));
        let info = qemu_info_json(&top);
        match expect_backing {
            Some(b) => assert!(
                info["backing-filename"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(b)),
                "{args:?}: backing is {}",
                info["backing-filename"]
            ),
            None => assert!(info.get("backing-filename").is_none(), "{args:?}: {info}"),
        }
        if args.is_empty() {
            // Everything the chain provides is now in the top image.
            let own = depth0_ranges(&top);
            assert!(covered(&own, 0, 2 << 20), "{own:?}");
        }
    }
}

#[test]
fn an_interrupted_stream_resumes() {
    let dir = tempdir();
    let d = dir.path();
    let base = create_image(d, "base.qcow2", Some(256 * M), "cluster_size=4096", None);
    qemu_io(&base, &["write -P 0x71 0 256M"]);
    let top = create_image(
        d,
        "top.qcow2",
        None,
        "cluster_size=4096",
        Some(("base.qcow2", "qcow2")),
    );
    let before = qemu_raw(&top);
    let mut child = Command::new(qcow2fs_bin())
        .args(["stream", "--drop-backing"])
        .arg(&top)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill();
    let status = child.wait().unwrap();
    // Killed part-way (or already finished on a fast machine): either way the image must
    // be consistent, and a second run completes it.
    eprintln!("qcow2fs stream killed after 300 ms: {status}");
    assert_no_corruption(&top);
    stream(&top, &["--drop-backing"]);
    assert_check_clean(&top);
    assert_same_bytes("resumed stream", &before, &qemu_raw(&top));
    assert!(qemu_info_json(&top).get("backing-filename").is_none());
}

/// `qcow2fs mount -o OPTS IMAGE MNT` (MNT made if needed).
fn mount(image: &Path, mnt: &Path, opts: &str) -> Mount {
    std::fs::create_dir_all(mnt).unwrap();
    Mount::new(image, mnt, &[opts])
}

fn sha256(path: &Path) -> String {
    run(&image_dir(path), "sha256sum", &[path])
        .stdout_text()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn overlay_lets_a_snapshot_guest_be_written_and_leaves_the_evidence_untouched() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("files")).unwrap();
    std::fs::write(d.join("files/evidence.txt"), "original content\n").unwrap();
    run(
        d,
        "mkfs.ext4",
        &["-q", "-F", "-d", "files", "guest.raw", "32M"],
    );
    qemu_img(d, &["convert", "-O", "qcow2", "guest.raw", "ev.qcow2"]);
    qemu_img(d, &["snapshot", "-c", "seized", "ev.qcow2"]);
    let img = d.join("ev.qcow2");
    let sum = sha256(&img);
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let ovdir = d.join("overlays");
    std::fs::create_dir(&ovdir).unwrap();
    {
        let mnt = d.join("mnt");
        let _m = mount(&img, &mnt, &format!("overlay={}", ovdir.display()));
        let snap = mnt.join("snapshots/seized.raw");
        assert!(
            !std::fs::metadata(&snap).unwrap().permissions().readonly(),
            "snapshot file not writable"
        );
        let guest = d.join("guest");
        std::fs::create_dir(&guest).unwrap();
        // Read-write: the journal can replay and files can be written.
        let lm = LoopMount::new(&snap, &guest, false, "");
        assert_eq!(
            std::fs::read_to_string(guest.join("evidence.txt")).unwrap(),
            "original content\n"
        );
        std::fs::write(guest.join("analyst-notes.txt"), "written during analysis\n").unwrap();
        run(d, "sync", &[] as &[&str]);
        assert_eq!(
            std::fs::read_to_string(guest.join("analyst-notes.txt")).unwrap(),
            "written during analysis\n"
        );
        lm.unmount();
        // Re-attach: the write is still there within the mount's lifetime.
        let lm = LoopMount::new(&snap, &guest, true, "");
        assert_eq!(
            std::fs::read_to_string(guest.join("analyst-notes.txt")).unwrap(),
            "written during analysis\n"
        );
        lm.unmount();
        assert!(
            std::fs::read_dir(&ovdir).unwrap().count() >= 1,
            "no overlay files while mounted"
        );
    }
    assert_eq!(sha256(&img), sum, "the evidence image changed");
    assert_eq!(
        std::fs::metadata(&img).unwrap().modified().unwrap(),
        mtime,
        "the evidence image's mtime changed"
    );
    assert_eq!(
        std::fs::read_dir(&ovdir).unwrap().count(),
        0,
        "overlays were not deleted at unmount"
    );
}

#[test]
fn kept_overlays_are_valid_qcow2_images() {
    let dir = tempdir();
    let d = dir.path();
    let img = create_image(d, "disk.qcow2", Some(8 * M), "", None);
    qemu_io(&img, &["write -P 0x41 0 1M"]);
    let sum = sha256(&img);
    let ovdir = d.join("ov");
    std::fs::create_dir(&ovdir).unwrap();
    {
        let mnt = d.join("mnt");
        let _m = mount(
            &img,
            &mnt,
            &format!("overlay={},keep_overlay", ovdir.display()),
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x42; 4096], 512 << 10).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        sha256(&img),
        sum,
        "the image changed under an overlay mount"
    );
    // They are kept in a directory only the mounting user (root) may enter.
    let private = ovdir.join("qcow2fs-overlays-0");
    let md = std::fs::metadata(&private).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o700,
        "mode of {}",
        private.display()
    );
    let kept: Vec<PathBuf> = std::fs::read_dir(&private)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_check_clean(&kept[0]);
    // The kept overlay names the image as its backing file: QEMU sees the combined disk.
    let raw = qemu_raw(&kept[0]);
    assert!(raw[..512 << 10].iter().all(|&b| b == 0x41));
    assert!(
        raw[512 << 10..(512 << 10) + 4096]
            .iter()
            .all(|&b| b == 0x42)
    );
    assert!(raw[(512 << 10) + 4096..1 << 20].iter().all(|&b| b == 0x41));
}

#[test]
fn copy_on_read_through_the_mount_and_its_option_rules() {
    let (dir, top, before) = chain3_in_tempdir();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Copy-on-read needs rw.
    let out = match Mount::try_new(&top, &mnt, &["copy-on-read"]) {
        Ok(_) => panic!("copy-on-read without rw was accepted"),
        Err(out) => out,
    };
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("rw"), "{}", out.describe());
    assert!(mount_info(&mnt).is_none());
    {
        let _m = mount(&top, &mnt, "rw,copy-on-read,cor_bottom=2");
        let got = std::fs::read(mnt.join("top.raw")).unwrap();
        assert_same_bytes("read through copy-on-read", &before, &got);
    }
    let own = checked_after_copy_on_read(&top, &before);
    assert!(
        covered(&own, 0, 2 << 20),
        "data read through the mount is not at depth 0: {own:?}"
    );
}
