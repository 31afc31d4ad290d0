//! Byte stores with positional I/O only: `&self`, no seek cursor, safe to share between
//! threads. A real file for images, and for tests a memory store and a store that fails
//! on command.

mod fault;
mod file;
pub mod lock;
mod memory;
pub mod remote;

pub use fault::{FaultOp, FaultStorage};
pub use file::{FileStorage, open_regular};
pub use memory::MemStorage;

use std::io;

/// Where a byte range stands in the store's own allocation (holes of sparse files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// This many bytes hold data.
    Data(u64),
    /// This many bytes are a hole (read as zeros, occupy nothing).
    Hole(u64),
}

/// Owner and permission bits of the file behind a store: what a mount that shows the
/// store's bytes may grant at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Owner's user id.
    pub uid: u32,
    /// Owner's group id.
    pub gid: u32,
    /// The permission bits (`0o777` at most).
    pub mode: u32,
}

/// Writes `len` zero bytes at `off`, a MiB at a time.
pub fn write_zeros<S: Storage + ?Sized>(store: &S, off: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        store.write_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A store of bytes addressed by offset.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `off`; fewer only at the end of the store.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `off`, growing the store when it ends past it.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;

    /// Makes everything written so far durable.
    fn flush(&self) -> io::Result<()>;

    /// Length of the store in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Truncates or extends the store to `len` bytes (new bytes read as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Bytes the store really occupies (a sparse file's allocated blocks).
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }

    /// The host file behind the store, if it is one (for locking and reopening it).
    fn as_file(&self) -> Option<&FileStorage> {
        None
    }

    /// Owner and mode of the file behind the store; `None` for stores that are not files
    /// (they restrict nothing).
    fn access(&self) -> Option<Access> {
        None
    }

    /// Whether `[off, off+len)` starts with data or a hole, and for how long (at most
    /// `len`). Stores that do not know report data.
    fn extent(&self, _off: u64, len: u64) -> io::Result<Extent> {
        Ok(Extent::Data(len))
    }

    /// Deallocates a range so it reads as zeros. Stores that cannot write zeros.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        write_zeros(self, off, len)
    }

    /// Fills `buf` from `off`, with zeros past the end of the store.
    fn read_exact_or_zeros(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}
