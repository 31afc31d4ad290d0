//! `qcow2fs map --json` and `qcow2fs info --json` against qemu-img for every scenario.
//!
//! - map: every extent field QEMU prints (start, length, depth, present, zero, data,
//!   compressed, offset) must be equal, entry for entry, for the active disk. For each
//!   snapshot, `qcow2fs map --snapshot` must equal `qemu-img map` of a copy reverted to
//!   that snapshot (`snapshot -a` keeps every data-cluster offset), by ID and by name,
//!   up to the host-hole refinement (see [`without_host_hole_zeros`]).
//! - info: the fields both print (sizes, format, backing names, dirty flag, the snapshot
//!   list and `format-specific`) must be equal, for the top image and each qcow2 layer.

#[macro_use]
mod support;

use serde_json::Value;
use std::path::Path;
use support::corpus;
use support::*;

/// Compares two `map --json` outputs in every field QEMU prints.
fn assert_same_map(what: &str, qemu: &Value, ours: &Value) {
    assert_same_map_fields(what, qemu, ours, &MAP_FIELDS);
}

/// `map` output without the one refinement that depends on which image file QEMU looks
/// at: whether data clusters over holes of the host file are reported as `zero`. QEMU
/// looks for host holes only when a heuristic over the file's refcounts and allocated
/// size (`qcow2_detect_metadata_preallocation`) says the image looks preallocated, and a
/// copy reverted with `snapshot -a` is a different file with different refcounts. So for
/// snapshots, `zero` is cleared on data extents and the extents are merged again before
/// comparing. The active disk's map is compared without this.
fn without_host_hole_zeros(map: &Value) -> Value {
    let mut out: Vec<Value> = Vec::new();
    for e in map_json_entries("normalizing", map) {
        let mut e = e.clone();
        if e["data"] == true {
            e["zero"] = Value::Bool(false);
        }
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|f| last.get(f) == e.get(f));
            let len = last["length"].as_u64().unwrap();
            let follows = match (last.get("offset"), e.get("offset")) {
                (None, None) => true,
                (Some(a), Some(b)) => a.as_u64().unwrap() + len == b.as_u64().unwrap(),
                _ => false,
            };
            if same && follows {
                last["length"] = Value::from(len + e["length"].as_u64().unwrap());
                continue;
            }
        }
        out.push(e);
    }
    Value::Array(out)
}

fn our_map(dir: &Path, image: &Path, snapshot: Option<&str>) -> Value {
    let mut args = vec!["map".to_string(), "--json".to_string()];
    if let Some(s) = snapshot {
        args.extend(["--snapshot".to_string(), s.to_string()]);
    }
    args.push(image.to_string_lossy().into_owned());
    qcow2fs_json(dir, &args)
}

fn check_map(name: &str) {
    let (dir, top) = corpus::build(name);
    let dir = dir.path();
    assert_same_map(
        &format!("{name}: map of the active disk"),
        &qemu_map_json(&top),
        &our_map(dir, &top, None),
    );
    let info = qemu_info_json(&top);
    for s in info["snapshots"].as_array().cloned().unwrap_or_default() {
        let id = s["id"].as_str().unwrap();
        let sname = s["name"].as_str().unwrap();
        let mut keys = vec![id];
        if sname != id {
            keys.push(sname);
        }
        for key in keys {
            let reverted = qemu_snapshot_applied(&top, key);
            assert_same_map(
                &format!("{name}: map --snapshot '{key}' vs qemu-img map after snapshot -a"),
                &without_host_hole_zeros(&qemu_map_json(&reverted.path)),
                &without_host_hole_zeros(&our_map(dir, &top, Some(key))),
            );
        }
    }
}

const INFO_FIELDS: [&str; 7] = [
    "virtual-size",
    "cluster-size",
    "format",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
];

const SNAPSHOT_FIELDS: [&str; 8] = [
    "id",
    "name",
    "vm-state-size",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
    "icount",
];

fn assert_same_field(what: &str, field: &str, qemu: Option<&Value>, ours: Option<&Value>) {
    assert!(
        qemu == ours,
        "{what}: field {field}: qemu-img has {}, qcow2fs has {}",
        qemu.map_or("nothing".to_string(), Value::to_string),
        ours.map_or("nothing".to_string(), Value::to_string)
    );
}

/// Compares the fields both `info --json` outputs have.
fn assert_same_info(what: &str, q: &Value, o: &Value) {
    for f in INFO_FIELDS {
        assert_same_field(what, f, q.get(f), o.get(f));
    }
    let empty = Vec::new();
    let qs = q
        .get("snapshots")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let os = o
        .get("snapshots")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    assert_eq!(qs.len(), os.len(), "{what}: number of snapshots");
    for (i, (qs, os)) in qs.iter().zip(os).enumerate() {
        for f in SNAPSHOT_FIELDS {
            assert_same_field(&format!("{what}: snapshot {i}"), f, qs.get(f), os.get(f));
        }
    }
    let (qf, of) = (&q["format-specific"], &o["format-specific"]);
    assert_same_field(what, "format-specific.type", qf.get("type"), of.get("type"));
    let mut keys: Vec<&String> = qf["data"]
        .as_object()
        .into_iter()
        .chain(of["data"].as_object())
        .flat_map(|m| m.keys())
        .collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        assert_same_field(
            what,
            &format!("format-specific.data.{k}"),
            qf["data"].get(k),
            of["data"].get(k),
        );
    }
}

fn check_info(name: &str) {
    let (dir, top) = corpus::build(name);
    let dir = dir.path();
    // The top image, then every qcow2 layer below it (qemu-img info of each layer file).
    for layer in qemu_backing_chain_json(&top) {
        if layer["format"] != "qcow2" {
            continue;
        }
        let path = Path::new(layer["filename"].as_str().unwrap());
        let ours = qcow2fs_json(dir, &["info".as_ref(), "--json".as_ref(), path.as_os_str()]);
        assert_same_info(
            &format!("{name}: info of {}", path.display()),
            &qemu_info_json(path),
            &ours,
        );
    }
}

mod map {
    use super::check_map;

    scenario_tests!(check_map);
}

mod info {
    use super::check_info;

    scenario_tests!(check_info);
}
