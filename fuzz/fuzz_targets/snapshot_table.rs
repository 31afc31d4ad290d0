//! The snapshot table as arbitrary bytes (the first two give the entry count). A table
//! that parses must encode and parse back to the same entries, and encode to the same
//! bytes again; a table that needs more bytes must say how many.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::format::snapshot::{SnapshotEntry, TableRead, encode_table, parse_table};

/// An entry with what `encode` recomputes: the 32-bit VM-state size, which QEMU rewrites
/// from the 64-bit one whenever the extra data holds it.
fn comparable(entries: &[SnapshotEntry]) -> Vec<SnapshotEntry> {
    entries
        .iter()
        .map(|e| SnapshotEntry {
            vm_state_size_legacy: 0,
            ..e.clone()
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let nb = u16::from_be_bytes([data[0], data[1]]) as u32;
    let table = &data[2..];
    let entries = match parse_table(table, nb, 0x10000) {
        Ok(TableRead::Entries(e)) => e,
        Ok(TableRead::NeedBytes(n)) => {
            assert!(n > table.len(), "NeedBytes({n}) with {} bytes", table.len());
            return;
        }
        Err(_) => return,
    };
    assert_eq!(entries.len(), nb as usize);
    for e in &entries {
        assert_eq!(e.encode().len(), e.encoded_len());
        let _ = e.name();
    }
    let encoded = encode_table(&entries);
    let again = match parse_table(&encoded, nb, 0x10000) {
        Ok(TableRead::Entries(e)) => e,
        other => panic!("an encoded table does not parse: {other:?}"),
    };
    assert_eq!(
        comparable(&again),
        comparable(&entries),
        "decode(encode(t)) != t"
    );
    assert!(encode_table(&again) == encoded, "encode is not stable");
});
