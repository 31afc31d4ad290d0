// The VM-state parser on streams built here for what the QEMU fixtures lack: every RAM
// page flag, a stream ending after each kind of section, guests with RAM above the
// low-memory limit, configuration subsections and commands.

use crate::support::vmstream::{
    Guest, PS, Page, VmStream, data, materialize, parse, problem, ram_start, small_guest,
    vmdesc_json,
};
use qcow2fs::format::Problem;
use qcow2fs::format::vmstate::{ExtentKind, SectionKind, VmState};

const GIB: u64 = 1 << 30;

#[test]
fn every_page_flag_is_indexed_and_the_last_copy_wins() {
    let s = small_guest().build();
    let st = parse(&s).unwrap();
    assert!(st.warnings().is_empty(), "{:?}", st.warnings());
    let ram = st.block("pc.ram").unwrap();
    assert_eq!((ram.data_pages, ram.fill_pages), (5, 3));
    let kind = |b: &str, page: u64| st.block(b).unwrap().lookup(page * PS, PS).unwrap().kind;
    assert!(matches!(kind("pc.ram", 0), ExtentKind::Data { .. }));
    assert_eq!(kind("pc.ram", 1), ExtentKind::Fill(0));
    assert!(matches!(kind("pc.ram", 2), ExtentKind::Data { .. }));
    assert_eq!(kind("pc.ram", 3), ExtentKind::Fill(0xab));
    assert_eq!(kind("pc.ram", 5), ExtentKind::Hole);
    assert_eq!(kind("rom", 1), ExtentKind::Hole);
    // A hole runs to the next sent page.
    let hole = ram.lookup(5 * PS + 7, u64::MAX).unwrap();
    assert_eq!(hole.len, 10 * PS - 7);

    let bytes = materialize(&s.buf, ram.size, |o, l| ram.lookup(o, l));
    let page = |i: u64| &bytes[(i * PS) as usize..((i + 1) * PS) as usize];
    let expect = |tag: u8| {
        let mut p = vec![tag; 100];
        p.resize(PS as usize, 0);
        p
    };
    assert_eq!(page(0), &expect(1)[..]);
    assert!(page(1).iter().all(|&b| b == 0));
    assert_eq!(page(2), &expect(3)[..]);
    assert!(page(3).iter().all(|&b| b == 0xab));
    assert_eq!(page(4), &expect(4)[..]);
    assert_eq!(page(15), &expect(15)[..]);
    let rom = st.block("rom").unwrap();
    assert_eq!(
        &materialize(&s.buf, PS, |o, l| rom.lookup(o, l))[..],
        &expect(9)[..]
    );

    // The physical image of a 64 KiB i440fx guest is pc.ram itself.
    assert_eq!(st.physical_size(), 16 * PS);
    let phys = materialize(&s.buf, st.physical_size(), |o, l| st.lookup_physical(o, l));
    assert_eq!(phys, bytes);
}

#[test]
fn the_sections_of_a_built_stream_are_listed_in_order() {
    let s = small_guest().build();
    let st = parse(&s).unwrap();
    let kinds: Vec<SectionKind> = st.sections().iter().map(|s| s.kind).collect();
    use SectionKind::*;
    assert_eq!(
        kinds,
        [
            Configuration,
            Start,
            Part,
            Command,
            End,
            Full,
            Full,
            Eof,
            VmDescription
        ]
    );
    let full = &st.sections()[5];
    assert_eq!(full.name.as_deref(), Some("timer"));
    assert_eq!(full.end, Some(st.sections()[6].offset));
    assert_eq!(st.sections()[3].command, Some((11, 0)));
    assert_eq!(st.stream_end(), s.len());
    let desc = st.vmdesc().unwrap();
    assert_eq!(desc.end(), s.len());
    assert_eq!(
        desc.devices.as_deref(),
        Some(&[("timer".to_string(), 0), ("cpu".to_string(), 0)][..])
    );
}

