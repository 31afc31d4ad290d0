//! `qcow2fs mount` and `qcow2fs umount`: open the image, mount it, and by default return
//! only once the mount is ready (or has failed), leaving a daemon in the background.

use super::logging;
use super::options::MountOptions;
use crate::block::{self, BlockDev, Chain, CopyOnRead, Overlay, OverlayOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::fuse::namespace::{FileRole, LayoutOptions, Namespace};
use crate::fuse::{FsConfig, MountState, Qcow2Fs};
use fuser::{MountOption, SessionACL};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A mount to perform.
#[derive(Debug)]
pub struct MountRequest {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub options: MountOptions,
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The device number (major, minor) of the mounted filesystem.
    pub dev: (u32, u32),
    /// The filesystem's own options (for FUSE: `user_id=`, `group_id=`, ...).
    pub super_options: String,
    /// The mount's own flags (`ro` or `rw`, `nosuid`, ...).
    pub mount_options: String,
}

impl MountEntry {
    /// The user who mounted a FUSE filesystem (its `user_id=` option).
    pub fn owner_uid(&self) -> Option<u32> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix("user_id="))
            .and_then(|v| v.parse().ok())
    }
}

fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|&x| x == "-")?;
            let (major, minor) = f.get(2)?.split_once(':')?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape_mount_field(f.get(4)?)),
                fstype: f.get(dash + 1)?.to_string(),
                source: unescape_mount_field(f.get(dash + 2)?),
                dev: (major.parse().ok()?, minor.parse().ok()?),
                super_options: f.get(dash + 3).unwrap_or(&"").to_string(),
                mount_options: f.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The mount at exactly `path`, if any (the last one, which is visible).
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rfind(|m| m.mountpoint == path)
}

fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let md = std::fs::metadata(mountpoint).map_err(|e| Error::io(mountpoint, "mount point", e))?;
    if !md.is_dir() {
        return Err(Error::invalid("mount point is not a directory").in_file(mountpoint));
    }
    let canon = mountpoint
        .canonicalize()
        .map_err(|e| Error::io(mountpoint, "resolving the mount point", e))?;
    if let Some(m) = mount_at(&canon) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("already a mount point ({} of type {})", m.source, m.fstype),
        )
        .in_file(mountpoint));
    }
    Ok(canon)
}

/// Blocks the termination signals in this thread (and the threads it starts) and starts
/// a thread that unmounts when one arrives.
fn handle_signals(mut unmounter: fuser::SessionUnmounter, mountpoint: PathBuf) {
    // SAFETY: plain sigset manipulation on a zeroed set owned by this frame.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits on the set blocked above.
            unsafe { libc::sigwait(&set, &mut sig) };
            log::info!("signal {sig}: unmounting");
            // A path lookup or a file closing at that moment keeps the mount busy for a
            // moment; after a while, detach it (as `umount -l` does) so the daemon ends
            // once the last user lets go, instead of serving on after a signal. fuser's
            // unmounter gives up its mount after one attempt, successful or not, so the
            // retries unmount the path themselves.
            let mut result = unmounter.unmount();
            for _ in 0..40 {
                match &result {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        result = unmount_path(&mountpoint, false);
                    }
                    _ => break,
                }
            }
            let Err(e) = result else { return };
            log::warn!("unmount after signal {sig}: {e}; detaching it");
            if let Err(e) = unmount_path(&mountpoint, true) {
                log::error!("unmount after signal {sig} failed: {e}");
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}");
    }
}

/// `umount -l` (detach) or `umount -f` (force) of a qcow2fs mount, which return without
/// waiting for the daemon.
pub fn unmount_flags(mountpoint: &Path, lazy: bool, force: bool) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let (canon, _) = super::control::qcow2fs_mount(mountpoint)?;
    if force {
        let c = std::ffi::CString::new(canon.as_os_str().as_bytes())
            .map_err(|_| Error::invalid("the mount point contains a NUL byte"))?;
        let flags = libc::MNT_FORCE | if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            return Err(Error::io(
                mountpoint,
                "unmounting",
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(());
    }
    unmount_path(&canon, lazy).map_err(|e| Error::io(mountpoint, "unmounting", e))
}

/// Unmounts `mountpoint`, or with `lazy` detaches it from the tree (as `umount -l`
/// does). A mount that is already gone counts as unmounted.
fn unmount_path(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Not a mount point any more: someone else unmounted it.
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        // Without the privilege to unmount, the setuid helper can.
        Some(libc::EPERM) => {
            let flag = if lazy { "-uz" } else { "-u" };
            let run = |helper| {
                std::process::Command::new(helper)
                    .arg(flag)
                    .arg(mountpoint)
                    .status()
            };
            match run("fusermount3").or_else(|_| run("fusermount")) {
                Ok(s) if s.success() => Ok(()),
                Ok(_) => Err(std::io::Error::other(format!("fusermount3 {flag} failed"))),
                Err(_) => Err(err),
            }
        }
        _ => Err(err),
    }
}

