//! The on-disk cache of fetched blocks, reused by later mounts.
//!
//! One entry per object version: `NAME.data`, a sparse file holding the blocks at their
//! offsets in the object, and `NAME.idx`, a header (block size, object size, version,
//! location) followed by one 8-byte word per block: 0 when the block is absent, else a
//! marker bit and the CRC-32 of the block. NAME is a hash of the object's address and
//! another of its version (ETag, or Last-Modified and size) and the block size, so an
//! entry of an old version is never opened for a new one (and is deleted when the new
//! one is opened).
//!
//! A block is written before its word, without syncs: after a crash a word may describe
//! a block that was not written, which its CRC then refuses (the block is fetched again).
//! An entry in use is locked (`flock`, exclusive): a second mount of the same object at
//! the same time reads it without a disk cache, and eviction skips entries in use.
//!
//! The directory is the user's own, made 0700 (one others may write to is refused), and
//! the files 0600. The total size is
//! bounded: past `max`, whole entries not in use go first, least recently used first;
//! then the blocks this process wrote, oldest first; then the whole entry in use.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const HEADER: u64 = 4096;
const MAGIC: &str = "qcow2fs remote cache 1\n";
const PRESENT: u64 = 1 << 63;

/// The default cache directory: `/var/cache/qcow2fs` for root, else
/// `$XDG_CACHE_HOME/qcow2fs` or `~/.cache/qcow2fs`.
pub fn default_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/cache/qcow2fs"));
    }
    let env = |n: &str| {
        std::env::var_os(n)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("qcow2fs"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash16(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes())[..8])
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A private file in the cache directory (never through a symbolic link).
fn open_private(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let md = f.metadata()?;
    // SAFETY: geteuid has no preconditions.
    if !md.is_file() || md.uid() != unsafe { libc::geteuid() } || md.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a private regular file of this user",
        ));
    }
    Ok(f)
}

/// A cache directory and its size bound, shared by the entries one process opened there.
#[derive(Debug)]
pub struct CacheDir {
    path: PathBuf,
    max: u64,
    /// Bytes the directory holds, as last counted plus what was added since.
    total: Mutex<Option<u64>>,
}

struct Listed {
    stem: String,
    bytes: u64,
    used: i64,
}

impl CacheDir {
    /// Makes (or checks) the private directory `path`.
    pub fn open(path: &Path, max: u64) -> Result<Arc<CacheDir>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| Error::io(path, "creating the cache directory", e))?;
        let md = std::fs::symlink_metadata(path)
            .map_err(|e| Error::io(path, "inspecting the cache directory", e))?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        // Others must not be able to plant or swap files in it (the files themselves
        // are private: 0600).
        if !md.is_dir() || md.uid() != uid || md.mode() & 0o022 != 0 {
            return Err(Error::unsupported(format!(
                "the cache directory is not a directory of user {uid} that only its owner may write to (mode {:o}, owner {}); fix it or choose another cache_dir",
                md.mode() & 0o7777,
                md.uid()
            ))
            .in_file(path));
        }
        Ok(Arc::new(CacheDir {
            path: path.to_path_buf(),
            max,
            total: Mutex::new(None),
        }))
    }

    fn list(&self) -> Vec<Listed> {
        let mut out: Vec<Listed> = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.path) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((stem, ext)) = name.rsplit_once('.') else {
                continue;
            };
            if ext != "idx" && ext != "data" {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            let bytes = md.blocks() * 512;
            match out.iter_mut().find(|l| l.stem == stem) {
                Some(l) => {
                    l.bytes += bytes;
                    if ext == "idx" {
                        l.used = md.mtime();
                    }
                }
                None => out.push(Listed {
                    stem: stem.to_string(),
                    bytes,
                    used: if ext == "idx" { md.mtime() } else { i64::MAX },
                }),
            }
        }
        out
    }

    /// Deletes entry `stem` unless another process (or another entry of this one) holds
    /// it; whether it was deleted.
    fn remove_unused(&self, stem: &str) -> bool {
        let idx = self.path.join(format!("{stem}.idx"));
        if let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&idx)
            && !try_lock(&f)
        {
            return false;
        }
        let _ = std::fs::remove_file(self.path.join(format!("{stem}.data")));
        let _ = std::fs::remove_file(&idx);
        true
    }

    /// Deletes the entries of other versions of the object whose names start with
    /// `prefix`, when not in use.
    fn remove_old_versions(&self, prefix: &str, keep: &str) {
        for l in self.list() {
            if l.stem.starts_with(prefix) && l.stem != keep && self.remove_unused(&l.stem) {
                log::info!("cache: removed {} (an older version of the object)", l.stem);
            }
        }
    }

    /// Accounts for `bytes` more; past the bound, deletes entries not in use (least
    /// recently used first) and returns how many bytes are still over 90% of the bound.
    fn add(&self, bytes: u64) -> u64 {
        let mut total = self.total.lock();
        let t = total.get_or_insert_with(|| self.list().iter().map(|l| l.bytes).sum());
        *t += bytes;
        if *t <= self.max {
            return 0;
        }
        // Count again (other processes write here too), then evict.
        let mut listed = self.list();
        *t = listed.iter().map(|l| l.bytes).sum();
        let target = self.max / 10 * 9;
        listed.sort_by_key(|l| l.used);
        for l in listed {
            if *t <= target {
                break;
            }
            if self.remove_unused(&l.stem) {
                log::debug!("cache: evicted {} ({} bytes)", l.stem, l.bytes);
                *t = t.saturating_sub(l.bytes);
            }
        }
        t.saturating_sub(target)
    }

    fn sub(&self, bytes: u64) {
        if let Some(t) = self.total.lock().as_mut() {
            *t = t.saturating_sub(bytes);
        }
    }
}

