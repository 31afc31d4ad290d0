//! The control channel of a running mount: a Unix socket through which `qcow2fs status`,
//! `umount` and the commands that change a mounted image talk to its daemon.
//!
//! The socket is found from the mount point alone: the mount table gives the mount's
//! device number and owner (`user_id=`), and the socket is `DEV.sock` in the owner's
//! runtime directory (`/run/qcow2fs` for root, `/run/user/UID/qcow2fs` or, without one,
//! `/tmp/qcow2fs-UID`), a directory only the owner may enter. The daemon also checks
//! the peer's credentials: only root and the mounting user are answered. A client checks
//! that the socket is served by the mount's owner (or root) before it sends anything.
//!
//! The protocol is JSON lines: one request object (`{"op": "status"}`), one response
//! object (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`) per line.

use super::mount::{MountEntry, mount_at};
use crate::error::{Error, ErrorKind, Result};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The largest request line a daemon reads.
const MAX_REQUEST: u64 = 64 << 10;

/// The runtime directory of user `uid`, where the sockets of that user's mounts live.
fn runtime_dir(uid: u32) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/qcow2fs");
    }
    let user_run = PathBuf::from(format!("/run/user/{uid}"));
    match std::fs::metadata(&user_run) {
        Ok(md) if md.is_dir() && md.uid() == uid => user_run.join("qcow2fs"),
        _ => std::env::temp_dir().join(format!("qcow2fs-{uid}")),
    }
}

/// The socket of the mount with device number `dev` owned by `uid`.
pub fn socket_path(uid: u32, dev: (u32, u32)) -> PathBuf {
    runtime_dir(uid).join(format!("{}-{}.sock", dev.0, dev.1))
}

/// Makes the directory of `path` (mode 0700, owned by the caller) if needed, and
/// refuses one that another user owns or others may enter.
fn private_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(dir, "creating the control directory", e)),
    }
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(dir, "inspecting the control directory", e))?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if md.is_dir() && md.uid() == uid && md.mode() & 0o077 != 0 {
        // Our own directory, made by an older qcow2fs or by hand: close it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, "restricting the control directory", e))?;
        return Ok(());
    }
    if !md.is_dir() || md.uid() != uid {
        return Err(Error::unsupported(format!(
            "the control directory must be a directory only user {uid} may enter (it has mode {:o} and owner {})",
            md.mode() & 0o7777,
            md.uid()
        ))
        .in_file(dir));
    }
    Ok(())
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size passed.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// What answers requests: given a request object, the response's fields (`ok` is added)
/// or an error message.
pub type Handler = dyn Fn(&Value) -> std::result::Result<Value, String> + Send + Sync;

/// A listening control socket; the file is removed when this is dropped.
pub struct Server {
    path: PathBuf,
    /// The socket file's identity: once this mount is gone, another mount may get the
    /// same device number and put its own socket at the same path, which must stay.
    id: (u64, u64),
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Server {
    /// Listens on the socket of the mount at `mountpoint` (which must be mounted) and
    /// answers each connection on its own thread with `handler`.
    pub fn start(mountpoint: &Path, handler: Arc<Handler>) -> Result<Server> {
        let entry = mount_at(mountpoint).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "not in the mount table after mounting")
                .in_file(mountpoint)
        })?;
        // SAFETY: geteuid has no preconditions.
        let owner = unsafe { libc::geteuid() };
        let path = socket_path(owner, entry.dev);
        private_parent(&path)?;
        // A socket left by a daemon that was killed.
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|e| Error::io(&path, "listening for control", e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(&path, "restricting the control socket", e))?;
        let md = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(&path, "inspecting the control socket", e))?;
        let served = mountpoint.to_path_buf();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let handler = handler.clone();
                    let served = served.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve_connection(conn, owner, &served, &*handler));
                }
            })
            .map_err(|e| Error::io(&path, "starting the control thread", e))?;
        Ok(Server {
            path,
            id: (md.dev(), md.ino()),
        })
    }
}

