//! Remote images: every corpus scenario read from a local HTTP server and from moto's S3
//! server, byte-identical to QEMU's renderings of the local files; the commands and
//! mounts (daemon mode) on URLs; the disk cache across mounts; merged and coalesced
//! requests; overlays and copy-on-read over remote images; the backing-name policy; and
//! faults (errors at mount time, retries, EIO with a log line, an object replaced during
//! a mount). Servers listen on 127.0.0.1 only and stop when their guards drop.

mod support;

use qcow2fs::ErrorKind;
use qcow2fs::block::{BlockDev, Chain, OpenOptions, open_chain};
use qcow2fs::storage::remote::RemoteOptions;
use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::corpus;
use support::images::{create_image, create_unchecked_over};
use support::remote::{Faults, FileServer, Moto, TlsProxy, key_of};
use support::*;

/// Library options with a private cache directory (and moto's endpoint for s3:// names).
fn remote_opts(cache: &Path, moto: Option<&Moto>) -> OpenOptions {
    OpenOptions {
        remote: RemoteOptions {
            cache_dir: Some(cache.to_path_buf()),
            s3_endpoint: moto.map(Moto::endpoint),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Options that give up quickly, for the fault tests.
fn impatient(cache: &Path, retries: u32) -> OpenOptions {
    let mut o = remote_opts(cache, None);
    o.remote.http.timeout = Duration::from_secs(1);
    o.remote.http.retries = retries;
    o
}

fn open_url(url: &str, opts: &OpenOptions) -> Chain {
    open_chain(Path::new(url), opts).unwrap_or_else(|e| panic!("opening {url}: {e:#}"))
}

fn open_err(url: &str, opts: &OpenOptions) -> qcow2fs::Error {
    match open_chain(Path::new(url), opts) {
        Ok(_) => panic!("opening {url} succeeded; expected an error"),
        Err(e) => e,
    }
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap()
}

/// Scenario `name` built in a temporary directory and served over HTTP: the directory,
/// the top image, the server and the top image's URL.
fn served_scenario(name: &str) -> (tempfile::TempDir, PathBuf, FileServer, String) {
    let (dir, top) = corpus::build(name);
    let server = FileServer::start(dir.path());
    let url = server.url(&canon(&top));
    (dir, top, server, url)
}

/// Scenario `name` built in a temporary directory and uploaded to a new private bucket:
/// the directory, the top image and its s3:// URL.
fn scenario_in_bucket(
    moto: &Moto,
    bucket: &str,
    name: &str,
) -> (tempfile::TempDir, PathBuf, String) {
    moto.create_bucket(bucket);
    let (dir, top) = corpus::build(name);
    moto.put_tree(bucket, dir.path());
    let url = s3_url(bucket, &top);
    (dir, top, url)
}

fn s3_url(bucket: &str, path: &Path) -> String {
    format!("s3://{bucket}/{}", key_of(&canon(path)))
}

/// What QEMU renders for a scenario: the active disk, each snapshot (by ID) and each
/// backing layer.
struct Expected {
    top: Vec<u8>,
    snapshots: Vec<(String, Vec<u8>)>,
    layers: Vec<Vec<u8>>,
}

fn expected(top: &Path) -> Expected {
    let snapshots = qemu_snapshots(top)
        .into_iter()
        .map(|(id, _)| {
            let raw = qemu_snapshot_raw(top, &id);
            (id, raw)
        })
        .collect();
    let layers = qemu_backing_chain_json(top)[1..]
        .iter()
        .map(|q| {
            qemu_raw_as(
                Path::new(q["filename"].as_str().unwrap()),
                q["format"].as_str(),
            )
        })
        .collect();
    Expected {
        top: qemu_raw(top),
        snapshots,
        layers,
    }
}

fn check_chain(what: &str, chain: &Chain, want: &Expected) {
    assert_same_bytes(
        &format!("{what}: active disk"),
        &want.top,
        &read_all(&*chain.top),
    );
    assert_same_bytes(
        &format!("{what}: active disk in reads of 65537 bytes"),
        &want.top,
        &read_chunked(&*chain.top, 65537),
    );
    let ours = chain.image().snapshots();
    let ids: Vec<&str> = ours.iter().map(|s| s.entry.id.as_str()).collect();
    let qids: Vec<&str> = want.snapshots.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(ids, qids, "{what}: snapshot IDs");
    for (s, (id, raw)) in ours.iter().zip(&want.snapshots) {
        assert_same_bytes(
            &format!("{what}: snapshot {id}"),
            raw,
            &read_all(&*chain.snapshot(s.key)),
        );
    }
    assert_eq!(
        chain.layers.len(),
        want.layers.len(),
        "{what}: number of layers"
    );
    for (i, (l, raw)) in chain.layers.iter().zip(&want.layers).enumerate() {
        assert_same_bytes(&format!("{what}: layer {}", i + 1), raw, &read_all(&**l));
    }
}

/// Every scenario of the corpus, uploaded to moto and served over HTTP, read through
/// the library from both, equals QEMU's renderings of the local files.
#[test]
fn every_scenario_from_http_and_s3_matches_qemu() {
    let moto = Moto::start();
    moto.create_public_bucket("corpus");
    let names: Vec<&str> = corpus::ALL.iter().map(|s| s.name).collect();
    run_each("remote rendering", &names, |name| {
        let (dir, top) = corpus::build(name);
        let want = expected(&top);
        let server = FileServer::start(dir.path());
        moto.put_tree("corpus", dir.path());
        let cache = tempdir();
        let opts = remote_opts(cache.path(), Some(&moto));
        let http = server.url(&canon(&top));
        check_chain(&format!("{name} over HTTP"), &open_url(&http, &opts), &want);
        let s3 = s3_url("corpus", &top);
        check_chain(&format!("{name} from S3"), &open_url(&s3, &opts), &want);
    });
}

/// `info`, `map` and `cat` on an s3:// URL with credentials from the environment agree
/// with QEMU on the local file; nothing secret appears in what they print.
#[test]
fn commands_on_an_s3_url() {
    let moto = Moto::start();
    let (_dir, top, url) = scenario_in_bucket(&moto, "cmds", "snapshots_of_overlay");
    let cache = tempdir();
    let run_cmd = |args: &[&str]| {
        let mut all: Vec<String> = vec![args[0].to_string()];
        all.extend([
            "-o".to_string(),
            format!(
                "s3_endpoint={},cache_dir={}",
                moto.endpoint(),
                cache.path().display()
            ),
        ]);
        all.extend(args[1..].iter().map(|s| s.to_string()));
        all.push(url.clone());
        let r = run_timeout(
            Command::new(qcow2fs_bin())
                .args(&all)
                .env("AWS_ACCESS_KEY_ID", "AKIDREMOTETEST")
                .env("AWS_SECRET_ACCESS_KEY", "SECRET-must-not-leak")
                .env("AWS_REGION", "us-east-1"),
            Duration::from_secs(60),
        );
        assert!(r.success(), "{}", r.describe());
        assert!(!r.all_output().contains("SECRET-must-not-leak"));
        r.stdout
    };
    assert_same_bytes("cat", &qemu_raw(&top), &run_cmd(&["cat"]));
    let id = &qemu_snapshots(&top)[0].0;
    assert_same_bytes(
        "cat --snapshot",
        &qemu_snapshot_raw(&top, id),
        &run_cmd(&["cat", "--snapshot", id]),
    );
    let info: serde_json::Value = serde_json::from_slice(&run_cmd(&["info", "--json"])).unwrap();
    let q = qemu_info_json(&top);
    for f in ["virtual-size", "cluster-size", "format", "backing-filename"] {
        assert_eq!(info[f], q[f], "info field {f}");
    }
    assert_eq!(info["filename"], url.as_str());
    assert_eq!(
        info["snapshots"].as_array().map(Vec::len),
        q["snapshots"].as_array().map(Vec::len)
    );
    let map: serde_json::Value = serde_json::from_slice(&run_cmd(&["map", "--json"])).unwrap();
    // Every field but the host offset.
    assert_same_map_fields("map", &qemu_map_json(&top), &map, &MAP_FIELDS[..7]);
}

/// `qcow2fs mount URL` in daemon mode, with `env` added to its environment.
fn mount_url(
    url: &str,
    mnt: &Path,
    options: &[&str],
    env: &[(&str, &str)],
) -> Result<Mount, Finished> {
    let mut args: Vec<OsString> = vec!["mount".into()];
    for o in options {
        args.extend(["-o".into(), OsString::from(o)]);
    }
    args.extend([OsString::from(url), mnt.as_os_str().to_owned()]);
    let mut cmd = Command::new(qcow2fs_bin());
    cmd.args(&args).current_dir(mnt.parent().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let r = run_timeout(&mut cmd, Duration::from_secs(60));
    if !r.success() {
        if mounts_at(mnt).is_empty() {
            drop(Mount::adopt(mnt));
        }
        return Err(r);
    }
    let mut m = Mount::adopt(mnt);
    assert!(m.is_mounted(), "{} exited 0 without a mount", r.command);
    m.stderr = r.stderr;
    Ok(m)
}

/// `qcow2fs mount URL` that must succeed.
fn mount_url_ok(url: &str, mnt: &Path, options: &[&str], env: &[(&str, &str)]) -> Mount {
    mount_url(url, mnt, options, env).unwrap_or_else(|r| panic!("{}", r.describe()))
}

/// `dir/NAME`, a qcow2 image of `size` bytes given one qemu-io command.
fn image_written(dir: &Path, name: &str, size: u64, cmd: &str) -> PathBuf {
    let img = create_image(dir, name, Some(size), "", None);
    qemu_io(&img, &[cmd]);
    img
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// A second mount of the same objects reads everything from the disk cache: the server
/// sees its HEADs and no GET. Without the cache it sees GETs again.
#[test]
fn second_mount_reads_from_the_disk_cache() {
    let (_dir, top, server, url) = served_scenario("snapshots_of_overlay");
    let want = qemu_raw(&top);
    let (id, _) = qemu_snapshots(&top)[0].clone();
    let want_snap = qemu_snapshot_raw(&top, &id);
    let work = tempdir();
    let cache = work.path().join("cache");
    let cache_opt = format!("cache_dir={}", cache.display());
    let raw = format!("{}.raw", stem(&top));
    let read_everything = |m: &Mount| {
        assert_same_bytes("mounted disk", &want, &read_file(&m.path(&raw)));
        let snaps = listing(&m.path("snapshots"));
        let first = snaps.iter().next().expect("a snapshot file").clone();
        assert_same_bytes(
            "mounted snapshot",
            &want_snap,
            &read_file(&m.path(&format!("snapshots/{first}"))),
        );
    };
    let mnt = mountpoint(work.path(), "m");
    let m = mount_url_ok(&url, &mnt, &[&cache_opt], &[]);
    read_everything(&m);
    m.umount();
    let first = server.counts();
    assert!(first.gets > 0, "the first mount fetched nothing: {first:?}");

    server.reset_counts();
    let m = mount_url_ok(&url, &mnt, &[&cache_opt], &[]);
    read_everything(&m);
    let status = qcow2fs_json(work.path(), &["status", "--json", mnt.to_str().unwrap()]);
    m.umount();
    let second = server.counts();
    assert_eq!(
        second.gets,
        0,
        "the second mount fetched again: {:?}",
        server.log()
    );
    assert_eq!(
        second.heads, 2,
        "one HEAD per object (image and backing file)"
    );
    let remote = status["remote"]
        .as_array()
        .expect("remote statistics in status");
    assert_eq!(remote.len(), 2, "{status}");
    assert!(
        remote
            .iter()
            .all(|r| r["requests"] == 1 && r["cached_on_disk"] == true),
        "{status}"
    );
    assert!(remote[0]["disk_hits"].as_u64().unwrap() > 0, "{status}");
    let mode =
        |p: &Path| std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(p).unwrap()) & 0o777;
    assert_eq!(mode(&cache), 0o700);
    for f in listing(&cache) {
        assert_eq!(mode(&cache.join(&f)), 0o600, "{f}");
    }

    server.reset_counts();
    let m = mount_url_ok(&url, &mnt, &["cache_max=0"], &[]);
    read_everything(&m);
    m.umount();
    assert!(
        server.counts().gets > 0,
        "without the cache the data must be fetched"
    );
}

/// At open, the header, L1 table and snapshot table come in at most two requests after
/// the HEAD; a sequential reader's requests grow; concurrent readers of one block wait
/// for one fetch.
#[test]
fn few_large_requests() {
    let work = tempdir();
    let img = image_written(work.path(), "big.qcow2", 64 * M, "write -P 0x5a 0 48M");
    qemu_img(work.path(), &["snapshot", "-c", "s1", "big.qcow2"]);
    qemu_io(&img, &["write -P 0x33 1M 1M".to_string()]);
    let server = FileServer::start(work.path());
    let cache = tempdir();
    let chain = open_url(&server.url(&canon(&img)), &remote_opts(cache.path(), None));
    let at_open = server.counts();
    assert_eq!(at_open.heads, 1);
    assert!(
        at_open.gets <= 2,
        "open took {} GETs: {:?}",
        at_open.gets,
        server.log()
    );

    server.reset_counts();
    let mut buf = vec![0u8; 128 << 10];
    let mut off = 0;
    while off < 32 * M {
        chain.top.read_at(&mut buf, off).unwrap();
        off += buf.len() as u64;
    }
    let seq = server.counts();
    let naive = 32 * M / (256 << 10);
    assert!(
        seq.gets * 6 <= naive,
        "sequential 32 MiB took {} GETs (blocks of 256 KiB: {naive}): {:?}",
        seq.gets,
        server.log()
    );

    // Eight readers of one block not yet fetched: one GET.
    server.reset_counts();
    server.set_faults(Faults {
        delay: Duration::from_millis(300),
        ..Default::default()
    });
    let chain = Arc::new(chain);
    let off = 44 * M + 12345;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = chain.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                c.top.read_at(&mut b, off).unwrap();
                b
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().iter().all(|&b| b == 0x5a));
    }
    assert_eq!(server.counts().gets, 1, "{:?}", server.log());
}

/// Throwaway overlays over an image in a bucket: writes land in the local overlay, the
/// object is untouched; credentials come from the environment and show nowhere (log,
/// the daemon's command line, status).
#[test]
fn overlay_over_an_image_in_a_bucket() {
    let moto = Moto::start();
    let (_dir, top, url) = scenario_in_bucket(&moto, "evidence", "compressed_convert_zlib_64k");
    let original = std::fs::read(&top).unwrap();
    let work = tempdir();
    let log = work.path().join("daemon.log");
    let mnt = mountpoint(work.path(), "m");
    let secret = "SECRET-overlay-must-not-leak";
    let opts = [
        format!("overlay={}", work.path().display()),
        format!("s3_endpoint={}", moto.endpoint()),
        format!("cache_dir={}", work.path().join("cache").display()),
        format!("log={}", log.display()),
    ];
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDOVERLAYTEST"),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", "us-east-1"),
        ("RUST_LOG", "debug"),
    ];
    let m = mount_url_ok(&url, &mnt, &opts, &env);
    let disk = m.path(&format!("{}.raw", stem(&top)));
    let mut want = qemu_raw(&top);
    assert_same_bytes("overlay before writes", &want, &read_file(&disk));
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let data = vec![0xa5u8; 70_000];
    f.write_all_at(&data, 100_000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    want[100_000..170_000].copy_from_slice(&data);
    assert_same_bytes("overlay after writes", &want, &read_file(&disk));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", m.daemon_pid())).unwrap();
    let status = qcow2fs(work.path(), &["status", mnt.to_str().unwrap()]);
    m.umount();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    for (what, text) in [
        ("the log", logged.as_bytes()),
        ("the command line", &cmdline[..]),
        ("status", &status[..]),
    ] {
        let text = String::from_utf8_lossy(text);
        assert!(!text.contains(secret), "{what} shows the secret: {text}");
        assert!(
            !text.contains("X-Amz-Signature"),
            "{what} shows a signature: {text}"
        );
    }
    assert!(
        String::from_utf8_lossy(&status).contains("remote s3://evidence/"),
        "{}",
        String::from_utf8_lossy(&status)
    );
    let r = moto.get("evidence", &key_of(&canon(&top)));
    assert!(r == original, "the object in the bucket changed");
    // The bucket is private: without credentials, a clear error at mount time.
    let r = mount_url(&url, &mnt, &opts, &[("AWS_PROFILE", "none")])
        .map(|_| ())
        .unwrap_err();
    let msg = r.stderr.trim();
    assert!(
        msg.contains("403") && msg.contains("no AWS credentials") && msg.contains(&url),
        "{msg}"
    );
}

/// A local image whose backing file is a URL (`qemu-img create -u -b URL`): refused
/// unless `backing=follow-remote`; with it, copy-on-read fills the local image from the
/// server until it stands alone.
#[test]
fn copy_on_read_from_a_remote_backing_file() {
    let (_dir, base, _server, url) = served_scenario("compressed_write_zstd_64k");
    let want = qemu_raw(&base);
    let work = tempdir();
    let top = work.path().join("top.qcow2");
    let size = want.len().to_string();
    create_unchecked_over(work.path(), "top.qcow2", &size, &url, "qcow2");
    let mnt = mountpoint(work.path(), "m");
    assert_mount_refused(&top, &mnt, &["rw,copy-on-read"], &["follow-remote"]);
    let cache = format!("cache_dir={}", work.path().join("cache").display());
    let m = Mount::new(
        &top,
        &mnt,
        &["rw,copy-on-read,backing=follow-remote", &cache],
    );
    assert_same_bytes("copy-on-read", &want, &read_file(&m.disk()));
    m.umount();
    let alone = work.path().join("alone.qcow2");
    std::fs::copy(&top, &alone).unwrap();
    qemu_img(
        work.path(),
        &["rebase", "-q", "-u", "-b", "", "alone.qcow2"],
    );
    assert_check_clean(&alone);
    assert_same_bytes(
        "the top image alone after copy-on-read",
        &want,
        &qemu_raw(&alone),
    );
}

/// Names in images: remote images resolve names on their own host and never reach
/// local files unless allowed; another host is refused; `rw` on a URL is refused.
#[test]
fn backing_name_policy() {
    let a = tempdir();
    let b = tempdir();
    let base = image_written(b.path(), "base.qcow2", M, "write -P 0x77 0 64k");
    let base_abs = canon(&base);
    let top = a.path().join("top.qcow2");
    let base_name = base_abs.to_string_lossy().into_owned();
    create_image(a.path(), "top.qcow2", None, "", Some((&base_name, "qcow2")));
    // The server serves only a/: the absolute name resolves on the server and is missing.
    let server = FileServer::start(a.path());
    let url = server.url(&canon(&top));
    let cache = tempdir();
    let opts = remote_opts(cache.path(), None);
    let e = open_err(&url, &opts);
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:#}");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("404") && msg.contains(&server.url(&base_abs)),
        "{msg}"
    );
    let mut local = remote_opts(cache.path(), None);
    local.follow_local = true;
    let chain = open_url(&url, &local);
    assert_same_bytes("follow-local", &qemu_raw(&top), &read_all(&*chain.top));
    assert_eq!(chain.layers[0].info().path, base_abs);

    // Another host.
    let other = a.path().join("other.qcow2");
    create_unchecked_over(
        a.path(),
        "other.qcow2",
        "1M",
        "http://127.0.0.2:9/base.qcow2",
        "qcow2",
    );
    let msg = format!("{:#}", open_err(&server.url(&canon(&other)), &opts));
    assert!(msg.contains("another host"), "{msg}");

    // rw on a URL.
    let mut rw = remote_opts(cache.path(), None);
    rw.image.writable = true;
    let e = open_err(&url, &rw);
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e:#}");
    assert!(format!("{e:#}").contains("read-only"), "{e:#}");
}

