//! Byte patches for image states QEMU's tools will not create on purpose (a missing
//! backing-format extension, a snapshot's VM-state size, an in-use bitmap), with minimal
//! parsing of their own so they do not depend on the code under test.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

fn write(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

fn cluster0(path: &Path) -> Vec<u8> {
    let h = read(path, 0, 104);
    let cs = 1usize << be32(&h, 20);
    let len = std::fs::metadata(path).unwrap().len() as usize;
    read(path, 0, cs.min(len))
}

/// (type, offset of the record) for each header extension.
fn extensions(c0: &[u8]) -> Vec<(u32, usize)> {
    let version = be32(c0, 4);
    let mut at = if version >= 3 {
        be32(c0, 100) as usize
    } else {
        72
    };
    let backing = be64(c0, 8) as usize;
    let end = if backing != 0 { backing } else { c0.len() };
    let mut out = Vec::new();
    while at + 8 <= end {
        let ty = be32(c0, at);
        let len = be32(c0, at + 4) as usize;
        if ty == 0 {
            break;
        }
        out.push((ty, at));
        at += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// Renames header extension `from` to type `to` (an unknown type, which readers skip).
pub fn retype_extension(path: &Path, from: u32, to: u32) {
    let c0 = cluster0(path);
    let (_, at) = extensions(&c0)
        .into_iter()
        .find(|(t, _)| *t == from)
        .unwrap_or_else(|| panic!("{}: no extension {from:#x}", path.display()));
    write(path, at as u64, &to.to_be_bytes());
}

pub const BACKING_FORMAT_EXT: u32 = 0xe279_2aca;
pub const BITMAPS_EXT: u32 = 0x2385_2875;

/// Sets snapshot `index`'s VM-state size (the 32-bit field and the 64-bit extra field).
pub fn set_snapshot_vm_state_size(path: &Path, index: usize, size: u64) {
    let h = read(path, 0, 72);
    let nb = be32(&h, 60) as usize;
    assert!(index < nb, "snapshot index {index} of {nb}");
    let table = be64(&h, 64);
    let mut at = table;
    for i in 0..=index {
        let e = read(path, at, 40);
        let id_len = u16::from_be_bytes([e[12], e[13]]) as u64;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as u64;
        let extra = be32(&e, 36) as u64;
        if i == index {
            write(path, at + 32, &(size as u32).to_be_bytes());
            if extra >= 8 {
                write(path, at + 40, &size.to_be_bytes());
            }
            return;
        }
        at += (40 + extra + id_len + name_len).div_ceil(8) * 8;
    }
}

/// ORs `flags` into the directory entry of bitmap `name`.
pub fn set_bitmap_flags(path: &Path, name: &str, flags: u32) {
    let c0 = cluster0(path);
    let (_, at) = extensions(&c0)
        .into_iter()
        .find(|(t, _)| *t == BITMAPS_EXT)
        .expect("bitmaps extension");
    let nb = be32(&c0, at + 8) as usize;
    let dir_size = be64(&c0, at + 16) as usize;
    let dir_off = be64(&c0, at + 24);
    let dir = read(path, dir_off, dir_size);
    let mut e = 0usize;
    for _ in 0..nb {
        let old = be32(&dir, e + 12);
        let name_size = u16::from_be_bytes([dir[e + 18], dir[e + 19]]) as usize;
        let extra = be32(&dir, e + 20) as usize;
        let n = &dir[e + 24 + extra..e + 24 + extra + name_size];
        if n == name.as_bytes() {
            write(path, dir_off + e as u64 + 12, &(old | flags).to_be_bytes());
            return;
        }
        e += (24 + extra + name_size).div_ceil(8) * 8;
    }
    panic!("{}: no bitmap named {name}", path.display());
}
