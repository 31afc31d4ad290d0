//! The daemon's side of `qcow2fs bitmap` on a mount: the `bitmap-*` control requests.
//! Changes hold the mount's I/O gate exclusively (design.md, rule L6), as the snapshot
//! operations do, and the mount's `bitmaps/` files follow them.

use super::{extents_json, info_json};
use crate::cli::daemon::Daemon;
use crate::engine::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::fuse::namespace::ROOT_INO;
use serde_json::{Value, json};
use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Answers a `bitmap-*` control request of a mount.
pub fn serve(d: &Daemon, op: &str, req: &Value) -> std::result::Result<Value, String> {
    let name = req.get("name").and_then(Value::as_str).unwrap_or_default();
    let image = d.image();
    let done = match op {
        "bitmap-list" => Ok(json!({
            "bitmaps": image.bitmap_list().iter().map(info_json).collect::<Vec<_>>()
        })),
        "bitmap-dump" => image
            .bitmap_dirty_extents(name)
            .map(|e| json!({ "extents": extents_json(&e) })),
        _ => change_mounted(d, op, name, req),
    };
    done.map_err(|e| e.report())
}

/// A change to the bitmaps of a read-write mount: under the I/O gate, with the mount's
/// `bitmaps/` files following.
fn change_mounted(d: &Daemon, op: &str, name: &str, req: &Value) -> Result<Value> {
    let verb = op.trim_start_matches("bitmap-");
    d.check_rw(&format!("cannot {verb} bitmap '{name}'"))?;
    let image = d.image();
    let source = match req.get("source-file").and_then(Value::as_str) {
        Some(f) => Some(crate::cli::open_for_metadata(Path::new(f), false, false)?),
        None => None,
    };
    let gate = d.mount.exclusive();
    let mut notify: Option<(u64, OsString)> = None;
    match op {
        "bitmap-add" => {
            let g = req.get("granularity").and_then(Value::as_u64);
            image.bitmap_add(name, g, true)?;
            if d.show_bitmaps {
                let now = std::time::SystemTime::now();
                // Lock order: the chain before the namespace, as for external snapshots.
                let chain = d.chain.read();
                let mut ns = d.mount.ns_mut();
                let (dir, made) = ns.bitmaps_dir(now);
                let (_, file) = ns.add_bitmap(dir, &chain, name, now);
                notify = Some(if made {
                    (ROOT_INO, "bitmaps".into())
                } else {
                    (dir, file)
                });
            }
        }
        "bitmap-remove" => {
            let mut ns = d.mount.ns_mut();
            let file = ns.bitmap_file(name);
            if let Some((ino, _, f)) = &file {
                let open = ns.node(*ino).map_or(0, |n| n.state.open.load(Relaxed));
                if open > 0 {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "bitmaps/{} is open ({open} handle(s)); close it first",
                            f.to_string_lossy()
                        ),
                    )
                    .in_file(&d.mountpoint));
                }
            }
            image.bitmap_remove(name)?;
            if let Some((ino, dir, f)) = file {
                ns.remove(ino);
                notify = Some((dir, f));
            }
        }
        "bitmap-clear" => image.bitmap_clear(name)?,
        "bitmap-enable" => image.bitmap_set_enabled(name, true)?,
        "bitmap-disable" => image.bitmap_set_enabled(name, false)?,
        "bitmap-merge" => {
            let src = req
                .get("source")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let from: Arc<Image> = source.as_ref().map_or(image.clone(), |s| s.image().clone());
            image.bitmap_merge(name, &from, src)?;
        }
        _ => {
            return Err(Error::invalid(format!("unknown request '{op}'")));
        }
    }
    drop(gate);
    if let Some((parent, entry)) = notify {
        d.mount.invalidate_entry(parent, &entry);
    }
    log::info!("bitmap '{name}': {verb} done");
    Ok(json!({ "bitmap": name }))
}