/// Sets the mount's kernel readahead window once the kernel finished its handshake with
/// the session (the handshake sets the window to at most the kernel's default, so a
/// larger one can only be set afterwards, through the mount's backing device info).
fn set_readahead(mountpoint: PathBuf, kb: u32) {
    std::thread::spawn(move || {
        // stat waits for the handshake, which the session answers once it runs.
        let dev = match std::fs::metadata(&mountpoint) {
            Ok(m) => std::os::unix::fs::MetadataExt::dev(&m),
            Err(e) => {
                log::warn!("readahead: cannot stat {}: {e}", mountpoint.display());
                return;
            }
        };
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        match std::fs::write(&knob, kb.to_string()) {
            Ok(()) => log::info!("readahead window set to {kb} KiB ({knob})"),
            Err(e) => log::warn!("readahead={kb}: cannot write {knob}: {e}"),
        }
    });
}

/// Mounts and serves until unmounted. With `ready`, reports success or the error
/// through that pipe (the parent of a daemon waits on it).
fn serve(
    req: &MountRequest,
    mountpoint: &Path,
    chain: Chain,
    ready: Option<OwnedFd>,
) -> Result<()> {
    let o = &req.options;
    // The image's name as shown (a URL without its query string).
    let shown = super::shown_image(&req.image);
    let layout = LayoutOptions {
        snapshots: o.snapshots,
        layers: o.layers,
        bitmaps: o.bitmaps,
    };
    let mut private_overlay_dir = None;
    let ns = if let Some(dir) = &o.overlay {
        let opts = OverlayOptions {
            dir: block::private_dir(
                &dir.canonicalize()
                    .map_err(|e| Error::io(dir, "the overlay directory", e))?,
            )?,
            keep: o.keep_overlay,
            cache_bytes: o.cache_size.unwrap_or(crate::engine::DEFAULT_CACHE_BYTES) / 4,
        };
        private_overlay_dir = Some(opts.dir.clone());
        let image_abs = req.image.canonicalize().unwrap_or_else(|_| shown.clone());
        Namespace::build_with(&chain, &shown, layout, &mut |role, name, dev| {
            let backing = match role {
                FileRole::Active => Some((image_abs.clone(), "qcow2")),
                FileRole::Layer(_) => Some((
                    dev.info()
                        .path
                        .canonicalize()
                        .unwrap_or_else(|_| dev.info().path.clone()),
                    dev.info().format,
                )),
                _ => None,
            };
            let ov = Overlay::create(dev, name, backing, &opts)?;
            log::info!("{name}: writes go to the overlay {}", ov.path().display());
            Ok(Arc::new(ov) as Arc<dyn BlockDev>)
        })?
    } else if o.copy_on_read {
        let bottom = match &o.cor_bottom {
            Some(spec) => super::resolve_layer(&chain, spec)?,
            None => chain.layers.len() as u32,
        };
        let top = chain.top.clone();
        Namespace::build_with(&chain, &shown, layout, &mut |role, _, dev| {
            Ok(match role {
                FileRole::Active => {
                    Arc::new(CopyOnRead::new(top.clone(), bottom)) as Arc<dyn BlockDev>
                }
                _ => dev,
            })
        })?
    } else {
        Namespace::build(&chain, &shown, layout)?
    };
    let writable = o.rw || o.overlay.is_some();
    // SAFETY: getegid/geteuid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let state = Arc::new(MountState::new(
        ns,
        FsConfig {
            uid: o.uid.unwrap_or(euid),
            gid: o.gid.unwrap_or(egid),
            umask: o.umask,
            readahead: o.readahead_kb.map(|kb| kb.saturating_mul(1024)),
            writable,
            xattrs: o.xattrs,
        },
    ));
    let fs = Qcow2Fs::new(state.clone());
    let image_abs = req.image.canonicalize().unwrap_or_else(|_| shown.clone());
    let mut config = fuser::Config::default();
    let fsname = o
        .fsname
        .clone()
        .unwrap_or_else(|| image_abs.display().to_string());
    config.mount_options = vec![
        MountOption::FSName(fsname.clone()),
        // Passed to the kernel so /proc/mounts shows the type fuse.qcow2fs.
        MountOption::CUSTOM("subtype=qcow2fs".into()),
        if writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    config.mount_options.extend(o.kernel_mount_options());
    // The kernel checks every access against the modes shown, which never grant more
    // than the image and backing files allow (`fuse::access`); the daemon itself does not
    // check callers.
    config.mount_options.push(MountOption::DefaultPermissions);
    config.acl = if o.allow_other {
        SessionACL::All
    } else if o.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    let threads = o.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let cor_bottom = if o.copy_on_read {
        Some(match &o.cor_bottom {
            Some(spec) => super::resolve_layer(&chain, spec)?,
            None => chain.layers.len() as u32,
        })
    } else {
        None
    };
    let daemon = Arc::new(super::daemon::Daemon {
        first_image: chain.image().clone(),
        chain: parking_lot::RwLock::new(chain),
        image: image_abs.clone(),
        mountpoint: mountpoint.to_path_buf(),
        mode: parking_lot::Mutex::new(if o.overlay.is_some() {
            super::daemon::Mode::Overlay
        } else if o.rw {
            super::daemon::Mode::ReadWrite
        } else {
            super::daemon::Mode::ReadOnly
        }),
        copy_on_read: parking_lot::Mutex::new(cor_bottom),
        force_share: o.force_share,
        show_snapshots: o.snapshots,
        show_layers: o.layers,
        show_bitmaps: o.bitmaps,
        mount: state.clone(),
    });
    let mut session = fuser::Session::new(fs, mountpoint, &config)
        .map_err(|e| Error::io(mountpoint, "mounting", e))?;
    state.set_notifier(session.notifier());
    // Before any other thread starts: they inherit the blocked termination signals.
    handle_signals(session.unmount_callable(), mountpoint.to_path_buf());
    let handler = daemon.clone();
    let control = match super::control::Server::start(
        mountpoint,
        Arc::new(move |req: &serde_json::Value| handler.handle(req)),
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            log::error!("{e:#}; `qcow2fs status` and `umount` cannot reach this daemon");
            None
        }
    };
    // SAFETY: geteuid has no preconditions.
    let registered = unsafe { libc::geteuid() } == 0
        && match super::utab::register(&fsname, mountpoint) {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "cannot add the mount to libmount's utab ({e}): root's umount(8) will not wait for this daemon"
                );
                false
            }
        };
    log::info!("mounted {} on {}", shown.display(), mountpoint.display());
    if let Some(fd) = ready {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(b"\0");
        drop(f);
        detach_stdio();
    }
    if let Some(kb) = o.readahead_kb {
        set_readahead(mountpoint.to_path_buf(), kb);
    }
    let result = session.run();
    if let Some(d) = private_overlay_dir {
        // Only when no kept overlay (or another mount's overlay) is left in it.
        let _ = std::fs::remove_dir(d);
    }
    drop(control);
    if registered && let Err(e) = super::utab::unregister(mountpoint) {
        log::warn!("removing the mount from libmount's utab: {e}");
    }
    log::info!("unmounted {}", mountpoint.display());
    result.map_err(|e| Error::io(mountpoint, "serving the mount", e))
}

