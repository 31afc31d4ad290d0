//! The command line: parse arguments (clap), validate them into options, build the block
//! stack and run the command. Every failure ends as one line on stderr and exit status 1.

mod bitmap;
mod cat;
pub mod control;
mod daemon;
mod guest;
mod info;
pub mod logging;
mod map;
pub mod mount;
pub mod options;
mod snapshot;
mod status;
mod stream;
mod utab;

use crate::block::{self, Chain};
use crate::error::{Error, ErrorKind, Result};
use clap::{Parser, Subcommand};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "qcow2fs",
    version,
    about = "Mount qcow2 disk images, their internal snapshots and backing layers as raw files"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show an image's format, backing chain, snapshots and bitmaps.
    Info {
        /// Print JSON with qemu-img's field names.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Write the raw disk, or one snapshot at its own disk size, to standard output; or a
    /// snapshot's VM state, or the guest memory rebuilt from it.
    Cat {
        /// Snapshot ID or name (IDs are tried first, as in qemu-img).
        #[arg(short, long, value_name = "ID|NAME", group = "what")]
        snapshot: Option<String>,
        /// The VM state (the QEMU migration stream) saved with this snapshot instead.
        #[arg(long, value_name = "ID|NAME", group = "what")]
        vmstate: Option<String>,
        /// The guest-physical memory rebuilt from this snapshot's VM state instead.
        #[arg(long, value_name = "ID|NAME", group = "what")]
        memory: Option<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Mount an image: its active disk, snapshots and backing layers appear as raw files.
    #[command(after_help = options::help_text())]
    Mount {
        /// Stay in the foreground instead of running as a daemon.
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma-separated (repeatable); see below.
        #[arg(short = 'o', value_name = "OPT[,OPT...]", action = clap::ArgAction::Append)]
        options: Vec<String>,
        image: PathBuf,
        mountpoint: PathBuf,
    },
    /// Unmount a qcow2fs mount and wait until its daemon has finished.
    Umount { mountpoint: PathBuf },
    /// Reopen a mount read-write or read-only without unmounting (what
    /// `mount -o remount,rw|ro MNT` does too).
    Remount {
        /// `rw` or `ro`.
        #[arg(short = 'o', value_name = "rw|ro", action = clap::ArgAction::Append)]
        options: Vec<String>,
        mountpoint: PathBuf,
    },
    /// Show what a mount serves: image and layers, mode, open files, cache, locks,
    /// snapshots (asked of its daemon).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        mountpoint: PathBuf,
    },
    /// Internal snapshots of a mounted image (give its mount point) or of an image:
    /// create, delete, revert to, list.
    Snapshot {
        #[command(subcommand)]
        action: snapshot::Action,
    },
    /// Persistent dirty bitmaps of a mounted image (give its mount point) or of an image:
    /// change them with qemu-img bitmap's flags, or list them, or dump one's dirty extents.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Bitmap {
        #[command(subcommand)]
        query: Option<bitmap::Query>,
        #[command(flatten)]
        changes: bitmap::Changes,
    },
    /// Copy the data the backing chain provides into the image (offline), like QEMU's
    /// block-stream; safe to interrupt and run again.
    Stream {
        /// Deepest layer to copy from: its depth N (as in layers/N-...) or its file name
        /// (default: the whole chain).
        #[arg(long, value_name = "LAYER")]
        bottom: Option<String>,
        /// Afterwards, make the layer below the bottom the backing file (none when the
        /// whole chain was streamed).
        #[arg(long)]
        drop_backing: bool,
        #[command(flatten)]
        keys: KeyArgs,
        image: PathBuf,
    },
    /// Print the allocation extents of the disk or a snapshot, like qemu-img map.
    Map {
        /// Print JSON in qemu-img map's format.
        #[arg(long)]
        json: bool,
        /// Snapshot ID or name.
        #[arg(short, long, value_name = "ID|NAME")]
        snapshot: Option<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Print a man page (man/qcow2fs.1 or man/mount.qcow2fs.8) with its option section
    /// generated from the option table (`make man`).
    #[command(hide = true)]
    GenMan { page: PathBuf },
}

/// The passphrases of encrypted images, for the commands that open images (the same as
/// `-o key-file=PATH` and `-o key-file.N=PATH`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Passphrase of an encrypted image, read verbatim from PATH (a trailing newline is
    /// part of it; - asks on the terminal); tried on every encrypted layer.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Passphrase of the layer at depth N of the chain (0 is the image, 1 its backing
    /// file), read as --key-file (may be repeated).
    #[arg(long, value_name = "N=PATH", action = clap::ArgAction::Append)]
    layer_key_file: Vec<PathBuf>,
}

