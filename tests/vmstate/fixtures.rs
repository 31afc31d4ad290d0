// The VM-state parser on real savevm streams made with QEMU 10.0.2 (tests/data/vmstate,
// see its README): the sections and RAM blocks it finds match an independent walker's,
// the `pc.ram` block rebuilt from its page index hashes as QEMU's stream says, and the
// guest-physical image equals QEMU's `pmemsave` dump outside the VGA window.

use crate::support::vmfixtures::{
    check_physical_memory, expected_hash, facts, fixture_unxz, sha256_hex,
};
use crate::support::vmstream::materialize;
use qcow2fs::format::vmstate::{ExtentKind, SectionKind, VmState};
use serde_json::Value;

struct Fixture {
    stream: Vec<u8>,
    state: VmState,
    facts: Value,
}

fn load(name: &'static str) -> Fixture {
    let stream = fixture_unxz(name, "vmstate.bin.xz");
    assert_eq!(sha256_hex(&stream), expected_hash(name, "vmstate.sha256"));
    let state = VmState::parse(&stream[..], stream.len() as u64)
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    Fixture {
        stream,
        state,
        facts: facts(name),
    }
}

const FIXTURES: [&str; 3] = ["A", "B", "C"];

#[test]
fn sections_match_the_independent_walker() {
    for name in FIXTURES {
        let fx = load(name);
        let vm = &fx.facts["vmstate"];
        assert_eq!(fx.state.machine(), vm["machine_in_configuration"].as_str());
        assert_eq!(fx.state.machine(), fx.facts["machine"].as_str());
        assert!(
            fx.state.warnings().is_empty(),
            "{name}: {:?}",
            fx.state.warnings()
        );
        assert_eq!(fx.state.page_size(), 4096);
        assert_eq!(fx.state.stream_end(), fx.stream.len() as u64);

        let ours: Vec<_> = fx
            .state
            .sections()
            .iter()
            .filter(|s| s.kind != SectionKind::VmDescription)
            .collect();
        let theirs = vm["sections"].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}: section count");
        for (o, t) in ours.iter().zip(theirs) {
            let ctx = format!("{name}: section at {:#x}", o.offset);
            assert_eq!(o.offset, t["offset"].as_u64().unwrap(), "{ctx}");
            assert_eq!(
                o.kind.type_byte() as u64,
                t["type"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                o.section_id.map(u64::from),
                t["section_id"].as_u64(),
                "{ctx}"
            );
            assert_eq!(o.name.as_deref(), t["name"].as_str(), "{ctx}");
            assert_eq!(
                o.instance_id.map(u64::from),
                t["instance_id"].as_u64(),
                "{ctx}"
            );
            assert_eq!(
                o.version_id.map(u64::from),
                t["version_id"].as_u64(),
                "{ctx}"
            );
            assert_eq!(o.command.map(|c| c.0 as u64), t["cmd"].as_u64(), "{ctx}");
            if let Some(end) = t["end"].as_u64() {
                assert_eq!(o.end, Some(end), "{ctx}");
            }
        }
        let eof = ours.last().unwrap();
        assert_eq!(eof.kind, SectionKind::Eof);
        assert_eq!(eof.offset, vm["eof_offset"].as_u64().unwrap());

        let desc = fx.state.vmdesc().expect("device description");
        assert_eq!(desc.offset, vm["vmdesc_offset"].as_u64().unwrap());
        assert_eq!(
            desc.json_len as u64,
            vm["vmdesc_json_len"].as_u64().unwrap()
        );
        assert_eq!(desc.page_size, Some(4096));
        let fulls = ours.iter().filter(|s| s.kind == SectionKind::Full).count();
        assert_eq!(desc.devices.as_ref().unwrap().len(), fulls);

        let blocks = vm["ram_blocks"].as_array().unwrap();
        assert_eq!(fx.state.blocks().len(), blocks.len());
        for (b, t) in fx.state.blocks().iter().zip(blocks) {
            assert_eq!(b.name, t["name"].as_str().unwrap(), "{name}");
            assert_eq!(b.size, t["size"].as_u64().unwrap(), "{name} {}", b.name);
            assert_eq!(
                b.fill_pages,
                t["zero_pages"].as_u64().unwrap(),
                "{name} {}",
                b.name
            );
            assert_eq!(
                b.data_pages,
                t["normal_pages"].as_u64().unwrap(),
                "{name} {}",
                b.name
            );
        }
        assert_eq!(
            fx.state.ram_bytes(),
            vm["ram_mem_size_total"].as_u64().unwrap()
        );
    }
}

#[test]
fn pc_ram_rebuilt_from_the_index_hashes_as_expected() {
    for name in FIXTURES {
        let fx = load(name);
        let b = fx.state.block("pc.ram").unwrap();
        assert_eq!(b.size, fx.facts["ram_bytes"].as_u64().unwrap());
        let ram = materialize(&fx.stream, b.size, |o, l| b.lookup(o, l));
        assert_eq!(b.lookup(b.size, 1), None, "an extent past the end");
        assert_eq!(
            sha256_hex(&ram),
            expected_hash(name, "pc.ram.sha256"),
            "{name}"
        );
        // Every page of pc.ram is in the stream: no holes.
        let mut off = 0;
        while let Some(e) = b.lookup(off, u64::MAX) {
            assert_ne!(e.kind, ExtentKind::Hole, "{name}: hole at {off:#x}");
            off += e.len;
        }
        // A few runs, not one entry per page.
        assert!(b.index().runs() < 200, "{name}: {} runs", b.index().runs());
    }
}

