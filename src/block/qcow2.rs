//! A qcow2 image (its active disk or one of its snapshots) as a disk: follows the engine's
//! mappings, reads data from the image or its external data file (decrypted by `crypt`
//! for an encrypted image), decompresses compressed clusters, and passes unallocated
//! ranges to the backing layer.

use super::{BlockDev, LayerInfo, Status};
use crate::engine::{Image, MapKind, View};
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::CompressedDesc;
use crate::format::header::CompressionType;
use crate::format::units::HostOffset;
use crate::storage::{Extent, Storage};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Decompressed clusters kept per image.
const COMPRESSED_CACHE_CLUSTERS: usize = 16;

/// What every view of one image shares.
#[derive(Debug)]
pub(crate) struct Shared {
    // (see `write` for the write path)
    pub(crate) image: Arc<Image>,
    pub(crate) data_file: Option<(PathBuf, Arc<dyn Storage>)>,
    pub(crate) backing: Option<Arc<dyn BlockDev>>,
    compression: CompressionType,
    compressed: Mutex<VecDeque<(HostOffset, Arc<[u8]>)>>,
}

impl Shared {
    /// Writes bytes as they are (see `crypt` for guest data of encrypted images).
    pub(super) fn write_data(&self, buf: &[u8], host: HostOffset) -> Result<()> {
        let (path, store) = self.data_store();
        store
            .write_at(buf, host.0)
            .map_err(|e| Error::io(path, format!("writing data at {host}"), e))
    }

    pub(crate) fn new(
        image: Arc<Image>,
        data_file: Option<(PathBuf, Arc<dyn Storage>)>,
        backing: Option<Arc<dyn BlockDev>>,
    ) -> Self {
        Shared {
            compression: image.header().compression_type,
            image,
            data_file,
            backing,
            compressed: Mutex::new(VecDeque::with_capacity(COMPRESSED_CACHE_CLUSTERS)),
        }
    }

    /// The store and path guest data lives in.
    fn data_store(&self) -> (&Path, &Arc<dyn Storage>) {
        match &self.data_file {
            Some((p, s)) => (p, s),
            None => (self.image.path(), self.image.storage()),
        }
    }

    /// Reads stored bytes as they are (see `crypt` for guest data of encrypted images).
    pub(super) fn read_data(&self, buf: &mut [u8], host: HostOffset) -> Result<()> {
        let (path, store) = self.data_store();
        let mut done = 0;
        while done < buf.len() {
            let at = host.0 + done as u64;
            let n = store
                .read_at(&mut buf[done..], at)
                .map_err(|e| Error::io(path, format!("reading data at {at:#x}"), e))?;
            if n == 0 {
                return Err(Error::corrupt(format!(
                    "data at host offset {at:#x} lies past the end of the file"
                ))
                .in_file(path));
            }
            done += n;
        }
        Ok(())
    }

    fn decompressed(&self, desc: CompressedDesc) -> Result<Arc<[u8]>> {
        {
            let mut c = self.compressed.lock();
            if let Some(i) = c.iter().position(|(k, _)| *k == desc.offset) {
                let hit = c.remove(i).unwrap();
                let v = hit.1.clone();
                c.push_front(hit);
                return Ok(v);
            }
        }
        let image = &self.image;
        let cs = image.cluster_size() as usize;
        let mut input = vec![0u8; desc.size as usize];
        // A compressed range may end past the end of the file; that part reads as zeros.
        image
            .storage()
            .read_exact_or_zeros(&mut input, desc.offset.0)
            .map_err(|e| {
                Error::io(
                    image.path(),
                    format!("reading compressed data at {}", desc.offset),
                    e,
                )
            })?;
        let mut out = vec![0u8; cs];
        compressed::decompress(self.compression, &input, &mut out).map_err(|e| {
            Error::corrupt(format!(
                "compressed cluster at host offset {} ({} bytes): {e}",
                desc.offset, desc.size
            ))
            .in_file(image.path())
        })?;
        let out: Arc<[u8]> = out.into();
        let mut c = self.compressed.lock();
        if c.len() >= COMPRESSED_CACHE_CLUSTERS {
            c.pop_back();
        }
        c.push_front((desc.offset, out.clone()));
        Ok(out)
    }
}

