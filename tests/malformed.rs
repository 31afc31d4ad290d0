//! Malformed-image suite: valid images made with qemu-img/qemu-io, patched byte by byte,
//! then fed to the `qcow2fs` binary. Checklist section 16 is the contract:
//! - "Reject at open" classes: exit status 1, exactly one stderr line naming the image and
//!   the offending field;
//! - "Fail the individual read with EIO" classes: `info` still works, `cat` fails with one
//!   line naming the offset, a healthy snapshot still reads correctly;
//! - never a panic (101), a signal or a hang, also under random corruption (property test).

mod support;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::images::{M, create_encrypted, create_image};
use support::patch::*;
use support::*;

/// How long one qcow2fs run may take before it counts as a hang.
const TIMEOUT: Duration = Duration::from_secs(10);
const KIB: u64 = 1024;

// ---------------------------------------------------------------------------------------
// Running qcow2fs
// ---------------------------------------------------------------------------------------

/// Runs qcow2fs with `args`, killing it after `timeout` or once stdout exceeds `cap` bytes.
fn run_limited<S: AsRef<OsStr>>(args: &[S], timeout: Duration, cap: u64) -> Finished {
    run_capped(
        Command::new(qcow2fs_bin())
            .args(args)
            .env_remove("RUST_LOG"),
        timeout,
        cap,
    )
}

fn qcow2fs<S: AsRef<OsStr>>(args: &[S]) -> Finished {
    run_limited(args, TIMEOUT, 1 << 30)
}

fn info(img: &Path) -> Finished {
    qcow2fs(&[OsStr::new("info"), img.as_os_str()])
}

fn cat(img: &Path) -> Finished {
    qcow2fs(&[OsStr::new("cat"), img.as_os_str()])
}

fn map(img: &Path) -> Finished {
    qcow2fs(&[OsStr::new("map"), OsStr::new("--json"), img.as_os_str()])
}

