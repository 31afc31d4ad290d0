//! A thin adapter to fuser 0.18: the namespace (and the files of snapshots' VM state in
//! it), the mount's state, the file logic and the extended attributes are plain data and
//! functions in `namespace` (`vmfiles`), `state`, `io` and `xattr`; each `Filesystem`
//! callback is a few lines that call them.

pub mod access;
pub mod io;
pub mod namespace;
pub mod state;
pub mod vmfiles;
pub mod xattr;

pub use io::{fallocate, seek};
pub use state::{FsConfig, MountState};

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use io::errno;
use namespace::NodeKind;
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::SystemTime;

/// Largest request the kernel may send (with FUSE_MAX_PAGES).
pub const MAX_REQUEST: u32 = 1 << 20;

/// File handle given to opens that may write (their close flushes).
const FH_WRITER: u64 = 1;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `Filesystem` callbacks, given as `fn NAME(ARGS) -> REPLY;` without the request and
/// the reply, that refuse with EPERM.
macro_rules! refuse_tree_changes {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $reply:ty;)*) => {
        $(
            fn $name(&self, _req: &Request, $($arg: $ty,)* reply: $reply) {
                reply.error(Errno::EPERM);
            }
        )*
    };
}

/// The filesystem fuser serves: the mount's state, shared with its control channel.
pub struct Qcow2Fs {
    m: Arc<MountState>,
}

impl Qcow2Fs {
    pub fn new(m: Arc<MountState>) -> Self {
        Qcow2Fs { m }
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        let f = match self.m.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let _io = self.m.io_gate();
        match f.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::error!("flush: {e:#}");
                reply.error(errno(&e))
            }
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
        let f = self.m.file(ino.0)?;
        let _io = self.m.io_gate();
        let end = f.dev.size();
        let n = end.saturating_sub(off).min(size as u64) as usize;
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            f.dev.read_at(&mut buf[..n], off).map_err(|e| {
                log::error!(
                    "read of {:?} at {off:#x} (+{n}): {e:#}",
                    self.m.ns().path_of(f.ino)
                );
                errno(&e)
            })?;
            reply(&buf[..n]);
            Ok(())
        })
    }
}

fn send_xattr(answer: xattr::Answer, reply: ReplyXattr) {
    match answer {
        xattr::Answer::Size(n) => reply.size(n),
        xattr::Answer::Data(d) => reply.data(&d),
        xattr::Answer::Error(e) => reply.error(Errno::from_i32(e)),
    }
}

impl Filesystem for Qcow2Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        if let Some(ra) = self.m.cfg.readahead {
            let _ = config
                .set_max_readahead(ra)
                .or_else(|max| config.set_max_readahead(max));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = self.m.ns().lookup(parent.0, name).map(|n| n.ino);
        match ino.and_then(|ino| self.m.attr(ino, true)) {
            Some((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.m.attr(ino.0, false) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Files change only through this mount, which keeps the kernel's page cache up to
        // date (and tells it when a control operation changes a file): cached pages stay
        // valid across opens.
        let f = match self.m.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let writer = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writer && !self.m.is_writable(&*f.dev) {
            return reply.error(Errno::EROFS);
        }
        self.m.opened(&f.state, writer);
        let fh = if writer { FH_WRITER } else { 0 };
        let cache = if f.dev.volatile() {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(fh), cache)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(f) = self.m.file(ino.0) {
            self.m.released(&f.state, fh.0 == FH_WRITER);
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
        let (f, _io) = match self.m.writable_file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // A disk does not grow by writing past its end: a write that starts there fails
        // with ENOSPC (as on a block device), one that straddles it is cut short.
        let size = f.dev.size();
        if offset >= size && !data.is_empty() {
            return reply.error(Errno::ENOSPC);
        }
        let data = &data[..data.len().min((size - offset.min(size)) as usize)];
        match f.dev.write_at(data, offset) {
            Ok(()) => {
                self.m.touched(&f.state);
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
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if let Some(size) = size {
            let (f, _io) = match self.m.writable_file(ino.0) {
                Ok(f) => f,
                Err(e) => return reply.error(e),
            };
            if size != f.dev.size() {
                if let Err(e) = f.dev.resize(size) {
                    log::error!("truncate to {size} bytes: {e:#}");
                    return reply.error(errno(&e));
                }
                self.m.touched(&f.state);
            }
        }
        // Time changes are accepted and forgotten: a file's times come from the image.
        match self.m.attr(ino.0, false) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
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
        let (f, _io) = match self.m.writable_file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match fallocate(&*f.dev, offset, length, mode) {
            Ok(()) => {
                self.m.touched(&f.state);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn destroy(&mut self) {
        self.m.close_all();
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
        let Some(entries) = self.m.ns().entries(ino.0) else {
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
        let f = match self.m.file(ino.0) {
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
        let _io = self.m.io_gate();
        match seek(&*f.dev, offset as u64, want_data) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                log::error!("lseek: {e:#}");
                reply.error(errno(&e))
            }
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_encoded_bytes();
        send_xattr(
            self.m.xattr(ino.0, req.uid(), req.gid(), Some(name), size),
            reply,
        )
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        send_xattr(self.m.xattr(ino.0, req.uid(), req.gid(), None, size), reply)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(xattr::change(name.as_encoded_bytes())));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(xattr::change(name.as_encoded_bytes())));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let ns = self.m.ns();
        let total: u64 = ns
            .nodes()
            .map(|n| match &n.kind {
                NodeKind::File { dev, .. } => dev.size(),
                NodeKind::Dir { .. } => 0,
            })
            .sum();
        reply.statfs(
            total.div_ceil(4096),
            0,
            0,
            ns.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    // The directory tree is fixed: in a read-write mount (a read-only one gets EROFS from
    // the kernel first) nothing can be created, removed or renamed.
    refuse_tree_changes! {
        fn mknod(_parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _rdev: u32)
            -> ReplyEntry;
        fn mkdir(_parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32) -> ReplyEntry;
        fn unlink(_parent: INodeNo, _name: &OsStr) -> ReplyEmpty;
        fn rmdir(_parent: INodeNo, _name: &OsStr) -> ReplyEmpty;
        fn symlink(_parent: INodeNo, _link_name: &OsStr, _target: &std::path::Path)
            -> ReplyEntry;
        fn rename(
            _parent: INodeNo,
            _name: &OsStr,
            _newparent: INodeNo,
            _newname: &OsStr,
            _flags: fuser::RenameFlags
        ) -> ReplyEmpty;
        fn link(_ino: INodeNo, _newparent: INodeNo, _newname: &OsStr) -> ReplyEntry;
        fn create(_parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _flags: i32)
            -> fuser::ReplyCreate;
    }
}
