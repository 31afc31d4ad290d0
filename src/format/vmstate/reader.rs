//! Random access to the stream's bytes, and the parser's cursor over them. The stream may
//! be gigabytes inside an image, so it is never loaded whole: the cursor keeps one window
//! of at most [`WINDOW`] bytes and skips page data without reading it.

use super::error::{Result, VmStateError};
use std::io;

/// A source of stream bytes: fill `buf` from stream offset `offset`, entirely or fail.
/// The parser never asks for bytes at or past the length it was given.
pub trait ReadAt {
    /// Fills all of `buf` from stream offset `offset`, or fails.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

/// A closure as a byte source: `FnReader(|buf, off| file.read_exact_at(buf, off))`.
pub struct FnReader<F>(pub F);

impl<F: Fn(&mut [u8], u64) -> io::Result<()>> ReadAt for FnReader<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (self.0)(buf, offset)
    }
}

/// The largest read the cursor makes, and the most it buffers.
pub const WINDOW: usize = 64 * 1024;

/// Reads `buf.len()` bytes at `offset` from `src`, naming the offset on failure.
pub(crate) fn read_exact<R: ReadAt + ?Sized>(src: &R, buf: &mut [u8], offset: u64) -> Result<()> {
    src.read_at(buf, offset)
        .map_err(|source| VmStateError::Read {
            offset,
            len: buf.len(),
            source,
        })
}

/// A position in the stream with a read-ahead window.
pub(crate) struct Cursor<'a, R: ReadAt + ?Sized> {
    src: &'a R,
    len: u64,
    pos: u64,
    win: Vec<u8>,
    win_start: u64,
    /// Set when a read needed bytes past the end of the stream.
    truncated: bool,
}

impl<'a, R: ReadAt + ?Sized> Cursor<'a, R> {
    pub(crate) fn new(src: &'a R, len: u64) -> Self {
        Cursor {
            src,
            len,
            pos: 0,
            win: Vec::new(),
            win_start: 0,
            truncated: false,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.len
    }

    /// Whether some read ran into the end of the stream.
    pub(crate) fn hit_end(&self) -> bool {
        self.truncated
    }

    fn truncated(&mut self, field: &str, at: u64, need: u64) -> VmStateError {
        self.truncated = true;
        VmStateError::invalid(
            field,
            at,
            format!(
                "needs {need} bytes but the stream ends at {:#x} (truncated)",
                self.len
            ),
        )
    }

    /// Makes `[at, at + n)` (n <= WINDOW) available in the window.
    fn window(&mut self, field: &str, at: u64, n: usize) -> Result<&[u8]> {
        debug_assert!(n <= WINDOW);
        if at.checked_add(n as u64).is_none_or(|end| end > self.len) {
            return Err(self.truncated(field, at, n as u64));
        }
        let in_window =
            at >= self.win_start && at + n as u64 <= self.win_start + self.win.len() as u64;
        if !in_window {
            let take = (self.len - at).min(WINDOW as u64) as usize;
            self.win.resize(take, 0);
            self.win_start = at;
            if let Err(e) = read_exact(self.src, &mut self.win, at) {
                self.win.clear();
                return Err(e);
            }
        }
        let s = (at - self.win_start) as usize;
        Ok(&self.win[s..s + n])
    }

    /// The next `n` bytes (n <= WINDOW), consumed.
    pub(crate) fn bytes(&mut self, field: &str, n: usize) -> Result<&[u8]> {
        let at = self.pos;
        self.window(field, at, n)?;
        self.pos += n as u64;
        let s = (at - self.win_start) as usize;
        Ok(&self.win[s..s + n])
    }

    /// `n` bytes at `at` (n <= WINDOW) without moving the cursor.
    pub(crate) fn peek_at(&mut self, field: &str, at: u64, n: usize) -> Result<&[u8]> {
        self.window(field, at, n)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.bytes(field, 1)?[0])
    }

