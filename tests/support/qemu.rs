//! QEMU, the oracle: running qemu-img and qemu-io, QEMU's raw renderings of a disk, a
//! snapshot or a layer, its `map` and `info` JSON, the dirty extents of a persistent
//! bitmap (qemu-nbd and nbdinfo), the one `qemu-img check` assertion every write scenario
//! ends with, and a QEMU process that holds an image open.
//!
//! Every tool runs with the image's directory as its working directory, because QEMU
//! resolves a relative external data-file name against the CWD (qcow2fs resolves it
//! against the image's directory).

use super::files::{SiblingCopy, absolute, image_dir, tempdir};
use super::process::{Finished, run, run_in, shown, signal, tail, wait_until};
use serde_json::Value;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `qemu-img args` in `dir`; must succeed; returns its stdout.
pub fn qemu_img<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> String {
    String::from_utf8(run(dir, "qemu-img", args).stdout).expect("qemu-img printed non-UTF-8")
}

fn qemu_io_args<S: AsRef<str>>(image: &Path, extra: &[&str], cmds: &[S]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for c in cmds {
        args.push("-c".to_string());
        args.push(c.as_ref().to_string());
    }
    args.push(absolute(image).to_string_lossy().into_owned());
    args
}

/// `qemu-io -c CMD... image` in the image's directory. qemu-io exits 0 even when a
/// command fails, so its output must also be free of error words.
pub fn qemu_io<S: AsRef<str>>(image: &Path, cmds: &[S]) {
    qemu_io_with(image, &[], cmds)
}

/// [`qemu_io`] with `extra` options before the commands (`-f raw`, `-r`).
pub fn qemu_io_with<S: AsRef<str>>(image: &Path, extra: &[&str], cmds: &[S]) {
    if cmds.is_empty() {
        return;
    }
    let out = run(
        &image_dir(image),
        "qemu-io",
        &qemu_io_args(image, extra, cmds),
    );
    let text = out.all_output();
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported a failure: {}",
        out.describe()
    );
}

/// Like [`qemu_io`], but the last command is expected to kill qemu-io (`abort`), leaving
/// the image as a crash would (dirty bit set, lazy refcounts not written back).
pub fn qemu_io_crash<S: AsRef<str>>(image: &Path, cmds: &[S]) {
    let args = qemu_io_args(image, &[], cmds);
    let out = run_in(
        &image_dir(image),
        "qemu-io",
        &args,
        super::process::COMMAND_LIMIT,
    );
    assert_eq!(
        out.signal(),
        Some(libc::SIGABRT),
        "`qemu-io {}` was expected to abort: {}",
        shown(&args),
        out.describe()
    );
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

/// QEMU's rendering of snapshot `snapshot` (ID or name) of `image`, at the snapshot's own
/// disk size.
pub fn qemu_snapshot_raw(image: &Path, snapshot: &str) -> Vec<u8> {
    let copy = qemu_snapshot_applied(image, snapshot);
    qemu_raw_as(&copy.path, Some("qcow2"))
}

/// The VM state saved with snapshot `snapshot` (ID or name) of `image`, `len` bytes, as
/// QEMU reads it back: on a copy reverted to the snapshot (so its L1 table is the
/// snapshot's and the disk has the snapshot's size), `qemu-io -r -c 'read -b -v 0 N'`
/// (N is `len` in whole sectors), whose hex dump is turned back into bytes.
pub fn qemu_vmstate(image: &Path, snapshot: &str, len: u64) -> Vec<u8> {
    let copy = qemu_snapshot_applied(image, snapshot);
    let n = len.next_multiple_of(512);
    let read = format!("read -b -v 0 {n}");
    let path = copy.path.to_string_lossy().into_owned();
    let out = run(
        &image_dir(image),
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", read.as_str(), path.as_str()],
    );
    let mut bytes = Vec::with_capacity(n as usize);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((off, rest)) = line.split_once(':') else {
            continue;
        };
        if off.len() != 8 || !off.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        assert_eq!(
            u64::from_str_radix(off, 16).unwrap(),
            bytes.len() as u64,
            "qemu-io dump line {line:?}"
        );
        // Sixteen "hh " groups after two blanks, then the characters.
        let hex = rest
            .get(2..50)
            .unwrap_or_else(|| panic!("dump line {line:?}"));
        for h in hex.split_whitespace() {
            bytes.push(u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{line:?}")));
        }
    }
    assert_eq!(
        bytes.len() as u64,
        n,
        "qemu-io dumped {} bytes",
        bytes.len()
    );
    bytes.truncate(len as usize);
    bytes
}

fn json(what: &str, out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{what} JSON: {e}\n{out}"))
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
    json("qemu-img map", &out)
}

/// `qemu-img map --output=json -f FORMAT path`.
pub fn qemu_map_json_as(path: &Path, format: &str) -> Value {
    let path = absolute(path);
    let out = qemu_img(
        &image_dir(&path),
        &[
            OsStr::new("map"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new(format),
            path.as_os_str(),
        ],
    );
    json("qemu-img map", &out)
}

/// Every field of an extent `qemu-img map --output=json` prints.
pub const MAP_FIELDS: [&str; 8] = [
    "start",
    "length",
    "depth",
    "present",
    "zero",
    "data",
    "compressed",
    "offset",
];

/// The entries of a `map` JSON output.
pub fn map_json_entries<'a>(what: &str, v: &'a Value) -> &'a [Value] {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: map output is not a JSON array: {v}"))
}

