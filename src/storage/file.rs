//! A host file accessed with pread/pwrite, and the one way qcow2fs opens files an image
//! or a user names: without blocking, and only if they are regular files.

use super::{Access, Extent, Storage};
use parking_lot::{RwLock, RwLockReadGuard};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// What a file is, in words, for the message that refuses it.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (for writing too with `write`) if it is a regular file. The open itself
/// never blocks (O_NONBLOCK: a FIFO would wait for a writer), the type is checked on the
/// opened descriptor (so a file swapped in between is not missed), and only then is the
/// descriptor made blocking again. Anything else is refused with an error that says what
/// the file is.
pub fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    let not_regular = |ft| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}, not a regular file", kind_of(ft)),
        )
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        // Opening a FIFO for writing without a reader, or a device without its driver,
        // fails before the type can be checked: name the type instead of the errno.
        Err(e) => {
            return Err(match std::fs::metadata(path) {
                Ok(md) if !md.is_file() => not_regular(md.file_type()),
                _ => e,
            });
        }
    };
    let md = file.metadata()?;
    if !md.is_file() {
        return Err(not_regular(md.file_type()));
    }
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// A host file. The descriptor can be replaced while in use (a reopen for writing opens
/// the same file again with other flags and swaps it in).
#[derive(Debug)]
pub struct FileStorage {
    file: RwLock<File>,
}

impl FileStorage {
    /// A store over an open file.
    pub fn new(file: File) -> Self {
        FileStorage {
            file: RwLock::new(file),
        }
    }

    /// The open file, for locking it.
    pub fn file(&self) -> RwLockReadGuard<'_, File> {
        self.file.read()
    }

    /// A new descriptor for the same file (the same inode, whatever its path is now),
    /// opened for reading and, with `write`, writing.
    pub fn reopen(&self, write: bool) -> io::Result<File> {
        let fd = self.file.read().as_raw_fd();
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{fd}"))
    }

    /// Uses `new` from now on and returns the descriptor it replaces.
    pub fn replace(&self, new: File) -> File {
        std::mem::replace(&mut *self.file.write(), new)
    }

    fn lseek(&self, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a file descriptor we own; only the returned position is used.
        let r = unsafe { libc::lseek(self.file.read().as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.file.read().read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.read().write_all_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.read().sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.read().metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.read().set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.read().metadata()?.blocks() * 512)
    }

    fn as_file(&self) -> Option<&FileStorage> {
        Some(self)
    }

    fn access(&self) -> Option<Access> {
        let md = self.file.read().metadata().ok()?;
        Some(Access {
            uid: md.uid(),
            gid: md.gid(),
            mode: md.mode() & 0o777,
        })
    }

    fn extent(&self, off: u64, len: u64) -> io::Result<Extent> {
        let end = self.len()?;
        if off >= end {
            return Ok(Extent::Hole(len));
        }
        let Some(data) = self.lseek(off, libc::SEEK_DATA)? else {
            return Ok(Extent::Hole(len));
        };
        if data > off {
            return Ok(Extent::Hole((data - off).min(len)));
        }
        let hole = self.lseek(off, libc::SEEK_HOLE)?.unwrap_or(end);
        Ok(Extent::Data((hole - off).min(len)))
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a file descriptor we own.
        let r = unsafe {
            libc::fallocate(
                self.file.read().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => super::write_zeros(self, off, len),
            _ => Err(e),
        }
    }
}