    pub(crate) fn be16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(
            self.bytes(field, 2)?.try_into().unwrap(),
        ))
    }

    pub(crate) fn be32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.bytes(field, 4)?.try_into().unwrap(),
        ))
    }

    pub(crate) fn be64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(
            self.bytes(field, 8)?.try_into().unwrap(),
        ))
    }

    /// A byte-counted string (u8 length, then the bytes), as QEMU writes names.
    pub(crate) fn counted_str(&mut self, field: &str) -> Result<String> {
        let n = self.u8(field)? as usize;
        let b = self.bytes(field, n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// Moves past `n` bytes without reading them.
    pub(crate) fn skip(&mut self, field: &str, n: u64) -> Result<()> {
        if n > self.remaining() {
            return Err(self.truncated(field, self.pos, n));
        }
        self.pos += n;
        Ok(())
    }

    /// Moves to `at` (at most the stream length).
    pub(crate) fn seek(&mut self, at: u64) {
        self.pos = at.min(self.len);
    }

    /// Reads `len` bytes at the cursor into a new vector (the caller bounds `len`).
    pub(crate) fn read_vec(&mut self, field: &str, len: usize) -> Result<Vec<u8>> {
        let at = self.pos;
        if len as u64 > self.remaining() {
            return Err(self.truncated(field, at, len as u64));
        }
        let mut v = vec![0; len];
        read_exact(self.src, &mut v, at)?;
        self.pos += len as u64;
        Ok(v)
    }

    /// The first offset in `[from, to)` where `pattern` (at most 16 bytes) starts and
    /// `accept` agrees, reading the range one window at a time.
    pub(crate) fn find(
        &mut self,
        pattern: &[u8],
        from: u64,
        to: u64,
        mut accept: impl FnMut(&mut Self, u64) -> Result<bool>,
    ) -> Result<Option<u64>> {
        let to = to.min(self.len);
        let mut at = from;
        let step = (WINDOW - 16) as u64;
        while at < to {
            // Candidates starting in [at, at + step), with room for the pattern after.
            let n = (to - at).min(step);
            let avail = (self.len - at).min(n + pattern.len() as u64 - 1) as usize;
            let hits: Vec<u64> = {
                let w = self.window("scan", at, avail)?;
                w.windows(pattern.len())
                    .enumerate()
                    .filter(|&(i, s)| (i as u64) < n && s == pattern)
                    .map(|(i, _)| at + i as u64)
                    .collect()
            };
            for hit in hits {
                if accept(self, hit)? {
                    return Ok(Some(hit));
                }
            }
            at += n;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_source_refuses_reads_past_its_end() {
        let data = [1u8, 2, 3, 4];
        let mut buf = [0u8; 2];
        data[..].read_at(&mut buf, 2).unwrap();
        assert_eq!(buf, [3, 4]);
        assert!(data[..].read_at(&mut buf, 3).is_err());
        assert!(data[..].read_at(&mut buf, u64::MAX).is_err());
    }

    #[test]
    fn cursor_reads_across_windows_and_reports_truncation() {
        let data: Vec<u8> = (0..3 * WINDOW).map(|i| (i % 251) as u8).collect();
        let mut c = Cursor::new(&data, data.len() as u64);
        c.skip("x", WINDOW as u64 - 2).unwrap();
        let v = c.be32("x").unwrap();
        let i = WINDOW - 2;
        let expect = u32::from_be_bytes([
            (i % 251) as u8,
            ((i + 1) % 251) as u8,
            ((i + 2) % 251) as u8,
            ((i + 3) % 251) as u8,
        ]);
        assert_eq!(v, expect);
        c.seek(data.len() as u64 - 3);
        let e = c.be32("tail field").unwrap_err();
        assert_eq!(e.offset(), data.len() as u64 - 3);
        assert!(e.to_string().contains("tail field"), "{e}");
    }

    #[test]
    fn find_sees_patterns_that_straddle_windows() {
        let mut data = vec![0u8; 2 * WINDOW + 100];
        let at = WINDOW - 16 - 2; // straddles the first scan step
        data[at..at + 3].copy_from_slice(b"abc");
        data[2 * WINDOW + 50..2 * WINDOW + 53].copy_from_slice(b"abc");
        let mut c = Cursor::new(&data, data.len() as u64);
        let len = data.len() as u64;
        let first = c.find(b"abc", 0, len, |_, _| Ok(true)).unwrap();
        assert_eq!(first, Some(at as u64));
        let second = c.find(b"abc", 0, len, |_, h| Ok(h != at as u64)).unwrap();
        assert_eq!(second, Some(2 * WINDOW as u64 + 50));
        assert_eq!(c.find(b"abc", 0, at as u64, |_, _| Ok(true)).unwrap(), None);
    }
}
