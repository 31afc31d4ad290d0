//! Remote images: objects in S3-compatible stores (`s3://BUCKET/KEY`) and on web servers
//! (`http://`, `https://`, read with range requests), as read-only [`Storage`].
//!
//! Only chains that name a URL come here; local images never touch this module (no
//! client, no thread, no cache directory).
//!
//! - [`location`]: the names (URLs), how they are shown without secrets, and how a name
//!   stored in a remote image resolves against the image's URL (same host or bucket).
//! - [`s3`]: credentials, region and endpoint as the AWS tools find them, and signing.
//! - [`http`]: the requests, their checks (206, range, size, ETag) and the retries.
//! - [`fetch`]: reads in aligned blocks: a memory cache, the disk cache, one request
//!   for adjacent missing blocks, sequential readahead, one fetch per block at a time
//!   (concurrent readers of a block wait for the fetch in flight).
//! - [`disk`]: the bounded on-disk cache, reused by later mounts.
//!
//! Crates: ureq 3 (a blocking HTTP/1.1 client with rustls and the webpki roots: no async
//! runtime to keep alive across the mount daemon's fork, and a small dependency tree)
//! and rusty-s3 (a sans-I/O S3 request signer: pre-signed URLs that any client can
//! send). object_store and OpenDAL need a tokio runtime for what is here a handful of
//! blocking range requests. rust-ini reads the AWS configuration files.
//!
//! Consistency: the object's size and version (ETag, else Last-Modified) are read at
//! open; every ranged answer must carry the same (requests send `If-Match`), and the
//! disk cache is keyed by address and version. Once an object is seen to have changed,
//! every later read of it fails (EIO, with a log line): a reader never gets a mix of two
//! versions.

mod disk;
mod fetch;
pub mod http;
pub mod location;
mod s3;

pub use disk::default_dir as default_cache_dir;
pub use http::HttpSettings;
pub use location::{Location, is_remote};

use super::Storage;
use crate::error::{Error, Result};
use disk::{CacheDir, DiskEntry};
use http::{Client, ObjectInfo, Target};
use parking_lot::Mutex;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// Default size of the blocks fetched and cached.
pub const DEFAULT_BLOCK: u64 = 256 << 10;
/// Smallest and largest block sizes.
pub const MIN_BLOCK: u64 = 4 << 10;
/// The largest block size.
pub const MAX_BLOCK: u64 = 16 << 20;
/// Default bound of the disk cache.
pub const DEFAULT_CACHE_MAX: u64 = 1 << 30;

/// How remote objects are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Where the disk cache lives (`None`: [`default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Bound of the disk cache in bytes; 0 disables it.
    pub cache_max: u64,
    /// Endpoint of an S3-compatible store (else from the environment, else AWS).
    pub s3_endpoint: Option<String>,
    /// Size of the blocks fetched and cached (a power of two).
    pub block: u64,
    /// Timeouts, retries and TLS.
    pub http: HttpSettings,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            cache_dir: None,
            cache_max: DEFAULT_CACHE_MAX,
            s3_endpoint: None,
            block: DEFAULT_BLOCK,
            http: HttpSettings::default(),
        }
    }
}

/// What one object's reads cost: requests, bytes and cache use.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP requests sent.
    pub requests: AtomicU64,
    /// Requests retried after a failure.
    pub retries: AtomicU64,
    /// Bytes received from the server.
    pub bytes_fetched: AtomicU64,
    /// Bytes handed to readers.
    pub bytes_read: AtomicU64,
    /// Blocks readers needed, by where they were found.
    pub memory_hits: AtomicU64,
    /// Blocks found in the disk cache.
    pub disk_hits: AtomicU64,
    /// Blocks fetched from the server for a reader.
    pub fetched_for_reads: AtomicU64,
    /// Blocks fetched ahead of a sequential reader.
    pub readahead_blocks: AtomicU64,
    /// Blocks readers waited for while another reader fetched them.
    pub waited: AtomicU64,
}

/// A snapshot of one object's [`Stats`], for `qcow2fs status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatsReport {
    /// The object's URL.
    pub url: String,
    /// Its length in bytes.
    pub size: u64,
    /// Whether blocks are cached on disk.
    pub cached_on_disk: bool,
    /// HTTP requests sent.
    pub requests: u64,
    /// Requests retried after a failure.
    pub retries: u64,
    /// Bytes received from the server.
    pub bytes_fetched: u64,
    /// Bytes handed to readers.
    pub bytes_read: u64,
    /// Blocks found in memory.
    pub memory_hits: u64,
    /// Blocks found in the disk cache.
    pub disk_hits: u64,
    /// Blocks fetched for a reader.
    pub fetched_for_reads: u64,
    /// Blocks fetched ahead of a sequential reader.
    pub readahead_blocks: u64,
    /// Blocks waited for while another reader fetched them.
    pub waited: u64,
}

