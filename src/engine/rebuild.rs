//! Rebuilding refcounts from the metadata (an image left dirty by a crash with lazy
//! refcounts), as `qemu-img check -r all` does.

use super::image::Image;
use crate::error::Result;

impl Image {
    pub(crate) fn rebuild_refcounts(&self) -> Result<()> {
        Err(crate::error::Error::unsupported(
            "rebuilding refcounts of a dirty image is not implemented yet",
        )
        .in_file(&self.path))
    }
}
