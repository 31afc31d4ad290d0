//! Who may write what on a read-write mount, and when: QEMU's image locks in both
//! directions (and `force_share`), images refused read-write (marked corrupt, persistent
//! bitmaps), the autoclear and lazy-refcount dirty bits, file modes, EROFS for snapshots
//! and layers, refused shrinking and ENOSPC past the end.
//!
//! Every mount is held by a `Mount` guard that unmounts on drop, also when a test panics.
//! Expected contents come from the operations the tests performed and from QEMU's
//! renderings, never from qcow2fs.

mod support;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use support::images::{create_base, create_image, create_over_base, wp};
use support::patch::{bitmap_entry_offset, hdr, put8, put64, read_be64};
use support::*;

// ---------------------------------------------------------------------------------------
// QEMU's image locks, both directions
// ---------------------------------------------------------------------------------------

/// `qemu-img ARGS` (run in the image's directory) whatever its status.
fn qemu_img_out(image: &Path, args: &[&str]) -> Finished {
    run_in(&image_dir(image), "qemu-img", args, COMMAND_LIMIT)
}

/// `qemu-io [-f qcow2] -c CMD IMAGE` whatever its status.
fn qemu_io_out(image: &Path, extra: &[&str], cmd: &str) -> Finished {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-c", cmd, image.to_str().unwrap()]);
    run_in(&image_dir(image), "qemu-io", &args, COMMAND_LIMIT)
}

/// QEMU refused to open the image because of a lock: a failure naming `lock`.
fn assert_lock_refused(out: &Finished, lock: &str) {
    assert!(
        !out.success() && out.all_output().contains(lock),
        "expected QEMU to fail with {lock:?}: {}",
        out.describe()
    );
}

/// qemu-io wrote (it exits 0 even when a command fails, so its output is checked).
fn assert_qemu_io_wrote(out: &Finished) {
    assert!(
        out.success() && out.stdout_text().contains("wrote") && !out.all_output().contains("lock"),
        "expected qemu-io to write: {}",
        out.describe()
    );
}

/// A temporary directory with the image `build` makes in it, and a mount point.
fn fixture(build: fn(&Path) -> PathBuf) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempdir();
    let image = build(tmp.path());
    let mnt = mountpoint(tmp.path(), "mnt");
    (tmp, image, mnt)
}

fn lock_image(dir: &Path) -> PathBuf {
    let image = create_image(dir, "img.qcow2", Some(4 * M), "", None);
    qemu_io(&image, &[wp(0x3c, 0, 256 * K)]);
    image
}

#[test]
fn qemu_is_locked_out_while_mounted_rw() {
    let (_tmp, image, mnt) = fixture(lock_image);
    let before = fs::read(&image).unwrap();
    let m = Mount::new(&image, &mnt, &["rw"]);
    let img_s = image.to_str().unwrap();
    assert_lock_refused(
        &qemu_img_out(&image, &["snapshot", "-c", "x", img_s]),
        "Failed to get \"write\" lock",
    );
    assert_lock_refused(
        &qemu_io_out(&image, &[], "write 0 4k"),
        "Failed to get \"write\" lock",
    );
    // Even reading needs QEMU's shared lock against a writer...
    assert_lock_refused(
        &qemu_img_out(&image, &["info", img_s]),
        "Failed to get shared \"write\" lock",
    );
    assert_lock_refused(
        &qemu_io_out(&image, &["-r"], "read 0 4k"),
        "Failed to get shared \"write\" lock",
    );
    // ... unless told to share (-U).
    qemu_img_out(&image, &["info", "-U", img_s]).expect_success();
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "the image changed although nothing was written"
    );
    m.umount();
    assert!(
        qemu_snapshots(&image).is_empty(),
        "qemu-img snapshot -c ran against the mount"
    );
    // The locks went with the mount.
    assert_qemu_io_wrote(&qemu_io_out(&image, &[], "write 0 4k"));
    assert_check_clean(&image);
}

