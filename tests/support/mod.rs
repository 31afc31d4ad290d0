//! The integration tests' support library, shared by every suite (`mod support;`). Each
//! module owns one thing; `tests/README.md` says what each offers and where a new test
//! goes.
//!
//! - [`process`]: running programs with a time limit, processes, waiting with a deadline;
//! - [`files`]: temporary directories, paths, mount points, file trees, sparse copies;
//! - [`bytes`]: comparisons that name the first difference, big-endian fields, sizes, and
//!   the deterministic generator;
//! - [`fileio`]: reads and writes through a mount (O_DIRECT, fallocate, lseek, errno);
//! - [`qemu`]: QEMU as the oracle (qemu-img, qemu-io, renderings, map/info JSON,
//!   `qemu-img check`, a QEMU process holding an image);
//! - [`cli`] and [`blockdev`]: the code under test, as a binary and as a library;
//! - [`mount`] and [`loopdev`]: real mounts and loop devices, undone on drop;
//!   [`mounttable`]: what is mounted where, and by which daemon;
//! - [`layout`]: what a mount must show (names, sizes, st_blocks, mtimes) per QEMU;
//! - [`model`]: what a written disk must hold, and what must not change;
//! - [`images`], [`corpus`] and [`patch`]: building scenario images with QEMU's tools,
//!   the named scenario corpus, and byte patches QEMU will not make;
//! - [`remote`]: an HTTP server with range requests and faults on command, and moto's S3
//!   server, for remote images;
//! - [`vmstream`] and [`vmfixtures`]: VM-state streams built by the tests, and the
//!   QEMU-made VM-state fixtures.
//!
//! Nothing here decides what is correct from qcow2fs's own code: expected values come
//! from QEMU or from what a test itself wrote.

// Each suite uses part of the library.
#![allow(dead_code, unused_imports, unused_macros)]

#[macro_use]
pub mod corpus;
pub mod blockdev;
pub mod bytes;
pub mod cli;
pub mod fileio;
pub mod files;
pub mod images;
pub mod layout;
pub mod loopdev;
pub mod model;
pub mod mount;
pub mod mounttable;
pub mod patch;
pub mod process;
pub mod qemu;
pub mod remote;
pub mod vmfixtures;
pub mod vmstream;

pub use blockdev::*;
pub use bytes::*;
pub use cli::*;
pub use fileio::*;
pub use files::*;
pub use layout::*;
pub use loopdev::*;
pub use model::*;
pub use mount::*;
pub use mounttable::*;
pub use process::*;
pub use qemu::*;