fn cat_snapshot(img: &Path, snap: &str) -> Finished {
    qcow2fs(&[
        OsStr::new("cat"),
        OsStr::new("--snapshot"),
        OsStr::new(snap),
        img.as_os_str(),
    ])
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Checks the failure contract (status 1, no panic/signal/hang, one stderr line starting
/// with "qcow2fs: ") and returns the line.
fn error_line(out: &Finished, what: &str) -> String {
    assert!(!out.timed_out(), "{what}: qcow2fs hung: {}", out.describe());
    assert_ne!(
        out.code(),
        Some(101),
        "{what}: qcow2fs panicked: {}",
        out.describe()
    );
    assert_eq!(
        out.signal(),
        None,
        "{what}: killed by a signal: {}",
        out.describe()
    );
    assert_eq!(
        out.code(),
        Some(1),
        "{what}: expected exit status 1: {}",
        out.describe()
    );
    // Warnings ("qcow2fs: warn: ...", e.g. for an image marked corrupt) are lines of
    // their own; the error itself must be exactly one line.
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with("qcow2fs: warn: "))
        .collect();
    assert!(
        out.stderr.ends_with('\n') && errors.len() == 1,
        "{what}: stderr must hold exactly one error line: {:?}",
        out.stderr
    );
    let line = errors[0].to_string();
    assert!(
        line.starts_with("qcow2fs: "),
        "{what}: the line does not start with 'qcow2fs: ': {line:?}"
    );
    line
}

/// Case-insensitive: every needle must occur in the line.
fn assert_mentions(line: &str, needles: &[&str], what: &str) {
    let low = line.to_lowercase();
    for n in needles {
        assert!(
            low.contains(&n.to_lowercase()),
            "{what}: the error line does not mention {n:?}: {line:?}"
        );
    }
}

/// Whether the line holds a hex number written as 0x...
fn has_hex(line: &str) -> bool {
    line.match_indices("0x").any(|(i, _)| {
        line[i + 2..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_hexdigit())
    })
}

fn check_ok(out: &Finished, what: &str) {
    assert!(!out.timed_out(), "{what}: qcow2fs hung: {}", out.describe());
    assert_eq!(
        out.code(),
        Some(0),
        "{what}: expected success: {}",
        out.describe()
    );
}

/// A "reject at open" class: `info` and `cat` both fail with one line that names `named`
/// (the image, or the file at fault), each needle, and (with `hex`) a 0x offset.
fn assert_open_rejected(img: &Path, named: &Path, needles: &[&str], hex: bool, what: &str) {
    for (cmd, out) in [("info", info(img)), ("cat", cat(img))] {
        let what = format!("{what} ({cmd})");
        let line = error_line(&out, &what);
        assert!(
            line.contains(&show(named)),
            "{what}: the error line does not name {}: {line:?}",
            named.display()
        );
        assert_mentions(&line, needles, &what);
        if hex {
            assert!(has_hex(&line), "{what}: no 0x offset in {line:?}");
        }
    }
}

fn rejected(img: &Path, needles: &[&str], what: &str) {
    assert_open_rejected(img, img, needles, true, what);
}

/// A "fail the read with EIO" class: `info` works, `cat` fails with one line that names the
/// image and a 0x offset. Returns the line.
fn assert_read_fails(img: &Path, what: &str) -> String {
    check_ok(&info(img), &format!("{what}: info"));
    let line = error_line(&cat(img), &format!("{what}: cat"));
    assert!(
        line.contains(&show(img)),
        "{what}: the error line does not name the image: {line:?}"
    );
    assert!(has_hex(&line), "{what}: no 0x offset in {line:?}");
    line
}

// ---------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------

/// Creates `name` in `dir` with `qemu-img create -f qcow2 [-o opts] name size`.
fn create(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    create_image(dir, name, Some(size), opts, None)
}

/// `name` in `dir`, a qcow2 overlay of `backing` (format `fmt`).
fn overlay(dir: &Path, name: &str, backing: &str, fmt: &str) -> PathBuf {
    create_image(dir, name, None, "", Some((backing, fmt)))
}

fn snapshot_create(dir: &Path, img: &Path, name: &str) {
    qemu_img(dir, &["snapshot", "-c", name, &show(img)]);
}

/// The raw disk QEMU renders for `img` (or its snapshot named `snap`).
fn rendered(img: &Path, snap: Option<&str>) -> Vec<u8> {
    match snap {
        Some(s) => qemu_snapshot_raw(img, s),
        None => qemu_raw_as(img, Some("qcow2")),
    }
}

fn copy(img: &Path, name: &str) -> PathBuf {
    let to = img.with_file_name(name);
    fs::copy(img, &to).unwrap();
    to
}

/// A plain 64 KiB-cluster v3 image with a little data (and QEMU's feature-name table).
fn plain(dir: &Path, name: &str) -> PathBuf {
    let img = create(dir, name, "", 4 * M);
    qemu_io(&img, &["write -P 0x11 0 128k"]);
    img
}

/// Copies of `base` with the 32-bit field at `at` set to each of `values`: every one
/// refused, naming `field`.
fn each_u32_rejected(base: &Path, at: u64, field: &str, values: &[u32]) {
    for &v in values {
        let img = copy(base, &format!("{field}-{v:x}.qcow2"));
        put32(&img, at, v);
        rejected(&img, &[field], &format!("{field} {v:#x}"));
    }
}

// ---------------------------------------------------------------------------------------
// Reject at open: header fields
// ---------------------------------------------------------------------------------------

#[test]
fn reject_bad_magic() {
    let d = tempdir();
    let img = plain(d.path(), "magic.qcow2");
    patch(&img, 0, b"QFI\xfa");
    rejected(&img, &["magic"], "magic QFI\\xfa");
    patch(&img, 0, b"\0\0\0\0");
    rejected(&img, &["magic"], "magic 0");
}

#[test]
fn reject_bad_version() {
    let d = tempdir();
    let base = plain(d.path(), "base.qcow2");
    each_u32_rejected(&base, hdr::VERSION, "version", &[1, 4, 0, 0xffff_ffff]);
}

#[test]
fn reject_bad_cluster_bits() {
    let d = tempdir();
    let base = plain(d.path(), "base.qcow2");
    let bits = [8, 22, 0, 63, 64, 0xffff_ffff];
    each_u32_rejected(&base, hdr::CLUSTER_BITS, "cluster_bits", &bits);
}

#[test]
fn reject_bad_header_length() {
    let d = tempdir();
    // 100 (< 104), > cluster size (multiple of 8), and not a multiple of 8.
    let base = plain(d.path(), "base.qcow2");
    let lens = [100, 0, 65536 + 8, 0xffff_fff8, 108, 113];
    each_u32_rejected(&base, hdr::HEADER_LENGTH, "header_length", &lens);
}

#[test]
fn reject_unknown_incompatible_bits() {
    let d = tempdir();
    for bit in [5u32, 40, 63] {
        let img = plain(d.path(), &format!("incompat{bit}.qcow2"));
        set_incompat_bit(&img, bit);
        rejected(
            &img,
            &["incompatible_features", &bit.to_string()],
            &format!("incompatible bit {bit}"),
        );
    }
}

#[test]
fn reject_unknown_incompatible_bit_named_in_feature_table() {
    let d = tempdir();
    for (bit, entry, name) in [(5u8, 0usize, "frobnicated blocks"), (40, 3, "quantum L3")] {
        let img = plain(d.path(), &format!("named{bit}.qcow2"));
        let c0 = Cluster0::load(&img);
        let table = c0
            .ext(EXT_FEATURE_TABLE)
            .expect("QEMU writes a feature-name table for 64 KiB clusters")
            .clone();
        // Rename one of QEMU's entries (an incompatible one) to name the unknown bit.
        let at = table.off + 8 + 48 * entry as u64;
        assert_eq!(
            read_bytes(&img, at, 1)[0],
            0,
            "entry {entry} is incompatible"
        );
        let mut e = [0u8; 48];
        e[0] = 0;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        patch(&img, at, &e);
        set_incompat_bit(&img, bit as u32);
        rejected(
            &img,
            &["incompatible_features", name],
            &format!("named incompatible bit {bit}"),
        );
    }
}

#[test]
fn reject_compression_type_mismatch() {
    let d = tempdir();
    // Bit 3 set, type 0 (zlib).
    let img = plain(d.path(), "bit3-zlib.qcow2");
    set_incompat_bit(&img, 3);
    rejected(&img, &["compression_type"], "bit 3 with zlib");
    // Type 1 (zstd) without bit 3.
    let img = plain(d.path(), "zstd-nobit.qcow2");
    put8(&img, hdr::COMPRESSION_TYPE, 1);
    rejected(&img, &["compression_type"], "zstd without bit 3");
    // A real zstd image with bit 3 cleared.
    let img = create(d.path(), "zstd.qcow2", "compression_type=zstd", 4 * M);
    assert_eq!(read_bytes(&img, hdr::COMPRESSION_TYPE, 1)[0], 1);
    let v = read_be64(&img, hdr::INCOMPAT);
    put64(&img, hdr::INCOMPAT, v & !(1 << 3));
    rejected(&img, &["compression_type"], "zstd image, bit 3 cleared");
}

#[test]
fn reject_unknown_compression_type() {
    let d = tempdir();
    for t in [2u8, 0xff] {
        let img = plain(d.path(), &format!("ctype{t}.qcow2"));
        put8(&img, hdr::COMPRESSION_TYPE, t);
        set_incompat_bit(&img, 3);
        rejected(
            &img,
            &["compression_type"],
            &format!("compression type {t}"),
        );
    }
}

#[test]
fn reject_refcount_order_7() {
    let d = tempdir();
    let base = plain(d.path(), "base.qcow2");
    let orders = [7, 64, 0xffff_ffff];
    each_u32_rejected(&base, hdr::REFCOUNT_ORDER, "refcount_order", &orders);
}

#[test]
fn reject_crypt_method_3() {
    let d = tempdir();
    let base = plain(d.path(), "base.qcow2");
    each_u32_rejected(&base, hdr::CRYPT_METHOD, "crypt_method", &[3, 0xffff_ffff]);
}

fn encrypted(dir: &Path, name: &str, format: &str) -> PathBuf {
    let opts = if format == "luks" {
        format!("encrypt.format={format},encrypt.key-secret=s0,encrypt.iter-time=10")
    } else {
        format!("encrypt.format={format},encrypt.key-secret=s0")
    };
    create_encrypted(dir, name, "1M", "secret,id=s0,data=pw", &opts)
}

/// Encrypted images open without a key for `info` (which shows the encryption, as
/// qemu-img info does), and every command that reads data fails with one line naming the
/// image and saying how to give a key. (tests/encrypted.rs reads them with their keys.)
fn assert_needs_key(img: &Path, format: &str, what: &str) {
    let out = info(img);
    check_ok(&out, &format!("{what}: info"));
    assert!(
        out.stdout_text().contains("encrypted: yes")
            && out.stdout_text().contains(&format!("format: {format}")),
        "{what}: info does not show the encryption: {}",
        out.describe()
    );
    for (cmd, out) in [("cat", cat(img)), ("map", map(img))] {
        let what = format!("{what} ({cmd})");
        let line = error_line(&out, &what);
        assert!(
            line.contains(&show(img)),
            "{what}: the error line does not name the image: {line:?}"
        );
        assert_mentions(&line, &["encrypted", "no key", "key-file"], &what);
    }
}

/// An image QEMU encrypted with `format` (crypt_method `method` in the header) is
/// refused without a key, naming the encryption as `label`.
fn encrypted_needs_a_key(format: &str, method: u32, label: &str) {
    let d = tempdir();
    let img = encrypted(d.path(), &format!("{format}.qcow2"), format);
    assert_eq!(read_be32(&img, hdr::CRYPT_METHOD), method);
    assert_needs_key(&img, format, label);
}

#[test]
fn encrypted_luks_needs_a_key() {
    encrypted_needs_a_key("luks", 2, "LUKS");
}

#[test]
fn encrypted_legacy_aes_needs_a_key() {
    encrypted_needs_a_key("aes", 1, "legacy AES");
}

/// A hostile LUKS area: refused at open, `info` included, with one line naming the image
/// and the LUKS field, in bounded time.
#[test]
fn reject_hostile_luks_headers() {
    let d = tempdir();
    let base = encrypted(d.path(), "luks-base.qcow2", "luks");
    let c0 = Cluster0::load(&base);
    let fde = c0.ext(EXT_FDE).expect("a LUKS image has the FDE extension");
    let area = u64::from_be_bytes(fde.data[..8].try_into().unwrap());
    let len = fs::metadata(&base).unwrap().len();
    // (name, patch, needles)
    let cases: Vec<(&str, Patcher, &[&str])> = vec![
        (
            "area past the end of the file",
            Box::new(move |p: &Path| {
                let mut data = fde_data(p);
                data[..8].copy_from_slice(&(len.next_multiple_of(65536) + 65536).to_be_bytes());
                set_fde(p, &data);
            }),
            &["encryption header extension", "past the end"],
        ),
        (
            "bad magic",
            Box::new(move |p: &Path| patch(p, area, b"LUKX")),
            &["LUKS magic"],
        ),
        (
            "LUKS version 2",
            Box::new(move |p: &Path| patch(p, area + 6, &2u16.to_be_bytes())),
            &["LUKS version", "version 2"],
        ),
        (
            "unknown cipher",
            Box::new(move |p: &Path| patch(p, area + 8, b"rot13\0")),
            &["cipher name", "rot13"],
        ),
        (
            "sm4",
            Box::new(move |p: &Path| patch(p, area + 8, b"sm4\0")),
            &["cipher name", "sm4"],
        ),
        (
            "unknown hash",
            Box::new(move |p: &Path| patch(p, area + 72, b"whirlpool\0")),
            &["hash spec", "whirlpool"],
        ),
        (
            "zero stripes",
            Box::new(move |p: &Path| patch(p, area + 208 + 44, &0u32.to_be_bytes())),
            &["key slot 0 stripes"],
        ),
        (
            "enormous iterations",
            Box::new(move |p: &Path| patch(p, area + 208 + 4, &u32::MAX.to_be_bytes())),
            &["iterations", "limit"],
        ),
        (
            "key length that does not fit the cipher",
            Box::new(move |p: &Path| patch(p, area + 108, &33u32.to_be_bytes())),
            &["master-key length"],
        ),
    ];
    for (what, f, needles) in cases {
        let img = copy(&base, &format!("{}.qcow2", what.replace(' ', "-")));
        f(&img);
        rejected(&img, needles, what);
    }
}

/// A byte patch applied to an image.
type Patcher = Box<dyn Fn(&Path)>;

fn fde_data(p: &Path) -> Vec<u8> {
    Cluster0::load(p).ext(EXT_FDE).unwrap().data.clone()
}

fn set_fde(p: &Path, data: &[u8]) {
    Cluster0::load(p)
        .without(EXT_FDE)
        .with_ext(EXT_FDE, data)
        .store(p);
}

#[test]
fn reject_luks_without_fde_extension() {
    let d = tempdir();
    // A real LUKS image whose FDE pointer was removed.
    let img = encrypted(d.path(), "luks-nofde.qcow2", "luks");
    let c0 = Cluster0::load(&img);
    assert!(c0.ext(EXT_FDE).is_some());
    c0.without(EXT_FDE).store(&img);
    rejected(&img, &["crypt_method"], "LUKS without FDE extension");
    // A plain image that claims LUKS.
    let img = plain(d.path(), "plain-luks.qcow2");
    put32(&img, hdr::CRYPT_METHOD, 2);
    rejected(&img, &["crypt_method"], "crypt_method 2 on a plain image");
}

#[test]
fn reject_fde_extension_without_luks() {
    let d = tempdir();
    let img = encrypted(d.path(), "fde-nocrypt.qcow2", "luks");
    put32(&img, hdr::CRYPT_METHOD, 0);
    rejected(&img, &["extension"], "FDE extension with crypt_method 0");
}

#[test]
fn reject_unaligned_table_offsets() {
    let d = tempdir();
    let base = plain(d.path(), "aligned.qcow2");
    snapshot_create(d.path(), &base, "s1");
    for (field, at) in [
        ("l1_table_offset", hdr::L1_OFFSET),
        ("refcount_table_offset", hdr::REFCOUNT_OFFSET),
        ("snapshots_offset", hdr::SNAPSHOTS_OFFSET),
    ] {
        for delta in [0x200u64, 8, 1] {
            let img = copy(&base, &format!("{field}-{delta}.qcow2"));
            put64(&img, at, read_be64(&img, at) + delta);
            rejected(&img, &[field], &format!("{field} + {delta:#x}"));
        }
    }
    // QEMU checks the snapshot-table alignment even without snapshots.
    let img = plain(d.path(), "nosnap-unaligned.qcow2");
    assert_eq!(read_be32(&img, hdr::NB_SNAPSHOTS), 0);
    put64(&img, hdr::SNAPSHOTS_OFFSET, 0x200);
    rejected(
        &img,
        &["snapshots_offset"],
        "unaligned snapshots_offset, 0 snapshots",
    );
}

#[test]
fn reject_l1_size_too_small() {
    let d = tempdir();
    // 64 KiB clusters: one L1 entry covers 512 MiB, so 1 GiB + 512 needs 3 entries.
    let img = create(d.path(), "l1small.qcow2", "", 1_073_742_336);
    assert_eq!(read_be32(&img, hdr::L1_SIZE), 3);
    each_u32_rejected(&img, hdr::L1_SIZE, "l1_size", &[2, 0]);
}

#[test]
fn reject_huge_l1_size() {
    let d = tempdir();
    let img = plain(d.path(), "l1huge.qcow2");
    let sizes = [0x0040_0001, 0x1000_0000, 0xffff_ffff];
    each_u32_rejected(&img, hdr::L1_SIZE, "l1_size", &sizes);
}

#[test]
fn reject_refcount_table_clusters_zero() {
    let d = tempdir();
    let img = plain(d.path(), "rtc0.qcow2");
    put32(&img, hdr::REFCOUNT_CLUSTERS, 0);
    rejected(
        &img,
        &["refcount_table_clusters"],
        "refcount_table_clusters 0",
    );
}

#[test]
fn reject_extension_overrunning_the_area() {
    let d = tempdir();
    let base = plain(d.path(), "ext.qcow2");
    let table = Cluster0::load(&base)
        .ext(EXT_FEATURE_TABLE)
        .unwrap()
        .clone();
    let g = Geo::read(&base);
    // The area ends at the end of cluster 0: one byte too many, and lengths that would
    // wrap 32-bit arithmetic.
    let just_over = (g.cs() - (table.off + 8) + 1) as u32;
    let lens = [0xffff_fff0, 0xffff_ffff, 0xffff_fff8, just_over];
    each_u32_rejected(&base, table.off + 4, "extension", &lens);
    // With a backing file, the area ends at the name: overrunning into it is an error too.
    let top = overlay(d.path(), "ext-top.qcow2", "ext.qcow2", "qcow2");
    let c0 = Cluster0::load(&top);
    let fmt = c0.ext(EXT_BACKING_FORMAT).unwrap().clone();
    let boff = read_be64(&top, hdr::BACKING_OFFSET);
    put32(&top, fmt.off + 4, (boff - (fmt.off + 8) + 1) as u32);
    rejected(
        &top,
        &["extension"],
        "extension overrunning into the backing name",
    );
}

#[test]
fn reject_duplicate_known_extension() {
    let d = tempdir();
    let img = plain(d.path(), "dup-table.qcow2");
    let c0 = Cluster0::load(&img);
    let table = c0.ext(EXT_FEATURE_TABLE).unwrap().data.clone();
    c0.with_ext(EXT_FEATURE_TABLE, &table).store(&img);
    rejected(&img, &["extension"], "feature table twice");

    plain(d.path(), "dup-base.qcow2");
    let top = overlay(d.path(), "dup-fmt.qcow2", "dup-base.qcow2", "qcow2");
    let c0 = Cluster0::load(&top);
    c0.with_ext(EXT_BACKING_FORMAT, b"raw").store(&top);
    rejected(&top, &["extension"], "backing format twice");
}

/// base.qcow2 (data 0x11) and top.qcow2 on it with a backing-format extension.
fn backed(dir: &Path) -> (PathBuf, PathBuf) {
    let base = plain(dir, "base.qcow2");
    let top = overlay(dir, "top.qcow2", "base.qcow2", "qcow2");
    qemu_io(&top, &["write -P 0x22 64k 64k"]);
    (base, top)
}

#[test]
fn reject_backing_name_too_long_or_outside_cluster0() {
    let d = tempdir();
    let (_base, top) = backed(d.path());
    let cs = Geo::read(&top).cs();
    let boff = read_be64(&top, hdr::BACKING_OFFSET);
    let cases: [(&str, u64, u32); 5] = [
        ("size 1024", boff, 1024),
        ("size 0xffffffff", boff, 0xffff_ffff),
        ("offset past cluster 0", cs + 0x200, 10),
        ("offset u64::MAX", u64::MAX, 10),
        ("name runs past cluster 0", cs - 16, 64),
    ];
    for (what, off, size) in cases {
        let img = copy(&top, &format!("bn-{}.qcow2", what.replace(' ', "-")));
        put64(&img, hdr::BACKING_OFFSET, off);
        put32(&img, hdr::BACKING_SIZE, size);
        rejected(&img, &["backing_file"], what);
    }
}

#[test]
fn reject_missing_backing_file() {
    let d = tempdir();
    let (base, top) = backed(d.path());
    fs::remove_file(&base).unwrap();
    // The line names the missing file (the file at fault) and says it is the backing file.
    assert_open_rejected(&top, &base, &["backing"], false, "missing backing file");
}

#[test]
fn reject_backing_loop() {
    let d = tempdir();
    let dir = d.path();
    let a = create(dir, "a.qcow2", "", M);
    let b = overlay(dir, "b.qcow2", "a.qcow2", "qcow2");
    qemu_img(
        dir,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    assert_open_rejected(&a, &a, &["backing"], false, "a -> b -> a");
    assert_open_rejected(&b, &b, &["backing"], false, "b -> a -> b");
    // An image that is its own backing file.
    let s = create(dir, "self.qcow2", "", M);
    qemu_img(
        dir,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    assert_open_rejected(&s, &s, &["backing"], false, "self -> self");
}

#[test]
fn reject_untyped_raw_backing_file() {
    let d = tempdir();
    let dir = d.path();
    let raw = dir.join("base.raw");
    fs::write(&raw, vec![0xabu8; 1 << 20]).unwrap();
    let top = overlay(dir, "top.qcow2", "base.raw", "raw");
    // With the format extension, a raw backing file is fine.
    let out = cat(&top);
    check_ok(&out, "typed raw backing");
    assert_eq!(out.stdout, rendered(&top, None));
    // Without it, the raw file must never be exposed.
    Cluster0::load(&top).without(EXT_BACKING_FORMAT).store(&top);
    assert_open_rejected(
        &top,
        &top,
        &["backing", "format"],
        false,
        "raw backing without format",
    );
}

#[test]
fn accept_untyped_qcow2_backing_file() {
    let d = tempdir();
    let (_base, top) = backed(d.path());
    Cluster0::load(&top).without(EXT_BACKING_FORMAT).store(&top);
    assert!(Cluster0::load(&top).ext(EXT_BACKING_FORMAT).is_none());
    let out = cat(&top);
    check_ok(&out, "qcow2 backing without format");
    let expected = rendered(&top, None);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(
        out.stdout == expected,
        "content differs from qemu-img convert"
    );
    assert_eq!(out.stdout[0], 0x11, "backing data shows through");
    assert_eq!(out.stdout[64 << 10], 0x22);
}

#[test]
fn reject_pseudo_filename_backing() {
    let d = tempdir();
    let dir = d.path();
    fs::write(dir.join("base.raw"), vec![0xabu8; 1 << 20]).unwrap();
    let json = r#"json:{"driver":"raw","file":{"driver":"file","filename":"base.raw"}}"#;
    let names = [
        json,
        "file:base.raw",
        "nbd:localhost:10809",
        "nbd://127.0.0.1/x",
    ];
    for (i, name) in names.iter().enumerate() {
        // A file with the literal name exists where possible, so a reader that treats the
        // name as a plain relative path would succeed: the refusal must be deliberate.
        if !name.contains('/') {
            fs::write(dir.join(name), vec![0xcdu8; 1 << 20]).unwrap();
        }
        for fmt in [Some("raw"), None] {
            let img = create(dir, &format!("pseudo{i}-{}.qcow2", fmt.is_some()), "", M);
            let mut c0 = Cluster0::load(&img).with_backing(Some(name.as_bytes()));
            if let Some(f) = fmt {
                c0 = c0.with_ext(EXT_BACKING_FORMAT, f.as_bytes());
            }
            c0.store(&img);
            let what = format!("backing name {name:?}, format {fmt:?}");
            assert_open_rejected(&img, &img, &["backing"], false, &what);
            let line = error_line(&cat(&img), &what);
            assert!(
                !line.contains("No such file"),
                "{what}: refused only because the file is missing: {line:?}"
            );
        }
    }
}

#[test]
fn reject_backing_file_not_regular() {
    let d = tempdir();
    let dir = d.path();
    fs::create_dir(dir.join("subdir")).unwrap();
    for (name, shown) in [
        ("subdir", dir.join("subdir")),
        ("/dev/null", "/dev/null".into()),
    ] {
        for fmt in [Some("raw"), Some("qcow2"), None] {
            let img = create(
                dir,
                &format!("nonreg-{}-{}.qcow2", name.len(), fmt.unwrap_or("none")),
                "",
                M,
            );
            let mut c0 = Cluster0::load(&img).with_backing(Some(name.as_bytes()));
            if let Some(f) = fmt {
                c0 = c0.with_ext(EXT_BACKING_FORMAT, f.as_bytes());
            }
            c0.store(&img);
            let what = format!("backing {name}, format {fmt:?}");
            assert_open_rejected(&img, &shown, &["backing", "regular"], false, &what);
            let line = error_line(&info(&img), &what);
            assert!(
                line.contains(&show(&img)),
                "{what}: the line does not name the image that refers to it: {line:?}"
            );
        }
    }
}

#[test]
fn reject_data_file_bit_without_extension() {
    let d = tempdir();
    let img = plain(d.path(), "df-bit.qcow2");
    set_incompat_bit(&img, 2);
    rejected(
        &img,
        &["incompatible_features", "data file"],
        "data-file bit without name",
    );
}

#[test]
fn reject_missing_data_file() {
    let d = tempdir();
    let dir = d.path();
    let img = create(dir, "df.qcow2", "data_file=df.data", M);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    check_ok(&cat(&img), "data-file image");
    let data = dir.join("df.data");
    fs::remove_file(&data).unwrap();
    assert_open_rejected(&img, &data, &["data file"], false, "missing data file");
}

#[test]
fn reject_data_file_raw_without_data_file() {
    let d = tempdir();
    let img = plain(d.path(), "dfraw.qcow2");
    put64(&img, hdr::AUTOCLEAR, read_be64(&img, hdr::AUTOCLEAR) | 2);
    rejected(
        &img,
        &["autoclear_features"],
        "data_file_raw without data file",
    );
}

#[test]
fn reject_extended_l2_with_small_clusters() {
    let d = tempdir();
    // A 4 KiB-cluster image with the extended-L2 bit.
    let img = create(d.path(), "extl2-4k.qcow2", "cluster_size=4096", M);
    set_incompat_bit(&img, 4);
    rejected(
        &img,
        &["extended", "cluster_bits"],
        "extended L2 with 4 KiB clusters",
    );
    // A real 16 KiB extended-L2 image shrunk to 8 KiB clusters.
    let img = create(
        d.path(),
        "extl2-16k.qcow2",
        "cluster_size=16384,extended_l2=on",
        M,
    );
    put32(&img, hdr::CLUSTER_BITS, 13);
    rejected(
        &img,
        &["extended", "cluster_bits"],
        "extended L2 with cluster_bits 13",
    );
}

/// An image with one snapshot.
fn with_snapshot(dir: &Path, name: &str) -> PathBuf {
    let img = plain(dir, name);
    snapshot_create(dir, &img, "s1");
    img
}

#[test]
fn reject_snapshot_table_outside_file() {
    let d = tempdir();
    let base = with_snapshot(d.path(), "snaptab.qcow2");
    let g = Geo::read(&base);
    // The table starts past EOF.
    let img = copy(&base, "snaptab-eof.qcow2");
    put64(&img, hdr::SNAPSHOTS_OFFSET, past_eof(&img, g.cs()));
    rejected(&img, &["snapshot"], "snapshot table past EOF");
    // The table starts inside the file, but 65536 entries do not fit.
    let img = copy(&base, "snaptab-many.qcow2");
    put32(&img, hdr::NB_SNAPSHOTS, 65536);
    rejected(&img, &["snapshot"], "65536 snapshots in a small file");
    // The table is one entry in a new last cluster whose name runs past EOF.
    let img = copy(&base, "snaptab-name.qcow2");
    let at = file_len(&img).next_multiple_of(g.cs());
    let mut e = read_bytes(&base, g.snapshots_offset, 64);
    e[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut cluster = vec![0u8; g.cs() as usize];
    cluster[..64].copy_from_slice(&e);
    patch(&img, at, &cluster);
    put64(&img, hdr::SNAPSHOTS_OFFSET, at);
    rejected(&img, &["snapshot"], "snapshot name past EOF");
}

#[test]
fn reject_too_many_snapshots() {
    let d = tempdir();
    let img = with_snapshot(d.path(), "nb70000.qcow2");
    put32(&img, hdr::NB_SNAPSHOTS, 70000);
    rejected(&img, &["nb_snapshots"], "nb_snapshots 70000");
}

#[test]
fn reject_snapshot_extra_data_too_large() {
    let d = tempdir();
    let img = with_snapshot(d.path(), "extra5000.qcow2");
    let s = &snapshots(&img)[0];
    put32(&img, s.off + 36, 5000);
    rejected(
        &img,
        &["snapshot", "extra_data_size"],
        "snapshot extra_data_size 5000",
    );
}

#[test]
fn bitmaps_extension_with_zero_bitmaps_still_reads() {
    let d = tempdir();
    let img = plain(d.path(), "bm0.qcow2");
    qemu_img(d.path(), &["bitmap", "--add", &show(&img), "bm0"]);
    assert_eq!(
        read_be64(&img, hdr::AUTOCLEAR) & 1,
        1,
        "bitmaps autoclear bit"
    );
    let ext = Cluster0::load(&img).ext(EXT_BITMAPS).unwrap().clone();
    assert_eq!(u32::from_be_bytes(ext.data[0..4].try_into().unwrap()), 1);
    let want = rendered(&img, None);
    put32(&img, ext.off + 8, 0);
    // QEMU opens the image no more; reading it needs no bitmap (writing it is refused:
    // tests/bitmaps.rs).
    check_ok(&info(&img), "bitmaps extension with 0 bitmaps (info)");
    let out = cat(&img);
    check_ok(&out, "bitmaps extension with 0 bitmaps (cat)");
    assert_same_bytes("the disk", &want, &out.stdout);
}

#[test]
fn reject_l1_table_past_eof() {
    let d = tempdir();
    let img = plain(d.path(), "l1eof.qcow2");
    let g = Geo::read(&img);
    put64(&img, hdr::L1_OFFSET, past_eof(&img, g.cs()));
    rejected(&img, &["l1_table_offset"], "L1 table past EOF");
    // A huge (but within the limit) L1 table that starts inside the file and ends past it.
    let img = plain(d.path(), "l1long.qcow2");
    put32(&img, hdr::L1_SIZE, 0x0040_0000);
    rejected(&img, &["l1"], "L1 table running past EOF");
}

// ---------------------------------------------------------------------------------------
// Fail the individual read with EIO
// ---------------------------------------------------------------------------------------

/// A 4 MiB image with 64 KiB clusters: 0x11 in [0, 192k), snapshot "s1", then 0x22 in
/// [0, 64k) so the active L1 points to a private copy of the L2 table. Returns the image,
/// a pristine copy, and the file offset of the active L2 entry for guest offset 0.
fn eio_image(dir: &Path, name: &str, opts: &str) -> (PathBuf, PathBuf, Geo) {
    let img = create(dir, name, opts, 4 * M);
    qemu_io(&img, &["write -P 0x11 0 192k"]);
    snapshot_create(dir, &img, "s1");
    qemu_io(&img, &["write -P 0x22 0 64k"]);
    let g = Geo::read(&img);
    let s1 = snapshot_named(&img, "s1");
    let active_l2 = read_be64(&img, g.l1_entry_at(g.l1_offset, 0)) & OFFSET_MASK;
    let snap_l2 = read_be64(&img, g.l1_entry_at(s1.l1_offset, 0)) & OFFSET_MASK;
    assert_ne!(active_l2, snap_l2, "the active L2 table must be private");
    let pristine = copy(&img, &format!("pristine-{name}"));
    (img, pristine, g)
}

/// After the active disk was damaged: snapshot "s1" still reads as QEMU renders it.
fn healthy_snapshot_still_reads(img: &Path, pristine: &Path, what: &str) {
    let out = cat_snapshot(img, "s1");
    check_ok(&out, &format!("{what}: cat --snapshot s1"));
    let expected = rendered(pristine, Some("s1"));
    assert!(
        out.stdout == expected,
        "{what}: snapshot s1 differs from qemu-img convert ({} vs {} bytes)",
        out.stdout.len(),
        expected.len()
    );
    assert_eq!(out.stdout[0], 0x11);
}

#[test]
fn eio_unaligned_l2_offset_in_l1() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "l1-unaligned.qcow2", "");
    let at = g.l1_entry_at(g.l1_offset, 0);
    put64(&img, at, read_be64(&img, at) + 0x200);
    let line = assert_read_fails(&img, "unaligned L2 offset");
    assert_mentions(&line, &["l1"], "unaligned L2 offset");
    healthy_snapshot_still_reads(&img, &pristine, "unaligned L2 offset");
}

#[test]
fn eio_unaligned_data_offset_in_l2() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "l2-unaligned.qcow2", "");
    let at = g.l2_entry(&img, 0);
    put64(&img, at, read_be64(&img, at) + 0x200);
    let line = assert_read_fails(&img, "unaligned data offset");
    assert_mentions(&line, &["l2"], "unaligned data offset");
    healthy_snapshot_still_reads(&img, &pristine, "unaligned data offset");
}

