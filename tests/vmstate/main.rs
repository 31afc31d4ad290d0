//! The VM-state parser (`format::vmstate`): real savevm streams made with QEMU, streams
//! built here for what those lack, and damaged and hostile streams.

#[path = "../support/mod.rs"]
mod support;

mod fixtures;
mod hostile;
mod streams;
