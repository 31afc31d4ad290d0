//! The walk over the stream's sections. The file header is `QEVM` and version 3; then
//! come sections, each a type byte:
//!
//! | type | name | layout |
//! |---|---|---|
//! | 0x07 | CONFIGURATION | see [`super::config`]; only as the first section |
//! | 0x01 | START | be32 section id, counted id string, be32 instance, be32 version, body, footer |
//! | 0x04 | FULL | as START; the whole state of one device |
//! | 0x02 | PART | be32 section id, body, footer |
//! | 0x03 | END | as PART; the last body of an iterative section |
//! | 0x08 | COMMAND | be16 command, be16 length, that many bytes |
//! | 0x00 | EOF | nothing; may be followed by 0x06 VMDESCRIPTION: be32 length, JSON |
//!
//! A footer is 0x7E and the be32 section id (every machine type since QEMU 2.4 writes
//! them; a stream without them is accepted, but its device sections cannot be walked).
//!
//! Only RAM ("ram") bodies are parsed. START, PART and END bodies of any other
//! iterative section have no length the parser could know, so they are refused. FULL
//! bodies are device state, whose length only the device's code knows: they are skipped
//! by finding their footer (see [`super::devices`]).

use super::config::{self, Configuration};
use super::devices::{self, VmDescription};
use super::error::{Result, VmStateError, Warnings};
use super::ram::Ram;
use super::reader::{Cursor, ReadAt};
use super::{Limits, Parsed};
use std::collections::HashSet;

pub(crate) const MAGIC: u32 = 0x5145_564d; // "QEVM"
pub(crate) const VERSION: u32 = 3;

pub(crate) const EOF: u8 = 0x00;
pub(crate) const START: u8 = 0x01;
pub(crate) const PART: u8 = 0x02;
pub(crate) const END: u8 = 0x03;
pub(crate) const FULL: u8 = 0x04;
pub(crate) const SUBSECTION: u8 = 0x05;
pub(crate) const VMDESCRIPTION: u8 = 0x06;
pub(crate) const CONFIGURATION: u8 = 0x07;
pub(crate) const COMMAND: u8 = 0x08;
pub(crate) const FOOTER: u8 = 0x7e;

/// The page size when the configuration section does not give one (x86, and every
/// target whose page size is fixed at 4 KiB).
pub const DEFAULT_PAGE_SIZE: u64 = 4096;

/// The kind of a section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    /// QEMU_VM_CONFIGURATION: the machine type and capabilities.
    Configuration,
    /// QEMU_VM_SECTION_START: the first part of an iterative device (RAM).
    Start,
    /// QEMU_VM_SECTION_PART: a further part of an iterative device.
    Part,
    /// QEMU_VM_SECTION_END: the last part of an iterative device.
    End,
    /// QEMU_VM_SECTION_FULL: a device's whole state.
    Full,
    /// QEMU_VM_COMMAND: a migration command.
    Command,
    /// QEMU_VM_EOF: the end of the device states.
    Eof,
    /// QEMU_VM_VMDESCRIPTION: the JSON device description.
    VmDescription,
}

impl SectionKind {
    /// The section's type byte.
    pub fn type_byte(self) -> u8 {
        match self {
            SectionKind::Configuration => CONFIGURATION,
            SectionKind::Start => START,
            SectionKind::Part => PART,
            SectionKind::End => END,
            SectionKind::Full => FULL,
            SectionKind::Command => COMMAND,
            SectionKind::Eof => EOF,
            SectionKind::VmDescription => VMDESCRIPTION,
        }
    }
}

/// One section as found in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// The section's type.
    pub kind: SectionKind,
    /// Stream offset of the type byte.
    pub offset: u64,
    /// One past its last byte, footer included; `None` for a device section whose end
    /// could not be found.
    pub end: Option<u64>,
    /// The section id, when the section has one.
    pub section_id: Option<u32>,
    /// The id string (START and FULL; PART and END get their START's).
    pub name: Option<String>,
    /// The instance id, when the section has one.
    pub instance_id: Option<u32>,
    /// The version id, when the section has one.
    pub version_id: Option<u32>,
    /// COMMAND: the command number and its payload length.
    pub command: Option<(u16, u16)>,
}

