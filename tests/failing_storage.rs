//! Failing storage: what an I/O error, a vanished or truncated image file and a full disk
//! do to readers and writers.
//!
//! - Library level, through `FaultStorage`: a failed read of a data cluster or an L2 table
//!   reaches the reader as an error (never as zeros), and clears once the store recovers;
//!   a failed metadata write-back at any point leaves an image `qemu-img check` accepts
//!   (leaks allowed) and makes every later write fail; ENOSPC from the store is ENOSPC.
//! - Real mounts: the image truncated under a live mount gives EIO for the lost ranges
//!   while the mount stays up; an unlinked image keeps serving (the open descriptor keeps
//!   the inode alive); a read-write mount on a full tmpfs returns ENOSPC to the writer,
//!   and once space is back the image checks clean, keeps its fsync'd data, and mounts
//!   read-write again.

mod support;

use qcow2fs::block::{BlockDev, Qcow2Layer};
use qcow2fs::engine::{Image, ImageOptions, MapKind, View};
use qcow2fs::storage::{FaultOp, FaultStorage, FileStorage};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use support::images::create_image;
use support::*;

const CS: u64 = 64 * K;

/// A 64 KiB-cluster image `name` of `size` bytes in `dir`, with `writes` done by qemu-io.
fn create(dir: &Path, name: &str, size: u64, writes: &[&str]) -> PathBuf {
    let img = create_image(dir, name, Some(size), "cluster_size=65536", None);
    qemu_io(&img, writes);
    img
}

/// The image's active disk over a store that fails on command.
fn open_faulty(img: &Path, writable: bool) -> (Arc<FaultStorage>, Qcow2Layer) {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(img)
        .unwrap();
    let fault = Arc::new(FaultStorage::new(Arc::new(FileStorage::new(file))));
    let opts = ImageOptions {
        writable,
        ..Default::default()
    };
    let image = Image::open(img, fault.clone(), &opts).expect("opening the image");
    let layer = Qcow2Layer::standalone(Arc::new(image)).expect("a standalone layer");
    (fault, layer)
}

/// Reads `buf.len()` bytes at `at`, which must all be `byte`.
fn assert_reads(layer: &Qcow2Layer, buf: &mut [u8], at: u64, byte: u8) {
    layer
        .read_at(buf, at)
        .unwrap_or_else(|e| panic!("read at {at:#x}: {e}"));
    assert!(
        buf.iter().all(|&b| b == byte),
        "read at {at:#x}: not {byte:#x}"
    );
}

fn host_of(layer: &Qcow2Layer, guest: u64) -> u64 {
    match layer.image().map(View::Active, guest, CS).unwrap().kind {
        MapKind::Data { host } => host.0,
        other => panic!("guest {guest:#x} is not plain data: {other:?}"),
    }
}

#[test]
fn data_cluster_read_error_reaches_the_reader() {
    let d = tempdir();
    let img = create(
        d.path(),
        "disk.qcow2",
        4 * M,
        &["write -P 0x5a 0 128k", "write -P 0x6b 1M 64k"],
    );
    let (fault, layer) = open_faulty(&img, false);
    let host = host_of(&layer, 0);
    fault.fail(FaultOp::Read, host, host + 1, libc::EIO, 0);

    let mut buf = vec![0xeeu8; CS as usize];
    let err = layer.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(err.to_string().contains(&format!("{host:#x}")), "{err}");
    // A read that spans the bad cluster fails as a whole.
    let mut big = vec![0u8; 2 * CS as usize];
    assert!(layer.read_at(&mut big, 0).is_err());
    // The rest of the disk is unaffected.
    assert_reads(&layer, &mut buf, CS, 0x5a);
    assert_reads(&layer, &mut buf, M, 0x6b);

    // Nothing stale was kept: once the store recovers, the data is there.
    fault.clear();
    assert_reads(&layer, &mut buf, 0, 0x5a);
}

