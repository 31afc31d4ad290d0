//! The payload ciphers of encrypted images: cipher algorithms, block modes and IV
//! generators as QEMU names and combines them, and [`SectorCipher`], which encrypts or
//! decrypts whole 512-byte sectors in place, each with the IV of its sector number.
//!
//! Keys are expanded once, when the cipher is built, onto locked pages
//! ([`super::secret::Locked`]); a call only computes IVs and runs the blocks. The block
//! ciphers and modes are RustCrypto's: `aes` picks AES-NI at run time on x86_64 (through
//! `cpufeatures`), `cbc` and `ctr` do the chaining; ECB is the cipher alone. XTS is the
//! tweak arithmetic around the cipher's many-blocks-at-once path (the `xts-mode` crate
//! runs the cipher one block at a time, which leaves AES-NI idle most of the time: 0.6
//! GB/s instead of 3; the tests check the two agree).

use super::hash::HashAlg;
use super::secret::Locked;
use cipher::typenum::U16;
use cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt,
    BlockSizeUser, InOutBuf, InnerIvInit, KeyInit, StreamCipher,
};

/// Bytes in one encryption sector: each is encrypted on its own, with its own IV.
pub const SECTOR_SIZE: usize = 512;

/// A block cipher with its key size, as QEMU names them (`aes-256`, `serpent-128`...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES, 128-bit key.
    Aes128,
    /// AES, 192-bit key.
    Aes192,
    /// AES, 256-bit key.
    Aes256,
    /// Serpent, 128-bit key.
    Serpent128,
    /// Serpent, 192-bit key.
    Serpent192,
    /// Serpent, 256-bit key.
    Serpent256,
    /// Twofish, 128-bit key.
    Twofish128,
    /// Twofish, 192-bit key.
    Twofish192,
    /// Twofish, 256-bit key.
    Twofish256,
    /// CAST-128 (CAST5), 128-bit key, 8-byte blocks.
    Cast5_128,
}

/// Every cipher qcow2fs knows.
pub const ALL_CIPHERS: [CipherAlg; 10] = [
    CipherAlg::Aes128,
    CipherAlg::Aes192,
    CipherAlg::Aes256,
    CipherAlg::Serpent128,
    CipherAlg::Serpent192,
    CipherAlg::Serpent256,
    CipherAlg::Twofish128,
    CipherAlg::Twofish192,
    CipherAlg::Twofish256,
    CipherAlg::Cast5_128,
];

impl CipherAlg {
    /// QEMU's name (`encrypt.cipher-alg`, `qemu-img info`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
            CipherAlg::Cast5_128 => "cast5-128",
        }
    }

    /// The name a LUKS header stores (`aes`, `serpent`, `twofish`, `cast5`).
    pub fn family(self) -> &'static str {
        let name = self.name();
        &name[..name.find('-').unwrap_or(name.len())]
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128
            | CipherAlg::Cast5_128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    /// Block length in bytes (16, or 8 for CAST5).
    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }

    /// The member of the family named `family` with keys of `key_len` bytes.
    pub fn from_family(family: &str, key_len: usize) -> Option<CipherAlg> {
        ALL_CIPHERS
            .into_iter()
            .find(|c| c.family() == family && c.key_len() == key_len)
    }

    /// Whether `family` names a cipher family at all.
    pub fn is_family(family: &str) -> bool {
        ALL_CIPHERS.iter().any(|c| c.family() == family)
    }
}

/// How blocks within a sector are chained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook: each block on its own.
    Ecb,
    /// Cipher block chaining, the IV as first block.
    Cbc,
    /// XTS: the key is two keys of the cipher, the IV is the tweak.
    Xts,
    /// Counter mode, the IV as initial counter.
    Ctr,
}

