//! The error every parser in `format` returns: which field, where, and what is wrong.

use std::fmt;

/// Whether the bytes are damaged or merely use something qcow2fs does not implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The bytes break the format (or one of QEMU's sanity limits).
    Invalid,
    /// The bytes are valid qcow2 but use a feature qcow2fs refuses to serve.
    Unsupported,
}

/// A parse failure: the field, its byte offset in the image file, and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatError {
    /// Damaged, or valid but unsupported.
    pub problem: Problem,
    /// The field, as the format names it (`l1_size`).
    pub field: String,
    /// Byte offset of the field in the image file.
    pub offset: u64,
    /// What is wrong with it.
    pub message: String,
}

impl FormatError {
    /// The bytes of `field` at `offset` break the format.
    pub fn invalid(field: impl Into<String>, offset: u64, message: impl Into<String>) -> Self {
        FormatError {
            problem: Problem::Invalid,
            field: field.into(),
            offset,
            message: message.into(),
        }
    }

    /// The bytes of `field` at `offset` use something qcow2fs does not implement.
    pub fn unsupported(field: impl Into<String>, offset: u64, message: impl Into<String>) -> Self {
        FormatError {
            problem: Problem::Unsupported,
            field: field.into(),
            offset,
            message: message.into(),
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {:#x}: {}",
            self.field, self.offset, self.message
        )
    }
}

impl std::error::Error for FormatError {}

/// Big-endian readers over a byte slice; the caller guarantees the bounds.
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
