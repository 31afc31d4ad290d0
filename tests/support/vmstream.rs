//! Builds QEMU migration streams byte by byte, laid out as `savevm` writes them, for the
//! VM-state parser's tests: header, configuration, the RAM section's START/PART/END with
//! page records, device (FULL) sections, commands, EOF and the JSON device description.

use qcow2fs::format::Problem;
use qcow2fs::format::vmstate::{VmState, VmStateError};

/// RAM record flags.
pub const ZERO: u64 = 0x02;
pub const MEM_SIZE: u64 = 0x04;
pub const PAGE: u64 = 0x08;
pub const EOS: u64 = 0x10;
pub const CONTINUE: u64 = 0x20;

pub const PS: u64 = 4096;

/// A stream under construction.
#[derive(Clone, Debug, Default)]
pub struct VmStream {
    pub buf: Vec<u8>,
    /// The block the last page record named (for CONTINUE).
    last_block: Option<String>,
}

/// One page as a test wants it sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Page {
    Fill(u8),
    Data(Vec<u8>),
}

impl VmStream {
    /// The file header: QEVM, version 3.
    pub fn new() -> Self {
        let mut s = VmStream::default();
        s.raw(b"QEVM").be32(3);
        s
    }

    /// A stream of these bytes as they are (no header added).
    pub fn from_bytes(b: &[u8]) -> Self {
        VmStream {
            buf: b.to_vec(),
            last_block: None,
        }
    }

    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.raw(&[v])
    }

    pub fn be16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    pub fn be32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    pub fn be64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    pub fn counted(&mut self, s: &str) -> &mut Self {
        self.u8(s.len() as u8).raw(s.as_bytes())
    }

    /// CONFIGURATION with the machine type and no subsections.
    pub fn configuration(&mut self, machine: &str) -> &mut Self {
        self.u8(0x07)
            .be32(machine.len() as u32)
            .raw(machine.as_bytes())
    }

    /// A configuration subsection header (its fields follow).
    pub fn subsection(&mut self, name: &str) -> &mut Self {
        self.u8(0x05).counted(name).be32(1)
    }

    /// A START (0x01) or FULL (0x04) section header.
    pub fn header(
        &mut self,
        kind: u8,
        id: u32,
        name: &str,
        instance: u32,
        version: u32,
    ) -> &mut Self {
        self.u8(kind)
            .be32(id)
            .counted(name)
            .be32(instance)
            .be32(version)
    }

    /// A PART (0x02) or END (0x03) section header.
    pub fn short_header(&mut self, kind: u8, id: u32) -> &mut Self {
        self.u8(kind).be32(id)
    }

    pub fn footer(&mut self, id: u32) -> &mut Self {
        self.u8(0x7e).be32(id)
    }

    pub fn mem_size(&mut self, blocks: &[(&str, u64)]) -> &mut Self {
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.be64(total | MEM_SIZE);
        for (name, size) in blocks {
            self.counted(name).be64(*size);
        }
        self
    }

    /// A page record for `block` at byte `addr`, with CONTINUE when the previous page
    /// record named the same block (as QEMU does).
    pub fn page(&mut self, block: &str, addr: u64, page: &Page) -> &mut Self {
        let same = self.last_block.as_deref() == Some(block);
        let flags = match page {
            Page::Fill(_) => ZERO,
            Page::Data(_) => PAGE,
        } | if same { CONTINUE } else { 0 };
        self.be64(addr | flags);
        if !same {
            self.counted(block);
            self.last_block = Some(block.to_string());
        }
        match page {
            Page::Fill(b) => self.u8(*b),
            Page::Data(d) => {
                let mut d = d.clone();
                d.resize(PS as usize, 0);
                self.raw(&d)
            }
        }
    }

    pub fn eos(&mut self) -> &mut Self {
        self.be64(EOS)
    }

    pub fn command(&mut self, cmd: u16, payload: &[u8]) -> &mut Self {
        self.u8(0x08)
            .be16(cmd)
            .be16(payload.len() as u16)
            .raw(payload)
    }

    /// A FULL device section with its footer.
    pub fn device(&mut self, id: u32, name: &str, instance: u32, body: &[u8]) -> &mut Self {
        self.header(0x04, id, name, instance, 1)
            .raw(body)
            .footer(id)
    }

    pub fn eof(&mut self) -> &mut Self {
        self.u8(0x00)
    }

    pub fn vmdesc(&mut self, json: &str) -> &mut Self {
        self.u8(0x06).be32(json.len() as u32).raw(json.as_bytes())
    }
}

/// A stream up to the end of the RAM section's START (an i440fx machine, section 1):
/// configuration, then the blocks' names and sizes.
pub fn ram_start(blocks: &[(&str, u64)]) -> VmStream {
    let mut s = VmStream::new();
    s.configuration("pc-i440fx-10.0");
    s.header(1, 1, "ram", 0, 4).mem_size(blocks).eos().footer(1);
    s
}

