//! The RAM section ("ram", version 4), spread over START, PART and END sections. Its body
//! is a list of records, each a be64 whose low bits (below the page size) are flags and
//! whose high bits are a byte offset within a RAM block, up to an end-of-section record:
//!
//! | flag | name | payload |
//! |---|---|---|
//! | 0x04 | MEM_SIZE | the block list: for each block a counted name, a be64 length (plus a be64 guest address with the `x-ignore-shared` capability), until the lengths add up to the record's offset field |
//! | 0x02 | ZERO | block name unless CONTINUE, one fill byte (0 since QEMU 2.x; older streams filled with any byte) |
//! | 0x08 | PAGE | block name unless CONTINUE, one page of data |
//! | 0x20 | CONTINUE | with ZERO or PAGE: same block as the previous page |
//! | 0x10 | EOS | none: the end of this section's RAM data |
//!
//! The other flags QEMU defines cannot come from `savevm`, and a page they describe
//! could not be served: 0x01 FULL (obsolete since 2009), 0x40 XBZRLE (delta against a
//! page the parser does not keep), 0x80 HOOK (RDMA), 0x100 COMPRESS_PAGE (multi-thread
//! compression, removed in QEMU 9.1) and 0x200 MULTIFD_FLUSH (pages sent on other
//! channels). They are refused as unsupported; any other bit is refused as unknown,
//! since the length of its payload is unknown.

use super::Limits;
use super::error::{Result, VmStateError};
use super::index::{IndexBuilder, PageContent, PageIndex};
use super::reader::{Cursor, ReadAt};
use std::collections::HashMap;

pub(crate) const FLAG_FULL: u64 = 0x01;
pub(crate) const FLAG_ZERO: u64 = 0x02;
pub(crate) const FLAG_MEM_SIZE: u64 = 0x04;
pub(crate) const FLAG_PAGE: u64 = 0x08;
pub(crate) const FLAG_EOS: u64 = 0x10;
pub(crate) const FLAG_CONTINUE: u64 = 0x20;
pub(crate) const FLAG_XBZRLE: u64 = 0x40;
pub(crate) const FLAG_HOOK: u64 = 0x80;
pub(crate) const FLAG_COMPRESS_PAGE: u64 = 0x100;
pub(crate) const FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// One RAM block of the guest, as the stream lists and fills it.
#[derive(Clone, Debug)]
pub struct RamBlock {
    /// QEMU's RAM block id, e.g. `pc.ram` or `0000:00:02.0/vga.vram`.
    pub name: String,
    /// Its length in bytes (a multiple of the page size).
    pub size: u64,
    /// The guest address the stream gives for it (only with `x-ignore-shared`).
    pub guest_address: Option<u64>,
    /// PAGE records seen for it (a page sent twice counts twice).
    pub data_pages: u64,
    /// ZERO (fill) records seen for it.
    pub fill_pages: u64,
    index: PageIndex,
}

impl RamBlock {
    /// What is at byte `offset` of the block, for at most `max_len` bytes: stream data
    /// (never past a page end), a fill byte, or a hole (never sent). `None` at or past
    /// the end of the block, or when `max_len` is 0.
    pub fn lookup(&self, offset: u64, max_len: u64) -> Option<super::Extent> {
        self.index.lookup(offset, max_len)
    }

    /// Where each page of the block is in the stream.
    pub fn index(&self) -> &PageIndex {
        &self.index
    }
}

struct BlockState {
    name: String,
    size: u64,
    guest_address: Option<u64>,
    data_pages: u64,
    fill_pages: u64,
    index: IndexBuilder,
}

/// The RAM section's state across its START, PART and END sections.
pub(crate) struct Ram<'l> {
    limits: &'l Limits,
    page_size: u64,
    ignore_shared: bool,
    blocks: Vec<BlockState>,
    by_name: HashMap<String, usize>,
    listed: bool,
    current: Option<usize>,
    runs: u64,
}

impl<'l> Ram<'l> {
    pub(crate) fn new(limits: &'l Limits, page_size: u64, ignore_shared: bool) -> Self {
        Ram {
            limits,
            page_size,
            ignore_shared,
            blocks: Vec::new(),
            by_name: HashMap::new(),
            listed: false,
            current: None,
            runs: 0,
        }
    }

    /// Parses records up to and including EOS.
    pub(crate) fn parse_records<R: ReadAt + ?Sized>(
        &mut self,
        c: &mut Cursor<'_, R>,
    ) -> Result<()> {
        let ps = self.page_size;
        loop {
            let at = c.pos();
            let word = c.be64("RAM record")?;
            let flags = word & (ps - 1);
            let addr = word & !(ps - 1);
            match flags & !FLAG_CONTINUE {
                FLAG_EOS => return Ok(()),
                FLAG_MEM_SIZE => self.block_list(c, at, addr)?,
                FLAG_ZERO | FLAG_PAGE => self.page(c, at, flags, addr)?,
                FLAG_FULL | FLAG_XBZRLE | FLAG_HOOK | FLAG_COMPRESS_PAGE | FLAG_MULTIFD_FLUSH => {
                    return Err(VmStateError::unsupported(
                        "RAM record flags",
                        at,
                        format!(
                            "{} ({flags:#x}) cannot be indexed{}",
                            flag_name(flags & !FLAG_CONTINUE),
                            " (savevm never writes it)"
                        ),
                    ));
                }
                _ => {
                    return Err(VmStateError::invalid(
                        "RAM record flags",
                        at,
                        format!("unknown flags {flags:#x}: the length of their payload is unknown"),
                    ));
                }
            }
        }
    }

