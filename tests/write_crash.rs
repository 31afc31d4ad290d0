//! `kill -9` of a read-write mount's daemon in the middle of fsync'd writes: no
//! corruption (`qemu-img check`), every fsync'd sector intact, internal snapshots and
//! backing files unchanged, and images with lazy refcounts left dirty and repaired by the
//! next read-write mount.
//!
//! Every mount is held by a `Mount` guard that unmounts on drop, also when a test panics.
//! Expected contents come from the operations the tests performed and from QEMU's
//! renderings, never from qcow2fs.

mod support;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::images::{create_base, create_image, create_over_base, populate, wp};
use support::*;

// ---------------------------------------------------------------------------------------
// kill -9 in the middle of fsync'd writes
// ---------------------------------------------------------------------------------------

/// Granularity of the crash checks: a sector holds one of the states it went through.
const SECTOR: u64 = 512;

/// One step of the crash workload, logged by the writer before it is issued.
enum Step {
    /// `data` written at `off` (zeros for a punched or zeroed range); `what` names it.
    Data {
        off: u64,
        data: Vec<u8>,
        what: &'static str,
    },
    /// An fsync that returned success: every step logged before it is durable.
    Synced,
}

/// Writes, punches and zero ranges on `path` until an operation fails (the daemon was
/// killed) or `max_ops` are done; about one operation in eight is followed by fsync.
/// Every step is logged before it is issued and every completed fsync after it returns.
/// Returns the error that stopped it.
fn crash_writer(
    path: PathBuf,
    seed: u64,
    cluster: u64,
    log: Arc<Mutex<Vec<Step>>>,
    synced: Arc<AtomicUsize>,
    max_ops: usize,
) -> Option<std::io::Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {} read-write: {e}", path.display()));
    let size = f.metadata().unwrap().len();
    let mut rng = Rng::new(seed);
    for _ in 0..max_ops {
        let (off, len, what) = match rng.below(100) {
            0..45 => {
                let len = rng.range(1, 5) * 4096;
                (rng.below((size - len) / 4096) * 4096, len, "write")
            }
            45..70 => {
                let len = rng.range(1, 5000);
                (rng.below(size - len), len, "write")
            }
            // Across cluster boundaries.
            70..85 => {
                let len = rng.range(cluster, 3 * cluster);
                (rng.below(size - len), len, "write")
            }
            85..93 => {
                let len = rng.range(1, 3 * cluster);
                (rng.below(size - len), len, "punch")
            }
            _ => {
                let len = rng.range(1, 3 * cluster);
                (rng.below(size - len), len, "zero range")
            }
        };
        let data = if what == "write" {
            rng.bytes(len as usize)
        } else {
            vec![0; len as usize]
        };
        log.lock().unwrap().push(Step::Data {
            off,
            data: data.clone(),
            what,
        });
        let r = match what {
            "write" => f.write_all_at(&data, off),
            "punch" => fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ),
            _ => fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len),
        };
        if let Err(e) = r {
            return Some(e);
        }
        if rng.chance(12) {
            if let Err(e) = f.sync_all() {
                return Some(e);
            }
            log.lock().unwrap().push(Step::Synced);
            synced.fetch_add(1, Ordering::SeqCst);
        }
    }
    None
}

/// What a crash may leave: `durable` is the disk after every step before the last
/// completed fsync; `later` the steps after it, each of which may or may not have reached
/// the image.
struct CrashModel {
    durable: Vec<u8>,
    later: Vec<Step>,
    fsyncs: usize,
}