#[test]
fn physical_image_equals_pmemsave_outside_the_vga_window() {
    for name in FIXTURES {
        let fx = load(name);
        let dump = fixture_unxz(name, "ram.bin.xz");
        assert_eq!(sha256_hex(&dump), expected_hash(name, "ram.sha256"));
        let layout = fx.state.physical().unwrap();
        // Small guests: all RAM below the low-memory limit, mapped 1:1.
        assert_eq!(layout.below_4g, dump.len() as u64, "{name}");
        assert_eq!(layout.above_4g, 0);
        assert_eq!(fx.state.physical_size(), dump.len() as u64);
        let mem = materialize(&fx.stream, fx.state.physical_size(), |o, l| {
            fx.state.lookup_physical(o, l)
        });
        assert_eq!(fx.state.lookup_physical(mem.len() as u64, 1), None);
        let vga = 0xa0000..0xc0000;
        assert_eq!(
            &mem[..vga.start],
            &dump[..vga.start],
            "{name}: below the VGA window"
        );
        assert_eq!(
            &mem[vga.end..],
            &dump[vga.end..],
            "{name}: above the VGA window"
        );
        assert_ne!(
            &mem[vga.clone()],
            &dump[vga],
            "{name}: the VGA window should differ"
        );
    }
}

#[test]
fn the_boot_sector_pattern_is_where_the_guest_wrote_it() {
    for name in FIXTURES {
        let fx = load(name);
        let read = |off: u64, len: u64| {
            materialize(&fx.stream, len, |o, l| fx.state.lookup_physical(off + o, l))
        };
        for pfn in 0x100u64..0x500 {
            let page = read(pfn << 12, 4096);
            let stamp = format!("QCOW2FS PAGE {pfn:08X}\n");
            assert_eq!(
                &page[..stamp.len()],
                stamp.as_bytes(),
                "{name}: pfn {pfn:#x}"
            );
            assert!(
                page[stamp.len()..].iter().all(|&b| b == 0),
                "{name}: pfn {pfn:#x}"
            );
            let e = fx.state.lookup_physical(pfn << 12, 4096).unwrap();
            assert!(
                matches!(e.kind, ExtentKind::Data { .. }),
                "{name}: pfn {pfn:#x}"
            );
        }
        assert_eq!(read(0x600, 13), b"QCOW2FS DONE\n", "{name}");
        // The page after the pattern was never touched: a zero page, read as a hole.
        let after = fx.state.lookup_physical(0x500 << 12, 4096).unwrap();
        assert!(after.reads_as_zero(), "{name}: {after:?}");
    }
}

#[test]
fn the_summary_reads_only_the_start_of_the_stream() {
    use qcow2fs::format::vmstate::FnReader;
    use std::sync::atomic::{AtomicU64, Ordering};
    for name in FIXTURES {
        let fx = load(name);
        let read = AtomicU64::new(0);
        let src = FnReader(|buf: &mut [u8], off: u64| {
            read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.copy_from_slice(&fx.stream[off as usize..off as usize + buf.len()]);
            Ok(())
        });
        let sum = VmState::summary(&src, fx.stream.len() as u64).unwrap();
        assert!(read.into_inner() <= 64 * 1024, "{name}: read too much");
        assert_eq!(sum.machine(), fx.state.machine());
        assert_eq!(sum.page_size, 4096);
        let blocks: Vec<(String, u64)> = fx
            .state
            .blocks()
            .iter()
            .map(|b| (b.name.clone(), b.size))
            .collect();
        assert_eq!(sum.blocks, blocks);
        assert_eq!(
            sum.main_ram_bytes(),
            Some(fx.facts["ram_bytes"].as_u64().unwrap())
        );
        assert_eq!(sum.physical_size(), fx.state.physical_size());
        assert_eq!(sum.physical.as_ref().ok(), fx.state.physical().ok());
    }
}

#[test]
fn a_parsed_state_can_be_shared_between_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<VmState>();
}

/// `D` and `E`: QEMU guests with RAM above the low-memory limit (see the README).
#[test]
fn ram_above_4_gib_is_where_qemu_puts_it() {
    for (name, marks) in [
        ("D", [0xb000_0000u64, 0x1_0000_0000, 0x1_7fff_f000]),
        ("E", [0x7000_0000, 0x1_0000_0000, 0x1_3fff_f000]),
    ] {
        let stream = fixture_unxz(name, "vmstate.bin.xz");
        assert_eq!(sha256_hex(&stream), expected_hash(name, "vmstate.sha256"));
        let st = VmState::parse(&stream[..], stream.len() as u64).unwrap();
        assert!(st.warnings().is_empty(), "{name}: {:?}", st.warnings());
        let layout = st.physical().unwrap();
        assert!(layout.above_4g > 0, "{name}: {layout:?}");
        assert!(
            st.index_memory_bytes() < 64 * 1024,
            "{name}: {}",
            st.index_memory_bytes()
        );
        check_physical_memory(name, &marks, |off, len| {
            materialize(&stream, len as u64, |o, l| st.lookup_physical(off + o, l))
        });
    }
}