/// The cached blocks of one object version.
#[derive(Debug)]
pub struct DiskEntry {
    dir: Arc<CacheDir>,
    stem: String,
    idx: File,
    data: File,
    header: Vec<u8>,
    block: u64,
    size: u64,
    /// Blocks written by this process, oldest first (what it evicts first).
    written: Mutex<VecDeque<u64>>,
    disabled: AtomicBool,
}

impl DiskEntry {
    /// Opens (or starts) the entry of object `identity` at `version`; `None` when the
    /// entry is in use by another process or cannot be used (a log line says why).
    pub fn open(
        dir: &Arc<CacheDir>,
        identity: &str,
        shown: &str,
        version: &str,
        size: u64,
        block: u64,
    ) -> Option<DiskEntry> {
        let prefix = hash16(identity);
        let stem = format!(
            "{prefix}-{}",
            hash16(&format!("{version}\n{block}\n{size}"))
        );
        let open = |path: &Path| {
            open_private(path)
                .map_err(|e| {
                    log::warn!(
                        "cache: cannot use {}: {e}; reading {shown} uncached",
                        path.display()
                    )
                })
                .ok()
        };
        let idx_path = dir.path.join(format!("{stem}.idx"));
        let idx = open(&idx_path)?;
        if !try_lock(&idx) {
            log::info!("cache: {shown} is in use by another process; reading it uncached");
            return None;
        }
        let data = open(&dir.path.join(format!("{stem}.data")))?;
        let mut header =
            format!("{MAGIC}block {block}\nsize {size}\nversion {version}\nurl {shown}\n")
                .into_bytes();
        header.truncate(HEADER as usize);
        header.resize(HEADER as usize, 0);
        let mut have = vec![0u8; HEADER as usize];
        let matches =
            matches!(idx.read_at(&mut have, 0), Ok(n) if n == HEADER as usize) && have == header;
        if !matches {
            // New, or not what its name says: start afresh.
            if idx.set_len(0).is_err()
                || data.set_len(0).is_err()
                || idx.write_all_at(&header, 0).is_err()
            {
                log::warn!(
                    "cache: cannot initialize {}; reading {shown} uncached",
                    idx_path.display()
                );
                return None;
            }
        }
        // Mark the entry as recently used.
        // SAFETY: futimens on a descriptor we own; a null time list means "now".
        unsafe { libc::futimens(idx.as_raw_fd(), std::ptr::null()) };
        dir.remove_old_versions(&prefix, &stem);
        Some(DiskEntry {
            dir: dir.clone(),
            stem,
            idx,
            data,
            header,
            block,
            size,
            written: Mutex::new(VecDeque::new()),
            disabled: AtomicBool::new(false),
        })
    }

    fn block_len(&self, i: u64) -> usize {
        (self.size - i * self.block).min(self.block) as usize
    }

    fn word(&self, i: u64) -> u64 {
        let mut w = [0u8; 8];
        match self.idx.read_at(&mut w, HEADER + i * 8) {
            Ok(8) => u64::from_le_bytes(w),
            _ => 0,
        }
    }

    /// Whether block `i` is (said to be) cached.
    pub fn has(&self, i: u64) -> bool {
        !self.disabled.load(Ordering::Relaxed) && self.word(i) & PRESENT != 0
    }

    /// Block `i`, if cached and intact.
    pub fn load(&self, i: u64) -> Option<Vec<u8>> {
        if self.disabled.load(Ordering::Relaxed) {
            return None;
        }
        let w = self.word(i);
        if w & PRESENT == 0 {
            return None;
        }
        let mut buf = vec![0u8; self.block_len(i)];
        match self.data.read_exact_at(&mut buf, i * self.block) {
            Ok(()) if crc32fast::hash(&buf) as u64 == w & 0xffff_ffff => Some(buf),
            _ => {
                log::debug!(
                    "cache: block {i} of {} failed its check; fetching it again",
                    self.stem
                );
                let _ = self.idx.write_all_at(&0u64.to_le_bytes(), HEADER + i * 8);
                None
            }
        }
    }

