//! Extended attributes: what the mount tells about each file, as `user.qcow2.*`
//! attributes (the namespace `getfattr -d` shows), read-only. Every file names its image
//! (`image`); the active disk and the layers their format and backing file; snapshot
//! files (the disk, and the VM-state files) the snapshot's ID, name, date, VM clock,
//! instruction count, VM-state size and disk size; VM-state files also the machine type
//! and RAM size the stream records, a RAM block file its block's name.
//!
//! What belongs to a snapshot is fixed when its file is made (a snapshot never changes);
//! the rest is read from the file's disk when asked, so it follows a disk that is
//! replaced while mounted. The answers are plain values ([`Answer`]); the FUSE callbacks
//! only send them. The kernel checks read permission for `user.*` attributes before
//! asking (`default_permissions`); [`readable`] refuses again anyone the file's mode
//! surely excludes.

use super::namespace::{FileRole, Node, NodeKind};
use crate::engine::Snapshot;
use crate::format::vmstate::Summary;

/// The prefix of every attribute name.
pub const PREFIX: &str = "user.qcow2.";

/// Attributes fixed when a file is made: names without [`PREFIX`], and values.
pub type Fixed = Vec<(&'static str, Vec<u8>)>;

/// What a getxattr or listxattr request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The size the value (or list) would take (the caller asked with size 0).
    Size(u32),
    Data(Vec<u8>),
    Error(i32),
}

/// A UTC time as ISO 8601 with nanoseconds: `2025-12-01T03:57:12.000000000Z`.
pub fn utc(sec: u32, nsec: u32) -> String {
    let days = (sec / 86_400) as i64;
    let rem = sec % 86_400;
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        nsec.min(999_999_999)
    )
}

fn text(v: impl ToString) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// The attributes of a snapshot's files.
pub fn snapshot_attrs(s: &Snapshot) -> Fixed {
    let e = &s.entry;
    let mut out: Fixed = vec![
        ("snapshot.id", text(&e.id)),
        ("snapshot.name", e.name_bytes.clone()),
        ("snapshot.date", text(utc(e.date_sec, e.date_nsec))),
        (
            "snapshot.vm-clock",
            text(format!(
                "{}.{:09}",
                e.vm_clock_nsec / 1_000_000_000,
                e.vm_clock_nsec % 1_000_000_000
            )),
        ),
    ];
    if let Some(ic) = e.icount.filter(|&i| i != u64::MAX) {
        out.push(("snapshot.icount", text(ic)));
    }
    out.push(("snapshot.vm-state-size", text(e.vm_state_size)));
    out.push(("snapshot.disk-size", text(s.disk_size)));
    out
}

/// What the start of a VM-state stream says, for its files.
pub fn vm_attrs(sum: &Summary) -> Fixed {
    let mut out = Fixed::new();
    if let Some(m) = sum.machine() {
        out.push(("vmstate.machine", text(m)));
    }
    if let Some(ram) = sum.main_ram_bytes() {
        out.push(("vmstate.ram-size", text(ram)));
    }
    out
}

/// Every attribute of `node` (a file), as (full name, value).
pub fn attributes(node: &Node, fixed: &Fixed) -> Vec<(String, Vec<u8>)> {
    let NodeKind::File { dev, role } = &node.kind else {
        return Vec::new();
    };
    let mut out = vec![(
        format!("{PREFIX}image"),
        dev.info().path.as_os_str().as_encoded_bytes().to_vec(),
    )];
    if matches!(role, FileRole::Active | FileRole::Layer(_)) {
        out.push((format!("{PREFIX}format"), text(dev.info().format)));
        if let Some(b) = dev.backing() {
            let path = b.info().path.as_os_str().as_encoded_bytes().to_vec();
            out.push((format!("{PREFIX}backing"), path));
            out.push((format!("{PREFIX}backing-format"), text(b.info().format)));
        }
    }
    out.extend(
        fixed
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.clone())),
    );
    out
}

/// The answer for a buffer of `size` bytes (0: the size is asked) holding `data`.
fn sized(data: Vec<u8>, size: u32) -> Answer {
    if size == 0 {
        Answer::Size(data.len() as u32)
    } else if data.len() > size as usize {
        Answer::Error(libc::ERANGE)
    } else {
        Answer::Data(data)
    }
}

