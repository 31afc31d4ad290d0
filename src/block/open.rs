//! Opening an image with its whole backing chain: name resolution, format detection, the
//! security policy for files an image names, loop detection, the depth limit, and
//! unlocking each encrypted layer with its key (`keys`).
//!
//! Images and the files they name may be remote (`http(s)://`, `s3://`): names stored in
//! a remote image resolve against its URL, on the same host or in the same bucket, and
//! reach local files only with `follow_local`; a local image may name a URL only with
//! `follow_remote`. Remote images are read-only and take no locks.

use super::keys::{KeyLoader, Keys};
use super::qcow2::Shared;
use super::{BlockDev, Qcow2Layer, RawLayer};
use crate::engine::{Image, ImageOptions, SnapshotKey, View};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::MAGIC;
use crate::storage::remote::{self, Location, Remote, RemoteOptions};
use crate::storage::{FileStorage, Storage, lock};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The deepest backing chain qcow2fs follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Whether backing files are followed at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Open the backing chain (subject to the checks in this module).
    #[default]
    Follow,
    /// Expose the top image alone: unallocated ranges read as zeros.
    Deny,
}

/// How to open a chain.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// How the qcow2 images of the chain are opened (cache size, writability...).
    pub image: ImageOptions,
    /// Whether and how backing files are followed.
    pub backing: BackingPolicy,
    /// When set, backing and data files must lie under this directory.
    pub backing_dir: Option<PathBuf>,
    /// Take no locks (like qemu-img -U): for reading an image that is in use.
    pub force_share: bool,
    /// How remote images are read.
    pub remote: RemoteOptions,
    /// Remote images may name local backing and data files (by absolute path).
    pub follow_local: bool,
    /// Local images may name remote backing and data files (URLs).
    pub follow_remote: bool,
    /// Passphrases for encrypted layers.
    pub keys: Keys,
    /// Open encrypted layers that have no key locked, for their metadata only (`info`);
    /// otherwise such a layer is an error that says how to give a key.
    pub locked_ok: bool,
}

/// An opened image: its active disk and the backing layers below it.
#[derive(Debug)]
pub struct Chain {
    /// The image itself: its active disk, seen through the backing chain.
    pub top: Arc<Qcow2Layer>,
    /// The backing layers: `layers[0]` is the direct backing file (depth 1), each seen
    /// through its own chain.
    pub layers: Vec<Arc<dyn BlockDev>>,
}

impl Chain {
    /// The top image's engine.
    pub fn image(&self) -> &Arc<Image> {
        self.top.image()
    }

