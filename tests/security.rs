//! The mount as a security boundary, and robustness against hostile or careless input:
//!
//! - other users (a system user the test creates) get no more through an `allow_other`
//!   mount than the image and backing files allow them, in every mode (read-only,
//!   read-write, overlay), also for a typed raw backing file outside the image's folder;
//! - FIFOs as image, backing file or data file are refused at once, never waited on;
//! - writes to images whose refcounts are damaged keep every byte (QEMU reads them back),
//!   and a write that would land on metadata fails and marks the image corrupt;
//! - throwaway overlays are private to the mounting user and vanish even after kill -9;
//! - `qcow2fs umount` and root's plain `umount` return only once the image is free;
//! - writes straddling the end, unaligned sizes, backing loops and error messages.

mod support;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use support::images::{create_image, create_unchecked_over};
use support::*;

const TEST_USER: &str = "qcow2fs-test";

/// The uid and gid of an unprivileged user made for these tests.
fn test_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        let id = |flag: &str| {
            Command::new("id")
                .args([flag, TEST_USER])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        };
        if id("-u").is_none() {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(TEST_USER)
                .output()
                .expect("running useradd");
            assert!(
                out.status.success() || id("-u").is_some(),
                "useradd {TEST_USER}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (uid, gid) = (id("-u").unwrap(), id("-g").unwrap());
        assert_ne!(uid, 0);
        (uid, gid)
    })
}

/// Runs `program args` as the test user; returns (success, stdout, stderr).
fn as_user(program: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
    let (uid, gid) = test_user();
    let out = Command::new(program)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap_or_else(|e| panic!("running {program} as {TEST_USER}: {e}"));
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// Whether the test user can read `path` (with `cat`).
fn user_reads(path: &Path) -> bool {
    as_user("cat", &[path.to_str().unwrap()]).0
}

/// Whether the test user can overwrite one byte of `path` in place.
fn user_writes(path: &Path) -> bool {
    let of = format!("of={}", path.display());
    as_user(
        "dd",
        &["if=/dev/zero", &of, "bs=1", "count=1", "conv=notrunc"],
    )
    .0
}

/// A temporary directory the test user may enter.
fn open_dir() -> tempfile::TempDir {
    let d = tempdir();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn new_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, size]);
    dir.join(name)
}

fn mnt_in(dir: &Path, name: &str) -> PathBuf {
    let m = mountpoint(dir, name);
    chmod(&m, 0o755);
    m
}

