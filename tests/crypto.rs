//! The encryption core against QEMU: LUKS images made by qemu-img with each cipher
//! family, mode, IV generator and hash are unlocked, and the data qemu-io wrote decrypts
//! to its pattern and encrypts back to the file's bytes; LUKS areas qcow2fs makes, for
//! every combination it covers, are put into a qcow2 image that qemu-io must read; legacy
//! AES both ways; several key slots; a wrong passphrase; hostile headers.
//!
//! Data clusters are found by reading the L1 and L2 tables by hand, so the core is
//! checked apart from the engine and block layer (tests/encrypted.rs checks those).

mod support;

use qcow2fs::crypto::{
    CipherAlg, CipherMode, CipherSpec, Crypto, HashAlg, IvGenAlg, LuksArea, LuksHeader, LuksParams,
    MasterKey, PBKDF2_WORK_LIMIT, SectorBasis, create_luks_area,
};
use qcow2fs::format::header::{CryptMethod, Header};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use support::images::create_encrypted;
use support::{qemu_img, run, tempdir};

const PASS: &str = "PASS";
const CS: u64 = 65536;
/// Where the tests write their pattern: the second cluster, so guest and host offsets
/// differ.
const GUEST: u64 = 0x10000;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn secret(id: &str, data: &str) -> String {
    format!("secret,id={id},data={data}")
}

/// `qemu-img create` of a 1 MiB LUKS image with `opts` added to the encrypt options.
fn luks_image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let mut o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".to_string();
    if !opts.is_empty() {
        o = format!("{o},{opts}");
    }
    create_encrypted(dir, name, "1M", &secret("sec0", PASS), &o)
}

fn image_opts(image: &Path, format: &str) -> String {
    let fmt = if format.is_empty() {
        String::new()
    } else {
        format!(",encrypt.format={format}")
    };
    format!(
        "driver=qcow2,file.filename={}{fmt},encrypt.key-secret=sec0",
        image.display()
    )
}

