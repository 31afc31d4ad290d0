//! Unlocking a LUKS header with a passphrase, as QEMU does: for each active key slot in
//! order, PBKDF2 of the passphrase with the slot's salt and iterations gives a slot key;
//! it decrypts the slot's key material (the payload cipher, sectors numbered from 0);
//! the anti-forensic merge of that gives a candidate master key, which is the master key
//! when PBKDF2 of it with the header's salt and iterations equals the header's digest.
//!
//! The key material is read through a callback, one slot at a time (at most
//! `MAX_STRIPES` x 64 bytes, 250 KiB), so this module does no I/O of its own. Every secret on the
//! way (slot key, decrypted material, candidate key) is wiped when dropped.

use super::af;
use super::luks::{DIGEST_LEN, LuksHeader, NUM_SLOTS};
use super::secret::MasterKey;
use crate::{Error, ErrorKind, Result};
use zeroize::Zeroizing;

impl LuksHeader {
    /// The master key, from the first active slot the passphrase opens. `read(offset,
    /// buf)` fills `buf` from the image file at byte `offset`. A passphrase that opens no
    /// slot is one `InvalidInput` error, after every active slot was tried.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<MasterKey> {
        let active: Vec<usize> = self.active_slots().collect();
        if active.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the LUKS header has no active key slot: no passphrase can open it",
            ));
        }
        for &i in &active {
            if let Some(key) = self.unlock_slot(i, passphrase, read)? {
                log::debug!("LUKS key slot {i} accepted the passphrase");
                return Ok(key);
            }
        }
        let list: Vec<String> = active.iter().map(|i| i.to_string()).collect();
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "wrong passphrase: it opens none of the active LUKS key slots ({})",
                list.join(", ")
            ),
        ))
    }

    /// The master key if slot `slot` is active and `passphrase` opens it.
    pub fn unlock_slot(
        &self,
        slot: usize,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<MasterKey>> {
        let Some(s) = self.slots.get(slot).filter(|s| s.active) else {
            return Ok(None);
        };
        debug_assert!(slot < NUM_SLOTS);
        let key_len = self.master_key_len as usize;
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        self.hash
            .pbkdf2(passphrase, &s.salt, s.iterations, &mut slot_key);
        let mut material = Zeroizing::new(vec![0u8; self.material_len(s)]);
        let at = self.area.offset + s.material_offset();
        read(at, &mut material).map_err(|e| {
            Error::new(
                e.kind(),
                format!("reading LUKS key slot {slot} material at {at:#x}: {e}"),
            )
        })?;
        let cipher = self
            .spec
            .build(&slot_key)
            .map_err(|e| Error::unsupported(format!("LUKS key slot {slot}: {e}")))?;
        cipher.decrypt(0, &mut material);
        let candidate = af::merge(self.hash, key_len, s.stripes as usize, &material);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(
            &candidate,
            &self.master_key_salt,
            self.master_key_iterations,
            &mut digest,
        );
        if digest != self.master_key_digest {
            return Ok(None);
        }
        Ok(Some(
            MasterKey::from_slice(&candidate).expect("master-key length checked at parse"),
        ))
    }

    /// [`LuksHeader::unlock`] with the whole LUKS area in memory (`area` starts at the
    /// LUKS header).
    pub fn unlock_from_area(&self, area: &[u8], passphrase: &[u8]) -> Result<MasterKey> {
        let start = self.area.offset;
        self.unlock(passphrase, &mut |off, buf| {
            let rel = (off - start) as usize;
            let src = area.get(rel..rel + buf.len()).ok_or_else(|| {
                Error::corrupt(format!(
                    "{} bytes at {off:#x} lie outside the {}-byte LUKS area in memory",
                    buf.len(),
                    area.len()
                ))
            })?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }
}
