//! A LUKS area as arbitrary bytes: the header parser must refuse it or return a header
//! that encodes to bytes which parse back to the same header. A header cheap enough to
//! unlock is unlocked with a fixed passphrase over the same bytes (key material read
//! from them), which must end in a key or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::crypto::LuksArea;
use qcow2fs::crypto::luks::{DIGEST_LEN, HEADER_LEN, LuksHeader};

/// Unlocking costs more than this many HMAC-SHA-256 iterations: skip it.
const CHEAP: u64 = 20_000;

fuzz_target!(|data: &[u8]| {
    let area = LuksArea {
        offset: 0,
        length: data.len() as u64,
    };
    let Ok(h) = LuksHeader::parse(data, area, data.len() as u64) else {
        return;
    };
    let _ = h.info();
    let encoded = h.encode();
    let again = LuksHeader::parse(&encoded, area, data.len().max(HEADER_LEN) as u64)
        .unwrap_or_else(|e| panic!("an encoded header does not parse: {e}\n{h:#?}"));
    assert_eq!(again, h, "parse(encode(h)) != h");
    let key_len = h.master_key_len as usize;
    let work: u64 = h
        .active_slots()
        .map(|i| {
            h.hash.pbkdf2_work(h.slots[i].iterations, key_len)
                + h.hash.pbkdf2_work(h.master_key_iterations, DIGEST_LEN)
        })
        .sum();
    if work <= CHEAP {
        let _ = h.unlock_from_area(data, b"passphrase");
    }
});