impl CipherMode {
    /// The mode's name as LUKS headers and QEMU spell it (`xts`).
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    /// The mode named `name`, if any.
    pub fn from_name(name: &str) -> Option<CipherMode> {
        [
            CipherMode::Ecb,
            CipherMode::Cbc,
            CipherMode::Xts,
            CipherMode::Ctr,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

/// How a sector's IV is made from its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The low 32 bits of the sector number, little-endian, zero-padded.
    Plain,
    /// The sector number as a 64-bit little-endian integer, zero-padded.
    Plain64,
    /// The plain64 block encrypted with the hash of the key (as key of the ESSIV cipher).
    Essiv,
}

impl IvGenAlg {
    /// The generator's name as LUKS headers and QEMU spell it (`plain64`).
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    /// The generator named `name` (without an ESSIV hash), if any.
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv]
            .into_iter()
            .find(|g| g.name() == name)
    }
}

/// A complete payload cipher: algorithm, mode and IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// The block cipher and its key size.
    pub alg: CipherAlg,
    /// How the blocks of a sector are chained.
    pub mode: CipherMode,
    /// How each sector's IV is made.
    pub ivgen: IvGenAlg,
    /// The hash of `essiv:HASH`; kept (and ignored) for plain and plain64 as QEMU does.
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// Checks the combination as QEMU does: XTS needs a 16-byte block, ESSIV a hash
    /// whose digest is the key length of a cipher of the same family.
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
    ) -> Result<CipherSpec, String> {
        if mode == CipherMode::Xts && alg.block_len() != 16 {
            return Err(format!(
                "cipher mode xts needs a 16-byte block; {} has {}-byte blocks",
                alg.name(),
                alg.block_len()
            ));
        }
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
        };
        if ivgen == IvGenAlg::Essiv {
            spec.essiv_alg()?;
        }
        Ok(spec)
    }

    /// Bytes of master key: the cipher's key, twice for XTS (data key, then tweak key).
    pub fn master_key_len(&self) -> usize {
        self.alg.key_len() * if self.mode == CipherMode::Xts { 2 } else { 1 }
    }

    /// Bytes of IV each sector takes: none in ECB mode, a block otherwise.
    pub fn iv_len(&self) -> usize {
        if self.mode == CipherMode::Ecb {
            0
        } else {
            self.alg.block_len()
        }
    }

    /// The cipher ESSIV encrypts sector numbers with: the payload cipher's family, with
    /// the key length equal to the ESSIV hash's digest (dm-crypt's rule, which QEMU
    /// follows: aes-128 with essiv:sha256 uses aes-256 for the IVs).
    pub fn essiv_alg(&self) -> Result<CipherAlg, String> {
        let Some(hash) = self.ivgen_hash else {
            return Err("IV generator essiv needs a hash (essiv:HASH)".into());
        };
        if hash.digest_len() == self.alg.key_len() {
            return Ok(self.alg);
        }
        match CipherAlg::from_family(self.alg.family(), hash.digest_len()) {
            Some(c) if self.alg != CipherAlg::Cast5_128 => Ok(c),
            _ => Err(format!(
                "essiv:{} gives {}-byte keys; no {} cipher takes them",
                hash.name(),
                hash.digest_len(),
                self.alg.family()
            )),
        }
    }

    /// The cipher with `key` (of [`CipherSpec::master_key_len`] bytes) expanded.
    pub fn build(&self, key: &[u8]) -> Result<SectorCipher, String> {
        if key.len() != self.master_key_len() {
            return Err(format!(
                "{} {} needs a {}-byte key, got {}",
                self.alg.name(),
                self.mode.name(),
                self.master_key_len(),
                key.len()
            ));
        }
        let engine = build_engine(self.alg, self.mode, key)?;
        let ivgen = match (self.mode, self.ivgen) {
            (CipherMode::Ecb, _) => IvGen::None,
            (_, IvGenAlg::Plain) => IvGen::Plain,
            (_, IvGenAlg::Plain64) => IvGen::Plain64,
            (_, IvGenAlg::Essiv) => {
                let hash = self.ivgen_hash.expect("checked by essiv_alg");
                let salt = hash.digest(key);
                let alg = self.essiv_alg()?;
                IvGen::Essiv(build_engine(alg, CipherMode::Ecb, &salt[..alg.key_len()])?)
            }
        };
        Ok(SectorCipher {
            engine,
            ivgen,
            iv_len: self.iv_len(),
        })
    }
}

