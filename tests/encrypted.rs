//! Encrypted images through the engine, the block layer, the command line and mounts,
//! against QEMU: images made by qemu-img and written by qemu-io with `--object secret`
//! for each cipher family, mode, IV generator and hash (with snapshots, compressed
//! clusters, extended L2, v2 images, external data files and backing chains with a key
//! per layer) read byte-identical to `qemu-img convert`; writes through the library and
//! a read-write mount read back by QEMU and by qcow2fs, `qemu-img check` clean; keys
//! (key files read verbatim, a trailing newline included, the terminal, per-layer keys,
//! a wrong passphrase, none); overlays over encrypted evidence never hold plaintext, and
//! the daemon's memory holds no passphrase.
//!
//! Each `qemu-img create` of a LUKS image spends a second or more benchmarking PBKDF2
//! even with a small `iter-time`, so each image serves several checks.

mod support;

use qcow2fs::block::{BlockDev, Chain, KeySource, Keys, OpenOptions, open_chain};
use qcow2fs::engine::ImageOptions;
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
/// The disk size of the test images.
const SIZE: u64 = 4 * M;

// ---------------------------------------------------------------------------------------
// Keyed images: QEMU's and qcow2fs's view of an image and the keys of its layers
// ---------------------------------------------------------------------------------------

/// Writes a key file holding exactly `passphrase`.
fn key_file(dir: &Path, name: &str, passphrase: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, passphrase).unwrap();
    p
}

/// An image, possibly the top of a chain, and the key file of each layer from the top
/// (`None` for a layer that is not encrypted).
#[derive(Clone, Debug)]
struct Keyed {
    image: PathBuf,
    keys: Vec<Option<PathBuf>>,
}

impl Keyed {
    fn new(image: &Path, keys: &[Option<&Path>]) -> Keyed {
        Keyed {
            image: absolute(image),
            keys: keys.iter().map(|k| k.map(absolute)).collect(),
        }
    }

    fn dir(&self) -> PathBuf {
        image_dir(&self.image)
    }

