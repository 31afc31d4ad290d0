//! QEMU migration streams as `savevm` stores them in a qcow2 internal snapshot (the VM
//! state), and the guest memory rebuilt from them. Bytes in (through [`ReadAt`], so a
//! multi-gigabyte stream is never loaded whole), validated types out; no files, no locks.
//!
//! ```text
//! let sum = VmState::summary(&source, vm_state_size)?;  // first 64 KiB only: machine,
//!                                                       // blocks, physical layout/size
//! let state = VmState::parse(&source, vm_state_size)?;   // one pass over the stream
//! state.configuration()   // machine type ("pc-q35-10.0"), page size, capabilities
//! state.blocks()          // RAM blocks: name, size, per-block lookup(off, len)
//! state.physical_size()   // guest-physical image of the main RAM block (pc.ram)
//! state.lookup_physical(off, len) -> Extent { Data { stream_offset } | Fill(b) | Hole, len }
//! ```
//!
//! A reader of the physical image (or of one block) loops over `lookup_*`: a `Data`
//! extent is read from the stream at `stream_offset` (never past a page end), `Fill(b)`
//! is `len` bytes of `b`, `Hole` is zeros. [`Extent::reads_as_zero`] tells holes and
//! zero pages apart from data for `SEEK_DATA`/`SEEK_HOLE`.
//!
//! What is parsed: the file header, every section type QEMU 10 writes in a savevm stream
//! ([`stream`]), the configuration ([`config`]), the RAM section with every page flag
//! ([`ram`]), device sections, which are skipped ([`devices`]), and the JSON device
//! description after EOF. The page index is in [`index`], the guest-physical layout in
//! [`layout`].
//!
//! Device state is skipped, not interpreted: its sections have no length field, so the
//! parser finds each one's footer, checked against the JSON device description when
//! there is one ([`devices`] says how, and what is trusted). Iterative sections other
//! than RAM (VFIO, dirty bitmaps) cannot be skipped that way and are refused.
//!
//! Hostile streams: every count and length is bounded before use ([`Limits`]); a
//! truncated stream, a page beyond its block, an unknown or duplicate block or an
//! absurd size is an error naming the stream offset; nothing panics. Once the RAM
//! section has ended, problems in the device state that follows are warnings
//! ([`VmState::warnings`]): the memory is complete without it.

pub mod config;
pub mod devices;
pub mod error;
pub mod index;
pub mod layout;
pub mod ram;
pub mod reader;
pub mod stream;

pub use config::Configuration;
pub use devices::VmDescription;
pub use error::{VmStateError, Warning};
pub use index::{Extent, ExtentKind, PageIndex};
pub use layout::{MachineKind, PhysicalLayout, Segment};
pub use ram::RamBlock;
pub use reader::{FnReader, ReadAt};
pub use stream::{SectionInfo, SectionKind};

/// Bounds on what a stream may make the parser do or keep. The defaults suit any real
/// guest; each is a documented limit against hostile streams.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most RAM blocks in the block list (QEMU guests have tens).
    pub max_blocks: usize,
    /// Largest RAM block, in bytes (default 64 TiB).
    pub max_block_bytes: u64,
    /// Most runs in the page indexes of all blocks together; a run costs 24 bytes (up
    /// to about 50 while parsing a stream that sends pages again). Default 8 Mi runs: at
    /// most 192 MiB built; a real stream needs one run per stretch of pages sent alike.
    pub max_runs: u64,
    /// Most sections listed in [`VmState::sections`] (more are parsed, not listed), and
    /// most START and FULL sections parsed (each keeps its section id).
    pub max_sections: usize,
    /// Largest device description read and parsed (default 16 MiB).
    pub max_vmdesc_bytes: u32,
    /// Farthest the parser searches for the footer of one device section (64 MiB).
    pub max_device_section_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_blocks: 1024,
            max_block_bytes: 64 << 40,
            max_runs: 8 << 20,
            max_sections: 65536,
            max_vmdesc_bytes: 16 << 20,
            max_device_section_bytes: 64 << 20,
        }
    }
}

/// The longest stream accepted: stream offsets must fit in 63 bits.
pub const MAX_STREAM_LEN: u64 = 1 << 62;

/// The name of the main RAM block of x86 PC machines.
pub const MAIN_RAM_BLOCK: &str = "pc.ram";

/// What one pass over the stream found.
#[derive(Clone, Debug)]
pub(crate) struct Parsed {
    configuration: Option<Configuration>,
    page_size: u64,
    blocks: Vec<RamBlock>,
    sections: Vec<SectionInfo>,
    vmdesc: Option<VmDescription>,
    stream_end: u64,
    warnings: Vec<Warning>,
}