/// One view (active disk or snapshot) of a qcow2 image.
#[derive(Debug)]
pub struct Qcow2Layer {
    pub(crate) shared: Arc<Shared>,
    view: View,
    info: LayerInfo,
}

impl Qcow2Layer {
    pub(crate) fn new(shared: Arc<Shared>, view: View) -> Self {
        let info = LayerInfo {
            path: shared.image.path().to_path_buf(),
            format: "qcow2",
        };
        Qcow2Layer { shared, view, info }
    }

    /// The active disk of an image opened directly with [`Image::open`] over a store of
    /// the caller's choosing (a memory store, a store that injects faults). Such an image
    /// may name neither a backing file nor an external data file: use `open_chain` for
    /// those.
    pub fn standalone(image: Arc<Image>) -> Result<Qcow2Layer> {
        let h = image.header();
        if h.backing_file.is_some() || h.has_data_file() {
            return Err(Error::unsupported(
                "the image names a backing or data file; open it with open_chain",
            )
            .in_file(image.path()));
        }
        Ok(Qcow2Layer::new(
            Arc::new(Shared::new(image, None, None)),
            View::Active,
        ))
    }

    /// The image's engine, shared by every view of it.
    pub fn image(&self) -> &Arc<Image> {
        &self.shared.image
    }

    /// Which disk of the image this layer shows: the active one or a snapshot.
    pub fn view(&self) -> View {
        self.view
    }

    /// Another view of the same image, sharing caches and backing chain.
    pub fn with_view(&self, view: View) -> Qcow2Layer {
        Qcow2Layer::new(self.shared.clone(), view)
    }

    /// The external data file, when the image has one.
    pub fn data_file(&self) -> Option<&Path> {
        self.shared.data_file.as_ref().map(|(p, _)| p.as_path())
    }
}

impl BlockDev for Qcow2Layer {
    fn size(&self) -> u64 {
        self.shared.image.view_size(self.view)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let image = &self.shared.image;
        if image.is_writable() && self.view == View::Active && !buf.is_empty() {
            let cs = image.cluster_size();
            let start = off & !(cs - 1);
            let end = (off + buf.len() as u64).next_multiple_of(cs);
            let _g = image.lock_range(start, end, false);
            return self.read_unlocked(buf, off);
        }
        self.read_unlocked(buf, off)
    }

    fn writable(&self) -> bool {
        self.view == View::Active && self.shared.image.is_writable()
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.write_locked(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.zero_locked(off, len, unmap)
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.resize_locked(size)
    }

    fn flush(&self) -> Result<()> {
        self.shared.image.flush()
    }

    fn close(&self) -> Result<()> {
        self.shared.image.close()
    }
    fn status(&self, off: u64, len: u64, probe_host: bool) -> Result<Status> {
        let m = self.shared.image.map(self.view, off, len)?;
        // The backing file is read at the same guest offset (past the disk for VM state).
        let off = self.shared.image.view_base(self.view) + off;
        // Like QEMU, no host offsets for an encrypted image (and so no looking for holes
        // in its file: a hole there would not read as zeros).
        let encrypted = self.shared.image.is_encrypted();
        let allocated = |zero, data, offset: Option<u64>| Status {
            len: m.len,
            depth: 0,
            present: true,
            zero,
            data,
            compressed: false,
            offset: offset.filter(|_| !encrypted),
        };
        Ok(match m.kind {
            // QEMU looks for host holes only in images that look preallocated.
            MapKind::Data { host }
                if !probe_host || encrypted || !self.shared.image.looks_preallocated() =>
            {
                allocated(false, true, Some(host.0))
            }
            MapKind::Data { host } => {
                // Like qemu-img map: data over a hole of the host file reads as zeros.
                let (path, store) = self.shared.data_store();
                let ext = store
                    .extent(host.0, m.len)
                    .map_err(|e| Error::io(path, format!("finding data at {host}"), e))?;
                match ext {
                    Extent::Data(n) => Status {
                        len: n,
                        ..allocated(false, true, Some(host.0))
                    },
                    Extent::Hole(n) => Status {
                        len: n,
                        ..allocated(true, true, Some(host.0))
                    },
                }
            }
            MapKind::Compressed { .. } => Status {
                compressed: true,
                ..allocated(false, true, None)
            },
            MapKind::Zero { host } => allocated(true, false, host.map(|h| h.0)),
            MapKind::Unallocated { host } => match &self.shared.backing {
                Some(b) if off < b.size() => {
                    let mut s = b.status(off, m.len.min(b.size() - off), probe_host)?;
                    s.depth += 1;
                    s
                }
                _ => Status {
                    len: m.len,
                    depth: 0,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: host.map(|h| h.0).filter(|_| !encrypted),
                },
            },
        })
    }

    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        self.shared.backing.as_ref()
    }