    /// `--object secret,id=sN,file=KEY` for each encrypted layer.
    fn objects(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if let Some(k) = k {
                v.push("--object".to_string());
                v.push(format!("secret,id=s{i},file={}", k.display()));
            }
        }
        v
    }

    /// The `--image-opts` string: each encrypted layer gets its secret.
    fn image_opts(&self) -> String {
        let mut o = format!("driver=qcow2,file.filename={}", self.image.display());
        for (i, k) in self.keys.iter().enumerate() {
            if k.is_some() {
                o.push_str(&format!(",{}encrypt.key-secret=s{i}", "backing.".repeat(i)));
            }
        }
        o
    }

    /// `qemu-img CMD OBJECTS BEFORE --image-opts OPTS AFTER`; must succeed.
    fn qemu_img(&self, cmd: &str, before: &[&str], after: &[&str]) -> Finished {
        let mut args = vec![cmd.to_string()];
        args.extend(self.objects());
        args.extend(before.iter().map(|s| s.to_string()));
        args.push("--image-opts".into());
        args.push(self.image_opts());
        args.extend(after.iter().map(|s| s.to_string()));
        run(&self.dir(), "qemu-img", &args)
    }

    /// QEMU's raw rendering of the disk (or of snapshot `snap`).
    fn qemu_raw_of(&self, snap: Option<&str>) -> Vec<u8> {
        let out = tempfile::NamedTempFile::new_in(self.dir()).unwrap();
        let name = out.path().display().to_string();
        let l = snap.map(|s| format!("snapshot.name={s}"));
        let mut before = vec!["-O", "raw"];
        if let Some(l) = &l {
            before.extend(["-l", l.as_str()]);
        }
        self.qemu_img("convert", &before, &[&name]);
        fs::read(out.path()).unwrap()
    }

    fn qemu_raw(&self) -> Vec<u8> {
        self.qemu_raw_of(None)
    }

    /// qemu-io commands on the image; fails on any error word, as `support::qemu_io`.
    fn qemu_io(&self, cmds: &[&str]) {
        let mut args = self.objects();
        args.push("--image-opts".into());
        for c in cmds {
            args.push("-c".into());
            args.push(c.to_string());
        }
        args.push(self.image_opts());
        let out = run(&self.dir(), "qemu-io", &args);
        let text = out.all_output();
        assert!(
            !text.contains("failed") && !text.contains("error"),
            "qemu-io reported a failure: {}",
            out.describe()
        );
    }

    fn qemu_map(&self) -> Value {
        let out = self.qemu_img("map", &["--output=json"], &[]);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `qemu-img check` (with the keys) finds no corruption, leak or error.
    fn assert_check_clean(&self) {
        let mut args = vec!["check".to_string()];
        args.extend(self.objects());
        args.extend(["--output=json".into(), "--image-opts".into()]);
        args.push(self.image_opts());
        let out = run_in(&self.dir(), "qemu-img", &args, Duration::from_secs(120));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("qemu-img check printed no JSON ({e}): {}", out.describe()));
        for f in ["corruptions", "leaks", "check-errors"] {
            let n = v.get(f).and_then(Value::as_u64).unwrap_or(0);
            assert_eq!(n, 0, "qemu-img check: {f} = {n}\n{}", out.describe());
        }
        assert!(out.success(), "qemu-img check failed: {}", out.describe());
    }

    /// `--key-file` for the top image and `--layer-key-file N=KEY` for the others.
    fn cli_keys(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if let Some(k) = k {
                if i == 0 {
                    v.extend(["--key-file".to_string(), k.display().to_string()]);
                } else {
                    v.extend([
                        "--layer-key-file".to_string(),
                        format!("{i}={}", k.display()),
                    ]);
                }
            }
        }
        v
    }

    /// `key-file.N=KEY` for each encrypted layer.
    fn mount_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.as_ref().map(|k| format!("key-file.{i}={}", k.display())))
            .collect()
    }

    fn library_keys(&self) -> Keys {
        let mut keys = Keys::default();
        for (i, k) in self.keys.iter().enumerate() {
            if let Some(k) = k {
                keys.layers.insert(i as u32, KeySource::File(k.clone()));
            }
        }
        keys
    }

    fn open(&self, writable: bool) -> Chain {
        open_chain(
            &self.image,
            &OpenOptions {
                image: ImageOptions {
                    writable,
                    ..Default::default()
                },
                keys: self.library_keys(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("opening {}: {}", self.image.display(), e.report()))
    }

    /// `qcow2fs CMD KEYS ARGS... IMAGE`; must succeed; returns stdout.
    fn qcow2fs(&self, cmd: &str, args: &[&str]) -> Vec<u8> {
        let mut a = vec![cmd.to_string()];
        a.extend(self.cli_keys());
        a.extend(args.iter().map(|s| s.to_string()));
        a.push(self.image.display().to_string());
        qcow2fs(&self.dir(), &a)
    }
}

/// `qemu-img create` of a qcow2 image, encrypted with `enc` (format and key file),
/// with extra `-o` options, over `backing` (not opened: `-u`).
fn create(
    dir: &Path,
    name: &str,
    enc: Option<(&str, &Path)>,
    opts: &str,
    backing: Option<&Path>,
) -> PathBuf {
    let mut o: Vec<String> = Vec::new();
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some((format, key)) = enc {
        args.extend([
            "--object".into(),
            format!("secret,id=c0,file={}", key.display()),
        ]);
        o.push(format!("encrypt.format={format},encrypt.key-secret=c0"));
        if format == "luks" {
            o.push("encrypt.iter-time=10".into());
        }
    }
    if !opts.is_empty() {
        o.push(opts.into());
    }
    if !o.is_empty() {
        args.extend(["-o".into(), o.join(",")]);
    }
    if let Some(b) = backing {
        args.extend([
            "-u".into(),
            "-b".into(),
            b.display().to_string(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    args.push(name.into());
    args.push(SIZE.to_string());
    run(dir, "qemu-img", &args);
    dir.join(name)
}

fn cluster_size_of(opts: &str) -> u64 {
    opts.split(',')
        .find_map(|o| o.strip_prefix("cluster_size="))
        .map_or(64 * K, |v| v.parse().unwrap())
}

// ---------------------------------------------------------------------------------------
// What qcow2fs shows of an encrypted image
// ---------------------------------------------------------------------------------------

/// The library, `qcow2fs cat` (disk and snapshot) and `map` against QEMU.
fn assert_reads_like_qemu(e: &Keyed, snapshots: &[&str], what: &str) {
    let want = e.qemu_raw();
    let chain = e.open(false);
    assert_same_bytes(
        &format!("{what}: library read"),
        &want,
        &read_chunked(&*chain.top, 12_345),
    );
    assert_same_bytes(
        &format!("{what}: qcow2fs cat"),
        &want,
        &e.qcow2fs("cat", &[]),
    );
    for s in snapshots {
        let want = e.qemu_raw_of(Some(s));
        let snap = chain.image().find_snapshot(s).expect("the snapshot exists");
        assert_same_bytes(
            &format!("{what}: snapshot {s} through the library"),
            &want,
            &read_chunked(&*chain.snapshot(snap.key), 65_537),
        );
        assert_same_bytes(
            &format!("{what}: qcow2fs cat --snapshot {s}"),
            &want,
            &e.qcow2fs("cat", &["--snapshot", s]),
        );
    }
    let ours: Value = serde_json::from_slice(&e.qcow2fs("map", &["--json"])).unwrap();
    assert_eq!(ours, e.qemu_map(), "{what}: map --json");
}

/// `info` needs no key and shows the `encrypt` block qemu-img shows (JSON and text).
fn assert_info_like_qemu(image: &Path, what: &str) {
    let dir = image_dir(image);
    let name = image.display().to_string();
    let q: Value =
        serde_json::from_str(&qemu_img(&dir, &["info", "--output=json", &name])).unwrap();
    let ours = qcow2fs_json(&dir, &["info", "--json", &name]);
    assert_eq!(ours["encrypted"], Value::Bool(true), "{what}: info --json");
    let (qe, oe) = (
        &q["format-specific"]["data"]["encrypt"],
        &ours["format-specific"]["data"]["encrypt"],
    );
    assert!(
        qe.is_object(),
        "{what}: qemu-img info shows no encrypt block"
    );
    assert_eq!(oe, qe, "{what}: info --json encrypt block");
    // The text: the "encrypted: yes" line and the encrypt block, line for line.
    let block = |text: &str| -> Vec<String> {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| *l == "    encrypt:")
            .unwrap_or_else(|| panic!("{what}: no encrypt block in\n{text}"));
        lines[start..]
            .iter()
            .enumerate()
            .take_while(|(i, l)| *i == 0 || l.starts_with("        "))
            .map(|(_, l)| l.to_string())
            .collect()
    };
    let qt = qemu_img(&dir, &["info", &name]);
    let ot = String::from_utf8(qcow2fs(&dir, &["info", &name])).unwrap();
    assert!(ot.contains("\nencrypted: yes\n"), "{what}: info text\n{ot}");
    assert_eq!(block(&ot), block(&qt), "{what}: info text encrypt block");
}

// ---------------------------------------------------------------------------------------
// Writes through the library, checked against a model and QEMU
// ---------------------------------------------------------------------------------------

/// One change to the disk.
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
}

/// Writes that cross every kind of place: unaligned within a sector, across clusters,
/// into a compressed cluster, into clusters a snapshot shares, into unallocated ranges
/// (copy-on-write from a backing file where there is one), zeroing parts and whole
/// clusters, the last bytes of the disk.
fn write_ops(cs: u64, compressed_at: Option<u64>, seed: &str) -> Vec<Op> {
    let mut rng = Rng::named(seed);
    let mut ops = vec![
        Op::Write(0x1234, rng.bytes(3000)),
        Op::Write(2 * cs - 100, rng.bytes((cs + 300) as usize)),
        Op::Write(0x40000 + 300, rng.bytes(5000)),
        Op::Write(3 * M + 1, rng.bytes(777)),
        Op::Zero(cs + 0x800, 0x800, false),
        Op::Zero(2 * M, 2 * cs, true),
        Op::Write(SIZE - 300, rng.bytes(300)),
        Op::Write(5 * cs, rng.bytes(cs as usize)),
    ];
    if let Some(c) = compressed_at {
        ops.push(Op::Write(c + 7, rng.bytes(100)));
    }
    for _ in 0..12 {
        let off = rng.below(SIZE - 8 * K);
        let len = rng.range(1, 8 * K) as usize;
        ops.push(Op::Write(off, rng.bytes(len)));
    }
    ops
}

/// Applies `ops` to `dev` and to `model`.
fn apply(dev: &dyn BlockDev, model: &mut [u8], ops: &[Op]) {
    for op in ops {
        match op {
            Op::Write(off, data) => {
                dev.write_at(data, *off)
                    .unwrap_or_else(|e| panic!("write at {off:#x}: {}", e.report()));
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            Op::Zero(off, len, unmap) => {
                dev.write_zeroes(*off, *len, *unmap)
                    .unwrap_or_else(|e| panic!("zeroing at {off:#x}: {}", e.report()));
                model[*off as usize..(*off + *len) as usize].fill(0);
            }
        }
    }
}

/// Writes through the library, then QEMU and a fresh open of qcow2fs read the model, the
/// snapshots are unchanged and `qemu-img check` is clean.
fn assert_writes_read_back(e: &Keyed, cs: u64, compressed_at: Option<u64>, snapshots: &[&str]) {
    let what = e.image.display().to_string();
    let mut model = e.qemu_raw();
    let before: Vec<Vec<u8>> = snapshots.iter().map(|s| e.qemu_raw_of(Some(s))).collect();
    {
        let chain = e.open(true);
        apply(
            &*chain.top,
            &mut model,
            &write_ops(cs, compressed_at, &what),
        );
        assert_same_bytes(
            &format!("{what}: read back before closing"),
            &model,
            &read_chunked(&*chain.top, 70_001),
        );
        chain.top.close().unwrap();
    }
    assert_same_bytes(
        &format!("{what}: QEMU reads the writes"),
        &model,
        &e.qemu_raw(),
    );
    e.assert_check_clean();
    let chain = e.open(false);
    assert_same_bytes(
        &format!("{what}: qcow2fs reads the writes after reopening"),
        &model,
        &read_all(&*chain.top),
    );
    for (s, want) in snapshots.iter().zip(before) {
        assert_same_bytes(
            &format!("{what}: snapshot {s} is unchanged"),
            &want,
            &e.qemu_raw_of(Some(s)),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Every cipher family, mode, IV generator and hash
// ---------------------------------------------------------------------------------------

/// An image encrypted with `format` and `enc_opts` (with `img_opts` for its layout),
/// written by qemu-io (data, zeros, a compressed cluster where the layout allows one), a
/// snapshot taken and more written: read like QEMU, info like qemu-img, then written.
fn check_combination(format: &str, enc_opts: &str, img_opts: &str) {
    let d = tempdir();
    let key = key_file(d.path(), "key", b"combination passphrase");
    let opts = [enc_opts, img_opts]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    let img = create(d.path(), "img.qcow2", Some((format, &key)), &opts, None);
    let e = Keyed::new(&img, &[Some(&key)]);
    let cs = cluster_size_of(img_opts);
    let compressed = M;
    e.qemu_io(&[
        "write -P 0x5a 1000 70000",
        "write -P 0x33 0x20000 0x30000",
        "write -z 0x60000 0x20000",
        &format!("write -c -P 0x11 {compressed} {cs}"),
        "write -P 0x77 0x300000 0x1000",
    ]);
    // The setup holds a compressed cluster (QEMU stores it unencrypted).
    let map = e.qemu_map();
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|x| x["compressed"] == Value::Bool(true)),
        "{opts}: no compressed cluster in {map}"
    );
    e.qemu_img("snapshot", &["-c", "s1"], &[]);
    e.qemu_io(&[
        "write -P 0x44 0x28000 0x1000",
        "write -P 0x45 0x3ff000 0x800",
    ]);
    assert_info_like_qemu(&img, &opts);
    assert_reads_like_qemu(&e, &["s1"], &opts);
    assert_writes_read_back(&e, cs, Some(compressed), &["s1"]);
}

#[test]
fn luks_default_aes256_xts_plain64_sha256() {
    check_combination("luks", "", "");
}

#[test]
fn luks_aes128_cbc_essiv_sha256_hash_sha1_4k_clusters() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        "cluster_size=4096",
    );
}

#[test]
fn luks_aes192_xts_plain_sha224_extended_l2() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha224",
        "extended_l2=on,cluster_size=32768",
    );
}

#[test]
fn luks_serpent192_xts_essiv_sm3_hash_sha512() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=serpent-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sm3,encrypt.hash-alg=sha512",
        "",
    );
}

