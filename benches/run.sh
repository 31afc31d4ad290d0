#!/usr/bin/env bash
# qcow2fs benchmark harness: builds its images with qemu-img and qemu-io, mounts them with
# qcow2fs, with qemu-storage-daemon's FUSE export ("qsd") and, when it is installed, with
# libqcow's qcowmount (plain and zlib images only: it follows no backing files), runs fio and dd on each in turn (ours, qsd, qcowmount, ours, ...)
# (a LUKS aes-256-xts-plain64 image too, both daemons given the same key file)
# for several repetitions and writes the medians, the ratios ours/qsd and the targets to
# benches/RESULTS.md (through benches/report.py). Then benches/vmstate.sh: reading the memory
# rebuilt from a snapshot's VM state (no peer does that).
#
# Needs root (FUSE mounts, dropping the page cache) and qemu-utils plus
# qemu-system-common (qemu-storage-daemon); installs fio with apt-get when missing.
#
# Environment:
#   BENCH_DIR=DIR      where images and mounts go (default: a new directory in /var/tmp,
#                      removed at the end; a given directory is kept)
#   BENCH_SIZE=1G      size of the data images
#   BENCH_REPS=3       repetitions of every measurement
#   BENCH_RUNTIME=5    seconds per time-based fio job
#   BENCH_RSS_SECONDS=60  time bound of the plain sequential read of the 1 TiB image
#   BENCH_QUICK=1      smoke run (256M images, 1 repetition, 2 s jobs), about 3 minutes
#   BENCH_OUT=FILE     the report (default benches/RESULTS.md)
#   BENCH_ONLY=LIST    run only these parts, comma-separated: reads, sparse, rw (default
#                      all); the report then has only their rows
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${BENCH_QUICK:-0} == 1 ]]; then
    BENCH_SIZE=${BENCH_SIZE:-256M}
    BENCH_REPS=${BENCH_REPS:-1}
    BENCH_RUNTIME=${BENCH_RUNTIME:-2}
    BENCH_RSS_SECONDS=${BENCH_RSS_SECONDS:-5}
fi
SIZE=${BENCH_SIZE:-1G}
REPS=${BENCH_REPS:-3}
RUNTIME=${BENCH_RUNTIME:-5}
RSS_SECONDS=${BENCH_RSS_SECONDS:-60}
OUT=${BENCH_OUT:-$ROOT/benches/RESULTS.md}
ONLY=${BENCH_ONLY:-reads,sparse,rw}
# part NAME: whether part NAME is to run.
part() { [[ ,$ONLY, == *,$1,* ]]; }

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts, drop_caches)"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"
for tool in qemu-img qemu-io qemu-storage-daemon python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
if ! command -v fio >/dev/null; then
    log "installing fio"
    DEBIAN_FRONTEND=noninteractive apt-get install -y fio >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y fio >/dev/null; }
fi
HAVE_QCOWMOUNT=0
command -v qcowmount >/dev/null && HAVE_QCOWMOUNT=1

if [[ -n ${BENCH_DIR:-} ]]; then
    mkdir -p "$BENCH_DIR"
    DIR=$(cd "$BENCH_DIR" && pwd)
    KEEP_DIR=1
else
    DIR=$(mktemp -d /var/tmp/qcow2fs-bench.XXXXXX)
    KEEP_DIR=0
fi
IMG=$DIR/img
MNT=$DIR/mnt
RES=$DIR/results
mkdir -p "$IMG" "$MNT" "$RES"
: >"$RES/results.tsv"

