// The VM-state parser on damaged and hostile streams: truncation at every byte, sources
// that fail, pages beyond their block, unknown or duplicate blocks, absurd sizes, broken
// section structure, refused page flags, limits, and random corruption. It must return
// an error naming the stream offset, or a result whose every extent is in bounds; never
// panic, hang or allocate without bound.

use crate::support::vmstream::{
    PS, VmStream, data, materialize, parse, problem, ram_start, small_guest, vmdesc_json,
};
use proptest::prelude::*;
use qcow2fs::format::Problem;
use qcow2fs::format::vmstate::{FnReader, Limits, SectionKind, VmState, VmStateError};
use std::io;

/// Asserts `s` fails with `kind` at `at`, the message containing `words`.
fn refused(s: &VmStream, kind: Problem, at: u64, words: &str) {
    let e = parse(s)
        .err()
        .unwrap_or_else(|| panic!("parsed; expected {words:?}"));
    assert_eq!(problem(&e), (kind, at), "{e}");
    assert!(e.to_string().contains(words), "{e:?} lacks {words:?}");
    assert!(!e.to_string().contains('\n'), "one line: {e}");
}

/// `s` parsed under `limits`, with the one warning it must give.
fn one_warning(s: &VmStream, limits: &Limits) -> (VmState, String) {
    let st = VmState::parse_with(&s.buf[..], s.len(), limits).unwrap();
    let w: Vec<_> = st.warnings().iter().map(|w| w.message.clone()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    (st, w[0].clone())
}

/// Every extent of every block and of the physical image is in bounds.
fn check_extents(st: &VmState, stream: &[u8]) {
    for b in st.blocks() {
        let mut off = 0;
        let mut steps = 0;
        while let Some(e) = b.lookup(off, u64::MAX) {
            assert!(e.len > 0 && off + e.len <= b.size);
            if let qcow2fs::format::vmstate::ExtentKind::Data { stream_offset } = e.kind {
                assert!(stream_offset + e.len <= stream.len() as u64);
            }
            off += e.len;
            steps += 1;
            if steps > 10_000 {
                break;
            }
        }
    }
    if st.physical_size() > 0 && st.physical_size() < 1 << 24 {
        materialize(stream, st.physical_size(), |o, l| st.lookup_physical(o, l));
    }
}

#[test]
fn truncation_at_every_byte_is_an_error_or_a_whole_ram() {
    let s = small_guest().build();
    let full = parse(&s).unwrap();
    let ram_end = full
        .sections()
        .iter()
        .find(|x| x.kind == SectionKind::End)
        .and_then(|x| x.end)
        .unwrap();
    for n in 0..s.len() {
        let cut = &s.buf[..n as usize];
        match VmState::parse(cut, n) {
            Ok(st) => {
                assert!(n >= ram_end, "cut at {n:#x} parsed before the RAM ended");
                check_extents(&st, cut);
            }
            Err(e) => {
                assert!(n < ram_end, "cut at {n:#x}, after the RAM ended: {e}");
                assert!(e.offset() <= n, "cut at {n:#x}: error at {:#x}", e.offset());
                assert!(e.to_string().contains("truncated"), "cut at {n:#x}: {e}");
            }
        }
    }
}

#[test]
fn a_source_that_fails_is_a_read_error_naming_the_offset() {
    let s = small_guest().build();
    let fail_at = 300u64;
    let src = FnReader(|buf: &mut [u8], off: u64| {
        if off + buf.len() as u64 > fail_at {
            return Err(io::Error::other("disk on fire"));
        }
        buf.copy_from_slice(&s.buf[off as usize..off as usize + buf.len()]);
        Ok(())
    });
    let e = VmState::parse(&src, s.len()).unwrap_err();
    match &e {
        VmStateError::Read { offset, .. } => assert!(*offset < fail_at),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("disk on fire"), "{e}");
}

#[test]
fn bytes_after_the_stream_are_a_warning() {
    // vm_state_size larger than the stream: zeros after the device description, or after
    // EOF when there is none.
    let mut s = small_guest().build();
    let end = s.len();
    s.raw(&[0; 4096]);
    let st = parse(&s).unwrap();
    assert_eq!(st.stream_end(), end);
    assert!(st.vmdesc().is_some());
    assert_eq!(st.warnings().len(), 1, "{:?}", st.warnings());
    assert!(
        st.warnings()[0]
            .message
            .contains("4096 bytes after the end")
    );

    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(3, 1).eos().footer(1).eof();
    let end = s.len();
    s.raw(&[0; 100]);
    let st = parse(&s).unwrap();
    assert_eq!(st.stream_end(), end);
    assert_eq!(st.warnings().len(), 1, "{:?}", st.warnings());
}

#[test]
fn pages_must_be_inside_a_listed_block() {
    let mut s = ram_start(&[("pc.ram", 4 * PS)]);
    s.short_header(2, 1);
    let at = s.len();
    s.page("pc.ram", 4 * PS, &data(1));
    refused(&s, Problem::Invalid, at, "beyond block");

    let mut s = ram_start(&[("pc.ram", 4 * PS)]);
    s.short_header(2, 1);
    let at = s.len();
    s.page("vga.vram", 0, &data(1));
    refused(&s, Problem::Invalid, at + 8, "not in the block list");

    let mut s = ram_start(&[("pc.ram", 4 * PS)]);
    s.short_header(2, 1);
    let at = s.len();
    s.be64(0x08 | 0x20).raw(&[0; PS as usize]);
    refused(&s, Problem::Invalid, at, "CONTINUE on the first page");
}

#[test]
fn block_lists_are_checked() {
    let list = |blocks: &[(&str, u64)], total: u64| {
        let mut s = VmStream::new();
        s.configuration("pc-q35-10.0");
        s.header(1, 1, "ram", 0, 4).be64(total | 0x04);
        for (n, size) in blocks {
            s.counted(n).be64(*size);
        }
        s.eos().footer(1).short_header(3, 1).eos().footer(1).eof();
        s
    };
    let first_size = 8 + 1 + 4 + 11 + 1 + 4 + 1 + 3 + 4 + 4 + 8 + 1 + 6; // after "pc.ram" name
    refused(
        &list(&[("pc.ram", PS), ("pc.ram", PS)], 2 * PS),
        Problem::Invalid,
        first_size + 8,
        "listed twice",
    );
    refused(
        &list(&[("pc.ram", 100)], PS),
        Problem::Invalid,
        first_size,
        "whole number",
    );
    refused(
        &list(&[("pc.ram", 0)], PS),
        Problem::Invalid,
        first_size,
        "whole number",
    );
    refused(
        &list(&[("pc.ram", 2 * PS)], PS),
        Problem::Invalid,
        first_size,
        "overruns",
    );
    refused(
        &list(&[("pc.ram", 1 << 60)], 1 << 60),
        Problem::Unsupported,
        first_size,
        "exceeds the limit",
    );
    refused(
        &list(&[("", PS)], PS),
        Problem::Invalid,
        first_size - 7,
        "empty name",
    );

    // More blocks than the limit.
    let names: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    let blocks: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), PS)).collect();
    let s = list(&blocks, 5 * PS);
    let limits = Limits {
        max_blocks: 4,
        ..Limits::default()
    };
    let e = VmState::parse_with(&s.buf[..], s.len(), &limits).unwrap_err();
    assert!(e.to_string().contains("more than 4 RAM blocks"), "{e}");

    // A second, different list.
    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(2, 1);
    let at = s.len();
    s.mem_size(&[("pc.ram", 2 * PS)]).eos().footer(1);
    refused(&s, Problem::Invalid, at, "other blocks");
    // The same list again is accepted.
    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(3, 1)
        .mem_size(&[("pc.ram", PS)])
        .eos()
        .footer(1)
        .eof();
    parse(&s).unwrap();
}

