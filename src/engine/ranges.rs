//! Guest range locks for writable images (design.md, rule L5): a write holds its clusters
//! exclusively from planning until its entries are published, a read of the active disk
//! holds them shared while it maps and reads, so no request acts on a mapping another is
//! halfway through changing, and no cluster is freed under a reader. The engine's write
//! planner takes the guard as a parameter and checks that it covers what it plans.

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Held>,
    next_id: u64,
}

/// Reader-writer locks over guest byte ranges.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    state: Mutex<State>,
    released: Condvar,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl RangeGuard<'_> {
    /// Whether this guard holds `[start, end)` of `locks` exclusively.
    pub(crate) fn holds_exclusive(&self, locks: &RangeLocks, start: u64, end: u64) -> bool {
        std::ptr::eq(self.locks, locks) && self.exclusive && self.start <= start && end <= self.end
    }
}

impl RangeLocks {
    /// Waits until `[start, end)` can be held (shared or exclusive), then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut st = self.state.lock();
        loop {
            let conflict = st
                .held
                .iter()
                .any(|h| h.start < end && start < h.end && (exclusive || h.exclusive));
            if !conflict {
                let id = st.next_id;
                st.next_id += 1;
                st.held.push(Held {
                    id,
                    start,
                    end,
                    exclusive,
                });
                return RangeGuard {
                    locks: self,
                    id,
                    start,
                    end,
                    exclusive,
                };
            }
            self.released.wait(&mut st);
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.state.lock();
        st.held.retain(|h| h.id != self.id);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn exclusive_ranges_serialize_and_shared_ones_overlap() {
        let locks = Arc::new(RangeLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside, max_inside) =
                    (locks.clone(), inside.clone(), max_inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = locks.lock(100, 200, true);
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        max_inside.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        // Shared holders overlap; an exclusive range next to them does not wait.
        let a = locks.lock(0, 10, false);
        let b = locks.lock(5, 15, false);
        let c = locks.lock(15, 20, true);
        drop((a, b, c));
    }
}
