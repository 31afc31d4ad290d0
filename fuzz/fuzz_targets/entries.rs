//! L1, L2 (standard and extended) and refcount entries as arbitrary words, under every
//! cluster size and refcount width. Classification must report a sane extent; compressed
//! descriptors must encode back to the same entry; refcount get/set must round-trip and
//! leave neighbours alone.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::format::entry::{COMPRESSED, ClusterKind, EntryLayout, OFFSET_MASK, SUBCLUSTERS};
use qcow2fs::format::refcount::{RefcountLayout, offset_in_range, reftable_block_offset};

fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    u64::from_be_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cluster_bits = 9 + data[0] as u32 % 13;
    let flags = data[1];
    let layout = EntryLayout {
        cluster_bits,
        extended_l2: flags & 1 != 0 && cluster_bits >= 14,
        zero_flag: flags & 2 != 0,
        data_file: flags & 4 != 0,
    };
    let cs = layout.cluster_size();
    let words: Vec<u64> = data[2..].chunks(8).map(be64).take(512).collect();

    for (i, &w) in words.iter().enumerate() {
        // L1 entries.
        if let Ok(off) = layout.l1_l2_offset(w) {
            assert_eq!(off.0 % cs, 0);
            assert_eq!(off.0 & !OFFSET_MASK, 0);
        }
        // L2 entries: in an extended table, the next word is the subcluster bitmap.
        let bitmap = if layout.extended_l2 {
            words.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let scs: &[u32] = if layout.extended_l2 {
            &[0, 1, 7, 31]
        } else {
            &[0]
        };
        for &sc in scs {
            let Ok((kind, n)) = layout.classify(w, bitmap, sc) else {
                continue;
            };
            assert!(
                n >= 1 && sc + n <= SUBCLUSTERS,
                "extent {n} from subcluster {sc}"
            );
            if let Some(host) = kind.host_cluster() {
                assert_eq!(host.0 % cs, 0);
            }
            if let ClusterKind::Compressed(d) = kind {
                assert!(w & COMPRESSED != 0);
                assert!(d.offset.0 < 1 << 56);
                assert!(
                    d.size >= 1 && d.size <= 2 * cs,
                    "size {} for cluster {cs}",
                    d.size
                );
                assert_eq!((d.offset.0 + d.size) % 512, 0);
                let back = layout.encode_compressed(d.offset, d.size);
                assert_eq!(
                    back,
                    (w & (COMPRESSED - 1)) | COMPRESSED,
                    "descriptor round trip"
                );
            }
        }
        // Refcount-table entries.
        let block = reftable_block_offset(w);
        assert_eq!(block & 0x1ff, 0);
        let _ = offset_in_range(block);
    }

    // Refcount blocks of every width.
    let rc = RefcountLayout {
        order: flags as u32 % 7,
        cluster_bits,
    };
    let mut blk = vec![0u8; cs as usize];
    let raw = &data[2..];
    blk[..raw.len().min(cs as usize)].copy_from_slice(&raw[..raw.len().min(cs as usize)]);
    let entries = rc.block_entries() as usize;
    assert_eq!(entries as u64 * rc.bits() as u64, cs * 8);
    for (k, &w) in words.iter().enumerate().take(64) {
        let i = (w as usize) % entries;
        let v = words.get(k + 1).copied().unwrap_or(w) & rc.max();
        let before: Vec<u64> = [i.wrapping_sub(1), i + 1]
            .iter()
            .filter(|&&j| j < entries)
            .map(|&j| rc.get(&blk, j))
            .collect();
        rc.set(&mut blk, i, v);
        assert_eq!(
            rc.get(&blk, i),
            v,
            "refcount {v} at {i}, order {}",
            rc.order
        );
        let after: Vec<u64> = [i.wrapping_sub(1), i + 1]
            .iter()
            .filter(|&&j| j < entries)
            .map(|&j| rc.get(&blk, j))
            .collect();
        assert_eq!(before, after, "setting entry {i} changed a neighbour");
    }
});
