//! The file operations of the mount as plain functions over a disk, which tests call
//! directly: allocated bytes, SEEK_DATA/SEEK_HOLE, fallocate.

use crate::block::BlockDev;
use crate::error::Error;
use fuser::Errno;

/// The errno a reply carries for `e`.
pub fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// Bytes of `dev` that hold data (not holes), for `st_blocks`.
pub fn allocated_bytes(dev: &dyn BlockDev) -> crate::Result<u64> {
    if let Some(known) = dev.data_bytes() {
        return known;
    }
    let size = dev.size();
    let mut off = 0;
    let mut total = 0;
    while off < size {
        let s = dev.status(off, size - off, false)?;
        let len = s.len.max(1).min(size - off);
        if !s.zero {
            total += len;
        }
        off += len;
    }
    Ok(total)
}

/// Lowers the calling thread's CPU and I/O priority, so that work in the background
/// (counting a file's allocated bytes) does not slow the requests being served.
pub(crate) fn background_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
}

/// The `whence` answer for SEEK_DATA / SEEK_HOLE: the first offset at or after `off` that
/// starts data (or a hole). `None` means ENXIO (no data at or after `off`).
pub fn seek(dev: &dyn BlockDev, off: u64, want_data: bool) -> crate::Result<Option<u64>> {
    let size = dev.size();
    if off >= size {
        return Ok(None);
    }
    let mut cur = off;
    while cur < size {
        // Probing the host file only costs anything in preallocated images, whose data
        // clusters may be holes (as qemu-img map reports them).
        let s = dev.status(cur, size - cur, true)?;
        let len = s.len.max(1).min(size - cur);
        let is_data = !s.zero;
        if is_data == want_data {
            return Ok(Some(cur));
        }
        cur += len;
    }
    // Past the last extent: there is an implicit hole at the end of the file.
    Ok(if want_data { None } else { Some(size) })
}

/// `fallocate` on a disk file: punching holes and zeroing ranges become qcow2 zero
/// clusters or deallocation; plain allocation grows the disk if asked to.
pub fn fallocate(dev: &dyn BlockDev, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
    let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
    let size = dev.size();
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    if mode & !known != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let log = |e: Error| {
        log::error!("fallocate({mode:#x}) of {length} bytes at {offset:#x}: {e:#}");
        errno(&e)
    };
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
        if !keep_size {
            return Err(Errno::EINVAL);
        }
        let end = end.min(size);
        if offset < end {
            dev.write_zeroes(offset, end - offset, true).map_err(log)?;
        }
        return Ok(());
    }
    if end > size && !keep_size {
        dev.resize(end).map_err(log)?;
    }
    if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
        let end = end.min(dev.size());
        if offset < end {
            dev.write_zeroes(offset, end - offset, false).map_err(log)?;
        }
    }
    Ok(())
}
