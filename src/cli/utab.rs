//! An entry in libmount's utab (`/run/mount/utab`) for each mount root makes, so that
//! root's `umount MNT` runs the `umount.fuse.qcow2fs` helper (libmount looks for a
//! type-specific helper only when the mount has a utab entry, or when the user who
//! mounted it unmounts it). The helper returns only once the daemon has finished, so an
//! image is released when `umount` returns.
//!
//! The file format and locking are libmount's: one line per mount,
//! `SRC=... TARGET=... ROOT=/ OPTS=x-qcow2fs`, fields with spaces, tabs, newlines and
//! backslashes written as `\ooo`; changes under an exclusive flock of `utab.lock`,
//! written to a temporary file that is renamed over the old one.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

const DIR: &str = "/run/mount";
const UTAB: &str = "/run/mount/utab";
const LOCK: &str = "/run/mount/utab.lock";

/// A field as libmount writes it.
fn mangle(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// Runs `change` on the utab's lines under libmount's lock and writes the result back.
fn update(change: impl FnOnce(&mut Vec<String>)) -> std::io::Result<()> {
    std::fs::create_dir_all(DIR)?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)?;
    // SAFETY: flock on a descriptor we own; released when it is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let text = match std::fs::read_to_string(UTAB) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let before = lines.clone();
    change(&mut lines);
    if lines == before {
        return Ok(());
    }
    let tmp = format!("{UTAB}.qcow2fs.{}", std::process::id());
    let mut f = File::create(&tmp)?;
    for l in &lines {
        writeln!(f, "{l}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, UTAB)
}

fn target_field(mountpoint: &Path) -> String {
    format!("TARGET={}", mangle(mountpoint.as_os_str().as_bytes()))
}

/// Records the mount of `source` at `mountpoint` (an older entry for the same mount
/// point is replaced).
pub fn register(source: &str, mountpoint: &Path) -> std::io::Result<()> {
    let target = target_field(mountpoint);
    let line = format!(
        "SRC={} {target} ROOT=/ OPTS=x-qcow2fs",
        mangle(source.as_bytes())
    );
    update(|lines| {
        lines.retain(|l| !l.split(' ').any(|f| f == target));
        lines.push(line);
    })
}

/// Removes the entry of the qcow2fs mount at `mountpoint`, if there is one.
pub fn unregister(mountpoint: &Path) -> std::io::Result<()> {
    let target = target_field(mountpoint);
    update(|lines| {
        lines.retain(|l| {
            !(l.split(' ').any(|f| f == target) && l.split(' ').any(|f| f == "OPTS=x-qcow2fs"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_mangled_as_libmount_does() {
        assert_eq!(mangle(b"/a b\\c"), "/a\\040b\\134c");
        assert_eq!(target_field(Path::new("/mnt/x y")), "TARGET=/mnt/x\\040y");
    }
}
