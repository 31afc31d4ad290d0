#!/usr/bin/env bash
# Live internal snapshots under load: the time to take a snapshot of a mounted image
# (BENCH_SNAP_SIZE, default 10G, with BENCH_SNAP_DATA, default 1G, written) while four
# fio writers run on it, and the longest pause any writer sees (fio's largest write
# latency), with qcow2fs (`qcow2fs snapshot create`) and with qemu-storage-daemon's FUSE
# export taking the same snapshot over QMP (`blockdev-snapshot-internal-sync`). Each
# system runs the same load once without a snapshot for the baseline latency.
# Writes benches/SNAPSHOTS.md (BENCH_SNAP_OUT). Needs root, fio, qemu-storage-daemon.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${BENCH_QUICK:-0} == 1 ]]; then
    BENCH_SNAP_SIZE=${BENCH_SNAP_SIZE:-2G}
    BENCH_SNAP_DATA=${BENCH_SNAP_DATA:-256M}
fi
SIZE=${BENCH_SNAP_SIZE:-10G}
DATA=${BENCH_SNAP_DATA:-1G}
REPS=${BENCH_REPS:-3}
OUT=${BENCH_SNAP_OUT:-$ROOT/benches/SNAPSHOTS.md}
BIN=${QCOW2FS:-$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/qcow2fs}

log() { printf '[snapshot bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root"
[[ -x $BIN ]] || (cd "$ROOT" && cargo build --release -q) || die "cannot build qcow2fs"
for t in fio qemu-img qemu-io qemu-storage-daemon python3; do
    command -v "$t" >/dev/null || die "$t is not installed"
done

DIR=$(mktemp -d /var/tmp/qcow2fs-snapbench.XXXXXX)
QSD_PID=
cleanup() {
    [[ -n $QSD_PID ]] && kill "$QSD_PID" 2>/dev/null || true
    mountpoint -q "$DIR/mnt" && { "$BIN" umount "$DIR/mnt" 2>/dev/null || umount -l "$DIR/mnt"; }
    rm -rf "$DIR"
}
trap cleanup EXIT
mkdir -p "$DIR/mnt"

make_image() {
    rm -f "$DIR/i.qcow2"
    qemu-img create -q -f qcow2 "$DIR/i.qcow2" "$SIZE"
    qemu-io -c "write -P 0x5a 0 $DATA" "$DIR/i.qcow2" >/dev/null
}

# fio_load FILE SECONDS OUTJSON: four random 4 KiB O_DIRECT writers on FILE.
fio_load() {
    fio --name=w --filename="$1" --rw=randwrite --bs=4k --direct=1 --numjobs=4 \
        --ioengine=psync --time_based --runtime="$2" --size="$DATA" --group_reporting \
        --output-format=json --output="$3" >/dev/null
}

max_lat_ms() {
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("%.1f" % (j["jobs"][0]["write"]["lat_ns"]["max"]/1e6))' "$1"
}

qmp() {
    python3 - "$DIR/qmp.sock" "$1" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
def cmd(c):
    f.write(json.dumps(c) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r
cmd({"execute": "qmp_capabilities"})
t = time.monotonic()
r = cmd(json.loads(sys.argv[2]))
if "error" in r:
    sys.exit(str(r))
print("%.1f" % ((time.monotonic() - t) * 1000))
PY
}

declare -A RES
for rep in $(seq 1 "$REPS"); do
    for sys in ours qsd; do
        for snap in 0 1; do
            log "$sys rep $rep snapshot=$snap"
            make_image
            if [[ $sys == ours ]]; then
                "$BIN" mount -o rw "$DIR/i.qcow2" "$DIR/mnt"
                file=$DIR/mnt/i.raw
            else
                touch "$DIR/qsd.raw"
                qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$DIR/i.qcow2" \
                    --blockdev driver=qcow2,node-name=q,file=f \
                    --export "type=fuse,id=e,node-name=q,mountpoint=$DIR/qsd.raw,writable=on" \
                    --chardev "socket,id=c,path=$DIR/qmp.sock,server=on,wait=off" \
                    --monitor chardev=c --pidfile "$DIR/qsd.pid" --daemonize
                QSD_PID=$(cat "$DIR/qsd.pid")
                file=$DIR/qsd.raw
            fi
            fio_load "$file" 6 "$DIR/fio.json" &
            fio=$!
            took=
            if [[ $snap == 1 ]]; then
                sleep 2
                if [[ $sys == ours ]]; then
                    t0=$(date +%s%N)
                    "$BIN" snapshot create "$DIR/mnt" s1 >/dev/null
                    took=$(( ($(date +%s%N) - t0) / 1000000 ))
                else
                    took=$(qmp '{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"q","name":"s1"}}')
                fi
            fi
            wait "$fio"
            lat=$(max_lat_ms "$DIR/fio.json")
            if [[ $sys == ours ]]; then
                "$BIN" umount "$DIR/mnt"
            else
                kill "$QSD_PID"; while kill -0 "$QSD_PID" 2>/dev/null; do sleep 0.05; done; QSD_PID=
            fi
            qemu-img check -q "$DIR/i.qcow2" || die "qemu-img check failed ($sys)"
            [[ $snap == 0 ]] || [[ $(qemu-img snapshot -l "$DIR/i.qcow2" | grep -c ' s1 ') == 1 ]] \
                || die "no snapshot s1 ($sys)"
            RES[$sys.$snap.lat]+="$lat "
            [[ -n $took ]] && RES[$sys.took]+="$took "
        done
    done
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
{
    echo "# Live snapshots under load"
    echo
    echo "A $SIZE image with $DATA written, four fio writers (random 4 KiB O_DIRECT writes)"
    echo "on the mounted disk; a snapshot taken 2 s into a 6 s run. Medians of $REPS runs"
    echo "at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%F)."
    echo
    echo "| | qcow2fs | qsd (QMP blockdev-snapshot-internal-sync) | ratio |"
    echo "|---|---|---|---|"
    o=$(median "${RES[ours.took]}"); q=$(median "${RES[qsd.took]}")
    echo "| time to take the snapshot | $o ms | $q ms | $(python3 -c "print('%.2fx' % ($q/max($o,0.1)))") |"
    o=$(median "${RES[ours.1.lat]}"); q=$(median "${RES[qsd.1.lat]}")
    echo "| longest write latency, with the snapshot | $o ms | $q ms | $(python3 -c "print('%.2fx' % ($q/max($o,0.1)))") |"
    o=$(median "${RES[ours.0.lat]}"); q=$(median "${RES[qsd.0.lat]}")
    echo "| longest write latency, no snapshot | $o ms | $q ms | $(python3 -c "print('%.2fx' % ($q/max($o,0.1)))") |"
} >"$OUT"
log "wrote $OUT"
