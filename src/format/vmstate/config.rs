//! The configuration section (type 0x07), which QEMU writes right after the file header:
//! a be32 length and the machine type name, then optional subsections (each 0x05, a
//! counted name, a be32 version and fields): `configuration/target-page-bits` (be32),
//! `configuration/capabilities` (be32 count, then counted capability names) and
//! `configuration/uuid` (16 bytes). An unknown subsection has no known length: an error.

use super::error::{Result, VmStateError};
use super::reader::{Cursor, ReadAt};

/// Longest machine type name accepted (QEMU's are under 40 bytes).
const MAX_MACHINE_NAME: u32 = 256;
/// Most capabilities accepted (QEMU has about 25, and sends only the few it validates).
const MAX_CAPABILITIES: u32 = 256;
/// The page sizes a target may have: 1 KiB to 64 KiB.
const PAGE_BITS: std::ops::RangeInclusive<u32> = 10..=16;

const SUBSECTION: u8 = 0x05;

/// What the configuration section says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    /// The machine type, e.g. `pc-q35-10.0`.
    pub machine: String,
    /// From `configuration/target-page-bits`; absent means the target's minimum.
    pub target_page_bits: Option<u32>,
    /// Migration capabilities the source validated (`x-ignore-shared`, `mapped-ram`).
    pub capabilities: Vec<String>,
    /// The VM's UUID, when the stream records one.
    pub uuid: Option<[u8; 16]>,
}

impl Configuration {
    /// Whether the source validated the capability `name`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

/// Parses the section's body; the cursor is just past the type byte.
pub(crate) fn parse<R: ReadAt + ?Sized>(c: &mut Cursor<'_, R>) -> Result<Configuration> {
    let at = c.pos();
    let len = c.be32("configuration name length")?;
    if len > MAX_MACHINE_NAME {
        return Err(VmStateError::invalid(
            "configuration name length",
            at,
            format!("{len} bytes is not a machine type name"),
        ));
    }
    let name = c.bytes("configuration machine name", len as usize)?;
    let mut conf = Configuration {
        machine: String::from_utf8_lossy(name).into_owned(),
        ..Default::default()
    };
    while !c.at_end() && c.peek_at("configuration", c.pos(), 1)?[0] == SUBSECTION {
        let sub_at = c.pos();
        c.skip("configuration subsection", 1)?;
        let sub = c.counted_str("configuration subsection name")?;
        let _version = c.be32("configuration subsection version")?;
        match sub.as_str() {
            "configuration/target-page-bits" => {
                let bits_at = c.pos();
                let bits = c.be32("target page bits")?;
                if !PAGE_BITS.contains(&bits) {
                    return Err(VmStateError::unsupported(
                        "target page bits",
                        bits_at,
                        format!("a target page of 2^{bits} bytes"),
                    ));
                }
                conf.target_page_bits = Some(bits);
            }
            "configuration/capabilities" => {
                let n_at = c.pos();
                let n = c.be32("capability count")?;
                if n > MAX_CAPABILITIES {
                    return Err(VmStateError::invalid(
                        "capability count",
                        n_at,
                        format!("{n} capabilities (at most {MAX_CAPABILITIES})"),
                    ));
                }
                for _ in 0..n {
                    conf.capabilities.push(c.counted_str("capability name")?);
                }
            }
            "configuration/uuid" => {
                let b = c.bytes("configuration uuid", 16)?;
                conf.uuid = Some(b.try_into().unwrap());
            }
            _ => {
                return Err(VmStateError::unsupported(
                    "configuration subsection",
                    sub_at,
                    format!("unknown subsection {sub:?}: its length is not known"),
                ));
            }
        }
    }
    Ok(conf)
}
