//! Mount options (`-o a,b=c`), defined once: the table below drives parsing, the `--help`
//! text and the man-page check.

use crate::block::{BackingPolicy, OpenOptions};
use crate::error::{Error, Result};
use crate::storage::remote::{self, RemoteOptions};
use std::path::PathBuf;

/// One `-o` option qcow2fs understands.
pub struct OptSpec {
    pub name: &'static str,
    /// Placeholder for the value (`None`: a flag).
    pub value: Option<&'static str>,
    pub help: &'static str,
}

pub const MOUNT_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "ro",
        value: None,
        help: "Mount read-only (the default).",
    },
    OptSpec {
        name: "rw",
        value: None,
        help: "Make the active disk writable; snapshots and layers stay read-only.",
    },
    OptSpec {
        name: "allow_other",
        value: None,
        help: "Let all users access the mount.",
    },
    OptSpec {
        name: "allow_root",
        value: None,
        help: "Let the mounting user and root access the mount.",
    },
    OptSpec {
        name: "default_permissions",
        value: None,
        help: "Always on: the kernel checks file modes against the caller (accepted for compatibility).",
    },
    OptSpec {
        name: "uid",
        value: Some("N"),
        help: "Owner of the files (default: the mounting user).",
    },
    OptSpec {
        name: "gid",
        value: Some("N"),
        help: "Group of the files (default: the mounting user's group).",
    },
    OptSpec {
        name: "umask",
        value: Some("OCTAL"),
        help: "Permission bits to clear from the file modes (default 022).",
    },
    OptSpec {
        name: "fsname",
        value: Some("NAME"),
        help: "Source name shown in /proc/mounts (default: the image path).",
    },
    OptSpec {
        name: "cache_size",
        value: Some("SIZE"),
        help: "L2 table cache per image, e.g. 32M (default 32M).",
    },
    OptSpec {
        name: "threads",
        value: Some("N"),
        help: "Request threads (default: number of CPUs).",
    },
    OptSpec {
        name: "readahead",
        value: Some("KB"),
        help: "Kernel readahead window for the mount's files, in KiB (default: the kernel's).",
    },
    OptSpec {
        name: "snapshots",
        value: Some("on|off"),
        help: "Show the snapshots/ directory (default on).",
    },
    OptSpec {
        name: "layers",
        value: Some("on|off"),
        help: "Show the layers/ directory (default on).",
    },
    OptSpec {
        name: "log",
        value: Some("FILE"),
        help: "Append the daemon's messages to FILE instead of syslog.",
    },
    OptSpec {
        name: "force_share",
        value: None,
        help: "Take no image locks (like qemu-img -U), to read an image another process writes.",
    },
    OptSpec {
        name: "copy-on-read",
        value: None,
        help: "With rw: copy data that reads get from backing files into the image.",
    },
    OptSpec {
        name: "cor_bottom",
        value: Some("LAYER"),
        help: "Copy on read only from layers down to LAYER (a depth N or a file name).",
    },
    OptSpec {
        name: "overlay",
        value: Some("[DIR]"),
        help: "Make every file writable through a throwaway qcow2 overlay in DIR ($TMPDIR).",
    },
    OptSpec {
        name: "keep_overlay",
        value: None,
        help: "Keep the overlay files at unmount instead of deleting them.",
    },
    OptSpec {
        name: "backing",
        value: Some("POLICY"),
        help: "follow (default); deny: show the top image alone, unallocated ranges as zeros; follow-remote: a local image may name an http(s)/s3 URL; follow-local: a remote image may name a local file by absolute path; follow-any: both.",
    },
    OptSpec {
        name: "backing_dir",
        value: Some("DIR"),
        help: "Open backing and data files only if they lie under DIR.",
    },
    OptSpec {
        name: "cache_dir",
        value: Some("DIR"),
        help: "Remote images: the disk cache of fetched blocks (default $XDG_CACHE_HOME/qcow2fs; /var/cache/qcow2fs for root).",
    },
    OptSpec {
        name: "cache_max",
        value: Some("SIZE"),
        help: "Remote images: bound of the disk cache, e.g. 4G; 0 disables it (default 1G).",
    },
    OptSpec {
        name: "s3_endpoint",
        value: Some("URL"),
        help: "Endpoint of an S3-compatible store for s3:// images (default AWS_ENDPOINT_URL, else AWS).",
    },
    OptSpec {
        name: "ca_file",
        value: Some("FILE"),
        help: "Remote images: trust the CA certificates in this PEM file instead of the built-in roots.",
    },
    OptSpec {
        name: "remote_block",
        value: Some("SIZE"),
        help: "Remote images: size of the blocks fetched and cached, 4K to 16M (default 256K).",
    },
    OptSpec {
        name: "remote_timeout",
        value: Some("SECS"),
        help: "Remote images: longest wait to connect and for each read (default 30).",
    },
    OptSpec {
        name: "remote_retries",
        value: Some("N"),
        help: "Remote images: attempts after the first for timeouts, 5xx and dropped connections (default 4).",
    },
];

