//! What a file of the mount may grant: never more than the files its bytes come from.
//! The kernel checks the modes shown (the mount always uses `default_permissions`), so a
//! file's mode is the mount's mode for it (`umask`, read-only or writable) limited, for
//! each class of users, to what every user of that class could do on each source file:
//! the image, its data file and every backing file below it.

use crate::storage::Access;

/// Permission bits (rwx) of one class of `f`'s mode.
fn class(f: &Access, shift: u32) -> u32 {
    (f.mode >> shift) & 7
}

/// What user `uid` may do on `f`. A user other than the owner may or may not be in the
/// file's group (qcow2fs does not look groups up), so gets what both group and others
/// may do.
fn for_user(f: &Access, uid: u32) -> u32 {
    if uid == 0 {
        7
    } else if uid == f.uid {
        class(f, 6)
    } else {
        class(f, 3) & class(f, 0)
    }
}

/// What every member of group `gid` may do on `f`: a member may be the file's owner, in
/// the file's group, or neither.
fn for_group(f: &Access, gid: u32) -> u32 {
    let owner_or_group = class(f, 6) & class(f, 3);
    if gid == f.gid {
        owner_or_group
    } else {
        owner_or_group & class(f, 0)
    }
}

/// What every other user may do on `f` (they may be its owner or in its group, too).
fn for_others(f: &Access) -> u32 {
    class(f, 6) & class(f, 3) & class(f, 0)
}

/// The ceiling (rwx for owner, group and others) that files in `sources` put on a file
/// shown as owned by `uid`:`gid`.
pub fn ceiling(uid: u32, gid: u32, sources: &[Access]) -> u32 {
    sources.iter().fold(0o777, |acc, f| {
        acc & ((for_user(f, uid) << 6) | (for_group(f, gid) << 3) | for_others(f))
    })
}

/// The mode of a directory whose content comes from `sources`: listable (r-x) by each
/// class that may read them.
pub fn dir_ceiling(uid: u32, gid: u32, sources: &[Access]) -> u32 {
    let c = ceiling(uid, gid, sources);
    let mut out = 0;
    for shift in [6, 3, 0] {
        if (c >> shift) & 4 != 0 {
            out |= 5 << shift;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(uid: u32, gid: u32, mode: u32) -> Access {
        Access { uid, gid, mode }
    }

    #[test]
    fn the_image_limits_each_class() {
        // root:root 0644, shown as root:root: unchanged.
        assert_eq!(ceiling(0, 0, &[file(0, 0, 0o644)]), 0o744);
        // A 0600 image grants nothing to group or others.
        assert_eq!(ceiling(0, 0, &[file(0, 0, 0o600)]), 0o700);
        // Shown as owned by another user (uid=1000): that user gets only what others and
        // the group may do on the image.
        assert_eq!(ceiling(1000, 1000, &[file(0, 0, 0o644)]), 0o444);
        assert_eq!(ceiling(1000, 1000, &[file(0, 0, 0o600)]), 0);
        // The image's owner.
        assert_eq!(ceiling(1000, 1000, &[file(1000, 1000, 0o640)]), 0o640);
        // /etc/shadow (root:shadow 0640) as a backing file: nobody but root reads.
        assert_eq!(
            ceiling(0, 0, &[file(0, 0, 0o644), file(0, 42, 0o640)]),
            0o700
        );
        // Others that might be the owner of an odd mode get no more than the owner.
        assert_eq!(ceiling(0, 0, &[file(5, 5, 0o007)]), 0o700);
    }

    #[test]
    fn directories_are_listable_where_the_image_is_readable() {
        assert_eq!(dir_ceiling(0, 0, &[file(0, 0, 0o644)]), 0o555);
        assert_eq!(dir_ceiling(0, 0, &[file(0, 0, 0o600)]), 0o500);
        assert_eq!(dir_ceiling(0, 0, &[]), 0o555);
    }
}
