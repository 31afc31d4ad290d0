//! The life of a mount: refusals (exit 1, one line naming the problem, nothing mounted),
//! daemon and foreground modes, `qcow2fs umount`, signals, `umount` and `fusermount3`,
//! the log option, and mount(8)/fstab integration.
//!
//! Every mount is held by a `Mount` guard that unmounts on drop, also when a test panics.
//! The expected values come from QEMU, never from qcow2fs itself.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::corpus;
use support::images::{Ctx, M};
use support::*;

// ---------------------------------------------------------------------------------------
// 6. Error paths: exit 1, one line naming the problem, nothing mounted
// ---------------------------------------------------------------------------------------

/// `dir/TOP` written over a qcow2 base `dir/BASE` that is then deleted (`ctx` names the
/// pattern files).
fn image_over_deleted_base(dir: &Path, ctx: &str, base: &str, top: &str) -> PathBuf {
    let mut ctx = Ctx::new(dir, ctx);
    ctx.create(base, M, "");
    let img = ctx.overlay(top, base, "qcow2", None, "");
    let c = vec![ctx.w(0, 1000)];
    ctx.io(top, &c);
    fs::remove_file(dir.join(base)).unwrap();
    img
}

fn image_with_missing_backing(dir: &Path) -> PathBuf {
    image_over_deleted_base(dir, "missing-backing", "gone-base.qcow2", "orphan.qcow2")
}

fn image_with_directory_backing(dir: &Path) -> PathBuf {
    let top = image_over_deleted_base(dir, "dir-backing", "dir-base.qcow2", "dirtop.qcow2");
    fs::create_dir(dir.join("dir-base.qcow2")).unwrap();
    top
}

#[test]
fn error_missing_image() {
    let dir = tempdir();
    let mnt = mountpoint(dir.path(), "mnt");
    let image = dir.path().join("no-such-image.qcow2");
    // Missing image.
    assert_mount_refused(&image, &mnt, &[], &["no-such-image.qcow2"]);
}

#[test]
fn error_mount_point_not_a_directory_or_missing() {
    let (dir, top) = corpus::build("zero_clusters");
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    // Mount point is a file.
    assert_mount_refused(&top, &file, &[], &["plain-file"]);
    let missing = dir.path().join("no-such-dir");
    // Mount point does not exist.
    assert_mount_refused(&top, &missing, &[], &["no-such-dir"]);
}

#[test]
fn error_mount_point_already_mounted() {
    let (dir, top) = corpus::build("zero_clusters");
    let mnt = mountpoint(dir.path(), "busy-mnt");
    let m = Mount::new(&top, &mnt, &[]);
    // Mount point already mounted.
    assert_mount_refused(&top, &mnt, &[], &["busy-mnt"]);
    assert!(m.is_mounted(), "the first mount is still there");
    assert_same_bytes(
        "the first mount still works",
        &qemu_raw(&top),
        &fs::read(m.path("disk.raw")).unwrap(),
    );
}

#[test]
fn error_bad_options() {
    let (dir, top) = corpus::build("zero_clusters");
    let mnt = mountpoint(dir.path(), "mnt");
    for (opts, mention) in [
        (&["bogus"][..], &["bogus"][..]),
        (&["ro,bogus=1"][..], &["bogus"][..]),
        (&["uid=abc"][..], &["uid", "abc"][..]),
        (&["gid=-1"][..], &["gid"][..]),
        (&["umask=9z"][..], &["umask"][..]),
        (&["snapshots=maybe"][..], &["snapshots"][..]),
        (&["threads=lots"][..], &["threads"][..]),
        (&["cache_size=huge"][..], &["cache_size"][..]),
    ] {
        assert_mount_refused(&top, &mnt, opts, mention);
    }
}

#[test]
fn error_unreadable_backing_file() {
    let dir = tempdir();
    let mnt = mountpoint(dir.path(), "mnt");
    let top = image_with_missing_backing(dir.path());
    // Missing backing file.
    assert_mount_refused(&top, &mnt, &[], &["gone-base.qcow2"]);
    let top = image_with_directory_backing(dir.path());
    // Backing file is a directory.
    assert_mount_refused(&top, &mnt, &[], &["dir-base.qcow2"]);
}

// ---------------------------------------------------------------------------------------
// 7. The daemon: readiness, foreground, umount, signals, log, mount(8)
// ---------------------------------------------------------------------------------------

/// `cmd.output()` with a time limit (the output pipes must be closed by then: a daemon
/// that keeps the caller's stdout/stderr makes `$(qcow2fs mount ...)` hang).
fn output_within(mut cmd: Command, limit: Duration) -> Result<std::process::Output, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(|e| format!("cannot run: {e}")),
        Err(_) => Err(format!("stdout/stderr still open after {limit:?}")),
    }
}

