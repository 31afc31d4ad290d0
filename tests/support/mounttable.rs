//! The mount table as the kernel shows it (`/proc/self/mountinfo`), the qcow2fs daemon
//! serving a mount point (found by its command line, as an administrator would), and
//! unmounting whatever is left at a mount point.

use super::bytes::unescape;
use super::cli::qcow2fs_bin;
use super::files::{absolute, canonical_or_same};
use super::process::{pid_alive, processes, run_timeout};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The file system type of a qcow2fs mount.
pub const FSTYPE: &str = "fuse.qcow2fs";

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
    unescape(s, b'\\', 3, 8)
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

/// Whether a qcow2fs mount is the visible mount at `mountpoint`.
pub fn is_qcow2fs_mount(mountpoint: &Path) -> bool {
    mount_info(mountpoint).is_some_and(|m| m.fstype == FSTYPE)
}

/// The live processes running the qcow2fs binary under test with `mountpoint` among their
/// arguments (as given or resolved): the daemon serving that mount point, found the way
/// an administrator would, without relying on pid files.
pub fn daemon_pids(mountpoint: &Path) -> Vec<i32> {
    let bin = canonical_or_same(Path::new(qcow2fs_bin()));
    let wanted = [absolute(mountpoint), canonical_or_same(mountpoint)];
    let mut pids = Vec::new();
    for (pid, proc_dir) in processes() {
        let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) else {
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
        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
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

/// Unmounts every mount at `mountpoint` whose type is `fstype` (or any type when `None`):
/// `umount`, falling back to `umount -l` and `fusermount3 -uz` (a dead FUSE mount).
/// Fails with what went wrong when such a mount is still there at the end.
pub fn force_unmount(mountpoint: &Path, fstype: Option<&str>) -> Result<(), String> {
    let ours = |m: &MountInfo| fstype.is_none_or(|t| m.fstype == t);
    let mut problems = Vec::new();
    for _ in 0..8 {
        match mount_info(mountpoint) {
            Some(m) if ours(&m) => {}
            _ => return Ok(()),
        }
        for cmd in [&["umount"][..], &["umount", "-l"], &["fusermount3", "-uz"]] {
            let r = run_timeout(
                Command::new(cmd[0]).args(&cmd[1..]).arg(mountpoint),
                Duration::from_secs(30),
            );
            if r.success() {
                break;
            }
            problems.push(r.describe());
        }
    }
    match mount_info(mountpoint) {
        Some(m) if ours(&m) => {
            problems.push(format!("{} is still mounted", mountpoint.display()));
            Err(problems.join("\n"))
        }
        _ => Ok(()),
    }
}