#[test]
fn other_users_get_no_more_than_the_image_allows() {
    let d = open_dir();
    let image = new_image(d.path(), "i.qcow2", "4M");
    qemu_io(&image, &["write -P 0x5a 0 1M"]);
    let before = qemu_raw(&image);
    let mut wrong = Vec::new();
    let (uid, _) = test_user();
    let owned_by_user = format!("rw,allow_other,uid={uid}");
    // (image mode, mount options, the test user may read, may write)
    let cases: &[(u32, &str, bool, bool)] = &[
        (0o644, "rw,allow_other", true, false),
        (0o666, "rw,allow_other", true, false),
        // Shown as the user's own file: writable only where the image is.
        (0o666, &owned_by_user, true, true),
        (0o644, &owned_by_user, true, false),
        (0o600, &owned_by_user, false, false),
        (0o666, "rw,allow_other,umask=077", false, false),
        (0o600, "rw,allow_other", false, false),
        (0o644, "ro,allow_other", true, false),
        (0o600, "ro,allow_other", false, false),
        (0o644, "overlay,allow_other", true, false),
        (0o600, "overlay,allow_other", false, false),
        (0o600, "ro,allow_other,uid=65534", false, false),
    ];
    for &(mode, opts, may_read, may_write) in cases {
        chmod(&image, mode);
        let mnt = mnt_in(d.path(), "m");
        let m = Mount::new(&image, &mnt, &[opts]);
        let disk = m.path("i.raw");
        let (r, w) = (user_reads(&disk), user_writes(&disk));
        if (r, w) != (may_read, may_write) {
            let md = fs::metadata(&disk).unwrap();
            wrong.push(format!(
                "image {mode:o}, -o {opts}: {TEST_USER} could read {r}, write {w}; expected {may_read}, {may_write} (the file shows {:o} {}:{})",
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            ));
        }
        // The mounting user (root) still can.
        if fs::read(&disk).map(|b| b.len()).ok() != Some(4 << 20) {
            wrong.push(format!("image {mode:o}, -o {opts}: root cannot read"));
        }
        m.umount();
    }
    chmod(&image, 0o644);
    let after = qemu_raw(&image);
    let writes_allowed = 1; // the one case where the user may write
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(
        changed <= writes_allowed,
        "{changed} bytes of the image changed"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_backing_file_is_not_readable_through_the_mount_by_users_who_cannot_read_it() {
    let d = open_dir();
    // A "secret" outside the image's folder, readable by root only, named by a hostile
    // image as its typed raw backing file.
    let secret_dir = open_dir();
    let secret = secret_dir.path().join("shadow");
    fs::write(
        &secret,
        b"root:$6$secret-hash:19000:0:99999:7:::\n".repeat(100),
    )
    .unwrap();
    chmod(&secret, 0o600);
    let image = d.path().join("h.qcow2");
    create_unchecked_over(d.path(), "h.qcow2", "1M", secret.to_str().unwrap(), "raw");
    let mut wrong = Vec::new();
    for opts in ["ro,allow_other", "rw,allow_other", "overlay,allow_other"] {
        let mnt = mnt_in(d.path(), "m");
        let m = Mount::new(&image, &mnt, &[opts]);
        let layer = m.path("layers/1-shadow.raw");
        for f in [&layer, &m.path("h.raw")] {
            if user_reads(f) {
                wrong.push(format!("-o {opts}: {TEST_USER} read {}", f.display()));
            }
        }
        // Root, who may read the secret anyway, sees it through the layer.
        let got = fs::read(&layer).unwrap();
        if !got.starts_with(b"root:$6$") {
            wrong.push(format!("-o {opts}: root does not see the backing file"));
        }
        m.umount();
    }
    // Readable to all: then the layer is too.
    chmod(&secret, 0o644);
    let mnt = mnt_in(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["ro,allow_other"]);
    if !user_reads(&m.path("layers/1-shadow.raw")) {
        wrong.push("a world-readable backing file is not readable through its layer".into());
    }
    m.umount();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `qcow2fs ARGS` with a short time limit: a FIFO must never be waited on.
fn qcow2fs_quick(dir: &Path, args: &[&str]) -> Finished {
    run_timeout(
        Command::new(qcow2fs_bin()).args(args).current_dir(dir),
        Duration::from_secs(20),
    )
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifos_are_refused_without_hanging() {
    let d = tempdir();
    let dir = d.path();
    mkfifo(&dir.join("f.qcow2"));
    mkfifo(&dir.join("fifo"));
    // An image whose raw backing file is a FIFO, and one whose data file is.
    create_unchecked_over(dir, "b.qcow2", "1M", "fifo", "raw");
    create_image(dir, "d.qcow2", Some(M), "data_file=d.raw", None);
    fs::remove_file(dir.join("d.raw")).unwrap();
    mkfifo(&dir.join("d.raw"));
    let mnt = mountpoint(dir, "m");
    let mut wrong = Vec::new();
    for image in ["f.qcow2", "b.qcow2", "d.qcow2"] {
        for args in [
            vec!["info", image],
            vec!["mount", image, mnt.to_str().unwrap()],
            vec!["mount", "-o", "rw", image, mnt.to_str().unwrap()],
        ] {
            let out = qcow2fs_quick(dir, &args);
            if out.code() != Some(1) || !out.stderr.contains("FIFO") {
                wrong.push(format!(
                    "expected exit 1 and a message naming the FIFO: {}",
                    out.describe()
                ));
            }
            if mount_info(&mnt).is_some_and(|m| m.fstype == "fuse.qcow2fs") {
                let _ = force_unmount(&mnt, Some("fuse.qcow2fs"));
                wrong.push(format!("qcow2fs {args:?} left a mount"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// An image with 1 MiB of 0x11 at guest offset 0, whose refcount of host cluster
/// `cluster` (64 KiB clusters: 1 is the refcount table, 2 the refcount block, 4 the L2
/// table, 5 the first data cluster) is set to 0.
fn damaged_refcount_image(dir: &Path, name: &str, cluster: u64) -> PathBuf {
    let image = new_image(dir, name, "64M");
    qemu_io(&image, &["write -P 0x11 0 1M"]);
    let f = OpenOptions::new().write(true).open(&image).unwrap();
    // 16-bit refcounts, the refcount block at 0x20000.
    f.write_all_at(&[0, 0], 0x20000 + 2 * cluster).unwrap();
    image
}

/// The number of errors `qemu-img check` reports (leaks are not errors).
fn check_errors(image: &Path) -> usize {
    let out = run_in(
        &image_dir(image),
        "qemu-img",
        &["check", image.to_str().unwrap()],
        COMMAND_LIMIT,
    );
    out.all_output()
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .count()
}

#[test]
fn writes_to_images_with_damaged_refcounts_keep_every_byte() {
    let d = tempdir();
    let mut wrong = Vec::new();
    for (cluster, what) in [
        (1, "refcount table"),
        (2, "refcount block"),
        (4, "L2 table"),
        (5, "data cluster"),
    ] {
        let image = damaged_refcount_image(d.path(), &format!("r{cluster}.qcow2"), cluster);
        let errors = check_errors(&image);
        assert!(errors >= 1, "{what}: the damage was not made");
        {
            let mnt = mountpoint(d.path(), &format!("m{cluster}"));
            let m = Mount::new(&image, &mnt, &["rw"]);
            let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
            // Single clusters, then a longer run, where freed-looking clusters lie.
            for (off, len) in [(8 << 20, 64 << 10), (9 << 20, 1536 << 10)] {
                if let Err(e) = f.write_all_at(&vec![0x22; len], off) {
                    wrong.push(format!("{what}: write at {off:#x}: {e}"));
                }
            }
            if let Err(e) = f.sync_all() {
                wrong.push(format!("{what}: fsync: {e}"));
            }
            drop(f);
            m.umount();
        }
        let out = run_in(
            d.path(),
            "qemu-io",
            &[
                "-c",
                "read -P 0x11 0 1M",
                "-c",
                "read -P 0x22 8M 64k",
                "-c",
                "read -P 0x22 9M 1536k",
                image.to_str().unwrap(),
            ],
            COMMAND_LIMIT,
        );
        if out.all_output().contains("Pattern verification failed") || !out.success() {
            wrong.push(format!("{what}: data lost: {}", out.describe()));
        }
        let now = check_errors(&image);
        if now > errors {
            wrong.push(format!(
                "{what}: qemu-img check errors grew from {errors} to {now}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_write_onto_metadata_fails_and_marks_the_image_corrupt() {
    let d = tempdir();
    let image = new_image(d.path(), "o.qcow2", "64M");
    qemu_io(&image, &["write -P 0x11 0 64k"]);
    // The L2 entry of guest cluster 0 (L2 table at 0x40000) now points at the refcount
    // table (0x10000), flagged as used only here, so a write would go there in place.
    let f = OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(&(0x8000_0000_0001_0000u64).to_be_bytes(), 0x40000)
        .unwrap();
    drop(f);
    let reftable = |p: &Path| {
        let mut b = vec![0u8; 4096];
        File::open(p)
            .unwrap()
            .read_exact_at(&mut b, 0x10000)
            .unwrap();
        b
    };
    let table_before = reftable(&image);
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
    let r = f.write_all_at(&[0x33; 4096], 0).and_then(|()| f.sync_all());
    let err = r.expect_err("a write onto the refcount table succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Later writes elsewhere are refused too.
    let r = f.write_all_at(&[0x33; 4096], 32 << 20);
    assert!(
        r.is_err(),
        "a write after the corruption was found succeeded"
    );
    drop(f);
    m.umount();
    assert_eq!(
        reftable(&image),
        table_before,
        "the refcount table was overwritten"
    );
    let info = qemu_img(d.path(), &["info", "--output=json", "o.qcow2"]);
    assert!(
        info.contains("\"corrupt\": true"),
        "the image is not marked corrupt: {info}"
    );
}

#[test]
fn overlays_are_private_and_vanish_even_when_the_daemon_is_killed() {
    let d = open_dir();
    let image = new_image(d.path(), "ev.qcow2", "4M");
    qemu_io(&image, &["write -P 0x5e 0 1M"]);
    chmod(&image, 0o600);
    let ovdir = d.path().join("ov");
    fs::create_dir(&ovdir).unwrap();
    chmod(&ovdir, 0o777);
    let private = ovdir.join("qcow2fs-overlays-0");
    // Kept overlays: files of mode 0600 in a directory only root may enter.
    let mnt = mnt_in(d.path(), "m");
    let opts = format!("overlay={},keep_overlay,allow_other", ovdir.display());
    let m = Mount::new(&image, &mnt, &[&opts]);
    let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
    f.write_all_at(b"X", 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(&private).unwrap().mode() & 0o777,
        0o700,
        "overlay directory mode"
    );
    let files: Vec<PathBuf> = fs::read_dir(&private)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!files.is_empty());
    for f in &files {
        assert_eq!(fs::metadata(f).unwrap().mode() & 0o777, 0o600, "{f:?}");
        assert!(!user_reads(f), "{TEST_USER} read the overlay {f:?}");
    }
    m.umount();
    for f in files {
        fs::remove_file(f).unwrap();
    }
    // Throwaway overlays have no name: nothing is left, even after kill -9.
    let opts = format!("overlay={}", ovdir.display());
    let m = Mount::new(&image, &mnt, &[&opts]);
    let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
    f.write_all_at(&[0x77; 8192], 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let listed = |p: &Path| fs::read_dir(p).map(|r| r.count()).unwrap_or(0);
    assert_eq!(listed(&private), 0, "an overlay has a name while mounted");
    m.kill9();
    assert_eq!(listed(&private), 0, "an overlay is left after kill -9");
    // Nothing of the evidence can be found in the overlay directory's files.
    assert_eq!(
        qemu_raw(&image)[..1 << 20],
        vec![0x5e; 1 << 20][..],
        "the evidence changed"
    );
}

/// Starts `n` threads that keep a CPU busy until the returned flag is set.
fn load_cpus(
    n: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads = (0..n)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    (stop, threads)
}

#[test]
fn qcow2fs_umount_returns_only_when_the_image_is_free() {
    let d = tempdir();
    let image = new_image(d.path(), "c.qcow2", "16M");
    let mnt = mountpoint(d.path(), "m");
    let (stop, threads) = load_cpus(2);
    let mut failures = Vec::new();
    for i in 0..500 {
        let opts = if i % 2 == 0 { "rw" } else { "ro" };
        let m = match Mount::try_new(&image, &mnt, &[opts]) {
            Ok(m) => m,
            Err(o) => {
                failures.push(format!("cycle {i}: mount -o {opts}: {}", o.describe()));
                break;
            }
        };
        if i % 2 == 0 {
            let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
            f.write_all_at(&[i as u8; 512], (i as u64 % 32) * 512)
                .unwrap();
        }
        let pid = m.daemon_pid();
        m.umount();
        if pid_alive(pid) {
            failures.push(format!("cycle {i}: the daemon runs after qcow2fs umount"));
        }
        if !failures.is_empty() {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(check_errors(&image), 0);
}

/// Installs the umount helper (`/sbin/umount.fuse.qcow2fs`, as `make install` does)
/// pointing at the binary under test, and removes it again on drop.
struct UmountHelper(Option<PathBuf>);

impl UmountHelper {
    fn install() -> UmountHelper {
        let link = PathBuf::from("/sbin/umount.fuse.qcow2fs");
        let saved = link.with_extension("qcow2fs.saved-by-test");
        if fs::symlink_metadata(&link).is_ok() {
            fs::rename(&link, &saved).unwrap();
        }
        let bin = absolute(Path::new(qcow2fs_bin()));
        std::os::unix::fs::symlink(bin, &link).unwrap();
        UmountHelper(Some(saved))
    }
}

impl Drop for UmountHelper {
    fn drop(&mut self) {
        let link = Path::new("/sbin/umount.fuse.qcow2fs");
        let _ = fs::remove_file(link);
        if let Some(saved) = self.0.take()
            && fs::symlink_metadata(&saved).is_ok()
        {
            let _ = fs::rename(saved, link);
        }
    }
}

#[test]
fn plain_umount_as_root_returns_only_when_the_image_is_free() {
    let _helper = UmountHelper::install();
    let d = tempdir();
    let image = new_image(d.path(), "p.qcow2", "16M");
    let mnt = mountpoint(d.path(), "m");
    let mut failures = Vec::new();
    for i in 0..60 {
        let m = Mount::new(&image, &mnt, &["rw"]);
        let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
        f.write_all_at(&[i as u8; 4096], 0).unwrap();
        drop(f);
        let utab = fs::read_to_string("/run/mount/utab").unwrap_or_default();
        if !utab.contains(&format!("TARGET={}", m.mountpoint.display())) {
            failures.push(format!("cycle {i}: no utab entry: {utab:?}"));
        }
        let u = run_timeout(
            Command::new("umount").arg(&m.mountpoint),
            Duration::from_secs(60),
        );
        if !u.success() {
            failures.push(format!("cycle {i}: {}", u.describe()));
        }
        let info = run_in(d.path(), "qemu-img", &["info", "p.qcow2"], COMMAND_LIMIT);
        if !info.success() {
            failures.push(format!(
                "cycle {i}: qemu-img info right after umount: {}",
                info.describe()
            ));
        }
        drop(m);
        if !failures.is_empty() {
            break;
        }
    }
    let utab = fs::read_to_string("/run/mount/utab").unwrap_or_default();
    assert!(
        !utab.contains(mnt.to_str().unwrap()),
        "stale utab entry: {utab:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn writes_straddling_the_end_are_cut_short_and_unaligned_sizes_are_refused() {
    let d = tempdir();
    let size: u64 = (1 << 20) + 512;
    let image = new_image(d.path(), "e.qcow2", &size.to_string());
    let mnt = mountpoint(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw"]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.disk())
        .unwrap();
    // Within one page, and across pages: short writes both ways.
    assert_eq!(f.write_at(&[1; 200], size - 100).unwrap(), 100);
    assert_eq!(f.write_at(&[2; 8192], size - 100).unwrap(), 100);
    // At the end: no space.
    let e = f.write_at(&[3; 10], size).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // Sizes are whole sectors, as in QEMU.
    let e = f.set_len(size + 1000).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    let e = fallocate(&f, 0, size, 1000).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    f.set_len(size + 1024).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size + 1024);
    drop(f);
    m.umount();
    let raw = qemu_raw(&image);
    assert_eq!(raw.len() as u64, size + 1024);
    assert!(
        raw[(size - 100) as usize..size as usize]
            .iter()
            .all(|&b| b == 2)
    );
    assert!(raw[size as usize..].iter().all(|&b| b == 0));
    assert_eq!(check_errors(&image), 0);
}

#[test]
fn backing_loops_and_foreign_files_get_honest_messages() {
    let d = tempdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ],
    );
    qemu_img(
        dir,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    let mnt = mountpoint(dir, "m");
    let out = qcow2fs_quick(
        dir,
        &["mount", "-o", "rw", "a.qcow2", mnt.to_str().unwrap()],
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("loop") && !out.stderr.contains("another process"),
        "{}",
        out.describe()
    );
    // A file that is not qcow2: its bytes are never shown.
    fs::write(dir.join("secret.qcow2"), b"root:x:0:0:secret\n".repeat(64)).unwrap();
    let out = qcow2fs_quick(dir, &["info", "secret.qcow2"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    for leak in ["726f6f74", "root", "secret\n"] {
        assert!(
            !out.stderr.replace("secret.qcow2", "").contains(leak),
            "the message shows the file's content ({leak}): {}",
            out.stderr
        );
    }
    assert!(out.stderr.contains("not a qcow2 image"), "{}", out.stderr);
}

#[test]
fn status_answers_root_and_the_owner_only() {
    let d = open_dir();
    let image = new_image(d.path(), "s.qcow2", "4M");
    qemu_img(d.path(), &["snapshot", "-c", "snap1", "s.qcow2"]);
    let mnt = mnt_in(d.path(), "m");
    let m = Mount::new(&image, &mnt, &["rw,allow_other"]);
    let held = OpenOptions::new().write(true).open(m.disk()).unwrap();
    held.write_all_at(&[1; 4096], 0).unwrap();
    let bin = qcow2fs_bin();
    let out = run(d.path(), bin, &["status", "--json", mnt.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"].as_i64(), Some(m.daemon_pid() as i64), "{v}");
    assert_eq!(v["mode"], "rw", "{v}");
    assert_eq!(v["open-for-writing"].as_u64(), Some(1), "{v}");
    assert_eq!(v["snapshots"][0]["name"], "snap1", "{v}");
    assert_eq!(
        v["image"].as_str().map(PathBuf::from),
        Some(image.canonicalize().unwrap()),
        "{v}"
    );
    // (A child's copy of the open descriptor, closed at exec, flushes the cache.)
    assert!(v["cache"]["l2_tables"].as_u64().unwrap() >= 1, "{v}");
    // Another user may read the files (allow_other) but not control the mount.
    let (ok, _, err) = as_user(bin, &["status", mnt.to_str().unwrap()]);
    assert!(!ok && err.contains("only root and user 0"), "{err}");
    drop(held);
    // A daemon that was killed: a clear error, not a hang.
    m.kill9();
    let m = Mount::new(&image, &mnt, &["ro"]);
    let pid = m.daemon_pid();
    signal(pid, libc::SIGKILL);
    assert!(wait_pid_gone(pid, Duration::from_secs(20)));
    let out = run_in(
        d.path(),
        bin,
        &["status", mnt.to_str().unwrap()],
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("no control channel"),
        "{}",
        out.describe()
    );
    let _ = force_unmount(&mnt, Some("fuse.qcow2fs"));
    drop(m);
    // Not a qcow2fs mount at all.
    let out = run_in(
        d.path(),
        bin,
        &["status", d.path().to_str().unwrap()],
        COMMAND_LIMIT,
    );
    assert!(
        out.code() == Some(1) && out.stderr.contains("not a mount point"),
        "{}",
        out.describe()
    );
}
