//! Mount options (`-o a,b=c`): the parsed [`MountOptions`], the parser and the rules
//! between options. Each option is defined once, in the tables of `table` (name, value,
//! default, help, man text, effect); `docs` renders `--help` and the man pages' option
//! sections from them.

mod docs;
mod table;

pub use docs::{ManPage, help_text};
pub use table::{GENERIC_OPTIONS, Generic, GenericOption, MOUNT_OPTIONS, OptSpec, Value};

use crate::block::{BackingPolicy, Keys, OpenOptions};
use crate::error::{Error, Result};
use crate::storage::remote::RemoteOptions;
use fuser::MountOption;
use std::path::PathBuf;

/// Parsed `-o` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub rw: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: u32,
    pub fsname: Option<String>,
    pub cache_size: Option<u64>,
    pub threads: Option<usize>,
    /// Kernel readahead window in KiB.
    pub readahead_kb: Option<u32>,
    pub snapshots: bool,
    pub layers: bool,
    /// Show the files' extended attributes.
    pub xattrs: bool,
    pub bitmaps: bool,
    pub log: Option<PathBuf>,
    pub force_share: bool,
    pub copy_on_read: bool,
    pub cor_bottom: Option<String>,
    /// Throwaway overlays, in this directory.
    pub overlay: Option<PathBuf>,
    pub keep_overlay: bool,
    pub deny_backing: bool,
    pub backing_dir: Option<PathBuf>,
    /// A local image may name a remote backing or data file.
    pub follow_remote: bool,
    /// A remote image may name a local backing or data file.
    pub follow_local: bool,
    /// How remote images are read.
    pub remote: RemoteOptions,
    /// Passphrases of encrypted layers (`key-file`, `key-file.N`).
    pub keys: Keys,
    /// Kernel mount flags to forward (nodev, nosuid, noexec, noatime, ...), by their
    /// names in [`GENERIC_OPTIONS`].
    pub kernel_flags: Vec<&'static str>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            rw: false,
            allow_other: false,
            allow_root: false,
            uid: None,
            gid: None,
            umask: 0o022,
            fsname: None,
            cache_size: None,
            threads: None,
            readahead_kb: None,
            snapshots: true,
            layers: true,
            xattrs: true,
            bitmaps: true,
            log: None,
            force_share: false,
            copy_on_read: false,
            cor_bottom: None,
            overlay: None,
            keep_overlay: false,
            deny_backing: false,
            backing_dir: None,
            follow_remote: false,
            follow_local: false,
            remote: RemoteOptions::default(),
            keys: Keys::default(),
            kernel_flags: Vec::new(),
        }
    }
}

/// The suffixes of a size (in either case) and what they multiply by.
const SIZE_SUFFIXES: [(char, u64); 5] = [
    ('b', 1),
    ('k', 1 << 10),
    ('m', 1 << 20),
    ('g', 1 << 30),
    ('t', 1 << 40),
];

