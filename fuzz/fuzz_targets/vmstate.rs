//! Arbitrary bytes parsed as a QEMU migration stream (a snapshot's VM state), also read
//! for its summary (which must agree with the parse), then the page index walked: every extent of every RAM block and of the guest-physical image
//! must be non-empty, inside its range, and point only at bytes of the stream. Parsing
//! must end in a result or an error naming an offset within the stream, never a panic, a
//! hang or a huge allocation (the limits are lowered so a slow input shows up).

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2fs::format::vmstate::{Extent, ExtentKind, Limits, VmState};

/// Extents checked per block and for the physical image.
const MAX_EXTENTS: usize = 4096;

fn walk(what: &str, size: u64, stream_len: u64, lookup: impl Fn(u64, u64) -> Option<Extent>) {
    let mut off = 0;
    for _ in 0..MAX_EXTENTS {
        let Some(e) = lookup(off, u64::MAX) else {
            assert_eq!(off, size, "{what}: no extent at {off:#x} of {size:#x}");
            return;
        };
        assert!(e.len > 0 && e.len <= size - off, "{what}: {e:?} at {off:#x}");
        if let ExtentKind::Data { stream_offset } = e.kind {
            assert!(e.len <= 64 * 1024, "{what}: data extent {e:?} longer than a page");
            assert!(
                stream_offset.checked_add(e.len).is_some_and(|end| end <= stream_len),
                "{what}: {e:?} past the stream"
            );
        }
        off += e.len;
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_runs: 1 << 16,
        max_device_section_bytes: 1 << 20,
        ..Limits::default()
    };
    let len = data.len() as u64;
    let summary = VmState::summary(data, len);
    let state = match VmState::parse_with(data, len, &limits) {
        Ok(s) => s,
        Err(e) => {
            assert!(e.offset() <= len, "error past the stream: {e}");
            return;
        }
    };
    assert!(state.stream_end() <= len);
    // What the summary read must agree with the whole parse (unless it hit a limit the
    // parse's lowered limits did not).
    if let Ok(sum) = summary {
        assert_eq!(sum.machine(), state.machine());
        let blocks: Vec<(String, u64)> =
            state.blocks().iter().map(|b| (b.name.clone(), b.size)).collect();
        assert_eq!(sum.blocks, blocks);
        assert_eq!(sum.physical_size(), state.physical_size());
    }
    for w in state.warnings() {
        assert!(w.offset <= len, "warning past the stream: {w}");
    }
    for b in state.blocks() {
        walk(&b.name, b.size, len, |o, l| b.lookup(o, l));
        assert_eq!(b.lookup(b.size, 1), None);
    }
    let size = state.physical_size();
    walk("physical", size, len, |o, l| state.lookup_physical(o, l));
    assert_eq!(state.lookup_physical(size, 1), None);
});