fn detach_stdio() {
    // SAFETY: opening /dev/null and duplicating it over the standard descriptors.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            for t in 0..3 {
                libc::dup2(fd, t);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

/// Runs a mount: in the foreground, or as a daemon whose parent exits 0 once the mount
/// is ready and 1 (with the daemon's error) if it fails.
pub fn run(req: MountRequest) -> Result<()> {
    logging::init(true);
    let mountpoint = check_mountpoint(&req.mountpoint)?;
    if let Some(log) = &req.options.log {
        // Fail early if the log file cannot be written.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(log, "opening the log file", e))?;
    }
    // Open before forking, so errors are reported by the command itself.
    let chain = block::open_chain(&req.image, &req.options.open_options())?;
    if req.foreground {
        if let Some(log) = &req.options.log {
            logging::to_file(log).map_err(|e| Error::io(log, "opening the log file", e))?;
        }
        return serve(&req, &mountpoint, chain, None);
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            Path::new("pipe"),
            "creating",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the descriptors were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads exist yet in this process.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io(
            Path::new("fork"),
            "starting the daemon",
            std::io::Error::last_os_error(),
        )),
        0 => {
            drop(rd);
            // SAFETY: setsid has no preconditions in a fresh child; a daemon must not die
            // of SIGPIPE when its parent has gone.
            unsafe {
                libc::setsid();
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            match &req.options.log {
                Some(log) => {
                    let _ = logging::to_file(log);
                }
                None => logging::to_syslog(),
            }
            let mut status = std::fs::File::from(
                wr.try_clone()
                    .map_err(|e| Error::io(Path::new("pipe"), "dup", e))?,
            );
            let code = match serve(&req, &mountpoint, chain, Some(wr)) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    let _ = status.write_all(e.report().as_bytes());
                    1
                }
            };
            std::process::exit(code);
        }
        child => {
            drop(wr);
            // The daemon writes one NUL byte once the mount is ready (it keeps the pipe
            // open), or an error message and exits.
            let mut pipe = std::fs::File::from(rd);
            let mut first = [0u8; 1];
            let mut msg = Vec::new();
            if let Ok(1) = pipe.read(&mut first) {
                if first[0] == 0 {
                    return Ok(());
                }
                msg.push(first[0]);
                let _ = pipe.read_to_end(&mut msg);
            }
            let mut st = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(child, &mut st, 0) };
            if msg.is_empty() {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the mount daemon exited before the mount was ready",
                ));
            }
            Err(Error::new(
                ErrorKind::Io,
                String::from_utf8_lossy(&msg).into_owned(),
            ))
        }
    }
}

