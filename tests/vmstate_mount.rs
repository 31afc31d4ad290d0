//! A snapshot's VM state through real mounts: the QEMU fixtures of `tests/data/vmstate`
//! (`NAME.vmstate`, `NAME.mem`, `NAME.ram/`, their holes, extended attributes, `cat`,
//! `info`, Volatility 3 on the memory file), streams built by the tests written into the
//! VM-state area as savevm writes it (RAM above 4 GiB, every kind of page, compressed
//! clusters), hostile VM state, and snapshots deleted and taken while mounted.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use support::images::create_image;
use support::vmfixtures::{check_physical_memory, expected_hash, facts, fixture_unxz, sha256_hex};
use support::vmstream::{Guest, PS, Page};
use support::*;

const FIXTURES: [&str; 3] = ["A", "B", "C"];
const GIB: u64 = 1 << 30;
const VGA: std::ops::Range<usize> = 0xa0000..0xc0000;

/// Fixture `f`'s image, unpacked into `dir`.
fn fixture_image(dir: &Path, f: &str) -> PathBuf {
    let img = dir.join(format!("{f}.qcow2"));
    fs::write(&img, fixture_unxz(f, "disk.qcow2.xz")).unwrap();
    img
}

/// A RAM block's file name: the block name escaped as snapshot names are.
fn block_file(name: &str) -> String {
    format!("{}.raw", escape_snapshot_name(name))
}

/// Checks the holes of `path` against its bytes `content`: holes read as zeros, every
/// non-zero byte is in data, and the data adds up to `data_bytes`, as does st_blocks.
fn check_holes(what: &str, path: &Path, content: &[u8], data_bytes: u64) {
    let extents = data_extents(path);
    let total: u64 = extents.iter().map(|(d, h)| h - d).sum();
    assert_eq!(
        total, data_bytes,
        "{what}: bytes of data per SEEK_DATA/SEEK_HOLE"
    );
    let mut prev = 0;
    for &(d, h) in extents.iter().chain([(content.len() as u64, 0)].iter()) {
        let hole = &content[prev as usize..d as usize];
        assert!(
            hole.iter().all(|&b| b == 0),
            "{what}: the hole [{prev:#x}, {d:#x}) holds non-zero bytes"
        );
        prev = h;
    }
    let md = counted_metadata(path);
    assert_eq!(md.blocks() * 512, data_bytes, "{what}: st_blocks");
}

/// `getfattr -d` of `path` (the `user.` attributes it lists by default), as name → value.
fn getfattr(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let out = run(
        Path::new("/"),
        "getfattr",
        &[
            "-d",
            "-e",
            "hex",
            "--absolute-names",
            path.to_str().unwrap(),
        ],
    );
    let text = out.stdout_text();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let hex = v.strip_prefix("0x").unwrap_or_else(|| panic!("{l}", l = v));
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (k.to_string(), bytes)
        })
        .collect()
}

