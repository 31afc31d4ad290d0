//! Opening an image with its whole backing chain: name resolution, format detection, the
//! security policy for files an image names, loop detection, the depth limit, and
//! unlocking each encrypted layer with its key (`keys`).

use super::keys::{KeyLoader, Keys};
use super::qcow2::Shared;
use super::{BlockDev, Qcow2Layer, RawLayer};
use crate::engine::{Image, ImageOptions, SnapshotKey, View};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::MAGIC;
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
    pub image: ImageOptions,
    pub backing: BackingPolicy,
    /// When set, backing and data files must lie under this directory.
    pub backing_dir: Option<PathBuf>,
    /// Take no locks (like qemu-img -U): for reading an image that is in use.
    pub force_share: bool,
    /// Passphrases for encrypted layers.
    pub keys: Keys,
    /// Open encrypted layers that have no key locked, for their metadata only (`info`);
    /// otherwise such a layer is an error that says how to give a key.
    pub locked_ok: bool,
}

/// An opened image: its active disk and the backing layers below it.
#[derive(Debug)]
pub struct Chain {
    pub top: Arc<Qcow2Layer>,
    /// The backing layers: `layers[0]` is the direct backing file (depth 1), each seen
    /// through its own chain.
    pub layers: Vec<Arc<dyn BlockDev>>,
}

impl Chain {
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

fn open_file(path: &Path, what: &str, referrer: Option<&Path>) -> Result<File> {
    open_file_mode(path, what, referrer, false)
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

/// Whether a name would be a protocol prefix for QEMU ("nbd:...", "http://...").
fn has_protocol(name: &[u8]) -> bool {
    match name.iter().position(|&c| c == b':') {
        Some(colon) => !name[..colon].contains(&b'/'),
        None => false,
    }
}

/// Resolves a file name stored in `referrer` against the directory of `referrer`.
fn resolve(referrer: &Path, name: &[u8], what: &str, opts: &OpenOptions) -> Result<PathBuf> {
    let shown = String::from_utf8_lossy(name);
    if name.is_empty() {
        return Err(Error::corrupt(format!("the {what} name is empty")).in_file(referrer));
    }
    if name.starts_with(b"json:") || has_protocol(name) {
        return Err(Error::unsupported(format!(
            "{what} '{shown}' is a QEMU pseudo-filename (json: or protocol:); only plain paths are followed (rebase the image onto a path, or use -o backing=deny)"
        ))
        .in_file(referrer));
    }
    let p = Path::new(OsStr::from_bytes(name));
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        referrer.parent().unwrap_or(Path::new("")).join(p)
    };
    if let Some(dir) = &opts.backing_dir {
        let canon_dir = dir
            .canonicalize()
            .map_err(|e| Error::io(dir, "resolving backing_dir", e))?;
        let canon = full.canonicalize().map_err(|e| {
            Error::io(
                &full,
                format!("resolving the {what} named by {}", referrer.display()),
                e,
            )
        })?;
        if !canon.starts_with(&canon_dir) {
            return Err(Error::unsupported(format!(
                "{what} '{shown}' named by {} resolves outside backing_dir {} (choose a backing_dir that contains it)",
                referrer.display(),
                dir.display()
            ))
            .in_file(&full));
        }
    }
    Ok(full)
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

fn probe_qcow2(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    matches!(file.read_at(&mut magic, 0), Ok(4)) && u32::from_be_bytes(magic) == MAGIC
}

/// A file's identity (device and inode), which hard links and other names share.
fn file_id(file: &File, path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = file
        .metadata()
        .map_err(|e| Error::io(path, "inspecting the file", e))?;
    Ok((md.dev(), md.ino()))
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
    let mut seen: Vec<(u64, u64)> = Vec::new();
    // Passphrases live until the whole chain is unlocked, then are wiped.
    let mut keys = KeyLoader::new(&opts.keys, opts.locked_ok);
    let mut next: Option<(PathBuf, Format, PathBuf)> =
        Some((path.to_path_buf(), Format::Qcow2, PathBuf::new()));
    while let Some((cur, format, referrer)) = next.take() {
        let depth = pending.len();
        let top = depth == 0;
        let what = if top { "image" } else { "backing file" };
        if depth > MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(format!(
                "backing chain is deeper than {MAX_CHAIN_DEPTH} layers"
            ))
            .in_file(path));
        }
        let writable = top && opts.image.writable;
        let file = open_file_mode(&cur, what, (!top).then_some(referrer.as_path()), writable)?;
        // A loop is found before locking: the lock this mount took on the image would
        // otherwise be reported as another process's.
        let id = file_id(&file, &cur)?;
        if seen.contains(&id) {
            return Err(Error::corrupt(format!(
                "backing chain loops: {} names {} again",
                referrer.display(),
                cur.display()
            ))
            .in_file(path));
        }
        seen.push(id);
        take_lock(&file, &cur, writable, opts)?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
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
                let dp = resolve(&cur, name, "data file", opts)?;
                let f = open_file_mode(&dp, "data file", Some(&cur), writable)?;
                take_lock(&f, &dp, writable, opts)?;
                let store: Arc<dyn Storage> = Arc::new(FileStorage::new(f));
                if writable {
                    image.set_data_store(dp.clone(), store.clone());
                }
                Some((dp, store))
            }
            _ => None,
        };
        if let (Some(name), BackingPolicy::Follow) = (&header.backing_file, opts.backing) {
            let bp = resolve(&cur, name, "backing file", opts)?;
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
                    let f = open_file(&bp, "backing file", Some(&cur))?;
                    if !probe_qcow2(&f) {
                        return Err(Error::unsupported(format!(
                            "backing file {} has no format in the image header and is not qcow2; refusing to expose it as raw (set the format with `qemu-img rebase -u -F raw`, or use -o backing=deny)",
                            bp.display()
                        ))
                        .in_file(&cur));
                    }
                    Format::Qcow2
                }
            };
            next = Some((bp, fmt, cur.clone()));
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