/// The arguments every reading command (`info`, `cat`, `map`) takes after its own: `-U`,
/// `-o` lists as for mount, the key flags and the image.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// Open the image even if another process is writing to it (like qemu-img -U).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Options for remote images and backing files, as for mount (-o, repeatable):
    /// backing=, backing_dir=, cache_dir=, cache_max=, s3_endpoint=, ca_file=, ...
    #[arg(short = 'o', value_name = "OPT[,OPT...]", action = clap::ArgAction::Append)]
    options: Vec<String>,
    #[command(flatten)]
    keys: KeyArgs,
    image: PathBuf,
}

impl ReadArgs {
    /// The options that apply to opening the image: the `-o` lists (of which the ones
    /// that open images apply), `-U` and the key flags.
    pub(crate) fn options(&self) -> Result<options::MountOptions> {
        let mut o = options::MountOptions::parse(self.options.iter().map(String::as_str))?;
        if o.rw {
            return Err(Error::invalid("option rw applies to mount only"));
        }
        o.force_share |= self.force_share;
        self.keys.add_to(&mut o.keys)?;
        Ok(o)
    }
}

impl KeyArgs {
    /// Adds these keys to `keys` (replacing what `-o` gave for the same layers).
    pub fn add_to(&self, keys: &mut block::Keys) -> Result<()> {
        let source = |p: &Path| {
            if p.as_os_str() == "-" {
                block::KeySource::Prompt
            } else {
                block::KeySource::File(p.to_path_buf())
            }
        };
        if let Some(k) = &self.key_file {
            keys.all = Some(source(k));
        }
        for spec in &self.layer_key_file {
            let bytes = spec.as_os_str().as_bytes();
            let bad = || {
                Error::invalid(format!(
                    "--layer-key-file {}: expected N=PATH, a layer depth (0 is the image, 1 its backing file) and a key file",
                    spec.display()
                ))
            };
            let eq = bytes.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let depth = std::str::from_utf8(&bytes[..eq]).map_err(|_| bad())?;
            let depth = block::parse_depth(depth)
                .map_err(|why| Error::invalid(format!("--layer-key-file: {why}")))?;
            let path = Path::new(std::ffi::OsStr::from_bytes(&bytes[eq + 1..]));
            if path.as_os_str().is_empty() {
                return Err(bad());
            }
            keys.layers.insert(depth, source(path));
        }
        Ok(())
    }

    pub fn keys(&self) -> Result<block::Keys> {
        let mut keys = block::Keys::default();
        self.add_to(&mut keys)?;
        Ok(keys)
    }
}

/// Opens `image` with its chain for reading, or fails with a one-line error.
pub(crate) fn open(image: &Path, opts: &options::MountOptions) -> Result<Chain> {
    block::open_chain(image, &opts.open_options())
}

/// [`open`] for metadata only: encrypted layers without a key stay locked (like
/// qemu-img info, which needs no key).
pub(crate) fn open_metadata(image: &Path, opts: &options::MountOptions) -> Result<Chain> {
    let mut o = opts.open_options();
    o.locked_ok = true;
    block::open_chain(image, &o)
}

/// How an image named on the command line is shown: a URL without its query string
/// (which may hold a signature), a path as given.
pub(crate) fn shown_image(image: &Path) -> PathBuf {
    match image.to_str().map(crate::storage::remote::Location::parse) {
        Some(Ok(Some(loc))) => PathBuf::from(loc.shown()),
        _ => image.to_path_buf(),
    }
}

/// The snapshot `spec` names (its ID first, then its name, as in qemu-img).
pub(crate) fn find_snapshot(chain: &Chain, spec: &str) -> Result<crate::engine::Snapshot> {
    chain.image().find_snapshot(spec).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no snapshot with ID or name '{spec}'"),
        )
        .in_file(chain.image().path())
    })
}