/// qemu-io on an encrypted image with passphrase `pass`; `format` is "" for LUKS or
/// "aes"; panics unless every command succeeds (a failed `read -P` fails qemu-io).
fn qemu_io_enc(image: &Path, format: &str, pass: &str, cmds: &[&str]) {
    let mut args = vec![
        "--object".to_string(),
        secret("sec0", pass),
        "--image-opts".to_string(),
        image_opts(image, format),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    run(image.parent().unwrap(), "qemu-io", &args);
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// The host offset of the cluster holding guest offset `guest` (which must be mapped
/// to a normal cluster), from the L1 and L2 tables.
fn host_cluster(file: &[u8], h: &Header, guest: u64) -> u64 {
    let l2_entries = CS / 8;
    let l1 = be64(file, h.l1_table_offset + 8 * (guest / CS / l2_entries)) & OFFSET_MASK;
    assert_ne!(l1, 0, "guest {guest:#x} has no L2 table");
    let l2 = be64(file, l1 + 8 * ((guest / CS) % l2_entries));
    assert_eq!(l2 >> 62 & 1, 0, "guest {guest:#x} is compressed");
    let host = l2 & OFFSET_MASK;
    assert_ne!(host, 0, "guest {guest:#x} is not allocated");
    host
}

struct Opened {
    file: Vec<u8>,
    header: Header,
    luks: LuksHeader,
}

fn open_luks(image: &Path) -> Opened {
    let file = fs::read(image).unwrap();
    let header = Header::parse_allowing_encryption(&file[..CS as usize]).unwrap();
    assert_eq!(header.crypt_method, CryptMethod::Luks);
    let (offset, length) = header.fde.expect("LUKS image has an FDE extension");
    let luks = LuksHeader::parse(
        &file[offset as usize..],
        LuksArea { offset, length },
        file.len() as u64,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    Opened { file, header, luks }
}

impl Opened {
    fn area(&self) -> &[u8] {
        let a = self.luks.area;
        &self.file[a.offset as usize..(a.offset + a.length) as usize]
    }

    fn unlock(&self, pass: &str) -> qcow2fs::Result<MasterKey> {
        self.luks.unlock_from_area(self.area(), pass.as_bytes())
    }
}

/// The image's cluster at `GUEST` decrypts to `pattern` and encrypts back to the file's
/// bytes; decrypting by the other sector basis does not give the pattern.
fn check_cluster(file: &[u8], header: &Header, crypto: &Crypto, pattern: u8, what: &str) {
    let host = host_cluster(file, header, GUEST);
    let stored = &file[host as usize..(host + CS) as usize];
    let mut buf = stored.to_vec();
    crypto.decrypt(host, GUEST, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == pattern),
        "{what}: cluster at host {host:#x} does not decrypt to {pattern:#x} (first bytes {:02x?})",
        &buf[..16]
    );
    crypto.encrypt(host, GUEST, &mut buf).unwrap();
    assert!(
        buf == stored,
        "{what}: re-encrypting does not give the file's bytes"
    );
    let other = match crypto.sector_basis() {
        SectorBasis::Host => GUEST / 512,
        SectorBasis::Guest => host / 512,
    };
    // ECB has no IV: there the sector number does not matter.
    let (mut s0, mut s1) = ([0u8; 512], [0u8; 512]);
    crypto.encrypt_sectors(0, &mut s0).unwrap();
    crypto.encrypt_sectors(1, &mut s1).unwrap();
    if s0 != s1 {
        let mut wrong = stored.to_vec();
        crypto.decrypt_sectors(other, &mut wrong).unwrap();
        assert!(
            wrong != buf_of(pattern),
            "{what}: the other sector basis also decrypts"
        );
    }
}

fn buf_of(pattern: u8) -> Vec<u8> {
    vec![pattern; CS as usize]
}

/// QEMU makes the image, qemu-io writes the pattern, qcow2fs unlocks and decrypts it.
fn qemu_made(name: &str, opts: &str, expect: (&str, &str, &str, Option<&str>, &str)) -> Opened {
    let d = tempdir();
    let img = luks_image(d.path(), name, opts);
    qemu_io_enc(&img, "", PASS, &[&format!("write -P 0x5a {GUEST} {CS}")]);
    let o = open_luks(&img);
    let info = o.luks.info();
    assert_eq!(
        (
            info.cipher_alg,
            info.cipher_mode,
            info.ivgen_alg,
            info.ivgen_hash_alg,
            info.hash_alg
        ),
        expect,
        "{opts}"
    );
    // The summary names what qemu-img info names.
    let q: serde_json::Value =
        serde_json::from_str(&qemu_img(d.path(), &["info", "--output=json", name])).unwrap();
    let qenc = &q["format-specific"]["data"]["encrypt"];
    let ours = serde_json::to_value(&info).unwrap();
    for key in [
        "format",
        "cipher-alg",
        "cipher-mode",
        "ivgen-alg",
        "ivgen-hash-alg",
        "hash-alg",
        "detached-header",
        "uuid",
        "payload-offset",
        "master-key-iters",
        "slots",
    ] {
        assert_eq!(ours.get(key), qenc.get(key), "{opts}: info field {key}");
    }
    let key = o.unlock(PASS).unwrap_or_else(|e| panic!("{opts}: {e}"));
    assert_eq!(key.len(), o.luks.master_key_len as usize);
    let crypto = Crypto::luks(&o.luks, &key).unwrap();
    check_cluster(&o.file, &o.header, &crypto, 0x5a, opts);
    o
}

#[test]
fn qemu_default_aes256_xts_plain64_sha256() {
    let o = qemu_made(
        "default.qcow2",
        "",
        ("aes-256", "xts", "plain64", None, "sha256"),
    );
    // The LUKS area must be cluster-aligned, as QEMU checks.
    let mut h = o.header.clone();
    let (offset, length) = h.fde.unwrap();
    h.fde = Some((offset + 512, length));
    let err = Header::parse_allowing_encryption(&h.encode().unwrap()).unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    h.fde = Some((offset, 0));
    assert!(Header::parse_allowing_encryption(&h.encode().unwrap()).is_err());
}

#[test]
fn qemu_aes128_cbc_essiv_sha256_hash_sha1() {
    qemu_made(
        "a.qcow2",
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        ("aes-128", "cbc", "essiv", Some("sha256"), "sha1"),
    );
}

#[test]
fn qemu_aes192_xts_plain_hash_sha224() {
    // QEMU keeps an IV hash given with plain ("xts-plain:sha1") and ignores it.
    qemu_made(
        "a.qcow2",
        "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.ivgen-hash-alg=sha1,encrypt.hash-alg=sha224",
        ("aes-192", "xts", "plain", None, "sha224"),
    );
}

#[test]
fn qemu_serpent192_xts_essiv_sm3_hash_sha512() {
    qemu_made(
        "s.qcow2",
        "encrypt.cipher-alg=serpent-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sm3,encrypt.hash-alg=sha512",
        ("serpent-192", "xts", "essiv", Some("sm3"), "sha512"),
    );
}

#[test]
fn qemu_twofish128_ctr_plain_hash_ripemd160() {
    qemu_made(
        "t.qcow2",
        "encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain,encrypt.hash-alg=ripemd160",
        ("twofish-128", "ctr", "plain", None, "ripemd160"),
    );
}

#[test]
fn qemu_twofish256_cbc_plain64_hash_sha384() {
    qemu_made(
        "t.qcow2",
        "encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=cbc,encrypt.hash-alg=sha384",
        ("twofish-256", "cbc", "plain64", None, "sha384"),
    );
}

#[test]
fn qemu_cast5_cbc_essiv_md5_hash_md5() {
    qemu_made(
        "c.qcow2",
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5,encrypt.hash-alg=md5",
        ("cast5-128", "cbc", "essiv", Some("md5"), "md5"),
    );
}

#[test]
fn qemu_aes128_ecb_hash_sm3() {
    qemu_made(
        "e.qcow2",
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb,encrypt.hash-alg=sm3",
        ("aes-128", "ecb", "plain64", None, "sm3"),
    );
}

#[test]
fn qemu_serpent256_ctr_plain64_cast5_ctr() {
    qemu_made(
        "s.qcow2",
        "encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=ctr",
        ("serpent-256", "ctr", "plain64", None, "sha256"),
    );
    qemu_made(
        "c.qcow2",
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=ctr",
        ("cast5-128", "ctr", "plain64", None, "sha256"),
    );
}

#[test]
fn several_key_slots_and_a_wrong_passphrase() {
    let d = tempdir();
    let img = luks_image(d.path(), "slots.qcow2", "");
    qemu_img(
        d.path(),
        &[
            "amend",
            "--object",
            &secret("sec0", PASS),
            "--object",
            &secret("sec1", "OTHER"),
            "--image-opts",
            &image_opts(&img, ""),
            "-o",
            "encrypt.keyslot=3,encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
        ],
    );
    qemu_io_enc(&img, "", "OTHER", &[&format!("write -P 0x3c {GUEST} {CS}")]);
    let o = open_luks(&img);
    assert_eq!(o.luks.active_slots().collect::<Vec<_>>(), [0, 3]);
    let k0 = o.unlock(PASS).unwrap();
    let k3 = o.unlock("OTHER").unwrap();
    assert_eq!(k0.as_bytes(), k3.as_bytes());
    let mut read = |off: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&o.file[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    assert!(
        o.luks
            .unlock_slot(0, b"OTHER", &mut read)
            .unwrap()
            .is_none()
    );
    assert!(
        o.luks
            .unlock_slot(3, b"OTHER", &mut read)
            .unwrap()
            .is_some()
    );
    let err = o.unlock("wrong").unwrap_err();
    assert_eq!(err.kind(), qcow2fs::ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(msg.contains("passphrase") && msg.contains("0, 3"), "{msg}");
    // A trailing newline is part of the passphrase, as with QEMU's secret files.
    assert!(o.unlock("PASS\n").is_err());
    check_cluster(
        &o.file,
        &o.header,
        &Crypto::luks(&o.luks, &k3).unwrap(),
        0x3c,
        "slot 3",
    );
}

/// Every combination qcow2fs covers, made by qcow2fs: a LUKS area and a cluster of
/// pattern it encrypts replace those of a QEMU-made image, and qemu-io must read the
/// pattern with the passphrase; qcow2fs's own parser and unlock must round-trip.
#[test]
fn qemu_reads_what_qcow2fs_encrypts_for_every_combination() {
    let d = tempdir();
    let template = luks_image(d.path(), "template.qcow2", "");
    qemu_io_enc(
        &template,
        "",
        PASS,
        &[&format!("write -P 0x11 {GUEST} {CS}")],
    );
    let t = open_luks(&template);
    let host = host_cluster(&t.file, &t.header, GUEST);
    let room = t.luks.area.length.next_multiple_of(CS);
    let hashes = qcow2fs::crypto::hash::ALL_HASHES;
    let (mut n, mut checked) = (0, 0);
    for alg in qcow2fs::crypto::cipher::ALL_CIPHERS {
        for mode in [
            CipherMode::Xts,
            CipherMode::Cbc,
            CipherMode::Ecb,
            CipherMode::Ctr,
        ] {
            for (ivgen, ivhash) in [
                (IvGenAlg::Plain, None),
                (IvGenAlg::Plain64, None),
                (IvGenAlg::Essiv, Some(HashAlg::Sha256)),
                (IvGenAlg::Essiv, Some(HashAlg::Md5)),
            ] {
                let Ok(spec) = CipherSpec::new(alg, mode, ivgen, ivhash) else {
                    continue;
                };
                if mode == CipherMode::Ecb && ivgen != IvGenAlg::Plain64 {
                    continue; // ECB takes no IV.
                }
                if spec.master_key_len() * 4000 % 512 != 0 {
                    continue; // QEMU cannot open these (see create_luks_area).
                }
                n += 1;
                let hash = hashes[n % hashes.len()];
                let what = format!(
                    "{} {} {:?} {:?} {}",
                    alg.name(),
                    mode.name(),
                    ivgen,
                    ivhash,
                    hash.name()
                );
                let params = LuksParams {
                    spec,
                    hash,
                    slot_iterations: 1000,
                    master_key_iterations: 1000,
                };
                let key = MasterKey::random(spec.master_key_len()).unwrap();
                let area_at = t.luks.area.offset;
                let (made, area) =
                    create_luks_area(&params, &key, PASS.as_bytes(), area_at).unwrap();
                assert!(area.len() as u64 <= room, "{what}: area does not fit");
                let img = d.path().join(format!("c{n}.qcow2"));
                fs::copy(&template, &img).unwrap();
                let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
                let mut h = t.header.clone();
                h.fde = Some((area_at, area.len() as u64));
                f.write_all_at(&h.encode().unwrap(), 0).unwrap();
                f.write_all_at(&area, area_at).unwrap();
                let crypto = Crypto::luks(&made, &key).unwrap();
                let mut data = buf_of(0x77);
                crypto.encrypt(host, GUEST, &mut data).unwrap();
                f.write_all_at(&data, host).unwrap();
                drop(f);
                qemu_io_enc(&img, "", PASS, &[&format!("read -P 0x77 {GUEST} {CS}")]);
                // Where the new area is as long as the old, nothing leaks: qemu-img check
                // must find the image clean.
                if area.len() as u64 == t.luks.area.length {
                    checked += 1;
                    qemu_img(
                        d.path(),
                        &[
                            "check",
                            "--object",
                            &secret("sec0", PASS),
                            "--image-opts",
                            &image_opts(&img, ""),
                        ],
                    );
                }
                let o = open_luks(&img);
                assert_eq!(o.luks, made, "{what}: parse(encode(h)) != h");
                let got = o.unlock(PASS).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(got.as_bytes(), key.as_bytes(), "{what}");
                check_cluster(&o.file, &o.header, &crypto, 0x77, &what);
            }
        }
    }
    assert!(n >= 90, "only {n} combinations");
    assert!(checked >= 3, "only {checked} images checked");
}

#[test]
fn legacy_aes_both_ways() {
    let d = tempdir();
    let pass = "legacy-passphrase-longer-than-16";
    let img = create_encrypted(
        d.path(),
        "aes.qcow2",
        "1M",
        &secret("sec0", pass),
        "encrypt.format=aes,encrypt.key-secret=sec0",
    );
    qemu_io_enc(
        &img,
        "aes",
        pass,
        &[
            &format!("write -P 0x5a {GUEST} {CS}"),
            &format!("write -P 0 {} {CS}", 3 * CS),
        ],
    );
    let file = fs::read(&img).unwrap();
    let header = Header::parse_allowing_encryption(&file[..CS as usize]).unwrap();
    assert_eq!(header.crypt_method, CryptMethod::Aes);
    assert!(Header::parse(&file[..CS as usize]).is_err());
    let crypto = Crypto::legacy_aes(pass.as_bytes());
    assert_eq!(crypto.sector_basis(), SectorBasis::Guest);
    check_cluster(&file, &header, &crypto, 0x5a, "legacy AES");
    // Only the first 16 bytes of the passphrase count.
    check_cluster(
        &file,
        &header,
        &Crypto::legacy_aes(&pass.as_bytes()[..16]),
        0x5a,
        "prefix",
    );
    // What qcow2fs encrypts, QEMU reads.
    let guest = 3 * CS;
    let l1 = be64(&file, header.l1_table_offset) & OFFSET_MASK;
    let host = be64(&file, l1 + 8 * 3) & OFFSET_MASK;
    let mut data = buf_of(0x66);
    crypto.encrypt(host, guest, &mut data).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&data, host)
        .unwrap();
    qemu_io_enc(&img, "aes", pass, &[&format!("read -P 0x66 {guest} {CS}")]);
}

const AREA_AT: u64 = 0x10000;

/// A valid LUKS area made by qcow2fs (all slots laid out, slot 0 active) in a file.
fn valid_file() -> (Vec<u8>, LuksArea) {
    let key = MasterKey::random(64).unwrap();
    let (h, area) = create_luks_area(&LuksParams::default(), &key, b"pw", AREA_AT).unwrap();
    let mut file = vec![0u8; AREA_AT as usize];
    file.extend_from_slice(&area);
    (file, h.area)
}

fn parse(file: &[u8], area: LuksArea) -> Result<LuksHeader, qcow2fs::format::FormatError> {
    LuksHeader::parse(&file[area.offset as usize..], area, file.len() as u64)
}

fn put32(file: &mut [u8], at: usize, v: u32) {
    let at = AREA_AT as usize + at;
    file[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_text(file: &mut [u8], at: usize, text: &[u8]) {
    let at = AREA_AT as usize + at;
    file[at..at + 32].fill(0);
    file[at..at + text.len()].copy_from_slice(text);
}

/// Slot `i`'s field at byte `field` of its 48-byte record.
fn slot(i: usize, field: usize) -> usize {
    208 + 48 * i + field
}

#[track_caller]
fn refused(file: &[u8], area: LuksArea, words: &[&str]) {
    let start = std::time::Instant::now();
    let err = parse(file, area)
        .expect_err("hostile header was accepted")
        .to_string();
    assert!(
        start.elapsed().as_secs() < 1,
        "parsing took {:?}",
        start.elapsed()
    );
    for w in words {
        assert!(err.contains(w), "error {err:?} does not mention {w:?}");
    }
    assert!(!err.contains('\n'), "error is not one line: {err:?}");
}

#[test]
fn hostile_luks_headers_are_refused_with_the_field_named() {
    let (good, area) = valid_file();
    let h = parse(&good, area).unwrap();
    assert_eq!(h.active_slots().collect::<Vec<_>>(), [0]);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    refused(
        &edit(&|b| b[AREA_AT as usize] = b'X'),
        area,
        &["magic", "0x10000"],
    );
    refused(
        &edit(&|b| b[AREA_AT as usize + 7] = 2),
        area,
        &["version 2"],
    );
    refused(
        &edit(&|b| put_text(b, 8, b"camellia")),
        area,
        &["cipher name", "camellia"],
    );
    refused(
        &edit(&|b| put_text(b, 8, b"sm4")),
        area,
        &["sm4", "not supported"],
    );
    refused(&edit(&|b| put_text(b, 40, b"lrw-plain64")), area, &["lrw"]);
    refused(&edit(&|b| put_text(b, 40, b"xts-benbi")), area, &["benbi"]);
    refused(&edit(&|b| put_text(b, 40, b"xts")), area, &["MODE-IVGEN"]);
    refused(
        &edit(&|b| put_text(b, 40, b"xts-essiv:sha1")),
        area,
        &["essiv:sha1"],
    );
    refused(
        &edit(&|b| put_text(b, 40, b"xts-plain64:tiger")),
        area,
        &["tiger"],
    );
    refused(
        &edit(&|b| put_text(b, 72, b"whirlpool")),
        area,
        &["hash spec", "whirlpool"],
    );
    refused(
        &edit(&|b| b[AREA_AT as usize + 8..AREA_AT as usize + 40].fill(b'a')),
        area,
        &["NUL"],
    );
    for len in [0, 40, 63, 128, u32::MAX] {
        refused(
            &edit(&|b| put32(b, 108, len)),
            area,
            &["master-key length", &len.to_string()],
        );
    }
    refused(
        &edit(&|b| put_text(b, 40, b"cbc-plain64")),
        area,
        &["64 bytes", "cbc"],
    );
    refused(
        &edit(&|b| put32(b, 164, 0)),
        area,
        &["master-key iterations", "is 0"],
    );
    refused(
        &edit(&|b| put32(b, slot(0, 4), 0)),
        area,
        &["slot 0 iterations", "is 0"],
    );
    refused(
        &edit(&|b| put32(b, slot(2, 0), 0x1234)),
        area,
        &["slot 2 state"],
    );
    refused(
        &edit(&|b| put32(b, slot(5, 44), 0)),
        area,
        &["slot 5 stripes"],
    );
    refused(
        &edit(&|b| put32(b, slot(0, 44), 4001)),
        area,
        &["slot 0 stripes"],
    );
    let s1 = h.slots[1].key_offset_sector;
    refused(
        &edit(&|b| put32(b, slot(4, 40), s1 + 8)),
        area,
        &["overlaps slot", "slot 4"],
    );
    refused(&edit(&|b| put32(b, slot(0, 40), 0)), area, &["LUKS header"]);
    refused(&edit(&|b| put32(b, 104, 100)), area, &["payload"]);
    refused(&edit(&|b| put32(b, 104, 8)), area, &["payload"]);
    // Enormous iteration counts: one slot, or many slots that add up, or a costly hash.
    refused(&edit(&|b| put32(b, slot(0, 4), u32::MAX)), area, &["limit"]);
    refused(&edit(&|b| put32(b, 164, u32::MAX)), area, &["limit"]);
    let many = edit(&|b| {
        for i in 0..8 {
            put32(b, slot(i, 0), 0x00ac_71f3);
            put32(b, slot(i, 4), 20_000_000);
        }
    });
    refused(&many, area, &["limit"]);
    let sha512 = edit(&|b| {
        put_text(b, 72, b"sha512");
        put32(b, slot(0, 4), 60_000_000);
    });
    refused(&sha512, area, &["limit"]);
    let mut within = good.clone();
    put32(&mut within, slot(0, 4), (PBKDF2_WORK_LIMIT / 4) as u32);
    assert!(parse(&within, area).is_ok());
    // Key material of an active slot outside the area, and the area outside the file.
    let short = LuksArea {
        offset: area.offset,
        length: 4096 + 1000,
    };
    refused(&good, short, &["past", "LUKS area"]);
    refused(
        &good,
        LuksArea {
            offset: area.offset,
            length: 100,
        },
        &["shorter"],
    );
    refused(&good[..good.len() - 1], area, &["end of the file"]);
    let far = LuksArea {
        offset: u64::MAX - 10,
        length: 100,
    };
    let err = LuksHeader::parse(&good[AREA_AT as usize..], far, good.len() as u64).unwrap_err();
    assert!(err.to_string().contains("end of the file"), "{err}");
    let file_len = good.len() as u64;
    assert!(
        LuksHeader::parse(
            &good[AREA_AT as usize..AREA_AT as usize + 100],
            area,
            file_len
        )
        .is_err()
    );
}

#[test]
fn random_damage_never_panics() {
    let (good, area) = valid_file();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = AREA_AT as usize + (next() % 592) as usize;
            b[at] = next() as u8;
        }
        let _ = parse(&b, area);
    }
}

#[test]
fn unlocking_a_made_header_gives_its_key_and_a_wrong_passphrase_fails() {
    let key = MasterKey::random(32).unwrap();
    let params = LuksParams {
        spec: CipherSpec::new(
            CipherAlg::Aes128,
            CipherMode::Xts,
            IvGenAlg::Essiv,
            Some(HashAlg::Sha256),
        )
        .unwrap(),
        ..LuksParams::default()
    };
    let (h, area) = create_luks_area(&params, &key, b"secret\n", 0).unwrap();
    assert_eq!(h.info().ivgen_hash_alg, Some("sha256"));
    assert_eq!(
        h.unlock_from_area(&area, b"secret\n").unwrap().as_bytes(),
        key.as_bytes()
    );
    assert!(h.unlock_from_area(&area, b"secret").is_err());
    // Key sizes that do not fit, and layouts QEMU cannot open, are refused.
    assert!(create_luks_area(&params, &MasterKey::random(64).unwrap(), b"x", 0).is_err());
    let aes192_cbc = LuksParams {
        spec: CipherSpec::new(CipherAlg::Aes192, CipherMode::Cbc, IvGenAlg::Plain64, None).unwrap(),
        ..LuksParams::default()
    };
    assert!(create_luks_area(&aes192_cbc, &MasterKey::random(24).unwrap(), b"x", 0).is_err());
}
