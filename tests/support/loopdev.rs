//! Loop devices over files (usually a disk inside a qcow2fs mount): [`LoopDev`] detaches
//! its device on drop, [`LoopMount`] mounts the file system on it and unmounts it first.

use super::files::canonical_or_same;
use super::mount::PlainMount;
use super::process::run_timeout;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LOSETUP_LIMIT: Duration = Duration::from_secs(60);

/// A loop device attached to a file, detached on drop.
pub struct LoopDev {
    /// The device, e.g. `/dev/loop3` (empty once detached).
    pub dev: String,
    file: PathBuf,
}

impl LoopDev {
    /// `losetup -f --show FILE`.
    pub fn attach(file: &Path) -> LoopDev {
        LoopDev::attach_with(file, &[])
    }

    /// `losetup -f --show -r FILE` (a read-only device).
    pub fn attach_read_only(file: &Path) -> LoopDev {
        LoopDev::attach_with(file, &["-r"])
    }

    fn attach_with(file: &Path, extra: &[&str]) -> LoopDev {
        let out = run_timeout(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(extra)
                .arg(file),
            LOSETUP_LIMIT,
        )
        .expect_success();
        let dev = out.stdout_text().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev {
            dev,
            file: canonical_or_same(file),
        }
    }

    /// Detaches now, asserting success.
    pub fn detach(mut self) {
        let dev = std::mem::take(&mut self.dev);
        run_timeout(Command::new("losetup").arg("-d").arg(&dev), LOSETUP_LIMIT).expect_success();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if self.dev.is_empty() {
            return;
        }
        // Detach only while the device still shows our file: once released it may already
        // serve another test.
        let r = run_timeout(
            Command::new("losetup")
                .args(["--noheadings", "--output", "BACK-FILE"])
                .arg(&self.dev),
            LOSETUP_LIMIT,
        );
        if r.success() && r.stdout_text().trim() == self.file.to_string_lossy() {
            let d = run_timeout(
                Command::new("losetup").arg("-d").arg(&self.dev),
                LOSETUP_LIMIT,
            );
            if !d.success() {
                eprintln!("cleanup: {}", d.describe());
            }
        }
    }
}

/// The file system in a file, mounted through a loop device; on drop it is unmounted,
/// then the device detached.
pub struct LoopMount {
    // Field order is drop order: the mount goes before its device.
    pub mount: PlainMount,
    pub dev: LoopDev,
}

impl LoopMount {
    /// Attaches `file` (read-only with `read_only`) and mounts it at `dir` with `options`
    /// (plus `ro` with `read_only`); panics with mount's output on failure.
    pub fn new(file: &Path, dir: &Path, read_only: bool, options: &str) -> LoopMount {
        let dev = if read_only {
            LoopDev::attach_read_only(file)
        } else {
            LoopDev::attach(file)
        };
        let mut opts = if read_only {
            "ro".to_string()
        } else {
            String::new()
        };
        if !options.is_empty() {
            if !opts.is_empty() {
                opts.push(',');
            }
            opts.push_str(options);
        }
        let mount = PlainMount::new(&dev.dev, dir, &opts);
        LoopMount { mount, dev }
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.mount.dir
    }

    /// Unmounts and detaches now, asserting success.
    pub fn unmount(self) {
        let LoopMount { mount, dev } = self;
        mount.unmount();
        dev.detach();
    }
}
