//! A thin adapter to fuser 0.18: the namespace and file logic are plain functions here
//! and in `namespace`; each `Filesystem` callback is a few lines that call them.

pub mod access;
pub mod namespace;

use crate::block::BlockDev;
use crate::error::Error;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, Request,
};
use namespace::{FileRole, Namespace, Node, NodeKind};
use parking_lot::{Condvar, Mutex};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Largest request the kernel may send (with FUSE_MAX_PAGES).
pub const MAX_REQUEST: u32 = 1 << 20;

/// Attribute and entry cache lifetime: files change only through this mount, and the
/// kernel learns of size changes from the replies.
const TTL: Duration = Duration::from_secs(3600);

/// File handle given to opens that may write (their close flushes).
const FH_WRITER: u64 = 1;

/// Ownership, modes and kernel settings for the mount.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
    /// Kernel readahead window in bytes, if set.
    pub readahead: Option<u32>,
    /// The active disk is writable (`-o rw`).
    pub writable: bool,
}

/// Files open through the mount, for `qcow2fs status`.
#[derive(Debug, Default)]
pub struct OpenFiles {
    pub total: std::sync::atomic::AtomicU64,
    pub writers: std::sync::atomic::AtomicU64,
}

/// The filesystem: the namespace plus per-file lazily computed allocation sizes.
pub struct Qcow2Fs {
    ns: Namespace,
    cfg: FsConfig,
    open_files: Arc<OpenFiles>,
    /// Per inode: allocated bytes (for st_blocks), computed on demand in the background
    /// and forgotten when the file is written; and the modification time of files that
    /// can change.
    allocated: Vec<Arc<BlocksSlot>>,
    mtime: Vec<Mutex<Option<SystemTime>>>,
}

/// How long attributes whose st_blocks is still an estimate may be cached.
const ESTIMATE_TTL: Duration = Duration::from_secs(1);
/// How long a getattr waits for st_blocks before answering with an estimate. Lookups do
/// not wait: an open followed by a read (the first read after mounting) needs no
/// st_blocks, and a lookup's estimate is never cached, so `stat` asks with a getattr.
const BLOCKS_WAIT: Duration = Duration::from_millis(5);

/// A file's allocated bytes: known, or being computed by a background thread (counting
/// them reads every L2 table, seconds on a large image, which must not delay the first
/// lookup or read).
#[derive(Default)]
struct BlocksSlot {
    state: Mutex<Blocks>,
    done: Condvar,
}

#[derive(Default)]
struct Blocks {
    bytes: Option<u64>,
    /// Bumped by every change to the file; a count started before it is dropped.
    generation: u64,
    computing: bool,
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

/// Lowers the calling thread's CPU and I/O priority, so that work in the background
/// (counting a file's allocated bytes) does not slow the requests being served.
fn background_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
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
        // Probing the host file only costs anything in preallocated images, whose data
        // clusters may be holes (as qemu-img map reports them).
        let s = dev.status(cur, size - cur, true)?;
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

/// `fallocate` on a disk file: punching holes and zeroing ranges become qcow2 zero
/// clusters or deallocation; plain allocation grows the disk if asked to.
pub fn fallocate(dev: &dyn BlockDev, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
    let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
    let size = dev.size();
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    if mode & !known != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let log = |e: Error| {
        log::error!("fallocate({mode:#x}) of {length} bytes at {offset:#x}: {e:#}");
        errno(&e)
    };
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
        if !keep_size {
            return Err(Errno::EINVAL);
        }
        let end = end.min(size);
        if offset < end {
            dev.write_zeroes(offset, end - offset, true).map_err(log)?;
        }
        return Ok(());
    }
    if end > size && !keep_size {
        dev.resize(end).map_err(log)?;
    }
    if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
        let end = end.min(dev.size());
        if offset < end {
            dev.write_zeroes(offset, end - offset, false).map_err(log)?;
        }
    }
    Ok(())
}