#[test]
fn luks_serpent128_ecb_and_serpent256_ctr_plain64() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=ecb",
        "cluster_size=16384",
    );
    check_combination(
        "luks",
        "encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain64",
        "",
    );
}

#[test]
fn luks_twofish128_ctr_plain_ripemd160_and_twofish192_xts() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain,encrypt.hash-alg=ripemd160",
        "",
    );
    check_combination(
        "luks",
        "encrypt.cipher-alg=twofish-192,encrypt.cipher-mode=xts,encrypt.hash-alg=sha512",
        "",
    );
}

#[test]
fn luks_twofish256_cbc_plain64_sha384_v2_image() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=cbc,encrypt.hash-alg=sha384",
        "compat=0.10",
    );
}

#[test]
fn luks_cast5_cbc_essiv_md5_and_cast5_ctr() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5,encrypt.hash-alg=md5",
        "",
    );
    check_combination(
        "luks",
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=ctr",
        "",
    );
}

#[test]
fn luks_aes128_ecb_sm3() {
    check_combination(
        "luks",
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb,encrypt.hash-alg=sm3",
        "",
    );
}

#[test]
fn legacy_aes_v3_and_v2() {
    check_combination("aes", "", "");
    check_combination("aes", "", "compat=0.10,cluster_size=8192");
}

