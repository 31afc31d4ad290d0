//! `qcow2fs info`: the header, backing chain, snapshots, bitmaps and encryption (no key
//! needed), as text or as JSON with qemu-img's field names; and what qcow2fs adds: each
//! snapshot's VM state (its machine type, RAM size and RAM blocks, from the start of the
//! stream).

use crate::block::{Chain, VmStateFiles};
use crate::crypto::EncryptionInfo;
use crate::engine::Snapshot;
use crate::error::Result;
use crate::format::header::Header;
use crate::format::vmstate::Summary;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Sizes the way qemu-img prints them: three significant digits and a binary unit.
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if v < 1000 {
        return format!("{v} B");
    }
    let mut k = 0;
    while k + 1 < UNITS.len() && (v as f64) / 1024f64.powi(k as i32 + 1) >= 1000.0 / 1024.0 {
        k += 1;
    }
    let x = v as f64 / 1024f64.powi(k as i32);
    let s = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[k])
}

fn local_time(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: libc::tm is plain integers (and a pointer that may be null), for which
    // all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r writes only into `tm` and
    // keeps neither pointer.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return sec.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn vm_clock(ns: u64) -> String {
    let ms = ns / 1_000_000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        (ms / 60_000) % 60,
        (ms / 1000) % 60,
        ms % 1000
    )
}

fn snapshot_json(s: &Snapshot) -> Value {
    let e = &s.entry;
    let mut v = json!({
        "id": e.id,
        "name": e.name(),
        "vm-state-size": e.vm_state_size,
        "date-sec": e.date_sec,
        "date-nsec": e.date_nsec,
        "vm-clock-sec": e.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": e.vm_clock_nsec % 1_000_000_000,
        "disk-size": s.disk_size,
    });
    if let Some(ic) = e.icount.filter(|&i| i != u64::MAX) {
        v["icount"] = json!(ic);
    }
    v
}

/// What the start of a snapshot's VM state says, or why it cannot be read; `None` for a
/// snapshot without VM state.
fn vm_state(chain: &Chain, s: &Snapshot) -> Option<std::result::Result<Summary, String>> {
    if s.entry.vm_state_size == 0 {
        return None;
    }
    Some(match VmStateFiles::open(&chain.top, s) {
        Ok(f) => f.summary,
        Err(e) => Err(e.report()),
    })
}

/// The `vm-state` member qcow2fs adds to a snapshot's JSON.
fn vm_state_json(sum: &std::result::Result<Summary, String>) -> Value {
    let sum = match sum {
        Ok(s) => s,
        Err(why) => return json!({ "error": why }),
    };
    let blocks: Vec<Value> = sum
        .blocks
        .iter()
        .map(|(name, size)| json!({"name": name, "size": size}))
        .collect();
    let mut v = json!({
        "machine": sum.machine(),
        "ram-size": sum.main_ram_bytes(),
        "page-size": sum.page_size,
        "ram-blocks": blocks,
    });
    match &sum.physical {
        Ok(l) => v["physical-size"] = json!(l.size()),
        Err(why) => v["physical-error"] = json!(why),
    }
    v
}

/// One line of the text's VM-state list.
fn vm_state_line(s: &Snapshot, sum: &std::result::Result<Summary, String>) -> String {
    let e = &s.entry;
    let head = format!(
        "    {} ({}): {}",
        e.id,
        e.name(),
        human_size(e.vm_state_size)
    );
    match sum {
        Ok(sum) => format!(
            "{head}, machine {}, RAM {}",
            sum.machine().unwrap_or("unknown"),
            sum.main_ram_bytes()
                .map_or("unknown".to_string(), human_size)
        ),
        Err(why) => format!("{head}, not readable: {why}"),
    }
}

fn format_specific(h: &Header, chain: &Chain) -> Value {
    let image = chain.image();
    let mut d = json!({
        "compat": if h.version >= 3 { "1.1" } else { "0.10" },
        "compression-type": h.compression_type.name(),
        "refcount-bits": h.refcount_bits(),
    });
    if h.version >= 3 {
        d["lazy-refcounts"] = json!(h.lazy_refcounts());
        d["corrupt"] = json!(h.is_corrupt());
        d["extended-l2"] = json!(h.extended_l2());
    }
    if let (true, Some(name)) = (h.has_data_file(), &h.data_file) {
        d["data-file"] = json!(String::from_utf8_lossy(name));
        d["data-file-raw"] = json!(h.data_file_raw());
    }
    if let Some(e) = image.encryption() {
        d["encrypt"] = serde_json::to_value(e).unwrap_or_default();
    }
    if !image.bitmaps().is_empty() {
        let list: Vec<Value> = image
            .bitmaps()
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use() {
                    flags.push("in-use");
                }
                if b.auto() {
                    flags.push("auto");
                }
                json!({"name": b.name, "granularity": 1u64 << b.granularity_bits.min(63), "flags": flags})
            })
            .collect();
        d["bitmaps"] = json!(list);
    }
    json!({"type": "qcow2", "data": d})
}

