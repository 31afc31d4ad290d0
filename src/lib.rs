//! qcow2fs: qcow2 disk images, their internal snapshots and their backing layers as raw
//! files. Modules depend one way only: `format` <- `engine` <- `block` <- `fuse` <- `cli`.

pub mod block;
pub mod cli;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod format;
pub mod fuse;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