// ---------------------------------------------------------------------------------------
// Backing chains, external data files
// ---------------------------------------------------------------------------------------

/// A chain of three LUKS images, each with its own key (and cipher): every layer reads
/// like QEMU's rendering with its own keys, writes to the top copy-on-write from the
/// layers below (re-encrypted with the top's key), `stream` copies the chain into the
/// top, and a missing or wrong layer key is an error naming the layer.
#[test]
fn chain_with_a_key_per_layer() {
    let d = tempdir();
    let dir = d.path();
    let (ka, kb, kc) = (
        key_file(dir, "a.key", b"base key"),
        key_file(dir, "b.key", b"middle key\n"),
        key_file(dir, "c.key", b"top key"),
    );
    let base = create(
        dir,
        "base.qcow2",
        Some(("luks", &ka)),
        "encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=xts",
        None,
    );
    let mid = create(
        dir,
        "mid.qcow2",
        Some(("luks", &kb)),
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        Some(&base),
    );
    let top = create(dir, "top.qcow2", Some(("luks", &kc)), "", Some(&mid));
    let eb = Keyed::new(&base, &[Some(&ka)]);
    let em = Keyed::new(&mid, &[Some(&kb), Some(&ka)]);
    let et = Keyed::new(&top, &[Some(&kc), Some(&kb), Some(&ka)]);
    eb.qemu_io(&["write -P 0x0b 0 4M"]);
    em.qemu_io(&["write -P 0x0c 0x10000 0x30000", "write -z 0x100000 0x10000"]);
    et.qemu_io(&["write -P 0x0d 0x20000 0x2000"]);
    assert_reads_like_qemu(&et, &[], "top of the chain");
    // Each layer file of a mount shows the layer through its own chain.
    let chain = et.open(false);
    assert_same_bytes("layer 1", &em.qemu_raw(), &read_all(&*chain.layers[0]));
    assert_same_bytes("layer 2", &eb.qemu_raw(), &read_all(&*chain.layers[1]));
    drop(chain);
    // The same through a mount with a key per layer (key-file.N).
    let mp = mountpoint(dir, "mnt");
    let opts = et.mount_keys();
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let m = Mount::new(&top, &mp, &opts);
    assert_same_bytes("mounted disk", &et.qemu_raw(), &fs::read(m.disk()).unwrap());
    assert_same_bytes(
        "mounted layer 1",
        &em.qemu_raw(),
        &fs::read(m.path("layers/1-mid.raw")).unwrap(),
    );
    assert_same_bytes(
        "mounted layer 2",
        &eb.qemu_raw(),
        &fs::read(m.path("layers/2-base.raw")).unwrap(),
    );
    m.umount();

    // No key for layer 1: the general key is tried there and fails, naming the layer's
    // image; no key at all for it (per-layer keys only): an error that says how.
    let top_s = top.display().to_string();
    let out = qcow2fs_exit1(
        dir,
        &["cat", "--key-file", &kc.display().to_string(), &top_s],
    );
    assert!(
        out.stderr.contains(&mid.display().to_string()) && out.stderr.contains("wrong passphrase"),
        "{}",
        out.describe()
    );
    let layer0 = format!("0={}", kc.display());
    let out = qcow2fs_exit1(dir, &["cat", "--layer-key-file", &layer0, &top_s]);
    for needle in ["layer 1", "key-file.1", "--layer-key-file 1="] {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.describe());
    }
    // A key for a layer that is not there.
    let layer3 = format!("3={}", kc.display());
    let out = qcow2fs_exit1(dir, &["info", "--layer-key-file", &layer3, &top_s]);
    assert!(out.stderr.contains("layer 3"), "{}", out.describe());

    // Copy-on-write into the top, re-encrypted with the top's key and offsets.
    assert_writes_read_back(&et, 64 * K, None, &[]);

    // Stream the chain into the top and drop the backing files: the top alone reads the
    // same, with its own key only.
    let want = et.qemu_raw();
    qcow2fs(
        dir,
        &[
            "stream",
            "--key-file",
            &kc.display().to_string(),
            "--layer-key-file",
            &format!("1={}", kb.display()),
            "--layer-key-file",
            &format!("2={}", ka.display()),
            "--drop-backing",
            &top.display().to_string(),
        ],
    );
    let alone = Keyed::new(&top, &[Some(&kc)]);
    assert_same_bytes("streamed top", &want, &alone.qemu_raw());
    alone.assert_check_clean();
    assert_same_bytes("streamed top (qcow2fs)", &want, &alone.qcow2fs("cat", &[]));
}