/// The parser under test on a whole stream.
pub fn parse(s: &VmStream) -> Result<VmState, VmStateError> {
    VmState::parse(&s.buf[..], s.len())
}

/// The kind of problem and the stream offset a format error names (a read error fails
/// the test: these streams are in memory).
pub fn problem(e: &VmStateError) -> (Problem, u64) {
    match e {
        VmStateError::Format(f) => (f.problem, f.offset),
        VmStateError::Read { offset, .. } => panic!("a read error at {offset:#x}: {e}"),
    }
}

/// The JSON device description for `devices` (id string, instance).
pub fn vmdesc_json(devices: &[(&str, u32)]) -> String {
    let devs: Vec<String> = devices
        .iter()
        .map(|(n, i)| format!(r#"{{"name": "{n}", "instance_id": {i}, "vmsd_name": "{n}", "version": 1, "fields": []}}"#))
        .collect();
    format!(
        r#"{{"configuration": {{"vmsd_name": "configuration", "version": 1, "fields": []}}, "page_size": 4096, "devices": [{}]}}"#,
        devs.join(", ")
    )
}

/// A guest as savevm writes it: `machine`, RAM blocks, the pages of each (block name,
/// byte offset, content) in the order given, device sections with bodies, EOF and the
/// device description. The RAM section has id 2, devices 3 and up.
pub struct Guest<'a> {
    pub machine: &'a str,
    pub blocks: Vec<(&'a str, u64)>,
    pub pages: Vec<(&'a str, u64, Page)>,
    pub devices: Vec<(&'a str, Vec<u8>)>,
    pub switchover_start: bool,
}

impl Guest<'_> {
    pub fn build(&self) -> VmStream {
        let mut s = VmStream::new();
        s.configuration(self.machine);
        s.header(0x01, 2, "ram", 0, 4)
            .mem_size(&self.blocks)
            .eos()
            .footer(2);
        s.short_header(0x02, 2);
        for (b, addr, p) in &self.pages {
            s.page(b, *addr, p);
        }
        s.eos().footer(2);
        if self.switchover_start {
            s.command(11, &[]);
        }
        s.short_header(0x03, 2).eos().footer(2);
        for (i, (name, body)) in self.devices.iter().enumerate() {
            s.device(3 + i as u32, name, 0, body);
        }
        s.eof();
        let devs: Vec<(&str, u32)> = self.devices.iter().map(|d| (d.0, 0)).collect();
        s.vmdesc(&vmdesc_json(&devs));
        s
    }
}

/// Reads `len` bytes through `lookup` (a block's or the physical image's), checking that
/// every extent is non-empty, within the range and, for data, within `stream`.
pub fn materialize(
    stream: &[u8],
    len: u64,
    lookup: impl Fn(u64, u64) -> Option<qcow2fs::format::vmstate::Extent>,
) -> Vec<u8> {
    use qcow2fs::format::vmstate::ExtentKind;
    let mut out = Vec::with_capacity(len as usize);
    let mut off = 0;
    while off < len {
        let e = lookup(off, len - off).unwrap_or_else(|| panic!("no extent at {off:#x}"));
        assert!(e.len > 0 && e.len <= len - off, "extent {e:?} at {off:#x}");
        match e.kind {
            ExtentKind::Data { stream_offset } => {
                let s = stream_offset as usize;
                out.extend_from_slice(&stream[s..s + e.len as usize]);
            }
            ExtentKind::Fill(b) => out.resize(out.len() + e.len as usize, b),
            ExtentKind::Hole => out.resize(out.len() + e.len as usize, 0),
        }
        off += e.len;
    }
    out
}

/// A data page starting with 100 bytes of `tag`.
pub fn data(tag: u8) -> Page {
    Page::Data(vec![tag; 100])
}

/// pc.ram of 16 pages and a ROM of 2, with every kind of page record, two devices (one
/// whose body is full of 0x7e, the footer mark) and a switchover-start command.
pub fn small_guest() -> Guest<'static> {
    Guest {
        machine: "pc-i440fx-10.0",
        blocks: vec![("pc.ram", 16 * PS), ("rom", 2 * PS)],
        pages: vec![
            ("pc.ram", 0, data(1)),
            ("pc.ram", PS, data(2)), // CONTINUE
            ("pc.ram", 2 * PS, Page::Fill(0)),
            ("pc.ram", 3 * PS, Page::Fill(0xab)),
            ("rom", 0, data(9)), // another block: named again
            ("pc.ram", 4 * PS, data(4)),
            ("pc.ram", 2 * PS, data(3)), // sent again: data replaces the zero page
            ("pc.ram", PS, Page::Fill(0)), // and a zero page replaces data
            ("pc.ram", 15 * PS, data(15)),
            // pages 5..15 of pc.ram and page 1 of rom are never sent
        ],
        devices: vec![("timer", vec![1, 2, 3]), ("cpu", vec![0x7e; 40])],
        switchover_start: true,
    }
}
