//! Attributes and options of a real mount: inode numbers, sizes, st_blocks and mtimes,
//! read-only modes and EROFS, `uid`/`gid`/`umask`, access by other users, `snapshots=off`
//! and `layers=off`, snapshot file naming, the mount table, the generic mount(8) options,
//! `readahead`, and the backing-file policy options (`backing=deny`, `backing_dir`).
//!
//! Every mount is held by a `Mount` guard that unmounts on drop, also when a test panics.
//! The expected values come from QEMU, never from qcow2fs itself.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::corpus;
use support::images::{Ctx, z};
use support::*;

// ---------------------------------------------------------------------------------------
// 5. Attributes, permissions, options, naming
// ---------------------------------------------------------------------------------------

/// Every entry under `root` (root included, as ""), relative path → metadata.
fn all_entries(root: &Path) -> BTreeMap<String, fs::Metadata> {
    let mut out = BTreeMap::new();
    out.insert(String::new(), fs::metadata(root).unwrap());
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                e.ino(),
                md.ino(),
                "{}: readdir's d_ino differs from stat's st_ino",
                p.display()
            );
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                md,
            );
        }
    }
    out
}

#[test]
fn inode_numbers_are_unique_and_stable_across_remounts() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let mnt = mountpoint(dir.path(), "mnt");
    let inos = |opts: &[&str]| -> BTreeMap<String, u64> {
        let m = Mount::new(&top, &mnt, opts);
        all_entries(&m.mountpoint)
            .into_iter()
            .map(|(p, md)| (p, md.ino()))
            .collect()
    };
    let first = inos(&[]);
    assert!(first.len() >= 6, "entries: {first:?}");
    let distinct: BTreeSet<u64> = first.values().copied().collect();
    assert_eq!(
        distinct.len(),
        first.len(),
        "inode numbers are not unique: {first:?}"
    );
    assert_eq!(inos(&[]), first, "inode numbers after a remount");
    assert_eq!(
        inos(&["threads=1"]),
        first,
        "inode numbers after a remount with threads=1"
    );
}

#[test]
fn sizes_blocks_and_mtimes() {
    let dir = tempdir();
    let mut ctx = Ctx::new(dir.path(), "attributes");
    // Sparse: 1 GiB with 64 KiB written; empty; fully written.
    ctx.create("sparse.qcow2", 1 << 30, "");
    let c = vec![ctx.w(512 * M, 64 * K)];
    ctx.io("sparse.qcow2", &c);
    ctx.create("empty.qcow2", 100 * M, "");
    ctx.create("full.qcow2", 4 * M, "");
    let c = ctx.fill(0, 4 * M, 500_000);
    ctx.io("full.qcow2", &c);
    ctx.snapshot("full.qcow2", "snap");
    // A known mtime with nanoseconds for the image file.
    let when = "@1000000000.123456789";
    for img in ["sparse.qcow2", "empty.qcow2", "full.qcow2"] {
        run_in(
            dir.path(),
            "touch",
            &["-m", "-d", when, img],
            Duration::from_secs(10),
        )
        .expect_success();
    }
    for (img, size) in [("sparse", 1u64 << 30), ("empty", 100 * M), ("full", 4 * M)] {
        let image = dir.path().join(format!("{img}.qcow2"));
        let m = Mount::new(&image, &mountpoint(dir.path(), &format!("mnt-{img}")), &[]);
        let md = counted_metadata(&m.path(&format!("{img}.raw")));
        assert_eq!(md.len(), size, "{img}: size");
        assert_eq!(
            mtime(&md),
            (1_000_000_000, 123_456_789),
            "{img}.raw: mtime = the image's"
        );
        check_blocks(&format!("{img}.raw"), &md, &qemu_map_json(&image));
        match img {
            "sparse" => assert!(
                md.blocks() > 0 && md.blocks() * 512 <= 128 * K,
                "sparse: st_blocks {} (64 KiB written of 1 GiB)",
                md.blocks()
            ),
            "empty" => assert_eq!(md.blocks(), 0, "empty: st_blocks"),
            _ => assert!(md.blocks() * 512 >= size, "full: st_blocks {}", md.blocks()),
        }
    }
}

