//! Refcount table entries and refcount-block entries of every width (1 to 64 bits).

use super::entry::OFFSET_MASK;

/// Refcount-table entries use bits 9-63 for the refblock offset.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// The refblock offset in a refcount-table entry (0: no refblock).
pub fn reftable_block_offset(entry: u64) -> u64 {
    entry & REFTABLE_OFFSET_MASK
}

/// Whether a refblock offset is plausible for a host offset (below 2^56).
pub fn offset_in_range(off: u64) -> bool {
    off & !OFFSET_MASK & !0x1ff == 0
}

/// Layout of refcount blocks for one refcount order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountLayout {
    /// Refcount width as a power of two, in bits (0 to 6).
    pub order: u32,
    /// Cluster size as a power of two.
    pub cluster_bits: u32,
}

impl RefcountLayout {
    /// Refcount width in bits.
    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// The largest refcount an entry can hold.
    pub fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Entries in one refcount block.
    pub fn block_entries(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// Reads entry `i` of a refcount block.
    pub fn get(&self, block: &[u8], i: usize) -> u64 {
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let per_byte = 8 / bits;
                let byte = block[i / per_byte];
                let shift = (i % per_byte) * bits;
                ((byte >> shift) as u64) & ((1 << bits) - 1)
            }
            3 => block[i] as u64,
            4 => u16::from_be_bytes([block[2 * i], block[2 * i + 1]]) as u64,
            5 => u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap()) as u64,
            _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().unwrap()),
        }
    }

    /// Writes entry `i` of a refcount block; `value` must not exceed [`Self::max`].
    pub fn set(&self, block: &mut [u8], i: usize, value: u64) {
        debug_assert!(value <= self.max());
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let per_byte = 8 / bits;
                let shift = (i % per_byte) * bits;
                let mask = (((1u16 << bits) - 1) as u8) << shift;
                let b = &mut block[i / per_byte];
                *b = (*b & !mask) | (((value as u8) << shift) & mask);
            }
            3 => block[i] = value as u8,
            4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
            5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
            _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 512-byte refcount block of `1 << order`-bit entries with `entries` (index, value) set.
    fn block_of(order: u32, entries: &[(usize, u64)]) -> (RefcountLayout, Vec<u8>) {
        let l = RefcountLayout {
            order,
            cluster_bits: 9,
        };
        let mut b = vec![0u8; 512];
        for &(i, v) in entries {
            l.set(&mut b, i, v);
        }
        (l, b)
    }

    #[test]
    fn lsb_first_for_narrow_widths() {
        let (_, b) = block_of(0, &[(0, 1), (9, 1)]);
        assert_eq!(b[0], 0x01);
        assert_eq!(b[1], 0x02);
        let (l, b) = block_of(2, &[(0, 0xa), (1, 0x3)]);
        assert_eq!(b[0], 0x3a);
        assert_eq!(l.get(&b, 0), 0xa);
        assert_eq!(l.get(&b, 1), 0x3);
    }

    proptest! {
        #[test]
        fn set_then_get(order in 0u32..=6, i in 0usize..4096, v in any::<u64>(), other in any::<u64>()) {
            let l = RefcountLayout { order, cluster_bits: 16 };
            let v = v & l.max();
            let other = other & l.max();
            let mut b = vec![0u8; 1 << 16];
            let j = (i + 1) % 4096;
            l.set(&mut b, j, other);
            l.set(&mut b, i, v);
            prop_assert_eq!(l.get(&b, i), v);
            prop_assert_eq!(l.get(&b, j), other);
        }
    }
}
