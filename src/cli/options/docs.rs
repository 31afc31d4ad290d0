//! The mount options' documentation, rendered from the option tables: the `--help` list
//! of `qcow2fs mount` and the generated option sections of the man pages (qcow2fs.1 and
//! mount.qcow2fs.8), which `qcow2fs gen-man` splices between their BEGIN and END
//! markers (`make man`; tests/docs.rs fails when a checked-in page differs).

use super::table::{GENERIC_OPTIONS, Generic, MOUNT_OPTIONS, OptDefault, OptSpec, Value};
use crate::error::{Error, Result};
use std::path::Path;

/// The first line of a generated section.
const BEGIN: &str =
    r#".\" BEGIN generated from src/cli/options/table.rs: edit there, then run "make man""#;
/// The last line of a generated section.
const END: &str = r#".\" END generated"#;
/// Width of `--help` lines (clap rewraps lines longer than the terminal, without indent).
const WIDTH: usize = 80;

/// The syntax of an option's value: `N`, `on|off`, `[=DIR]` (without the name).
pub(super) fn value_syntax(v: Value) -> String {
    match v {
        Value::Flag => String::new(),
        Value::Required(arg) | Value::Optional(arg) => arg.to_string(),
        Value::Choice(words) => words.join("|"),
    }
}

/// `name`, `name=ARG`, `name=a|b` or `name[=ARG]`.
fn usage(name: &str, v: Value) -> String {
    match v {
        Value::Flag => name.to_string(),
        Value::Optional(arg) => format!("{name}[={arg}]"),
        _ => format!("{name}={}", value_syntax(v)),
    }
}

/// An option's one-line help with its default.
fn help_line(o: &OptSpec) -> String {
    let bare = o.help.strip_suffix('.').unwrap_or(o.help);
    match o.default {
        OptDefault::Unstated => o.help.to_string(),
        OptDefault::Value(v) => format!("{bare} (default {v})."),
        OptDefault::Text(t) => format!("{bare} (default: {t})."),
    }
}

