//! LUKS's anti-forensic information splitter: a key of `n` bytes is stored as `stripes`
//! blocks of `n` bytes, all needed to get the key back, so that wiping any part of the
//! key material destroys the key. Merge: XOR each block but the last into an accumulator
//! and diffuse it with the header's hash; the key is the last block XOR the accumulator.

use super::hash::HashAlg;
use zeroize::Zeroizing;

/// The key from its split form `split` (`stripes` blocks of `key_len` bytes).
pub fn merge(hash: HashAlg, key_len: usize, stripes: usize, split: &[u8]) -> Zeroizing<Vec<u8>> {
    assert!(stripes >= 1 && split.len() >= key_len * stripes);
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for block in split.chunks_exact(key_len).take(stripes - 1) {
        xor_into(&mut acc, block);
        hash.diffuse(&mut acc);
    }
    xor_into(&mut acc, &split[(stripes - 1) * key_len..stripes * key_len]);
    acc
}

/// The split form of `key`: `stripes - 1` random blocks, then the block that makes
/// [`merge`] give `key` back.
pub fn split(hash: HashAlg, key: &[u8], stripes: usize) -> crate::Result<Zeroizing<Vec<u8>>> {
    assert!(stripes >= 1);
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    getrandom::fill(&mut out[..n * (stripes - 1)]).map_err(|e| {
        crate::Error::new(
            crate::ErrorKind::Io,
            format!("reading the system's random source for key material: {e}"),
        )
    })?;
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for block in out[..n * (stripes - 1)].chunks_exact(n) {
        xor_into(&mut acc, block);
        hash.diffuse(&mut acc);
    }
    xor_into(&mut acc, key);
    out[n * (stripes - 1)..].copy_from_slice(&acc);
    Ok(out)
}

fn xor_into(acc: &mut [u8], block: &[u8]) {
    for (a, b) in acc.iter_mut().zip(block) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hash::ALL_HASHES;

    #[test]
    fn split_then_merge_gives_the_key_back() {
        let key: Vec<u8> = (0..64u8).collect();
        for hash in ALL_HASHES {
            for (len, stripes) in [(16, 1), (32, 7), (64, 4000), (24, 3)] {
                let s = split(hash, &key[..len], stripes).unwrap();
                assert_eq!(s.len(), len * stripes);
                let m = merge(hash, len, stripes, &s);
                assert_eq!(&m[..], &key[..len], "{hash:?} {len} {stripes}");
            }
        }
    }

    #[test]
    fn every_stripe_matters() {
        let key = [0x42u8; 32];
        let mut s = split(HashAlg::Sha256, &key, 10).unwrap();
        s[5 * 32 + 3] ^= 1;
        assert_ne!(&merge(HashAlg::Sha256, 32, 10, &s)[..], &key[..]);
    }
}
