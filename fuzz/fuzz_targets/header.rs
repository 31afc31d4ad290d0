//! Cluster 0 as arbitrary bytes: the header, its extensions and the backing name. A header
//! that parses must encode (or say it does not fit in one cluster), parse back to the same
//! header, and encode to the same bytes a second time.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::format::header::{Header, peek_cluster_bits};

/// The header with what `encode` does not keep: where the bitmaps extension sat.
fn comparable(mut h: Header) -> Header {
    if let Some(bm) = &mut h.bitmaps {
        bm.ext_offset = 0;
    }
    h
}

fuzz_target!(|data: &[u8]| {
    let Ok(cluster_bits) = peek_cluster_bits(data) else {
        return;
    };
    let cs = 1usize << cluster_bits;
    // The engine reads cluster 0 zero-filled past the end of the file.
    let mut c0 = data[..data.len().min(cs)].to_vec();
    c0.resize(cs, 0);
    let Ok(h) = Header::parse(&c0) else {
        return;
    };
    assert!(h.header_length as usize <= cs);
    let _ = h.l1_entries_for(h.virtual_size());
    for f in &h.feature_names {
        let _ = h.feature_name(f.kind, f.bit);
    }
    let Ok(encoded) = h.encode() else {
        return;
    };
    assert_eq!(encoded.len(), cs, "encode fills exactly one cluster");
    let again = Header::parse(&encoded)
        .unwrap_or_else(|e| panic!("an encoded header does not parse: {e}\n{h:#?}"));
    assert_eq!(
        comparable(again.clone()),
        comparable(h),
        "decode(encode(h)) != h"
    );
    let re = again.encode().expect("a re-parsed header encodes");
    assert!(re == encoded, "encode is not stable across a round trip");
});