    fn block_list<R: ReadAt + ?Sized>(
        &mut self,
        c: &mut Cursor<'_, R>,
        at: u64,
        total: u64,
    ) -> Result<()> {
        let mut list: Vec<(String, u64, Option<u64>, u64)> = Vec::new();
        let mut left = total;
        while left > 0 {
            let name_at = c.pos();
            let name = c.counted_str("RAM block name")?;
            if name.is_empty() {
                return Err(VmStateError::invalid(
                    "RAM block name",
                    name_at,
                    "empty name",
                ));
            }
            let size_at = c.pos();
            let size = c.be64("RAM block length")?;
            let gpa = if self.ignore_shared {
                Some(c.be64("RAM block guest address")?)
            } else {
                None
            };
            let bad = |msg: String| Err(VmStateError::invalid("RAM block length", size_at, msg));
            if size == 0 || size % self.page_size != 0 {
                return bad(format!(
                    "block {name:?} of {size:#x} bytes is not a whole number of {}-byte pages",
                    self.page_size
                ));
            }
            if size > left {
                return bad(format!(
                    "block {name:?} of {size:#x} bytes overruns the total of {total:#x} \
                     in the MEM_SIZE record at {at:#x}"
                ));
            }
            if size > self.limits.max_block_bytes {
                return Err(VmStateError::unsupported(
                    "RAM block length",
                    size_at,
                    format!(
                        "block {name:?} of {size:#x} bytes exceeds the limit of {:#x}",
                        self.limits.max_block_bytes
                    ),
                ));
            }
            if list.iter().any(|b| b.0 == name) {
                return Err(VmStateError::invalid(
                    "RAM block name",
                    name_at,
                    format!("block {name:?} is listed twice"),
                ));
            }
            if list.len() >= self.limits.max_blocks {
                return Err(VmStateError::unsupported(
                    "RAM block list",
                    name_at,
                    format!("more than {} RAM blocks", self.limits.max_blocks),
                ));
            }
            left -= size;
            list.push((name, size, gpa, name_at));
        }
        if self.listed {
            let same = list.len() == self.blocks.len()
                && list
                    .iter()
                    .zip(&self.blocks)
                    .all(|(a, b)| a.0 == b.name && a.1 == b.size);
            if !same {
                return Err(VmStateError::invalid(
                    "RAM block list",
                    at,
                    "a second MEM_SIZE record lists other blocks than the first",
                ));
            }
            return Ok(());
        }
        self.listed = true;
        for (i, (name, size, guest_address, _)) in list.into_iter().enumerate() {
            self.by_name.insert(name.clone(), i);
            self.blocks.push(BlockState {
                name,
                size,
                guest_address,
                data_pages: 0,
                fill_pages: 0,
                index: IndexBuilder::default(),
            });
        }
        Ok(())
    }

    fn page<R: ReadAt + ?Sized>(
        &mut self,
        c: &mut Cursor<'_, R>,
        at: u64,
        flags: u64,
        addr: u64,
    ) -> Result<()> {
        let b = if flags & FLAG_CONTINUE != 0 {
            self.current.ok_or_else(|| {
                VmStateError::invalid(
                    "RAM record flags",
                    at,
                    "CONTINUE on the first page record: no block to continue",
                )
            })?
        } else {
            let name_at = c.pos();
            let name = c.counted_str("RAM page block name")?;
            *self.by_name.get(&name).ok_or_else(|| {
                VmStateError::invalid(
                    "RAM page block name",
                    name_at,
                    format!("block {name:?} is not in the block list"),
                )
            })?
        };
        self.current = Some(b);
        let block = &mut self.blocks[b];
        if addr >= block.size {
            return Err(VmStateError::invalid(
                "RAM page address",
                at,
                format!(
                    "page at {addr:#x} is beyond block {:?} of {:#x} bytes",
                    block.name, block.size
                ),
            ));
        }
        let content = if flags & FLAG_ZERO != 0 {
            block.fill_pages += 1;
            PageContent::Fill(c.u8("RAM fill byte")?)
        } else {
            block.data_pages += 1;
            let data = c.pos();
            c.skip("RAM page data", self.page_size)?;
            PageContent::Data(data)
        };
        let stride = self.page_size + 8;
        let delta = block.index.set(addr / self.page_size, content, stride);
        self.runs = self.runs.saturating_add_signed(delta);
        if self.runs > self.limits.max_runs {
            return Err(VmStateError::unsupported(
                "RAM page index",
                at,
                format!(
                    "the page index would exceed {} runs (the limit)",
                    self.limits.max_runs
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Vec<RamBlock> {
        let ps = self.page_size;
        self.blocks
            .into_iter()
            .map(|b| RamBlock {
                index: b.index.finish(ps, b.size / ps),
                name: b.name,
                size: b.size,
                guest_address: b.guest_address,
                data_pages: b.data_pages,
                fill_pages: b.fill_pages,
            })
            .collect()
    }
}

fn flag_name(flag: u64) -> &'static str {
    match flag {
        FLAG_FULL => "the obsolete FULL flag",
        FLAG_XBZRLE => "an XBZRLE-encoded page",
        FLAG_HOOK => "an RDMA hook",
        FLAG_COMPRESS_PAGE => "a compressed page (multi-thread compression)",
        FLAG_MULTIFD_FLUSH => "a multifd flush (pages on other channels)",
        _ => "an unknown flag",
    }
}
