//! Helpers for the read-write mount tests (`tests/write_mount.rs`): commands with a time
//! limit, a mount guard that always unmounts (and kills a leftover daemon), loop devices
//! detached on drop, a raw model that receives the same operations as the mounted disk,
//! and the QEMU-side checks (`qemu-img check`, `convert`, snapshots, backing files).
//!
//! Nothing here decides what is correct from qcow2fs's own code: the expected contents come
//! from the operations the tests performed (the model) and from QEMU's own renderings.
//!
//! This module is included by `tests/write_mount.rs` with `#[path]`; it builds on the
//! QEMU, process and mount-table helpers of `tests/common/mod.rs` (and the generator of
//! `tests/common/images.rs`).

#![allow(dead_code)]

use crate::common::images::Rng as Xorshift;
use crate::common::{
    absolute, canonical_or_same, daemon_pids, first_difference, mount_info, pid_alive, qcow2fs_bin,
    wait_pid_gone, wait_until,
};
use serde_json::Value;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const K: u64 = 1024;
pub const M: u64 = 1024 * 1024;

/// How long one mount may stay up before its watchdog kills the daemon (a hung daemon
/// then fails the test instead of hanging the suite).
pub const MOUNT_LIMIT: Duration = Duration::from_secs(240);

/// Time limit for one external command.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------

/// The xorshift64* generator of `common::images`, seeded so that a failing seed
/// reproduces, with the ranges and byte strings the write tests draw.
pub struct Rng(Xorshift);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // `Xorshift::new` xors its seed with the same constant: the state is
        // `seed * 0x9e37_79b9_7f4a_7c15 ^ 0x2545_f491_4f6c_dd1d | 1`.
        Rng(Xorshift::new(
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ 0x2545_f491_4f6c_dd1d
                ^ 0x9e37_79b9_7f4a_7c15,
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `len` random (incompressible) bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

// ---------------------------------------------------------------------------------------
// Commands with a time limit
// ---------------------------------------------------------------------------------------

fn shown<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| {
            let a = a.as_ref().to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        s.to_string()
    } else {
        format!("...{}", s.chars().skip(n - max).collect::<String>())
    }
}

/// What a command did.
#[derive(Debug)]
pub struct Out {
    pub command: String,
    /// `None`: still running at the time limit, killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// stdout and stderr together (qemu-io prints some errors on stdout).
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn describe(&self) -> String {
        let status = match self.status {
            None => "still running at the time limit, killed".to_string(),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            },
        };
        format!(
            "`{}`: {status}\n  stderr: {:?}\n  stdout: {:?}",
            self.command,
            tail(&self.stderr, 3000),
            tail(&self.stdout, 1500)
        )
    }

    pub fn expect_ok(self) -> Out {
        assert!(self.ok(), "{}", self.describe());
        self
    }
}

/// Runs `cmd` (stdin /dev/null, output into anonymous files so that a daemon inheriting
/// them cannot make us wait) for at most `limit`.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Out {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        shown(&cmd.get_args().collect::<Vec<_>>())
    );
    let out = tempfile::tempfile().expect("temporary file");
    let err = tempfile::tempfile().expect("temporary file");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(3));
    };
    let read = |mut f: File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        String::from_utf8_lossy(&v).into_owned()
    };
    Out {
        command,
        status,
        stdout: read(out),
        stderr: read(err),
    }
}

/// `program args` in `dir`, with [`COMMAND_LIMIT`].
pub fn run_in<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S]) -> Out {
    run_limited(
        Command::new(program).args(args).current_dir(dir),
        COMMAND_LIMIT,
    )
}

/// The directory QEMU tools run in for `image` (relative backing names resolve there).
pub fn dir_of(image: &Path) -> PathBuf {
    absolute(image).parent().unwrap().to_path_buf()
}

/// `qemu-img args` run in `image`'s directory; must succeed; returns stdout.
pub fn img(dir: &Path, args: &[&str]) -> String {
    run_in(dir, "qemu-img", args).expect_ok().stdout
}

/// `qemu-io -c CMD... [extra] image`; must succeed (qemu-io exits 0 even when a command
/// fails, so its output is also checked for error words).
pub fn io(image: &Path, cmds: &[String]) {
    io_with(image, &[], cmds)
}

