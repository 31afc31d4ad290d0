//! The QEMU-made VM-state fixtures of `tests/data/vmstate` (see its README): where each
//! fixture's files are, unpacking them, their recorded hashes and facts.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

/// The directory of fixture `f` (`A`, `B`, ...).
pub fn fixture_dir(f: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/vmstate")
        .join(f)
}

/// The content of an xz file.
pub fn unxz(path: &Path) -> Vec<u8> {
    let xz = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut &xz[..], &mut out).unwrap();
    out
}

/// The content of fixture `f`'s xz file `name`.
pub fn fixture_unxz(f: &str, name: &str) -> Vec<u8> {
    unxz(&fixture_dir(f).join(name))
}

/// SHA-256 of `b` in lowercase hex, as `sha256sum` prints it.
pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The first word of fixture `f`'s `*.sha256` file `name`.
pub fn expected_hash(f: &str, name: &str) -> String {
    let s = fs::read_to_string(fixture_dir(f).join(name)).unwrap();
    s.split_whitespace().next().unwrap().to_string()
}

/// Fixture `f`'s `fixture.json`: what QEMU and the guest reported when it was made.
pub fn facts(f: &str) -> Value {
    serde_json::from_slice(&fs::read(fixture_dir(f).join("fixture.json")).unwrap()).unwrap()
}

/// Checks guest-physical memory as `read(offset, len)` returns it against fixture `f`:
/// the `MARK ADDR` line the guest wrote at each address of `marks`, and its four pmemsave
/// dumps (`pmem-ADDR.bin.xz`) outside the VGA window, which pmemsave reads through the
/// device (see the README).
pub fn check_physical_memory(f: &str, marks: &[u64], read: impl Fn(u64, usize) -> Vec<u8>) {
    for &mark in marks {
        let text = format!("MARK {mark:x}\n");
        assert_eq!(
            read(mark, text.len()),
            text.as_bytes(),
            "{f}: mark {mark:#x}"
        );
    }
    let mut dumps = 0;
    for entry in fs::read_dir(fixture_dir(f)).unwrap() {
        let file_name = entry.unwrap().file_name().into_string().unwrap();
        let Some(addr) = file_name
            .strip_prefix("pmem-")
            .and_then(|x| x.strip_suffix(".bin.xz"))
        else {
            continue;
        };
        let addr = u64::from_str_radix(addr, 16).unwrap();
        let mut dump = fixture_unxz(f, &file_name);
        let mut mem = read(addr, dump.len());
        for a in 0xa0000..0xc0000u64 {
            if a >= addr && a < addr + dump.len() as u64 {
                mem[(a - addr) as usize] = 0;
                dump[(a - addr) as usize] = 0;
            }
        }
        assert!(mem == dump, "{f}: pmemsave at {addr:#x} differs");
        dumps += 1;
    }
    assert_eq!(dumps, 4, "{f}: pmemsave dumps");
}