/// One passphrase for a whole chain (`key-file` alone), over a legacy AES layer and an
/// unencrypted base; the mount shows every layer as QEMU renders it.
#[test]
fn one_key_for_a_chain_through_a_mount() {
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"one key for all");
    let base = create(dir, "base.qcow2", None, "", None);
    qemu_io(&base, &["write -P 0x01 0 4M"]);
    let aes = create(dir, "aes.qcow2", Some(("aes", &k)), "", Some(&base));
    let top = create(dir, "top.qcow2", Some(("luks", &k)), "", Some(&aes));
    let ea = Keyed::new(&aes, &[Some(&k), None]);
    let et = Keyed::new(&top, &[Some(&k), Some(&k), None]);
    ea.qemu_io(&["write -P 0x02 0x8000 0x20000"]);
    et.qemu_io(&["write -P 0x03 0x18000 0x1000"]);
    let mp = mountpoint(dir, "mnt");
    let opt = format!("key-file={}", k.display());
    let m = Mount::new(&top, &mp, &[&opt]);
    assert_same_bytes("disk", &et.qemu_raw(), &fs::read(m.disk()).unwrap());
    let layer1 = m.path("layers/1-aes.raw");
    assert_same_bytes("layer 1", &ea.qemu_raw(), &fs::read(&layer1).unwrap());
    assert_same_bytes(
        "layer 2",
        &qemu_raw(&base),
        &fs::read(m.path("layers/2-base.raw")).unwrap(),
    );
    m.umount();
}

/// External data files, raw or not: the IV of a LUKS sector is its offset in the data
/// file.
#[test]
fn external_data_files() {
    for raw in [false, true] {
        let d = tempdir();
        let dir = d.path();
        let k = key_file(dir, "k", b"data file key");
        let opts = format!(
            "data_file=img.data,data_file_raw={}",
            if raw { "on" } else { "off" }
        );
        let img = create(dir, "img.qcow2", Some(("luks", &k)), &opts, None);
        let e = Keyed::new(&img, &[Some(&k)]);
        e.qemu_io(&["write -P 0x61 0x3000 0x25000", "write -z 0x80000 0x10000"]);
        assert_reads_like_qemu(&e, &[], &opts);
        assert_writes_read_back(&e, 64 * K, None, &[]);
    }
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

/// `qcow2fs ARGS` in `dir`, which must exit with status 1 (an error, not a crash).
fn qcow2fs_exit1(dir: &Path, args: &[&str]) -> Finished {
    let out = run_in(dir, qcow2fs_bin(), args, Duration::from_secs(60));
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    out
}

/// `qcow2fs ARGS` in `dir` fails with exit status 1 and one line on stderr: that line.
fn qcow2fs_fails(dir: &Path, args: &[&str]) -> String {
    let out = qcow2fs_exit1(dir, args);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line: {}", out.describe());
    lines[0].to_string()
}

/// `qcow2fs cat --key-file KEY IMAGE` fails with one line: that line.
fn cat_fails_with_key(dir: &Path, key: &Path, image: &Path) -> String {
    qcow2fs_fails(
        dir,
        &[
            "cat",
            "--key-file",
            &key.display().to_string(),
            &image.display().to_string(),
        ],
    )
}

/// Several key slots: each passphrase opens the image; a wrong one fails after trying
/// every active slot, with one line naming the image and never the passphrase, exit 1,
/// nothing mounted.
#[test]
fn wrong_passphrase_after_every_slot() {
    let d = tempdir();
    let dir = d.path();
    let k0 = key_file(dir, "k0", b"first passphrase");
    let k1 = key_file(dir, "k1", b"second passphrase");
    let bad = key_file(dir, "bad", b"not-the-passphrase-3141");
    let img = create(dir, "img.qcow2", Some(("luks", &k0)), "", None);
    let e0 = Keyed::new(&img, &[Some(&k0)]);
    e0.qemu_io(&["write -P 0x17 0 0x10000"]);
    run(
        dir,
        "qemu-img",
        &[
            "amend".to_string(),
            "--object".into(),
            format!("secret,id=s0,file={}", k0.display()),
            "--object".into(),
            format!("secret,id=n1,file={}", k1.display()),
            "--image-opts".into(),
            e0.image_opts(),
            "-o".into(),
            "encrypt.state=active,encrypt.new-secret=n1,encrypt.keyslot=1,encrypt.iter-time=10"
                .into(),
        ],
    );
    let want = e0.qemu_raw();
    let e1 = Keyed::new(&img, &[Some(&k1)]);
    assert_same_bytes("slot 1 opens it", &want, &e1.qcow2fs("cat", &[]));
    let name = img.display().to_string();
    let line = cat_fails_with_key(dir, &bad, &img);
    for needle in [name.as_str(), "wrong passphrase", "(0, 1)"] {
        assert!(line.contains(needle), "{needle}: {line}");
    }
    assert!(!line.contains("not-the-passphrase"), "{line}");
    let mp = mountpoint(dir, "mnt");
    assert_mount_refused(
        &img,
        &mp,
        &[&format!("key-file={}", bad.display())],
        &[&name, "wrong passphrase"],
    );
    assert_mount_refused(
        &img,
        &mp,
        &["rw", &format!("key-file={}", bad.display())],
        &["wrong passphrase"],
    );
}

/// No key: `info` works, everything else says how to give one; nothing is mounted.
#[test]
fn no_key_given() {
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"pw");
    let img = create(dir, "img.qcow2", Some(("luks", &k)), "", None);
    let name = img.display().to_string();
    qcow2fs(dir, &["info", &name]);
    for cmd in [vec!["cat"], vec!["map", "--json"], vec!["stream"]] {
        let mut args = cmd.clone();
        args.push(&name);
        let line = qcow2fs_fails(dir, &args);
        for needle in [name.as_str(), "encrypted", "no key", "--key-file"] {
            assert!(line.contains(needle), "{cmd:?}: {needle}: {line}");
        }
    }
    let mp = mountpoint(dir, "mnt");
    assert_mount_refused(&img, &mp, &[], &[&name, "no key", "key-file=PATH"]);
    // A key file that is a FIFO is refused at once, not waited on.
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let line = cat_fails_with_key(dir, &fifo, &img);
    assert!(line.contains("not a regular file"), "{line}");
}

