//! Helpers shared by the integration tests: running qemu-img and qemu-io, QEMU as the
//! oracle (raw renderings, `map` and `info` JSON), the `qcow2fs` binary, byte-exact
//! comparisons that report the first difference, and the scenario corpus in [`corpus`]
//! (built with [`images`] and [`patch`]).
//!
//! Every qemu tool runs with the image's directory as its working directory, because QEMU
//! resolves a relative external data-file name against the CWD (qcow2fs resolves it
//! against the image's directory; see checklist section 13).

#![allow(dead_code)]

#[macro_use]
pub mod corpus;
pub mod images;
pub mod patch;

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