#[test]
fn eio_zero_flag_in_v2_image() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "v2-zero.qcow2", "compat=0.10");
    assert_eq!(g.version, 2);
    let at = g.l2_entry(&img, 0);
    put64(&img, at, read_be64(&img, at) | 1);
    let line = assert_read_fails(&img, "v2 zero flag");
    assert_mentions(&line, &["zero"], "v2 zero flag");
    healthy_snapshot_still_reads(&img, &pristine, "v2 zero flag");
}

#[test]
fn eio_extended_l2_alloc_and_zero_bits() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "extl2-both.qcow2", "extended_l2=on");
    assert!(g.extended);
    let at = g.l2_entry(&img, 0);
    assert_eq!(
        read_be64(&img, at + 8),
        0xffff_ffff,
        "all subclusters allocated"
    );
    put64(&img, at + 8, 0xffff_ffff | (1 << 32));
    assert_read_fails(&img, "alloc and zero bits");
    healthy_snapshot_still_reads(&img, &pristine, "alloc and zero bits");
    // The same in a subcluster in the middle of the cluster.
    put64(&img, at + 8, 0xffff_ffff | (1 << 49));
    assert_read_fails(&img, "alloc and zero bits, subcluster 17");
}

#[test]
fn eio_extended_l2_alloc_bits_without_host_offset() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "extl2-nohost.qcow2", "extended_l2=on");
    let at = g.l2_entry(&img, 0);
    put64(&img, at, 0);
    assert_read_fails(&img, "alloc bits, host offset 0");
    healthy_snapshot_still_reads(&img, &pristine, "alloc bits, host offset 0");
    put64(&img, at, COPIED);
    put64(&img, at + 8, 1 << 5);
    assert_read_fails(&img, "one alloc bit, COPIED, host offset 0");
}