/// QEMU reads a secret file verbatim, so does qcow2fs: a passphrase that ends with a
/// newline needs the newline.
#[test]
fn trailing_newline_is_part_of_the_passphrase() {
    let d = tempdir();
    let dir = d.path();
    let with = key_file(dir, "with-newline", b"passphrase\n");
    let without = key_file(dir, "without", b"passphrase");
    for (made_with, other, fmt) in [(&with, &without, "luks"), (&without, &with, "luks")] {
        let img = create(
            dir,
            &format!("{}.qcow2", stem(made_with)),
            Some((fmt, made_with)),
            "",
            None,
        );
        let e = Keyed::new(&img, &[Some(made_with)]);
        e.qemu_io(&["write -P 0x42 0 0x10000"]);
        assert_same_bytes("the same key file", &e.qemu_raw(), &e.qcow2fs("cat", &[]));
        let line = cat_fails_with_key(dir, other, &img);
        assert!(line.contains("wrong passphrase"), "{line}");
    }
}

/// `--key-file -` asks on the terminal (here a pseudo-terminal made by script(1)); the
/// line typed, without its newline, is the passphrase.
#[test]
fn key_file_dash_asks_on_the_terminal() {
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"typed passphrase");
    let img = create(dir, "img.qcow2", Some(("luks", &k)), "", None);
    let e = Keyed::new(&img, &[Some(&k)]);
    e.qemu_io(&["write -P 0x24 0x1000 0x3000"]);
    let out = dir.join("out.raw");
    let cmd = format!(
        "{} cat --key-file - {} > {}",
        qcow2fs_bin(),
        img.display(),
        out.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) runs");
    let mut stdin = child.stdin.take().unwrap();
    // Type once the prompt is up (earlier input would be echoed by the terminal).
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"typed passphrase\n").unwrap();
    let ok = wait_until(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !ok {
        let _ = child.kill();
    }
    drop(stdin);
    let status = child.wait().unwrap();
    let transcript = {
        let mut s = String::new();
        use std::io::Read;
        let _ = child.stdout.take().unwrap().read_to_string(&mut s);
        s
    };
    assert!(ok && status.success(), "script: {status:?}\n{transcript}");
    assert!(transcript.contains("Passphrase for"), "{transcript}");
    assert_same_bytes("prompted key", &e.qemu_raw(), &fs::read(&out).unwrap());
}

// ---------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------

/// Writes through a read-write mount (buffered and unaligned, O_DIRECT, hole punching and
/// zeroing) read back by QEMU and by qcow2fs after remounting; `qemu-img check` clean.
#[test]
fn read_write_mount_over_a_snapshot() {
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"mount passphrase");
    let img = create(dir, "img.qcow2", Some(("luks", &k)), "", None);
    let e = Keyed::new(&img, &[Some(&k)]);
    e.qemu_io(&["write -P 0x11 0 0x80000"]);
    e.qemu_img("snapshot", &["-c", "before"], &[]);
    let snap = e.qemu_raw_of(Some("before"));
    let mut model = e.qemu_raw();
    let mp = mountpoint(dir, "mnt");
    let opt = format!("key-file={}", k.display());
    let m = Mount::new(&img, &mp, &["rw", &opt]);
    let mut rng = Rng::named("read_write_mount_over_a_snapshot");
    {
        let f = fs::OpenOptions::new().write(true).open(m.disk()).unwrap();
        for _ in 0..20 {
            let off = rng.below(SIZE - 20 * K);
            let len = rng.range(1, 20 * K) as usize;
            let data = rng.bytes(len);
            f.write_all_at(&data, off).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0x10000,
            0x20000,
        )
        .unwrap();
        model[0x10000..0x30000].fill(0);
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0x41000, 0x3000).unwrap();
        model[0x41000..0x44000].fill(0);
        f.sync_all().unwrap();
        let fd = fs::OpenOptions::new()
            .write(true)
            .custom_flags_direct()
            .open(m.disk())
            .unwrap();
        let mut buf = AlignedBuf::new(M as usize);
        let data = rng.bytes(M as usize);
        buf.as_mut()[..M as usize].copy_from_slice(&data);
        fd.write_all_at(&buf.as_mut()[..M as usize], 2 * M).unwrap();
        model[2 * M as usize..3 * M as usize].copy_from_slice(&data);
        fd.sync_all().unwrap();
    }
    assert_same_bytes(
        "read through the mount",
        &model,
        &fs::read(m.disk()).unwrap(),
    );
    m.umount();
    assert_same_bytes("QEMU reads the mount's writes", &model, &e.qemu_raw());
    assert_same_bytes(
        "the snapshot is unchanged",
        &snap,
        &e.qemu_raw_of(Some("before")),
    );
    e.assert_check_clean();
    let m = Mount::new(&img, &mp, &[&opt]);
    assert_same_bytes("after remounting", &model, &fs::read(m.disk()).unwrap());
    assert_same_bytes(
        "the snapshot file",
        &snap,
        &fs::read(m.path("snapshots/before.raw")).unwrap(),
    );
    m.umount();
}

