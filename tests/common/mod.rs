//! Helpers shared by the integration tests: running qemu-img and qemu-io, QEMU as the
//! oracle (raw renderings, `map` and `info` JSON), the `qcow2fs` binary, byte-exact
//! comparisons that report the first difference, and the scenario corpus in [`corpus`]
//! (built with [`images`] and [`patch`]), and
//! migration streams for the VM-state parser ([`vmstream`]).
//!
//! Every qemu tool runs with the image's directory as its working directory, because QEMU
//! resolves a relative external data-file name against the CWD (qcow2fs resolves it
//! against the image's directory; see checklist section 13).

#![allow(dead_code)]

#[macro_use]
pub mod corpus;
pub mod images;
pub mod patch;
pub mod vmstream;

use serde_json::Value;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// The last `max` characters of a tool's output, for panic messages.
fn tail(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let n = s.chars().count();
    if n <= max {
        s.into_owned()
    } else {
        format!("...{}", s.chars().skip(n - max).collect::<String>())
    }
}

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

/// Runs `program args` in `dir` and returns its output, whatever its exit status.
pub fn run_raw<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs `program args` in `dir`; panics with its stderr (and stdout) unless it succeeds.
pub fn run<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S]) -> Output {
    let out = run_raw(dir, program, args);
    if !out.status.success() {
        panic!(
            "`{program} {}` in {} failed ({}):\nstderr: {}\nstdout: {}",
            shown(args),
            dir.display(),
            out.status,
            tail(&out.stderr, 4000),
            tail(&out.stdout, 2000)
        );
    }
    out
}

/// `qemu-img args` in `dir`; returns its stdout.
pub fn qemu_img<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> String {
    String::from_utf8(run(dir, "qemu-img", args).stdout).expect("qemu-img printed non-UTF-8")
}

fn qemu_io_args<S: AsRef<str>>(image: &Path, cmds: &[S]) -> Vec<String> {
    let mut args = Vec::with_capacity(cmds.len() * 2 + 1);
    for c in cmds {
        args.push("-c".to_string());
        args.push(c.as_ref().to_string());
    }
    args.push(image.to_string_lossy().into_owned());
    args
}

/// `qemu-io -c CMD... image` in `dir` (a relative `image` is relative to `dir`). qemu-io
/// prints failures on stdout, so its output is captured and shown only on failure.
pub fn qemu_io<S: AsRef<str>>(dir: &Path, image: &Path, cmds: &[S]) {
    if cmds.is_empty() {
        return;
    }
    run(dir, "qemu-io", &qemu_io_args(image, cmds));
}

/// Like [`qemu_io`], but the last command is expected to kill qemu-io (`abort`), leaving
/// the image as a crash would (dirty bit set, lazy refcounts not written back).
pub fn qemu_io_crash<S: AsRef<str>>(dir: &Path, image: &Path, cmds: &[S]) {
    use std::os::unix::process::ExitStatusExt;
    let args = qemu_io_args(image, cmds);
    let out = run_raw(dir, "qemu-io", &args);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "`qemu-io {}` was expected to abort, got {}:\n{}",
        shown(&args),
        out.status,
        tail(&out.stdout, 2000)
    );
}

/// The directory qemu tools run in for `image`: the image's own directory.
pub fn image_dir(image: &Path) -> PathBuf {
    let abs = absolute(image);
    abs.parent().expect("image path has a parent").to_path_buf()
}

/// `path` made absolute against the current directory (no symlink resolution, so the
/// names QEMU prints stay comparable with ours).
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap().join(path)
    }
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qcow2fs-test-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// QEMU's rendering of `image` (any format QEMU probes) as raw bytes.
pub fn qemu_raw(image: &Path) -> Vec<u8> {
    qemu_raw_as(image, None)
}

