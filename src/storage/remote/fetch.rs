//! Reads of a remote object in aligned blocks. A read looks for each block in memory,
//! then in the disk cache; the blocks still missing are claimed (one fetch in flight per
//! block: a reader that needs a block another reader is fetching waits for that fetch)
//! and fetched with one ranged request per run of adjacent claimed blocks. A sequential
//! reader's requests grow past what it asked, up to [`MAX_READAHEAD`].
//!
//! A reader first does its own fetches, then waits for the others' (a fetch never waits
//! for anything), so readers cannot wait for each other in a cycle.

use super::Stats;
use super::disk::DiskEntry;
use super::http::{Client, FetchError, ObjectInfo};
use lru::LruCache;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The largest sequential readahead, in bytes.
pub const MAX_READAHEAD: u64 = 8 << 20;
/// The largest single request, in bytes (a read larger than this is split).
const MAX_REQUEST: u64 = 16 << 20;
/// Bytes of blocks kept in memory (besides the disk cache).
const MEMORY_BYTES: u64 = 32 << 20;

type Block = Arc<[u8]>;
type Outcome = Result<Block, String>;

/// A fetch in flight: its readers wait here for its outcome.
#[derive(Default)]
struct Slot {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

impl Slot {
    fn finish(&self, o: Outcome) {
        *self.outcome.lock() = Some(o);
        self.done.notify_all();
    }

    fn wait(&self) -> Outcome {
        let mut g = self.outcome.lock();
        while g.is_none() {
            self.done.wait(&mut g);
        }
        g.clone().unwrap_or_else(|| Err("lost fetch".into()))
    }
}

struct State {
    memory: LruCache<u64, Block>,
    in_flight: HashMap<u64, Arc<Slot>>,
}

/// Where the last sequential read ended, and the readahead window it earned.
#[derive(Default)]
struct Sequence {
    next: u64,
    window: u64,
}

pub struct Fetcher {
    client: Client,
    info: ObjectInfo,
    block: u64,
    blocks: u64,
    disk: Option<DiskEntry>,
    state: Mutex<State>,
    seq: Mutex<Sequence>,
    /// The object changed during the mount: every read fails from then on.
    changed: AtomicBool,
    stats: Arc<Stats>,
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl Fetcher {
    pub fn new(
        client: Client,
        info: ObjectInfo,
        block: u64,
        disk: Option<DiskEntry>,
        stats: Arc<Stats>,
    ) -> Fetcher {
        let cap = (MEMORY_BYTES / block).max(16) as usize;
        Fetcher {
            client,
            blocks: info.size.div_ceil(block),
            info,
            block,
            disk,
            state: Mutex::new(State {
                memory: LruCache::new(NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN)),
                in_flight: HashMap::new(),
            }),
            seq: Mutex::new(Sequence::default()),
            changed: AtomicBool::new(false),
            stats,
        }
    }

    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    fn block_len(&self, i: u64) -> u64 {
        (self.info.size - i * self.block).min(self.block)
    }

