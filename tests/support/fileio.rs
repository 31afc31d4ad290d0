//! File I/O the way a guest or a user does it through a mount: positional reads to the
//! end, O_DIRECT with aligned buffers (served by the daemon, not the page cache),
//! fallocate, lseek, dropping cached pages, and errno values named in messages.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The errno of an I/O error (-1 when it has none).
pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// `errno N (description)`, for messages.
pub fn errno_name(e: i32) -> String {
    format!("errno {e} ({})", std::io::Error::from_raw_os_error(e))
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `fallocate(fd, mode, off, len)`.
pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
}

/// `truncate(2)` by path (no descriptor: the file system decides alone).
pub fn truncate(path: &Path, size: u64) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::truncate(c.as_ptr(), size as libc::off_t) })
}

/// `utimensat(path, now)` (touch without a descriptor).
pub fn touch(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path; NULL times means "now".
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) })
}

/// `lseek(fd, off, whence)`: the new offset, or the errno.
pub fn lseek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: lseek on an open descriptor; no memory is touched.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

/// The data extents of `path` as (start, end), walked with SEEK_DATA and SEEK_HOLE from 0.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Ok(d) = lseek(&f, pos, libc::SEEK_DATA) else {
            break;
        };
        let h = lseek(&f, d, libc::SEEK_HOLE).unwrap();
        assert!(
            h > d && h <= size,
            "{}: data at {d:#x}, hole at {h:#x}",
            path.display()
        );
        out.push((d, h));
        pos = h;
    }
    out
}

/// Drops the file's pages from the page cache (POSIX_FADV_DONTNEED).
pub fn drop_cached_pages(f: &File) {
    // SAFETY: fadvise on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// A page-aligned heap buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// At least `len` bytes (a whole number of pages), zeroed.
    pub fn new(len: usize) -> AlignedBuf {
        let size = len.max(1).next_multiple_of(4096);
        let layout = std::alloc::Layout::from_size_align(size, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        AlignedBuf { ptr, layout }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

// SAFETY: the buffer is plain memory owned by the value.
unsafe impl Send for AlignedBuf {}

pub fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `len` bytes at `off` (4 KiB aligned) with O_DIRECT, i.e. from the daemon, not
/// the page cache. Returns fewer bytes only at the end of the file.
pub fn read_direct_at(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = AlignedBuf::new(len);
    let mut got = 0;
    while got < len {
        let want = (len - got).next_multiple_of(4096);
        let n = f.read_at(&mut buf.as_mut()[got..got + want], off + got as u64)?;
        got += n;
        // Short of a whole page: the end of the file.
        if n == 0 || !n.is_multiple_of(4096) {
            break;
        }
    }
    Ok(buf.as_mut()[..got.min(len)].to_vec())
}

/// The whole file read with O_DIRECT in `chunk`-byte aligned reads (a 4 KiB multiple).
pub fn read_direct(path: &Path, chunk: usize) -> Vec<u8> {
    let f = open_direct(path).unwrap_or_else(|e| panic!("open O_DIRECT {}: {e}", path.display()));
    let mut out = Vec::new();
    loop {
        let part = read_direct_at(&f, out.len() as u64, chunk).unwrap_or_else(|e| {
            panic!(
                "O_DIRECT read of {} at {:#x} (+{chunk}): {e}",
                path.display(),
                out.len()
            )
        });
        out.extend_from_slice(&part);
        if part.len() < chunk {
            break;
        }
    }
    out
}

/// Reads `len` bytes at `off` (fewer at the end of the file).
pub fn pread_full(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// The whole file through the page cache (a fresh open).
pub fn read_cached(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Opens `path` for writing (and reading, with `read_too`).
pub fn open_write(path: &Path, read_too: bool) -> std::io::Result<File> {
    OpenOptions::new().read(read_too).write(true).open(path)
}
