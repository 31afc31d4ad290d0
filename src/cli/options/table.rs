//! The mount options, each defined once: its name and aliases, value syntax, default,
//! one-line help, man-page text and effect on [`MountOptions`]. The parser, `--help` and
//! the man pages' option sections (`docs`) all read these two tables.

use super::{MountOptions, number, on_off, parse_size};
use crate::block::KeySource;
use fuser::MountOption;
use std::path::PathBuf;

/// What an option's effect returns when the value is wrong: the reason, which the parser
/// puts after `option NAME=VALUE: `.
pub type Apply = fn(&mut MountOptions, &str) -> Result<(), String>;

/// How an option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A flag: the name alone (a value is an error).
    Flag,
    /// `name=ARG`, where ARG is a placeholder such as `N` or `FILE`.
    Required(&'static str),
    /// `name=a|b|...`, one of these words.
    Choice(&'static [&'static str]),
    /// `name` or `name=ARG`.
    Optional(&'static str),
}

/// What holds when an option is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptDefault {
    /// Nothing to state (a flag is off unless given; the text says the rest).
    Unstated,
    /// A value the option accepts: giving `name=VALUE` changes nothing.
    Value(&'static str),
    /// What happens, in words.
    Text(&'static str),
}

/// One `-o` option of qcow2fs.
pub struct OptSpec {
    pub name: &'static str,
    /// Other names for the same option.
    pub aliases: &'static [&'static str],
    pub value: Value,
    pub default: OptDefault,
    /// One line of plain text for `--help` and mount.qcow2fs(8), ending with a period.
    pub help: &'static str,
    /// The description in qcow2fs(1), in roff; each line's leading blanks are dropped.
    pub man: &'static str,
    /// Applies the value (`""` for a flag or an optional value left out).
    pub apply: Apply,
}

