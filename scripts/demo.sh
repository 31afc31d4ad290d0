#!/usr/bin/env bash
# The qcow2fs demo: an ext4 guest disk with two internal snapshots, mounted with qcow2fs;
# a snapshot's guest filesystem is loop-mounted read-only next to the active disk's, and
# everything is unmounted at the end, whatever happens.
set -euo pipefail

# Usage: demo.sh [QCOW2FS-BINARY [WORK-DIR]]
BIN=$(realpath "${1:-target/release/qcow2fs}")
WORK=$(realpath -m "${2:-target/demo}")
rm -rf "$WORK"
mkdir -p "$WORK"/{files,mnt,guest-now,guest-then}
cd "$WORK"

LOOPS=()
cleanup() {
    set +e
    for m in guest-now guest-then; do
        mountpoint -q "$m" && umount "$m"
    done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    mountpoint -q mnt && "$BIN" umount mnt
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Three states of one guest filesystem, written into one qcow2 image with a snapshot after
# each of the first two.
guest_state() {
    local n=$1
    rm -rf files && mkdir -p files/etc
    printf 'demo-host\n' > files/etc/hostname
    case $n in
        1) printf 'fresh install\n' > files/notes.txt ;;
        2) printf 'fresh install\nconfigured the web server\n' > files/notes.txt ;;
        3) printf 'fresh install\nconfigured the web server\nsomething went wrong here\n' > files/notes.txt
           printf 'malware\n' > files/etc/cron.evil ;;
    esac
    rm -f state.raw
    mkfs.ext4 -q -F -d files -L demo -U 0b5e55ed-0000-4000-8000-000000000001 \
        -E hash_seed=0b5e55ed-0000-4000-8000-000000000002 state.raw 32M >/dev/null
}

step "Building disk.qcow2: an ext4 guest with snapshots 'installed' and 'configured'"
guest_state 1
qemu-img convert -f raw -O qcow2 state.raw disk.qcow2
qemu-img snapshot -c installed disk.qcow2
guest_state 2
qemu-img convert -n -f raw -O qcow2 state.raw disk.qcow2
qemu-img snapshot -c configured disk.qcow2
guest_state 3
qemu-img convert -n -f raw -O qcow2 state.raw disk.qcow2
rm -f state.raw

step "qcow2fs info disk.qcow2"
"$BIN" info disk.qcow2

step "qcow2fs mount disk.qcow2 mnt"
"$BIN" mount disk.qcow2 mnt
grep " $WORK/mnt " /proc/mounts
ls -lR mnt

step "Loop-mounting the active disk and the snapshot 'installed', read-only"
LOOPS+=("$(losetup -f --show -r mnt/disk.raw)")
mount -o ro "${LOOPS[-1]}" guest-now
LOOPS+=("$(losetup -f --show -r mnt/snapshots/installed.raw)")
mount -o ro "${LOOPS[-1]}" guest-then

step "notes.txt now (active disk):"
cat guest-now/notes.txt
step "notes.txt at snapshot 'installed':"
cat guest-then/notes.txt
step "Files that exist now but not at the snapshot:"
diff <(cd guest-then && find . | sort) <(cd guest-now && find . | sort) || true

step "Unmounting everything"
umount guest-now guest-then
for l in "${LOOPS[@]}"; do losetup -d "$l"; done
LOOPS=()
"$BIN" umount mnt
if grep -q " $WORK/mnt " /proc/mounts; then
    echo "demo: mnt is still mounted" >&2
    exit 1
fi
echo "Done: nothing is left mounted."
