//! A mounted image managed live, through real mounts: internal snapshots taken under
//! running writers (each a consistent cut), deleted and reverted to, frozen guest
//! filesystems, external snapshots under open files and a loop-mounted guest, reopening
//! read-write and read-only with the failures each step can meet, and the refusals
//! (names, open snapshot files, mounted guests, read-only mounts, other users).
//!
//! Expected contents come from what the tests wrote and from QEMU's renderings.

mod support;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::images::create_image;
use support::*;

const WRITERS: usize = 4;
/// Each writer's records go to its own region, one 4 KiB block per record.
const RECORDS: u64 = 1024;
const BLOCK: u64 = 4096;

fn new_image(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    qemu_img(dir, &args);
    dir.join(name)
}

/// The record writer `w` writes as its `i`-th write.
fn record(w: usize, i: u64) -> Vec<u8> {
    let mut b = format!("writer {w} record {i:08}\n").into_bytes();
    b.resize(BLOCK as usize, b'.');
    b
}

fn record_offset(w: usize, i: u64) -> u64 {
    (w as u64 * RECORDS + i) * BLOCK
}

/// How many of writer `w`'s records `disk` holds, checking they are a prefix: records
/// 0..n present, none after.
fn prefix(disk: &[u8], w: usize) -> Result<u64, String> {
    let mut n = 0;
    while n < RECORDS {
        let off = record_offset(w, n) as usize;
        if disk[off..off + BLOCK as usize] != record(w, n)[..] {
            break;
        }
        n += 1;
    }
    for i in n..RECORDS {
        let off = record_offset(w, i) as usize;
        if disk[off..off + BLOCK as usize].iter().any(|&b| b != 0) {
            return Err(format!(
                "writer {w}: record {i} is there but record {n} is not"
            ));
        }
    }
    Ok(n)
}

#[test]
fn snapshots_taken_under_running_writers_are_consistent_cuts() {
    let d = tempdir();
    let image = new_image(d.path(), "c.qcow2", "64M", "cluster_size=65536");
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let disk = m.disk();
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (disk, stop, done) = (disk.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&disk).unwrap();
                for i in 0..RECORDS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    f.write_all_at(&record(w, i), record_offset(w, i)).unwrap();
                    done[w].store(i + 1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // (name, what each writer had finished before the request)
    let mut taken: Vec<(String, Vec<u64>)> = Vec::new();
    for k in 0..20 {
        std::thread::sleep(Duration::from_millis(15));
        let before: Vec<u64> = done.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let name = format!("cut{k:02}");
        qcow2fs_try(
            d.path(),
            &["snapshot", "create", mnt.to_str().unwrap(), &name],
        )
        .expect_success();
        taken.push((name, before));
    }
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.join().unwrap();
    }
    let final_counts: Vec<u64> = done.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert!(
        fs::read_dir(mnt.join("snapshots")).unwrap().count() == 20,
        "the snapshot files are not all there"
    );
    m.umount();
    assert_check_clean(&image);
    let mut wrong = Vec::new();
    let mut last = [0u64; WRITERS];
    for (name, before) in &taken {
        let raw = qemu_snapshot_raw(&image, name);
        for w in 0..WRITERS {
            match prefix(&raw, w) {
                Err(e) => wrong.push(format!("{name}: {e}")),
                Ok(n) if n < before[w] => wrong.push(format!(
                    "{name}: writer {w} had finished {} writes before the snapshot, it holds {n}",
                    before[w]
                )),
                Ok(n) if n < last[w] => wrong.push(format!(
                    "{name}: writer {w} has {n} records, fewer than an earlier snapshot's {}",
                    last[w]
                )),
                Ok(n) => last[w] = n,
            }
        }
    }
    let active = qemu_raw(&image);
    for (w, &count) in final_counts.iter().enumerate() {
        if prefix(&active, w) != Ok(count) {
            wrong.push(format!(
                "active disk: writer {w} does not hold its {count} records"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        final_counts.iter().sum::<u64>() > 20,
        "test setup: the writers wrote almost nothing ({final_counts:?})"
    );
}

#[test]
fn frozen_ext4_guest_snapshots_are_clean() {
    let d = tempdir();
    let image = new_image(d.path(), "g.qcow2", "96M", "");
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    run(
        d.path(),
        "mkfs.ext4",
        &["-q", "-F", m.disk().to_str().unwrap()],
    );
    let guest = mountpoint(d.path(), "guest");
    let lm = LoopMount::new(&m.disk(), &guest, false, "");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (g, stop) = (guest.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let p = g.join(format!("f{}", i % 64));
                fs::write(&p, vec![(i % 251) as u8; 8192 + (i as usize % 7) * 4096]).unwrap();
                i += 1;
            }
            i
        })
    };
    for k in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        qcow2fs_try(
            d.path(),
            &[
                "snapshot",
                "create",
                "--freeze",
                guest.to_str().unwrap(),
                mnt.to_str().unwrap(),
                &format!("frozen{k}"),
            ],
        )
        .expect_success();
        // Thawed again: the guest takes writes.
        fs::write(guest.join("after"), b"x").unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let wrote = writer.join().unwrap();
    assert!(
        wrote > 10,
        "test setup: the guest writer wrote {wrote} files"
    );
    lm.unmount();
    m.umount();
    assert_check_clean(&image);
    for k in 0..3 {
        let raw = d.path().join(format!("frozen{k}.raw"));
        fs::write(&raw, qemu_snapshot_raw(&image, &format!("frozen{k}"))).unwrap();
        let fsck = run_in(
            d.path(),
            "e2fsck",
            &["-fn", raw.to_str().unwrap()],
            COMMAND_LIMIT,
        );
        assert!(fsck.success(), "snapshot frozen{k}: {}", fsck.describe());
    }
}