/// Options mount(8) and fstab pass that qcow2fs accepts: kernel flags it forwards and
/// userspace-only ones it ignores.
pub const GENERIC_OPTIONS: &[&str] = &[
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "sync",
    "async",
    "dirsync",
    "_netdev",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "nofail",
];

/// The flag that undoes a kernel mount flag, for the flags qcow2fs forwards.
fn opposite_flag(name: &str) -> Option<&'static str> {
    Some(match name {
        "dev" => "nodev",
        "nodev" => "dev",
        "suid" => "nosuid",
        "nosuid" => "suid",
        "exec" => "noexec",
        "noexec" => "exec",
        "atime" => "noatime",
        "noatime" => "atime",
        "sync" => "async",
        "async" => "sync",
        "dirsync" => "dirsync",
        _ => return None,
    })
}

fn is_generic(name: &str) -> bool {
    GENERIC_OPTIONS.contains(&name)
        || ["x-", "comment=", "helper=", "uhelper="]
            .iter()
            .any(|p| name.starts_with(p))
}

/// Parsed `-o` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub rw: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
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
    /// Kernel mount flags to forward (nodev, nosuid, noexec, noatime, ...).
    pub kernel_flags: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            rw: false,
            allow_other: false,
            allow_root: false,
            default_permissions: false,
            uid: None,
            gid: None,
            umask: 0o022,
            fsname: None,
            cache_size: None,
            threads: None,
            readahead_kb: None,
            snapshots: true,
            layers: true,
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
            kernel_flags: Vec::new(),
        }
    }
}

