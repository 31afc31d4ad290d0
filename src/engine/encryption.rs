//! An encrypted image's encryption state: what its header says (the LUKS header in the
//! area the full-disk-encryption extension points at, or the legacy AES method), read at
//! open without a key, and the payload cipher once a passphrase (or a cipher the caller
//! made) unlocked it. The engine only keeps this state; `block` encrypts and decrypts
//! guest data with [`Image::crypto`].
//!
//! An image opened without its key still answers every metadata question (`info`,
//! `map`); reading or writing its data needs the cipher, and `block` refuses without it.

use super::image::Image;
use super::metaio::MetaIo;
use crate::crypto::{Crypto, EncryptionInfo, LuksArea, LuksHeader, Method, luks::HEADER_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{CryptMethod, Header};
use crate::format::units::HostOffset;
use std::sync::{Arc, OnceLock};

/// The encryption of one image.
#[derive(Debug)]
pub(crate) struct Encryption {
    info: EncryptionInfo,
    /// The LUKS header (LUKS images only).
    luks: Option<LuksHeader>,
    crypto: OnceLock<Arc<Crypto>>,
}

impl Encryption {
    /// The encryption an image's header names, with its LUKS header parsed and checked
    /// (no key needed); `None` for an image that is not encrypted.
    pub(crate) fn read(io: &MetaIo, header: &Header, file_len: u64) -> Result<Option<Encryption>> {
        let luks = match header.crypt_method {
            CryptMethod::None => return Ok(None),
            CryptMethod::Aes => None,
            CryptMethod::Luks => {
                // Header validation guarantees the extension for LUKS.
                let (offset, length) = header.fde.ok_or_else(|| {
                    Error::corrupt("LUKS encryption without its header extension")
                        .in_file(io.path())
                })?;
                let area = LuksArea { offset, length };
                // Read only what lies inside the file; the parser reports an area that
                // runs past its end before looking at the bytes.
                let want = (HEADER_LEN as u64).min(length);
                let bytes = if offset.saturating_add(want) <= file_len {
                    io.read("the LUKS header", HostOffset(offset), want as usize)?
                } else {
                    Vec::new()
                };
                let h = LuksHeader::parse(&bytes, area, file_len)
                    .map_err(|e| Error::from(e).in_file(io.path()))?;
                Some(h)
            }
        };
        let info = match &luks {
            Some(h) => EncryptionInfo::Luks(h.info()),
            None => EncryptionInfo::legacy_aes(),
        };
        Ok(Some(Encryption {
            info,
            luks,
            crypto: OnceLock::new(),
        }))
    }

    /// What `qemu-img info` shows of it.
    pub(crate) fn info(&self) -> &EncryptionInfo {
        &self.info
    }

    /// The LUKS area (offset and length in the image file), which is metadata.
    pub(crate) fn luks_area(&self) -> Option<LuksArea> {
        self.luks.as_ref().map(|h| h.area)
    }

    /// A short description for messages: "LUKS aes-256-xts-plain64" or "legacy AES".
    fn describe(&self) -> String {
        match &self.luks {
            Some(h) => format!("LUKS {}-{}", h.spec.alg.name(), h.cipher_mode_string()),
            None => "legacy AES".to_string(),
        }
    }
}

impl Image {
    /// What the image's encryption is, as `qemu-img info` shows it; `None` when the image
    /// is not encrypted.
    pub fn encryption(&self) -> Option<&EncryptionInfo> {
        self.encryption.as_ref().map(Encryption::info)
    }

    /// Whether the image is encrypted (locked or not).
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// The payload cipher of an encrypted image once unlocked.
    pub fn crypto(&self) -> Option<&Arc<Crypto>> {
        self.encryption.as_ref().and_then(|e| e.crypto.get())
    }

    /// The LUKS area of a LUKS image.
    pub fn luks_area(&self) -> Option<LuksArea> {
        self.encryption.as_ref().and_then(Encryption::luks_area)
    }

    /// A short description of the encryption ("LUKS aes-256-xts-plain64", "legacy
    /// AES"), for messages; `None` for an image that is not encrypted.
    pub fn encryption_name(&self) -> Option<String> {
        self.encryption.as_ref().map(Encryption::describe)
    }

    /// The cipher of an encrypted image for reading or writing its data: an error that
    /// says how to give a key when it is still locked. `None` for an image that is not
    /// encrypted.
    pub fn data_crypto(&self) -> Result<Option<&Arc<Crypto>>> {
        let Some(e) = &self.encryption else {
            return Ok(None);
        };
        match e.crypto.get() {
            Some(c) => Ok(Some(c)),
            None => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the image is encrypted ({}) and was opened without its key; its data cannot be read or written",
                    e.describe()
                ),
            )
            .in_file(self.path())),
        }
    }

    /// Unlocks an encrypted image with `passphrase`: LUKS tries every active key slot;
    /// the legacy method takes any passphrase (it has no way to check one). The
    /// passphrase is not kept: only the payload cipher is. A wrong passphrase is one
    /// error naming the image. Unlocking an image that is not encrypted does nothing.
    pub fn unlock(&self, passphrase: &[u8]) -> Result<()> {
        let Some(e) = &self.encryption else {
            return Ok(());
        };
        if e.crypto.get().is_some() {
            return Ok(());
        }
        let crypto = match &e.luks {
            Some(h) => {
                let area = h.area;
                let key = h
                    .unlock(passphrase, &mut |off, buf| {
                        let inside = off >= area.offset
                            && off.saturating_add(buf.len() as u64)
                                <= area.offset.saturating_add(area.length);
                        if !inside {
                            return Err(Error::corrupt(format!(
                                "LUKS key material at {off:#x} ({} bytes) lies outside the LUKS area",
                                buf.len()
                            )));
                        }
                        let bytes =
                            self.io
                                .read("LUKS key material", HostOffset(off), buf.len())?;
                        buf.copy_from_slice(&bytes);
                        Ok(())
                    })
                    .map_err(|err| err.in_file(self.path()))?;
                Crypto::luks(h, &key).map_err(|err| err.in_file(self.path()))?
            }
            None => Crypto::legacy_aes(passphrase),
        };
        let _ = e.crypto.set(Arc::new(crypto));
        Ok(())
    }

    /// Gives an encrypted image a payload cipher the caller already holds (a new image
    /// it encrypted with a key of its own, or the same image opened again).
    pub fn set_crypto(&self, crypto: Arc<Crypto>) -> Result<()> {
        let Some(e) = &self.encryption else {
            return Err(Error::invalid("the image is not encrypted").in_file(self.path()));
        };
        let expected = if e.luks.is_some() {
            Method::Luks
        } else {
            Method::LegacyAes
        };
        if crypto.method() != expected {
            return Err(Error::invalid(format!(
                "a {:?} cipher does not fit an image encrypted with {}",
                crypto.method(),
                e.describe()
            ))
            .in_file(self.path()));
        }
        let _ = e.crypto.set(crypto);
        Ok(())
    }
}
