//! The library under test: opening an image with its backing chain, and reading a
//! [`BlockDev`] whole or in pieces that cross every boundary at a different place.

use super::bytes::assert_same_bytes;
use qcow2fs::block::{BlockDev, Chain, OpenOptions, open_chain};
use qcow2fs::engine::ImageOptions;
use std::path::Path;

/// Opens `image` with its backing chain, read-only, with default options.
pub fn open(image: &Path) -> Chain {
    open_chain(image, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open_chain({}) failed: {e}", image.display()))
}

/// Opens `image` with its backing chain with `image_options` (writable or not).
pub fn open_with(image: &Path, image_options: ImageOptions) -> Chain {
    let opts = OpenOptions {
        image: image_options,
        ..Default::default()
    };
    open_chain(image, &opts).unwrap_or_else(|e| {
        panic!(
            "open_chain({}, writable {}) failed: {e}",
            image.display(),
            opts.image.writable
        )
    })
}

/// Opens `image` read-write with its backing chain, otherwise with default options.
pub fn open_rw(image: &Path) -> Chain {
    open_with(
        image,
        ImageOptions {
            writable: true,
            ..Default::default()
        },
    )
}

/// Reads all of `dev` in one call.
pub fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("read_at(0, {}) failed: {e}", buf.len()));
    buf
}

/// Reads all of `dev` in `chunk`-byte pieces (unaligned chunk sizes cross every kind of
/// boundary at a different place), plus a final read running past the end, which must
/// come back zero-filled.
pub fn read_chunked(dev: &dyn BlockDev, chunk: usize) -> Vec<u8> {
    let size = dev.size() as usize;
    let mut out = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        dev.read_at(&mut out[off..off + n], off as u64)
            .unwrap_or_else(|e| panic!("read_at({off:#x}, {n}) failed: {e}"));
        off += n;
    }
    let start = size.saturating_sub(chunk / 2);
    let mut past = vec![0xa5u8; size - start + chunk];
    dev.read_at(&mut past, start as u64)
        .unwrap_or_else(|e| panic!("read_at({start:#x}, {}) failed: {e}", past.len()));
    let (inside, beyond) = past.split_at(size - start);
    assert_same_bytes(
        "read running past the end of the disk (inside part)",
        &out[start..],
        inside,
    );
    if let Some(i) = beyond.iter().position(|&b| b != 0) {
        panic!(
            "read past the end of the disk (size {size:#x}) returned {:#04x} at offset {:#x} instead of zeros",
            beyond[i],
            size + i
        );
    }
    out
}
