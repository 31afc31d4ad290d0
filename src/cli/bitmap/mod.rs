//! `qcow2fs bitmap`: the persistent dirty bitmaps of a mounted image (through its daemon,
//! under the mount's I/O gate) or of an image that is not mounted. Changes take
//! `qemu-img bitmap`'s flags (`--add [-g SIZE] [--disable]`, `--remove`, `--clear`,
//! `--enable`, `--disable`, `--merge SOURCE [-b FILE]`), applied in command-line order;
//! `bitmap list` shows the bitmaps with their dirty bytes and `bitmap dump` a bitmap's
//! dirty extents. The daemon's side of the `bitmap-*` requests is in `serve`.

mod serve;

pub use serve::serve;

use super::control;
use super::daemon::is_mountpoint;
use crate::engine::{BitmapInfo, Image};
use crate::error::{Error, Result};
use crate::format::bitmap::{FLAG_AUTO, FLAG_IN_USE};
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

/// The subcommands of `qcow2fs bitmap`: the queries, and each change on its own (the same
/// as the flag of that name).
#[derive(Debug, Subcommand)]
pub enum Query {
    /// List the bitmaps: name, granularity, flags and dirty bytes.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Open the image even if another process is writing to it (like qemu-img -U).
        #[arg(short = 'U', long)]
        force_share: bool,
        /// The mount point, or an image that is not mounted.
        target: PathBuf,
    },
    /// Print the dirty extents of a bitmap (offset and length of each dirty range).
    Dump {
        /// Print JSON: a list of {"offset": N, "length": N}.
        #[arg(long)]
        json: bool,
        /// Open the image even if another process is writing to it (like qemu-img -U).
        #[arg(short = 'U', long)]
        force_share: bool,
        target: PathBuf,
        bitmap: String,
    },
    /// Create a bitmap, as --add does.
    Add {
        /// The granularity, as with --add
        #[arg(short = 'g', long, value_name = "SIZE")]
        granularity: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disable: bool,
        target: PathBuf,
        bitmap: String,
    },
    /// Remove a bitmap, as --remove does.
    Remove { target: PathBuf, bitmap: String },
    /// Make a bitmap all clean, as --clear does.
    Clear { target: PathBuf, bitmap: String },
    /// Start recording writes in a bitmap, as --enable does.
    Enable { target: PathBuf, bitmap: String },
    /// Stop recording writes in a bitmap, as --disable does.
    Disable { target: PathBuf, bitmap: String },
    /// Mark in BITMAP everything bitmap SOURCE has dirty, as --merge SOURCE does.
    Merge {
        /// Take SOURCE from this image instead.
        #[arg(short = 'b', long, value_name = "SOURCE_FILE")]
        source_file: Option<PathBuf>,
        target: PathBuf,
        bitmap: String,
        source: String,
    },
}

impl Query {
    /// The change a change subcommand asks for, as the flags would say it.
    fn into_changes(self) -> std::result::Result<Changes, Query> {
        let one = |op: Op, target: PathBuf, bitmap: String| Changes {
            ops: vec![op],
            target: Some(target),
            bitmap: Some(bitmap),
            ..Default::default()
        };
        Ok(match self {
            Query::Add {
                granularity,
                disable,
                target,
                bitmap,
            } => {
                let mut c = one(Op::Add, target, bitmap);
                if disable {
                    c.ops.push(Op::Disable);
                }
                c.granularity = granularity;
                c
            }
            Query::Remove { target, bitmap } => one(Op::Remove, target, bitmap),
            Query::Clear { target, bitmap } => one(Op::Clear, target, bitmap),
            Query::Enable { target, bitmap } => one(Op::Enable, target, bitmap),
            Query::Disable { target, bitmap } => one(Op::Disable, target, bitmap),
            Query::Merge {
                source_file,
                target,
                bitmap,
                source,
            } => Changes {
                source_file,
                ..one(Op::Merge(source), target, bitmap)
            },
            q => return Err(q),
        })
    }
}

/// One change, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    /// Merge the named source bitmap into the target bitmap.
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// The changes `qcow2fs bitmap [FLAGS] TARGET BITMAP` asks for, in order.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub ops: Vec<Op>,
    pub granularity: Option<String>,
    pub source_file: Option<PathBuf>,
    pub source_format: Option<String>,
    pub format: Option<String>,
    pub target: Option<PathBuf>,
    pub bitmap: Option<String>,
}

const FLAGS: [(&str, &str); 5] = [
    ("add", "Create BITMAP, recording writes from now on"),
    ("remove", "Remove BITMAP (an inconsistent one too)"),
    ("clear", "Make BITMAP all clean"),
    ("enable", "Start recording writes in BITMAP"),
    ("disable", "Stop recording writes in BITMAP"),
];

