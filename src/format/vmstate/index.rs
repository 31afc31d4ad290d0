//! Where each page of one RAM block is in the stream: an interval map from page numbers
//! to runs of pages that are either stream data (consecutive `PAGE` records, so page `k`
//! of a run sits `k * (page_size + 8)` bytes after its first) or filled with one byte.
//! Pages in no run were never sent. A page sent again replaces the earlier copy.
//!
//! Cost: one run per stretch of pages sent alike, 24 bytes each, never more than one run
//! per page. While parsing, a stream that sends pages in order (savevm does) builds the
//! final sorted vectors directly; a page sent again, before the end of the last run,
//! moves the block's runs into a B-tree (about 50 bytes a run) for the rest of the
//! parse. The parser caps the total number of runs ([`super::Limits::max_runs`]).

use std::collections::BTreeMap;

/// What one lookup found: `len` bytes (at least 1) that are all of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// What the bytes are.
    pub kind: ExtentKind,
    /// How many bytes, at least 1.
    pub len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Where the bytes of an extent come from.
pub enum ExtentKind {
    /// The bytes are in the stream at this offset (never past the end of one page).
    Data {
        /// Stream offset of the first byte.
        stream_offset: u64,
    },
    /// Every byte is this value: a page the stream sent as a fill (zero) page.
    Fill(u8),
    /// Nothing the stream said: never-sent pages, or no RAM at this guest address.
    /// Reads as zeros.
    Hole,
}

impl Extent {
    /// Whether the range reads as zeros without touching the stream (a hole for
    /// `SEEK_HOLE`): a hole or a zero-filled page.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Hole | ExtentKind::Fill(0))
    }
}

/// A run's content, packed: a stream offset (below 2^63) or `FILL | byte`.
const FILL: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    len: u64,
    what: u64,
}

/// Builds the index of one block while the stream is parsed.
#[derive(Debug)]
pub(crate) struct IndexBuilder {
    runs: Runs,
}

#[derive(Debug)]
enum Runs {
    /// Runs in page order, only ever appended to (a stream that sends each page once,
    /// in order, as savevm of a stopped guest does): already the finished layout.
    Sorted { starts: Vec<u64>, runs: Vec<Run> },
    /// After a page landed before the end of the last run (a page sent again).
    Map(BTreeMap<u64, Run>),
}

impl Default for IndexBuilder {
    fn default() -> Self {
        IndexBuilder {
            runs: Runs::Sorted {
                starts: Vec::new(),
                runs: Vec::new(),
            },
        }
    }
}

/// What to record for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageContent {
    Data(u64),
    Fill(u8),
}

impl PageContent {
    fn packed(self) -> u64 {
        match self {
            PageContent::Data(off) => off,
            PageContent::Fill(b) => FILL | b as u64,
        }
    }
}

/// Whether a run of `run.len` pages can take one more page with content `what`.
fn extends(run: &Run, what: u64, stride: u64) -> bool {
    if run.what & FILL != 0 || what & FILL != 0 {
        run.what == what
    } else {
        run.len
            .checked_mul(stride)
            .and_then(|d| run.what.checked_add(d))
            == Some(what)
    }
}

/// The content of page `k` of a run.
fn advance(what: u64, k: u64, stride: u64) -> u64 {
    if what & FILL != 0 {
        what
    } else {
        what + k * stride
    }
}

impl IndexBuilder {
    /// Records `page` as `content`. `stride` is the page size plus the 8-byte record
    /// header. Returns how the number of runs changed (-1, 0, 1 or 2).
    pub(crate) fn set(&mut self, page: u64, content: PageContent, stride: u64) -> i64 {
        let what = content.packed();
        match &mut self.runs {
            Runs::Sorted { starts, runs } => {
                let end = match (starts.last(), runs.last()) {
                    (Some(&s), Some(r)) => s + r.len,
                    _ => 0,
                };
                if starts.is_empty() || page >= end {
                    if page == end
                        && let Some(r) = runs.last_mut()
                        && extends(r, what, stride)
                    {
                        r.len += 1;
                        return 0;
                    }
                    starts.push(page);
                    runs.push(Run { len: 1, what });
                    return 1;
                }
                let mut map: BTreeMap<u64, Run> = starts.drain(..).zip(runs.drain(..)).collect();
                let before = map.len() as i64;
                map_set(&mut map, page, what, stride);
                let delta = map.len() as i64 - before;
                self.runs = Runs::Map(map);
                delta
            }
            Runs::Map(map) => {
                let before = map.len() as i64;
                map_set(map, page, what, stride);
                map.len() as i64 - before
            }
        }
    }

