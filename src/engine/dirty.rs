//! The bits of one dirty bitmap in memory: one bit per granularity-sized chunk of the
//! disk, set when the chunk changed. Marking ranges, finding dirty and clean runs,
//! counting, merging, and the conversion to and from bitmap data clusters in the layout
//! `format::bitmap` describes (least significant bit first, so a little-endian word holds
//! 64 chunks in file order). The caller bounds the size before making one.

use crate::format::bitmap::bit_count;

/// What one cluster's worth of bits holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunk {
    Clean,
    Dirty,
    Mixed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirtyBits {
    granularity_bits: u8,
    /// The disk size the bits cover, in bytes.
    size: u64,
    words: Vec<u64>,
}

impl DirtyBits {
    /// All clean bits for a disk of `size` bytes at granularity `2^granularity_bits`.
    pub(crate) fn new(size: u64, granularity_bits: u8) -> Self {
        let bits = bit_count(size, granularity_bits);
        DirtyBits {
            granularity_bits,
            size,
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub(crate) fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of memory the bits take.
    pub(crate) fn memory(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    fn bits(&self) -> u64 {
        bit_count(self.size, self.granularity_bits)
    }

    fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] >> (bit % 64) & 1 != 0
    }

    /// Sets or clears bits `[first, first + n)`.
    fn fill(&mut self, first: u64, n: u64, value: bool) {
        let (mut bit, end) = (first, first + n);
        while bit < end {
            let w = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (end - (bit - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            bit += hi - lo;
        }
    }

    /// Marks the chunks that `[off, off + len)` touches (the part inside the disk).
    pub(crate) fn set_range(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return;
        }
        let g = self.granularity_bits;
        let first = off >> g;
        let last = (end - 1) >> g;
        self.fill(first, last - first + 1, true);
    }

    /// Makes every chunk clean.
    pub(crate) fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The first bit at or after `bit` (below `limit`) whose state is not `state`.
    fn next_other(&self, bit: u64, limit: u64, state: bool) -> u64 {
        let mut b = bit;
        while b < limit {
            let w = (b / 64) as usize;
            let mut word = self.words[w];
            if state {
                word = !word;
            }
            word &= u64::MAX << (b % 64);
            if word != 0 {
                return (w as u64 * 64 + word.trailing_zeros() as u64).min(limit);
            }
            b = (w as u64 + 1) * 64;
        }
        limit
    }

    /// Whether the disk at `off` (below the size) is dirty, and for how many bytes from
    /// `off` (at most `max_len`) that stays so.
    pub(crate) fn extent(&self, off: u64, max_len: u64) -> (bool, u64) {
        let end = off.saturating_add(max_len).min(self.size);
        if off >= end {
            return (false, 0);
        }
        let g = self.granularity_bits;
        let bit = off >> g;
        let limit = ((end - 1) >> g) + 1;
        let state = self.get(bit);
        let other = self.next_other(bit + 1, limit, state);
        let stop = (other << g).min(end);
        (state, stop - off)
    }

    /// The dirty extents, in order, as (offset, length), clipped to the disk.
    pub(crate) fn dirty_extents(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < self.size {
            let (dirty, len) = self.extent(off, self.size - off);
            if dirty {
                out.push((off, len));
            }
            off += len;
        }
        out
    }

    /// Dirty bytes as QEMU counts them: dirty chunks times the granularity.
    pub(crate) fn dirty_bytes(&self) -> u64 {
        let n: u64 = self.words.iter().map(|w| w.count_ones() as u64).sum();
        n << self.granularity_bits
    }

    /// Dirty bytes within the disk: the last chunk may reach past its end.
    pub(crate) fn dirty_bytes_in_disk(&self) -> u64 {
        let n = self.dirty_bytes();
        let bits = self.bits();
        if bits > 0 && self.get(bits - 1) {
            n - ((bits << self.granularity_bits) - self.size)
        } else {
            n
        }
    }

    /// Follows a disk that grew or shrank: new chunks are clean.
    pub(crate) fn resize(&mut self, size: u64) {
        let bits = bit_count(size, self.granularity_bits);
        let old_bits = self.bits();
        self.size = size;
        self.words.resize(bits.div_ceil(64) as usize, 0);
        if bits < old_bits && !bits.is_multiple_of(64) {
            // Bits past the new end stay clear, so counts and data stay exact.
            let last = self.words.len() - 1;
            self.words[last] &= (1u64 << (bits % 64)) - 1;
        }
    }

    /// Marks every chunk that `other` (of the same disk size, any granularity) has dirty.
    pub(crate) fn merge(&mut self, other: &DirtyBits) {
        if other.granularity_bits == self.granularity_bits {
            for (a, b) in self.words.iter_mut().zip(&other.words) {
                *a |= b;
            }
            return;
        }
        for (off, len) in other.dirty_extents() {
            self.set_range(off, len);
        }
    }

    /// The bits one data cluster of `cluster_bytes` holds, for cluster `index`: first bit
    /// and count (the last cluster may hold fewer).
    fn cluster_bits(&self, index: u64, cluster_bytes: u64) -> (u64, u64) {
        let per = cluster_bytes * 8;
        let first = index * per;
        (first, self.bits().saturating_sub(first).min(per))
    }

    /// Whether data cluster `index` would be all clean, all dirty, or mixed.
    pub(crate) fn chunk(&self, index: u64, cluster_bytes: u64) -> Chunk {
        let (first, n) = self.cluster_bits(index, cluster_bytes);
        if n == 0 || self.next_other(first, first + n, false) == first + n {
            return Chunk::Clean;
        }
        if self.next_other(first, first + n, true) == first + n {
            return Chunk::Dirty;
        }
        Chunk::Mixed
    }

    /// The bytes of data cluster `index` (zero-padded to `cluster_bytes`).
    pub(crate) fn cluster_data(&self, index: u64, cluster_bytes: u64) -> Vec<u8> {
        let (first, _) = self.cluster_bits(index, cluster_bytes);
        let w0 = (first / 64) as usize;
        let n = (cluster_bytes / 8) as usize;
        let mut out = Vec::with_capacity(cluster_bytes as usize);
        for w in self.words.iter().skip(w0).take(n) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(cluster_bytes as usize, 0);
        out
    }

    /// Loads data cluster `index` from its bytes (bits past the disk are ignored).
    pub(crate) fn load_cluster(&mut self, index: u64, data: &[u8]) {
        let cluster_bytes = data.len() as u64;
        let (first, n) = self.cluster_bits(index, cluster_bytes);
        let w0 = (first / 64) as usize;
        for (k, c) in data
            .chunks_exact(8)
            .take(n.div_ceil(64) as usize)
            .enumerate()
        {
            self.words[w0 + k] = u64::from_le_bytes(c.try_into().unwrap_or_default());
        }
        self.trim();
    }

    /// Marks every chunk of data cluster `index` dirty (an all-ones table entry).
    pub(crate) fn fill_cluster(&mut self, index: u64, cluster_bytes: u64) {
        let (first, n) = self.cluster_bits(index, cluster_bytes);
        self.fill(first, n, true);
    }

    fn trim(&mut self) {
        let bits = self.bits();
        if !bits.is_multiple_of(64)
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (bits % 64)) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model: one bool per chunk.
    fn model(size: u64, g: u8, ops: &[(u64, u64)]) -> Vec<bool> {
        let mut v = vec![false; bit_count(size, g) as usize];
        for &(off, len) in ops {
            let end = (off + len).min(size);
            if off < end {
                for c in off >> g..=(end - 1) >> g {
                    v[c as usize] = true;
                }
            }
        }
        v
    }

    #[test]
    fn ranges_and_extents_match_a_model() {
        let mut seed = 0x1234_5678_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for &(size, g) in &[(1u64 << 20, 9u8), (1_000_000, 12), (5 << 20, 16), (777, 9)] {
            let mut bits = DirtyBits::new(size, g);
            let mut ops = Vec::new();
            for _ in 0..40 {
                let off = next(size);
                let len = next(size / 8 + 1) + 1;
                bits.set_range(off, len);
                ops.push((off, len));
            }
            let want = model(size, g, &ops);
            let mut got = vec![false; want.len()];
            for (off, len) in bits.dirty_extents() {
                assert!(off + len <= size);
                for c in off >> g..=(off + len - 1) >> g {
                    got[c as usize] = true;
                }
            }
            assert_eq!(got, want, "size {size} g {g}");
            let count = want.iter().filter(|&&d| d).count() as u64;
            assert_eq!(bits.dirty_bytes(), count << g);
            let in_disk: u64 = bits.dirty_extents().iter().map(|e| e.1).sum();
            assert_eq!(bits.dirty_bytes_in_disk(), in_disk);
            // Extents alternate and cover the disk.
            let mut off = 0;
            let mut last = None;
            while off < size {
                let (d, len) = bits.extent(off, size - off);
                assert!(len > 0 && last != Some(d));
                last = Some(d);
                off += len;
            }
            assert_eq!(off, size);
        }
    }

    #[test]
    fn clusters_round_trip_in_file_order() {
        let mut bits = DirtyBits::new(64 << 20, 9);
        bits.set_range(0, 512);
        bits.set_range(9 * 512, 1);
        let data = bits.cluster_data(0, 4096);
        assert_eq!(&data[..2], &[0b0000_0001, 0b0000_0010]);
        let mut back = DirtyBits::new(64 << 20, 9);
        back.load_cluster(0, &data);
        assert_eq!(back, bits);
        // 4 KiB clusters hold 32768 bits: 16 MiB of disk at 512 bytes.
        assert_eq!(bits.chunk(0, 4096), Chunk::Mixed);
        assert_eq!(bits.chunk(1, 4096), Chunk::Clean);
        bits.set_range(16 << 20, 16 << 20);
        assert_eq!(bits.chunk(1, 4096), Chunk::Dirty);
        let mut ones = DirtyBits::new(64 << 20, 9);
        ones.fill_cluster(1, 4096);
        assert_eq!(ones.dirty_extents(), vec![(16 << 20, 16 << 20)]);
    }

    #[test]
    fn the_last_cluster_holds_only_the_disk() {
        // 100 chunks: the cluster holds more bits than the disk has.
        let mut bits = DirtyBits::new(100 * 512, 9);
        bits.set_range(0, 100 * 512);
        assert_eq!(bits.chunk(0, 512), Chunk::Dirty);
        let mut back = DirtyBits::new(100 * 512, 9);
        back.load_cluster(0, &[0xff; 512]);
        assert_eq!(back.dirty_bytes(), 100 * 512);
        back.resize(50 * 512);
        assert_eq!(back.dirty_bytes(), 50 * 512);
        back.resize(200 * 512);
        assert_eq!(back.dirty_extents(), vec![(0, 50 * 512)]);
    }

    #[test]
    fn merging_across_granularities() {
        let mut fine = DirtyBits::new(1 << 20, 9);
        fine.set_range(70_000, 10);
        let mut coarse = DirtyBits::new(1 << 20, 16);
        coarse.merge(&fine);
        assert_eq!(coarse.dirty_extents(), vec![(65536, 65536)]);
        let mut fine2 = DirtyBits::new(1 << 20, 9);
        fine2.merge(&coarse);
        assert_eq!(fine2.dirty_extents(), vec![(65536, 65536)]);
    }
}
