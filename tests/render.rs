//! Rendering oracle: for every scenario of the corpus, the active disk, every internal
//! snapshot and every backing layer, read through the library, must equal QEMU's raw
//! rendering byte for byte (`qemu-img convert -O raw`; snapshots via `qemu-img snapshot -a`
//! on a copy, at the snapshot's own disk size). `qcow2fs cat` must print the same bytes.
//! The snapshot and layer lists themselves come from QEMU (`qemu-img info`).

#[macro_use]
mod support;

use std::path::Path;
use support::corpus;
use support::*;

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

scenario_tests!(check_render);

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
