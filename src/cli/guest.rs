//! Guest filesystems on the mount's files: which loop devices a file backs and where
//! they are mounted (a revert under a mounted guest filesystem is refused), and freezing
//! a guest filesystem around a snapshot (FIFREEZE/FITHAW) so that it is consistent.

use crate::error::{Error, Result};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The loop devices whose backing file is `file`, as `loopN`.
fn loop_devices_of(file: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (Path::new(backing.trim_end()) == file).then_some(name)
        })
        .collect()
}

/// The filesystems mounted from a loop device (or one of its partitions) that `file`
/// backs, as (device, mount point).
pub fn mounted_from(file: &Path) -> Vec<(String, PathBuf)> {
    let devs = loop_devices_of(file);
    if devs.is_empty() {
        return Vec::new();
    }
    super::mount::mounts()
        .into_iter()
        .filter(|m| {
            let src = m.source.strip_prefix("/dev/").unwrap_or("");
            devs.iter().any(|d| {
                src == d
                    || src
                        .strip_prefix(d.as_str())
                        .is_some_and(|rest| rest.starts_with('p'))
            })
        })
        .map(|m| (m.source, m.mountpoint))
        .collect()
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A guest filesystem frozen for as long as this lives: thawed when dropped, on every
/// path.
pub struct Frozen {
    dir: std::fs::File,
    path: PathBuf,
}

impl Frozen {
    /// Freezes the filesystem mounted at `dir` (it writes everything back first).
    pub fn freeze(dir: &Path) -> Result<Frozen> {
        let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, "opening to freeze", e))?;
        // SAFETY: FIFREEZE on a descriptor we own; the argument is unused.
        if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
            return Err(Error::io(
                dir,
                "freezing the filesystem (FIFREEZE)",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Frozen {
            dir: f,
            path: dir.to_path_buf(),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW on a descriptor we own.
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) } != 0 {
            log::error!(
                "{}: thawing the filesystem (FITHAW): {}",
                self.path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}
