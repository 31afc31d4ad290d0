//! `qcow2fs map`: allocation extents, merged and printed the way `qemu-img map` does.

use crate::block::BlockDev;
use crate::error::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One merged extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    pub file: PathBuf,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// The path of the file holding the data of the layer `depth` levels below `dev`.
fn file_at_depth(dev: &dyn BlockDev, depth: u32) -> PathBuf {
    let mut cur = dev;
    for _ in 0..depth {
        match cur.backing() {
            Some(b) => cur = &**b,
            None => break,
        }
    }
    cur.data_path().to_path_buf()
}

/// Every extent of `dev`, merged like qemu-img map.
pub fn entries(dev: &dyn BlockDev) -> Result<Vec<MapEntry>> {
    let size = dev.size();
    if size == 0 {
        // qemu-img map prints one empty extent for an empty disk.
        return Ok(vec![MapEntry {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            file: dev.data_path().to_path_buf(),
        }]);
    }
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = 0;
    while off < size {
        let s = dev.status(off, size - off, true)?;
        let len = s.len.max(1).min(size - off);
        let e = MapEntry {
            start: off,
            length: len,
            depth: s.depth,
            present: s.present,
            zero: s.zero,
            data: s.data,
            compressed: s.compressed,
            offset: s.offset,
            file: file_at_depth(dev, s.depth),
        };
        match out.last_mut() {
            Some(last) if last.mergeable(&e) => last.length += e.length,
            _ => out.push(e),
        }
        off += len;
    }
    Ok(out)
}

pub fn format_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
    }
    s.push_str("]\n");
    s
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

pub fn format_human(entries: &[MapEntry]) -> Result<String> {
    let mut s = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for e in entries {
        if e.data && e.offset.is_none() {
            return Err(crate::error::Error::unsupported(
                "the disk contains compressed clusters, which have no host offset to print; use --json",
            ));
        }
        if let (true, false, Some(o)) = (e.data, e.zero, e.offset) {
            let _ = writeln!(
                s,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(o),
                e.file.display()
            );
        }
    }
    Ok(s)
}

pub fn run(
    image: &Path,
    snapshot: Option<&str>,
    json: bool,
    opts: &super::options::MountOptions,
) -> Result<()> {
    let chain = super::open(image, opts)?;
    let dev = super::pick_view(&chain, snapshot)?;
    let entries = entries(&*dev)?;
    let text = if json {
        format_json(&entries)
    } else {
        format_human(&entries)?
    };
    print!("{text}");
    Ok(())
}