/// Parses a size such as `4096`, `64k`, `32M`, `1G`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        (i, 'b' | 'B') => (&s[..i], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn on_off(name: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(Error::invalid(format!(
            "option {name}={v}: expected on or off"
        ))),
    }
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| Error::invalid(format!("option {name}={v}: not a valid number")))
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
        let need = |v: Option<&str>| -> Result<String> {
            v.map(str::to_string)
                .ok_or_else(|| Error::invalid(format!("option {name} needs a value ({name}=...)")))
        };
        match name {
            "ro" => self.rw = false,
            "rw" => self.rw = true,
            "allow_other" => self.allow_other = true,
            "allow_root" => self.allow_root = true,
            "default_permissions" => self.default_permissions = true,
            "uid" => self.uid = Some(number(name, &need(value)?)?),
            "gid" => self.gid = Some(number(name, &need(value)?)?),
            "umask" => {
                let v = need(value)?;
                self.umask = u32::from_str_radix(&v, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        Error::invalid(format!("option umask={v}: expected an octal mask like 022"))
                    })?;
            }
            "fsname" => self.fsname = Some(need(value)?),
            "cache_size" => {
                let v = need(value)?;
                self.cache_size = Some(parse_size(&v).ok_or_else(|| {
                    Error::invalid(format!("option cache_size={v}: not a size like 32M"))
                })?);
            }
            "readahead" => {
                let kb: u32 = number(name, &need(value)?)?;
                if !(4..=65536).contains(&kb) {
                    return Err(Error::invalid(format!(
                        "option readahead={kb}: expected 4 to 65536 (KiB)"
                    )));
                }
                self.readahead_kb = Some(kb);
            }
            "threads" => {
                let n: usize = number(name, &need(value)?)?;
                if n == 0 || n > 256 {
                    return Err(Error::invalid(format!(
                        "option threads={n}: expected 1 to 256"
                    )));
                }
                self.threads = Some(n);
            }
            "snapshots" => self.snapshots = on_off(name, &need(value)?)?,
            "layers" => self.layers = on_off(name, &need(value)?)?,
            "log" => self.log = Some(PathBuf::from(need(value)?)),
            "force_share" => self.force_share = true,
            "copy-on-read" | "copy_on_read" => self.copy_on_read = true,
            "cor_bottom" => self.cor_bottom = Some(need(value)?),
            "overlay" => {
                self.overlay = Some(match value {
                    Some(d) if !d.is_empty() => PathBuf::from(d),
                    _ => std::env::temp_dir(),
                })
            }
            "keep_overlay" => self.keep_overlay = true,
            "backing" => {
                let v = need(value)?;
                (self.deny_backing, self.follow_remote, self.follow_local) = match v.as_str() {
                    "deny" => (true, false, false),
                    "follow" => (false, false, false),
                    "follow-remote" => (false, true, false),
                    "follow-local" => (false, false, true),
                    "follow-any" => (false, true, true),
                    _ => {
                        return Err(Error::invalid(format!(
                            "option backing={v}: expected follow, deny, follow-remote, follow-local or follow-any"
                        )));
                    }
                }
            }
            "cache_dir" => self.remote.cache_dir = Some(PathBuf::from(need(value)?)),
            "cache_max" => {
                let v = need(value)?;
                self.remote.cache_max = parse_size(&v).ok_or_else(|| {
                    Error::invalid(format!("option cache_max={v}: not a size like 1G"))
                })?;
            }
            "s3_endpoint" => {
                let v = need(value)?;
                if !v.starts_with("http://") && !v.starts_with("https://") {
                    return Err(Error::invalid(format!(
                        "option s3_endpoint={v}: expected an http:// or https:// URL"
                    )));
                }
                self.remote.s3_endpoint = Some(v);
            }
            "ca_file" => self.remote.http.ca_file = Some(PathBuf::from(need(value)?)),
            "remote_block" => {
                let v = need(value)?;
                let size = parse_size(&v).ok_or_else(|| {
                    Error::invalid(format!("option remote_block={v}: not a size like 256K"))
                })?;
                self.remote.block = remote::check_block(size)
                    .map_err(|e| Error::invalid(format!("option remote_block={v}: {e}")))?;
            }
            "remote_timeout" => {
                let secs: u64 = number(name, &need(value)?)?;
                if !(1..=3600).contains(&secs) {
                    return Err(Error::invalid(format!(
                        "option remote_timeout={secs}: expected 1 to 3600 (seconds)"
                    )));
                }
                self.remote.http.timeout = std::time::Duration::from_secs(secs);
            }
            "remote_retries" => {
                let n: u32 = number(name, &need(value)?)?;
                if n > 20 {
                    return Err(Error::invalid(format!(
                        "option remote_retries={n}: expected 0 to 20"
                    )));
                }
                self.remote.http.retries = n;
            }
            "backing_dir" => self.backing_dir = Some(PathBuf::from(need(value)?)),
            _ if is_generic(opt) => {
                if let Some(opposite) = opposite_flag(name) {
                    // mount(8) semantics: of two opposite flags, the later one wins.
                    self.kernel_flags.retain(|f| f != opposite && f != name);
                    self.kernel_flags.push(name.to_string());
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "unknown mount option '{opt}' (see qcow2fs mount --help)"
                )));
            }
        }
        Ok(())
    }
}

impl MountOptions {
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
            ..Default::default()
        };
        o.image.writable = self.rw;
        if let Some(c) = self.cache_size {
            o.image.cache_bytes = c;
        }
        o
    }
}

/// The option list for `--help`.
pub fn help_text() -> String {
    let mut s = String::from("Mount options (-o, comma-separated):\n");
    for o in MOUNT_OPTIONS {
        let left = match o.value {
            Some(v) if v.starts_with('[') => format!("{}[={}", o.name, &v[1..]),
            Some(v) => format!("{}={}", o.name, v),
            None => o.name.to_string(),
        };
        s.push_str(&format!("  {left:<22} {}\n", o.help));
    }
    s.push_str(
        "  Also accepted: the generic mount(8) options (dev, nodev, suid, nosuid, exec, noexec,\n",
    );
    s.push_str(
        "  atime, noatime, sync, async, dirsync, _netdev, auto, noauto, user, users, defaults,\n",
    );
    s.push_str("  nofail, x-*).\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        assert!(MountOptions::parse(["bogus"]).is_err());
        assert!(MountOptions::parse(["uid=abc"]).is_err());
        assert!(MountOptions::parse(["snapshots=maybe"]).is_err());
        assert!(MountOptions::parse(["threads=0"]).is_err());
        assert!(MountOptions::parse(["allow_other,allow_root"]).is_err());
        assert!(MountOptions::parse(["uid"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
