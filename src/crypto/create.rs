//! Making a new LUKS area for an image qcow2fs creates, in QEMU's layout: the 592-byte
//! header in the first 4096 bytes, then 8 key-material regions of 4000 stripes each,
//! rounded up to 8 sectors, one after the other from sector 8; the payload offset is
//! where the last one ends, and the area is that long. Slot 0 holds the given master key
//! under the given passphrase; the other slots are inactive.

use super::af;
use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SECTOR_SIZE};
use super::hash::HashAlg;
use super::luks::{
    DIGEST_LEN, KEY_MATERIAL_START_SECTORS, KeySlot, LuksArea, LuksHeader, NUM_SLOTS, SALT_LEN,
    STRIPES, UUID_LEN,
};
use super::secret::MasterKey;
use crate::{Error, ErrorKind, Result};
use zeroize::Zeroizing;

/// What a new LUKS header uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuksParams {
    /// The payload cipher.
    pub spec: CipherSpec,
    /// The hash of PBKDF2 and of the anti-forensic splitter.
    pub hash: HashAlg,
    /// PBKDF2 iterations of the key slot.
    pub slot_iterations: u32,
    /// PBKDF2 iterations of the master key's digest.
    pub master_key_iterations: u32,
}

impl Default for LuksParams {
    /// QEMU's defaults (aes-256, xts, plain64, sha256) with QEMU's minimum iteration
    /// counts (1000), which is enough for a random passphrase that never leaves memory.
    fn default() -> Self {
        LuksParams {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            },
            hash: HashAlg::Sha256,
            slot_iterations: 1000,
            master_key_iterations: 1000,
        }
    }
}

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("reading the system's random source: {e}"),
        )
    })
}

/// A random version 4 UUID in the text form LUKS stores.
fn random_uuid() -> Result<String> {
    let mut u = [0u8; 16];
    random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

/// A LUKS area holding `key` under `passphrase` in slot 0: the parsed header and the
/// bytes to write at `area_offset` in the image file (the header's length is the area's;
/// pass the same offset in the qcow2 encryption extension). Fails for a key of the wrong
/// length, or for a layout QEMU cannot open (key material that is not whole sectors,
/// which 24-byte keys outside XTS give).
pub fn create_luks_area(
    params: &LuksParams,
    key: &MasterKey,
    passphrase: &[u8],
    area_offset: u64,
) -> Result<(LuksHeader, Vec<u8>)> {
    let spec = CipherSpec::new(
        params.spec.alg,
        params.spec.mode,
        params.spec.ivgen,
        params.spec.ivgen_hash,
    )
    .map_err(Error::invalid)?;
    let key_len = spec.master_key_len();
    if key.len() != key_len {
        return Err(Error::invalid(format!(
            "{} {} needs a {key_len}-byte master key, got {}",
            spec.alg.name(),
            spec.mode.name(),
            key.len()
        )));
    }
    let split_len = key_len * STRIPES as usize;
    if !split_len.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::invalid(format!(
            "{} {} key material ({split_len} bytes) is not whole sectors; QEMU cannot open such a header",
            spec.alg.name(),
            spec.mode.name()
        )));
    }
    if params.slot_iterations == 0 || params.master_key_iterations == 0 {
        return Err(Error::invalid("PBKDF2 iteration counts must be at least 1"));
    }
    let slot_sectors =
        (split_len / SECTOR_SIZE).next_multiple_of(KEY_MATERIAL_START_SECTORS as usize) as u64;
    let payload = KEY_MATERIAL_START_SECTORS + NUM_SLOTS as u64 * slot_sectors;
    let area_len = payload as usize * SECTOR_SIZE;

    let mut master_key_salt = [0u8; SALT_LEN];
    random(&mut master_key_salt)?;
    let mut master_key_digest = [0u8; DIGEST_LEN];
    params.hash.pbkdf2(
        key.as_bytes(),
        &master_key_salt,
        params.master_key_iterations,
        &mut master_key_digest,
    );
    let mut slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|i| KeySlot {
        active: false,
        iterations: 0,
        salt: [0; SALT_LEN],
        key_offset_sector: (KEY_MATERIAL_START_SECTORS + i as u64 * slot_sectors) as u32,
        stripes: STRIPES,
    });
    slots[0].active = true;
    slots[0].iterations = params.slot_iterations;
    random(&mut slots[0].salt)?;

    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    params.hash.pbkdf2(
        passphrase,
        &slots[0].salt,
        params.slot_iterations,
        &mut slot_key,
    );
    let mut material = af::split(params.hash, key.as_bytes(), STRIPES as usize)?;
    spec.build(&slot_key)
        .map_err(Error::invalid)?
        .encrypt(0, &mut material);

    let mut uuid = [0u8; UUID_LEN];
    let text = random_uuid()?;
    uuid[..text.len()].copy_from_slice(text.as_bytes());
    let header = LuksHeader {
        area: LuksArea {
            offset: area_offset,
            length: area_len as u64,
        },
        spec,
        hash: params.hash,
        payload_offset_sector: payload as u32,
        master_key_len: key_len as u32,
        master_key_digest,
        master_key_salt,
        master_key_iterations: params.master_key_iterations,
        uuid,
        slots,
    };
    let mut area = vec![0u8; area_len];
    area[..super::luks::HEADER_LEN].copy_from_slice(&header.encode());
    let at = header.slots[0].material_offset() as usize;
    area[at..at + material.len()].copy_from_slice(&material);
    Ok((header, area))
}