impl Args for Changes {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd;
        for (name, help) in FLAGS {
            cmd = cmd.arg(
                Arg::new(name)
                    .long(name)
                    .help(help)
                    .action(ArgAction::Append)
                    .num_args(0)
                    .default_missing_value("x")
                    .value_parser(clap::builder::NonEmptyStringValueParser::new()),
            );
        }
        cmd.arg(
            Arg::new("merge")
                .long("merge")
                .value_name("SOURCE")
                .action(ArgAction::Append)
                .help("Mark in BITMAP everything bitmap SOURCE has dirty (repeatable)"),
        )
        .arg(
            Arg::new("granularity")
                .short('g')
                .long("granularity")
                .value_name("SIZE")
                .help("With --add, the granularity: a power of 2 from 512 to 2G (K, M, G suffixes); default the cluster size within 4K to 64K"),
        )
        .arg(
            Arg::new("source-file")
                .short('b')
                .long("source-file")
                .value_name("SOURCE_FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Take the --merge sources from this image instead"),
        )
        .arg(
            Arg::new("source-format")
                .short('F')
                .long("source-format")
                .value_name("FMT")
                .help("Format of SOURCE_FILE (qcow2 only)"),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .value_name("FMT")
                .help("Format of the image (qcow2 only)"),
        )
        .arg(
            Arg::new("target")
                .value_name("TARGET")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("The mount point, or an image that is not mounted"),
        )
        .arg(
            Arg::new("bitmap")
                .value_name("BITMAP")
                .required(true)
                .help("The bitmap's name"),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for Changes {
    fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut ops: Vec<(usize, Op)> = Vec::new();
        let simple = [
            ("add", Op::Add),
            ("remove", Op::Remove),
            ("clear", Op::Clear),
            ("enable", Op::Enable),
            ("disable", Op::Disable),
        ];
        for (id, op) in simple {
            if let Some(idx) = m.indices_of(id) {
                ops.extend(idx.map(|i| (i, op.clone())));
            }
        }
        if let (Some(idx), Some(vals)) = (m.indices_of("merge"), m.get_many::<String>("merge")) {
            ops.extend(idx.zip(vals).map(|(i, v)| (i, Op::Merge(v.clone()))));
        }
        ops.sort_by_key(|(i, _)| *i);
        Ok(Changes {
            ops: ops.into_iter().map(|(_, o)| o).collect(),
            granularity: m.get_one::<String>("granularity").cloned(),
            source_file: m.get_one::<PathBuf>("source-file").cloned(),
            source_format: m.get_one::<String>("source-format").cloned(),
            format: m.get_one::<String>("format").cloned(),
            target: m.get_one::<PathBuf>("target").cloned(),
            bitmap: m.get_one::<String>("bitmap").cloned(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// A bitmap as JSON (for `list --json`, `info --json` and the control channel).
pub fn info_json(b: &BitmapInfo) -> Value {
    let mut v = json!({
        "name": b.name,
        "granularity": b.granularity,
        "flags": flag_names(b.flags),
        "recording": b.recording,
        "inconsistent": b.inconsistent,
        "stored": b.stored,
        "dirty-bytes": b.dirty_bytes,
    });
    if let Some(p) = &b.problem {
        v["problem"] = json!(p);
    }
    v
}

/// qemu-img's names for a bitmap's flags.
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    let mut out = Vec::new();
    if flags & FLAG_IN_USE != 0 {
        out.push("in-use");
    }
    if flags & FLAG_AUTO != 0 {
        out.push("auto");
    }
    out
}

fn extents_json(extents: &[(u64, u64)]) -> Value {
    json!(
        extents
            .iter()
            .map(|&(o, l)| json!({"offset": o, "length": l}))
            .collect::<Vec<_>>()
    )
}

fn print_list(list: &[Value], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(list).unwrap_or_default());
        return;
    }
    println!(
        "{:<24} {:>12} {:<14} {:>14}",
        "NAME", "GRANULARITY", "FLAGS", "DIRTY BYTES"
    );
    for b in list {
        let flags: Vec<&str> = b["flags"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let dirty = match (b["dirty-bytes"].as_u64(), b["inconsistent"].as_bool()) {
            (Some(n), _) => n.to_string(),
            (None, Some(true)) => "inconsistent".into(),
            _ => "?".into(),
        };
        println!(
            "{:<24} {:>12} {:<14} {:>14}",
            b["name"].as_str().unwrap_or(""),
            b["granularity"].as_u64().unwrap_or(0),
            if flags.is_empty() {
                "-".to_string()
            } else {
                flags.join(",")
            },
            dirty
        );
    }
}

fn print_extents(extents: &Value, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(extents).unwrap_or_default()
        );
        return;
    }
    println!("{:<20}{:<20}", "Offset", "Length");
    for e in extents.as_array().into_iter().flatten() {
        println!(
            "{:<20}{:<20}",
            format!("{:#x}", e["offset"].as_u64().unwrap_or(0)),
            format!("{:#x}", e["length"].as_u64().unwrap_or(0))
        );
    }
}

/// Runs `qcow2fs bitmap`: a query, or the changes.
pub fn run(query: Option<Query>, changes: Changes) -> Result<()> {
    let query = match query.map(Query::into_changes) {
        Some(Ok(c)) => return change(c),
        Some(Err(q)) => Some(q),
        None => None,
    };
    match query {
        Some(Query::List {
            json,
            force_share,
            target,
        }) => {
            let list = if is_mountpoint(&target) {
                let v = control::request(&target, &json!({"op": "bitmap-list"}))?;
                v["bitmaps"].as_array().cloned().unwrap_or_default()
            } else {
                let chain = super::open_for_metadata(&target, false, force_share)?;
                if let Some(p) = chain.image().bitmap_problem() {
                    return Err(Error::corrupt(p).in_file(&target));
                }
                chain.image().bitmap_list().iter().map(info_json).collect()
            };
            print_list(&list, json);
            Ok(())
        }
        Some(Query::Dump {
            json,
            force_share,
            target,
            bitmap,
        }) => {
            let extents = if is_mountpoint(&target) {
                let v = control::request(&target, &json!({"op": "bitmap-dump", "name": bitmap}))?;
                v["extents"].clone()
            } else {
                let chain = super::open_for_metadata(&target, false, force_share)?;
                extents_json(&chain.image().bitmap_dirty_extents(&bitmap)?)
            };
            print_extents(&extents, json);
            Ok(())
        }
        None => change(changes),
        Some(_) => Err(Error::invalid("unexpected bitmap subcommand")),
    }
}

/// Checks the flags as qemu-img does.
fn check_changes(c: &Changes) -> Result<(PathBuf, String, Option<u64>)> {
    let bad = |m: &str| Err(Error::invalid(m.to_string()));
    if c.ops.is_empty() {
        return bad(
            "need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        );
    }
    for f in [&c.format, &c.source_format].into_iter().flatten() {
        if f != "qcow2" {
            return Err(Error::unsupported(format!(
                "format '{f}': only qcow2 images have persistent bitmaps here"
            )));
        }
    }
    if c.granularity.is_some() && !c.ops.contains(&Op::Add) {
        return bad("granularity only supported with --add");
    }
    if c.source_format.is_some() && c.source_file.is_none() {
        return bad("-F only supported with -b");
    }
    let merging = c.ops.iter().any(|o| matches!(o, Op::Merge(_)));
    if c.source_file.is_some() && !merging {
        return bad("merge bitmap source file only supported with --merge");
    }
    let granularity = match &c.granularity {
        Some(g) => Some(super::options::parse_size(g).ok_or_else(|| {
            Error::invalid(format!(
                "granularity '{g}': expected a size such as 65536 or 64K"
            ))
        })?),
        None => None,
    };
    let (Some(target), Some(name)) = (c.target.clone(), c.bitmap.clone()) else {
        return bad("expecting a target (image or mount point) and a bitmap name");
    };
    Ok((target, name, granularity))
}

/// Applies one change to `image`; `source` is the image --merge takes its sources from.
fn apply(image: &Image, op: &Op, name: &str, g: Option<u64>, source: &Image) -> Result<()> {
    match op {
        Op::Add => image.bitmap_add(name, g, true),
        Op::Remove => image.bitmap_remove(name),
        Op::Clear => image.bitmap_clear(name),
        Op::Enable => image.bitmap_set_enabled(name, true),
        Op::Disable => image.bitmap_set_enabled(name, false),
        Op::Merge(src) => image.bitmap_merge(name, source, src),
    }
}

/// The error for a change that failed, in qemu-img's words.
fn failed(op: &Op, name: &str, e: Error) -> Error {
    Error::new(
        e.kind(),
        format!(
            "operation {} on bitmap '{name}' failed: {}",
            op.name(),
            e.report()
        ),
    )
}

fn change(c: Changes) -> Result<()> {
    let (target, name, granularity) = check_changes(&c)?;
    if is_mountpoint(&target) {
        let source_file = match &c.source_file {
            Some(f) => Some(
                f.canonicalize()
                    .map_err(|e| Error::io(f, "resolving the source file", e))?,
            ),
            None => None,
        };
        for op in &c.ops {
            let mut req = json!({"op": format!("bitmap-{}", op.name()), "name": name});
            match op {
                Op::Add => req["granularity"] = json!(granularity),
                Op::Merge(src) => {
                    req["source"] = json!(src);
                    req["source-file"] = json!(source_file);
                }
                _ => {}
            }
            control::request(&target, &req).map_err(|e| failed(op, &name, e))?;
        }
        return Ok(());
    }
    let chain = super::open_for_metadata(&target, true, false)?;
    let image = chain.image();
    let source = match &c.source_file {
        Some(f) => Some(super::open_for_metadata(f, false, false)?),
        None => None,
    };
    let src_image = source.as_ref().map_or(image, |s| s.image());
    let mut result = Ok(());
    for op in &c.ops {
        if let Err(e) = apply(image, op, &name, granularity, src_image) {
            result = Err(failed(op, &name, e));
            break;
        }
    }
    // What was done is stored even when a later change failed, as qemu-img does.
    let closed = image.close();
    result.and(closed)
}