/// One mode over one keyed block cipher, working on a whole sector given its IV.
trait Engine: Send + Sync {
    fn encrypt(&self, iv: &[u8], sector: &mut [u8]);
    fn decrypt(&self, iv: &[u8], sector: &mut [u8]);
}

impl<T: Engine> Engine for Locked<T> {
    fn encrypt(&self, iv: &[u8], sector: &mut [u8]) {
        (**self).encrypt(iv, sector)
    }
    fn decrypt(&self, iv: &[u8], sector: &mut [u8]) {
        (**self).decrypt(iv, sector)
    }
}

struct Ecb<C>(C);
struct Cbc<C>(C);
struct Ctr<C, F>(C, std::marker::PhantomData<F>);
/// XTS (IEEE P1619) over whole blocks, as QEMU uses it: the IV encrypted with the tweak
/// key gives the first block's tweak, each next one is the previous times x in GF(2^128)
/// (little-endian); each block is XORed with its tweak, run through the data key, and
/// XORed again. Sectors are whole blocks, so no ciphertext stealing.
struct Xts<C> {
    data: C,
    tweak: C,
}

/// Blocks in one sector.
const XTS_BLOCKS: usize = SECTOR_SIZE / 16;

impl<C: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16>> Xts<C> {
    /// XORs each 16-byte block of `sector` with its tweak (computed once into `tweaks`).
    fn whiten(&self, iv: &[u8], sector: &mut [u8], tweaks: &mut [u128; XTS_BLOCKS]) {
        let mut t = Array::try_from(iv).expect("XTS takes a 16-byte IV");
        self.tweak.encrypt_block(&mut t);
        let mut x = u128::from_le_bytes(t.into());
        for (i, block) in sector.chunks_exact_mut(16).enumerate() {
            tweaks[i] = x;
            xor_block(block, x);
            // Times x: shift left, folding the carry back in with the polynomial 0x87.
            x = (x << 1) ^ ((x >> 127) * 0x87);
        }
    }
}

fn xor_block(block: &mut [u8], t: u128) {
    let v = u128::from_le_bytes(block.try_into().expect("16-byte block")) ^ t;
    block.copy_from_slice(&v.to_le_bytes());
}

/// The whole blocks of `sector` (a sector is always whole blocks).
fn blocks<C: BlockSizeUser>(sector: &mut [u8]) -> InOutBuf<'_, '_, Array<u8, C::BlockSize>> {
    let (blocks, tail) = InOutBuf::from(sector).into_chunks::<C::BlockSize>();
    debug_assert!(tail.is_empty());
    blocks
}

impl<C: BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync> Engine for Ecb<C> {
    fn encrypt(&self, _iv: &[u8], sector: &mut [u8]) {
        self.0.encrypt_blocks_inout(blocks::<C>(sector));
    }
    fn decrypt(&self, _iv: &[u8], sector: &mut [u8]) {
        self.0.decrypt_blocks_inout(blocks::<C>(sector));
    }
}

impl<C: BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync> Engine for Cbc<C> {
    fn encrypt(&self, iv: &[u8], sector: &mut [u8]) {
        cbc::Encryptor::<&C>::inner_iv_slice_init(&self.0, iv)
            .expect("IV length")
            .encrypt_blocks_inout(blocks::<C>(sector));
    }
    fn decrypt(&self, iv: &[u8], sector: &mut [u8]) {
        cbc::Decryptor::<&C>::inner_iv_slice_init(&self.0, iv)
            .expect("IV length")
            .decrypt_blocks_inout(blocks::<C>(sector));
    }
}