#[test]
fn the_page_index_has_a_run_limit() {
    // Alternating data and zero pages: one run each.
    let mut s = ram_start(&[("pc.ram", 64 * PS)]);
    s.short_header(3, 1);
    for p in 0..64 {
        let page = if p % 2 == 0 {
            data(1)
        } else {
            crate::support::vmstream::Page::Fill(0)
        };
        s.page("pc.ram", p * PS, &page);
    }
    s.eos().footer(1).eof();
    assert_eq!(
        parse(&s).unwrap().block("pc.ram").unwrap().index().runs(),
        64
    );
    let limits = Limits {
        max_runs: 10,
        ..Limits::default()
    };
    let e = VmState::parse_with(&s.buf[..], s.len(), &limits).unwrap_err();
    assert!(e.to_string().contains("exceed 10 runs"), "{e}");
}

#[test]
fn refused_page_flags_name_their_record() {
    for (flag, words, kind) in [
        (0x01, "obsolete", Problem::Unsupported),
        (0x40, "XBZRLE", Problem::Unsupported),
        (0x80, "RDMA", Problem::Unsupported),
        (0x100, "compressed page", Problem::Unsupported),
        (0x200, "multifd", Problem::Unsupported),
        (0x400, "unknown flags", Problem::Invalid),
        (0x00, "unknown flags", Problem::Invalid),
        (0x0a, "unknown flags", Problem::Invalid),
    ] {
        let mut s = ram_start(&[("pc.ram", PS)]);
        s.short_header(2, 1);
        let at = s.len();
        s.be64(flag).raw(&[0; 64]);
        refused(&s, kind, at, words);
    }
}