/// Parses a size: decimal digits, optionally followed by one of the suffixes B (bytes), k
/// (KiB), M (MiB), G (GiB) or T (TiB), in either case: `4096`, `64k`, `32M`, `1G`.
pub fn parse_size(s: &str) -> Option<u64> {
    let last = s.chars().last()?;
    let (num, mult) = match SIZE_SUFFIXES
        .iter()
        .find(|(c, _)| last.eq_ignore_ascii_case(c))
    {
        Some(&(_, mult)) => (&s[..s.len() - 1], mult),
        None => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The value of an on/off option; yes/no, true/false and 1/0 are accepted too.
fn on_off(v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

fn number<T: std::str::FromStr>(v: &str) -> std::result::Result<T, String> {
    v.parse().map_err(|_| "not a valid number".to_string())
}

/// The fuser mount option for a kernel flag in [`MountOptions::kernel_flags`].
fn kernel_option(name: &str) -> Option<MountOption> {
    GENERIC_OPTIONS.iter().find_map(|g| match &g.effect {
        Generic::Kernel { flag, .. } if g.name == name => Some(flag.clone()),
        _ => None,
    })
}

/// The generic option `opt` (the whole `name[=value]`) is, if any.
fn generic(opt: &str) -> Option<&'static GenericOption> {
    let (name, value) = match opt.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (opt, None),
    };
    GENERIC_OPTIONS.iter().find(|g| {
        if let Some(prefix) = g.name.strip_suffix('*') {
            opt.starts_with(prefix)
        } else if let Some(n) = g.name.strip_suffix('=') {
            name == n && value.is_some()
        } else {
            name == g.name && (value.is_none() || matches!(g.effect, Generic::Ignored(_)))
        }
    })
}

/// The option of qcow2fs named `name` (or one of its aliases), if any; for a numbered
/// option (`key-file.2` of `key-file.N`), also the number the name gives.
fn spec(name: &str) -> Option<(&'static OptSpec, Option<&str>)> {
    if let Some(o) = MOUNT_OPTIONS
        .iter()
        .find(|o| o.name == name || o.aliases.contains(&name))
    {
        return Some((o, None));
    }
    let (prefix, n) = name.rsplit_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    MOUNT_OPTIONS
        .iter()
        .find(|o| o.name.strip_suffix(".N") == Some(prefix))
        .map(|o| (o, Some(n)))
}

impl MountOptions {
    /// Parses comma-separated option lists (each `-o` argument is one list).
    pub fn parse<'a>(lists: impl IntoIterator<Item = &'a str>) -> Result<MountOptions> {
        let mut o = MountOptions::default();
        for list in lists {
            for opt in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                o.apply(opt)?;
            }
        }
        if o.copy_on_read && !o.rw {
            return Err(Error::invalid(
                "option copy-on-read writes into the image: it needs -o rw (use -o overlay to leave the image untouched)",
            ));
        }
        if o.cor_bottom.is_some() && !o.copy_on_read {
            return Err(Error::invalid("option cor_bottom needs -o copy-on-read"));
        }
        if o.overlay.is_some() && (o.rw || o.copy_on_read) {
            return Err(Error::invalid(
                "option overlay leaves the image untouched: it excludes rw and copy-on-read",
            ));
        }
        if o.keep_overlay && o.overlay.is_none() {
            return Err(Error::invalid("option keep_overlay needs -o overlay"));
        }
        if o.rw && o.force_share {
            return Err(Error::invalid(
                "options rw and force_share exclude each other: writing needs the image lock",
            ));
        }
        if o.allow_other && o.allow_root {
            return Err(Error::invalid(
                "options allow_other and allow_root exclude each other",
            ));
        }
        Ok(o)
    }

    fn apply(&mut self, opt: &str) -> Result<()> {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        if let Some((spec, number)) = spec(name) {
            let v = match (spec.value, value) {
                (Value::Flag, Some(_)) => {
                    return Err(Error::invalid(format!("option {name} takes no value")));
                }
                (Value::Required(_) | Value::Choice(_), None) => {
                    return Err(Error::invalid(format!(
                        "option {name} needs a value ({name}={})",
                        docs::value_syntax(spec.value)
                    )));
                }
                (_, v) => v.unwrap_or(""),
            };
            let applied = match number {
                Some(n) => (spec.apply)(self, &format!("{n}={v}")),
                None if spec.name.ends_with(".N") => Err(format!(
                    "write the layer depth for N, as in {}",
                    spec.name.replace(".N", ".1")
                )),
                None => (spec.apply)(self, v),
            };
            return applied.map_err(|why| Error::invalid(format!("option {name}={v}: {why}")));
        }
        match generic(opt) {
            Some(GenericOption {
                name,
                effect: Generic::Kernel { opposite, .. },
            }) => {
                // mount(8) semantics: of two opposite flags, the later one wins.
                self.kernel_flags
                    .retain(|f| f != name && Some(*f) != *opposite);
                self.kernel_flags.push(name);
                Ok(())
            }
            Some(_) => Ok(()),
            None if GENERIC_OPTIONS.iter().any(|g| g.name == name) => {
                Err(Error::invalid(format!("option {name} takes no value")))
            }
            None => Err(Error::invalid(format!(
                "unknown mount option '{opt}' (see qcow2fs mount --help)"
            ))),
        }
    }

    /// The kernel flags to pass at mount time.
    /// How to open the image these options describe (writable with `rw`).
    pub fn open_options(&self) -> OpenOptions {
        let mut o = OpenOptions {
            force_share: self.force_share,
            backing: if self.deny_backing {
                BackingPolicy::Deny
            } else {
                BackingPolicy::Follow
            },
            backing_dir: self.backing_dir.clone(),
            remote: self.remote.clone(),
            follow_local: self.follow_local,
            follow_remote: self.follow_remote,
            keys: self.keys.clone(),
            ..Default::default()
        };
        o.image.writable = self.rw;
        if let Some(c) = self.cache_size {
            o.image.cache_bytes = c;
        }
        o
    }

    pub fn kernel_mount_options(&self) -> impl Iterator<Item = MountOption> + '_ {
        self.kernel_flags.iter().filter_map(|f| kernel_option(f))
    }
}