/// The active disk, or the snapshot `key` names.
pub(crate) fn pick_view(chain: &Chain, key: Option<&str>) -> Result<Arc<dyn block::BlockDev>> {
    match key {
        None => Ok(chain.top.clone()),
        Some(k) => {
            let i = find_snapshot(chain, k)?;
            chain.image().check_snapshot(&i)?;
            Ok(chain.snapshot(i.key))
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { json, read } => info::run(&read.image, json, &read.options()?),
        Command::Cat {
            snapshot,
            vmstate,
            memory,
            read,
        } => {
            let what = match (snapshot, vmstate, memory) {
                (_, Some(s), _) => cat::What::VmState(s),
                (_, _, Some(s)) => cat::What::Memory(s),
                (s, None, None) => cat::What::Disk(s),
            };
            cat::run(&read.image, &what, &read.options()?)
        }
        Command::Map {
            json,
            snapshot,
            read,
        } => map::run(&read.image, snapshot.as_deref(), json, &read.options()?),
        Command::Mount {
            foreground,
            options,
            image,
            mountpoint,
        } => {
            if let Some(rw) = remount_request(options.iter().map(String::as_str)) {
                return mount::remount(&mountpoint, rw);
            }
            mount::run(mount::MountRequest {
                image,
                mountpoint,
                foreground,
                options: options::MountOptions::parse(options.iter().map(String::as_str))?,
            })
        }
        Command::Remount {
            options,
            mountpoint,
        } => {
            let rw = remount_request(
                std::iter::once("remount").chain(options.iter().map(String::as_str)),
            );
            match rw {
                Some(rw) => mount::remount(&mountpoint, rw),
                None => Err(Error::invalid("qcow2fs remount needs -o rw or -o ro")),
            }
        }
        Command::Umount { mountpoint } => mount::umount(&mountpoint),
        Command::Status { json, mountpoint } => status::run(&mountpoint, json),
        Command::Snapshot { action } => snapshot::run(action),
        Command::Bitmap { query, changes } => bitmap::run(query, changes),
        Command::Stream {
            bottom,
            drop_backing,
            keys,
            image,
        } => stream::run(&image, bottom.as_deref(), drop_backing, &keys),
        Command::GenMan { page } => gen_man(&page),
    }
}

const SUBCOMMANDS: &[&str] = &[
    "info", "cat", "map", "mount", "umount", "remount", "status", "snapshot", "bitmap", "stream",
    "gen-man", "help",
];

/// Prints the man page `page` with its generated option section brought up to date.
fn gen_man(page: &Path) -> Result<()> {
    let kind = options::ManPage::of_file(page).ok_or_else(|| {
        Error::invalid("expected man/qcow2fs.1 or man/mount.qcow2fs.8").in_file(page)
    })?;
    let text = std::fs::read_to_string(page).map_err(|e| Error::io(page, "reading", e))?;
    print!("{}", kind.splice(&text).map_err(|e| e.in_file(page))?);
    Ok(())
}

/// A backing layer named by depth (1 = the direct backing file) or by file name.
pub(crate) fn resolve_layer(chain: &Chain, spec: &str) -> Result<u32> {
    let n = chain.layers.len();
    if let Ok(d) = spec.parse::<usize>() {
        if (1..=n).contains(&d) {
            return Ok(d as u32);
        }
        return Err(Error::invalid(format!(
            "layer {d} does not exist: the backing chain has {n} layer(s)"
        ))
        .in_file(chain.image().path()));
    }
    let want = Path::new(spec);
    for (i, l) in chain.layers.iter().enumerate() {
        let p = &l.info().path;
        if p == want
            || p.file_name() == Some(want.as_os_str())
            || (want.is_absolute() && p.canonicalize().ok().as_deref() == Some(want))
        {
            return Ok(i as u32 + 1);
        }
    }
    Err(Error::invalid(format!(
        "no backing layer named '{spec}' (give its depth or file name)"
    ))
    .in_file(chain.image().path()))
}

/// The arguments of `mount.qcow2fs SPEC DIR [-sfnv] [-o OPTS] [-t TYPE]`, the calling
/// convention of mount(8) helpers, as a mount request. `None` for `-f` (fake mount).
fn helper_request(args: &[std::ffi::OsString]) -> Result<Option<mount::MountRequest>> {
    let mut positional = Vec::new();
    let mut lists = Vec::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let a = arg.to_string_lossy();
        match a.as_ref() {
            "-o" => lists.push(
                it.next()
                    .ok_or_else(|| Error::invalid("-o needs an option list"))?
                    .to_string_lossy()
                    .into_owned(),
            ),
            "-t" | "-N" => {
                it.next();
            }
            s if s.starts_with("-o") && s.len() > 2 => lists.push(s[2..].to_string()),
            s if s.starts_with('-') && s.len() > 1 => {
                for c in s[1..].chars() {
                    match c {
                        'f' => fake = true,
                        's' | 'n' | 'v' => {}
                        other => return Err(Error::invalid(format!("unknown flag -{other}"))),
                    }
                }
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    if positional.len() != 2 {
        return Err(Error::invalid(
            "usage: mount.qcow2fs IMAGE MOUNTPOINT [-sfnv] [-o OPTIONS]",
        ));
    }
    if let Some(rw) = remount_request(lists.iter().map(String::as_str)) {
        if !fake {
            let mountpoint = positional.pop().unwrap_or_default();
            mount::remount(&mountpoint, rw)?;
        }
        return Ok(None);
    }
    let options = options::MountOptions::parse(lists.iter().map(String::as_str))?;
    if fake {
        return Ok(None);
    }
    let mountpoint = positional.pop().unwrap_or_default();
    let image = positional.pop().unwrap_or_default();
    Ok(Some(mount::MountRequest {
        image,
        mountpoint,
        foreground: false,
        options,
    }))
}

/// For option lists that hold `remount` (as mount(8) passes them to a helper for
/// `mount -o remount,rw MNT`): whether the mount is to become read-write (the last of
/// `rw` and `ro` wins; without either, read-only is not asked for, so read-write).
fn remount_request<'a>(lists: impl Iterator<Item = &'a str>) -> Option<bool> {
    let opts: Vec<&str> = lists.flat_map(|l| l.split(',')).map(str::trim).collect();
    if !opts.contains(&"remount") {
        return None;
    }
    Some(
        opts.iter().rev().find_map(|o| match *o {
            "rw" => Some(true),
            "ro" => Some(false),
            _ => None,
        }) != Some(false),
    )
}

/// `umount.fuse.qcow2fs DIR [-nlfvr] [-t TYPE] [-N NS]`, which umount(8) runs to
/// unmount a qcow2fs mount (for root, when the mount has an entry in libmount's utab,
/// which `qcow2fs mount` writes; for the user who mounted it, always): the unmount then
/// returns only once the daemon has written everything back and released the image.
fn umount_helper_run(args: &[std::ffi::OsString]) -> Result<()> {
    let mut dir = None;
    let (mut lazy, mut force) = (false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let a = arg.to_string_lossy();
        match a.as_ref() {
            "-t" | "-N" => {
                it.next();
            }
            s if s.starts_with('-') && s.len() > 1 => {
                for c in s[1..].chars() {
                    match c {
                        'l' => lazy = true,
                        'f' => force = true,
                        'n' | 'v' | 'r' | 'i' => {}
                        other => return Err(Error::invalid(format!("unknown flag -{other}"))),
                    }
                }
            }
            _ => dir = Some(PathBuf::from(arg)),
        }
    }
    let dir = dir.ok_or_else(|| Error::invalid("usage: umount.fuse.qcow2fs MOUNTPOINT [-lf]"))?;
    if lazy || force {
        return mount::unmount_flags(&dir, lazy, force);
    }
    mount::umount(&dir)
}

/// Rewrites `qcow2fs IMAGE MOUNTPOINT [-o OPTS]` (the form mount.fuse uses) into the
/// `mount` subcommand.
fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if let Some(first) = args.get(1).map(|a| a.to_string_lossy())
        && !first.starts_with('-')
        && !SUBCOMMANDS.contains(&first.as_ref())
    {
        args.insert(1, "mount".into());
    }
    args
}

/// Entry point for the binary: returns the process exit status.
pub fn main() -> i32 {
    // Writing to a closed pipe (`qcow2fs cat ... | head`) ends the process quietly.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let helper = invoked_as.starts_with("mount.");
    let umount_helper = invoked_as.starts_with("umount.");
    let args = if helper || umount_helper {
        args
    } else {
        normalize_args(args)
    };
    let mounting = helper || args.get(1).is_some_and(|a| a == "mount");
    logging::init(mounting);
    let result = if helper {
        helper_request(&args[1..]).and_then(|r| match r {
            Some(req) => mount::run(req),
            None => Ok(()),
        })
    } else if umount_helper {
        umount_helper_run(&args[1..])
    } else {
        run(Cli::parse_from(args))
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2fs: {}", e.report());
            1
        }
    }
}

/// Opens an image that is not mounted for a command on its metadata (snapshots, bitmaps):
/// read-write or read-only, with QEMU's locks unless `force_share`. Metadata needs no key,
/// so an encrypted image opens locked, as `qemu-img snapshot` and `qemu-img bitmap` open it.
pub(crate) fn open_for_metadata(image: &Path, writable: bool, force_share: bool) -> Result<Chain> {
    block::open_chain(
        image,
        &block::OpenOptions {
            image: crate::engine::ImageOptions {
                writable,
                ..Default::default()
            },
            force_share,
            locked_ok: true,
            ..Default::default()
        },
    )
}
