//! A snapshot's VM state as disks: the migration stream itself (a qcow2 view through the
//! snapshot's L1 table, see `engine::vmstate`), and the guest's memory rebuilt from it:
//! the guest-physical image of the main RAM block and each RAM block alone, read through
//! the page index `format::vmstate` builds.
//!
//! What the files are and how large is known from the start of the stream alone (its
//! summary, one small read), so opening the image stays cheap. The page index is built on
//! the first read (or SEEK_DATA/SEEK_HOLE) of any of a snapshot's memory files, once, and
//! shared by all of them and every reader: readers that arrive meanwhile wait for it.
//! Until then the files do not offer their allocation for counting (`map_ready`), so
//! listing a directory does not build it. A
//! stream found broken then stays broken (EIO, with the reason logged); a failed read of
//! the image is tried again next time.
//!
//! Pages the stream never sent, and RAM the layout leaves out, are holes and read as
//! zeros; zero pages are holes too (SEEK_HOLE, st_blocks). Nothing else is served: a data
//! extent always comes from a page record of the stream.

use super::{BlockDev, LayerInfo, Qcow2Layer, Status};
use crate::engine::{Snapshot, View};
use crate::error::{Error, ErrorKind, Result};
use crate::format::vmstate::{Extent, ExtentKind, FnReader, Limits, Summary, VmState};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;

/// Data extents closer than this in the stream are read with one request (consecutive
/// pages of a run are 8 bytes apart: the next record's header).
const MERGE_GAP: u64 = 64;
/// The most one merged read of the stream covers.
const MERGE_MAX: u64 = 4 << 20;
/// The most index lookups one status query merges.
const STATUS_MAX_LOOKUPS: usize = 1 << 16;

/// The VM state of one snapshot, as the files a mount shows.
#[derive(Debug)]
pub struct VmStateFiles {
    /// The stream, exactly `vm_state_size` bytes.
    pub stream: Arc<Qcow2Layer>,
    /// What the start of the stream says, or why it could not be read.
    pub summary: std::result::Result<Summary, String>,
    /// The guest-physical memory, when the machine's layout is known.
    pub memory: Option<Arc<VmMemory>>,
    /// Each RAM block by its name, in stream order.
    pub blocks: Vec<(String, Arc<VmMemory>)>,
}

/// A byte source over a disk, for the stream parser.
fn reader(dev: &dyn BlockDev) -> FnReader<impl Fn(&mut [u8], u64) -> std::io::Result<()> + '_> {
    FnReader(move |buf: &mut [u8], off: u64| {
        dev.read_at(buf, off)
            .map_err(|e| std::io::Error::other(e.report()))
    })
}

impl VmStateFiles {
    /// The VM state of snapshot `s` of `top`'s image. Fails when the state is unusable
    /// as a whole (none, or its area runs past the snapshot's L1 table); a stream whose
    /// start cannot be understood gives the stream alone, with the reason in `summary`.
    pub fn open(top: &Qcow2Layer, s: &Snapshot) -> Result<VmStateFiles> {
        let image = top.image();
        image.vm_state_area(s)?;
        let stream = Arc::new(top.with_view(View::VmState(s.key)));
        let len = stream.size();
        let what = s.entry.label();
        let summary = VmState::summary(&reader(&*stream), len)
            .map_err(|e| format!("{}: {what}: {e}", image.path().display()));
        let mut files = VmStateFiles {
            stream: stream.clone(),
            summary,
            memory: None,
            blocks: Vec::new(),
        };
        let Ok(sum) = &files.summary else {
            return Ok(files);
        };
        let index = Arc::new(SharedIndex {
            stream,
            len,
            what,
            expect: sum.clone(),
            state: Mutex::new(None),
        });
        let info = LayerInfo {
            path: image.path().to_path_buf(),
            format: "qcow2",
        };
        let dev = |part, size| {
            Arc::new(VmMemory {
                index: index.clone(),
                part,
                size,
                info: info.clone(),
            })
        };
        if let Ok(layout) = &sum.physical {
            files.memory = Some(dev(Part::Physical, layout.size()));
        }
        files.blocks = sum
            .blocks
            .iter()
            .enumerate()
            .map(|(i, (name, size))| (name.clone(), dev(Part::Block(i), *size)))
            .collect();
        Ok(files)
    }
}

/// The page index of one snapshot's stream, built once and shared.
#[derive(Debug)]
struct SharedIndex {
    stream: Arc<Qcow2Layer>,
    len: u64,
    /// The snapshot, for messages.
    what: String,
    /// What the summary said: the parse must agree.
    expect: Summary,
    /// The parsed stream, or why it is broken.
    state: Mutex<Option<std::result::Result<Arc<VmState>, String>>>,
}

impl SharedIndex {
    fn path(&self) -> &std::path::Path {
        &self.stream.info().path
    }