    /// A view of the internal snapshot `key` names.
    pub fn snapshot(&self, key: SnapshotKey) -> Arc<Qcow2Layer> {
        Arc::new(self.top.with_view(View::Snapshot(key)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Qcow2,
    Raw,
}

/// Where a layer's bytes are: a local file or a remote object.
#[derive(Clone, Debug)]
enum Source {
    Local(PathBuf),
    Remote(Location),
}

impl Source {
    /// The name used for the layer in messages, `info` and the mount (a URL is shown
    /// without its query string).
    fn path(&self) -> PathBuf {
        match self {
            Source::Local(p) => p.clone(),
            Source::Remote(l) => PathBuf::from(l.shown()),
        }
    }

    /// The source `path` names: a URL, or a local path.
    fn of(path: &Path) -> Result<Source> {
        if let Some(s) = path.to_str()
            && let Some(loc) = Location::parse(s).map_err(|e| e.during("opening the image"))?
        {
            return Ok(Source::Remote(loc));
        }
        Ok(Source::Local(path.to_path_buf()))
    }
}

/// An opened source, before it is locked and wrapped.
enum Opened {
    Local(File),
    Remote(Box<remote::RemoteStore>),
}

/// What makes two names the same file (loop detection).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    File(u64, u64),
    Url(String),
}

/// Opens an image, backing file or data file: regular files only, without blocking
/// (a FIFO named by an image must not hang the mount).
fn open_file_mode(path: &Path, what: &str, referrer: Option<&Path>, write: bool) -> Result<File> {
    crate::storage::open_regular(path, write).map_err(|e| {
        let what = match referrer {
            Some(r) => format!("opening the {what} named by {}", r.display()),
            None => format!("opening the {what}"),
        };
        Error::io(path, what, e)
    })
}

/// Opens a source for reading (and writing, for a local image opened writable).
fn open_source(
    src: &Source,
    what: &str,
    referrer: Option<&Path>,
    write: bool,
    remote: &mut Option<Remote>,
    opts: &OpenOptions,
) -> Result<Opened> {
    match src {
        Source::Local(p) => Ok(Opened::Local(open_file_mode(p, what, referrer, write)?)),
        Source::Remote(loc) => {
            if write {
                return Err(Error::read_only(format!(
                    "remote {what}s are read-only: mount without rw (-o overlay keeps writes in a local throwaway overlay)"
                ))
                .in_file(Path::new(&loc.shown())));
            }
            let r = remote.get_or_insert_with(|| Remote::new(opts.remote.clone()));
            let store = r.open(loc).map_err(|e| match referrer {
                Some(by) => e.during(format!("opening the {what} named by {}", by.display())),
                None => e,
            })?;
            Ok(Opened::Remote(Box::new(store)))
        }
    }
}

impl Opened {
    fn identity(&self, path: &Path) -> Result<Identity> {
        match self {
            Opened::Local(f) => {
                use std::os::unix::fs::MetadataExt;
                let md = f
                    .metadata()
                    .map_err(|e| Error::io(path, "inspecting the file", e))?;
                Ok(Identity::File(md.dev(), md.ino()))
            }
            Opened::Remote(r) => Ok(Identity::Url(r.shown().to_string())),
        }
    }

    /// Whether the file starts with the qcow2 magic.
    fn is_qcow2(&self) -> bool {
        let mut magic = [0u8; 4];
        let n = match self {
            Opened::Local(f) => {
                use std::os::unix::fs::FileExt;
                f.read_at(&mut magic, 0).ok()
            }
            Opened::Remote(r) => r.read_at(&mut magic, 0).ok(),
        };
        n == Some(4) && u32::from_be_bytes(magic) == MAGIC
    }

    /// Locks a local file the way QEMU would for this use (unless told to share
    /// everything), and makes the store.
    fn into_storage(
        self,
        path: &Path,
        writable: bool,
        opts: &OpenOptions,
    ) -> Result<Arc<dyn Storage>> {
        Ok(match self {
            Opened::Local(f) => {
                take_lock(&f, path, writable, opts)?;
                Arc::new(FileStorage::new(f))
            }
            Opened::Remote(r) => Arc::new(*r),
        })
    }
}

/// Whether a name would be a protocol prefix for QEMU ("nbd:...", "http://...").
fn has_protocol(name: &[u8]) -> bool {
    match name.iter().position(|&c| c == b':') {
        Some(colon) => !name[..colon].contains(&b'/'),
        None => false,
    }
}

/// Resolves a file name stored in `referrer` (see the module documentation).
fn resolve(referrer: &Source, name: &[u8], what: &str, opts: &OpenOptions) -> Result<Source> {
    let rpath = referrer.path();
    if name.is_empty() {
        return Err(Error::corrupt(format!("the {what} name is empty")).in_file(&rpath));
    }
    let url = remote::is_remote(name);
    if url || matches!(referrer, Source::Remote(_)) {
        let text = std::str::from_utf8(name).map_err(|_| {
            Error::unsupported(format!("the {what} name is not UTF-8, which a URL must be"))
                .in_file(&rpath)
        })?;
        match referrer {
            Source::Remote(base) if !(opts.follow_local && text.starts_with('/')) => {
                if text.starts_with("json:") || (!url && has_protocol(name)) {
                    return Err(pseudo_name(what, &String::from_utf8_lossy(name), &rpath));
                }
                return base.join(text).map(Source::Remote).map_err(|e| {
                    e.during(format!("resolving the {what} name"))
                        .in_file(&rpath)
                });
            }
            Source::Remote(_) => {}
            Source::Local(_) => {
                let loc = Location::parse(text)
                    .map_err(|e| {
                        e.during(format!("resolving the {what} name"))
                            .in_file(&rpath)
                    })?
                    .ok_or_else(|| Error::invalid("not a URL"))?;
                if !opts.follow_remote {
                    return Err(Error::unsupported(format!(
                        "{what} '{}' is a URL; a local image's remote {what} is followed only with -o backing=follow-remote (or use -o backing=deny)",
                        loc.shown()
                    ))
                    .in_file(&rpath));
                }
                return Ok(Source::Remote(loc));
            }
        }
    }
    let shown = String::from_utf8_lossy(name);
    if name.starts_with(b"json:") || has_protocol(name) {
        return Err(pseudo_name(what, &shown, &rpath));
    }
    let p = Path::new(OsStr::from_bytes(name));
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        rpath.parent().unwrap_or(Path::new("")).join(p)
    };
    if let Some(dir) = &opts.backing_dir {
        let canon_dir = dir
            .canonicalize()
            .map_err(|e| Error::io(dir, "resolving backing_dir", e))?;
        let canon = full.canonicalize().map_err(|e| {
            Error::io(
                &full,
                format!("resolving the {what} named by {}", rpath.display()),
                e,
            )
        })?;
        if !canon.starts_with(&canon_dir) {
            return Err(Error::unsupported(format!(
                "{what} '{shown}' named by {} resolves outside backing_dir {} (choose a backing_dir that contains it)",
                rpath.display(),
                dir.display()
            ))
            .in_file(&full));
        }
    }
    Ok(Source::Local(full))
}

fn pseudo_name(what: &str, shown: &str, referrer: &Path) -> Error {
    let end = shown.find('?').unwrap_or(shown.len());
    Error::unsupported(format!(
        "{what} '{}' is a QEMU pseudo-filename (json: or protocol:); only plain paths and http(s)/s3 URLs are followed (rebase the image onto a path, or use -o backing=deny)",
        &shown[..end]
    ))
    .in_file(referrer)
}

/// Locks a file the way QEMU would for this use, unless told to share everything.
fn take_lock(file: &File, path: &Path, writable: bool, opts: &OpenOptions) -> Result<()> {
    if opts.force_share {
        return Ok(());
    }
    if writable {
        lock::lock_writer(file, path)
    } else {
        lock::lock_reader(file, path)
    }
}

struct Pending {
    path: PathBuf,
    kind: PendingKind,
}

enum PendingKind {
    Qcow2 {
        image: Arc<Image>,
        data_file: Option<(PathBuf, Arc<dyn Storage>)>,
    },
    Raw(Arc<dyn Storage>),
}

/// Opens the qcow2 image at `path` and its backing chain.
pub fn open_chain(path: &Path, opts: &OpenOptions) -> Result<Chain> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut seen: Vec<Identity> = Vec::new();
    // Passphrases live until the whole chain is unlocked, then are wiped.
    let mut keys = KeyLoader::new(&opts.keys, opts.locked_ok);
    let mut remote: Option<Remote> = None;
    // The next layer: its source, format, the image that names it, and the source if
    // it was opened already (to probe its format).
    let mut next: Option<(Source, Format, PathBuf, Option<Opened>)> =
        Some((Source::of(path)?, Format::Qcow2, PathBuf::new(), None));
    while let Some((src, format, referrer, opened)) = next.take() {
        let depth = pending.len();
        let top = depth == 0;
        let what = if top { "image" } else { "backing file" };
        if depth > MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(format!(
                "backing chain is deeper than {MAX_CHAIN_DEPTH} layers"
            ))
            .in_file(path));
        }
        let cur = src.path();
        let writable = top && opts.image.writable;
        let by = (!top).then_some(referrer.as_path());
        let file = match opened {
            Some(o) => o,
            None => open_source(&src, what, by, writable, &mut remote, opts)?,
        };
        // A loop is found before locking: the lock this mount took on the image would
        // otherwise be reported as another process's.
        let id = file.identity(&cur)?;
        if seen.contains(&id) {
            return Err(Error::corrupt(format!(
                "backing chain loops: {} names {} again",
                referrer.display(),
                cur.display()
            ))
            .in_file(path));
        }
        seen.push(id);
        let storage = file.into_storage(&cur, writable, opts)?;
        if format == Format::Raw {
            pending.push(Pending {
                path: cur,
                kind: PendingKind::Raw(storage),
            });
            break;
        }
        let mut image_opts = opts.image.clone();
        if !top {
            image_opts.cache_bytes = (image_opts.cache_bytes / 4).max(1 << 20);
            image_opts.writable = false;
        }
        let image = Arc::new(Image::open(&cur, storage, &image_opts)?);
        keys.unlock(&image, depth as u32)?;
        let header = image.header();
        let data_file = match &header.data_file {
            Some(name) if header.has_data_file() => {
                let ds = resolve(&src, name, "data file", opts)?;
                let dp = ds.path();
                let f = open_source(&ds, "data file", Some(&cur), writable, &mut remote, opts)?;
                let store = f.into_storage(&dp, writable, opts)?;
                if writable {
                    image.set_data_store(dp.clone(), store.clone());
                }
                Some((dp, store))
            }
            _ => None,
        };
        if let (Some(name), BackingPolicy::Follow) = (&header.backing_file, opts.backing) {
            let bs = resolve(&src, name, "backing file", opts)?;
            let bp = bs.path();
            let mut opened = None;
            let fmt = match header.backing_format.as_deref() {
                Some("qcow2") => Format::Qcow2,
                Some("raw") => Format::Raw,
                Some(other) => {
                    return Err(Error::unsupported(format!(
                        "backing file {} has format '{other}'; only qcow2 and raw are supported",
                        bp.display()
                    ))
                    .in_file(&cur));
                }
                None => {
                    let f = open_source(&bs, "backing file", Some(&cur), false, &mut remote, opts)?;
                    if !f.is_qcow2() {
                        return Err(Error::unsupported(format!(
                            "backing file {} has no format in the image header and is not qcow2; refusing to expose it as raw (set the format with `qemu-img rebase -u -F raw`, or use -o backing=deny)",
                            bp.display()
                        ))
                        .in_file(&cur));
                    }
                    opened = Some(f);
                    Format::Qcow2
                }
            };
            next = Some((bs, fmt, cur.clone(), opened));
        }
        pending.push(Pending {
            path: cur,
            kind: PendingKind::Qcow2 { image, data_file },
        });
    }

    keys.finish(path)?;

    let mut backing: Option<Arc<dyn BlockDev>> = None;
    let mut built: Vec<Arc<dyn BlockDev>> = Vec::new();
    let mut top: Option<Arc<Qcow2Layer>> = None;
    let n = pending.len();
    for (i, p) in pending.into_iter().enumerate().rev() {
        let layer: Arc<dyn BlockDev> = match p.kind {
            PendingKind::Raw(s) => Arc::new(RawLayer::new(&p.path, s)?),
            PendingKind::Qcow2 { image, data_file } => {
                let shared = Arc::new(Shared::new(image, data_file, backing.take()));
                let q = Arc::new(Qcow2Layer::new(shared, View::Active));
                if i == 0 {
                    top = Some(q.clone());
                }
                q
            }
        };
        if i > 0 {
            built.push(layer.clone());
        }
        backing = Some(layer);
    }
    debug_assert_eq!(built.len() + 1, n);
    built.reverse();
    let top = top.ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no image"))?;
    Ok(Chain { top, layers: built })
}
