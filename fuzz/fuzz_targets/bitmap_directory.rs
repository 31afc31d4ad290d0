//! A bitmap directory and bitmap table words as arbitrary bytes. Parsing and checking
//! never panic; a directory whose entries pass QEMU's checks encodes and parses back to
//! the same entries; a table word that decodes encodes back to the same meaning.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::format::bitmap::{
    check_directory, check_entry, decode_table_entry, encode_directory, encode_table_entry,
    parse_directory,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let nb = u16::from_be_bytes([data[0], data[1]]) as u32;
    let cluster_bits = 9 + (data[2] % 13) as u32;
    let body = &data[3..];
    for w in body.chunks_exact(8) {
        let word = u64::from_be_bytes(w.try_into().unwrap());
        if let Ok(e) = decode_table_entry(word, 1 << cluster_bits) {
            assert_eq!(decode_table_entry(encode_table_entry(e), 1 << cluster_bits), Ok(e));
        }
    }
    let Ok(entries) = parse_directory(body, nb, 0x10000) else {
        return;
    };
    let disk = 1u64 << 30;
    if check_directory(&entries).is_err()
        || entries.iter().any(|e| check_entry(e, cluster_bits, disk).is_err())
    {
        return;
    }
    let bytes = encode_directory(&entries);
    let back = parse_directory(&bytes, entries.len() as u32, 0x10000)
        .unwrap_or_else(|e| panic!("an encoded directory does not parse: {e}"));
    assert_eq!(back.len(), entries.len());
    for (a, b) in entries.iter().zip(&back) {
        assert_eq!(
            (&a.name, a.table_offset, a.table_size, a.flags, a.kind, a.granularity_bits),
            (&b.name, b.table_offset, b.table_size, b.flags, b.kind, b.granularity_bits)
        );
    }
});
