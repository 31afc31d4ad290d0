//! QEMU-compatible image locking: the open-file-description byte-range locks QEMU's
//! file-posix driver takes, so qcow2fs and QEMU processes refuse to change an image the
//! other is using. Byte 100 + n is held while using permission n, byte 200 + n while not
//! sharing it; every lock is a shared (read) lock.

use crate::error::{Error, ErrorKind, Result};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// First lock byte of the permissions an opener holds (QEMU's layout: one byte a
/// permission).
pub const PERM_BASE: i64 = 100;
/// First lock byte of the permissions an opener does not share.
pub const SHARED_BASE: i64 = 200;

/// Permission: read a consistent image.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// Permission: write.
pub const PERM_WRITE: u32 = 1 << 1;
/// Permission: write without changing what the guest reads.
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// Permission: resize.
pub const PERM_RESIZE: u32 = 1 << 3;
const PERM_COUNT: u32 = 4;

fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

fn flock(kind: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: flock is plain data; every field qcow2fs relies on is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_lock(file: &File, byte: i64) -> std::io::Result<()> {
    set_lock_type(file, byte, libc::F_RDLCK as libc::c_short)
}

fn unlock(file: &File, byte: i64) -> std::io::Result<()> {
    set_lock_type(file, byte, libc::F_UNLCK as libc::c_short)
}

fn set_lock_type(file: &File, byte: i64, kind: libc::c_short) -> std::io::Result<()> {
    let fl = flock(kind, byte);
    // SAFETY: F_OFD_SETLK with a valid flock on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn someone_else_locks(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: F_OFD_GETLK fills the flock we pass.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the locks for using `perm` while not sharing `unshared`, then checks that no
/// other process conflicts (as QEMU does). On conflict the caller drops the file, which
/// releases what was taken.
pub fn lock_image(file: &File, path: &Path, perm: u32, unshared: u32) -> Result<()> {
    let io = |e| Error::io(path, "taking the image lock", e);
    for i in 0..PERM_COUNT {
        if perm & (1 << i) != 0 {
            set_lock(file, PERM_BASE + i as i64).map_err(io)?;
        }
        if unshared & (1 << i) != 0 {
            set_lock(file, SHARED_BASE + i as i64).map_err(io)?;
        }
    }
    let busy = |why: String| Err(Error::new(ErrorKind::Busy, why).in_file(path));
    for i in 0..PERM_COUNT {
        if perm & (1 << i) != 0 && someone_else_locks(file, SHARED_BASE + i as i64).map_err(io)? {
            return busy(format!(
                "Failed to get \"{}\" lock: another process (such as QEMU) is using the image and does not allow it (use -o force_share to read it anyway)",
                perm_name(i)
            ));
        }
        if unshared & (1 << i) != 0 && someone_else_locks(file, PERM_BASE + i as i64).map_err(io)? {
            return busy(format!(
                "Failed to get shared \"{}\" lock: another process (such as QEMU) is writing to the image (use -o force_share to read it anyway)",
                perm_name(i)
            ));
        }
    }
    Ok(())
}

/// The locks of a reader that does not let others change the file: QEMU's read-only
/// users (and backing files) take the same.
pub fn lock_reader(file: &File, path: &Path) -> Result<()> {
    lock_image(file, path, PERM_CONSISTENT_READ, PERM_WRITE | PERM_RESIZE)
}

/// The locks of the writer of an image.
pub fn lock_writer(file: &File, path: &Path) -> Result<()> {
    lock_image(
        file,
        path,
        PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        PERM_WRITE | PERM_RESIZE,
    )
}

/// Turns a writer's locks into a reader's (a reopen read-only): this descriptor stops
/// using the write and resize permissions, and keeps not sharing them.
pub fn downgrade_to_reader(file: &File, path: &Path) -> Result<()> {
    for perm in [PERM_WRITE, PERM_RESIZE] {
        unlock(file, PERM_BASE + perm.trailing_zeros() as i64)
            .map_err(|e| Error::io(path, "releasing the write lock", e))?;
    }
    Ok(())
}

/// Moves a reader's locks on `old` to a writer's on `new`, another descriptor of the same
/// file (a reopen read-write). `old` stops not sharing write and resize, so that only
/// other processes' locks are checked; if `new` cannot get the writer's locks, `old`'s
/// are put back and nothing has changed.
pub fn upgrade_to_writer(old: &File, new: &File, path: &Path) -> Result<()> {
    let unshared = [PERM_WRITE, PERM_RESIZE].map(|p| SHARED_BASE + p.trailing_zeros() as i64);
    let restore = || {
        for b in unshared {
            let _ = set_lock(old, b);
        }
    };
    for b in unshared {
        unlock(old, b).map_err(|e| {
            restore();
            Error::io(path, "releasing the read lock", e)
        })?;
    }
    lock_writer(new, path).inspect_err(|_| restore())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_excludes_reader_and_writer_but_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap()
        };
        let r1 = open();
        lock_reader(&r1, &p).unwrap();
        let r2 = open();
        lock_reader(&r2, &p).unwrap();
        let w = open();
        assert_eq!(lock_writer(&w, &p).unwrap_err().kind(), ErrorKind::Busy);
        drop((r1, r2, w));
        let w = open();
        lock_writer(&w, &p).unwrap();
        let r = open();
        let e = lock_reader(&r, &p).unwrap_err();
        assert!(e.to_string().contains("shared \"write\""), "{e}");
        drop((w, r));
        // A reader turns writer while another reader shares the file: refused, and the
        // reader's locks are as before; alone, it becomes the writer, and back.
        let r1 = open();
        lock_reader(&r1, &p).unwrap();
        let other = open();
        lock_reader(&other, &p).unwrap();
        let new = open();
        assert!(upgrade_to_writer(&r1, &new, &p).is_err());
        let w = open();
        assert_eq!(lock_writer(&w, &p).unwrap_err().kind(), ErrorKind::Busy);
        drop((other, new, w));
        let new = open();
        upgrade_to_writer(&r1, &new, &p).unwrap();
        drop(r1);
        assert!(lock_reader(&open(), &p).is_err());
        downgrade_to_reader(&new, &p).unwrap();
        lock_reader(&open(), &p).unwrap();
        assert!(lock_writer(&open(), &p).is_err());
    }
}