#[test]
fn daemon_mode_returns_with_the_mount_ready() {
    let (dir, top) = corpus::build("snapshots_distinct");
    let expected = qemu_raw(&top);
    let snap = qemu_snapshot_raw(&top, "2");
    // Both spellings: `qcow2fs mount -o OPTS IMAGE DIR` and `qcow2fs IMAGE DIR -o OPTS`.
    for (i, form) in ["subcommand", "helper"].into_iter().enumerate() {
        let mnt = mountpoint(dir.path(), &format!("mnt{i}"));
        let mut cmd = Command::new(qcow2fs_bin());
        cmd.current_dir(dir.path());
        if form == "subcommand" {
            cmd.args(["mount", "-o", "ro,noatime"]).arg(&top).arg(&mnt);
        } else {
            cmd.arg(&top).arg(&mnt).args(["-o", "ro,noatime"]);
        }
        let out = output_within(cmd, MOUNT_TIMEOUT);
        let m = Mount::adopt(&mnt);
        let out = out.unwrap_or_else(|e| panic!("{form} form: {e}"));
        assert!(
            out.status.success(),
            "{form} form: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Immediately usable: no waiting.
        assert!(
            m.is_mounted(),
            "{form} form: not mounted when the command returned"
        );
        assert_same_bytes(
            &format!("{form} form: disk.raw"),
            &expected,
            &fs::read(m.path("disk.raw")).unwrap(),
        );
        assert_same_bytes(
            &format!("{form} form: snapshots/second.raw"),
            &snap,
            &fs::read(m.path("snapshots/second.raw")).unwrap(),
        );
        let pid = m.daemon_pid();
        assert!(
            pid_alive(pid),
            "{form} form: the daemon runs in the background"
        );
    }
}

#[test]
fn foreground_mode_runs_until_qcow2fs_umount() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    let mut m = Mount::foreground(&top, &mnt, &[]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        m.wait_foreground(Duration::ZERO).is_none(),
        "qcow2fs mount -f returned while mounted"
    );
    assert_same_bytes(
        "foreground mount",
        &qemu_raw(&top),
        &fs::read(m.path("top.raw")).unwrap(),
    );
    // `qcow2fs umount` in another thread while this one reaps the foreground process as
    // soon as it exits (as a shell or a service manager would).
    let (d, mp) = (dir.path().to_path_buf(), mnt.clone());
    let umount = std::thread::spawn(move || {
        run_in(
            &d,
            qcow2fs_bin(),
            &[OsStr::new("umount"), mp.as_os_str()],
            MOUNT_TIMEOUT,
        )
    });
    let status = m.wait_foreground(Duration::from_secs(20));
    let r = umount.join().unwrap();
    assert!(r.success(), "{}", r.describe());
    assert!(!m.is_mounted(), "still mounted after qcow2fs umount");
    assert!(
        status.is_some_and(|s| s.success()),
        "qcow2fs mount -f after qcow2fs umount: {status:?}; stderr: {:?}",
        m.foreground_stderr()
    );
}

/// `qcow2fs umount` waits for the process serving the mount to exit; one that has exited
/// but that its parent has not reaped yet (a zombie) has exited.
#[test]
fn qcow2fs_umount_returns_when_the_foreground_process_has_exited_unreaped() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    let mut m = Mount::foreground(&top, &mnt, &[]);
    let r = run_in(
        dir.path(),
        qcow2fs_bin(),
        &[OsStr::new("umount"), mnt.as_os_str()],
        Duration::from_secs(15),
    );
    let status = m.wait_foreground(Duration::from_secs(10));
    assert!(
        r.success(),
        "qcow2fs umount while its parent has not reaped the exited `qcow2fs mount -f` \
         ({} once reaped): {}",
        status.map_or("still running".to_string(), |s| s.to_string()),
        r.describe()
    );
    assert!(!m.is_mounted(), "still mounted after qcow2fs umount");
}

#[test]
fn qcow2fs_umount_waits_for_the_daemon() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "mnt");
    let m = Mount::new(&top, &mnt, &[]);
    let pid = m.daemon_pid();
    fs::read(m.path("top.raw")).unwrap();
    run_in(
        dir.path(),
        qcow2fs_bin(),
        &[OsStr::new("umount"), mnt.as_os_str()],
        MOUNT_TIMEOUT,
    )
    .expect_success();
    assert!(!m.is_mounted(), "still mounted after qcow2fs umount");
    assert!(
        !pid_alive(pid),
        "the daemon (pid {pid}) is still running when qcow2fs umount returns"
    );
}

