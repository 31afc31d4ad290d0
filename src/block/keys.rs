//! Passphrases for encrypted layers: where each comes from ([`KeySource`]: a key file,
//! read verbatim as QEMU reads a `secret` object's file, so a trailing newline is part of
//! the passphrase; or the terminal, without echo), which layer gets which ([`Keys`]: one
//! passphrase tried on every encrypted layer of the chain, and per-layer ones by depth),
//! and unlocking each layer as the chain is opened.
//!
//! A passphrase is read once per chain, kept in memory that is wiped when dropped, and
//! dropped as soon as the chain is open: the images keep only their payload ciphers.
//! Neither a passphrase nor anything derived from it ever goes into a message.

use crate::engine::Image;
use crate::error::{Error, ErrorKind, Result};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The longest key file read (a LUKS passphrase has no length limit; QEMU reads any
/// secret file whole). A longer file is refused rather than read in part.
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// Where a passphrase comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A file, read verbatim (every byte, a trailing newline too).
    File(PathBuf),
    /// The controlling terminal, without echo (`-` on the command line); the line typed,
    /// without its newline.
    Prompt,
}

impl KeySource {
    /// `-` for the terminal, anything else a file name.
    pub fn parse(value: &str) -> KeySource {
        if value == "-" {
            KeySource::Prompt
        } else {
            KeySource::File(PathBuf::from(value))
        }
    }

    fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("the key file {}", p.display()),
            KeySource::Prompt => "the passphrase typed".to_string(),
        }
    }
}

/// Which passphrase each encrypted layer of a chain gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    /// Tried on every encrypted layer that has no key of its own.
    pub all: Option<KeySource>,
    /// Per layer, by depth: 0 is the image itself, 1 its backing file, and so on.
    pub layers: BTreeMap<u32, KeySource>,
}

impl Keys {
    /// Whether no passphrase is given at all.
    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.layers.is_empty()
    }

    /// Parses a per-layer key given as `N=PATH` (or `N=-`).
    pub fn add_layer_spec(&mut self, spec: &str) -> std::result::Result<(), String> {
        let (depth, value) = spec.split_once('=').ok_or(
            "expected N=PATH: a layer depth (0 is the image, 1 its backing file) and a key file",
        )?;
        let depth = parse_depth(depth)?;
        self.set_layer(depth, value)
    }

    /// Sets the key of the layer at `depth` (`-` for the terminal); a later one replaces
    /// an earlier one, as later mount options do.
    pub fn set_layer(&mut self, depth: u32, value: &str) -> std::result::Result<(), String> {
        if value.is_empty() {
            return Err("the key file name is empty".into());
        }
        self.layers.insert(depth, KeySource::parse(value));
        Ok(())
    }
}

/// A layer depth as the user writes it: a decimal number below the deepest chain.
pub fn parse_depth(s: &str) -> std::result::Result<u32, String> {
    match s.parse::<u32>() {
        Ok(d)
            if s.bytes().all(|b| b.is_ascii_digit())
                && d as usize <= super::open::MAX_CHAIN_DEPTH =>
        {
            Ok(d)
        }
        _ => Err(format!(
            "layer depth {s:?} is not a number from 0 (the image) to {}",
            super::open::MAX_CHAIN_DEPTH
        )),
    }
}

/// A passphrase, wiped when dropped.
type Passphrase = Zeroizing<Vec<u8>>;

/// Reads a key file verbatim: regular files only, opened without blocking (a FIFO is
/// refused, not waited on), at most [`MAX_KEY_FILE_BYTES`], into one buffer allocated
/// once (no copies left behind by growing it).
pub fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let what = "reading the key file";
    let mut f = crate::storage::open_regular(path, false).map_err(|e| Error::io(path, what, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, what, e))?.len();
    if len > MAX_KEY_FILE_BYTES {
        return Err(Error::invalid(format!(
            "the key file is {len} bytes, more than the {MAX_KEY_FILE_BYTES} a passphrase may have"
        ))
        .in_file(path));
    }
    let mut buf = Zeroizing::new(vec![0u8; len as usize]);
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, what, e)),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// Asks for a passphrase on the controlling terminal, without echo.
fn prompt(image: &Path, depth: u32) -> Result<Passphrase> {
    let text = if depth == 0 {
        format!("Passphrase for {}: ", image.display())
    } else {
        format!("Passphrase for {} (layer {depth}): ", image.display())
    };
    let typed = rpassword::prompt_password(text).map_err(|e| {
        Error::io(
            Path::new("/dev/tty"),
            "asking for a passphrase (key-file=- needs a terminal)",
            e,
        )
    })?;
    Ok(Zeroizing::new(typed.into_bytes()))
}

