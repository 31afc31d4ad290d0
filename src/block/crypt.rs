//! Guest data of encrypted qcow2 layers: decrypted after it is read and encrypted before
//! it is written, one 512-byte sector at a time, with the image's own cipher and the
//! sector numbers QEMU uses (LUKS: the host offset in the file that holds the data;
//! legacy AES: the guest offset). Compressed clusters are stored unencrypted and never
//! come here.
//!
//! Reads decrypt in place in the caller's buffer (only a partial sector at either end
//! goes through a sector-sized buffer). Writes encrypt into a per-thread scratch buffer,
//! never into the caller's data, or in place where the buffer is the writer's own (the
//! copy-on-write span). Writes to an encrypted image are whole sectors: a write that is
//! not is widened with the current content of its first and last sector, under the
//! range lock the write already holds.

use super::qcow2::{Qcow2Layer, Shared};
use crate::crypto::{Crypto, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::format::units::HostOffset;
use std::cell::RefCell;

const SECTOR: u64 = SECTOR_SIZE as u64;

/// Bytes encrypted per write request: the size of each thread's scratch buffer.
const SCRATCH_BYTES: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    /// Fills `dst` with the guest data stored at `host` for guest offset `guest`,
    /// decrypted when the image is encrypted.
    pub(crate) fn read_guest(&self, dst: &mut [u8], host: HostOffset, guest: u64) -> Result<()> {
        let Some(crypto) = self.image.data_crypto()? else {
            return self.read_data(dst, host);
        };
        self.check_sector_phase(host, guest)?;
        let lead = (host.0 % SECTOR) as usize;
        let mut done = 0usize;
        if lead != 0 || dst.len() < SECTOR_SIZE {
            // The first sector is only partly wanted.
            let n = (SECTOR_SIZE - lead).min(dst.len());
            self.read_partial(
                crypto,
                &mut dst[..n],
                host.0 - lead as u64,
                guest - lead as u64,
                lead,
            )?;
            done = n;
        }
        let whole = (dst.len() - done) / SECTOR_SIZE * SECTOR_SIZE;
        if whole > 0 {
            let d = &mut dst[done..done + whole];
            let (h, g) = (host.0 + done as u64, guest + done as u64);
            self.read_data(d, HostOffset(h))?;
            self.crypt_result(crypto.decrypt(h, g, d))?;
            done += whole;
        }
        if done < dst.len() {
            let (h, g) = (host.0 + done as u64, guest + done as u64);
            self.read_partial(crypto, &mut dst[done..], h, g, 0)?;
        }
        Ok(())
    }

    /// Decrypts the sector at `host` (guest offset `guest`) and copies `dst.len()` bytes
    /// of it from byte `from`.
    fn read_partial(
        &self,
        crypto: &Crypto,
        dst: &mut [u8],
        host: u64,
        guest: u64,
        from: usize,
    ) -> Result<()> {
        let mut sector = [0u8; SECTOR_SIZE];
        self.read_data(&mut sector, HostOffset(host))?;
        self.crypt_result(crypto.decrypt(host, guest, &mut sector))?;
        dst.copy_from_slice(&sector[from..from + dst.len()]);
        Ok(())
    }

    /// Writes guest data for guest offset `guest` at `host`, encrypted when the image is
    /// encrypted (whole sectors then). `buf` is left as it is.
    pub(crate) fn write_guest(&self, buf: &[u8], host: HostOffset, guest: u64) -> Result<()> {
        let Some(crypto) = self.image.data_crypto()? else {
            return self.write_data(buf, host);
        };
        self.check_sector_phase(host, guest)?;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut done = 0;
            while done < buf.len() {
                let n = (buf.len() - done).min(SCRATCH_BYTES);
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                let s = &mut scratch[..n];
                s.copy_from_slice(&buf[done..done + n]);
                let (h, g) = (host.0 + done as u64, guest + done as u64);
                self.crypt_result(crypto.encrypt(h, g, s))?;
                self.write_data(s, HostOffset(h))?;
                done += n;
            }
            Ok(())
        })
    }

    /// [`Shared::write_guest`] for a buffer the caller no longer needs: encrypted in
    /// place (it holds ciphertext afterwards).
    pub(crate) fn write_guest_consuming(
        &self,
        buf: &mut [u8],
        host: HostOffset,
        guest: u64,
    ) -> Result<()> {
        let Some(crypto) = self.image.data_crypto()? else {
            return self.write_data(buf, host);
        };
        self.check_sector_phase(host, guest)?;
        self.crypt_result(crypto.encrypt(host.0, guest, buf))?;
        self.write_data(buf, host)
    }

    /// Host and guest offsets of guest data lie at the same place within a sector (host
    /// clusters are cluster-aligned); anything else is a damaged mapping.
    fn check_sector_phase(&self, host: HostOffset, guest: u64) -> Result<()> {
        if !(host.0 ^ guest).is_multiple_of(SECTOR) {
            return Err(Error::corrupt(format!(
                "guest offset {guest:#x} maps to host offset {host}, not at the same place in a 512-byte sector; encrypted data cannot be located"
            ))
            .in_file(self.image.path()));
        }
        Ok(())
    }

    fn crypt_result(&self, r: Result<()>) -> Result<()> {
        r.map_err(|e| e.in_file(self.image.path()))
    }
}

impl Qcow2Layer {
    /// For an encrypted image, a write of `buf` at `off` widened to whole sectors with
    /// their current content: the new buffer and its offset. `None` when the write needs
    /// no widening. The caller holds the range lock of the clusters `buf` touches, which
    /// cover the widened range.
    pub(crate) fn widen_to_sectors(&self, buf: &[u8], off: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let end = off + buf.len() as u64;
        if !self.image().is_encrypted()
            || (off.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR))
        {
            return Ok(None);
        }
        let a = off - off % SECTOR;
        let b = end.next_multiple_of(SECTOR);
        let mut span = vec![0u8; (b - a) as usize];
        if a != off {
            self.read_unlocked(&mut span[..SECTOR_SIZE], a)?;
        }
        if b != end && (b - SECTOR != a || a == off) {
            let last = span.len() - SECTOR_SIZE;
            self.read_unlocked(&mut span[last..], b - SECTOR)?;
        }
        let at = (off - a) as usize;
        span[at..at + buf.len()].copy_from_slice(buf);
        Ok(Some((span, a)))
    }
}
