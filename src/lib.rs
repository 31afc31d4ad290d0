//! qcow2fs: qcow2 disk images, their internal snapshots and their backing layers as raw
//! files. Modules depend one way only: `format` <- `engine` <- `block` <- `fuse` <- `cli`
//! (`docs/design.md`). `fuse` and `cli` are private: the binary calls [`main`].

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod block;
mod cli;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod format;
mod fuse;
pub mod storage;

pub use cli::main;
pub use error::{Error, ErrorKind, Result};