/// The options of qcow2fs, in the order the documentation lists them.
pub static MOUNT_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "ro",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Mount read-only (the default of qcow2fs mount; mount(8) passes rw unless told ro).",
        man: r"
            Mount read-only (the default of
            .BR qcow2fs\ mount ;
            .BR mount (8)
            and fstab lines pass
            .B rw
            unless told
            .BR ro ).
        ",
        apply: |o, _| {
            o.rw = false;
            Ok(())
        },
    },
    OptSpec {
        name: "rw",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Make the active disk writable; snapshots and layers stay read-only.",
        man: r"
            Make the active disk
            .IR NAME .raw
            writable: writes, truncation to a larger size (shrinking is refused; the size must be a
            multiple of 512 bytes, as a qcow2 disk's size is, or the truncation fails with EINVAL as
            it does in QEMU) and
            .BR fallocate (2)
            hole punching and zeroing go into the image, the way QEMU would write them; snapshot and
            layer files stay read-only. Metadata is cached and written back on
            .BR fsync (2),
            on close, when the cache is full and at unmount, in an order that keeps the image
            consistent after a crash.
        ",
        apply: |o, _| {
            o.rw = true;
            Ok(())
        },
    },
    OptSpec {
        name: "allow_other",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Let all users access the mount (by default only the mounting user can).",
        man: r"
            Let all users access the mount (non-root users need user_allow_other in
            .IR /etc/fuse.conf ).
            By default only the mounting user can access it.
        ",
        apply: |o, _| {
            o.allow_other = true;
            Ok(())
        },
    },
    OptSpec {
        name: "allow_root",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Let the mounting user and root access the mount.",
        man: r"
            Let the mounting user and root access the mount. It excludes
            .BR allow_other .
        ",
        apply: |o, _| {
            o.allow_root = true;
            Ok(())
        },
    },
    OptSpec {
        name: "default_permissions",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Always on: the kernel checks file modes against the caller (accepted for compatibility).",
        man: r"
            Always on (accepted for compatibility): the kernel checks every access against the
            modes and owners the files show. A file never grants more than the files its bytes come
            from: each class of users (owner, group, others) gets at most what every user of that
            class may do on the image, its data file and each backing file below it. A layer file
            is limited by its own backing chain. So with
            .B allow_other
            an image readable only by root stays readable only by root, and a backing file an image
            names (such as a raw
            .IR /etc/shadow )
            is not readable through the mount by users who cannot read it themselves. (Group
            membership is not looked up: users other than the owner get what both the group and
            others may do. ACLs on the files are not consulted.)
        ",
        apply: |_, _| Ok(()),
    },
    OptSpec {
        name: "uid",
        aliases: &[],
        value: Value::Required("N"),
        default: OptDefault::Text("the mounting user"),
        help: "Owner of the files, a numeric user ID.",
        man: "Owner of the files, a numeric user ID.",
        apply: |o, v| {
            o.uid = Some(number(v)?);
            Ok(())
        },
    },
    OptSpec {
        name: "gid",
        aliases: &[],
        value: Value::Required("N"),
        default: OptDefault::Text("the mounting user's group"),
        help: "Group of the files, a numeric group ID.",
        man: "Group of the files, a numeric group ID.",
        apply: |o, v| {
            o.gid = Some(number(v)?);
            Ok(())
        },
    },
    OptSpec {
        name: "umask",
        aliases: &[],
        value: Value::Required("OCTAL"),
        default: OptDefault::Value("022"),
        help: "Permission bits to clear from the file modes, an octal number up to 777.",
        man: "Permission bits to clear from the file modes, an octal number up to 777.",
        apply: |o, v| {
            o.umask = u32::from_str_radix(v, 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or("expected an octal mask like 022")?;
            Ok(())
        },
    },
    OptSpec {
        name: "fsname",
        aliases: &[],
        value: Value::Required("NAME"),
        default: OptDefault::Text("the image path"),
        help: "Source name shown in /proc/mounts.",
        man: r"
            Source name shown in
            .IR /proc/mounts .
        ",
        apply: |o, v| {
            o.fsname = Some(v.to_string());
            Ok(())
        },
    },
    OptSpec {
        name: "cache_size",
        aliases: &[],
        value: Value::Required("SIZE"),
        default: OptDefault::Value("32M"),
        help: "L2 table cache per image: bytes, or KiB, MiB, GiB, TiB with k, M, G, T.",
        man: r"
            L2 table cache per image: a number of bytes, or of KiB, MiB, GiB or TiB with the
            suffix k, M, G or T (in either case; a suffix B stands for bytes).
        ",
        apply: |o, v| {
            o.cache_size = Some(parse_size(v).ok_or("not a size like 32M")?);
            Ok(())
        },
    },
    OptSpec {
        name: "threads",
        aliases: &[],
        value: Value::Required("N"),
        default: OptDefault::Text("the number of CPUs"),
        help: "Request threads, 1 to 256.",
        man: "Request threads, 1 to 256.",
        apply: |o, v| {
            let n: usize = number(v)?;
            if n == 0 || n > 256 {
                return Err("expected 1 to 256".into());
            }
            o.threads = Some(n);
            Ok(())
        },
    },
    OptSpec {
        name: "readahead",
        aliases: &[],
        value: Value::Required("KB"),
        default: OptDefault::Text("the kernel's, usually 128"),
        help: "Kernel readahead window for the mount's files, 4 to 65536 KiB.",
        man: r"
            Kernel readahead window for sequential reads of the mount's files, in KiB (4 to 65536).
            Larger windows let the kernel send fewer, larger requests for buffered sequential
            reads. Set through the mount's entry in
            .IR /sys/class/bdi .
        ",
        apply: |o, v| {
            let kb: u32 = number(v)?;
            if !(4..=65536).contains(&kb) {
                return Err("expected 4 to 65536 (KiB)".into());
            }
            o.readahead_kb = Some(kb);
            Ok(())
        },
    },
    OptSpec {
        name: "snapshots",
        aliases: &[],
        value: Value::Choice(&["on", "off"]),
        default: OptDefault::Value("on"),
        help: "Show the snapshots/ directory.",
        man: "Show the snapshots/ directory.",
        apply: |o, v| {
            o.snapshots = on_off(v)?;
            Ok(())
        },
    },
    OptSpec {
        name: "layers",
        aliases: &[],
        value: Value::Choice(&["on", "off"]),
        default: OptDefault::Value("on"),
        help: "Show the layers/ directory.",
        man: "Show the layers/ directory.",
        apply: |o, v| {
            o.layers = on_off(v)?;
            Ok(())
        },
    },
    OptSpec {
        name: "xattrs",
        aliases: &[],
        value: Value::Choice(&["on", "off"]),
        default: OptDefault::Value("on"),
        help: "Show the files' metadata as read-only user.qcow2.* extended attributes.",
        man: r"
            Show what is known about each file as read-only extended attributes in the
            .B user.qcow2.
            namespace (see EXTENDED ATTRIBUTES below), which
            .B getfattr \-d
            lists. They are readable by whoever may read the file. With
            .BR off ,
            files have no attributes.
        ",
        apply: |o, v| {
            o.xattrs = on_off(v)?;
            Ok(())
        },
    },
    OptSpec {
        name: "bitmaps",
        aliases: &[],
        value: Value::Choice(&["on", "off"]),
        default: OptDefault::Value("on"),
        help: "Show the bitmaps/ directory: each persistent bitmap's dirty regions of the active disk.",
        man: r"
            Show the bitmaps/ directory of an image with persistent dirty bitmaps: one file
            .IR NAME .raw
            per bitmap, the active disk where the bitmap has it dirty and holes elsewhere
            (SEEK_DATA/SEEK_HOLE and st_blocks show the dirty regions; holes read as zeros).
            Inconsistent bitmaps (in use since an unclean close) are left out.
        ",
        apply: |o, v| {
            o.bitmaps = on_off(v)?;
            Ok(())
        },
    },
    OptSpec {
        name: "force_share",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Take no image locks (like qemu-img -U), to read an image another process writes.",
        man: r#"
            Take no image locks, like
            .BR "qemu-img \-U" ,
            to read an image that another process (a running VM) is writing. What is read may be
            inconsistent. Without it, qcow2fs takes the same locks QEMU takes: a read-only mount
            keeps QEMU from writing to the image and its backing files, a read-write mount keeps it
            from using the image at all, and an image QEMU is writing is refused. It excludes
            .BR rw :
            writing needs the image lock.
        "#,
        apply: |o, _| {
            o.force_share = true;
            Ok(())
        },
    },
    OptSpec {
        name: "copy-on-read",
        aliases: &["copy_on_read"],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "With rw: copy data that reads get from backing files into the image.",
        man: r"
            With
            .BR rw :
            data that a read of the active disk gets from a backing file is also written into the
            image, so later reads stop reaching the backing files. A copy never overwrites what a
            write put there meanwhile.
        ",
        apply: |o, _| {
            o.copy_on_read = true;
            Ok(())
        },
    },
    OptSpec {
        name: "cor_bottom",
        aliases: &[],
        value: Value::Required("LAYER"),
        default: OptDefault::Text("the whole chain"),
        help: "Copy on read only from the layers down to LAYER, a depth N or a file name.",
        man: r"
            With
            .BR copy\-on\-read :
            copy only data found in the layers down to
            .I LAYER
            (its depth N as in layers/, or its file name); deeper data is read but not copied.
        ",
        apply: |o, v| {
            o.cor_bottom = Some(v.to_string());
            Ok(())
        },
    },
    OptSpec {
        name: "overlay",
        aliases: &[],
        value: Value::Optional("DIR"),
        default: OptDefault::Unstated,
        help: "Make every file writable through a throwaway qcow2 overlay in DIR (default $TMPDIR).",
        man: r"
            Forensic mode: every file of the mount (active disk, snapshots, layers) becomes writable
            through its own temporary qcow2 overlay in
            .I DIR
            (default
            .BR $TMPDIR ).
            The image and its backing files are opened read-only and never change. The overlays
            hold copies of the evidence, so they live in
            .IR DIR /qcow2fs\-overlays\- UID ,
            a directory only the mounting user may enter, and have mode 0600. They have no name
            (O_TMPFILE): they vanish at unmount, and also when the daemon is killed. Their sizes are
            logged. Over an encrypted image the overlays are encrypted too (LUKS,
            aes-256-xts-plain64) with a random key that exists only in the daemon's memory, so
            nothing users write, decrypted evidence included, reaches the disk in plaintext. It
            excludes
            .B rw
            and
            .BR copy\-on\-read .
        ",
        apply: |o, v| {
            o.overlay = Some(if v.is_empty() {
                std::env::temp_dir()
            } else {
                PathBuf::from(v)
            });
            Ok(())
        },
    },
    OptSpec {
        name: "keep_overlay",
        aliases: &[],
        value: Value::Flag,
        default: OptDefault::Unstated,
        help: "Keep the overlay files at unmount instead of deleting them (refused over encrypted images).",
        man: r"
            Keep the overlay files at unmount, as
            .IR DIR /qcow2fs\-overlays\- UID /qcow2fs\-overlay\- PID \- N \- FILE .qcow2.
            The overlays of the active disk and of the layers name their source as backing file, so
            they can be used with qemu-img. Refused over an encrypted image: its overlays are
            encrypted with a key only the daemon holds, so a kept one could never be opened.
        ",
        apply: |o, _| {
            o.keep_overlay = true;
            Ok(())
        },
    },
    OptSpec {
        name: "backing",
        aliases: &[],
        value: Value::Choice(&[
            "follow",
            "deny",
            "follow-remote",
            "follow-local",
            "follow-any",
        ]),
        default: OptDefault::Value("follow"),
        help: "deny: show the top image alone, unallocated ranges as zeros; follow-remote: a local image may name an http(s)/s3 URL; follow-local: a remote image may name a local file by absolute path; follow-any: both.",
        man: r"
            With
            .BR deny ,
            the backing chain is not opened: the mount shows the top image alone, and ranges it does
            not allocate read as zeros (to look at one layer's own data).
            Names in a remote image resolve against the image's URL, on the same host or in the same
            bucket, never to local files. With
            .BR follow\-remote ,
            a local image may name an http(s) or s3 URL as its backing (or data) file, as
            .B qemu\-img create \-u \-b
            .I URL
            records it (for copy-on-read into a local image); with
            .BR follow\-local ,
            a remote image may name a local file by absolute path (relative names still resolve
            against its URL);
            .B follow\-any
            allows both.
        ",
        apply: |o, v| {
            (o.deny_backing, o.follow_remote, o.follow_local) = match v {
                "deny" => (true, false, false),
                "follow" => (false, false, false),
                "follow-remote" => (false, true, false),
                "follow-local" => (false, false, true),
                "follow-any" => (false, true, true),
                _ => {
                    return Err(
                        "expected follow, deny, follow-remote, follow-local or follow-any".into(),
                    );
                }
            };
            Ok(())
        },
    },
    OptSpec {
        name: "backing_dir",
        aliases: &[],
        value: Value::Required("DIR"),
        default: OptDefault::Unstated,
        help: "Open backing and data files only if they lie under DIR.",
        man: r"
            Open backing and data files only if they lie under
            .IR DIR .
            Images name their backing files themselves; a crafted image can name any file on the
            host. By default qcow2fs follows only plain paths to regular files, and opens a backing
            file whose format the image does not record only if it is a qcow2 image, never as raw.
        ",
        apply: |o, v| {
            o.backing_dir = Some(PathBuf::from(v));
            Ok(())
        },
    },
    OptSpec {
        name: "cache_dir",
        aliases: &[],
        value: Value::Required("DIR"),
        default: OptDefault::Text(
            "$XDG_CACHE_HOME/qcow2fs or ~/.cache/qcow2fs; /var/cache/qcow2fs for root",
        ),
        help: "Remote images: the disk cache of fetched blocks.",
        man: r"
            Remote images: where blocks fetched from servers are kept for later mounts. The
            directory is made private (0700) and the files in it 0600; one that others may write to
            is refused. Entries are keyed by URL and version (ETag, or Last-Modified and size): an
            entry of an older version is never used, and is deleted. An object mounted twice at the
            same time is cached by the first mount only.
        ",
        apply: |o, v| {
            o.remote.cache_dir = Some(PathBuf::from(v));
            Ok(())
        },
    },
    OptSpec {
        name: "cache_max",
        aliases: &[],
        value: Value::Required("SIZE"),
        default: OptDefault::Value("1G"),
        help: "Remote images: bound of the disk cache; 0 disables it.",
        man: r"
            Remote images: bound of the disk cache (a size as for
            .BR cache_size= );
            least recently used entries go first. 0 disables the disk cache.
        ",
        apply: |o, v| {
            o.remote.cache_max = parse_size(v).ok_or("not a size like 1G")?;
            Ok(())
        },
    },
    OptSpec {
        name: "s3_endpoint",
        aliases: &[],
        value: Value::Required("URL"),
        default: OptDefault::Text(
            "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's endpoint_url, else AWS",
        ),
        help: "Endpoint of an S3-compatible store for s3:// images.",
        man: r"
            Endpoint of an S3-compatible store (MinIO, Ceph RGW, ...) for
            .B s3://
            images, addressed path-style.
        ",
        apply: |o, v| {
            if !v.starts_with("http://") && !v.starts_with("https://") {
                return Err("expected an http:// or https:// URL".into());
            }
            o.remote.s3_endpoint = Some(v.to_string());
            Ok(())
        },
    },
    OptSpec {
        name: "ca_file",
        aliases: &[],
        value: Value::Required("FILE"),
        default: OptDefault::Text("the built-in (Mozilla) roots"),
        help: "Remote images: trust the CA certificates in this PEM file.",
        man: r"
            Remote images: trust the CA certificates in this PEM file instead of the built-in
            roots. Certificates are always verified.
        ",
        apply: |o, v| {
            o.remote.http.ca_file = Some(PathBuf::from(v));
            Ok(())
        },
    },
    OptSpec {
        name: "remote_block",
        aliases: &[],
        value: Value::Required("SIZE"),
        default: OptDefault::Value("256K"),
        help: "Remote images: size of the blocks fetched and cached, a power of two from 4K to 16M.",
        man: r"
            Remote images: the size of the aligned blocks fetched and cached, a power of two from 4K
            to 16M. Adjacent missing blocks are fetched with one request, and sequential readers get
            a readahead that grows to 8 MiB.
        ",
        apply: |o, v| {
            let size = parse_size(v).ok_or("not a size like 256K")?;
            o.remote.block =
                crate::storage::remote::check_block(size).map_err(|e| e.to_string())?;
            Ok(())
        },
    },
    OptSpec {
        name: "remote_timeout",
        aliases: &[],
        value: Value::Required("SECS"),
        default: OptDefault::Value("30"),
        help: "Remote images: longest wait to connect and for each read, 1 to 3600 seconds.",
        man: r"
            Remote images: the longest wait to connect, and for each read or write on a connection,
            1 to 3600 seconds.
        ",
        apply: |o, v| {
            let secs: u64 = number(v)?;
            if !(1..=3600).contains(&secs) {
                return Err("expected 1 to 3600 (seconds)".into());
            }
            o.remote.http.timeout = std::time::Duration::from_secs(secs);
            Ok(())
        },
    },
    OptSpec {
        name: "remote_retries",
        aliases: &[],
        value: Value::Required("N"),
        default: OptDefault::Value("4"),
        help: "Remote images: attempts after the first for timeouts, 5xx and dropped connections, 0 to 20.",
        man: r"
            Remote images: attempts after the first for timeouts, 5xx answers, dropped connections
            and short answers, with a pause that doubles from 0.1 s up to 2 s (0 to 20). Then the
            read fails with EIO and the daemon logs the URL and the byte range.
        ",
        apply: |o, v| {
            let n: u32 = number(v)?;
            if n > 20 {
                return Err("expected 0 to 20".into());
            }
            o.remote.http.retries = n;
            Ok(())
        },
    },
    OptSpec {
        name: "key-file",
        aliases: &[],
        value: Value::Required("PATH"),
        default: OptDefault::Unstated,
        help: "Passphrase of an encrypted image, read verbatim from PATH (- asks on the terminal); tried on every encrypted layer.",
        man: r#"
            The passphrase of an encrypted image (LUKS, or QEMU's legacy AES method), in the
            file
            .IR PATH ,
            which is read verbatim, as QEMU reads the file of a
            .B secret
            object: every byte is part of the passphrase, a trailing newline too (write the file
            with
            .B printf "%s"
            or
            .BR "echo \-n" ).
            It is tried on every encrypted layer of the backing chain that has no key of its own
            .RB ( key\-file. \fIN\fR).
            With
            .I PATH
            .BR \- ,
            the passphrase is asked for on the terminal, without echo, before the mount starts
            (the line typed, without its newline). A key file must be a regular file of at most
            1 MiB. Passphrases are read once, wiped from memory as soon as the images are
            unlocked, and never logged; the daemon keeps only the images' master keys, in memory
            locked against swapping where the system allows. A wrong passphrase fails the mount
            with one error naming the image, after every active LUKS key slot was tried (the
            legacy AES method cannot tell a wrong passphrase: it shows garbage). Never put a
            passphrase itself on a command line or in the environment: other users can read
            those.
        "#,
        apply: |o, v| {
            if v.is_empty() {
                return Err("the key file name is empty".into());
            }
            o.keys.all = Some(KeySource::parse(v));
            Ok(())
        },
    },
    OptSpec {
        name: "key-file.N",
        aliases: &[],
        value: Value::Required("PATH"),
        default: OptDefault::Unstated,
        help: "Passphrase of layer N of the chain (0 is the image, 1 its backing file), as key-file.",
        man: r"
            The passphrase of the layer at depth
            .I N
            of the backing chain, read as for
            .B key\-file
            (0 is the image itself, 1 its backing file, and so on, as in
            .IR layers/ ),
            for a chain whose layers have different keys. A layer with a key of its own does not
            try the key of
            .BR key\-file .
            A key for a depth where the chain has no encrypted qcow2 image is an error.
        ",
        // The parser passes the number from the name with the value: `N=PATH`.
        apply: |o, v| o.keys.add_layer_spec(v),
    },
    OptSpec {
        name: "log",
        aliases: &[],
        value: Value::Required("FILE"),
        default: OptDefault::Unstated,
        help: "Append the daemon's messages to FILE instead of syslog.",
        man: r"
            Append the daemon's messages to
            .I FILE
            instead of syslog.
        ",
        apply: |o, v| {
            o.log = Some(PathBuf::from(v));
            Ok(())
        },
    },
];

/// What qcow2fs does with a generic option of mount(8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generic {
    /// Passed to the kernel as `flag`; of it and `opposite`, the later one given wins.
    Kernel {
        flag: MountOption,
        opposite: Option<&'static str>,
    },
    /// Accepted and ignored, for the reason given (plain text, also valid roff).
    Ignored(&'static str),
}

/// A generic option of mount(8) that qcow2fs accepts.
pub struct GenericOption {
    /// The name; `x-*` stands for every name starting with `x-`, and `comment=` for
    /// `comment=` with any value. Other names accept a value only if `Ignored`.
    pub name: &'static str,
    pub effect: Generic,
}

/// For options read by mount(8), fstab or systemd.
const NOT_FOR_FS: &str = "they are for mount(8), fstab or systemd, not for the filesystem";
/// For the access-time policies other than atime and noatime.
const NO_ATIME: &str =
    "qcow2fs records no access times: a file's access time is its modification time";

const fn kernel(name: &'static str, flag: MountOption, opposite: &'static str) -> GenericOption {
    GenericOption {
        name,
        effect: Generic::Kernel {
            flag,
            opposite: Some(opposite),
        },
    }
}

const fn ignored(name: &'static str, why: &'static str) -> GenericOption {
    GenericOption {
        name,
        effect: Generic::Ignored(why),
    }
}

/// The generic options of mount(8) and fstab that qcow2fs accepts.
pub static GENERIC_OPTIONS: &[GenericOption] = &[
    kernel("dev", MountOption::Dev, "nodev"),
    kernel("nodev", MountOption::NoDev, "dev"),
    kernel("suid", MountOption::Suid, "nosuid"),
    kernel("nosuid", MountOption::NoSuid, "suid"),
    kernel("exec", MountOption::Exec, "noexec"),
    kernel("noexec", MountOption::NoExec, "exec"),
    kernel("atime", MountOption::Atime, "noatime"),
    kernel("noatime", MountOption::NoAtime, "atime"),
    kernel("sync", MountOption::Sync, "async"),
    kernel("async", MountOption::Async, "sync"),
    GenericOption {
        name: "dirsync",
        effect: Generic::Kernel {
            flag: MountOption::DirSync,
            opposite: None,
        },
    },
    ignored("relatime", NO_ATIME),
    ignored("norelatime", NO_ATIME),
    ignored("strictatime", NO_ATIME),
    ignored("nostrictatime", NO_ATIME),
    ignored("diratime", NO_ATIME),
    ignored("nodiratime", NO_ATIME),
    ignored("lazytime", NO_ATIME),
    ignored("nolazytime", NO_ATIME),
    ignored("defaults", NOT_FOR_FS),
    ignored("auto", NOT_FOR_FS),
    ignored("noauto", NOT_FOR_FS),
    ignored("_netdev", NOT_FOR_FS),
    ignored("nofail", NOT_FOR_FS),
    ignored("user", NOT_FOR_FS),
    ignored("nouser", NOT_FOR_FS),
    ignored("users", NOT_FOR_FS),
    ignored("owner", NOT_FOR_FS),
    ignored("group", NOT_FOR_FS),
    ignored("comment=", NOT_FOR_FS),
    ignored("helper=", NOT_FOR_FS),
    ignored("uhelper=", NOT_FOR_FS),
    ignored("x-*", NOT_FOR_FS),
];