#[test]
fn delete_and_revert_with_files_open_and_the_refusals() {
    let d = tempdir();
    fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let image = new_image(d.path(), "r.qcow2", "16M", "");
    qemu_io(&image, &["write -P 0x11 0 1M"]);
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let mp = mnt.to_str().unwrap();
    let disk = m.disk();
    qcow2fs_try(d.path(), &["snapshot", "create", mp, "one"]).expect_success();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    f.write_all_at(&[0x22; 65536], 0).unwrap();
    // The names QEMU would take but the mount could not show unambiguously.
    for (name, why) in [
        ("", "needs a name"),
        ("a/b", "'/'"),
        ("one", "exists already"),
        ("1", "ID of snapshot"),
        ("..", "'/'"),
    ] {
        let r = qcow2fs_try(d.path(), &["snapshot", "create", mp, name]);
        assert!(
            r.code() == Some(1) && r.stderr.contains(why),
            "name {name:?}: {}",
            r.describe()
        );
    }
    // An open snapshot file is not deleted.
    let held = fs::File::open(mnt.join("snapshots/one.raw")).unwrap();
    let r = qcow2fs_try(d.path(), &["snapshot", "delete", mp, "one"]);
    assert!(
        r.code() == Some(1) && r.stderr.contains("is open"),
        "{}",
        r.describe()
    );
    let mut b = vec![0u8; 4096];
    held.read_exact_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x11),
        "the snapshot's content changed"
    );
    drop(held);
    // A revert with the active disk open: open handles read the snapshot's content.
    qcow2fs_try(d.path(), &["snapshot", "revert", mp, "one"]).expect_success();
    f.read_exact_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x11),
        "an open handle reads the old content after revert"
    );
    assert_eq!(fs::read(&disk).unwrap()[..4096], [0x11; 4096][..]);
    drop(f);
    // Under a mounted guest filesystem, only with --force.
    run(d.path(), "mkfs.ext4", &["-q", "-F", disk.to_str().unwrap()]);
    qcow2fs_try(d.path(), &["snapshot", "create", mp, "fs"]).expect_success();
    let guest = mountpoint(d.path(), "guest");
    let lm = LoopMount::new(&disk, &guest, true, "");
    let r = qcow2fs_try(d.path(), &["snapshot", "revert", mp, "fs"]);
    assert!(
        r.code() == Some(1) && r.stderr.contains("mounted"),
        "{}",
        r.describe()
    );
    lm.unmount();
    qcow2fs_try(d.path(), &["snapshot", "revert", mp, "fs"]).expect_success();
    qcow2fs_try(d.path(), &["snapshot", "delete", mp, "one"]).expect_success();
    assert!(!mnt.join("snapshots/one.raw").exists());
    // Another user may not control the mount.
    let r = std::process::Command::new(qcow2fs_bin())
        .args(["snapshot", "create", mp, "x"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!r.status.success());
    m.umount();
    assert_check_clean(&image);
    assert_eq!(qemu_snapshot_ids(&image).len(), 1);
    // A read-only mount refuses, saying what to do.
    let m = Mount::new(&image, &mnt, &[]);
    let r = qcow2fs_try(d.path(), &["snapshot", "create", mp, "ro"]);
    assert!(
        r.code() == Some(1) && r.stderr.contains("remount it read-write"),
        "{}",
        r.describe()
    );
    drop(m);
    // The same commands on the image itself.
    qcow2fs_try(
        d.path(),
        &["snapshot", "create", image.to_str().unwrap(), "offline"],
    )
    .expect_success();
    let l = qcow2fs_try(
        d.path(),
        &["snapshot", "list", "--json", image.to_str().unwrap()],
    )
    .expect_success();
    let v: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    qcow2fs_try(
        d.path(),
        &["snapshot", "delete", image.to_str().unwrap(), "offline"],
    )
    .expect_success();
    assert_check_clean(&image);
}