#[test]
fn l2_table_read_error_reaches_the_reader() {
    let d = tempdir();
    let img = create(d.path(), "disk.qcow2", 4 * M, &["write -P 0x5a 0 64k"]);
    let head = fs::read(&img).unwrap();
    let l1 = be64(&head, 40) as usize;
    let l2 = be64(&head, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0);

    let (fault, layer) = open_faulty(&img, false);
    fault.fail(FaultOp::Read, l2, l2 + CS, libc::EIO, 0);
    let mut buf = vec![0xeeu8; 4096];
    let err = layer.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(layer.status(0, CS, false).is_err());
    // A range whose L2 table cannot be read is not reported as unallocated either.
    assert!(layer.read_at(&mut buf, 2 * M).is_err());

    // The failed table was not cached as empty.
    fault.clear();
    assert_reads(&layer, &mut buf, 0, 0x5a);
}

#[test]
fn enospc_from_the_store_is_enospc() {
    let d = tempdir();
    let img = create(d.path(), "disk.qcow2", 4 * M, &["write -P 0x5a 0 64k"]);
    let (fault, layer) = open_faulty(&img, true);
    fault.fail(FaultOp::Write, 0, u64::MAX, libc::ENOSPC, 0);
    let err = layer.write_at(&[0x77; 4096], 2 * M).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    fault.clear();
    let _ = layer.close();
    drop(layer);
    assert_no_corruption(&img);
    let raw = qemu_raw(&img);
    assert!(raw[..CS as usize].iter().all(|&b| b == 0x5a));
}

/// Cuts the metadata write-back of one allocating write after every possible number of
/// writes (and at the final fsync): each cut leaves an image QEMU accepts, with the data
/// that was already flushed, and the open image refuses further writes.
#[test]
fn failed_metadata_write_back_is_consistent_and_sticky() {
    let d = tempdir();
    let orig = create(d.path(), "orig.qcow2", 1 << 30, &["write -P 0x5a 0 64k"]);
    let mut cut = 0u64;
    loop {
        assert!(cut < 64, "flush never completed");
        let img = d.path().join(format!("cut{cut}.qcow2"));
        fs::copy(&orig, &img).unwrap();
        let (fault, layer) = open_faulty(&img, true);
        layer.write_at(&[0x77; 8192], 3 * M).unwrap();
        layer.write_at(&[0x78; 4096], 100 * K).unwrap();
        // Beyond the first L2 table: a new table and an L1 update.
        layer.write_at(&[0x79; 4096], 600 * M).unwrap();
        fault.fail_after(FaultOp::Write, cut, libc::EIO);
        let flushed = layer.flush();
        if flushed.is_ok() {
            assert!(fault.failures().is_empty());
            layer.close().unwrap();
            drop(layer);
            assert_no_corruption(&img);
            assert!(cut >= 3, "only {cut} metadata writes to cut");
            break;
        }
        let err = flushed.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "cut {cut}: {err}");
        fault.clear();
        let again = layer.write_at(&[0x79; 512], 0).unwrap_err();
        assert_eq!(
            again.errno(),
            libc::EIO,
            "cut {cut}: write after a failed flush"
        );
        assert!(
            layer.flush().is_err(),
            "cut {cut}: flush after a failed flush"
        );
        let _ = layer.close();
        drop(layer);
        assert_no_corruption(&img);
        qemu_io(&img, &["read -q -P 0x5a 0 64k"]);
        cut += 1;
    }

    // A failing fsync counts as a failed write-back too.
    let img = d.path().join("fsync.qcow2");
    fs::copy(&orig, &img).unwrap();
    let (fault, layer) = open_faulty(&img, true);
    layer.write_at(&[0x77; 8192], 3 * M).unwrap();
    fault.fail_after(FaultOp::Flush, 0, libc::EIO);
    assert!(layer.flush().is_err());
    fault.clear();
    assert_eq!(layer.write_at(&[1; 512], 0).unwrap_err().errno(), libc::EIO);
}

