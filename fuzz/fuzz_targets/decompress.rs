//! Compressed-cluster payloads as arbitrary bytes: the first byte picks the compression
//! type and the cluster size. Decompression either fills the cluster or fails cleanly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::format::compressed::decompress;
use qcow2fs::format::header::CompressionType;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let kind = if sel & 0x80 != 0 {
        CompressionType::Zstd
    } else {
        CompressionType::Deflate
    };
    let cluster_bits = 9 + (sel & 0x0f) as u32 % 13;
    let mut out = vec![0u8; 1 << cluster_bits];
    let _ = decompress(kind, input, &mut out);
});