#[test]
fn eio_compressed_entry_in_data_file_image() {
    let d = tempdir();
    let dir = d.path();
    let img = create(dir, "df-comp.qcow2", "data_file=df-comp.data", M);
    qemu_io(&img, &["write -P 0x11 0 128k"]);
    check_ok(&cat(&img), "data-file image before the patch");
    let g = Geo::read(&img);
    let at = g.l2_entry(&img, 0);
    let e = read_be64(&img, at);
    put64(&img, at, (e & !COPIED) | COMPRESSED);
    assert_read_fails(&img, "compressed entry with a data file");
}

/// A compressed cluster at guest 64k written after snapshot "s1" (which does not see it).
/// Returns the image, a pristine copy, and the compressed range.
fn compressed_image(dir: &Path, name: &str, ctype: &str) -> (PathBuf, PathBuf, (u64, u64)) {
    let img = create(dir, name, &format!("compression_type={ctype}"), 4 * M);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    snapshot_create(dir, &img, "s1");
    qemu_io(&img, &["write -c -P 0x44 64k 64k"]);
    let good = cat(&img);
    check_ok(&good, "compressed image before the patch");
    assert_eq!(good.stdout, rendered(&img, None));
    let g = Geo::read(&img);
    let range = g.compressed_range(read_be64(&img, g.l2_entry(&img, 64 * KIB)));
    let pristine = copy(&img, &format!("pristine-{name}"));
    (img, pristine, range)
}