/// 404, 403 and a server that ignores Range are one-line errors at open; 500s, resets
/// and short bodies are retried; once retries are used up a read fails and says which
/// range of which URL.
#[test]
fn faults_at_open_and_retries() {
    let (dir, top, server, url) = served_scenario("zero_clusters");
    let want = qemu_raw(&top);
    let cache = tempdir();

    let missing = server.url(&canon(dir.path()).join("missing.qcow2"));
    let e = open_err(&missing, &impatient(cache.path(), 1));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = format!("{e:#}");
    assert!(
        msg.contains("404") && msg.contains(&missing) && !msg.contains('\n'),
        "{msg}"
    );

    server.set_faults(Faults {
        forbid: true,
        ..Default::default()
    });
    let e = open_err(&url, &impatient(cache.path(), 1));
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e:#}");

    server.set_faults(Faults {
        ignore_range: true,
        ..Default::default()
    });
    let msg = format!("{:#}", open_err(&url, &impatient(cache.path(), 1)));
    assert!(msg.contains("ignored the Range"), "{msg}");

    // Transient faults within the retries: the reads succeed.
    server.set_faults(Faults {
        error_500: 2,
        reset: 1,
        short: 1,
        ..Default::default()
    });
    let c = tempdir();
    let chain = open_url(&url, &impatient(c.path(), 4));
    assert_same_bytes("after retried faults", &want, &read_all(&*chain.top));

    // Persistent 500s: the read fails with EIO-kind error naming the range.
    let c = tempdir();
    server.set_faults(Faults::default());
    let chain = open_url(&url, &impatient(c.path(), 2));
    server.set_faults(Faults {
        error_500: 1000,
        ..Default::default()
    });
    let mut buf = vec![0u8; 4096];
    let e = chain
        .top
        .read_at(&mut buf, want.len() as u64 - 4096)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let msg = format!("{e:#}");
    assert!(msg.contains("HTTP 500") && msg.contains("bytes="), "{msg}");

    // A server slower than the timeout.
    let c = tempdir();
    server.set_faults(Faults::default());
    let chain = open_url(&url, &impatient(c.path(), 1));
    server.set_faults(Faults {
        delay: Duration::from_millis(2500),
        ..Default::default()
    });
    let e = chain
        .top
        .read_at(&mut buf, want.len() as u64 - 4096)
        .unwrap_err();
    assert!(format!("{e:#}").contains("timed out"), "{e:#}");
    server.set_faults(Faults::default());
}

