//! The scenario corpus: named functions that build an image (with its backing files and
//! data files) inside a temporary directory using only qemu-img and qemu-io (plus the byte
//! patches in [`super::patch`]), and return the image to test.
//!
//! Together the scenarios cover every kind of image QEMU makes (except encrypted and
//! malformed images, which have their own suites). Keep every image a few MiB at most.

mod backing;
mod compressed;
mod extended_l2;
mod features;
mod geometry;
mod snapshots;

use super::files::{absolute, tempdir};
use super::images::Ctx;
use backing::*;
use compressed::*;
use extended_l2::*;
use features::*;
use geometry::*;
use snapshots::*;
use std::path::PathBuf;

/// One scenario: `build` creates the images in `ctx`'s directory and returns the absolute
/// path of the image to test (the top of the chain).
pub struct Scenario {
    pub name: &'static str,
    pub build: fn(&mut Ctx) -> PathBuf,
}

/// Builds scenario `name` in a fresh temporary directory; the directory lives as long as
/// the returned guard.
pub fn build(name: &str) -> (tempfile::TempDir, PathBuf) {
    let s = find(name);
    let dir = tempdir();
    let mut ctx = Ctx::new(dir.path(), name);
    let top = (s.build)(&mut ctx);
    (dir, absolute(&top))
}

pub fn find(name: &str) -> &'static Scenario {
    ALL.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario named {name}"))
}

/// Panics unless `listed` names every scenario exactly once (each suite that covers the
/// corpus proves with it that it generated a test for every scenario).
pub fn assert_listed(listed: &[&str]) {
    let mut missing: Vec<&str> = ALL
        .iter()
        .map(|s| s.name)
        .filter(|n| !listed.contains(n))
        .collect();
    missing.sort();
    let mut unknown: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|n| !ALL.iter().any(|s| s.name == *n))
        .collect();
    unknown.sort();
    let mut twice: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|n| listed.iter().filter(|m| *m == n).count() > 1)
        .collect();
    twice.dedup();
    assert!(
        missing.is_empty() && unknown.is_empty() && twice.is_empty(),
        "test list out of step with the corpus: missing {missing:?}, unknown {unknown:?}, \
         listed twice {twice:?}"
    );
}

/// The scenario list, the one place every scenario is named: calls
/// `$callback! { $($args)* ; name, name, ... }` with every scenario in corpus order.
macro_rules! with_every_scenario {
    ($callback:ident ! { $($args:tt)* }) => {
        $callback! { $($args)* ;
            // geometry
            cluster_bits_9, cluster_bits_10, cluster_bits_11, cluster_bits_12, cluster_bits_13,
            cluster_bits_14, cluster_bits_15, cluster_bits_16, cluster_bits_17, cluster_bits_18,
            cluster_bits_19, cluster_bits_20, cluster_bits_21,
            compat_v2, virtual_size_0, virtual_size_0_overlay,
            // zero clusters, discards, preallocation
            zero_clusters, zero_clusters_small, zero_clusters_over_backing,
            discards, discards_over_backing, discards_v2_over_backing,
            prealloc_off, prealloc_metadata, prealloc_falloc, prealloc_full,
            // compressed clusters
            compressed_write_zlib_512, compressed_write_zlib_4k, compressed_write_zlib_64k,
            compressed_write_zlib_2m, compressed_write_zstd_512, compressed_write_zstd_4k,
            compressed_write_zstd_64k, compressed_write_zstd_2m,
            compressed_convert_zlib_512, compressed_convert_zlib_4k, compressed_convert_zlib_64k,
            compressed_convert_zlib_2m, compressed_convert_zstd_512, compressed_convert_zstd_4k,
            compressed_convert_zstd_64k, compressed_convert_zstd_2m,
            compressed_partial_last_cluster_zlib, compressed_partial_last_cluster_zstd,
            compressed_cow_zlib_64k, compressed_cow_zstd_512, compressed_v2,
            compressed_extended_l2, compressed_shared_by_snapshots,
            // extended L2
            extended_l2_16k, extended_l2_32k, extended_l2_64k, extended_l2_512k, extended_l2_2m,
            extended_l2_no_backing, extended_l2_prealloc_metadata_backing,
            // backing chains
            backing_smaller, backing_larger, overlay_grown, overlay_shrunk,
            backing_hidden_by_small_middle, backing_vmstate_hidden, backing_raw,
            backing_raw_unaligned, backing_format_absent, deep_chain,
            // snapshots
            snapshots_distinct, snapshots_id_gap_dup_names, snapshot_disk_size_grown,
            snapshot_disk_size_shrunk, snapshot_vmstate, snapshots_of_overlay, snapshots_v2,
            snapshots_extended_l2, snapshot_refcount_bits_2, snapshot_table_at_eof,
            // refcounts
            refcount_bits_1, refcount_bits_2, refcount_bits_4, refcount_bits_8, refcount_bits_16,
            refcount_bits_32, refcount_bits_64, refcount_table_growth,
            // external data file, lazy refcounts, bitmaps
            data_file, data_file_raw, data_file_with_backing,
            lazy_refcounts_clean, lazy_refcounts_dirty, bitmaps, bitmaps_in_use,
        }
    };
}

/// Generates one `#[test]` per scenario of the corpus, each calling `$check(name)`, plus
/// `every_scenario_has_a_test`.
macro_rules! scenario_tests {
    ($check:path) => {
        with_every_scenario!(scenario_tests_of! { $check });
    };
}

macro_rules! scenario_tests_of {
    ($check:path ; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $check(stringify!($name));
            }
        )*

        #[test]
        fn every_scenario_has_a_test() {
            $crate::support::corpus::assert_listed(&[$(stringify!($name)),*]);
        }
    };
}

macro_rules! corpus {
    (; $($name:ident),* $(,)?) => {
        /// Every scenario, by name, in corpus order.
        pub const ALL: &[Scenario] = &[$(Scenario { name: stringify!($name), build: $name }),*];
    };
}

with_every_scenario!(corpus! {});
