//! A bounded metadata cache shared by every reader of one image: CLOCK eviction, lookups
//! under a shared lock, insertion and eviction under the exclusive one. Values are handed
//! out as `Arc`s, so an evicted table stays valid for whoever still holds it. The cache
//! itself keeps the rule that a value not yet written back (a dirty L2 table) is never
//! evicted: it grows past its capacity instead, and the owner flushes soon.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the cache asks of a value: whether it must stay (it holds changes that are not
/// on disk yet).
pub trait Pinned {
    /// Whether the value must stay in the cache.
    fn pinned(&self) -> bool;
}

/// One L2 table, decoded to native-endian words. Entries are atomics so lookups need no
/// lock on the table; they change only under the image's exclusive metadata lock.
#[derive(Debug)]
pub struct L2Table {
    words: Box<[AtomicU64]>,
    dirty: AtomicBool,
}

impl L2Table {
    /// Decodes a table from its on-disk bytes (big-endian words; a trailing partial word
    /// is ignored).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let words = bytes
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().unwrap())))
            .collect();
        L2Table {
            words,
            dirty: AtomicBool::new(false),
        }
    }

    /// A table of `words` zero words: a new, empty L2 table.
    pub fn zeroed(words: usize) -> Self {
        L2Table {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(false),
        }
    }

    /// Number of 64-bit words (two per entry with extended L2 entries).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the table has no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Word `i` (panics when `i` is out of range).
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    pub(crate) fn set_word(&self, i: usize, v: u64) {
        self.words[i].store(v, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether the table changed since it was last written.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Records that the table is written back.
    pub fn mark_clean(&self) {
        self.dirty.store(false, Ordering::Release);
    }

    /// Records that the table must be written back.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Encodes the table into its on-disk bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
        out
    }

    /// A dirty copy of this table (for a table shared with a snapshot, which is copied
    /// before it changes).
    pub fn copy_dirty(&self) -> L2Table {
        let t = L2Table {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect(),
            dirty: AtomicBool::new(true),
        };
        t.mark_dirty();
        t
    }
}

impl Pinned for L2Table {
    fn pinned(&self) -> bool {
        self.is_dirty()
    }
}

struct Slot<T> {
    key: u64,
    value: Arc<T>,
    referenced: AtomicBool,
}

struct Inner<T> {
    index: HashMap<u64, usize>,
    slots: Vec<Slot<T>>,
    hand: usize,
}

/// A CLOCK cache from a host offset to a metadata table.
pub struct Cache<T> {
    inner: RwLock<Inner<T>>,
    capacity: usize,
}

impl<T> std::fmt::Debug for Cache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache(capacity {})", self.capacity)
    }
}