/// An object replaced during a mount: the next fetch sees another version, and from
/// then on every read fails (even of blocks already in memory), with a log line; this
/// holds whether the server honours If-Match or not.
#[test]
fn object_replaced_during_a_mount() {
    for ignore_if_match in [false, true] {
        let work = tempdir();
        let img = image_written(work.path(), "disk.qcow2", 16 * M, "write -P 0x11 0 16M");
        let server = FileServer::start(work.path());
        let cache = tempdir();
        let chain = open_url(&server.url(&canon(&img)), &impatient(cache.path(), 1));
        let mut buf = vec![0u8; 4096];
        chain.top.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x11));
        // Replace the object (a new file under the same name).
        let tmp = image_written(work.path(), "new.qcow2", 16 * M, "write -P 0x22 0 16M");
        std::fs::rename(&tmp, &img).unwrap();
        server.set_faults(Faults {
            ignore_if_match,
            ..Default::default()
        });
        let e = chain.top.read_at(&mut buf, 12 * M).unwrap_err();
        assert!(format!("{e:#}").contains("changed"), "{e:#}");
        let e = chain.top.read_at(&mut buf, 0).unwrap_err();
        assert!(
            format!("{e:#}").contains("changed"),
            "cached blocks too: {e:#}"
        );
    }
}