/// CTR as nettle (QEMU's backend) runs it: the whole block is one big-endian counter
/// (the flavor `F`: 128-bit for 16-byte blocks, 64-bit for 8-byte ones), starting at the
/// sector's IV.
impl<C, F> Engine for Ctr<C, F>
where
    C: BlockCipherEncrypt + Send + Sync,
    C::BlockSize: digest::block_buffer::BlockSizes,
    F: ctr::flavors::CtrFlavor<C::BlockSize> + Send + Sync,
{
    fn encrypt(&self, iv: &[u8], sector: &mut [u8]) {
        let core = ctr::CtrCore::<&C, F>::inner_iv_slice_init(&self.0, iv).expect("IV length");
        cipher::StreamCipherCoreWrapper::from_core(core).apply_keystream(sector);
    }
    fn decrypt(&self, iv: &[u8], sector: &mut [u8]) {
        self.encrypt(iv, sector)
    }
}

impl<C> Engine for Xts<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn encrypt(&self, iv: &[u8], sector: &mut [u8]) {
        let mut tweaks = [0u128; XTS_BLOCKS];
        self.whiten(iv, sector, &mut tweaks);
        self.data.encrypt_blocks_inout(blocks::<C>(sector));
        for (block, &t) in sector.chunks_exact_mut(16).zip(&tweaks) {
            xor_block(block, t);
        }
    }
    fn decrypt(&self, iv: &[u8], sector: &mut [u8]) {
        let mut tweaks = [0u128; XTS_BLOCKS];
        self.whiten(iv, sector, &mut tweaks);
        self.data.decrypt_blocks_inout(blocks::<C>(sector));
        for (block, &t) in sector.chunks_exact_mut(16).zip(&tweaks) {
            xor_block(block, t);
        }
    }
}

/// The engine of `alg` in `mode` with `key` expanded, on locked pages.
fn build_engine(alg: CipherAlg, mode: CipherMode, key: &[u8]) -> Result<Box<dyn Engine>, String> {
    match alg {
        CipherAlg::Aes128 => engine16::<aes::Aes128>(mode, key),
        CipherAlg::Aes192 => engine16::<aes::Aes192>(mode, key),
        CipherAlg::Aes256 => engine16::<aes::Aes256>(mode, key),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            engine16::<serpent::Serpent>(mode, key)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            engine16::<twofish::Twofish>(mode, key)
        }
        CipherAlg::Cast5_128 => engine::<cast5::Cast5, ctr::flavors::Ctr64BE>(mode, key),
    }
}

/// What the payload ciphers are to the modes: keyed block ciphers that encrypt and
/// decrypt and may be shared between threads.
trait KeyedCipher: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Send + Sync + 'static {}

impl<C> KeyedCipher for C where
    C: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Send + Sync + 'static
{
}

fn keyed<C: KeyInit>(key: &[u8]) -> Result<C, String> {
    C::new_from_slice(key).map_err(|_| format!("a {}-byte key does not fit the cipher", key.len()))
}

/// The engine of `mode` over the block cipher `C`, whose CTR counter is `F`. XTS needs a
/// 16-byte block: [`engine16`] makes it.
fn engine<C, F>(mode: CipherMode, key: &[u8]) -> Result<Box<dyn Engine>, String>
where
    C: KeyedCipher,
    C::BlockSize: digest::block_buffer::BlockSizes,
    F: ctr::flavors::CtrFlavor<C::BlockSize> + Send + Sync + 'static,
{
    Ok(match mode {
        CipherMode::Ecb => Box::new(Locked::new(Ecb(keyed::<C>(key)?))),
        CipherMode::Cbc => Box::new(Locked::new(Cbc(keyed::<C>(key)?))),
        CipherMode::Ctr => Box::new(Locked::new(Ctr::<C, F>(
            keyed::<C>(key)?,
            std::marker::PhantomData,
        ))),
        CipherMode::Xts => return Err("cipher mode xts needs a 16-byte block".into()),
    })
}