/// Answers the requests of one connection. Every answer names the mount point served,
/// so that a client never takes the answer of a daemon whose mount has just gone for
/// that of the mount that now has its device number.
fn serve_connection(conn: UnixStream, owner: u32, served: &Path, handler: &Handler) {
    let reply = |mut w: &UnixStream, mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.insert("mountpoint".into(), json!(served));
        }
        let mut line = v.to_string();
        line.push('\n');
        let _ = w.write_all(line.as_bytes());
    };
    match peer_uid(&conn) {
        Ok(uid) if uid == 0 || uid == owner => {}
        Ok(uid) => {
            log::warn!("control request from user {uid} refused");
            reply(
                &conn,
                json!({"ok": false, "error": format!("only root and user {owner}, who mounted it, may control this mount")}),
            );
            return;
        }
        Err(_) => return,
    }
    let mut reader = BufReader::new(&conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_REQUEST).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let response = match serde_json::from_str::<Value>(&line) {
            Err(e) => json!({"ok": false, "error": format!("not a JSON request: {e}")}),
            Ok(req) => match handler(&req) {
                Ok(mut v) => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("ok".into(), Value::Bool(true));
                    }
                    v
                }
                Err(e) => json!({"ok": false, "error": e}),
            },
        };
        reply(&conn, response);
    }
}

/// The qcow2fs mount at `mountpoint`, or an error that says what is there instead.
pub fn qcow2fs_mount(mountpoint: &Path) -> Result<(PathBuf, MountEntry)> {
    let canon = mountpoint
        .canonicalize()
        .map_err(|e| Error::io(mountpoint, "resolving the mount point", e))?;
    let Some(m) = mount_at(&canon) else {
        return Err(Error::invalid("not a mount point").in_file(mountpoint));
    };
    if m.fstype != "fuse.qcow2fs" {
        return Err(
            Error::invalid(format!("not a qcow2fs mount (type {})", m.fstype)).in_file(mountpoint),
        );
    }
    Ok((canon, m))
}

/// Sends `request` to the daemon serving `mountpoint` and returns its response (an
/// `ok: false` response becomes an error).
pub fn request(mountpoint: &Path, request: &Value) -> Result<Value> {
    let (canon, m) = qcow2fs_mount(mountpoint)?;
    let owner = m.owner_uid().unwrap_or(0);
    let path = socket_path(owner, m.dev);
    let no_channel = |e: std::io::Error| {
        let why = match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => {
                "its daemon has no control channel (it is gone, or it is an older qcow2fs)"
                    .to_string()
            }
            Some(libc::EACCES) | Some(libc::EPERM) => {
                format!("only root and user {owner}, who mounted it, may control this mount")
            }
            _ => format!("cannot reach its daemon ({e})"),
        };
        Error::new(ErrorKind::Io, why).in_file(mountpoint)
    };
    let conn = UnixStream::connect(&path).map_err(no_channel)?;
    match peer_uid(&conn) {
        Ok(uid) if uid == owner || uid == 0 => {}
        _ => {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the control socket {} is not served by the mount's owner",
                    path.display()
                ),
            )
            .in_file(mountpoint));
        }
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(600)));
    let mut line = request.to_string();
    line.push('\n');
    (&conn).write_all(line.as_bytes()).map_err(no_channel)?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .take(64 << 20)
        .read_line(&mut answer)
        .map_err(no_channel)?;
    let v: Value = serde_json::from_str(&answer).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("the daemon's answer is not JSON: {e}"),
        )
        .in_file(mountpoint)
    })?;
    if v.get("mountpoint").and_then(Value::as_str) != canon.to_str() {
        return Err(Error::new(
            ErrorKind::Io,
            "its daemon has no control channel (the socket found belongs to a mount that has gone)",
        )
        .in_file(mountpoint));
    }
    if v.get("ok") == Some(&Value::Bool(true)) {
        return Ok(v);
    }
    let msg = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("the daemon refused the request");
    Err(Error::new(ErrorKind::InvalidInput, msg.to_string()).in_file(mountpoint))
}
