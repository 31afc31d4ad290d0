//! Building blocks for scenario images: a [`Ctx`] that runs qemu-img and qemu-io in a
//! scenario's directory, and qemu-io command builders that write a fresh pattern file for
//! every write.
//!
//! Data is written from pattern files (`qemu-io write -s`), each different, with a prime
//! period and a small alphabet (so it still compresses), at unaligned offsets and lengths:
//! a cluster read from the wrong place, or shifted by a few bytes, cannot match by luck.

use super::bytes::fnv;
pub use super::bytes::{K, M, Rng};
use super::qemu::{qemu_img, qemu_io, qemu_io_crash};
use std::path::{Path, PathBuf};

const PERIODS: [usize; 12] = [509, 521, 523, 541, 547, 557, 563, 569, 571, 577, 587, 593];

/// How a scenario builds its images: the directory, qemu-img/qemu-io wrappers that run
/// there, and qemu-io command builders that use a fresh pattern file for every write.
pub struct Ctx {
    dir: PathBuf,
    salt: u64,
    patterns: u32,
}

impl Ctx {
    pub fn new(dir: &Path, name: &str) -> Ctx {
        std::fs::create_dir_all(dir.join("patterns")).unwrap();
        Ctx {
            dir: dir.to_path_buf(),
            salt: fnv(name),
            patterns: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `rel` inside the scenario directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn mkdir(&self, rel: &str) {
        std::fs::create_dir_all(self.path(rel)).unwrap();
    }

    /// `qemu-img args` in the scenario directory.
    pub fn img(&self, args: &[&str]) -> String {
        qemu_img(&self.dir, args)
    }

    /// `qemu-img create -f qcow2 [-o opts] rel size`.
    pub fn create(&self, rel: &str, size: u64, opts: &str) -> PathBuf {
        create_image(&self.dir, rel, Some(size), opts, None)
    }

    /// `qemu-img create -f qcow2 -b backing -F backing_fmt [-o opts] rel [size]`; `backing`
    /// is stored as given (relative names are relative to `rel`'s directory).
    pub fn overlay(
        &self,
        rel: &str,
        backing: &str,
        backing_fmt: &str,
        size: Option<u64>,
        opts: &str,
    ) -> PathBuf {
        create_image(&self.dir, rel, size, opts, Some((backing, backing_fmt)))
    }

    /// `base.qcow2` of `size` bytes created with `opts`, written whole in pieces of `piece`
    /// bytes, each with its own pattern.
    pub fn filled_base(&mut self, size: u64, opts: &str, piece: u64) -> PathBuf {
        let base = self.create("base.qcow2", size, opts);
        let c = self.fill(0, size, piece);
        self.io("base.qcow2", &c);
        base
    }

    /// `top.qcow2` over `base.qcow2` (qcow2), the overlay most scenarios build: see
    /// [`Ctx::overlay`].
    pub fn top_over_base(&self, size: Option<u64>, opts: &str) -> PathBuf {
        self.overlay("top.qcow2", "base.qcow2", "qcow2", size, opts)
    }

    /// Runs qemu-io commands on image `rel`.
    pub fn io(&self, rel: &str, cmds: &[String]) {
        qemu_io(&self.path(rel), cmds);
    }

    /// Runs qemu-io commands on image `rel` and kills it with `abort` at the end.
    pub fn io_crash(&self, rel: &str, cmds: &[String]) {
        let mut cmds = cmds.to_vec();
        cmds.push("abort".into());
        qemu_io_crash(&self.path(rel), &cmds);
    }

    /// `qemu-img resize` (shrinking allowed).
    pub fn resize(&self, rel: &str, size: u64) {
        let size = size.to_string();
        self.img(&["resize", "-q", "--shrink", "-f", "qcow2", rel, &size]);
    }

    /// `qemu-img snapshot -c name rel`.
    pub fn snapshot(&self, rel: &str, name: &str) {
        self.img(&["snapshot", "-c", name, rel]);
    }

    /// `qemu-img snapshot -d name rel` (qemu-img looks the snapshot up by name only).
    pub fn delete_snapshot(&self, rel: &str, name: &str) {
        self.img(&["snapshot", "-d", name, rel]);
    }

    fn new_pattern(&mut self, period: usize, alphabet: usize) -> String {
        self.patterns += 1;
        let n = self.patterns;
        let mut rng = Rng::new(self.salt ^ (n as u64).wrapping_mul(0x1000_0000_01b3));
        let symbols: Vec<u8> = (0..alphabet)
            .map(|_| match rng.below(256) as u8 {
                0 => 0x5a,
                b => b,
            })
            .collect();
        let bytes: Vec<u8> = (0..period)
            .map(|_| symbols[rng.below(alphabet as u64) as usize])
            .collect();
        // Absolute: qemu-io runs in the directory of the image it writes.
        let path = self.path(&format!("patterns/{n}.bin"));
        std::fs::write(&path, bytes).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// A fresh compressible pattern file (prime period ~550, 16 symbols).
    fn pattern(&mut self) -> String {
        let period = PERIODS[self.patterns as usize % PERIODS.len()];
        self.new_pattern(period, 16)
    }

    /// `write` of a fresh pattern at `off`, `len` bytes (any alignment).
    pub fn w(&mut self, off: u64, len: u64) -> String {
        format!("write -s {} {off} {len}", self.pattern())
    }

    /// A compressed `write -c` (whole clusters, or the image's partial last cluster).
    pub fn wc(&mut self, off: u64, len: u64) -> String {
        format!("write -c -s {} {off} {len}", self.pattern())
    }

    /// A compressed write of data that does not compress (period 4093, 256 symbols): QEMU
    /// then stores the cluster uncompressed, at least for small clusters.
    pub fn wc_incompressible(&mut self, off: u64, len: u64) -> String {
        format!("write -c -s {} {off} {len}", self.new_pattern(4093, 256))
    }

    /// A write into the VM-state area (`write -b`, which needs whole sectors), which no
    /// disk view may show.
    pub fn wb(&mut self, off: u64, len: u64) -> String {
        assert!(
            off.is_multiple_of(512) && len.is_multiple_of(512),
            "write -b needs sector-aligned offset and length"
        );
        format!("write -b -s {} {off} {len}", self.pattern())
    }

    /// Writes covering `[start, end)` in pieces of `piece` bytes, each with its own pattern.
    pub fn fill(&mut self, start: u64, end: u64, piece: u64) -> Vec<String> {
        let mut cmds = Vec::new();
        let mut off = start;
        while off < end {
            let n = piece.min(end - off);
            cmds.push(self.w(off, n));
            off += n;
        }
        cmds
    }

    /// A raw file of `size` bytes mixing text-like (compressible, position-dependent),
    /// random (incompressible), zero and single-byte regions of irregular lengths.
    pub fn source(&mut self, rel: &str, size: u64) -> PathBuf {
        const WORDS: [&str; 12] = [
            "qcow2",
            "cluster",
            "refcount",
            "snapshot",
            "backing",
            "zero",
            "L2",
            "guest",
            "host",
            "compressed",
            "subcluster",
            "bitmap",
        ];
        let mut rng = Rng::new(self.salt ^ 0x5eed);
        let size = size as usize;
        let mut data: Vec<u8> = Vec::with_capacity(size + 70_000);
        while data.len() < size {
            let end = data.len() + 700 + rng.below(40_000) as usize;
            match rng.below(8) {
                0..=3 => {
                    while data.len() < end {
                        let line = format!(
                            "{:010} {} {} {}\n",
                            data.len(),
                            WORDS[rng.below(12) as usize],
                            WORDS[rng.below(12) as usize],
                            rng.below(1000)
                        );
                        data.extend_from_slice(line.as_bytes());
                    }
                }
                4 => {
                    while data.len() < end {
                        data.extend_from_slice(&rng.next_u64().to_le_bytes());
                    }
                }
                5 => data.resize(end, 0),
                _ => {
                    let b = rng.below(255) as u8 + 1;
                    data.resize(end, b);
                }
            }
        }
        data.truncate(size);
        let p = self.path(rel);
        std::fs::write(&p, data).unwrap();
        p
    }

    /// `qemu-img convert -f raw -O qcow2 [-c] -o opts src dst`.
    pub fn convert(&self, src: &str, dst: &str, compress: bool, opts: &str) -> PathBuf {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if compress {
            args.push("-c");
        }
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([src, dst]);
        self.img(&args);
        self.path(dst)
    }

    /// Overwrites bytes of a file directly (not through QEMU).
    pub fn poke(&self, rel: &str, off: u64, bytes: &[u8]) {
        super::patch::patch(&self.path(rel), off, bytes);
    }
}

/// `write -z`: zero flag (v3), keeping an allocated cluster (ZERO_ALLOC).
pub fn z(off: u64, len: u64) -> String {
    format!("write -z {off} {len}")
}

/// `write -z -u`: zero flag with unmapping (ZERO_PLAIN).
pub fn zu(off: u64, len: u64) -> String {
    format!("write -z -u {off} {len}")
}

pub fn discard(off: u64, len: u64) -> String {
    format!("discard {off} {len}")
}

/// `qemu-img create -q -f qcow2 [-o OPTS] [-b BACKING -F FMT] NAME [SIZE]` in `dir` (the
/// size may be left to the backing file); returns `dir/NAME`.
pub fn create_image(
    dir: &Path,
    name: &str,
    size: Option<u64>,
    opts: &str,
    backing: Option<(&str, &str)>,
) -> PathBuf {
    let size = size.map(|s| s.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some((b, fmt)) = backing {
        args.extend(["-b", b, "-F", fmt]);
    }
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(name);
    args.extend(size.as_deref());
    qemu_img(dir, &args);
    dir.join(name)
}

/// `qemu-img create -q -f qcow2 -u -b BACKING -F FMT NAME SIZE` in `dir`: an image over a
/// backing file that is not opened (a URL, a file the test may not read); returns
/// `dir/NAME`.
pub fn create_unchecked_over(
    dir: &Path,
    name: &str,
    size: &str,
    backing: &str,
    fmt: &str,
) -> PathBuf {
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, name, size,
        ],
    );
    dir.join(name)
}

/// `qemu-img create -q -f qcow2 --object SECRET -o OPTS NAME SIZE` in `dir`: an
/// encrypted image whose key is the secret object; returns `dir/NAME`.
pub fn create_encrypted(dir: &Path, name: &str, size: &str, secret: &str, opts: &str) -> PathBuf {
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "--object", secret, "-o", opts, name, size,
        ],
    );
    dir.join(name)
}