/// The snapshot file of a new snapshot appears at once, also after a failed lookup made
/// the kernel remember that it was not there.
#[test]
fn a_new_snapshot_file_appears_at_once() {
    let d = tempdir();
    let image = new_image(d.path(), "n.qcow2", "8M", "");
    qemu_img(d.path(), &["snapshot", "-c", "old", "n.qcow2"]);
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let file = mnt.join("snapshots/new.raw");
    assert!(!file.exists());
    qcow2fs_try(
        d.path(),
        &["snapshot", "create", mnt.to_str().unwrap(), "new"],
    )
    .expect_success();
    assert!(file.exists(), "a negative entry survived");
    let names: Vec<String> = fs::read_dir(mnt.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"new.raw".to_string()), "{names:?}");
    qcow2fs_try(
        d.path(),
        &["snapshot", "delete", mnt.to_str().unwrap(), "new"],
    )
    .expect_success();
    assert!(!file.exists(), "a stale entry survived");
    drop(m);
}

#[test]
fn external_snapshot_under_open_files_a_loop_mounted_guest_and_writers() {
    let d = tempdir();
    let image = new_image(d.path(), "base.qcow2", "64M", "");
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let disk = m.disk();
    run(d.path(), "mkfs.ext4", &["-q", "-F", disk.to_str().unwrap()]);
    let guest = mountpoint(d.path(), "guest");
    let lm = LoopMount::new(&disk, &guest, false, "");
    fs::write(guest.join("before"), b"written before").unwrap();
    let held = OpenOptions::new().write(true).open(&disk).unwrap();
    let new = d.path().join("sub/top.qcow2");
    fs::create_dir(d.path().join("sub")).unwrap();
    let r = qcow2fs_try(
        d.path(),
        &[
            "snapshot",
            "create",
            "--freeze",
            guest.to_str().unwrap(),
            "--external",
            new.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
    );
    r.expect_success();
    // The old image is a read-only layer now: QEMU may read it while the mount runs.
    qemu_img(d.path(), &["info", "base.qcow2"]);
    assert!(mnt.join("layers/1-base.raw").exists());
    let info = qemu_info_json_shared(&new);
    assert_eq!(info["backing-filename"], "../base.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    // The guest and the open file keep working, and write to the new image.
    fs::write(guest.join("after"), b"written after").unwrap();
    held.write_all_at(&[0x5a; 512], 63 << 20).unwrap();
    drop(held);
    lm.unmount();
    m.umount();
    assert_check_clean(&image);
    assert_check_clean(&new);
    let raw = d.path().join("chain.raw");
    fs::write(&raw, qemu_raw(&new)).unwrap();
    assert_eq!(
        fs::read(&raw).unwrap()[(63 << 20)..(63 << 20) + 512],
        [0x5a; 512][..]
    );
    let fsck = run_in(
        d.path(),
        "e2fsck",
        &["-fn", raw.to_str().unwrap()],
        COMMAND_LIMIT,
    );
    assert!(fsck.success(), "{}", fsck.describe());
    let files = run(
        d.path(),
        "debugfs",
        &["-R", "ls -l /", raw.to_str().unwrap()],
    );
    let listing = String::from_utf8_lossy(&files.stdout).into_owned();
    assert!(
        listing.contains("before") && listing.contains("after"),
        "{listing}"
    );
    // The new file existed: refused, nothing changed.
    let m = Mount::new(&new, &mnt, &["rw"]);
    let r = qcow2fs_try(
        d.path(),
        &[
            "snapshot",
            "create",
            "--external",
            new.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
    );
    assert!(r.code() == Some(1), "{}", r.describe());
    m.umount();
}

#[test]
fn remount_both_ways_with_open_files_and_each_failure_leaves_the_mount_as_it_was() {
    let d = tempdir();
    let image = new_image(d.path(), "w.qcow2", "16M", "lazy_refcounts=on");
    qemu_io(&image, &["write -P 0x31 0 1M"]);
    let mnt = mountpoint(d.path(), "m");
    let mp = mnt.to_str().unwrap();
    let flag = |mnt: &Path| -> String {
        mount_info(mnt)
            .map(|i| i.mount_options.split(',').next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let m = Mount::new(&image, &mnt, &[]);
    let reader = fs::File::open(m.disk()).unwrap();
    assert_eq!(flag(&mnt), "ro");
    // Another reader that does not share writing (qemu-io -r): read-write is refused,
    // the mount stays as it was and still serves reads.
    let mut other = std::process::Command::new("qemu-io")
        .args(["-r", "-c", "sleep 20000", image.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = other.id();
    let locked = wait_until(Duration::from_secs(10), || {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == image))
        })
    });
    // Its locks follow the open at once; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    assert!(locked, "test setup: qemu-io -r took no lock");
    let r = qcow2fs_try(d.path(), &["remount", "-o", "rw", mp]);
    let _ = other.kill();
    let _ = other.wait();
    assert!(
        r.code() == Some(1) && r.stderr.contains("lock"),
        "{}",
        r.describe()
    );
    assert_eq!(flag(&mnt), "ro");
    let mut b = vec![0u8; 4096];
    reader.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x31));
    // Read-write, then writes, with QEMU locked out.
    qcow2fs_try(d.path(), &["remount", "-o", "rw", mp]).expect_success();
    assert_eq!(flag(&mnt), "rw");
    let w = OpenOptions::new().write(true).open(m.disk()).unwrap();
    w.write_all_at(&[0x32; 4096], 8192).unwrap();
    assert!(!run_in(d.path(), "qemu-img", &["info", "w.qcow2"], COMMAND_LIMIT).success());
    assert!(
        dirty_flag(&image),
        "lazy refcounts: the dirty bit is set while writable"
    );
    // Read-only is refused while a file is open for writing.
    let r = qcow2fs_try(d.path(), &["remount", "-o", "ro", mp]);
    assert!(
        r.code() == Some(1) && r.stderr.contains("open for writing"),
        "{}",
        r.describe()
    );
    assert_eq!(flag(&mnt), "rw");
    drop(w);
    // mount(8)'s form.
    qcow2fs_try(d.path(), &["mount", "-o", "remount,ro", "w.qcow2", mp]).expect_success();
    assert_eq!(flag(&mnt), "ro");
    // Read-only again: written back, the dirty bit cleared, QEMU may read it.
    assert!(!dirty_flag(&image));
    assert_check_clean(&image);
    reader.read_exact_at(&mut b, 8192).unwrap();
    assert!(b.iter().all(|&x| x == 0x32));
    // A corrupt bit set meanwhile (by force) is caught at the reopen.
    drop(reader);
    drop(m);
    support::patch::patch(&image, 72, &[0, 0, 0, 0, 0, 0, 0, 2]);
    let m = Mount::new(&image, &mnt, &[]);
    let r = qcow2fs_try(d.path(), &["remount", "-o", "rw", mp]);
    assert!(
        r.code() == Some(1) && r.stderr.contains("corrupt"),
        "{}",
        r.describe()
    );
    assert_eq!(flag(&mnt), "ro");
    assert_eq!(fs::read(m.disk()).unwrap()[8192], 0x32);
    drop(m);
}

/// kill -9 of the daemon while snapshots are being taken, deleted and reverted to: QEMU
/// finds no corruption, and every snapshot the image lists is whole.
#[test]
fn killed_during_snapshot_operations_the_image_stays_consistent() {
    let d = tempdir();
    let image = new_image(d.path(), "k.qcow2", "256M", "cluster_size=4096");
    qemu_io(&image, &["write -P 0x41 0 48M"]);
    let base = qemu_raw(&image);
    let mnt = mountpoint(d.path(), "m");
    let mp = mnt.to_str().unwrap().to_string();
    for round in 0..4u64 {
        let m = Mount::new(&image, &mnt, &["rw"]);
        let dir = d.path().to_path_buf();
        let mp2 = mp.clone();
        let ops = std::thread::spawn(move || {
            for k in 0..6 {
                let name = format!("r{round}k{k}");
                let _ = qcow2fs_try(&dir, &["snapshot", "create", &mp2, &name]);
                let _ = qcow2fs_try(&dir, &["snapshot", "revert", &mp2, &name]);
                if k % 2 == 1 {
                    let _ = qcow2fs_try(&dir, &["snapshot", "delete", &mp2, &name]);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(40 + 70 * round));
        m.kill9();
        ops.join().unwrap();
        assert_no_corruption(&image);
        for id in qemu_snapshot_ids(&image) {
            let raw = qemu_snapshot_raw(&image, &id);
            assert_same_bytes(&format!("round {round}: snapshot {id}"), &base, &raw);
        }
    }
}

/// A full disk in the middle of taking a snapshot: the snapshot is refused, the image is
/// as before (no half-written table, refcounts consistent) and the mount goes on writing.
#[test]
fn a_full_disk_fails_the_snapshot_and_nothing_else() {
    let d = tempdir();
    let fsdir = mountpoint(d.path(), "small");
    let small = PlainMount::with_type(Some("tmpfs"), "tmpfs", &fsdir, "size=12m");
    let image = new_image(&fsdir, "f.qcow2", "32M", "");
    qemu_io(&image, &["write -P 0x61 0 8M"]);
    let before = qemu_raw(&image);
    // Leave less than a cluster free.
    let filler = fsdir.join("filler");
    let free = || {
        let out = run(
            &fsdir,
            "df",
            &["--output=avail", "-B1", fsdir.to_str().unwrap()],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .unwrap()
    };
    fs::write(&filler, vec![1u8; (free() - 16384) as usize]).unwrap();
    assert!(free() < 65536, "test setup: {} bytes free", free());
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let r = qcow2fs_try(
        d.path(),
        &["snapshot", "create", mnt.to_str().unwrap(), "full"],
    );
    assert!(
        r.code() == Some(1) && r.stderr.contains("No space"),
        "{}",
        r.describe()
    );
    assert!(!mnt.join("snapshots").exists());
    // The mount still writes where the image has room.
    let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
    f.write_all_at(&[0x62; 4096], 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    fs::remove_file(&filler).unwrap();
    assert_check_clean(&image);
    assert!(qemu_snapshot_ids(&image).is_empty());
    let mut want = before;
    want[4096..8192].fill(0x62);
    assert_same_bytes("after the refused snapshot", &want, &qemu_raw(&image));
    drop(small);
}

/// However a mount is made, the kernel's read-only flag is the daemon's mode; a reopen
/// read-write over a read-only filesystem fails and leaves the mount read-only.
#[test]
fn the_kernel_flag_follows_the_daemon_in_every_mount_form() {
    let d = tempdir();
    let image = new_image(d.path(), "k.qcow2", "8M", "");
    let bin = absolute(Path::new(qcow2fs_bin()));
    let helpers = ["/sbin/mount.qcow2fs", "/sbin/mount.fuse.qcow2fs"]
        .map(|p| TempSymlink::new(Path::new(p), &bin).unwrap_or_else(|e| panic!("{e}")));
    let mnt = mountpoint(d.path(), "m");
    let mode = |d: &Path| -> String {
        let out = run(
            d,
            qcow2fs_bin(),
            &["status", "--json", mnt.to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["mode"].as_str().unwrap_or("").to_string()
    };
    let kernel = || {
        mount_info(&mnt)
            .map(|i| i.mount_options.split(',').next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    for (fstype, opts, want) in [
        (None, "", "ro"),
        (None, "rw", "rw"),
        (Some("qcow2fs"), "ro", "ro"),
        (Some("fuse.qcow2fs"), "ro", "ro"),
        (Some("fuse.qcow2fs"), "rw", "rw"),
    ] {
        let m = match fstype {
            None if opts.is_empty() => Mount::new(&image, &mnt, &[]),
            None => Mount::new(&image, &mnt, &[opts]),
            Some(t) => {
                let pm = PlainMount::with_type(Some(t), image.to_str().unwrap(), &mnt, opts);
                std::mem::forget(pm);
                Mount::adopt(&mnt)
            }
        };
        assert_eq!(
            (mode(d.path()), kernel()),
            (want.to_string(), want.to_string()),
            "{fstype:?} -o {opts}"
        );
        // mount(8)'s remount, through the helper.
        let other = if want == "ro" { "rw" } else { "ro" };
        run_timeout(
            std::process::Command::new("mount")
                .arg("-o")
                .arg(format!("remount,{other}"))
                .arg(&mnt),
            MOUNT_TIMEOUT,
        )
        .expect_success();
        assert_eq!(
            (mode(d.path()), kernel()),
            (other.to_string(), other.to_string()),
            "{fstype:?} -o {opts}, remount {other}"
        );
        m.umount();
    }
    drop(helpers);
    // A read-only filesystem under the image: read-write fails, the mount stays read-only.
    let ro_dir = mountpoint(d.path(), "rofs");
    let bind = PlainMount::new(d.path().to_str().unwrap(), &ro_dir, "bind,ro");
    let m = Mount::new(&ro_dir.join("k.qcow2"), &mnt, &[]);
    let r = qcow2fs_try(d.path(), &["remount", "-o", "rw", mnt.to_str().unwrap()]);
    assert!(
        r.code() == Some(1) && r.stderr.contains("Read-only file system"),
        "{}",
        r.describe()
    );
    assert_eq!(
        (mode(d.path()), kernel()),
        ("ro".to_string(), "ro".to_string())
    );
    assert!(!fs::read(m.disk()).unwrap().is_empty());
    m.umount();
    drop(bind);
}

/// What a remount means for the other modes: an overlay mount cannot be remounted (it
/// never writes the image); a copy-on-read mount copies only while it is read-write; a
/// read-only loop-mounted guest keeps working across both remounts.
#[test]
fn remount_of_overlay_and_copy_on_read_mounts_and_under_a_guest() {
    let d = tempdir();
    let base = new_image(d.path(), "base.qcow2", "32M", "");
    qemu_io(&base, &["write -P 0x71 0 4M"]);
    let top = create_image(
        d.path(),
        "top.qcow2",
        None,
        "",
        Some(("base.qcow2", "qcow2")),
    );
    let mnt = mountpoint(d.path(), "m");
    let mp = mnt.to_str().unwrap();
    // Overlay: refused both ways, the mount keeps serving.
    let m = Mount::new(&top, &mnt, &["overlay"]);
    for how in ["rw", "ro"] {
        let r = qcow2fs_try(d.path(), &["remount", "-o", how, mp]);
        assert!(
            r.code() == Some(1) && r.stderr.contains("overlay"),
            "{}",
            r.describe()
        );
    }
    assert_eq!(fs::read(m.disk()).unwrap()[0], 0x71);
    m.umount();
    // Copy-on-read: read-only copies nothing; read-write copies what is read.
    let own = |image: &Path| -> u64 {
        let v = qemu_map_json(image);
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    };
    let m = Mount::new(&top, &mnt, &["rw,copy-on-read"]);
    qcow2fs_try(d.path(), &["remount", "-o", "ro", mp]).expect_success();
    let mut b = vec![0u8; 65536];
    let f = fs::File::open(m.disk()).unwrap();
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b[0], 0x71);
    qcow2fs_try(d.path(), &["remount", "-o", "rw", mp]).expect_success();
    assert!(
        run(d.path(), qcow2fs_bin(), &["status", "--json", mp])
            .stdout_text()
            .contains("copy-on-read")
    );
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    drop(f);
    m.umount();
    let copied = own(&top);
    assert!(
        (65536..(4 << 20)).contains(&copied),
        "copy-on-read copied {copied} bytes: only what was read while read-write should be"
    );
    assert_check_clean(&top);
    // A read-only loop-mounted guest across both remounts.
    let g = new_image(d.path(), "g.qcow2", "32M", "");
    let m = Mount::new(&g, &mnt, &["rw"]);
    run(
        d.path(),
        "mkfs.ext4",
        &["-q", "-F", m.disk().to_str().unwrap()],
    );
    qcow2fs_try(d.path(), &["remount", "-o", "ro", mp]).expect_success();
    let guest = mountpoint(d.path(), "guest");
    let lm = LoopMount::new(&m.disk(), &guest, true, "");
    let before = fs::read_dir(&guest).unwrap().count();
    qcow2fs_try(d.path(), &["remount", "-o", "rw", mp]).expect_success();
    assert_eq!(fs::read_dir(&guest).unwrap().count(), before);
    qcow2fs_try(d.path(), &["remount", "-o", "ro", mp]).expect_success();
    assert_eq!(fs::read_dir(&guest).unwrap().count(), before);
    lm.unmount();
    m.umount();
}