/// `text` in lines of at most `WIDTH` columns (unless a word is longer): the first starts
/// with `first`, the others with `indent` blanks.
fn wrap(text: &str, first: &str, indent: usize) -> String {
    let mut out = String::new();
    let mut line = String::from(first);
    let mut words = 0;
    for w in text.split_whitespace() {
        if words > 0 && line.len() + 1 + w.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = " ".repeat(indent);
            words = 0;
        }
        if !line.is_empty() && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(w);
        words += 1;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// The generic options as (what qcow2fs does, names), in table order.
fn generic_groups() -> Vec<(String, Vec<&'static str>)> {
    let mut groups: Vec<(String, Vec<&'static str>)> = Vec::new();
    for g in GENERIC_OPTIONS {
        let what = match g.effect {
            Generic::Kernel { .. } => {
                "forwarded to the kernel (of two opposite ones, the later one wins)".to_string()
            }
            Generic::Ignored(why) => format!("accepted and ignored ({why})"),
        };
        match groups.iter_mut().find(|(w, _)| *w == what) {
            Some((_, names)) => names.push(g.name),
            None => groups.push((what, vec![g.name])),
        }
    }
    groups
}

/// The option list of `qcow2fs mount --help`.
pub fn help_text() -> String {
    let mut s = String::from("Mount options (-o, comma-separated; man qcow2fs describes them):\n");
    let line = |s: &mut String, left: &str, help: &str| {
        s.push_str(&wrap(help, &format!("  {left:<22} "), 25));
    };
    for o in MOUNT_OPTIONS {
        line(&mut s, &usage(o.name, o.value), &help_line(o));
        for a in o.aliases {
            line(
                &mut s,
                &usage(a, o.value),
                &format!("The same as {}.", o.name),
            );
        }
    }
    s.push_str("Values on and off may also be written yes and no, true and false, 1 and 0.\n");
    s.push_str("Also accepted, the generic options of mount(8):\n");
    for (what, names) in generic_groups() {
        s.push_str(&wrap(&format!("{what}: {}.", names.join(", ")), "  ", 4));
    }
    s
}

/// A man page with a generated option section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManPage {
    /// qcow2fs(1): each option with its full description.
    Qcow2fs,
    /// mount.qcow2fs(8): each option with its one-line help.
    MountHelper,
}

impl ManPage {
    /// The page a man file is, by its file name.
    pub fn of_file(path: &Path) -> Option<ManPage> {
        match path.file_name()?.to_str()? {
            "qcow2fs.1" => Some(ManPage::Qcow2fs),
            "mount.qcow2fs.8" => Some(ManPage::MountHelper),
            _ => None,
        }
    }

    /// The generated section, from its BEGIN marker to its END marker.
    pub fn section(self) -> String {
        let mut s = format!("{BEGIN}\n");
        for o in MOUNT_OPTIONS {
            s.push_str(".TP\n");
            s.push_str(&heading(o));
            match self {
                ManPage::Qcow2fs => {
                    for l in o.man.lines().map(str::trim).filter(|l| !l.is_empty()) {
                        s.push_str(l);
                        s.push('\n');
                    }
                }
                ManPage::MountHelper => {
                    s.push_str(&roff_text(o.help));
                    s.push('\n');
                }
            }
            match o.default {
                OptDefault::Unstated => {}
                OptDefault::Value(v) => s.push_str(&format!("Default: \\fB{}\\fR.\n", roff(v))),
                OptDefault::Text(t) => s.push_str(&format!("Default: {}.\n", roff_text(t))),
            }
        }
        s.push_str(".PP\nValues\n.B on\nand\n.B off\nmay also be written yes and no, true and false, 1 and 0.\n");
        s.push_str(".PP\nOf the generic options that\n.BR mount (8)\npasses, these are ");
        let groups = generic_groups();
        for (i, (what, names)) in groups.iter().enumerate() {
            if i > 0 {
                s.push_str("These are ");
            }
            s.push_str(&format!("{}:\n", roff_text(what)));
            for (j, n) in names.iter().enumerate() {
                let sep = if j + 1 == names.len() { " ." } else { " ," };
                // `\%`: never hyphenated.
                s.push_str(&format!(".BR \\%{}{sep}\n", roff(n)));
            }
        }
        s.push_str("Any other option is an error, reported before mounting.\n");
        s.push_str(END);
        s.push('\n');
        s
    }

    /// `page` (the text of this man page) with its generated section replaced.
    pub fn splice(self, page: &str) -> Result<String> {
        let missing = || {
            Error::invalid(format!(
                "the man page has no generated section (a line '{BEGIN}' and later a line '{END}')"
            ))
        };
        let begin = page.find(&format!("{BEGIN}\n")).ok_or_else(missing)?;
        let end = begin
            + page[begin..]
                .find(&format!("{END}\n"))
                .ok_or_else(missing)?;
        Ok(format!(
            "{}{}{}",
            &page[..begin],
            self.section(),
            &page[end + END.len() + 1..]
        ))
    }
}

/// An option name or value in roff: minus signs escaped.
fn roff(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// A line of plain text in roff: backslashes escaped, a dash that starts a word made a
/// minus sign (`-U`), and a leading dot or quote kept from reading as a request.
fn roff_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev = ' ';
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' if prev == ' ' => out.push_str("\\-"),
            _ => out.push(c),
        }
        prev = c;
    }
    if out.starts_with(['.', '\'']) {
        out.insert_str(0, "\\&");
    }
    out
}

/// A font of the man page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Font {
    Bold,
    Italic,
    Roman,
}

impl Font {
    fn letter(self) -> char {
        match self {
            Font::Bold => 'B',
            Font::Italic => 'I',
            Font::Roman => 'R',
        }
    }
}