/// `dir/base.qcow2` of `size` bytes, written by qemu-io with `cmds`.
pub fn create_base(dir: &Path, size: u64, cmds: &[String]) -> PathBuf {
    let base = create_image(dir, "base.qcow2", Some(size), "", None);
    qemu_io(&base, cmds);
    base
}

/// `dir/NAME` of `size` bytes, created with `opts` over `dir/base.qcow2` (qcow2).
pub fn create_over_base(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
    create_image(dir, name, Some(size), opts, Some(("base.qcow2", "qcow2")))
}

/// A qemu-io `write` of the byte `pattern` (no pattern file: for tests that only need
/// distinct, recognisable bytes).
pub fn wp(pattern: u8, off: u64, len: u64) -> String {
    format!("write -P {pattern:#x} {off} {len}")
}

/// Data, zero clusters and a tail cluster written by QEMU, spread over a disk of `size`
/// bytes with clusters of `cluster` bytes.
pub fn populate(image: &Path, size: u64, cluster: u64) {
    let c = cluster.max(4096);
    qemu_io(
        image,
        &[
            wp(0x11, 0, size / 4),
            wp(0x22, size / 2 + c / 2, (2 * c).min(size / 8)),
            z(size / 4 + c, 2 * c),
            wp(0x33, size - c, c),
        ],
    );
}