#[test]
fn a_stream_may_end_after_the_ram_but_not_before() {
    let s = small_guest().build();
    let full = parse(&s).unwrap();
    for sec in full.sections() {
        let end = sec.end.unwrap();
        let cut = VmStream::from_bytes(&s.buf[..end as usize]);
        let got = parse(&cut);
        let ram_done = full
            .sections()
            .iter()
            .any(|x| x.kind == SectionKind::End && x.end.unwrap() <= end);
        match sec.kind {
            SectionKind::Configuration
            | SectionKind::Start
            | SectionKind::Part
            | SectionKind::Command => {
                let e = got
                    .err()
                    .unwrap_or_else(|| panic!("cut after {:?} parsed", sec.kind));
                assert_eq!(problem(&e), (Problem::Invalid, end), "{e}");
                assert!(e.to_string().contains("truncated"), "{e}");
            }
            SectionKind::End | SectionKind::Full => {
                assert!(ram_done);
                let st = got.unwrap();
                assert_eq!(st.warnings().len(), 1, "{:?}", st.warnings());
                assert!(st.warnings()[0].message.contains("without an EOF"));
                // The memory is whole.
                let ram = st.block("pc.ram").unwrap();
                let a = materialize(&cut.buf, ram.size, |o, l| ram.lookup(o, l));
                let b0 = full.block("pc.ram").unwrap();
                assert_eq!(a, materialize(&s.buf, b0.size, |o, l| b0.lookup(o, l)));
            }
            SectionKind::Eof => {
                let st = got.unwrap();
                assert!(st.warnings().is_empty(), "{:?}", st.warnings());
                assert!(st.vmdesc().is_none());
            }
            SectionKind::VmDescription => assert!(got.unwrap().vmdesc().is_some()),
        }
    }
}

#[test]
fn ram_above_the_low_memory_limit_is_mapped_from_4_gib() {
    // 5 GiB on i440fx: 3 GiB below the limit, 2 GiB from 4 GiB. Every page is sent, almost
    // all as zero pages, as QEMU does for an idle guest.
    let size = 5 * GIB;
    let marks = [0, 3 * GIB - PS, 3 * GIB, size - PS];
    let mut s = VmStream::new();
    s.configuration("pc-i440fx-10.0");
    s.header(1, 2, "ram", 0, 4)
        .mem_size(&[("pc.ram", size)])
        .eos()
        .footer(2);
    s.short_header(2, 2);
    for p in 0..size / PS {
        let addr = p * PS;
        let page = match marks.iter().position(|&m| m == addr) {
            Some(i) => Page::Data(format!("mark {i}").into_bytes()),
            None => Page::Fill(0),
        };
        s.page("pc.ram", addr, &page);
    }
    s.eos().footer(2).short_header(3, 2).eos().footer(2).eof();
    let st = parse(&s).unwrap();
    let l = st.physical().unwrap();
    assert_eq!((l.below_4g, l.above_4g), (3 * GIB, 2 * GIB));
    assert_eq!(st.physical_size(), 6 * GIB);
    // Cheap: a handful of runs for 1.3 million pages.
    let ram = st.block("pc.ram").unwrap();
    assert!(ram.index().runs() <= 8, "{} runs", ram.index().runs());
    assert!(
        st.index_memory_bytes() < 1024,
        "{} bytes",
        st.index_memory_bytes()
    );

    let read = |off: u64| materialize(&s.buf, 6, |o, l| st.lookup_physical(off + o, l));
    assert_eq!(read(0), b"mark 0");
    assert_eq!(read(3 * GIB - PS), b"mark 1");
    assert_eq!(read(4 * GIB), b"mark 2");
    assert_eq!(read(6 * GIB - PS), b"mark 3");
    // The PCI hole between 3 and 4 GiB is a hole; zero pages read as zero.
    let gap = st.lookup_physical(3 * GIB, u64::MAX).unwrap();
    assert_eq!((gap.kind, gap.len), (ExtentKind::Hole, GIB));
    let zeros = st.lookup_physical(PS, u64::MAX).unwrap();
    assert_eq!(
        (zeros.kind, zeros.len),
        (ExtentKind::Fill(0), 3 * GIB - 2 * PS)
    );
    assert!(zeros.reads_as_zero());
    assert_eq!(st.lookup_physical(6 * GIB, 1), None);
}

#[test]
fn q35_and_max_ram_below_4g_move_the_split() {
    let g = Guest {
        machine: "pc-q35-10.0",
        blocks: vec![("pc.ram", 3 * GIB)],
        pages: vec![("pc.ram", 2 * GIB, data(7))],
        devices: vec![],
        switchover_start: false,
    };
    let s = g.build();
    let mut st = parse(&s).unwrap();
    let l = *st.physical().unwrap();
    assert_eq!((l.below_4g, l.above_4g), (2 * GIB, GIB));
    let e = st.lookup_physical(4 * GIB, PS).unwrap();
    assert!(matches!(e.kind, ExtentKind::Data { .. }), "{e:?}");
    assert_eq!(
        st.lookup_physical(2 * GIB, PS).unwrap().kind,
        ExtentKind::Hole
    );
    st.remap_physical(Some(GIB));
    let l = *st.physical().unwrap();
    assert_eq!((l.below_4g, l.above_4g), (GIB, 2 * GIB));
    let e = st.lookup_physical(5 * GIB, PS).unwrap();
    assert!(matches!(e.kind, ExtentKind::Data { .. }), "{e:?}");
    st.remap_physical(Some(8 * GIB));
    assert!(st.physical().is_err());
    assert_eq!(st.physical_size(), 0);
}