/// Unlocks the encrypted layers of one chain as it is opened.
pub(crate) struct KeyLoader<'a> {
    keys: &'a Keys,
    /// Passphrases read so far: `None` for the one of every layer, `Some(depth)` for a
    /// layer's own.
    read: HashMap<Option<u32>, Passphrase>,
    /// Layers that took their own key.
    used: BTreeSet<u32>,
    /// Encrypted layers may stay locked (only their metadata is wanted).
    locked_ok: bool,
}

impl<'a> KeyLoader<'a> {
    pub(crate) fn new(keys: &'a Keys, locked_ok: bool) -> Self {
        KeyLoader {
            keys,
            read: HashMap::new(),
            used: BTreeSet::new(),
            locked_ok,
        }
    }

    /// Unlocks `image`, the layer at `depth`, if it is encrypted: with its own key if it
    /// has one, else with the one for every layer; without either, an error that says
    /// how to give one (or, when allowed, it stays locked).
    pub(crate) fn unlock(&mut self, image: &Image, depth: u32) -> Result<()> {
        if !image.is_encrypted() {
            return Ok(());
        }
        let (slot, source) = match (self.keys.layers.get(&depth), &self.keys.all) {
            (Some(s), _) => (Some(depth), s),
            (None, Some(s)) => (None, s),
            (None, None) if self.locked_ok => return Ok(()),
            (None, None) => return Err(no_key(image, depth)),
        };
        if slot.is_some() {
            self.used.insert(depth);
        }
        let passphrase = match self.read.entry(slot) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(match source {
                KeySource::File(path) => read_key_file(path)?,
                KeySource::Prompt => prompt(image.path(), depth)?,
            }),
        };
        image.unlock(passphrase).map_err(|e| {
            if e.kind() == ErrorKind::InvalidInput {
                e.during(format!("unlocking with {}", source.describe()))
            } else {
                e
            }
        })
    }

    /// Refuses per-layer keys that no encrypted layer took (a mistyped depth, or a layer
    /// that is not encrypted), once the whole chain is open.
    pub(crate) fn finish(self, top: &Path) -> Result<()> {
        for depth in self.keys.layers.keys() {
            if !self.used.contains(depth) {
                return Err(Error::invalid(format!(
                    "a key was given for layer {depth}, but the chain has no encrypted qcow2 image at that depth"
                ))
                .in_file(top));
            }
        }
        Ok(())
    }
}

/// The error for an encrypted layer opened without a key: how to give one.
fn no_key(image: &Image, depth: u32) -> Error {
    let what = image.encryption_name().unwrap_or_default();
    let how = if depth == 0 {
        "give its passphrase in a file with -o key-file=PATH (mount) or --key-file PATH (info, cat, map, stream); PATH - asks on the terminal".to_string()
    } else {
        format!(
            "it is layer {depth} of the chain; give its passphrase with -o key-file=PATH (tried on every layer) or -o key-file.{depth}=PATH (mount), or --key-file PATH or --layer-key-file {depth}=PATH (info, cat, map, stream); PATH - asks on the terminal"
        )
    };
    Error::new(
        ErrorKind::InvalidInput,
        format!("the image is encrypted ({what}) and no key was given: {how}"),
    )
    .in_file(image.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_specs_and_depths() {
        let mut k = Keys::default();
        k.add_layer_spec("1=/k/one").unwrap();
        k.add_layer_spec("0=-").unwrap();
        assert_eq!(k.layers[&1], KeySource::File("/k/one".into()));
        assert_eq!(k.layers[&0], KeySource::Prompt);
        k.add_layer_spec("1=/k/again").unwrap();
        assert_eq!(k.layers[&1], KeySource::File("/k/again".into()));
        for bad in ["x=/k", "/k", "-1=/k", "+1=/k", "65=/k", "2="] {
            assert!(k.add_layer_spec(bad).is_err(), "{bad}");
        }
        // A path may hold '=' after the depth.
        k.add_layer_spec("2=/k/a=b").unwrap();
        assert_eq!(k.layers[&2], KeySource::File("/k/a=b".into()));
    }

    #[test]
    fn key_files_are_read_verbatim_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"pass phrase\n").unwrap();
        assert_eq!(&read_key_file(&p).unwrap()[..], b"pass phrase\n");
        std::fs::write(&p, b"").unwrap();
        assert!(read_key_file(&p).unwrap().is_empty());
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_KEY_FILE_BYTES + 1).unwrap();
        let e = read_key_file(&p).unwrap_err().report();
        assert!(e.contains("more than"), "{e}");
        // A FIFO is refused at once, not waited on.
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_key_file(&fifo).unwrap_err().report();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
