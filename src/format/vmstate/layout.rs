//! Where the main RAM block sits in the guest's physical address space, computed as
//! QEMU 10's x86 machines compute it (hw/i386/pc_piix.c and pc_q35.c) from the machine
//! type and the RAM size:
//!
//! - i440fx (`pc-i440fx-*`, `pc-*`, `isapc`): the low-memory limit is
//!   `max-ram-below-4g`, 0xe0000000 by default; when the RAM is at least that large and
//!   the machine type aligns to gigabytes (every `pc-i440fx` type from 2.0 on), the
//!   limit drops to 0xc0000000 at most.
//! - q35 (`pc-q35-*`): 0x80000000 when the RAM is 0xb0000000 or more, else 0xb0000000;
//!   `max-ram-below-4g` (4 GiB by default) can only lower it.
//!
//! RAM below the limit is mapped 1:1; the rest starts at 4 GiB. The space between is a
//! hole (PCI and firmware, not RAM).
//!
//! Not modelled: `max-ram-below-4g` is a command-line option the stream does not record
//! (callers may pass it); NUMA guests and custom memory backends split RAM into blocks
//! not named `pc.ram`; an AMD vCPU whose address space would reach the HyperTransport
//! hole below 1 TiB moves the RAM above 4 GiB to 1 TiB (a warning is given for such
//! sizes); Xen (`xenfv`) and `microvm` lay memory out their own way.

/// The start of RAM above the 4 GiB boundary.
pub const FOUR_GIB: u64 = 1 << 32;
/// Where AMD's HyperTransport hole starts (below 1 TiB).
const AMD_HT_START: u64 = 0xfd_0000_0000;

/// How a machine type lays out RAM below 4 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineKind {
    /// i440fx and isapc boards (`pc_init1`).
    I440fx {
        /// RAM below 4 GiB ends at 3 GiB when it does not fit below 3.5 GiB (machine
        /// types from 2.0 on); older ones end it at 3.5 GiB.
        gigabyte_align: bool,
    },
    /// q35 boards.
    Q35,
}

/// Recognises the x86 PC machine types by name.
pub fn machine_kind(machine: &str) -> Option<MachineKind> {
    if machine.starts_with("pc-q35-") || machine == "q35" {
        return Some(MachineKind::Q35);
    }
    if machine == "isapc" {
        return Some(MachineKind::I440fx {
            gigabyte_align: false,
        });
    }
    if machine == "pc" {
        return Some(MachineKind::I440fx {
            gigabyte_align: true,
        });
    }
    if let Some(v) = machine.strip_prefix("pc-i440fx-") {
        // Numbered types before 2.0 kept the old split; downstream names
        // (pc-i440fx-rhel7.6.0) are all newer.
        let old = version(v).is_some_and(|(major, _)| major < 2);
        return Some(MachineKind::I440fx {
            gigabyte_align: !old,
        });
    }
    if let Some(v) = machine.strip_prefix("pc-")
        && version(v).is_some()
    {
        // The 0.x and 1.x types named pc-X.Y predate the gigabyte alignment.
        return Some(MachineKind::I440fx {
            gigabyte_align: false,
        });
    }
    None
}

/// `major.minor[...]` at the start of `s`.
fn version(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The main RAM block's place in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysicalLayout {
    /// The machine's board.
    pub kind: MachineKind,
    /// Bytes of RAM mapped 1:1 from address 0.
    pub below_4g: u64,
    /// Bytes of RAM mapped from 4 GiB, following the block's first `below_4g` bytes.
    pub above_4g: u64,
}

/// A piece of guest-physical memory as the layout maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes at this offset of the main RAM block.
    Ram {
        /// Offset in the main RAM block.
        block_offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes that are not RAM.
    Gap {
        /// Length in bytes.
        len: u64,
    },
}

impl PhysicalLayout {
    /// The layout QEMU gives `ram_size` bytes of RAM on `machine`; `max_ram_below_4g`
    /// is the machine option of that name when the guest was started with it. `None`
    /// for machine types not modelled, an option value QEMU refuses (above 4 GiB), or
    /// more than 2^62 bytes of RAM.
    pub fn for_machine(
        machine: &str,
        ram_size: u64,
        max_ram_below_4g: Option<u64>,
    ) -> Option<PhysicalLayout> {
        let kind = machine_kind(machine)?;
        // Far beyond any real guest: an image that large would not fit in 64 bits.
        if max_ram_below_4g.is_some_and(|m| m > FOUR_GIB) || ram_size > 1 << 62 {
            return None;
        }
        // QEMU treats 0 as "not set".
        let user = max_ram_below_4g.filter(|&m| m != 0);
        let lowmem = match kind {
            MachineKind::I440fx { gigabyte_align } => {
                let limit = user.unwrap_or(0xe000_0000);
                if ram_size >= limit && gigabyte_align {
                    limit.min(0xc000_0000)
                } else {
                    limit
                }
            }
            MachineKind::Q35 => {
                let lowmem = if ram_size >= 0xb000_0000 {
                    0x8000_0000
                } else {
                    0xb000_0000
                };
                lowmem.min(user.unwrap_or(FOUR_GIB))
            }
        };
        let (below_4g, above_4g) = if ram_size >= lowmem {
            (lowmem, ram_size - lowmem)
        } else {
            (ram_size, 0)
        };
        Some(PhysicalLayout {
            kind,
            below_4g,
            above_4g,
        })
    }

    /// The size of the physical image: up to the end of the RAM above 4 GiB, or of
    /// the RAM below it when there is none above.
    pub fn size(&self) -> u64 {
        if self.above_4g > 0 {
            FOUR_GIB + self.above_4g
        } else {
            self.below_4g
        }
    }