#[test]
fn signals_unmount_cleanly() {
    let (dir, top) = corpus::build("backing_smaller");
    let mut wrong = Vec::new();
    // Foreground: the process is ours, so its exit status is visible.
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mnt = mountpoint(dir.path(), &format!("fg-{name}"));
        let mut m = Mount::foreground(&top, &mnt, &[]);
        fs::read(m.path("top.raw")).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(m.daemon_pid(), sig) };
        let status = m.wait_foreground(Duration::from_secs(10));
        if !status.is_some_and(|s| s.success()) {
            wrong.push(format!(
                "-f, {name}: exit {status:?} (expected 0); stderr {:?}",
                m.foreground_stderr()
            ));
        }
        if m.is_mounted() {
            wrong.push(format!(
                "-f, {name}: still mounted after the process exited"
            ));
        }
    }
    // Daemon mode: the mount goes away and the daemon exits.
    let mnt = mountpoint(dir.path(), "daemon-SIGTERM");
    let m = Mount::new(&top, &mnt, &[]);
    let pid = m.daemon_pid();
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !wait_pid_gone(pid, Duration::from_secs(10)) {
        wrong.push("daemon, SIGTERM: still running after 10 s".into());
    }
    if m.is_mounted() {
        wrong.push("daemon, SIGTERM: still mounted after the daemon exited".into());
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn signal_while_a_file_is_open_detaches_and_the_daemon_ends_at_the_last_close() {
    let (dir, top) = corpus::build("backing_smaller");
    let mnt = mountpoint(dir.path(), "busy");
    let mut m = Mount::foreground(&top, &mnt, &[]);
    let want = qemu_raw(&top);
    let held = fs::File::open(m.path("top.raw")).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.daemon_pid(), libc::SIGTERM) };
    // The open file keeps the mount busy: after its retries the daemon detaches it.
    assert!(
        wait_until(Duration::from_secs(10), || !m.is_mounted()),
        "still mounted 10 s after SIGTERM; stderr {:?}",
        m.foreground_stderr()
    );
    assert!(
        m.wait_foreground(Duration::ZERO).is_none(),
        "the daemon ended while a file of its detached mount was open"
    );
    // The open file still reads the disk.
    let mut got = vec![0; want.len()];
    held.read_exact_at(&mut got, 0).unwrap();
    assert_same_bytes("read through the detached mount", &want, &got);
    drop(held);
    let status = m.wait_foreground(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after the last close (expected 0); stderr {:?}",
        m.foreground_stderr()
    );
    assert!(
        m.foreground_stderr().contains("detaching"),
        "stderr does not say the mount was detached: {:?}",
        m.foreground_stderr()
    );
}

#[test]
fn plain_umount_and_fusermount3_unmount() {
    let (dir, top) = corpus::build("backing_smaller");
    for tool in [&["umount"][..], &["fusermount3", "-u"][..]] {
        let mnt = mountpoint(dir.path(), &format!("mnt-{}", tool[0]));
        let m = Mount::new(&top, &mnt, &[]);
        let pid = m.daemon_pid();
        fs::read(m.path("top.raw")).unwrap();
        let mut args: Vec<&OsStr> = tool[1..].iter().map(OsStr::new).collect();
        args.push(mnt.as_os_str());
        run_in(dir.path(), tool[0], &args, MOUNT_TIMEOUT).expect_success();
        assert!(!m.is_mounted(), "{tool:?}: still mounted");
        assert!(
            wait_pid_gone(pid, Duration::from_secs(10)),
            "{tool:?}: daemon {pid} still running after 10 s"
        );
    }
}

#[test]
fn log_option_gets_a_line_at_mount() {
    let (dir, top) = corpus::build("backing_smaller");
    let mut wrong = Vec::new();
    for fg in [false, true] {
        let mode = if fg { "foreground" } else { "daemon" };
        let log = dir.path().join(format!("{mode}.log"));
        let mnt = mountpoint(dir.path(), &format!("mnt-{mode}"));
        let opt = format!("log={}", log.display());
        let m = if fg {
            Mount::foreground(&top, &mnt, &[&opt])
        } else {
            Mount::new(&top, &mnt, &[&opt])
        };
        let has_line =
            || fs::read_to_string(&log).is_ok_and(|s| s.lines().any(|l| !l.trim().is_empty()));
        if !wait_until(Duration::from_secs(3), has_line) {
            wrong.push(format!(
                "{mode} mode: {} has no line after the mount ({:?})",
                log.display(),
                fs::read_to_string(&log)
            ));
        }
        drop(m);
    }
    assert!(wrong.is_empty(), "-o log=FILE:\n  {}", wrong.join("\n  "));
}

