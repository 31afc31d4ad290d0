//! The hash functions a LUKS header can name (QEMU's list: md5, sha1, sha224, sha256,
//! sha384, sha512, ripemd160, sm3), and what LUKS does with them: PBKDF2-HMAC, plain
//! digests (ESSIV) and the anti-forensic splitter's diffusion. All from RustCrypto.

use digest::Digest;
use zeroize::Zeroizing;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// A hash function a LUKS header may name.
pub enum HashAlg {
    /// MD5.
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// RIPEMD-160.
    Ripemd160,
    /// SM3.
    Sm3,
}

/// Every hash qcow2fs knows.
pub const ALL_HASHES: [HashAlg; 8] = [
    HashAlg::Md5,
    HashAlg::Sha1,
    HashAlg::Sha224,
    HashAlg::Sha256,
    HashAlg::Sha384,
    HashAlg::Sha512,
    HashAlg::Ripemd160,
    HashAlg::Sm3,
];

/// Calls `$body` with `$d` bound to the RustCrypto type of `$alg`.
macro_rules! with_digest {
    ($alg:expr, $d:ident => $body:expr) => {
        match $alg {
            HashAlg::Md5 => {
                type $d = md5::Md5;
                $body
            }
            HashAlg::Sha1 => {
                type $d = sha1::Sha1;
                $body
            }
            HashAlg::Sha224 => {
                type $d = sha2::Sha224;
                $body
            }
            HashAlg::Sha256 => {
                type $d = sha2::Sha256;
                $body
            }
            HashAlg::Sha384 => {
                type $d = sha2::Sha384;
                $body
            }
            HashAlg::Sha512 => {
                type $d = sha2::Sha512;
                $body
            }
            HashAlg::Ripemd160 => {
                type $d = ripemd::Ripemd160;
                $body
            }
            HashAlg::Sm3 => {
                type $d = sm3::Sm3;
                $body
            }
        }
    };
}

impl HashAlg {
    /// The name QEMU and cryptsetup write in a LUKS header.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
            HashAlg::Sm3 => "sm3",
        }
    }

    /// The hash of that exact name (QEMU's lookup is case-sensitive).
    pub fn from_name(name: &str) -> Option<HashAlg> {
        ALL_HASHES.into_iter().find(|h| h.name() == name)
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        with_digest!(self, D => <D as Digest>::output_size())
    }

    /// The cost of one HMAC iteration in HMAC-SHA-256 iterations, rounded up. Measured
    /// with these crates on an x86_64 with SHA extensions (million iterations a second:
    /// sha256 6.4, sha1 6.2, sha224 5.3, md5 2.4, ripemd160 1.7, sm3 1.7, sha512 1.4).
    pub fn hmac_cost(self) -> u64 {
        match self {
            HashAlg::Sha1 | HashAlg::Sha224 | HashAlg::Sha256 => 1,
            HashAlg::Md5 => 3,
            HashAlg::Ripemd160 | HashAlg::Sm3 => 4,
            HashAlg::Sha384 | HashAlg::Sha512 => 5,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        with_digest!(self, D => pbkdf2::pbkdf2_hmac::<D>(password, salt, rounds, out))
    }

    /// The work of one PBKDF2 derivation of `out_len` bytes, in HMAC-SHA-256 iterations.
    pub fn pbkdf2_work(self, rounds: u32, out_len: usize) -> u64 {
        let blocks = out_len.div_ceil(self.digest_len()) as u64;
        rounds as u64 * blocks * self.hmac_cost()
    }

    /// The digest of `data`, zeroed when dropped (it is key material for ESSIV).
    pub fn digest(self, data: &[u8]) -> Zeroizing<Vec<u8>> {
        with_digest!(self, D => Zeroizing::new(D::digest(data).to_vec()))
    }

    /// The anti-forensic splitter's diffusion of `block` in place: each digest-sized
    /// piece `i` becomes H(be32(i) || piece), cut to the piece's length.
    pub(crate) fn diffuse(self, block: &mut [u8]) {
        with_digest!(self, D => {
            let n = <D as Digest>::output_size();
            for (i, piece) in block.chunks_mut(n).enumerate() {
                let mut h = D::new();
                h.update((i as u32).to_be_bytes());
                h.update(&*piece);
                let out = h.finalize();
                let len = piece.len();
                piece.copy_from_slice(&out[..len]);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn names_round_trip() {
        for h in ALL_HASHES {
            assert_eq!(HashAlg::from_name(h.name()), Some(h));
        }
        assert_eq!(HashAlg::from_name("SHA256"), None);
        assert_eq!(HashAlg::from_name("whirlpool"), None);
    }

    #[test]
    fn digest_lengths() {
        let lens: Vec<usize> = ALL_HASHES.iter().map(|h| h.digest_len()).collect();
        assert_eq!(lens, [16, 20, 28, 32, 48, 64, 20, 32]);
    }

    #[test]
    fn pbkdf2_matches_rfc6070() {
        // RFC 6070, test vector 2 (PBKDF2-HMAC-SHA1, 2 iterations).
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(hex(&out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
    }

    #[test]
    fn diffusion_hashes_each_piece_with_its_index() {
        let mut block = vec![0xabu8; 40];
        HashAlg::Sha256.diffuse(&mut block);
        let mut first = sha2::Sha256::new();
        first.update(0u32.to_be_bytes());
        first.update([0xabu8; 32]);
        assert_eq!(&block[..32], &first.finalize()[..]);
        let mut second = sha2::Sha256::new();
        second.update(1u32.to_be_bytes());
        second.update([0xabu8; 8]);
        assert_eq!(&block[32..], &second.finalize()[..8]);
    }
}
