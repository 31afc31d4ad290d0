//! The files of a snapshot's VM state in the mount's tree: which of
//! `SNAPNAME.vmstate`, `SNAPNAME.mem` and `SNAPNAME.ram/BLOCK.raw` a snapshot gets, their
//! names and extended attributes, and the log line for each one left out. The disks
//! behind them are `block::VmStateFiles`; they are always read-only.

use super::namespace::{
    self, FileRole, Namespace, escape_name, raw_name, snapshot_mtime, with_extension,
};
use super::xattr;
use crate::block::{BlockDev, Qcow2Layer, VmStateFiles};
use crate::engine::Snapshot;
use std::sync::Arc;

/// The longest file name the kernel accepts.
const NAME_MAX: usize = 255;

/// Adds the VM-state files of snapshot `s` (of `top`'s image) to directory `dir` of `ns`,
/// named after its file-name stem `stem`: those its state allows, the reasons for the
/// others in the log.
pub fn add_vm_state(ns: &mut Namespace, dir: u64, s: &Snapshot, stem: &[u8], top: &Qcow2Layer) {
    let shown = String::from_utf8_lossy(stem).into_owned();
    let files = match VmStateFiles::open(top, s) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{e:#}; leaving its VM state out of the mount");
            return;
        }
    };
    let key = s.key;
    let mtime = snapshot_mtime(s);
    let mut attrs = xattr::snapshot_attrs(s);
    let sum = match &files.summary {
        Ok(sum) => {
            attrs.extend(xattr::vm_attrs(sum));
            Some(sum)
        }
        Err(why) => {
            log::warn!("{why}; the mount shows the stream alone ({shown}.vmstate)");
            None
        }
    };
    let name = with_extension(stem, "vmstate");
    let file = (
        files.stream.clone() as Arc<dyn BlockDev>,
        FileRole::VmState(key),
    );
    ns.add_file(dir, name, file, mtime, attrs.clone());
    let Some(sum) = sum else { return };
    match (&files.memory, &sum.physical) {
        (Some(mem), _) => {
            let file = (mem.clone() as Arc<dyn BlockDev>, FileRole::Memory(key));
            let name = with_extension(stem, "mem");
            ns.add_file(dir, name, file, mtime, attrs.clone());
        }
        (None, Err(why)) => log::info!(
            "{}: snapshot {shown}: no {shown}.mem: {why}; its RAM blocks are in {shown}.ram/",
            top.image().path().display()
        ),
        (None, Ok(_)) => {}
    }
    if files.blocks.is_empty() {
        return;
    }
    let ram = ns.add(dir, with_extension(stem, "ram"), namespace::dir(), mtime);
    for (i, (block, dev)) in files.blocks.iter().enumerate() {
        let name = raw_name(&escape_name(block.as_bytes()));
        if name.len() > NAME_MAX {
            log::warn!(
                "snapshot {shown}: the file name of RAM block {block:?} would be too long; left out"
            );
            continue;
        }
        let mut attrs = attrs.clone();
        attrs.push(("vmstate.block", block.clone().into_bytes()));
        let file = (dev.clone() as Arc<dyn BlockDev>, FileRole::RamBlock(key, i));
        ns.add_file(ram, name, file, mtime, attrs);
    }
}