    pub(crate) fn finish(self, page_size: u64, pages: u64) -> PageIndex {
        let (mut starts, mut runs) = match self.runs {
            Runs::Sorted { starts, runs } => (starts, runs),
            Runs::Map(map) => map.into_iter().unzip(),
        };
        starts.shrink_to_fit();
        runs.shrink_to_fit();
        PageIndex {
            starts,
            runs,
            page_size,
            pages,
        }
    }
}

/// Records `page` in a map of runs: extends the last run, or replaces whatever covers
/// `page` and then merges with the run on its left if it can.
fn map_set(map: &mut BTreeMap<u64, Run>, page: u64, what: u64, stride: u64) {
    if let Some(mut last) = map.last_entry() {
        let end = *last.key() + last.get().len;
        if page == end && extends(last.get(), what, stride) {
            last.get_mut().len += 1;
            return;
        }
        if page >= end {
            map.insert(page, Run { len: 1, what });
            return;
        }
    }
    if let Some((&s, &run)) = map.range(..=page).next_back()
        && s + run.len > page
    {
        map.remove(&s);
        if page > s {
            map.insert(
                s,
                Run {
                    len: page - s,
                    what: run.what,
                },
            );
        }
        let right = s + run.len - (page + 1);
        if right > 0 {
            map.insert(
                page + 1,
                Run {
                    len: right,
                    what: advance(run.what, page + 1 - s, stride),
                },
            );
        }
    }
    let merged = match map.range_mut(..page).next_back() {
        Some((&s, run)) if s + run.len == page && extends(run, what, stride) => {
            run.len += 1;
            true
        }
        _ => false,
    };
    if !merged {
        map.insert(page, Run { len: 1, what });
    }
}

/// The finished index of one block.
#[derive(Clone, Debug)]
pub struct PageIndex {
    starts: Vec<u64>,
    runs: Vec<Run>,
    page_size: u64,
    /// The block's length in pages.
    pages: u64,
}