    fn encrypted(&self) -> bool {
        self.shared.image.is_encrypted()
            || self.shared.backing.as_ref().is_some_and(|b| b.encrypted())
    }

    fn sources(&self) -> Vec<crate::storage::Access> {
        let mut out: Vec<_> = self.shared.image.storage().access().into_iter().collect();
        if let Some((_, store)) = &self.shared.data_file {
            out.extend(store.access());
        }
        if let Some(b) = &self.shared.backing {
            out.extend(b.sources());
        }
        out
    }

    fn data_path(&self) -> &Path {
        self.shared.data_store().0
    }
}

impl Qcow2Layer {
    /// Reads without taking guest range locks (the caller holds them, or none are
    /// needed).
    pub(crate) fn read_unlocked(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
        let (mut head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        let mut at = off;
        // The backing file is read at the same guest offset (past the disk for VM state).
        let base = self.shared.image.view_base(self.view);
        // Compressed clusters are decoded after the rest, several at once when a read
        // spans enough of them to keep more than one core busy.
        let mut packed: Vec<(&mut [u8], CompressedDesc, usize)> = Vec::new();
        while !head.is_empty() {
            let m = self.shared.image.map(self.view, at, head.len() as u64)?;
            let (dst, rest) = std::mem::take(&mut head).split_at_mut(m.len as usize);
            match m.kind {
                MapKind::Data { host } => self.shared.read_guest(dst, host, base + at)?,
                MapKind::Zero { .. } => dst.fill(0),
                MapKind::Unallocated { .. } => match &self.shared.backing {
                    Some(b) => b.read_at(dst, base + at)?,
                    None => dst.fill(0),
                },
                MapKind::Compressed { desc, in_cluster } => {
                    packed.push((dst, desc, in_cluster as usize));
                }
            }
            at += m.len;
            head = rest;
        }
        self.shared.read_compressed(packed)
    }
}

/// Reads that span at least this many compressed clusters decode them in parallel.
const PARALLEL_DECODE_MIN: usize = 4;

impl Shared {
    /// Fills each destination from its compressed cluster (starting `in_cluster` bytes
    /// into it).
    fn read_compressed(&self, pieces: Vec<(&mut [u8], CompressedDesc, usize)>) -> Result<()> {
        let fill = |(dst, desc, start): (&mut [u8], CompressedDesc, usize)| -> Result<()> {
            let c = self.decompressed(desc)?;
            let n = dst.len();
            dst.copy_from_slice(&c[start..start + n]);
            Ok(())
        };
        // Asking the system is not cheap (it reads cgroup files): once per process.
        static WORKERS: OnceLock<usize> = OnceLock::new();
        if pieces.len() < PARALLEL_DECODE_MIN {
            return pieces.into_iter().try_for_each(fill);
        }
        let workers = *WORKERS.get_or_init(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4)
        });
        if workers < 2 {
            return pieces.into_iter().try_for_each(fill);
        }
        let mut groups: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, p) in pieces.into_iter().enumerate() {
            groups[i % workers].push(p);
        }
        let mine = groups.pop().unwrap_or_default();
        std::thread::scope(|s| {
            let others: Vec<_> = groups
                .into_iter()
                .map(|g| s.spawn(move || g.into_iter().try_for_each(fill)))
                .collect();
            let first = mine.into_iter().try_for_each(fill);
            others
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .fold(first, Result::and)
        })
    }
}
