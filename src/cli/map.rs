//! `qcow2fs map`: allocation extents, merged and printed the way `qemu-img map` does.

use crate::block::{BlockDev, Status};
use crate::error::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One merged extent: where it starts, its status (whose `len` is the merged length) and
/// the file of the layer that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub status: Status,
    pub file: PathBuf,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        let (a, b) = (&self.status, &next.status);
        a.zero == b.zero
            && a.data == b.data
            && a.compressed == b.compressed
            && a.depth == b.depth
            && a.present == b.present
            && self.file == next.file
            && match (a.offset, b.offset) {
                (None, None) => true,
                (Some(x), Some(y)) => x + a.len == y,
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
            status: Status::default(),
            file: dev.data_path().to_path_buf(),
        }]);
    }
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = 0;
    while off < size {
        let mut s = dev.status(off, size - off, true)?;
        let len = s.len.max(1).min(size - off);
        s.len = len;
        let e = MapEntry {
            start: off,
            file: file_at_depth(dev, s.depth),
            status: s,
        };
        match out.last_mut() {
            Some(last) if last.mergeable(&e) => last.status.len += len,
            _ => out.push(e),
        }
        off += len;
    }
    Ok(out)
}

pub fn format_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        let st = &e.status;
        if i > 0 {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, st.len, st.depth, st.present, st.zero, st.data, st.compressed
        );
        if let Some(o) = st.offset {
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
        let st = &e.status;
        if st.data && st.offset.is_none() {
            return Err(crate::error::Error::unsupported(
                "the disk contains compressed or encrypted clusters, which have no host offset to print; use --json",
            ));
        }
        if let (true, false, Some(o)) = (st.data, st.zero, st.offset) {
            let _ = writeln!(
                s,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(st.len),
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
