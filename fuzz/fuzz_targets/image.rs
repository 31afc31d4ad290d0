//! Arbitrary bytes opened as a qcow2 image through the library, the way `cat` and the
//! mount open one, then read: a few ranges and extents of the active disk and of every
//! snapshot (at most 8), and for some inputs a small write, flush and close. Opening and
//! reading must end in data or an error, never a panic, a hang or a huge allocation.
//!
//! The image is a file in a private temporary directory (tmpfs when there is one), which
//! is also the only place backing and data files may come from (it holds `base.raw`,
//! which the seed overlay names).

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::block::{BackingPolicy, BlockDev, OpenOptions, open_chain};
use qcow2fs::engine::ImageOptions;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Bytes read per range.
const READ_LEN: usize = 64 * 1024;
const MAX_SNAPSHOTS: usize = 8;

fn workdir() -> &'static (tempfile::TempDir, PathBuf) {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("qcow2fs-fuzz-")
            .tempdir_in(base)
            .expect("creating the fuzz directory");
        // A raw file the seed corpus's overlay names as its backing file.
        let pattern: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("base.raw"), pattern).expect("writing base.raw");
        let image = dir.path().join("image.qcow2");
        (dir, image)
    })
}

/// Offsets to look at: the start, the end, and a few the input picks.
fn offsets(size: u64, seed: &[u8]) -> Vec<u64> {
    let mut v = vec![0, size.saturating_sub(READ_LEN as u64 / 2), size / 2];
    for c in seed.chunks_exact(8).take(3) {
        let o = u64::from_le_bytes(c.try_into().unwrap());
        if size > 0 {
            v.push(o % size);
        }
    }
    v
}

fn exercise(dev: &dyn BlockDev, seed: &[u8], buf: &mut [u8]) {
    let size = dev.size();
    for off in offsets(size, seed) {
        let _ = dev.read_at(buf, off);
        if off < size {
            let _ = dev.status(off, (size - off).min(1 << 30), true);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (dir, path) = workdir();
    std::fs::write(path, data).expect("writing the fuzz image");
    let seed = &data[data.len().saturating_sub(24)..];
    let writable = data.last().is_some_and(|b| b & 0x0f == 0x0f);
    let opts = OpenOptions {
        image: ImageOptions {
            cache_bytes: 1 << 20,
            writable,
        },
        backing: BackingPolicy::Follow,
        backing_dir: Some(dir.path().to_path_buf()),
        force_share: true,
        ..Default::default()
    };
    let Ok(chain) = open_chain(path, &opts) else {
        return;
    };
    let mut buf = vec![0u8; READ_LEN];
    exercise(&*chain.top, seed, &mut buf);
    let image = chain.image().clone();
    for s in image.snapshots().iter().take(MAX_SNAPSHOTS) {
        if image.check_snapshot(s).is_ok() {
            exercise(&*chain.snapshot(s.key), seed, &mut buf);
        }
    }
    if writable {
        let size = chain.top.size();
        if size > 0 {
            let off = offsets(size, seed).last().copied().unwrap_or(0) & !511;
            let len = (size - off).min(4096) as usize;
            let _ = chain.top.write_at(&buf[..len], off);
            let _ = chain.top.write_zeroes(0, (size).min(1 << 20), true);
            let _ = chain.top.flush();
        }
        let _ = chain.top.close();
    }
});