/// getxattr: the value of `name` among `attrs`.
pub fn get(attrs: &[(String, Vec<u8>)], name: &[u8], size: u32) -> Answer {
    match attrs.iter().find(|(k, _)| k.as_bytes() == name) {
        Some((_, v)) => sized(v.clone(), size),
        None => Answer::Error(libc::ENODATA),
    }
}

/// listxattr: the names of `attrs`, each followed by a NUL.
pub fn list(attrs: &[(String, Vec<u8>)], size: u32) -> Answer {
    let mut names = Vec::new();
    for (k, _) in attrs {
        names.extend_from_slice(k.as_bytes());
        names.push(0);
    }
    sized(names, size)
}

/// setxattr and removexattr: the attributes of the mount cannot be changed (EPERM), and
/// no others can be made (ENOTSUP).
pub fn change(name: &[u8]) -> i32 {
    if name.starts_with(PREFIX.as_bytes()) {
        libc::EPERM
    } else {
        libc::ENOTSUP
    }
}

/// Whether a caller `uid`:`gid` may read a file of mode `perm` owned by
/// `owner`:`group`, as far as can be told without its supplementary groups: the owner by
/// the owner's bits, others by the group's or others' bits (the kernel, which knows the
/// groups, has checked exactly before asking).
pub fn readable(uid: u32, gid: u32, owner: u32, group: u32, perm: u32) -> bool {
    let r = |shift: u32| (perm >> shift) & 4 != 0;
    if uid == 0 {
        true
    } else if uid == owner {
        r(6)
    } else if gid == group {
        r(3)
    } else {
        r(3) || r(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(utc(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(utc(1_764_561_432, 123), "2025-12-01T03:57:12.000000123Z");
        assert_eq!(
            utc(u32::MAX, 2_000_000_000),
            "2106-02-07T06:28:15.999999999Z"
        );
    }

    #[test]
    fn sizes_follow_the_xattr_protocol() {
        let attrs = vec![
            ("user.qcow2.a".to_string(), b"xyz".to_vec()),
            ("user.qcow2.bb".to_string(), Vec::new()),
        ];
        assert_eq!(get(&attrs, b"user.qcow2.a", 0), Answer::Size(3));
        assert_eq!(
            get(&attrs, b"user.qcow2.a", 3),
            Answer::Data(b"xyz".to_vec())
        );
        assert_eq!(get(&attrs, b"user.qcow2.a", 2), Answer::Error(libc::ERANGE));
        assert_eq!(
            get(&attrs, b"user.qcow2.c", 9),
            Answer::Error(libc::ENODATA)
        );
        assert_eq!(get(&attrs, b"user.qcow2.bb", 0), Answer::Size(0));
        let names = b"user.qcow2.a\0user.qcow2.bb\0".to_vec();
        assert_eq!(list(&attrs, 0), Answer::Size(names.len() as u32));
        assert_eq!(list(&attrs, 100), Answer::Data(names));
        assert_eq!(list(&attrs, 5), Answer::Error(libc::ERANGE));
        assert_eq!(list(&[], 0), Answer::Size(0));
    }

    #[test]
    fn nothing_can_be_changed() {
        assert_eq!(change(b"user.qcow2.snapshot.name"), libc::EPERM);
        assert_eq!(change(b"user.comment"), libc::ENOTSUP);
        assert_eq!(change(b"security.selinux"), libc::ENOTSUP);
    }

    #[test]
    fn readers_by_mode() {
        // Root reads anything.
        assert!(readable(0, 0, 5, 5, 0));
        // The owner gets the owner's bits only.
        assert!(readable(5, 5, 5, 5, 0o400));
        assert!(!readable(5, 5, 5, 5, 0o044));
        // The group's member by its primary group.
        assert!(readable(6, 5, 5, 5, 0o440));
        assert!(!readable(6, 5, 5, 5, 0o404));
        // Anyone else may be in the group through a supplementary group.
        assert!(readable(7, 7, 5, 5, 0o440));
        assert!(readable(7, 7, 5, 5, 0o404));
        assert!(!readable(7, 7, 5, 5, 0o400));
    }
}