    /// Keeps block `i`; failures only disable the cache for this object.
    pub fn store(&self, i: u64, bytes: &[u8]) {
        if self.disabled.load(Ordering::Relaxed) || self.has(i) {
            return;
        }
        let over = self.dir.add(bytes.len() as u64);
        if over > 0 {
            self.evict_own(over);
        }
        let word = PRESENT | crc32fast::hash(bytes) as u64;
        let r = self
            .data
            .write_all_at(bytes, i * self.block)
            .and_then(|()| self.idx.write_all_at(&word.to_le_bytes(), HEADER + i * 8));
        match r {
            Ok(()) => self.written.lock().push_back(i),
            Err(e) => {
                self.dir.sub(bytes.len() as u64);
                if !self.disabled.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "cache: writing to {}: {e}; no longer caching this object",
                        self.dir.path.display()
                    );
                }
            }
        }
    }

    /// Frees at least `bytes` of this entry: the blocks this process wrote, oldest
    /// first, or else the whole entry.
    fn evict_own(&self, bytes: u64) {
        let mut freed = 0;
        let mut written = self.written.lock();
        while freed < bytes {
            let Some(i) = written.pop_front() else { break };
            let len = self.block_len(i) as u64;
            let _ = self.idx.write_all_at(&0u64.to_le_bytes(), HEADER + i * 8);
            // SAFETY: fallocate on a descriptor we own.
            unsafe {
                libc::fallocate(
                    self.data.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (i * self.block) as libc::off_t,
                    len as libc::off_t,
                );
            }
            freed += len;
        }
        if freed < bytes {
            let had = self.idx.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
                + self.data.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
            let ok = self.idx.set_len(0).is_ok()
                && self.data.set_len(0).is_ok()
                && self.idx.write_all_at(&self.header, 0).is_ok();
            if !ok {
                self.disabled.store(true, Ordering::Relaxed);
            }
            freed = had;
        }
        self.dir.sub(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(max: u64) -> (tempfile::TempDir, Arc<CacheDir>) {
        let t = tempfile::tempdir().unwrap();
        let d = CacheDir::open(&t.path().join("c"), max).unwrap();
        (t, d)
    }

    #[test]
    fn blocks_survive_reopen_and_versions_do_not_mix() {
        let (_t, dir) = dir_with(1 << 30);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        {
            let e = DiskEntry::open(&dir, "http://h/x", "http://h/x", "etag:\"1\"", 10_000, 4096)
                .unwrap();
            assert!(
                DiskEntry::open(&dir, "http://h/x", "http://h/x", "etag:\"1\"", 10_000, 4096)
                    .is_none(),
                "in use"
            );
            e.store(0, &data[..4096]);
            e.store(2, &data[8192..]);
            assert_eq!(e.load(2).as_deref(), Some(&data[8192..]));
        }
        let e =
            DiskEntry::open(&dir, "http://h/x", "http://h/x", "etag:\"1\"", 10_000, 4096).unwrap();
        assert_eq!(e.load(0).as_deref(), Some(&data[..4096]));
        assert!(e.load(1).is_none());
        // A damaged block is refused, not served.
        e.data.write_all_at(b"X", 8200).unwrap();
        assert!(e.load(2).is_none());
        assert!(!e.has(2));
        drop(e);
        // A new version never sees the old blocks, and the old entry goes.
        let e =
            DiskEntry::open(&dir, "http://h/x", "http://h/x", "etag:\"2\"", 10_000, 4096).unwrap();
        assert!(e.load(0).is_none());
        assert_eq!(dir.list().len(), 1);
        let md = std::fs::metadata(&dir.path).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        for l in std::fs::read_dir(&dir.path).unwrap() {
            assert_eq!(l.unwrap().metadata().unwrap().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn stays_within_its_bound() {
        let (_t, dir) = dir_with(256 << 10);
        let block = vec![7u8; 64 << 10];
        let other =
            DiskEntry::open(&dir, "http://h/old", "http://h/old", "v", 1 << 20, 64 << 10).unwrap();
        for i in 0..3 {
            other.store(i, &block);
        }
        drop(other);
        let e =
            DiskEntry::open(&dir, "http://h/new", "http://h/new", "v", 8 << 20, 64 << 10).unwrap();
        for i in 0..40 {
            e.store(i, &block);
            let used: u64 = dir.list().iter().map(|l| l.bytes).sum();
            assert!(
                used <= (256 << 10) + (64 << 10) + 2 * 4096 + 8192,
                "{used} bytes after block {i}"
            );
        }
        // The unused entry went first; the newest blocks are kept.
        assert!(dir.list().iter().all(|l| l.stem == e.stem));
        assert!(e.load(39).is_some());
        assert!(e.load(0).is_none());
    }
}
