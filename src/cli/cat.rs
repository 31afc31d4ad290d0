//! `qcow2fs cat`: the raw rendering of the disk or a snapshot on standard output, or a
//! snapshot's VM state (the stream QEMU saved) or the guest memory rebuilt from it.

use crate::block::{BlockDev, VmStateFiles};
use crate::error::{Error, ErrorKind, Result};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

const CHUNK: usize = 4 << 20;

/// What to write.
#[derive(Clone, Debug)]
pub enum What {
    /// The active disk, or the snapshot named.
    Disk(Option<String>),
    /// The VM state saved with the snapshot named.
    VmState(String),
    /// The guest-physical memory rebuilt from that VM state.
    Memory(String),
}

/// The VM state of the snapshot `spec` names.
fn vm_state(chain: &crate::block::Chain, spec: &str) -> Result<VmStateFiles> {
    let s = super::find_snapshot(chain, spec)?;
    VmStateFiles::open(&chain.top, &s)
}

pub fn run(image: &Path, what: &What, opts: &super::options::MountOptions) -> Result<()> {
    let chain = super::open(image, opts)?;
    let dev: Arc<dyn BlockDev> = match what {
        What::Disk(snapshot) => super::pick_view(&chain, snapshot.as_deref())?,
        What::VmState(spec) => vm_state(&chain, spec)?.stream,
        What::Memory(spec) => {
            let files = vm_state(&chain, spec)?;
            match (files.memory, files.summary) {
                (Some(m), _) => m,
                (None, Err(why)) => return Err(Error::new(ErrorKind::Corrupt, why)),
                (None, Ok(sum)) => {
                    let why = sum.physical.err().unwrap_or_default();
                    return Err(Error::unsupported(format!(
                        "snapshot '{spec}': no guest-physical memory: {why}"
                    ))
                    .in_file(image));
                }
            }
        }
    };
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
