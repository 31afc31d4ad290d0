//! The units that qcow2 code mixes up when they are all `u64`: offsets into the guest
//! disk, offsets into the image (host) file, and host cluster indices. Each is its own
//! type; conversions between them need the cluster size and are methods here.

use std::fmt;
use std::ops::Add;

/// A byte offset in the guest disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file (or its external data file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a cluster of the image file: its host offset divided by the cluster size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

impl GuestOffset {
    /// The offset of the guest cluster this offset lies in.
    pub fn cluster_start(self, cluster_bits: u32) -> GuestOffset {
        GuestOffset(self.0 & !((1u64 << cluster_bits) - 1))
    }

    /// The guest cluster number.
    pub fn cluster(self, cluster_bits: u32) -> u64 {
        self.0 >> cluster_bits
    }

    /// Bytes into the cluster.
    pub fn in_cluster(self, cluster_bits: u32) -> u64 {
        self.0 & ((1u64 << cluster_bits) - 1)
    }
}

impl HostOffset {
    /// The host cluster this offset lies in.
    pub fn cluster(self, cluster_bits: u32) -> HostCluster {
        HostCluster(self.0 >> cluster_bits)
    }

    /// Whether the offset starts a cluster.
    pub fn is_aligned(self, cluster_bits: u32) -> bool {
        self.0 & ((1u64 << cluster_bits) - 1) == 0
    }

    /// The clusters that `len` bytes from here touch, as (first, count).
    pub fn clusters_spanned(self, len: u64, cluster_bits: u32) -> (HostCluster, u64) {
        if len == 0 {
            return (self.cluster(cluster_bits), 0);
        }
        let first = self.0 >> cluster_bits;
        let last = (self.0 + len - 1) >> cluster_bits;
        (HostCluster(first), last - first + 1)
    }
}

impl HostCluster {
    /// Host offset of the cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }
}

macro_rules! add_bytes {
    ($t:ident) => {
        impl Add<u64> for $t {
            type Output = $t;

            fn add(self, n: u64) -> $t {
                $t(self.0 + n)
            }
        }
    };
}

add_bytes!(GuestOffset);
add_bytes!(HostOffset);
add_bytes!(HostCluster);

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let g = GuestOffset(0x12345);
        assert_eq!(g.cluster_start(16), GuestOffset(0x10000));
        assert_eq!(g.cluster(16), 1);
        assert_eq!(g.in_cluster(16), 0x2345);
        let h = HostOffset(0x50000);
        assert_eq!(h.cluster(16), HostCluster(5));
        assert_eq!(HostCluster(5).offset(16), h);
        assert!(h.is_aligned(16) && !HostOffset(0x50200).is_aligned(16));
        assert_eq!(
            HostOffset(0xffff).clusters_spanned(2, 16),
            (HostCluster(0), 2)
        );
        assert_eq!(h.clusters_spanned(0x10000, 16), (HostCluster(5), 1));
        assert_eq!(format!("{h}"), "0x50000");
    }
}