impl Parsed {
    /// The RAM blocks as (name, size), in stream order.
    fn block_sizes(&self) -> Vec<(String, u64)> {
        self.blocks
            .iter()
            .map(|b| (b.name.clone(), b.size))
            .collect()
    }
}

/// What the start of a stream says, read without indexing any page: the header, the
/// configuration and the RAM section's block list (a few small reads at the start of the
/// stream). Enough for `info`, and for the size of the physical image before it is built.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The configuration section, when the stream has one.
    pub configuration: Option<Configuration>,
    /// The target page size, in bytes.
    pub page_size: u64,
    /// The RAM blocks (name, size) in stream order; empty when the stream has no RAM.
    pub blocks: Vec<(String, u64)>,
    /// The main RAM block's guest-physical layout, or why there is none.
    pub physical: Result<PhysicalLayout, String>,
}

impl Summary {
    /// The machine type, from the configuration section.
    pub fn machine(&self) -> Option<&str> {
        self.configuration.as_ref().map(|c| c.machine.as_str())
    }

    /// The size of the main RAM block (`pc.ram`), the guest's RAM size.
    pub fn main_ram_bytes(&self) -> Option<u64> {
        self.blocks
            .iter()
            .find(|b| b.0 == MAIN_RAM_BLOCK)
            .map(|b| b.1)
    }

    /// Size of the guest-physical memory image in bytes (0 without a layout).
    pub fn physical_size(&self) -> u64 {
        self.physical.as_ref().map_or(0, |l| l.size())
    }
}

/// A parsed VM state stream: its sections, its RAM blocks with their page indexes, and
/// the guest-physical layout of the main RAM block when the machine type is known.
#[derive(Clone, Debug)]
pub struct VmState {
    parsed: Parsed,
    physical: Result<(usize, PhysicalLayout), String>,
}

impl VmState {
    /// Parses the `len`-byte stream `src` with the default [`Limits`].
    pub fn parse<R: ReadAt + ?Sized>(src: &R, len: u64) -> Result<VmState, VmStateError> {
        Self::parse_with(src, len, &Limits::default())
    }

    /// Parses the `len`-byte stream `src` within `limits`. Fails when the stream breaks
    /// the format, goes past a limit, or `src` fails.
    pub fn parse_with<R: ReadAt + ?Sized>(
        src: &R,
        len: u64,
        limits: &Limits,
    ) -> Result<VmState, VmStateError> {
        check_len(len)?;
        let mut state = VmState {
            parsed: stream::Parser::new(src, len, limits).run()?,
            physical: Err(String::new()),
        };
        state.remap_physical(None);
        if let Ok((_, l)) = &state.physical
            && l.near_amd_hole()
        {
            let w = Warning {
                offset: 0,
                message: "guest RAM reaches near 1 TiB: with an AMD vCPU QEMU maps the RAM \
                          above 4 GiB from 1 TiB instead, which the physical image assumes not"
                    .into(),
            };
            state.parsed.warnings.push(w);
        }
        Ok(state)
    }

    /// Reads only the start of the `len`-byte stream `src`: see [`Summary`].
    pub fn summary<R: ReadAt + ?Sized>(src: &R, len: u64) -> Result<Summary, VmStateError> {
        let limits = Limits::default();
        check_len(len)?;
        let mut parser = stream::Parser::new(src, len, &limits);
        parser.summary_only = true;
        let p = parser.run()?;
        let blocks = p.block_sizes();
        let physical = layout_of(p.configuration.as_ref(), &blocks, None).map(|(_, l)| l);
        Ok(Summary {
            configuration: p.configuration,
            page_size: p.page_size,
            blocks,
            physical,
        })
    }

    /// Lays the main RAM block out again, as for a guest started with the machine option
    /// `max-ram-below-4g` (which the stream does not record; `None` for QEMU's default).
    pub fn remap_physical(&mut self, max_ram_below_4g: Option<u64>) {
        self.physical = self.layout(max_ram_below_4g);
    }

    fn layout(&self, max_ram_below_4g: Option<u64>) -> Result<(usize, PhysicalLayout), String> {
        let blocks = self.parsed.block_sizes();
        layout_of(
            self.parsed.configuration.as_ref(),
            &blocks,
            max_ram_below_4g,
        )
    }