/// A raw deflate stream (one final stored block) that inflates to `n` bytes.
fn short_deflate(n: u16) -> Vec<u8> {
    let mut v = vec![0x01];
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(&(!n).to_le_bytes());
    v.extend(std::iter::repeat_n(0x44, n as usize));
    v
}

/// A complete zstd frame (single segment, one raw block) that decodes to `n` bytes.
fn zstd_raw_frame(n: usize) -> Vec<u8> {
    let mut v = vec![0x28, 0xb5, 0x2f, 0xfd];
    if n < 256 {
        v.extend_from_slice(&[0x20, n as u8]);
    } else {
        // Frame_Content_Size in 2 bytes, stored minus 256.
        v.push(0x60);
        v.extend_from_slice(&((n - 256) as u16).to_le_bytes());
    }
    let block = 1u32 | ((n as u32) << 3);
    v.extend_from_slice(&block.to_le_bytes()[..3]);
    v.extend(std::iter::repeat_n(0x44, n));
    v
}

/// A complete zstd frame with one RLE block that decodes to `n` bytes (up to 128 KiB).
fn zstd_rle_frame(n: u32) -> Vec<u8> {
    let mut v = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    v.extend_from_slice(&n.to_le_bytes());
    let block = 1u32 | (1 << 1) | (n << 3);
    v.extend_from_slice(&block.to_le_bytes()[..3]);
    v.push(0x44);
    v
}

