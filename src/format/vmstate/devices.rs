//! Getting past device state. A FULL section's body is laid out by the device's own
//! VMState description, so its length is not in the stream. The parser finds its end by
//! searching for its footer (0x7E and the section id) and accepting a candidate only when
//! a well-formed section starts right after it: a FULL header with a printable id string
//! and an unused section id, a PART/END of the open RAM section, a known command, or EOF
//! followed by the end of the stream or a device description.
//!
//! The device description (type 0x06 after EOF, JSON with `page_size` and `devices`,
//! which lists every FULL section's id string and instance in stream order) makes this
//! exact: it is looked for once, at the end of the stream, when the first FULL section
//! comes, and then the header after a candidate footer must be the next listed device.
//!
//! Device state is not needed for the RAM: once the RAM section has ended, a device
//! section whose end cannot be found stops the walk with a warning instead of failing
//! the parse. Before that (QEMU saves a few devices before RAM) it is an error.

use super::error::{Result, VmStateError};
use super::reader::{Cursor, ReadAt, WINDOW};
use super::stream::{
    COMMAND, END, EOF, FOOTER, FULL, PART, Parser, RamPhase, START, VMDESCRIPTION,
};
use serde::Deserialize;
use std::collections::HashSet;

/// The JSON device description QEMU appends after EOF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDescription {
    /// Stream offset of its 0x06 type byte; the JSON starts 5 bytes later.
    pub offset: u64,
    /// Length of the JSON, in bytes.
    pub json_len: u32,
    /// Its `page_size`.
    pub page_size: Option<u64>,
    /// Its `devices` (id string and instance of each), or `None` when the JSON was too
    /// large to read or did not parse.
    pub devices: Option<Vec<(String, u32)>>,
}

impl VmDescription {
    /// Stream offset of the JSON's first byte.
    pub fn json_offset(&self) -> u64 {
        self.offset + 5
    }

    /// Stream offset just past the JSON.
    pub fn end(&self) -> u64 {
        self.offset + 5 + self.json_len as u64
    }
}

#[derive(Deserialize)]
struct DescJson {
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    devices: Vec<DeviceJson>,
}

#[derive(Deserialize)]
struct DeviceJson {
    name: String,
    instance_id: u32,
}

/// Skips the body of the FULL section `id` whose header starts at `at`; the cursor is
/// at its body. Returns the offset after its footer.
pub(crate) fn skip_full<R: ReadAt + ?Sized>(
    p: &mut Parser<'_, '_, R>,
    at: u64,
    id: u32,
    name: &str,
    instance: u32,
) -> Result<u64> {
    let body = p.c.pos();
    if !p.vmdesc_searched {
        p.vmdesc_searched = true;
        locate_vmdesc(p, at)?;
    }
    let listed = p.vmdesc.as_ref().and_then(|v| v.devices.as_ref());
    if let Some(devs) = listed {
        match devs.get(p.devices_walked) {
            Some((n, i)) if n == name && *i == instance => {}
            other => p.warnings.push(
                at,
                format!(
                    "device {name:?} instance {instance} where the description lists {other:?}"
                ),
            ),
        }
    }
    p.devices_walked += 1;
    if p.footers == Some(false) {
        return Err(VmStateError::unsupported(
            "device section",
            at,
            format!("{name:?}: without section footers its length cannot be found"),
        ));
    }
    let next = Expect {
        device: listed.and_then(|d| d.get(p.devices_walked)).cloned(),
        id,
        ids: &p.ids,
        ram_open: p.ram_phase == RamPhase::Open,
        ram_started: p.ram_phase != RamPhase::NotStarted,
        ram_id: p.ram_id,
        eof_then: p.vmdesc.as_ref().map(|v| v.offset),
    };
    let mut pattern = [FOOTER, 0, 0, 0, 0];
    pattern[1..].copy_from_slice(&id.to_be_bytes());
    let limit = body.saturating_add(p.limits.max_device_section_bytes);
    let found =
        p.c.find(&pattern, body, limit.saturating_add(1), |c, hit| {
            next.fits(c, hit + 5)
        })?;
    let Some(footer) = found else {
        return Err(VmStateError::invalid(
            "device section",
            at,
            format!(
                "no footer found for {name:?} (section {id}) within {:#x} bytes",
                p.limits.max_device_section_bytes
            ),
        ));
    };
    p.c.seek(footer);
    p.footer(id)?;
    Ok(p.c.pos())
}

/// What may follow the footer of the section being skipped.
struct Expect<'a> {
    /// The next device the description lists, if there is a description.
    device: Option<(String, u32)>,
    id: u32,
    ids: &'a HashSet<u32>,
    ram_open: bool,
    ram_started: bool,
    ram_id: Option<u32>,
    eof_then: Option<u64>,
}

/// Longest section header: type, id, counted name (<= 255), instance, version.
const MAX_HEADER: u64 = 1 + 4 + 1 + 255 + 8;

