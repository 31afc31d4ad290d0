//! What a mount must show, from QEMU's view of the image: the root directory, the
//! `snapshots/` file names (escaped, `@ID` where a name is empty, special or shared), the
//! `layers/` files, and each file's size, bytes, st_blocks and mtime.

use super::bytes::assert_same_bytes;
use super::files::stem;
use super::qemu::qemu_backing_chain_json;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// (start, length, zero, data) of each `qemu-img map` entry.
pub fn map_entries(map: &Value) -> Vec<(u64, u64, bool, bool)> {
    map.as_array()
        .unwrap_or_else(|| panic!("map output is not an array: {map}"))
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Bytes `qemu-img map` reports as `"data": true`.
pub fn map_data_bytes(map: &Value) -> u64 {
    map_entries(map).iter().filter(|e| e.3).map(|e| e.1).sum()
}

/// The metadata of `path` once its st_blocks is counted: until the daemon has counted a
/// file's allocated bytes (in the background, so that a large image's first lookup is not
/// delayed) it reports one block more than the size, for at most a second at a time.
pub fn counted_metadata(path: &Path) -> fs::Metadata {
    let mut md = fs::metadata(path).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while md.blocks() > md.len().div_ceil(512) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        md = fs::metadata(path).unwrap();
    }
    md
}

/// st_blocks must account for the data bytes QEMU reports, within 512-byte rounding.
pub fn check_blocks(what: &str, md: &fs::Metadata, map: &Value) {
    let data = map_data_bytes(map);
    let blocks = md.blocks();
    assert!(
        (blocks * 512).abs_diff(data) < 512,
        "{what}: st_blocks is {blocks} ({} bytes) but qemu-img map reports {data} bytes of \
         data (expected st_blocks {} within 512-byte rounding)",
        blocks * 512,
        data.div_ceil(512)
    );
}

pub fn mtime(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

/// One snapshot as `qemu-img info` lists it, with the file name the layout gives it.
#[derive(Clone, Debug)]
pub struct SnapFile {
    pub id: String,
    pub name: String,
    pub file: String,
    pub date: (i64, i64),
    /// The VM-state size `qemu-img info` gives.
    pub vm_state_size: u64,
}

impl SnapFile {
    /// `SNAPNAME.vmstate` (its file name without `.raw`, and `.vmstate`) for a snapshot
    /// with VM state: the mount shows it whenever the state lies within the snapshot's
    /// L1 table, whatever the bytes are.
    pub fn vmstate_file(&self) -> Option<String> {
        let stem = self.file.strip_suffix(".raw").unwrap();
        (self.vm_state_size > 0).then(|| format!("{stem}.vmstate"))
    }
}

/// Escapes a snapshot name for a file name: `%` → `%25`, `/` → `%2F`.
pub fn escape_snapshot_name(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            c => s.push(c),
        }
    }
    s
}

/// `snapshots/` file names per the layout rules, from `qemu-img info --output=json`:
/// SNAPNAME.raw, or SNAPNAME@ID.raw where the name is empty, `.`, `..` or shared.
pub fn expected_snapshot_files(info: &Value) -> Vec<SnapFile> {
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = snaps
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let files: Vec<SnapFile> = snaps
        .iter()
        .zip(&names)
        .map(|(s, name)| {
            let id = s["id"].as_str().unwrap().to_string();
            let shared = names.iter().filter(|n| *n == name).count() > 1;
            let special = name.is_empty() || name == "." || name == "..";
            let esc = escape_snapshot_name(name);
            let file = if shared || special {
                format!("{esc}@{id}.raw")
            } else {
                format!("{esc}.raw")
            };
            SnapFile {
                id,
                name: name.clone(),
                file,
                date: (
                    s["date-sec"].as_i64().unwrap(),
                    s["date-nsec"].as_i64().unwrap(),
                ),
                vm_state_size: s["vm-state-size"].as_u64().unwrap(),
            }
        })
        .collect();
    let unique: BTreeSet<&str> = files.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(
        unique.len(),
        files.len(),
        "the layout rules give two snapshots the same file name ({files:?}); \
         this test cannot tell which file is which"
    );
    files
}

/// One backing layer as `qemu-img info --backing-chain` lists it.
#[derive(Clone, Debug)]
pub struct LayerFile {
    pub file: String,
    pub path: PathBuf,
    pub format: String,
}

/// `layers/N-FILENAME.raw` for each backing layer (1 = the direct backing file).
pub fn expected_layer_files(top: &Path) -> Vec<LayerFile> {
    qemu_backing_chain_json(top)
        .iter()
        .enumerate()
        .skip(1)
        .map(|(n, q)| {
            let path = PathBuf::from(q["filename"].as_str().unwrap());
            LayerFile {
                file: format!("{n}-{}.raw", stem(&path)),
                format: q["format"].as_str().unwrap().to_string(),
                path,
            }
        })
        .collect()
}

/// The root directory's expected entries.
/// `bitmaps/` file names from `qemu-img info --output=json`: BITMAPNAME.raw (escaped like
/// a snapshot name) for every bitmap not in use (an inconsistent one has no file).
pub fn expected_bitmap_files(info: &Value) -> BTreeSet<String> {
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|b| {
                    !b["flags"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|f| f == "in-use"))
                })
                .map(|b| format!("{}.raw", escape_snapshot_name(b["name"].as_str().unwrap())))
                .collect()
        })
        .unwrap_or_default()
}

pub fn expected_root(top: &Path, snapshots: bool, layers: bool) -> BTreeSet<String> {
    let mut root = BTreeSet::from([format!("{}.raw", stem(top))]);
    if snapshots {
        root.insert("snapshots".into());
    }
    if layers {
        root.insert("layers".into());
    }
    root
}

/// Checks one regular file of the mount: size, content, and optionally st_blocks (against
/// a `qemu-img map`) and mtime.
pub fn check_file(
    what: &str,
    path: &Path,
    expected: &[u8],
    map: Option<&Value>,
    mtime_expected: Option<(i64, i64)>,
) {
    let md = fs::metadata(path).unwrap_or_else(|e| panic!("{what}: stat {}: {e}", path.display()));
    assert!(
        md.is_file(),
        "{what}: {} is not a regular file",
        path.display()
    );
    assert_eq!(
        md.len(),
        expected.len() as u64,
        "{what}: size of {} (expected QEMU's rendering size)",
        path.display()
    );
    let got = fs::read(path).unwrap_or_else(|e| panic!("{what}: read {}: {e}", path.display()));
    assert_same_bytes(&format!("{what} ({})", path.display()), expected, &got);
    if let Some(map) = map {
        check_blocks(what, &counted_metadata(path), map);
    }
    if let Some(t) = mtime_expected {
        assert_eq!(
            mtime(&md),
            t,
            "{what}: mtime (sec, nsec) of {}",
            path.display()
        );
    }
}
