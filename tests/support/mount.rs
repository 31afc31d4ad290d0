//! Real mounts: guards that undo whatever a test mounted, also when it panics:
//! [`Mount`] for qcow2fs mounts (read-only or read-write, daemon or foreground, or made
//! by mount(8) and adopted), [`PlainMount`] for any other mount (a tmpfs, a guest file
//! system on a loop device). A [`Watchdog`] tears a mount down when it outlives its time,
//! so a hung daemon fails its test instead of hanging the suite.
//!
//! Nothing here decides what is correct; the tests compare with QEMU.

use super::cli::qcow2fs_bin;
use super::files::{absolute, canonical_or_same, image_dir};
use super::mounttable::{
    FSTYPE, daemon_pids, force_unmount, is_qcow2fs_mount, mount_info, mounts_at,
};
use super::process::{
    Finished, ensure_gone, open_files_under, pid_alive, run_in, run_timeout, signal, wait_pid_gone,
    wait_until,
};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a mount or unmount command may take before it counts as a hang.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A mount still up this long after it was made is torn down by its watchdog (daemon
/// killed, lazy unmount).
pub const MOUNT_WATCHDOG: Duration = Duration::from_secs(300);

/// Tears a mount down when its time is up (kills its daemon, unmounts it lazily), unless
/// cancelled first by dropping it.
pub struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    pub fn start(mountpoint: PathBuf, pids: Vec<i32>, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: the mount at {} is still up after {limit:?}; killing {pids:?} \
                     and unmounting it lazily",
                    mountpoint.display()
                );
                for p in pids.iter().copied().chain(daemon_pids(&mountpoint)) {
                    signal(p, libc::SIGKILL);
                }
                let _ = run_timeout(
                    Command::new("umount").arg("-l").arg(&mountpoint),
                    Duration::from_secs(30),
                );
            }
        });
        Watchdog { cancel: Some(tx) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.cancel.take());
    }
}

/// `qcow2fs mount [-o OPT]... IMAGE MOUNTPOINT`, with absolute paths.
pub fn mount_args(image: &Path, mountpoint: &Path, options: &[&str]) -> Vec<OsString> {
    mount_args_mode(image, mountpoint, options, false)
}

/// `qcow2fs mount [-f] [-o OPT]... IMAGE MOUNTPOINT`, with absolute paths.
fn mount_args_mode(
    image: &Path,
    mountpoint: &Path,
    options: &[&str],
    foreground: bool,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["mount".into()];
    if foreground {
        args.push("-f".into());
    }
    for o in options {
        args.extend(["-o".into(), OsString::from(o)]);
    }
    args.extend([absolute(image).into(), absolute(mountpoint).into()]);
    args
}

/// A qcow2fs mount made by a test. Dropping it (also during a panic) unmounts it with
/// `qcow2fs umount`, falling back to `umount`, `umount -l` and `fusermount3 -uz`, and
/// waits for its daemon to end (killing it if it lingers).
pub struct Mount {
    /// The mount point, resolved.
    pub mountpoint: PathBuf,
    /// The image, when the guard mounted it (for [`Mount::disk`]).
    pub image: Option<PathBuf>,
    /// The process serving the mount (the daemon, or the foreground child).
    pub daemon: Option<i32>,
    /// What `qcow2fs mount` printed on stderr (daemon mode).
    pub stderr: String,
    child: Option<Child>,
    child_stderr: Option<File>,
    watchdog: Option<Watchdog>,
}

impl Mount {
    /// `qcow2fs mount [-o OPT]... IMAGE MOUNTPOINT` in daemon mode; panics with the
    /// command's output if it fails.
    pub fn new(image: &Path, mountpoint: &Path, options: &[&str]) -> Mount {
        Mount::try_new(image, mountpoint, options)
            .unwrap_or_else(|r| panic!("mounting failed: {}", r.describe()))
    }

    /// Like [`Mount::new`], returning the failed command's output instead of panicking
    /// (nothing is left mounted or running for the mount point then).
    pub fn try_new(image: &Path, mountpoint: &Path, options: &[&str]) -> Result<Mount, Finished> {
        let args = mount_args(image, mountpoint, options);
        let mut m = Mount::try_command(&image_dir(image), &args, mountpoint)?;
        m.image = Some(absolute(image));
        Ok(m)
    }

