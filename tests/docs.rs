//! The man pages and `--help` must agree on the commands and mount options.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

fn help(args: &[&str]) -> String {
    String::from_utf8(support::qcow2fs(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        args,
    ))
    .unwrap()
}

/// Option names listed in the "Mount options" part of `qcow2fs mount --help`.
fn help_options() -> BTreeSet<String> {
    let text = help(&["mount", "--help"]);
    let section = text
        .split("Mount options (-o")
        .nth(1)
        .expect("mount --help lists the mount options");
    section
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("Also accepted"))
        // An option line: two spaces, the option, then at least two spaces of padding.
        .filter_map(|l| {
            let rest = l.strip_prefix("  ")?;
            let (word, after) = rest.split_once(' ')?;
            after.starts_with(' ').then_some(word)
        })
        .map(|w| w.split(['=', '[']).next().unwrap().to_string())
        .collect()
}

/// The lines of a man page section, from `.SH NAME` to the next `.SH`.
fn man_section(page: &str, name: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(format!("{}/man/{page}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.lines()
        .skip_while(|l| l.trim() != format!(".SH {name}"))
        .skip(1)
        .take_while(|l| !l.starts_with(".SH"))
        .map(str::to_string)
        .collect()
}

/// Option names given as `.TP` items of the qcow2fs.1 MOUNT OPTIONS section.
fn man_options() -> BTreeSet<String> {
    let lines = man_section("qcow2fs.1", "MOUNT OPTIONS");
    lines
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .map(|w| {
            let item = w[1].split_whitespace().nth(1).unwrap_or_default();
            item.split(['=', '[']).next().unwrap().to_string()
        })
        .collect()
}

#[test]
fn man_page_lists_exactly_the_mount_options_of_help() {
    let help = help_options();
    assert!(
        help.len() >= 10,
        "too few options parsed from --help: {help:?}"
    );
    assert_eq!(
        man_options(),
        help,
        "qcow2fs.1 MOUNT OPTIONS and `qcow2fs mount --help` differ"
    );
}

#[test]
fn helper_man_page_names_every_option() {
    let text = man_section("mount.qcow2fs.8", "OPTIONS").join("\n");
    for o in help_options() {
        assert!(
            text.contains(&format!(".BR {o}")),
            "mount.qcow2fs.8 does not name option {o}"
        );
    }
}

#[test]
fn man_page_describes_every_command() {
    let text = help(&["--help"]);
    let commands: Vec<&str> = text
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command line starts with two spaces; wrapped descriptions are indented more.
        .filter(|l| l.starts_with("  ") && !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    let man = man_section("qcow2fs.1", "COMMANDS");
    for c in commands {
        assert!(
            man.windows(2)
                .any(|w| w[0] == ".TP" && w[1] == format!(".B {c}")),
            "qcow2fs.1 lacks command {c}"
        );
    }
}
