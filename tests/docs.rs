//! The man pages, `--help` and the README must agree with the option table and the
//! commands: the man pages' option sections are what the table generates (`make man`),
//! and every option the documentation names exists.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn qcow2fs(args: &[&str]) -> String {
    String::from_utf8(support::qcow2fs(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        args,
    ))
    .unwrap()
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap()
}

/// The name of an option as written in documentation: `uid=N`, `overlay[=DIR]` -> `uid`,
/// `overlay`.
fn option_name(s: &str) -> String {
    s.split(['=', '[']).next().unwrap().to_string()
}

/// Option names (and aliases) listed in the "Mount options" part of `qcow2fs mount --help`.
fn help_options() -> BTreeSet<String> {
    let text = qcow2fs(&["mount", "--help"]);
    let section = text
        .split("Mount options (-o")
        .nth(1)
        .expect("mount --help lists the mount options");
    let names: BTreeSet<String> = section
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Also accepted"))
        // An option line: two spaces, then the option; wrapped help is indented more.
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|rest| !rest.starts_with(' '))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(option_name)
        .collect();
    assert!(
        names.len() >= 20,
        "too few options parsed from --help: {names:?}"
    );
    names
}

/// The lines of a man page section, from `.SH NAME` to the next `.SH`.
fn man_section(page: &str, name: &str) -> Vec<String> {
    read(&format!("man/{page}"))
        .lines()
        .skip_while(|l| l.trim() != format!(".SH {name}"))
        .skip(1)
        .take_while(|l| !l.starts_with(".SH"))
        .map(str::to_string)
        .collect()
}

/// Option names given as `.TP` tags of a man page section (`.BR copy\-on\-read ", "
/// copy_on_read` gives two).
fn man_options(page: &str, section: &str) -> BTreeSet<String> {
    man_section(page, section)
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .flat_map(|w| {
            let tag = w[1]
                .trim_start_matches(|c: char| c == '.' || c.is_ascii_uppercase())
                .replace("\\-", "-")
                .replace(['"', ' '], "");
            let tag = ["\\fB", "\\fI", "\\fR"]
                .iter()
                .fold(tag, |t, f| t.replace(f, ""));
            tag.split(',').map(option_name).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn man_page_option_sections_are_what_the_option_table_generates() {
    for page in ["qcow2fs.1", "mount.qcow2fs.8"] {
        let path = repo_file(&format!("man/{page}"));
        let checked_in = std::fs::read_to_string(&path).unwrap();
        let generated = qcow2fs(&["gen-man", path.to_str().unwrap()]);
        if generated != checked_in {
            let (n, (old, new)) = checked_in
                .lines()
                .chain(std::iter::repeat("<end of file>"))
                .zip(generated.lines().chain(std::iter::repeat("<end of file>")))
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .unwrap();
            panic!(
                "man/{page} differs from what the option table generates, first at line {}:\n  \
                 checked in: {old:?}\n  generated:  {new:?}\nRun `make man` and commit the result.",
                n + 1
            );
        }
    }
}

#[test]
fn man_pages_list_exactly_the_mount_options_of_help() {
    let help = help_options();
    assert_eq!(
        man_options("qcow2fs.1", "MOUNT OPTIONS"),
        help,
        "qcow2fs.1 MOUNT OPTIONS and `qcow2fs mount --help` differ"
    );
    assert_eq!(
        man_options("mount.qcow2fs.8", "OPTIONS"),
        help,
        "mount.qcow2fs.8 OPTIONS and `qcow2fs mount --help` differ"
    );
}

#[test]
fn readme_names_only_options_that_exist() {
    let help = help_options();
    let readme = read("README.md");
    // The spans in backquotes: in the paragraph that lists mount options, each word is
    // an option; elsewhere, `-o A,B` names options.
    let spans = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(|s| s.replace('\n', " "))
            .collect()
    };
    let listed = readme
        .split("\n\n")
        .find(|p| p.starts_with("Mount options"))
        .expect("README has a paragraph starting with 'Mount options'");
    // Commands such as `qcow2fs mount --help` and `-o` itself are not options.
    let mut named: Vec<String> = spans(listed)
        .into_iter()
        .filter(|s| !s.starts_with('-') && !s.contains(' '))
        .collect();
    assert!(named.len() >= 5, "{named:?}");
    for s in spans(&readme) {
        if let Some(list) = s.strip_prefix("-o ") {
            named.extend(list.split(',').map(str::to_string));
        }
    }
    for n in named {
        assert!(
            help.contains(&option_name(&n)),
            "README names mount option `{n}`, which `qcow2fs mount --help` does not list"
        );
    }
}

/// The subcommands `qcow2fs --help` lists, without `help`.
fn commands() -> Vec<String> {
    let text = qcow2fs(&["--help"]);
    let commands: Vec<String> = text
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
        .map(str::to_string)
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    commands
}

#[test]
fn man_page_describes_every_command() {
    let man = man_section("qcow2fs.1", "COMMANDS");
    for c in commands() {
        assert!(
            man.windows(2)
                .any(|w| w[0] == ".TP" && w[1] == format!(".B {c}")),
            "qcow2fs.1 lacks command {c}"
        );
    }
}

#[test]
fn man_page_names_every_flag_of_every_command() {
    let man = read("man/qcow2fs.1");
    for c in commands() {
        let help = qcow2fs(&[&c, "--help"]);
        let flags: Vec<&str> = help
            .split_whitespace()
            .map(|w| w.trim_end_matches([',', '.']))
            .filter(|w| w.starts_with("--") && w.len() > 2 && *w != "--help")
            .collect();
        for f in flags {
            assert!(
                man.contains(&f.replace('-', "\\-")),
                "qcow2fs.1 does not name {f} of `qcow2fs {c}`"
            );
        }
    }
}