fn actual_size(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The JSON document `info --json` prints.
pub fn info_json(path: &Path, chain: &Chain) -> Value {
    let image = chain.image();
    let h = image.header();
    let mut v = json!({
        "filename": path.display().to_string(),
        "format": "qcow2",
        "virtual-size": h.virtual_size(),
        "actual-size": actual_size(path),
        "cluster-size": h.cluster_size(),
        "dirty-flag": h.is_dirty(),
        "format-specific": format_specific(&h, chain),
    });
    if image.is_encrypted() {
        v["encrypted"] = json!(true);
    }
    if let Some(name) = &h.backing_file {
        v["backing-filename"] = json!(String::from_utf8_lossy(name));
        if let Some(first) = chain.layers.first() {
            v["full-backing-filename"] = json!(first.info().path.display().to_string());
        }
        if let Some(f) = &h.backing_format {
            v["backing-filename-format"] = json!(f);
        }
    }
    if !image.snapshots().is_empty() {
        let snapshots = image.snapshots();
        let list = snapshots.iter().map(|s| {
            let mut j = snapshot_json(s);
            if let Some(sum) = vm_state(chain, s) {
                j["vm-state"] = vm_state_json(&sum);
            }
            j
        });
        v["snapshots"] = Value::Array(list.collect());
    }
    let bitmaps = image.bitmap_list();
    if !bitmaps.is_empty() {
        // Not a qemu-img field: the bitmaps with their dirty bytes (QEMU's query-block
        // shows them as "dirty-bitmaps").
        v["dirty-bitmaps"] = Value::Array(bitmaps.iter().map(super::bitmap::info_json).collect());
    }
    let layers: Vec<Value> = chain
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "depth": i + 1,
                "filename": l.info().path.display().to_string(),
                "format": l.info().format,
                "virtual-size": l.size(),
            })
        })
        .collect();
    v["backing-chain"] = Value::Array(layers);
    v
}

/// The `encrypt` block of the text `info` prints, with qemu-img's names and in its
/// order.
fn encrypt_text(s: &mut String, e: &EncryptionInfo) {
    let _ = writeln!(s, "    encrypt:");
    let l = match e {
        EncryptionInfo::LegacyAes { format } => {
            let _ = writeln!(s, "        format: {format}");
            return;
        }
        EncryptionInfo::Luks(l) => l,
    };
    let _ = writeln!(s, "        ivgen alg: {}", l.ivgen_alg);
    let _ = writeln!(s, "        detached header: {}", l.detached_header);
    let _ = writeln!(s, "        hash alg: {}", l.hash_alg);
    let _ = writeln!(s, "        cipher alg: {}", l.cipher_alg);
    let _ = writeln!(s, "        uuid: {}", l.uuid);
    if let Some(h) = l.ivgen_hash_alg {
        let _ = writeln!(s, "        ivgen hash alg: {h}");
    }
    let _ = writeln!(s, "        format: {}", l.format);
    let _ = writeln!(s, "        cipher mode: {}", l.cipher_mode);
    let _ = writeln!(s, "        slots:");
    for (i, slot) in l.slots.iter().enumerate() {
        let _ = writeln!(s, "            [{i}]:");
        let _ = writeln!(s, "                active: {}", slot.active);
        if let Some(n) = slot.iters {
            let _ = writeln!(s, "                iters: {n}");
        }
        let _ = writeln!(s, "                key offset: {}", slot.key_offset);
        if let Some(n) = slot.stripes {
            let _ = writeln!(s, "                stripes: {n}");
        }
    }
    let _ = writeln!(s, "        payload offset: {}", l.payload_offset);
    let _ = writeln!(s, "        master key iters: {}", l.master_key_iters);
}