impl CrashModel {
    fn new(before: Vec<u8>, log: Vec<Step>) -> CrashModel {
        let last = log.iter().rposition(|s| matches!(s, Step::Synced));
        let fsyncs = log.iter().filter(|s| matches!(s, Step::Synced)).count();
        let mut durable = before;
        let mut later = Vec::new();
        for (i, s) in log.into_iter().enumerate() {
            if last.is_some_and(|l| i < l) {
                if let Step::Data { off, data, .. } = &s {
                    durable[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                }
            } else if matches!(s, Step::Data { .. }) {
                later.push(s);
            }
        }
        CrashModel {
            durable,
            later,
            fsyncs,
        }
    }

    /// Every sector of `got` must hold a state it went through: a sector no step after the
    /// last fsync touched holds exactly its fsync'd bytes; a touched one its fsync'd bytes
    /// or its bytes after one of the later steps.
    fn assert_consistent(&self, what: &str, got: &[u8]) {
        assert_eq!(
            got.len(),
            self.durable.len(),
            "{what}: the disk size changed"
        );
        let mut states: BTreeMap<u64, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
        let mut cur = self.durable.clone();
        for (k, s) in self.later.iter().enumerate() {
            let Step::Data { off, data, .. } = s else {
                continue;
            };
            cur[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            for sector in off / SECTOR..(off + data.len() as u64).div_ceil(SECTOR) {
                let r = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
                states
                    .entry(sector)
                    .or_default()
                    .push((k + 1, cur[r].to_vec()));
            }
        }
        for sector in 0..got.len() as u64 / SECTOR {
            let r = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
            let want = &self.durable[r.clone()];
            if got[r.clone()] == *want {
                continue;
            }
            let Some(list) = states.get(&sector) else {
                let d = first_difference(want, &got[r]).unwrap();
                panic!(
                    "{what}: sector {sector} (byte {:#x}), written and fsync'd before the \
                     kill and not touched after, changed: {d}",
                    sector * SECTOR
                );
            };
            if !list.iter().any(|(_, v)| got[r.clone()] == **v) {
                let steps: Vec<String> = list
                    .iter()
                    .map(|(k, _)| match &self.later[k - 1] {
                        Step::Data { off, data, what } => {
                            format!("#{k} {what} {} at {off:#x}", data.len())
                        }
                        Step::Synced => unreachable!(),
                    })
                    .collect();
                panic!(
                    "{what}: sector {sector} (byte {:#x}) holds neither its fsync'd bytes nor \
                     the bytes of any later step touching it ({}); first difference from the \
                     fsync'd bytes: {}",
                    sector * SECTOR,
                    steps.join(", "),
                    first_difference(want, &got[r]).unwrap()
                );
            }
        }
    }
}

/// One crash: mount rw, run [`crash_writer`], SIGKILL the daemon once `fsyncs` fsyncs
/// have returned and a few milliseconds more have passed (the writer still writing),
/// remove the dead mount. Returns the model of what the image may now hold, and the
/// mount's stderr.
fn write_and_kill(
    image: &Path,
    mnt: &Path,
    options: &[&str],
    before: Vec<u8>,
    seed: u64,
    cluster: u64,
) -> (CrashModel, String) {
    let m = Mount::new(image, mnt, options);
    let stderr = m.stderr.clone();
    let log = Arc::new(Mutex::new(Vec::new()));
    let synced = Arc::new(AtomicUsize::new(0));
    let mut rng = Rng::new(seed ^ 0xc4a5);
    let fsyncs = rng.range(2, 8) as usize;
    let linger = Duration::from_millis(rng.below(30));
    let writer = {
        let (path, log, synced) = (m.disk(), log.clone(), synced.clone());
        std::thread::spawn(move || crash_writer(path, seed, cluster, log, synced, 20_000))
    };
    let reached = wait_until(Duration::from_secs(60), || {
        synced.load(Ordering::SeqCst) >= fsyncs || writer.is_finished()
    });
    std::thread::sleep(linger);
    let running = !writer.is_finished();
    m.kill9();
    let stopped = match writer.join() {
        Ok(e) => e,
        Err(p) => std::panic::resume_unwind(p),
    };
    assert!(
        reached && running,
        "the writer stopped before the kill ({stopped:?}) or made no {fsyncs} fsyncs in 60 s"
    );
    let e = stopped.expect("the writer finished every operation although the daemon was killed");
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::EIO)
        ),
        "after the kill, the writer's operation failed with an unexpected error: {e}"
    );
    let log = std::mem::take(&mut *log.lock().unwrap());
    (CrashModel::new(before, log), stderr)
}

/// The image that crash tests write: `size` bytes with data everywhere QEMU put it.
fn crash_image(dir: &Path, size: u64, opts: &str, cluster: u64) -> PathBuf {
    let image = create_image(dir, "img.qcow2", Some(size), opts, None);
    populate(&image, size, cluster);
    image
}

