//! The qcow2 on-disk format: bytes in, validated types out, and back. No files, no I/O, no
//! locks: every parser here works on a byte slice, so it can be unit-tested and fuzzed.

pub mod bitmap;
pub mod compressed;
pub mod entry;
pub mod error;
pub mod header;
pub mod refcount;
pub mod snapshot;
pub mod units;
pub mod vmstate;

pub use error::{FormatError, Problem};