    /// Whether an AMD vCPU could have moved the RAM above 4 GiB to 1 TiB (QEMU does
    /// when the highest guest address, PCI hole included, reaches the HyperTransport
    /// hole; 64 GiB is allowed for the hole and device memory).
    pub fn near_amd_hole(&self) -> bool {
        self.above_4g > 0 && (FOUR_GIB + self.above_4g).saturating_add(64 << 30) >= AMD_HT_START
    }

    /// What is at guest-physical `offset`, for at most `max_len` bytes; `None` at or
    /// past [`size`](Self::size) or when `max_len` is 0.
    pub fn map(&self, offset: u64, max_len: u64) -> Option<Segment> {
        if offset >= self.size() || max_len == 0 {
            return None;
        }
        let max_len = max_len.min(self.size() - offset);
        Some(if offset < self.below_4g {
            Segment::Ram {
                block_offset: offset,
                len: max_len.min(self.below_4g - offset),
            }
        } else if offset < FOUR_GIB {
            Segment::Gap {
                len: max_len.min(FOUR_GIB - offset),
            }
        } else {
            Segment::Ram {
                block_offset: self.below_4g + (offset - FOUR_GIB),
                len: max_len,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn split(machine: &str, ram: u64) -> (u64, u64) {
        let l = PhysicalLayout::for_machine(machine, ram, None).unwrap();
        (l.below_4g, l.above_4g)
    }

    #[test]
    fn i440fx_splits_at_3_gib_once_ram_reaches_3_5_gib() {
        assert_eq!(split("pc-i440fx-10.0", 32 * MIB), (32 * MIB, 0));
        assert_eq!(split("pc-i440fx-10.0", 3 * GIB), (3 * GIB, 0));
        assert_eq!(split("pc-i440fx-9.2", 0xdfff_f000), (0xdfff_f000, 0));
        assert_eq!(split("pc-i440fx-10.0", 0xe000_0000), (3 * GIB, GIB / 2));
        assert_eq!(split("pc-i440fx-10.0", 8 * GIB), (3 * GIB, 5 * GIB));
        // Types before 2.0 and the isa-only PC keep 3.5 GiB.
        assert_eq!(split("pc-i440fx-1.7", 4 * GIB), (0xe000_0000, GIB / 2));
        assert_eq!(split("pc-1.3", 4 * GIB), (0xe000_0000, GIB / 2));
        assert_eq!(split("isapc", 4 * GIB), (0xe000_0000, GIB / 2));
        assert_eq!(split("pc-i440fx-rhel7.6.0", 4 * GIB), (3 * GIB, GIB));
    }

    #[test]
    fn q35_splits_at_2_gib_once_ram_reaches_2_75_gib() {
        assert_eq!(split("pc-q35-10.0", 64 * MIB), (64 * MIB, 0));
        assert_eq!(split("pc-q35-10.0", 0xafff_f000), (0xafff_f000, 0));
        assert_eq!(split("pc-q35-10.0", 0xb000_0000), (2 * GIB, 0x3000_0000));
        assert_eq!(split("pc-q35-9.2", 16 * GIB), (2 * GIB, 14 * GIB));
    }

    #[test]
    fn max_ram_below_4g_moves_the_limit_as_qemu_does() {
        let l = |m: &str, ram, lim| {
            let l = PhysicalLayout::for_machine(m, ram, Some(lim)).unwrap();
            (l.below_4g, l.above_4g)
        };
        assert_eq!(l("pc-i440fx-10.0", 4 * GIB, 2 * GIB), (2 * GIB, 2 * GIB));
        // Raising it is allowed on i440fx, but gigabyte alignment caps large guests.
        assert_eq!(l("pc-i440fx-10.0", 3968 * MIB, 4 * GIB), (3968 * MIB, 0));
        assert_eq!(l("pc-i440fx-10.0", 5 * GIB, 4 * GIB), (3 * GIB, 2 * GIB));
        // q35 takes the smaller of its own limit and the option.
        assert_eq!(l("pc-q35-10.0", 4 * GIB, 3 * GIB), (2 * GIB, 2 * GIB));
        assert_eq!(l("pc-q35-10.0", 2 * GIB, GIB), (GIB, GIB));
        assert!(PhysicalLayout::for_machine("pc-q35-10.0", GIB, Some(5 * GIB)).is_none());
    }

    #[test]
    fn unknown_machines_have_no_layout() {
        for m in [
            "virt-10.0",
            "microvm",
            "xenfv-4.2",
            "pc-foo",
            "s390-ccw-virtio-10.0",
        ] {
            assert!(PhysicalLayout::for_machine(m, GIB, None).is_none(), "{m}");
        }
    }

    #[test]
    fn map_walks_ram_the_hole_and_ram_above_4_gib() {
        let l = PhysicalLayout::for_machine("pc-q35-10.0", 3 * GIB, None).unwrap();
        assert_eq!(l.size(), FOUR_GIB + GIB);
        assert_eq!(
            l.map(0, u64::MAX),
            Some(Segment::Ram {
                block_offset: 0,
                len: 2 * GIB
            })
        );
        assert_eq!(
            l.map(2 * GIB, u64::MAX),
            Some(Segment::Gap { len: 2 * GIB })
        );
        assert_eq!(
            l.map(FOUR_GIB + 5, 10),
            Some(Segment::Ram {
                block_offset: 2 * GIB + 5,
                len: 10
            })
        );
        assert_eq!(l.map(FOUR_GIB + GIB, 1), None);
        assert!(!l.near_amd_hole());
        let big = PhysicalLayout::for_machine("pc-q35-10.0", 1000 * GIB, None).unwrap();
        assert!(big.near_amd_hole());
    }
}
