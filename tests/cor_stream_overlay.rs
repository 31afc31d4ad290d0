//! Copy-on-read, streaming and throwaway overlays, checked against QEMU: the top image's
//! `qemu-img map` after copy-on-read, `qemu-img convert`/`compare`/`check` after
//! streaming, and an evidence image that stays bit-for-bit the same under an overlay.

mod common;

use common::{qemu_img, qemu_io, qemu_map_json, qemu_raw};
use qcow2fs::block::{BlockDev, CopyOnRead, OpenOptions, open_chain};
use qcow2fs::engine::ImageOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2fs")
}

fn open_rw(image: &Path) -> qcow2fs::block::Chain {
    open_chain(
        image,
        &OpenOptions {
            image: ImageOptions {
                writable: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap()
}

fn assert_check_clean(image: &Path) {
    let out = common::run_raw(
        image.parent().unwrap(),
        "qemu-img",
        &["check", "--output=json", image.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img check JSON");
    for f in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(f).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{f} in {}: {v}",
            image.display()
        );
    }
}

/// base.raw (data at 0..1M) <- mid.qcow2 (data at 1M..2M) <- top.qcow2 (data at 2M..2.5M),
/// each 4 MiB; returns the top image.
fn chain3(dir: &Path) -> PathBuf {
    qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_io_raw(dir, "base.raw", "write -P 0x61 0 1M");
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    );
    qemu_io(dir, &dir.join("mid.qcow2"), &["write -P 0x62 1M 1M"]);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(dir, &dir.join("top.qcow2"), &["write -P 0x63 2M 512k"]);
    dir.join("top.qcow2")
}

fn qemu_io_raw(dir: &Path, file: &str, cmd: &str) {
    common::run(dir, "qemu-io", &["-f", "raw", "-c", cmd, file]);
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
    let dir = common::tempdir();
    let top = chain3(dir.path());
    let before = qemu_raw(&top);
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
    assert_check_clean(&top);
    common::assert_same_bytes("content after copy-on-read", &before, &qemu_raw(&top));
    let own = depth0_ranges(&top);
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
    let dir = common::tempdir();
    let top = chain3(dir.path());
    let before = qemu_raw(&top);
    {
        let chain = open_rw(&top);
        // Bottom 1 = mid.qcow2: data from the raw base (depth 2) is read, not copied.
        let cor = CopyOnRead::new(chain.top.clone(), 1);
        let mut buf = vec![0u8; 2 << 20];
        cor.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &before[..2 << 20]);
        cor.close().unwrap();
    }
    assert_check_clean(&top);
    common::assert_same_bytes("content after copy-on-read", &before, &qemu_raw(&top));
    let own = depth0_ranges(&top);
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
    let dir = common::tempdir();
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

fn stream(image: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(bin())
        .arg("stream")
        .args(args)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stream failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn stream_equals_the_chain_with_and_without_dropping_the_backing_file() {
    for (args, expect_backing) in [
        (vec![], Some("mid.qcow2")),
        (vec!["--drop-backing"], None),
        (vec!["--bottom", "1", "--drop-backing"], Some("base.raw")),
        (vec!["--bottom", "mid.qcow2"], Some("mid.qcow2")),
    ] {
        let dir = common::tempdir();
        let top = chain3(dir.path());
        let before = qemu_raw(&top);
        let out = stream(&top, &args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("\"event\": \"done\""),
            "no machine-readable progress: {text}"
        );
        assert_check_clean(&top);
        common::assert_same_bytes(&format!("stream {args:?}"), &before, &qemu_raw(&top));
        let info = common::qemu_info_json(&top);
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
    let dir = common::tempdir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "base.qcow2",
            "256M",
        ],
    );
    qemu_io(d, &d.join("base.qcow2"), &["write -P 0x71 0 256M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let top = d.join("top.qcow2");
    let before = qemu_raw(&top);
    let mut child = Command::new(bin())
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
    let out = common::run_raw(d, "qemu-img", &["check", "--output=json", "top.qcow2"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["corruptions"].as_u64().unwrap_or(0),
        0,
        "after kill ({status}): {v}"
    );
    stream(&top, &["--drop-backing"]);
    assert_check_clean(&top);
    common::assert_same_bytes("resumed stream", &before, &qemu_raw(&top));
    assert!(
        common::qemu_info_json(&top)
            .get("backing-filename")
            .is_none()
    );
}

/// Unmounts on drop, even when a test fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(bin()).arg("umount").arg(&self.0).status();
        if common::mount_info(&self.0).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

struct Loop(String, PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.1).status();
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn mount(image: &Path, mnt: &Path, opts: &str) -> Mounted {
    std::fs::create_dir_all(mnt).unwrap();
    let out = Command::new(bin())
        .args(["mount", "-o", opts])
        .arg(image)
        .arg(mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -o {opts} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        common::mount_info(mnt).is_some(),
        "mount reported success but nothing is mounted"
    );
    Mounted(mnt.to_path_buf())
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn overlay_lets_a_snapshot_guest_be_written_and_leaves_the_evidence_untouched() {
    let dir = common::tempdir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("files")).unwrap();
    std::fs::write(d.join("files/evidence.txt"), "original content\n").unwrap();
    common::run(
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
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&snap)
            .output()
            .unwrap();
        assert!(out.status.success());
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let guest = d.join("guest");
        std::fs::create_dir(&guest).unwrap();
        let lp = Loop(dev.clone(), guest.clone());
        // Read-write: the journal can replay and files can be written.
        common::run(d, "mount", &[dev.as_str(), guest.to_str().unwrap()]);
        assert_eq!(
            std::fs::read_to_string(guest.join("evidence.txt")).unwrap(),
            "original content\n"
        );
        std::fs::write(guest.join("analyst-notes.txt"), "written during analysis\n").unwrap();
        common::run(d, "sync", &[] as &[&str]);
        assert_eq!(
            std::fs::read_to_string(guest.join("analyst-notes.txt")).unwrap(),
            "written during analysis\n"
        );
        drop(lp);
        // Re-attach: the write is still there within the mount's lifetime.
        let out = Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(&snap)
            .output()
            .unwrap();
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let lp = Loop(dev.clone(), guest.clone());
        common::run(
            d,
            "mount",
            &["-o", "ro", dev.as_str(), guest.to_str().unwrap()],
        );
        assert_eq!(
            std::fs::read_to_string(guest.join("analyst-notes.txt")).unwrap(),
            "written during analysis\n"
        );
        drop(lp);
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
    let dir = common::tempdir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "disk.qcow2", "8M"]);
    qemu_io(d, &d.join("disk.qcow2"), &["write -P 0x41 0 1M"]);
    let img = d.join("disk.qcow2");
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
    let dir = common::tempdir();
    let top = chain3(dir.path());
    let before = qemu_raw(&top);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Copy-on-read needs rw.
    let out = Command::new(bin())
        .args(["mount", "-o", "copy-on-read"])
        .arg(&top)
        .arg(&mnt)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rw"));
    assert!(common::mount_info(&mnt).is_none());
    {
        let _m = mount(&top, &mnt, "rw,copy-on-read,cor_bottom=2");
        let got = std::fs::read(mnt.join("top.raw")).unwrap();
        common::assert_same_bytes("read through copy-on-read", &before, &got);
    }
    assert_check_clean(&top);
    common::assert_same_bytes("content after copy-on-read", &before, &qemu_raw(&top));
    let own = depth0_ranges(&top);
    assert!(
        covered(&own, 0, 2 << 20),
        "data read through the mount is not at depth 0: {own:?}"
    );
}