#[test]
fn qemu_writes_are_locked_out_while_mounted_read_only_unless_force_share() {
    let (_tmp, image, mnt) = fixture(lock_image);
    let img_s = image.to_str().unwrap();
    let m = Mount::new(&image, &mnt, &[]);
    assert_lock_refused(
        &qemu_io_out(&image, &[], "write 0 4k"),
        "Failed to get \"write\" lock",
    );
    assert_lock_refused(
        &qemu_img_out(&image, &["snapshot", "-c", "x", img_s]),
        "Failed to get \"write\" lock",
    );
    // Readers share with a reader.
    qemu_img_out(&image, &["info", img_s]).expect_success();
    let r = qemu_io_out(&image, &["-r"], "read -P 0x3c 0 4k");
    assert!(
        r.success() && r.stdout_text().contains("read 4096/4096"),
        "{}",
        r.describe()
    );
    m.umount();
    // force_share takes no lock: QEMU may write (the mount may then read stale data, so
    // only the locks are checked).
    let m = Mount::new(&image, &mnt, &["force_share"]);
    assert_qemu_io_wrote(&qemu_io_out(&image, &[], "write -P 0x5d 0 4k"));
    qemu_img_out(&image, &["info", img_s]).expect_success();
    m.umount();
    assert_check_clean(&image);
}

#[test]
fn mount_refused_while_qemu_writes_the_image() {
    let (_tmp, image, mnt) = fixture(lock_image);
    let qemu = QemuWriter::start(&image);
    assert_mount_refused(
        &image,
        &mnt,
        &["rw"],
        &["img.qcow2", "Failed to get \"write\" lock"],
    );
    assert_mount_refused(
        &image,
        &mnt,
        &[],
        &["img.qcow2", "Failed to get shared \"write\" lock"],
    );
    // Read-write and force_share exclude each other.
    assert_mount_refused(&image, &mnt, &["rw", "force_share"], &["force_share"]);
    // force_share reads without locks.
    let m = Mount::new(&image, &mnt, &["force_share"]);
    assert_eq!(
        fs::metadata(m.disk()).unwrap().len(),
        4 * M,
        "size of the disk read with force_share"
    );
    m.umount();
    qemu.stop();
    // With QEMU gone the image mounts read-write.
    let m = Mount::new(&image, &mnt, &["rw"]);
    m.umount();
    assert_check_clean(&image);
}

// ---------------------------------------------------------------------------------------
// Opening and closing: corrupt, bitmaps, autoclear, lazy refcounts
// ---------------------------------------------------------------------------------------

const INCOMPATIBLE_FEATURES: u64 = hdr::INCOMPAT;
const AUTOCLEAR_FEATURES: u64 = hdr::AUTOCLEAR;
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;

/// `qcow2fs mount -o rw` is refused with a line mentioning `mentions`, a read-only mount
/// reads `want` (QEMU's rendering), and neither changes a byte of the image.
fn refused_rw_but_mounts_read_only(image: &Path, mnt: &Path, mentions: &[&str], want: &[u8]) {
    let before = fs::read(image).unwrap();
    assert_mount_refused(image, mnt, &["rw"], mentions);
    assert_eq!(
        fs::read(image).unwrap(),
        before,
        "the refused mount changed the image"
    );
    let m = Mount::new(image, mnt, &[]);
    assert_same_bytes(
        "the disk read through a read-only mount",
        want,
        &read_direct(&m.disk(), 1 << 20),
    );
    m.umount();
    assert_eq!(
        fs::read(image).unwrap(),
        before,
        "the read-only mount changed the image"
    );
}

#[test]
fn corrupt_image_refused_rw_but_mounts_read_only() {
    let (_tmp, image, mnt) = fixture(lock_image);
    let want = qemu_raw(&image);
    let f = read_be64(&image, INCOMPATIBLE_FEATURES);
    put64(&image, INCOMPATIBLE_FEATURES, f | INCOMPAT_CORRUPT);
    refused_rw_but_mounts_read_only(&image, &mnt, &["img.qcow2", "corrupt"], &want);
}