pub fn io_with(image: &Path, extra: &[&str], cmds: &[String]) {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(absolute(image).to_string_lossy().into_owned());
    let out = run_in(&dir_of(image), "qemu-io", &args).expect_ok();
    let text = out.all_output();
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported a failure: {}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------
// Processes and the mount table
// ---------------------------------------------------------------------------------------

/// `(fstype, source)` of the visible mount at exactly `mnt`.
pub fn mounted(mnt: &Path) -> Option<(String, String)> {
    mount_info(mnt).map(|m| (m.fstype, m.source))
}

pub fn is_qcow2fs_mount(mnt: &Path) -> bool {
    mounted(mnt).is_some_and(|(t, _)| t == "fuse.qcow2fs")
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// `(pid, command, path)` of every open descriptor of any process on a file under `dir`.
pub fn open_files_under(dir: &Path) -> Vec<(i32, String, PathBuf)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.starts_with(dir)
            {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                found.push((pid, comm.trim().to_string(), target));
            }
        }
    }
    found
}

/// Lazily unmounts whatever is at `mnt` (a dead FUSE mount included).
pub fn lazy_unmount(mnt: &Path) {
    for _ in 0..4 {
        if mounted(mnt).is_none() {
            return;
        }
        let r = run_limited(
            Command::new("umount").arg("-l").arg(mnt),
            Duration::from_secs(30),
        );
        if !r.ok() {
            let _ = run_limited(
                Command::new("fusermount3").arg("-uz").arg(mnt),
                Duration::from_secs(30),
            );
        }
    }
}

/// Kills the daemon and unmounts lazily when its time is up, unless cancelled.
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    fn start(mnt: PathBuf, pids: Vec<i32>, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: mount at {} still up after {limit:?}: killing {pids:?}, lazy unmount",
                    mnt.display()
                );
                for p in pids.iter().copied().chain(daemon_pids(&mnt)) {
                    kill(p, libc::SIGKILL);
                }
                lazy_unmount(&mnt);
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

// ---------------------------------------------------------------------------------------
// The mount guard
// ---------------------------------------------------------------------------------------

/// A qcow2fs mount made by this test. Dropping it (also during a panic) unmounts it with
/// `qcow2fs umount`, falling back to `umount -l`, and kills a daemon that lingers.
pub struct RwMount {
    pub mnt: PathBuf,
    pub image: PathBuf,
    /// The process serving the mount.
    pub pid: i32,
    /// What `qcow2fs mount` printed on stderr (daemon mode).
    pub stderr: String,
    child: Option<Child>,
    child_err: Option<File>,
    watchdog: Option<Watchdog>,
}

/// The mount command's arguments.
fn mount_args(image: &Path, mnt: &Path, options: &[&str], foreground: bool) -> Vec<String> {
    let mut args = vec!["mount".to_string()];
    if foreground {
        args.push("-f".into());
    }
    for o in options {
        args.push("-o".into());
        args.push(o.to_string());
    }
    args.push(absolute(image).to_string_lossy().into_owned());
    args.push(absolute(mnt).to_string_lossy().into_owned());
    args
}

impl RwMount {
    /// `qcow2fs mount -o OPTS IMAGE MNT` (daemon mode): Ok once mounted, or the failed
    /// command's output (nothing is left mounted either way on failure).
    pub fn try_mount(image: &Path, mnt: &Path, options: &[&str]) -> Result<RwMount, Out> {
        let out = run_limited(
            Command::new(qcow2fs_bin())
                .args(mount_args(image, mnt, options, false))
                .current_dir(dir_of(image)),
            Duration::from_secs(60),
        );
        let pids = daemon_pids(mnt);
        if !out.ok() {
            // Clean up anything a failed mount left behind before reporting.
            for p in &pids {
                kill(*p, libc::SIGKILL);
            }
            lazy_unmount(mnt);
            return Err(out);
        }
        assert!(
            is_qcow2fs_mount(mnt),
            "{} exited 0 but {} is not a fuse.qcow2fs mount: {:?}",
            out.command,
            mnt.display(),
            mounted(mnt)
        );
        assert_eq!(
            pids.len(),
            1,
            "expected one qcow2fs daemon for {}, found {pids:?}",
            mnt.display()
        );
        Ok(RwMount {
            mnt: canonical_or_same(mnt),
            image: absolute(image),
            pid: pids[0],
            stderr: out.stderr,
            child: None,
            child_err: None,
            watchdog: Some(Watchdog::start(
                canonical_or_same(mnt),
                pids.clone(),
                MOUNT_LIMIT,
            )),
        })
    }