/// The kernel's flags for remounting `m` with its flags as they are, but read-only or
/// read-write.
fn remount_flags(m: &MountEntry, rw: bool) -> libc::c_ulong {
    let mut flags = libc::MS_REMOUNT;
    for o in m.mount_options.split(',') {
        flags |= match o {
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            "sync" => libc::MS_SYNCHRONOUS,
            "dirsync" => libc::MS_DIRSYNC,
            _ => 0,
        };
    }
    if !rw {
        flags |= libc::MS_RDONLY;
    }
    flags
}

/// Sets the kernel's read-only flag of the mount at `mountpoint`.
fn kernel_remount(mountpoint: &Path, m: &MountEntry, rw: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid NUL-terminated strings; a remount reads no source, type or data.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            remount_flags(m, rw),
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reopens the mount at `mountpoint` read-write or read-only, daemon first (all or
/// nothing there), then the kernel's read-only flag, which only root may change: the
/// daemon goes back to its mode when the kernel refuses.
pub fn remount(mountpoint: &Path, rw: bool) -> Result<()> {
    let (canon, m) = super::control::qcow2fs_mount(mountpoint)?;
    let was_rw = m.mount_options.split(',').any(|o| o == "rw");
    let ask =
        |rw: bool| super::control::request(&canon, &serde_json::json!({"op": "remount", "rw": rw}));
    ask(rw)?;
    if was_rw == rw {
        return Ok(());
    }
    if let Err(e) = kernel_remount(&canon, &m, rw) {
        let undo = ask(!rw);
        let why = if e.raw_os_error() == Some(libc::EPERM) {
            "only root may change a mount's read-only flag; unmount and mount it again".to_string()
        } else {
            format!("the kernel refused the remount: {e}")
        };
        if let Err(u) = undo {
            log::error!("{u:#}");
        }
        return Err(Error::new(ErrorKind::PermissionDenied, why).in_file(mountpoint));
    }
    Ok(())
}

/// Whether any thread of process `pid` still runs. A process whose main thread has
/// exited while others go on (a zombie leader) still holds its files and locks.
fn process_running(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// Unmounts a qcow2fs mount and waits until its daemon has written everything back and
/// ended: every one of its threads, so that its files and image locks are released.
pub fn umount(mountpoint: &Path) -> Result<()> {
    let (canon, _) = super::control::qcow2fs_mount(mountpoint)?;
    let pid = match super::control::request(&canon, &serde_json::json!({"op": "status"})) {
        Ok(v) => v.get("pid").and_then(serde_json::Value::as_u64),
        Err(e) => {
            log::warn!("{e:#}; unmounting without waiting for the daemon");
            None
        }
    };
    unmount_path(&canon, false).map_err(|e| Error::io(mountpoint, "unmounting", e))?;
    if let Some(pid) = pid {
        let start = Instant::now();
        while process_running(pid as u32) && start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}
