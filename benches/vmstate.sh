#!/usr/bin/env bash
# The VM-state benchmark: a snapshot of a synthetic guest with 8 GiB of RAM (every 16th
# page holds data, the others are zero pages, as savevm sends them; machine pc-i440fx-10.0,
# so NAME.mem is 9 GiB: 3 GiB below 4 GiB, 5 GiB from 4 GiB; a guest under 3.5 GiB has all
# its RAM below 4 GiB), its stream written into a qcow2 image's VM-state area with qemu-io. It measures, with a new daemon for every
# repetition:
#   - the time to the first byte of NAME.mem, cold (page cache dropped) and warm (the image
#     in the page cache): mount, then one 4 KiB O_DIRECT read, which builds the page index;
#   - the throughput of reading all of NAME.mem with O_DIRECT in 1 MiB blocks once the index
#     is built, cold and warm, and the same for NAME.vmstate;
#   - the index's size (the daemon's log line) and the daemon's peak RSS.
# There is no peer that rebuilds guest memory from a savevm stream; NAME.vmstate (the stream
# itself, a plain qcow2 read) is the comparison.
#
# Standalone: `bash benches/vmstate.sh` (root, FUSE) prints the figures. benches/run.sh runs
# it with RES set, and the records go into $RES/results.tsv for benches/report.py.
#
# Environment: BIN (the qcow2fs binary; default: cargo build --release), VM_DIR (work
# directory, default a new one in /var/tmp, removed), VM_RAM (default 8G), REPS (default 3),
# RES (results directory).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-3}
RAM=$(numfmt --from=iec "${VM_RAM:-8G}")