/// QEMU's rendering of `image`, read with format `format` (`Some("raw")`, `Some("qcow2")`)
/// or probed (`None`).
pub fn qemu_raw_as(image: &Path, format: Option<&str>) -> Vec<u8> {
    let image = absolute(image);
    let out_dir = tempdir();
    let out = out_dir.path().join("render.raw");
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert")];
    if let Some(f) = format {
        args.extend([OsStr::new("-f"), OsStr::new(f)]);
    }
    args.extend([
        OsStr::new("-O"),
        OsStr::new("raw"),
        image.as_os_str(),
        out.as_os_str(),
    ]);
    qemu_img(&image_dir(&image), &args);
    std::fs::read(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()))
}

/// Copies `src` to `dst` keeping its holes exactly where they are (SEEK_DATA/SEEK_HOLE),
/// so that `qemu-img map` of the copy sees the same data/hole layout as the original.
pub fn sparse_copy(src: &Path, dst: &Path) {
    let s = File::open(src).unwrap_or_else(|e| panic!("opening {}: {e}", src.display()));
    let d = File::create(dst).unwrap_or_else(|e| panic!("creating {}: {e}", dst.display()));
    let len = s.metadata().unwrap().len();
    d.set_len(len).unwrap();
    let fd = s.as_raw_fd();
    let mut pos: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, (hole as u64).min(len));
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], at).unwrap();
            d.write_all_at(&buf[..n], at).unwrap();
            at += n as u64;
        }
        pos = end;
    }
}

/// A copy of `image` in its own directory (so relative backing names still resolve),
/// removed when dropped.
pub struct SiblingCopy {
    pub path: PathBuf,
}

impl SiblingCopy {
    pub fn new(image: &Path, tag: &str) -> SiblingCopy {
        let image = absolute(image);
        let name = format!(
            ".{}-{tag}-{}-{}.qcow2",
            image.file_name().unwrap().to_string_lossy(),
            std::process::id(),
            unique()
        );
        let path = image_dir(&image).join(name);
        sparse_copy(&image, &path);
        SiblingCopy { path }
    }
}