impl<T: Pinned> Cache<T> {
    /// An empty cache that holds `capacity` values (at least one) before it evicts.
    pub fn new(capacity: usize) -> Self {
        Cache {
            inner: RwLock::new(Inner {
                index: HashMap::new(),
                slots: Vec::new(),
                hand: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    /// How many values the cache holds before it evicts.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many values it holds now (more than the capacity when pinned values keep it
    /// from evicting).
    pub fn len(&self) -> usize {
        self.inner.read().slots.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value cached under `key` (a host offset), marked as recently used.
    pub fn get(&self, key: u64) -> Option<Arc<T>> {
        let inner = self.inner.read();
        let &i = inner.index.get(&key)?;
        let slot = &inner.slots[i];
        slot.referenced.store(true, Ordering::Relaxed);
        Some(slot.value.clone())
    }

    /// Inserts `value` unless `key` is already cached, and returns the cached value.
    /// When the cache is full, a value that is not pinned is dropped; if every value is
    /// pinned, the cache grows past its capacity and its owner is expected to unpin some
    /// (write dirty tables back) soon.
    pub fn insert(&self, key: u64, value: Arc<T>) -> Arc<T> {
        let mut inner = self.inner.write();
        if let Some(&i) = inner.index.get(&key) {
            return inner.slots[i].value.clone();
        }
        let slot = Slot {
            key,
            value: value.clone(),
            referenced: AtomicBool::new(true),
        };
        if inner.slots.len() < self.capacity {
            let i = inner.slots.len();
            inner.slots.push(slot);
            inner.index.insert(key, i);
            return value;
        }
        let n = inner.slots.len();
        for _ in 0..2 * n {
            let h = inner.hand;
            inner.hand = (h + 1) % n;
            let s = &inner.slots[h];
            if s.referenced.swap(false, Ordering::Relaxed) {
                continue;
            }
            if s.value.pinned() {
                continue;
            }
            let old = s.key;
            inner.index.remove(&old);
            inner.slots[h] = slot;
            inner.index.insert(key, h);
            return value;
        }
        let i = inner.slots.len();
        inner.slots.push(slot);
        inner.index.insert(key, i);
        value
    }

    /// Drops `key` from the cache (when its cluster is freed or moved).
    pub fn remove(&self, key: u64) -> Option<Arc<T>> {
        let mut inner = self.inner.write();
        let i = inner.index.remove(&key)?;
        let last = inner.slots.len() - 1;
        let slot = inner.slots.swap_remove(i);
        if i != last {
            let moved = inner.slots[i].key;
            inner.index.insert(moved, i);
        }
        if inner.hand >= inner.slots.len() {
            inner.hand = 0;
        }
        Some(slot.value)
    }

    /// Every cached (key, value) pair for which `pick` says yes.
    pub fn select(&self, pick: impl Fn(&T) -> bool) -> Vec<(u64, Arc<T>)> {
        let inner = self.inner.read();
        inner
            .slots
            .iter()
            .filter(|s| pick(&s.value))
            .map(|s| (s.key, s.value.clone()))
            .collect()
    }

    /// Drops values that are not pinned until the cache is back within its capacity.
    pub fn shrink_to_capacity(&self) {
        let mut inner = self.inner.write();
        let mut i = 0;
        while inner.slots.len() > self.capacity && i < inner.slots.len() {
            if !inner.slots[i].value.pinned() {
                let slot = inner.slots.swap_remove(i);
                inner.index.remove(&slot.key);
                if i < inner.slots.len() {
                    let moved = inner.slots[i].key;
                    inner.index.insert(moved, i);
                }
            } else {
                i += 1;
            }
        }
        if inner.hand >= inner.slots.len() {
            inner.hand = 0;
        }
    }

    /// Whether the cache holds more than its capacity.
    pub fn over_capacity(&self) -> bool {
        self.inner.read().slots.len() > self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value pinned when odd.
    impl Pinned for u32 {
        fn pinned(&self) -> bool {
            self % 2 == 1
        }
    }

    #[test]
    fn evicts_unreferenced_and_respects_pins() {
        let c: Cache<u32> = Cache::new(2);
        c.insert(1, Arc::new(2));
        c.insert(2, Arc::new(4));
        c.insert(3, Arc::new(6));
        assert_eq!(c.len(), 2);
        assert!(c.get(3).is_some());
        // Only pinned values: the cache grows instead of dropping them.
        let c: Cache<u32> = Cache::new(2);
        for k in 1..=3 {
            c.insert(k, Arc::new(1));
        }
        assert_eq!(c.len(), 3);
        assert!(c.over_capacity());
        c.shrink_to_capacity();
        assert_eq!(c.len(), 3);
        assert_eq!(*c.remove(3).unwrap(), 1);
        assert!(c.get(3).is_none());
        assert!(!c.over_capacity());
    }

    #[test]
    fn insert_returns_existing() {
        let c: Cache<u32> = Cache::new(4);
        let a = c.insert(7, Arc::new(2));
        let b = c.insert(7, Arc::new(4));
        assert_eq!(*a, 2);
        assert_eq!(*b, 2);
    }

    #[test]
    fn l2_table_bytes_roundtrip() {
        let mut bytes = vec![0u8; 64];
        bytes[8..16].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
        let t = L2Table::from_bytes(&bytes);
        assert_eq!(t.word(1), 0x8000_0000_0005_0000);
        assert!(!t.is_dirty());
        t.set_word(2, 5);
        assert!(t.is_dirty());
        let mut expect = bytes.clone();
        expect[16..24].copy_from_slice(&5u64.to_be_bytes());
        assert_eq!(t.to_bytes(), expect);
    }
}