impl Expect<'_> {
    /// Whether a well-formed section starts at `at`.
    fn fits<R: ReadAt + ?Sized>(&self, c: &mut Cursor<'_, R>, at: u64) -> Result<bool> {
        let len = c.len();
        if at >= len {
            return Ok(at == len && self.device.is_none());
        }
        let b = c.peek_at(
            "section after a footer",
            at,
            (len - at).min(MAX_HEADER) as usize,
        )?;
        let be32 = |i: usize| {
            b.get(i..i + 4)
                .map(|s| u32::from_be_bytes(s.try_into().unwrap()))
        };
        let be16 = |i: usize| {
            b.get(i..i + 2)
                .map(|s| u16::from_be_bytes(s.try_into().unwrap()))
        };
        Ok(match b[0] {
            EOF => {
                if self.device.is_some() {
                    false
                } else if let Some(off) = self.eof_then {
                    at + 1 == off
                } else if b.len() == 1 {
                    true
                } else {
                    b[1] == VMDESCRIPTION
                        && be32(2).is_some_and(|l| {
                            at + 6 + l as u64 <= len && (l == 0 || b.get(6) == Some(&b'{'))
                        })
                }
            }
            FULL | START => {
                let Some(new_id) = be32(1) else {
                    return Ok(false);
                };
                let n = b.get(5).copied().unwrap_or(0) as usize;
                let (Some(name), Some(instance), Some(version)) =
                    (b.get(6..6 + n), be32(6 + n), be32(10 + n))
                else {
                    return Ok(false);
                };
                let well_formed = n > 0
                    && name.iter().all(|ch| (0x20..0x7f).contains(ch))
                    && new_id != self.id
                    && !self.ids.contains(&new_id)
                    && version <= 0xffff;
                if !well_formed {
                    false
                } else if b[0] == START {
                    name == b"ram" && !self.ram_started
                } else if let Some((d, i)) = &self.device {
                    d.as_bytes() == name && *i == instance
                } else {
                    // Unguided, or past the end of the description's list.
                    true
                }
            }
            PART | END => self.ram_open && be32(1).is_some() && be32(1) == self.ram_id,
            COMMAND => match (be16(1), be16(3)) {
                (Some(cmd), Some(l)) => (1..=11).contains(&cmd) && at + 5 + l as u64 <= len,
                _ => false,
            },
            _ => false,
        })
    }
}

/// Looks for the device description at the very end of the stream (only after `from`):
/// EOF, 0x06, a be32 length reaching exactly the end, and JSON from `{` to `}`.
fn locate_vmdesc<R: ReadAt + ?Sized>(p: &mut Parser<'_, '_, R>, from: u64) -> Result<()> {
    let len = p.c.len();
    if len < from + 8 || p.c.peek_at("device description", len - 1, 1)?[0] != b'}' {
        return Ok(());
    }
    let max = p.limits.max_vmdesc_bytes as u64;
    let lo = (from + 1).max(len.saturating_sub(max + 5));
    let step = (WINDOW - 8) as u64;
    let mut hi = len - 5; // candidates i satisfy i + 5 < len
    while hi > lo {
        let a = hi.saturating_sub(step).max(lo);
        let base = a - 1;
        let found = {
            let w =
                p.c.peek_at("device description", base, (hi + 5 - base) as usize)?;
            (a..hi).rev().find(|&i| {
                let k = (i - base) as usize;
                w[k] == VMDESCRIPTION
                    && w[k - 1] == EOF
                    && w[k + 5] == b'{'
                    && u32::from_be_bytes(w[k + 1..k + 5].try_into().unwrap()) as u64 == len - i - 5
            })
        };
        if let Some(i) = found {
            let json_len = (len - i - 5) as u32;
            read_json(p, i, json_len)?;
            return Ok(());
        }
        hi = a;
    }
    Ok(())
}

/// Reads the device description whose type byte is at `at` (after EOF, when it was not
/// found at the end before). Returns where the stream ends.
pub(crate) fn read_vmdesc_at<R: ReadAt + ?Sized>(
    p: &mut Parser<'_, '_, R>,
    at: u64,
) -> Result<u64> {
    let len = p.c.len();
    if at >= len || p.c.peek_at("device description", at, 1)?[0] != VMDESCRIPTION {
        return Ok(at);
    }
    if len - at < 5 {
        p.warnings
            .push(at, "the device description's header is cut off");
        return Ok(len);
    }
    p.c.seek(at + 1);
    let json_len = p.c.be32("device description length")?;
    if at + 5 + json_len as u64 > len {
        p.warnings.push(
            at,
            format!("the device description of {json_len} bytes runs past the end of the stream"),
        );
        return Ok(len);
    }
    read_json(p, at, json_len)?;
    Ok(at + 5 + json_len as u64)
}

fn read_json<R: ReadAt + ?Sized>(p: &mut Parser<'_, '_, R>, at: u64, json_len: u32) -> Result<()> {
    let mut vd = VmDescription {
        offset: at,
        json_len,
        page_size: None,
        devices: None,
    };
    if json_len > p.limits.max_vmdesc_bytes {
        p.warnings.push(
            at,
            format!(
                "the device description of {json_len} bytes is over the limit of {}: not read",
                p.limits.max_vmdesc_bytes
            ),
        );
    } else {
        let back = p.c.pos();
        p.c.seek(at + 5);
        let json = p.c.read_vec("device description", json_len as usize)?;
        p.c.seek(back);
        match serde_json::from_slice::<DescJson>(&json) {
            Ok(d) => {
                vd.page_size = d.page_size;
                let mut devs: Vec<(String, u32)> = d
                    .devices
                    .into_iter()
                    .map(|d| (d.name, d.instance_id))
                    .collect();
                if devs.len() > p.limits.max_sections {
                    p.warnings
                        .push(at, "the device description lists too many devices");
                    devs.truncate(p.limits.max_sections);
                }
                vd.devices = Some(devs);
            }
            Err(e) => p.warnings.push(
                at + 5,
                format!("the device description is not valid JSON: {e}"),
            ),
        }
    }
    p.vmdesc = Some(vd);
    Ok(())
}
