//! A store that wraps another and fails on command, so tests can check what an I/O error,
//! a full disk or a crash does to readers and writers without root or special devices.
//!
//! Each armed fault names an operation, a byte range and an errno; a matching call first
//! lets `skip` matches through, then fails (all later matches too, unless the fault was
//! armed with [`FaultStorage::fail_once`]). `len` never fails.

use super::{Extent, Storage};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

/// The store operations a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `set_len`.
    SetLen,
}

#[derive(Debug)]
struct Fault {
    op: FaultOp,
    /// Byte range `[start, end)` a read or write must overlap (ignored for flush/set_len).
    start: u64,
    end: u64,
    errno: i32,
    skip: u64,
    once: bool,
    fired: bool,
}

/// A [`Storage`] that forwards to `inner` except where a fault is armed.
#[derive(Debug)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    faults: Mutex<Vec<Fault>>,
    /// Calls that were failed, by operation.
    failed: Mutex<Vec<(FaultOp, u64)>>,
}

impl FaultStorage {
    /// A store that passes everything to `inner` until a fault is set.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        FaultStorage {
            inner,
            faults: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
        }
    }

    /// Fails every `op` that touches `[start, end)` with `errno`, after letting `skip`
    /// such calls succeed.
    pub fn fail(&self, op: FaultOp, start: u64, end: u64, errno: i32, skip: u64) {
        self.arm(op, start, end, errno, skip, false);
    }

    /// Like [`FaultStorage::fail`] for every offset: the store "breaks" after `skip`
    /// successful calls of `op`.
    pub fn fail_after(&self, op: FaultOp, skip: u64, errno: i32) {
        self.arm(op, 0, u64::MAX, errno, skip, false);
    }

    /// Fails only the first matching call (after `skip`), as a transient error would.
    pub fn fail_once(&self, op: FaultOp, start: u64, end: u64, errno: i32, skip: u64) {
        self.arm(op, start, end, errno, skip, true);
    }

    fn arm(&self, op: FaultOp, start: u64, end: u64, errno: i32, skip: u64, once: bool) {
        self.faults.lock().push(Fault {
            op,
            start,
            end,
            errno,
            skip,
            once,
            fired: false,
        });
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        self.faults.lock().clear();
    }

    /// The calls failed so far: operation and offset (0 for flush and set_len).
    pub fn failures(&self) -> Vec<(FaultOp, u64)> {
        self.failed.lock().clone()
    }

    fn check(&self, op: FaultOp, off: u64, len: u64) -> io::Result<()> {
        let mut faults = self.faults.lock();
        let end = off.saturating_add(len.max(1));
        for f in faults.iter_mut() {
            let ranged = matches!(op, FaultOp::Read | FaultOp::Write);
            if f.op != op || (ranged && (end <= f.start || off >= f.end)) {
                continue;
            }
            if f.once && f.fired {
                continue;
            }
            if f.skip > 0 {
                f.skip -= 1;
                continue;
            }
            f.fired = true;
            self.failed.lock().push((op, off));
            return Err(io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.check(FaultOp::Read, off, buf.len() as u64)?;
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(FaultOp::Write, off, buf.len() as u64)?;
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.check(FaultOp::Flush, 0, 0)?;
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check(FaultOp::SetLen, 0, 0)?;
        self.inner.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }

    fn extent(&self, off: u64, len: u64) -> io::Result<Extent> {
        self.check(FaultOp::Read, off, len)?;
        self.inner.extent(off, len)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(FaultOp::Write, off, len)?;
        self.inner.punch_hole(off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn faults_match_op_range_and_skip() {
        let s = FaultStorage::new(Arc::new(MemStorage::new(vec![7u8; 4096])));
        s.fail(FaultOp::Read, 1024, 2048, libc::EIO, 1);
        let mut b = [0u8; 512];
        assert_eq!(s.read_at(&mut b, 0).unwrap(), 512);
        assert_eq!(s.read_at(&mut b, 1024).unwrap(), 512, "first match skipped");
        let e = s.read_at(&mut b, 1536).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(s.read_at(&mut b, 1024).is_err(), "stays failed");
        s.write_at(&b, 1024).unwrap();
        s.clear();
        assert!(s.read_at(&mut b, 1024).is_ok());

        s.fail_once(FaultOp::Write, 0, u64::MAX, libc::ENOSPC, 0);
        assert_eq!(
            s.write_at(&b, 0).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        s.write_at(&b, 0).unwrap();
        s.fail_after(FaultOp::Flush, 0, libc::EIO);
        assert!(s.flush().is_err());
        assert_eq!(s.failures().len(), 4);
    }
}
