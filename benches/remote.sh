#!/usr/bin/env bash
# Remote images (not a timed test): cold and warm sequential reads and 4 KiB random reads
# of a qcow2 image served on 127.0.0.1 by a local HTTP server with range requests
# (benches/range_server.py) and by moto's S3 server, mounted with qcow2fs; for each, the
# throughput, the requests and bytes fetched per MiB read and the cache hit rate (from
# `qcow2fs status --json`). Side by side: QEMU's curl driver (`qemu-img convert` and
# `qemu-io` reads from the HTTP URL), taken from Debian's qemu-block-extra package of the
# installed QEMU version, unpacked into the benchmark directory (nothing is installed).
# Writes benches/REMOTE.md.
#
# Needs root (FUSE), python3 with moto[server] and boto3 (.ci/run installs moto), fio.
#
# Environment:
#   BENCH_SIZE=1G          image size
#   BENCH_RANDOM_IOS=2000  4 KiB random reads per random run over HTTP
#   BENCH_S3_RANDOM_IOS=200  the same from moto (which copies the object for each request)
#   BENCH_QEMU_TIMEOUT=300 seconds each QEMU run may take
#   BENCH_CACHE_MAX=4G     cache_max of the mounts (above the image size, so that the
#                          warm runs show the disk cache rather than its eviction)
#   BENCH_OUT=FILE         the report (default benches/REMOTE.md)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${BENCH_SIZE:-1G}
IOS=${BENCH_RANDOM_IOS:-2000}
S3_IOS=${BENCH_S3_RANDOM_IOS:-200}
QEMU_TIMEOUT=${BENCH_QEMU_TIMEOUT:-300}
OUT=${BENCH_OUT:-$ROOT/benches/REMOTE.md}

