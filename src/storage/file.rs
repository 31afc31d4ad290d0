//! A host file accessed with pread/pwrite.

use super::{Extent, Storage};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    pub fn new(file: File) -> Self {
        FileStorage { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn lseek(&self, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a file descriptor we own; only the returned position is used.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, whence) };
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
            match self.file.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
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
                self.file.as_raw_fd(),
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
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }
}