impl Drop for SiblingCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A sibling copy of `image` reverted to snapshot `snapshot` (ID or name, as QEMU looks
/// it up) with `qemu-img snapshot -a`, i.e. at the snapshot's own disk size.
pub fn qemu_snapshot_applied(image: &Path, snapshot: &str) -> SiblingCopy {
    let copy = SiblingCopy::new(image, "snapshot");
    qemu_img(
        &image_dir(image),
        &[
            OsStr::new("snapshot"),
            OsStr::new("-a"),
            OsStr::new(snapshot),
            copy.path.as_os_str(),
        ],
    );
    copy
}

/// QEMU's rendering of snapshot `snapshot_id` of `image` at the snapshot's own disk size.
pub fn qemu_snapshot_raw(image: &Path, snapshot_id: &str) -> Vec<u8> {
    let copy = qemu_snapshot_applied(image, snapshot_id);
    qemu_raw_as(&copy.path, Some("qcow2"))
}

/// `qemu-img map --output=json image`.
pub fn qemu_map_json(image: &Path) -> Value {
    let image = absolute(image);
    let out = qemu_img(
        &image_dir(&image),
        &[
            OsStr::new("map"),
            OsStr::new("--output=json"),
            image.as_os_str(),
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map JSON: {e}\n{out}"))
}

/// `qemu-img info --output=json image`.
pub fn qemu_info_json(image: &Path) -> Value {
    qemu_info_json_args(image, &[])
}

/// `qemu-img info --output=json --backing-chain image`: one object per layer, top first.
pub fn qemu_backing_chain_json(image: &Path) -> Vec<Value> {
    match qemu_info_json_args(image, &["--backing-chain"]) {
        Value::Array(v) => v,
        other => vec![other],
    }
}

fn qemu_info_json_args(image: &Path, extra: &[&str]) -> Value {
    let image = absolute(image);
    let mut args: Vec<&OsStr> = vec![OsStr::new("info"), OsStr::new("--output=json")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(image.as_os_str());
    let out = qemu_img(&image_dir(&image), &args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info JSON: {e}\n{out}"))
}

/// The snapshot IDs QEMU lists for `image`, in table order.
pub fn qemu_snapshot_ids(image: &Path) -> Vec<String> {
    qemu_info_json(image)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["id"].as_str().expect("snapshot id").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Path of the `qcow2fs` binary under test.
pub fn qcow2fs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2fs")
}

/// Runs `qcow2fs args` in `dir`; panics with its stderr unless it succeeds; returns stdout.
pub fn qcow2fs<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Vec<u8> {
    run(dir, qcow2fs_bin(), args).stdout
}

/// `qcow2fs` output parsed as JSON.
pub fn qcow2fs_json<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Value {
    let out = qcow2fs(dir, args);
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "qcow2fs {} printed invalid JSON: {e}\n{}",
            shown(args),
            tail(&out, 2000)
        )
    })
}

/// Panics unless `got == expected`, naming the first differing offset (and the lengths)
/// instead of dumping the buffers.
pub fn assert_same_bytes(what: &str, expected: &[u8], got: &[u8]) {
    if let Some(msg) = first_difference(expected, got) {
        panic!("{what}: {msg}");
    }
}

/// A description of where `got` first differs from `expected`, or `None` if they match.
pub fn first_difference(expected: &[u8], got: &[u8]) -> Option<String> {
    let common = expected.len().min(got.len());
    let first = expected[..common]
        .iter()
        .zip(&got[..common])
        .position(|(a, b)| a != b);
    let len_note = if expected.len() != got.len() {
        format!(
            "length differs: expected {} ({:#x}) bytes, got {} ({:#x})",
            expected.len(),
            expected.len(),
            got.len(),
            got.len()
        )
    } else {
        String::new()
    };
    match first {
        Some(i) => {
            let end = (i + 16).min(common);
            let last = (i..common)
                .rev()
                .find(|&j| expected[j] != got[j])
                .unwrap_or(i);
            let ndiff = expected[i..=last]
                .iter()
                .zip(&got[i..=last])
                .filter(|(a, b)| a != b)
                .count();
            Some(format!(
                "first difference at offset {i} ({i:#x}): expected {:02x?}, got {:02x?}; \
                 {ndiff} differing bytes up to offset {last:#x}{}{len_note}",
                &expected[i..end],
                &got[i..end],
                if len_note.is_empty() { "" } else { "; " },
            ))
        }
        None if !len_note.is_empty() => Some(len_note),
        None => None,
    }
}

/// Reads all of `dev` through the library API in one call.
pub fn read_all(dev: &dyn qcow2fs::block::BlockDev) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("read_at(0, {}) failed: {e}", buf.len()));
    buf
}

/// Reads all of `dev` in `chunk`-byte pieces (unaligned chunk sizes cross every kind of
/// boundary at a different place), plus a final read running past the end, which must
/// come back zero-filled.
pub fn read_chunked(dev: &dyn qcow2fs::block::BlockDev, chunk: usize) -> Vec<u8> {
    let size = dev.size() as usize;
    let mut out = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        dev.read_at(&mut out[off..off + n], off as u64)
            .unwrap_or_else(|e| panic!("read_at({off:#x}, {n}) failed: {e}"));
        off += n;
    }
    let start = size.saturating_sub(chunk / 2);
    let mut past = vec![0xa5u8; size - start + chunk];
    dev.read_at(&mut past, start as u64)
        .unwrap_or_else(|e| panic!("read_at({start:#x}, {}) failed: {e}", past.len()));
    let (inside, beyond) = past.split_at(size - start);
    assert_same_bytes(
        "read running past the end of the disk (inside part)",
        &out[start..],
        inside,
    );
    if let Some(i) = beyond.iter().position(|&b| b != 0) {
        panic!(
            "read past the end of the disk (size {size:#x}) returned {:#04x} at offset {:#x} instead of zeros",
            beyond[i],
            size + i
        );
    }
    out
}

/// Opens `image` with its backing chain through the library, with default options.
pub fn open(image: &Path) -> qcow2fs::block::Chain {
    qcow2fs::block::open_chain(image, &qcow2fs::block::OpenOptions::default())
        .unwrap_or_else(|e| panic!("open_chain({}) failed: {e}", image.display()))
}

