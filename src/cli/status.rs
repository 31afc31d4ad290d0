//! `qcow2fs status MNT`: what a running mount serves, asked of its daemon over the
//! control channel; and the daemon's side, which answers control requests.

use super::control;
use crate::block::{BlockDev, Chain};
use crate::error::Result;
use crate::fuse::OpenFiles;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// What the daemon of one mount knows about itself, to answer control requests.
pub struct Daemon {
    pub chain: Chain,
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// `ro`, `rw`, `rw,copy-on-read` or `overlay`.
    pub mode: String,
    pub force_share: bool,
    pub open_files: Arc<OpenFiles>,
}

impl Daemon {
    fn layer_json(depth: usize, dev: &dyn BlockDev) -> Value {
        json!({"depth": depth, "path": dev.info().path, "format": dev.info().format})
    }

    /// The answer to `{"op": "status"}`.
    pub fn status(&self) -> Value {
        let image = self.chain.image();
        let mut layers = vec![Self::layer_json(0, &*self.chain.top)];
        layers.extend(
            self.chain
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| Self::layer_json(i + 1, &**l)),
        );
        let snapshots: Vec<Value> = image
            .snapshots()
            .iter()
            .map(|s| json!({"id": s.entry.id, "name": s.entry.name(), "disk-size": s.disk_size}))
            .collect();
        let writable = image.is_writable();
        let locks = if self.force_share {
            "none (force_share)".to_string()
        } else if writable {
            "write on the image (and its data file), read on the backing files".to_string()
        } else {
            "read on the image and its backing files".to_string()
        };
        json!({
            "pid": std::process::id(),
            "image": self.image,
            "mountpoint": self.mountpoint,
            "mode": self.mode,
            "layers": layers,
            "snapshots": snapshots,
            "open-files": self.open_files.total.load(Relaxed),
            "open-for-writing": self.open_files.writers.load(Relaxed),
            "cache": image.cache_stats(),
            "locks": locks,
            "remote": crate::storage::remote::stats(),
        })
    }

    /// Answers one control request.
    pub fn handle(&self, req: &Value) -> std::result::Result<Value, String> {
        match req.get("op").and_then(Value::as_str) {
            Some("status") => Ok(self.status()),
            Some(op) => Err(format!("unknown request '{op}'")),
            None => Err("the request names no op".into()),
        }
    }
}

/// `qcow2fs status [--json] MNT`.
pub fn run(mountpoint: &Path, as_json: bool) -> Result<()> {
    let v = control::request(mountpoint, &json!({"op": "status"}))?;
    if as_json {
        let mut v = v;
        if let Some(o) = v.as_object_mut() {
            o.remove("ok");
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let s = |k: &str| {
        v.get(k)
            .map(|x| x.as_str().map_or(x.to_string(), str::to_string))
    };
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!("mount point: {}", s("mountpoint").unwrap_or_default());
    println!("image: {}", s("image").unwrap_or_default());
    println!("mode: {}", s("mode").unwrap_or_default());
    println!("daemon pid: {}", n("pid"));
    println!(
        "open files: {} ({} for writing)",
        n("open-files"),
        n("open-for-writing")
    );
    if let Some(c) = v.get("cache") {
        let g = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
        println!(
            "L2 cache: {} tables of {} bytes' room, {} not written back; refcount blocks: {} cached, {} not written back{}",
            g("l2_tables"),
            g("l2_capacity_bytes"),
            g("l2_dirty"),
            g("refcount_blocks"),
            g("refcount_dirty"),
            if c.get("l1_dirty") == Some(&Value::Bool(true)) {
                "; L1 table not written back"
            } else {
                ""
            }
        );
    }
    println!("locks: {}", s("locks").unwrap_or_default());
    for r in v
        .get("remote")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let g = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        let lookups = g("memory_hits") + g("disk_hits") + g("fetched_for_reads");
        println!(
            "remote {}: {} requests ({} retried), {} bytes fetched for {} read; blocks: {} from memory, {} from the disk cache{}, {} fetched, {} ahead; hit rate {:.1}%",
            r.get("url").and_then(Value::as_str).unwrap_or(""),
            g("requests"),
            g("retries"),
            g("bytes_fetched"),
            g("bytes_read"),
            g("memory_hits"),
            g("disk_hits"),
            if r.get("cached_on_disk") == Some(&Value::Bool(true)) {
                ""
            } else {
                " (off)"
            },
            g("fetched_for_reads"),
            g("readahead_blocks"),
            if lookups == 0 {
                0.0
            } else {
                100.0 * (g("memory_hits") + g("disk_hits")) as f64 / lookups as f64
            }
        );
    }
    for l in v
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "layer {}: {} ({})",
            l.get("depth").and_then(Value::as_u64).unwrap_or(0),
            l.get("path").and_then(Value::as_str).unwrap_or(""),
            l.get("format").and_then(Value::as_str).unwrap_or("")
        );
    }
    for sn in v
        .get("snapshots")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "snapshot {}: {}",
            sn.get("id").and_then(Value::as_str).unwrap_or(""),
            sn.get("name").and_then(Value::as_str).unwrap_or("")
        );
    }
    Ok(())
}
