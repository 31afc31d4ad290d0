//! Creating a new, empty qcow2 image (version 3, 16-bit refcounts), laid out the way
//! `qemu-img create` does: header, refcount table, one refcount block, L1 table, and for
//! an encrypted image its LUKS area.

use crate::error::{Error, Result};
use crate::format::header::{CryptMethod, Header};
use crate::format::refcount::RefcountLayout;
use crate::storage::Storage;
use std::path::Path;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub size: u64,
    /// Cluster size as a power of two (9 to 21).
    pub cluster_bits: u32,
    /// Backing file name and format to record in the header (reads do not use it when
    /// the caller wires the backing layer itself).
    pub backing: Option<(Vec<u8>, String)>,
    /// A LUKS area (`crypto::create_luks_area`) to encrypt the image with: it is stored
    /// after the L1 table, and the header points at it.
    pub luks_area: Option<Vec<u8>>,
}

/// Writes an empty image of `opts.size` bytes into `store`.
pub fn create(store: &dyn Storage, path: &Path, opts: &CreateOptions) -> Result<()> {
    let cb = opts.cluster_bits;
    let cs = 1u64 << cb;
    let size = opts.size.next_multiple_of(512);
    let mut header = Header {
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        ..Header::new_v3(cb, size)
    };
    if let Some((name, fmt)) = &opts.backing {
        header.backing_file = Some(name.clone());
        header.backing_format = Some(fmt.clone());
    }
    let l1_entries = header.l1_entries_for(size);
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    header.l1_size = l1_entries as u32;
    header.l1_table_offset = 3 * cs;
    let luks_at = (3 + l1_clusters) * cs;
    let luks_clusters = opts
        .luks_area
        .as_ref()
        .map_or(0, |a| (a.len() as u64).div_ceil(cs));
    if let Some(area) = &opts.luks_area {
        header.crypt_method = CryptMethod::Luks;
        header.fde = Some((luks_at, area.len() as u64));
    }
    let used = 3 + l1_clusters + luks_clusters;
    let layout = RefcountLayout {
        order: 4,
        cluster_bits: cb,
    };
    if used > layout.block_entries() {
        return Err(Error::invalid(format!(
            "a {size}-byte disk needs too large an L1 table for {cs}-byte clusters"
        ))
        .in_file(path));
    }
    let c0 = header.encode().map_err(|e| Error::from(e).in_file(path))?;
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for c in 0..used {
        layout.set(&mut block, c as usize, 1);
    }
    let io = |what: &str, e| Error::io(path, format!("writing {what}"), e);
    store
        .set_len(used * cs)
        .map_err(|e| io("the new image", e))?;
    store.write_at(&c0, 0).map_err(|e| io("the header", e))?;
    store
        .write_at(&table, cs)
        .map_err(|e| io("the refcount table", e))?;
    store
        .write_at(&block, 2 * cs)
        .map_err(|e| io("the refcount block", e))?;
    store
        .write_at(&vec![0u8; (l1_clusters * cs) as usize], 3 * cs)
        .map_err(|e| io("the L1 table", e))?;
    if let Some(area) = &opts.luks_area {
        // The unused key slots are zeros, which the file already reads as.
        let end = area.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        store
            .write_at(&area[..end], luks_at)
            .map_err(|e| io("the LUKS area", e))?;
    }
    store.flush().map_err(|e| io("the new image", e))
}