/// Rounds of write-and-kill on one image; after each kill `qemu-img check` finds no
/// corruption (leaks allowed) and QEMU's rendering holds every fsync'd block. With lazy
/// refcounts the image is dirty after a kill instead, and the next read-write mount
/// rebuilds it (saying so); the last one unmounts cleanly and the check is clean.
fn crash_rounds(name: &str, image: &Path, options: &[&str], cluster: u64, lazy: bool) {
    let dir = image_dir(image);
    let mnt = mountpoint(&dir, "mnt");
    let snapshots: Vec<(String, Vec<u8>)> = qemu_snapshots(image)
        .into_iter()
        .map(|(_, n)| {
            let data = qemu_snapshot_raw(image, &n);
            (n, data)
        })
        .collect();
    let mut model = qemu_raw(image);
    let mut options = options.to_vec();
    options.insert(0, "rw");
    for round in 0..3u64 {
        let seed = fnv(name) ^ round.wrapping_mul(0x9e37_79b9);
        let (crash, stderr) = write_and_kill(image, &mnt, &options, model, seed, cluster);
        let what = format!(
            "{name} round {round} (seed {seed:#x}, {} fsyncs)",
            crash.fsyncs
        );
        if lazy && round > 0 {
            assert!(
                stderr.contains("rebuilding its refcounts"),
                "{what}: the read-write mount of the dirty image did not say it rebuilt the \
                 refcounts; stderr: {stderr:?}"
            );
        }
        if lazy {
            assert!(
                dirty_flag(image),
                "{what}: a lazy_refcounts image written and killed must be left dirty"
            );
        } else {
            assert_no_corruption(image);
        }
        let got = qemu_raw(image);
        crash.assert_consistent(&format!("{what}: qemu-img convert after the kill"), &got);
        for (n, data) in &snapshots {
            let now = qemu_snapshot_raw(image, n);
            if let Some(d) = first_difference(data, &now) {
                panic!("{what}: snapshot {n} changed: {d}");
            }
        }
        model = got;
    }
    // A clean mount of the crashed image: it must read what QEMU reads, and leave an
    // image QEMU finds consistent.
    let m = Mount::new(image, &mnt, &options);
    if lazy {
        assert!(
            m.stderr.contains("not closed cleanly") && m.stderr.contains("rebuilding"),
            "{name}: mounting the dirty image rw did not report the rebuild: {:?}",
            m.stderr
        );
    }
    let mut disk = Disk::open(&m.disk(), model);
    disk.write(
        cluster / 2,
        &Rng::new(fnv(name)).bytes(3 * cluster as usize),
    );
    disk.fsync();
    disk.verify_through_mount();
    let model = std::mem::take(&mut disk.model);
    drop(disk);
    m.umount();
    if lazy {
        assert!(
            !dirty_flag(image),
            "{name}: still dirty after a clean unmount"
        );
        assert_check_clean(image);
    } else {
        assert_no_corruption(image);
    }
    assert_same_bytes(
        &format!("{name}: qemu-img convert after the last clean unmount"),
        &model,
        &qemu_raw(image),
    );
    // QEMU can go on writing it.
    qemu_io(image, &[wp(0x99, 4096, 8192)]);
    assert_no_corruption(image);
}

#[test]
fn kill9_mid_workload_small_clusters_small_cache() {
    let tmp = tempdir();
    // 4 KiB clusters and a cache of four L2 tables for eight: tables are written back
    // (evicted) at random moments of the workload.
    let image = crash_image(tmp.path(), 16 * M, "cluster_size=4k", 4 * K);
    crash_rounds(
        "kill9_small_clusters",
        &image,
        &["cache_size=8k"],
        4 * K,
        false,
    );
}

#[test]
fn kill9_mid_workload_lazy_refcounts_rebuilt_by_next_mount() {
    let tmp = tempdir();
    let image = crash_image(tmp.path(), 8 * M, "lazy_refcounts=on", 64 * K);
    crash_rounds("kill9_lazy_refcounts", &image, &[], 64 * K, true);
}

#[test]
fn kill9_mid_workload_internal_snapshot_unchanged() {
    let tmp = tempdir();
    let image = crash_image(tmp.path(), 8 * M, "", 64 * K);
    qemu_img(tmp.path(), &["snapshot", "-c", "before", "img.qcow2"]);
    qemu_io(&image, &[wp(0x77, 2 * M + 512, 700 * K)]);
    crash_rounds("kill9_snapshot", &image, &[], 64 * K, false);
}

#[test]
fn kill9_mid_workload_extended_l2_over_backing() {
    let tmp = tempdir();
    let dir = tmp.path();
    let base = create_base(dir, 8 * M, &[wp(0x5b, 0, 8 * M - 64 * K)]);
    let base_bytes = fs::read(&base).unwrap();
    let image = create_over_base(dir, "img.qcow2", 8 * M, "extended_l2=on,cluster_size=32k");
    populate(&image, 8 * M, 32 * K);
    crash_rounds("kill9_extended_l2", &image, &[], 32 * K, false);
    assert!(
        fs::read(&base).unwrap() == base_bytes,
        "the backing file changed"
    );
}
