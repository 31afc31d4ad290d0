//! One qcow2 image's metadata: the header, L1/L2 tables and their cache, snapshots. The
//! engine answers "where does this guest range live?" with a [`Mapping`]; it never moves
//! guest data (that is `block`'s job).
//!
//! # Locking rules
//!
//! 1. `Image::meta` (a reader-writer lock) guards the header and the active L1 table.
//!    Lookups hold it shared for the duration of one [`Image::map`] call; anything that
//!    changes metadata holds it exclusively.
//! 2. The L2 cache's own lock is a leaf: it is taken under rule 1's lock or alone, and
//!    nothing else is taken while it is held. Cached tables are `Arc`s with atomic entries,
//!    so a lookup that holds a table sees either the old or the new value of an entry,
//!    never a torn one.
//! 3. No engine lock is held during guest data I/O: a caller maps, drops the lock, then
//!    reads or writes the data.
//! 4. The snapshot-L1 map's mutex is a leaf as well; snapshot L1 tables never change
//!    once loaded.
//! 5. In a writable image, guest range locks (`ranges`) are taken before rule 1's lock
//!    and held across data I/O: a write holds its clusters exclusively from
//!    [`Image::plan_write`] until [`Image::publish`], a read of the active disk holds its
//!    clusters shared from mapping until its data is read. A reader therefore never uses
//!    a mapping that a write is replacing, and a cluster is only freed (after a flush)
//!    once no reader can still be reading it. Snapshot views need no range locks: what
//!    they reference is shared (refcount > 1) and is copied, never changed or freed.
//! 6. Metadata write-back (`flush`) runs under rule 1's exclusive lock, in the order
//!    written at the top of `flush`. A failed metadata write makes every later write
//!    fail (EIO) instead of carrying on.

pub mod cache;
pub mod create;
mod flush;
mod image;
mod map;
mod overlap;
mod ranges;
mod rebuild;
mod refcount;
mod write;

pub use image::{CacheStats, DEFAULT_CACHE_BYTES, Image, ImageOptions, Meta, Snapshot, View};
pub use map::{MapKind, Mapping};
pub use ranges::{RangeGuard, RangeLocks};
pub use write::ClusterWrite;