fn text_attrs(m: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    m.iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// A snapshot date as the test expects it: `date -u` of its seconds, and nanoseconds.
fn utc_date(sec: i64, nsec: i64) -> String {
    let out = run(
        Path::new("/"),
        "date",
        &["-u", "-d", &format!("@{sec}"), "+%Y-%m-%dT%H:%M:%S"],
    );
    format!("{}.{nsec:09}Z", out.stdout_text().trim())
}

/// The attributes every file of snapshot `snap` (from `qemu-img info`) must carry;
/// `disk_size` is the size of QEMU's rendering of it.
fn snapshot_attrs(image: &Path, snap: &Value, disk_size: usize) -> BTreeMap<String, String> {
    let n = |k: &str| snap[k].as_i64().unwrap();
    BTreeMap::from(
        [
            ("image", absolute(image).display().to_string()),
            ("snapshot.id", snap["id"].as_str().unwrap().to_string()),
            ("snapshot.name", snap["name"].as_str().unwrap().to_string()),
            ("snapshot.date", utc_date(n("date-sec"), n("date-nsec"))),
            (
                "snapshot.vm-clock",
                format!("{}.{:09}", n("vm-clock-sec"), n("vm-clock-nsec")),
            ),
            ("snapshot.vm-state-size", n("vm-state-size").to_string()),
            ("snapshot.disk-size", disk_size.to_string()),
        ]
        .map(|(k, v)| (format!("user.qcow2.{k}"), v)),
    )
    .into_iter()
    .chain(
        snap.get("icount")
            .map(|i| ("user.qcow2.snapshot.icount".to_string(), i.to_string())),
    )
    .collect()
}

// ---------------------------------------------------------------------------------------
// 1. The QEMU fixtures
// ---------------------------------------------------------------------------------------

fn check_fixture(f: &str) {
    let d = tempdir();
    let img = fixture_image(d.path(), f);
    let facts = facts(f);
    let info = qemu_info_json(&img);
    let snap = &info["snapshots"][0];
    assert_eq!(snap["name"], "running");
    let vm_size = snap["vm-state-size"].as_u64().unwrap();
    let ram = facts["ram_bytes"].as_u64().unwrap();
    let blocks = facts["vmstate"]["ram_blocks"].as_array().unwrap().clone();
    let log = d.path().join("mount.log");
    let opt = format!("log={}", log.display());
    let m = Mount::new(&img, &mountpoint(d.path(), "mnt"), &[&opt]);

    // Listing and stat do not build the page index: until a read, st_blocks is the
    // mount's estimate (one block more than the size).
    let mem_path = m.path("snapshots/running.mem");
    for _ in 0..3 {
        let md = fs::metadata(&mem_path).unwrap();
        assert_eq!(
            md.blocks(),
            md.len().div_ceil(512) + 1,
            "{f}: st_blocks before a read"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !log_text(&log).contains("indexed"),
        "{f}: {}",
        log_text(&log)
    );
    assert_eq!(
        listing(&m.path("snapshots")),
        BTreeSet::from(
            [
                "running.raw",
                "running.vmstate",
                "running.mem",
                "running.ram"
            ]
            .map(String::from)
        ),
        "{f}: snapshots/"
    );
    let names: BTreeSet<String> = blocks
        .iter()
        .map(|b| block_file(b["name"].as_str().unwrap()))
        .collect();
    assert_eq!(listing(&m.path("snapshots/running.ram")), names, "{f}");

    // The stream: exactly vm_state_size bytes, as QEMU reads it back.
    let vmstate = fs::read(m.path("snapshots/running.vmstate")).unwrap();
    assert_eq!(vmstate.len() as u64, vm_size, "{f}");
    assert_eq!(
        sha256_hex(&vmstate),
        expected_hash(f, "vmstate.sha256"),
        "{f}"
    );
    assert_same_bytes(
        &format!("{f}: running.vmstate vs qemu-io read -b"),
        &qemu_vmstate(&img, "running", vm_size),
        &vmstate,
    );

    // The memory: the pc.ram block rebuilt, and pmemsave's dump outside the VGA window.
    let mem = fs::read(&mem_path).unwrap();
    assert!(
        log_text(&log).contains("VM state indexed"),
        "{f}: built by the read"
    );
    assert_eq!(
        mem.len() as u64,
        ram,
        "{f}: small guests map all RAM below 4 GiB"
    );
    assert_eq!(sha256_hex(&mem), expected_hash(f, "pc.ram.sha256"), "{f}");
    let dump = fixture_unxz(f, "ram.bin.xz");
    assert_eq!(sha256_hex(&dump), expected_hash(f, "ram.sha256"));
    assert!(mem[..VGA.start] == dump[..VGA.start], "{f}: below 0xa0000");
    assert!(mem[VGA.end..] == dump[VGA.end..], "{f}: above 0xc0000");
    assert!(mem[VGA] != dump[VGA], "{f}: the VGA window should differ");

    // The boot sector stamped every page of [1 MiB, 5 MiB) (see the README).
    let file = fs::File::open(&mem_path).unwrap();
    for pfn in 0x100u64..0x500 {
        let stamp = format!("QCOW2FS PAGE {pfn:08X}\n");
        let mut page = vec![0u8; PS as usize];
        file.read_exact_at(&mut page, pfn << 12).unwrap();
        assert_eq!(&page[..stamp.len()], stamp.as_bytes(), "{f}: pfn {pfn:#x}");
        assert!(
            page[stamp.len()..].iter().all(|&b| b == 0),
            "{f}: pfn {pfn:#x}"
        );
    }
    let mut done = [0u8; 13];
    file.read_exact_at(&mut done, 0x600).unwrap();
    assert_eq!(&done, b"QCOW2FS DONE\n", "{f}");

    // Holes: the independent walker's page counts (savevm sends each page once, data or
    // zero).
    for b in &blocks {
        let name = b["name"].as_str().unwrap();
        let data = b["normal_pages"].as_u64().unwrap() * PS;
        let path = m.path(&format!("snapshots/running.ram/{}", block_file(name)));
        let content = fs::read(&path).unwrap();
        assert_eq!(
            content.len() as u64,
            b["size"].as_u64().unwrap(),
            "{f} {name}"
        );
        check_holes(&format!("{f}: block {name}"), &path, &content, data);
        if name == "pc.ram" {
            assert!(content == mem, "{f}: pc.ram.raw and running.mem differ");
            check_holes(&format!("{f}: running.mem"), &mem_path, &mem, data);
        }
    }

    // Extended attributes.
    let snapshot_disk = qemu_snapshot_raw(&img, "running");
    let mut want = snapshot_attrs(&img, snap, snapshot_disk.len());
    for file in ["running.raw", "running.vmstate"] {
        let mut w = want.clone();
        if file != "running.raw" {
            w.insert(
                "user.qcow2.vmstate.machine".into(),
                facts["machine"].as_str().unwrap().into(),
            );
            w.insert("user.qcow2.vmstate.ram-size".into(), ram.to_string());
        }
        let got = text_attrs(&getfattr(&m.path(&format!("snapshots/{file}"))));
        assert_eq!(got, w, "{f}: getfattr -d snapshots/{file}");
    }
    want.insert(
        "user.qcow2.vmstate.machine".into(),
        facts["machine"].as_str().unwrap().into(),
    );
    want.insert("user.qcow2.vmstate.ram-size".into(), ram.to_string());
    assert_eq!(text_attrs(&getfattr(&mem_path)), want, "{f}: running.mem");
    want.insert("user.qcow2.vmstate.block".into(), "pc.ram".into());
    let got = text_attrs(&getfattr(&m.path("snapshots/running.ram/pc.ram.raw")));
    assert_eq!(got, want, "{f}: pc.ram.raw");
    let got = text_attrs(&getfattr(&m.disk()));
    let active = BTreeMap::from([
        (
            "user.qcow2.image".to_string(),
            absolute(&img).display().to_string(),
        ),
        ("user.qcow2.format".to_string(), "qcow2".to_string()),
    ]);
    assert_eq!(got, active, "{f}: the active disk");

    // The disks are still QEMU's.
    assert_same_bytes(
        &format!("{f}: snapshot disk"),
        &snapshot_disk,
        &fs::read(m.path("snapshots/running.raw")).unwrap(),
    );
    assert_same_bytes(
        &format!("{f}: active disk"),
        &qemu_raw(&img),
        &fs::read(m.disk()).unwrap(),
    );
    drop(m);

    // The same through the command line.
    let dir = d.path();
    let img_s = img.to_str().unwrap();
    let out = qcow2fs(dir, &["cat", "--vmstate", "running", img_s]);
    assert_eq!(
        sha256_hex(&out),
        expected_hash(f, "vmstate.sha256"),
        "{f}: cat --vmstate"
    );
    let out = qcow2fs(dir, &["cat", "--memory", "1", img_s]);
    assert_eq!(
        sha256_hex(&out),
        expected_hash(f, "pc.ram.sha256"),
        "{f}: cat --memory"
    );
    let ours = qcow2fs_json(dir, &["info", "--json", img_s]);
    let vm = &ours["snapshots"][0]["vm-state"];
    assert_eq!(vm["machine"], facts["machine"], "{f}: info --json");
    assert_eq!(vm["ram-size"].as_u64(), Some(ram), "{f}: info --json");
    assert_eq!(vm["physical-size"].as_u64(), Some(ram), "{f}: info --json");
    let names: Vec<&str> = vm["ram-blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = blocks.iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, want, "{f}: info --json RAM blocks");
    let text = String::from_utf8(qcow2fs(dir, &["info", img_s])).unwrap();
    let line = format!(
        "machine {}, RAM {} MiB",
        facts["machine"].as_str().unwrap(),
        facts["ram_mib"]
    );
    assert!(text.contains(&line), "{f}: info lacks {line:?}:\n{text}");
}

#[test]
fn fixtures_through_the_mount() {
    run_each("VM-state fixtures", &FIXTURES, check_fixture);
}

// ---------------------------------------------------------------------------------------
// 2. Volatility 3 on the memory file
// ---------------------------------------------------------------------------------------

/// A Volatility 3 plugin: runs the automagics on the file given with `-f`, then prints
/// the layer stack the stacker built (top first: class, highest address) and the
/// SHA-256 of the top layer's bytes.
const LAYER_PLUGIN: &str = r#"
import hashlib
from volatility3.framework import renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.interfaces import plugins


class LayerStack(plugins.PluginInterface):
    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls):
        return [requirements.TranslationLayerRequirement(name="primary", description="memory")]

    def _generator(self):
        name = self.config["primary"]
        top = self.context.layers[name]
        h = hashlib.sha256()
        for off in range(0, top.maximum_address + 1, 1 << 22):
            h.update(top.read(off, min(1 << 22, top.maximum_address + 1 - off), pad=True))
        depth = 0
        while name is not None:
            layer = self.context.layers[name]
            yield (0, (depth, type(layer).__name__, layer.maximum_address,
                       h.hexdigest() if depth == 0 else "-"))
            name = layer.dependencies[0] if layer.dependencies else None
            depth += 1

    def run(self):
        return renderers.TreeGrid(
            [("Depth", int), ("LayerClass", str), ("MaxAddress", int), ("SHA256", str)],
            self._generator(),
        )
"#;

/// What Volatility 3 stacks on `file` (top first: class, highest address) and the hash
/// of the top layer, through `vol -f FILE` and the plugin above in `plugins`.
fn volatility_stack(plugins: &Path, file: &Path) -> (Vec<(String, u64)>, String) {
    let out = run_in(
        Path::new("/"),
        "vol",
        &[
            "-q",
            "-r",
            "csv",
            "-p",
            plugins.to_str().unwrap(),
            "-f",
            file.to_str().unwrap(),
            "qcow2fs_layers.LayerStack",
        ],
        COMMAND_LIMIT,
    );
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_text();
    let rows: Vec<Vec<String>> = text
        .lines()
        .skip_while(|l| !l.starts_with("TreeDepth,"))
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .filter(|r: &Vec<String>| r.len() == 5)
        .collect();
    assert!(
        !rows.is_empty(),
        "no layers in vol's output: {}",
        out.describe()
    );
    let stack = rows
        .iter()
        .map(|r| (r[2].clone(), r[3].parse().unwrap()))
        .collect();
    (stack, rows[0][4].clone())
}

/// Volatility 3 (from PyPI; `.ci/run` installs it) takes `NAME.mem` as a plain raw
/// memory layer: nothing is stacked on it (it would stack a QEMU layer on a migration
/// stream), its highest address is the end of the file, and its bytes are the guest's
/// RAM. On fixture C, whose machine type Volatility's own QEMU stream reader still
/// understands, Volatility's reading of `NAME.vmstate` equals `NAME.mem`.
#[test]
fn volatility_reads_the_memory_file_as_raw_memory() {
    let have_vol = run_in(Path::new("/"), "vol", &["-h"], COMMAND_LIMIT).success();
    assert!(
        have_vol,
        "Volatility 3 is not installed: pip install volatility3 (.ci/run does)"
    );
    let d = tempdir();
    let plugins = d.path().join("plugins");
    fs::create_dir(&plugins).unwrap();
    fs::write(plugins.join("qcow2fs_layers.py"), LAYER_PLUGIN).unwrap();
    let img = fixture_image(d.path(), "C");
    let m = Mount::new(&img, &mountpoint(d.path(), "mnt"), &[]);
    let ram = facts("C")["ram_bytes"].as_u64().unwrap();
    let pc_ram = expected_hash("C", "pc.ram.sha256");

    let (stack, hash) = volatility_stack(&plugins, &m.path("snapshots/running.mem"));
    assert_eq!(
        stack,
        [("FileLayer".to_string(), ram - 1)],
        "the layers Volatility stacked on running.mem"
    );
    assert_eq!(
        hash, pc_ram,
        "the bytes of Volatility's layer over running.mem"
    );

    let vm_size = fs::metadata(m.path("snapshots/running.vmstate"))
        .unwrap()
        .len();
    let (stack, hash) = volatility_stack(&plugins, &m.path("snapshots/running.vmstate"));
    assert_eq!(
        stack,
        [
            ("QemuSuspendLayer".to_string(), ram - 1),
            ("FileLayer".to_string(), vm_size - 1)
        ],
        "the layers Volatility stacked on fixture C's running.vmstate"
    );
    assert_eq!(
        hash, pc_ram,
        "Volatility's reading of C's stream and running.mem"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Streams written into an image's VM-state area
// ---------------------------------------------------------------------------------------

const M64K: u64 = 64 * 1024;

/// An image `name` in `dir` whose snapshot `running` holds `stream` as VM state, as
/// savevm stores it: a 1 MiB disk with 64 KiB clusters (the VM-state area starts at
/// 512 MiB), the stream written there with `qemu-io write -b`, the snapshot taken, and
/// its VM-state size set to `size`. The active disk changes afterwards.
///
/// With `compressed`, the disk is 1 GiB and the stream is written with compressed
/// writes at 512 MiB; the snapshot's disk size is then set to 512 MiB, which puts its
/// VM-state area there.
fn image_with_stream(
    dir: &Path,
    name: &str,
    stream: &[u8],
    size: u64,
    compressed: bool,
) -> PathBuf {
    let disk = if compressed { GIB } else { 1 << 20 };
    let img = create_image(dir, name, Some(disk), "cluster_size=65536", None);
    let file = dir.join(format!("{name}.stream"));
    let padded = (stream.len() as u64).next_multiple_of(if compressed { M64K } else { 512 });
    let mut bytes = stream.to_vec();
    bytes.resize(padded as usize, 0);
    fs::write(&file, &bytes).unwrap();
    let f = file.display();
    let write = if compressed {
        format!("write -c -s {f} {} {padded}", GIB / 2)
    } else {
        format!("write -b -s {f} 0 {padded}")
    };
    qemu_io(&img, &["write -q -P 0x3c 0 64k".to_string(), write]);
    qemu_img(dir, &["snapshot", "-c", "running", name]);
    let s = patch::snapshot_named(&img, "running");
    if compressed {
        assert!(
            s.extra_data_size >= 16,
            "the snapshot records its disk size"
        );
        patch::put64(&img, s.off + 40 + 8, GIB / 2);
        // The setup: the state's first cluster is compressed in the snapshot's table.
        let g = patch::Geo::read(&img);
        let e = patch::read_be64(&img, g.l2_entry_at(&img, s.l1_offset, GIB / 2));
        assert!(e & patch::COMPRESSED != 0, "L2 entry {e:#x} at 512 MiB");
    }
    patch::set_snapshot_vm_state_size(&img, 0, size);
    qemu_io(&img, &["write -q -P 0x5a 0 4k"]);
    fs::remove_file(&file).unwrap();
    img
}

/// Where QEMU puts byte `off` of pc.ram of a q35 guest with 3 GiB of RAM: RAM of 2.75 GiB
/// or more leaves 2 GiB below 4 GiB (hw/i386/pc_q35.c), the rest is mapped from 4 GiB.
fn q35_3g_physical(off: u64) -> u64 {
    if off < 2 * GIB {
        off
    } else {
        off - 2 * GIB + 4 * GIB
    }
}

/// A data page: its block offset, then zeros.
fn tagged(off: u64) -> Page {
    Page::Data(format!("DATA AT {off:#x}\n").into_bytes())
}

/// A q35 guest with 3 GiB of RAM and a 64 KiB ROM whose stream sends some pages: data
/// pages around the low-memory limit and at the end of RAM, a run of 64 data pages, a
/// page filled with 0xab and a zero page; every other page is never sent.
fn synthetic_guest() -> Guest<'static> {
    let mut pages = vec![("pc.ram", 0, tagged(0))];
    pages.extend((1..65).map(|i| ("pc.ram", i * PS, tagged(i * PS))));
    pages.extend([
        ("pc.ram", 80 * PS, Page::Fill(0xab)),
        ("pc.ram", 81 * PS, Page::Fill(0)),
        ("/rom@etc/acpi/tables", 0, tagged(0)),
        ("pc.ram", 2 * GIB - PS, tagged(2 * GIB - PS)),
        ("pc.ram", 2 * GIB, tagged(2 * GIB)),
        ("pc.ram", 3 * GIB - PS, tagged(3 * GIB - PS)),
    ]);
    Guest {
        machine: "pc-q35-10.0",
        blocks: vec![("pc.ram", 3 * GIB), ("/rom@etc/acpi/tables", M64K)],
        pages,
        devices: vec![("timer", vec![1, 2, 3])],
        switchover_start: true,
    }
}

/// The guest-physical pages of `synthetic_guest` that hold data (a fill of 0xab
/// included), with their bytes.
fn synthetic_data_pages() -> BTreeMap<u64, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (block, off, page) in synthetic_guest().pages {
        if block != "pc.ram" {
            continue;
        }
        let bytes = match page {
            Page::Data(mut d) => {
                d.resize(PS as usize, 0);
                d
            }
            Page::Fill(0) => continue,
            Page::Fill(b) => vec![b; PS as usize],
        };
        out.insert(q35_3g_physical(off), bytes);
    }
    out
}

/// `pages` (page address → bytes) as extents of data, neighbours merged.
fn extents_of(pages: &BTreeMap<u64, Vec<u8>>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &a in pages.keys() {
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = a + PS,
            _ => out.push((a, a + PS)),
        }
    }
    out
}

/// Checks the memory file of `synthetic_guest` at `path`: its size, every data page,
/// zeros around them, and exactly those pages as data (SEEK_DATA, st_blocks).
fn check_synthetic_memory(what: &str, path: &Path) {
    let pages = synthetic_data_pages();
    let f = fs::File::open(path).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        5 * GIB,
        "{what}: 2 GiB below 4 GiB, 1 above"
    );
    let read = |off: u64| {
        let mut b = vec![0u8; PS as usize];
        f.read_exact_at(&mut b, off).unwrap();
        b
    };
    for (&a, bytes) in &pages {
        assert!(read(a) == *bytes, "{what}: page at {a:#x}");
    }
    // Never sent, a zero page, the hole below 4 GiB, the page after the limit's.
    for a in [
        65 * PS,
        81 * PS,
        2 * GIB,
        4 * GIB - PS,
        3 * GIB,
        4 * GIB + PS,
    ] {
        assert!(
            read(a).iter().all(|&b| b == 0),
            "{what}: page at {a:#x} is not zero"
        );
    }
    assert_eq!(
        data_extents(path),
        extents_of(&pages),
        "{what}: SEEK_DATA/SEEK_HOLE"
    );
    let md = counted_metadata(path);
    assert_eq!(
        md.blocks() * 512,
        pages.len() as u64 * PS,
        "{what}: st_blocks"
    );
}