trait DirectOpen {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectOpen for fs::OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECT)
    }
}

/// Whether `needle` occurs in the file at `path`, read in overlapping pieces.
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).unwrap();
        if n == 0 {
            return false;
        }
        if buf[..n].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        if n < needle.len() {
            return false;
        }
        off += (n - needle.len() + 1) as u64;
    }
}

/// The files a process holds open under `dir` (overlays have no name: they show as
/// `dir/#INODE (deleted)`), as paths that open them.
fn fds_under(pid: i32, dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap();
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(target) = fs::read_link(e.path())
            && target.starts_with(&dir)
        {
            out.push(e.path());
        }
    }
    out
}

/// Over encrypted evidence, what is written through an overlay mount (to the disk and
/// to a snapshot) reads back, but reaches neither the overlay files (unnamed, reached
/// through the daemon's descriptors) nor the image in plaintext; the image does not
/// change; keep_overlay is refused.
#[test]
fn overlay_over_encrypted_evidence_holds_no_plaintext() {
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"evidence key");
    let img = create(dir, "evidence.qcow2", Some(("luks", &k)), "", None);
    let e = Keyed::new(&img, &[Some(&k)]);
    e.qemu_io(&["write -P 0x65 0 0x100000"]);
    e.qemu_img("snapshot", &["-c", "snap"], &[]);
    let image_bytes = fs::read(&img).unwrap();
    let ovl = dir.join("ovl");
    fs::create_dir(&ovl).unwrap();
    let mp = mountpoint(dir, "mnt");
    let opts = [
        format!("overlay={}", ovl.display()),
        format!("key-file={}", k.display()),
    ];
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let pattern: Vec<u8> = b"PLAINTEXT-EVIDENCE-PATTERN-9e1c0ffee "
        .iter()
        .copied()
        .cycle()
        .take(256 * 1024)
        .collect();
    let needle = &pattern[..37];
    let m = Mount::new(&img, &mp, &opts);
    let files = [m.disk(), m.path("snapshots/snap.raw")];
    for (i, f) in files.iter().enumerate() {
        let file = fs::OpenOptions::new().write(true).open(f).unwrap();
        file.write_all_at(&pattern, 0x1000 + i as u64 * 0x40000)
            .unwrap();
        file.write_all_at(&pattern[..1000], 3 * M + 11).unwrap();
        file.sync_all().unwrap();
        drop(file);
        let back = fs::read(f).unwrap();
        assert_eq!(
            &back[0x1000 + i * 0x40000..][..pattern.len()],
            &pattern[..],
            "{}: the overlay does not hold the write",
            f.display()
        );
    }
    let pid = m.daemon_pid();
    let overlays = fds_under(pid, &ovl);
    assert_eq!(
        overlays.len(),
        2,
        "one overlay per file written: {overlays:?}"
    );
    for o in &overlays {
        let len = fs::metadata(o).unwrap().len();
        assert!(
            len > 256 * 1024,
            "{}: the overlay holds only {len} bytes",
            o.display()
        );
        assert!(
            file_contains(o, b"LUKS\xba\xbe"),
            "{}: not a LUKS-encrypted overlay",
            o.display()
        );
        assert!(
            !file_contains(o, needle),
            "{}: plaintext in the overlay",
            o.display()
        );
    }
    for entry in walk(&ovl) {
        assert!(
            !file_contains(&entry, needle),
            "{}: plaintext",
            entry.display()
        );
    }
    m.umount();
    assert_eq!(fs::read(&img).unwrap(), image_bytes, "the evidence changed");
    assert!(!file_contains(&img, needle));
    assert_mount_refused(
        &img,
        &mp,
        &[opts[0], opts[1], "keep_overlay"],
        &["keep_overlay", "encrypted"],
    );
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// The daemon of a mount keeps no passphrase in its memory (nor its command line or
/// environment): only the ciphers.
#[test]
fn daemon_memory_holds_no_passphrase() {
    let d = tempdir();
    let dir = d.path();
    let passphrase = b"unique-passphrase-a71f3c09d2b8e654";
    let k = key_file(dir, "k", passphrase);
    let base = create(dir, "base.qcow2", Some(("luks", &k)), "", None);
    let img = create(dir, "img.qcow2", Some(("luks", &k)), "", Some(&base));
    let e = Keyed::new(&img, &[Some(&k), Some(&k)]);
    e.qemu_io(&["write -P 0x19 0 0x10000"]);
    let want = e.qemu_raw();
    let mp = mountpoint(dir, "mnt");
    let opt = format!("key-file={}", k.display());
    let m = Mount::new(&img, &mp, &["rw", &opt]);
    // Use it, so every layer has been read.
    assert_same_bytes("disk", &want, &fs::read(m.disk()).unwrap());
    let pid = m.daemon_pid();
    for f in ["cmdline", "environ"] {
        let b = fs::read(format!("/proc/{pid}/{f}")).unwrap();
        assert!(!b.windows(passphrase.len()).any(|w| w == passphrase), "{f}");
    }
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        let Ok(n) = mem.read_at(&mut buf, a) else {
            continue;
        };
        scanned += n as u64;
        assert!(
            !buf[..n].windows(passphrase.len()).any(|w| w == passphrase),
            "the passphrase is in the daemon's memory at {line}"
        );
    }
    assert!(
        scanned > M,
        "only {scanned} bytes of the daemon's memory could be read"
    );
    m.umount();
}

