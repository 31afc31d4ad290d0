//! A thin adapter to fuser 0.18: the namespace and file logic are plain functions here
//! and in `namespace`; each `Filesystem` callback is a few lines that call them.

pub mod namespace;

use crate::block::BlockDev;
use crate::error::Error;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, Request,
};
use namespace::{FileRole, Namespace, Node, NodeKind};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::OnceLock;
use std::time::Duration;

/// Largest request the kernel may send (with FUSE_MAX_PAGES).
pub const MAX_REQUEST: u32 = 1 << 20;

/// Attribute and entry cache lifetime: nothing in a read-only mount ever changes.
const TTL: Duration = Duration::from_secs(3600);

/// Ownership, modes and kernel settings for the mount.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
    /// Kernel readahead window in bytes, if set.
    pub readahead: Option<u32>,
}

/// The filesystem: the namespace plus per-file lazily computed allocation sizes.
pub struct Qcow2Fs {
    ns: Namespace,
    cfg: FsConfig,
    allocated: Vec<OnceLock<u64>>,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Bytes of `dev` that hold data (not holes), for `st_blocks`.
pub fn allocated_bytes(dev: &dyn BlockDev) -> crate::Result<u64> {
    let size = dev.size();
    let mut off = 0;
    let mut total = 0;
    while off < size {
        let s = dev.status(off, size - off, false)?;
        let len = s.len.max(1).min(size - off);
        if !s.zero {
            total += len;
        }
        off += len;
    }
    Ok(total)
}

/// The `whence` answer for SEEK_DATA / SEEK_HOLE: the first offset at or after `off` that
/// starts data (or a hole). `None` means ENXIO (no data at or after `off`).
pub fn seek(dev: &dyn BlockDev, off: u64, want_data: bool) -> crate::Result<Option<u64>> {
    let size = dev.size();
    if off >= size {
        return Ok(None);
    }
    let mut cur = off;
    while cur < size {
        let s = dev.status(cur, size - cur, false)?;
        let len = s.len.max(1).min(size - cur);
        let is_data = !s.zero;
        if is_data == want_data {
            return Ok(Some(cur));
        }
        cur += len;
    }
    // Past the last extent: there is an implicit hole at the end of the file.
    Ok(if want_data { None } else { Some(size) })
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl Qcow2Fs {
    pub fn new(ns: Namespace, cfg: FsConfig) -> Self {
        let allocated = (0..ns.nodes().len()).map(|_| OnceLock::new()).collect();
        Qcow2Fs { ns, cfg, allocated }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The attributes of a node.
    pub fn attr(&self, node: &Node) -> FileAttr {
        let (kind, size, perm, nlink, blocks) = match &node.kind {
            NodeKind::Dir { children } => {
                let subdirs = children
                    .iter()
                    .filter(|&&c| self.ns.node(c).is_some_and(Node::is_dir))
                    .count() as u32;
                (FileType::Directory, 0, 0o555, 2 + subdirs, 0)
            }
            NodeKind::File { dev, .. } => {
                let blocks = self.allocated[(node.ino - 1) as usize].get_or_init(|| {
                    allocated_bytes(&**dev).unwrap_or_else(|e| {
                        log::warn!("{e}");
                        dev.size()
                    })
                });
                (
                    FileType::RegularFile,
                    dev.size(),
                    0o444,
                    1,
                    blocks.div_ceil(512),
                )
            }
        };
        FileAttr {
            ino: INodeNo(node.ino),
            size,
            blocks,
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: (perm & !self.cfg.umask) as u16,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: 65536,
            flags: 0,
        }
    }

    fn file(&self, ino: INodeNo) -> Result<(&Node, &dyn BlockDev, FileRole), Errno> {
        let node = self.ns.node(ino.0).ok_or(Errno::ENOENT)?;
        match &node.kind {
            NodeKind::File { dev, role } => Ok((node, &**dev, *role)),
            NodeKind::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    /// Reads `size` bytes at `off` of a file into a reusable per-thread buffer and hands
    /// the bytes to `reply`.
    pub fn read_file(
        &self,
        ino: INodeNo,
        off: u64,
        size: u32,
        reply: impl FnOnce(&[u8]),
    ) -> Result<(), Errno> {
        let (node, dev, _) = self.file(ino)?;
        let end = dev.size();
        let n = end.saturating_sub(off).min(size as u64) as usize;
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            dev.read_at(&mut buf[..n], off).map_err(|e| {
                log::error!(
                    "read of {:?} at {off:#x} (+{n}): {e}",
                    self.ns.path_of(node.ino)
                );
                errno(&e)
            })?;
            reply(&buf[..n]);
            Ok(())
        })
    }
}

impl Filesystem for Qcow2Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        if let Some(ra) = self.cfg.readahead {
            let _ = config
                .set_max_readahead(ra)
                .or_else(|max| config.set_max_readahead(max));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.ns.lookup(parent.0, name) {
            Some(node) => reply.entry(&TTL, &self.attr(node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ns.node(ino.0) {
            Some(node) => reply.attr(&TTL, &self.attr(node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.file(ino) {
            Err(e) => reply.error(e),
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            // Nothing in a read-only mount changes: keep cached pages across opens.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        if let Err(e) = self.read_file(ino, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        }) && let Some(r) = reply.take()
        {
            r.error(e);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.ns.entries(ino.0) else {
            reply.error(Errno::ENOTDIR);
            return;
        };
        for (i, (child, is_dir, name)) in entries.iter().enumerate().skip(offset as usize) {
            let kind = if *is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let (_, dev, _) = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        match seek(dev, offset as u64, want_data) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                log::error!("lseek: {e}");
                reply.error(errno(&e))
            }
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self
            .ns
            .nodes()
            .iter()
            .map(|n| match &n.kind {
                NodeKind::File { dev, .. } => dev.size(),
                NodeKind::Dir { .. } => 0,
            })
            .sum();
        reply.statfs(
            total.div_ceil(4096),
            0,
            0,
            self.ns.nodes().len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }
}