# ---- cleanup: whatever is mounted or running when the script ends, however it ends -------
BIN=""
QCOW2FS_MOUNTS=()   # mount points of qcow2fs
QSD_PIDFILES=()     # pid files of qemu-storage-daemon
QCOWMOUNT_DIRS=()   # mount points of qcowmount
BG_PIDS=()          # other background helpers

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local m f p
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for m in "${QCOW2FS_MOUNTS[@]}"; do
        if [[ -n $BIN ]] && mountpoint -q "$m" 2>/dev/null; then
            "$BIN" umount "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
        fi
    done
    for f in "${QSD_PIDFILES[@]}"; do
        [[ -s $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    for m in "${QCOWMOUNT_DIRS[@]}"; do
        mountpoint -q "$m" 2>/dev/null && { fusermount -u "$m" 2>/dev/null || true; }
    done
    sleep 0.5
    for m in "$MNT"/*; do
        mountpoint -q "$m" 2>/dev/null && { fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
    done
    if [[ $KEEP_DIR == 0 ]]; then
        rm -rf "$DIR"
    else
        log "kept $DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build: a private copy of the binary, so a rebuild in the tree cannot change it ------
log "building qcow2fs (cargo build --release)"
(cd "$ROOT" && cargo build --release --quiet)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=$DIR/qcow2fs
# Where cargo puts it: CARGO_TARGET_DIR or build.target-dir when set, else target/.
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$TARGET_DIR/release/qcow2fs" "$BIN"
COMMIT=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$ROOT" && git status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    COMMIT="$COMMIT (+ uncommitted changes in src/)"
fi

# ---- helpers ----------------------------------------------------------------------------
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# warm_host FILES...: empties the page cache, then reads FILES (the image files), so a run
# measures the FUSE path and the daemon rather than the disk under the image.
warm_host() { drop_caches; cat "$@" >/dev/null; }
now_ns() { date +%s%N; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES/results.tsv"; }

# wait_for CMD...: retries CMD for up to 30 s.
wait_for() {
    local i
    for ((i = 0; i < 3000; i++)); do
        "$@" 2>/dev/null && return 0
        sleep 0.01
    done
    return 1
}

# daemon_pid MOUNTPOINT [EXE]: the daemon (by default qcow2fs) serving MOUNTPOINT.
daemon_pid() {
    local p exe=${2:-$BIN}
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/exe" 2>/dev/null) == "$exe" ]] || continue
        if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF "$1"; then
            echo "${p#/proc/}"
            return 0
        fi
    done
    return 1
}

# mount_ours IMAGE NAME [OPTS]: mounts IMAGE at $MNT/NAME.
mount_ours() {
    local image=$1 dir=$MNT/$2 opts=${3:-ro}
    mkdir -p "$dir"
    QCOW2FS_MOUNTS+=("$dir")
    "$BIN" mount -o "$opts" "$image" "$dir"
}
umount_ours() { "$BIN" umount "$MNT/$1"; }

# mount_qsd IMAGE NAME [writable]: exports IMAGE on the regular file $MNT/NAME.raw. With
# QSD_KEY set, the image is LUKS-encrypted and that file holds its passphrase.
mount_qsd() {
    local image=$1 file=$MNT/$2.raw ro=on wr=off secret=() enc=""
    [[ ${3:-} == writable ]] && { ro=off; wr=on; }
    if [[ -n ${QSD_KEY:-} ]]; then
        secret=(--object "secret,id=s0,file=$QSD_KEY")
        enc=",encrypt.format=luks,encrypt.key-secret=s0"
    fi
    touch "$file"
    QSD_PIDFILES+=("$MNT/$2.pid")
    qemu-storage-daemon --daemonize --pidfile "$MNT/$2.pid" "${secret[@]}" \
        --blockdev "driver=file,node-name=f,filename=$image,read-only=$ro" \
        --blockdev "driver=qcow2,node-name=q,file=f,read-only=$ro$enc" \
        --export "type=fuse,id=e,node-name=q,mountpoint=$file,writable=$wr"
}
umount_qsd() {
    local pidfile=$MNT/$1.pid pid
    pid=$(cat "$pidfile")
    kill "$pid"
    wait_for bash -c "! kill -0 $pid" || die "qemu-storage-daemon $pid does not exit"
    rm -f "$pidfile"
}

# mount_qcowmount IMAGE NAME: qcowmount (libfuse 2, daemonizes) at $MNT/NAME; file qcow1.
mount_qcowmount() {
    local dir=$MNT/$2
    mkdir -p "$dir"
    QCOWMOUNT_DIRS+=("$dir")
    qcowmount "$1" "$dir" >/dev/null 2>&1
    wait_for test -e "$dir/qcow1" || die "qcowmount $1 did not come up"
}
umount_qcowmount() {
    local pid
    pid=$(daemon_pid "$MNT/$1" "$(command -v qcowmount)") || true
    fusermount -u "$MNT/$1"
    [[ -z $pid ]] || wait_for bash -c "! kill -0 $pid" || true
}

# cpu_ms PID: user and system CPU time PID has used (all its threads), in milliseconds.
CLK_TCK=$(getconf CLK_TCK)
cpu_ms() { awk -v hz="$CLK_TCK" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$1/stat"; }

# vmhwm PID: the peak resident set of PID in KiB.
vmhwm() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# fio_run WORKLOAD SYSTEM REP FILE ARGS...: one fio job, its JSON kept for report.py.
fio_run() {
    local workload=$1 system=$2 rep=$3 file=$4
    shift 4
    [[ -f $file ]] || die "$file is missing"
    fio --name="$workload" --filename="$file" --allow_file_create=0 --ioengine=psync \
        --output-format=json --output="$RES/$workload.$system.$rep.json" "$@" >/dev/null
}

# Workload definitions: fio arguments by name. Sequential buffered reads make one cold pass
# over the whole file (a time-based job would re-read what the page cache kept); the other
# jobs are time-based.
TB=(--time_based --runtime="$RUNTIME")
declare -A JOB=(
    [seq_buf]="--rw=read --bs=1M --direct=0"
    [seq_direct]="--rw=read --bs=1M --direct=1 ${TB[*]}"
    [rand_qd1_buf]="--rw=randread --bs=4k --direct=0 ${TB[*]}"
    [rand_qd1_direct]="--rw=randread --bs=4k --direct=1 ${TB[*]}"
    [rand_4j_buf]="--rw=randread --bs=4k --direct=0 --numjobs=4 --group_reporting ${TB[*]}"
    [rand_4j_direct]="--rw=randread --bs=4k --direct=1 --numjobs=4 --group_reporting ${TB[*]}"
)

# read_suite PREFIX IMAGE SNAPSHOT WORKLOADS...: mounts IMAGE with every system and runs
# each workload on each system in turn, REPS times. With SNAPSHOT set, qcow2fs reads the
# snapshot file and qsd (which cannot export a snapshot) the image's active disk.
read_suite() {
    local prefix=$1 image=$2 snap=$3
    shift 3
    local name systems=(ours qsd) ours_file qsd_file qcm_file w rep s f pid c0
    local -A pids
    name=$(basename "$image" .qcow2)
    mount_ours "$image" "ours-$name" "${OURS_OPTS:-ro}"
    mount_qsd "$image" "qsd-$name"
    if [[ -n $snap ]]; then
        ours_file=$MNT/ours-$name/snapshots/$snap.raw
    else
        ours_file=$MNT/ours-$name/$name.raw
    fi
    qsd_file=$MNT/qsd-$name.raw
    pids[ours]=$(daemon_pid "$MNT/ours-$name")
    pids[qsd]=$(cat "$MNT/qsd-$name.pid")
    if [[ $HAVE_QCOWMOUNT == 1 && ($prefix == plain || $prefix == zlib) ]]; then
        mount_qcowmount "$image" "qcm-$name"
        qcm_file=$MNT/qcm-$name/qcow1
        systems+=(qcowmount)
        pids[qcowmount]=$(daemon_pid "$MNT/qcm-$name" "$(command -v qcowmount)")
    fi
    for w in "$@"; do
        for ((rep = 1; rep <= REPS; rep++)); do
            for s in "${systems[@]}"; do
                case $s in
                    ours) f=$ours_file ;;
                    qsd) f=$qsd_file ;;
                    qcowmount) f=$qcm_file ;;
                esac
                log "$prefix.$w $s rep $rep"
                if [[ $w == seq_buf ]]; then
                    drop_caches # a cold pass: the disk included
                else
                    warm_host "$IMG/${name%%[0-9]*}"*.qcow2
                fi
                pid=${pids[$s]}
                c0=$(cpu_ms "$pid")
                # shellcheck disable=SC2086
                fio_run "$prefix.$w" "$s" "$rep" "$f" ${JOB[$w]}
                record "$prefix.$w.cpu_ms" "$s" "$rep" "$(($(cpu_ms "$pid") - c0))"
            done
        done
    done
    if [[ $prefix == snap ]]; then
        dd_suite "$ours_file" "$qsd_file"
    fi
    umount_ours "ours-$name"
    umount_qsd "qsd-$name"
    [[ ${systems[*]} == *qcowmount* ]] && umount_qcowmount "qcm-$name"
    return 0
}

# dd_time FILE: seconds (with ns) to read FILE with dd in 1 MiB blocks.
dd_time() {
    local t0 t1
    t0=$(now_ns)
    dd if="$1" of=/dev/null bs=1M status=none
    t1=$(now_ns)
    echo "$(((t1 - t0) / 1000))"
}

# dd_suite OURS QSD: cold read of the whole file, then a warm re-read in a new process.
dd_suite() {
    local rep s f bytes us
    bytes=$(stat -c %s "$1")
    for ((rep = 1; rep <= REPS; rep++)); do
        for s in ours qsd; do
            [[ $s == ours ]] && f=$1 || f=$2
            log "snap.dd $s rep $rep"
            drop_caches
            us=$(dd_time "$f")
            record snap.dd_cold "$s" "$rep" "$((bytes / us))"
            us=$(dd_time "$f")
            record snap.dd_warm "$s" "$rep" "$((bytes / us))"
        done
        # The ceiling: a warm re-read of a regular file of the same size.
        dd if="$1" of="$IMG/cached.raw" bs=1M status=none
        dd_time "$IMG/cached.raw" >/dev/null
        us=$(dd_time "$IMG/cached.raw")
        record snap.dd_warm pagecache "$rep" "$((bytes / us))"
        rm -f "$IMG/cached.raw"
    done
}

# ---- images -------------------------------------------------------------------------------
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
log "creating images in $IMG (data images of $SIZE)"
cd "$IMG"
# Partly compressible, never zero: fio fills half of every 4 KiB with random bytes and half
# with zeros, fresh for every block.
fio --name=fill --filename=data.raw --rw=write --bs=1M --size="$SIZE_BYTES" \
    --buffer_compress_percentage=50 --buffer_compress_chunk=4k --refill_buffers \
    --ioengine=psync --output=/dev/null
qemu-img convert -f raw -O qcow2 data.raw data.qcow2
qemu-img convert -c -f raw -O qcow2 data.raw zlib.qcow2
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd data.raw zstd.qcow2

# An 8-deep chain: chain0 (base) .. chain7 (top), layer i holding the i-th eighth.
slice=$((SIZE_BYTES / 8))
for i in 0 1 2 3 4 5 6 7; do
    if [[ $i == 0 ]]; then
        qemu-img create -q -f qcow2 chain0.qcow2 "$SIZE_BYTES"
    else
        qemu-img create -q -f qcow2 -b "chain$((i - 1)).qcow2" -F qcow2 "chain$i.qcow2"
    fi
    qemu-io -c "write -P $((0x11 * (i + 1) % 256)) $((i * slice)) $slice" "chain$i.qcow2" >/dev/null
done

# A snapshot of the data, then different active data over the first half.
qemu-img convert -f raw -O qcow2 data.raw snap.qcow2
qemu-img snapshot -c base snap.qcow2
qemu-io -c "write -P 0x33 0 $((SIZE_BYTES / 2))" snap.qcow2 >/dev/null

# 1 TiB, sparse: 64 KiB of data at the start of every 512 MiB, so that every L2 table exists
# (2048 tables of 64 KiB, 128 MiB of metadata, four times the default L2 cache).
if part sparse; then
    qemu-img create -q -f qcow2 sparse.qcow2 1T
    cmds=()
    for ((i = 0; i < 2048; i++)); do cmds+=(-c "write -P 0x5a $((i * 512))M 64k"); done
    qemu-io "${cmds[@]}" sparse.qcow2 >/dev/null
fi
# The same data encrypted with QEMU's default LUKS cipher, aes-256-xts-plain64 (a small
# iter-time: the benchmark measures the payload cipher, not the unlocking).
KEY=$IMG/luks.key
printf %s 'qcow2fs benchmark passphrase' >"$KEY"
LUKS_OPTS="encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
qemu-img convert --object "secret,id=s0,file=$KEY" -f raw -O qcow2 -o "$LUKS_OPTS" \
    data.raw luks.qcow2
rm data.raw
# The ceiling of the cold passes: the image file itself read cold.
for ((rep = 1; rep <= REPS; rep++)); do
    drop_caches
    us=$(dd_time data.qcow2)
    record disk.cold_read host "$rep" "$(($(stat -c %s data.qcow2) / us))"
done
cd "$ROOT"

# ---- reads ----------------------------------------------------------------------------
if part reads; then
read_suite plain "$IMG/data.qcow2" "" seq_buf seq_direct rand_qd1_buf rand_qd1_direct rand_4j_buf rand_4j_direct
if "$BIN" mount --help 2>&1 | grep -q 'readahead='; then
    # The same cold pass with a 1 MiB readahead window instead of the kernel's 128 KiB.
    OURS_OPTS=ro,readahead=1024 read_suite plain_ra "$IMG/data.qcow2" "" seq_buf
fi
read_suite zlib "$IMG/zlib.qcow2" "" seq_direct rand_qd1_direct
read_suite zstd "$IMG/zstd.qcow2" "" seq_direct rand_qd1_direct
read_suite chain "$IMG/chain7.qcow2" "" seq_direct rand_qd1_direct
read_suite snap "$IMG/snap.qcow2" base seq_direct rand_qd1_direct
QSD_KEY=$KEY OURS_OPTS=ro,key-file=$KEY read_suite luks "$IMG/luks.qcow2" "" \
    seq_direct rand_qd1_direct rand_4j_direct
fi

# ---- mount to first read on the 1 TiB image --------------------------------------------------
part sparse && for ((rep = 1; rep <= REPS; rep++)); do
    for s in ours qsd; do
        log "sparse.mount_first_read $s rep $rep"
        drop_caches
        t0=$(now_ns)
        if [[ $s == ours ]]; then
            mount_ours "$IMG/sparse.qcow2" ours-sparse
            dd if="$MNT/ours-sparse/sparse.raw" of=/dev/null bs=4k count=1 status=none
        else
            mount_qsd "$IMG/sparse.qcow2" qsd-sparse
            dd if="$MNT/qsd-sparse.raw" of=/dev/null bs=4k count=1 status=none
        fi
        t1=$(now_ns)
        record sparse.mount_first_read "$s" "$rep" "$(((t1 - t0) / 1000))"
        if [[ $s == ours ]]; then umount_ours ours-sparse; else umount_qsd qsd-sparse; fi
    done
done

# ---- peak daemon RSS over the 1 TiB image ----------------------------------------------------
# Two passes: 64 KiB at every 512 MiB over the whole disk (every L2 table is loaded), then a
# plain sequential O_DIRECT read from the start for at most RSS_SECONDS.
part sparse && for s in ours qsd; do
    log "sparse.rss $s"
    drop_caches
    if [[ $s == ours ]]; then
        mount_ours "$IMG/sparse.qcow2" ours-sparse
        f=$MNT/ours-sparse/sparse.raw
        pid=$(daemon_pid "$MNT/ours-sparse")
    else
        mount_qsd "$IMG/sparse.qcow2" qsd-sparse
        f=$MNT/qsd-sparse.raw
        pid=$(cat "$MNT/qsd-sparse.pid")
    fi
    fio_run sparse.stride "$s" 1 "$f" --rw=read:$((512 * 1024 - 64))k --bs=64k --io_size=$((2048 * 64))k --direct=1
    fio_run sparse.seq "$s" 1 "$f" --rw=read --bs=1M --direct=1 --runtime="$RSS_SECONDS"
    record sparse.rss_kib "$s" 1 "$(vmhwm "$pid")"
    if [[ $s == ours ]]; then umount_ours ours-sparse; else umount_qsd qsd-sparse; fi
done

# ---- writes (a fresh image for every run) ------------------------------------------------------
# Allocating sequential writes into an empty image, then 4 KiB random overwrites of
# allocated clusters (a copy of the data image), both O_DIRECT and ending with fsync; the
# same on the LUKS image ("rw_luks"); and the unencrypted ones with an enabled persistent
# bitmap on the image (64 KiB granularity, which both daemons keep up to date and write
# back at the end), for the cost of tracking writes.
part rw && for ((rep = 1; rep <= REPS; rep++)); do
    for kind in plain luks; do
        ws=(write_seq write_rand)
        [[ $kind == plain ]] && ws+=(write_seq_bitmap write_rand_bitmap)
        for w in "${ws[@]}"; do
            for s in ours qsd; do
                name=rw.$w key="" ours_opts=rw check=("$IMG/rw.qcow2") src=$IMG/data.qcow2
                if [[ $kind == luks ]]; then
                    name=rw_luks.$w key=$KEY ours_opts=rw,key-file=$KEY src=$IMG/luks.qcow2
                    check=(--object "secret,id=s0,file=$KEY" --image-opts
                        "driver=qcow2,file.filename=$IMG/rw.qcow2,encrypt.key-secret=s0")
                fi
                log "$name $s rep $rep"
                rm -f "$IMG/rw.qcow2"
                if [[ $w == write_seq* && $kind == plain ]]; then
                    qemu-img create -q -f qcow2 "$IMG/rw.qcow2" "$SIZE_BYTES"
                elif [[ $w == write_seq* ]]; then
                    qemu-img create -q -f qcow2 --object "secret,id=s0,file=$KEY" \
                        -o "$LUKS_OPTS" "$IMG/rw.qcow2" "$SIZE_BYTES"
                else
                    cp "$src" "$IMG/rw.qcow2"
                fi
                if [[ $w == write_seq* ]]; then
                    args=(--rw=write --bs=1M --direct=1 --end_fsync=1)
                else
                    args=(--rw=randwrite --bs=4k --direct=1 --end_fsync=1 "${TB[@]}")
                fi
                [[ $w == *_bitmap ]] && qemu-img bitmap --add -g 64K "$IMG/rw.qcow2" b0
                drop_caches
                if [[ $s == ours ]]; then
                    mount_ours "$IMG/rw.qcow2" ours-rw "$ours_opts"
                    pid=$(daemon_pid "$MNT/ours-rw")
                    c0=$(cpu_ms "$pid")
                    fio_run "$name" ours "$rep" "$MNT/ours-rw/rw.raw" "${args[@]}"
                    record "$name.cpu_ms" ours "$rep" "$(($(cpu_ms "$pid") - c0))"
                    umount_ours ours-rw
                else
                    QSD_KEY=$key mount_qsd "$IMG/rw.qcow2" qsd-rw writable
                    pid=$(cat "$MNT/qsd-rw.pid")
                    c0=$(cpu_ms "$pid")
                    fio_run "$name" qsd "$rep" "$MNT/qsd-rw.raw" "${args[@]}"
                    record "$name.cpu_ms" qsd "$rep" "$(($(cpu_ms "$pid") - c0))"
                    umount_qsd qsd-rw
                fi
                qemu-img check -q "${check[@]}" || die "qemu-img check failed after $name on $s"
                if [[ $w == *_bitmap ]]; then
                    # The bitmap was written back, not in use, and records the writes.
                    qemu-img bitmap --add "$IMG/rw.qcow2" check \
                        && qemu-img bitmap --merge b0 "$IMG/rw.qcow2" check \
                        || die "the bitmap is not valid after $name on $s"
                fi
            done
        done
    done
done

# ---- VM state: a snapshot of a guest with 8 GiB of RAM (benches/vmstate.sh) --------------------
VM_RAM=8G
[[ ${BENCH_QUICK:-0} == 1 ]] && VM_RAM=1G
VM_RAM=$VM_RAM BIN=$BIN RES=$RES REPS=$REPS VM_DIR=$DIR/vmstate bash "$ROOT/benches/vmstate.sh"

# ---- report -----------------------------------------------------------------------------------
log "writing $OUT"
python3 "$ROOT/benches/report.py" --results "$RES" --out "$OUT" \
    --commit "$COMMIT" --size "$SIZE" --reps "$REPS" --runtime "$RUNTIME" \
    --rss-seconds "$RSS_SECONDS" --qcowmount "$HAVE_QCOWMOUNT"
log "done"
