//! The command line: parse arguments (clap), validate them into options, build the block
//! stack and run the command. Every failure ends as one line on stderr and exit status 1.

mod cat;
mod info;
mod map;

use crate::block::{self, Chain, OpenOptions};
use crate::error::{Error, ErrorKind, Result};
use clap::{Parser, Subcommand};
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
        image: PathBuf,
    },
    /// Write the raw disk, or one snapshot at its own disk size, to standard output.
    Cat {
        /// Snapshot ID or name (IDs are tried first, as in qemu-img).
        #[arg(short, long, value_name = "ID|NAME")]
        snapshot: Option<String>,
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
        image: PathBuf,
    },
}

/// Opens `image` with its chain, or fails with a one-line error.
pub(crate) fn open(image: &Path) -> Result<Chain> {
    block::open_chain(image, &OpenOptions::default())
}

/// The active disk, or the snapshot `key` names.
pub(crate) fn pick_view(chain: &Chain, key: Option<&str>) -> Result<Arc<dyn block::BlockDev>> {
    match key {
        None => Ok(chain.top.clone()),
        Some(k) => {
            let i = chain.image().find_snapshot(k).ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("no snapshot with ID or name '{k}'"),
                )
                .in_file(chain.image().path())
            })?;
            chain.image().snapshot_l1(i)?;
            Ok(chain.snapshot(i))
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { json, image } => info::run(&image, json),
        Command::Cat { snapshot, image } => cat::run(&image, snapshot.as_deref()),
        Command::Map {
            json,
            snapshot,
            image,
        } => map::run(&image, snapshot.as_deref(), json),
    }
}

/// Entry point for the binary: returns the process exit status.
pub fn main() -> i32 {
    // Writing to a closed pipe (`qcow2fs cat ... | head`) ends the process quietly.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2fs: {e}");
            1
        }
    }
}