/// A guest with RAM above 4 GiB, every kind of page and pages never sent, through a
/// mount: with the stream in plain clusters and in compressed ones.
#[test]
fn synthetic_guest_through_the_mount() {
    let d = tempdir();
    let stream = synthetic_guest().build().buf;
    for compressed in [false, true] {
        let name = if compressed {
            "zip.qcow2"
        } else {
            "plain.qcow2"
        };
        let img = image_with_stream(d.path(), name, &stream, stream.len() as u64, compressed);
        let m = Mount::new(&img, &mountpoint(d.path(), &format!("mnt-{name}")), &[]);
        let what = name.to_string();
        // The setup: QEMU reads the stream back from there.
        let len = stream.len() as u64;
        assert!(
            qemu_vmstate(&img, "running", len) == stream,
            "{what}: QEMU's VM state"
        );
        assert!(
            fs::read(m.path("snapshots/running.vmstate")).unwrap() == stream,
            "{what}: running.vmstate"
        );
        check_synthetic_memory(&what, &m.path("snapshots/running.mem"));
        let rom = m.path("snapshots/running.ram/%2From@etc%2Facpi%2Ftables.raw");
        let mut want = vec![0u8; M64K as usize];
        if let Page::Data(b) = tagged(0) {
            want[..b.len()].copy_from_slice(&b);
        }
        assert_eq!(fs::read(&rom).unwrap(), want, "{what}: the ROM block");
        let attrs = text_attrs(&getfattr(&rom));
        assert_eq!(
            attrs.get("user.qcow2.vmstate.block").map(String::as_str),
            Some("/rom@etc/acpi/tables"),
            "{what}"
        );
        assert_eq!(
            attrs.get("user.qcow2.vmstate.ram-size"),
            Some(&(3 * GIB).to_string()),
            "{what}"
        );
        assert_same_bytes(
            &format!("{what}: snapshot disk"),
            &qemu_snapshot_raw(&img, "running"),
            &fs::read(m.path("snapshots/running.raw")).unwrap(),
        );
    }
}

