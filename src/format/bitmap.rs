//! The persistent-bitmap directory (the bitmaps extension of the qcow2 format). qcow2fs does not use bitmaps
//! for reading; it lists them and refuses to write where it would leave them stale.

use super::error::{FormatError, be16, be32, be64};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;

/// One bitmap-directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
}

impl BitmapEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
}

/// Parses a bitmap directory of `nb` entries that must exactly fill `bytes`.
pub fn parse_directory(
    bytes: &[u8],
    nb: u32,
    dir_offset: u64,
) -> Result<Vec<BitmapEntry>, FormatError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for i in 0..nb {
        let at = dir_offset + pos as u64;
        let field = format!("bitmap directory entry {i}");
        if pos + 24 > bytes.len() {
            return Err(FormatError::invalid(
                field,
                at,
                "runs past the end of the directory",
            ));
        }
        let e = &bytes[pos..];
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        if name_size == 0 || name_size > 1023 {
            return Err(FormatError::invalid(
                field,
                at + 18,
                format!("name size {name_size}"),
            ));
        }
        if extra > 64 * 1024 {
            return Err(FormatError::invalid(
                field,
                at + 20,
                format!("extra data size {extra}"),
            ));
        }
        let len = (24 + extra + name_size).next_multiple_of(8);
        if pos + len > bytes.len() {
            return Err(FormatError::invalid(
                field,
                at,
                "runs past the end of the directory",
            ));
        }
        let name = String::from_utf8_lossy(&e[24 + extra..24 + extra + name_size]).into_owned();
        out.push(BitmapEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name,
        });
        pos += len;
    }
    if pos != bytes.len() {
        return Err(FormatError::invalid(
            "bitmap directory",
            dir_offset,
            format!(
                "{nb} entries use {pos} bytes but the directory size is {}",
                bytes.len()
            ),
        ));
    }
    Ok(out)
}