#[test]
fn image_with_a_persistent_bitmap_mounts_rw_and_keeps_it() {
    let (tmp, image, mnt) = fixture(lock_image);
    qemu_img(tmp.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
    let m = Mount::new(&image, &mnt, &["rw"]);
    let f = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
    f.write_all_at(&[7u8; 4096], 2 * M).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    assert_check_clean(&image);
    // The bitmap is in the file, no longer in use, and qemu-img can change it.
    qemu_img(tmp.path(), &["bitmap", "--clear", "img.qcow2", "b0"]);
    assert_check_clean(&image);
}

#[test]
fn image_with_a_bad_bitmap_refused_rw_naming_it() {
    let (tmp, image, mnt) = fixture(lock_image);
    qemu_img(tmp.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
    let want = qemu_raw(&image);
    // Granularity 2^8, below QEMU's minimum (QEMU then opens the image not at all).
    put8(&image, bitmap_entry_offset(&image, "b0") + 17, 8);
    refused_rw_but_mounts_read_only(
        &image,
        &mnt,
        &["img.qcow2", "bitmap 'b0'", "granularity"],
        &want,
    );
}

#[test]
fn unknown_autoclear_bit_cleared_by_the_first_write() {
    let (_tmp, image, mnt) = fixture(lock_image);
    let bit = 1u64 << 5;
    put64(&image, AUTOCLEAR_FEATURES, bit);
    // A read-write mount that writes nothing changes nothing.
    let before = fs::read(&image).unwrap();
    let initial = qemu_raw(&image);
    let m = Mount::new(&image, &mnt, &["rw"]);
    let disk = Disk::open(&m.disk(), initial.clone());
    disk.verify_through_mount();
    drop(disk);
    m.umount();
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "a read-write mount without writes changed the image"
    );

    let m = Mount::new(&image, &mnt, &["rw"]);
    let mut disk = Disk::open(&m.disk(), initial);
    disk.write(3 * M + 17, &Rng::new(5).bytes(10_000));
    disk.fsync();
    assert_eq!(
        read_be64(&image, AUTOCLEAR_FEATURES) & bit,
        0,
        "the unknown autoclear bit is still set after a write"
    );
    let model = std::mem::take(&mut disk.model);
    drop(disk);
    m.umount();
    assert_eq!(read_be64(&image, AUTOCLEAR_FEATURES), 0);
    assert_check_clean(&image);
    assert_same_bytes(
        "qemu-img convert after the write",
        &model,
        &qemu_raw(&image),
    );
}

#[test]
fn lazy_refcounts_dirty_bit_set_by_a_write_and_cleared_by_unmount() {
    let tmp = tempdir();
    let image = create_image(
        tmp.path(),
        "img.qcow2",
        Some(4 * M),
        "lazy_refcounts=on",
        None,
    );
    qemu_io(&image, &[wp(0x3c, 0, 256 * K)]);
    let mnt = mountpoint(tmp.path(), "mnt");
    let dirty = || read_be64(&image, INCOMPATIBLE_FEATURES) & INCOMPAT_DIRTY != 0;
    let initial = qemu_raw(&image);
    let m = Mount::new(&image, &mnt, &["rw"]);
    assert!(!dirty(), "the dirty bit is set before anything was written");
    let mut disk = Disk::open(&m.disk(), initial);
    disk.write(M + 100, &Rng::new(6).bytes(200 * K as usize));
    assert!(
        dirty(),
        "a write returned but the dirty bit is not set in the file"
    );
    disk.fsync();
    assert!(dirty(), "fsync cleared the dirty bit while mounted");
    let model = std::mem::take(&mut disk.model);
    drop(disk);
    m.umount();
    assert!(!dirty(), "the dirty bit is still set after a clean unmount");
    assert_check_clean(&image);
    assert_same_bytes("qemu-img convert after unmount", &model, &qemu_raw(&image));
}

// ---------------------------------------------------------------------------------------
// File modes and errors
// ---------------------------------------------------------------------------------------

/// The error of `r`, as an errno, or a panic naming `what` when it succeeded.
fn errno_from<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what} succeeded ({v:?}); it should fail"),
        Err(e) => errno_of(&e),
    }
}

