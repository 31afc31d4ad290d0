//! `qcow2fs status MNT`: what a running mount serves, asked of its daemon over the
//! control channel (the daemon's side is in `daemon`).

use super::control;
use crate::error::Result;
use serde_json::{Value, json};
use std::path::Path;

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
    for r in items(&v, "remote") {
        let g = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        let lookups = g("memory_hits") + g("disk_hits") + g("fetched_for_reads");
        println!(
            "remote {}: {} requests ({} retried), {} bytes fetched for {} read; blocks: {} from memory, {} from the disk cache{}, {} fetched, {} ahead; hit rate {:.1}%",
            text(r, "url"),
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
    for l in items(&v, "layers") {
        println!(
            "layer {}: {} ({})",
            l.get("depth").and_then(Value::as_u64).unwrap_or(0),
            text(l, "path"),
            text(l, "format")
        );
    }
    for sn in items(&v, "snapshots") {
        println!("snapshot {}: {}", text(sn, "id"), text(sn, "name"));
    }
    Ok(())
}

/// The elements of the array `v[key]` (none when it is missing or not an array).
fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// The string `v[key]`, or "" when it is missing or not a string.
fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}