/// Compares two `map --json` outputs, entry for entry, in `fields`; panics at the first
/// difference (or missing entry), naming it and the entry before.
pub fn assert_same_map_fields(what: &str, qemu: &Value, ours: &Value, fields: &[&str]) {
    let (q, o) = (map_json_entries(what, qemu), map_json_entries(what, ours));
    for i in 0..q.len().max(o.len()) {
        let (qe, oe) = (q.get(i), o.get(i));
        let differs: Vec<&str> = match (qe, oe) {
            (Some(qe), Some(oe)) => fields
                .iter()
                .copied()
                .filter(|f| qe.get(f) != oe.get(f))
                .collect(),
            _ => vec!["<entry missing>"],
        };
        if !differs.is_empty() {
            let show = |e: Option<&Value>| e.map_or("none".to_string(), Value::to_string);
            panic!(
                "{what}: map entry {i} differs in {differs:?}\n  qemu-img: {}\n  qcow2fs:  {}\n\
                 ({} entries from qemu-img, {} from qcow2fs; previous entry: {})",
                show(qe),
                show(oe),
                q.len(),
                o.len(),
                show(i.checked_sub(1).and_then(|p| q.get(p)))
            );
        }
    }
}

fn qemu_info_json_args(image: &Path, extra: &[&str]) -> Value {
    let image = absolute(image);
    let mut args: Vec<&OsStr> = vec![OsStr::new("info"), OsStr::new("--output=json")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(image.as_os_str());
    json("qemu-img info", &qemu_img(&image_dir(&image), &args))
}

/// `qemu-img info --output=json image`.
pub fn qemu_info_json(image: &Path) -> Value {
    qemu_info_json_args(image, &[])
}

/// `qemu-img info --output=json -U image`: without taking locks, so it works while the
/// image is mounted read-write.
pub fn qemu_info_json_shared(image: &Path) -> Value {
    qemu_info_json_args(image, &["-U"])
}

/// `qemu-img info --output=json --backing-chain image`: one object per layer, top first.
pub fn qemu_backing_chain_json(image: &Path) -> Vec<Value> {
    match qemu_info_json_args(image, &["--backing-chain"]) {
        Value::Array(v) => v,
        other => vec![other],
    }
}

/// `(id, name)` of every internal snapshot, in table order, as QEMU lists them (without
/// taking locks).
pub fn qemu_snapshots(image: &Path) -> Vec<(String, String)> {
    qemu_info_json_shared(image)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let field = |f: &str| s[f].as_str().expect("snapshot id and name").to_string();
                    (field("id"), field("name"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The snapshot IDs QEMU lists for `image`, in table order.
pub fn qemu_snapshot_ids(image: &Path) -> Vec<String> {
    qemu_snapshots(image)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// QEMU's dirty flag of a qcow2 image (read without taking locks).
pub fn dirty_flag(image: &Path) -> bool {
    qemu_info_json_shared(image)["dirty-flag"]
        .as_bool()
        .unwrap_or_else(|| panic!("qemu-img info of {} has no dirty-flag", image.display()))
}

/// The dirty extents (offset, length) of persistent bitmap `name` of qcow2 `image` as
/// QEMU reads them: qemu-nbd exports the image with the bitmap (`-B`), nbdinfo maps its
/// `qemu:dirty-bitmap:NAME` context. Fails (panics) where QEMU refuses the bitmap.
pub fn qemu_dirty_extents(image: &Path, name: &str) -> Vec<(u64, u64)> {
    let image = absolute(image);
    let map = format!("--map=qemu:dirty-bitmap:{name}");
    let args: Vec<&OsStr> = [
        OsStr::new("--json"),
        OsStr::new(&map),
        OsStr::new("--"),
        OsStr::new("["),
        OsStr::new("qemu-nbd"),
        OsStr::new("-r"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-B"),
        OsStr::new(name),
        image.as_os_str(),
        OsStr::new("]"),
    ]
    .to_vec();
    let out = run(&image_dir(&image), "nbdinfo", &args);
    let v = json("nbdinfo --map", &String::from_utf8_lossy(&out.stdout));
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("nbdinfo --json --map prints a list") {
        let field = |f: &str| e[f].as_u64().expect("offset, length and type");
        if field("type") & 1 == 0 {
            continue;
        }
        let (off, len) = (field("offset"), field("length"));
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => extents.push((off, len)),
        }
    }
    extents
}

/// `qemu-img check --output=json` (exit status 0 clean, 2 corruptions, 3 leaks).
pub fn qemu_check(image: &Path) -> (Value, Finished) {
    let image = absolute(image);
    let out = run_in(
        &image_dir(&image),
        "qemu-img",
        &[
            OsStr::new("check"),
            OsStr::new("--output=json"),
            image.as_os_str(),
        ],
        super::process::COMMAND_LIMIT,
    );
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img check printed no JSON ({e}): {}", out.describe()));
    (v, out)
}

fn assert_zero(image: &Path, v: &Value, out: &Finished, fields: &[&str]) {
    for f in fields {
        let n = v.get(f).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "qemu-img check of {}: {f} = {n}\n{}",
            image.display(),
            out.describe()
        );
    }
}

/// `qemu-img check` finds nothing: no corruptions, no leaks, no check errors.
pub fn assert_check_clean(image: &Path) {
    let (v, out) = qemu_check(image);
    assert_zero(
        image,
        &v,
        &out,
        &[
            "corruptions",
            "leaks",
            "check-errors",
            "corruptions-fixed",
            "leaks-fixed",
        ],
    );
    assert!(out.success(), "qemu-img check failed: {}", out.describe());
}

/// `qemu-img check` finds no corruption and no check error; leaked clusters are allowed
/// (as after a crash or a failed write-back). Returns the JSON.
pub fn assert_no_corruption(image: &Path) -> Value {
    let (v, out) = qemu_check(image);
    assert_zero(image, &v, &out, &["corruptions", "check-errors"]);
    v
}

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
            .current_dir(image_dir(&image))
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
        tail(&s, 3000)
    }

    /// Stops the daemon (SIGTERM, then SIGKILL) and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id() as i32, libc::SIGTERM);
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