log() { printf '[remote bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts)"
for tool in qemu-img qemu-io python3 fio; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
python3 -c 'import moto.server, boto3' 2>/dev/null || die "moto[server] is not installed"

DIR=$(mktemp -d /var/tmp/qcow2fs-remote-bench.XXXXXX)
MNT=$DIR/mnt
mkdir -p "$DIR/srv" "$MNT"
PIDS=()
BIN=""
cleanup() {
    trap - EXIT INT TERM
    if [[ -n $BIN ]] && mountpoint -q "$MNT" 2>/dev/null; then
        "$BIN" umount "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" || true
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

log "building qcow2fs (release)"
(cd "$ROOT" && cargo build --release -q)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/qcow2fs

log "making a $SIZE image"
IMG=$DIR/srv/disk.qcow2
qemu-img create -q -f qcow2 "$IMG" "$SIZE"
qemu-io -c "write -P 0x5a 0 $SIZE" "$IMG" >/dev/null
BYTES=$(stat -c %s "$IMG")

# Servers, each printing its port first (into $1). Not in a subshell: their pids must
# reach PIDS, which the cleanup kills.
start_server() {
    local portfile=$1; shift
    "$@" >"$portfile" 2>/dev/null &
    PIDS+=($!)
    for _ in $(seq 100); do [[ -s $portfile ]] && break; sleep 0.1; done
    [[ -s $portfile ]] || die "server did not start: $*"
}
start_server "$DIR/http.port" python3 "$ROOT/benches/range_server.py" "$DIR/srv"
HTTP_PORT=$(head -n1 "$DIR/http.port")
start_server "$DIR/moto.port" python3 -c '
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
while True:
    time.sleep(3600)
'
MOTO_PORT=$(head -n1 "$DIR/moto.port")
export AWS_ACCESS_KEY_ID=bench-key AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
log "uploading the image to moto"
python3 - "$MOTO_PORT" "$IMG" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:%s" % sys.argv[1])
s3.create_bucket(Bucket="bench")
s3.upload_file(sys.argv[2], "bench", "disk.qcow2")
EOF
HTTP_URL=http://127.0.0.1:$HTTP_PORT/disk.qcow2
S3_URL=s3://bench/disk.qcow2
S3_OPT=s3_endpoint=http://127.0.0.1:$MOTO_PORT

# QEMU's curl driver from Debian's qemu-block-extra of the installed version.
QEMU_CURL=""
QVER=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [[ -n $QVER ]]; then
    APT_DIR=$DIR/apt
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/deb"
    suite=$(. /etc/os-release; echo "$VERSION_CODENAME")
    [[ $QVER == *bpo* ]] && suite=$suite-backports
    echo "deb http://deb.debian.org/debian $suite main" >"$APT_DIR/sources.list"
    A=(-o "Dir::Etc::sourcelist=$APT_DIR/sources.list" -o Dir::Etc::sourceparts=-
       -o "Dir::State::Lists=$APT_DIR/lists" -o APT::Get::List-Cleanup=0)
    if apt-get "${A[@]}" update >/dev/null 2>&1 &&
        (cd "$APT_DIR/deb" && apt-get "${A[@]}" download "qemu-block-extra=$QVER" >/dev/null 2>&1); then
        dpkg -x "$APT_DIR"/deb/qemu-block-extra_*.deb "$APT_DIR/x"
        QEMU_CURL=$(dirname "$(find "$APT_DIR/x" -name block-curl.so | head -n1)")
    fi
fi
[[ -n $QEMU_CURL ]] && log "QEMU curl driver: qemu-block-extra $QVER" \
    || log "QEMU's curl driver is not available for qemu-utils $QVER"

http_stats() { python3 -c "import json,urllib.request;print(urllib.request.urlopen('http://127.0.0.1:$HTTP_PORT/__$1').read().decode())"; }

# Offsets of the random reads (the same for every run).
python3 -c "
import random
r = random.Random(7)
n = $BYTES // 4096
print('\n'.join(str(r.randrange(n) * 4096) for _ in range($IOS)))" >"$DIR/offsets"

ROWS=()
# row SOURCE CASE SECONDS BYTES_READ REQUESTS BYTES_FETCHED HIT_RATE
row() {
    local mib mbps
    mib=$(python3 -c "print($4 / 1048576)")
    mbps=$(python3 -c "print('%.1f' % ($4 / 1e6 / $3))")
    ROWS+=("| $1 | $2 | $mbps MB/s | $(python3 -c "print('%.2f' % ($5 / $mib))") | $(python3 -c "print('%.2f' % ($6 / 1048576 / $mib))") MiB | $7 |")
    log "$1 $2: $mbps MB/s, $5 requests, $6 bytes fetched for $4 read, hit rate $7"
}

# One qcow2fs run: mount, the workload, the mount's remote statistics, unmount.
qcow2fs_run() { # SOURCE URL CACHE_DIR CASE(seq|rand) LABEL [OPTS]
    local src=$1 url=$2 cache=$3 kind=$4 label=$5 extra=${6:-} ios=$IOS
    [[ $src == *s3 ]] && ios=$S3_IOS
    "$BIN" mount -o "cache_dir=$cache,cache_max=${BENCH_CACHE_MAX:-4G}${extra:+,$extra}" "$url" "$MNT"
    local disk=$MNT/disk.raw t0 t1 nread
    t0=$(date +%s.%N)
    if [[ $kind == seq ]]; then
        dd if="$disk" of=/dev/null bs=1M status=none
        nread=$BYTES
    else
        fio --name=rand --filename="$disk" --rw=randread --bs=4k --direct=1 \
            --ioengine=psync --number_ios="$ios" --randrepeat=1 --randseed=7 \
            --norandommap --output=/dev/null
        nread=$((ios * 4096))
    fi
    t1=$(date +%s.%N)
    local st
    st=$("$BIN" status --json "$MNT")
    "$BIN" umount "$MNT"
    python3 - "$st" >"$DIR/stat" <<'EOF'
import json, sys
v = json.loads(sys.argv[1])["remote"]
g = lambda k: sum(r[k] for r in v)
hits = g("memory_hits") + g("disk_hits")
total = hits + g("fetched_for_reads")
print(g("requests"), g("bytes_fetched"), "%.1f%%" % (100 * hits / total if total else 0))
EOF
    local req fetched hit
    read -r req fetched hit <"$DIR/stat"
    row "$src" "$label" "$(python3 -c "print($t1 - $t0)")" "$nread" "$req" "$fetched" "$hit"
}

for src in http s3; do
    url=$HTTP_URL; extra=""
    [[ $src == s3 ]] && { url=$S3_URL; extra=$S3_OPT; }
    cache=$DIR/cache-$src
    rm -rf "$cache"
    qcow2fs_run "qcow2fs $src" "$url" "$cache" seq "sequential, cold" "$extra"
    qcow2fs_run "qcow2fs $src" "$url" "$cache" seq "sequential, warm (disk cache)" "$extra"
    rm -rf "$cache"
    qcow2fs_run "qcow2fs $src" "$url" "$cache" rand "4 KiB random, cold" "$extra"
    qcow2fs_run "qcow2fs $src" "$url" "$cache" rand "4 KiB random, warm (disk cache)" "$extra"
done

if [[ -n $QEMU_CURL ]]; then
    export QEMU_MODULE_DIR=$QEMU_CURL
    http_stats reset >/dev/null
    t0=$(date +%s.%N)
    qlabel=sequential
    timeout "$QEMU_TIMEOUT" qemu-img convert -f qcow2 -O raw "$HTTP_URL" "$DIR/out.raw" ||
        qlabel="sequential (did not finish in $QEMU_TIMEOUT s: partial)"
    t1=$(date +%s.%N)
    rm -f "$DIR/out.raw"
    s=$(http_stats stats)
    row "QEMU curl (qemu-img convert)" "$qlabel" "$(python3 -c "print($t1 - $t0)")" "$BYTES" \
        "$(python3 -c "import json;print(json.loads('$s')['requests'])")" \
        "$(python3 -c "import json;print(json.loads('$s')['bytes'])")" "n/a"
    http_stats reset >/dev/null
    args=()
    while read -r off; do args+=(-c "read -q $off 4k"); done <"$DIR/offsets"
    t0=$(date +%s.%N)
    qlabel="4 KiB random"
    timeout "$QEMU_TIMEOUT" qemu-io -r -f qcow2 "${args[@]}" "$HTTP_URL" >/dev/null ||
        qlabel="4 KiB random (did not finish in $QEMU_TIMEOUT s)"
    t1=$(date +%s.%N)
    s=$(http_stats stats)
    row "QEMU curl (qemu-io)" "$qlabel" "$(python3 -c "print($t1 - $t0)")" "$((IOS * 4096))" \
        "$(python3 -c "import json;print(json.loads('$s')['requests'])")" \
        "$(python3 -c "import json;print(json.loads('$s')['bytes'])")" "n/a"
fi

{
    echo "# Remote images"
    echo
    echo "\`benches/remote.sh\` on $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d): a $SIZE image"
    echo "(fully written) served on 127.0.0.1 by benches/range_server.py (HTTP) and moto (S3);"
    echo "qcow2fs with its defaults (256 KiB blocks, readahead up to 8 MiB); $IOS random reads of"
    echo "4 KiB over HTTP, $S3_IOS from moto (fio, O_DIRECT, psync; throughput includes fio's start). Requests and bytes are per MiB read; the hit rate counts"
    echo "the blocks readers needed that came from memory or the disk cache. Cold runs start"
    echo "with an empty cache directory, warm runs remount over the cache of the cold run."
    [[ -n $QEMU_CURL ]] && echo "QEMU: qemu-img convert and qemu-io with the curl driver of qemu-block-extra $QVER (HTTP only)." \
        || echo "QEMU's curl driver was not available for qemu-utils $QVER."
    echo
    echo "| reader | case | throughput | requests/MiB | fetched/MiB | hit rate |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$OUT"
log "wrote $OUT"