/// [`engine`] for a cipher with 16-byte blocks, which may also run XTS.
fn engine16<C: KeyedCipher + BlockSizeUser<BlockSize = U16>>(
    mode: CipherMode,
    key: &[u8],
) -> Result<Box<dyn Engine>, String> {
    if mode != CipherMode::Xts {
        return engine::<C, ctr::flavors::Ctr128BE>(mode, key);
    }
    let (data, tweak) = key.split_at(key.len() / 2);
    Ok(Box::new(Locked::new(Xts {
        data: keyed::<C>(data)?,
        tweak: keyed::<C>(tweak)?,
    })))
}

enum IvGen {
    None,
    Plain,
    Plain64,
    Essiv(Box<dyn Engine>),
}

/// A keyed payload cipher: encrypts and decrypts whole sectors in place.
pub struct SectorCipher {
    engine: Box<dyn Engine>,
    ivgen: IvGen,
    iv_len: usize,
}

impl SectorCipher {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match &self.ivgen {
            IvGen::None => {}
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(cipher) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                cipher.encrypt(&[], &mut iv[..self.iv_len]);
            }
        }
        iv
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector has number `sector`.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        debug_assert!(buf.len().is_multiple_of(SECTOR_SIZE));
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            self.engine.encrypt(&iv[..self.iv_len], s);
        }
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector has number `sector`.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        debug_assert!(buf.len().is_multiple_of(SECTOR_SIZE));
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            self.engine.decrypt(&iv[..self.iv_len], s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our XTS against the `xts-mode` crate, sector by sector, both ways, for each
    /// 16-byte-block cipher.
    fn xts_agrees<C: KeyedCipher + BlockSizeUser<BlockSize = U16>>(key_len: usize) {
        let key: Vec<u8> = (0..2 * key_len as u32)
            .map(|i| (i * 37 + 11) as u8)
            .collect();
        let ours = Xts {
            data: C::new_from_slice(&key[..key_len]).unwrap(),
            tweak: C::new_from_slice(&key[key_len..]).unwrap(),
        };
        let theirs = xts_mode::Xts128::new(
            C::new_from_slice(&key[..key_len]).unwrap(),
            C::new_from_slice(&key[key_len..]).unwrap(),
        );
        let plain: Vec<u8> = (0..SECTOR_SIZE as u32).map(|i| (i * 7 + 3) as u8).collect();
        for sector in [0u64, 1, 0x7f, 0x1234_5678_9abc, u64::MAX] {
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&sector.to_le_bytes());
            let (mut a, mut b) = (plain.clone(), plain.clone());
            ours.encrypt(&iv, &mut a);
            theirs.encrypt_sector(&mut b, Array::from(iv));
            assert_eq!(a, b, "encrypting sector {sector:#x}");
            assert_ne!(a, plain);
            ours.decrypt(&iv, &mut a);
            assert_eq!(a, plain, "decrypting sector {sector:#x}");
        }
    }

    #[test]
    fn xts_agrees_with_the_xts_mode_crate() {
        xts_agrees::<aes::Aes128>(16);
        xts_agrees::<aes::Aes192>(24);
        xts_agrees::<aes::Aes256>(32);
        xts_agrees::<serpent::Serpent>(32);
        xts_agrees::<twofish::Twofish>(32);
    }

    /// `cargo test --release --lib -- --ignored --nocapture cipher_speed`
    #[test]
    #[ignore]
    fn cipher_speed() {
        for alg in [CipherAlg::Aes256, CipherAlg::Serpent256] {
            let spec = CipherSpec::new(alg, CipherMode::Xts, IvGenAlg::Plain64, None).unwrap();
            let c = spec.build(&[7u8; 64]).unwrap();
            let mut buf = vec![0u8; 8 << 20];
            for what in ["decrypt", "encrypt"] {
                let t = std::time::Instant::now();
                for i in 0..4 {
                    if what == "decrypt" {
                        c.decrypt(i * 16384, &mut buf);
                    } else {
                        c.encrypt(i * 16384, &mut buf);
                    }
                }
                let mib = 4.0 * 8.0 / t.elapsed().as_secs_f64();
                eprintln!("{}-xts-plain64 {what}: {mib:.0} MiB/s", alg.name());
            }
        }
    }
}