    pub fn mount(image: &Path, mnt: &Path, options: &[&str]) -> RwMount {
        RwMount::try_mount(image, mnt, options)
            .unwrap_or_else(|o| panic!("mounting failed: {}", o.describe()))
    }

    /// `qcow2fs mount -f ...` as a child process, returned once the mount is up.
    pub fn mount_foreground(image: &Path, mnt: &Path, options: &[&str]) -> RwMount {
        let err = tempfile::tempfile().expect("temporary file");
        let mut child = Command::new(qcow2fs_bin())
            .args(mount_args(image, mnt, options, true))
            .current_dir(dir_of(image))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err.try_clone().unwrap())
            .spawn()
            .expect("running qcow2fs mount -f");
        let pid = child.id() as i32;
        let mut guard = RwMount {
            mnt: canonical_or_same(mnt),
            image: absolute(image),
            pid,
            stderr: String::new(),
            child: None,
            child_err: Some(err),
            watchdog: Some(Watchdog::start(
                canonical_or_same(mnt),
                vec![pid],
                MOUNT_LIMIT,
            )),
        };
        let mut exited = None;
        let up = wait_until(Duration::from_secs(60), || {
            if let Ok(Some(s)) = child.try_wait() {
                exited = Some(s);
                return true;
            }
            is_qcow2fs_mount(mnt)
        });
        if let Some(s) = exited {
            panic!(
                "qcow2fs mount -f exited ({s}) without mounting: {}",
                guard.child_stderr()
            );
        }
        guard.child = Some(child);
        assert!(up, "qcow2fs mount -f: no mount after 60 s");
        guard
    }

    fn child_stderr(&self) -> String {
        match &self.child_err {
            Some(f) => {
                let mut f = f.try_clone().unwrap();
                let mut s = String::new();
                f.rewind().unwrap();
                let _ = f.read_to_string(&mut s);
                s
            }
            None => String::new(),
        }
    }

    /// The active disk, `MNT/NAME.raw`.
    pub fn disk(&self) -> PathBuf {
        let stem = self
            .image
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        self.mnt.join(format!("{stem}.raw"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `qcow2fs umount MNT`: must succeed, and when it returns the daemon must be gone and
    /// the mount point free.
    pub fn umount(mut self) {
        let mut tries = 0;
        let out = loop {
            let out = run_limited(
                Command::new(qcow2fs_bin())
                    .arg("umount")
                    .arg(&self.mnt)
                    .current_dir(self.mnt.parent().unwrap()),
                Duration::from_secs(120),
            );
            // A process forked by a concurrent test holds copies of our descriptors
            // until it execs: EBUSY for a moment. Anything longer is a failure.
            if out.ok() || !out.stderr.contains("busy") || tries == 20 {
                break out;
            }
            tries += 1;
            eprintln!(
                "qcow2fs umount {}: busy (try {tries}); open files: {:?}",
                self.mnt.display(),
                open_files_under(&self.mnt)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(out.ok(), "qcow2fs umount failed: {}", out.describe());
        assert!(
            mounted(&self.mnt).is_none(),
            "after qcow2fs umount, {} is still mounted: {:?}",
            self.mnt.display(),
            mounted(&self.mnt)
        );
        if let Some(mut c) = self.child.take() {
            // A foreground process is our child: reap it.
            let ok = wait_until(Duration::from_secs(30), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !ok {
                let _ = c.kill();
                let _ = c.wait();
                panic!("qcow2fs mount -f still running 30 s after qcow2fs umount");
            }
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "qcow2fs mount -f exited with {status} after umount; stderr: {}",
                self.child_stderr()
            );
        } else {
            assert!(
                !pid_alive(self.pid),
                "qcow2fs umount returned while the daemon (pid {}) still runs: {}",
                self.pid,
                out.describe()
            );
        }
        // Drop finds nothing left to do.
    }

    /// `kill -9` of the daemon, then the dead FUSE mount is cleaned up (`umount -l`).
    pub fn kill9(mut self) {
        kill(self.pid, libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        assert!(
            wait_pid_gone(self.pid, Duration::from_secs(20)),
            "daemon {} survived SIGKILL",
            self.pid
        );
        lazy_unmount(&self.mnt);
        assert!(
            mounted(&self.mnt).is_none(),
            "the dead mount at {} could not be removed",
            self.mnt.display()
        );
    }
}

impl Drop for RwMount {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        if is_qcow2fs_mount(&self.mnt) {
            let out = run_limited(
                Command::new(qcow2fs_bin()).arg("umount").arg(&self.mnt),
                Duration::from_secs(60),
            );
            if !out.ok() {
                eprintln!("cleanup: {}", out.describe());
                lazy_unmount(&self.mnt);
            }
        } else if mounted(&self.mnt).is_some() {
            lazy_unmount(&self.mnt);
        }
        if let Some(mut c) = self.child.take() {
            if !wait_until(Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            }) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for pid in std::iter::once(self.pid).chain(daemon_pids(&self.mnt)) {
            if pid_alive(pid) && !wait_pid_gone(pid, Duration::from_secs(10)) {
                eprintln!("cleanup: qcow2fs process {pid} still running; killing it");
                kill(pid, libc::SIGKILL);
                wait_pid_gone(pid, Duration::from_secs(5));
            }
        }
    }
}

/// A loop device attached to a file, detached on drop.
pub struct LoopDev {
    pub dev: String,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = run_limited(
            Command::new("losetup").arg("-f").arg("--show").arg(file),
            Duration::from_secs(60),
        )
        .expect_ok();
        let dev = out.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev { dev }
    }

    /// Detaches now, asserting success.
    pub fn detach(mut self) {
        let dev = std::mem::take(&mut self.dev);
        run_limited(
            Command::new("losetup").arg("-d").arg(&dev),
            Duration::from_secs(60),
        )
        .expect_ok();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if !self.dev.is_empty() {
            let r = run_limited(
                Command::new("losetup").arg("-d").arg(&self.dev),
                Duration::from_secs(60),
            );
            if !r.ok() {
                eprintln!("cleanup: {}", r.describe());
            }
        }
    }
}

/// A plain mount (`mount [-o OPTS] SOURCE DIR`) unmounted on drop.
pub struct PlainMount {
    pub dir: PathBuf,
}

impl PlainMount {
    pub fn new(source: &str, dir: &Path, options: &str) -> PlainMount {
        let mut cmd = Command::new("mount");
        if !options.is_empty() {
            cmd.arg("-o").arg(options);
        }
        cmd.arg(source).arg(dir);
        let out = run_limited(&mut cmd, Duration::from_secs(60));
        let guard = PlainMount {
            dir: canonical_or_same(dir),
        };
        assert!(out.ok(), "{}", out.describe());
        guard
    }

    pub fn unmount(self) {
        run_limited(
            Command::new("umount").arg(&self.dir),
            Duration::from_secs(120),
        )
        .expect_ok();
    }
}

impl Drop for PlainMount {
    fn drop(&mut self) {
        if mounted(&self.dir).is_some() {
            let r = run_limited(
                Command::new("umount").arg(&self.dir),
                Duration::from_secs(60),
            );
            if !r.ok() {
                lazy_unmount(&self.dir);
            }
        }
    }
}

/// A fresh directory `name` inside `dir`.
pub fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

// ---------------------------------------------------------------------------------------
// File I/O helpers
// ---------------------------------------------------------------------------------------

pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

pub fn errno_name(e: i32) -> String {
    // SAFETY: strerror returns a pointer to a static (or thread-local) string.
    let s = unsafe { std::ffi::CStr::from_ptr(libc::strerror(e)) };
    format!("errno {e} ({})", s.to_string_lossy())
}

/// `fallocate(fd, mode, off, len)`.
pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A page-aligned buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf {
            ptr,
            len: len.max(4096),
        }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: the buffer is plain memory owned by the value.
unsafe impl Send for AlignedBuf {}

pub fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `len` bytes at `off` (4 KiB aligned) with O_DIRECT, i.e. from the daemon, not the
/// page cache. Returns fewer bytes only at the end of the file.
pub fn read_direct_at(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = AlignedBuf::new(len.next_multiple_of(4096));
    let mut got = 0;
    while got < len {
        let want = (len - got).next_multiple_of(4096);
        let n = f.read_at(&mut buf.as_mut()[got..got + want], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(buf.as_mut()[..got.min(len)].to_vec())
}

/// The whole file through the page cache (a fresh open).
pub fn read_cached(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The whole file with O_DIRECT.
pub fn read_direct(path: &Path) -> Vec<u8> {
    let f = open_direct(path).unwrap_or_else(|e| panic!("O_DIRECT open {}: {e}", path.display()));
    let size = f.metadata().unwrap().len() as usize;
    let mut out = Vec::with_capacity(size);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20);
        let part = read_direct_at(&f, off as u64, n)
            .unwrap_or_else(|e| panic!("O_DIRECT read at {off:#x}: {e}"));
        assert_eq!(part.len(), n, "short O_DIRECT read at {off:#x}");
        out.extend_from_slice(&part);
        off += n;
    }
    out
}

// ---------------------------------------------------------------------------------------
// The model: a raw disk in memory that receives the same operations
// ---------------------------------------------------------------------------------------

/// One operation applied to the mounted disk and the model.
#[derive(Clone, Debug)]
pub enum Op {
    Write { off: u64, len: u64 },
    Punch { off: u64, len: u64 },
    Zero { off: u64, len: u64, keep_size: bool },
    Grow { from: u64, to: u64 },
    Fsync,
    Reopen,
}

impl Op {
    fn touches(&self, at: u64) -> bool {
        match *self {
            Op::Write { off, len } | Op::Punch { off, len } | Op::Zero { off, len, .. } => {
                at >= off && at < off + len
            }
            Op::Grow { from, to } => at >= from && at < to,
            _ => false,
        }
    }
}

/// The active disk of a mount, opened read-write, and the model of its content.
pub struct Disk {
    pub path: PathBuf,
    pub file: File,
    pub model: Vec<u8>,
    pub log: Vec<Op>,
}

impl Disk {
    /// Opens `path` (O_RDWR) with `initial` (QEMU's rendering before the test) as model.
    pub fn open(path: &Path, initial: Vec<u8>) -> Disk {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {} read-write: {e}", path.display()));
        let size = file.metadata().unwrap().len();
        assert_eq!(
            size,
            initial.len() as u64,
            "{} has size {size}, QEMU's rendering {} bytes",
            path.display(),
            initial.len()
        );
        Disk {
            path: path.to_path_buf(),
            file,
            model: initial,
            log: Vec::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn fail(&self, what: String, e: std::io::Error) -> ! {
        panic!(
            "{what} on {} failed: {e} ({}); after {} operations, last ones: {:?}",
            self.path.display(),
            errno_name(errno_of(&e)),
            self.log.len(),
            &self.log[self.log.len().saturating_sub(5)..]
        )
    }

    pub fn write(&mut self, off: u64, data: &[u8]) {
        if let Err(e) = self.file.write_all_at(data, off) {
            self.fail(format!("pwrite of {} bytes at {off:#x}", data.len()), e);
        }
        self.model[off as usize..off as usize + data.len()].copy_from_slice(data);
        self.log.push(Op::Write {
            off,
            len: data.len() as u64,
        });
    }

    pub fn punch(&mut self, off: u64, len: u64) {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = fallocate(&self.file, mode, off, len) {
            self.fail(
                format!("fallocate(PUNCH_HOLE) of {len} bytes at {off:#x}"),
                e,
            );
        }
        let end = (off + len).min(self.size());
        if off < end {
            self.model[off as usize..end as usize].fill(0);
        }
        self.log.push(Op::Punch { off, len });
    }

    /// ZERO_RANGE inside the disk.
    pub fn zero(&mut self, off: u64, len: u64, keep_size: bool) {
        assert!(
            off + len <= self.size(),
            "test bug: zero range past the end"
        );
        let mut mode = libc::FALLOC_FL_ZERO_RANGE;
        if keep_size {
            mode |= libc::FALLOC_FL_KEEP_SIZE;
        }
        if let Err(e) = fallocate(&self.file, mode, off, len) {
            self.fail(
                format!("fallocate(ZERO_RANGE) of {len} bytes at {off:#x}"),
                e,
            );
        }
        self.model[off as usize..(off + len) as usize].fill(0);
        self.log.push(Op::Zero {
            off,
            len,
            keep_size,
        });
    }

    /// `ftruncate` to a larger size; the new area must read as zeros.
    pub fn grow(&mut self, to: u64) {
        let from = self.size();
        assert!(to > from);
        if let Err(e) = self.file.set_len(to) {
            self.fail(format!("ftruncate from {from} to {to}"), e);
        }
        let st = self.file.metadata().unwrap().len();
        assert_eq!(st, to, "size after ftruncate({to}) (was {from})");
        self.model.resize(to as usize, 0);
        self.log.push(Op::Grow { from, to });
    }

    pub fn fsync(&mut self) {
        if let Err(e) = self.file.sync_all() {
            self.fail("fsync".into(), e);
        }
        self.log.push(Op::Fsync);
    }

    /// Closes (flush) and opens again.
    pub fn reopen(&mut self) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        self.file = f; // the old descriptor is closed here
        self.log.push(Op::Reopen);
    }

    /// The operations that touched byte `at`, for failure messages.
    pub fn history_at(&self, at: u64) -> String {
        history(&self.log, at)
    }

    /// Panics with the history of the first differing byte unless `got` equals the model.
    pub fn assert_matches(&self, what: &str, got: &[u8]) {
        assert_model(what, &self.model, got, |at| self.history_at(at));
    }

    /// Reads a range back with O_DIRECT (from the daemon) and compares with the model.
    pub fn verify_range_direct(&self, off: u64, len: u64) {
        let start = off / 4096 * 4096;
        let end = (off + len).min(self.size());
        let f = open_direct(&self.path).unwrap();
        let got = read_direct_at(&f, start, (end - start) as usize)
            .unwrap_or_else(|e| panic!("O_DIRECT read at {start:#x}: {e}"));
        let want = &self.model[start as usize..end as usize];
        if let Some(d) = first_difference(want, &got) {
            panic!(
                "reading back {}..{} with O_DIRECT after {} operations: {d}; \
                 operations on the first byte: {}",
                start,
                end,
                self.log.len(),
                first_diff_offset(want, &got)
                    .map(|i| self.history_at(start + i as u64))
                    .unwrap_or_default()
            );
        }
    }

    /// The whole disk through the mount (cached and O_DIRECT) equals the model.
    pub fn verify_through_mount(&self) {
        self.assert_matches(
            "NAME.raw read through the mount (page cache)",
            &read_cached(&self.path),
        );
        self.assert_matches(
            "NAME.raw read through the mount (O_DIRECT)",
            &read_direct(&self.path),
        );
    }
}

/// The operations of `log` that touched byte `at`, for failure messages.
pub fn history(log: &[Op], at: u64) -> String {
    let hits: Vec<String> = log
        .iter()
        .enumerate()
        .filter(|(_, o)| o.touches(at))
        .map(|(i, o)| format!("#{i} {o:?}"))
        .collect();
    if hits.is_empty() {
        "no operation touched it (initial content)".into()
    } else {
        hits.join(", ")
    }
}

pub fn first_diff_offset(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

pub fn assert_model(what: &str, model: &[u8], got: &[u8], history: impl Fn(u64) -> String) {
    if let Some(d) = first_difference(model, got) {
        let at = first_diff_offset(model, got).unwrap_or(0) as u64;
        panic!(
            "{what} differs from the model: {d}; operations on that byte: {}",
            history(at)
        );
    }
}

// ---------------------------------------------------------------------------------------
// QEMU's view
// ---------------------------------------------------------------------------------------

/// `qemu-img check --output=json` (exit status 0 clean, 2 corruptions, 3 leaks).
pub fn qemu_check(image: &Path) -> (Value, Out) {
    let out = run_in(
        &dir_of(image),
        "qemu-img",
        &["check", "--output=json", absolute(image).to_str().unwrap()],
    );
    let v = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img check printed no JSON ({e}): {}", out.describe()));
    (v, out)
}

fn field(v: &Value, name: &str) -> u64 {
    v.get(name).and_then(Value::as_u64).unwrap_or(0)
}

/// `qemu-img check`: no corruptions, no leaks, no check errors.
pub fn assert_check_clean(image: &Path) {
    let (v, out) = qemu_check(image);
    for f in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            field(&v, f),
            0,
            "qemu-img check of {}: {f} = {}\n{}",
            image.display(),
            field(&v, f),
            out.describe()
        );
    }
    assert!(out.ok(), "qemu-img check failed: {}", out.describe());
}

/// `qemu-img check`: no corruptions and no check errors (leaks are allowed, as after a
/// crash). Returns the JSON.
pub fn assert_no_corruption(image: &Path) -> Value {
    let (v, out) = qemu_check(image);
    for f in ["corruptions", "check-errors"] {
        assert_eq!(
            field(&v, f),
            0,
            "qemu-img check of {}: {f} = {}\n{}",
            image.display(),
            field(&v, f),
            out.describe()
        );
    }
    v
}

/// QEMU's raw rendering of `image` (`qemu-img convert -O raw`), or of its snapshot `id`.
pub fn qemu_render(image: &Path, snapshot_id: Option<&str>) -> Vec<u8> {
    let tmp = crate::common::tempdir();
    let out = tmp.path().join("render.raw");
    let image = absolute(image);
    let mut args: Vec<String> = vec!["convert".into(), "-O".into(), "raw".into()];
    if let Some(id) = snapshot_id {
        args.extend(["-l".into(), format!("snapshot.id={id}")]);
    }
    args.push(image.to_string_lossy().into_owned());
    args.push(out.to_string_lossy().into_owned());
    run_in(&dir_of(&image), "qemu-img", &args).expect_ok();
    std::fs::read(&out).unwrap()
}

/// `qemu-img info --output=json [-U]`.
pub fn info(image: &Path, force_share: bool) -> Value {
    let image = absolute(image);
    let mut args = vec!["info", "--output=json"];
    if force_share {
        args.push("-U");
    }
    let p = image.to_string_lossy().into_owned();
    args.push(&p);
    let out = run_in(&dir_of(&image), "qemu-img", &args).expect_ok();
    serde_json::from_str(&out.stdout).unwrap()
}

/// QEMU's dirty flag of a qcow2 image (`qemu-img info -U`).
pub fn dirty_flag(image: &Path) -> bool {
    info(image, true)["dirty-flag"]
        .as_bool()
        .unwrap_or_else(|| panic!("qemu-img info of {} has no dirty-flag", image.display()))
}

/// `(id, name)` of every internal snapshot, as QEMU lists them.
pub fn snapshot_list(image: &Path) -> Vec<(String, String)> {
    info(image, true)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What must not change while the active disk is written: every snapshot's content (as
/// QEMU renders it) and the bytes of every backing file.
pub struct Frozen {
    snapshots: Vec<(String, String, Vec<u8>)>,
    files: Vec<(PathBuf, Vec<u8>)>,
    image: PathBuf,
}

impl Frozen {
    pub fn record(image: &Path, backing_files: &[&Path]) -> Frozen {
        let snapshots = snapshot_list(image)
            .into_iter()
            .map(|(id, name)| {
                let data = crate::common::qemu_snapshot_raw(image, &id);
                (id, name, data)
            })
            .collect();
        let files = backing_files
            .iter()
            .map(|p| (p.to_path_buf(), std::fs::read(p).unwrap()))
            .collect();
        Frozen {
            snapshots,
            files,
            image: absolute(image),
        }
    }

    pub fn snapshot_count(&self) -> usize {
        self.snapshots.len()
    }

    /// The snapshot files under MNT/snapshots read through a mount equal QEMU's renderings
    /// recorded before.
    pub fn assert_snapshot_files(&self, mnt: &Path) {
        let dir = mnt.join("snapshots");
        for (id, name, data) in &self.snapshots {
            let p = dir.join(format!("{name}.raw"));
            let got = read_cached(&p);
            if let Some(d) = first_difference(data, &got) {
                panic!("snapshot {id} ({name}) read through the mount after writes: {d}");
            }
        }
    }

    /// Snapshots and backing files are unchanged (the mount must be gone).
    pub fn assert_unchanged(&self) {
        let now = snapshot_list(&self.image);
        let before: Vec<(String, String)> = self
            .snapshots
            .iter()
            .map(|(i, n, _)| (i.clone(), n.clone()))
            .collect();
        assert_eq!(now, before, "the snapshot list changed");
        for (id, name, data) in &self.snapshots {
            let got = crate::common::qemu_snapshot_raw(&self.image, id);
            if let Some(d) = first_difference(data, &got) {
                panic!("snapshot {id} ({name}) changed (QEMU's rendering): {d}");
            }
        }
        for (p, data) in &self.files {
            let got = std::fs::read(p).unwrap();
            if let Some(d) = first_difference(data, &got) {
                panic!("backing file {} changed: {d}", p.display());
            }
        }
    }
}

/// The 64-bit big-endian header field at `off` of a qcow2 file.
pub fn header_u64(image: &Path, off: u64) -> u64 {
    let f = File::open(image).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

pub fn header_u32(image: &Path, off: u64) -> u32 {
    let f = File::open(image).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    u32::from_be_bytes(b)
}

pub fn set_header_u64(image: &Path, off: u64, v: u64) {
    let f = OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

/// Whether a one-line error message was printed (exit 1, one non-empty line).
pub fn assert_one_line_error(out: &Out, mentions: &[&str]) {
    assert_eq!(
        out.code(),
        Some(1),
        "expected exit status 1: {}",
        out.describe()
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line error on stderr: {}",
        out.describe()
    );
    for m in mentions {
        assert!(
            lines[0].to_lowercase().contains(&m.to_lowercase()),
            "the error should mention {m:?}: {}",
            out.describe()
        );
    }
}

/// QEMU's raw rendering of the internal snapshot named `name`
/// (`qemu-img convert -l snapshot.name=NAME`).
pub fn qemu_render_snapshot_named(image: &Path, name: &str) -> Vec<u8> {
    let tmp = crate::common::tempdir();
    let out = tmp.path().join("render.raw");
    let image = absolute(image);
    let args = [
        "convert".to_string(),
        "-O".into(),
        "raw".into(),
        "-l".into(),
        format!("snapshot.name={name}"),
        image.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    ];
    run_in(&dir_of(&image), "qemu-img", &args).expect_ok();
    std::fs::read(&out).unwrap()
}

// ---------------------------------------------------------------------------------------
// A QEMU process holding an image open
// ---------------------------------------------------------------------------------------

/// `qemu-storage-daemon` with `image` open read-write through the qcow2 driver (so it
/// holds QEMU's write locks), killed and reaped on drop.
pub struct QemuWriter {
    child: Child,
    err: File,
    image: PathBuf,
}

impl QemuWriter {
    /// Starts the daemon and returns once it holds its locks.
    pub fn start(image: &Path) -> QemuWriter {
        let image = absolute(image);
        let err = tempfile::tempfile().expect("temporary file");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.to_string_lossy().replace(',', ",,")
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=q,file=f")
            .current_dir(dir_of(&image))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err.try_clone().unwrap())
            .spawn()
            .expect("running qemu-storage-daemon");
        let mut q = QemuWriter { child, err, image };
        let locked = wait_until(Duration::from_secs(30), || {
            if !matches!(q.child.try_wait(), Ok(None)) {
                return true;
            }
            // Probing with `qemu-img info` would take locks of its own and could make the
            // daemon's start fail; F_OFD_GETLK only looks.
            write_permission_locked(&q.image)
        });
        if let Ok(Some(s)) = q.child.try_wait() {
            panic!("qemu-storage-daemon exited ({s}): {}", q.stderr());
        }
        assert!(locked, "qemu-storage-daemon took no lock within 30 s");
        q
    }

    fn stderr(&self) -> String {
        let mut f = self.err.try_clone().unwrap();
        let mut s = String::new();
        f.rewind().unwrap();
        let _ = f.read_to_string(&mut s);
        s
    }

    /// Stops the daemon (SIGTERM, then SIGKILL) and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill(self.child.id() as i32, libc::SIGTERM);
            if !wait_until(Duration::from_secs(10), || {
                !matches!(self.child.try_wait(), Ok(None))
            }) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// Whether some process holds QEMU's lock byte for the write permission of `image`
/// (byte 100 + bit 1, locked shared by every holder of that permission).
fn write_permission_locked(image: &Path) -> bool {
    let Ok(f) = File::open(image) else {
        return false;
    };
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 101;
    fl.l_len = 1;
    // SAFETY: F_OFD_GETLK reads and fills the flock we pass; it takes no lock.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    rc == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
}

impl Drop for QemuWriter {
    fn drop(&mut self) {
        self.terminate();
    }
}