// ---------------------------------------------------------------------------------------
// The LUKS area is metadata
// ---------------------------------------------------------------------------------------

/// A damaged image whose L2 entry points into the LUKS area: a write there is refused
/// (the area is in the overlap record) and the header is left intact.
#[test]
fn writes_never_land_on_the_luks_area() {
    use support::patch::{COPIED, Cluster0, EXT_FDE, Geo, put64, read_be64};
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"area key");
    let img = create(dir, "img.qcow2", Some(("luks", &k)), "", None);
    let e = Keyed::new(&img, &[Some(&k)]);
    e.qemu_io(&["write -P 0x71 0 0x10000"]);
    let fde = Cluster0::load(&img).ext(EXT_FDE).unwrap().data.clone();
    let area = u64::from_be_bytes(fde[..8].try_into().unwrap());
    let g = Geo::read(&img);
    let at = g.l2_entry(&img, 0);
    assert_ne!(read_be64(&img, at), 0);
    put64(&img, at, (area + 2 * g.cs()) | COPIED);
    let before = fs::read(&img).unwrap()[area as usize..][..4096].to_vec();
    let chain = e.open(true);
    let err = chain.top.write_at(&[0xee; 512], 0).unwrap_err().report();
    assert!(err.contains("LUKS"), "{err}");
    drop(chain);
    assert_eq!(
        &fs::read(&img).unwrap()[area as usize..][..4096],
        &before[..],
        "the LUKS header changed"
    );
}

/// An encrypted image left dirty by a crash (lazy refcounts): qcow2fs rebuilds its
/// refcounts, the LUKS area counted as `qemu-img check` counts it.
#[test]
fn refcount_rebuild_counts_the_luks_area() {
    let d = tempdir();
    let dir = d.path();
    let k = key_file(dir, "k", b"crash key");
    let img = create(
        dir,
        "img.qcow2",
        Some(("luks", &k)),
        "lazy_refcounts=on",
        None,
    );
    let e = Keyed::new(&img, &[Some(&k)]);
    let mut args = e.objects();
    args.extend(["--image-opts".to_string()]);
    for c in [
        "write -P 0x5c 0 0x50000",
        "write -P 0x5d 0x200000 0x10000",
        "abort",
    ] {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    args.push(e.image_opts());
    let out = run_in(dir, "qemu-io", &args, Duration::from_secs(60));
    assert_eq!(out.signal(), Some(libc::SIGABRT), "{}", out.describe());
    assert!(dirty_flag(&img), "the crash left the image dirty");
    let want = e.qemu_raw();
    let chain = e.open(true);
    chain.top.write_at(&[0x5e; 4096], 0x100000).unwrap();
    chain.top.close().unwrap();
    drop(chain);
    assert!(!dirty_flag(&img), "the rebuild left the image dirty");
    e.assert_check_clean();
    let mut model = want;
    model[0x100000..0x101000].fill(0x5e);
    assert_same_bytes("after the rebuild", &model, &e.qemu_raw());
}

/// A snapshot's VM state in an encrypted image, written by QEMU (`qemu-io write -b`) and
/// read back by `cat --vmstate` and through a mount's `NAME.vmstate`: legacy AES numbers
/// its sectors by guest offset, which for the VM-state area lies past the end of the
/// disk; LUKS by host offset.
#[test]
fn vm_state_of_encrypted_images() {
    for format in ["aes", "luks"] {
        let d = tempdir();
        let dir = d.path();
        let key = key_file(dir, "k", b"vm state passphrase");
        let img = create(dir, "vm.qcow2", Some((format, &key)), "", None);
        let e = Keyed::new(&img, &[Some(&key)]);
        let stream: Vec<u8> = (0..200 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let file = dir.join("stream");
        fs::write(&file, &stream).unwrap();
        let write = format!("write -b -s {} 0 {}", file.display(), stream.len());
        e.qemu_io(&["write -q -P 0x3c 0 64k", &write]);
        e.qemu_img("snapshot", &["-c", "running"], &[]);
        support::patch::set_snapshot_vm_state_size(&img, 0, stream.len() as u64);
        let ours = e.qcow2fs("cat", &["--vmstate", "running"]);
        assert_same_bytes(&format!("{format}: cat --vmstate"), &stream, &ours);
        let mnt = mountpoint(dir, "mnt");
        let keys = e.mount_keys();
        let opts: Vec<&str> = keys.iter().map(String::as_str).collect();
        let m = Mount::new(&img, &mnt, &opts);
        let mounted = fs::read(m.path("snapshots/running.vmstate")).unwrap();
        m.umount();
        assert_same_bytes(&format!("{format}: running.vmstate"), &stream, &mounted);
    }
}