/// mount(8): `mount -t fuse.qcow2fs` (through /sbin/mount.fuse3, which runs `qcow2fs` from
/// /bin/sh), `mount -t qcow2fs` (through a /sbin/mount.qcow2fs symlink to the binary) and
/// fstab lines (`mount -T FILE DIR`), each checked, read and unmounted with umount(8).
#[test]
fn mount8_and_fstab_integration() {
    let (dir, top) = corpus::build("snapshots_of_overlay");
    let expected = qemu_raw(&top);
    let bin = canonical_or_same(Path::new(qcow2fs_bin()));
    // mount(8) starts helpers without PATH, so /bin/sh (run by mount.fuse3) looks in its
    // default path: the binary must be there as `qcow2fs`.
    let _in_path = TempSymlink::new(Path::new("/usr/local/sbin/qcow2fs"), &bin)
        .unwrap_or_else(|e| panic!("cannot put qcow2fs where mount.fuse3's shell finds it: {e}"));
    let _helper = TempSymlink::new(Path::new("/sbin/mount.qcow2fs"), &bin)
        .unwrap_or_else(|e| panic!("cannot install the mount helper: {e}"));
    let path_env = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let fstab = dir.path().join("fstab");
    let top_s = top.to_string_lossy().into_owned();

    // (label, mount arguments (DIR appended unless the fstab form), uid expected)
    let cases: Vec<(&str, Vec<String>, Option<u32>)> = vec![
        (
            "mount -t fuse.qcow2fs IMAGE DIR",
            vec!["-t".into(), "fuse.qcow2fs".into(), top_s.clone()],
            None,
        ),
        (
            "mount -t fuse.qcow2fs -o ro,nosuid,uid=1234 IMAGE DIR",
            vec![
                "-t".into(),
                "fuse.qcow2fs".into(),
                "-o".into(),
                "ro,nosuid,uid=1234".into(),
                top_s.clone(),
            ],
            Some(1234),
        ),
        (
            "mount -t qcow2fs IMAGE DIR",
            vec!["-t".into(), "qcow2fs".into(), top_s.clone()],
            None,
        ),
        (
            "mount -t qcow2fs -o ro,uid=99 IMAGE DIR",
            vec![
                "-t".into(),
                "qcow2fs".into(),
                "-o".into(),
                "ro,uid=99".into(),
                top_s.clone(),
            ],
            Some(99),
        ),
        ("fstab fuse.qcow2fs", vec![], Some(4321)),
        ("fstab qcow2fs", vec![], Some(77)),
    ];
    let mut wrong = Vec::new();
    for (i, (label, args, uid)) in cases.into_iter().enumerate() {
        let mnt = mountpoint(dir.path(), &format!("m8-{i}"));
        let mut cmd = Command::new("mount");
        cmd.env("PATH", &path_env).current_dir(dir.path());
        if label.starts_with("fstab") {
            let (ty, opts) = if label.ends_with("fuse.qcow2fs") {
                (
                    "fuse.qcow2fs",
                    "ro,noauto,nofail,_netdev,x-systemd.automount,uid=4321",
                )
            } else {
                ("qcow2fs", "defaults,ro,noatime,uid=77")
            };
            fs::write(
                &fstab,
                format!("# test fstab\n{top_s} {} {ty} {opts} 0 0\n", mnt.display()),
            )
            .unwrap();
            cmd.arg("-T").arg(&fstab).arg(&mnt);
        } else {
            cmd.args(&args).arg(&mnt);
        }
        let r = run_timeout(&mut cmd, MOUNT_TIMEOUT);
        let m = Mount::adopt(&mnt);
        let result = (|| -> Result<(), String> {
            if !r.success() {
                return Err(r.describe());
            }
            let e = mount_info(&mnt).ok_or("nothing mounted")?;
            if e.fstype != "fuse.qcow2fs" || e.source != top_s {
                return Err(format!("mount table entry {e:?}"));
            }
            let got = fs::read(m.path("top.raw")).map_err(|e| format!("read: {e}"))?;
            if let Some(d) = first_difference(&expected, &got) {
                return Err(format!("content: {d}"));
            }
            if let Some(u) = uid {
                let have = fs::metadata(m.path("top.raw")).unwrap().uid();
                if have != u {
                    return Err(format!("uid {have}, expected {u}"));
                }
            }
            let pid = m.daemon.ok_or("no qcow2fs process serves the mount")?;
            let u = run_in(dir.path(), "umount", &[&mnt], MOUNT_TIMEOUT);
            if !u.success() || m.is_mounted() {
                return Err(format!("umount: {}", u.describe()));
            }
            if !wait_pid_gone(pid, Duration::from_secs(10)) {
                return Err(format!("daemon {pid} still running after umount"));
            }
            Ok(())
        })();
        if let Err(e) = result {
            wrong.push(format!("{label}: {e}"));
        }
        drop(m);
    }
    assert!(
        wrong.is_empty(),
        "mount(8) integration:\n\n{}",
        wrong.join("\n\n")
    );
}