/// The `.TP` tag line of an option: its names (bold) and value syntax.
fn heading(o: &OptSpec) -> String {
    let mut pieces: Vec<(Font, String)> = Vec::new();
    let mut push = |font: Font, text: String| match pieces.last_mut() {
        Some((f, t)) if *f == font => t.push_str(&text),
        _ => pieces.push((font, text)),
    };
    for (i, name) in std::iter::once(&o.name).chain(o.aliases).enumerate() {
        if i > 0 {
            push(Font::Roman, ", ".into());
        }
        match o.value {
            Value::Flag => push(Font::Bold, roff(name)),
            Value::Required(arg) => {
                push(Font::Bold, format!("{}=", roff(name)));
                push(Font::Italic, roff(arg));
            }
            Value::Choice(words) => {
                push(Font::Bold, format!("{}=", roff(name)));
                for (j, w) in words.iter().enumerate() {
                    if j > 0 {
                        push(Font::Bold, "|".into());
                    }
                    push(Font::Roman, roff(w));
                }
            }
            Value::Optional(arg) => {
                push(Font::Bold, roff(name));
                push(Font::Roman, format!("[=\\fI{}\\fR]", roff(arg)));
            }
        }
    }
    // One macro when the pieces alternate between bold and one other font (`.BI uid= N`),
    // font escapes otherwise.
    let other = pieces.get(1).map_or(Font::Roman, |p| p.0);
    let alternating = pieces
        .iter()
        .enumerate()
        .all(|(i, (f, _))| *f == if i % 2 == 0 { Font::Bold } else { other });
    if pieces.len() == 1 {
        format!(".B {}\n", pieces[0].1)
    } else if alternating {
        let args: Vec<String> = pieces
            .iter()
            .map(|(_, t)| {
                if t.contains(' ') {
                    format!("\"{t}\"")
                } else {
                    t.clone()
                }
            })
            .collect();
        format!(".B{} {}\n", other.letter(), args.join(" "))
    } else {
        let inline: String = pieces
            .iter()
            .map(|(f, t)| format!("\\f{}{t}", f.letter()))
            .collect();
        format!("{inline}\\fR\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &'static str, aliases: &'static [&'static str], value: Value) -> OptSpec {
        OptSpec {
            name,
            aliases,
            value,
            default: OptDefault::Unstated,
            help: "Help.",
            man: "Text.",
            apply: |_, _| Ok(()),
        }
    }

    #[test]
    fn headings_use_one_macro_when_they_can() {
        for (o, want) in [
            (spec("ro", &[], Value::Flag), ".B ro"),
            (spec("uid", &[], Value::Required("N")), ".BI uid= N"),
            (
                spec("layers", &[], Value::Choice(&["on", "off"])),
                ".BR layers= on | off",
            ),
            (
                spec("overlay", &[], Value::Optional("DIR")),
                r".BR overlay [=\fIDIR\fR]",
            ),
            (
                spec("copy-on-read", &["copy_on_read"], Value::Flag),
                r#".BR copy\-on\-read ", " copy_on_read"#,
            ),
            (
                spec("a-b", &["c"], Value::Required("N")),
                r"\fBa\-b=\fIN\fR, \fBc=\fIN\fR",
            ),
        ] {
            assert_eq!(heading(&o), format!("{want}\n"), "{}", o.name);
        }
    }

    #[test]
    fn plain_text_is_escaped_for_roff() {
        assert_eq!(roff_text("like qemu-img -U."), r"like qemu-img \-U.");
        assert_eq!(roff_text(".dot 'and' a\\b"), r"\&.dot 'and' a\eb");
    }

    #[test]
    fn help_lines_fit_the_width() {
        let help = help_text();
        for l in help.lines() {
            assert!(
                l.len() <= WIDTH || !l.trim().contains(' '),
                "{} columns: {l:?}",
                l.len()
            );
        }
        for o in MOUNT_OPTIONS {
            assert!(help.contains(&format!("\n  {} ", usage(o.name, o.value))));
        }
    }

    #[test]
    fn splicing_replaces_only_the_generated_section() {
        let page =
            format!(".TH X 1\n.SH OPTIONS\nkept\n{BEGIN}\nSTALE LINE\n{END}\n.SH MORE\nkept too\n");
        let new = ManPage::Qcow2fs.splice(&page).unwrap();
        assert!(new.starts_with(".TH X 1\n.SH OPTIONS\nkept\n"));
        assert!(new.ends_with(&format!("{END}\n.SH MORE\nkept too\n")));
        assert!(!new.contains("STALE LINE"));
        assert!(new.contains(&ManPage::Qcow2fs.section()));
        assert_eq!(ManPage::Qcow2fs.splice(&new).unwrap(), new);
        assert!(ManPage::Qcow2fs.splice(".TH X 1\n").is_err());
        assert!(ManPage::Qcow2fs.splice(&format!("{BEGIN}\n")).is_err());
    }
}