fn check_bad_compressed(img: &Path, pristine: &Path, range: (u64, u64), stream: &[u8], what: &str) {
    let (off, len) = range;
    assert!(stream.len() as u64 <= len, "{what}: stream does not fit");
    let mut bytes = stream.to_vec();
    bytes.resize(len as usize, 0);
    patch(img, off, &bytes);
    let line = assert_read_fails(img, what);
    assert_mentions(&line, &["compress"], what);
    healthy_snapshot_still_reads(img, pristine, what);
}

#[test]
fn eio_short_decompression_zlib() {
    let d = tempdir();
    let (img, pristine, range) = compressed_image(d.path(), "zlib.qcow2", "zlib");
    check_bad_compressed(
        &img,
        &pristine,
        range,
        &short_deflate(10),
        "deflate to 10 bytes",
    );
    check_bad_compressed(&img, &pristine, range, &[0xff; 16], "garbage deflate");
    check_bad_compressed(&img, &pristine, range, &[], "zeroed deflate");
}

#[test]
fn eio_short_decompression_zstd() {
    let d = tempdir();
    let (img, pristine, range) = compressed_image(d.path(), "zstd.qcow2", "zstd");
    let (p, r) = (&img, &pristine);
    check_bad_compressed(p, r, range, &zstd_raw_frame(10), "zstd to 10 bytes");
    // A frame that fills the whole range exactly: the input ends before a whole cluster.
    let exact = zstd_raw_frame(range.1 as usize - 10);
    assert_eq!(exact.len() as u64, range.1);
    check_bad_compressed(p, r, range, &exact, "zstd ending short of a cluster");
    // One frame that decodes to more than a cluster.
    let long = zstd_rle_frame(65536 + 100);
    check_bad_compressed(p, r, range, &long, "zstd frame longer than a cluster");
    check_bad_compressed(p, r, range, &[0xa5; 16], "garbage zstd");
    check_bad_compressed(p, r, range, &[], "zeroed zstd");
}

