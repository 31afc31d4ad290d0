//! Rendering oracle: for every scenario of the corpus, the active disk, every internal
//! snapshot and every backing layer, read through the library, must equal QEMU's raw
//! rendering byte for byte (`qemu-img convert -O raw`; snapshots via `qemu-img snapshot -a`
//! on a copy, at the snapshot's own disk size). `qcow2fs cat` must print the same bytes.
//! The snapshot and layer lists themselves come from QEMU (`qemu-img info`).

#[macro_use]
mod common;

use common::*;
use std::path::Path;

/// Reads `dev` whole and in odd-sized chunks; both must equal `expected`.
fn check_dev(what: &str, expected: &[u8], dev: &dyn qcow2fs::block::BlockDev) {
    assert_same_bytes(&format!("{what} (one read)"), expected, &read_all(dev));
    let chunk = if dev.size() <= 8 << 20 { 4093 } else { 131_071 };
    assert_same_bytes(
        &format!("{what} (reads of {chunk} bytes)"),
        expected,
        &read_chunked(dev, chunk),
    );
}

fn cat(dir: &Path, image: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let mut args = vec!["cat".to_string()];
    if let Some(s) = snapshot {
        args.extend(["--snapshot".to_string(), s.to_string()]);
    }
    args.push(image.to_string_lossy().into_owned());
    qcow2fs(dir, &args)
}

fn canonical(p: &Path) -> std::path::PathBuf {
    p.canonicalize()
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

fn check_render(name: &str) {
    let (dir, top) = corpus::build(name);
    let dir = dir.path();
    let chain = open(&top);

    // The active disk.
    let expected = qemu_raw(&top);
    check_dev(&format!("{name}: active disk"), &expected, &*chain.top);
    assert_same_bytes(
        &format!("{name}: qcow2fs cat"),
        &expected,
        &cat(dir, &top, None),
    );

    // Every snapshot, by ID, at its own disk size; and `cat --snapshot` by ID and by name
    // (IDs first, then names, like QEMU).
    let info = qemu_info_json(&top);
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    let our_snapshots = chain.image().snapshots();
    let ours: Vec<&str> = our_snapshots.iter().map(|s| s.entry.id.as_str()).collect();
    let ids: Vec<&str> = snaps.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ours, ids, "{name}: snapshot IDs (ours vs qemu-img info)");
    for (i, s) in snaps.iter().enumerate() {
        let id = s["id"].as_str().unwrap();
        let expected = qemu_snapshot_raw(&top, id);
        check_dev(
            &format!("{name}: snapshot ID {id}"),
            &expected,
            &*chain.snapshot(chain.image().snapshots()[i].key),
        );
        assert_same_bytes(
            &format!("{name}: qcow2fs cat --snapshot {id}"),
            &expected,
            &cat(dir, &top, Some(id)),
        );
        let sname = s["name"].as_str().unwrap();
        if sname != id {
            assert_same_bytes(
                &format!("{name}: qcow2fs cat --snapshot '{sname}' (a name)"),
                &qemu_snapshot_raw(&top, sname),
                &cat(dir, &top, Some(sname)),
            );
        }
    }

    // Every backing layer, each through its own chain.
    let qchain = qemu_backing_chain_json(&top);
    assert_eq!(
        chain.layers.len() + 1,
        qchain.len(),
        "{name}: number of layers (ours + top vs qemu-img info --backing-chain)"
    );
    for (depth, (layer, q)) in chain.layers.iter().zip(&qchain[1..]).enumerate() {
        let qpath = Path::new(q["filename"].as_str().unwrap());
        let qformat = q["format"].as_str().unwrap();
        let info = layer.info();
        assert_eq!(
            (canonical(&info.path), info.format),
            (canonical(qpath), qformat),
            "{name}: layer {} (path, format)",
            depth + 1
        );
        let expected = qemu_raw_as(qpath, Some(qformat));
        check_dev(
            &format!("{name}: layer {} ({})", depth + 1, info.path.display()),
            &expected,
            &**layer,
        );
    }
}

scenario_tests! {
    check_render;
    cluster_bits_9, cluster_bits_10, cluster_bits_11, cluster_bits_12, cluster_bits_13,
    cluster_bits_14, cluster_bits_15, cluster_bits_16, cluster_bits_17, cluster_bits_18,
    cluster_bits_19, cluster_bits_20, cluster_bits_21,
    compat_v2, virtual_size_0, virtual_size_0_overlay,
    zero_clusters, zero_clusters_small, zero_clusters_over_backing,
    discards, discards_over_backing, discards_v2_over_backing,
    prealloc_off, prealloc_metadata, prealloc_falloc, prealloc_full,
    compressed_write_zlib_512, compressed_write_zlib_4k, compressed_write_zlib_64k,
    compressed_write_zlib_2m, compressed_write_zstd_512, compressed_write_zstd_4k,
    compressed_write_zstd_64k, compressed_write_zstd_2m,
    compressed_convert_zlib_512, compressed_convert_zlib_4k, compressed_convert_zlib_64k,
    compressed_convert_zlib_2m, compressed_convert_zstd_512, compressed_convert_zstd_4k,
    compressed_convert_zstd_64k, compressed_convert_zstd_2m,
    compressed_partial_last_cluster_zlib, compressed_partial_last_cluster_zstd,
    compressed_cow_zlib_64k, compressed_cow_zstd_512, compressed_v2,
    compressed_extended_l2, compressed_shared_by_snapshots,
    extended_l2_16k, extended_l2_32k, extended_l2_64k, extended_l2_512k, extended_l2_2m,
    extended_l2_no_backing, extended_l2_prealloc_metadata_backing,
    backing_smaller, backing_larger, overlay_grown, overlay_shrunk,
    backing_hidden_by_small_middle, backing_vmstate_hidden, backing_raw,
    backing_raw_unaligned, backing_format_absent, deep_chain,
    snapshots_distinct, snapshots_id_gap_dup_names, snapshot_disk_size_grown,
    snapshot_disk_size_shrunk, snapshot_vmstate, snapshots_of_overlay, snapshots_v2,
    snapshots_extended_l2, snapshot_refcount_bits_2, snapshot_table_at_eof,
    refcount_bits_1, refcount_bits_2, refcount_bits_4, refcount_bits_8, refcount_bits_16,
    refcount_bits_32, refcount_bits_64, refcount_table_growth,
    data_file, data_file_raw, data_file_with_backing,
    lazy_refcounts_clean, lazy_refcounts_dirty, bitmaps, bitmaps_in_use,
}

/// Builds the scenario named by `$SCENARIO` in a directory that is kept, and prints its
/// path, to reproduce a failure by hand:
/// `SCENARIO=deep_chain cargo test --test render -- --ignored keep_scenario --nocapture`
#[test]
#[ignore = "a tool, not a test: builds $SCENARIO and keeps it"]
fn keep_scenario() {
    let name = std::env::var("SCENARIO").expect("set SCENARIO to a scenario name");
    let (dir, top) = corpus::build(&name);
    let kept = dir.keep();
    println!("scenario {name}: {} (in {})", top.display(), kept.display());
}