#[test]
fn broken_section_structure_is_refused() {
    let mut s = VmStream::new();
    refused(&s, Problem::Invalid, 8, "truncated");
    s.buf[0] = b'X';
    refused(&s, Problem::Invalid, 0, "not QEVM");
    let mut s = VmStream::from_bytes(b"QEVM\0\0\0\x02");
    s.eof();
    refused(&s, Problem::Unsupported, 4, "version 2");

    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0");
    let at = s.len();
    s.short_header(2, 1).eos();
    refused(&s, Problem::Invalid, at + 1, "not an open RAM section");

    let mut s = ram_start(&[("pc.ram", PS)]);
    let at = s.len();
    s.header(1, 7, "ram", 0, 4).eos().footer(7);
    refused(&s, Problem::Invalid, at, "second RAM section");

    let mut s = ram_start(&[("pc.ram", PS)]);
    let at = s.len();
    s.header(1, 1, "block", 0, 1);
    refused(&s, Problem::Invalid, at + 1, "opened a second time");

    let mut s = ram_start(&[("pc.ram", PS)]);
    let at = s.len();
    s.header(1, 2, "dirty-bitmap", 0, 1).raw(&[0; 8]).footer(2);
    refused(&s, Problem::Unsupported, at, "iterative section");

    let mut s = VmStream::new();
    s.configuration("pc-i440fx-10.0");
    let at = s.len();
    s.header(1, 1, "ram", 0, 5);
    refused(&s, Problem::Unsupported, at + 1 + 4 + 4 + 4, "version 5");

    for (t, words) in [
        (0x09, "unknown section type"),
        (0x05, "not a section type"),
        (0x7e, "not a section type"),
        (0x06, "before the EOF"),
    ] {
        let mut s = ram_start(&[("pc.ram", PS)]);
        let at = s.len();
        s.u8(t).raw(&[0; 16]);
        refused(&s, Problem::Invalid, at, words);
    }

    let mut s = ram_start(&[("pc.ram", PS)]);
    let at = s.len();
    s.configuration("pc-q35-10.0");
    refused(&s, Problem::Invalid, at, "after the first section");
}

#[test]
fn footers_must_match_their_section() {
    let mut s = VmStream::new();
    s.configuration("pc-i440fx-10.0");
    s.header(1, 1, "ram", 0, 4)
        .mem_size(&[("pc.ram", PS)])
        .eos();
    let at = s.len();
    s.footer(2);
    refused(&s, Problem::Invalid, at + 1, "names section 2");

    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(3, 1).eos();
    let at = s.len();
    s.eof();
    refused(&s, Problem::Invalid, at, "no footer");
}

#[test]
fn configuration_sections_are_checked() {
    let mut s = VmStream::new();
    s.u8(0x07).be32(1 << 30);
    refused(&s, Problem::Invalid, 9, "not a machine type name");

    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0")
        .subsection("configuration/future")
        .be32(1);
    refused(&s, Problem::Unsupported, 9 + 4 + 11, "unknown subsection");

    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0")
        .subsection("configuration/target-page-bits");
    let at = s.len();
    s.be32(40);
    refused(&s, Problem::Unsupported, at, "2^40");

    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0")
        .subsection("configuration/capabilities");
    let at = s.len();
    s.be32(u32::MAX);
    refused(&s, Problem::Invalid, at, "capabilities");

    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0")
        .subsection("configuration/capabilities")
        .be32(1);
    s.counted("mapped-ram").eof();
    refused(&s, Problem::Unsupported, 8, "mapped-ram");
}