/// Through a mount (daemon mode): a failing server gives EIO to the reader and a log
/// line naming the URL and the range; reads already cached still work.
#[test]
fn mount_reports_eio_and_logs_the_range() {
    let work = tempdir();
    let top = image_written(work.path(), "disk.qcow2", 16 * M, "write -P 0x3c 0 16M");
    let want = qemu_raw(&top);
    let server = FileServer::start(work.path());
    let url = server.url(&canon(&top));
    let log = work.path().join("daemon.log");
    let mnt = mountpoint(work.path(), "m");
    let opts = [
        format!("log={}", log.display()),
        "cache_max=0".to_string(),
        "remote_retries=1,remote_timeout=2".to_string(),
    ];
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let m = mount_url_ok(&url, &mnt, &opts, &[]);
    let f = std::fs::File::open(m.path(&format!("{}.raw", stem(&top)))).unwrap();
    let head = pread_full(&f, 0, 4096).unwrap();
    assert_same_bytes("first block", &want[..4096], &head);
    server.set_faults(Faults {
        error_500: 1000,
        ..Default::default()
    });
    let end = want.len() as u64 - 8192;
    let e = pread_full(&f, end, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    server.set_faults(Faults::default());
    drop(f);
    m.umount();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let line = logged
        .lines()
        .find(|l| l.contains("HTTP 500"))
        .unwrap_or_else(|| panic!("no log line about the failure:\n{logged}"));
    assert!(line.contains(&url) && line.contains("bytes="), "{line}");
}

/// https: certificates are verified (a self-signed one is refused at open), and
/// `ca_file` trusts a private CA.
#[test]
fn https_verifies_certificates() {
    let (dir, top) = corpus::build("compressed_v2");
    let server = FileServer::start(dir.path());
    let work = tempdir();
    let tls = TlsProxy::start(work.path(), server.port());
    let url = format!("https://127.0.0.1:{}{}", tls.port, canon(&top).display());
    let cache = tempdir();
    let e = open_err(&url, &impatient(cache.path(), 0));
    let msg = format!("{e:#}");
    assert!(msg.contains("TLS") && msg.contains(&url), "{msg}");
    let mut opts = remote_opts(cache.path(), None);
    opts.remote.http.ca_file = Some(tls.cert.clone());
    let chain = open_url(&url, &opts);
    assert_same_bytes("over https", &qemu_raw(&top), &read_all(&*chain.top));
}