impl SectionInfo {
    pub(crate) fn new(kind: SectionKind, offset: u64) -> Self {
        SectionInfo {
            kind,
            offset,
            end: None,
            section_id: None,
            name: None,
            instance_id: None,
            version_id: None,
            command: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RamPhase {
    NotStarted,
    Open,
    Ended,
}

pub(crate) struct Parser<'a, 'l, R: ReadAt + ?Sized> {
    pub(crate) c: Cursor<'a, R>,
    pub(crate) limits: &'l Limits,
    pub(crate) warnings: Warnings,
    sections: Vec<SectionInfo>,
    sections_dropped: u64,
    config: Option<Configuration>,
    page_size: u64,
    ram: Option<Ram<'l>>,
    pub(crate) ram_id: Option<u32>,
    pub(crate) ram_phase: RamPhase,
    pub(crate) footers: Option<bool>,
    /// Section ids opened by START or FULL so far.
    pub(crate) ids: HashSet<u32>,
    pub(crate) vmdesc: Option<VmDescription>,
    pub(crate) vmdesc_searched: bool,
    /// FULL sections walked so far (the index of the next one in the description).
    pub(crate) devices_walked: usize,
    /// Stop once the RAM section's START (its block list) is read.
    pub(crate) summary_only: bool,
}

impl<'a, 'l, R: ReadAt + ?Sized> Parser<'a, 'l, R> {
    pub(crate) fn new(src: &'a R, len: u64, limits: &'l Limits) -> Self {
        Parser {
            c: Cursor::new(src, len),
            limits,
            warnings: Warnings::default(),
            sections: Vec::new(),
            sections_dropped: 0,
            config: None,
            page_size: DEFAULT_PAGE_SIZE,
            ram: None,
            ram_id: None,
            ram_phase: RamPhase::NotStarted,
            footers: None,
            ids: HashSet::new(),
            vmdesc: None,
            vmdesc_searched: false,
            devices_walked: 0,
            summary_only: false,
        }
    }

    pub(crate) fn push_section(&mut self, s: SectionInfo) {
        if self.sections.len() < self.limits.max_sections {
            self.sections.push(s);
        } else {
            if self.sections_dropped == 0 {
                let at = s.offset;
                self.warnings.push(
                    at,
                    format!(
                        "more than {} sections: the rest are not listed",
                        self.limits.max_sections
                    ),
                );
            }
            self.sections_dropped += 1;
        }
    }

    pub(crate) fn run(mut self) -> Result<Parsed> {
        let len = self.c.len();
        let magic = self.c.be32("file magic")?;
        if magic != MAGIC {
            return Err(VmStateError::invalid(
                "file magic",
                0,
                format!("{magic:#010x} is not QEVM: not a QEMU migration stream"),
            ));
        }
        let version = self.c.be32("file version")?;
        if version != VERSION {
            return Err(VmStateError::unsupported(
                "file version",
                4,
                format!("version {version} (only version 3 is read)"),
            ));
        }
        let mut stream_end = len;
        loop {
            if self.c.at_end() {
                let at = self.c.pos();
                if self.ram_phase != RamPhase::Ended {
                    return Err(VmStateError::invalid(
                        "section type",
                        at,
                        "the stream ends before the RAM section's END (truncated)",
                    ));
                }
                self.warnings.push(
                    at,
                    "the stream ends without an EOF section (device state truncated)",
                );
                break;
            }
            let at = self.c.pos();
            match self.section(at) {
                Ok(Some(end)) => {
                    stream_end = end;
                    break;
                }
                Ok(None) if self.summary_only && self.ram_phase == RamPhase::Open => {
                    stream_end = self.c.pos();
                    break;
                }
                Ok(None) => {}
                Err(e) if self.ram_phase == RamPhase::Ended && self.c.hit_end() => {
                    self.warnings
                        .push(at, format!("device state is cut off: {e}"));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(vd) = &self.vmdesc {
            if let Some(ps) = vd.page_size
                && ps != self.page_size
            {
                return Err(VmStateError::invalid(
                    "device description page_size",
                    vd.offset,
                    format!(
                        "page size {ps}, but the RAM section was read with {}-byte pages",
                        self.page_size
                    ),
                ));
            }
            let mut s = SectionInfo::new(SectionKind::VmDescription, vd.offset);
            s.end = Some(vd.end());
            self.push_section(s);
        }
        Ok(Parsed {
            configuration: self.config,
            page_size: self.page_size,
            blocks: self.ram.map(Ram::finish).unwrap_or_default(),
            sections: self.sections,
            vmdesc: self.vmdesc,
            stream_end,
            warnings: self.warnings.finish(stream_end),
        })
    }

    /// Parses the section whose type byte is at `at`. Returns where the stream ends
    /// when this section ends the walk.
    fn section(&mut self, at: u64) -> Result<Option<u64>> {
        let t = self.c.u8("section type")?;
        match t {
            EOF => {
                let mut s = SectionInfo::new(SectionKind::Eof, at);
                s.end = Some(at + 1);
                self.push_section(s);
                return self.after_eof(at).map(Some);
            }
            CONFIGURATION => self.configuration(at)?,
            START | FULL => {
                if !self.start_or_full(at, t)? {
                    return Ok(Some(self.c.len()));
                }
            }
            PART | END => self.part_or_end(at, t)?,
            COMMAND => self.command(at)?,
            VMDESCRIPTION => {
                return Err(VmStateError::invalid(
                    "section type",
                    at,
                    "a device description (0x06) before the EOF section",
                ));
            }
            SUBSECTION | FOOTER => {
                return Err(VmStateError::invalid(
                    "section type",
                    at,
                    format!("{t:#04x} is not a section type at the top level"),
                ));
            }
            _ => {
                return Err(VmStateError::invalid(
                    "section type",
                    at,
                    format!("unknown section type {t:#04x}: its length is not known"),
                ));
            }
        }
        Ok(None)
    }

    fn configuration(&mut self, at: u64) -> Result<()> {
        if at != 8 {
            return Err(VmStateError::invalid(
                "section type",
                at,
                "a configuration section after the first section",
            ));
        }
        let conf = config::parse(&mut self.c)?;
        if let Some(bits) = conf.target_page_bits {
            self.page_size = 1 << bits;
        }
        if conf.has_capability("mapped-ram") {
            return Err(VmStateError::unsupported(
                "configuration capabilities",
                at,
                "mapped-ram streams keep pages at fixed file offsets (not a savevm stream)",
            ));
        }
        let mut s = SectionInfo::new(SectionKind::Configuration, at);
        s.end = Some(self.c.pos());
        self.push_section(s);
        self.config = Some(conf);
        Ok(())
    }

    /// Returns false when the walk must stop (a device section whose end is unknown
    /// after the RAM is complete).
    fn start_or_full(&mut self, at: u64, t: u8) -> Result<bool> {
        let id = self.c.be32("section id")?;
        let name = self.c.counted_str("section id string")?;
        let instance = self.c.be32("section instance id")?;
        let version_at = self.c.pos();
        let version = self.c.be32("section version id")?;
        let kind = if t == START {
            SectionKind::Start
        } else {
            SectionKind::Full
        };
        if self.ids.len() >= self.limits.max_sections {
            let e = VmStateError::unsupported(
                "section id",
                at,
                format!(
                    "more than {} START and FULL sections",
                    self.limits.max_sections
                ),
            );
            if self.ram_phase != RamPhase::Ended {
                return Err(e);
            }
            self.warnings
                .push(at, format!("device state from here on is not walked: {e}"));
            return Ok(false);
        }
        if !self.ids.insert(id) {
            return Err(VmStateError::invalid(
                "section id",
                at + 1,
                format!("section id {id} ({name:?}) is opened a second time"),
            ));
        }
        let mut s = SectionInfo::new(kind, at);
        s.section_id = Some(id);
        s.name = Some(name.clone());
        s.instance_id = Some(instance);
        s.version_id = Some(version);
        if name == "ram" {
            if kind == SectionKind::Full || self.ram_phase != RamPhase::NotStarted {
                return Err(VmStateError::invalid(
                    "section id string",
                    at,
                    "a second RAM section, or RAM as a FULL section",
                ));
            }
            if version != 4 {
                return Err(VmStateError::unsupported(
                    "section version id",
                    version_at,
                    format!("RAM section version {version} (only version 4 is read)"),
                ));
            }
            let ignore_shared = self
                .config
                .as_ref()
                .is_some_and(|c| c.has_capability("x-ignore-shared"));
            self.ram = Some(Ram::new(self.limits, self.page_size, ignore_shared));
            self.ram_id = Some(id);
            self.ram_phase = RamPhase::Open;
            self.ram_body(id)?;
            s.end = Some(self.c.pos());
            self.push_section(s);
            return Ok(true);
        }
        if kind == SectionKind::Start {
            return Err(VmStateError::unsupported(
                "section id string",
                at,
                format!("iterative section {name:?}: the length of its data is not known"),
            ));
        }
        match devices::skip_full(self, at, id, &name, instance) {
            Ok(end) => {
                s.end = Some(end);
                self.push_section(s);
                Ok(true)
            }
            Err(e) if self.ram_phase == RamPhase::Ended => {
                self.push_section(s);
                self.warnings
                    .push(at, format!("device state from here on is not walked: {e}"));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn part_or_end(&mut self, at: u64, t: u8) -> Result<()> {
        let id = self.c.be32("section id")?;
        if self.ram_id != Some(id) || self.ram_phase != RamPhase::Open {
            return Err(VmStateError::invalid(
                "section id",
                at + 1,
                format!("PART or END of section id {id}, which is not an open RAM section"),
            ));
        }
        self.ram_body(id)?;
        let kind = if t == END {
            self.ram_phase = RamPhase::Ended;
            SectionKind::End
        } else {
            SectionKind::Part
        };
        let mut s = SectionInfo::new(kind, at);
        s.section_id = Some(id);
        s.name = Some("ram".into());
        s.end = Some(self.c.pos());
        self.push_section(s);
        Ok(())
    }

    fn ram_body(&mut self, id: u32) -> Result<()> {
        self.ram
            .as_mut()
            .expect("RAM state exists once RAM started")
            .parse_records(&mut self.c)?;
        self.footer(id)
    }

    /// Reads the footer of section `id`, or learns that this stream has none.
    pub(crate) fn footer(&mut self, id: u32) -> Result<()> {
        if self.footers == Some(false) {
            return Ok(());
        }
        let at = self.c.pos();
        if self.c.at_end() && self.footers.is_none() {
            // Undecided, and nothing follows: the caller reports the truncation.
            return Ok(());
        }
        let mark = Some(self.c.peek_at("section footer", at, 1)?[0]);
        if mark != Some(FOOTER) {
            if self.footers == Some(true) {
                return Err(VmStateError::invalid(
                    "section footer",
                    at,
                    format!("section {id} has no footer (0x7e) where the others have one"),
                ));
            }
            self.footers = Some(false);
            return Ok(());
        }
        self.c.skip("section footer", 1)?;
        let got = self.c.be32("section footer id")?;
        if got != id {
            return Err(VmStateError::invalid(
                "section footer id",
                at + 1,
                format!("the footer of section {id} names section {got}"),
            ));
        }
        self.footers = Some(true);
        Ok(())
    }

    fn command(&mut self, at: u64) -> Result<()> {
        let cmd = self.c.be16("command")?;
        let len = self.c.be16("command length")?;
        let unsupported = |what: &str| {
            Err(VmStateError::unsupported(
                "command",
                at,
                format!("command {cmd} ({what}): not a savevm stream"),
            ))
        };
        let fixed = match cmd {
            1 => Some(0),             // OPEN_RETURN_PATH
            2 => Some(4),             // PING
            3 if len == 0 => Some(0), // POSTCOPY_ADVISE without postcopy RAM
            3 => return unsupported("postcopy advise with RAM page sizes"),
            4 | 5 | 6 | 9 => return unsupported("postcopy"),
            7 => return unsupported("packaged stream"),
            8 => return unsupported("COLO"),
            10 => None,    // RECV_BITMAP
            11 => Some(0), // SWITCHOVER_START
            _ => {
                self.warnings.push(
                    at,
                    format!("unknown command {cmd} with {len} bytes skipped"),
                );
                None
            }
        };
        if fixed.is_some_and(|f| f != len) {
            self.warnings.push(
                at,
                format!(
                    "command {cmd} has {len} bytes where QEMU sends {}",
                    fixed.unwrap()
                ),
            );
        }
        self.c.skip("command payload", len as u64)?;
        let mut s = SectionInfo::new(SectionKind::Command, at);
        s.command = Some((cmd, len));
        s.end = Some(self.c.pos());
        self.push_section(s);
        Ok(())
    }

    /// After the EOF byte at `at`: the device description, if any, and what follows.
    /// Returns where the stream ends.
    fn after_eof(&mut self, at: u64) -> Result<u64> {
        if self.ram_phase == RamPhase::Open {
            return Err(VmStateError::invalid(
                "section type",
                at,
                "EOF before the RAM section's END",
            ));
        }
        let len = self.c.len();
        let end = match self.vmdesc.as_ref().map(|v| v.offset) {
            Some(off) if off == at + 1 => self.vmdesc.as_ref().unwrap().end(),
            Some(off) => {
                self.warnings.push(
                    at,
                    format!("EOF here, but a device description was found at {off:#x}"),
                );
                self.vmdesc = None;
                at + 1
            }
            None => devices::read_vmdesc_at(self, at + 1)?,
        };
        if end < len {
            self.warnings.push(
                end,
                format!("{} bytes after the end of the stream", len - end),
            );
        }
        if let Some(vd) = &self.vmdesc
            && let Some(devs) = &vd.devices
            && devs.len() != self.devices_walked
        {
            self.warnings.push(
                vd.offset,
                format!(
                    "the device description lists {} devices, the stream has {}",
                    devs.len(),
                    self.devices_walked
                ),
            );
        }
        Ok(end)
    }
}
