//! `qcow2fs snapshot create|delete|revert|list TARGET ...`: internal snapshots of a
//! mounted image (through its daemon, while files are open and guests run) or of an
//! image that is not mounted (like `qemu-img snapshot`), so one tool does both.

use super::control;
use super::daemon::{check_new_name, is_mountpoint, now, snapshot_json};
use super::guest::Frozen;
use crate::block;
use crate::engine::Snapshot;
use crate::error::{Error, ErrorKind, Result};
use clap::Subcommand;
use serde_json::{Value, json};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The actions of `qcow2fs snapshot`.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Take a snapshot of the active disk of a mount (its mount point) or of an image.
    Create {
        /// Freeze the guest filesystem mounted at DIR (from a loop device on the mount)
        /// around the snapshot, so that it is consistent; repeatable.
        #[arg(long, value_name = "DIR")]
        freeze: Vec<PathBuf>,
        /// Instead of an internal snapshot, put a new image NEW on top of the mounted one
        /// (which becomes its read-only backing file): an external snapshot.
        #[arg(long, value_name = "NEW.qcow2")]
        external: Option<PathBuf>,
        /// The mount point, or an image that is not mounted.
        target: PathBuf,
        /// The new snapshot's name (internal snapshots).
        name: Option<OsString>,
    },
    /// Delete a snapshot (by ID or name) and free what only it used.
    Delete {
        target: PathBuf,
        /// The snapshot's ID or name (IDs are tried first, as in qemu-img).
        snapshot: String,
    },
    /// Make the active disk equal to a snapshot again.
    Revert {
        /// Revert even while a guest filesystem is mounted from the active disk.
        #[arg(long)]
        force: bool,
        target: PathBuf,
        /// The snapshot's ID or name.
        snapshot: String,
    },
    /// List the snapshots.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        target: PathBuf,
    },
}

fn print_snapshot(verb: &str, v: &Value) {
    let s = &v["snapshot"];
    println!(
        "{verb} snapshot {} ({})",
        s["id"].as_str().unwrap_or(""),
        s["name"].as_str().unwrap_or("")
    );
}

fn find(chain: &block::Chain, spec: &str) -> Result<Snapshot> {
    chain.image().find_snapshot(spec).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no snapshot with ID or name '{spec}'"),
        )
        .in_file(chain.image().path())
    })
}

/// Runs `op` on snapshot `spec` of an image that is not mounted, then closes it cleanly.
fn offline(
    target: &Path,
    spec: &str,
    verb: &str,
    op: impl FnOnce(&crate::engine::Image, crate::engine::SnapshotKey) -> Result<()>,
) -> Result<()> {
    let chain = super::open_for_metadata(target, true, false)?;
    let s = find(&chain, spec)?;
    op(chain.image(), s.key)?;
    chain.image().close()?;
    print_snapshot(verb, &json!({ "snapshot": snapshot_json(&s) }));
    Ok(())
}

/// Sends `request` to the daemon of the mount at `target` with the guest filesystems
/// mounted at `freeze` frozen around it: frozen before the request (freezing writes the
/// guest's dirty data through the mount) and thawed when it is answered, error or not.
fn request_frozen(target: &Path, freeze: &[PathBuf], request: &Value) -> Result<Value> {
    let frozen: Vec<Frozen> = freeze
        .iter()
        .map(|d| Frozen::freeze(d))
        .collect::<Result<_>>()?;
    let answer = control::request(target, request);
    drop(frozen);
    answer
}

/// Runs `qcow2fs snapshot ACTION`.
pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Create {
            freeze,
            external,
            target,
            name,
        } => {
            if let Some(new) = external {
                if name.is_some() {
                    return Err(Error::invalid("an external snapshot takes no name"));
                }
                if !is_mountpoint(&target) {
                    return Err(Error::invalid(
                        "--external is for mounted images (for an image that is not mounted, use qemu-img create -b IMAGE -F qcow2 NEW)",
                    )
                    .in_file(&target));
                }
                let new = std::path::absolute(&new).map_err(|e| Error::io(&new, "resolving", e))?;
                request_frozen(
                    &target,
                    &freeze,
                    &json!({"op": "snapshot-create-external", "path": new}),
                )?;
                println!("writes go to {} from now on", new.display());
                return Ok(());
            }
            let name = name
                .ok_or_else(|| Error::invalid("a snapshot needs a name"))?
                .as_bytes()
                .to_vec();
            if is_mountpoint(&target) {
                let v = request_frozen(
                    &target,
                    &freeze,
                    &json!({"op": "snapshot-create", "name": String::from_utf8_lossy(&name)}),
                )?;
                print_snapshot("took", &v);
                return Ok(());
            }
            if !freeze.is_empty() {
                return Err(Error::invalid(
                    "--freeze is for mounted images: give the mount point",
                ));
            }
            let chain = super::open_for_metadata(&target, true, false)?;
            let image = chain.image();
            check_new_name(&image.snapshots(), &name).map_err(|e| e.in_file(&target))?;
            let s = image.create_snapshot(&name, now())?;
            image.close()?;
            print_snapshot("took", &json!({ "snapshot": snapshot_json(&s) }));
            Ok(())
        }
        Action::Delete { target, snapshot } => {
            if is_mountpoint(&target) {
                let v = control::request(
                    &target,
                    &json!({"op": "snapshot-delete", "snapshot": snapshot}),
                )?;
                print_snapshot("deleted", &v);
                return Ok(());
            }
            offline(&target, &snapshot, "deleted", |image, key| {
                image.delete_snapshot(key)
            })
        }
        Action::Revert {
            force,
            target,
            snapshot,
        } => {
            if is_mountpoint(&target) {
                let v = control::request(
                    &target,
                    &json!({"op": "snapshot-revert", "snapshot": snapshot, "force": force}),
                )?;
                print_snapshot("reverted to", &v);
                return Ok(());
            }
            offline(&target, &snapshot, "reverted to", |image, key| {
                image.revert_to_snapshot(key)
            })
        }
        Action::List { json, target } => {
            let list: Vec<Value> = if is_mountpoint(&target) {
                let v = control::request(&target, &json!({"op": "snapshot-list"}))?;
                v["snapshots"].as_array().cloned().unwrap_or_default()
            } else {
                let chain = super::open_for_metadata(&target, false, false)?;
                chain
                    .image()
                    .snapshots()
                    .iter()
                    .map(snapshot_json)
                    .collect()
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(());
            }
            println!("{:<8} {:<24} {:>12}", "ID", "NAME", "DISK SIZE");
            for s in &list {
                println!(
                    "{:<8} {:<24} {:>12}",
                    s["id"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or(""),
                    s["disk-size"].as_u64().unwrap_or(0)
                );
            }
            Ok(())
        }
    }
}
