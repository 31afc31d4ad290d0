//! The expected state of a disk under test, from the operations the test performed: a raw
//! model that receives the same writes, punches, zero ranges and growths as the mounted
//! disk (with the history of each byte for failure messages), and what must stay frozen
//! while the disk is written (every snapshot as QEMU renders it, every backing file).
//!
//! Nothing here decides what is correct from qcow2fs's own code.

use super::bytes::{first_diff_offset, first_difference};
use super::fileio::{
    errno_name, errno_of, fallocate, open_direct, read_cached, read_direct, read_direct_at,
};
use super::files::absolute;
use super::qemu::{qemu_snapshot_raw, qemu_snapshots};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
            &read_direct(&self.path, 1 << 20),
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

pub fn assert_model(what: &str, model: &[u8], got: &[u8], history: impl Fn(u64) -> String) {
    if let Some(d) = first_difference(model, got) {
        let at = first_diff_offset(model, got).unwrap_or(0) as u64;
        panic!(
            "{what} differs from the model: {d}; operations on that byte: {}",
            history(at)
        );
    }
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
        let snapshots = qemu_snapshots(image)
            .into_iter()
            .map(|(id, name)| {
                let data = qemu_snapshot_raw(image, &id);
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
        let now = qemu_snapshots(&self.image);
        let before: Vec<(String, String)> = self
            .snapshots
            .iter()
            .map(|(i, n, _)| (i.clone(), n.clone()))
            .collect();
        assert_eq!(now, before, "the snapshot list changed");
        for (id, name, data) in &self.snapshots {
            let got = qemu_snapshot_raw(&self.image, id);
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
