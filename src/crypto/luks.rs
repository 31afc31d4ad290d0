//! The LUKS version 1 header that starts the area the qcow2 full-disk-encryption
//! extension (0x0537be77) points at: parsed from bytes and checked as QEMU checks it, and
//! more strictly where a hostile header could cost time or memory; encoded back for new
//! images. Key-material offsets count in 512-byte sectors from the start of the area.
//!
//! Layout (big-endian): magic `LUKS\xba\xbe` (6), version 1 (u16), cipher name (32),
//! cipher mode `MODE-IVGEN[:HASH]` (32), hash spec (32), payload offset in sectors (u32),
//! master-key bytes (u32), master-key digest (20), its salt (32), its PBKDF2 iterations
//! (u32), UUID (40), then 8 key slots of 48 bytes: state (u32, 0x00ac71f3 active,
//! 0x0000dead inactive), PBKDF2 iterations (u32), salt (32), key-material sector (u32),
//! anti-forensic stripes (u32). 592 bytes in all.

use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SECTOR_SIZE};
use super::hash::HashAlg;
use crate::format::FormatError;
use crate::format::error::{be16, be32};
use serde::Serialize;

/// The magic that opens a LUKS1 header.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Length of a LUKS1 header with its 8 key slots, in bytes.
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const NUM_SLOTS: usize = 8;
/// A key slot's state field when the slot holds a key.
pub const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// A key slot's state field when the slot is empty.
pub const SLOT_INACTIVE: u32 = 0x0000_dead;
/// Length of the master key's digest, in bytes.
pub const DIGEST_LEN: usize = 20;
/// Length of a PBKDF2 salt, in bytes.
pub const SALT_LEN: usize = 32;
/// Length of the UUID field, in bytes.
pub const UUID_LEN: usize = 40;
const NAME_LEN: usize = 32;
/// The stripes QEMU and cryptsetup write.
pub const STRIPES: u32 = 4000;
/// Where QEMU puts the first key material: 4096 bytes, 8 sectors, after the header.
pub const KEY_MATERIAL_START_SECTORS: u64 = 8;
/// The most stripes a slot may have: what QEMU and cryptsetup always write. It bounds a
/// slot's key material to 250 KiB, so decrypting and merging all 8 slots stays cheap
/// even with the slowest cipher (twofish, about 2 s for all 8).
pub const MAX_STRIPES: u32 = STRIPES;
/// The most PBKDF2 work unlocking may take, counted in HMAC-SHA-256 iterations
/// ([`HashAlg::pbkdf2_work`]), over every active slot and its master-key digest check:
/// 2^28, about 40 s on a 2020s x86_64 core. QEMU's default (`iter-time` 2 s, 2 s of
/// work on the machine that made the image) needs about 2^24 for one slot.
pub const PBKDF2_WORK_LIMIT: u64 = 1 << 28;

/// One of the 8 key slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations that turn the passphrase into the slot's key.
    pub iterations: u32,
    /// PBKDF2 salt of the slot.
    pub salt: [u8; SALT_LEN],
    /// First sector of the slot's key material, from the start of the LUKS area.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes: the key material is this many master keys long.
    pub stripes: u32,
}

impl KeySlot {
    /// Byte offset of the key material from the start of the LUKS area.
    pub fn material_offset(&self) -> u64 {
        self.key_offset_sector as u64 * SECTOR_SIZE as u64
    }
}

/// Where the LUKS area lies in the image file, as the qcow2 header extension says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuksArea {
    /// Byte offset of the LUKS area in the image file.
    pub offset: u64,
    /// Length of the LUKS area in bytes.
    pub length: u64,
}