/// Fixtures D and E (QEMU guests with RAM above 4 GiB, see the README) written into an
/// image: the memory file matches pmemsave's dumps, the marks are where QEMU's loader
/// put them, and the gap below 4 GiB is a hole.
#[test]
fn ram_above_4_gib_through_the_mount() {
    let d = tempdir();
    // (fixture, RAM mapped below 4 GiB, above it, marks): QEMU's layouts for i440fx
    // with 5 GiB and q35 with 3 GiB.
    for (f, below, above, marks) in [
        (
            "D",
            3 * GIB,
            2 * GIB,
            [0xb000_0000u64, 0x1_0000_0000, 0x1_7fff_f000],
        ),
        (
            "E",
            2 * GIB,
            GIB,
            [0x7000_0000, 0x1_0000_0000, 0x1_3fff_f000],
        ),
    ] {
        let stream = fixture_unxz(f, "vmstate.bin.xz");
        assert_eq!(sha256_hex(&stream), expected_hash(f, "vmstate.sha256"));
        let name = format!("{f}.qcow2");
        let img = image_with_stream(d.path(), &name, &stream, stream.len() as u64, false);
        let m = Mount::new(&img, &mountpoint(d.path(), &format!("mnt-{f}")), &[]);
        let path = m.path("snapshots/running.mem");
        let file = fs::File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4 * GIB + above, "{f}");
        let read = |off: u64, len: usize| {
            let mut b = vec![0u8; len];
            file.read_exact_at(&mut b, off).unwrap();
            b
        };
        check_physical_memory(f, &marks, read);
        // Nothing between the end of low RAM and 4 GiB; a mark starts RAM at 4 GiB.
        assert_eq!(lseek(&file, below, libc::SEEK_DATA), Ok(4 * GIB), "{f}");
        let hole = lseek(&file, 0, libc::SEEK_HOLE).unwrap();
        assert!(hole < below, "{f}: first hole at {hole:#x}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. Hostile VM state
// ---------------------------------------------------------------------------------------

/// The mount's log so far.
fn log_text(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_default()
}

/// Reading `path` fails with EIO.
fn assert_eio(what: &str, path: &Path) {
    let e = fs::read(path).expect_err(&format!("{what}: {} read", path.display()));
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
}

/// Broken or hostile VM state: the snapshot's disk file keeps working; the VM-state files
/// are left out with the reason in the log, or fail with EIO (and a log line) when the
/// damage shows only while the stream is read.
#[test]
fn hostile_vm_state_leaves_the_snapshot_disk_working() {
    let d = tempdir();
    let good = synthetic_guest().build().buf;
    let len = good.len() as u64;
    // A page beyond its block, after a valid start.
    let mut beyond = synthetic_guest();
    beyond.pages.push(("/rom@etc/acpi/tables", M64K, tagged(0)));
    let beyond = beyond.build().buf;
    let mut unknown = synthetic_guest();
    unknown.machine = "virt-10.0";
    let unknown = unknown.build().buf;
    let mut garbage = good.clone();
    garbage[..4].copy_from_slice(b"QEVX");
    // (case, stream, vm_state_size, files shown besides the disk, log words)
    type Case<'a> = (&'a str, &'a [u8], u64, &'a [&'a str], &'a str);
    let cases: [Case; 6] = [
        (
            "truncated",
            &good,
            len / 2,
            &["vmstate", "mem", "ram"],
            "truncated",
        ),
        (
            "longer",
            &good,
            len + (1 << 20),
            &["vmstate", "mem", "ram"],
            "",
        ),
        ("past_l1", &good, GIB, &[], "runs past its L1 table"),
        (
            "beyond_block",
            &beyond,
            len,
            &["vmstate", "mem", "ram"],
            "beyond",
        ),
        (
            "unknown_machine",
            &unknown,
            len,
            &["vmstate", "ram"],
            "is not known",
        ),
        (
            "not_a_stream",
            &garbage,
            len,
            &["vmstate"],
            "the mount shows the stream alone",
        ),
    ];
    assert!(
        len / 2 > 128 * 1024,
        "the cut lies past the start the summary reads"
    );
    for (case, stream, size, shown, words) in cases {
        let name = format!("{case}.qcow2");
        let img = image_with_stream(d.path(), &name, stream, size, false);
        if case == "past_l1" {
            // The setup: 512 MiB + 1 GiB runs past what the snapshot's L1 table covers.
            let s = patch::snapshot_named(&img, "running");
            let l1_size = patch::read_be32(&img, s.off + 8) as u64;
            assert!(
                GIB / 2 + GIB > l1_size * GIB / 2,
                "L1 table of {l1_size} entries"
            );
        }
        let log = d.path().join(format!("{case}.log"));
        let opt = format!("log={}", log.display());
        let m = Mount::new(&img, &mountpoint(d.path(), &format!("mnt-{case}")), &[&opt]);
        let mut want = BTreeSet::from(["running.raw".to_string()]);
        want.extend(shown.iter().map(|e| format!("running.{e}")));
        assert_eq!(listing(&m.path("snapshots")), want, "{case}: snapshots/");
        if shown.contains(&"vmstate") {
            let v = fs::read(m.path("snapshots/running.vmstate")).unwrap();
            assert_eq!(v.len() as u64, size, "{case}: running.vmstate");
            let n = v.len().min(stream.len());
            assert!(v[..n] == stream[..n], "{case}: running.vmstate");
        }
        match case {
            "truncated" | "beyond_block" => {
                assert_eio(case, &m.path("snapshots/running.mem"));
                assert_eio(case, &m.path("snapshots/running.ram/pc.ram.raw"));
            }
            "longer" => check_synthetic_memory(case, &m.path("snapshots/running.mem")),
            "unknown_machine" => {
                let ram = m.path("snapshots/running.ram/pc.ram.raw");
                assert_eq!(fs::metadata(&ram).unwrap().len(), 3 * GIB, "{case}");
                let mut b = vec![0u8; 64];
                fs::File::open(&ram)
                    .unwrap()
                    .read_exact_at(&mut b, 2 * GIB)
                    .unwrap();
                assert!(b.starts_with(b"DATA AT 0x80000000\n"), "{case}");
            }
            _ => {}
        }
        let text = log_text(&log);
        assert!(
            text.contains(words),
            "{case}: the log lacks {words:?}:\n{text}"
        );
        assert_same_bytes(
            &format!("{case}: snapshot disk"),
            &qemu_snapshot_raw(&img, "running"),
            &fs::read(m.path("snapshots/running.raw")).unwrap(),
        );
        assert_same_bytes(
            &format!("{case}: active disk"),
            &qemu_raw(&img),
            &fs::read(m.disk()).unwrap(),
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. Snapshots deleted and taken while mounted
// ---------------------------------------------------------------------------------------

#[test]
fn deleting_a_snapshot_removes_its_vm_state_files() {
    let d = tempdir();
    let img = fixture_image(d.path(), "A");
    let mnt = mountpoint(d.path(), "mnt");
    let m = Mount::new(&img, &mnt, &["rw"]);
    let dir = d.path();
    let mnt_s = m.mountpoint.to_str().unwrap();
    let delete = || qcow2fs_try(dir, &["snapshot", "delete", mnt_s, "running"]);
    // The kernel tells the daemon of a last close on its own time.
    let closed = || {
        wait_until(std::time::Duration::from_secs(10), || {
            qcow2fs_json(dir, &["status", "--json", mnt_s])["open-files"] == 0
        })
    };
    for busy in ["running.mem", "running.ram/pc.bios.raw", "running.vmstate"] {
        let f = fs::File::open(m.path(&format!("snapshots/{busy}"))).unwrap();
        let r = delete();
        assert!(!r.success(), "deleted while snapshots/{busy} is open");
        assert!(r.all_output().contains(busy), "{busy}: {}", r.describe());
        drop(f);
        assert!(closed(), "{busy} still open");
    }
    assert!(m.path("snapshots/running.mem").exists());
    let r = delete();
    assert!(r.success(), "{}", r.describe());
    assert_eq!(
        listing(&m.path("snapshots")),
        BTreeSet::new(),
        "after the delete"
    );
    assert!(!m.path("snapshots/running.ram/pc.ram.raw").exists());
    // A snapshot taken now has no VM state: its disk alone.
    let r = qcow2fs_try(dir, &["snapshot", "create", mnt_s, "live"]);
    assert!(r.success(), "{}", r.describe());
    assert_eq!(
        listing(&m.path("snapshots")),
        BTreeSet::from(["live.raw".to_string()])
    );
    m.umount();
    assert_check_clean(&img);
    assert_eq!(qemu_snapshots(&img).len(), 1);
}

// ---------------------------------------------------------------------------------------
// 6. Extended attributes
// ---------------------------------------------------------------------------------------

/// `setfattr ARGS` fails with `error` (its message for the errno).
fn setfattr_fails(args: &[&str], error: &str) {
    let r = run_in(Path::new("/"), "setfattr", args, COMMAND_LIMIT);
    assert!(!r.success(), "setfattr {args:?} succeeded");
    assert!(
        r.stderr.contains(error),
        "setfattr {args:?}: {}",
        r.describe()
    );
}

#[test]
fn extended_attributes_of_disks_and_layers_are_read_only() {
    let d = tempdir();
    let dir = d.path();
    let base = create_image(dir, "base.qcow2", Some(1 << 20), "", None);
    let top = create_image(
        dir,
        "top.qcow2",
        Some(1 << 20),
        "",
        Some(("base.qcow2", "qcow2")),
    );
    let m = Mount::new(&top, &mountpoint(dir, "mnt"), &["rw"]);
    let attrs = |p: &Path| text_attrs(&getfattr(p));
    let s = |v: &Path| absolute(v).display().to_string();
    assert_eq!(
        attrs(&m.disk()),
        BTreeMap::from([
            ("user.qcow2.image".to_string(), s(&top)),
            ("user.qcow2.format".to_string(), "qcow2".to_string()),
            ("user.qcow2.backing".to_string(), s(&base)),
            ("user.qcow2.backing-format".to_string(), "qcow2".to_string()),
        ]),
        "the active disk"
    );
    assert_eq!(
        attrs(&m.path("layers/1-base.raw")),
        BTreeMap::from([
            ("user.qcow2.image".to_string(), s(&base)),
            ("user.qcow2.format".to_string(), "qcow2".to_string()),
        ]),
        "the layer"
    );
    let disk = m.disk();
    let disk = disk.to_str().unwrap();
    setfattr_fails(
        &["-n", "user.qcow2.image", "-v", "x", disk],
        "Operation not permitted",
    );
    setfattr_fails(
        &["-x", "user.qcow2.format", disk],
        "Operation not permitted",
    );
    setfattr_fails(
        &["-n", "user.note", "-v", "x", disk],
        "Operation not supported",
    );
    let r = run_in(
        Path::new("/"),
        "getfattr",
        &["-n", "user.qcow2.nothing", disk],
        COMMAND_LIMIT,
    );
    assert!(r.stderr.contains("No such attribute"), "{}", r.describe());
    assert_eq!(attrs(&m.disk()).len(), 4, "unchanged");
    // An external snapshot puts a new image under the active file: its attributes follow.
    let new = dir.join("new.qcow2");
    let mnt_s = m.mountpoint.to_str().unwrap();
    let args = [
        "snapshot",
        "create",
        "--external",
        new.to_str().unwrap(),
        mnt_s,
    ];
    qcow2fs_try(dir, &args).expect_success();
    let got = attrs(&m.disk());
    assert_eq!(
        got["user.qcow2.image"],
        s(&new),
        "after the external snapshot"
    );
    assert_eq!(
        got["user.qcow2.backing"],
        s(&top),
        "after the external snapshot"
    );
    let layer = attrs(&m.path("layers/1-top.raw"));
    assert_eq!(
        layer["user.qcow2.image"],
        s(&top),
        "the old image, now layer 1"
    );
    assert_eq!(
        layer["user.qcow2.backing"],
        s(&base),
        "the old image, now layer 1"
    );
    m.umount();

    let m = Mount::new(&top, &mountpoint(dir, "mnt2"), &["xattrs=off"]);
    assert_eq!(attrs(&m.disk()), BTreeMap::new(), "xattrs=off");
    let r = run_in(
        Path::new("/"),
        "getfattr",
        &["-n", "user.qcow2.image", m.disk().to_str().unwrap()],
        COMMAND_LIMIT,
    );
    assert!(r.stderr.contains("No such attribute"), "{}", r.describe());
}

/// The user the access test runs commands as (made when missing).
const TEST_USER: &str = "qcow2fs-test";

fn test_user() -> (u32, u32) {
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, TEST_USER])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let _ = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .output();
    }
    let (uid, gid) = (
        id("-u").expect("the test user"),
        id("-g").expect("its group"),
    );
    assert_ne!(uid, 0);
    (uid, gid)
}

/// `getfattr ARGS` as the test user: (success, stderr).
fn getfattr_as_user(args: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = test_user();
    let out = std::process::Command::new("getfattr")
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The attributes of a file are readable by those who may read the file, and only by
/// them: another user reads them on an image all may read, not on one only root may.
#[test]
fn extended_attributes_follow_the_file_modes() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for (mode, readable) in [(0o644, true), (0o600, false)] {
        let img = fixture_image(d.path(), "C");
        fs::set_permissions(&img, fs::Permissions::from_mode(mode)).unwrap();
        let m = Mount::new(
            &img,
            &mountpoint(d.path(), &format!("mnt-{mode:o}")),
            &["allow_other"],
        );
        for file in ["snapshots/running.mem", "C.raw"] {
            let p = m.path(file);
            let p = p.to_str().unwrap();
            let (ok, err) = getfattr_as_user(&["-n", "user.qcow2.image", p]);
            assert_eq!(ok, readable, "image mode {mode:o}, {file}: {err}");
            let (ok, err) = getfattr_as_user(&["-d", p]);
            assert_eq!(
                ok, readable,
                "image mode {mode:o}, {file}, getfattr -d: {err}"
            );
            if !readable {
                assert!(err.contains("Permission denied"), "{file}: {err}");
            }
        }
        assert!(
            getfattr(&m.path("snapshots/running.mem")).len() > 5,
            "root reads them"
        );
    }
}

/// Where the VM-state area is not allocated in the image, QEMU reads the backing file at
/// the same guest offset (past the overlay's disk, within a larger backing file), and so
/// does `cat --vmstate`.
#[test]
fn unallocated_vm_state_reads_the_backing_file_as_qemu_does() {
    let d = tempdir();
    let dir = d.path();
    let base = create_image(dir, "base.qcow2", Some(GIB), "", None);
    qemu_io(&base, &[format!("write -q -P 0x77 {} 128k", GIB / 2)]);
    let backing = Some(("base.qcow2", "qcow2"));
    let top = create_image(dir, "top.qcow2", Some(1 << 20), "", backing);
    // One sector of state in the image itself: its L1 table then covers the area.
    qemu_io(&top, &["write -b -q -P 0x99 196608 512"]);
    qemu_img(dir, &["snapshot", "-c", "running", "top.qcow2"]);
    let len = 200_000;
    patch::set_snapshot_vm_state_size(&top, 0, len);
    let qemu = qemu_vmstate(&top, "running", len);
    let k = 1024;
    let all = |r: std::ops::Range<usize>, v: u8| qemu[r].iter().all(|&b| b == v);
    assert!(
        all(0..128 * k, 0x77),
        "the setup: QEMU reads the backing file"
    );
    assert!(all(128 * k..192 * k, 0) && all(192 * k..192 * k + 512, 0x99));
    let ours = qcow2fs(dir, &["cat", "--vmstate", "running", "top.qcow2"]);
    assert_same_bytes("cat --vmstate of an overlay", &qemu, &ours);
}
