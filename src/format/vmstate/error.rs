//! What goes wrong while reading a migration stream: a format problem at a stream offset
//! (reusing [`FormatError`]: broken or merely unsupported), a read of the underlying bytes
//! that failed, or a warning about something skipped.

use crate::format::FormatError;
use std::fmt;
use std::io;

/// Why a stream could not be parsed.
#[derive(Debug)]
pub enum VmStateError {
    /// The bytes break the stream format, use something not implemented here, or exceed
    /// one of the [`Limits`](super::Limits). `offset` is a stream offset.
    Format(FormatError),
    /// The byte source failed while `len` bytes at stream offset `offset` were read.
    Read {
        /// Stream offset of the read.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// What the source reported.
        source: io::Error,
    },
}

impl VmStateError {
    pub(crate) fn invalid(field: impl Into<String>, offset: u64, msg: impl Into<String>) -> Self {
        VmStateError::Format(FormatError::invalid(field, offset, msg))
    }

    pub(crate) fn unsupported(
        field: impl Into<String>,
        offset: u64,
        msg: impl Into<String>,
    ) -> Self {
        VmStateError::Format(FormatError::unsupported(field, offset, msg))
    }

    /// The stream offset the error concerns.
    pub fn offset(&self) -> u64 {
        match self {
            VmStateError::Format(e) => e.offset,
            VmStateError::Read { offset, .. } => *offset,
        }
    }
}

impl fmt::Display for VmStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmStateError::Format(e) => write!(f, "VM state stream: {e}"),
            VmStateError::Read {
                offset,
                len,
                source,
            } => write!(
                f,
                "VM state stream: reading {len} bytes at offset {offset:#x}: {source}"
            ),
        }
    }
}

impl std::error::Error for VmStateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmStateError::Format(_) => None,
            VmStateError::Read { source, .. } => Some(source),
        }
    }
}

/// A result whose error is a [`VmStateError`] unless said otherwise.
pub type Result<T, E = VmStateError> = std::result::Result<T, E>;

/// Something the parser skipped or could not check; the parse still succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The stream offset it concerns.
    pub offset: u64,
    /// What was skipped or not checked.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VM state stream at offset {:#x}: {}",
            self.offset, self.message
        )
    }
}

/// Most warnings one parse keeps; a hostile stream could otherwise make one per byte.
pub const MAX_WARNINGS: usize = 64;

/// The warnings of one parse, capped at [`MAX_WARNINGS`] (the last says how many more).
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    list: Vec<Warning>,
    dropped: u64,
}

impl Warnings {
    pub(crate) fn push(&mut self, offset: u64, message: impl Into<String>) {
        if self.list.len() < MAX_WARNINGS - 1 {
            self.list.push(Warning {
                offset,
                message: message.into(),
            });
        } else {
            self.dropped += 1;
        }
    }

    pub(crate) fn finish(mut self, end: u64) -> Vec<Warning> {
        if self.dropped > 0 {
            self.list.push(Warning {
                offset: end,
                message: format!("{} further warnings left out", self.dropped),
            });
        }
        self.list
    }
}