/// A validated LUKS header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// Where the header lies in the image file.
    pub area: LuksArea,
    /// The payload cipher.
    pub spec: CipherSpec,
    /// The hash of PBKDF2 and of the anti-forensic splitter.
    pub hash: HashAlg,
    /// Where a LUKS volume's payload would start, in 512-byte sectors from the start of
    /// the LUKS area: the key material lies before it (qcow2 keeps the payload elsewhere).
    pub payload_offset_sector: u32,
    /// Length of the master key in bytes.
    pub master_key_len: u32,
    /// PBKDF2 digest of the master key, to check an unlocked key.
    pub master_key_digest: [u8; DIGEST_LEN],
    /// Salt of the master key's digest.
    pub master_key_salt: [u8; SALT_LEN],
    /// PBKDF2 iterations of the master key's digest.
    pub master_key_iterations: u32,
    /// The UUID field as stored (text, NUL-padded); see [`LuksHeader::uuid`].
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub slots: [KeySlot; NUM_SLOTS],
}

/// What `qemu-img info` shows under `encrypt` for a LUKS image (same names, kebab-case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksInfo {
    /// Always `luks`.
    pub format: &'static str,
    /// The cipher's name (`aes-256`).
    pub cipher_alg: &'static str,
    /// The mode's name (`xts`).
    pub cipher_mode: &'static str,
    /// The IV generator's name (`plain64`).
    pub ivgen_alg: &'static str,
    /// The hash of the ESSIV generator, when it is ESSIV.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<&'static str>,
    /// The hash of PBKDF2 and of the anti-forensic splitter.
    pub hash_alg: &'static str,
    /// Always false: the header of a qcow2 image is in the image (QEMU 8.2 and later
    /// show the field).
    pub detached_header: bool,
    /// The UUID as text.
    pub uuid: String,
    /// The payload offset in bytes.
    pub payload_offset: u64,
    /// PBKDF2 iterations of the master key's digest.
    pub master_key_iters: u32,
    /// The key slots, in order.
    pub slots: Vec<SlotInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