#[test]
fn a_device_description_that_disagrees_on_the_page_size_is_refused() {
    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(3, 1).eos().footer(1).eof();
    let at = s.len();
    s.vmdesc(r#"{"page_size": 8192, "devices": []}"#);
    refused(&s, Problem::Invalid, at, "page size");
}

#[test]
fn device_state_problems_after_the_ram_are_warnings() {
    // A device section longer than the search limit stops the walk.
    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(3, 1).eos().footer(1);
    s.device(2, "big", 0, &[0x55; 5000]);
    s.device(3, "small", 0, &[1]);
    s.eof().vmdesc(&vmdesc_json(&[("big", 0), ("small", 0)]));
    let limits = Limits {
        max_device_section_bytes: 4096,
        ..Limits::default()
    };
    let (st, w) = one_warning(&s, &limits);
    assert!(w.contains("not walked") && w.contains("no footer"), "{w}");
    assert!(st.block("pc.ram").is_some());
    let big = st
        .sections()
        .iter()
        .find(|s| s.name.as_deref() == Some("big"))
        .unwrap();
    assert_eq!(big.end, None);

    // A device description too large to read is located but not parsed.
    let small = Limits {
        max_vmdesc_bytes: 10,
        ..Limits::default()
    };
    let (st, w) = one_warning(&s, &small);
    assert!(w.contains("over the limit"), "{w}");
    assert_eq!(st.vmdesc().unwrap().devices, None);
    assert_eq!(st.stream_end(), s.len());

    // The same section before the RAM is an error.
    let mut s = VmStream::new();
    s.configuration("pc-i440fx-10.0");
    s.device(2, "big", 0, &[0x55; 5000]);
    s.header(1, 1, "ram", 0, 4)
        .mem_size(&[("pc.ram", PS)])
        .eos()
        .footer(1);
    let e = VmState::parse_with(&s.buf[..], s.len(), &limits).unwrap_err();
    assert_eq!(problem(&e), (Problem::Invalid, 8 + 1 + 4 + 14), "{e}");

    // 200 unknown commands: the warnings are capped.
    let mut s = ram_start(&[("pc.ram", PS)]);
    for _ in 0..200 {
        s.command(77, &[]);
    }
    s.short_header(3, 1).eos().footer(1).eof();
    let st = parse(&s).unwrap();
    assert_eq!(
        st.warnings().len(),
        qcow2fs::format::vmstate::error::MAX_WARNINGS
    );
    assert!(
        st.warnings()
            .last()
            .unwrap()
            .message
            .contains("further warnings")
    );

    // More sections than are listed.
    let limits = Limits {
        max_sections: 4,
        ..Limits::default()
    };
    let st = VmState::parse_with(&s.buf[..], s.len(), &limits).unwrap();
    assert_eq!(st.sections().len(), 4);

    // More device sections than are kept: after the RAM a warning, before it an error.
    let mut s = ram_start(&[("pc.ram", PS)]);
    s.short_header(3, 1).eos().footer(1);
    for i in 0..6 {
        s.device(10 + i, "dev", i, &[i as u8]);
    }
    s.eof();
    let st = VmState::parse_with(&s.buf[..], s.len(), &limits).unwrap();
    assert!(
        st.warnings()
            .iter()
            .any(|w| w.message.contains("more than 4"))
    );
    let mut s = VmStream::new();
    s.configuration("pc-i440fx-10.0");
    for i in 0..6 {
        s.device(10 + i, "dev", i, &[i as u8]);
    }
    let e = VmState::parse_with(&s.buf[..], s.len(), &limits).unwrap_err();
    assert_eq!(problem(&e).0, Problem::Unsupported, "{e}");
}

#[test]
fn absurd_stream_lengths_are_refused() {
    let e = VmState::parse(&[0u8; 8][..], u64::MAX).unwrap_err();
    assert_eq!(problem(&e).0, Problem::Unsupported);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn corrupted_streams_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut s = small_guest().build();
        for (i, v) in edits {
            let at = i.index(s.buf.len());
            s.buf[at] = v;
        }
        if do_cut {
            let n = cut.index(s.buf.len());
            s.buf.truncate(n);
        }
        match parse(&s) {
            Ok(st) => check_extents(&st, &s.buf),
            Err(e) => prop_assert!(e.offset() <= s.len()),
        }
    }
}