log() { printf '[vmstate %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts, drop_caches)"
for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
if [[ -z ${BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
    BIN=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/qcow2fs
fi
if [[ -n ${VM_DIR:-} ]]; then
    mkdir -p "$VM_DIR"
    DIR=$(cd "$VM_DIR" && pwd)
    KEEP=1
else
    DIR=$(mktemp -d /var/tmp/qcow2fs-vmstate.XXXXXX)
    KEEP=0
fi
MNT=$DIR/mnt
mkdir -p "$MNT"
cleanup() {
    local rc=$?
    mountpoint -q "$MNT" 2>/dev/null && { "$BIN" umount "$MNT" || fusermount3 -uz "$MNT" || true; }
    [[ $KEEP == 1 ]] || rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT

RECORDS=$DIR/records.tsv
: >"$RECORDS"
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" ours "$2" "$3" >>"$RECORDS"
    [[ -z ${RES:-} ]] || printf '%s\t%s\t%s\t%s\n' "$1" ours "$2" "$3" >>"$RES/results.tsv"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now_ns() { date +%s%N; }

# ---- the stream and the image -------------------------------------------------------------
log "writing the stream of a guest with $((RAM >> 30)) GiB of RAM"
python3 - "$DIR/stream.bin" "$RAM" <<'EOF'
import os, struct, sys
path, ram = sys.argv[1], int(sys.argv[2])
PS = 4096
be32 = lambda v: struct.pack(">I", v)
be64 = lambda v: struct.pack(">Q", v)
counted = lambda s: bytes([len(s)]) + s
blocks = [(b"pc.ram", ram), (b"pc.bios", 256 << 10)]
with open(path, "wb") as f:
    f.write(b"QEVM" + be32(3))
    machine = b"pc-i440fx-10.0"
    f.write(b"\x07" + be32(len(machine)) + machine)
    # START of section 1 "ram", version 4: the block list, end of section, footer.
    f.write(b"\x01" + be32(1) + counted(b"ram") + be32(0) + be32(4))
    f.write(be64(sum(s for _, s in blocks) | 0x04))
    for name, size in blocks:
        f.write(counted(name) + be64(size))
    f.write(be64(0x10) + b"\x7e" + be32(1))
    # PART: every page, a data page every 16 pages (distinct bytes), zero pages between.
    f.write(b"\x02" + be32(1))
    rnd = os.urandom(PS * 64)
    out = []
    for i in range(ram // PS):
        flags = 0x08 if i % 16 == 0 else 0x02
        if i == 0:
            out.append(be64(flags) + counted(b"pc.ram"))
        else:
            out.append(be64(i * PS | flags | 0x20))
        if flags == 0x08:
            k = (i // 16) % 64
            out.append(struct.pack(">Q", i) + rnd[k * PS + 8:(k + 1) * PS])
        else:
            out.append(b"\x00")
        if len(out) > 65536:
            f.write(b"".join(out))
            out = []
    f.write(b"".join(out))
    f.write(be64(0x10) + b"\x7e" + be32(1))
    f.write(b"\x03" + be32(1) + be64(0x10) + b"\x7e" + be32(1))
    f.write(b"\x00")
EOF
STREAM_LEN=$(stat -c %s "$DIR/stream.bin")
PADDED=$(((STREAM_LEN + 511) / 512 * 512))
truncate -s "$PADDED" "$DIR/stream.bin"
IMG=$DIR/guest.qcow2
qemu-img create -q -f qcow2 "$IMG" 1G
qemu-io -c "write -b -s $DIR/stream.bin 0 $PADDED" "$IMG" >/dev/null
qemu-img snapshot -c running "$IMG"
rm "$DIR/stream.bin"
# The snapshot's VM-state size, as savevm records it (both fields).
python3 - "$IMG" "$STREAM_LEN" <<'EOF'
import struct, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(64)
    off = struct.unpack(">Q", f.read(8))[0]
    f.seek(off + 36)
    extra = struct.unpack(">I", f.read(4))[0]
    f.seek(off + 32)
    f.write(struct.pack(">I", size & 0xffffffff))
    if extra >= 8:
        f.seek(off + 40)
        f.write(struct.pack(">Q", size))
EOF
log "stream: $STREAM_LEN bytes; image $(du -h "$IMG" | cut -f1)"

# ---- measurements -------------------------------------------------------------------------
MEM=$MNT/snapshots/running.mem
VMS=$MNT/snapshots/running.vmstate
# read_all FILE: MB/s of one O_DIRECT pass over FILE in 1 MiB blocks.
read_all() {
    local t0 t1 bytes
    bytes=$(stat -c %s "$1")
    t0=$(now_ns)
    dd if="$1" of=/dev/null bs=1M iflag=direct status=none
    t1=$(now_ns)
    echo $((bytes * 1000 / (t1 - t0)))
}
# first_byte FILE: microseconds to read the first 4 KiB of FILE (O_DIRECT).
first_byte() {
    local t0 t1
    t0=$(now_ns)
    dd if="$1" of=/dev/null bs=4k count=1 iflag=direct status=none
    t1=$(now_ns)
    echo $(((t1 - t0) / 1000))
}
mount_guest() {
    "$BIN" mount -o "log=$DIR/daemon.log" "$IMG" "$MNT"
    PID=$(pgrep -f -n "^$BIN mount .*$MNT\$" || true)
}
for ((rep = 1; rep <= REPS; rep++)); do
    for cache in cold warm; do
        log "rep $rep, $cache"
        : >"$DIR/daemon.log"
        if [[ $cache == cold ]]; then drop_caches; else cat "$IMG" >/dev/null; fi
        mount_guest
        MEM_BYTES=$(stat -c %s "$MEM")
        record "vm.mem.ttfb_$cache" "$rep" "$(first_byte "$MEM")"
        [[ $cache == cold ]] && drop_caches
        record "vm.mem.read_$cache" "$rep" "$(read_all "$MEM")"
        [[ $cache == cold ]] && drop_caches
        record "vm.vmstate.ttfb_$cache" "$rep" "$(first_byte "$VMS")"
        record "vm.vmstate.read_$cache" "$rep" "$(read_all "$VMS")"
        if [[ $cache == cold ]]; then
            line=$(grep -o 'indexed in [0-9]* ms ([0-9]* KiB of index)' "$DIR/daemon.log" | head -n1)
            [[ -n $line ]] || die "no index line in the daemon's log"
            record vm.index_ms "$rep" "$(sed 's/indexed in \([0-9]*\) ms.*/\1/' <<<"$line")"
            record vm.index_kib "$rep" "$(sed 's/.*(\([0-9]*\) KiB.*/\1/' <<<"$line")"
            [[ -z $PID ]] || record vm.rss_kib "$rep" "$(awk '/^VmHWM:/ {print $2}' "/proc/$PID/status")"
        fi
        "$BIN" umount "$MNT"
    done
done
record vm.stream_bytes 1 "$STREAM_LEN"
record vm.ram_bytes 1 "$RAM"
record vm.mem_bytes 1 "$MEM_BYTES"

# ---- summary --------------------------------------------------------------------------------
python3 - "$RECORDS" <<'EOF'
import statistics, sys
from collections import defaultdict
v = defaultdict(list)
for line in open(sys.argv[1]):
    name, _, _, value = line.split("\t")
    v[name].append(float(value))
m = {k: statistics.median(x) for k, x in v.items()}
print(f"RAM {m['vm.ram_bytes'] / 2**30:.0f} GiB, stream {m['vm.stream_bytes'] / 2**20:.0f} MiB, "
      f"memory file {m['vm.mem_bytes'] / 2**30:.0f} GiB")
for what in ("mem", "vmstate"):
    print(f"{what:8} first byte cold {m[f'vm.{what}.ttfb_cold'] / 1000:8.1f} ms, warm "
          f"{m[f'vm.{what}.ttfb_warm'] / 1000:8.1f} ms; read cold {m[f'vm.{what}.read_cold']:6.0f} MB/s, "
          f"warm {m[f'vm.{what}.read_warm']:6.0f} MB/s")
print(f"index built in {m['vm.index_ms']:.0f} ms (cold), {m['vm.index_kib']:.0f} KiB; "
      f"daemon peak RSS {m.get('vm.rss_kib', 0) / 1024:.1f} MiB")
EOF