    /// The main RAM block (`pc.ram`), whose size is the guest's RAM size.
    pub fn main_block(&self) -> Option<&RamBlock> {
        self.block(MAIN_RAM_BLOCK)
    }

    /// The configuration section, when the stream has one.
    pub fn configuration(&self) -> Option<&Configuration> {
        self.parsed.configuration.as_ref()
    }

    /// The machine type from the configuration section.
    pub fn machine(&self) -> Option<&str> {
        self.parsed
            .configuration
            .as_ref()
            .map(|c| c.machine.as_str())
    }

    /// The target page size the RAM section was read with.
    pub fn page_size(&self) -> u64 {
        self.parsed.page_size
    }

    /// The RAM blocks, in stream order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.parsed.blocks
    }

    /// The RAM block named `name`.
    pub fn block(&self, name: &str) -> Option<&RamBlock> {
        self.parsed.blocks.iter().find(|b| b.name == name)
    }

    /// The sum of the RAM block sizes.
    pub fn ram_bytes(&self) -> u64 {
        self.parsed.blocks.iter().map(|b| b.size).sum()
    }

    /// The sections in stream order (at most [`Limits::max_sections`]).
    pub fn sections(&self) -> &[SectionInfo] {
        &self.parsed.sections
    }

    /// The JSON device description after EOF, when there is one.
    pub fn vmdesc(&self) -> Option<&VmDescription> {
        self.parsed.vmdesc.as_ref()
    }

    /// Where the stream ends (after the device description, or EOF): bytes past it up
    /// to the length given are not part of the stream.
    pub fn stream_end(&self) -> u64 {
        self.parsed.stream_end
    }

    /// What was skipped or could not be checked.
    pub fn warnings(&self) -> &[Warning] {
        &self.parsed.warnings
    }

    /// Heap bytes held by the page indexes.
    pub fn index_memory_bytes(&self) -> usize {
        self.parsed
            .blocks
            .iter()
            .map(|b| b.index().memory_bytes())
            .sum()
    }

    /// The main RAM block's guest-physical layout, or why there is none.
    pub fn physical(&self) -> Result<&PhysicalLayout, &str> {
        match &self.physical {
            Ok((_, l)) => Ok(l),
            Err(e) => Err(e),
        }
    }

    /// The size of the guest-physical image (0 when there is no layout).
    pub fn physical_size(&self) -> u64 {
        self.physical().map_or(0, |l| l.size())
    }

    /// What is at guest-physical `offset` for at most `max_len` bytes; `None` at or past
    /// [`physical_size`](Self::physical_size) or when `max_len` is 0.
    pub fn lookup_physical(&self, offset: u64, max_len: u64) -> Option<Extent> {
        let (i, layout) = self.physical.as_ref().ok()?;
        match layout.map(offset, max_len)? {
            Segment::Ram { block_offset, len } => self.parsed.blocks[*i].lookup(block_offset, len),
            Segment::Gap { len } => Some(Extent {
                kind: ExtentKind::Hole,
                len,
            }),
        }
    }
}

/// Refuses a stream longer than [`MAX_STREAM_LEN`].
fn check_len(len: u64) -> Result<(), VmStateError> {
    if len > MAX_STREAM_LEN {
        return Err(VmStateError::unsupported(
            "stream length",
            0,
            format!("{len:#x} bytes (at most {MAX_STREAM_LEN:#x})"),
        ));
    }
    Ok(())
}

/// The main RAM block's index in `blocks` and its layout for the configuration's machine.
fn layout_of(
    configuration: Option<&Configuration>,
    blocks: &[(String, u64)],
    max_ram_below_4g: Option<u64>,
) -> Result<(usize, PhysicalLayout), String> {
    let machine = match configuration {
        Some(c) => c.machine.as_str(),
        None => return Err("the stream has no configuration section (no machine type)".into()),
    };
    let Some(i) = blocks.iter().position(|b| b.0 == MAIN_RAM_BLOCK) else {
        return Err(format!(
            "the stream has no RAM block named {MAIN_RAM_BLOCK:?}"
        ));
    };
    match PhysicalLayout::for_machine(machine, blocks[i].1, max_ram_below_4g) {
        Some(l) => Ok((i, l)),
        None if layout::machine_kind(machine).is_some() => Err(format!(
            "no layout for {:#x} bytes of RAM with max-ram-below-4g {:#x} (at most 4 GiB)",
            blocks[i].1,
            max_ram_below_4g.unwrap_or(0)
        )),
        None => Err(format!(
            "the memory layout of machine type {machine:?} is not known"
        )),
    }
}