fn read_at(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

#[test]
fn image_truncated_under_a_live_mount_gives_eio() {
    let d = tempdir();
    let img = create(
        d.path(),
        "disk.qcow2",
        4 * M,
        &["write -P 0x5a 0 128k", "write -P 0x6b 1M 1M"],
    );
    // Cut the file where the data of guest offset 1M starts.
    let chain = open(&img);
    let cut = host_of(&chain.top, M);
    assert!(host_of(&chain.top, CS) < cut);
    drop(chain);

    let m = Mount::new(&img, &mountpoint(d.path(), "mnt"), &[]);
    let disk = m.path("disk.raw");
    assert!(read_at(&disk, 0, 4096).unwrap().iter().all(|&b| b == 0x5a));
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let err = read_at(&disk, M + 512 * K, 64 * K as usize).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(m.is_mounted(), "the mount went away");
    // What the file still holds is still served, and the namespace still works.
    let rest = read_at(&disk, CS, CS as usize).unwrap();
    assert!(rest.iter().all(|&b| b == 0x5a));
    assert_eq!(fs::metadata(&disk).unwrap().len(), 4 * M);
    assert!(fs::read_dir(&m.mountpoint).unwrap().count() >= 1);
}

/// An image unlinked under a live mount keeps serving its data: the daemon holds the file
/// open, so the inode lives on until the mount ends (as for any open file on Linux).
#[test]
fn image_deleted_under_a_live_mount_keeps_serving() {
    let d = tempdir();
    let img = create(
        d.path(),
        "disk.qcow2",
        4 * M,
        &["write -P 0x5a 0 64k", "write -P 0x6b 2M 64k"],
    );
    let m = Mount::new(&img, &mountpoint(d.path(), "mnt"), &[]);
    let disk = m.path("disk.raw");
    assert!(read_at(&disk, 0, 4096).unwrap().iter().all(|&b| b == 0x5a));
    fs::remove_file(&img).unwrap();
    let later = read_at(&disk, 2 * M, CS as usize).unwrap();
    assert!(later.iter().all(|&b| b == 0x6b));
    assert!(m.is_mounted());
}

/// Writes `byte` from `start` in 256 KiB steps until a write or the final fsync fails;
/// returns the errno.
fn fill_until_error(disk: &Path, start: u64, end: u64, byte: u8) -> Option<i32> {
    let mut f = OpenOptions::new().write(true).open(disk).unwrap();
    let chunk = vec![byte; 256 * K as usize];
    let mut at = start;
    while at < end {
        if let Err(e) = f.write_all_at(&chunk, at) {
            return e.raw_os_error();
        }
        at += chunk.len() as u64;
    }
    if let Err(e) = f.flush().and_then(|_| f.sync_all()) {
        return e.raw_os_error();
    }
    None
}

#[test]
fn full_filesystem_gives_enospc_and_a_consistent_image() {
    let d = tempdir();
    let fs_dir = d.path().join("fs");
    let tmpfs = PlainMount::with_type(
        Some("tmpfs"),
        "tmpfs",
        &mountpoint(d.path(), "fs"),
        "size=6m",
    );
    let img = create(&fs_dir, "disk.qcow2", 64 * M, &[]);
    let mnt = mountpoint(d.path(), "mnt");

    {
        let m = Mount::new(&img, &mnt, &["rw"]);
        let disk = m.path("disk.raw");
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![0xa5; M as usize], 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let errno = fill_until_error(&disk, 2 * M, 60 * M, 0x3c);
        assert_eq!(
            errno,
            Some(libc::ENOSPC),
            "writing past the free space of the filesystem"
        );
        assert!(m.is_mounted());
    }

    tmpfs.remount("size=256m");
    assert_no_corruption(&img);
    qemu_io(&img, &["read -q -P 0xa5 0 1M"]);

    // The image takes writes again once there is room.
    {
        let m = Mount::new(&img, &mnt, &["rw"]);
        let disk = m.path("disk.raw");
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![0x77; M as usize], 8 * M).unwrap();
        f.sync_all().unwrap();
    }
    assert_no_corruption(&img);
    qemu_io(&img, &["read -q -P 0xa5 0 1M", "read -q -P 0x77 8M 1M"]);
}