fn assert_errno<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>, want: i32) {
    let got = errno_from(what, r);
    assert_eq!(
        got,
        want,
        "{what}: got {}, expected {}",
        errno_name(got),
        errno_name(want)
    );
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// An image over a backing file, with an internal snapshot: NAME.raw, layers/ and
/// snapshots/ all exist.
fn modes_image(dir: &Path) -> PathBuf {
    create_base(dir, 4 * M, &[wp(0x5b, 0, 4 * M)]);
    let image = create_over_base(dir, "img.qcow2", 4 * M, "");
    qemu_io(&image, &[wp(0x3c, 0, 256 * K)]);
    qemu_img(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    image
}

/// The read-only files of a mount: every snapshot and layer file.
fn read_only_files(mnt: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["snapshots", "layers"] {
        let mut here: Vec<PathBuf> = fs::read_dir(mnt.join(sub))
            .unwrap_or_else(|e| panic!("listing {sub}/: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!here.is_empty(), "{sub}/ is empty");
        files.append(&mut here);
    }
    files
}

#[test]
fn rw_mount_modes_erofs_for_snapshots_and_layers_no_shrinking_enospc_past_the_end() {
    let (tmp, image, mnt) = fixture(modes_image);
    let want = qemu_raw(&image);
    let frozen = Frozen::record(&image, &[&tmp.path().join("base.qcow2")]);
    let m = Mount::new(&image, &mnt, &["rw"]);
    let disk = m.disk();
    let size = want.len() as u64;
    assert_eq!(
        mode_of(&disk) & 0o222,
        0o200,
        "NAME.raw of a rw mount: mode {:o}",
        mode_of(&disk)
    );
    for p in read_only_files(&m.mountpoint) {
        let name = p.display().to_string();
        assert_eq!(mode_of(&p) & 0o222, 0, "{name}: mode {:o}", mode_of(&p));
        assert_errno(
            &format!("open O_WRONLY {name}"),
            open_write(&p, false),
            libc::EROFS,
        );
        assert_errno(
            &format!("open O_RDWR {name}"),
            open_write(&p, true),
            libc::EROFS,
        );
        assert_errno(
            &format!("truncate {name}"),
            truncate(&p, 8 * M),
            libc::EROFS,
        );
    }

    let f = open_write(&disk, true).unwrap();
    // Shrinking is refused, by path and by descriptor.
    assert_errno(
        "truncate NAME.raw to half its size",
        truncate(&disk, size / 2),
        libc::EINVAL,
    );
    assert_errno(
        "ftruncate NAME.raw 64 KiB smaller",
        f.set_len(size - 64 * K),
        libc::EINVAL,
    );
    // The disk does not grow by writing: ENOSPC at and past the end, a short write across it.
    assert_errno(
        "pwrite at the end of NAME.raw",
        f.write_at(&[0xee; 4096], size),
        libc::ENOSPC,
    );
    assert_errno(
        "pwrite 1 MiB past the end of NAME.raw",
        f.write_at(&[0xee; 4096], size + M),
        libc::ENOSPC,
    );
    let n = f
        .write_at(&[0xee; 4096], size - 1000)
        .expect("pwrite across the end of NAME.raw");
    assert_eq!(n, 1000, "pwrite of 4096 bytes 1000 bytes before the end");
    let mut model = want.clone();
    model[size as usize - 1000..].fill(0xee);
    // Attributes other than the size cannot be changed.
    use std::os::unix::fs::PermissionsExt;
    assert_errno(
        "chmod NAME.raw",
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o600)),
        libc::EPERM,
    );
    // The tree is fixed: nothing can be created, removed or renamed.
    assert_errno(
        "create MNT/new",
        File::create(m.mountpoint.join("new")),
        libc::EPERM,
    );
    assert_errno("unlink NAME.raw", fs::remove_file(&disk), libc::EPERM);
    assert_errno(
        "mkdir MNT/d",
        fs::create_dir(m.mountpoint.join("d")),
        libc::EPERM,
    );
    assert_errno(
        "rename NAME.raw",
        fs::rename(&disk, m.mountpoint.join("other.raw")),
        libc::EPERM,
    );
    assert_errno(
        "symlink MNT/l",
        std::os::unix::fs::symlink("x", m.mountpoint.join("l")),
        libc::EPERM,
    );
    drop(f);
    assert_eq!(fs::metadata(&disk).unwrap().len(), size, "NAME.raw's size");
    frozen.assert_snapshot_files(&m.mountpoint);
    m.umount();
    assert_check_clean(&image);
    assert_same_bytes(
        "qemu-img convert after the refused operations",
        &model,
        &qemu_raw(&image),
    );
    frozen.assert_unchanged();
}

#[test]
fn read_only_mount_everything_erofs() {
    let (_tmp, image, mnt) = fixture(modes_image);
    let before = fs::read(&image).unwrap();
    let m = Mount::new(&image, &mnt, &[]);
    let mut files = read_only_files(&m.mountpoint);
    files.push(m.disk());
    for p in &files {
        let name = p.display().to_string();
        assert_eq!(mode_of(p) & 0o222, 0, "{name}: mode {:o}", mode_of(p));
        assert_errno(
            &format!("open O_WRONLY {name}"),
            open_write(p, false),
            libc::EROFS,
        );
        assert_errno(
            &format!("open O_RDWR {name}"),
            open_write(p, true),
            libc::EROFS,
        );
        assert_errno(&format!("truncate {name}"), truncate(p, M), libc::EROFS);
        assert_errno(
            &format!("truncate {name} larger"),
            truncate(p, 16 * M),
            libc::EROFS,
        );
    }
    assert_errno(
        "create MNT/new",
        File::create(m.mountpoint.join("new")),
        libc::EROFS,
    );
    m.umount();
    assert_eq!(
        fs::read(&image).unwrap(),
        before,
        "a read-only mount changed the image"
    );
}