impl Qcow2Fs {
    pub fn new(ns: Namespace, cfg: FsConfig) -> Self {
        let n = ns.nodes().len();
        Qcow2Fs {
            ns,
            cfg,
            open_files: Arc::default(),
            allocated: (0..n).map(|_| Arc::default()).collect(),
            mtime: (0..n).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Whether a file accepts writes.
    fn is_writable(&self, dev: &dyn BlockDev) -> bool {
        self.cfg.writable && dev.writable()
    }

    /// Records a change to a file: new mtime, st_blocks to be recomputed.
    fn touched(&self, ino: u64) {
        let i = (ino - 1) as usize;
        let mut b = self.allocated[i].state.lock();
        b.bytes = None;
        b.generation += 1;
        *self.mtime[i].lock() = Some(SystemTime::now());
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The counts of open files, shared with whoever reports them.
    pub fn open_files(&self) -> Arc<OpenFiles> {
        self.open_files.clone()
    }

    fn opened(&self, writer: bool) -> FileHandle {
        use std::sync::atomic::Ordering::Relaxed;
        self.open_files.total.fetch_add(1, Relaxed);
        if writer {
            self.open_files.writers.fetch_add(1, Relaxed);
            FileHandle(FH_WRITER)
        } else {
            FileHandle(0)
        }
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        match self.file(ino) {
            Err(e) => reply.error(e),
            Ok((_, dev, _)) => match dev.flush() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    log::error!("flush: {e:#}");
                    reply.error(errno(&e))
                }
            },
        }
    }

    /// Writes everything back and closes the writable disks cleanly (at unmount).
    pub fn close_all(&self) {
        for n in self.ns.nodes() {
            if let NodeKind::File { dev, .. } = &n.kind
                && self.is_writable(&**dev)
            {
                match dev.close() {
                    Ok(()) => log::info!("{}: written back and closed", dev.info().path.display()),
                    Err(e) => log::error!("closing {}: {e:#}", dev.info().path.display()),
                }
            }
        }
    }

    /// A file's allocated bytes and whether that is exact: the count if it is known or
    /// arrives within `wait`, otherwise an overestimate (the file size plus one
    /// block, so that no tool takes the file for one big hole) while the count goes on in
    /// the background.
    fn allocated(&self, i: usize, dev: &Arc<dyn BlockDev>, wait: Duration) -> (u64, bool) {
        let slot = &self.allocated[i];
        let mut b = slot.state.lock();
        if let Some(v) = b.bytes {
            return (v, true);
        }
        if !b.computing {
            b.computing = true;
            let generation = b.generation;
            let (slot, dev) = (slot.clone(), dev.clone());
            std::thread::spawn(move || {
                background_priority();
                let v = allocated_bytes(&*dev).unwrap_or_else(|e| {
                    log::warn!("{e:#}");
                    dev.size()
                });
                let mut b = slot.state.lock();
                b.computing = false;
                if b.generation == generation {
                    b.bytes = Some(v);
                }
                slot.done.notify_all();
            });
        }
        let deadline = Instant::now() + wait;
        while b.bytes.is_none() && b.computing {
            if slot.done.wait_until(&mut b, deadline).timed_out() {
                break;
            }
        }
        match b.bytes {
            Some(v) => (v, true),
            // One block more than the file can hold: never a count, so it can be told apart.
            None => (dev.size() + 512, false),
        }
    }

    /// The most a directory may grant: listing it is reading the active disk's image.
    fn dir_ceiling(&self) -> u32 {
        let sources = self
            .ns
            .nodes()
            .iter()
            .find_map(|n| match &n.kind {
                NodeKind::File {
                    dev,
                    role: FileRole::Active,
                } => Some(dev.sources()),
                _ => None,
            })
            .unwrap_or_default();
        access::dir_ceiling(self.cfg.uid, self.cfg.gid, &sources)
    }

    /// The attributes of a node, and how long the kernel may cache them. For a lookup
    /// (`lookup` true) st_blocks is not waited for, and an estimate is not to be cached.
    pub fn attr_ttl(&self, node: &Node, lookup: bool) -> (FileAttr, Duration) {
        let mut ttl = TTL;
        let (kind, size, perm, nlink, blocks) = match &node.kind {
            NodeKind::Dir { children } => {
                let subdirs = children
                    .iter()
                    .filter(|&&c| self.ns.node(c).is_some_and(Node::is_dir))
                    .count() as u32;
                (
                    FileType::Directory,
                    0,
                    0o555 & self.dir_ceiling(),
                    2 + subdirs,
                    0,
                )
            }
            NodeKind::File { dev, .. } => {
                let wait = if lookup { Duration::ZERO } else { BLOCKS_WAIT };
                let (blocks, exact) = self.allocated((node.ino - 1) as usize, dev, wait);
                if !exact {
                    ttl = if lookup { Duration::ZERO } else { ESTIMATE_TTL };
                }
                let base = if self.is_writable(&**dev) {
                    0o644
                } else {
                    0o444
                };
                let perm = base & access::ceiling(self.cfg.uid, self.cfg.gid, &dev.sources());
                (
                    FileType::RegularFile,
                    dev.size(),
                    perm,
                    1,
                    blocks.div_ceil(512),
                )
            }
        };
        let mtime = self.mtime[(node.ino - 1) as usize]
            .lock()
            .unwrap_or(node.mtime);
        let attr = FileAttr {
            ino: INodeNo(node.ino),
            size,
            blocks,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: node.mtime,
            kind,
            perm: (perm & !self.cfg.umask) as u16,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: 65536,
            flags: 0,
        };
        (attr, ttl)
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
                    "read of {:?} at {off:#x} (+{n}): {e:#}",
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
            Some(node) => {
                let (attr, ttl) = self.attr_ttl(node, true);
                reply.entry(&ttl, &attr, Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ns.node(ino.0) {
            Some(node) => {
                let (attr, ttl) = self.attr_ttl(node, false);
                reply.attr(&ttl, &attr)
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Files change only through this mount, which keeps the kernel's page cache up to
        // date: cached pages stay valid across opens.
        match self.file(ino) {
            Err(e) => reply.error(e),
            Ok((_, dev, _)) if flags.acc_mode() != OpenAccMode::O_RDONLY => {
                if self.is_writable(dev) {
                    reply.opened(self.opened(true), FopenFlags::FOPEN_KEEP_CACHE)
                } else {
                    reply.error(Errno::EROFS)
                }
            }
            Ok(_) => reply.opened(self.opened(false), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        self.open_files.total.fetch_sub(1, Relaxed);
        if fh.0 == FH_WRITER {
            self.open_files.writers.fetch_sub(1, Relaxed);
        }
        reply.ok();
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let (_, dev, _) = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if !self.is_writable(dev) {
            return reply.error(Errno::EROFS);
        }
        // A disk does not grow by writing past its end: a write that starts there fails
        // with ENOSPC (as on a block device), one that straddles it is cut short.
        let size = dev.size();
        if offset >= size && !data.is_empty() {
            return reply.error(Errno::ENOSPC);
        }
        let data = &data[..data.len().min((size - offset.min(size)) as usize)];
        match dev.write_at(data, offset) {
            Ok(()) => {
                self.touched(ino.0);
                reply.written(data.len() as u32)
            }
            Err(e) => {
                log::error!("write of {} bytes at {offset:#x}: {e:#}", data.len());
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if fh.0 != FH_WRITER {
            return reply.ok();
        }
        self.sync(ino, reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply)
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(node) = self.ns.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if let Some(size) = size {
            let NodeKind::File { dev, .. } = &node.kind else {
                return reply.error(Errno::EISDIR);
            };
            if !self.is_writable(&**dev) {
                return reply.error(Errno::EROFS);
            }
            if size != dev.size() {
                if let Err(e) = dev.resize(size) {
                    log::error!("truncate to {size} bytes: {e:#}");
                    return reply.error(errno(&e));
                }
                self.touched(ino.0);
            }
        }
        // Time changes are accepted and forgotten: a file's times come from the image.
        let (attr, ttl) = self.attr_ttl(node, false);
        reply.attr(&ttl, &attr)
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (_, dev, _) = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if !self.is_writable(dev) {
            return reply.error(Errno::EROFS);
        }
        match fallocate(dev, offset, length, mode) {
            Ok(()) => {
                self.touched(ino.0);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn destroy(&mut self) {
        self.close_all();
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
                log::error!("lseek: {e:#}");
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

    // The directory tree is fixed: in a read-write mount (a read-only one gets EROFS from
    // the kernel first) nothing can be created, removed or renamed.
    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }
}
