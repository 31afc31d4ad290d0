//! Bytes: comparisons that report the first difference instead of dumping buffers,
//! big-endian fields read from a slice, sizes, and a small deterministic generator so that
//! every random workload and every image reproduces from its seed.

pub const K: u64 = 1 << 10;
pub const M: u64 = 1 << 20;

/// A description of where `got` first differs from `expected`, or `None` if they match.
pub fn first_difference(expected: &[u8], got: &[u8]) -> Option<String> {
    let common = expected.len().min(got.len());
    let first = expected[..common]
        .iter()
        .zip(&got[..common])
        .position(|(a, b)| a != b);
    let len_note = if expected.len() != got.len() {
        format!(
            "length differs: expected {} ({:#x}) bytes, got {} ({:#x})",
            expected.len(),
            expected.len(),
            got.len(),
            got.len()
        )
    } else {
        String::new()
    };
    match first {
        Some(i) => {
            let end = (i + 16).min(common);
            let last = (i..common)
                .rev()
                .find(|&j| expected[j] != got[j])
                .unwrap_or(i);
            let ndiff = expected[i..=last]
                .iter()
                .zip(&got[i..=last])
                .filter(|(a, b)| a != b)
                .count();
            Some(format!(
                "first difference at offset {i} ({i:#x}): expected {:02x?}, got {:02x?}; \
                 {ndiff} differing bytes up to offset {last:#x}{}{len_note}",
                &expected[i..end],
                &got[i..end],
                if len_note.is_empty() { "" } else { "; " },
            ))
        }
        None if !len_note.is_empty() => Some(len_note),
        None => None,
    }
}

/// The offset of the first byte where `a` and `b` differ (the shorter length when one is
/// a prefix of the other), or `None` if they are equal.
pub fn first_diff_offset(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

/// Panics unless `got == expected`, naming the first differing offset (and the lengths).
pub fn assert_same_bytes(what: &str, expected: &[u8], got: &[u8]) {
    if let Some(msg) = first_difference(expected, got) {
        panic!("{what}: {msg}");
    }
}

/// The expected bytes of a read of `len` at `off` from a file holding `data`.
pub fn slice_at(data: &[u8], off: u64, len: usize) -> &[u8] {
    let start = (off as usize).min(data.len());
    let end = (off as usize).saturating_add(len).min(data.len());
    &data[start..end]
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// `s` with every escape (`marker`, then `digits` digits in `radix`) replaced by the byte it
/// stands for (`\040` in mountinfo, `%20` in URLs); anything else is kept as it is.
pub fn unescape(s: &str, marker: u8, digits: usize, radix: u32) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == marker
            && i + digits < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 1 + digits])
                .ok()
                .and_then(|d| u8::from_str_radix(d, radix).ok())
        {
            out.push(v);
            i += 1 + digits;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A small deterministic generator (xorshift64*), seeded so that a failure reproduces.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    /// A generator seeded from a name (FNV-1a), so each test draws its own sequence.
    pub fn named(name: &str) -> Rng {
        Rng::new(fnv(name))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `len` random (incompressible) bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// FNV-1a of a string: a stable seed from a name.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