#[test]
fn eio_data_offset_past_eof() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "data-eof.qcow2", "");
    let at = g.l2_entry(&img, 0);
    put64(&img, at, COPIED | past_eof(&img, g.cs()));
    assert_read_fails(&img, "data past EOF");
    healthy_snapshot_still_reads(&img, &pristine, "data past EOF");
}

#[test]
fn eio_l2_table_past_eof() {
    let d = tempdir();
    let (img, pristine, g) = eio_image(d.path(), "l2-eof.qcow2", "");
    let at = g.l1_entry_at(g.l1_offset, 0);
    put64(&img, at, COPIED | past_eof(&img, g.cs()));
    assert_read_fails(&img, "L2 table past EOF");
    healthy_snapshot_still_reads(&img, &pristine, "L2 table past EOF");
}

// ---------------------------------------------------------------------------------------
// A broken snapshot entry fails only that snapshot
// ---------------------------------------------------------------------------------------

/// Two snapshots (s1: 0x11 at 0; s2: also 0x22 at 64k), then 0x33 at 0 in the active disk.
fn two_snapshots(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let img = create(dir, name, "", 4 * M);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    snapshot_create(dir, &img, "s1");
    qemu_io(&img, &["write -P 0x22 64k 64k"]);
    snapshot_create(dir, &img, "s2");
    qemu_io(&img, &["write -P 0x33 0 64k"]);
    let pristine = copy(&img, &format!("pristine-{name}"));
    (img, pristine)
}

fn only_broken_snapshot_fails(img: &Path, pristine: &Path, what: &str) {
    check_ok(&info(img), &format!("{what}: info"));
    let active = cat(img);
    check_ok(&active, &format!("{what}: cat of the active disk"));
    assert!(
        active.stdout == rendered(pristine, None),
        "{what}: active disk differs from qemu-img convert"
    );
    let line = error_line(
        &cat_snapshot(img, "s1"),
        &format!("{what}: cat --snapshot s1"),
    );
    assert!(line.contains(&show(img)), "{what}: {line:?}");
    assert_mentions(&line, &["snapshot"], what);
    assert!(has_hex(&line), "{what}: no 0x offset in {line:?}");
    let s2 = cat_snapshot(img, "s2");
    check_ok(&s2, &format!("{what}: cat --snapshot s2"));
    assert!(
        s2.stdout == rendered(pristine, Some("s2")),
        "{what}: snapshot s2 differs from qemu-img convert"
    );
}

#[test]
fn broken_snapshot_unaligned_l1() {
    let d = tempdir();
    let (img, pristine) = two_snapshots(d.path(), "snap-unaligned.qcow2");
    let s1 = snapshot_named(&img, "s1");
    put64(&img, s1.off, s1.l1_offset + 0x200);
    only_broken_snapshot_fails(&img, &pristine, "snapshot L1 unaligned");
}

#[test]
fn broken_snapshot_l1_past_eof() {
    let d = tempdir();
    let (img, pristine) = two_snapshots(d.path(), "snap-eof.qcow2");
    let s1 = snapshot_named(&img, "s1");
    let cs = Geo::read(&img).cs();
    put64(&img, s1.off, past_eof(&img, cs));
    only_broken_snapshot_fails(&img, &pristine, "snapshot L1 past EOF");
}

/// A damaged snapshot whose ID holds a control character: the error names it escaped, on
/// one line.
#[test]
fn broken_snapshot_with_a_newline_in_its_id() {
    let d = tempdir();
    let (img, pristine) = two_snapshots(d.path(), "snap-id.qcow2");
    let s1 = snapshot_named(&img, "s1");
    let cs = Geo::read(&img).cs();
    put64(&img, s1.off, past_eof(&img, cs));
    assert_eq!(
        read_be32(&img, s1.off + 12) >> 16,
        1,
        "test setup: s1's ID is one byte"
    );
    patch(&img, s1.off + 40 + s1.extra_data_size, b"\n");
    only_broken_snapshot_fails(&img, &pristine, "snapshot ID with a newline");
}

// ---------------------------------------------------------------------------------------
// Warnings are lines of their own; the error stays one line
// ---------------------------------------------------------------------------------------

#[test]
fn corrupt_bit_warning_keeps_the_error_one_line() {
    let d = tempdir();
    let (img, _pristine, g) = eio_image(d.path(), "corrupt-bit.qcow2", "");
    // A read-only open of an image marked corrupt is allowed...
    set_incompat_bit(&img, 1);
    check_ok(&cat(&img), "corrupt bit alone");
    // ...but when the read then fails, stderr must still hold exactly one line.
    let at = g.l2_entry(&img, 0);
    put64(&img, at, read_be64(&img, at) + 0x200);
    assert_read_fails(&img, "corrupt bit and an unaligned data offset");
    let out = cat(&img);
    assert!(
        out.stderr
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("qcow2fs: warn: ") && l.contains("corrupt")),
        "the corrupt-bit warning is missing: {:?}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------
// Random corruption never panics, hangs or prints more than one error line
// ---------------------------------------------------------------------------------------

/// Byte ranges of the overlay that hold metadata or compressed data, grouped by kind so
/// that each kind is picked equally often however many ranges it has.
fn fuzz_regions(p: &Path) -> Vec<Vec<(u64, u64)>> {
    let g = Geo::read(p);
    let cs = g.cs();
    // Only the L2 entries that cover the disk matter.
    let size = read_be64(p, 24);
    let l2_used = size.div_ceil(cs).min(g.l2_entries()) * g.l2_entry_size();
    let snaps = snapshots(p);
    let table_end = snaps
        .last()
        .map(|s| s.off + 128)
        .unwrap_or(g.snapshots_offset + 64);
    let mut l1s = vec![(g.l1_offset, g.l1_size as u64)];
    for s in &snaps {
        l1s.push((s.l1_offset, read_be32(p, s.off + 8) as u64));
    }
    let mut l2s = Vec::new();
    let mut compressed = Vec::new();
    for &(l1, n) in &l1s {
        for i in 0..n {
            let l2 = read_be64(p, l1 + 8 * i) & OFFSET_MASK;
            if l2 == 0 || l2s.contains(&(l2, l2_used)) {
                continue;
            }
            l2s.push((l2, l2_used));
            for j in 0..g.l2_entries() {
                let e = read_be64(p, l2 + j * g.l2_entry_size());
                if e & COMPRESSED != 0 && !compressed.contains(&g.compressed_range(e)) {
                    compressed.push(g.compressed_range(e));
                }
            }
        }
    }
    let header_end = g.header_length;
    vec![
        // Header fields; extensions and backing name; the first two clusters.
        vec![(0, header_end)],
        vec![(header_end, 640 - header_end)],
        vec![(0, 2 * cs)],
        l1s.iter().map(|&(o, n)| (o, (n * 8).max(8))).collect(),
        vec![(g.snapshots_offset, table_end - g.snapshots_offset)],
        l2s,
        compressed,
        vec![(g.refcount_offset, 64)],
    ]
}

fn interesting(v: u64, cs: u64, len: u64) -> u64 {
    match v % 12 {
        0 => 0,
        1 => 1,
        2 => 0x200,
        3 => cs,
        4 => COPIED,
        5 => COMPRESSED | (v >> 8),
        6 => u64::MAX,
        7 => OFFSET_MASK,
        8 => len.next_multiple_of(cs),
        9 => len.next_multiple_of(cs) + 64 * cs,
        10 => 1 << (v % 64),
        _ => v,
    }
}

#[derive(Clone, Debug)]
struct Mutation {
    kind_of_region: Index,
    region: Index,
    at: Index,
    kind: u8,
    value: u64,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        any::<Index>(),
        any::<Index>(),
        any::<Index>(),
        0u8..5,
        any::<u64>(),
    )
        .prop_map(|(kind_of_region, region, at, kind, value)| Mutation {
            kind_of_region,
            region,
            at,
            kind,
            value,
        })
}