struct Registered {
    url: String,
    size: u64,
    cached: bool,
    stats: Weak<Stats>,
}

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// The statistics of every remote object this process has open.
pub fn stats() -> Vec<StatsReport> {
    let mut reg = REGISTRY.lock();
    reg.retain(|r| r.stats.strong_count() > 0);
    reg.iter()
        .filter_map(|r| {
            let s = r.stats.upgrade()?;
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            Some(StatsReport {
                url: r.url.clone(),
                size: r.size,
                cached_on_disk: r.cached,
                requests: g(&s.requests),
                retries: g(&s.retries),
                bytes_fetched: g(&s.bytes_fetched),
                bytes_read: g(&s.bytes_read),
                memory_hits: g(&s.memory_hits),
                disk_hits: g(&s.disk_hits),
                fetched_for_reads: g(&s.fetched_for_reads),
                readahead_blocks: g(&s.readahead_blocks),
                waited: g(&s.waited),
            })
        })
        .collect()
}

/// Opens remote objects with one set of options, sharing one cache directory.
#[derive(Debug)]
pub struct Remote {
    opts: RemoteOptions,
    dir: OnceLock<Option<Arc<CacheDir>>>,
}

impl Remote {
    /// Remote stores read with `opts`.
    pub fn new(opts: RemoteOptions) -> Remote {
        Remote {
            opts,
            dir: OnceLock::new(),
        }
    }

    /// The options.
    pub fn options(&self) -> &RemoteOptions {
        &self.opts
    }

    fn cache_dir(&self) -> Result<Option<Arc<CacheDir>>> {
        if let Some(d) = self.dir.get() {
            return Ok(d.clone());
        }
        let dir = if self.opts.cache_max == 0 {
            None
        } else {
            match (&self.opts.cache_dir, default_cache_dir()) {
                (Some(d), _) => Some(CacheDir::open(d, self.opts.cache_max)?),
                (None, Some(d)) => match CacheDir::open(&d, self.opts.cache_max) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        log::warn!("{e:#}; reading remote images without a disk cache");
                        None
                    }
                },
                (None, None) => None,
            }
        };
        Ok(self.dir.get_or_init(|| dir).clone())
    }

    /// Opens the object at `loc`: asks its size and version, and opens its cache entry.
    pub fn open(&self, loc: &Location) -> Result<RemoteStore> {
        let shown = loc.shown();
        let target = match loc {
            Location::Http(u) => Target::Http(u.clone()),
            Location::S3 { bucket, key } => Target::S3(
                s3::S3Target::new(bucket, key, self.opts.s3_endpoint.as_deref())
                    .map_err(|e| e.in_file(Path::new(&shown)))?,
            ),
        };
        let stats = Arc::new(Stats::default());
        let client = Client::new(target, shown.clone(), self.opts.http.clone(), stats.clone())?;
        let info = client.head()?;
        let block = self.opts.block;
        let disk = match (self.cache_dir()?, info.version()) {
            (Some(dir), Some(version)) => {
                DiskEntry::open(&dir, &loc.identity(), &shown, &version, info.size, block)
            }
            (Some(_), None) => {
                log::info!(
                    "{shown}: the server gives neither ETag nor Last-Modified; reading it without the disk cache"
                );
                None
            }
            (None, _) => None,
        };
        REGISTRY.lock().push(Registered {
            url: shown.clone(),
            size: info.size,
            cached: disk.is_some(),
            stats: Arc::downgrade(&stats),
        });
        log::debug!(
            "{shown}: {} bytes, version {}",
            info.size,
            info.version().unwrap_or_else(|| "unknown".into())
        );
        Ok(RemoteStore {
            fetcher: fetch::Fetcher::new(client, info, block, disk, stats),
            shown,
        })
    }
}

/// A remote object as a read-only store.
pub struct RemoteStore {
    fetcher: fetch::Fetcher,
    shown: String,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("object", &self.shown)
            .finish()
    }
}

impl RemoteStore {
    /// The object's location as shown in messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The object's size and version, as read at open.
    pub fn info(&self) -> &ObjectInfo {
        self.fetcher.info()
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl Storage for RemoteStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.fetcher.read_at(buf, off)
    }

    fn write_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.fetcher.info().size)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
}

/// Checks a block size given as an option.
pub fn check_block(size: u64) -> Result<u64> {
    if !size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&size) {
        return Err(Error::invalid(format!(
            "block size {size}: expected a power of two from 4K to 16M"
        )));
    }
    Ok(size)
}