// ==========================================================================================
// Real mounts (used by tests/mount.rs)
//
// Commands run with a time limit, `/proc/self/mountinfo`, finding the daemon that serves a
// mount, and RAII guards that unmount whatever a test mounted (also when it panics):
// [`Mount`] for qcow2fs mounts, [`LoopMount`] for `mount -o loop` of a file inside one.
// Nothing here decides what is correct; the tests compare with QEMU.
// ==========================================================================================

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a mount command may take before it counts as a hang.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A mount still up this long after it was made is torn down by its watchdog (daemon
/// killed, lazy unmount), so a hung daemon fails the test instead of hanging the suite.
pub const MOUNT_WATCHDOG: Duration = Duration::from_secs(300);

/// What a command run with [`run_timeout`] did.
#[derive(Debug)]
pub struct Finished {
    /// What ran, for messages.
    pub command: String,
    /// `None`: it was still running at the time limit and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit code; `None` when killed by a signal or by the time limit.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything known about the run, for a failure message.
    pub fn describe(&self) -> String {
        let status = match self.status {
            None => format!("still running after {:?}, killed", self.elapsed),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            },
        };
        format!(
            "`{}`: {status}\n  stderr: {:?}\n  stdout: {:?}",
            self.command,
            tail(self.stderr.as_bytes(), 2000),
            tail(self.stdout.as_bytes(), 1000)
        )
    }

    /// Panics with [`Finished::describe`] unless the command exited 0.
    pub fn expect_success(self) -> Finished {
        assert!(self.success(), "{}", self.describe());
        self
    }
}

/// Runs `cmd` (stdin from /dev/null) and waits at most `limit` for it to exit; kills it
/// after that. Output goes to anonymous files, not pipes, so a background process that
/// inherits them (a daemon that forgot to detach) cannot make this wait.
pub fn run_timeout(cmd: &mut Command, limit: Duration) -> Finished {
    use std::io::{Read, Seek};
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        shown(&cmd.get_args().collect::<Vec<_>>())
    );
    let out = tempfile::tempfile().expect("creating a temporary file");
    let err = tempfile::tempfile().expect("creating a temporary file");
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
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let read = |mut f: File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        String::from_utf8_lossy(&v).into_owned()
    };
    Finished {
        command,
        status,
        stdout: read(out),
        stderr: read(err),
        elapsed,
    }
}

/// `program args` run in `dir` with [`run_timeout`].
pub fn run_in<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S], limit: Duration) -> Finished {
    run_timeout(Command::new(program).args(args).current_dir(dir), limit)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (`ro,nosuid,...`).
    pub mount_options: String,
    /// Superblock options (`ro,user_id=0,...`).
    pub super_options: String,
}

impl MountInfo {
    /// Whether `opt` is one of the per-mount or superblock options.
    pub fn has_option(&self, opt: &str) -> bool {
        self.mount_options
            .split(',')
            .chain(self.super_options.split(','))
            .any(|o| o == opt)
    }
}