fn apply(bytes: &mut [u8], regions: &[Vec<(u64, u64)>], cs: u64, m: &Mutation) {
    let group = &regions[m.kind_of_region.index(regions.len())];
    let (start, len) = group[m.region.index(group.len())];
    let pos = (start + m.at.index(len as usize) as u64) as usize;
    let flen = bytes.len() as u64;
    let put = |bytes: &mut [u8], at: usize, v: &[u8]| {
        for (i, b) in v.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(at + i) {
                *slot = *b;
            }
        }
    };
    match m.kind {
        0 => {
            if let Some(b) = bytes.get_mut(pos) {
                *b ^= 1 << (m.value % 8);
            }
        }
        1 => put(bytes, pos, &[m.value as u8]),
        2 => put(
            bytes,
            pos & !3,
            &(interesting(m.value, cs, flen) as u32).to_be_bytes(),
        ),
        3 => put(
            bytes,
            pos & !7,
            &interesting(m.value, cs, flen).to_be_bytes(),
        ),
        _ => put(bytes, pos & !7, &[0u8; 8]),
    }
}

fn fuzz_ok(out: &Finished, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(!out.timed_out(), "{what}: hung: {}", out.describe());
    if out.capped {
        // A (valid) huge disk streaming out: not a hang.
        return Ok(());
    }
    prop_assert_eq!(out.signal(), None, "{}: signal: {}", what, out.describe());
    prop_assert!(
        out.code() == Some(0) || out.code() == Some(1),
        "{}: exit status {:?}: {}",
        what,
        out.code(),
        out.describe()
    );
    if out.code() == Some(1) {
        let mut lines: Vec<&str> = out.stderr.split_inclusive('\n').collect();
        // Warnings are lines of their own before the one error line.
        while lines.len() > 1 && lines[0].starts_with("qcow2fs: warn: ") {
            lines.remove(0);
        }
        prop_assert!(
            lines.len() == 1 && lines[0].ends_with('\n'),
            "{}: stderr is not one line: {:?}",
            what,
            out.stderr
        );
    }
    Ok(())
}

#[test]
fn random_corruption_never_panics_or_hangs() {
    let d = tempdir();
    let dir = d.path();
    let base = create(dir, "base.qcow2", "cluster_size=4096", M);
    qemu_io(
        &base,
        &["write -P 0xb1 0 256k", "write -c -P 0xb2 512k 64k"],
    );
    let top = create_image(
        dir,
        "top.qcow2",
        Some(M),
        "cluster_size=8192",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        &top,
        &[
            "write -P 0x11 0 64k",
            "write -c -P 0x22 128k 64k",
            "write -z 256k 32k",
        ],
    );
    snapshot_create(dir, &top, "s1");
    qemu_io(
        &top,
        &["write -P 0x33 32k 64k", "write -c -P 0x44 640k 16k"],
    );
    // Sanity: the pristine overlay renders like QEMU, active and snapshot.
    let out = cat(&top);
    check_ok(&out, "pristine fuzz image");
    assert!(out.stdout == rendered(&top, None));
    let out = cat_snapshot(&top, "s1");
    check_ok(&out, "pristine fuzz image, snapshot");
    assert!(out.stdout == rendered(&top, Some("s1")));

    let pristine = fs::read(&top).unwrap();
    let regions = fuzz_regions(&top);
    assert!(regions.iter().all(|g| !g.is_empty()), "{regions:?}");
    let cs = Geo::read(&top).cs();
    let counter = AtomicUsize::new(0);
    // PROPTEST_CASES overrides the modest default for a deeper local run.
    let cases = match std::env::var_os("PROPTEST_CASES") {
        Some(_) => Config::default().cases,
        None => 64,
    };
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        max_shrink_time: 60_000,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(mutation(), 1..8), |muts| {
        let mut bytes = pristine.clone();
        for m in &muts {
            apply(&mut bytes, &regions, cs, m);
        }
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let case = dir.join(format!("case-{n}.qcow2"));
        fs::write(&case, &bytes).unwrap();
        let cap = 64 << 20;
        let active = run_limited(&[OsStr::new("cat"), case.as_os_str()], TIMEOUT, cap);
        let snap = run_limited(
            &[
                OsStr::new("cat"),
                OsStr::new("--snapshot"),
                OsStr::new("s1"),
                case.as_os_str(),
            ],
            TIMEOUT,
            cap,
        );
        let map = run_limited(
            &[OsStr::new("map"), OsStr::new("--json"), case.as_os_str()],
            TIMEOUT,
            cap,
        );
        let r = fuzz_ok(&active, "cat")
            .and_then(|_| fuzz_ok(&snap, "cat --snapshot s1"))
            .and_then(|_| fuzz_ok(&map, "map --json"));
        if r.is_ok() {
            fs::remove_file(&case).unwrap();
        }
        r
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Text fields that are not UTF-8 (a backing format, feature names) keep their length when
/// cluster 0 is parsed and encoded again, so a rewritten header still parses and every
/// offset after them stays where it was (a regression found by fuzzing).
#[test]
fn header_text_that_is_not_utf8_survives_a_rewrite() {
    use qcow2fs::format::header::Header;
    let dir = tempdir();
    let d = dir.path();
    create(d, "base.qcow2", "", M);
    overlay(d, "top.qcow2", "base.qcow2", "qcow2");
    let mut c0 = fs::read(d.join("top.qcow2")).unwrap();
    c0.truncate(65536);
    // The backing format extension's data: "qcow2" right after its 8-byte header.
    let at = c0
        .windows(8)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5])
        .expect("a backing format extension")
        + 8;
    c0[at..at + 5].copy_from_slice(&[b'q', 0xff, b'o', 0xc3, b'2']);
    // And a feature name with a stray byte.
    let name = c0
        .windows(5)
        .position(|w| w == b"dirty")
        .expect("a feature name table");
    c0[name + 1] = 0x80;
    let h = Header::parse(&c0).expect("the patched header parses");
    assert_eq!(h.backing_format.as_deref().map(str::len), Some(5));
    let encoded = h.encode().expect("the header encodes");
    let again = Header::parse(&encoded).expect("the rewritten header parses");
    assert_eq!(again.backing_format, h.backing_format);
    assert_eq!(again.feature_names, h.feature_names);
    assert_eq!(again.backing_file, h.backing_file);
    assert_eq!(
        again.encode().unwrap(),
        encoded,
        "a second rewrite changes nothing"
    );
}