#[test]
fn everything_is_read_only_and_writes_fail_with_erofs() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let m = Mount::new(&top, &mountpoint(dir.path(), "mnt"), &[]);
    for (rel, md) in all_entries(&m.mountpoint) {
        assert_eq!(
            md.mode() & 0o222,
            0,
            "{rel:?}: mode {:o} has write bits",
            md.mode()
        );
        assert!(
            md.is_dir() || md.is_file(),
            "{rel:?}: neither file nor directory"
        );
    }
    assert!(
        mount_info(&m.mountpoint).unwrap().has_option("ro"),
        "mounted ro"
    );
    let file = m.path("top.raw");
    let snap = m.path("snapshots/s1.raw");
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let attempts: Vec<(String, std::io::Result<()>)> = vec![
        (
            "open O_WRONLY".into(),
            fs::OpenOptions::new().write(true).open(&file).map(drop),
        ),
        (
            "open O_RDWR".into(),
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&file)
                .map(drop),
        ),
        (
            "open O_WRONLY|O_TRUNC".into(),
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&snap)
                .map(drop),
        ),
        (
            "open O_APPEND".into(),
            fs::OpenOptions::new().append(true).open(&snap).map(drop),
        ),
        (
            "create a file".into(),
            File::create(m.path("new.raw")).map(drop),
        ),
        (
            "create in snapshots/".into(),
            File::create(m.path("snapshots/new.raw")).map(drop),
        ),
        ("mkdir".into(), fs::create_dir(m.path("newdir"))),
        ("unlink".into(), fs::remove_file(&file)),
        ("rmdir".into(), fs::remove_dir(m.path("layers"))),
        ("rename".into(), fs::rename(&file, m.path("renamed.raw"))),
        (
            "chmod".into(),
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)),
        ),
        (
            "symlink".into(),
            std::os::unix::fs::symlink("top.raw", m.path("link")),
        ),
        ("link".into(), fs::hard_link(&file, m.path("hardlink"))),
        ("truncate".into(), {
            // SAFETY: a valid NUL-terminated path.
            let r = unsafe { libc::truncate(c(&file).as_ptr(), 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
        ("utimes".into(), {
            // SAFETY: a valid path; NULL times means "now".
            let r =
                unsafe { libc::utimensat(libc::AT_FDCWD, c(&file).as_ptr(), std::ptr::null(), 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
    ];
    let wrong: Vec<String> = attempts
        .into_iter()
        .filter_map(|(what, r)| match r {
            Err(e) if errno_of(&e) == libc::EROFS => None,
            Err(e) => Some(format!("{what}: {e} (expected EROFS)")),
            Ok(()) => Some(format!("{what}: succeeded (expected EROFS)")),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "write attempts:\n  {}",
        wrong.join("\n  ")
    );
    assert_same_bytes(
        "active disk after the attempts",
        &qemu_raw(&top),
        &fs::read(&file).unwrap(),
    );
}

#[test]
fn uid_gid_and_umask_options() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let mnt = mountpoint(dir.path(), "mnt");
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // (options, uid, gid, umask): base modes are r--r--r-- for files, r-xr-xr-x for dirs.
    let cases: [(&[&str], u32, u32, u32); 4] = [
        (&[], uid, gid, 0o022),
        (&["uid=1234,gid=4321"], 1234, 4321, 0o022),
        (&["umask=027", "uid=7"], 7, gid, 0o027),
        (&["umask=0"], uid, gid, 0),
    ];
    for (opts, u, g, umask) in cases {
        let m = Mount::new(&top, &mnt, opts);
        for (rel, md) in all_entries(&m.mountpoint) {
            let base = if md.is_dir() { 0o555 } else { 0o444 };
            assert_eq!(
                (md.uid(), md.gid(), md.mode() & 0o7777),
                (u, g, base & !umask),
                "-o {opts:?}: owner, group and mode of {rel:?}"
            );
        }
        assert_same_bytes(
            &format!("-o {opts:?}: content"),
            &qemu_raw(&top),
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
}

/// Reads `path` as user nobody (65534): its bytes, or the error cat printed.
fn read_as_nobody(path: &Path) -> Result<Vec<u8>, String> {
    let out = run_timeout(
        Command::new("cat").arg(path).uid(65534).gid(65534),
        COMMAND_LIMIT,
    );
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(out.stderr.trim().to_string())
    }
}

#[test]
fn access_is_limited_to_the_mounting_user_unless_allowed() {
    let (dir, top) = corpus::build("snapshots_distinct");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = mountpoint(dir.path(), "mnt");
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let expected = qemu_raw(&top);
    // (options, nobody may read)
    let cases: [(&[&str], bool); 5] = [
        (&[], false),
        (&["allow_root"], false),
        (&["allow_other"], true),
        (&["allow_other,default_permissions"], true),
        (&["allow_other,default_permissions,umask=077"], false),
    ];
    let mut wrong = Vec::new();
    for (opts, allowed) in cases {
        let m = Mount::new(&top, &mnt, opts);
        let file = m.path("disk.raw");
        match (read_as_nobody(&file), allowed) {
            (Ok(got), true) => {
                if let Some(d) = first_difference(&expected, &got) {
                    wrong.push(format!("-o {opts:?}: nobody read wrong bytes: {d}"));
                }
            }
            (Ok(_), false) => wrong.push(format!(
                "-o {opts:?}: user nobody could read {}",
                file.display()
            )),
            (Err(e), true) => wrong.push(format!("-o {opts:?}: user nobody cannot read: {e}")),
            (Err(e), false) if !e.contains("Permission denied") => wrong.push(format!(
                "-o {opts:?}: nobody got {e:?}, expected Permission denied"
            )),
            (Err(_), false) => {}
        }
        // The mounting user (root) always can.
        match fs::read(&file) {
            Ok(got) => {
                if let Some(d) = first_difference(&expected, &got) {
                    wrong.push(format!("-o {opts:?}: root read wrong bytes: {d}"));
                }
            }
            Err(e) => wrong.push(format!("-o {opts:?}: root cannot read: {e}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "access control:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn snapshots_off_and_layers_off_hide_their_directories() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let mnt = mountpoint(dir.path(), "mnt");
    for (opts, snaps, layers) in [
        (&[][..], true, true),
        (&["snapshots=off"][..], false, true),
        (&["layers=off"][..], true, false),
        (&["snapshots=off,layers=off"][..], false, false),
        (&["snapshots=on", "layers=on"][..], true, true),
    ] {
        let m = Mount::new(&top, &mnt, opts);
        assert_eq!(
            listing(&m.mountpoint),
            expected_root(&top, snaps, layers),
            "-o {opts:?}: root"
        );
        for (name, shown) in [("snapshots", snaps), ("layers", layers)] {
            let r = fs::metadata(m.path(name));
            assert_eq!(r.is_ok(), shown, "-o {opts:?}: stat {name}: {r:?}");
            if let Err(e) = r {
                assert_eq!(errno_of(&e), libc::ENOENT, "-o {opts:?}: stat {name}");
            }
        }
        assert_same_bytes(
            &format!("-o {opts:?}: top.raw"),
            &qemu_raw(&top),
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
}

#[test]
fn snapshot_file_names_follow_the_naming_rules() {
    let dir = tempdir();
    let mut ctx = Ctx::new(dir.path(), "names");
    let top = ctx.create("names.qcow2", M, "cluster_size=4096");
    let names = [
        "a/b", "50%", "", ".", "..", "dup", "dup", "1", "%2F", "plain",
    ];
    for (i, name) in names.iter().enumerate() {
        let c = vec![ctx.w(i as u64 * 60_000 + 7, 50_000)];
        ctx.io("names.qcow2", &c);
        ctx.snapshot("names.qcow2", name);
    }
    let c = vec![ctx.w(3, 10_000)];
    ctx.io("names.qcow2", &c);
    let info = qemu_info_json(&top);
    let ids: Vec<&str> = info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"],
        "IDs qemu-img gave"
    );
    let files = expected_snapshot_files(&info);
    // The rules, spelled out for these names (IDs 1 to 10 in order).
    let literal = [
        "a%2Fb.raw",
        "50%25.raw",
        "@3.raw",
        ".@4.raw",
        "..@5.raw",
        "dup@6.raw",
        "dup@7.raw",
        "1.raw",
        "%252F.raw",
        "plain.raw",
    ];
    assert_eq!(
        files.iter().map(|f| f.file.as_str()).collect::<Vec<_>>(),
        literal
    );

    let m = Mount::new(&top, &mountpoint(dir.path(), "mnt"), &[]);
    assert_eq!(
        listing(&m.path("snapshots")),
        literal
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        "snapshots/ directory"
    );
    for f in &files {
        check_file(
            &format!("snapshot ID {} name {:?}", f.id, f.name),
            &m.path(&format!("snapshots/{}", f.file)),
            &qemu_snapshot_raw(&top, &f.id),
            None,
            Some(f.date),
        );
    }
}

#[test]
fn mount_table_shows_type_and_source() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    {
        let m = Mount::new(&top, &mnt, &[]);
        let e = mount_info(&m.mountpoint).unwrap();
        assert_eq!(
            (e.fstype.as_str(), e.source.as_str()),
            ("fuse.qcow2fs", &*top.to_string_lossy()),
            "type and source in /proc/self/mountinfo"
        );
        let proc_mounts = fs::read_to_string("/proc/mounts").unwrap();
        let line = proc_mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(&*m.mountpoint.to_string_lossy()))
            .expect("the mount in /proc/mounts");
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(
            (f[0], f[2]),
            (&*top.to_string_lossy(), "fuse.qcow2fs"),
            "/proc/mounts line {line:?}"
        );
    }
    let m = Mount::new(&top, &mnt, &["fsname=my-disk-image"]);
    let e = mount_info(&m.mountpoint).unwrap();
    assert_eq!(
        (e.fstype.as_str(), e.source.as_str()),
        ("fuse.qcow2fs", "my-disk-image"),
        "with fsname="
    );
}

/// The generic mount(8) options the spec lists (each alone).
const GENERIC_OPTIONS: &str = "dev nodev suid nosuid exec noexec atime noatime _netdev auto \
                               noauto user users defaults nofail x-systemd.automount x-foo=bar";

#[test]
fn generic_and_tuning_options_are_accepted() {
    let (dir, top) = corpus::build("cluster_bits_9");
    let mnt = mountpoint(dir.path(), "mnt");
    let expected = qemu_raw(&top);
    let mut wrong = Vec::new();
    let mut cases: Vec<Vec<String>> = GENERIC_OPTIONS
        .split_whitespace()
        .map(|o| vec![format!("ro,{o}")])
        .collect();
    cases.extend(
        [
            &["nosuid,nodev,noexec,noatime"][..],
            &["cache_size=64k", "threads=2"][..],
            &["cache_size=1M,threads=1"][..],
            &["allow_other", "default_permissions"][..],
        ]
        .iter()
        .map(|c| c.iter().map(|s| s.to_string()).collect()),
    );
    for opts in &cases {
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        match Mount::try_new(&top, &mnt, &opts) {
            Err(e) => wrong.push(format!("-o {opts:?}: {}", e.describe())),
            Ok(m) => {
                if let Some(d) = first_difference(&expected, &fs::read(m.path("disk.raw")).unwrap())
                {
                    wrong.push(format!("-o {opts:?}: {d}"));
                }
                let e = mount_info(&m.mountpoint).unwrap();
                if opts[0].starts_with("nosuid") {
                    for flag in ["ro", "nosuid", "nodev", "noexec", "noatime"] {
                        if !e.has_option(flag) {
                            wrong.push(format!("-o {opts:?}: {flag} missing from {e:?}"));
                        }
                    }
                }
            }
        }
    }
    // As with mount(8), a later option overrides an earlier one (fstab lines such as
    // `defaults,noexec,exec` or options appended by scripts).
    for (opts, absent) in [
        ("nosuid,suid", "nosuid"),
        ("noexec,exec", "noexec"),
        ("nodev,dev", "nodev"),
        ("noatime,atime", "noatime"),
    ] {
        match Mount::try_new(&top, &mnt, &[opts]) {
            Err(e) => wrong.push(format!(
                "-o {opts} (the later option should win): {}",
                e.describe()
            )),
            Ok(m) => {
                let e = mount_info(&m.mountpoint).unwrap();
                if e.has_option(absent) {
                    wrong.push(format!("-o {opts}: {absent} still set: {e:?}"));
                }
            }
        }
    }
    // A deep chain through a tiny L2 cache.
    let (dir2, deep) = corpus::build("deep_chain");
    match Mount::try_new(&deep, &mountpoint(dir2.path(), "mnt"), &["cache_size=4k"]) {
        Err(e) => wrong.push(format!("deep_chain, -o cache_size=4k: {}", e.describe())),
        Ok(m) => {
            let got = fs::read(m.path(&format!("{}.raw", stem(&deep)))).unwrap();
            if let Some(d) = first_difference(&qemu_raw(&deep), &got) {
                wrong.push(format!("deep_chain, -o cache_size=4k: {d}"));
            }
        }
    }
    assert!(wrong.is_empty(), "options:\n\n{}", wrong.join("\n\n"));
}

// ---------------------------------------------------------------------------------------
// 7. Readahead and the backing-file policy options
// ---------------------------------------------------------------------------------------

/// The kernel readahead window of the mount at `mnt`, from its backing device info.
fn bdi_read_ahead_kb(mnt: &Path) -> Option<u32> {
    let dev = fs::metadata(mnt).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn readahead_option_sets_the_kernel_window() {
    let (dir, top) = corpus::build("cluster_bits_9");
    let mnt = mountpoint(dir.path(), "mnt");
    let expected = qemu_raw(&top);
    let default_kb = {
        let m = Mount::new(&top, &mnt, &[]);
        let kb = bdi_read_ahead_kb(&m.mountpoint).expect("the mount has a bdi entry");
        drop(m);
        kb
    };
    let want = if default_kb == 2048 { 4096 } else { 2048 };
    let m = Mount::new(&top, &mnt, &[&format!("readahead={want}")]);
    let mut seen = None;
    wait_until(Duration::from_secs(5), || {
        seen = bdi_read_ahead_kb(&m.mountpoint);
        seen == Some(want)
    });
    assert_eq!(
        seen,
        Some(want),
        "readahead={want}: the kernel window (default {default_kb} KiB) was not set"
    );
    assert_same_bytes(
        "disk.raw with a larger readahead",
        &expected,
        &fs::read(m.path("disk.raw")).unwrap(),
    );
    drop(m);
    for bad in ["readahead=0", "readahead=lots", "readahead=1000000"] {
        assert_mount_refused(&top, &mnt, &[bad], &["readahead"]);
    }
}

/// A top image over a base in `base-dir/`, each with its own data.
fn two_layers(dir: &Path) -> PathBuf {
    let mut ctx = Ctx::new(dir, "policy");
    ctx.mkdir("base-dir");
    ctx.create("base-dir/base.qcow2", 2 * M, "");
    let c = vec![ctx.w(0, 2 * M)];
    ctx.io("base-dir/base.qcow2", &c);
    let top = ctx.overlay("top.qcow2", "base-dir/base.qcow2", "qcow2", None, "");
    let c = vec![
        ctx.w(64 * K, 100 * K),
        ctx.w(M + 3000, 5000),
        z(1536 * K, 64 * K),
    ];
    ctx.io("top.qcow2", &c);
    top
}

#[test]
fn backing_deny_shows_the_top_layer_alone() {
    let dir = tempdir();
    let top = two_layers(dir.path());
    // QEMU's rendering of the top image with its backing link cut.
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        absolute(&top).display()
    );
    let alone = dir.path().join("alone.raw");
    qemu_img(
        dir.path(),
        &["convert", "-O", "raw", &spec, alone.to_str().unwrap()],
    );
    let expected = fs::read(&alone).unwrap();
    let whole = qemu_raw(&top);
    assert_ne!(
        expected, whole,
        "test setup: the base must show through the top"
    );
    let mnt = mountpoint(dir.path(), "mnt");
    {
        let m = Mount::new(&top, &mnt, &["backing=deny"]);
        assert_same_bytes(
            "top.raw with backing=deny",
            &expected,
            &fs::read(m.path("top.raw")).unwrap(),
        );
        assert!(
            !m.path("layers").exists(),
            "backing=deny still shows layers/: {:?}",
            listing(&m.mountpoint)
        );
    }
    {
        let m = Mount::new(&top, &mnt, &["backing=follow"]);
        assert_same_bytes(
            "top.raw with backing=follow",
            &whole,
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
    assert_mount_refused(&top, &mnt, &["backing=maybe"], &["backing"]);
}

#[test]
fn backing_dir_allows_only_files_under_it() {
    let dir = tempdir();
    let top = two_layers(dir.path());
    let mnt = mountpoint(dir.path(), "mnt");
    let base_dir = dir.path().join("base-dir");
    {
        let opt = format!("backing_dir={}", base_dir.display());
        let m = Mount::new(&top, &mnt, &[&opt]);
        assert_same_bytes(
            "top.raw with its base under backing_dir",
            &qemu_raw(&top),
            &fs::read(m.path("top.raw")).unwrap(),
        );
    }
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let opt = format!("backing_dir={}", elsewhere.display());
    // A base outside backing_dir.
    assert_mount_refused(&top, &mnt, &[&opt], &["base.qcow2", "backing_dir"]);
    // A symlink under backing_dir that leads outside it does not count as under it.
    let mut ctx = Ctx::new(dir.path(), "policy-link");
    ctx.create("elsewhere/real.qcow2", M, "");
    let c = vec![ctx.w(0, M)];
    ctx.io("elsewhere/real.qcow2", &c);
    let jail = dir.path().join("jail");
    fs::create_dir(&jail).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("real.qcow2"), jail.join("link.qcow2")).unwrap();
    let linked = ctx.overlay("jail/top2.qcow2", "link.qcow2", "qcow2", None, "");
    let opt = format!("backing_dir={}", jail.display());
    assert_mount_fails(
        "a symlink leading outside backing_dir",
        dir.path(),
        &mount_args(&linked, &mnt, &[&opt]),
        &mnt,
        &["link.qcow2", "backing_dir"],
    );
}