    /// How many blocks to fetch past a read of `[off, off + len)`: none for random
    /// reads; for a sequential reader a window that doubles up to [`MAX_READAHEAD`].
    fn readahead(&self, off: u64, len: u64) -> u64 {
        let mut s = self.seq.lock();
        let near = off + 2 * self.block >= s.next && off <= s.next + self.block;
        if near && s.next > 0 {
            s.window = (s.window * 2).clamp(self.block, MAX_READAHEAD);
            s.next = s.next.max(off + len);
        } else {
            s.window = 0;
            s.next = off + len;
        }
        s.window / self.block
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if self.changed.load(Ordering::Relaxed) {
            return Err(eio(format!(
                "{} changed during the mount; refusing to read it further",
                self.client.shown()
            )));
        }
        if off >= self.info.size || buf.is_empty() {
            return Ok(0);
        }
        let len = (self.info.size - off).min(buf.len() as u64);
        let first = off / self.block;
        let last = (off + len - 1) / self.block;
        let ahead = self.readahead(off, len);
        let blocks = self.blocks(first, last, ahead)?;
        let mut done = 0usize;
        for (k, b) in blocks.iter().enumerate() {
            let start = (first + k as u64) * self.block;
            let from = (off + done as u64 - start) as usize;
            let n = (b.len() - from).min(len as usize - done);
            buf[done..done + n].copy_from_slice(&b[from..from + n]);
            done += n;
        }
        self.stats
            .bytes_read
            .fetch_add(done as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// Blocks `first..=last`, fetching what is missing (and `ahead` blocks more).
    fn blocks(&self, first: u64, last: u64, ahead: u64) -> io::Result<Vec<Block>> {
        let n = (last - first + 1) as usize;
        let mut got: Vec<Option<Block>> = vec![None; n];
        let mut waits: Vec<(u64, Arc<Slot>)> = Vec::new();
        let mut unknown = Vec::new();
        {
            let mut st = self.state.lock();
            for i in first..=last {
                if let Some(b) = st.memory.get(&i) {
                    got[(i - first) as usize] = Some(b.clone());
                    self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
                } else if let Some(s) = st.in_flight.get(&i) {
                    waits.push((i, s.clone()));
                } else {
                    unknown.push(i);
                }
            }
        }
        let mut need = Vec::new();
        for i in unknown {
            match self.disk.as_ref().and_then(|d| d.load(i)) {
                Some(b) => {
                    let b: Block = b.into();
                    self.state.lock().memory.put(i, b.clone());
                    self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                    got[(i - first) as usize] = Some(b);
                }
                None => need.push(i),
            }
        }
        // Blocks past the read worth fetching with it: not cached on disk.
        let ahead_end = (last + 1 + ahead).min(self.blocks);
        let mut extra = Vec::new();
        if !need.is_empty() && need.last() == Some(&last) {
            for j in last + 1..ahead_end {
                if self.disk.as_ref().is_some_and(|d| d.has(j)) {
                    break;
                }
                extra.push(j);
            }
        }
        let mut claimed: Vec<(u64, Arc<Slot>)> = Vec::new();
        {
            let mut st = self.state.lock();
            for i in need {
                if let Some(b) = st.memory.get(&i) {
                    got[(i - first) as usize] = Some(b.clone());
                } else if let Some(s) = st.in_flight.get(&i) {
                    waits.push((i, s.clone()));
                } else {
                    let s = Arc::new(Slot::default());
                    st.in_flight.insert(i, s.clone());
                    claimed.push((i, s));
                }
            }
            let needed = claimed.len() as u64;
            self.stats
                .fetched_for_reads
                .fetch_add(needed, Ordering::Relaxed);
            if claimed.last().is_some_and(|(i, _)| *i == last) {
                for j in extra {
                    if st.memory.contains(&j) || st.in_flight.contains_key(&j) {
                        break;
                    }
                    let s = Arc::new(Slot::default());
                    st.in_flight.insert(j, s.clone());
                    claimed.push((j, s));
                    self.stats.readahead_blocks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Our own fetches first: one request per run of adjacent blocks.
        let mut error = None;
        let mut k = 0;
        while k < claimed.len() {
            let mut end = k + 1;
            while end < claimed.len()
                && claimed[end].0 == claimed[end - 1].0 + 1
                && (claimed[end].0 - claimed[k].0 + 1) * self.block <= MAX_REQUEST
            {
                end += 1;
            }
            if let Err(e) = self.fetch_run(&claimed[k..end]) {
                error.get_or_insert(e);
            }
            k = end;
        }
        for (i, s) in &claimed {
            if (first..=last).contains(i) {
                match s.wait() {
                    Ok(b) => got[(i - first) as usize] = Some(b),
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        for (i, s) in waits {
            self.stats.waited.fetch_add(1, Ordering::Relaxed);
            match s.wait() {
                Ok(b) => got[(i - first) as usize] = Some(b),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = error {
            return Err(eio(e));
        }
        got.into_iter()
            .map(|b| b.ok_or_else(|| eio("a block was not fetched".into())))
            .collect()
    }

    /// Fetches adjacent claimed blocks with one request and hands them to their slots.
    fn fetch_run(&self, run: &[(u64, Arc<Slot>)]) -> Result<(), String> {
        let first = run[0].0;
        let start = first * self.block;
        let len: u64 = run.iter().map(|(i, _)| self.block_len(*i)).sum();
        let result = if self.changed.load(Ordering::Relaxed) {
            Err(FetchError::Changed("changed earlier".into()))
        } else {
            self.client.get_range(start, len as usize, &self.info)
        };
        match result {
            Ok(bytes) => {
                let mut blocks = Vec::with_capacity(run.len());
                let mut pos = 0usize;
                for (i, _) in run {
                    let n = self.block_len(*i) as usize;
                    blocks.push(Block::from(&bytes[pos..pos + n]));
                    pos += n;
                }
                {
                    let mut st = self.state.lock();
                    for ((i, _), b) in run.iter().zip(&blocks) {
                        st.memory.put(*i, b.clone());
                        st.in_flight.remove(i);
                    }
                }
                for ((_, s), b) in run.iter().zip(&blocks) {
                    s.finish(Ok(b.clone()));
                }
                if let Some(d) = &self.disk {
                    for ((i, _), b) in run.iter().zip(&blocks) {
                        d.store(*i, b);
                    }
                }
                Ok(())
            }
            Err(e) => {
                let end = start + len - 1;
                let msg = match &e {
                    FetchError::Changed(m) => {
                        if !self.changed.swap(true, Ordering::Relaxed) {
                            log::error!(
                                "{}: {m}; it changed during the mount: every further read of it fails",
                                self.client.shown()
                            );
                        }
                        format!("{} changed during the mount ({m})", self.client.shown())
                    }
                    FetchError::Fatal(m) | FetchError::Transient(m) => {
                        log::error!("{}: GET bytes={start}-{end}: {m}", self.client.shown());
                        format!("GET bytes={start}-{end}: {m}")
                    }
                };
                {
                    let mut st = self.state.lock();
                    for (i, _) in run {
                        st.in_flight.remove(i);
                    }
                }
                for (_, s) in run {
                    s.finish(Err(msg.clone()));
                }
                Err(msg)
            }
        }
    }
}
