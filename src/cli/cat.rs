//! `qcow2fs cat`: the raw rendering of the disk or a snapshot on standard output.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

const CHUNK: usize = 4 << 20;

pub fn run(
    image: &Path,
    snapshot: Option<&str>,
    opts: &super::options::MountOptions,
) -> Result<()> {
    let chain = super::open(image, opts)?;
    let dev = super::pick_view(&chain, snapshot)?;
    let size = dev.size();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        dev.read_at(&mut buf[..n], off)?;
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(Path::new("<stdout>"), "writing", e))?;
        off += n as u64;
    }
    out.flush()
        .map_err(|e| Error::io(Path::new("<stdout>"), "writing", e))
}