    /// The parsed stream, parsing it on first use.
    fn get(&self) -> Result<Arc<VmState>> {
        let mut slot = self.state.lock();
        match &*slot {
            Some(Ok(st)) => return Ok(st.clone()),
            Some(Err(why)) => return Err(Error::corrupt(why.clone()).in_file(self.path())),
            None => {}
        }
        let start = Instant::now();
        let parsed = VmState::parse_with(&reader(&*self.stream), self.len, &Limits::default());
        let result = match parsed {
            Ok(st) => self.check(&st).map(|()| Arc::new(st)),
            // The image could not be read: not the stream's fault, try again next time.
            Err(e @ crate::format::vmstate::VmStateError::Read { .. }) => {
                return Err(
                    Error::new(ErrorKind::Io, format!("{}: {e}", self.what)).in_file(self.path())
                );
            }
            Err(e) => Err(format!("{}: {e}", self.what)),
        };
        match &result {
            Ok(st) => {
                for w in st.warnings() {
                    log::warn!("{}: {}: {w}", self.path().display(), self.what);
                }
                log::info!(
                    "{}: {}: VM state indexed in {} ms ({} KiB of index)",
                    self.path().display(),
                    self.what,
                    start.elapsed().as_millis(),
                    st.index_memory_bytes().div_ceil(1024)
                );
            }
            Err(why) => log::error!("{}: {why}", self.path().display()),
        }
        *slot = Some(result.clone());
        result.map_err(|why| Error::corrupt(why).in_file(self.path()))
    }

    /// The whole parse must describe the files the summary made.
    fn check(&self, st: &VmState) -> std::result::Result<(), String> {
        let blocks: Vec<(String, u64)> = st
            .blocks()
            .iter()
            .map(|b| (b.name.clone(), b.size))
            .collect();
        if blocks != self.expect.blocks || st.physical_size() != self.expect.physical_size() {
            return Err(format!(
                "{}: the RAM blocks of the stream differ from those its start lists",
                self.what
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The guest-physical image of the main RAM block.
    Physical,
    /// RAM block `i` of the stream's list.
    Block(usize),
}

/// Guest memory rebuilt from a snapshot's VM state: the guest-physical image or one RAM
/// block. Read-only.
#[derive(Debug)]
pub struct VmMemory {
    index: Arc<SharedIndex>,
    part: Part,
    size: u64,
    info: LayerInfo,
}

impl VmMemory {
    /// Whether this is the guest-physical image (rather than one RAM block).
    pub fn is_physical(&self) -> bool {
        self.part == Part::Physical
    }

    /// Heap bytes of the shared page index, once built.
    pub fn index_memory_bytes(&self) -> Option<usize> {
        match &*self.index.state.lock() {
            Some(Ok(st)) => Some(st.index_memory_bytes()),
            _ => None,
        }
    }

    fn lookup(&self, st: &VmState, off: u64, len: u64) -> Result<Extent> {
        let e = match self.part {
            Part::Physical => st.lookup_physical(off, len),
            Part::Block(i) => st.blocks().get(i).and_then(|b| b.lookup(off, len)),
        };
        e.filter(|e| e.len > 0 && e.len <= len).ok_or_else(|| {
            Error::corrupt(format!(
                "{}: no memory at offset {off:#x} of a {}-byte file",
                self.index.what, self.size
            ))
            .in_file(&self.info.path)
        })
    }

    /// Fills the data extents `pieces` (position in `buf`, stream offset, length) from
    /// the stream, reading neighbours that lie close together in the stream at once.
    fn read_pieces(&self, buf: &mut [u8], pieces: &[(usize, u64, usize)]) -> Result<()> {
        let stream = &*self.index.stream;
        let mut i = 0;
        let mut scratch = Vec::new();
        while i < pieces.len() {
            let (pos, start, len) = pieces[i];
            let mut end = start + len as u64;
            let mut j = i + 1;
            while let Some(&(_, s, l)) = pieces.get(j) {
                if s < end || s - end > MERGE_GAP || s + l as u64 - start > MERGE_MAX {
                    break;
                }
                end = s + l as u64;
                j += 1;
            }
            if j == i + 1 {
                stream.read_at(&mut buf[pos..pos + len], start)?;
            } else {
                scratch.resize((end - start) as usize, 0);
                stream.read_at(&mut scratch, start)?;
                for &(pos, s, l) in &pieces[i..j] {
                    let at = (s - start) as usize;
                    buf[pos..pos + l].copy_from_slice(&scratch[at..at + l]);
                }
            }
            i = j;
        }
        Ok(())
    }
}

impl BlockDev for VmMemory {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let avail = self.size.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        let st = self.index.get()?;
        let mut pieces = Vec::new();
        let mut pos = 0;
        while pos < avail {
            let e = self.lookup(&st, off + pos as u64, (avail - pos) as u64)?;
            let n = e.len as usize;
            match e.kind {
                ExtentKind::Data { stream_offset } => pieces.push((pos, stream_offset, n)),
                ExtentKind::Fill(b) => buf[pos..pos + n].fill(b),
                ExtentKind::Hole => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
        self.read_pieces(&mut buf[..avail], &pieces)
    }

    fn status(&self, off: u64, len: u64, _probe_host: bool) -> Result<Status> {
        let st = self.index.get()?;
        let len = len.min(self.size.saturating_sub(off));
        let first = self.lookup(&st, off, len)?;
        let class = |e: &Extent| (e.reads_as_zero(), e.kind == ExtentKind::Hole);
        let mut total = first.len;
        for _ in 0..STATUS_MAX_LOOKUPS {
            if total >= len {
                break;
            }
            let e = self.lookup(&st, off + total, len - total)?;
            if class(&e) != class(&first) {
                break;
            }
            total += e.len;
        }
        let (zero, hole) = class(&first);
        Ok(Status {
            len: total,
            depth: 0,
            present: !hole,
            zero,
            data: !zero,
            compressed: false,
            offset: None,
        })
    }

    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn map_ready(&self) -> bool {
        self.index.state.lock().is_some()
    }

    fn sources(&self) -> Vec<crate::storage::Access> {
        self.index.stream.sources()
    }
}
