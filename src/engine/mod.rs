//! One qcow2 image's metadata: the header, L1/L2 tables and their cache, snapshots,
//! refcounts and allocation. The engine answers "where does this guest range live?" with
//! a [`Mapping`] and plans where writes go; it never moves guest data (that is `block`'s
//! job). Its locking rules (L1-L5) and flush rules (F1-F6) are written in
//! `docs/design.md`, and the code cites them.
//!
//! Each module owns one thing: `image` the state and its accessors, `open` how it is
//! read from the file, `metaio` metadata I/O with sticky failure, `alloc` refcounts and
//! allocation, `overlap` the record of metadata clusters, `cache` the L2 cache, `map`
//! lookups, `write` write planning, `flush` write-back ordering, `lifecycle` the changes
//! to the image as a whole, `rebuild` refcount repair, `ranges` guest range locks,
//! `prealloc` QEMU's preallocation test, `snapshot` internal snapshots of a writable
//! image, `vmstate` where a snapshot's VM state lies, `create` new images, `encryption`
//! the encryption state (LUKS header, the cipher once unlocked), `bitmaps` persistent
//! dirty bitmaps kept valid while the image is written (with `dirty` their bits in memory
//! and `bitmap_ops` what users do with them).

mod alloc;
mod bitmap_ops;
mod bitmaps;
// Public for the engine benchmark, which measures decoding an L2 table.
pub mod cache;
pub mod create;
mod dirty;
mod encryption;
mod flush;
mod image;
mod lifecycle;
mod map;
mod metaio;
mod open;
mod overlap;
mod prealloc;
mod ranges;
mod rebuild;
mod snapshot;
mod vmstate;
mod write;

pub use bitmap_ops::{BitmapInfo, default_granularity};
pub use image::{
    CacheStats, DEFAULT_CACHE_BYTES, Image, ImageOptions, Snapshot, SnapshotKey, View,
};
pub use map::{MapKind, Mapping};
pub use ranges::RangeGuard;
pub use vmstate::VmStateArea;
pub use write::ClusterWrite;