/// Undoes the `\ooo` octal escapes of mountinfo fields.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this process's mount namespace, in mount order.
pub fn mount_table() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|&x| x == "-")?;
            Some(MountInfo {
                mountpoint: PathBuf::from(unescape_octal(f.get(4)?)),
                mount_options: f.get(5)?.to_string(),
                fstype: f.get(dash + 1)?.to_string(),
                source: unescape_octal(f.get(dash + 2)?),
                super_options: f.get(dash + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// `path` with symlinks resolved when it exists (mount tables hold resolved paths).
pub fn canonical_or_same(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| absolute(path))
}

/// All mounts stacked at exactly `mountpoint`, bottom first.
pub fn mounts_at(mountpoint: &Path) -> Vec<MountInfo> {
    let mp = canonical_or_same(mountpoint);
    mount_table()
        .into_iter()
        .filter(|m| m.mountpoint == mp)
        .collect()
}

/// The visible (topmost) mount at exactly `mountpoint`.
pub fn mount_info(mountpoint: &Path) -> Option<MountInfo> {
    mounts_at(mountpoint).pop()
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name, which may hold spaces.
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to be gone; true if it is.
pub fn wait_pid_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Waits up to `limit` until `cond()` holds; returns whether it did.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The live processes running the qcow2fs binary under test with `mountpoint` among their
/// arguments (as given or resolved): the daemon serving that mount point, found the way
/// an administrator would, without relying on pid files.
pub fn daemon_pids(mountpoint: &Path) -> Vec<i32> {
    let bin = canonical_or_same(Path::new(qcow2fs_bin()));
    let wanted = [absolute(mountpoint), canonical_or_same(mountpoint)];
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(e.path().join("exe")) else {
            continue;
        };
        // A binary rebuilt while its process runs shows as "PATH (deleted)".
        let exe = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        if Path::new(&exe) != bin {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let hit = cmdline
            .split(|&b| b == 0)
            .any(|a| wanted.iter().any(|w| w.as_os_str().as_encoded_bytes() == a));
        if hit && pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Kills `pid` (SIGKILL) after it keeps running past a grace period.
fn ensure_gone(pid: i32, what: &str) {
    if !wait_pid_gone(pid, Duration::from_secs(10)) {
        eprintln!("cleanup: {what} (pid {pid}) still running after unmount; killing it");
        signal(pid, libc::SIGKILL);
        wait_pid_gone(pid, Duration::from_secs(5));
    }
}

/// Unmounts every mount at `mountpoint` whose type is `fstype` (or any type when
/// `None`): `umount`, falling back to `umount -l`. Returns a description of what failed.
pub fn force_unmount(mountpoint: &Path, fstype: Option<&str>) -> Option<String> {
    let ours = |m: &MountInfo| fstype.is_none_or(|t| m.fstype == t);
    let mut problems = Vec::new();
    for _ in 0..8 {
        match mount_info(mountpoint) {
            Some(m) if ours(&m) => {}
            _ => break,
        }
        let r = run_timeout(
            Command::new("umount").arg(mountpoint),
            Duration::from_secs(30),
        );
        if !r.success() {
            problems.push(r.describe());
            let r = run_timeout(
                Command::new("umount").arg("-l").arg(mountpoint),
                Duration::from_secs(30),
            );
            if !r.success() {
                problems.push(r.describe());
            }
        }
    }
    match mount_info(mountpoint) {
        Some(m) if ours(&m) => {
            problems.push(format!("{} is still mounted", mountpoint.display()));
            Some(problems.join("\n"))
        }
        _ if problems.is_empty() => None,
        _ => Some(problems.join("\n")),
    }
}

/// Tears a mount down when its time is up, unless cancelled first (by dropping `cancel`).
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    fn start(mountpoint: PathBuf, daemon: Option<i32>, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: the mount at {} is still up after {limit:?}; killing its \
                     daemon {daemon:?} and unmounting it lazily",
                    mountpoint.display()
                );
                if let Some(pid) = daemon {
                    signal(pid, libc::SIGKILL);
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

/// A qcow2fs mount that is torn down on drop: unmounted (`umount`, then `umount -l`), its
/// daemon waited for and killed if it lingers. Made by running `qcow2fs mount` (daemon
/// mode), `qcow2fs mount -f` (foreground, the child is kept), or by adopting a mount made
/// some other way (`mount -t ...`).
pub struct Mount {
    /// The mount point, resolved.
    pub mountpoint: PathBuf,
    /// The process serving the mount (the daemon, or the foreground child).
    pub daemon: Option<i32>,
    /// The foreground `qcow2fs mount -f` process.
    pub child: Option<Child>,
    /// Output files of the foreground process.
    fg_output: Option<(File, File)>,
    watchdog: Option<Watchdog>,
}

impl Mount {
    /// `qcow2fs mount [-o OPTS] IMAGE MOUNTPOINT` (run in the image's directory); panics
    /// with the command's stderr if it fails or the mount does not appear.
    pub fn new(image: &Path, mountpoint: &Path, options: &[&str]) -> Mount {
        Mount::try_new(image, mountpoint, options).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Mount::new`], returning the reason instead of panicking.
    pub fn try_new(image: &Path, mountpoint: &Path, options: &[&str]) -> Result<Mount, String> {
        let mut args: Vec<&OsStr> = vec![OsStr::new("mount")];
        for o in options {
            args.extend([OsStr::new("-o"), OsStr::new(*o)]);
        }
        args.extend([image.as_os_str(), mountpoint.as_os_str()]);
        Mount::try_command(&image_dir(image), &args, mountpoint)
    }

    /// Runs `qcow2fs ARGS` in `dir`, which must mount something at `mountpoint` and exit 0.
    pub fn try_command<S: AsRef<OsStr>>(
        dir: &Path,
        args: &[S],
        mountpoint: &Path,
    ) -> Result<Mount, String> {
        let r = run_in(dir, qcow2fs_bin(), args, MOUNT_TIMEOUT);
        // Whatever happened, whatever got mounted is cleaned up by the guard.
        let guard = Mount::adopt(mountpoint);
        if !r.success() {
            return Err(format!("mounting failed: {}", r.describe()));
        }
        match mount_info(mountpoint) {
            Some(m) if m.fstype == "fuse.qcow2fs" => Ok(guard),
            other => Err(format!(
                "{} exited 0 but {} is not a qcow2fs mount (mount table: {other:?})",
                r.command,
                mountpoint.display()
            )),
        }
    }

    /// `qcow2fs mount -f [-o OPTS] IMAGE MOUNTPOINT` as a child process; returns once the
    /// mount appears (or with the reason it did not).
    pub fn try_foreground(
        image: &Path,
        mountpoint: &Path,
        options: &[&str],
    ) -> Result<Mount, String> {
        let mut cmd = Command::new(qcow2fs_bin());
        cmd.arg("mount").arg("-f");
        for o in options {
            cmd.arg("-o").arg(o);
        }
        let out = tempfile::tempfile().expect("creating a temporary file");
        let err = tempfile::tempfile().expect("creating a temporary file");
        cmd.arg(image)
            .arg(mountpoint)
            .current_dir(image_dir(image))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(err.try_clone().unwrap());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run qcow2fs mount -f: {e}"))?;
        let pid = child.id() as i32;
        let mut guard = Mount {
            mountpoint: canonical_or_same(mountpoint),
            daemon: Some(pid),
            child: Some(child),
            fg_output: Some((out, err)),
            watchdog: Some(Watchdog::start(
                canonical_or_same(mountpoint),
                Some(pid),
                MOUNT_WATCHDOG,
            )),
        };
        let mut exited = None;
        let up = wait_until(MOUNT_TIMEOUT, || {
            if let Some(s) = guard
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(s);
                return true;
            }
            mount_info(mountpoint).is_some_and(|m| m.fstype == "fuse.qcow2fs")
        });
        if let Some(s) = exited {
            guard.child = None;
            return Err(format!(
                "qcow2fs mount -f exited ({s}) without mounting; stderr: {:?}",
                guard.foreground_stderr()
            ));
        }
        if !up {
            return Err(format!(
                "qcow2fs mount -f: no mount at {} after {MOUNT_TIMEOUT:?}; stderr: {:?}",
                mountpoint.display(),
                guard.foreground_stderr()
            ));
        }
        Ok(guard)
    }

    /// A guard for whatever is (or will be) mounted at `mountpoint` by other means,
    /// served by a qcow2fs daemon found by [`daemon_pids`].
    pub fn adopt(mountpoint: &Path) -> Mount {
        let daemon = daemon_pids(mountpoint).first().copied();
        let mountpoint = canonical_or_same(mountpoint);
        Mount {
            watchdog: Some(Watchdog::start(mountpoint.clone(), daemon, MOUNT_WATCHDOG)),
            mountpoint,
            daemon,
            child: None,
            fg_output: None,
        }
    }

    /// `rel` inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Whether the mount is still up.
    pub fn is_mounted(&self) -> bool {
        mount_info(&self.mountpoint).is_some_and(|m| m.fstype == "fuse.qcow2fs")
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
        use std::io::{Read, Seek};
        match &self.fg_output {
            Some((_, err)) => {
                let mut f = err.try_clone().unwrap();
                let mut s = Vec::new();
                f.rewind().unwrap();
                f.read_to_end(&mut s).unwrap();
                String::from_utf8_lossy(&s).into_owned()
            }
            None => String::new(),
        }
    }

    /// Waits up to `limit` for the foreground process to exit and returns its status.
    pub fn wait_foreground(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("not a foreground mount");
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().expect("waiting for qcow2fs") {
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        if let Some(problem) = force_unmount(&self.mountpoint, Some("fuse.qcow2fs")) {
            eprintln!("cleanup of {}: {problem}", self.mountpoint.display());
        }
        if let Some(mut child) = self.child.take() {
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    eprintln!("cleanup: qcow2fs mount -f still running after unmount; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        } else if let Some(pid) = self.daemon {
            ensure_gone(pid, "qcow2fs daemon");
        }
        // Any other daemon for this mount point (e.g. one started after adopt()).
        for pid in daemon_pids(&self.mountpoint) {
            ensure_gone(pid, "qcow2fs process");
        }
    }
}

/// A file inside a mount, mounted read-only through a loop device (`mount -o loop,ro`);
/// on drop it is unmounted (`umount`, then `umount -l`) and the loop device detached.
pub struct LoopMount {
    pub mountpoint: PathBuf,
    /// The loop device, e.g. `/dev/loop3`.
    pub device: Option<String>,
    file: PathBuf,
}

impl LoopMount {
    /// `mount -o loop,ro[,EXTRA] FILE MOUNTPOINT`; panics with mount's stderr on failure.
    pub fn new(file: &Path, mountpoint: &Path, extra_options: &str) -> LoopMount {
        let mut opts = String::from("loop,ro");
        if !extra_options.is_empty() {
            opts.push(',');
            opts.push_str(extra_options);
        }
        let r = run_timeout(
            Command::new("mount")
                .arg("-o")
                .arg(&opts)
                .arg(file)
                .arg(mountpoint),
            MOUNT_TIMEOUT,
        );
        let device = mount_info(mountpoint)
            .map(|m| m.source)
            .filter(|s| s.starts_with("/dev/loop"));
        let guard = LoopMount {
            mountpoint: canonical_or_same(mountpoint),
            device,
            file: canonical_or_same(file),
        };
        assert!(r.success(), "loop mount failed: {}", r.describe());
        assert!(
            guard.device.is_some(),
            "after {}, no loop device is mounted at {}: {:?}",
            r.command,
            mountpoint.display(),
            mount_info(mountpoint)
        );
        guard
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Some(problem) = force_unmount(&self.mountpoint, None) {
            eprintln!("cleanup of {}: {problem}", self.mountpoint.display());
        }
        let Some(dev) = self.device.clone() else {
            return;
        };
        // Detach the device if it still shows our file (autoclear may have done it).
        let r = run_timeout(
            Command::new("losetup")
                .args(["--noheadings", "--output", "BACK-FILE"])
                .arg(&dev),
            Duration::from_secs(30),
        );
        if r.success() && r.stdout.trim() == self.file.to_string_lossy() {
            let d = run_timeout(
                Command::new("losetup").arg("-d").arg(&dev),
                Duration::from_secs(30),
            );
            if !d.success() {
                eprintln!("cleanup: {}", d.describe());
            }
        }
    }
}

/// A symlink made for the duration of a test (e.g. `/sbin/mount.qcow2fs` to the binary
/// under test), removed on drop if it still points where it was made to point.
pub struct TempSymlink {
    pub link: PathBuf,
    target: PathBuf,
}

impl TempSymlink {
    /// Creates `link` → `target`; fails if `link` already exists (nothing is replaced).
    pub fn new(link: &Path, target: &Path) -> Result<TempSymlink, String> {
        std::os::unix::fs::symlink(target, link).map_err(|e| {
            format!(
                "cannot create the symlink {} -> {}: {e}",
                link.display(),
                target.display()
            )
        })?;
        Ok(TempSymlink {
            link: link.to_path_buf(),
            target: target.to_path_buf(),
        })
    }
}

impl Drop for TempSymlink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.link);
        }
    }
}

/// All regular files under `root` (without lost+found), relative path → content.
pub fn read_tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}
