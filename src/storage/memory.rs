//! An in-memory store, for tests of the engine without files.

use super::Storage;
use parking_lot::RwLock;
use std::io;

#[derive(Debug, Default)]
/// Bytes in memory: a store for tests.
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// A store that holds `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of every byte it holds.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let b = self.bytes.read();
        if off >= b.len() as u64 {
            return Ok(0);
        }
        let n = buf.len().min(b.len() - off as usize);
        buf[..n].copy_from_slice(&b[off as usize..off as usize + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut b = self.bytes.write();
        let end = off as usize + buf.len();
        if b.len() < end {
            b.resize(end, 0);
        }
        b[off as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.write().resize(len as usize, 0);
        Ok(())
    }
}