#[test]
fn unknown_machines_keep_their_blocks_but_have_no_physical_image() {
    let mut g = small_guest();
    g.machine = "virt-10.0";
    let st = parse(&g.build()).unwrap();
    assert!(st.physical().unwrap_err().contains("virt-10.0"));
    assert_eq!(st.lookup_physical(0, 1), None);
    assert!(st.block("pc.ram").unwrap().lookup(0, 1).is_some());
}

#[test]
fn configuration_subsections_are_read() {
    // 8 KiB target pages, the capabilities list with x-ignore-shared (which adds a guest
    // address to each listed block) and a UUID.
    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0");
    s.subsection("configuration/target-page-bits").be32(13);
    s.subsection("configuration/capabilities").be32(2);
    s.counted("x-ignore-shared").counted("postcopy-ram");
    s.subsection("configuration/uuid").raw(&[0x11; 16]);
    s.header(1, 1, "ram", 0, 4);
    s.be64((4 * 8192) | 0x04)
        .counted("pc.ram")
        .be64(4 * 8192)
        .be64(0x1234_0000);
    s.eos().footer(1);
    s.short_header(3, 1);
    s.be64(8192 | 0x08).counted("pc.ram").raw(&[0x5a; 8192]);
    s.be64((2 * 8192) | 0x08 | 0x20).raw(&[0x5b; 8192]);
    s.eos().footer(1).eof();
    let st = parse(&s).unwrap();
    let conf = st.configuration().unwrap();
    assert_eq!(conf.target_page_bits, Some(13));
    assert_eq!(conf.capabilities, ["x-ignore-shared", "postcopy-ram"]);
    assert_eq!(conf.uuid, Some([0x11; 16]));
    assert_eq!(st.page_size(), 8192);
    let ram = st.block("pc.ram").unwrap();
    assert_eq!(ram.guest_address, Some(0x1234_0000));
    let bytes = materialize(&s.buf, ram.size, |o, l| ram.lookup(o, l));
    assert!(bytes[..8192].iter().all(|&b| b == 0));
    assert!(bytes[8192..16384].iter().all(|&b| b == 0x5a));
    assert!(bytes[16384..24576].iter().all(|&b| b == 0x5b));
}

#[test]
fn commands_are_skipped_by_their_length() {
    let mut s = ram_start(&[("pc.ram", PS)]);
    s.command(1, &[]); // open return path
    s.command(2, &[0, 0, 0, 1]); // ping
    s.command(3, &[]); // postcopy advise without postcopy RAM
    s.command(99, &[1, 2, 3]); // unknown: skipped with a warning
    s.command(2, &[0; 6]); // ping of the wrong length: skipped with a warning
    s.short_header(3, 1)
        .page("pc.ram", 0, &data(1))
        .eos()
        .footer(1)
        .eof();
    let st = parse(&s).unwrap();
    assert_eq!(st.warnings().len(), 2, "{:?}", st.warnings());
    assert!(st.warnings()[0].message.contains("unknown command 99"));
    let cmds: Vec<_> = st.sections().iter().filter_map(|s| s.command).collect();
    assert_eq!(cmds, [(1, 0), (2, 4), (3, 0), (99, 3), (2, 6)]);
}

#[test]
fn postcopy_colo_and_packaged_commands_are_refused() {
    for (cmd, payload) in [
        (3u16, &[0u8; 16][..]),
        (4, &[]),
        (5, &[]),
        (6, &[0; 20]),
        (7, &[0; 4]),
        (8, &[]),
        (9, &[]),
    ] {
        let mut s = VmStream::new();
        s.configuration("pc-i440fx-10.0");
        let at = s.len();
        s.command(cmd, payload).eof();
        let e = parse(&s).unwrap_err();
        assert_eq!(
            problem(&e),
            (Problem::Unsupported, at),
            "command {cmd}: {e}"
        );
    }
}