/// One key slot as `qemu-img info` shows it.
#[serde(rename_all = "kebab-case")]
pub struct SlotInfo {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (shown for active slots only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    /// Bytes from the start of the LUKS area.
    pub key_offset: u64,
    /// Anti-forensic stripes (shown for active slots only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
}

/// Sectors of key material a slot of `stripes` takes, as QEMU and cryptsetup lay it
/// out: the split key rounded up to sectors, then to the 8-sector header size.
fn material_sectors(key_len: u64, stripes: u64) -> u64 {
    (key_len * stripes)
        .div_ceil(SECTOR_SIZE as u64)
        .next_multiple_of(KEY_MATERIAL_START_SECTORS)
}

/// The NUL-terminated text of a 32- or 40-byte field.
fn text(bytes: &[u8], field: &str, at: u64) -> Result<String, FormatError> {
    let Some(end) = bytes.iter().position(|&b| b == 0) else {
        return Err(FormatError::invalid(
            format!("LUKS {field}"),
            at,
            format!("is not NUL-terminated within its {} bytes", bytes.len()),
        ));
    };
    match std::str::from_utf8(&bytes[..end]) {
        Ok(s) if s.chars().all(|c| c.is_ascii_graphic()) => Ok(s.to_owned()),
        _ => Err(FormatError::invalid(
            format!("LUKS {field}"),
            at,
            format!(
                "{:?} is not a printable ASCII name",
                String::from_utf8_lossy(&bytes[..end])
            ),
        )),
    }
}

impl LuksHeader {
    /// Parses the header from the first bytes of the LUKS area (at least
    /// [`HEADER_LEN`]) and checks it against the area and the image file's length.
    /// Errors name the field and its offset in the image file.
    pub fn parse(bytes: &[u8], area: LuksArea, file_len: u64) -> Result<LuksHeader, FormatError> {
        let at = |off: usize| area.offset.saturating_add(off as u64);
        let area_end = area.offset.checked_add(area.length);
        if area_end.is_none_or(|end| end > file_len) {
            return Err(FormatError::invalid(
                "encryption header extension",
                area.offset,
                format!(
                    "LUKS area of {} bytes at {:#x} runs past the end of the file ({file_len} bytes)",
                    area.length, area.offset
                ),
            ));
        }
        if area.length < HEADER_LEN as u64 {
            return Err(FormatError::invalid(
                "encryption header extension",
                area.offset,
                format!(
                    "LUKS area of {} bytes is shorter than the {HEADER_LEN}-byte LUKS header",
                    area.length
                ),
            ));
        }
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::invalid(
                "LUKS header",
                at(0),
                format!("need {HEADER_LEN} bytes, got {}", bytes.len()),
            ));
        }
        let b = &bytes[..HEADER_LEN];
        if b[..6] != MAGIC {
            return Err(FormatError::invalid(
                "LUKS magic",
                at(0),
                "the encryption area does not start with LUKS\\xba\\xbe",
            ));
        }
        let version = be16(b, 6);
        if version != 1 {
            return Err(FormatError::unsupported(
                "LUKS version",
                at(6),
                format!("version {version} is not supported (only LUKS 1 is, as in QEMU)"),
            ));
        }
        let cipher_name = text(&b[8..40], "cipher name", at(8))?;
        let cipher_mode = text(&b[40..72], "cipher mode", at(40))?;
        let hash_spec = text(&b[72..104], "hash spec", at(72))?;
        let payload_offset_sector = be32(b, 104);
        let master_key_len = be32(b, 108);
        let spec = parse_spec(&cipher_name, &cipher_mode, master_key_len, &at)?;
        let hash = HashAlg::from_name(&hash_spec).ok_or_else(|| {
            FormatError::unsupported(
                "LUKS hash spec",
                at(72),
                format!("hash {hash_spec:?} is not supported ({})", known_hashes()),
            )
        })?;
        let master_key_iterations = be32(b, 164);
        if master_key_iterations == 0 {
            return Err(FormatError::invalid(
                "LUKS master-key iterations",
                at(164),
                "is 0",
            ));
        }
        let slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|i| {
            let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
            KeySlot {
                active: be32(s, 0) == SLOT_ACTIVE,
                iterations: be32(s, 4),
                salt: s[8..40].try_into().unwrap(),
                key_offset_sector: be32(s, 40),
                stripes: be32(s, 44),
            }
        });
        let h = LuksHeader {
            area,
            spec,
            hash,
            payload_offset_sector,
            master_key_len,
            master_key_digest: b[112..132].try_into().unwrap(),
            master_key_salt: b[132..164].try_into().unwrap(),
            master_key_iterations,
            uuid: b[168..168 + UUID_LEN].try_into().unwrap(),
            slots,
        };
        h.check_slots(b, area, &at)?;
        h.check_work(&at)?;
        Ok(h)
    }

    fn check_slots(
        &self,
        b: &[u8],
        area: LuksArea,
        at: &dyn Fn(usize) -> u64,
    ) -> Result<(), FormatError> {
        let key_len = self.master_key_len as u64;
        let span = |s: &KeySlot| {
            let start = s.key_offset_sector as u64;
            (start, start + material_sectors(key_len, s.stripes as u64))
        };
        for (i, s) in self.slots.iter().enumerate() {
            let field = |name: &str| format!("LUKS key slot {i} {name}");
            let base = 208 + 48 * i;
            let state = be32(b, base);
            if state != SLOT_ACTIVE && state != SLOT_INACTIVE {
                return Err(FormatError::invalid(
                    field("state"),
                    at(base),
                    format!(
                        "{state:#010x} is neither active (0x00ac71f3) nor inactive (0x0000dead)"
                    ),
                ));
            }
            if s.stripes == 0 || s.stripes > MAX_STRIPES {
                return Err(FormatError::invalid(
                    field("stripes"),
                    at(base + 44),
                    format!("{} stripes is outside 1..={MAX_STRIPES}", s.stripes),
                ));
            }
            let (start, end) = span(s);
            if start * (SECTOR_SIZE as u64) < HEADER_LEN as u64 {
                return Err(FormatError::invalid(
                    field("key-material offset"),
                    at(base + 40),
                    format!("sector {start} overlaps the {HEADER_LEN}-byte LUKS header"),
                ));
            }
            if end > self.payload_offset_sector as u64 {
                return Err(FormatError::invalid(
                    field("key-material offset"),
                    at(base + 40),
                    format!(
                        "key material at sectors {start}..{end} overlaps the payload at sector {}",
                        self.payload_offset_sector
                    ),
                ));
            }
            for (j, t) in self.slots.iter().enumerate().skip(i + 1) {
                let (start2, end2) = span(t);
                if start < end2 && start2 < end {
                    return Err(FormatError::invalid(
                        field("key-material offset"),
                        at(base + 40),
                        format!(
                            "key material at sectors {start}..{end} overlaps slot {j}'s at {start2}..{end2}"
                        ),
                    ));
                }
            }
            if s.active {
                if s.iterations == 0 {
                    return Err(FormatError::invalid(
                        field("iterations"),
                        at(base + 4),
                        "is 0",
                    ));
                }
                let used = s.material_offset() + self.material_len(s) as u64;
                if used > area.length {
                    return Err(FormatError::invalid(
                        field("key-material offset"),
                        at(base + 40),
                        format!(
                            "key material ends {used} bytes into the LUKS area, past its {} bytes",
                            area.length
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_work(&self, at: &dyn Fn(usize) -> u64) -> Result<(), FormatError> {
        let key_len = self.master_key_len as usize;
        let digest = self
            .hash
            .pbkdf2_work(self.master_key_iterations, DIGEST_LEN);
        let work: u64 = self
            .slots
            .iter()
            .filter(|s| s.active)
            .map(|s| self.hash.pbkdf2_work(s.iterations, key_len) + digest)
            .sum();
        if work > PBKDF2_WORK_LIMIT {
            return Err(FormatError::unsupported(
                "LUKS key slot iterations",
                at(208),
                format!(
                    "unlocking every active slot would take {work} HMAC-SHA-256-equivalent PBKDF2 iterations, more than the limit of {PBKDF2_WORK_LIMIT} (about 40 s)"
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of key material a slot stores, whole sectors.
    pub fn material_len(&self, slot: &KeySlot) -> usize {
        (self.master_key_len as usize * slot.stripes as usize).next_multiple_of(SECTOR_SIZE)
    }

    /// The UUID as text, up to its first NUL.
    pub fn uuid(&self) -> String {
        let end = self.uuid.iter().position(|&c| c == 0).unwrap_or(UUID_LEN);
        String::from_utf8_lossy(&self.uuid[..end]).into_owned()
    }

    /// The numbers of the slots that hold a key, in order.
    pub fn active_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..NUM_SLOTS).filter(|&i| self.slots[i].active)
    }

    /// The summary `qemu-img info` prints, without needing a key.
    pub fn info(&self) -> LuksInfo {
        LuksInfo {
            format: "luks",
            cipher_alg: self.spec.alg.name(),
            cipher_mode: self.spec.mode.name(),
            ivgen_alg: self.spec.ivgen.name(),
            ivgen_hash_alg: match self.spec.ivgen {
                IvGenAlg::Essiv => self.spec.ivgen_hash.map(HashAlg::name),
                _ => None,
            },
            hash_alg: self.hash.name(),
            detached_header: false,
            uuid: self.uuid(),
            payload_offset: self.payload_offset_sector as u64 * SECTOR_SIZE as u64,
            master_key_iters: self.master_key_iterations,
            slots: self
                .slots
                .iter()
                .map(|s| SlotInfo {
                    active: s.active,
                    iters: s.active.then_some(s.iterations),
                    key_offset: s.material_offset(),
                    stripes: s.active.then_some(s.stripes),
                })
                .collect(),
        }
    }

    /// The cipher-mode string of the header: `MODE-IVGEN[:HASH]`.
    pub fn cipher_mode_string(&self) -> String {
        match self.spec.ivgen_hash {
            Some(h) => format!(
                "{}-{}:{}",
                self.spec.mode.name(),
                self.spec.ivgen.name(),
                h.name()
            ),
            None => format!("{}-{}", self.spec.mode.name(), self.spec.ivgen.name()),
        }
    }

    /// The 592 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let put_text = |b: &mut [u8], at: usize, len: usize, s: &str| {
            let n = s.len().min(len - 1);
            b[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
        };
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b, 8, NAME_LEN, self.spec.alg.family());
        put_text(&mut b, 40, NAME_LEN, &self.cipher_mode_string());
        put_text(&mut b, 72, NAME_LEN, self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.master_key_len.to_be_bytes());
        b[112..132].copy_from_slice(&self.master_key_digest);
        b[132..164].copy_from_slice(&self.master_key_salt);
        b[164..168].copy_from_slice(&self.master_key_iterations.to_be_bytes());
        b[168..168 + UUID_LEN].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + 48 * i;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }
}

fn known_hashes() -> String {
    let names: Vec<&str> = super::hash::ALL_HASHES.iter().map(|h| h.name()).collect();
    format!("qcow2fs takes {}", names.join(", "))
}

/// The cipher of a header from its name, mode string and master-key length, with
/// QEMU's rules: `MODE-IVGEN[:HASH]`, the XTS key split in two, ESSIV's hash checked.
fn parse_spec(
    name: &str,
    mode_string: &str,
    key_len: u32,
    at: &dyn Fn(usize) -> u64,
) -> Result<CipherSpec, FormatError> {
    let mode_err = |problem: &str| {
        FormatError::unsupported(
            "LUKS cipher mode",
            at(40),
            format!("{mode_string:?}: {problem}"),
        )
    };
    let Some((mode_name, ivgen_part)) = mode_string.split_once('-') else {
        return Err(FormatError::invalid(
            "LUKS cipher mode",
            at(40),
            format!("{mode_string:?} is not of the form MODE-IVGEN[:HASH]"),
        ));
    };
    let (ivgen_name, ivhash_name) = match ivgen_part.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (ivgen_part, None),
    };
    let mode = CipherMode::from_name(mode_name).ok_or_else(|| {
        mode_err(&format!(
            "cipher mode {mode_name:?} is not supported (qcow2fs and QEMU take ecb, cbc, xts, ctr)"
        ))
    })?;
    let ivgen = IvGenAlg::from_name(ivgen_name).ok_or_else(|| {
        mode_err(&format!(
            "IV generator {ivgen_name:?} is not supported (qcow2fs and QEMU take plain, plain64, essiv)"
        ))
    })?;
    let ivgen_hash = match ivhash_name {
        None => None,
        Some(h) => Some(HashAlg::from_name(h).ok_or_else(|| {
            mode_err(&format!(
                "IV hash {h:?} is not supported ({})",
                known_hashes()
            ))
        })?),
    };
    if !CipherAlg::is_family(name) {
        let why = if name == "sm4" {
            "QEMU 10.0.2 built with nettle, as Debian ships it, refuses it too"
        } else {
            "qcow2fs takes aes, serpent, twofish and cast5, as QEMU does"
        };
        return Err(FormatError::unsupported(
            "LUKS cipher name",
            at(8),
            format!("cipher {name:?} is not supported ({why})"),
        ));
    }
    let per_cipher = if mode == CipherMode::Xts {
        key_len / 2
    } else {
        key_len
    };
    let alg = CipherAlg::from_family(name, per_cipher as usize)
        .filter(|_| mode != CipherMode::Xts || key_len.is_multiple_of(2))
        .ok_or_else(|| {
            FormatError::invalid(
                "LUKS master-key length",
                at(108),
                format!("{key_len} bytes is not a key length of {name} in {mode_name} mode"),
            )
        })?;
    CipherSpec::new(alg, mode, ivgen, ivgen_hash).map_err(|e| mode_err(&e))
}