/// The text `info` prints.
pub fn info_text(path: &Path, chain: &Chain) -> String {
    let image = chain.image();
    let h = image.header();
    let mut s = String::new();
    let _ = writeln!(s, "image: {}", path.display());
    let _ = writeln!(s, "file format: qcow2");
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        human_size(h.virtual_size()),
        h.virtual_size()
    );
    let _ = writeln!(s, "disk size: {}", human_size(actual_size(path)));
    if image.is_encrypted() {
        let _ = writeln!(s, "encrypted: yes");
    }
    let _ = writeln!(s, "cluster_size: {}", h.cluster_size());
    if let Some(name) = &h.backing_file {
        let full = chain
            .layers
            .first()
            .map(|l| l.info().path.display().to_string())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "backing file: {} (actual path: {full})",
            String::from_utf8_lossy(name)
        );
        if let Some(f) = &h.backing_format {
            let _ = writeln!(s, "backing file format: {f}");
        }
    }
    if !chain.layers.is_empty() {
        let _ = writeln!(s, "Backing chain:");
        for (i, l) in chain.layers.iter().enumerate() {
            let _ = writeln!(
                s,
                "    {}  {:<6} {:>10}  {}",
                i + 1,
                l.info().format,
                human_size(l.size()),
                l.info().path.display()
            );
        }
    }
    if !image.snapshots().is_empty() {
        let _ = writeln!(s, "Snapshot list:");
        let _ = writeln!(
            s,
            "{:<10}{:<18}{:>10}{:>21}{:>16}{:>11}{:>12}",
            "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT", "DISK SIZE"
        );
        for sn in image.snapshots().iter() {
            let e = &sn.entry;
            let icount = match e.icount {
                Some(i) if i != u64::MAX => i.to_string(),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "{:<10}{:<18}{:>10}{:>21}{:>16}{:>11}{:>12}",
                e.id,
                e.name(),
                human_size(e.vm_state_size),
                local_time(e.date_sec),
                vm_clock(e.vm_clock_nsec),
                icount,
                human_size(sn.disk_size)
            );
        }
        let states: Vec<String> = image
            .snapshots()
            .iter()
            .filter_map(|sn| vm_state(chain, sn).map(|sum| vm_state_line(sn, &sum)))
            .collect();
        if !states.is_empty() {
            let _ = writeln!(s, "VM state:");
            for line in states {
                let _ = writeln!(s, "{line}");
            }
        }
    }
    let _ = writeln!(s, "Format specific information:");
    let _ = writeln!(
        s,
        "    compat: {}",
        if h.version >= 3 { "1.1" } else { "0.10" }
    );
    let _ = writeln!(s, "    compression type: {}", h.compression_type.name());
    if h.version >= 3 {
        let _ = writeln!(s, "    lazy refcounts: {}", h.lazy_refcounts());
    }
    let _ = writeln!(s, "    refcount bits: {}", h.refcount_bits());
    if let Some(e) = image.encryption() {
        encrypt_text(&mut s, e);
    }
    if h.version >= 3 {
        let _ = writeln!(s, "    corrupt: {}", h.is_corrupt());
        let _ = writeln!(s, "    extended l2: {}", h.extended_l2());
        let _ = writeln!(s, "    dirty: {}", h.is_dirty());
    }
    if let (true, Some(name)) = (h.has_data_file(), &h.data_file) {
        let _ = writeln!(s, "    data file: {}", String::from_utf8_lossy(name));
        let _ = writeln!(s, "    data file raw: {}", h.data_file_raw());
    }
    let bitmaps = image.bitmap_list();
    if !bitmaps.is_empty() {
        let _ = writeln!(s, "    bitmaps:");
        for b in &bitmaps {
            let flags = super::bitmap::flag_names(b.flags);
            let dirty = match (b.dirty_bytes, b.inconsistent, &b.problem) {
                (Some(n), _, _) => format!("{n} dirty bytes"),
                (None, true, _) => "inconsistent".to_string(),
                (None, false, Some(p)) => format!("unreadable: {p}"),
                (None, false, None) => "dirty bytes unknown".to_string(),
            };
            let _ = writeln!(
                s,
                "        {} (granularity {}, flags: {}, {dirty})",
                b.name,
                b.granularity,
                if flags.is_empty() {
                    "none".to_string()
                } else {
                    flags.join(", ")
                }
            );
        }
    }
    s
}

pub fn run(image: &Path, json: bool, opts: &super::options::MountOptions) -> Result<()> {
    // Like qemu-img info, no key is needed: encrypted layers stay locked without one.
    let chain = super::open_metadata(image, opts)?;
    let image = &super::shown_image(image);
    if json {
        let text = serde_json::to_string_pretty(&info_json(image, &chain)).unwrap_or_default();
        println!("{text}");
    } else {
        print!("{}", info_text(image, &chain));
    }
    Ok(())
}