#[test]
fn device_sections_before_the_ram_and_fake_footers_inside_them() {
    // A device saved before RAM (QEMU's early-setup devices), and device bodies holding
    // the bytes of their own footer followed by something that looks like a section.
    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0");
    s.device(1, "early", 0, &[0x7e, 0, 0, 0, 1, 0x77]);
    s.header(1, 2, "ram", 0, 4)
        .mem_size(&[("pc.ram", PS)])
        .eos()
        .footer(2);
    s.short_header(3, 2)
        .page("pc.ram", 0, &data(3))
        .eos()
        .footer(2);
    let mut body = vec![0x7e, 0, 0, 0, 3];
    body.extend_from_slice(&[
        4, 0, 0, 0, 9, 4, b'f', b'a', b'k', b'e', 0, 0, 0, 0, 0, 0, 0, 1,
    ]);
    s.device(3, "dev", 0, &body);
    s.device(4, "last", 0, &[0x7e, 0, 0, 0, 4, 0]);
    s.eof()
        .vmdesc(&vmdesc_json(&[("early", 0), ("dev", 0), ("last", 0)]));
    let st = parse(&s).unwrap();
    assert!(st.warnings().is_empty(), "{:?}", st.warnings());
    let names: Vec<_> = st
        .sections()
        .iter()
        .filter(|s| s.kind == SectionKind::Full)
        .map(|s| s.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["early", "dev", "last"]);
    assert_eq!(st.stream_end(), s.len());
}

#[test]
fn without_a_device_description_the_walk_checks_the_next_header() {
    // No vmdesc (suppress-vmdesc machines): a fake footer followed by bytes that are not a
    // section header is passed over.
    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0");
    s.header(1, 2, "ram", 0, 4)
        .mem_size(&[("pc.ram", PS)])
        .eos()
        .footer(2);
    s.short_header(3, 2).eos().footer(2);
    s.device(
        3,
        "dev",
        0,
        &[0x7e, 0, 0, 0, 3, 0x99, 0x7e, 0, 0, 0, 3, 0x04, 0, 0],
    );
    s.device(4, "next", 0, &[]);
    s.eof();
    let st = parse(&s).unwrap();
    assert!(st.warnings().is_empty(), "{:?}", st.warnings());
    let fulls: Vec<_> = st
        .sections()
        .iter()
        .filter(|s| s.kind == SectionKind::Full)
        .collect();
    assert_eq!(fulls.len(), 2);
    assert_eq!(fulls[1].name.as_deref(), Some("next"));
}

#[test]
fn a_stream_without_footers_parses_its_ram() {
    // Machine types before QEMU 2.4 wrote no section footers: the RAM is read, device
    // sections after it cannot be walked (a warning), before it they are an error.
    let mut s = VmStream::new();
    s.configuration("pc-i440fx-2.3");
    s.header(1, 0, "ram", 0, 4)
        .mem_size(&[("pc.ram", 2 * PS)])
        .eos();
    s.short_header(3, 0).page("pc.ram", PS, &data(5)).eos();
    let dev_at = s.len();
    s.header(4, 1, "dev", 0, 1).raw(&[1, 2, 3]).eof();
    let st = parse(&s).unwrap();
    assert_eq!(st.warnings().len(), 1, "{:?}", st.warnings());
    assert_eq!(st.warnings()[0].offset, dev_at);
    let ram = st.block("pc.ram").unwrap();
    assert!(matches!(
        ram.lookup(PS, 1).unwrap().kind,
        ExtentKind::Data { .. }
    ));
}

#[test]
fn the_summary_stops_after_the_block_list() {
    let s = small_guest().build();
    let sum = VmState::summary(&s.buf[..], s.len()).unwrap();
    assert_eq!(sum.machine(), Some("pc-i440fx-10.0"));
    assert_eq!(
        sum.blocks,
        [("pc.ram".to_string(), 16 * PS), ("rom".to_string(), 2 * PS)]
    );
    assert_eq!(sum.physical_size(), 16 * PS);
    // Damage after the block list does not matter to it.
    let start_end = parse(&s).unwrap().sections()[1].end.unwrap() as usize;
    let cut = &s.buf[..start_end];
    assert!(VmState::parse(cut, cut.len() as u64).is_err());
    assert_eq!(
        VmState::summary(cut, cut.len() as u64).unwrap().blocks,
        sum.blocks
    );

    // A stream of device state only (no RAM section) has no blocks and no image.
    let mut s = VmStream::new();
    s.configuration("pc-q35-10.0");
    s.device(1, "timer", 0, &[0; 24]).eof();
    let sum = VmState::summary(&s.buf[..], s.len()).unwrap();
    assert!(sum.blocks.is_empty());
    assert!(sum.physical.unwrap_err().contains("pc.ram"));
}