    /// Runs `qcow2fs ARGS` in `dir`, which must mount the image at `mountpoint` with one
    /// daemon serving it. On failure, cleans up what the command left, unless the mount
    /// point was in use before.
    pub fn try_command(
        dir: &Path,
        args: &[OsString],
        mountpoint: &Path,
    ) -> Result<Mount, Finished> {
        let before = mounts_at(mountpoint).len();
        let r = run_in(dir, qcow2fs_bin(), args, MOUNT_TIMEOUT);
        if !r.success() {
            if before == 0 {
                drop(Mount::adopt(mountpoint));
            }
            return Err(r);
        }
        let mut m = Mount::adopt(mountpoint);
        assert!(
            m.is_mounted(),
            "{} exited 0 but {} is not a qcow2fs mount: {:?}",
            r.command,
            mountpoint.display(),
            mount_info(mountpoint)
        );
        let pids = daemon_pids(mountpoint);
        assert_eq!(
            pids.len(),
            1,
            "expected one qcow2fs daemon for {}, found {pids:?}",
            mountpoint.display()
        );
        m.stderr = r.stderr;
        Ok(m)
    }

    /// `qcow2fs mount -f [-o OPT]... IMAGE MOUNTPOINT` as a child process, returned once
    /// the mount is up; panics with its stderr if it exits or no mount appears.
    pub fn foreground(image: &Path, mountpoint: &Path, options: &[&str]) -> Mount {
        let err = tempfile::tempfile().expect("creating a temporary file");
        let child = Command::new(qcow2fs_bin())
            .args(mount_args_mode(image, mountpoint, options, true))
            .current_dir(image_dir(image))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err.try_clone().unwrap())
            .spawn()
            .expect("running qcow2fs mount -f");
        let pid = child.id() as i32;
        let mnt = canonical_or_same(mountpoint);
        let mut guard = Mount {
            watchdog: Some(Watchdog::start(mnt.clone(), vec![pid], MOUNT_WATCHDOG)),
            mountpoint: mnt,
            image: Some(absolute(image)),
            daemon: Some(pid),
            stderr: String::new(),
            child: Some(child),
            child_stderr: Some(err),
        };
        let mut exited = None;
        let up = wait_until(MOUNT_TIMEOUT, || {
            exited = guard
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            exited.is_some() || is_qcow2fs_mount(mountpoint)
        });
        if let Some(s) = exited {
            guard.child = None;
            panic!(
                "qcow2fs mount -f exited ({s}) without mounting; stderr: {:?}",
                guard.foreground_stderr()
            );
        }
        assert!(
            up,
            "qcow2fs mount -f: no mount at {} after {MOUNT_TIMEOUT:?}; stderr: {:?}",
            mountpoint.display(),
            guard.foreground_stderr()
        );
        guard
    }

    /// A guard for whatever is (or will be) mounted at `mountpoint` by other means, served
    /// by a qcow2fs daemon found by [`daemon_pids`].
    pub fn adopt(mountpoint: &Path) -> Mount {
        let pids = daemon_pids(mountpoint);
        let mnt = canonical_or_same(mountpoint);
        Mount {
            watchdog: Some(Watchdog::start(mnt.clone(), pids.clone(), MOUNT_WATCHDOG)),
            mountpoint: mnt,
            image: None,
            daemon: pids.first().copied(),
            stderr: String::new(),
            child: None,
            child_stderr: None,
        }
    }

    /// `rel` inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// The active disk, `MOUNTPOINT/NAME.raw`.
    pub fn disk(&self) -> PathBuf {
        let image = self
            .image
            .as_ref()
            .expect("the guard did not mount an image");
        self.path(&format!("{}.raw", super::files::stem(image)))
    }

    /// Whether the mount is still up.
    pub fn is_mounted(&self) -> bool {
        is_qcow2fs_mount(&self.mountpoint)
    }

    /// The daemon's pid; panics if none was found.
    pub fn daemon_pid(&self) -> i32 {
        self.daemon.unwrap_or_else(|| {
            panic!(
                "no qcow2fs process with {} in its arguments was found",
                self.mountpoint.display()
            )
        })
    }

    /// What the foreground process wrote to stderr so far.
    pub fn foreground_stderr(&self) -> String {
        let Some(f) = &self.child_stderr else {
            return String::new();
        };
        let mut f = f.try_clone().unwrap();
        let mut s = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut s).unwrap();
        String::from_utf8_lossy(&s).into_owned()
    }

    /// Waits up to `limit` for the foreground process to exit and returns its status.
    pub fn wait_foreground(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("not a foreground mount");
        let mut status = None;
        wait_until(limit, || {
            status = child.try_wait().expect("waiting for qcow2fs");
            status.is_some()
        });
        status
    }

    /// `qcow2fs umount MOUNTPOINT`: must succeed, and when it returns the mount point must
    /// be free and the daemon gone (a foreground process must exit 0).
    pub fn umount(mut self) {
        let mut tries = 0;
        let out = loop {
            let out = run_timeout(
                Command::new(qcow2fs_bin())
                    .arg("umount")
                    .arg(&self.mountpoint)
                    .current_dir(self.mountpoint.parent().unwrap()),
                Duration::from_secs(120),
            );
            // A process forked by a concurrent test holds copies of our descriptors
            // until it execs: EBUSY for a moment. Anything longer is a failure.
            if out.success() || !out.stderr.contains("busy") || tries == 20 {
                break out;
            }
            tries += 1;
            eprintln!(
                "qcow2fs umount {}: busy (try {tries}); open files: {:?}",
                self.mountpoint.display(),
                open_files_under(&self.mountpoint)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(out.success(), "qcow2fs umount failed: {}", out.describe());
        assert!(
            mount_info(&self.mountpoint).is_none(),
            "after qcow2fs umount, {} is still mounted: {:?}",
            self.mountpoint.display(),
            mount_info(&self.mountpoint)
        );
        if self.child.is_some() {
            let status = self.wait_foreground(Duration::from_secs(30));
            let Some(status) = status else {
                panic!("qcow2fs mount -f still running 30 s after qcow2fs umount");
            };
            assert!(
                status.success(),
                "qcow2fs mount -f exited with {status} after umount; stderr: {}",
                self.foreground_stderr()
            );
        } else {
            let pid = self.daemon_pid();
            assert!(
                !pid_alive(pid),
                "qcow2fs umount returned while the daemon (pid {pid}) still runs"
            );
        }
        // Drop finds nothing left to do.
    }

    /// `kill -9` of the daemon, then the dead FUSE mount is removed.
    pub fn kill9(mut self) {
        let pid = self.daemon_pid();
        signal(pid, libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        assert!(
            wait_pid_gone(pid, Duration::from_secs(20)),
            "daemon {pid} survived SIGKILL"
        );
        if let Err(problem) = force_unmount(&self.mountpoint, Some(FSTYPE)) {
            panic!("the dead mount could not be removed: {problem}");
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        if self.is_mounted() {
            let r = run_timeout(
                Command::new(qcow2fs_bin())
                    .arg("umount")
                    .arg(&self.mountpoint),
                MOUNT_TIMEOUT,
            );
            if !r.success() {
                eprintln!("cleanup: {}", r.describe());
            }
        }
        if let Err(problem) = force_unmount(&self.mountpoint, Some(FSTYPE)) {
            eprintln!("cleanup of {}: {problem}", self.mountpoint.display());
        }
        if let Some(mut child) = self.child.take() {
            if !wait_until(Duration::from_secs(10), || {
                child.try_wait().ok().flatten().is_some()
            }) {
                eprintln!("cleanup: qcow2fs mount -f still running after unmount; killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        } else if let Some(pid) = self.daemon {
            ensure_gone(pid, "qcow2fs daemon");
        }
        // Any other daemon for this mount point (e.g. one started after adopt()).
        for pid in daemon_pids(&self.mountpoint) {
            ensure_gone(pid, "qcow2fs process");
        }
    }
}

/// Runs `qcow2fs ARGS` in `dir` and checks that it fails cleanly: exit status 1, exactly
/// one line on stderr mentioning each of `mention` (case-insensitively), no new mount at
/// `mountpoint` and no process left serving it.
pub fn assert_mount_fails<S: AsRef<OsStr>>(
    what: &str,
    dir: &Path,
    args: &[S],
    mountpoint: &Path,
    mention: &[&str],
) {
    let before = mounts_at(mountpoint).len();
    let daemons_before = daemon_pids(mountpoint);
    let r = run_in(dir, qcow2fs_bin(), args, MOUNT_TIMEOUT);
    // Clean up anything it did mount (only when nothing was there before).
    let _guard = (before == 0).then(|| Mount::adopt(mountpoint));
    let mut problems = Vec::new();
    if r.code() != Some(1) {
        problems.push("exit status is not 1".to_string());
    }
    let text = r.stderr.trim_end();
    if text.is_empty() || text.lines().count() != 1 {
        problems.push(format!(
            "stderr has {} lines, expected exactly one",
            text.lines().count()
        ));
    }
    for word in mention {
        if !text.to_lowercase().contains(&word.to_lowercase()) {
            problems.push(format!("stderr does not mention {word:?}"));
        }
    }
    if mounts_at(mountpoint).len() != before {
        problems.push(format!(
            "something was mounted: {:?}",
            mount_info(mountpoint)
        ));
    }
    let new_daemons = || -> Vec<i32> {
        daemon_pids(mountpoint)
            .into_iter()
            .filter(|p| !daemons_before.contains(p))
            .collect()
    };
    if !wait_until(Duration::from_secs(2), || new_daemons().is_empty()) {
        problems.push(format!(
            "processes left running for the mount point: {:?}",
            new_daemons()
        ));
    }
    assert!(
        problems.is_empty(),
        "{what}: {}\n{}",
        problems.join("; "),
        r.describe()
    );
}

/// `qcow2fs mount -o OPTIONS IMAGE MOUNTPOINT` must fail cleanly (see
/// [`assert_mount_fails`]).
pub fn assert_mount_refused(image: &Path, mountpoint: &Path, options: &[&str], mention: &[&str]) {
    assert_mount_fails(
        &format!("qcow2fs mount -o {}", options.join(",")),
        &image_dir(image),
        &mount_args(image, mountpoint, options),
        mountpoint,
        mention,
    );
}

/// Any other mount (`mount [-t TYPE] [-o OPTS] SOURCE DIR`), unmounted on drop.
pub struct PlainMount {
    pub dir: PathBuf,
}

impl PlainMount {
    /// `mount [-o OPTS] SOURCE DIR`; panics with mount's output on failure.
    pub fn new(source: &str, dir: &Path, options: &str) -> PlainMount {
        PlainMount::with_type(None, source, dir, options)
    }

    /// `mount [-t FSTYPE] [-o OPTS] SOURCE DIR`.
    pub fn with_type(fstype: Option<&str>, source: &str, dir: &Path, options: &str) -> PlainMount {
        let mut cmd = Command::new("mount");
        if let Some(t) = fstype {
            cmd.arg("-t").arg(t);
        }
        if !options.is_empty() {
            cmd.arg("-o").arg(options);
        }
        cmd.arg(source).arg(dir);
        let out = run_timeout(&mut cmd, MOUNT_TIMEOUT);
        let guard = PlainMount {
            dir: canonical_or_same(dir),
        };
        assert!(out.success(), "{}", out.describe());
        guard
    }

    /// `mount -o remount,OPTS DIR`.
    pub fn remount(&self, options: &str) {
        run_timeout(
            Command::new("mount")
                .arg("-o")
                .arg(format!("remount,{options}"))
                .arg(&self.dir),
            MOUNT_TIMEOUT,
        )
        .expect_success();
    }

    /// `umount DIR`, which must succeed.
    pub fn unmount(self) {
        run_timeout(
            Command::new("umount").arg(&self.dir),
            Duration::from_secs(120),
        )
        .expect_success();
    }
}

impl Drop for PlainMount {
    fn drop(&mut self) {
        if let Err(problem) = force_unmount(&self.dir, None) {
            eprintln!("cleanup of {}: {problem}", self.dir.display());
        }
    }
}