#[cfg(test)]
mod tests {
    use super::table::OptDefault;
    use super::*;

    fn parse(opts: &str) -> Result<MountOptions> {
        MountOptions::parse([opts])
    }

    fn error(opts: &str) -> String {
        match parse(opts) {
            Ok(o) => panic!("-o {opts} was accepted: {o:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// An option as the user writes it: a sample value where one is needed.
    fn sample(o: &OptSpec, name: &str) -> String {
        let numbered = name.replace(".N", ".1");
        let name = numbered.as_str();
        match o.value {
            Value::Flag | Value::Optional(_) => name.to_string(),
            Value::Choice(words) => format!("{name}={}", words[0]),
            Value::Required("URL") => format!("{name}=http://127.0.0.1:9000"),
            Value::Required(_) => match o.default {
                OptDefault::Value(v) => format!("{name}={v}"),
                _ => format!("{name}=8"),
            },
        }
    }

    #[test]
    fn parses_values_and_generic_options() {
        let o = MountOptions::parse([
            "ro,uid=1000,umask=077,cache_size=64M",
            "snapshots=off,noatime,_netdev,x-systemd.automount",
        ])
        .unwrap();
        assert_eq!(o.uid, Some(1000));
        assert_eq!(o.umask, 0o077);
        assert_eq!(o.cache_size, Some(64 << 20));
        assert!(!o.snapshots);
        assert_eq!(o.kernel_flags, ["noatime"]);
        let o = MountOptions::parse(["nosuid,noexec,suid", "exec"]).unwrap();
        assert_eq!(o.kernel_flags, ["suid", "exec"]);
        let o = parse("sync,dirsync,async,dirsync").unwrap();
        assert_eq!(o.kernel_flags, ["async", "dirsync"]);
        assert_eq!(
            o.kernel_mount_options().collect::<Vec<_>>(),
            [MountOption::Async, MountOption::DirSync]
        );
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        for (opts, message) in [
            ("bogus", "unknown mount option 'bogus'"),
            ("uid=abc", "option uid=abc: not a valid number"),
            (
                "snapshots=maybe",
                "option snapshots=maybe: expected on or off",
            ),
            ("threads=0", "option threads=0: expected 1 to 256"),
            (
                "readahead=2",
                "option readahead=2: expected 4 to 65536 (KiB)",
            ),
            ("umask=1000", "option umask=1000: expected an octal mask"),
            ("cache_size=1P", "option cache_size=1P: not a size"),
            (
                "backing=maybe",
                "option backing=maybe: expected follow, deny, follow-remote, follow-local or follow-any",
            ),
            ("uid", "option uid needs a value (uid=N)"),
            ("layers", "option layers needs a value (layers=on|off)"),
            ("rw=0", "option rw takes no value"),
            ("nodev=1", "option nodev takes no value"),
            ("comment", "unknown mount option 'comment'"),
            ("allow_other,allow_root", "exclude each other"),
            ("rw,force_share", "exclude each other"),
            ("copy-on-read", "needs -o rw"),
            ("rw,cor_bottom=1", "needs -o copy-on-read"),
            ("overlay,rw", "excludes rw"),
            ("keep_overlay", "needs -o overlay"),
        ] {
            let e = error(opts);
            assert!(e.contains(message), "-o {opts}: {e:?} lacks {message:?}");
        }
    }

    #[test]
    fn every_name_is_defined_once() {
        let mut names: Vec<&str> = MOUNT_OPTIONS
            .iter()
            .flat_map(|o| std::iter::once(o.name).chain(o.aliases.iter().copied()))
            .chain(
                GENERIC_OPTIONS
                    .iter()
                    .map(|g| g.name.trim_end_matches(['=', '*'])),
            )
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a name stands twice in the option tables");
    }

    #[test]
    fn every_option_is_documented_and_accepted() {
        for o in MOUNT_OPTIONS {
            assert!(
                o.help.ends_with('.') && !o.help.contains('\n') && o.help.trim() == o.help,
                "{}: the help is one line ending with a period",
                o.name
            );
            assert!(!o.man.trim().is_empty(), "{}: no man text", o.name);
            for name in std::iter::once(&o.name).chain(o.aliases) {
                // The rules between options: copy-on-read needs rw.
                let opts = format!("rw,{}", sample(o, name));
                let opts = if o.name == "overlay" || o.name == "keep_overlay" {
                    format!("overlay,{}", sample(o, name))
                } else if o.name == "force_share" {
                    sample(o, name)
                } else if o.name == "cor_bottom" {
                    format!("{opts},copy-on-read")
                } else {
                    opts
                };
                if let Err(e) = parse(&opts) {
                    panic!("-o {opts}: {e}");
                }
            }
        }
    }

    #[test]
    fn stated_defaults_are_the_defaults() {
        let mut checked = 0;
        for o in MOUNT_OPTIONS {
            if let OptDefault::Value(v) = o.default {
                let mut got = parse(&format!("{}={v}", o.name)).unwrap();
                // Without the option, the engine's default cache size applies.
                if got.cache_size == Some(crate::engine::DEFAULT_CACHE_BYTES) {
                    got.cache_size = None;
                }
                assert_eq!(got, MountOptions::default(), "-o {}={v}", o.name);
                checked += 1;
            }
        }
        assert!(checked >= 5, "{checked}");
    }

    #[test]
    fn aliases_act_like_their_option() {
        for o in MOUNT_OPTIONS {
            for a in o.aliases {
                assert_eq!(
                    parse(&format!("rw,{}", sample(o, a))).unwrap(),
                    parse(&format!("rw,{}", sample(o, o.name))).unwrap(),
                    "{a}"
                );
            }
        }
        assert!(parse("rw,copy_on_read").unwrap().copy_on_read);
    }

    #[test]
    fn generic_options_are_forwarded_or_ignored() {
        for g in GENERIC_OPTIONS {
            let opt = match g.name {
                "x-*" => "x-systemd.automount".to_string(),
                n if n.ends_with('=') => format!("{n}anything"),
                n => n.to_string(),
            };
            let o = parse(&opt).unwrap_or_else(|e| panic!("-o {opt}: {e}"));
            match &g.effect {
                Generic::Kernel { flag, .. } => {
                    assert_eq!(o.kernel_flags, [g.name], "-o {opt}");
                    assert_eq!(kernel_option(g.name).as_ref(), Some(flag));
                }
                Generic::Ignored(_) => {
                    assert_eq!(o, MountOptions::default(), "-o {opt}");
                    assert_eq!(kernel_option(g.name), None);
                }
            }
        }
        // mount(8) passes user=NAME for a user mount; fstab may carry x-NAME=VALUE.
        assert_eq!(
            parse("user=alice,x-foo=bar,comment=x=y").unwrap(),
            MountOptions::default()
        );
        for g in GENERIC_OPTIONS {
            if let Generic::Kernel {
                opposite: Some(opposite),
                ..
            } = g.effect
            {
                let o = parse(&format!("{},{opposite}", g.name)).unwrap();
                assert_eq!(
                    o.kernel_flags,
                    [opposite],
                    "the later of two opposites wins"
                );
            }
        }
    }

    #[test]
    fn key_files_for_every_layer_and_per_layer() {
        use crate::block::KeySource;
        let o = parse("key-file=/k/all,key-file.1=/k/one,key-file.0=-").unwrap();
        assert_eq!(o.keys.all, Some(KeySource::File("/k/all".into())));
        assert_eq!(o.keys.layers[&0], KeySource::Prompt);
        assert_eq!(o.keys.layers[&1], KeySource::File("/k/one".into()));
        assert_eq!(o.keys.layers.len(), 2);
        assert_eq!(o.open_options().keys, o.keys);
        for (opts, message) in [
            ("key-file", "option key-file needs a value (key-file=PATH)"),
            ("key-file=", "the key file name is empty"),
            ("key-file.1", "option key-file.1 needs a value"),
            ("key-file.N=/k", "write the layer depth for N"),
            ("key-file.99=/k", "is not a number from 0"),
            ("key-file.x=/k", "unknown mount option 'key-file.x=/k'"),
            ("key-file.=/k", "unknown mount option"),
            ("log.1=/k", "unknown mount option"),
        ] {
            let e = error(opts);
            assert!(e.contains(message), "-o {opts}: {e:?} lacks {message:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4096B"), Some(4096));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("32m"), Some(32 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2t"), Some(2 << 40));
        assert_eq!(parse_size("0"), Some(0));
        // Exactly the suffixes the man page names, in either case.
        for c in ('a'..='z').chain('A'..='Z') {
            assert_eq!(
                parse_size(&format!("1{c}")).is_some(),
                "bBkKmMgGtT".contains(c),
                "suffix {c}"
            );
        }
        for bad in [
            "",
            "k",
            "x",
            "+1",
            "-1",
            "1.5G",
            "1KiB",
            " 1",
            "1 ",
            "1kk",
            "0x10",
            "99999999999T",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
