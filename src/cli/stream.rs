//! `qcow2fs stream`: copy what the backing chain provides into the image, offline, then
//! optionally point the image at the layer below the bottom (like QEMU's block-stream).
//! Safe to interrupt: every copied range is an ordinary crash-safe write, and a second
//! run skips what is already in the image.

use crate::block::{self, BlockDev, OpenOptions};
use crate::engine::ImageOptions;
use crate::error::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The name to store for backing file `target` in an image at `image`: relative to the
/// image's directory when it lies below it, otherwise absolute.
fn backing_name(image: &Path, target: &Path) -> PathBuf {
    let dir = match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let canon_dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let canon = target
        .canonicalize()
        .unwrap_or_else(|_| target.to_path_buf());
    match canon.strip_prefix(&canon_dir) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => canon,
    }
}

pub fn run(
    image: &Path,
    bottom: Option<&str>,
    drop_backing: bool,
    keys: &super::KeyArgs,
) -> Result<()> {
    let chain = block::open_chain(
        image,
        &OpenOptions {
            image: ImageOptions {
                writable: true,
                ..Default::default()
            },
            keys: keys.keys()?,
            ..Default::default()
        },
    )?;
    let layers = chain.layers.len() as u32;
    if layers == 0 {
        eprintln!(
            "qcow2fs: {}: no backing file; nothing to stream",
            image.display()
        );
        return Ok(());
    }
    let bottom = match bottom {
        Some(spec) => super::resolve_layer(&chain, spec)?,
        None => layers,
    };
    let top = &chain.top;
    let size = top.size();
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let b = ProgressBar::new(size);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} streaming [{bar:40}] {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let mut last_pct = u64::MAX;
    let copied = top.stream(bottom, |done, total| match &bar {
        Some(b) => b.set_position(done),
        None => {
            let pct = done * 100 / total.max(1);
            if pct != last_pct {
                last_pct = pct;
                println!("{{\"event\": \"progress\", \"done\": {done}, \"total\": {total}}}");
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if drop_backing {
        let new = match chain.layers.get(bottom as usize) {
            Some(l) => {
                let name = backing_name(image, &l.info().path);
                Some((
                    name.into_os_string().into_encoded_bytes(),
                    l.info().format.to_string(),
                ))
            }
            None => None,
        };
        let shown = new
            .as_ref()
            .map(|(n, f)| format!("{} ({f})", String::from_utf8_lossy(n)))
            .unwrap_or_else(|| "none".into());
        chain.image().set_backing(new)?;
        eprintln!("qcow2fs: {}: backing file is now {shown}", image.display());
    }
    top.close()?;
    if !terminal {
        println!("{{\"event\": \"done\", \"copied\": {copied}, \"total\": {size}}}");
    } else {
        eprintln!(
            "qcow2fs: {}: streamed {copied} bytes from layers 1 to {bottom}",
            image.display()
        );
    }
    Ok(())
}