impl PageIndex {
    /// How many runs the index holds.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// The index's heap size in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.starts.capacity() * size_of::<u64>() + self.runs.capacity() * size_of::<Run>()
    }

    /// What is at byte `offset` of the block, for at most `max_len` bytes; `None` at or
    /// past the block's end or when `max_len` is 0.
    pub fn lookup(&self, offset: u64, max_len: u64) -> Option<Extent> {
        let ps = self.page_size;
        let size = self.pages * ps;
        if offset >= size || max_len == 0 {
            return None;
        }
        let max_len = max_len.min(size - offset);
        let page = offset / ps;
        let within = offset % ps;
        let i = self.starts.partition_point(|&s| s <= page);
        if i > 0 {
            let (s, run) = (self.starts[i - 1], self.runs[i - 1]);
            if page < s + run.len {
                return Some(if run.what & FILL != 0 {
                    Extent {
                        kind: ExtentKind::Fill(run.what as u8),
                        len: max_len.min((s + run.len) * ps - offset),
                    }
                } else {
                    Extent {
                        kind: ExtentKind::Data {
                            stream_offset: run.what + (page - s) * (ps + 8) + within,
                        },
                        len: max_len.min(ps - within),
                    }
                });
            }
        }
        let next = self.starts.get(i).map_or(size, |&s| s * ps);
        Some(Extent {
            kind: ExtentKind::Hole,
            len: max_len.min(next - offset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;
    const STRIDE: u64 = PS + 8;

    fn kinds(ix: &PageIndex) -> Vec<(u64, ExtentKind)> {
        (0..ix.pages)
            .map(|p| (p, ix.lookup(p * PS, PS).unwrap().kind))
            .collect()
    }

    #[test]
    fn consecutive_pages_make_one_run() {
        let mut b = IndexBuilder::default();
        let mut runs = 0;
        for p in 0..10 {
            runs += b.set(p, PageContent::Data(1000 + p * STRIDE), STRIDE);
        }
        for p in 10..20 {
            runs += b.set(p, PageContent::Fill(0), STRIDE);
        }
        assert_eq!(runs, 2);
        let ix = b.finish(PS, 32);
        assert_eq!(ix.runs(), 2);
        assert_eq!(
            ix.lookup(3 * PS + 5, 1 << 20),
            Some(Extent {
                kind: ExtentKind::Data {
                    stream_offset: 1000 + 3 * STRIDE + 5
                },
                len: PS - 5
            })
        );
        assert_eq!(
            ix.lookup(12 * PS, 1 << 20),
            Some(Extent {
                kind: ExtentKind::Fill(0),
                len: 8 * PS
            })
        );
        assert_eq!(
            ix.lookup(20 * PS + 1, 1 << 20),
            Some(Extent {
                kind: ExtentKind::Hole,
                len: 12 * PS - 1
            })
        );
        assert_eq!(ix.lookup(32 * PS, 1), None);
        assert_eq!(ix.lookup(0, 0), None);
    }

    #[test]
    fn a_page_sent_again_replaces_the_first_copy() {
        let mut b = IndexBuilder::default();
        for p in 0..8 {
            b.set(p, PageContent::Data(p * STRIDE), STRIDE);
        }
        b.set(3, PageContent::Fill(0xaa), STRIDE);
        b.set(7, PageContent::Data(99_999), STRIDE);
        b.set(0, PageContent::Fill(0), STRIDE);
        b.set(1, PageContent::Fill(0), STRIDE);
        let ix = b.finish(PS, 9);
        let got = kinds(&ix);
        let want = |p: u64| match p {
            0 | 1 => ExtentKind::Fill(0),
            3 => ExtentKind::Fill(0xaa),
            7 => ExtentKind::Data {
                stream_offset: 99_999,
            },
            8 => ExtentKind::Hole,
            _ => ExtentKind::Data {
                stream_offset: p * STRIDE,
            },
        };
        for (p, k) in got {
            assert_eq!(k, want(p), "page {p}");
        }
    }

    #[test]
    fn out_of_order_pages_merge_with_their_left_neighbour() {
        let mut b = IndexBuilder::default();
        b.set(10, PageContent::Fill(0), STRIDE);
        b.set(5, PageContent::Fill(0), STRIDE);
        b.set(6, PageContent::Fill(0), STRIDE);
        b.set(7, PageContent::Fill(0), STRIDE);
        let ix = b.finish(PS, 16);
        assert_eq!(ix.runs(), 2);
        assert_eq!(ix.lookup(5 * PS, u64::MAX).unwrap().len, 3 * PS);
        assert_eq!(ix.lookup(8 * PS, u64::MAX).unwrap().kind, ExtentKind::Hole);
        assert_eq!(ix.lookup(8 * PS, u64::MAX).unwrap().len, 2 * PS);
    }

    proptest::proptest! {
        /// The index answers like a plain per-page table, whatever order pages come in:
        /// mostly ascending runs (as savevm sends them) with pages sent again.
        #[test]
        fn matches_a_per_page_table(
            ops in proptest::collection::vec((0u64..48, 0u8..4, proptest::bool::ANY), 1..200)
        ) {
            let pages = 48;
            let mut table: Vec<Option<ExtentKind>> = vec![None; pages as usize];
            let mut b = IndexBuilder::default();
            let mut runs = 0i64;
            let mut next = 0u64;
            for (i, &(p, v, seq)) in ops.iter().enumerate() {
                // Half the writes continue in order, so runs of data pages form.
                let page = if seq { next % pages } else { p };
                next = page + 1;
                let content = match v {
                    0 => PageContent::Fill(0),
                    1 => PageContent::Fill(0xee),
                    // Consecutive data records sit one stride apart in the stream.
                    _ => PageContent::Data(1_000_000 * (v as u64) + page * STRIDE + (i as u64 % 2) * 7),
                };
                runs += b.set(page, content, STRIDE);
                table[page as usize] = Some(match content {
                    PageContent::Fill(x) => ExtentKind::Fill(x),
                    PageContent::Data(off) => ExtentKind::Data { stream_offset: off },
                });
            }
            let ix = b.finish(PS, pages);
            proptest::prop_assert_eq!(ix.runs() as i64, runs);
            for p in 0..pages {
                let want = table[p as usize].unwrap_or(ExtentKind::Hole);
                let got = ix.lookup(p * PS, PS).unwrap();
                proptest::prop_assert_eq!(got.kind, want, "page {}", p);
                proptest::prop_assert_eq!(got.len, PS);
                // A fill or hole extent covers only pages of the same kind.
                let long = ix.lookup(p * PS, u64::MAX).unwrap();
                if !matches!(long.kind, ExtentKind::Data { .. }) {
                    for q in p..p + long.len / PS {
                        proptest::prop_assert_eq!(table[q as usize].unwrap_or(ExtentKind::Hole), want);
                    }
                }
            }
        }
    }
}
